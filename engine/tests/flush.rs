//! Flushes and FUA writes answered by a shard (`shard/flush.rs`): a flush that one shard
//! answers syncs every device, covers what the other shards stored and what was acknowledged
//! early, reports a failed sync, and under concurrent writers and flushes nothing a flush
//! covered is lost to a power cut (each write not synced is undone).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ingot_engine::io::fault::FaultDevices;
use ingot_engine::io::sync::FileSet;
use ingot_engine::{CreateOptions, CutMode, FaultPlan, IoKind, Pool, PoolOptions};

const BLOCK: usize = 4096;
/// Blocks per map page: each page belongs to one shard, in turn.
const PAGE: u64 = 512;
const VOL_BLOCKS: u64 = 8 * PAGE;

fn opts(io: IoKind, plan: &Arc<FaultPlan>) -> PoolOptions {
    PoolOptions {
        io,
        shards: 2,
        cache_bytes: Some(1 << 20),
        fault: Some(plan.clone()),
        write_back_bytes: 8 << 20,
        ..Default::default()
    }
}

/// The pool's devices: two, unless `one_device` made it with one.
fn devices(dir: &Path) -> Vec<PathBuf> {
    let all = [dir.join("dev0.img"), dir.join("dev1.img")];
    if all[1].exists() || !all[0].exists() {
        all.to_vec()
    } else {
        vec![all[0].clone()]
    }
}

/// A pool on two devices (the sync must reach both) with volume `v`.
fn create(dir: &Path, o: &PoolOptions) -> Pool {
    create_on(dir, o, devices(dir))
}

fn create_on(dir: &Path, o: &PoolOptions, devices: Vec<PathBuf>) -> Pool {
    let c = CreateOptions {
        size_bytes: 256 << 20,
        segment_bytes: 2 << 20,
        devices,
        ..Default::default()
    };
    let pool = Pool::create(dir, &c, o).expect("create");
    pool.create_volume("v", VOL_BLOCKS * BLOCK as u64)
        .expect("volume");
    pool
}

fn tracking_plan() -> Arc<FaultPlan> {
    let plan = FaultPlan::new();
    plan.track_unsynced.store(true, Ordering::Relaxed);
    plan
}

/// A two-device pool with volume `v` on engine `io`, its fault plan tracking unsynced writes.
fn setup(io: IoKind) -> (tempfile::TempDir, Arc<FaultPlan>, PoolOptions, Pool) {
    let dir = tempfile::tempdir().unwrap();
    let plan = tracking_plan();
    let o = opts(io, &plan);
    let pool = create(dir.path(), &o);
    (dir, plan, o, pool)
}

/// Block `lba` at version `n`: unique, incompressible.
fn block(lba: u64, n: u64) -> Vec<u8> {
    common::xorshift_block(lba << 20 | n)
}

fn blocks(first: u64, count: u64, n: u64) -> Vec<u8> {
    (first..first + count).flat_map(|l| block(l, n)).collect()
}

/// Stop without a checkpoint, undo every write no sync covered, open again.
fn cut_power_and_reopen(pool: Pool, dir: &Path, plan: &Arc<FaultPlan>, o: &PoolOptions) -> Pool {
    pool.halt();
    drop(pool);
    let files = FileSet::open(&devices(dir)).unwrap();
    FaultDevices::power_cut(plan, &files, CutMode::LoseAll).unwrap();
    drop(files);
    Pool::open(dir, o).expect("open after the power cut")
}

fn read_block(v: &ingot_engine::Volume, lba: u64) -> Vec<u8> {
    v.read(lba * BLOCK as u64, BLOCK as u32).unwrap()
}

/// Shard 1 stores a large write (acknowledged once stored, not synced), shard 0 takes an
/// early write, then a flush: shard 0 alone holds early writes, answers it, and its sync must
/// cover shard 1's write on both devices.
fn one_shard_flush_covers_every_device(io: IoKind) {
    let (dir, plan, o, pool) = setup(io);
    let v = pool.volume("v").unwrap();
    // 512 KiB: over the write-back cap, so stored before its reply.
    let large = 128;
    for round in 0..16u64 {
        let at = PAGE + (round % 4) * large;
        v.write(at * BLOCK as u64, &blocks(at, large, round + 1), false)
            .unwrap();
        v.write(round * BLOCK as u64, &block(round, 1), false)
            .unwrap();
        v.flush().unwrap();
    }
    // Not flushed: may be lost.
    v.write(0, &block(0, 99), false).unwrap();
    let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
    let v = pool.volume("v").unwrap();
    for round in 0..16u64 {
        let got = read_block(&v, round);
        assert!(
            got == block(round, 1) || (round == 0 && got == block(0, 99)),
            "early write {round} lost after its flush"
        );
    }
    for slot in 0..4u64 {
        let last_round = 12 + slot;
        let at = PAGE + slot * large;
        let got = v
            .read(at * BLOCK as u64, (large as usize * BLOCK) as u32)
            .unwrap();
        assert!(
            got == blocks(at, large, last_round + 1),
            "shard 1's stored write at block {at} lost after a flush shard 0 answered"
        );
    }
    assert!(pool.check(&mut |_, _| {}).problems.is_empty());
}

