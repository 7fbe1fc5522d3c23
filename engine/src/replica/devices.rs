//! The pool's devices, with every sync also appending what was written since the previous one
//! to the pool's [`Replica`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::{Replica, BATCH_DATA_BYTES};
use crate::format::{ExtentKind, ReplicaBatch, ReplicaExtent, IO_ALIGN};
use crate::io::{
    AlignedBuf, Devices, Doorbell, HostSpace, IoDone, IoOp, IoQueue, OpKind, SharedDevices,
};

/// A device's byte range: (device, start, end).
type DevRange = (u16, u64, u64);

/// Bytes of a base sent under one hold of the upload lock (syncs go between pieces).
const REBASE_PIECE: u64 = 64 << 20;

/// Data pieces (at most a batch each) read back side by side.
const READERS: usize = 4;

/// Where an upload's time went (debug log `ingot_engine::replica`).
#[derive(Default)]
struct Timing {
    bytes: u64,
    batches: u64,
    read: Duration,
    encode: Duration,
    put: Duration,
    commit: Duration,
}

/// A range written (or discarded) since the last sync that reached the replica.
#[derive(Debug, Clone, Copy)]
struct Dirty {
    dev: u16,
    kind: ExtentKind,
    offset: u64,
    len: u64,
}

pub(crate) struct MirrorDevices {
    s: Arc<Shared>,
    /// The early sender, joined at drop: it holds the devices open.
    early: Option<std::thread::JoinHandle<()>>,
}

/// Data bytes noted past which a background thread starts sending them, before any sync asks:
/// a large write's bytes then travel while it is written, and its flush sends only the rest.
const EARLY_BYTES: u64 = 32 << 20;

