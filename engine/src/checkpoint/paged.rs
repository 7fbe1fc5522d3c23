//! A checkpoint's [`Image`] written as format 3 (issue 22): metadata pages in metadata segments
//! and a [`CheckpointRoot`] that names them, instead of one blob. Each volume's map is a leaf
//! directory ([`PageArray::MapDirectory`]) of pointers to its map leaves; a leaf that snapshots
//! and clones share is written once and named by each of their directories, and comes back
//! shared (one `MapLeaf`, one user per volume). The block table and the liveness of block ids
//! are paged arrays, the dedup index an array of [`IndexSlot`]s.
//!
//! A checkpoint writes only what changed since the last one (docs/design/paged-metadata.md,
//! milestone 11): the block table and liveness pages under the chunks the image says changed,
//! the map leaves no committed checkpoint holds as they are, the directory pages whose entries
//! changed, and the interior pages above all of these; plus every page of the segments being
//! cleaned, so that they can be freed. The first checkpoint after an open starts from the
//! pages of the checkpoint the open read (`Image::pages`); one after a failed checkpoint, or
//! after an upgrade from format 2, writes everything, as does every checkpoint of a pool of a
//! few dozen segments.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::{Image, VolumeImage};
use crate::api::DedupDomain;
use crate::error::{Error, Result};
use crate::format::{
    put_u48, ArrayRoot, BlockLoc, CheckpointRoot, DirEntry, Get, IndexSlot, LogKey, PageArray,
    PageKind, PagePtr, Put, RootChain, RootIndex, RootVolume, SegUsage, CHAIN_DATA, CHAIN_MOVES,
    DOMAIN_NAMED, DOMAIN_PRIVATE, DOMAIN_SHARED, MAP_PAGE_SLOTS, PAGE_BODY_BYTES, ROOT_COUNTS,
    ROOT_DIR_COUNTS, ROOT_KEYED, ROOT_OVERFLOW_MAX,
};
use crate::log::ShardPosition;
use crate::map::{leaf_slots, MapLeaf};
use crate::meta::cache::open_leaf;
use crate::meta::paged::{ArrayPages, PageEntry, PageSource};
use crate::meta::writer::MetaWriter;
use crate::qos::QosLimits;
use crate::space::{BlockEntry, BlockTable, RefCounts, CHANGE_UNIT};

impl PageEntry for IndexSlot {
    const PER_PAGE: usize = PAGE_BODY_BYTES / IndexSlot::BYTES;
    fn put(&self, p: &mut Put<'_>) {
        IndexSlot::put(self, p);
    }
    fn get(g: &mut Get<'_>) -> Result<Self> {
        IndexSlot::get(g)
    }
}

fn all(n: u64, per_page: usize) -> Vec<usize> {
    (0..(n as usize).div_ceil(per_page)).collect()
}

/// Checkpoints between two write-outs of the dedup index at most (it holds hints only: an
/// older one loses some hits after an open, never data). It is written sooner when its size
/// moved by more than an eighth, and by a pool's last checkpoint before it closes.
const INDEX_EVERY: u32 = 16;

/// Segment usage leaves at most that every checkpoint rewrites whole (32 KiB, 4032 segments).
const USAGE_WHOLE: usize = 8;

/// A block-table entry as stored.
fn entry_of(l: &BlockLoc) -> BlockEntry {
    BlockEntry {
        segment: l.segment,
        offset: l.offset,
        stored_len: l.stored_len,
        flags: l.flags,
        crc: l.crc,
    }
}

/// A volume's leaf directory as last written: its pages and its entries.
#[derive(Debug)]
struct Dir {
    pages: ArrayPages,
    ptrs: Vec<PagePtr>,
}

/// What the checkpointer keeps of the last committed format 3 checkpoint to write only what
/// changed in the next: where each array's pages are, each volume's directory, which map leaf
/// pages the directories name (a page no directory names any more is superseded), the index's
/// pages and the root's place.
#[derive(Debug)]
pub(crate) struct PagedState {
    table: ArrayPages,
    refs: ArrayPages,
    /// Whether the count pages hold counts (a build before `ROOT_COUNTS` wrote liveness
    /// only: the next checkpoint rewrites them all).
    counts: bool,
    /// Whether the directories carry their leaves' counts (`ROOT_DIR_COUNTS`; else the next
    /// checkpoint rewrites every directory page).
    dir_counts: bool,
    /// Segment usage pages, and the live bytes they hold.
    usage: ArrayPages,
    usage_bytes: Vec<u32>,
    /// Ids whose stored counts left dedup pins out: their count pages are rewritten by the
    /// next checkpoint (a pin that becomes a map entry's reference changes no count byte).
    pinned: Vec<u64>,
    dirs: HashMap<u32, Dir>,
    /// Map leaf pages -> directories naming them.
    named: HashMap<PagePtr, u32>,
    index: Option<(ArrayPages, RootIndex)>,
    /// Checkpoints since the index was written.
    index_age: u32,
    /// The root's segment and the page slots it takes.
    pub(crate) root: Option<(u32, u32)>,
    /// Pages an open read to learn this state (0 when written).
    pub(crate) pages_read: u64,
}

impl PagedState {
    /// Where each block-table leaf's page is.
    pub(crate) fn table_leaves(&self) -> &[PagePtr] {
        self.table.leaf_ptrs()
    }

    /// Pages of this image per metadata segment (the root's included): what `MetaSegs`
    /// retains for it.
    pub(crate) fn segment_pages(&self) -> std::collections::BTreeMap<u32, u32> {
        let mut out = std::collections::BTreeMap::new();
        let mut add = |p: &PagePtr| *out.entry(p.segment).or_insert(0) += 1;
        self.table.all().for_each(&mut add);
        self.refs.all().for_each(&mut add);
        self.usage.all().for_each(&mut add);
        for d in self.dirs.values() {
            d.pages.all().for_each(&mut add);
        }
        self.named.keys().for_each(&mut add);
        if let Some((p, _)) = &self.index {
            p.all().for_each(&mut add);
        }
        if let Some((seg, n)) = self.root {
            *out.entry(seg).or_insert(0) += n;
        }
        out
    }

