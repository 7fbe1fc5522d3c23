//! Checkpoints: an image of the maps, block table and segment usage written to metadata
//! segments, then the superblocks pointed at it.

mod commit;
mod image;
mod paged;

pub use image::fuzz_decode_checkpoint;
pub(crate) use image::*;
pub(crate) use paged::read_image;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::context::Context;
use crate::format::Superblock;
use crate::shard::Workers;

use crate::error::{Error, Result};
use crate::format::NO_SEGMENT;
use crate::log::ShardPosition;
use crate::shard::{ShardMsg, UrgentPause};

pub(crate) struct CkptState {
    pub(crate) generation: u64,
    /// Segments of the newest checkpoint.
    pub(crate) segments: Vec<u32>,
    /// Segments of the checkpoint before it (the older superblock copy points there).
    pub(crate) prev_segments: Vec<u32>,
    pub(crate) seq_end: u64,
    /// `seq_end` of the newest checkpoint both superblock slots point at. Until a commit
    /// writes both, a slot may still lead to the previous checkpoint (open falls back to it
    /// when the newest is damaged), so nothing its replay needs is freed: log segments are
    /// freed only behind this one.
    pub(crate) both_seq: u64,
    pub(crate) written_at_last: u64,
    /// Format 3: stamps for the pages of this epoch's checkpoints (unique per page write).
    pub(crate) stamps: Option<crate::meta::writer::Stamps>,
    /// Format 3: the pages of the newest checkpoint, for the next to write only what changed
    /// (`None` after an open or a failed checkpoint: the next writes everything).
    pub(crate) paged: Option<paged::PagedState>,
    /// Format 3: which metadata segments the retained checkpoints use (instead of `segments`
    /// and `prev_segments`, which only the checkpoint an open read fills).
    pub(crate) meta: crate::meta::segs::MetaSegs,
    /// Segments an open set aside for its recovery checkpoint (allocated in the backing
    /// files), taken before any other; what it does not use is freed after it.
    pub(crate) set_aside: Vec<u32>,
}

/// Takes checkpoints: owns the checkpoint state and the superblocks, and pauses the workers
/// to take an image.
pub(crate) struct Checkpointer {
    pub(crate) ctx: Arc<Context>,
    pub(crate) workers: Arc<Workers>,
    pub(crate) state: Mutex<CkptState>,
    pub(crate) superblocks: Vec<Superblock>,
    /// When the last checkpoint was committed (ms since `started`).
    pub(crate) at_ms: AtomicU64,
    /// RAM the format 3 page state holds (`PagedState::ram_bytes`), for stats without
    /// waiting for the state's lock, which a checkpoint holds while it writes.
    pub(crate) pages_ram: AtomicU64,
    /// The pool is closing: its last checkpoint saves the dedup index whatever its age.
    pub(crate) closing: std::sync::atomic::AtomicBool,
    pub(crate) started: Instant,
}

/// A change made while every shard is paused for a checkpoint (volume create, delete, resize).
pub(crate) type Mutate<'a> = &'a mut dyn FnMut(&Context, u64) -> Result<()>;

