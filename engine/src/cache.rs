//! Per-shard DRAM cache of plaintext 4 KiB blocks, keyed by block id and checked against the
//! id's generation. Entries point into the buffer they arrived in (a record just written, or a
//! block just read), so caching a write costs no copy. CLOCK eviction.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::io::AlignedBuf;

struct Entry {
    buf: Arc<AlignedBuf>,
    offset: u32,
    generation: u32,
    referenced: bool,
}

pub struct BlockCache {
    map: HashMap<u64, Entry>,
    clock: VecDeque<u64>,
    capacity_blocks: usize,
    pub hits: u64,
    pub misses: u64,
}

impl BlockCache {
    pub fn new(capacity_bytes: u64) -> Self {
        BlockCache {
            map: HashMap::new(),
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
    pub fn get(&mut self, id: u64, generation: u32) -> Option<&[u8]> {
        match self.map.get_mut(&id) {
            Some(e) if e.generation == generation => {
                self.hits += 1;
                e.referenced = true;
                let off = e.offset as usize;
                e.buf.get(off..off + 4096)
            }
            _ => {
                self.misses += 1;
                None
            }
        }
    }

    pub fn insert(&mut self, id: u64, generation: u32, buf: Arc<AlignedBuf>, offset: u32) {
        if self.capacity_blocks == 0 {
            return;
        }
        let e = Entry {
            buf,
            offset,
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
