//! What goes into records: the items a worker batches, cutting them into records, planning
//! payloads (compression, grouping, duplicates within a batch), encoding the entries, and
//! submitting the write; the layout and the seal are the log's (`log::record`).

use crate::log::{Layout, Room};
use crate::shard::{item_part, ref_entry, Apply, Inflight, Part, Shard, BLOCK, TRIM_CHUNK_BLOCKS};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::format::{
    DataEntry, RecordHeader, RecordKind, TrimEntry, FLAG_LZ4, IO_ALIGN, MAX_RECORD_ENTRIES,
    NO_SEGMENT, SEGMENT_HEADER_BYTES,
};
use crate::io::{AlignedBuf, IoOp, IoQueue, OpKind};
use crate::map::VolumeState;
use crate::reduce;
use crate::space::BlockEntry;

/// A stored payload the cleaner read out of a segment it is emptying, with the blocks in it
/// that were live: written again by a shard as a Move record, each block's move then applied
/// only if the block is still live at its old location.
pub(crate) struct Relocation {
    pub from_segment: u32,
    pub from_offset: u32,
    /// The stored payload, exactly as it was (its CRC is kept, so corruption is not laundered);
    /// a slice of the victim segment's buffer.
    pub data: Bytes,
    pub crc: u32,
    /// Live blocks stored in this payload: (block id, flags).
    pub members: Members,
    /// `data` is the block cache's copy, not the device's: checked against `crc` once copied
    /// into the record (where it is hot), and not moved if it differs.
    pub from_cache: bool,
}

/// The live blocks of one payload: one for an uncompressed block, up to 16 for a compressed
/// group. The first is inline: a `Vec` per moved block was most of the cleaner's mallocs.
#[derive(Debug, Clone)]
pub(crate) struct Members {
    pub(crate) first: (u64, u16),
    pub(crate) rest: Vec<(u64, u16)>,
}

impl Members {
    pub fn one(id: u64, flags: u16) -> Self {
        Members {
            first: (id, flags),
            rest: Vec::new(),
        }
    }

    pub fn push(&mut self, id: u64, flags: u16) {
        self.rest.push((id, flags));
    }

    pub fn first(&self) -> (u64, u16) {
        self.first
    }

    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(u64, u16)> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

impl Relocation {
    /// Uncompressed payloads keep their own 4 KiB-aligned slot.
    pub(crate) fn is_raw(&self) -> bool {
        self.members.first().1 & FLAG_LZ4 == 0
    }
}

/// A block about to be packed into a data record.
pub(crate) enum Item {
    Data {
        vol: Arc<VolumeState>,
        lba: u64,
        src: Bytes,
        fp: u128,
        part: Rc<Part>,
    },
    /// A dedup hit, verified byte for byte, holding a reference on block `id`.
    Ref {
        vol: Arc<VolumeState>,
        lba: u64,
        id: u64,
        fp: u128,
        part: Rc<Part>,
    },
    Hole {
        vol: Arc<VolumeState>,
        lba: u64,
        part: Rc<Part>,
    },
    Trim {
        vol: Arc<VolumeState>,
        lba: u64,
        count: u64,
        part: Rc<Part>,
    },
    Move {
        rel: Relocation,
        part: Rc<Part>,
    },
}

impl Item {
    pub(crate) fn kind(&self) -> RecordKind {
        match self {
            Item::Data { .. } | Item::Ref { .. } | Item::Hole { .. } => RecordKind::Data,
            Item::Trim { .. } => RecordKind::Trim,
            Item::Move { .. } => RecordKind::Move,
        }
    }

    pub(crate) fn entries(&self) -> usize {
        match self {
            Item::Move { rel, .. } => rel.members.len(),
            _ => 1,
        }
    }

