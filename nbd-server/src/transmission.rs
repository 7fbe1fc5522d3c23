//! The transmission phase: a reader (this thread) that decodes, validates and submits requests
//! without waiting for them, and a writer thread that sends replies as they complete.

use std::io::{self, BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ingot_engine::{Completion, Reply, Request, MAX_REQUEST_BYTES, SECTOR_BYTES};
use parking_lot::{Condvar, Mutex};

use crate::error::{NbdError, Result};
use crate::export::Export;
use crate::handshake::{read_exact_or_eof, Negotiated};
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
    len: u32,
    /// Bytes charged to the in-flight budget, released once the reply is written.
    cost: u64,
}

enum Body {
    /// Straight from the engine.
    Engine(ingot_engine::Result<Reply>),
    Done,
    /// Block status descriptors (length, flags) for one metadata context.
    Extents(u32, Vec<(u32, u32)>),
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

/// Serve requests until the client disconnects, then wait for every reply to be written.
pub(crate) fn serve<R: Read>(
    reader: R,
    write_half: Stream,
    neg: Negotiated,
    max_inflight_bytes: u64,
) -> Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let credit = Arc::new(Credit::new(max_inflight_bytes));
    let control = write_half.try_clone()?;
    let structured = neg.structured;
    let writer = thread::Builder::new().name("nbd-writer".into()).spawn({
        let credit = credit.clone();
        move || writer_loop(write_half, rx, credit, structured)
    })?;
    let mut conn = Conn {
        r: reader,
        size: neg.export.size_bytes(),
        export: neg.export,
        read_only: neg.read_only,
        structured,
        meta_context: neg.meta_context,
        tx,
        credit,
    };
    let res = conn.run();
    // Dropping the last reader-side sender lets the writer finish once every in-flight request
    // has completed and its reply has been written.
    drop(conn);
    let _ = writer.join();
    control.shutdown(Shutdown::Both);
    res
}

struct Conn<R> {
    r: R,
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    structured: bool,
    meta_context: Option<u32>,
    tx: Sender<Outgoing>,
    credit: Arc<Credit>,
}

