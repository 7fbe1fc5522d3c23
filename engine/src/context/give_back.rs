//! Giving freed segments back to the device (hole punching, discard).

use crate::context::Context;
use crate::space::Geometry;

use crate::io::Devices;
use crate::space::{SegState, Space};

/// Most segments one call of `give_back_freed` punches: after an open that found many
/// (every free segment of a block device, discarded once), the checkpointer gives them back a
/// few at a time between its other work instead of in one long stretch.
pub(crate) const GIVE_BACK_PER_CALL: usize = 64;

impl Context {
    /// Note that `segs`, just freed, still hold their old blocks in the backing file.
    pub(crate) fn note_freed(&self, space: &mut Space, segs: &[u32]) {
        self.note_write_back_room(space);
        if self.discard_freed {
            for &s in segs {
                if let Some(u) = space.undiscarded.get_mut(s as usize) {
                    *u = true;
                    space.undiscarded_count += 1;
                }
            }
        }
    }

    /// At open: mark the free segments whose blocks the backing files still hold (freed while
    /// space was short and not punched before the pool stopped; the marks live only in
    /// memory), so that `give_back_freed` returns them to the file system once space allows.
    /// Where allocation cannot be known (block devices), every free segment is marked: it is
    /// discarded once, as `fstrim` at mount would.
    pub(crate) fn note_unpunched_at_open(&self) {
        mark_held_free(&*self.devices, &self.geo, &mut self.space.lock());
    }

    /// Give the blocks of freed segments back to the file system (punch holes; best effort),
    /// while more than twice the cleaning threshold stays free.
    ///
    /// A segment being punched is `Discarding`, not `Free`: a shard that took it and wrote
    /// records into it before the punch reached the file would lose them. When space is short,
    /// freed segments stay `Free` and unpunched: a shard takes them soon, and punching them
    /// would only make that shard's writes allocate the blocks again, while ext4's punch waits
    /// for every direct write in flight to the file (writers at 90% full stalled behind it). A
    /// later call, once space is back, gives them back.
    pub(crate) fn give_back_freed(&self) {
        if !self.discard_freed {
            return;
        }
        let keep = 2 * self.cleaning_threshold();
        let taken: Vec<u32> = {
            let mut space = self.space.lock();
            let mut taken = Vec::new();
            if space.undiscarded_count > 0 {
                let mut capped = false;
                // Segments kept allocated for checkpoints and the cleaner are not given back.
                let mut held = space.backed_free();
                for s in 0..space.seg_state.len() {
                    if space.free_segments <= keep || held <= space.backed_reserve {
                        capped = held <= space.backed_reserve;
                        break;
                    }
                    if taken.len() >= GIVE_BACK_PER_CALL {
                        capped = true;
                        break;
                    }
                    if space.undiscarded[s] && space.seg_state[s] == SegState::Free {
                        space.set_state(s as u32, SegState::Discarding);
                        taken.push(s as u32);
                        held -= 1;
                    }
                }
                if space.free_segments > keep && !capped {
                    // Every marked segment still free was taken; the others are in use again.
                    space.undiscarded_count = 0;
                }
                self.note_write_back_room(&space);
            }
            taken
        };
        if taken.is_empty() {
            return;
        }
        // Best effort: a segment the store keeps costs only space (and is taken again).
        let _ = crate::store::wait(|done| self.store.delete(self.epoch, &taken, done));
        let mut space = self.space.lock();
        for &s in &taken {
            if let Some(u) = space.undiscarded.get_mut(s as usize) {
                *u = false;
            }
            space.set_state(s, SegState::Free);
        }
    }
}

/// Mark the free segments whose blocks the backing files still hold (see
/// `Inner::note_unpunched_at_open`).
pub(crate) fn mark_held_free(devices: &dyn Devices, geo: &Geometry, space: &mut Space) {
    let ranges: Vec<Option<Vec<(u64, u64)>>> = (0..devices.count())
        .map(|d| devices.data_ranges(d as u16).unwrap_or(None))
        .collect();
    for s in 0..space.seg_state.len() {
        if space.seg_state[s] != SegState::Free {
            continue;
        }
        let (dev, base) = geo.locate(s as u32);
        let end = base + geo.segment_bytes;
        let held = match &ranges[usize::from(dev)] {
            None => true,
            Some(r) => {
                // Sorted and disjoint: the first range ending past `base` is the only
                // candidate.
                let i = r.partition_point(|&(_, e)| e <= base);
                r.get(i).is_some_and(|&(start, _)| start < end)
            }
        };
        if held && !space.undiscarded[s] {
            space.undiscarded[s] = true;
            space.undiscarded_count += 1;
        }
    }
}
