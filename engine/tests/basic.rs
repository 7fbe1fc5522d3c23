//! Basic engine behaviour: write, read, trim, restart.

use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};

fn opts(io: IoKind) -> PoolOptions {
    PoolOptions {
        io,
        shards: 2,
        cache_bytes: Some(1 << 20),
        ..Default::default()
    }
}

fn create(dir: &std::path::Path, io: IoKind) -> Pool {
    // The io_uring run also covers prefilled backing files.
    let c = CreateOptions {
        size_bytes: 256 << 20,
        segment_bytes: 4 << 20,
        prefill: io == IoKind::Uring,
        ..Default::default()
    };
    Pool::create(dir, &c, &opts(io)).expect("create")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect()
}

fn roundtrip(io: IoKind) {
    let dir = tempfile::tempdir().unwrap();
    {
        let pool = create(dir.path(), io);
        pool.create_volume("v", 64 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        let a = pattern(1, 1 << 20);
        v.write(0, &a, false).unwrap();
        assert_eq!(v.read(0, 1 << 20).unwrap(), a);
        // Partial, unaligned-to-4k write.
        v.write(512, &[9u8; 1024], false).unwrap();
        let r = v.read(0, 4096).unwrap();
        assert_eq!(&r[512..1536], &[9u8; 1024][..]);
        assert_eq!(&r[..512], &a[..512]);
        assert_eq!(&r[1536..], &a[1536..4096]);
        v.trim(8192, 8192, false).unwrap();
        assert_eq!(v.read(8192, 8192).unwrap(), vec![0u8; 8192]);
        // Across the 2 MiB shard stripe.
        let b = pattern(3, 3 << 20);
        v.write(1 << 20, &b, true).unwrap();
        assert_eq!(v.read(1 << 20, 3 << 20).unwrap(), b);
        v.flush().unwrap();
        let report = pool.check(&mut |_, _| {});
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        pool.shutdown().unwrap();
    }
    let pool = Pool::open(dir.path(), &opts(io)).unwrap();
    let v = pool.volume("v").unwrap();
    let r = v.read(0, 4096).unwrap();
    assert_eq!(&r[512..1536], &[9u8; 1024][..]);
    assert_eq!(v.read(8192, 8192).unwrap(), vec![0u8; 8192]);
    assert_eq!(v.read(1 << 20, 3 << 20).unwrap(), pattern(3, 3 << 20));
    // Crash (no checkpoint): flushed data must survive replay.
    let c = pattern(5, 256 << 10);
    v.write(10 << 20, &c, false).unwrap();
    v.flush().unwrap();
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts(io)).unwrap();
    let v = pool.volume("v").unwrap();
    assert_eq!(v.read(10 << 20, 256 << 10).unwrap(), c);
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn roundtrip_sync() {
    roundtrip(IoKind::Sync);
}

#[test]
fn roundtrip_uring() {
    roundtrip(IoKind::Uring);
}

#[test]
fn trim_of_several_gib_in_one_request_survives_replay() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), IoKind::Sync);
    pool.create_volume("big", 5 << 30).unwrap();
    let v = pool.volume("big").unwrap();
    // A few blocks in each GiB, then one trim of everything but the last GiB (several trim
    // records), a crash, and replay.
    for g in 0..5u64 {
        v.write(g << 30, &pattern(g as u8 + 1, 8192), false)
            .unwrap();
    }
    v.trim(0, 4 << 30, false).unwrap();
    v.flush().unwrap();
    for g in 0..4u64 {
        assert_eq!(v.read(g << 30, 8192).unwrap(), vec![0u8; 8192], "GiB {g}");
    }
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts(IoKind::Sync)).unwrap();
    let v = pool.volume("big").unwrap();
    for g in 0..4u64 {
        assert_eq!(v.read(g << 30, 8192).unwrap(), vec![0u8; 8192], "GiB {g}");
    }
    assert_eq!(v.read(4 << 30, 8192).unwrap(), pattern(5, 8192));
    assert_eq!(pool.stats().logical_mapped_bytes, 8192);
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Reads served from the block cache on the caller's thread (no shard hand-off) race with
/// overwrites, trims, checkpoints (after which freed block ids are reused) and the cleaner: every
/// read must return a version of the block it asked for, never another block's data, and a read
/// after a write completed must see that write or a later one.
#[test]
fn cached_reads_racing_overwrites_and_id_reuse_return_their_own_block() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const BLOCKS: u64 = 64;
    // The blocks straddle a 2 MiB map page, so they belong to both shards.
    const BASE: u64 = 512 - BLOCKS / 2;
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: 64 << 20,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    let o = PoolOptions {
        io: IoKind::Sync,
        cache_bytes: Some(64 << 20),
        ..Default::default()
    };
    let pool = Arc::new(Pool::create(dir.path(), &c, &o).unwrap());
    pool.create_volume("v", (BASE + BLOCKS) * 4096).unwrap();
    let v = pool.volume("v").unwrap();
    // Block `lba` at version `n`: the lba and n, then bytes derived from both.
    let block = |lba: u64, n: u64| -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..8].copy_from_slice(&lba.to_le_bytes());
        b[8..16].copy_from_slice(&n.to_le_bytes());
        for (i, x) in b[16..].iter_mut().enumerate() {
            *x = (lba as usize * 31 + n as usize * 7 + i) as u8 | 1;
        }
        b
    };
    // The newest version whose write completed, per block.
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    for lba in 0..BLOCKS {
        v.write((BASE + lba) * 4096, &block(lba, 1), false).unwrap();
        done[lba as usize].store(1, Ordering::Release);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..2u64 {
        let (v, done, stop) = (v.clone(), done.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut lba = r;
            while !stop.load(Ordering::Acquire) {
                lba = (lba * 13 + 7) % BLOCKS;
                // Block `lba`'s bytes `range` as read in `d`: a hole (all zeroes, which no
                // written block is; only even blocks are trimmed), or its own data at a version
                // no older than `floor`, the newest whose write completed before the read.
                let check = |lba: u64, floor: u64, d: &[u8], range: std::ops::Range<usize>| {
                    if d.iter().all(|&x| x == 0) {
                        assert_eq!(lba % 2, 0, "lba {lba} was never trimmed but reads zeroes");
                        return;
                    }
                    if range.start == 0 {
                        let got = u64::from_le_bytes(d[..8].try_into().unwrap());
                        assert_eq!(got, lba, "read of lba {lba} returned lba {got}'s data");
                        let n = u64::from_le_bytes(d[8..16].try_into().unwrap());
                        assert!(
                            n >= floor,
                            "lba {lba}: version {n} older than completed {floor}"
                        );
                        assert_eq!(d, &block(lba, n)[range], "lba {lba} v{n}");
                    } else {
                        // No header in the piece: some version since `floor` has these bytes.
                        assert!(
                            (floor.max(1)..400).any(|n| block(lba, n)[range.clone()] == *d),
                            "lba {lba}: bytes {range:?} of no version since {floor}"
                        );
                    }
                };
                let floor = done[lba as usize].load(Ordering::Acquire);
                match reads % 3 {
                    // The whole block, and 512 bytes of its head (a slice of the block).
                    0 | 1 => {
                        let len = if reads % 3 == 0 { 4096 } else { 512 };
                        let d = v.read((BASE + lba) * 4096, len).unwrap();
                        check(lba, floor, &d, 0..len as usize);
                    }
                    // 8 KiB from the middle of this block into the middle of the next one (as
                    // 4 KiB reads at 512-byte offsets are over iSCSI): the cached read is
                    // assembled from both blocks.
                    _ if lba + 2 < BLOCKS => {
                        let floor2 = done[lba as usize + 1].load(Ordering::Acquire);
                        let floor3 = done[lba as usize + 2].load(Ordering::Acquire);
                        let d = v.read((BASE + lba) * 4096 + 2048, 8192).unwrap();
                        check(lba, floor, &d[..2048], 2048..4096);
                        check(lba + 1, floor2, &d[2048..6144], 0..4096);
                        check(lba + 2, floor3, &d[6144..], 0..2048);
                    }
                    _ => {}
                }
                reads += 1;
            }
            reads
        }));
    }
    for n in 2..400u64 {
        for lba in (n % 3..BLOCKS).step_by(3) {
            if n % 50 == 0 && lba % 2 == 0 {
                v.trim((BASE + lba) * 4096, 4096, false).unwrap();
                // A trimmed block reads as zeroes: version 0 satisfies any floor.
                done[lba as usize].store(0, Ordering::Release);
                continue;
            }
            v.write((BASE + lba) * 4096, &block(lba, n), false).unwrap();
            done[lba as usize].store(n, Ordering::Release);
        }
        if n % 40 == 0 {
            pool.checkpoint().unwrap();
        }
        if n % 100 == 0 {
            pool.gc(0.9, &mut |_, _| {}).unwrap();
        }
    }
    stop.store(true, Ordering::Release);
    let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(reads > 1000, "only {reads} reads raced the writes");
    assert!(pool.stats().cache_hits > 0);
}

