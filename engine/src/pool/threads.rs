//! The pool's background threads: the flusher (groups flushes into one device sync) and the
//! checkpointer (checkpoints, runs the cleaner when space runs low, gives freed segments back).

use crate::{
    gc::{GC_MAX_UTILISATION, GC_URGENT_UTILISATION, GC_VICTIMS_PER_PASS},
    pool::Inner,
};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::counters::Op;
use crate::error::{Error, Result};
use crate::health::{Health, WakeMsg};
use crate::job::FlushMsg;

/// An engine thread whose panic (a bug) stops the pool instead of leaving requests waiting
/// forever for a thread that is gone.
pub(crate) fn spawn_supervised(
    name: String,
    health: &Arc<Health>,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    let health = health.clone();
    let label = name.clone();
    spawn(name, move || {
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            health.set_fault(format!("thread {label} failed: {msg}"));
            // Replies the thread collected before it failed still go out.
            crate::api::end_batch();
        }
    })
}

pub(crate) fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|source| Error::File {
            path: PathBuf::from("thread"),
            source,
        })
}

pub(crate) fn flusher(inner: Arc<Inner>, rx: Receiver<FlushMsg>) {
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut waiting = Vec::new();
        let mut stop = false;
        for m in std::iter::once(first).chain(rx.try_iter()) {
            match m {
                FlushMsg::Flush(c, since) => waiting.push((c, since)),
                FlushMsg::Stop => stop = true,
            }
        }
        if !waiting.is_empty() {
            // Writes acknowledged early are part of what a client's flush covers.
            let t = std::time::Instant::now();
            let r = inner
                .workers
                .settle_writes(&inner.ctx)
                .and_then(|()| inner.ckpt.sync_completed());
            let stages = &inner.ctx.stages;
            stages.device(Op::Flush, t);
            for (c, since) in waiting {
                stages.done(Op::Flush, since);
                c.send(match &r {
                    Ok(()) => Ok(crate::api::Reply::Done),
                    Err(e) => Err(e.clone()),
                });
            }
        }
        if stop {
            return;
        }
    }
}

/// Least time between checkpoints taken only to free segments left without a live block.
pub(crate) const DEAD_SEGMENT_CHECKPOINT_MS: u64 = 2000;

