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

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::format::{PagePtr, MAP_PAGE_ENTRIES};
use crate::meta::cache::{Evictable, Evicted, MetaCache};

pub type MapPage = [u64; MAP_PAGE_ENTRIES as usize];

/// A leaf's entries (absent while evicted) and where a committed checkpoint holds them.
struct LeafState {
    ids: Option<Box<MapPage>>,
    /// Where a committed format 3 checkpoint holds this leaf as it is (absent: changed since,
    /// or never written). Set by the checkpointer once the checkpoint that wrote it is
    /// committed, on the image's `Arc`, which a map shares only while it does not change it:
    /// a change copies the leaf while the image holds it or, once the image is gone, clears
    /// this in place. The next checkpoint names the page again instead of rewriting it, and
    /// only a leaf with a page may give its entries back (`meta::cache`).
    at: PagePtr,
}

/// A page of a map, and how many volume maps hold it. Its entries may be evicted and read
/// back from its page (`meta::cache`); the rest stays in RAM.
pub struct MapLeaf {
    state: Mutex<LeafState>,
    /// Entries that are not holes (known while the entries are evicted).
    count: AtomicU32,
    /// Volume maps holding this leaf (images of checkpoints do not count). Changed only by the
    /// shard that owns the leaf's index, or with every shard paused.
    users: AtomicU32,
    /// Used since the cache's hand last passed it.
    referenced: AtomicBool,
    /// The cache that counts it, once a map took it.
    cache: OnceLock<Arc<MetaCache>>,
}

impl std::fmt::Debug for MapLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapLeaf")
            .field("count", &self.count())
            .field("users", &self.users())
            .field("at", &self.written_at())
            .finish()
    }
}

impl MapLeaf {
    pub fn new(ids: MapPage) -> MapLeaf {
        MapLeaf::boxed(Box::new(ids))
    }

    fn boxed(ids: Box<MapPage>) -> MapLeaf {
        MapLeaf {
            count: AtomicU32::new(count(&ids) as u32),
            state: Mutex::new(LeafState {
                ids: Some(ids),
                at: PagePtr::ABSENT,
            }),
            users: AtomicU32::new(1),
            referenced: AtomicBool::new(true),
            cache: OnceLock::new(),
        }
    }

    /// A leaf no map holds yet, read from a checkpoint that holds it at `at` (each volume
    /// that names it adds itself).
    pub(crate) fn unheld(ids: Box<MapPage>, at: PagePtr) -> MapLeaf {
        let mut leaf = MapLeaf::boxed(ids);
        leaf.users.store(0, Ordering::Relaxed);
        leaf.state.get_mut().at = at;
        leaf
    }

    /// A leaf a checkpoint holds at `at` with `count` entries that are not holes, its entries
    /// left there (read when used), held by no map yet.
    pub(crate) fn on_page(count: u64, at: PagePtr) -> MapLeaf {
        MapLeaf {
            count: AtomicU32::new(count as u32),
            state: Mutex::new(LeafState { ids: None, at }),
            users: AtomicU32::new(0),
            referenced: AtomicBool::new(false),
            cache: OnceLock::new(),
        }
    }

    /// Entries read ahead of their use from the page at `at`: taken if the leaf is still
    /// evicted there (returns whether they were).
    pub(crate) fn take_prefetched(&self, ids: Box<MapPage>, at: PagePtr) -> bool {
        let mut st = self.state.lock();
        if st.ids.is_some() || st.at != at || count(&ids) != self.count() {
            return false;
        }
        st.ids = Some(ids);
        self.referenced.store(true, Ordering::Relaxed);
        true
    }

    /// Where its page is, if its entries are evicted.
    pub(crate) fn evicted_at(&self) -> Option<PagePtr> {
        let st = self.state.lock();
        Some(st.at).filter(|p| st.ids.is_none() && !p.is_absent())
    }

    /// Entries that are not holes.
    pub fn count(&self) -> u64 {
        u64::from(self.count.load(Ordering::Relaxed))
    }

