//! The write path up to the record: splitting writes into blocks, zeroes and trims, and the
//! dedup pass that turns blocks into references.

use super::{decode_piece, is_zero, EarlyRange, Part, Shard, BLOCK};
use crate::shard::Item;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::fetch::PageFor;
use crate::api::{DedupDomain, BLOCK_BYTES};
use crate::error::Error;
use crate::format::{DataEntry, FLAG_LZ4, FLAG_REF, IO_ALIGN};
use crate::io::{AlignedBuf, IoOp, OpKind};
use crate::job::Job;
use crate::map::shard_of;
use crate::map::VolumeState;
use crate::reduce;
use crate::space::BlockEntry;

/// Blocks one trim record covers at most (1 GiB): the unit in which a huge discard is applied.
pub(crate) const TRIM_CHUNK_BLOCKS: u64 = 1 << 18;

/// A stored payload read to verify dedup candidates against the blocks being written.
pub(crate) struct VerifyRead {
    pub(crate) segment: u32,
    pub(crate) offset: u32,
    pub(crate) base: u32,
    pub(crate) stored_len: u32,
    pub(crate) crc: u32,
    pub(crate) flags: u16,
    /// (item index, candidate id, its index in the group)
    pub(crate) cands: Vec<(usize, u64, usize)>,
}

/// Writes longer than this are cached only into free room (write-around): bulk writes (loads,
/// copies, restores) are seldom read back soon, and copying each of their blocks into the
/// cache cost a third of the server's CPU per MiB of 1M writes over NBD (docs/benchmarks.md).
pub(crate) const WRITE_AROUND_BYTES: u64 = 256 << 10;

/// Compressed payloads a dedup pass reads to check candidates that follow a stream of
/// duplicates into them (see `Shard::stream_proposals`); a whole stored block is checked by
/// its CRC first and costs no read unless it matches.
const STREAM_GROUP_READS: usize = 64;

/// Evicted block-table leaves a dedup pass reads back at most (fewer when the shard's share
/// of the metadata cache is smaller: see `Shard::dedup_leaf_reads`).
const DEDUP_LEAF_READS: usize = 64;

impl Shard {
    // ---------------------------------------------------------------- writes

    pub(crate) fn write(&mut self, vol: Arc<VolumeState>, offset: u64, data: Bytes, job: Arc<Job>) {
        let early = job.is_write_back() && !data.is_empty();
        let part = Part::new(job, &self.env);
        part.large_write.set(data.len() as u64 > WRITE_AROUND_BYTES);
        part.records.set(1);
        if early {
            // Counted when received (see `run`); uncounted when the part finishes.
            *part.early.borrow_mut() = Some(EarlyRange {
                serial: self.unapplied.borrow_mut().open_part(),
                set: self.unapplied.clone(),
                vol: vol.id,
                first: offset / BLOCK_BYTES,
                last: (offset + data.len() as u64 - 1) / BLOCK_BYTES,
            });
        }
        let end = offset + data.len() as u64;
        if !self.reserve_capacity(&vol, offset, end, early, &part) {
            part.fail(Error::NoSpace);
            self.held.push(part);
            return;
        }
        let mut pos = offset;
        while pos < end {
            let lba = pos / BLOCK_BYTES;
            let bstart = lba * BLOCK_BYTES;
            let bend = bstart + BLOCK_BYTES;
            let at = (pos - offset) as usize;
            if pos == bstart && end >= bend {
                let src = data.slice(at..at + BLOCK);
                self.push_block(&vol, lba, src, &part);
                pos = bend;
                continue;
            }
            // Partial block: merge with the current contents, after everything in flight has
            // landed so that no earlier write to this block is missed.
            let upto = end.min(bend);
            match self.settle_and_read(&vol, lba) {
                Ok(mut block) => {
                    let from = (pos - bstart) as usize;
                    let n = (upto - pos) as usize;
                    block[from..from + n].copy_from_slice(&data[at..at + n]);
                    self.push_block(&vol, lba, Bytes::from(block), &part);
                }
                Err(e) => part.fail(e),
            }
            pos = upto;
        }
        self.held.push(part);
    }

