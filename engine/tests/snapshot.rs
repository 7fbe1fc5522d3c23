//! Snapshots and clones: a snapshot keeps the volume as it was, shares its blocks (no copy, no
//! extra space), refuses writes, survives restarts and crashes, and outlives its source.

use ingot_engine::{CreateOptions, Error, ErrorKind, IoKind, Pool, PoolOptions};

const BLOCK: usize = 4096;

fn opts() -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        shards: 2,
        cache_bytes: Some(0),
        ..Default::default()
    }
}

/// Distinct, incompressible blocks (so sharing, not dedup or compression, is what is measured).
fn blocks(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n * BLOCK);
    while out.len() < n * BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn assert_clean(pool: &Pool) {
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

fn read(pool: &Pool, vol: &str, block: u64, n: usize) -> Vec<u8> {
    pool.volume(vol)
        .unwrap()
        .read(block * BLOCK as u64, (n * BLOCK) as u32)
        .unwrap()
}

#[test]
fn snapshots_and_clones_share_blocks_and_keep_their_contents() {
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: 128 << 20,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    let a = blocks(1, 64);
    let b = blocks(2, 10);
    let new = blocks(3, 32);
    let d = blocks(4, 4);
    {
        let pool = Pool::create(dir.path(), &c, &opts()).unwrap();
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        v.write(100 * BLOCK as u64, &b, false).unwrap();
        let stored = pool.stats().stored_bytes;

        pool.snapshot_volume("v", "s1").unwrap();
        pool.clone_volume("v", "c0").unwrap();
        // Nothing copied.
        assert_eq!(pool.stats().stored_bytes, stored);
        let list = pool.volumes();
        let info = |n: &str| list.iter().find(|i| i.name == n).unwrap().clone();
        assert!(info("s1").read_only && !info("c0").read_only && !info("v").read_only);
        assert_eq!(info("s1").size_bytes, 16 << 20);
        assert_eq!(info("s1").mapped_bytes, 74 * BLOCK as u64);

        // The source changes; the snapshot and the clone do not.
        v.write(0, &new, false).unwrap();
        v.trim(100 * BLOCK as u64, 10 * BLOCK as u64, false)
            .unwrap();
        assert_eq!(read(&pool, "v", 0, 32), new);
        assert_eq!(read(&pool, "v", 100, 10), vec![0; 10 * BLOCK]);
        for s in ["s1", "c0"] {
            assert_eq!(read(&pool, s, 0, 64), a, "{s}");
            assert_eq!(read(&pool, s, 100, 10), b, "{s}");
        }

        // A snapshot refuses writes, zeroes and trims; reads go on.
        let s1 = pool.volume("s1").unwrap();
        assert!(s1.read_only());
        assert!(matches!(s1.write(0, &d, false), Err(Error::ReadOnly(_))));
        assert!(matches!(
            s1.write_zeroes(0, BLOCK as u64, false),
            Err(Error::ReadOnly(_))
        ));
        assert!(matches!(
            s1.trim(0, BLOCK as u64, false),
            Err(Error::ReadOnly(_))
        ));
        assert!(matches!(
            pool.resize_volume("s1", 32 << 20),
            Err(Error::ReadOnly(_))
        ));
        assert_eq!(Error::ReadOnly("s1".into()).kind(), ErrorKind::ReadOnly);

        // A clone of the snapshot is writable and independent of it.
        pool.clone_volume("s1", "c1").unwrap();
        pool.volume("c1").unwrap().write(0, &d, false).unwrap();
        assert_eq!(read(&pool, "c1", 0, 4), d);
        assert_eq!(read(&pool, "c1", 4, 60), a[4 * BLOCK..]);
        assert_eq!(read(&pool, "s1", 0, 64), a);
        assert!(matches!(
            pool.snapshot_volume("v", "s1"),
            Err(Error::VolumeExists(_))
        ));
        assert!(matches!(
            pool.clone_volume("nope", "x"),
            Err(Error::VolumeNotFound(_))
        ));
        assert_clean(&pool);
        // A crash right after: the snapshot was durable when the call returned.
        pool.snapshot_volume("c1", "s2").unwrap();
        pool.halt();
    }
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    assert!(pool.volume("s1").unwrap().read_only());
    assert!(pool.volume("s2").unwrap().read_only());
    assert!(!pool.volume("c1").unwrap().read_only());
    assert_eq!(read(&pool, "s1", 0, 64), a);
    assert_eq!(read(&pool, "s2", 0, 4), d);
    assert_eq!(read(&pool, "v", 0, 32), new);
    assert_clean(&pool);

    // A snapshot outlives its source; deleting everything frees everything.
    pool.delete_volume("v").unwrap();
    assert_eq!(read(&pool, "s1", 0, 64), a);
    assert_eq!(read(&pool, "s1", 100, 10), b);
    assert_clean(&pool);
    for n in ["s1", "c0", "c1", "s2"] {
        pool.delete_volume(n).unwrap();
    }
    pool.checkpoint().unwrap();
    assert_eq!(pool.stats().stored_bytes, 0);
    assert_clean(&pool);
}

/// Overwriting a volume whose blocks a snapshot shares frees nothing: on a full pool those
/// writes fail with ENOSPC at once (they are new data), the snapshot keeps its contents, and
/// deleting the snapshot makes room again.
#[test]
fn overwrites_of_snapshotted_blocks_count_as_new_data() {
    overwrites_count_as_new_data(256 << 10);
}

/// The same with each overwrite a whole map leaf (2 MiB) the snapshot still shares: no block
/// of it has a second reference (a block counts leaves, not volumes), the leaf has two users.
#[test]
fn whole_leaf_overwrites_of_a_snapshot_count_as_new_data() {
    overwrites_count_as_new_data(2 << 20);
}

fn overwrites_count_as_new_data(chunk: usize) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        let c = CreateOptions {
            size_bytes: 64 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        let pool = Pool::create(dir.path(), &c, &opts()).unwrap();
        let usable = pool.stats().usable_bytes;
        let size = (usable * 6 / 10) / (1 << 20) * (1 << 20);
        pool.create_volume("v", size).unwrap();
        let v = pool.volume("v").unwrap();
        for (i, off) in (0..size).step_by(chunk).enumerate() {
            v.write(off, &blocks(100 + i as u64, chunk / BLOCK), false)
                .unwrap();
        }
        pool.snapshot_volume("v", "s").unwrap();
        // Rewriting all of `v` would need 120% of the usable capacity.
        let t = std::time::Instant::now();
        let mut err = None;
        for (i, off) in (0..size).step_by(chunk).enumerate() {
            if let Err(e) = v.write(off, &blocks(900 + i as u64, chunk / BLOCK), false) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("overwrites past the usable capacity succeeded");
        assert!(matches!(err, Error::NoSpace), "{err:?}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "ENOSPC took {:?}",
            t.elapsed()
        );
        assert!(pool.stats().stored_bytes <= usable);
        let s = pool.volume("s").unwrap();
        for (i, off) in (0..size).step_by(chunk).enumerate() {
            assert!(
                s.read(off, chunk as u32).unwrap() == blocks(100 + i as u64, chunk / BLOCK),
                "snapshot chunk {i}"
            );
        }
        assert_clean(&pool);
        pool.delete_volume("s").unwrap();
        pool.checkpoint().unwrap();
        v.write(0, &blocks(5, chunk / BLOCK), false)
            .expect("a write after the snapshot is gone");
        assert_clean(&pool);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("hung");
}
