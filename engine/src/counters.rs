//! Counters the write path and the cleaner bump, read by `stats`.

use std::sync::atomic::AtomicU64;

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
