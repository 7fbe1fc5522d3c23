//! fio runs over NBD (`--ioengine=nbd`) and on a raw file (`--ioengine=io_uring --direct=1`),
//! parsed from fio's JSON output.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One fio workload.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    /// fio `--rw`.
    pub rw: &'static str,
    pub block_bytes: u64,
    /// Requests in flight per connection.
    pub queue_depth: u32,
}

impl Workload {
    pub fn is_write(&self) -> bool {
        self.rw.contains("write")
    }
}

pub const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4k randread QD32",
        rw: "randread",
        block_bytes: 4096,
        queue_depth: 32,
    },
    Workload {
        name: "4k randwrite QD32",
        rw: "randwrite",
        block_bytes: 4096,
        queue_depth: 32,
    },
    Workload {
        name: "1M read QD8",
        rw: "read",
        block_bytes: 1 << 20,
        queue_depth: 8,
    },
    Workload {
        name: "1M write QD8",
        rw: "write",
        block_bytes: 1 << 20,
        queue_depth: 8,
    },
];

/// Where fio sends its I/O.
#[derive(Debug, Clone)]
pub enum Target {
    /// An NBD URI (`nbd+unix:///vol0?socket=...`).
    Nbd(String),
    /// A raw file, opened with O_DIRECT and driven by io_uring.
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Measured {
    pub iops: f64,
    pub mb_per_s: f64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    /// CPU used by fio over the job, in % of one core.
    pub client_cpu_pct: f64,
    /// CPU used by the server over the job, in % of one core (NaN: no server).
    pub server_cpu_pct: f64,
    /// CPU used by the whole machine over the job (other processes included), in % of one core.
    pub machine_cpu_pct: f64,
    /// What the device under the data did over the job (NaN when it has no stats).
    pub device: crate::sys::DeviceLoad,
}

fn engine_args(target: &Target) -> Vec<String> {
    match target {
        Target::Nbd(uri) => vec!["--ioengine=nbd".into(), format!("--uri={uri}")],
        Target::File(p) => vec![
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--filename={}", p.display()),
        ],
    }
}

fn run_fio(args: &[String]) -> Result<Value> {
    let out = Command::new("fio")
        .args(args)
        .output()
        .context("running fio (apt-get install fio)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            text.trim()
        );
    }
    // The nbd engine prints "fio: connected to NBD server" before the JSON.
    let json = text
        .find('{')
        .map(|i| &text[i..])
        .context("fio printed no JSON")?;
    Ok(serde_json::from_str(json)?)
}

/// Write the whole target once with 1 MiB writes, so that later reads hit written data.
pub fn prefill(target: &Target, size_bytes: u64) -> Result<()> {
    let mut args = vec![
        "--name=prefill".to_string(),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        format!("--size={size_bytes}"),
        "--output-format=json".into(),
    ];
    args.extend(engine_args(target));
    run_fio(&args)?;
    Ok(())
}

/// Run `w` over `connections` fio jobs (one NBD connection each; each job covers its own slice
/// of the target) for `seconds`, and sum them. CPU is counted for fio and for `server_pid`.
pub fn run(
    target: &Target,
    server_pid: Option<i32>,
    w: &Workload,
    connections: u32,
    size_bytes: u64,
    seconds: u64,
    disk: Option<&crate::sys::Disk>,
) -> Result<Measured> {
    let slice = size_bytes / u64::from(connections) / w.block_bytes * w.block_bytes;
    let mut args = vec![
        "--name=job".to_string(),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.block_bytes),
        format!("--iodepth={}", w.queue_depth),
        format!("--numjobs={connections}"),
        "--group_reporting".into(),
        format!("--size={slice}"),
        format!("--offset_increment={slice}"),
        format!("--runtime={seconds}"),
        "--time_based".into(),
        "--ramp_time=1".into(),
        "--percentile_list=50:99".into(),
        "--output-format=json".into(),
    ];
    args.extend(engine_args(target));
    let started = std::time::Instant::now();
    let cpu0 = crate::sys::children_cpu_seconds();
    let srv0 = server_pid.map(crate::sys::process_cpu_seconds);
    let machine0 = crate::sys::cpu_jiffies();
    let disk0 = disk.and_then(crate::sys::disk_sample);
    let v = run_fio(&args)?;
    let device = crate::sys::device_load(disk0, disk.and_then(crate::sys::disk_sample));
    let wall = started.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let machine_cpu_pct = crate::sys::machine_cpu_pct(machine0, crate::sys::cpu_jiffies(), cores);
    let client_cpu_pct = (crate::sys::children_cpu_seconds() - cpu0) / wall * 100.0;
    let server_cpu_pct = match (server_pid, srv0) {
        (Some(p), Some(c0)) => (crate::sys::process_cpu_seconds(p) - c0) / wall * 100.0,
        _ => f64::NAN,
    };
    let part = if w.is_write() { "write" } else { "read" };
    let j = &v["jobs"][0][part];
    let pct = |k: &str| j["clat_ns"]["percentile"][k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let iops = j["iops"].as_f64().unwrap_or(f64::NAN);
    Ok(Measured {
        iops,
        mb_per_s: j["bw_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        latency_us_p50: pct("50.000000"),
        latency_us_p99: pct("99.000000"),
        client_cpu_pct,
        server_cpu_pct,
        machine_cpu_pct,
        device,
    })
}

/// Create (or truncate to) a sparse file of `size_bytes`.
pub fn sparse_file(path: &Path, size_bytes: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size_bytes)?;
    Ok(())
}
