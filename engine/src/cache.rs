//! Per-shard DRAM cache of plaintext 4 KiB blocks, keyed by block id. Blocks read from the
//! device are slices of the buffer they arrived in (a read buffer, a decompressed group);
//! written blocks are copied in by the shard. CLOCK eviction over a fixed array of slots.
//!
//! An id names one content until it is released for reuse, which happens only at a checkpoint
//! (`Space::release_ids`): the release bumps the [`ReuseEpoch`] and purges the released ids
//! from every cache before any of them can be handed out again. A copy read (or written) at
//! epoch E is cached only if the epoch is still E, so a read that raced a release never caches
//! an old content under a reused id. The block table needs no per-id generation for this (4
//! of its 20 bytes per block, and a table look-up on every cache hit).

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many times block ids were released for reuse. Shared by every cache of a pool.
#[derive(Clone, Default, Debug)]
pub struct ReuseEpoch(Arc<AtomicU64>);

impl ReuseEpoch {
    /// The current epoch; read it where the id was found (a map, the block table), before
    /// reading the block.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// A release begins (before the released ids are purged from the caches).
    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Purge released ids one by one while there are at most one per this many slots; more, and a
/// sweep of the slots is cheaper (a look-up costs about as much as checking this many slots).
const SLOTS_PER_LOOKUP: usize = 8;

/// Block ids are dense integers chosen by us, not by clients: a multiply-shift hash is enough
/// and far cheaper than SipHash on the write path.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // Runs of 16 consecutive ids (a record's blocks) land in consecutive buckets, one
        // control group and four cache lines of entries, instead of 16 random misses.
        let run = (v >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(32);
        self.0 = (run & !15) | (v & 15);
    }
}

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// A place for one cached block. Free slots (`id` 0) may still hold the buffer of the block
/// they held, for the next copy.
struct Slot {
    id: u64,
    referenced: bool,
    /// `data` is a buffer of the cache's own (a copy), which it may reuse.
    owned: bool,
    data: Bytes,
}

const BLOCK: usize = 4096;
/// Buffers of dropped copies kept for reuse beyond those left in free slots.
const SPARE_BUFFERS: usize = 32;

/// CLOCK over a fixed array of slots: the hand sweeps the slots in order, so eviction needs no
/// queue, and a block dropped because it was overwritten frees its slot at once (its buffer
/// then serves the next copy instead of fresh memory).
pub struct BlockCache {
    /// Block id → slot.
    map: IdMap<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    hand: usize,
    capacity_blocks: usize,
    /// Buffers of dropped copies no reader holds any more: allocating and freeing one per
    /// written block cost a tenth of the shards' CPU in glibc.
    spare: Vec<BytesMut>,
    epoch: ReuseEpoch,
    pub hits: u64,
    pub misses: u64,
}

impl BlockCache {
    /// Whether this cache holds nothing ever (`--cache-size=0`).
    pub fn is_off(&self) -> bool {
        self.capacity_blocks == 0
    }

