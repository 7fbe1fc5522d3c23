//! The metadata cache (issue 22, docs/design/paged-metadata.md §6, milestone 14): map leaves
//! that a committed format 3 checkpoint holds unchanged give their 4 KiB of entries back when
//! the leaves in RAM pass the budget, and read them again from their page on the next use.
//!
//! A leaf stays in RAM as a small stub (its users, its count of entries, where it was
//! written), so sharing between snapshots, reference counting and the checkpoint's naming of
//! unchanged leaves do not need the entries. Only a leaf with a page can go: one changed since
//! the last checkpoint stays until a checkpoint writes it, and when such leaves keep the cache
//! an eighth over the budget the shards ask for a checkpoint (`wants_checkpoint`).
//!
//! Eviction is CLOCK over a ring of weak pointers: a leaf used since the hand last passed gets
//! a second chance. A shard reads a missing page through its own queue while the request that
//! needs it waits (`shard::fetch`, which takes it in through `parse_map_leaf`); the other
//! callers (walks, checks, replay, the fallbacks) read it with a blocking read on their thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::{
    get_u48, BlockLoc, Get, LogKey, PageArray, PageHeader, PageKind, PagePtr, PageWant,
    MAP_PAGE_ENTRIES, MAP_PAGE_SLOTS, PAGE_BYTES, PAGE_HEADER_BYTES,
};
use crate::io::AlignedBuf;
use crate::space::{BlockEntry, TablePages, TABLE_LEAF};
use crate::store::{self, Range, SegmentStore};

/// A map leaf's entries (`map::MapPage`).
type MapPage = [u64; MAP_PAGE_ENTRIES as usize];

/// What the cache's hand asks of a leaf (`map::MapLeaf`).
pub(crate) trait Evictable: Send + Sync {
    /// Clear the used mark, returning it.
    fn take_referenced(&self) -> bool;
    /// Give the entries back if a committed page holds them and nobody is using them now.
    fn evict(&self) -> Evicted;
}

/// What became of a leaf the hand tried to evict.
pub(crate) enum Evicted {
    Yes,
    /// Changed since the last checkpoint: it stays until one writes it.
    Dirty,
    /// In use, or its entries are gone already.
    No,
}

/// Leaves the hand looks at for each leaf that comes in.
const TRIM_STEP: usize = 64;

/// Leaves the hand looks at while it holds the ring.
const TRIM_BATCH: usize = 4096;

/// What a leaf's entries cost in RAM while they are held.
pub(crate) const LEAF_BYTES: u64 = std::mem::size_of::<MapPage>() as u64;

/// Where evicted leaves are read back from.
struct Source {
    store: Arc<dyn SegmentStore>,
    key: LogKey,
    epoch: u64,
}

/// The pool's map leaves in RAM, under a budget.
pub(crate) struct MetaCache {
    /// Bytes of leaf entries to hold at most (`u64::MAX`: never evict).
    budget: AtomicU64,
    /// Bytes of leaf entries held now.
    resident: AtomicU64,
    /// Leaves with a stub alive (entries held or not).
    leaves: AtomicU64,
    /// Hits counted by maps that are gone (the maps count their own: a shared counter here
    /// would cost every look-up a contended atomic).
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    /// Block-table leaves read back and evicted (the table evicts its own, under the space
    /// lock: `space::BlockTable`); apart from the map leaves' so that `evicted_any` keeps
    /// saying whether a map leaf may need reading back.
    table_misses: AtomicU64,
    table_evictions: AtomicU64,
    /// Block-table leaves known (in RAM or not), as the table last said.
    table_leaves: AtomicU64,
    /// Leaves in the order they came in (the CLOCK's ring). Dead entries are dropped as the
    /// hand passes them, or in a sweep when they outnumber the live ones.
    ring: Mutex<VecDeque<Weak<dyn Evictable>>>,
    /// Set once the pool's store is known (pools opened read-write or read-only alike).
    source: OnceLock<Source>,
    /// A pass could not get under the budget: what is over it has not been written yet.
    over: AtomicBool,
    /// A leaf came in without its entries (an open that left them on their pages): like an
    /// eviction, users must expect reads back.
    stubs_admitted: AtomicBool,
    open_pages: AtomicU64,
    /// Pages a shard's thread waited for in a blocking read (see `shard::fetch`).
    shard_waits: AtomicU64,
    /// Pages shards read through their own queues while the requests needing them waited.
    ring_reads: AtomicU64,
}

