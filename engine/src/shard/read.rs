//! The read path: map lookups, cache hits, device reads in spans, checksum checks and decoding.

use super::fetch::{PageFor, MAX_PARKS};
use super::{Part, Shard, ShardMsg, BLOCK};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::api::BLOCK_BYTES;
use crate::context::Context;
use crate::error::Error;
use crate::format::{FLAG_LZ4, IO_ALIGN};
use crate::io::{AlignedBuf, IoDone, IoOp, OpKind};
use crate::job::Job;
use crate::map::VolumeState;
use crate::reduce;
use crate::space::{BlockEntry, Space};
use crate::store::{self, Range};

/// One block a read wants out of a stored payload.
pub(crate) struct Want {
    pub(crate) id: u64,
    /// The reuse epoch when the id was looked up (see `cache`).
    pub(crate) seen: u64,
    /// Position of the block in its group.
    pub(crate) index: usize,
    /// Bytes of the block wanted, and where they go in the job buffer (`None`: a neighbour in
    /// the same group, only cached).
    pub(crate) from: usize,
    pub(crate) len: usize,
    pub(crate) dst: Option<usize>,
}

/// One stored payload (a raw block or a compressed group) within a read.
pub(crate) struct Piece {
    pub(crate) segment: u32,
    pub(crate) offset: u32,
    pub(crate) stored_len: u32,
    pub(crate) crc: u32,
    pub(crate) flags: u16,
    pub(crate) wants: Vec<Want>,
}

/// One device read covering adjacent payloads of a segment.
pub(crate) struct PendingRead {
    pub(crate) part: Rc<Part>,
    pub(crate) segment: u32,
    /// Segment byte offset where the buffer starts (4 KiB-aligned) and ends.
    pub(crate) base: u32,
    pub(crate) end: u32,
    pub(crate) pieces: Vec<Piece>,
    /// When it was queued to the device.
    pub(crate) sent: Instant,
}

/// Longest single device read a request is split into.
pub(crate) const MAX_READ_SPAN: u32 = 1 << 20;

impl Shard {
    // ---------------------------------------------------------------- reads

    /// Whether bytes `offset..offset + len` of `vol` hold an early write not applied yet.
    pub(crate) fn overlaps_unapplied(&self, vol: u32, offset: u64, len: usize) -> bool {
        let set = self.unapplied.borrow();
        if set.blocks.is_empty() || len == 0 {
            return false;
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len as u64 - 1) / BLOCK_BYTES;
        (first..=last).any(|lba| set.blocks.contains_key(&(vol, lba)))
    }

