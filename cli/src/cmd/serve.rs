//! `ingot serve`: open (or create) the pool, start the NBD, iSCSI, metrics and control
//! listeners, and run until SIGINT or SIGTERM; SIGHUP re-reads the settings that can change
//! online (access lists, CHAP secrets).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, FromArgMatches};
use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};
use ingot_iscsi::{ChapConfig, IscsiTarget, Security, TargetConfig as IscsiConfig};
use ingot_nbd::{BoundAddr, ListenAddr, NbdServer, PoolExports, ServerConfig, TlsConfig};

use crate::access::{Allow, Lists};
use crate::control;
use crate::metrics;
use crate::size::{human, parse_size};

const DEFAULT_NBD: &str = "127.0.0.1:10809";
const DEFAULT_POOL_BYTES: u64 = 16 << 30;
const DEFAULT_VOLUME_BYTES: u64 = 8 << 30;
const DEFAULT_VOLUME: &str = "vol0";

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// I/O engine: auto (io_uring when available), uring, sync.
    #[arg(long, default_value = "auto", value_parser = parse_io)]
    io: IoKind,
    /// DRAM read cache size (default: a tenth of available memory, at most 4 GiB).
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Shard workers (default: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Client bytes written between automatic checkpoints; bounds recovery time.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    checkpoint_interval: u64,
    /// RAM for the dedup index (default: 2% of physical memory, at least 64 MiB); past it the
    /// index keeps a sample of fingerprints.
    #[arg(long, value_parser = parse_size)]
    dedup_index_mem: Option<u64>,
    /// RAM for map and block-table leaves, the metadata cache (default: 1/64 of physical memory, at least
    /// 64 MiB). Past it, leaves a checkpoint holds unchanged are evicted and read back from
    /// flash when next used; format 3 pools only.
    #[arg(long, value_parser = parse_size)]
    metadata_cache: Option<u64>,
    /// Write-back buffer: writes without FUA are acknowledged once the engine has taken them,
    /// up to this many bytes not yet on the device; FLUSH, SYNCHRONIZE CACHE and FUA writes
    /// make them durable. 0: acknowledge each write once it is stored (write-through). At most
    /// a sixty-fourth of the pool's usable capacity.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    write_back: u64,
}

impl RunArgs {
    fn options(&self) -> PoolOptions {
        PoolOptions {
            io: self.io,
            shards: self.shards,
            cache_bytes: self.cache_size,
            checkpoint_interval_bytes: self.checkpoint_interval,
            dedup_index_bytes: self.dedup_index_mem,
            metadata_cache_bytes: self.metadata_cache,
            write_back_bytes: self.write_back,
            ..PoolOptions::default()
        }
    }
}

fn parse_io(s: &str) -> Result<IoKind, String> {
    s.parse()
}

/// NBD server settings of `ingot serve`.
#[derive(clap::Args)]
pub struct NbdArgs {
    /// Offer TLS (NBD_OPT_STARTTLS) with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse clients that do not switch to TLS.
    #[arg(long, requires = "tls_cert")]
    tls_required: bool,
    /// Ask TLS clients for a certificate and verify it against the CA certificates in this PEM
    /// file (clients without one may still use volumes that have no access list). Needed by
    /// `--allow VOLUME=tls-subject:DN`.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Connections served at once; more are closed right after accept.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Connections that may be negotiating at once (a budget apart from --max-connections);
    /// over it the oldest handshake is closed. Each handshake gets 10 s in all
    /// (INGOT_HANDSHAKE_TIMEOUT_MS overrides that, for tests).
    #[arg(long, default_value_t = ingot_nbd::DEFAULT_MAX_HANDSHAKES)]
    max_handshakes: usize,
    /// Disconnect clients that send no request for this many seconds while nothing is in
    /// flight (0: never).
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Disconnect clients that stall this many seconds in the middle of a request, or leave a
    /// reply unread that long (0: never).
    #[arg(long, default_value_t = 60)]
    request_timeout: u64,
}

/// Time a client gets for the whole NBD handshake: `INGOT_HANDSHAKE_TIMEOUT_MS` when set (tests
/// shorten it), else the server's default.
fn handshake_timeout() -> Result<std::time::Duration> {
    match std::env::var("INGOT_HANDSHAKE_TIMEOUT_MS") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(std::time::Duration::from_millis(ms)),
            _ => bail!(
                "INGOT_HANDSHAKE_TIMEOUT_MS={v:?}: expected a positive number of milliseconds"
            ),
        },
        Err(_) => Ok(ingot_nbd::DEFAULT_HANDSHAKE_TIMEOUT),
    }
}

