//! Taking a checkpoint's image with every shard paused, and committing it.

use super::{Checkpointer, CkptState};
use std::sync::atomic::Ordering;

use super::paged::PagedState;
use super::{Changed, Image, VolumeImage};
use crate::error::{Error, Result};
use crate::format::{PagePtr, PAGE_BYTES};
use crate::format::{
    SegmentHeader, SegmentKind, Superblock, FORMAT_VERSION_PAGED, IO_ALIGN, NO_SEGMENT,
    SEGMENT_HEADER_BYTES, SUPERBLOCK_OFFSETS,
};
use crate::io::AlignedBuf;
use crate::log::ShardPosition;
use crate::map::MapLeaf;
use crate::meta::writer::{layout, MetaTarget, MetaWriter, Stamps};
use crate::space::SegState;
use crate::store;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Free segments an open set aside for its checkpoint and the checkpoint did not use: held in
/// the backing files (fallocated), so marked as such, for checkpoints to take first and for
/// `give_back_freed` to punch once space allows (an open could not tell them from holes).
fn free_aside(ctx: &crate::context::Context, space: &mut crate::space::Space, segs: &[u32]) {
    for &s in segs {
        space.set_state(s, SegState::Free);
    }
    ctx.note_freed(space, segs);
}

/// A map leaf a format 3 checkpoint wrote, and where.
pub(crate) type WrittenLeaf = (Arc<MapLeaf>, PagePtr);

/// A checkpoint written, not yet pointed at: its segments, where the superblock points
/// (segment, offset), the length and CRC of what it points at, and the device bytes written;
/// format 3 adds the page state to keep once it is committed and the map leaves it wrote.
pub(crate) struct Written {
    pub segments: Vec<u32>,
    pub at: (u32, u32),
    pub len: u64,
    pub crc: u32,
    pub bytes: u64,
    pub paged: Option<(PagedState, Vec<WrittenLeaf>)>,
}

impl Checkpointer {
    /// Format 2: the image as one blob over a chain of checkpoint segments.
    fn write_blob(&self, image: &Image, aside: Vec<u32>, taken: &mut Vec<u32>) -> Result<Written> {
        let t0 = std::time::Instant::now();
        let blob = super::encode(image)?;
        let encoded_us = t0.elapsed().as_micros() as u64;
        tracing::debug!(target: "ingot_engine::checkpoint", bytes = blob.len(), encoded_us, "checkpoint image");
        let crc = crc32fast::hash(&blob);
        let per_seg = (self.ctx.geo.segment_bytes - SEGMENT_HEADER_BYTES) as usize;
        let nsegs = blob.len().div_ceil(per_seg).max(1);
        let segs: Vec<u32> = {
            let mut space = self.ctx.space.lock();
            let mut got = aside;
            if got.len() > nsegs {
                let extra = got.split_off(nsegs);
                free_aside(&self.ctx, &mut space, &extra);
            }
            for _ in got.len()..nsegs {
                match space.alloc_segment(SegState::Checkpoint, 0) {
                    Some(s) => got.push(s),
                    None => {
                        for &s in &got {
                            space.set_state(s, SegState::Free);
                        }
                        return Err(Error::NoSpace);
                    }
                }
            }
            self.ctx.note_write_back_room(&space);
            got
        };
        let segs = self.ctx.backed(segs, SegState::Checkpoint)?;
        taken.extend_from_slice(&segs);
        let mut bytes = 0;
        for (i, &seg) in segs.iter().enumerate() {
            let chunk = &blob[i * per_seg..((i + 1) * per_seg).min(blob.len())];
            let mut buf = AlignedBuf::new(SEGMENT_HEADER_BYTES as usize + chunk.len());
            SegmentHeader {
                kind: SegmentKind::Checkpoint,
                segment: seg,
                shard: 0,
                pool_uuid: self.ctx.pool_uuid,
                epoch: image.epoch,
                next_segment: segs.get(i + 1).copied().unwrap_or(NO_SEGMENT),
                nonce: self.ctx.segment_nonce(seg),
            }
            .encode(&mut buf, &self.ctx.log_key);
            buf[SEGMENT_HEADER_BYTES as usize..SEGMENT_HEADER_BYTES as usize + chunk.len()]
                .copy_from_slice(chunk);
            bytes += buf.len() as u64;
            store::wait(|done| self.ctx.store.put(image.epoch, seg, buf, done))?;
        }
        Ok(Written {
            at: (segs[0], 0),
            segments: segs,
            len: blob.len() as u64,
            crc,
            bytes,
            paged: None,
        })
    }

