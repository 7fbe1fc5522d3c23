//! Device ranges a node took over without fetching them: a takeover lists where each range's
//! newest bytes sit in the store (which batch object, at which byte) instead of copying every
//! batch onto local flash first, so that the time to serve depends on the number of objects
//! since the last base, not on the pool's size. A read of a cold range fetches it with a range
//! read of that object and writes it locally first (`MirrorDevices`); a write or discard makes
//! it local; a background filler fetches the rest.
//!
//! The map is the truth for the ranges it holds: whatever the local file has there (an older
//! inline batch, a stale copy) is never read. A cold range is a hole in the local file (a
//! takeover punches what an inline batch left under it), so that after a clean stop the holes
//! say again which located ranges are cold ([`restore_cold`] with `keep`).
//!
//! The map also knows where every committed range is in the store (`stored`, kept up to date by
//! each commit's placements), so that a node with a local cache budget can drop a clean range
//! from its files ([`ColdMap::evict`]): it is cold again, and read back from the store on use.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::{ExtentKind, ReplicaBatch, IO_ALIGN};

/// A stored range: bytes `start..end` of a device (the map's key is `start`) are bytes
/// `at..at + (end - start)` of store object `object` (its name, shared by the ranges it holds:
/// it goes when the last of them does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cold {
    pub end: u64,
    pub object: Arc<str>,
    pub at: u64,
}

/// One cold piece to fetch: `(start, cold)`.
pub(crate) type Piece = (u64, Cold);

/// Where the cold ranges of a pool's devices are in the store, and where every range the store
/// holds is.
pub struct ColdMap {
    devs: Vec<Mutex<BTreeMap<u64, Cold>>>,
    /// Every committed data range, cold or local: where its newest bytes are in the store.
    stored: Vec<Mutex<BTreeMap<u64, Cold>>>,
    /// Held shared by a fetch from its look at what is still cold until it took what it
    /// wrote out of the map, and exclusively by a write of a range that is still cold: such a
    /// write waits for the fetches writing there, and no fetch starts writing there after it
    /// (it finds the range local). Fetches write side by side.
    gate: parking_lot::RwLock<()>,
    /// Bytes still cold.
    bytes: AtomicU64,
    /// Fetches landing now (`land`).
    landing: AtomicU64,
    /// Nothing is cold, and a sync of the devices after that made every fetch durable.
    whole: std::sync::atomic::AtomicBool,
    /// Held while `whole` changes, and while the store's record of it does: an eviction
    /// records the devices partial before its first hole, and a sync that found nothing cold
    /// says whole only if no eviction came since (`evictions`).
    whole_lock: Mutex<()>,
    evictions: AtomicU64,
    /// The store's record says partial, as this process last wrote it (an eviction writes it
    /// before its first hole, whatever the record said at start).
    partial_noted: std::sync::atomic::AtomicBool,
    /// No eviction from now on ([`ColdMap::seal`]).
    sealed: std::sync::atomic::AtomicBool,
    /// Bytes and pieces fetched since open (`stats`).
    pub(crate) fetched_bytes: AtomicU64,
    pub(crate) fetches: AtomicU64,
}

impl std::fmt::Debug for ColdMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdMap")
            .field("cold_bytes", &self.cold_bytes())
            .finish()
    }
}

/// Remove `start..end` from `map`, splitting what overlaps it. Returns the bytes removed.
fn cut(map: &mut BTreeMap<u64, Cold>, start: u64, end: u64) -> u64 {
    let hit: Vec<(u64, Cold)> = map
        .range(..end)
        .rev()
        .take_while(|(_, c)| c.end > start)
        .map(|(&s, c)| (s, c.clone()))
        .collect();
    let mut removed = 0;
    for (s, c) in hit {
        map.remove(&s);
        removed += c.end.min(end) - s.max(start);
        if c.end > end {
            map.insert(
                end,
                Cold {
                    end: c.end,
                    object: c.object.clone(),
                    at: c.at + (end - s),
                },
            );
        }
        if s < start {
            map.insert(s, Cold { end: start, ..c });
        }
    }
    removed
}

/// Make `start..c.end` of `map` the range `c` says, replacing what overlaps it. Returns the
/// bytes it replaced.
fn place(map: &mut BTreeMap<u64, Cold>, start: u64, c: Cold) -> u64 {
    let removed = cut(map, start, c.end);
    map.insert(start, c);
    removed
}

