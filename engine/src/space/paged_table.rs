//! The block table in leaves of a format 3 table page's entries (252), each shared
//! copy-on-write with a checkpoint's image, and evictable once a committed checkpoint holds it
//! unchanged (docs/design/paged-metadata.md, milestone 14): an evicted leaf keeps only where
//! its page is, and comes back through [`TablePages`] (the metadata cache) when it is used.
//!
//! Everything here runs under the space lock. The paths that serve requests find the leaves
//! they miss under it ([`BlockTable::evicted_of`]) and read them without it (a shard through
//! its queue, `shard::fetch`); a leaf still missing when used is read with the lock held.
//!
//! A leaf read back holds its live ids' entries as they were in RAM. A dead id's entry may be
//! older than RAM's (an open that recounts keeps only live ids' entries, the rest default),
//! and an open that takes the stored counts starts with every leaf but the last evicted, dead
//! ids' entries as their pages hold them. Nothing reads a dead id's entry as the block's:
//! `get` checks the count, `place` overwrites, replay asks the counts whether a block is
//! stored (`Space::is_placed`).

use std::borrow::Cow;
use std::sync::Arc;

use super::BlockEntry;
use crate::error::Result;
use crate::format::{BlockLoc, PagePtr, PAGE_BODY_BYTES};

use super::blocks::ChangeBits;

/// Entries per leaf: those of a block-table page, so that a leaf is evicted and read back as
/// one page.
pub(crate) const TABLE_LEAF: usize = PAGE_BODY_BYTES / BlockLoc::BYTES;

/// Bytes a leaf's entries hold in RAM (what the metadata cache counts).
pub(crate) const LEAF_BYTES: u64 = (TABLE_LEAF * std::mem::size_of::<BlockEntry>()) as u64;

/// Leaves the hand looks at per eviction step after a miss.
const EVICT_STEP: usize = 64;

/// Where evicted leaves come back from, and the budget they count against (the metadata
/// cache's, `meta::cache`).
pub(crate) trait TablePages: Send + Sync {
    /// The `entries` entries of leaf `leaf`, from its page at `at`, checked to be that page.
    fn read_leaf(&self, leaf: usize, at: PagePtr, entries: usize) -> Result<Vec<BlockEntry>>;
    /// `bytes` of leaf entries came into RAM (positive) or left it.
    fn resident(&self, bytes: i64);
    /// `leaves` leaves were evicted.
    fn evicted(&self, leaves: u64);
    /// The table has `n` leaves (in RAM or not).
    fn leaves(&self, n: u64);
    /// Bytes held beyond the budget (0: within it).
    fn over(&self) -> u64;
    /// A leaf was read back.
    fn missed(&self);
    /// Several leaves about to be used, `(leaf, at, entries)` each: those that read and
    /// check (`None` for the others, left for their use to report). One read per leaf unless
    /// the store batches adjacent pages.
    fn read_leaves(&self, want: &[(usize, PagePtr, usize)]) -> Vec<Option<Vec<BlockEntry>>> {
        want.iter()
            .map(|&(l, at, n)| self.read_leaf(l, at, n).ok())
            .collect()
    }
    /// Leaves came in and what could go went: if the cache is still well over its budget,
    /// what holds it there has changed since the last checkpoint, and a checkpoint is asked
    /// for (its commit lets those leaves go).
    fn settled(&self);
}

#[derive(Clone, Debug)]
struct Leaf {
    /// `None`: evicted (`at` names its page).
    entries: Option<Arc<Vec<BlockEntry>>>,
    /// Where a committed checkpoint holds the leaf as it is now; absent once it changes.
    at: PagePtr,
    /// Used since the hand last passed.
    used: bool,
}

impl Leaf {
    fn new() -> Leaf {
        Leaf {
            entries: Some(Arc::new(Vec::with_capacity(TABLE_LEAF))),
            at: PagePtr::ABSENT,
            used: false,
        }
    }
}

/// Block-table leaves to read without the table's lock ([`BlockTable::evicted_of`]).
pub(crate) struct TableAsk {
    pub pages: Arc<dyn TablePages>,
    /// (leaf, its page, its entries).
    pub leaves: Vec<(usize, PagePtr, usize)>,
}

