//! Pool creation and open options, the pool directory's `pool.json`, and name and size checks.

use crate::pool::{LOCK_FILE, POOL_FILE};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::SECTOR_BYTES;
use crate::error::{Error, Result};
#[cfg(any(test, feature = "testing"))]
use crate::io::fault::FaultPlan;
use crate::io::IoKind;

pub(crate) const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

/// How to create a pool.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Capacity in bytes (segments); the backing file is this plus 1 MiB of superblocks.
    pub size_bytes: u64,
    /// Segment size, a power of two from 2 MiB to 1 GiB (default 8 MiB).
    pub segment_bytes: u64,
    /// Backing files or block devices; empty: one file `dev0.img` in the pool directory.
    pub devices: Vec<PathBuf>,
    /// Write zeroes over every backing file at creation, so that log writes overwrite written
    /// blocks (on a file system, writing unwritten extents costs ~25% of sequential bandwidth
    /// here). Freed segments are then not punched out of the files. Block devices need none.
    pub prefill: bool,
    /// Overwrite devices that hold data or another pool's superblock (refused otherwise). A
    /// device another open pool uses is refused all the same.
    pub force: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size_bytes: 16 << 30,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            devices: Vec::new(),
            prefill: false,
            force: false,
        }
    }
}

/// How to run an open pool.
#[derive(Clone)]
pub struct PoolOptions {
    pub io: IoKind,
    /// Shard workers; 0 = one per core.
    pub shards: usize,
    /// DRAM read cache; `None` = a tenth of available memory, at most 4 GiB.
    pub cache_bytes: Option<u64>,
    /// Client bytes written between automatic checkpoints (bounds recovery time).
    pub checkpoint_interval_bytes: u64,
    /// Tests (the `testing` feature): inject faults through these rules.
    #[cfg(any(test, feature = "testing"))]
    pub fault: Option<std::sync::Arc<FaultPlan>>,
    /// Tests (the `testing` feature): data entries replay holds from its first walk of the
    /// log before it walks the chains again to apply them (small, to test the second walk).
    #[cfg(any(test, feature = "testing"))]
    pub replay_hold_entries: usize,
    /// Write format 3 checkpoints (metadata pages, only what changed; issue 22), the default:
    /// a new pool is created in it, and a writable open upgrades a format 1 or 2 pool when it
    /// has room (no binary older than this one opens it then). `false` creates format 2 pools
    /// and leaves older ones as they are (tests of the upgrade, `ingot-bench checkpoints`); a
    /// format 3 pool stays format 3 either way.
    pub paged_metadata: bool,
    /// RAM for the dedup index; `None` = 2% of physical memory, at least 64 MiB. Past it the
    /// index keeps a sample of fingerprints (fewer dedup hits, never a failed write).
    pub dedup_index_bytes: Option<u64>,
    /// RAM for map leaves (the metadata cache, issue 22); `None` = 1/64 of physical memory,
    /// at least 64 MiB. Past it, leaves a checkpoint holds unchanged give their entries back
    /// and read them from their page when next used; leaves changed since stay until the next
    /// checkpoint, which comes early when they alone pass it. Format 3 pools only (format 2
    /// keeps every leaf).
    pub metadata_cache_bytes: Option<u64>,
    /// Write-back: most bytes of writes (without FUA) acknowledged once the engine has taken
    /// them, before they are on the device (at most a 64th of the usable capacity); 0
    /// acknowledges every write when it is stored. The block protocols allow it (a flush,
    /// SYNCHRONIZE CACHE or FUA write makes them durable), as a page cache does; a kill -9 may
    /// lose such writes unless flushed.
    pub write_back_bytes: u64,
    /// Open without writing anything (serving read-only, checking): the log is replayed in
    /// memory only, no recovery checkpoint is written, every volume refuses writes and
    /// checkpoints, cleaning and volume changes fail with `ReadOnly`. Works on a pool whose
    /// host file system is full.
    pub read_only: bool,
    /// Append what each sync covers to this replica before the sync completes (a pool on an
    /// object store, issue 23: `replica`).
    pub replica: Option<std::sync::Arc<dyn crate::replica::Replica>>,
    /// The replica does not hold the devices' contents yet: the first sync sends every range
    /// that holds data.
    pub replica_base: bool,
    /// Data bytes committed to the replica after which a new base is sent (once they are also
    /// twice the devices' allocated bytes), so that a restore does not replay the whole history.
    pub replica_rebase_bytes: u64,
    /// Data bytes the replica's history already held since its last base when this open
    /// began (what the node knew of the store's history at start: kept at its last clean stop,
    /// or listed by a takeover). Counted towards `replica_rebase_bytes`: without it, a pool
    /// restarted more often than it wrote twice its data never got a new base, and its history
    /// in the store grew without end.
    pub replica_history_bytes: u64,
    /// After a lazy takeover ([`crate::replica::restore_cold`]): where the devices' ranges
    /// not fetched yet are in the store. Reads fetch them on first use.
    pub replica_cold: Option<std::sync::Arc<crate::replica::ColdMap>>,
    /// With `replica_cold`: a background thread fetches every cold range (the local
    /// directory becomes whole again). Off, only reads fetch.
    pub replica_fill: bool,
    /// Acknowledge clients' syncs (FLUSH, FUA) once they are durable locally, and commit them
    /// to the replica behind (it may fall up to 256 MiB behind): survives a crash of the
    /// process, not the loss of the node. The engine's own syncs (checkpoints) still wait.
    pub replica_local_ack: bool,
    /// Send a base before committing anything else (devices kept after a crash with local
    /// acknowledgement: the store lacks what they acknowledged).
    pub replica_rebase_now: bool,
    /// With `replica`: local device bytes to keep at most (0: all). Past it, clean ranges the
    /// replica holds are dropped from the local files, the least recently used first, and read
    /// back from the store when used (`ingot serve --local-cache`).
    pub replica_cache_bytes: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            io: IoKind::Auto,
            shards: 0,
            cache_bytes: None,
            checkpoint_interval_bytes: 1 << 30,
            #[cfg(any(test, feature = "testing"))]
            fault: None,
            #[cfg(any(test, feature = "testing"))]
            replay_hold_entries: crate::recovery::HOLD_ENTRIES,
            paged_metadata: true,
            dedup_index_bytes: None,
            metadata_cache_bytes: None,
            write_back_bytes: 0,
            read_only: false,
            replica: None,
            replica_base: false,
            replica_rebase_bytes: 4 << 30,
            replica_history_bytes: 0,
            replica_cold: None,
            replica_fill: true,
            replica_local_ack: false,
            replica_rebase_now: false,
            replica_cache_bytes: 0,
        }
    }
}

