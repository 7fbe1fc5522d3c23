//! Commits on a thin pool: a small record followed by a flush cost twice a written file's
//! (fio, 4 KiB `O_DIRECT` write + `fdatasync`: 8.7k pairs/s on a written file, 4.5k on a
//! fallocated one, 5.7k on a sparse one). On ext4 a write into an unwritten extent converts it
//! when it completes, and the next `fdatasync` must then commit the journal: a device flush
//! becomes a journal write and two flushes. A shard that answers many flushes writes zeroes
//! over its chain's next segment ahead of use, so that its commits land on written blocks.
//!
//! Only for flush-heavy chains ([`PREWRITE_AFTER_FLUSHES`] flushes in one segment): a bulk
//! writer's records are large and flushed rarely, and zeroing ahead would double its bytes.
//! The zero writes go through the shard's ring, in chunks, one at a time; the chain never
//! rolls into the segment while one is in flight (the zeroes could land over its records).

use crate::format::NO_SEGMENT;
use crate::io::{AlignedBuf, IoDone, IoOp, OpKind};

use super::Shard;

/// Flushes answered within one segment that make its chain flush-heavy.
pub(crate) const PREWRITE_AFTER_FLUSHES: u32 = 16;

/// Bytes per zero write.
const CHUNK: u64 = 4 << 20;

#[derive(Default)]
pub(crate) struct Prewrites {
    /// The open segment the flushes were counted in, and how many.
    segment: u32,
    flushes: u32,
    /// The last segment zeroed (or being zeroed).
    done_for: Option<u32>,
    running: Option<Running>,
}

struct Running {
    segment: u32,
    /// Bytes of the segment written (or in flight).
    at: u64,
    tag: u64,
}

impl Shard {
    /// `n` flushes were answered: a flush-heavy chain zeroes its next segment.
    pub(crate) fn note_flushes(&mut self, n: usize) {
        if !self.ctx.discard_freed || self.ctx.read_only {
            // Prefilled pools are written already.
            return;
        }
        let p = &mut self.prewrites;
        if p.segment != self.chain.pos.segment {
            p.segment = self.chain.pos.segment;
            p.flushes = 0;
        }
        p.flushes = p.flushes.saturating_add(n as u32);
        let next = self.chain.pos.next;
        if p.flushes < PREWRITE_AFTER_FLUSHES
            || next == NO_SEGMENT
            || p.running.is_some()
            || p.done_for == Some(next)
        {
            return;
        }
        p.done_for = Some(next);
        let tag = self.tag();
        self.prewrites.running = Some(Running {
            segment: next,
            at: 0,
            tag,
        });
        self.push_zeroes(next, 0, tag, None);
    }

    fn push_zeroes(&mut self, segment: u32, at: u64, tag: u64, buf: Option<AlignedBuf>) {
        let seg_bytes = self.ctx.geo.segment_bytes;
        let len = CHUNK.min(seg_bytes - at) as usize;
        let buf = match buf {
            Some(b) if b.len() >= len => b,
            _ => AlignedBuf::new(len),
        };
        let (dev, base) = self.ctx.geo.locate(segment);
        self.queue.push(IoOp {
            kind: OpKind::Write,
            dev,
            offset: base + at,
            len,
            buf,
            tag,
        });
        if let Some(r) = self.prewrites.running.as_mut() {
            r.at = at + len as u64;
        }
    }

    /// A completion of the running zero write (`false`: not one). The next chunk follows;
    /// a failure only ends the zeroing (the segment is used as it is).
    pub(crate) fn prewrite_done(&mut self, d: IoDone) -> Result<(), IoDone> {
        let Some(r) = self.prewrites.running.as_ref() else {
            return Err(d);
        };
        if r.tag != d.tag {
            return Err(d);
        }
        let (segment, at) = (r.segment, r.at);
        if d.result.is_err() || at >= self.ctx.geo.segment_bytes {
            self.prewrites.running = None;
            return Ok(());
        }
        let tag = self.tag();
        if let Some(r) = self.prewrites.running.as_mut() {
            r.tag = tag;
        }
        self.push_zeroes(segment, at, tag, Some(d.buf));
        Ok(())
    }

    /// Before the chain may roll into `segment`: finish zeroing it (completions of other ops
    /// met meanwhile are kept for the next `reap`).
    pub(crate) fn finish_prewrite(&mut self, segment: u32) {
        while self
            .prewrites
            .running
            .as_ref()
            .is_some_and(|r| r.segment == segment)
        {
            if self.queue.submit(1).is_err() {
                break;
            }
            let mut got = Vec::new();
            self.queue.reap(&mut got);
            for d in got {
                if let Err(d) = self.prewrite_done(d) {
                    self.done.push(d);
                }
            }
        }
        // Whatever became of it, stop zeroing a segment the chain is about to use.
        if self
            .prewrites
            .running
            .as_ref()
            .is_some_and(|r| r.segment == segment)
        {
            self.prewrites.running = None;
        }
    }
}
