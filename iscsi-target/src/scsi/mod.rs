//! SCSI command set of the logical unit (SPC-4 and SBC-3), by command family. [`execute`]
//! decodes a CDB and either answers at once or hands a read or write back to the connection to
//! run asynchronously. Everything else that touches the volume runs synchronously through
//! [`LuBackend::call`](crate::backend::LuBackend::call).

mod inquiry;
mod maintenance;
mod mode;
mod reserve;
mod rw;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use ingot_engine::{Error, Reply as EngineReply, Request, MAX_REQUEST_BYTES};

use crate::lu::{Lu, BLOCK_BYTES};
use crate::sense::{self, fixed, fixed_with_field, status, Sense, SENSE_BYTES};

use self::reserve::{access_of, reservation_conflict};

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
            return Action::Done(inquiry::request_sense(cdb, ua));
        }
    }
    match op {
        0x00 => Action::Done(Response::good()),
        0x12 => Action::Done(inquiry::inquiry(lu, nexus, cdb)),
        0xa0 => Action::Done(inquiry::report_luns(cdb)),
        0x25 => Action::Done(inquiry::read_capacity10(lu, cdb)),
        0x9e => match cdb[1] & 0x1f {
            0x10 => Action::Done(inquiry::read_capacity16(lu, cdb)),
            0x12 => Action::Done(rw::get_lba_status(lu, cdb)),
            _ => Action::Done(Response::bad_cdb(1, Some(4))),
        },
        0x08 | 0x28 | 0xa8 | 0x88 => rw::read(lu, cdb),
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => rw::write(lu, cdb, data_out),
        0x2f | 0xaf | 0x8f => Action::Done(rw::verify(lu, cdb, &data_out)),
        0x89 => Action::Done(rw::compare_and_write(lu, cdb, &data_out)),
        0x8b => Action::Done(rw::or_write(lu, cdb, &data_out)),
        0x35 | 0x91 => Action::Done(rw::synchronize_cache(lu, cdb)),
        0x34 | 0x90 => Action::Done(rw::prefetch(lu, cdb)),
        0x41 | 0x93 => Action::Done(rw::write_same(lu, cdb, &data_out)),
        0x42 => Action::Done(rw::unmap(lu, cdb, &data_out)),
        0x1a | 0x5a => Action::Done(mode::mode_sense(lu, cdb)),
        0x15 | 0x55 => Action::Done(mode::mode_select(lu, cdb, &data_out)),
        0x16 => Action::Done(reserve::reserve6(lu, nexus, cdb)),
        0x17 => Action::Done(reserve::release6(lu, nexus, cdb)),
        0x1b => Action::Done(maintenance::start_stop(cdb)),
        0x1e => Action::Done(maintenance::prevent_allow(lu, nexus, cdb)),
        0xa3 => Action::Done(maintenance::maintenance_in(cdb)),
        0x5e => Action::Done(reserve::pr_in(lu, cdb)),
        0x5f => Action::Done(reserve::pr_out(lu, nexus, cdb, &data_out)),
        0x37 | 0xb7 => Action::Done(maintenance::read_defect_data(cdb)),
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

/// The response to an [`Action::Read`] of `len` bytes once the backend replied.
pub fn read_response(r: ingot_engine::Result<EngineReply>, len: u32) -> Response {
    match r {
        Ok(EngineReply::Data(d)) => Response::data(d),
        Ok(EngineReply::Pieces(p)) => Response::data(p.concat()),
        Ok(EngineReply::Done) => Response::data(vec![0; len as usize]),
        Err(e) => Response::engine(&e),
    }
}

/// The response to an [`Action::Write`] once the backend replied.
pub fn write_response(r: ingot_engine::Result<EngineReply>) -> Response {
    match r {
        Ok(_) => Response::good(),
        Err(e) => Response::engine(&e),
    }
}

/// Run a command to completion on this thread, its read or write included: what the
/// connection does asynchronously, for unit tests and the fuzzer.
pub fn execute_sync(lu: &Lu, nexus: &Nexus<'_>, cdb: &[u8], data_out: Vec<u8>) -> Response {
    match execute(lu, nexus, cdb, data_out) {
        Action::Done(r) => r,
        Action::Read { offset, len } => {
            read_response(lu.backend.call(Request::Read { offset, len }), len)
        }
        Action::Write { offset, data, fua } => {
            write_response(lu.backend.call(Request::Write { offset, data, fua }))
        }
    }
}