    pub fn new(capacity_bytes: u64, epoch: ReuseEpoch) -> Self {
        BlockCache {
            epoch,
            map: IdMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            // Slot numbers are 32-bit: 16 TiB of cache per shard.
            capacity_blocks: ((capacity_bytes / 4096) as usize).min(u32::MAX as usize),
            spare: Vec::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn len_bytes(&self) -> u64 {
        self.map.len() as u64 * 4096
    }

    /// The cached plaintext of block `id`, if present. For an id that cannot have been
    /// released since it was found: one this thread's own map or a pin holds.
    pub fn get(&mut self, id: u64) -> Option<&Bytes> {
        self.lookup(id, true)
    }

    /// The cached plaintext of block `id`, found at epoch `seen`, if present and no release
    /// happened since (then the id may name another block now). A miss is not counted (the
    /// caller falls back to a path that looks again and counts it).
    pub fn get_at(&mut self, id: u64, seen: u64) -> Option<&Bytes> {
        if self.epoch.now() != seen {
            return None;
        }
        self.lookup(id, false)
    }

    fn lookup(&mut self, id: u64, count_miss: bool) -> Option<&Bytes> {
        match self.map.get(&id).map(|&i| i as usize) {
            Some(i) => {
                self.hits += 1;
                let s = &mut self.slots[i];
                s.referenced = true;
                Some(&s.data)
            }
            None => {
                self.misses += u64::from(count_miss);
                None
            }
        }
    }

    /// The cached plaintext of `id`, found at epoch `seen`, neither marked as used nor
    /// counted: for the cleaner, whose look-ups say nothing about what clients read next.
    pub fn peek_at(&self, id: u64, seen: u64) -> Option<Bytes> {
        if self.epoch.now() != seen {
            return None;
        }
        let &i = self.map.get(&id)?;
        Some(self.slots[i as usize].data.clone())
    }

    /// Whether block `id` is cached (no hit or miss counted).
    pub fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    /// Cache `data` (one 4 KiB block), read or written at epoch `seen`, as the contents of `id`
    /// (dropped if ids were released since).
    pub fn insert(&mut self, id: u64, seen: u64, data: Bytes) {
        if self.capacity_blocks == 0 || data.len() != BLOCK || self.epoch.now() != seen {
            return;
        }
        let i = self.slot_for(id);
        let old = std::mem::replace(&mut self.slots[i].data, data);
        let owned = std::mem::replace(&mut self.slots[i].owned, false);
        self.recycle(owned, old);
        self.fill(i, id);
    }

    /// Whether a new block can be cached without evicting another.
    pub fn has_room(&self) -> bool {
        self.capacity_blocks > 0
            && (!self.free.is_empty() || self.slots.len() < self.capacity_blocks)
    }

    /// Cache a copy of `data` (one 4 KiB block), in a buffer of a dropped copy when one is
    /// free. For data whose own buffer must not be kept (a client's write: it may hold more).
    pub fn insert_copy(&mut self, id: u64, seen: u64, data: &[u8]) {
        if self.capacity_blocks == 0 || data.len() != BLOCK || self.epoch.now() != seen {
            return;
        }
        let i = self.slot_for(id);
        let old = std::mem::take(&mut self.slots[i].data);
        let reused = if self.slots[i].owned {
            old.try_into_mut().ok()
        } else {
            None
        };
        let mut buf = reused
            .or_else(|| self.spare.pop())
            .unwrap_or_else(|| BytesMut::with_capacity(BLOCK));
        buf.clear();
        copy_streaming(&mut buf, data);
        self.slots[i].data = buf.freeze();
        self.slots[i].owned = true;
        self.fill(i, id);
    }

    /// Drop block `id`, which no volume refers to any more: its slot and buffer serve the next
    /// block, so overwrites do not grow the cache.
    pub fn forget(&mut self, id: u64) {
        if let Some(i) = self.map.remove(&id) {
            let s = &mut self.slots[i as usize];
            s.id = 0;
            if !s.owned {
                // A slice of a read buffer would keep that whole buffer until the slot is reused.
                s.data = Bytes::new();
            }
            self.free.push(i);
        }
    }

    /// Drop the released ids `released`; `is_free` tells a released id apart (a sweep of the
    /// slots asks it of every cached id when that is cheaper than one look-up per id).
    pub fn purge(&mut self, released: &[u64], is_free: impl Fn(u64) -> bool) {
        if self.map.is_empty() {
            return;
        }
        if released.len() * SLOTS_PER_LOOKUP <= self.slots.len() {
            for &id in released {
                self.forget(id);
            }
            return;
        }
        self.purge_free(is_free);
    }

    /// Drop every cached id `is_free` says was released (a sweep of the slots).
    pub fn purge_free(&mut self, is_free: impl Fn(u64) -> bool) {
        let gone: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.id != 0 && is_free(s.id))
            .map(|s| s.id)
            .collect();
        for id in gone {
            self.forget(id);
        }
    }

    fn fill(&mut self, i: usize, id: u64) {
        let s = &mut self.slots[i];
        s.referenced = false;
        if s.id != id {
            s.id = id;
            self.map.insert(id, i as u32);
        }
    }

    /// The slot for block `id`: its own, a free one, a new one, or the CLOCK's victim.
    fn slot_for(&mut self, id: u64) -> usize {
        if let Some(&i) = self.map.get(&id) {
            return i as usize;
        }
        if let Some(i) = self.free.pop() {
            return i as usize;
        }
        if self.slots.len() < self.capacity_blocks {
            self.slots.push(Slot {
                id: 0,
                referenced: false,
                owned: false,
                data: Bytes::new(),
            });
            return self.slots.len() - 1;
        }
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let s = &mut self.slots[i];
            if s.referenced {
                s.referenced = false;
                continue;
            }
            if s.id != 0 {
                self.map.remove(&s.id);
                s.id = 0;
            }
            return i;
        }
    }

    fn recycle(&mut self, owned: bool, data: Bytes) {
        if owned && self.spare.len() < SPARE_BUFFERS {
            // Fails while a reader still holds the block; it is then freed with its last clone.
            if let Ok(buf) = data.try_into_mut() {
                self.spare.push(buf);
            }
        }
    }
}

