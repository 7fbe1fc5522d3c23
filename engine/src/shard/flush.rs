//! Flushes a shard answers itself: once the early writes it took before a flush are stored,
//! it syncs every device through its own ring and replies from its thread. A database's commit
//! (one writer, a write then a flush) then crosses one thread, not three (connection →
//! flusher → shards → flusher), and waits for no other shard.
//!
//! What reaches a shard here is decided by `Workers::flush`: a flush goes to the one shard
//! that holds early writes (or to any when none does); when several do, each gets its part of
//! one `FlushGroup` and the last to have its own applied syncs. A FUA write whose last part
//! completes on a shard is flushed there too (`job::take_local_flushes`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::api::Reply;
use crate::counters::Op;
use crate::error::Error;
use crate::io::{IoDone, IoOp};
use crate::job::{Answer, FlushMsg};

use super::Shard;

/// A flush waiting for the early parts taken before it.
pub(crate) struct FlushWaiter {
    pub what: Waiting,
    /// When the client asked.
    pub since: Instant,
    /// The early parts with a lower serial must finish first (see `EarlyParts`).
    pub after: u64,
}

pub(crate) enum Waiting {
    /// This worker syncs and answers.
    Own(Answer),
    /// One of several workers holding early writes: the last of them to have its own applied
    /// syncs and answers.
    Part(Arc<FlushGroup>),
}

/// A flush that several workers' early writes hold up (see `Workers::flush`).
pub(crate) struct FlushGroup {
    /// Workers whose early writes are not all applied yet.
    pub remaining: AtomicUsize,
    pub answer: Mutex<Option<Answer>>,
}

/// One sync of every device, covering the flushes in `waiters`.
pub(crate) struct SyncRound {
    pub tags: Vec<u64>,
    pub error: Option<std::io::Error>,
    /// Each chain's applied records when the round began: durable once it succeeds.
    pub applied: Vec<u64>,
    pub waiters: Vec<(Answer, Instant)>,
    pub started: Instant,
}

#[derive(Default)]
pub(crate) struct Flushes {
    /// In arrival order.
    pub waiting: std::collections::VecDeque<FlushWaiter>,
    /// Flushes whose writes are applied, for the next sync round.
    pub ready: Vec<(Answer, Instant)>,
    pub round: Option<SyncRound>,
}

impl Shard {
    /// A client's flush (or this worker's part of one): wait for the early parts taken so
    /// far, then sync.
    pub(crate) fn take_flush(&mut self, what: Waiting, since: Instant) {
        let after = self.unapplied.borrow().next;
        self.flushes
            .waiting
            .push_back(FlushWaiter { what, since, after });
    }

    /// Start a sync for the flushes whose early parts are all applied, unless one is running
    /// (the next round takes them: their writes may have completed after its sync began).
    pub(crate) fn poll_flushes(&mut self) {
        let local = crate::job::take_local_flushes();
        if !local.is_empty() {
            // A FUA write's flush covers the writes acknowledged before it, as a flush does:
            // when another shard holds early writes, the flusher settles them all.
            let elsewhere = (0..self.ctx.shards()).any(|s| {
                s != self.id && self.ctx.shard_stats[s].early_parts.load(Ordering::Acquire) > 0
            });
            for (answer, since) in local {
                if !elsewhere {
                    self.take_flush(Waiting::Own(answer), since);
                } else if let Err(crossbeam_channel::SendError(FlushMsg::Flush(a, _))) =
                    self.ctx.flusher.send(FlushMsg::Flush(answer, since))
                {
                    a.send(Err(Error::ShutDown));
                }
            }
        }
        loop {
            let early = self.unapplied.borrow();
            if !self
                .flushes
                .waiting
                .front()
                .is_some_and(|w| early.finished_before(w.after))
            {
                break;
            }
            drop(early);
            let Some(w) = self.flushes.waiting.pop_front() else {
                break;
            };
            match w.what {
                Waiting::Own(answer) => self.flushes.ready.push((answer, w.since)),
                Waiting::Part(group) => {
                    // Every other worker's part was applied before it counted down: the sync
                    // of the last one covers them all.
                    if group.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                        if let Some(answer) = group.answer.lock().take() {
                            self.flushes.ready.push((answer, w.since));
                        }
                    } else {
                        // Another worker syncs, but this one's chain took part of the commit.
                        self.note_flushes(1);
                    }
                }
            }
        }
        if self.flushes.round.is_some() || self.flushes.ready.is_empty() {
            return;
        }
        let ready = std::mem::take(&mut self.flushes.ready);
        let ctx = &self.ctx;
        // Before the broken-chain flag: a flush that sees a failed record applied also sees
        // the chain it broke (the flag is set first, see `apply_completed`).
        let applied: Vec<u64> = ctx
            .shard_stats
            .iter()
            .map(|s| s.applied_shard_seq.load(Ordering::Acquire))
            .collect();
        if ctx.health.is_faulted() {
            let e = ctx.health.halted();
            for (answer, _) in ready {
                answer.send(Err(e.clone()));
            }
            return;
        }
        if ctx.chain_broken.load(Ordering::Acquire) {
            // Only a checkpoint makes what follows a failed record recoverable: the flusher
            // takes one.
            for (answer, since) in ready {
                if let Err(crossbeam_channel::SendError(FlushMsg::Flush(a, _))) =
                    ctx.flusher.send(FlushMsg::Flush(answer, since))
                {
                    a.send(Err(Error::ShutDown));
                }
            }
            return;
        }
        let mut tags = Vec::new();
        for dev in 0..ctx.devices.count() as u16 {
            let tag = self.tag();
            self.queue.push(IoOp::sync(dev, tag));
            tags.push(tag);
        }
        self.flushes.round = Some(SyncRound {
            tags,
            error: None,
            applied,
            waiters: ready,
            started: Instant::now(),
        });
        if let Err(e) = self.queue.submit(0) {
            self.fail_all_inflight(e);
        }
    }

    /// A completion of the running round's syncs (`false`: not one of them).
    pub(crate) fn sync_done(&mut self, d: &mut IoDone) -> bool {
        let Some(round) = self.flushes.round.as_mut() else {
            return false;
        };
        let Some(i) = round.tags.iter().position(|&t| t == d.tag) else {
            return false;
        };
        round.tags.swap_remove(i);
        if let Err(e) = std::mem::replace(&mut d.result, Ok(())) {
            round.error.get_or_insert(e);
        }
        if !round.tags.is_empty() {
            return true;
        }
        let Some(round) = self.flushes.round.take() else {
            return true;
        };
        let stages = &self.ctx.stages;
        stages.device(Op::Flush, round.started);
        let r = match round.error {
            None => {
                for (s, a) in self.ctx.shard_stats.iter().zip(round.applied) {
                    s.durable_shard_seq.fetch_max(a, Ordering::AcqRel);
                }
                Ok(Reply::Done)
            }
            Some(source) => Err(Error::Sync { source }),
        };
        let n = round.waiters.len();
        for (answer, since) in round.waiters {
            stages.done(Op::Flush, since);
            answer.send(match &r {
                Ok(_) => Ok(Reply::Done),
                Err(e) => Err(e.clone()),
            });
        }
        self.note_flushes(n);
        true
    }
}
