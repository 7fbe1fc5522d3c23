//! The target: listeners, the volume ↔ target-name mapping, logical units, sessions.
//! Volumes come from a [`LuSource`]; only `engine_backend.rs` knows they are engine volumes.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ingot_engine::Pool;
use parking_lot::{Mutex, RwLock};

use crate::access::{InitiatorAccess, Security};
use crate::backend::LuSource;
use crate::engine_backend::PoolLus;
use crate::error::{IscsiError, Result};
use crate::login::{ChapConfig, OUR_MAX_RECV_DATA};
use crate::lu::Lu;

/// Prefix of every target name: `iqn.2026-11.io.ingot:<volume>`.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.ingot:";
/// Default iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Time a connection has from accept to the full feature phase, whatever it sends meanwhile.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections still logging in at once (a budget apart from established sessions).
pub const MAX_PENDING_LOGINS: usize = 64;

/// Tunables of an [`IscsiTarget`].
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// CHAP secrets per volume name; a volume listed here refuses logins without CHAP.
    pub chap: HashMap<String, ChapConfig>,
    /// CHAP secrets for every volume not in `chap`.
    pub default_chap: Option<ChapConfig>,
    /// Which initiators may log in to which volume (every one when a volume has no list).
    /// `chap`, `default_chap` and `access` are the settings at start:
    /// [`IscsiTarget::set_security`] replaces them for later logins.
    pub access: InitiatorAccess,
    /// Commands each session may have outstanding (the CmdSN window).
    pub window: u32,
    /// Our MaxRecvDataSegmentLength.
    pub max_recv_data: u32,
    /// Largest write (expected data transfer length) accepted.
    pub max_write_bytes: usize,
    /// Time a connection may take from accept to the full feature phase; it is closed then.
    pub login_timeout: Duration,
    /// Connections still logging in at once. When a new one comes and this many are pending,
    /// the oldest pending one is closed: idle half-open logins cannot lock out a real client,
    /// whose login takes milliseconds.
    pub max_pending_logins: usize,
    /// Send a NOP-In after this much silence from the initiator (`None`: never).
    pub nop_interval: Option<Duration>,
    /// Drop the connection when the initiator stays silent this long after a NOP-In.
    pub nop_timeout: Duration,
    /// Sessions in the full feature phase at once; a login beyond them is refused (status
    /// 0x0302, out of resources). Pending logins are counted apart (`max_pending_logins`).
    pub max_connections: usize,
    /// Log connection events (failed logins, timeouts, connection errors) through `tracing`
    /// at info level instead of debug.
    pub verbose: bool,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            chap: HashMap::new(),
            default_chap: None,
            access: InitiatorAccess::open(),
            window: 128,
            max_recv_data: OUR_MAX_RECV_DATA,
            max_write_bytes: ingot_engine::MAX_REQUEST_BYTES as usize,
            login_timeout: LOGIN_TIMEOUT,
            max_pending_logins: MAX_PENDING_LOGINS,
            nop_interval: Some(Duration::from_secs(30)),
            nop_timeout: Duration::from_secs(30),
            max_connections: 256,
            verbose: false,
        }
    }
}

/// When a login accepted now must be over (a huge configured timeout means "in a year", not an
/// overflow).
pub(crate) fn login_deadline(cfg: &TargetConfig) -> Instant {
    let now = Instant::now();
    now.checked_add(cfg.login_timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// State shared by every connection.
pub(crate) struct Shared {
    pub cfg: TargetConfig,
    /// CHAP secrets and initiator lists for new logins (a login keeps the ones in force when
    /// it started).
    security: RwLock<Arc<Security>>,
    source: Arc<dyn LuSource>,
    lus: Mutex<HashMap<String, Arc<Lu>>>,
    tsih: AtomicU16,
    next_conn: AtomicU64,
    stop: AtomicBool,
    /// Live connections (for shutdown and session reinstatement).
    conns: Mutex<HashMap<u64, TcpStream>>,
    /// Normal sessions by (initiator port, target name) → connection id.
    sessions: Mutex<HashMap<(String, String), u64>>,
    /// Connections still logging in → the time their login must be over by. Connection ids
    /// grow with accept time and every login has the same timeout, so the first entry is
    /// both the oldest and the first to expire.
    pending: Mutex<BTreeMap<u64, Instant>>,
    /// Connections in the full feature phase.
    established: AtomicUsize,
}

/// Why a finished login may not start its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted,
    /// The login ran out of time or was evicted by newer logins (its socket is shut down).
    Expired,
    /// `max_connections` sessions are established already.
    Full,
}

/// An established session's place in the budget, given back when dropped.
pub(crate) struct SessionSlot<'a>(&'a Shared);

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        self.0.established.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Log a connection event at info level with [`TargetConfig::verbose`], else at debug: by
/// default a port scanner's half-open logins are no news.
macro_rules! conn_event {
    ($shared:expr, $($arg:tt)+) => {
        if $shared.cfg.verbose {
            tracing::info!($($arg)+)
        } else {
            tracing::debug!($($arg)+)
        }
    };
}
pub(crate) use conn_event;

