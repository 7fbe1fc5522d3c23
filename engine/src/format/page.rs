//! Metadata pages (format 3, docs/design/paged-metadata.md §4.3): the block table, the volumes'
//! maps and the other per-block arrays stored on flash in 4 KiB pages, cached in RAM under a
//! budget. Pages live only in metadata segments, which the checkpointer writes and which never
//! hold a client's byte, and are reached only through a [`PagePtr`] from the checkpoint root or
//! a parent page. Still, a pointer may be stale (a bug, a rolled-back device) and a segment may
//! have held client data before: a page is trusted only when its MAC, under the pool's log key
//! and bound to where it lies and to the unique stamp its pointer names, verifies.

use super::codec::{Get, Put};
use super::key::{log_mac, mac_eq, LogKey, MAC_BYTES};
use super::{NO_SEGMENT, PAGE_MAGIC};

/// Bytes of a page on disk.
pub const PAGE_BYTES: usize = 4096;
/// Bytes of its header.
pub const PAGE_HEADER_BYTES: usize = 64;
/// Bytes of its body.
pub const PAGE_BODY_BYTES: usize = PAGE_BYTES - PAGE_HEADER_BYTES;
/// Page layout version.
pub const PAGE_VERSION: u16 = 1;
/// Entries of a map leaf (block ids, 6 bytes each): 512, as the RAM map's pages, so a leaf
/// covers 2 MiB of a volume.
pub const MAP_PAGE_SLOTS: usize = 512;
/// [`PagePtr`]s in an array interior or page-table leaf, and [`BlockLoc`]s in a block-table leaf.
pub const PTRS_PER_PAGE: usize = PAGE_BODY_BYTES / PagePtr::BYTES;
/// Reference counts (a byte each) in a refcount leaf.
pub const REFS_PER_PAGE: usize = PAGE_BODY_BYTES;
/// Segment usage entries in a segment-usage leaf.
pub const USAGE_PER_PAGE: usize = PAGE_BODY_BYTES / SegUsage::BYTES;
/// Dedup index entries in an index page.
pub const INDEX_PER_PAGE: usize = PAGE_BODY_BYTES / IndexSlot::BYTES;
/// Largest id a 6-byte field holds (block ids and page ids): 2^48 blocks are 1 EiB.
pub const MAX_U48: u64 = (1 << 48) - 1;

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// [`MAP_PAGE_SLOTS`] block ids (0 = hole).
    MapLeaf = 1,
    /// Reserved for map trees of page ids (not written: volumes use leaf directories).
    MapInterior = 2,
    /// Entries of an array (block table, page table, reference counts, segment usage).
    ArrayLeaf = 3,
    /// [`PTRS_PER_PAGE`] pointers to the array's pages one level down.
    ArrayInterior = 4,
    /// [`INDEX_PER_PAGE`] dedup index entries, sorted by key.
    DedupIndex = 5,
}

impl PageKind {
    fn from_u8(v: u8) -> Option<PageKind> {
        Some(match v {
            1 => PageKind::MapLeaf,
            2 => PageKind::MapInterior,
            3 => PageKind::ArrayLeaf,
            4 => PageKind::ArrayInterior,
            5 => PageKind::DedupIndex,
            _ => return None,
        })
    }
}

/// Which structure a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum PageArray {
    /// The volumes' map trees (keyed by page id through the page table).
    MapTree = 0,
    /// Block id -> [`BlockLoc`].
    BlockTable = 1,
    /// Page id -> [`PagePtr`].
    PageTable = 2,
    /// Block id -> reference count byte: 0 free, 1..=253 the count, 254 a count in the root's
    /// overflow section (with `ROOT_COUNTS`; without it, 1 live and 0 not, as older builds
    /// wrote).
    BlockRefs = 3,
    /// Page id -> reference count byte.
    PageRefs = 4,
    /// Segment -> [`SegUsage`] (written with `ROOT_COUNTS`: every segment's live bytes).
    SegmentUsage = 5,
    /// The saved dedup index.
    DedupIndex = 6,
    /// A volume's leaf directory: leaf index -> [`PagePtr`] of its map leaf (absent: a hole).
    /// Snapshots and clones name the same leaf pages.
    MapDirectory = 7,
}

