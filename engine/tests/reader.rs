//! Reads on the caller's own queue (`Reader`): the same data as the shards' reads, early
//! writes seen, corruption reported, and locations that stay valid while a read is in flight
//! (segments freed meanwhile are not written again under it).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ingot_engine::{
    CreateOptions, Error, FaultPlan, IoKind, Pool, PoolOptions, Reader, Reply, MAX_DIRECT_READ,
};

const BLOCK: usize = 4096;
const SEG: u64 = 2 << 20;

/// Block `lba` at version `n`: unique; every third version compresses (a run of one byte
/// with the version in front), the others do not.
fn block(lba: u64, n: u64) -> Vec<u8> {
    if (lba + n) % 3 == 0 {
        let mut b = vec![(lba % 251) as u8; BLOCK];
        b[..16].copy_from_slice(&[lba.to_le_bytes(), n.to_le_bytes()].concat());
        return b;
    }
    common::xorshift_block(lba << 20 | n)
}

fn blocks(first: u64, count: u64, n: u64) -> Vec<u8> {
    (first..first + count).flat_map(|l| block(l, n)).collect()
}

fn pool(dir: &std::path::Path, io: IoKind, cache: u64, plan: Option<Arc<FaultPlan>>) -> Pool {
    let o = PoolOptions {
        io,
        shards: 2,
        cache_bytes: Some(cache),
        // Writes acknowledged early, as `ingot serve` does by default.
        write_back_bytes: 8 << 20,
        fault: plan,
        ..Default::default()
    };
    let c = CreateOptions {
        size_bytes: 48 << 20,
        segment_bytes: SEG,
        ..Default::default()
    };
    let pool = Pool::create(dir, &c, &o).expect("create");
    pool.create_volume("v", 16 << 20).expect("volume");
    pool
}

/// A pool on engine `io` with `cache` bytes of cache and a fault plan of its own.
fn faulty(io: IoKind, cache: u64) -> (tempfile::TempDir, Arc<FaultPlan>, Pool) {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let pool = pool(dir.path(), io, cache, Some(plan.clone()));
    (dir, plan, pool)
}

use common::read_through as read;

#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: lengths {} and {}, first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

fn reads_match_the_shards(io: IoKind, cache: u64, pieces: bool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path(), io, cache, None);
    let v = pool.volume("v").unwrap();
    // Blocks 0..600 written (some compressible, stored in groups), 600..700 a hole, 700..800
    // written twice, the rest never written.
    v.write(0, &blocks(0, 600, 1), false).unwrap();
    v.write(700 * 4096, &blocks(700, 100, 1), false).unwrap();
    v.write(700 * 4096, &blocks(700, 100, 2), false).unwrap();
    v.flush().unwrap();
    let mut r = Reader::new(&v, 16).unwrap();
    if pieces {
        r = r.with_pieces();
    }
    let ranges: &[(u64, u32)] = &[
        (0, 4096),
        (5 * 4096 + 512, 4096),        // across two blocks
        (17 * 4096, 8192),             // a database page
        (100 * 4096 + 1024, 3072),     // inside one block
        (250 * 4096, 64 << 10),        // across a map page of 256 blocks (other shard)
        (590 * 4096, 48 << 10),        // data, then hole
        (650 * 4096, 4096),            // hole
        (690 * 4096, MAX_DIRECT_READ), // hole, then the rewritten blocks
        (1000 * 4096, 8192),           // never written
    ];
    for round in 0..2 {
        // The second round finds the blocks the first cached (when caching).
        for &(off, len) in ranges {
            let want = v.read(off, len).unwrap();
            let got = read(&mut r, off, len).unwrap();
            same(&got, &want, &format!("round {round}, {len} bytes at {off}"));
        }
    }
    assert_eq!(
        r.handed_off(),
        0,
        "every read above is served by the reader"
    );
    let long = read(&mut r, 0, MAX_DIRECT_READ + 4096).unwrap();
    same(
        &long,
        &v.read(0, MAX_DIRECT_READ + 4096).unwrap(),
        "long read",
    );
    assert_eq!(
        r.handed_off(),
        1,
        "a read past MAX_DIRECT_READ goes to the shards"
    );
    drop(r);
    pool.shutdown().unwrap();
}

