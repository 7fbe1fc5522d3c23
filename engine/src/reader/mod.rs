//! Reads on the caller's own I/O queue.
//!
//! A read sent to a shard crosses two threads and waits for the shard's turn, which submits
//! its reads together with the rest of its I/O. Both cost on this kind of machine: 4k random
//! reads at QD32 with the cache off reached half of fio's IOPS on the same file, with the same
//! number of requests in the device but each taking twice as long there. The virtual disk
//! serves a stream of single submissions faster than the same reads in bursts: a bare ring
//! loop over one file made 172-180k reads/s submitting what each wait reaped together, and
//! 216-225k (fio's figure) submitting each read as it was made (`docs/benchmarks.md`).
//!
//! A [`Reader`] does what fio does: the thread that asks looks the blocks up itself (the
//! locks `Volume::submit` already takes for cached reads), pushes the device reads on a ring
//! of its own, submits each at once, and reaps them in its own loop.
//!
//! What it leaves to the shards (the read goes there as before): blocks with a write
//! acknowledged early and not yet applied (the shard orders the read after it), long reads
//! (device-bound already, and split across shards), map entries without a block (the shard
//! reports the corruption), and blocks whose map or block-table leaf is evicted from the
//! metadata cache (the shard reads the page through its queue while the read waits; this
//! thread never waits for one). A location looked up here stays valid until the read
//! completes: segments are freed only after a fence (`Context::reads`) that waits for it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::api::{Completion, Request, BLOCK_BYTES};
use crate::context::{Context, Ticket};
use crate::counters::Op;
use crate::error::{Error, Result};
use crate::format::IO_ALIGN;
use crate::io::{AlignedBuf, IoDone, IoOp, IoQueue, OpKind};
use crate::job::{Job, Timing};
use crate::map::shard_of;
use crate::reduce;
use crate::shard::{decode_piece, MAX_READ_SPAN};
use crate::space::BlockEntry;
use crate::volume::Volume;

/// Longest read served on the caller's queue; longer ones go to the shards, which split them
/// and keep the device busy on their own (1 MiB reads at QD8 match fio there).
pub const MAX_DIRECT_READ: u32 = 128 << 10;

const BLOCK: usize = BLOCK_BYTES as usize;

/// One block a read wants from a stored payload.
struct Want {
    id: u64,
    /// Whose cache keeps it (the shard owning its LBA).
    cache: usize,
    /// Position of the block in its payload's group.
    index: usize,
    /// Bytes of the block wanted, and where they go in the reply.
    from: usize,
    len: usize,
    dst: usize,
}

/// One stored payload within a device read.
struct Piece {
    offset: u32,
    stored_len: u32,
    crc: u32,
    flags: u16,
    wants: Vec<Want>,
}

/// One device read: adjacent payloads of one segment.
struct Span {
    job: Arc<Job>,
    ticket: Ticket,
    segment: u32,
    base: u32,
    pieces: Vec<Piece>,
    sent: Instant,
    /// The ids' reuse epoch when they were looked up (see `cache`).
    seen: u64,
}

/// Reads of one volume through a queue the calling thread owns (see the module doc). Not
/// shared between threads: each front-end thread that reads makes its own.
///
/// Completions run on the thread that calls [`Reader::poll`] or [`Reader::wait`], except for
/// reads handed to the shards (they complete on a shard's thread, as with
/// [`Volume::submit`]). Keep reaping while reads are in flight: a checkpoint and the
/// cleaner wait for them before they free segments, so a thread holding unreaped reads must
/// not call what may wait for either (block status, pool and volume administration): reap
/// them all first (an NBD connection does before block status).
pub struct Reader {
    vol: Volume,
    queue: Box<dyn IoQueue>,
    /// Device reads in flight, by tag (a slot index), and the free slots.
    spans: Vec<Option<Span>>,
    free: Vec<usize>,
    in_flight: usize,
    done: Vec<IoDone>,
    /// Reads sent to the shards instead.
    handed_off: u64,
    /// Replies may be [`crate::Reply::Pieces`] (see [`Volume::submit_pieces`]).
    pieces: bool,
    /// The queue failed a submission: reads go to the shards from then on.
    broken: bool,
    /// Scratch of `direct`: (lba, block id, entry) looked up; cached pieces; device reads
    /// (segment, aligned start, aligned end, payloads).
    found: Vec<(u64, u64, Option<BlockEntry>)>,
    cached: Vec<(usize, Bytes)>,
    groups: Vec<(u32, u32, u32, Vec<Piece>)>,
}

