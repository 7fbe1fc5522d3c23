//! Per-shard DRAM cache of plaintext 4 KiB blocks, keyed by block id and checked against the
//! id's generation. Blocks read from the device are slices of the buffer they arrived in (a read
//! buffer, a decompressed group); written blocks are copied in by the shard. CLOCK eviction.

use bytes::Bytes;
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
}

pub struct BlockCache {
    map: IdMap<Entry>,
    clock: VecDeque<u64>,
    capacity_blocks: usize,
    pub hits: u64,
    pub misses: u64,
}

impl BlockCache {
    pub fn new(capacity_bytes: u64) -> Self {
        BlockCache {
            map: IdMap::default(),
            clock: VecDeque::new(),
            capacity_blocks: (capacity_bytes / 4096) as usize,
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
        if self.capacity_blocks == 0 || data.len() != 4096 {
            return;
        }
        let e = Entry {
            data,
            generation,
            referenced: false,
        };
        if self.map.insert(id, e).is_none() {
            self.clock.push_back(id);
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
                    self.map.remove(&victim);
                }
                None => {}
            }
        }
    }
}
