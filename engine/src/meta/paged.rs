//! Arrays stored as pages (docs/design/paged-metadata.md §7.1): fixed-width entries in leaf
//! pages, and a radix tree of [`PagePtr`]s (252 per interior page) above them, whose top page
//! the checkpoint root names. Pages are never written in place: a checkpoint writes the leaves
//! that changed since the last one, then every interior page on their paths, bottom-up.
//!
//! Two halves with two owners: [`PagedArray`] holds the entries (changed under the space
//! lock, its leaves shared copy-on-write with a checkpoint's cut), [`ArrayPages`] where each
//! page was last written (the checkpointer's alone).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{
    ArrayRoot, BlockLoc, DirEntry, Get, LogKey, PageArray, PageHeader, PageKind, PagePtr, PageWant,
    Put, SegUsage, PAGE_BODY_BYTES, PAGE_BYTES, PAGE_HEADER_BYTES, PTRS_PER_PAGE,
};
use crate::io::AlignedBuf;
use crate::meta::writer::MetaWriter;
use crate::store::{self, Range, SegmentStore};

/// An entry of a paged array: its width and how it is stored.
// `put` serves `PagedArray` cuts, which incremental checkpoints (milestone 11) will write.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) trait PageEntry: Copy + PartialEq + std::fmt::Debug + Send + Sync {
    /// Entries per leaf page.
    const PER_PAGE: usize;
    fn put(&self, p: &mut Put<'_>);
    fn get(g: &mut Get<'_>) -> Result<Self>;
}

impl PageEntry for BlockLoc {
    const PER_PAGE: usize = PAGE_BODY_BYTES / BlockLoc::BYTES;
    fn put(&self, p: &mut Put<'_>) {
        BlockLoc::put(self, p);
    }
    fn get(g: &mut Get<'_>) -> Result<Self> {
        BlockLoc::get(g)
    }
}

impl PageEntry for PagePtr {
    const PER_PAGE: usize = PTRS_PER_PAGE;
    fn put(&self, p: &mut Put<'_>) {
        PagePtr::put(self, p);
    }
    fn get(g: &mut Get<'_>) -> Result<Self> {
        PagePtr::get(g)
    }
}

impl PageEntry for DirEntry {
    const PER_PAGE: usize = PTRS_PER_PAGE;
    fn put(&self, p: &mut Put<'_>) {
        DirEntry::put(self, p);
    }
    fn get(g: &mut Get<'_>) -> Result<Self> {
        DirEntry::get(g)
    }
}

impl PageEntry for SegUsage {
    const PER_PAGE: usize = PAGE_BODY_BYTES / SegUsage::BYTES;
    fn put(&self, p: &mut Put<'_>) {
        SegUsage::put(self, p);
    }
    fn get(g: &mut Get<'_>) -> Result<Self> {
        SegUsage::get(g)
    }
}

/// Reference counts, a byte each.
impl PageEntry for u8 {
    const PER_PAGE: usize = PAGE_BODY_BYTES;
    fn put(&self, p: &mut Put<'_>) {
        p.bytes(&[*self]);
    }
    fn get(g: &mut Get<'_>) -> Result<Self> {
        Ok(g.array::<1>()?[0])
    }
}

/// The entries of an array, a leaf page's worth per `Arc` (copied on write while a cut holds
/// it), and which leaves changed since the last cut. Used by loads; the RAM arrays become
/// these with incremental checkpoints (milestone 11).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Debug)]
pub(crate) struct PagedArray<T: PageEntry> {
    leaves: Vec<Arc<Vec<T>>>,
    len: usize,
    dirty: Vec<bool>,
    dirty_count: usize,
}

/// The leaves that changed, taken for a checkpoint (the array goes on changing meanwhile).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Cut<T: PageEntry> {
    pub len: usize,
    pub leaves: Vec<(usize, Arc<Vec<T>>)>,
}

impl<T: PageEntry> Default for PagedArray<T> {
    fn default() -> Self {
        PagedArray {
            leaves: Vec::new(),
            len: 0,
            dirty: Vec::new(),
            dirty_count: 0,
        }
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<T: PageEntry> PagedArray<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        self.leaves.get(i / T::PER_PAGE)?.get(i % T::PER_PAGE)
    }