impl Shared {
    /// A connection was accepted: it is a pending login until [`Shared::admit`]. When the
    /// pending budget is full, the oldest pending login is closed to make room.
    fn add_pending(&self, conn_id: u64) {
        let mut pending = self.pending.lock();
        while pending.len() >= self.cfg.max_pending_logins.max(1) {
            let Some((old, _)) = pending.pop_first() else {
                break;
            };
            self.close(old);
            conn_event!(
                self,
                conn = old,
                "iSCSI: too many pending logins, closed the oldest"
            );
        }
        pending.insert(conn_id, login_deadline(&self.cfg));
    }

    /// Close every pending login whose time is up.
    fn reap_logins(&self) {
        let now = Instant::now();
        let mut pending = self.pending.lock();
        while let Some((&id, &deadline)) = pending.first_key_value() {
            if deadline > now {
                break;
            }
            pending.pop_first();
            self.close(id);
            conn_event!(self, conn = id, "iSCSI: login timed out, connection closed");
        }
    }

    fn close(&self, conn_id: u64) {
        if let Some(s) = self.conns.lock().get(&conn_id) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The login of `conn_id` succeeded: move it from the pending logins to the established
    /// sessions if it is still pending and there is room.
    pub(crate) fn admit(&self, conn_id: u64) -> (Admission, Option<SessionSlot<'_>>) {
        let mut pending = self.pending.lock();
        if pending.remove(&conn_id).is_none() {
            return (Admission::Expired, None);
        }
        if self.established.load(Ordering::Acquire) >= self.cfg.max_connections {
            return (Admission::Full, None);
        }
        self.established.fetch_add(1, Ordering::AcqRel);
        drop(pending);
        (Admission::Admitted, Some(SessionSlot(self)))
    }

    /// The connection ended (whatever phase it was in).
    fn forget_conn(&self, conn_id: u64) {
        self.pending.lock().remove(&conn_id);
        self.conns.lock().remove(&conn_id);
    }

    /// The CHAP secrets and initiator lists in force.
    pub fn security(&self) -> Arc<Security> {
        self.security.read().clone()
    }

    pub fn next_tsih(&self) -> u16 {
        loop {
            let t = self.tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// The volume a target name refers to, if it exists now.
    pub fn lookup_target(&self, name: &str) -> Option<String> {
        let vol = name.strip_prefix(IQN_PREFIX)?;
        self.source.lookup(vol).map(|_| vol.to_string())
    }

    /// Every target (one per volume), looked up now so new volumes appear at once.
    pub fn target_names(&self) -> Vec<String> {
        self.source
            .names()
            .into_iter()
            .map(|v| format!("{IQN_PREFIX}{v}"))
            .collect()
    }

    /// The logical unit of a volume, created on first use.
    pub fn lu(&self, vol: &str) -> Result<Arc<Lu>> {
        let backend = self
            .source
            .lookup(vol)
            .ok_or(IscsiError::Login("target volume disappeared"))?;
        let mut lus = self.lus.lock();
        if let Some(lu) = lus.get(vol) {
            // A volume deleted and created again under the same name gets a fresh unit.
            if lu.backend.is_live() {
                return Ok(lu.clone());
            }
        }
        let lu = Arc::new(Lu::new(backend));
        lus.insert(vol.to_string(), lu.clone());
        Ok(lu)
    }

    /// A new session of the same initiator port to the same target replaces the old one.
    pub fn reinstate(&self, port: &str, target: &str, conn_id: u64, _stream: &TcpStream) {
        let old = self
            .sessions
            .lock()
            .insert((port.to_string(), target.to_string()), conn_id);
        if let Some(old) = old {
            if old != conn_id {
                if let Some(s) = self.conns.lock().get(&old) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }

    pub fn forget_session(&self, port: &str, target: &str, conn_id: u64) {
        let mut s = self.sessions.lock();
        let key = (port.to_string(), target.to_string());
        if s.get(&key) == Some(&conn_id) {
            s.remove(&key);
        }
    }

    /// Close every session of `target` (TARGET COLD RESET).
    pub fn drop_target_sessions(&self, target: &str) {
        let ids: Vec<u64> = self
            .sessions
            .lock()
            .iter()
            .filter(|((_, t), _)| t == target)
            .map(|(_, id)| *id)
            .collect();
        let conns = self.conns.lock();
        for id in ids {
            if let Some(s) = conns.get(&id) {
                let _ = s.shutdown(Shutdown::Read);
            }
        }
    }
}

/// An iSCSI target serving every volume of a pool (or of another [`LuSource`]).
pub struct IscsiTarget {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IscsiTarget {
    /// Serve every volume of `pool`.
    pub fn new(pool: Arc<Pool>, cfg: TargetConfig) -> IscsiTarget {
        IscsiTarget::with_source(PoolLus::new(pool), cfg)
    }

    /// Serve the volumes of `source` (an engine pool, or in-memory units in tests).
    pub fn with_source(source: impl LuSource, mut cfg: TargetConfig) -> IscsiTarget {
        // A window of at least one command, and data segments the RFC allows.
        cfg.window = cfg.window.max(1);
        cfg.max_recv_data = cfg.max_recv_data.clamp(512, (1 << 24) - 1);
        IscsiTarget {
            shared: Arc::new(Shared {
                security: RwLock::new(Arc::new(Security {
                    chap: cfg.chap.clone(),
                    default_chap: cfg.default_chap.clone(),
                    access: cfg.access.clone(),
                })),
                cfg,
                source: Arc::new(source),
                lus: Mutex::new(HashMap::new()),
                tsih: AtomicU16::new(1),
                next_conn: AtomicU64::new(1),
                stop: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                pending: Mutex::new(BTreeMap::new()),
                established: AtomicUsize::new(0),
            }),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Listen on `addr` (`HOST:PORT`; a missing port means 3260) and serve in the background.
    /// Returns the bound address.
    pub fn listen(&self, addr: &str) -> Result<SocketAddr> {
        let addr = if addr
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            addr.to_string()
        } else {
            format!("{addr}:{DEFAULT_PORT}")
        };
        let listener = TcpListener::bind(&addr)?;
        let local = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = self.shared.clone();
        let h = thread::Builder::new()
            .name("iscsi-accept".into())
            .spawn(move || accept_loop(shared, listener))?;
        self.threads.lock().push(h);
        Ok(local)
    }

    /// Replace the CHAP secrets and initiator lists: logins that start from now on are checked
    /// against them; sessions already in the full feature phase go on.
    pub fn set_security(&self, security: Security) {
        *self.shared.security.write() = Arc::new(security);
    }

    /// The CHAP secrets and initiator lists in force.
    pub fn security(&self) -> Arc<Security> {
        self.shared.security()
    }

    /// Stop accepting and close every connection.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        for (_, s) in self.shared.conns.lock().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for IscsiTarget {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    while !shared.stop.load(Ordering::Acquire) {
        shared.reap_logins();
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                shared.conns.lock().insert(id, clone);
                shared.add_pending(id);
                let sh = shared.clone();
                let spawned = thread::Builder::new()
                    .name("iscsi-conn".into())
                    .spawn(move || {
                        if let Err(e) = crate::conn::serve(sh.clone(), stream, id) {
                            conn_event!(sh, conn = id, %peer, error = %e, "iSCSI: connection failed");
                        }
                        sh.forget_conn(id);
                    });
                if spawned.is_err() {
                    shared.close(id);
                    shared.forget_conn(id);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}
