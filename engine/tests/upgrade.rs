//! Pools written by earlier formats open, replay their log tail, and are upgraded in place,
//! all data as it was, and go on working across reopens: version 1 (records sealed by CRC
//! only, no log key) becomes version 2 (a key); version 2 (checkpoints as one blob) becomes
//! version 3 (checkpoints as metadata pages and a root) unless told not to
//! (`PoolOptions::paged_metadata: false`). The fixtures are described in
//! `tests/fixtures/README.md`.

use std::path::Path;
use std::process::Command;

use ingot_engine::{IoKind, Pool, PoolOptions};

const BLOCK: u64 = 4096;

/// The fixture's block contents (as its generator wrote them).
fn block(seed: u64) -> Vec<u8> {
    let s = if seed % 7 == 3 { 1 } else { seed };
    let mut x = s.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut b = vec![0u8; BLOCK as usize];
    if s % 10 != 1 {
        for (i, c) in b.iter_mut().enumerate() {
            *c = b"ingot fixture line "[(i + s as usize) % 19];
        }
        b[..8].copy_from_slice(&s.to_le_bytes());
    } else {
        for c in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    b
}

fn opts() -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        shards: 2,
        cache_bytes: Some(0),
        ..Default::default()
    }
}

fn unpack(into: &Path) -> std::path::PathBuf {
    unpack_fixture(into, "v1-pool.tar.gz")
}

fn unpack_fixture(into: &Path, name: &str) -> std::path::PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(into)
        .status()
        .expect("tar (Debian package tar) must be installed to unpack the fixture");
    assert!(st.success(), "unpacking {}", fixture.display());
    into.join("pool")
}

fn superblock_versions(dir: &Path) -> Vec<u32> {
    let dev = std::fs::read(dir.join("dev0.img")).unwrap();
    [0usize, 4096]
        .iter()
        .map(|&o| u32::from_le_bytes(dev[o + 8..o + 12].try_into().unwrap()))
        .collect()
}

fn check_contents(pool: &Pool) {
    let db = pool.volume("db").unwrap();
    for i in 0..300u64 {
        let want = if i < 100 {
            block(1000 + i)
        } else if i < 150 {
            vec![0; BLOCK as usize]
        } else {
            block(i)
        };
        assert!(
            db.read(i * BLOCK, BLOCK as u32).unwrap() == want,
            "db block {i}"
        );
    }
    let snap = pool.volume("db-snap").unwrap();
    for i in 0..300u64 {
        let want = if (100..150).contains(&i) {
            vec![0; BLOCK as usize]
        } else {
            block(i)
        };
        assert!(
            snap.read(i * BLOCK, BLOCK as u32).unwrap() == want,
            "snapshot block {i}"
        );
    }
    let logs = pool.volume("logs").unwrap();
    for i in 0..300u64 {
        let got = logs.read(i * BLOCK, BLOCK as u32).unwrap();
        if i < 200 {
            assert!(got == block(2000 + i), "flushed logs block {i}");
        } else {
            // Written after the last flush: there or not, never anything else.
            assert!(
                got == block(2000 + i) || got == vec![0; BLOCK as usize],
                "unflushed logs block {i}"
            );
        }
    }
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn a_version_1_pool_opens_and_is_upgraded_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unpack(tmp.path());
    assert_eq!(
        superblock_versions(&dir),
        vec![1, 1],
        "the fixture is version 1"
    );
    {
        let pool = Pool::open(&dir, &opts()).expect("open the version 1 pool");
        check_contents(&pool);
        // The recovery checkpoint wrote version 3 superblocks (both slots), and pool.json now
        // names the pool's UUID (so a foreign device is refused from now on).
        assert_eq!(superblock_versions(&dir), vec![3, 3]);
        let pf = std::fs::read_to_string(dir.join("pool.json")).unwrap();
        assert!(pf.contains("pool_uuid"), "{pf}");
        // New writes, a crash (halt) and a replay of version 2 records.
        let logs = pool.volume("logs").unwrap();
        for i in 300..400u64 {
            logs.write(i * BLOCK, &block(5000 + i), false).unwrap();
        }
        logs.flush().unwrap();
        pool.halt();
    }
    for _ in 0..2 {
        let pool = Pool::open(&dir, &opts()).expect("reopen the upgraded pool");
        check_contents(&pool);
        let logs = pool.volume("logs").unwrap();
        for i in 300..400u64 {
            assert!(logs.read(i * BLOCK, BLOCK as u32).unwrap() == block(5000 + i));
        }
    }
}

