//! A pool whose flushed bytes also live in an object store, in order (issue 23, first step):
//! every sync of the pool's devices (a client's FLUSH or FUA write, a checkpoint's commit)
//! completes only once the device ranges written since the previous sync are appended to the
//! store as one or more [`ReplicaBatch`]es (`format/replica.rs`). Another node that replays the
//! store's batches in order onto empty devices ([`restore`]) has the pool as it was at the last
//! sync, and opens it as after a crash: the log replays its tail.
//!
//! The store is behind [`Replica`], implemented by the binary (the `ingot` CLI on RADOS, with a
//! lease and a write-once log of batches: a node that lost the lease cannot append, so its
//! syncs, and the flushes that wait for them, fail). The pool's devices stay whole on local
//! flash, except after a lazy takeover ([`restore_cold`]): ranges not fetched yet are read
//! from the store's objects on first use, and a background filler fetches the rest; and with
//! a local cache budget (`PoolOptions::replica_cache_bytes`), past which clean ranges the
//! store holds are dropped from the local files and read back the same way.

mod cold;
mod devices;

pub use cold::{restore_cold, ColdMap, Stored};
pub(crate) use devices::{MirrorDevices, MirrorOptions};

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::format::{ExtentKind, ReplicaBatch};

/// Where a pool's batches go.
pub trait Replica: Send + Sync {
    /// Start storing `batch` (an encoded [`ReplicaBatch`]), the next of the sync in progress.
    /// It may return before the batch is durable (a store may write several side by side,
    /// and should bound how many it holds), and the batch counts only once [`Replica::commit`]
    /// succeeds.
    fn put(&self, batch: Vec<u8>) -> io::Result<()>;
    /// Make every batch put since the last commit durable, as one step after every earlier
    /// one: replayed in the order they were put, or not at all. An error (from here or from
    /// a put) means this node may no longer write the pool (it was deposed, or the store
    /// failed): the sync that asked fails, and so does every later one.
    ///
    /// Returns where each of those batches is now, in the order they were put ([`Replica::fetch`]
    /// reads them there), or nothing if the store cannot say: their ranges then stay on local
    /// flash (a local cache budget drops only ranges it knows where to read back).
    fn commit(&self) -> io::Result<Vec<Placed>>;
    /// Whether this node may still serve the pool by its own clock (its lease holds). Reads
    /// from the devices fail once it does not: another node may have changed the blocks.
    fn valid(&self) -> bool;
    /// What the store side knows for `stats`: its name, the epoch, objects and bytes written
    /// and uploads in flight (the engine fills in the rest).
    fn stats(&self) -> crate::api::ReplicaStats {
        crate::api::ReplicaStats::default()
    }
    /// A new base starts: every commit from the next one on, replayed onto empty devices,
    /// gives the pool (the base's batches hold every range that held data when they were read,
    /// and the commits between them and after hold every change since it started). Nothing
    /// before it is needed once [`Replica::base_end`] succeeds.
    fn base_begin(&self) {}
    /// The base that began last is whole: its batches are committed. A store records that a
    /// restore may start at the base's start, and may drop what came before.
    fn base_end(&self) -> io::Result<()> {
        Ok(())
    }
    /// After a lazy takeover, every range is local and durable: record it where the next start
    /// will look (until this returns, the devices count as partial: with local
    /// acknowledgement, flushes still wait for the store).
    fn devices_whole(&self) -> io::Result<()> {
        Ok(())
    }
    /// Ranges are about to be dropped from the local devices (a local cache budget): record
    /// that they are partial where the next start will look, before any is.
    fn devices_partial(&self) -> io::Result<()> {
        Ok(())
    }
    /// Read `buf.len()` bytes of store object `object` at byte `offset` (a cold range of a
    /// lazy takeover, [`ColdMap`]). A short object is an error.
    fn fetch(&self, object: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _ = (object, offset, buf);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this replica cannot read back from its store",
        ))
    }
}

/// Where a committed batch is in the store: bytes `at..` of object `object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub object: String,
    pub at: u64,
}

/// What a pool's syncs sent, counted by [`MirrorDevices`] (`stats`).
#[derive(Default)]
pub(crate) struct Counters {
    pub sent_bytes: std::sync::atomic::AtomicU64,
    pub batches: std::sync::atomic::AtomicU64,
    pub commits: std::sync::atomic::AtomicU64,
    pub commit_us: std::sync::atomic::AtomicU64,
    pub commit_max_us: std::sync::atomic::AtomicU64,
    pub pending_bytes: std::sync::atomic::AtomicU64,
    pub bases: std::sync::atomic::AtomicU64,
    /// Data bytes committed since the last whole base: counted from this open on, from what
    /// the store held when it began (`PoolOptions::replica_history_bytes`). A restore replays
    /// them; past `PoolOptions::replica_rebase_bytes` (and twice the data) a new base is sent,
    /// which takes off what was counted before it began once it is whole.
    pub history: std::sync::atomic::AtomicU64,
    /// A lazy takeover's cold ranges, or a local cache's.
    pub cold: Option<std::sync::Arc<ColdMap>>,
    /// The local cache budget (0: none), the bytes the local files hold (as last measured),
    /// and the bytes dropped from them.
    pub cache_limit: u64,
    pub local_bytes: std::sync::atomic::AtomicU64,
    pub evicted_bytes: std::sync::atomic::AtomicU64,
    /// Clients' syncs acknowledged before the replica held them (local acknowledgement), and
    /// how many of those the replica holds now.
    pub acked: std::sync::atomic::AtomicU64,
    pub committed: std::sync::atomic::AtomicU64,
    /// A base is due before anything else commits; an upload failed.
    pub holding: std::sync::atomic::AtomicBool,
    pub failed: std::sync::atomic::AtomicBool,
}

