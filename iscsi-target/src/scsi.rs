//! SCSI command set of the logical unit (SPC-4 and SBC-3). [`execute`] decodes a CDB and either
//! answers at once or hands a read or write back to the connection to run asynchronously.
//! Everything else that touches the volume runs synchronously through [`Volume::call`].

use crate::sense::Sense;
use bytes::Bytes;
use ingot_engine::{Error, Reply as EngineReply, Request, MAX_REQUEST_BYTES};

use crate::lu::{pr_type, Lu, LuState, Reservation, BLOCK_BYTES, MAX_REGISTRATIONS};
use crate::sense::{self, fixed, fixed_with_field, status, SENSE_BYTES};

/// Largest transfer of one READ or WRITE, in blocks (VPD 0xB0 MAXIMUM TRANSFER LENGTH).
pub const MAX_TRANSFER_BLOCKS: u32 = (MAX_REQUEST_BYTES / BLOCK_BYTES as u64) as u32;
/// Optimal transfer granularity: the engine's 4 KiB block.
pub const OPTIMAL_GRANULARITY_BLOCKS: u32 = 8;
/// Largest COMPARE AND WRITE, in blocks.
pub const MAX_CAW_BLOCKS: u8 = 255;
/// Largest UNMAP descriptor count and LBA count per descriptor.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Largest WRITE SAME, in blocks.
pub const MAX_WRITE_SAME_BLOCKS: u64 = 0x0100_0000;
/// Vendor and product of standard INQUIRY data.
const VENDOR: &[u8; 8] = b"INGOT   ";
const PRODUCT: &[u8; 16] = b"ingot volume    ";
const REVISION: &[u8; 4] = b"0001";

/// What a command produced without asynchronous I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u8,
    /// Data-In (before truncation to the expected transfer length).
    pub data: Bytes,
    pub sense: Option<[u8; SENSE_BYTES]>,
}

impl Response {
    pub fn good() -> Response {
        Response {
            status: status::GOOD,
            data: Bytes::new(),
            sense: None,
        }
    }
    pub fn data(data: impl Into<Bytes>) -> Response {
        Response {
            status: status::GOOD,
            data: data.into(),
            sense: None,
        }
    }
    pub fn check(s: Sense) -> Response {
        Response {
            status: status::CHECK_CONDITION,
            data: Bytes::new(),
            sense: Some(fixed(s, None)),
        }
    }
    pub fn check_raw(sense: [u8; SENSE_BYTES]) -> Response {
        Response {
            status: status::CHECK_CONDITION,
            data: Bytes::new(),
            sense: Some(sense),
        }
    }
    pub fn conflict() -> Response {
        Response {
            status: status::RESERVATION_CONFLICT,
            data: Bytes::new(),
            sense: None,
        }
    }
    /// INVALID FIELD IN CDB pointing at `byte` (and `bit`).
    pub fn bad_cdb(byte: u16, bit: Option<u8>) -> Response {
        Response::check_raw(fixed_with_field(
            sense::INVALID_FIELD_IN_CDB,
            true,
            byte,
            bit,
        ))
    }
    pub fn bad_param(byte: u16) -> Response {
        Response::check_raw(fixed_with_field(
            sense::INVALID_FIELD_IN_PARAMETER_LIST,
            false,
            byte,
            None,
        ))
    }
    pub fn engine(e: &Error) -> Response {
        Response::check(crate::sense::of_error(e))
    }
}

/// What the connection must do with a command.
#[derive(Debug)]
pub enum Action {
    Done(Response),
    /// Read `len` bytes at `offset`; the data is the Data-In.
    Read {
        offset: u64,
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
}

/// Who sent a command: the initiator port (`iqn...,i,0xISID`).
pub struct Nexus<'a> {
    pub port: &'a str,
    /// Relative target port identifier and target name, for VPD 0x83.
    pub target_name: &'a str,
}

/// Big-endian fields of CDBs and parameter lists.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Class of a command for reservation checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, ...).
    Any,
    Read,
    Write,
    /// Conflicts with any reservation held by someone else (RESERVE/RELEASE, MODE SELECT).
    Exclusive,
}

fn access_of(op: u8, cdb: &[u8]) -> Access {
    match op {
        0x12 | 0xa0 | 0x03 | 0x5e | 0x5f | 0x25 | 0x00 => Access::Any,
        0x9e if cdb[1] & 0x1f == 0x10 => Access::Any,
        0xa3 => Access::Any,
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x9e | 0x1a | 0x5a => {
            Access::Read
        }
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b
        | 0x35 | 0x91 | 0x83 => Access::Write,
        0x16 | 0x17 | 0x15 | 0x55 | 0x1b | 0x1e => Access::Exclusive,
        _ => Access::Any,
    }
}