/// What `stats` reports of the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetaCacheStats {
    pub budget_bytes: u64,
    pub resident_bytes: u64,
    pub leaves: u64,
    /// Of gone maps only: `stats` adds the live maps' hits.
    pub hits_retired: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Of `misses`: block-table leaves.
    pub table_misses: u64,
    /// Pages of metadata the open read (its checkpoint's root and pages).
    pub open_pages: u64,
    /// Leaf pages a shard's thread waited for in a blocking read (its other requests waited
    /// with it).
    pub shard_waits: u64,
    /// Leaf pages shards read through their queues while the requests needing them waited.
    pub ring_reads: u64,
}

impl Default for MetaCache {
    fn default() -> MetaCache {
        MetaCache::new(u64::MAX)
    }
}

impl MetaCache {
    pub(crate) fn new(budget: u64) -> MetaCache {
        MetaCache {
            budget: AtomicU64::new(budget),
            resident: AtomicU64::new(0),
            leaves: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            table_misses: AtomicU64::new(0),
            table_evictions: AtomicU64::new(0),
            table_leaves: AtomicU64::new(0),
            ring: Mutex::new(VecDeque::new()),
            source: OnceLock::new(),
            over: AtomicBool::new(false),
            stubs_admitted: AtomicBool::new(false),
            open_pages: AtomicU64::new(0),
            shard_waits: AtomicU64::new(0),
            ring_reads: AtomicU64::new(0),
        }
    }