impl Reader {
    /// A reader for `vol` with room for `depth` device reads in flight.
    pub fn new(vol: &Volume, depth: u32) -> Result<Reader> {
        let queue = vol.ctx.devices.queue(depth).map_err(|e| Error::Io {
            device: 0,
            offset: 0,
            source: e,
        })?;
        Ok(Reader {
            vol: vol.clone(),
            queue,
            spans: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            done: Vec::new(),
            handed_off: 0,
            pieces: false,
            broken: false,
            found: Vec::new(),
            cached: Vec::new(),
            groups: Vec::new(),
        })
    }

    /// Let reads of several pieces (blocks from the cache, holes, device reads) complete as
    /// [`crate::Reply::Pieces`], as [`Volume::submit_pieces`] does, for a caller that sends
    /// them with vectored writes.
    pub fn with_pieces(mut self) -> Reader {
        self.pieces = true;
        self
    }

    /// Start a read of `len` bytes at `offset`; `done` runs once with its data
    /// ([`crate::Reply::Data`]) or its error.
    pub fn read(&mut self, offset: u64, len: u32, done: Completion) {
        let req = Request::Read { offset, len };
        // QoS may make `admit` sleep: not while this reader holds reads whose tickets the
        // cleaner and checkpoints wait for. A throttled volume's reads go to the shards.
        let throttled = self.vol.state.qos.active();
        if throttled {
            while self.in_flight > 0 {
                self.wait();
            }
        }
        let Some(done) = self.vol.admit(&req, done) else {
            return;
        };
        if self.broken || throttled {
            self.handed_off += 1;
            self.vol.dispatch(req, self.pieces, done);
            return;
        }
        if let Err(done) = self.direct(offset, len, done) {
            self.handed_off += 1;
            self.vol.dispatch(req, self.pieces, done);
        }
    }

