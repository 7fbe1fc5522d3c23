//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.23 as carried over from
//! SPC-3): block-to-block copies within the logical unit, named by one identification target
//! descriptor (our NAA designator).

use crate::sense::Sense;
use bytes::Bytes;
use ingot_engine::Request;

use crate::lu::{Lu, BLOCK_BYTES};
use crate::scsi::{be16, be32, be64, Response};
use crate::sense::{self, fixed, key};

/// Limits reported in RECEIVE COPY RESULTS (OPERATING PARAMETERS).
pub const MAX_TARGET_DESCRIPTORS: u16 = 2;
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 16;
pub const MAX_DESCRIPTOR_LIST_BYTES: u32 = 1024;
/// Largest segment, in bytes (blocks per segment are a 16-bit count anyway).
pub const MAX_SEGMENT_BYTES: u32 = 32 << 20;
/// Parameter list header.
const HEADER_BYTES: usize = 16;
const TARGET_DESCRIPTOR_BYTES: usize = 32;
const B2B_SEGMENT_BYTES: usize = 28;
/// Identification descriptor target descriptor, block-to-block segment descriptor.
const IDENT_TARGET: u8 = 0xe4;
const BLOCK_TO_BLOCK: u8 = 0x02;

const fn s(key: u8, asc: u8, ascq: u8) -> Sense {
    Sense { key, asc, ascq }
}
const TOO_MANY_TARGET_DESCRIPTORS: Sense = s(key::ILLEGAL_REQUEST, 0x26, 0x06);
const UNSUPPORTED_TARGET_DESCRIPTOR: Sense = s(key::ILLEGAL_REQUEST, 0x26, 0x07);
const TOO_MANY_SEGMENT_DESCRIPTORS: Sense = s(key::ILLEGAL_REQUEST, 0x26, 0x08);
const UNSUPPORTED_SEGMENT_DESCRIPTOR: Sense = s(key::ILLEGAL_REQUEST, 0x26, 0x09);
const UNREACHABLE_COPY_TARGET: Sense = s(key::COPY_ABORTED, 0x08, 0x04);
const COPY_TARGET_DATA_OVERRUN: Sense = s(key::COPY_ABORTED, 0x0d, 0x02);

