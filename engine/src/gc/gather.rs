//! Gathering a victim's live blocks: from the block cache, else from the device in large reads.

use crate::gc::Cleaner;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::api::BLOCK_BYTES;
use crate::error::Result;
use crate::format::IO_ALIGN;
use crate::shard::{Members, Relocation};
use crate::space::BlockEntry;
use crate::store::{self, Range};

/// Victim segments the cleaner reads at once.
pub(crate) const VICTIM_READS: usize = 4;

/// Largest single read of a victim segment (see `gather_victim`).
pub(crate) const VICTIM_READ_PIECE: usize = 1 << 20;

/// Dead (or cached) bytes between two payloads a victim read spans rather than split in two.
/// Small reads cost more than the bytes they skip here: reading only the live blocks of ~68%-live
/// victims (no gap) read 2.6-3.0 bytes per client byte instead of 3.2, but gave 18.8k IOPS at
/// 90% full with a 64 MiB cache, against 42.7-45.8k with 16 KiB gaps.
pub(crate) const VICTIM_READ_GAP: usize = 16 << 10;

impl Cleaner {
    /// The live payloads of victim `seg` (`blocks`: its live blocks, found at reuse epoch
    /// `seen`), ready for the mover.
    /// Uncompressed blocks the block cache holds (checked against their CRC) come from there;
    /// the rest are read from the device in 4 KiB-aligned extents that skip dead and cached
    /// stretches. At 90% full under uniform overwrites victims are ~70% live and the device's
    /// bandwidth bounds the cleaner: reading them whole was half of its traffic.
    pub(crate) fn gather_victim(
        &self,
        seg: u32,
        blocks: &[(u64, BlockEntry)],
        seen: u64,
    ) -> Result<Vec<Relocation>> {
        let seg_bytes = self.ctx.geo.segment_bytes as usize;
        let mut live: Vec<&(u64, BlockEntry)> = blocks.iter().collect();
        live.sort_unstable_by_key(|(_, e)| e.offset);
        // One relocation per stored payload, with every live block it holds (the blocks of a
        // compressed group share one payload).
        let mut payloads: Vec<Relocation> = Vec::with_capacity(live.len());
        // Stored length of each payload.
        let mut lens: Vec<usize> = Vec::with_capacity(live.len());
        // (payload index, block id) of raw blocks to look for in the caches.
        let mut wanted: Vec<(usize, u64)> = Vec::with_capacity(live.len());
        for &&(id, e) in &live {
            if e.offset as usize + usize::from(e.stored_len) > seg_bytes {
                continue;
            }
            match payloads.last_mut() {
                Some(r) if r.from_offset == e.offset => r.members.push(id, e.flags),
                _ => {
                    if e.flags & crate::format::FLAG_LZ4 == 0
                        && u64::from(e.stored_len) == BLOCK_BYTES
                    {
                        wanted.push((payloads.len(), id));
                    }
                    lens.push(usize::from(e.stored_len));
                    payloads.push(Relocation {
                        from_segment: seg,
                        from_offset: e.offset,
                        data: Bytes::new(),
                        crc: e.crc,
                        members: Members::one(id, e.flags),
                        from_cache: false,
                    });
                }
            }
        }
        let mut found: Vec<(usize, Bytes)> = Vec::with_capacity(live.len());
        for cache in &self.ctx.caches {
            if wanted.is_empty() {
                break;
            }
            let cache = cache.lock();
            wanted.retain(|&(i, id)| match cache.peek_at(id, seen) {
                Some(b) => {
                    found.push((i, b));
                    false
                }
                None => true,
            });
        }
        let mut have = vec![false; payloads.len()];
        let mut from_cache = 0u64;
        for (i, b) in found {
            // A raw payload is the block itself. The mover checks the copy against the CRC
            // once it is in the record (checking it here, on data no core had in its caches,
            // was a tenth of the server's CPU at 90% full).
            if b.len() == BLOCK_BYTES as usize {
                from_cache += b.len() as u64;
                payloads[i].data = b;
                payloads[i].from_cache = true;
                have[i] = true;
            }
        }
        // Extents (start, end) in the segment covering what the caches did not give.
        let mut extents: Vec<(usize, usize)> = Vec::new();
        let missing: Vec<usize> = (0..payloads.len()).filter(|&i| !have[i]).collect();
        for &i in &missing {
            let off = payloads[i].from_offset as usize;
            let start = off / IO_ALIGN * IO_ALIGN;
            let end = (off + lens[i]).next_multiple_of(IO_ALIGN).min(seg_bytes);
            match extents.last_mut() {
                Some(x) if start <= x.1 + VICTIM_READ_GAP && end - x.0 <= VICTIM_READ_PIECE => {
                    x.1 = x.1.max(end);
                }
                _ => extents.push((start, end)),
            }
        }
        let total: usize = extents.iter().map(|&(a, b)| b - a).sum();
        if total > 0 {
            // In pieces of at most VICTIM_READ_PIECE: one 8 MiB read held the writes queued
            // behind it on the device (p99 of 4k writes at 90% full 20 ms with whole segments,
            // 12 ms with 1 MiB pieces).
            let mut bufs = Vec::with_capacity(extents.len());
            for &(a, b) in &extents {
                let at = Range {
                    segment: seg,
                    offset: a as u64,
                };
                let buf = store::read_now(&*self.ctx.store, self.ctx.epoch, at, b - a)?;
                bufs.push(Bytes::from_owner(buf));
            }
            self.ctx
                .counters
                .gc_read
                .fetch_add(total as u64, Ordering::Relaxed);
            // Slices keep the whole buffer alive until the moves are written: worth it only
            // when most of it moves; a mostly dead read has its few payloads copied out.
            let needed: usize = missing.iter().map(|&i| lens[i]).sum();
            let share = 2 * needed >= total;
            let mut x = 0;
            for &i in &missing {
                let r = &mut payloads[i];
                let off = r.from_offset as usize;
                // Extents may overlap by a page where one was cut at VICTIM_READ_PIECE: the
                // payload is in the first that holds all of it.
                while extents[x].1 < off + lens[i] {
                    x += 1;
                }
                let from = off - extents[x].0;
                let to = from + lens[i];
                r.data = if share {
                    bufs[x].slice(from..to)
                } else {
                    Bytes::copy_from_slice(&bufs[x][from..to])
                };
            }
        }
        self.ctx
            .counters
            .gc_from_cache
            .fetch_add(from_cache, Ordering::Relaxed);
        Ok(payloads)
    }
}
