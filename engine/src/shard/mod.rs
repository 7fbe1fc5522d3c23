//! A shard: one worker per core. It owns an I/O queue, its part of every volume's map and its
//! log chain; requests reach it through a channel. This file holds the loop; reads, writes
//! and the ordered apply of completed records live beside it, the records and the chain in `log/`.

mod apply;
mod fetch;
mod flush;
mod pack;
mod prewrite;
mod read;
mod workers;
mod write;

pub(crate) use apply::*;
pub(crate) use flush::{FlushGroup, Waiting};
pub(crate) use pack::*;
pub(crate) use read::*;
pub(crate) use workers::Workers;
pub(crate) use write::*;

use crate::log::{Chain, ShardPosition, VoidAt};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::counters::{Op, Stages};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::api::BLOCK_BYTES;
use crate::cache::{BlockCache, IdMap};
use crate::context::Context;
use crate::error::Error;
use crate::io::{AlignedBuf, Doorbell, IoDone, IoQueue};
use crate::job::Job;
use crate::map::VolumeState;
use crate::space::BlockEntry;
use parking_lot::MutexGuard;

pub(crate) const BLOCK: usize = BLOCK_BYTES as usize;

/// Most messages taken from the channel per loop turn.
pub(crate) const MAX_BATCH_MSGS: usize = 1024;

/// Most payload bytes gathered per loop turn: a record's worth (256 blocks), so that a record
/// goes to the device as soon as it is full instead of waiting for the rest of a large batch
/// to be hashed and packed (1 MiB writes at QD8: 1350-1412 MB/s against 1330-1357 with
/// 16 MiB, alternating runs).
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

/// How often a shard with stalled writes looks for free space again.
pub(crate) const STALL_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// Records in flight per shard before the worker waits for completions.
pub(crate) const MAX_INFLIGHT_RECORDS: usize = 64;

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
    /// Copy blocks out of segments being cleaned (see [`Relocation`]). Sent only to the
    /// mover, whose chain holds nothing else: moved blocks (the cold ones) fill segments of
    /// their own instead of sharing them with hot foreground writes, so those segments stay
    /// full and are not cleaned again and again.
    Relocate {
        moves: Vec<Relocation>,
        job: Arc<Job>,
    },
    /// Drain in-flight I/O, report the chain position (the chain goes on where it is, see
    /// `Chain::at_checkpoint`), wait for the checkpoint's image. In order with the other
    /// messages (a checkpoint that changes volumes); plain checkpoints send an [`UrgentPause`].
    Pause {
        paused: Sender<Result<ShardPosition, Error>>,
        resume: Receiver<()>,
    },
    /// Nothing: wakes a worker blocked on its channel to look at its urgent one.
    Nudge,
    /// Finish every I/O in flight, then answer (the cleaner frees segments after this).
    Fence(Sender<()>),
    /// Answer once every write received before this one is applied (or failed): writes
    /// acknowledged early are then covered by a flush and seen by block status. Waits for
    /// writes stalled on space, unlike `Fence` (which the cleaner itself sends).
    Settle(Sender<()>),
    /// A client's flush that this worker answers (see `flush.rs`): after every early write
    /// it received before this one is applied, it syncs the devices.
    Flush(flush::Waiting, Instant),
    Stop,
}

/// A pause that overtakes the worker's queue (see `Workers::post_urgent`): the records it has
/// in flight still complete first, but the requests waiting in its channel (up to the whole
/// write-back buffer, tens of milliseconds of writes) wait for after the checkpoint's image.
/// Valid because nothing in the channel is applied yet: whatever it holds is written after the
/// chain position the checkpoint records, where replay finds it.
pub(crate) struct UrgentPause {
    pub paused: Sender<Result<ShardPosition, Error>>,
    pub resume: Receiver<()>,
}

pub(crate) use crate::io::on_shard_thread;

/// Writes acknowledged early that this shard has received and not yet applied.
#[derive(Default)]
pub(crate) struct EarlyParts {
    /// Their blocks: (volume id, LBA) -> writes (reads of them wait).
    pub(crate) blocks: HashMap<(u32, u64), u32>,
    /// The serials of the parts not finished: a flush waits for those taken before it.
    pub(crate) open: BTreeSet<u64>,
    pub(crate) next: u64,
    /// Parts finished since the shard last uncounted them from `ShardStats::early_parts`.
    pub(crate) finished: u64,
}

