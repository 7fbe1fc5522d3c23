//! Volume administration: create, snapshot, clone, delete, resize, policies; and manual GC.

use crate::{
    gc::{GcReport, GC_VICTIMS_PER_PASS},
    pool::{validate_name, validate_size, Pool},
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::api::{DedupDomain, VolumeInfo, BLOCK_BYTES};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::SEGMENT_HEADER_BYTES;
use crate::map::VolumeState;
use crate::qos::QosChange;
use crate::space::SegState;
use crate::volume::Volume;

impl Pool {
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let state = self
            .inner
            .ctx
            .lookup(name)
            .ok_or_else(|| Error::VolumeNotFound(name.to_string()))?;
        Ok(Volume {
            ctx: self.inner.ctx.clone(),
            workers: self.inner.workers.clone(),
            state,
        })
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.inner
            .ctx
            .volumes
            .read()
            .by_name
            .values()
            .map(|v| VolumeInfo {
                reduction_estimated: false,
                name: v.name.clone(),
                size_bytes: v.size(),
                mapped_bytes: v.mapped_blocks() * BLOCK_BYTES,
                dedup: v.dedup.load(Ordering::Relaxed),
                compression: v.compress.load(Ordering::Relaxed),
                read_only: v.read_only.load(Ordering::Relaxed),
                dedup_domain: v.dedup_domain(),
                qos: v.qos.limits(),
                qos_wait_seconds: v.qos.waited_ns() as f64 / 1e9,
                stored_bytes: 0,
                unique_blocks: 0,
                dedup_ratio: 1.0,
                compression_ratio: 1.0,
                data_reduction_ratio: 1.0,
            })
            .collect()
    }

    /// Turn deduplication and/or compression of new writes on or off for a volume; durable
    /// when this returns. Blocks already stored stay as they are.
    pub fn set_volume_policy(
        &self,
        name: &str,
        dedup: Option<bool>,
        compression: Option<bool>,
    ) -> Result<()> {
        self.set_volume_reduction(name, dedup, compression, None)
    }

    /// Move a volume to another dedup domain, online; durable when this returns. Its new
    /// blocks deduplicate only against blocks written in that domain from then on; blocks it
    /// stored before stay where they are (candidates for their old domain only).
    pub fn set_volume_dedup_domain(&self, name: &str, domain: DedupDomain) -> Result<()> {
        self.set_volume_reduction(name, None, None, Some(domain))
    }

    /// Change any of a volume's data reduction settings at once (one checkpoint).
    pub fn set_volume_reduction(
        &self,
        name: &str,
        dedup: Option<bool>,
        compression: Option<bool>,
        domain: Option<DedupDomain>,
    ) -> Result<()> {
        if let Some(d) = &domain {
            d.validate()?;
        }
        self.change_volume(name, &mut |ctx, v| {
            if let Some(d) = dedup {
                v.dedup.store(d, Ordering::Relaxed);
            }
            if let Some(c) = compression {
                v.compress.store(c, Ordering::Relaxed);
            }
            if let Some(d) = &domain {
                v.set_dedup_domain(d.clone(), &ctx.log_key.0);
            }
        })
    }

    /// Apply `change` to volume `name` in a checkpoint, so that it is durable when this
    /// returns.
    fn change_volume(
        &self,
        name: &str,
        change: &mut dyn FnMut(&Context, &VolumeState),
    ) -> Result<()> {
        let name = name.to_string();
        self.inner
            .ckpt
            .checkpoint_with(Some(&mut |ctx: &Context, _seq| {
                let v = ctx
                    .lookup(&name)
                    .ok_or_else(|| Error::VolumeNotFound(name.clone()))?;
                change(ctx, &v);
                Ok(())
            }))
    }

    /// Change a volume's QoS limits, online (the next request sees them); durable when this
    /// returns. Snapshots and clones start without limits.
    pub fn set_volume_qos(&self, name: &str, change: &QosChange) -> Result<()> {
        self.change_volume(name, &mut |_, v| v.qos.set(v.qos.limits().with(change)))
    }

    /// Create a thin volume in the shared dedup domain; durable when this returns.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<()> {
        self.create_volume_in(name, size_bytes, DedupDomain::Shared)
    }

    /// Create a thin volume in dedup domain `domain` (it is in it from its first write);
    /// durable when this returns.
    pub fn create_volume_in(&self, name: &str, size_bytes: u64, domain: DedupDomain) -> Result<()> {
        validate_name(name)?;
        validate_size(size_bytes)?;
        domain.validate()?;
        self.directory_fits(size_bytes)?;
        let name = name.to_string();
        let shards = self.inner.ctx.shards();
        self.inner
            .ckpt
            .checkpoint_with(Some(&mut |ctx: &Context, _seq| {
                let mut t = ctx.volumes.write();
                if t.by_name.contains_key(&name) {
                    return Err(Error::VolumeExists(name.clone()));
                }
                let id = t.next_id;
                t.next_id += 1;
                let v = VolumeState::new(id, name.clone(), size_bytes, shards, &ctx.meta);
                v.set_dedup_domain(domain.clone(), &ctx.log_key.0);
                t.by_name.insert(name.clone(), Arc::new(v));
                Ok(())
            }))
    }

    /// A format 3 checkpoint writes a directory entry for every 2 MiB of every volume's size,
    /// mapped or not: refuse a volume (or growth) of `size_bytes` whose directory the space
    /// kept for checkpoints could not hold, before any checkpoint has to (it would fail every
    /// later one). Format 2 writes only mapped pages.
    fn directory_fits(&self, size_bytes: u64) -> Result<()> {
        let ctx = &self.inner.ctx;
        if !ctx.paged_checkpoints {
            return Ok(());
        }
        let need = ctx.reserve_segments_with(0, crate::context::dir_pages(size_bytes), 1);
        if ctx.space.lock().free_segments <= need {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// Take a read-only snapshot `name` of volume `src` as it is now: every write acknowledged
    /// before the call is in it, none after. No data is copied: the snapshot shares the
    /// volume's map leaves (each counts its holders; the first write to one by either side
    /// copies it, and the copy's blocks gain a reference). Durable when this returns.
    pub fn snapshot_volume(&self, src: &str, name: &str) -> Result<()> {
        self.copy_volume(src, name, true)
    }

    /// Create a writable volume `name` with the contents of volume or snapshot `src`, sharing
    /// its blocks like a snapshot does; writes to either are then independent. Durable when
    /// this returns.
    pub fn clone_volume(&self, src: &str, name: &str) -> Result<()> {
        self.copy_volume(src, name, false)
    }

    pub(crate) fn copy_volume(&self, src: &str, name: &str, read_only: bool) -> Result<()> {
        validate_name(name)?;
        if self.inner.ctx.lookup(name).is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        // Every checkpoint from now on stores the copy's map pages too (format 2) or its leaf
        // directory (format 3): refuse a copy the space kept for checkpoints could not hold
        // (it would fail every later checkpoint and flush).
        let source = self.volume(src)?;
        let pages: u64 = source
            .state
            .maps
            .iter()
            .map(|m| m.lock().present_pages())
            .sum();
        let dir = crate::context::dir_pages(source.size_bytes());
        let need = self.inner.ctx.reserve_segments_with(pages, dir, 1);
        if self.inner.ctx.space.lock().free_segments <= need {
            return Err(Error::NoSpace);
        }
        // Early-acknowledged writes still waiting for space would miss the pause below.
        self.inner.workers.settle_writes(&self.inner.ctx)?;
        let (src, name) = (src.to_string(), name.to_string());
        let shards = self.inner.ctx.shards();
        let mut made = None;
        // Shards are paused: the maps hold exactly the writes acknowledged so far.
        let r = self
            .inner
            .ckpt
            .checkpoint_with(Some(&mut |ctx: &Context, _seq| {
                let mut t = ctx.volumes.write();
                if t.by_name.contains_key(&name) {
                    return Err(Error::VolumeExists(name.clone()));
                }
                let s = t
                    .by_name
                    .get(&src)
                    .cloned()
                    .ok_or_else(|| Error::VolumeNotFound(src.clone()))?;
                let id = t.next_id;
                t.next_id += 1;
                let v = VolumeState::new(id, name.clone(), s.size(), shards, &ctx.meta);
                v.set_flags(s.flags() & !crate::format::VOLUME_READ_ONLY);
                v.read_only.store(read_only, Ordering::Relaxed);
                // A clone of a private volume is private to itself (it shares the source's blocks
                // by reference, not by dedup).
                v.set_dedup_domain(s.dedup_domain(), &ctx.log_key.0);
                // The copy shares the source's leaves: one more user each, no block reference
                // (a block counts the distinct leaves that point at it).
                for (to, from) in v.maps.iter().zip(&s.maps) {
                    *to.lock() = from.lock().share();
                }
                made = Some(id);
                t.by_name.insert(name.clone(), Arc::new(v));
                Ok(())
            }));
        if let (Err(_), Some(id)) = (&r, made) {
            // The copy exists in memory but no checkpoint holds it: take it away again (a
            // smaller checkpoint than the one that failed), unless the name is someone else's
            // by now.
            if self.inner.ctx.lookup(&name).is_some_and(|v| v.id == id) {
                let _ = self.delete_volume(&name);
            }
        }
        r
    }

    /// Delete a volume and free what only it referenced; durable when this returns.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.inner
            .ckpt
            .checkpoint_with(Some(&mut |ctx: &Context, seq| {
                let v = ctx
                    .volumes
                    .write()
                    .by_name
                    .remove(&name)
                    .ok_or_else(|| Error::VolumeNotFound(name.clone()))?;
                v.deleted.store(true, Ordering::Release);
                let mut space = ctx.space.lock();
                for m in &v.maps {
                    let released = m
                        .lock()
                        .release_all(&mut |id| {
                            space.drop_ref(id, seq);
                        })
                        .and(space.take_failure().map_or(Ok(()), Err));
                    // An evicted leaf that does not read back: the counts are half changed,
                    // and no checkpoint may keep them (the next open starts from the last
                    // checkpoint's and replays the log).
                    if let Err(e) = released {
                        ctx.health.set_fault(format!("deleting volume {name}: {e}"));
                        return Err(e);
                    }
                }
                Ok(())
            }))
    }

    /// Change a volume's size; shrinking frees the blocks past the new end.
    pub fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<()> {
        validate_size(size_bytes)?;
        // A new end inside a block keeps that block: zero its bytes past the new end first, or
        // growing the volume again would bring them back instead of zeroes.
        let vol = self.volume(name)?;
        if vol.read_only() {
            return Err(Error::ReadOnly(name.to_string()));
        }
        let old = vol.size_bytes();
        if size_bytes > old {
            self.directory_fits(size_bytes - old)?;
        }
        if size_bytes < old && size_bytes % BLOCK_BYTES != 0 {
            let end = size_bytes.next_multiple_of(BLOCK_BYTES).min(old);
            vol.write_zeroes(size_bytes, end - size_bytes, false)?;
        }
        let name = name.to_string();
        self.inner
            .ckpt
            .checkpoint_with(Some(&mut |ctx: &Context, seq| {
                let v = ctx
                    .lookup(&name)
                    .ok_or_else(|| Error::VolumeNotFound(name.clone()))?;
                if v.read_only.load(Ordering::Relaxed) {
                    return Err(Error::ReadOnly(name.clone()));
                }
                let blocks = size_bytes.div_ceil(BLOCK_BYTES);
                let mut space = ctx.space.lock();
                for m in &v.maps {
                    let mut dropped = Vec::new();
                    let resized = m
                        .lock()
                        .resize(blocks, &mut |id| space.add_ref(id), &mut |id| {
                            dropped.push(id)
                        });
                    for id in dropped {
                        space.drop_ref(id, seq);
                    }
                    let resized = resized.and(space.take_failure().map_or(Ok(()), Err));
                    // As in `delete_volume`.
                    if let Err(e) = resized {
                        ctx.health.set_fault(format!("resizing volume {name}: {e}"));
                        return Err(e);
                    }
                }
                v.size_bytes.store(size_bytes, Ordering::Release);
                Ok(())
            }))
    }

    /// Clean now: empty every sealed segment worth cleaning (at most `max_utilisation` full),
    /// best candidates first, checkpointing after each batch. `progress(done, total)` reports
    /// segments.
    pub fn gc(&self, max_utilisation: f64, progress: &mut dyn FnMut(u64, u64)) -> Result<GcReport> {
        // A checkpoint first puts every sealed segment behind it, so that cleaned victims are
        // freed after a flush instead of one checkpoint per chunk. The segments it frees (those
        // left without a live block) count as freed by this run.
        let free_before = self.inner.ctx.space.lock().free_segments;
        self.inner.ckpt.checkpoint_with(None)?;
        let freed_by_checkpoint =
            (self.inner.ctx.space.lock().free_segments as u64).saturating_sub(free_before as u64);
        // The segments worth cleaning now; segments the pass itself fills are left alone, so
        // it ends.
        let todo = self.gc_candidates(max_utilisation);
        let mut total = GcReport {
            segments_freed: freed_by_checkpoint,
            ..GcReport::default()
        };
        progress(0, todo.len() as u64);
        for chunk in todo.chunks(GC_VICTIMS_PER_PASS) {
            let r = self.inner.cleaner.clean(
                chunk.len(),
                max_utilisation,
                Some(chunk),
                false,
                &mut |_, _| {},
            )?;
            total.segments_cleaned += r.segments_cleaned;
            total.segments_freed += r.segments_freed;
            total.bytes_moved += r.bytes_moved;
            progress(total.segments_cleaned, todo.len() as u64);
        }
        Ok(total)
    }

    pub(crate) fn gc_candidates(&self, max_utilisation: f64) -> Vec<u32> {
        let usable = (self.inner.ctx.geo.segment_bytes - SEGMENT_HEADER_BYTES) as f64;
        let space = self.inner.ctx.space.lock();
        space
            .seg_state
            .iter()
            .enumerate()
            .filter(|(s, st)| {
                matches!(st, SegState::Sealed { .. })
                    && space.seg_live[*s] > 0
                    && space.seg_live[*s] as f64 / usable <= max_utilisation
            })
            .map(|(s, _)| s as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::api::BLOCK_BYTES;
    use crate::map::shard_of;
    use crate::pool::Pool;

    /// A snapshot shares its source's map leaves: its blocks keep one reference each (a block
    /// counts leaves, not volumes). The first write to a shared leaf copies it, and the copy's
    /// blocks gain a reference; deleting the snapshot gives back only what it alone held.
    #[test]
    fn a_snapshot_shares_leaves_until_a_write_copies_one() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::small_for_tests(dir.path(), None);
        let blocks = 2048u64;
        pool.create_volume("v", blocks * BLOCK_BYTES).unwrap();
        let v = pool.volume("v").unwrap();
        for lba in 0..blocks {
            let mut b = vec![7u8; BLOCK_BYTES as usize];
            b[..8].copy_from_slice(&lba.to_le_bytes());
            v.write(lba * BLOCK_BYTES, &b, false).unwrap();
        }
        v.flush().unwrap();
        pool.snapshot_volume("v", "s").unwrap();
        let ctx = &pool.inner.ctx;
        let shards = ctx.shards();
        let (src, snap) = (ctx.lookup("v").unwrap(), ctx.lookup("s").unwrap());
        let id = |lba: u64| src.maps[shard_of(lba, shards)].lock().get(lba).unwrap();
        let refs = |id: u64| ctx.space.lock().refs.get(id);
        assert!(
            (0..blocks).all(|lba| refs(id(lba)) == 1),
            "a snapshot added references"
        );
        // Each volume's share of the blocks they both hold is a half: the shares add up to
        // the pool's blocks.
        let st = pool.stats();
        let per_volume: u64 = st.volumes.iter().map(|v| v.unique_blocks).sum();
        assert_eq!(per_volume, st.unique_blocks);
        assert!(
            st.volumes.iter().all(|v| v.unique_blocks == blocks / 2),
            "{:?}",
            st.volumes
        );
        let leaf = |vol: &crate::map::VolumeState, lba: u64| {
            vol.maps[shard_of(lba, shards)].lock().pages[(lba / 512) as usize]
                .clone()
                .unwrap()
        };
        assert_eq!(leaf(&src, 0).users(), 2);
        // Overwrite block 3 of the first leaf: the source gets its own copy of the leaf.
        let (old3, kept) = (id(3), id(4));
        v.write(3 * BLOCK_BYTES, &[1u8; BLOCK_BYTES as usize], false)
            .unwrap();
        v.flush().unwrap();
        assert_eq!((leaf(&src, 0).users(), leaf(&snap, 0).users()), (1, 1));
        assert_eq!((refs(kept), refs(old3)), (2, 1));
        assert_eq!(leaf(&src, 600).users(), 2, "other leaves stay shared");
        assert!(pool.check(&mut |_, _| {}).problems.is_empty());
        pool.delete_volume("s").unwrap();
        assert_eq!((refs(kept), refs(id(600))), (1, 1));
        assert!(
            !ctx.space.lock().refs.live(old3),
            "the snapshot's own block is freed"
        );
        assert_eq!(leaf(&src, 600).users(), 1);
        let report = pool.check(&mut |_, _| {});
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}
