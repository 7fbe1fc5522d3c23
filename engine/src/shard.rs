//! Shard workers: one thread per core, each with its own I/O queue, open segment and the map
//! pages it owns. A worker gathers requests from its channel, packs writes into records
//! (group commit: everything that arrived while the previous records were in flight), submits
//! them in one batch, and applies completed records to the maps strictly in order before
//! acknowledging them.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::api::BLOCK_BYTES;
use crate::cache::{BlockCache, IdMap};
use crate::error::Error;
use crate::format::{
    DataEntry, RecordHeader, RecordKind, SegmentHeader, SegmentKind, TrimEntry, IO_ALIGN,
    MAP_PAGE_ENTRIES, MAX_RECORD_ENTRIES, NO_SEGMENT, SEGMENT_HEADER_BYTES,
};
use crate::io::{AlignedBuf, IoDone, IoOp, IoQueue, OpKind};
use crate::job::Job;
use crate::lbamap::{shard_of, LbaMap};
use crate::pool::Inner;
use crate::space::{BlockEntry, SegState};
use crate::volume::VolumeState;

const BLOCK: usize = BLOCK_BYTES as usize;
/// Most messages taken from the channel per loop turn.
const MAX_BATCH_MSGS: usize = 1024;
/// Most payload bytes gathered per loop turn.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// How often a shard with stalled writes looks for free space again.
const STALL_POLL: std::time::Duration = std::time::Duration::from_millis(2);
/// Longest a write waits for the cleaner before it fails with ENOSPC.
const MAX_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Records in flight per shard before the worker waits for completions.
const MAX_INFLIGHT_RECORDS: usize = 64;
/// Log space of the last segment kept for trim records, so a full pool can still be trimmed.
const TRIM_RESERVE_BYTES: u64 = 64 << 10;

pub(crate) enum ShardMsg {
    Read {
        vol: Arc<VolumeState>,
        offset: u64,
        len: usize,
        /// Where this part's data goes in the job's buffer.
        at: usize,
        job: Arc<Job>,
    },
    Write {
        vol: Arc<VolumeState>,
        offset: u64,
        data: Bytes,
        job: Arc<Job>,
    },
    Zero {
        vol: Arc<VolumeState>,
        offset: u64,
        len: u64,
        job: Arc<Job>,
    },
    /// Copy blocks out of segments being cleaned (see [`Relocation`]).
    Relocate {
        moves: Vec<Relocation>,
        job: Arc<Job>,
    },
    /// Drain in-flight I/O, move to a fresh segment, report the chain position, wait.
    Pause {
        paused: Sender<Result<ShardPosition, Error>>,
        resume: Receiver<()>,
    },
    Stop,
}

/// A live block the cleaner read out of a segment it is emptying: written again by a shard as
/// a Move record, then applied only if the block is still live at its old location.
pub(crate) struct Relocation {
    pub id: u64,
    pub from_segment: u32,
    pub from_offset: u32,
    /// The stored payload, exactly as it was (its CRC is kept, so corruption is not laundered).
    pub data: Box<[u8]>,
    pub crc: u32,
    pub flags: u16,
}

/// What a record is for, which decides how much of the reserve it may use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Room {
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
}

/// Progress of one message across the records that carry it.
struct Part {
    job: Arc<Job>,
    records: Cell<usize>,
    error: RefCell<Option<Error>>,
}

impl Part {
    fn new(job: Arc<Job>) -> Rc<Part> {
        Rc::new(Part {
            job,
            records: Cell::new(0),
            error: RefCell::new(None),
        })
    }
    fn fail(&self, e: Error) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
    }
    /// One record carrying this part completed; when all did (and the message was fully
    /// packed), finish the part.
    fn record_done(&self) {
        let n = self.records.get() - 1;
        self.records.set(n);
        if n == 0 {
            let err = self.error.borrow_mut().take();
            self.job.part_done(err.map_or(Ok(()), Err));
        }
    }
}

enum Apply {
    Block {
        vol: Arc<VolumeState>,
        lba: u64,
        id: u64,
        entry: BlockEntry,
        /// Offset of the payload in the record buffer, for the cache.
        buf_at: u32,
    },
    Hole {
        vol: Arc<VolumeState>,
        lba: u64,
    },
    Trim {
        vol: Arc<VolumeState>,
        lba: u64,
        count: u64,
    },
    Move {
        id: u64,
        from_segment: u32,
        from_offset: u32,
        entry: BlockEntry,
    },
}

struct Inflight {
    tag: u64,
    result: Option<std::io::Result<()>>,
    buf: Option<AlignedBuf>,
    seq: u64,
    shard_seq: Option<u64>,
    /// A segment header: its device and byte offset (to write it again if it fails).
    header_at: Option<(u16, u64)>,
    applies: Vec<Apply>,
    parts: Vec<Rc<Part>>,
}

/// One block of a read waiting for the device.
struct BlockRead {
    id: u64,
    generation: u32,
    crc: u32,
    segment: u32,
    seg_offset: u32,
    /// Offset of the block in the run buffer.
    run_at: usize,
    /// Bytes of the block wanted, and where they go in the job buffer.
    from: usize,
    len: usize,
    dst: usize,
}

struct PendingRead {
    part: Rc<Part>,
    blocks: Vec<BlockRead>,
}

/// A block about to be packed into a data record.
enum Item {
    Data {
        vol: Arc<VolumeState>,
        lba: u64,
        src: BlockSrc,
        part: Rc<Part>,
    },
    Hole {
        vol: Arc<VolumeState>,
        lba: u64,
        part: Rc<Part>,
    },
    Trim {
        vol: Arc<VolumeState>,
        lba: u64,
        count: u64,
        part: Rc<Part>,
    },
    Move {
        rel: Relocation,
        part: Rc<Part>,
    },
}