impl EarlyParts {
    /// A new part: its serial, open until its [`EarlyRange`] drops.
    pub(crate) fn open_part(&mut self) -> u64 {
        let serial = self.next;
        self.next += 1;
        self.open.insert(serial);
        serial
    }

    /// Whether every part taken before serial `next` has finished.
    pub(crate) fn finished_before(&self, next: u64) -> bool {
        self.open.first().is_none_or(|&s| s >= next)
    }
}

pub(crate) type Unapplied = Rc<RefCell<EarlyParts>>;

/// An open early part (serial `serial`) and its blocks `first..=last` of volume `vol` in an
/// [`Unapplied`] set, counted while the part lives.
pub(crate) struct EarlyRange {
    pub(crate) serial: u64,
    pub(crate) set: Unapplied,
    pub(crate) vol: u32,
    pub(crate) first: u64,
    pub(crate) last: u64,
}

pub(crate) fn note_unapplied(set: &Unapplied, vol: u32, first: u64, last: u64) {
    let mut set = set.borrow_mut();
    for lba in first..=last {
        *set.blocks.entry((vol, lba)).or_insert(0) += 1;
    }
}

impl Drop for EarlyRange {
    fn drop(&mut self) {
        let mut set = self.set.borrow_mut();
        for lba in self.first..=self.last {
            if let std::collections::hash_map::Entry::Occupied(mut e) =
                set.blocks.entry((self.vol, lba))
            {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        set.open.remove(&self.serial);
        set.finished += 1;
    }
}

/// What a worker's parts share, without atomics: where they report stage times, and the
/// capacity finished parts give back (returned to `Context::accepted_bytes` once per turn: an
/// atomic and a reference count per write on counters both workers touch cost more).
pub(crate) struct PartEnv {
    pub(crate) stages: Arc<Stages>,
    pub(crate) released: Cell<u64>,
}

/// Progress of one message across the records that carry it.
pub(crate) struct Part {
    pub(crate) job: Arc<Job>,
    pub(crate) env: Rc<PartEnv>,
    pub(crate) records: Cell<usize>,
    pub(crate) error: RefCell<Option<Error>>,
    /// An early-acknowledged write's blocks, marked unapplied until the part finishes.
    pub(crate) early: RefCell<Option<EarlyRange>>,
    /// Bytes of pool capacity this part holds until it is applied (or fails), counted in
    /// `Context::accepted_bytes`.
    pub(crate) reserved: Cell<u64>,
    /// Part of a write longer than `WRITE_AROUND_BYTES`: its blocks are cached only into free
    /// room, never in place of others.
    pub(crate) large_write: Cell<bool>,
}

impl Part {
    pub(crate) fn new(job: Arc<Job>, env: &Rc<PartEnv>) -> Rc<Part> {
        Rc::new(Part {
            job,
            env: env.clone(),
            records: Cell::new(0),
            error: RefCell::new(None),
            early: RefCell::new(None),
            reserved: Cell::new(0),
            large_write: Cell::new(false),
        })
    }

    /// Give back the capacity this part holds (see `PartEnv::released`).
    fn release(&self) {
        let bytes = self.reserved.replace(0);
        if bytes > 0 {
            self.env.released.set(self.env.released.get() + bytes);
        }
    }

    pub(crate) fn fail(&self, e: Error) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// One record carrying this part completed; when all did (and the message was fully
    /// packed), finish the part.
    pub(crate) fn record_done(&self) {
        let n = self.records.get() - 1;
        self.records.set(n);
        if n == 0 {
            // Applied (or failed): reads no longer wait for these blocks.
            drop(self.early.borrow_mut().take());
            self.release();
            let err = self.error.borrow_mut().take();
            self.job
                .part_done(err.map_or(Ok(()), Err), Some(&self.env.stages));
        }
    }
}

impl Drop for Part {
    /// A part dropped unfinished (its worker stops) holds no capacity either.
    fn drop(&mut self) {
        self.release();
    }
}

pub(crate) struct Inflight {
    pub(crate) tag: u64,
    pub(crate) result: Option<std::io::Result<()>>,
    pub(crate) buf: Option<AlignedBuf>,
    pub(crate) seq: u64,
    pub(crate) shard_seq: Option<u64>,
    /// A segment header: its device and byte offset (to write it again if it fails).
    pub(crate) header_at: Option<(u16, u64)>,
    /// A record: what a `Void` record written over it must say if it fails.
    pub(crate) void: Option<VoidAt>,
    pub(crate) applies: Vec<Apply>,
    pub(crate) parts: Vec<Rc<Part>>,
    /// When it was queued to the device.
    pub(crate) sent: Instant,
}

pub(crate) struct Shard {
    pub(crate) id: usize,
    pub(crate) ctx: Arc<Context>,
    pub(crate) rx: Receiver<ShardMsg>,
    /// Shared by this worker's parts (see [`PartEnv`]).
    pub(crate) env: Rc<PartEnv>,
    /// Pauses that overtake `rx` (see [`UrgentPause`]).
    pub(crate) urgent: Receiver<UrgentPause>,
    /// Rung by senders while this worker waits in its ring (see [`Doorbell`]).
    pub(crate) bell: Arc<Doorbell>,
    pub(crate) queue: Box<dyn IoQueue>,
    /// The log chain this worker appends to.
    pub(crate) chain: Chain,
    pub(crate) inflight: VecDeque<Inflight>,
    pub(crate) reads: IdMap<PendingRead>,
    /// Dedup candidates being read for verification, and those whose read completed.
    pub(crate) verifying: IdMap<VerifyRead>,
    pub(crate) verified: Vec<(VerifyRead, IoDone)>,
    pub(crate) next_tag: u64,
    pub(crate) items: Vec<Item>,
    /// Items waiting for the cleaner to free space, in order; each holds a count on its part.
    pub(crate) stalled: VecDeque<Item>,
    /// When the oldest stalled item stalled.
    pub(crate) stalled_since: Option<std::time::Instant>,
    /// Writes and zeroes that arrived while items were stalled, processed in order after them
    /// (so that read-modify-write never merges with a map that misses a stalled write).
    pub(crate) deferred: VecDeque<ShardMsg>,
    /// Parts of messages processed this turn: each holds one count until its items are packed,
    /// so no part completes before all of its records exist.
    pub(crate) held: Vec<Rc<Part>>,
    pub(crate) done: Vec<IoDone>,
    pub(crate) scratch_ids: Vec<u64>,
    pub(crate) scratch_entries: Vec<Option<BlockEntry>>,
    /// Blocks of early-acknowledged writes this shard has received and not yet applied.
    pub(crate) unapplied: Unapplied,
    /// Flushes this worker answers itself.
    pub(crate) flushes: flush::Flushes,
    /// Zeroes written ahead of a flush-heavy chain.
    pub(crate) prewrites: prewrite::Prewrites,
    /// Metadata pages read through the queue, and the requests waiting for them.
    pub(crate) fetches: fetch::Fetches,
    /// Where the last dedup pass's stream of duplicates ended: (volume id, LBA, the stored
    /// block its last block duplicates), see `Shard::stream_proposals`.
    pub(crate) dedup_stream: Option<(u32, u64, u64)>,
}

impl Drop for Shard {
    fn drop(&mut self) {
        // Unwinding from a panic (a bug): stop the pool before the fields go (dropping the
        // queue waits for the device), so nothing is accepted for a shard that is gone.
        if std::thread::panicking() {
            let name = std::thread::current()
                .name()
                .unwrap_or("an engine thread")
                .to_string();
            self.ctx.health.set_fault(format!(
                "{name} panicked while running shard {} {}",
                self.id,
                crate::health::FAULT_PLACEHOLDER
            ));
        }
    }
}

impl Shard {
    pub fn new(
        id: usize,
        ctx: Arc<Context>,
        rx: Receiver<ShardMsg>,
        urgent: Receiver<UrgentPause>,
        bell: Arc<Doorbell>,
        queue: Box<dyn IoQueue>,
        pos: ShardPosition,
    ) -> Self {
        let env = Rc::new(PartEnv {
            stages: ctx.stages.clone(),
            released: Cell::new(0),
        });
        Shard {
            id,
            chain: Chain::new(id, ctx.clone(), pos),
            ctx,
            env,
            rx,
            urgent,
            bell,
            queue,
            inflight: VecDeque::new(),
            reads: IdMap::default(),
            verifying: IdMap::default(),
            verified: Vec::new(),
            next_tag: 1,
            items: Vec::new(),
            stalled: VecDeque::new(),
            stalled_since: None,
            deferred: VecDeque::new(),
            held: Vec::new(),
            done: Vec::new(),
            scratch_ids: Vec::new(),
            scratch_entries: Vec::new(),
            unapplied: Rc::default(),
            flushes: flush::Flushes::default(),
            prewrites: prewrite::Prewrites::default(),
            fetches: fetch::Fetches::default(),
            dedup_stream: None,
        }
    }

    pub fn run(mut self) {
        // Front ends defer the replies of completions to the end of each turn (see
        // `api::after_batch`), so that one turn's replies leave together.
        crate::api::begin_batch();
        crate::io::mark_shard_thread();
        // From now on FUA writes completed on this thread are flushed by this shard.
        drop(crate::job::take_local_flushes());
        loop {
            let busy = !self.inflight.is_empty()
                || !self.reads.is_empty()
                || self.fetches.reading()
                || self.queue.in_flight() > 0;
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
                    if let ShardMsg::Write {
                        vol,
                        offset,
                        data,
                        job,
                    } = &m
                    {
                        if job.is_write_back() && !data.is_empty() {
                            let first = offset / BLOCK_BYTES;
                            let last = (offset + data.len() as u64 - 1) / BLOCK_BYTES;
                            note_unapplied(&self.unapplied, vol.id, first, last);
                        }
                    }
                    let waiting = !self.stalled.is_empty() || !self.deferred.is_empty();
                    match m {
                        ShardMsg::Stop => {
                            stop = true;
                            break;
                        }
                        ShardMsg::Pause { paused, resume } => {
                            pause = Some((paused, resume));
                            break;
                        }
                        ShardMsg::Write { .. }
                        | ShardMsg::Zero { .. }
                        | ShardMsg::Settle(_)
                        | ShardMsg::Flush(..)
                            if waiting =>
                        {
                            self.deferred.push_back(m);
                        }
                        // After an early write still waiting there.
                        ShardMsg::Read {
                            ref vol,
                            offset,
                            len,
                            ..
                        } if waiting && self.overlaps_unapplied(vol.id, offset, len) => {
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
                    if let Ok(u) = self.urgent.try_recv() {
                        pause = Some((u.paused, u.resume));
                        break;
                    }
                    msg = self.rx.try_recv().ok();
                }
            }
            if pause.is_none() && !stop {
                if let Ok(u) = self.urgent.try_recv() {
                    pause = Some((u.paused, u.resume));
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
            // Submit what was queued; when the channel had nothing, wait for one completion or
            // the next message, whichever comes first.
            let r = if !got_msgs && self.queue.in_flight() > 0 {
                self.bell.about_to_wait();
                let r = if self.rx.is_empty() {
                    self.queue.wait(&self.bell)
                } else {
                    self.queue.submit(0)
                };
                self.bell.awake();
                r
            } else {
                self.queue.submit(0)
            };
            if let Err(e) = r {
                self.fail_all_inflight(e);
            }
            self.reap();
            if stop || pause.is_some() {
                self.drain();
            }
            // After every place parts complete (a FUA write done in `drain` queues its flush
            // here), and before this worker may block on its channel.
            self.poll_flushes();
            if (stop || pause.is_some()) && self.queue.in_flight() > 0 {
                self.drain();
            }
            self.return_released();
            crate::api::end_batch();
            if let Some((paused, resume)) = pause {
                let r = self.chain.at_checkpoint();
                let _ = paused.send(r.map(|()| self.chain.pos));
                let _ = resume.recv();
            }
            if stop {
                self.fail_waiting();
                crate::api::end_batch();
                return;
            }
        }
    }

    /// Handle a read, write, zero or relocation; returns the payload bytes it carried.
    pub(crate) fn process(&mut self, m: ShardMsg) -> usize {
        match m {
            ShardMsg::Read {
                vol,
                offset,
                len,
                at,
                job,
            } => {
                job.picked(&self.env.stages);
                self.read_try(vol, offset, len, at, job, 0);
                0
            }
            ShardMsg::Write {
                vol,
                offset,
                data,
                job,
            } => {
                let n = data.len();
                job.picked(&self.env.stages);
                self.write(vol, offset, data, job);
                n
            }
            ShardMsg::Zero {
                vol,
                offset,
                len,
                job,
            } => {
                job.picked(&self.env.stages);
                self.zero(vol, offset, len, job);
                0
            }
            ShardMsg::Relocate { moves, job } => {
                let part = Part::new(job, &self.env);
                part.records.set(1);
                let mut n = 0;
                for rel in moves {
                    n += rel.data.len() * rel.members.len();
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
            ShardMsg::Nudge => 0,
            ShardMsg::Fence(done) => {
                self.drain();
                let _ = done.send(());
                0
            }
            ShardMsg::Settle(done) => {
                self.pack_records();
                self.drain();
                if self.stalled.is_empty() {
                    let _ = done.send(());
                } else {
                    self.deferred.push_back(ShardMsg::Settle(done));
                }
                0
            }
            ShardMsg::Flush(what, since) => {
                self.take_flush(what, since);
                0
            }
            ShardMsg::Stop => 0,
        }
    }

    pub(crate) fn release_held(&mut self) {
        for p in std::mem::take(&mut self.held) {
            p.record_done();
        }
    }

    /// At stop: fail what is stalled or deferred.
    pub(crate) fn fail_waiting(&mut self) {
        self.fail_parked();
        let stalled = std::mem::take(&mut self.stalled);
        self.unpin(stalled.iter());
        for item in stalled {
            let p = item_part(&item);
            p.fail(Error::ShutDown);
            p.record_done();
        }
        for m in std::mem::take(&mut self.deferred) {
            if let ShardMsg::Write { job, .. }
            | ShardMsg::Zero { job, .. }
            | ShardMsg::Read { job, .. } = m
            {
                job.part_done(Err(Error::ShutDown), Some(&self.env.stages));
            }
        }
    }

    /// Wait for every in-flight op and process it.
    pub(crate) fn drain(&mut self) {
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

    pub(crate) fn fail_all_inflight(&mut self, e: std::io::Error) {
        // Page reads lost with the queue: what waits for them runs again at the next reap.
        self.fetches.forget_reads();
        for r in self.inflight.iter_mut() {
            if r.result.is_none() {
                r.result = Some(Err(std::io::Error::new(e.kind(), e.to_string())));
            }
        }
        self.apply_completed();
    }

    /// Give the capacity of the parts finished since the last turn back to the pool.
    pub(crate) fn return_released(&self) {
        let finished = std::mem::take(&mut self.unapplied.borrow_mut().finished);
        if finished > 0 {
            self.ctx.shard_stats[self.id]
                .early_parts
                .fetch_sub(finished, std::sync::atomic::Ordering::AcqRel);
        }
        let bytes = self.env.released.replace(0);
        if bytes > 0 {
            self.ctx
                .accepted_bytes
                .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
        }
    }

    pub(crate) fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        self.queue.reap(&mut done);
        for mut d in done.drain(..) {
            if self.sync_done(&mut d) {
                continue;
            }
            let d = match self.prewrite_done(d) {
                Ok(()) => continue,
                Err(d) => d,
            };
            let Some(d) = self.page_done(d) else {
                continue;
            };
            if let Some(pr) = self.reads.remove(&d.tag) {
                self.ctx.stages.device(Op::Read, pr.sent);
                self.finish_read(pr, d);
            } else if let Some(v) = self.verifying.remove(&d.tag) {
                self.verified.push((v, d));
            } else if let Some(r) = self.inflight.iter_mut().find(|r| r.tag == d.tag) {
                if r.shard_seq.is_some() {
                    self.ctx.stages.device(Op::Write, r.sent);
                }
                r.result = Some(d.result);
                // Kept only for a segment header, which a failure writes again; a record's
                // buffer goes back now (to its ring's pool) rather than when it is applied.
                if r.header_at.is_some() {
                    r.buf = Some(d.buf);
                }
            }
        }
        self.done = done;
        self.resume_parked();
        self.apply_completed();
    }

    pub(crate) fn cache(&self) -> MutexGuard<'_, BlockCache> {
        self.ctx.caches[self.id].lock()
    }

    pub(crate) fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }
}

pub(crate) fn item_part(i: &Item) -> &Rc<Part> {
    match i {
        Item::Data { part, .. }
        | Item::Ref { part, .. }
        | Item::Hole { part, .. }
        | Item::Trim { part, .. }
        | Item::Move { part, .. } => part,
    }
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(8);
    let tail = chunks.remainder();
    tail.iter().all(|&x| x == 0)
        && chunks
            .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .all(|w| w == 0)
}
