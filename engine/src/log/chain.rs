//! A shard's log chain: the open segment, rolling to the next one, waiting for space, void
//! records over failed writes, and restarting the chain at a checkpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::context::Context;
use crate::error::Error;
use crate::format::{
    RecordHeader, RecordKind, RecordSeal, SegmentHeader, SegmentKind, TrimEntry, IO_ALIGN,
    NO_SEGMENT, SEGMENT_HEADER_BYTES,
};
use crate::io::AlignedBuf;
use crate::space::{SegState, SegUse};

/// Bytes a data record leaves free at the end of the last segment of a chain, so that trims
/// (which free space) still fit on a full pool.
pub(crate) const TRIM_RESERVE_BYTES: u64 = 64 << 10;
/// Longest a data record waits for the cleaner before it fails for want of space.
pub(crate) const MAX_STALL: Duration = Duration::from_secs(30);

/// What a record is for, which decides how much of the reserve it may use.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    Data,
    /// Trims and cleaner moves free space: they may use the reserve kept back from data.
    Freeing,
}

/// Where replay of a shard's chain starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShardPosition {
    pub segment: u32,
    pub offset: u32,
    pub next: u32,
    pub shard_seq: u64,
    /// Nonce of `segment`'s current use (from its header), which seals the records written
    /// in it; `None` when it is not known (not stored in checkpoints: replay reads it from the
    /// segment's header).
    pub nonce: Option<[u8; 16]>,
}

/// Where a failed record lies, to write a `Void` record over its header: replay then steps
/// over its space to the records after it (it never searches for them).
#[derive(Clone, Copy)]
pub(crate) struct VoidAt {
    pub(crate) dev: u16,
    pub(crate) at: u64,
    pub(crate) seq: u64,
    pub(crate) shard_seq: u64,
    pub(crate) segment: u32,
    pub(crate) offset: u32,
    pub(crate) record_bytes: u32,
    pub(crate) nonce: [u8; 16],
}

/// A worker's log chain: where its next record goes, the segment after that, and the
/// `Void` records it still owes. Owned by the worker that appends to it.
pub(crate) struct Chain {
    /// The worker's number: the chain's shard in headers and records.
    pub(crate) id: usize,
    pub(crate) ctx: Arc<Context>,
    pub(crate) pos: ShardPosition,
    /// The open segment's header is on the device (its write did not fail). A checkpoint
    /// moves a chain whose header failed to a new segment: replay needs the header's nonce.
    pub(crate) header_ok: bool,
    /// The next segment is allocated in its backing file (or needs no allocation).
    pub(crate) next_backed: bool,
    /// Failed records whose `Void` could not be written yet: tried again before later records
    /// are applied, until a checkpoint makes them moot.
    pub(crate) voids: Vec<VoidAt>,
}

impl Chain {
    pub(crate) fn new(id: usize, ctx: Arc<Context>, pos: ShardPosition) -> Chain {
        Chain {
            id,
            ctx,
            pos,
            header_ok: true,
            next_backed: false,
            voids: Vec::new(),
        }
    }

    /// Whether a data record of `bytes` should wait for the cleaner rather than fail: it does
    /// not fit in the open segment, free space is at the data reserve, cleaning can give some
    /// back, and it has not waited too long already.
    pub(crate) fn must_wait_for_space(
        &mut self,
        bytes: u64,
        stalled_since: Option<Instant>,
    ) -> bool {
        let seg_bytes = self.ctx.geo.segment_bytes;
        let fits_here = self.pos.segment != NO_SEGMENT
            && u64::from(self.pos.offset) + bytes + TRIM_RESERVE_BYTES <= seg_bytes;
        if fits_here {
            return false;
        }
        let free = self.ctx.space.lock().free_segments;
        let reserve = self.ctx.data_reserve();
        if self.pos.next != NO_SEGMENT && free > reserve {
            return false;
        }
        if stalled_since.is_some_and(|t| t.elapsed() > MAX_STALL) || self.ctx.health.is_faulted() {
            return false;
        }
        if free <= reserve && self.ctx.full_of_live_data() {
            // The cleaner cannot win space back: the pool is full of live data.
            self.ctx.wake.kick_cleaner();
            return false;
        }
        // A checkpoint gives a shard without a next segment one; the cleaner makes free space.
        if self.pos.next == NO_SEGMENT && free > reserve {
            self.ctx.wake.kick_checkpoint();
        } else {
            self.ctx.wake.kick_cleaner();
        }
        true
    }

