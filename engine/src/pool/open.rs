//! Opening a pool: read the superblocks and the newest checkpoint, replay the log after it,
//! write a recovery checkpoint, start the workers.

use crate::checkpoint::{Checkpointer, CkptState};
use crate::context::{mark_held_free, usable_bytes, Context, Parts};
use crate::gc::Cleaner;
use crate::health::{Health, Wake};
use crate::map::VolumeTable;
use crate::pool::{
    checkpointer, default_cache_bytes, default_index_bytes, flusher, in_dir, lock_dir,
    spawn_supervised, write_pool_file, Inner, Pool, PoolFile, PoolOptions, POOL_FILE,
};
use crate::recovery::{load_checkpoint, read_superblocks};
use crate::shard::Workers;
use crate::space::Geometry;
use crate::store::{LocalStore, SegmentStore};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cache::{BlockCache, ReuseEpoch};
use crate::error::{Error, Result};
use crate::format::{
    LogKey, SegmentHeader, SegmentKind, DATA_START, IO_ALIGN, NO_SEGMENT, SEGMENT_HEADER_BYTES,
};
use crate::io::claim::{self, DeviceClaim};
#[cfg(any(test, feature = "testing"))]
use crate::io::fault::FaultDevices;
use crate::io::sync::FileSet;
use crate::io::{open_devices, AlignedBuf, Doorbell, SharedDevices};
use crate::log::ShardPosition;
use crate::map::VolumeState;
use crate::meta::cache::MetaCache;
use crate::recovery::{replay, Rebuild, Replayed};
use crate::reduce::DedupIndex;
use crate::shard::Shard;
use crate::space::{SegState, SegUse, Space};

impl Pool {
    /// Open an existing pool: load the newest checkpoint, replay the log after it, write a new
    /// checkpoint, start the workers.
    pub fn open(dir: &Path, o: &PoolOptions) -> Result<Pool> {
        if !Pool::exists(dir) {
            return Err(Error::NotAPool {
                path: dir.to_path_buf(),
                reason: "no pool.json",
            });
        }
        let lock = lock_dir(dir)?;
        Pool::open_locked(dir, o, lock, None)
    }

