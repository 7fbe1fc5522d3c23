//! Per-volume runtime state and the [`Volume`] handle front ends use.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::api::{check_range, Completion, Extent, Reply, Request, BLOCK_BYTES, MAX_REQUEST_BYTES};
use crate::context::Context;
use crate::counters::Op;
use crate::error::{Error, Result};
use crate::format::MAP_PAGE_ENTRIES;
use crate::job::{Job, Timing, WriteBack};
use crate::map::shard_of;
use crate::map::VolumeState;
use crate::shard::ShardMsg;
use crate::shard::Workers;

/// Largest write acknowledged early (see `EarlyWrites`). A large write fills records on its
/// own, so acknowledging it early gains little, while queueing it fills the write-back buffer
/// fast: 1M writes at QD8 over NBD then waited behind 64 MiB of earlier ones (p99 70-79 ms
/// against fio's 5-7 ms on the raw file).
pub(crate) const WRITE_BACK_MAX_REQUEST: u64 = 256 << 10;

/// Longest read (in blocks) that [`Volume::submit`] tries to serve from the block cache on the
/// caller's thread: the lookups hold the space lock, so they stay few.
const MAX_CACHED_READ_BLOCKS: usize = 16;

/// A handle on one volume. Cheap to clone; stays valid (and fails requests) after deletion.
#[derive(Clone)]
pub struct Volume {
    pub(crate) ctx: Arc<Context>,
    pub(crate) workers: Arc<Workers>,
    pub(crate) state: Arc<VolumeState>,
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn size_bytes(&self) -> u64 {
        self.state.size()
    }

    /// A snapshot: reads only.
    pub fn read_only(&self) -> bool {
        self.state.read_only.load(Ordering::Relaxed)
    }

    /// Submit a request; `done` runs once, on an engine thread, when it completes.
    pub fn submit(&self, req: Request, done: Completion) {
        self.submit_with(req, false, done)
    }

    /// Like [`Volume::submit`], but a read made of several pieces (blocks from the cache, holes)
    /// may complete as [`Reply::Pieces`]: no copy into one buffer, for a caller that sends
    /// them with vectored writes (a cached 1 MiB read spent a fifth of its CPU on that copy).
    pub fn submit_pieces(&self, req: Request, done: Completion) {
        self.submit_with(req, true, done)
    }

    fn submit_with(&self, req: Request, pieces: bool, done: Completion) {
        let Some(done) = self.admit(&req, done) else {
            return;
        };
        if let Request::Flush = req {
            self.workers
                .flush(&self.ctx, crate::job::Answer::new(done), Instant::now());
            return;
        }
        self.dispatch(req, pieces, done);
    }