    /// Bytes of leaves it holds at most.
    pub(crate) fn budget_bytes(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    /// Leaves it holds at most (map and block-table leaves take 4 KiB each).
    pub(crate) fn budget_leaves(&self) -> usize {
        usize::try_from(self.budget_bytes() / LEAF_BYTES).unwrap_or(usize::MAX)
    }

    /// The pages at `ptrs` (in any order) parsed by `parse` (index in `ptrs`, page bytes,
    /// key), a run of adjacent ones per read (up to 1 MiB), each parsed where it was read:
    /// `None` for a page that does not read or parse (the reads stop at the first that
    /// fails), left for its use to report.
    fn read_ahead<T: Clone>(
        &self,
        ptrs: &[PagePtr],
        parse: impl Fn(usize, &[u8], &LogKey) -> Result<T>,
    ) -> Vec<Option<T>> {
        let mut out = vec![None; ptrs.len()];
        let Some(src) = self.source.get() else {
            return out;
        };
        let mut order: Vec<usize> = (0..ptrs.len()).collect();
        order.sort_unstable_by_key(|&i| (ptrs[i].segment, ptrs[i].offset));
        let mut k = 0;
        while k < order.len() {
            let first = ptrs[order[k]];
            let mut n = 1;
            while k + n < order.len()
                && n < PREFETCH_RUN
                && ptrs[order[k + n]].segment == first.segment
                && u64::from(ptrs[order[k + n]].offset)
                    == u64::from(first.offset) + (n * PAGE_BYTES) as u64
            {
                n += 1;
            }
            let at = Range {
                segment: first.segment,
                offset: u64::from(first.offset),
            };
            self.waited(n);
            let Ok(buf) = store::read_now(&*src.store, src.epoch, at, n * PAGE_BYTES) else {
                break;
            };
            for (j, page) in buf.chunks_exact(PAGE_BYTES).enumerate() {
                let i = order[k + j];
                out[i] = parse(i, page, &src.key).ok();
            }
            k += n;
        }
        out
    }

    /// The entries of evicted map leaves about to be used (replay), `(leaf index, page)`
    /// each, adjacent pages read together: `None` for a page that does not read or check,
    /// left for its use to report.
    pub(crate) fn read_leaves_ahead(&self, want: &[(u64, PagePtr)]) -> Vec<Option<Box<MapPage>>> {
        let ptrs: Vec<PagePtr> = want.iter().map(|w| w.1).collect();
        self.read_ahead(&ptrs, |i, page, key| {
            let (idx, at) = want[i];
            open_leaf(page, key, idx, at)
        })
    }

    /// `taken` leaves read ahead came into RAM (of `read` read): counted as misses, then
    /// room is made as loads make it, the hand going round what came in.
    pub(crate) fn took_ahead(&self, taken: usize, read: usize) {
        self.misses.fetch_add(taken as u64, Ordering::Relaxed);
        self.resident
            .fetch_add(taken as u64 * LEAF_BYTES, Ordering::Relaxed);
        self.trim_within(TRIM_STEP + 2 * read);
    }

    /// Evicted leaves are read back through `store`, their pages checked under `key`.
    pub(crate) fn set_source(&self, store: Arc<dyn SegmentStore>, key: LogKey, epoch: u64) {
        let _ = self.source.set(Source { store, key, epoch });
    }

    /// Hold at most `budget` bytes of entries from now on (`u64::MAX`: never evict).
    pub(crate) fn set_budget(&self, budget: u64) {
        self.budget.store(budget, Ordering::Relaxed);
        self.trim();
    }

    pub(crate) fn stats(&self) -> MetaCacheStats {
        MetaCacheStats {
            // Never evicting (format 2): reported as 0.
            budget_bytes: Some(self.budget.load(Ordering::Relaxed))
                .filter(|&b| b != u64::MAX)
                .unwrap_or(0),
            resident_bytes: self.resident.load(Ordering::Relaxed),
            leaves: self.leaves.load(Ordering::Relaxed) + self.table_leaves.load(Ordering::Relaxed),
            hits_retired: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed) + self.table_misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed)
                + self.table_evictions.load(Ordering::Relaxed),
            table_misses: self.table_misses.load(Ordering::Relaxed),
            open_pages: self.open_pages.load(Ordering::Relaxed),
            shard_waits: self.shard_waits.load(Ordering::Relaxed),
            ring_reads: self.ring_reads.load(Ordering::Relaxed),
        }
    }

    /// The open read `pages` pages of metadata (its checkpoint's).
    pub(crate) fn set_open_pages(&self, pages: u64) {
        self.open_pages.store(pages, Ordering::Relaxed);
    }

    /// A map took a leaf this cache did not count yet (new, copied or loaded from a
    /// checkpoint): count it and put it in the ring.
    pub(crate) fn admit(&self, leaf: Weak<dyn Evictable>, has_entries: bool) {
        self.leaves.fetch_add(1, Ordering::Relaxed);
        if has_entries {
            self.resident.fetch_add(LEAF_BYTES, Ordering::Relaxed);
        } else {
            self.stubs_admitted.store(true, Ordering::Relaxed);
        }
        let mut ring = self.ring.lock();
        ring.push_back(leaf);
        // Leaves copied or dropped leave dead entries (each keeps its stub's allocation).
        let live = self.leaves.load(Ordering::Relaxed) as usize;
        if ring.len() > 2 * live + 4096 {
            ring.retain(|w| w.strong_count() > 0);
        }
        drop(ring);
        self.trim_within(TRIM_STEP);
    }

    /// A stub this cache counted is gone.
    pub(crate) fn dropped(&self, had_entries: bool) {
        self.leaves.fetch_sub(1, Ordering::Relaxed);
        if had_entries {
            self.resident.fetch_sub(LEAF_BYTES, Ordering::Relaxed);
        }
    }

    /// Whether any leaf was ever evicted (else none needs reading back).
    pub(crate) fn evicted_any(&self) -> bool {
        self.evictions.load(Ordering::Relaxed) > 0
            || self.table_evictions.load(Ordering::Relaxed) > 0
            || self.stubs_admitted.load(Ordering::Relaxed)
    }

    /// Hits counted by a map that is gone (a deleted volume's) count on.
    pub(crate) fn retire_hits(&self, hits: u64) {
        self.hits.fetch_add(hits, Ordering::Relaxed);
    }

    /// Read back the entries of the leaf at index `idx` written at `at`.
    pub(crate) fn load(&self, idx: u64, at: PagePtr) -> Result<Box<MapPage>> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let ids = self.read_page(idx, at)?;
        self.resident.fetch_add(LEAF_BYTES, Ordering::Relaxed);
        Ok(ids)
    }

    /// The entries of a leaf of holes, counted as held (no read).
    pub(crate) fn zeroed(&self) -> Box<MapPage> {
        self.resident.fetch_add(LEAF_BYTES, Ordering::Relaxed);
        Box::new([0; MAP_PAGE_ENTRIES as usize])
    }

    /// The entries of the leaf at index `idx` written at `at`, not kept (walks over every
    /// leaf read evicted ones this way).
    pub(crate) fn read_page(&self, idx: u64, at: PagePtr) -> Result<Box<MapPage>> {
        let (buf, key) = self.page_at(at, "map leaf evicted from a pool without a store")?;
        open_leaf(&buf, key, idx, at)
    }

    /// The page at `at`, read through the pool's store, and the key its MAC is under.
    fn page_at(&self, at: PagePtr, no_store: &'static str) -> Result<(AlignedBuf, &LogKey)> {
        let src = self.source.get().ok_or(Error::Corrupt { what: no_store })?;
        let at_range = Range {
            segment: at.segment,
            offset: u64::from(at.offset),
        };
        self.waited(1);
        let buf = store::read_now(&*src.store, src.epoch, at_range, PAGE_BYTES)?;
        Ok((buf, &src.key))
    }

    /// A blocking read of `pages` pages: counted when a shard's thread makes it.
    fn waited(&self, pages: usize) {
        if crate::io::on_shard_thread() {
            self.shard_waits.fetch_add(pages as u64, Ordering::Relaxed);
        }
    }

    /// The entries of map leaf `idx` from its page at `at`, read into `buf` by a shard's
    /// queue (see `shard::fetch`); counted as read through a ring.
    pub(crate) fn parse_map_leaf(&self, buf: &[u8], idx: u64, at: PagePtr) -> Result<Box<MapPage>> {
        self.ring_reads.fetch_add(1, Ordering::Relaxed);
        let src = self.source.get().ok_or(Error::Corrupt {
            what: "map leaf evicted from a pool without a store",
        })?;
        open_leaf(buf, &src.key, idx, at)
    }

    /// As [`MetaCache::parse_map_leaf`], for block-table leaf `leaf` of `entries` entries.
    pub(crate) fn parse_table_leaf(
        &self,
        buf: &[u8],
        leaf: usize,
        at: PagePtr,
        entries: usize,
    ) -> Result<Vec<BlockEntry>> {
        self.ring_reads.fetch_add(1, Ordering::Relaxed);
        let src = self.source.get().ok_or(Error::Corrupt {
            what: "block table leaf evicted from a pool without a store",
        })?;
        table_leaf(buf, &src.key, leaf, at, entries)
    }

    /// After a miss's load: hand back leaves until under the budget again.
    pub(crate) fn loaded(&self) {
        self.trim_within(TRIM_STEP);
    }

    /// Over the budget, give back the entries of leaves not used since the hand last passed
    /// them, down to seven eighths of it, looking at every leaf at most twice (after a
    /// checkpoint made leaves clean; after a budget change).
    pub(crate) fn trim(&self) {
        self.trim_within(usize::MAX);
    }

    /// As `trim`, looking at `limit` leaves at most: a leaf coming in costs a bounded step of
    /// the hand, also when what is over the budget are leaves no checkpoint holds yet. Well
    /// over it (by an eighth), the shards ask for a checkpoint (`wants_checkpoint`).
    fn trim_within(&self, limit: usize) {
        let budget = self.budget.load(Ordering::Relaxed);
        if self.resident.load(Ordering::Relaxed) <= budget {
            return;
        }
        let goal = budget - budget / 8;
        let (mut looked, mut rounds) = (0usize, None);
        let (mut evicted, mut dirty) = (0u64, 0u64);
        // A batch at a time: maps waiting to admit a leaf (a shard under the space lock)
        // get the ring between batches.
        loop {
            let Some(mut ring) = self.ring.try_lock() else {
                // Another thread is trimming.
                return;
            };
            let rounds = *rounds.get_or_insert((2 * ring.len()).min(limit));
            let stop = (looked + TRIM_BATCH).min(rounds);
            while self.resident.load(Ordering::Relaxed) > goal && looked < stop {
                looked += 1;
                let Some(w) = ring.pop_front() else { break };
                let Some(leaf) = w.upgrade() else { continue };
                if leaf.take_referenced() {
                    ring.push_back(w);
                    continue;
                }
                match leaf.evict() {
                    Evicted::Yes => {
                        self.resident.fetch_sub(LEAF_BYTES, Ordering::Relaxed);
                        self.evictions.fetch_add(1, Ordering::Relaxed);
                        evicted += 1;
                    }
                    Evicted::Dirty => dirty += 1,
                    Evicted::No => {}
                }
                ring.push_back(w);
            }
            let done = self.resident.load(Ordering::Relaxed) <= goal || looked >= rounds;
            drop(ring);
            if done {
                break;
            }
        }
        // Leaves no checkpoint holds yet keep it well over the budget: only a checkpoint lets
        // them go. (Clean leaves in use keep it over too, but the hand takes those as it
        // comes round.)
        let over = self.resident.load(Ordering::Relaxed) > budget.saturating_add(budget / 8)
            && dirty > evicted;
        if over {
            self.over.store(true, Ordering::Relaxed);
        }
    }

    /// The leaves in RAM are over the budget and cannot go before a checkpoint writes them:
    /// true once per such pass (the shard that sees it asks for a checkpoint).
    pub(crate) fn wants_checkpoint(&self) -> bool {
        self.over.load(Ordering::Relaxed) && self.over.swap(false, Ordering::Relaxed)
    }
}