type Invalid = (u32, &'static str);

fn aligned(offset: u64, len: u64) -> bool {
    offset % SECTOR_BYTES == 0 && len % SECTOR_BYTES == 0
}

impl<R: Read> Conn<R> {
    fn run(&mut self) -> Result<()> {
        loop {
            let mut hdr = [0u8; REQUEST_HEADER_BYTES];
            if !read_exact_or_eof(&mut self.r, &mut hdr)? {
                return Ok(());
            }
            let h = RequestHeader::parse(&hdr);
            if h.magic != REQUEST_MAGIC {
                return Err(NbdError::BadRequestMagic(h.magic));
            }
            if h.command == CMD_DISC {
                return Ok(());
            }
            self.request(h)?;
        }
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

    fn request(&mut self, h: RequestHeader) -> Result<()> {
        let len = u64::from(h.len);
        let payload = match h.command {
            CMD_READ | CMD_WRITE => len,
            _ => 0,
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

        let data = if h.command == CMD_WRITE {
            if len > MAX_REQUEST_BYTES {
                // Keep the stream in sync: skip the payload, then fail the request.
                let skipped = io::copy(&mut (&mut self.r).take(len), &mut io::sink())?;
                if skipped != len {
                    return Err(NbdError::Truncated);
                }
                None
            } else {
                // `len` <= 32 MiB here.
                let mut buf = vec![0u8; h.len as usize];
                self.r.read_exact(&mut buf).map_err(NbdError::from_read)?;
                Some(buf)
            }
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
        h: RequestHeader,
        ctx: ReqCtx,
        data: Option<Vec<u8>>,
    ) -> std::result::Result<(), Invalid> {
        let (offset, len) = (h.offset, u64::from(h.len));
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let check_flags = |allowed: u16| {
            if h.flags & !allowed != 0 {
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
                let df = if self.structured { CMD_FLAG_DF } else { 0 };
                check_flags(CMD_FLAG_FUA | df)?;
                if len > MAX_REQUEST_BYTES {
                    let errno = if self.structured { EOVERFLOW } else { EINVAL };
                    return Err((errno, "read is larger than the maximum payload"));
                }
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((EINVAL, "read is beyond the end of the export"));
                }
                if len == 0 {
                    self.send(ctx, Body::Done);
                } else {
                    let done = self.completion(ctx);
                    self.export
                        .submit(Request::Read { offset, len: h.len }, done);
                }
            }
            CMD_WRITE => {
                check_flags(CMD_FLAG_FUA)?;
                check_write(self)?;
                let Some(data) = data else {
                    return Err((EINVAL, "write is larger than the maximum payload"));
                };
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((ENOSPC, "write is beyond the end of the export"));
                }
                if len == 0 {
                    self.send(ctx, Body::Done);
                } else {
                    let done = self.completion(ctx);
                    let data = Bytes::from(data);
                    self.export
                        .submit(Request::Write { offset, data, fua }, done);
                }
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
                    // NO_HOLE cannot be honoured (zeroed blocks are holes) but the data still
                    // reads as zeroes; FAST_ZERO is fine since zeroing is metadata-only.
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
                let Some(context_id) = self.meta_context.filter(|_| self.structured) else {
                    return Err((EINVAL, "no metadata context was negotiated"));
                };
                if len == 0 {
                    return Err((EINVAL, "block status of an empty range"));
                }
                check_aligned()?;
                if !self.in_range(offset, len) {
                    return Err((EINVAL, "block status is beyond the end of the export"));
                }
                let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
                let body = self.block_status(context_id, offset, len, req_one);
                self.send(ctx, body);
            }
            _ => return Err((EINVAL, "unknown command")),
        }
        Ok(())
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
        let mut out: Vec<(u32, u32)> = Vec::new();
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
            // qlen <= 32 MiB so every length fits in 32 bits.
            let l = u32::try_from(l).unwrap_or(u32::MAX);
            match out.last_mut() {
                Some((last_len, last_flags)) if *last_flags == flags => {
                    *last_len = last_len.saturating_add(l);
                }
                _ => out.push((l, flags)),
            }
        }
        if out.is_empty() {
            // Status 0 ("allocated or unknown") is always a safe answer.
            out.push((u32::try_from(qlen).unwrap_or(u32::MAX), 0));
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

fn writer_loop(stream: Stream, rx: Receiver<Outgoing>, credit: Arc<Credit>, structured: bool) {
    let control = stream.try_clone().ok();
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
        if !broken && write_reply(&mut w, structured, msg).is_err() {
            fail(&mut broken);
        }
        credit.release(cost);
    }
    if !broken {
        let _ = w.flush();
    }
}

fn write_reply<W: Write>(w: &mut W, structured: bool, msg: Outgoing) -> io::Result<()> {
    let ctx = msg.ctx;
    let is_read = ctx.command == CMD_READ;
    let body = match msg.body {
        Body::Engine(Ok(Reply::Data(d))) if is_read && d.len() == ctx.len as usize => {
            return write_data(w, structured, &ctx, &d);
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
        Body::Done | Body::Engine(_) => {
            if structured && is_read {
                put_chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, ctx.cookie, 0);
            } else {
                put_simple_reply(&mut out, 0, ctx.cookie);
            }
        }
        Body::Extents(context_id, ext) => {
            let len = ext
                .len()
                .checked_mul(8)
                .and_then(|n| n.checked_add(4))
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(u32::MAX);
            out.reserve(len as usize);
            put_chunk_header(
                &mut out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                ctx.cookie,
                len,
            );
            out.extend_from_slice(&context_id.to_be_bytes());
            for (l, f) in ext {
                out.extend_from_slice(&l.to_be_bytes());
                out.extend_from_slice(&f.to_be_bytes());
            }
        }
        Body::Error {
            errno,
            msg,
            at_offset,
        } => {
            let errno = if errno == 0 { EIO } else { errno };
            if structured {
                let msg = truncate_message(&msg).as_bytes();
                // msg <= 4096 bytes.
                let mlen = msg.len() as u16;
                let with_offset = at_offset;
                let (kind, extra) = if with_offset {
                    (REPLY_TYPE_ERROR_OFFSET, 8u32)
                } else {
                    (REPLY_TYPE_ERROR, 0)
                };
                put_chunk_header(
                    &mut out,
                    REPLY_FLAG_DONE,
                    kind,
                    ctx.cookie,
                    6 + u32::from(mlen) + extra,
                );
                out.extend_from_slice(&errno.to_be_bytes());
                out.extend_from_slice(&mlen.to_be_bytes());
                out.extend_from_slice(msg);
                if with_offset {
                    out.extend_from_slice(&ctx.offset.to_be_bytes());
                }
            } else {
                put_simple_reply(&mut out, errno, ctx.cookie);
            }
        }
    }
    w.write_all(&out)
}

fn write_data<W: Write>(w: &mut W, structured: bool, ctx: &ReqCtx, data: &[u8]) -> io::Result<()> {
    let mut hdr = Vec::with_capacity(32);
    if structured {
        // data.len() == ctx.len, a u32; the chunk length adds the 8-byte offset.
        let len = ctx.len.checked_add(8).ok_or(io::ErrorKind::InvalidData)?;
        put_chunk_header(
            &mut hdr,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            ctx.cookie,
            len,
        );
        hdr.extend_from_slice(&ctx.offset.to_be_bytes());
    } else {
        put_simple_reply(&mut hdr, 0, ctx.cookie);
    }
    w.write_all(&hdr)?;
    w.write_all(data)
}
