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

use std::io::{BufWriter, Write};
use std::net::Shutdown;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::credit::Credit;
use crate::reply::{encode, Body, Mode, Outgoing, ReqCtx};
use crate::stream::Stream;

/// Write buffer of the writer thread.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Where a connection's replies go: the writer thread. Cheap to clone (one per request in
/// flight).
#[derive(Clone)]
pub(crate) struct Replies(pub Sender<Outgoing>);

impl Replies {
    pub fn post(&self, ctx: ReqCtx, body: Body) {
        // The writer only goes away after every sender is dropped.
        let _ = self.0.send(Outgoing { ctx, body });
    }
}

/// The writer thread: sends replies in arrival order, flushing whenever none is waiting.
pub(crate) fn writer_loop<W: Write>(
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
        let wire = encode(mode, msg);
        if !broken && (w.write_all(&wire.head).is_err() || w.write_all(&wire.data).is_err()) {
            fail(&mut broken);
        }
        credit.release(wire.cost);
    }
    if !broken {
        let _ = w.flush();
    }
}
