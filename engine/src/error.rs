//! Typed engine errors and their protocol-neutral kinds; the front ends map kinds to wire codes.

use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with. Front ends map [`Error::kind`] to their wire codes;
/// nothing here is a bare string that loses its cause.
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
    #[error("syncing the devices failed: {source}")]
    Sync {
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
    InvalidDedupDomain(#[from] InvalidDedupDomain),
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
    #[error("pool {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("device {path} is in use by another pool or process")]
    DeviceInUse { path: PathBuf },
    #[error("device {path} holds {what}: refusing to overwrite it")]
    DeviceHoldsData { path: PathBuf, what: String },
    #[error("device {path} is listed twice: it is the same device as {first}")]
    DuplicateDevice { path: PathBuf, first: PathBuf },
    #[error("device {path} belongs to another pool ({found}), not to this one ({expected})")]
    ForeignDevice {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("epoch {epoch} was fenced off: the pool is owned under epoch {owner} now")]
    Fenced { epoch: u64, owner: u64 },
    #[error("the engine is shutting down")]
    ShutDown,
    /// A pool on a store: this node's lease ran out by its own clock, or another node took
    /// the pool. It serves nothing more (another node may have changed any block).
    #[error("this node no longer holds the pool's lease: another node may serve it")]
    LeaseLost,
    /// An engine thread failed (a bug): the pool stopped taking requests rather than risk
    /// acknowledging writes it cannot keep. What was flushed before is on the devices; a
    /// restart recovers it.
    #[error("the pool stopped after an internal failure ({reason}); restart to recover")]
    Halted { reason: String },
    /// A broken invariant caught at run time (a bug), reported instead of a panic.
    #[error("internal error: {what}")]
    Internal { what: &'static str },
}

/// Why a dedup domain name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid dedup domain {0:?}: use \"shared\", \"private\" or a name of 1-64 characters of \
     [A-Za-z0-9._-] not starting with '.'"
)]
pub struct InvalidDedupDomain(pub String);

/// A copy of an I/O error for one more waiter: the same OS error (code, kind and message), or
/// the same kind and message for one the engine made.
fn clone_io(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// One failure often answers several requests (the parts of a failed record, the waiters of a
/// group flush): each gets a copy with the same variant, fields and OS error.
impl Clone for Error {
    fn clone(&self) -> Self {
        match self {
            Error::Io {
                device,
                offset,
                source,
            } => Error::Io {
                device: *device,
                offset: *offset,
                source: clone_io(source),
            },
            Error::Sync { source } => Error::Sync {
                source: clone_io(source),
            },
            Error::File { path, source } => Error::File {
                path: path.clone(),
                source: clone_io(source),
            },
            &Error::ChecksumMismatch {
                block_id,
                segment,
                offset,
                expected,
                got,
            } => Error::ChecksumMismatch {
                block_id,
                segment,
                offset,
                expected,
                got,
            },
            &Error::Undecodable {
                block_id,
                segment,
                offset,
            } => Error::Undecodable {
                block_id,
                segment,
                offset,
            },
            &Error::OutOfRange { offset, len, size } => Error::OutOfRange { offset, len, size },
            &Error::Unaligned { offset, len, align } => Error::Unaligned { offset, len, align },
            &Error::TooLarge { len, max } => Error::TooLarge { len, max },
            Error::NoSpace => Error::NoSpace,
            Error::VolumeNotFound(v) => Error::VolumeNotFound(v.clone()),
            Error::VolumeExists(v) => Error::VolumeExists(v.clone()),
            Error::InvalidName(v) => Error::InvalidName(v.clone()),
            Error::InvalidDedupDomain(d) => Error::InvalidDedupDomain(d.clone()),
            Error::ReadOnly(v) => Error::ReadOnly(v.clone()),
            &Error::InvalidSize { size, reason } => Error::InvalidSize { size, reason },
            Error::NotAPool { path, reason } => Error::NotAPool {
                path: path.clone(),
                reason,
            },
            Error::UnsupportedVersion {
                path,
                found,
                supported,
            } => Error::UnsupportedVersion {
                path: path.clone(),
                found: *found,
                supported: *supported,
            },
            &Error::Corrupt { what } => Error::Corrupt { what },
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::DeviceInUse { path } => Error::DeviceInUse { path: path.clone() },
            Error::DeviceHoldsData { path, what } => Error::DeviceHoldsData {
                path: path.clone(),
                what: what.clone(),
            },
            Error::DuplicateDevice { path, first } => Error::DuplicateDevice {
                path: path.clone(),
                first: first.clone(),
            },
            Error::ForeignDevice {
                path,
                found,
                expected,
            } => Error::ForeignDevice {
                path: path.clone(),
                found: found.clone(),
                expected: expected.clone(),
            },
            &Error::Fenced { epoch, owner } => Error::Fenced { epoch, owner },
            Error::ShutDown => Error::ShutDown,
            Error::LeaseLost => Error::LeaseLost,
            Error::Halted { reason } => Error::Halted {
                reason: reason.clone(),
            },
            &Error::Internal { what } => Error::Internal { what },
        }
    }
}

/// What kind of failure an [`Error`] is, independent of any wire protocol. Front ends map a
/// kind to their own wire codes; the engine never names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A request's range lies outside the volume.
    OutOfRange,
    /// A malformed argument: unaligned range, bad size, bad name.
    InvalidArgument,
    /// A request larger than the engine accepts in one piece.
    TooLarge,
    /// The pool (or the host file system under it) has no room for the write.
    NoSpace,
    /// The target is read-only (a snapshot, or a pool opened read-only).
    ReadOnly,
    /// A named volume does not exist.
    NotFound,
    /// A named volume already exists.
    AlreadyExists,
    /// Another process holds the pool or one of its devices.
    Busy,
    /// Stored bytes failed their checksum.
    Integrity,
    /// The device failed an I/O, or stored bytes do not decode.
    Media,
    /// Metadata on the devices is corrupt, foreign or of another version.
    BadPool,
    /// The engine is shutting down and takes no more requests.
    ShuttingDown,
    /// The pool stopped after an internal failure, or a bug was caught: nothing the
    /// caller did wrong.
    Internal,
}

impl Error {
    /// The protocol-neutral kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Unaligned { .. }
            | Error::InvalidSize { .. }
            | Error::InvalidName(_)
            | Error::InvalidDedupDomain(_) => ErrorKind::InvalidArgument,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::NoSpace => ErrorKind::NoSpace,
            Error::ReadOnly(_) => ErrorKind::ReadOnly,
            Error::VolumeNotFound(_) => ErrorKind::NotFound,
            Error::VolumeExists(_) => ErrorKind::AlreadyExists,
            Error::Locked { .. } | Error::DeviceInUse { .. } | Error::Fenced { .. } => {
                ErrorKind::Busy
            }
            Error::ChecksumMismatch { .. } => ErrorKind::Integrity,
            Error::Io { .. }
            | Error::Sync { .. }
            | Error::File { .. }
            | Error::Undecodable { .. }
            | Error::LeaseLost => ErrorKind::Media,
            Error::NotAPool { .. }
            | Error::UnsupportedVersion { .. }
            | Error::Corrupt { .. }
            | Error::DeviceHoldsData { .. }
            | Error::DuplicateDevice { .. }
            | Error::ForeignDevice { .. } => ErrorKind::BadPool,
            Error::ShutDown => ErrorKind::ShuttingDown,
            Error::Halted { .. } | Error::Internal { .. } => ErrorKind::Internal,
        }
    }
}
