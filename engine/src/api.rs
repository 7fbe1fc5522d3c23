//! The Volume API that the front ends and the command line call.
//!
//! Every operation is a [`Request`] submitted with a [`Completion`] callback, so a front end can keep
//! many requests in flight per connection without a thread per request. Blocking helpers wrap
//! `submit` for tests and the CLI.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Smallest addressable unit of a volume: requests must be aligned to it.
pub const SECTOR_BYTES: u64 = 512;
/// The engine's block: the unit of mapping, checksumming and (later) dedup.
pub const BLOCK_BYTES: u64 = 4096;
/// Largest single request the engine accepts (reads, writes, and the data of one call).
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// One I/O request against a volume. Offsets and lengths are in bytes, 512-byte aligned.
#[derive(Debug, Clone)]
pub enum Request {
    /// Read `len` bytes (at most [`MAX_REQUEST_BYTES`]).
    Read { offset: u64, len: u32 },
    /// Write `data`; with `fua` the data is durable before the completion runs.
    Write { offset: u64, data: Bytes, fua: bool },
    /// Make the range read as zeroes. Whole blocks become holes (no space used).
    WriteZeroes { offset: u64, len: u64, fua: bool },
    /// Discard the range: it reads back as zeroes and frees its space.
    Trim { offset: u64, len: u64, fua: bool },
    /// Make every write completed before this request durable (on every connection).
    Flush,
}

/// What a successful request returns.
#[derive(Debug)]
pub enum Reply {
    /// Data of a read, exactly the requested length (often a slice of a cached block: no copy).
    Data(Bytes),
    /// Data of a read as consecutive pieces that together are exactly the requested length:
    /// the cached blocks and zeroes it was made of, not copied into one buffer. Only from
    /// [`crate::Volume::submit_pieces`], for callers that send data with vectored writes.
    Pieces(Vec<Bytes>),
    /// A write, zero, trim or flush completed.
    Done,
}

impl Reply {
    /// A read's data in one buffer (the pieces joined; empty for `Done`).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Reply::Data(d) => d.into(),
            Reply::Pieces(p) => p.concat(),
            Reply::Done => Vec::new(),
        }
    }
}

/// Callback run exactly once when a request completes, on an engine thread: keep it short
/// (hand the result to a channel). It may also run inside `submit`, on the caller's thread: a
/// read served from the cache, an error found before any work, a write taken for write-back.
pub type Completion = Box<dyn FnOnce(Result<Reply>) + Send + 'static>;

/// Start a request with a completion and wait for its reply (for callers that may block). A
/// completion dropped unrun means whatever took it has gone away: `ShutDown`.
pub fn wait_reply(start: impl FnOnce(Completion)) -> Result<Reply> {
    wait(start)
}

/// [`wait_reply`] for any result type (the segment store's operations).
pub(crate) fn wait<T: Send + 'static>(
    start: impl FnOnce(Box<dyn FnOnce(Result<T>) + Send>),
) -> Result<T> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    start(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.recv().unwrap_or(Err(Error::ShutDown))
}

/// Work deferred to the end of a batch.
type Deferred = Vec<Box<dyn FnOnce()>>;

thread_local! {
    /// Work deferred to the end of the current batch of completions on an engine thread.
    static AFTER_BATCH: std::cell::RefCell<Option<Deferred>> =
        const { std::cell::RefCell::new(None) };
}

/// Run `f` once the engine thread running this completion has run the rest of its current batch
/// of completions (before it waits for more work), or now on any other thread. A front end
/// uses it to send the replies of one batch together from the completing thread, instead of
/// handing each to a writer thread.
pub fn after_batch(f: Box<dyn FnOnce()>) {
    let f = AFTER_BATCH.with(|a| match a.borrow_mut().as_mut() {
        Some(list) => {
            list.push(f);
            None
        }
        None => Some(f),
    });
    if let Some(f) = f {
        f();
    }
}

/// Start collecting [`after_batch`] work on this (engine) thread.
pub(crate) fn begin_batch() {
    AFTER_BATCH.with(|a| {
        let mut a = a.borrow_mut();
        if a.is_none() {
            *a = Some(Vec::new());
        }
    });
}

/// Run the [`after_batch`] work collected so far (more may be added while it runs; that runs
/// too); collecting goes on.
pub(crate) fn end_batch() {
    loop {
        let work = AFTER_BATCH.with(|a| a.borrow_mut().as_mut().map(std::mem::take));
        match work {
            Some(w) if !w.is_empty() => w.into_iter().for_each(|f| f()),
            _ => return,
        }
    }
}