impl std::fmt::Debug for PoolOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolOptions")
            .field("io", &self.io)
            .field("shards", &self.shards)
            .field("cache_bytes", &self.cache_bytes)
            .field("checkpoint_interval_bytes", &self.checkpoint_interval_bytes)
            .field("write_back_bytes", &self.write_back_bytes)
            .finish()
    }
}

#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct PoolFile {
    pub(crate) format_version: u32,
    pub(crate) devices: Vec<PathBuf>,
    /// The devices were written with zeroes at creation: keep freed segments allocated (a
    /// punched hole would make the next writes there allocate again).
    #[serde(default)]
    pub(crate) prefilled: bool,
    /// The pool's UUID, as in its superblocks: `open` refuses a device of another pool. Absent
    /// in pools made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pool_uuid: Option<String>,
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

pub(crate) fn validate_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::InvalidSize {
            size,
            reason: "must be greater than zero",
        });
    }
    if size % SECTOR_BYTES != 0 {
        return Err(Error::InvalidSize {
            size,
            reason: "must be a multiple of 512",
        });
    }
    if size > 1 << 60 {
        return Err(Error::InvalidSize {
            size,
            reason: "larger than 1 EiB",
        });
    }
    Ok(())
}

pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt; // files of a pool are its owner's only: 0600
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on an fd we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::Locked {
            path: dir.to_path_buf(),
        });
    }
    Ok(f)
}

pub(crate) fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Device paths as given, relative ones inside the pool directory.
pub(crate) fn in_dir(dir: &Path, paths: &[PathBuf]) -> Vec<PathBuf> {
    paths
        .iter()
        .map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                dir.join(p)
            }
        })
        .collect()
}

/// Write pool.json (mode 0600) through a temporary file and a rename.
pub(crate) fn write_pool_file(dir: &Path, pf: &PoolFile) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt; // files of a pool are its owner's only: 0600
    let json = serde_json::to_vec_pretty(pf).unwrap_or_default();
    let tmp = dir.join(format!("{POOL_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp); // a leftover keeps its mode: start afresh, 0600
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        // Durable before it replaces the old one, and the rename durable before return: a
        // power cut must leave one whole pool.json, old or new.
        .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, dir.join(POOL_FILE)))
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|source| Error::File {
            path: dir.join(POOL_FILE),
            source,
        })
}

pub(crate) fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut u);
    }
    u
}

pub(crate) fn default_index_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let total = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    (total / 50).max(64 << 20)
}

pub(crate) fn default_metadata_cache_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let total = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    (total / 64).max(64 << 20)
}

pub(crate) fn default_cache_bytes() -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(1 << 30, |kib| kib * 1024);
    (avail / 10).min(4 << 30)
}
