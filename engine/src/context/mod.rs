//! The state the write path shares: devices and geometry, the log key, space, caches, the
//! dedup index, counters, write-back accounting, health and the background doorbell.
//!
//! Each part is owned by its subsystem's type (`Space`, `EarlyWrites`, `Health`, ...); the
//! context only bundles them, so that shards, the cleaner and checkpoints are handed this
//! and never the pool itself (its workers, checkpoint state and threads).

mod backing;
mod give_back;
mod read_fence;
mod reserve;

pub(crate) use give_back::mark_held_free;
pub(crate) use read_fence::{ReadFence, Ticket};
pub(crate) use reserve::{
    checkpoint_estimate_bytes, dir_pages, paged_checkpoint_estimate_bytes, usable_bytes,
    TIGHT_POOL_SEGMENTS,
};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use crate::cache::{BlockCache, ReuseEpoch};
use crate::counters::{Counters, ShardStats, Stages};
use crate::error::{Error, Result};
use crate::format::LogKey;
use crate::health::{Health, Wake};
use crate::io::SharedDevices;
use crate::job::{Answer, FlushMsg};
use crate::map::{VolumeState, VolumeTable};
use crate::reduce::DedupIndex;
use crate::space::{Geometry, HostRoom, Space};
use crate::store::SegmentStore;
use crate::write_back::EarlyWrites;

pub(crate) struct Context {
    pub devices: SharedDevices,
    /// Where sealed segments and checkpoints are kept, read back and deleted.
    pub store: Arc<dyn SegmentStore>,
    pub geo: Geometry,
    pub pool_uuid: [u8; 16],
    /// Seals segment headers and records (see `format::LogKey`).
    pub log_key: LogKey,
    /// Makes segment nonces unique should the kernel's random source ever fail.
    nonce_counter: AtomicU64,
    /// Opened read-only: nothing is ever written (see `PoolOptions::read_only`).
    pub read_only: bool,
    /// The file system under the backing files (see `HostRoom`).
    pub host: HostRoom,
    pub epoch: u64,
    pub space: Mutex<Space>,
    /// Next sequence number to assign.
    pub seq: AtomicU64,
    pub shard_stats: Vec<ShardStats>,
    /// Each shard's block cache. The shard fills it; front-end threads read cached blocks from
    /// it directly ([`crate::Volume::submit`]), saving the hand-off to the shard and back.
    pub caches: Vec<Mutex<BlockCache>>,
    /// Releases of block ids for reuse; every cache checks it (see `cache`).
    pub reuse: ReuseEpoch,
    /// Some shard caches blocks: reads may be served from the caches on the caller's thread
    /// (with the cache off, trying cost a space and a map lock per read).
    pub caching: bool,
    pub counters: Counters,
    /// Where requests spend their time (see `Stages`).
    pub stages: Arc<Stages>,
    /// Reads outside the shards hold it while they use looked-up locations; freeing segments
    /// fences it first.
    pub reads: ReadFence,
    pub flusher: Sender<FlushMsg>,
    /// A failed record left a gap in a chain: only a checkpoint makes what follows recoverable.
    pub chain_broken: AtomicBool,
    /// Client bytes written (`counters.client_written`) at which the next interval checkpoint
    /// is due: the write that crosses it wakes the checkpointer, which otherwise looks every
    /// 500 ms (at 1.6 GB/s that let 800 MB more through, and shards ran out of segments that
    /// only the late checkpoint would free: 30-80 ms write stalls).
    pub checkpoint_due: AtomicU64,
    /// Punch freed segments out of the backing files (not for prefilled pools).
    pub discard_freed: bool,
    /// The last automatic cleaning pass freed nothing and could win nothing back: writes
    /// waiting for space fail now (see [`Context::full_of_live_data`]).
    pub gc_stuck: AtomicBool,
    /// `counters.client_written` when `gc_stuck` was last set.
    pub gc_stuck_at: AtomicU64,
    /// Payload bytes the pool stores before writes of new blocks fail (see `usable_bytes`).
    pub usable_bytes: u64,
    /// Bytes of writes the shards have taken (see `Shard::reserve_capacity`) and not yet
    /// applied or failed (each shard gives finished parts' bytes back once per turn). Counted with stored bytes against `usable_bytes`: stored bytes grow
    /// only as records apply, so without it the writes in flight (256 writes of 256 KiB, over
    /// a 48 MiB pool) all passed the check together and overshot the capacity, leaving writes
    /// acknowledged early without segments to go to.
    pub accepted_bytes: AtomicU64,
    /// Fingerprint key -> block id hints (see `reduce`). Never held while taking `space`.
    pub dedup: Mutex<DedupIndex>,
    /// Bits of the fingerprint the index keys on (all; none when tests force collisions).
    dedup_key_mask: u64,
    pub health: Arc<Health>,
    pub wake: Wake,
    pub write_back: Arc<EarlyWrites>,
    pub volumes: RwLock<VolumeTable>,
    /// Data shards, and log chains (the data shards' and the mover's).
    data_shards: usize,
    chains: usize,
    /// Checkpoints are format 3 (a root and pages): the checkpoint reserve counts what they
    /// write.
    pub paged_checkpoints: bool,
    /// Map leaves in RAM, under a budget (format 3; see `meta::cache`).
    pub meta: Arc<crate::meta::cache::MetaCache>,
    /// A pool on a store: requests are refused once this node's lease ran out (`replica`).
    pub replica: Option<Arc<dyn crate::replica::Replica>>,
    /// What its syncs sent (`stats`).
    pub replica_counters: Option<Arc<crate::replica::Counters>>,
}

