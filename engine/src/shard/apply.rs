//! Applying completed records to the maps and the block table, in sequence order.

use super::Shard;
use crate::format::MAP_PAGE_ENTRIES;
use crate::map::{shard_of, trim_owned};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::api::BLOCK_BYTES;
use crate::error::Error;

use crate::map::LbaMap;
use crate::map::VolumeState;
use crate::space::{BlockEntry, Space};

pub(crate) enum Apply {
    Block {
        vol: Arc<VolumeState>,
        lba: u64,
        id: u64,
        entry: BlockEntry,
        /// The plaintext, for the cache.
        plain: Bytes,
        /// From a long write: cached only into free room (see `WRITE_AROUND_BYTES`).
        large: bool,
        /// Dedup index key to record once the block is applied (dedup volumes only).
        key: Option<u64>,
    },
    /// The LBA now maps to an existing block (a dedup hit).
    Ref {
        vol: Arc<VolumeState>,
        lba: u64,
        id: u64,
        /// The reference was taken when the hit was verified (a block already stored);
        /// otherwise the block is placed earlier in the same record and the reference is taken
        /// when applied.
        pinned: bool,
    },
    Hole {
        vol: Arc<VolumeState>,
        lba: u64,
    },
    Trim {
        vol: Arc<VolumeState>,
        lba: u64,
        count: u64,
    },
    Move {
        id: u64,
        from_segment: u32,
        from_offset: u32,
        entry: BlockEntry,
    },
    /// Writes to `vol` absorbed by later writes to the same blocks in the record (see
    /// [`Shard::absorb`]): counted as client bytes when the record applies, as the writes
    /// themselves would have been (not once the volume is deleted).
    Absorbed {
        vol: Arc<VolumeState>,
        blocks: u64,
    },
}

impl Shard {
    /// Apply completed records at the head of the queue, in order, and acknowledge them.
    pub(crate) fn apply_completed(&mut self) {
        while self.inflight.front().is_some_and(|r| r.result.is_some()) {
            // A record written wholly waits here for the evicted leaves its apply uses,
            // read through the queue (`fetch`), while the shard goes on.
            if self
                .inflight
                .front()
                .is_some_and(|r| matches!(r.result, Some(Ok(()))))
                && !self.head_ready()
            {
                break;
            }
            let Some(mut rec) = self.inflight.pop_front() else {
                break;
            };
            let mut ok = matches!(rec.result, Some(Ok(())));
            if let (false, Some((dev, at)), Some(buf)) = (ok, rec.header_at, &rec.buf) {
                // Every record after a failed segment header is unreachable by replay (some may
                // already be on the device): write the header again, synchronously, before any
                // of them is acknowledged.
                ok = self.ctx.devices.write_at(dev, buf, at).is_ok();
                if !ok
                    && rec
                        .header_at
                        .is_some_and(|(d, a)| (d, a) == self.chain.open_header_at())
                {
                    self.chain.header_ok = false;
                }
            }
            if !ok {
                if let Some(v) = rec.void {
                    // Replay steps over the failed record once its header says `Void`; until
                    // then the records after it are unreachable (a flush checkpoints).
                    if !self.chain.write_void(&v) {
                        self.chain.voids.push(v);
                    }
                }
            } else if !self.chain.voids.is_empty() && rec.shard_seq.is_some() {
                self.chain.retry_voids();
            }
            if !ok {
                // Before `applied_shard_seq` moves past the failed record: a flusher that sees
                // the new value must also see the broken chain, or it would only sync and let
                // later records claim the missing one durable.
                self.ctx.chain_broken.store(true, Ordering::Release);
            }
            if let Some(ss) = rec.shard_seq {
                self.ctx.shard_stats[self.id]
                    .applied_shard_seq
                    .store(ss + 1, Ordering::Release);
            }
            if ok {
                self.apply(rec.seq, rec.applies);
            } else {
                let mut space = self.ctx.space.lock();
                for a in &rec.applies {
                    match a {
                        Apply::Block { id, .. } => space.discard_id(*id, rec.seq),
                        Apply::Ref {
                            id, pinned: true, ..
                        } => {
                            space.unpin(*id, rec.seq);
                        }
                        _ => {}
                    }
                }
                self.ctx.fault_on_table_failure(&mut space);
                drop(space);
                // Where the write went, for the error each of its requests gets.
                let (device, offset) = rec
                    .void
                    .map(|v| (v.dev, v.at))
                    .or(rec.header_at)
                    .unwrap_or_default();
                let source = match rec.result.take() {
                    Some(Err(e)) => e,
                    // The write succeeded but its segment header could not be rewritten.
                    _ => std::io::Error::other("the segment header before it could not be written"),
                };
                let no_room = source.raw_os_error() == Some(libc::ENOSPC);
                if no_room {
                    self.ctx.note_host_full();
                }
                let e = Error::Io {
                    device,
                    offset,
                    source,
                };
                for p in &rec.parts {
                    // The host file system had no room: the write fails as a full pool's do.
                    p.fail(if no_room { Error::NoSpace } else { e.clone() });
                }
                if rec.shard_seq.is_none() {
                    // A segment header failed: the chain is broken until the next checkpoint.
                    self.ctx.wake.kick_checkpoint();
                }
            }
            for p in &rec.parts {
                p.record_done();
            }
        }
    }

