//! Data reduction: deduplication across LBAs, volumes, restarts and crashes; forced fingerprint
//! collisions; dedup domains and keyed fingerprints; compression, packing and corruption of compressed groups; policy; index budget.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ingot_engine::{CreateOptions, DedupDomain, Error, FaultPlan, IoKind, Pool, PoolOptions};

const BLOCK: usize = 4096;

fn opts(plan: Option<Arc<FaultPlan>>) -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        // One shard: every write goes through one dedup pass in order, so counts are exact.
        shards: 1,
        cache_bytes: Some(0),
        fault: plan,
        ..Default::default()
    }
}

fn create(dir: &Path, plan: Option<Arc<FaultPlan>>) -> Pool {
    let c = CreateOptions {
        size_bytes: 256 << 20,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    Pool::create(dir, &c, &opts(plan)).expect("create pool")
}

/// An incompressible block.
fn random_block(seed: u64) -> Vec<u8> {
    common::xorshift_block(seed)
}

/// A block that compresses about 4x, different for each seed.
fn text_block(seed: u64) -> Vec<u8> {
    let mut s = String::new();
    let mut i = seed;
    while s.len() < BLOCK {
        s.push_str(&format!(
            "declaration {i:08} trader CN-{:05} hs 8471.30 value {:>9}.00 EUR route SHA-RTM\n",
            i % 977,
            (i * 7919) % 1_000_000
        ));
        i += 1;
    }
    s.into_bytes()[..BLOCK].to_vec()
}

fn clean(pool: &Pool) {
    let r = pool.check(&mut |_, _| {});
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn same_block_at_many_lbas_and_volumes_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let x = random_block(1);
    {
        let pool = create(dir.path(), None);
        pool.create_volume("a", 64 << 20).unwrap();
        pool.create_volume("b", 64 << 20).unwrap();
        let a = pool.volume("a").unwrap();
        let b = pool.volume("b").unwrap();
        for i in 0..50u64 {
            a.write(i * 3 * BLOCK as u64, &x, false).unwrap();
            b.write((i * 5 + 1) * BLOCK as u64, &x, false).unwrap();
        }
        // One request holding the same block many times (deduplicated within the record).
        let run: Vec<u8> = x.iter().copied().cycle().take(64 * BLOCK).collect();
        a.write(32 << 20, &run, false).unwrap();
        let s = pool.stats();
        assert_eq!(s.unique_blocks, 1, "{s:?}");
        assert_eq!(s.logical_mapped_bytes, (50 + 50 + 64) * BLOCK as u64);
        assert_eq!(
            s.stored_bytes, BLOCK as u64,
            "incompressible: stored raw, once"
        );
        assert!((s.dedup_ratio - 164.0).abs() < 1e-9, "{}", s.dedup_ratio);
        let va = s.volumes.iter().find(|v| v.name == "a").unwrap();
        let vb = s.volumes.iter().find(|v| v.name == "b").unwrap();
        assert_eq!(va.stored_bytes + vb.stored_bytes, BLOCK as u64);
        assert!(va.dedup_ratio > 100.0 && vb.dedup_ratio > 100.0);
        clean(&pool);
        // Overwrite one copy, trim another, delete volume b: the others are intact.
        let y = random_block(2);
        a.write(0, &y, false).unwrap();
        a.trim(3 * BLOCK as u64, BLOCK as u64, false).unwrap();
        assert_eq!(a.read(0, BLOCK as u32).unwrap(), y);
        assert_eq!(
            a.read(3 * BLOCK as u64, BLOCK as u32).unwrap(),
            vec![0; BLOCK]
        );
        assert_eq!(a.read(6 * BLOCK as u64, BLOCK as u32).unwrap(), x);
        assert_eq!(b.read(BLOCK as u64, BLOCK as u32).unwrap(), x);
        pool.delete_volume("b").unwrap();
        assert_eq!(a.read(9 * BLOCK as u64, BLOCK as u32).unwrap(), x);
        let s = pool.stats();
        assert_eq!(s.unique_blocks, 2);
        clean(&pool);
        pool.shutdown().unwrap();
    }
    // After a restart the index still knows the block (it is in the checkpoint).
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    let a = pool.volume("a").unwrap();
    assert_eq!(a.read(6 * BLOCK as u64, BLOCK as u32).unwrap(), x);
    a.write(40 << 20, &x, false).unwrap();
    assert_eq!(pool.stats().unique_blocks, 2);
    // Trim every copy: the block is freed.
    a.trim(0, 64 << 20, false).unwrap();
    let s = pool.stats();
    assert_eq!((s.unique_blocks, s.stored_bytes), (0, 0), "{s:?}");
    clean(&pool);
}

/// Reference counts are a byte each up to 253 and a side map beyond (`RefCounts`): a block
/// shared by hundreds of map entries, across snapshots and a restart, keeps an exact count
/// going up past the byte and back down, and is freed with its last entry.
#[test]
fn a_block_shared_hundreds_of_times_counts_exactly_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let x = random_block(7);
    let run: Vec<u8> = x.iter().copied().cycle().take(200 * BLOCK).collect();
    {
        let pool = create(dir.path(), None);
        pool.create_volume("a", 64 << 20).unwrap();
        let a = pool.volume("a").unwrap();
        a.write(0, &run, false).unwrap();
        a.write(1 << 20, &run, false).unwrap();
        assert_eq!(pool.stats().unique_blocks, 1);
        clean(&pool);
        // Each snapshot adds a reference per mapped block: 400 -> 800.
        pool.snapshot_volume("a", "s1").unwrap();
        clean(&pool);
        pool.shutdown().unwrap();
    }
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    clean(&pool);
    let a = pool.volume("a").unwrap();
    // Down through the byte's range: 800 -> 600 -> (snapshot gone) 200 -> 100.
    a.trim(0, 200 * BLOCK as u64, false).unwrap();
    clean(&pool);
    pool.delete_volume("s1").unwrap();
    clean(&pool);
    a.trim(1 << 20, 100 * BLOCK as u64, false).unwrap();
    clean(&pool);
    let s = pool.stats();
    assert_eq!(
        (s.unique_blocks, s.stored_bytes),
        (1, BLOCK as u64),
        "{s:?}"
    );
    assert_eq!(
        a.read((1 << 20) + 150 * BLOCK as u64, BLOCK as u32)
            .unwrap(),
        x
    );
    a.trim(0, 64 << 20, false).unwrap();
    let s = pool.stats();
    assert_eq!((s.unique_blocks, s.stored_bytes), (0, 0), "{s:?}");
    clean(&pool);
}

