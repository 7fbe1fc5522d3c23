//! The pool: opens and admits. It owns the devices, the volume table, the shard workers and
//! the background threads, and hands each subsystem the parts it needs.

mod admin;
mod create;
mod open;
mod options;
mod scrub;
mod stats;
mod threads;

pub(crate) use options::*;
pub use options::{CreateOptions, PoolOptions};
pub(crate) use threads::*;

use crate::{
    checkpoint::CkptState,
    counters::{Counters, ShardStats},
    space::Geometry,
};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::format::{LogKey, Superblock};
use crate::io::claim::DeviceClaim;
use crate::io::SharedDevices;
use crate::job::FlushMsg;
use crate::reduce::DedupIndex;
use crate::shard::ShardMsg;
use crate::space::Space;
use crate::volume::VolumeState;

/// Name of the file in the pool directory that lists the devices.
pub const POOL_FILE: &str = "pool.json";

pub(crate) const LOCK_FILE: &str = "pool.lock";

pub(crate) struct VolumeTable {
    pub(crate) by_name: BTreeMap<String, Arc<VolumeState>>,
    pub(crate) next_id: u32,
}

pub(crate) struct Inner {
    pub devices: SharedDevices,
    pub geo: Geometry,
    pub pool_uuid: [u8; 16],
    /// Seals segment headers and records (see `format::LogKey`).
    pub log_key: LogKey,
    /// Makes segment nonces unique should the kernel's random source ever fail.
    pub(crate) nonce_counter: AtomicU64,
    /// Opened read-only: nothing is ever written (see `PoolOptions::read_only`).
    pub read_only: bool,
    /// The file system under the backing files is short of room (see `refresh_host_space`):
    /// no write is acknowledged before it is stored, so a write that finds no room fails with
    /// ENOSPC instead of being lost after its acknowledgement.
    pub host_tight: AtomicBool,
    /// Bytes free on the host file systems and bytes of the backing files still unallocated,
    /// as last seen (summed over devices; 0 for block devices).
    pub(crate) host_free: AtomicU64,
    pub(crate) host_unallocated: AtomicU64,
    /// When host space was last looked at (ms since `host_epoch`).
    pub(crate) host_seen_ms: AtomicU64,
    /// When the last checkpoint was committed (ms since `host_epoch`).
    pub(crate) ckpt_at_ms: AtomicU64,
    pub(crate) host_epoch: std::time::Instant,
    pub epoch: u64,
    pub space: Mutex<Space>,
    /// Next sequence number to assign.
    pub seq: AtomicU64,
    pub shard_stats: Vec<ShardStats>,
    /// Each shard's block cache. The shard fills it; front-end threads read cached blocks from
    /// it directly ([`crate::Volume::submit`]), saving the hand-off to the shard and back.
    pub caches: Vec<Mutex<BlockCache>>,
    pub counters: Counters,
    pub flusher: Sender<FlushMsg>,
    pub chain_broken: AtomicBool,
    /// One per chain: the data shards, then the mover (see `Inner::mover`).
    pub(crate) senders: Vec<Sender<ShardMsg>>,
    pub(crate) data_shards: usize,
    pub(crate) volumes: RwLock<VolumeTable>,
    pub(crate) ckpt: Mutex<CkptState>,
    pub(crate) superblocks: Vec<Superblock>,
    pub(crate) closed: AtomicBool,
    pub(crate) kick: Sender<CkptMsg>,
    /// A checkpoint was asked for. The kick channel holds one message, so a `Kick` sent while
    /// a `Space` waits there would be lost: a mover chain left without a next segment then
    /// waited for a checkpoint nobody took, and writes at 90% full stalled for up to 30 s.
    pub(crate) ckpt_wanted: AtomicBool,
    pub(crate) cache_capacity: u64,
    pub(crate) checkpoint_interval: u64,
    /// Punch freed segments out of the backing files (not for prefilled pools).
    pub(crate) discard_freed: bool,
    /// One cleaning pass at a time (the checkpointer's and `ingot gc`'s).
    pub(crate) gc_lock: Mutex<()>,
    /// The last automatic cleaning pass freed nothing: writes waiting for space fail now.
    pub gc_stuck: AtomicBool,
    /// Payload bytes the pool stores before writes of new blocks fail (see `usable_bytes`).
    pub usable_bytes: u64,
    /// Fingerprint key -> block id hints (see `reduce`). Never held while taking `space`.
    pub dedup: Mutex<DedupIndex>,
    /// Bits of the fingerprint the index keys on (all; none when tests force collisions).
    pub(crate) dedup_key_mask: u64,
    /// Why the pool stopped taking requests (an engine thread panicked), once it has.
    pub(crate) fault: Mutex<Option<String>>,
    pub(crate) faulted: AtomicBool,
    /// Write-back limit (`PoolOptions::write_back_bytes`); 0: off.
    pub(crate) write_back_limit: u64,
    /// Bytes and requests acknowledged early whose records have not all applied yet.
    pub(crate) wb_bytes: AtomicU64,
    pub(crate) wb_jobs: AtomicU64,
    /// Writes acknowledged early since open.
    pub(crate) wb_total: AtomicU64,
    /// Early writes not yet applied, counted per block in slots hashed from (volume, LBA): a
    /// read whose blocks all count zero may be served from the cache on the caller's thread,
    /// as no early write to them can still be on its way to the map. Without it, every read
    /// went through the shards while any early write was outstanding: 4k reads at QD1 waited
    /// behind the writes queued there (p99 3.4 ms during 120k overwrites a second).
    pub(crate) wb_pending: Box<[AtomicU32]>,
    /// Free segments early writes leave alone: the data reserve and one more (a segment may be
    /// taken between two looks; shards look again at every roll-over, the cleaner at every
    /// free), kept by the checkpointer (computing the reserve walks the maps). Early writes
    /// hold at most the free space above it, so that they do not wait for the cleaner (with a
    /// segment per chain instead, 85-87% of 4k overwrites at 90% full went early, 93-94% now).
    pub(crate) wb_min_free: AtomicUsize,
    /// Bytes early writes may hold now (see `note_write_back_room`); read without the space
    /// lock.
    pub(crate) wb_budget: AtomicU64,
}

