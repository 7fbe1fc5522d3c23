//! A victim's blocks from its own records (docs/design/paged-metadata.md §8.4), instead of a
//! scan of the whole block table: the cleaner's cost follows the victims, not the pool, and no
//! longer needs every block-table entry in RAM.
//!
//! The walk steps from record to record by each header's `record_bytes`, from the first record
//! after the segment header, and takes a header only if its MAC verifies under the pool's key,
//! the nonce of the segment's current use and the record's offset (as replay does). It ends at
//! the first header that does not verify: the end of the records, a torn write, or damage.
//! What it finds is a list of candidates, never trusted on its own: a block is live in the
//! victim only if the block table still places it at that very offset and it has references.
//! A walk that ends early finds fewer live bytes than the segment's usage counts: the cleaner
//! then scans the block table for that victim, as it used to for all of them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Cleaner, SCAN_SLICE_IDS, VICTIM_READS};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::{
    DataEntry, RecordHeader, RecordKind, RecordSeal, SegmentHeader, SegmentKind, FLAG_REF,
    FORMAT_VERSION, IO_ALIGN, SEGMENT_HEADER_BYTES,
};
use crate::space::BlockEntry;
use crate::store::{self, Range};

/// Largest header area of a record (header and 256 data entries).
const MAX_HEADER_AREA: usize = 4 * IO_ALIGN;

/// A read of the walk when records are small: several records' headers (and payloads) at
/// once, rather than a read per record.
const WALK_WINDOW: usize = 256 << 10;

/// After a record this large or larger, the next is read a header page at a time (most
/// header areas are one page).
const LARGE_RECORD: u64 = 32 << 10;

/// A segment's blocks as its records name them: (block id, payload offset in the segment).
pub(crate) type Stored = Vec<(u64, u32)>;

/// Payload-carrying blocks written to `seg` by its records: (block id, payload offset in the
/// segment), in log order, and the bytes read to find them. `None` when the segment's header
/// does not verify as a data segment of this pool (one written before the pool had a key, or
/// damaged): the caller scans the block table instead.
pub(crate) fn stored_blocks(ctx: &Context, seg: u32) -> Result<(Option<Stored>, u64)> {
    let seg_bytes = ctx.geo.segment_bytes;
    let read = |at: u64, len: usize| {
        let r = Range {
            segment: seg,
            offset: at,
        };
        store::read_now(&*ctx.store, ctx.epoch, r, len)
    };
    let first = read(0, SEGMENT_HEADER_BYTES as usize)?;
    let mut bytes_read = first.len() as u64;
    let Some(sh) = SegmentHeader::decode_authentic(&first, Some(&ctx.log_key)).filter(|h| {
        h.kind == SegmentKind::Data && h.segment == seg && h.pool_uuid == ctx.pool_uuid
    }) else {
        return Ok((None, bytes_read));
    };
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_BYTES;
    // The window read last: its start and bytes.
    let mut win_at = 0u64;
    let mut win = first;
    let mut last_len = 0u64;
    while off + IO_ALIGN as u64 <= seg_bytes {
        let have = (win_at + win.len() as u64).saturating_sub(off);
        if off < win_at || have < IO_ALIGN as u64 {
            let want = if last_len >= LARGE_RECORD {
                IO_ALIGN
            } else {
                WALK_WINDOW
            };
            let len = (want as u64).min(seg_bytes - off) as usize;
            win = read(off, len)?;
            bytes_read += len as u64;
            win_at = off;
        }
        let Some(h) = RecordHeader::decode(&win[(off - win_at) as usize..]).filter(|h| {
            u32::from(h.version) == FORMAT_VERSION
                && h.segment == seg
                && h.header_bytes as usize <= MAX_HEADER_AREA
                && h.header_bytes as usize % IO_ALIGN == 0
                && h.record_bytes >= h.header_bytes
                && h.record_bytes as usize >= IO_ALIGN
                && h.record_bytes as usize % IO_ALIGN == 0
                && off + u64::from(h.record_bytes) <= seg_bytes
        }) else {
            break;
        };
        // A header area longer than what the window holds (many entries) is read whole.
        if (win_at + win.len() as u64) < off + u64::from(h.header_bytes) {
            win = read(off, h.header_bytes as usize)?;
            bytes_read += u64::from(h.header_bytes);
            win_at = off;
        }
        let buf = &win[(off - win_at) as usize..];
        let seal = RecordSeal {
            key: &ctx.log_key,
            nonce: sh.nonce,
            offset: off as u32,
        };
        if !h.verify(&buf[..h.header_bytes as usize], Some(&seal)) {
            break;
        }
        if matches!(h.kind, RecordKind::Data | RecordKind::Move) {
            let eb = h.entry_bytes();
            for i in 0..h.entry_count as usize {
                let at = h.entries_at() + i * eb;
                let e = DataEntry::decode(&buf[at..at + eb])?;
                // Dedup references carry no payload: the block lives where it was written.
                if e.block_id != 0 && e.flags & FLAG_REF == 0 {
                    out.push((e.block_id, (off as u32).wrapping_add(e.payload_offset)));
                }
            }
        }
        last_len = u64::from(h.record_bytes);
        off += last_len;
    }
    Ok((Some(out), bytes_read))
}

