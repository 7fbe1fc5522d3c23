//! The request stream of the transmission phase.
//!
//! [`SockReader`] reads a plain socket in large chunks (many requests per `read`), and reads
//! write payloads straight into their own buffers without zeroing them first: a 1 MiB payload
//! is copied once, by the kernel.

use std::io::{self, BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};

use crate::stream::Stream;

/// Read buffer of [`SockReader`]: headers and small payloads come from here.
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Payload reads at least this large bypass the read buffer when it is empty.
const DIRECT_READ_BYTES: usize = 32 << 10;

/// A byte stream requests are read from.
pub(crate) trait Input: Read {
    /// Bytes that can be read without a system call (0 when unknown): the connection hands
    /// held replies to the writer before a read that may block.
    fn buffered_len(&self) -> usize {
        0
    }

    /// The socket under the stream, when a thread may poll it beside other descriptors
    /// (`None` for streams that buffer below this one, such as TLS).
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }

    /// Append at most `want` bytes to `buf`; returns how many (0 at the end of the stream).
    fn read_append(&mut self, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
        let start = buf.len();
        buf.resize(start + want, 0);
        let res = match buf.get_mut(start..) {
            Some(dst) => self.read(dst),
            None => Ok(0),
        };
        buf.truncate(start + res.as_ref().map_or(0, |&n| n));
        res
    }
}

impl Input for &[u8] {}
impl<R: Read> Input for BufReader<R> {
    fn buffered_len(&self) -> usize {
        self.buffer().len()
    }
}

/// Buffered reader of a plain socket.
pub(crate) struct SockReader {
    sock: Stream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl SockReader {
    /// Read from `sock`, starting with `pending` (bytes already read from it, e.g. by the
    /// handshake's buffer).
    pub fn new(sock: Stream, pending: &[u8]) -> SockReader {
        let mut buf = vec![0u8; READ_BUFFER_BYTES.max(pending.len())].into_boxed_slice();
        if let Some(dst) = buf.get_mut(..pending.len()) {
            dst.copy_from_slice(pending);
        }
        SockReader {
            sock,
            buf,
            pos: 0,
            end: pending.len(),
        }
    }

    fn buffered(&self) -> &[u8] {
        self.buf.get(self.pos..self.end).unwrap_or(&[])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
    }

    fn refill(&mut self) -> io::Result<usize> {
        let n = self.sock.read(&mut self.buf)?;
        self.pos = 0;
        self.end = n;
        Ok(n)
    }
}

impl Read for SockReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.end {
            if out.len() >= self.buf.len() {
                return self.sock.read(out);
            }
            self.refill()?;
        }
        let src = self.buffered();
        let n = src.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), src.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.consume(n);
        Ok(n)
    }
}

impl Input for SockReader {
    fn buffered_len(&self) -> usize {
        self.end - self.pos
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }

    fn read_append(&mut self, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
        if self.pos == self.end {
            if want < DIRECT_READ_BYTES {
                self.refill()?;
            } else {
                buf.reserve(want);
                let spare = buf.spare_capacity_mut();
                let n = want.min(spare.len());
                // SAFETY: `spare` is writable memory of `buf` with room for `n` bytes, and the
                // socket's descriptor stays open for the call; `read` writes at most `n` bytes.
                let r = unsafe { libc::read(self.sock.as_raw_fd(), spare.as_mut_ptr().cast(), n) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                let got = r as usize;
                // SAFETY: the kernel initialised the first `got` (<= n) bytes past the length.
                unsafe { buf.set_len(buf.len() + got) };
                return Ok(got);
            }
        }
        let src = self.buffered();
        let n = src.len().min(want);
        buf.extend_from_slice(src.get(..n).unwrap_or(&[]));
        self.consume(n);
        Ok(n)
    }
}
