//! The block table (block id -> location, checksum), reference counts and segment accounting.
//!
//! One mutex guards them all; shards take it once per record batch or read request.

use super::{BlockTable, RefCounts};
use crate::format::NO_SEGMENT;

/// Where a stored block lives and how to verify it. 16 bytes per block in RAM; its reference
/// count is apart, in [`RefCounts`] (the part that stays in RAM once the table is paged). No
/// generation: caches keyed by id are purged when ids are released (see `cache`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockEntry {
    pub segment: u32,
    /// Byte offset of the payload within the segment (a group's members share one payload).
    pub offset: u32,
    /// Bytes of the whole payload.
    pub stored_len: u16,
    /// As in `format::DataEntry` (compression, position in the group).
    pub flags: u16,
    pub crc: u32,
}

impl BlockEntry {
    /// Stored bytes this block accounts for (its share of a group's payload).
    pub fn share(&self) -> u64 {
        crate::reduce::share(self.stored_len, self.flags)
    }
}

/// Life of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegState {
    Free,
    /// A shard appends to it.
    Open,
    /// Reserved as the next segment of a shard's chain.
    Next,
    /// Full (or abandoned at restart); every record in it has a sequence number below `seq`.
    Sealed {
        seq: u64,
    },
    /// Holds the current checkpoint.
    Checkpoint,
    /// Holds the previous checkpoint (the older superblock copy's); freed by the commit after
    /// next, once no superblock copy points at it.
    OldCheckpoint,
    /// Freed, and its blocks are being given back to the file system (a hole punched): it
    /// becomes `Free` once the punch is done, so that no record is written into it before.
    Discarding,
}

pub struct Space {
    /// Indexed by block id, as `refs`; both always have the same length. Change them only
    /// through `Space`'s methods.
    pub blocks: BlockTable,
    /// Map entries pointing at each block, and which ids are free (see [`RefCounts`]).
    pub refs: RefCounts,
    /// Ids whose last reference went away at `seq`; reusable once a checkpoint covers `seq`.
    pending_ids: Vec<(u64, u64)>,
    pub seg_state: Vec<SegState>,
    pub seg_live: Vec<u64>,
    pub free_segments: usize,
    /// Per segment, meaningful while `Free`: freed without a discard, so the backing file still
    /// stores its old blocks (see `Inner::give_back_freed`).
    pub undiscarded: Vec<bool>,
    /// How many `Free` segments are marked in `undiscarded` (an upper bound).
    pub undiscarded_count: usize,
    /// Where the next search for a free segment starts, per device (its first segment and
    /// the hint), and the device the next allocation tries first.
    dev_hints: Vec<(usize, usize)>,
    next_dev: usize,
    pub stored_bytes: u64,
    pub live_blocks: u64,
    /// Victims of the running cleaning pass: a checkpoint does not free them even once their
    /// blocks all died. Freed and reused meanwhile, one could take a new block under a reused
    /// id at the very place a pending move copied its old one from, and the move would then
    /// pass for current (`relocate` checks the place).
    pub cleaning: Vec<u32>,
    /// Free segments to keep allocated in the backing files (thin pools) for checkpoints and
    /// the cleaner, so that they never meet a full host file system (see
    /// `Inner::top_up_backed`). 0: every segment is allocated (prefilled pools, block devices).
    pub backed_reserve: usize,
    /// The first evicted block-table leaf that could not be read back while a change was
    /// applied (the change was not made): whoever applied it stops the pool
    /// ([`Space::take_failure`]).
    failure: Option<crate::error::Error>,
    /// References taken by dedup on blocks that writes waiting for their record will point
    /// at (`Space::pin`): counted, but no map entry holds them yet. A checkpoint's image
    /// leaves them out of the counts it stores (the maps it holds do not have them).
    pins: std::collections::HashMap<u64, u32>,
}

/// Who a segment is for: data prefers segments the backing file does not hold yet while the
/// held ones are down to `Space::backed_reserve`; metadata (checkpoints) and the cleaner's
/// moves prefer held ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegUse {
    Data,
    Metadata,
}

