//! One owner at a time for a named pool in RADOS: a lease object changed only by
//! compare-and-swap, and a log of write-once objects numbered contiguously
//! (`docs/design/ceph-fencing.md`, section 2c, measured on Ceph 16).
//!
//! - `NAME.lease` carries the owner's epoch (xattr `ingot.epoch`, 20 decimal digits) and who
//!   holds it (`ingot.owner`). Its data is a renewal count: each renewal rewrites it under
//!   "epoch still E". A node that wants the pool waits until epoch and count stood still for
//!   a whole lease period by its own clock, or is told the owner is
//!   gone (`Takeover::Now`), then swaps the epoch to E + 1 (compare-and-swap: of two nodes
//!   racing, one wins).
//! - `NAME.log.<16 hex digits>` are log objects, each created exclusively, with the writer's
//!   epoch in an xattr. A new owner seals the log: it creates a seal object at the first free
//!   number, walking past any its predecessor managed to add. From then on every append of
//!   the previous owner finds its number taken (`EEXIST`): it cannot overwrite or extend what
//!   the new owner serves, and learns that it is deposed. The log starts at its *head*
//!   (`ingot.head` on the lease object, 0 until an owner raises it): objects before the head
//!   may be deleted, and the log's end is searched from there.
//! - An owner stops serving, reads included, once its last renewal is older than the lease
//!   period less a margin by its own clock ([`Lease::valid`]): a paused owner must not hand out
//!   blocks another node may have changed since. The new owner also blocklists the previous
//!   owner's RADOS client (best effort: it fails operations already in flight), though the
//!   fence itself is the epoch and the write-once log.

use std::time::{Duration, Instant};

use crate::{Error, Pool, Result, Step};

const EPOCH: &str = "ingot.epoch";
const OWNER: &str = "ingot.owner";
/// The renewal count, as in the data, where a takeover can compare it.
const COUNT: &str = "ingot.count";
/// Set on a seal object: the epoch whose owner sealed the log there.
const SEAL: &str = "ingot.seal";
/// The log's first number still kept (objects before it may be deleted): set by the owner
/// under "the epoch is still mine", only ever raised.
const HEAD: &str = "ingot.head";

/// How a node that finds the lease held takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Once the holder stopped renewing for a whole lease period.
    Wait,
    /// At once: the operator knows the holder is gone (or fenced it).
    Now,
}

#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// How long a holder's lease lasts after it starts a renewal.
    pub period: Duration,
    /// What a holder takes off its lease for clock drift and the renewal's own latency.
    pub margin: Duration,
    /// How long blocklisting lasts (seconds).
    pub blocklist_secs: u32,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            period: Duration::from_secs(15),
            margin: Duration::from_secs(3),
            blocklist_secs: 3600,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another node holds the lease now (it took it, or won a race for it).
    #[error("pool {name} was taken by epoch {epoch} ({owner}): this node no longer owns it")]
    Deposed {
        name: String,
        epoch: u64,
        owner: String,
    },
    #[error("lease of {name}: {what}")]
    Corrupt { name: String, what: String },
    #[error(transparent)]
    Rados(#[from] Error),
}

/// What the lease object says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub epoch: u64,
    pub owner: String,
    /// The log's head: its first number still kept.
    pub head: u64,
}

fn epoch_text(e: u64) -> String {
    format!("{e:020}")
}