#[test]
fn crash_between_dedup_hits_and_their_flush() {
    let dir = tempfile::tempdir().unwrap();
    let x = random_block(7);
    let z = random_block(8);
    {
        let pool = create(dir.path(), None);
        pool.create_volume("v", 64 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &x, false).unwrap();
        v.flush().unwrap();
        // Flushed hits, then unflushed ones, then a crash.
        v.write(BLOCK as u64, &x, false).unwrap();
        v.write(2 * BLOCK as u64, &x, false).unwrap();
        v.flush().unwrap();
        v.write(3 * BLOCK as u64, &x, false).unwrap();
        v.write(4 * BLOCK as u64, &z, false).unwrap();
        v.write(5 * BLOCK as u64, &z, false).unwrap();
        pool.halt();
    }
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    let v = pool.volume("v").unwrap();
    for i in 0..3u64 {
        assert_eq!(
            v.read(i * BLOCK as u64, BLOCK as u32).unwrap(),
            x,
            "block {i}"
        );
    }
    // Unflushed writes: old (zero) or new contents, never anything else.
    for (i, want) in [(3u64, &x), (4, &z), (5, &z)] {
        let got = v.read(i * BLOCK as u64, BLOCK as u32).unwrap();
        assert!(got == *want || got == vec![0; BLOCK], "block {i}");
    }
    clean(&pool);
    // The index was rebuilt from the log: the next copy is a hit.
    let before = pool.stats().unique_blocks;
    v.write(10 * BLOCK as u64, &x, false).unwrap();
    assert_eq!(pool.stats().unique_blocks, before);
}

#[test]
fn forced_fingerprint_collisions_never_share_different_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    plan.collide_fingerprints.store(true, Ordering::Relaxed);
    let pool = create(dir.path(), Some(plan.clone()));
    pool.create_volume("v", 64 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    // Every block's key is the same: each write finds a candidate, and only equal bytes may be
    // shared.
    let mut want = Vec::new();
    for i in 0..200u64 {
        let b = if i % 4 == 3 {
            random_block(i - 1)
        } else {
            random_block(i)
        };
        v.write(i * BLOCK as u64, &b, false).unwrap();
        want.push(b);
    }
    for (i, b) in want.iter().enumerate() {
        assert_eq!(
            &v.read((i * BLOCK) as u64, BLOCK as u32).unwrap(),
            b,
            "block {i}"
        );
    }
    let s = pool.stats();
    // 150 distinct blocks; the copies whose candidate happened to be equal were shared.
    assert!(
        (150..=200).contains(&s.unique_blocks),
        "unique {}",
        s.unique_blocks
    );
    assert!(s.unique_blocks < 200, "the equal candidates were shared");
    clean(&pool);
    drop(pool);
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    let v = pool.volume("v").unwrap();
    for (i, b) in want.iter().enumerate() {
        assert_eq!(&v.read((i * BLOCK) as u64, BLOCK as u32).unwrap(), b);
    }
}