    /// Device reads queued or in flight on this reader's queue.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A descriptor that polls readable when a device read of this reader has completed (see
    /// [`Reader::poll`]), for a thread that waits on a socket too. `None`: this engine's
    /// queue completes reads before `read` returns, or must be waited for with
    /// [`Reader::wait`].
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.queue.fd()
    }

    /// Reads handed to the shards so far.
    pub fn handed_off(&self) -> u64 {
        self.handed_off
    }

    /// Submit what was queued and run the completions that are ready, without blocking.
    /// Returns how many device reads finished.
    pub fn poll(&mut self) -> usize {
        let r = self.queue.submit(0);
        self.finish(r)
    }

    /// Like [`Reader::poll`], but waits for at least one device read to finish when any is
    /// in flight.
    pub fn wait(&mut self) -> usize {
        let min = usize::from(self.in_flight > 0);
        let r = self.queue.submit(min);
        self.finish(r)
    }

    fn finish(&mut self, submitted: std::io::Result<()>) -> usize {
        if let Err(e) = submitted {
            // The ring refused the submission: fail what it holds rather than wait forever,
            // and send later reads to the shards. The failed reads' slots are never reused,
            // so a late completion of one finds nothing; their results are not used, so their
            // locations need no hold.
            self.broken = true;
            self.in_flight = 0;
            for span in self.spans.iter_mut().filter_map(Option::take) {
                self.vol.ctx.reads.leave(span.ticket);
                span.job.part_done(
                    Err(Error::Io {
                        device: 0,
                        offset: 0,
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    }),
                    Some(&self.vol.ctx.stages),
                );
            }
            return 0;
        }
        let mut done = std::mem::take(&mut self.done);
        self.queue.reap(&mut done);
        let n = done.len();
        for d in done.drain(..) {
            let slot = d.tag as usize;
            if let Some(span) = self.spans.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                self.in_flight -= 1;
                self.complete(span, d);
            }
        }
        self.done = done;
        n
    }

    fn complete(&self, span: Span, d: IoDone) {
        let ctx = &self.vol.ctx;
        ctx.reads.leave(span.ticket);
        ctx.stages.device(Op::Read, span.sent);
        let result = match d.result {
            Err(e) => Err(Error::Io {
                device: d.dev,
                offset: d.offset,
                source: e,
            }),
            Ok(()) => {
                let all = Bytes::from_owner(d.buf);
                let mut result = Ok(());
                for p in &span.pieces {
                    let at = (p.offset - span.base) as usize;
                    match decode_piece(
                        &all,
                        at,
                        span.segment,
                        p.offset,
                        p.stored_len,
                        p.crc,
                        p.flags,
                    ) {
                        Ok(plain) => {
                            for w in &p.wants {
                                let block = plain.slice(w.index * BLOCK..(w.index + 1) * BLOCK);
                                span.job.fill(w.dst, block.slice(w.from..w.from + w.len));
                                if ctx.caching {
                                    ctx.caches[w.cache].lock().insert(w.id, span.seen, block);
                                }
                            }
                        }
                        Err(f) => {
                            if let Some(w) = p.wants.first() {
                                result = Err(f.error(w.id));
                            }
                        }
                    }
                }
                result
            }
        };
        span.job.part_done(result, Some(&ctx.stages));
    }

    /// Look the blocks up and queue their device reads; `Err` gives the completion back when
    /// the read must go to the shards.
    fn direct(&mut self, offset: u64, len: u32, done: Completion) -> Result<(), Completion> {
        let ctx: &Arc<Context> = &self.vol.ctx;
        let state = &self.vol.state;
        if len > MAX_DIRECT_READ {
            return Err(done);
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + u64::from(len) - 1) / BLOCK_BYTES;
        // An early write not applied yet: its shard orders the read after it.
        if (first..=last).any(|lba| ctx.write_back.pending(state.id, lba)) {
            return Err(done);
        }
        let shards = ctx.shards();
        let ticket = ctx.reads.enter();
        // Scratch kept by the reader: a 4k read allocates only its job, buffer and span.
        let mut found = std::mem::take(&mut self.found);
        found.clear();
        // A read that needs an evicted map or block-table leaf goes to its shard, which reads
        // the page through its queue while the read waits there (`shard/fetch.rs`): this
        // thread, and the connection's other reads, never wait for a metadata page.
        let seen;
        {
            // Space, then maps, as the shards apply records.
            let mut space = ctx.space.lock();
            // Under the space lock: no release of ids can fall between it and the look-ups.
            seen = ctx.reuse.now();
            for lba in first..=last {
                let id = state.maps[shard_of(lba, shards)]
                    .lock()
                    .get_if_resident(lba);
                // An evicted leaf (or a map entry without a block, which the shard reports)
                // sends the read to the shards.
                let entry = match id {
                    Some(0) => None,
                    Some(id) => space.get_if_resident(id).unwrap_or(None),
                    None => None,
                };
                if id != Some(0) && entry.is_none() {
                    drop(space);
                    ctx.reads.leave(ticket);
                    self.found = found;
                    return Err(done);
                }
                found.push((lba, id.unwrap_or(0), entry));
            }
        }
        let now = Instant::now();
        let timing = Some(Timing {
            since: now,
            op: Op::Read,
        });
        let mut cached = std::mem::take(&mut self.cached);
        let mut groups = std::mem::take(&mut self.groups);
        for &(lba, id, entry) in &found {
            let Some(e) = entry else {
                continue; // a hole: the reply is zeroes there
            };
            let bstart = lba * BLOCK_BYTES;
            let from = offset.max(bstart) - bstart;
            let to = (offset + u64::from(len)).min(bstart + BLOCK_BYTES) - bstart;
            let dst = (bstart + from - offset) as usize;
            let (from, n) = (from as usize, (to - from) as usize);
            let cache = shard_of(lba, shards);
            if ctx.caching {
                if let Some(b) = ctx.caches[cache].lock().get_at(id, seen) {
                    cached.push((dst, b.slice(from..from + n)));
                    continue;
                }
            }
            let want = Want {
                id,
                cache,
                index: reduce::group_of(e.flags).0,
                from,
                len: n,
                dst,
            };
            add_piece(&mut groups, &e, want);
        }
        self.found = found;
        // One part per device read, and one for the lookups (released below).
        let parts = groups.len() + 1;
        let job = if self.pieces {
            Job::new_read_pieces(parts, len as usize, done, timing)
        } else {
            Job::new(parts, Some(len as usize), None, done, timing)
        };
        ctx.stages.picked(Op::Read, now);
        for (at, b) in cached.drain(..) {
            job.fill(at, b);
        }
        self.cached = cached;
        ctx.reads.add(ticket, groups.len() as u64);
        let device_reads = !groups.is_empty();
        for (segment, base, end, pieces) in groups.drain(..) {
            let (dev, dev_base) = ctx.geo.locate(segment);
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.spans.push(None);
                    self.spans.len() - 1
                }
            };
            let tag = slot as u64;
            let n = (end - base) as usize;
            self.queue.push(IoOp {
                kind: OpKind::Read,
                dev,
                offset: dev_base + u64::from(base),
                len: n,
                // SAFETY: a read fills the whole buffer before anything looks at it.
                buf: unsafe { AlignedBuf::new_uninit(n) },
                tag,
            });
            let span = Span {
                job: job.clone(),
                ticket,
                segment,
                base,
                pieces,
                sent: now,
                seen,
            };
            self.spans[slot] = Some(span);
            self.in_flight += 1;
        }
        self.groups = groups;
        // The lookups' own hold and part.
        ctx.reads.leave(ticket);
        job.part_done(Ok(()), Some(&ctx.stages));
        // To the device now, not with the next batch (see the module doc); no system call for
        // a read of cached blocks and holes.
        if device_reads {
            if let Err(e) = self.queue.submit(0) {
                self.finish(Err(e));
            }
        }
        Ok(())
    }
}

