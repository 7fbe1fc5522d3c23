//! A pool with a replica (issue 23): every sync appends what it covers, and the batches, replayed
//! in order onto empty devices on another "node", give a pool that opens with every flushed
//! block. The replica here keeps its batches in memory (the CLI's is RADOS, tested against a
//! real cluster in `tests/tests/ceph.rs`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ingot_engine::replica::{restore, restore_cold, ColdMap, Placed, Replica, Stored};
use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions, POOL_FILE};
use parking_lot::Mutex;

const BLOCK: usize = 4096;

#[derive(Default)]
struct Memory {
    batches: Mutex<Vec<Vec<u8>>>,
    /// Put and not committed yet.
    pending: Mutex<Vec<Vec<u8>>>,
    refuse: AtomicBool,
    expired: AtomicBool,
    /// Where each whole base starts (an index in `batches`), and the one being sent.
    bases: Mutex<Vec<usize>>,
    base_start: Mutex<Option<usize>>,
    fetches: std::sync::atomic::AtomicU64,
    /// Commits wait while this is set (a slow or unreachable store).
    blocked: Mutex<bool>,
    /// With `collect`, a whole base deletes the objects before it (as the CLI's collector):
    /// fetches of objects below `gone` fail.
    collect: AtomicBool,
    gone: std::sync::atomic::AtomicUsize,
    unblocked: parking_lot::Condvar,
}