/// Whether `port` may run a command of class `a` given the reservations.
fn reservation_conflict(st: &LuState, port: &str, op: u8, a: Access) -> bool {
    if let Some(holder) = &st.reserve6 {
        if holder != port {
            // SPC-2 reservations: only INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE, PR IN,
            // and the other Any-class commands pass.
            return !matches!(op, 0x12 | 0xa0 | 0x03 | 0x17 | 0x5e | 0xa3 | 0x25 | 0x9e)
                || (op == 0x9e && a != Access::Any);
        }
        return false;
    }
    let Some(r) = &st.reservation else {
        return false;
    };
    if st.is_holder(port) {
        return false;
    }
    let registered = st.key_of(port).is_some();
    let ro_ar = pr_type::registrants_access(r.kind);
    match a {
        Access::Any => false,
        Access::Read => {
            if pr_type::exclusive_access(r.kind) {
                !(ro_ar && registered)
            } else {
                false
            }
        }
        Access::Write => !(ro_ar && registered),
        Access::Exclusive => match op {
            // RESERVE(6) / RELEASE(6) conflict with any persistent reservation.
            0x16 | 0x17 => true,
            _ => !(ro_ar && registered),
        },
    }
}

/// Decode and run one command for `lu`. `data_out` holds the Data-Out the initiator sent (at
/// most the expected transfer length).
pub fn execute(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8], data_out: Vec<u8>) -> Action {
    if cdb.len() < 16 {
        return Action::Done(Response::check(sense::INVALID_OPCODE));
    }
    let op = cdb[0];
    {
        let mut st = lu.state.lock();
        let blocks = lu.blocks();
        if blocks != st.known_blocks {
            // The volume was resized: every initiator hears of it once.
            st.known_blocks = blocks;
            st.ua_all(sense::CAPACITY_CHANGED, None);
        }
        // Unit attentions are reported to anything but INQUIRY, REPORT LUNS and REQUEST SENSE.
        if !matches!(op, 0x12 | 0xa0 | 0x03) {
            if let Some(q) = st.ua.get_mut(nexus.port) {
                if let Some(ua) = q.pop_front() {
                    return Action::Done(Response::check(ua));
                }
            }
        }
        let a = access_of(op, cdb);
        if reservation_conflict(&st, nexus.port, op, a) {
            return Action::Done(Response::conflict());
        }
        // The NACA bit of the CONTROL byte: we support no ACA.
        let control = match op >> 5 {
            0 => cdb[5],
            1 | 2 => cdb[9],
            5 => cdb[11],
            4 => cdb[15],
            _ => 0,
        };
        if control & 0x04 != 0 {
            let at = match op >> 5 {
                0 => 5,
                1 | 2 => 9,
                5 => 11,
                _ => 15,
            };
            return Action::Done(Response::bad_cdb(at, Some(2)));
        }
        if op == 0x03 {
            // REQUEST SENSE returns (and clears) a pending unit attention.
            let ua = st.ua.get_mut(nexus.port).and_then(|q| q.pop_front());
            return Action::Done(request_sense(cdb, ua));
        }
    }
    match op {
        0x00 => Action::Done(Response::good()),
        0x12 => Action::Done(inquiry(lu, nexus, cdb)),
        0xa0 => Action::Done(report_luns(cdb)),
        0x25 => Action::Done(read_capacity10(lu, cdb)),
        0x9e => match cdb[1] & 0x1f {
            0x10 => Action::Done(read_capacity16(lu, cdb)),
            0x12 => Action::Done(get_lba_status(lu, cdb)),
            _ => Action::Done(Response::bad_cdb(1, Some(4))),
        },
        0x08 | 0x28 | 0xa8 | 0x88 => read(lu, cdb),
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => write(lu, cdb, data_out),
        0x2f | 0xaf | 0x8f => Action::Done(verify(lu, cdb, &data_out)),
        0x89 => Action::Done(compare_and_write(lu, cdb, &data_out)),
        0x8b => Action::Done(or_write(lu, cdb, &data_out)),
        0x35 | 0x91 => Action::Done(synchronize_cache(lu, cdb)),
        0x34 | 0x90 => Action::Done(prefetch(lu, cdb)),
        0x41 | 0x93 => Action::Done(write_same(lu, cdb, &data_out)),
        0x42 => Action::Done(unmap(lu, cdb, &data_out)),
        0x1a | 0x5a => Action::Done(mode_sense(lu, cdb)),
        0x15 | 0x55 => Action::Done(mode_select(lu, cdb, &data_out)),
        0x16 => Action::Done(reserve6(lu, nexus, cdb)),
        0x17 => Action::Done(release6(lu, nexus, cdb)),
        0x1b => Action::Done(start_stop(cdb)),
        0x1e => Action::Done(prevent_allow(lu, nexus, cdb)),
        0xa3 => Action::Done(maintenance_in(cdb)),
        0x5e => Action::Done(pr_in(lu, cdb)),
        0x5f => Action::Done(pr_out(lu, nexus, cdb, &data_out)),
        0x37 | 0xb7 => Action::Done(read_defect_data(cdb)),
        0x83 => Action::Done(crate::xcopy::extended_copy(lu, nexus.port, cdb, &data_out)),
        0x84 => Action::Done(crate::xcopy::receive_copy_results(lu, nexus.port, cdb)),
        _ => Action::Done(Response::check(sense::INVALID_OPCODE)),
    }
}

