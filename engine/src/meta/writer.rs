//! Writing metadata pages into metadata segments (docs/design/paged-metadata.md §4.2, §7.3).
//!
//! A metadata segment is written once, by one `put`, and never holds a client's byte:
//! ```text
//! | SegmentHeader (kind Meta) 4 KiB | summary pages | page | page | ... |
//! ```
//! The summary lists, per page slot, what the page is (array u8, level u8, reserved u16, key
//! u64: 12 bytes, 341 per summary page), for the cleaner of metadata segments, which checks
//! every candidate against its live pointer: a hint, so it carries no seal.

use crate::error::Result;
use crate::format::{
    LogKey, PageArray, PageHeader, PageKind, PagePtr, Put, SegmentHeader, SegmentKind, IO_ALIGN,
    NO_SEGMENT, PAGE_BYTES,
};
use crate::io::AlignedBuf;
use crate::store::{self, SegmentStore};

/// Summary entries per summary page.
pub(crate) const SUMMARY_PER_PAGE: usize = PAGE_BYTES / 12;

/// Page slots of a metadata segment of `segment_bytes`: (summary pages, page slots).
pub(crate) fn layout(segment_bytes: u64) -> (usize, usize) {
    let slots = (segment_bytes as usize - IO_ALIGN) / PAGE_BYTES;
    // The most pages whose summary fits beside them.
    let summary = slots.div_ceil(SUMMARY_PER_PAGE + 1);
    (summary, slots - summary)
}

/// Unique page stamps: each writer's series starts at a random point (62 bits) and counts up.
/// An epoch alone would not do: an open that writes pages and dies before its checkpoint
/// commits leaves the next open the same epoch, which would hand out the same stamps for pages
/// in the same lowest free places, and a lost write of the newer page would go unnoticed.
/// Series of random starts overlap with a chance of about (pages written)² / 2^62.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamps {
    next: u64,
}

impl Stamps {
    /// A fresh series (the kernel's random source; should it fail, the epoch and the clock).
    pub(crate) fn new(epoch: u64) -> Stamps {
        let start = crate::format::random_bytes::<8>()
            .map(u64::from_le_bytes)
            .unwrap_or_else(|_| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                epoch.rotate_left(40) ^ nanos
            });
        Stamps {
            // Room to count up without wrapping.
            next: start >> 2,
        }
    }

    pub(crate) fn take(&mut self) -> u64 {
        let s = self.next;
        self.next += 1;
        s
    }

    /// The root's `next_stamp`.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }
}

/// Where the writer gets its segments and what it seals them with.
pub(crate) struct MetaTarget<'a> {
    pub store: &'a dyn SegmentStore,
    pub key: &'a LogKey,
    pub pool_uuid: [u8; 16],
    pub epoch: u64,
    pub segment_bytes: u64,
    /// A free segment for metadata (from the checkpoint reserve), or an error (no space).
    pub alloc: &'a mut dyn FnMut() -> Result<u32>,
    /// A fresh nonce for a segment's new use.
    pub nonce: &'a dyn Fn(u32) -> [u8; 16],
}

struct Open {
    segment: u32,
    /// Header, summary, then the pages added so far: a segment's worth, allocated once (a
    /// growing `Vec` and a copy into an aligned buffer held up to three times as much).
    buf: AlignedBuf,
    /// Bytes of `buf` used.
    used: usize,
    pages: usize,
}

/// What a writer wrote.
#[derive(Debug, Default, Clone)]
pub(crate) struct Written {
    /// Segments, in the order written.
    pub segments: Vec<u32>,
    /// (segment, pages) for each.
    pub pages: Vec<(u32, u32)>,
    /// Device bytes (headers and summaries included).
    pub bytes: u64,
}

/// Packs pages into metadata segments, a segment per `put`. Pointers are handed out as pages
/// are added; nothing is durable before [`MetaWriter::finish`] returns (then the caller syncs
/// and commits a root that names them).
pub(crate) struct MetaWriter<'a> {
    t: MetaTarget<'a>,
    stamps: &'a mut Stamps,
    summary_pages: usize,
    slots: usize,
    open: Option<Open>,
    written: Written,
}

