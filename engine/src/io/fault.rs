//! Fault-injecting devices for tests: fail chosen writes or reads, corrupt reads, and simulate a
//! power cut by undoing (or tearing) every write that no `sync` has made durable.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{AlignedBuf, Devices, Doorbell, IoDone, IoOp, IoQueue, OpKind, SharedDevices};

/// What to inject; shared between the test and the devices.
#[derive(Default)]
pub struct FaultPlan {
    /// Fail every data-path write with EIO while set.
    pub fail_writes: AtomicBool,
    /// Fail every data-path read with EIO while set.
    pub fail_reads: AtomicBool,
    /// Flip one bit in data-path reads that cover these (device, byte offset) points.
    pub corrupt_reads: Mutex<Vec<(u16, u64)>>,
    /// Record the old contents of unsynced writes so [`FaultDevices::power_cut`] can undo them.
    pub track_unsynced: AtomicBool,
    undo: Mutex<Vec<Undo>>,
    /// Numbers the entries of `undo`.
    undo_serial: AtomicU64,
    /// Ticks at every completed write: a queued sync makes durable only the writes that had
    /// completed when it was queued, as a device flush does (one queued beside a write still
    /// in flight may complete first).
    completions: AtomicU64,
    /// Writes seen (data path and metadata).
    pub writes: AtomicU64,
    /// Make every block's dedup key the same (set before the pool opens): every write then
    /// finds a candidate whose fingerprint "collides", which byte comparison must reject.
    pub collide_fingerprints: AtomicBool,
    /// Hold every discard this long before it reaches the device: widens the window in which
    /// a segment being given back could be written again.
    pub discard_delay_ms: AtomicU64,
    /// Hold every queue submission that sends a write this long: the engine thread falls
    /// behind its messages, so that many writes are taken before any of them is stored.
    pub write_submit_delay_us: AtomicU64,
    /// Hold every write of zeroes of 1 MiB or more (a shard zeroing a segment ahead of use)
    /// back from the device for this many milliseconds: it then lands after writes queued
    /// later, as a slow device that reorders them would. Held writes are not in flight for
    /// the queue's owner until it waits for them.
    pub defer_zero_writes_ms: AtomicU64,
    /// Hold every device read queued through a queue (not the blocking `read_at`) back this
    /// many milliseconds, as `defer_zero_writes_ms` holds zero writes: the read goes to the
    /// device, and sees what is there, only then.
    pub defer_reads_ms: AtomicU64,
    /// Discards seen.
    pub discards: AtomicU64,
    /// Writes that reached a range while a discard of it was under way.
    pub writes_into_discards: AtomicU64,
    discarding: Mutex<Vec<(u16, u64, u64)>>,
    /// Fail every synchronous (metadata path: superblocks, checkpoints, segment headers,
    /// replay) write with EIO while set.
    pub fail_metadata_writes: AtomicBool,
    /// Fail synchronous writes that start at these (device, byte offset) points.
    pub fail_writes_at: Mutex<Vec<(u16, u64)>>,
    /// Fail every sync (fdatasync) with EIO while set.
    pub fail_sync: AtomicBool,
    /// Fail synchronous reads that touch any of these (device, offset, length) ranges.
    pub fail_reads_in: Mutex<Vec<(u16, u64, u64)>>,
    /// Panic in the next queue submission that has a write to send (a bug in an engine
    /// thread, for the tests of what the pool does when one of its threads fails).
    pub panic_on_submit: AtomicBool,
}

struct Undo {
    serial: u64,
    /// The `completions` tick of the write's completion (`u64::MAX` while in flight).
    completed: u64,
    dev: u16,
    offset: u64,
    old: AlignedBuf,
}

/// How much of the unsynced writes survives a simulated power cut.
#[derive(Debug, Clone, Copy)]
pub enum CutMode {
    /// Every unsynced write is lost.
    LoseAll,
    /// Each unsynced write survives or not at random (from `seed`); one surviving write may be
    /// torn at a 4 KiB boundary.
    Random { seed: u64 },
}

impl FaultPlan {
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    /// A write is about to be issued: keep what it overwrites. Returns its `undo` serial (0
    /// when not tracked), for [`FaultPlan::note_completed`].
    fn note_write(&self, inner: &dyn Devices, dev: u16, offset: u64, len: usize) -> u64 {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let end = offset + len as u64;
        if self
            .discarding
            .lock()
            .iter()
            .any(|&(d, at, n)| d == dev && offset < at + n && at < end)
        {
            self.writes_into_discards.fetch_add(1, Ordering::Relaxed);
        }
        if !self.track_unsynced.load(Ordering::Relaxed) {
            return 0;
        }
        let mut old = AlignedBuf::new(len);
        if inner.read_at(dev, &mut old, offset).is_err() {
            return 0;
        }
        let serial = self.undo_serial.fetch_add(1, Ordering::AcqRel) + 1;
        self.undo.lock().push(Undo {
            serial,
            completed: u64::MAX,
            dev,
            offset,
            old,
        });
        serial
    }