impl Space {
    /// Read back the evicted block-table leaves of `ids` (at most `max`), holding `space`'s
    /// lock only to find them and to take them in, not while reading: a miss under the lock
    /// stops every shard and reader for the read. The look-ups that follow under the lock
    /// then find them (a leaf evicted again meanwhile is read there, as before).
    pub(crate) fn fetch_leaves(
        space: &parking_lot::Mutex<Space>,
        ids: &mut dyn Iterator<Item = u64>,
        max: usize,
    ) {
        let ask = space.lock().blocks.evicted_of(ids, max);
        if let Some(ask) = ask {
            let got = ask.pages.read_leaves(&ask.leaves);
            space.lock().blocks.take_read(&ask, got);
        }
    }

    /// The first segment of each device (ascending), so that allocations take the devices in
    /// turn: with the segments numbered device after device and one search hint, a pool of
    /// several devices filled the first before writing to the next, and never wrote to two
    /// at once.
    pub fn set_devices(&mut self, firsts: &[u32]) {
        if !firsts.is_empty() {
            self.dev_hints = firsts.iter().map(|&f| (f as usize, f as usize)).collect();
            self.next_dev = 0;
        }
    }

    pub fn new(total_segments: u32) -> Self {
        Space {
            blocks: BlockTable::from(vec![BlockEntry::default()]),
            refs: RefCounts::with_len(1),
            pending_ids: Vec::new(),
            seg_state: vec![SegState::Free; total_segments as usize],
            seg_live: vec![0; total_segments as usize],
            free_segments: total_segments as usize,
            undiscarded: vec![false; total_segments as usize],
            undiscarded_count: 0,
            dev_hints: vec![(0, 0)],
            next_dev: 0,
            stored_bytes: 0,
            live_blocks: 0,
            cleaning: Vec::new(),
            backed_reserve: 0,
            failure: None,
            pins: std::collections::HashMap::new(),
        }
    }

    /// RAM held per block id: the block table and the reference counts, with the ids waiting
    /// for a checkpoint.
    pub fn ram_bytes(&self) -> u64 {
        self.blocks.stub_bytes() + self.refs.ram_bytes() + self.pending_ids.capacity() as u64 * 16
    }

    /// Free segments the backing files hold blocks for.
    pub fn backed_free(&self) -> usize {
        (0..self.seg_state.len())
            .filter(|&s| self.seg_state[s] == SegState::Free && self.undiscarded[s])
            .count()
    }

    /// Take a loaded table (id 0 is never a block: a table always holds it); every id starts
    /// unreferenced, [`Space::add_ref`] counts the map entries.
    pub fn set_blocks(&mut self, mut blocks: BlockTable) {
        if blocks.is_empty() {
            blocks.push(BlockEntry::default());
        }
        self.refs = RefCounts::with_len(blocks.len());
        self.blocks = blocks;
    }

    /// Take the counts a checkpoint stored (`format::ROOT_COUNTS`) as they are, with a block
    /// table whose leaves are on pages: nothing is recounted.
    /// `usage`: live bytes per segment.
    pub(crate) fn set_counted(
        &mut self,
        mut blocks: BlockTable,
        mut refs: RefCounts,
        usage: &[u64],
        (live_blocks, stored_bytes): (u64, u64),
    ) {
        if blocks.is_empty() {
            blocks.push(BlockEntry::default());
        }
        refs.grow_to(blocks.len());
        self.refs = refs;
        self.blocks = blocks;
        for (l, &b) in self.seg_live.iter_mut().zip(usage) {
            *l = b;
        }
        self.live_blocks = live_blocks;
        self.stored_bytes = stored_bytes;
    }

    /// Allocate an id for a new block, the lowest free one: held, with no reference, until
    /// [`Space::add_ref`] adds the first (or [`Space::discard_id`] gives it back).
    pub fn alloc_id(&mut self) -> u64 {
        if let Some(id) = self.refs.take_free() {
            return id;
        }
        self.blocks.push(BlockEntry::default());
        self.refs.grow_to(self.blocks.len());
        let id = (self.blocks.len() - 1) as u64;
        self.refs.hold(id);
        id
    }

    /// Set a block's location (a new block, or one replayed from the log).
    /// Returns false when the block's leaf did not read back (the failure is recorded): the
    /// caller must not reference the id, whose entry may still name another block.
    #[must_use]
    pub fn place(&mut self, id: u64, e: BlockEntry) -> bool {
        let idx = id as usize;
        if idx >= self.blocks.len() {
            self.blocks.grow_to(idx + 1, BlockEntry::default());
            self.refs.grow_to(idx + 1);
        }
        let live = self.refs.live(id);
        let old = match self.blocks.get_mut(idx) {
            Ok(Some(slot)) => std::mem::replace(slot, e),
            Ok(None) => return false,
            Err(err) => {
                self.fail(err);
                return false;
            }
        };
        if live {
            self.unaccount(&old);
            self.account(&e);
        }
        // Replay places ids no one holds yet: held from now on, so that a dedup reference
        // later in the log finds the block stored (`is_placed`).
        self.refs.hold(id);
        true
    }