/// Piece `(s, c)` clipped to `start..end` (which it overlaps).
pub(crate) fn clip((s, c): (u64, &Cold), start: u64, end: u64) -> Piece {
    let from = s.max(start);
    (
        from,
        Cold {
            end: c.end.min(end),
            object: c.object.clone(),
            at: c.at + (from - s),
        },
    )
}

/// The entries of `map` over `start..end`, clipped to it, in order.
fn clipped(map: &BTreeMap<u64, Cold>, start: u64, end: u64) -> Vec<Piece> {
    let mut out: Vec<Piece> = map
        .range(..end)
        .rev()
        .take_while(|(_, c)| c.end > start)
        .map(|(&s, c)| clip((s, c), start, end))
        .collect();
    out.reverse();
    out
}

/// `a` less every range of `b` (both sorted, `a`'s ranges disjoint).
pub(crate) fn subtract(a: &[Piece], b: &[(u64, u64)]) -> Vec<Piece> {
    let mut out = Vec::new();
    for (s, c) in a {
        let mut at = *s;
        for &(bs, be) in b.iter().filter(|(bs, be)| *be > *s && *bs < c.end) {
            if bs > at {
                out.push(clip((*s, c), at, bs));
            }
            at = at.max(be);
        }
        if at < c.end {
            out.push(clip((*s, c), at, c.end));
        }
    }
    out
}

impl ColdMap {
    pub fn new(devices: usize) -> ColdMap {
        ColdMap {
            devs: (0..devices).map(|_| Mutex::default()).collect(),
            stored: (0..devices).map(|_| Mutex::default()).collect(),
            gate: parking_lot::RwLock::new(()),
            bytes: AtomicU64::new(0),
            landing: AtomicU64::new(0),
            whole: std::sync::atomic::AtomicBool::new(false),
            whole_lock: Mutex::new(()),
            evictions: AtomicU64::new(0),
            partial_noted: std::sync::atomic::AtomicBool::new(false),
            sealed: std::sync::atomic::AtomicBool::new(false),
            fetched_bytes: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        }
    }

    /// Bytes of the devices still only in the store.
    pub fn cold_bytes(&self) -> u64 {
        // Sequentially consistent: the fast paths that skip an empty map rely on it against
        // an eviction (`evict`).
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.cold_bytes() == 0
    }

    /// Every range is local and durable: the local devices hold the whole pool again.
    pub fn is_whole(&self) -> bool {
        self.whole.load(Ordering::Acquire)
    }

    /// A clean stop: no range is dropped from now on, and whether the devices are whole (what
    /// the stop records for the next start; an eviction after it would make that untrue).
    pub fn seal(&self) -> bool {
        let _g = self.whole_lock.lock();
        self.sealed.store(true, Ordering::Release);
        self.is_whole()
    }