impl PageArray {
    pub(super) fn from_u32(v: u32) -> Option<PageArray> {
        Some(match v {
            0 => PageArray::MapTree,
            1 => PageArray::BlockTable,
            2 => PageArray::PageTable,
            3 => PageArray::BlockRefs,
            4 => PageArray::PageRefs,
            5 => PageArray::SegmentUsage,
            6 => PageArray::DedupIndex,
            7 => PageArray::MapDirectory,
            _ => return None,
        })
    }
}

/// A volume's map directory entry (array [`PageArray::MapDirectory`]): where the map leaf of
/// its 2 MiB slot lies and how many of the leaf's entries are set, so that an open learns each
/// leaf's count without reading the leaf. 16 bytes, as a [`PagePtr`]: segment u32; offset u32,
/// whose low 12 bits (always zero in a page's offset) hold the count plus one (0: not stored,
/// as in directories of roots without [`super::root::ROOT_DIR_COUNTS`]); stamp u64. An absent
/// entry is [`PagePtr::ABSENT`] with no count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry {
    pub at: PagePtr,
    pub count: Option<u16>,
}

impl DirEntry {
    pub const BYTES: usize = PagePtr::BYTES;
    /// Bits of the offset that hold the count plus one.
    const COUNT_MASK: u32 = PAGE_BYTES as u32 - 1;

    pub fn put(&self, p: &mut Put<'_>) {
        debug_assert_eq!(self.at.offset & Self::COUNT_MASK, 0, "a page's offset");
        let low = match self.count {
            Some(c) if !self.at.is_absent() => u32::from(c) + 1,
            _ => 0,
        };
        p.u32(self.at.segment)
            .u32(self.at.offset | low)
            .u64(self.at.stamp);
    }

    pub fn get(g: &mut Get<'_>) -> crate::error::Result<DirEntry> {
        let segment = g.u32()?;
        let raw = g.u32()?;
        let stamp = g.u64()?;
        let count = match raw & Self::COUNT_MASK {
            0 => None,
            n if n as usize <= MAP_PAGE_SLOTS + 1 => Some(n as u16 - 1),
            _ => {
                return Err(crate::error::Error::Corrupt {
                    what: "map directory entry",
                })
            }
        };
        Ok(DirEntry {
            at: PagePtr {
                segment,
                offset: raw & !Self::COUNT_MASK,
                stamp,
            },
            count,
        })
    }
}

/// Where a page was written, and which write of it: the stamp is unique per page write in the
/// pool's life, so an older page left at the same place never passes for the one pointed at.
/// 16 bytes: segment u32, offset u32 (bytes within the segment), stamp u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PagePtr {
    pub segment: u32,
    pub offset: u32,
    pub stamp: u64,
}

impl PagePtr {
    pub const BYTES: usize = 16;
    /// No page (an absent subtree or array range).
    pub const ABSENT: PagePtr = PagePtr {
        segment: NO_SEGMENT,
        offset: 0,
        stamp: 0,
    };

    pub fn is_absent(&self) -> bool {
        self.segment == NO_SEGMENT
    }

    pub fn put(&self, p: &mut Put<'_>) {
        p.u32(self.segment).u32(self.offset).u64(self.stamp);
    }

    pub fn get(g: &mut Get<'_>) -> crate::error::Result<PagePtr> {
        Ok(PagePtr {
            segment: g.u32()?,
            offset: g.u32()?,
            stamp: g.u64()?,
        })
    }
}

/// A stored block's location and checksum: a block-table leaf's entry. 16 bytes: segment u32,
/// offset u32, stored_len u16, flags u16 (as in [`super::DataEntry`]), crc u32 (of the stored
/// payload).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLoc {
    pub segment: u32,
    pub offset: u32,
    pub stored_len: u16,
    pub flags: u16,
    pub crc: u32,
}

impl BlockLoc {
    pub const BYTES: usize = 16;