    /// Payload bytes this item may take in a record (before compression).
    pub(crate) fn payload_estimate(&self) -> usize {
        match self {
            Item::Data { .. } => BLOCK,
            Item::Move { rel, .. } if rel.is_raw() => BLOCK,
            Item::Move { rel, .. } => rel.data.len(),
            _ => 0,
        }
    }
}

impl Shard {
    /// How many of `items` (all of `kind` up to the first of another kind) go into the next
    /// record: as many as fit in the rest of the open segment, or in a fresh segment when not
    /// even the first one fits here. Payloads count uncompressed, so compression only leaves
    /// the record shorter.
    pub(crate) fn cut<'a>(
        &self,
        items: impl Iterator<Item = &'a Item>,
        kind: RecordKind,
    ) -> (usize, u64) {
        let eb = entry_bytes(kind);
        let seg = self.ctx.geo.segment_bytes as usize;
        let left = if self.chain.pos.segment == NO_SEGMENT {
            0
        } else {
            seg.saturating_sub(self.chain.pos.offset as usize)
        };
        let fresh = seg - SEGMENT_HEADER_BYTES as usize;
        let mut budget = left;
        let (mut n, mut entries, mut bytes) = (0usize, 0usize, 0usize);
        let mut size = 0;
        let mut trimmed = 0u64;
        for it in items {
            if it.kind() != kind {
                break;
            }
            if let Item::Trim { count, .. } = it {
                trimmed += count;
                if trimmed > TRIM_CHUNK_BLOCKS && n > 0 {
                    break;
                }
            }
            let e2 = entries + it.entries();
            let b2 = bytes + it.payload_estimate();
            if e2 > MAX_RECORD_ENTRIES && n > 0 {
                break;
            }
            let s2 = RecordHeader::header_area(e2, eb) + b2.next_multiple_of(IO_ALIGN);
            if s2 > budget {
                if n == 0 && budget < fresh {
                    budget = fresh;
                }
                if s2 > budget && n > 0 {
                    break;
                }
            }
            n += 1;
            entries = e2;
            bytes = b2;
            size = s2;
        }
        (n.max(1), size as u64)
    }

    /// Turn queued items into records and queue their writes. Data that would eat into the
    /// space kept for the cleaner waits (stalls) while cleaning can free space, instead of
    /// failing; cleaner moves never wait.
    pub(crate) fn pack_records(&mut self) {
        let fresh = std::mem::take(&mut self.items);
        let (moves, mut fresh): (Vec<Item>, Vec<Item>) = fresh
            .into_iter()
            .partition(|i| matches!(i, Item::Move { .. }));
        let mut moves: VecDeque<Item> = moves.into();
        while !moves.is_empty() {
            let (n, _) = self.cut(moves.iter(), RecordKind::Move);
            let batch: Vec<Item> = moves.drain(..n.min(moves.len())).collect();
            self.build_record(batch, RecordKind::Move);
        }
        self.dedup_pass(&mut fresh);
        // Previously stalled items (each holding a count on its part) come first.
        let mut queue: VecDeque<(Item, bool)> = std::mem::take(&mut self.stalled)
            .into_iter()
            .map(|i| (i, true))
            .chain(fresh.into_iter().map(|i| (i, false)))
            .collect();
        while let Some((first, _)) = queue.front() {
            let kind = first.kind();
            // Cut the record to what the open segment still holds, so that segment tails are
            // not left empty (with 1 MiB writes and 2 MiB segments that wasted half the pool).
            let (end, bytes) = self.cut(queue.iter().map(|(i, _)| i), kind);
            let end = end.min(queue.len());
            if kind == RecordKind::Data && self.chain.must_wait_for_space(bytes, self.stalled_since)
            {
                break;
            }
            let batch: Vec<(Item, bool)> = queue.drain(..end).collect();
            let held: Vec<Rc<Part>> = batch
                .iter()
                .filter(|(_, h)| *h)
                .map(|(i, _)| item_part(i).clone())
                .collect();
            self.build_record(batch.into_iter().map(|(i, _)| i).collect(), kind);
            for p in held {
                p.record_done();
            }
        }
        for (item, held) in queue {
            if !held {
                let p = item_part(&item);
                p.records.set(p.records.get() + 1);
            }
            self.stalled.push_back(item);
        }
        if self.stalled.is_empty() {
            if let Some(t) = self.stalled_since.take() {
                if tracing::enabled!(target: "ingot_engine::shard", tracing::Level::DEBUG) {
                    let free = self.ctx.space.lock().free_segments;
                    tracing::debug!(
                        target: "ingot_engine::shard",
                        shard = self.id,
                        stalled_ms = t.elapsed().as_millis() as u64,
                        free,
                        "writes waited for space"
                    );
                }
            }
        } else {
            self.stalled_since
                .get_or_insert_with(std::time::Instant::now);
        }
    }