    /// Evictions so far: read before a sync that may make the devices whole.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Acquire)
    }

    /// After a sync of the devices: they are whole if nothing was cold before it (and no
    /// eviction came since `evictions` was read then) nor is now; `record` writes that where
    /// the next start looks first.
    pub(crate) fn set_whole_if(
        &self,
        evictions: u64,
        record: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        let _g = self.whole_lock.lock();
        if self.is_whole() {
            return Ok(true);
        }
        if self.evictions() != evictions || !self.is_empty() {
            return Ok(false);
        }
        record()?;
        self.partial_noted.store(false, Ordering::Release);
        self.whole.store(true, Ordering::Release);
        Ok(true)
    }

    /// Bytes `start..end` of device `dev` are now in `object` at `at` (a later batch), and
    /// only there.
    fn set(&mut self, dev: u16, start: u64, end: u64, object: Arc<str>, at: u64) {
        let c = Cold { end, object, at };
        place(self.stored[usize::from(dev)].get_mut(), start, c.clone());
        let removed = place(self.devs[usize::from(dev)].get_mut(), start, c);
        *self.bytes.get_mut() += (end - start) - removed;
    }

    /// Bytes `start..end` of device `dev` are local, and also in `object` at `at` (an inline
    /// batch applied to the local files).
    fn set_local(&mut self, dev: u16, start: u64, end: u64, object: Arc<str>, at: u64) {
        place(
            self.stored[usize::from(dev)].get_mut(),
            start,
            Cold { end, object, at },
        );
        let removed = cut(self.devs[usize::from(dev)].get_mut(), start, end);
        *self.bytes.get_mut() -= removed;
    }

    /// `start..end` of device `dev` reads as zeroes.
    fn set_zero(&mut self, dev: u16, start: u64, end: u64) {
        cut(self.stored[usize::from(dev)].get_mut(), start, end);
        let removed = cut(self.devs[usize::from(dev)].get_mut(), start, end);
        *self.bytes.get_mut() -= removed;
    }

    /// A commit placed bytes `start..end` of device `dev` in `object` at `at`: the newest bytes
    /// of that range are there, and the cold parts of it are read from there from now on (a
    /// base copied them; the objects they were in may go).
    pub(crate) fn committed(&self, dev: u16, start: u64, end: u64, object: &Arc<str>, at: u64) {
        let c = Cold {
            end,
            object: object.clone(),
            at,
        };
        place(&mut self.stored[usize::from(dev)].lock(), start, c.clone());
        if self.is_empty() {
            return;
        }
        let mut map = self.devs[usize::from(dev)].lock();
        for (from, p) in clipped(&map, start, end) {
            place(&mut map, from, clip((start, &c), from, p.end).1);
        }
    }

    /// A commit discarded `start..end` of device `dev`, or could not say where it put it:
    /// nothing in the store holds its newest bytes.
    pub(crate) fn uncommitted(&self, dev: u16, start: u64, end: u64) {
        cut(&mut self.stored[usize::from(dev)].lock(), start, end);
    }

    /// Where the committed ranges in `start..end` of device `dev` are, clipped to it.
    pub(crate) fn stored_pieces(&self, dev: u16, start: u64, end: u64) -> Vec<Piece> {
        clipped(&self.stored[usize::from(dev)].lock(), start, end)
    }

    /// Every cold range of device `dev`, as `(start, end)`.
    pub(crate) fn cold_ranges(&self, dev: u16) -> Vec<(u64, u64)> {
        let map = self.devs[usize::from(dev)].lock();
        map.iter().map(|(&s, c)| (s, c.end)).collect()
    }

    /// Drop `pieces` of device `dev` (local and clean, each where the store has its newest
    /// bytes) from the local file: they are cold from now on. `clean` is asked again under the
    /// map's lock, which a read or write takes to see whether its range is cold: one that
    /// began before makes it false; a write that begins after finds the range cold and waits
    /// for the holes (`gate`) before it writes, and a read fetches it, landing once the holes
    /// are punched (under the map's lock). Returns the bytes made cold.
    /// `partial` records, before the first hole of devices that were whole, that they no
    /// longer are.
    pub(crate) fn evict(
        &self,
        dev: u16,
        pieces: &[Piece],
        clean: impl FnOnce() -> bool,
        partial: impl FnOnce() -> std::io::Result<()>,
        punch: impl Fn(u64, u64) -> std::io::Result<()>,
    ) -> std::io::Result<u64> {
        if pieces.is_empty() {
            return Ok(0);
        }
        let _punching = self.gate.read();
        let _whole = self.whole_lock.lock();
        if self.sealed.load(Ordering::Acquire) {
            return Ok(0);
        }
        if !self.partial_noted.load(Ordering::Acquire) {
            partial()?;
            self.partial_noted.store(true, Ordering::Release);
        }
        let was_whole = self.whole.swap(false, Ordering::AcqRel);
        self.evictions.fetch_add(1, Ordering::AcqRel);
        let mut map = self.devs[usize::from(dev)].lock();
        // Counted before `clean` looks (both sequentially consistent): a read or write that
        // begins after that look finds the map not empty, so it takes the map's lock and sees
        // the ranges cold; one that began before makes `clean` false.
        let total: u64 = pieces.iter().map(|(s, c)| c.end - s).sum();
        self.bytes.fetch_add(total, Ordering::SeqCst);
        if !clean() {
            self.bytes.fetch_sub(total, Ordering::SeqCst);
            // Nothing was dropped (the store's record stays partial: only a cost).
            self.whole.store(was_whole, Ordering::Release);
            return Ok(0);
        }
        for (s, c) in pieces {
            let removed = place(&mut map, *s, c.clone());
            self.bytes.fetch_sub(removed, Ordering::SeqCst);
        }
        // The holes are punched under the map's lock: a fetch that lands these ranges (for a
        // read that found them cold) looks at the map after, and its bytes are not punched
        // (fetches land side by side under the gate, which does not keep them out). A hole that
        // failed to punch leaves local bytes nobody reads: only space is lost.
        for (s, c) in pieces {
            punch(*s, c.end - s)?;
        }
        Ok(total)
    }

    /// `start..end` of device `dev` is local from now on: it is about to be written or
    /// discarded. Returns once no fetch can write there any more.
    pub(crate) fn clear(&self, dev: u16, start: u64, end: u64) {
        // A range that is not cold now, while no fetch is landing, has no fetch writing it.
        // (Two fetches of the same range may both have picked it while cold: the first to
        // land takes it out of the map, and the other still writes it.)
        if self.landing.load(Ordering::SeqCst) == 0 && !self.overlaps(dev, start, end) {
            return;
        }
        let _no_fetch_writes = self.gate.write();
        let mut map = self.devs[usize::from(dev)].lock();
        self.clear_locked(&mut map, start, end);
    }

    fn clear_locked(&self, map: &mut BTreeMap<u64, Cold>, start: u64, end: u64) {
        let removed = cut(map, start, end);
        if removed > 0 {
            self.bytes.fetch_sub(removed, Ordering::AcqRel);
        }
    }

    /// Whether any of `start..end` of device `dev` is cold.
    pub(crate) fn overlaps(&self, dev: u16, start: u64, end: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        let map = self.devs[usize::from(dev)].lock();
        map.range(..end)
            .next_back()
            .is_some_and(|(_, c)| c.end > start)
    }

    /// The cold pieces of `start..end` of device `dev`, clipped to it.
    pub(crate) fn pieces(&self, dev: u16, start: u64, end: u64) -> Vec<Piece> {
        if self.is_empty() {
            return Vec::new();
        }
        clipped(&self.devs[usize::from(dev)].lock(), start, end)
    }

    /// Up to `n` cold pieces of at most `max` bytes each, from the lowest: what the filler
    /// fetches next.
    pub(crate) fn next_pieces(&self, n: usize, max: u64) -> Vec<(u16, Piece)> {
        let mut out = Vec::new();
        for (dev, m) in self.devs.iter().enumerate() {
            let map = m.lock();
            for (&s, c) in map.iter() {
                let mut at = s;
                while at < c.end && out.len() < n {
                    let end = c.end.min(at + max);
                    out.push((
                        dev as u16,
                        (
                            at,
                            Cold {
                                end,
                                object: c.object.clone(),
                                at: c.at + (at - s),
                            },
                        ),
                    ));
                    at = end;
                }
                if out.len() >= n {
                    return out;
                }
            }
        }
        out
    }

    /// After `buf` was fetched for `piece` of device `dev`: write (with `write`) and mark
    /// local the parts of it that are still cold and still from that object at that place
    /// (a write or another fetch may have made some local meanwhile; those are not touched).
    /// A write of the range waits until this is done (`gate`), and lands after.
    pub(crate) fn land(
        &self,
        dev: u16,
        piece: Piece,
        buf: &[u8],
        write: impl Fn(&[u8], u64) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let (start, p) = piece;
        let _writing = self.gate.read();
        // Counted before it looks at the map (`clear`), until it took what it wrote out.
        self.landing.fetch_add(1, Ordering::SeqCst);
        struct Landed<'a>(&'a AtomicU64);
        impl Drop for Landed<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _landed = Landed(&self.landing);
        let parts: Vec<(u64, u64)> = {
            let map = self.devs[usize::from(dev)].lock();
            map.range(..p.end)
                .rev()
                .take_while(|(_, c)| c.end > start)
                // The same bytes of the same object at the same place of the device.
                .filter(|(&s, c)| {
                    let from = s.max(start);
                    c.object == p.object && c.at + (from - s) == p.at + (from - start)
                })
                .map(|(&s, c)| (s.max(start), c.end.min(p.end)))
                .collect()
        };
        for &(from, to) in &parts {
            let lo = (from - start) as usize;
            let hi = (to - start) as usize;
            write(&buf[lo..hi], from)?;
        }
        // Still cold, as no write can have come in between (the gate), and another fetch
        // of the same bytes wrote the same bytes.
        let mut map = self.devs[usize::from(dev)].lock();
        for (from, to) in parts {
            self.clear_locked(&mut map, from, to);
        }
        drop(map);
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(p.end - start, Ordering::Relaxed);
        Ok(())
    }
}