    /// The entries, read back from the leaf's page if they were evicted (`idx`: the leaf's
    /// index in its maps, which its page is bound to).
    pub(crate) fn read(&self, idx: u64) -> Result<MappedMutexGuard<'_, MapPage>> {
        let st = self.loaded(idx)?;
        Ok(MutexGuard::map(st, |s| {
            &mut **s.ids.as_mut().expect("loaded above")
        }))
    }

    /// Run `f` on the entries; evicted ones are read from the page and not kept (for walks
    /// over every leaf: `stats`, check, checkpoints). Neither a hit nor a use for the cache.
    /// The read is made without the leaf's lock (a shard that needs the leaf meanwhile does
    /// not wait for it); should it fail while the leaf changed or moved, it is made again.
    pub(crate) fn with_entries<R>(&self, idx: u64, f: impl FnOnce(&MapPage) -> R) -> Result<R> {
        loop {
            let st = self.state.lock();
            if let Some(ids) = &st.ids {
                return Ok(f(ids));
            }
            let at = st.at;
            drop(st);
            let c = self.cache.get().ok_or(Error::Corrupt {
                what: "map leaf without entries",
            })?;
            match c.read_page(idx, at) {
                Ok(ids) => {
                    // As a load checks it, while the leaf is still evicted there.
                    let st = self.state.lock();
                    if st.ids.is_none() && st.at == at && count(&ids) != self.count() {
                        return Err(Error::Corrupt {
                            what: "map leaf page (entries set differ from its count)",
                        });
                    }
                    drop(st);
                    return Ok(f(&ids));
                }
                Err(e) => {
                    let st = self.state.lock();
                    if st.ids.is_none() && st.at == at {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// The entries (tests).
    #[cfg(test)]
    pub(crate) fn ids(&self) -> MapPage {
        *self.read(0).expect("entries in RAM")
    }

    /// Run `f` on the entries if they are in RAM (never reads).
    pub(crate) fn with_resident<R>(&self, f: impl FnOnce(&MapPage) -> R) -> Option<R> {
        self.state.lock().ids.as_deref().map(f)
    }

    /// Entry `i`, and whether the entries were in RAM (a hit).
    fn get_counted(&self, idx: u64, i: usize) -> Result<(u64, bool)> {
        let (st, hit) = self.loaded_hit(idx)?;
        Ok((st.ids.as_ref().expect("loaded")[i], hit))
    }

    /// The state with the entries in RAM.
    fn loaded(&self, idx: u64) -> Result<MutexGuard<'_, LeafState>> {
        Ok(self.loaded_hit(idx)?.0)
    }

    /// The state with the entries in RAM, and whether they were (a hit).
    fn loaded_hit(&self, idx: u64) -> Result<(MutexGuard<'_, LeafState>, bool)> {
        self.referenced.store(true, Ordering::Relaxed);
        let mut st = self.state.lock();
        if st.ids.is_some() {
            return Ok((st, true));
        }
        let c = self.cache.get().ok_or(Error::Corrupt {
            what: "map leaf without entries",
        })?;
        st.ids = Some(if self.count() == 0 {
            // All holes: nothing to read.
            c.zeroed()
        } else {
            let ids = c.load(idx, st.at)?;
            // The count came with the leaf's pointer (an open takes it from the directory),
            // or was the page's when it was evicted: entries that disagree are not this leaf's.
            if count(&ids) != self.count() {
                return Err(Error::Corrupt {
                    what: "map leaf page (entries set differ from its count)",
                });
            }
            ids
        });
        // Trimming takes other leaves' locks with `try_lock` only: holding this one is safe.
        c.loaded();
        Ok((st, false))
    }

    /// Set entry `i` in place (the caller owns the leaf: no image or other map holds it);
    /// returns the entry it held and whether the entries were in RAM.
    fn put(&self, idx: u64, i: usize, id: u64) -> Result<(u64, bool)> {
        let (mut st, hit) = self.loaded_hit(idx)?;
        let ids = st.ids.as_mut().expect("loaded above");
        let old = std::mem::replace(&mut ids[i], id);
        // Changed only under the leaf's lock: a load and a store.
        let n = self.count.load(Ordering::Relaxed);
        self.count
            .store(moved_count(u64::from(n), old, id) as u32, Ordering::Relaxed);
        if old != id {
            st.at = PagePtr::ABSENT;
        }
        Ok((old, hit))
    }

    /// A copy for the same maps (a checkpoint's image or a snapshot held the original): same
    /// users, no page.
    fn copy(&self, idx: u64) -> Result<MapLeaf> {
        let ids = Box::new(*self.read(idx)?);
        let leaf = MapLeaf::boxed(ids);
        leaf.users.store(self.users(), Ordering::Relaxed);
        Ok(leaf)
    }

    /// Where a committed checkpoint holds it unchanged, if one does.
    pub(crate) fn written_at(&self) -> Option<PagePtr> {
        Some(self.state.lock().at).filter(|p| !p.is_absent())
    }

    /// A committed checkpoint holds it at `at`.
    pub(crate) fn set_written_at(&self, at: PagePtr) {
        self.state.lock().at = at;
    }

    /// One more map holds it.
    pub(crate) fn add_user(&self) {
        self.users.fetch_add(1, Ordering::Relaxed);
    }

    /// Volume maps holding this leaf.
    pub fn users(&self) -> u32 {
        self.users.load(Ordering::Relaxed)
    }

    pub(crate) fn has_entries(&self) -> bool {
        self.state.lock().ids.is_some()
    }
}

/// A map took `leaf`: `cache` counts it from now on (unless a cache does already).
fn admit(cache: &Arc<MetaCache>, leaf: &Arc<MapLeaf>) {
    if leaf.cache.set(cache.clone()).is_ok() {
        let weak: Weak<dyn Evictable> = Arc::downgrade(leaf) as Weak<MapLeaf>;
        cache.admit(weak, leaf.has_entries());
    }
}

impl Evictable for MapLeaf {
    fn take_referenced(&self) -> bool {
        self.referenced.swap(false, Ordering::Relaxed)
    }

    fn evict(&self) -> Evicted {
        let Some(mut st) = self.state.try_lock() else {
            return Evicted::No;
        };
        if st.ids.is_none() {
            return Evicted::No;
        }
        if st.at.is_absent() {
            return Evicted::Dirty;
        }
        st.ids = None;
        Evicted::Yes
    }
}

impl Drop for MapLeaf {
    fn drop(&mut self) {
        if let Some(c) = self.cache.get() {
            c.dropped(self.state.get_mut().ids.is_some());
        }
    }
}

/// Let go of a map's hold on `leaf` (at index `idx`); the last holder drops a reference for
/// each block in it, reading its entries back first if they were evicted (nothing changes if
/// that fails).
fn release(leaf: &MapLeaf, idx: u64, drop_ref: &mut dyn FnMut(u64)) -> Result<()> {
    if leaf.users() == 1 {
        if leaf.count() > 0 {
            // Read back without being kept: the leaf is going.
            leaf.with_entries(idx, |ids| {
                for &id in ids.iter().filter(|&&id| id != 0) {
                    drop_ref(id);
                }
            })?;
        }
        leaf.users.store(0, Ordering::Relaxed);
    } else {
        leaf.users.fetch_sub(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Map pages of one volume that one shard owns (pages `p` with `p % shards == shard`); the
/// vector is indexed by the global page number.
#[derive(Default)]
pub struct LbaMap {
    /// Change through `set`, `load_page` and `resize`, which keep `present` in step.
    pub pages: Vec<Option<Arc<MapLeaf>>>,
    /// Entries that are not holes.
    pub mapped: u64,
    /// Pages allocated (`Some`): what a checkpoint of the map costs, which the space reserve
    /// is computed from on every segment roll-over (counting them walked every page).
    present: u64,
    /// Counts the leaves and holds their entries under a budget.
    cache: Arc<MetaCache>,
    /// Look-ups that found their leaf's entries in RAM (the cache counts the reads back).
    /// Changed under the map's lock: a load and a store, no atomic read-modify-write, as a
    /// counter shared by every map would cost each look-up.
    hits: AtomicU64,
}

impl Clone for LbaMap {
    fn clone(&self) -> LbaMap {
        LbaMap {
            pages: self.pages.clone(),
            mapped: self.mapped,
            present: self.present,
            cache: self.cache.clone(),
            hits: AtomicU64::new(0),
        }
    }
}

impl LbaMap {
    #[cfg(test)]
    pub fn new(blocks: u64) -> Self {
        LbaMap::cached(blocks, Arc::default())
    }

    /// A map whose leaves `cache` counts.
    pub(crate) fn cached(blocks: u64, cache: Arc<MetaCache>) -> Self {
        LbaMap {
            pages: vec![None; blocks.div_ceil(MAP_PAGE_ENTRIES) as usize],
            mapped: 0,
            present: 0,
            cache,
            hits: AtomicU64::new(0),
        }
    }

    /// Bytes of RAM this map holds outside the metadata cache: its page slots, and the stub
    /// of each leaf `seen` does not hold yet (snapshots and clones share leaves; pass one set
    /// over all of them). The entries a leaf holds are the cache's.
    pub fn ram_bytes(&self, seen: &mut std::collections::HashSet<*const MapLeaf>) -> u64 {
        // A leaf's `Arc` allocation: two counts, then the stub.
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
            Some(old) => self.mapped -= old.count(),
            None => self.present += 1,
        }
        self.mapped += page.count();
        admit(&self.cache, &page);
        *slot = Some(page);
        true
    }

    /// Look-ups that found their leaf's entries in RAM so far.
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The entry of leaf `page` (index `p`), counting a hit.
    fn entry(&self, page: &MapLeaf, p: usize, i: usize) -> Result<u64> {
        let (id, hit) = page.get_counted(p as u64, i)?;
        if hit {
            self.hit();
        }
        Ok(id)
    }

    fn hit(&self) {
        self.hits
            .store(self.hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub fn get(&self, lba: u64) -> Result<u64> {
        let (p, i) = split(lba);
        match self.pages.get(p) {
            Some(Some(page)) => self.entry(page, p, i),
            _ => Ok(0),
        }
    }

    /// The entry at `lba` if its leaf's entries are in RAM, counted as a use and a hit
    /// (`None`: evicted); never reads. For a reader that sends a miss to the shard instead.
    pub(crate) fn get_if_resident(&self, lba: u64) -> Option<u64> {
        let (p, i) = split(lba);
        let Some(Some(page)) = self.pages.get(p) else {
            return Some(0);
        };
        page.referenced.store(true, Ordering::Relaxed);
        let id = match &page.state.lock().ids {
            Some(ids) => ids[i],
            // Evicted holes: nothing to read for them either.
            None if page.count() == 0 => 0,
            None => return None,
        };
        self.hit();
        Some(id)
    }

    /// The entry at `lba` if its leaf's entries are in RAM (`None`: evicted), and whether its
    /// leaf is held by other maps too; never reads. For checks made under the space lock.
    pub(crate) fn get_shared_resident(&self, lba: u64) -> Option<(u64, bool)> {
        let (p, i) = split(lba);
        match self.pages.get(p) {
            Some(Some(page)) => {
                let id = page.state.lock().ids.as_ref().map(|ids| ids[i])?;
                Some((id, page.users() > 1))
            }
            _ => Some((0, false)),
        }
    }

    /// The leaves of `first..=last` whose entries are evicted: (index, leaf, its page), for a
    /// read through a shard's queue ([`MapLeaf::take_prefetched`] takes it in). Never reads.
    pub(crate) fn evicted_in(&self, first: u64, last: u64) -> Vec<(u64, Arc<MapLeaf>, PagePtr)> {
        let (lo, hi) = (first / MAP_PAGE_ENTRIES, last / MAP_PAGE_ENTRIES);
        (lo..=hi)
            .filter_map(|p| {
                let leaf = self.pages.get(p as usize)?.as_ref()?;
                Some((p, leaf.clone(), leaf.evicted_at()?))
            })
            .collect()
    }

    /// Have the entries of `lba`'s leaf in RAM (read back if evicted) without a look-up: a
    /// step before one made under a lock that must not wait for a read.
    pub(crate) fn fetch(&self, lba: u64) -> Result<()> {
        let (p, _) = split(lba);
        if let Some(Some(page)) = self.pages.get(p) {
            drop(page.read(p as u64)?);
        }
        Ok(())
    }

    /// Set an entry, returning the previous block id (0 for a hole). A leaf other volumes
    /// share is copied first, and the copy's blocks get a reference each (`add_ref`). On an
    /// error (an evicted leaf that cannot be read back) nothing changed.
    pub fn set(&mut self, lba: u64, id: u64, add_ref: &mut dyn FnMut(u64)) -> Result<u64> {
        let (p, i) = split(lba);
        if p >= self.pages.len() {
            return Ok(0);
        }
        // Owned by this map alone: changed in place under one lock of the leaf.
        if let Some(page) = &self.pages[p] {
            if page.users() == 1 && Arc::strong_count(page) == 1 {
                let (old, hit) = page.put(p as u64, i, id)?;
                if hit {
                    self.hit();
                }
                self.mapped = moved_count(self.mapped, old, id);
                return Ok(old);
            }
        }
        let old = match &self.pages[p] {
            Some(page) => self.entry(page, p, i)?,
            None => 0,
        };
        let slot = &mut self.pages[p];
        if old == id {
            return Ok(old);
        }
        match slot {
            None => {
                let mut ids = [0; MAP_PAGE_ENTRIES as usize];
                ids[i] = id;
                let leaf = Arc::new(MapLeaf::new(ids));
                admit(&self.cache, &leaf);
                *slot = Some(leaf);
                self.present += 1;
            }
            Some(page) if page.users() > 1 || Arc::strong_count(page) > 1 => {
                // Another map holds it (a snapshot: the copy is ours, with a reference to
                // each of its blocks), or a checkpoint's image does (the copy replaces it for
                // the same maps).
                let shared = page.users() > 1;
                let mut own = page.copy(p as u64)?;
                if shared {
                    own.users = AtomicU32::new(1);
                    page.users.fetch_sub(1, Ordering::Relaxed);
                    for &b in own.read(p as u64)?.iter().filter(|&&b| b != 0) {
                        add_ref(b);
                    }
                }
                own.put(p as u64, i, id)?;
                let own = Arc::new(own);
                admit(&self.cache, &own);
                *page = own;
            }
            Some(page) => {
                page.put(p as u64, i, id)?;
            }
        }
        self.mapped = moved_count(self.mapped, old, id);
        Ok(old)
    }

    /// Resize to `blocks` entries. Entries past the new end are dropped (`drop_ref` for each
    /// block no longer referenced), leaves past it released; a shared last leaf is copied
    /// first (`add_ref`, as in [`LbaMap::set`]).
    pub fn resize(
        &mut self,
        blocks: u64,
        add_ref: &mut dyn FnMut(u64),
        drop_ref: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let keep = blocks.div_ceil(MAP_PAGE_ENTRIES) as usize;
        let kept_end = (keep.min(self.pages.len()) as u64) * MAP_PAGE_ENTRIES;
        for lba in blocks..kept_end {
            let id = self.set(lba, 0, add_ref)?;
            if id != 0 {
                drop_ref(id);
            }
        }
        // From the end, so that an error leaves the map whole up to the leaf that failed.
        while self.pages.len() > keep {
            let idx = self.pages.len() - 1;
            if let Some(leaf) = &self.pages[idx] {
                release(leaf, idx as u64, drop_ref)?;
                self.present -= 1;
                self.mapped -= leaf.count();
            }
            self.pages.pop();
        }
        self.pages.resize(keep, None);
        Ok(())
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
    /// no other map holds. On an error the leaves not let go of stay.
    pub fn release_all(&mut self, drop_ref: &mut dyn FnMut(u64)) -> Result<()> {
        self.resize(0, &mut |_| {}, drop_ref)?;
        self.cache.retire_hits(self.hits());
        *self = LbaMap {
            cache: self.cache.clone(),
            ..LbaMap::default()
        };
        Ok(())
    }

    /// Iterate (lba, block id) over mapped entries.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pages.iter().enumerate().flat_map(|(p, page)| {
            let ids = page.as_ref().map(|l| *l.read(p as u64).unwrap());
            ids.into_iter().flat_map(move |ids| {
                (0..MAP_PAGE_ENTRIES as usize)
                    .filter(move |&i| ids[i] != 0)
                    .map(move |i| (p as u64 * MAP_PAGE_ENTRIES + i as u64, ids[i]))
            })
        })
    }
}

/// `n` entries that are not holes, after one of them went from block `old` to `new` (0: a
/// hole).
fn moved_count(n: u64, old: u64, new: u64) -> u64 {
    match (old, new) {
        (0, 0) => n,
        (0, _) => n + 1,
        (_, 0) => n - 1,
        _ => n,
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
) -> Result<()> {
    let end = (lba + count).min(map.pages.len() as u64 * MAP_PAGE_ENTRIES);
    let mut pos = lba;
    while pos < end {
        let page = pos / MAP_PAGE_ENTRIES;
        let page_end = ((page + 1) * MAP_PAGE_ENTRIES).min(end);
        // An empty leaf (known without its entries) has nothing to clear.
        let has = map.pages[page as usize]
            .as_ref()
            .is_some_and(|l| l.count() > 0);
        if shard_of(pos, shards) == shard && has {
            for l in pos..page_end {
                let old = map.set(l, 0, add_ref)?;
                if old != 0 {
                    freed(old);
                }
            }
        }
        pos = page_end;
    }
    Ok(())
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
                    m.resize((x >> 8) % (96 * MAP_PAGE_ENTRIES), &mut |_| {}, &mut |_| {})
                        .unwrap();
                }
                1 => {
                    m.load_page(
                        (x >> 8) as usize % 80,
                        Arc::new(MapLeaf::new([7; MAP_PAGE_ENTRIES as usize])),
                    );
                }
                _ => {
                    m.set(lba, if x & 1 == 0 { 0 } else { step + 1 }, &mut none)
                        .unwrap();
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
        m.set(5, 1, &mut none).unwrap();
        let leaf = m.pages[0].clone().unwrap();
        leaf.set_written_at(at);
        drop(leaf);
        // Unchanged: still there; an entry set to what it holds changes nothing.
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), Some(at));
        m.set(5, 1, &mut none).unwrap();
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), Some(at));
        // Changed in place (nothing else holds it).
        m.set(6, 2, &mut none).unwrap();
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), None);
        // Changed while an image holds it: the map gets a copy without a place, the image's
        // leaf keeps its own.
        let image = m.pages[0].clone().unwrap();
        image.set_written_at(at);
        m.set(7, 3, &mut none).unwrap();
        assert_eq!(m.pages[0].as_ref().unwrap().written_at(), None);
        assert_eq!(image.written_at(), Some(at));
        assert_eq!(image.ids()[7], 0);
        // Shared with a snapshot: the writer's copy has no place either.
        let snap = m.share();
        snap.pages[0].as_ref().unwrap().set_written_at(at);
        m.set(8, 4, &mut none).unwrap();
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
                    gone.release_all(&mut |id| *refs.entry(id).or_default() -= 1)
                        .unwrap();
                }
                2 => {
                    let mut dropped = Vec::new();
                    maps[m]
                        .resize((x >> 20) % blocks, &mut add, &mut |id| dropped.push(id))
                        .unwrap();
                    for id in dropped {
                        *refs.entry(id).or_default() -= 1;
                    }
                    maps[m].resize(blocks, &mut |_| {}, &mut |_| {}).unwrap();
                }
                _ => {
                    // Few distinct ids, so that leaves share blocks as well as being shared.
                    let id = if x & 3 == 0 { 0 } else { x % 50 + 1 };
                    if id != 0 {
                        add(id);
                    }
                    let old = maps[m].set(lba, id, &mut add).unwrap();
                    if old != 0 {
                        *refs.entry(old).or_default() -= 1;
                    }
                }
            }
            let mut want: HashMap<u64, i64> = HashMap::new();
            let mut seen = HashSet::new();
            for leaf in maps.iter().flat_map(|m| m.pages.iter().flatten()) {
                if seen.insert(Arc::as_ptr(leaf)) {
                    for &id in leaf.ids().iter().filter(|&&id| id != 0) {
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