/// FUA writes (flushed on the shard that completes them) survive a power cut without a flush.
fn fua_writes_survive_a_power_cut(io: IoKind) {
    let (dir, plan, o, pool) = setup(io);
    let v = pool.volume("v").unwrap();
    // Single blocks on either shard, and one write spanning both.
    for lba in (0..2 * PAGE).step_by(37) {
        v.write(lba * BLOCK as u64, &block(lba, 3), true).unwrap();
    }
    let span = PAGE - 4;
    v.write(span * BLOCK as u64, &blocks(span, 8, 4), true)
        .unwrap();
    let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
    let v = pool.volume("v").unwrap();
    for lba in (0..2 * PAGE).step_by(37) {
        if (span..span + 8).contains(&lba) {
            continue;
        }
        assert!(
            read_block(&v, lba) == block(lba, 3),
            "FUA write at {lba} lost"
        );
    }
    let got = v.read(span * BLOCK as u64, 8 * BLOCK as u32).unwrap();
    assert!(
        got == blocks(span, 8, 4),
        "FUA write across both shards lost"
    );
}

/// A device sync that fails fails the flush (and the FUA write): never a false success.
#[test]
fn a_failed_sync_fails_the_flush_a_shard_answers() {
    for io in [IoKind::Sync, IoKind::Uring] {
        let (dir, plan, o, pool) = setup(io);
        let v = pool.volume("v").unwrap();
        plan.fail_sync.store(true, Ordering::Relaxed);
        v.write(0, &block(0, 1), false).unwrap();
        let e = v.flush().expect_err("the sync failed");
        assert!(e.to_string().contains("sync"), "{e}");
        assert!(v.write(BLOCK as u64, &block(1, 1), true).is_err());
        plan.fail_sync.store(false, Ordering::Relaxed);
        v.flush().expect("the sync works again");
        let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
        let v = pool.volume("v").unwrap();
        assert!(read_block(&v, 0) == block(0, 1));
    }
}

/// The same on a one-device pool, and what the flush covered survives a power cut.
#[test]
fn a_failed_sync_fails_the_flush_on_one_device() {
    for io in [IoKind::Sync, IoKind::Uring] {
        let dir = tempfile::tempdir().unwrap();
        let plan = tracking_plan();
        let o = opts(io, &plan);
        let pool = create_on(dir.path(), &o, vec![dir.path().join("dev0.img")]);
        let v = pool.volume("v").unwrap();
        plan.fail_sync.store(true, Ordering::Relaxed);
        v.write(0, &block(0, 1), false).unwrap();
        let e = v.flush().expect_err("the sync failed");
        assert!(e.to_string().contains("sync"), "{e}");
        plan.fail_sync.store(false, Ordering::Relaxed);
        v.write(BLOCK as u64, &block(1, 1), false).unwrap();
        v.flush().expect("the sync works again");
        let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
        let v = pool.volume("v").unwrap();
        assert!(read_block(&v, 0) == block(0, 1));
        assert!(read_block(&v, 1) == block(1, 1));
    }
}