    /// Entry `i`, to change (its leaf becomes dirty).
    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let leaf = i / T::PER_PAGE;
        if i >= self.len {
            return None;
        }
        self.mark(leaf);
        Arc::make_mut(&mut self.leaves[leaf]).get_mut(i % T::PER_PAGE)
    }

    pub(crate) fn set(&mut self, i: usize, v: T) {
        if let Some(e) = self.get_mut(i) {
            *e = v;
        }
    }

    /// Grow to `n` entries of `fill` (never shrinks).
    pub(crate) fn grow_to(&mut self, n: usize, fill: T) {
        while self.len < n {
            let leaf = self.len / T::PER_PAGE;
            if leaf == self.leaves.len() {
                self.leaves.push(Arc::new(Vec::with_capacity(T::PER_PAGE)));
                self.dirty.push(false);
            }
            self.mark(leaf);
            let l = Arc::make_mut(&mut self.leaves[leaf]);
            let take = (n - self.len).min(T::PER_PAGE - l.len());
            l.resize(l.len() + take, fill);
            self.len += take;
        }
    }

    pub(crate) fn push(&mut self, v: T) {
        self.grow_to(self.len + 1, v);
    }

    fn mark(&mut self, leaf: usize) {
        if !self.dirty[leaf] {
            self.dirty[leaf] = true;
            self.dirty_count += 1;
        }
    }

    /// Leaves changed since the last cut.
    pub(crate) fn dirty_leaves(&self) -> usize {
        self.dirty_count
    }

    /// Take the changed leaves for a checkpoint: O(changed) pointers, no entry copied.
    pub(crate) fn cut(&mut self) -> Cut<T> {
        let mut leaves = Vec::with_capacity(self.dirty_count);
        for (i, d) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(d) {
                leaves.push((i, self.leaves[i].clone()));
            }
        }
        self.dirty_count = 0;
        Cut {
            len: self.len,
            leaves,
        }
    }

    /// Put a cut's leaves back as changed (its checkpoint failed: the next one writes them).
    pub(crate) fn uncut(&mut self, cut: &Cut<T>) {
        for &(i, _) in &cut.leaves {
            self.mark(i);
        }
    }

    #[cfg(test)]
    fn dirty(&self) -> Vec<usize> {
        (0..self.dirty.len()).filter(|&i| self.dirty[i]).collect()
    }
}

/// Reads pages for [`ArrayPages::load`]: pages next to each other in one segment in one read.
pub(crate) trait PageSource {
    /// The 4 KiB pages at `ptrs`, in order.
    fn read_pages(&self, ptrs: &[PagePtr]) -> Result<Vec<Vec<u8>>>;
}

/// Reads through the segment store, waiting (recovery, tests; the shards will read through
/// their rings).
pub(crate) struct StoreSource<'a> {
    pub store: &'a dyn SegmentStore,
    pub epoch: u64,
}

/// Largest read of adjacent pages.
const MAX_RUN_BYTES: usize = 1 << 20;

impl PageSource for StoreSource<'_> {
    fn read_pages(&self, ptrs: &[PagePtr]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(ptrs.len());
        let mut i = 0;
        while i < ptrs.len() {
            let first = ptrs[i];
            let mut n = 1;
            while i + n < ptrs.len()
                && n * PAGE_BYTES < MAX_RUN_BYTES
                && ptrs[i + n].segment == first.segment
                && u64::from(ptrs[i + n].offset)
                    == u64::from(first.offset) + (n * PAGE_BYTES) as u64
            {
                n += 1;
            }
            let at = Range {
                segment: first.segment,
                offset: u64::from(first.offset),
            };
            let buf: AlignedBuf = store::read_now(self.store, self.epoch, at, n * PAGE_BYTES)?;
            out.extend(buf.chunks_exact(PAGE_BYTES).map(<[u8]>::to_vec));
            i += n;
        }
        Ok(out)
    }
}

const BAD_PAGE: Error = Error::Corrupt {
    what: "metadata page",
};

/// Where each page of an array was last written: `levels[0][leaf]`, then each interior level.
#[derive(Clone, Debug)]
pub(crate) struct ArrayPages {
    array: PageArray,
    levels: Vec<Vec<PagePtr>>,
    len: u64,
}

