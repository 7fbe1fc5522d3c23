//! Replay: the records of every chain after the checkpoint, applied in sequence order to the
//! maps, the block table and the dedup index the checkpoint loaded.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{PagePtr, Superblock, FLAG_REF, MAP_PAGE_ENTRIES, NO_SEGMENT};
use crate::log::ShardPosition;
use crate::map::{shard_of, trim_owned, MapLeaf, VolumeState};
use crate::meta::cache::MetaCache;
use crate::recovery::scan::ReplayRecord;
use crate::recovery::{survey_chain, ChainRecords, Entry, LogSource, Survey};
use crate::reduce::DedupIndex;
use crate::space::{Geometry, Space};
use crate::store::SegmentStore;

/// The state replay rebuilds, as loaded from the checkpoint.
pub(crate) struct Rebuild<'a> {
    pub space: &'a mut Space,
    /// Volumes by id.
    pub volumes: &'a HashMap<u32, Arc<VolumeState>>,
    pub dedup: &'a mut DedupIndex,
    pub dedup_key: &'a dyn Fn(u128) -> u64,
    /// New blocks' fingerprints go into the index (the checkpoint's are keyed).
    pub index: bool,
    /// Data shards of this open.
    pub shards: usize,
    /// Data chains of the checkpoint: a trim clears the pages its writer owned then.
    pub old_shards: usize,
    /// The metadata cache, whose evicted leaves replay reads ahead (`None`: read as used).
    pub meta: Option<&'a MetaCache>,
    /// Data entries the first walk holds ([`HOLD_ENTRIES`] but in tests).
    pub hold_entries: usize,
}

/// Records' data entries replay reads the leaves of ahead at most, per leaf it may read:
/// a window of records whose leaves fit half the metadata cache.
const WINDOW_ENTRIES_PER_LEAF: usize = 64;

/// Read ahead, adjacent pages together, the evicted leaves the data entries of `records`
/// will use, at most `max` map leaves and `max` block-table leaves: the maps' leaves they
/// set, then the table's leaves of the blocks they place or move and of those they replace
/// (as the maps hold them before the window). Without it, each would be a 4 KiB read of
/// its own when used (an open of a format 3 pool starts with every leaf evicted).
fn prefetch(records: &[ReplayRecord], r: &mut Rebuild<'_>, max: usize) {
    let Some(meta) = r.meta else {
        return;
    };
    let mut leaves: Vec<(Arc<MapLeaf>, u64, PagePtr)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut set: Vec<(&Arc<VolumeState>, u64)> = Vec::new();
    let mut ids: Vec<u64> = Vec::new();
    for rec in records {
        for e in &rec.entries {
            match e {
                Entry::Data(d) => {
                    // A new block's entry is set; a dedup reference's block is live, its
                    // entry not needed.
                    if d.block_id != 0 && d.flags & FLAG_REF == 0 {
                        ids.push(d.block_id);
                    }
                    let Some(vol) = r.volumes.get(&d.volume) else {
                        continue;
                    };
                    if d.lba >= vol.blocks() {
                        continue;
                    }
                    set.push((vol, d.lba));
                    let idx = d.lba / MAP_PAGE_ENTRIES;
                    if leaves.len() >= max || !seen.insert((d.volume, idx)) {
                        continue;
                    }
                    let m = vol.maps[shard_of(d.lba, r.shards)].lock();
                    if let Some(Some(leaf)) = m.pages.get(idx as usize) {
                        if let Some(at) = leaf.evicted_at() {
                            leaves.push((leaf.clone(), idx, at));
                        }
                    }
                }
                Entry::Move(d) => ids.push(d.block_id),
                Entry::Trim(_) => {}
            }
        }
    }
    let want: Vec<(u64, PagePtr)> = leaves.iter().map(|&(_, idx, at)| (idx, at)).collect();
    let mut taken = 0;
    for ((leaf, _, at), ids) in leaves.iter().zip(meta.read_leaves_ahead(&want)) {
        if ids.is_some_and(|ids| leaf.take_prefetched(ids, *at)) {
            taken += 1;
        }
    }
    meta.took_ahead(taken, want.len());
    for (vol, lba) in set {
        let m = vol.maps[shard_of(lba, r.shards)].lock();
        if let Some((old, _)) = m.get_shared_resident(lba) {
            if old != 0 {
                ids.push(old);
            }
        }
    }
    r.space.blocks.prefetch(&mut ids.into_iter(), max);
}