/// Access lists of `ingot serve`.
#[derive(clap::Args, Clone)]
pub struct AccessArgs {
    /// Let clients use a volume: VOLUME=RULE, where RULE is uid:UID (an NBD client on a unix
    /// socket running as UID), tls-subject:DN (an NBD client whose TLS certificate, verified
    /// against --tls-client-ca, has exactly this subject) or iqn:NAME (an iSCSI initiator with
    /// this InitiatorName). Repeatable. A volume named by any rule admits only the clients its
    /// rules name, over every protocol; volumes named by none stay open; VOLUME `*` covers
    /// every volume without rules of its own. Re-read on SIGHUP. Example:
    /// --allow vol0=uid:1000 --allow db=tls-subject:CN=db1,O=acme
    /// --allow db=iqn:iqn.2026-01.com.acme:db1
    #[arg(long = "allow", value_name = "VOLUME=RULE", value_parser = crate::access::parse_allow)]
    allow: Vec<Allow>,
}

/// iSCSI target settings of `ingot serve`.
#[derive(clap::Args)]
pub struct IscsiArgs {
    /// Also serve every volume as iSCSI target iqn.2026-11.io.ingot:VOLUME on HOST[:PORT]
    /// (port 3260 when left out; repeatable).
    #[arg(long = "iscsi")]
    iscsi: Vec<String>,
    /// CHAP secrets: lines `VOLUME USER SECRET [MUTUAL_USER MUTUAL_SECRET]`; VOLUME `*` covers
    /// every volume not listed. Listed targets refuse logins without CHAP. Re-read on SIGHUP.
    #[arg(long)]
    iscsi_chap_file: Option<PathBuf>,
}

/// CHAP secrets per volume, and for every other volume (`*`), from a CHAP file.
fn read_chap_file(path: &Path) -> Result<(HashMap<String, ChapConfig>, Option<ChapConfig>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut per_volume = HashMap::new();
    let mut default = None;
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() || f[0].starts_with('#') {
            continue;
        }
        if f.len() != 3 && f.len() != 5 {
            bail!(
                "{}:{}: expected VOLUME USER SECRET [MUTUAL_USER MUTUAL_SECRET]",
                path.display(),
                n + 1
            );
        }
        let chap = ChapConfig {
            user: f[1].to_string(),
            secret: f[2].to_string(),
            mutual: (f.len() == 5).then(|| (f[3].to_string(), f[4].to_string())),
        };
        if f[0] == "*" {
            default = Some(chap);
        } else {
            per_volume.insert(f[0].to_string(), chap);
        }
    }
    Ok((per_volume, default))
}

impl IscsiArgs {
    /// The CHAP secrets of `--iscsi-chap-file` with the initiator lists.
    fn security(&self, lists: &Lists) -> Result<Security> {
        let (chap, default_chap) = match &self.iscsi_chap_file {
            Some(path) => read_chap_file(path)?,
            None => (HashMap::new(), None),
        };
        Ok(Security {
            chap,
            default_chap,
            access: lists.iscsi.clone(),
        })
    }

    /// Start the iSCSI target when `--iscsi` was given.
    fn start(&self, pool: &Arc<Pool>, lists: &Lists) -> Result<Option<IscsiTarget>> {
        if self.iscsi.is_empty() {
            return Ok(None);
        }
        let security = self.security(lists)?;
        let open_volumes: Vec<String> = if security.default_chap.is_some() {
            Vec::new()
        } else {
            pool.stats()
                .volumes
                .iter()
                .filter(|v| !security.chap.contains_key(&v.name))
                .map(|v| v.name.clone())
                .collect()
        };
        let cfg = IscsiConfig {
            chap: security.chap,
            default_chap: security.default_chap,
            access: security.access,
            ..IscsiConfig::default()
        };
        let target = IscsiTarget::new(pool.clone(), cfg);
        for l in &self.iscsi {
            let addr = target
                .listen(l)
                .with_context(|| format!("--iscsi {l}: listening"))?;
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    portal = %addr,
                    volumes_without_chap = open_volumes.join(","),
                    "iSCSI portal reachable beyond loopback and not every volume needs CHAP: \
                     any host that reaches it may log in to those (give every volume CHAP \
                     secrets in --iscsi-chap-file, a `*` line covers all)"
                );
            }
            outln!("ingot: serving iSCSI on {addr}");
        }
        Ok(Some(target))
    }
}

