//! `ingot-bench engine`: engine throughput measured in-process, next to fio on a raw file in the
//! same directory, in one run.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions, Reader, Request, StageTimes, Volume};

struct Job {
    name: &'static str,
    bs: usize,
    random: bool,
    write: bool,
    fio_qd: usize,
}

const JOBS: [Job; 4] = [
    Job {
        name: "4k randwrite",
        bs: 4096,
        random: true,
        write: true,
        fio_qd: 32,
    },
    Job {
        name: "1M seqwrite",
        bs: 1 << 20,
        random: false,
        write: true,
        fio_qd: 8,
    },
    Job {
        name: "4k randread",
        bs: 4096,
        random: true,
        write: false,
        fio_qd: 32,
    },
    Job {
        name: "1M seqread",
        bs: 1 << 20,
        random: false,
        write: false,
        fio_qd: 8,
    },
];

#[allow(clippy::too_many_arguments)]
pub fn engine(
    dir: &Path,
    size: u64,
    seconds: u64,
    io: &str,
    qd: usize,
    no_fio: bool,
    only: &str,
    shards: usize,
    write_back: u64,
    sparse: bool,
    devices: Vec<std::path::PathBuf>,
    shard_reads: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let pool_dir = dir.join("bench-pool");
    let _ = std::fs::remove_dir_all(&pool_dir);
    let io: IoKind = io.parse().map_err(anyhow::Error::msg)?;
    let opts = PoolOptions {
        io,
        // Reads must reach the device to be comparable with fio's O_DIRECT reads.
        cache_bytes: Some(0),
        shards,
        write_back_bytes: write_back,
        ..Default::default()
    };
    // Prefilled, as a block device or a laid-out fio file is: writes overwrite written blocks
    // (or thin with --sparse, as `ingot serve` creates pools).
    let c = CreateOptions {
        size_bytes: size * 2 + (8 << 30),
        prefill: !sparse,
        devices: devices.clone(),
        ..Default::default()
    };
    let pool = Pool::create(&pool_dir, &c, &opts)?;
    pool.create_volume("bench", size)?;
    let vol = pool.volume("bench")?;
    println!(
        "{:<14} {:>12} {:>10} {:>12} {:>10} {:>7}",
        "job", "ingot IOPS", "MB/s", "fio IOPS", "MB/s", "ratio"
    );
    let mut breakdown = Vec::new();
    for job in JOBS.iter().filter(|j| j.name.contains(only)) {
        if !job.write {
            // Fill the volume so reads hit stored data.
            fill(&vol, size)?;
        }
        let qd = if job.bs == 1 << 20 { qd.min(8) } else { qd };
        let before = pool.stats().latency;
        let (ops, secs) = run_engine(&vol, job, size, qd, seconds, shard_reads)?;
        let after = pool.stats().latency;
        let stages = if job.write {
            after.writes.since(&before.writes)
        } else {
            after.reads.since(&before.reads)
        };
        let flushes = after.flushes.since(&before.flushes);
        let iops = ops as f64 / secs;
        let mbs = iops * job.bs as f64 / 1e6;
        let (fio_iops, fio_mbs) = if no_fio {
            (f64::NAN, f64::NAN)
        } else {
            fio(dir, job, size, seconds)?
        };
        println!(
            "{:<14} {:>12.0} {:>10.0} {:>12.0} {:>10.0} {:>6.2}x",
            job.name,
            iops,
            mbs,
            fio_iops,
            fio_mbs,
            iops / fio_iops
        );
        breakdown.push((job.name, stages, flushes));
    }
    // Where the engine's requests spent their time, per job (means; a request's time less
    // its queue and device stages is spent in the shard and in replying).
    println!(
        "\n{:<14} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "job", "total µs", "queued µs", "device µs", "devops/req", "flush µs (n)"
    );
    for (name, st, fl) in &breakdown {
        let m = |ns, n| StageTimes::mean_us(ns, n).map_or("-".into(), |v| format!("{v:.0}"));
        println!(
            "{:<14} {:>10} {:>10} {:>10} {:>10.2} {:>14}",
            name,
            m(st.total_ns, st.done),
            m(st.queued_ns, st.picked),
            m(st.device_ns, st.device),
            st.device as f64 / st.done.max(1) as f64,
            format!("{} ({})", m(fl.total_ns, fl.done), fl.done)
        );
    }
    let s = pool.stats();
    println!(
        "engine {} x{} shards, write-back {} MiB, {} pool; client {} MiB written, device {} MiB written, {:.1} blocks per record",
        s.io_engine,
        s.shards,
        s.write_back_limit_bytes >> 20,
        if sparse { "thin" } else { "prefilled" },
        s.client_written_bytes >> 20,
        s.device_written_bytes >> 20,
        s.client_written_bytes as f64 / 4096.0 / s.last_seq.max(1) as f64
    );
    pool.shutdown()?;
    drop(pool);
    let _ = std::fs::remove_dir_all(&pool_dir);
    for d in &devices {
        let _ = std::fs::remove_file(d);
    }
    Ok(())
}

