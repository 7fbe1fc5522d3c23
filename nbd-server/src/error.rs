//! Errors of the NBD front end.

use std::io;

/// Why a connection or listener failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("client sent bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("client sent bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client sent option {option} with {len} bytes of data (limit {max})")]
    OptionTooLarge { option: u32, len: u32, max: u32 },
    #[error("client sent more than {0} options")]
    TooManyOptions(usize),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client {peer} may not use export {export:?} (access rules) and asked for it with NBD_OPT_EXPORT_NAME")]
    AccessDenied { export: String, peer: String },
    #[error("client asked for an export without TLS while TLS is required")]
    TlsRequired,
    #[error("client used NBD_OPT_EXPORT_NAME after negotiating extended headers")]
    ExportNameAfterExtendedHeaders,
    #[error("client sent data after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("client was idle for longer than the idle timeout")]
    IdleTimeout,
    #[error("client stopped sending in the middle of a request")]
    RequestTimeout,
    #[error("client sent a payload of {0} bytes, more than the maximum")]
    PayloadTooLarge(u64),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("no connection slot was free when the handshake ended (max_connections reached)")]
    NoRoom,
    #[error("invalid listen address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: &'static str },
}

/// Result alias for the front end.
pub type Result<T, E = NbdError> = std::result::Result<T, E>;

impl NbdError {
    /// Map an unexpected EOF to [`NbdError::Truncated`].
    pub(crate) fn from_read(e: io::Error) -> NbdError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            NbdError::Truncated
        } else {
            NbdError::Io(e)
        }
    }
}