/// End of the reason a shard records as it unwinds, before its supervisor knows why.
pub(crate) const FAULT_PLACEHOLDER: &str = "(see the log for the message)";

impl Inner {
    /// A nonce for a new use of `segment`: random, else (getrandom failing) a MAC of the
    /// epoch, the segment and a counter, which is still unique and unguessable without the key.
    pub fn segment_nonce(&self, segment: u32) -> [u8; 16] {
        crate::format::random_bytes().unwrap_or_else(|_| {
            let n = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
            crate::format::log_mac(
                &self.log_key,
                b"ingot segment nonce",
                &[
                    &self.epoch.to_le_bytes(),
                    &segment.to_le_bytes(),
                    &n.to_le_bytes(),
                ],
            )
        })
    }

    /// Make every completed write durable, on this thread: the cleaner's flush. Writes
    /// acknowledged early and not yet stored are not waited for (the shards may be waiting for
    /// the space the cleaner is about to free).
    pub(crate) fn sync_completed(&self) -> Result<()> {
        let applied: Vec<u64> = self
            .shard_stats
            .iter()
            .map(|s| s.applied_shard_seq.load(Ordering::Acquire))
            .collect();
        // A failed record left a gap in a chain: only a checkpoint makes what follows it
        // recoverable, so a flush must wait for one.
        let r = if self.is_faulted() {
            Err(self.halted())
        } else if self.chain_broken.load(Ordering::Acquire) {
            self.checkpoint_with(None)
        } else {
            self.sync()
        };
        if r.is_ok() {
            for (s, a) in self.shard_stats.iter().zip(applied) {
                s.durable_shard_seq.fetch_max(a, Ordering::AcqRel);
            }
        }
        r
    }

