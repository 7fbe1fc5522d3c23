//! Counters the write path and the cleaner bump, read by `stats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Default)]
pub(crate) struct ShardStats {
    /// Records applied (the next shard_seq expected to apply).
    pub applied_shard_seq: AtomicU64,
    /// Records known durable (a sync completed after they were applied).
    pub durable_shard_seq: AtomicU64,
    /// Parts of early-acknowledged writes sent to this shard and not yet applied: counted
    /// before the acknowledgement, uncounted by the shard once per turn. A flush that finds
    /// them on one shard only is that shard's alone (see `Workers::flush`).
    pub early_parts: AtomicU64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub client_written: AtomicU64,
    pub device_written: AtomicU64,
    /// Payload bytes the cleaner moved.
    pub gc_moved: AtomicU64,
    /// Segments the running cleaning pass is emptying.
    pub gc_cleaning: AtomicU64,
    /// Device bytes the cleaner read from victims (their records and live blocks).
    pub gc_read: AtomicU64,
    /// Payload bytes the cleaner took from the block cache instead of the device.
    pub gc_from_cache: AtomicU64,
    /// Victims whose live blocks were looked for in the block table, their records naming
    /// fewer than their usage counts (see `gc::summary`).
    pub gc_table_scans: AtomicU64,
    /// Cached copies the mover found not to match their block's CRC.
    pub gc_cache_mismatches: AtomicU64,
    /// `WriteBreakdown`, by record kind: [records, entries, bytes, header bytes] for data
    /// (and trim) records, then for move records.
    pub records: [[AtomicU64; 4]; 2],
    pub checkpoints: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
    /// Dedup hits found by following a stream of duplicates rather than in the index.
    pub dedup_stream_hits: AtomicU64,
}

/// What kind of request a stage timing belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
}

/// Where requests spend their time: nanoseconds summed per stage, with counts (`stats` gives
/// the means). A clock read per stage boundary, a few tens of nanoseconds a request.
#[derive(Default)]
pub(crate) struct Stages {
    ops: [OpStages; 3],
}

#[derive(Default)]
struct OpStages {
    /// Requests completed, and their time from submission to completion (for a write
    /// acknowledged early: to its records applied; for a flush: to its reply).
    done: AtomicU64,
    total_ns: AtomicU64,
    /// Request parts taken by a shard, and their time from submission until then (the queue
    /// in front of the worker).
    picked: AtomicU64,
    queued_ns: AtomicU64,
    /// Device operations completed (a read span, a record; for flushes, the syncs), and
    /// their time from being queued in the ring (or the sync called) to completion.
    device: AtomicU64,
    device_ns: AtomicU64,
}

fn ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

impl Stages {
    pub(crate) fn done(&self, op: Op, since: Instant) {
        let o = &self.ops[op as usize];
        o.done.fetch_add(1, Ordering::Relaxed);
        o.total_ns.fetch_add(ns(since), Ordering::Relaxed);
    }
    pub(crate) fn picked(&self, op: Op, since: Instant) {
        let o = &self.ops[op as usize];
        o.picked.fetch_add(1, Ordering::Relaxed);
        o.queued_ns.fetch_add(ns(since), Ordering::Relaxed);
    }
    pub(crate) fn device(&self, op: Op, since: Instant) {
        let o = &self.ops[op as usize];
        o.device.fetch_add(1, Ordering::Relaxed);
        o.device_ns.fetch_add(ns(since), Ordering::Relaxed);
    }
    /// The sums so far, for `stats`.
    pub(crate) fn snapshot(&self, op: Op) -> crate::api::StageTimes {
        let o = &self.ops[op as usize];
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::api::StageTimes {
            done: l(&o.done),
            total_ns: l(&o.total_ns),
            picked: l(&o.picked),
            queued_ns: l(&o.queued_ns),
            device: l(&o.device),
            device_ns: l(&o.device_ns),
        }
    }
}