/// A version 2 pool (written by the engine of commit 3db0eb6, whose checkpoints are one blob)
/// opens with its data, snapshot and unflushed tail as written, and stays version 2 when told
/// to; else it is upgraded to version 3 by its recovery checkpoint (both superblock
/// slots), keeps its UUID, and after writes,
/// checkpoints that write only what changed, and a crash, reopens with everything. The
/// blob's segments are given back once neither slot names it.
#[test]
fn a_version_2_pool_opens_and_is_upgraded_to_paged_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unpack_fixture(tmp.path(), "v2-pool.tar.gz");
    assert_eq!(
        superblock_versions(&dir),
        vec![2, 2],
        "the fixture is version 2"
    );
    let key_at = |dir: &Path| {
        let dev = std::fs::read(dir.join("dev0.img")).unwrap();
        dev[..4096].to_vec()
    };
    let before = key_at(&dir);
    {
        // Told not to: it stays version 2.
        let keep = PoolOptions {
            paged_metadata: false,
            ..opts()
        };
        drop(Pool::open(&dir, &keep).expect("open the version 2 pool"));
        assert_eq!(superblock_versions(&dir), vec![2, 2]);
        let pool = Pool::open(&dir, &opts()).expect("open the version 2 pool to upgrade it");
        check_contents(&pool);
        assert_eq!(superblock_versions(&dir), vec![3, 3]);
        let free_after_upgrade = pool.stats().segments_free;
        let logs = pool.volume("logs").unwrap();
        for i in 300..400u64 {
            logs.write(i * BLOCK, &block(5000 + i), false).unwrap();
            if i % 25 == 0 {
                pool.checkpoint().unwrap();
            }
        }
        logs.flush().unwrap();
        pool.checkpoint().unwrap();
        pool.checkpoint().unwrap();
        // The blob's segments came back (two commits after the upgrade).
        assert!(
            pool.stats().segments_free + 2 >= free_after_upgrade,
            "{} segments free after the upgrade, {} later",
            free_after_upgrade,
            pool.stats().segments_free
        );
        let report = pool.check(&mut |_, _| {});
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        pool.halt();
    }
    // The same pool: the superblock keeps its UUID and key (a format change, not a new pool).
    let after = key_at(&dir);
    assert_eq!(before[16..32], after[16..32], "pool UUID changed");
    for _ in 0..2 {
        let pool = Pool::open(&dir, &opts()).expect("reopen the upgraded pool");
        assert_eq!(superblock_versions(&dir), vec![3, 3]);
        check_contents(&pool);
        let logs = pool.volume("logs").unwrap();
        for i in 300..400u64 {
            assert!(logs.read(i * BLOCK, BLOCK as u32).unwrap() == block(5000 + i));
        }
    }
}

/// Read-only, a version 2 pool opens and reads as it is, and stays version 2.
#[test]
fn a_version_2_pool_opened_read_only_is_not_upgraded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unpack_fixture(tmp.path(), "v2-pool.tar.gz");
    let o = PoolOptions {
        read_only: true,
        ..opts()
    };
    let pool = Pool::open(&dir, &o).expect("open the version 2 pool read-only");
    let db = pool.volume("db").unwrap();
    assert!(db.read(0, BLOCK as u32).unwrap() == block(1000));
    assert!(db.read(200 * BLOCK, BLOCK as u32).unwrap() == block(200));
    drop(pool);
    assert_eq!(superblock_versions(&dir), vec![2, 2]);
}

#[test]
fn an_unkeyed_index_is_dropped_and_keyed_dedup_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unpack(tmp.path());
    let copy = block(151); // stored by the fixture at db block 151
    let before = {
        let pool = Pool::open(&dir, &opts()).expect("open the version 1 pool");
        // The fixture's index (and its log's fingerprints) are unkeyed XXH3: not used.
        assert_eq!(pool.stats().dedup_index_entries, 0);
        let before = pool.stats().unique_blocks;
        let logs = pool.volume("logs").unwrap();
        logs.write(350 * BLOCK, &copy, false).unwrap();
        assert_eq!(
            pool.stats().unique_blocks,
            before + 1,
            "an old block is no dedup candidate"
        );
        logs.write(351 * BLOCK, &copy, false).unwrap();
        assert_eq!(pool.stats().unique_blocks, before + 1, "the keyed copy is");
        pool.shutdown().unwrap();
        before
    };
    let pool = Pool::open(&dir, &opts()).expect("reopen the upgraded pool");
    assert!(pool.stats().dedup_index_entries > 0, "keyed index kept");
    let logs = pool.volume("logs").unwrap();
    logs.write(352 * BLOCK, &copy, false).unwrap();
    assert_eq!(pool.stats().unique_blocks, before + 1);
    assert_eq!(
        pool.volume("db")
            .unwrap()
            .read(151 * BLOCK, BLOCK as u32)
            .unwrap(),
        copy
    );
    check_contents(&pool);
}