    pub fn put(&self, p: &mut Put<'_>) {
        p.u32(self.segment)
            .u32(self.offset)
            .u16(self.stored_len)
            .u16(self.flags)
            .u32(self.crc);
    }

    pub fn get(g: &mut Get<'_>) -> crate::error::Result<BlockLoc> {
        Ok(BlockLoc {
            segment: g.u32()?,
            offset: g.u32()?,
            stored_len: g.u16()?,
            flags: g.u16()?,
            crc: g.u32()?,
        })
    }
}

/// A segment's usage: a segment-usage leaf's entry. 8 bytes: live_bytes u32, state u8,
/// flags u8, reserved u16.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegUsage {
    pub live_bytes: u32,
    pub state: u8,
    pub flags: u8,
}

impl SegUsage {
    pub const BYTES: usize = 8;

    pub fn put(&self, p: &mut Put<'_>) {
        p.u32(self.live_bytes)
            .bytes(&[self.state, self.flags])
            .u16(0);
    }

    pub fn get(g: &mut Get<'_>) -> crate::error::Result<SegUsage> {
        let live_bytes = g.u32()?;
        let [state, flags] = g.array()?;
        g.skip(2)?;
        Ok(SegUsage {
            live_bytes,
            state,
            flags,
        })
    }
}

/// A saved dedup index entry. 14 bytes: key u64 (keyed fingerprint), block id u48.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSlot {
    pub key: u64,
    pub id: u64,
}

impl IndexSlot {
    pub const BYTES: usize = 14;

    pub fn put(&self, p: &mut Put<'_>) {
        p.u64(self.key);
        put_u48(p, self.id);
    }

    pub fn get(g: &mut Get<'_>) -> crate::error::Result<IndexSlot> {
        Ok(IndexSlot {
            key: g.u64()?,
            id: get_u48(g)?,
        })
    }
}

/// Write the low 48 bits of `v` (ids never reach 2^48: see [`MAX_U48`]).
pub fn put_u48(p: &mut Put<'_>, v: u64) {
    debug_assert!(v <= MAX_U48, "id {v} beyond 48 bits");
    p.bytes(&v.to_le_bytes()[..6]);
}

pub fn get_u48(g: &mut Get<'_>) -> crate::error::Result<u64> {
    let b: [u8; 6] = g.array()?;
    let mut v = [0u8; 8];
    v[..6].copy_from_slice(&b);
    Ok(u64::from_le_bytes(v))
}

/// Header of a metadata page (the first 64 of its 4096 bytes).
///
/// | off | size | field | why |
/// |----:|----:|---|---|
/// | 0 | 4 | magic `IPAG` | |
/// | 4 | 2 | version | [`PAGE_VERSION`] |
/// | 6 | 1 | kind | [`PageKind`] |
/// | 7 | 1 | level | 0 for leaves; interiors count up towards the root |
/// | 8 | 8 | key | leaf index in its volume (map leaves), or index within the array at this level |
/// | 16 | 8 | stamp | unique per page write: each writer counts up from a random point |
/// | 24 | 4 | array | [`PageArray`] |
/// | 28 | 4 | entries | entries of the body in use |
/// | 32 | 4 | body_crc | CRC-32 of the 4032-byte body |
/// | 36 | 4 | segment | where it was written (a misdirected or stale page does not verify) |
/// | 40 | 4 | offset | byte offset within that segment |
/// | 44 | 4 | reserved | zero |
/// | 48 | 16 | mac | [`log_mac`] of bytes 0..48 and the body |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    pub kind: PageKind,
    pub level: u8,
    pub key: u64,
    pub array: PageArray,
    pub entries: u32,
    /// Where and which write: must equal the pointer the page is read through.
    pub at: PagePtr,
}

/// What a reader expects of a page it reads through a pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageWant {
    pub kind: PageKind,
    pub level: u8,
    pub key: u64,
    pub array: PageArray,
    pub at: PagePtr,
}

