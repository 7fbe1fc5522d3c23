//! Fault injection: bit rot in stored blocks, torn and corrupted log records, device write and
//! read errors, foreign and damaged pool files, and a full pool.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ingot_engine::format::{DATA_START, SUPERBLOCK_OFFSETS};
use ingot_engine::io::fault::FaultDevices;
use ingot_engine::io::sync::FileSet;
use ingot_engine::{
    CreateOptions, CutMode, Error, ErrorKind, FaultPlan, IoKind, Pool, PoolOptions,
};

const BLOCK: usize = 4096;

/// `assert_eq!` for byte buffers without printing megabytes: reports lengths and the first
/// differing byte.
macro_rules! same {
    ($got:expr, $want:expr) => {
        same!($got, $want, "")
    };
    ($got:expr, $want:expr, $msg:expr) => {{
        let got: &[u8] = &$got;
        let want: &[u8] = &$want;
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            panic!(
                "{} != {} (lengths {} and {}, first difference at {:?}) {}",
                stringify!($got),
                stringify!($want),
                got.len(),
                want.len(),
                at,
                $msg
            );
        }
    }};
}
const SEG: u64 = 2 << 20;

fn opts(plan: Option<Arc<FaultPlan>>) -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        shards: 2,
        // No cache: every read goes to the device.
        cache_bytes: Some(0),
        fault: plan,
        ..Default::default()
    }
}

fn create(dir: &Path, size_bytes: u64, plan: Option<Arc<FaultPlan>>) -> Pool {
    let c = CreateOptions {
        size_bytes,
        segment_bytes: SEG,
        ..Default::default()
    };
    Pool::create(dir, &c, &opts(plan)).expect("create pool")
}

fn dev0(dir: &Path) -> PathBuf {
    dir.join("dev0.img")
}

/// A distinctive, non-repeating 4 KiB block.
fn block(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(BLOCK);
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn blocks(seed: u64, n: usize) -> Vec<u8> {
    (0..n as u64).flat_map(|i| block(seed * 1000 + i)).collect()
}

/// Byte offsets in `dev0.img` where `needle` (one 4 KiB block) is stored.
fn find_block(dir: &Path, needle: &[u8]) -> Vec<u64> {
    let file = std::fs::read(dev0(dir)).expect("read dev0.img");
    file.chunks_exact(BLOCK)
        .enumerate()
        .filter(|(_, b)| *b == needle)
        .map(|(i, _)| (i * BLOCK) as u64)
        .collect()
}

fn the_block(dir: &Path, needle: &[u8]) -> u64 {
    let at = find_block(dir, needle);
    assert_eq!(at.len(), 1, "block stored once: {at:?}");
    at[0]
}

fn patch(dir: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
    patch_len(dir, offset, BLOCK, f)
}

fn patch_len(dir: &Path, offset: u64, len: usize, f: impl FnOnce(&mut [u8])) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev0(dir))
        .expect("open dev0.img");
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("read");
    f(&mut buf);
    file.write_all_at(&buf, offset).expect("write");
    file.sync_all().expect("sync");
}

fn assert_clean(pool: &Pool) {
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Run `f` on a thread and fail the test if it does not finish in time (no hangs).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("operation hung")
}

// ------------------------------------------------------------------ bit rot

#[test]
fn flipped_bit_in_stored_block_is_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = block(1);
    let b = blocks(2, 4);
    {
        let pool = create(dir.path(), 64 << 20, None);
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(3 * 4096, &a, false).unwrap();
        v.write(10 * 4096, &b, false).unwrap();
        v.flush().unwrap();
        pool.shutdown().unwrap();
    }
    let at = the_block(dir.path(), &a);
    patch(dir.path(), at, |blk| blk[100] ^= 0x10);

    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    let v = pool.volume("v").unwrap();
    for (off, len) in [(3 * 4096, 4096), (3 * 4096 + 512, 512), (0, 16 * 4096)] {
        match v.read(off, len) {
            Err(Error::ChecksumMismatch {
                block_id,
                segment,
                offset,
                expected,
                got,
            }) => {
                assert!(block_id != 0);
                assert_ne!(expected, got);
                assert_eq!(
                    DATA_START + u64::from(segment) * SEG + u64::from(offset),
                    at,
                    "the error names where the block is"
                );
            }
            other => panic!("read {off}+{len} of a rotten block: {other:?}"),
        }
    }
    let e = v.read(3 * 4096, 4096).unwrap_err();
    // A checksum failure (EIO over NBD, MEDIUM ERROR over iSCSI), not a generic one.
    assert_eq!(e.kind(), ErrorKind::Integrity, "{e:?}");
    // Other blocks are fine.
    same!(v.read(10 * 4096, 4 * 4096).unwrap(), b);
    same!(v.read(0, 3 * 4096).unwrap(), vec![0u8; 3 * 4096]);
    // check names the volume and the block.
    let report = pool.check(&mut |_, _| {});
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(p.kind, "checksum");
    assert!(
        p.detail.contains("volume v block 3 "),
        "problem names volume and block: {}",
        p.detail
    );
    // Overwriting the block heals it.
    v.write(3 * 4096, &block(3), false).unwrap();
    same!(v.read(3 * 4096, 4096).unwrap(), block(3));
    assert_clean(&pool);
}