impl Counters {
    /// The store's view with these counts filled in.
    pub(crate) fn stats(&self, replica: &dyn Replica) -> crate::api::ReplicaStats {
        use std::sync::atomic::Ordering::Relaxed;
        let commits = self.commits.load(Relaxed);
        crate::api::ReplicaStats {
            sent_bytes: self.sent_bytes.load(Relaxed),
            batches: self.batches.load(Relaxed),
            commits,
            commit_mean_us: self
                .commit_us
                .load(Relaxed)
                .checked_div(commits)
                .unwrap_or(0),
            commit_max_us: self.commit_max_us.load(Relaxed),
            pending_bytes: self.pending_bytes.load(Relaxed),
            bases: self.bases.load(Relaxed),
            history_bytes: self.history.load(Relaxed),
            cold_bytes: self.cold.as_ref().map_or(0, |c| c.cold_bytes()),
            fetched_bytes: self
                .cold
                .as_ref()
                .map_or(0, |c| c.fetched_bytes.load(Relaxed)),
            fetches: self.cold.as_ref().map_or(0, |c| c.fetches.load(Relaxed)),
            local_cache_limit_bytes: self.cache_limit,
            local_bytes: self.local_bytes.load(Relaxed),
            evicted_bytes: self.evicted_bytes.load(Relaxed),
            behind: self.holding.load(Relaxed)
                || self.failed.load(Relaxed)
                || self.committed.load(Relaxed) < self.acked.load(Relaxed),
            failed: self.failed.load(Relaxed),
            ..replica.stats()
        }
    }
}

/// Data bytes per batch at most: objects of the size RADOS writes best (as `rados bench`), many
/// of them side by side for a large sync.
pub const BATCH_DATA_BYTES: usize = 8 << 20;

/// Apply one batch to `files` (the pool's devices, in order), growing each to its listed size.
/// The batch is checked whole (table and every extent's CRC) before anything is written.
pub fn apply_batch(files: &[File], batch: &[u8]) -> Result<()> {
    let (b, at) = ReplicaBatch::decode(batch)?;
    if b.sizes.len() != files.len() {
        return Err(Error::Corrupt {
            what: "replica batch for another number of devices",
        });
    }
    let io = |source: io::Error| Error::Io {
        device: 0,
        offset: 0,
        source,
    };
    for (f, &size) in files.iter().zip(&b.sizes) {
        if f.metadata().map_err(io)?.len() != size {
            f.set_len(size).map_err(io)?;
        }
    }
    for (e, at) in b.extents.iter().zip(at) {
        let f = &files[usize::from(e.dev)];
        match (e.kind, at) {
            (ExtentKind::Data, Some(at)) => f
                .write_all_at(&batch[at..at + e.len as usize], e.offset)
                .map_err(|source| Error::Io {
                    device: e.dev,
                    offset: e.offset,
                    source,
                })?,
            _ => punch(f, e.offset, u64::from(e.len)).map_err(|source| Error::Io {
                device: e.dev,
                offset: e.offset,
                source,
            })?,
        }
    }
    Ok(())
}

fn punch(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // A file system without hole punching: write the zeroes.
    let zero = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zero.len() as u64) as usize;
        f.write_all_at(&zero[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

/// Rebuild a pool's devices from its batches, in store order: create (or truncate) `paths`
/// and apply each batch `next` yields, then sync them. What comes out is the pool at its last
/// replicated sync; open it as usual. The caller holds the pool's lock (`pool.lock`), so that
/// a server still running on the pool is refused, not truncated under its feet.
pub fn restore(
    paths: &[std::path::PathBuf],
    next: &mut dyn FnMut() -> Result<Option<Vec<u8>>>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let files = open_devices(paths, false)?;
    let (mut batches, mut bytes) = (0u64, 0u64);
    while let Some(b) = next()? {
        apply_batch(&files, &b)?;
        batches += 1;
        bytes += b.len() as u64;
        progress(batches, bytes);
    }
    sync_devices(&files, paths)?;
    Ok(batches)
}

/// Make a restore's device files durable.
fn sync_devices(files: &[File], paths: &[std::path::PathBuf]) -> Result<()> {
    for (f, p) in files.iter().zip(paths) {
        f.sync_all().map_err(|source| Error::File {
            path: p.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The pool's device files for a restore: created (or truncated), or with `keep` opened as
/// they are.
fn open_devices(paths: &[std::path::PathBuf], keep: bool) -> Result<Vec<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    paths
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(!keep)
                .truncate(!keep)
                .mode(0o600)
                .open(p)
                .map_err(|source| Error::File {
                    path: p.clone(),
                    source,
                })
        })
        .collect()
}