/// Pages a prefetch reads at most in one request (1 MiB).
const PREFETCH_RUN: usize = 256;

/// The `entries` entries of block-table leaf `leaf` from `buf`, the page at `at`.
fn table_leaf(
    buf: &[u8],
    key: &LogKey,
    leaf: usize,
    at: PagePtr,
    entries: usize,
) -> Result<Vec<BlockEntry>> {
    let bad = || Error::Corrupt {
        what: "block table leaf page",
    };
    let want = PageWant {
        kind: PageKind::ArrayLeaf,
        level: 0,
        key: leaf as u64,
        array: PageArray::BlockTable,
        at,
    };
    let h = PageHeader::open(buf, key, &want).map_err(|_| bad())?;
    if h.entries as usize != entries || entries > TABLE_LEAF {
        return Err(bad());
    }
    let mut g = Get::new(&buf[PAGE_HEADER_BYTES..], "block table leaf page");
    (0..entries)
        .map(|_| {
            let l = BlockLoc::get(&mut g)?;
            Ok(BlockEntry {
                segment: l.segment,
                offset: l.offset,
                stored_len: l.stored_len,
                flags: l.flags,
                crc: l.crc,
            })
        })
        .collect()
}

/// Block-table leaves are evicted by the table itself (under the space lock) and counted
/// here, against the same budget as map leaves.
impl TablePages for MetaCache {
    fn read_leaf(&self, leaf: usize, at: PagePtr, entries: usize) -> Result<Vec<BlockEntry>> {
        if at.is_absent() {
            return Err(Error::Corrupt {
                what: "block table leaf page",
            });
        }
        let (buf, key) =
            self.page_at(at, "block table leaf evicted from a pool without a store")?;
        table_leaf(&buf, key, leaf, at, entries)
    }

