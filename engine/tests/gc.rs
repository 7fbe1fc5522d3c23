//! The cleaner: a pool kept nearly full and overwritten at random many times its size never
//! runs out of space, every read matches a plain model, and restarts and crashes keep it so.

use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};

const MIB: u64 = 1 << 20;

fn opts(io: IoKind) -> PoolOptions {
    PoolOptions {
        io,
        shards: 2,
        cache_bytes: Some(MIB),
        checkpoint_interval_bytes: 64 * MIB,
        ..Default::default()
    }
}

fn read_all(v: &ingot_engine::Volume, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(16 << 20) {
        let n = (16 << 20).min(size - off) as u32;
        out.extend(v.read(off, n).unwrap());
    }
    out
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Returns the payload bytes the cleaner took from the block cache and read from the device.
fn overwrite_many_times(io: IoKind, vol_mib: u64, pool_mib: u64, rounds: u64) -> (u64, u64) {
    overwrite_with(opts(io), vol_mib, pool_mib, rounds)
}

fn overwrite_with(o: PoolOptions, vol_mib: u64, pool_mib: u64, rounds: u64) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: pool_mib * MIB,
        segment_bytes: 2 * MIB,
        ..Default::default()
    };
    let mut pool = Pool::create(dir.path(), &c, &o).unwrap();
    let size = vol_mib * MIB;
    let (mut from_cache, mut read) = (0, 0);
    pool.create_volume("v", size).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ vol_mib);
    // Fill the volume, then overwrite `rounds` times the pool's size at random.
    let v = pool.volume("v").unwrap();
    // Incompressible, unique data (so that the pool fills), with a quarter of the overwrites
    // compressible (so that the cleaner also moves compressed groups).
    let fill: Vec<u8> = (0..size / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    for off in (0..size).step_by(MIB as usize) {
        v.write(off, &fill[off as usize..(off + MIB) as usize], false)
            .unwrap();
    }
    model.copy_from_slice(&fill);
    let total = rounds * pool_mib * MIB;
    let mut written = 0u64;
    let mut step = 0u64;
    let mut v = v;
    while written < total {
        let blocks = 1 + rng.next() % 64;
        let len = blocks * 4096;
        let off = (rng.next() % (size / 4096 - blocks + 1)) * 4096;
        let compressible = step % 4 == 0;
        let data: Vec<u8> = (0..len / 8)
            .flat_map(|i| {
                let r = rng.next();
                if compressible && i % 8 != 0 {
                    (r & 0x0303_0303_0303_0303).to_le_bytes()
                } else {
                    r.to_le_bytes()
                }
            })
            .collect();
        v.write(off, &data, step % 31 == 0).unwrap_or_else(|e| {
            panic!(
                "write {off}+{len} after {written} bytes: {e}; {:?}",
                pool.stats()
            )
        });
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        written += len;
        step += 1;
        if step % 500 == 0 && std::env::var("GC_DEBUG").is_ok() {
            let s = pool.stats();
            eprintln!(
                "step {step} written {written} free {} moved {} wa {:.2} recl {}",
                s.segments_free, s.gc_bytes_moved, s.write_amplification, s.reclaimable_bytes
            );
        }
        if step % 600 == 0 {
            v.flush().unwrap();
            let s = pool.stats();
            from_cache += s.gc_bytes_from_cache;
            read += s.gc_bytes_read;
            // A clean restart now and then, and a crash (no checkpoint) once.
            if step % 1800 == 0 {
                pool.halt();
            } else {
                pool.shutdown().unwrap();
            }
            drop(pool);
            pool = Pool::open(dir.path(), &o).unwrap();
            v = pool.volume("v").unwrap();
            let got = read_all(&v, size);
            assert!(
                got == model,
                "volume differs from the model after a restart"
            );
        }
    }
    let got = read_all(&v, size);
    assert!(got == model, "volume differs from the model");
    let s = pool.stats();
    assert!(
        s.gc_bytes_moved > 0 || written < s.capacity_bytes,
        "the cleaner never ran: {s:?}"
    );
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // An explicit pass leaves the pool consistent too.
    pool.gc(0.99, &mut |_, _| {}).unwrap();
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(read_all(&v, size) == model);
    let s = pool.stats();
    (from_cache + s.gc_bytes_from_cache, read + s.gc_bytes_read)
}

#[test]
fn full_volume_overwritten_three_pools_worth_sync() {
    overwrite_many_times(IoKind::Sync, 20, 64, 3);
}

#[test]
fn full_volume_overwritten_three_pools_worth_uring() {
    overwrite_many_times(IoKind::Uring, 20, 64, 3);
}

