//! The per-connection budget of bytes in flight.

use parking_lot::{Condvar, Mutex};

/// Budget of bytes in flight on one connection (payloads of requests not yet replied to).
pub(crate) struct Credit {
    used: Mutex<u64>,
    cv: Condvar,
    max: u64,
}

impl Credit {
    pub fn new(max: u64) -> Self {
        Credit {
            used: Mutex::new(0),
            cv: Condvar::new(),
            max: max.max(1),
        }
    }

    /// Wait until `n` bytes (at most the whole budget) fit; returns what was charged.
    pub fn acquire(&self, n: u64) -> u64 {
        let n = n.min(self.max);
        let mut used = self.used.lock();
        while used.saturating_add(n) > self.max {
            self.cv.wait(&mut used);
        }
        *used += n;
        n
    }

    /// Whether [`Credit::acquire`] of `n` bytes would wait now.
    pub fn would_wait(&self, n: u64) -> bool {
        self.used.lock().saturating_add(n.min(self.max)) > self.max
    }

    pub fn used(&self) -> u64 {
        *self.used.lock()
    }

    pub fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut used = self.used.lock();
        *used = used.saturating_sub(n);
        self.cv.notify_all();
    }
}
