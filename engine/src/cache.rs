//! Per-shard DRAM cache of plaintext 4 KiB blocks, keyed by block id and checked against the
//! id's generation. Blocks read from the device are slices of the buffer they arrived in (a read
//! buffer, a decompressed group); written blocks are copied in by the shard. CLOCK eviction.

use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
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

struct Entry {
    data: Bytes,
    generation: u32,
    referenced: bool,
    /// `data` is a buffer of the cache's own (a copy), which it may reuse once evicted.
    owned: bool,
}

const BLOCK: usize = 4096;
/// Evicted copies kept for reuse: in a full cache each insert evicts about one entry.
const SPARE_BUFFERS: usize = 32;

pub struct BlockCache {
    map: IdMap<Entry>,
    clock: VecDeque<u64>,
    capacity_blocks: usize,
    /// Buffers of evicted copies no reader holds any more, for the next copies: allocating
    /// and freeing one per written block cost a tenth of the shards' CPU in glibc.
    spare: Vec<BytesMut>,
    pub hits: u64,
    pub misses: u64,
}

impl BlockCache {
    pub fn new(capacity_bytes: u64) -> Self {
        BlockCache {
            map: IdMap::default(),
            clock: VecDeque::new(),
            capacity_blocks: (capacity_bytes / 4096) as usize,
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
        match self.map.get_mut(&id) {
            Some(e) if e.generation == generation => {
                self.hits += 1;
                e.referenced = true;
                Some(&e.data)
            }
            _ => {
                self.misses += u64::from(count_miss);
                None
            }
        }
    }

    /// Whether block `id` at `generation` is cached (no hit or miss counted).
    pub fn contains(&self, id: u64, generation: u32) -> bool {
        self.map
            .get(&id)
            .is_some_and(|e| e.generation == generation)
    }

    /// Cache `data` (one 4 KiB block) as the contents of `id` at `generation`.
    pub fn insert(&mut self, id: u64, generation: u32, data: Bytes) {
        if self.capacity_blocks == 0 || data.len() != BLOCK {
            return;
        }
        self.put(id, data, generation, false);
    }

    /// Cache a copy of `data` (one 4 KiB block), in a buffer of an evicted copy when one is
    /// free. For data whose own buffer must not be kept (a client's write: it may hold more).
    pub fn insert_copy(&mut self, id: u64, generation: u32, data: &[u8]) {
        if self.capacity_blocks == 0 || data.len() != BLOCK {
            return;
        }
        let mut buf = self
            .spare
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(BLOCK));
        buf.clear();
        buf.extend_from_slice(data);
        self.put(id, buf.freeze(), generation, true);
    }

    fn put(&mut self, id: u64, data: Bytes, generation: u32, owned: bool) {
        let e = Entry {
            data,
            generation,
            referenced: false,
            owned,
        };
        match self.map.insert(id, e) {
            None => self.clock.push_back(id),
            Some(old) => self.recycle(old),
        }
        while self.map.len() > self.capacity_blocks {
            let Some(victim) = self.clock.pop_front() else {
                break;
            };
            match self.map.get_mut(&victim) {
                Some(e) if e.referenced => {
                    e.referenced = false;
                    self.clock.push_back(victim);
                }
                Some(_) => {
                    if let Some(e) = self.map.remove(&victim) {
                        self.recycle(e);
                    }
                }
                None => {}
            }
        }
    }

    fn recycle(&mut self, e: Entry) {
        if e.owned && self.spare.len() < SPARE_BUFFERS {
            // Fails while a reader still holds the block; it is then freed with its last clone.
            if let Ok(buf) = e.data.try_into_mut() {
                self.spare.push(buf);
            }
        }
    }
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
}
