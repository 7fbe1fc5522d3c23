//! One iSCSI connection: the login phase, then the full feature phase with a reader thread
//! (this one: decodes PDUs, collects Data-Out, runs commands) and a writer thread (sends
//! responses in the order they complete, stamping StatSN / ExpCmdSN / MaxCmdSN).

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod reader;
mod writer;

use parking_lot::{Condvar, Mutex};

use crate::access::Security;
use crate::error::{IscsiError, Result};
use crate::login::{self, Login, LoginConfig, Outcome, Session, SessionType, TargetLookup};
use crate::lu::Lu;
use crate::pdu::{self, op, read_pdu};
use crate::target::{conn_event, Admission, Shared};

use self::reader::Conn;
use self::writer::{writer_loop, Ctx, Out, WState};

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
    // One view of the CHAP secrets and initiator lists for the whole login, even if a reload
    // replaces them meanwhile.
    let security = shared.security();
    let lookup = |name: &str| match shared.lookup_target(name) {
        Some(vol) => TargetLookup::Found(security.chap_for(&vol).cloned()),
        None => TargetLookup::Missing,
    };
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "-".to_string(), |a| a.to_string());
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
        // From the first PDU on (before any CHAP exchange), an initiator that the target's
        // list does not name is refused.
        if !matches!(step.outcome, Some(Outcome::Failed(_))) {
            if let Err(code) = authorized(&shared, &security, &login, &peer) {
                Login::refuse(&mut step, code);
            }
        }
        if let Some(Outcome::FullFeature(s)) = &step.outcome {
            // Last gate before the full feature phase: the target requires what the session
            // authenticated with, and there is room for one more session.
            let refusal = match required_chap(&shared, &security, s) {
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

/// Whether the initiator of a normal session may log in to the target it named (`Err`: the
/// login status). Discovery sessions are open; SendTargets lists only permitted targets.
fn authorized(
    shared: &Shared,
    security: &Security,
    login: &Login,
    peer: &str,
) -> std::result::Result<(), u16> {
    if login.session_type() != Some(SessionType::Normal) {
        return Ok(());
    }
    let (Some(initiator), Some(target)) = (login.initiator_name(), login.target_name()) else {
        return Ok(());
    };
    let Some(vol) = shared.lookup_target(target) else {
        return Ok(());
    };
    if security.access.allows(&vol, initiator) {
        return Ok(());
    }
    tracing::warn!(
        peer,
        initiator,
        volume = %vol,
        "iSCSI: initiator refused by the volume's access list"
    );
    Err(login::status::NOT_AUTHORIZED)
}

/// Whether the session's CHAP matches what its target requires now (`Err`: the login status).
fn required_chap(
    shared: &Shared,
    security: &Security,
    s: &Session,
) -> std::result::Result<(), u16> {
    if s.kind == SessionType::Discovery {
        return Ok(());
    }
    let Some(vol) = shared.lookup_target(&s.target_name) else {
        return Err(login::status::NOT_FOUND);
    };
    match security.chap_for(&vol) {
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
    let portal = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut conn = Conn::new(shared.clone(), ctx.clone(), session, lu, portal);
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
