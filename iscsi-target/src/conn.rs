//! One iSCSI connection: the login phase, then the full feature phase with a reader thread
//! (this one: decodes PDUs, collects Data-Out, runs commands) and a writer thread (sends
//! responses in the order they complete, stamping StatSN / ExpCmdSN / MaxCmdSN).

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ingot_engine::Request;
use parking_lot::{Condvar, Mutex};

use crate::error::{IscsiError, Result};
use crate::login::{self, Login, LoginConfig, Outcome, Params, Session, SessionType, TargetLookup};
use crate::lu::Lu;
use crate::pdu::{self, decode_lun, op, read_pdu, reject, Bhs, Pdu, ScsiCmd, RESERVED_TAG};
use crate::scsi::{self, Action, Nexus, Response};
use crate::sense::{self, status};
use crate::target::{conn_event, Admission, Shared};
use crate::text;

/// TMF function codes (RFC 7143 §11.5.1).
mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    // Responses.
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const NOT_SUPPORTED: u8 = 5;
}

/// Something for the writer thread to send.
enum Out {
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
fn whole_pdu_buffered(buf: &[u8], limits: &pdu::Limits) -> bool {
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
const MAX_HELD: usize = 256;

/// The writer's side of a connection, shared with the reader thread: sequence numbers and the
/// bytes encoded and not yet sent.
struct WState {
    buf: Vec<u8>,
    stat_sn: u32,
    max_cmd_sn: u32,
    broken: bool,
}

impl WState {
    /// Encode a PDU, stamping StatSN, ExpCmdSN and MaxCmdSN.
    fn encode(&mut self, ctx: &Ctx, mut bhs: Bhs, data: &[u8], advance: bool) {
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
struct Ctx {
    /// This context, for replies sent at the end of an engine thread's batch.
    me: std::sync::Weak<Ctx>,
    tx: Sender<Out>,
    /// PDUs sent to the writer thread and not yet encoded: while there are any, PDUs sent later
    /// go the same way, so that none overtakes them.
    queued: AtomicU32,
    wstate: Mutex<WState>,
    /// The socket, for the reader thread's non-blocking sends.
    stream: TcpStream,
    params: Params,
    exp_cmd_sn: AtomicU32,
    /// Commands submitted to the engine and not yet answered, by ITT.
    inflight: Mutex<HashSet<u32>>,
    /// `inflight.len()`, readable without the lock (the writer needs it for every PDU).
    inflight_count: AtomicU32,
    drained: Condvar,
    /// Commands the window admits beyond ExpCmdSN.
    window: u32,
    /// Time of the last PDU from the initiator (ms since `epoch`).
    last_rx_ms: AtomicU64,
    epoch: Instant,
}

impl Ctx {
    fn send(&self, bhs: Bhs, data: Bytes, advance: bool) {
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
    fn hold_here(&self, on: bool) {
        let me = if on { self as *const Ctx as usize } else { 0 };
        HELD.with(|h| h.borrow_mut().ctx = me);
    }

    fn held(&self) -> usize {
        HELD.with(|h| h.borrow().pdus.len())
    }

    /// Write the PDUs this thread holds: on this thread when the writer is idle and the socket
    /// takes them without blocking, else (the rest) through the writer thread.
    fn release_held(&self) {
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

    fn start(&self, itt: u32) {
        let mut f = self.inflight.lock();
        f.insert(itt);
        self.inflight_count.store(f.len() as u32, Ordering::Release);
    }

    fn finish(&self, itt: u32) {
        let mut f = self.inflight.lock();
        f.remove(&itt);
        self.inflight_count.store(f.len() as u32, Ordering::Release);
        if f.is_empty() {
            self.drained.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut f = self.inflight.lock();
        while !f.is_empty() {
            self.drained.wait(&mut f);
        }
    }

    fn touch(&self) {
        self.last_rx_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// A write waiting for its Data-Out.
struct PendingWrite {
    cmd: ScsiCmd,
    lu: u16,
    buf: Vec<u8>,
    /// Bytes of the unsolicited burst (immediate + unsolicited Data-Out).
    unsolicited_end: usize,
    unsolicited_done: bool,
    next_data_sn: u32,
    /// Current R2T: target transfer tag and the end of its burst.
    r2t: Option<(u32, usize)>,
    r2t_sn: u32,
}

/// Serve one accepted connection until it ends.
pub(crate) fn serve(shared: Arc<Shared>, stream: TcpStream, conn_id: u64) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let cfg = shared.cfg.clone();
    stream.set_read_timeout(Some(cfg.login_timeout.max(Duration::from_millis(1))))?;
    let mut reader = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let mut wr = stream.try_clone()?;
    let tsih = shared.next_tsih();
    let mut login = Login::new(
        LoginConfig {
            max_recv_data: cfg.max_recv_data,
            allow_digests: true,
            portal_group_tag: 1,
        },
        tsih,
        cfg.window,
    );
    let lookup = |name: &str| match shared.lookup_target(name) {
        Some(vol) => TargetLookup::Found(cfg.chap.get(&vol).cloned().or(cfg.default_chap.clone())),
        None => TargetLookup::Missing,
    };
    let login_limits = pdu::Limits {
        max_data: login::MAX_LOGIN_DATA,
        header_digest: false,
        data_digest: false,
    };
    // The accept loop closes the socket when the login's time is up (`login_timeout` from
    // accept, however the bytes trickle in); the read timeout only bounds each read.
    let deadline = crate::target::login_deadline(&cfg);
    let mut slot = None;
    let session = loop {
        let Some(p) = read_pdu(&mut reader, &login_limits)? else {
            return Ok(());
        };
        if p.bhs.opcode() != op::LOGIN_REQ {
            // Anything but a login before the full feature phase ends the connection.
            return Err(IscsiError::NotLoggedIn(p.bhs.opcode()));
        }
        if Instant::now() >= deadline {
            return Err(IscsiError::Login("login timed out"));
        }
        let mut step = login.step(&p, &lookup);
        if let Some(Outcome::FullFeature(s)) = &step.outcome {
            // Last gate before the full feature phase: the target requires what the session
            // authenticated with, and there is room for one more session.
            let refusal = match required_chap(&shared, s) {
                Err(code) => Some(code),
                Ok(()) => match shared.admit(conn_id) {
                    (Admission::Admitted, s) => {
                        slot = s;
                        None
                    }
                    (Admission::Expired, _) => {
                        return Err(IscsiError::Login("login timed out"));
                    }
                    (Admission::Full, _) => Some(login::status::OUT_OF_RESOURCES),
                },
            };
            if let Some(code) = refusal {
                Login::refuse(&mut step, code);
            }
        }
        let mut out = Vec::new();
        pdu::encode_pdu(&mut out, &step.bhs, &step.data, false, false);
        wr.write_all(&out)?;
        match step.outcome {
            None => {}
            Some(Outcome::Failed(code)) => {
                conn_event!(
                    shared,
                    conn = conn_id,
                    status = format_args!("{code:#06x}"),
                    "iSCSI: login failed"
                );
                return Ok(());
            }
            Some(Outcome::FullFeature(s)) => break *s,
        }
    };
    let _slot = slot;
    match session.kind {
        SessionType::Discovery => full_feature(&shared, stream, reader, session, None, conn_id),
        SessionType::Normal => {
            let Some(vol) = shared.lookup_target(&session.target_name) else {
                return Ok(());
            };
            let lu = shared.lu(&vol)?;
            let port = format!(
                "{},i,0x{}",
                session.initiator_name,
                session
                    .isid
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            shared.reinstate(&port, &session.target_name, conn_id, &stream);
            lu.attach(&port);
            let r = full_feature(
                &shared,
                stream,
                reader,
                session.clone(),
                Some((lu.clone(), port.clone())),
                conn_id,
            );
            lu.detach(&port);
            shared.forget_session(&port, &session.target_name, conn_id);
            r
        }
    }
}

/// Whether the session's CHAP matches what its target requires now (`Err`: the login status).
fn required_chap(shared: &Shared, s: &Session) -> std::result::Result<(), u16> {
    if s.kind == SessionType::Discovery {
        return Ok(());
    }
    let Some(vol) = shared.lookup_target(&s.target_name) else {
        return Err(login::status::NOT_FOUND);
    };
    let cfg = &shared.cfg;
    match cfg.chap.get(&vol).or(cfg.default_chap.as_ref()) {
        Some(c) if s.chap_user.as_deref() != Some(c.user.as_str()) => {
            // Worth an operator's attention whatever the verbosity: a client tried to get around
            // the CHAP its target requires.
            tracing::warn!(
                target_name = %s.target_name,
                initiator = %s.initiator_name,
                "iSCSI: session without the CHAP its target requires refused"
            );
            Err(login::status::AUTH_FAILURE)
        }
        _ => Ok(()),
    }
}

fn full_feature(
    shared: &Arc<Shared>,
    stream: TcpStream,
    mut reader: BufReader<TcpStream>,
    session: Session,
    lu: Option<(Arc<Lu>, String)>,
    _conn_id: u64,
) -> Result<()> {
    let cfg = &shared.cfg;
    let params = session.params.clone();
    let (tx, rx) = crossbeam_channel::unbounded();
    let max_cmd_sn = session
        .exp_cmd_sn
        .wrapping_add(cfg.window.saturating_sub(1));
    let ctx_stream = stream.try_clone()?;
    let ctx = Arc::new_cyclic(|me| Ctx {
        me: me.clone(),
        tx,
        queued: AtomicU32::new(0),
        wstate: Mutex::new(WState {
            buf: Vec::with_capacity(256 << 10),
            stat_sn: session.stat_sn,
            max_cmd_sn,
            broken: false,
        }),
        stream: ctx_stream,
        params: params.clone(),
        exp_cmd_sn: AtomicU32::new(session.exp_cmd_sn),
        inflight: Mutex::new(HashSet::new()),
        inflight_count: AtomicU32::new(0),
        drained: Condvar::new(),
        window: cfg.window,
        last_rx_ms: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let writer = {
        let ctx = ctx.clone();
        let stream = stream.try_clone()?;
        let nop = cfg.nop_interval;
        std::thread::Builder::new()
            .name("iscsi-writer".into())
            .spawn(move || writer_loop(ctx, stream, rx, nop))?
    };
    // A silent initiator is dropped after the NOP-In interval plus its timeout.
    let idle = cfg.nop_interval.map(|i| i + cfg.nop_timeout);
    stream.set_read_timeout(idle)?;
    let limits = pdu::Limits {
        max_data: params.max_recv_data as usize,
        header_digest: params.header_digest,
        data_digest: params.data_digest,
    };
    let mut conn = Conn {
        shared: shared.clone(),
        ctx: ctx.clone(),
        session,
        lu,
        pending: HashMap::new(),
        next_ttt: 1,
        portal: stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    };
    ctx.hold_here(true);
    let result = conn.run(&mut reader, &limits);
    ctx.hold_here(false);
    ctx.release_held();
    // Let engine completions finish before the writer goes.
    ctx.wait_idle();
    let _ = ctx.tx.send(Out::Close);
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(e),
    }
}

fn writer_loop(ctx: Arc<Ctx>, stream: TcpStream, rx: Receiver<Out>, nop: Option<Duration>) {
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

struct Conn {
    shared: Arc<Shared>,
    ctx: Arc<Ctx>,
    session: Session,
    lu: Option<(Arc<Lu>, String)>,
    pending: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    /// `HOST:PORT` this connection arrived on, for SendTargets.
    portal: String,
}

/// Serial number comparison (RFC 1982): a < b.
fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

impl Conn {
    fn run(&mut self, reader: &mut BufReader<TcpStream>, limits: &pdu::Limits) -> Result<()> {
        loop {
            if !whole_pdu_buffered(reader.buffer(), limits) || self.ctx.held() >= MAX_HELD {
                self.ctx.release_held();
            }
            let p = match read_pdu(reader, limits) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(IscsiError::DataDigest { pdu, .. }) => {
                    // ERL 0: reject the PDU, then give up on the connection.
                    self.reject(&pdu.bhs, reject::DATA_DIGEST_ERROR);
                    return Err(IscsiError::Protocol("data digest error"));
                }
                Err(e) => return Err(e),
            };
            self.ctx.touch();
            // Other PDUs (task management, logout, ...) may wait for commands, and their
            // responses must follow those already completed: send what is held first.
            let opcode = p.bhs.opcode();
            if opcode != op::SCSI_CMD && opcode != op::DATA_OUT {
                self.ctx.release_held();
            }
            if !self.handle(p)? {
                return Ok(());
            }
        }
    }

    fn reject(&self, bhs: &Bhs, reason: u8) {
        let mut b = Bhs::new(op::REJECT, 0x80);
        b.0[2] = reason;
        b.set_itt(RESERVED_TAG);
        self.ctx.send(b, Bytes::copy_from_slice(&bhs.0), true);
    }

    /// Handle one PDU; `Ok(false)` ends the connection cleanly.
    fn handle(&mut self, p: Pdu) -> Result<bool> {
        let opcode = p.bhs.opcode();
        let discovery = self.session.kind == SessionType::Discovery;
        match opcode {
            op::NOP_OUT => self.nop_out(p),
            op::SCSI_CMD if !discovery => {
                if let Some(cmd) = self.admit(&p) {
                    self.scsi_command(p, cmd)?;
                }
                Ok(true)
            }
            op::DATA_OUT if !discovery => {
                self.data_out(p)?;
                Ok(true)
            }
            op::TMF_REQ if !discovery => {
                self.admit_sn(&p.bhs);
                self.task_management(&p);
                Ok(true)
            }
            op::TEXT_REQ => {
                self.admit_sn(&p.bhs);
                self.text(&p);
                Ok(true)
            }
            op::LOGOUT_REQ => {
                self.admit_sn(&p.bhs);
                self.ctx.wait_idle();
                self.pending.clear();
                let mut b = Bhs::new(op::LOGOUT_RESP, 0x80);
                b.0[2] = 0; // connection or session closed successfully
                b.set_itt(p.bhs.itt());
                self.ctx.send(b, Bytes::new(), true);
                Ok(false)
            }
            op::LOGIN_REQ => {
                // A login in the full feature phase is a protocol error.
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                Err(IscsiError::Protocol("login request in full feature phase"))
            }
            op::SNACK_REQ => {
                // No SNACK at ErrorRecoveryLevel 0.
                self.reject(&p.bhs, reject::SNACK_REJECT);
                Ok(true)
            }
            _ => {
                self.reject(&p.bhs, reject::COMMAND_NOT_SUPPORTED);
                Ok(true)
            }
        }
    }

    /// CmdSN bookkeeping for non-SCSI requests.
    fn admit_sn(&self, b: &Bhs) {
        let exp = self.ctx.exp_cmd_sn.load(Ordering::Acquire);
        if !b.immediate()
            && !sn_lt(b.cmd_sn(), exp)
            && sn_lt(b.cmd_sn(), exp.wrapping_add(self.ctx.window))
        {
            self.ctx
                .exp_cmd_sn
                .store(b.cmd_sn().wrapping_add(1), Ordering::Release);
        }
    }

    /// Check a SCSI command's CmdSN against the window; `None` drops it silently.
    fn admit(&self, p: &Pdu) -> Option<ScsiCmd> {
        let cmd = match ScsiCmd::parse(p) {
            Ok(c) => c,
            Err(reason) => {
                self.reject(&p.bhs, reason);
                return None;
            }
        };
        let exp = self.ctx.exp_cmd_sn.load(Ordering::Acquire);
        if p.bhs.immediate() {
            return Some(cmd);
        }
        let limit = exp.wrapping_add(self.ctx.window);
        if sn_lt(cmd.cmd_sn, exp) || !sn_lt(cmd.cmd_sn, limit) {
            // Outside the command window: ignore (RFC 7143 §4.2.2.1).
            return None;
        }
        // One connection per session keeps commands in order, so a gap can only come from a
        // PDU we rejected or dropped: move past it rather than stall the window.
        self.ctx
            .exp_cmd_sn
            .store(cmd.cmd_sn.wrapping_add(1), Ordering::Release);
        Some(cmd)
    }

    fn nop_out(&mut self, p: Pdu) -> Result<bool> {
        let itt = p.bhs.itt();
        if itt == RESERVED_TAG {
            // The answer to our ping, or a one-way keep-alive: nothing to send.
            return Ok(true);
        }
        self.admit_sn(&p.bhs);
        let mut b = Bhs::new(op::NOP_IN, 0x80);
        b.set_lun(p.bhs.lun());
        b.set_itt(itt);
        b.set_u32(20, RESERVED_TAG);
        let data = p.data;
        self.ctx.send(b, Bytes::from(data), true);
        Ok(true)
    }

    fn text(&mut self, p: &Pdu) {
        let itt = p.bhs.itt();
        let mut b = Bhs::new(op::TEXT_RESP, 0x80);
        b.set_itt(itt);
        b.set_u32(20, RESERVED_TAG);
        if p.bhs.flags() & 0x40 != 0 {
            // Continued text requests are not supported.
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return;
        }
        let keys = match text::parse(&p.data) {
            Ok(k) => k,
            Err(_) => {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return;
            }
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in &keys {
            if k == "SendTargets" {
                let portal = &self.portal;
                for name in self.shared.target_names() {
                    // A normal session only learns about its own target.
                    let visible = match v.as_str() {
                        "All" if self.session.kind == SessionType::Discovery => true,
                        "All" | "" => name == self.session.target_name,
                        other => other == name,
                    };
                    if visible {
                        out.push(("TargetName".into(), name.clone()));
                        out.push(("TargetAddress".into(), format!("{portal},1")));
                    }
                }
            } else {
                out.push((k.clone(), "NotUnderstood".into()));
            }
        }
        let mut data = text::encode(&out);
        // One PDU only: clip at the initiator's limit on a pair boundary.
        let max = self.ctx.params.max_send_data as usize;
        if data.len() > max {
            let mut cut = 0;
            for (i, b) in data.iter().enumerate() {
                if *b == 0 && i < max {
                    cut = i + 1;
                }
            }
            data.truncate(cut);
        }
        self.ctx.send(b, Bytes::from(data), true);
    }

    fn task_management(&mut self, p: &Pdu) {
        let function = p.bhs.flags() & 0x7f;
        let rtt = p.bhs.u32_at(20);
        let lun = decode_lun(p.bhs.lun());
        let response = match function {
            tmf::ABORT_TASK => {
                if self.pending.remove(&rtt).is_some() {
                    tmf::COMPLETE
                } else {
                    // A running task finishes (its response goes first); then it is gone.
                    let running = self.ctx.inflight.lock().contains(&rtt);
                    if running {
                        let mut f = self.ctx.inflight.lock();
                        while f.contains(&rtt) {
                            self.ctx.drained.wait_for(&mut f, Duration::from_millis(10));
                        }
                    }
                    tmf::NO_TASK
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                self.pending.clear();
                self.ctx.wait_idle();
                tmf::COMPLETE
            }
            tmf::LUN_RESET => {
                if lun != Some(0) {
                    tmf::NO_LUN
                } else {
                    self.pending.clear();
                    self.ctx.wait_idle();
                    if let Some((lu, _)) = &self.lu {
                        lu.reset();
                    }
                    tmf::COMPLETE
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.pending.clear();
                self.ctx.wait_idle();
                if let Some((lu, _)) = &self.lu {
                    lu.reset();
                }
                tmf::COMPLETE
            }
            tmf::CLEAR_ACA => tmf::NOT_SUPPORTED,
            _ => tmf::NOT_SUPPORTED,
        };
        let mut b = Bhs::new(op::TMF_RESP, 0x80);
        b.0[2] = response;
        b.set_itt(p.bhs.itt());
        self.ctx.send(b, Bytes::new(), true);
        if function == tmf::TARGET_COLD_RESET && response == tmf::COMPLETE {
            // A cold reset also ends every session of the target, this one included.
            self.shared.drop_target_sessions(&self.session.target_name);
        }
    }

    fn scsi_command(&mut self, p: Pdu, cmd: ScsiCmd) -> Result<()> {
        let Some(lun) = decode_lun(cmd.lun).filter(|l| *l == 0) else {
            // Only LUN 0 exists. INQUIRY still answers (peripheral qualifier 011b).
            let r = match cmd.cdb.first() {
                Some(0x12) => {
                    let mut d = vec![0u8; 36];
                    d[0] = 0x7f;
                    d[2] = 0x06;
                    d[3] = 0x12;
                    d[4] = 31;
                    Response::data(d)
                }
                Some(0xa0) => scsi_report_luns(&cmd),
                _ => Response::check(sense::LU_NOT_SUPPORTED),
            };
            // Any unsolicited Data-Out that follows is dropped as data of an unknown task.
            self.respond(&cmd, r);
            return Ok(());
        };
        if self.pending.contains_key(&cmd.itt) || self.ctx.inflight.lock().contains(&cmd.itt) {
            // A reused task tag while the task is alive is a protocol error.
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return Ok(());
        }
        if cmd.write {
            let edtl = cmd.edtl as usize;
            let imm = p.data.len();
            if imm > 0 && !self.ctx.params.immediate_data {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol("immediate data without ImmediateData"));
            }
            if imm > edtl || imm > self.ctx.params.first_burst as usize {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol("immediate data beyond the burst"));
            }
            if edtl > self.shared.cfg.max_write_bytes {
                let r = Response::check(sense::INVALID_FIELD_IN_CDB);
                if p.bhs.final_bit() {
                    self.respond(&cmd, r);
                } else {
                    return Err(IscsiError::Protocol("write larger than the target accepts"));
                }
                return Ok(());
            }
            let unsolicited_end = if self.ctx.params.initial_r2t {
                imm
            } else {
                edtl.min(self.ctx.params.first_burst as usize)
            };
            let buf = if imm >= edtl {
                // All the data came with the command (the usual small write): keep its buffer.
                p.data
            } else {
                // Grow with the data rather than trust the announced length up front.
                let mut buf = Vec::with_capacity(edtl.min(self.ctx.params.first_burst as usize));
                buf.extend_from_slice(&p.data);
                buf
            };
            let mut w = PendingWrite {
                cmd,
                lu: lun,
                buf,
                unsolicited_end,
                unsolicited_done: p.bhs.final_bit() || imm >= unsolicited_end,
                next_data_sn: 0,
                r2t: None,
                r2t_sn: 0,
            };
            if w.buf.len() >= edtl {
                self.execute(w.cmd, w.lu, w.buf);
                return Ok(());
            }
            if w.unsolicited_done {
                self.send_r2t(&mut w);
            }
            self.pending.insert(w.cmd.itt, w);
            return Ok(());
        }
        self.execute(cmd, lun, Vec::new());
        Ok(())
    }

    fn send_r2t(&mut self, w: &mut PendingWrite) {
        let offset = w.buf.len();
        let edtl = w.cmd.edtl as usize;
        let len = (edtl - offset).min(self.ctx.params.max_burst as usize);
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        let mut b = Bhs::new(op::R2T, 0x80);
        b.set_lun(w.cmd.lun);
        b.set_itt(w.cmd.itt);
        b.set_u32(20, ttt);
        b.set_u32(36, w.r2t_sn);
        b.set_u32(40, offset as u32);
        b.set_u32(44, len as u32);
        w.r2t_sn = w.r2t_sn.wrapping_add(1);
        w.r2t = Some((ttt, offset + len));
        w.next_data_sn = 0;
        self.ctx.send(b, Bytes::new(), false);
    }

    fn data_out(&mut self, p: Pdu) -> Result<()> {
        let itt = p.bhs.itt();
        let ttt = p.bhs.u32_at(20);
        let data_sn = p.bhs.u32_at(36);
        let offset = p.bhs.u32_at(40) as usize;
        let Some(mut w) = self.pending.remove(&itt) else {
            // Data for a task we do not know (aborted, or never existed).
            if itt == RESERVED_TAG {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            }
            return Ok(());
        };
        let edtl = w.cmd.edtl as usize;
        let end = offset + p.data.len();
        let burst_end = match w.r2t {
            Some((t, e)) if t == ttt => e,
            None if ttt == RESERVED_TAG && !w.unsolicited_done => w.unsolicited_end,
            _ => {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol(
                    "Data-Out with an unexpected transfer tag",
                ));
            }
        };
        if data_sn != w.next_data_sn {
            // A lost or reordered Data-Out: the task fails with a data phase error; later
            // Data-Out of it is dropped as data of an unknown task. The connection goes on.
            self.respond(&w.cmd, Response::check(sense::DATA_PHASE_ERROR));
            return Ok(());
        }
        if offset != w.buf.len() || end > burst_end || end > edtl {
            // DataPDUInOrder=Yes: anything out of order or past the burst is a protocol error,
            // which ends the connection at ErrorRecoveryLevel 0.
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return Err(IscsiError::Protocol(
                "Data-Out out of order or past the burst",
            ));
        }
        w.next_data_sn = w.next_data_sn.wrapping_add(1);
        w.buf.extend_from_slice(&p.data);
        let fin = p.bhs.final_bit();
        if w.buf.len() == burst_end && !fin {
            self.reject(&p.bhs, reject::PROTOCOL_ERROR);
            return Err(IscsiError::Protocol("burst complete without the F bit"));
        }
        if fin {
            if w.buf.len() != burst_end {
                self.reject(&p.bhs, reject::PROTOCOL_ERROR);
                return Err(IscsiError::Protocol("F bit before the end of the burst"));
            }
            if w.r2t.is_none() {
                w.unsolicited_done = true;
            }
            w.r2t = None;
            if w.buf.len() >= edtl {
                self.execute(w.cmd, w.lu, w.buf);
                return Ok(());
            }
            self.send_r2t(&mut w);
        }
        self.pending.insert(itt, w);
        Ok(())
    }

    fn execute(&mut self, cmd: ScsiCmd, _lun: u16, data_out: Vec<u8>) {
        let Some((lu, port)) = self.lu.clone() else {
            self.respond(&cmd, Response::check(sense::LU_NOT_SUPPORTED));
            return;
        };
        if cmd.write && cmd.read {
            // Bidirectional commands are not supported.
            self.respond(&cmd, Response::check(sense::INVALID_FIELD_IN_CDB));
            return;
        }
        let nexus = Nexus {
            port: &port,
            target_name: &self.session.target_name,
        };
        // Commands other than READ and WRITE run here and may wait (SYNCHRONIZE CACHE, UNMAP,
        // ...): send what this thread holds first.
        if !matches!(
            cmd.cdb.first(),
            Some(0x08 | 0x0a | 0x28 | 0x2a | 0xa8 | 0xaa | 0x88 | 0x8a)
        ) {
            self.ctx.release_held();
        }
        match scsi::execute(&lu, &nexus, &cmd.cdb, data_out) {
            Action::Done(r) => self.respond(&cmd, r),
            Action::Read { offset, len } => {
                self.ctx.start(cmd.itt);
                let ctx = self.ctx.clone();
                lu.backend.submit(
                    Request::Read { offset, len },
                    Box::new(move |r| {
                        respond(&ctx, &cmd, scsi::read_response(r, len));
                        finish_after_response(ctx, cmd.itt);
                    }),
                );
            }
            Action::Write { offset, data, fua } => {
                self.ctx.start(cmd.itt);
                let ctx = self.ctx.clone();
                lu.backend.submit(
                    Request::Write { offset, data, fua },
                    Box::new(move |r| {
                        respond(&ctx, &cmd, scsi::write_response(r));
                        finish_after_response(ctx, cmd.itt);
                    }),
                );
            }
        }
    }

    fn respond(&self, cmd: &ScsiCmd, r: Response) {
        respond(&self.ctx, cmd, r)
    }
}

/// End task `itt` once its response has left this thread's hands: on an engine thread the
/// response is sent at the end of the turn, and a reader waiting for the task (logout, task
/// management) must not overtake it with a response of its own.
fn finish_after_response(ctx: Arc<Ctx>, itt: u32) {
    ingot_engine::after_batch(Box::new(move || ctx.finish(itt)));
}

fn scsi_report_luns(cmd: &ScsiCmd) -> Response {
    let alloc = cmd
        .cdb
        .get(6..10)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0);
    let mut d = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    d.truncate(alloc);
    Response::data(d)
}

/// Send Data-In and/or the SCSI Response for a finished command.
fn respond(ctx: &Ctx, cmd: &ScsiCmd, r: Response) {
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