    /// A read that waited `tries` times for metadata pages (0 when it first arrives; see
    /// `fetch`).
    pub(crate) fn read_try(
        &mut self,
        vol: Arc<VolumeState>,
        offset: u64,
        len: usize,
        at: usize,
        job: Arc<Job>,
        tries: u8,
    ) {
        // An early-acknowledged write to these blocks arrived before this read: store it
        // first, so the read sees it in the map. (A read run again after waiting for pages
        // was taken before any write that arrived since: it need not see those.)
        if tries == 0 && self.overlaps_unapplied(vol.id, offset, len) {
            self.pack_records();
            self.drain();
            if self.ctx.health.is_faulted() {
                // The early write may have failed: the map would give what it replaced.
                job.part_done(Err(self.ctx.health.halted()), Some(&self.env.stages));
                return;
            }
            if !self.stalled.is_empty() {
                self.deferred.push_back(ShardMsg::Read {
                    vol,
                    offset,
                    len,
                    at,
                    job,
                });
                return;
            }
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len as u64 - 1) / BLOCK_BYTES;
        // Evicted leaves are read through the queue while this read waits, and the shard
        // goes on with its other requests (`fetch`).
        let may_park = tries < MAX_PARKS && self.ctx.meta.evicted_any();
        if may_park {
            let waits = self.read_map_pages(&vol, first, last);
            if !waits.is_empty() {
                self.park_read(vol, offset, len, at, job, waits, tries);
                return;
            }
        }
        let part = Part::new(job, &self.env);
        // Released at the end of this function.
        part.records.set(1);
        // Scratch vectors kept by the shard: allocating two per read showed as ~6% of a cached
        // 4k random-read profile.
        let mut ids = std::mem::take(&mut self.scratch_ids);
        let mut entries = std::mem::take(&mut self.scratch_entries);
        ids.clear();
        entries.clear();
        {
            // An evicted leaf that does not read back fails the read (its blocks read as
            // holes meanwhile, never as another block).
            let map = vol.maps[self.id].lock();
            ids.extend((first..=last).map(|lba| {
                map.get(lba).unwrap_or_else(|e| {
                    part.fail(e);
                    0
                })
            }));
        }
        // Evicted block-table leaves are read without the space lock, which the other shards
        // and readers need meanwhile: through the queue while this read waits, or (after
        // waiting enough, or once a look-up failed) here. They are looked for under the lock
        // the look-ups take, so that none can go in between.
        let mut seen = 0;
        let ask = {
            let mut space = self.ctx.space.lock();
            let ask = match self.ctx.meta.evicted_any() {
                true => space
                    .blocks
                    .evicted_of(&mut ids.iter().copied().filter(|&id| id != 0), usize::MAX),
                false => None,
            };
            if ask.is_none() {
                seen = self.ctx.reuse.now();
                look_up(&mut space, &ids, &mut entries, &part);
            }
            ask
        };
        if let Some(ask) = ask {
            if may_park && part.error.borrow().is_none() {
                let waits = ask
                    .leaves
                    .iter()
                    .map(|&(leaf, at, entries)| {
                        self.fetch_page(at, PageFor::Table { leaf, entries })
                    })
                    .collect();
                self.scratch_ids = ids;
                self.scratch_entries = entries;
                // Nothing of this part was started: the job waits for the read again.
                let job = part.job.clone();
                drop(part);
                self.park_read(vol, offset, len, at, job, waits, tries);
                return;
            }
            let got = ask.pages.read_leaves(&ask.leaves);
            let mut space = self.ctx.space.lock();
            space.blocks.take_read(&ask, got);
            seen = self.ctx.reuse.now();
            look_up(&mut space, &ids, &mut entries, &part);
        }
        // When a block read belongs to a compressed group, the neighbours in the same group
        // come along: the group is read and decompressed anyway, and caching all of it saves a
        // sequential reader from decompressing it once per block.
        let grouped = entries
            .iter()
            .flatten()
            .any(|e| reduce::group_of(e.flags).1 > 1);
        let around: Vec<(u64, BlockEntry)> = if grouped {
            let reach = reduce::GROUP_BLOCKS as u64 - 1;
            let lo = first.saturating_sub(reach);
            let hi = (last + reach).min(vol.blocks().saturating_sub(1));
            // Only those whose leaves are in RAM: a neighbour is worth no metadata read.
            let near: Vec<u64> = {
                let map = vol.maps[self.id].lock();
                (lo..first)
                    .chain(last + 1..=hi)
                    .filter_map(|lba| map.get_shared_resident(lba).map(|(id, _)| id))
                    .filter(|&id| id != 0)
                    .collect()
            };
            let space = self.ctx.space.lock();
            near.into_iter()
                .filter_map(|id| Some((id, space.get_resident(id)?)))
                .filter(|(_, e)| reduce::group_of(e.flags).1 > 1)
                .collect()
        } else {
            Vec::new()
        };
        let mut spans: Vec<PendingRead> = Vec::new();
        for (i, lba) in (first..=last).enumerate() {
            let bstart = lba * BLOCK_BYTES;
            let from = offset.max(bstart) - bstart;
            let to = (offset + len as u64).min(bstart + BLOCK_BYTES) - bstart;
            let dst = at + (bstart + from - offset) as usize;
            let (from, n) = (from as usize, (to - from) as usize);
            let Some(e) = entries[i] else {
                if ids[i] != 0 {
                    part.fail(Error::Corrupt {
                        what: "map points at a free block",
                    });
                }
                continue; // hole: the job buffer is already zero
            };
            let id = ids[i];
            let hit = self.cache().get(id).map(|d| d.slice(from..from + n));
            if let Some(data) = hit {
                part.job.fill(dst, data);
                continue;
            }
            let want = Want {
                id,
                seen,
                index: reduce::group_of(e.flags).0,
                from,
                len: n,
                dst: Some(dst),
            };
            add_to_spans(&mut spans, &part, &e, want);
        }
        for (id, e) in around {
            let piece = spans
                .iter_mut()
                .flat_map(|s| s.pieces.iter_mut())
                .find(|p| p.segment == e.segment && p.offset == e.offset);
            if let Some(p) = piece {
                if !p.wants.iter().any(|w| w.id == id) && !self.cache().contains(id) {
                    p.wants.push(Want {
                        id,
                        seen,
                        index: reduce::group_of(e.flags).0,
                        from: 0,
                        len: 0,
                        dst: None,
                    });
                }
            }
        }
        let device_reads = !spans.is_empty();
        for span in spans {
            let (dev, base) = self.ctx.geo.locate(span.segment);
            let tag = self.tag();
            let len = (span.end - span.base) as usize;
            self.queue.push(IoOp {
                kind: OpKind::Read,
                dev,
                offset: base + u64::from(span.base),
                len,
                // SAFETY: a read fills the whole buffer before anything looks at it.
                buf: unsafe { AlignedBuf::new_uninit(len) },
                tag,
            });
            part.records.set(part.records.get() + 1);
            self.reads.insert(tag, span);
        }
        self.scratch_ids = ids;
        self.scratch_entries = entries;
        part.record_done();
        // To the device now rather than at the end of the turn: this virtual disk serves a
        // stream of single submissions faster than the same reads in bursts (see `reader/`).
        if device_reads {
            if let Err(e) = self.queue.submit(0) {
                self.fail_all_inflight(e);
            }
        }
    }

