//! Reads that run outside the shards (a front end's own queue, see `reader/`) hold a ticket from
//! the moment they look a block's location up until their device read completes: a segment
//! freed meanwhile could be written again under them, and the read would return another
//! block's bytes (or fail its checksum). Whoever frees segments fences first.
//!
//! The shards' own reads need no ticket: a checkpoint's pause drains them, and the cleaner's
//! `Fence` message waits for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Two counts of reads in flight, by the parity of the epoch they started in.
#[derive(Default)]
pub(crate) struct ReadFence {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    /// One fence at a time: each waits out the readers of the epoch it closes.
    fencing: Mutex<()>,
}

/// A reader's hold on the locations it looked up (`ReadFence::enter`); given back by `leave`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket(usize);

impl ReadFence {
    /// Before looking locations up.
    pub(crate) fn enter(&self) -> Ticket {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let slot = (e & 1) as usize;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            // A fence that began in between may have looked at the count before it rose: go
            // again under the new epoch, which that fence does not wait for (nothing was looked
            // up yet).
            if self.epoch.load(Ordering::SeqCst) == e {
                return Ticket(slot);
            }
            self.active[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// `n` more holds on `t` (one per device read that will `leave` it).
    pub(crate) fn add(&self, t: Ticket, n: u64) {
        if n > 0 {
            self.active[t.0].fetch_add(n, Ordering::SeqCst);
        }
    }

    pub(crate) fn leave(&self, t: Ticket) {
        self.active[t.0].fetch_sub(1, Ordering::SeqCst);
    }

    /// Wait until every read that looked up locations before this call has finished. Call it
    /// after the blocks of the segments to free are gone from the maps and the block table
    /// (moved or dead), before the segments are marked free. Never under the space lock
    /// (readers take it while they hold a ticket).
    pub(crate) fn fence(&self) {
        let _one = self.fencing.lock();
        let e = self.epoch.fetch_add(1, Ordering::SeqCst);
        let slot = (e & 1) as usize;
        while self.active[slot].load(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Reads holding tickets now (for tests).
    #[cfg(test)]
    pub(crate) fn holding(&self) -> u64 {
        self.active[0].load(Ordering::SeqCst) + self.active[1].load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A fence on another thread, and whether it has passed.
    fn fence_in_thread(f: &Arc<ReadFence>) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>) {
        let fenced = Arc::new(AtomicBool::new(false));
        let (f, done) = (f.clone(), fenced.clone());
        let t = std::thread::spawn(move || {
            f.fence();
            done.store(true, Ordering::SeqCst);
        });
        (t, fenced)
    }

    #[test]
    fn a_fence_waits_for_tickets_taken_before_it_and_not_after() {
        let f = Arc::new(ReadFence::default());
        let old = f.enter();
        let (t, fenced) = fence_in_thread(&f);
        std::thread::sleep(Duration::from_millis(20));
        // A ticket taken while the fence waits belongs to the next epoch.
        let new = f.enter();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !fenced.load(Ordering::SeqCst),
            "fence passed a ticket taken before it"
        );
        f.leave(old);
        t.join().unwrap();
        assert!(fenced.load(Ordering::SeqCst));
        assert_eq!(f.holding(), 1);
        f.leave(new);
        f.fence();
        assert_eq!(f.holding(), 0);
    }

    #[test]
    fn added_holds_are_waited_for_each() {
        let f = Arc::new(ReadFence::default());
        let t = f.enter();
        f.add(t, 2);
        f.leave(t);
        f.leave(t);
        let (h, fenced) = fence_in_thread(&f);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!fenced.load(Ordering::SeqCst));
        f.leave(t);
        h.join().unwrap();
    }
}