fn dir_is_empty_or_missing(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut it) => it.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Options of `serve` that a reload applies (ids as clap names them); any other that changed
/// is reported and waits for a restart.
const RELOADABLE: &[&str] = &["allow", "iscsi_chap_file", "config"];

/// `serve`'s settings as the configuration file and the command line give them now.
struct Settings {
    /// Every option a reload cannot apply, by id, with its raw values.
    fixed: BTreeMap<String, Vec<OsString>>,
    access: AccessArgs,
    iscsi: IscsiArgs,
}

impl Settings {
    /// Read them again, as `main` did at start: the configuration file, then the command line.
    fn load() -> Result<Settings> {
        let argv = crate::config::expand(std::env::args().collect())?;
        let m = crate::Cli::command()
            .try_get_matches_from(&argv)
            .map_err(|e| anyhow!("{}", e.to_string().trim()))?;
        let Some(sm) = m.subcommand_matches("serve") else {
            bail!("the command line is not `ingot serve`");
        };
        let mut fixed = BTreeMap::new();
        if let Some(cmd) = crate::Cli::command().find_subcommand("serve") {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if RELOADABLE.contains(&id) {
                    continue;
                }
                let values = match sm.try_get_raw(id) {
                    Ok(Some(v)) => v.map(|s| s.to_os_string()).collect(),
                    _ => Vec::new(),
                };
                fixed.insert(id.to_string(), values);
            }
        }
        let cli = crate::Cli::from_arg_matches(&m).map_err(|e| anyhow!("{e}"))?;
        match cli.cmd {
            crate::Cmd::Serve { access, iscsi, .. } => Ok(Settings {
                fixed,
                access,
                iscsi,
            }),
            _ => bail!("the command line is not `ingot serve`"),
        }
    }
}

/// What a reload acts on.
struct Live {
    pool: Arc<Pool>,
    server: NbdServer,
    iscsi: Option<IscsiTarget>,
    /// The settings at start (or at the last reload) that need a restart to change.
    fixed: BTreeMap<String, Vec<OsString>>,
    client_ca: bool,
}

impl Live {
    /// SIGHUP: read the settings again and apply what can change online. Nothing is applied
    /// unless everything parses, so a broken file leaves the old settings in force.
    fn reload(&mut self) {
        match self.try_reload() {
            Ok(()) => {}
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "reload failed: the previous settings stay in force"
            ),
        }
    }

    fn try_reload(&mut self) -> Result<()> {
        let new = Settings::load()?;
        let lists = Lists::build(&new.access.allow, self.client_ca)?;
        let security = match &self.iscsi {
            Some(_) => Some(new.iscsi.security(&lists)?),
            None => None,
        };
        for (key, values) in &new.fixed {
            if self.fixed.get(key) != Some(values) {
                tracing::warn!(
                    option = key.replace('_', "-"),
                    "reload: this setting changed but cannot change while serving; it takes \
                     effect at the next restart"
                );
            }
        }
        self.server.set_access(lists.nbd.clone());
        if let (Some(t), Some(s)) = (&self.iscsi, security) {
            t.set_security(s);
        }
        apply_volume_settings(&self.pool, &new);
        tracing::info!(
            rules = new.access.allow.len(),
            "reloaded: access lists and CHAP secrets apply to new connections and logins"
        );
        // Report each pending change once, not at every reload.
        self.fixed = new.fixed;
        Ok(())
    }
}

/// Per-volume settings of the config file, applied at start and at every reload; none exist yet
/// (QoS limits are not here: they live in the pool, set with `ingot volume set`, and a running
/// server applies them at once).
fn apply_volume_settings(_pool: &Pool, _settings: &Settings) {}

