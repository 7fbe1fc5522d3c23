//! Pool statistics and the warnings `stats` gives.

use crate::pool::Pool;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::collections::HashSet;

use crate::api::{ratio, LatencyBreakdown, Stats, WriteBreakdown, BLOCK_BYTES};
use crate::cache::BlockCache;
use crate::counters::Op;
use crate::format::SEGMENT_HEADER_BYTES;
use crate::map::VolumeState;
use crate::space::{HostRoom, SegState};

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The warning `stats` gives once stored data passes 85% of the usable capacity.
pub(crate) fn space_warning(stored: u64, usable: u64) -> Option<String> {
    let pct = stored as f64 * 100.0 / usable.max(1) as f64;
    (pct >= 85.0).then(|| {
        format!(
            "pool is {pct:.0}% full: at 100% writes to unmapped blocks fail for want of space \
             (overwrites, trims and reads go on); trim or delete volumes, or add a larger pool"
        )
    })
}

/// What `stats` says when the host file system cannot hold what the pool may still write.
fn host_warning(host: &HostRoom) -> Option<String> {
    let (free, unallocated) = host.free_and_unallocated();
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

/// Resident bytes of this process (`/proc/self/statm`), 0 where it cannot be read.
fn process_rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// Evicted map leaves `stats` reads per volume and shard, at most about (see `Pool::stats`).
const STATS_SAMPLE_LEAVES: u64 = 32;

/// A leaf of a volume as `stats` walks it.
struct Walked {
    idx: u64,
    leaf: std::sync::Weak<crate::map::MapLeaf>,
    /// Read if evicted.
    sample: bool,
    /// Its entries, read for the sample.
    read: Option<Box<crate::map::MapPage>>,
}

impl Pool {
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let mut volumes = self.volumes();
        let states: Vec<Arc<VolumeState>> =
            inner.ctx.volumes.read().by_name.values().cloned().collect();
        // Lock order is checkpoint state, then space (as a checkpoint takes them): read the
        // checkpoint's sequence number before taking the space lock.
        let checkpoint_seq = inner.ckpt.state.lock().seq_end;
        // Map pages are shared by snapshots and clones: each counted once.
        let mut pages_seen = HashSet::new();
        let mut map_ram = 0u64;
        let mut map_hits = 0u64;
        // First, with no space lock: each volume's leaves (weak: a strong hold would make
        // writes copy them meanwhile), and the entries of a sample of the evicted ones, read
        // without any lock (evicted leaves: every `stride`-th of a map, so that stats and each
        // metrics scrape read a bounded number of pages).
        let mut walks: Vec<Vec<Walked>> = Vec::with_capacity(states.len());
        for v in &states {
            let mut walk = Vec::new();
            for m in &v.maps {
                let m = m.lock();
                map_ram += m.ram_bytes(&mut pages_seen);
                map_hits += m.hits();
                let stride = (m.present_pages() / STATS_SAMPLE_LEAVES).max(1) as usize;
                let mut k = 0usize;
                for (idx, leaf) in m.pages.iter().enumerate() {
                    let Some(leaf) = leaf else { continue };
                    k += 1;
                    walk.push(Walked {
                        idx: idx as u64,
                        leaf: Arc::downgrade(leaf),
                        sample: k % stride == 0,
                        read: None,
                    });
                }
            }
            for w in walk.iter_mut().filter(|w| w.sample) {
                if let Some(leaf) = w.leaf.upgrade() {
                    if !leaf.has_entries() {
                        // One that does not read back counts nothing here (reads and check
                        // report it).
                        w.read = leaf.with_entries(w.idx, |e| Box::new(*e)).ok();
                    }
                }
            }
            walks.push(walk);
        }
        let space = inner.ctx.space.lock();
        // Attribute shared blocks to the volumes mapping them: 1/refs of the block each.
        for (v, walk) in states.iter().zip(&walks) {
            let Some(info) = volumes.iter_mut().find(|i| i.name == v.name) else {
                // Created since `volumes` was listed.
                continue;
            };
            let (mut unique, mut stored, mut mapped) = (0f64, 0f64, 0u64);
            // Entries seen, each weighted by its leaf's share (1/users), and those of evicted
            // leaves skipped, likewise: the skipped ones are estimated from the ones seen.
            let (mut seen_w, mut skipped_w, mut skipped) = (0f64, 0f64, 0u64);
            // Unique blocks whose block-table leaf is evicted (weighted), whose stored bytes
            // are estimated from those whose leaf is in RAM.
            let (mut unplaced, mut placed) = (0f64, 0f64);
            for w in walk {
                let Some(leaf) = w.leaf.upgrade() else {
                    continue;
                };
                // A block's share: one over its references (the distinct leaves pointing at
                // it) times this leaf's holders (the volumes sharing the leaf), so that the
                // volumes' shares add up to one.
                let users = f64::from(leaf.users().max(1));
                let mut count = |ids: &crate::map::MapPage| {
                    for &id in ids.iter().filter(|&&id| id != 0) {
                        seen_w += 1.0 / users;
                        if !space.refs.live(id) {
                            continue;
                        }
                        let r = f64::from(space.refs.get(id)) * users;
                        unique += 1.0 / r;
                        mapped += 1;
                        match space.get_resident(id) {
                            Some(b) => {
                                stored += b.share() as f64 / r;
                                placed += 1.0 / r;
                            }
                            None => unplaced += 1.0 / r,
                        }
                    }
                };
                let done = match &w.read {
                    Some(ids) => {
                        count(ids);
                        true
                    }
                    None => leaf.with_resident(|ids| count(ids)).is_some(),
                };
                if !done {
                    skipped_w += leaf.count() as f64 / users;
                    skipped += leaf.count();
                }
            }
            if unplaced > 0.0 && placed > 0.0 {
                stored *= 1.0 + unplaced / placed;
            }
            if skipped > 0 && seen_w > 0.0 {
                let scale = 1.0 + skipped_w / seen_w;
                unique *= scale;
                stored *= scale;
            }
            mapped += skipped;
            info.reduction_estimated = skipped > 0 || unplaced > 0.0;
            info.unique_blocks = unique.round() as u64;
            info.stored_bytes = stored.round() as u64;
            info.dedup_ratio = ratio(mapped as f64, unique);
            info.compression_ratio = ratio(unique * BLOCK_BYTES as f64, stored);
            info.data_reduction_ratio = ratio((mapped * BLOCK_BYTES) as f64, stored);
        }
        let (index_bytes, index_entries, index_sampling) = {
            let d = inner.ctx.dedup.lock();
            (d.bytes(), d.len() as u64, 1u64 << d.sample_bits())
        };
        let meta = inner.ctx.meta.stats();
        let metadata_ram = map_ram
            + space.ram_bytes()
            + inner
                .ckpt
                .pages_ram
                .load(std::sync::atomic::Ordering::Relaxed);
        let logical: u64 = volumes.iter().map(|v| v.mapped_bytes).sum();
        let seg = inner.ctx.geo.segment_bytes;
        let total = u64::from(inner.ctx.geo.total_segments);
        let cache_sum = |f: fn(&BlockCache) -> u64| -> u64 {
            inner.ctx.caches.iter().map(|c| f(&c.lock())).sum()
        };
        Stats {
            capacity_bytes: total * seg,
            usable_bytes: inner.ctx.usable_bytes,
            space_warning: space_warning(space.stored_bytes, inner.ctx.usable_bytes),
            host_warning: {
                inner.ctx.host.refresh(&*inner.ctx.devices, true);
                host_warning(&inner.ctx.host)
            },
            host_free_bytes: inner.ctx.host.free_and_unallocated().0,
            host_unallocated_bytes: inner.ctx.host.free_and_unallocated().1,
            halted: inner.ctx.health.reason(),
            physical_used_bytes: (total - space.free_segments as u64) * seg,
            logical_mapped_bytes: logical,
            stored_bytes: space.stored_bytes,
            segments_total: total,
            segments_free: space.free_segments as u64,
            segment_bytes: seg,
            volumes,
            client_written_bytes: inner.ctx.counters.client_written.load(Ordering::Relaxed),
            device_written_bytes: inner.ctx.counters.device_written.load(Ordering::Relaxed),
            cache_bytes: cache_sum(|c| c.len_bytes()),
            cache_capacity_bytes: inner.cache_capacity,
            cache_hits: cache_sum(|c| c.hits),
            cache_misses: cache_sum(|c| c.misses),
            checkpoint_seq,
            last_seq: inner.ctx.seq.load(Ordering::Relaxed).saturating_sub(1),
            io_engine: inner.ctx.devices.engine_name().to_string(),
            io_registered_bytes: crate::io::uring::registered_bytes() as u64,
            shards: inner.ctx.shards(),
            reclaimable_bytes: space
                .seg_state
                .iter()
                .enumerate()
                .filter(|(_, st)| matches!(st, SegState::Sealed { .. }))
                .map(|(s, _)| (seg - SEGMENT_HEADER_BYTES).saturating_sub(space.seg_live[s]))
                .sum(),
            gc_bytes_moved: inner.ctx.counters.gc_moved.load(Ordering::Relaxed),
            write_amplification: {
                let client = inner.ctx.counters.client_written.load(Ordering::Relaxed);
                let device = inner.ctx.counters.device_written.load(Ordering::Relaxed);
                if client == 0 {
                    0.0
                } else {
                    device as f64 / client as f64
                }
            },
            segments_cleaning: inner.ctx.counters.gc_cleaning.load(Ordering::Relaxed),
            gc_bytes_read: inner.ctx.counters.gc_read.load(Ordering::Relaxed),
            gc_bytes_from_cache: inner.ctx.counters.gc_from_cache.load(Ordering::Relaxed),
            gc_cache_mismatches: inner
                .ctx
                .counters
                .gc_cache_mismatches
                .load(Ordering::Relaxed),
            gc_table_scans: inner.ctx.counters.gc_table_scans.load(Ordering::Relaxed),
            unique_blocks: space.live_blocks,
            dedup_ratio: ratio((logical / BLOCK_BYTES) as f64, space.live_blocks as f64),
            compression_ratio: ratio(
                (space.live_blocks * BLOCK_BYTES) as f64,
                space.stored_bytes as f64,
            ),
            data_reduction_ratio: ratio(logical as f64, space.stored_bytes as f64),
            dedup_index_bytes: index_bytes,
            metadata_ram_bytes: metadata_ram,
            metadata_cache_budget_bytes: meta.budget_bytes,
            metadata_cache_bytes: meta.resident_bytes,
            metadata_cache_leaves: meta.leaves,
            metadata_cache_hits: map_hits + meta.hits_retired + space.blocks.hits,
            metadata_cache_misses: meta.misses,
            metadata_cache_evictions: meta.evictions,
            metadata_cache_table_misses: meta.table_misses,
            metadata_open_pages: meta.open_pages,
            metadata_shard_waits: meta.shard_waits,
            metadata_ring_reads: meta.ring_reads,
            ram_bytes_per_stored_block: if space.live_blocks == 0 {
                0.0
            } else {
                (metadata_ram + index_bytes) as f64 / space.live_blocks as f64
            },
            process_rss_bytes: process_rss_bytes(),
            replica: match (&inner.ctx.replica, &inner.ctx.replica_counters) {
                (Some(r), Some(c)) => Some(c.stats(&**r)),
                _ => None,
            },
            dedup_index_entries: index_entries,
            dedup_stream_hits: inner
                .ctx
                .counters
                .dedup_stream_hits
                .load(std::sync::atomic::Ordering::Relaxed),
            dedup_index_sampling: index_sampling,
            write_back_limit_bytes: inner.ctx.write_back.limit(),
            write_back_bytes: inner.ctx.write_back.bytes(),
            write_back_writes: inner.ctx.write_back.total(),
            device_written_breakdown: {
                let c = &inner.ctx.counters;
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
            latency: {
                let s = &inner.ctx.stages;
                LatencyBreakdown {
                    reads: s.snapshot(Op::Read),
                    writes: s.snapshot(Op::Write),
                    flushes: s.snapshot(Op::Flush),
                }
            },
        }
    }
}
