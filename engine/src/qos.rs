//! Per-volume QoS: an IOPS and a bytes/s token bucket at the engine's admission
//! ([`crate::Volume::submit`]), so NBD and iSCSI are limited alike.
//!
//! Costs: reads, writes, write-zeroes and trims take one IOPS token; reads and writes also take
//! `len` byte tokens (zeroes and trims move no data, so they cost no bandwidth); flushes are
//! free. A request takes its tokens at once, going into debt when they are short, and its
//! submitter sleeps until the debt would be paid back: a request larger than the burst passes
//! (after waiting for its size), and concurrent submitters are served in the order they
//! reserved. The sleep is on the submitting thread (a connection's reader), so it is
//! backpressure on that connection alone; engine threads never sleep (they take the tokens and
//! go on).
//!
//! An unlimited volume pays one relaxed atomic load per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Nanoseconds per second: token amounts are kept in token-nanoseconds, so that refills at any
/// rate stay exact in integers.
const NS: u128 = 1_000_000_000;

/// A volume's limits; 0 means none. Bursts of 0 mean one second's worth of the rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QosLimits {
    /// Requests per second (reads, writes, zeroes, trims).
    pub iops_limit: u64,
    /// Bytes read or written per second.
    pub bandwidth_limit_bytes: u64,
    /// Requests that may pass at once after an idle spell (0: `iops_limit`).
    pub burst_iops: u64,
    /// Bytes that may pass at once after an idle spell (0: `bandwidth_limit_bytes`).
    pub burst_bytes: u64,
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        self.iops_limit == 0 && self.bandwidth_limit_bytes == 0
    }

    /// These limits with the given fields replaced (`None`: unchanged).
    pub fn with(self, change: &QosChange) -> QosLimits {
        QosLimits {
            iops_limit: change.iops_limit.unwrap_or(self.iops_limit),
            bandwidth_limit_bytes: change
                .bandwidth_limit_bytes
                .unwrap_or(self.bandwidth_limit_bytes),
            burst_iops: change.burst_iops.unwrap_or(self.burst_iops),
            burst_bytes: change.burst_bytes.unwrap_or(self.burst_bytes),
        }
    }
}

/// A change to a volume's limits: `Some(0)` removes a limit (or restores a default burst),
/// `None` keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosChange {
    #[serde(default)]
    pub iops_limit: Option<u64>,
    #[serde(default)]
    pub bandwidth_limit_bytes: Option<u64>,
    #[serde(default)]
    pub burst_iops: Option<u64>,
    #[serde(default)]
    pub burst_bytes: Option<u64>,
}

impl QosChange {
    pub fn is_empty(&self) -> bool {
        *self == QosChange::default()
    }
}

/// One token bucket. `tokens` is in token-nanoseconds and may be negative (debt).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens per second; 0 = unlimited.
    rate: u64,
    /// Largest balance, in token-nanoseconds.
    cap: i128,
    tokens: i128,
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Bucket {
        let burst = if burst == 0 { rate } else { burst };
        let cap = i128::try_from(u128::from(burst) * NS).unwrap_or(i128::MAX);
        Bucket {
            rate,
            cap,
            tokens: cap,
        }
    }

    fn refill(&mut self, elapsed_ns: u64) {
        if self.rate > 0 {
            let add = i128::from(elapsed_ns) * i128::from(self.rate);
            self.tokens = self.tokens.saturating_add(add).min(self.cap);
        }
    }

    /// Take `cost` tokens; how long (ns) until the balance is back to zero.
    fn take(&mut self, cost: u64) -> u64 {
        if self.rate == 0 || cost == 0 {
            return 0;
        }
        self.tokens = self.tokens.saturating_sub(i128::from(cost) * NS as i128);
        if self.tokens >= 0 {
            0
        } else {
            // Debt / rate, rounded up.
            let ns = self.tokens.unsigned_abs().div_ceil(u128::from(self.rate));
            u64::try_from(ns).unwrap_or(u64::MAX)
        }
    }
}

#[derive(Debug)]
struct Buckets {
    limits: QosLimits,
    iops: Bucket,
    bytes: Bucket,
    /// Clock reading (ns) of the last refill.
    last_ns: u64,
}

impl Buckets {
    fn new(limits: QosLimits, now_ns: u64) -> Buckets {
        Buckets {
            limits,
            iops: Bucket::new(limits.iops_limit, limits.burst_iops),
            bytes: Bucket::new(limits.bandwidth_limit_bytes, limits.burst_bytes),
            last_ns: now_ns,
        }
    }
}

/// A volume's limiter: its limits, buckets and wait counters.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// Some limit is set: the only thing an unlimited volume's request reads.
    active: AtomicBool,
    buckets: Mutex<Buckets>,
    /// Time requests slept for the limiter.
    waited_ns: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            active: AtomicBool::new(false),
            buckets: Mutex::new(Buckets::new(QosLimits::default(), 0)),
            waited_ns: AtomicU64::new(0),
        }
    }
}

