//! Segment numbering across devices.

use crate::format::DATA_START;

/// Segment numbering across devices.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub segment_bytes: u64,
    /// (first segment, count) per device.
    pub devs: Vec<(u32, u32)>,
    pub total_segments: u32,
}

impl Geometry {
    /// Device and byte offset of a segment's start.
    pub fn locate(&self, seg: u32) -> (u16, u64) {
        for (d, &(first, count)) in self.devs.iter().enumerate() {
            if seg >= first && seg < first + count {
                return (
                    d as u16,
                    DATA_START + u64::from(seg - first) * self.segment_bytes,
                );
            }
        }
        (0, DATA_START)
    }
}