    /// Bytes of RAM it holds: page pointers of the arrays and directories, and the names of
    /// map leaf pages (a hash map entry about twice the pointer and its count).
    pub(crate) fn ram_bytes(&self) -> u64 {
        let ptr = std::mem::size_of::<PagePtr>() as u64;
        let pages = |a: &ArrayPages| a.all().count() as u64 * ptr;
        let dirs: u64 = self
            .dirs
            .values()
            .map(|d| pages(&d.pages) + d.ptrs.capacity() as u64 * ptr)
            .sum();
        let index = self.index.as_ref().map_or(0, |(p, _)| pages(p));
        pages(&self.table)
            + pages(&self.refs)
            + pages(&self.usage)
            + self.usage_bytes.capacity() as u64 * 4
            + dirs
            + index
            + self.named.capacity() as u64 * 2 * (ptr + 4)
    }
}

/// A write-out: its root (the caller fills in `generation` and `next_stamp`), the state to keep
/// once it is committed, the pages of the previous image it no longer names, and the map
/// leaves it wrote (each learns where once the checkpoint is committed).
pub(crate) struct WriteOut {
    pub root: CheckpointRoot,
    pub state: PagedState,
    pub superseded: Vec<PagePtr>,
    pub leaves: Vec<(Arc<MapLeaf>, PagePtr)>,
}

/// Leaves of an array of `len` entries (`per` to a leaf) to write: under the units of
/// `CHANGE_UNIT` entries `units` names (all of them when `None`), the ones growth added or
/// changed, and those keeping a page in a segment being cleaned.
fn leaves_to_write(
    len: u64,
    per: usize,
    units: Option<&[usize]>,
    pages: &ArrayPages,
    victims: &BTreeSet<u32>,
) -> Vec<usize> {
    let n = (len as usize).div_ceil(per);
    let Some(units) = units else {
        return (0..n).collect();
    };
    let mut out = BTreeSet::new();
    for &c in units {
        let (lo, hi) = (c * CHANGE_UNIT, ((c + 1) * CHANGE_UNIT).min(len as usize));
        if lo < hi {
            out.extend(lo / per..=(hi - 1) / per);
        }
    }
    if len > pages.len() {
        out.extend(pages.len() as usize / per..n);
    }
    out.extend(pages.leaves_in(victims));
    out.into_iter().filter(|&i| i < n).collect()
}