/// What a [`Context`] is made of; `Context::new` adds the counters it starts itself.
pub(crate) struct Parts {
    pub devices: SharedDevices,
    pub store: Arc<dyn SegmentStore>,
    pub geo: Geometry,
    pub pool_uuid: [u8; 16],
    pub log_key: LogKey,
    pub read_only: bool,
    pub epoch: u64,
    pub space: Space,
    pub seq: u64,
    pub caches: Vec<Mutex<BlockCache>>,
    /// The epoch the caches were made with.
    pub reuse: ReuseEpoch,
    pub flusher: Sender<FlushMsg>,
    pub discard_freed: bool,
    pub usable_bytes: u64,
    pub dedup: DedupIndex,
    pub dedup_key_mask: u64,
    pub health: Arc<Health>,
    pub wake: Wake,
    pub write_back_bytes: u64,
    pub volumes: VolumeTable,
    pub data_shards: usize,
    pub paged_checkpoints: bool,
    pub meta: Arc<crate::meta::cache::MetaCache>,
    pub replica: Option<Arc<dyn crate::replica::Replica>>,
    pub replica_counters: Option<Arc<crate::replica::Counters>>,
}

impl Context {
    pub(crate) fn new(p: Parts) -> Context {
        let chains = p.data_shards + 1;
        let write_back = Arc::new(EarlyWrites::new(
            p.write_back_bytes,
            p.geo.segment_bytes,
            chains,
            p.usable_bytes,
        ));
        let host_margin =
            4 * p.write_back_bytes.max(16 << 20) + p.geo.segment_bytes * (chains as u64 + 1);
        Context {
            devices: p.devices,
            store: p.store,
            geo: p.geo,
            pool_uuid: p.pool_uuid,
            log_key: p.log_key,
            nonce_counter: AtomicU64::new(0),
            read_only: p.read_only,
            host: HostRoom::new(host_margin),
            epoch: p.epoch,
            space: Mutex::new(p.space),
            seq: AtomicU64::new(p.seq),
            shard_stats: (0..chains).map(|_| ShardStats::default()).collect(),
            caching: p.caches.iter().any(|c| !c.lock().is_off()),
            caches: p.caches,
            reuse: p.reuse,
            counters: Counters::default(),
            stages: Arc::default(),
            reads: ReadFence::default(),
            flusher: p.flusher,
            chain_broken: AtomicBool::new(false),
            checkpoint_due: AtomicU64::new(u64::MAX),
            discard_freed: p.discard_freed,
            gc_stuck: AtomicBool::new(false),
            gc_stuck_at: AtomicU64::new(0),
            usable_bytes: p.usable_bytes,
            accepted_bytes: AtomicU64::new(0),
            dedup: Mutex::new(p.dedup),
            dedup_key_mask: p.dedup_key_mask,
            health: p.health,
            wake: p.wake,
            write_back,
            volumes: RwLock::new(p.volumes),
            data_shards: p.data_shards,
            chains,
            paged_checkpoints: p.paged_checkpoints,
            meta: p.meta,
            replica: p.replica,
            replica_counters: p.replica_counters,
        }
    }

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