impl Item {
    fn kind(&self) -> RecordKind {
        match self {
            Item::Data { .. } | Item::Hole { .. } => RecordKind::Data,
            Item::Trim { .. } => RecordKind::Trim,
            Item::Move { .. } => RecordKind::Move,
        }
    }

    /// The payload this item stores, if any.
    fn payload(&self) -> Option<&[u8]> {
        match self {
            Item::Data { src, .. } => Some(src.bytes()),
            Item::Move { rel, .. } => Some(&rel.data),
            _ => None,
        }
    }
}

enum BlockSrc {
    Slice(Bytes),
    Owned(Box<[u8]>),
}

impl BlockSrc {
    fn bytes(&self) -> &[u8] {
        match self {
            BlockSrc::Slice(b) => b,
            BlockSrc::Owned(b) => b,
        }
    }
}

pub(crate) struct Shard {
    id: usize,
    inner: Arc<Inner>,
    rx: Receiver<ShardMsg>,
    queue: Box<dyn IoQueue>,
    pos: ShardPosition,
    inflight: VecDeque<Inflight>,
    reads: IdMap<PendingRead>,
    cache: BlockCache,
    next_tag: u64,
    items: Vec<Item>,
    /// Items waiting for the cleaner to free space, in order; each holds a count on its part.
    stalled: VecDeque<Item>,
    /// When the oldest stalled item stalled.
    stalled_since: Option<std::time::Instant>,
    /// Writes and zeroes that arrived while items were stalled, processed in order after them
    /// (so that read-modify-write never merges with a map that misses a stalled write).
    deferred: VecDeque<ShardMsg>,
    /// Parts of messages processed this turn: each holds one count until its items are packed,
    /// so no part completes before all of its records exist.
    held: Vec<Rc<Part>>,
    done: Vec<IoDone>,
}

impl Shard {
    pub fn new(
        id: usize,
        inner: Arc<Inner>,
        rx: Receiver<ShardMsg>,
        queue: Box<dyn IoQueue>,
        pos: ShardPosition,
        cache_bytes: u64,
    ) -> Self {
        Shard {
            id,
            inner,
            rx,
            queue,
            pos,
            inflight: VecDeque::new(),
            reads: IdMap::default(),
            cache: BlockCache::new(cache_bytes),
            next_tag: 1,
            items: Vec::new(),
            stalled: VecDeque::new(),
            stalled_since: None,
            deferred: VecDeque::new(),
            held: Vec::new(),
            done: Vec::new(),
        }
    }