#[test]
fn corrupt_reads_from_the_fault_plan_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
    pool.create_volume("v", 16 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let data = blocks(7, 8);
    v.write(0, &data, false).unwrap();
    v.flush().unwrap();
    let at = the_block(dir.path(), &data[5 * BLOCK..6 * BLOCK]);
    plan.corrupt_reads.lock().push((0, at + 4000));
    match v.read(0, 8 * 4096) {
        Err(Error::ChecksumMismatch { .. }) => {}
        other => panic!("corrupted read returned {other:?}"),
    }
    same!(v.read(0, 5 * 4096).unwrap(), data[..5 * BLOCK]);
    let report = pool.check(&mut |_, _| {});
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].kind, "checksum");
    assert!(report.problems[0].detail.contains("volume v block 5 "));
    plan.corrupt_reads.lock().clear();
    same!(v.read(0, 8 * 4096).unwrap(), data);
    assert_clean(&pool);
}

// ------------------------------------------------------------------ torn and corrupt records

/// The write path of the torn-record tests: `a` flushed at block 0, then `b` (16 blocks, one
/// record) over blocks 2..18 acknowledged but not flushed, then a crash.
fn torn_setup(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let a = blocks(11, 4);
    let b = blocks(12, 16);
    let pool = create(dir, 64 << 20, None);
    pool.create_volume("v", 16 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    v.write(0, &a, false).unwrap();
    v.flush().unwrap();
    v.write(2 * 4096, &b, false).unwrap();
    pool.halt();
    (a, b)
}

fn assert_torn_write_absent(dir: &Path, a: &[u8]) {
    let pool = Pool::open(dir, &opts(None)).expect("reopen after a torn record");
    let v = pool.volume("v").unwrap();
    same!(v.read(0, 4 * 4096).unwrap(), a, "flushed data intact");
    same!(
        v.read(4 * 4096, 14 * 4096).unwrap(),
        vec![0u8; 14 * 4096],
        "the torn write is absent"
    );
    assert_eq!(pool.stats().logical_mapped_bytes, 4 * 4096);
    assert_clean(&pool);
    // The pool goes on.
    v.write(4 * 4096, &block(99), true).unwrap();
    same!(v.read(4 * 4096, 4096).unwrap(), block(99));
    drop(pool);
    let pool = Pool::open(dir, &opts(None)).unwrap();
    same!(pool.volume("v").unwrap().read(0, 4 * 4096).unwrap(), a);
    assert_clean(&pool);
}

#[test]
fn torn_record_payload_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = torn_setup(dir.path());
    // Only the first half of the record's payloads reached the disk.
    for i in 8..16 {
        let at = the_block(dir.path(), &b[i * BLOCK..(i + 1) * BLOCK]);
        patch(dir.path(), at, |blk| blk.fill(0));
    }
    assert_torn_write_absent(dir.path(), &a);
}

#[test]
fn torn_record_header() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = torn_setup(dir.path());
    // The record's header block (just before its first payload) never reached the disk.
    let first = the_block(dir.path(), &b[..BLOCK]);
    patch(dir.path(), first - BLOCK as u64, |blk| blk.fill(0));
    assert_torn_write_absent(dir.path(), &a);
}

/// A block id whose last reference a record dropped is handed out again only once a
/// checkpoint covers that record. Shards' records reach the device in no common order: were the
/// id reused at once, a power cut could keep the record that stores a new block under it (one
/// shard's) and lose the record that dropped it (the other's), and the LBA the checkpoint still
/// maps to the id would read the new block. Power cuts that keep each unsynced write or not at
/// random, until some keep the second shard's record and lose the first's.
#[test]
fn a_dead_block_id_is_reused_only_after_a_checkpoint() {
    // LBA 0 is on shard 0; LBA 512, a map page further, on shard 1.
    let far = 512 * BLOCK as u64;
    let mut kept_second_lost_first = 0;
    for seed in 1..=40u64 {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        plan.track_unsynced.store(true, Ordering::Relaxed);
        let (p, q, r) = (block(seed * 3), block(seed * 3 + 1), block(seed * 3 + 2));
        {
            let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
            pool.create_volume("v", 16 << 20).unwrap();
            let v = pool.volume("v").unwrap();
            v.write(0, &p, false).unwrap();
            v.flush().unwrap();
            pool.checkpoint().unwrap();
            // Shard 0 drops P's id (stored, not flushed); then shard 1 stores R under an id.
            v.write(0, &q, false).unwrap();
            v.write(far, &r, false).unwrap();
            pool.halt();
        }
        let files = FileSet::open(&[dev0(dir.path())]).unwrap();
        FaultDevices::power_cut(&plan, &files, CutMode::Random { seed }).unwrap();
        drop(files);
        let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
        let v = pool.volume("v").unwrap();
        let at0 = v.read(0, BLOCK as u32).unwrap();
        let at_far = v.read(far, BLOCK as u32).unwrap();
        assert!(
            at0 == p || at0 == q,
            "seed {seed}: LBA 0 reads neither its old block nor its new one (R: {})",
            at0 == r
        );
        assert!(at_far == r || at_far == vec![0u8; BLOCK], "seed {seed}");
        if at0 == p && at_far == r {
            kept_second_lost_first += 1;
        }
        assert_clean(&pool);
    }
    assert!(
        kept_second_lost_first > 0,
        "no cut kept shard 1's record and lost shard 0's"
    );
}

