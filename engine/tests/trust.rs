//! A client's bytes are never taken for log metadata. Volume "b" is the attacker: it writes
//! blocks crafted to look like our own records (Data records whose dedup references point at
//! volume "a"'s blocks, Trim records over "a", Move records that relocate "a"'s blocks into
//! the attacker's payload, segment and checkpoint headers) with every field a strong attacker
//! can know or guess (epoch, segment, shard, sequence numbers, block ids and locations read
//! from the backing file), and exact copies of genuine records taken from the backing file.
//! Each cycle tears the header of the spray's first record (a power cut), so that replay meets
//! a gap right before the attacker's blocks, then reopens. No cycle may let "b"
//! read "a"'s data, change a flushed block of "a", or leave `check` with a problem.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};

mod forge;
use forge::*;

/// Blocks of volume "a" written (and flushed) per cycle.
const A_BLOCKS: u64 = 64;
/// Where the attacker's torn record and spray go in "b".
const B_SPRAY_LBA: u64 = 2560;
const CYCLES: u64 = 3;

fn opts() -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        shards: 2,
        cache_bytes: Some(0),
        write_back_bytes: 0,
        ..Default::default()
    }
}

fn dev0(dir: &Path) -> PathBuf {
    dir.join("dev0.img")
}

fn attack(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed ^ kind as u64);
    let c = CreateOptions {
        size_bytes: POOL_BYTES,
        segment_bytes: SEG,
        ..Default::default()
    };
    let pool = Pool::create(dir.path(), &c, &opts()).expect("create pool");
    pool.create_volume("a", 32 << 20).unwrap();
    pool.create_volume("b", 32 << 20).unwrap();
    drop(pool);
    // "a"'s flushed contents, block by block.
    let mut a: Vec<Vec<u8>> = Vec::new();
    for cycle in 0..CYCLES {
        // Epochs count opens: creation was the first.
        let epoch = cycle + 2;
        let pool = Pool::open(dir.path(), &opts()).expect("open");
        let va = pool.volume("a").unwrap();
        let vb = pool.volume("b").unwrap();
        for i in 0..A_BLOCKS {
            let lba = a_lba((cycle * A_BLOCKS + i) as usize);
            let blk = rng.block();
            va.write(lba * BLOCK as u64, &blk, false).unwrap();
            a.push(blk);
        }
        va.flush().unwrap();
        let device = std::fs::read(dev0(dir.path())).unwrap();
        let intel = Intel::gather(&device, &a);
        // The power cut will tear the header of the spray's first record: replay meets a gap
        // right before the attacker's blocks. A unique first block marks where it lies.
        let tear = rng.block();
        let mut writes = spray(&mut rng, kind, epoch, &intel, &device);
        writes[0].splice(0..0, tear.iter().copied());
        let mut lba = B_SPRAY_LBA;
        for w in &writes {
            vb.write(lba * BLOCK as u64, w, false).unwrap();
            lba += (w.len() / BLOCK) as u64;
        }
        pool.halt();
        drop((va, vb, pool));
        // The power cut tore that record's header (the block before its first payload).
        let device = std::fs::read(dev0(dir.path())).unwrap();
        let at = find(&device, &tear);
        assert_eq!(at.len(), 1, "the record to tear is stored once");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dev0(dir.path()))
            .unwrap();
        f.write_all_at(&[0u8; BLOCK], at[0] - BLOCK as u64).unwrap();
        drop(f);
        // The attack's precondition: the crafted blocks lie 4 KiB-aligned on the device.
        let first = &writes[0][BLOCK..2 * BLOCK];
        assert!(
            !find(&device, first).is_empty(),
            "the attacker's blocks were not stored as whole aligned blocks"
        );
        // Replay, twice: the state must be the same after a second crash.
        for _ in 0..2 {
            let pool = Pool::open(dir.path(), &opts()).expect("reopen after the power cut");
            check_pool(&pool, &a, kind);
            pool.halt();
        }
    }
}

/// Where "a"'s `i`th block goes: spread over map pages, so over both shards' pages.
fn a_lba(i: usize) -> u64 {
    i as u64 * 37
}

fn check_pool(pool: &Pool, a: &[Vec<u8>], kind: Kind) {
    let va = pool.volume("a").unwrap();
    for (i, want) in a.iter().enumerate() {
        let got = va.read(a_lba(i) * BLOCK as u64, BLOCK as u32).unwrap();
        assert!(
            &got == want,
            "{kind:?}: flushed block {i} of volume a changed after replay"
        );
    }
    let vb = pool.volume("b").unwrap();
    let all_b = vb.read(0, 32 << 20).unwrap();
    let secrets: std::collections::HashSet<&[u8]> = a.iter().map(Vec::as_slice).collect();
    for (i, blk) in all_b.chunks_exact(BLOCK).enumerate() {
        assert!(
            !secrets.contains(blk),
            "{kind:?}: volume b block {i} reads volume a's data"
        );
    }
    let report = pool.check(&mut |_, _| {});
    assert!(
        report.problems.is_empty(),
        "{kind:?}: check found problems: {:?}",
        report.problems
    );
}

#[test]
fn forged_data_records_never_map_another_volumes_blocks() {
    attack(Kind::DataRefs);
}

#[test]
fn forged_trim_records_never_erase_flushed_data() {
    attack(Kind::Trims);
}

#[test]
fn forged_move_records_never_relocate_blocks() {
    attack(Kind::Moves);
}

#[test]
fn forged_segment_and_checkpoint_headers_are_never_followed() {
    attack(Kind::SegmentHeaders);
}

#[test]
fn copies_of_genuine_records_are_never_replayed() {
    attack(Kind::Copies);
}
