//! The handles on the shard workers: one channel per log chain (the data shards, then the
//! mover), and the requests that wait for every shard's answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::io::Doorbell;
use crate::job::Answer;
use crate::shard::{FlushGroup, ShardMsg, UrgentPause, Waiting};
use parking_lot::Mutex;

pub(crate) struct Workers {
    /// One per chain: the data shards, then the mover (see `Context::mover`).
    senders: Vec<Sender<ShardMsg>>,
    /// Each worker's doorbell, rung after every message (see [`Doorbell`]).
    bells: Vec<Arc<Doorbell>>,
    /// Each worker's channel of pauses that overtake its queue.
    urgent: Vec<Sender<UrgentPause>>,
    /// Spreads flushes that no shard's early writes claim.
    next_flush: AtomicUsize,
}

impl Workers {
    pub(crate) fn new(
        senders: Vec<Sender<ShardMsg>>,
        bells: Vec<Arc<Doorbell>>,
        urgent: Vec<Sender<UrgentPause>>,
    ) -> Workers {
        Workers {
            senders,
            bells,
            urgent,
            next_flush: AtomicUsize::new(0),
        }
    }

    /// Hand a pause to worker `shard` ahead of what waits in its channel (see
    /// [`UrgentPause`]); false when it stopped.
    pub(crate) fn post_urgent(&self, shard: usize, pause: UrgentPause) -> bool {
        // The nudge wakes a worker blocked on its channel; the bell, one waiting in its ring.
        self.urgent[shard].send(pause).is_ok() && self.post(shard, ShardMsg::Nudge)
    }

    /// Hand `msg` to worker `shard`; a worker that stopped fails it.
    pub(crate) fn send(&self, shard: usize, msg: ShardMsg) {
        if let Err(crossbeam_channel::SendError(msg)) = self.senders[shard].send(msg) {
            fail_msg(msg);
            return;
        }
        self.bells[shard].ring();
    }

    /// Hand `msg` to worker `shard`; false when it stopped (the message is dropped).
    pub(crate) fn post(&self, shard: usize, msg: ShardMsg) -> bool {
        let sent = self.senders[shard].send(msg).is_ok();
        if sent {
            self.bells[shard].ring();
        }
        sent
    }

    /// Send `msg` to the first `chains` workers and wait for every answer; false when a worker
    /// dropped one (it stopped).
    pub(crate) fn ask(&self, chains: usize, msg: fn(Sender<()>) -> ShardMsg) -> bool {
        let waits: Vec<_> = (0..chains)
            .map(|shard| {
                let (tx, rx) = crossbeam_channel::bounded(1);
                self.send(shard, msg(tx));
                rx
            })
            .collect();
        waits.into_iter().all(|rx| rx.recv().is_ok())
    }

    /// Wait until every worker has finished the I/O it had in flight (reads that may still
    /// target a segment about to be freed).
    pub(crate) fn fence(&self) -> Result<()> {
        if self.ask(self.senders.len(), ShardMsg::Fence) {
            Ok(())
        } else {
            Err(Error::ShutDown)
        }
    }

    /// Wait until every write acknowledged early so far is applied (in the maps, on the
    /// device), so that a flush covers it and block status reports it. Fails when one was
    /// lost (the pool is then halted).
    pub(crate) fn settle_writes(&self, ctx: &Context) -> Result<()> {
        if ctx.write_back.idle() {
            // A lost early write halts the pool before it leaves the count.
            return if ctx.health.is_faulted() {
                Err(ctx.health.halted())
            } else {
                Ok(())
            };
        }
        if crate::shard::on_shard_thread() {
            // A shard waiting for shards (itself among them) would wait forever.
            return Err(Error::Internal {
                what: "waiting for early writes on an engine thread (a front-end bug)",
            });
        }
        let answered = self.ask(ctx.shards(), ShardMsg::Settle);
        if ctx.health.is_faulted() {
            return Err(ctx.health.halted());
        }
        if !answered {
            return Err(Error::ShutDown);
        }
        Ok(())
    }

    /// Route a client's flush to the data shards that hold writes acknowledged early: the one
    /// that does syncs the devices itself once they are stored (see `shard/flush.rs`); of
    /// several, the last to have its own stored does. When none holds any, any shard syncs.
    pub(crate) fn flush(&self, ctx: &Context, answer: Answer, since: Instant) {
        let holding: Vec<usize> = (0..ctx.shards())
            .filter(|&s| ctx.shard_stats[s].early_parts.load(Ordering::Acquire) > 0)
            .collect();
        if holding.len() <= 1 {
            let shard = holding
                .first()
                .copied()
                .unwrap_or_else(|| self.next_flush.fetch_add(1, Ordering::Relaxed) % ctx.shards());
            self.send(shard, ShardMsg::Flush(Waiting::Own(answer), since));
            return;
        }
        let group = Arc::new(FlushGroup {
            remaining: AtomicUsize::new(holding.len()),
            answer: Mutex::new(Some(answer)),
        });
        for shard in holding {
            // A worker that stopped drops its part: the answer (dropped with the group) fails.
            self.send(shard, ShardMsg::Flush(Waiting::Part(group.clone()), since));
        }
    }

    /// Tell every worker to stop once it has drained what it holds.
    pub(crate) fn stop(&self) {
        for (tx, bell) in self.senders.iter().zip(&self.bells) {
            let _ = tx.send(ShardMsg::Stop);
            bell.ring();
        }
    }
}

/// Answer a message no worker will take (it stopped) with `ShutDown`.
fn fail_msg(msg: ShardMsg) {
    match msg {
        ShardMsg::Read { job, .. }
        | ShardMsg::Write { job, .. }
        | ShardMsg::Zero { job, .. }
        | ShardMsg::Relocate { job, .. } => job.part_done(Err(Error::ShutDown), None),
        ShardMsg::Pause { paused, .. } => {
            let _ = paused.send(Err(Error::ShutDown));
        }
        // Dropping a flush (or this worker's part of one) answers it with `ShutDown`.
        ShardMsg::Flush(..) => {}
        // Dropping the sender answers the fence or settle with an error.
        ShardMsg::Fence(_) | ShardMsg::Settle(_) | ShardMsg::Stop | ShardMsg::Nudge => {}
    }
}
