//! Sending replies to the client.
//!
//! On a plain socket ([`Direct`]) the thread that completes a request (an engine shard, or the
//! connection's reader for the replies it makes itself) encodes the reply and sends it with a
//! non-blocking `sendmsg`, together with every reply other threads queued meanwhile: one thread
//! sends at a time, the others only queue and return. So a reply costs no thread hand-off and no
//! wake-up. Only when the socket's send buffer is full does the connection's flusher thread take
//! over: it waits for the client to read, at most the reply timeout without progress, and then
//! drops the connection. An engine thread never blocks on a socket.
//!
//! A stream that threads cannot share (TLS; the fuzzer's sink) gets a writer thread that sends
//! every reply ([`writer_loop`]).

use std::collections::VecDeque;
use std::io::{self, BufWriter, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::credit::Credit;
use crate::reply::{encode, Body, Mode, Outgoing, ReqCtx, Wire};
use crate::stream::Stream;

/// Write buffer of the writer thread.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Most buffers handed to one `sendmsg`.
const MAX_IOV: usize = 64;
/// The flusher looks at the reply timeout at least this often.
const POLL_STEP: Duration = Duration::from_secs(1);

/// Where a connection's replies go. Cheap to clone (one per request in flight).
#[derive(Clone)]
pub(crate) enum Replies {
    Direct(Arc<Direct>),
    Thread(Sender<Outgoing>),
}

impl Replies {
    pub fn post(&self, ctx: ReqCtx, body: Body) {
        match self {
            Replies::Direct(d) => d.post(encode(d.mode, Outgoing { ctx, body })),
            // The writer only goes away after every sender is dropped.
            Replies::Thread(tx) => {
                let _ = tx.send(Outgoing { ctx, body });
            }
        }
    }
}

/// Replies sent straight to a plain socket by whichever thread has one.
pub(crate) struct Direct {
    sock: Stream,
    mode: Mode,
    credit: Arc<Credit>,
    reply_timeout: Option<Duration>,
    state: Mutex<State>,
    /// Wakes the flusher.
    cv: Condvar,
}

#[derive(Default)]
struct State {
    /// Encoded replies not yet sent, in order; the first may be partly sent.
    queue: VecDeque<Wire>,
    /// An empty queue kept for its capacity.
    spare: VecDeque<Wire>,
    /// A thread is sending: a poster, or the flusher while `congested`.
    sending: bool,
    /// The socket was full: the flusher sends until the queue is empty.
    congested: bool,
    /// The client is gone or stopped reading: replies are dropped.
    broken: bool,
    /// The connection is ending: the flusher exits once idle.
    closing: bool,
}

/// How a send attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Everything handed to it went out.
    All,
    /// The socket's buffer is full.
    Full,
    /// The socket failed.
    Failed,
}

impl Direct {
    /// Send replies on `sock`; returns the sender and its flusher thread (stopped by
    /// [`Direct::close`]).
    pub fn start(
        sock: Stream,
        mode: Mode,
        credit: Arc<Credit>,
        reply_timeout: Option<Duration>,
    ) -> io::Result<(Arc<Direct>, JoinHandle<()>)> {
        let d = Arc::new(Direct {
            sock,
            mode,
            credit,
            reply_timeout,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let flusher = thread::Builder::new().name("nbd-flusher".into()).spawn({
            let d = d.clone();
            move || d.flusher()
        })?;
        Ok((d, flusher))
    }

    /// Queue a reply and send it now unless another thread is sending (it will).
    fn post(&self, wire: Wire) {
        let mut st = self.state.lock();
        if st.broken {
            drop(st);
            self.credit.release(wire.cost);
            return;
        }
        st.queue.push_back(wire);
        if st.sending {
            return;
        }
        st.sending = true;
        self.send_queued(st);
    }

    /// Stop the flusher once nothing is left to send; call after every reply was posted.
    pub fn close(&self) {
        self.state.lock().closing = true;
        self.cv.notify_all();
    }

    /// Send the queue (the caller has set `sending`) until it is empty, the socket is full (the
    /// flusher then takes over) or fails. Returns whether any byte went out, and how it ended.
    fn send_queued<'a>(&'a self, mut st: MutexGuard<'a, State>) -> (bool, Sent) {
        let mut progress = false;
        loop {
            let mut batch = std::mem::take(&mut st.spare);
            std::mem::swap(&mut batch, &mut st.queue);
            drop(st);
            let (bytes, released, outcome) = send_batch(&self.sock, &mut batch);
            self.credit.release(released);
            progress |= bytes > 0;
            st = self.state.lock();
            if !batch.is_empty() {
                batch.extend(st.queue.drain(..));
                std::mem::swap(&mut batch, &mut st.queue);
            }
            st.spare = batch;
            match outcome {
                Sent::All if !st.queue.is_empty() => {}
                Sent::All => {
                    st.sending = false;
                    st.congested = false;
                    return (progress, Sent::All);
                }
                Sent::Full => {
                    if !st.congested {
                        st.congested = true;
                        self.cv.notify_all();
                    }
                    return (progress, Sent::Full);
                }
                Sent::Failed => {
                    self.fail(st);
                    return (progress, Sent::Failed);
                }
            }
        }
    }

    /// The client is gone or not reading: drop every queued reply, give its credit back, and
    /// shut the socket down to wake the reader.
    fn fail<'a>(&'a self, mut st: MutexGuard<'a, State>) {
        st.broken = true;
        st.sending = false;
        st.congested = false;
        let dropped: u64 = st.queue.drain(..).map(|w| w.cost).sum();
        drop(st);
        self.credit.release(dropped);
        self.sock.shutdown(Shutdown::Both);
    }