impl<'a> MetaWriter<'a> {
    pub(crate) fn new(t: MetaTarget<'a>, stamps: &'a mut Stamps) -> MetaWriter<'a> {
        let (summary_pages, slots) = layout(t.segment_bytes);
        MetaWriter {
            t,
            stamps,
            summary_pages,
            slots,
            open: None,
            written: Written::default(),
        }
    }

    /// Add a page; returns where it will be.
    pub(crate) fn page(
        &mut self,
        kind: PageKind,
        level: u8,
        key: u64,
        array: PageArray,
        entries: u32,
        body: &[u8],
    ) -> Result<PagePtr> {
        if self.open.as_ref().is_some_and(|o| o.pages == self.slots) {
            self.put()?;
        }
        let (summary_pages, seal_key, stamp) = (self.summary_pages, self.t.key, self.stamps.take());
        let o = self.open_segment()?;
        let slot = o.pages;
        let offset = IO_ALIGN + (summary_pages + slot) * PAGE_BYTES;
        let at = PagePtr {
            segment: o.segment,
            offset: offset as u32,
            stamp,
        };
        let h = PageHeader {
            kind,
            level,
            key,
            array,
            entries,
            at,
        };
        debug_assert_eq!(o.used, offset);
        o.buf[offset..offset + PAGE_BYTES].copy_from_slice(&h.seal(body, seal_key)[..]);
        o.used += PAGE_BYTES;
        let s = IO_ALIGN + slot / SUMMARY_PER_PAGE * PAGE_BYTES + slot % SUMMARY_PER_PAGE * 12;
        Put::new(&mut o.buf[s..s + 12])
            .bytes(&[array as u32 as u8, level])
            .u16(0)
            .u64(key);
        o.pages += 1;
        Ok(at)
    }

    /// Add `bytes` (a checkpoint root) after the pages, from a 4 KiB boundary, in the open
    /// segment if it has room, else in a new one; returns (segment, offset). Its slots'
    /// summary entries say array 255 (not a page).
    pub(crate) fn record(&mut self, bytes: &[u8]) -> Result<(u32, u32)> {
        let pages = bytes.len().div_ceil(PAGE_BYTES).max(1);
        if pages > self.slots {
            return Err(crate::error::Error::Internal {
                what: "a checkpoint root larger than a segment",
            });
        }
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.pages + pages > self.slots)
        {
            self.put()?;
        }
        let o = self.open_segment()?;
        // The rest of its pages are zero (a fresh buffer).
        let offset = o.used;
        o.buf[offset..offset + bytes.len()].copy_from_slice(bytes);
        o.used += pages * PAGE_BYTES;
        for slot in o.pages..o.pages + pages {
            let s = IO_ALIGN + slot / SUMMARY_PER_PAGE * PAGE_BYTES + slot % SUMMARY_PER_PAGE * 12;
            o.buf[s] = 255;
        }
        o.pages += pages;
        Ok((o.segment, offset as u32))
    }

    /// The segment being filled, a new one if none is.
    fn open_segment(&mut self) -> Result<&mut Open> {
        if self.open.is_none() {
            let segment = (self.t.alloc)()?;
            self.open = Some(Open {
                segment,
                buf: AlignedBuf::new(self.t.segment_bytes as usize),
                used: IO_ALIGN + self.summary_pages * PAGE_BYTES,
                pages: 0,
            });
        }
        Ok(self.open.as_mut().expect("just opened"))
    }

    /// Write the open segment (its used part).
    fn put(&mut self) -> Result<()> {
        let Some(mut o) = self.open.take() else {
            return Ok(());
        };
        let h = SegmentHeader {
            kind: SegmentKind::Meta,
            segment: o.segment,
            shard: 0,
            pool_uuid: self.t.pool_uuid,
            epoch: self.t.epoch,
            next_segment: NO_SEGMENT,
            nonce: (self.t.nonce)(o.segment),
        };
        h.encode(&mut o.buf[..IO_ALIGN], self.t.key);
        let used = o.used;
        let mut data = o.buf;
        data.truncate(used);
        let (store, epoch, seg) = (self.t.store, self.t.epoch, o.segment);
        store::wait(|done| store.put(epoch, seg, data, done))?;
        self.written.segments.push(o.segment);
        self.written.pages.push((o.segment, o.pages as u32));
        self.written.bytes += used as u64;
        Ok(())
    }

    /// The stamp the next page would take (the root's `next_stamp`).
    pub(crate) fn next_stamp(&self) -> u64 {
        self.stamps.next()
    }

    /// Write what is still open; returns what was written.
    pub(crate) fn finish(mut self) -> Result<Written> {
        self.put()?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Get;
    use crate::meta::tests::{Disk, SEG};

    /// Pages fill a segment's slots, then the next segment: each written once, with a metadata
    /// segment header sealed under the pool's key and a summary saying what each slot holds.
    #[test]
    fn pages_fill_segments_with_their_summary() {
        let (summary, slots) = layout(SEG);
        assert_eq!((summary, slots), (1, 254));
        assert_eq!(layout(8 << 20), (6, 2041));
        let disk = Disk::new(8);
        let (ptrs, pages) = disk.write(|w| {
            (0..300u64)
                .map(|k| {
                    w.page(
                        PageKind::MapLeaf,
                        0,
                        k,
                        PageArray::MapTree,
                        0,
                        &[k as u8; 8],
                    )
                })
                .collect::<Result<Vec<_>>>()
        });
        assert_eq!(pages, 300);
        assert_eq!((ptrs[253].segment, ptrs[254].segment), (0, 1));
        assert_eq!(ptrs[254].offset as usize, IO_ALIGN + PAGE_BYTES);
        let seg1 = store::read_now(
            &disk.store,
            1,
            crate::store::Range {
                segment: 1,
                offset: 0,
            },
            2 * PAGE_BYTES,
        )
        .unwrap();
        let h = SegmentHeader::decode_authentic(&seg1, Some(&disk.key)).expect("sealed");
        assert_eq!(
            (h.kind, h.segment, h.next_segment),
            (SegmentKind::Meta, 1, NO_SEGMENT)
        );
        let mut g = Get::new(&seg1[IO_ALIGN..], "summary");
        let first: [u8; 4] = g.array().unwrap();
        assert_eq!(first, [PageArray::MapTree as u32 as u8, 0, 0, 0]);
        assert_eq!(g.u64().unwrap(), 254);
        // Stamps never repeat, and another writer's series starts elsewhere.
        let mut stamps: Vec<u64> = ptrs.iter().map(|p| p.stamp).collect();
        stamps.dedup();
        assert_eq!(stamps.len(), 300);
        let other = Stamps::new(1).take();
        assert!(!stamps.contains(&other));
    }
}