#[test]
fn reads_match_the_shards_sync_no_cache() {
    reads_match_the_shards(IoKind::Sync, 0, false);
}

#[test]
fn reads_match_the_shards_uring_no_cache() {
    reads_match_the_shards(IoKind::Uring, 0, false);
}

#[test]
fn reads_match_the_shards_uring_cached() {
    reads_match_the_shards(IoKind::Uring, 16 << 20, false);
}

#[test]
fn reads_match_the_shards_in_pieces() {
    reads_match_the_shards(IoKind::Uring, 16 << 20, true);
}

/// Writes acknowledged early (write-back, the default) are read back at once, while they
/// may still be on their way to the map.
#[test]
fn a_reader_sees_writes_acknowledged_before_it() {
    let (_dir, plan, pool) = faulty(IoKind::Uring, 0);
    let v = pool.volume("v").unwrap();
    let mut r = Reader::new(&v, 16).unwrap();
    // The shards store writes late: the reads below find them acknowledged, not applied.
    plan.write_submit_delay_us.store(20_000, Ordering::SeqCst);
    for n in 1..=20u64 {
        let lba = (n * 37) % 512;
        let data = blocks(lba, 8, n);
        v.write(lba * 4096, &data, false).unwrap();
        let got = read(&mut r, lba * 4096, 8 * 4096).unwrap();
        same(&got, &data, &format!("version {n} at block {lba}"));
    }
    assert!(
        r.handed_off() > 0,
        "no read found its write still unapplied"
    );
}

/// A block whose bytes rot on the device fails its read with a checksum error naming it;
/// the blocks beside it still read.
#[test]
fn a_corrupt_block_fails_its_read() {
    let (dir, plan, pool) = faulty(IoKind::Sync, 0);
    let v = pool.volume("v").unwrap();
    let data = blocks(0, 8, 7);
    v.write(0, &data, false).unwrap();
    v.flush().unwrap();
    let file = std::fs::read(dir.path().join("dev0.img")).unwrap();
    let at = file
        .chunks_exact(BLOCK)
        .position(|b| b == &data[5 * BLOCK..6 * BLOCK])
        .expect("block 5 stored as is") as u64
        * BLOCK as u64;
    plan.corrupt_reads.lock().push((0, at + 100));
    let mut r = Reader::new(&v, 16).unwrap();
    match read(&mut r, 0, 8 * 4096) {
        Err(e @ Error::ChecksumMismatch { .. }) => {
            assert_eq!(e.kind(), ingot_engine::ErrorKind::Integrity)
        }
        other => panic!("a corrupt block read as {:?}", other.map(|d| d.len())),
    }
    same(
        &read(&mut r, 0, 5 * 4096).unwrap(),
        &data[..5 * BLOCK],
        "blocks before it",
    );
    plan.corrupt_reads.lock().clear();
    same(
        &read(&mut r, 0, 8 * 4096).unwrap(),
        &data,
        "after the fault is gone",
    );
}

/// A read looks its block's location up, then waits in the device queue (held back by the
/// fault plan) while the block is overwritten, its segment cleaned and freed, and new writes
/// fill the pool's free segments. The read must still return the block as it was when it was
/// looked up: the cleaner and checkpoints fence reads in flight before they free segments.
#[test]
fn a_read_in_flight_keeps_its_segment_from_reuse() {
    use std::os::unix::fs::FileExt;
    let (dir, plan, pool) = faulty(IoKind::Sync, 0);
    let pool = Arc::new(pool);
    let v = pool.volume("v").unwrap();
    let old = blocks(0, 512, 1);
    v.write(0, &old, false).unwrap();
    v.flush().unwrap();
    let want = &old[100 * BLOCK..101 * BLOCK];
    let file = std::fs::File::open(dir.path().join("dev0.img")).unwrap();
    let at = std::fs::read(dir.path().join("dev0.img"))
        .unwrap()
        .chunks_exact(BLOCK)
        .position(|b| b == want)
        .expect("block 100 stored") as u64
        * BLOCK as u64;
    plan.defer_reads_ms.store(1500, Ordering::SeqCst);
    let reader = {
        let v = v.clone();
        std::thread::spawn(move || {
            let mut r = Reader::new(&v, 16).unwrap();
            read(&mut r, 100 * 4096, 4096)
        })
    };
    // Let it look the block up and queue its read; later reads are not held back.
    std::thread::sleep(Duration::from_millis(100));
    plan.defer_reads_ms.store(0, Ordering::SeqCst);
    // Overwrite everything (the old segments then hold nothing live), clean, checkpoint,
    // until new records land where block 100 was.
    let mut reused = false;
    for n in 2..60 {
        v.write(0, &blocks(0, 512, n), false).unwrap();
        v.flush().unwrap();
        pool.gc(0.99, &mut |_, _| {}).unwrap();
        pool.checkpoint().unwrap();
        let mut now = vec![0u8; BLOCK];
        file.read_exact_at(&mut now, at).unwrap();
        if now != want {
            reused = true;
            break;
        }
    }
    assert!(reused, "the test never got block 100's place written again");
    let got = reader.join().unwrap().expect("the read in flight");
    same(&got, want, "block 100 as looked up");
}

