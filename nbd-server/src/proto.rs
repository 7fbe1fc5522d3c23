//! NBD wire constants and the fixed-size messages of the protocol (see the NBD `proto.md`).
//!
//! Everything here is big-endian. Parsing of untrusted bytes goes through [`Cursor`], whose
//! accessors return `None` instead of panicking when the input is short.

// Magic numbers.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

// Information types for NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

// Error values allowed on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context this server offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context id handed out for `base:allocation` by NBD_OPT_SET_META_CONTEXT.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of an extended request header (and of an extended reply header).
pub const EXTENDED_HEADER_BYTES: usize = 32;

/// The NBD error an engine error is reported with, by its protocol-neutral kind.
pub fn error_errno(e: &ingot_engine::Error) -> u32 {
    use ingot_engine::ErrorKind as K;
    match e.kind() {
        K::OutOfRange | K::InvalidArgument => EINVAL,
        K::TooLarge => EOVERFLOW,
        K::NoSpace => ENOSPC,
        K::ShuttingDown => ESHUTDOWN,
        K::ReadOnly => EPERM,
        _ => EIO,
    }
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_HEADER_BYTES]) -> RequestHeader {
        let mut c = Cursor::new(b);
        // The buffer has exactly the right size, so none of these can fail; default anyway.
        RequestHeader {
            magic: c.u32().unwrap_or_default(),
            flags: c.u16().unwrap_or_default(),
            command: c.u16().unwrap_or_default(),
            cookie: c.u64().unwrap_or_default(),
            offset: c.u64().unwrap_or_default(),
            len: c.u32().unwrap_or_default(),
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut v = Vec::with_capacity(REQUEST_HEADER_BYTES);
        v.extend_from_slice(&self.magic.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.extend_from_slice(&self.command.to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.len.to_be_bytes());
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out.copy_from_slice(&v);
        out
    }
}

/// An extended (64-bit length) request header, used after NBD_OPT_EXTENDED_HEADERS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtRequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

impl ExtRequestHeader {
    pub fn parse(b: &[u8; EXTENDED_HEADER_BYTES]) -> ExtRequestHeader {
        let mut c = Cursor::new(b);
        ExtRequestHeader {
            magic: c.u32().unwrap_or_default(),
            flags: c.u16().unwrap_or_default(),
            command: c.u16().unwrap_or_default(),
            cookie: c.u64().unwrap_or_default(),
            offset: c.u64().unwrap_or_default(),
            len: c.u64().unwrap_or_default(),
        }
    }

    pub fn encode(&self) -> [u8; EXTENDED_HEADER_BYTES] {
        let mut out = [0u8; EXTENDED_HEADER_BYTES];
        out[0..4].copy_from_slice(&self.magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..32].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Checked big-endian reader over untrusted bytes.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string prefixed by a 32-bit length, at most [`MAX_STRING_BYTES`] long and valid UTF-8.
    pub fn string32(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING_BYTES {
            return None;
        }
        std::str::from_utf8(self.bytes(len)?).ok()
    }
}

/// Append an option reply (fixed newstyle) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Option replies are built from bounded data (names <= 4 KiB), so this cannot truncate.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// Append a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Append a structured reply chunk header.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Append an extended reply chunk header.
pub fn put_extended_header(
    out: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Cut `msg` to at most [`MAX_STRING_BYTES`] bytes on a character boundary.
pub fn truncate_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING_BYTES {
        return msg;
    }
    let mut end = MAX_STRING_BYTES;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.get(..end).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_roundtrip() {
        let h = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        assert_eq!(RequestHeader::parse(&h.encode()), h);
    }

    #[test]
    fn cursor_never_panics_on_short_input() {
        let mut c = Cursor::new(&[0, 0, 0, 9, b'a']);
        assert_eq!(c.string32(), None);
        let mut c = Cursor::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.string32(), None);
        let mut c = Cursor::new(&[1]);
        assert_eq!(c.u16(), None);
        assert_eq!(c.u64(), None);
        let mut c = Cursor::new(&[0, 0, 0, 2, b'h', b'i', 7]);
        assert_eq!(c.string32(), Some("hi"));
        assert_eq!(c.remaining(), 1);
    }

    #[test]
    fn errno_mapping() {
        use ingot_engine::Error as E;
        let out_of_range = E::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(error_errno(&out_of_range), EINVAL);
        assert_eq!(error_errno(&E::NoSpace), ENOSPC);
        assert_eq!(error_errno(&E::ShutDown), ESHUTDOWN);
        assert_eq!(error_errno(&E::ReadOnly("s".into())), EPERM);
        assert_eq!(error_errno(&E::VolumeNotFound("v".into())), EIO);
        assert_eq!(error_errno(&E::Corrupt { what: "x" }), EIO);
    }

    #[test]
    fn message_truncation_respects_char_boundaries() {
        let s = "é".repeat(3000);
        let t = truncate_message(&s);
        assert!(t.len() <= MAX_STRING_BYTES);
        assert!(t.chars().all(|c| c == 'é'));
    }
}