/// With a cache that holds the whole volume the cleaner takes uncompressed blocks from it
/// (checked against their CRCs) and reads only the rest, in extents around what it has: the
/// volume still matches the model through restarts and a crash, and `check` passes.
#[test]
fn the_cleaner_takes_cached_blocks_and_reads_the_rest() {
    let o = PoolOptions {
        cache_bytes: Some(64 * MIB),
        ..opts(IoKind::Uring)
    };
    let (from_cache, read) = overwrite_with(o, 20, 64, 3);
    assert!(from_cache > 0, "nothing came from the cache");
    // Compressed groups are always read, and blocks written before a restart are not cached.
    assert!(read > 0, "nothing was read");
}

/// Allocated bytes of a file (what `du` reports).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn trimming_everything_gives_space_back_to_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: 256 * MIB,
        segment_bytes: 2 * MIB,
        ..Default::default()
    };
    let pool = Pool::create(dir.path(), &c, &opts(IoKind::Uring)).unwrap();
    pool.create_volume("v", 128 * MIB).unwrap();
    let v = pool.volume("v").unwrap();
    let img = dir.path().join("dev0.img");
    let empty = allocated(&img);
    let mut rng = Rng(77);
    for off in (0..128 * MIB).step_by(MIB as usize) {
        let data: Vec<u8> = (0..MIB / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        v.write(off, &data, false).unwrap();
    }
    v.flush().unwrap();
    let full = allocated(&img);
    let used = pool.stats().physical_used_bytes;
    // The backing file is allocated up front (fallocate), as a raw image would be.
    assert!(full >= 128 * MIB && full >= empty, "du {full}");
    assert!(used >= 128 * MIB, "physical_used_bytes {used}");
    // One trim of the whole volume is a metadata operation.
    let t = std::time::Instant::now();
    v.trim(0, 128 * MIB, false).unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "trim of 128 MiB took {:?}",
        t.elapsed()
    );
    assert_eq!(pool.stats().stored_bytes, 0);
    // Freed segments are punched out of the file once checkpoints no longer need them.
    for _ in 0..3 {
        pool.checkpoint().unwrap();
    }
    let s = pool.stats();
    // The shards' and the mover's open and next segments (6), and the checkpoint's: format 3
    // keeps pages that did not change (the block table's) where they were written, beside the
    // newest pages, in up to three segments before cleaning packs them (`MetaSegs::sparse`).
    assert!(
        s.physical_used_bytes <= 18 * MIB,
        "physical_used_bytes {} after trimming everything",
        s.physical_used_bytes
    );
    let after = allocated(&img);
    assert!(
        after + 100 * MIB <= full,
        "du shrank from {full} to {after} only"
    );
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Free segments whose blocks the backing file still holds when the pool opens (freed while
/// space was short and not punched before the last stop: the marks are kept only in memory)
/// are given back to the host after the open, but for those kept allocated for checkpoints
/// and the cleaner (`2 × ckpt_reserve`, a dozen here).
#[test]
fn free_segments_left_allocated_by_a_previous_run_are_given_back() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let seg = 2 * MIB;
    let total;
    let c = CreateOptions {
        size_bytes: 128 * MIB,
        segment_bytes: seg,
        ..Default::default()
    };
    {
        let pool = Pool::create(dir.path(), &c, &opts(IoKind::Uring)).unwrap();
        pool.create_volume("v", 16 * MIB).unwrap();
        pool.volume("v")
            .unwrap()
            .write(0, &[7u8; 4096], false)
            .unwrap();
        total = pool.stats().segments_total;
        pool.shutdown().unwrap();
    }
    let img = dir.path().join("dev0.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    // Segments the file has no blocks for are free (a segment in use has at least its
    // header written): give four of them blocks, as a run that freed them without a punch
    // would have left them.
    let data_at = |off: u64| {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open fd.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if r < 0 {
            u64::MAX
        } else {
            r as u64
        }
    };
    let start = ingot_engine::format::DATA_START;
    // From the end: the open takes the lowest free segments for the shards' new chains.
    const FILLED: usize = 36;
    let holes: Vec<u64> = (0..total)
        .rev()
        .map(|i| start + i * seg)
        .filter(|&b| data_at(b) >= b + seg)
        .take(FILLED)
        .collect();
    assert_eq!(holes.len(), FILLED, "free segments to fill");
    for &b in &holes {
        file.write_all_at(&vec![0xa5u8; seg as usize], b).unwrap();
    }
    file.sync_all().unwrap();
    let before = allocated(&img);
    let pool = Pool::open(dir.path(), &opts(IoKind::Uring)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let given_back = || holes.iter().filter(|&&b| data_at(b) >= b + seg).count();
    while given_back() < FILLED - 16 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {FILLED} free segments given back 10 s after open (du {before} -> {})",
            given_back(),
            allocated(&img)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(allocated(&img) + (FILLED as u64 - 16) * seg <= before);
    assert_eq!(
        pool.volume("v").unwrap().read(0, 4096).unwrap(),
        vec![7u8; 4096]
    );
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A segment given back to the file system (a hole punched) must not be written again before
/// the punch is done, or the punch takes the new records with it. Discards are slowed down here
/// and the pool kept nearly full, so that the cleaner frees segments that shards need at once.
#[test]
fn records_written_while_freed_segments_are_punched_survive() {
    writers_on_a_nearly_full_pool(64, 50);
}

/// Four writers at 75% of a 24-segment pool's usable capacity: the cleaner frees a few segments
/// per pass, which must count as progress (writes wait for it), not as a full pool (ENOSPC).
#[test]
fn writers_on_a_small_nearly_full_pool_never_get_enospc() {
    writers_on_a_nearly_full_pool(48, 0);
}

fn writers_on_a_nearly_full_pool(pool_mib: u64, discard_delay_ms: u64) {
    use ingot_engine::FaultPlan;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: pool_mib * MIB,
        segment_bytes: 2 * MIB,
        ..Default::default()
    };
    let plan = FaultPlan::new();
    plan.discard_delay_ms
        .store(discard_delay_ms, Ordering::Relaxed);
    let o = PoolOptions {
        fault: Some(plan.clone()),
        ..opts(IoKind::Uring)
    };
    let pool = Arc::new(Pool::create(dir.path(), &c, &o).unwrap());
    const WRITERS: u64 = 4;
    let part = 5 * MIB;
    let size = WRITERS * part;
    pool.create_volume("v", size).unwrap();
    let v = pool.volume("v").unwrap();
    let mut rng = Rng(0x5eed_d15c_a7d0_0001);
    let fill: Vec<u8> = (0..size / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    v.write(0, &fill, false).unwrap();
    // Each writer overwrites its own part at random, together four times the pool's size.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            let mut model = fill[(w * part) as usize..((w + 1) * part) as usize].to_vec();
            std::thread::spawn(move || {
                let v = pool.volume("v").unwrap();
                let mut rng = Rng(0x0dd_ba11 + w);
                let mut written = 0;
                while written < 64 * MIB {
                    let blocks = 1 + rng.next() % 16;
                    let len = blocks * 4096;
                    let off = (rng.next() % (part / 4096 - blocks + 1)) * 4096;
                    let data: Vec<u8> = (0..len / 8)
                        .flat_map(|_| rng.next().to_le_bytes())
                        .collect();
                    v.write(w * part + off, &data, false).unwrap_or_else(|e| {
                        panic!("after {written} bytes: {e}: {:?}", pool.stats())
                    });
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    written += len;
                }
                model
            })
        })
        .collect();
    let model: Vec<u8> = writers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let s = pool.stats();
    assert!(s.gc_bytes_moved > 0, "the cleaner never ran: {s:?}");
    v.flush().unwrap();
    assert!(read_all(&v, size) == model, "volume differs from the model");
    assert_eq!(
        plan.writes_into_discards.load(Ordering::Relaxed),
        0,
        "records were written into a segment while it was being discarded"
    );
    let pool = Arc::try_unwrap(pool).ok().expect("writers done");
    pool.shutdown().unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), &o).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(read_all(&v, size) == model, "differs after a restart");
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A full trim of a volume gives its space back by itself, within seconds: the segments left
/// without a live block are freed at the next checkpoint (which the trim brings about) and
/// punched out of the backing file, with no `gc` run.
#[test]
fn a_full_trim_gives_space_back_without_gc() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: 512 << 20,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    let pool = Pool::create(dir.path(), &c, &opts(IoKind::Sync)).unwrap();
    pool.create_volume("v", 256 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..192u64 {
        rng.fill_bytes(&mut chunk);
        v.write(i << 20, &chunk, false).unwrap();
    }
    v.flush().unwrap();
    let used = pool.stats().physical_used_bytes;
    let file = dir.path().join("dev0.img");
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(used >= 192 << 20, "used {used}");
    v.trim(0, 256 << 20, false).unwrap();
    v.flush().unwrap();
    let t = std::time::Instant::now();
    loop {
        let s = pool.stats();
        let now = std::fs::metadata(&file).unwrap().blocks() * 512;
        if s.physical_used_bytes < used / 8 && now < allocated / 4 {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "after a full trim: {} bytes still used (of {used}), file holds {now} (of {allocated})",
            s.physical_used_bytes
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // `gc` has nothing left to do, and says what it did.
    let r = pool.gc(0.9, &mut |_, _| {}).unwrap();
    assert_eq!(r.segments_cleaned, 0);
}
