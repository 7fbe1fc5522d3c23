//! The host file system under a thin pool: how much room it has left for the backing files.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::io::Devices;

pub(crate) struct HostRoom {
    /// Room to keep on the host beyond what the backing files may still grow by: four
    /// write-back limits and a segment per chain.
    margin: u64,
    /// The file system under the backing files is short of room (see `refresh`): no write is
    /// acknowledged before it is stored, so a write that finds no room fails for want of
    /// space instead of being lost after its acknowledgement.
    tight: AtomicBool,
    /// Bytes free on the host file systems and bytes of the backing files still unallocated,
    /// as last seen (summed over devices; 0 for block devices).
    free: AtomicU64,
    unallocated: AtomicU64,
    /// When host space was last looked at (ms since `epoch`).
    seen_ms: AtomicU64,
    epoch: Instant,
}

impl HostRoom {
    pub(crate) fn new(margin: u64) -> HostRoom {
        HostRoom {
            margin,
            tight: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            unallocated: AtomicU64::new(0),
            seen_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub(crate) fn is_tight(&self) -> bool {
        self.tight.load(Ordering::Acquire)
    }

    /// A write or an allocation found no room on the host file system.
    pub(crate) fn set_tight(&self) {
        self.tight.store(true, Ordering::Release);
    }

    /// Bytes free on the host and bytes the backing files may still grow by, as last seen.
    pub(crate) fn free_and_unallocated(&self) -> (u64, u64) {
        (
            self.free.load(Ordering::Relaxed),
            self.unallocated.load(Ordering::Relaxed),
        )
    }

    /// Look at the room left on the file systems under the backing files (at most every 50
    /// ms unless `force`). The host is tight when it cannot give the backing files all they
    /// may still grow by and has less than the margin left.
    pub(crate) fn refresh(&self, devices: &dyn Devices, force: bool) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let seen = self.seen_ms.load(Ordering::Relaxed);
        if !force && seen != 0 && now.saturating_sub(seen) < 50 {
            return;
        }
        self.seen_ms.store(now, Ordering::Relaxed);
        let (mut free, mut unallocated, mut thin) = (u64::MAX, 0u64, false);
        for d in 0..devices.count() {
            if let Ok(Some(h)) = devices.host_space(d as u16) {
                free = free.min(h.free_bytes);
                unallocated += h.unallocated_bytes;
                thin = true;
            }
        }
        if !thin {
            return;
        }
        self.free.store(free, Ordering::Relaxed);
        self.unallocated.store(unallocated, Ordering::Relaxed);
        self.tight
            .store(free < unallocated && free < self.margin, Ordering::Release);
    }
}