    /// Sends while the socket is full, waiting for the client to read.
    fn flusher(&self) {
        loop {
            {
                let mut st = self.state.lock();
                while !st.congested && !st.closing {
                    self.cv.wait(&mut st);
                }
                if !st.congested {
                    return;
                }
            }
            let mut progress_at = Instant::now();
            loop {
                let step = match self.reply_timeout {
                    Some(t) => t.saturating_sub(progress_at.elapsed()).min(POLL_STEP),
                    None => POLL_STEP,
                };
                if !wait_writable(&self.sock, step) {
                    if self
                        .reply_timeout
                        .is_some_and(|t| progress_at.elapsed() >= t)
                    {
                        self.fail(self.state.lock());
                        break;
                    }
                    continue;
                }
                let (progress, outcome) = self.send_queued(self.state.lock());
                if progress {
                    progress_at = Instant::now();
                }
                if outcome != Sent::Full {
                    break;
                }
            }
        }
    }
}

/// Wait up to `timeout` for room in the socket's send buffer (or an error on it).
fn wait_writable(sock: &Stream, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX).max(1);
    // SAFETY: `p` is one valid pollfd that outlives the call; the descriptor stays open.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
}

/// Send as much of `batch` as the socket takes without blocking, in `sendmsg` calls of up to
/// [`MAX_IOV`] buffers; fully sent replies leave `batch`. Returns the bytes sent, the credit of
/// the replies completed, and how it ended.
fn send_batch(sock: &Stream, batch: &mut VecDeque<Wire>) -> (usize, u64, Sent) {
    let mut total = 0usize;
    let mut released = 0u64;
    loop {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0usize;
        let mut offered = 0usize;
        'fill: for w in batch.iter() {
            let (h, d) = w.unsent();
            for s in [h, d] {
                if s.is_empty() {
                    continue;
                }
                let Some(v) = iov.get_mut(n) else {
                    break 'fill;
                };
                *v = libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                };
                n += 1;
                offered += s.len();
            }
        }
        if n == 0 {
            // Nothing left (or only empty replies, which cannot happen).
            released += batch.drain(..).map(|w| w.cost).sum::<u64>();
            return (total, released, Sent::All);
        }
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: `msg` points at `n` iovecs describing live slices of `batch`, which is not
        // touched during the call; `sendmsg` only reads them.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return (total, released, Sent::Full),
                _ => return (total, released, Sent::Failed),
            }
        }
        let sent = r as usize;
        total += sent;
        let mut left = sent;
        while let Some(w) = batch.front_mut() {
            let rest = w.len() - w.sent;
            if left >= rest {
                left -= rest;
                released += w.cost;
                batch.pop_front();
            } else {
                w.sent += left;
                break;
            }
        }
        if sent < offered {
            // A short write: the send buffer is full.
            return (total, released, Sent::Full);
        }
    }
}

/// The writer thread of a stream that threads cannot share: sends replies in arrival order,
/// flushing whenever none is waiting.
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