/// Warn about a TCP listener that hosts beyond this one can reach without TLS.
fn warn_if_exposed(addr: &BoundAddr, cfg: &ServerConfig) {
    let BoundAddr::Tcp(sa) = addr else {
        return;
    };
    if sa.ip().is_loopback() {
        return;
    }
    if cfg.tls.is_none() {
        tracing::warn!(
            listener = %sa,
            "NBD listener reachable beyond loopback without TLS: anyone who reaches it can use \
             the volumes without an access list, and data travels in clear (set tls-cert, \
             tls-key and tls-required)"
        );
    } else if !cfg.tls_required {
        tracing::warn!(
            listener = %sa,
            "NBD listener reachable beyond loopback where TLS is offered but not required: \
             clients may connect in clear (set tls-required)"
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn serve(
    dir: &Path,
    nbd: Vec<String>,
    read_only: bool,
    store: &crate::store::ServeStoreArgs,
    metrics_addr: Option<String>,
    nbd_opts: &NbdArgs,
    access: &AccessArgs,
    iscsi: &IscsiArgs,
    run: &RunArgs,
) -> Result<i32> {
    // Before anything is opened: a bad list is a startup error, not a surprise later.
    let lists = Lists::build(&access.allow, nbd_opts.tls_client_ca.is_some())?;
    let baseline = Settings::load().context("reading the settings")?;
    let mut opts = PoolOptions {
        read_only,
        ..run.options()
    };
    if store.local_cache.is_some() && store.durability == crate::store::Durability::Local {
        bail!("--local-cache needs --durability store: a directory that drops ranges cannot be kept as the truth after a crash");
    }
    // A pool on a store: its lease first, and devices brought up to date from the store.
    let replica = if read_only || dir_is_empty_or_missing(dir) {
        if read_only {
            crate::store::refuse_partial(dir)?;
        }
        if read_only && dir.join(crate::store::STORE_FILE).exists() {
            tracing::warn!(
                pool = %dir.display(),
                "serving a pool on a store read-only without its lease: what this directory holds, which may be older than the store"
            );
        }
        None
    } else {
        crate::store::prepare_serve(
            dir,
            store.takeover,
            store.durability,
            store.local_cache.is_some(),
        )?
    };
    if replica.is_none() && store.local_cache.is_some() {
        bail!(
            "--local-cache: {} is not a pool on a store (served with its lease)",
            dir.display()
        );
    }
    if let Some(r) = &replica {
        opts.replica = Some(r.clone());
        opts.replica_cold = r.cold();
        opts.replica_fill = !store.no_fill;
        opts.replica_local_ack = store.durability == crate::store::Durability::Local;
        opts.replica_rebase_now = r.rebase_now();
        opts.replica_history_bytes = r.history_bytes();
        opts.replica_cache_bytes = store.local_cache.unwrap_or(0);
        // Tests shorten the history between bases.
        if let Some(b) = std::env::var("INGOT_REPLICA_REBASE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            opts.replica_rebase_bytes = b;
        }
    }
    let pool = if dir_is_empty_or_missing(dir) {
        if read_only {
            bail!("{} holds no pool to serve read-only", dir.display());
        }
        let c = CreateOptions {
            size_bytes: DEFAULT_POOL_BYTES,
            ..Default::default()
        };
        let p = Pool::create(dir, &c, &opts)
            .with_context(|| format!("creating a pool in {}", dir.display()))?;
        p.create_volume(DEFAULT_VOLUME, DEFAULT_VOLUME_BYTES)?;
        outln!(
            "ingot: created pool {} ({}) with volume {DEFAULT_VOLUME} ({})",
            dir.display(),
            human(DEFAULT_POOL_BYTES),
            human(DEFAULT_VOLUME_BYTES)
        );
        p
    } else {
        if !Pool::exists(dir) {
            bail!(
                "{} is not empty and holds no pool; create one with `ingot pool create --pool {} --size SIZE`",
                dir.display(),
                dir.display()
            );
        }
        Pool::open(dir, &opts).map_err(|e| {
            let full = matches!(&e, ingot_engine::Error::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC));
            let e = anyhow::Error::new(e).context(format!("opening pool {}", dir.display()));
            if full {
                e.context(
                    "the file system under the pool is full: opening it read-write needs room \
                     for a checkpoint; free or add space, or serve it with --read-only",
                )
            } else {
                e
            }
        })?
    };
    crate::release_freed_memory();
    let pool = Arc::new(pool);
    let listens = if nbd.is_empty() {
        vec![DEFAULT_NBD.to_string()]
    } else {
        nbd
    };
    let tls = match (
        &nbd_opts.tls_cert,
        &nbd_opts.tls_key,
        &nbd_opts.tls_client_ca,
    ) {
        (Some(cert), Some(key), None) => Some(
            TlsConfig::from_pem_files(cert, key)
                .with_context(|| format!("loading TLS certificate {}", cert.display()))?,
        ),
        (Some(cert), Some(key), Some(ca)) => Some(
            TlsConfig::from_pem_files_with_client_ca(cert, key, ca).with_context(|| {
                format!(
                    "loading TLS certificate {} and client CA {}",
                    cert.display(),
                    ca.display()
                )
            })?,
        ),
        _ => None,
    };
    let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
    let cfg = ServerConfig {
        read_only,
        tls,
        tls_required: nbd_opts.tls_required,
        access: lists.nbd.clone(),
        max_connections: nbd_opts.max_connections,
        max_handshakes: nbd_opts.max_handshakes,
        handshake_timeout: Some(handshake_timeout()?),
        idle_timeout: secs(nbd_opts.idle_timeout),
        request_timeout: secs(nbd_opts.request_timeout),
        reply_timeout: secs(nbd_opts.request_timeout),
        ..Default::default()
    };
    let server = NbdServer::new(Arc::new(PoolExports::new(pool.clone())), cfg);
    if let Err(e) = control::serve(dir, pool.clone()) {
        // A full host file system cannot take the socket; the volumes are still served, but
        // `volume`, `stats` and `check` cannot reach this server.
        tracing::warn!(
            socket = %control::socket_path(dir).display(),
            error = format!("{e:#}"),
            "no control socket: `ingot volume`, `stats` and `check` cannot reach this server"
        );
    }
    // Registered before any listener is up: from then on SIGHUP means reload, never the
    // default (terminate).
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
    let iscsi_target = iscsi.start(&pool, &lists)?;
    for l in &listens {
        let addr: ListenAddr = l.parse().map_err(|e| anyhow::anyhow!("--nbd {l}: {e}"))?;
        let h = server
            .listen(&addr)
            .with_context(|| format!("listening on {l}"))?;
        warn_if_exposed(h.local_addr(), server.config());
        outln!("ingot: serving NBD on {}", h.local_addr());
    }
    apply_volume_settings(&pool, &baseline);
    if let Some(addr) = metrics_addr {
        let local = metrics::serve(&addr, pool.clone())?;
        outln!("ingot: serving metrics on http://{local}/metrics");
    }
    let s = pool.stats();
    outln!(
        "ingot: pool {} ({} io, {} shards), volumes: {}",
        dir.display(),
        s.io_engine,
        s.shards,
        s.volumes
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(w) = &s.host_warning {
        tracing::warn!(pool = %dir.display(), "{w}");
    }
    // The "serving" lines are what scripts and tests wait for: out before the first request.
    crate::out::flush();
    let mut live = Live {
        pool: pool.clone(),
        server: server.clone(),
        iscsi: iscsi_target,
        fixed: baseline.fixed,
        client_ca: nbd_opts.tls_client_ca.is_some(),
    };
    // Wait for SIGINT or SIGTERM, reloading on SIGHUP.
    let mut notify = crate::notify::Notifier::from_env();
    if let Some(n) = &mut notify {
        n.ready();
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if reload.swap(false, Ordering::Relaxed) {
            if let Some(n) = &notify {
                n.reloading();
            }
            live.reload();
            if let Some(n) = &mut notify {
                n.ready();
            }
        }
        if let Some(n) = &mut notify {
            n.tick(pool.halted_reason().is_none());
        }
    }
    if let Some(n) = &notify {
        n.stopping();
    }
    tracing::info!(pool = %dir.display(), "shutting down");
    server.shutdown();
    if let Some(t) = live.iscsi.take() {
        t.shutdown();
    }
    let _ = std::fs::remove_file(control::socket_path(dir));
    pool.shutdown().context("final checkpoint")?;
    if let Some(r) = replica {
        // With local acknowledgement (a base due after a crash), the store may still be
        // catching up: a clean stop hands over only what the store holds.
        let behind = || pool.stats().replica.is_some_and(|s| s.behind);
        if behind() {
            tracing::info!("waiting for the store to hold every sync this node answered");
        }
        let waiting = std::time::Instant::now();
        let mut said = 0u64;
        while behind()
            && ingot_engine::replica::Replica::valid(&*r)
            && pool.stats().replica.is_some_and(|s| !s.failed)
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // A base that keeps failing holds the stop: say so (a kill leaves the directory
            // to send it at the next start).
            let secs = waiting.elapsed().as_secs();
            if secs >= said + 10 {
                said = secs;
                tracing::warn!(
                    waited_s = secs,
                    "still waiting for the store to hold every sync this node answered"
                );
            }
        }
        // (The pool's own threads may still run a base or a fill: their failures while the
        // replica is taken down are not taken for a lost lease.)
        let history = pool.stats().replica.map_or(0, |s| s.history_bytes);
        r.finish(!behind(), history)?;
    }
    Ok(0)
}
