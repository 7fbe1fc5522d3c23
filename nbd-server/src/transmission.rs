//! The transmission phase: a reader (this thread) that decodes, validates and submits requests
//! without waiting for them, and a writer thread that sends replies as they complete, possibly out
//! of order (`sender.rs`).

use std::io;
use std::io::Write;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ingot_engine::{Completion, Reply, Request, MAX_REQUEST_BYTES, SECTOR_BYTES};
use parking_lot::Mutex;

use crate::credit::Credit;
use crate::error::{NbdError, Result};
use crate::export::{Export, ExportReader};
use crate::handshake::Negotiated;
use crate::input::Input;
use crate::proto::*;
use crate::reply::{Body, Mode, ReqCtx};
use crate::sender::{self, writer_loop, Output, Replies};
use crate::stream::Stream;

/// Bytes charged against the in-flight budget for any request, on top of its payload.
const REQUEST_OVERHEAD: u64 = 4096;
/// Largest range one `block_status` call to the export covers.
const BLOCK_STATUS_QUERY_BYTES: u64 = MAX_REQUEST_BYTES;

/// Limits of the transmission phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_inflight_bytes: u64,
    /// Longest time without a request while nothing is in flight (`None`: forever).
    pub idle_timeout: Option<Duration>,
    /// Longest time without progress in the middle of a request (`None`: forever).
    pub request_timeout: Option<Duration>,
}

fn mode_of(neg: &Negotiated) -> Mode {
    if neg.extended {
        Mode::Extended
    } else if neg.structured {
        Mode::Structured
    } else {
        Mode::Simple
    }
}

/// Serve requests until the client disconnects, then wait for every reply to be written by the
/// writer thread. `control`, when given, is shut down to wake the reader when the writer fails.
pub(crate) fn serve<R: Input, W: Write + Send + 'static>(
    reader: R,
    writer: W,
    fd: Option<RawFd>,
    control: Option<Stream>,
    neg: Negotiated,
    limits: Limits,
) -> Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let credit = Arc::new(Credit::new(limits.max_inflight_bytes));
    let mode = mode_of(&neg);
    let writer_control = match &control {
        Some(c) => Some(c.try_clone()?),
        None => None,
    };
    let out = Arc::new(Output::new(
        writer,
        fd,
        writer_control,
        credit.clone(),
        mode,
    ));
    let writer = thread::Builder::new().name("nbd-writer".into()).spawn({
        let out = out.clone();
        move || writer_loop(out, rx)
    })?;
    // Dropping the last sender (the reader's, then each completion's) lets the writer finish
    // once every in-flight request has completed and its reply has been written.
    let res = run(reader, Replies::new(tx, out), credit, neg, limits);
    let _ = writer.join();
    if let Some(c) = control {
        c.shutdown(std::net::Shutdown::Both);
    }
    res
}

fn run<R: Input>(
    reader: R,
    replies: Replies,
    credit: Arc<Credit>,
    neg: Negotiated,
    limits: Limits,
) -> Result<()> {
    // Reads on this thread's own queue when the export offers one and the socket can be
    // polled beside it.
    let rd = match reader.poll_fd() {
        Some(_) => neg.export.reader(),
        None => None,
    };
    let mut conn = Conn {
        r: reader,
        rd,
        size: neg.export.size_bytes(),
        mode: mode_of(&neg),
        export: neg.export,
        read_only: neg.read_only,
        meta_context: neg.meta_context,
        replies,
        credit,
        limits,
    };
    // Replies completed on this thread wait for the end of each batch of buffered requests.
    sender::hold_replies(true);
    let res = conn.run();
    // Finishes the reads still in flight; their replies are held, then released.
    drop(conn.rd.take());
    sender::hold_replies(false);
    res
}

/// Most replies held on the reader thread before they go to the writer anyway.
const MAX_HELD: usize = 256;

struct Conn<R> {
    r: R,
    /// Reads this thread submits and reaps itself (see [`Export::reader`]).
    rd: Option<Box<dyn ExportReader>>,
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    mode: Mode,
    meta_context: Option<u32>,
    replies: Replies,
    credit: Arc<Credit>,
    limits: Limits,
}