/// Monotonic nanoseconds since the first call in this process.
pub(crate) fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Limiter {
    pub fn limits(&self) -> QosLimits {
        self.buckets.lock().limits
    }

    /// Replace the limits; the buckets start full.
    pub fn set(&self, limits: QosLimits) {
        self.set_at(limits, now_ns());
    }

    fn set_at(&self, limits: QosLimits, now: u64) {
        let mut b = self.buckets.lock();
        *b = Buckets::new(limits, now);
        self.active.store(!limits.is_unlimited(), Ordering::Release);
    }

    /// Whether requests of this volume go through the buckets at all.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Reserve one request of `bytes` at clock `now`: how long its submitter should wait (ns).
    fn reserve_at(&self, bytes: u64, now: u64) -> u64 {
        let mut b = self.buckets.lock();
        let elapsed = now.saturating_sub(b.last_ns);
        b.last_ns = b.last_ns.max(now);
        b.iops.refill(elapsed);
        b.bytes.refill(elapsed);
        let a = b.iops.take(1);
        let c = b.bytes.take(bytes);
        a.max(c)
    }

    /// Admit one request of `bytes` (0 for zeroes and trims): sleeps on this thread while the
    /// volume is over its limits, unless `may_sleep` is false (an engine thread).
    pub fn admit(&self, bytes: u64, may_sleep: bool) {
        let wait = self.reserve_at(bytes, now_ns());
        if wait > 0 && may_sleep {
            std::thread::sleep(Duration::from_nanos(wait));
            self.waited_ns.fetch_add(wait, Ordering::Relaxed);
        }
    }

    /// Total time requests waited for this limiter, in ns.
    pub fn waited_ns(&self) -> u64 {
        self.waited_ns.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limiter(l: QosLimits) -> Limiter {
        let q = Limiter::default();
        q.set_at(l, 0);
        q
    }

    #[test]
    fn unlimited_is_inactive_and_free() {
        let q = limiter(QosLimits::default());
        assert!(!q.active());
        assert_eq!(q.reserve_at(1 << 30, 0), 0);
    }

    #[test]
    fn iops_burst_then_rate() {
        // 100 IOPS, default burst: 100 requests pass at once, the 101st waits 10 ms.
        let q = limiter(QosLimits {
            iops_limit: 100,
            ..QosLimits::default()
        });
        assert!(q.active());
        for _ in 0..100 {
            assert_eq!(q.reserve_at(4096, 0), 0);
        }
        assert_eq!(q.reserve_at(4096, 0), SEC / 100);
        // Each further request waits one more interval (queued behind the earlier ones).
        assert_eq!(q.reserve_at(4096, 0), 2 * SEC / 100);
        // After a second the debt is paid and 98 tokens are back (100 refilled, 2 owed).
        for _ in 0..98 {
            assert_eq!(q.reserve_at(4096, SEC), 0);
        }
        assert_eq!(q.reserve_at(4096, SEC), SEC / 100);
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let q = limiter(QosLimits {
            iops_limit: 10,
            burst_iops: 2,
            ..QosLimits::default()
        });
        assert_eq!(q.reserve_at(0, 0), 0);
        assert_eq!(q.reserve_at(0, 0), 0);
        assert_eq!(q.reserve_at(0, 0), SEC / 10);
        // An hour idle: still only two at once.
        let t = 3600 * SEC;
        assert_eq!(q.reserve_at(0, t), 0);
        assert_eq!(q.reserve_at(0, t), 0);
        assert_eq!(q.reserve_at(0, t), SEC / 10);
    }

    #[test]
    fn bandwidth_counts_bytes_and_huge_requests_take_a_debt() {
        // 1 MiB/s, 64 KiB burst: a 4 MiB request passes, its submitter waits for its size
        // beyond the burst, and the next one waits behind it.
        let q = limiter(QosLimits {
            bandwidth_limit_bytes: 1 << 20,
            burst_bytes: 64 << 10,
            ..QosLimits::default()
        });
        let w = q.reserve_at(4 << 20, 0);
        assert_eq!(w, ((4 << 20) - (64 << 10)) * SEC / (1 << 20));
        let w2 = q.reserve_at(64 << 10, 0);
        assert_eq!(w2, (4 << 20) * SEC / (1 << 20));
        // Zero-length costs (trims, zeroes) take no bandwidth.
        assert_eq!(q.reserve_at(0, 5 * SEC), 0);
    }

    #[test]
    fn the_slower_bucket_decides() {
        let q = limiter(QosLimits {
            iops_limit: 1000,
            bandwidth_limit_bytes: 1 << 20,
            burst_iops: 1,
            burst_bytes: 1,
        });
        // 64 KiB at 1 MiB/s: 1/16 s, longer than the 1 ms of the IOPS bucket.
        assert_eq!(q.reserve_at(1, 0), 0);
        assert_eq!(q.reserve_at(64 << 10, 0), (64 << 10) * SEC / (1 << 20));
    }

    #[test]
    fn setting_limits_again_refills_and_zero_turns_them_off() {
        let q = limiter(QosLimits {
            iops_limit: 1,
            ..QosLimits::default()
        });
        assert_eq!(q.reserve_at(0, 0), 0);
        assert_eq!(q.reserve_at(0, 0), SEC);
        q.set_at(
            q.limits().with(&QosChange {
                iops_limit: Some(0),
                ..QosChange::default()
            }),
            0,
        );
        assert!(!q.active());
        assert_eq!(q.reserve_at(0, 0), 0);
    }

    #[test]
    fn a_clock_going_back_is_ignored() {
        let q = limiter(QosLimits {
            iops_limit: 1,
            ..QosLimits::default()
        });
        assert_eq!(q.reserve_at(0, 10 * SEC), 0);
        assert_eq!(q.reserve_at(0, 5 * SEC), SEC);
    }
}