/// Add a wanted block to the device reads: to the payload before it when it is the same one,
/// to the current read when its payload starts within or right after it, else to a new read.
fn add_piece(groups: &mut Vec<(u32, u32, u32, Vec<Piece>)>, e: &BlockEntry, want: Want) {
    let align = IO_ALIGN as u32;
    let pstart = e.offset & !(align - 1);
    let pend = (e.offset + u32::from(e.stored_len)).next_multiple_of(align);
    if let Some((segment, base, end, pieces)) = groups.last_mut() {
        if let Some(p) = pieces.last_mut() {
            if *segment == e.segment && p.offset == e.offset {
                p.wants.push(want);
                return;
            }
        }
        if *segment == e.segment
            && pstart >= *base
            && pstart <= *end
            && pend.max(*end) - *base <= MAX_READ_SPAN
        {
            *end = (*end).max(pend);
            pieces.push(piece(e, want));
            return;
        }
    }
    groups.push((e.segment, pstart, pend, vec![piece(e, want)]));
}

fn piece(e: &BlockEntry, want: Want) -> Piece {
    Piece {
        offset: e.offset,
        stored_len: u32::from(e.stored_len),
        crc: e.crc,
        flags: e.flags,
        wants: vec![want],
    }
}

impl Drop for Reader {
    /// Finish the reads in flight: their buffers belong to the ring until they complete, and
    /// their tickets hold back whoever frees segments.
    fn drop(&mut self) {
        let mut idle = 0;
        while self.in_flight > 0 && idle < 100 {
            idle = if self.wait() == 0 { idle + 1 } else { 0 };
        }
        // Given up on (never seen): their results will not be used, so their locations need
        // no hold; the queue's own drop waits for the device before it frees the buffers.
        for span in std::mem::take(&mut self.spans).into_iter().flatten() {
            self.vol.ctx.reads.leave(span.ticket);
        }
    }
}
