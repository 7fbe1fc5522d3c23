//! Replay: the records of every chain after the checkpoint, applied in sequence order to the
//! maps, the block table and the dedup index the checkpoint loaded.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::Result;
use crate::format::{Superblock, FLAG_REF, NO_SEGMENT};
use crate::log::ShardPosition;
use crate::map::{shard_of, trim_owned, VolumeState};
use crate::recovery::{scan_chain, Entry};
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
}

/// What replay found.
pub(crate) struct Replayed {
    /// The sequence number after the last replayed record.
    pub seq_end: u64,
    /// Segments the chains went through (they stay allocated).
    pub chain_segs: Vec<u32>,
    /// Where each chain ended.
    pub ends: Vec<ShardPosition>,
}

/// Scan the chains that start at `chains` (the checkpoint's, under its `epoch` and `seq`) and
/// apply their records to `r`, in sequence order.
pub(crate) fn replay(
    store: &dyn SegmentStore,
    geo: &Geometry,
    chains: &[ShardPosition],
    epoch: u64,
    seq: u64,
    sb: &Superblock,
    r: Rebuild<'_>,
) -> Result<Replayed> {
    let mut records = Vec::new();
    let mut chain_segs = Vec::new();
    let mut ends = Vec::new();
    for (i, pos) in chains.iter().enumerate() {
        let scan = scan_chain(
            store,
            geo,
            &sb.pool_uuid,
            sb.log_key.as_ref(),
            epoch,
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
    let mut seq_end = seq.max(1);
    for rec in &records {
        seq_end = seq_end.max(rec.seq + 1);
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
    // A block-table leaf that did not read back while a record was applied.
    if let Some(e) = r.space.take_failure() {
        return Err(e);
    }
    Ok(Replayed {
        seq_end,
        chain_segs,
        ends,
    })
}