/// Block id -> location and checksum.
#[derive(Default)]
pub struct BlockTable {
    leaves: Vec<Leaf>,
    len: usize,
    /// Units changed since the last [`BlockTable::take_changed`]: a format 3 checkpoint
    /// writes the pages of those only.
    changed: ChangeBits,
    /// Leaves whose entries are in RAM.
    resident: usize,
    /// The eviction hand (a leaf index).
    hand: usize,
    /// `None`: nothing is ever evicted, nothing read back (format 2 pools, tests).
    pages: Option<Arc<dyn TablePages>>,
    /// The pool's own table, whose leaves count against the cache and may be evicted; a
    /// clone (a checkpoint's image) only reads evicted leaves back, without keeping them.
    own: bool,
    /// Look-ups that found their leaf in RAM, and leaves read back.
    pub hits: u64,
    pub misses: u64,
}

impl std::fmt::Debug for BlockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockTable")
            .field("len", &self.len)
            .field("resident", &self.resident)
            .finish()
    }
}

impl Clone for BlockTable {
    fn clone(&self) -> BlockTable {
        BlockTable {
            leaves: self.leaves.clone(),
            len: self.len,
            changed: self.changed.clone(),
            resident: self.resident,
            hand: 0,
            pages: self.pages.clone(),
            own: false,
            hits: 0,
            misses: 0,
        }
    }
}

impl BlockTable {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries leaf `l` holds (all but the last hold [`TABLE_LEAF`]).
    fn leaf_len(&self, l: usize) -> usize {
        (self.len - l * TABLE_LEAF).min(TABLE_LEAF)
    }

    /// Read evicted leaves back through `pages`, and let them go past its budget.
    pub(crate) fn set_pages(&mut self, pages: Arc<dyn TablePages>) {
        self.count(-1);
        self.pages = Some(pages);
        self.own = true;
        self.count(1);
        if let Some(p) = self.own_pages() {
            p.leaves(self.leaves.len() as u64);
        }
    }

    /// The cache's count of this table's leaves in RAM: `sign` times all of them.
    fn count(&self, sign: i64) {
        self.counted(sign * self.resident_bytes() as i64);
    }

    fn counted(&self, bytes: i64) {
        if let Some(p) = self.own_pages() {
            p.resident(bytes);
        }
    }

    /// Where the pool's own table reports to (`None` for a clone).
    fn own_pages(&self) -> Option<&Arc<dyn TablePages>> {
        self.pages.as_ref().filter(|_| self.own)
    }

    /// The entry, if its leaf is in RAM (never reads).
    pub fn get(&self, i: usize) -> Option<&BlockEntry> {
        if i >= self.len {
            return None;
        }
        self.leaves[i / TABLE_LEAF]
            .entries
            .as_ref()?
            .get(i % TABLE_LEAF)
    }

    /// The entry (`None` beyond the table) if its leaf is in RAM, counted as a use and a hit;
    /// `Err(())` when the leaf is evicted. Never reads.
    pub(crate) fn entry_if_resident(&mut self, i: usize) -> Result<Option<BlockEntry>, ()> {
        if i >= self.len {
            return Ok(None);
        }
        let leaf = &mut self.leaves[i / TABLE_LEAF];
        let Some(entries) = &leaf.entries else {
            return Err(());
        };
        leaf.used = true;
        self.hits += 1;
        Ok(entries.get(i % TABLE_LEAF).copied())
    }

    /// Make leaf `l` resident, reading it back if it was evicted.
    fn load(&mut self, l: usize) -> Result<()> {
        self.leaves[l].used = true;
        if self.leaves[l].entries.is_some() {
            self.hits += 1;
            return Ok(());
        }
        let pages = self.pages.clone().ok_or(crate::error::Error::Corrupt {
            what: "block table leaf",
        })?;
        let entries = pages.read_leaf(l, self.leaves[l].at, self.leaf_len(l))?;
        self.took(l, entries, &*pages);
        let over = pages.over();
        if over > 0 {
            let (freed, changed) = self.evict(over, EVICT_STEP, &[l]);
            if freed < over && changed > 0 {
                pages.settled();
            }
        }
        Ok(())
    }

    /// Leaf `l`'s entries, read back from its page: in RAM again, counted as a miss.
    fn took(&mut self, l: usize, entries: Vec<BlockEntry>, pages: &dyn TablePages) {
        let leaf = &mut self.leaves[l];
        leaf.entries = Some(Arc::new(entries));
        leaf.used = true;
        self.resident += 1;
        self.misses += 1;
        pages.missed();
        self.counted(LEAF_BYTES as i64);
    }