impl Checkpointer {
    pub(crate) fn new(
        ctx: Arc<Context>,
        workers: Arc<Workers>,
        state: CkptState,
        superblocks: Vec<Superblock>,
    ) -> Checkpointer {
        Checkpointer {
            ctx,
            workers,
            state: Mutex::new(state),
            superblocks,
            at_ms: AtomicU64::new(0),
            pages_ram: AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// Make every completed write durable, on this thread: the cleaner's flush. Writes
    /// acknowledged early and not yet stored are not waited for (the shards may be waiting for
    /// the space the cleaner is about to free).
    pub(crate) fn sync_completed(&self) -> Result<()> {
        let applied: Vec<u64> = self
            .ctx
            .shard_stats
            .iter()
            .map(|s| s.applied_shard_seq.load(Ordering::Acquire))
            .collect();
        // A failed record left a gap in a chain: only a checkpoint makes what follows it
        // recoverable, so a flush must wait for one.
        let r = if self.ctx.health.is_faulted() {
            Err(self.ctx.health.halted())
        } else if self.ctx.chain_broken.load(Ordering::Acquire) {
            self.checkpoint_with(None)
        } else {
            self.ctx.sync()
        };
        if r.is_ok() {
            for (s, a) in self.ctx.shard_stats.iter().zip(applied) {
                s.durable_shard_seq.fetch_max(a, Ordering::AcqRel);
            }
        }
        r
    }

    /// Take a checkpoint. `mutate` runs while every shard is paused, before the snapshot, with
    /// the sequence number that the checkpoint will cover (volume create, delete, resize).
    pub(crate) fn checkpoint_with(&self, mutate: Option<Mutate<'_>>) -> Result<()> {
        if self.ctx.read_only {
            return Err(Error::ReadOnly("the pool (opened read-only)".into()));
        }
        let r = self.checkpoint_with_inner(mutate);
        // Segments the commit freed go back to the file system now, outside the checkpoint
        // lock (a punch waits for every direct write in flight to the file).
        self.ctx.give_back_freed();
        self.ctx.top_up_backed();
        r
    }

    pub(crate) fn checkpoint_with_inner(&self, mutate: Option<Mutate<'_>>) -> Result<()> {
        let starved = self.checkpoint_once(mutate)?;
        // A shard that found no free segment at the pause kept appending to its open segment
        // with no next one; if this checkpoint freed segments, a second one gives it a fresh
        // chain, so writes succeed again right away instead of failing until the next kick.
        if starved {
            let reserve = self.ctx.reserve_segments();
            let free = self.ctx.space.lock().free_segments;
            // The change is committed already: a failure here is not the caller's (the chain
            // stays as it is and the next checkpoint tries again).
            if free > reserve + 1 {
                if let Err(e) = self.checkpoint_once(None) {
                    tracing::error!(
                        target: "ingot_engine::checkpoint",
                        error = %e,
                        "checkpoint for a new chain failed"
                    );
                }
            }
        }
        Ok(())
    }

    /// One checkpoint; returns whether a shard was left without a next segment.
    pub(crate) fn checkpoint_once(&self, mutate: Option<Mutate<'_>>) -> Result<bool> {
        if self.ctx.health.is_faulted() {
            return Err(self.ctx.health.halted());
        }
        let mut ck = self.state.lock();
        let paused_at = std::time::Instant::now();
        let mut replies = Vec::new();
        let mut resumes = Vec::new();
        let mut positions = vec![None; self.ctx.chains()];
        for i in 0..self.ctx.chains() {
            let (rtx, rrx) = crossbeam_channel::bounded::<()>(1);
            let (one_tx, one_rx) = crossbeam_channel::bounded(1);
            // A change to the volumes waits for what the workers were sent before it; a plain
            // checkpoint overtakes it.
            let posted = if mutate.is_some() {
                let pause = ShardMsg::Pause {
                    paused: one_tx,
                    resume: rrx,
                };
                self.workers.post(i, pause)
            } else {
                let pause = UrgentPause {
                    paused: one_tx,
                    resume: rrx,
                };
                self.workers.post_urgent(i, pause)
            };
            if !posted {
                return Err(Error::ShutDown);
            }
            resumes.push(rtx);
            replies.push(one_rx);
        }
        // Every worker pauses at once; their answers are read in turn.
        let mut first_err = None;
        for (i, rx) in replies.into_iter().enumerate() {
            match rx.recv() {
                Ok(Ok(pos)) => positions[i] = Some(pos),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some(Error::ShutDown)),
            }
        }
        let seq_end = self.ctx.seq.load(Ordering::Acquire);
        let all_paused_us = paused_at.elapsed().as_micros() as u64;
        if let Some(e) = first_err {
            // Paused shards moved to new chains that only a checkpoint reaches.
            self.ctx.chain_broken.store(true, Ordering::Release);
            return Err(e);
        }
        let mutated = match mutate {
            Some(m) => m(&self.ctx, seq_end.saturating_sub(1)),
            None => Ok(()),
        };
        let positions: Vec<ShardPosition> = positions
            .into_iter()
            .map(|p| {
                p.unwrap_or(ShardPosition {
                    segment: NO_SEGMENT,
                    offset: 0,
                    next: NO_SEGMENT,
                    shard_seq: 0,
                    nonce: None,
                })
            })
            .collect();
        let starved = positions.iter().any(|p| p.next == NO_SEGMENT);
        let mut image = self.snapshot(seq_end, positions);
        self.ctx.chain_broken.store(false, Ordering::Release);
        drop(resumes);
        let paused_us = paused_at.elapsed().as_micros() as u64;
        self.add_index(&mut image);
        tracing::debug!(
            target: "ingot_engine::checkpoint",
            paused_us,
            // Of which waiting for every worker to stop (its queue and records in flight).
            stopping_us = all_paused_us,
            // Then the dedup index's copy for the image.
            index_us = paused_at.elapsed().as_micros() as u64 - paused_us,
            "workers paused for the image"
        );
        // Commit even when the mutation was refused (volume exists, not found): the shards
        // have restarted their chains, possibly in segments only this checkpoint reaches, and a
        // broken chain was just marked repaired.
        if let Err(e) = self.commit(&mut ck, &image) {
            self.ctx.chain_broken.store(true, Ordering::Release);
            return Err(e);
        }
        mutated?;
        Ok(starved)
    }
}
