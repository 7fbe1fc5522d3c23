//! Sending replies to the client.
//!
//! A thread that completes replies holds them and sends them together: a connection's reader
//! (reads served from the cache complete inline) until it has no more requests buffered, an
//! engine shard until the end of its turn (`ingot_engine::after_batch`). It sends them itself
//! with a non-blocking `sendmsg` when the connection's writer thread is idle; whatever the
//! socket does not take, and everything over TLS, goes to the writer thread, which encodes
//! replies into a gather list and flushes it whenever no reply is waiting. Only the writer
//! blocks on the socket (up to its write timeout, the reply timeout).
//!
//! Measured and rejected earlier: sending each reply from the engine thread as it completed.
//! It saved the hand-off, but replies left one by one and the client woke for each: fio had
//! 1.25-4x the context switches and fewer IOPS in 13 of 18 same-session pairs
//! (docs/benchmarks.md). Holding them to the end of the turn keeps the batching.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::credit::Credit;
use crate::reply::{encode, Body, Mode, Outgoing, ReqCtx};
use crate::stream::Stream;

/// Bytes of replies gathered before they are written even though more are waiting.
const WRITE_BUFFER_BYTES: usize = 256 << 10;

/// Where a connection's replies go. Cheap to clone (one per request in flight).
#[derive(Clone)]
pub(crate) struct Replies {
    tx: Sender<Msg>,
    out: Arc<dyn WriteNow>,
}

/// What the writer thread is asked to do.
pub(crate) enum Msg {
    Reply(Outgoing),
    /// Finish writing what the reader thread gathered but could not send without blocking.
    Flush,
}

impl Replies {
    pub fn new(tx: Sender<Msg>, out: Arc<dyn WriteNow>) -> Replies {
        Replies { tx, out }
    }

    pub fn post(&self, ctx: ReqCtx, body: Body) {
        let msg = Outgoing { ctx, body };
        let msg = match HELD.with(|h| h.borrow_mut().hold(self, msg)) {
            Some(m) => m,
            None => return,
        };
        // An engine thread: this batch's replies are sent together at its end, from there.
        let first = BATCH.with(|b| {
            let mut b = b.borrow_mut();
            b.push((self.clone(), msg));
            b.len() == 1
        });
        if first {
            ingot_engine::after_batch(Box::new(|| {
                send_now(BATCH.with(|b| std::mem::take(&mut *b.borrow_mut())));
            }));
        }
    }
}

thread_local! {
    static HELD: RefCell<Held> = const { RefCell::new(Held { on: false, msgs: Vec::new() }) };
    /// Replies completed by this (engine) thread in its current batch.
    static BATCH: RefCell<Vec<(Replies, Outgoing)>> = const { RefCell::new(Vec::new()) };
}

/// Replies posted on a connection's reader thread (cached reads complete inline, errors) while
/// it still has requests buffered. When it is about to block, the reader writes them itself,
/// together: no hand-off to the writer thread, one write and one wake-up of the client per
/// batch. (Handing them to the writer instead, even held to the end of the batch, had the two
/// threads and the client ping-pong: fio made ~10x the context switches, at half the IOPS.)
struct Held {
    on: bool,
    msgs: Vec<(Replies, Outgoing)>,
}

impl Held {
    /// Keep `msg` if this thread holds replies; otherwise give it back.
    fn hold(&mut self, to: &Replies, msg: Outgoing) -> Option<Outgoing> {
        if !self.on {
            return Some(msg);
        }
        self.msgs.push((to.clone(), msg));
        None
    }
}

/// Hold replies posted on this thread until [`release_held`] (the reader thread of a
/// connection calls this once).
pub(crate) fn hold_replies(on: bool) {
    HELD.with(|h| h.borrow_mut().on = on);
    if !on {
        release_held();
    }
}

/// Write the replies this thread holds: on this thread when that cannot block, else through
/// the writer thread.
pub(crate) fn release_held() {
    send_now(HELD.with(|h| std::mem::take(&mut h.borrow_mut().msgs)));
}

