//! Block I/O: READ, WRITE, VERIFY, COMPARE AND WRITE, OR WRITE, SYNCHRONIZE CACHE, PRE-FETCH,
//! WRITE SAME, UNMAP and GET LBA STATUS (SBC-3).

use bytes::Bytes;
use ingot_engine::{Reply as EngineReply, Request, MAX_REQUEST_BYTES};

use super::{
    be16, be32, be64, Action, Response, MAX_CAW_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS,
};
use crate::lu::{Lu, BLOCK_BYTES};
use crate::sense::{self, fixed, status};

/// LBA and block count of a READ/WRITE/VERIFY CDB.
pub(super) fn lba_len(cdb: &[u8]) -> (u64, u32) {
    match cdb[0] >> 5 {
        0 => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | u64::from(be16(cdb, 2));
            let n = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            (lba, n)
        }
        1 | 2 => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
        5 => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    }
}

/// Check `lba..lba+n` against the volume.
pub(super) fn check_lba(lu: &Lu, lba: u64, n: u64) -> Result<(), Response> {
    match lba.checked_add(n) {
        Some(end) if end <= lu.blocks() => Ok(()),
        _ => Err(Response::check(sense::LBA_OUT_OF_RANGE)),
    }
}

/// The checks READ and WRITE share: no protection information (RDPROTECT/WRPROTECT, absent
/// from the 6-byte CDB `short_op`), the range within the volume, and the transfer length
/// (field at byte 7 in the 10-byte CDB `ten_op`, else byte 6).
pub(super) fn rw_range(
    lu: &Lu,
    cdb: &[u8],
    short_op: u8,
    ten_op: u8,
) -> Result<(u64, u32), Response> {
    let (lba, n) = lba_len(cdb);
    if cdb[0] != short_op && cdb[1] & 0xe0 != 0 {
        return Err(Response::bad_cdb(1, Some(7)));
    }
    check_lba(lu, lba, u64::from(n))?;
    if n > MAX_TRANSFER_BLOCKS {
        return Err(Response::bad_cdb(
            if cdb[0] == ten_op { 7 } else { 6 },
            None,
        ));
    }
    Ok((lba, n))
}

pub(super) fn read(lu: &Lu, cdb: &[u8]) -> Action {
    let (lba, n) = match rw_range(lu, cdb, 0x08, 0x28) {
        Ok(r) => r,
        Err(r) => return Action::Done(r),
    };
    if n == 0 {
        return Action::Done(Response::good());
    }
    Action::Read {
        offset: lba * u64::from(BLOCK_BYTES),
        len: n * BLOCK_BYTES,
    }
}

pub(super) fn write(lu: &Lu, cdb: &[u8], data_out: Vec<u8>) -> Action {
    let (lba, n) = match rw_range(lu, cdb, 0x0a, 0x2a) {
        Ok(r) => r,
        Err(r) => return Action::Done(r),
    };
    // Write what the initiator sent, up to the CDB's length, in whole blocks.
    let want = (n as usize) * BLOCK_BYTES as usize;
    let have = data_out.len().min(want) / BLOCK_BYTES as usize * BLOCK_BYTES as usize;
    if have == 0 {
        return Action::Done(Response::good());
    }
    let mut data = data_out;
    data.truncate(have);
    // FUA (byte 1 bit 3) on the 10/12/16 forms; WRITE AND VERIFY is always durable.
    let fua =
        lu.fua((cdb[0] != 0x0a && cdb[1] & 0x08 != 0) || matches!(cdb[0], 0x2e | 0xae | 0x8e));
    Action::Write {
        offset: lba * u64::from(BLOCK_BYTES),
        data: Bytes::from(data),
        fua,
    }
}

pub(super) fn read_sync(lu: &Lu, offset: u64, len: u64) -> Result<Vec<u8>, Response> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let l = (end - pos).min(MAX_REQUEST_BYTES) as u32;
        match lu.backend.call(Request::Read {
            offset: pos,
            len: l,
        }) {
            Ok(EngineReply::Data(d)) => out.extend_from_slice(&d),
            Ok(EngineReply::Pieces(p)) => p.iter().for_each(|d| out.extend_from_slice(d)),
            Ok(EngineReply::Done) => out.resize(out.len() + l as usize, 0),
            Err(e) => return Err(Response::engine(&e)),
        }
        pos += u64::from(l);
    }
    Ok(out)
}

