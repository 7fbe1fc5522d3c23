//! The pool's devices, with every sync also appending what was written since the previous one
//! to the pool's [`Replica`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::cold::{clip, subtract, ColdMap, Piece};
use super::{Placed, Replica, BATCH_DATA_BYTES};
use crate::format::{
    ExtentKind, ReplicaBatch, ReplicaExtent, IO_ALIGN, REPLICA_EXTENT_BYTES, REPLICA_HEADER_BYTES,
};
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

/// One batch put and not committed yet: its extents as (device, start, end, where the data
/// starts in the batch; `None` for a zero extent), for the placements its commit returns.
type SentBatch = Vec<(u16, u64, u64, Option<u64>)>;

/// `ranges` sorted, with overlapping and touching ones joined.
fn merge(mut ranges: Vec<DevRange>) -> Vec<DevRange> {
    ranges.sort_unstable();
    let mut out: Vec<DevRange> = Vec::with_capacity(ranges.len());
    for (dev, a, b) in ranges {
        match out.last_mut() {
            Some(l) if l.0 == dev && a <= l.2 => l.2 = l.2.max(b),
            _ => out.push((dev, a, b)),
        }
    }
    out
}

/// A range written (or discarded) since the last sync that reached the replica.
#[derive(Debug, Clone, Copy)]
struct Dirty {
    dev: u16,
    kind: ExtentKind,
    offset: u64,
    len: u64,
}

/// How a pool's devices follow its replica (`PoolOptions::replica_*`).
pub(crate) struct MirrorOptions {
    pub base: bool,
    pub rebase_bytes: u64,
    /// Data bytes the store's history held since its last base when this open began
    /// (`PoolOptions::replica_history_bytes`).
    pub history_bytes: u64,
    pub cold: Option<Arc<ColdMap>>,
    pub fill: bool,
    pub local: bool,
    pub rebase_now: bool,
    /// Local device bytes to keep at most (0: keep everything): clean ranges the store holds
    /// are dropped from the local files past it, the least recently used first.
    pub cache_bytes: u64,
}

/// Device bytes per unit a local cache follows: when it was last read or written, and whether
/// a read or write of it is in flight.
const CHUNK_SHIFT: u32 = 22;
/// How often the evictor looks at the local files' size (a round of the cache's clock).
const EVICT_EVERY: Duration = Duration::from_millis(200);
/// The evictor commits writes no client flushed (to drop them) at most this often, and only
/// when they could cover what it lacks or this much.
const SELF_COMMIT_EVERY: Duration = Duration::from_secs(1);
const SELF_COMMIT_MIN: u64 = 8 << 20;
/// Chunks looked at under one hold of the upload lock.
const EVICT_GROUP: usize = 16;

/// A local cache budget's bookkeeping.
struct Cache {
    limit: u64,
    /// Per device and chunk: reads and writes begun (the high 32 bits, wrapping) and in
    /// flight (the low 32 bits). An eviction drops a range only if no read or write of its
    /// chunk was in flight or began since it looked at what was not committed yet: a read
    /// that began before would find a hole, and a write's bytes would be lost.
    ops: Vec<Vec<AtomicU64>>,
    /// Per device and chunk: the round of its last read or write.
    used: Vec<Vec<AtomicU32>>,
    round: AtomicU32,
}

impl Cache {
    fn new(limit: u64, sizes: impl Iterator<Item = u64>) -> Cache {
        let (mut ops, mut used) = (Vec::new(), Vec::new());
        for size in sizes {
            let n = size.div_ceil(1 << CHUNK_SHIFT) as usize;
            ops.push((0..n).map(|_| AtomicU64::new(0)).collect());
            used.push((0..n).map(|_| AtomicU32::new(0)).collect());
        }
        Cache {
            limit,
            ops,
            used,
            round: AtomicU32::new(1),
        }
    }

    fn chunks(&self, dev: u16, start: u64, end: u64) -> std::ops::Range<usize> {
        let n = self.used[usize::from(dev)].len();
        let first = ((start >> CHUNK_SHIFT) as usize).min(n);
        let last = (end.max(start + 1).div_ceil(1 << CHUNK_SHIFT) as usize).min(n);
        first..last
    }

    fn touch(&self, dev: u16, start: u64, end: u64) {
        let round = self.round.load(Ordering::Relaxed);
        for c in self.chunks(dev, start, end) {
            let u = &self.used[usize::from(dev)][c];
            if u.load(Ordering::Relaxed) != round {
                u.store(round, Ordering::Relaxed);
            }
        }
    }

    /// Before a read, write or discard of `start..end` looks at the cold map.
    fn begin(&self, dev: u16, start: u64, end: u64) {
        self.touch(dev, start, end);
        for c in self.chunks(dev, start, end) {
            self.ops[usize::from(dev)][c].fetch_add((1 << 32) + 1, Ordering::SeqCst);
        }
    }

