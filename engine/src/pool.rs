//! The pool: devices, volumes, shard workers, the flusher and the checkpointer.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::api::{
    ratio, CheckReport, DedupDomain, Problem, Stats, VolumeInfo, WriteBreakdown, BLOCK_BYTES,
    SECTOR_BYTES,
};
use crate::cache::BlockCache;
use crate::checkpoint::{self, Image, VolumeImage};
use crate::error::{Error, Result};
use crate::format::{
    LogKey, SegmentHeader, SegmentKind, Superblock, SuperblockFault, DATA_START, FLAG_REF,
    IO_ALIGN, NO_SEGMENT, SEGMENT_HEADER_BYTES, SUPERBLOCK_OFFSETS,
};
use crate::io::claim::{self, DeviceClaim};
use crate::io::fault::{FaultDevices, FaultPlan};
use crate::io::sync::FileSet;
use crate::io::{open_devices, AlignedBuf, Devices, IoKind, SharedDevices};
use crate::job::{FlushMsg, Job};
use crate::lbamap::shard_of;
use crate::recovery::{scan_chain, Entry};
use crate::reduce::DedupIndex;
use crate::shard::{
    decode_entry, trim_owned, Members, PayloadFault, Relocation, Shard, ShardMsg, ShardPosition,
};
use crate::space::{BlockEntry, SegState, SegUse, Space};
use crate::volume::{Volume, VolumeState};

/// Name of the file in the pool directory that lists the devices.
pub const POOL_FILE: &str = "pool.json";
const LOCK_FILE: &str = "pool.lock";
const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

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
    /// Tests: inject faults through these rules.
    pub fault: Option<Arc<FaultPlan>>,
    /// RAM for the dedup index; `None` = 2% of physical memory, at least 64 MiB. Past it the
    /// index keeps a sample of fingerprints (fewer dedup hits, never a failed write).
    pub dedup_index_bytes: Option<u64>,
    /// Write-back: most bytes of writes (without FUA) acknowledged once the engine has taken
    /// them, before they are on the device (at most a 64th of the usable capacity); 0
    /// acknowledges every write when it is stored. NBD and iSCSI allow it (a FLUSH,
    /// SYNCHRONIZE CACHE or FUA write makes them durable), as a page cache does; a kill -9 may
    /// lose such writes unless flushed.
    pub write_back_bytes: u64,
    /// Open without writing anything (`serve --read-only`, `check`): the log is replayed in
    /// memory only, no recovery checkpoint is written, every volume refuses writes and
    /// checkpoints, cleaning and volume changes fail with `ReadOnly`. Works on a pool whose
    /// host file system is full.
    pub read_only: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            io: IoKind::Auto,
            shards: 0,
            cache_bytes: None,
            checkpoint_interval_bytes: 1 << 30,
            fault: None,
            dedup_index_bytes: None,
            write_back_bytes: 0,
            read_only: false,
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
struct PoolFile {
    format_version: u32,
    devices: Vec<PathBuf>,
    /// The devices were written with zeroes at creation: keep freed segments allocated (a
    /// punched hole would make the next writes there allocate again).
    #[serde(default)]
    prefilled: bool,
    /// The pool's UUID, as in its superblocks: `open` refuses a device of another pool. Absent
    /// in pools made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pool_uuid: Option<String>,
}

/// Segment numbering across devices.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub segment_bytes: u64,
    /// (first segment, count) per device.
    pub devs: Vec<(u32, u32)>,
    pub total_segments: u32,
}

impl Geometry {
    /// Device and byte offset of a segment's start.
    pub fn locate(&self, seg: u32) -> (u16, u64) {
        for (d, &(first, count)) in self.devs.iter().enumerate() {
            if seg >= first && seg < first + count {
                return (
                    d as u16,
                    DATA_START + u64::from(seg - first) * self.segment_bytes,
                );
            }
        }
        (0, DATA_START)
    }
}

#[derive(Default)]
pub(crate) struct ShardStats {
    /// Records applied (the next shard_seq expected to apply).
    pub applied_shard_seq: AtomicU64,
    /// Records known durable (a sync completed after they were applied).
    pub durable_shard_seq: AtomicU64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub client_written: AtomicU64,
    pub device_written: AtomicU64,
    /// Payload bytes the cleaner moved.
    pub gc_moved: AtomicU64,
    /// Segments the running cleaning pass is emptying.
    pub gc_cleaning: AtomicU64,
    /// Device bytes the cleaner read from victims.
    pub gc_read: AtomicU64,
    /// Payload bytes the cleaner took from the block cache instead of the device.
    pub gc_from_cache: AtomicU64,
    /// Cached copies the mover found not to match their block's CRC.
    pub gc_cache_mismatches: AtomicU64,
    /// `WriteBreakdown`, by record kind: [records, entries, bytes, header bytes] for data
    /// (and trim) records, then for move records.
    pub records: [[AtomicU64; 4]; 2],
    pub checkpoints: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
}

struct CkptState {
    generation: u64,
    /// Segments of the newest checkpoint.
    segments: Vec<u32>,
    /// Segments of the checkpoint before it (the older superblock copy points there).
    prev_segments: Vec<u32>,
    seq_end: u64,
    /// `seq_end` of the newest checkpoint both superblock slots point at. Until a commit
    /// writes both, a slot may still lead to the previous checkpoint (open falls back to it
    /// when the newest is damaged), so nothing its replay needs is freed: log segments are
    /// freed only behind this one.
    both_seq: u64,
    written_at_last: u64,
}

struct VolumeTable {
    by_name: BTreeMap<String, Arc<VolumeState>>,
    next_id: u32,
}

pub(crate) struct Inner {
    pub devices: SharedDevices,
    pub geo: Geometry,
    pub pool_uuid: [u8; 16],
    /// Seals segment headers and records (see `format::LogKey`).
    pub log_key: LogKey,
    /// Makes segment nonces unique should the kernel's random source ever fail.
    nonce_counter: AtomicU64,
    /// Opened read-only: nothing is ever written (see `PoolOptions::read_only`).
    pub read_only: bool,
    /// The file system under the backing files is short of room (see `refresh_host_space`):
    /// no write is acknowledged before it is stored, so a write that finds no room fails with
    /// ENOSPC instead of being lost after its acknowledgement.
    pub host_tight: AtomicBool,
    /// Bytes free on the host file systems and bytes of the backing files still unallocated,
    /// as last seen (summed over devices; 0 for block devices).
    host_free: AtomicU64,
    host_unallocated: AtomicU64,
    /// When host space was last looked at (ms since `host_epoch`).
    host_seen_ms: AtomicU64,
    /// When the last checkpoint was committed (ms since `host_epoch`).
    ckpt_at_ms: AtomicU64,
    host_epoch: std::time::Instant,
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
    senders: Vec<Sender<ShardMsg>>,
    data_shards: usize,
    volumes: RwLock<VolumeTable>,
    ckpt: Mutex<CkptState>,
    superblocks: Vec<Superblock>,
    closed: AtomicBool,
    kick: Sender<CkptMsg>,
    /// A checkpoint was asked for. The kick channel holds one message, so a `Kick` sent while
    /// a `Space` waits there would be lost: a mover chain left without a next segment then
    /// waited for a checkpoint nobody took, and writes at 90% full stalled for up to 30 s.
    ckpt_wanted: AtomicBool,
    cache_capacity: u64,
    checkpoint_interval: u64,
    /// Punch freed segments out of the backing files (not for prefilled pools).
    pub(crate) discard_freed: bool,
    /// One cleaning pass at a time (the checkpointer's and `ingot gc`'s).
    gc_lock: Mutex<()>,
    /// The last automatic cleaning pass freed nothing: writes waiting for space fail now.
    pub gc_stuck: AtomicBool,
    /// Payload bytes the pool stores before writes of new blocks fail (see `usable_bytes`).
    pub usable_bytes: u64,
    /// Fingerprint key -> block id hints (see `reduce`). Never held while taking `space`.
    pub dedup: Mutex<DedupIndex>,
    /// Bits of the fingerprint the index keys on (all; none when tests force collisions).
    dedup_key_mask: u64,
    /// Why the pool stopped taking requests (an engine thread panicked), once it has.
    fault: Mutex<Option<String>>,
    faulted: AtomicBool,
    /// Write-back limit (`PoolOptions::write_back_bytes`); 0: off.
    write_back_limit: u64,
    /// Bytes and requests acknowledged early whose records have not all applied yet.
    pub(crate) wb_bytes: AtomicU64,
    pub(crate) wb_jobs: AtomicU64,
    /// Writes acknowledged early since open.
    wb_total: AtomicU64,
    /// Early writes not yet applied, counted per block in slots hashed from (volume, LBA): a
    /// read whose blocks all count zero may be served from the cache on the caller's thread,
    /// as no early write to them can still be on its way to the map. Without it, every read
    /// went through the shards while any early write was outstanding: 4k reads at QD1 waited
    /// behind the writes queued there (p99 3.4 ms during 120k overwrites a second).
    wb_pending: Box<[AtomicU32]>,
    /// Free segments early writes leave alone: the data reserve and one more (a segment may be
    /// taken between two looks; shards look again at every roll-over, the cleaner at every
    /// free), kept by the checkpointer (computing the reserve walks the maps). Early writes
    /// hold at most the free space above it, so that they do not wait for the cleaner (with a
    /// segment per chain instead, 85-87% of 4k overwrites at 90% full went early, 93-94% now).
    wb_min_free: AtomicUsize,
    /// Bytes early writes may hold now (see `note_write_back_room`); read without the space
    /// lock.
    wb_budget: AtomicU64,
}

/// A victim segment and the live blocks to move out of it.
type VictimMoves<'a> = (&'a u32, &'a Vec<(u64, BlockEntry)>);

/// A change made while every shard is paused for a checkpoint (volume create, delete, resize).
type Mutate<'a> = &'a mut dyn FnMut(&Inner, u64) -> Result<()>;

/// Segments one automatic cleaning pass empties before it checkpoints and re-checks space.
const GC_VICTIMS_PER_PASS: usize = 8;
/// The cleaner starts when free segments fall to the data reserve plus this fraction of the
/// pool. Free segments are slack the cleaner cannot use: the same space left as dead blocks in
/// sealed segments makes its victims emptier. A tenth of the pool kept free held sealed
/// segments at ~86% live at 90% full (victims ~79% live: 3.9-4.8 bytes moved per byte written
/// under uniform overwrites); a 64th (4 segments of a 2 GiB pool) gives victims ~66% live and
/// 2.3 bytes moved. Large pools keep more in absolute terms, for bursts while a pass runs.
const GC_SLACK_DIVISOR: usize = 64;
/// Segments fuller than this are not worth cleaning (rewriting them frees too little).
const GC_MAX_UTILISATION: f64 = 0.95;
/// When writes wait for space, fuller segments are cleaned too: each 4 KiB block moved costs
/// its payload plus a 56-byte entry (1.4%), so a victim must be at least ~2.5% dead to gain.
const GC_URGENT_UTILISATION: f64 = 0.975;

/// Share of the data segments kept free for the cleaner when the pool is full. At 100% of the
/// usable capacity, sealed segments are then at most ~90% live, where cleaning costs about 5
/// bytes moved per byte written under uniform random overwrites: the cliff log-structured stores
/// fall off when they fill to the last segment (1/(1-u) grows without bound) is never reached.
const GC_HEADROOM: f64 = 0.10;
/// End of the reason a shard records as it unwinds, before its supervisor knows why.
pub(crate) const FAULT_PLACEHOLDER: &str = "(see the log for the message)";
/// Most segments one call of `give_back_freed` punches: after an open that found many
/// (every free segment of a block device, discarded once), the checkpointer gives them back a
/// few at a time between its other work instead of in one long stretch.
const GIVE_BACK_PER_CALL: usize = 64;
/// Slots of the early-write counts (`Inner::wb_pending`): 64 Ki, 256 KiB, few false
/// positives with the 64 MiB of early writes a pool holds at most under 4k writes.
const WB_PENDING_BITS: u32 = 16;
const WB_PENDING_SLOTS: usize = 1 << WB_PENDING_BITS;
/// Victim segments the cleaner reads at once.
const VICTIM_READS: usize = 4;
/// Largest single read of a victim segment (see `gather_victim`).
const VICTIM_READ_PIECE: usize = 1 << 20;
/// Dead (or cached) bytes between two payloads a victim read spans rather than split in two.
/// Small reads cost more than the bytes they skip here: reading only the live blocks of ~68%-live
/// victims (no gap) read 2.6-3.0 bytes per client byte instead of 3.2, but gave 18.8k IOPS at
/// 90% full with a 64 MiB cache, against 42.7-45.8k with 16 KiB gaps.
const VICTIM_READ_GAP: usize = 16 << 10;

/// Payload bytes a pool of this geometry takes: its segments less what a full pool's checkpoint
/// (one held, one being written, and a spare), the shards' open and next segments, the data
/// reserve and the per-block log entries need, less the cleaner's headroom. Assumes
/// uncompressed blocks; compressed ones take less payload each, and the running pool's own
/// reserve (from the real block count) still holds writes back if checkpoints grow past it.
fn usable_bytes(geo: &Geometry, shards: usize) -> u64 {
    let per_seg = geo.segment_bytes - SEGMENT_HEADER_BYTES;
    let total = u64::from(geo.total_segments);
    let entry = crate::format::DataEntry::BYTES as u64;
    let blocks = total * per_seg / (BLOCK_BYTES + entry);
    let pages = blocks.div_ceil(crate::format::MAP_PAGE_ENTRIES);
    let ckpt_segs = checkpoint::estimate_bytes(pages, blocks, 1, shards as u64).div_ceil(per_seg);
    let fixed = 2 * ckpt_segs + 1 + 3 * shards as u64;
    let data_segs = total.saturating_sub(fixed);
    let payload = data_segs * per_seg / (BLOCK_BYTES + entry) * BLOCK_BYTES;
    (payload as f64 * (1.0 - GC_HEADROOM)) as u64
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The warning `stats` gives once stored data passes 85% of the usable capacity.
fn space_warning(stored: u64, usable: u64) -> Option<String> {
    let pct = stored as f64 * 100.0 / usable.max(1) as f64;
    (pct >= 85.0).then(|| {
        format!(
            "pool is {pct:.0}% full: at 100% writes to unmapped blocks fail with ENOSPC \
             (overwrites, trims and reads go on); trim or delete volumes, or add a larger pool"
        )
    })
}

/// What a cleaning pass did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub segments_cleaned: u64,
    pub segments_freed: u64,
    pub bytes_moved: u64,
}

