//! Sending replies to the client: one writer thread per connection.
//!
//! Engine threads hand each completed request's reply to the writer over a channel and go on;
//! the writer encodes replies into a write buffer and flushes it whenever no reply is waiting, so
//! a burst of completions leaves in one `write` and wakes the client once. The writer blocks on
//! the socket (up to its write timeout, the reply timeout), never an engine thread.
//!
//! Measured and rejected: sending each reply from the engine thread that completed it, with a
//! non-blocking `sendmsg` (a flusher thread taking over only while the socket was full). It saved
//! the hand-off (a median 8% of the server's CPU per 4 KiB write with one connection, nothing
//! with two), but replies left one by one and the client woke for each: fio had 1.25-4x the
//! context switches and 3-58% more CPU per I/O, and fewer IOPS in 13 of 18 same-session pairs
//! (docs/benchmarks.md).

use std::cell::RefCell;
use std::io::{IoSlice, Write};
use std::net::Shutdown;
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::credit::Credit;
use crate::reply::{encode, Body, Mode, Outgoing, ReqCtx};
use crate::stream::Stream;

/// Bytes of replies gathered before they are written even though more are waiting.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Where a connection's replies go: the writer thread. Cheap to clone (one per request in
/// flight).
#[derive(Clone)]
pub(crate) struct Replies(pub Sender<Outgoing>);

impl Replies {
    pub fn post(&self, ctx: ReqCtx, body: Body) {
        let msg = Outgoing { ctx, body };
        let msg = match HELD.with(|h| h.borrow_mut().hold(self, msg)) {
            Some(m) => m,
            None => return,
        };
        // The writer only goes away after every sender is dropped.
        let _ = self.0.send(msg);
    }
}

thread_local! {
    static HELD: RefCell<Held> = const { RefCell::new(Held { on: false, msgs: Vec::new() }) };
}

/// Replies posted on a connection's reader thread (cached reads complete inline, errors) while
/// it still has requests buffered: handed to the writer together when the reader is about to
/// block, so the writer wakes once per batch instead of once per reply (waking it per reply
/// had it and the client ping-pong, with 2-6x the context switches).
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

/// Send the replies this thread holds. Returns how many.
pub(crate) fn release_held() -> usize {
    let msgs = HELD.with(|h| std::mem::take(&mut h.borrow_mut().msgs));
    let n = msgs.len();
    for (to, msg) in msgs {
        let _ = to.0.send(msg);
    }
    n
}

/// Replies held on this thread.
pub(crate) fn held() -> usize {
    HELD.with(|h| h.borrow().msgs.len())
}

/// The writer thread: sends replies in arrival order, flushing whenever none is waiting.
pub(crate) fn writer_loop<W: Write>(
    mut stream: W,
    control: Option<Stream>,
    rx: Receiver<Outgoing>,
    credit: Arc<Credit>,
    mode: Mode,
) {
    let mut out = Gather::default();
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
                if !broken && out.flush(&mut stream).is_err() {
                    fail(&mut broken);
                }
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let wire = encode(mode, msg);
        if !broken {
            out.push(&wire.head, wire.data);
            if out.full() && out.flush(&mut stream).is_err() {
                fail(&mut broken);
            }
        }
        credit.release(wire.cost);
    }
    if !broken {
        let _ = out.flush(&mut stream);
    }
}

/// Replies waiting to be written: headers (and small payloads) copied into one buffer, read
/// data kept as the engine's buffers, all sent with vectored writes. Read data is thus copied
/// once, by the kernel, instead of also into a write buffer.
#[derive(Default)]
struct Gather {
    small: Vec<u8>,
    /// Pieces in order: a range of `small`, or a payload.
    pieces: Vec<Piece>,
    /// Where the part of `small` not yet in `pieces` starts.
    open: usize,
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
    fn push(&mut self, head: &[u8], data: Bytes) {
        self.small.extend_from_slice(head);
        self.bytes += head.len() + data.len();
        if data.len() < COPY_BELOW {
            self.small.extend_from_slice(&data);
            return;
        }
        if self.open < self.small.len() {
            self.pieces.push(Piece::Small(self.open, self.small.len()));
            self.open = self.small.len();
        }
        self.pieces.push(Piece::Data(data));
    }

    fn full(&self) -> bool {
        self.bytes >= WRITE_BUFFER_BYTES || self.pieces.len() >= MAX_PIECES
    }

    fn flush<W: Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        if self.open < self.small.len() {
            self.pieces.push(Piece::Small(self.open, self.small.len()));
        }
        let mut slices: Vec<IoSlice<'_>> = self
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Small(a, b) => IoSlice::new(&self.small[*a..*b]),
                Piece::Data(d) => IoSlice::new(d),
            })
            .collect();
        let mut rest = &mut slices[..];
        let result = loop {
            if rest.is_empty() {
                break w.flush();
            }
            match w.write_vectored(rest) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        drop(slices);
        self.small.clear();
        self.pieces.clear();
        self.open = 0;
        self.bytes = 0;
        result
    }
}
