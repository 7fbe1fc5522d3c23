//! The pool: opens and admits. It owns the devices, the volume table, the shard workers and
//! the background threads, and hands each subsystem the parts it needs.

mod admin;
mod create;
mod open;
mod options;
mod scrub;
mod stats;
mod threads;

pub(crate) use options::*;
pub use options::{CreateOptions, PoolOptions};
pub(crate) use threads::*;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::checkpoint::Checkpointer;
use crate::context::Context;
use crate::error::Result;
use crate::gc::Cleaner;
use crate::io::claim::DeviceClaim;
use crate::job::FlushMsg;
use crate::shard::Workers;

/// Name of the file in the pool directory that lists the devices.
pub const POOL_FILE: &str = "pool.json";

pub(crate) const LOCK_FILE: &str = "pool.lock";

/// An open pool's parts: the write path's shared state, the workers, the checkpointer and the
/// cleaner. Only the pool and its threads hold this; each subsystem gets the parts it needs.
pub(crate) struct Inner {
    pub(crate) ctx: Arc<Context>,
    pub(crate) workers: Arc<Workers>,
    pub(crate) ckpt: Arc<Checkpointer>,
    pub(crate) cleaner: Cleaner,
    pub(crate) cache_capacity: u64,
    pub(crate) checkpoint_interval: u64,
}

/// An open pool. Dropping it shuts it down cleanly (flush and checkpoint).
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) dir: PathBuf,
    pub(crate) _lock: File,
    /// The devices, locked against other pools while this one is open.
    pub(crate) _claim: DeviceClaim,
    pub(crate) halted: AtomicBool,
}

impl Pool {
    /// True when `dir` holds a pool.
    pub fn exists(dir: &Path) -> bool {
        dir.join(POOL_FILE).exists()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why the pool stopped taking requests (an engine thread failed), once it has.
    pub fn halted_reason(&self) -> Option<String> {
        self.inner.ctx.health.reason()
    }

    /// Block ids the block table holds (the highest handed out, plus one): tests check that
    /// ids are reused.
    #[cfg(any(test, feature = "testing"))]
    pub fn block_ids(&self) -> u64 {
        self.inner.ctx.space.lock().blocks.len() as u64
    }

    /// A 64 MiB pool of 2 MiB segments in `dir`, two shards, `cache_bytes` of block cache
    /// (the engine's own tests).
    #[cfg(test)]
    pub(crate) fn small_for_tests(dir: &Path, cache_bytes: Option<u64>) -> Pool {
        let o = PoolOptions {
            shards: 2,
            cache_bytes,
            ..Default::default()
        };
        let c = CreateOptions {
            size_bytes: 64 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        Pool::create(dir, &c, &o).unwrap()
    }

    /// Write a checkpoint now.
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.ckpt.checkpoint_with(None)
    }

    /// Make every completed write durable. Goes through the flusher like a volume's flush: a
    /// plain device sync would neither checkpoint past a failed record (the writes after it
    /// would stay unrecoverable) nor advance what later records declare flushed.
    pub fn flush(&self) -> Result<()> {
        self.inner.ctx.flush()
    }

    /// Hold the lock of the pool in `dir` (`pool.lock`, as an open pool does) without opening
    /// it: for work on its files that a running server must not see (a restore from a store).
    /// Fails with [`Error::Locked`] while another process holds it; released on drop.
    pub fn lock_dir(dir: &Path) -> Result<std::fs::File> {
        lock_dir(dir)
    }

    /// Flush, checkpoint and stop every thread. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        if self.halted.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if self.inner.ctx.health.is_faulted() {
            self.stop_threads();
            return Err(self.inner.ctx.health.halted());
        }
        if self.inner.ctx.read_only {
            self.stop_threads();
            return Ok(());
        }
        // Writes acknowledged early go into the final checkpoint, and the dedup index.
        self.inner.ckpt.closing.store(true, Ordering::Relaxed);
        let r = self
            .inner
            .workers
            .settle_writes(&self.inner.ctx)
            .and_then(|()| self.inner.ckpt.checkpoint_with(None));
        self.stop_threads();
        // A pool on a store: what the checkpoint's end and the stopping threads changed after
        // its last sync (freed segments given back, prewritten zeroes) goes too, so that the
        // store holds what the devices hold.
        let r = match r {
            Ok(()) if self.inner.ctx.replica.is_some() => self.inner.ctx.sync(),
            r => r,
        };
        if r.is_ok() && self.inner.ctx.health.is_faulted() {
            // Something failed as the threads stopped (an early write still waiting for space).
            return Err(self.inner.ctx.health.halted());
        }
        r
    }

    /// Stop every thread without a final flush or checkpoint, as a crash would (tests).
    #[doc(hidden)]
    pub fn halt(&self) {
        if self.halted.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_threads();
    }

    pub(crate) fn stop_threads(&self) {
        let ctx = &self.inner.ctx;
        ctx.health.close();
        self.inner.workers.stop();
        let _ = ctx.flusher.send(FlushMsg::Stop);
        ctx.wake.stop();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