/// The same with the shards busy (writes wait in their channels when the flush is taken): the
/// failed sync fails the flush; once syncs work again, so do flushes, and what they covered
/// survives a power cut.
#[test]
fn a_failed_sync_fails_the_flush_of_a_busy_shard() {
    for io in [IoKind::Sync, IoKind::Uring] {
        let (dir, plan, o, pool) = setup(io);
        let v = pool.volume("v").unwrap();
        // Every submission of a write is held back: the shards fall behind their messages.
        plan.write_submit_delay_us.store(3_000, Ordering::SeqCst);
        plan.fail_sync.store(true, Ordering::Relaxed);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let busy = pool.volume("v").unwrap();
            let stop = &stop;
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let lba = PAGE + n % (2 * PAGE);
                    busy.write(lba * BLOCK as u64, &block(lba, n), false)
                        .unwrap();
                }
            });
            // Asserted once the writer has stopped, so that a failure does not hang the test.
            let flushed: Vec<_> = (1..=5u64)
                .map(|n| {
                    v.write(0, &block(0, n), false).unwrap();
                    v.flush()
                })
                .collect();
            stop.store(true, Ordering::Relaxed);
            for r in flushed {
                let e = r.expect_err("the sync failed");
                assert!(e.to_string().contains("sync"), "{e}");
            }
        });
        plan.write_submit_delay_us.store(0, Ordering::SeqCst);
        plan.fail_sync.store(false, Ordering::Relaxed);
        v.write(0, &block(0, 9), false).unwrap();
        v.flush().expect("the sync works again");
        let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
        let v = pool.volume("v").unwrap();
        assert!(read_block(&v, 0) == block(0, 9));
    }
}