fn fill(vol: &Volume, size: u64) -> Result<()> {
    let chunk = 4 << 20;
    let mut data = pattern(chunk, 7);
    let mut off = 0;
    while off < size {
        let n = chunk.min((size - off) as usize);
        stamp(&mut data, off);
        vol.write(off, &data[..n], false)?;
        off += n as u64;
    }
    vol.flush()?;
    Ok(())
}

/// Make every 4 KiB block of `buf` unique (as fio's `scramble_buffers` does): the engine
/// deduplicates, and a repeated buffer would measure reference counting, not writes.
fn stamp(buf: &mut [u8], serial: u64) {
    for (i, block) in buf.chunks_mut(4096).enumerate() {
        let tag = serial.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        block[..8].copy_from_slice(&tag.to_le_bytes());
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Keep `qd` requests in flight for `seconds`; writes flush every 1,000 requests. Reads go
/// through a `Reader` on this thread (as a front end's connection does), or with
/// `shard_reads` to the shards.
fn run_engine(
    vol: &Volume,
    job: &Job,
    size: u64,
    qd: usize,
    seconds: u64,
    shard_reads: bool,
) -> Result<(u64, f64)> {
    let (tx, rx) = crossbeam_channel::unbounded::<(bool, Result<(), String>)>();
    let reader = if job.write || shard_reads {
        None
    } else {
        Some(std::cell::RefCell::new(Reader::new(vol, qd as u32)?))
    };
    let data = pattern(job.bs, 42);
    let serial = std::cell::Cell::new(0u64);
    let blocks = size / job.bs as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq = 0u64;
    let mut next_offset = move || {
        if job.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % blocks) * job.bs as u64
        } else {
            seq = (seq + 1) % blocks;
            seq * job.bs as u64
        }
    };
    let submitted = Arc::new(AtomicU64::new(0));
    let submit = |off: u64| {
        let tx = tx.clone();
        let req = if job.write {
            Request::Write {
                offset: off,
                data: {
                    let mut d = data.clone();
                    serial.set(serial.get() + 1);
                    stamp(&mut d, serial.get());
                    bytes::Bytes::from(d)
                },
                fua: false,
            }
        } else {
            Request::Read {
                offset: off,
                len: job.bs as u32,
            }
        };
        let done: ingot_engine::Completion = Box::new(move |r| {
            let _ = tx.send((false, r.map(|_| ()).map_err(|e| e.to_string())));
        });
        match (&reader, req) {
            (Some(reader), Request::Read { offset, len }) => {
                reader.borrow_mut().read(offset, len, done)
            }
            (_, req) => vol.submit(req, done),
        }
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    for _ in 0..qd {
        submit(next_offset());
        submitted.fetch_add(1, Ordering::Relaxed);
    }
    let mut done = 0u64;
    let mut inflight = qd;
    while inflight > 0 {
        let got = match &reader {
            // Reap the reader's completions (they come back through `tx` too) before
            // blocking on the channel, which also carries reads handed to the shards.
            Some(reader) => loop {
                if let Ok(m) = rx.try_recv() {
                    break m;
                }
                let mut reader = reader.borrow_mut();
                if reader.in_flight() > 0 {
                    reader.wait();
                } else {
                    drop(reader);
                    break rx.recv().context("engine stopped")?;
                }
            },
            None => rx.recv().context("engine stopped")?,
        };
        let (is_flush, r) = got;
        if let Err(e) = r {
            bail!("I/O failed: {e}");
        }
        inflight -= 1;
        if is_flush {
            continue;
        }
        done += 1;
        if job.write && done % 1000 == 0 {
            // A flush every 1,000 writes, in flight with the writes as a database issues it.
            let tx = tx.clone();
            vol.submit(
                Request::Flush,
                Box::new(move |r| {
                    let _ = tx.send((true, r.map(|_| ()).map_err(|e| e.to_string())));
                }),
            );
            inflight += 1;
        }
        if Instant::now() < deadline {
            submit(next_offset());
            inflight += 1;
        }
    }
    if job.write {
        vol.flush()?;
    }
    Ok((done, start.elapsed().as_secs_f64()))
}

fn fio(dir: &Path, job: &Job, size: u64, seconds: u64) -> Result<(f64, f64)> {
    let file = dir.join("fio-raw.img");
    let rw = match (job.random, job.write) {
        (true, true) => "randwrite",
        (true, false) => "randread",
        (false, true) => "write",
        (false, false) => "read",
    };
    let out = Command::new("fio")
        .args([
            "--name=ref",
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--rw={rw}"),
            &format!("--bs={}", job.bs),
            &format!("--iodepth={}", job.fio_qd),
            &format!("--size={size}"),
            &format!("--filename={}", file.display()),
            &format!("--runtime={seconds}"),
            "--time_based",
            "--output-format=json",
        ])
        .output()
        .context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').unwrap_or(0)..];
    let v: serde_json::Value = serde_json::from_str(json)?;
    let part = if job.write { "write" } else { "read" };
    let iops = v["jobs"][0][part]["iops"].as_f64().unwrap_or(f64::NAN);
    Ok((iops, iops * job.bs as f64 / 1e6))
}