    /// Read the evicted leaves of `ids` ahead of their use (replay), at most `max` of them,
    /// adjacent pages together. Each counts as a miss; then leaves not used since the hand
    /// last passed make room, as after a load.
    pub(crate) fn prefetch(&mut self, ids: &mut dyn Iterator<Item = u64>, max: usize) {
        if let Some(ask) = self.evicted_of(ids, max) {
            let got = ask.pages.read_leaves(&ask.leaves);
            self.take_read(&ask, got);
        }
    }

    /// The evicted leaves of `ids` (at most `max`) and where their pages are, to be read
    /// without the lock that guards the table (`TableAsk::pages`), then handed to
    /// [`BlockTable::take_read`]. `None` when none is evicted.
    pub(crate) fn evicted_of(
        &self,
        ids: &mut dyn Iterator<Item = u64>,
        max: usize,
    ) -> Option<TableAsk> {
        let pages = self.own_pages()?.clone();
        let mut want: Vec<usize> = ids
            .map(|id| id as usize / TABLE_LEAF)
            .filter(|&l| l < self.leaves.len() && self.leaves[l].entries.is_none())
            .collect();
        want.sort_unstable();
        want.dedup();
        want.truncate(max);
        let leaves: Vec<(usize, PagePtr, usize)> = want
            .iter()
            .map(|&l| (l, self.leaves[l].at, self.leaf_len(l)))
            .filter(|w| !w.1.is_absent())
            .collect();
        (!leaves.is_empty()).then_some(TableAsk { pages, leaves })
    }

    /// The leaves `ask` named, as read: each taken if it is still evicted where it was read
    /// from (one loaded, changed or moved meanwhile keeps what it has). Then room is made as
    /// loads make it: the hand passes what came in once (used), older leaves go.
    pub(crate) fn take_read(&mut self, ask: &TableAsk, got: Vec<Option<Vec<BlockEntry>>>) {
        let mut taken = Vec::new();
        for (&(l, at, n), got) in ask.leaves.iter().zip(got) {
            let Some(entries) = got else { continue };
            if l < self.leaves.len()
                && self.leaves[l].entries.is_none()
                && self.leaves[l].at == at
                && self.leaf_len(l) == n
            {
                self.took(l, entries, &*ask.pages);
                taken.push(l);
            }
        }
        // Not what just came in: it is about to be used. (The hand sees only the table's
        // leaves, so over a budget that map leaves fill it could pass a leaf twice in one
        // call and take it before its use.)
        taken.sort_unstable();
        let over = ask.pages.over();
        if over > 0 {
            self.evict(over, EVICT_STEP + 2 * ask.leaves.len(), &taken);
        }
    }

    /// Leaf `l`'s `n` entries as a shard's queue read them from its page at `at`: taken as
    /// [`BlockTable::take_read`] takes what it is handed.
    pub(crate) fn take_one(&mut self, l: usize, at: PagePtr, n: usize, entries: Vec<BlockEntry>) {
        let Some(pages) = self.own_pages().cloned() else {
            return;
        };
        let ask = TableAsk {
            pages,
            leaves: vec![(l, at, n)],
        };
        self.take_read(&ask, vec![Some(entries)]);
    }

    /// The entry (`None` beyond the table), its leaf read back first if it was evicted.
    pub fn entry(&mut self, i: usize) -> Result<Option<BlockEntry>> {
        if i >= self.len {
            return Ok(None);
        }
        self.load(i / TABLE_LEAF)?;
        Ok(self.get(i).copied())
    }

    /// The entry, to change: its leaf read back if evicted, copied first if an image shares
    /// it, and no longer what a checkpoint holds.
    pub fn get_mut(&mut self, i: usize) -> Result<Option<&mut BlockEntry>> {
        if i >= self.len {
            return Ok(None);
        }
        let l = i / TABLE_LEAF;
        self.load(l)?;
        self.mark(i);
        let leaf = &mut self.leaves[l];
        leaf.at = PagePtr::ABSENT;
        Ok(leaf
            .entries
            .as_mut()
            .map(|e| &mut Arc::make_mut(e)[i % TABLE_LEAF]))
    }

    /// A table of `len` entries whose leaves are all on pages (`at`, one per leaf), the last
    /// one's entries (`last`) excepted: growth never reads.
    pub(crate) fn on_pages(len: usize, at: &[PagePtr], last: Vec<BlockEntry>) -> BlockTable {
        let mut leaves: Vec<Leaf> = at
            .iter()
            .map(|&at| Leaf {
                entries: None,
                at,
                used: false,
            })
            .collect();
        let mut resident = 0;
        if let Some(l) = leaves.last_mut() {
            l.entries = Some(Arc::new(last));
            resident = 1;
        }
        let mut t = BlockTable::default();
        t.leaves = leaves;
        t.len = len;
        t.resident = resident;
        t
    }