    /// After it completed (a write: and was noted).
    fn end(&self, dev: u16, start: u64, end: u64) {
        for c in self.chunks(dev, start, end) {
            self.ops[usize::from(dev)][c].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

pub(crate) struct MirrorDevices {
    s: Arc<Shared>,
    /// The early sender, the fetchers and the filler, joined at drop: they hold the devices
    /// open.
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// With local acknowledgement, data noted and not sent past which a client's sync waits for
/// the store again: how far the store may fall behind.
const LOCAL_LAG_BYTES: u64 = 256 << 20;

/// Threads that fetch the cold ranges queued reads need (a shard goes on meanwhile).
const FETCHERS: usize = 32;
/// A cold read fetches the cold parts of the aligned window around it: neighbouring blocks
/// of one record or segment are likely next, and a range read of this size costs the store
/// little more than one of 4 KiB.
const FETCH_WINDOW: u64 = 64 << 10;
/// The window of the blocking reads (superblocks, checkpoints, the log's replay at open): the
/// replay walks the log tail a record at a time, and one range read per record made an open
/// after a takeover take seconds.
const BLOCKING_WINDOW: u64 = 1 << 20;
/// Pieces of one read fetched side by side at most.
const PIECES_AT_ONCE: usize = 8;
/// The filler's pieces, and how many it fetches side by side.
const FILL_PIECE: u64 = 4 << 20;
const FILL_WINDOW: usize = 4;

/// A queued read waiting for its cold range, and the queue's completions of such reads.
type FetchJob = (IoOp, Arc<Parked>);

#[derive(Default)]
struct Parked {
    done: Mutex<Vec<IoDone>>,
    cv: Condvar,
    /// The shard's doorbell, rung when a read completes while it waits in its ring.
    bell: Mutex<Option<Arc<Doorbell>>>,
}

/// Data bytes noted past which a background thread starts sending them, before any sync asks:
/// a large write's bytes then travel while it is written, and its flush sends only the rest.
const EARLY_BYTES: u64 = 32 << 20;

impl Drop for MirrorDevices {
    fn drop(&mut self) {
        self.s.stop.store(true, Ordering::Release);
        self.s.closing.store(true, Ordering::Release);
        self.s.kick.notify_all();
        self.s.commit_cv.notify_all();
        self.s.hold_cv.notify_all();
        for t in self.threads.drain(..) {
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
    /// Set at drop only: the fetchers run until then (queued reads wait on them even after an
    /// upload failed), and complete what is left with an error.
    closing: AtomicBool,
    counters: Arc<super::Counters>,
    /// A new base is sent once `counters.history` passes this (it grows to twice the devices'
    /// allocated bytes when they hold more: a base sends all of them).
    rebase_after: AtomicU64,
    /// Ranges still only in the store (a lazy takeover, or dropped by the local cache), where
    /// the store holds each range, and the fetchers' queue.
    cold: Option<Arc<ColdMap>>,
    cache: Option<Cache>,
    /// Clients' syncs are acknowledged once local, and committed to the replica behind them
    /// (`PoolOptions::replica_local_ack`).
    local: bool,
    /// Asked of the committer thread (local acknowledgement).
    commit_wanted: Mutex<bool>,
    commit_cv: Condvar,
    /// A base is due before anything else may be committed (a node that kept its devices
    /// after a crash with local acknowledgement: the store lacks what it acknowledged, and
    /// later commits would build on what the store never got). Cleared when the base is in.
    hold: Mutex<bool>,
    hold_cv: Condvar,
    fetch: Option<crossbeam_channel::Sender<FetchJob>>,
}

#[derive(Default)]
struct Health {
    /// The replica refused a batch: nothing after it may be acknowledged as durable.
    failed: Option<String>,
    /// Batches were put (early) since the last commit: the next sync commits even if it
    /// finds nothing new.
    uncommitted: bool,
    /// Their data bytes, counted into `counters.history` when they are committed.
    uncommitted_bytes: u64,
    /// The batches put since the last commit, in order: where they are once it succeeds.
    sent: Vec<SentBatch>,
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
        o: MirrorOptions,
    ) -> io::Result<Self> {
        let MirrorOptions {
            base,
            rebase_bytes,
            history_bytes,
            cold,
            fill,
            local,
            rebase_now,
            cache_bytes,
        } = o;
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
        let cache = (cache_bytes > 0).then(|| {
            Cache::new(
                cache_bytes,
                (0..inner.count() as u16).map(|d| inner.size(d)),
            )
        });
        if cache.is_some() {
            // Dropped ranges are holes, which a restart finds again, and what the local files
            // hold is measured by their allocated blocks: files only.
            for dev in 0..inner.count() as u16 {
                if inner.host_space(dev)?.is_none() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a local cache needs the pool's devices to be files, not block devices",
                    ));
                }
            }
            // Syncs answered before the store has them could not be kept across a crash once
            // ranges are dropped (the directory is partial then).
            if local {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a local cache needs flushes answered by the store (not local durability)",
                ));
            }
        }
        // A local cache needs the map even with nothing cold: it is where the store's ranges
        // are listed.
        let cold = if cache.is_some() {
            let c = cold.unwrap_or_else(|| Arc::new(ColdMap::new(inner.count())));
            if c.is_empty() {
                c.set_whole_if(c.evictions(), || replica.devices_whole())?;
            }
            Some(c)
        } else {
            cold.filter(|c| !c.is_empty())
        };
        let (fetch_tx, fetch_rx) = crossbeam_channel::unbounded::<FetchJob>();
        let s = Arc::new(Shared {
            inner,
            replica,
            dirty: Mutex::new(dirty),
            dirty_bytes: AtomicU64::new(0),
            upload: Mutex::new(Health::default()),
            kick: Condvar::new(),
            kick_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            counters: Arc::new(super::Counters {
                cold: cold.clone(),
                holding: AtomicBool::new(rebase_now),
                history: AtomicU64::new(history_bytes),
                cache_limit: cache_bytes,
                ..Default::default()
            }),
            rebase_after: AtomicU64::new(rebase_bytes.max(1)),
            fetch: cold.is_some().then_some(fetch_tx),
            cold,
            cache,
            local,
            commit_wanted: Mutex::new(false),
            commit_cv: Condvar::new(),
            hold: Mutex::new(rebase_now),
            hold_cv: Condvar::new(),
        });
        let named = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f)
        };
        let mut threads = Vec::new();
        if local {
            let me = s.clone();
            threads.push(named(
                "ingot-commit".into(),
                Box::new(move || me.committer()),
            )?);
        }
        let early = s.clone();
        threads.push(named(
            "ingot-replica".into(),
            Box::new(move || early.send_early()),
        )?);
        if s.cold.is_some() {
            for i in 0..FETCHERS {
                let (me, rx) = (s.clone(), fetch_rx.clone());
                threads.push(named(
                    format!("ingot-fetch-{i}"),
                    Box::new(move || me.fetcher(rx)),
                )?);
            }
            // A local cache fetches on use only: filling would undo its evictions.
            if fill && s.cache.is_none() {
                let me = s.clone();
                threads.push(named("ingot-fill".into(), Box::new(move || me.filler()))?);
            }
        }
        if s.cache.is_some() {
            let me = s.clone();
            threads.push(named("ingot-evict".into(), Box::new(move || me.evictor()))?);
        }
        Ok(MirrorDevices { s, threads })
    }
}