    /// Whether `bytes` fit in the open segment as [`Chain::make_room`] sees it (no roll).
    pub(crate) fn fits(&self, bytes: u64, room: Room) -> bool {
        let margin = if room == Room::Freeing || self.pos.next != NO_SEGMENT {
            0
        } else {
            TRIM_RESERVE_BYTES
        };
        self.pos.segment != NO_SEGMENT
            && u64::from(self.pos.offset) + bytes + margin <= self.ctx.geo.segment_bytes
    }

    /// Make sure `bytes` fit in the open segment, moving to the next one if needed. When there
    /// is no next segment, data records leave [`TRIM_RESERVE_BYTES`] free so that trims (which
    /// free space) still fit on a full pool. Data may not move into a new segment once free
    /// space is down to the data reserve: the rest is for checkpoints, trims and the cleaner,
    /// so that cleaning can always make progress.
    ///
    /// A new segment's header goes to `write_header` (device, offset, sealed block), which
    /// queues it in order with the records: none after it is acknowledged before it.
    pub(crate) fn make_room(
        &mut self,
        bytes: u64,
        room: Room,
        write_header: &mut dyn FnMut(u16, u64, AlignedBuf),
    ) -> Result<(), Error> {
        let seg_bytes = self.ctx.geo.segment_bytes;
        if self.fits(bytes, room) {
            return Ok(());
        }
        if self.pos.next == NO_SEGMENT {
            // Ask for a checkpoint: it frees segments and restarts the chain.
            self.ctx.wake.kick_checkpoint();
            return Err(Error::NoSpace);
        }
        // Next segments may come out of everything but the checkpoint's own reserve: data is
        // held back at the data reserve above it, so what lies between is the cleaner's.
        let reserve = self.ctx.ckpt_reserve();
        let free = self.ctx.space.lock().free_segments;
        // `must_wait_for_space` held data back at the data reserve; by now the other shard or
        // the cleaner may have taken a segment (failing here made a write at 90% full fail with
        // for want of space while the cleaner was winning space back), so data only stops short of the
        // checkpoint's own reserve.
        if room == Room::Data && free <= reserve + 1 {
            // Wake the cleaner; the write fails now rather than eat the checkpoint's reserve.
            self.ctx.wake.kick_cleaner();
            return Err(Error::NoSpace);
        }
        // The host file system may have had no room for the next segment when it was
        // reserved: data fails for want of space rather than write where nothing is allocated.
        if !self.next_backed {
            self.next_backed = self.preallocate(self.pos.next);
            if !self.next_backed && room == Room::Data {
                return Err(Error::NoSpace);
            }
        }
        let mut space = self.ctx.space.lock();
        let next2 = space
            .alloc_segment_for(SegState::Next, reserve, self.seg_use())
            .unwrap_or(NO_SEGMENT);
        let last_seq = self.ctx.seq.load(Ordering::Acquire);
        space.set_state(self.pos.segment, SegState::Sealed { seq: last_seq });
        space.set_state(self.pos.next, SegState::Open);
        self.ctx.store.sealed(self.ctx.epoch, self.pos.segment);
        let free = space.free_segments;
        self.ctx.note_write_back_room(&space);
        drop(space);
        if free < self.ctx.cleaning_threshold_from(reserve) {
            // Start cleaning now, not at the cleaner's next look (up to 500 ms away).
            self.ctx.wake.kick_cleaner();
        }
        self.pos.segment = self.pos.next;
        self.pos.next = next2;
        self.pos.offset = SEGMENT_HEADER_BYTES as u32;
        if next2 == NO_SEGMENT {
            self.ctx.wake.kick_checkpoint();
        } else {
            self.next_backed = self.preallocate(next2);
        }
        // The header goes through the ordered queue: no record after it is acknowledged before
        // the header itself is on the device.
        let mut buf = AlignedBuf::new(IO_ALIGN);
        self.segment_header(&mut buf);
        self.header_ok = true;
        let (dev, base) = self.ctx.geo.locate(self.pos.segment);
        write_header(dev, base, buf);
        if u64::from(self.pos.offset) + bytes > seg_bytes {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// Re-allocate a segment that a checkpoint may have punched out of the file, ahead of use.
    /// Not when the file still holds it (a prefilled pool, or a segment freed without a
    /// discard): ext4's fallocate waits for every direct write in flight to the file and holds
    /// new ones back meanwhile, on every segment a shard rolls onto.
    pub(crate) fn preallocate(&self, seg: u32) -> bool {
        let allocated = || {
            !self.ctx.discard_freed
                || self
                    .ctx
                    .space
                    .lock()
                    .undiscarded
                    .get(seg as usize)
                    .copied()
                    .unwrap_or(false)
        };
        if seg != NO_SEGMENT && !allocated() {
            let (dev, base) = self.ctx.geo.locate(seg);
            // Without it writes still work, only slower; but a host file system out of room
            // must stop data before it is acknowledged, not after.
            if let Err(e) = self
                .ctx
                .devices
                .preallocate(dev, base, self.ctx.geo.segment_bytes)
            {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    self.ctx.note_host_full();
                    return false;
                }
            }
        }
        true
    }

    /// The sealed header of a new use of the open segment, with a fresh nonce (which the
    /// records written in it from now on carry in their MACs).
    pub(crate) fn segment_header(&mut self, buf: &mut [u8]) {
        let nonce = self.ctx.segment_nonce(self.pos.segment);
        self.pos.nonce = Some(nonce);
        SegmentHeader {
            kind: SegmentKind::Data,
            segment: self.pos.segment,
            shard: self.id as u16,
            pool_uuid: self.ctx.pool_uuid,
            epoch: self.ctx.epoch,
            next_segment: self.pos.next,
            nonce,
        }
        .encode(buf, &self.ctx.log_key);
    }

    /// The cleaner's moves take segments the backing file holds, like checkpoints: they must
    /// go on when the host file system is full (they are what gives space back).
    pub(crate) fn seg_use(&self) -> SegUse {
        if self.id == self.ctx.mover() {
            SegUse::Metadata
        } else {
            SegUse::Data
        }
    }

    /// Device and byte offset of the open segment's header.
    pub(crate) fn open_header_at(&self) -> (u16, u64) {
        self.ctx.geo.locate(self.pos.segment)
    }

    /// Nonce of the open segment's current use.
    pub(crate) fn nonce(&self) -> [u8; 16] {
        debug_assert!(
            self.pos.nonce.is_some(),
            "records written before a segment header"
        );
        self.pos.nonce.unwrap_or_default()
    }

    /// Write a `Void` record over a failed record's header, synchronously; `false` if the
    /// device refused it too.
    pub(crate) fn write_void(&self, v: &VoidAt) -> bool {
        let mut buf = AlignedBuf::new(IO_ALIGN);
        RecordHeader {
            version: crate::format::FORMAT_VERSION as u16,
            kind: RecordKind::Void,
            seq: v.seq,
            shard_seq: v.shard_seq,
            epoch: self.ctx.epoch,
            segment: v.segment,
            entry_count: 0,
            record_bytes: v.record_bytes,
            header_bytes: IO_ALIGN as u32,
            durable_shard_seq: 0,
            shard: self.id as u16,
        }
        .encode_and_seal(
            &mut buf,
            TrimEntry::BYTES,
            &RecordSeal {
                key: &self.ctx.log_key,
                nonce: v.nonce,
                offset: v.offset,
            },
        );
        self.ctx.devices.write_at(v.dev, &buf, v.at).is_ok()
    }

    /// Try the `Void` records still owed again (before a later record is acknowledged).
    pub(crate) fn retry_voids(&mut self) {
        let mut voids = std::mem::take(&mut self.voids);
        voids.retain(|v| !self.write_void(v));
        self.voids = voids;
    }

    /// At a checkpoint the chain goes on where it is (the checkpoint records the position and
    /// the next segment, so replay starts there): sealing a half-full segment at every
    /// checkpoint only made work for the cleaner. A shard left without a next segment gets one
    /// now if space allows, and a shard without any segment starts a new chain.
    pub(crate) fn at_checkpoint(&mut self) -> Result<(), Error> {
        if self.pos.segment == NO_SEGMENT || !self.header_ok {
            self.restart_chain()?;
            // The checkpoint starts replay past every failed record.
            self.voids.clear();
            return Ok(());
        }
        self.voids.clear();
        if self.pos.next == NO_SEGMENT {
            let reserve = self.ctx.ckpt_reserve();
            let next = {
                let mut space = self.ctx.space.lock();
                let next = space.alloc_segment_for(SegState::Next, reserve, self.seg_use());
                self.ctx.note_write_back_room(&space);
                next
            };
            if let Some(next) = next {
                self.pos.next = next;
                self.next_backed = self.preallocate(next);
            }
        }
        Ok(())
    }

    /// Seal the open segment and start a new chain in the reserved next one
    /// (its header written and made durable by the checkpoint's sync).
    ///
    /// With no next segment and no free one (beyond the checkpoint reserve), the chain goes on in
    /// the open segment from the current offset: sealing it would leave the shard with no log
    /// at all, not even for the trims that free space.
    pub(crate) fn restart_chain(&mut self) -> Result<(), Error> {
        let reserve = self.ctx.reserve_segments();
        let mut space = self.ctx.space.lock();
        let last_seq = self.ctx.seq.load(Ordering::Acquire);
        let seg = if self.pos.next != NO_SEGMENT {
            self.pos.next
        } else {
            match space.alloc_segment_for(SegState::Open, reserve, self.seg_use()) {
                Some(s) => s,
                None => {
                    // Replay resumes at the current offset of the open segment (or, with no
                    // segment at all, the shard waits for a checkpoint that frees one).
                    return Ok(());
                }
            }
        };
        if self.pos.segment != NO_SEGMENT {
            space.set_state(self.pos.segment, SegState::Sealed { seq: last_seq });
            self.ctx.store.sealed(self.ctx.epoch, self.pos.segment);
        }
        space.set_state(seg, SegState::Open);
        let next = space
            .alloc_segment_for(SegState::Next, reserve, self.seg_use())
            .unwrap_or(NO_SEGMENT);
        self.ctx.note_write_back_room(&space);
        drop(space);
        self.pos.segment = seg;
        self.pos.next = next;
        self.pos.offset = SEGMENT_HEADER_BYTES as u32;
        if !self.preallocate(seg) {
            // No room on the host for the new segment: its header would fail too.
            self.header_ok = false;
        }
        self.next_backed = self.preallocate(next);
        let mut buf = AlignedBuf::new(IO_ALIGN);
        self.segment_header(&mut buf);
        let (dev, base) = self.ctx.geo.locate(seg);
        let r = self.ctx.devices.write_at(dev, &buf, base);
        self.header_ok = r.is_ok();
        r.map_err(|source| Error::Io {
            device: dev,
            offset: base,
            source,
        })
    }
}