    /// The cleaner took `rel` from the block cache and it does not match the block's CRC: drop
    /// the block from every cache (readers would get the same bad copy) and say so.
    pub(crate) fn cache_copy_differs(&self, rel: &Relocation) {
        for &(id, _) in rel.members.iter() {
            for cache in &self.ctx.caches {
                cache.lock().forget(id);
            }
        }
        let seen = self
            .ctx
            .counters
            .gc_cache_mismatches
            .fetch_add(1, Ordering::Relaxed);
        // The first few are logged; `stats` counts them all.
        if seen >= 10 {
            return;
        }
        tracing::warn!(
            target: "ingot_engine::gc",
            block = rel.members.first().0,
            segment = rel.from_segment,
            offset = rel.from_offset,
            "a cached copy does not match its block's checksum; dropped from the cache, the \
             cleaner reads the block from the device"
        );
    }

    pub(crate) fn build_record(&mut self, batch: Vec<Item>, kind: RecordKind) {
        let entry_bytes = entry_bytes(kind);
        let room = if kind == RecordKind::Data {
            Room::Data
        } else {
            Room::Freeing
        };
        let parts: Vec<Rc<Part>> = batch.iter().map(item_part).cloned().collect();
        for p in &parts {
            p.records.set(p.records.get() + 1);
        }
        let mut batch = batch;
        let absorbed = if kind == RecordKind::Data {
            self.absorb(&mut batch)
        } else {
            Vec::new()
        };
        let plan = plan_payloads(&batch);
        let n_entries: usize = batch.iter().map(Item::entries).sum();
        let layout = Layout::new(
            n_entries,
            entry_bytes,
            plan.raw.len(),
            plan.packed.iter().map(|p| p.len()),
        );
        let header_bytes = layout.header_bytes;
        let record_bytes = layout.record_bytes;
        if !self.chain.fits(record_bytes as u64, room) {
            // Zeroes still on their way to the next segment must not land over its header.
            self.finish_prewrite(self.chain.pos.next, 0, IO_ALIGN as u64);
        }
        let (queue, inflight, next_tag) = (&mut self.queue, &mut self.inflight, &mut self.next_tag);
        let mut write_header = |dev, at, buf| push_header(queue, inflight, next_tag, dev, at, buf);
        if let Err(e) = self
            .chain
            .make_room(record_bytes as u64, room, &mut write_header)
        {
            self.unpin(batch.iter());
            for p in &parts {
                p.fail(e.clone());
                p.record_done();
            }
            return;
        }
        let segment = self.chain.pos.segment;
        let seg_off = self.chain.pos.offset;
        // Nor over this record.
        let end = u64::from(seg_off) + record_bytes as u64;
        self.finish_prewrite(segment, u64::from(seg_off), end);
        let mut ids = vec![0u64; batch.len()];
        {
            let mut space = self.ctx.space.lock();
            for (i, slot) in plan.slots.iter().enumerate() {
                if matches!(batch[i], Item::Data { .. })
                    && matches!(slot, Slot::Raw(_) | Slot::Packed(..))
                {
                    ids[i] = space.alloc_id();
                }
            }
        }
        // SAFETY: `fill` writes every byte of it.
        let buf = unsafe { self.queue.write_buf(layout.record_bytes) };
        let mut buf = layout.fill(buf, &plan.raw, &plan.packed);
        let packed_crc: Vec<u32> = plan
            .packed
            .iter()
            .zip(&plan.packed_crc)
            .map(|(p, c)| c.unwrap_or_else(|| crc32fast::hash(p)))
            .collect();
        let packed_len: Vec<usize> = plan.packed.iter().map(|p| p.len()).collect();
        let slots = plan.slots;
        drop(plan.raw);
        drop(plan.packed);
        let mut applies = Vec::with_capacity(n_entries + 1);
        for (vol, blocks) in absorbed {
            applies.push(Apply::Absorbed { vol, blocks });
        }
        let mut e_idx = 0usize;
        for (i, item) in batch.into_iter().enumerate() {
            let at = layout.entry_at(e_idx);
            e_idx += item.entries();
            // (payload offset in the record, stored length, crc, flags) of slot-holding items.
            let place =
                |slot: Slot, raw: &[u8], raw_crc: Option<u32>| -> (usize, usize, u32, u16) {
                    match slot {
                        Slot::Raw(k) => (
                            layout.raw_at(k),
                            BLOCK,
                            raw_crc.unwrap_or_else(|| crc32fast::hash(raw)),
                            0,
                        ),
                        Slot::Packed(k, gi, n) => (
                            layout.packed_at[k],
                            packed_len[k],
                            packed_crc[k],
                            reduce::group_flags(true, gi, n),
                        ),
                        _ => (0, 0, 0, 0),
                    }
                };
            match item {
                Item::Data {
                    vol,
                    lba,
                    src,
                    fp,
                    part,
                } => {
                    if let Slot::Dup(j) = slots[i] {
                        let id = ids[j];
                        ref_entry(&vol, lba, id, fp).encode(&mut buf[at..]);
                        applies.push(Apply::Ref {
                            vol,
                            lba,
                            id,
                            pinned: false,
                        });
                        continue;
                    }
                    let id = ids[i];
                    let (off, stored, crc, flags) = place(slots[i], &src, None);
                    DataEntry {
                        volume: vol.id,
                        flags,
                        lba,
                        block_id: id,
                        fingerprint: fp.to_le_bytes(),
                        payload_offset: off as u32,
                        stored_len: stored as u32,
                        payload_crc: crc,
                    }
                    .encode(&mut buf[at..]);
                    let key = vol
                        .dedup
                        .load(Ordering::Relaxed)
                        .then(|| self.ctx.dedup_key(fp));
                    applies.push(Apply::Block {
                        vol,
                        lba,
                        id,
                        entry: BlockEntry {
                            segment,
                            offset: seg_off + off as u32,
                            stored_len: stored as u16,
                            flags,
                            crc,
                        },
                        plain: src,
                        large: part.large_write.get(),
                        key,
                    });
                }
                Item::Ref {
                    vol, lba, id, fp, ..
                } => {
                    ref_entry(&vol, lba, id, fp).encode(&mut buf[at..]);
                    applies.push(Apply::Ref {
                        vol,
                        lba,
                        id,
                        pinned: true,
                    });
                }
                Item::Hole { vol, lba, .. } => {
                    DataEntry {
                        volume: vol.id,
                        flags: 0,
                        lba,
                        block_id: 0,
                        fingerprint: [0; 16],
                        payload_offset: 0,
                        stored_len: 0,
                        payload_crc: 0,
                    }
                    .encode(&mut buf[at..]);
                    applies.push(Apply::Hole { vol, lba });
                }
                Item::Trim {
                    vol, lba, count, ..
                } => {
                    TrimEntry {
                        volume: vol.id,
                        lba,
                        count,
                    }
                    .encode(&mut buf[at..]);
                    applies.push(Apply::Trim { vol, lba, count });
                }
                Item::Move { rel, .. } => {
                    let (off, stored, _, _) = place(slots[i], &rel.data, Some(rel.crc));
                    // A cached copy that differs from what was stored (a bug, or memory gone
                    // bad) is written but not applied, and replay drops it too (its CRC does
                    // not match): the block stays in its victim, which is then not freed, and
                    // the cleaner reads it from the device next time.
                    let bad = rel.from_cache && crc32fast::hash(&buf[off..off + stored]) != rel.crc;
                    if bad {
                        self.cache_copy_differs(&rel);
                    }
                    for (m, &(id, flags)) in rel.members.iter().enumerate() {
                        DataEntry {
                            volume: u32::MAX,
                            flags,
                            lba: u64::from(rel.from_segment) << 32 | u64::from(rel.from_offset),
                            block_id: id,
                            fingerprint: [0; 16],
                            payload_offset: off as u32,
                            stored_len: stored as u32,
                            payload_crc: rel.crc,
                        }
                        .encode(&mut buf[at + m * entry_bytes..]);
                        if bad {
                            continue;
                        }
                        applies.push(Apply::Move {
                            id,
                            from_segment: rel.from_segment,
                            from_offset: rel.from_offset,
                            entry: BlockEntry {
                                segment,
                                offset: seg_off + off as u32,
                                stored_len: stored as u16,
                                flags,
                                crc: rel.crc,
                            },
                        });
                    }
                }
            }
        }
        let placed = self.chain.seal(&mut buf, kind, &layout);
        let tag = self.tag();
        self.queue.push(IoOp {
            kind: OpKind::Write,
            dev: placed.dev,
            offset: placed.at,
            len: record_bytes,
            buf,
            tag,
        });
        self.ctx
            .counters
            .device_written
            .fetch_add(record_bytes as u64, Ordering::Relaxed);
        let by_kind = &self.ctx.counters.records[usize::from(kind == RecordKind::Move)];
        for (c, v) in by_kind
            .iter()
            .zip([1, n_entries, record_bytes, header_bytes])
        {
            c.fetch_add(v as u64, Ordering::Relaxed);
        }
        self.inflight.push_back(Inflight {
            tag,
            result: None,
            buf: None,
            seq: placed.seq,
            shard_seq: Some(placed.shard_seq),
            header_at: None,
            void: Some(placed.void),
            applies,
            parts,
            sent: Instant::now(),
        });
        if self.ctx.meta.evicted_any() {
            self.prefetch_newest();
        }
    }