#[test]
fn power_cut_loses_only_unflushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    plan.track_unsynced.store(true, Ordering::Relaxed);
    let a = blocks(21, 64);
    let b = blocks(22, 64);
    {
        let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        v.flush().unwrap();
        v.write(32 * 4096, &b, false).unwrap();
        pool.halt();
    }
    let files = FileSet::open(&[dev0(dir.path())]).unwrap();
    FaultDevices::power_cut(&plan, &files, CutMode::LoseAll).unwrap();
    drop(files);
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    let v = pool.volume("v").unwrap();
    let got = v.read(0, 96 * 4096).unwrap();
    same!(&got[..32 * BLOCK], &a[..32 * BLOCK]);
    // Blocks 32..64 were overwritten after the flush: all old (the write is lost).
    same!(&got[32 * BLOCK..64 * BLOCK], &a[32 * BLOCK..]);
    same!(&got[64 * BLOCK..], vec![0u8; 32 * BLOCK]);
    assert_clean(&pool);
}

/// A flushed record in the middle of the log whose payload rotted: replay keeps it (a later
/// record says it was flushed, so it is corruption, not a torn tail), reads of the block fail
/// with a checksum error, `check` reports it, and the later records are all replayed.
#[test]
fn corrupt_flushed_record_in_the_middle_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let a = blocks(31, 4);
    let b = blocks(32, 4);
    let c = blocks(33, 4);
    {
        let pool = create(dir.path(), 64 << 20, None);
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        v.flush().unwrap();
        v.write(10 * 4096, &b, false).unwrap();
        v.flush().unwrap();
        // Acknowledged, not flushed: the process dies, the OS keeps it.
        v.write(20 * 4096, &c, false).unwrap();
        pool.halt();
    }
    let at = the_block(dir.path(), &a[BLOCK..2 * BLOCK]);
    patch(dir.path(), at, |blk| blk[7] ^= 0x80);
    let pool = Pool::open(dir.path(), &opts(None)).expect("reopen");
    let v = pool.volume("v").unwrap();
    match v.read(4096, 4096) {
        Err(Error::ChecksumMismatch { .. }) => {}
        other => panic!("read of the corrupted block: {other:?}"),
    }
    same!(v.read(0, 4096).unwrap(), a[..BLOCK]);
    same!(v.read(2 * 4096, 2 * 4096).unwrap(), a[2 * BLOCK..]);
    same!(
        v.read(10 * 4096, 4 * 4096).unwrap(),
        b,
        "later flushed record"
    );
    same!(
        v.read(20 * 4096, 4 * 4096).unwrap(),
        c,
        "later acknowledged record"
    );
    let report = pool.check(&mut |_, _| {});
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].kind, "checksum");
    assert!(report.problems[0].detail.contains("volume v block 1 "));
}

/// Records of 32 KiB and more are walked by their headers, their payloads read only where the
/// checksums decide. A large record that no later one declares flushed, written after another
/// large one, whose payloads were torn, is dropped; the flushed one before it stays.
#[test]
fn torn_large_record_after_a_large_one_is_dropped() {
    // Records held from the first walk of the log, and walked again to apply them.
    for hold in [PoolOptions::default().replay_hold_entries, 0] {
        let dir = tempfile::tempdir().unwrap();
        // Records of 64 blocks (260 KiB, past the walk's large-record size): the second is
        // walked by its header alone.
        let a = blocks(41, 64);
        let b = blocks(42, 64);
        {
            let pool = create(dir.path(), 64 << 20, None);
            pool.create_volume("v", 16 << 20).unwrap();
            let v = pool.volume("v").unwrap();
            v.write(0, &a, false).unwrap();
            v.flush().unwrap();
            v.write(100 * 4096, &b, false).unwrap();
            pool.halt();
        }
        for i in 32..64 {
            let at = the_block(dir.path(), &b[i * BLOCK..(i + 1) * BLOCK]);
            patch(dir.path(), at, |blk| blk.fill(0));
        }
        let pool = Pool::open(
            dir.path(),
            &PoolOptions {
                replay_hold_entries: hold,
                ..opts(None)
            },
        )
        .expect("reopen after a torn record");
        let v = pool.volume("v").unwrap();
        same!(v.read(0, 64 * 4096).unwrap(), a, "flushed data intact");
        same!(
            v.read(100 * 4096, 64 * 4096).unwrap(),
            vec![0u8; 64 * BLOCK],
            "the torn write is absent"
        );
        assert_clean(&pool);
    }
}

/// A large flushed record walked by its header whose payload rotted is kept (a later record
/// declares it flushed): reads of the block fail with a checksum error, `check` reports it,
/// and the records after it, large or small, flushed or only acknowledged, are replayed.
#[test]
fn corrupt_large_flushed_record_walked_by_its_header_is_kept() {
    // Records held from the first walk of the log, and walked again to apply them.
    for hold in [PoolOptions::default().replay_hold_entries, 0] {
        let dir = tempfile::tempdir().unwrap();
        let (a0, a, b, c) = (
            blocks(51, 64),
            blocks(52, 64),
            blocks(53, 64),
            blocks(54, 4),
        );
        {
            let pool = create(dir.path(), 64 << 20, None);
            pool.create_volume("v", 16 << 20).unwrap();
            let v = pool.volume("v").unwrap();
            for (lba, data) in [(0u64, &a0), (100, &a), (200, &b)] {
                v.write(lba * 4096, data, false).unwrap();
                v.flush().unwrap();
            }
            // Acknowledged, not flushed: the process dies, the OS keeps it.
            v.write(300 * 4096, &c, false).unwrap();
            pool.halt();
        }
        let at = the_block(dir.path(), &a[BLOCK..2 * BLOCK]);
        patch(dir.path(), at, |blk| blk[7] ^= 0x80);
        let pool = Pool::open(
            dir.path(),
            &PoolOptions {
                replay_hold_entries: hold,
                ..opts(None)
            },
        )
        .expect("reopen");
        let v = pool.volume("v").unwrap();
        match v.read(101 * 4096, 4096) {
            Err(Error::ChecksumMismatch { .. }) => {}
            other => panic!("read of the corrupted block: {other:?}"),
        }
        same!(v.read(0, 64 * 4096).unwrap(), a0);
        same!(v.read(100 * 4096, 4096).unwrap(), a[..BLOCK]);
        same!(v.read(102 * 4096, 62 * 4096).unwrap(), a[2 * BLOCK..]);
        same!(
            v.read(200 * 4096, 64 * 4096).unwrap(),
            b,
            "later flushed record"
        );
        same!(
            v.read(300 * 4096, 4 * 4096).unwrap(),
            c,
            "later acknowledged record"
        );
        let report = pool.check(&mut |_, _| {});
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].kind, "checksum");
        assert!(report.problems[0].detail.contains("volume v block 101 "));
    }
}