    pub fn push(&mut self, e: BlockEntry) {
        self.grow_to(self.len + 1, e);
    }

    /// Grow to `n` entries of `e` (never shrinks). The last leaf is never evicted, so this
    /// never reads.
    pub fn grow_to(&mut self, n: usize, e: BlockEntry) {
        while self.len < n {
            let l = self.len / TABLE_LEAF;
            if l == self.leaves.len() {
                self.leaves.push(Leaf::new());
                self.resident += 1;
                self.counted(LEAF_BYTES as i64);
                if let Some(p) = self.own_pages() {
                    p.leaves(self.leaves.len() as u64);
                }
            } else if self.leaves[l].entries.is_none() && self.load(l).is_err() {
                // Not evicted (see `evict`): unreachable, but never a panic.
                return;
            }
            let leaf = &mut self.leaves[l];
            leaf.at = PagePtr::ABSENT;
            let Some(v) = leaf.entries.as_mut().map(Arc::make_mut) else {
                return;
            };
            let add = (TABLE_LEAF - v.len()).min(n - self.len);
            v.resize(v.len() + add, e);
            let first = self.len;
            self.len += add;
            self.changed.mark_range(first..self.len);
        }
    }

    /// Bytes of RAM this table holds outside the metadata cache: a stub per leaf and the
    /// change bits (a clone shares the leaves).
    pub fn stub_bytes(&self) -> u64 {
        (self.leaves.capacity() * std::mem::size_of::<Leaf>()) as u64 + self.changed.ram_bytes()
    }

    /// Bytes of the leaves' entries in RAM.
    pub fn resident_bytes(&self) -> u64 {
        self.resident as u64 * LEAF_BYTES
    }

    /// Leaves in RAM, and in all.
    #[cfg(test)]
    pub fn leaf_counts(&self) -> (usize, usize) {
        (self.resident, self.leaves.len())
    }

    /// The entries of leaf `l`: borrowed when in RAM, else read from its page and not kept
    /// (an image's writer, scrub, a cleaner's scan).
    pub fn leaf_entries(&self, l: usize) -> Result<Cow<'_, [BlockEntry]>> {
        let leaf = &self.leaves[l];
        match &leaf.entries {
            Some(e) => Ok(Cow::Borrowed(&e[..])),
            None => {
                let pages = self.pages.as_ref().ok_or(crate::error::Error::Corrupt {
                    what: "block table leaf",
                })?;
                Ok(Cow::Owned(pages.read_leaf(l, leaf.at, self.leaf_len(l))?))
            }
        }
    }

    /// Each entry of `range` (clamped to the length) with its index, leaves in RAM or not
    /// (those evicted are read and not kept).
    pub fn for_each_in(
        &self,
        range: std::ops::Range<usize>,
        f: &mut dyn FnMut(usize, &BlockEntry),
    ) -> Result<()> {
        let end = range.end.min(self.len);
        let start = range.start.min(end);
        if start == end {
            return Ok(());
        }
        for l in start / TABLE_LEAF..end.div_ceil(TABLE_LEAF) {
            let entries = self.leaf_entries(l)?;
            let base = l * TABLE_LEAF;
            let lo = start.max(base) - base;
            let hi = end.min(base + entries.len()) - base;
            for (i, e) in entries[lo..hi].iter().enumerate() {
                f(base + lo + i, e);
            }
        }
        Ok(())
    }

    fn mark(&mut self, i: usize) {
        self.changed.mark(i);
    }

    /// The units of [`CHANGE_UNIT`](super::CHANGE_UNIT) entries changed (or added) since the last call,
    /// ascending; clears the marks.
    pub fn take_changed(&mut self) -> Vec<usize> {
        self.changed.take()
    }

    /// Whether an entry of leaf `l` changed since the last [`BlockTable::take_changed`].
    fn changed_since_cut(&self, l: usize) -> bool {
        self.changed
            .any_in(l * TABLE_LEAF..((l + 1) * TABLE_LEAF).min(self.len))
    }

    /// A checkpoint whose image was cut at the last [`BlockTable::take_changed`] is committed
    /// with leaf `l`'s page at `leaves[l]`: every leaf unchanged since the cut is that page
    /// (evicted ones included: their page may have moved with a cleaned metadata segment),
    /// and may go.
    pub(crate) fn committed(&mut self, leaves: &[PagePtr]) {
        if self.pages.is_none() || !self.own {
            return;
        }
        for (l, &at) in leaves.iter().enumerate().take(self.leaves.len()) {
            // A leaf with a place has not changed since the commit that gave it (a change
            // forgets it), so neither since this image was cut: its page now is this one
            // (which may have moved). Evicted leaves are such. Another is this page if none
            // of its entries changed since the cut (by units of 64 entries, which may span
            // two leaves: a neighbour's change keeps it in RAM until the next commit).
            if !at.is_absent() && (!self.leaves[l].at.is_absent() || !self.changed_since_cut(l)) {
                self.leaves[l].at = at;
            }
        }
        let over = self.pages.as_ref().map_or(0, |p| p.over());
        if over > 0 {
            self.evict(over, 2 * self.leaves.len(), &[]);
        }
    }

    /// Evict up to `bytes` of leaves a committed checkpoint holds and that were not used since
    /// the hand last passed, looking at no more than `steps` leaves; never `keep` (ascending).
    /// Returns the
    /// bytes freed and the leaves in RAM passed over for having changed since the checkpoint.
    fn evict(&mut self, bytes: u64, steps: usize, keep: &[usize]) -> (u64, usize) {
        let n = self.leaves.len();
        if n == 0 || !self.own {
            return (0, 0);
        }
        let mut changed = 0;
        let mut freed = 0u64;
        let mut count = 0u64;
        for _ in 0..steps.min(2 * n) {
            if freed >= bytes {
                break;
            }
            self.hand = (self.hand + 1) % n;
            let l = self.hand;
            let leaf = &mut self.leaves[l];
            // The last leaf stays: new ids grow it, and growth never reads.
            if leaf.entries.is_none() || keep.binary_search(&l).is_ok() || l + 1 == n {
                continue;
            }
            if leaf.at.is_absent() {
                changed += 1;
                continue;
            }
            if std::mem::take(&mut leaf.used) {
                continue;
            }
            leaf.entries = None;
            self.resident -= 1;
            freed += LEAF_BYTES;
            count += 1;
        }
        self.counted(-(freed as i64));
        if let Some(p) = self.own_pages().filter(|_| count > 0) {
            p.evicted(count);
        }
        (freed, changed)
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.count(-1);
    }
}