    /// Drop the writes of `batch` (one data record) that a later write in it supersedes: same
    /// volume, same block. The record lands whole or not at all, and replay would apply the
    /// later entry over the earlier one anyway, so storing both only costs space and cleaning.
    /// Their parts stay counted on the record and are acknowledged with it. Under skew (fio's
    /// zipf:1.2 sends a fifth of all writes to one block) this keeps a hot block to one copy
    /// per record. Returns the writes absorbed, per volume.
    pub(crate) fn absorb(&self, batch: &mut Vec<Item>) -> Vec<(Arc<VolumeState>, u64)> {
        if batch.len() < 2 {
            return Vec::new();
        }
        let key = |it: &Item| match it {
            Item::Data { vol, lba, .. }
            | Item::Ref { vol, lba, .. }
            | Item::Hole { vol, lba, .. } => Some((vol.id, *lba)),
            _ => None,
        };
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        let mut keep = vec![true; batch.len()];
        let mut dropped = 0u64;
        for (i, it) in batch.iter().enumerate().rev() {
            if let Some(k) = key(it) {
                if !seen.insert(k) {
                    keep[i] = false;
                    dropped += 1;
                }
            }
        }
        if dropped == 0 {
            return Vec::new();
        }
        let all = std::mem::take(batch);
        let mut gone = Vec::with_capacity(dropped as usize);
        for (it, k) in all.into_iter().zip(keep) {
            if k {
                batch.push(it);
            } else {
                gone.push(it);
            }
        }
        // Dedup hits hold a reference until their record applies.
        self.unpin(gone.iter());
        // Absorbed writes count as client bytes per volume; absorbed trims and zeroes do not.
        let mut per_vol: Vec<(Arc<VolumeState>, u64)> = Vec::new();
        for it in &gone {
            if let Item::Data { vol, .. } | Item::Ref { vol, .. } = it {
                match per_vol.iter_mut().find(|(v, _)| Arc::ptr_eq(v, vol)) {
                    Some((_, n)) => *n += 1,
                    None => per_vol.push((vol.clone(), 1)),
                }
            }
        }
        per_vol
    }
}