/// Send replies from this thread when that cannot block; the rest through the writer threads.
fn send_now(msgs: Vec<(Replies, Outgoing)>) {
    let mut msgs = msgs.into_iter().peekable();
    while let Some((to, first)) = msgs.next() {
        let mut batch = vec![first];
        while let Some((_, m)) = msgs.next_if(|(r, _)| r.tx.same_channel(&to.tx)) {
            batch.push(m);
        }
        match to.out.write_now(batch) {
            Now::Sent => {}
            Now::Unsent(rest) => {
                for m in rest {
                    let _ = to.tx.send(Msg::Reply(m));
                }
            }
            Now::Partly => {
                let _ = to.tx.send(Msg::Flush);
            }
        }
    }
}

/// Replies held on this thread.
pub(crate) fn held() -> usize {
    HELD.with(|h| h.borrow().msgs.len())
}

/// Writing replies on the calling thread.
pub(crate) trait WriteNow: Send + Sync {
    /// Encode `msgs` and send them (after anything gathered before) without blocking.
    fn write_now(&self, msgs: Vec<Outgoing>) -> Now;
}

/// What [`WriteNow::write_now`] did.
pub(crate) enum Now {
    Sent,
    /// Nothing: the writer thread is busy with the stream (or it cannot be written without
    /// blocking); the replies go to it.
    Unsent(Vec<Outgoing>),
    /// Gathered and partly sent: the writer thread must send the rest.
    Partly,
}

/// A connection's output, shared by its writer thread and its reader thread (which writes the
/// replies it completed itself): the stream and the replies gathered for it.
pub(crate) struct Output<W> {
    state: Mutex<OutState<W>>,
    /// The plain socket under `w`, for sends that must not block (none with TLS).
    fd: Option<RawFd>,
    control: Option<Stream>,
    credit: Arc<Credit>,
    mode: Mode,
}

struct OutState<W> {
    w: W,
    gather: Gather,
    broken: bool,
}

impl<W: Write + Send> Output<W> {
    pub fn new(
        w: W,
        fd: Option<RawFd>,
        control: Option<Stream>,
        credit: Arc<Credit>,
        mode: Mode,
    ) -> Self {
        Output {
            state: Mutex::new(OutState {
                w,
                gather: Gather::default(),
                broken: false,
            }),
            fd,
            control,
            credit,
            mode,
        }
    }

    fn push(&self, st: &mut OutState<W>, msg: Outgoing) {
        let wire = encode(self.mode, msg);
        if !st.broken {
            st.gather.push_wire(&wire.head, wire.data, wire.rest);
            if st.gather.full() {
                self.flush(st);
            }
        }
        self.credit.release(wire.cost);
    }

    fn flush(&self, st: &mut OutState<W>) {
        if st.broken {
            return;
        }
        let OutState { w, gather, broken } = st;
        if gather.flush(w).is_err() {
            *broken = true;
            // Wake the reader: the client is gone or not reading.
            if let Some(c) = &self.control {
                c.shutdown(Shutdown::Both);
            }
        }
    }
}

impl<W: Write + Send> WriteNow for Output<W> {
    fn write_now(&self, msgs: Vec<Outgoing>) -> Now {
        let Some(fd) = self.fd else {
            return Now::Unsent(msgs);
        };
        let Some(mut st) = self.state.try_lock() else {
            return Now::Unsent(msgs);
        };
        for m in msgs {
            let wire = encode(self.mode, m);
            if !st.broken {
                st.gather.push_wire(&wire.head, wire.data, wire.rest);
            }
            self.credit.release(wire.cost);
        }
        if st.broken {
            return Now::Sent;
        }
        match st.gather.send_nonblocking(fd) {
            Ok(true) => Now::Sent,
            Ok(false) => Now::Partly,
            Err(_) => {
                // The writer thread meets the same error and shuts the connection down.
                Now::Partly
            }
        }
    }
}

/// The writer thread: sends replies in arrival order, flushing whenever none is waiting.
pub(crate) fn writer_loop<W: Write + Send>(out: Arc<Output<W>>, rx: Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut st = out.state.lock();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            if let Msg::Reply(r) = m {
                out.push(&mut st, r);
            }
            next = rx.try_recv().ok();
        }
        out.flush(&mut st);
    }
}