/// A flushed record whose header rotted cannot be replayed (its entries are unknown). The
/// records after it were flushed too: dropping them silently would lose acknowledged, flushed
/// writes, so the open must fail with `Corrupt` instead.
#[test]
fn corrupt_header_of_flushed_record_is_not_silently_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let a = blocks(41, 4);
    let b = blocks(42, 4);
    let c = blocks(43, 4);
    {
        let pool = create(dir.path(), 64 << 20, None);
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        v.flush().unwrap();
        v.write(10 * 4096, &b, false).unwrap();
        v.flush().unwrap();
        v.write(20 * 4096, &c, false).unwrap();
        pool.halt();
    }
    let first = the_block(dir.path(), &a[..BLOCK]);
    // One bit in the first entry of the record's header area.
    patch(dir.path(), first - BLOCK as u64, |blk| blk[64 + 9] ^= 0x01);
    match Pool::open(dir.path(), &opts(None)) {
        Err(Error::Corrupt { .. }) => {}
        Err(e) => panic!("open failed with an unexpected error: {e}"),
        Ok(pool) => {
            let v = pool.volume("v").unwrap();
            let got_b = v.read(10 * 4096, 4 * 4096).unwrap();
            panic!(
                "open succeeded; later flushed record {}",
                if got_b == b {
                    "kept"
                } else {
                    "silently dropped"
                }
            );
        }
    }
}

// ------------------------------------------------------------------ device errors

#[test]
fn write_and_read_errors_fail_the_request_and_the_pool_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    plan.track_unsynced.store(true, Ordering::Relaxed);
    let a = blocks(51, 8);
    let b = blocks(52, 8);
    let c = blocks(53, 8);
    let d = blocks(54, 8);
    {
        let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        v.flush().unwrap();

        plan.fail_writes.store(true, Ordering::Relaxed);
        let e = v.write(16 * 4096, &b, false).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Media);
        // A partial-block write (read-modify-write) fails the same way.
        let e = v.write(40 * 4096 + 512, &[5u8; 512], false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Media);
        plan.fail_writes.store(false, Ordering::Relaxed);

        // The failed records left a gap in the shard's chain; later writes still work, and the
        // next flush checkpoints so that they are recoverable.
        v.write(24 * 4096, &c, false).unwrap();
        v.flush().unwrap();
        v.write(32 * 4096, &d, false).unwrap();
        v.flush().unwrap();

        plan.fail_reads.store(true, Ordering::Relaxed);
        let e = v.read(0, 8 * 4096).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Media);
        plan.fail_reads.store(false, Ordering::Relaxed);
        same!(v.read(0, 8 * 4096).unwrap(), a);
        pool.halt();
    }
    let files = FileSet::open(&[dev0(dir.path())]).unwrap();
    FaultDevices::power_cut(&plan, &files, CutMode::LoseAll).unwrap();
    drop(files);
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    let v = pool.volume("v").unwrap();
    same!(v.read(0, 8 * 4096).unwrap(), a);
    same!(v.read(16 * 4096, 8 * 4096).unwrap(), vec![0u8; 8 * BLOCK]);
    same!(v.read(24 * 4096, 8 * 4096).unwrap(), c);
    same!(v.read(32 * 4096, 8 * 4096).unwrap(), d);
    same!(v.read(40 * 4096, 4096).unwrap(), vec![0u8; BLOCK]);
    assert_clean(&pool);
}

// ------------------------------------------------------------------ foreign and damaged files

fn made_pool(dir: &Path) -> Vec<u8> {
    let data = blocks(61, 16);
    let pool = create(dir, 64 << 20, None);
    pool.create_volume("v", 16 << 20).unwrap();
    pool.volume("v").unwrap().write(0, &data, false).unwrap();
    pool.shutdown().unwrap();
    data
}

fn open_err(dir: &Path) -> Error {
    match Pool::open(dir, &opts(None)) {
        Ok(_) => panic!("opened a damaged pool"),
        Err(e) => e,
    }
}

#[test]
fn random_bytes_are_not_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    made_pool(dir.path());
    let len = std::fs::metadata(dev0(dir.path())).unwrap().len() as usize;
    let mut x = 0x1234_5678_9abc_def1u64;
    let junk: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dev0(dir.path()), junk).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::NotAPool { .. }), "{e:?}");
}

