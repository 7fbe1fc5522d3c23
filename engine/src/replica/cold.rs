//! Device ranges a node took over without fetching them: a takeover lists where each range's
//! newest bytes sit in the store (which batch object, at which byte) instead of copying every
//! batch onto local flash first, so that the time to serve depends on the number of objects
//! since the last base, not on the pool's size. A read of a cold range fetches it with a range
//! read of that object and writes it locally first (`MirrorDevices`); a write or discard makes
//! it local; a background filler fetches the rest.
//!
//! The map is the truth for the ranges it holds: whatever the local file has there (an older
//! inline batch, a stale copy) is never read.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::{ExtentKind, ReplicaBatch, IO_ALIGN};

/// A cold range: bytes `start..end` of a device (the map's key is `start`) are bytes
/// `at..at + (end - start)` of store object `object`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cold {
    pub end: u64,
    pub object: u32,
    pub at: u64,
}

/// One cold piece to fetch: `(start, cold)`.
pub(crate) type Piece = (u64, Cold);

/// Where the cold ranges of a pool's devices are in the store.
pub struct ColdMap {
    objects: Vec<String>,
    devs: Vec<Mutex<BTreeMap<u64, Cold>>>,
    /// Held shared by a fetch from its look at what is still cold until it took what it
    /// wrote out of the map, and exclusively by a write of a range that is still cold: such a
    /// write waits for the fetches writing there, and no fetch starts writing there after it
    /// (it finds the range local). Fetches write side by side.
    gate: parking_lot::RwLock<()>,
    /// Bytes still cold.
    bytes: AtomicU64,
    /// Nothing is cold, and a sync of the devices after that made every fetch durable.
    whole: std::sync::atomic::AtomicBool,
    /// Bytes and pieces fetched since open (`stats`).
    pub(crate) fetched_bytes: AtomicU64,
    pub(crate) fetches: AtomicU64,
}

impl std::fmt::Debug for ColdMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdMap")
            .field("objects", &self.objects.len())
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
        .map(|(&s, &c)| (s, c))
        .collect();
    let mut removed = 0;
    for (s, c) in hit {
        map.remove(&s);
        if s < start {
            map.insert(s, Cold { end: start, ..c });
        }
        if c.end > end {
            map.insert(
                end,
                Cold {
                    end: c.end,
                    object: c.object,
                    at: c.at + (end - s),
                },
            );
        }
        removed += c.end.min(end) - s.max(start);
    }
    removed
}

impl ColdMap {
    pub fn new(devices: usize) -> ColdMap {
        ColdMap {
            objects: Vec::new(),
            devs: (0..devices).map(|_| Mutex::default()).collect(),
            gate: parking_lot::RwLock::new(()),
            bytes: AtomicU64::new(0),
            whole: std::sync::atomic::AtomicBool::new(false),
            fetched_bytes: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        }
    }

    /// Bytes of the devices still only in the store.
    pub fn cold_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.cold_bytes() == 0
    }

    /// Every range is local and durable: the local devices hold the whole pool again.
    pub fn is_whole(&self) -> bool {
        self.whole.load(Ordering::Acquire)
    }

    pub(crate) fn set_whole(&self) {
        self.whole.store(true, Ordering::Release);
    }

    pub(crate) fn object_name(&self, object: u32) -> &str {
        &self.objects[object as usize]
    }

    /// Bytes `start..end` of device `dev` are now in `object` at `at` (a later batch).
    fn set(&mut self, dev: u16, start: u64, end: u64, object: u32, at: u64) {
        let map = self.devs[usize::from(dev)].get_mut();
        let removed = cut(map, start, end);
        map.insert(start, Cold { end, object, at });
        *self.bytes.get_mut() += (end - start) - removed;
    }

    /// `start..end` of device `dev` is local from now on: it is about to be written or
    /// discarded. Returns once no fetch can write there any more.
    pub(crate) fn clear(&self, dev: u16, start: u64, end: u64) {
        // A range that is not cold now has no fetch writing it (a fetch takes what it wrote
        // out of the map only after writing).
        if !self.overlaps(dev, start, end) {
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
        let map = self.devs[usize::from(dev)].lock();
        let mut out: Vec<Piece> = map
            .range(..end)
            .rev()
            .take_while(|(_, c)| c.end > start)
            .map(|(&s, &c)| {
                let from = s.max(start);
                (
                    from,
                    Cold {
                        end: c.end.min(end),
                        object: c.object,
                        at: c.at + (from - s),
                    },
                )
            })
            .collect();
        out.reverse();
        out
    }

    /// Up to `n` cold pieces of at most `max` bytes each, from the lowest: what the filler
    /// fetches next.
    pub(crate) fn next_pieces(&self, n: usize, max: u64) -> Vec<(u16, Piece)> {
        let mut out = Vec::new();
        for (dev, m) in self.devs.iter().enumerate() {
            let map = m.lock();
            for (&s, &c) in map.iter() {
                let mut at = s;
                while at < c.end && out.len() < n {
                    let end = c.end.min(at + max);
                    out.push((
                        dev as u16,
                        (
                            at,
                            Cold {
                                end,
                                object: c.object,
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
    /// A small sync's batch, whole (from its log record): applied to the local files.
    Inline(Vec<u8>),
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
pub fn restore_cold(
    paths: &[std::path::PathBuf],
    next: &mut dyn FnMut() -> Result<Option<Stored>>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ColdMap> {
    let files = super::create_devices(paths)?;
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
            Stored::Inline(b) => {
                let (batch, _) = ReplicaBatch::decode(&b)?;
                super::apply_batch(&files, &b)?;
                for e in &batch.extents {
                    let m = map.devs[usize::from(e.dev)].get_mut();
                    let removed = cut(m, e.offset, e.offset + u64::from(e.len));
                    *map.bytes.get_mut() -= removed;
                }
                bytes += b.len() as u64;
            }
            Stored::Object { name, head, len } => {
                let (batch, at) = ReplicaBatch::decode_table(&head, len)?;
                grow(&files, &batch.sizes)?;
                let object = map.objects.len() as u32;
                map.objects.push(name);
                for (e, at) in batch.extents.iter().zip(at) {
                    let (start, end) = (e.offset, e.offset + u64::from(e.len));
                    match (e.kind, at) {
                        (ExtentKind::Data, Some(at)) => {
                            if start % IO_ALIGN as u64 != 0 || end % IO_ALIGN as u64 != 0 {
                                return Err(Error::Corrupt {
                                    what: "replica extent not aligned to 4 KiB",
                                });
                            }
                            map.set(e.dev, start, end, object, at);
                        }
                        _ => {
                            let m = map.devs[usize::from(e.dev)].get_mut();
                            let removed = cut(m, start, end);
                            *map.bytes.get_mut() -= removed;
                            super::punch(&files[usize::from(e.dev)], start, end - start).map_err(
                                |source| Error::Io {
                                    device: e.dev,
                                    offset: start,
                                    source,
                                },
                            )?;
                        }
                    }
                }
                bytes += len;
            }
        }
        batches += 1;
        progress(batches, bytes);
    }
    super::sync_devices(&files, paths)?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cold(end: u64, object: u32, at: u64) -> Cold {
        Cold { end, object, at }
    }

    #[test]
    fn later_batches_overwrite_and_writes_clear_cold_ranges() {
        let mut m = ColdMap::new(1);
        m.objects = vec!["a".into(), "b".into()];
        m.set(0, 0, 100, 0, 1000);
        m.set(0, 40, 60, 1, 5);
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