type Invalid = (u32, &'static str);

fn aligned(offset: u64, len: u64) -> bool {
    offset % SECTOR_BYTES == 0 && len % SECTOR_BYTES == 0
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A decoded request, compact or extended.
#[derive(Debug, Clone, Copy)]
struct Req {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    /// Effect length (or, for writes, the payload length).
    len: u64,
    /// Payload bytes that follow the header.
    payload: u64,
}

impl<R: Input> Conn<R> {
    fn run(&mut self) -> Result<()> {
        loop {
            let Some(h) = self.next_header()? else {
                return Ok(());
            };
            if h.command == CMD_DISC {
                return Ok(());
            }
            self.request(h)?;
        }
    }

    fn next_header(&mut self) -> Result<Option<Req>> {
        if self.mode == Mode::Extended {
            let mut hdr = [0u8; EXTENDED_HEADER_BYTES];
            if !self.fill(&mut hdr, true)? {
                return Ok(None);
            }
            let h = ExtRequestHeader::parse(&hdr);
            if h.magic != EXTENDED_REQUEST_MAGIC {
                return Err(NbdError::BadRequestMagic(h.magic));
            }
            // Writes always carry their payload; qemu leaves PAYLOAD_LEN off them.
            let payload = if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 || h.command == CMD_WRITE {
                if h.len > MAX_REQUEST_BYTES {
                    // The spec asks for a hard disconnect: the stream cannot be trusted.
                    return Err(NbdError::PayloadTooLarge(h.len));
                }
                h.len
            } else {
                0
            };
            Ok(Some(Req {
                flags: h.flags,
                command: h.command,
                cookie: h.cookie,
                offset: h.offset,
                len: h.len,
                payload,
            }))
        } else {
            let mut hdr = [0u8; REQUEST_HEADER_BYTES];
            if !self.fill(&mut hdr, true)? {
                return Ok(None);
            }
            let h = RequestHeader::parse(&hdr);
            if h.magic != REQUEST_MAGIC {
                return Err(NbdError::BadRequestMagic(h.magic));
            }
            let len = u64::from(h.len);
            Ok(Some(Req {
                flags: h.flags,
                command: h.command,
                cookie: h.cookie,
                offset: h.offset,
                len,
                payload: if h.command == CMD_WRITE { len } else { 0 },
            }))
        }
    }

    /// Fill `buf` from the client. `Ok(false)` on a clean EOF before the first byte of a
    /// header (`header`). Socket read timeouts are counted against the idle timeout while
    /// waiting for a header with nothing in flight, against the request timeout otherwise.
    fn fill(&mut self, buf: &mut [u8], header: bool) -> Result<bool> {
        let mut got = 0;
        let mut since = Instant::now();
        while got < buf.len() {
            let Some(rest) = buf.get_mut(got..) else {
                break;
            };
            if self.r.buffered_len() == 0 {
                self.before_blocking();
            }
            match self.r.read(rest) {
                Ok(0) if got == 0 && header => return Ok(false),
                Ok(0) => return Err(NbdError::Truncated),
                Ok(n) => {
                    got += n;
                    since = Instant::now();
                }
                Err(e) => self.read_error(e, header && got == 0, &mut since)?,
            }
        }
        Ok(true)
    }

    /// Before a socket read that may block: send the replies held, and while reads of this
    /// thread are in flight, reap them as they complete until the client sends more.
    fn before_blocking(&mut self) {
        let (Some(rd), Some(sock)) = (self.rd.as_mut(), self.r.poll_fd()) else {
            sender::release_held();
            return;
        };
        rd.poll();
        while rd.in_flight() > 0 {
            sender::release_held();
            let mut fds = [
                libc::pollfd {
                    fd: sock,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: rd.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of two pollfd entries for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // Cannot wait on both: finish the reads first, then read the socket.
                rd.wait();
                continue;
            }
            rd.poll();
            if fds[0].revents != 0 {
                break;
            }
        }
        sender::release_held();
    }

    /// Reap every read of this thread still in flight (before a call that may wait on the
    /// engine, which may wait on them: see `Export::reader`).
    fn finish_reads(&mut self) {
        if let Some(rd) = self.rd.as_mut() {
            while rd.in_flight() > 0 {
                rd.wait();
            }
        }
    }

    /// Read a write's payload of `len` bytes into a buffer of its own (not zeroed first).
    fn fill_payload(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len);
        let mut since = Instant::now();
        while buf.len() < len {
            let want = len - buf.len();
            if self.r.buffered_len() == 0 {
                self.before_blocking();
            }
            match self.r.read_append(&mut buf, want) {
                Ok(0) => return Err(NbdError::Truncated),
                Ok(_) => since = Instant::now(),
                Err(e) => self.read_error(e, false, &mut since)?,
            }
        }
        Ok(buf)
    }

    /// Judge a failed read: `Ok` to read again (interrupted, or a socket read timeout within
    /// the limits), else the error ending the connection. Timeouts count against the idle
    /// timeout while waiting for a header with nothing in flight (`idle`), against the request
    /// timeout otherwise; `since` is when the wait began.
    fn read_error(&self, e: io::Error, idle: bool, since: &mut Instant) -> Result<()> {
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(());
        }
        if !is_timeout(&e) {
            return Err(NbdError::Io(e));
        }
        let waited = since.elapsed();
        if idle {
            if self.credit.used() > 0 {
                // The client waits for replies: not idle.
                *since = Instant::now();
            } else if self.limits.idle_timeout.is_some_and(|t| waited >= t) {
                return Err(NbdError::IdleTimeout);
            }
        } else if self.limits.request_timeout.is_some_and(|t| waited >= t) {
            return Err(NbdError::RequestTimeout);
        }
        Ok(())
    }

    fn send(&self, ctx: ReqCtx, body: Body) {
        self.replies.post(ctx, body);
    }

    fn completion(&self, ctx: ReqCtx) -> Completion {
        let replies = self.replies.clone();
        Box::new(move |res| replies.post(ctx, Body::Engine(res)))
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn request(&mut self, h: Req) -> Result<()> {
        let payload = match h.command {
            CMD_READ => h.len.min(MAX_REQUEST_BYTES),
            _ => h.payload,
        };
        let want = REQUEST_OVERHEAD.saturating_add(payload);
        // Held replies give credit back once written: never wait for credit while holding any.
        if sender::held() >= MAX_HELD || (sender::held() > 0 && self.credit.would_wait(want)) {
            sender::release_held();
        }
        // Nor while this thread's own reads are in flight: their replies give it back too.
        while self.credit.would_wait(want) {
            match self.rd.as_mut() {
                Some(rd) if rd.in_flight() > 0 => {
                    rd.wait();
                    sender::release_held();
                }
                _ => break,
            }
        }
        let cost = self.credit.acquire(want);
        let ctx = ReqCtx {
            cookie: h.cookie,
            command: h.command,
            offset: h.offset,
            len: h.len,
            cost,
        };

        let data = match self.payload(&h) {
            Ok(d) => d,
            Err(e) => {
                // No reply will be sent for this request.
                self.credit.release(cost);
                return Err(e);
            }
        };

        match self.dispatch(h, ctx, data) {
            Ok(()) => {}
            Err((errno, msg)) => self.send(
                ctx,
                Body::Error {
                    errno,
                    msg: msg.to_string(),
                    at_offset: false,
                },
            ),
        }
        Ok(())
    }

    /// Read a request's payload; `None` when it has none or it was too large to keep (skipped,
    /// so that the stream stays in sync, and the request is failed).
    fn payload(&mut self, h: &Req) -> Result<Option<Vec<u8>>> {
        if h.payload > MAX_REQUEST_BYTES {
            // Compact writes only (extended ones were refused with the header).
            let mut scratch = vec![0u8; 64 << 10];
            let mut left = h.payload;
            while left > 0 {
                let n = left.min(scratch.len() as u64) as usize;
                let Some(part) = scratch.get_mut(..n) else {
                    break;
                };
                self.fill(part, false)?;
                left -= n as u64;
            }
            Ok(None)
        } else if h.payload > 0 {
            // `payload` <= 32 MiB here.
            Ok(Some(self.fill_payload(h.payload as usize)?))
        } else {
            Ok(None)
        }
    }

    fn dispatch(
        &mut self,
        h: Req,
        ctx: ReqCtx,
        data: Option<Vec<u8>>,
    ) -> std::result::Result<(), Invalid> {
        let (offset, len) = (h.offset, h.len);
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let structured = self.mode != Mode::Simple;
        let has_payload = h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        let flags = h.flags & !CMD_FLAG_PAYLOAD_LEN;
        if self.mode == Mode::Extended {
            if h.command != CMD_WRITE && has_payload {
                return Err((EINVAL, "this command takes no payload"));
            }
        } else if has_payload {
            return Err((EINVAL, "unsupported command flags"));
        }
        let check_flags = |allowed: u16| {
            if flags & !allowed != 0 {
                Err((EINVAL, "unsupported command flags"))
            } else {
                Ok(())
            }
        };
        let check_write = |this: &Self| {
            if this.read_only {
                Err((EPERM, "export is read-only"))
            } else {
                Ok(())
            }
        };
        let check_aligned = || {
            if aligned(offset, len) {
                Ok(())
            } else {
                Err((EINVAL, "request is not aligned to 512 bytes"))
            }
        };
        match h.command {
            CMD_READ => {
                let df = if structured { CMD_FLAG_DF } else { 0 };
                check_flags(CMD_FLAG_FUA | df)?;
                if len > MAX_REQUEST_BYTES {
                    let errno = if structured { EOVERFLOW } else { EINVAL };
                    return Err((errno, "read is larger than the maximum payload"));
                }
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((EINVAL, "read is beyond the end of the export"));
                }
                if len == 0 {
                    self.send(ctx, Body::Done);
                } else {
                    // Holes are sent as NBD_REPLY_TYPE_OFFSET_HOLE chunks unless the client
                    // asked for a single chunk. The writer asks the export for them, and only
                    // when the data has a sector of zeroes (see `reply::encode`).
                    let holes =
                        (structured && flags & CMD_FLAG_DF == 0).then(|| self.export.clone());
                    let replies = self.replies.clone();
                    let done: Completion =
                        Box::new(move |res| replies.post(ctx, Body::Read(res, holes)));
                    // len <= 32 MiB.
                    match self.rd.as_mut() {
                        Some(rd) => rd.read(offset, len as u32, done),
                        None => self.export.submit(
                            Request::Read {
                                offset,
                                len: len as u32,
                            },
                            done,
                        ),
                    }
                }
            }
            CMD_WRITE => {
                check_flags(CMD_FLAG_FUA)?;
                check_write(self)?;
                let Some(data) = data else {
                    if len == 0 {
                        self.send(ctx, Body::Done);
                        return Ok(());
                    }
                    return Err((EINVAL, "write is larger than the maximum payload"));
                };
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((ENOSPC, "write is beyond the end of the export"));
                }
                let done = self.completion(ctx);
                let data = Bytes::from(data);
                self.export
                    .submit(Request::Write { offset, data, fua }, done);
            }
            CMD_FLUSH => {
                check_flags(CMD_FLAG_FUA)?;
                let done = self.completion(ctx);
                self.export.submit(Request::Flush, done);
            }
            CMD_TRIM => {
                check_flags(CMD_FLAG_FUA)?;
                check_write(self)?;
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((EINVAL, "trim is beyond the end of the export"));
                }
                if len == 0 {
                    self.send(ctx, Body::Done);
                } else {
                    let done = self.completion(ctx);
                    submit_split(&*self.export, offset, len, done, |offset, len| {
                        Request::Trim { offset, len, fua }
                    });
                }
            }
            CMD_WRITE_ZEROES => {
                check_flags(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
                check_write(self)?;
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((ENOSPC, "write zeroes is beyond the end of the export"));
                }
                if len == 0 {
                    self.send(ctx, Body::Done);
                } else {
                    // Zeroing is metadata-only (fast, so FAST_ZERO always succeeds). The
                    // engine stores zeroed blocks as holes whatever NO_HOLE says (it also
                    // turns written blocks of zeroes into holes); the data reads as zeroes.
                    let done = self.completion(ctx);
                    submit_split(&*self.export, offset, len, done, |offset, len| {
                        Request::WriteZeroes { offset, len, fua }
                    });
                }
            }
            CMD_CACHE => {
                check_flags(CMD_FLAG_FUA)?;
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((EINVAL, "cache is beyond the end of the export"));
                }
                self.send(ctx, Body::Done);
            }
            CMD_BLOCK_STATUS => {
                check_flags(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE)?;
                let Some(context_id) = self.meta_context.filter(|_| structured) else {
                    return Err((EINVAL, "no metadata context was negotiated"));
                };
                if len == 0 {
                    return Err((EINVAL, "block status of an empty range"));
                }
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((EINVAL, "block status is beyond the end of the export"));
                }
                let req_one = flags & CMD_FLAG_REQ_ONE != 0;
                // The engine may wait for the cleaner there, and the cleaner for this
                // thread's reads in flight: finish them first.
                self.finish_reads();
                let body = self.block_status(context_id, offset, len, req_one);
                self.send(ctx, body);
            }
            _ => return Err((EINVAL, "unknown command")),
        }
        Ok(())
    }

    fn block_status(&self, context_id: u32, offset: u64, len: u64, req_one: bool) -> Body {
        let qlen = len.min(BLOCK_STATUS_QUERY_BYTES);
        // The export may wait for writes acknowledged early: send the replies held so far.
        sender::release_held();
        let extents = match self.export.block_status(offset, qlen) {
            Ok(e) => e,
            Err(e) => {
                return Body::Error {
                    errno: crate::proto::error_errno(&e),
                    msg: e.to_string(),
                    at_offset: false,
                }
            }
        };
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut covered = 0u64;
        for e in extents {
            let room = qlen.saturating_sub(covered);
            if room == 0 {
                break;
            }
            let l = e.len.min(room);
            if l == 0 {
                continue;
            }
            let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
            covered += l;
            match out.last_mut() {
                Some((last_len, last_flags)) if *last_flags == flags => {
                    *last_len = last_len.saturating_add(l);
                }
                _ => out.push((l, flags)),
            }
        }
        if out.is_empty() {
            // Status 0 ("allocated or unknown") is always a safe answer.
            out.push((qlen, 0));
        }
        if req_one {
            out.truncate(1);
        }
        Body::Extents(context_id, out)
    }
}

