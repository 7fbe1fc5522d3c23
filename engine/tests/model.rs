//! Model-based property test: random sequences of volume operations, checkpoints, restarts,
//! crashes and power cuts against a plain in-memory model (one `Vec<u8>` per volume). Every
//! read is compared byte for byte; after every reopen the whole of every volume is read back,
//! `check` must be clean and `stats` must agree with the model.
//!
//! `INGOT_PROPTEST_CASES=N` raises the number of cases per engine for long runs.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ingot_engine::io::fault::FaultDevices;
use ingot_engine::io::sync::FileSet;
use ingot_engine::{
    CreateOptions, CutMode, Error, ErrorKind, FaultPlan, IoKind, Pool, PoolOptions, Request,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
const NAMES: [&str; 2] = ["alpha", "beta"];
/// Largest volume the op mix creates or resizes to.
const MAX_VOLUME_BYTES: u64 = 12 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sync,
    Uring,
    /// The fault injector over the given engine; crashes are power cuts.
    Fault(IoKind),
}

#[derive(Debug, Clone)]
enum Pattern {
    Zero,
    Fill(u8),
    Random(u64),
    /// One 4 KiB block repeated.
    RepeatBlock(u64),
    /// Per 4 KiB: zero, random, or a copy of the first chunk.
    Mixed(u64),
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&xorshift(&mut x).to_le_bytes());
    }
    out.truncate(len);
    out
}

