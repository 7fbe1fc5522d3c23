//! Checkpoints: an image of the maps, block table and segment usage written to metadata
//! segments, then the superblocks pointed at it.

mod commit;
mod image;

pub(crate) use image::*;

use crate::pool::Inner;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::format::NO_SEGMENT;
use crate::log::ShardPosition;
use crate::shard::ShardMsg;

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
}

/// A change made while every shard is paused for a checkpoint (volume create, delete, resize).
pub(crate) type Mutate<'a> = &'a mut dyn FnMut(&Inner, u64) -> Result<()>;

impl Inner {
    /// Take a checkpoint. `mutate` runs while every shard is paused, before the snapshot, with
    /// the sequence number that the checkpoint will cover (volume create, delete, resize).
    pub(crate) fn checkpoint_with(&self, mutate: Option<Mutate<'_>>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("the pool (opened read-only)".into()));
        }
        let r = self.checkpoint_with_inner(mutate);
        // Segments the commit freed go back to the file system now, outside the checkpoint
        // lock (a punch waits for every direct write in flight to the file).
        self.give_back_freed();
        self.top_up_backed();
        r
    }

    pub(crate) fn checkpoint_with_inner(&self, mutate: Option<Mutate<'_>>) -> Result<()> {
        let starved = self.checkpoint_once(mutate)?;
        // A shard that found no free segment at the pause kept appending to its open segment
        // with no next one; if this checkpoint freed segments, a second one gives it a fresh
        // chain, so writes succeed again right away instead of failing until the next kick.
        if starved {
            let reserve = self.reserve_segments();
            let free = self.space.lock().free_segments;
            // The change is committed already: a failure here is not the caller's (the chain
            // stays as it is and the next checkpoint tries again).
            if free > reserve + 1 {
                if let Err(e) = self.checkpoint_once(None) {
                    eprintln!("ingot: checkpoint for a new chain failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// One checkpoint; returns whether a shard was left without a next segment.
    pub(crate) fn checkpoint_once(&self, mutate: Option<Mutate<'_>>) -> Result<bool> {
        if self.is_faulted() {
            return Err(self.halted());
        }
        let mut ck = self.ckpt.lock();
        let paused_at = std::time::Instant::now();
        let (ptx, prx) = crossbeam_channel::unbounded();
        let mut resumes = Vec::new();
        let mut positions = vec![None; self.chains()];
        for (i, tx) in self.senders.iter().enumerate() {
            let (rtx, rrx) = crossbeam_channel::bounded::<()>(1);
            let (one_tx, one_rx) = crossbeam_channel::bounded(1);
            if tx
                .send(ShardMsg::Pause {
                    paused: one_tx,
                    resume: rrx,
                })
                .is_err()
            {
                return Err(Error::ShutDown);
            }
            resumes.push(rtx);
            let ptx = ptx.clone();
            // Collect replies tagged with the shard number.
            std::thread::spawn(move || {
                if let Ok(r) = one_rx.recv() {
                    let _ = ptx.send((i, r));
                }
            });
        }
        drop(ptx);
        let mut first_err = None;
        for _ in 0..self.chains() {
            match prx.recv() {
                Ok((i, Ok(pos))) => positions[i] = Some(pos),
                Ok((_, Err(e))) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some(Error::ShutDown)),
            }
        }
        let seq_end = self.seq.load(Ordering::Acquire);
        if let Some(e) = first_err {
            // Paused shards moved to new chains that only a checkpoint reaches.
            self.chain_broken.store(true, Ordering::Release);
            return Err(e);
        }
        let mutated = match mutate {
            Some(m) => m(self, seq_end.saturating_sub(1)),
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
        let (image, live_then) = self.snapshot(seq_end, positions);
        self.chain_broken.store(false, Ordering::Release);
        drop(resumes);
        if std::env::var_os("INGOT_GC_DEBUG").is_some() {
            eprintln!("checkpoint: shards paused {:?}", paused_at.elapsed());
        }
        // Commit even when the mutation was refused (volume exists, not found): the shards
        // have restarted their chains, possibly in segments only this checkpoint reaches, and a
        // broken chain was just marked repaired.
        if let Err(e) = self.commit(&mut ck, &image, &live_then) {
            self.chain_broken.store(true, Ordering::Release);
            return Err(e);
        }
        mutated?;
        Ok(starved)
    }
}