/// Submit a trim or zero range in pieces no larger than the engine's request limit, split on
/// absolute multiples of it; `done` runs once with the first error, if any.
fn submit_split(
    export: &dyn Export,
    offset: u64,
    len: u64,
    done: Completion,
    make: impl Fn(u64, u64) -> Request,
) {
    let end = offset.saturating_add(len);
    let mut pieces = Vec::new();
    let mut pos = offset;
    while pos < end {
        let boundary = (pos / MAX_REQUEST_BYTES)
            .saturating_add(1)
            .saturating_mul(MAX_REQUEST_BYTES);
        let piece_end = end.min(boundary);
        pieces.push((pos, piece_end - pos));
        pos = piece_end;
    }
    if pieces.len() <= 1 {
        export.submit(make(offset, len), done);
        return;
    }
    struct Join {
        remaining: AtomicUsize,
        first_err: Mutex<Option<ingot_engine::Error>>,
        done: Mutex<Option<Completion>>,
    }
    let join = Arc::new(Join {
        remaining: AtomicUsize::new(pieces.len()),
        first_err: Mutex::new(None),
        done: Mutex::new(Some(done)),
    });
    for (o, l) in pieces {
        let join = join.clone();
        export.submit(
            make(o, l),
            Box::new(move |res| {
                if let Err(e) = res {
                    let mut first = join.first_err.lock();
                    if first.is_none() {
                        *first = Some(e);
                    }
                }
                if join.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let err = join.first_err.lock().take();
                    if let Some(done) = join.done.lock().take() {
                        done(match err {
                            Some(e) => Err(e),
                            None => Ok(Reply::Done),
                        });
                    }
                }
            }),
        );
    }
}