/// Bytes of Data-Out a CDB asks for (what the initiator should send), when it has any.
pub fn data_out_len(cdb: &[u8]) -> u64 {
    if cdb.len() < 16 {
        return 0;
    }
    let bs = u64::from(BLOCK_BYTES);
    match cdb[0] {
        0x0a => {
            let n = u64::from(cdb[4]);
            if n == 0 {
                256 * bs
            } else {
                n * bs
            }
        }
        0x2a | 0x2e => u64::from(be16(cdb, 7)) * bs,
        0xaa | 0xae => u64::from(be32(cdb, 6)) * bs,
        0x8a | 0x8e | 0x8b => u64::from(be32(cdb, 10)) * bs,
        0x2f | 0xaf | 0x8f => {
            let n = match cdb[0] {
                0x2f => u64::from(be16(cdb, 7)),
                0xaf => u64::from(be32(cdb, 6)),
                _ => u64::from(be32(cdb, 10)),
            };
            match (cdb[1] >> 1) & 3 {
                1 => n * bs,
                3 if n > 0 => bs,
                _ => 0,
            }
        }
        0x89 => 2 * u64::from(cdb[13]) * bs,
        0x41 | 0x93 => {
            if cdb[0] == 0x93 && cdb[1] & 1 != 0 {
                0
            } else {
                bs
            }
        }
        0x42 => u64::from(be16(cdb, 7)),
        0x15 => u64::from(cdb[4]),
        0x55 => u64::from(be16(cdb, 7)),
        0x5f => u64::from(be32(cdb, 5)),
        0x83 => u64::from(be32(cdb, 10)),
        _ => 0,
    }
}