impl MirrorDevices {
    /// What this pool's syncs sent (`stats`).
    pub(crate) fn counters(&self) -> Arc<super::Counters> {
        self.s.counters.clone()
    }
}

impl Shared {
    /// A client's sync (a shard's queued sync op) completed on the devices: make what it
    /// covers durable in the replica, or with local acknowledgement have it committed behind.
    fn after_sync(&self) -> io::Result<()> {
        if self.has_failed() {
            return self.upload(true);
        }
        // Devices still partly in the store cannot be kept after a crash (the map of what is
        // cold dies with the process): until they are whole, syncs reach the store first.
        let whole = self.cold.as_ref().is_none_or(|c| c.is_whole());
        if !self.local || !whole {
            self.wait_hold()?;
            return self.commit_now();
        }
        self.check_valid()?;
        self.counters.acked.fetch_add(1, Ordering::AcqRel);
        if *self.hold.lock() {
            // The base in progress commits it.
            return Ok(());
        }
        if self.dirty_bytes.load(Ordering::Relaxed) >= LOCAL_LAG_BYTES {
            // The store falls behind: this sync waits for it, as without local
            // acknowledgement.
            return self.commit_now();
        }
        *self.commit_wanted.lock() = true;
        self.commit_cv.notify_one();
        Ok(())
    }

    /// The replica refused something: nothing after it may be acknowledged as durable, and
    /// nothing more is sent (the early sender would wait forever for the data it expects).
    fn fail(&self, health: &mut Health, e: &io::Error) {
        health.failed = Some(e.to_string());
        self.counters.failed.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
    }

    /// `Health::failed`, for the syncs that do not take the upload lock.
    fn has_failed(&self) -> bool {
        self.counters.failed.load(Ordering::Acquire)
    }

    /// Commit everything noted, counting the local acknowledgements it covers.
    fn commit_now(&self) -> io::Result<()> {
        let covers = self.counters.acked.load(Ordering::Acquire);
        self.upload(true)?;
        self.counters.committed.fetch_max(covers, Ordering::AcqRel);
        Ok(())
    }

    /// The committer: commits what local acknowledgements left behind, one upload at a time.
    fn committer(&self) {
        loop {
            {
                let mut w = self.commit_wanted.lock();
                while !*w && !self.closing.load(Ordering::Acquire) {
                    self.commit_cv.wait_for(&mut w, Duration::from_millis(100));
                }
                if !*w {
                    return;
                }
                *w = false;
            }
            if *self.hold.lock() {
                continue;
            }
            // An error is kept in `Health`: later syncs fail, and the replica gives up.
            let _ = self.commit_now();
        }
    }

    /// Wait until no base is due first (a sync that must reach the store).
    fn wait_hold(&self) -> io::Result<()> {
        let mut h = self.hold.lock();
        while *h {
            if self.has_failed() || self.closing.load(Ordering::Acquire) {
                return Err(lost("the base it waited for was not sent"));
            }
            self.hold_cv.wait_for(&mut h, Duration::from_millis(100));
        }
        Ok(())
    }