/// Blocks of long writes go into the block cache only while it has free room: a bulk write
/// does not push out the small blocks a database reads back.
#[test]
fn long_writes_do_not_evict_cached_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // 64 blocks of cache per shard.
    let pool = pool(dir.path(), IoKind::Uring, 2 * 64 * 4096, None);
    let v = pool.volume("v").unwrap();
    // One shard's map page (512 blocks) holds blocks 0..512: 40 small writes fill most of its
    // cache.
    for lba in 0..40u64 {
        v.write(lba * 4096, &block(lba, 1), false).unwrap();
    }
    // A long write to the same shard's next page (blocks 1024..1280) fills the free room and
    // no more.
    v.write(1024 * 4096, &blocks(1024, 256, 1), false).unwrap();
    v.flush().unwrap();
    let before = pool.stats();
    for lba in 0..40u64 {
        same(
            &v.read(lba * 4096, 4096).unwrap(),
            &block(lba, 1),
            "small block",
        );
    }
    let after = pool.stats();
    assert_eq!(
        after.cache_hits - before.cache_hits,
        40,
        "small blocks evicted by a long write (misses: {})",
        after.cache_misses - before.cache_misses
    );
    // A small write evicts as before: the long write's cached blocks are not pinned.
    for lba in 40..140u64 {
        v.write(lba * 4096, &block(lba, 1), false).unwrap();
    }
    v.flush().unwrap();
    assert!(pool.stats().cache_bytes <= 2 * 64 * 4096);
}

/// On a volume with QoS limits a read may sleep before it is admitted: the reader first
/// finishes its reads in flight (the cleaner and checkpoints wait for them) and hands the
/// throttled reads to the shards. The limit is set by another thread (its checkpoint fences
/// this reader's reads, which this thread keeps reaping) while reads are in flight here.
#[test]
fn throttled_reads_go_to_the_shards_with_nothing_held() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Arc::new(pool(dir.path(), IoKind::Uring, 0, None));
    let v = pool.volume("v").unwrap();
    v.write(0, &blocks(0, 64, 1), false).unwrap();
    v.flush().unwrap();
    let mut r = Reader::new(&v, 16).unwrap();
    let setter = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            pool.set_volume_qos(
                "v",
                &ingot_engine::QosChange {
                    iops_limit: Some(100_000),
                    ..Default::default()
                },
            )
        })
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut sent = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // Reads in flight when the read that found the limit was handed off.
    let mut held = None;
    while held.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the limit never applied"
        );
        while r.in_flight() < 2 {
            let lba = sent % 64;
            let tx = tx.clone();
            r.read(
                lba * 4096,
                4096,
                Box::new(move |res| drop(tx.send((lba, res)))),
            );
            sent += 1;
            if r.handed_off() > 0 {
                held = Some(r.in_flight());
                break;
            }
        }
        r.poll();
    }
    assert_eq!(held, Some(0), "reads held across a throttled admission");
    setter.join().unwrap().unwrap();
    for _ in 0..sent {
        let (lba, res) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let Reply::Data(d) = res.unwrap() else {
            panic!("not data")
        };
        same(&d, &block(lba, 1), "read");
    }
}