#[test]
fn truncated_device_is_not_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    made_pool(dir.path());
    let f = OpenOptions::new()
        .write(true)
        .open(dev0(dir.path()))
        .unwrap();
    f.set_len(DATA_START + 5 * SEG).unwrap();
    let e = open_err(dir.path());
    match &e {
        Error::NotAPool { reason, .. } => assert!(reason.contains("truncated"), "{e}"),
        _ => panic!("{e:?}"),
    }
    f.set_len(4096).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::NotAPool { .. }), "{e:?}");
}

/// Rewrite a superblock copy with `f` applied, and a valid checksum.
fn edit_superblock(dir: &Path, slot: usize, f: impl FnOnce(&mut [u8])) {
    patch(dir, SUPERBLOCK_OFFSETS[slot], |b| {
        f(b);
        b[188..192].fill(0);
        let crc = crc32fast::hash(&b[..192]);
        b[188..192].copy_from_slice(&crc.to_le_bytes());
    });
}

fn generation(dir: &Path, slot: usize) -> u64 {
    let mut g = 0;
    patch(dir, SUPERBLOCK_OFFSETS[slot], |b| {
        g = u64::from_le_bytes(b[48..56].try_into().unwrap());
    });
    g
}

#[test]
fn future_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    made_pool(dir.path());
    for slot in 0..2 {
        edit_superblock(dir.path(), slot, |b| {
            b[8..12].copy_from_slice(&7u32.to_le_bytes())
        });
    }
    match open_err(dir.path()) {
        Error::UnsupportedVersion {
            found, supported, ..
        } => {
            assert_eq!(found, 7);
            assert_eq!(supported, ingot_engine::format::FORMAT_VERSION_PAGED);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn one_bad_superblock_copy_opens_from_the_other() {
    for slot in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let data = made_pool(dir.path());
        // A commit points both copies at the newest checkpoint, one after the other.
        let (g0, g1) = (generation(dir.path(), 0), generation(dir.path(), 1));
        assert_eq!(g0, g1, "both superblock copies hold the newest generation");
        patch(dir.path(), SUPERBLOCK_OFFSETS[slot], |b| b[50] ^= 0x04);
        let pool = Pool::open(dir.path(), &opts(None))
            .unwrap_or_else(|e| panic!("open with superblock copy {slot} corrupted: {e}"));
        same!(pool.volume("v").unwrap().read(0, 16 * 4096).unwrap(), data);
        assert_clean(&pool);
        drop(pool);
        // Both copies are good again.
        drop(Pool::open(dir.path(), &opts(None)).unwrap());
        patch(dir.path(), SUPERBLOCK_OFFSETS[1 - slot], |b| b[50] ^= 0x04);
        let pool = Pool::open(dir.path(), &opts(None)).unwrap();
        same!(pool.volume("v").unwrap().read(0, 16 * 4096).unwrap(), data);
    }
}

#[test]
fn garbage_pool_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    made_pool(dir.path());
    std::fs::write(dir.path().join("pool.json"), b"{ this is not json").unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::NotAPool { .. }), "{e:?}");
    assert!(e.to_string().contains("pool.json"), "{e}");
    std::fs::remove_file(dir.path().join("pool.json")).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::NotAPool { .. }), "{e:?}");
}

#[test]
fn a_pool_open_elsewhere_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    made_pool(dir.path());
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, Error::Locked { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Busy);
    drop(pool);
    Pool::open(dir.path(), &opts(None)).expect("open once the other is closed");
}

// ------------------------------------------------------------------ full pool