/// Pages at each level for `len` entries of `per_page` each: leaves first, up to one top page.
fn level_counts(len: u64, per_page: usize) -> Vec<usize> {
    let mut counts = Vec::new();
    let mut n = (len as usize).div_ceil(per_page);
    if n == 0 {
        return counts;
    }
    counts.push(n);
    while n > 1 {
        n = n.div_ceil(PTRS_PER_PAGE);
        counts.push(n);
    }
    counts
}

/// Pages of the page tree of an array of `len` entries, `per_page` to a leaf.
pub(crate) fn pages(len: u64, per_page: usize) -> u64 {
    level_counts(len, per_page).iter().sum::<usize>() as u64
}

/// Levels of the page tree of an array of `len` entries, `per_page` to a leaf (0: empty).
pub(crate) fn height(len: u64, per_page: usize) -> u8 {
    level_counts(len, per_page).len() as u8
}

impl ArrayPages {
    pub(crate) fn new(array: PageArray) -> ArrayPages {
        ArrayPages {
            array,
            levels: Vec::new(),
            len: 0,
        }
    }

    /// Entries the array was last written with.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Where each leaf page was last written.
    pub(crate) fn leaf_ptrs(&self) -> &[PagePtr] {
        self.levels.first().map_or(&[], |l| &l[..])
    }