/// LBA and block count of a READ/WRITE/VERIFY CDB.
fn lba_len(cdb: &[u8]) -> (u64, u32) {
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
fn check_lba(lu: &Lu, lba: u64, n: u64) -> Result<(), Response> {
    match lba.checked_add(n) {
        Some(end) if end <= lu.blocks() => Ok(()),
        _ => Err(Response::check(sense::LBA_OUT_OF_RANGE)),
    }
}

/// The checks READ and WRITE share: no protection information (RDPROTECT/WRPROTECT, absent
/// from the 6-byte CDB `short_op`), the range within the volume, and the transfer length
/// (field at byte 7 in the 10-byte CDB `ten_op`, else byte 6).
fn rw_range(lu: &Lu, cdb: &[u8], short_op: u8, ten_op: u8) -> Result<(u64, u32), Response> {
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

fn read(lu: &Lu, cdb: &[u8]) -> Action {
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

fn write(lu: &Lu, cdb: &[u8], data_out: Vec<u8>) -> Action {
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

fn read_sync(lu: &Lu, offset: u64, len: u64) -> Result<Vec<u8>, Response> {
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

fn verify(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
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

fn compare(medium: &[u8], expected: &[u8]) -> Response {
    match medium.iter().zip(expected).position(|(a, b)| a != b) {
        None => Response::good(),
        Some(at) => Response::check_raw(fixed(sense::MISCOMPARE_DURING_VERIFY, Some(at as u32))),
    }
}

fn compare_and_write(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
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
fn or_write(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
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
fn lba_count_10_16(cdb: &[u8], short: u8) -> (u64, u64) {
    if cdb[0] == short {
        (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
    } else {
        (be64(cdb, 2), u64::from(be32(cdb, 10)))
    }
}

fn synchronize_cache(lu: &Lu, cdb: &[u8]) -> Response {
    let (lba, n) = lba_count_10_16(cdb, 0x35);
    if let Err(r) = check_lba(lu, lba, n) {
        return r;
    }
    match lu.backend.call(Request::Flush) {
        Ok(_) => Response::good(),
        Err(e) => Response::engine(&e),
    }
}

fn prefetch(lu: &Lu, cdb: &[u8]) -> Response {
    let (lba, n) = lba_count_10_16(cdb, 0x34);
    if let Err(r) = check_lba(lu, lba, n) {
        return r;
    }
    // Nothing is loaded into a cache ahead of time: report that the blocks are not cached
    // beyond what the read cache already holds.
    Response::good()
}

fn write_same(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
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

fn unmap(lu: &Lu, cdb: &[u8], data_out: &[u8]) -> Response {
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

fn get_lba_status(lu: &Lu, cdb: &[u8]) -> Response {
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

fn read_capacity10(lu: &Lu, cdb: &[u8]) -> Response {
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

fn read_capacity16(lu: &Lu, cdb: &[u8]) -> Response {
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

fn report_luns(cdb: &[u8]) -> Response {
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

fn request_sense(cdb: &[u8], ua: Option<Sense>) -> Response {
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

fn inquiry(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8]) -> Response {
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

fn standard_inquiry() -> Vec<u8> {
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

const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn vpd(lu: &Lu, nexus: &Nexus<'_>, page: u8) -> Option<Vec<u8>> {
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

/// Mode pages: (page, current bytes, changeable mask). Page bytes include the 2-byte header.
fn mode_pages(wce: bool) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
    let mut caching = vec![0u8; 20];
    caching[0] = 0x08;
    caching[1] = 18;
    caching[2] = if wce { 0x04 } else { 0 };
    let mut caching_mask = vec![0u8; 20];
    caching_mask[0] = 0x08;
    caching_mask[1] = 18;
    caching_mask[2] = 0x04;
    let mut control = vec![0u8; 12];
    control[0] = 0x0a;
    control[1] = 10;
    control[2] = 0x02; // GLTSD
    control[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering)
    control[8] = 0xff; // busy timeout period: unlimited
    control[9] = 0xff;
    let mut control_mask = vec![0u8; 12];
    control_mask[0] = 0x0a;
    control_mask[1] = 10;
    let mut rw = vec![0u8; 12];
    rw[0] = 0x01;
    rw[1] = 10;
    rw[2] = 0x80; // AWRE
    let mut rw_mask = vec![0u8; 12];
    rw_mask[0] = 0x01;
    rw_mask[1] = 10;
    let mut iec = vec![0u8; 12];
    iec[0] = 0x1c;
    iec[1] = 10;
    let mut iec_mask = vec![0u8; 12];
    iec_mask[0] = 0x1c;
    iec_mask[1] = 10;
    vec![
        (0x01, rw, rw_mask),
        (0x08, caching, caching_mask),
        (0x0a, control, control_mask),
        (0x1c, iec, iec_mask),
    ]
}

fn mode_sense(lu: &Lu, cdb: &[u8]) -> Response {
    let ten = cdb[0] == 0x5a;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if pc == 3 {
        return Response::check(sense::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    let wce = lu.state.lock().wce;
    let pages = mode_pages(wce);
    let mut body = Vec::new();
    let pick = |cur: &Vec<u8>, mask: &Vec<u8>| -> Vec<u8> {
        if pc == 1 {
            mask.clone()
        } else if pc == 2 {
            // Defaults equal the power-on values (write cache enabled).
            let mut d = cur.clone();
            if d[0] == 0x08 {
                d[2] |= 0x04;
            }
            d
        } else {
            cur.clone()
        }
    };
    if page == 0x3f {
        if subpage != 0 && subpage != 0xff {
            return Response::bad_cdb(3, None);
        }
        for (_, cur, mask) in &pages {
            body.extend_from_slice(&pick(cur, mask));
        }
    } else {
        if subpage != 0 {
            return Response::bad_cdb(3, None);
        }
        match pages.iter().find(|(p, _, _)| *p == page) {
            Some((_, cur, mask)) => body.extend_from_slice(&pick(cur, mask)),
            None => return Response::bad_cdb(2, Some(5)),
        }
    }
    let blocks = lu.blocks();
    let mut bd = Vec::new();
    if !dbd {
        if llbaa {
            bd.extend_from_slice(&blocks.to_be_bytes());
            bd.extend_from_slice(&[0; 4]);
            bd.extend_from_slice(&BLOCK_BYTES.to_be_bytes());
        } else {
            let n = blocks.min(0xff_ffff) as u32;
            bd.extend_from_slice(&n.to_be_bytes());
            bd.extend_from_slice(&BLOCK_BYTES.to_be_bytes());
        }
    }
    // Device-specific parameter: DPOFUA, and WP for a snapshot.
    let dsp = if lu.backend.read_only() { 0x90 } else { 0x10 };
    let mut d = Vec::new();
    if ten {
        let total = 6 + bd.len() + body.len();
        d.extend_from_slice(&(total as u16).to_be_bytes());
        d.push(0);
        d.push(dsp);
        d.push(if llbaa && !dbd { 1 } else { 0 });
        d.push(0);
        d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let total = 3 + bd.len() + body.len();
        d.push(total.min(255) as u8);
        d.push(0);
        d.push(dsp);
        d.push(bd.len() as u8);
    }
    d.extend_from_slice(&bd);
    d.extend_from_slice(&body);
    d.truncate(alloc);
    Response::data(d)
}

fn mode_select(lu: &Lu, cdb: &[u8], data: &[u8]) -> Response {
    let ten = cdb[0] == 0x55;
    let pf = cdb[1] & 0x10 != 0;
    let sp = cdb[1] & 0x01 != 0;
    let plen = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if sp {
        return Response::bad_cdb(1, Some(0));
    }
    if plen == 0 {
        return Response::good();
    }
    if !pf {
        return Response::bad_cdb(1, Some(4));
    }
    let hdr = if ten { 8 } else { 4 };
    if plen < hdr || data.len() < plen {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let p = &data[..plen];
    let bd_len = if ten {
        usize::from(be16(p, 6))
    } else {
        usize::from(p[3])
    };
    let mut at = hdr + bd_len;
    if at > plen {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let wce_now = lu.state.lock().wce;
    let pages = mode_pages(wce_now);
    let mut new_wce = None;
    while at < plen {
        if at + 2 > plen {
            return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let code = p[at] & 0x3f;
        if p[at] & 0x40 != 0 {
            // Subpage format: none supported.
            return Response::bad_param(at as u16);
        }
        let len = usize::from(p[at + 1]) + 2;
        if at + len > plen {
            return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let Some((_, cur, mask)) = pages.iter().find(|(c, _, _)| *c == code) else {
            return Response::bad_param(at as u16);
        };
        if len != cur.len() {
            return Response::bad_param((at + 1) as u16);
        }
        // Only changeable bits may differ from the current values.
        for i in 2..len {
            if (p[at + i] ^ cur[i]) & !mask[i] != 0 {
                return Response::bad_param((at + i) as u16);
            }
        }
        if code == 0x08 {
            new_wce = Some(p[at + 2] & 0x04 != 0);
        }
        at += len;
    }
    if let Some(w) = new_wce {
        let mut st = lu.state.lock();
        if st.wce && !w {
            // Turning the cache off: make what it held durable.
            drop(st);
            if let Err(e) = lu.backend.call(Request::Flush) {
                return Response::engine(&e);
            }
            st = lu.state.lock();
        }
        st.wce = w;
    }
    Response::good()
}

fn reserve6(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8]) -> Response {
    if cdb[1] & 0x01 != 0 {
        // Third-party / extent reservations are not supported.
        return Response::bad_cdb(1, Some(0));
    }
    let mut st = lu.state.lock();
    if st.reservation.is_some() {
        return Response::conflict();
    }
    match &st.reserve6 {
        Some(h) if h != nexus.port => Response::conflict(),
        _ => {
            st.reserve6 = Some(nexus.port.to_string());
            Response::good()
        }
    }
}

fn release6(lu: &Lu, nexus: &Nexus<'_>, _cdb: &[u8]) -> Response {
    let mut st = lu.state.lock();
    if st.reservation.is_some() {
        return Response::conflict();
    }
    if st.reserve6.as_deref() == Some(nexus.port) {
        st.reserve6 = None;
    }
    Response::good()
}

fn start_stop(cdb: &[u8]) -> Response {
    let power_condition = cdb[4] >> 4;
    if power_condition != 0 {
        // Power conditions are accepted but have no effect on flash.
        return Response::good();
    }
    Response::good()
}

fn prevent_allow(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8]) -> Response {
    let prevent = cdb[4] & 0x03;
    let mut st = lu.state.lock();
    if prevent & 1 != 0 {
        st.prevent.insert(nexus.port.to_string());
    } else {
        st.prevent.remove(nexus.port);
    }
    Response::good()
}

fn read_defect_data(cdb: &[u8]) -> Response {
    // No defects: an empty list in the requested format.
    if cdb[0] == 0x37 {
        let alloc = usize::from(be16(cdb, 7));
        let mut d = vec![0u8, cdb[2] & 0x1f, 0, 0];
        d.truncate(alloc);
        Response::data(d)
    } else {
        let alloc = be32(cdb, 6) as usize;
        let mut d = vec![0u8, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0];
        d.truncate(alloc);
        Response::data(d)
    }
}

/// Supported commands: (opcode, service action, CDB length).
const OPCODES: &[(u8, Option<u16>, u8)] = &[
    (0x00, None, 6),
    (0x03, None, 6),
    (0x08, None, 6),
    (0x0a, None, 6),
    (0x12, None, 6),
    (0x15, None, 6),
    (0x16, None, 6),
    (0x17, None, 6),
    (0x1a, None, 6),
    (0x1b, None, 6),
    (0x1e, None, 6),
    (0x25, None, 10),
    (0x28, None, 10),
    (0x2a, None, 10),
    (0x2e, None, 10),
    (0x2f, None, 10),
    (0x34, None, 10),
    (0x35, None, 10),
    (0x37, None, 10),
    (0x41, None, 10),
    (0x42, None, 10),
    (0x55, None, 10),
    (0x5a, None, 10),
    (0x5e, Some(0), 10),
    (0x5e, Some(1), 10),
    (0x5e, Some(2), 10),
    (0x5e, Some(3), 10),
    (0x5f, Some(0), 10),
    (0x5f, Some(1), 10),
    (0x5f, Some(2), 10),
    (0x5f, Some(3), 10),
    (0x5f, Some(4), 10),
    (0x5f, Some(5), 10),
    (0x5f, Some(6), 10),
    (0x83, Some(0), 16),
    (0x84, Some(0), 16),
    (0x84, Some(3), 16),
    (0x88, None, 16),
    (0x89, None, 16),
    (0x8a, None, 16),
    (0x8b, None, 16),
    (0x8e, None, 16),
    (0x8f, None, 16),
    (0x90, None, 16),
    (0x91, None, 16),
    (0x93, None, 16),
    (0x9e, Some(0x10), 16),
    (0x9e, Some(0x12), 16),
    (0xa0, None, 12),
    (0xa3, Some(0x0c), 12),
    (0xa8, None, 12),
    (0xaa, None, 12),
    (0xae, None, 12),
    (0xaf, None, 12),
    (0xb7, None, 12),
];

/// CDB usage bitmap: the opcode, then every bit of the other bytes usable, except the service
/// action field which is exact.
fn usage(op: u8, sa: Option<u16>, len: u8) -> Vec<u8> {
    let mut u = vec![0xffu8; usize::from(len)];
    u[0] = op;
    if let Some(sa) = sa {
        u[1] = (sa as u8 & 0x1f) | 0xe0;
    }
    // The CONTROL byte: only NACA-less bits (we reject NACA).
    let last = usize::from(len) - 1;
    u[last] = 0x00;
    u
}

fn maintenance_in(cdb: &[u8]) -> Response {
    if cdb[1] & 0x1f != 0x0c {
        return Response::bad_cdb(1, Some(4));
    }
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let op = cdb[3];
    let sa = be16(cdb, 4);
    let alloc = be32(cdb, 6) as usize;
    let timeouts = |d: &mut Vec<u8>| {
        if rctd {
            d.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 30, 0, 0, 0, 60]);
        }
    };
    let mut d = Vec::new();
    match options {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for (o, s, l) in OPCODES {
                d.push(*o);
                d.push(0);
                d.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if s.is_some() { 0x01 } else { 0 } | if rctd { 0x02 } else { 0 });
                d.extend_from_slice(&u16::from(*l).to_be_bytes());
                timeouts(&mut d);
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
        }
        1..=3 => {
            let found = OPCODES.iter().find(|(o, s, _)| {
                *o == op
                    && match options {
                        1 => s.is_none(),
                        2 => *s == Some(sa),
                        _ => s.is_none() || *s == Some(sa),
                    }
            });
            if options == 1 && OPCODES.iter().any(|(o, s, _)| *o == op && s.is_some()) {
                return Response::bad_cdb(2, None);
            }
            if options == 2 && OPCODES.iter().any(|(o, s, _)| *o == op && s.is_none()) {
                return Response::bad_cdb(2, None);
            }
            match found {
                Some((o, s, l)) => {
                    d.push(0);
                    d.push(0x03 | if rctd { 0x80 } else { 0 }); // supported per standard
                    d.extend_from_slice(&u16::from(*l).to_be_bytes());
                    d.extend_from_slice(&usage(*o, *s, *l));
                }
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
            timeouts(&mut d);
        }
        _ => return Response::bad_cdb(2, None),
    }
    d.truncate(alloc);
    Response::data(d)
}

fn pr_in(lu: &Lu, cdb: &[u8]) -> Response {
    let sa = cdb[1] & 0x1f;
    let alloc = usize::from(be16(cdb, 7));
    let st = lu.state.lock();
    let mut d = Vec::new();
    d.extend_from_slice(&st.pr_generation.to_be_bytes());
    match sa {
        0 => {
            // READ KEYS
            let keys: Vec<u8> = st
                .registrations
                .iter()
                .flat_map(|(_, k)| k.to_be_bytes())
                .collect();
            d.extend_from_slice(&(keys.len() as u32).to_be_bytes());
            d.extend_from_slice(&keys);
        }
        1 => {
            // READ RESERVATION
            match &st.reservation {
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if pr_type::all_registrants(r.kind) {
                        0
                    } else {
                        st.key_of(&r.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    d.push(0);
                    d.push(r.kind & 0x0f);
                    d.extend_from_slice(&[0; 2]);
                }
                None => d.extend_from_slice(&0u32.to_be_bytes()),
            }
        }
        2 => {
            // REPORT CAPABILITIES
            d.clear();
            d.extend_from_slice(&8u16.to_be_bytes());
            d.push(0x00); // CRH 0, SIP_C 0, ATP_C 0, PTPL_C 0
            d.push(0x80); // TMV; ALLOW COMMANDS 0; PTPL_A 0
                          // Persistent reservation type mask: WE, EA, WERO, EARO, WEAR, EAAR.
            d.push(0xea); // bit7 WR_EX_AR, bit6 EX_AC_RO, bit5 WR_EX_RO, bit3 EX_AC, bit1 WR_EX
            d.push(0x01); // EX_AC_AR
            d.extend_from_slice(&[0; 2]);
        }
        3 => {
            // READ FULL STATUS
            let mut descs = Vec::new();
            for (port, key) in &st.registrations {
                let holder = st.is_holder(port);
                let mut e = Vec::new();
                e.extend_from_slice(&key.to_be_bytes());
                e.extend_from_slice(&[0; 4]);
                e.push(if holder { 0x01 } else { 0 }); // R_HOLDER
                e.push(match (&st.reservation, holder) {
                    (Some(r), true) => r.kind & 0x0f,
                    _ => 0,
                });
                e.extend_from_slice(&[0; 4]);
                e.extend_from_slice(&1u16.to_be_bytes()); // relative target port
                let tid = transport_id(port);
                e.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                e.extend_from_slice(&tid);
                descs.extend_from_slice(&e);
            }
            d.extend_from_slice(&(descs.len() as u32).to_be_bytes());
            d.extend_from_slice(&descs);
        }
        _ => return Response::bad_cdb(1, Some(4)),
    }
    d.truncate(alloc);
    Response::data(d)
}

/// iSCSI TransportID (SPC-4 §7.6.4.6, format 01b: name + ",i,0x" + ISID).
fn transport_id(port: &str) -> Vec<u8> {
    let mut name = port.as_bytes().to_vec();
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

fn pr_out(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8], data: &[u8]) -> Response {
    let sa = cdb[1] & 0x1f;
    let scope = cdb[2] >> 4;
    let kind = cdb[2] & 0x0f;
    let plen = be32(cdb, 5) as usize;
    if sa > 7 {
        return Response::bad_cdb(1, Some(4));
    }
    if sa == 7 {
        // REGISTER AND MOVE is not supported.
        return Response::bad_cdb(1, Some(4));
    }
    if plen != 24 {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    if data.len() < 24 {
        return Response::check(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let key = be64(data, 0);
    let sa_key = be64(data, 8);
    let flags = data[20];
    if flags & 0x0c != 0 {
        // SPEC_I_PT / ALL_TG_PT are not supported.
        return Response::bad_param(20);
    }
    if flags & 0x01 != 0 {
        // APTPL: persistence across power loss is not supported.
        return Response::bad_param(20);
    }
    let port = nexus.port;
    let mut st = lu.state.lock();
    let current = st.key_of(port);
    match sa {
        0 | 6 => {
            // REGISTER / REGISTER AND IGNORE EXISTING KEY
            if sa == 0 && current.unwrap_or(0) != key {
                return Response::conflict();
            }
            if sa_key == 0 {
                if current.is_some() {
                    unregister(&mut st, port);
                }
            } else if current.is_some() {
                if let Some(r) = st.registrations.iter_mut().find(|(p, _)| p == port) {
                    r.1 = sa_key;
                }
            } else {
                if st.registrations.len() >= MAX_REGISTRATIONS {
                    return Response::check(sense::INSUFFICIENT_REGISTRATION_RESOURCES);
                }
                st.registrations.push((port.to_string(), sa_key));
            }
            st.pr_generation = st.pr_generation.wrapping_add(1);
            Response::good()
        }
        1 => {
            // RESERVE
            if current != Some(key) {
                return Response::conflict();
            }
            if scope != 0 {
                return Response::bad_cdb(2, Some(4));
            }
            if !pr_type::valid(kind) {
                return Response::bad_cdb(2, Some(0));
            }
            match &st.reservation {
                Some(r) if st.is_holder(port) => {
                    if r.kind != kind {
                        return Response::conflict();
                    }
                    Response::good()
                }
                Some(_) => Response::conflict(),
                None => {
                    st.reservation = Some(Reservation {
                        holder: port.to_string(),
                        kind,
                    });
                    Response::good()
                }
            }
        }
        2 => {
            // RELEASE
            if current != Some(key) {
                return Response::conflict();
            }
            let Some(r) = st.reservation.clone() else {
                return Response::good();
            };
            if !st.is_holder(port) {
                return Response::good();
            }
            if scope != 0 || r.kind != kind {
                return Response::check(sense::INVALID_RELEASE);
            }
            st.reservation = None;
            if pr_type::registrants_access(r.kind) {
                let others: Vec<String> = st
                    .registrations
                    .iter()
                    .filter(|(p, _)| p != port)
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in others {
                    st.ua_to(&p, sense::RESERVATIONS_RELEASED);
                }
            }
            Response::good()
        }
        3 => {
            // CLEAR
            if current != Some(key) {
                return Response::conflict();
            }
            let others: Vec<String> = st
                .registrations
                .iter()
                .filter(|(p, _)| p != port)
                .map(|(p, _)| p.clone())
                .collect();
            for p in others {
                st.ua_to(&p, sense::RESERVATIONS_PREEMPTED);
            }
            st.registrations.clear();
            st.reservation = None;
            st.pr_generation = st.pr_generation.wrapping_add(1);
            Response::good()
        }
        4 | 5 => {
            // PREEMPT / PREEMPT AND ABORT
            if current != Some(key) {
                return Response::conflict();
            }
            if !pr_type::valid(kind) {
                return Response::bad_cdb(2, Some(0));
            }
            let res = st.reservation.clone();
            let preempt_holder = match &res {
                Some(r) if pr_type::all_registrants(r.kind) => sa_key == 0,
                Some(r) => st.key_of(&r.holder) == Some(sa_key),
                None => false,
            };
            if sa_key == 0 && !preempt_holder {
                return Response::bad_param(8);
            }
            let victims: Vec<String> = st
                .registrations
                .iter()
                .filter(|(p, k)| p != port && (sa_key == 0 || *k == sa_key))
                .map(|(p, _)| p.clone())
                .collect();
            if victims.is_empty() && !preempt_holder {
                return Response::conflict();
            }
            for v in &victims {
                st.registrations.retain(|(p, _)| p != v);
                st.ua_to(v, sense::REGISTRATIONS_PREEMPTED);
            }
            if preempt_holder {
                st.reservation = Some(Reservation {
                    holder: port.to_string(),
                    kind,
                });
            }
            st.pr_generation = st.pr_generation.wrapping_add(1);
            Response::good()
        }
        _ => Response::bad_cdb(1, Some(4)),
    }
}

fn unregister(st: &mut LuState, port: &str) {
    st.registrations.retain(|(p, _)| p != port);
    if let Some(r) = st.reservation.clone() {
        if pr_type::all_registrants(r.kind) {
            if st.registrations.is_empty() {
                st.reservation = None;
            }
        } else if r.holder == port {
            st.reservation = None;
            if pr_type::registrants_access(r.kind) {
                let others: Vec<String> = st.registrations.iter().map(|(p, _)| p.clone()).collect();
                for p in others {
                    st.ua_to(&p, sense::RESERVATIONS_RELEASED);
                }
            }
        }
    }
}