/// Each victim's live blocks, how many victims needed the table scanned, and the longest hold
/// of the space lock that took.
pub(crate) type VictimsBlocks = (Vec<Vec<(u64, BlockEntry)>>, usize, Duration);

impl Cleaner {
    /// The live blocks of each victim, and how many victims needed the block table scanned,
    /// with the longest hold of the space lock that took.
    ///
    /// Each victim's own records name its candidates (walked `VICTIM_READS` victims at a
    /// time, each on a thread, as gathers are); a candidate is live if the table still places
    /// it there and it has references. A victim whose walk failed, or found other than its
    /// usage in live bytes, is looked for in the block table instead: in a copy of the table
    /// (a pointer per leaf) walked without the space lock, its candidates' counts checked
    /// under the lock a slice at a time (a whole scan under it held every shard's records up
    /// for 13 ms over 2 M ids); an evicted leaf that does not read back fails the pass (the
    /// victims keep their blocks and are not freed). What changes meanwhile is what could
    /// change after a single scan: a block that leaves a victim (an overwrite, a trim) is
    /// skipped by `Space::relocate` when its move applies; one that still lands in a victim (a
    /// record in flight when its segment was sealed) may be missed, and the victim, whose
    /// usage is then not zero, is not freed but cleaned again later. Ids past `scan_end` are
    /// newer. Candidates whose table leaf is evicted are read back under the space lock (as
    /// every miss is until misses move off the shards, design milestone 15).
    pub(crate) fn victims_blocks(&self, victims: &[u32], scan_end: usize) -> Result<VictimsBlocks> {
        let mut moves: Vec<Vec<(u64, BlockEntry)>> = vec![Vec::new(); victims.len()];
        let mut walked = Vec::with_capacity(victims.len());
        for group in victims.chunks(VICTIM_READS) {
            std::thread::scope(|sc| {
                let hs: Vec<_> = group
                    .iter()
                    .map(|&v| sc.spawn(move || stored_blocks(&self.ctx, v)))
                    .collect();
                walked.extend(
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or(Err(Error::ShutDown))),
                );
            });
        }
        let mut scan = vec![false; victims.len()];
        let mut read = 0u64;
        for (i, w) in walked.into_iter().enumerate() {
            let seg = victims[i];
            let mut cands = match w {
                Ok((Some(c), n)) => {
                    read += n;
                    c
                }
                Ok((None, n)) => {
                    read += n;
                    scan[i] = true;
                    continue;
                }
                Err(e) => {
                    // The gather reads the same segment and reports what fails.
                    tracing::debug!(target: "ingot_engine::gc", seg, error = %e, "victim walk failed");
                    scan[i] = true;
                    continue;
                }
            };
            cands.sort_unstable();
            cands.dedup();
            let mut space = self.ctx.space.lock();
            let mut live = 0u64;
            for (id, off) in cands {
                // Leaves evicted are read back here, on the cleaner's thread (a failure sends
                // the victim to the scan, which reports it).
                if let Ok(Some(e)) = space.get(id) {
                    if e.segment == seg && e.offset == off {
                        live += e.share();
                        moves[i].push((id, e));
                    }
                }
            }
            // The live bytes found are a checked subset of the victim's: equal to its usage,
            // nothing was missed. Anything else (a walk that ended early; a usage count that
            // is off) goes to the scan, which does not depend on the count.
            if live != space.seg_live[seg as usize] {
                if live > space.seg_live[seg as usize] {
                    tracing::warn!(target: "ingot_engine::gc", seg, live, usage = space.seg_live[seg as usize], "a victim's blocks add up to more than its usage");
                }
                scan[i] = true;
                moves[i].clear();
            }
        }
        self.ctx.counters.gc_read.fetch_add(read, Ordering::Relaxed);
        let scanned = scan.iter().filter(|&&s| s).count();
        self.ctx
            .counters
            .gc_table_scans
            .fetch_add(scanned as u64, Ordering::Relaxed);
        let mut longest_hold = Duration::ZERO;
        if scanned == 0 {
            return Ok((moves, 0, longest_hold));
        }
        // Segment -> victim index, so the scan is one lookup per block.
        let mut victim_of = vec![u32::MAX; self.ctx.geo.total_segments as usize];
        for (i, &v) in victims.iter().enumerate() {
            if scan[i] {
                victim_of[v as usize] = i as u32;
            }
        }
        // A copy of the table (a pointer per leaf) taken under the space lock, walked without
        // it: evicted leaves are read back meanwhile, not with every shard waiting. What
        // changes meanwhile is what could change during a scan in slices (see above).
        let held = std::time::Instant::now();
        let table = self.ctx.space.lock().blocks.clone();
        longest_hold = held.elapsed();
        let mut found: Vec<(u32, u64, BlockEntry)> = Vec::new();
        table.for_each_in(0..scan_end, &mut |id, e| {
            if let Some(&i) = victim_of
                .get(e.segment as usize)
                .filter(|&&i| i != u32::MAX)
            {
                found.push((i, id as u64, *e));
            }
        })?;
        drop(table);
        for chunk in found.chunks(SCAN_SLICE_IDS) {
            let space = self.ctx.space.lock();
            let held = std::time::Instant::now();
            for &(i, id, e) in chunk {
                if space.refs.live(id) {
                    moves[i as usize].push((id, e));
                }
            }
            drop(space);
            longest_hold = longest_hold.max(held.elapsed());
        }
        Ok((moves, scanned, longest_hold))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use crate::api::BLOCK_BYTES;
    use crate::format::{RecordHeader, SEGMENT_HEADER_BYTES};
    use crate::pool::{CreateOptions, Pool, PoolOptions};
    use crate::space::SegState;

