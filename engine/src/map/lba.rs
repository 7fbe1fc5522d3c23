//! The LBA map of a volume: 4 KiB block number -> block id (0 = hole).
//!
//! Pages of 512 entries are allocated on first write and shared copy-on-write (`Arc`) so that a
//! checkpoint snapshot (and later, snapshots of volumes) costs one pointer per page, not a copy.

use std::sync::Arc;

use crate::format::MAP_PAGE_ENTRIES;

pub type MapPage = [u64; MAP_PAGE_ENTRIES as usize];

/// Map pages of one volume that one shard owns (pages `p` with `p % shards == shard`); the
/// vector is indexed by the global page number.
#[derive(Clone, Default)]
pub struct LbaMap {
    /// Change through `set`, `load_page` and `resize`, which keep `present` in step.
    pub pages: Vec<Option<Arc<MapPage>>>,
    /// Entries that are not holes.
    pub mapped: u64,
    /// Pages allocated (`Some`): what a checkpoint of the map costs, which the space reserve
    /// is computed from on every segment roll-over (counting them walked every page).
    present: u64,
}

impl LbaMap {
    pub fn new(blocks: u64) -> Self {
        LbaMap {
            pages: vec![None; blocks.div_ceil(MAP_PAGE_ENTRIES) as usize],
            mapped: 0,
            present: 0,
        }
    }

    /// Bytes of RAM this map holds: its page slots, and each page `seen` does not hold yet
    /// (snapshots and clones share pages; pass one set over all of them).
    pub fn ram_bytes(&self, seen: &mut std::collections::HashSet<*const MapPage>) -> u64 {
        // A page's `Arc` allocation: two counts, then the page.
        let page = (std::mem::size_of::<MapPage>() + 2 * std::mem::size_of::<usize>()) as u64;
        let slots = (self.pages.capacity() * std::mem::size_of::<Option<Arc<MapPage>>>()) as u64;
        let pages = self
            .pages
            .iter()
            .flatten()
            .filter(|p| seen.insert(Arc::as_ptr(p)))
            .count() as u64;
        slots + pages * page
    }

    /// Pages allocated.
    pub fn present_pages(&self) -> u64 {
        self.present
    }

    /// Install page `idx` loaded from a checkpoint (ignored past the end), counting its
    /// entries; returns whether it was installed.
    pub fn load_page(&mut self, idx: usize, page: Arc<MapPage>) -> bool {
        let Some(slot) = self.pages.get_mut(idx) else {
            return false;
        };
        let count = |p: &MapPage| p.iter().filter(|&&id| id != 0).count() as u64;
        match slot {
            Some(old) => self.mapped -= count(old),
            None => self.present += 1,
        }
        self.mapped += count(&page);
        *slot = Some(page);
        true
    }

    pub fn get(&self, lba: u64) -> u64 {
        let (p, i) = split(lba);
        match self.pages.get(p) {
            Some(Some(page)) => page[i],
            _ => 0,
        }
    }

    /// Set an entry, returning the previous block id (0 for a hole).
    pub fn set(&mut self, lba: u64, id: u64) -> u64 {
        let (p, i) = split(lba);
        if p >= self.pages.len() {
            return 0;
        }
        let slot = &mut self.pages[p];
        let old = match slot {
            Some(page) => page[i],
            None => 0,
        };
        if old == id {
            return old;
        }
        if id != 0 {
            if slot.is_none() {
                self.present += 1;
            }
            let page = slot.get_or_insert_with(|| Arc::new([0; MAP_PAGE_ENTRIES as usize]));
            Arc::make_mut(page)[i] = id;
        } else if let Some(page) = slot {
            Arc::make_mut(page)[i] = 0;
        }
        match (old, id) {
            (0, _) => self.mapped += 1,
            (_, 0) => self.mapped -= 1,
            _ => {}
        }
        old
    }

    /// Resize to `blocks` entries, returning the block ids dropped past the new end.
    pub fn resize(&mut self, blocks: u64) -> Vec<u64> {
        let mut dropped = Vec::new();
        let old_len = self.pages.len() as u64 * MAP_PAGE_ENTRIES;
        for lba in blocks..old_len {
            let id = self.set(lba, 0);
            if id != 0 {
                dropped.push(id);
            }
        }
        let keep = blocks.div_ceil(MAP_PAGE_ENTRIES) as usize;
        if keep < self.pages.len() {
            self.present -= self.pages[keep..].iter().filter(|p| p.is_some()).count() as u64;
        }
        self.pages.resize(keep, None);
        dropped
    }

    /// Iterate (lba, block id) over mapped entries.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.iter().flat_map(move |page| {
                page.iter()
                    .enumerate()
                    .filter(|(_, &id)| id != 0)
                    .map(move |(i, &id)| (p as u64 * MAP_PAGE_ENTRIES + i as u64, id))
            })
        })
    }
}

fn split(lba: u64) -> (usize, usize) {
    (
        (lba / MAP_PAGE_ENTRIES) as usize,
        (lba % MAP_PAGE_ENTRIES) as usize,
    )
}

/// The shard that owns a block of a volume.
pub fn shard_of(lba: u64, shards: usize) -> usize {
    ((lba / MAP_PAGE_ENTRIES) % shards as u64) as usize
}

/// Clear `lba..lba+count` in the pages of `map` that `shard` owns, calling `freed` for each
/// block id removed. Cost is per page, not per block, for pages that are holes already.
pub(crate) fn trim_owned(
    map: &mut LbaMap,
    lba: u64,
    count: u64,
    shard: usize,
    shards: usize,
    mut freed: impl FnMut(u64),
) {
    let end = (lba + count).min(map.pages.len() as u64 * MAP_PAGE_ENTRIES);
    let mut pos = lba;
    while pos < end {
        let page = pos / MAP_PAGE_ENTRIES;
        let page_end = ((page + 1) * MAP_PAGE_ENTRIES).min(end);
        if shard_of(pos, shards) == shard && map.pages[page as usize].is_some() {
            for l in pos..page_end {
                let old = map.set(l, 0);
                if old != 0 {
                    freed(old);
                }
            }
        }
        pos = page_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(m: &LbaMap) -> u64 {
        m.pages.iter().filter(|p| p.is_some()).count() as u64
    }

    #[test]
    fn counts_follow_sets_loads_and_resizes() {
        let mut m = LbaMap::new(64 * MAP_PAGE_ENTRIES);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = x % (m.pages.len() as u64 * MAP_PAGE_ENTRIES + 8);
            match step % 97 {
                0 => {
                    m.resize((x >> 8) % (96 * MAP_PAGE_ENTRIES));
                }
                1 => {
                    m.load_page(
                        (x >> 8) as usize % 80,
                        Arc::new([7; MAP_PAGE_ENTRIES as usize]),
                    );
                }
                _ => {
                    m.set(lba, if x & 1 == 0 { 0 } else { step + 1 });
                }
            }
            assert_eq!(m.present_pages(), counted(&m), "step {step}");
            assert_eq!(m.mapped, m.iter().count() as u64, "step {step}");
        }
        assert!(m.present_pages() > 0);
    }
}