    /// Take room for this write in the pool's usable capacity, held by `part` until it is
    /// applied or fails; false when it would take the pool past it. Stored bytes and the bytes
    /// of writes taken but not applied count. When the whole range does not fit, only blocks
    /// not mapped yet count (an overwrite frees what it replaces), so a full pool still takes
    /// overwrites, and trims make room again.
    pub(crate) fn reserve_capacity(
        &self,
        vol: &VolumeState,
        offset: u64,
        end: u64,
        early: bool,
        part: &Part,
    ) -> bool {
        self.return_released();
        let space = self.ctx.space.lock();
        let taken = space.stored_bytes + self.ctx.accepted_bytes.load(Ordering::Acquire);
        // The last `write_back_limit` bytes are kept for writes acknowledged early (at most that
        // many are outstanding), so that a backlog of other writes can never leave one without
        // room: those fail for want of space first, as the client can still be told.
        let usable = if early {
            self.ctx.usable_bytes
        } else {
            self.ctx
                .usable_bytes
                .saturating_sub(self.ctx.write_back.limit())
        };
        let blocks = offset / BLOCK_BYTES..end.div_ceil(BLOCK_BYTES);
        let whole = (blocks.end - blocks.start) * BLOCK_BYTES;
        let bytes = if taken + whole <= usable {
            whole
        } else {
            // New data: unmapped blocks, and blocks shared with a snapshot, clone or dedup peer
            // (overwriting those frees nothing).
            let n = self.ctx.shards();
            let new = blocks
                .filter(|&lba| {
                    if shard_of(lba, n) != self.id {
                        return false;
                    }
                    // Under the space lock: no read; a block of an evicted leaf counts as new.
                    let Some((id, shared_leaf)) = vol.maps[self.id].lock().get_shared_resident(lba)
                    else {
                        return true;
                    };
                    id == 0 || shared_leaf || space.refs.get(id) > 1
                })
                .count() as u64;
            if new > 0 && taken + new * BLOCK_BYTES > usable {
                return false;
            }
            new * BLOCK_BYTES
        };
        if bytes > 0 {
            // Under the space lock: two workers cannot both take the last bytes.
            self.ctx.accepted_bytes.fetch_add(bytes, Ordering::AcqRel);
            part.reserved.set(bytes);
        }
        true
    }