enum CkptMsg {
    /// Take a checkpoint now (a shard needs a fresh chain, or a test asked).
    Kick,
    /// Writes are waiting for space: clean now.
    Space,
    Stop,
}

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
    fn sync_completed(&self) -> Result<()> {
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
    fn flush(&self) -> Result<()> {
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

    /// Take `len` bytes of a write for write-back: it is acknowledged as soon as it is sent
    /// to its shards. Only while the pool has room to spare (no cleaning needed, capacity left
    /// for every early write), so that an acknowledged write does not fail for want of space.
    pub(crate) fn write_back_admits(&self, len: u64) -> bool {
        if self.write_back_limit == 0 || self.is_faulted() || self.is_closed() {
            return false;
        }
        let before = self.wb_bytes.fetch_add(len, Ordering::AcqRel);
        let ok = before + len <= self.wb_budget.load(Ordering::Acquire)
            && !self.gc_stuck.load(Ordering::Acquire);
        if ok {
            self.wb_jobs.fetch_add(1, Ordering::AcqRel);
            self.wb_total.fetch_add(1, Ordering::Relaxed);
        } else {
            self.wb_bytes.fetch_sub(len, Ordering::AcqRel);
        }
        ok
    }

    /// `PoolOptions::write_back_bytes` (0: write-back off).
    pub(crate) fn write_back_limit(&self) -> u64 {
        self.write_back_limit
    }

    fn wb_slot(vol: u32, lba: u64) -> usize {
        let h = (u64::from(vol) << 40 ^ lba).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - WB_PENDING_BITS)) as usize
    }

    /// Count the blocks of an early write of `len` bytes at `offset` of volume `vol` as pending
    /// (before it is sent to its shards and acknowledged) or, with `done`, no longer (after
    /// its records are applied: the maps hold it).
    pub(crate) fn mark_early(&self, vol: u32, offset: u64, len: u64, done: bool) {
        for lba in offset / BLOCK_BYTES..(offset + len).div_ceil(BLOCK_BYTES) {
            let slot = &self.wb_pending[Self::wb_slot(vol, lba)];
            if done {
                slot.fetch_sub(1, Ordering::Release);
            } else {
                slot.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether an early write to block `lba` of volume `vol` may not be applied yet (or one to
    /// a block sharing its slot).
    pub(crate) fn early_pending(&self, vol: u32, lba: u64) -> bool {
        self.wb_pending[Self::wb_slot(vol, lba)].load(Ordering::Acquire) != 0
    }

    /// An early write's records all applied (or failed).
    pub(crate) fn write_back_done(&self, len: u64) {
        self.wb_bytes.fetch_sub(len, Ordering::AcqRel);
        self.wb_jobs.fetch_sub(1, Ordering::AcqRel);
    }

    /// Recompute the free-segment floor for early writes (walks the volumes' maps), and
    /// what they may hold above it.
    pub(crate) fn update_write_back_floor(&self) {
        if self.write_back_limit == 0 {
            return;
        }
        let floor = self.data_reserve() + 1;
        self.wb_min_free.store(floor, Ordering::Relaxed);
        self.note_write_back_room(&self.space.lock());
    }

    /// How many bytes early writes may hold given `space`: the free segments above the floor,
    /// up to the limit, while there is capacity for twice the limit plus a segment per chain
    /// (what may be stored between two looks at stored bytes).
    ///
    /// Early writes go on while the cleaner works, in the room it keeps above the data
    /// reserve: at 90% full, stopping them at the cleaner's threshold (as before) left every
    /// write waiting for its record (46k against 69k IOPS of 4k overwrites, QD32). An early
    /// write that meets the data reserve anyway (write-through writes took the room) waits
    /// for the cleaner like any other; the capacity check guarantees it can win space back.
    /// Look at the room left on the file systems under the backing files (at most every 50
    /// ms). The host is tight when it cannot give the backing files all they may still grow by
    /// and has less than a margin (four write-back limits and a segment per chain) left.
    pub(crate) fn refresh_host_space(&self, force: bool) {
        let now = self.host_epoch.elapsed().as_millis() as u64 + 1;
        let seen = self.host_seen_ms.load(Ordering::Relaxed);
        if !force && seen != 0 && now.saturating_sub(seen) < 50 {
            return;
        }
        self.host_seen_ms.store(now, Ordering::Relaxed);
        let (mut free, mut unallocated, mut thin) = (u64::MAX, 0u64, false);
        for d in 0..self.devices.count() {
            if let Ok(Some(h)) = self.devices.host_space(d as u16) {
                free = free.min(h.free_bytes);
                unallocated += h.unallocated_bytes;
                thin = true;
            }
        }
        if !thin {
            return;
        }
        self.host_free.store(free, Ordering::Relaxed);
        self.host_unallocated.store(unallocated, Ordering::Relaxed);
        let margin = 4 * self.write_back_limit.max(16 << 20)
            + self.geo.segment_bytes * (self.chains() as u64 + 1);
        self.host_tight
            .store(free < unallocated && free < margin, Ordering::Release);
    }

    /// Keep `2 × ckpt_reserve` free segments allocated in the backing files of a thin pool,
    /// so that checkpoints and the cleaner's moves (which take them first) never meet a full
    /// host file system: a shutdown still checkpoints, and a reopen still finds room for its
    /// recovery checkpoint.
    pub(crate) fn top_up_backed(&self) {
        if !self.discard_freed || self.read_only {
            return;
        }
        let want = 2 * self.ckpt_reserve();
        let candidates: Vec<u32> = {
            let mut space = self.space.lock();
            space.backed_reserve = want;
            let have = space.backed_free();
            (0..space.seg_state.len())
                .filter(|&s| space.seg_state[s] == SegState::Free && !space.undiscarded[s])
                .take(want.saturating_sub(have))
                .map(|s| s as u32)
                .collect()
        };
        for seg in candidates {
            let (dev, base) = self.geo.locate(seg);
            match self.devices.preallocate(dev, base, self.geo.segment_bytes) {
                Ok(()) => {
                    let mut space = self.space.lock();
                    if !space.undiscarded[seg as usize] {
                        space.undiscarded[seg as usize] = true;
                        space.undiscarded_count += 1;
                    }
                }
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ENOSPC) {
                        self.note_host_full();
                    }
                    break;
                }
            }
        }
    }

    /// Make sure the backing files hold `segs` (just allocated, in `state`) before anything is
    /// written there: a segment the host file system has no room for is swapped for another
    /// free one. Checkpoints and new chains take held segments first (`SegUse::Metadata`),
    /// but which ones are held is not known after a restart (ext4 reports fallocated,
    /// unwritten extents as holes): a `fallocate` tells, and costs nothing on a held one.
    pub(crate) fn backed(&self, mut segs: Vec<u32>, state: SegState) -> Result<Vec<u32>> {
        if !self.discard_freed {
            return Ok(segs);
        }
        let mut refused = Vec::new();
        let mut i = 0;
        let result = loop {
            let Some(&seg) = segs.get(i) else {
                break Ok(());
            };
            // Even a segment marked as held: the mark may stand for part of it only.
            let (dev, base) = self.geo.locate(seg);
            match self.devices.preallocate(dev, base, self.geo.segment_bytes) {
                Ok(()) => i += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    self.note_host_full();
                    refused.push(seg);
                    match self
                        .space
                        .lock()
                        .alloc_segment_for(state, 0, SegUse::Metadata)
                    {
                        Some(other) => segs[i] = other,
                        None => break Err(Error::NoSpace),
                    }
                }
                // Best effort otherwise (a file system without fallocate).
                Err(_) => i += 1,
            }
        };
        let mut space = self.space.lock();
        for s in refused {
            space.set_state(s, SegState::Free);
        }
        if result.is_err() {
            for &s in &segs {
                space.set_state(s, SegState::Free);
            }
        }
        result.map(|()| segs)
    }

    /// A write or an allocation found no room on the host file system.
    pub(crate) fn note_host_full(&self) {
        self.host_tight.store(true, Ordering::Release);
        self.wb_budget.store(0, Ordering::Release);
    }

    /// What `stats` says when the host file system cannot hold what the pool may still write.
    fn host_warning(&self) -> Option<String> {
        let free = self.host_free.load(Ordering::Relaxed);
        let unallocated = self.host_unallocated.load(Ordering::Relaxed);
        (free < unallocated).then(|| {
            format!(
                "the file system under the pool has {} free but the pool may still need {} \
                 (a thin pool): the host will refuse writes (ENOSPC) when it runs out; grow it, \
                 or create pools prefilled",
                mib(free),
                mib(unallocated)
            )
        })
    }

    pub(crate) fn note_write_back_room(&self, space: &Space) {
        if self.write_back_limit == 0 {
            return;
        }
        self.refresh_host_space(false);
        if self.host_tight.load(Ordering::Acquire) {
            self.wb_budget.store(0, Ordering::Release);
            return;
        }
        let margin = 2 * self.write_back_limit + self.geo.segment_bytes * self.chains() as u64;
        let floor = self.wb_min_free.load(Ordering::Relaxed);
        // Half the room: a block alone in its record takes a page of header too.
        let budget = if space.stored_bytes + margin > self.usable_bytes {
            0
        } else {
            (space.free_segments.saturating_sub(floor) as u64 * self.geo.segment_bytes / 2)
                .min(self.write_back_limit)
        };
        self.wb_budget.store(budget, Ordering::Release);
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
    fn ask_shards(&self, chains: usize, msg: fn(Sender<()>) -> ShardMsg) -> bool {
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
    fn fence(&self) -> Result<()> {
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

    /// Segments kept back from data so that a checkpoint always fits, and one per chain so
    /// that the next open can start its chains even when the pool is full.
    pub fn reserve_segments(&self) -> usize {
        self.reserve_segments_with(0, 0)
    }

    /// The same with `pages` more map pages in `volumes` more volumes (a copy about to be made).
    fn reserve_segments_with(&self, extra_pages: u64, extra_volumes: u64) -> usize {
        let vols = self.volumes.read();
        let mut pages = extra_pages;
        for v in vols.by_name.values() {
            for m in &v.maps {
                pages += m.lock().present_pages();
            }
        }
        let blocks = self.space.lock().live_blocks;
        let est = checkpoint::estimate_bytes(
            pages,
            blocks,
            vols.by_name.len() as u64 + extra_volumes,
            self.chains() as u64,
        );
        est.div_ceil(self.geo.segment_bytes - SEGMENT_HEADER_BYTES) as usize + 1 + self.chains()
    }

    /// Segments only a checkpoint may use: one checkpoint's worth and a spare.
    pub fn ckpt_reserve(&self) -> usize {
        self.reserve_segments() - self.chains()
    }

    /// Below this many free segments data writes stop (checkpoints, trims and the cleaner
    /// keep the rest).
    pub fn data_reserve(&self) -> usize {
        self.reserve_segments() + self.shards()
    }

    /// Segments' worth of dead space in sealed segments the cleaner could reclaim (segments
    /// fuller than the cleaning threshold do not count).
    fn reclaimable_segments_at(&self, max_utilisation: f64) -> usize {
        let usable = self.geo.segment_bytes - SEGMENT_HEADER_BYTES;
        let space = self.space.lock();
        let dead: u64 = space
            .seg_state
            .iter()
            .enumerate()
            .filter(|(s, st)| {
                matches!(st, SegState::Sealed { .. })
                    && (space.seg_live[*s] as f64) <= usable as f64 * max_utilisation
            })
            .map(|(s, _)| usable.saturating_sub(space.seg_live[s]))
            .sum();
        (dead / usable) as usize
    }

    /// Free segments below which the cleaner runs on its own: the data reserve plus
    /// [`GC_SLACK_DIVISOR`]th of the pool (at least 4 segments).
    pub(crate) fn cleaning_threshold(&self) -> usize {
        self.cleaning_threshold_from(self.ckpt_reserve())
    }

    /// The same from a checkpoint reserve already computed (computing it walks every map page).
    pub(crate) fn cleaning_threshold_from(&self, ckpt_reserve: usize) -> usize {
        // The data reserve is the checkpoint reserve plus a segment per chain and per shard.
        ckpt_reserve
            + self.chains()
            + self.shards()
            + (self.geo.total_segments as usize / GC_SLACK_DIVISOR).max(4)
    }

    /// Free segments at or below which writes wait and the cleaner runs flat out.
    fn urgent_threshold(&self) -> usize {
        self.data_reserve() + self.shards()
    }

    /// Free sealed segments that hold nothing live and lie before the last checkpoint (outside
    /// every replay chain), once the records that emptied them are durable. Cheaper than a
    /// checkpoint, which is the only other thing that frees them.
    fn free_dead_segments(&self) -> Result<u64> {
        let _one = self.gc_lock.lock();
        let ckpt_seq = self.ckpt.lock().both_seq;
        let any = {
            let space = self.space.lock();
            space.seg_state.iter().enumerate().any(|(s, st)| {
                matches!(*st, SegState::Sealed { seq } if seq <= ckpt_seq) && space.seg_live[s] == 0
            })
        };
        if !any {
            return Ok(0);
        }
        self.sync_completed()?;
        self.fence()?;
        let ck = self.ckpt.lock();
        let mut space = self.space.lock();
        let mut freed = Vec::new();
        for s in 0..space.seg_state.len() {
            if matches!(space.seg_state[s], SegState::Sealed { seq } if seq <= ckpt_seq)
                && space.seg_live[s] == 0
            {
                space.set_state(s as u32, SegState::Free);
                freed.push(s as u32);
            }
        }
        self.note_freed(&mut space, &freed);
        drop(space);
        drop(ck);
        self.give_back_freed();
        Ok(freed.len() as u64)
    }

    /// Empty up to `max_victims` sealed segments, best cost-benefit first (LFS: the free space
    /// gained times its age, over the cost of reading and rewriting the live part), moving their
    /// live blocks through the shards' logs, then checkpoint so the victims are freed. Only
    /// segments at most `max_utilisation` full are considered.
    ///
    /// With `greedy` (writes are waiting), victims are the emptiest segments instead: they give
    /// the most space now for the least copying (cost-benefit's age term prefers old, fuller
    /// segments, which pays off only when there is time to wait for the young ones to die).
    fn clean(
        &self,
        max_victims: usize,
        max_utilisation: f64,
        only: Option<&[u32]>,
        greedy: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<GcReport> {
        let _one = self.gc_lock.lock();
        let t0 = std::time::Instant::now();
        let usable = (self.geo.segment_bytes - SEGMENT_HEADER_BYTES) as f64;
        let ckpt_reserve = self.ckpt_reserve();
        // Lock order: checkpoint state before space.
        let ckpt_seq = self.ckpt.lock().both_seq;
        let (victims, moves_by_victim) = {
            let mut space = self.space.lock();
            let now = self.seq.load(Ordering::Acquire);
            let mut cands: Vec<(f64, u32)> = space
                .seg_state
                .iter()
                .enumerate()
                .filter_map(|(s, st)| match *st {
                    SegState::Sealed { seq }
                        if space.seg_live[s] > 0
                            && only.is_none_or(|o| o.contains(&(s as u32))) =>
                    {
                        let u = space.seg_live[s] as f64 / usable;
                        let age = now.saturating_sub(seq) as f64 + 1.0;
                        let score = if greedy {
                            1.0 - u
                        } else {
                            (1.0 - u) * age / (1.0 + u)
                        };
                        (u <= max_utilisation).then_some((score, s as u32))
                    }
                    _ => None,
                })
                .collect();
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            // Victims are freed only at the checkpoint after their moves: take no more live
            // data than the free space beyond the checkpoint reserve holds.
            let room = (space.free_segments.saturating_sub(ckpt_reserve + 1)) as f64 * usable;
            let mut taken = 0.0;
            let mut victims: Vec<u32> = Vec::new();
            for (_, s) in cands {
                let live = space.seg_live[s as usize] as f64;
                if victims.len() >= max_victims || (taken + live > room && !victims.is_empty()) {
                    break;
                }
                if taken + live > room {
                    break;
                }
                taken += live;
                victims.push(s);
            }
            space.cleaning.clone_from(&victims);
            // Oldest victims first: their live blocks are the coldest, and the pass's moves
            // land back to back in this order, so blocks of like age share segments (LFS sorts
            // moved blocks by age for the same reason).
            victims.sort_by_key(|&v| match space.seg_state[v as usize] {
                SegState::Sealed { seq } => seq,
                _ => u64::MAX,
            });
            let mut moves: Vec<Vec<(u64, BlockEntry)>> = vec![Vec::new(); victims.len()];
            // Segment -> victim index, so the scan of the block table is one lookup per block.
            let mut victim_of = vec![u32::MAX; space.seg_state.len()];
            for (i, &v) in victims.iter().enumerate() {
                victim_of[v as usize] = i as u32;
            }
            for (id, e) in space.blocks.iter().enumerate() {
                if e.refs > 0 {
                    if let Some(&i) = victim_of
                        .get(e.segment as usize)
                        .filter(|&&i| i != u32::MAX)
                    {
                        moves[i as usize].push((id as u64, *e));
                    }
                }
            }
            (victims, moves)
        };
        let mut report = GcReport::default();
        if std::env::var_os("INGOT_GC_DEBUG").is_some() {
            let space = self.space.lock();
            let us: Vec<String> = victims
                .iter()
                .map(|&v| {
                    let old = matches!(space.seg_state[v as usize], SegState::Sealed { seq } if seq <= ckpt_seq);
                    format!("{:.2}{}", space.seg_live[v as usize] as f64 / usable, if old { "" } else { "r" })
                })
                .collect();
            eprintln!(
                "gc: greedy={greedy} free={} victims {}",
                space.free_segments,
                us.join(" ")
            );
        }
        if victims.is_empty() {
            return Ok(report);
        }
        self.counters
            .gc_cleaning
            .store(victims.len() as u64, Ordering::Relaxed);
        let total = victims.len() as u64;
        let mut result = Ok(());
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut sent = 0;
        // Victims are gathered VICTIM_READS at a time, each on a thread of its own, so the
        // device sees more than one read at once (reading in parallel gave 28.7k and 29.4k IOPS
        // at 90% full against 28.2k and 26.1k, alternating runs).
        let mut done = 0u64;
        // Victims are freed a group at a time, as soon as their moves are durable, one group
        // behind the gathers: writes waiting at the data reserve get space back every few
        // victims rather than at the end of the pass (at 90% full, p99 write latency was the
        // length of a pass, 40-90 ms). The next group is read meanwhile: with reads and
        // syncs in turn, a pass of ten victims at 90% full took 165 ms, pipelined 120 ms.
        let mut behind: Option<(&[VictimMoves<'_>], usize)> = None;
        let mut waited = 0usize;
        let chunks: Vec<_> = victims.iter().zip(&moves_by_victim).collect();
        // Time spent waiting for gathers, for moves to be written, and syncing and freeing
        // (`INGOT_GC_DEBUG`).
        let mut waits = [Duration::ZERO; 3];
        let groups: Vec<&[VictimMoves<'_>]> = chunks.chunks(VICTIM_READS).collect();
        std::thread::scope(|sc| {
            let groups = &groups;
            let start_reads = |g: usize| -> Vec<_> {
                groups[g]
                    .iter()
                    .map(|&(&seg, blocks)| sc.spawn(move || self.gather_victim(seg, blocks)))
                    .collect()
            };
            let mut reading = (!groups.is_empty()).then(|| start_reads(0));
            for (i, &chunk) in groups.iter().enumerate() {
                let t = std::time::Instant::now();
                let gathered: Vec<Result<Vec<Relocation>>> = reading
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|h| h.join().unwrap_or(Err(Error::ShutDown)))
                    .collect();
                waits[0] += t.elapsed();
                // The next group is gathered while this one is moved and the one before is
                // synced and freed.
                reading = (i + 1 < groups.len()).then(|| start_reads(i + 1));
                for payloads in gathered {
                    match payloads {
                        Ok(p) => self.evacuate(p, &mut report, &tx, &mut sent),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                    report.segments_cleaned += 1;
                    done += 1;
                    progress(done, total);
                }
                if result.is_err() {
                    break;
                }
                if let Some((prev, upto)) = behind.replace((chunk, sent)) {
                    let t = std::time::Instant::now();
                    let r = self.finish_moves(&rx, upto - waited);
                    waited = upto;
                    waits[1] += t.elapsed();
                    let t = std::time::Instant::now();
                    let r = r.and_then(|()| self.free_moved(prev, ckpt_seq, &mut report));
                    waits[2] += t.elapsed();
                    if let Err(e) = r {
                        result = Err(e);
                        break;
                    }
                }
            }
            // Gathers still running after an error are waited for here: the scope would
            // re-raise a panic of one of them on this thread.
            for h in reading.take().unwrap_or_default() {
                let _ = h.join();
            }
        });
        // Whatever was sent is written and waited for, even after an error.
        let finished = self.finish_moves(&rx, sent - waited);
        // No move of this pass is pending any more.
        self.space.lock().cleaning.clear();
        self.counters.gc_cleaning.store(0, Ordering::Relaxed);
        result?;
        finished?;
        if let Some((last, _)) = behind {
            self.free_moved(last, ckpt_seq, &mut report)?;
        }
        if std::env::var_os("INGOT_GC_DEBUG").is_some() {
            eprintln!(
                "gc: pass {} in {:?} (gathers {:?}, moves {:?}, syncs and frees {:?})",
                victims.len(),
                t0.elapsed(),
                waits[0],
                waits[1],
                waits[2]
            );
        }
        let recent: Vec<u32> = {
            let space = self.space.lock();
            victims
                .iter()
                .copied()
                .filter(|&v| matches!(space.seg_state[v as usize], SegState::Sealed { seq } if seq > ckpt_seq))
                .collect()
        };
        // A checkpoint costs about 1.4% of the data whatever it frees: emptied victims sealed
        // since the last one wait (they are freed by the next) until they are worth it, unless
        // writes are waiting for them or the caller wants the space now.
        let urgent_at = self.urgent_threshold();
        let worth = {
            let space = self.space.lock();
            let waiting = space.seg_state.iter().enumerate().filter(|&(s, st)| {
                matches!(*st, SegState::Sealed { seq } if seq > ckpt_seq) && space.seg_live[s] == 0
            });
            let urgent = space.free_segments <= urgent_at;
            urgent || only.is_some() || waiting.count() >= 4 * ckpt_reserve
        };
        if !recent.is_empty() && worth {
            let before = self.space.lock().free_segments;
            self.checkpoint_with(None)?;
            let after = self.space.lock().free_segments;
            report.segments_freed += after.saturating_sub(before) as u64;
        }
        Ok(report)
    }

    /// Free the victims in `chunk` whose moves are durable now (after `finish_moves`): those
    /// sealed before the last checkpoint (`ckpt_seq`) are outside every replay chain, so once
    /// the moves are durable and no read of them is in flight they are free. The others are
    /// freed by a checkpoint (replay may still walk through them).
    fn free_moved(
        &self,
        chunk: &[VictimMoves<'_>],
        ckpt_seq: u64,
        report: &mut GcReport,
    ) -> Result<()> {
        let old: Vec<u32> = {
            let space = self.space.lock();
            chunk
                .iter()
                .map(|&(&v, _)| v)
                .filter(|&v| matches!(space.seg_state[v as usize], SegState::Sealed { seq } if seq <= ckpt_seq))
                .collect()
        };
        if old.is_empty() {
            return Ok(());
        }
        self.sync_completed()?;
        self.fence()?;
        // The checkpoint lock keeps `check` (which reads by location) and a commit out.
        let ck = self.ckpt.lock();
        let mut space = self.space.lock();
        let mut freed = Vec::new();
        for &v in &old {
            if matches!(space.seg_state[v as usize], SegState::Sealed { .. })
                && space.seg_live[v as usize] == 0
            {
                space.set_state(v, SegState::Free);
                freed.push(v);
            }
        }
        self.note_freed(&mut space, &freed);
        drop(space);
        drop(ck);
        report.segments_freed += freed.len() as u64;
        self.give_back_freed();
        Ok(())
    }

    /// Note that `segs`, just freed, still hold their old blocks in the backing file.
    fn note_freed(&self, space: &mut Space, segs: &[u32]) {
        self.note_write_back_room(space);
        if self.discard_freed {
            for &s in segs {
                if let Some(u) = space.undiscarded.get_mut(s as usize) {
                    *u = true;
                    space.undiscarded_count += 1;
                }
            }
        }
    }

    /// At open: mark the free segments whose blocks the backing files still hold (freed while
    /// space was short and not punched before the pool stopped; the marks live only in
    /// memory), so that `give_back_freed` returns them to the file system once space allows.
    /// Where allocation cannot be known (block devices), every free segment is marked: it is
    /// discarded once, as `fstrim` at mount would.
    fn note_unpunched_at_open(&self) {
        mark_held_free(&*self.devices, &self.geo, &mut self.space.lock());
    }

    /// Give the blocks of freed segments back to the file system (punch holes; best effort),
    /// while more than twice the cleaning threshold stays free.
    ///
    /// A segment being punched is `Discarding`, not `Free`: a shard that took it and wrote
    /// records into it before the punch reached the file would lose them. When space is short,
    /// freed segments stay `Free` and unpunched: a shard takes them soon, and punching them
    /// would only make that shard's writes allocate the blocks again, while ext4's punch waits
    /// for every direct write in flight to the file (writers at 90% full stalled behind it). A
    /// later call, once space is back, gives them back.
    fn give_back_freed(&self) {
        if !self.discard_freed {
            return;
        }
        let keep = 2 * self.cleaning_threshold();
        let taken: Vec<u32> = {
            let mut space = self.space.lock();
            let mut taken = Vec::new();
            if space.undiscarded_count > 0 {
                let mut capped = false;
                // Segments kept allocated for checkpoints and the cleaner are not given back.
                let mut held = space.backed_free();
                for s in 0..space.seg_state.len() {
                    if space.free_segments <= keep || held <= space.backed_reserve {
                        capped = held <= space.backed_reserve;
                        break;
                    }
                    if taken.len() >= GIVE_BACK_PER_CALL {
                        capped = true;
                        break;
                    }
                    if space.undiscarded[s] && space.seg_state[s] == SegState::Free {
                        space.set_state(s as u32, SegState::Discarding);
                        taken.push(s as u32);
                        held -= 1;
                    }
                }
                if space.free_segments > keep && !capped {
                    // Every marked segment still free was taken; the others are in use again.
                    space.undiscarded_count = 0;
                }
                self.note_write_back_room(&space);
            }
            taken
        };
        if taken.is_empty() {
            return;
        }
        // Runs of adjacent segments of one device go in one call.
        let seg_bytes = self.geo.segment_bytes;
        let mut i = 0;
        while i < taken.len() {
            let (dev, base) = self.geo.locate(taken[i]);
            let mut j = i + 1;
            while j < taken.len()
                && taken[j] == taken[j - 1] + 1
                && self.geo.locate(taken[j]) == (dev, base + (j - i) as u64 * seg_bytes)
            {
                j += 1;
            }
            let _ = self.devices.discard(dev, base, (j - i) as u64 * seg_bytes);
            i = j;
        }
        let mut space = self.space.lock();
        for &s in &taken {
            if let Some(u) = space.undiscarded.get_mut(s as usize) {
                *u = false;
            }
            space.set_state(s, SegState::Free);
        }
    }

    /// The live payloads of victim `seg` (`blocks`: its live blocks), ready for the mover.
    /// Uncompressed blocks the block cache holds (checked against their CRC) come from there;
    /// the rest are read from the device in 4 KiB-aligned extents that skip dead and cached
    /// stretches. At 90% full under uniform overwrites victims are ~70% live and the device's
    /// bandwidth bounds the cleaner: reading them whole was half of its traffic.
    fn gather_victim(&self, seg: u32, blocks: &[(u64, BlockEntry)]) -> Result<Vec<Relocation>> {
        let seg_bytes = self.geo.segment_bytes as usize;
        let mut live: Vec<&(u64, BlockEntry)> = blocks.iter().collect();
        live.sort_unstable_by_key(|(_, e)| e.offset);
        // One relocation per stored payload, with every live block it holds (the blocks of a
        // compressed group share one payload).
        let mut payloads: Vec<Relocation> = Vec::with_capacity(live.len());
        // Stored length of each payload.
        let mut lens: Vec<usize> = Vec::with_capacity(live.len());
        // (payload index, block id, generation) of raw blocks to look for in the caches.
        let mut wanted: Vec<(usize, u64, u32)> = Vec::with_capacity(live.len());
        for &&(id, e) in &live {
            if e.offset as usize + usize::from(e.stored_len) > seg_bytes {
                continue;
            }
            match payloads.last_mut() {
                Some(r) if r.from_offset == e.offset => r.members.push(id, e.flags),
                _ => {
                    if e.flags & crate::format::FLAG_LZ4 == 0
                        && u64::from(e.stored_len) == BLOCK_BYTES
                    {
                        wanted.push((payloads.len(), id, e.generation));
                    }
                    lens.push(usize::from(e.stored_len));
                    payloads.push(Relocation {
                        from_segment: seg,
                        from_offset: e.offset,
                        data: Bytes::new(),
                        crc: e.crc,
                        members: Members::one(id, e.flags),
                        from_cache: false,
                    });
                }
            }
        }
        let mut found: Vec<(usize, Bytes)> = Vec::with_capacity(live.len());
        for cache in &self.caches {
            if wanted.is_empty() {
                break;
            }
            let cache = cache.lock();
            wanted.retain(|&(i, id, generation)| match cache.peek(id, generation) {
                Some(b) => {
                    found.push((i, b));
                    false
                }
                None => true,
            });
        }
        let mut have = vec![false; payloads.len()];
        let mut from_cache = 0u64;
        for (i, b) in found {
            // A raw payload is the block itself. The mover checks the copy against the CRC
            // once it is in the record (checking it here, on data no core had in its caches,
            // was a tenth of the server's CPU at 90% full).
            if b.len() == BLOCK_BYTES as usize {
                from_cache += b.len() as u64;
                payloads[i].data = b;
                payloads[i].from_cache = true;
                have[i] = true;
            }
        }
        // Extents (start, end) in the segment covering what the caches did not give.
        let mut extents: Vec<(usize, usize)> = Vec::new();
        let missing: Vec<usize> = (0..payloads.len()).filter(|&i| !have[i]).collect();
        for &i in &missing {
            let off = payloads[i].from_offset as usize;
            let start = off / IO_ALIGN * IO_ALIGN;
            let end = (off + lens[i]).next_multiple_of(IO_ALIGN).min(seg_bytes);
            match extents.last_mut() {
                Some(x) if start <= x.1 + VICTIM_READ_GAP && end - x.0 <= VICTIM_READ_PIECE => {
                    x.1 = x.1.max(end);
                }
                _ => extents.push((start, end)),
            }
        }
        let total: usize = extents.iter().map(|&(a, b)| b - a).sum();
        if total > 0 {
            let (dev, base) = self.geo.locate(seg);
            // SAFETY: the extents cover the buffer exactly; each read fills its part (or fails
            // before anything looks at it).
            let mut buf = unsafe { AlignedBuf::new_uninit(total) };
            let mut at = 0;
            // In pieces of at most VICTIM_READ_PIECE: one 8 MiB read held the writes queued
            // behind it on the device (p99 of 4k writes at 90% full 20 ms with whole segments,
            // 12 ms with 1 MiB pieces).
            for &(a, b) in &extents {
                let off = base + a as u64;
                self.devices
                    .read_at(dev, &mut buf[at..at + (b - a)], off)
                    .map_err(|source| Error::Io {
                        device: dev,
                        offset: off,
                        source,
                    })?;
                at += b - a;
            }
            let buf = Bytes::from_owner(buf);
            self.counters
                .gc_read
                .fetch_add(total as u64, Ordering::Relaxed);
            // Slices keep the whole buffer alive until the moves are written: worth it only
            // when most of it moves; a mostly dead read has its few payloads copied out.
            let needed: usize = missing.iter().map(|&i| lens[i]).sum();
            let share = 2 * needed >= total;
            let (mut x, mut x_at) = (0, 0);
            for &i in &missing {
                let r = &mut payloads[i];
                let off = r.from_offset as usize;
                // Extents may overlap by a page where one was cut at VICTIM_READ_PIECE: the
                // payload is in the first that holds all of it.
                while extents[x].1 < off + lens[i] {
                    x_at += extents[x].1 - extents[x].0;
                    x += 1;
                }
                let from = x_at + off - extents[x].0;
                let to = from + lens[i];
                r.data = if share {
                    buf.slice(from..to)
                } else {
                    Bytes::copy_from_slice(&buf[from..to])
                };
            }
        }
        self.counters
            .gc_from_cache
            .fetch_add(from_cache, Ordering::Relaxed);
        Ok(payloads)
    }

    /// Send one victim's payloads to the mover, up to a record's worth of entries per
    /// message (`finish_moves` waits for them). Counts the jobs sent on `tx` in `sent`.
    fn evacuate(
        &self,
        mut payloads: Vec<Relocation>,
        report: &mut GcReport,
        tx: &Sender<Result<()>>,
        sent: &mut usize,
    ) {
        while !payloads.is_empty() {
            let mut entries = 0;
            let take = payloads
                .iter()
                .take_while(|r| {
                    entries += r.members.len();
                    entries <= crate::format::MAX_RECORD_ENTRIES
                })
                .count()
                .max(1);
            let moves: Vec<Relocation> = payloads.drain(..take).collect();
            report.bytes_moved += moves.iter().map(|m| m.data.len() as u64).sum::<u64>();
            self.send_moves(moves, tx);
            *sent += 1;
        }
    }

    fn send_moves(&self, moves: Vec<Relocation>, tx: &Sender<Result<()>>) {
        let tx = tx.clone();
        let job = Job::new(
            1,
            None,
            None,
            Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()));
            }),
        );
        self.send_to_shard(self.mover(), ShardMsg::Relocate { moves, job });
    }

    /// End a pass: wait for all `sent` move jobs to be written.
    fn finish_moves(&self, rx: &Receiver<Result<()>>, sent: usize) -> Result<()> {
        let mut first = Ok(());
        for _ in 0..sent {
            let r = rx.recv().map_err(|_| Error::ShutDown).and_then(|r| r);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn lookup(&self, name: &str) -> Option<Arc<VolumeState>> {
        self.volumes.read().by_name.get(name).cloned()
    }

    /// Take a checkpoint. `mutate` runs while every shard is paused, before the snapshot, with
    /// the sequence number that the checkpoint will cover (volume create, delete, resize).
    fn checkpoint_with(&self, mutate: Option<Mutate<'_>>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("the pool (opened read-only)".into()));
        }
        let r = self.checkpoint_with_inner(mutate);
        // Segments the commit freed go back to the file system now, outside the checkpoint
        // lock (a punch waits for every direct write in flight to the file).
        self.give_back_freed();
        self.top_up_backed();
        r
    }

    fn checkpoint_with_inner(&self, mutate: Option<Mutate<'_>>) -> Result<()> {
        let starved = self.checkpoint_once(mutate)?;
        // A shard that found no free segment at the pause kept appending to its open segment
        // with no next one; if this checkpoint freed segments, a second one gives it a fresh
        // chain, so writes succeed again right away instead of failing until the next kick.
        if starved {
            let reserve = self.reserve_segments();
            let free = self.space.lock().free_segments;
            // The change is committed already: a failure here is not the caller's (the chain
            // stays as it is and the next checkpoint tries again).
            if free > reserve + 1 {
                if let Err(e) = self.checkpoint_once(None) {
                    eprintln!("ingot: checkpoint for a new chain failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// One checkpoint; returns whether a shard was left without a next segment.
    fn checkpoint_once(&self, mutate: Option<Mutate<'_>>) -> Result<bool> {
        if self.is_faulted() {
            return Err(self.halted());
        }
        let mut ck = self.ckpt.lock();
        let paused_at = std::time::Instant::now();
        let (ptx, prx) = crossbeam_channel::unbounded();
        let mut resumes = Vec::new();
        let mut positions = vec![None; self.chains()];
        for (i, tx) in self.senders.iter().enumerate() {
            let (rtx, rrx) = crossbeam_channel::bounded::<()>(1);
            let (one_tx, one_rx) = crossbeam_channel::bounded(1);
            if tx
                .send(ShardMsg::Pause {
                    paused: one_tx,
                    resume: rrx,
                })
                .is_err()
            {
                return Err(Error::ShutDown);
            }
            resumes.push(rtx);
            let ptx = ptx.clone();
            // Collect replies tagged with the shard number.
            std::thread::spawn(move || {
                if let Ok(r) = one_rx.recv() {
                    let _ = ptx.send((i, r));
                }
            });
        }
        drop(ptx);
        let mut first_err = None;
        for _ in 0..self.chains() {
            match prx.recv() {
                Ok((i, Ok(pos))) => positions[i] = Some(pos),
                Ok((_, Err(e))) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some(Error::ShutDown)),
            }
        }
        let seq_end = self.seq.load(Ordering::Acquire);
        if let Some(e) = first_err {
            // Paused shards moved to new chains that only a checkpoint reaches.
            self.chain_broken.store(true, Ordering::Release);
            return Err(e);
        }
        let mutated = match mutate {
            Some(m) => m(self, seq_end.saturating_sub(1)),
            None => Ok(()),
        };
        let positions: Vec<ShardPosition> = positions
            .into_iter()
            .map(|p| {
                p.unwrap_or(ShardPosition {
                    segment: NO_SEGMENT,
                    offset: 0,
                    next: NO_SEGMENT,
                    shard_seq: 0,
                    nonce: None,
                })
            })
            .collect();
        let starved = positions.iter().any(|p| p.next == NO_SEGMENT);
        let (image, live_then) = self.snapshot(seq_end, positions);
        self.chain_broken.store(false, Ordering::Release);
        drop(resumes);
        if std::env::var_os("INGOT_GC_DEBUG").is_some() {
            eprintln!("checkpoint: shards paused {:?}", paused_at.elapsed());
        }
        // Commit even when the mutation was refused (volume exists, not found): the shards
        // have restarted their chains, possibly in segments only this checkpoint reaches, and a
        // broken chain was just marked repaired.
        if let Err(e) = self.commit(&mut ck, &image, &live_then) {
            self.chain_broken.store(true, Ordering::Release);
            return Err(e);
        }
        mutated?;
        Ok(starved)
    }

    /// A consistent image of the current state (shards paused, or not yet running).
    fn snapshot(&self, seq_end: u64, shards: Vec<ShardPosition>) -> (Image, Vec<u64>) {
        let vols = self.volumes.read();
        let n = self.shards().max(1);
        let mut volumes = Vec::new();
        for v in vols.by_name.values() {
            let maps: Vec<_> = v.maps.iter().map(|m| m.lock().pages.clone()).collect();
            let npages = maps.first().map_or(0, Vec::len);
            let mut pages = Vec::new();
            for p in 0..npages {
                if let Some(Some(page)) = maps[p % n].get(p) {
                    pages.push((p as u64, page.clone()));
                }
            }
            volumes.push(VolumeImage {
                id: v.id,
                name: v.name.clone(),
                size_bytes: v.size(),
                flags: v.flags(),
                domain: v.dedup_domain(),
                pages,
            });
        }
        let space = self.space.lock();
        let (index, index_sample_bits) = {
            let mut d = self.dedup.lock();
            d.retain(|id| space.blocks.get(id as usize).is_some_and(|b| b.refs > 0));
            (d.entries(), d.sample_bits() as u8)
        };
        let image = Image {
            seq: seq_end,
            epoch: self.epoch,
            next_volume_id: vols.next_id,
            volumes,
            blocks: space.blocks.clone(),
            shards,
            data_chains: self.shards(),
            index,
            index_sample_bits,
            keyed_fingerprints: true,
        };
        (image, space.seg_live.clone())
    }

    /// Write a checkpoint image, make it and everything before it durable, point the
    /// superblocks at it, then free what it no longer needs.
    fn commit(&self, ck: &mut CkptState, image: &Image, live_then: &[u64]) -> Result<()> {
        // The image may come from state a failed thread left half changed.
        if self.is_faulted() {
            return Err(self.halted());
        }
        let blob = checkpoint::encode(image);
        if std::env::var_os("INGOT_GC_DEBUG").is_some() {
            eprintln!("checkpoint: {} bytes", blob.len());
        }
        let crc = crc32fast::hash(&blob);
        let per_seg = (self.geo.segment_bytes - SEGMENT_HEADER_BYTES) as usize;
        let nsegs = blob.len().div_ceil(per_seg).max(1);
        let segs: Vec<u32> = {
            let mut space = self.space.lock();
            let mut got = Vec::new();
            for _ in 0..nsegs {
                match space.alloc_segment(SegState::Checkpoint, 0) {
                    Some(s) => got.push(s),
                    None => {
                        for &s in &got {
                            space.set_state(s, SegState::Free);
                        }
                        return Err(Error::NoSpace);
                    }
                }
            }
            self.note_write_back_room(&space);
            got
        };
        let segs = self.backed(segs, SegState::Checkpoint)?;
        let mut write = || -> Result<()> {
            for (i, &seg) in segs.iter().enumerate() {
                let chunk = &blob[i * per_seg..((i + 1) * per_seg).min(blob.len())];
                let mut buf = AlignedBuf::new(SEGMENT_HEADER_BYTES as usize + chunk.len());
                SegmentHeader {
                    kind: SegmentKind::Checkpoint,
                    segment: seg,
                    shard: 0,
                    pool_uuid: self.pool_uuid,
                    epoch: image.epoch,
                    next_segment: segs.get(i + 1).copied().unwrap_or(NO_SEGMENT),
                    nonce: self.segment_nonce(seg),
                }
                .encode(&mut buf, &self.log_key);
                buf[SEGMENT_HEADER_BYTES as usize..SEGMENT_HEADER_BYTES as usize + chunk.len()]
                    .copy_from_slice(chunk);
                let (dev, base) = self.geo.locate(seg);
                self.devices
                    .write_at(dev, &buf, base)
                    .map_err(|source| Error::Io {
                        device: dev,
                        offset: base,
                        source,
                    })?;
                self.counters
                    .device_written
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
            self.counters.checkpoint_bytes.fetch_add(
                (blob.len() + segs.len() * SEGMENT_HEADER_BYTES as usize) as u64,
                Ordering::Relaxed,
            );
            // Records before the checkpoint and the checkpoint itself, durable before the
            // superblock points at it.
            self.sync()?;
            let generation = ck.generation + 1;
            // The copy the older generation is not in first, then the other: a torn write of
            // either leaves one copy pointing at a checkpoint that still exists.
            self.write_superblocks(image, &segs, blob.len() as u64, crc, generation, generation)?;
            ck.generation = generation;
            Ok(())
        };
        if let Err(e) = write() {
            let mut space = self.space.lock();
            for &s in &segs {
                space.set_state(s, SegState::Free);
            }
            return Err(e);
        }
        let second = self.write_superblocks(
            image,
            &segs,
            blob.len() as u64,
            crc,
            ck.generation,
            ck.generation + 1,
        );
        let mut space = self.space.lock();
        // Once both copies point at the new checkpoint the previous one is unreferenced; if the
        // second copy could not be written it still points at the previous one, kept until the
        // next commit.
        let mut freed = std::mem::take(&mut ck.prev_segments);
        if second.is_ok() {
            freed.extend(std::mem::take(&mut ck.segments));
        } else {
            for &s in &ck.segments {
                space.set_state(s, SegState::OldCheckpoint);
            }
        }
        for &s in &freed {
            space.set_state(s, SegState::Free);
        }
        if second.is_ok() {
            ck.both_seq = image.seq;
            freed.extend(space.reclaim(image.seq, live_then));
        }
        self.ckpt_at_ms.store(
            self.host_epoch.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
        space.release_ids(image.seq);
        self.note_freed(&mut space, &freed);
        drop(space);
        ck.prev_segments = std::mem::replace(&mut ck.segments, segs);
        ck.seq_end = image.seq;
        ck.written_at_last = self.counters.client_written.load(Ordering::Relaxed);
        second
    }

    /// Point every device's superblock copy at slot `slot % 2` to the checkpoint in `segs`,
    /// durably.
    fn write_superblocks(
        &self,
        image: &Image,
        segs: &[u32],
        bytes: u64,
        crc: u32,
        generation: u64,
        slot: u64,
    ) -> Result<()> {
        let mut buf = AlignedBuf::new(IO_ALIGN);
        for sb in &self.superblocks {
            let sb = Superblock {
                generation,
                checkpoint_segment: segs[0],
                checkpoint_seq: image.seq,
                checkpoint_bytes: bytes,
                checkpoint_crc: crc,
                ..sb.clone()
            };
            sb.encode(&mut buf);
            let off = SUPERBLOCK_OFFSETS[(slot % 2) as usize];
            self.devices
                .write_at(sb.device_index, &buf, off)
                .map_err(|source| Error::Io {
                    device: sb.device_index,
                    offset: off,
                    source,
                })?;
        }
        self.sync()
    }

    pub fn sync(&self) -> Result<()> {
        self.devices.sync().map_err(|source| Error::Io {
            device: 0,
            offset: 0,
            source,
        })
    }
}

fn fail_msg(msg: ShardMsg) {
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
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    dir: PathBuf,
    _lock: File,
    /// The devices, locked against other pools while this one is open.
    _claim: DeviceClaim,
    halted: AtomicBool,
}

fn validate_name(name: &str) -> Result<()> {
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

fn validate_size(size: u64) -> Result<()> {
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

fn lock_dir(dir: &Path) -> Result<File> {
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

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Mark the free segments whose blocks the backing files still hold (see
/// `Inner::note_unpunched_at_open`).
fn mark_held_free(devices: &dyn Devices, geo: &Geometry, space: &mut Space) {
    let ranges: Vec<Option<Vec<(u64, u64)>>> = (0..devices.count())
        .map(|d| devices.data_ranges(d as u16).unwrap_or(None))
        .collect();
    for s in 0..space.seg_state.len() {
        if space.seg_state[s] != SegState::Free {
            continue;
        }
        let (dev, base) = geo.locate(s as u32);
        let end = base + geo.segment_bytes;
        let held = match &ranges[usize::from(dev)] {
            None => true,
            Some(r) => {
                // Sorted and disjoint: the first range ending past `base` is the only
                // candidate.
                let i = r.partition_point(|&(_, e)| e <= base);
                r.get(i).is_some_and(|&(start, _)| start < end)
            }
        };
        if held && !space.undiscarded[s] {
            space.undiscarded[s] = true;
            space.undiscarded_count += 1;
        }
    }
}

/// Device paths as given, relative ones inside the pool directory.
fn in_dir(dir: &Path, paths: &[PathBuf]) -> Vec<PathBuf> {
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
fn write_pool_file(dir: &Path, pf: &PoolFile) -> Result<()> {
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
        .and_then(|mut f| f.write_all(&json))
        .and_then(|()| std::fs::rename(&tmp, dir.join(POOL_FILE)))
        .map_err(|source| Error::File {
            path: dir.join(POOL_FILE),
            source,
        })
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut u);
    }
    u
}

fn default_index_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let total = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    (total / 50).max(64 << 20)
}

fn default_cache_bytes() -> u64 {
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

impl Pool {
    /// True when `dir` holds a pool.
    pub fn exists(dir: &Path) -> bool {
        dir.join(POOL_FILE).exists()
    }

    /// Create a pool in `dir` (created if missing; must not hold a pool) and open it.
    pub fn create(dir: &Path, c: &CreateOptions, o: &PoolOptions) -> Result<Pool> {
        use std::os::unix::fs::OpenOptionsExt; // files of a pool are its owner's only: 0600
        let seg = c.segment_bytes;
        if !seg.is_power_of_two() || !(2 << 20..=1 << 30).contains(&seg) {
            return Err(Error::InvalidSize {
                size: seg,
                reason: "segment size must be a power of two from 2 MiB to 1 GiB",
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::File {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock = lock_dir(dir)?;
        if Pool::exists(dir) {
            return Err(Error::InvalidSize {
                size: 0,
                reason: "the directory already holds a pool",
            });
        }
        let paths: Vec<PathBuf> = if c.devices.is_empty() {
            vec![PathBuf::from("dev0.img")]
        } else {
            c.devices.clone()
        };
        let per_dev = c.size_bytes / paths.len() as u64;
        let abs = in_dir(dir, &paths);
        if per_dev / seg < 4 && abs.iter().any(|p| !is_block_device(p)) {
            return Err(Error::InvalidSize {
                size: c.size_bytes,
                reason: "a pool needs at least 4 segments per device",
            });
        }
        // One device, one pool: claimed before anything is written to it, and not overwritten
        // when it holds data or another pool unless told to.
        let claim = DeviceClaim::acquire(&abs, true)?;
        if !c.force {
            claim.refuse_used()?;
        }
        for full in &abs {
            if !is_block_device(full) {
                let segs = per_dev / seg;
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o600)
                    .open(full)
                    .map_err(|source| Error::File {
                        path: full.clone(),
                        source,
                    })?;
                f.set_len(DATA_START + segs * seg)
                    .map_err(|source| Error::File {
                        path: full.clone(),
                        source,
                    })?;
                // Sparse: each segment is allocated (fallocate) when a shard reserves it, one
                // ahead of use, so an idle pool takes no disk and writes still land in allocated
                // extents.
            }
        }
        let files = FileSet::open(&abs).map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        if c.prefill {
            let zero = AlignedBuf::new(8 << 20);
            for (d, path) in abs.iter().enumerate() {
                let end = files.size(d as u16);
                let mut off = DATA_START;
                while off < end {
                    let n = (end - off).min(zero.len() as u64) as usize;
                    files
                        .write_at(d as u16, &zero[..n], off)
                        .map_err(|source| Error::File {
                            path: path.clone(),
                            source,
                        })?;
                    off += n as u64;
                }
            }
        }
        let pool_uuid = random_uuid();
        let log_key = LogKey::generate().map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        let mut first = 0u32;
        let mut buf = AlignedBuf::new(IO_ALIGN);
        let created = now_unix();
        let mut sbs = Vec::new();
        let total: u32 = (0..abs.len())
            .map(|d| ((files.size(d as u16).saturating_sub(DATA_START)) / seg) as u32)
            .sum();
        for d in 0..abs.len() {
            let count = (files.size(d as u16).saturating_sub(DATA_START) / seg) as u32;
            let sb = Superblock {
                version: crate::format::FORMAT_VERSION,
                log_key: Some(log_key),
                device_index: d as u16,
                device_count: abs.len() as u16,
                pool_uuid,
                device_uuid: random_uuid(),
                generation: 0,
                segment_bytes: seg,
                first_segment: first,
                segment_count: count,
                total_segments: total,
                checkpoint_segment: NO_SEGMENT,
                checkpoint_seq: 0,
                checkpoint_bytes: 0,
                checkpoint_crc: 0,
                created_unix: created,
            };
            sb.encode(&mut buf);
            for off in SUPERBLOCK_OFFSETS {
                files
                    .write_at(d as u16, &buf, off)
                    .map_err(|source| Error::File {
                        path: abs[d].clone(),
                        source,
                    })?;
            }
            sbs.push(sb);
            first += count;
        }
        {
            files.sync().map_err(|source| Error::File {
                path: abs[0].clone(),
                source,
            })?;
        }
        drop(files);
        let pf = PoolFile {
            format_version: crate::format::FORMAT_VERSION,
            devices: paths,
            prefilled: c.prefill,
            pool_uuid: Some(claim::uuid_string(&pool_uuid)),
        };
        write_pool_file(dir, &pf)?;
        Pool::open_locked(dir, o, lock, Some(claim))
    }

    /// Open an existing pool: load the newest checkpoint, replay the log after it, write a new
    /// checkpoint, start the workers.
    pub fn open(dir: &Path, o: &PoolOptions) -> Result<Pool> {
        if !Pool::exists(dir) {
            return Err(Error::NotAPool {
                path: dir.to_path_buf(),
                reason: "no pool.json",
            });
        }
        let lock = lock_dir(dir)?;
        Pool::open_locked(dir, o, lock, None)
    }

    fn open_locked(
        dir: &Path,
        o: &PoolOptions,
        lock: File,
        claim: Option<DeviceClaim>,
    ) -> Result<Pool> {
        let pf_path = dir.join(POOL_FILE);
        let raw = std::fs::read(&pf_path).map_err(|source| Error::File {
            path: pf_path.clone(),
            source,
        })?;
        let pf: PoolFile = serde_json::from_slice(&raw).map_err(|_| Error::NotAPool {
            path: pf_path.clone(),
            reason: "pool.json is not valid",
        })?;
        if pf.devices.is_empty() {
            return Err(Error::NotAPool {
                path: pf_path,
                reason: "pool.json lists no devices",
            });
        }
        let abs = in_dir(dir, &pf.devices);
        // Each device once, locked, and of this pool.
        let claim = match claim {
            Some(c) => c,
            None => DeviceClaim::acquire(&abs, false)?,
        };
        claim.check_members(pf.pool_uuid.as_deref())?;
        let files = FileSet::open(&abs).map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        let base = open_devices(files, o.io).map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        let devices: SharedDevices = match &o.fault {
            Some(plan) => Arc::new(FaultDevices::new(base, plan.clone())),
            None => base,
        };
        let (mut sbs, older) = read_superblocks(&*devices, &abs)?;
        let mut newest =
            sbs.iter()
                .max_by_key(|s| s.generation)
                .cloned()
                .ok_or(Error::Corrupt {
                    what: "no superblock",
                })?;
        if pf.pool_uuid.is_none() && !o.read_only {
            // A pool made before pool.json named its UUID: record it now (its devices agree
            // among themselves), so that a foreign device put in later is refused.
            let named = PoolFile {
                pool_uuid: Some(claim::uuid_string(&newest.pool_uuid)),
                format_version: crate::format::FORMAT_VERSION,
                ..pf.clone()
            };
            write_pool_file(dir, &named)?;
        }
        let geo = Geometry {
            segment_bytes: newest.segment_bytes,
            devs: sbs
                .iter()
                .map(|s| (s.first_segment, s.segment_count))
                .collect(),
            total_segments: newest.total_segments,
        };
        for (d, s) in sbs.iter().enumerate() {
            let need = DATA_START + u64::from(s.segment_count) * geo.segment_bytes;
            if devices.size(d as u16) < need {
                return Err(Error::NotAPool {
                    path: abs[d].clone(),
                    reason: "device is smaller than its superblock says (truncated?)",
                });
            }
        }
        let mut space = Space::new(geo.total_segments);
        // Load the checkpoint.
        let (image, ckpt_segs) = if newest.checkpoint_segment == NO_SEGMENT {
            (
                Image {
                    seq: 1,
                    epoch: 0,
                    next_volume_id: 1,
                    volumes: Vec::new(),
                    blocks: vec![BlockEntry::default()],
                    shards: Vec::new(),
                    data_chains: 0,
                    index: Vec::new(),
                    index_sample_bits: 0,
                    // Whoever wrote a log without a checkpoint, its fingerprints are not
                    // trusted to be keyed: nothing is lost but dedup candidates.
                    keyed_fingerprints: false,
                },
                Vec::new(),
            )
        } else {
            match read_checkpoint(&*devices, &geo, &newest) {
                Ok(c) => c,
                Err(e @ Error::Corrupt { .. }) => {
                    // A commit that stopped between its two slot writes left the previous
                    // checkpoint in every device's other slot, with everything its replay needs
                    // (nothing is freed before both slots point at the new one): open from it.
                    let prev: Option<Vec<Superblock>> = older
                        .iter()
                        .map(|o| {
                            o.clone().filter(|p| {
                                p.generation + 1 == newest.generation
                                    && p.checkpoint_segment != NO_SEGMENT
                                    && p.log_key == newest.log_key
                            })
                        })
                        .collect();
                    let Some(prev) = prev else {
                        return Err(e);
                    };
                    let c = read_checkpoint(&*devices, &geo, &prev[0]).map_err(|_| e)?;
                    eprintln!(
                        "ingot: the newest checkpoint (generation {}) is damaged; opened from \
                         the previous one (generation {}), replaying the log since",
                        newest.generation, prev[0].generation
                    );
                    newest = prev[0].clone();
                    sbs = prev;
                    c
                }
                Err(e) => return Err(e),
            }
        };
        // A version 1 pool's log is sealed by CRC only: it is replayed with those rules once,
        // then the recovery checkpoint below writes version 2 superblocks with a new key, and
        // every chain starts in a fresh segment sealed under it.
        let legacy = newest.log_key.is_none();
        let log_key = match newest.log_key {
            Some(k) => k,
            None => LogKey::generate().map_err(|source| Error::File {
                path: abs[0].clone(),
                source,
            })?,
        };
        for sb in &mut sbs {
            sb.version = crate::format::FORMAT_VERSION;
            sb.log_key = Some(log_key);
        }
        for &s in &ckpt_segs {
            space.set_state(s, SegState::Checkpoint);
        }
        let nshards = if o.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            o.shards
        }
        .clamp(1, 64);
        // Chains of the checkpoint: data shards' first, then move chains (a pool written before
        // move chains existed has none).
        let old_shards = image.data_chains;
        // Volumes and maps.
        let mut table = VolumeTable {
            by_name: BTreeMap::new(),
            next_id: image.next_volume_id.max(1),
        };
        let mut by_id: HashMap<u32, Arc<VolumeState>> = HashMap::new();
        space.blocks = image.blocks;
        if space.blocks.is_empty() {
            space.blocks.push(BlockEntry::default());
        }
        let collide = o
            .fault
            .as_ref()
            .is_some_and(|f| f.collide_fingerprints.load(Ordering::Relaxed));
        let dedup_key_mask = if collide { 0 } else { u64::MAX };
        let dedup_key = |fp: u128| fp as u64 & dedup_key_mask | (fp >> 64) as u64 & !dedup_key_mask;
        let mut dedup = DedupIndex::new(o.dedup_index_bytes.unwrap_or_else(default_index_bytes));
        // A checkpoint older than keyed fingerprints comes with an index, and a log, of unkeyed
        // XXH3 fingerprints that no lookup computes any more: neither is indexed (their blocks
        // are simply not dedup candidates; the recovery checkpoint of this open is keyed, and
        // so is every record written after it). Were one indexed, it would cost a verify read
        // and no data: every hit is compared byte for byte.
        let keyed_index = image.keyed_fingerprints;
        if keyed_index {
            dedup.set_sample_bits(u32::from(image.index_sample_bits));
            for &(k, id) in &image.index {
                // Keys were stored as `dedup_key` made them; with collisions forced, the tag
                // they would need is gone, so the (test-only) index starts empty.
                if !collide {
                    dedup.insert(k, id);
                }
            }
        }
        for v in image.volumes {
            let vs = VolumeState::new(v.id, v.name.clone(), v.size_bytes, nshards);
            if v.flags & !crate::format::VOLUME_KNOWN_FLAGS != 0 {
                return Err(Error::Corrupt {
                    what: "a volume has flags this build does not know (written by a newer ingot?)",
                });
            }
            vs.set_flags(v.flags);
            vs.set_dedup_domain(v.domain.clone(), &log_key.0);
            for (idx, page) in v.pages {
                let mut m = vs.maps[(idx % nshards as u64) as usize].lock();
                let ids = page.clone();
                if m.load_page(idx as usize, page) {
                    for &id in ids.iter() {
                        if id != 0 {
                            space.add_ref(id);
                        }
                    }
                }
            }
            let vs = Arc::new(vs);
            by_id.insert(v.id, vs.clone());
            table.by_name.insert(v.name, vs);
        }
        // Replay.
        let mut records = Vec::new();
        let mut chain_segs = Vec::new();
        let mut ends = Vec::new();
        for (i, pos) in image.shards.iter().enumerate() {
            let scan = scan_chain(
                &*devices,
                &geo,
                &newest.pool_uuid,
                newest.log_key.as_ref(),
                image.epoch,
                i as u16,
                *pos,
            )?;
            records.extend(scan.records);
            chain_segs.extend(scan.segments);
            ends.push(scan.end);
            if pos.next != NO_SEGMENT {
                chain_segs.push(pos.next);
            }
        }
        records.sort_by_key(|r| r.seq);
        let mut seq_end = image.seq.max(1);
        for r in &records {
            seq_end = seq_end.max(r.seq + 1);
            for e in &r.entries {
                match e {
                    Entry::Data(d) => {
                        let is_ref = d.flags & FLAG_REF != 0;
                        // A new block is placed even when its volume is gone: a dedup
                        // reference later in the record may point at it.
                        if d.block_id != 0 && !is_ref {
                            space.place(d.block_id, r.block_entry(d));
                        }
                        let Some(vol) = by_id.get(&d.volume) else {
                            continue;
                        };
                        if d.lba >= vol.blocks() {
                            continue;
                        }
                        if is_ref && !space.is_placed(d.block_id) {
                            // The block it shares was in a record lost at the crash (never
                            // flushed, so neither was this one): the LBA keeps its old data.
                            continue;
                        }
                        if d.block_id != 0 {
                            space.add_ref(d.block_id);
                            if !is_ref && keyed_index && vol.dedup.load(Ordering::Relaxed) {
                                dedup.insert(
                                    dedup_key(u128::from_le_bytes(d.fingerprint)),
                                    d.block_id,
                                );
                            }
                        }
                        let old = vol.maps[shard_of(d.lba, nshards)]
                            .lock()
                            .set(d.lba, d.block_id);
                        if old != 0 {
                            space.drop_ref(old, r.seq);
                        }
                    }
                    Entry::Move(d) => {
                        space.relocate(
                            d.block_id,
                            (d.lba >> 32) as u32,
                            d.lba as u32,
                            &r.block_entry(d),
                        );
                    }
                    Entry::Trim(t) => {
                        let Some(vol) = by_id.get(&t.volume) else {
                            continue;
                        };
                        // Only the pages the writing shard owned at the time.
                        for s in 0..nshards {
                            let mut map = vol.maps[s].lock();
                            let mut freed = Vec::new();
                            let writer = r.shard as usize;
                            trim_owned(&mut map, t.lba, t.count, writer, old_shards.max(1), |id| {
                                freed.push(id)
                            });
                            drop(map);
                            for id in freed {
                                space.drop_ref(id, r.seq);
                            }
                        }
                    }
                }
            }
        }
        // Segment states: whatever holds live data, or was part of a chain, stays.
        for &s in &chain_segs {
            if (s as usize) < space.seg_state.len() && space.seg_state[s as usize] == SegState::Free
            {
                space.set_state(s, SegState::Sealed { seq: seq_end });
            }
        }
        for s in 0..space.seg_state.len() {
            if space.seg_live[s] > 0 && space.seg_state[s] == SegState::Free {
                space.set_state(s as u32, SegState::Sealed { seq: seq_end });
            }
        }
        // New chains for the new epoch: an open segment per shard first, then next segments
        // only beyond the reserve the running pool keeps (the recovery checkpoint needs it).
        let epoch = image.epoch + 1;
        let ckpt_reserve = {
            let mut pages = 0u64;
            for v in table.by_name.values() {
                for m in &v.maps {
                    pages += m.lock().present_pages();
                }
            }
            let est = checkpoint::estimate_bytes(
                pages,
                space.live_blocks,
                table.by_name.len() as u64,
                nshards as u64,
            );
            // As `Inner::reserve_segments` will keep back.
            est.div_ceil(geo.segment_bytes - SEGMENT_HEADER_BYTES) as usize + 1 + nshards + 1
        };
        // A shard's new chain continues its old one just past the last replayed record when
        // that segment has room: otherwise every open would strand a partly filled segment per
        // shard, and a full pool could not be opened at all. Replay starts at the checkpoint's
        // position, so the segment's old header (old epoch) is never read for this chain.
        // The move chain (the last) continues the old one, if the checkpoint had one.
        let old_ends: Vec<Option<&ShardPosition>> = (0..nshards)
            .map(|i| ends.get(i).filter(|_| i < old_shards))
            .chain(std::iter::once(ends.get(old_shards)))
            .collect();
        // Continuing needs the segment's nonce (its header verified); an upgraded pool starts
        // every chain afresh.
        let mut starts: Vec<(u32, u32, Option<[u8; 16]>)> = Vec::new();
        for old_end in old_ends {
            let cont = old_end.filter(|e| {
                !legacy
                    && e.nonce.is_some()
                    && e.segment != NO_SEGMENT
                    && e.segment < geo.total_segments
                    && u64::from(e.offset) + 2 * IO_ALIGN as u64 <= geo.segment_bytes
            });
            match cont {
                Some(e) => {
                    space.set_state(e.segment, SegState::Open);
                    starts.push((e.segment, e.offset, e.nonce));
                }
                None => starts.push((NO_SEGMENT, SEGMENT_HEADER_BYTES as u32, None)),
            }
        }
        // Fresh chains take segments the backing files hold when there are: on a full host
        // file system a new segment's header could not be written.
        if !pf.prefilled && !o.read_only {
            mark_held_free(&*devices, &geo, &mut space);
            // Data keeps off the held segments from the start (see `Inner::top_up_backed`).
            space.backed_reserve = 2 * ckpt_reserve;
        }
        let mut refused = Vec::new();
        for st in starts.iter_mut().filter(|st| st.2.is_none()) {
            loop {
                let seg = space
                    .alloc_segment_for(SegState::Open, 0, SegUse::Metadata)
                    .ok_or(Error::NoSpace)?;
                st.0 = seg;
                if pf.prefilled || o.read_only {
                    break;
                }
                // Held, or room for it on the host: its header can be written.
                let (dev, base) = geo.locate(seg);
                match devices.preallocate(dev, base, geo.segment_bytes) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => refused.push(seg),
                    _ => break,
                }
            }
        }
        for s in refused {
            space.set_state(s, SegState::Free);
        }
        let mut positions = Vec::new();
        for (i, (seg, offset, nonce)) in starts.into_iter().enumerate() {
            let next = space
                .alloc_segment(SegState::Next, ckpt_reserve)
                .unwrap_or(NO_SEGMENT);
            let nonce = match nonce {
                Some(n) => n,
                // Read-only: no chain is written to.
                None if o.read_only => [0; 16],
                None => {
                    let n = crate::format::random_bytes().map_err(|source| Error::File {
                        path: abs[0].clone(),
                        source,
                    })?;
                    let mut buf = AlignedBuf::new(IO_ALIGN);
                    SegmentHeader {
                        kind: SegmentKind::Data,
                        segment: seg,
                        shard: i as u16,
                        pool_uuid: newest.pool_uuid,
                        epoch,
                        next_segment: next,
                        nonce: n,
                    }
                    .encode(&mut buf, &log_key);
                    let (dev, b) = geo.locate(seg);
                    devices.write_at(dev, &buf, b).map_err(|source| Error::Io {
                        device: dev,
                        offset: b,
                        source,
                    })?;
                    n
                }
            };
            positions.push(ShardPosition {
                segment: seg,
                offset,
                next,
                shard_seq: 0,
                nonce: Some(nonce),
            });
        }
        let (ftx, frx) = crossbeam_channel::unbounded();
        let (ktx, krx) = crossbeam_channel::bounded(1);
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..=nshards {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            receivers.push(rx);
        }
        let cache_capacity = o.cache_bytes.unwrap_or_else(default_cache_bytes);
        let usable_bytes = usable_bytes(&geo, nshards);
        let inner = Arc::new(Inner {
            devices: devices.clone(),
            geo,
            pool_uuid: newest.pool_uuid,
            log_key,
            nonce_counter: AtomicU64::new(0),
            read_only: o.read_only,
            host_tight: AtomicBool::new(false),
            host_free: AtomicU64::new(u64::MAX),
            host_unallocated: AtomicU64::new(0),
            host_seen_ms: AtomicU64::new(0),
            ckpt_at_ms: AtomicU64::new(0),
            host_epoch: std::time::Instant::now(),
            epoch,
            space: Mutex::new(space),
            seq: AtomicU64::new(seq_end),
            shard_stats: (0..=nshards).map(|_| ShardStats::default()).collect(),
            // The mover (the last worker) only writes: no cache.
            caches: (0..=nshards)
                .map(|i| {
                    let bytes = if i < nshards {
                        cache_capacity / nshards as u64
                    } else {
                        0
                    };
                    Mutex::new(BlockCache::new(bytes))
                })
                .collect(),
            counters: Counters::default(),
            flusher: ftx,
            chain_broken: AtomicBool::new(false),
            senders,
            data_shards: nshards,
            volumes: RwLock::new(table),
            ckpt: Mutex::new(CkptState {
                generation: newest.generation,
                segments: ckpt_segs,
                prev_segments: Vec::new(),
                seq_end: image.seq,
                both_seq: image.seq,
                written_at_last: 0,
            }),
            superblocks: sbs,
            closed: AtomicBool::new(false),
            kick: ktx,
            ckpt_wanted: AtomicBool::new(false),
            cache_capacity,
            checkpoint_interval: o.checkpoint_interval_bytes.max(64 << 20),
            discard_freed: !pf.prefilled,
            gc_lock: Mutex::new(()),
            gc_stuck: AtomicBool::new(false),
            usable_bytes,
            dedup: Mutex::new(dedup),
            dedup_key_mask,
            fault: Mutex::new(None),
            faulted: AtomicBool::new(false),
            // A sixty-fourth of the capacity at most: the last `write_back_limit` bytes are
            // kept for early writes, which must not cost a small pool a visible share.
            write_back_limit: o.write_back_bytes.min(usable_bytes / 64),
            wb_bytes: AtomicU64::new(0),
            wb_jobs: AtomicU64::new(0),
            wb_total: AtomicU64::new(0),
            wb_pending: (0..WB_PENDING_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            wb_min_free: AtomicUsize::new(usize::MAX),
            wb_budget: AtomicU64::new(0),
        });
        inner.update_write_back_floor();
        if o.read_only {
            for v in inner.volumes.read().by_name.values() {
                v.read_only.store(true, Ordering::Relaxed);
            }
        }
        inner.top_up_backed();
        // The recovery checkpoint: the new epoch and chains are durable before any write.
        if !o.read_only {
            let (image, live_then) = inner.snapshot(seq_end, positions.clone());
            let mut ck = inner.ckpt.lock();
            inner.commit(&mut ck, &image, &live_then)?;
            inner.space.lock().rebuild_free_ids();
        }
        inner.top_up_backed();
        if inner.discard_freed && !o.read_only {
            inner.note_unpunched_at_open();
        }
        let mut threads = Vec::new();
        for (i, rx) in receivers.into_iter().enumerate() {
            let queue = devices.queue(256).map_err(|source| Error::Io {
                device: 0,
                offset: 0,
                source,
            })?;
            let pos = positions[i];
            let name = if i < nshards {
                format!("ingot-shard-{i}")
            } else {
                "ingot-mover".to_string()
            };
            let sv = inner.clone();
            threads.push(spawn_supervised(name, &inner, move || {
                Shard::new(i, sv, rx, queue, pos).run()
            })?);
        }
        let fi = inner.clone();
        threads.push(spawn_supervised(
            "ingot-flusher".into(),
            &inner,
            move || flusher(fi, frx),
        )?);
        // Read-only: no checkpoints, no cleaning (moves would write).
        if !o.read_only {
            let ci = inner.clone();
            threads.push(spawn_supervised(
                "ingot-checkpointer".into(),
                &inner,
                move || checkpointer(ci, krx),
            )?);
        }
        Ok(Pool {
            inner,
            threads: Mutex::new(threads),
            dir: dir.to_path_buf(),
            _lock: lock,
            _claim: claim,
            halted: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn volume(&self, name: &str) -> Result<Volume> {
        let state = self
            .inner
            .lookup(name)
            .ok_or_else(|| Error::VolumeNotFound(name.to_string()))?;
        Ok(Volume {
            inner: self.inner.clone(),
            state,
        })
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.inner
            .volumes
            .read()
            .by_name
            .values()
            .map(|v| VolumeInfo {
                name: v.name.clone(),
                size_bytes: v.size(),
                mapped_bytes: v.mapped_blocks() * BLOCK_BYTES,
                dedup: v.dedup.load(Ordering::Relaxed),
                compression: v.compress.load(Ordering::Relaxed),
                read_only: v.read_only.load(Ordering::Relaxed),
                dedup_domain: v.dedup_domain(),
                stored_bytes: 0,
                unique_blocks: 0,
                dedup_ratio: 1.0,
                compression_ratio: 1.0,
                data_reduction_ratio: 1.0,
            })
            .collect()
    }

    /// Turn deduplication and/or compression of new writes on or off for a volume; durable
    /// when this returns. Blocks already stored stay as they are.
    pub fn set_volume_policy(
        &self,
        name: &str,
        dedup: Option<bool>,
        compression: Option<bool>,
    ) -> Result<()> {
        self.set_volume_reduction(name, dedup, compression, None)
    }

    /// Move a volume to another dedup domain, online; durable when this returns. Its new
    /// blocks deduplicate only against blocks written in that domain from then on; blocks it
    /// stored before stay where they are (candidates for their old domain only).
    pub fn set_volume_dedup_domain(&self, name: &str, domain: DedupDomain) -> Result<()> {
        self.set_volume_reduction(name, None, None, Some(domain))
    }

    /// Change any of a volume's data reduction settings at once (one checkpoint).
    pub fn set_volume_reduction(
        &self,
        name: &str,
        dedup: Option<bool>,
        compression: Option<bool>,
        domain: Option<DedupDomain>,
    ) -> Result<()> {
        if let Some(d) = &domain {
            d.validate()?;
        }
        let name = name.to_string();
        self.inner.checkpoint_with(Some(&mut |inner: &Inner, _seq| {
            let v = inner
                .lookup(&name)
                .ok_or_else(|| Error::VolumeNotFound(name.clone()))?;
            if let Some(d) = dedup {
                v.dedup.store(d, Ordering::Relaxed);
            }
            if let Some(c) = compression {
                v.compress.store(c, Ordering::Relaxed);
            }
            if let Some(d) = &domain {
                v.set_dedup_domain(d.clone(), &inner.log_key.0);
            }
            Ok(())
        }))
    }

    /// Create a thin volume in the shared dedup domain; durable when this returns.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<()> {
        self.create_volume_in(name, size_bytes, DedupDomain::Shared)
    }

    /// Create a thin volume in dedup domain `domain` (it is in it from its first write);
    /// durable when this returns.
    pub fn create_volume_in(&self, name: &str, size_bytes: u64, domain: DedupDomain) -> Result<()> {
        validate_name(name)?;
        validate_size(size_bytes)?;
        domain.validate()?;
        let name = name.to_string();
        let shards = self.inner.shards();
        self.inner.checkpoint_with(Some(&mut |inner: &Inner, _seq| {
            let mut t = inner.volumes.write();
            if t.by_name.contains_key(&name) {
                return Err(Error::VolumeExists(name.clone()));
            }
            let id = t.next_id;
            t.next_id += 1;
            let v = VolumeState::new(id, name.clone(), size_bytes, shards);
            v.set_dedup_domain(domain.clone(), &inner.log_key.0);
            t.by_name.insert(name.clone(), Arc::new(v));
            Ok(())
        }))
    }

    /// Take a read-only snapshot `name` of volume `src` as it is now: every write acknowledged
    /// before the call is in it, none after. No data is copied: the snapshot shares the
    /// volume's blocks (each holds a reference) and map pages (copied on the next write to
    /// either). Durable when this returns.
    pub fn snapshot_volume(&self, src: &str, name: &str) -> Result<()> {
        self.copy_volume(src, name, true)
    }

    /// Create a writable volume `name` with the contents of volume or snapshot `src`, sharing
    /// its blocks like a snapshot does; writes to either are then independent. Durable when
    /// this returns.
    pub fn clone_volume(&self, src: &str, name: &str) -> Result<()> {
        self.copy_volume(src, name, false)
    }

    fn copy_volume(&self, src: &str, name: &str, read_only: bool) -> Result<()> {
        validate_name(name)?;
        if self.inner.lookup(name).is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        // Every checkpoint from now on stores the copy's map pages too: refuse a copy whose
        // pages the space kept for checkpoints could not hold (it would fail every later
        // checkpoint and flush).
        let source = self.volume(src)?;
        let pages: u64 = source
            .state
            .maps
            .iter()
            .map(|m| m.lock().present_pages())
            .sum();
        let need = self.inner.reserve_segments_with(pages, 1);
        if self.inner.space.lock().free_segments <= need {
            return Err(Error::NoSpace);
        }
        // Early-acknowledged writes still waiting for space would miss the pause below.
        self.inner.settle_writes()?;
        let (src, name) = (src.to_string(), name.to_string());
        let shards = self.inner.shards();
        let mut made = None;
        // Shards are paused: the maps hold exactly the writes acknowledged so far.
        let r = self.inner.checkpoint_with(Some(&mut |inner: &Inner, _seq| {
            let mut t = inner.volumes.write();
            if t.by_name.contains_key(&name) {
                return Err(Error::VolumeExists(name.clone()));
            }
            let s = t
                .by_name
                .get(&src)
                .cloned()
                .ok_or_else(|| Error::VolumeNotFound(src.clone()))?;
            let id = t.next_id;
            t.next_id += 1;
            let v = VolumeState::new(id, name.clone(), s.size(), shards);
            v.set_flags(s.flags() & !crate::format::VOLUME_READ_ONLY);
            v.read_only.store(read_only, Ordering::Relaxed);
            // A clone of a private volume is private to itself (it shares the source's blocks
            // by reference, not by dedup).
            v.set_dedup_domain(s.dedup_domain(), &inner.log_key.0);
            let mut space = inner.space.lock();
            for (to, from) in v.maps.iter().zip(&s.maps) {
                let m = from.lock().clone();
                for (_, id) in m.iter() {
                    space.add_ref(id);
                }
                *to.lock() = m;
            }
            drop(space);
            made = Some(id);
            t.by_name.insert(name.clone(), Arc::new(v));
            Ok(())
        }));
        if let (Err(_), Some(id)) = (&r, made) {
            // The copy exists in memory but no checkpoint holds it: take it away again (a
            // smaller checkpoint than the one that failed), unless the name is someone else's
            // by now.
            if self.inner.lookup(&name).is_some_and(|v| v.id == id) {
                let _ = self.delete_volume(&name);
            }
        }
        r
    }

    /// Delete a volume and free what only it referenced; durable when this returns.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.inner.checkpoint_with(Some(&mut |inner: &Inner, seq| {
            let v = inner
                .volumes
                .write()
                .by_name
                .remove(&name)
                .ok_or_else(|| Error::VolumeNotFound(name.clone()))?;
            v.deleted.store(true, Ordering::Release);
            let mut space = inner.space.lock();
            for m in &v.maps {
                let mut m = m.lock();
                for (_, id) in m.iter() {
                    space.drop_ref(id, seq);
                }
                *m = Default::default();
            }
            Ok(())
        }))
    }

    /// Change a volume's size; shrinking frees the blocks past the new end.
    pub fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<()> {
        validate_size(size_bytes)?;
        // A new end inside a block keeps that block: zero its bytes past the new end first, or
        // growing the volume again would bring them back instead of zeroes.
        let vol = self.volume(name)?;
        if vol.read_only() {
            return Err(Error::ReadOnly(name.to_string()));
        }
        let old = vol.size_bytes();
        if size_bytes < old && size_bytes % BLOCK_BYTES != 0 {
            let end = size_bytes.next_multiple_of(BLOCK_BYTES).min(old);
            vol.write_zeroes(size_bytes, end - size_bytes, false)?;
        }
        let name = name.to_string();
        self.inner.checkpoint_with(Some(&mut |inner: &Inner, seq| {
            let v = inner
                .lookup(&name)
                .ok_or_else(|| Error::VolumeNotFound(name.clone()))?;
            if v.read_only.load(Ordering::Relaxed) {
                return Err(Error::ReadOnly(name.clone()));
            }
            let blocks = size_bytes.div_ceil(BLOCK_BYTES);
            let mut space = inner.space.lock();
            for m in &v.maps {
                for id in m.lock().resize(blocks) {
                    space.drop_ref(id, seq);
                }
            }
            v.size_bytes.store(size_bytes, Ordering::Release);
            Ok(())
        }))
    }

    /// Clean now: empty every sealed segment worth cleaning (at most `max_utilisation` full),
    /// best candidates first, checkpointing after each batch. `progress(done, total)` reports
    /// segments.
    pub fn gc(&self, max_utilisation: f64, progress: &mut dyn FnMut(u64, u64)) -> Result<GcReport> {
        // A checkpoint first puts every sealed segment behind it, so that cleaned victims are
        // freed after a flush instead of one checkpoint per chunk. The segments it frees (those
        // left without a live block) count as freed by this run.
        let free_before = self.inner.space.lock().free_segments;
        self.inner.checkpoint_with(None)?;
        let freed_by_checkpoint =
            (self.inner.space.lock().free_segments as u64).saturating_sub(free_before as u64);
        // The segments worth cleaning now; segments the pass itself fills are left alone, so
        // it ends.
        let todo = self.gc_candidates(max_utilisation);
        let mut total = GcReport {
            segments_freed: freed_by_checkpoint,
            ..GcReport::default()
        };
        progress(0, todo.len() as u64);
        for chunk in todo.chunks(GC_VICTIMS_PER_PASS) {
            let r = self.inner.clean(
                chunk.len(),
                max_utilisation,
                Some(chunk),
                false,
                &mut |_, _| {},
            )?;
            total.segments_cleaned += r.segments_cleaned;
            total.segments_freed += r.segments_freed;
            total.bytes_moved += r.bytes_moved;
            progress(total.segments_cleaned, todo.len() as u64);
        }
        Ok(total)
    }

    fn gc_candidates(&self, max_utilisation: f64) -> Vec<u32> {
        let usable = (self.inner.geo.segment_bytes - SEGMENT_HEADER_BYTES) as f64;
        let space = self.inner.space.lock();
        space
            .seg_state
            .iter()
            .enumerate()
            .filter(|(s, st)| {
                matches!(st, SegState::Sealed { .. })
                    && space.seg_live[*s] > 0
                    && space.seg_live[*s] as f64 / usable <= max_utilisation
            })
            .map(|(s, _)| s as u32)
            .collect()
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

    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let mut volumes = self.volumes();
        let states: Vec<Arc<VolumeState>> =
            inner.volumes.read().by_name.values().cloned().collect();
        // Lock order is checkpoint state, then space (as a checkpoint takes them): read the
        // checkpoint's sequence number before taking the space lock.
        let checkpoint_seq = inner.ckpt.lock().seq_end;
        let space = inner.space.lock();
        // Attribute shared blocks to the volumes mapping them: 1/refs of the block each.
        for v in &states {
            let Some(info) = volumes.iter_mut().find(|i| i.name == v.name) else {
                continue;
            };
            let (mut unique, mut stored, mut mapped) = (0f64, 0f64, 0u64);
            for m in &v.maps {
                let m = m.lock();
                for (_, id) in m.iter() {
                    if let Some(b) = space.blocks.get(id as usize).filter(|b| b.refs > 0) {
                        let r = f64::from(b.refs);
                        unique += 1.0 / r;
                        stored += b.share() as f64 / r;
                        mapped += 1;
                    }
                }
            }
            info.unique_blocks = unique.round() as u64;
            info.stored_bytes = stored.round() as u64;
            info.dedup_ratio = ratio(mapped as f64, unique);
            info.compression_ratio = ratio(unique * BLOCK_BYTES as f64, stored);
            info.data_reduction_ratio = ratio((mapped * BLOCK_BYTES) as f64, stored);
        }
        let (index_bytes, index_entries, index_sampling) = {
            let d = inner.dedup.lock();
            (d.bytes(), d.len() as u64, 1u64 << d.sample_bits())
        };
        let logical: u64 = volumes.iter().map(|v| v.mapped_bytes).sum();
        let seg = inner.geo.segment_bytes;
        let total = u64::from(inner.geo.total_segments);
        let cache_sum =
            |f: fn(&BlockCache) -> u64| -> u64 { inner.caches.iter().map(|c| f(&c.lock())).sum() };
        Stats {
            capacity_bytes: total * seg,
            usable_bytes: inner.usable_bytes,
            space_warning: space_warning(space.stored_bytes, inner.usable_bytes),
            host_warning: {
                inner.refresh_host_space(true);
                inner.host_warning()
            },
            host_free_bytes: inner.host_free.load(Ordering::Relaxed),
            host_unallocated_bytes: inner.host_unallocated.load(Ordering::Relaxed),
            halted: inner.fault.lock().clone(),
            physical_used_bytes: (total - space.free_segments as u64) * seg,
            logical_mapped_bytes: logical,
            stored_bytes: space.stored_bytes,
            segments_total: total,
            segments_free: space.free_segments as u64,
            segment_bytes: seg,
            volumes,
            client_written_bytes: inner.counters.client_written.load(Ordering::Relaxed),
            device_written_bytes: inner.counters.device_written.load(Ordering::Relaxed),
            cache_bytes: cache_sum(|c| c.len_bytes()),
            cache_capacity_bytes: inner.cache_capacity,
            cache_hits: cache_sum(|c| c.hits),
            cache_misses: cache_sum(|c| c.misses),
            checkpoint_seq,
            last_seq: inner.seq.load(Ordering::Relaxed).saturating_sub(1),
            io_engine: inner.devices.engine_name().to_string(),
            shards: inner.shards(),
            reclaimable_bytes: space
                .seg_state
                .iter()
                .enumerate()
                .filter(|(_, st)| matches!(st, SegState::Sealed { .. }))
                .map(|(s, _)| (seg - SEGMENT_HEADER_BYTES).saturating_sub(space.seg_live[s]))
                .sum(),
            gc_bytes_moved: inner.counters.gc_moved.load(Ordering::Relaxed),
            write_amplification: {
                let client = inner.counters.client_written.load(Ordering::Relaxed);
                let device = inner.counters.device_written.load(Ordering::Relaxed);
                if client == 0 {
                    0.0
                } else {
                    device as f64 / client as f64
                }
            },
            segments_cleaning: inner.counters.gc_cleaning.load(Ordering::Relaxed),
            gc_bytes_read: inner.counters.gc_read.load(Ordering::Relaxed),
            gc_bytes_from_cache: inner.counters.gc_from_cache.load(Ordering::Relaxed),
            gc_cache_mismatches: inner.counters.gc_cache_mismatches.load(Ordering::Relaxed),
            unique_blocks: space.live_blocks,
            dedup_ratio: ratio((logical / BLOCK_BYTES) as f64, space.live_blocks as f64),
            compression_ratio: ratio(
                (space.live_blocks * BLOCK_BYTES) as f64,
                space.stored_bytes as f64,
            ),
            data_reduction_ratio: ratio(logical as f64, space.stored_bytes as f64),
            dedup_index_bytes: index_bytes,
            dedup_index_entries: index_entries,
            dedup_index_sampling: index_sampling,
            write_back_limit_bytes: inner.write_back_limit,
            write_back_bytes: inner.wb_bytes.load(Ordering::Relaxed),
            write_back_writes: inner.wb_total.load(Ordering::Relaxed),
            device_written_breakdown: {
                let c = &inner.counters;
                let r = |k: usize, i: usize| c.records[k][i].load(Ordering::Relaxed);
                WriteBreakdown {
                    data_records: r(0, 0),
                    data_entries: r(0, 1),
                    data_bytes: r(0, 2),
                    data_header_bytes: r(0, 3),
                    move_records: r(1, 0),
                    move_entries: r(1, 1),
                    move_bytes: r(1, 2),
                    move_header_bytes: r(1, 3),
                    checkpoints: c.checkpoints.load(Ordering::Relaxed),
                    checkpoint_bytes: c.checkpoint_bytes.load(Ordering::Relaxed),
                }
            },
        }
    }

    /// Verify every stored block's checksum and the invariants: reference counts equal the
    /// map entries pointing at each block, segment usage equals the sum of live block sizes.
    /// `progress(done, total)` is called as blocks are verified.
    pub fn check(&self, progress: &mut dyn FnMut(u64, u64)) -> CheckReport {
        let inner = &self.inner;
        // Holding the checkpoint lock keeps segments and block ids from being reused meanwhile.
        let _ck = inner.ckpt.lock();
        let mut report = CheckReport::default();
        let vols: Vec<Arc<VolumeState>> = inner.volumes.read().by_name.values().cloned().collect();
        let (blocks, seg_live, stored_bytes) = {
            let s = inner.space.lock();
            (s.blocks.clone(), s.seg_live.clone(), s.stored_bytes)
        };
        let mut counted = vec![0u32; blocks.len()];
        let mut owner: HashMap<u64, (String, u64)> = HashMap::new();
        for v in &vols {
            report.volumes_checked += 1;
            for m in &v.maps {
                let m = m.lock().clone();
                for (lba, id) in m.iter() {
                    match counted.get_mut(id as usize) {
                        Some(c) if blocks[id as usize].refs > 0 => {
                            *c += 1;
                            owner.entry(id).or_insert_with(|| (v.name.clone(), lba));
                        }
                        _ => report.problems.push(Problem {
                            kind: "location".into(),
                            detail: format!(
                                "volume {} block {lba} (byte {}) maps to block id {id}, which is not in the block table",
                                v.name,
                                lba * BLOCK_BYTES
                            ),
                        }),
                    }
                }
            }
        }
        let mut live = vec![0u64; seg_live.len()];
        let mut stored_total = 0u64;
        for (id, b) in blocks.iter().enumerate() {
            if b.refs != counted[id] {
                report.problems.push(Problem {
                    kind: "refcount".into(),
                    detail: format!(
                        "block id {id}: reference count {} but {} map entries point at it",
                        b.refs, counted[id]
                    ),
                });
            }
            if b.refs > 0 {
                if let Some(l) = live.get_mut(b.segment as usize) {
                    *l += b.share();
                }
                stored_total += b.share();
            }
        }
        for (s, (&want, &have)) in live.iter().zip(seg_live.iter()).enumerate() {
            if want != have {
                report.problems.push(Problem {
                    kind: "segment_usage".into(),
                    detail: format!("segment {s}: usage {have} bytes, blocks add up to {want}"),
                });
            }
        }
        if stored_total != stored_bytes {
            report.problems.push(Problem {
                kind: "stored_bytes".into(),
                detail: format!(
                    "pool accounts {stored_bytes} stored bytes, its blocks add up to {stored_total}"
                ),
            });
        }
        // Verify each stored payload once (a compressed group holds several blocks), in disk
        // order, reading runs of adjacent payloads together.
        let mut ids: Vec<u64> = (1..blocks.len() as u64)
            .filter(|&id| blocks[id as usize].refs > 0)
            .collect();
        ids.sort_by_key(|&id| (blocks[id as usize].segment, blocks[id as usize].offset));
        let total = ids.len() as u64;
        let align = IO_ALIGN as u32;
        let mut i = 0;
        while i < ids.len() {
            let first = blocks[ids[i] as usize];
            let base = first.offset & !(align - 1);
            let mut end = (first.offset + u32::from(first.stored_len)).next_multiple_of(align);
            let mut j = i + 1;
            while j < ids.len() && j - i < 4096 {
                let b = blocks[ids[j] as usize];
                let b_end = (b.offset + u32::from(b.stored_len)).next_multiple_of(align);
                if b.segment != first.segment
                    || b.offset & !(align - 1) > end
                    || b_end - base > 4 << 20
                {
                    break;
                }
                end = end.max(b_end);
                j += 1;
            }
            let mut buf = AlignedBuf::new((end - base) as usize);
            let (dev, seg_base) = inner.geo.locate(first.segment);
            let at = seg_base + u64::from(base);
            let read = inner.devices.read_at(dev, &mut buf, at);
            let all = bytes::Bytes::from_owner(buf);
            let mut k = i;
            while k < j {
                let b = blocks[ids[k] as usize];
                // The blocks sharing this payload.
                let mut m = k + 1;
                while m < j && blocks[ids[m] as usize].offset == b.offset {
                    m += 1;
                }
                let fault: Option<(&str, String)> = match &read {
                    Err(e) => Some(("io", format!("read failed: {e}"))),
                    Ok(()) => decode_entry(&all, (b.offset - base) as usize, &b)
                        .err()
                        .map(|f| {
                            let kind = match f {
                                PayloadFault::Checksum { .. } => "checksum",
                                PayloadFault::Undecodable { .. } => "decode",
                                PayloadFault::Io { .. } => "io",
                            };
                            (kind, f.error(ids[k]).to_string())
                        }),
                };
                for &id in &ids[k..m] {
                    if let Some((kind, f)) = &fault {
                        let who = owner
                            .get(&id)
                            .map(|(v, lba)| {
                                format!("volume {v} block {lba} (byte {})", lba * BLOCK_BYTES)
                            })
                            .unwrap_or_default();
                        report.problems.push(Problem {
                            kind: (*kind).into(),
                            detail: format!(
                                "{who}: block id {id} at segment {} offset {}: {f}",
                                b.segment, b.offset
                            ),
                        });
                    }
                    report.blocks_checked += 1;
                }
                report.bytes_checked += u64::from(b.stored_len);
                k = m;
            }
            progress(report.blocks_checked, total);
            i = j;
        }
        progress(report.blocks_checked, total);
        report
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

    fn stop_threads(&self) {
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

/// An engine thread whose panic (a bug) stops the pool instead of leaving requests waiting
/// forever for a thread that is gone.
fn spawn_supervised(
    name: String,
    inner: &Arc<Inner>,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    let inner = inner.clone();
    let label = name.clone();
    spawn(name, move || {
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            inner.set_fault(format!("thread {label} failed: {msg}"));
            // Replies the thread collected before it failed still go out.
            crate::api::end_batch();
        }
    })
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|source| Error::File {
            path: PathBuf::from("thread"),
            source,
        })
}

fn flusher(inner: Arc<Inner>, rx: Receiver<FlushMsg>) {
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut waiting = Vec::new();
        let mut stop = false;
        for m in std::iter::once(first).chain(rx.try_iter()) {
            match m {
                FlushMsg::Flush(c) => waiting.push(c),
                FlushMsg::Stop => stop = true,
            }
        }
        if !waiting.is_empty() {
            // Writes acknowledged early are part of what a client's flush covers.
            let r = inner.settle_writes().and_then(|()| inner.sync_completed());
            for c in waiting {
                c.send(match &r {
                    Ok(()) => Ok(crate::api::Reply::Done),
                    Err(Error::Halted { reason }) => Err(Error::Halted {
                        reason: reason.clone(),
                    }),
                    Err(e) => Err(Error::Io {
                        device: 0,
                        offset: 0,
                        source: std::io::Error::other(e.to_string()),
                    }),
                });
            }
        }
        if stop {
            return;
        }
    }
}

/// Least time between checkpoints taken only to free segments left without a live block.
const DEAD_SEGMENT_CHECKPOINT_MS: u64 = 2000;

fn checkpointer(inner: Arc<Inner>, rx: Receiver<CkptMsg>) {
    let wait = Duration::from_millis(500);
    loop {
        let msg = rx.recv_timeout(wait);
        let kicked = match msg {
            Ok(CkptMsg::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            Ok(CkptMsg::Kick) => true,
            Ok(CkptMsg::Space) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => false,
        };
        let kicked = inner.ckpt_wanted.swap(false, Ordering::AcqRel) || kicked;
        if inner.is_closed() || inner.is_faulted() {
            return;
        }
        inner.update_write_back_floor();
        let written = inner.counters.client_written.load(Ordering::Relaxed);
        let since = written.saturating_sub(inner.ckpt.lock().written_at_last);
        let free = inner.space.lock().free_segments;
        let broken = inner.chain_broken.load(Ordering::Acquire);
        // Low on space, checkpoint every quarter of the pool written: that puts sealed
        // segments behind a checkpoint, where the cleaner frees them without one.
        let pool_bytes = u64::from(inner.geo.total_segments) * inner.geo.segment_bytes;
        let low = free < inner.cleaning_threshold();
        if kicked
            || broken
            || since >= inner.checkpoint_interval
            || (low && since >= pool_bytes / 4)
        {
            if let Err(e) = inner.checkpoint_with(None) {
                eprintln!("ingot: checkpoint failed: {e}");
            }
        }
        if !low && !inner.is_closed() {
            // Space comes back after trims and overwrites without a cleaning pass: segments
            // left without a live block are freed by a sync when they lie behind the last
            // checkpoint, else by a checkpoint (at most one every few seconds for this).
            let ckpt_seq = inner.ckpt.lock().both_seq;
            let (behind, after) = inner.space.lock().dead_sealed(ckpt_seq);
            // Under a steady stream of writes the interval checkpoints do this already: only
            // when none came for a while (a sync and a fence stall every shard's pipeline).
            let now = inner.host_epoch.elapsed().as_millis() as u64;
            let since_ms = now.saturating_sub(inner.ckpt_at_ms.load(Ordering::Relaxed));
            let quiet = since_ms >= DEAD_SEGMENT_CHECKPOINT_MS;
            if after > 0 && quiet {
                if let Err(e) = inner.checkpoint_with(None) {
                    eprintln!("ingot: checkpoint failed: {e}");
                }
            } else if behind > 0 && quiet {
                if let Err(e) = inner.free_dead_segments() {
                    if !inner.is_closed() {
                        eprintln!("ingot: freeing dead segments failed: {e}");
                    }
                }
                // Counts as the pause this rule waits out.
                inner.ckpt_at_ms.store(now, Ordering::Relaxed);
            }
        }
        if !low || inner.is_closed() {
            inner.gc_stuck.store(false, Ordering::Release);
            // Segments freed while space was short are given back now that it is not.
            inner.give_back_freed();
            continue;
        }
        if let Err(e) = inner.free_dead_segments() {
            if !inner.is_closed() {
                eprintln!("ingot: freeing dead segments failed: {e}");
            }
            continue;
        }
        // Pacing: one pass per wake-up while there is headroom, back to back once writes
        // wait (free space at the urgent threshold), where fuller segments are taken too.
        let mut checkpointed = false;
        loop {
            let free = inner.space.lock().free_segments;
            if free >= inner.cleaning_threshold() || inner.is_closed() {
                inner.gc_stuck.store(false, Ordering::Release);
                break;
            }
            let urgent = free <= inner.urgent_threshold();
            let max_u = if urgent {
                GC_URGENT_UTILISATION
            } else {
                GC_MAX_UTILISATION
            };
            // Victims sealed since the last checkpoint are freed by a checkpoint: take enough
            // of them per pass that its cost (about 1.4% of the data) stays a small share.
            let victims = GC_VICTIMS_PER_PASS.max(4 * inner.ckpt_reserve()).min(64);
            // Greedy: under skewed overwrites cost-benefit's age term kept picking old, 86%-live
            // segments of cold data (WA 1.9-2.1 at 80% full with zipf:1.2 against 1.7 greedy).
            let r = inner.clean(victims, max_u, None, true, &mut |_, _| {});
            let r = match r {
                Ok(r) => r,
                Err(Error::NoSpace) if !checkpointed => {
                    // The move chain found no next segment: a checkpoint starts a new one.
                    checkpointed = true;
                    if let Err(e) = inner.checkpoint_with(None) {
                        eprintln!("ingot: checkpoint failed: {e}");
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    if !inner.is_closed() {
                        eprintln!("ingot: cleaning failed: {e}");
                    }
                    break;
                }
            };
            // Stuck (writes that wait fail at once) only when this pass freed nothing and even
            // the fullest cleaning could not win two segments back: the pool is full of live
            // data. A pass that freed victims is progress, however little dead space is left
            // after it (on a 24-segment pool four writers at 75% of the usable capacity got
            // ENOSPC while every pass freed 3-5 segments).
            let stuck = urgent
                && r.segments_freed == 0
                && inner.reclaimable_segments_at(GC_URGENT_UTILISATION) < 2;
            if stuck && std::env::var_os("INGOT_GC_DEBUG").is_some() {
                let free = inner.space.lock().free_segments;
                let rec = inner.reclaimable_segments_at(GC_URGENT_UTILISATION);
                eprintln!(
                    "gc: stuck: free {free} cleaned {} freed {} reclaimable {rec}",
                    r.segments_cleaned, r.segments_freed
                );
            }
            inner.gc_stuck.store(stuck, Ordering::Release);
            if r.segments_cleaned == 0 {
                // Nothing behind the last checkpoint is worth cleaning: checkpoint, so that
                // the segments sealed since become candidates, unless nothing was written.
                if urgent && !checkpointed && inner.reclaimable_segments_at(max_u) > 0 {
                    checkpointed = true;
                    if let Err(e) = inner.checkpoint_with(None) {
                        eprintln!("ingot: checkpoint failed: {e}");
                        break;
                    }
                    continue;
                }
                break;
            }
            // Passes go on back to back until free space is above the threshold again: with a
            // pause of 50 ms after each (to let the foreground run), writes at 90% full used up
            // the few segments above the data reserve meanwhile and waited a whole pass for
            // space, in one shard or the other, about every 100 ms.
        }
    }
}

/// Every device's newest valid superblock, and its other slot's when that is valid too and
/// older (a commit that stopped between its two slot writes leaves the previous checkpoint
/// there).
fn read_superblocks(
    devices: &dyn Devices,
    paths: &[PathBuf],
) -> Result<(Vec<Superblock>, Vec<Option<Superblock>>)> {
    let mut out: Vec<Superblock> = Vec::new();
    let mut older_out = Vec::new();
    let mut buf = AlignedBuf::new(IO_ALIGN);
    for (d, path) in paths.iter().enumerate() {
        if devices.size(d as u16) < DATA_START {
            return Err(Error::NotAPool {
                path: path.clone(),
                reason: "file is too small to hold a pool",
            });
        }
        let mut best: Option<Superblock> = None;
        let mut older: Option<Superblock> = None;
        let mut fault = None;
        for off in SUPERBLOCK_OFFSETS {
            devices
                .read_at(d as u16, &mut buf, off)
                .map_err(|source| Error::File {
                    path: path.clone(),
                    source,
                })?;
            match Superblock::decode(&buf) {
                Ok(Some(sb)) => match &best {
                    Some(b) if sb.generation < b.generation => older = Some(sb),
                    Some(b) if sb.generation > b.generation => older = best.replace(sb),
                    Some(_) => {}
                    None => best = Some(sb),
                },
                Ok(None) => {}
                Err(f) => fault = Some(f),
            }
        }
        let sb = match (best, fault) {
            (Some(sb), _) => sb,
            (None, Some(SuperblockFault::Version(v))) => {
                return Err(Error::UnsupportedVersion {
                    path: path.clone(),
                    found: v,
                    supported: crate::format::FORMAT_VERSION,
                })
            }
            (None, Some(SuperblockFault::Checksum)) => {
                return Err(Error::NotAPool {
                    path: path.clone(),
                    reason: "both superblock copies fail their checksum",
                })
            }
            (None, None) => {
                return Err(Error::NotAPool {
                    path: path.clone(),
                    reason: "no ingot superblock (foreign file?)",
                })
            }
        };
        if sb.device_index as usize != d || sb.device_count as usize != paths.len() {
            return Err(Error::NotAPool {
                path: path.clone(),
                reason: "device order or count does not match pool.json",
            });
        }
        if let Some(first) = out.first() {
            if first.pool_uuid != sb.pool_uuid {
                return Err(Error::NotAPool {
                    path: path.clone(),
                    reason: "device belongs to another pool",
                });
            }
        }
        if !sb.segment_bytes.is_power_of_two() || sb.segment_bytes < 2 << 20 {
            return Err(Error::Corrupt {
                what: "superblock segment size",
            });
        }
        out.push(sb);
        older_out.push(older);
    }
    Ok((out, older_out))
}

/// Read and verify the checkpoint the superblock points at; returns it and its segments.
fn read_checkpoint(
    devices: &dyn Devices,
    geo: &Geometry,
    sb: &Superblock,
) -> Result<(Image, Vec<u32>)> {
    let per_seg = geo.segment_bytes - SEGMENT_HEADER_BYTES;
    let len = sb.checkpoint_bytes;
    if len > u64::from(geo.total_segments) * per_seg {
        return Err(Error::Corrupt {
            what: "checkpoint length",
        });
    }
    let mut blob = Vec::with_capacity(len as usize);
    let mut segs = Vec::new();
    let mut seg = sb.checkpoint_segment;
    while (blob.len() as u64) < len {
        if seg == NO_SEGMENT || seg >= geo.total_segments || segs.contains(&seg) {
            return Err(Error::Corrupt {
                what: "checkpoint segment chain",
            });
        }
        let want = (len - blob.len() as u64).min(per_seg) as usize;
        let mut buf = AlignedBuf::new(SEGMENT_HEADER_BYTES as usize + want);
        let (dev, base) = geo.locate(seg);
        let n = buf.len();
        devices
            .read_at(dev, &mut buf[..n], base)
            .map_err(|source| Error::Io {
                device: dev,
                offset: base,
                source,
            })?;
        let h =
            SegmentHeader::decode_authentic(&buf, sb.log_key.as_ref()).ok_or(Error::Corrupt {
                what: "checkpoint segment header",
            })?;
        if h.kind != SegmentKind::Checkpoint || h.segment != seg || h.pool_uuid != sb.pool_uuid {
            return Err(Error::Corrupt {
                what: "checkpoint segment header",
            });
        }
        blob.extend_from_slice(
            &buf[SEGMENT_HEADER_BYTES as usize..SEGMENT_HEADER_BYTES as usize + want],
        );
        segs.push(seg);
        seg = h.next_segment;
    }
    if crc32fast::hash(&blob) != sb.checkpoint_crc {
        return Err(Error::Corrupt {
            what: "checkpoint checksum",
        });
    }
    // Block ids outnumber the pool's 4 KiB slots: compressed blocks share payloads (8 blocks of
    // a repeated byte take ~140 bytes), and ids freed since a checkpoint are reused only after
    // it. A slot per 8 bytes bounds both; more is corruption, refused before the allocation.
    let max_blocks = u64::from(geo.total_segments) * geo.segment_bytes / 8 + 1;
    let image = checkpoint::decode(&blob, max_blocks)?;
    Ok((image, segs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block `lba` at version `n`: unique, incompressible.
    fn block(lba: u64, n: u64) -> Vec<u8> {
        (0..BLOCK_BYTES / 8)
            .flat_map(|i| {
                let key = [lba, n, i].map(u64::to_le_bytes).concat();
                xxhash_rust::xxh3::xxh3_64(&key).to_le_bytes()
            })
            .collect()
    }

    /// A cached copy that no longer matches its block (memory gone bad) is not moved: the
    /// mover drops it from the cache and leaves the block in its victim, which stays allocated;
    /// the next pass reads the block from the device. Nothing bad reaches the device or a reader.
    #[test]
    fn a_cached_copy_that_differs_from_the_stored_block_is_not_moved() {
        let dir = tempfile::tempdir().unwrap();
        let o = PoolOptions {
            shards: 2,
            cache_bytes: Some(64 << 20),
            ..Default::default()
        };
        let c = CreateOptions {
            size_bytes: 64 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        let blocks = 1024u64;
        let pool = Pool::create(dir.path(), &c, &o).unwrap();
        pool.create_volume("v", blocks * BLOCK_BYTES).unwrap();
        let v = pool.volume("v").unwrap();
        for lba in 0..blocks {
            v.write(lba * BLOCK_BYTES, &block(lba, 1), false).unwrap();
        }
        // Every other block overwritten: the first segments are half dead, worth cleaning.
        for lba in (0..blocks).step_by(2) {
            v.write(lba * BLOCK_BYTES, &block(lba, 2), false).unwrap();
        }
        v.flush().unwrap();
        let version = |lba: u64| if lba % 2 == 0 { 2 } else { 1 };
        // Corrupt the cached copies of the blocks left in the half-dead segments.
        let inner = &pool.inner;
        let state = inner.lookup("v").unwrap();
        let shards = inner.shards();
        let mut corrupted = 0;
        for lba in (1..blocks).step_by(2) {
            let id = state.maps[shard_of(lba, shards)].lock().get(lba);
            let generation = inner.space.lock().get(id).unwrap().generation;
            for cache in &inner.caches {
                let mut cache = cache.lock();
                if cache.contains(id, generation) {
                    cache.insert(
                        id,
                        generation,
                        Bytes::from(vec![0xA5; BLOCK_BYTES as usize]),
                    );
                    corrupted += 1;
                }
            }
        }
        assert!(corrupted > 0, "nothing was cached");
        pool.gc(0.99, &mut |_, _| {}).unwrap();
        let s = pool.stats();
        assert!(s.gc_cache_mismatches > 0, "no bad copy was caught: {s:?}");
        let check = |pool: &Pool| {
            let v = pool.volume("v").unwrap();
            for lba in 0..blocks {
                let got = v.read(lba * BLOCK_BYTES, BLOCK_BYTES as u32).unwrap();
                assert!(got == block(lba, version(lba)), "block {lba} reads wrong");
            }
            let report = pool.check(&mut |_, _| {});
            assert!(report.problems.is_empty(), "{:?}", report.problems);
        };
        check(&pool);
        // The next pass moves them (the reads above cached good copies again), and frees the
        // victims.
        let r = pool.gc(0.99, &mut |_, _| {}).unwrap();
        assert!(r.bytes_moved > 0 && r.segments_freed > 0, "{r:?}");
        assert_eq!(pool.stats().gc_cache_mismatches, s.gc_cache_mismatches);
        check(&pool);
        // And after a crash, replay agrees.
        pool.halt();
        drop(pool);
        let pool = Pool::open(dir.path(), &o).unwrap();
        check(&pool);
    }
}