    /// Every page of the array as last written.
    pub(crate) fn all(&self) -> impl Iterator<Item = &PagePtr> + '_ {
        self.levels.iter().flatten().filter(|p| !p.is_absent())
    }

    /// Leaves to rewrite so that no page of the array stays in `segments`: those there, and a
    /// leaf under each interior page there (writing a leaf rewrites its path).
    pub(crate) fn leaves_in(&self, segments: &BTreeSet<u32>) -> Vec<usize> {
        let mut out = BTreeSet::new();
        let mut span = 1usize;
        for level in &self.levels {
            for (i, p) in level.iter().enumerate() {
                if !p.is_absent() && segments.contains(&p.segment) {
                    out.insert(i * span);
                }
            }
            span = span.saturating_mul(PTRS_PER_PAGE);
        }
        out.into_iter().collect()
    }

    /// What the checkpoint root records of the array.
    pub(crate) fn root(&self) -> ArrayRoot {
        ArrayRoot {
            array: self.array,
            height: self.levels.len() as u8,
            len: self.len,
            root: self
                .levels
                .last()
                .and_then(|l| l.first().copied())
                .unwrap_or(PagePtr::ABSENT),
        }
    }

    /// Write a cut: its leaves, then every interior page above a written page (and any page
    /// not written yet), bottom-up. Returns the pointers superseded (their pages stay where they
    /// are until no retained image names them).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn write<T: PageEntry>(
        &mut self,
        cut: &Cut<T>,
        w: &mut MetaWriter<'_>,
    ) -> Result<Vec<PagePtr>> {
        let leaves: Vec<usize> = cut.leaves.iter().map(|(i, _)| *i).collect();
        let mut at = 0;
        self.write_with(cut.len as u64, T::PER_PAGE, &leaves, w, &mut |i, body| {
            // Leaves come in the order given.
            while cut.leaves[at].0 != i {
                at += 1;
            }
            let leaf = &cut.leaves[at].1;
            let mut p = Put::new(body);
            for e in leaf.iter() {
                e.put(&mut p);
            }
            leaf.len() as u32
        })
    }

    /// Write leaves `changed` (ascending) of an array of `len` entries, `per_page` to a leaf,
    /// whose bodies `fill` encodes (returning the entries it put), then the interior pages
    /// above them. For arrays kept elsewhere than in a [`PagedArray`].
    pub(crate) fn write_with(
        &mut self,
        len: u64,
        per_page: usize,
        changed_leaves: &[usize],
        w: &mut MetaWriter<'_>,
        fill: &mut dyn FnMut(usize, &mut [u8]) -> u32,
    ) -> Result<Vec<PagePtr>> {
        let counts = level_counts(len, per_page);
        // Arrays only grow (ids and leaf slots are never taken back in place); a shrink would
        // leave interiors naming pages past the end. Callers rebuild a shrunk array whole.
        if len < self.len || self.levels.len() > counts.len() {
            return Err(crate::error::Error::Internal {
                what: "a paged array written shorter than before",
            });
        }
        self.len = len;
        if self.levels.len() < counts.len() {
            self.levels.resize(counts.len(), Vec::new());
        }
        let mut old = Vec::new();
        let mut changed = BTreeSet::new();
        if let Some(&n) = counts.first() {
            self.levels[0].resize(n, PagePtr::ABSENT);
        }
        let mut body = vec![0u8; PAGE_BODY_BYTES];
        for &i in changed_leaves {
            body.fill(0);
            let entries = fill(i, &mut body);
            let at = w.page(PageKind::ArrayLeaf, 0, i as u64, self.array, entries, &body)?;
            let slot = &mut self.levels[0][i];
            if !slot.is_absent() {
                old.push(*slot);
            }
            *slot = at;
            changed.insert(i);
        }
        // Every leaf is written at least once: a new one the caller left out would be named
        // by its interior as absent.
        if self
            .levels
            .first()
            .is_some_and(|l| l.iter().any(PagePtr::is_absent))
        {
            return Err(crate::error::Error::Internal {
                what: "a paged array leaf never written",
            });
        }
        for level in 1..counts.len() {
            let (below, above) = self.levels.split_at_mut(level);
            let (below, here) = (&below[level - 1], &mut above[0]);
            here.resize(counts[level], PagePtr::ABSENT);
            let mut next = BTreeSet::new();
            for (p, slot) in here.iter_mut().enumerate() {
                let lo = p * PTRS_PER_PAGE;
                let hi = (lo + PTRS_PER_PAGE).min(below.len());
                if !slot.is_absent() && changed.range(lo..hi).next().is_none() {
                    continue;
                }
                body.fill(0);
                let mut b = Put::new(&mut body);
                for c in &below[lo..hi] {
                    c.put(&mut b);
                }
                let at = w.page(
                    PageKind::ArrayInterior,
                    level as u8,
                    p as u64,
                    self.array,
                    (hi - lo) as u32,
                    &body,
                )?;
                if !slot.is_absent() {
                    old.push(*slot);
                }
                *slot = at;
                next.insert(p);
            }
            changed = next;
        }
        Ok(old)
    }

    /// Read a whole array from its root: every page checked against the pointer it was read
    /// through and the entries the array's length gives it.
    pub(crate) fn load<T: PageEntry>(
        root: &ArrayRoot,
        key: &LogKey,
        src: &dyn PageSource,
    ) -> Result<(PagedArray<T>, ArrayPages)> {
        let mut array = PagedArray::<T>::default();
        let pages = Self::load_leaves::<T>(root, key, src, 0, &mut |_, leaf| {
            array.leaves.push(Arc::new(leaf));
            array.dirty.push(false);
            Ok(())
        })?;
        array.len = root.len as usize;
        Ok((array, pages))
    }

    /// As [`ArrayPages::load`], handing each entry to `f` (its index, the entry) instead of
    /// keeping them: the leaves are read a run at a time, so that an open holds one copy of a
    /// large array (the block table) rather than three.
    pub(crate) fn load_each<T: PageEntry>(
        root: &ArrayRoot,
        key: &LogKey,
        src: &dyn PageSource,
        f: &mut dyn FnMut(usize, T),
    ) -> Result<ArrayPages> {
        Self::load_leaves::<T>(root, key, src, 0, &mut |leaf, entries| {
            for (i, e) in entries.into_iter().enumerate() {
                f(leaf * T::PER_PAGE + i, e);
            }
            Ok(())
        })
    }

    /// The page tree under `root` without its leaves, but the last one's entries (`None` for
    /// an empty array): where every leaf is, for an open that reads leaves when they are used.
    pub(crate) fn load_tree<T: PageEntry>(
        root: &ArrayRoot,
        key: &LogKey,
        src: &dyn PageSource,
    ) -> Result<(ArrayPages, Option<Vec<T>>)> {
        let last = (root.len as usize).div_ceil(T::PER_PAGE).saturating_sub(1);
        let mut out = None;
        let pages = Self::load_leaves::<T>(root, key, src, last, &mut |_, leaf| {
            out = Some(leaf);
            Ok(())
        })?;
        Ok((pages, out))
    }

    /// Read the page tree under `root`, handing the entries of each leaf from the `from`-th on
    /// in order to `on_leaf` (its index, its entries), `LOAD_RUN` leaf pages read at a time.
    fn load_leaves<T: PageEntry>(
        root: &ArrayRoot,
        key: &LogKey,
        src: &dyn PageSource,
        from: usize,
        on_leaf: &mut dyn FnMut(usize, Vec<T>) -> Result<()>,
    ) -> Result<ArrayPages> {
        let counts = level_counts(root.len, T::PER_PAGE);
        if counts.len() != usize::from(root.height) || (counts.is_empty() != root.root.is_absent())
        {
            return Err(Error::Corrupt {
                what: "paged array root",
            });
        }
        let mut pages = ArrayPages {
            array: root.array,
            levels: vec![Vec::new(); counts.len()],
            len: root.len,
        };
        let Some(top) = counts.len().checked_sub(1) else {
            return Ok(pages);
        };
        pages.levels[top] = vec![root.root];
        for level in (1..=top).rev() {
            let below = counts[level - 1];
            let entries = |i: usize| (below - i * PTRS_PER_PAGE).min(PTRS_PER_PAGE);
            let bodies = read_level(src, key, root.array, level, &pages.levels[level], &entries)?;
            let mut ptrs = Vec::with_capacity(below);
            for (i, b) in bodies.iter().enumerate() {
                let mut g = Get::new(b, "paged array interior");
                for _ in 0..entries(i) {
                    let p = PagePtr::get(&mut g)?;
                    if p.is_absent() {
                        return Err(BAD_PAGE);
                    }
                    ptrs.push(p);
                }
            }
            pages.levels[level - 1] = ptrs;
        }
        let len = root.len as usize;
        let entries = |i: usize| (len - i * T::PER_PAGE).min(T::PER_PAGE);
        let leaves = &pages.levels[0];
        for (run, ptrs) in leaves[from.min(leaves.len())..]
            .chunks(LOAD_RUN)
            .enumerate()
        {
            let first = from + run * LOAD_RUN;
            let bodies = read_level_from(src, key, root.array, 0, ptrs, first, &|i| {
                entries(first + i)
            })?;
            for (i, b) in bodies.iter().enumerate() {
                let mut g = Get::new(b, "paged array leaf");
                let mut leaf = Vec::with_capacity(T::PER_PAGE);
                for _ in 0..entries(first + i) {
                    leaf.push(T::get(&mut g)?);
                }
                on_leaf(first + i, leaf)?;
            }
        }
        Ok(pages)
    }
}