#[test]
fn compressed_groups_are_packed_moved_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..1024u64).flat_map(|i| text_block(i * 40)).collect();
    {
        let pool = create(dir.path(), None);
        pool.create_volume("v", 64 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        let before = pool.stats().device_written_bytes;
        v.write(0, &data, false).unwrap();
        let s = pool.stats();
        assert_eq!(s.unique_blocks, 1024);
        // The log shrinks too (packed payloads), not only a counter.
        let logged = s.device_written_bytes - before;
        assert!(logged * 2 < data.len() as u64, "logged {logged}");
        assert!(
            s.stored_bytes * 2 < data.len() as u64,
            "stored {} of {}",
            s.stored_bytes,
            data.len()
        );
        assert!(s.compression_ratio > 2.0, "{}", s.compression_ratio);
        // Unaligned reads inside groups, and a partial overwrite inside one.
        assert_eq!(
            v.read(4096 + 512, 9216).unwrap(),
            &data[4096 + 512..4096 + 512 + 9216]
        );
        v.write(3 * 4096 + 512, &[0xAB; 1024], false).unwrap();
        let mut model = data.clone();
        model[3 * 4096 + 512..3 * 4096 + 1536].fill(0xAB);
        assert!(v.read(0, data.len() as u32).unwrap() == model);
        // Overwrite half the blocks so groups are partly dead, then clean everything.
        for i in (0..1024u64).step_by(2) {
            let b = text_block(1_000_000 + i);
            v.write(i * 4096, &b, false).unwrap();
            model[(i * 4096) as usize..(i * 4096) as usize + BLOCK].copy_from_slice(&b);
        }
        pool.gc(0.99, &mut |_, _| {}).unwrap();
        assert!(v.read(0, data.len() as u32).unwrap() == model);
        clean(&pool);
        drop(pool);
        let pool = Pool::open(dir.path(), &opts(None)).unwrap();
        let v = pool.volume("v").unwrap();
        assert!(v.read(0, data.len() as u32).unwrap() == model);
        clean(&pool);
    }
}

#[test]
fn a_flipped_bit_in_a_compressed_group_is_reported_for_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..8u64).flat_map(|i| text_block(i * 40)).collect();
    let pool = create(dir.path(), None);
    pool.create_volume("v", 16 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    v.write(0, &data, false).unwrap();
    v.flush().unwrap();
    pool.shutdown().unwrap();
    drop(pool);
    // Find the group's compressed bytes in the backing file and flip one bit.
    let stored = ingot_engine::reduce::compress(&data).expect("compressible");
    let img = dir.path().join("dev0.img");
    let bytes = std::fs::read(&img).unwrap();
    let at = bytes
        .windows(stored.len())
        .position(|w| w == &stored[..])
        .expect("compressed group on disk");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(
        &[bytes[at + stored.len() / 2] ^ 0x10],
        (at + stored.len() / 2) as u64,
    )
    .unwrap();
    f.sync_all().unwrap();
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    let v = pool.volume("v").unwrap();
    for i in 0..8u64 {
        match v.read(i * 4096, 4096) {
            Err(Error::ChecksumMismatch { .. }) => {}
            other => panic!("block {i}: {other:?}"),
        }
    }
    let r = pool.check(&mut |_, _| {});
    let bad = r.problems.iter().filter(|p| p.kind == "checksum").count();
    assert_eq!(bad, 8, "{:?}", r.problems);
    // Rewriting the blocks heals the volume.
    v.write(0, &data, false).unwrap();
    assert!(v.read(0, data.len() as u32).unwrap() == data);
}

#[test]
fn policy_off_stores_every_copy_raw() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), None);
    pool.create_volume("v", 16 << 20).unwrap();
    pool.set_volume_policy("v", Some(false), Some(false))
        .unwrap();
    let v = pool.volume("v").unwrap();
    let t = text_block(5);
    v.write(0, &t, false).unwrap();
    v.write(4096, &t, false).unwrap();
    let s = pool.stats();
    assert_eq!((s.unique_blocks, s.stored_bytes), (2, 8192), "{s:?}");
    let info = &pool.volumes()[0];
    assert!(!info.dedup && !info.compression);
    // The policy is durable and can be changed online.
    drop(pool);
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    let info = &pool.volumes()[0];
    assert!(!info.dedup && !info.compression);
    pool.set_volume_policy("v", Some(true), Some(true)).unwrap();
    let v = pool.volume("v").unwrap();
    v.write(8192, &t, false).unwrap();
    v.write(12288, &t, false).unwrap();
    let s = pool.stats();
    assert_eq!(s.unique_blocks, 3, "one new block, compressed, then a hit");
    assert!(s.stored_bytes < 8192 + 4096);
    assert!(matches!(
        pool.set_volume_policy("nope", Some(true), None),
        Err(Error::VolumeNotFound(_))
    ));
    clean(&pool);
}

