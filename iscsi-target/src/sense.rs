//! SCSI status codes and fixed-format sense data (SPC-4 §4.5.3).

use ingot_engine::{Error, ErrorKind};

/// SCSI sense key / ASC / ASCQ triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// SCSI status bytes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const ABORTED_COMMAND: u8 = 0x0b;
    pub const COPY_ABORTED: u8 = 0x0a;
    pub const MISCOMPARE: u8 = 0x0e;
}

const fn s(key: u8, asc: u8, ascq: u8) -> Sense {
    Sense { key, asc, ascq }
}

pub const INVALID_OPCODE: Sense = s(key::ILLEGAL_REQUEST, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: Sense = s(key::ILLEGAL_REQUEST, 0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: Sense = s(key::ILLEGAL_REQUEST, 0x24, 0x00);
pub const LU_NOT_SUPPORTED: Sense = s(key::ILLEGAL_REQUEST, 0x25, 0x00);
pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = s(key::ILLEGAL_REQUEST, 0x26, 0x00);
pub const PARAMETER_LIST_LENGTH_ERROR: Sense = s(key::ILLEGAL_REQUEST, 0x1a, 0x00);
pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = s(key::ILLEGAL_REQUEST, 0x39, 0x00);
pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense = s(key::ILLEGAL_REQUEST, 0x55, 0x04);
pub const RESET_OCCURRED: Sense = s(key::UNIT_ATTENTION, 0x29, 0x00);
pub const RESERVATIONS_PREEMPTED: Sense = s(key::UNIT_ATTENTION, 0x2a, 0x03);
pub const RESERVATIONS_RELEASED: Sense = s(key::UNIT_ATTENTION, 0x2a, 0x04);
pub const REGISTRATIONS_PREEMPTED: Sense = s(key::UNIT_ATTENTION, 0x2a, 0x05);
pub const MISCOMPARE_DURING_VERIFY: Sense = s(key::MISCOMPARE, 0x1d, 0x00);
pub const INVALID_RELEASE: Sense = s(key::ILLEGAL_REQUEST, 0x26, 0x04);
pub const DATA_PHASE_ERROR: Sense = s(key::ABORTED_COMMAND, 0x4b, 0x00);
pub const CAPACITY_CHANGED: Sense = s(key::UNIT_ATTENTION, 0x2a, 0x09);
pub const NO_SENSE: Sense = s(key::NO_SENSE, 0, 0);

/// Length of the fixed-format sense data we build.
pub const SENSE_BYTES: usize = 18;

/// Fixed-format sense data; `info` fills the INFORMATION field (with VALID set).
pub fn fixed(sense: Sense, info: Option<u32>) -> [u8; SENSE_BYTES] {
    let mut b = [0u8; SENSE_BYTES];
    b[0] = 0x70 | if info.is_some() { 0x80 } else { 0 };
    b[2] = sense.key & 0x0f;
    if let Some(i) = info {
        b[3..7].copy_from_slice(&i.to_be_bytes());
    }
    b[7] = (SENSE_BYTES - 8) as u8;
    b[12] = sense.asc;
    b[13] = sense.ascq;
    b
}

/// Fixed-format sense data with a sense-key specific field pointing at a byte (and optionally
/// a bit) of the CDB (`cdb = true`) or of the parameter list.
pub fn fixed_with_field(sense: Sense, cdb: bool, byte: u16, bit: Option<u8>) -> [u8; SENSE_BYTES] {
    let mut b = fixed(sense, None);
    b[15] = 0x80 | if cdb { 0x40 } else { 0 } | bit.map_or(0, |x| 0x08 | (x & 7));
    b[16..18].copy_from_slice(&byte.to_be_bytes());
    b
}

/// The sense an engine error is reported with (SPC-4 sense keys), by its protocol-neutral kind.
pub fn of_error(e: &Error) -> Sense {
    match e.kind() {
        // LOGICAL BLOCK ADDRESS OUT OF RANGE
        ErrorKind::OutOfRange => LBA_OUT_OF_RANGE,
        ErrorKind::InvalidArgument | ErrorKind::TooLarge => INVALID_FIELD_IN_CDB,
        // WRITE PROTECTED
        ErrorKind::ReadOnly => s(key::DATA_PROTECT, 0x27, 0x00),
        // SPACE ALLOCATION FAILED WRITE PROTECT
        ErrorKind::NoSpace => s(key::DATA_PROTECT, 0x27, 0x07),
        // LOGICAL BLOCK GUARD CHECK FAILED
        ErrorKind::Integrity => s(key::MEDIUM_ERROR, 0x10, 0x01),
        // UNRECOVERED READ ERROR
        ErrorKind::Media => s(key::MEDIUM_ERROR, 0x11, 0x00),
        // LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE: the initiator may retry elsewhere.
        ErrorKind::ShuttingDown => s(key::NOT_READY, 0x04, 0x00),
        // INTERNAL TARGET FAILURE
        _ => s(key::HARDWARE_ERROR, 0x44, 0x00),
    }
}
