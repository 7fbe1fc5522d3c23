//! The LBA map of a volume: 4 KiB block number -> block id (0 = hole).
//!
//! Pages of 512 entries are allocated on first write and shared copy-on-write (`Arc`) so that a
//! checkpoint's image costs one pointer per page, not a copy.
//!
//! Snapshots and clones share pages too: a leaf counts the volume maps that hold it (`users`),
//! and a block's reference count counts the distinct leaves that point at it, not the volumes
//! (docs/design/paged-metadata.md §7.2). Copying a volume then adds one user per leaf instead of
//! one reference per block, and the first write to a shared leaf gives the writer its own copy,
//! which adds a reference to each block the copy points at.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::format::{PagePtr, MAP_PAGE_ENTRIES};

pub type MapPage = [u64; MAP_PAGE_ENTRIES as usize];

/// A page of a map, and how many volume maps hold it.
#[derive(Debug)]
pub struct MapLeaf {
    ids: MapPage,
    /// Volume maps holding this leaf (images of checkpoints do not count). Changed only by the
    /// shard that owns the leaf's index, or with every shard paused.
    users: AtomicU32,
    /// Where a committed format 3 checkpoint holds this leaf as it is (absent: changed since,
    /// or never written). Set by the checkpointer once the checkpoint that wrote it is
    /// committed, on the image's `Arc`, which a map shares only while it does not change it:
    /// a change copies the leaf (`Arc::make_mut` while the image holds it) or, once the image
    /// is gone, clears this in place. The next checkpoint names the page again instead of
    /// rewriting it.
    at: parking_lot::Mutex<PagePtr>,
}

impl MapLeaf {
    pub fn new(ids: MapPage) -> MapLeaf {
        MapLeaf {
            ids,
            users: AtomicU32::new(1),
            at: parking_lot::Mutex::new(PagePtr::ABSENT),
        }
    }

    /// A leaf no map holds yet (read from a checkpoint: each volume that names it adds itself).
    pub(crate) fn unheld(ids: MapPage) -> MapLeaf {
        MapLeaf {
            users: AtomicU32::new(0),
            ..MapLeaf::new(ids)
        }
    }

    /// Where a committed checkpoint holds it unchanged, if one does.
    pub(crate) fn written_at(&self) -> Option<PagePtr> {
        Some(*self.at.lock()).filter(|p| !p.is_absent())
    }

    /// A committed checkpoint holds it at `at`.
    pub(crate) fn set_written_at(&self, at: PagePtr) {
        *self.at.lock() = at;
    }

    /// One more map holds it.
    pub(crate) fn add_user(&self) {
        self.users.fetch_add(1, Ordering::Relaxed);
    }

    /// Volume maps holding this leaf.
    pub fn users(&self) -> u32 {
        self.users.load(Ordering::Relaxed)
    }
}

impl Clone for MapLeaf {
    /// A copy for the same maps (a checkpoint's image held the original): same users.
    fn clone(&self) -> MapLeaf {
        MapLeaf {
            ids: self.ids,
            users: AtomicU32::new(self.users()),
            at: parking_lot::Mutex::new(PagePtr::ABSENT),
        }
    }
}

impl std::ops::Deref for MapLeaf {
    type Target = MapPage;
    fn deref(&self) -> &MapPage {
        &self.ids
    }
}

/// Let go of a map's hold on `leaf`; the last holder drops a reference for each block in it.
fn release(leaf: &MapLeaf, drop_ref: &mut dyn FnMut(u64)) {
    if leaf.users.fetch_sub(1, Ordering::Relaxed) == 1 {
        for &id in leaf.ids.iter().filter(|&&id| id != 0) {
            drop_ref(id);
        }
    }
}