    /// A change could not be made (its block-table leaf did not read back).
    fn fail(&mut self, e: crate::error::Error) {
        self.failure.get_or_insert(e);
    }

    /// The first change that could not be made since the last call: the caller, which
    /// applied changes already in the log, stops the pool (the next open replays them).
    pub fn take_failure(&mut self) -> Option<crate::error::Error> {
        self.failure.take()
    }

    /// Block `id`'s entry, its leaf read back if evicted; `None` (recorded as a failure) when
    /// it cannot be.
    fn entry_or_fail(&mut self, id: u64) -> Option<BlockEntry> {
        match self.blocks.entry(id as usize) {
            Ok(e) => e,
            Err(err) => {
                self.fail(err);
                None
            }
        }
    }

    fn account(&mut self, e: &BlockEntry) {
        let n = e.share();
        if let Some(l) = self.seg_live.get_mut(e.segment as usize) {
            *l += n;
        }
        self.stored_bytes += n;
        self.live_blocks += 1;
    }

    fn unaccount(&mut self, e: &BlockEntry) {
        let n = e.share();
        if let Some(l) = self.seg_live.get_mut(e.segment as usize) {
            *l = l.saturating_sub(n);
        }
        self.stored_bytes = self.stored_bytes.saturating_sub(n);
        self.live_blocks = self.live_blocks.saturating_sub(1);
    }

    /// Whether `id` holds a stored block (placed, whatever its reference count): a dedup
    /// reference replayed from the log may only point at such a block. Asked of the counts,
    /// not the table: an id live in the checkpoint, or placed since, is in use until a
    /// checkpoint after its death releases it, while a free id's entry on a page may still
    /// name the block it held before.
    pub fn is_placed(&self, id: u64) -> bool {
        id != 0 && self.refs.in_use(id)
    }

    /// A live block's entry (`None`: no such block), its leaf read back if evicted.
    pub fn get(&mut self, id: u64) -> crate::error::Result<Option<BlockEntry>> {
        if !self.refs.live(id) {
            return Ok(None);
        }
        self.blocks.entry(id as usize)
    }

    /// A live block's entry, counted as a use of its leaf; `Err(())` when its leaf is evicted
    /// (never reads).
    pub fn get_if_resident(&mut self, id: u64) -> std::result::Result<Option<BlockEntry>, ()> {
        if !self.refs.live(id) {
            return Ok(None);
        }
        self.blocks.entry_if_resident(id as usize)
    }

    /// A live block's entry if its leaf is in RAM (never reads).
    pub fn get_resident(&self, id: u64) -> Option<BlockEntry> {
        self.blocks
            .get(id as usize)
            .copied()
            .filter(|_| self.refs.live(id))
    }

    pub fn add_ref(&mut self, id: u64) {
        if self.refs.add(id) == Some(1) {
            if let Some(e) = self.entry_or_fail(id) {
                self.account(&e);
            }
        }
    }

    /// A reference for a dedup hit whose record is not written yet: the block cannot be freed
    /// meanwhile. It becomes the map entry's (`pin_taken`) or goes (`unpin`).
    pub fn pin(&mut self, id: u64) {
        self.add_ref(id);
        *self.pins.entry(id).or_default() += 1;
    }