/// Read who holds the lease of `name`, and its renewal count (which, with the epoch, changes
/// at every renewal).
pub fn holder(pool: &Pool, name: &str) -> std::result::Result<Option<(Holder, u64)>, LeaseError> {
    let oid = lease_oid(name);
    let epoch = match pool.xattr(&oid, EPOCH) {
        Ok(e) => e,
        Err(e) if e.not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let owner = pool.xattr(&oid, OWNER)?;
    let renewals = match pool.xattr(&oid, COUNT) {
        Ok(c) => std::str::from_utf8(&c)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX),
        Err(e) if e.errno() == Some(libc::ENODATA) => u64::MAX,
        Err(e) => return Err(e.into()),
    };
    let epoch = std::str::from_utf8(&epoch)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| LeaseError::Corrupt {
            name: name.into(),
            what: "its epoch is not a number".into(),
        })?;
    let head = match pool.xattr(&oid, HEAD) {
        Ok(h) => std::str::from_utf8(&h)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| LeaseError::Corrupt {
                name: name.into(),
                what: "its log head is not a number".into(),
            })?,
        Err(e) if e.errno() == Some(libc::ENODATA) => 0,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((
        Holder {
            epoch,
            owner: String::from_utf8_lossy(&owner).into_owned(),
            head,
        },
        renewals,
    )))
}

pub fn lease_oid(name: &str) -> String {
    format!("{name}.lease")
}

pub fn log_oid(name: &str, n: u64) -> String {
    format!("{name}.log.{n:016x}")
}

/// A held lease.
pub struct Lease {
    pool: Pool,
    name: String,
    epoch: u64,
    opts: LeaseOptions,
    renewals: u64,
    /// When the last successful renewal (or the acquisition) started, on the boot clock
    /// ([`boot_now`]).
    renewed_at: Duration,
    /// The first log number after the seal this owner wrote.
    next_log: u64,
    /// Objects this owner appended after its seal.
    appended: u64,
    /// The log's head as this owner knows it (it alone may raise it).
    head: u64,
}