    pub(crate) fn apply(&mut self, seq: u64, applies: Vec<Apply>) {
        let shards = self.ctx.shards();
        let me = self.id;
        let mut written = 0u64;
        let mut moved = 0u64;
        let mut keys: Vec<(u64, u64)> = Vec::new();
        // Cached after the locks are dropped: the space lock is the pool's, the cache only ours.
        let mut cached = Vec::with_capacity(applies.len());
        // Blocks this record left unreferenced: out of the cache, their slots serve the copies.
        let mut dead: Vec<u64> = Vec::new();
        // Leaves whose entries were evicted are read back now, not under the pool's space lock
        // below (a later eviction in between reads again there; `meta::cache`), unless the
        // record waited for them through the queue and found them all in (`fetch`).
        if !self.take_head_clean() && self.ctx.meta.evicted_any() {
            // With them, the block-table leaves of the blocks placed, shared and replaced
            // (the replaced ones looked up without a read, and not counted as uses).
            let mut ids = Vec::new();
            for a in &applies {
                let (vol, lba, id) = match a {
                    Apply::Block { vol, lba, id, .. } | Apply::Ref { vol, lba, id, .. } => {
                        (vol, *lba, *id)
                    }
                    Apply::Hole { vol, lba } => (vol, *lba, 0),
                    Apply::Trim { vol, lba, count } => {
                        // The leaves of this shard's with entries to clear (a large trim reads
                        // them all back; design milestone 20 moves this off the shard).
                        let m = vol.maps[me].lock();
                        let (first, end) = (
                            lba / MAP_PAGE_ENTRIES,
                            (lba + count).div_ceil(MAP_PAGE_ENTRIES),
                        );
                        for p in (first..end.min(m.pages.len() as u64))
                            .filter(|&p| shard_of(p * MAP_PAGE_ENTRIES, shards) == me)
                        {
                            let _ = m.fetch(p * MAP_PAGE_ENTRIES);
                        }
                        continue;
                    }
                    _ => continue,
                };
                if id != 0 {
                    ids.push(id);
                }
                if lba < vol.blocks() {
                    let m = vol.maps[me].lock();
                    let _ = m.fetch(lba);
                    if let Some((old, _)) = m.get_shared_resident(lba).filter(|&(old, _)| old != 0)
                    {
                        ids.push(old);
                    }
                }
            }
            Space::fetch_leaves(&self.ctx.space, &mut ids.into_iter(), usize::MAX);
        }
        // A map that cannot be changed (an evicted leaf that does not read back) after its
        // record is in the log: the pool stops, and the next open replays the record.
        let mut failed: Option<crate::error::Error> = None;
        // Blocks of this batch whose table leaf did not read back: no entry may point at them.
        let mut unplaced: Vec<u64> = Vec::new();
        let mut space = self.ctx.space.lock();
        // Copies of the blocks placed below may be cached only while no id was released since.
        let seen = self.ctx.reuse.now();
        // Records nearly always hold one volume: keep its map locked across entries.
        let mut map: Option<(&Arc<VolumeState>, parking_lot::MutexGuard<'_, LbaMap>)> = None;
        macro_rules! map_of {
            ($vol:expr) => {{
                if !map.as_ref().is_some_and(|(v, _)| Arc::ptr_eq(v, $vol)) {
                    drop(map.take());
                    map = Some(($vol, $vol.maps[me].lock()));
                }
                &mut map.as_mut().expect("just set").1
            }};
        }
        for a in &applies {
            match a {
                Apply::Block {
                    vol,
                    lba,
                    id,
                    entry,
                    plain,
                    large,
                    key,
                } => {
                    if !space.place(*id, *entry) {
                        // Its block-table leaf did not read back: nothing may point at the id
                        // (its entry may name another block); the pool stops below.
                        unplaced.push(*id);
                        continue;
                    }
                    if vol.deleted.load(Ordering::Acquire) || *lba >= vol.blocks() {
                        space.discard_id(*id, seq);
                        continue;
                    }
                    space.add_ref(*id);
                    let old = map_of!(vol).set(*lba, *id, &mut |b| space.add_ref(b));
                    let old = match old {
                        Ok(old) => old,
                        Err(e) => {
                            failed.get_or_insert(e);
                            continue;
                        }
                    };
                    if old != 0 && space.drop_ref(old, seq) {
                        dead.push(old);
                    }
                    cached.push((*id, plain.clone(), *large));
                    if let Some(k) = key {
                        keys.push((*k, *id));
                    }
                    written += BLOCK_BYTES;
                }
                Apply::Ref {
                    vol,
                    lba,
                    id,
                    pinned,
                } => {
                    // A duplicate of a block of this record that could not be placed.
                    if unplaced.contains(id) {
                        continue;
                    }
                    if vol.deleted.load(Ordering::Acquire) || *lba >= vol.blocks() {
                        if *pinned {
                            space.unpin(*id, seq);
                        }
                        continue;
                    }
                    if *pinned {
                        space.pin_taken(*id);
                    } else {
                        space.add_ref(*id);
                    }
                    let old = map_of!(vol).set(*lba, *id, &mut |b| space.add_ref(b));
                    let old = match old {
                        Ok(old) => old,
                        Err(e) => {
                            failed.get_or_insert(e);
                            continue;
                        }
                    };
                    if old != 0 && space.drop_ref(old, seq) {
                        dead.push(old);
                    }
                    written += BLOCK_BYTES;
                }
                Apply::Hole { vol, lba } => {
                    let old = map_of!(vol).set(*lba, 0, &mut |b| space.add_ref(b));
                    let old = match old {
                        Ok(old) => old,
                        Err(e) => {
                            failed.get_or_insert(e);
                            continue;
                        }
                    };
                    if old != 0 && space.drop_ref(old, seq) {
                        dead.push(old);
                    }
                    written += BLOCK_BYTES;
                }
                Apply::Trim { vol, lba, count } => {
                    // Trimmed blocks stay cached until evicted: a trim can free millions.
                    // Both callbacks change the space, one at a time.
                    let sp = std::cell::RefCell::new(&mut *space);
                    let trimmed = trim_owned(
                        map_of!(vol),
                        *lba,
                        *count,
                        me,
                        shards,
                        &mut |b| sp.borrow_mut().add_ref(b),
                        |old| {
                            sp.borrow_mut().drop_ref(old, seq);
                        },
                    );
                    if let Err(e) = trimmed {
                        failed.get_or_insert(e);
                    }
                }
                Apply::Absorbed { vol, blocks } => {
                    if !vol.deleted.load(Ordering::Acquire) {
                        written += blocks * BLOCK_BYTES;
                    }
                }
                Apply::Move {
                    id,
                    from_segment,
                    from_offset,
                    entry,
                } => {
                    if space.relocate(*id, *from_segment, *from_offset, entry) {
                        moved += entry.share();
                    }
                }
            }
        }
        drop(map);
        // A block-table leaf that did not read back: the change it needed was not made.
        if let Some(e) = space.take_failure() {
            failed.get_or_insert(e);
        }
        drop(space);
        if let Some(e) = failed {
            self.ctx.health.set_fault(format!("map change failed: {e}"));
        }
        if !cached.is_empty() || !dead.is_empty() {
            let mut cache = self.cache();
            for id in dead {
                cache.forget(id);
            }
            for (id, plain, large) in cached {
                if large && !cache.has_room() {
                    continue;
                }
                // A copy, not the client's buffer: kept, that buffer would pin its whole request
                // in memory and make every write take fresh pages (measured: 4k writes at 72k
                // IOPS while the cache filled, against 134k with the copy).
                cache.insert_copy(id, seen, &plain);
            }
        }
        if !keys.is_empty() {
            let mut index = self.ctx.dedup.lock();
            for (k, id) in keys {
                index.insert(k, id);
            }
        }
        let before = self
            .ctx
            .counters
            .client_written
            .fetch_add(written, Ordering::Relaxed);
        let due = self.ctx.checkpoint_due.load(Ordering::Relaxed);
        if before < due && before + written >= due {
            self.ctx.wake.nudge_checkpointer();
        }
        // Leaves changed since the last checkpoint fill the metadata cache: only a checkpoint
        // lets them go.
        if self.ctx.meta.wants_checkpoint() {
            self.ctx.wake.kick_checkpoint();
        }
        self.ctx
            .counters
            .gc_moved
            .fetch_add(moved, Ordering::Relaxed);
    }
}