/// EXTENDED COPY (LID1).
pub fn extended_copy(lu: &Lu, port: &str, cdb: &[u8], data: &[u8]) -> Response {
    if cdb[1] & 0x1f != 0 {
        // Only LID1 (service action 0).
        return Response::bad_cdb(1, Some(4));
    }
    let plen = be32(cdb, 10) as usize;
    if plen == 0 {
        return Response::good();
    }
    if plen < HEADER_BYTES || data.len() < plen {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let p = &data[..plen];
    let list_id = p[0];
    let list_id_usage = (p[1] >> 3) & 3;
    let tlen = usize::from(be16(p, 2));
    let slen = be32(p, 8) as usize;
    let inline = be32(p, 12) as usize;
    if inline != 0 {
        return Response::bad_param(12);
    }
    if tlen + slen > MAX_DESCRIPTOR_LIST_BYTES as usize {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    if HEADER_BYTES + tlen + slen > plen {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    if tlen % TARGET_DESCRIPTOR_BYTES != 0 {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let targets = &p[HEADER_BYTES..HEADER_BYTES + tlen];
    let segments = &p[HEADER_BYTES + tlen..HEADER_BYTES + tlen + slen];
    if tlen / TARGET_DESCRIPTOR_BYTES > usize::from(MAX_TARGET_DESCRIPTORS) {
        return Response::check(TOO_MANY_TARGET_DESCRIPTORS);
    }
    // Which target descriptors name this logical unit.
    let mut ours = Vec::new();
    for (i, t) in targets.chunks_exact(TARGET_DESCRIPTOR_BYTES).enumerate() {
        if t[0] != IDENT_TARGET {
            return Response::check(UNSUPPORTED_TARGET_DESCRIPTOR);
        }
        if t[1] & 0x1f != 0 {
            // Only block devices.
            return Response::bad_param((HEADER_BYTES + i * TARGET_DESCRIPTOR_BYTES + 1) as u16);
        }
        let code_set = t[4] & 0x0f;
        let kind = t[5] & 0x0f;
        let assoc = (t[5] >> 4) & 3;
        let len = usize::from(t[7]);
        let matches = code_set == 1
            && kind == 3
            && assoc == 0
            && len == lu.naa.len()
            && t.get(8..8 + len) == Some(&lu.naa[..]);
        let block = (u32::from(t[29]) << 16) | (u32::from(t[30]) << 8) | u32::from(t[31]);
        ours.push(matches && (block == 0 || block == BLOCK_BYTES));
    }
    // Parse the segment descriptors first: a bad list copies nothing.
    let mut plan = Vec::new();
    let mut at = 0;
    while at < segments.len() {
        if at + 4 > segments.len() {
            return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let d = &segments[at..];
        let len = usize::from(be16(d, 2)) + 4;
        if d[0] != BLOCK_TO_BLOCK {
            return Response::check(UNSUPPORTED_SEGMENT_DESCRIPTOR);
        }
        if len != B2B_SEGMENT_BYTES || at + len > segments.len() {
            return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if plan.len() >= usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Response::check(TOO_MANY_SEGMENT_DESCRIPTORS);
        }
        let src = usize::from(be16(d, 4));
        let dst = usize::from(be16(d, 6));
        let blocks = u64::from(be16(d, 10));
        let src_lba = be64(d, 12);
        let dst_lba = be64(d, 20);
        plan.push((src, dst, blocks, src_lba, dst_lba));
        at += len;
    }
    let total = lu.blocks();
    let bs = u64::from(BLOCK_BYTES);
    // No FUA bit in the CDB: the copy's writes are durable on completion exactly when every
    // other write is, i.e. while WCE is off (MODE SELECT of the caching page).
    let fua = lu.fua(false);
    let mut done_segments = 0u16;
    let mut done_bytes = 0u64;
    for (src, dst, blocks, src_lba, dst_lba) in plan {
        if !ours.get(src).copied().unwrap_or(false) || !ours.get(dst).copied().unwrap_or(false) {
            return Response::check(UNREACHABLE_COPY_TARGET);
        }
        let in_range = |lba: u64| lba.checked_add(blocks).is_some_and(|e| e <= total);
        if !in_range(src_lba) || !in_range(dst_lba) {
            return Response::check_raw(fixed(COPY_TARGET_DATA_OVERRUN, None));
        }
        let mut pos = 0u64;
        while pos < blocks {
            let n = (blocks - pos).min(u64::from(MAX_SEGMENT_BYTES) / bs);
            let data = match lu.backend.call(Request::Read {
                offset: (src_lba + pos) * bs,
                len: (n * bs) as u32,
            }) {
                Ok(ingot_engine::Reply::Data(d)) => d,
                Ok(ingot_engine::Reply::Pieces(p)) => Bytes::from(p.concat()),
                Ok(ingot_engine::Reply::Done) => Bytes::from(vec![0; (n * bs) as usize]),
                Err(e) => return Response::engine(&e),
            };
            if let Err(e) = lu.backend.call(Request::Write {
                offset: (dst_lba + pos) * bs,
                data,
                fua,
            }) {
                return Response::engine(&e);
            }
            pos += n;
        }
        done_segments += 1;
        done_bytes += blocks * bs;
    }
    let mut st = lu.state.lock();
    if list_id_usage == 0 {
        // HOLD: the results stay for RECEIVE COPY RESULTS.
        st.copies
            .insert((port.to_string(), list_id), (done_segments, done_bytes));
    } else {
        st.copies.remove(&(port.to_string(), list_id));
    }
    Response::good()
}

/// RECEIVE COPY RESULTS: COPY STATUS (0) and OPERATING PARAMETERS (3).
pub fn receive_copy_results(lu: &Lu, port: &str, cdb: &[u8]) -> Response {
    let sa = cdb[1] & 0x1f;
    let list_id = cdb[2];
    let alloc = be32(cdb, 10) as usize;
    let mut d = Vec::new();
    match sa {
        0 => {
            // Held results are reported once.
            let held = lu.state.lock().copies.remove(&(port.to_string(), list_id));
            let Some((segments, bytes)) = held else {
                return Response::bad_cdb(2, None);
            };
            d.extend_from_slice(&8u32.to_be_bytes());
            d.push(0x01); // completed without errors
            d.extend_from_slice(&segments.to_be_bytes());
            // Transfer count in kibibytes (units code 0x01).
            d.push(0x01);
            d.extend_from_slice(&((bytes / 1024).min(u64::from(u32::MAX)) as u32).to_be_bytes());
        }
        3 => {
            d.resize(44, 0);
            d[4] = 0; // SNLID: list identifiers are required per nexus
            d[8..10].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
            d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
            d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_BYTES.to_be_bytes());
            d[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
            d[20..24].copy_from_slice(&0u32.to_be_bytes()); // no inline data
            d[24..28].copy_from_slice(&0u32.to_be_bytes()); // no held data
            d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
            d[36] = 1; // maximum concurrent copies
            d[37] = 9; // data segment granularity: 512 bytes (log2)
            let implemented = [BLOCK_TO_BLOCK, IDENT_TARGET];
            d[43] = implemented.len() as u8;
            d.extend_from_slice(&implemented);
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
        }
        _ => return Response::bad_cdb(1, Some(4)),
    }
    d.truncate(alloc);
    Response::data(d)
}