/// A pool whose dedup index holds almost nothing (it samples at once), and its options.
fn sampled_pool(dir: &Path) -> (Pool, PoolOptions) {
    let c = CreateOptions {
        size_bytes: 256 << 20,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    let o = PoolOptions {
        dedup_index_bytes: Some(1),
        ..opts(None)
    };
    (Pool::create(dir, &c, &o).unwrap(), o)
}

#[test]
fn index_past_its_budget_samples_and_never_fails_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = sampled_pool(dir.path());
    pool.create_volume("v", 64 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    for i in 0..5000u64 {
        v.write(i * 4096, &random_block(i), false).unwrap();
    }
    let s = pool.stats();
    assert!(s.dedup_index_sampling > 1, "{s:?}");
    assert!(s.dedup_index_entries <= 1024);
    // Copies of the whole set: some hit (the sampled ones), all succeed.
    for i in 0..5000u64 {
        v.write((6000 + i) * 4096, &random_block(i), false).unwrap();
    }
    let s = pool.stats();
    assert!(s.unique_blocks < 10_000 && s.unique_blocks >= 5000, "{s:?}");
    for i in (0..5000u64).step_by(97) {
        assert_eq!(v.read((6000 + i) * 4096, 4096).unwrap(), random_block(i));
    }
    clean(&pool);
}

#[test]
fn reading_one_block_of_a_group_caches_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..8u64).flat_map(|i| text_block(i * 40)).collect();
    let cached = PoolOptions {
        cache_bytes: Some(1 << 20),
        ..opts(None)
    };
    {
        let pool = Pool::create(
            dir.path(),
            &CreateOptions {
                size_bytes: 64 << 20,
                segment_bytes: 2 << 20,
                ..Default::default()
            },
            &cached,
        )
        .unwrap();
        pool.create_volume("v", 16 << 20).unwrap();
        pool.volume("v").unwrap().write(0, &data, false).unwrap();
    }
    // A fresh process: nothing cached.
    let pool = Pool::open(dir.path(), &cached).unwrap();
    let v = pool.volume("v").unwrap();
    // Shards publish their cache counters at the end of each loop turn, just after completing
    // requests: wait for the counts to settle before comparing them.
    let settled = |pool: &Pool| {
        let mut last = (u64::MAX, u64::MAX);
        loop {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let s = pool.stats();
            let now = (s.cache_hits, s.cache_misses);
            if now == last {
                return now;
            }
            last = now;
        }
    };
    assert_eq!(v.read(3 * 4096, 4096).unwrap(), &data[3 * 4096..4 * 4096]);
    let (_, misses) = settled(&pool);
    assert!(misses >= 1, "the first read missed the cache");
    for i in 0..8u64 {
        assert_eq!(
            v.read(i * 4096, 4096).unwrap(),
            &data[(i * 4096) as usize..((i + 1) * 4096) as usize]
        );
    }
    let (hits, after) = settled(&pool);
    assert_eq!(after, misses, "the rest of the group was cached");
    assert!(hits >= 8);
}

#[test]
fn concurrent_writers_sharing_blocks_while_the_cleaner_runs() {
    writers_sharing_blocks_while_the_cleaner_runs(false);
}

/// The same on a prefilled pool, whose freed segments are never punched: their stale segment
/// headers once made recovery walk a cycle of them forever.
#[test]
fn concurrent_writers_sharing_blocks_while_the_cleaner_runs_prefilled() {
    writers_sharing_blocks_while_the_cleaner_runs(true);
}

fn writers_sharing_blocks_while_the_cleaner_runs(prefill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: 48 << 20,
        segment_bytes: 2 << 20,
        prefill,
        ..Default::default()
    };
    let o = PoolOptions {
        shards: 2,
        cache_bytes: Some(256 << 10),
        ..opts(None)
    };
    let pool = Arc::new(Pool::create(dir.path(), &c, &o).unwrap());
    pool.create_volume("a", 8 << 20).unwrap();
    pool.create_volume("b", 8 << 20).unwrap();
    // A few contents shared by everyone (incompressible and compressible), plus unique ones.
    let shared: Vec<Vec<u8>> = (0..6u64)
        .map(|i| {
            if i < 3 {
                random_block(900 + i)
            } else {
                text_block(900 + i)
            }
        })
        .collect();
    const BLOCKS: u64 = 2048; // per volume
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            let shared = shared.clone();
            std::thread::spawn(move || {
                let vol = pool.volume(if t % 2 == 0 { "a" } else { "b" }).unwrap();
                // Each thread owns half of its volume's blocks.
                let base = (t / 2) * BLOCKS / 2;
                let mut model = vec![vec![0u8; BLOCK]; (BLOCKS / 2) as usize];
                let mut x = 0x9e37_79b9u64 + t;
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                for op in 0..3000u64 {
                    let n = 1 + next() % 8;
                    let at = next() % (BLOCKS / 2 - n);
                    if next() % 10 == 0 {
                        vol.trim((base + at) * 4096, n * 4096, false).unwrap();
                        for i in 0..n {
                            model[(at + i) as usize] = vec![0u8; BLOCK];
                        }
                        continue;
                    }
                    let mut data = Vec::with_capacity((n as usize) * BLOCK);
                    for i in 0..n {
                        let b = if next() % 3 == 0 {
                            random_block(t << 32 | op << 8 | i)
                        } else {
                            shared[(next() % shared.len() as u64) as usize].clone()
                        };
                        model[(at + i) as usize] = b.clone();
                        data.extend(b);
                    }
                    vol.write((base + at) * 4096, &data, op % 50 == 0).unwrap();
                }
                (t, base, model)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    let verify = |pool: &Pool| {
        for (t, base, model) in &results {
            let vol = pool.volume(if t % 2 == 0 { "a" } else { "b" }).unwrap();
            let got = vol.read(base * 4096, (BLOCKS / 2 * 4096) as u32).unwrap();
            for (i, want) in model.iter().enumerate() {
                assert!(
                    got[i * BLOCK..(i + 1) * BLOCK] == want[..],
                    "thread {t} block {i}"
                );
            }
        }
        let r = pool.check(&mut |_, _| {});
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    };
    verify(&pool);
    let s = pool.stats();
    assert!(s.gc_bytes_moved > 0, "the cleaner never ran: {s:?}");
    assert!(s.dedup_ratio > 1.5, "{s:?}");
    let pool = Arc::try_unwrap(pool).ok().expect("threads done");
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &o).unwrap();
    verify(&pool);
}

