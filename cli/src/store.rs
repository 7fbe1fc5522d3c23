//! Pools on Ceph (issue 23, first step): `--store rados://POOL/NAME`. The pool's devices stay
//! whole in the local directory; every sync also appends what it covers to a write-once log
//! of RADOS objects under a lease (`ingot_rados`), so that another node can take the pool
//! over with every flushed block (`ingot pool attach`, then `ingot serve`).
//!
//! In the pool directory, `store.json` (0600) names the store and what this node last knew of
//! it: the epoch it served under, the log position it reached, and whether it stopped cleanly
//! with its devices whole. A node that starts serving takes its devices from the store's log
//! unless it was the last to write it and stopped cleanly (after a crash its devices may hold
//! writes the store never got, which a later batch would not carry: the store is the truth).
//! It does so lazily: it reads the log and the tables of the batch objects since the last base
//! (not their data), serves at once, and fetches each range from its object on first read while
//! a filler fetches the rest (`ingot_engine::replica::ColdMap`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ingot_engine::format::{ReplicaBatch, ReplicaCommit, REPLICA_COMMIT_BYTES};
use ingot_engine::replica::{ColdMap, Placed, Replica, Stored};
use ingot_rados::lease::{first_free, holder, read_log, read_log_data};
use ingot_rados::{Cluster, ConnectOptions, Lease, LeaseError, LeaseOptions, Takeover};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::progress::Progress;
use crate::size::human;

pub const STORE_FILE: &str = "store.json";

/// `ingot serve`'s options for a pool on a store.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServeStoreArgs {
    /// A pool on a store (`ingot pool attach`): take its lease at once instead of waiting
    /// for the node that holds it to stop renewing it. Only when that node is known to be
    /// gone or fenced: it is deposed, and cut off from the cluster if this user may
    /// blocklist.
    #[arg(long)]
    pub takeover: bool,
    /// A pool on a store, taken over: fetch ranges from the store only when they are read,
    /// instead of also filling the local directory in the background.
    #[arg(long)]
    pub no_fill: bool,
    /// A pool on a store: when a client's FLUSH or FUA write is answered. `store`: once what
    /// it covers is in the store (survives the loss of this node). `local`: once it is on
    /// this node's flash, the store following behind by up to 256 MiB (survives a crash of
    /// the server, not the loss of the node; a restart after a crash keeps the local devices
    /// and sends the store a new base).
    #[arg(long, value_enum, default_value_t = Durability::Store)]
    pub durability: Durability,
    /// A pool on a store: keep at most SIZE of its devices on this node's flash (e.g. 64G).
    /// Past it, ranges the store holds and no write changed since are dropped from the local
    /// files, the least recently used first, and read back from the store when used: the pool
    /// may be larger than this node's disk. Default: keep everything.
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub local_cache: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    #[default]
    Store,
    Local,
}

/// `rados://POOL/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    pub pool: String,
    pub name: String,
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rados://{}/{}", self.pool, self.name)
    }
}

pub fn parse_url(s: &str) -> Result<StoreUrl, String> {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 100
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if let Some(rest) = s.strip_prefix("rados://") {
        if let Some((pool, name)) = rest.split_once('/') {
            if ok(pool) && ok(name) {
                return Ok(StoreUrl {
                    pool: pool.into(),
                    name: name.into(),
                });
            }
        }
        return Err(format!(
            "{s:?}: expected rados://POOL/NAME (letters, digits, '.', '_' and '-')"
        ));
    }
    if s.starts_with("s3://") {
        return Err(format!(
            "{s:?}: S3 stores are not supported; use rados://POOL/NAME (docs/design/ceph-fencing.md says why)"
        ));
    }
    Err(format!("{s:?}: expected rados://POOL/NAME"))
}

/// How to reach the cluster: `--ceph-conf`, `--ceph-user`, with librados' defaults (and
/// `CEPH_CONF`, `CEPH_ARGS`) when not given.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct CephArgs {
    /// ceph.conf of the cluster (default: librados' search: $CEPH_CONF, /etc/ceph/ceph.conf).
    #[arg(long)]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph client id to connect as (default: admin); its keyring as ceph.conf says.
    #[arg(long)]
    pub ceph_user: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct StoreFile {
    url: String,
    ceph_conf: Option<PathBuf>,
    ceph_user: Option<String>,
    /// The epoch this node last served under (0: never).
    epoch: u64,
    /// The log position this node's devices reflect (its next append when it stopped).
    next_log: u64,
    /// It stopped cleanly: its devices hold nothing the store lacks, and every range the
    /// store has.
    clean: bool,
    /// Its devices were taken from the store lazily and may still lack ranges (holes, or
    /// older bytes): only the store and the serving node's map know which.
    #[serde(default)]
    partial: bool,
    /// It served with local acknowledgement (`--durability local`): after a crash its devices
    /// hold syncs the store may lack.
    #[serde(default)]
    local_ack: bool,
    /// Data bytes the store's history held since its last base when this node last stopped
    /// cleanly (`ReplicaStats::history_bytes`): the next start counts on from there, so that
    /// a pool restarted often still gets a new base.
    #[serde(default)]
    history_bytes: u64,
}