    fn read_leaves(&self, want: &[(usize, PagePtr, usize)]) -> Vec<Option<Vec<BlockEntry>>> {
        let ptrs: Vec<PagePtr> = want.iter().map(|w| w.1).collect();
        self.read_ahead(&ptrs, |i, page, key| {
            let (leaf, at, entries) = want[i];
            table_leaf(page, key, leaf, at, entries)
        })
    }

    fn resident(&self, bytes: i64) {
        if bytes >= 0 {
            self.resident.fetch_add(bytes as u64, Ordering::Relaxed);
        } else {
            self.resident
                .fetch_sub(bytes.unsigned_abs(), Ordering::Relaxed);
        }
    }

    fn evicted(&self, leaves: u64) {
        self.table_evictions.fetch_add(leaves, Ordering::Relaxed);
    }

    fn over(&self) -> u64 {
        let budget = self.budget.load(Ordering::Relaxed);
        let held = self.resident.load(Ordering::Relaxed);
        if held <= budget {
            return 0;
        }
        held - (budget - budget / 8)
    }

    fn missed(&self) {
        self.table_misses.fetch_add(1, Ordering::Relaxed);
    }

    fn settled(&self) {
        let budget = self.budget.load(Ordering::Relaxed);
        if self.resident.load(Ordering::Relaxed) > budget.saturating_add(budget / 8) {
            self.over.store(true, Ordering::Relaxed);
        }
    }

