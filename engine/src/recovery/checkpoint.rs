//! Reading the checkpoint a superblock points at.

use crate::space::Geometry;

use crate::checkpoint::{self, Image};
use crate::error::{Error, Result};
use crate::format::{
    CheckpointRoot, PagePtr, SegmentHeader, SegmentKind, Superblock, FORMAT_VERSION_PAGED,
    MAX_ROOT_BYTES, NO_SEGMENT, PAGE_BYTES, SEGMENT_HEADER_BYTES,
};
use crate::meta::paged::{PageSource, StoreSource};
use crate::space::BlockEntry;
use crate::store::{self, Range, SegmentStore};

/// Read and verify the checkpoint the superblock points at; returns it and its segments.
pub(crate) fn read_checkpoint(
    store: &dyn SegmentStore,
    geo: &Geometry,
    sb: &Superblock,
) -> Result<(Image, Vec<u32>)> {
    if sb.version >= FORMAT_VERSION_PAGED {
        return read_paged(store, geo, sb);
    }
    let per_seg = geo.segment_bytes - SEGMENT_HEADER_BYTES;
    let len = sb.checkpoint_bytes;
    if len > u64::from(geo.total_segments) * per_seg {
        return Err(Error::Corrupt {
            what: "checkpoint length",
        });
    }
    let mut blob = Vec::with_capacity(len as usize);
    let mut segs = Vec::new();
    let mut seg = sb.checkpoint_segment;
    while (blob.len() as u64) < len {
        if seg == NO_SEGMENT || seg >= geo.total_segments || segs.contains(&seg) {
            return Err(Error::Corrupt {
                what: "checkpoint segment chain",
            });
        }
        let want = (len - blob.len() as u64).min(per_seg) as usize;
        // Before the new epoch is known: recovery reads as epoch 0 (reads are never fenced).
        let at = Range {
            segment: seg,
            offset: 0,
        };
        let buf = store::read_now(store, 0, at, SEGMENT_HEADER_BYTES as usize + want)?;
        let h = own_header(&buf, sb, seg, SegmentKind::Checkpoint)?;
        blob.extend_from_slice(
            &buf[SEGMENT_HEADER_BYTES as usize..SEGMENT_HEADER_BYTES as usize + want],
        );
        segs.push(seg);
        seg = h.next_segment;
    }
    if crc32fast::hash(&blob) != sb.checkpoint_crc {
        return Err(Error::Corrupt {
            what: "checkpoint checksum",
        });
    }
    let image = checkpoint::decode(&blob, max_blocks(geo))?;
    Ok((image, segs))
}

/// Ids a checkpoint may hold: block ids outnumber the pool's 4 KiB slots (compressed blocks
/// share payloads: 8 blocks of a repeated byte take ~140 bytes, and ids freed since a checkpoint
/// are reused only after it). A slot per 8 bytes bounds both; more is corruption, refused
/// before the allocation.
fn max_blocks(geo: &Geometry) -> u64 {
    u64::from(geo.total_segments) * geo.segment_bytes / 8 + 1
}

/// Reads pages through the store and notes the segments they lie in (the checkpoint's, kept
/// from reuse while it is the newest or the one before).
struct Noting<'a> {
    inner: StoreSource<'a>,
    total_segments: u32,
    segment_bytes: u64,
    segments: std::cell::RefCell<std::collections::BTreeSet<u32>>,
    pages: std::cell::Cell<u64>,
}

impl PageSource for Noting<'_> {
    fn read_pages(&self, ptrs: &[PagePtr]) -> Result<Vec<Vec<u8>>> {
        for p in ptrs {
            let off = u64::from(p.offset);
            if p.segment >= self.total_segments
                || off < SEGMENT_HEADER_BYTES
                || off % PAGE_BYTES as u64 != 0
                || off + PAGE_BYTES as u64 > self.segment_bytes
            {
                return Err(Error::Corrupt {
                    what: "metadata page pointer",
                });
            }
        }
        self.segments
            .borrow_mut()
            .extend(ptrs.iter().map(|p| p.segment));
        self.pages.set(self.pages.get() + ptrs.len() as u64);
        self.inner.read_pages(ptrs)
    }
}

/// The sealed header at the start of `buf`, of a segment of `kind` that is `seg` of the pool
/// `sb` belongs to: a checkpoint is read only from segments its own pool wrote for it.
fn own_header(buf: &[u8], sb: &Superblock, seg: u32, kind: SegmentKind) -> Result<SegmentHeader> {
    let bad = Error::Corrupt {
        what: "checkpoint segment header",
    };
    match SegmentHeader::decode_authentic(buf, sb.log_key.as_ref()) {
        Some(h) if h.kind == kind && h.segment == seg && h.pool_uuid == sb.pool_uuid => Ok(h),
        _ => Err(bad),
    }
}