    pub(crate) fn open_locked(
        dir: &Path,
        o: &PoolOptions,
        lock: File,
        claim: Option<DeviceClaim>,
    ) -> Result<Pool> {
        let pf_path = dir.join(POOL_FILE);
        let raw = std::fs::read(&pf_path).map_err(|source| Error::File {
            path: pf_path.clone(),
            source,
        })?;
        let pf: PoolFile = serde_json::from_slice(&raw).map_err(|_| Error::NotAPool {
            path: pf_path.clone(),
            reason: "pool.json is not valid",
        })?;
        if pf.devices.is_empty() {
            return Err(Error::NotAPool {
                path: pf_path,
                reason: "pool.json lists no devices",
            });
        }
        let abs = in_dir(dir, &pf.devices);
        // Each device once, locked, and of this pool.
        let claim = match claim {
            Some(c) => c,
            None => DeviceClaim::acquire(&abs, false)?,
        };
        claim.check_members(pf.pool_uuid.as_deref())?;
        let files = FileSet::open(&abs).map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        let base = open_devices(files, o.io).map_err(|source| Error::File {
            path: abs[0].clone(),
            source,
        })?;
        #[cfg(any(test, feature = "testing"))]
        let base: SharedDevices = match &o.fault {
            Some(plan) => Arc::new(FaultDevices::new(base, plan.clone())),
            None => base,
        };
        let mut replica_counters = None;
        let devices: SharedDevices = match &o.replica {
            Some(r) if !o.read_only => {
                let m = crate::replica::MirrorDevices::new(
                    base,
                    r.clone(),
                    crate::replica::MirrorOptions {
                        base: o.replica_base,
                        rebase_bytes: o.replica_rebase_bytes,
                        history_bytes: o.replica_history_bytes,
                        cold: o.replica_cold.clone(),
                        fill: o.replica_fill,
                        local: o.replica_local_ack,
                        rebase_now: o.replica_rebase_now,
                        cache_bytes: o.replica_cache_bytes,
                    },
                )
                .map_err(|source| Error::File {
                    path: abs[0].clone(),
                    source,
                })?;
                replica_counters = Some(m.counters());
                Arc::new(m)
            }
            _ => base,
        };
        let (mut sbs, older) = read_superblocks(&*devices, &abs)?;
        let mut newest =
            sbs.iter()
                .max_by_key(|s| s.generation)
                .cloned()
                .ok_or(Error::Corrupt {
                    what: "no superblock",
                })?;
        if pf.pool_uuid.is_none() && !o.read_only {
            // A pool made before pool.json named its UUID: record it now (its devices agree
            // among themselves), so that a foreign device put in later is refused.
            let named = PoolFile {
                pool_uuid: Some(claim::uuid_string(&newest.pool_uuid)),
                format_version: crate::format::FORMAT_VERSION,
                ..pf.clone()
            };
            write_pool_file(dir, &named)?;
        }
        let geo = Geometry {
            segment_bytes: newest.segment_bytes,
            devs: sbs
                .iter()
                .map(|s| (s.first_segment, s.segment_count))
                .collect(),
            total_segments: newest.total_segments,
        };
        for (d, s) in sbs.iter().enumerate() {
            let need = DATA_START + u64::from(s.segment_count) * geo.segment_bytes;
            if devices.size(d as u16) < need {
                return Err(Error::NotAPool {
                    path: abs[d].clone(),
                    reason: "device is smaller than its superblock says (truncated?)",
                });
            }
        }
        let store: Arc<dyn SegmentStore> = Arc::new(LocalStore::new(devices.clone(), geo.clone()));
        let mut space = Space::new(geo.total_segments);
        space.set_devices(&geo.devs.iter().map(|&(first, _)| first).collect::<Vec<_>>());
        // Load the newest checkpoint (or the one before, when a commit stopped half way).
        let opening = std::time::Instant::now();
        let (mut image, ckpt_segs) = load_checkpoint(&*store, &geo, &mut sbs, &older, &mut newest)?;
        // A version 1 pool's log is sealed by CRC only: it is replayed with those rules once,
        // then the recovery checkpoint below writes version 2 superblocks with a new key, and
        // every chain starts in a fresh segment sealed under it.
        let legacy = newest.log_key.is_none();
        let log_key = match newest.log_key {
            Some(k) => k,
            None => LogKey::generate().map_err(|source| Error::File {
                path: abs[0].clone(),
                source,
            })?,
        };
        // Map leaves: a format 3 pool's may be evicted from the start: each is held where it
        // was read, and the recovery checkpoint names unchanged ones again (it reads back only
        // those of segments it cleans). Format 2's have no page to come back from: kept all
        // until an upgrade's first checkpoint holds them.
        let meta_budget = o
            .metadata_cache_bytes
            .unwrap_or_else(super::options::default_metadata_cache_bytes);
        let meta = Arc::new(MetaCache::new(
            if newest.version >= crate::format::FORMAT_VERSION_PAGED {
                meta_budget
            } else {
                u64::MAX
            },
        ));
        meta.set_source(store.clone(), log_key, 0);
        meta.set_open_pages(image.pages.as_ref().map_or(0, |p| p.pages_read));
        for sb in &mut sbs {
            // Version 1 becomes at least 2 (below: 3 when there is room).
            sb.version = sb.version.max(crate::format::FORMAT_VERSION);
            sb.log_key = Some(log_key);
        }
        let was_paged = sbs
            .first()
            .is_some_and(|sb| sb.version >= crate::format::FORMAT_VERSION_PAGED);
        // Where the pages of a format 3 checkpoint are, for a writable open's recovery
        // checkpoint to start from (a pool that was format 3 stays so); dropped at once
        // otherwise (16 bytes per 2 MiB of every volume, and more).
        // A read-only open never checkpoints: its block-table leaves may go once replayed, held
        // by the checkpoint it read (a few bytes per 252 blocks).
        let read_only_table: Vec<crate::format::PagePtr> = match &image.pages {
            Some(p) if was_paged && o.read_only => p.table_leaves().to_vec(),
            _ => Vec::new(),
        };
        let loaded_pages = image.pages.take().filter(|_| was_paged && !o.read_only);
        for &s in &ckpt_segs {
            space.set_state(s, SegState::Checkpoint);
        }
        let nshards = if o.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            o.shards
        }
        .clamp(1, 64);
        // Chains of the checkpoint: data shards' first, then move chains (a pool written before
        // move chains existed has none).
        let old_shards = image.data_chains;
        // Volumes and maps.
        let mut table = VolumeTable {
            by_name: BTreeMap::new(),
            next_id: image.next_volume_id.max(1),
        };
        let mut by_id: HashMap<u32, Arc<VolumeState>> = HashMap::new();
        // A root that stored the counts (`format::ROOT_COUNTS`): taken as they are, the block
        // table left on its pages. Else the open counts the map entries afresh.
        // Ids the image holds as in use with no reference (dedup references not logged at the
        // cut; root section 10): held, so that replay finds their blocks stored (`is_placed`).
        let held = std::mem::take(&mut image.held);
        let mut was_live = None;
        let recount = match image.counts.take() {
            Some(c) => {
                if c.usage.len() != geo.total_segments as usize
                    || c.usage.iter().any(|&b| b > geo.segment_bytes)
                {
                    return Err(Error::Corrupt {
                        what: "segment usage",
                    });
                }
                space.set_counted(
                    image.blocks,
                    image.refs,
                    &c.usage,
                    (c.live_blocks, c.stored_bytes),
                );
                false
            }
            None => {
                // Which ids the image holds as live: those the recount finds unreferenced are
                // held all the same (a pin the image counted), for `is_placed` in replay.
                was_live = Some(image.refs);
                space.set_blocks(image.blocks);
                true
            }
        };
        // Its leaves count against the metadata cache, and go past its budget once a format 3
        // checkpoint holds them (`BlockTable::committed`).
        space.blocks.set_pages(meta.clone());
        // Tests may force every fingerprint of a domain to collide (to exercise verification).
        #[cfg(any(test, feature = "testing"))]
        let collide = o
            .fault
            .as_ref()
            .is_some_and(|f| f.collide_fingerprints.load(Ordering::Relaxed));
        #[cfg(not(any(test, feature = "testing")))]
        let collide = false;
        let dedup_key_mask = if collide { 0 } else { u64::MAX };
        let dedup_key = |fp: u128| fp as u64 & dedup_key_mask | (fp >> 64) as u64 & !dedup_key_mask;
        let mut dedup = DedupIndex::new(o.dedup_index_bytes.unwrap_or_else(default_index_bytes));
        // A checkpoint older than keyed fingerprints comes with an index, and a log, of unkeyed
        // XXH3 fingerprints that no lookup computes any more: neither is indexed (their blocks
        // are simply not dedup candidates; the recovery checkpoint of this open is keyed, and
        // so is every record written after it). Were one indexed, it would cost a verify read
        // and no data: every hit is compared byte for byte.
        let keyed_index = image.keyed_fingerprints;
        if keyed_index {
            dedup.set_sample_bits(u32::from(image.index_sample_bits));
            for &(k, id) in &image.index {
                // Keys were stored as `dedup_key` made them; with collisions forced, the tag
                // they would need is gone, so the (test-only) index starts empty.
                if !collide {
                    dedup.insert(k, id);
                }
            }
        }
        // 16 bytes an entry, no longer needed: not held through replay and the recovery
        // checkpoint, the open's peak.
        drop(image.index);
        // A block counts the distinct leaves pointing at it: a leaf several volumes share (a
        // format 3 checkpoint keeps snapshots' leaves shared) counts once.
        let mut seen: std::collections::HashSet<*const crate::map::MapLeaf> =
            std::collections::HashSet::new();
        for v in image.volumes {
            let vs = VolumeState::new(v.id, v.name.clone(), v.size_bytes, nshards, &meta);
            if v.flags & !crate::format::VOLUME_KNOWN_FLAGS != 0 {
                return Err(Error::Corrupt {
                    what: "a volume has flags this build does not know (written by a newer ingot?)",
                });
            }
            vs.set_flags(v.flags);
            vs.set_dedup_domain(v.domain.clone(), &log_key.0);
            vs.qos.set(v.qos);
            for (idx, page) in v.pages {
                let mut m = vs.maps[(idx % nshards as u64) as usize].lock();
                let leaf = page.clone();
                // Taking it may evict its entries (read-only): read back, not kept.
                if m.load_page(idx as usize, page) && recount && seen.insert(Arc::as_ptr(&leaf)) {
                    leaf.with_entries(idx, |ids| {
                        for &id in ids.iter().filter(|&&id| id != 0) {
                            space.add_ref(id);
                        }
                    })?;
                }
            }
            if let Some(e) = space.take_failure() {
                return Err(e);
            }
            let vs = Arc::new(vs);
            by_id.insert(v.id, vs.clone());
            table.by_name.insert(v.name, vs);
        }
        if let Some(live) = was_live.take() {
            for id in 1..space.blocks.len() as u64 {
                if live.live(id) && !space.refs.in_use(id) {
                    space.refs.hold(id);
                }
            }
        }
        for id in held {
            if !space.refs.in_use(id) {
                space.refs.hold(id);
            }
        }
        // Replay every chain of the checkpoint, in sequence order.
        // What the checkpoint holds is on flash as it is in RAM now: what replay changes is
        // what the recovery checkpoint (format 3) rewrites. (Counts recounted from the maps
        // above differ from what a format 3 checkpoint stored only where it did not store
        // counts: the recovery checkpoint writes every count page then.)
        space.blocks.take_changed();
        space.refs.take_changed();
        let loaded_in = opening.elapsed();
        let Replayed {
            seq_end,
            chain_segs,
            ends,
            stats: replay_stats,
        } = replay(
            &*store,
            &geo,
            &image.shards,
            image.epoch,
            image.seq,
            &newest,
            Rebuild {
                space: &mut space,
                volumes: &by_id,
                dedup: &mut dedup,
                dedup_key: &dedup_key,
                index: keyed_index,
                shards: nshards,
                old_shards,
                meta: Some(&meta),
                #[cfg(any(test, feature = "testing"))]
                hold_entries: o.replay_hold_entries,
                #[cfg(not(any(test, feature = "testing")))]
                hold_entries: crate::recovery::HOLD_ENTRIES,
            },
        )?;
        // Leaves replay did not change are as the checkpoint read holds them (their dead ids'
        // entries aside, which nothing reads after replay).
        if !read_only_table.is_empty() {
            space.blocks.committed(&read_only_table);
        }
        // Segment states: whatever holds live data, or was part of a chain, stays.
        for &s in &chain_segs {
            if (s as usize) < space.seg_state.len() && space.seg_state[s as usize] == SegState::Free
            {
                space.set_state(s, SegState::Sealed { seq: seq_end });
            }
        }
        for s in 0..space.seg_state.len() {
            if space.seg_live[s] > 0 && space.seg_state[s] == SegState::Free {
                space.set_state(s as u32, SegState::Sealed { seq: seq_end });
            }
        }
        // New chains for the new epoch: an open segment per shard first, then next segments
        // only beyond the reserve the running pool keeps (the recovery checkpoint needs it).
        let epoch = image.epoch + 1;
        let (mut ckpt_reserve, mut ckpt_segments, mut paged, blob_plan) = {
            let mut pages = 0u64;
            for v in table.by_name.values() {
                for m in &v.maps {
                    pages += m.lock().present_pages();
                }
            }
            let blob = crate::context::checkpoint_estimate_bytes(
                pages,
                space.live_blocks,
                table.by_name.len() as u64,
                nshards as u64,
            );
            let dir = table
                .by_name
                .values()
                .map(|v| crate::context::dir_pages(v.size()))
                .sum();
            let paged_est = blob.max(crate::context::paged_checkpoint_estimate_bytes(
                pages,
                space.blocks.len() as u64,
                space.live_blocks,
                dir,
                table.by_name.len() as u64,
                nshards as u64,
                u64::from(geo.total_segments),
                space.refs.overflow_len() as u64,
            ));
            // As `Inner::reserve_segments` will keep back.
            let segs = |est: u64| {
                est.div_ceil(geo.segment_bytes - SEGMENT_HEADER_BYTES) as usize + 1 + nshards + 1
            };
            // A version 1 or 2 pool is upgraded to 3 (unless `PoolOptions::paged_metadata` says
            // not to) by the recovery checkpoint below, which writes format 3 and points both superblock
            // slots at it (until the second is written, the other slot still names the old
            // checkpoint, whose segments stay until then). Not when a read-only open writes
            // nothing, nor when the pool has no room for a whole format 3 checkpoint and the
            // reserve it would keep (heavily thin volumes' directories, or a full pool): it
            // stays version 2 and is upgraded by an open that finds the room.
            let room = space.free_segments >= 2 * segs(paged_est) + nshards;
            let wanted = o.paged_metadata;
            let paged = was_paged || (!o.read_only && room && wanted);
            if paged && !was_paged {
                for sb in &mut sbs {
                    sb.version = crate::format::FORMAT_VERSION_PAGED;
                }
                tracing::info!(
                    target: "ingot_engine::recovery",
                    "upgrading the pool to format 3 (metadata pages)"
                );
            } else if !paged && wanted && !o.read_only {
                tracing::warn!(
                    target: "ingot_engine::recovery",
                    free_segments = space.free_segments,
                    "no room to upgrade the pool to format 3: it stays format 2 for now"
                );
            }
            let plan = |est: u64| {
                (
                    segs(est),
                    est.div_ceil(geo.segment_bytes - SEGMENT_HEADER_BYTES)
                        .max(1) as usize,
                )
            };
            let (reserve, need) = plan(if paged { paged_est } else { blob });
            (reserve, need, paged, plan(blob))
        };
        // A shard's new chain continues its old one just past the last replayed record when
        // that segment has room: otherwise every open would strand a partly filled segment per
        // shard, and a full pool could not be opened at all. Replay starts at the checkpoint's
        // position, so the segment's old header (old epoch) is never read for this chain.
        // The move chain (the last) continues the old one, if the checkpoint had one.
        let old_ends: Vec<Option<&ShardPosition>> = (0..nshards)
            .map(|i| ends.get(i).filter(|_| i < old_shards))
            .chain(std::iter::once(ends.get(old_shards)))
            .collect();
        // Continuing needs the segment's nonce (its header verified); an upgraded pool starts
        // every chain afresh.
        let mut starts: Vec<(u32, u32, Option<[u8; 16]>)> = Vec::new();
        for old_end in old_ends {
            let cont = old_end.filter(|e| {
                !legacy
                    && e.nonce.is_some()
                    && e.segment != NO_SEGMENT
                    && e.segment < geo.total_segments
                    && u64::from(e.offset) + 2 * IO_ALIGN as u64 <= geo.segment_bytes
            });
            match cont {
                Some(e) => {
                    space.set_state(e.segment, SegState::Open);
                    starts.push((e.segment, e.offset, e.nonce));
                }
                None => starts.push((NO_SEGMENT, SEGMENT_HEADER_BYTES as u32, None)),
            }
        }
        // Fresh chains take segments the backing files hold when there are: on a full host
        // file system a new segment's header could not be written.
        if !pf.prefilled && !o.read_only {
            mark_held_free(&*devices, &geo, &mut space);
            // Data keeps off the held segments from the start (see `Inner::top_up_backed`).
            space.backed_reserve = 2 * ckpt_reserve;
        }
        let mut refused = Vec::new();
        for st in starts.iter_mut().filter(|st| st.2.is_none()) {
            loop {
                let seg = space
                    .alloc_segment_for(SegState::Open, 0, SegUse::Metadata)
                    .ok_or(Error::NoSpace)?;
                st.0 = seg;
                if pf.prefilled || o.read_only {
                    break;
                }
                // Held, or room for it on the host: its header can be written.
                let (dev, base) = geo.locate(seg);
                match devices.preallocate(dev, base, geo.segment_bytes) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => refused.push(seg),
                    _ => break,
                }
            }
        }
        // The recovery checkpoint's segments, set aside before the chains' next segments are
        // chosen: on a full host file system only segments it already holds can be written,
        // and the open knows only those that were written (a fallocated, never written one
        // reads as a hole), so a next segment could take one it needed.
        let mut set_aside = Vec::new();
        if !pf.prefilled && !o.read_only {
            while set_aside.len() < ckpt_segments {
                let Some(seg) = space.alloc_segment_for(SegState::Checkpoint, 0, SegUse::Metadata)
                else {
                    break;
                };
                let (dev, base) = geo.locate(seg);
                match devices.preallocate(dev, base, geo.segment_bytes) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => refused.push(seg),
                    _ => set_aside.push(seg),
                }
            }
        }
        // An upgrade whose whole first checkpoint the host cannot back waits for an open that
        // can (a full host file system): format 2's fits the room there is.
        let aside_tried = !pf.prefilled && !o.read_only;
        if aside_tried && paged && !was_paged && set_aside.len() < ckpt_segments {
            tracing::warn!(
                target: "ingot_engine::recovery",
                "no room on the host file system to upgrade the pool to format 3: it stays \
                 format 2 for now"
            );
            paged = false;
            (ckpt_reserve, ckpt_segments) = blob_plan;
            for sb in &mut sbs {
                sb.version = crate::format::FORMAT_VERSION;
            }
            space.backed_reserve = 2 * ckpt_reserve;
            while set_aside.len() > ckpt_segments {
                if let Some(s) = set_aside.pop() {
                    // Held: the next checkpoints take it first.
                    space.set_state(s, SegState::Free);
                    if !space.undiscarded[s as usize] {
                        space.undiscarded[s as usize] = true;
                        space.undiscarded_count += 1;
                    }
                }
            }
        }
        for s in refused {
            space.set_state(s, SegState::Free);
        }
        let mut positions = Vec::new();
        for (i, (seg, offset, nonce)) in starts.into_iter().enumerate() {
            let next = space
                .alloc_segment(SegState::Next, ckpt_reserve)
                .unwrap_or(NO_SEGMENT);
            let nonce = match nonce {
                Some(n) => n,
                // Read-only: no chain is written to.
                None if o.read_only => [0; 16],
                None => {
                    let n = crate::format::random_bytes().map_err(|source| Error::File {
                        path: abs[0].clone(),
                        source,
                    })?;
                    let mut buf = AlignedBuf::new(IO_ALIGN);
                    SegmentHeader {
                        kind: SegmentKind::Data,
                        segment: seg,
                        shard: i as u16,
                        pool_uuid: newest.pool_uuid,
                        epoch,
                        next_segment: next,
                        nonce: n,
                    }
                    .encode(&mut buf, &log_key);
                    let (dev, b) = geo.locate(seg);
                    devices.write_at(dev, &buf, b).map_err(|source| Error::Io {
                        device: dev,
                        offset: b,
                        source,
                    })?;
                    n
                }
            };
            positions.push(ShardPosition {
                segment: seg,
                offset,
                next,
                shard_seq: 0,
                nonce: Some(nonce),
            });
        }
        let (ftx, frx) = crossbeam_channel::unbounded();
        let (ktx, krx) = crossbeam_channel::bounded(1);
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        let mut bells = Vec::new();
        let mut urgent = Vec::new();
        for _ in 0..=nshards {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            let (utx, urx) = crossbeam_channel::unbounded();
            urgent.push(utx);
            let bell = Arc::new(Doorbell::new().map_err(|source| Error::Io {
                device: 0,
                offset: 0,
                source,
            })?);
            bells.push(bell.clone());
            receivers.push((rx, urx, bell));
        }
        let cache_capacity = o.cache_bytes.unwrap_or_else(default_cache_bytes);
        let usable_bytes = usable_bytes(&geo, nshards, paged);
        let health = Arc::new(Health::default());
        let reuse = ReuseEpoch::default();
        // Writes and deletes of earlier owners are refused from now on.
        store.fence(epoch);
        let ctx = Arc::new(Context::new(Parts {
            devices: devices.clone(),
            store,
            geo,
            pool_uuid: newest.pool_uuid,
            log_key,
            read_only: o.read_only,
            epoch,
            space,
            seq: seq_end,
            // The mover (the last worker) only writes: no cache.
            caches: (0..=nshards)
                .map(|i| {
                    let bytes = if i < nshards {
                        cache_capacity / nshards as u64
                    } else {
                        0
                    };
                    Mutex::new(BlockCache::new(bytes, reuse.clone()))
                })
                .collect(),
            reuse,
            flusher: ftx,
            discard_freed: !pf.prefilled,
            usable_bytes,
            dedup,
            dedup_key_mask,
            health,
            wake: Wake::new(ktx),
            // A sixty-fourth of the capacity at most: the last `write_back_bytes` are kept for
            // early writes, which must not cost a small pool a visible share.
            write_back_bytes: o.write_back_bytes.min(usable_bytes / 64),
            volumes: table,
            data_shards: nshards,
            paged_checkpoints: paged,
            meta: meta.clone(),
            replica: o.replica.clone().filter(|_| !o.read_only),
            replica_counters,
        }));
        let workers = Arc::new(Workers::new(senders, bells, urgent));
        // A format 3 checkpoint read by a writable open that stays format 3: the recovery
        // checkpoint writes only what replay changed, and the pages it does not rewrite stay
        // where they are (retained per segment by their counts).
        let (ckpt_segs, loaded, meta_segs) = match loaded_pages.filter(|_| paged) {
            Some(state) => {
                let mut m = crate::meta::segs::MetaSegs::default();
                m.adopt_pages(&state.segment_pages(), &ckpt_segs);
                (Vec::new(), Some(*state), m)
            }
            None => (ckpt_segs, None, Default::default()),
        };
        let ckpt = Arc::new(Checkpointer::new(
            ctx.clone(),
            workers.clone(),
            CkptState {
                generation: newest.generation,
                segments: ckpt_segs,
                prev_segments: Vec::new(),
                seq_end: image.seq,
                both_seq: image.seq,
                written_at_last: 0,
                stamps: None,
                paged: loaded,
                meta: meta_segs,
                set_aside,
            },
            sbs,
        ));
        let inner = Arc::new(Inner {
            cleaner: Cleaner::new(ctx.clone(), workers.clone(), ckpt.clone()),
            ctx,
            workers,
            ckpt,
            cache_capacity,
            checkpoint_interval: o.checkpoint_interval_bytes.max(64 << 20),
        });
        inner.ctx.update_write_back_floor();
        if o.read_only {
            for v in inner.ctx.volumes.read().by_name.values() {
                v.read_only.store(true, Ordering::Relaxed);
            }
        }
        inner.ctx.top_up_backed();
        // The recovery checkpoint: the new epoch and chains are durable before any write.
        if !o.read_only {
            let mut image = inner.ckpt.snapshot(seq_end, positions.clone());
            inner.ckpt.add_index(&mut image);
            let mut ck = inner.ckpt.state.lock();
            let committing = std::time::Instant::now();
            inner.ckpt.commit(&mut ck, &image)?;
            tracing::info!(
                target: "ingot_engine::recovery",
                load_ms = loaded_in.as_millis() as u64,
                scan_ms = replay_stats.scan.as_millis() as u64,
                apply_ms = replay_stats.apply.as_millis() as u64,
                records = replay_stats.records,
                entries = replay_stats.entries,
                checkpoint_ms = committing.elapsed().as_millis() as u64,
                total_ms = opening.elapsed().as_millis() as u64,
                "pool opened"
            );
            inner.ctx.release_all_ids(&mut inner.ctx.space.lock());
            // An upgraded pool's leaves are held by that checkpoint now: past the budget,
            // they may go.
            if paged {
                meta.set_budget(meta_budget);
            }
        }
        inner.ctx.top_up_backed();
        if inner.ctx.discard_freed && !o.read_only {
            inner.ctx.note_unpunched_at_open();
        }
        let mut threads = Vec::new();
        for (i, (rx, urx, bell)) in receivers.into_iter().enumerate() {
            let queue = devices.queue(256).map_err(|source| Error::Io {
                device: 0,
                offset: 0,
                source,
            })?;
            let pos = positions[i];
            let name = if i < nshards {
                format!("ingot-shard-{i}")
            } else {
                "ingot-mover".to_string()
            };
            let sv = inner.ctx.clone();
            threads.push(spawn_supervised(name, &inner.ctx.health, move || {
                Shard::new(i, sv, rx, urx, bell, queue, pos).run()
            })?);
        }
        let fi = inner.clone();
        threads.push(spawn_supervised(
            "ingot-flusher".into(),
            &inner.ctx.health,
            move || flusher(fi, frx),
        )?);
        // Read-only: no checkpoints, no cleaning (moves would write).
        if !o.read_only {
            let ci = inner.clone();
            threads.push(spawn_supervised(
                "ingot-checkpointer".into(),
                &inner.ctx.health,
                move || checkpointer(ci, krx),
            )?);
        }
        Ok(Pool {
            inner,
            threads: Mutex::new(threads),
            dir: dir.to_path_buf(),
            _lock: lock,
            _claim: claim,
            halted: AtomicBool::new(false),
        })
    }
}