/// Writes to one block that arrive together are stored once per record: the earlier ones are
/// absorbed by the later (and still acknowledged), the block reads back as the last write, and
/// the client bytes still count every write.
#[test]
fn writes_to_one_block_in_flight_together_are_stored_once_and_the_last_wins() {
    use ingot_engine::{Reply, Request};
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), IoKind::Sync);
    pool.create_volume("v", 16 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let before = pool.stats();
    const N: u8 = 200;
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..N {
        let tx = tx.clone();
        v.submit(
            Request::Write {
                offset: 8192,
                data: bytes::Bytes::from(pattern(i, 4096)),
                fua: false,
            },
            Box::new(move |r| tx.send(r.map(|r| matches!(r, Reply::Done))).unwrap()),
        );
    }
    for _ in 0..N {
        assert!(rx.recv().unwrap().unwrap(), "every write is acknowledged");
    }
    assert_eq!(v.read(8192, 4096).unwrap(), pattern(N - 1, 4096));
    let after = pool.stats();
    let client = after.client_written_bytes - before.client_written_bytes;
    let device = after.device_written_bytes - before.device_written_bytes;
    assert_eq!(client, u64::from(N) * 4096);
    assert!(
        device < client / 4,
        "{device} device bytes for {client} client bytes: the writes were not absorbed"
    );
    // And after a restart (replay of the records), still the last write.
    drop(v);
    drop(pool);
    let pool = Pool::open(dir.path(), &opts(IoKind::Sync)).unwrap();
    let v = pool.volume("v").unwrap();
    assert_eq!(v.read(8192, 4096).unwrap(), pattern(N - 1, 4096));
}

