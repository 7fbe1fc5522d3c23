//! Reserves: segments kept back so that checkpoints, new chains and the cleaner never dead-lock
//! on a full pool, and the usable capacity that follows from them.

use crate::context::Context;
use crate::space::Geometry;

use crate::api::DedupDomain;
use crate::api::BLOCK_BYTES;
use crate::format::SEGMENT_HEADER_BYTES;
use crate::format::{CheckpointHeader, MAP_PAGE_ENTRIES};

/// Share of the data segments kept free for the cleaner when the pool is full. At 100% of the
/// usable capacity, sealed segments are then at most ~90% live, where cleaning costs about 5
/// bytes moved per byte written under uniform random overwrites: the cliff log-structured stores
/// fall off when they fill to the last segment (1/(1-u) grows without bound) is never reached.
pub(crate) const GC_HEADROOM: f64 = 0.10;

/// Pools of fewer segments write whole format 3 checkpoints (`MetaSegs::sparse`): they cannot
/// spare the segments pages spread over.
pub(crate) const TIGHT_POOL_SEGMENTS: u32 = 64;

/// Payload bytes a pool of this geometry takes: its segments less what a full pool's checkpoint
/// (one held, one being written, and a spare), the shards' open and next segments, the data
/// reserve and the per-block log entries need, less the cleaner's headroom. Assumes
/// uncompressed blocks; compressed ones take less payload each, and the running pool's own
/// reserve (from the real block count) still holds writes back if checkpoints grow past it.
pub(crate) fn usable_bytes(geo: &Geometry, shards: usize, paged: bool) -> u64 {
    let per_seg = geo.segment_bytes - SEGMENT_HEADER_BYTES;
    let total = u64::from(geo.total_segments);
    let entry = crate::format::DataEntry::BYTES as u64;
    let blocks = total * per_seg / (BLOCK_BYTES + entry);
    let pages = blocks.div_ceil(crate::format::MAP_PAGE_ENTRIES);
    let ckpt_segs = checkpoint_estimate_bytes(pages, blocks, 1, shards as u64).div_ceil(per_seg);
    // Format 3 keeps a checkpoint's pages across the segments of several checkpoints: the
    // slack cleaning leaves (`MetaSegs::sparse`), and the newest; on a tight pool, each
    // checkpoint is whole (in one segment if it fits).
    let spread = if paged && geo.total_segments >= TIGHT_POOL_SEGMENTS {
        crate::meta::segs::spread_allowed(ckpt_segs) - ckpt_segs + 1
    } else {
        0
    };
    let fixed = 2 * ckpt_segs + spread + 1 + 3 * shards as u64;
    let data_segs = total.saturating_sub(fixed);
    let payload = data_segs * per_seg / (BLOCK_BYTES + entry) * BLOCK_BYTES;
    (payload as f64 * (1.0 - GC_HEADROOM)) as u64
}

/// The cleaner starts when free segments fall to the data reserve plus this fraction of the
/// pool. Free segments are slack the cleaner cannot use: the same space left as dead blocks in
/// sealed segments makes its victims emptier. A tenth of the pool kept free held sealed
/// segments at ~86% live at 90% full (victims ~79% live: 3.9-4.8 bytes moved per byte written
/// under uniform overwrites); a 64th (4 segments of a 2 GiB pool) gives victims ~66% live and
/// 2.3 bytes moved. Large pools keep more in absolute terms, for bursts while a pass runs.
pub(crate) const GC_SLACK_DIVISOR: usize = 64;

/// Upper bound on a checkpoint blob for a pool holding this much, used to reserve space (in
/// step with `checkpoint::image::encode`).
pub(crate) fn checkpoint_estimate_bytes(pages: u64, blocks: u64, volumes: u64, shards: u64) -> u64 {
    CheckpointHeader::BYTES as u64
        + volumes * (20 + 64 + 2 + DedupDomain::MAX_NAME as u64)
        + pages * (8 + MAP_PAGE_ENTRIES * 8)
        + blocks * (32 + 16)
        + shards * 24
}