/// What replay found.
pub(crate) struct Replayed {
    /// The sequence number after the last replayed record.
    pub seq_end: u64,
    /// Segments the chains went through (they stay allocated).
    pub chain_segs: Vec<u32>,
    /// Where each chain ended.
    pub ends: Vec<ShardPosition>,
    /// What it took (logged by the open).
    pub stats: ReplayStats,
}

/// Time and counts of a replay.
#[derive(Default)]
pub(crate) struct ReplayStats {
    /// Walking the chains and checking payloads.
    pub scan: std::time::Duration,
    /// Applying the records (with the leaves read ahead for them).
    pub apply: std::time::Duration,
    pub records: u64,
    pub entries: u64,
}

/// Data entries replay holds from its first walk of the chains, at most (about 16 MiB): past
/// it, the chains are walked again as their records are applied, so that an open's memory does
/// not follow the length of the log it replays.
pub(crate) const HOLD_ENTRIES: usize = 256 << 10;

/// Records a chain's second walk reads ahead of those being applied.
const WALK_AHEAD: usize = 16;

/// A chain's records in order, from RAM or from the thread that walks it again.
enum Feed<'a> {
    Here(Box<ChainRecords<'a>>),
    Walker(crossbeam_channel::Receiver<Result<Option<ReplayRecord>>>),
}

impl Feed<'_> {
    fn next_record(&mut self) -> Result<Option<ReplayRecord>> {
        match self {
            Feed::Here(c) => c.next_record(),
            // A walker that stopped without a last word panicked (the scope says how).
            Feed::Walker(rx) => rx.recv().unwrap_or(Err(Error::Internal {
                what: "a replay walker stopped",
            })),
        }
    }
}

/// Walk the chains that start at `chains` (the checkpoint's, under its `epoch` and `seq`) and
/// apply their records to `r`, in sequence order.
///
/// A first walk of every chain, side by side (each is bound by its reads and checksums),
/// decides where each ends and which torn records it drops, and holds the records while they
/// are few; a longer log is walked again by a thread per chain while its records are applied,
/// a window at a time (its leaves read ahead first).
pub(crate) fn replay(
    store: &dyn SegmentStore,
    geo: &Geometry,
    chains: &[ShardPosition],
    epoch: u64,
    seq: u64,
    sb: &Superblock,
    mut r: Rebuild<'_>,
) -> Result<Replayed> {
    let scanning = std::time::Instant::now();
    let src = LogSource {
        store,
        geo,
        pool_uuid: &sb.pool_uuid,
        key: sb.log_key.as_ref(),
        epoch,
    };
    let hold = r.hold_entries / chains.len().max(1);
    let mut surveys = std::thread::scope(|s| {
        let walks: Vec<_> = chains
            .iter()
            .enumerate()
            .map(|(i, pos)| s.spawn(move || survey_chain(src, i as u16, *pos, hold)))
            .collect();
        walks
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<Survey>>>()
    })?;
    let mut chain_segs = Vec::new();
    let mut ends = Vec::new();
    for (survey, pos) in surveys.iter().zip(chains) {
        chain_segs.extend_from_slice(&survey.segments);
        ends.push(survey.end);
        if pos.next != NO_SEGMENT {
            chain_segs.push(pos.next);
        }
    }
    let mut stats = ReplayStats {
        scan: scanning.elapsed(),
        ..Default::default()
    };
    let applying = std::time::Instant::now();
    let mut seq_end = seq.max(1);
    // Leaves a window reads ahead: half the metadata cache's (none without a budget: format
    // 2, whose leaves are never evicted).
    let max_leaves = r
        .meta
        .filter(|m| m.budget_bytes() != u64::MAX)
        .map_or(0, |m| {
            (m.budget_bytes() / 2 / crate::meta::cache::LEAF_BYTES).min(1 << 16) as usize
        });
    // No more entries at once than the first walk holds: a large cache reads ahead for
    // windows of that size, it does not make them larger.
    let window_entries = if max_leaves > 0 {
        (max_leaves * WINDOW_ENTRIES_PER_LEAF).min(HOLD_ENTRIES)
    } else {
        HOLD_ENTRIES
    };
    let mut sources = Vec::with_capacity(surveys.len());
    for (i, survey) in surveys.iter_mut().enumerate() {
        sources.push(ChainRecords::new(src, i as u16, survey)?);
    }
    std::thread::scope(|s| -> Result<()> {
        let mut feeds: Vec<Feed<'_>> = sources
            .into_iter()
            .map(|mut c| {
                if !c.walks() {
                    return Feed::Here(Box::new(c));
                }
                let (tx, rx) = crossbeam_channel::bounded(WALK_AHEAD);
                s.spawn(move || loop {
                    let next = c.next_record();
                    let last = !matches!(next, Ok(Some(_)));
                    // A closed channel: replay stopped on an error of its own.
                    if tx.send(next).is_err() || last {
                        break;
                    }
                });
                Feed::Walker(rx)
            })
            .collect();
        let mut heads = Vec::with_capacity(feeds.len());
        for f in &mut feeds {
            heads.push(f.next_record()?);
        }
        let mut window: Vec<ReplayRecord> = Vec::new();
        let mut entries = 0;
        loop {
            // The lowest sequence number next: each chain's are in order.
            let pick = heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.as_ref().map(|rec| (rec.seq, i)))
                .min();
            if let Some((seq_now, i)) = pick {
                let next = feeds[i].next_record()?;
                if next.as_ref().is_some_and(|n| n.seq <= seq_now) {
                    return Err(Error::Corrupt {
                        what: "a log chain's records are out of sequence order",
                    });
                }
                let rec = std::mem::replace(&mut heads[i], next).expect("picked");
                entries += rec.entries.len();
                window.push(rec);
                if entries < window_entries {
                    continue;
                }
            }
            if window.is_empty() {
                return Ok(());
            }
            if max_leaves > 0 {
                prefetch(&window, &mut r, max_leaves);
            }
            apply(&window, &mut r, &mut seq_end)?;
            stats.records += window.len() as u64;
            stats.entries += entries as u64;
            window.clear();
            entries = 0;
        }
    })?;
    // A block-table leaf that did not read back while a record was applied.
    if let Some(e) = r.space.take_failure() {
        return Err(e);
    }
    stats.apply = applying.elapsed();
    Ok(Replayed {
        seq_end,
        chain_segs,
        ends,
        stats,
    })
}