/// Write `img`: all of it when `prev` is `None` (or the image does not know what changed),
/// else what changed since `prev`'s checkpoint and the pages of the segments in `victims`;
/// the dedup index when it is due or `save_index`.
pub(crate) fn write_image(
    img: &Image,
    prev: Option<PagedState>,
    victims: &BTreeSet<u32>,
    save_index: bool,
    w: &mut MetaWriter<'_>,
) -> Result<WriteOut> {
    let mut prev = prev.filter(|_| img.changed.is_some());
    let changed = img.changed.as_ref().filter(|_| prev.is_some());
    let prev_usage = prev.as_mut().map(|p| {
        (
            p.counts,
            std::mem::replace(&mut p.usage, ArrayPages::new(PageArray::SegmentUsage)),
            std::mem::take(&mut p.usage_bytes),
            std::mem::take(&mut p.pinned),
        )
    });
    // Directories written without their leaves' counts are rewritten (a whole write has none
    // to keep).
    let dir_counts = prev.as_ref().is_none_or(|p| p.dir_counts);
    let (mut table, mut refs, mut dirs, mut named, old_index, index_age, old_root) = match prev {
        Some(p) => (
            p.table,
            p.refs,
            p.dirs,
            p.named,
            p.index,
            p.index_age,
            p.root,
        ),
        None => (
            ArrayPages::new(PageArray::BlockTable),
            ArrayPages::new(PageArray::BlockRefs),
            HashMap::new(),
            HashMap::new(),
            None,
            0,
            None,
        ),
    };
    let (counted_pages, mut usage, old_usage, old_pinned) = match prev_usage {
        Some(u) => u,
        None => (
            false,
            ArrayPages::new(PageArray::SegmentUsage),
            Vec::new(),
            Vec::new(),
        ),
    };
    // The counts, when the image has them and their overflow fits the root.
    let counts = img
        .counts
        .as_ref()
        .filter(|_| img.refs.overflow_len() <= ROOT_OVERFLOW_MAX);
    // Stored counts as the image's maps hold them: dedup pins taken off (their records are
    // not written yet). Ids left with none are in use all the same: listed (root section 10)
    // for the open to hold, and taken off the totals. Without the counts stored, the bytes
    // keep the pins: an open that recounts holds the ids they make live.
    let unpinned: HashMap<u64, u32> = img
        .pins
        .iter()
        .filter(|_| counts.is_some())
        .map(|&(id, n)| (id, img.refs.get(id).saturating_sub(n)))
        .collect();
    let stored_byte = |id: u64| match unpinned.get(&id) {
        Some(&c) => c.min(254) as u8,
        None => img.refs.stored_byte(id),
    };
    let mut held: Vec<u64> = unpinned
        .iter()
        .filter(|&(_, &c)| c == 0)
        .map(|(&id, _)| id)
        .collect();
    held.sort_unstable();
    let mut held_shares: Vec<BlockEntry> = Vec::with_capacity(held.len());
    for &id in &held {
        let l = id as usize / crate::space::TABLE_LEAF;
        if let Some(e) = img
            .blocks
            .leaf_entries(l)?
            .get(id as usize % crate::space::TABLE_LEAF)
        {
            held_shares.push(*e);
        }
    }
    let mut superseded = Vec::new();
    let ids = img.blocks.len() as u64;
    let per = <BlockLoc as PageEntry>::PER_PAGE;
    let leaves = leaves_to_write(ids, per, changed.map(|c| &c.blocks[..]), &table, victims);
    // A leaf to write that is evicted (its page in a segment being cleaned, or a whole
    // checkpoint) is read back; one that cannot be fails the checkpoint.
    let mut unread = None;
    superseded.extend(table.write_with(ids, per, &leaves, w, &mut |leaf, body| {
        let mut p = Put::new(body);
        let (from, to) = (leaf * per, ((leaf + 1) * per).min(ids as usize));
        let entries = match img.blocks.leaf_entries(leaf) {
            Ok(e) if e.len() >= to - from => e,
            Ok(_) => {
                unread.get_or_insert(crate::error::Error::Corrupt {
                    what: "block table leaf",
                });
                return (to - from) as u32;
            }
            Err(e) => {
                unread.get_or_insert(e);
                return (to - from) as u32;
            }
        };
        for e in entries.iter().take(to - from) {
            BlockLoc {
                segment: e.segment,
                offset: e.offset,
                stored_len: e.stored_len,
                flags: e.flags,
                crc: e.crc,
            }
            .put(&mut p);
        }
        (to - from) as u32
    })?);
    if let Some(e) = unread {
        return Err(e);
    }
    // Count pages written by a build that stored liveness only are all rewritten.
    let per = <u8 as PageEntry>::PER_PAGE;
    let units = changed.filter(|_| counted_pages).map(|c| &c.refs[..]);
    let mut leaves: BTreeSet<usize> = leaves_to_write(ids, per, units, &refs, victims)
        .into_iter()
        .collect();
    // Ids with pins now or at the last write-out: their stored counts differ from RAM's.
    leaves.extend(
        unpinned
            .keys()
            .chain(&old_pinned)
            .map(|&id| id as usize / per)
            .filter(|&l| l < (ids as usize).div_ceil(per)),
    );
    let leaves: Vec<usize> = leaves.into_iter().collect();
    superseded.extend(refs.write_with(ids, per, &leaves, w, &mut |leaf, body| {
        let (from, to) = (leaf * per, ((leaf + 1) * per).min(ids as usize));
        for (b, id) in body.iter_mut().zip(from..to) {
            *b = stored_byte(id as u64);
        }
        (to - from) as u32
    })?);
    // Segment usage: the leaves whose live bytes changed since the last write-out (a leaf
    // covers 504 segments: a few pages per checkpoint however large the pool), or all of
    // them when they are a few: a leaf no write changes would hold an old metadata segment
    // until cleaning moves it.
    let mut usage_now: Vec<u32> = img.counts.as_ref().map_or(Vec::new(), |c| {
        c.usage
            .iter()
            .map(|&b| u32::try_from(b).unwrap_or(u32::MAX))
            .collect()
    });
    for e in &held_shares {
        if let Some(u) = usage_now.get_mut(e.segment as usize) {
            *u = u.saturating_sub(e.share() as u32);
        }
    }
    let per = <SegUsage as PageEntry>::PER_PAGE;
    let n = usage_now.len() as u64;
    let mut usage_leaves: BTreeSet<usize> = usage.leaves_in(victims).into_iter().collect();
    for (l, now) in usage_now.chunks(per).enumerate() {
        if old_usage.get(l * per..l * per + now.len()) != Some(now)
            || usage.len() != n
            || usage_now.len() <= USAGE_WHOLE * per
        {
            usage_leaves.insert(l);
        }
    }
    let usage_leaves: Vec<usize> = usage_leaves
        .into_iter()
        .filter(|&l| l < usage_now.len().div_ceil(per))
        .collect();
    if usage.len() > n {
        // Segments never go away; a shorter array is a new pool's image: written anew.
        superseded.extend(usage.all().copied());
        usage = ArrayPages::new(PageArray::SegmentUsage);
    }
    superseded.extend(
        usage.write_with(n, per, &usage_leaves, w, &mut |leaf, body| {
            let mut p = Put::new(body);
            let (from, to) = (leaf * per, ((leaf + 1) * per).min(usage_now.len()));
            for &live_bytes in &usage_now[from..to] {
                SegUsage {
                    live_bytes,
                    ..SegUsage::default()
                }
                .put(&mut p);
            }
            (to - from) as u32
        })?,
    );
    // Each distinct leaf once, however many volumes hold it; one a committed checkpoint holds
    // unchanged (and that the current image names, outside the segments being cleaned) is
    // named again, not rewritten.
    let mut written: HashMap<*const MapLeaf, PagePtr> = HashMap::new();
    let mut new_leaves = Vec::new();
    let (mut named_now, mut unnamed) = (Vec::new(), Vec::new());
    let mut new_dirs = HashMap::with_capacity(img.volumes.len());
    let mut volumes = Vec::with_capacity(img.volumes.len());
    let mut body = vec![0u8; PAGE_BODY_BYTES];
    for v in &img.volumes {
        let slots = leaf_slots(v.size_bytes);
        // A shrunk directory is written anew (page trees only grow).
        let (mut pages, old) = match dirs.remove(&v.id) {
            Some(d) if d.ptrs.len() as u64 <= slots => (d.pages, d.ptrs),
            Some(d) => {
                superseded.extend(d.pages.all().copied());
                unnamed.extend(d.ptrs.into_iter().filter(|p| !p.is_absent()));
                (ArrayPages::new(PageArray::MapDirectory), Vec::new())
            }
            None => (ArrayPages::new(PageArray::MapDirectory), Vec::new()),
        };
        let mut dir = vec![PagePtr::ABSENT; slots as usize];
        let mut leaf_counts = vec![0u16; slots as usize];
        let mut mapped = 0u64;
        for (idx, leaf) in &v.pages {
            let Some(slot) = dir.get_mut(*idx as usize) else {
                continue;
            };
            mapped += leaf.count();
            leaf_counts[*idx as usize] = leaf.count() as u16;
            let kept = leaf
                .written_at()
                .filter(|p| !victims.contains(&p.segment) && named.contains_key(p));
            *slot = match (kept, written.get(&Arc::as_ptr(leaf))) {
                (Some(at), _) | (None, Some(&at)) => at,
                (None, None) => {
                    body.fill(0);
                    let mut p = Put::new(&mut body);
                    // A leaf in a segment being cleaned may have been evicted: read back.
                    leaf.with_entries(*idx, |ids| {
                        for &id in ids.iter() {
                            put_u48(&mut p, id);
                        }
                    })?;
                    let at = w.page(
                        PageKind::MapLeaf,
                        0,
                        *idx,
                        PageArray::MapTree,
                        MAP_PAGE_SLOTS as u32,
                        &body,
                    )?;
                    written.insert(Arc::as_ptr(leaf), at);
                    new_leaves.push((leaf.clone(), at));
                    at
                }
            };
        }
        let per = <PagePtr as PageEntry>::PER_PAGE;
        let mut changed_dir = BTreeSet::new();
        for (i, &now) in dir.iter().enumerate() {
            let was = old.get(i).copied().unwrap_or(PagePtr::ABSENT);
            if was != now {
                changed_dir.insert(i / per);
                if !was.is_absent() {
                    unnamed.push(was);
                }
                if !now.is_absent() {
                    named_now.push(now);
                }
            }
        }
        if dir.len() > old.len() {
            changed_dir.extend(old.len() / per..dir.len().div_ceil(per));
        }
        changed_dir.extend(pages.leaves_in(victims));
        if !dir_counts {
            // Written without the leaves' counts: all of it again, with them.
            changed_dir.extend(0..dir.len().div_ceil(per));
        }
        let changed_dir: Vec<usize> = changed_dir.into_iter().collect();
        superseded.extend(
            pages.write_with(slots, per, &changed_dir, w, &mut |leaf, body| {
                let mut p = Put::new(body);
                let (from, to) = (leaf * per, ((leaf + 1) * per).min(dir.len()));
                for (at, &count) in dir[from..to].iter().zip(&leaf_counts[from..to]) {
                    DirEntry {
                        at: *at,
                        count: Some(count),
                    }
                    .put(&mut p);
                }
                (to - from) as u32
            })?,
        );
        let root = pages.root();
        let (domain_kind, domain_name) = match &v.domain {
            DedupDomain::Shared => (DOMAIN_SHARED, String::new()),
            DedupDomain::Private => (DOMAIN_PRIVATE, String::new()),
            DedupDomain::Named(n) => (DOMAIN_NAMED, n.clone()),
        };
        volumes.push(RootVolume {
            id: v.id,
            name: v.name.clone(),
            flags: v.flags,
            size_bytes: v.size_bytes,
            domain_kind,
            domain_name,
            qos: [
                v.qos.iops_limit,
                v.qos.bandwidth_limit_bytes,
                v.qos.burst_iops,
                v.qos.burst_bytes,
            ],
            mapped,
            leaves: v.pages.len() as u64,
            dir_height: root.height,
            dir_root: root.root,
        });
        new_dirs.insert(v.id, Dir { pages, ptrs: dir });
    }
    // Volumes deleted since.
    for (_, d) in dirs {
        superseded.extend(d.pages.all().copied());
        unnamed.extend(d.ptrs.into_iter().filter(|p| !p.is_absent()));
    }
    // Names first: a leaf page one directory stops naming and another starts is kept.
    for p in named_now {
        *named.entry(p).or_default() += 1;
    }
    for p in unnamed {
        if let Some(n) = named.get_mut(&p) {
            *n -= 1;
            if *n == 0 {
                named.remove(&p);
                superseded.push(p);
            }
        }
    }
    let index_kept = !save_index
        && index_age + 1 < INDEX_EVERY
        && old_index.as_ref().is_some_and(|(p, r)| {
            r.entries.abs_diff(img.index.len() as u64) * 8 <= r.entries
                && !p.all().any(|p| victims.contains(&p.segment))
        });
    let (index, index_age) = match old_index {
        Some(kept) if index_kept => (kept, index_age + 1),
        old => {
            if let Some((p, _)) = old {
                superseded.extend(p.all().copied());
            }
            let entries = img.index.len() as u64;
            let per = <IndexSlot as PageEntry>::PER_PAGE;
            let mut index = ArrayPages::new(PageArray::DedupIndex);
            index.write_with(entries, per, &all(entries, per), w, &mut |leaf, body| {
                let mut p = Put::new(body);
                let (from, to) = (leaf * per, ((leaf + 1) * per).min(img.index.len()));
                for &(key, id) in &img.index[from..to] {
                    IndexSlot { key, id }.put(&mut p);
                }
                (to - from) as u32
            })?;
            let r = RootIndex {
                root: index.root().root,
                entries,
                sample_bits: img.index_sample_bits,
                saved_at_seq: img.seq,
            };
            ((index, r), 0)
        }
    };
    let (live_blocks, stored_bytes) = match &img.counts {
        Some(c) => (
            c.live_blocks.saturating_sub(held.len() as u64),
            c.stored_bytes
                .saturating_sub(held_shares.iter().map(BlockEntry::share).sum()),
        ),
        None => (img.refs.live_iter().filter(|&l| l).count() as u64, 0),
    };
    let mut overflow: Vec<(PageArray, u64, u32)> = match counts {
        Some(_) => img
            .refs
            .overflowed()
            .filter(|(id, _)| !unpinned.contains_key(id))
            .chain(
                unpinned
                    .iter()
                    .filter(|&(_, &c)| c >= 254)
                    .map(|(&id, &c)| (id, c)),
            )
            .map(|(id, n)| (PageArray::BlockRefs, id, n))
            .collect(),
        None => Vec::new(),
    };
    overflow.sort_unstable_by_key(|&(_, id, _)| id);
    let mut arrays = vec![table.root(), refs.root()];
    if img.counts.is_some() {
        arrays.push(usage.root());
    }
    let root = CheckpointRoot {
        flags: if img.keyed_fingerprints {
            ROOT_KEYED
        } else {
            0
        } | if counts.is_some() { ROOT_COUNTS } else { 0 }
            | ROOT_DIR_COUNTS,
        seq_end: img.seq,
        epoch: img.epoch,
        next_block_id: ids,
        next_volume_id: img.next_volume_id,
        live_blocks,
        stored_bytes,
        overflow,
        held: held.clone(),
        arrays,
        volumes,
        chains: img
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| RootChain {
                segment: s.segment,
                offset: s.offset,
                next_segment: s.next,
                kind: if i < img.data_chains {
                    CHAIN_DATA
                } else {
                    CHAIN_MOVES
                },
                shard_seq: s.shard_seq,
            })
            .collect(),
        index: Some(index.1),
        ..CheckpointRoot::default()
    };
    Ok(WriteOut {
        root,
        state: PagedState {
            table,
            refs,
            counts: true,
            dir_counts: true,
            usage,
            usage_bytes: usage_now,
            pinned: img.pins.iter().map(|&(id, _)| id).collect(),
            dirs: new_dirs,
            named,
            index: Some(index),
            index_age,
            root: old_root,
            pages_read: 0,
        },
        superseded,
        leaves: new_leaves,
    })
}