#[test]
fn copies_of_compressed_groups_are_found_without_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), None);
    pool.create_volume("v", 64 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let data: Vec<u8> = (0..64u64).flat_map(|i| text_block(i * 40)).collect();
    v.write(0, &data, false).unwrap();
    let first = pool.stats();
    assert_eq!(first.unique_blocks, 64);
    // Copies at other offsets, aligned differently against the groups.
    v.write(1 << 20, &data, false).unwrap();
    v.write((2 << 20) + 3 * 4096, &data, false).unwrap();
    let s = pool.stats();
    assert_eq!(s.unique_blocks, 64, "{s:?}");
    assert_eq!(s.stored_bytes, first.stored_bytes);
    assert_eq!(
        v.read((2 << 20) + 3 * 4096, data.len() as u32).unwrap(),
        data
    );
}

fn named(n: &str) -> DedupDomain {
    DedupDomain::Named(n.to_string())
}

/// (volume, domain) of the domains test: two shared, two private, two in "a", one in "b".
fn domain_volumes() -> Vec<(&'static str, DedupDomain)> {
    vec![
        ("s1", DedupDomain::Shared),
        ("s2", DedupDomain::Shared),
        ("p1", DedupDomain::Private),
        ("p2", DedupDomain::Private),
        ("a1", named("a")),
        ("a2", named("a")),
        ("b1", named("b")),
    ]
}

fn domain_of(pool: &Pool, vol: &str) -> DedupDomain {
    pool.volumes()
        .into_iter()
        .find(|v| v.name == vol)
        .unwrap_or_else(|| panic!("no volume {vol}"))
        .dedup_domain
}

