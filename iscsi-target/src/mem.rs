//! An in-memory logical unit for unit tests and the fuzzer: a byte vector with the engine's
//! request semantics (range checks, trims and zeroing read back as zeroes and become holes).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use ingot_engine::{check_range, Completion, Error, Extent, Reply, Request, Result};
use ingot_engine::{MAX_REQUEST_BYTES, SECTOR_BYTES};
use parking_lot::Mutex;

use crate::backend::LuBackend;

/// A volume held in memory. Every request completes inside `submit`.
pub struct MemLu {
    name: String,
    read_only: bool,
    flushes: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    data: Vec<u8>,
    /// Per 512-byte sector: holds data (false: a hole, reads as zeroes).
    mapped: Vec<bool>,
    /// While set, every request fails with the error this makes.
    failure: Option<fn() -> Error>,
}

impl MemLu {
    /// A zero-filled, unmapped volume of `size_bytes` (rounded down to whole sectors).
    pub fn new(name: impl Into<String>, size_bytes: u64) -> MemLu {
        let size = size_bytes / SECTOR_BYTES * SECTOR_BYTES;
        MemLu {
            name: name.into(),
            read_only: false,
            flushes: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                data: vec![0; size as usize],
                mapped: vec![false; (size / SECTOR_BYTES) as usize],
                failure: None,
            }),
        }
    }

    /// The same volume refusing writes, like a snapshot.
    pub fn read_only(mut self) -> MemLu {
        self.read_only = true;
        self
    }

    /// Make every request fail with `make()` (e.g. `|| Error::NoSpace`) until cleared with
    /// `None`, to see how engine errors reach the initiator.
    pub fn set_failure(&self, make: Option<fn() -> Error>) {
        self.inner.lock().failure = make;
    }

    /// Grow or shrink the volume (new space reads as zeroes).
    pub fn resize(&self, size_bytes: u64) {
        let size = size_bytes / SECTOR_BYTES * SECTOR_BYTES;
        let mut inner = self.inner.lock();
        inner.data.resize(size as usize, 0);
        inner.mapped.resize((size / SECTOR_BYTES) as usize, false);
    }

    /// A copy of `offset..offset+len` (panics outside the volume: for test assertions).
    pub fn contents(&self, offset: u64, len: u64) -> Vec<u8> {
        self.inner.lock().data[offset as usize..(offset + len) as usize].to_vec()
    }

    /// Flush requests completed so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn run(&self, req: Request) -> Result<Reply> {
        let mut inner = self.inner.lock();
        if let Some(make) = inner.failure {
            return Err(make());
        }
        let size = inner.data.len() as u64;
        let writes = !matches!(req, Request::Read { .. } | Request::Flush);
        if writes && self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        match req {
            Request::Read { offset, len } => {
                check_range(offset, u64::from(len), size, MAX_REQUEST_BYTES)?;
                let at = offset as usize;
                Ok(Reply::Data(Bytes::copy_from_slice(
                    &inner.data[at..at + len as usize],
                )))
            }
            Request::Write { offset, data, .. } => {
                check_range(offset, data.len() as u64, size, MAX_REQUEST_BYTES)?;
                let at = offset as usize;
                inner.data[at..at + data.len()].copy_from_slice(&data);
                inner.set_mapped(offset, data.len() as u64, true);
                Ok(Reply::Done)
            }
            Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
                check_range(offset, len, size, u64::MAX)?;
                let at = offset as usize;
                inner.data[at..at + len as usize].fill(0);
                inner.set_mapped(offset, len, false);
                Ok(Reply::Done)
            }
            Request::Flush => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(Reply::Done)
            }
        }
    }
}

impl Inner {
    fn set_mapped(&mut self, offset: u64, len: u64, mapped: bool) {
        let first = (offset / SECTOR_BYTES) as usize;
        let n = (len / SECTOR_BYTES) as usize;
        self.mapped[first..first + n].fill(mapped);
    }
}

impl LuBackend for MemLu {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.inner.lock().data.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, req: Request, done: Completion) {
        // Run the request before calling back: the completion may submit again.
        let r = self.run(req);
        done(r)
    }

    fn call(&self, req: Request) -> Result<Reply> {
        self.run(req)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let inner = self.inner.lock();
        if let Some(make) = inner.failure {
            return Err(make());
        }
        check_range(offset, len, inner.data.len() as u64, u64::MAX)?;
        let first = (offset / SECTOR_BYTES) as usize;
        let n = (len / SECTOR_BYTES) as usize;
        let mut out: Vec<Extent> = Vec::new();
        for &m in &inner.mapped[first..first + n] {
            match out.last_mut() {
                Some(e) if e.hole != m => e.len += SECTOR_BYTES,
                _ => out.push(Extent {
                    len: SECTOR_BYTES,
                    hole: !m,
                }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingot_engine::ErrorKind;

    #[test]
    fn ranges_trims_and_block_status() {
        let m = MemLu::new("m", 8 * 512);
        let data = Bytes::from(vec![7u8; 1024]);
        m.call(Request::Write {
            offset: 1024,
            data,
            fua: false,
        })
        .unwrap();
        let holes = |m: &MemLu| -> Vec<(u64, bool)> {
            let e = m.block_status(0, 8 * 512).unwrap();
            e.iter().map(|e| (e.len / 512, e.hole)).collect()
        };
        assert_eq!(holes(&m), [(2, true), (2, false), (4, true)]);
        m.call(Request::Trim {
            offset: 1536,
            len: 512,
            fua: false,
        })
        .unwrap();
        assert_eq!(holes(&m), [(2, true), (1, false), (5, true)]);
        assert_eq!(
            m.contents(1024, 1024),
            [vec![7; 512], vec![0; 512]].concat()
        );

        let err = m.call(Request::Read {
            offset: 7 * 512,
            len: 1024,
        });
        assert_eq!(err.unwrap_err().kind(), ErrorKind::OutOfRange);
        m.call(Request::Flush).unwrap();
        assert_eq!(m.flushes(), 1);
    }
}