/// Writers on both shards and flushes from several threads at once (so flushes take every
/// route: one shard holding early writes, both, neither), then a power cut: every write a
/// completed flush covered reads back at that version or a later one.
fn concurrent_flushes_lose_nothing(io: IoKind, seed: u64) {
    let (dir, plan, o, pool) = setup(io);
    let threads = 4u64;
    let rounds = 150u64;
    // Each thread owns blocks `t, t + threads, ...` on both shards' pages.
    let flushed: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let v = pool.volume("v").unwrap();
                s.spawn(move || {
                    let mut x = (seed ^ (t + 1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    let mut written = std::collections::HashMap::new();
                    let mut durable = Vec::new();
                    for n in 1..=rounds {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let lba = (x % (VOL_BLOCKS / threads)) * threads + t;
                        v.write(lba * BLOCK as u64, &block(lba, n), x % 11 == 0)
                            .unwrap();
                        written.insert(lba, n);
                        if x % 3 == 0 {
                            v.flush().unwrap();
                            durable.extend(written.drain());
                        }
                    }
                    durable
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
    let v = pool.volume("v").unwrap();
    for per_thread in flushed {
        let mut newest = std::collections::HashMap::new();
        for (lba, n) in per_thread {
            let e = newest.entry(lba).or_insert(n);
            *e = (*e).max(n);
        }
        for (lba, n) in newest {
            let got = read_block(&v, lba);
            assert!(
                (n..=rounds).any(|m| got == block(lba, m)),
                "block {lba}: version {n} was flushed, the pool holds an older one"
            );
        }
    }
    assert!(pool.check(&mut |_, _| {}).problems.is_empty());
}

#[test]
fn concurrent_flushes_lose_nothing_sync() {
    for seed in 1..=3 {
        concurrent_flushes_lose_nothing(IoKind::Sync, seed);
    }
}

#[test]
fn concurrent_flushes_lose_nothing_uring() {
    for seed in 1..=3 {
        concurrent_flushes_lose_nothing(IoKind::Uring, seed);
    }
}

/// Early writes on shard 1 (256 KiB, the largest acknowledged early: slower to store), then a
/// 4 KiB write on shard 0 and a commit, a flush or the write's own FUA: both must wait for
/// shard 1's write, as a flush covers what was acknowledged before it (a commit answered by
/// shard 0 alone would return before shard 1's write is stored).
fn early_writes_on_the_other_shard_survive_a_commit(io: IoKind, fua: bool) {
    let (dir, plan, o, pool) = setup(io);
    let v = pool.volume("v").unwrap();
    let large = 64;
    // Shard 1 owns the odd pages.
    let at = |round: u64| (2 * (round / 8) + 1) * PAGE + (round % 8) * large;
    let rounds = 32;
    for round in 0..rounds {
        v.write(
            at(round) * BLOCK as u64,
            &blocks(at(round), large, 7),
            false,
        )
        .unwrap();
        v.write(round * BLOCK as u64, &block(round, 7), fua)
            .unwrap();
        if !fua {
            v.flush().unwrap();
        }
    }
    let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
    let v = pool.volume("v").unwrap();
    for round in 0..rounds {
        let got = v
            .read(at(round) * BLOCK as u64, (large as usize * BLOCK) as u32)
            .unwrap();
        assert!(
            got == blocks(at(round), large, 7),
            "round {round}: shard 1's early write lost after a commit (FUA: {fua})"
        );
        assert!(read_block(&v, round) == block(round, 7));
    }
}

fn a_flush_waits_for_early_writes_on_every_shard(io: IoKind) {
    early_writes_on_the_other_shard_survive_a_commit(io, false);
}

fn a_fua_write_covers_early_writes_on_another_shard(io: IoKind) {
    early_writes_on_the_other_shard_survive_a_commit(io, true);
}

/// A FUA write racing a checkpoint, again and again: a FUA write whose record completes
/// while its shard drains for the pause must still be flushed and answered, with nothing
/// else arriving to wake the shard (its flush was once left queued on a shard that slept).
#[test]
fn fua_writes_racing_checkpoints_all_complete() {
    for io in [IoKind::Sync, IoKind::Uring] {
        let (dir, plan, o, pool) = setup(io);
        let v = pool.volume("v").unwrap();
        let rounds = 150u64;
        for n in 0..rounds {
            let lba = (n * 131) % VOL_BLOCKS;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::scope(|s| {
                let tx2 = tx.clone();
                let pool = &pool;
                s.spawn(move || {
                    pool.checkpoint().unwrap();
                    tx2.send(()).unwrap();
                });
                let v = &v;
                s.spawn(move || {
                    v.write(lba * BLOCK as u64, &block(lba, n), true).unwrap();
                    tx.send(()).unwrap();
                });
                for _ in 0..2 {
                    if rx.recv_timeout(std::time::Duration::from_secs(10)).is_err() {
                        // Unstick the waiter so the scope can end, then fail.
                        let _ = pool.volume("v").unwrap().write(0, &block(0, 0), false);
                        panic!("round {n}: a FUA write or checkpoint got no answer in 10 s");
                    }
                }
            });
        }
        drop(v);
        let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
        let v = pool.volume("v").unwrap();
        for n in 0..rounds {
            let lba = (n * 131) % VOL_BLOCKS;
            if !(n + 1..rounds).any(|m| (m * 131) % VOL_BLOCKS == lba) {
                assert!(read_block(&v, lba) == block(lba, n), "FUA write {n} lost");
            }
        }
    }
}

/// A flush-heavy shard zeroes its next segment ahead of use; the zeroes reach the device
/// late (held back by the fault devices). The chain must not roll into that segment before
/// they land, or they would wipe the records written there: after a burst that rolls into
/// it, a flush and a power cut, everything flushed reads back.
fn zeroes_ahead_never_land_over_records(io: IoKind) {
    let dir = tempfile::tempdir().unwrap();
    let plan = tracking_plan();
    plan.defer_zero_writes_ms.store(300, Ordering::Relaxed);
    let o = opts(io, &plan);
    let pool = create(dir.path(), &o);
    let v = pool.volume("v").unwrap();
    // Every write is followed by a flush before the power cut: all of it must survive.
    let mut expect = std::collections::HashMap::new();
    for round in 0..6u64 {
        // Enough flushes on shard 0 to make it zero its next segment...
        for i in 0..64 {
            let lba = (round * 64 + i) % PAGE;
            v.write(lba * BLOCK as u64, &block(lba, round), false)
                .unwrap();
            v.flush().unwrap();
            expect.insert(lba, round);
        }
        // ...then a burst on shard 0 (page 2) that fills the open segment and rolls into it.
        for i in 0..10u64 {
            let at = 2 * PAGE + (i % 8) * 64;
            v.write(at * BLOCK as u64, &blocks(at, 64, round), false)
                .unwrap();
            for l in at..at + 64 {
                expect.insert(l, round);
            }
        }
        v.flush().unwrap();
    }
    let pool = cut_power_and_reopen(pool, dir.path(), &plan, &o);
    let v = pool.volume("v").unwrap();
    for (lba, n) in expect {
        assert!(
            read_block(&v, lba) == block(lba, n),
            "block {lba}: flushed version {n} lost"
        );
    }
    assert!(pool.check(&mut |_, _| {}).problems.is_empty());
}

/// Each of these runs as `NAME::sync` and `NAME::uring`.
macro_rules! on_both_engines {
    ($($f:ident),* $(,)?) => {$(
        mod $f {
            #[test]
            fn sync() {
                super::$f(super::IoKind::Sync);
            }

            #[test]
            fn uring() {
                super::$f(super::IoKind::Uring);
            }
        }
    )*};
}

on_both_engines!(
    one_shard_flush_covers_every_device,
    fua_writes_survive_a_power_cut,
    a_flush_waits_for_early_writes_on_every_shard,
    zeroes_ahead_never_land_over_records,
    a_fua_write_covers_early_writes_on_another_shard,
);
