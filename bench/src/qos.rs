//! `ingot-bench qos`: per-volume QoS through `ingot serve`. Volume A is limited, B is not; fio
//! (nbd engine) drives both at once, then B alone. Reports A's measured rate against its limit
//! (goal: within ±5%) and B's rate next to A against B alone (goal: at least 0.9x; B alone is
//! run before and after the shared run and averaged). Once with an
//! IOPS limit (4 KiB random reads, QD32), once with a bandwidth limit (64 KiB random reads).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::fio::{self, Target, Workload};
use crate::peers::{self, run_quiet, Peer, Spec};
use crate::sys::progress;

#[derive(clap::Args, Debug)]
pub struct QosArgs {
    /// Directory for the pool and logs.
    #[arg(long, default_value = "/tmp/ingot-qos")]
    pub dir: PathBuf,
    /// Size of each volume (K/M/G suffixes).
    #[arg(long, default_value = "512M", value_parser = crate::parse_size)]
    pub size: u64,
    /// Seconds per fio run (plus 1 s of ramp, which also spends the burst).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Volume A's IOPS limit in the first phase.
    #[arg(long, default_value_t = 1000)]
    pub iops_limit: u64,
    /// Volume A's bandwidth limit in the second phase (bytes/s, K/M/G suffixes).
    #[arg(long, default_value = "20M", value_parser = crate::parse_size)]
    pub bandwidth_limit: u64,
    /// The ingot binary (default: INGOT_BIN, else next to ingot-bench).
    #[arg(long)]
    pub ingot_bin: Option<PathBuf>,
}

/// One phase's figures.
struct Phase {
    name: &'static str,
    unit: &'static str,
    limit: f64,
    a: f64,
    b_with_a: f64,
    b_solo: f64,
}

pub fn run(a: &QosArgs) -> Result<()> {
    let ingot_bin = peers::ingot_bin(a.ingot_bin.clone());
    let spec = Spec {
        server: Peer::Ingot,
        dir: a.dir.clone(),
        raw_file: a.dir.join("unused.img"),
        size_bytes: a.size,
        ingot_bin: ingot_bin.clone(),
        pool_bytes: (a.size * 3).max(1 << 30),
        prefill: false,
        ingot_args: Vec::new(),
    };
    let started = Instant::now();
    let steps = 10;
    progress(started, 0, steps, "starting ingot serve");
    let mut server = peers::start(&spec)?;
    let pool = server.pool_dir.clone().context("ingot has a pool")?;
    let ingot = |args: &[&str]| -> Result<String> {
        run_quiet(Command::new(&ingot_bin).args(args).arg("--pool").arg(&pool))
    };
    ingot(&["volume", "create", "b", "--size", &a.size.to_string()])?;
    let uri_a = Target::Nbd(server.uri.clone());
    let uri_b = Target::Nbd(server.uri.replace(peers::EXPORT, "b"));
    progress(started, 1, steps, "writing both volumes");
    fio::prefill(&uri_a, a.size)?;
    fio::prefill(&uri_b, a.size)?;
    let measure = |w: &Workload, both: bool| -> Result<(f64, f64, f64, f64)> {
        let run_one = |t: &Target| fio::run(t, None, w, 1, a.size, a.seconds, None);
        if both {
            let (ra, rb) = std::thread::scope(|s| {
                let ha = s.spawn(|| run_one(&uri_a));
                let rb = run_one(&uri_b);
                (ha.join(), rb)
            });
            let ra = ra.map_err(|_| anyhow::anyhow!("fio thread panicked"))??;
            let rb = rb?;
            Ok((ra.iops, ra.mb_per_s, rb.iops, rb.mb_per_s))
        } else {
            let rb = run_one(&uri_b)?;
            Ok((f64::NAN, f64::NAN, rb.iops, rb.mb_per_s))
        }
    };
    let mut phases = Vec::new();

    let w4k = Workload {
        name: "4k randread QD32",
        rw: "randread",
        block_bytes: 4096,
        queue_depth: 32,
    };
    let limit = a.iops_limit.to_string();
    ingot(&["volume", "set", peers::EXPORT, "--iops-limit", &limit])?;
    // B alone before and after the shared run, averaged: the machine drifts between runs.
    progress(started, 2, steps, "4k: B alone");
    let (_, _, ib_solo0, _) = measure(&w4k, false)?;
    progress(started, 3, steps, "4k: A limited and B at once");
    let (ia, _, ib, _) = measure(&w4k, true)?;
    progress(started, 4, steps, "4k: B alone again");
    let (_, _, ib_solo1, _) = measure(&w4k, false)?;
    let ib_solo = (ib_solo0 + ib_solo1) / 2.0;
    phases.push(Phase {
        name: "4k randread QD32, IOPS limit",
        unit: "IOPS",
        limit: a.iops_limit as f64,
        a: ia,
        b_with_a: ib,
        b_solo: ib_solo,
    });

    let w64k = Workload {
        name: "64k randread QD32",
        rw: "randread",
        block_bytes: 64 << 10,
        queue_depth: 32,
    };
    let bw = a.bandwidth_limit.to_string();
    ingot(&[
        "volume",
        "set",
        peers::EXPORT,
        "--iops-limit",
        "0",
        "--bandwidth-limit",
        &bw,
    ])?;
    progress(started, 5, steps, "64k: B alone");
    let (_, _, _, mb_solo0) = measure(&w64k, false)?;
    progress(started, 6, steps, "64k: A limited and B at once");
    let (_, ma, _, mb) = measure(&w64k, true)?;
    progress(started, 7, steps, "64k: B alone again");
    let (_, _, _, mb_solo1) = measure(&w64k, false)?;
    let mb_solo = (mb_solo0 + mb_solo1) / 2.0;
    // fio's MB are 10^6 bytes; the limit is in bytes.
    phases.push(Phase {
        name: "64k randread QD32, bandwidth limit",
        unit: "MiB/s",
        limit: a.bandwidth_limit as f64 / 1048576.0,
        a: ma * 1e6 / 1048576.0,
        b_with_a: mb * 1e6 / 1048576.0,
        b_solo: mb_solo * 1e6 / 1048576.0,
    });
    progress(started, 8, steps, "reading the wait counter");
    let metrics = ingot(&["stats", "--prometheus"])?;
    let waited = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "ingot_volume_qos_wait_seconds_total{{volume=\"{}\"}} ",
                peers::EXPORT
            ))
        })
        .unwrap_or("?")
        .to_string();
    progress(started, 9, steps, "stopping ingot serve");
    server.stop()?;
    progress(started, steps, steps, "done");
    println!(
        "QoS: volume A ({}) limited, B unlimited; fio --ioengine=nbd, one connection each, {} s \
         per run after 1 s of ramp, {} MiB volumes",
        peers::EXPORT,
        a.seconds,
        a.size >> 20
    );
    println!(
        "| workload | unit | A limit | A measured | A / limit | B with A | B alone (mean of 2) | B with A / alone |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for p in &phases {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.3} | {:.0} | {:.0} | {:.2} |",
            p.name,
            p.unit,
            p.limit,
            p.a,
            p.a / p.limit,
            p.b_with_a,
            p.b_solo,
            p.b_with_a / p.b_solo
        );
    }
    println!("A's requests waited {waited} s in all for its limits");
    Ok(())
}
