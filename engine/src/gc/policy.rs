//! When the cleaner runs and which segments it may take.

use crate::gc::Cleaner;

use crate::format::SEGMENT_HEADER_BYTES;
use crate::space::SegState;

impl Cleaner {
    /// Segments' worth of dead space in sealed segments the cleaner could reclaim (segments
    /// fuller than the cleaning threshold do not count).
    pub(crate) fn reclaimable_segments_at(&self, max_utilisation: f64) -> usize {
        let usable = self.ctx.geo.segment_bytes - SEGMENT_HEADER_BYTES;
        let space = self.ctx.space.lock();
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
}