    /// Make `start..end` of device `dev` local: fetch its cold parts (with `window`, the cold
    /// parts of the aligned window around it) from the store and write them to the device.
    fn ensure(&self, dev: u16, start: u64, end: u64, window: u64) -> io::Result<()> {
        let Some(cold) = &self.cold else {
            return Ok(());
        };
        if !cold.overlaps(dev, start, end) {
            return Ok(());
        }
        let from = start - start % window.max(1);
        let to = end
            .next_multiple_of(window.max(1))
            .min(self.inner.size(dev));
        // The read's own range, with the window's cold neighbours that touch it in the same
        // range reads; the rest of the window only as a bonus (its failure fails no read).
        let pieces = cold.pieces(dev, from, to);
        let (mine, rest): (Vec<Piece>, Vec<Piece>) = pieces
            .into_iter()
            .partition(|(s, c)| *s < end && c.end > start);
        let mut result = self.fetch_all(cold, dev, &mine);
        // What was tried of the read's own range, to compare with what is left of it.
        let mut tried: Vec<Piece> = mine
            .iter()
            .map(|(s, c)| clip((*s, c), start, end))
            .collect();
        if let Err(e) = self.fetch_all(cold, dev, &rest) {
            tracing::debug!(target: "ingot_engine::replica", error = %e, "a read's window: not fetched");
        }
        // A fetch lands only where the map still names what it read: a base's commit may
        // have moved a range to the base's copy meanwhile (and the collector deleted the
        // object it was in). Fetch again from where the map says now.
        for _ in 0..8 {
            let left = cold.pieces(dev, start, end);
            if left.is_empty() {
                return Ok(());
            }
            match result {
                Err(e) if left == tried => return Err(e),
                _ => {}
            }
            result = self.fetch_all(cold, dev, &left);
            tried = left;
        }
        if !cold.overlaps(dev, start, end) {
            return Ok(());
        }
        result?;
        if cold.overlaps(dev, start, end) {
            return Err(lost("a cold range kept moving while it was fetched"));
        }
        Ok(())
    }

