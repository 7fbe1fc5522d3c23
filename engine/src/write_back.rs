//! Write-back: writes acknowledged once sent to their shards, while the pool has room to spare.
//! [`EarlyWrites`] owns the accounting: bytes and requests outstanding, the budget they may
//! hold, and per-block pending counts that tell reads when the maps may be behind.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::api::BLOCK_BYTES;
use crate::health::Health;
use crate::space::Space;

/// Slots of the early-write counts (`EarlyWrites::pending`): 64 Ki, 256 KiB, few false
/// positives with the 64 MiB of early writes a pool holds at most under 4k writes.
const PENDING_BITS: u32 = 16;
const PENDING_SLOTS: usize = 1 << PENDING_BITS;

pub(crate) struct EarlyWrites {
    /// `PoolOptions::write_back_bytes`; 0: off.
    limit: u64,
    segment_bytes: u64,
    /// Log chains: each may hold a segment between two looks at the space.
    chains: u64,
    /// Payload bytes the pool stores before writes of new blocks fail.
    usable_bytes: u64,
    /// Bytes and requests acknowledged early whose records have not all applied yet.
    bytes: AtomicU64,
    jobs: AtomicU64,
    /// Writes acknowledged early since open.
    total: AtomicU64,
    /// Early writes not yet applied, counted per block in slots hashed from (volume, LBA): a
    /// read whose blocks all count zero may be served from the cache on the caller's thread,
    /// as no early write to them can still be on its way to the map. Without it, every read
    /// went through the shards while any early write was outstanding: 4k reads at QD1 waited
    /// behind the writes queued there (p99 3.4 ms during 120k overwrites a second).
    pending: Box<[AtomicU32]>,
    /// Free segments early writes leave alone: the data reserve and one more (a segment may be
    /// taken between two looks; shards look again at every roll-over, the cleaner at every
    /// free), kept by the checkpointer (computing the reserve walks the maps). Early writes
    /// hold at most the free space above it, so that they do not wait for the cleaner (with a
    /// segment per chain instead, 85-87% of 4k overwrites at 90% full went early, 93-94% now).
    min_free: AtomicUsize,
    /// Bytes early writes may hold now (see `note_room`); read without the space lock.
    budget: AtomicU64,
    /// Bytes the free segments above the floor hold (half of them, see `note_room`), not
    /// capped by the limit: early writes and the writes the shards have taken must fit in it
    /// together (see `admits`).
    room: AtomicU64,
}

impl EarlyWrites {
    pub(crate) fn new(limit: u64, segment_bytes: u64, chains: usize, usable_bytes: u64) -> Self {
        EarlyWrites {
            limit,
            segment_bytes,
            chains: chains as u64,
            usable_bytes,
            bytes: AtomicU64::new(0),
            jobs: AtomicU64::new(0),
            total: AtomicU64::new(0),
            pending: (0..PENDING_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            min_free: AtomicUsize::new(usize::MAX),
            budget: AtomicU64::new(0),
            room: AtomicU64::new(0),
        }
    }

    /// `PoolOptions::write_back_bytes` (0: write-back off).
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes acknowledged early and not yet applied.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Writes acknowledged early since open.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Whether no early write is outstanding.
    pub(crate) fn idle(&self) -> bool {
        self.jobs.load(Ordering::Acquire) == 0
    }

    /// Take `len` bytes of a write for write-back: it is acknowledged as soon as it is sent
    /// to its shards. Only while the pool has room to spare (no cleaning needed, capacity left
    /// for every early write), so that an acknowledged write does not fail for want of space.
    /// `accepted`: bytes of writes the shards have taken and not stored yet
    /// (`Context::accepted_bytes`); they go to the free segments before this one does, so it
    /// must fit in what they leave. Without that, writes queued ahead of an early write could
    /// fill a small pool's last segments and leave it nowhere to go (once in 40 runs of
    /// `writes_taken_faster_than_stored_still_leave_early_writes_room` under load).
    pub(crate) fn admits(
        &self,
        len: u64,
        accepted: u64,
        health: &Health,
        full_of_live_data: bool,
    ) -> bool {
        if self.limit == 0 || health.is_faulted() || health.is_closed() {
            return false;
        }
        let before = self.bytes.fetch_add(len, Ordering::AcqRel);
        let ok = before + len <= self.budget.load(Ordering::Acquire)
            && before + len + accepted <= self.room.load(Ordering::Acquire)
            && !full_of_live_data;
        if ok {
            self.jobs.fetch_add(1, Ordering::AcqRel);
            self.total.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
        }
        ok
    }

    fn slot(vol: u32, lba: u64) -> usize {
        let h = (u64::from(vol) << 40 ^ lba).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - PENDING_BITS)) as usize
    }

    /// Count the blocks of an early write of `len` bytes at `offset` of volume `vol` as pending
    /// (before it is sent to its shards and acknowledged) or, with `done`, no longer (after
    /// its records are applied: the maps hold it).
    pub(crate) fn mark(&self, vol: u32, offset: u64, len: u64, done: bool) {
        for lba in offset / BLOCK_BYTES..(offset + len).div_ceil(BLOCK_BYTES) {
            let slot = &self.pending[Self::slot(vol, lba)];
            if done {
                slot.fetch_sub(1, Ordering::Release);
            } else {
                slot.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether an early write to block `lba` of volume `vol` may not be applied yet (or one to
    /// a block sharing its slot).
    pub(crate) fn pending(&self, vol: u32, lba: u64) -> bool {
        self.pending[Self::slot(vol, lba)].load(Ordering::Acquire) != 0
    }

    /// An early write's records all applied (or failed).
    pub(crate) fn done(&self, len: u64) {
        self.bytes.fetch_sub(len, Ordering::AcqRel);
        self.jobs.fetch_sub(1, Ordering::AcqRel);
    }

    /// Set the free-segment floor early writes leave alone.
    pub(crate) fn set_floor(&self, min_free: usize) {
        self.min_free.store(min_free, Ordering::Relaxed);
    }

    /// No more early writes for now (the host file system is short of room).
    pub(crate) fn stop(&self) {
        self.budget.store(0, Ordering::Release);
        self.room.store(0, Ordering::Release);
    }

    /// How many bytes early writes may hold given `space` and the bytes of writes taken and
    /// not yet applied (`accepted`): the free segments above the floor, up to the limit, while
    /// there is capacity for twice the limit plus a segment per chain (what may be stored
    /// between two looks at stored bytes); none on a tight host.
    ///
    /// Early writes go on while the cleaner works, in the room it keeps above the data
    /// reserve: at 90% full, stopping them at the cleaner's threshold (as before) left every
    /// write waiting for its record (46k against 69k IOPS of 4k overwrites, QD32). An early
    /// write that meets the data reserve anyway (write-through writes took the room) waits
    /// for the cleaner like any other; the capacity check guarantees it can win space back.
    pub(crate) fn note_room(&self, space: &Space, accepted: u64, host_tight: bool) {
        if host_tight {
            self.stop();
            return;
        }
        let margin = 2 * self.limit + self.segment_bytes * self.chains;
        let floor = self.min_free.load(Ordering::Relaxed);
        // Half the room: a block alone in its record takes a page of header too.
        let room = if space.stored_bytes + accepted + margin > self.usable_bytes {
            0
        } else {
            space.free_segments.saturating_sub(floor) as u64 * self.segment_bytes / 2
        };
        self.room.store(room, Ordering::Release);
        self.budget.store(room.min(self.limit), Ordering::Release);
    }
}