#[test]
fn blocks_deduplicate_within_a_domain_only() {
    let dir = tempfile::tempdir().unwrap();
    let x = random_block(31);
    let y = random_block(32);
    {
        let pool = create(dir.path(), None);
        for (name, d) in domain_volumes() {
            if d == DedupDomain::Shared && name == "s2" {
                // The default domain, and the explicit one, are the same.
                pool.create_volume(name, 64 << 20).unwrap();
            } else {
                pool.create_volume_in(name, 64 << 20, d).unwrap();
            }
        }
        for (name, _) in domain_volumes() {
            pool.volume(name).unwrap().write(0, &x, false).unwrap();
        }
        // shared, p1, p2, a, b: five copies of the same bytes, one per domain.
        let s = pool.stats();
        assert_eq!(s.unique_blocks, 5, "{s:?}");
        assert_eq!(s.logical_mapped_bytes, 7 * BLOCK as u64);
        // Within a private volume, copies still share.
        let p1 = pool.volume("p1").unwrap();
        p1.write(BLOCK as u64, &x, false).unwrap();
        let two: Vec<u8> = [y.clone(), y.clone()].concat();
        p1.write(8 * BLOCK as u64, &two, false).unwrap();
        assert_eq!(pool.stats().unique_blocks, 6);
        // One request for two volumes of different domains is still two blocks.
        pool.volume("a1")
            .unwrap()
            .write(BLOCK as u64, &y, false)
            .unwrap();
        pool.volume("b1")
            .unwrap()
            .write(BLOCK as u64, &y, false)
            .unwrap();
        pool.volume("a2")
            .unwrap()
            .write(2 * BLOCK as u64, &y, false)
            .unwrap();
        assert_eq!(pool.stats().unique_blocks, 8);
        clean(&pool);
        pool.shutdown().unwrap();
    }
    // Domains and the (keyed) index come back from the checkpoint.
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    for (name, d) in domain_volumes() {
        assert_eq!(domain_of(&pool, name), d, "{name}");
    }
    let before = pool.stats().unique_blocks;
    for (name, _) in domain_volumes() {
        let v = pool.volume(name).unwrap();
        v.write(20 * BLOCK as u64, &x, false).unwrap();
        assert_eq!(v.read(0, BLOCK as u32).unwrap(), x);
    }
    assert_eq!(
        pool.stats().unique_blocks,
        before,
        "every copy found its domain's"
    );
    // A clone of a private volume shares its blocks by reference and is private to itself.
    pool.clone_volume("p1", "p1c").unwrap();
    assert_eq!(domain_of(&pool, "p1c"), DedupDomain::Private);
    let p1c = pool.volume("p1c").unwrap();
    assert_eq!(p1c.read(0, BLOCK as u32).unwrap(), x);
    assert_eq!(pool.stats().unique_blocks, before);
    p1c.write(21 * BLOCK as u64, &x, false).unwrap();
    assert_eq!(pool.stats().unique_blocks, before + 1, "not p1's domain");
    pool.delete_volume("p1c").unwrap();
    assert_eq!(pool.stats().unique_blocks, before);
    // Online: s2 moves to domain b, where y is stored; p2 goes shared.
    pool.set_volume_dedup_domain("s2", named("b")).unwrap();
    pool.set_volume_dedup_domain("p2", DedupDomain::Shared)
        .unwrap();
    assert_eq!(domain_of(&pool, "s2"), named("b"));
    let s2 = pool.volume("s2").unwrap();
    s2.write(30 * BLOCK as u64, &y, false).unwrap();
    assert_eq!(pool.stats().unique_blocks, before, "y found in domain b");
    // A block new to every domain, then crash: the index is rebuilt from the log with the
    // domain each copy was written in.
    let z = random_block(33);
    s2.write(31 * BLOCK as u64, &z, false).unwrap();
    pool.volume("s1")
        .unwrap()
        .write(31 * BLOCK as u64, &z, false)
        .unwrap();
    pool.volume("b1")
        .unwrap()
        .write(31 * BLOCK as u64, &z, false)
        .unwrap();
    assert_eq!(
        pool.stats().unique_blocks,
        before + 2,
        "z: once in b, once shared"
    );
    s2.flush().unwrap();
    pool.volume("s1").unwrap().flush().unwrap();
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    assert_eq!(domain_of(&pool, "s2"), named("b"));
    assert_eq!(domain_of(&pool, "p2"), DedupDomain::Shared);
    let before = pool.stats().unique_blocks;
    for name in ["a1", "s1", "b1", "s2", "p2"] {
        pool.volume(name)
            .unwrap()
            .write(40 * BLOCK as u64, &z, false)
            .unwrap();
    }
    // a1 stores z (domain a had none); the shared ones and b find theirs.
    assert_eq!(pool.stats().unique_blocks, before + 1);
    assert_eq!(
        pool.volume("s2")
            .unwrap()
            .read(31 * BLOCK as u64, BLOCK as u32)
            .unwrap(),
        z
    );
    clean(&pool);
    // A bad name is a typed error.
    assert!(matches!(
        "x/y".parse::<DedupDomain>().map_err(Error::from),
        Err(Error::InvalidDedupDomain(_))
    ));
    assert!(matches!(
        pool.set_volume_dedup_domain("nope", DedupDomain::Private),
        Err(Error::VolumeNotFound(_))
    ));
    // Names built by hand are checked like parsed ones (a checkpoint holds at most 64 bytes).
    for bad in ["", "shared", "private", ".x", "a b", &"n".repeat(65)] {
        assert!(
            matches!(
                pool.set_volume_dedup_domain("a1", named(bad)),
                Err(Error::InvalidDedupDomain(_))
            ),
            "{bad:?}"
        );
        assert!(matches!(
            pool.create_volume_in("bad", 1 << 20, named(bad)),
            Err(Error::InvalidDedupDomain(_))
        ));
    }
    assert_eq!(domain_of(&pool, "a1"), named("a"));
    pool.create_volume_in("ok", 1 << 20, named(&"n".repeat(64)))
        .unwrap();
}

#[test]
fn forced_collisions_stay_within_a_domain() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    plan.collide_fingerprints.store(true, Ordering::Relaxed);
    let pool = create(dir.path(), Some(plan.clone()));
    pool.create_volume_in("a", 64 << 20, named("a")).unwrap();
    pool.create_volume_in("b", 64 << 20, named("b")).unwrap();
    pool.create_volume_in("a2", 64 << 20, named("a")).unwrap();
    let x = random_block(41);
    for v in ["a", "b", "a2"] {
        pool.volume(v).unwrap().write(0, &x, false).unwrap();
    }
    // Every key of a domain collides, yet domain b never gets a's block.
    assert_eq!(pool.stats().unique_blocks, 2);
    let y = random_block(42);
    pool.volume("a")
        .unwrap()
        .write(BLOCK as u64, &y, false)
        .unwrap();
    assert_eq!(
        pool.volume("a")
            .unwrap()
            .read(BLOCK as u64, BLOCK as u32)
            .unwrap(),
        y
    );
    assert_eq!(pool.volume("a2").unwrap().read(0, BLOCK as u32).unwrap(), x);
    clean(&pool);
}