/// Why a page was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageFault {
    #[error("not a metadata page (magic)")]
    Magic,
    #[error("metadata page version {0} is not known")]
    Version(u16),
    #[error("metadata page does not verify under the pool's key")]
    Mac,
    #[error("metadata page is another page than the one pointed at")]
    NotThePage,
    #[error("metadata page body fails its checksum")]
    BodyChecksum,
    #[error("metadata page claims more entries than its body holds")]
    Entries,
}

const MAC_AT: usize = 48;
const MAC_DOMAIN: &[u8] = b"ingot page v1";

/// Bodies of each kind hold at most this many entries.
fn max_entries(kind: PageKind, array: PageArray) -> usize {
    match (kind, array) {
        (PageKind::MapLeaf | PageKind::MapInterior, _) => MAP_PAGE_SLOTS,
        (PageKind::ArrayInterior, _) => PTRS_PER_PAGE,
        (PageKind::DedupIndex, _) => INDEX_PER_PAGE,
        (PageKind::ArrayLeaf, PageArray::BlockRefs | PageArray::PageRefs) => REFS_PER_PAGE,
        (PageKind::ArrayLeaf, PageArray::SegmentUsage) => USAGE_PER_PAGE,
        (PageKind::ArrayLeaf, PageArray::DedupIndex) => INDEX_PER_PAGE,
        (PageKind::ArrayLeaf, _) => PTRS_PER_PAGE,
    }
}

impl PageHeader {
    /// The whole page: this header, sealed, then `body` (at most [`PAGE_BODY_BYTES`], the rest
    /// zero).
    pub fn seal(&self, body: &[u8], key: &LogKey) -> Box<[u8; PAGE_BYTES]> {
        assert!(
            body.len() <= PAGE_BODY_BYTES,
            "page body of {} bytes",
            body.len()
        );
        let mut page = Box::new([0u8; PAGE_BYTES]);
        page[PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + body.len()].copy_from_slice(body);
        let body_crc = crc32fast::hash(&page[PAGE_HEADER_BYTES..]);
        Put::new(&mut page[..MAC_AT])
            .bytes(&PAGE_MAGIC)
            .u16(PAGE_VERSION)
            .bytes(&[self.kind as u8, self.level])
            .u64(self.key)
            .u64(self.at.stamp)
            .u32(self.array as u32)
            .u32(self.entries)
            .u32(body_crc)
            .u32(self.at.segment)
            .u32(self.at.offset)
            .u32(0);
        let mac = log_mac(
            key,
            MAC_DOMAIN,
            &[&page[..MAC_AT], &page[PAGE_HEADER_BYTES..]],
        );
        page[MAC_AT..PAGE_HEADER_BYTES].copy_from_slice(&mac);
        page
    }

