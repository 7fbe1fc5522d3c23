//! The sending side of a connection: PDUs from the reader thread, engine completions and the
//! writer thread meet in [`Ctx`], which stamps sequence numbers and writes them out in order.

use std::collections::HashSet;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex};

use crate::login::Params;
use crate::pdu::{self, op, Bhs, ScsiCmd, RESERVED_TAG};
use crate::scsi::{self, Response};
use crate::sense::status;

/// Something for the writer thread to send.
pub(super) enum Out {
    Pdu {
        bhs: Bhs,
        data: Bytes,
        /// Status PDUs take a StatSN and advance it; others carry the next one.
        advance: bool,
    },
    /// Send what the reader thread gathered but could not send without blocking.
    Flush,
    /// Send everything queued, then close the connection.
    Close,
}

thread_local! {
    /// PDUs completed by this (engine) thread in its current batch.
    static BATCH: std::cell::RefCell<Vec<(Arc<Ctx>, Out)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// PDUs posted on a connection's reader thread (commands served from the cache complete
    /// inline) while it has more PDUs buffered: written together by that thread when it is about
    /// to block, without a hand-off to the writer (see [`Ctx::release_held`]).
    static HELD: std::cell::RefCell<Held> =
        const { std::cell::RefCell::new(Held { ctx: 0, pdus: Vec::new() }) };
}

struct Held {
    /// The connection (its `Ctx` address) whose PDUs this thread holds; 0: none.
    ctx: usize,
    pdus: Vec<Out>,
}

/// Whether `buf` starts with a whole PDU (so reading it will not block).
pub(super) fn whole_pdu_buffered(buf: &[u8], limits: &pdu::Limits) -> bool {
    if buf.len() < 48 {
        return false;
    }
    let ahs = usize::from(buf[4]) * 4;
    let data = usize::from(buf[5]) << 16 | usize::from(buf[6]) << 8 | usize::from(buf[7]);
    let mut total = 48 + ahs + data.next_multiple_of(4);
    if limits.header_digest {
        total += 4;
    }
    if limits.data_digest && data > 0 {
        total += 4;
    }
    buf.len() >= total
}

/// Most PDUs held on the reader thread before they are written anyway.
pub(super) const MAX_HELD: usize = 256;

/// The writer's side of a connection, shared with the reader thread: sequence numbers and the
/// bytes encoded and not yet sent.
pub(super) struct WState {
    pub(super) buf: Vec<u8>,
    pub(super) stat_sn: u32,
    pub(super) max_cmd_sn: u32,
    pub(super) broken: bool,
}