#[test]
fn full_pool_fails_writes_with_enospc_and_recovers_after_trim() {
    within(120, || {
        let dir = tempfile::tempdir().unwrap();
        let pool = create(dir.path(), 32 << 20, None);
        pool.create_volume("v", 256 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        const CHUNK: usize = 256 << 10;
        let mut written = 0u64;
        let err = loop {
            let data = blocks(1000 + written, CHUNK / BLOCK);
            match v.write(written * CHUNK as u64, &data, false) {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 1024, "a 32 MiB pool took 256 MiB");
        };
        assert!(matches!(err, Error::NoSpace), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        assert!(
            written * CHUNK as u64 >= 8 << 20,
            "only {written} chunks fit"
        );
        // Flush still works.
        v.flush().unwrap();
        // Everything acknowledged reads back.
        for i in 0..written {
            let got = v.read(i * CHUNK as u64, CHUNK as u32).unwrap();
            assert!(got == blocks(1000 + i, CHUNK / BLOCK), "chunk {i}");
        }
        assert_clean(&pool);
        // Free space and write again.
        v.trim(0, 256 << 20, false).unwrap();
        pool.checkpoint().unwrap();
        let data = blocks(77, CHUNK / BLOCK);
        v.write(0, &data, false).unwrap();
        same!(v.read(0, CHUNK as u32).unwrap(), data);
        // And fill it again (with distinct chunks: equal ones would deduplicate), then restart.
        let refill = |i: u64| {
            if i == 0 {
                data.clone()
            } else {
                blocks(5000 + i, CHUNK / BLOCK)
            }
        };
        let mut again = 1u64;
        while v.write(again * CHUNK as u64, &refill(again), false).is_ok() {
            again += 1;
            assert!(again < 1024);
        }
        assert!(
            again * 2 >= written,
            "refilled {again} chunks, first fill {written}"
        );
        // A full pool opens again after a clean shutdown and after a crash.
        drop(pool);
        let pool = Pool::open(dir.path(), &opts(None)).unwrap();
        let v = pool.volume("v").unwrap();
        same!(v.read(0, CHUNK as u32).unwrap(), data);
        assert_clean(&pool);
        while v.write(again * CHUNK as u64, &refill(again), false).is_ok() {
            again += 1;
            assert!(again < 1024);
        }
        let mut pool = pool;
        for round in 0..4 {
            if round % 2 == 0 {
                pool.halt();
            }
            drop(pool);
            pool = Pool::open(dir.path(), &opts(None))
                .unwrap_or_else(|e| panic!("reopen {round} of a full pool: {e}"));
            let v = pool.volume("v").unwrap();
            for i in 0..again {
                assert!(v.read(i * CHUNK as u64, CHUNK as u32).unwrap() == refill(i));
            }
            assert_clean(&pool);
            // Overwrites may or may not fit; they must fail cleanly if not.
            match v.write(0, &data, false) {
                Ok(()) | Err(Error::NoSpace) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
    });
}

/// `Pool::flush` after a failed write: the records after the gap must be recoverable.
#[test]
fn pool_flush_after_a_failed_write_makes_later_writes_durable() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let c = blocks(71, 4);
    {
        let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        plan.fail_writes.store(true, Ordering::Relaxed);
        assert!(v.write(0, &blocks(70, 4), false).is_err());
        plan.fail_writes.store(false, Ordering::Relaxed);
        v.write(8 * 4096, &c, false).unwrap();
        pool.flush().unwrap();
        pool.halt();
    }
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(
        v.read(8 * 4096, 4 * 4096).unwrap() == c,
        "flushed write lost"
    );
    assert!(v.read(0, 4 * 4096).unwrap() == vec![0u8; 4 * BLOCK]);
    assert_clean(&pool);
}

/// Found by the model: a refused volume operation (here: create of an existing name) paused the
/// shards, marked a broken chain repaired and returned without a checkpoint; the next FUA
/// write only synced and was lost at a power cut.
#[test]
fn refused_volume_operation_does_not_hide_a_broken_chain() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    plan.track_unsynced.store(true, Ordering::Relaxed);
    let c = blocks(81, 4);
    {
        let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        plan.fail_writes.store(true, Ordering::Relaxed);
        assert!(v.write(0, &blocks(80, 1), false).is_err());
        plan.fail_writes.store(false, Ordering::Relaxed);
        assert!(matches!(
            pool.create_volume("v", 1 << 20),
            Err(Error::VolumeExists(_))
        ));
        v.write(8 * 4096, &c, true).unwrap();
        pool.halt();
    }
    let files = FileSet::open(&[dev0(dir.path())]).unwrap();
    FaultDevices::power_cut(&plan, &files, CutMode::LoseAll).unwrap();
    drop(files);
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    same!(
        pool.volume("v").unwrap().read(8 * 4096, 4 * 4096).unwrap(),
        c,
        "FUA write lost"
    );
    assert_clean(&pool);
}

/// After a failed write, later acknowledged writes survive a process crash (the OS keeps what
/// was written) even before any flush or checkpoint: replay must not stop at the failed
/// record's hole.
#[test]
fn acknowledged_writes_after_a_failed_write_survive_a_process_crash() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let a = blocks(91, 4);
    let c = blocks(92, 4);
    let d = blocks(93, 300);
    {
        let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        plan.fail_writes.store(true, Ordering::Relaxed);
        assert!(v.write(16 * 4096, &blocks(90, 4), false).is_err());
        plan.fail_writes.store(false, Ordering::Relaxed);
        v.write(32 * 4096, &c, false).unwrap();
        // More than one record, also crossing into the other shard's stripe.
        v.write(64 * 4096, &d, false).unwrap();
        pool.halt();
    }
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    let v = pool.volume("v").unwrap();
    same!(v.read(0, 4 * 4096).unwrap(), a);
    same!(v.read(16 * 4096, 4 * 4096).unwrap(), vec![0u8; 4 * BLOCK]);
    same!(
        v.read(32 * 4096, 4 * 4096).unwrap(),
        c,
        "acknowledged write lost"
    );
    same!(
        v.read(64 * 4096, 300 * 4096).unwrap(),
        d,
        "acknowledged write lost"
    );
    assert_clean(&pool);
}

/// A write that fails just as its shard moves to a new segment also fails that segment's
/// header; the acknowledged writes that follow in the segment must still be found by replay
/// after a process crash.
#[test]
fn failed_segment_header_does_not_lose_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    const CHUNK: usize = 256 << 10;
    let later = blocks(101, CHUNK / BLOCK);
    {
        let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        // Seven records of 260 KiB fill shard 0's 2 MiB segment; the eighth does not fit.
        for i in 0..7u64 {
            v.write(i * CHUNK as u64, &blocks(200 + i, CHUNK / BLOCK), false)
                .unwrap();
        }
        plan.fail_writes.store(true, Ordering::Relaxed);
        assert!(v
            .write(7 * CHUNK as u64, &blocks(207, CHUNK / BLOCK), false)
            .is_err());
        plan.fail_writes.store(false, Ordering::Relaxed);
        // Shard 0 again (stripes of 2 MiB alternate between the two shards).
        v.write(4 << 20, &later, false).unwrap();
        pool.halt();
    }
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    let v = pool.volume("v").unwrap();
    for i in 0..7u64 {
        same!(
            v.read(i * CHUNK as u64, CHUNK as u32).unwrap(),
            blocks(200 + i, CHUNK / BLOCK)
        );
    }
    same!(
        v.read(4 << 20, CHUNK as u32).unwrap(),
        later,
        "acknowledged write lost"
    );
    assert_clean(&pool);
}