    /// Check `page` (a whole page as read) against what its pointer promised; its body is
    /// `&page[PAGE_HEADER_BYTES..]`. Never trusts a byte before the MAC verifies.
    pub fn open(page: &[u8], key: &LogKey, want: &PageWant) -> Result<PageHeader, PageFault> {
        let page = page.get(..PAGE_BYTES).ok_or(PageFault::Magic)?;
        if page[..4] != PAGE_MAGIC {
            return Err(PageFault::Magic);
        }
        // The body too: a page is trusted whole or not at all (its CRC alone is forgeable).
        let mac = log_mac(
            key,
            MAC_DOMAIN,
            &[&page[..MAC_AT], &page[PAGE_HEADER_BYTES..]],
        );
        if !mac_eq(&mac, &page[MAC_AT..MAC_AT + MAC_BYTES]) {
            return Err(PageFault::Mac);
        }
        let mut g = Get::new(&page[..MAC_AT], "page header");
        let parse = |g: &mut Get<'_>| -> crate::error::Result<_> {
            g.skip(4)?;
            let version = g.u16()?;
            let [kind, level] = g.array()?;
            let key = g.u64()?;
            let stamp = g.u64()?;
            let array = g.u32()?;
            let entries = g.u32()?;
            let body_crc = g.u32()?;
            let segment = g.u32()?;
            let offset = g.u32()?;
            Ok((
                version, kind, level, key, stamp, array, entries, body_crc, segment, offset,
            ))
        };
        let (version, kind, level, pkey, stamp, array, entries, body_crc, segment, offset) =
            parse(&mut g).map_err(|_| PageFault::Magic)?;
        if version != PAGE_VERSION {
            return Err(PageFault::Version(version));
        }
        let h = PageHeader {
            kind: PageKind::from_u8(kind).ok_or(PageFault::NotThePage)?,
            level,
            key: pkey,
            array: PageArray::from_u32(array).ok_or(PageFault::NotThePage)?,
            entries,
            at: PagePtr {
                segment,
                offset,
                stamp,
            },
        };
        let got = PageWant {
            kind: h.kind,
            level: h.level,
            key: h.key,
            array: h.array,
            at: h.at,
        };
        if got != *want {
            return Err(PageFault::NotThePage);
        }
        if entries as usize > max_entries(h.kind, h.array) {
            return Err(PageFault::Entries);
        }
        if crc32fast::hash(&page[PAGE_HEADER_BYTES..]) != body_crc {
            return Err(PageFault::BodyChecksum);
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LogKey {
        LogKey([7; 32])
    }

    fn leaf() -> (PageHeader, Vec<u8>) {
        let h = PageHeader {
            kind: PageKind::MapLeaf,
            level: 0,
            key: 42,
            array: PageArray::MapTree,
            entries: 3,
            at: PagePtr {
                segment: 9,
                offset: 8192,
                stamp: 5 << 40 | 17,
            },
        };
        let mut body = vec![0u8; MAP_PAGE_SLOTS * 6];
        let mut p = Put::new(&mut body);
        for id in [1u64, 0, MAX_U48] {
            put_u48(&mut p, id);
        }
        (h, body)
    }

    fn want(h: &PageHeader) -> PageWant {
        PageWant {
            kind: h.kind,
            level: h.level,
            key: h.key,
            array: h.array,
            at: h.at,
        }
    }

    #[test]
    fn a_page_round_trips_and_its_body_reads_back() {
        let (h, body) = leaf();
        let page = h.seal(&body, &key());
        assert_eq!(PageHeader::open(&page[..], &key(), &want(&h)), Ok(h));
        let mut g = Get::new(&page[PAGE_HEADER_BYTES..], "map leaf");
        let ids: Vec<u64> = (0..3).map(|_| get_u48(&mut g).unwrap()).collect();
        assert_eq!(ids, [1, 0, MAX_U48]);
    }

    /// Directory entries keep their pointer whole and carry a count from 0 to a leaf's
    /// slots; one written without a count (an older root's) reads as a pointer with none, and
    /// a count past a leaf's slots is corruption.
    #[test]
    fn directory_entries_carry_their_leaves_counts() {
        let at = PagePtr {
            segment: 3,
            offset: 77 * PAGE_BYTES as u32,
            stamp: u64::MAX - 1,
        };
        let round = |e: DirEntry| {
            let mut b = [0u8; DirEntry::BYTES];
            e.put(&mut Put::new(&mut b));
            DirEntry::get(&mut Get::new(&b, "entry")).unwrap()
        };
        for count in [Some(0), Some(1), Some(MAP_PAGE_SLOTS as u16), None] {
            assert_eq!(round(DirEntry { at, count }), DirEntry { at, count });
        }
        // An absent slot stays exactly `ABSENT` (no count).
        let absent = DirEntry {
            at: PagePtr::ABSENT,
            count: Some(5),
        };
        assert_eq!(
            round(absent),
            DirEntry {
                at: PagePtr::ABSENT,
                count: None
            }
        );
        // A pointer as an older root wrote it.
        let mut b = [0u8; DirEntry::BYTES];
        at.put(&mut Put::new(&mut b));
        let old = DirEntry::get(&mut Get::new(&b, "entry")).unwrap();
        assert_eq!(old, DirEntry { at, count: None });
        // Low bits past a leaf's slots.
        let mut b = [0u8; DirEntry::BYTES];
        let bad = PagePtr {
            offset: at.offset | (MAP_PAGE_SLOTS as u32 + 2),
            ..at
        };
        bad.put(&mut Put::new(&mut b));
        assert!(DirEntry::get(&mut Get::new(&b, "entry")).is_err());
    }

    /// A page is refused under another key, at another place, from another write (stamp), as
    /// another page, with a flipped body bit, or with more entries than a body holds.
    #[test]
    fn a_page_is_refused_unless_it_is_exactly_the_one_pointed_at() {
        let (h, body) = leaf();
        let page = h.seal(&body, &key());
        let w = want(&h);
        assert_eq!(
            PageHeader::open(&page[..], &LogKey([8; 32]), &w),
            Err(PageFault::Mac)
        );
        let moved = |f: fn(&mut PageWant)| {
            let mut w = w;
            f(&mut w);
            PageHeader::open(&page[..], &key(), &w)
        };
        assert_eq!(moved(|w| w.at.offset += 4096), Err(PageFault::NotThePage));
        assert_eq!(moved(|w| w.at.segment += 1), Err(PageFault::NotThePage));
        assert_eq!(moved(|w| w.at.stamp += 1), Err(PageFault::NotThePage));
        assert_eq!(moved(|w| w.key += 1), Err(PageFault::NotThePage));
        assert_eq!(moved(|w| w.level = 1), Err(PageFault::NotThePage));
        assert_eq!(
            moved(|w| w.array = PageArray::BlockTable),
            Err(PageFault::NotThePage)
        );
        // A body changed under its header, even with the CRC made to match, breaks the MAC.
        let mut bad = page.clone();
        bad[PAGE_BYTES - 1] ^= 1;
        assert_eq!(PageHeader::open(&bad[..], &key(), &w), Err(PageFault::Mac));
        let crc = crc32fast::hash(&bad[PAGE_HEADER_BYTES..]);
        bad[32..36].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(PageHeader::open(&bad[..], &key(), &w), Err(PageFault::Mac));
        // A header byte changed (here the entry count) breaks the MAC.
        let mut bad = page.clone();
        bad[28] ^= 1;
        assert_eq!(PageHeader::open(&bad[..], &key(), &w), Err(PageFault::Mac));
        let over = PageHeader {
            entries: MAP_PAGE_SLOTS as u32 + 1,
            ..h
        };
        let page = over.seal(&body, &key());
        assert_eq!(
            PageHeader::open(&page[..], &key(), &w),
            Err(PageFault::Entries)
        );
        assert_eq!(
            PageHeader::open(&page[..100], &key(), &w),
            Err(PageFault::Magic)
        );
    }

    #[test]
    fn entries_fill_a_body_exactly_or_nearly() {
        assert_eq!(PTRS_PER_PAGE, 252);
        assert_eq!(PTRS_PER_PAGE * BlockLoc::BYTES, PAGE_BODY_BYTES);
        assert_eq!(USAGE_PER_PAGE, 504);
        assert_eq!(INDEX_PER_PAGE, 288);
        let mut body = [0u8; PAGE_BODY_BYTES];
        let loc = BlockLoc {
            segment: 3,
            offset: 4096 * 7,
            stored_len: 4096,
            flags: 0x1201,
            crc: 0xdead_beef,
        };
        let usage = SegUsage {
            live_bytes: 123,
            state: 2,
            flags: 1,
        };
        let slot = IndexSlot {
            key: u64::MAX,
            id: MAX_U48,
        };
        let ptr = PagePtr {
            segment: 1,
            offset: 2,
            stamp: 3,
        };
        {
            let mut p = Put::new(&mut body);
            loc.put(&mut p);
            usage.put(&mut p);
            slot.put(&mut p);
            ptr.put(&mut p);
            PagePtr::ABSENT.put(&mut p);
        }
        let mut g = Get::new(&body, "body");
        assert_eq!(BlockLoc::get(&mut g).unwrap(), loc);
        assert_eq!(SegUsage::get(&mut g).unwrap(), usage);
        assert_eq!(IndexSlot::get(&mut g).unwrap(), slot);
        assert_eq!(PagePtr::get(&mut g).unwrap(), ptr);
        assert!(PagePtr::get(&mut g).unwrap().is_absent());
    }
}