    /// Make every completed write durable through the flusher (which checkpoints instead of
    /// syncing when a failed record broke a chain), writes acknowledged early included.
    pub(crate) fn flush(&self) -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let done: crate::api::Completion = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if let Err(crossbeam_channel::SendError(FlushMsg::Flush(done))) = self
            .flusher
            .send(FlushMsg::Flush(crate::job::Answer::new(done)))
        {
            done.send(Err(Error::ShutDown));
        }
        rx.recv().unwrap_or(Err(Error::ShutDown)).map(|_| ())
    }

    /// Wait until every write acknowledged early so far is applied (in the maps, on the
    /// device), so that a flush covers it and block status reports it. Fails when one was
    /// lost (the pool is then halted).
    pub(crate) fn settle_writes(&self) -> Result<()> {
        if self.wb_jobs.load(Ordering::Acquire) == 0 {
            // A lost early write halts the pool before it leaves the count.
            return if self.is_faulted() {
                Err(self.halted())
            } else {
                Ok(())
            };
        }
        if crate::shard::on_shard_thread() {
            // A shard waiting for shards (itself among them) would wait forever.
            return Err(Error::Io {
                device: 0,
                offset: 0,
                source: std::io::Error::other(
                    "waiting for early writes on an engine thread (a front-end bug)",
                ),
            });
        }
        let answered = self.ask_shards(self.shards(), ShardMsg::Settle);
        if self.is_faulted() {
            return Err(self.halted());
        }
        if !answered {
            return Err(Error::ShutDown);
        }
        Ok(())
    }

    /// Send `msg` to the first `chains` shards and wait for every answer; false when a shard
    /// dropped one (it stopped).
    pub(crate) fn ask_shards(&self, chains: usize, msg: fn(Sender<()>) -> ShardMsg) -> bool {
        let waits: Vec<_> = (0..chains)
            .map(|shard| {
                let (tx, rx) = crossbeam_channel::bounded(1);
                self.send_to_shard(shard, msg(tx));
                rx
            })
            .collect();
        waits.into_iter().all(|rx| rx.recv().is_ok())
    }

    /// Wait until every shard has finished the I/O it had in flight (reads that may still
    /// target a segment about to be freed).
    pub(crate) fn fence(&self) -> Result<()> {
        if self.ask_shards(self.chains(), ShardMsg::Fence) {
            Ok(())
        } else {
            Err(Error::ShutDown)
        }
    }

    /// Index key of a fingerprint: its keyed low 64 bits. When tests force collisions, the
    /// domain tag (high 64 bits) instead, so that every block of a domain collides with every
    /// other of that domain, and still with none of another domain's.
    pub fn dedup_key(&self, fp: u128) -> u64 {
        fp as u64 & self.dedup_key_mask | (fp >> 64) as u64 & !self.dedup_key_mask
    }

    /// Data shards: the workers a volume's map pages are striped over.
    pub fn shards(&self) -> usize {
        self.data_shards
    }

    /// Log chains: one per data shard, then the cleaner's move chain.
    pub fn chains(&self) -> usize {
        self.senders.len()
    }

    /// The worker that writes the cleaner's moves, in a chain of its own.
    pub fn mover(&self) -> usize {
        self.data_shards
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether an engine thread failed and the pool stopped taking requests.
    pub fn is_faulted(&self) -> bool {
        self.faulted.load(Ordering::Acquire)
    }

    /// The error every request gets once the pool is faulted.
    pub fn halted(&self) -> Error {
        Error::Halted {
            reason: self
                .fault
                .lock()
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        }
    }

    /// Stop taking requests: an engine thread failed, so its in-memory state (maps, chains,
    /// space accounting) can no longer be trusted. Requests in flight are answered with an
    /// error (see `Job`'s drop); no checkpoint is written from here on, so the next open
    /// recovers from the last good checkpoint and the log, as after a crash.
    pub fn set_fault(&self, reason: String) {
        let mut f = self.fault.lock();
        // The first reason stays, unless it was the placeholder a shard leaves as it unwinds
        // (its thread's supervisor then knows the panic's message).
        let print = f.as_ref().is_none_or(|r| r.ends_with(FAULT_PLACEHOLDER));
        if print {
            *f = Some(reason.clone());
        }
        // Before printing: stderr may block, and nothing may pass for durable meanwhile.
        self.faulted.store(true, Ordering::Release);
        drop(f);
        if print {
            eprintln!("ingot: pool stopped: {reason}");
        }
    }

    pub fn send_to_shard(&self, shard: usize, msg: ShardMsg) {
        if let Err(crossbeam_channel::SendError(msg)) = self.senders[shard].send(msg) {
            fail_msg(msg);
        }
    }

    pub fn kick_checkpoint(&self) {
        self.ckpt_wanted.store(true, Ordering::Release);
        let _ = self.kick.try_send(CkptMsg::Kick);
    }

    /// Wake the cleaner: a write is waiting for free segments.
    pub fn kick_cleaner(&self) {
        let _ = self.kick.try_send(CkptMsg::Space);
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<VolumeState>> {
        self.volumes.read().by_name.get(name).cloned()
    }

    pub fn sync(&self) -> Result<()> {
        self.devices.sync().map_err(|source| Error::Io {
            device: 0,
            offset: 0,
            source,
        })
    }
}

pub(crate) fn fail_msg(msg: ShardMsg) {
    match msg {
        ShardMsg::Read { job, .. }
        | ShardMsg::Write { job, .. }
        | ShardMsg::Zero { job, .. }
        | ShardMsg::Relocate { job, .. } => job.part_done(Err(Error::ShutDown)),
        ShardMsg::Pause { paused, .. } => {
            let _ = paused.send(Err(Error::ShutDown));
        }
        // Dropping the sender answers the fence or settle with an error.
        ShardMsg::Fence(_) | ShardMsg::Settle(_) | ShardMsg::Stop => {}
    }
}

/// An open pool. Dropping it shuts it down cleanly (flush and checkpoint).
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) dir: PathBuf,
    pub(crate) _lock: File,
    /// The devices, locked against other pools while this one is open.
    pub(crate) _claim: DeviceClaim,
    pub(crate) halted: AtomicBool,
}

