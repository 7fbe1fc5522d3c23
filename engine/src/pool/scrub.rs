//! Scrub: read every stored block, verify its checksum, and rebuild reference counts and
//! segment usage from the maps to compare them with the running ones.

use crate::pool::Pool;
use std::collections::HashMap;
use std::sync::Arc;

use crate::api::{CheckReport, Problem, BLOCK_BYTES};
use crate::format::{IO_ALIGN, MAP_PAGE_ENTRIES};
use crate::map::{MapLeaf, VolumeState};
use crate::shard::{decode_entry, PayloadFault};
use crate::store::{self, Range};

impl Pool {
    /// Verify every stored block's checksum and the invariants: reference counts equal the
    /// entries of distinct map leaves pointing at each block (snapshots share leaves), segment usage equals the sum of live block sizes.
    /// `progress(done, total)` is called as blocks are verified.
    pub fn check(&self, progress: &mut dyn FnMut(u64, u64)) -> CheckReport {
        let inner = &self.inner;
        // Holding the checkpoint lock keeps segments and block ids from being reused meanwhile.
        let _ck = inner.ckpt.state.lock();
        let mut report = CheckReport::default();
        let vols: Vec<Arc<VolumeState>> =
            inner.ctx.volumes.read().by_name.values().cloned().collect();
        let (table, refs, seg_live, stored_bytes) = {
            let s = inner.ctx.space.lock();
            (
                s.blocks.clone(),
                s.refs.clone(),
                s.seg_live.clone(),
                s.stored_bytes,
            )
        };
        // Every entry, evicted block-table leaves read back (the checkpoint lock held keeps
        // their pages where they are).
        let mut blocks = Vec::with_capacity(table.len());
        if let Err(e) = table.for_each_in(0..table.len(), &mut |_, e| blocks.push(*e)) {
            report.problems.push(Problem {
                kind: "block table".into(),
                detail: format!("a block-table leaf does not read back: {e}"),
            });
            return report;
        }
        drop(table);
        let mut counted = vec![0u32; blocks.len()];
        let mut owner: HashMap<u64, (String, u64)> = HashMap::new();
        // A block counts the distinct leaves pointing at it: a leaf that snapshots and clones
        // share counts once. Each leaf's holders are counted too, to compare with its `users`.
        let mut holders: HashMap<*const MapLeaf, (u32, u32)> = HashMap::new();
        for v in &vols {
            report.volumes_checked += 1;
            for m in &v.maps {
                let m = m.lock().clone();
                for (p, leaf) in m.pages.iter().enumerate() {
                    let Some(leaf) = leaf else { continue };
                    let h = holders
                        .entry(Arc::as_ptr(leaf))
                        .or_insert((0, leaf.users()));
                    h.0 += 1;
                    let first = h.0 == 1;
                    let ids = match leaf.with_entries(p as u64, |e| Box::new(*e)) {
                        Ok(ids) => ids,
                        Err(e) => {
                            report.problems.push(Problem {
                                kind: "map leaf".into(),
                                detail: format!(
                                    "volume {} blocks {}..{}: {e}",
                                    v.name,
                                    p as u64 * MAP_PAGE_ENTRIES,
                                    (p as u64 + 1) * MAP_PAGE_ENTRIES
                                ),
                            });
                            continue;
                        }
                    };
                    for (i, &id) in ids.iter().enumerate().filter(|(_, &id)| id != 0) {
                        let lba = p as u64 * MAP_PAGE_ENTRIES + i as u64;
                        match counted.get_mut(id as usize) {
                            Some(c) if refs.live(id) => {
                                *c += u32::from(first);
                                owner.entry(id).or_insert_with(|| (v.name.clone(), lba));
                            }
                            _ => report.problems.push(Problem {
                                kind: "location".into(),
                                detail: format!(
                                    "volume {} block {lba} (byte {}) maps to block id {id}, which is not in the block table",
                                    v.name,
                                    lba * BLOCK_BYTES
                                ),
                            }),
                        }
                    }
                }
            }
        }
        for (held, users) in holders.into_values() {
            if held != users {
                report.problems.push(Problem {
                    kind: "map page".into(),
                    detail: format!("a map page held by {held} volumes counts {users} holders"),
                });
            }
        }
        let mut live = vec![0u64; seg_live.len()];
        let mut stored_total = 0u64;
        for (id, b) in blocks.iter().enumerate() {
            let r = refs.get(id as u64);
            if r != counted[id] {
                report.problems.push(Problem {
                    kind: "refcount".into(),
                    detail: format!(
                        "block id {id}: reference count {r} but {} map entries point at it",
                        counted[id]
                    ),
                });
            }
            if r > 0 {
                if let Some(l) = live.get_mut(b.segment as usize) {
                    *l += b.share();
                }
                stored_total += b.share();
            }
        }
        for (s, (&want, &have)) in live.iter().zip(seg_live.iter()).enumerate() {
            if want != have {
                report.problems.push(Problem {
                    kind: "segment_usage".into(),
                    detail: format!("segment {s}: usage {have} bytes, blocks add up to {want}"),
                });
            }
        }
        if stored_total != stored_bytes {
            report.problems.push(Problem {
                kind: "stored_bytes".into(),
                detail: format!(
                    "pool accounts {stored_bytes} stored bytes, its blocks add up to {stored_total}"
                ),
            });
        }
        // Verify each stored payload once (a compressed group holds several blocks), in disk
        // order, reading runs of adjacent payloads together.
        let mut ids: Vec<u64> = (1..blocks.len() as u64)
            .filter(|&id| refs.live(id))
            .collect();
        ids.sort_by_key(|&id| (blocks[id as usize].segment, blocks[id as usize].offset));
        let total = ids.len() as u64;
        let align = IO_ALIGN as u32;
        let mut i = 0;
        while i < ids.len() {
            let first = blocks[ids[i] as usize];
            let base = first.offset & !(align - 1);
            let mut end = (first.offset + u32::from(first.stored_len)).next_multiple_of(align);
            let mut j = i + 1;
            while j < ids.len() && j - i < 4096 {
                let b = blocks[ids[j] as usize];
                let b_end = (b.offset + u32::from(b.stored_len)).next_multiple_of(align);
                if b.segment != first.segment
                    || b.offset & !(align - 1) > end
                    || b_end - base > 4 << 20
                {
                    break;
                }
                end = end.max(b_end);
                j += 1;
            }
            let at = Range {
                segment: first.segment,
                offset: u64::from(base),
            };
            let read = store::read_now(
                &*inner.ctx.store,
                inner.ctx.epoch,
                at,
                (end - base) as usize,
            )
            .map(bytes::Bytes::from_owner);
            let all = read.as_ref().cloned().unwrap_or_default();
            let mut k = i;
            while k < j {
                let b = blocks[ids[k] as usize];
                // The blocks sharing this payload.
                let mut m = k + 1;
                while m < j && blocks[ids[m] as usize].offset == b.offset {
                    m += 1;
                }
                let fault: Option<(&str, String)> = match &read {
                    Err(e) => Some(("io", format!("read failed: {e}"))),
                    Ok(_) => decode_entry(&all, (b.offset - base) as usize, &b)
                        .err()
                        .map(|f| {
                            let kind = match f {
                                PayloadFault::Checksum { .. } => "checksum",
                                PayloadFault::Undecodable { .. } => "decode",
                                PayloadFault::Read(_) => "io",
                            };
                            (kind, f.error(ids[k]).to_string())
                        }),
                };
                for &id in &ids[k..m] {
                    if let Some((kind, f)) = &fault {
                        let who = owner
                            .get(&id)
                            .map(|(v, lba)| {
                                format!("volume {v} block {lba} (byte {})", lba * BLOCK_BYTES)
                            })
                            .unwrap_or_default();
                        report.problems.push(Problem {
                            kind: (*kind).into(),
                            detail: format!(
                                "{who}: block id {id} at segment {} offset {}: {f}",
                                b.segment, b.offset
                            ),
                        });
                    }
                    report.blocks_checked += 1;
                }
                report.bytes_checked += u64::from(b.stored_len);
                k = m;
            }
            progress(report.blocks_checked, total);
            i = j;
        }
        progress(report.blocks_checked, total);
        report
    }
}