/// Apply `records` (in sequence order) to `r`.
fn apply(records: &[ReplayRecord], r: &mut Rebuild<'_>, seq_end: &mut u64) -> Result<()> {
    for rec in records {
        *seq_end = (*seq_end).max(rec.seq + 1);
        for e in &rec.entries {
            match e {
                Entry::Data(d) => {
                    let is_ref = d.flags & FLAG_REF != 0;
                    // A new block is placed even when its volume is gone: a dedup
                    // reference later in the record may point at it.
                    if d.block_id != 0 && !is_ref && !r.space.place(d.block_id, rec.block_entry(d))
                    {
                        // Its leaf did not read back: the open fails below.
                        continue;
                    }
                    let Some(vol) = r.volumes.get(&d.volume) else {
                        continue;
                    };
                    if d.lba >= vol.blocks() {
                        continue;
                    }
                    if is_ref && !r.space.is_placed(d.block_id) {
                        // The block it shares was in a record lost at the crash (never
                        // flushed, so neither was this one): the LBA keeps its old data.
                        continue;
                    }
                    if d.block_id != 0 {
                        r.space.add_ref(d.block_id);
                        if !is_ref && r.index && vol.dedup.load(Ordering::Relaxed) {
                            r.dedup.insert(
                                (r.dedup_key)(u128::from_le_bytes(d.fingerprint)),
                                d.block_id,
                            );
                        }
                    }
                    let space = &mut *r.space;
                    let old = vol.maps[shard_of(d.lba, r.shards)].lock().set(
                        d.lba,
                        d.block_id,
                        &mut |id| space.add_ref(id),
                    )?;
                    if old != 0 {
                        r.space.drop_ref(old, rec.seq);
                    }
                }
                Entry::Move(d) => {
                    r.space.relocate(
                        d.block_id,
                        (d.lba >> 32) as u32,
                        d.lba as u32,
                        &rec.block_entry(d),
                    );
                }
                Entry::Trim(t) => {
                    let Some(vol) = r.volumes.get(&t.volume) else {
                        continue;
                    };
                    // Only the pages the writing shard owned at the time.
                    for s in 0..r.shards {
                        let mut map = vol.maps[s].lock();
                        let mut freed = Vec::new();
                        let writer = rec.shard as usize;
                        let space = &mut *r.space;
                        trim_owned(
                            &mut map,
                            t.lba,
                            t.count,
                            writer,
                            r.old_shards.max(1),
                            &mut |id| space.add_ref(id),
                            |id| freed.push(id),
                        )?;
                        drop(map);
                        for id in freed {
                            r.space.drop_ref(id, rec.seq);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