/// A bug that kills an engine thread (injected: a shard panics as it submits a record) stops
/// the pool instead of leaving clients waiting: every request in flight is answered, later
/// ones fail with `Halted`, no checkpoint is written from the broken state, and what was
/// flushed before is all there after a restart.
#[test]
fn a_failed_engine_thread_answers_every_request_and_loses_nothing_flushed() {
    // io_uring too: its queue, dropped with records in flight, must wait for them first.
    for io in [IoKind::Sync, IoKind::Uring] {
        failed_engine_thread(io);
    }
}

fn failed_engine_thread(io: IoKind) {
    use ingot_engine::Request;
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let a = blocks(101, 64);
    let o = |plan| PoolOptions { io, ..opts(plan) };
    {
        let c = CreateOptions {
            size_bytes: 64 << 20,
            segment_bytes: SEG,
            ..Default::default()
        };
        let pool = Pool::create(dir.path(), &c, &o(Some(plan.clone()))).unwrap();
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        pool.flush().unwrap();
        plan.panic_on_submit.store(true, Ordering::Release);
        let (tx, rx) = crossbeam_channel::unbounded();
        let n = 64u64;
        for i in 0..n {
            let tx = tx.clone();
            let data = bytes::Bytes::from(block(200 + i));
            let req = Request::Write {
                offset: (128 + i * 3) * 4096,
                data,
                fua: i % 2 == 0,
            };
            v.submit(req, Box::new(move |r| tx.send(r.map(|_| ())).unwrap()));
        }
        let mut failed = 0;
        for _ in 0..n {
            let r = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a request left unanswered after an engine thread failed");
            failed += usize::from(r.is_err());
        }
        assert!(failed > 0, "the injected failure hit no request");
        let halted = pool.stats().halted.expect("stats report the halt");
        assert!(halted.contains("ingot-shard"), "{halted}");
        assert!(matches!(
            v.write(0, &block(1), false),
            Err(Error::Halted { .. })
        ));
        assert!(matches!(v.read(0, 4096), Err(Error::Halted { .. })));
        assert!(pool.flush().is_err());
        assert!(matches!(pool.shutdown(), Err(Error::Halted { .. })));
    }
    let pool = Pool::open(dir.path(), &o(None)).unwrap();
    let v = pool.volume("v").unwrap();
    same!(v.read(0, 64 * 4096).unwrap(), a, "flushed data lost");
    assert_clean(&pool);
}

/// A read error while replaying the log is reported with its device and offset. Taken for the
/// end of the log, it would drop the flushed records after it without a word.
#[test]
fn read_error_during_replay_fails_the_open_and_names_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let a = blocks(120, 8);
    {
        let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
        pool.create_volume("v", 16 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &a, false).unwrap();
        v.flush().unwrap();
        pool.halt();
    }
    let at = the_block(dir.path(), &a[..BLOCK]);
    plan.fail_reads_in.lock().push((0, at, BLOCK as u64));
    match Pool::open(dir.path(), &opts(Some(plan.clone()))) {
        Err(Error::Io { device, offset, .. }) => {
            assert_eq!(device, 0);
            assert!(
                offset <= at,
                "the failed read starts at {offset}, the block at {at}"
            );
        }
        Err(e) => panic!("open failed with an unexpected error: {e}"),
        Ok(pool) => {
            let kept = pool.volume("v").unwrap().read(0, 8 * 4096).unwrap() == a;
            panic!("open succeeded past a read error (flushed data kept: {kept})");
        }
    }
    plan.fail_reads_in.lock().clear();
    let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
    same!(pool.volume("v").unwrap().read(0, 8 * 4096).unwrap(), a);
    assert_clean(&pool);
}

/// A checkpoint whose sync (or whose metadata writes) fail: the checkpoint reports the error,
/// the pool goes on, and after a power cut everything flushed before and after is there.
#[test]
fn failed_sync_or_metadata_write_during_a_checkpoint_loses_nothing_flushed() {
    for fail_sync in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        plan.track_unsynced.store(true, Ordering::Relaxed);
        let a = blocks(130, 8);
        let b = blocks(131, 8);
        let c = blocks(132, 8);
        {
            let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
            pool.create_volume("v", 16 << 20).unwrap();
            let v = pool.volume("v").unwrap();
            v.write(0, &a, false).unwrap();
            v.flush().unwrap();
            v.write(8 * 4096, &b, false).unwrap();
            let knob = if fail_sync {
                &plan.fail_sync
            } else {
                &plan.fail_metadata_writes
            };
            knob.store(true, Ordering::Relaxed);
            assert!(
                pool.checkpoint().is_err(),
                "the checkpoint must report the failure"
            );
            knob.store(false, Ordering::Relaxed);
            v.write(16 * 4096, &c, false).unwrap();
            v.flush().unwrap();
            pool.halt();
        }
        let files = FileSet::open(&[dev0(dir.path())]).unwrap();
        FaultDevices::power_cut(&plan, &files, CutMode::LoseAll).unwrap();
        drop(files);
        let pool = Pool::open(dir.path(), &opts(Some(plan))).unwrap();
        let v = pool.volume("v").unwrap();
        same!(
            v.read(0, 8 * 4096).unwrap(),
            a,
            "flushed before the failed checkpoint"
        );
        same!(v.read(8 * 4096, 8 * 4096).unwrap(), b, "flushed after it");
        same!(v.read(16 * 4096, 8 * 4096).unwrap(), c, "flushed after it");
        assert_clean(&pool);
    }
}