    /// A pin became the reference of the map entry its record set.
    pub fn pin_taken(&mut self, id: u64) {
        debug_assert!(self.pins.contains_key(&id), "a pin of {id} not taken");
        if let Some(n) = self.pins.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&id);
            }
        }
    }

    /// A pin goes with no map entry (its write failed, or its volume went); as `drop_ref`.
    pub fn unpin(&mut self, id: u64, seq: u64) -> bool {
        self.pin_taken(id);
        self.drop_ref(id, seq)
    }

    /// Pins held now, by id.
    pub(crate) fn pins(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.pins.iter().map(|(&id, &n)| (id, n))
    }

    /// Drop one reference; when it was the last (the return value), the id becomes reusable
    /// after a checkpoint covering `seq`.
    pub fn drop_ref(&mut self, id: u64, seq: u64) -> bool {
        if self.refs.drop_one(id) != Some(0) {
            return false;
        }
        if let Some(e) = self.entry_or_fail(id) {
            self.unaccount(&e);
        }
        self.pending_ids.push((seq, id));
        true
    }

    /// The cleaner copied block `id` from (`from_segment`, `from_offset`) to `to`: take the new
    /// location if the block is still live at the old one (it may have been overwritten or
    /// trimmed meanwhile, then the copy is garbage). Returns whether it moved.
    pub fn relocate(
        &mut self,
        id: u64,
        from_segment: u32,
        from_offset: u32,
        to: &BlockEntry,
    ) -> bool {
        if !self.refs.live(id) {
            return false;
        }
        let Some(e) = self.entry_or_fail(id) else {
            return false;
        };
        if e.segment != from_segment || e.offset != from_offset {
            return false;
        }
        let moved = BlockEntry {
            segment: to.segment,
            offset: to.offset,
            ..e
        };
        match self.blocks.get_mut(id as usize) {
            Ok(Some(slot)) => *slot = moved,
            Ok(None) => return false,
            Err(err) => {
                self.fail(err);
                return false;
            }
        }
        self.unaccount(&e);
        self.account(&moved);
        true
    }

    /// Give back an id that was allocated but never referenced (a failed or dropped write).
    pub fn discard_id(&mut self, id: u64, seq: u64) {
        if (id as usize) < self.blocks.len() && !self.refs.live(id) {
            self.refs.hold(id);
            self.pending_ids.push((seq, id));
        }
    }

    /// Ids freed by records before `seq_end` become reusable (a durable checkpoint covers them).
    /// An id referenced again meanwhile (a dedup hit on a block in the same record whose first
    /// reference was dropped) stays in use. An id with a later entry still pending stays held:
    /// it was given back (a block placed for a volume deleted meanwhile), referenced again by a
    /// duplicate in the same record, then freed after `seq_end`, and that death is not covered.
    /// Returns the released ids: the caller drops them from the block caches before it lets go
    /// of the space lock (`Context::release_ids`).
    #[must_use]
    pub fn release_ids(&mut self, seq_end: u64) -> Vec<u64> {
        let later: std::collections::HashSet<u64> = self
            .pending_ids
            .iter()
            .filter(|&&(s, _)| s >= seq_end)
            .map(|&(_, id)| id)
            .collect();
        let refs = &mut self.refs;
        let mut released = Vec::new();
        self.pending_ids.retain(|&(s, id)| {
            if s < seq_end {
                if !later.contains(&id) && refs.release(id) {
                    released.push(id);
                }
                false
            } else {
                true
            }
        });
        released
    }

    /// After a checkpoint that covers the whole log (an open's): every unreferenced id is free.
    /// The caller purges the block caches (`Context::release_all_ids`).
    pub fn rebuild_free_ids(&mut self) {
        self.refs.release_all();
        self.pending_ids.clear();
    }

    /// Take a free segment for `state`, keeping `reserve` segments back (for checkpoints).
    pub fn alloc_segment(&mut self, state: SegState, reserve: usize) -> Option<u32> {
        let use_ = if state == SegState::Checkpoint {
            SegUse::Metadata
        } else {
            SegUse::Data
        };
        self.alloc_segment_for(state, reserve, use_)
    }

    /// Allocate a free segment (none while `reserve` or fewer are free) for `use_`.
    pub fn alloc_segment_for(
        &mut self,
        state: SegState,
        reserve: usize,
        use_: SegUse,
    ) -> Option<u32> {
        if self.free_segments <= reserve {
            return None;
        }
        // Which held (allocated) segments to prefer: metadata takes them first; data leaves
        // them alone while they are down to the reserve.
        let want_held = match use_ {
            SegUse::Metadata => Some(true),
            SegUse::Data
                if self.backed_reserve > 0 && self.backed_free() <= self.backed_reserve =>
            {
                Some(false)
            }
            _ => None,
        };
        let n = self.seg_state.len();
        let ndev = self.dev_hints.len();
        let start_dev = self.next_dev % ndev;
        let start = self.dev_hints[start_dev].1;
        for pass in 0..2 {
            for k in 0..n {
                let s = (start + k) % n;
                if self.seg_state[s] != SegState::Free {
                    continue;
                }
                if pass == 0 && want_held.is_some_and(|h| self.undiscarded[s] != h) {
                    continue;
                }
                self.seg_state[s] = state;
                self.free_segments -= 1;
                // The device it came from searches on after it; the next device is tried next.
                let d = self.dev_hints.partition_point(|&(first, _)| first <= s) - 1;
                let (first, _) = self.dev_hints[d];
                let end = self.dev_hints.get(d + 1).map_or(n, |&(f, _)| f);
                self.dev_hints[d].1 = if s + 1 < end { s + 1 } else { first };
                self.next_dev = (d + 1) % ndev;
                return Some(s as u32);
            }
            if want_held.is_none() {
                break;
            }
        }
        None
    }

    pub fn set_state(&mut self, seg: u32, state: SegState) {
        if seg == NO_SEGMENT {
            return;
        }
        let Some(cur) = self.seg_state.get_mut(seg as usize) else {
            return;
        };
        match (*cur == SegState::Free, state == SegState::Free) {
            (true, false) => self.free_segments -= 1,
            (false, true) => self.free_segments += 1,
            _ => {}
        }
        *cur = state;
    }

    /// Sealed segments holding no live block: (sealed at or before `ckpt_seq`, after it).
    pub fn dead_sealed(&self, ckpt_seq: u64) -> (usize, usize) {
        let (mut behind, mut after) = (0, 0);
        for (s, st) in self.seg_state.iter().enumerate() {
            if let SegState::Sealed { seq } = *st {
                if self.seg_live[s] == 0 && !self.cleaning.contains(&(s as u32)) {
                    if seq <= ckpt_seq {
                        behind += 1;
                    } else {
                        after += 1;
                    }
                }
            }
        }
        (behind, after)
    }

    /// Free sealed segments whose records all precede `seq_end` (a durable checkpoint covers
    /// them), that held no live data at that checkpoint (`live_then`) and hold none now.
    /// Returns the freed segments.
    pub fn reclaim(&mut self, seq_end: u64, live_then: &[u64]) -> Vec<u32> {
        let mut freed = Vec::new();
        for s in 0..self.seg_state.len() {
            let free = match self.seg_state[s] {
                SegState::Sealed { seq: sealed } => {
                    sealed <= seq_end
                        && self.seg_live[s] == 0
                        && live_then.get(s).copied().unwrap_or(0) == 0
                        && !self.cleaning.contains(&(s as u32))
                }
                _ => false,
            };
            if free {
                self.set_state(s as u32, SegState::Free);
                freed.push(s as u32);
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(s: &mut Space, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| s.alloc_segment(SegState::Open, 0).expect("a free segment"))
            .collect()
    }

    #[test]
    fn an_id_with_a_later_death_pending_is_not_released_early() {
        let mut s = Space::new(4);
        let x = s.alloc_id();
        // Given back (its volume went away), referenced again by a duplicate in the same
        // record, then dead at sequence 5.
        s.discard_id(x, 1);
        s.add_ref(x);
        assert!(s.drop_ref(x, 5));
        assert!(s.release_ids(3).is_empty());
        assert_ne!(
            s.alloc_id(),
            x,
            "released before the checkpoint that covers its death"
        );
        assert_eq!(s.release_ids(6), [x]);
        assert_eq!(s.alloc_id(), x);
    }

    #[test]
    fn one_device_allocates_in_order_and_wraps() {
        let mut s = Space::new(4);
        assert_eq!(take(&mut s, 3), [0, 1, 2]);
        s.set_state(1, SegState::Free);
        assert_eq!(take(&mut s, 2), [3, 1]);
        assert_eq!(s.alloc_segment(SegState::Open, 0), None);
    }

    #[test]
    fn devices_are_taken_in_turn() {
        // Devices of 3, 2 and 3 segments.
        let mut s = Space::new(8);
        s.set_devices(&[0, 3, 5]);
        assert_eq!(take(&mut s, 6), [0, 3, 5, 1, 4, 6]);
        // The second device is full: its turn goes to the next free segment after it.
        assert_eq!(take(&mut s, 2), [2, 7]);
        s.set_state(3, SegState::Free);
        s.set_state(0, SegState::Free);
        assert_eq!(take(&mut s, 2), [0, 3]);
        assert_eq!(s.alloc_segment(SegState::Open, 0), None);
    }
}
