//! Which metadata segments still hold pages a retained image names (docs/design/paged-metadata.md
//! §7.3). Three images matter: the previous committed one (while a superblock slot still names
//! it: an open falls back to it when the newest is damaged), the current one, and the one being
//! written. Per segment, how many of each one's pages it holds; a segment that holds none of
//! any is free again.
//!
//! Pages live across checkpoints (only what changed is rewritten), so a segment that keeps a
//! few cold pages would never be freed: [`MetaSegs::sparse`] picks segments the current image
//! uses little, whose pages the next checkpoint rewrites (cleaning of metadata segments).

use std::collections::{BTreeMap, BTreeSet};

use crate::format::PagePtr;

/// Segments the current image may spread over, for pages that need `need` full segments,
/// before checkpoints start cleaning (see [`MetaSegs::sparse`]; `context::usable_bytes` keeps
/// room for it).
pub(crate) fn spread_allowed(need: u64) -> u64 {
    need + 1 + need / 4
}

/// Live page counts of metadata segments: previous, current and next image.
#[derive(Debug, Default, Clone)]
pub(crate) struct MetaSegs {
    counts: BTreeMap<u32, [u32; 3]>,
}

const PREV: usize = 0;
const CUR: usize = 1;
const NEXT: usize = 2;

impl MetaSegs {
    /// Segments a checkpoint read at open lies in when its page counts are not known (a format
    /// 2 checkpoint being upgraded): the current image, one count each, which keeps them until
    /// two commits no longer name them.
    pub(crate) fn adopt(&mut self, segments: &[u32]) {
        for &s in segments {
            self.counts.entry(s).or_default()[CUR] = 1;
        }
    }

    /// The checkpoint an open read, with its pages per segment known (`pages`): the current
    /// image, which the next checkpoint changes only in part. Other segments it was read from
    /// (`read`; none, as the counts cover every page) are kept until a commit writes both
    /// superblock slots.
    pub(crate) fn adopt_pages(&mut self, pages: &BTreeMap<u32, u32>, read: &[u32]) {
        for (&s, &n) in pages {
            self.counts.entry(s).or_default()[CUR] = n;
        }
        for s in read.iter().filter(|s| !pages.contains_key(s)) {
            self.counts.entry(*s).or_default()[PREV] = 1;
        }
    }

    /// A whole write-out begins: the next image names none of the current one's pages.
    pub(crate) fn begin_whole(&mut self) {
        for c in self.counts.values_mut() {
            c[NEXT] = 0;
        }
    }

    /// Segments whose pages the next checkpoint should rewrite elsewhere so that they can be
    /// freed: none while the current image uses at most [`spread_allowed`] segments for what
    /// its pages need at `slots` a segment; else the ones it uses least, whatever their fill,
    /// as many as fit a segment's worth of pages (what a checkpoint may add for cleaning). The
    /// slack (a quarter, and one) keeps the segments cleaned at most about four-fifths full on
    /// average, and an idle pool's checkpoints from moving the same few pages back and forth.
    /// On a `tight` pool (a few dozen segments, or a full host file system: neither can spare
    /// a segment for this) whose pages fit one segment, every segment: each checkpoint
    /// is then whole and lies in one segment, as a format 2 checkpoint did.
    /// (`context::usable_bytes` counts what this lets the pages take beyond whole
    /// checkpoints.)
    pub(crate) fn sparse(&self, slots: u32, tight: bool) -> BTreeSet<u32> {
        let used: Vec<(u32, u32)> = self
            .counts
            .iter()
            .filter(|(_, c)| c[CUR] > 0)
            .map(|(&s, c)| (c[CUR], s))
            .collect();
        let pages: u64 = used.iter().map(|&(n, _)| u64::from(n)).sum();
        let need = pages.div_ceil(u64::from(slots.max(1)));
        if tight && need <= 1 {
            return used.into_iter().map(|(_, s)| s).collect();
        }
        if used.len() as u64 <= spread_allowed(need) {
            return BTreeSet::new();
        }
        let budget = slots;
        let mut by_use = used;
        by_use.sort_unstable();
        let mut left = budget;
        let mut out = BTreeSet::new();
        for (n, s) in by_use {
            if n > left {
                break;
            }
            left -= n;
            out.insert(s);
        }
        out
    }