/// Volume `v` of `pool` with `a` at block 0, flushed and checkpointed: that checkpoint's
/// generation, which both superblock slots hold.
fn checkpointed(dir: &Path, pool: &Pool, a: &[u8]) -> (ingot_engine::Volume, u64) {
    pool.create_volume("v", 16 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    v.write(0, a, false).unwrap();
    v.flush().unwrap();
    pool.checkpoint().unwrap();
    let g = generation(dir, 0);
    assert_eq!(g, generation(dir, 1), "both slots at the same checkpoint");
    (v, g)
}

/// Flip a bit in the blob of the checkpoint superblock slot `slot` of device 0 points at
/// (segments are numbered across `devs`, device 0 holding the first ones).
fn rot_checkpoint(dir: &Path, slot: usize, devs: &[PathBuf]) {
    let mut seg = 0u64;
    patch(dir, SUPERBLOCK_OFFSETS[slot], |blk| {
        seg = u64::from(u32::from_le_bytes(blk[76..80].try_into().unwrap()));
    });
    let mut file = 0;
    loop {
        let segs = (std::fs::metadata(&devs[file]).unwrap().len() - DATA_START) / SEG;
        if seg < segs {
            break;
        }
        seg -= segs;
        file += 1;
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&devs[file])
        .unwrap();
    let mut blk = vec![0u8; BLOCK];
    let off = DATA_START + seg * SEG + 4096;
    f.read_exact_at(&mut blk, off).unwrap();
    blk[10] ^= 0x40;
    f.write_all_at(&blk, off).unwrap();
    f.sync_all().unwrap();
}

/// The pool in `dir` opens (from the previous checkpoint) with `a` and `b`, written before and
/// after it, intact.
fn opens_from_the_previous_checkpoint(dir: &Path, a: &[u8], b: &[u8]) {
    let pool = Pool::open(dir, &opts(None)).expect("open from the previous checkpoint");
    let v = pool.volume("v").unwrap();
    same!(v.read(0, 8 * 4096).unwrap(), a);
    same!(
        v.read(8 * 4096, 8 * 4096).unwrap(),
        b,
        "flushed after the previous checkpoint"
    );
    assert_clean(&pool);
}

/// A commit whose first superblock write fails on the second device, after the first device
/// took the new generation: the commit reports the failure and frees the new checkpoint's
/// segments, which later writes may reuse. The next open finds generation g + 1 on device 0,
/// its checkpoint overwritten, and g in both slots of device 1: it opens from g (which every
/// device holds) and replays the log since, losing nothing flushed.
#[test]
fn a_superblock_write_failing_on_one_device_falls_back_to_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let (a, b) = (blocks(150, 8), blocks(151, 8));
    let devs = [dir.path().join("dev0.img"), dir.path().join("dev1.img")];
    let c = CreateOptions {
        size_bytes: 128 << 20,
        segment_bytes: SEG,
        devices: devs.to_vec(),
        ..Default::default()
    };
    let pool = Pool::create(dir.path(), &c, &opts(Some(plan.clone()))).expect("create pool");
    let (v, g) = checkpointed(dir.path(), &pool, &a);
    // A commit of generation g + 1 writes slot (g + 1) % 2 of every device first.
    let first = ((g + 1) % 2) as usize;
    plan.fail_writes_at
        .lock()
        .push((1, SUPERBLOCK_OFFSETS[first]));
    v.write(8 * 4096, &b, false).unwrap();
    v.flush().unwrap();
    assert!(
        pool.checkpoint().is_err(),
        "device 1's superblock write failed"
    );
    pool.halt();
    drop((v, pool));
    plan.fail_writes_at.lock().clear();
    assert_eq!(generation(dir.path(), first), g + 1, "device 0 took g + 1");
    // The freed segments of g + 1 are reused: its blob no longer reads back.
    rot_checkpoint(dir.path(), first, &devs);
    opens_from_the_previous_checkpoint(dir.path(), &a, &b);
}

/// A commit whose second superblock slot write fails (the other slot still points at the
/// previous checkpoint, as after a crash between the two writes), then the newest checkpoint
/// rots: the pool opens from the previous checkpoint and replays the log since, losing nothing
/// flushed.
#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let a = blocks(140, 8);
    let b = blocks(141, 8);
    let pool = create(dir.path(), 64 << 20, Some(plan.clone()));
    let (v, g) = checkpointed(dir.path(), &pool, &a);
    // The slot a commit of generation g + 1 writes second fails.
    let second = (g % 2) as usize;
    plan.fail_writes_at
        .lock()
        .push((0, SUPERBLOCK_OFFSETS[second]));
    v.write(8 * 4096, &b, false).unwrap();
    v.flush().unwrap();
    assert!(pool.checkpoint().is_err(), "the second slot write failed");
    pool.halt();
    drop((v, pool));
    plan.fail_writes_at.lock().clear();
    assert_eq!(generation(dir.path(), second), g);
    assert_eq!(generation(dir.path(), 1 - second), g + 1);
    // Then the newest checkpoint's blob rots.
    rot_checkpoint(dir.path(), 1 - second, &[dev0(dir.path())]);
    opens_from_the_previous_checkpoint(dir.path(), &a, &b);
    // The recovery checkpoint replaced the damaged one: later opens need no fallback.
    let pool = Pool::open(dir.path(), &opts(None)).unwrap();
    same!(
        pool.volume("v").unwrap().read(8 * 4096, 8 * 4096).unwrap(),
        b
    );
}