/// Replies waiting to be written: headers (and small payloads) copied into one buffer, read
/// data kept as the engine's buffers, all sent with vectored writes. Read data is thus copied
/// once, by the kernel, instead of also into a write buffer.
#[derive(Default)]
struct Gather {
    small: Vec<u8>,
    /// Pieces in order: a range of `small`, or a payload.
    pieces: VecDeque<Piece>,
    /// Where the part of `small` not yet in `pieces` starts.
    open: usize,
    /// Bytes of the first piece already sent.
    sent: usize,
    bytes: usize,
}

enum Piece {
    Small(usize, usize),
    Data(Bytes),
}

/// Payloads shorter than this are copied (an iovec per sector would cost more than the copy).
const COPY_BELOW: usize = 1024;
/// Most pieces per write (the kernel's IOV_MAX is 1024).
const MAX_PIECES: usize = 512;

impl Gather {
    /// A reply: its header, its data, and the rest of its data when given in pieces.
    fn push_wire(&mut self, head: &[u8], data: Bytes, rest: Vec<Bytes>) {
        self.push(head, data);
        for d in rest {
            self.push(&[], d);
        }
    }

    fn push(&mut self, head: &[u8], data: Bytes) {
        self.small.extend_from_slice(head);
        self.bytes += head.len() + data.len();
        if data.len() < COPY_BELOW {
            self.small.extend_from_slice(&data);
            return;
        }
        self.seal();
        self.pieces.push_back(Piece::Data(data));
    }

    /// Close the open range of `small` as a piece.
    fn seal(&mut self) {
        if self.open < self.small.len() {
            self.pieces
                .push_back(Piece::Small(self.open, self.small.len()));
            self.open = self.small.len();
        }
    }

    fn full(&self) -> bool {
        self.bytes >= WRITE_BUFFER_BYTES || self.pieces.len() >= MAX_PIECES
    }

    /// The unsent bytes, as at most [`MAX_PIECES`] slices.
    fn slices(&self) -> Vec<IoSlice<'_>> {
        self.pieces
            .iter()
            .take(MAX_PIECES)
            .enumerate()
            .map(|(i, p)| {
                let b: &[u8] = match p {
                    Piece::Small(a, b) => &self.small[*a..*b],
                    Piece::Data(d) => d,
                };
                IoSlice::new(if i == 0 { &b[self.sent..] } else { b })
            })
            .collect()
    }

    /// `n` more bytes were sent.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.pieces.front() else {
                break;
            };
            let len = match front {
                Piece::Small(a, b) => b - a,
                Piece::Data(d) => d.len(),
            } - self.sent;
            if n < len {
                self.sent += n;
                return;
            }
            n -= len;
            self.sent = 0;
            self.pieces.pop_front();
        }
        if self.pieces.is_empty() && self.open == self.small.len() {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.small.clear();
        self.pieces.clear();
        self.open = 0;
        self.sent = 0;
        self.bytes = 0;
    }

    /// Write everything (blocking).
    fn flush<W: Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.seal();
        while !self.pieces.is_empty() {
            let r = w.write_vectored(&self.slices());
            match r {
                Ok(0) => {
                    self.clear();
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.clear();
                    return Err(e);
                }
            }
        }
        w.flush()
    }

    /// Send what the socket takes without blocking; `Ok(true)` when all of it went.
    fn send_nonblocking(&mut self, fd: RawFd) -> std::io::Result<bool> {
        self.seal();
        while !self.pieces.is_empty() {
            let n = {
                let slices = self.slices();
                // SAFETY: an all-zero msghdr is valid; it then points at `slices`, which lives
                // across the call.
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_iov = slices.as_ptr() as *mut libc::iovec;
                hdr.msg_iovlen = slices.len() as _;
                // SAFETY: IoSlice is ABI-compatible with iovec; `fd` is the connection's open
                // socket; MSG_DONTWAIT keeps this thread from blocking.
                unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => return Ok(false),
                    _ => return Err(e),
                }
            }
            self.advance(n as usize);
        }
        Ok(true)
    }
}
