//! Typed engine errors and their mapping to wire error codes (NBD errno, SCSI sense).

use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with. Front ends map it with [`Error::errno`] and
/// [`Error::scsi_sense`]; nothing here is a bare string that loses its cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("I/O error on device {device} at byte {offset}: {source}")]
    Io {
        device: u16,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "checksum mismatch in block {block_id} (segment {segment}, offset {offset}): \
         stored {expected:#010x}, computed {got:#010x}"
    )]
    ChecksumMismatch {
        block_id: u64,
        segment: u32,
        offset: u32,
        expected: u32,
        got: u32,
    },
    #[error(
        "block {block_id} (segment {segment}, offset {offset}) passed its checksum but its \
         compressed payload does not decode"
    )]
    Undecodable {
        block_id: u64,
        segment: u32,
        offset: u32,
    },
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not aligned to {align} bytes")]
    Unaligned { offset: u64, len: u64, align: u64 },
    #[error("request of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("the pool is full")]
    NoSpace,
    #[error("volume {0:?} does not exist")]
    VolumeNotFound(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("invalid volume name {0:?}: use 1-64 characters of [A-Za-z0-9._-]")]
    InvalidName(String),
    #[error(transparent)]
    InvalidDedupDomain(#[from] crate::api::InvalidDedupDomain),
    #[error("volume {0:?} is a read-only snapshot (clone it to write)")]
    ReadOnly(String),
    #[error("invalid size {size}: {reason}")]
    InvalidSize { size: u64, reason: &'static str },
    #[error("{path} is not an ingot pool: {reason}")]
    NotAPool { path: PathBuf, reason: &'static str },
    #[error("{path}: on-disk format version {found}, this build reads version {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("pool metadata is corrupt: {what}")]
    Corrupt { what: &'static str },
    #[error("pool {path} is in use by another process (is `ingot serve` running?)")]
    Locked { path: PathBuf },
    #[error(
        "device {path} is in use by another pool or process (is `ingot serve` running on a pool \
         that uses it?)"
    )]
    DeviceInUse { path: PathBuf },
    #[error(
        "device {path} holds {what}: refusing to overwrite it (pass --force to destroy what it \
         holds)"
    )]
    DeviceHoldsData { path: PathBuf, what: String },
    #[error("device {path} is listed twice: it is the same device as {first}")]
    DuplicateDevice { path: PathBuf, first: PathBuf },
    #[error("device {path} belongs to another pool ({found}), not to this one ({expected})")]
    ForeignDevice {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("the engine is shutting down")]
    ShutDown,
    /// An engine thread failed (a bug): the pool stopped taking requests rather than risk
    /// acknowledging writes it cannot keep. What was flushed before is on the devices; a
    /// restart recovers it.
    #[error("the pool stopped after an internal failure ({reason}); restart to recover")]
    Halted { reason: String },
}

/// SCSI sense key / ASC / ASCQ triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Error {
    /// The errno an NBD server sends for this error (NBD_EIO, NBD_EINVAL, ...).
    pub fn errno(&self) -> i32 {
        match self {
            Error::OutOfRange { .. } | Error::Unaligned { .. } | Error::InvalidSize { .. } => {
                libc::EINVAL
            }
            Error::TooLarge { .. } => libc::EOVERFLOW,
            Error::NoSpace => libc::ENOSPC,
            Error::ShutDown => libc::ESHUTDOWN,
            Error::VolumeNotFound(_) => libc::ENOENT,
            Error::VolumeExists(_) => libc::EEXIST,
            Error::InvalidName(_) | Error::InvalidDedupDomain(_) => libc::EINVAL,
            Error::Locked { .. } | Error::DeviceInUse { .. } => libc::EBUSY,
            Error::ReadOnly(_) => libc::EPERM,
            _ => libc::EIO,
        }
    }

    /// The sense data an iSCSI target returns for this error (SPC-4 sense keys).
    pub fn scsi_sense(&self) -> Sense {
        const ILLEGAL_REQUEST: u8 = 0x05;
        const MEDIUM_ERROR: u8 = 0x03;
        const DATA_PROTECT: u8 = 0x07;
        const HARDWARE_ERROR: u8 = 0x04;
        match self {
            // LOGICAL BLOCK ADDRESS OUT OF RANGE
            Error::OutOfRange { .. } => Sense {
                key: ILLEGAL_REQUEST,
                asc: 0x21,
                ascq: 0x00,
            },
            // INVALID FIELD IN CDB
            Error::Unaligned { .. } | Error::TooLarge { .. } | Error::InvalidSize { .. } => Sense {
                key: ILLEGAL_REQUEST,
                asc: 0x24,
                ascq: 0x00,
            },
            // WRITE PROTECTED
            Error::ReadOnly(_) => Sense {
                key: DATA_PROTECT,
                asc: 0x27,
                ascq: 0x00,
            },
            // SPACE ALLOCATION FAILED WRITE PROTECT
            Error::NoSpace => Sense {
                key: DATA_PROTECT,
                asc: 0x27,
                ascq: 0x07,
            },
            // LOGICAL BLOCK GUARD CHECK FAILED
            Error::ChecksumMismatch { .. } => Sense {
                key: MEDIUM_ERROR,
                asc: 0x10,
                ascq: 0x01,
            },
            // UNRECOVERED READ ERROR
            Error::Io { .. } | Error::Undecodable { .. } => Sense {
                key: MEDIUM_ERROR,
                asc: 0x11,
                ascq: 0x00,
            },
            // INTERNAL TARGET FAILURE
            _ => Sense {
                key: HARDWARE_ERROR,
                asc: 0x44,
                ascq: 0x00,
            },
        }
    }
}