impl WState {
    /// Encode a PDU, stamping StatSN, ExpCmdSN and MaxCmdSN.
    pub(super) fn encode(&mut self, ctx: &Ctx, mut bhs: Bhs, data: &[u8], advance: bool) {
        if self.broken {
            return;
        }
        let exp = ctx.exp_cmd_sn.load(Ordering::Acquire);
        let inflight = ctx.inflight_count.load(Ordering::Acquire);
        let room = ctx.window.saturating_sub(inflight).max(1);
        let m = exp.wrapping_add(room).wrapping_sub(1);
        // MaxCmdSN never moves backwards (serial number arithmetic).
        if (m.wrapping_sub(self.max_cmd_sn) as i32) > 0 {
            self.max_cmd_sn = m;
        }
        bhs.set_u32(24, self.stat_sn);
        bhs.set_u32(28, exp);
        bhs.set_u32(32, self.max_cmd_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        let (hd, dd) = (ctx.params.header_digest, ctx.params.data_digest);
        // Writing into a Vec cannot fail.
        let _ = pdu::write_pdu(&mut self.buf, &bhs, data, hd, dd);
    }

    /// Send everything (blocking).
    fn flush(&mut self, stream: &TcpStream) {
        if !self.broken && !self.buf.is_empty() {
            let mut w = stream;
            if w.write_all(&self.buf).is_err() {
                self.broken = true;
            }
        }
        self.buf.clear();
    }

    /// Send what the socket takes without blocking; true when all of it went.
    fn send_nonblocking(&mut self, stream: &TcpStream) -> bool {
        use std::os::fd::AsRawFd;
        let mut at = 0;
        while at < self.buf.len() && !self.broken {
            let rest = &self.buf[at..];
            // SAFETY: `rest` is valid for its length; the socket is open for the call;
            // MSG_DONTWAIT keeps the reader thread from blocking.
            let n = unsafe {
                libc::send(
                    stream.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => break,
                    // The writer thread meets the error too and ends the connection.
                    _ => break,
                }
            }
            at += n as usize;
        }
        self.buf.drain(..at);
        self.buf.is_empty()
    }
}

/// State shared by the reader, the writer and engine completions.
pub(super) struct Ctx {
    /// This context, for replies sent at the end of an engine thread's batch.
    pub(super) me: std::sync::Weak<Ctx>,
    pub(super) tx: Sender<Out>,
    /// PDUs sent to the writer thread and not yet encoded: while there are any, PDUs sent later
    /// go the same way, so that none overtakes them.
    pub(super) queued: AtomicU32,
    pub(super) wstate: Mutex<WState>,
    /// The socket, for the reader thread's non-blocking sends.
    pub(super) stream: TcpStream,
    pub(super) params: Params,
    pub(super) exp_cmd_sn: AtomicU32,
    /// Commands submitted to the engine and not yet answered, by ITT.
    pub(super) inflight: Mutex<HashSet<u32>>,
    /// `inflight.len()`, readable without the lock (the writer needs it for every PDU).
    pub(super) inflight_count: AtomicU32,
    pub(super) drained: Condvar,
    /// Commands the window admits beyond ExpCmdSN.
    pub(super) window: u32,
    /// Time of the last PDU from the initiator (ms since `epoch`).
    pub(super) last_rx_ms: AtomicU64,
    pub(super) epoch: Instant,
}

impl Ctx {
    pub(super) fn send(&self, bhs: Bhs, data: Bytes, advance: bool) {
        let out = Out::Pdu { bhs, data, advance };
        let me = self as *const Ctx as usize;
        let out = HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.ctx == me {
                h.pdus.push(out);
                None
            } else {
                Some(out)
            }
        });
        let Some(out) = out else {
            return;
        };
        let Some(ctx) = self.me.upgrade() else {
            self.queue(out);
            return;
        };
        // An engine thread: this batch's PDUs are sent together at its end, from there.
        let first = BATCH.with(|b| {
            let mut b = b.borrow_mut();
            b.push((ctx, out));
            b.len() == 1
        });
        if first {
            ingot_engine::after_batch(Box::new(|| {
                let all = BATCH.with(|b| std::mem::take(&mut *b.borrow_mut()));
                let mut all = all.into_iter().peekable();
                while let Some((ctx, first)) = all.next() {
                    let mut pdus = vec![first];
                    while let Some((_, p)) = all.next_if(|(c, _)| Arc::ptr_eq(c, &ctx)) {
                        pdus.push(p);
                    }
                    ctx.send_now(pdus);
                }
            }));
        }
    }

    /// Hold PDUs posted on this thread (the connection's reader) until [`Ctx::release_held`].
    pub(super) fn hold_here(&self, on: bool) {
        let me = if on { self as *const Ctx as usize } else { 0 };
        HELD.with(|h| h.borrow_mut().ctx = me);
    }

    pub(super) fn held(&self) -> usize {
        HELD.with(|h| h.borrow().pdus.len())
    }

    /// Write the PDUs this thread holds: on this thread when the writer is idle and the socket
    /// takes them without blocking, else (the rest) through the writer thread.
    pub(super) fn release_held(&self) {
        self.send_now(HELD.with(|h| std::mem::take(&mut h.borrow_mut().pdus)));
    }

    /// Send `pdus` from this thread when the writer is idle and the socket takes them without
    /// blocking; else (the rest) through the writer thread.
    fn send_now(&self, pdus: Vec<Out>) {
        if pdus.is_empty() {
            return;
        }
        let st = match self.wstate.try_lock() {
            // PDUs already queued for the writer go first.
            Some(st) if self.queued.load(Ordering::Acquire) == 0 => Some(st),
            _ => None,
        };
        let Some(mut st) = st else {
            for p in pdus {
                self.queue(p);
            }
            return;
        };
        for p in pdus {
            if let Out::Pdu { bhs, data, advance } = p {
                st.encode(self, bhs, &data, advance);
            }
        }
        if !st.send_nonblocking(&self.stream) {
            drop(st);
            let _ = self.tx.send(Out::Flush);
        }
    }

    /// Hand a PDU to the writer thread.
    fn queue(&self, out: Out) {
        if matches!(out, Out::Pdu { .. }) {
            self.queued.fetch_add(1, Ordering::AcqRel);
        }
        let _ = self.tx.send(out);
    }

    pub(super) fn start(&self, itt: u32) {
        let mut f = self.inflight.lock();
        f.insert(itt);
        self.inflight_count.store(f.len() as u32, Ordering::Release);
    }

    pub(super) fn finish(&self, itt: u32) {
        let mut f = self.inflight.lock();
        f.remove(&itt);
        self.inflight_count.store(f.len() as u32, Ordering::Release);
        if f.is_empty() {
            self.drained.notify_all();
        }
    }

    pub(super) fn wait_idle(&self) {
        let mut f = self.inflight.lock();
        while !f.is_empty() {
            self.drained.wait(&mut f);
        }
    }

    pub(super) fn touch(&self) {
        self.last_rx_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

pub(super) fn writer_loop(
    ctx: Arc<Ctx>,
    stream: TcpStream,
    rx: Receiver<Out>,
    nop: Option<Duration>,
) {
    let mut ping_ttt: u32 = 0x1000_0000;
    let tick = nop.unwrap_or(Duration::from_secs(3600));
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(_) => {
                let mut st = ctx.wstate.lock();
                st.flush(&stream);
                if st.broken {
                    break;
                }
                drop(st);
                match rx.recv_timeout(tick) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        let now = ctx.epoch.elapsed().as_millis() as u64;
                        let last = ctx.last_rx_ms.load(Ordering::Relaxed);
                        if nop.is_some() && now.saturating_sub(last) >= tick.as_millis() as u64 {
                            // Keep-alive: a NOP-In the initiator must answer.
                            let mut b = Bhs::new(op::NOP_IN, 0x80);
                            b.set_lun(0);
                            b.set_itt(RESERVED_TAG);
                            ping_ttt = ping_ttt.wrapping_add(1) | 0x1000_0000;
                            b.set_u32(20, ping_ttt);
                            // Counted like a queued PDU (it is uncounted once encoded).
                            ctx.queued.fetch_add(1, Ordering::AcqRel);
                            Out::Pdu {
                                bhs: b,
                                data: Bytes::new(),
                                advance: false,
                            }
                        } else {
                            continue;
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        match msg {
            Out::Close => break,
            Out::Flush => {}
            Out::Pdu { bhs, data, advance } => {
                let mut st = ctx.wstate.lock();
                st.encode(&ctx, bhs, &data, advance);
                ctx.queued.fetch_sub(1, Ordering::AcqRel);
                if st.buf.len() >= 256 << 10 {
                    st.flush(&stream);
                }
                if st.broken {
                    break;
                }
            }
        }
    }
    ctx.wstate.lock().flush(&stream);
    let _ = stream.shutdown(Shutdown::Both);
}

/// End task `itt` once its response has left this thread's hands: on an engine thread the
/// response is sent at the end of the turn, and a reader waiting for the task (logout, task
/// management) must not overtake it with a response of its own.
pub(super) fn finish_after_response(ctx: Arc<Ctx>, itt: u32) {
    ingot_engine::after_batch(Box::new(move || ctx.finish(itt)));
}

/// Send Data-In and/or the SCSI Response for a finished command.
pub(super) fn respond(ctx: &Ctx, cmd: &ScsiCmd, r: Response) {
    let edtl = cmd.edtl as usize;
    // Residuals: what the command wanted to move against what the initiator expected.
    let (moved, wanted) = if cmd.write {
        let want = scsi::data_out_len(&cmd.cdb) as usize;
        (edtl.min(want), want)
    } else if cmd.read {
        (r.data.len().min(edtl), r.data.len())
    } else {
        (0, r.data.len().max(scsi::data_out_len(&cmd.cdb) as usize))
    };
    let (flags, residual) = if wanted > edtl {
        (0x04, (wanted - edtl) as u32)
    } else if wanted < edtl {
        (0x02, (edtl - wanted) as u32)
    } else {
        (0, 0)
    };
    let send_data = cmd.read && moved > 0 && r.status == status::GOOD;
    if send_data {
        let data = r.data.slice(..moved);
        let max_seg = ctx.params.max_send_data as usize;
        let burst = ctx.params.max_burst as usize;
        let mut off = 0;
        let mut sn = 0u32;
        while off < moved {
            let len = (moved - off).min(max_seg).min(burst - off % burst);
            let last = off + len == moved;
            let mut b = Bhs::new(op::DATA_IN, 0);
            let end_of_burst = (off + len) % burst == 0;
            let mut f = if last || end_of_burst { 0x80 } else { 0 };
            if last {
                f |= 0x01 | flags; // S bit with status and residuals
                b.0[3] = r.status;
                b.set_u32(44, residual);
            }
            b.0[1] = f;
            b.set_lun(cmd.lun);
            b.set_itt(cmd.itt);
            b.set_u32(20, RESERVED_TAG);
            b.set_u32(36, sn);
            b.set_u32(40, off as u32);
            ctx.send(b, data.slice(off..off + len), last);
            off += len;
            sn = sn.wrapping_add(1);
        }
        return;
    }
    let mut b = Bhs::new(op::SCSI_RESP, 0x80 | flags);
    b.0[2] = 0; // command completed at target
    b.0[3] = r.status;
    b.set_itt(cmd.itt);
    b.set_u32(20, 0);
    b.set_u32(36, 0);
    b.set_u32(44, residual);
    let data = match &r.sense {
        Some(s) => {
            let mut d = Vec::with_capacity(2 + s.len());
            d.extend_from_slice(&(s.len() as u16).to_be_bytes());
            d.extend_from_slice(s);
            Bytes::from(d)
        }
        None => Bytes::new(),
    };
    ctx.send(b, data, true);
}