    /// Fetch `pieces`, a few side by side (a range read costs the store's round trip).
    fn fetch_all(&self, cold: &ColdMap, dev: u16, pieces: &[Piece]) -> io::Result<()> {
        if let [one] = pieces {
            return self.fetch_piece(cold, dev, one.clone());
        }
        for group in pieces.chunks(PIECES_AT_ONCE) {
            std::thread::scope(|sc| {
                let hs: Vec<_> = group
                    .iter()
                    .map(|p| sc.spawn(move || self.fetch_piece(cold, dev, p.clone())))
                    .collect();
                hs.into_iter().try_for_each(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a fetch panicked")))
                })
            })?;
        }
        Ok(())
    }

    fn fetch_piece(&self, cold: &ColdMap, dev: u16, piece: Piece) -> io::Result<()> {
        let (start, ref p) = piece;
        let len = (p.end - start) as usize;
        let mut buf = AlignedBuf::new(len.next_multiple_of(IO_ALIGN));
        self.replica
            .fetch(&p.object, p.at, &mut buf[..len])
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "fetching device {dev} bytes {start}..{} from {}: {e}",
                        p.end, p.object
                    ),
                )
            })?;
        cold.land(dev, piece, &buf[..len], |b, at| {
            self.inner.write_at(dev, b, at)
        })
    }

    /// A fetcher thread: queued reads of cold ranges, completed into their queue's list.
    /// Every read handed to it completes, with an error if it cannot be served (the pool's
    /// queues wait for them all).
    fn fetcher(&self, rx: crossbeam_channel::Receiver<FetchJob>) {
        let complete = |op: IoOp, parked: &Parked, r: io::Result<()>| {
            parked.done.lock().push(op.done(r));
            parked.cv.notify_all();
            let bell = parked.bell.lock().clone();
            if let Some(bell) = bell {
                bell.ring();
            }
        };
        while !self.closing.load(Ordering::Acquire) {
            let Ok((mut op, parked)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let end = op.offset + op.len as u64;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.check_valid()?;
                self.ensure(op.dev, op.offset, end, FETCH_WINDOW)?;
                self.inner
                    .read_at(op.dev, &mut op.buf[..op.len], op.offset)?;
                self.check_valid()
            }))
            .unwrap_or_else(|_| Err(lost("a fetcher panicked")));
            complete(op, &parked, r);
        }
        while let Ok((op, parked)) = rx.try_recv() {
            complete(op, &parked, Err(lost("the pool is closing")));
        }
    }

    /// The filler: fetches every cold range, a few pieces side by side, until none is left,
    /// then makes them durable locally (a clean stop may then say the directory is whole).
    fn filler(&self) {
        let Some(cold) = &self.cold else { return };
        let started = std::time::Instant::now();
        while !self.stop.load(Ordering::Acquire) && !cold.is_empty() {
            match self.fill_step(cold) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(target: "ingot_engine::replica", error = %e, "filling cold ranges from the store failed; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        let evictions = cold.evictions();
        if cold.is_empty() && self.inner.sync().is_ok() && self.mark_whole(cold, evictions) {
            tracing::info!(
                target: "ingot_engine::replica",
                bytes = cold.fetched_bytes.load(Ordering::Relaxed),
                ms = started.elapsed().as_millis() as u64,
                "every cold range is local now"
            );
        }
    }

    /// Every range was local before a sync of the devices (and no eviction came since
    /// `evictions`): once the replica recorded it, the map says whole.
    fn mark_whole(&self, cold: &ColdMap, evictions: u64) -> bool {
        match cold.set_whole_if(evictions, || self.replica.devices_whole()) {
            Ok(whole) => whole,
            Err(e) => {
                tracing::warn!(target: "ingot_engine::replica", error = %e, "recording that the devices are whole failed; the next sync tries again");
                false
            }
        }
    }

    /// Fetch the next few cold pieces; `false` when there were none.
    fn fill_step(&self, cold: &ColdMap) -> io::Result<bool> {
        let pieces = cold.next_pieces(FILL_WINDOW, FILL_PIECE);
        if pieces.is_empty() {
            return Ok(false);
        }
        std::thread::scope(|sc| {
            let hs: Vec<_> = pieces
                .into_iter()
                .map(|(dev, p)| sc.spawn(move || self.fetch_piece(cold, dev, p)))
                .collect();
            hs.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a filler panicked")))
            })
        })?;
        Ok(true)
    }

    /// Write or discard of `start..end`: local from now on, whatever the store had.
    fn make_local(&self, dev: u16, start: u64, end: u64) {
        if let Some(cold) = &self.cold {
            cold.clear(dev, start, end);
        }
    }

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
        let r = self.send(&dirty, &mut t).and_then(|sent| {
            health.sent.extend(sent);
            if commit {
                let c = std::time::Instant::now();
                let r = self.replica.commit();
                t.commit += c.elapsed();
                r.map(|placed| self.placed(std::mem::take(&mut health.sent), placed))
            } else {
                Ok(())
            }
        });
        let c = &self.counters;
        c.sent_bytes.fetch_add(t.bytes, Ordering::Relaxed);
        c.batches.fetch_add(t.batches, Ordering::Relaxed);
        if commit && r.is_ok() {
            let early = std::mem::take(&mut health.uncommitted_bytes);
            c.history.fetch_add(t.bytes + early, Ordering::Relaxed);
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
                self.fail(&mut health, e);
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
            if *self.hold.lock() {
                let r = self.rebase(true);
                if let Err(e) = &r {
                    tracing::warn!(target: "ingot_engine::replica", error = %e, "the base due after a crash failed; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                if r.is_ok() && !self.stop.load(Ordering::Acquire) {
                    *self.hold.lock() = false;
                    self.counters.holding.store(false, Ordering::Release);
                    self.hold_cv.notify_all();
                    // What was acknowledged meanwhile went with the base's last commit.
                    if self.local {
                        *self.commit_wanted.lock() = true;
                        self.commit_cv.notify_one();
                    }
                }
            } else if self.counters.history.load(Ordering::Relaxed)
                >= self.rebase_after.load(Ordering::Relaxed)
            {
                let _ = self.rebase(false);
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
    /// `now`: whatever the history's length (a base is due before anything else commits).
    fn rebase(&self, now: bool) -> io::Result<()> {
        let (_, local) = self.ranges()?;
        // After a lazy takeover the local files hold holes where the store still has data.
        let allocated = local + self.cold.as_ref().map_or(0, |c| c.cold_bytes());
        let floor = self.rebase_after.load(Ordering::Relaxed).max(2 * allocated);
        if !now && self.counters.history.load(Ordering::Relaxed) < floor {
            self.rebase_after.store(floor, Ordering::Relaxed);
            return Ok(());
        }
        let started = std::time::Instant::now();
        // The base starts at the next commit, and its ranges are listed after that, with no
        // upload in between: every write a commit before the start covers is on the devices
        // by then (listed, or punched and rightly a hole), and every later one is noted and
        // committed after the start.
        let (ranges, before) = {
            let _no_upload = self.upload.lock();
            // The history before the start: behind the base once it is whole, and only then
            // (a base cut short by a stop leaves the history as it was).
            let before = self.counters.history.load(Ordering::Relaxed);
            self.replica.base_begin();
            // What is still only in the store (read from there: the base lets the objects
            // that hold it go, and its commit says where it is now), then the devices' local
            // data: in that order, a range a fetch lands meanwhile is in one list or the other
            // (it is written before it leaves the map).
            let mut ranges = Vec::new();
            if let Some(cold) = &self.cold {
                for dev in 0..self.inner.count() as u16 {
                    ranges.extend(cold.cold_ranges(dev).into_iter().map(|(a, b)| (dev, a, b)));
                }
            }
            ranges.extend(self.ranges()?.0);
            (merge(ranges), before)
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
                match self.send(&[piece], &mut t) {
                    Ok(sent) => health.sent.extend(sent),
                    Err(e) => {
                        self.fail(&mut health, &e);
                        return Err(e);
                    }
                }
                health.uncommitted = true;
                at += len;
            }
        }
        // Commit the base's last pieces (with whatever was noted meanwhile), then mark it.
        self.commit_now()?;
        let mut health = self.upload.lock();
        let r = self.replica.base_end();
        match &r {
            Err(e) => {
                self.fail(&mut health, e);
            }
            Ok(()) => {
                self.counters.bases.fetch_add(1, Ordering::Relaxed);
                let _ =
                    self.counters
                        .history
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                            Some(h.saturating_sub(before))
                        });
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

    /// Put `dirty`'s ranges as they are now; returns the batches put, in order.
    fn send(&self, dirty: &[Dirty], t: &mut Timing) -> io::Result<Vec<SentBatch>> {
        let sizes: Vec<u64> = (0..self.inner.count() as u16)
            .map(|d| self.inner.size(d))
            .collect();
        let mut batch = ReplicaBatch {
            sizes: sizes.clone(),
            extents: Vec::new(),
        };
        let mut data: Vec<AlignedBuf> = Vec::new();
        let mut bytes = 0usize;
        let mut sent: Vec<SentBatch> = Vec::new();
        let flush = |batch: &mut ReplicaBatch,
                     data: &mut Vec<AlignedBuf>,
                     bytes: &mut usize,
                     t: &mut Timing,
                     sent: &mut Vec<SentBatch>| {
            if batch.extents.is_empty() {
                return Ok(());
            }
            let e = std::time::Instant::now();
            let parts: Vec<&[u8]> = data.iter().map(|b| &b[..]).collect();
            let out = batch.encode(&parts);
            // Where each extent's data is in the batch: after the table, in extent order.
            let mut at = (REPLICA_HEADER_BYTES
                + 8 * batch.sizes.len()
                + REPLICA_EXTENT_BYTES * batch.extents.len()) as u64;
            sent.push(
                batch
                    .extents
                    .iter()
                    .map(|x| {
                        let end = x.offset + u64::from(x.len);
                        if x.kind == ExtentKind::Zero {
                            return (x.dev, x.offset, end, None);
                        }
                        at += u64::from(x.len);
                        (x.dev, x.offset, end, Some(at - u64::from(x.len)))
                    })
                    .collect(),
            );
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
                            self.read_current(dev, &mut buf, offset)?;
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
                            flush(&mut batch, &mut data, &mut bytes, t, &mut sent)?;
                        }
                    }
                    (Piece::Data { .. }, None) => {
                        return Err(io::Error::other("a data piece was not read back"))
                    }
                }
            }
        }
        flush(&mut batch, &mut data, &mut bytes, t, &mut sent)?;
        Ok(sent)
    }

    /// The newest bytes of `buf.len()` bytes of device `dev` at `offset`: the local file's,
    /// and the store's for what is cold (a base sends cold ranges as well). Called under the
    /// upload lock, so no eviction drops what it reads locally.
    fn read_current(&self, dev: u16, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        // Listed first: a piece that lands meanwhile is the same bytes in either place.
        let pieces = self
            .cold
            .as_ref()
            .map_or_else(Vec::new, |c| c.pieces(dev, offset, end));
        self.inner.read_at(dev, buf, offset)?;
        for (s, p) in pieces {
            let part = &mut buf[(s - offset) as usize..(p.end - offset) as usize];
            self.replica.fetch(&p.object, p.at, part)?;
        }
        Ok(())
    }

    /// A commit succeeded: `placed` says where each of `sent` is. The map of the store's
    /// ranges follows (a store that cannot say loses the ranges: they stay local for good).
    fn placed(&self, sent: Vec<SentBatch>, placed: Vec<Placed>) {
        let Some(cold) = &self.cold else { return };
        let known = placed.len() == sent.len();
        for (i, batch) in sent.into_iter().enumerate() {
            let object: Option<Arc<str>> = known.then(|| placed[i].object.as_str().into());
            for (dev, start, end, at) in batch {
                match (&object, at) {
                    (Some(o), Some(at)) => cold.committed(dev, start, end, o, placed[i].at + at),
                    _ => cold.uncommitted(dev, start, end),
                }
            }
        }
    }

    /// A blocking read, write or discard of `start..end`, counted for the local cache's
    /// evictions.
    fn counted(
        &self,
        dev: u16,
        start: u64,
        end: u64,
        f: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(c) = &self.cache else { return f() };
        c.begin(dev, start, end);
        let r = f();
        c.end(dev, start, end);
        r
    }

    /// Device bytes the local files hold.
    fn local_bytes(&self) -> io::Result<u64> {
        let mut total = 0;
        for dev in 0..self.inner.count() as u16 {
            total += match self.inner.host_space(dev)? {
                Some(h) => self.inner.size(dev).saturating_sub(h.unallocated_bytes),
                None => self.inner.size(dev),
            };
        }
        Ok(total)
    }

    /// The evictor: each round, past the local cache's budget, drops the least recently used
    /// clean ranges the store holds until a tenth of the budget is free.
    fn evictor(&self) {
        let (Some(cache), Some(cold)) = (&self.cache, &self.cold) else {
            return;
        };
        let mut last_commit = std::time::Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(EVICT_EVERY);
            let round = cache.round.fetch_add(1, Ordering::Relaxed) + 1;
            let local = match self.local_bytes() {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(target: "ingot_engine::replica", error = %e, "the local cache cannot measure its files");
                    continue;
                }
            };
            self.counters.local_bytes.store(local, Ordering::Relaxed);
            if local <= cache.limit {
                continue;
            }
            let want = local - cache.limit / 10 * 9;
            match self.evict(cache, cold, want, round) {
                Ok(n) => {
                    self.counters.evicted_bytes.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(target: "ingot_engine::replica", local, want, evicted = n, "local cache: dropped ranges the store holds");
                    // Writes no client flushed can be dropped only once committed: commit
                    // them (a state a power cut could leave as well; the next sync commits
                    // its own), unless a base is due first.
                    if n < want
                        && !*self.hold.lock()
                        && last_commit.elapsed() >= SELF_COMMIT_EVERY
                        && self.uncommitted_bytes() >= (want - n).min(SELF_COMMIT_MIN)
                    {
                        last_commit = std::time::Instant::now();
                        let _ = self.upload(true);
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "ingot_engine::replica", error = %e, "local cache: dropping ranges failed");
                }
            }
        }
    }

    /// Data bytes written and not committed yet: noted, or sent early.
    fn uncommitted_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed) + self.upload.lock().uncommitted_bytes
    }

    /// Drop up to `want` bytes of clean ranges, the chunks least recently used first (none
    /// used in this round or the last). Returns the bytes dropped.
    fn evict(&self, cache: &Cache, cold: &ColdMap, want: u64, round: u32) -> io::Result<u64> {
        let mut chunks: Vec<(u32, u16, usize)> = Vec::new();
        for (dev, used) in cache.used.iter().enumerate() {
            for (c, u) in used.iter().enumerate() {
                let u = u.load(Ordering::Relaxed);
                if round.wrapping_sub(u) >= 2 {
                    chunks.push((u, dev as u16, c));
                }
            }
        }
        chunks.sort_unstable_by_key(|&(u, _, _)| std::cmp::Reverse(round.wrapping_sub(u)));
        let mut done = 0;
        for group in chunks.chunks(EVICT_GROUP) {
            if done >= want || self.stop.load(Ordering::Acquire) {
                break;
            }
            // Each chunk's reads and writes as they were before anything uncommitted is looked
            // at: one that begins after this changes them, and the chunk is not dropped.
            let seen: Vec<u64> = group
                .iter()
                .map(|&(_, dev, c)| cache.ops[usize::from(dev)][c].load(Ordering::SeqCst))
                .collect();
            // Held while ranges are dropped: no upload takes ranges to send or commits them
            // meanwhile, so what is not noted nor sent is committed where the map says.
            let health = self.upload.lock();
            if let Some(why) = &health.failed {
                return Err(lost(why));
            }
            let mut busy: Vec<Vec<(u64, u64)>> = vec![Vec::new(); cache.used.len()];
            for d in self.dirty.lock().iter() {
                busy[usize::from(d.dev)].push((d.offset, d.offset + d.len));
            }
            for &(dev, a, b, _) in health.sent.iter().flatten() {
                busy[usize::from(dev)].push((a, b));
            }
            for b in &mut busy {
                b.sort_unstable();
            }
            for (&(_, dev, c), &seen) in group.iter().zip(&seen) {
                if seen as u32 != 0 {
                    continue;
                }
                let start = (c as u64) << CHUNK_SHIFT;
                let end = (start + (1 << CHUNK_SHIFT)).min(self.inner.size(dev));
                let cold_now: Vec<(u64, u64)> = cold
                    .pieces(dev, start, end)
                    .into_iter()
                    .map(|(s, p)| (s, p.end))
                    .collect();
                let local = subtract(&cold.stored_pieces(dev, start, end), &cold_now);
                let clean = subtract(&local, &busy[usize::from(dev)]);
                done += cold.evict(
                    dev,
                    &clean,
                    || cache.ops[usize::from(dev)][c].load(Ordering::SeqCst) == seen,
                    || self.replica.devices_partial(),
                    |at, len| self.inner.discard(dev, at, len),
                )?;
            }
        }
        Ok(done)
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
        let end = offset + buf.len() as u64;
        self.s.counted(dev, offset, end, || {
            self.s.ensure(dev, offset, end, BLOCKING_WINDOW)?;
            self.s.inner.read_at(dev, buf, offset)
        })
    }
    fn write_at(&self, dev: u16, buf: &[u8], offset: u64) -> io::Result<()> {
        self.s.check_valid()?;
        let end = offset + buf.len() as u64;
        self.s.counted(dev, offset, end, || {
            self.s.make_local(dev, offset, end);
            self.s.inner.write_at(dev, buf, offset)?;
            self.s.note(dev, ExtentKind::Data, offset, buf.len() as u64);
            Ok(())
        })
    }
    fn sync(&self) -> io::Result<()> {
        // Nothing is added to a cold map: empty before the sync, every fetched range was
        // written before it, and is durable after it.
        // (The evictions counted before it looks: one after that keeps it from saying whole.)
        let whole = self.s.cold.as_ref().and_then(|c| {
            let evictions = c.evictions();
            (!c.is_whole() && c.is_empty()).then_some(evictions)
        });
        self.s.inner.sync()?;
        if let (Some(evictions), Some(c)) = (whole, &self.s.cold) {
            self.s.mark_whole(c, evictions);
        }
        // The engine's own syncs (checkpoints, the last one at shutdown) reach the store
        // before they complete, in either mode; with local acknowledgement, while a base is
        // due, they stay local (the base commits them).
        if self.s.local && *self.s.hold.lock() && !self.s.has_failed() {
            return Ok(());
        }
        self.s.wait_hold()?;
        self.s.commit_now()
    }
    fn discard(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        self.s.counted(dev, offset, offset + len, || {
            self.s.make_local(dev, offset, offset + len);
            self.s.inner.discard(dev, offset, len)?;
            self.s.note(dev, ExtentKind::Zero, offset, len);
            Ok(())
        })
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
            parked: Arc::default(),
            parked_n: 0,
        }))
    }
}