/// A run of blocks with the same allocation state, as block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Length of the run in bytes.
    pub len: u64,
    /// True when no data is stored for the run (never written, trimmed or zeroed); it reads as
    /// zeroes.
    pub hole: bool,
}

/// Public description of a volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Bytes of the volume that map to stored data (not holes).
    pub mapped_bytes: u64,
    /// New blocks are deduplicated.
    #[serde(default = "yes")]
    pub dedup: bool,
    /// New blocks are compressed.
    #[serde(default = "yes")]
    pub compression: bool,
    /// A snapshot: reads only.
    #[serde(default)]
    pub read_only: bool,
    /// Which volumes' blocks its new blocks deduplicate against: "shared", "private" or a
    /// domain name.
    #[serde(default)]
    pub dedup_domain: DedupDomain,
    /// QoS limits at admission (0: none).
    #[serde(flatten)]
    pub qos: crate::qos::QosLimits,
    /// Time requests waited for those limits since the pool was opened, in seconds.
    #[serde(default)]
    pub qos_wait_seconds: f64,
    /// Data reduction, filled in by `stats` (a block shared by n map entries counts 1/n to
    /// each): stored bytes attributed to the volume.
    #[serde(default)]
    pub stored_bytes: u64,
    /// Blocks attributed to the volume.
    #[serde(default)]
    pub unique_blocks: u64,
    /// Mapped blocks / attributed blocks.
    #[serde(default)]
    pub dedup_ratio: f64,
    /// Attributed blocks' plaintext bytes / attributed stored bytes.
    #[serde(default)]
    pub compression_ratio: f64,
    /// Mapped bytes / attributed stored bytes.
    #[serde(default)]
    pub data_reduction_ratio: f64,
    /// The attributed figures above are estimates: some of the volume's map leaves were
    /// evicted from the metadata cache, and `stats` read a sample of them (about 32 for each
    /// of the volume's per-shard maps) instead of every one.
    #[serde(default)]
    pub reduction_estimated: bool,
}

fn yes() -> bool {
    true
}