    pub fn run(mut self) {
        loop {
            let busy = !self.inflight.is_empty() || !self.reads.is_empty();
            let first = if busy {
                match self.rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(ShardMsg::Stop),
                }
            } else if !self.stalled.is_empty() {
                // Waiting for space: look again soon even if nothing arrives.
                match self.rx.recv_timeout(STALL_POLL) {
                    Ok(m) => Some(m),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Some(ShardMsg::Stop),
                }
            } else {
                Some(self.rx.recv().unwrap_or(ShardMsg::Stop))
            };
            let mut stop = false;
            let mut pause = None;
            let got_msgs = first.is_some();
            if let Some(first) = first {
                let mut bytes = 0usize;
                let mut n = 0usize;
                let mut msg = Some(first);
                while let Some(m) = msg.take() {
                    n += 1;
                    match m {
                        ShardMsg::Stop => {
                            stop = true;
                            break;
                        }
                        ShardMsg::Pause { paused, resume } => {
                            pause = Some((paused, resume));
                            break;
                        }
                        ShardMsg::Write { .. } | ShardMsg::Zero { .. }
                            if !self.stalled.is_empty() || !self.deferred.is_empty() =>
                        {
                            self.deferred.push_back(m);
                        }
                        m => bytes += self.process(m),
                    }
                    if n >= MAX_BATCH_MSGS
                        || bytes >= MAX_BATCH_BYTES
                        || self.inflight.len() >= MAX_INFLIGHT_RECORDS
                    {
                        break;
                    }
                    msg = self.rx.try_recv().ok();
                }
            }
            if got_msgs || !self.stalled.is_empty() {
                self.pack_records();
                self.release_held();
                // Space came back: go on with what arrived meanwhile, in order.
                while self.stalled.is_empty() {
                    let Some(m) = self.deferred.pop_front() else {
                        break;
                    };
                    self.process(m);
                    self.pack_records();
                    self.release_held();
                }
            }
            // Submit what was queued; when the channel had nothing, wait for one completion.
            let want = usize::from(!got_msgs && self.queue.in_flight() > 0);
            if let Err(e) = self.queue.submit(want) {
                self.fail_all_inflight(e);
            }
            self.reap();
            if stop || pause.is_some() {
                self.drain();
            }
            if let Some((paused, resume)) = pause {
                let r = self.at_checkpoint();
                let _ = paused.send(r.map(|()| self.pos));
                let _ = resume.recv();
            }
            let st = &self.inner.shard_stats[self.id];
            st.cache_hits.store(self.cache.hits, Ordering::Relaxed);
            st.cache_misses.store(self.cache.misses, Ordering::Relaxed);
            st.cache_bytes
                .store(self.cache.len_bytes(), Ordering::Relaxed);
            if stop {
                self.fail_waiting();
                return;
            }
        }
    }

    /// Handle a read, write, zero or relocation; returns the payload bytes it carried.
    fn process(&mut self, m: ShardMsg) -> usize {
        match m {
            ShardMsg::Read {
                vol,
                offset,
                len,
                at,
                job,
            } => {
                self.read(vol, offset, len, at, job);
                0
            }
            ShardMsg::Write {
                vol,
                offset,
                data,
                job,
            } => {
                let n = data.len();
                self.write(vol, offset, data, job);
                n
            }
            ShardMsg::Zero {
                vol,
                offset,
                len,
                job,
            } => {
                self.zero(vol, offset, len, job);
                0
            }
            ShardMsg::Relocate { moves, job } => {
                let part = Part::new(job);
                part.records.set(1);
                let mut n = 0;
                for rel in moves {
                    n += rel.data.len();
                    self.items.push(Item::Move {
                        rel,
                        part: part.clone(),
                    });
                }
                self.held.push(part);
                n
            }
            ShardMsg::Pause { paused, .. } => {
                let _ = paused.send(Err(Error::ShutDown));
                0
            }
            ShardMsg::Stop => 0,
        }
    }

    fn release_held(&mut self) {
        for p in std::mem::take(&mut self.held) {
            p.record_done();
        }
    }

    /// At stop: fail what is stalled or deferred.
    fn fail_waiting(&mut self) {
        for item in std::mem::take(&mut self.stalled) {
            let p = item_part(&item);
            p.fail(Error::ShutDown);
            p.record_done();
        }
        for m in std::mem::take(&mut self.deferred) {
            if let ShardMsg::Write { job, .. } | ShardMsg::Zero { job, .. } = m {
                job.part_done(Err(Error::ShutDown));
            }
        }
    }

    /// Wait for every in-flight op and process it.
    fn drain(&mut self) {
        while self.queue.in_flight() > 0 || !self.inflight.is_empty() {
            if let Err(e) = self.queue.submit(1) {
                self.fail_all_inflight(e);
            }
            self.reap();
            if self.queue.in_flight() == 0 && !self.inflight.is_empty() {
                // Records whose ops vanished cannot complete; fail them rather than hang.
                self.fail_all_inflight(std::io::Error::other("lost I/O completion"));
            }
        }
    }

    fn fail_all_inflight(&mut self, e: std::io::Error) {
        for r in self.inflight.iter_mut() {
            if r.result.is_none() {
                r.result = Some(Err(std::io::Error::new(e.kind(), e.to_string())));
            }
        }
        self.apply_completed();
    }

    fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        self.queue.reap(&mut done);
        for d in done.drain(..) {
            if let Some(pr) = self.reads.remove(&d.tag) {
                self.finish_read(pr, d);
            } else if let Some(r) = self.inflight.iter_mut().find(|r| r.tag == d.tag) {
                r.result = Some(d.result);
                r.buf = Some(d.buf);
            }
        }
        self.done = done;
        self.apply_completed();
    }

    // ---------------------------------------------------------------- reads

    fn read(&mut self, vol: Arc<VolumeState>, offset: u64, len: usize, at: usize, job: Arc<Job>) {
        let part = Part::new(job);
        part.records.set(1); // released at the end of this function
        let first = offset / BLOCK_BYTES;
        let last = (offset + len as u64 - 1) / BLOCK_BYTES;
        let ids: Vec<u64> = {
            let map = vol.maps[self.id].lock();
            (first..=last).map(|lba| map.get(lba)).collect()
        };
        let entries: Vec<Option<BlockEntry>> = {
            let space = self.inner.space.lock();
            ids.iter()
                .map(|&id| if id == 0 { None } else { space.get(id) })
                .collect()
        };
        let mut runs: Vec<Vec<BlockRead>> = Vec::new();
        for (i, lba) in (first..=last).enumerate() {
            let bstart = lba * BLOCK_BYTES;
            let from = offset.max(bstart) - bstart;
            let to = (offset + len as u64).min(bstart + BLOCK_BYTES) - bstart;
            let dst = at + (bstart + from - offset) as usize;
            let (from, n) = (from as usize, (to - from) as usize);
            let Some(e) = entries[i] else {
                if ids[i] != 0 {
                    part.fail(Error::Corrupt {
                        what: "map points at a free block",
                    });
                }
                continue; // hole: the job buffer is already zero
            };
            let id = ids[i];
            if let Some(data) = self.cache.get(id, e.generation) {
                part.job.fill(dst, &data[from..from + n]);
                continue;
            }
            let br = BlockRead {
                id,
                generation: e.generation,
                crc: e.crc,
                segment: e.segment,
                seg_offset: e.offset,
                run_at: 0,
                from,
                len: n,
                dst,
            };
            // Extend the current run when the block follows the previous one on disk.
            match runs.last_mut() {
                Some(run)
                    if run.last().is_some_and(|p| {
                        p.segment == e.segment
                            && u64::from(p.seg_offset) + BLOCK_BYTES == u64::from(e.offset)
                    }) && e.stored_len as usize == BLOCK =>
                {
                    let run_at = run.len() * BLOCK;
                    run.push(BlockRead { run_at, ..br });
                }
                _ => runs.push(vec![br]),
            }
        }
        for run in runs {
            let (dev, base) = self.inner.geo.locate(run[0].segment);
            let tag = self.tag();
            let len = run.len() * BLOCK;
            self.queue.push(IoOp {
                kind: OpKind::Read,
                dev,
                offset: base + u64::from(run[0].seg_offset),
                len,
                buf: AlignedBuf::new(len),
                tag,
            });
            part.records.set(part.records.get() + 1);
            self.reads.insert(
                tag,
                PendingRead {
                    part: part.clone(),
                    blocks: run,
                },
            );
        }
        part.record_done();
    }

    fn finish_read(&mut self, pr: PendingRead, d: IoDone) {
        match d.result {
            Err(e) => {
                let first = &pr.blocks[0];
                pr.part.fail(Error::Io {
                    device: d.dev,
                    offset: d.offset,
                    source: e,
                });
                let _ = first;
            }
            Ok(()) => {
                let buf = Arc::new(d.buf);
                for b in &pr.blocks {
                    let block = &buf[b.run_at..b.run_at + BLOCK];
                    let got = crc32fast::hash(block);
                    if got != b.crc {
                        pr.part.fail(Error::ChecksumMismatch {
                            block_id: b.id,
                            segment: b.segment,
                            offset: b.seg_offset,
                            expected: b.crc,
                            got,
                        });
                        continue;
                    }
                    pr.part.job.fill(b.dst, &block[b.from..b.from + b.len]);
                    self.cache
                        .insert(b.id, b.generation, buf.clone(), b.run_at as u32);
                }
            }
        }
        pr.part.record_done();
    }

    /// Read one block's current contents synchronously (for read-modify-write).
    fn read_block_now(&mut self, vol: &VolumeState, lba: u64) -> Result<Box<[u8]>, Error> {
        let mut out = vec![0u8; BLOCK].into_boxed_slice();
        let id = vol.maps[self.id].lock().get(lba);
        if id == 0 {
            return Ok(out);
        }
        let e = self.inner.space.lock().get(id).ok_or(Error::Corrupt {
            what: "map points at a free block",
        })?;
        if let Some(data) = self.cache.get(id, e.generation) {
            out.copy_from_slice(data);
            return Ok(out);
        }
        let (dev, base) = self.inner.geo.locate(e.segment);
        let mut buf = AlignedBuf::new(BLOCK);
        let offset = base + u64::from(e.offset);
        self.inner
            .devices
            .read_at(dev, &mut buf, offset)
            .map_err(|source| Error::Io {
                device: dev,
                offset,
                source,
            })?;
        let got = crc32fast::hash(&buf[..BLOCK]);
        if got != e.crc {
            return Err(Error::ChecksumMismatch {
                block_id: id,
                segment: e.segment,
                offset: e.offset,
                expected: e.crc,
                got,
            });
        }
        out.copy_from_slice(&buf[..BLOCK]);
        Ok(out)
    }

    // ---------------------------------------------------------------- writes

    fn write(&mut self, vol: Arc<VolumeState>, offset: u64, data: Bytes, job: Arc<Job>) {
        let part = Part::new(job);
        part.records.set(1);
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let lba = pos / BLOCK_BYTES;
            let bstart = lba * BLOCK_BYTES;
            let bend = bstart + BLOCK_BYTES;
            let at = (pos - offset) as usize;
            if pos == bstart && end >= bend {
                let src = data.slice(at..at + BLOCK);
                self.push_block(&vol, lba, BlockSrc::Slice(src), &part);
                pos = bend;
                continue;
            }
            // Partial block: merge with the current contents, after everything in flight has
            // landed so that no earlier write to this block is missed.
            let upto = end.min(bend);
            match self.settle_and_read(&vol, lba) {
                Ok(mut block) => {
                    let from = (pos - bstart) as usize;
                    let n = (upto - pos) as usize;
                    block[from..from + n].copy_from_slice(&data[at..at + n]);
                    self.push_block(&vol, lba, BlockSrc::Owned(block), &part);
                }
                Err(e) => part.fail(e),
            }
            pos = upto;
        }
        self.held.push(part);
    }

    fn zero(&mut self, vol: Arc<VolumeState>, offset: u64, len: u64, job: Arc<Job>) {
        let part = Part::new(job);
        part.records.set(1);
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_BYTES);
        let end_full = end / BLOCK_BYTES;
        // Partial blocks at either end are rewritten with zeroes in place.
        let mut partial = Vec::new();
        if offset % BLOCK_BYTES != 0 {
            partial.push((offset, end.min((offset / BLOCK_BYTES + 1) * BLOCK_BYTES)));
        }
        // The tail block, unless the head partial above is that same block.
        if end % BLOCK_BYTES != 0 && (offset % BLOCK_BYTES == 0 || end_full != offset / BLOCK_BYTES)
        {
            partial.push((end / BLOCK_BYTES * BLOCK_BYTES, end));
        }
        for (from, to) in partial {
            let lba = from / BLOCK_BYTES;
            if shard_of(lba, self.inner.shards()) != self.id {
                continue;
            }
            match self.settle_and_read(&vol, lba) {
                Ok(mut block) => {
                    let a = (from - lba * BLOCK_BYTES) as usize;
                    let b = (to - lba * BLOCK_BYTES) as usize;
                    block[a..b].fill(0);
                    self.push_block(&vol, lba, BlockSrc::Owned(block), &part);
                }
                Err(e) => part.fail(e),
            }
        }
        if end_full > first_full {
            self.items.push(Item::Trim {
                vol,
                lba: first_full,
                count: end_full - first_full,
                part: part.clone(),
            });
        }
        self.held.push(part);
    }

    fn push_block(&mut self, vol: &Arc<VolumeState>, lba: u64, src: BlockSrc, part: &Rc<Part>) {
        let item = if is_zero(src.bytes()) {
            Item::Hole {
                vol: vol.clone(),
                lba,
                part: part.clone(),
            }
        } else {
            Item::Data {
                vol: vol.clone(),
                lba,
                src,
                part: part.clone(),
            }
        };
        self.items.push(item);
    }

    /// Pack and submit queued items, wait for all records to apply, then read the block.
    fn settle_and_read(&mut self, vol: &VolumeState, lba: u64) -> Result<Box<[u8]>, Error> {
        if !self.items.is_empty() || !self.inflight.is_empty() {
            self.pack_records();
            self.drain();
        }
        if !self.stalled.is_empty() {
            // An earlier write of this batch waits for space: the map does not hold it yet, so
            // merging with it now would lose it. Rare (space ran out within one batch).
            return Err(Error::NoSpace);
        }
        self.read_block_now(vol, lba)
    }

    /// Turn queued items into records and queue their writes. Data that would eat into the
    /// space kept for the cleaner waits (stalls) while cleaning can free space, instead of
    /// failing; cleaner moves never wait.
    fn pack_records(&mut self) {
        let fresh = std::mem::take(&mut self.items);
        let (moves, fresh): (Vec<Item>, Vec<Item>) = fresh
            .into_iter()
            .partition(|i| matches!(i, Item::Move { .. }));
        let mut moves = moves;
        while !moves.is_empty() {
            let fits = self
                .entries_that_fit(RecordKind::Move)
                .clamp(1, MAX_RECORD_ENTRIES);
            let batch: Vec<Item> = moves.drain(..fits.min(moves.len())).collect();
            self.build_record(batch, RecordKind::Move);
        }
        // Previously stalled items (each holding a count on its part) come first.
        let mut queue: VecDeque<(Item, bool)> = std::mem::take(&mut self.stalled)
            .into_iter()
            .map(|i| (i, true))
            .chain(fresh.into_iter().map(|i| (i, false)))
            .collect();
        while let Some((first, _)) = queue.front() {
            let kind = first.kind();
            // Cut the record to what the open segment still holds, so that segment tails are
            // not left empty (with 1 MiB writes and 2 MiB segments that wasted half the pool).
            let fits = self.entries_that_fit(kind).clamp(1, MAX_RECORD_ENTRIES);
            let end = queue
                .iter()
                .take(fits)
                .take_while(|(i, _)| i.kind() == kind)
                .count();
            let payload = queue
                .iter()
                .take(end)
                .filter(|(i, _)| i.payload().is_some())
                .count();
            let bytes = RecordHeader::header_area(end, DataEntry::BYTES) + payload * BLOCK;
            if kind == RecordKind::Data && self.must_wait_for_space(bytes as u64) {
                break;
            }
            let batch: Vec<(Item, bool)> = queue.drain(..end).collect();
            let held: Vec<Rc<Part>> = batch
                .iter()
                .filter(|(_, h)| *h)
                .map(|(i, _)| item_part(i).clone())
                .collect();
            self.build_record(batch.into_iter().map(|(i, _)| i).collect(), kind);
            for p in held {
                p.record_done();
            }
        }
        for (item, held) in queue {
            if !held {
                let p = item_part(&item);
                p.records.set(p.records.get() + 1);
            }
            self.stalled.push_back(item);
        }
        if self.stalled.is_empty() {
            self.stalled_since = None;
        } else {
            self.stalled_since
                .get_or_insert_with(std::time::Instant::now);
        }
    }

    /// Whether a data record of `bytes` should wait for the cleaner rather than fail: it does
    /// not fit in the open segment, free space is at the data reserve, cleaning can give some
    /// back, and it has not waited too long already.
    fn must_wait_for_space(&mut self, bytes: u64) -> bool {
        let seg_bytes = self.inner.geo.segment_bytes;
        let fits_here = self.pos.segment != NO_SEGMENT
            && u64::from(self.pos.offset) + bytes + TRIM_RESERVE_BYTES <= seg_bytes;
        if fits_here {
            return false;
        }
        let free = self.inner.space.lock().free_segments;
        let reserve = self.inner.data_reserve();
        if self.pos.next != NO_SEGMENT && free > reserve {
            return false;
        }
        if self.stalled_since.is_some_and(|t| t.elapsed() > MAX_STALL) {
            return false;
        }
        if free <= reserve && self.inner.gc_stuck.load(Ordering::Acquire) {
            // The cleaner found nothing to free: the pool is full of live data.
            self.inner.kick_checkpoint();
            return false;
        }
        // A checkpoint gives a shard without a next segment one; the cleaner makes free space.
        self.inner.kick_checkpoint();
        free > reserve || self.inner.reclaimable_segments() > 0
    }

    fn build_record(&mut self, batch: Vec<Item>, kind: RecordKind) {
        let entry_bytes = match kind {
            RecordKind::Trim => TrimEntry::BYTES,
            RecordKind::Data | RecordKind::Move => DataEntry::BYTES,
        };
        let room = if kind == RecordKind::Data {
            Room::Data
        } else {
            Room::Freeing
        };
        let n_new_ids = batch
            .iter()
            .filter(|i| matches!(i, Item::Data { .. }))
            .count();
        let n_payload = batch.iter().filter(|i| i.payload().is_some()).count();
        let header_bytes = RecordHeader::header_area(batch.len(), entry_bytes);
        let record_bytes = header_bytes + n_payload * BLOCK;
        let parts: Vec<Rc<Part>> = batch.iter().map(item_part).cloned().collect();
        for p in &parts {
            p.records.set(p.records.get() + 1);
        }
        if let Err(e) = self.make_room(record_bytes as u64, room) {
            for p in &parts {
                p.fail(clone_err(&e));
                p.record_done();
            }
            return;
        }
        let segment = self.pos.segment;
        let seg_off = self.pos.offset;
        let ids: Vec<u64> = {
            let mut space = self.inner.space.lock();
            (0..n_new_ids).map(|_| space.alloc_id()).collect()
        };
        // SAFETY: the header area is zeroed here and every payload slot is written below (one
        // per item with a payload, `n_payload` of them), so all `record_bytes` are initialised
        // before the first slice access.
        let mut buf = unsafe {
            let mut b = AlignedBuf::new_uninit(record_bytes);
            std::ptr::write_bytes(b.as_mut_ptr(), 0, header_bytes);
            let mut at = header_bytes;
            for p in batch.iter().filter_map(Item::payload) {
                assert_eq!(p.len(), BLOCK, "record payloads are whole blocks");
                std::ptr::copy_nonoverlapping(p.as_ptr(), b.as_mut_ptr().add(at), BLOCK);
                at += BLOCK;
            }
            b
        };
        let mut applies = Vec::with_capacity(batch.len());
        let mut next_payload = header_bytes;
        let mut ids = ids.into_iter();
        for (i, item) in batch.into_iter().enumerate() {
            let at = RecordHeader::BYTES + i * entry_bytes;
            match item {
                Item::Data { vol, lba, src, .. } => {
                    let id = ids.next().unwrap_or(0);
                    let payload = src.bytes();
                    let crc = crc32fast::hash(payload);
                    let fingerprint = xxhash_rust::xxh3::xxh3_128(payload).to_le_bytes();
                    DataEntry {
                        volume: vol.id,
                        flags: 0,
                        lba,
                        block_id: id,
                        fingerprint,
                        payload_offset: next_payload as u32,
                        stored_len: BLOCK as u32,
                        payload_crc: crc,
                    }
                    .encode(&mut buf[at..]);
                    applies.push(Apply::Block {
                        vol,
                        lba,
                        id,
                        entry: BlockEntry {
                            segment,
                            offset: seg_off + next_payload as u32,
                            stored_len: BLOCK as u16,
                            flags: 0,
                            crc,
                            refs: 0,
                            generation: 0,
                        },
                        buf_at: next_payload as u32,
                    });
                    next_payload += BLOCK;
                }
                Item::Hole { vol, lba, .. } => {
                    DataEntry {
                        volume: vol.id,
                        flags: 0,
                        lba,
                        block_id: 0,
                        fingerprint: [0; 16],
                        payload_offset: 0,
                        stored_len: 0,
                        payload_crc: 0,
                    }
                    .encode(&mut buf[at..]);
                    applies.push(Apply::Hole { vol, lba });
                }
                Item::Trim {
                    vol, lba, count, ..
                } => {
                    TrimEntry {
                        volume: vol.id,
                        lba,
                        count,
                    }
                    .encode(&mut buf[at..]);
                    applies.push(Apply::Trim { vol, lba, count });
                }
                Item::Move { rel, .. } => {
                    let fingerprint = xxhash_rust::xxh3::xxh3_128(&rel.data).to_le_bytes();
                    DataEntry {
                        volume: u32::MAX,
                        flags: rel.flags,
                        lba: u64::from(rel.from_segment) << 32 | u64::from(rel.from_offset),
                        block_id: rel.id,
                        fingerprint,
                        payload_offset: next_payload as u32,
                        stored_len: rel.data.len() as u32,
                        payload_crc: rel.crc,
                    }
                    .encode(&mut buf[at..]);
                    applies.push(Apply::Move {
                        id: rel.id,
                        from_segment: rel.from_segment,
                        from_offset: rel.from_offset,
                        entry: BlockEntry {
                            segment,
                            offset: seg_off + next_payload as u32,
                            stored_len: rel.data.len() as u16,
                            flags: rel.flags,
                            crc: rel.crc,
                            refs: 0,
                            generation: 0,
                        },
                    });
                    next_payload += BLOCK;
                }
            }
        }
        let seq = self.inner.seq.fetch_add(1, Ordering::AcqRel);
        let shard_seq = self.pos.shard_seq;
        self.pos.shard_seq += 1;
        let durable = self.inner.shard_stats[self.id]
            .durable_shard_seq
            .load(Ordering::Acquire);
        RecordHeader {
            kind,
            seq,
            shard_seq,
            epoch: self.inner.epoch,
            segment,
            entry_count: applies.len() as u32,
            record_bytes: record_bytes as u32,
            header_bytes: header_bytes as u32,
            durable_shard_seq: durable,
            shard: self.id as u16,
        }
        .encode_and_seal(&mut buf[..header_bytes], entry_bytes);
        self.pos.offset += record_bytes as u32;
        let (dev, base) = self.inner.geo.locate(segment);
        let tag = self.tag();
        self.queue.push(IoOp {
            kind: OpKind::Write,
            dev,
            offset: base + u64::from(seg_off),
            len: record_bytes,
            buf,
            tag,
        });
        self.inner
            .counters
            .device_written
            .fetch_add(record_bytes as u64, Ordering::Relaxed);
        self.inflight.push_back(Inflight {
            tag,
            result: None,
            buf: None,
            seq,
            shard_seq: Some(shard_seq),
            header_at: None,
            applies,
            parts,
        });
    }

    /// How many entries of `kind`, each with a payload block, fit in the rest of the open
    /// segment (0 when not even one does: the record then starts the next segment).
    fn entries_that_fit(&self, kind: RecordKind) -> usize {
        let left = self
            .inner
            .geo
            .segment_bytes
            .saturating_sub(u64::from(self.pos.offset)) as usize;
        let eb = match kind {
            RecordKind::Trim => return MAX_RECORD_ENTRIES,
            RecordKind::Data | RecordKind::Move => DataEntry::BYTES,
        };
        let mut n = left.saturating_sub(IO_ALIGN) / BLOCK;
        while n > 0 && RecordHeader::header_area(n, eb) + n * BLOCK > left {
            n -= 1;
        }
        if n == 0 {
            MAX_RECORD_ENTRIES
        } else {
            n
        }
    }

    /// Make sure `bytes` fit in the open segment, moving to the next one if needed. When there
    /// is no next segment, data records leave [`TRIM_RESERVE_BYTES`] free so that trims (which
    /// free space) still fit on a full pool. Data may not move into a new segment once free
    /// space is down to the data reserve: the rest is for checkpoints, trims and the cleaner,
    /// so that cleaning can always make progress.
    fn make_room(&mut self, bytes: u64, room: Room) -> Result<(), Error> {
        let seg_bytes = self.inner.geo.segment_bytes;
        let margin = if room == Room::Freeing || self.pos.next != NO_SEGMENT {
            0
        } else {
            TRIM_RESERVE_BYTES
        };
        if u64::from(self.pos.offset) + bytes + margin <= seg_bytes
            && self.pos.segment != NO_SEGMENT
        {
            return Ok(());
        }
        if self.pos.next == NO_SEGMENT {
            // Ask for a checkpoint: it frees segments and restarts the chain.
            self.inner.kick_checkpoint();
            return Err(Error::NoSpace);
        }
        // Next segments may come out of everything but the checkpoint's own reserve: data is
        // held back at the data reserve above it, so what lies between is the cleaner's.
        let reserve = self.inner.ckpt_reserve();
        let free = self.inner.space.lock().free_segments;
        if room == Room::Data && free <= self.inner.data_reserve() {
            // Wake the cleaner; the write fails now rather than eat the cleaner's headroom.
            self.inner.kick_checkpoint();
            return Err(Error::NoSpace);
        }
        let mut space = self.inner.space.lock();
        let next2 = space
            .alloc_segment(SegState::Next, reserve)
            .unwrap_or(NO_SEGMENT);
        let last_seq = self.inner.seq.load(Ordering::Acquire);
        space.set_state(self.pos.segment, SegState::Sealed { seq: last_seq });
        space.set_state(self.pos.next, SegState::Open);
        drop(space);
        self.pos.segment = self.pos.next;
        self.pos.next = next2;
        self.pos.offset = SEGMENT_HEADER_BYTES as u32;
        if next2 == NO_SEGMENT {
            self.inner.kick_checkpoint();
        } else {
            self.preallocate(next2);
        }
        // The header goes through the ordered queue: no record after it is acknowledged before
        // the header itself is on the device.
        let mut buf = AlignedBuf::new(IO_ALIGN);
        self.segment_header().encode(&mut buf);
        let (dev, base) = self.inner.geo.locate(self.pos.segment);
        let tag = self.tag();
        self.queue.push(IoOp {
            kind: OpKind::Write,
            dev,
            offset: base,
            len: IO_ALIGN,
            buf,
            tag,
        });
        self.inflight.push_back(Inflight {
            tag,
            result: None,
            buf: None,
            seq: 0,
            shard_seq: None,
            header_at: Some((dev, base)),
            applies: Vec::new(),
            parts: Vec::new(),
        });
        if u64::from(self.pos.offset) + bytes > seg_bytes {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// Re-allocate a segment that a checkpoint may have punched out of the file, ahead of use.
    fn preallocate(&self, seg: u32) {
        if seg != NO_SEGMENT {
            let (dev, base) = self.inner.geo.locate(seg);
            // Best effort: without it writes still work, only slower.
            let _ = self
                .inner
                .devices
                .preallocate(dev, base, self.inner.geo.segment_bytes);
        }
    }

    fn segment_header(&self) -> SegmentHeader {
        SegmentHeader {
            kind: SegmentKind::Data,
            segment: self.pos.segment,
            shard: self.id as u16,
            pool_uuid: self.inner.pool_uuid,
            epoch: self.inner.epoch,
            next_segment: self.pos.next,
        }
    }

    /// At a checkpoint the chain goes on where it is (the checkpoint records the position and
    /// the next segment, so replay starts there): sealing a half-full segment at every
    /// checkpoint only made work for the cleaner. A shard left without a next segment gets one
    /// now if space allows, and a shard without any segment starts a new chain.
    fn at_checkpoint(&mut self) -> Result<(), Error> {
        if self.pos.segment == NO_SEGMENT {
            return self.restart_chain();
        }
        if self.pos.next == NO_SEGMENT {
            let reserve = self.inner.ckpt_reserve();
            let next = self
                .inner
                .space
                .lock()
                .alloc_segment(SegState::Next, reserve);
            if let Some(next) = next {
                self.pos.next = next;
                self.preallocate(next);
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
    fn restart_chain(&mut self) -> Result<(), Error> {
        let reserve = self.inner.reserve_segments();
        let mut space = self.inner.space.lock();
        let last_seq = self.inner.seq.load(Ordering::Acquire);
        let seg = if self.pos.next != NO_SEGMENT {
            self.pos.next
        } else {
            match space.alloc_segment(SegState::Open, reserve) {
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
        }
        space.set_state(seg, SegState::Open);
        let next = space
            .alloc_segment(SegState::Next, reserve)
            .unwrap_or(NO_SEGMENT);
        drop(space);
        self.pos.segment = seg;
        self.pos.next = next;
        self.pos.offset = SEGMENT_HEADER_BYTES as u32;
        self.preallocate(seg);
        self.preallocate(next);
        let mut buf = AlignedBuf::new(IO_ALIGN);
        self.segment_header().encode(&mut buf);
        let (dev, base) = self.inner.geo.locate(seg);
        self.inner
            .devices
            .write_at(dev, &buf, base)
            .map_err(|source| Error::Io {
                device: dev,
                offset: base,
                source,
            })
    }

    /// Apply completed records at the head of the queue, in order, and acknowledge them.
    fn apply_completed(&mut self) {
        while self.inflight.front().is_some_and(|r| r.result.is_some()) {
            let Some(rec) = self.inflight.pop_front() else {
                break;
            };
            let mut ok = matches!(rec.result, Some(Ok(())));
            if let (false, Some((dev, at)), Some(buf)) = (ok, rec.header_at, &rec.buf) {
                // Every record after a failed segment header is unreachable by replay (some may
                // already be on the device): write the header again, synchronously, before any
                // of them is acknowledged.
                ok = self.inner.devices.write_at(dev, buf, at).is_ok();
            }
            if !ok {
                // Before `applied_shard_seq` moves past the failed record: a flusher that sees
                // the new value must also see the broken chain, or it would only sync and let
                // later records claim the missing one durable.
                self.inner.chain_broken.store(true, Ordering::Release);
            }
            if let Some(ss) = rec.shard_seq {
                self.inner.shard_stats[self.id]
                    .applied_shard_seq
                    .store(ss + 1, Ordering::Release);
            }
            if ok {
                self.apply(rec.seq, rec.applies, rec.buf);
            } else {
                let mut space = self.inner.space.lock();
                for a in &rec.applies {
                    if let Apply::Block { id, .. } = a {
                        space.discard_id(*id, rec.seq);
                    }
                }
                drop(space);
                let msg = match &rec.result {
                    Some(Err(e)) => e.to_string(),
                    _ => String::new(),
                };
                for p in &rec.parts {
                    p.fail(Error::Io {
                        device: 0,
                        offset: 0,
                        source: std::io::Error::other(msg.clone()),
                    });
                }
                if rec.shard_seq.is_none() {
                    // A segment header failed: the chain is broken until the next checkpoint.
                    self.inner.kick_checkpoint();
                }
            }
            for p in &rec.parts {
                p.record_done();
            }
        }
    }

    fn apply(&mut self, seq: u64, applies: Vec<Apply>, buf: Option<AlignedBuf>) {
        let buf = buf.map(Arc::new);
        let shards = self.inner.shards();
        let me = self.id;
        let mut written = 0u64;
        let mut moved = 0u64;
        let mut space = self.inner.space.lock();
        // Records nearly always hold one volume: keep its map locked across entries.
        let mut map: Option<(&Arc<VolumeState>, parking_lot::MutexGuard<'_, LbaMap>)> = None;
        macro_rules! map_of {
            ($vol:expr) => {{
                if !map.as_ref().is_some_and(|(v, _)| Arc::ptr_eq(v, $vol)) {
                    drop(map.take());
                    map = Some(($vol, $vol.maps[me].lock()));
                }
                &mut map.as_mut().expect("just set").1
            }};
        }
        for a in &applies {
            match a {
                Apply::Block {
                    vol,
                    lba,
                    id,
                    entry,
                    buf_at,
                } => {
                    let generation = space.place(*id, *entry);
                    if vol.deleted.load(Ordering::Acquire) || *lba >= vol.blocks() {
                        space.discard_id(*id, seq);
                        continue;
                    }
                    space.add_ref(*id);
                    let old = map_of!(vol).set(*lba, *id);
                    if old != 0 {
                        space.drop_ref(old, seq);
                    }
                    if let Some(b) = &buf {
                        self.cache.insert(*id, generation, b.clone(), *buf_at);
                    }
                    written += BLOCK_BYTES;
                }
                Apply::Hole { vol, lba } => {
                    let old = map_of!(vol).set(*lba, 0);
                    if old != 0 {
                        space.drop_ref(old, seq);
                    }
                    written += BLOCK_BYTES;
                }
                Apply::Trim { vol, lba, count } => {
                    trim_owned(map_of!(vol), *lba, *count, me, shards, |old| {
                        space.drop_ref(old, seq)
                    });
                }
                Apply::Move {
                    id,
                    from_segment,
                    from_offset,
                    entry,
                } => {
                    if space.relocate(*id, *from_segment, *from_offset, entry) {
                        moved += u64::from(entry.stored_len);
                    }
                }
            }
        }
        drop(map);
        drop(space);
        self.inner
            .counters
            .client_written
            .fetch_add(written, Ordering::Relaxed);
        self.inner
            .counters
            .gc_moved
            .fetch_add(moved, Ordering::Relaxed);
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }
}

/// Clear `lba..lba+count` in the pages of `map` that `shard` owns, calling `freed` for each
/// block id removed. Cost is per page, not per block, for pages that are holes already.
pub(crate) fn trim_owned(
    map: &mut crate::lbamap::LbaMap,
    lba: u64,
    count: u64,
    shard: usize,
    shards: usize,
    mut freed: impl FnMut(u64),
) {
    let end = (lba + count).min(map.pages.len() as u64 * MAP_PAGE_ENTRIES);
    let mut pos = lba;
    while pos < end {
        let page = pos / MAP_PAGE_ENTRIES;
        let page_end = ((page + 1) * MAP_PAGE_ENTRIES).min(end);
        if shard_of(pos, shards) == shard && map.pages[page as usize].is_some() {
            for l in pos..page_end {
                let old = map.set(l, 0);
                if old != 0 {
                    freed(old);
                }
            }
        }
        pos = page_end;
    }
}

fn item_part(i: &Item) -> &Rc<Part> {
    match i {
        Item::Data { part, .. }
        | Item::Hole { part, .. }
        | Item::Trim { part, .. }
        | Item::Move { part, .. } => part,
    }
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::NoSpace => Error::NoSpace,
        other => Error::Io {
            device: 0,
            offset: 0,
            source: std::io::Error::other(other.to_string()),
        },
    }
}

fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(8);
    let tail = chunks.remainder();
    tail.iter().all(|&x| x == 0)
        && chunks
            .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .all(|w| w == 0)
}
