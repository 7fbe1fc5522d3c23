//! Listeners, connection admission and accounting, and server shutdown.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::access::{AccessRules, Peer, Subject};
use crate::error::{NbdError, Result};
use crate::export::ExportSource;
use crate::handshake::{negotiate, HandshakeCtx, HandshakeIo};
use crate::input::SockReader;
use crate::stream::Stream;
use crate::tls::{self, TlsConfig, TlsReader, TlsWriter};
use crate::transmission::{self, Limits};

/// How often accept threads look at the stop flags.
const ACCEPT_POLL_MS: i32 = 100;
/// Unix socket send buffer asked for (the kernel caps it at net.core.wmem_max): room for a few
/// 1 MiB read replies, so the writer thread is not woken for every 208 KiB the client drains.
const SEND_BUFFER_BYTES: libc::c_int = 4 << 20;
const READ_BUFFER_BYTES: usize = 128 << 10;
/// Default time a client gets to finish the whole handshake, TLS included.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of connections that may be negotiating at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Longest sleep of the handshake reaper while no handshake is pending (it also checks whether
/// the server is gone).
const REAPER_IDLE: Duration = Duration::from_millis(500);

/// Tunables of an [`NbdServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections in transmission at once. While that many are served, further clients are
    /// accepted and closed immediately; a handshake that ends when the limit has been reached
    /// in the meantime is closed too.
    pub max_connections: usize,
    /// Connections still negotiating (TLS included) at once, a budget separate from
    /// `max_connections` so that sockets that never finish the handshake cannot take the
    /// places of real clients. Over it, the oldest handshake is closed to make room.
    pub max_handshakes: usize,
    /// Payload bytes in flight per connection before the server stops reading requests.
    pub max_inflight_bytes: u64,
    /// Largest option the handshake accepts; larger ones end the connection.
    pub max_option_bytes: u32,
    /// Time a client may take for the whole handshake, from accept to the end of option
    /// haggling, TLS included; then its socket is closed (`None`: forever).
    pub handshake_timeout: Option<Duration>,
    /// Serve every export read-only.
    pub read_only: bool,
    /// Offer NBD_OPT_STARTTLS with this certificate.
    pub tls: Option<TlsConfig>,
    /// Refuse everything but NBD_OPT_STARTTLS (and ABORT) until TLS is active.
    pub tls_required: bool,
    /// Which clients may use which export, at start ([`NbdServer::set_access`] replaces it).
    pub access: AccessRules,
    /// Time a client in transmission may send no request while nothing is in flight
    /// (`None`: forever).
    pub idle_timeout: Option<Duration>,
    /// Time a client may stall in the middle of sending a request (`None`: forever).
    pub request_timeout: Option<Duration>,
    /// Time a reply may wait for the client to read it (`None`: forever); a client that does
    /// not read its replies is disconnected after this.
    pub reply_timeout: Option<Duration>,
    /// On [`NbdServer::shutdown`], how long connections get to finish in-flight requests before
    /// their sockets are closed.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_inflight_bytes: 64 << 20,
            max_option_bytes: 64 << 10,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            read_only: false,
            tls: None,
            tls_required: false,
            access: AccessRules::open(),
            idle_timeout: None,
            request_timeout: Some(Duration::from_secs(60)),
            reply_timeout: Some(Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Where to listen: `HOST:PORT`, `[V6ADDR]:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address, `HOST:PORT` (host names are resolved when listening).
    Tcp(String),
    /// A unix socket path; a stale socket file there is removed first.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason| NbdError::BadAddress {
            addr: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty unix socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.parse::<SocketAddr>().is_ok() {
            return Ok(ListenAddr::Tcp(s.to_string()));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT, [IPV6]:PORT or unix:PATH"))?;
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        if host.contains(':') {
            return Err(bad(
                "IPv6 addresses must be written in brackets: [ADDR]:PORT",
            ));
        }
        if port.parse::<u16>().is_err() {
            return Err(bad("invalid port"));
        }
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(a: SocketAddr) -> Self {
        ListenAddr::Tcp(a.to_string())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The address a listener actually bound (with the real port when port 0 was asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "{a}"),
            BoundAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                let peer = Peer {
                    addr: peer.to_string(),
                    ..Peer::default()
                };
                Ok((Stream::Tcp(s), peer))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                let peer = Peer {
                    addr: "unix".to_string(),
                    uid: peer_uid(&s),
                    ..Peer::default()
                };
                Ok((Stream::Unix(s), peer))
            }
        }
    }
}

struct ListenerInner {
    closed: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Socket file to remove on close, with its (device, inode) so a file that replaced ours
    /// is left alone.
    unix_path: Option<(PathBuf, u64, u64)>,
}

impl ListenerInner {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        if let Some((path, dev, ino)) = &self.unix_path {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.dev() == *dev && m.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// A running listener. Dropping the handle keeps it running; call [`ListenerHandle::close`] or
/// [`NbdServer::shutdown`] to stop it.
pub struct ListenerHandle {
    inner: Arc<ListenerInner>,
    local: BoundAddr,
}

impl ListenerHandle {
    /// The bound address (TCP port resolved).
    pub fn local_addr(&self) -> &BoundAddr {
        &self.local
    }

    /// Stop accepting on this listener (existing connections keep running) and remove its unix
    /// socket file.
    pub fn close(&self) {
        self.inner.close();
    }
}

/// A live connection: a handle on its socket so the server can close it.
struct Conn {
    sock: Stream,
    /// Past the handshake (counted in [`Conns::established`]).
    established: bool,
    /// Its handshake was closed by the server (timed out or pushed out).
    cut: bool,
}

/// Live connections, in handshake or transmission.
#[derive(Default)]
struct Conns {
    all: HashMap<u64, Conn>,
    /// Connections still negotiating, by id (ids grow with accept order, so the first is the
    /// oldest), with the instant their handshake time runs out.
    handshaking: BTreeMap<u64, Option<Instant>>,
    /// Connections in transmission.
    established: usize,
}

impl Conns {
    /// Close the socket of handshake `id` and forget it as negotiating; its thread sees the
    /// socket fail and removes the connection.
    fn cut_handshake(&mut self, id: u64) {
        self.handshaking.remove(&id);
        if let Some(c) = self.all.get_mut(&id) {
            c.cut = true;
            c.sock.shutdown(Shutdown::Both);
        }
    }
}

struct Shared {
    source: Arc<dyn ExportSource>,
    cfg: ServerConfig,
    /// The access lists new connections use (a connection keeps those it started with).
    access: RwLock<Arc<AccessRules>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<Conns>,
    conns_cv: Condvar,
    /// Wakes the handshake reaper when a handshake starts.
    reaper_cv: Condvar,
    reaper: Mutex<Option<JoinHandle<()>>>,
    listeners: Mutex<Vec<Arc<ListenerInner>>>,
    stopped: Mutex<bool>,
    stopped_cv: Condvar,
}

/// An NBD server: any number of listeners feeding connections that serve the exports of one
/// [`ExportSource`]. Cheap to clone; clones share the same server.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl NbdServer {
    pub fn new(source: Arc<dyn ExportSource>, cfg: ServerConfig) -> Self {
        NbdServer {
            shared: Arc::new(Shared {
                source,
                access: RwLock::new(Arc::new(cfg.access.clone())),
                cfg,
                stopping: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                conns: Mutex::new(Conns::default()),
                conns_cv: Condvar::new(),
                reaper_cv: Condvar::new(),
                reaper: Mutex::new(None),
                listeners: Mutex::new(Vec::new()),
                stopped: Mutex::new(false),
                stopped_cv: Condvar::new(),
            }),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.shared.cfg
    }

    /// Replace the access lists: connections that start negotiating from now on use them;
    /// connections already established keep their export.
    pub fn set_access(&self, access: AccessRules) {
        *self.shared.access.write() = Arc::new(access);
    }

    /// The access lists in force.
    pub fn access(&self) -> Arc<AccessRules> {
        self.shared.access.read().clone()
    }

    /// Bind `addr` and start accepting connections on a new thread.
    pub fn listen(&self, addr: &ListenAddr) -> io::Result<ListenerHandle> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(io::Error::other("the server is shutting down"));
        }
        let (listener, local, unix_path) = match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a.as_str())?;
                let local = BoundAddr::Tcp(l.local_addr()?);
                (Listener::Tcp(l), local, None)
            }
            ListenAddr::Unix(p) => {
                let l = bind_unix(p)?;
                let m = std::fs::symlink_metadata(p)?;
                (
                    Listener::Unix(l),
                    BoundAddr::Unix(p.clone()),
                    Some((p.clone(), m.dev(), m.ino())),
                )
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l) => l.set_nonblocking(true)?,
        }
        self.start_reaper()?;
        let inner = Arc::new(ListenerInner {
            closed: AtomicBool::new(false),
            thread: Mutex::new(None),
            unix_path,
        });
        let shared = self.shared.clone();
        let thread_inner = inner.clone();
        let handle = thread::Builder::new()
            .name(format!("nbd-accept {local}"))
            .spawn(move || accept_loop(shared, listener, thread_inner))?;
        *inner.thread.lock() = Some(handle);
        self.shared.listeners.lock().push(inner.clone());
        Ok(ListenerHandle { inner, local })
    }

    /// Number of connections currently open (in handshake or transmission).
    pub fn connection_count(&self) -> usize {
        self.shared.conns.lock().all.len()
    }

    /// Number of connections past the handshake (in transmission).
    pub fn transmission_count(&self) -> usize {
        self.shared.conns.lock().established
    }

    /// Number of connections still negotiating.
    pub fn handshake_count(&self) -> usize {
        self.shared.conns.lock().handshaking.len()
    }

    /// Start the thread that closes handshakes whose time ran out (once per server).
    fn start_reaper(&self) -> io::Result<()> {
        let mut slot = self.shared.reaper.lock();
        if slot.is_some() || self.shared.cfg.handshake_timeout.is_none() {
            return Ok(());
        }
        let weak = Arc::downgrade(&self.shared);
        *slot = Some(
            thread::Builder::new()
                .name("nbd-handshake-reaper".into())
                .spawn(move || reap_handshakes(weak))?,
        );
        Ok(())
    }

    /// Stop every listener, let connections finish their in-flight requests (up to
    /// [`ServerConfig::shutdown_grace`]), close them, and return once all are gone.
    pub fn shutdown(&self) {
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::Release);
        let listeners: Vec<_> = shared.listeners.lock().drain(..).collect();
        for l in listeners {
            l.close();
        }
        // Closing the read side ends each reader at its next request; replies still go out.
        for c in shared.conns.lock().all.values() {
            c.sock.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + shared.cfg.shutdown_grace;
        let mut conns = shared.conns.lock();
        while !conns.all.is_empty() {
            if shared.conns_cv.wait_until(&mut conns, deadline).timed_out() {
                break;
            }
        }
        for c in conns.all.values() {
            c.sock.shutdown(Shutdown::Both);
        }
        while !conns.all.is_empty() {
            shared.conns_cv.wait(&mut conns);
        }
        shared.reaper_cv.notify_all();
        drop(conns);
        let reaper = shared.reaper.lock().take();
        if let Some(h) = reaper {
            let _ = h.join();
        }
        *shared.stopped.lock() = true;
        shared.stopped_cv.notify_all();
    }

    /// Block until [`NbdServer::shutdown`] has completed (called from another thread).
    pub fn wait(&self) {
        let mut stopped = self.shared.stopped.lock();
        while !*stopped {
            self.shared.stopped_cv.wait(&mut stopped);
        }
    }
}

/// The uid of the process at the other end of a unix socket (SO_PEERCRED: its credentials when
/// it connected, which it cannot forge).
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` outlive the call and `len` is the size of `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize == std::mem::size_of::<libc::ucred>()).then_some(cred.uid)
}

/// Bind a unix socket, replacing a stale socket file (one nobody listens on).
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server is listening there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Wait up to `timeout_ms` for `fd` to become readable.
fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd that outlives the call; `fd` stays open meanwhile.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0
}

fn accept_loop(shared: Arc<Shared>, listener: Listener, me: Arc<ListenerInner>) {
    loop {
        if shared.stopping.load(Ordering::Acquire) || me.closed.load(Ordering::Acquire) {
            break;
        }
        if !wait_readable(listener.fd(), ACCEPT_POLL_MS) {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => admit(&shared, stream, peer),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn admit(shared: &Arc<Shared>, stream: Stream, peer: Peer) {
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    // Unix sockets only: TCP sizes its buffer itself, and a fixed size would turn that off
    // (and be cut to net.core.wmem_max, 208 KiB by default).
    if let Stream::Unix(s) = &stream {
        let want = SEND_BUFFER_BYTES;
        // SAFETY: `want` outlives the call and the descriptor is open; failure only leaves the
        // system's default size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&want as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    let Ok(control) = stream.try_clone() else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut conns = shared.conns.lock();
        if conns.established >= shared.cfg.max_connections
            || shared.stopping.load(Ordering::Acquire)
        {
            // No room in transmission: close right away (dropping the stream closes it).
            return;
        }
        // Over the handshake budget, the *oldest* handshake is closed, not the new one. Refusing
        // newcomers would let anyone who keeps `max_handshakes` idle sockets open (renewing
        // them as they time out) lock every real client out. Dropping the oldest means a
        // newcomer always gets its turn, and to push a real client out an attacker has to open
        // `max_handshakes` sockets within the few milliseconds that client needs to negotiate;
        // the sockets it already holds buy it nothing.
        while conns.handshaking.len() >= shared.cfg.max_handshakes.max(1) {
            let Some((&oldest, _)) = conns.handshaking.iter().next() else {
                break;
            };
            conns.cut_handshake(oldest);
        }
        let deadline = shared.cfg.handshake_timeout.map(|t| Instant::now() + t);
        conns.all.insert(
            id,
            Conn {
                sock: control,
                established: false,
                cut: false,
            },
        );
        conns.handshaking.insert(id, deadline);
        if conns.handshaking.len() == 1 {
            shared.reaper_cv.notify_all();
        }
    }
    let thread_shared = shared.clone();
    let spawned = thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let res = run_connection(&thread_shared, id, stream, &peer);
            // Handshakes the server cut are not reported one by one: a flood of idle sockets
            // would flood the log too.
            let cut = thread_shared.remove(id);
            if let Err(e) = res {
                if !cut {
                    tracing::warn!(peer = %peer.addr, error = %e, "connection ended with an error");
                }
            }
        });
    if spawned.is_err() {
        let _ = shared.remove(id);
    }
}

impl Shared {
    /// Forget connection `id` and close its socket; true when its handshake had been cut.
    fn remove(&self, id: u64) -> bool {
        let mut conns = self.conns.lock();
        conns.handshaking.remove(&id);
        let mut cut = false;
        if let Some(c) = conns.all.remove(&id) {
            if c.established {
                conns.established -= 1;
            }
            cut = c.cut;
            c.sock.shutdown(Shutdown::Both);
        }
        self.conns_cv.notify_all();
        cut
    }

    /// Move connection `id` from handshake to transmission. False when it may not go on: its
    /// handshake was cut (timed out or pushed out by newer ones) or transmission is full.
    fn establish(&self, id: u64) -> bool {
        let mut conns = self.conns.lock();
        if conns.handshaking.remove(&id).is_none() {
            return false;
        }
        if conns.established >= self.cfg.max_connections {
            return false;
        }
        let Some(c) = conns.all.get_mut(&id) else {
            return false;
        };
        c.established = true;
        conns.established += 1;
        true
    }
}

/// Close handshakes whose time ran out, until the server is shut down or dropped. Socket read
/// timeouts alone would not do: they bound each read, not the handshake, so a client sending a
/// byte now and then (or trickling a TLS handshake) could hold its place forever.
fn reap_handshakes(shared: Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut conns = shared.conns.lock();
        if *shared.stopped.lock()
            || (shared.stopping.load(Ordering::Acquire) && conns.all.is_empty())
        {
            return;
        }
        let now = Instant::now();
        let expired: Vec<u64> = conns
            .handshaking
            .iter()
            .filter(|(_, d)| d.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            conns.cut_handshake(id);
        }
        let next = conns.handshaking.values().flatten().min().copied();
        let wake = next.unwrap_or(now + REAPER_IDLE).min(now + REAPER_IDLE);
        shared.reaper_cv.wait_until(&mut conns, wake);
    }
}

/// A connection's byte streams during negotiation: plain, or TLS after NBD_OPT_STARTTLS.
enum Transport {
    Plain {
        r: BufReader<Stream>,
        w: Stream,
    },
    Tls {
        r: BufReader<TlsReader>,
        w: TlsWriter,
    },
    Closed,
}

struct ConnIo<'a> {
    t: Transport,
    tls: Option<&'a TlsConfig>,
    sock: &'a Stream,
    empty: io::Empty,
    sink: io::Sink,
}

impl HandshakeIo for ConnIo<'_> {
    fn reader(&mut self) -> &mut dyn Read {
        match &mut self.t {
            Transport::Plain { r, .. } => r,
            Transport::Tls { r, .. } => r,
            Transport::Closed => &mut self.empty,
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match &mut self.t {
            Transport::Plain { w, .. } => w,
            Transport::Tls { w, .. } => w,
            Transport::Closed => &mut self.sink,
        }
    }

    fn start_tls(&mut self) -> Result<Option<Subject>> {
        let Some(cfg) = self.tls else {
            return Err(NbdError::Tls(io::ErrorKind::Unsupported.into()));
        };
        match std::mem::replace(&mut self.t, Transport::Closed) {
            Transport::Plain { r, .. } => {
                // Bytes sent before the TLS handshake would otherwise be taken as protected.
                if !r.buffer().is_empty() {
                    return Err(NbdError::DataBeforeTls);
                }
                let a = tls::accept(cfg, self.sock).map_err(NbdError::Tls)?;
                self.t = Transport::Tls {
                    r: BufReader::with_capacity(READ_BUFFER_BYTES, a.reader),
                    w: a.writer,
                };
                Ok(a.subject)
            }
            other => {
                self.t = other;
                Err(NbdError::Tls(io::ErrorKind::AlreadyExists.into()))
            }
        }
    }
}

fn run_connection(shared: &Shared, id: u64, stream: Stream, peer: &Peer) -> Result<()> {
    let cfg = &shared.cfg;
    let access = shared.access.read().clone();
    stream.set_read_timeout(cfg.handshake_timeout)?;
    stream.set_write_timeout(cfg.reply_timeout.or(cfg.handshake_timeout))?;
    let sock = stream.try_clone()?;
    let mut io = ConnIo {
        t: Transport::Plain {
            r: BufReader::with_capacity(READ_BUFFER_BYTES, stream.try_clone()?),
            w: stream,
        },
        tls: cfg.tls.as_ref(),
        sock: &sock,
        empty: io::empty(),
        sink: io::sink(),
    };
    let ctx = HandshakeCtx {
        source: &*shared.source,
        max_option_bytes: cfg.max_option_bytes,
        force_read_only: cfg.read_only,
        stopping: &shared.stopping,
        tls_available: cfg.tls.is_some(),
        tls_required: cfg.tls_required,
        access: &access,
        peer,
        establish: &|| shared.establish(id),
    };
    let Some(neg) = negotiate(&mut io, &ctx)? else {
        return Ok(());
    };
    // One socket timeout serves both transmission timeouts (each is counted in steps of it).
    let read_timeout = match (cfg.idle_timeout, cfg.request_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    sock.set_read_timeout(read_timeout)?;
    sock.set_write_timeout(cfg.reply_timeout)?;
    let limits = Limits {
        max_inflight_bytes: cfg.max_inflight_bytes,
        idle_timeout: cfg.idle_timeout,
        request_timeout: cfg.request_timeout,
    };
    let control = Some(sock.try_clone()?);
    match io.t {
        Transport::Plain { r, w } => {
            // Bytes the handshake's buffer already holds are the first requests.
            let reader = SockReader::new(sock.try_clone()?, r.buffer());
            drop(r);
            let fd = Some(w.as_raw_fd());
            transmission::serve(reader, w, fd, control, neg, limits)
        }
        Transport::Tls { r, w } => transmission::serve(r, w, None, control, neg, limits),
        Transport::Closed => Ok(()),
    }
}