    /// Format 3: what changed of the image as metadata pages and a root after them
    /// (`paged::write_image`), and every page of the metadata segments being cleaned. Counts
    /// the pages written and superseded into `ck.meta`'s next image.
    fn write_paged(
        &self,
        ck: &mut CkptState,
        image: &Image,
        mut aside: Vec<u32>,
        taken: &mut Vec<u32>,
    ) -> Result<Written> {
        let r = self.write_paged_from(ck, image, &mut aside, taken);
        // What the open set aside and this did not use.
        if !aside.is_empty() {
            free_aside(&self.ctx, &mut self.ctx.space.lock(), &aside);
        }
        r
    }

    fn write_paged_from(
        &self,
        ck: &mut CkptState,
        image: &Image,
        aside: &mut Vec<u32>,
        taken: &mut Vec<u32>,
    ) -> Result<Written> {
        let t0 = std::time::Instant::now();
        let ctx = &self.ctx;
        // The checkpoint an open read: its segments are retained like any image's.
        if !ck.segments.is_empty() || !ck.prev_segments.is_empty() {
            let read: Vec<u32> = ck
                .prev_segments
                .drain(..)
                .chain(ck.segments.drain(..))
                .collect();
            ck.meta.adopt(&read);
        }
        let prev = ck.paged.take().filter(|_| image.changed.is_some());
        let slots = layout(ctx.geo.segment_bytes).1 as u32;
        let victims = match prev {
            Some(_) => {
                // A pool of a few dozen segments, or one whose host file system is full (each
                // checkpoint then takes a segment the backing files already hold, and only what
                // it frees gives one back: pages spread over several would use them up). Whole
                // checkpoints then, when the pages fit one segment.
                let tight = ctx.geo.total_segments < crate::context::TIGHT_POOL_SEGMENTS
                    || ctx.host.is_tight();
                let v = ck.meta.sparse(slots, tight);
                ck.meta.begin();
                v
            }
            None => {
                ck.meta.begin_whole();
                BTreeSet::new()
            }
        };
        let mut alloc = || -> Result<u32> {
            if let Some(seg) = aside.pop() {
                taken.push(seg);
                return Ok(seg);
            }
            let seg = {
                let mut space = ctx.space.lock();
                let s = space
                    .alloc_segment(SegState::Checkpoint, 0)
                    .ok_or(Error::NoSpace)?;
                ctx.note_write_back_room(&space);
                s
            };
            let seg = ctx.backed(vec![seg], SegState::Checkpoint)?[0];
            taken.push(seg);
            Ok(seg)
        };
        let nonce = |s: u32| ctx.segment_nonce(s);
        let stamps = ck.stamps.get_or_insert_with(|| Stamps::new(image.epoch));
        let mut w = MetaWriter::new(
            MetaTarget {
                store: &*ctx.store,
                key: &ctx.log_key,
                pool_uuid: ctx.pool_uuid,
                epoch: image.epoch,
                segment_bytes: ctx.geo.segment_bytes,
                alloc: &mut alloc,
                nonce: &nonce,
            },
            stamps,
        );
        let cleaned = victims.len();
        let closing = self.closing.load(Ordering::Relaxed);
        let mut out = super::paged::write_image(image, prev, &victims, closing, &mut w)?;
        out.root.generation = ck.generation + 1;
        out.root.next_stamp = w.next_stamp();
        let bytes = out.root.encode(&ctx.log_key);
        let at = w.record(&bytes)?;
        let written = w.finish()?;
        for p in &out.superseded {
            ck.meta.superseded(p);
        }
        if let Some((seg, n)) = out
            .state
            .root
            .replace((at.0, bytes.len().div_ceil(PAGE_BYTES) as u32))
        {
            ck.meta.superseded_n(seg, n);
        }
        for &(seg, n) in &written.pages {
            ck.meta.wrote(seg, n);
        }
        tracing::debug!(
            target: "ingot_engine::checkpoint",
            pages = written.pages.iter().map(|&(_, n)| u64::from(n)).sum::<u64>(),
            superseded = out.superseded.len(),
            cleaned,
            bytes = written.bytes,
            written_us = t0.elapsed().as_micros() as u64,
            "checkpoint pages"
        );
        Ok(Written {
            segments: written.segments,
            at,
            len: bytes.len() as u64,
            crc: crc32fast::hash(&bytes),
            bytes: written.bytes,
            paged: Some((out.state, out.leaves)),
        })
    }