impl Pattern {
    fn bytes(&self, len: usize) -> Vec<u8> {
        match *self {
            Pattern::Zero => vec![0; len],
            Pattern::Fill(b) => vec![b; len],
            Pattern::Random(s) => random_bytes(s, len),
            Pattern::RepeatBlock(s) => {
                let unit = random_bytes(s, BLOCK as usize);
                unit.iter().copied().cycle().take(len).collect()
            }
            Pattern::Mixed(s) => {
                let first = random_bytes(s, BLOCK as usize);
                let mut x = s | 1;
                let mut out = Vec::with_capacity(len);
                while out.len() < len {
                    let n = (len - out.len()).min(BLOCK as usize);
                    match xorshift(&mut x) % 3 {
                        0 => out.extend(std::iter::repeat_n(0u8, n)),
                        1 => out.extend_from_slice(&random_bytes(xorshift(&mut x), n)),
                        _ => out.extend_from_slice(&first[..n]),
                    }
                }
                out
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: usize,
        at: u64,
        sectors: u32,
        pattern: Pattern,
        fua: bool,
    },
    Read {
        vol: usize,
        at: u64,
        sectors: u32,
        /// Through a `Reader` (the caller's own queue) rather than the shards.
        own: bool,
    },
    Trim {
        vol: usize,
        at: u64,
        sectors: u32,
        fua: bool,
    },
    Zero {
        vol: usize,
        at: u64,
        sectors: u32,
        fua: bool,
    },
    /// Flush through a volume (the flusher thread).
    Flush(usize),
    /// `Pool::flush` (a plain device sync).
    PoolFlush,
    Checkpoint,
    Restart,
    /// halt (kill -9) on sync/io_uring; a power cut on the fault engine.
    Crash {
        seed: u64,
    },
    Create {
        vol: usize,
        sectors: u64,
    },
    Delete(usize),
    Resize {
        vol: usize,
        sectors: u64,
    },
    /// Snapshot (read-only) or clone volume `from` as volume `to`.
    Copy {
        from: usize,
        to: usize,
        snapshot: bool,
    },
    /// Turn dedup / compression of new writes on or off.
    Policy {
        vol: usize,
        dedup: bool,
        compression: bool,
    },
    VerifyAll,
    /// Several writes submitted at once (group commit, records in flight together); ranges
    /// that share a block with an earlier one in the burst are skipped.
    Burst {
        vol: usize,
        writes: Vec<(u64, u32, Pattern)>,
    },
    /// Fault engine only: a write while device writes fail (must fail with EIO, change nothing).
    FailWrite {
        vol: usize,
        at: u64,
        sectors: u32,
        pattern: Pattern,
    },
    /// Fault engine only: a read while device reads fail (EIO, or cached data).
    FailRead {
        vol: usize,
        at: u64,
        sectors: u32,
    },
}

fn pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![
        1 => Just(Pattern::Zero),
        2 => any::<u8>().prop_map(Pattern::Fill),
        // Seeds from a small set too, so that the same incompressible blocks land at many LBAs
        // and in several volumes (dedup across records, shards and volumes).
        2 => any::<u64>().prop_map(Pattern::Random),
        2 => (0u64..4).prop_map(Pattern::Random),
        1 => any::<u64>().prop_map(Pattern::RepeatBlock),
        1 => (0u64..4).prop_map(Pattern::RepeatBlock),
        3 => any::<u64>().prop_map(Pattern::Mixed),
    ]
}

/// Request length in sectors: often small (sub-4 KiB), up to 256 KiB.
fn sectors() -> impl Strategy<Value = u32> {
    prop_oneof![2 => 1u32..=16, 3 => 1u32..=512]
}

fn volume_sectors() -> impl Strategy<Value = u64> {
    let max = MAX_VOLUME_BYTES / SECTOR;
    prop_oneof![
        // Multiples of 4 KiB, and sizes that end inside a block.
        2 => (1u64..=max / 8).prop_map(|b| b * 8),
        1 => 1u64..=max,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let vol = 0usize..2;
    prop_oneof![
        30 => (vol.clone(), any::<u64>(), sectors(), pattern(), prop::bool::weighted(0.15))
            .prop_map(|(vol, at, sectors, pattern, fua)| Op::Write { vol, at, sectors, pattern, fua }),
        12 => (vol.clone(), any::<u64>(), sectors(), any::<bool>())
            .prop_map(|(vol, at, sectors, own)| Op::Read { vol, at, sectors, own }),
        5 => (vol.clone(), any::<u64>(), sectors(), prop::bool::weighted(0.2))
            .prop_map(|(vol, at, sectors, fua)| Op::Trim { vol, at, sectors, fua }),
        5 => (vol.clone(), any::<u64>(), sectors(), prop::bool::weighted(0.2))
            .prop_map(|(vol, at, sectors, fua)| Op::Zero { vol, at, sectors, fua }),
        4 => vol.clone().prop_map(Op::Flush),
        1 => Just(Op::PoolFlush),
        2 => Just(Op::Checkpoint),
        2 => Just(Op::Restart),
        4 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
        1 => (vol.clone(), volume_sectors()).prop_map(|(vol, sectors)| Op::Create { vol, sectors }),
        1 => vol.clone().prop_map(Op::Delete),
        1 => (vol.clone(), volume_sectors()).prop_map(|(vol, sectors)| Op::Resize { vol, sectors }),
        1 => Just(Op::VerifyAll),
        1 => (vol.clone(), any::<bool>(), any::<bool>())
            .prop_map(|(vol, dedup, compression)| Op::Policy { vol, dedup, compression }),
        2 => (vol.clone(), vol.clone(), any::<bool>())
            .prop_map(|(from, to, snapshot)| Op::Copy { from, to, snapshot }),
        4 => (vol.clone(), prop::collection::vec((any::<u64>(), sectors(), pattern()), 2..8))
            .prop_map(|(vol, writes)| Op::Burst { vol, writes }),
        1 => (vol.clone(), any::<u64>(), sectors(), pattern())
            .prop_map(|(vol, at, sectors, pattern)| Op::FailWrite { vol, at, sectors, pattern }),
        1 => (vol, any::<u64>(), sectors())
            .prop_map(|(vol, at, sectors)| Op::FailRead { vol, at, sectors }),
    ]
}

/// Model of one volume.
struct VolModel {
    data: Vec<u8>,
    /// Blocks changed since the last durability point: every value each may hold after a power
    /// cut (the durable one first, then each acknowledged one).
    pending: HashMap<u64, Vec<Vec<u8>>>,
    /// A snapshot: writes, zeroes, trims and resizes fail with `ReadOnly`.
    read_only: bool,
}

impl VolModel {
    fn new(size: u64) -> Self {
        VolModel {
            data: vec![0; size as usize],
            pending: HashMap::new(),
            read_only: false,
        }
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn block(&self, lba: u64) -> &[u8] {
        let start = (lba * BLOCK) as usize;
        let end = (start + BLOCK as usize).min(self.data.len());
        &self.data[start..end]
    }

    /// Apply `f` to `off..off+len`, remembering what each touched block may hold after a power
    /// cut.
    fn mutate(&mut self, off: u64, len: u64, f: impl FnOnce(&mut [u8])) {
        let first = off / BLOCK;
        let last = (off + len - 1) / BLOCK;
        for lba in first..=last {
            if !self.pending.contains_key(&lba) {
                let old = self.block(lba).to_vec();
                self.pending.insert(lba, vec![old]);
            }
        }
        f(&mut self.data[off as usize..(off + len) as usize]);
        for lba in first..=last {
            let new = self.block(lba).to_vec();
            let set = self.pending.get_mut(&lba).expect("inserted above");
            if !set.contains(&new) {
                set.push(new);
            }
        }
    }

    fn mapped_bytes(&self) -> u64 {
        self.data
            .chunks(BLOCK as usize)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64
            * BLOCK
    }
}

struct Harness {
    dir: tempfile::TempDir,
    engine: Engine,
    plan: Option<Arc<FaultPlan>>,
    pool: Option<Pool>,
    vols: [Option<VolModel>; 2],
    /// The last op, for failure messages.
    step: usize,
}

fn pool_options(engine: Engine, plan: &Option<Arc<FaultPlan>>) -> PoolOptions {
    let io = match engine {
        Engine::Sync => IoKind::Sync,
        Engine::Uring => IoKind::Uring,
        Engine::Fault(io) => io,
    };
    PoolOptions {
        io,
        shards: 2,
        // Small: the cache evicts during a case.
        cache_bytes: Some(256 << 10),
        checkpoint_interval_bytes: 64 << 20,
        fault: plan.clone(),
        // The io_uring and fault runs walk the log twice at each replay (holding almost none
        // of its records), the sync runs once.
        replay_hold_entries: if matches!(engine, Engine::Sync) {
            PoolOptions::default().replay_hold_entries
        } else {
            8
        },
        // Small enough that long cases sample the index.
        dedup_index_bytes: Some(16 << 10),
        write_back_bytes: write_back_bytes(engine),
        read_only: false,
        replica: None,
        replica_base: false,
        replica_rebase_bytes: 0,
        replica_history_bytes: 0,
        replica_cold: None,
        replica_fill: false,
        replica_local_ack: false,
        replica_rebase_now: false,
        replica_cache_bytes: 0,
        paged_metadata: false,
        // Two leaves: format 3 pools evict map leaves all the time and read them back (format
        // 2 keeps every leaf).
        metadata_cache_bytes: Some(8 << 10),
    }
}

/// The io_uring runs acknowledge whole-block writes early (write-back), the sync runs once
/// stored: reads after a write, flushes, snapshots and crashes are checked under both.
fn write_back_bytes(engine: Engine) -> u64 {
    match engine {
        Engine::Uring | Engine::Fault(IoKind::Uring) => 1 << 20,
        _ => 0,
    }
}

impl Harness {
    /// A pool on `engine`, its checkpoints in format 3 (root and pages) when `paged`.
    fn new(engine: Engine, paged: bool) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = match engine {
            Engine::Fault(_) => {
                let p = FaultPlan::new();
                p.track_unsynced.store(true, Ordering::Relaxed);
                Some(p)
            }
            _ => None,
        };
        let c = CreateOptions {
            size_bytes: 256 << 20,
            segment_bytes: 2 << 20,
            ..Default::default()
        };
        let o = PoolOptions {
            paged_metadata: paged,
            ..pool_options(engine, &plan)
        };
        let pool = Pool::create(dir.path(), &c, &o).expect("create");
        pool.create_volume(NAMES[0], 8 << 20).expect("create alpha");
        pool.create_volume(NAMES[1], (6 << 20) + 1536)
            .expect("create beta");
        Harness {
            dir,
            engine,
            plan,
            pool: Some(pool),
            vols: [
                Some(VolModel::new(8 << 20)),
                Some(VolModel::new((6 << 20) + 1536)),
            ],
            step: 0,
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("pool open")
    }

    fn durable(&mut self) {
        for v in self.vols.iter_mut().flatten() {
            v.pending.clear();
        }
    }

    /// Offset and length of a request from the generated values, inside the volume.
    fn range(&self, vol: usize, at: u64, sectors: u32) -> Option<(u64, u64)> {
        let size = self.vols[vol].as_ref()?.size();
        let mut off = (at % (size / SECTOR)) * SECTOR;
        let mut len = u64::from(sectors) * SECTOR;
        if at & (1 << 63) != 0 {
            // Half the requests are 4 KiB-aligned.
            off -= off % BLOCK;
            len = len.next_multiple_of(BLOCK);
        }
        Some((off, len.min(size - off)))
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{:?} step {}: {what}", self.engine, self.step)
    }

    fn run(&mut self, op: &Op) {
        let pool = self.pool();
        match *op {
            Op::Write {
                vol,
                at,
                sectors,
                ref pattern,
                fua,
            } => {
                let Some((off, len)) = self.range(vol, at, sectors) else {
                    return self.expect_missing(vol);
                };
                let data = pattern.bytes(len as usize);
                let v = pool.volume(NAMES[vol]).expect("volume");
                if self.read_only(vol) {
                    return self.expect_read_only(v.write(off, &data, fua));
                }
                if let Err(e) = v.write(off, &data, fua) {
                    self.fail(&format!("write {off}+{len}: {e}"));
                }
                let m = self.vols[vol].as_mut().expect("model");
                m.mutate(off, len, |d| d.copy_from_slice(&data));
                if fua {
                    self.durable();
                }
            }
            Op::Read {
                vol,
                at,
                sectors,
                own,
            } => {
                let Some((off, len)) = self.range(vol, at, sectors) else {
                    return self.expect_missing(vol);
                };
                let v = pool.volume(NAMES[vol]).expect("volume");
                let got = if own {
                    read_own(&v, off, len as u32)
                } else {
                    v.read(off, len as u32)
                }
                .unwrap_or_else(|e| {
                    self.fail(&format!("read {off}+{len} (own queue: {own}): {e}"))
                });
                let m = self.vols[vol].as_ref().expect("model");
                let want = &m.data[off as usize..(off + len) as usize];
                if got != want {
                    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    self.fail(&format!(
                        "read {} {off}+{len} differs from the model first at byte {}",
                        NAMES[vol],
                        off + i as u64
                    ));
                }
            }
            Op::Trim {
                vol,
                at,
                sectors,
                fua,
            }
            | Op::Zero {
                vol,
                at,
                sectors,
                fua,
            } => {
                let Some((off, len)) = self.range(vol, at, sectors) else {
                    return self.expect_missing(vol);
                };
                let v = pool.volume(NAMES[vol]).expect("volume");
                let r = if matches!(op, Op::Trim { .. }) {
                    v.trim(off, len, fua)
                } else {
                    v.write_zeroes(off, len, fua)
                };
                if self.read_only(vol) {
                    return self.expect_read_only(r);
                }
                if let Err(e) = r {
                    self.fail(&format!("{op:?} {off}+{len}: {e}"));
                }
                let m = self.vols[vol].as_mut().expect("model");
                m.mutate(off, len, |d| d.fill(0));
                if fua {
                    self.durable();
                }
            }
            Op::Flush(vol) => {
                if self.vols[vol].is_none() {
                    return self.expect_missing(vol);
                }
                let v = pool.volume(NAMES[vol]).expect("volume");
                if let Err(e) = v.flush() {
                    self.fail(&format!("flush: {e}"));
                }
                self.durable();
            }
            Op::PoolFlush => {
                if let Err(e) = pool.flush() {
                    self.fail(&format!("pool flush: {e}"));
                }
                self.durable();
            }
            Op::Checkpoint => {
                if let Err(e) = pool.checkpoint() {
                    self.fail(&format!("checkpoint: {e}"));
                }
                self.durable();
            }
            Op::Restart => {
                if let Err(e) = pool.shutdown() {
                    self.fail(&format!("shutdown: {e}"));
                }
                self.pool = None;
                self.durable();
                self.reopen();
                self.verify_all(false);
            }
            Op::Crash { seed } => {
                pool.halt();
                self.pool = None;
                // On the fault engine most crashes are power cuts; some are process crashes,
                // after which every acknowledged write must be there.
                let cut = matches!(self.engine, Engine::Fault(_)) && seed % 5 != 1;
                if let (true, Some(plan)) = (cut, &self.plan) {
                    let files = FileSet::open(&[self.dir.path().join("dev0.img")])
                        .expect("open device files");
                    let mode = if seed % 4 == 0 {
                        CutMode::LoseAll
                    } else {
                        CutMode::Random { seed }
                    };
                    FaultDevices::power_cut(plan, &files, mode).expect("power cut");
                }
                self.reopen();
                self.verify_all(cut);
                self.durable();
            }
            Op::Create { vol, sectors } => {
                let size = sectors * SECTOR;
                let r = pool.create_volume(NAMES[vol], size);
                // Only a successful create, delete or resize is a checkpoint (durability point).
                match (&self.vols[vol], r) {
                    (None, Ok(())) => {
                        self.vols[vol] = Some(VolModel::new(size));
                        self.durable();
                    }
                    (Some(_), Err(Error::VolumeExists(_))) => {}
                    (_, r) => self.fail(&format!("create {}: {r:?}", NAMES[vol])),
                }
            }
            Op::Delete(vol) => {
                let r = pool.delete_volume(NAMES[vol]);
                match (&self.vols[vol], r) {
                    (Some(_), Ok(())) => {
                        self.vols[vol] = None;
                        self.durable();
                    }
                    (None, Err(Error::VolumeNotFound(_))) => {}
                    (_, r) => self.fail(&format!("delete {}: {r:?}", NAMES[vol])),
                }
            }
            Op::Resize { vol, sectors } => {
                let size = sectors * SECTOR;
                let r = pool.resize_volume(NAMES[vol], size);
                match (&mut self.vols[vol], r) {
                    (Some(m), Ok(())) if !m.read_only => {
                        m.data.resize(size as usize, 0);
                        self.durable();
                    }
                    (Some(m), Err(Error::ReadOnly(_))) if m.read_only => {}
                    (None, Err(Error::VolumeNotFound(_))) => {}
                    (_, r) => self.fail(&format!("resize {}: {r:?}", NAMES[vol])),
                }
            }
            Op::Policy {
                vol,
                dedup,
                compression,
            } => {
                let r = pool.set_volume_policy(NAMES[vol], Some(dedup), Some(compression));
                match (&self.vols[vol], r) {
                    (Some(_), Ok(())) => self.durable(),
                    (None, Err(Error::VolumeNotFound(_))) => {}
                    (_, r) => self.fail(&format!("policy {}: {r:?}", NAMES[vol])),
                }
            }
            Op::Copy { from, to, snapshot } => {
                let r = if snapshot {
                    pool.snapshot_volume(NAMES[from], NAMES[to])
                } else {
                    pool.clone_volume(NAMES[from], NAMES[to])
                };
                match (&self.vols[from], &self.vols[to], r) {
                    (Some(m), None, Ok(())) => {
                        // Taken in a checkpoint: everything acknowledged is durable.
                        let copy = VolModel {
                            data: m.data.clone(),
                            pending: HashMap::new(),
                            read_only: snapshot,
                        };
                        self.durable();
                        self.vols[to] = Some(copy);
                    }
                    (_, Some(_), Err(Error::VolumeExists(_))) => {}
                    (None, None, Err(Error::VolumeNotFound(_))) => {}
                    (_, _, r) => self.fail(&format!("copy {from} -> {to}: {r:?}")),
                }
            }
            Op::VerifyAll => self.verify_all(false),
            Op::Burst { vol, ref writes } => {
                if self.vols[vol].is_none() {
                    return self.expect_missing(vol);
                }
                let mut taken: Vec<(u64, u64)> = Vec::new();
                let mut reqs = Vec::new();
                for (at, sectors, pattern) in writes {
                    let (off, len) = self.range(vol, *at, *sectors).expect("volume");
                    let blocks = (off / BLOCK, (off + len - 1) / BLOCK);
                    if taken.iter().any(|&(a, b)| blocks.0 <= b && a <= blocks.1) {
                        continue;
                    }
                    taken.push(blocks);
                    reqs.push((off, pattern.bytes(len as usize)));
                }
                let v = pool.volume(NAMES[vol]).expect("volume");
                let ro = self.read_only(vol);
                let (tx, rx) = std::sync::mpsc::channel();
                for (i, (off, data)) in reqs.iter().enumerate() {
                    let tx = tx.clone();
                    v.submit(
                        Request::Write {
                            offset: *off,
                            data: Bytes::copy_from_slice(data),
                            fua: false,
                        },
                        Box::new(move |r| {
                            let _ = tx.send((i, r));
                        }),
                    );
                }
                drop(tx);
                for _ in 0..reqs.len() {
                    match rx.recv() {
                        Ok((_, Err(Error::ReadOnly(_)))) if ro => {}
                        Ok((_, Ok(_))) if !ro => {}
                        Ok((i, Err(e))) => self.fail(&format!("burst write {i}: {e}")),
                        Ok((i, Ok(_))) => self.fail(&format!("burst write {i} to a snapshot")),
                        Err(_) => self.fail("burst: a completion never ran"),
                    }
                }
                let m = self.vols[vol].as_mut().expect("model");
                if ro {
                    return;
                }
                for (off, data) in reqs {
                    m.mutate(off, data.len() as u64, |d| d.copy_from_slice(&data));
                }
            }
            Op::FailWrite {
                vol,
                at,
                sectors,
                ref pattern,
            } => {
                let Some(plan) = self.plan.clone() else {
                    return;
                };
                let Some((off, len)) = self.range(vol, at, sectors) else {
                    return self.expect_missing(vol);
                };
                let v = pool.volume(NAMES[vol]).expect("volume");
                let fua = write_back_bytes(self.engine) > 0;
                if fua {
                    // Early writes still on their way would fail too, after their
                    // acknowledgement: store them first.
                    if let Err(e) = pool.flush() {
                        self.fail(&format!("flush: {e}"));
                    }
                    self.durable();
                }
                plan.fail_writes.store(true, Ordering::Relaxed);
                // Under write-back a write without FUA would be acknowledged before it fails
                // (which halts the pool: tests/write_back.rs); FUA writes are never early.
                let r = v.write(off, &pattern.bytes(len as usize), fua);
                plan.fail_writes.store(false, Ordering::Relaxed);
                match r {
                    Err(Error::ReadOnly(_)) if self.read_only(vol) => {}
                    Err(e @ Error::Io { .. }) if e.kind() == ErrorKind::Media => {}
                    // A write of only zero blocks stores no data: it may still succeed.
                    Ok(()) if pattern.bytes(len as usize).iter().all(|&b| b == 0) => {
                        let m = self.vols[vol].as_mut().expect("model");
                        m.mutate(off, len, |d| d.fill(0));
                    }
                    r => self.fail(&format!("write while writes fail: {r:?}")),
                }
            }
            Op::FailRead { vol, at, sectors } => {
                let Some(plan) = self.plan.clone() else {
                    return;
                };
                let Some((off, len)) = self.range(vol, at, sectors) else {
                    return self.expect_missing(vol);
                };
                let v = pool.volume(NAMES[vol]).expect("volume");
                plan.fail_reads.store(true, Ordering::Relaxed);
                let r = v.read(off, len as u32);
                plan.fail_reads.store(false, Ordering::Relaxed);
                let m = self.vols[vol].as_ref().expect("model");
                match r {
                    Err(e @ Error::Io { .. }) if e.kind() == ErrorKind::Media => {}
                    Ok(d) if d == m.data[off as usize..(off + len) as usize] => {}
                    Ok(_) => self.fail("read while reads fail returned wrong data"),
                    Err(e) => self.fail(&format!("read while reads fail: {e:?}")),
                }
            }
        }
    }

    fn read_only(&self, vol: usize) -> bool {
        self.vols[vol].as_ref().is_some_and(|m| m.read_only)
    }

    fn expect_read_only(&self, r: Result<(), Error>) {
        if !matches!(r, Err(Error::ReadOnly(_))) {
            self.fail(&format!("a change to a snapshot: {r:?}"));
        }
    }

    fn expect_missing(&self, vol: usize) {
        match self.pool().volume(NAMES[vol]) {
            Err(Error::VolumeNotFound(_)) => {}
            r => self.fail(&format!(
                "volume {} should not exist: {:?}",
                NAMES[vol],
                r.is_ok()
            )),
        }
    }

    fn reopen(&mut self) {
        let o = pool_options(self.engine, &self.plan);
        match Pool::open(self.dir.path(), &o) {
            Ok(p) => self.pool = Some(p),
            Err(e) => self.fail(&format!("reopen: {e}")),
        }
    }

    /// Read every volume whole and compare with the model; after a power cut each changed block
    /// may hold any value it had since the last durability point, and the model takes what was
    /// read. Then `check` and `stats`.
    fn verify_all(&mut self, after_cut: bool) {
        let pool = self.pool.as_ref().expect("pool");
        let mut names: Vec<String> = pool.volumes().into_iter().map(|v| v.name).collect();
        names.sort();
        let mut want: Vec<String> = (0..2)
            .filter(|&i| self.vols[i].is_some())
            .map(|i| NAMES[i].to_string())
            .collect();
        want.sort();
        if names != want {
            self.fail(&format!("volumes {names:?}, model has {want:?}"));
        }
        for (i, name) in NAMES.iter().enumerate() {
            let Some(m) = self.vols[i].as_ref() else {
                continue;
            };
            let v = pool.volume(name).expect("volume");
            if v.size_bytes() != m.size() {
                self.fail(&format!(
                    "{} size {} but model {}",
                    NAMES[i],
                    v.size_bytes(),
                    m.size()
                ));
            }
            let got = v
                .read(0, m.size() as u32)
                .unwrap_or_else(|e| self.fail(&format!("read all of {}: {e}", NAMES[i])));
            for (lba, (g, w)) in got
                .chunks(BLOCK as usize)
                .zip(m.data.chunks(BLOCK as usize))
                .enumerate()
            {
                let lba = lba as u64;
                let ok = if after_cut {
                    match m.pending.get(&lba) {
                        Some(allowed) => allowed.iter().any(|a| a.as_slice() == g),
                        None => g == w,
                    }
                } else {
                    g == w
                };
                if !ok {
                    let detail = if m.pending.contains_key(&lba) {
                        format!("{} allowed values", m.pending[&lba].len())
                    } else {
                        "unchanged since the last flush".to_string()
                    };
                    self.fail(&format!(
                        "{} block {lba} (byte {}) after reopen is not what the model allows ({detail}; after power cut: {after_cut})",
                        NAMES[i],
                        lba * BLOCK
                    ));
                }
            }
            if after_cut {
                let m = self.vols[i].as_mut().expect("model");
                m.data = got;
                m.pending.clear();
            }
        }
        let pool = self.pool.as_ref().expect("pool");
        let report = pool.check(&mut |_, _| {});
        if !report.problems.is_empty() {
            self.fail(&format!("check: {:?}", report.problems));
        }
        let stats = pool.stats();
        let want: u64 = self.vols.iter().flatten().map(VolModel::mapped_bytes).sum();
        if stats.logical_mapped_bytes != want {
            self.fail(&format!(
                "logical_mapped_bytes {} but the model has {want} bytes in non-zero blocks",
                stats.logical_mapped_bytes
            ));
        }
        // Dedup: every distinct block content is stored at least once, no mapped block more
        // than once; compression never stores more than the plaintext.
        let mut distinct = std::collections::HashSet::new();
        for m in self.vols.iter().flatten() {
            for b in m.data.chunks(BLOCK as usize) {
                if b.iter().any(|&x| x != 0) {
                    // A volume's partial last block is stored whole, zeroes after its end: the
                    // same block as a full one with those bytes (a clone grown past the tail).
                    let mut whole = b.to_vec();
                    whole.resize(BLOCK as usize, 0);
                    distinct.insert(whole);
                }
            }
        }
        let mapped = want / BLOCK;
        if stats.unique_blocks < distinct.len() as u64 || stats.unique_blocks > mapped {
            self.fail(&format!(
                "unique_blocks {} but the model has {} distinct blocks in {mapped} mapped",
                stats.unique_blocks,
                distinct.len()
            ));
        }
        if stats.stored_bytes > stats.unique_blocks * BLOCK
            || (stats.stored_bytes == 0) != (stats.unique_blocks == 0)
        {
            self.fail(&format!(
                "stored_bytes {} for {} unique blocks",
                stats.stored_bytes, stats.unique_blocks
            ));
        }
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("INGOT_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn run_model(engine: Engine, default_cases: u32) {
    run_model_in(engine, default_cases, false);
}

fn run_model_in(engine: Engine, default_cases: u32, paged: bool) {
    let config = Config {
        cases: cases(default_cases),
        max_shrink_iters: 200,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let ops = prop::collection::vec(op(), 1..60);
    // Map leaves read back from flash over all cases (format 3 only).
    let misses = std::sync::atomic::AtomicU64::new(0);
    let table_misses = std::sync::atomic::AtomicU64::new(0);
    // Pages the shards read through their queues while requests waited (`shard::fetch`).
    let ring_reads = std::sync::atomic::AtomicU64::new(0);
    let big = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&ops, |ops| {
        let mut h = Harness::new(engine, paged);
        for (i, op) in ops.iter().enumerate() {
            h.step = i;
            h.run(op);
        }
        h.step = ops.len();
        h.verify_all(false);
        let s = h.pool().stats();
        misses.fetch_add(s.metadata_cache_misses, Ordering::Relaxed);
        table_misses.fetch_add(s.metadata_cache_table_misses, Ordering::Relaxed);
        ring_reads.fetch_add(s.metadata_ring_reads, Ordering::Relaxed);
        // And once more from disk (an open that takes the stored counts starts with every
        // block-table leaf but the last on its page: reading every block reads them back).
        h.pool().shutdown().expect("shutdown");
        h.pool = None;
        h.reopen();
        h.verify_all(false);
        let s = h.pool().stats();
        misses.fetch_add(s.metadata_cache_misses, Ordering::Relaxed);
        table_misses.fetch_add(s.metadata_cache_table_misses, Ordering::Relaxed);
        ring_reads.fetch_add(s.metadata_ring_reads, Ordering::Relaxed);
        // More live blocks than a table leaf holds (252): some lie in a leaf the open left on
        // its page, which reading every block must read back.
        if s.unique_blocks > 252 {
            big.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{engine:?} (format 3: {paged}): {e}");
    }
    // The cases ran on evicted leaves, not only on leaves in RAM.
    let misses = misses.into_inner();
    let table_misses = table_misses.into_inner();
    let big = big.into_inner();
    let ring_reads = ring_reads.into_inner();
    // Map leaves in every run; block-table leaves whenever a case ended with more live
    // blocks than a leaf holds (one of fewer may keep its whole table in RAM).
    assert_eq!(
        misses > table_misses && (table_misses > 0 || big == 0),
        paged,
        "metadata cache misses over the run: {misses}, block-table leaves {table_misses} \
         ({big} cases of more than a leaf of blocks)"
    );
    // And requests waited for some of them parked, not on their shard's thread.
    assert_eq!(
        ring_reads > 0,
        paged,
        "pages read through the shards' queues: {ring_reads}"
    );
}

/// The same with format 3 checkpoints (a root and metadata pages), snapshots' shared leaves
/// kept shared across reopens and power cuts.
#[test]
fn model_paged_metadata() {
    run_model_in(Engine::Sync, 30, true);
}

#[test]
fn model_paged_metadata_power_cut() {
    run_model_in(Engine::Fault(IoKind::Sync), 30, true);
}

/// With io_uring and writes acknowledged early, and power cuts.
#[test]
fn model_paged_metadata_power_cut_uring() {
    run_model_in(Engine::Fault(IoKind::Uring), 30, true);
}

#[test]
fn model_sync() {
    run_model(Engine::Sync, 40);
}

#[test]
fn model_uring() {
    run_model(Engine::Uring, 40);
}

#[test]
fn model_fault_power_cut() {
    run_model(Engine::Fault(IoKind::Sync), 40);
}

#[test]
fn model_fault_power_cut_uring() {
    // 40: at 20 a FUA write that covered only its own shard's early writes got through
    // several runs before one found it.
    run_model(Engine::Fault(IoKind::Uring), 40);
}

fn small_pool(dir: &std::path::Path) -> Pool {
    let c = CreateOptions {
        size_bytes: 64 << 20,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    Pool::create(dir, &c, &pool_options(Engine::Sync, &None)).expect("create")
}

/// Regression (found by the model): write-zeroes or trim of less than a block starting at a
/// block boundary was ignored.
#[test]
fn zero_and_trim_sub_block_at_block_start() {
    let dir = tempfile::tempdir().unwrap();
    let pool = small_pool(dir.path());
    pool.create_volume("v", 1 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    v.write(0, &[7u8; 16384], false).unwrap();
    v.write_zeroes(4096, 1024, false).unwrap();
    v.trim(8192, 512, false).unwrap();
    let got = v.read(0, 16384).unwrap();
    let mut want = vec![7u8; 16384];
    want[4096..5120].fill(0);
    want[8192..8704].fill(0);
    assert!(got == want, "sub-block zero/trim at a block start ignored");
}

/// Shrinking a volume to a size inside a block and growing it again: the bytes past the old end
/// read as zeroes, like any never-written range.
#[test]
fn shrink_inside_block_then_grow_reads_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = small_pool(dir.path());
    pool.create_volume("v", 1 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    v.write(0, &[9u8; 8192], false).unwrap();
    pool.resize_volume("v", 4096 + 512).unwrap();
    pool.resize_volume("v", 1 << 20).unwrap();
    let got = v.read(0, 8192).unwrap();
    let mut want = vec![9u8; 4608];
    want.resize(8192, 0);
    assert!(
        got == want,
        "bytes past a shrunk end came back after growing"
    );
    assert_eq!(pool.stats().logical_mapped_bytes, 8192);
    drop(pool);
    let pool = Pool::open(dir.path(), &pool_options(Engine::Sync, &None)).unwrap();
    let v = pool.volume("v").unwrap();
    assert!(v.read(0, 8192).unwrap() == want);
}

/// A read through a `Reader` of its own, reaped on this thread (or handed to the shards).
fn read_own(v: &ingot_engine::Volume, off: u64, len: u32) -> ingot_engine::Result<Vec<u8>> {
    common::read_through(&mut ingot_engine::Reader::new(v, 8)?, off, len)
}