    pub(crate) fn zero(&mut self, vol: Arc<VolumeState>, offset: u64, len: u64, job: Arc<Job>) {
        let part = Part::new(job, &self.env);
        part.records.set(1);
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_BYTES);
        let end_full = end / BLOCK_BYTES;
        // Partial blocks at either end are rewritten with zeroes in place.
        let mut partial = Vec::new();
        if offset % BLOCK_BYTES != 0 {
            partial.push((offset, end.min((offset / BLOCK_BYTES + 1) * BLOCK_BYTES)));
        }
        // The tail block, unless the head partial above is that same block.
        if end % BLOCK_BYTES != 0 && (offset % BLOCK_BYTES == 0 || end_full != offset / BLOCK_BYTES)
        {
            partial.push((end / BLOCK_BYTES * BLOCK_BYTES, end));
        }
        for (from, to) in partial {
            let lba = from / BLOCK_BYTES;
            if shard_of(lba, self.ctx.shards()) != self.id {
                continue;
            }
            match self.settle_and_read(&vol, lba) {
                Ok(mut block) => {
                    let a = (from - lba * BLOCK_BYTES) as usize;
                    let b = (to - lba * BLOCK_BYTES) as usize;
                    block[a..b].fill(0);
                    self.push_block(&vol, lba, Bytes::from(block), &part);
                }
                Err(e) => part.fail(e),
            }
        }
        // A huge discard becomes one record per chunk: each applies under the space lock on
        // its own, so other shards' I/O interleaves instead of waiting for the whole range.
        let mut lba = first_full;
        while lba < end_full {
            let count = (end_full - lba).min(TRIM_CHUNK_BLOCKS);
            self.items.push(Item::Trim {
                vol: vol.clone(),
                lba,
                count,
                part: part.clone(),
            });
            lba += count;
        }
        self.held.push(part);
    }

    pub(crate) fn push_block(
        &mut self,
        vol: &Arc<VolumeState>,
        lba: u64,
        src: Bytes,
        part: &Rc<Part>,
    ) {
        let item = if is_zero(&src) {
            Item::Hole {
                vol: vol.clone(),
                lba,
                part: part.clone(),
            }
        } else {
            Item::Data {
                vol: vol.clone(),
                lba,
                // Keyed by the pool's secret and the volume's dedup domain (`reduce`).
                fp: vol.fingerprint(self.id, &src),
                src,
                part: part.clone(),
            }
        };
        self.items.push(item);
    }

    /// Replace new blocks that duplicate stored ones with references to them. Candidates come
    /// from the dedup index and are compared byte for byte (from the cache, or read from the
    /// device in one batch); each hit holds a reference from here until its record applies.
    pub(crate) fn dedup_pass(&mut self, items: &mut Vec<Item>) {
        let mut cands: Vec<(usize, u64)> = Vec::new();
        {
            let index = self.ctx.dedup.lock();
            if index.is_empty() {
                return;
            }
            for (i, it) in items.iter().enumerate() {
                if let Item::Data { vol, fp, .. } = it {
                    if vol.dedup.load(Ordering::Relaxed) {
                        if let Some(id) = index.get(self.ctx.dedup_key(*fp)) {
                            cands.push((i, id));
                        }
                    }
                }
            }
        }
        let proposed = self.stream_proposals(items, &cands);
        if cands.is_empty() && proposed.is_empty() {
            return;
        }
        // The block-table leaves of the candidates (every leaf is evicted after an open) are
        // read through this shard's queue, side by side, before anything looks the candidates
        // up; the shard goes on reaping meanwhile. Past `dedup_leaf_reads`, and when a leaf
        // went again in between, the block is stored anew.
        if self.ctx.meta.evicted_any() {
            let ask = self.ctx.space.lock().blocks.evicted_of(
                &mut cands.iter().chain(&proposed).map(|c| c.1),
                self.dedup_leaf_reads(),
            );
            if let Some(ask) = ask {
                let tags: Vec<u64> = ask
                    .leaves
                    .into_iter()
                    .map(|(leaf, at, entries)| {
                        self.fetch_page(at, PageFor::Table { leaf, entries })
                    })
                    .collect();
                self.wait_for_pages(&tags);
            }
        }
        let streamed = self.stream_keep(items, &mut cands, proposed);
        if cands.is_empty() {
            return;
        }
        // Pin every live candidate so it cannot be freed (and its id reused) meanwhile.
        let seen;
        let pinned: Vec<(usize, u64, BlockEntry)> = {
            let mut space = self.ctx.space.lock();
            seen = self.ctx.reuse.now();
            cands
                .into_iter()
                .filter_map(|(i, id)| {
                    let e = space.get_resident(id)?;
                    space.pin(id);
                    Some((i, id, e))
                })
                .collect()
        };
        let mut hit: Vec<Option<u64>> = vec![None; items.len()];
        let mut misses: Vec<u64> = Vec::new();
        let mut reads: HashMap<(u32, u32), VerifyRead> = HashMap::new();
        for (i, id, e) in pinned {
            let Item::Data { src, .. } = &items[i] else {
                continue;
            };
            if let Some(c) = self.cache().get(id) {
                if c[..] == src[..] {
                    hit[i] = Some(id);
                } else {
                    misses.push(id);
                }
                continue;
            }
            let base = e.offset & !(IO_ALIGN as u32 - 1);
            reads
                .entry((e.segment, e.offset))
                .or_insert_with(|| VerifyRead {
                    segment: e.segment,
                    offset: e.offset,
                    base,
                    stored_len: u32::from(e.stored_len),
                    crc: e.crc,
                    flags: e.flags,
                    cands: Vec::new(),
                })
                .cands
                .push((i, id, reduce::group_of(e.flags).0));
        }
        for (_, v) in reads {
            let (dev, seg_base) = self.ctx.geo.locate(v.segment);
            let len =
                ((v.offset + v.stored_len).next_multiple_of(IO_ALIGN as u32) - v.base) as usize;
            let tag = self.tag();
            self.queue.push(IoOp {
                kind: OpKind::Read,
                dev,
                offset: seg_base + u64::from(v.base),
                len,
                // SAFETY: a read fills the whole buffer before anything looks at it.
                buf: unsafe { AlignedBuf::new_uninit(len) },
                tag,
            });
            self.verifying.insert(tag, v);
        }
        while !self.verifying.is_empty() {
            if self.queue.in_flight() == 0 {
                break;
            }
            if let Err(e) = self.queue.submit(1) {
                self.fail_all_inflight(e);
                break;
            }
            self.reap();
        }
        // Reads whose completion vanished count as misses.
        for (_, v) in std::mem::take(&mut self.verifying) {
            misses.extend(v.cands.iter().map(|c| c.1));
        }
        for (v, d) in std::mem::take(&mut self.verified) {
            let plain = match d.result {
                Ok(()) => {
                    let all = Bytes::from_owner(d.buf);
                    let at = (v.offset - v.base) as usize;
                    decode_piece(&all, at, v.segment, v.offset, v.stored_len, v.crc, v.flags).ok()
                }
                Err(_) => None,
            };
            for &(i, id, index) in &v.cands {
                let block = plain
                    .as_ref()
                    .map(|p| p.slice(index * BLOCK..(index + 1) * BLOCK));
                match (&items[i], block) {
                    (Item::Data { src, .. }, Some(b)) if b[..] == src[..] => {
                        hit[i] = Some(id);
                        self.cache().insert(id, seen, b);
                    }
                    _ => misses.push(id),
                }
            }
        }
        if !misses.is_empty() {
            let seq = self.ctx.seq.load(Ordering::Acquire);
            let mut space = self.ctx.space.lock();
            for id in misses {
                space.unpin(id, seq);
            }
            self.ctx.fault_on_table_failure(&mut space);
        }
        self.dedup_stream = stream_end(items, &hit);
        self.ctx.counters.dedup_stream_hits.fetch_add(
            streamed.iter().filter(|&&i| hit[i].is_some()).count() as u64,
            Ordering::Relaxed,
        );
        if hit.iter().all(Option::is_none) {
            return;
        }
        let old = std::mem::take(items);
        items.extend(old.into_iter().zip(hit).map(|(it, h)| match (it, h) {
            (
                Item::Data {
                    vol, lba, fp, part, ..
                },
                Some(id),
            ) => Item::Ref {
                vol,
                lba,
                id,
                fp,
                part,
            },
            (it, _) => it,
        }));
    }

    /// Candidates for the blocks of `items` the dedup index has none for, from the stream
    /// they continue: a block written right after one (same volume, next LBA) that duplicates
    /// stored block `id` is tried against block `id + 1`, the next block stored by the write
    /// that stored `id` (ids are taken in order within a record). Past its memory budget the
    /// index keeps 1 in 2^n fingerprints; a copy of stored data then finds its blocks through
    /// the few it keeps. A candidate stored whole is kept only if its checksum is the new
    /// block's, so a stream that stops duplicating costs a CRC per block, no read; one in a
    /// compressed group only if it shares its payload with the previous block's candidate, or
    /// starts a payload (a few per pass: each costs a read). Every candidate kept is then
    /// compared byte for byte as the index's are.
    ///
    /// This part proposes, as (item, id), without the space lock; [`Shard::stream_keep`]
    /// keeps, once the proposals' block-table leaves are in.
    fn stream_proposals(&mut self, items: &[Item], cands: &[(usize, u64)]) -> Vec<(usize, u64)> {
        if cands.is_empty() && self.dedup_stream.is_none() {
            return Vec::new();
        }
        let mut from_index: Vec<Option<u64>> = vec![None; items.len()];
        for &(i, id) in cands {
            from_index[i] = Some(id);
        }
        // (item, proposed id), chained from the index's candidates and the previous batch.
        let mut proposed: Vec<(usize, u64)> = Vec::new();
        let mut prev = self.dedup_stream.take();
        for (i, it) in items.iter().enumerate() {
            let Item::Data { vol, lba, .. } = it else {
                prev = None;
                continue;
            };
            if !vol.dedup.load(Ordering::Relaxed) {
                prev = None;
                continue;
            }
            let follows = prev
                .filter(|&(v, l, _)| v == vol.id && l + 1 == *lba)
                .map(|(_, _, id)| id + 1);
            let cand = match (from_index[i], follows) {
                (Some(id), _) => Some(id),
                (None, Some(id)) => {
                    proposed.push((i, id));
                    Some(id)
                }
                (None, None) => None,
            };
            prev = cand.map(|id| (vol.id, *lba, id));
        }
        if proposed.is_empty() {
            return Vec::new();
        }
        // Only while every volume is in the shared domain: the block after `id` may be any
        // volume's, and nothing in the block table says whose, so across domains a hit would
        // tell a writer what another domain stores (`reduce`: domains never see each other's
        // blocks). In a pool of shared volumes it tells nothing the index does not.
        let one_domain = self
            .ctx
            .volumes
            .read()
            .by_name
            .values()
            .all(|v| v.dedup_domain() == DedupDomain::Shared);
        if !one_domain {
            return Vec::new();
        }
        proposed
    }

    /// The proposals of [`Shard::stream_proposals`] worth a byte-for-byte check, added to
    /// `cands`; returns the items given one.
    fn stream_keep(
        &self,
        items: &[Item],
        cands: &mut Vec<(usize, u64)>,
        proposed: Vec<(usize, u64)>,
    ) -> Vec<usize> {
        if proposed.is_empty() {
            return Vec::new();
        }
        let mut from_index: Vec<Option<u64>> = vec![None; items.len()];
        for &(i, id) in cands.iter() {
            from_index[i] = Some(id);
        }
        // The checksum a whole stored block of these bytes has, outside the space lock.
        let crcs: Vec<u32> = proposed
            .iter()
            .map(|&(i, _)| match &items[i] {
                Item::Data { src, .. } => crc32fast::hash(src),
                _ => 0,
            })
            .collect();
        let space = self.ctx.space.lock();
        let mut taken = Vec::new();
        // The previous item and the payload of its candidate: a proposal in the same payload
        // (the next block of a compressed group) is checked by the read that payload gets
        // anyway; one that starts another compressed payload costs a read of its own, and a
        // pass spends at most `STREAM_GROUP_READS` of those.
        let mut prev: Option<(usize, (u32, u32))> = None;
        let mut new_payloads = STREAM_GROUP_READS;
        let mut next = proposed.iter().zip(crcs).peekable();
        for (i, index_cand) in from_index.iter().enumerate() {
            let (id, crc) = match (index_cand, next.peek()) {
                (&Some(id), _) => (id, None),
                (None, Some(&(&(j, id), crc))) if j == i => {
                    next.next();
                    (id, Some(crc))
                }
                _ => {
                    prev = None;
                    continue;
                }
            };
            let Some(e) = space.get_resident(id) else {
                prev = None;
                continue;
            };
            let payload = (e.segment, e.offset);
            if let Some(crc) = crc {
                let (at, count) = reduce::group_of(e.flags);
                let whole =
                    count == 1 && e.flags & FLAG_LZ4 == 0 && usize::from(e.stored_len) == BLOCK;
                let kept = if whole {
                    e.crc == crc
                } else if prev.is_some_and(|(j, p)| j + 1 == i && p == payload) {
                    true
                } else if at == 0 && new_payloads > 0 {
                    new_payloads -= 1;
                    true
                } else {
                    false
                };
                if !kept {
                    prev = None;
                    continue;
                }
                cands.push((i, id));
                taken.push(i);
            }
            prev = Some((i, payload));
        }
        taken
    }

    /// Block-table leaves a dedup pass may read: no more than half this shard's share of the
    /// metadata cache, so they do not push each other out before the look-ups use them.
    fn dedup_leaf_reads(&self) -> usize {
        DEDUP_LEAF_READS.min(self.cache_share() / 2).max(1)
    }

    /// Give back the references dedup hits hold (their records will not be written).
    pub(crate) fn unpin<'a>(&self, items: impl Iterator<Item = &'a Item>) {
        let ids: Vec<u64> = items
            .filter_map(|i| match i {
                Item::Ref { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return;
        }
        let seq = self.ctx.seq.load(Ordering::Acquire);
        let mut space = self.ctx.space.lock();
        for id in ids {
            space.unpin(id, seq);
        }
        self.ctx.fault_on_table_failure(&mut space);
    }
}

/// Where the stream of duplicates `items` ended, for the next batch (see
/// `Shard::stream_proposals`): the last item, if it was found to duplicate a stored block.
fn stream_end(items: &[Item], hit: &[Option<u64>]) -> Option<(u32, u64, u64)> {
    match (items.last(), hit.last().copied().flatten()) {
        (Some(Item::Data { vol, lba, .. }), Some(id)) => Some((vol.id, *lba, id)),
        _ => None,
    }
}

/// The log entry of a dedup reference: `lba` now maps to the stored block `id`.
pub(crate) fn ref_entry(vol: &VolumeState, lba: u64, id: u64, fp: u128) -> DataEntry {
    DataEntry {
        volume: vol.id,
        flags: FLAG_REF,
        lba,
        block_id: id,
        fingerprint: fp.to_le_bytes(),
        payload_offset: 0,
        stored_len: 0,
        payload_crc: 0,
    }
}