impl Pool {
    /// True when `dir` holds a pool.
    pub fn exists(dir: &Path) -> bool {
        dir.join(POOL_FILE).exists()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write a checkpoint now.
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint_with(None)
    }

    /// Make every completed write durable. Goes through the flusher like a volume's flush: a
    /// plain device sync would neither checkpoint past a failed record (the writes after it
    /// would stay unrecoverable) nor advance what later records declare flushed.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Flush, checkpoint and stop every thread. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        if self.halted.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if self.inner.is_faulted() {
            self.stop_threads();
            return Err(self.inner.halted());
        }
        if self.inner.read_only {
            self.stop_threads();
            return Ok(());
        }
        // Writes acknowledged early go into the final checkpoint.
        let r = self
            .inner
            .settle_writes()
            .and_then(|()| self.inner.checkpoint_with(None));
        self.stop_threads();
        if r.is_ok() && self.inner.is_faulted() {
            // Something failed as the threads stopped (an early write still waiting for space).
            return Err(self.inner.halted());
        }
        r
    }

    /// Stop every thread without a final flush or checkpoint, as a crash would (tests).
    #[doc(hidden)]
    pub fn halt(&self) {
        if self.halted.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_threads();
    }

    pub(crate) fn stop_threads(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for tx in &self.inner.senders {
            let _ = tx.send(ShardMsg::Stop);
        }
        let _ = self.inner.flusher.send(FlushMsg::Stop);
        let _ = self.inner.kick.send(CkptMsg::Stop);
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