    /// A consistent image of the current state (shards paused, or not yet running).
    pub(crate) fn snapshot(&self, seq_end: u64, shards: Vec<ShardPosition>) -> Image {
        let vols = self.ctx.volumes.read();
        let n = self.ctx.shards().max(1);
        let mut volumes = Vec::new();
        for v in vols.by_name.values() {
            let maps: Vec<_> = v.maps.iter().map(|m| m.lock().pages.clone()).collect();
            let npages = maps.first().map_or(0, Vec::len);
            let mut pages = Vec::new();
            for p in 0..npages {
                if let Some(Some(page)) = maps[p % n].get(p) {
                    pages.push((p as u64, page.clone()));
                }
            }
            volumes.push(VolumeImage {
                id: v.id,
                name: v.name.clone(),
                size_bytes: v.size(),
                flags: v.flags(),
                domain: v.dedup_domain(),
                qos: v.qos.limits(),
                pages,
            });
        }
        let mut space = self.ctx.space.lock();
        let changed = Changed {
            blocks: space.blocks.take_changed(),
            refs: space.refs.take_changed(),
        };
        Image {
            seq: seq_end,
            epoch: self.ctx.epoch,
            next_volume_id: vols.next_id,
            volumes,
            blocks: space.blocks.clone(),
            refs: space.refs.clone(),
            shards,
            data_chains: self.ctx.shards(),
            // Filled by `add_index` once the workers run again.
            index: Vec::new(),
            index_sample_bits: 0,
            keyed_fingerprints: true,
            changed: Some(changed),
            pages: None,
            pins: space.pins().collect(),
            held: Vec::new(),
            counts: Some(super::Counts {
                live_blocks: space.live_blocks,
                stored_bytes: space.stored_bytes,
                usage: space.seg_live.clone(),
            }),
        }
    }

    /// Put the dedup index into `image`, after the workers resumed: walking and copying it
    /// (1.5 M entries after 6 GiB of unique writes) inside the pause stopped every worker for
    /// tens of milliseconds per checkpoint. The index only holds hints (a candidate is compared
    /// byte for byte before it is used), so entries added after the image's sequence number
    /// are harmless; those whose block the image does not hold are dropped, here and from the
    /// live index (a block freed since, or one stored since: a lost hint at worst).
    ///
    /// Only the copy is made under the index's lock: testing each entry against the image's
    /// block table there (a random lookup per entry, 280 k entries) held every shard's
    /// dedup lookups and inserts up for 20-30 ms per checkpoint, the p99 of 1M writes.
    pub(crate) fn add_index(&self, image: &mut Image) {
        let (mut entries, sample_bits) = {
            let d = self.ctx.dedup.lock();
            (d.entries(), d.sample_bits())
        };
        let held = |id: u64| image.refs.live(id);
        let mut dropped = Vec::new();
        entries.retain(|&(key, id)| {
            let keep = held(id);
            if !keep {
                dropped.push((key, id));
            }
            keep
        });
        if !dropped.is_empty() {
            let mut d = self.ctx.dedup.lock();
            for (key, id) in dropped {
                d.remove(key, id);
            }
        }
        image.index = entries;
        image.index_sample_bits = sample_bits as u8;
    }