fn read_store_file(dir: &Path) -> Result<Option<StoreFile>> {
    let p = dir.join(STORE_FILE);
    match std::fs::read(&p) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{} is not valid", p.display())
            })?))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn write_store_file(dir: &Path, sf: &StoreFile) -> Result<()> {
    let tmp = dir.join(format!("{STORE_FILE}.tmp"));
    write_private(&tmp, &serde_json::to_vec_pretty(sf)?, false)?;
    std::fs::rename(&tmp, dir.join(STORE_FILE))?;
    // The rename itself survives a power cut only once the directory is synced.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Write `bytes` to a file only its owner may read (0600), synced; `new`: it must not exist.
fn write_private(path: &Path, bytes: &[u8], new: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(!new)
        .create_new(new)
        .truncate(!new)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn connect(url: &StoreUrl, ceph: &CephArgs) -> Result<(Cluster, ingot_rados::Pool)> {
    let c = Cluster::connect(&ConnectOptions {
        conf: ceph.ceph_conf.clone(),
        user: ceph.ceph_user.clone(),
        op_timeout: Some(Duration::from_secs(30)),
    })
    .context("connecting to the Ceph cluster")?;
    let p = c
        .pool(&url.pool)
        .with_context(|| format!("opening RADOS pool {}", url.pool))?;
    Ok((c, p))
}

fn pool_json_oid(url: &StoreUrl) -> String {
    format!("{}.pool.json", url.name)
}

fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

/// The lease period: `INGOT_LEASE_SECS` (tests shorten it), else 15 s.
fn lease_options() -> LeaseOptions {
    let period = std::env::var("INGOT_LEASE_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s >= 0.5)
        .map_or(Duration::from_secs(15), Duration::from_secs_f64);
    LeaseOptions {
        period,
        margin: period / 5,
        ..LeaseOptions::default()
    }
}

/// The pool's replica: the lease, renewed by a thread of its own, and the log it appends to.
pub struct RadosReplica {
    lease: Mutex<Option<Lease>>,
    /// The batch objects of the sync in progress, written side by side by `uploaders`.
    sync: Mutex<SyncState>,
    uploads: Arc<Uploads>,
    uploaders: Mutex<Vec<std::thread::JoinHandle<()>>>,
    jobs: Mutex<Option<crossbeam_channel::Sender<Upload>>>,
    name: String,
    epoch: u64,
    /// The log number where the base being sent starts.
    base_start: Mutex<Option<u64>>,
    /// Log ranges whose batch objects a base made unneeded, for the collector thread.
    gc: Mutex<Option<crossbeam_channel::Sender<u64>>>,
    collector: Mutex<Option<std::thread::JoinHandle<()>>>,
    deleted: Arc<AtomicU64>,
    /// When this node stops acting as the owner: nanoseconds on the boot clock
    /// (`ingot_rados::lease::boot_now`, which counts suspends).
    valid_until: AtomicU64,
    deposed: AtomicBool,
    stop: AtomicBool,
    renewer: Mutex<Option<std::thread::JoinHandle<()>>>,
    dir: PathBuf,
    sf: Mutex<StoreFile>,
    /// Where ranges not fetched yet are (a lazy takeover), and where to read them.
    cold: Mutex<Option<Arc<ColdMap>>>,
    /// The devices were kept after a crash with local acknowledgement: a base is due.
    rebase_now: AtomicBool,
    /// The store's history since its last base as this node found it at start (its last clean
    /// stop's count, or what a takeover listed).
    history: AtomicU64,
    pool: ingot_rados::Pool,
}

/// Batch objects written at once at most (as `rados bench -t 16`).
const UPLOAD_WINDOW: usize = 16;
/// A sync whose one batch is at most this large goes inline in its commit record: one write.
const INLINE_MAX: usize = 256 << 10;

/// A batch object to write: its name and bytes.
type Upload = (String, Vec<u8>);

#[derive(Default)]
struct SyncState {
    /// The next batch object's number (per epoch).
    next: u64,
    /// The sync in progress: its first batch object and how many were sent.
    first: u64,
    count: u32,
    /// A small first batch, kept back in case it is the sync's only one.
    held: Option<(u64, Vec<u8>)>,
}

#[derive(Default)]
struct Uploads {
    state: Mutex<UploadState>,
    done: parking_lot::Condvar,
}

#[derive(Default)]
struct UploadState {
    in_flight: usize,
    failed: Option<String>,
    /// Objects and bytes written to the store (`stats`).
    objects: u64,
    bytes: u64,
}

fn data_oid(name: &str, epoch: u64, n: u64) -> String {
    format!("{name}.data.{epoch:016x}.{n:016x}")
}

impl RadosReplica {
    fn start(
        lease: Lease,
        pool: &ingot_rados::Pool,
        name: &str,
        dir: &Path,
        sf: StoreFile,
    ) -> Arc<RadosReplica> {
        let uploads = Arc::new(Uploads::default());
        let (tx, rx) = crossbeam_channel::bounded::<Upload>(UPLOAD_WINDOW);
        let epoch = lease.epoch();
        let head = lease.head();
        let uploaders = (0..UPLOAD_WINDOW)
            .map(|i| {
                let rx = rx.clone();
                let pool = pool.clone();
                let uploads = uploads.clone();
                std::thread::Builder::new()
                    .name(format!("ingot-upload-{i}"))
                    .spawn(move || {
                        let e = format!("{epoch:020}");
                        for (oid, data) in rx {
                            let r = pool.create_once(&oid, &data, &[("ingot.epoch", e.as_bytes())]);
                            let mut st = uploads.state.lock();
                            st.in_flight -= 1;
                            if r.is_ok() {
                                st.objects += 1;
                                st.bytes += data.len() as u64;
                            }
                            if let Err(e) = r {
                                st.failed.get_or_insert_with(|| format!("{oid}: {e}"));
                            }
                            uploads.done.notify_all();
                        }
                    })
                    .expect("spawn an upload thread")
            })
            .collect();
        // Deletes the batch objects of commits before each new base: no restore replays them
        // again (it starts at the last base), whoever holds the lease, so this needs no lease.
        let (gc_tx, gc_rx) = crossbeam_channel::unbounded::<u64>();
        let deleted = Arc::new(AtomicU64::new(0));
        let collector = {
            let (pool, name, deleted) = (pool.clone(), name.to_string(), deleted.clone());
            std::thread::Builder::new()
                .name("ingot-store-gc".into())
                .spawn(move || {
                    let mut from = head;
                    for upto in gc_rx {
                        match collect(&pool, &name, from, upto, &deleted) {
                            Ok(()) => from = from.max(upto),
                            Err(e) => tracing::warn!(error = %e, "store: deleting what a base made unneeded failed; the next base tries again"),
                        }
                    }
                })
                .expect("spawn the store's collector")
        };
        let r = Arc::new(RadosReplica {
            sync: Mutex::new(SyncState::default()),
            uploads,
            uploaders: Mutex::new(uploaders),
            jobs: Mutex::new(Some(tx)),
            name: name.to_string(),
            epoch,
            base_start: Mutex::new(None),
            gc: Mutex::new(Some(gc_tx)),
            collector: Mutex::new(Some(collector)),
            deleted,
            valid_until: AtomicU64::new(0),
            lease: Mutex::new(None),
            deposed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            renewer: Mutex::new(None),
            dir: dir.to_path_buf(),
            sf: Mutex::new(sf),
            cold: Mutex::new(None),
            rebase_now: AtomicBool::new(false),
            history: AtomicU64::new(0),
            pool: pool.clone(),
        });
        r.set_valid(&lease);
        *r.lease.lock() = Some(lease);
        let period = lease_options().period;
        let me = r.clone();
        let t = std::thread::Builder::new()
            .name("ingot-lease".into())
            .spawn(move || me.renew_loop(period / 4))
            .expect("spawn the lease thread");
        *r.renewer.lock() = Some(t);
        r
    }

    fn set_valid(&self, lease: &Lease) {
        let until = lease.valid_until();
        self.valid_until
            .store(until.as_nanos() as u64, Ordering::Release);
    }

    fn renew_loop(&self, every: Duration) {
        let mut next = Instant::now() + every;
        while !self.stop.load(Ordering::Acquire) && !self.deposed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50).min(every));
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + every;
            let mut guard = self.lease.lock();
            let Some(lease) = guard.as_mut() else { return };
            match lease.renew() {
                Ok(()) => self.set_valid(lease),
                Err(e @ LeaseError::Deposed { .. }) => {
                    tracing::error!(error = %e, "lease lost: this node stops serving the pool");
                    self.deposed.store(true, Ordering::Release);
                    return;
                }
                // The cluster did not answer: try again; the lease runs out meanwhile.
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }

    /// Ranges are about to be dropped from the local files (`--local-cache`): say so in
    /// `store.json` first, so that after a crash from then on the devices count as partial.
    fn note_partial(&self) -> Result<()> {
        let mut sf = self.sf.lock();
        if !sf.partial {
            sf.partial = true;
            if let Err(e) = write_store_file(&self.dir, &sf) {
                sf.partial = false;
                return Err(e);
            }
        }
        Ok(())
    }

    /// A lazy takeover's ranges are all local and synced: say so in `store.json`, so that after
    /// a crash from then on the devices count as whole (with local acknowledgement, they are
    /// kept).
    fn note_whole(&self) -> Result<()> {
        let mut sf = self.sf.lock();
        if sf.partial {
            sf.partial = false;
            if let Err(e) = write_store_file(&self.dir, &sf) {
                sf.partial = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// A clean stop, after the pool's last sync: give the lease back and note whether this
    /// node's devices hold what the store holds (`complete`: the store holds every sync this
    /// node acknowledged, `ReplicaStats::behind`).
    pub fn finish(&self, complete: bool, history_bytes: u64) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        drop(self.gc.lock().take());
        if let Some(t) = self.collector.lock().take() {
            let _ = t.join();
        }
        drop(self.jobs.lock().take());
        for t in std::mem::take(&mut *self.uploaders.lock()) {
            let _ = t.join();
        }
        if let Some(t) = self.renewer.lock().take() {
            let _ = t.join();
        }
        let Some(lease) = self.lease.lock().take() else {
            return Ok(());
        };
        if self.deposed.load(Ordering::Acquire) {
            return Ok(());
        }
        let next = lease.next_log();
        lease.release().context("releasing the lease")?;
        let mut sf = self.sf.lock().clone();
        sf.next_log = next;
        sf.history_bytes = history_bytes;
        // With ranges still cold (or fetched and not synced), the next start lists where they
        // are again: its holes are what is cold.
        // Sealed first: an eviction still running could drop a range after this looked.
        let whole = self.cold.lock().as_ref().is_none_or(|c| c.seal());
        sf.clean = complete;
        sf.partial = !whole;
        // Devices holding syncs the store lacks stay the truth for this node's next start.
        sf.local_ack &= !complete;
        if !complete {
            tracing::error!(
                "the store lacks syncs this node answered (--durability local): only this directory holds them; restart ingot serve here to send them"
            );
        }
        write_store_file(&self.dir, &sf)
    }

    /// The ranges a lazy takeover left in the store, for the pool's devices.
    pub fn cold(&self) -> Option<Arc<ColdMap>> {
        self.cold.lock().clone()
    }

    /// The store's history since its last base when this node started
    /// (`PoolOptions::replica_history_bytes`).
    pub fn history_bytes(&self) -> u64 {
        self.history.load(Ordering::Acquire)
    }

    /// The devices were kept after a crash with local acknowledgement: the pool must send
    /// a base before anything else (`PoolOptions::replica_rebase_now`).
    pub fn rebase_now(&self) -> bool {
        self.rebase_now.load(Ordering::Acquire)
    }
}

impl RadosReplica {
    /// This node can no longer make writes durable: it stops renewing, so that another node
    /// can take the pool over once the lease runs out, rather than holding it while failing
    /// every flush.
    fn give_up(&self, why: impl std::fmt::Display) -> io::Error {
        // A clean stop (`finish`) tears the uploads down under a base or fill still running:
        // their failures are this node's own doing, not a reason to give the pool up.
        if self.stop.load(Ordering::Acquire) {
            return io::Error::other(format!("the pool is stopping: {why}"));
        }
        if !self.deposed.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %why, "the store refused a sync: this node gives the pool up");
        }
        io::Error::other(why.to_string())
    }

    fn send(&self, n: u64, batch: Vec<u8>) -> io::Result<()> {
        self.uploads.state.lock().in_flight += 1;
        let sent = self.jobs.lock().as_ref().map(|tx| {
            tx.send((data_oid(&self.name, self.epoch, n), batch))
                .is_ok()
        });
        if sent != Some(true) {
            self.uploads.state.lock().in_flight -= 1;
            return Err(self.give_up("the pool's uploads were stopped"));
        }
        Ok(())
    }
}

impl Replica for RadosReplica {
    fn put(&self, batch: Vec<u8>) -> io::Result<()> {
        if !self.valid() {
            return Err(self.give_up("this node's lease ran out"));
        }
        let mut sync = self.sync.lock();
        let n = sync.next;
        sync.next += 1;
        if sync.count == 0 && sync.held.is_none() {
            sync.first = n;
            if batch.len() <= INLINE_MAX {
                sync.held = Some((n, batch));
                return Ok(());
            }
        }
        if let Some((h, held)) = sync.held.take() {
            self.send(h, held)?;
            sync.count += 1;
        }
        self.send(n, batch)?;
        sync.count += 1;
        Ok(())
    }

    fn commit(&self) -> io::Result<Vec<Placed>> {
        let mut sync = self.sync.lock();
        let record = match (sync.held.take(), sync.count) {
            (Some((_, b)), 0) => ReplicaCommit::Inline(b),
            (None, 0) => return Ok(Vec::new()),
            (_, count) => ReplicaCommit::Objects {
                epoch: self.epoch,
                first: sync.first,
                count,
            },
        };
        let placed = |n: u64| match &record {
            ReplicaCommit::Objects { first, count, .. } => (*first..first + u64::from(*count))
                .map(|k| Placed {
                    object: data_oid(&self.name, self.epoch, k),
                    at: 0,
                })
                .collect(),
            // The batch follows the record's header in the log object itself.
            _ => vec![Placed {
                object: ingot_rados::lease::log_oid(&self.name, n),
                at: REPLICA_COMMIT_BYTES as u64,
            }],
        };
        sync.count = 0;
        {
            let mut st = self.uploads.state.lock();
            while st.in_flight > 0 {
                self.uploads.done.wait(&mut st);
            }
            if let Some(e) = st.failed.clone() {
                return Err(self.give_up(e));
            }
        }
        let mut guard = self.lease.lock();
        let lease = guard
            .as_mut()
            .ok_or_else(|| self.give_up("the pool's lease was given up"))?;
        let bytes = record.encode();
        let n = lease.append(&bytes).map_err(|e| self.give_up(e))?;
        let mut st = self.uploads.state.lock();
        st.objects += 1;
        st.bytes += bytes.len() as u64;
        Ok(placed(n))
    }

    fn base_begin(&self) {
        // The next commit's log number: the base and everything after it start there.
        let start = self.lease.lock().as_ref().map(|l| l.next_log());
        *self.base_start.lock() = start;
    }

    fn base_end(&self) -> io::Result<()> {
        let Some(start) = self.base_start.lock().take() else {
            return Ok(());
        };
        let mut guard = self.lease.lock();
        let lease = guard
            .as_mut()
            .ok_or_else(|| self.give_up("the pool's lease was given up"))?;
        lease
            .append(&ReplicaCommit::Base { start }.encode())
            .map_err(|e| self.give_up(e))?;
        // The log starts at the base from now on: what came before may go.
        match lease.set_head(start) {
            Ok(()) => {
                if let Some(tx) = self.gc.lock().as_ref() {
                    let _ = tx.send(start);
                }
            }
            Err(e @ LeaseError::Deposed { .. }) => return Err(self.give_up(e)),
            // Only the store's space waits for the next base.
            Err(e) => tracing::warn!(error = %e, "store: raising the log's head failed"),
        }
        Ok(())
    }

    fn stats(&self) -> ingot_engine::ReplicaStats {
        let st = self.uploads.state.lock();
        ingot_engine::ReplicaStats {
            store: self.sf.lock().url.clone(),
            epoch: self.epoch,
            store_objects: st.objects,
            store_deleted_objects: self.deleted.load(Ordering::Relaxed),
            store_bytes: st.bytes,
            uploads_in_flight: st.in_flight as u64,
            ..Default::default()
        }
    }

    fn devices_whole(&self) -> io::Result<()> {
        self.note_whole()
            .map_err(|e| io::Error::other(format!("{e:#}")))
    }

    fn devices_partial(&self) -> io::Result<()> {
        self.note_partial()
            .map_err(|e| io::Error::other(format!("{e:#}")))
    }

    fn fetch(&self, object: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let n = self
                .pool
                .read(object, offset + got as u64, &mut buf[got..])
                .map_err(|e| io::Error::other(e.to_string()))?;
            if n == 0 {
                return Err(io::Error::other(format!(
                    "{object} ends at {} bytes, before {}",
                    offset + got as u64,
                    offset + buf.len() as u64
                )));
            }
            got += n;
        }
        Ok(())
    }

    fn valid(&self) -> bool {
        !self.deposed.load(Ordering::Acquire)
            && (ingot_rados::lease::boot_now().as_nanos() as u64)
                < self.valid_until.load(Ordering::Acquire)
    }
}

/// `ingot serve --read-only` serves the local devices without the lease: refused where they
/// may lack ranges (a lazy takeover not filled, or an attached directory never served).
pub fn refuse_partial(dir: &Path) -> Result<()> {
    if read_store_file(dir)?.is_some_and(|sf| sf.partial) {
        bail!(
            "{} holds only part of its pool (the rest is in {}): serve it with its lease (`ingot serve` without --read-only) until it is filled",
            dir.display(),
            STORE_FILE
        );
    }
    Ok(())
}

/// A pool on a store changes only while `ingot serve` holds its lease: a change made by
/// opening it here would never reach the store.
pub fn refuse_local_write(dir: &Path) -> Result<()> {
    if dir.join(STORE_FILE).exists() {
        bail!(
            "{} is a pool on a store: start `ingot serve --pool {}` and run this command while it serves",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// `ingot pool create --store`: after the pool is created here, put it in the store: take the
/// lease of a new name, store pool.json, send the devices' contents.
pub fn create(dir: &Path, url: &StoreUrl, ceph: &CephArgs) -> Result<()> {
    let (c, p) = connect(url, ceph)?;
    if holder(&p, &url.name)?.is_some() {
        bail!("{url} already holds a pool: attach to it with `ingot pool attach`");
    }
    let lease = Lease::acquire(
        &p,
        &url.name,
        &owner_name(),
        &c.address()?,
        Takeover::Now,
        lease_options(),
        None,
    )?;
    let pool_json = std::fs::read(dir.join(ingot_engine::POOL_FILE))?;
    p.create_once(&pool_json_oid(url), &pool_json, &[])
        .with_context(|| format!("storing {}", pool_json_oid(url)))?;
    let sf = StoreFile {
        url: url.to_string(),
        ceph_conf: ceph.ceph_conf.clone(),
        ceph_user: ceph.ceph_user.clone(),
        epoch: lease.epoch(),
        next_log: lease.next_log(),
        clean: false,
        partial: false,
        local_ack: false,
        history_bytes: 0,
    };
    write_store_file(dir, &sf)?;
    let replica = RadosReplica::start(lease, &p, &url.name, dir, sf);
    let o = ingot_engine::PoolOptions {
        replica: Some(replica.clone()),
        replica_base: true,
        ..Default::default()
    };
    let pool = ingot_engine::Pool::open(dir, &o).context("sending the new pool to the store")?;
    pool.shutdown()
        .context("sending the new pool to the store")?;
    let stats = pool.stats().replica;
    let complete = stats.as_ref().is_some_and(|s| !s.behind);
    drop(pool);
    replica.finish(complete, stats.map_or(0, |s| s.history_bytes))
}

/// `ingot pool attach`: a directory that will serve the pool in the store once it holds the
/// lease (`ingot serve` restores the devices from the store first).
pub fn attach(dir: &Path, url: &StoreUrl, ceph: &CephArgs) -> Result<()> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty", dir.display());
    }
    let (_c, p) = connect(url, ceph)?;
    let pool_json = p
        .read_all(&pool_json_oid(url), 1 << 20)
        .with_context(|| format!("{url} holds no pool (no {})", pool_json_oid(url)))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let relative = serde_json::from_slice::<serde_json::Value>(&pool_json)
        .ok()
        .and_then(|v| {
            v["devices"].as_array().map(|d| {
                d.iter().all(|p| {
                    p.as_str()
                        .is_some_and(|s| !s.starts_with('/') && !s.contains(".."))
                })
            })
        });
    if relative != Some(true) {
        bail!("{url}: its pool.json must name devices inside the pool directory");
    }
    write_private(&dir.join(ingot_engine::POOL_FILE), &pool_json, true)?;
    write_store_file(
        dir,
        &StoreFile {
            url: url.to_string(),
            ceph_conf: ceph.ceph_conf.clone(),
            ceph_user: ceph.ceph_user.clone(),
            epoch: 0,
            next_log: 0,
            clean: false,
            partial: true,
            local_ack: false,
            history_bytes: 0,
        },
    )
}

/// Before `ingot serve` opens a pool directory: if it is on a store, take the lease (waiting
/// for it to run out, or at once with `takeover`), bring the devices up to date from the
/// store's log, and return the replica the pool must sync to.
pub fn prepare_serve(
    dir: &Path,
    takeover: bool,
    durability: Durability,
    local_cache: bool,
) -> Result<Option<Arc<RadosReplica>>> {
    let Some(mut sf) = read_store_file(dir)? else {
        if takeover {
            bail!("--takeover: {} is not a pool on a store", dir.display());
        }
        return Ok(None);
    };
    let url = parse_url(&sf.url).map_err(anyhow::Error::msg)?;
    let ceph = CephArgs {
        ceph_conf: sf.ceph_conf.clone(),
        ceph_user: sf.ceph_user.clone(),
    };
    let (c, p) = connect(&url, &ceph)?;
    let opts = lease_options();
    if let Some((h, _)) = holder(&p, &url.name)? {
        if !h.owner.is_empty() && !takeover {
            tracing::info!(
                store = %url,
                owner = %h.owner,
                "the pool's lease is held: waiting for it to run out ({:?} without renewal; --takeover if that node is gone)",
                opts.period
            );
        }
    }
    let how = if takeover {
        Takeover::Now
    } else {
        Takeover::Wait
    };
    let lease = Lease::acquire(
        &p,
        &url.name,
        &owner_name(),
        &c.address()?,
        how,
        opts,
        Some(&c),
    )?;
    let seal = lease.sealed_at();
    let head = lease.head();
    // Current here only if this node wrote the log last and stopped cleanly: nothing but
    // seals since.
    let mut current = sf.clean && sf.epoch > 0;
    if current {
        for n in sf.next_log..seal {
            match read_log(&p, &url.name, n, 0)? {
                Some(o) if o.seal => {}
                _ => {
                    current = false;
                    break;
                }
            }
        }
    }
    // After a crash with local acknowledgement, with no other owner since: these devices
    // hold syncs this node acknowledged that the store may lack; they are the truth, and the
    // store gets a base of them before anything else.
    let keep = !current
        && sf.local_ack
        && !sf.partial
        && sf.epoch > 0
        && only_mine_since(&p, &url.name, sf.epoch, sf.next_log.max(head), seal)?;
    // As this node's last stop left it (a clean stop may leave it partial: a local cache's
    // holes, or a lazy takeover not filled).
    let sf_partial = sf.partial;
    sf.epoch = lease.epoch();
    sf.next_log = lease.next_log();
    sf.clean = false;
    sf.partial |= !current && !keep;
    // Sticky until a clean stop with nothing behind: a crash during the base, even in store
    // mode, must keep the devices again.
    sf.local_ack = durability == Durability::Local || keep;
    write_store_file(dir, &sf)?;
    // As this directory's last clean stop counted it: used as is only after one (a restore
    // below lists it afresh, and kept devices send a base first).
    let history = sf.history_bytes;
    // Renewed from now on: a restore may take longer than the lease.
    let replica = RadosReplica::start(lease, &p, &url.name, dir, sf);
    replica.history.store(history, Ordering::Release);
    // A directory this node left cleanly keeps its files: a listing says where the store
    // has each range (a local cache drops ranges by it), and which of its holes are cold.
    if keep {
        replica.rebase_now.store(true, Ordering::Release);
        if local_cache {
            // The map the cache fills as it commits, shared so that a clean stop knows
            // whether ranges were dropped.
            *replica.cold.lock() = Some(Arc::new(ColdMap::new(device_paths(dir)?.len())));
        }
    } else if !current || sf_partial || local_cache {
        let (cold, history) = restore_from(dir, &p, &url, head, seal, current)?;
        if !current {
            replica.history.store(history, Ordering::Release);
        }
        if cold.is_empty() && !local_cache {
            // Everything came inline (or as holes): whole already, on disk since the restore.
            replica.note_whole()?;
        } else {
            *replica.cold.lock() = Some(Arc::new(cold));
        }
    }
    if !replica.valid() {
        bail!("the pool's lease was lost while restoring it from {url}");
    }
    tracing::info!(store = %url, restored = !current && !keep, kept_local = keep, "serving the pool from its store");
    Ok(Some(replica))
}

/// Whether the log's records `from..to` are all seals or written under `epoch`: no other owner
/// committed anything since this node's last start under that epoch.
fn only_mine_since(
    p: &ingot_rados::Pool,
    name: &str,
    epoch: u64,
    from: u64,
    to: u64,
) -> Result<bool> {
    let mut at = from;
    while at < to {
        let end = to.min(at + 64);
        let records = parallel(at..end, |n| {
            read_log(p, name, n, 0).map_err(|e| ingot_engine::Error::Io {
                device: 0,
                offset: n,
                source: io::Error::other(e.to_string()),
            })
        })?;
        if records
            .iter()
            .any(|o| o.as_ref().is_none_or(|o| !o.seal && o.epoch != epoch))
        {
            return Ok(false);
        }
        at = end;
    }
    Ok(true)
}

/// Delete the batch objects named by the commits in log numbers `from..upto` (before the log's
/// head, a base's start), and those records: 64 records at a time, their objects before them.
/// Objects already gone are fine.
fn collect(
    pool: &ingot_rados::Pool,
    name: &str,
    from: u64,
    upto: u64,
    deleted: &AtomicU64,
) -> ingot_engine::Result<()> {
    let err = |k: u64, e: String| ingot_engine::Error::Io {
        device: 0,
        offset: k,
        source: io::Error::other(e),
    };
    let mut at = from;
    while at < upto {
        let to = upto.min(at + 64);
        let heads = parallel(at..to, |k| {
            read_log(pool, name, k, REPLICA_COMMIT_BYTES).map_err(|e| err(k, e.to_string()))
        })?;
        let mut oids = Vec::new();
        for o in heads.into_iter().flatten().filter(|o| !o.seal) {
            if let Ok(ReplicaCommit::Objects {
                epoch,
                first,
                count,
            }) = ReplicaCommit::decode(&o.data)
            {
                oids.extend((first..first + u64::from(count)).map(|k| data_oid(name, epoch, k)));
            }
        }
        // The batch objects, then the records that named them (below the log's head now: no
        // restore reads them): a failure leaves the records to name what is left.
        let records: Vec<String> = (at..to)
            .map(|k| ingot_rados::lease::log_oid(name, k))
            .collect();
        for list in [oids, records] {
            for chunk in list.chunks(64) {
                parallel(0..chunk.len() as u64, |k| {
                    match pool.remove(&chunk[k as usize]) {
                        Ok(()) => {
                            deleted.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                        Err(e) if e.not_found() => Ok(()),
                        Err(e) => Err(err(k, format!("{}: {e}", chunk[k as usize]))),
                    }
                })?;
            }
        }
        at = to;
    }
    Ok(())
}

/// `f` over `range` on a thread each, results in order.
fn parallel<T: Send>(
    range: std::ops::Range<u64>,
    f: impl Fn(u64) -> ingot_engine::Result<T> + Sync,
) -> ingot_engine::Result<Vec<T>> {
    std::thread::scope(|sc| {
        let f = &f;
        let hs: Vec<_> = range.map(|k| sc.spawn(move || f(k))).collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or(Err(ingot_engine::Error::Internal {
                    what: "a store reader panicked",
                }))
            })
            .collect()
    })
}

/// Bytes of a batch object read to find its table (one range read for any batch up to a few
/// thousand extents; a larger table is read in a second).
const HEAD_BYTES: usize = 64 << 10;
/// A commit record read in one go: an inline batch and its header, with room to spare.
const RECORD_READ: usize = INLINE_MAX + (64 << 10);
/// Records and batch tables a takeover reads side by side (each a round trip of well under a
/// millisecond: the listing is latency-bound).
const LIST_WINDOW: usize = 64;
/// A batch's table at most: 8 MiB of data in 4 KiB extents.
const TABLE_MAX: usize = 16 << 20;

/// The pool's device files, as its `pool.json` lists them.
fn device_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let pool_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(ingot_engine::POOL_FILE))?)?;
    Ok(pool_json["devices"]
        .as_array()
        .context("pool.json lists no devices")?
        .iter()
        .map(|d| dir.join(d.as_str().unwrap_or_default()))
        .collect())
}

