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