pub(super) fn verify(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
    let (lba, n) = lba_len(cdb);
    if cdb[1] & 0xe0 != 0 {
        return Response::bad_cdb(1, Some(7));
    }
    let bytchk = (cdb[1] >> 1) & 3;
    if bytchk == 2 {
        return Response::bad_cdb(1, Some(2));
    }
    if let Err(r) = check_lba(lu, lba, u64::from(n)) {
        return r;
    }
    if n == 0 {
        return Response::good();
    }
    if n > MAX_TRANSFER_BLOCKS {
        return Response::bad_cdb(if cdb[0] == 0x2f { 7 } else { 6 }, None);
    }
    let bs = BLOCK_BYTES as usize;
    let medium = match read_sync(lu, lba * u64::from(BLOCK_BYTES), u64::from(n) * bs as u64) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let expected: Vec<u8> = match bytchk {
        0 => return Response::good(),
        1 => data_out.to_vec(),
        _ => data_out.get(..bs).unwrap_or(data_out).repeat(n as usize),
    };
    if expected.len() < medium.len() {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    compare(&medium, &expected)
}

pub(super) fn compare(medium: &[u8], expected: &[u8]) -> Response {
    match medium.iter().zip(expected).position(|(a, b)| a != b) {
        None => Response::good(),
        Some(at) => Response::check_raw(fixed(sense::MISCOMPARE_DURING_VERIFY, Some(at as u32))),
    }
}

pub(super) fn compare_and_write(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
    let lba = be64(cdb, 2);
    let n = u64::from(cdb[13]);
    if cdb[1] & 0xe0 != 0 {
        return Response::bad_cdb(1, Some(7));
    }
    if n > u64::from(MAX_CAW_BLOCKS) {
        return Response::bad_cdb(13, None);
    }
    if let Err(r) = check_lba(lu, lba, n) {
        return r;
    }
    let len = (n * u64::from(BLOCK_BYTES)) as usize;
    if data_out.len() != 2 * len {
        // The Data-Out must hold exactly the verify and the write data.
        return Response::bad_cdb(13, None);
    }
    if n == 0 {
        return Response::good();
    }
    let _atomic = lu.caw_lock.lock();
    let offset = lba * u64::from(BLOCK_BYTES);
    let medium = match read_sync(lu, offset, len as u64) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let r = compare(&medium, &data_out[..len]);
    if r.status != status::GOOD {
        return r;
    }
    let fua = lu.fua(cdb[1] & 0x08 != 0);
    match lu.backend.call(Request::Write {
        offset,
        data: Bytes::copy_from_slice(&data_out[len..2 * len]),
        fua,
    }) {
        Ok(_) => Response::good(),
        Err(e) => Response::engine(&e),
    }
}

/// OR WRITE (SBC-3 §5.9): OR the Data-Out into the blocks, atomically with respect to other
/// OR WRITE and COMPARE AND WRITE commands.
pub(super) fn or_write(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
    let (lba, n) = lba_len(cdb);
    if cdb[1] & 0xe0 != 0 {
        // ORPROTECT: no protection information here.
        return Response::bad_cdb(1, Some(7));
    }
    if let Err(r) = check_lba(lu, lba, u64::from(n)) {
        return r;
    }
    if n > MAX_TRANSFER_BLOCKS {
        return Response::bad_cdb(10, None);
    }
    let len = (n as usize) * BLOCK_BYTES as usize;
    let have = data_out.len().min(len) / BLOCK_BYTES as usize * BLOCK_BYTES as usize;
    if have == 0 {
        return Response::good();
    }
    let _atomic = lu.caw_lock.lock();
    let offset = lba * u64::from(BLOCK_BYTES);
    let mut medium = match read_sync(lu, offset, have as u64) {
        Ok(m) => m,
        Err(r) => return r,
    };
    for (m, d) in medium.iter_mut().zip(data_out) {
        *m |= *d;
    }
    let fua = lu.fua(cdb[1] & 0x08 != 0);
    match lu.backend.call(Request::Write {
        offset,
        data: Bytes::from(medium),
        fua,
    }) {
        Ok(_) => Response::good(),
        Err(e) => Response::engine(&e),
    }
}

/// LBA and block count of a command with a 10-byte form (`short` opcode: 4-byte LBA at 2,
/// 2-byte count at 7) and a 16-byte form (8-byte LBA at 2, 4-byte count at 10).
pub(super) fn lba_count_10_16(cdb: &[u8], short: u8) -> (u64, u64) {
    if cdb[0] == short {
        (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
    } else {
        (be64(cdb, 2), u64::from(be32(cdb, 10)))
    }
}

pub(super) fn synchronize_cache(lu: &Lu, cdb: &[u8]) -> Response {
    let (lba, n) = lba_count_10_16(cdb, 0x35);
    if let Err(r) = check_lba(lu, lba, n) {
        return r;
    }
    match lu.backend.call(Request::Flush) {
        Ok(_) => Response::good(),
        Err(e) => Response::engine(&e),
    }
}

pub(super) fn prefetch(lu: &Lu, cdb: &[u8]) -> Response {
    let (lba, n) = lba_count_10_16(cdb, 0x34);
    if let Err(r) = check_lba(lu, lba, n) {
        return r;
    }
    // Nothing is loaded into a cache ahead of time: report that the blocks are not cached
    // beyond what the read cache already holds.
    Response::good()
}

pub(super) fn write_same(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
    let ws16 = cdb[0] == 0x93;
    let (lba, n) = if ws16 {
        (be64(cdb, 2), u64::from(be32(cdb, 10)))
    } else {
        (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
    };
    let unmap = cdb[1] & 0x08 != 0;
    let anchor = cdb[1] & 0x10 != 0;
    let ndob = ws16 && cdb[1] & 0x01 != 0;
    if cdb[1] & 0xe0 != 0 {
        return Response::bad_cdb(1, Some(7));
    }
    if anchor {
        // Anchored blocks are not supported (ANC_SUP = 0).
        return Response::bad_cdb(1, Some(4));
    }
    // A zero block count means "up to the last block" (WSNZ = 0).
    let n = if n == 0 {
        match lu.blocks().checked_sub(lba) {
            Some(rest) if rest > 0 => rest,
            _ => return Response::check(sense::LBA_OUT_OF_RANGE),
        }
    } else {
        n
    };
    if n > MAX_WRITE_SAME_BLOCKS && !(unmap || ndob || data_out.iter().all(|&b| b == 0)) {
        return Response::bad_cdb(if ws16 { 10 } else { 7 }, None);
    }
    if let Err(r) = check_lba(lu, lba, n) {
        return r;
    }
    let bs = BLOCK_BYTES as usize;
    // The Data-Out is exactly one block (none with NDOB).
    if data_out.len() != if ndob { 0 } else { bs } {
        return Response::bad_cdb(if ws16 { 10 } else { 7 }, None);
    }
    let block: &[u8] = data_out;
    let zero = block.iter().all(|&b| b == 0);
    let offset = lba * bs as u64;
    let len = n * bs as u64;
    let fua = lu.fua(false);
    // With UNMAP the blocks are deallocated whatever the pattern: they then read as zeroes
    // (LBPRZ = 1), as SBC-3 allows for a thin-provisioned logical unit.
    let req = if unmap {
        Request::Trim { offset, len, fua }
    } else if zero {
        Request::WriteZeroes { offset, len, fua }
    } else {
        // Write the pattern in chunks.
        let chunk_blocks = (MAX_REQUEST_BYTES / bs as u64 / 8).max(1);
        let mut pos = 0u64;
        while pos < n {
            let c = (n - pos).min(chunk_blocks);
            let data = Bytes::from(block.repeat(c as usize));
            if let Err(e) = lu.backend.call(Request::Write {
                offset: offset + pos * bs as u64,
                data,
                fua,
            }) {
                return Response::engine(&e);
            }
            pos += c;
        }
        return Response::good();
    };
    match lu.backend.call(req) {
        Ok(_) => Response::good(),
        Err(e) => Response::engine(&e),
    }
}

pub(super) fn unmap(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
    if cdb[1] & 0x01 != 0 {
        // ANCHOR
        return Response::bad_cdb(1, Some(0));
    }
    let plen = usize::from(be16(cdb, 7));
    if plen == 0 {
        return Response::good();
    }
    if plen < 8 || data_out.len() < plen {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let p = &data_out[..plen];
    let bd_len = usize::from(be16(p, 2));
    let avail = (plen - 8).min(bd_len);
    let count = avail / 16;
    if count as u32 > MAX_UNMAP_DESCRIPTORS {
        return Response::bad_param(2);
    }
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let d = &p[8 + i * 16..8 + i * 16 + 16];
        let lba = be64(d, 0);
        let n = u64::from(be32(d, 8));
        if let Err(r) = check_lba(lu, lba, n) {
            return r;
        }
        if n > u64::from(MAX_UNMAP_BLOCKS) {
            return Response::bad_param((8 + i * 16 + 8) as u16);
        }
        if n > 0 {
            ranges.push((lba, n));
        }
    }
    let fua = lu.fua(false);
    for (lba, n) in ranges {
        if let Err(e) = lu.backend.call(Request::Trim {
            offset: lba * u64::from(BLOCK_BYTES),
            len: n * u64::from(BLOCK_BYTES),
            fua,
        }) {
            return Response::engine(&e);
        }
    }
    Response::good()
}

pub(super) fn get_lba_status(lu: &Lu, cdb: &[u8]) -> Response {
    let lba = be64(cdb, 2);
    let alloc = be32(cdb, 10) as usize;
    let blocks = lu.blocks();
    if lba >= blocks {
        return Response::check(sense::LBA_OUT_OF_RANGE);
    }
    // Report at most this many blocks per call (metadata walk is per 4 KiB block).
    const SPAN_BLOCKS: u64 = 1 << 21;
    let end = (lba + SPAN_BLOCKS).min(blocks);
    let bs = u64::from(BLOCK_BYTES);
    let extents = match lu.backend.block_status(lba * bs, (end - lba) * bs) {
        Ok(e) => e,
        Err(e) => return Response::engine(&e),
    };
    let mut descs = Vec::new();
    let mut pos = lba;
    for e in extents {
        let n = e.len / bs;
        let mut left = n;
        while left > 0 {
            let c = left.min(u64::from(u32::MAX));
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&pos.to_be_bytes());
            d[8..12].copy_from_slice(&(c as u32).to_be_bytes());
            d[12] = if e.hole { 1 } else { 0 };
            descs.extend_from_slice(&d);
            pos += c;
            left -= c;
        }
        if descs.len() >= alloc.saturating_sub(8) + 16 {
            break;
        }
    }
    let mut out = Vec::with_capacity(8 + descs.len());
    out.extend_from_slice(&((descs.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&descs);
    out.truncate(alloc);
    Response::data(out)
}
