//! Which metadata segments still hold pages a retained image names (docs/design/paged-metadata.md
//! §7.3). Three images matter: the previous committed one (an open falls back to it when the
//! newest is damaged), the current one, and the one being written. Per segment, how many of
//! each one's pages it holds; a segment that holds none of any is free again.

// Retention for checkpoints that write only what changed (milestone 11); whole checkpoints
// keep using `CkptState::segments`.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::BTreeMap;

use crate::format::PagePtr;

/// Live page counts of metadata segments: previous, current and next image.
#[derive(Debug, Default, Clone)]
pub(crate) struct MetaSegs {
    counts: BTreeMap<u32, [u32; 3]>,
}

const PREV: usize = 0;
const CUR: usize = 1;
const NEXT: usize = 2;

impl MetaSegs {
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
        if let Some(c) = self.counts.get_mut(&old.segment) {
            c[NEXT] = c[NEXT].saturating_sub(1);
        }
    }

    /// The next image was committed (`both`: both superblock copies name it; otherwise the
    /// older copy still names the image before the current one, which stays retained one more
    /// round). Returns the segments no retained image names any more, which are free.
    pub(crate) fn committed(&mut self, both: bool) -> Vec<u32> {
        for c in self.counts.values_mut() {
            c[PREV] = if both { c[CUR] } else { c[PREV] + c[CUR] };
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

    /// A segment is freed by the commit after the one whose image stopped naming its pages
    /// (the previous image stays readable for a fallback open), or at once when the write-out
    /// that wrote it failed.
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
        assert!(m.committed(true).is_empty(), "image 1 is the previous one");
        // Image 3 changes nothing in segment 1's pages: image 1 is no longer retained.
        m.begin();
        m.wrote(3, 1);
        m.superseded(&ptr(2));
        assert_eq!(m.committed(true), [1]);
        // A failed write-out gives its segment back and keeps the rest.
        m.begin();
        m.wrote(4, 2);
        m.superseded(&ptr(2));
        assert_eq!(m.abandoned(), [4]);
        assert_eq!(m.live().collect::<Vec<_>>(), [2, 3]);
        // Image 5 supersedes every page of segments 2 and 3, but its second superblock copy
        // fails: the older copy still names image 3, which stays (as does image 4's
        // predecessor, conservatively) until a commit lands in both copies.
        m.begin();
        m.wrote(5, 3);
        for _ in 0..2 {
            m.superseded(&ptr(2));
        }
        m.superseded(&ptr(3));
        assert!(
            m.committed(false).is_empty(),
            "image 3 is in the older copy"
        );
        m.begin();
        m.wrote(6, 1);
        assert_eq!(m.committed(true), [2, 3], "no copy names image 3 any more");
        assert_eq!(m.live().collect::<Vec<_>>(), [5, 6]);
    }
}