/// What a lazy restore gets from the store, in log order.
pub enum Stored {
    /// A small sync's batch, whole (from its log record): applied to the local files. It is
    /// also bytes `at..` of store object `object` (the record).
    Inline {
        batch: Vec<u8>,
        object: String,
        at: u64,
    },
    /// A batch object: its name, its first bytes (at least its table), and its length.
    Object {
        name: String,
        head: Vec<u8>,
        len: u64,
    },
}

/// Rebuild a pool's devices from its store lazily: create (or truncate) `paths`, apply the
/// inline batches `next` yields and list where the objects' ranges are, then sync the files.
/// Open the pool with the map (`PoolOptions::replica_cold`): reads of cold ranges fetch
/// them. The caller holds the pool's lock (`pool.lock`), as for [`super::restore`].
///
/// With `keep`, the local files are this node's own after a clean stop with nothing committed
/// since (they hold every committed byte, except the ranges it had dropped, which are holes):
/// nothing is written; the map lists where every range is, and the located ranges that are
/// holes locally are cold.
pub fn restore_cold(
    paths: &[std::path::PathBuf],
    next: &mut dyn FnMut() -> Result<Option<Stored>>,
    progress: &mut dyn FnMut(u64, u64),
    keep: bool,
) -> Result<ColdMap> {
    let files = super::open_devices(paths, keep)?;
    let mut map = ColdMap::new(files.len());
    let io = |source: std::io::Error| Error::Io {
        device: 0,
        offset: 0,
        source,
    };
    let grow = |files: &[File], sizes: &[u64]| -> Result<()> {
        if sizes.len() != files.len() {
            return Err(Error::Corrupt {
                what: "replica batch for another number of devices",
            });
        }
        if keep {
            return Ok(());
        }
        for (f, &size) in files.iter().zip(sizes) {
            if f.metadata().map_err(io)?.len() != size {
                f.set_len(size).map_err(io)?;
            }
        }
        Ok(())
    };
    let (mut batches, mut bytes) = (0u64, 0u64);
    while let Some(s) = next()? {
        match s {
            Stored::Inline { batch, object, at } => {
                let (b, data_at) = ReplicaBatch::decode(&batch)?;
                grow(&files, &b.sizes)?;
                if !keep {
                    super::apply_batch(&files, &batch)?;
                }
                let object: Arc<str> = object.into();
                for (e, d) in b.extents.iter().zip(data_at) {
                    let (start, end) = (e.offset, e.offset + u64::from(e.len));
                    match d {
                        Some(d) if e.kind == ExtentKind::Data => {
                            map.set_local(e.dev, start, end, object.clone(), at + d as u64)
                        }
                        _ => map.set_zero(e.dev, start, end),
                    }
                }
                bytes += batch.len() as u64;
            }
            Stored::Object { name, head, len } => {
                let (batch, at) = ReplicaBatch::decode_table(&head, len)?;
                grow(&files, &batch.sizes)?;
                let object: Arc<str> = name.into();
                for (e, at) in batch.extents.iter().zip(at) {
                    let (start, end) = (e.offset, e.offset + u64::from(e.len));
                    match (e.kind, at) {
                        (ExtentKind::Data, Some(at)) => {
                            if start % IO_ALIGN as u64 != 0 || end % IO_ALIGN as u64 != 0 {
                                return Err(Error::Corrupt {
                                    what: "replica extent not aligned to 4 KiB",
                                });
                            }
                            map.set(e.dev, start, end, object.clone(), at);
                        }
                        _ => {
                            map.set_zero(e.dev, start, end);
                            if !keep {
                                super::punch(&files[usize::from(e.dev)], start, end - start)
                                    .map_err(|source| Error::Io {
                                        device: e.dev,
                                        offset: start,
                                        source,
                                    })?;
                            }
                        }
                    }
                }
                bytes += len;
            }
        }
        batches += 1;
        progress(batches, bytes);
    }
    if keep {
        *map.bytes.get_mut() = 0;
    }
    for (dev, f) in files.iter().enumerate() {
        let err = |source| Error::Io {
            device: dev as u16,
            offset: 0,
            source,
        };
        let dev16 = dev as u16;
        if keep {
            // What the store has and the local file does not: dropped by this node (its data
            // ranges hold every other committed byte).
            let size = f.metadata().map_err(io)?.len();
            let local = crate::io::sync::data_extents(f, size).map_err(err)?;
            let stored = clipped(map.stored[dev].get_mut(), 0, u64::MAX);
            let cold = subtract(&stored, &local);
            let m = map.devs[dev].get_mut();
            m.clear();
            for (s, c) in cold {
                *map.bytes.get_mut() += c.end - s;
                m.insert(s, c);
            }
        } else {
            // An inline batch may have left older bytes under a range a later object holds: a
            // cold range is a hole, so that a clean stop's holes say what is cold.
            for (s, e) in map.cold_ranges(dev16) {
                super::punch(f, s, e - s).map_err(err)?;
            }
        }
    }
    if !keep {
        super::sync_devices(&files, paths)?;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cold(end: u64, object: usize, at: u64) -> Cold {
        Cold {
            end,
            object: ["a", "b"][object].into(),
            at,
        }
    }

    /// A clean restart keeps the files: on each device, the listed ranges it holds no data
    /// for are cold, and only those.
    #[test]
    fn a_kept_restart_finds_the_holes_of_every_device_cold() {
        use crate::format::ReplicaExtent;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().join("d0"), dir.path().join("d1")];
        for p in &paths {
            let f = File::create(p).unwrap();
            f.write_all_at(&vec![7u8; 256 << 10], 0).unwrap();
            f.set_len(1 << 20).unwrap();
        }
        // Device 0 dropped its first 64 KiB; device 1 holds everything.
        super::super::punch(
            &File::options().write(true).open(&paths[0]).unwrap(),
            0,
            64 << 10,
        )
        .unwrap();
        let data = vec![7u8; 128 << 10];
        let extent = |dev| ReplicaExtent {
            dev,
            kind: ExtentKind::Data,
            len: 128 << 10,
            offset: 0,
            crc: crc32fast::hash(&data),
        };
        let batch = ReplicaBatch {
            sizes: vec![1 << 20, 1 << 20],
            extents: vec![extent(0), extent(1)],
        }
        .encode(&[&data, &data]);
        let table = ReplicaBatch::table_bytes(&batch).unwrap();
        let mut one = Some(Stored::Object {
            name: "o".into(),
            head: batch[..table].to_vec(),
            len: batch.len() as u64,
        });
        let m = restore_cold(&paths, &mut || Ok(one.take()), &mut |_, _| {}, true).unwrap();
        assert_eq!(m.cold_bytes(), 64 << 10);
        assert_eq!(m.cold_ranges(0), vec![(0, 64 << 10)]);
        assert!(m.cold_ranges(1).is_empty());
        assert!(m.overlaps(0, 0, 4096));
        assert_eq!(m.stored_pieces(1, 0, 1 << 20).len(), 1);
    }

    #[test]
    fn later_batches_overwrite_and_writes_clear_cold_ranges() {
        let mut m = ColdMap::new(1);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        m.set(0, 0, 100, a.clone(), 1000);
        m.set(0, 40, 60, b.clone(), 5);
        assert_eq!(m.cold_bytes(), 100);
        assert_eq!(
            m.pieces(0, 0, 100),
            vec![
                (0, cold(40, 0, 1000)),
                (40, cold(60, 1, 5)),
                (60, cold(100, 0, 1060))
            ]
        );
        assert_eq!(
            m.pieces(0, 50, 70),
            vec![(50, cold(60, 1, 15)), (60, cold(70, 0, 1060))]
        );
        m.clear(0, 30, 50);
        assert_eq!(m.cold_bytes(), 80);
        assert!(!m.overlaps(0, 30, 40));
        assert!(m.overlaps(0, 29, 30));
        assert!(m.overlaps(0, 30, 51));
        // A fetch lands only where the same object's same bytes are still cold.
        let buf: Vec<u8> = (0..100u8).collect();
        let wrote = Mutex::new(Vec::new());
        m.land(0, (0, cold(100, 0, 1000)), &buf, |b, at| {
            wrote.lock().push((at, b.len(), b[0]));
            Ok(())
        })
        .unwrap();
        assert_eq!(*wrote.lock(), vec![(60, 40, 60), (0, 30, 0)]);
        assert_eq!(m.pieces(0, 0, 100), vec![(50, cold(60, 1, 15))]);
        assert_eq!(m.cold_bytes(), 10);
        assert_eq!(
            m.next_pieces(4, 4),
            vec![
                (0, (50, cold(54, 1, 15))),
                (0, (54, cold(58, 1, 19))),
                (0, (58, cold(60, 1, 23)))
            ]
        );
    }
}
