//! The transmission phase: a reader (this thread) that decodes, validates and submits requests
//! without waiting for them, and a writer thread that sends replies as they complete.

use std::io::{self, BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ingot_engine::{Completion, Reply, Request, MAX_REQUEST_BYTES, SECTOR_BYTES};
use parking_lot::{Condvar, Mutex};

use crate::error::{NbdError, Result};
use crate::export::Export;
use crate::handshake::Negotiated;
use crate::proto::*;
use crate::stream::Stream;

/// Bytes charged against the in-flight budget for any request, on top of its payload.
const REQUEST_OVERHEAD: u64 = 4096;
/// Largest range one `block_status` call to the export covers.
const BLOCK_STATUS_QUERY_BYTES: u64 = MAX_REQUEST_BYTES;
/// Write buffer of the reply writer.
const WRITE_BUFFER_BYTES: usize = 256 << 10;

/// Budget of bytes in flight on one connection (payloads of requests not yet replied to).
struct Credit {
    used: Mutex<u64>,
    cv: Condvar,
    max: u64,
}

impl Credit {
    fn new(max: u64) -> Self {
        Credit {
            used: Mutex::new(0),
            cv: Condvar::new(),
            max: max.max(1),
        }
    }

    /// Wait until `n` bytes (at most the whole budget) fit; returns what was charged.
    fn acquire(&self, n: u64) -> u64 {
        let n = n.min(self.max);
        let mut used = self.used.lock();
        while used.saturating_add(n) > self.max {
            self.cv.wait(&mut used);
        }
        *used += n;
        n
    }

    fn used(&self) -> u64 {
        *self.used.lock()
    }

    fn release(&self, n: u64) {
        let mut used = self.used.lock();
        *used = used.saturating_sub(n);
        self.cv.notify_all();
    }
}

/// What the writer needs to know about a request to format its reply.
#[derive(Debug, Clone, Copy)]
struct ReqCtx {
    cookie: u64,
    command: u16,
    offset: u64,
    len: u64,
    /// Bytes charged to the in-flight budget, released once the reply is written.
    cost: u64,
}

enum Body {
    /// Straight from the engine.
    Engine(ingot_engine::Result<Reply>),
    /// A read's data with the ranges (absolute offset, length) the export reported as holes.
    Read(ingot_engine::Result<Reply>, Vec<(u64, u64)>),
    Done,
    /// Block status descriptors (length, flags) for one metadata context.
    Extents(u32, Vec<(u64, u32)>),
    /// `at_offset`: report with NBD_REPLY_TYPE_ERROR_OFFSET (engine failures of a read).
    Error {
        errno: u32,
        msg: String,
        at_offset: bool,
    },
}

struct Outgoing {
    ctx: ReqCtx,
    body: Body,
}

/// Which reply headers the connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

/// Limits of the transmission phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_inflight_bytes: u64,
    /// Longest time without a request while nothing is in flight (`None`: forever).
    pub idle_timeout: Option<Duration>,
    /// Longest time without progress in the middle of a request (`None`: forever).
    pub request_timeout: Option<Duration>,
}

/// Serve requests until the client disconnects, then wait for every reply to be written.
/// `control`, when given, is shut down to wake the reader when the writer fails.
pub(crate) fn serve<R: Read, W: Write + Send + 'static>(
    reader: R,
    writer: W,
    control: Option<Stream>,
    neg: Negotiated,
    limits: Limits,
) -> Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let credit = Arc::new(Credit::new(limits.max_inflight_bytes));
    let mode = if neg.extended {
        Mode::Extended
    } else if neg.structured {
        Mode::Structured
    } else {
        Mode::Simple
    };
    let writer_control = match &control {
        Some(c) => Some(c.try_clone()?),
        None => None,
    };
    let writer = thread::Builder::new().name("nbd-writer".into()).spawn({
        let credit = credit.clone();
        move || writer_loop(writer, writer_control, rx, credit, mode)
    })?;
    let mut conn = Conn {
        r: reader,
        size: neg.export.size_bytes(),
        export: neg.export,
        read_only: neg.read_only,
        mode,
        meta_context: neg.meta_context,
        tx,
        credit,
        limits,
    };
    let res = conn.run();
    // Dropping the last reader-side sender lets the writer finish once every in-flight request
    // has completed and its reply has been written.
    drop(conn);
    let _ = writer.join();
    if let Some(c) = control {
        c.shutdown(Shutdown::Both);
    }
    res
}