    /// Block `lba` at version `n`: unique and incompressible when `n` is odd, else compressible
    /// (and the same for every fourth lba: duplicates, stored as dedup references).
    fn block(lba: u64, n: u64) -> Vec<u8> {
        if n % 2 == 0 {
            let mut b = vec![(lba % 4) as u8; BLOCK_BYTES as usize];
            if lba % 4 != 0 {
                b[..8].copy_from_slice(&(lba * 1000 + n).to_le_bytes());
            }
            return b;
        }
        (0..BLOCK_BYTES / 8)
            .flat_map(|i| {
                let key = [lba, n, i].map(u64::to_le_bytes).concat();
                xxhash_rust::xxh3::xxh3_64(&key).to_le_bytes()
            })
            .collect()
    }

    const BLOCKS: u64 = 2048;

    fn setup(dir: &std::path::Path) -> (Pool, Vec<u64>) {
        let o = PoolOptions {
            shards: 2,
            ..Default::default()
        };
        let c = CreateOptions {
            size_bytes: 96 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        let pool = Pool::create(dir, &c, &o).unwrap();
        pool.create_volume("v", BLOCKS * BLOCK_BYTES).unwrap();
        let v = pool.volume("v").unwrap();
        let mut version = vec![1u64; BLOCKS as usize];
        for lba in 0..BLOCKS {
            v.write(lba * BLOCK_BYTES, &block(lba, 1), false).unwrap();
        }
        // Half the blocks overwritten with compressible and duplicate data (groups and
        // references in the log), a run at a time (records of several blocks).
        for lba in (0..BLOCKS).filter(|l| l % 4 < 2) {
            version[lba as usize] = 2;
            v.write(lba * BLOCK_BYTES, &block(lba, 2), false).unwrap();
        }
        let run = vec![0u8; 16 * BLOCK_BYTES as usize];
        for first in (0..BLOCKS).step_by(64) {
            let data: Vec<u8> = (first..first + 16).flat_map(|l| block(l, 3)).collect();
            assert_eq!(data.len(), run.len());
            v.write(first * BLOCK_BYTES, &data, false).unwrap();
            for l in first..first + 16 {
                version[l as usize] = 3;
            }
        }
        v.flush().unwrap();
        (pool, version)
    }

    fn check(pool: &Pool, version: &[u64]) {
        let v = pool.volume("v").unwrap();
        for lba in 0..BLOCKS {
            let got = v.read(lba * BLOCK_BYTES, BLOCK_BYTES as u32).unwrap();
            assert!(
                got == block(lba, version[lba as usize]),
                "block {lba} reads wrong"
            );
        }
        let report = pool.check(&mut |_, _| {});
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    /// Victims' live blocks come from their own records (data, groups, references, and the
    /// cleaner's moves on a second pass), with no scan of the block table.
    #[test]
    fn victims_are_found_from_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, mut version) = setup(dir.path());
        let r = pool.gc(0.99, &mut |_, _| {}).unwrap();
        assert!(r.bytes_moved > 0 && r.segments_freed > 0, "{r:?}");
        check(&pool, &version);
        // Blocks the first pass moved die in part: the second pass cleans the mover's
        // segments too.
        let v = pool.volume("v").unwrap();
        for lba in (0..BLOCKS).filter(|l| l % 4 == 3) {
            version[lba as usize] = 5;
            v.write(lba * BLOCK_BYTES, &block(lba, 5), false).unwrap();
        }
        v.flush().unwrap();
        let r = pool.gc(0.99, &mut |_, _| {}).unwrap();
        assert!(r.bytes_moved > 0, "{r:?}");
        let s = pool.stats();
        assert_eq!(s.gc_table_scans, 0, "a victim needed the table: {s:?}");
        assert!(s.gc_bytes_read > 0, "no victim was walked: {s:?}");
        check(&pool, &version);
        pool.halt();
        drop(pool);
        let pool = Pool::open(dir.path(), &PoolOptions::default()).unwrap();
        check(&pool, &version);
    }

