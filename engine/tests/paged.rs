//! Format 3 checkpoints (issue 22): a root and metadata pages instead of one blob. Pools get
//! them only through `CreateOptions::paged_metadata` so far; the model tests run on them too
//! (`model_paged_metadata*`).

mod common;

use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};

const BLOCK: usize = 4096;

fn opts() -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        shards: 2,
        cache_bytes: Some(0),
        ..Default::default()
    }
}

fn create(dir: &std::path::Path, paged: bool, size: u64) -> Pool {
    let c = CreateOptions {
        size_bytes: size,
        segment_bytes: 2 << 20,
        paged_metadata: paged,
        ..Default::default()
    };
    Pool::create(dir, &c, &opts()).expect("create")
}

/// Distinct, incompressible blocks.
fn blocks(seed: u64, n: usize) -> Vec<u8> {
    (0..n as u64)
        .flat_map(|i| common::xorshift_block(seed << 32 | i))
        .collect()
}

fn assert_clean(pool: &Pool) {
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

fn superblock_version(dir: &std::path::Path) -> u32 {
    let dev = std::fs::read(dir.join("dev0.img")).unwrap();
    u32::from_le_bytes(dev[8..12].try_into().unwrap())
}

/// A format 3 pool keeps its version, and its volumes, snapshot included, read back after a
/// clean reopen and after a crash. The snapshot's map leaves stay shared across the reopen:
/// the engine holds about as much map RAM as before the snapshot, where a format 2 pool holds
/// a second copy of every leaf after it reopens.
#[test]
fn a_paged_pool_reopens_with_its_snapshots_still_sharing_leaves() {
    let mut ram_after_reopen = Vec::new();
    for paged in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let pool = create(dir.path(), paged, 256 << 20);
        pool.create_volume("v", 64 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        let data = blocks(1, 8192);
        v.write(0, &data, false).unwrap();
        v.flush().unwrap();
        let before = pool.stats().metadata_ram_bytes;
        pool.snapshot_volume("v", "s").unwrap();
        let changed = blocks(2, 16);
        v.write(0, &changed, false).unwrap();
        v.flush().unwrap();
        pool.shutdown().unwrap();
        drop(pool);
        assert_eq!(superblock_version(dir.path()), if paged { 3 } else { 2 });
        let pool = Pool::open(dir.path(), &opts()).unwrap();
        let now = pool
            .volume("v")
            .unwrap()
            .read(0, (8192 * BLOCK) as u32)
            .unwrap();
        assert!(now[..16 * BLOCK] == changed[..] && now[16 * BLOCK..] == data[16 * BLOCK..]);
        let snap = pool
            .volume("s")
            .unwrap()
            .read(0, (8192 * BLOCK) as u32)
            .unwrap();
        assert!(snap == data, "the snapshot changed");
        assert_clean(&pool);
        ram_after_reopen.push((pool.stats().metadata_ram_bytes, before));
        // A crash after more flushed writes: replayed on top of the format 3 checkpoint.
        let v = pool.volume("v").unwrap();
        let more = blocks(3, 64);
        v.write(100 * BLOCK as u64, &more, false).unwrap();
        v.flush().unwrap();
        pool.halt();
        drop(pool);
        let pool = Pool::open(dir.path(), &opts()).unwrap();
        let got = pool
            .volume("v")
            .unwrap()
            .read(100 * BLOCK as u64, (64 * BLOCK) as u32)
            .unwrap();
        assert!(
            got == more,
            "flushed writes lost at a crash (format 3: {paged})"
        );
        assert_clean(&pool);
    }
    let (paged, paged_before) = ram_after_reopen[0];
    let (plain, plain_before) = ram_after_reopen[1];
    // 16 leaves of 4 KiB per copy of the map; the table is the same in both.
    assert!(
        paged - paged_before < plain - plain_before,
        "format 3 {paged_before} -> {paged}, format 2 {plain_before} -> {plain}"
    );
    assert!(
        paged - paged_before < 16 << 10,
        "the snapshot's leaves were not kept shared"
    );
}

/// Checkpoints one after another on a small pool: each writes a whole image, and the one
/// before the previous is freed, so the pool never runs out of room for them.
#[test]
fn paged_checkpoints_give_back_their_segments() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), true, 64 << 20);
    pool.create_volume("v", 16 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    // The same 8 MiB rewritten over and over: once it is all written, free space stays level
    // (whole checkpoints: the one before the previous is freed at each commit).
    let mut free_after = Vec::new();
    for round in 0..120u64 {
        v.write((round % 32) * 64 * BLOCK as u64, &blocks(round, 64), false)
            .unwrap();
        pool.checkpoint().unwrap();
        free_after.push(pool.stats().segments_free);
    }
    let (settled, last) = (free_after[40], free_after[119]);
    assert!(
        last + 2 >= settled,
        "{settled} segments free after 40 checkpoints, {last} after 120: {free_after:?}"
    );
    assert_clean(&pool);
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    assert_clean(&pool);
}

/// A superblock whose root pointer was changed (CRC recomputed, as a tool or a bug would):
/// off the page grid, past its segment, or at a page that is not a root. The open refuses the
/// pool as corrupt, it does not panic or read past the segment.
#[test]
fn a_root_pointer_that_leads_elsewhere_is_refused() {
    for bad in [4097u32, 2 << 20, 8192] {
        let dir = tempfile::tempdir().unwrap();
        let pool = create(dir.path(), true, 64 << 20);
        pool.create_volume("v", 4 << 20).unwrap();
        pool.volume("v")
            .unwrap()
            .write(0, &blocks(9, 16), false)
            .unwrap();
        pool.shutdown().unwrap();
        drop(pool);
        let path = dir.path().join("dev0.img");
        let mut dev = std::fs::read(&path).unwrap();
        for slot in [0usize, 4096] {
            let sb = &mut dev[slot..slot + 192];
            sb[100..104].copy_from_slice(&bad.to_le_bytes());
            sb[188..192].fill(0);
            let crc = crc32fast::hash(sb);
            sb[188..192].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(&path, &dev).unwrap();
        match Pool::open(dir.path(), &opts()) {
            Err(e) => assert_eq!(
                e.kind(),
                ingot_engine::ErrorKind::BadPool,
                "offset {bad}: {e}"
            ),
            Ok(_) => panic!("opened with the root pointer at {bad}"),
        }
    }
}

/// A volume whose directory (16 bytes per 2 MiB of its size, mapped or not) would not fit in
/// the space kept for checkpoints is refused at once, as is growth to such a size: every later
/// checkpoint would have to write it. A volume that fits is created as usual.
#[test]
fn a_volume_whose_directory_cannot_be_checkpointed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), true, 64 << 20);
    let huge = 1u64 << 50;
    assert!(matches!(
        pool.create_volume("huge", huge),
        Err(ingot_engine::Error::NoSpace)
    ));
    pool.create_volume("v", 1 << 30).unwrap();
    assert!(matches!(
        pool.resize_volume("v", huge),
        Err(ingot_engine::Error::NoSpace)
    ));
    pool.resize_volume("v", 2 << 30).unwrap();
    pool.checkpoint().unwrap();
    assert_clean(&pool);
}