/// A shard's queue: each completed write is noted, and a completed sync is held back until
/// what it covers is in the replica (it fails if that cannot be). Reads fail once the lease
/// ran out. A read of a cold range goes to the fetchers, and completes from their list.
struct MirrorQueue {
    inner: Box<dyn IoQueue>,
    devices: Arc<Shared>,
    parked: Arc<Parked>,
    /// Reads handed to the fetchers and not reaped yet.
    parked_n: usize,
}

impl IoQueue for MirrorQueue {
    fn push(&mut self, op: IoOp) {
        let s = &self.devices;
        let end = op.offset + op.len as u64;
        if let Some(c) = &s.cache {
            // The whole buffer, as its completion is counted off (it may be longer than
            // `len`).
            if matches!(op.kind, OpKind::Write | OpKind::Read) {
                c.begin(op.dev, op.offset, op.offset + op.buf.len() as u64);
            }
        }
        match (op.kind, &s.cold, &s.fetch) {
            (OpKind::Read, Some(cold), Some(tx)) if cold.overlaps(op.dev, op.offset, end) => {
                self.parked_n += 1;
                if let Err(e) = tx.send((op, self.parked.clone())) {
                    let (op, _) = e.into_inner();
                    self.parked
                        .done
                        .lock()
                        .push(op.done(Err(lost("the fetchers stopped"))));
                }
            }
            (OpKind::Write, Some(_), _) => {
                s.make_local(op.dev, op.offset, end);
                self.inner.push(op);
            }
            _ => self.inner.push(op),
        }
    }
    fn submit(&mut self, min_complete: usize) -> io::Result<()> {
        if min_complete == 0 || self.parked_n == 0 || !self.parked.done.lock().is_empty() {
            return self
                .inner
                .submit(if self.parked_n == 0 { min_complete } else { 0 });
        }
        if self.inner.in_flight() > 0 {
            return self.inner.submit(1);
        }
        self.inner.submit(0)?;
        let mut d = self.parked.done.lock();
        while d.is_empty() {
            self.parked.cv.wait_for(&mut d, Duration::from_millis(100));
        }
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<IoDone>) {
        let parked_from = out.len();
        if self.parked_n > 0 {
            let mut d = self.parked.done.lock();
            self.parked_n -= d.len();
            out.append(&mut d);
        }
        let from = out.len();
        self.inner.reap(out);
        let s = &self.devices;
        for d in &out[from..] {
            if d.kind == OpKind::Write && d.result.is_ok() {
                s.note(d.dev, ExtentKind::Data, d.offset, d.buf.len() as u64);
            }
        }
        if let Some(c) = &s.cache {
            for d in &out[parked_from..] {
                if matches!(d.kind, OpKind::Write | OpKind::Read) {
                    c.end(d.dev, d.offset, d.offset + d.buf.len() as u64);
                }
            }
        }
        for d in &mut out[from..] {
            match d.kind {
                OpKind::Sync if d.result.is_ok() => d.result = s.after_sync(),
                OpKind::Read if d.result.is_ok() => d.result = s.check_valid(),
                _ => {}
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.parked_n
    }
    unsafe fn write_buf(&mut self, len: usize) -> AlignedBuf {
        // SAFETY: the caller's contract.
        unsafe { self.inner.write_buf(len) }
    }
    fn wait(&mut self, bell: &Arc<Doorbell>) -> io::Result<()> {
        if self.parked_n == 0 {
            return self.inner.wait(bell);
        }
        // A fetcher that finishes from here on rings the bell: the caller set it to be rung
        // (`about_to_wait`) before calling.
        {
            let mut b = self.parked.bell.lock();
            if b.as_ref().is_none_or(|b| !Arc::ptr_eq(b, bell)) {
                *b = Some(bell.clone());
            }
        }
        if !self.parked.done.lock().is_empty() {
            return self.inner.submit(0);
        }
        if self.inner.fd().is_some() {
            // A ring: it wakes for the bell as well as for its own completions.
            return self.inner.wait(bell);
        }
        if self.inner.in_flight() > 0 {
            return self.inner.submit(1);
        }
        self.inner.submit(0)?;
        let mut d = self.parked.done.lock();
        if d.is_empty() {
            self.parked.cv.wait_for(&mut d, Duration::from_millis(1));
        }
        Ok(())
    }
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        // A connection's reader polls this descriptor alone: while ranges are cold, reads
        // go through the shards, whose queues wait for the fetchers too.
        // With a local cache, ranges may turn cold after a reader took the descriptor.
        match &self.devices.cold {
            Some(c) if !c.is_empty() || self.devices.cache.is_some() => None,
            _ => self.inner.fd(),
        }
    }
}