/// Pool-wide statistics, as the stats report shows them. Field names are a contract.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Bytes of segment space the pool can hold.
    pub capacity_bytes: u64,
    /// Payload bytes the pool stores before writes to unmapped blocks fail for want of space: the
    /// segments less metadata reserves and the cleaner's headroom (overwrites still succeed).
    pub usable_bytes: u64,
    /// Set when stored bytes pass 85% of `usable_bytes`: what happens next and what to do.
    pub space_warning: Option<String>,
    /// Set when the file system under a thin pool has less room than the pool may still
    /// write (writes then fail for want of space once it runs out).
    pub host_warning: Option<String>,
    /// Room left on the file system under the backing files (`u64::MAX`: block devices).
    pub host_free_bytes: u64,
    /// Bytes of the backing files not allocated yet (what a thin pool may still ask of the
    /// file system).
    pub host_unallocated_bytes: u64,
    /// Why the pool stopped taking requests (an engine thread failed); `None` while it serves.
    pub halted: Option<String>,
    /// Bytes of segments in use (data, metadata, open).
    pub physical_used_bytes: u64,
    /// Bytes of all volumes that map to stored blocks.
    pub logical_mapped_bytes: u64,
    /// Bytes of live stored payloads.
    pub stored_bytes: u64,
    pub segments_total: u64,
    pub segments_free: u64,
    pub segment_bytes: u64,
    pub volumes: Vec<VolumeInfo>,
    /// Bytes written by clients since the pool was opened.
    pub client_written_bytes: u64,
    /// Bytes written to devices since the pool was opened (records, checkpoints, superblocks).
    pub device_written_bytes: u64,
    pub cache_bytes: u64,
    pub cache_capacity_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub checkpoint_seq: u64,
    pub last_seq: u64,
    pub io_engine: String,
    /// Bytes of write buffers the process's io_uring rings registered with the kernel (pinned;
    /// 0 when the kernel refused them, e.g. under a low `RLIMIT_MEMLOCK`, or with no long
    /// write yet): records of 256 KiB and more are written from them.
    #[serde(default)]
    pub io_registered_bytes: u64,
    pub shards: usize,
    /// Bytes of sealed segments not holding live data: what cleaning can give back.
    pub reclaimable_bytes: u64,
    /// Payload bytes the cleaner has moved since the pool was opened.
    pub gc_bytes_moved: u64,
    /// Bytes the cleaner read from devices: victims' records (to find their blocks) and the
    /// live blocks it moved.
    pub gc_bytes_read: u64,
    /// Payload bytes the cleaner took from the block cache instead of reading them.
    pub gc_bytes_from_cache: u64,
    /// Cached copies the cleaner found not to match their block's checksum (and read from the
    /// device instead): memory gone bad, or a bug; 0 on a healthy pool.
    pub gc_cache_mismatches: u64,
    /// Victims the cleaner looked for in the whole block table because their own records,
    /// walked, did not name all their live blocks (a damaged or torn record header, a segment
    /// from before the pool had a key); 0 in the normal case.
    #[serde(default)]
    pub gc_table_scans: u64,
    /// Device bytes written / client bytes written since the pool was opened.
    pub write_amplification: f64,
    /// Segments the running cleaning pass is emptying (0 when idle).
    pub segments_cleaning: u64,
    /// Distinct stored blocks (each stored once however many LBAs map to it).
    pub unique_blocks: u64,
    /// Mapped blocks / unique blocks.
    pub dedup_ratio: f64,
    /// Unique blocks' plaintext bytes / stored bytes.
    pub compression_ratio: f64,
    /// Logical mapped bytes / stored bytes.
    pub data_reduction_ratio: f64,
    /// RAM held by the dedup index.
    pub dedup_index_bytes: u64,
    /// Fingerprints in the dedup index.
    pub dedup_index_entries: u64,
    /// Dedup hits found by following a stream of duplicates (the block after one that
    /// duplicates stored block `id` tried against `id + 1`), not in the index, since the pool
    /// opened: what keeps copies deduplicated once the index samples its fingerprints.
    #[serde(default)]
    pub dedup_stream_hits: u64,
    /// RAM the engine holds for metadata outside its caches and the dedup index: reference
    /// counts, and the block table's and volume maps' slots and leaves' stubs (the leaves'
    /// entries are the metadata cache's), as it counts them itself.
    #[serde(default)]
    pub metadata_ram_bytes: u64,
    /// The metadata cache (map leaves' and block-table leaves' entries in RAM; format 3 pools
    /// evict them past the budget): its budget (0: a format 2 pool, which keeps every leaf),
    /// the bytes it holds, leaves known (held or evicted), and since the pool was opened the
    /// look-ups that found the entries in RAM, the leaves read back from their page, and the
    /// leaves evicted.
    #[serde(default)]
    pub metadata_cache_budget_bytes: u64,
    #[serde(default)]
    pub metadata_cache_bytes: u64,
    #[serde(default)]
    pub metadata_cache_leaves: u64,
    #[serde(default)]
    pub metadata_cache_hits: u64,
    #[serde(default)]
    pub metadata_cache_misses: u64,
    #[serde(default)]
    pub metadata_cache_evictions: u64,
    /// Of `metadata_cache_misses`: block-table leaves read back (the rest are map leaves).
    #[serde(default)]
    pub metadata_cache_table_misses: u64,
    /// Pages of metadata the open read from its checkpoint (root, directories, interior
    /// pages, counts): what an open costs, which does not follow the pool's size.
    #[serde(default)]
    pub metadata_open_pages: u64,
    /// Metadata pages a shard's thread waited for in a blocking read (its other requests
    /// waited with it): the fallback when a page read through its queue did not stay.
    #[serde(default)]
    pub metadata_shard_waits: u64,
    /// Metadata pages the shards read through their own queues while only the requests that
    /// needed them waited.
    #[serde(default)]
    pub metadata_ring_reads: u64,
    /// (`metadata_ram_bytes` + `dedup_index_bytes`) / `unique_blocks`: the RAM each stored
    /// block costs beyond the caches (0 for an empty pool).
    #[serde(default)]
    pub ram_bytes_per_stored_block: f64,
    /// Resident memory of the process serving the pool, caches included (`/proc/self/statm`).
    #[serde(default)]
    pub process_rss_bytes: u64,
    /// A pool kept in an object store: what its syncs sent (`None` for a local pool).
    #[serde(default)]
    pub replica: Option<ReplicaStats>,
    /// The index keeps 1 in this many fingerprints (1 until its memory budget is reached).
    pub dedup_index_sampling: u64,
    /// Write-back limit (0: every write is acknowledged once stored).
    #[serde(default)]
    pub write_back_limit_bytes: u64,
    /// Bytes of writes acknowledged and not yet stored, now.
    #[serde(default)]
    pub write_back_bytes: u64,
    /// Writes acknowledged before they were stored, since the pool was opened.
    #[serde(default)]
    pub write_back_writes: u64,
    /// Where `device_written_bytes` went, since the pool was opened.
    #[serde(default)]
    pub device_written_breakdown: WriteBreakdown,
    /// Where requests spent their time since the pool was opened.
    #[serde(default)]
    pub latency: LatencyBreakdown,
}