impl From<Vec<BlockEntry>> for BlockTable {
    fn from(v: Vec<BlockEntry>) -> BlockTable {
        v.into_iter().collect()
    }
}

impl FromIterator<BlockEntry> for BlockTable {
    fn from_iter<I: IntoIterator<Item = BlockEntry>>(it: I) -> BlockTable {
        let mut t = BlockTable::default();
        for e in it {
            t.push(e);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use std::sync::Arc;

    use super::{BlockTable, TablePages, LEAF_BYTES, TABLE_LEAF};
    use crate::api::BLOCK_BYTES;
    use crate::error::Error;
    use crate::format::PagePtr;
    use crate::pool::{CreateOptions, Pool, PoolOptions};
    use crate::space::BlockEntry;

    /// A store of leaf pages for the table's own tests: what `read_leaf` reads is what was
    /// last "written" at a place.
    struct Pages {
        written: parking_lot::Mutex<std::collections::HashMap<(u32, u32), Vec<BlockEntry>>>,
        budget: u64,
        held: std::sync::atomic::AtomicI64,
    }

    impl TablePages for Pages {
        fn read_leaf(
            &self,
            _: usize,
            at: PagePtr,
            n: usize,
        ) -> crate::error::Result<Vec<BlockEntry>> {
            match self.written.lock().get(&(at.segment, at.offset)) {
                Some(e) if e.len() == n => Ok(e.clone()),
                _ => Err(Error::Corrupt {
                    what: "block table leaf page",
                }),
            }
        }
        fn resident(&self, bytes: i64) {
            self.held
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        fn evicted(&self, _: u64) {}
        fn leaves(&self, _: u64) {}
        fn over(&self) -> u64 {
            (self.held.load(std::sync::atomic::Ordering::Relaxed) as u64)
                .saturating_sub(self.budget)
        }
        fn missed(&self) {}
        fn settled(&self) {}
    }

    fn entry(n: u32) -> BlockEntry {
        BlockEntry {
            segment: n,
            stored_len: 4096,
            crc: n,
            ..BlockEntry::default()
        }
    }

    /// "Write" every leaf of `t` as a checkpoint would (its image: a clone at the cut) at
    /// places `round`, and commit them.
    fn checkpoint(t: &mut BlockTable, pages: &Pages, round: u32) {
        let image = t.clone();
        t.take_changed();
        let mut ptrs = Vec::new();
        for l in 0..t.leaves.len() {
            let e = image.leaf_entries(l).unwrap().into_owned();
            let at = PagePtr {
                segment: round,
                offset: l as u32,
                stamp: 1,
            };
            pages.written.lock().insert((round, l as u32), e);
            ptrs.push(at);
        }
        // The old places are gone (their segments reused).
        pages.written.lock().retain(|k, _| k.0 == round);
        t.committed(&ptrs);
    }

    /// A leaf in RAM that kept its place while a neighbour sharing a change unit changed
    /// after the cut still follows its page when a checkpoint moves it: evicted later, it
    /// reads back from where its page is now (it read a freed segment's bytes before).
    #[test]
    fn a_leaf_follows_its_page_when_a_neighbour_changed_after_the_cut() {
        let pages = Arc::new(Pages {
            written: Default::default(),
            budget: u64::MAX,
            held: Default::default(),
        });
        let mut t: BlockTable = (0..3 * TABLE_LEAF as u32).map(entry).collect();
        t.set_pages(pages.clone());
        checkpoint(&mut t, &pages, 1);
        // Id 253 is in leaf 1, and in the change unit 192..256 that leaf 0 shares.
        let cut = t.clone();
        t.take_changed();
        *t.get_mut(TABLE_LEAF + 1).unwrap().unwrap() = entry(7);
        // The checkpoint of that cut moves every page (a whole one).
        let mut ptrs = Vec::new();
        for l in 0..3 {
            pages
                .written
                .lock()
                .insert((2, l), cut.leaf_entries(l as usize).unwrap().into_owned());
            ptrs.push(PagePtr {
                segment: 2,
                offset: l,
                stamp: 1,
            });
        }
        pages.written.lock().retain(|k, _| k.0 == 2);
        drop(cut);
        t.committed(&ptrs);
        assert_eq!(
            t.leaves[0].at.segment, 2,
            "leaf 0 kept a place that is gone"
        );
        // Evicted, it reads back.
        t.leaves[0].entries = None;
        t.resident -= 1;
        assert_eq!(t.entry(5).unwrap(), Some(entry(5)));
        checkpoint(&mut t, &pages, 3);
        assert_eq!(t.entry(TABLE_LEAF + 1).unwrap(), Some(entry(7)));
    }

    /// Block ids: 12 table leaves.
    const BLOCKS: u64 = 12 * TABLE_LEAF as u64;
    /// Room for three table leaves (and the volume's four map leaves... not all of them).
    const BUDGET: u64 = 3 * LEAF_BYTES;

    fn options() -> PoolOptions {
        PoolOptions {
            shards: 2,
            cache_bytes: Some(0),
            metadata_cache_bytes: Some(BUDGET),
            ..Default::default()
        }
    }

    fn block(lba: u64, gen: u64) -> Vec<u8> {
        let mut b = vec![gen as u8; BLOCK_BYTES as usize];
        b[..8].copy_from_slice(&lba.to_le_bytes());
        b[8..16].copy_from_slice(&gen.to_le_bytes());
        b
    }

    fn pool(dir: &Path) -> Pool {
        let c = CreateOptions {
            size_bytes: 256 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        let pool = Pool::create(dir, &c, &options()).unwrap();
        pool.create_volume("v", BLOCKS * BLOCK_BYTES).unwrap();
        let v = pool.volume("v").unwrap();
        for lba in 0..BLOCKS {
            v.write(lba * BLOCK_BYTES, &block(lba, 1), false).unwrap();
        }
        v.flush().unwrap();
        pool.checkpoint().unwrap();
        pool
    }

    fn check(pool: &Pool, gen: &dyn Fn(u64) -> u64) {
        let v = pool.volume("v").unwrap();
        for lba in 0..BLOCKS {
            let got = v.read(lba * BLOCK_BYTES, BLOCK_BYTES as u32).unwrap();
            assert!(got == block(lba, gen(lba)), "block {lba} reads wrong");
        }
        let r = pool.check(&mut |_, _| {});
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    /// Block-table leaves past the budget give their entries back once a checkpoint holds
    /// them; reads, overwrites (the old blocks' entries are needed to account their death),
    /// the cleaner's moves, check and a reopen after a crash all read them back correctly.
    #[test]
    fn table_leaves_past_the_budget_are_evicted_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(dir.path());
        let (resident, leaves) = pool.inner.ctx.space.lock().blocks.leaf_counts();
        assert!(
            leaves >= 12 && resident < leaves / 2,
            "{resident} of {leaves} in RAM"
        );
        let before = pool.inner.ctx.space.lock().blocks.misses;
        check(&pool, &|_| 1);
        let after = pool.inner.ctx.space.lock().blocks.misses;
        assert!(after > before, "no table leaf was read back");
        // Every other block overwritten: each death reads its leaf back to account it.
        let v = pool.volume("v").unwrap();
        for lba in (0..BLOCKS).step_by(2) {
            v.write(lba * BLOCK_BYTES, &block(lba, 2), false).unwrap();
        }
        v.flush().unwrap();
        let gen = |lba: u64| if lba % 2 == 0 { 2 } else { 1 };
        pool.checkpoint().unwrap();
        let s = pool.stats();
        assert_eq!(s.volumes[0].unique_blocks, BLOCKS, "{s:?}");
        let r = pool.gc(0.99, &mut |_, _| {}).unwrap();
        assert!(r.bytes_moved > 0, "{r:?}");
        check(&pool, &gen);
        assert!(pool.halted_reason().is_none());
        pool.checkpoint().unwrap();
        let s = pool.stats();
        assert!(s.metadata_cache_bytes <= BUDGET + 2 * LEAF_BYTES, "{s:?}");
        pool.halt();
        drop(pool);
        let pool = Pool::open(dir.path(), &options()).unwrap();
        check(&pool, &gen);
        // Written after the reopen too.
        let v = pool.volume("v").unwrap();
        for lba in (1..BLOCKS).step_by(4) {
            v.write(lba * BLOCK_BYTES, &block(lba, 3), false).unwrap();
        }
        pool.shutdown().unwrap();
        drop(pool);
        let pool = Pool::open(dir.path(), &options()).unwrap();
        check(&pool, &|lba| if lba % 4 == 1 { 3 } else { gen(lba) });
        // A read-only open (which never checkpoints) lets them go too, held by the
        // checkpoint it read.
        pool.shutdown().unwrap();
        drop(pool);
        let ro = PoolOptions {
            read_only: true,
            ..options()
        };
        let pool = Pool::open(dir.path(), &ro).unwrap();
        let (resident, leaves) = pool.inner.ctx.space.lock().blocks.leaf_counts();
        assert!(
            resident < leaves / 2,
            "read-only: {resident} of {leaves} in RAM"
        );
        check(&pool, &|lba| if lba % 4 == 1 { 3 } else { gen(lba) });
    }

    /// Checkpoints that rewrite evicted leaves' pages elsewhere (a pool under 64 segments
    /// writes each checkpoint whole, and frees the segments of the one before the last) move
    /// where the leaves are read back from: after many, every block still reads back.
    #[test]
    fn evicted_table_leaves_follow_their_pages() {
        let dir = tempfile::tempdir().unwrap();
        let c = CreateOptions {
            size_bytes: 64 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        let pool = Pool::create(dir.path(), &c, &options()).unwrap();
        pool.create_volume("v", BLOCKS * BLOCK_BYTES).unwrap();
        let v = pool.volume("v").unwrap();
        for lba in 0..BLOCKS {
            v.write(lba * BLOCK_BYTES, &block(lba, 1), false).unwrap();
        }
        let last = |lba: u64| if lba < 40 { 2 } else { 1 };
        for round in 0..40 {
            v.write(round * BLOCK_BYTES, &block(round, 2), false)
                .unwrap();
            pool.checkpoint().unwrap();
        }
        let (resident, leaves) = pool.inner.ctx.space.lock().blocks.leaf_counts();
        assert!(resident < leaves / 2, "{resident} of {leaves} in RAM");
        check(&pool, &last);
        pool.halt();
        drop(pool);
        let pool = Pool::open(dir.path(), &options()).unwrap();
        check(&pool, &last);
    }

    /// A damaged page of an evicted table leaf fails the reads of that leaf's blocks with a
    /// corruption error; the other blocks read as written, and check reports the leaf.
    #[test]
    fn a_damaged_evicted_table_leaf_fails_its_reads_only() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(dir.path());
        // No checkpoint meanwhile (one could move the page away before it is damaged).
        let ck = pool.inner.ckpt.state.lock();
        let (leaf, at) = {
            let space = pool.inner.ctx.space.lock();
            (1..space.blocks.leaves.len() - 1)
                .find_map(|l| {
                    let leaf = &space.blocks.leaves[l];
                    leaf.entries.is_none().then_some((l, leaf.at))
                })
                .expect("an evicted table leaf")
        };
        crate::meta::tests::damage_page(dir.path(), 2 << 20, at, 300);
        // Ids were given out in order of the writes: the leaf's ids are those lbas' blocks.
        let ids = (leaf * TABLE_LEAF) as u64..((leaf + 1) * TABLE_LEAF) as u64;
        let v = pool.volume("v").unwrap();
        let (mut failed, mut fine) = (0, 0);
        for lba in 0..BLOCKS {
            let id = pool.inner.ctx.lookup("v").unwrap().maps
                [crate::map::shard_of(lba, pool.inner.ctx.shards())]
            .lock()
            .get(lba)
            .unwrap();
            match v.read(lba * BLOCK_BYTES, 4096) {
                Err(Error::Corrupt { what }) if ids.contains(&id) => {
                    assert_eq!(what, "block table leaf page");
                    failed += 1;
                }
                Ok(got) if !ids.contains(&id) => {
                    assert!(got == block(lba, 1), "block {lba} reads wrong");
                    fine += 1;
                }
                other => panic!("block {lba} (id {id}, damaged leaf {ids:?}): {other:?}"),
            }
        }
        assert!(failed > 0 && fine > 0, "{failed} failed, {fine} read");
        drop(ck);
        let r = pool.check(&mut |_, _| {});
        assert!(
            r.problems.iter().any(|p| p.kind == "block table"),
            "{:?}",
            r.problems
        );
    }

    /// An open that leaves the block table on its pages keeps their segments as the
    /// checkpoint's, also those that hold nothing else (more than a segment's worth of table
    /// leaves, written whole): none may be taken for data or another checkpoint.
    #[test]
    fn segments_of_unread_table_leaves_stay_the_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let c = CreateOptions {
            size_bytes: 1 << 30,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        // No checkpoint before the close, which writes the table whole (a large cache asks
        // for none either).
        let fill = PoolOptions {
            metadata_cache_bytes: None,
            checkpoint_interval_bytes: 16 << 30,
            ..options()
        };
        let pool = Pool::create(dir.path(), &c, &fill).unwrap();
        // 150 Ki blocks that compress to little: 600 table leaves, more than a segment's
        // 509 pages.
        let n = 150u64 << 10;
        pool.create_volume("v", n * BLOCK_BYTES).unwrap();
        let v = pool.volume("v").unwrap();
        for chunk in 0..n / 256 {
            let buf: Vec<u8> = (chunk * 256..(chunk + 1) * 256)
                .flat_map(|lba| block(lba, 1))
                .collect();
            v.write(chunk * 256 * BLOCK_BYTES, &buf, false).unwrap();
        }
        v.flush().unwrap();
        pool.shutdown().unwrap();
        drop(pool);
        let pool = Pool::open(dir.path(), &options()).unwrap();
        let leaves: Vec<PagePtr> = pool
            .inner
            .ckpt
            .state
            .lock()
            .paged
            .as_ref()
            .expect("format 3")
            .table_leaves()
            .to_vec();
        assert!(leaves.len() > 590);
        let only_table = {
            let space = pool.inner.ctx.space.lock();
            let mut segs: Vec<u32> = leaves.iter().map(|p| p.segment).collect();
            segs.dedup();
            for &s in &segs {
                assert_ne!(
                    space.seg_state[s as usize],
                    crate::space::SegState::Free,
                    "segment {s} holds table leaves"
                );
            }
            segs.len()
        };
        assert!(only_table >= 2);
        // Writes that take fresh segments leave the leaves' pages alone.
        let v = pool.volume("v").unwrap();
        for chunk in 0..64u64 {
            let buf: Vec<u8> = (chunk * 256..(chunk + 1) * 256)
                .flat_map(|lba| block(lba, 2))
                .collect();
            v.write(chunk * 256 * BLOCK_BYTES, &buf, false).unwrap();
        }
        v.flush().unwrap();
        for lba in (0..n).step_by(97) {
            let gen = if lba < 64 * 256 { 2 } else { 1 };
            let got = v.read(lba * BLOCK_BYTES, BLOCK_BYTES as u32).unwrap();
            assert!(got == block(lba, gen), "block {lba} reads wrong");
        }
        let r = pool.check(&mut |_, _| {});
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }
}