/// Reads through `submit_pieces` return the same bytes as plain reads, in pieces when several
/// cached blocks and holes make them up.
#[test]
fn reads_in_pieces_match_plain_reads() {
    use ingot_engine::{Reply, Request};
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), IoKind::Sync);
    pool.create_volume("v", 64 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    // Data across the 2 MiB shard stripe, a hole inside it, an unwritten tail.
    let a = pattern(5, 3 << 20);
    v.write(1 << 20, &a, false).unwrap();
    v.trim((2 << 20) + 8192, 16384, false).unwrap();
    v.write(512, &[7u8; 1024], false).unwrap();
    let mut saw_pieces = false;
    for (offset, len) in [
        (0u64, 8192u32),
        (512, 4096),
        ((1 << 20) - 4096, 1 << 20),
        ((2 << 20) - 512, 64 << 10),
        ((4 << 20) - 8192, 1 << 20),
    ] {
        let (tx, rx) = crossbeam_channel::bounded(1);
        v.submit_pieces(
            Request::Read { offset, len },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let got = match rx.recv().unwrap().unwrap() {
            Reply::Data(d) => d.to_vec(),
            Reply::Pieces(p) => {
                saw_pieces = true;
                p.concat()
            }
            Reply::Done => panic!("a read completed without data"),
        };
        assert_eq!(
            got,
            v.read(offset, len).unwrap(),
            "read of {len} at {offset}"
        );
    }
    assert!(saw_pieces);
    pool.shutdown().unwrap();
}

/// `stats().latency` counts each request once, with its stages inside its total: reads whose
/// blocks are not cached go to the device once each, writes through records, flushes sync.
#[test]
fn latency_stages_count_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let o = PoolOptions {
        io: IoKind::Uring,
        shards: 2,
        cache_bytes: Some(0),
        ..Default::default()
    };
    let c = CreateOptions {
        size_bytes: 256 << 20,
        segment_bytes: 4 << 20,
        ..Default::default()
    };
    let pool = Pool::create(dir.path(), &c, &o).expect("create");
    pool.create_volume("v", 64 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let before = pool.stats().latency;
    for i in 0..20u64 {
        v.write(i * 4096 * 300, &pattern(i as u8 + 1, 4096), false)
            .unwrap();
    }
    v.flush().unwrap();
    for i in 0..20u64 {
        assert_eq!(
            v.read(i * 4096 * 300, 4096).unwrap(),
            pattern(i as u8 + 1, 4096)
        );
    }
    let l = pool.stats().latency;
    let (r, w, f) = (
        l.reads.since(&before.reads),
        l.writes.since(&before.writes),
        l.flushes.since(&before.flushes),
    );
    assert_eq!((r.done, r.picked, r.device), (20, 20, 20), "{r:?}");
    assert_eq!((w.done, w.picked), (20, 20), "{w:?}");
    assert!(w.device >= 1, "{w:?}");
    assert_eq!((f.done, f.device), (1, 1), "{f:?}");
    for t in [r, w] {
        assert!(t.queued_ns > 0 && t.device_ns > 0, "{t:?}");
        assert!(t.queued_ns < t.total_ns, "{t:?}");
    }
    // Reads queued at the device for less time than the requests took in all.
    assert!(r.device_ns < r.total_ns, "{r:?}");
    pool.shutdown().unwrap();
}