/// Write `img` whole; returns its root.
#[cfg(test)]
pub(crate) fn write_whole(img: &Image, w: &mut MetaWriter<'_>) -> Result<CheckpointRoot> {
    write_image(img, None, &BTreeSet::new(), true, w).map(|o| o.root)
}

const BAD_ROOT: Error = Error::Corrupt {
    what: "checkpoint root",
};

/// Read the image a root names, every page checked against the pointer it was read through.
/// `max_blocks` bounds block ids (what the pool can reference), as for a blob.
pub(crate) fn read_image(
    root: &CheckpointRoot,
    key: &LogKey,
    src: &dyn PageSource,
    max_blocks: u64,
) -> Result<Image> {
    let array = |a: PageArray| {
        root.arrays
            .iter()
            .find(|r| r.array == a)
            .copied()
            .ok_or(BAD_ROOT)
    };
    let (table_root, refs_root) = (array(PageArray::BlockTable)?, array(PageArray::BlockRefs)?);
    let ids = root.next_block_id;
    if table_root.len != ids || refs_root.len != ids || ids > max_blocks {
        return Err(BAD_ROOT);
    }
    let (stored, refs_pages) = ArrayPages::load::<u8>(&refs_root, key, src)?;
    let counted = root.flags & ROOT_COUNTS != 0;
    let (blocks, refs, table_pages, counts, usage, usage_bytes) = if counted {
        // The counts as stored; the block table's leaves stay on their pages (the last one
        // read: growth never reads), read when used.
        let over: Vec<(u64, u32)> = root
            .overflow
            .iter()
            .filter(|&&(a, _, _)| a == PageArray::BlockRefs)
            .map(|&(_, id, n)| (id, n))
            .collect();
        let refs = RefCounts::from_stored(
            (0..ids as usize).map(|i| *stored.get(i).unwrap_or(&0)),
            &over,
        )
        .map_err(|what| Error::Corrupt { what })?;
        drop(stored);
        let (table_pages, last) = ArrayPages::load_tree::<BlockLoc>(&table_root, key, src)?;
        let last: Vec<BlockEntry> = last.unwrap_or_default().iter().map(entry_of).collect();
        let blocks = BlockTable::on_pages(ids as usize, table_pages.leaf_ptrs(), last);
        let (usage, usage_pages) =
            ArrayPages::load::<SegUsage>(&array(PageArray::SegmentUsage)?, key, src)?;
        let usage_bytes: Vec<u32> = (0..usage.len())
            .map(|i| usage.get(i).map_or(0, |u| u.live_bytes))
            .collect();
        let counts = super::Counts {
            live_blocks: root.live_blocks,
            stored_bytes: root.stored_bytes,
            usage: usage_bytes.iter().map(|&b| u64::from(b)).collect(),
        };
        (
            blocks,
            refs,
            table_pages,
            Some(counts),
            usage_pages,
            usage_bytes,
        )
    } else {
        let mut blocks = BlockTable::default();
        blocks.grow_to(ids.max(1) as usize, BlockEntry::default());
        let mut refs = RefCounts::with_len(ids.max(1) as usize);
        // Straight into the table, a run of pages at a time (one copy of it at the peak).
        let table_pages =
            ArrayPages::load_each::<BlockLoc>(&table_root, key, src, &mut |id, l| {
                if stored.get(id).is_some_and(|&b| b != 0) {
                    if let Ok(Some(e)) = blocks.get_mut(id) {
                        *e = entry_of(&l);
                    }
                    refs.add(id as u64);
                }
            })?;
        drop(stored);
        let usage = ArrayPages::new(PageArray::SegmentUsage);
        (blocks, refs, table_pages, None, usage, Vec::new())
    };
    // With the counts stored, an open needs of each map leaf only how many entries it has
    // set: the directories carry that, and the leaves stay on their pages.
    let dir_counts = root.flags & ROOT_DIR_COUNTS != 0;
    // What the next checkpoint starts from (`PagedState`), as it would after writing this one.
    let mut dirs = HashMap::with_capacity(root.volumes.len());
    let mut named_pages: HashMap<PagePtr, u32> = HashMap::new();
    // Leaves by where they lie (with the index they were written for): a leaf several
    // directories name is read once and shared.
    let mut leaves: HashMap<PagePtr, (u64, Arc<MapLeaf>)> = HashMap::new();
    let mut volumes = Vec::with_capacity(root.volumes.len());
    for v in &root.volumes {
        let dir_root = ArrayRoot {
            array: PageArray::MapDirectory,
            height: v.dir_height,
            len: leaf_slots(v.size_bytes),
            root: v.dir_root,
        };
        let (dir, dir_pages) = ArrayPages::load::<DirEntry>(&dir_root, key, src)?;
        let named: Vec<(u64, PagePtr)> = (0..dir.len())
            .filter_map(|i| {
                dir.get(i)
                    .filter(|e| !e.at.is_absent())
                    .map(|e| (i as u64, e.at))
            })
            .collect();
        let mut want: Vec<(u64, PagePtr)> = Vec::new();
        for (idx, at) in &named {
            if leaves.contains_key(at) {
                continue;
            }
            match dir.get(*idx as usize).and_then(|e| e.count) {
                // Its page is checked when its entries are first read (MAC, index, count). A
                // leaf of holes is read now: a count of 0 is never checked later (its entries
                // are never read to serve a request).
                Some(count) if counted && dir_counts && count > 0 => {
                    let leaf = MapLeaf::on_page(u64::from(count), *at);
                    leaves.insert(*at, (*idx, Arc::new(leaf)));
                }
                _ => want.push((*idx, *at)),
            }
        }
        want.sort_by_key(|&(_, p)| (p.segment, p.offset));
        want.dedup_by_key(|(_, p)| *p);
        // A run of pages at a time: the pages read are not all held with the leaves.
        for run in want.chunks(crate::meta::paged::LOAD_RUN) {
            let ptrs: Vec<PagePtr> = run.iter().map(|&(_, p)| p).collect();
            for ((idx, at), buf) in run.iter().zip(src.read_pages(&ptrs)?) {
                let ids = open_leaf(&buf, key, *idx, *at)?;
                // Its users are counted as each volume takes it, below. It is held where it
                // was read (`at`): the next checkpoint names that page again unless the leaf
                // changes, and its entries may be evicted and read back from there. With
                // the counts stored, nothing needs its entries now: only how many are set.
                let leaf = if counted {
                    MapLeaf::on_page(ids.iter().filter(|&&id| id != 0).count() as u64, *at)
                } else {
                    MapLeaf::unheld(ids, *at)
                };
                leaves.insert(*at, (*idx, Arc::new(leaf)));
            }
        }
        let mut pages = Vec::with_capacity(named.len());
        for (idx, at) in named {
            let (written_for, leaf) = leaves.get(&at).ok_or(BAD_ROOT)?;
            // A leaf named at another index than its own is not the one meant there; nor one
            // whose count this directory gives otherwise than another did.
            let told = dir.get(idx as usize).and_then(|e| e.count);
            if *written_for != idx
                || (dir_counts && told.is_some_and(|c| u64::from(c) != leaf.count()))
            {
                return Err(Error::Corrupt {
                    what: "map leaf page",
                });
            }
            leaf.add_user();
            pages.push((idx, leaf.clone()));
            *named_pages.entry(at).or_default() += 1;
        }
        let ptrs = (0..dir.len())
            .map(|i| dir.get(i).map_or(PagePtr::ABSENT, |e| e.at))
            .collect();
        if dirs
            .insert(
                v.id,
                Dir {
                    pages: dir_pages,
                    ptrs,
                },
            )
            .is_some()
        {
            return Err(BAD_ROOT);
        }
        let domain = match (v.domain_kind, v.domain_name.as_str()) {
            (DOMAIN_SHARED, "") => DedupDomain::Shared,
            (DOMAIN_PRIVATE, "") => DedupDomain::Private,
            (DOMAIN_NAMED, n) => match n.parse() {
                Ok(d @ DedupDomain::Named(_)) => d,
                _ => return Err(BAD_ROOT),
            },
            _ => return Err(BAD_ROOT),
        };
        volumes.push(VolumeImage {
            id: v.id,
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            flags: v.flags,
            domain,
            qos: QosLimits {
                iops_limit: v.qos[0],
                bandwidth_limit_bytes: v.qos[1],
                burst_iops: v.qos[2],
                burst_bytes: v.qos[3],
            },
            pages,
        });
    }
    let mut shards = Vec::with_capacity(root.chains.len());
    let mut data_chains = 0;
    for (i, c) in root.chains.iter().enumerate() {
        match c.kind {
            CHAIN_DATA if data_chains == i => data_chains += 1,
            CHAIN_MOVES if data_chains > 0 => {}
            _ => return Err(BAD_ROOT),
        }
        shards.push(ShardPosition {
            segment: c.segment,
            offset: c.offset,
            next: c.next_segment,
            shard_seq: c.shard_seq,
            nonce: None,
        });
    }
    let mut index_pages = None;
    let (index, index_sample_bits) = match &root.index {
        Some(ix) => {
            let per = <IndexSlot as PageEntry>::PER_PAGE;
            let height = crate::meta::paged::height(ix.entries, per);
            let r = ArrayRoot {
                array: PageArray::DedupIndex,
                height,
                len: ix.entries,
                root: ix.root,
            };
            let mut index = Vec::with_capacity(ix.entries.min(ids) as usize);
            let pages = ArrayPages::load_each::<IndexSlot>(&r, key, src, &mut |_, s| {
                if s.id < ids {
                    index.push((s.key, s.id));
                }
            })?;
            index_pages = Some((pages, *ix));
            (index, ix.sample_bits)
        }
        None => (Vec::new(), 0),
    };
    Ok(Image {
        seq: root.seq_end,
        epoch: root.epoch,
        next_volume_id: root.next_volume_id,
        volumes,
        blocks,
        refs,
        shards,
        data_chains,
        index,
        index_sample_bits,
        keyed_fingerprints: root.flags & ROOT_KEYED != 0,
        changed: None,
        counts,
        pins: Vec::new(),
        held: root.held.clone(),
        pages: Some(Box::new(PagedState {
            table: table_pages,
            refs: refs_pages,
            counts: counted,
            dir_counts,
            usage,
            usage_bytes,
            pinned: root.held.clone(),
            dirs,
            named: named_pages,
            index: index_pages,
            // An index older than the checkpoint (a crash came before a close saved it) is
            // written again by the next checkpoint: replay put hints back in since.
            index_age: match &root.index {
                Some(ix) if ix.saved_at_seq < root.seq_end => INDEX_EVERY - 1,
                _ => 0,
            },
            // Filled in by the caller, which knows where the root lies.
            root: None,
            pages_read: 0,
        })),
    })
}