struct Conn<R> {
    r: R,
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    mode: Mode,
    meta_context: Option<u32>,
    tx: Sender<Outgoing>,
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

impl<R: Read> Conn<R> {
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
            match self.r.read(rest) {
                Ok(0) if got == 0 && header => return Ok(false),
                Ok(0) => return Err(NbdError::Truncated),
                Ok(n) => {
                    got += n;
                    since = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    let waited = since.elapsed();
                    if header && got == 0 {
                        if self.credit.used() > 0 {
                            // The client waits for replies: not idle.
                            since = Instant::now();
                        } else if self.limits.idle_timeout.is_some_and(|t| waited >= t) {
                            return Err(NbdError::IdleTimeout);
                        }
                    } else if self.limits.request_timeout.is_some_and(|t| waited >= t) {
                        return Err(NbdError::RequestTimeout);
                    }
                }
                Err(e) => return Err(NbdError::Io(e)),
            }
        }
        Ok(true)
    }

    fn send(&self, ctx: ReqCtx, body: Body) {
        // The writer only goes away after every sender is dropped, so this cannot fail while
        // `self` is alive; ignore it anyway.
        let _ = self.tx.send(Outgoing { ctx, body });
    }

    fn completion(&self, ctx: ReqCtx) -> Completion {
        let tx = self.tx.clone();
        Box::new(move |res| {
            let _ = tx.send(Outgoing {
                ctx,
                body: Body::Engine(res),
            });
        })
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn request(&mut self, h: Req) -> Result<()> {
        let payload = match h.command {
            CMD_READ => h.len.min(MAX_REQUEST_BYTES),
            _ => h.payload,
        };
        let cost = self
            .credit
            .acquire(REQUEST_OVERHEAD.saturating_add(payload));
        let ctx = ReqCtx {
            cookie: h.cookie,
            command: h.command,
            offset: h.offset,
            len: h.len,
            cost,
        };

        let data = if h.payload > MAX_REQUEST_BYTES {
            // Compact writes only (extended ones were refused with the header): keep the
            // stream in sync by skipping the payload, then fail the request.
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
            None
        } else if h.payload > 0 {
            // `payload` <= 32 MiB here.
            let mut buf = vec![0u8; h.payload as usize];
            self.fill(&mut buf, false)?;
            Some(buf)
        } else {
            None
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
                    // asked for a single chunk.
                    let holes = if structured && flags & CMD_FLAG_DF == 0 {
                        self.holes(offset, len)
                    } else {
                        Vec::new()
                    };
                    let tx = self.tx.clone();
                    let done: Completion = Box::new(move |res| {
                        let _ = tx.send(Outgoing {
                            ctx,
                            body: Body::Read(res, holes),
                        });
                    });
                    // len <= 32 MiB.
                    self.export.submit(
                        Request::Read {
                            offset,
                            len: len as u32,
                        },
                        done,
                    );
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
                let body = self.block_status(context_id, offset, len, req_one);
                self.send(ctx, body);
            }
            _ => return Err((EINVAL, "unknown command")),
        }
        Ok(())
    }

    /// Ranges of `offset..offset+len` the export reports as holes (none if it cannot tell).
    fn holes(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let Ok(extents) = self.export.block_status(offset, len) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        for e in extents {
            if pos >= end {
                break;
            }
            let l = e.len.min(end - pos);
            if e.hole && l > 0 {
                out.push((pos, l));
            }
            pos += l;
        }
        out
    }

    fn block_status(&self, context_id: u32, offset: u64, len: u64, req_one: bool) -> Body {
        let qlen = len.min(BLOCK_STATUS_QUERY_BYTES);
        let extents = match self.export.block_status(offset, qlen) {
            Ok(e) => e,
            Err(e) => {
                return Body::Error {
                    errno: wire_errno(e.errno()),
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

fn writer_loop<W: Write>(
    stream: W,
    control: Option<Stream>,
    rx: Receiver<Outgoing>,
    credit: Arc<Credit>,
    mode: Mode,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, stream);
    let mut broken = false;
    let fail = |broken: &mut bool| {
        *broken = true;
        // Wake the reader: the client is gone or not reading.
        if let Some(c) = &control {
            c.shutdown(Shutdown::Both);
        }
    };
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(TryRecvError::Empty) => {
                if !broken && w.flush().is_err() {
                    fail(&mut broken);
                }
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let cost = msg.ctx.cost;
        if !broken && write_reply(&mut w, mode, msg).is_err() {
            fail(&mut broken);
        }
        credit.release(cost);
    }
    if !broken {
        let _ = w.flush();
    }
}

/// Append a chunk header (structured or extended) for a reply to `ctx`.
fn chunk_header(out: &mut Vec<u8>, mode: Mode, flags: u16, kind: u16, ctx: &ReqCtx, len: u64) {
    if mode == Mode::Extended {
        put_extended_header(out, flags, kind, ctx.cookie, ctx.offset, len);
    } else {
        // Chunk payloads are bounded by the 32 MiB request limit.
        put_chunk_header(
            out,
            flags,
            kind,
            ctx.cookie,
            u32::try_from(len).unwrap_or(u32::MAX),
        );
    }
}

/// True when every byte of `s` is zero.
fn is_zero(s: &[u8]) -> bool {
    s.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

fn write_reply<W: Write>(w: &mut W, mode: Mode, msg: Outgoing) -> io::Result<()> {
    let ctx = msg.ctx;
    let is_read = ctx.command == CMD_READ;
    let (res, holes) = match msg.body {
        Body::Read(res, holes) => (Body::Engine(res), holes),
        other => (other, Vec::new()),
    };
    let body = match res {
        Body::Engine(Ok(Reply::Data(d))) if is_read && d.len() as u64 == ctx.len => {
            return write_data(w, mode, &ctx, &d, &holes);
        }
        Body::Engine(Ok(Reply::Done)) if !is_read => Body::Done,
        Body::Engine(Ok(_)) => Body::Error {
            errno: EIO,
            msg: "engine returned a reply of the wrong kind or length".into(),
            at_offset: is_read,
        },
        Body::Engine(Err(e)) => Body::Error {
            errno: wire_errno(e.errno()),
            msg: e.to_string(),
            at_offset: is_read,
        },
        other => other,
    };
    let mut out = Vec::with_capacity(64);
    match body {
        Body::Done | Body::Engine(_) | Body::Read(..) => match mode {
            Mode::Simple => put_simple_reply(&mut out, 0, ctx.cookie),
            Mode::Structured if !is_read => put_simple_reply(&mut out, 0, ctx.cookie),
            _ => chunk_header(&mut out, mode, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &ctx, 0),
        },
        Body::Extents(context_id, ext) => {
            if mode == Mode::Extended {
                let len = (ext.len() as u64).saturating_mul(16).saturating_add(8);
                chunk_header(
                    &mut out,
                    mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS_EXT,
                    &ctx,
                    len,
                );
                out.extend_from_slice(&context_id.to_be_bytes());
                // At most one descriptor per 4 KiB block of a 32 MiB query.
                out.extend_from_slice(&(ext.len() as u32).to_be_bytes());
                for (l, f) in ext {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&u64::from(f).to_be_bytes());
                }
            } else {
                let len = (ext.len() as u64).saturating_mul(8).saturating_add(4);
                chunk_header(
                    &mut out,
                    mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    &ctx,
                    len,
                );
                out.extend_from_slice(&context_id.to_be_bytes());
                for (l, f) in ext {
                    // Queries cover at most 32 MiB, so lengths fit in 32 bits.
                    out.extend_from_slice(&u32::try_from(l).unwrap_or(u32::MAX).to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            }
        }
        Body::Error {
            errno,
            msg,
            at_offset,
        } => {
            let errno = if errno == 0 { EIO } else { errno };
            if mode == Mode::Simple {
                put_simple_reply(&mut out, errno, ctx.cookie);
            } else {
                let msg = truncate_message(&msg).as_bytes();
                // msg <= 4096 bytes.
                let mlen = msg.len() as u16;
                let (kind, extra) = if at_offset {
                    (REPLY_TYPE_ERROR_OFFSET, 8u64)
                } else {
                    (REPLY_TYPE_ERROR, 0)
                };
                chunk_header(
                    &mut out,
                    mode,
                    REPLY_FLAG_DONE,
                    kind,
                    &ctx,
                    6 + u64::from(mlen) + extra,
                );
                out.extend_from_slice(&errno.to_be_bytes());
                out.extend_from_slice(&mlen.to_be_bytes());
                out.extend_from_slice(msg);
                if at_offset {
                    out.extend_from_slice(&ctx.offset.to_be_bytes());
                }
            }
        }
    }
    w.write_all(&out)
}

/// Send a read's data: one simple reply, or structured chunks where ranges the export reported
/// as holes (and that do read as zeroes) go as NBD_REPLY_TYPE_OFFSET_HOLE without their bytes.
fn write_data<W: Write>(
    w: &mut W,
    mode: Mode,
    ctx: &ReqCtx,
    data: &[u8],
    holes: &[(u64, u64)],
) -> io::Result<()> {
    let mut hdr = Vec::with_capacity(40);
    if mode == Mode::Simple {
        put_simple_reply(&mut hdr, 0, ctx.cookie);
        w.write_all(&hdr)?;
        return w.write_all(data);
    }
    // Pieces: (start, end, is_hole) relative to the request, in order.
    let mut pieces: Vec<(usize, usize, bool)> = Vec::new();
    let push = |pieces: &mut Vec<(usize, usize, bool)>, a: usize, b: usize, hole: bool| {
        if a >= b {
            return;
        }
        match pieces.last_mut() {
            Some(last) if last.2 == hole && last.1 == a => last.1 = b,
            _ => pieces.push((a, b, hole)),
        }
    };
    let mut pos = 0usize;
    for &(off, len) in holes {
        let a = usize::try_from(off.saturating_sub(ctx.offset)).unwrap_or(usize::MAX);
        let b = usize::try_from(off.saturating_add(len).saturating_sub(ctx.offset))
            .unwrap_or(usize::MAX)
            .min(data.len());
        if a < pos || a >= b {
            continue;
        }
        push(&mut pieces, pos, a, false);
        // A hole that no longer reads as zeroes (a racing write) goes as data.
        let zero = data.get(a..b).is_some_and(is_zero);
        push(&mut pieces, a, b, zero);
        pos = b;
    }
    push(&mut pieces, pos, data.len(), false);
    let n = pieces.len();
    for (i, (a, b, hole)) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let off = ctx.offset + a as u64;
        hdr.clear();
        if hole {
            chunk_header(&mut hdr, mode, flags, REPLY_TYPE_OFFSET_HOLE, ctx, 12);
            hdr.extend_from_slice(&off.to_be_bytes());
            // Bounded by the 32 MiB request size.
            hdr.extend_from_slice(&((b - a) as u32).to_be_bytes());
            w.write_all(&hdr)?;
        } else {
            chunk_header(
                &mut hdr,
                mode,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                ctx,
                8 + (b - a) as u64,
            );
            hdr.extend_from_slice(&off.to_be_bytes());
            w.write_all(&hdr)?;
            w.write_all(data.get(a..b).unwrap_or(&[]))?;
        }
    }
    Ok(())
}