    /// What every request goes through before it goes anywhere: the pool's and the volume's
    /// state, the range, QoS and, for a short read, the block cache. `None` when that answered
    /// it already.
    pub(crate) fn admit(&self, req: &Request, done: Completion) -> Option<Completion> {
        let ctx = &self.ctx;
        if ctx.health.is_faulted() {
            done(Err(ctx.health.halted()));
            return None;
        }
        let done = match &ctx.replica {
            Some(r) if !r.valid() => {
                done(Err(Error::LeaseLost));
                return None;
            }
            // A read may wait (QoS, a shard busy uploading) past the lease's end: its data is
            // checked again as it is answered.
            Some(r) if matches!(req, Request::Read { .. }) => {
                let r = r.clone();
                Box::new(move |res: Result<crate::api::Reply>| {
                    if res.is_ok() && !r.valid() {
                        done(Err(Error::LeaseLost))
                    } else {
                        done(res)
                    }
                }) as Completion
            }
            _ => done,
        };
        if ctx.health.is_closed() || self.state.deleted.load(Ordering::Acquire) {
            let e = if self.state.deleted.load(Ordering::Acquire) {
                Error::VolumeNotFound(self.state.name.clone())
            } else {
                Error::ShutDown
            };
            done(Err(e));
            return None;
        }
        if self.state.read_only.load(Ordering::Relaxed)
            && matches!(
                req,
                Request::Write { .. } | Request::WriteZeroes { .. } | Request::Trim { .. }
            )
        {
            done(Err(Error::ReadOnly(self.state.name.clone())));
            return None;
        }
        let size = self.state.size();
        let (offset, len) = match req {
            Request::Read { offset, len } => (*offset, u64::from(*len)),
            Request::Write { offset, data, .. } => (*offset, data.len() as u64),
            Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
                (*offset, *len)
            }
            Request::Flush => return Some(done),
        };
        // Zeroing and trimming touch only metadata, so they may cover the whole volume.
        let max = match req {
            Request::Read { .. } | Request::Write { .. } => MAX_REQUEST_BYTES,
            _ => u64::MAX,
        };
        if let Err(e) = check_range(offset, len, size, max) {
            done(Err(e));
            return None;
        }
        if len == 0 {
            done(Ok(match req {
                Request::Read { .. } => Reply::Data(bytes::Bytes::new()),
                _ => Reply::Done,
            }));
            return None;
        }
        if self.state.qos.active() {
            // Zeroes and trims move no data: they cost a request, not bandwidth.
            let bytes = match req {
                Request::Read { .. } | Request::Write { .. } => len,
                _ => 0,
            };
            self.state
                .qos
                .admit(bytes, !crate::shard::on_shard_thread());
        }
        if matches!(req, Request::Read { .. }) {
            if let Some(data) = self.read_cached(offset, len) {
                done(Ok(Reply::Data(data)));
                return None;
            }
        }
        Some(done)
    }

    /// Send an admitted request to the shards.
    pub(crate) fn dispatch(&self, req: Request, pieces: bool, done: Completion) {
        let ctx = &self.ctx;
        let (offset, len, fua) = match &req {
            Request::Read { offset, len } => (*offset, u64::from(*len), false),
            Request::Write { offset, data, fua } => (*offset, data.len() as u64, *fua),
            Request::WriteZeroes { offset, len, fua } | Request::Trim { offset, len, fua } => {
                (*offset, *len, *fua)
            }
            Request::Flush => {
                self.workers
                    .flush(ctx, crate::job::Answer::new(done), Instant::now());
                return;
            }
        };
        let parts = match req {
            Request::Read { .. } | Request::Write { .. } => split(offset, len, ctx.shards()),
            // A zero/trim part covers the whole range; each shard handles the pages it owns.
            _ => {
                let p = split(offset, len, ctx.shards());
                if p.len() <= 1 {
                    p
                } else {
                    (0..ctx.shards()).map(|s| (s, offset, len)).collect()
                }
            }
        };
        let read_len = matches!(req, Request::Read { .. }).then_some(len as usize);
        // Write-back: whole blocks without FUA are acknowledged once sent to their shards
        // (which order every later request on those blocks after them).
        let early = matches!(req, Request::Write { fua: false, .. })
            && offset % BLOCK_BYTES == 0
            && len % BLOCK_BYTES == 0
            && len <= WRITE_BACK_MAX_REQUEST
            && ctx.write_back.admits(
                len,
                ctx.accepted_bytes.load(Ordering::Acquire),
                &ctx.health,
                ctx.full_of_live_data(),
            );
        let timing = Some(Timing {
            since: Instant::now(),
            op: if read_len.is_some() {
                Op::Read
            } else {
                Op::Write
            },
        });
        let (job, ack) = if early {
            ctx.write_back.mark(self.state.id, offset, len, false);
            let wb = WriteBack {
                health: ctx.health.clone(),
                early: ctx.write_back.clone(),
                volume: self.state.clone(),
                offset,
                len,
            };
            (Job::new_write_back(parts.len(), wb, timing), Some(done))
        } else if let (Some(n), true) = (read_len, pieces) {
            (Job::new_read_pieces(parts.len(), n, done, timing), None)
        } else {
            let fua_tx = fua.then(|| ctx.flusher.clone());
            (Job::new(parts.len(), read_len, fua_tx, done, timing), None)
        };
        for (shard, off, l) in parts {
            if early {
                // Before the acknowledgement: a flush after it finds the shard holding it.
                ctx.shard_stats[shard]
                    .early_parts
                    .fetch_add(1, Ordering::AcqRel);
            }
            let at = (off - offset) as usize;
            let msg = match &req {
                Request::Read { .. } => ShardMsg::Read {
                    vol: self.state.clone(),
                    offset: off,
                    len: l as usize,
                    at,
                    job: job.clone(),
                },
                Request::Write { data, .. } => ShardMsg::Write {
                    vol: self.state.clone(),
                    offset: off,
                    data: data.slice(at..at + l as usize),
                    job: job.clone(),
                },
                _ => ShardMsg::Zero {
                    vol: self.state.clone(),
                    offset: off,
                    len: l,
                    job: job.clone(),
                },
            };
            self.workers.send(shard, msg);
        }
        if let Some(done) = ack {
            done(Ok(Reply::Done));
        }
    }

    /// A read of at most [`MAX_CACHED_READ_BLOCKS`] blocks whose data is all in the block cache
    /// (or holes), served on the caller's thread: no hand-off to the shard and back. A read
    /// within one block is the cached block itself, without a copy; a longer one (8 KiB database
    /// pages, 4 KiB reads at 512-byte offsets) is copied out once. `None` sends the
    /// read the usual way.
    fn read_cached(&self, offset: u64, len: u64) -> Option<Bytes> {
        let first = offset / BLOCK_BYTES;
        let last = (offset + len - 1) / BLOCK_BYTES;
        let count = (last - first + 1) as usize;
        // A write acknowledged early may still be on its way to the map: its shard orders
        // the read after it. Counted before its acknowledgement and uncounted once applied, so
        // a zero here means any early write acknowledged before this read is in the map.
        if count > MAX_CACHED_READ_BLOCKS
            || !self.ctx.caching
            || (first..=last).any(|lba| self.ctx.write_back.pending(self.state.id, lba))
        {
            return None;
        }
        let shards = self.ctx.shards();
        // Block ids; 0 is a hole.
        let mut found = [0u64; MAX_CACHED_READ_BLOCKS];
        // Before the look-ups: an id the maps give is then the block they meant as long as no
        // id was released since, which `get_at` checks under the cache's lock (see `cache`). No
        // space lock: a front-end thread's cached read takes only a map's and a cache's.
        let seen = self.ctx.reuse.now();
        for (slot, lba) in found.iter_mut().zip(first..=last) {
            // A leaf that does not read back: the shard's read reports it.
            *slot = self.state.maps[shard_of(lba, shards)]
                .lock()
                .get(lba)
                .ok()?;
        }
        let cache_of = |lba: u64| self.ctx.caches[shard_of(lba, shards)].lock();
        let n = len as usize;
        let from = (offset % BLOCK_BYTES) as usize;
        if count == 1 {
            return Some(match found[0] {
                0 => crate::job::zeroes(n),
                id => cache_of(first).get_at(id, seen)?.slice(from..from + n),
            });
        }
        let mut out = bytes::BytesMut::with_capacity(n);
        for (i, lba) in (first..=last).enumerate() {
            let start = if i == 0 { from } else { 0 };
            let end = (BLOCK_BYTES as usize).min(start + n - out.len());
            match found[i] {
                0 => out.resize(out.len() + end - start, 0),
                id => {
                    let mut cache = cache_of(lba);
                    out.extend_from_slice(cache.get_at(id, seen)?.get(start..end)?);
                }
            }
        }
        Some(out.freeze())
    }

    /// Blocking helper around [`Volume::submit`].
    pub fn call(&self, req: Request) -> Result<Reply> {
        crate::api::wait_reply(|done| self.submit(req, done))
    }

    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        Ok(self.call(Request::Read { offset, len })?.into_vec())
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.call(Request::Write {
            offset,
            data: bytes::Bytes::copy_from_slice(data),
            fua,
        })
        .map(|_| ())
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.call(Request::WriteZeroes { offset, len, fua })
            .map(|_| ())
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.call(Request::Trim { offset, len, fua }).map(|_| ())
    }

    pub fn flush(&self) -> Result<()> {
        self.call(Request::Flush).map(|_| ())
    }

    /// Allocation of `offset..offset+len` as runs of data and holes (metadata only): every
    /// write acknowledged before the call is counted (writes acknowledged early are waited
    /// for), so a copy that skips holes misses nothing.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.state.size(), u64::MAX)?;
        self.workers.settle_writes(&self.ctx)?;
        self.block_status_now(offset, len)
    }

    /// Allocation as the maps hold it now, without waiting: a block of a write acknowledged
    /// early may still show as a hole. For hints checked against data (a front end
    /// sends a hole chunk only where the read's data is zeroes); safe on an engine thread.
    pub fn block_status_now(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.state.size();
        check_range(offset, len, size, u64::MAX)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let lba = pos / BLOCK_BYTES;
            let next = ((lba + 1) * BLOCK_BYTES).min(end);
            let hole = self.state.lookup(lba)? == 0;
            let run = next - pos;
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += run,
                _ => out.push(Extent { len: run, hole }),
            }
            pos = next;
        }
        Ok(out)
    }
}

/// Split a byte range into per-shard parts along map-page boundaries.
fn split(offset: u64, len: u64, shards: usize) -> Vec<(usize, u64, u64)> {
    let stripe = MAP_PAGE_ENTRIES * BLOCK_BYTES;
    let mut parts = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let next = ((pos / stripe + 1) * stripe).min(end);
        let shard = shard_of(pos / BLOCK_BYTES, shards);
        match parts.last_mut() {
            Some((s, _, l)) if *s == shard => *l += next - pos,
            _ => parts.push((shard, pos, next - pos)),
        }
        pos = next;
        if shards == 1 {
            if let Some((_, _, l)) = parts.last_mut() {
                *l = end - offset;
            }
            break;
        }
        if parts.len() > shards && parts.len() > 64 {
            // Only zero/trim ranges get this long; the caller fans them out per shard.
            break;
        }
    }
    parts
}
