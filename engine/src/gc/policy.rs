//! When the cleaner runs and which segments it may take.

use crate::pool::Inner;

use crate::format::SEGMENT_HEADER_BYTES;
use crate::space::SegState;

/// The cleaner starts when free segments fall to the data reserve plus this fraction of the
/// pool. Free segments are slack the cleaner cannot use: the same space left as dead blocks in
/// sealed segments makes its victims emptier. A tenth of the pool kept free held sealed
/// segments at ~86% live at 90% full (victims ~79% live: 3.9-4.8 bytes moved per byte written
/// under uniform overwrites); a 64th (4 segments of a 2 GiB pool) gives victims ~66% live and
/// 2.3 bytes moved. Large pools keep more in absolute terms, for bursts while a pass runs.
pub(crate) const GC_SLACK_DIVISOR: usize = 64;

impl Inner {
    /// Segments' worth of dead space in sealed segments the cleaner could reclaim (segments
    /// fuller than the cleaning threshold do not count).
    pub(crate) fn reclaimable_segments_at(&self, max_utilisation: f64) -> usize {
        let usable = self.geo.segment_bytes - SEGMENT_HEADER_BYTES;
        let space = self.space.lock();
        let dead: u64 = space
            .seg_state
            .iter()
            .enumerate()
            .filter(|(s, st)| {
                matches!(st, SegState::Sealed { .. })
                    && (space.seg_live[*s] as f64) <= usable as f64 * max_utilisation
            })
            .map(|(s, _)| usable.saturating_sub(space.seg_live[s]))
            .sum();
        (dead / usable) as usize
    }

    /// Free segments below which the cleaner runs on its own: the data reserve plus
    /// [`GC_SLACK_DIVISOR`]th of the pool (at least 4 segments).
    pub(crate) fn cleaning_threshold(&self) -> usize {
        self.cleaning_threshold_from(self.ckpt_reserve())
    }

    /// The same from a checkpoint reserve already computed (computing it walks every map page).
    pub(crate) fn cleaning_threshold_from(&self, ckpt_reserve: usize) -> usize {
        // The data reserve is the checkpoint reserve plus a segment per chain and per shard.
        ckpt_reserve
            + self.chains()
            + self.shards()
            + (self.geo.total_segments as usize / GC_SLACK_DIVISOR).max(4)
    }

    /// Free segments at or below which writes wait and the cleaner runs flat out.
    pub(crate) fn urgent_threshold(&self) -> usize {
        self.data_reserve() + self.shards()
    }
}