    /// A write-out begins: the next image starts as the current one.
    pub(crate) fn begin(&mut self) {
        for c in self.counts.values_mut() {
            c[NEXT] = c[CUR];
        }
    }

    /// The next image has `pages` new pages in `segment`.
    pub(crate) fn wrote(&mut self, segment: u32, pages: u32) {
        self.counts.entry(segment).or_default()[NEXT] += pages;
    }

    /// The next image no longer names the page at `old`.
    pub(crate) fn superseded(&mut self, old: &PagePtr) {
        self.superseded_n(old.segment, 1);
    }

    /// The next image no longer names `n` pages of `segment`.
    pub(crate) fn superseded_n(&mut self, segment: u32, n: u32) {
        if let Some(c) = self.counts.get_mut(&segment) {
            c[NEXT] = c[NEXT].saturating_sub(n);
        }
    }

    /// The next image was committed (`both`: both superblock slots name it; otherwise the
    /// slot not written still names the image that was current, which stays retained until a
    /// commit writes both). Returns the segments no retained image names any more, which are
    /// free.
    pub(crate) fn committed(&mut self, both: bool) -> Vec<u32> {
        for c in self.counts.values_mut() {
            c[PREV] = if both { 0 } else { c[CUR] };
            c[CUR] = c[NEXT];
        }
        let free: Vec<u32> = self
            .counts
            .iter()
            .filter(|(_, c)| c.iter().all(|&n| n == 0))
            .map(|(&s, _)| s)
            .collect();
        for s in &free {
            self.counts.remove(s);
        }
        free
    }

    /// The write-out failed: the next image is dropped (the segments it wrote hold nothing
    /// retained and come back as free).
    pub(crate) fn abandoned(&mut self) -> Vec<u32> {
        let free: Vec<u32> = self
            .counts
            .iter()
            .filter(|(_, c)| c[PREV] == 0 && c[CUR] == 0)
            .map(|(&s, _)| s)
            .collect();
        for s in &free {
            self.counts.remove(s);
        }
        for c in self.counts.values_mut() {
            c[NEXT] = c[CUR];
        }
        free
    }

    /// Segments that hold a page of some retained image.
    #[cfg(test)]
    pub(crate) fn live(&self) -> impl Iterator<Item = u32> + '_ {
        self.counts.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr(segment: u32) -> PagePtr {
        PagePtr {
            segment,
            offset: 4096,
            stamp: 1,
        }
    }

    /// A segment is freed by the commit that writes both superblock slots with an image that
    /// no longer names its pages, by the next one when a slot could not be written (it still
    /// names the image before, which an open falls back to), or at once when the write-out that
    /// wrote it failed.
    #[test]
    fn segments_are_freed_once_no_retained_image_names_them() {
        let mut m = MetaSegs::default();
        m.begin();
        m.wrote(1, 3);
        assert!(m.committed(true).is_empty());
        // Image 2 rewrites all three pages into segment 2.
        m.begin();
        m.wrote(2, 3);
        for _ in 0..3 {
            m.superseded(&ptr(1));
        }
        assert_eq!(m.committed(true), [1], "no slot names image 1");
        // Image 3 supersedes one page of segment 2.
        m.begin();
        m.wrote(3, 1);
        m.superseded(&ptr(2));
        assert!(m.committed(true).is_empty());
        // A failed write-out gives its segment back and keeps the rest.
        m.begin();
        m.wrote(4, 2);
        m.superseded(&ptr(2));
        assert_eq!(m.abandoned(), [4]);
        assert_eq!(m.live().collect::<Vec<_>>(), [2, 3]);
        // Image 5 supersedes every page of segments 2 and 3, but its second superblock slot
        // fails: that slot still names image 3, which stays until a commit lands in both.
        m.begin();
        m.wrote(5, 3);
        for _ in 0..2 {
            m.superseded(&ptr(2));
        }
        m.superseded(&ptr(3));
        assert!(
            m.committed(false).is_empty(),
            "image 3 is in the slot not written"
        );
        m.begin();
        m.wrote(6, 1);
        assert_eq!(m.committed(true), [2, 3], "no copy names image 3 any more");
        assert_eq!(m.live().collect::<Vec<_>>(), [5, 6]);
    }
}