    /// A record header in a victim that does not verify ends the walk there: the blocks after
    /// it are found in the block table instead, and the victim is emptied all the same.
    #[test]
    fn a_damaged_record_header_sends_its_victim_to_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, version) = setup(dir.path());
        // Replay never reads the damaged record: the checkpoint covers it.
        pool.checkpoint().unwrap();
        let inner = &pool.inner;
        let seg = {
            let space = inner.ctx.space.lock();
            (0..space.seg_state.len())
                .find(|&s| {
                    matches!(space.seg_state[s], SegState::Sealed { .. })
                        && space.seg_live[s] > 0
                        && space.seg_live[s] < (1 << 20)
                })
                .expect("a half-dead sealed segment") as u32
        };
        let (_, start) = inner.ctx.geo.locate(seg);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("dev0.img"))
            .unwrap();
        // The third record's header: its MAC no longer verifies.
        let mut off = SEGMENT_HEADER_BYTES;
        for _ in 0..2 {
            let mut head = [0u8; 4096];
            f.read_exact_at(&mut head, start + off).unwrap();
            off += u64::from(RecordHeader::decode(&head).expect("a record").record_bytes);
        }
        let pos = start + off + 70;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, pos).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], pos).unwrap();
        pool.gc(0.99, &mut |_, _| {}).unwrap();
        let s = pool.stats();
        assert!(s.gc_table_scans >= 1, "the walk did not stop: {s:?}");
        assert_eq!(inner.ctx.space.lock().seg_live[seg as usize], 0);
        check(&pool, &version);
        pool.shutdown().unwrap();
        drop(pool);
        let pool = Pool::open(dir.path(), &PoolOptions::default()).unwrap();
        check(&pool, &version);
    }
}