    pub(crate) fn finish_read(&mut self, pr: PendingRead, d: IoDone) {
        match d.result {
            Err(e) => pr.part.fail(Error::Io {
                device: d.dev,
                offset: d.offset,
                source: e,
            }),
            Ok(()) => {
                let all = Bytes::from_owner(d.buf);
                for p in &pr.pieces {
                    let at = (p.offset - pr.base) as usize;
                    match decode_piece(&all, at, p.segment, p.offset, p.stored_len, p.crc, p.flags)
                    {
                        Ok(plain) => {
                            for w in &p.wants {
                                let block = plain.slice(w.index * BLOCK..(w.index + 1) * BLOCK);
                                if let Some(dst) = w.dst {
                                    pr.part.job.fill(dst, block.slice(w.from..w.from + w.len));
                                }
                                self.cache().insert(w.id, w.seen, block);
                            }
                        }
                        Err(f) => {
                            for w in p.wants.iter().filter(|w| w.dst.is_some()) {
                                pr.part.fail(f.error(w.id));
                            }
                        }
                    }
                }
            }
        }
        pr.part.record_done();
    }

    /// Read one block's current contents synchronously (for read-modify-write).
    pub(crate) fn read_block_now(
        &mut self,
        vol: &VolumeState,
        lba: u64,
    ) -> Result<Box<[u8]>, Error> {
        let id = vol.maps[self.id].lock().get(lba)?;
        if id == 0 {
            return Ok(vec![0u8; BLOCK].into_boxed_slice());
        }
        let e = self.ctx.space.lock().get(id)?.ok_or(Error::Corrupt {
            what: "map points at a free block",
        })?;
        if let Some(data) = self.cache().get(id) {
            return Ok(data.to_vec().into_boxed_slice());
        }
        let plain = load_payload(&self.ctx, &e).map_err(|f| f.error(id))?;
        let i = reduce::group_of(e.flags).0;
        Ok(plain[i * BLOCK..(i + 1) * BLOCK]
            .to_vec()
            .into_boxed_slice())
    }

    /// Pack and submit queued items, wait for all records to apply, then read the block.
    pub(crate) fn settle_and_read(
        &mut self,
        vol: &VolumeState,
        lba: u64,
    ) -> Result<Box<[u8]>, Error> {
        if !self.items.is_empty() || !self.inflight.is_empty() {
            self.pack_records();
            self.drain();
        }
        if !self.stalled.is_empty() {
            // An earlier write of this batch waits for space: the map does not hold it yet, so
            // merging with it now would lose it. Rare (space ran out within one batch).
            return Err(Error::NoSpace);
        }
        self.read_block_now(vol, lba)
    }
}

/// The entries of `ids` (0: a hole), under the space lock, with the reuse epoch read under
/// it too (see `cache`). A block-table leaf that does not read back fails the read, first with
/// its own error.
fn look_up(space: &mut Space, ids: &[u64], entries: &mut Vec<Option<BlockEntry>>, part: &Part) {
    entries.extend(ids.iter().map(|&id| match id {
        0 => None,
        _ => space.get(id).unwrap_or_else(|e| {
            part.fail(e);
            None
        }),
    }));
}