/// Map pages of one volume that one shard owns (pages `p` with `p % shards == shard`); the
/// vector is indexed by the global page number.
#[derive(Clone, Default)]
pub struct LbaMap {
    /// Change through `set`, `load_page` and `resize`, which keep `present` in step.
    pub pages: Vec<Option<Arc<MapLeaf>>>,
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
    pub fn ram_bytes(&self, seen: &mut std::collections::HashSet<*const MapLeaf>) -> u64 {
        // A page's `Arc` allocation: two counts, then the page.
        let page = (std::mem::size_of::<MapLeaf>() + 2 * std::mem::size_of::<usize>()) as u64;
        let slots = (self.pages.capacity() * std::mem::size_of::<Option<Arc<MapLeaf>>>()) as u64;
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
    pub fn load_page(&mut self, idx: usize, page: Arc<MapLeaf>) -> bool {
        let Some(slot) = self.pages.get_mut(idx) else {
            return false;
        };
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

    /// The entry at `lba`, and whether its leaf is held by other maps too.
    pub fn get_shared(&self, lba: u64) -> (u64, bool) {
        let (p, i) = split(lba);
        match self.pages.get(p) {
            Some(Some(page)) => (page[i], page.users() > 1),
            _ => (0, false),
        }
    }

    /// Set an entry, returning the previous block id (0 for a hole). A leaf other volumes
    /// share is copied first, and the copy's blocks get a reference each (`add_ref`).
    pub fn set(&mut self, lba: u64, id: u64, add_ref: &mut dyn FnMut(u64)) -> u64 {
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
        if id != 0 || slot.is_some() {
            if slot.is_none() {
                self.present += 1;
            }
            let page =
                slot.get_or_insert_with(|| Arc::new(MapLeaf::new([0; MAP_PAGE_ENTRIES as usize])));
            if page.users() > 1 {
                let own = MapLeaf::new(page.ids);
                page.users.fetch_sub(1, Ordering::Relaxed);
                for &b in own.ids.iter().filter(|&&b| b != 0) {
                    add_ref(b);
                }
                *page = Arc::new(own);
            }
            let leaf = Arc::make_mut(page);
            leaf.ids[i] = id;
            *leaf.at.get_mut() = PagePtr::ABSENT;
        }
        match (old, id) {
            (0, _) => self.mapped += 1,
            (_, 0) => self.mapped -= 1,
            _ => {}
        }
        old
    }

    /// Resize to `blocks` entries. Entries past the new end are dropped (`drop_ref` for each
    /// block no longer referenced), leaves past it released; a shared last leaf is copied
    /// first (`add_ref`, as in [`LbaMap::set`]).
    pub fn resize(
        &mut self,
        blocks: u64,
        add_ref: &mut dyn FnMut(u64),
        drop_ref: &mut dyn FnMut(u64),
    ) {
        let keep = blocks.div_ceil(MAP_PAGE_ENTRIES) as usize;
        let kept_end = (keep.min(self.pages.len()) as u64) * MAP_PAGE_ENTRIES;
        for lba in blocks..kept_end {
            let id = self.set(lba, 0, add_ref);
            if id != 0 {
                drop_ref(id);
            }
        }
        if keep < self.pages.len() {
            for leaf in self.pages.drain(keep..).flatten() {
                self.present -= 1;
                self.mapped -= count(&leaf);
                release(&leaf, drop_ref);
            }
        }
        self.pages.resize(keep, None);
    }

    /// A map holding the same leaves (a snapshot or clone): one more user per leaf, no block
    /// reference added.
    pub fn share(&self) -> LbaMap {
        for leaf in self.pages.iter().flatten() {
            leaf.users.fetch_add(1, Ordering::Relaxed);
        }
        self.clone()
    }

    /// Let go of every leaf (the volume is deleted): `drop_ref` for each block of the leaves
    /// no other map holds.
    pub fn release_all(&mut self, drop_ref: &mut dyn FnMut(u64)) {
        for leaf in std::mem::take(&mut self.pages).into_iter().flatten() {
            release(&leaf, drop_ref);
        }
        *self = LbaMap::default();
    }

    /// Iterate (lba, block id) over mapped entries.
    #[cfg(test)]
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

/// Entries of a page that are not holes.
fn count(p: &MapPage) -> u64 {
    p.iter().filter(|&&id| id != 0).count() as u64
}

fn split(lba: u64) -> (usize, usize) {
    (
        (lba / MAP_PAGE_ENTRIES) as usize,
        (lba % MAP_PAGE_ENTRIES) as usize,
    )
}

/// Map leaves (2 MiB each) a volume of `size_bytes` has room for: its leaf directory's length.
pub(crate) fn leaf_slots(size_bytes: u64) -> u64 {
    size_bytes
        .div_ceil(crate::api::BLOCK_BYTES)
        .div_ceil(MAP_PAGE_ENTRIES)
}

/// The shard that owns a block of a volume.
pub fn shard_of(lba: u64, shards: usize) -> usize {
    ((lba / MAP_PAGE_ENTRIES) % shards as u64) as usize
}

/// Clear `lba..lba+count` in the pages of `map` that `shard` owns, calling `freed` for each
/// block id removed (and `add_ref` as [`LbaMap::set`] does). Cost is per page, not per block,
/// for pages that are holes already.
pub(crate) fn trim_owned(
    map: &mut LbaMap,
    lba: u64,
    count: u64,
    shard: usize,
    shards: usize,
    add_ref: &mut dyn FnMut(u64),
    mut freed: impl FnMut(u64),
) {
    let end = (lba + count).min(map.pages.len() as u64 * MAP_PAGE_ENTRIES);
    let mut pos = lba;
    while pos < end {
        let page = pos / MAP_PAGE_ENTRIES;
        let page_end = ((page + 1) * MAP_PAGE_ENTRIES).min(end);
        if shard_of(pos, shards) == shard && map.pages[page as usize].is_some() {
            for l in pos..page_end {
                let old = map.set(l, 0, add_ref);
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
    use std::collections::{HashMap, HashSet};

    fn counted(m: &LbaMap) -> u64 {
        m.pages.iter().filter(|p| p.is_some()).count() as u64
    }

    #[test]
    fn counts_follow_sets_loads_and_resizes() {
        let mut m = LbaMap::new(64 * MAP_PAGE_ENTRIES);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut none = |_| {};
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = x % (m.pages.len() as u64 * MAP_PAGE_ENTRIES + 8);
            match step % 97 {
                0 => {
                    m.resize((x >> 8) % (96 * MAP_PAGE_ENTRIES), &mut |_| {}, &mut |_| {});
                }
                1 => {
                    m.load_page(
                        (x >> 8) as usize % 80,
                        Arc::new(MapLeaf::new([7; MAP_PAGE_ENTRIES as usize])),
                    );
                }
                _ => {
                    m.set(lba, if x & 1 == 0 { 0 } else { step + 1 }, &mut none);
                }
            }
            assert_eq!(m.present_pages(), counted(&m), "step {step}");
            assert_eq!(m.mapped, m.iter().count() as u64, "step {step}");
        }
        assert!(m.present_pages() > 0);
    }

    /// A leaf remembers where a checkpoint wrote it only while it stays as written: a write to
    /// it, in place or to a copy (a checkpoint's image or a snapshot still holding it), leaves
    /// the map with a leaf that names no page, while the one the image holds keeps its place.
    #[test]
    fn a_changed_leaf_forgets_where_it_was_written() {
        let at = PagePtr {
            segment: 3,
            offset: 8192,
            stamp: 99,
        };
        let mut m = LbaMap::new(4 * MAP_PAGE_ENTRIES);
        let mut none = |_| {};
        m.set(5, 1, &mut none);
        let leaf = m.pages[0].clone().unwrap();
        leaf.set_written_at(at);
        drop(leaf);
        // Unchanged: still there; an entry set to what it holds changes nothing.
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), Some(at));
        m.set(5, 1, &mut none);
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), Some(at));
        // Changed in place (nothing else holds it).
        m.set(6, 2, &mut none);
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), None);
        // Changed while an image holds it: the map gets a copy without a place, the image's
        // leaf keeps its own.
        let image = m.pages[0].clone().unwrap();
        image.set_written_at(at);
        m.set(7, 3, &mut none);
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), None);
        assert_eq!(image.written_at(), Some(at));
        assert_eq!(image[7], 0);
        // Shared with a snapshot: the writer's copy has no place either.
        let snap = m.share();
        snap.pages[0].as_ref().unwrap().set_written_at(at);
        m.set(8, 4, &mut none);
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), None);
        assert_eq!(snap.pages[0].as_ref().unwrap().written_at(), Some(at));
    }

    /// Reference counts kept through the callbacks equal, at every step, the entries of the
    /// distinct leaves of all maps (what `Pool::check` recomputes): maps shared by snapshots,
    /// written (copying shared leaves), trimmed, resized and deleted at random.
    #[test]
    fn shared_leaves_count_each_block_once_per_leaf() {
        let blocks = 8 * MAP_PAGE_ENTRIES;
        let mut maps = vec![LbaMap::new(blocks)];
        let mut refs: HashMap<u64, i64> = HashMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..30_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let m = (x >> 40) as usize % maps.len();
            let lba = (x >> 8) % blocks;
            let mut add = |id: u64| *refs.entry(id).or_default() += 1;
            match step % 211 {
                0 if maps.len() < 6 => {
                    let copy = maps[m].share();
                    maps.push(copy);
                }
                1 if maps.len() > 1 => {
                    let mut gone = maps.swap_remove(m);
                    gone.release_all(&mut |id| *refs.entry(id).or_default() -= 1);
                }
                2 => {
                    let mut dropped = Vec::new();
                    maps[m].resize((x >> 20) % blocks, &mut add, &mut |id| dropped.push(id));
                    for id in dropped {
                        *refs.entry(id).or_default() -= 1;
                    }
                    maps[m].resize(blocks, &mut |_| {}, &mut |_| {});
                }
                _ => {
                    // Few distinct ids, so that leaves share blocks as well as being shared.
                    let id = if x & 3 == 0 { 0 } else { x % 50 + 1 };
                    if id != 0 {
                        add(id);
                    }
                    let old = maps[m].set(lba, id, &mut add);
                    if old != 0 {
                        *refs.entry(old).or_default() -= 1;
                    }
                }
            }
            let mut want: HashMap<u64, i64> = HashMap::new();
            let mut seen = HashSet::new();
            for leaf in maps.iter().flat_map(|m| m.pages.iter().flatten()) {
                if seen.insert(Arc::as_ptr(leaf)) {
                    for &id in leaf.iter().filter(|&&id| id != 0) {
                        *want.entry(id).or_default() += 1;
                    }
                }
            }
            refs.retain(|_, n| *n != 0);
            assert_eq!(refs, want, "step {step}");
            for leaf in maps.iter().flat_map(|m| m.pages.iter().flatten()) {
                let holders = maps
                    .iter()
                    .flat_map(|m| m.pages.iter().flatten())
                    .filter(|l| Arc::ptr_eq(l, leaf))
                    .count();
                assert_eq!(leaf.users() as usize, holders, "step {step}");
            }
        }
    }
}
