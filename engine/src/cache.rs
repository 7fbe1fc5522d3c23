//! Per-shard DRAM cache of plaintext 4 KiB blocks, keyed by block id and checked against the
//! id's generation. Blocks read from the device are slices of the buffer they arrived in (a read
//! buffer, a decompressed group); written blocks are copied in by the shard. CLOCK eviction over
//! a fixed array of slots.

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(32);
    }
}

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// A place for one cached block. Free slots (`id` 0) may still hold the buffer of the block
/// they held, for the next copy.
struct Slot {
    id: u64,
    generation: u32,
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
    pub hits: u64,
    pub misses: u64,
}

impl BlockCache {
    /// Whether this cache holds nothing ever (`--cache-size=0`).
    pub fn is_off(&self) -> bool {
        self.capacity_blocks == 0
    }

    pub fn new(capacity_bytes: u64) -> Self {
        BlockCache {
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

    /// The cached plaintext of block `id` at `generation`, if present.
    pub fn get(&mut self, id: u64, generation: u32) -> Option<&Bytes> {
        self.lookup(id, generation, true)
    }

    /// Like [`BlockCache::get`], but a miss is not counted (the caller falls back to a path that
    /// looks again and counts it).
    pub fn get_if_cached(&mut self, id: u64, generation: u32) -> Option<&Bytes> {
        self.lookup(id, generation, false)
    }

    fn lookup(&mut self, id: u64, generation: u32, count_miss: bool) -> Option<&Bytes> {
        match self.map.get(&id).map(|&i| i as usize) {
            Some(i) if self.slots[i].generation == generation => {
                self.hits += 1;
                let s = &mut self.slots[i];
                s.referenced = true;
                Some(&s.data)
            }
            _ => {
                self.misses += u64::from(count_miss);
                None
            }
        }
    }

    /// The cached plaintext of `id` at `generation`, neither marked as used nor counted: for
    /// the cleaner, whose look-ups say nothing about what clients read next.
    pub fn peek(&self, id: u64, generation: u32) -> Option<Bytes> {
        let &i = self.map.get(&id)?;
        let s = &self.slots[i as usize];
        (s.generation == generation).then(|| s.data.clone())
    }

    /// Whether block `id` at `generation` is cached (no hit or miss counted).
    pub fn contains(&self, id: u64, generation: u32) -> bool {
        self.map
            .get(&id)
            .is_some_and(|&i| self.slots[i as usize].generation == generation)
    }

    /// Cache `data` (one 4 KiB block) as the contents of `id` at `generation`.
    pub fn insert(&mut self, id: u64, generation: u32, data: Bytes) {
        if self.capacity_blocks == 0 || data.len() != BLOCK {
            return;
        }
        let i = self.slot_for(id);
        let old = std::mem::replace(&mut self.slots[i].data, data);
        let owned = std::mem::replace(&mut self.slots[i].owned, false);
        self.recycle(owned, old);
        self.fill(i, id, generation);
    }

    /// Whether a new block can be cached without evicting another.
    pub fn has_room(&self) -> bool {
        self.capacity_blocks > 0
            && (!self.free.is_empty() || self.slots.len() < self.capacity_blocks)
    }

    /// Cache a copy of `data` (one 4 KiB block), in a buffer of a dropped copy when one is
    /// free. For data whose own buffer must not be kept (a client's write: it may hold more).
    pub fn insert_copy(&mut self, id: u64, generation: u32, data: &[u8]) {
        if self.capacity_blocks == 0 || data.len() != BLOCK {
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
        self.fill(i, id, generation);
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

    fn fill(&mut self, i: usize, id: u64, generation: u32) {
        let s = &mut self.slots[i];
        s.generation = generation;
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
                generation: 0,
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

    #[test]
    fn evicted_copies_are_reused_but_never_under_a_reader() {
        let mut c = BlockCache::new(2 * BLOCK as u64);
        c.insert_copy(1, 0, &[1; BLOCK]);
        c.insert_copy(2, 0, &[2; BLOCK]);
        let held = c.get(1, 0).expect("cached").clone();
        // Evicts 2 (1 was read), then 1 (a reader holds it: not reused), then 3.
        c.insert_copy(3, 0, &[3; BLOCK]);
        c.insert_copy(4, 0, &[4; BLOCK]);
        c.insert_copy(5, 0, &[5; BLOCK]);
        assert_eq!(&held[..], &[1; BLOCK][..]);
        assert!(c.get(1, 0).is_none() && c.get(2, 0).is_none());
        for id in [4u8, 5] {
            assert_eq!(
                &c.get(u64::from(id), 0).expect("cached")[..],
                &[id; BLOCK][..]
            );
        }
        // A replaced entry's buffer is reused too, and the generation is checked.
        c.insert_copy(5, 1, &[6; BLOCK]);
        assert!(c.get(5, 0).is_none());
        assert_eq!(&c.get(5, 1).expect("cached")[..], &[6; BLOCK][..]);
        // Blocks kept by reference are never reused.
        let shared = Bytes::from(vec![7; 2 * BLOCK]);
        c.insert(6, 0, shared.slice(..BLOCK));
        c.insert_copy(7, 0, &[8; BLOCK]);
        c.insert_copy(8, 0, &[9; BLOCK]);
        assert_eq!(&shared[..BLOCK], &[7; BLOCK][..]);
    }

    #[test]
    fn forgotten_blocks_free_their_slot_for_the_next() {
        let mut c = BlockCache::new(4 * BLOCK as u64);
        // An overwrite workload: each new block kills the previous one.
        for id in 1..=10_000u64 {
            c.insert_copy(id, 0, &[id as u8; BLOCK]);
            c.forget(id - 1);
        }
        assert_eq!((c.map.len(), c.slots.len()), (1, 2));
        assert_eq!(&c.get(10_000, 0).expect("cached")[..], &[16; BLOCK][..]);
        // Full: the hand passes over read blocks once, then evicts the oldest unread one.
        for id in [5u64, 6, 7] {
            c.insert_copy(id, 1, &[id as u8; BLOCK]);
        }
        assert!(c.get(10_000, 0).is_some());
        c.insert_copy(9, 0, &[9; BLOCK]);
        assert!(c.get(10_000, 0).is_some() && c.get(9, 0).is_some());
        assert_eq!(
            [5u64, 6, 7]
                .iter()
                .filter(|&&id| c.get(id, 1).is_some())
                .count(),
            2
        );
        // A forgotten block is a miss at once; its slot takes the next block.
        c.forget(9);
        assert!(c.get(9, 0).is_none());
        c.insert_copy(11, 0, &[11; BLOCK]);
        assert_eq!(c.slots.len(), 4);
        assert_eq!(&c.get(11, 0).expect("cached")[..], &[11; BLOCK][..]);
    }
}
