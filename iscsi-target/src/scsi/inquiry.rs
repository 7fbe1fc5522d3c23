//! Identification and capacity: INQUIRY and its VPD pages, READ CAPACITY, REPORT LUNS,
//! REQUEST SENSE (SPC-4, SBC-3).

use super::{
    be16, be32, be64, Nexus, Response, MAX_CAW_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS, OPTIMAL_GRANULARITY_BLOCKS,
};
use crate::lu::{Lu, BLOCK_BYTES};
use crate::sense::{self, fixed, Sense};

/// Vendor and product of standard INQUIRY data.
const VENDOR: &[u8; 8] = b"INGOT   ";
const PRODUCT: &[u8; 16] = b"ingot volume    ";
const REVISION: &[u8; 4] = b"0001";

pub(super) fn read_capacity10(lu: &Lu, cdb: &[u8]) -> Response {
    let pmi = cdb[8] & 1 != 0;
    if !pmi && be32(cdb, 2) != 0 {
        return Response::bad_cdb(2, None);
    }
    let last = lu.blocks().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&last.to_be_bytes());
    d.extend_from_slice(&BLOCK_BYTES.to_be_bytes());
    Response::data(d)
}

pub(super) fn read_capacity16(lu: &Lu, cdb: &[u8]) -> Response {
    let alloc = be32(cdb, 10) as usize;
    let pmi = cdb[14] & 1 != 0;
    if !pmi && be64(cdb, 2) != 0 {
        return Response::bad_cdb(2, None);
    }
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lu.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&BLOCK_BYTES.to_be_bytes());
    // Logical blocks per physical block exponent 0: the engine takes 512-byte writes. Its
    // 4 KiB block is announced as the optimal granularity in VPD 0xB0 instead (an exponent of 3
    // makes GET LBA STATUS conformance tests expect descriptors that SBC-3 forbids).
    d[13] = 0;
    // LBPME (thin provisioned) and LBPRZ (unmapped blocks read as zeroes).
    d[14] = 0xc0;
    d.truncate(alloc);
    Response::data(d)
}

pub(super) fn report_luns(cdb: &[u8]) -> Response {
    let select = cdb[2];
    let alloc = be32(cdb, 6) as usize;
    if !matches!(select, 0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12) {
        return Response::bad_cdb(2, None);
    }
    let mut d = Vec::with_capacity(16);
    let luns: &[u64] = if matches!(select, 0x01 | 0x11) {
        &[]
    } else {
        &[0]
    };
    d.extend_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for l in luns {
        d.extend_from_slice(&l.to_be_bytes());
    }
    d.truncate(alloc);
    Response::data(d)
}

pub(super) fn request_sense(cdb: &[u8], ua: Option<Sense>) -> Response {
    let desc = cdb[1] & 1 != 0;
    let alloc = usize::from(cdb[4]);
    let s = ua.unwrap_or(sense::NO_SENSE);
    let mut d = if desc {
        vec![0x72, s.key, s.asc, s.ascq, 0, 0, 0, 0]
    } else {
        fixed(s, None).to_vec()
    };
    d.truncate(alloc);
    Response::data(d)
}

pub(super) fn inquiry(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8]) -> Response {
    let evpd = cdb[1] & 1 != 0;
    let page = cdb[2];
    let alloc = usize::from(be16(cdb, 3));
    if cdb[1] & 0xfe != 0 {
        // CMDDT (obsolete) and reserved bits.
        return Response::bad_cdb(1, Some(1));
    }
    let mut d = if !evpd {
        if page != 0 {
            return Response::bad_cdb(2, None);
        }
        standard_inquiry()
    } else {
        match vpd(lu, nexus, page) {
            Some(d) => d,
            None => return Response::bad_cdb(2, None),
        }
    };
    d.truncate(alloc);
    Response::data(d)
}

pub(super) fn standard_inquiry() -> Vec<u8> {
    let mut d = vec![0u8; 66];
    d[0] = 0x00; // connected, direct access block device
    d[1] = 0x00; // not removable
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x08; // 3PC: EXTENDED COPY
    d[6] = 0x00;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

pub(super) const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

pub(super) fn vpd(lu: &Lu, nexus: &Nexus<'_>, page: u8) -> Option<Vec<u8>> {
    let mut d = vec![0x00, page, 0, 0];
    match page {
        0x00 => d.extend_from_slice(&VPD_PAGES),
        0x80 => d.extend_from_slice(lu.serial.as_bytes()),
        0x83 => {
            // NAA IEEE Registered Extended, associated with the logical unit.
            d.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
            d.extend_from_slice(&lu.naa);
            // T10 vendor identification: vendor + serial.
            let mut t10 = VENDOR.to_vec();
            t10.extend_from_slice(lu.serial.as_bytes());
            d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            d.extend_from_slice(&t10);
            // Relative target port identifier 1 (iSCSI protocol, PIV, target port).
            d.extend_from_slice(&[0x51, 0x94, 0x00, 4, 0, 0, 0, 1]);
            // Target port group 1? Not reported (no ALUA). SCSI name string of the target.
            let mut name = nexus.target_name.as_bytes().to_vec();
            name.push(0);
            while name.len() % 4 != 0 {
                name.push(0);
            }
            if name.len() <= 252 {
                d.extend_from_slice(&[0x53, 0xa8, 0x00, name.len() as u8]);
                d.extend_from_slice(&name);
            }
        }
        0xb0 => {
            let mut b = [0u8; 60];
            b[1] = MAX_CAW_BLOCKS;
            b[2..4].copy_from_slice(&(OPTIMAL_GRANULARITY_BLOCKS as u16).to_be_bytes());
            b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            b[8..12].copy_from_slice(&(2048u32).to_be_bytes()); // optimal: 1 MiB
            b[12..16].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes()); // max prefetch
            b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
            b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            b[24..28].copy_from_slice(&OPTIMAL_GRANULARITY_BLOCKS.to_be_bytes());
            b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
            // byte 4 of the page (b[0]) bit 0: WSNZ = 0 (zero blocks means to the end).
            d.extend_from_slice(&b);
        }
        0xb1 => {
            let mut b = [0u8; 60];
            b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
            b[3] = 0x00; // form factor not reported
            d.extend_from_slice(&b);
        }
        0xb2 => {
            // Threshold exponent 0; LBPU, LBPWS, LBPWS10; LBPRZ; provisioning type thin.
            d.extend_from_slice(&[0x00, 0xe4, 0x02, 0x00]);
        }
        _ => return None,
    }
    let len = (d.len() - 4) as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    Some(d)
}