pub(crate) fn checkpointer(inner: Arc<Inner>, rx: Receiver<WakeMsg>) {
    let wait = Duration::from_millis(500);
    loop {
        let msg = rx.recv_timeout(wait);
        let kicked = match msg {
            Ok(WakeMsg::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            Ok(WakeMsg::Kick) => true,
            Ok(WakeMsg::Space) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => false,
        };
        let kicked = inner.ctx.wake.take_checkpoint_wanted() || kicked;
        if inner.ctx.health.is_closed() || inner.ctx.health.is_faulted() {
            return;
        }
        inner.ctx.update_write_back_floor();
        let written = inner.ctx.counters.client_written.load(Ordering::Relaxed);
        let since = written.saturating_sub(inner.ckpt.state.lock().written_at_last);
        let free = inner.ctx.space.lock().free_segments;
        let broken = inner.ctx.chain_broken.load(Ordering::Acquire);
        // Low on space, checkpoint every quarter of the pool written: that puts sealed
        // segments behind a checkpoint, where the cleaner frees them without one.
        let pool_bytes = u64::from(inner.ctx.geo.total_segments) * inner.ctx.geo.segment_bytes;
        let low = free < inner.ctx.cleaning_threshold();
        if kicked
            || broken
            || since >= inner.checkpoint_interval
            || (low && since >= pool_bytes / 4)
        {
            if let Err(e) = inner.ckpt.checkpoint_with(None) {
                tracing::error!(target: "ingot_engine::checkpoint", error = %e, "checkpoint failed");
            }
        }
        // The next interval checkpoint's mark, from the last checkpoint of any kind; a write
        // that crosses it nudges this thread, which checks `since` above (a stale mark costs
        // a look, not a checkpoint). Passed already: look again at once.
        let due = inner
            .ckpt
            .state
            .lock()
            .written_at_last
            .saturating_add(inner.checkpoint_interval);
        inner.ctx.checkpoint_due.store(due, Ordering::Relaxed);
        if inner.ctx.counters.client_written.load(Ordering::Relaxed) >= due {
            inner.ctx.wake.nudge_checkpointer();
        }
        if !low && !inner.ctx.health.is_closed() {
            // Space comes back after trims and overwrites without a cleaning pass: segments
            // left without a live block are freed by a sync when they lie behind the last
            // checkpoint, else by a checkpoint (at most one every few seconds for this).
            let ckpt_seq = inner.ckpt.state.lock().both_seq;
            let (behind, after) = inner.ctx.space.lock().dead_sealed(ckpt_seq);
            // Under a steady stream of writes the interval checkpoints do this already: only
            // when none came for a while (a sync and a fence stall every shard's pipeline).
            let now = inner.ckpt.started.elapsed().as_millis() as u64;
            let since_ms = now.saturating_sub(inner.ckpt.at_ms.load(Ordering::Relaxed));
            let quiet = since_ms >= DEAD_SEGMENT_CHECKPOINT_MS;
            if after > 0 && quiet {
                if let Err(e) = inner.ckpt.checkpoint_with(None) {
                    tracing::error!(target: "ingot_engine::checkpoint", error = %e, "checkpoint failed");
                }
            } else if behind > 0 && quiet {
                if let Err(e) = inner.cleaner.free_dead_segments() {
                    if !inner.ctx.health.is_closed() {
                        tracing::error!(target: "ingot_engine::gc", error = %e, "freeing dead segments failed");
                    }
                }
                // Counts as the pause this rule waits out.
                inner.ckpt.at_ms.store(now, Ordering::Relaxed);
            }
        }
        if !low || inner.ctx.health.is_closed() {
            inner.ctx.gc_stuck.store(false, Ordering::Release);
            // Segments freed while space was short are given back now that it is not.
            inner.ctx.give_back_freed();
            continue;
        }
        if let Err(e) = inner.cleaner.free_dead_segments() {
            if !inner.ctx.health.is_closed() {
                tracing::error!(target: "ingot_engine::gc", error = %e, "freeing dead segments failed");
            }
            continue;
        }
        // Pacing: one pass per wake-up while there is headroom, back to back once writes
        // wait (free space at the urgent threshold), where fuller segments are taken too.
        let mut checkpointed = false;
        loop {
            let free = inner.ctx.space.lock().free_segments;
            if free >= inner.ctx.cleaning_threshold() || inner.ctx.health.is_closed() {
                inner.ctx.gc_stuck.store(false, Ordering::Release);
                break;
            }
            let urgent = free <= inner.ctx.urgent_threshold();
            let max_u = if urgent {
                GC_URGENT_UTILISATION
            } else {
                GC_MAX_UTILISATION
            };
            // Victims sealed since the last checkpoint are freed by a checkpoint: take enough
            // of them per pass that its cost (about 1.4% of the data) stays a small share.
            let victims = GC_VICTIMS_PER_PASS
                .max(4 * inner.ctx.ckpt_reserve())
                .min(64);
            // Greedy: under skewed overwrites cost-benefit's age term kept picking old, 86%-live
            // segments of cold data (WA 1.9-2.1 at 80% full with zipf:1.2 against 1.7 greedy).
            let r = inner
                .cleaner
                .clean(victims, max_u, None, true, &mut |_, _| {});
            let r = match r {
                Ok(r) => r,
                Err(Error::NoSpace) if !checkpointed => {
                    // The move chain found no next segment: a checkpoint starts a new one.
                    checkpointed = true;
                    if let Err(e) = inner.ckpt.checkpoint_with(None) {
                        tracing::error!(target: "ingot_engine::checkpoint", error = %e, "checkpoint failed");
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    if !inner.ctx.health.is_closed() {
                        tracing::error!(target: "ingot_engine::gc", error = %e, "cleaning failed");
                    }
                    break;
                }
            };
            // Stuck (writes that wait fail at once) only when this pass freed nothing and even
            // the fullest cleaning could not win two segments back: the pool is full of live
            // data. A pass that freed victims is progress, however little dead space is left
            // after it (on a 24-segment pool four writers at 75% of the usable capacity got
            // out-of-space errors while every pass freed 3-5 segments).
            let stuck = urgent
                && r.segments_freed == 0
                && inner.cleaner.reclaimable_segments_at(GC_URGENT_UTILISATION) < 2;
            if stuck && tracing::enabled!(target: "ingot_engine::gc", tracing::Level::DEBUG) {
                let free = inner.ctx.space.lock().free_segments;
                let reclaimable = inner.cleaner.reclaimable_segments_at(GC_URGENT_UTILISATION);
                tracing::debug!(
                    target: "ingot_engine::gc",
                    free,
                    cleaned = r.segments_cleaned,
                    freed = r.segments_freed,
                    reclaimable,
                    "stuck"
                );
            }
            if stuck {
                let written = inner.ctx.counters.client_written.load(Ordering::Relaxed);
                inner.ctx.gc_stuck_at.store(written, Ordering::Release);
            }
            inner.ctx.gc_stuck.store(stuck, Ordering::Release);
            if r.segments_cleaned == 0 {
                // Nothing behind the last checkpoint is worth cleaning: checkpoint, so that
                // the segments sealed since become candidates, unless nothing was written.
                if urgent && !checkpointed && inner.cleaner.reclaimable_segments_at(max_u) > 0 {
                    checkpointed = true;
                    if let Err(e) = inner.ckpt.checkpoint_with(None) {
                        tracing::error!(target: "ingot_engine::checkpoint", error = %e, "checkpoint failed");
                        break;
                    }
                    continue;
                }
                break;
            }
            // Passes go on back to back until free space is above the threshold again: with a
            // pause of 50 ms after each (to let the foreground run), writes at 90% full used up
            // the few segments above the data reserve meanwhile and waited a whole pass for
            // space, in one shard or the other, about every 100 ms.
        }
    }
}
