//! The segment store on the pool's own devices: a segment lives at its place in the device
//! layout (`space::Geometry`), a put is a write there, a delete gives the space back
//! (`fallocate(PUNCH_HOLE)` on files, discard on block devices). Operations complete before
//! the call returns.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, SharedDevices};
use crate::space::Geometry;
use crate::store::{Done, Range, SegmentStore};

pub(crate) struct LocalStore {
    devices: SharedDevices,
    geo: Geometry,
    /// Writes and deletes from epochs before this one are refused.
    fence: AtomicU64,
}

impl LocalStore {
    pub(crate) fn new(devices: SharedDevices, geo: Geometry) -> LocalStore {
        LocalStore {
            devices,
            geo,
            fence: AtomicU64::new(0),
        }
    }

    fn fenced(&self, epoch: u64) -> Result<()> {
        let owner = self.fence.load(Ordering::Acquire);
        if epoch < owner {
            return Err(Error::Fenced { epoch, owner });
        }
        Ok(())
    }

    fn check_range(&self, segment: u32, offset: u64, len: usize) -> Result<()> {
        if segment >= self.geo.total_segments || offset + len as u64 > self.geo.segment_bytes {
            return Err(Error::Internal {
                what: "a store operation outside its segment",
            });
        }
        Ok(())
    }
}

impl SegmentStore for LocalStore {
    fn put(&self, epoch: u64, segment: u32, data: AlignedBuf, done: Done<()>) {
        let r = self
            .fenced(epoch)
            .and_then(|()| self.check_range(segment, 0, data.len()))
            .and_then(|()| {
                let (dev, base) = self.geo.locate(segment);
                self.devices
                    .write_at(dev, &data, base)
                    .map_err(|source| Error::Io {
                        device: dev,
                        offset: base,
                        source,
                    })
            });
        done(r);
    }

    fn sealed(&self, _epoch: u64, _segment: u32) {
        // The segment is already where it lives.
    }

    fn read(&self, _epoch: u64, at: Range, mut buf: AlignedBuf, done: Done<AlignedBuf>) {
        let r = self
            .check_range(at.segment, at.offset, buf.len())
            .and_then(|()| {
                let (dev, base) = self.geo.locate(at.segment);
                let offset = base + at.offset;
                self.devices
                    .read_at(dev, &mut buf, offset)
                    .map_err(|source| Error::Io {
                        device: dev,
                        offset,
                        source,
                    })
            });
        done(r.map(|()| buf));
    }

    fn delete(&self, epoch: u64, segments: &[u32], done: Done<()>) {
        if let Err(e) = self.fenced(epoch) {
            return done(Err(e));
        }
        // Runs of adjacent segments of one device go in one call. Best effort: a device that
        // cannot discard keeps the bytes, which only costs space.
        let seg_bytes = self.geo.segment_bytes;
        let mut i = 0;
        while i < segments.len() {
            let (dev, base) = self.geo.locate(segments[i]);
            let mut j = i + 1;
            while j < segments.len()
                && segments[j] == segments[j - 1] + 1
                && self.geo.locate(segments[j]) == (dev, base + (j - i) as u64 * seg_bytes)
            {
                j += 1;
            }
            let _ = self.devices.discard(dev, base, (j - i) as u64 * seg_bytes);
            i = j;
        }
        done(Ok(()));
    }

    fn fence(&self, epoch: u64) {
        self.fence.fetch_max(epoch, Ordering::AcqRel);
    }
}
