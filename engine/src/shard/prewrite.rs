//! Commits on a thin pool: a small record followed by a flush cost twice a written file's
//! (fio, 4 KiB `O_DIRECT` write + `fdatasync`: 8.7k pairs/s on a written file, 4.5k on a
//! fallocated one, 5.7k on a sparse one). On ext4 a write into an unwritten extent converts it
//! when it completes, and the next `fdatasync` must then commit the journal: a device flush
//! becomes a journal write and two flushes. A shard that answers many flushes writes zeroes
//! over its chain's next segment ahead of use, so that its commits land on written blocks.
//!
//! Only for flush-heavy chains (at least [`PREWRITE_AFTER_FLUSHES`] flushes in the open
//! segment, with at most [`PREWRITE_BYTES_PER_FLUSH`] of log between them): a bulk writer's
//! records are large and flushed rarely, and zeroing ahead would double its bytes. The rest of
//! the open segment is zeroed first (from a little ahead of the chain), then the next one.
//! The zero writes go through the shard's ring, in chunks, one at a time, each starting ahead
//! of the chain's records; no record (or segment header) is placed over a chunk in flight
//! (`finish_prewrite`): the zeroes could land over it.

use crate::format::{IO_ALIGN, NO_SEGMENT};
use crate::io::{AlignedBuf, IoDone, IoOp, OpKind};

use super::Shard;

/// Flushes answered within one segment before its chain counts as flush-heavy.
pub(crate) const PREWRITE_AFTER_FLUSHES: u32 = 4;

/// Most log bytes per flush (on average, in the open segment) of a flush-heavy chain.
pub(crate) const PREWRITE_BYTES_PER_FLUSH: u64 = 512 << 10;

/// Bytes per zero write.
const CHUNK: u64 = 4 << 20;

/// How far ahead of the chain's next record zeroing of the open segment starts.
const LEAD: u64 = 256 << 10;

#[derive(Default)]
pub(crate) struct Prewrites {
    /// The open segment the flushes were counted in, and how many.
    segment: u32,
    flushes: u32,
    /// Segments zeroed (or being zeroed), newest last: the open one, then the next.
    done_for: Vec<u32>,
    running: Option<Running>,
    /// Segments waiting to be zeroed after the running one.
    queued: Vec<u32>,
}

struct Running {
    segment: u32,
    /// Where the next chunk starts (bytes into the segment).
    at: u64,
    /// The chunk in flight: bytes `from..to` of the segment.
    from: u64,
    to: u64,
    tag: u64,
}

impl Shard {
    /// `n` flushes were answered: a flush-heavy chain zeroes the rest of its open segment and
    /// its next one.
    pub(crate) fn note_flushes(&mut self, n: usize) {
        if !self.ctx.discard_freed || self.ctx.read_only {
            // Prefilled pools are written already.
            return;
        }
        let (open, next) = (self.chain.pos.segment, self.chain.pos.next);
        let used = u64::from(self.chain.pos.offset);
        let p = &mut self.prewrites;
        if p.segment != open {
            p.segment = open;
            p.flushes = 0;
        }
        p.flushes = p.flushes.saturating_add(n as u32);
        if p.flushes < PREWRITE_AFTER_FLUSHES
            || used > u64::from(p.flushes) * PREWRITE_BYTES_PER_FLUSH
        {
            return;
        }
        for seg in [open, next] {
            if seg != NO_SEGMENT && !p.done_for.contains(&seg) {
                p.done_for.push(seg);
                p.queued.push(seg);
            }
        }
        // Remember only the last few.
        let keep = p.done_for.len().saturating_sub(4);
        p.done_for.drain(..keep);
        self.start_queued();
    }

    /// Start zeroing the next queued segment, unless a zeroing runs.
    fn start_queued(&mut self) {
        while self.prewrites.running.is_none() && !self.prewrites.queued.is_empty() {
            let segment = self.prewrites.queued.remove(0);
            self.prewrites.running = Some(Running {
                segment,
                at: 0,
                from: 0,
                to: 0,
                tag: 0,
            });
            self.push_zeroes(None);
        }
    }

    /// Queue the running zeroing's next chunk, starting ahead of the chain when it zeroes the
    /// open segment; ends it when nothing is left.
    fn push_zeroes(&mut self, buf: Option<AlignedBuf>) {
        let seg_bytes = self.ctx.geo.segment_bytes;
        let Some(r) = self.prewrites.running.as_ref() else {
            return;
        };
        let segment = r.segment;
        let mut from = r.at;
        if segment == self.chain.pos.segment {
            let ahead = (u64::from(self.chain.pos.offset) + LEAD).next_multiple_of(IO_ALIGN as u64);
            from = from.max(ahead);
        }
        if from >= seg_bytes {
            self.prewrites.running = None;
            self.start_queued();
            return;
        }
        let len = CHUNK.min(seg_bytes - from) as usize;
        let buf = match buf {
            Some(b) if b.len() >= len => b,
            _ => AlignedBuf::new(len),
        };
        let tag = self.tag();
        let (dev, base) = self.ctx.geo.locate(segment);
        self.queue.push(IoOp {
            kind: OpKind::Write,
            dev,
            offset: base + from,
            len,
            buf,
            tag,
        });
        if let Some(r) = self.prewrites.running.as_mut() {
            r.from = from;
            r.to = from + len as u64;
            r.at = r.to;
            r.tag = tag;
        }
    }

    /// A completion of the running zero write (`Err`: not one). The next chunk follows; a
    /// failure only ends the zeroing (the segment is used as it is).
    pub(crate) fn prewrite_done(&mut self, d: IoDone) -> Result<(), IoDone> {
        let Some(r) = self.prewrites.running.as_ref() else {
            return Err(d);
        };
        if r.tag != d.tag {
            return Err(d);
        }
        if d.result.is_err() {
            self.prewrites.running = None;
            self.start_queued();
            return Ok(());
        }
        self.push_zeroes(Some(d.buf));
        Ok(())
    }

    /// Before bytes `from..to` of `segment` are written (a record, or a segment header at 0):
    /// if a zero chunk in flight covers any of them, wait for it and stop zeroing that
    /// segment (completions of other ops met meanwhile are kept for the next `reap`).
    pub(crate) fn finish_prewrite(&mut self, segment: u32, from: u64, to: u64) {
        let hit = |r: &Running| r.segment == segment && r.from < to && from < r.to;
        if !self.prewrites.running.as_ref().is_some_and(hit) {
            return;
        }
        let tag = self.prewrites.running.as_ref().map_or(0, |r| r.tag);
        // Wait for that chunk only: its completion must not start the next one meanwhile.
        loop {
            if self.queue.submit(1).is_err() {
                break;
            }
            let mut got = Vec::new();
            self.queue.reap(&mut got);
            let mut done = false;
            for d in got {
                if d.tag == tag {
                    done = true;
                } else {
                    self.done.push(d);
                }
            }
            if done {
                break;
            }
        }
        // The chain is about to write there: zero no more of that segment.
        self.prewrites.running = None;
        self.start_queued();
    }
}