    /// A change to the space could not be made (a block-table leaf that did not read back):
    /// its counts are off, and no checkpoint may keep them; the pool stops (the next open
    /// replays the log).
    pub fn fault_on_table_failure(&self, space: &mut Space) {
        if let Some(e) = space.take_failure() {
            self.health
                .set_fault(format!("block table change failed: {e}"));
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
        self.chains
    }

    /// The worker that writes the cleaner's moves, in a chain of its own.
    pub fn mover(&self) -> usize {
        self.data_shards
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<VolumeState>> {
        self.volumes.read().by_name.get(name).cloned()
    }

    /// Ids freed by records before `seq_end` become reusable (`Space::release_ids`). None can
    /// be handed out before every block cache has dropped them: `space` stays locked
    /// throughout (lock order: space, then a cache).
    pub(crate) fn release_ids(&self, space: &mut Space, seq_end: u64) {
        let released = space.release_ids(seq_end);
        if released.is_empty() {
            return;
        }
        self.reuse.bump();
        for c in &self.caches {
            c.lock().purge(&released, |id| space.refs.is_free(id));
        }
    }

    /// Every unreferenced id becomes reusable (after an open's checkpoint, which covers the
    /// whole log), as in [`Context::release_ids`].
    pub(crate) fn release_all_ids(&self, space: &mut Space) {
        space.rebuild_free_ids();
        self.reuse.bump();
        for c in &self.caches {
            c.lock().purge_free(|id| space.refs.is_free(id));
        }
    }

    /// Whether writes that wait for space should fail now: the cleaner found the pool full of
    /// live data, and less than two segments were written since. Overwrites after that
    /// verdict leave dead space a later pass takes back; a verdict older than them made four
    /// writers of a 24-segment pool fail with no space while five segments were dead (the
    /// flag, set right after the volume's first fill, outlived it until the next pass ended).
    pub(crate) fn full_of_live_data(&self) -> bool {
        self.gc_stuck.load(Ordering::Acquire)
            && self
                .counters
                .client_written
                .load(Ordering::Relaxed)
                .saturating_sub(self.gc_stuck_at.load(Ordering::Acquire))
                < 2 * self.geo.segment_bytes
    }

    /// Sync every device.
    pub fn sync(&self) -> Result<()> {
        self.devices.sync().map_err(|source| Error::Sync { source })
    }

    /// Make every completed write durable through the flusher (which checkpoints instead of
    /// syncing when a failed record broke a chain), writes acknowledged early included.
    pub(crate) fn flush(&self) -> Result<()> {
        crate::api::wait_reply(|done| {
            if let Err(crossbeam_channel::SendError(FlushMsg::Flush(done, _))) = self.flusher.send(
                FlushMsg::Flush(Answer::new(done), std::time::Instant::now()),
            ) {
                done.send(Err(Error::ShutDown));
            }
        })
        .map(|_| ())
    }

    /// Recompute the free-segment floor for early writes (walks the volumes' maps), and
    /// what they may hold above it.
    pub(crate) fn update_write_back_floor(&self) {
        if self.write_back.limit() == 0 {
            return;
        }
        self.write_back.set_floor(self.data_reserve() + 1);
        self.note_write_back_room(&self.space.lock());
    }

    /// Recompute what early writes may hold given `space` (see `EarlyWrites::note_room`),
    /// looking at the host file system first.
    pub(crate) fn note_write_back_room(&self, space: &Space) {
        if self.write_back.limit() == 0 {
            return;
        }
        self.host.refresh(&*self.devices, false);
        let accepted = self.accepted_bytes.load(Ordering::Acquire);
        self.write_back
            .note_room(space, accepted, self.host.is_tight());
    }

    /// A write or an allocation found no room on the host file system.
    pub(crate) fn note_host_full(&self) {
        self.host.set_tight();
        self.write_back.stop();
    }
}

#[cfg(test)]
mod tests {
    use crate::api::BLOCK_BYTES;
    use crate::map::shard_of;
    use crate::pool::Pool;

    /// A trimmed block stays cached (a trim can free millions), but not past the checkpoint
    /// that lets its id be reused: the id would then serve the old copy for another block.
    /// And a copy read before that checkpoint is not cached after it.
    #[test]
    fn released_ids_leave_every_cache_before_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::small_for_tests(dir.path(), Some(16 << 20));
        pool.create_volume("v", 1024 * BLOCK_BYTES).unwrap();
        let v = pool.volume("v").unwrap();
        let ctx = &pool.inner.ctx;
        let state = ctx.lookup("v").unwrap();
        let shards = ctx.shards();
        // Blocks of map pages 0 and 1: in both shards' caches.
        let lbas: Vec<u64> = (0..8u64).map(|i| (i % 2) * 512 + i / 2).collect();
        let ids: Vec<u64> = lbas
            .iter()
            .map(|&lba| {
                let data = vec![lba as u8 + 1; BLOCK_BYTES as usize];
                v.write(lba * BLOCK_BYTES, &data, false).unwrap();
                state.maps[shard_of(lba, shards)].lock().get(lba).unwrap()
            })
            .collect();
        v.flush().unwrap();
        let cached = |id: u64| ctx.caches.iter().any(|c| c.lock().contains(id));
        assert!(
            ids.iter().all(|&id| cached(id)),
            "written blocks are cached"
        );
        for shard in 0..2 {
            assert!(ids.iter().any(|&id| ctx.caches[shard].lock().contains(id)));
        }
        let before = ctx.reuse.now();
        v.trim(0, 4 * BLOCK_BYTES, false).unwrap();
        v.trim(512 * BLOCK_BYTES, 4 * BLOCK_BYTES, false).unwrap();
        v.flush().unwrap();
        assert!(
            ids.iter().all(|&id| cached(id)),
            "trimmed blocks stay cached"
        );
        pool.checkpoint().unwrap();
        assert!(ctx.reuse.now() > before);
        for &id in &ids {
            assert!(ctx.space.lock().refs.is_free(id), "id {id} released");
            assert!(!cached(id), "released id {id} still cached");
            let mut cache = ctx.caches[0].lock();
            cache.insert(
                id,
                before,
                bytes::Bytes::from(vec![9; BLOCK_BYTES as usize]),
            );
            assert!(
                !cache.contains(id),
                "a copy from before the release was cached"
            );
        }
        // Few ids released against many cached: purged one by one, the others kept.
        for lba in (16..80u64).chain(528..592) {
            // Unique contents (no dedup between them).
            let mut data = vec![0xee; BLOCK_BYTES as usize];
            data[..8].copy_from_slice(&lba.to_le_bytes());
            v.write(lba * BLOCK_BYTES, &data, false).unwrap();
        }
        v.flush().unwrap();
        let id = |lba: u64| state.maps[shard_of(lba, shards)].lock().get(lba).unwrap();
        let (gone, kept) = ((id(20), id(530)), (id(21), id(531)));
        v.trim(20 * BLOCK_BYTES, BLOCK_BYTES, false).unwrap();
        v.trim(530 * BLOCK_BYTES, BLOCK_BYTES, false).unwrap();
        pool.checkpoint().unwrap();
        assert!(
            !cached(gone.0) && !cached(gone.1),
            "released ids still cached"
        );
        assert!(
            cached(kept.0) && cached(kept.1),
            "a purge took more than it released"
        );
    }
}
