//! Whether the pool still takes requests (closed, or halted after an internal failure), and
//! the doorbell that wakes the background threads.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::error::Error;

/// End of the reason a shard records as it unwinds, before its supervisor knows why.
pub(crate) const FAULT_PLACEHOLDER: &str = "(see the log for the message)";

#[derive(Default)]
pub(crate) struct Health {
    closed: AtomicBool,
    /// Why the pool stopped taking requests (an engine thread panicked), once it has.
    fault: Mutex<Option<String>>,
    faulted: AtomicBool,
}

impl Health {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Whether an engine thread failed and the pool stopped taking requests.
    pub(crate) fn is_faulted(&self) -> bool {
        self.faulted.load(Ordering::Acquire)
    }

    /// Why the pool stopped, once it has.
    pub(crate) fn reason(&self) -> Option<String> {
        self.fault.lock().clone()
    }

    /// The error every request gets once the pool is faulted.
    pub(crate) fn halted(&self) -> Error {
        Error::Halted {
            reason: self.reason().unwrap_or_else(|| "unknown".into()),
        }
    }

    /// Stop taking requests: an engine thread failed, so its in-memory state (maps, chains,
    /// space accounting) can no longer be trusted. Requests in flight are answered with an
    /// error (see `Job`'s drop); no checkpoint is written from here on, so the next open
    /// recovers from the last good checkpoint and the log, as after a crash.
    pub(crate) fn set_fault(&self, reason: String) {
        let mut f = self.fault.lock();
        // The first reason stays, unless it was the placeholder a shard leaves as it unwinds
        // (its thread's supervisor then knows the panic's message).
        let print = f.as_ref().is_none_or(|r| r.ends_with(FAULT_PLACEHOLDER));
        if print {
            *f = Some(reason.clone());
        }
        // Before logging: stderr may block, and nothing may pass for durable meanwhile.
        self.faulted.store(true, Ordering::Release);
        drop(f);
        if print {
            tracing::error!(target: "ingot_engine::pool", %reason, "pool stopped");
        }
    }
}

/// What the background thread is woken for.
pub(crate) enum WakeMsg {
    /// Take a checkpoint now (a shard needs a fresh chain, or a test asked).
    Kick,
    /// Writes are waiting for space: clean now.
    Space,
    Stop,
}

/// The background thread's doorbell.
pub(crate) struct Wake {
    tx: Sender<WakeMsg>,
    /// A checkpoint was asked for. The channel holds one message, so a `Kick` sent while a
    /// `Space` waits there would be lost: a mover chain left without a next segment then
    /// waited for a checkpoint nobody took, and writes at 90% full stalled for up to 30 s.
    ckpt_wanted: AtomicBool,
}

impl Wake {
    pub(crate) fn new(tx: Sender<WakeMsg>) -> Wake {
        Wake {
            tx,
            ckpt_wanted: AtomicBool::new(false),
        }
    }

    pub(crate) fn kick_checkpoint(&self) {
        self.ckpt_wanted.store(true, Ordering::Release);
        let _ = self.tx.try_send(WakeMsg::Kick);
    }

    /// Have the checkpointer look at its triggers now, rather than at its next look (up to
    /// 500 ms away), without asking for a checkpoint itself.
    pub(crate) fn nudge_checkpointer(&self) {
        let _ = self.tx.try_send(WakeMsg::Space);
    }

    /// Wake the cleaner: a write is waiting for free segments.
    pub(crate) fn kick_cleaner(&self) {
        let _ = self.tx.try_send(WakeMsg::Space);
    }

    /// Whether a checkpoint was asked for since the last call.
    pub(crate) fn take_checkpoint_wanted(&self) -> bool {
        self.ckpt_wanted.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn stop(&self) {
        let _ = self.tx.send(WakeMsg::Stop);
    }
}