/// The fingerprint a data entry of `volume` for `lba` carries in the log of `dir`'s device.
fn logged_fingerprints(dir: &Path, volume: u32, lba: u64) -> Vec<[u8; 16]> {
    let dev = std::fs::read(dir.join("dev0.img")).unwrap();
    let mut out = Vec::new();
    // Entries are 8-byte aligned within 4 KiB-aligned records.
    for at in (0..dev.len() - 56).step_by(8) {
        let e = &dev[at..at + 56];
        if e[..4] == volume.to_le_bytes()
            && e[4..8] == [0; 4]
            && e[8..16] == lba.to_le_bytes()
            && e[16..24] != [0; 8]
        {
            out.push(e[24..40].try_into().unwrap());
        }
    }
    out
}

#[test]
fn fingerprints_are_keyed_by_the_pool_secret() {
    let x = random_block(51);
    let lba = 12_345u64;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let pool = create(dir.path(), None);
        pool.create_volume("v", 64 << 20).unwrap();
        pool.create_volume_in("w", 64 << 20, named("t")).unwrap();
        pool.volume("v")
            .unwrap()
            .write(lba * BLOCK as u64, &x, false)
            .unwrap();
        pool.volume("w")
            .unwrap()
            .write(lba * BLOCK as u64, &x, false)
            .unwrap();
        pool.shutdown().unwrap();
        let v = logged_fingerprints(dir.path(), 1, lba);
        let w = logged_fingerprints(dir.path(), 2, lba);
        assert_eq!((v.len(), w.len()), (1, 1), "one data entry each");
        let (fv, fw) = (u128::from_le_bytes(v[0]), u128::from_le_bytes(w[0]));
        // Not the unkeyed hash anyone can compute, and another domain's differs in both halves.
        assert_ne!(
            fv as u64,
            ingot_engine::reduce::unkeyed_fingerprint(&x) as u64
        );
        assert_ne!(fv as u64, fw as u64);
        assert_ne!(fv >> 64, fw >> 64);
        seen.push(fv);
    }
    assert_ne!(
        seen[0] as u64, seen[1] as u64,
        "two pools, two keys, two fingerprints"
    );
    assert_ne!(seen[0] >> 64, seen[1] >> 64);
}

/// Past its budget the index keeps a few fingerprints; a copy of stored data is still found
/// whole by following its stream from the ones it keeps (the block after a duplicate of block
/// `id` is tried against `id + 1`, checked by CRC, then byte for byte). A copy with every
/// eighth block changed stores only those, and the stream goes on after each.
#[test]
fn a_copy_is_deduplicated_past_the_index_budget_by_following_its_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, o) = sampled_pool(dir.path());
    const N: u64 = 2048;
    let data: Vec<u8> = (0..N).flat_map(random_block).collect();
    let changed: Vec<u8> = (0..N)
        .flat_map(|i| {
            if i % 8 == 5 {
                random_block(1 << 40 | i)
            } else {
                random_block(i)
            }
        })
        .collect();
    for name in ["a", "b", "c"] {
        pool.create_volume(name, 16 << 20).unwrap();
    }
    let write = |name: &str, bytes: &[u8], blocks: usize| {
        let v = pool.volume(name).unwrap();
        for (k, chunk) in bytes.chunks(blocks * BLOCK).enumerate() {
            v.write((k * blocks * BLOCK) as u64, chunk, false).unwrap();
        }
        v.flush().unwrap();
    };
    write("a", &data, 64);
    let stored = pool.stats().unique_blocks;
    assert_eq!(stored, N, "a is stored whole");
    assert!(pool.stats().dedup_index_sampling > 1, "the index samples");
    // The copy, in requests of another size.
    write("b", &data, 16);
    let s = pool.stats();
    assert!(
        s.unique_blocks - stored <= N / 10,
        "the copy stored {} of its {N} blocks anew ({} found by following the stream)",
        s.unique_blocks - stored,
        s.dedup_stream_hits
    );
    assert!(s.dedup_stream_hits > N / 2, "{}", s.dedup_stream_hits);
    let stored = s.unique_blocks;
    write("c", &changed, 64);
    let added = pool.stats().unique_blocks - stored;
    assert!(
        (N / 8..=N / 8 + N / 10).contains(&added),
        "the changed copy stored {added} blocks anew"
    );
    let check = |pool: &Pool| {
        for (name, want) in [("a", &data), ("b", &data), ("c", &changed)] {
            let got = pool
                .volume(name)
                .unwrap()
                .read(0, (N as usize * BLOCK) as u32)
                .unwrap();
            assert!(&got == want, "{name} reads back");
        }
        clean(pool);
    };
    check(&pool);
    drop(pool);
    let pool = Pool::open(dir.path(), &o).unwrap();
    check(&pool);
}