/// Add a wanted block to the reads of a request: to the payload read just before when it is
/// the same one, to the current device read when its payload starts within or right after
/// it, else to a new device read.
pub(crate) fn add_to_spans(
    spans: &mut Vec<PendingRead>,
    part: &Rc<Part>,
    e: &BlockEntry,
    want: Want,
) {
    let align = IO_ALIGN as u32;
    let pstart = e.offset & !(align - 1);
    let pend = (e.offset + u32::from(e.stored_len)).next_multiple_of(align);
    if let Some(sp) = spans.last_mut() {
        if let Some(p) = sp.pieces.last_mut() {
            if p.segment == e.segment && p.offset == e.offset {
                p.wants.push(want);
                return;
            }
        }
        if sp.segment == e.segment
            && pstart >= sp.base
            && pstart <= sp.end
            && pend.max(sp.end) - sp.base <= MAX_READ_SPAN
        {
            sp.end = sp.end.max(pend);
            sp.pieces.push(piece(e, want));
            return;
        }
    }
    spans.push(PendingRead {
        part: part.clone(),
        segment: e.segment,
        base: pstart,
        end: pend,
        pieces: vec![piece(e, want)],
        sent: Instant::now(),
    });
}

pub(crate) fn piece(e: &BlockEntry, want: Want) -> Piece {
    Piece {
        segment: e.segment,
        offset: e.offset,
        stored_len: u32::from(e.stored_len),
        crc: e.crc,
        flags: e.flags,
        wants: vec![want],
    }
}

/// Why a stored payload could not be turned into blocks.
pub(crate) enum PayloadFault {
    /// The read failed (the device's or the store's error, with its cause).
    Read(Error),
    Checksum {
        segment: u32,
        offset: u32,
        expected: u32,
        got: u32,
    },
    Undecodable {
        segment: u32,
        offset: u32,
    },
}

impl PayloadFault {
    /// The error a read of block `block_id` reports.
    pub fn error(&self, block_id: u64) -> Error {
        match self {
            PayloadFault::Read(e) => e.clone(),
            &PayloadFault::Checksum {
                segment,
                offset,
                expected,
                got,
            } => Error::ChecksumMismatch {
                block_id,
                segment,
                offset,
                expected,
                got,
            },
            &PayloadFault::Undecodable { segment, offset } => Error::Undecodable {
                block_id,
                segment,
                offset,
            },
        }
    }
}

/// Verify the payload at `at` in `all` and return its plaintext (the whole group).
pub(crate) fn decode_piece(
    all: &Bytes,
    at: usize,
    segment: u32,
    offset: u32,
    stored_len: u32,
    crc: u32,
    flags: u16,
) -> Result<Bytes, PayloadFault> {
    let undecodable = PayloadFault::Undecodable { segment, offset };
    let Some(stored) = all.get(at..at + stored_len as usize) else {
        return Err(undecodable);
    };
    let got = crc32fast::hash(stored);
    if got != crc {
        return Err(PayloadFault::Checksum {
            segment,
            offset,
            expected: crc,
            got,
        });
    }
    if flags & FLAG_LZ4 == 0 && stored.len() == BLOCK {
        return Ok(all.slice(at..at + BLOCK));
    }
    reduce::decode(stored, flags)
        .map(Bytes::from)
        .map_err(|_| undecodable)
}

/// Read and verify the payload block `e` lives in, synchronously; its plaintext (the group).
pub(crate) fn load_payload(ctx: &Context, e: &BlockEntry) -> Result<Bytes, PayloadFault> {
    let align = IO_ALIGN as u32;
    let base = e.offset & !(align - 1);
    let end = (e.offset + u32::from(e.stored_len)).next_multiple_of(align);
    let at = Range {
        segment: e.segment,
        offset: u64::from(base),
    };
    let buf = store::read_now(&*ctx.store, ctx.epoch, at, (end - base) as usize)
        .map_err(PayloadFault::Read)?;
    decode_entry(&Bytes::from_owner(buf), (e.offset - base) as usize, e)
}

/// [`decode_piece`] for the payload of block `e`, found at `at` in `all`.
pub(crate) fn decode_entry(all: &Bytes, at: usize, e: &BlockEntry) -> Result<Bytes, PayloadFault> {
    decode_piece(
        all,
        at,
        e.segment,
        e.offset,
        u32::from(e.stored_len),
        e.crc,
        e.flags,
    )
}