#[cfg(test)]
mod tests_support {
    use super::*;

    fn leaf(seed: u64) -> Arc<MapLeaf> {
        let mut ids = [0u64; crate::format::MAP_PAGE_ENTRIES as usize];
        for (i, id) in ids.iter_mut().enumerate() {
            *id = if i % 3 == 0 {
                0
            } else {
                (seed * 1000 + i as u64) % 5000 + 1
            };
        }
        Arc::new(MapLeaf::new(ids))
    }

    pub(super) fn image() -> Image {
        let n = 5000usize;
        let mut blocks = BlockTable::default();
        let mut refs = RefCounts::with_len(n);
        for i in 0..n as u32 {
            blocks.push(BlockEntry {
                segment: i % 13,
                offset: i * 4096,
                stored_len: 4096,
                flags: (i % 5) as u16,
                crc: i.wrapping_mul(2_654_435_761),
            });
            if i % 7 != 0 {
                refs.add(u64::from(i));
            }
        }
        // A count past a byte, kept in the root.
        for _ in 0..300 {
            refs.add(3);
        }
        let live = refs.live_iter().filter(|&l| l).count() as u64;
        let counts = super::super::Counts {
            live_blocks: live,
            stored_bytes: live * 4096,
            usage: (0..1000u64).map(|s| (s * 7919) % (8 << 20)).collect(),
        };
        let shared = leaf(1);
        let vol = |id: u32, pages: Vec<(u64, Arc<MapLeaf>)>, domain: DedupDomain| VolumeImage {
            id,
            name: format!("vol{id}"),
            size_bytes: 3000 << 20,
            flags: u16::from(id == 2) << 2,
            domain,
            qos: QosLimits {
                iops_limit: u64::from(id) * 100,
                ..QosLimits::default()
            },
            pages,
        };
        Image {
            seq: 99,
            epoch: 4,
            next_volume_id: 3,
            volumes: vec![
                vol(
                    1,
                    vec![(0, shared.clone()), (7, leaf(2)), (1499, leaf(3))],
                    DedupDomain::Shared,
                ),
                // A snapshot: leaf 0 shared, leaf 7 its own.
                vol(
                    2,
                    vec![(0, shared), (7, leaf(4))],
                    "tenant".parse().unwrap(),
                ),
            ],
            blocks,
            refs,
            shards: (0..3)
                .map(|i| ShardPosition {
                    segment: i,
                    offset: 8192,
                    next: 20 + i,
                    shard_seq: u64::from(i) + 5,
                    nonce: None,
                })
                .collect(),
            data_chains: 2,
            index: (0..1000u64).map(|k| (k * 7919, k % 5000)).collect(),
            index_sample_bits: 1,
            keyed_fingerprints: true,
            changed: None,
            pages: None,
            counts: Some(counts),
            pins: Vec::new(),
            held: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::image;
    use super::*;
    use crate::meta::tests::Disk;

    /// An image written as pages and a root reads back the same: the counts (one past a
    /// byte included) and the segments' usage, taken as stored, with the block table's leaves
    /// left on their pages but the last; volumes with their settings and leaves, chains,
    /// index. A leaf two volumes share is written once and comes back as one leaf with two
    /// users.
    #[test]
    fn an_image_round_trips_through_pages_and_keeps_shared_leaves_shared() {
        let disk = Disk::new(64);
        let img = image();
        let (root, pages) = disk.write(|w| write_whole(&img, w));
        // Block table 20 leaves + a top, counts 2 + 1, usage 2 + 1, 4 distinct map leaves,
        // two directories of 1500 slots (6 leaves + a top each), index 4 leaves + a top.
        assert_eq!(pages, 21 + 3 + 3 + 4 + 2 * 7 + 5);
        assert_eq!(root.flags & ROOT_COUNTS, ROOT_COUNTS);
        let root = CheckpointRoot::decode(&root.encode(&disk.key), &disk.key).unwrap();
        let back = read_image(&root, &disk.key, &disk.source(), 1 << 20).unwrap();
        assert_eq!((back.seq, back.epoch, back.next_volume_id), (99, 4, 3));
        assert_eq!(back.blocks.len(), 5000);
        for id in 0..5000u64 {
            let want = if img.refs.live(id) {
                img.refs.get(id)
            } else {
                0
            };
            assert_eq!(back.refs.get(id), want, "id {id}");
        }
        assert_eq!(back.refs.get(3), 301);
        assert_eq!(
            back.blocks.get(4999),
            img.blocks.get(4999),
            "the last leaf is read"
        );
        assert!(
            back.blocks.get(1).is_none(),
            "the other leaves stay on their pages"
        );
        let (c, i) = (back.counts.as_ref().unwrap(), img.counts.as_ref().unwrap());
        assert_eq!(
            (c.live_blocks, c.stored_bytes),
            (i.live_blocks, i.stored_bytes)
        );
        assert_eq!(c.usage, i.usage);
        // Leaves too stay on their pages, each knowing how many entries it holds.
        assert_eq!(back.shards, img.shards);
        assert_eq!(back.data_chains, 2);
        assert_eq!(back.index, img.index);
        assert_eq!(back.index_sample_bits, 1);
        assert!(back.keyed_fingerprints);
        for (b, i) in back.volumes.iter().zip(&img.volumes) {
            assert_eq!(
                (b.id, &b.name, b.size_bytes, b.flags),
                (i.id, &i.name, i.size_bytes, i.flags)
            );
            assert_eq!((&b.domain, b.qos), (&i.domain, i.qos));
            assert_eq!(b.pages.len(), i.pages.len());
            for ((bi, bl), (ii, il)) in b.pages.iter().zip(&i.pages) {
                assert_eq!((bi, bl.count()), (ii, il.count()));
                assert!(!bl.has_entries() && bl.written_at().is_some());
            }
        }
        let (a, b) = (&back.volumes[0].pages[0].1, &back.volumes[1].pages[0].1);
        assert!(Arc::ptr_eq(a, b), "the shared leaf came back as two");
        assert_eq!(a.users(), 2);
        assert_eq!(back.volumes[0].pages[1].1.users(), 1);
    }

    /// Directories written without their leaves' counts (a root without `ROOT_DIR_COUNTS`:
    /// an older build's) are all written again, with them, by the next write-out; once they
    /// carry them, a write-out that changes nothing rewrites none.
    #[test]
    fn directories_without_counts_are_rewritten_with_them() {
        let disk = Disk::new(64);
        let mut img = image();
        let none = BTreeSet::new();
        let (out, _) = disk.write(|w| write_image(&img, None, &none, true, w));
        // Committed: the leaves are held where they were written.
        for (leaf, at) in &out.leaves {
            leaf.set_written_at(*at);
        }
        img.changed = Some(crate::checkpoint::image::Changed {
            blocks: Vec::new(),
            refs: Vec::new(),
        });
        let mut older = out.state;
        older.dir_counts = false;
        let (again, without) = disk.write(|w| write_image(&img, Some(older), &none, false, w));
        assert!(again.state.dir_counts);
        assert_ne!(again.root.flags & ROOT_DIR_COUNTS, 0);
        let (_, with) = disk.write(|w| write_image(&img, Some(again.state), &none, false, w));
        // Two directories of 1500 slots: 6 leaves and a top each.
        assert_eq!(without - with, 2 * 7);
    }

    /// An image without the counts (a root without `ROOT_COUNTS`: an older build's, or one
    /// whose overflow did not fit) reads the whole block table and counts each live block
    /// once, for the open to recount; a block live only by a dedup pin is among them.
    #[test]
    fn an_image_without_counts_reads_the_table_whole() {
        let disk = Disk::new(64);
        let mut img = image();
        img.counts = None;
        // A pin stays in the stored liveness: the recounting open holds what it makes live.
        img.pins = vec![(5, 1)];
        let (root, _) = disk.write(|w| write_whole(&img, w));
        assert_eq!(root.flags & ROOT_COUNTS, 0);
        assert!(root.overflow.is_empty() && root.held.is_empty());
        let back = read_image(&root, &disk.key, &disk.source(), 1 << 20).unwrap();
        assert!(back.counts.is_none());
        for id in 0..5000u64 {
            assert_eq!(back.refs.get(id), u32::from(img.refs.live(id)), "id {id}");
            if img.refs.live(id) {
                assert_eq!(back.blocks.get(id as usize), img.blocks.get(id as usize));
            }
        }
        for (b, i) in back.volumes.iter().zip(&img.volumes) {
            for ((bi, bl), (ii, il)) in b.pages.iter().zip(&i.pages) {
                assert_eq!((bi, bl.ids()), (ii, il.ids()));
            }
        }
    }

    /// Dedup pins outstanding at the cut are left out of the stored counts and totals (the
    /// image's maps do not hold them); a block whose only references were pins is listed as
    /// held, for the open to hold.
    #[test]
    fn pins_are_left_out_of_the_stored_counts() {
        let disk = Disk::new(64);
        let mut img = image();
        assert_eq!((img.refs.get(5), img.refs.get(3)), (1, 301));
        img.pins = vec![(5, 1), (3, 2)];
        let (root, _) = disk.write(|w| write_whole(&img, w));
        assert_eq!(root.held, vec![5]);
        let back = read_image(&root, &disk.key, &disk.source(), 1 << 20).unwrap();
        assert_eq!(back.held, vec![5]);
        assert_eq!((back.refs.get(5), back.refs.get(3)), (0, 299));
        let (c, i) = (back.counts.as_ref().unwrap(), img.counts.as_ref().unwrap());
        let share = img.blocks.get(5).unwrap().share();
        assert_eq!(c.live_blocks, i.live_blocks - 1);
        assert_eq!(c.stored_bytes, i.stored_bytes - share);
        let seg = img.blocks.get(5).unwrap().segment as usize;
        assert_eq!(c.usage[seg], i.usage[seg] - share);
        assert_eq!(c.usage[seg + 1], i.usage[seg + 1]);
    }

    /// A root whose arrays do not match its counts (more ids than its table holds, more than
    /// the pool can reference, a volume size its directory was not written for) is refused.
    #[test]
    fn a_root_that_misnames_its_pages_is_refused() {
        let disk = Disk::new(64);
        let img = image();
        let (root, _) = disk.write(|w| write_whole(&img, w));
        let mut r = root.clone();
        r.next_block_id += 1;
        assert!(read_image(&r, &disk.key, &disk.source(), 1 << 20).is_err());
        assert!(read_image(&root, &disk.key, &disk.source(), 4999).is_err());
        let mut r = root.clone();
        r.volumes[0].size_bytes = 1 << 40;
        assert!(read_image(&r, &disk.key, &disk.source(), 1 << 20).is_err());
        if let Err(e) = read_image(&root, &disk.key, &disk.source(), 1 << 20) {
            panic!("{e}");
        }
    }
}

#[cfg(test)]
mod estimate {
    use super::tests_support::*;
    use crate::context::paged_checkpoint_estimate_bytes;
    use crate::format::PAGE_BYTES;
    use crate::meta::tests::Disk;

    /// The reserve's estimate of a whole format 3 checkpoint covers what one writes: thin
    /// volumes' directories and ids beyond the live blocks included.
    #[test]
    fn the_reserve_estimate_covers_a_whole_checkpoint() {
        let disk = Disk::new(64);
        let img = image();
        let (root, pages) = disk.write(|w| super::write_whole(&img, w));
        let root_bytes = root.encode(&disk.key).len() as u64;
        let written = pages * PAGE_BYTES as u64 + root_bytes;
        let live = img.refs.live_iter().filter(|&l| l).count() as u64;
        let dir: u64 = img
            .volumes
            .iter()
            .map(|v| crate::context::dir_pages(v.size_bytes))
            .sum();
        let leaves: u64 = img.volumes.iter().map(|v| v.pages.len() as u64).sum();
        let est = paged_checkpoint_estimate_bytes(
            leaves,
            img.blocks.len() as u64,
            live,
            dir,
            img.volumes.len() as u64,
            img.shards.len() as u64,
            img.counts.as_ref().map_or(0, |c| c.usage.len() as u64),
            img.refs.overflow_len() as u64,
        );
        assert!(est >= written, "estimate {est} < {written} written");
        assert!(
            est < 2 * written,
            "estimate {est} far above {written} written"
        );
    }
}