    /// The write `serial` (from [`FaultPlan::note_write`]) completed.
    fn note_completed(&self, serial: u64) {
        if serial == 0 {
            return;
        }
        let tick = self.completions.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(u) = self
            .undo
            .lock()
            .iter_mut()
            .rev()
            .find(|u| u.serial == serial)
        {
            u.completed = tick;
        }
    }

    fn corrupt(&self, dev: u16, offset: u64, buf: &mut [u8]) {
        for &(d, at) in self.corrupt_reads.lock().iter() {
            if d == dev && at >= offset && at < offset + buf.len() as u64 {
                buf[(at - offset) as usize] ^= 0x01;
            }
        }
    }
}

/// Devices wrapper that applies a [`FaultPlan`].
pub struct FaultDevices {
    inner: SharedDevices,
    plan: Arc<FaultPlan>,
}

impl FaultDevices {
    pub fn new(inner: SharedDevices, plan: Arc<FaultPlan>) -> Self {
        FaultDevices { inner, plan }
    }

    /// Simulate a power cut: restore the old contents of unsynced writes (newest first), per
    /// `mode`. Call only after the pool using these devices has stopped.
    pub fn power_cut(plan: &FaultPlan, inner: &dyn Devices, mode: CutMode) -> io::Result<()> {
        let undo = std::mem::take(&mut *plan.undo.lock());
        let mut rng = match mode {
            CutMode::LoseAll => None,
            CutMode::Random { seed } => Some(seed | 1),
        };
        let mut next = move || {
            rng.as_mut().map(|x| {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x
            })
        };
        let mut torn_one = false;
        for u in undo.iter().rev() {
            match next() {
                None => inner.write_at(u.dev, &u.old, u.offset)?,
                Some(r) if r % 2 == 0 => inner.write_at(u.dev, &u.old, u.offset)?,
                Some(r) if !torn_one && u.old.len() > 4096 && r % 3 == 0 => {
                    // Torn: the first blocks reached the device, the rest did not.
                    torn_one = true;
                    let keep = ((r >> 8) as usize % (u.old.len() / 4096)).max(1) * 4096;
                    inner.write_at(u.dev, &u.old[keep..], u.offset + keep as u64)?;
                }
                Some(_) => {}
            }
        }
        inner.sync()
    }
}

impl Devices for FaultDevices {
    fn engine_name(&self) -> &'static str {
        self.inner.engine_name()
    }
    fn count(&self) -> usize {
        self.inner.count()
    }
    fn size(&self, dev: u16) -> u64 {
        self.inner.size(dev)
    }
    fn read_at(&self, dev: u16, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if self
            .plan
            .fail_reads_in
            .lock()
            .iter()
            .any(|&(d, o, l)| d == dev && o < end && offset < o + l)
        {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(dev, buf, offset)?;
        self.plan.corrupt(dev, offset, buf);
        Ok(())
    }
    fn write_at(&self, dev: u16, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.plan.fail_metadata_writes.load(Ordering::Relaxed)
            || self.plan.fail_writes_at.lock().contains(&(dev, offset))
        {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let serial = self.plan.note_write(&*self.inner, dev, offset, buf.len());
        let r = self.inner.write_at(dev, buf, offset);
        self.plan.note_completed(serial);
        r
    }
    fn sync(&self) -> io::Result<()> {
        if self.plan.fail_sync.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // Writes completed before the sync began are durable; ones racing with it may not be.
        let upto = self.plan.completions.load(Ordering::Acquire);
        self.inner.sync()?;
        self.plan.undo.lock().retain(|u| u.completed > upto);
        Ok(())
    }
    fn discard(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        self.plan.discards.fetch_add(1, Ordering::Relaxed);
        self.plan.discarding.lock().push((dev, offset, len));
        let delay = self.plan.discard_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        let r = self.inner.discard(dev, offset, len);
        let mut active = self.plan.discarding.lock();
        if let Some(i) = active.iter().position(|&r| r == (dev, offset, len)) {
            active.swap_remove(i);
        }
        r
    }
    fn preallocate(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        self.inner.preallocate(dev, offset, len)
    }
    fn host_space(&self, dev: u16) -> io::Result<Option<super::HostSpace>> {
        self.inner.host_space(dev)
    }
    fn data_ranges(&self, dev: u16) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.inner.data_ranges(dev)
    }
    fn queue(&self, depth: u32) -> io::Result<Box<dyn IoQueue>> {
        Ok(Box::new(FaultQueue {
            inner: self.inner.queue(depth)?,
            devices: self.inner.clone(),
            plan: self.plan.clone(),
            failed: Vec::new(),
            wrote_since_submit: false,
            syncs: Vec::new(),
            writes: Vec::new(),
            deferred: Vec::new(),
        }))
    }
}