/// Leaf pages an array load reads at a time (1 MiB).
pub(crate) const LOAD_RUN: usize = 256;

/// The bodies of the pages at `ptrs` (`level` of `array`, keys in order from 0), each checked
/// against its pointer and the entries it must hold.
fn read_level(
    src: &dyn PageSource,
    key: &LogKey,
    array: PageArray,
    level: usize,
    ptrs: &[PagePtr],
    want_entries: &dyn Fn(usize) -> usize,
) -> Result<Vec<Vec<u8>>> {
    read_level_from(src, key, array, level, ptrs, 0, want_entries)
}

/// As [`read_level`] for the pages of a level from the `first`-th on (`want_entries` is
/// indexed from there).
fn read_level_from(
    src: &dyn PageSource,
    key: &LogKey,
    array: PageArray,
    level: usize,
    ptrs: &[PagePtr],
    first: usize,
    want_entries: &dyn Fn(usize) -> usize,
) -> Result<Vec<Vec<u8>>> {
    let bufs = src.read_pages(ptrs)?;
    let mut bodies = Vec::with_capacity(bufs.len());
    for (i, (buf, at)) in bufs.into_iter().zip(ptrs).enumerate() {
        let want = PageWant {
            kind: if level == 0 {
                PageKind::ArrayLeaf
            } else {
                PageKind::ArrayInterior
            },
            level: level as u8,
            key: (first + i) as u64,
            array,
            at: *at,
        };
        let h = PageHeader::open(&buf, key, &want).map_err(|_| BAD_PAGE)?;
        if h.entries as usize != want_entries(i) {
            return Err(BAD_PAGE);
        }
        bodies.push(buf[PAGE_HEADER_BYTES..].to_vec());
    }
    Ok(bodies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::tests::Disk;

    fn loc(i: usize, round: u32) -> BlockLoc {
        BlockLoc {
            segment: i as u32 % 1000,
            offset: (i as u32) << 12,
            stored_len: 4096,
            flags: (i % 7) as u16,
            crc: round ^ i as u32,
        }
    }

    /// 100,000 entries (397 leaves, three levels) round-trip; a second checkpoint that changes
    /// three entries writes three leaves and the interior pages above them only, and the older
    /// image still reads back as it was (its pages are not overwritten).
    #[test]
    fn an_array_round_trips_and_later_writes_only_what_changed() {
        let disk = Disk::new(64);
        let mut a = PagedArray::<BlockLoc>::default();
        for i in 0..100_000 {
            a.push(loc(i, 0));
        }
        let mut pages = ArrayPages::new(PageArray::BlockTable);
        let cut = a.cut();
        assert_eq!(cut.leaves.len(), 397);
        let (old, written) = disk.write(|w| pages.write(&cut, w));
        assert!(old.is_empty());
        let first = pages.root();
        assert_eq!(first.height, 3);
        // 397 leaves, 2 interior pages, the top.
        assert_eq!(written, 400);
        assert_eq!(a.dirty_leaves(), 0);
        for i in [5usize, 70_000, 99_999] {
            a.set(i, loc(i, 1));
        }
        let cut = a.cut();
        assert_eq!(cut.leaves.len(), 3);
        // A failed checkpoint gives its leaves back.
        a.uncut(&cut);
        assert_eq!(a.dirty(), [0, 277, 396]);
        let cut = a.cut();
        let (old, written) = disk.write(|w| pages.write(&cut, w));
        // Leaves 0, 277 and 396: the first under interior page 0, the others under page 1.
        assert_eq!((written, old.len()), (3 + 2 + 1, 6));
        let (b, _) =
            ArrayPages::load::<BlockLoc>(&pages.root(), &disk.key, &disk.source()).unwrap();
        assert_eq!(b.len(), 100_000);
        for i in 0..100_000 {
            let round = u32::from([5, 70_000, 99_999].contains(&i));
            assert_eq!(b.get(i), Some(&loc(i, round)), "entry {i}");
        }
        let (old_image, _) =
            ArrayPages::load::<BlockLoc>(&first, &disk.key, &disk.source()).unwrap();
        assert_eq!(old_image.get(70_000), Some(&loc(70_000, 0)));
    }

    /// Growing past a leaf and past an interior page's reach adds pages and a level; a byte
    /// array (reference counts, 4032 per page) works the same.
    #[test]
    fn growing_arrays_gain_leaves_and_levels() {
        let disk = Disk::new(64);
        let mut a = PagedArray::<u8>::default();
        let mut pages = ArrayPages::new(PageArray::BlockRefs);
        for (round, n) in [10usize, 4032, 4033, 252 * 4032 + 1]
            .into_iter()
            .enumerate()
        {
            a.grow_to(n, round as u8 + 1);
            let cut = a.cut();
            disk.write(|w| pages.write(&cut, w));
            let (b, _) = ArrayPages::load::<u8>(&pages.root(), &disk.key, &disk.source()).unwrap();
            assert_eq!(b.len(), n);
            assert_eq!(b.get(0), Some(&1));
            assert_eq!(b.get(n - 1), a.get(n - 1));
        }
        assert_eq!(pages.root().height, 3);
    }

    /// A page changed on disk, a root naming another write of a page (its stamp), or a root
    /// whose length does not match its height, is refused as corrupt.
    #[test]
    fn damaged_pages_and_roots_are_refused() {
        let disk = Disk::new(64);
        let mut a = PagedArray::<PagePtr>::default();
        for i in 0..1000u32 {
            a.push(PagePtr {
                segment: i,
                offset: 0,
                stamp: u64::from(i),
            });
        }
        let mut pages = ArrayPages::new(PageArray::PageTable);
        let cut = a.cut();
        disk.write(|w| pages.write(&cut, w));
        let root = pages.root();
        let load = |r: &ArrayRoot| ArrayPages::load::<PagePtr>(r, &disk.key, &disk.source());
        assert!(load(&root).is_ok());
        let mut r = root;
        r.root.stamp += 1;
        assert!(matches!(load(&r), Err(Error::Corrupt { .. })));
        let mut r = root;
        r.len += 252 * 252 * 252;
        assert!(matches!(load(&r), Err(Error::Corrupt { .. })));
        // Flip a byte in the body of leaf 2.
        let leaf = pages.levels[0][2];
        disk.flip(leaf.segment, u64::from(leaf.offset) + 100);
        assert!(matches!(load(&root), Err(Error::Corrupt { .. })));
    }
}
