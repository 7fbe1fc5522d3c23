//! Moving gathered blocks through the mover's chain, and freeing victims once moves are durable.

use crate::gc::{Cleaner, GcReport, VictimMoves};

use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, Result};
use crate::job::Job;
use crate::shard::Relocation;
use crate::shard::ShardMsg;
use crate::space::SegState;

impl Cleaner {
    /// Free sealed segments that hold nothing live and lie before the last checkpoint (outside
    /// every replay chain), once the records that emptied them are durable. Cheaper than a
    /// checkpoint, which is the only other thing that frees them.
    pub(crate) fn free_dead_segments(&self) -> Result<u64> {
        let _one = self.lock.lock();
        let ckpt_seq = self.ckpt.state.lock().both_seq;
        // The candidates are chosen before the sync and the fences: a segment that dies after
        // them may still be under a read that looked its block up since (and the record that
        // emptied it may not be durable yet). It waits for the next call.
        let dead: Vec<u32> = {
            let space = self.ctx.space.lock();
            (0..space.seg_state.len())
                .filter(|&s| {
                    matches!(space.seg_state[s], SegState::Sealed { seq } if seq <= ckpt_seq)
                        && space.seg_live[s] == 0
                })
                .map(|s| s as u32)
                .collect()
        };
        if dead.is_empty() {
            return Ok(0);
        }
        self.ckpt.sync_completed()?;
        self.workers.fence()?;
        self.ctx.reads.fence();
        let ck = self.ckpt.state.lock();
        let mut space = self.ctx.space.lock();
        // A change that failed since the sync (its counts are off) frees nothing.
        if self.ctx.health.is_faulted() {
            return Err(self.ctx.health.halted());
        }
        let mut freed = Vec::new();
        for s in dead {
            // A dead segment stays dead; one the cleaner or a checkpoint took since is skipped.
            if matches!(space.seg_state[s as usize], SegState::Sealed { seq } if seq <= ckpt_seq)
                && space.seg_live[s as usize] == 0
            {
                space.set_state(s, SegState::Free);
                freed.push(s);
            }
        }
        self.ctx.note_freed(&mut space, &freed);
        drop(space);
        drop(ck);
        self.ctx.give_back_freed();
        Ok(freed.len() as u64)
    }

    /// Free the victims in `chunk` whose moves are durable now (after `finish_moves`): those
    /// sealed before the last checkpoint (`ckpt_seq`) are outside every replay chain, so once
    /// the moves are durable and no read of them is in flight they are free. The others are
    /// freed by a checkpoint (replay may still walk through them).
    pub(crate) fn free_moved(
        &self,
        chunk: &[VictimMoves<'_>],
        ckpt_seq: u64,
        report: &mut GcReport,
    ) -> Result<()> {
        // Chosen before the sync and the fences, as in `free_dead_segments`: only victims
        // already empty then.
        let old: Vec<u32> = {
            let space = self.ctx.space.lock();
            chunk
                .iter()
                .map(|&(&v, _)| v)
                .filter(|&v| matches!(space.seg_state[v as usize], SegState::Sealed { seq } if seq <= ckpt_seq))
                .filter(|&v| space.seg_live[v as usize] == 0)
                .collect()
        };
        if old.is_empty() {
            return Ok(());
        }
        self.ckpt.sync_completed()?;
        self.workers.fence()?;
        self.ctx.reads.fence();
        // The checkpoint lock keeps `check` (which reads by location) and a commit out.
        let ck = self.ckpt.state.lock();
        let mut space = self.ctx.space.lock();
        if self.ctx.health.is_faulted() {
            return Err(self.ctx.health.halted());
        }
        let mut freed = Vec::new();
        for &v in &old {
            if matches!(space.seg_state[v as usize], SegState::Sealed { .. })
                && space.seg_live[v as usize] == 0
            {
                space.set_state(v, SegState::Free);
                freed.push(v);
            }
        }
        self.ctx.note_freed(&mut space, &freed);
        drop(space);
        drop(ck);
        report.segments_freed += freed.len() as u64;
        self.ctx.give_back_freed();
        Ok(())
    }

    /// Send one victim's payloads to the mover, up to a record's worth of entries per
    /// message (`finish_moves` waits for them). Counts the jobs sent on `tx` in `sent`.
    pub(crate) fn evacuate(
        &self,
        mut payloads: Vec<Relocation>,
        report: &mut GcReport,
        tx: &Sender<Result<()>>,
        sent: &mut usize,
    ) {
        while !payloads.is_empty() {
            let mut entries = 0;
            let take = payloads
                .iter()
                .take_while(|r| {
                    entries += r.members.len();
                    entries <= crate::format::MAX_RECORD_ENTRIES
                })
                .count()
                .max(1);
            let moves: Vec<Relocation> = payloads.drain(..take).collect();
            report.bytes_moved += moves.iter().map(|m| m.data.len() as u64).sum::<u64>();
            self.send_moves(moves, tx);
            *sent += 1;
        }
    }

    pub(crate) fn send_moves(&self, moves: Vec<Relocation>, tx: &Sender<Result<()>>) {
        let tx = tx.clone();
        let job = Job::new(
            1,
            None,
            None,
            Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()));
            }),
            None,
        );
        self.workers
            .send(self.ctx.mover(), ShardMsg::Relocate { moves, job });
    }

    /// End a pass: wait for all `sent` move jobs to be written.
    pub(crate) fn finish_moves(&self, rx: &Receiver<Result<()>>, sent: usize) -> Result<()> {
        let mut first = Ok(());
        for _ in 0..sent {
            let r = rx.recv().map_err(|_| Error::ShutDown).and_then(|r| r);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