/// Time spent per stage, by kind of request (`Stats::latency`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyBreakdown {
    pub reads: StageTimes,
    /// Writes, write-zeroes and trims.
    pub writes: StageTimes,
    /// Flushes (and the flush a FUA write ends with): `device` counts the syncs.
    pub flushes: StageTimes,
}

/// Sums of nanoseconds per stage with their counts: a mean is `x_ns / count`, and the
/// difference of two snapshots gives the means over an interval.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StageTimes {
    /// Requests completed, and their time from submission to completion (a write
    /// acknowledged early: to its records applied).
    pub done: u64,
    pub total_ns: u64,
    /// Request parts a shard took, and their time from submission until then.
    pub picked: u64,
    pub queued_ns: u64,
    /// Device operations (read spans, log records, syncs) and their time from being queued to
    /// the device until they completed.
    pub device: u64,
    pub device_ns: u64,
}

impl StageTimes {
    /// Mean microseconds of a stage (`None` when nothing was counted).
    pub fn mean_us(ns: u64, count: u64) -> Option<f64> {
        (count > 0).then(|| ns as f64 / count as f64 / 1000.0)
    }

    /// The counts and sums since `before`.
    pub fn since(&self, before: &StageTimes) -> StageTimes {
        StageTimes {
            done: self.done.saturating_sub(before.done),
            total_ns: self.total_ns.saturating_sub(before.total_ns),
            picked: self.picked.saturating_sub(before.picked),
            queued_ns: self.queued_ns.saturating_sub(before.queued_ns),
            device: self.device.saturating_sub(before.device),
            device_ns: self.device_ns.saturating_sub(before.device_ns),
        }
    }
}

/// A pool kept in an object store (`Stats::replica`; `replica`): what its syncs sent, since
/// the pool was opened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplicaStats {
    /// Where the pool is kept (`rados://POOL/NAME`).
    pub store: String,
    /// The epoch this node serves the pool under.
    pub epoch: u64,
    /// Data bytes sent in batches.
    pub sent_bytes: u64,
    pub batches: u64,
    /// Syncs made durable in the store (commits).
    pub commits: u64,
    /// Mean and longest time a commit took (its batches still in flight, then the record).
    pub commit_mean_us: u64,
    pub commit_max_us: u64,
    /// Data written to the devices and not taken for sending yet.
    pub pending_bytes: u64,
    /// Bases sent whole (a restore replays the last one and what came after it).
    #[serde(default)]
    pub bases: u64,
    /// Data bytes committed since the last whole base, the opens before this one included as
    /// far as this node learnt them at open (while a base is sent, those before it count too).
    #[serde(default)]
    pub history_bytes: u64,
    /// Objects written to the store and their bytes (batch objects and log records).
    pub store_objects: u64,
    pub store_bytes: u64,
    /// Objects deleted from the store since open: the batch objects and log records of
    /// commits before a new base.
    #[serde(default)]
    pub store_deleted_objects: u64,
    /// Batch objects being written now (the upload queue).
    pub uploads_in_flight: u64,
    /// After a lazy takeover: device bytes still only in the store, and the bytes and range
    /// reads fetched from it since open (reads of cold ranges and the background filler).
    #[serde(default)]
    pub cold_bytes: u64,
    #[serde(default)]
    pub fetched_bytes: u64,
    #[serde(default)]
    pub fetches: u64,
    /// With a local cache budget (`ingot serve --local-cache`): the budget, the device bytes
    /// the local files hold now, and the bytes dropped from them since open (clean ranges the
    /// store holds, read back from it on use).
    #[serde(default)]
    pub local_cache_limit_bytes: u64,
    #[serde(default)]
    pub local_bytes: u64,
    #[serde(default)]
    pub evicted_bytes: u64,
    /// The store lacks syncs this node acknowledged: with local acknowledgement, the uploads
    /// behind them (or a base due after a crash), or an upload failed.
    #[serde(default)]
    pub behind: bool,
    /// An upload or commit failed: no sync succeeds from now on.
    #[serde(default)]
    pub failed: bool,
}