struct FaultQueue {
    inner: Box<dyn IoQueue>,
    devices: SharedDevices,
    plan: Arc<FaultPlan>,
    failed: Vec<IoDone>,
    wrote_since_submit: bool,
    /// Queued syncs: (tag, the `completions` tick when queued).
    syncs: Vec<(u64, u64)>,
    /// Queued writes: (tag, `undo` serial).
    writes: Vec<(u64, u64)>,
    /// Zero writes held back (see `FaultPlan::defer_zero_writes_ms`): until when, op.
    deferred: Vec<(std::time::Instant, IoOp)>,
}

impl IoQueue for FaultQueue {
    fn push(&mut self, op: IoOp) {
        let fail = match op.kind {
            OpKind::Write => self.plan.fail_writes.load(Ordering::Relaxed),
            OpKind::Read => self.plan.fail_reads.load(Ordering::Relaxed),
            OpKind::Sync => self.plan.fail_sync.load(Ordering::Relaxed),
        };
        if fail {
            self.failed
                .push(op.done(Err(io::Error::from_raw_os_error(libc::EIO))));
            return;
        }
        if op.kind == OpKind::Write {
            let serial = self
                .plan
                .note_write(&*self.devices, op.dev, op.offset, op.len);
            if serial != 0 {
                self.writes.push((op.tag, serial));
            }
            self.wrote_since_submit = true;
        }
        if op.kind == OpKind::Sync {
            let upto = self.plan.completions.load(Ordering::Acquire);
            self.syncs.push((op.tag, upto));
        }
        let hold = match op.kind {
            OpKind::Read => self.plan.defer_reads_ms.load(Ordering::Relaxed),
            OpKind::Write if op.len >= 1 << 20 => {
                match self.plan.defer_zero_writes_ms.load(Ordering::Relaxed) {
                    ms if ms > 0 && op.buf[..op.len].iter().all(|&b| b == 0) => ms,
                    _ => 0,
                }
            }
            _ => 0,
        };
        if hold > 0 {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(hold);
            self.deferred.push((until, op));
            return;
        }
        self.inner.push(op);
    }
    fn submit(&mut self, min_complete: usize) -> io::Result<()> {
        if self.wrote_since_submit && self.plan.panic_on_submit.swap(false, Ordering::AcqRel) {
            panic!("injected fault: panic in an engine thread");
        }
        if self.wrote_since_submit {
            let delay = self.plan.write_submit_delay_us.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(std::time::Duration::from_micros(delay));
            }
        }
        self.wrote_since_submit = false;
        // Held zero writes go to the device once their time is up; a caller waiting with
        // nothing else in flight waits for that time.
        if min_complete > self.failed.len() && self.inner.in_flight() == 0 {
            if let Some(until) = self.deferred.iter().map(|d| d.0).min() {
                std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
            }
        }
        let now = std::time::Instant::now();
        for (until, op) in std::mem::take(&mut self.deferred) {
            if until <= now {
                self.inner.push(op);
            } else {
                self.deferred.push((until, op));
            }
        }
        let want = min_complete.saturating_sub(self.failed.len());
        self.inner.submit(want.min(self.inner.in_flight()))
    }
    fn reap(&mut self, out: &mut Vec<IoDone>) {
        out.append(&mut self.failed);
        let start = out.len();
        self.inner.reap(out);
        for d in &mut out[start..] {
            if d.kind == OpKind::Read && d.result.is_ok() {
                let len = d.buf.len();
                self.plan.corrupt(d.dev, d.offset, &mut d.buf[..len]);
            }
            if d.kind == OpKind::Write {
                if let Some(i) = self.writes.iter().position(|&(t, _)| t == d.tag) {
                    let (_, serial) = self.writes.swap_remove(i);
                    self.plan.note_completed(serial);
                }
            }
            if d.kind == OpKind::Sync {
                let Some(i) = self.syncs.iter().position(|&(t, _)| t == d.tag) else {
                    continue;
                };
                let (_, upto) = self.syncs.swap_remove(i);
                if d.result.is_ok() {
                    let dev = d.dev;
                    self.plan
                        .undo
                        .lock()
                        .retain(|u| u.dev != dev || u.completed > upto);
                }
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.failed.len() + self.inner.in_flight()
    }
    unsafe fn write_buf(&mut self, len: usize) -> AlignedBuf {
        // SAFETY: the caller's contract.
        unsafe { self.inner.write_buf(len) }
    }
    fn wait(&mut self, bell: &Arc<Doorbell>) -> io::Result<()> {
        if !self.failed.is_empty() || self.inner.in_flight() == 0 {
            return self.submit(1);
        }
        // The injected delay and panic first, then the inner queue's own wait.
        self.submit(0)?;
        self.inner.wait(bell)
    }
}
