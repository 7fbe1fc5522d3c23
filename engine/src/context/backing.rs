//! Keeping segments fallocated in the backing files of a thin pool, so that a full host file
//! system never stops checkpoints.

use crate::context::Context;

use crate::error::{Error, Result};
use crate::space::{SegState, SegUse};

impl Context {
    /// Keep `2 × ckpt_reserve` free segments allocated in the backing files of a thin pool,
    /// so that checkpoints and the cleaner's moves (which take them first) never meet a full
    /// host file system: a shutdown still checkpoints, and a reopen still finds room for its
    /// recovery checkpoint.
    pub(crate) fn top_up_backed(&self) {
        if !self.discard_freed || self.read_only {
            return;
        }
        let want = 2 * self.ckpt_reserve();
        let candidates: Vec<u32> = {
            let mut space = self.space.lock();
            space.backed_reserve = want;
            let have = space.backed_free();
            (0..space.seg_state.len())
                .filter(|&s| space.seg_state[s] == SegState::Free && !space.undiscarded[s])
                .take(want.saturating_sub(have))
                .map(|s| s as u32)
                .collect()
        };
        for seg in candidates {
            let (dev, base) = self.geo.locate(seg);
            match self.devices.preallocate(dev, base, self.geo.segment_bytes) {
                Ok(()) => {
                    let mut space = self.space.lock();
                    if !space.undiscarded[seg as usize] {
                        space.undiscarded[seg as usize] = true;
                        space.undiscarded_count += 1;
                    }
                }
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ENOSPC) {
                        self.note_host_full();
                    }
                    break;
                }
            }
        }
    }

    /// Make sure the backing files hold `segs` (just allocated, in `state`) before anything is
    /// written there: a segment the host file system has no room for is swapped for another
    /// free one. Checkpoints and new chains take held segments first (`SegUse::Metadata`),
    /// but which ones are held is not known after a restart (ext4 reports fallocated,
    /// unwritten extents as holes): a `fallocate` tells, and costs nothing on a held one.
    pub(crate) fn backed(&self, mut segs: Vec<u32>, state: SegState) -> Result<Vec<u32>> {
        if !self.discard_freed {
            return Ok(segs);
        }
        let mut refused = Vec::new();
        let mut i = 0;
        let result = loop {
            let Some(&seg) = segs.get(i) else {
                break Ok(());
            };
            // Even a segment marked as held: the mark may stand for part of it only.
            let (dev, base) = self.geo.locate(seg);
            match self.devices.preallocate(dev, base, self.geo.segment_bytes) {
                Ok(()) => i += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    self.note_host_full();
                    refused.push(seg);
                    match self
                        .space
                        .lock()
                        .alloc_segment_for(state, 0, SegUse::Metadata)
                    {
                        Some(other) => segs[i] = other,
                        None => break Err(Error::NoSpace),
                    }
                }
                // Best effort otherwise (a file system without fallocate).
                Err(_) => i += 1,
            }
        };
        let mut space = self.space.lock();
        for s in refused {
            space.set_state(s, SegState::Free);
        }
        if result.is_err() {
            for &s in &segs {
                space.set_state(s, SegState::Free);
            }
        }
        result.map(|()| segs)
    }
}