/// Take the devices from the log objects before `end`, lazily: the inline batches are applied,
/// and the batch objects' tables say where each range is (`ColdMap`).
fn restore_from(
    dir: &Path,
    p: &ingot_rados::Pool,
    url: &StoreUrl,
    head: u64,
    end: u64,
    keep: bool,
) -> Result<(ColdMap, u64)> {
    let devices = device_paths(dir)?;
    let end = end.min(first_free(p, &url.name, head)?);
    let io_err = |at: u64, e: String| ingot_engine::Error::Io {
        device: 0,
        offset: at,
        source: io::Error::other(e),
    };
    // Where to start: the start of the last whole base, found from the records' headers,
    // newest first (a later base starts later; everything before it is no longer needed).
    let mut n = head;
    // The record that marks the base whole: its batches (from `n` on, up to it) are the base,
    // the ones after it the history since.
    let mut marker = None;
    let mut at = end;
    'search: while at > head {
        let from = at.saturating_sub(64).max(head);
        let heads = parallel(from..at, |k| {
            read_log_data(p, &url.name, k, REPLICA_COMMIT_BYTES)
                .map_err(|e| io_err(k, e.to_string()))
        })?;
        for (i, data) in heads.into_iter().enumerate().rev() {
            let k = from + i as u64;
            // (A seal reads as empty, and decodes as nothing.)
            if let Some(Ok(ReplicaCommit::Base { start })) = data.map(|d| ReplicaCommit::decode(&d))
            {
                if start < k {
                    n = start;
                    marker = Some(k);
                    break 'search;
                }
            }
        }
        at = from;
    }
    let first = n;
    let started = Instant::now();
    let mut progress = Progress::new();
    // Committed batches still to fetch, in log order: a small sync's inline batch, or a run
    // of batch objects (their tables read LIST_WINDOW at a time, side by side: a commit may name the
    // whole pool).
    // Each with the log record that named it.
    enum Item {
        Inline(Vec<u8>, u64),
        Objects {
            epoch: u64,
            next: u64,
            end: u64,
            record: u64,
        },
    }
    // Bytes of the batches after the base's marker (all of them without a base).
    let history = std::cell::Cell::new(0u64);
    let after_base = |record: u64| marker.is_none_or(|m| record > m);
    let mut items: std::collections::VecDeque<Item> = Default::default();
    let mut ready: std::collections::VecDeque<Stored> = Default::default();
    let mut next = || -> ingot_engine::Result<Option<Stored>> {
        while ready.is_empty() {
            match items.pop_front() {
                Some(Item::Inline(b, record)) => {
                    if after_base(record) {
                        history.set(history.get() + b.len() as u64);
                    }
                    ready.push_back(Stored::Inline {
                        batch: b,
                        object: ingot_rados::lease::log_oid(&url.name, record),
                        at: REPLICA_COMMIT_BYTES as u64,
                    });
                }
                Some(Item::Objects {
                    epoch,
                    next,
                    end,
                    record,
                }) => {
                    let upto = end.min(next + LIST_WINDOW as u64);
                    let stored = parallel(next..upto, |k| {
                        let name = data_oid(&url.name, epoch, k);
                        let e = |e: ingot_rados::Error| io_err(k, format!("{name}: {e}"));
                        let len = p.stat(&name).map_err(e)?;
                        let read = |n: usize| -> ingot_engine::Result<Vec<u8>> {
                            let mut head = vec![0u8; n];
                            let mut got = 0;
                            while got < n {
                                match p.read(&name, got as u64, &mut head[got..]).map_err(e)? {
                                    0 => break,
                                    k => got += k,
                                }
                            }
                            head.truncate(got);
                            Ok(head)
                        };
                        let mut head = read(HEAD_BYTES.min(len as usize))?;
                        let table = ReplicaBatch::table_bytes(&head)?;
                        if table as u64 > len || table > TABLE_MAX {
                            return Err(ingot_engine::Error::Corrupt {
                                what: "a batch object's table is longer than the object",
                            });
                        }
                        if table > head.len() {
                            head = read(table)?;
                        }
                        Ok(Stored::Object { name, head, len })
                    })?;
                    if after_base(record) {
                        let listed: u64 = stored
                            .iter()
                            .map(|s| match s {
                                Stored::Object { len, .. } => *len,
                                Stored::Inline { batch, .. } => batch.len() as u64,
                            })
                            .sum();
                        history.set(history.get() + listed);
                    }
                    ready.extend(stored);
                    if upto < end {
                        items.push_front(Item::Objects {
                            epoch,
                            next: upto,
                            end,
                            record,
                        });
                    }
                }
                None if n >= end => return Ok(None),
                None => {
                    let (from, to) = (n, end.min(n + LIST_WINDOW as u64));
                    n = to;
                    let records = parallel(from..to, |at| {
                        let missing = ingot_engine::Error::Corrupt {
                            what: "a log object missing from the store",
                        };
                        let e = |e: ingot_rados::Error| io_err(at, e.to_string());
                        // One read for a record up to an inline batch's size; the rare larger
                        // one (no writer makes them) is read whole.
                        let data = read_log_data(p, &url.name, at, RECORD_READ)
                            .map_err(e)?
                            .ok_or(missing)?;
                        if data.len() < RECORD_READ {
                            return Ok(data);
                        }
                        Ok(read_log(p, &url.name, at, 64 << 20)
                            .map_err(e)?
                            .ok_or(ingot_engine::Error::Corrupt {
                                what: "a log object missing from the store",
                            })?
                            .data)
                    })?;
                    // (Seals read as empty.)
                    for (record, data) in (from..to).zip(records) {
                        if data.is_empty() {
                            continue;
                        }
                        match ReplicaCommit::decode(&data)? {
                            ReplicaCommit::Inline(b) => items.push_back(Item::Inline(b, record)),
                            ReplicaCommit::Objects {
                                epoch,
                                first,
                                count,
                            } => items.push_back(Item::Objects {
                                epoch,
                                next: first,
                                end: first + u64::from(count),
                                record,
                            }),
                            // A marker only: where a restore may start (found above).
                            ReplicaCommit::Base { .. } => {}
                        }
                    }
                }
            }
        }
        Ok(ready.pop_front())
    };
    // A server still running on the directory is refused rather than truncated under its feet.
    let _lock = ingot_engine::Pool::lock_dir(dir).with_context(|| {
        format!(
            "{} is in use by another ingot process: stop it before restoring the pool here",
            dir.display()
        )
    })?;
    let cold = ingot_engine::replica::restore_cold(
        &devices,
        &mut next,
        &mut |b, bytes| {
            progress.draw(format_args!(
                "taking the pool from {url}: {b} batches, {} listed",
                human(bytes)
            ))
        },
        keep,
    )
    .with_context(|| format!("taking the pool from {url}"))?;
    progress.finish();
    let history = history.get();
    tracing::info!(store = %url, from = first, cold_bytes = cold.cold_bytes(), history_bytes = history, ms = started.elapsed().as_millis() as u64, "took the devices from the store: ranges are fetched as they are read");
    Ok((cold, history))
}