    /// Write a checkpoint image, make it and everything before it durable, point the
    /// superblocks at it, then free what it no longer needs.
    pub(crate) fn commit(&self, ck: &mut CkptState, image: &Image) -> Result<()> {
        // Segments' live bytes when the image was cut.
        let live_then = image.counts.as_ref().map_or(&[][..], |c| &c.usage[..]);
        // The image may come from state a failed thread left half changed.
        if self.ctx.health.is_faulted() {
            // What it says changed is gone with it: the next checkpoint writes everything.
            ck.paged = None;
            let aside = std::mem::take(&mut ck.set_aside);
            free_aside(&self.ctx, &mut self.ctx.space.lock(), &aside);
            return Err(self.ctx.health.halted());
        }
        let t0 = std::time::Instant::now();
        let paged = self
            .superblocks
            .first()
            .is_some_and(|sb| sb.version >= FORMAT_VERSION_PAGED);
        // Segments taken so far, given back if the checkpoint fails.
        let mut taken: Vec<u32> = Vec::new();
        let aside = std::mem::take(&mut ck.set_aside);
        let written = if paged {
            self.write_paged(ck, image, aside, &mut taken)
        } else {
            self.write_blob(image, aside, &mut taken)
        };
        let mut write = |w: Written| -> Result<Written> {
            self.ctx
                .counters
                .device_written
                .fetch_add(w.bytes, Ordering::Relaxed);
            self.ctx
                .counters
                .checkpoints
                .fetch_add(1, Ordering::Relaxed);
            self.ctx
                .counters
                .checkpoint_bytes
                .fetch_add(w.bytes, Ordering::Relaxed);
            // Records before the checkpoint and the checkpoint itself, durable before the
            // superblock points at it.
            self.ctx.sync()?;
            let generation = ck.generation + 1;
            // The copy the older generation is not in first, then the other: a torn write of
            // either leaves one copy pointing at a checkpoint that still exists.
            self.write_superblocks(image, &w, generation, generation)?;
            ck.generation = generation;
            Ok(w)
        };
        let mut w = match written.and_then(&mut write) {
            Ok(w) => w,
            Err(e) => {
                if paged {
                    // The segments it wrote are all in `taken`.
                    ck.meta.abandoned();
                    ck.paged = None;
                }
                let mut space = self.ctx.space.lock();
                for &s in &taken {
                    space.set_state(s, SegState::Free);
                }
                drop(space);
                // Damaged metadata (an evicted map leaf whose page does not read back): every
                // later checkpoint would need it too, so nothing could be reclaimed any more;
                // the pool stops with the reason instead of failing checkpoints one by one.
                if let Error::Corrupt { what } = &e {
                    self.ctx
                        .health
                        .set_fault(format!("a checkpoint found damaged metadata: {what}"));
                }
                return Err(e);
            }
        };
        if let Some((state, leaves)) = w.paged.take() {
            // Committed (a superblock copy points at it): the leaves it wrote are held there
            // until they change, and the next checkpoint starts from its pages.
            for (leaf, at) in leaves {
                leaf.set_written_at(at);
            }
            // Leaves waiting for this checkpoint may go now.
            self.ctx.meta.trim();
            self.pages_ram.store(state.ram_bytes(), Ordering::Relaxed);
            ck.paged = Some(state);
        }
        let segs = w.segments.clone();
        let second = self.write_superblocks(image, &w, ck.generation, ck.generation + 1);
        // `reclaim` below frees segments that died before the image: reads outside the shards
        // that looked their blocks up earlier must be done with them.
        let durable_us = t0.elapsed().as_micros() as u64;
        self.ctx.reads.fence();
        let mut space = self.ctx.space.lock();
        // Block-table leaves unchanged since the image was cut are on flash as they are in
        // RAM: past the metadata cache's budget they may go (the table evicts its own).
        if let Some(p) = &ck.paged {
            space.blocks.committed(p.table_leaves());
        }
        // Once both copies point at the new checkpoint the previous one is unreferenced; if the
        // second copy could not be written it still points at the previous one, kept until the
        // next commit.
        let mut freed = if paged {
            ck.meta.committed(second.is_ok())
        } else {
            let mut freed = std::mem::take(&mut ck.prev_segments);
            if second.is_ok() {
                freed.extend(std::mem::take(&mut ck.segments));
            } else {
                for &s in &ck.segments {
                    space.set_state(s, SegState::OldCheckpoint);
                }
            }
            freed
        };
        for &s in &freed {
            space.set_state(s, SegState::Free);
        }
        if second.is_ok() {
            ck.both_seq = image.seq;
            freed.extend(space.reclaim(image.seq, live_then));
        }
        self.at_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.ctx.release_ids(&mut space, image.seq);
        self.ctx.note_freed(&mut space, &freed);
        drop(space);
        tracing::debug!(
            target: "ingot_engine::checkpoint",
            // From the start of the encoding: image, syncs and both superblock copies written.
            durable_us,
            done_us = t0.elapsed().as_micros() as u64,
            "checkpoint committed"
        );
        if !paged {
            ck.prev_segments = std::mem::replace(&mut ck.segments, segs);
        }
        ck.seq_end = image.seq;
        ck.written_at_last = self.ctx.counters.client_written.load(Ordering::Relaxed);
        second
    }

    /// Point every device's superblock copy at slot `slot % 2` to the checkpoint `w`, durably.
    pub(crate) fn write_superblocks(
        &self,
        image: &Image,
        w: &Written,
        generation: u64,
        slot: u64,
    ) -> Result<()> {
        let mut buf = AlignedBuf::new(IO_ALIGN);
        for sb in &self.superblocks {
            let sb = Superblock {
                generation,
                checkpoint_segment: w.at.0,
                checkpoint_offset: w.at.1,
                checkpoint_seq: image.seq,
                checkpoint_bytes: w.len,
                checkpoint_crc: w.crc,
                ..sb.clone()
            };
            sb.encode(&mut buf);
            let off = SUPERBLOCK_OFFSETS[(slot % 2) as usize];
            self.ctx
                .devices
                .write_at(sb.device_index, &buf, off)
                .map_err(|source| Error::Io {
                    device: sb.device_index,
                    offset: off,
                    source,
                })?;
        }
        self.ctx.sync()
    }
}