/// The same for data stored in compressed groups: a stream goes on through a group's blocks
/// (checked by the read its payload gets anyway) and into the next groups.
#[test]
fn a_compressed_copy_is_followed_through_its_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = sampled_pool(dir.path());
    const N: u64 = 2048;
    let data: Vec<u8> = (0..N).flat_map(|i| text_block(i * 1000)).collect();
    for name in ["a", "b"] {
        pool.create_volume(name, 16 << 20).unwrap();
    }
    let write = |name: &str, blocks: usize| {
        let v = pool.volume(name).unwrap();
        for (k, chunk) in data.chunks(blocks * BLOCK).enumerate() {
            v.write((k * blocks * BLOCK) as u64, chunk, false).unwrap();
        }
        v.flush().unwrap();
    };
    write("a", 64);
    let s = pool.stats();
    assert_eq!(s.unique_blocks, N);
    assert!(
        s.compression_ratio > 2.0,
        "stored in compressed groups: {s:?}"
    );
    write("b", 16);
    let s = pool.stats();
    assert!(
        s.unique_blocks - N <= N / 10,
        "the copy stored {} of its {N} blocks anew ({} found by following the stream)",
        s.unique_blocks - N,
        s.dedup_stream_hits
    );
    for name in ["a", "b"] {
        let got = pool
            .volume(name)
            .unwrap()
            .read(0, (N as usize * BLOCK) as u32)
            .unwrap();
        assert!(got == data, "{name} reads back");
    }
    clean(&pool);
}

/// A stream never crosses dedup domains: the block stored after one a private volume
/// duplicates may be another domain's, and a hit on it would tell the private volume what
/// that domain stores.
#[test]
fn a_stream_does_not_cross_dedup_domains() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), None);
    pool.create_volume_in("p", 64 << 20, DedupDomain::Private)
        .unwrap();
    pool.create_volume("s", 64 << 20).unwrap();
    let (x, y) = (random_block(41), random_block(42));
    // x in p (one id), then y in s (the next id).
    let p = pool.volume("p").unwrap();
    let s = pool.volume("s").unwrap();
    p.write(10 * BLOCK as u64, &x, false).unwrap();
    p.flush().unwrap();
    s.write(0, &y, false).unwrap();
    s.flush().unwrap();
    let before = pool.stats().unique_blocks;
    // p writes x again (found in p's own domain) and then y: y must be stored anew.
    let xy = [x.clone(), y.clone()].concat();
    p.write(50 * BLOCK as u64, &xy, false).unwrap();
    p.flush().unwrap();
    let st = pool.stats();
    assert_eq!(st.unique_blocks, before + 1, "y was stored for p: {st:?}");
    assert_eq!(st.dedup_stream_hits, 0);
    assert_eq!(p.read(50 * BLOCK as u64, 2 * BLOCK as u32).unwrap(), xy);
    clean(&pool);
}

/// After a reopen every block-table leaf is evicted: a copy of stored data finds its
/// candidates' leaves through the shard's own queue (read side by side, while the shard
/// reaps), never in a blocking read on the shard's thread, and is deduplicated as before.
#[test]
fn a_copy_after_a_reopen_reads_its_candidates_leaves_through_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, o) = sampled_pool(dir.path());
    const N: u64 = 2048;
    let data: Vec<u8> = (0..N).flat_map(random_block).collect();
    for name in ["a", "b"] {
        pool.create_volume(name, 16 << 20).unwrap();
    }
    let a = pool.volume("a").unwrap();
    for (k, chunk) in data.chunks(64 * BLOCK).enumerate() {
        a.write((k * 64 * BLOCK) as u64, chunk, false).unwrap();
    }
    a.flush().unwrap();
    drop(a);
    pool.shutdown().unwrap();
    drop(pool);
    let o = PoolOptions {
        metadata_cache_bytes: Some(1 << 20),
        ..o
    };
    let pool = Pool::open(dir.path(), &o).unwrap();
    let stored = pool.stats().unique_blocks;
    let b = pool.volume("b").unwrap();
    for (k, chunk) in data.chunks(16 * BLOCK).enumerate() {
        b.write((k * 16 * BLOCK) as u64, chunk, false).unwrap();
    }
    b.flush().unwrap();
    let s = pool.stats();
    assert!(
        s.unique_blocks - stored <= N / 10,
        "the copy stored {} of its {N} blocks anew",
        s.unique_blocks - stored
    );
    assert!(
        s.metadata_ring_reads > 0,
        "no leaf was read through the queue"
    );
    assert_eq!(
        s.metadata_shard_waits, 0,
        "the shard's thread waited for a page ({} read through the queue)",
        s.metadata_ring_reads
    );
    let got = b.read(0, (N as usize * BLOCK) as u32).unwrap();
    assert!(got == data, "the copy reads back");
    clean(&pool);
}