impl Drop for MirrorDevices {
    fn drop(&mut self) {
        self.s.stop.store(true, Ordering::Release);
        self.s.kick.notify_all();
        if let Some(t) = self.early.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    inner: SharedDevices,
    replica: Arc<dyn Replica>,
    /// Ranges written since the last upload, in the order their writes completed.
    dirty: Mutex<Vec<Dirty>>,
    /// Data bytes in `dirty`.
    dirty_bytes: AtomicU64,
    /// Held while a sync uploads: uploads go one at a time, in the order they read the
    /// devices, so a later batch never carries older bytes than an earlier one.
    upload: Mutex<Health>,
    /// Wakes the early sender (`EARLY_BYTES`).
    kick: Condvar,
    kick_lock: Mutex<()>,
    /// Set with `stop` at drop, and once an upload failed (nothing more is sent then).
    stop: AtomicBool,
    counters: Arc<super::Counters>,
    /// Data bytes committed since the last base began.
    since_base: AtomicU64,
    /// A new base is sent once `since_base` passes this (it grows to twice the devices'
    /// allocated bytes when they hold more: a base sends all of them).
    rebase_after: AtomicU64,
}

#[derive(Default)]
struct Health {
    /// The replica refused a batch: nothing after it may be acknowledged as durable.
    failed: Option<String>,
    /// Batches were put (early) since the last commit: the next sync commits even if it
    /// finds nothing new.
    uncommitted: bool,
    /// Their data bytes, counted into `since_base` when they are committed.
    uncommitted_bytes: u64,
}

fn lost(what: &str) -> io::Error {
    io::Error::other(format!("the pool's replica: {what}"))
}

impl MirrorDevices {
    /// `base`: the devices' current contents are not in the replica yet (a pool just put on
    /// a store): the first sync uploads every range that holds data.
    pub(crate) fn new(
        inner: SharedDevices,
        replica: Arc<dyn Replica>,
        base: bool,
        rebase_bytes: u64,
    ) -> io::Result<Self> {
        let mut dirty = Vec::new();
        if base {
            for dev in 0..inner.count() as u16 {
                let ranges = inner
                    .data_ranges(dev)?
                    .unwrap_or_else(|| vec![(0, inner.size(dev))]);
                dirty.extend(ranges.into_iter().map(|(offset, end)| Dirty {
                    dev,
                    kind: ExtentKind::Data,
                    offset,
                    len: end - offset,
                }));
            }
        }
        let s = Arc::new(Shared {
            inner,
            replica,
            dirty: Mutex::new(dirty),
            dirty_bytes: AtomicU64::new(0),
            upload: Mutex::new(Health::default()),
            kick: Condvar::new(),
            kick_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            counters: Arc::default(),
            since_base: AtomicU64::new(0),
            rebase_after: AtomicU64::new(rebase_bytes.max(1)),
        });
        let early = s.clone();
        let early = std::thread::Builder::new()
            .name("ingot-replica".into())
            .spawn(move || early.send_early())?;
        Ok(MirrorDevices {
            s,
            early: Some(early),
        })
    }
}

impl MirrorDevices {
    /// What this pool's syncs sent (`stats`).
    pub(crate) fn counters(&self) -> Arc<super::Counters> {
        self.s.counters.clone()
    }
}

impl Shared {
    fn note(&self, dev: u16, kind: ExtentKind, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if kind == ExtentKind::Data {
            let before = self.dirty_bytes.fetch_add(len, Ordering::Relaxed);
            self.counters
                .pending_bytes
                .store(before + len, Ordering::Relaxed);
            if before < EARLY_BYTES && before + len >= EARLY_BYTES {
                self.kick.notify_one();
            }
        }
        let mut d = self.dirty.lock();
        // Consecutive writes of one stream (a log segment filling) become one range.
        if let Some(last) = d.last_mut() {
            if last.dev == dev && last.kind == kind && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        d.push(Dirty {
            dev,
            kind,
            offset,
            len,
        });
    }

    /// Send what was written since the last upload and, with `commit`, make it (and what
    /// was sent early) one durable step. A sync calls it with `commit` after the devices' sync
    /// completed: every write the sync covers was noted before it.
    fn upload(&self, commit: bool) -> io::Result<()> {
        let mut health = self.upload.lock();
        if let Some(why) = &health.failed {
            return Err(lost(why));
        }
        let dirty = {
            let mut d = self.dirty.lock();
            self.dirty_bytes.store(0, Ordering::Relaxed);
            self.counters.pending_bytes.store(0, Ordering::Relaxed);
            std::mem::take(&mut *d)
        };
        if dirty.is_empty() && !(commit && health.uncommitted) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut t = Timing::default();
        let r = self.send(&dirty, &mut t).and_then(|()| {
            if commit {
                let c = std::time::Instant::now();
                let r = self.replica.commit();
                t.commit += c.elapsed();
                r
            } else {
                Ok(())
            }
        });
        let c = &self.counters;
        c.sent_bytes.fetch_add(t.bytes, Ordering::Relaxed);
        c.batches.fetch_add(t.batches, Ordering::Relaxed);
        if commit && r.is_ok() {
            let early = std::mem::take(&mut health.uncommitted_bytes);
            self.since_base
                .fetch_add(t.bytes + early, Ordering::Relaxed);
            let us = t.commit.as_micros() as u64;
            c.commits.fetch_add(1, Ordering::Relaxed);
            c.commit_us.fetch_add(us, Ordering::Relaxed);
            c.commit_max_us.fetch_max(us, Ordering::Relaxed);
        }
        tracing::debug!(
            target: "ingot_engine::replica",
            commit,
            bytes = t.bytes,
            total_us = started.elapsed().as_micros() as u64,
            read_us = t.read.as_micros() as u64,
            encode_us = t.encode.as_micros() as u64,
            put_us = t.put.as_micros() as u64,
            commit_us = t.commit.as_micros() as u64,
            "replica upload"
        );
        match &r {
            Err(e) => {
                health.failed = Some(e.to_string());
                // The early sender would find the data it waits for forever.
                self.stop.store(true, Ordering::Release);
            }
            Ok(()) => {
                health.uncommitted = !commit;
                if !commit {
                    health.uncommitted_bytes += t.bytes;
                }
            }
        }
        r
    }

    /// The early sender: puts noted data past `EARLY_BYTES` without waiting for a sync.
    fn send_early(&self) {
        while !self.stop.load(Ordering::Acquire) {
            {
                let mut g = self.kick_lock.lock();
                if self.dirty_bytes.load(Ordering::Relaxed) < EARLY_BYTES {
                    self.kick.wait_for(&mut g, Duration::from_millis(100));
                }
            }
            if self.dirty_bytes.load(Ordering::Relaxed) >= EARLY_BYTES {
                // An error is kept in `Health` and fails the next sync.
                let _ = self.upload(false);
            }
            if self.since_base.load(Ordering::Relaxed) >= self.rebase_after.load(Ordering::Relaxed)
            {
                let _ = self.rebase();
            }
        }
    }

    /// Every range of the devices that holds data, and their bytes.
    fn ranges(&self) -> io::Result<(Vec<DevRange>, u64)> {
        let mut ranges = Vec::new();
        let mut allocated = 0u64;
        for dev in 0..self.inner.count() as u16 {
            let r = self
                .inner
                .data_ranges(dev)?
                .unwrap_or_else(|| vec![(0, self.inner.size(dev))]);
            allocated += r.iter().map(|(a, b)| b - a).sum::<u64>();
            ranges.extend(r.into_iter().map(|(a, b)| (dev, a, b)));
        }
        Ok((ranges, allocated))
    }

    /// Send a new base (every range that holds data, a piece at a time, letting syncs go on
    /// between pieces), so that a restore replays the base and what came after it instead of
    /// the whole history. Only when the history since the last base is twice what a base
    /// sends.
    fn rebase(&self) -> io::Result<()> {
        let (_, allocated) = self.ranges()?;
        let floor = self.rebase_after.load(Ordering::Relaxed).max(2 * allocated);
        if self.since_base.load(Ordering::Relaxed) < floor {
            self.rebase_after.store(floor, Ordering::Relaxed);
            return Ok(());
        }
        let started = std::time::Instant::now();
        // The base starts at the next commit, and its ranges are listed after that, with no
        // upload in between: every write a commit before the start covers is on the devices
        // by then (listed, or punched and rightly a hole), and every later one is noted and
        // committed after the start.
        let ranges = {
            let _no_upload = self.upload.lock();
            self.since_base.store(0, Ordering::Relaxed);
            self.replica.base_begin();
            self.ranges()?.0
        };
        let mut t = Timing::default();
        for (dev, start, end) in ranges {
            let mut at = start;
            while at < end {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let len = (end - at).min(REBASE_PIECE);
                let mut health = self.upload.lock();
                if let Some(why) = &health.failed {
                    return Err(lost(why));
                }
                let piece = Dirty {
                    dev,
                    kind: ExtentKind::Data,
                    offset: at,
                    len,
                };
                if let Err(e) = self.send(&[piece], &mut t) {
                    health.failed = Some(e.to_string());
                    self.stop.store(true, Ordering::Release);
                    return Err(e);
                }
                health.uncommitted = true;
                at += len;
            }
        }
        // Commit the base's last pieces (with whatever was noted meanwhile), then mark it.
        self.upload(true)?;
        let mut health = self.upload.lock();
        let r = self.replica.base_end();
        match &r {
            Err(e) => {
                health.failed = Some(e.to_string());
                self.stop.store(true, Ordering::Release);
            }
            Ok(()) => {
                self.counters.bases.fetch_add(1, Ordering::Relaxed);
            }
        }
        tracing::info!(
            target: "ingot_engine::replica",
            bytes = t.bytes,
            allocated,
            ms = started.elapsed().as_millis() as u64,
            "replica: a new base is in the store"
        );
        r
    }

    fn send(&self, dirty: &[Dirty], t: &mut Timing) -> io::Result<()> {
        let sizes: Vec<u64> = (0..self.inner.count() as u16)
            .map(|d| self.inner.size(d))
            .collect();
        let mut batch = ReplicaBatch {
            sizes: sizes.clone(),
            extents: Vec::new(),
        };
        let mut data: Vec<AlignedBuf> = Vec::new();
        let mut bytes = 0usize;
        let flush = |batch: &mut ReplicaBatch,
                     data: &mut Vec<AlignedBuf>,
                     bytes: &mut usize,
                     t: &mut Timing| {
            if batch.extents.is_empty() {
                return Ok(());
            }
            let e = std::time::Instant::now();
            let parts: Vec<&[u8]> = data.iter().map(|b| &b[..]).collect();
            let out = batch.encode(&parts);
            batch.extents.clear();
            data.clear();
            t.bytes += *bytes as u64;
            t.batches += 1;
            *bytes = 0;
            let p = std::time::Instant::now();
            t.encode += p - e;
            let r = self.replica.put(out);
            t.put += p.elapsed();
            r
        };
        // What to send, in order: zero extents, and data pieces cut where a batch fills.
        enum Piece {
            Zero { dev: u16, offset: u64, len: u64 },
            Data { dev: u16, offset: u64, len: usize },
        }
        let mut pieces = Vec::new();
        let mut fill = 0usize;
        for d in dirty {
            if d.kind == ExtentKind::Zero {
                let mut at = d.offset;
                while at < d.offset + d.len {
                    let n = (d.offset + d.len - at).min(1 << 30);
                    pieces.push(Piece::Zero {
                        dev: d.dev,
                        offset: at,
                        len: n,
                    });
                    at += n;
                }
                continue;
            }
            // Aligned for O_DIRECT (writes are 4 KiB-aligned; a base range from the file's
            // extents is too).
            let end = d.offset + d.len;
            let mut at = d.offset & !(IO_ALIGN as u64 - 1);
            while at < end {
                let n = ((end - at).next_multiple_of(IO_ALIGN as u64) as usize)
                    .min(BATCH_DATA_BYTES - fill)
                    .min(sizes[usize::from(d.dev)].saturating_sub(at) as usize);
                if n == 0 {
                    break;
                }
                pieces.push(Piece::Data {
                    dev: d.dev,
                    offset: at,
                    len: n,
                });
                fill = (fill + n) % BATCH_DATA_BYTES;
                at += n as u64;
            }
        }
        // Read back what the data pieces hold now, a few side by side (one reader left the
        // device idle: the read-back was most of an upload's time), checksummed by the reader.
        let mut rest = &pieces[..];
        while !rest.is_empty() {
            let mut take = 0;
            let mut reads = 0;
            while take < rest.len() && reads < READERS {
                if matches!(rest[take], Piece::Data { .. }) {
                    reads += 1;
                }
                take += 1;
            }
            let (now, later) = rest.split_at(take);
            rest = later;
            let rd = std::time::Instant::now();
            let got: Vec<Option<io::Result<(AlignedBuf, u32)>>> = std::thread::scope(|sc| {
                let hs: Vec<_> = now
                    .iter()
                    .map(|p| match *p {
                        Piece::Data { dev, offset, len } => Some(sc.spawn(move || {
                            let mut buf = AlignedBuf::new(len);
                            self.inner.read_at(dev, &mut buf, offset)?;
                            let crc = crc32fast::hash(&buf);
                            Ok((buf, crc))
                        })),
                        Piece::Zero { .. } => None,
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.map(|h| {
                            h.join()
                                .unwrap_or_else(|_| Err(io::Error::other("a reader panicked")))
                        })
                    })
                    .collect()
            });
            t.read += rd.elapsed();
            for (p, g) in now.iter().zip(got) {
                match (p, g) {
                    (&Piece::Zero { dev, offset, len }, _) => batch.extents.push(ReplicaExtent {
                        dev,
                        kind: ExtentKind::Zero,
                        len: len as u32,
                        offset,
                        crc: 0,
                    }),
                    (&Piece::Data { dev, offset, len }, Some(r)) => {
                        let (buf, crc) = r?;
                        batch.extents.push(ReplicaExtent {
                            dev,
                            kind: ExtentKind::Data,
                            len: len as u32,
                            offset,
                            crc,
                        });
                        data.push(buf);
                        bytes += len;
                        if bytes >= BATCH_DATA_BYTES {
                            flush(&mut batch, &mut data, &mut bytes, t)?;
                        }
                    }
                    (Piece::Data { .. }, None) => {
                        return Err(io::Error::other("a data piece was not read back"))
                    }
                }
            }
        }
        flush(&mut batch, &mut data, &mut bytes, t)
    }

    fn check_valid(&self) -> io::Result<()> {
        if self.replica.valid() {
            Ok(())
        } else {
            Err(lost(
                "this node's lease ran out: another node may serve the pool",
            ))
        }
    }
}

impl Devices for MirrorDevices {
    fn engine_name(&self) -> &'static str {
        self.s.inner.engine_name()
    }
    fn count(&self) -> usize {
        self.s.inner.count()
    }
    fn size(&self, dev: u16) -> u64 {
        self.s.inner.size(dev)
    }
    fn read_at(&self, dev: u16, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.s.check_valid()?;
        self.s.inner.read_at(dev, buf, offset)
    }
    fn write_at(&self, dev: u16, buf: &[u8], offset: u64) -> io::Result<()> {
        self.s.check_valid()?;
        self.s.inner.write_at(dev, buf, offset)?;
        self.s.note(dev, ExtentKind::Data, offset, buf.len() as u64);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.s.inner.sync()?;
        self.s.upload(true)
    }
    fn discard(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        self.s.inner.discard(dev, offset, len)?;
        self.s.note(dev, ExtentKind::Zero, offset, len);
        Ok(())
    }
    fn preallocate(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        self.s.inner.preallocate(dev, offset, len)
    }
    fn data_ranges(&self, dev: u16) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.s.inner.data_ranges(dev)
    }
    fn host_space(&self, dev: u16) -> io::Result<Option<HostSpace>> {
        self.s.inner.host_space(dev)
    }
    fn queue(&self, depth: u32) -> io::Result<Box<dyn IoQueue>> {
        Ok(Box::new(MirrorQueue {
            inner: self.s.inner.queue(depth)?,
            devices: self.s.clone(),
        }))
    }
}

/// A shard's queue: each completed write is noted, and a completed sync is held back until
/// what it covers is in the replica (it fails if that cannot be). Reads fail once the lease
/// ran out.
struct MirrorQueue {
    inner: Box<dyn IoQueue>,
    devices: Arc<Shared>,
}

impl IoQueue for MirrorQueue {
    fn push(&mut self, op: IoOp) {
        self.inner.push(op);
    }
    fn submit(&mut self, min_complete: usize) -> io::Result<()> {
        self.inner.submit(min_complete)
    }
    fn reap(&mut self, out: &mut Vec<IoDone>) {
        let from = out.len();
        self.inner.reap(out);
        let s = &self.devices;
        for d in &out[from..] {
            if d.kind == OpKind::Write && d.result.is_ok() {
                s.note(d.dev, ExtentKind::Data, d.offset, d.buf.len() as u64);
            }
        }
        for d in &mut out[from..] {
            match d.kind {
                OpKind::Sync if d.result.is_ok() => d.result = s.upload(true),
                OpKind::Read if d.result.is_ok() => d.result = s.check_valid(),
                _ => {}
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn wait(&mut self, bell: &Doorbell) -> io::Result<()> {
        self.inner.wait(bell)
    }
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.fd()
    }
}