/// Device bytes written by kind of write (`Stats::device_written_breakdown`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WriteBreakdown {
    /// Data records (client writes, holes, references), trims: count, entries, bytes, and the
    /// part of those bytes that is header area (header, entries, padding to 4 KiB).
    pub data_records: u64,
    pub data_entries: u64,
    pub data_bytes: u64,
    pub data_header_bytes: u64,
    /// Cleaner move records, likewise.
    pub move_records: u64,
    pub move_entries: u64,
    pub move_bytes: u64,
    pub move_header_bytes: u64,
    /// Checkpoint blobs (with their segment headers).
    pub checkpoints: u64,
    pub checkpoint_bytes: u64,
}

/// `a / b`, or 1 when there is nothing to divide (an empty pool has no reduction).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        1.0
    }
}

/// A problem `check` found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Problem {
    /// Short machine-readable kind: `checksum`, `io`, `refcount`, `location`, `segment_usage`.
    pub kind: String,
    /// Where and what, for a human.
    pub detail: String,
}

/// Outcome of a full consistency check.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckReport {
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    pub volumes_checked: u64,
    pub problems: Vec<Problem>,
}

/// Check that a request range is inside a volume of `size` bytes, sector-aligned and not larger
/// than `max` bytes.
pub fn check_range(offset: u64, len: u64, size: u64, max: u64) -> Result<()> {
    use crate::error::Error;
    if offset % SECTOR_BYTES != 0 || len % SECTOR_BYTES != 0 {
        return Err(Error::Unaligned {
            offset,
            len,
            align: SECTOR_BYTES,
        });
    }
    if len > max {
        return Err(Error::TooLarge { len, max });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Which volumes a volume's new blocks deduplicate against. Blocks only deduplicate within one
/// domain: the fingerprint key is the domain's, so a lookup from one domain never finds
/// another's blocks (and whether a write deduplicates tells a tenant nothing about other
/// domains).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum DedupDomain {
    /// Every volume in the shared domain (the default).
    #[default]
    Shared,
    /// The volume alone (its snapshots and clones share its blocks by reference anyway; a clone
    /// is private to itself).
    Private,
    /// The volumes naming this domain: 1-64 characters of `[A-Za-z0-9._-]`, not starting with
    /// '.', other than "shared" and "private".
    Named(String),
}

pub use crate::error::InvalidDedupDomain;

impl DedupDomain {
    /// Longest domain name.
    pub const MAX_NAME: usize = 64;

    /// Refuse a named domain whose name `from_str` would not give (too long, bad characters,
    /// or "shared" / "private"): what an API caller builds by hand is checked like what a
    /// command line parses.
    pub fn validate(&self) -> Result<(), InvalidDedupDomain> {
        match self {
            DedupDomain::Named(n) if n.parse::<DedupDomain>().ok().as_ref() != Some(self) => {
                Err(InvalidDedupDomain(n.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Bytes identifying the domain in the derivation of its fingerprint key; `volume` is the
    /// id of the volume asking (the whole identity of a private domain).
    pub(crate) fn id_bytes(&self, volume: u32) -> Vec<u8> {
        match self {
            DedupDomain::Shared => b"shared".to_vec(),
            DedupDomain::Private => {
                let mut v = b"private:".to_vec();
                v.extend_from_slice(&volume.to_le_bytes());
                v
            }
            DedupDomain::Named(n) => {
                let mut v = b"named:".to_vec();
                v.extend_from_slice(n.as_bytes());
                v
            }
        }
    }
}

impl std::str::FromStr for DedupDomain {
    type Err = InvalidDedupDomain;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(DedupDomain::Shared),
            "private" => Ok(DedupDomain::Private),
            _ => {
                let ok = !s.is_empty()
                    && s.len() <= Self::MAX_NAME
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
                    && !s.starts_with('.');
                if ok {
                    Ok(DedupDomain::Named(s.to_string()))
                } else {
                    Err(InvalidDedupDomain(s.to_string()))
                }
            }
        }
    }
}

impl std::fmt::Display for DedupDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DedupDomain::Shared => f.write_str("shared"),
            DedupDomain::Private => f.write_str("private"),
            DedupDomain::Named(n) => f.write_str(n),
        }
    }
}

impl Serialize for DedupDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DedupDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