pub(crate) fn entry_bytes(kind: RecordKind) -> usize {
    match kind {
        RecordKind::Trim | RecordKind::Void => TrimEntry::BYTES,
        RecordKind::Data | RecordKind::Move => DataEntry::BYTES,
    }
}

/// Where an item's payload goes in its record.
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    None,
    /// The n-th 4 KiB-aligned raw payload.
    Raw(usize),
    /// The n-th packed payload; this block's index in it and the blocks it holds.
    Packed(usize, usize, usize),
    /// The same bytes as the new block of an earlier item of this record.
    Dup(usize),
}

pub(crate) struct Plan<'a> {
    pub(crate) slots: Vec<Slot>,
    pub(crate) raw: Vec<&'a [u8]>,
    pub(crate) packed: Vec<std::borrow::Cow<'a, [u8]>>,
    /// A packed payload's checksum when it is already known (cleaner moves keep theirs).
    pub(crate) packed_crc: Vec<Option<u32>>,
}

/// Decide each item's payload: duplicates within the record share the first copy's block;
/// new blocks for consecutive LBAs of a volume are compressed together, up to
/// [`reduce::GROUP_BLOCKS`]; what does not shrink is stored raw.
pub(crate) fn plan_payloads(batch: &[Item]) -> Plan<'_> {
    let mut slots = vec![Slot::None; batch.len()];
    let mut seen: HashMap<u128, usize> = HashMap::new();
    for (i, it) in batch.iter().enumerate() {
        let Item::Data { vol, src, fp, .. } = it else {
            continue;
        };
        if !vol.dedup.load(Ordering::Relaxed) {
            continue;
        }
        match seen.get(fp) {
            Some(&j) => {
                if let Item::Data { src: first, .. } = &batch[j] {
                    if first[..] == src[..] {
                        slots[i] = Slot::Dup(j);
                    }
                }
            }
            None => {
                seen.insert(*fp, i);
            }
        }
    }
    let mut plan = Plan {
        slots,
        raw: Vec::new(),
        packed: Vec::new(),
        packed_crc: Vec::new(),
    };
    let mut i = 0;
    while i < batch.len() {
        match &batch[i] {
            Item::Data { vol, lba, src, .. } if !matches!(plan.slots[i], Slot::Dup(_)) => {
                let compress = vol.compress.load(Ordering::Relaxed);
                let mut j = i + 1;
                if compress {
                    while j < batch.len() && j - i < reduce::GROUP_BLOCKS {
                        match &batch[j] {
                            Item::Data {
                                vol: v2, lba: l2, ..
                            } if Arc::ptr_eq(vol, v2)
                                && *l2 == lba + (j - i) as u64
                                && !matches!(plan.slots[j], Slot::Dup(_)) =>
                            {
                                j += 1
                            }
                            _ => break,
                        }
                    }
                }
                let srcs: Vec<&[u8]> = (i..j)
                    .map(|k| match &batch[k] {
                        Item::Data { src, .. } => &src[..],
                        _ => &[][..],
                    })
                    .collect();
                let compressed = if !compress || !reduce::worth_compressing(srcs[0]) {
                    None
                } else if srcs.len() == 1 {
                    reduce::compress(src)
                } else {
                    reduce::compress(&srcs.concat())
                };
                match compressed {
                    Some(c) => {
                        let n = j - i;
                        for k in i..j {
                            plan.slots[k] = Slot::Packed(plan.packed.len(), k - i, n);
                        }
                        plan.packed.push(std::borrow::Cow::Owned(c));
                        plan.packed_crc.push(None);
                    }
                    None => {
                        for (k, s) in (i..j).zip(srcs) {
                            plan.slots[k] = Slot::Raw(plan.raw.len());
                            plan.raw.push(s);
                        }
                    }
                }
                i = j;
            }
            Item::Move { rel, .. } => {
                if rel.is_raw() {
                    plan.slots[i] = Slot::Raw(plan.raw.len());
                    plan.raw.push(&rel.data);
                } else {
                    plan.slots[i] = Slot::Packed(plan.packed.len(), 0, 1);
                    plan.packed.push(std::borrow::Cow::Borrowed(&rel.data));
                    plan.packed_crc.push(Some(rel.crc));
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    plan
}

/// Queue a new segment's header write in order with the records, as an in-flight entry with
/// no record of its own.
fn push_header(
    queue: &mut Box<dyn IoQueue>,
    inflight: &mut VecDeque<Inflight>,
    next_tag: &mut u64,
    dev: u16,
    at: u64,
    buf: AlignedBuf,
) {
    // As `Shard::tag`.
    *next_tag += 1;
    let tag = *next_tag;
    queue.push(IoOp {
        kind: OpKind::Write,
        dev,
        offset: at,
        len: IO_ALIGN,
        buf,
        tag,
    });
    inflight.push_back(Inflight {
        tag,
        result: None,
        buf: None,
        seq: 0,
        shard_seq: None,
        header_at: Some((dev, at)),
        void: None,
        applies: Vec::new(),
        parts: Vec::new(),
        sent: Instant::now(),
    });
}