impl Replica for Memory {
    fn put(&self, batch: Vec<u8>) -> std::io::Result<()> {
        self.pending.lock().push(batch);
        Ok(())
    }
    /// Objects are named by their index in `batches`.
    fn commit(&self) -> std::io::Result<Vec<Placed>> {
        {
            let mut b = self.blocked.lock();
            while *b {
                self.unblocked.wait(&mut b);
            }
        }
        let pending = std::mem::take(&mut *self.pending.lock());
        if self.refuse.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("deposed"));
        }
        let mut b = self.batches.lock();
        let placed = (b.len()..b.len() + pending.len())
            .map(|i| Placed {
                object: i.to_string(),
                at: 0,
            })
            .collect();
        b.extend(pending);
        Ok(placed)
    }
    fn valid(&self) -> bool {
        !self.expired.load(Ordering::Relaxed)
    }
    fn base_begin(&self) {
        // Batches put and not committed yet go into the next commit: they count as after.
        *self.base_start.lock() = Some(self.batches.lock().len());
    }
    fn base_end(&self) -> std::io::Result<()> {
        let start = self.base_start.lock().take().expect("a base began");
        self.bases.lock().push(start);
        if self.collect.load(Ordering::Relaxed) {
            self.gone.store(start, Ordering::Relaxed);
        }
        Ok(())
    }
    /// Objects are named by their index in `batches`.
    fn fetch(&self, object: &str, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let b = self.batches.lock();
        let o = object
            .parse::<usize>()
            .ok()
            .filter(|&i| i >= self.gone.load(Ordering::Relaxed))
            .and_then(|i| b.get(i))
            .ok_or_else(|| std::io::Error::other(format!("no object {object}")))?;
        let at = offset as usize;
        let src = o
            .get(at..at + buf.len())
            .ok_or_else(|| std::io::Error::other("a read past the object"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn opts(io: IoKind, replica: Option<Arc<Memory>>, base: bool) -> PoolOptions {
    PoolOptions {
        // Never, unless a test asks.
        replica_rebase_bytes: u64::MAX,
        io,
        shards: 2,
        cache_bytes: Some(0),
        replica: replica.map(|r| r as Arc<dyn Replica>),
        replica_base: base,
        ..Default::default()
    }
}

/// A new pool of `size` bytes in 2 MiB segments, in a directory of its own.
fn new_pool(io: IoKind, size: u64) -> tempfile::TempDir {
    let a = tempfile::tempdir().unwrap();
    let c = CreateOptions {
        size_bytes: size,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    drop(Pool::create(a.path(), &c, &opts(io, None, false)).unwrap());
    a
}

fn blocks(seed: u64, n: usize) -> Vec<u8> {
    (0..n as u64)
        .flat_map(|i| common::xorshift_block(seed << 32 | i))
        .collect()
}

/// Rebuild `from`'s pool in `to` from the batches (`pool.json` copied, as the CLI stores it).
fn restore_into(from: &std::path::Path, to: &std::path::Path, batches: &[Vec<u8>]) {
    std::fs::copy(from.join(POOL_FILE), to.join(POOL_FILE)).unwrap();
    let mut it = batches.iter().cloned();
    let n = restore(
        &[to.join("dev0.img")],
        &mut || Ok(it.next()),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(n as usize, batches.len());
}

fn replica_round_trip(io: IoKind) {
    let a = new_pool(io, 128 << 20);
    let r = Arc::new(Memory::default());
    let pool = Pool::open(a.path(), &opts(io, Some(r.clone()), true)).unwrap();
    pool.create_volume("v", 32 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let first = blocks(1, 512);
    v.write(0, &first, false).unwrap();
    v.flush().unwrap();
    // Overwrites, a trim, a FUA write: flushed.
    let second = blocks(2, 64);
    v.write(4 << 20, &second, false).unwrap();
    v.trim(BLOCK as u64 * 8, BLOCK as u64 * 8, false).unwrap();
    v.write(8 << 20, &second[..BLOCK], true).unwrap();
    v.flush().unwrap();
    // Written after the last flush: may be lost on the other node, but nothing before it.
    v.write(12 << 20, &second, false).unwrap();
    let batches = r.batches.lock().clone();
    assert!(batches.len() >= 2, "{} batches", batches.len());
    pool.halt();
    drop(v);
    drop(pool);
    let b = tempfile::tempdir().unwrap();
    restore_into(a.path(), b.path(), &batches);
    let pool = Pool::open(b.path(), &opts(io, None, false)).unwrap();
    let v = pool.volume("v").unwrap();
    let mut want = first.clone();
    want[8 * BLOCK..16 * BLOCK].fill(0);
    assert!(
        v.read(0, (512 * BLOCK) as u32).unwrap() == want,
        "the first write"
    );
    assert!(v.read(4 << 20, (64 * BLOCK) as u32).unwrap() == second);
    assert!(v.read(8 << 20, BLOCK as u32).unwrap() == second[..BLOCK]);
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn flushed_blocks_reach_another_node_through_the_replica() {
    replica_round_trip(IoKind::Sync);
}

#[test]
fn flushed_blocks_reach_another_node_through_the_replica_with_io_uring() {
    replica_round_trip(IoKind::Auto);
}

/// A replica that refuses (the node was deposed) fails the flush, and every flush after it:
/// nothing is acknowledged as durable that the store does not hold. A node whose lease ran out
/// by its own clock fails its reads.
#[test]
fn a_refused_batch_fails_the_flush_and_an_expired_lease_fails_reads() {
    let a = new_pool(IoKind::Sync, 64 << 20);
    let r = Arc::new(Memory::default());
    let pool = Pool::open(a.path(), &opts(IoKind::Sync, Some(r.clone()), true)).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    v.write(0, &blocks(3, 16), false).unwrap();
    v.flush().unwrap();
    r.refuse.store(true, Ordering::Relaxed);
    let _ = v.write(BLOCK as u64 * 16, &blocks(4, 16), false);
    assert!(v.flush().is_err(), "a flush the replica refused succeeded");
    r.refuse.store(false, Ordering::Relaxed);
    let _ = v.write(BLOCK as u64 * 32, &blocks(5, 1), false);
    assert!(
        v.flush().is_err(),
        "a flush after a refused batch succeeded"
    );
    drop(v);
    pool.halt();
    drop(pool);

    let r = Arc::new(Memory::default());
    let pool = Pool::open(a.path(), &opts(IoKind::Sync, Some(r.clone()), false)).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(v.read(0, BLOCK as u32).unwrap() == blocks(3, 1));
    r.expired.store(true, Ordering::Relaxed);
    assert!(
        v.read(BLOCK as u64, BLOCK as u32).is_err(),
        "a read after the lease ran out"
    );
}

/// Past its threshold the replica gets a new base (every range that holds data, sent while
/// syncs go on): replaying only the base and what came after it gives the pool, with every
/// flushed block, as replaying the whole history does.
#[test]
fn a_new_base_replaces_the_history_before_it() {
    let a = new_pool(IoKind::Sync, 128 << 20);
    let r = Arc::new(Memory::default());
    let o = PoolOptions {
        replica_rebase_bytes: 1 << 20,
        ..opts(IoKind::Sync, Some(r.clone()), true)
    };
    let pool = Pool::open(a.path(), &o).unwrap();
    pool.create_volume("v", 32 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    // Overwrites of the same 8 MiB, flushed each time: the history grows, the data does not.
    let mut last = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut round = 0u64;
    while r.bases.lock().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no base after {round} rounds"
        );
        last = blocks(100 + round, 2048);
        v.write(0, &last, false).unwrap();
        v.flush().unwrap();
        round += 1;
    }
    // More after the base, then a crash.
    let tail = blocks(999, 64);
    v.write(16 << 20, &tail, false).unwrap();
    v.flush().unwrap();
    let batches = r.batches.lock().clone();
    let start = *r.bases.lock().last().unwrap();
    assert!(start > 0, "the base starts after the history");
    pool.halt();
    drop(v);
    drop(pool);
    for (name, from) in [("from the base", start), ("the whole history", 0)] {
        let b = tempfile::tempdir().unwrap();
        restore_into(a.path(), b.path(), &batches[from..]);
        let pool = Pool::open(b.path(), &opts(IoKind::Sync, None, false)).unwrap();
        let v = pool.volume("v").unwrap();
        assert!(v.read(0, (2048 * BLOCK) as u32).unwrap() == last, "{name}");
        assert!(
            v.read(16 << 20, (64 * BLOCK) as u32).unwrap() == tail,
            "{name}"
        );
        let report = pool.check(&mut |_, _| {});
        assert!(report.problems.is_empty(), "{name}: {:?}", report.problems);
    }
}

/// The history the store already held at open counts towards the next base: a pool restarted
/// more often than it writes twice its data still gets one (before, each open counted from
/// zero, and such a pool's history grew without end).
#[test]
fn the_history_before_an_open_counts_towards_the_next_base() {
    for (history, based) in [(0u64, false), (1 << 30, true)] {
        let a = new_pool(IoKind::Sync, 128 << 20);
        let r = Arc::new(Memory::default());
        let o = PoolOptions {
            replica_rebase_bytes: 64 << 20,
            replica_history_bytes: history,
            ..opts(IoKind::Sync, Some(r.clone()), true)
        };
        let pool = Pool::open(a.path(), &o).unwrap();
        pool.create_volume("v", 32 << 20).unwrap();
        let v = pool.volume("v").unwrap();
        v.write(0, &blocks(7, 16), false).unwrap();
        v.flush().unwrap();
        let stats = pool.stats().replica.unwrap();
        if !based {
            assert!(
                stats.history_bytes > 0 && stats.history_bytes < 64 << 20,
                "this open's commits: {}",
                stats.history_bytes
            );
        }
        // The early sender looks every 100 ms.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while r.bases.lock().is_empty() && std::time::Instant::now() < deadline && based {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !based {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        assert_eq!(
            !r.bases.lock().is_empty(),
            based,
            "a history of {history} bytes at open"
        );
        if based {
            let after = pool.stats().replica.unwrap().history_bytes;
            assert!(
                after < 1 << 30,
                "the base started the history again: {after}"
            );
        }
        drop(v);
        pool.shutdown().unwrap();
    }
}

/// A lazy takeover: batches up to this size come inline (in their log record), larger ones as
/// objects whose table alone is read.
fn restore_lazily(from: &std::path::Path, to: &std::path::Path, batches: &[Vec<u8>]) -> ColdMap {
    std::fs::copy(from.join(POOL_FILE), to.join(POOL_FILE)).unwrap();
    list_store(to, batches, 0, false)
}

/// [`restore_cold`] into `to` from `batches`, the first of them object `first`.
fn list_store(to: &std::path::Path, batches: &[Vec<u8>], first: usize, keep: bool) -> ColdMap {
    let mut it = batches.iter().enumerate().map(|(i, b)| (i + first, b));
    restore_cold(
        &[to.join("dev0.img")],
        &mut || {
            Ok(it.next().map(|(i, b)| {
                if b.len() <= 64 << 10 {
                    Stored::Inline {
                        batch: b.clone(),
                        object: i.to_string(),
                        at: 0,
                    }
                } else {
                    let table = ingot_engine::format::ReplicaBatch::table_bytes(b).unwrap();
                    Stored::Object {
                        name: i.to_string(),
                        head: b[..table].to_vec(),
                        len: b.len() as u64,
                    }
                }
            }))
        },
        &mut |_, _| {},
        keep,
    )
    .unwrap()
}

/// Bytes the files of directory `dir` hold on disk.
fn allocated(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// The local cache budget of the tests: above what the engine keeps allocated whatever it holds
/// (segments reserved ahead: 12 of these 2 MiB ones).
const CACHE_BUDGET: u64 = 40 << 20;

/// A new pool of 256 MiB with a replica in memory and a local cache of [`CACHE_BUDGET`], and
/// its volume `v` of 128 MiB.
fn cache_pool(io: IoKind, rebase_bytes: u64) -> (tempfile::TempDir, Arc<Memory>, Pool) {
    let a = new_pool(io, 256 << 20);
    let r = Arc::new(Memory::default());
    // A base deletes the objects before it, as the CLI's collector does.
    r.collect.store(true, Ordering::Relaxed);
    let o = PoolOptions {
        replica_cache_bytes: CACHE_BUDGET,
        replica_rebase_bytes: rebase_bytes,
        ..opts(io, Some(r.clone()), true)
    };
    let pool = Pool::open(a.path(), &o).unwrap();
    pool.create_volume("v", 128 << 20).unwrap();
    (a, r, pool)
}

/// Wait until the files of the pool in `dir` are within [`CACHE_BUDGET`], more than `evicted`
/// bytes dropped.
fn within_budget(pool: &Pool, dir: &std::path::Path, evicted: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = pool.stats().replica.unwrap();
        if s.evicted_bytes > evicted && allocated(dir) <= CACHE_BUDGET {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never within the budget: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Read volume `v` whole, a MiB at a time.
fn read_all(v: &ingot_engine::Volume, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for at in (0..len).step_by(1 << 20) {
        out.extend(v.read(at as u64, (1 << 20).min(len - at) as u32).unwrap());
    }
    out
}

/// A local cache budget (the pool larger than the node's flash): past it, clean ranges the
/// store holds are dropped from the local files and read back from the store when used, and
/// writes over them stay. A clean restart keeps the files and lists the store: its holes are
/// what is cold. A base copies the dropped ranges, so that once the objects before it are gone
/// every block still reads back; a restore from the base gives the same pool.
fn local_cache(io: IoKind) {
    let (a, r, pool) = cache_pool(io, u64::MAX);
    let budget = CACHE_BUDGET;
    let v = pool.volume("v").unwrap();
    let len = 96 << 20;
    let mut want = blocks(1, len / BLOCK);
    // The last 32 MiB are not flushed: the cache commits them itself to drop them.
    for (i, part) in want.chunks(4 << 20).enumerate() {
        v.write((i << 22) as u64, part, false).unwrap();
        if i < 16 {
            v.flush().unwrap();
        }
    }
    within_budget(&pool, a.path(), 0);
    let fetched = r.fetches.load(Ordering::Relaxed);
    assert!(read_all(&v, len) == want, "read back after dropping");
    assert!(
        r.fetches.load(Ordering::Relaxed) > fetched,
        "nothing was fetched"
    );
    // Writes over dropped ranges stay over what the store has.
    let new = blocks(2, 512);
    v.write(4 << 20, &new, false).unwrap();
    v.flush().unwrap();
    want[4 << 20..(4 << 20) + new.len()].copy_from_slice(&new);
    assert!(read_all(&v, len) == want, "after overwrites");
    // What the reads fetched back is dropped again.
    within_budget(&pool, a.path(), pool.stats().replica.unwrap().evicted_bytes);
    drop(v);
    pool.shutdown().unwrap();
    drop(pool);

    // A clean restart keeps its files, with a base sent soon (the history is long).
    let batches = r.batches.lock().clone();
    let cold = Arc::new(list_store(a.path(), &batches, 0, true));
    assert!(
        cold.cold_bytes() >= len as u64 - budget,
        "{} bytes cold: the holes are not",
        cold.cold_bytes()
    );
    let o = PoolOptions {
        replica_cache_bytes: budget,
        replica_cold: Some(cold),
        replica_rebase_bytes: 1 << 20,
        replica_history_bytes: 1 << 30,
        ..opts(io, Some(r.clone()), false)
    };
    let pool = Pool::open(a.path(), &o).unwrap();
    let v = pool.volume("v").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while r.bases.lock().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no base");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let start = *r.bases.lock().last().unwrap();
    assert!(r.gone.load(Ordering::Relaxed) == start && start > 0);
    let cold_now = pool.stats().replica.unwrap().cold_bytes;
    assert!(
        cold_now >= 8 << 20,
        "only {cold_now} bytes cold after the base"
    );
    // Everything reads back from what is left: the local files and the base onwards.
    assert!(read_all(&v, len) == want, "after the base");
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    drop(v);
    pool.shutdown().unwrap();
    drop(pool);
    let b = tempfile::tempdir().unwrap();
    restore_into(a.path(), b.path(), &r.batches.lock()[start..]);
    let pool = Pool::open(b.path(), &opts(io, None, false)).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(read_all(&v, len) == want, "restored from the base");
}

#[test]
fn a_local_cache_drops_clean_ranges_and_reads_them_back() {
    local_cache(IoKind::Sync);
}

#[test]
fn a_local_cache_drops_clean_ranges_and_reads_them_back_with_io_uring() {
    local_cache(IoKind::Auto);
}

/// A pool written with a replica (a 16 MiB write, then small FUA writes over it: object and
/// inline batches), taken over lazily into a new directory: the two directories, the batches,
/// what volume `v` holds, and the cold map.
struct Lazy {
    _a: tempfile::TempDir,
    b: tempfile::TempDir,
    batches: Vec<Vec<u8>>,
    want: Vec<u8>,
    cold: Arc<ColdMap>,
}

fn lazy_source(io: IoKind) -> Lazy {
    let a = new_pool(io, 128 << 20);
    let r = Arc::new(Memory::default());
    let pool = Pool::open(a.path(), &opts(io, Some(r.clone()), true)).unwrap();
    pool.create_volume("v", 32 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let mut want = blocks(1, 4096);
    v.write(0, &want, false).unwrap();
    v.flush().unwrap();
    // Small flushed syncs (inline) over the large one.
    for k in 0..8u64 {
        let b = blocks(10 + k, 2);
        let at = (k * 300 + 5) as usize * BLOCK;
        v.write(at as u64, &b, true).unwrap();
        want[at..at + 2 * BLOCK].copy_from_slice(&b);
    }
    v.flush().unwrap();
    let batches = r.batches.lock().clone();
    assert!(batches.iter().any(|b| b.len() <= 64 << 10));
    assert!(batches.iter().any(|b| b.len() > 64 << 10));
    pool.halt();
    drop(v);
    drop(pool);
    let b = tempfile::tempdir().unwrap();
    let cold = Arc::new(restore_lazily(a.path(), b.path(), &batches));
    Lazy {
        _a: a,
        b,
        batches,
        want,
        cold,
    }
}

/// Another node takes the pool over without copying it: the devices' ranges stay in the store's
/// objects until a read needs them (fetched then, a window at a time), a write makes them local,
/// and the filler fetches the rest; every flushed block reads back at each step, and once the
/// filler is done the local directory holds the whole pool.
fn lazy_takeover(io: IoKind) {
    let Lazy {
        _a,
        b,
        batches,
        mut want,
        cold,
    } = lazy_source(io);
    let cold_at_start = cold.cold_bytes();
    assert!(cold_at_start >= 16 << 20, "{cold_at_start} bytes cold");
    let r2 = Arc::new(Memory::default());
    *r2.batches.lock() = batches.clone();
    let o = PoolOptions {
        replica_cold: Some(cold.clone()),
        replica_fill: false,
        ..opts(io, Some(r2.clone()), false)
    };
    let pool = Pool::open(b.path(), &o).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(cold.cold_bytes() > 0, "the open fetched everything");
    // Scattered reads fetch only around themselves.
    for k in [7u64, 2900, 1000, 4000] {
        let at = k as usize * BLOCK;
        assert!(
            v.read(at as u64, BLOCK as u32).unwrap() == want[at..at + BLOCK],
            "block {k}"
        );
    }
    assert!(cold.cold_bytes() > 0);
    // Overwrites of cold blocks stay over what the store has.
    let new = blocks(77, 64);
    v.write(3 << 20, &new, false).unwrap();
    want[3 << 20..(3 << 20) + 64 * BLOCK].copy_from_slice(&new);
    v.flush().unwrap();
    assert!(
        v.read(0, (4096 * BLOCK) as u32).unwrap() == want,
        "after the first reads"
    );
    let stats = pool.stats().replica.unwrap();
    assert!(stats.fetches > 0 && stats.fetched_bytes > 0, "{stats:?}");
    let fetched = r2.fetches.load(Ordering::Relaxed);
    drop(v);
    pool.shutdown().unwrap();
    drop(pool);

    // The filler: the rest comes in without reads, and the directory is whole.
    let o = PoolOptions {
        replica_cold: Some(cold.clone()),
        replica_fill: true,
        ..opts(io, Some(r2.clone()), false)
    };
    let pool = Pool::open(b.path(), &o).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cold.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the filler stalled");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(r2.fetches.load(Ordering::Relaxed) > fetched);
    pool.shutdown().unwrap();
    assert!(cold.is_whole(), "filled and synced, yet not whole");
    drop(pool);
    let pool = Pool::open(b.path(), &opts(io, None, false)).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(
        v.read(0, (4096 * BLOCK) as u32).unwrap() == want,
        "the filled directory"
    );
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn a_lazy_takeover_fetches_cold_ranges_on_read() {
    lazy_takeover(IoKind::Sync);
}

#[test]
fn a_lazy_takeover_fetches_cold_ranges_on_read_with_io_uring() {
    lazy_takeover(IoKind::Auto);
}

/// Once the store refused a sync (this node lost the pool), queued reads of cold ranges still
/// complete, and the pool closes: nothing waits for a fetcher that stopped.
#[test]
fn cold_reads_complete_after_the_store_refused_a_sync() {
    for io in [IoKind::Sync, IoKind::Auto] {
        let l = lazy_source(io);
        let r = Arc::new(Memory::default());
        *r.batches.lock() = l.batches.clone();
        let o = PoolOptions {
            replica_cold: Some(l.cold.clone()),
            replica_fill: false,
            ..opts(io, Some(r.clone()), false)
        };
        let pool = Pool::open(l.b.path(), &o).unwrap();
        let v = pool.volume("v").unwrap();
        r.refuse.store(true, Ordering::Relaxed);
        v.write(1 << 20, &blocks(5, 1), false).unwrap();
        assert!(v.flush().is_err(), "a refused sync succeeded");
        // Long enough for any thread that stops on the failure to have stopped.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let at = 3000 * BLOCK;
        assert!(!l.cold.is_empty());
        // Served from the store still (the lease holds by this node's clock), or failed:
        // either way it completes.
        if let Ok(got) = v.read(at as u64, BLOCK as u32) {
            assert!(got == l.want[at..at + BLOCK]);
        }
        drop(v);
        pool.halt();
        drop(pool);
        assert!(!l.cold.is_whole());
    }
}

fn set_blocked(r: &Memory, on: bool) {
    *r.blocked.lock() = on;
    r.unblocked.notify_all();
}

/// With local acknowledgement a client's flush returns once local while the store is stuck,
/// and the store follows once it answers. After a crash with syncs the store never got, the
/// pool reopened on the same devices sends a base before anything else: the store then
/// restores to every acknowledged block.
#[test]
fn local_acknowledgement_commits_behind_and_a_kept_pool_sends_a_base_first() {
    let a = new_pool(IoKind::Auto, 128 << 20);
    let r = Arc::new(Memory::default());
    let o = PoolOptions {
        replica_local_ack: true,
        ..opts(IoKind::Auto, Some(r.clone()), true)
    };
    let pool = Arc::new(Pool::open(a.path(), &o).unwrap());
    pool.create_volume("v", 32 << 20).unwrap();
    let v = Arc::new(pool.volume("v").unwrap());
    let first = blocks(1, 256);
    v.write(0, &first, false).unwrap();
    v.flush().unwrap();
    // The store stops answering: flushes still return.
    set_blocked(&r, true);
    let second = blocks(2, 256);
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (v, second) = (v.clone(), second.clone());
        std::thread::spawn(move || {
            let r = v.write(4 << 20, &second, false).and_then(|()| v.flush());
            let _ = tx.send(r.is_ok());
        });
    }
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(20)),
        Ok(true),
        "a flush waited for a stuck store"
    );
    assert!(pool.stats().replica.unwrap().behind, "behind, and not said");
    // It answers again: the committer catches up.
    set_blocked(&r, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pool.stats().replica.unwrap().behind {
        assert!(
            std::time::Instant::now() < deadline,
            "the store never caught up"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Stuck again, a third flushed write, and the process dies.
    set_blocked(&r, true);
    let third = blocks(3, 256);
    v.write(8 << 20, &third, false).unwrap();
    v.flush().unwrap();
    pool.halt();
    drop(v);
    let pool = Arc::try_unwrap(pool).ok().expect("the only handle");
    // The commit thread is stuck in the store: let it fail out, as a dead process's would.
    r.refuse.store(true, Ordering::Relaxed);
    set_blocked(&r, false);
    drop(pool);
    let lacking = r.batches.lock().clone();

    // Restarted on the same devices: a base goes first, holding the third write.
    let r2 = Arc::new(Memory::default());
    *r2.batches.lock() = lacking;
    let o = PoolOptions {
        replica_local_ack: true,
        replica_rebase_now: true,
        ..opts(IoKind::Auto, Some(r2.clone()), false)
    };
    let pool = Pool::open(a.path(), &o).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while r2.bases.lock().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no base after the restart"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    pool.shutdown().unwrap();
    assert!(!pool.stats().replica.unwrap().behind);
    drop(pool);
    let batches = r2.batches.lock().clone();
    let start = r2.bases.lock()[0];
    let b = tempfile::tempdir().unwrap();
    restore_into(a.path(), b.path(), &batches[start..]);
    let pool = Pool::open(b.path(), &opts(IoKind::Auto, None, false)).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(v.read(0, (256 * BLOCK) as u32).unwrap() == first);
    assert!(v.read(4 << 20, (256 * BLOCK) as u32).unwrap() == second);
    assert!(
        v.read(8 << 20, (256 * BLOCK) as u32).unwrap() == third,
        "a locally acknowledged write the store never got is not in the base"
    );
}

/// Reads, writes and flushes from two threads while the local cache drops ranges all along: a
/// window of 16 MiB moves through each thread's half of the volume, so the chunks it leaves
/// are dropped while the other thread works, and coming back reads them from the store and
/// writes over them. Every read returns the last bytes written there.
fn cache_under_load(io: IoKind) {
    // Bases as well, every 64 MiB of history past twice the data: they copy cold ranges
    // from the store while reads fetch them and writes go over them.
    let (_a, _r, pool) = cache_pool(io, 64 << 20);
    let v = pool.volume("v").unwrap();
    let half: u64 = 64 << 20;
    let window: u64 = 16 << 20;
    let stop_at = std::time::Instant::now() + std::time::Duration::from_secs(6);
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            let v = &v;
            sc.spawn(move || {
                let base = t * half;
                let blocks_n = (half / BLOCK as u64) as usize;
                // The seed of each block's last write (0: never written).
                let mut model = vec![0u64; blocks_n];
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut n = 0u64;
                while std::time::Instant::now() < stop_at {
                    // The window moves every 400 operations, wrapping around the half.
                    let w = (n / 400) * (window / 2) % half;
                    let at = ((w + next() % window) % (half - (64 << 10))) & !(BLOCK as u64 - 1);
                    let first = (at / BLOCK as u64) as usize;
                    if next() % 2 == 0 {
                        let k = 1 + (next() % 16) as usize;
                        let seed = n + 1;
                        let data = blocks(seed, k);
                        v.write(base + at, &data, false).unwrap();
                        for (i, m) in model[first..first + k].iter_mut().enumerate() {
                            *m = (seed << 32) | i as u64;
                        }
                    } else {
                        let k = 1 + (next() % 16) as usize;
                        let got = v.read(base + at, (k * BLOCK) as u32).unwrap();
                        for i in 0..k {
                            let want = match model[first + i] {
                                0 => vec![0u8; BLOCK],
                                s => common::xorshift_block(s),
                            };
                            assert!(
                                got[i * BLOCK..(i + 1) * BLOCK] == want[..],
                                "thread {t}: block {} after {n} operations",
                                first + i
                            );
                        }
                    }
                    if n % 16 == 15 {
                        v.flush().unwrap();
                    }
                    n += 1;
                }
            });
        }
    });
    let s = pool.stats().replica.unwrap();
    assert!(s.evicted_bytes > 0 && s.fetches > 0, "{s:?}");
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn a_local_cache_under_reads_and_writes_returns_the_last_bytes_written() {
    cache_under_load(IoKind::Sync);
}

#[test]
fn a_local_cache_under_reads_and_writes_returns_the_last_bytes_written_with_io_uring() {
    cache_under_load(IoKind::Auto);
}