/// Format 3: the root the superblock points at (in a metadata segment of this pool, its CRC
/// in the superblock), then every page it names.
fn read_paged(
    store: &dyn SegmentStore,
    geo: &Geometry,
    sb: &Superblock,
) -> Result<(Image, Vec<u32>)> {
    let (seg, off, len) = (
        sb.checkpoint_segment,
        u64::from(sb.checkpoint_offset),
        sb.checkpoint_bytes,
    );
    if seg >= geo.total_segments
        || off < SEGMENT_HEADER_BYTES
        || off % PAGE_BYTES as u64 != 0
        || len == 0
        || len as usize > MAX_ROOT_BYTES
        || off + len.next_multiple_of(PAGE_BYTES as u64) > geo.segment_bytes
    {
        return Err(Error::Corrupt {
            what: "checkpoint root location",
        });
    }
    let at = |offset| Range {
        segment: seg,
        offset,
    };
    let header = store::read_now(store, 0, at(0), PAGE_BYTES)?;
    own_header(&header, sb, seg, SegmentKind::Meta)?;
    let read = (len as usize).next_multiple_of(PAGE_BYTES).max(PAGE_BYTES);
    let buf = store::read_now(store, 0, at(off), read)?;
    let bytes = &buf[..len as usize];
    if crc32fast::hash(bytes) != sb.checkpoint_crc {
        return Err(Error::Corrupt {
            what: "checkpoint checksum",
        });
    }
    let key = sb.log_key.as_ref().ok_or(Error::Corrupt {
        what: "a format 3 pool without a log key",
    })?;
    let root = CheckpointRoot::decode(bytes, key)?;
    let src = Noting {
        inner: StoreSource { store, epoch: 0 },
        total_segments: geo.total_segments,
        segment_bytes: geo.segment_bytes,
        segments: Default::default(),
        pages: Default::default(),
    };
    let mut image = checkpoint::read_image(&root, key, &src, max_blocks(geo))?;
    if let Some(state) = image.pages.as_mut() {
        state.root = Some((seg, read.div_ceil(PAGE_BYTES) as u32));
        // The root's own pages and the pages it named.
        state.pages_read = src.pages.get() + read.div_ceil(PAGE_BYTES) as u64;
    }
    let mut segs = src.segments.into_inner();
    segs.insert(seg);
    // Pages left unread (block-table leaves an open reads when used) are the checkpoint's
    // too: their segments must not be reused while it is the one an open would read.
    if let Some(state) = image.pages.as_ref() {
        segs.extend(state.segment_pages().into_keys());
    }
    Ok((image, segs.into_iter().collect()))
}

/// The checkpoint the superblocks `sbs` point at (`newest` is the one with the highest
/// generation), or an empty image for a pool that never wrote one. A commit that stopped
/// between its two slot writes left the previous checkpoint in every device's other slot
/// (`older`), with everything its replay needs (nothing is freed before both slots point at
/// the new one): when the newest is damaged, the pool opens from that one, and `sbs` and
/// `newest` become its superblocks.
pub(crate) fn load_checkpoint(
    store: &dyn SegmentStore,
    geo: &Geometry,
    sbs: &mut Vec<Superblock>,
    older: &[Option<Superblock>],
    newest: &mut Superblock,
) -> Result<(Image, Vec<u32>)> {
    if newest.checkpoint_segment == NO_SEGMENT {
        let image = Image {
            seq: 1,
            epoch: 0,
            next_volume_id: 1,
            volumes: Vec::new(),
            blocks: vec![BlockEntry::default()].into(),
            refs: crate::space::RefCounts::with_len(1),
            shards: Vec::new(),
            data_chains: 0,
            index: Vec::new(),
            index_sample_bits: 0,
            // Whoever wrote a log without a checkpoint, its fingerprints are not trusted to
            // be keyed: nothing is lost but dedup candidates.
            keyed_fingerprints: false,
            changed: None,
            pages: None,
            counts: None,
            pins: Vec::new(),
            held: Vec::new(),
        };
        return Ok((image, Vec::new()));
    }
    match read_checkpoint(store, geo, newest) {
        Err(e @ Error::Corrupt { .. }) => {
            // Per device, the previous generation: in its other slot, or in both slots when the
            // commit failed before it wrote this device (its segments were freed then, and may
            // have been reused, which is why the newest reads as damaged).
            let is_prev = |p: &Superblock| {
                p.generation + 1 == newest.generation
                    && p.checkpoint_segment != NO_SEGMENT
                    && p.log_key == newest.log_key
            };
            let prev: Option<Vec<Superblock>> = sbs
                .iter()
                .zip(older)
                .map(|(cur, o)| {
                    if is_prev(cur) {
                        Some(cur.clone())
                    } else {
                        o.clone().filter(is_prev)
                    }
                })
                .collect();
            let Some(prev) = prev else {
                return Err(e);
            };
            let c = read_checkpoint(store, geo, &prev[0]).map_err(|_| e)?;
            tracing::warn!(
                target: "ingot_engine::recovery",
                damaged = newest.generation,
                used = prev[0].generation,
                "the newest checkpoint is damaged; opened from the previous one, replaying the \
                 log since"
            );
            *newest = prev[0].clone();
            *sbs = prev;
            Ok(c)
        }
        r => r,
    }
}