/// Upper bound on a format 3 checkpoint written whole (`checkpoint::paged::write_image`):
/// `leaves` map leaves, block table and liveness pages for `ids` ids (every id up to the
/// highest, live or not), `dir_pages` pages of the volumes' directories (each its own tree:
/// [`dir_pages`]), the dedup index (at most an entry per live block, `blocks`), the usage of
/// `segments` segments, the root (with `overflowed` counts of 254 and more), and each
/// segment's header and summary.
#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_checkpoint_estimate_bytes(
    leaves: u64,
    ids: u64,
    blocks: u64,
    dir_pages: u64,
    volumes: u64,
    shards: u64,
    segments: u64,
    overflowed: u64,
) -> u64 {
    use crate::format::{INDEX_PER_PAGE, PAGE_BYTES, PTRS_PER_PAGE, REFS_PER_PAGE, USAGE_PER_PAGE};
    use crate::meta::paged::pages as array;
    let pages = leaves
        + array(ids, PTRS_PER_PAGE)
        + array(ids, REFS_PER_PAGE)
        + dir_pages
        + array(blocks, INDEX_PER_PAGE)
        + array(segments, USAGE_PER_PAGE);
    let overflow = overflowed.min(crate::format::ROOT_OVERFLOW_MAX as u64) * 13;
    let root =
        104 + volumes * (83 + 64 + DedupDomain::MAX_NAME as u64) + shards * 24 + overflow + 1024;
    // Summaries take 12 bytes a page, headers a page per segment (of at least 2 MiB).
    let body = pages * PAGE_BYTES as u64 + root.next_multiple_of(PAGE_BYTES as u64);
    body + body / 300 + body / 500
}

/// Pages of the leaf directory of a volume of `size_bytes` (a pointer per 2 MiB).
pub(crate) fn dir_pages(size_bytes: u64) -> u64 {
    crate::meta::paged::pages(
        crate::map::leaf_slots(size_bytes),
        crate::format::PTRS_PER_PAGE,
    )
}

impl Context {
    /// Segments kept back from data so that a checkpoint always fits, and one per chain so
    /// that the next open can start its chains even when the pool is full.
    pub fn reserve_segments(&self) -> usize {
        self.reserve_segments_with(0, 0, 0)
    }

    /// The same with `pages` more map pages and `dir` more directory pages in `volumes` more
    /// volumes (a copy about to be made: format 2 writes its pages again, format 3 only its
    /// directory).
    pub(crate) fn reserve_segments_with(
        &self,
        extra_pages: u64,
        extra_dir: u64,
        extra_volumes: u64,
    ) -> usize {
        let vols = self.volumes.read();
        let mut pages = extra_pages;
        let mut dir = extra_dir;
        for v in vols.by_name.values() {
            for m in &v.maps {
                pages += m.lock().present_pages();
            }
            dir += dir_pages(v.size());
        }
        let (blocks, ids, overflowed) = {
            let s = self.space.lock();
            (
                s.live_blocks,
                s.blocks.len() as u64,
                s.refs.overflow_len() as u64,
            )
        };
        let volumes = vols.by_name.len() as u64 + extra_volumes;
        let mut est = checkpoint_estimate_bytes(pages, blocks, volumes, self.chains() as u64);
        if self.paged_checkpoints {
            est = est.max(paged_checkpoint_estimate_bytes(
                pages,
                ids,
                blocks,
                dir,
                volumes,
                self.chains() as u64,
                u64::from(self.geo.total_segments),
                overflowed,
            ));
        }
        est.div_ceil(self.geo.segment_bytes - SEGMENT_HEADER_BYTES) as usize + 1 + self.chains()
    }

    /// Segments only a checkpoint may use: one checkpoint's worth and a spare.
    pub fn ckpt_reserve(&self) -> usize {
        self.reserve_segments() - self.chains()
    }

    /// Below this many free segments data writes stop (checkpoints, trims and the cleaner
    /// keep the rest).
    pub fn data_reserve(&self) -> usize {
        self.reserve_segments() + self.shards()
    }
    /// The same from a checkpoint reserve already computed (computing it walks every map page).
    pub(crate) fn cleaning_threshold_from(&self, ckpt_reserve: usize) -> usize {
        // The data reserve is the checkpoint reserve plus a segment per chain and per shard.
        ckpt_reserve
            + self.chains()
            + self.shards()
            + (self.geo.total_segments as usize / GC_SLACK_DIVISOR).max(4)
    }
    /// Free segments below which the cleaner runs on its own: the data reserve plus
    /// [`GC_SLACK_DIVISOR`]th of the pool (at least 4 segments).
    pub(crate) fn cleaning_threshold(&self) -> usize {
        self.cleaning_threshold_from(self.ckpt_reserve())
    }
    /// Free segments at or below which writes wait and the cleaner runs flat out.
    pub(crate) fn urgent_threshold(&self) -> usize {
        self.data_reserve() + self.shards()
    }
}