/// Block `lba` at version `n`, saying which it is in its first 16 bytes.
fn tagged(lba: u64, n: u64) -> Vec<u8> {
    let mut b = common::xorshift_block(lba << 32 | n);
    b[..16].copy_from_slice(&[lba.to_le_bytes(), n.to_le_bytes()].concat());
    b
}

/// Block ids are reused as soon as a checkpoint covers their death, and the caches are keyed
/// by id. Reads racing overwrites and checkpoints (a few blocks overwritten over and over, so
/// the same ids come back all the time, in both shards' caches; caches too small for them, so
/// reads miss and fill them) must still get each block as some write left it, never older than
/// what the same reader saw before, and never another block's contents.
#[test]
fn reads_racing_id_reuse_never_see_another_block() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    // Blocks 0..24 of map page 0 (shard 0's) and of page 1 (shard 1's): an id freed from one
    // shard's cache comes back for a block of the other.
    const LBAS: u64 = 48;
    let lba_of = |i: u64| (i % 2) * 512 + i / 2;
    let dir = tempfile::tempdir().unwrap();
    // 16 blocks of cache per shard.
    let pool = Arc::new(pool(dir.path(), IoKind::Uring, 32 * BLOCK as u64, None));
    let v = pool.volume("v").unwrap();
    for i in 0..LBAS {
        let lba = lba_of(i);
        v.write(lba * BLOCK as u64, &tagged(lba, 0), false).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let check = |got: &[u8], first: u64, seen: &mut [u64]| {
        for (i, b) in got.chunks(BLOCK).enumerate() {
            let lba = first + i as u64;
            let at = u64::from_le_bytes(b[..8].try_into().unwrap());
            let n = u64::from_le_bytes(b[8..16].try_into().unwrap());
            assert_eq!(at, lba, "block {lba} read with block {at}'s contents");
            same(b, &tagged(lba, n), "a block as written");
            let last = &mut seen[lba as usize];
            assert!(n >= *last, "block {lba} went back from {last} to {n}");
            *last = n;
        }
    };
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (v, stop, reads) = (v.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut seen = vec![0u64; 1024];
                let mut own = Reader::new(&v, 8).unwrap();
                let mut x = 0x2545_f491_4f6c_dd1du64 + r;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // One or two blocks (one at the end of a page's written run), through the
                    // volume (cached on this thread, else the shards) or this thread's own
                    // queue.
                    let first = lba_of((x >> 8) % LBAS);
                    let count = if first % 512 == LBAS / 2 - 1 {
                        1
                    } else {
                        1 + x % 2
                    };
                    let len = (count * BLOCK as u64) as u32;
                    let got = if r == 0 {
                        v.read(first * BLOCK as u64, len).unwrap()
                    } else {
                        read(&mut own, first * BLOCK as u64, len).unwrap()
                    };
                    check(&got, first, &mut seen);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let checkpoints = Arc::new(AtomicU64::new(0));
    let checkpointer = {
        let (pool, stop, checkpoints) = (pool.clone(), stop.clone(), checkpoints.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                pool.checkpoint().unwrap();
                checkpoints.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut x = 88_172_645_463_325_252u64;
    let mut writes = 0u64;
    // Until enough has raced (rounds are fast: writes are acknowledged early).
    for n in 1.. {
        if reads.load(Ordering::Relaxed) >= 20_000 && checkpoints.load(Ordering::Relaxed) >= 300
            || n > 1_000_000
        {
            break;
        }
        for _ in 0..LBAS / 2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = lba_of(x % LBAS);
            v.write(lba * BLOCK as u64, &tagged(lba, n), false).unwrap();
            writes += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("a reader failed");
    }
    checkpointer.join().unwrap();
    assert!(
        reads.load(Ordering::Relaxed) >= 20_000 && checkpoints.load(Ordering::Relaxed) >= 300,
        "{checkpoints:?} checkpoints, {reads:?} reads"
    );
    // The ids did come back: without reuse there would be one per block written (the bound
    // is loose: ids held between two commits count, and a commit may be slow on a busy host).
    let ids = pool.block_ids();
    assert!(ids * 2 < writes, "{ids} ids for {writes} writes");
}