    fn leaves(&self, n: u64) {
        self.table_leaves.store(n, Ordering::Relaxed);
    }
}

/// The entries of the map leaf page in `buf`, checked to be the page written for leaf `idx`
/// at `at` under `key`.
pub(crate) fn open_leaf(buf: &[u8], key: &LogKey, idx: u64, at: PagePtr) -> Result<Box<MapPage>> {
    let bad = || Error::Corrupt {
        what: "map leaf page",
    };
    let want = PageWant {
        kind: PageKind::MapLeaf,
        level: 0,
        key: idx,
        array: PageArray::MapTree,
        at,
    };
    let h = PageHeader::open(buf, key, &want).map_err(|_| bad())?;
    if h.entries as usize != MAP_PAGE_SLOTS {
        return Err(bad());
    }
    let mut g = Get::new(&buf[PAGE_HEADER_BYTES..], "map leaf page");
    let mut ids: Box<MapPage> = Box::new([0; MAP_PAGE_ENTRIES as usize]);
    for slot in ids.iter_mut() {
        *slot = get_u48(&mut g)?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::api::BLOCK_BYTES;
    use crate::error::Error;
    use crate::format::MAP_PAGE_ENTRIES;
    use crate::map::shard_of;
    use crate::pool::{CreateOptions, Pool, PoolOptions};

    const LEAVES: u64 = 64;
    const BUDGET: u64 = 8 * super::LEAF_BYTES;

    fn options() -> PoolOptions {
        PoolOptions {
            shards: 2,
            cache_bytes: Some(0),
            metadata_cache_bytes: Some(BUDGET),
            ..Default::default()
        }
    }

    /// A 256 MiB pool (not a tight one: checkpoints are incremental) with volume `v` of 64
    /// leaves, a block written in each.
    fn pool(dir: &Path) -> Pool {
        let c = CreateOptions {
            size_bytes: 256 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        let pool = Pool::create(dir, &c, &options()).unwrap();
        pool.create_volume("v", LEAVES * MAP_PAGE_ENTRIES * BLOCK_BYTES)
            .unwrap();
        let v = pool.volume("v").unwrap();
        for i in 0..LEAVES {
            v.write(lba(i) * BLOCK_BYTES, &block(i, 1), false).unwrap();
        }
        v.flush().unwrap();
        pool.checkpoint().unwrap();
        pool
    }

    fn lba(leaf: u64) -> u64 {
        leaf * MAP_PAGE_ENTRIES + leaf % 7
    }

    fn block(leaf: u64, gen: u8) -> Vec<u8> {
        let mut b = vec![gen; BLOCK_BYTES as usize];
        b[..8].copy_from_slice(&leaf.to_le_bytes());
        b
    }

    /// Leaves past the budget give their entries back once a checkpoint holds them, and read
    /// back (and change) correctly, also after a reopen.
    #[test]
    fn leaves_past_the_budget_are_evicted_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(dir.path());
        let st = pool.stats();
        assert!(st.metadata_cache_bytes <= BUDGET, "{st:?}");
        assert!(st.metadata_cache_evictions >= LEAVES - 8, "{st:?}");
        // Map leaves and the block table's (a leaf of 252 ids).
        let table = pool.block_ids().div_ceil(crate::space::TABLE_LEAF as u64);
        assert_eq!(st.metadata_cache_leaves, LEAVES + table);
        // Per-volume figures read evicted leaves (all of them, this few).
        assert_eq!(st.volumes[0].unique_blocks, LEAVES, "{st:?}");
        assert!(!st.volumes[0].reduction_estimated);
        let v = pool.volume("v").unwrap();
        for i in 0..LEAVES {
            assert_eq!(v.read(lba(i) * BLOCK_BYTES, 4096).unwrap(), block(i, 1));
        }
        let after = pool.stats();
        assert!(
            after.metadata_cache_misses >= LEAVES - 8,
            "reads found evicted leaves in RAM: {after:?}"
        );
        // Within a leaf of the budget: each leaf coming in moves the hand a bounded step,
        // which may only clear the use bits of the leaves in RAM (the next one evicts).
        assert!(
            after.metadata_cache_bytes <= BUDGET + super::LEAF_BYTES,
            "{after:?}"
        );
        // Overwrites of evicted leaves, and a block next to each.
        for i in (0..LEAVES).step_by(2) {
            v.write(lba(i) * BLOCK_BYTES, &block(i, 2), false).unwrap();
            v.write((lba(i) + 1) * BLOCK_BYTES, &block(i, 3), false)
                .unwrap();
        }
        v.flush().unwrap();
        let check = |pool: &Pool| {
            let v = pool.volume("v").unwrap();
            for i in 0..LEAVES {
                let gen = if i % 2 == 0 { 2 } else { 1 };
                assert_eq!(v.read(lba(i) * BLOCK_BYTES, 4096).unwrap(), block(i, gen));
                let next = v.read((lba(i) + 1) * BLOCK_BYTES, 4096).unwrap();
                if i % 2 == 0 {
                    assert_eq!(next, block(i, 3));
                } else {
                    assert!(next.iter().all(|&b| b == 0));
                }
            }
            let r = pool.check(&mut |_, _| {});
            assert!(r.problems.is_empty(), "{:?}", r.problems);
        };
        check(&pool);
        pool.shutdown().unwrap();
        drop(pool);
        let pool = Pool::open(dir.path(), &options()).unwrap();
        check(&pool);
        // Within a leaf of the budget: each leaf coming in moves the hand a bounded step,
        // which may only clear the use bits of the leaves in RAM (the next one evicts).
        let st = pool.stats();
        assert!(
            st.metadata_cache_bytes <= BUDGET + super::LEAF_BYTES,
            "{st:?}"
        );
    }

    /// A damaged page of an evicted leaf fails the reads of that leaf's blocks with a
    /// corruption error, and check reports it; the other leaves read as written. A reopen
    /// refuses the pool.
    #[test]
    fn a_damaged_evicted_leaf_fails_its_reads_only() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(dir.path());
        // No checkpoint meanwhile: one cleaning the leaf's segment could copy its page away
        // between the choice and the damage, and the damaged copy would then be no one's.
        let ck = pool.inner.ckpt.state.lock();
        let state = pool.inner.ctx.lookup("v").unwrap();
        let shards = pool.inner.ctx.shards();
        let (victim, at) = (0..LEAVES)
            .find_map(|i| {
                let m = state.maps[shard_of(lba(i), shards)].lock();
                let leaf = m.pages[i as usize].as_ref()?;
                (!leaf.has_entries()).then(|| (i, leaf.written_at().unwrap()))
            })
            .expect("an evicted leaf");
        crate::meta::tests::damage_page(dir.path(), 2 << 20, at, 200);
        // The damaged leaf's reads fail, every other leaf's read back.
        let reads = |pool: &Pool| {
            let v = pool.volume("v").unwrap();
            match v.read(lba(victim) * BLOCK_BYTES, 4096) {
                Err(Error::Corrupt { what }) => assert_eq!(what, "map leaf page"),
                other => panic!("read of a damaged leaf: {other:?}"),
            }
            for i in (0..LEAVES).filter(|&i| i != victim) {
                assert_eq!(v.read(lba(i) * BLOCK_BYTES, 4096).unwrap(), block(i, 1));
            }
        };
        reads(&pool);
        drop(ck);
        // A checkpoint from now on that needs the page (cleaning its segment) stops the pool
        // with the reason; check reports the leaf either way.
        let r = pool.check(&mut |_, _| {});
        assert!(
            r.problems.iter().any(|p| p.kind == "map leaf"),
            "{:?}",
            r.problems
        );
        // An open takes each leaf's count from its directory and reads no leaf, but this
        // pool is small (under 64 segments): its checkpoints are whole, so the recovery
        // checkpoint reads the damaged page and the open refuses the pool, saying why. An
        // open that gets past it fails the damaged leaf's reads only.
        let _ = pool.shutdown();
        drop(pool);
        match Pool::open(dir.path(), &options()) {
            Err(Error::Corrupt { what }) => assert_eq!(what, "map leaf page"),
            Err(e) => panic!("reopen of a pool with a damaged leaf page: {e}"),
            Ok(pool) => reads(&pool),
        }
    }
}