/// Append `src` to `dst` with stores that bypass the CPU caches: the slot's buffer is usually
/// cold (its block was cached long before), so an ordinary copy first reads every destination
/// line from memory (a 1M-write profile put a fifth of the server's CPU on this copy), and a
/// written block is seldom read again soon from this cache (the client's own cache has it).
fn copy_streaming(dst: &mut BytesMut, src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        dst.reserve(src.len());
        let spare = dst.spare_capacity_mut();
        let to = spare.as_mut_ptr().cast::<u8>();
        if src.len() % 64 == 0 && (to as usize) % 16 == 0 && spare.len() >= src.len() {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
            // SAFETY: SSE2 is part of x86_64. `to` is 16-byte aligned with room for
            // `src.len()` bytes (checked above); the loads are unaligned ones within `src`. The
            // fence orders the streaming stores before the buffer is shared.
            unsafe {
                let from = src.as_ptr();
                let mut i = 0;
                while i < src.len() {
                    for k in 0..4 {
                        let v = _mm_loadu_si128(from.add(i + 16 * k).cast::<__m128i>());
                        _mm_stream_si128(to.add(i + 16 * k).cast::<__m128i>(), v);
                    }
                    i += 64;
                }
                _mm_sfence();
                dst.set_len(dst.len() + src.len());
            }
            return;
        }
    }
    dst.extend_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(blocks: u64) -> BlockCache {
        BlockCache::new(blocks * BLOCK as u64, ReuseEpoch::default())
    }

    #[test]
    fn evicted_copies_are_reused_but_never_under_a_reader() {
        let mut c = cache(2);
        c.insert_copy(1, 0, &[1; BLOCK]);
        c.insert_copy(2, 0, &[2; BLOCK]);
        let held = c.get(1).expect("cached").clone();
        // Evicts 2 (1 was read), then 1 (a reader holds it: not reused), then 3.
        c.insert_copy(3, 0, &[3; BLOCK]);
        c.insert_copy(4, 0, &[4; BLOCK]);
        c.insert_copy(5, 0, &[5; BLOCK]);
        assert_eq!(&held[..], &[1; BLOCK][..]);
        assert!(c.get(1).is_none() && c.get(2).is_none());
        for id in [4u8, 5] {
            assert_eq!(&c.get(u64::from(id)).expect("cached")[..], &[id; BLOCK][..]);
        }
        // A replaced entry's buffer is reused too.
        c.insert_copy(5, 0, &[6; BLOCK]);
        assert_eq!(&c.get(5).expect("cached")[..], &[6; BLOCK][..]);
        // Blocks kept by reference are never reused.
        let shared = Bytes::from(vec![7; 2 * BLOCK]);
        c.insert(6, 0, shared.slice(..BLOCK));
        c.insert_copy(7, 0, &[8; BLOCK]);
        c.insert_copy(8, 0, &[9; BLOCK]);
        assert_eq!(&shared[..BLOCK], &[7; BLOCK][..]);
    }

    #[test]
    fn forgotten_blocks_free_their_slot_for_the_next() {
        let mut c = cache(4);
        // An overwrite workload: each new block kills the previous one.
        for id in 1..=10_000u64 {
            c.insert_copy(id, 0, &[id as u8; BLOCK]);
            c.forget(id - 1);
        }
        assert_eq!((c.map.len(), c.slots.len()), (1, 2));
        assert_eq!(&c.get(10_000).expect("cached")[..], &[16; BLOCK][..]);
        // Full: the hand passes over read blocks once, then evicts the oldest unread one.
        for id in [5u64, 6, 7] {
            c.insert_copy(id, 0, &[id as u8; BLOCK]);
        }
        assert!(c.get(10_000).is_some());
        c.insert_copy(9, 0, &[9; BLOCK]);
        assert!(c.get(10_000).is_some() && c.get(9).is_some());
        assert_eq!(
            [5u64, 6, 7]
                .iter()
                .filter(|&&id| c.get(id).is_some())
                .count(),
            2
        );
        // A forgotten block is a miss at once; its slot takes the next block.
        c.forget(9);
        assert!(c.get(9).is_none());
        c.insert_copy(11, 0, &[11; BLOCK]);
        assert_eq!(c.slots.len(), 4);
        assert_eq!(&c.get(11).expect("cached")[..], &[11; BLOCK][..]);
    }

    /// A copy read before a release is not cached after it, and one found before it is not
    /// handed out after it: the id may name another block by then.
    #[test]
    fn copies_from_before_a_release_are_neither_cached_nor_served() {
        let epoch = ReuseEpoch::default();
        let mut c = BlockCache::new(16 * BLOCK as u64, epoch.clone());
        let before = epoch.now();
        c.insert_copy(1, before, &[1; BLOCK]);
        epoch.bump();
        c.insert_copy(2, before, &[2; BLOCK]);
        c.insert(3, before, Bytes::from(vec![3; BLOCK]));
        assert!(!c.contains(2) && !c.contains(3));
        assert!(c.get_at(1, before).is_none() && c.peek_at(1, before).is_none());
        let now = epoch.now();
        assert_eq!(&c.get_at(1, now).expect("cached")[..], &[1; BLOCK][..]);
        assert_eq!(&c.peek_at(1, now).expect("cached")[..], &[1; BLOCK][..]);
    }

    /// Released ids leave the cache, looked up one by one or by a sweep of the slots.
    #[test]
    fn a_purge_drops_exactly_the_released_ids() {
        for released in [vec![3u64], (1..=16).filter(|i| i % 2 == 1).collect()] {
            let mut c = cache(16);
            for id in 1..=16u64 {
                c.insert_copy(id, 0, &[id as u8; BLOCK]);
            }
            let free = |id: u64| released.contains(&id);
            c.purge(&released, free);
            for id in 1..=16u64 {
                assert_eq!(c.contains(id), !released.contains(&id), "id {id}");
            }
            // Their slots take the next blocks.
            assert_eq!(c.free.len(), released.len());
        }
    }
}
