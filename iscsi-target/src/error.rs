//! Errors of the iSCSI front end. A connection-level error ends that connection only.

use std::io;

use crate::pdu::Pdu;

/// Why a connection, a login or a listener failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IscsiError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed in the middle of a PDU")]
    Truncated,
    #[error("header digest mismatch: received {got:#010x}, computed {want:#010x}")]
    HeaderDigest { got: u32, want: u32 },
    #[error("data digest mismatch: received {got:#010x}, computed {want:#010x}")]
    DataDigest {
        got: u32,
        want: u32,
        /// The PDU whose data failed (its data segment dropped), to reject it by header.
        pdu: Box<Pdu>,
    },
    #[error("additional header segments of {0} bytes exceed the limit")]
    AhsTooLong(usize),
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    DataTooLong { len: usize, max: usize },
    #[error("initiator sent opcode {0:#04x} before the login completed")]
    NotLoggedIn(u8),
    #[error("login failed: {0}")]
    Login(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid listen address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: &'static str },
}

/// Result alias for the front end.
pub type Result<T, E = IscsiError> = std::result::Result<T, E>;

impl IscsiError {
    /// Map an unexpected EOF to [`IscsiError::Truncated`].
    pub(crate) fn from_read(e: io::Error) -> IscsiError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            IscsiError::Truncated
        } else {
            IscsiError::Io(e)
        }
    }
}