impl Lease {
    /// Take the lease of `name` as `owner` (who it is, for operators: host and process), then
    /// seal the log. `address`: this node's RADOS client address, recorded so that a later
    /// owner can blocklist it.
    pub fn acquire(
        pool: &Pool,
        name: &str,
        owner: &str,
        address: &str,
        how: Takeover,
        opts: LeaseOptions,
        cluster: Option<&crate::Cluster>,
    ) -> std::result::Result<Lease, LeaseError> {
        let oid = lease_oid(name);
        let me = format!("{owner} {address}");
        // The lease runs from the start of the operation that took it.
        let mut started = boot_now();
        let (epoch, previous) = match holder(pool, name)? {
            None => {
                // The first owner: an exclusive create, so that two first owners cannot both
                // believe they are.
                match pool.create_once(
                    &oid,
                    &0u64.to_le_bytes(),
                    &[
                        (EPOCH, epoch_text(1).as_bytes()),
                        (OWNER, me.as_bytes()),
                        (COUNT, epoch_text(0).as_bytes()),
                    ],
                ) {
                    Ok(()) => (1, None),
                    Err(e) if e.exists() => {
                        let h = holder(pool, name)?.map(|(h, _)| h);
                        return Err(deposed(name, h));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some((mut held, mut count)) => loop {
                let (h, c) = match how {
                    // A holder that released the lease (a clean stop) needs no wait.
                    _ if held.owner.is_empty() => (held.clone(), count),
                    Takeover::Now => (held.clone(), count),
                    Takeover::Wait => wait_expiry(pool, name, held.clone(), count, &opts)?,
                };
                let next = h.epoch + 1;
                started = boot_now();
                // The swap holds only if neither the epoch nor the renewal count moved since
                // they were last seen: a renewal landing after the waiter's last look would
                // otherwise leave its holder believing itself the owner for another period.
                let (epoch_was, count_was) = (epoch_text(h.epoch), epoch_text(c));
                let mut steps = vec![Step::XattrEquals {
                    name: EPOCH,
                    value: epoch_was.as_bytes(),
                }];
                // (A lease without a count, which no build writes, is swapped on its epoch.)
                if c != u64::MAX {
                    steps.push(Step::XattrEquals {
                        name: COUNT,
                        value: count_was.as_bytes(),
                    });
                }
                let r = pool.operate(
                    &oid,
                    &[
                        &steps[..],
                        &[
                            Step::WriteFull(&0u64.to_le_bytes()),
                            Step::SetXattr {
                                name: EPOCH,
                                value: epoch_text(next).as_bytes(),
                            },
                            Step::SetXattr {
                                name: OWNER,
                                value: me.as_bytes(),
                            },
                            Step::SetXattr {
                                name: COUNT,
                                value: epoch_text(0).as_bytes(),
                            },
                        ],
                    ]
                    .concat(),
                );
                match r {
                    Ok(()) => break (next, Some(h)),
                    Err(e) if e.lost_race() => match holder(pool, name)? {
                        // Renewed meanwhile under the same epoch: the holder lives; wait
                        // again (or, told it is gone, swap against what it is now).
                        Some((now, c2)) if now.epoch == h.epoch => {
                            held = now;
                            count = c2;
                        }
                        other => return Err(deposed(name, other.map(|(h, _)| h))),
                    },
                    Err(e) => return Err(e.into()),
                }
            },
        };
        // Fence the previous owner's client: whatever it still has in flight fails. Best
        // effort (it may be gone, or this user may lack the cap): the seal below is the fence.
        if let (Some(prev), Some(c)) = (&previous, cluster) {
            if let Some(addr) = prev.owner.rsplit(' ').next().filter(|a| a.contains('/')) {
                if addr != address {
                    let _ = c.blocklist(addr, opts.blocklist_secs);
                }
            }
        }
        let mut lease = Lease {
            pool: pool.clone(),
            name: name.into(),
            epoch,
            opts,
            renewals: 0,
            renewed_at: started,
            next_log: 0,
            appended: 0,
            head: 0,
        };
        // The head as it is now that the epoch is ours: no earlier owner can raise it any
        // more (one read before the swap could be older, and the log may no longer start
        // there).
        lease.head = match holder(pool, name)? {
            Some((h, _)) if h.epoch == epoch => h.head,
            other => return Err(deposed(name, other.map(|(h, _)| h))),
        };
        lease.seal()?;
        Ok(lease)
    }

    /// Write the seal at the first free log number.
    fn seal(&mut self) -> std::result::Result<(), LeaseError> {
        let mut n = first_free(&self.pool, &self.name, self.head)?;
        loop {
            match self.pool.create_once(
                &log_oid(&self.name, n),
                &[],
                &[
                    (EPOCH, epoch_text(self.epoch).as_bytes()),
                    (SEAL, epoch_text(self.epoch).as_bytes()),
                ],
            ) {
                Ok(()) => {
                    self.next_log = n + 1;
                    return Ok(());
                }
                // The previous owner (or a racing one) took this number meanwhile: it is
                // part of the log; seal after it.
                Err(e) if e.exists() => n += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When this node stops acting as the owner unless it renews first (see
    /// [`Lease::valid`]), on the boot clock ([`boot_now`]).
    pub fn valid_until(&self) -> Duration {
        self.renewed_at + self.opts.period.saturating_sub(self.opts.margin)
    }

    /// The log number of this owner's seal.
    pub fn sealed_at(&self) -> u64 {
        self.next_log - self.appended - 1
    }

    /// Give the lease up (a clean stop): the next node takes it without waiting for it to run
    /// out. The epoch stays; this node must not write again.
    pub fn release(self) -> std::result::Result<(), LeaseError> {
        self.swap_count(self.renewals + 1, true)
    }

    /// Set the renewal count to `count` under "the epoch is still mine" (and, giving the
    /// lease up, clear the owner).
    fn swap_count(&self, count: u64, release: bool) -> std::result::Result<(), LeaseError> {
        let (epoch, count_text, bytes) = (
            epoch_text(self.epoch),
            epoch_text(count),
            count.to_le_bytes(),
        );
        let mut steps = vec![
            Step::XattrEquals {
                name: EPOCH,
                value: epoch.as_bytes(),
            },
            Step::WriteFull(&bytes),
            Step::SetXattr {
                name: COUNT,
                value: count_text.as_bytes(),
            },
        ];
        if release {
            steps.push(Step::SetXattr {
                name: OWNER,
                value: b"",
            });
        }
        match self.pool.operate(&lease_oid(&self.name), &steps) {
            Ok(()) => Ok(()),
            Err(e) if e.lost_race() || e.not_found() => Err(self.taken()),
            Err(e) => Err(e.into()),
        }
    }

    /// The next log number this owner appends at.
    pub fn next_log(&self) -> u64 {
        self.next_log
    }

    /// The log's first number still kept.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Raise the log's head to `n` (at most this owner's next number), under "the epoch is
    /// still mine": objects before it may be deleted once this returns.
    pub fn set_head(&mut self, n: u64) -> std::result::Result<(), LeaseError> {
        if n <= self.head {
            return Ok(());
        }
        if n > self.next_log {
            return Err(LeaseError::Corrupt {
                name: self.name.clone(),
                what: format!("a head ({n}) past the log's end ({})", self.next_log),
            });
        }
        if !self.valid() {
            return Err(self.lapsed());
        }
        let (epoch, head) = (epoch_text(self.epoch), epoch_text(n));
        match self.pool.operate(
            &lease_oid(&self.name),
            &[
                Step::XattrEquals {
                    name: EPOCH,
                    value: epoch.as_bytes(),
                },
                Step::SetXattr {
                    name: HEAD,
                    value: head.as_bytes(),
                },
            ],
        ) {
            Ok(()) => {
                self.head = n;
                Ok(())
            }
            Err(e) if e.lost_race() || e.not_found() => Err(self.taken()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether this node may still act as the owner by its own clock: its last renewal
    /// started less than the lease period, less the margin, ago.
    pub fn valid(&self) -> bool {
        boot_now().saturating_sub(self.renewed_at) + self.opts.margin < self.opts.period
    }

    /// Renew: count one more renewal, under "the epoch is still mine".
    pub fn renew(&mut self) -> std::result::Result<(), LeaseError> {
        // Past its end by this node's clock another node may hold the pool already: a renewal
        // that succeeded now would make this one act as an owner again.
        if !self.valid() {
            return Err(self.lapsed());
        }
        let started = boot_now();
        let count = self.renewals + 1;
        self.swap_count(count, false)?;
        self.renewals = count;
        self.renewed_at = started;
        Ok(())
    }

    /// Append `data` as the next log object. A number already taken means another node
    /// sealed the log: this one is deposed and must stop.
    pub fn append(&mut self, data: &[u8]) -> std::result::Result<u64, LeaseError> {
        if !self.valid() {
            return Err(self.lapsed());
        }
        let n = self.next_log;
        match self.pool.create_once(
            &log_oid(&self.name, n),
            data,
            &[(EPOCH, epoch_text(self.epoch).as_bytes())],
        ) {
            Ok(()) => {
                self.next_log = n + 1;
                self.appended += 1;
                Ok(n)
            }
            Err(e) if e.exists() => Err(self.taken()),
            Err(e) => Err(e.into()),
        }
    }

    /// Why this node may not act after its lease ran out: who holds it now, if another node
    /// took it.
    fn lapsed(&self) -> LeaseError {
        deposed(
            &self.name,
            self.holder_now().filter(|h| h.epoch != self.epoch),
        )
    }

    /// Another node took the lease: who holds it now.
    fn taken(&self) -> LeaseError {
        deposed(&self.name, self.holder_now())
    }

    fn holder_now(&self) -> Option<Holder> {
        holder(&self.pool, &self.name)
            .ok()
            .flatten()
            .map(|(h, _)| h)
    }
}

/// Time since boot, suspends included (`CLOCK_BOOTTIME`). A holder measures its lease on it:
/// `CLOCK_MONOTONIC` stops while a machine (or a VM, by its hypervisor) is suspended, and a
/// resumed holder would believe its lease still ran. A waiter may use either: a clock that
/// stops only makes it wait longer.
pub fn boot_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        // Not on this kernel (before 2.6.39): the monotonic clock, as before.
        // SAFETY: as above.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn deposed(name: &str, h: Option<Holder>) -> LeaseError {
    let h = h.unwrap_or(Holder {
        epoch: 0,
        owner: "(unknown: the lease ran out by this node's clock)".into(),
        head: 0,
    });
    LeaseError::Deposed {
        name: name.into(),
        epoch: h.epoch,
        owner: h.owner,
    }
}

/// Wait until the lease's epoch and renewal count stood still for a whole period (the holder
/// stopped renewing), measured from when this node first saw them.
fn wait_expiry(
    pool: &Pool,
    name: &str,
    mut held: Holder,
    mut count: u64,
    opts: &LeaseOptions,
) -> std::result::Result<(Holder, u64), LeaseError> {
    let mut since = Instant::now();
    let step = (opts.period / 8).max(Duration::from_millis(50));
    loop {
        if since.elapsed() >= opts.period {
            return Ok((held, count));
        }
        std::thread::sleep(step.min(opts.period.saturating_sub(since.elapsed())));
        match holder(pool, name)? {
            Some((h, v)) if v == count && h == held => {}
            Some((h, v)) => {
                held = h;
                count = v;
                since = Instant::now();
            }
            None => {
                return Err(LeaseError::Corrupt {
                    name: name.into(),
                    what: "the lease object went away".into(),
                })
            }
        }
    }
}

/// The first log number with no object: log objects are contiguous from 0, so a doubling
/// probe and a binary search find it in O(log n) stats.
pub fn first_free(pool: &Pool, name: &str, head: u64) -> Result<u64> {
    let exists = |n: u64| -> Result<bool> {
        match pool.stat(&log_oid(name, n)) {
            Ok(_) => Ok(true),
            Err(e) if e.not_found() => Ok(false),
            Err(e) => Err(e),
        }
    };
    if !exists(head)? {
        return Ok(head);
    }
    let (mut lo, mut hi) = (head, head + 1);
    while exists(hi)? {
        lo = hi;
        hi = head + 2 * (hi - head);
    }
    // exists(lo), !exists(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

/// A log object as read back: its data, the epoch that wrote it, and whether it is a seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogObject {
    pub n: u64,
    pub epoch: u64,
    pub seal: bool,
    pub data: Vec<u8>,
}

/// The first `max` bytes of log object `n` of `name` in one read (`None` past the end): a
/// seal reads as empty, every other record the log's writers make has data. For walks of many
/// records, where [`read_log`]'s four operations per record cost the OSDs four times the work.
pub fn read_log_data(pool: &Pool, name: &str, n: u64, max: usize) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    match pool.read(&log_oid(name, n), 0, &mut buf) {
        Ok(got) => {
            buf.truncate(got);
            Ok(Some(buf))
        }
        Err(e) if e.not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Read log object `n` of `name` (`None` past the end).
pub fn read_log(pool: &Pool, name: &str, n: u64, max: usize) -> Result<Option<LogObject>> {
    let oid = log_oid(name, n);
    let epoch = match pool.xattr(&oid, EPOCH) {
        Ok(e) => e,
        Err(e) if e.not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let seal = match pool.xattr(&oid, SEAL) {
        Ok(_) => true,
        Err(e) if e.errno() == Some(libc::ENODATA) => false,
        Err(e) => return Err(e),
    };
    // (A read of no bytes is refused with ERANGE: `max` 0 asks for the header alone.)
    let data = if max == 0 {
        Vec::new()
    } else {
        pool.read_all(&oid, max)?
    };
    let epoch = std::str::from_utf8(&epoch)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Some(LogObject {
        n,
        epoch,
        seal,
        data,
    }))
}
