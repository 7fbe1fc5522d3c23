//! `ingot-bench ram`: the RAM a served pool holds per stored block, at several pool sizes
//! (issue 22). Each size gets a pool filled with that much unique, incompressible data over
//! NBD; `ingot serve` is restarted on it (`--cache-size 0 --write-back 0`, so that only
//! metadata is left), and the run reads the server's peak and settled RSS from `/proc` and the
//! engine's own count of its metadata from `stats`. Then a tail is written with checkpoints
//! held off, the server is killed (SIGKILL), and the open that replays the tail is timed.
//! Before that, `--churn` bytes overwrite the start of the volume under the default checkpoint
//! interval, and the checkpoint bytes written per GiB of client writes are read from `stats`
//! (issue 22 wants them flat, not growing with the pool). The slope between sizes is what
//! grows with the pool.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::peers::run_quiet;

#[derive(clap::Args, Debug)]
pub struct RamArgs {
    /// Working directory (pools and sockets; removed pool by pool unless --keep).
    #[arg(long, default_value = "/tmp/ingot-ram")]
    pub dir: PathBuf,
    /// Unique data per pool, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1G,2G,4G", value_parser = crate::parse_size)]
    pub sizes: Vec<u64>,
    /// Written after the last checkpoint before the server is killed (0: no crash open).
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    pub tail: u64,
    /// Overwritten (1 MiB writes) under the default checkpoint interval, to count checkpoint
    /// bytes per GiB written (0: skip).
    #[arg(long, default_value = "2G", value_parser = crate::parse_size)]
    pub churn: u64,
    /// The ingot binary (default: INGOT_BIN, else next to ingot-bench).
    #[arg(long)]
    pub ingot_bin: Option<PathBuf>,
    /// Keep the pools.
    #[arg(long)]
    pub keep: bool,
    /// More `ingot serve` arguments for every start (e.g. `--serve-arg=--metadata-cache=16M`).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
    /// Where to write the JSON (default: DIR/ram.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One server start on a filled pool.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Open {
    /// From spawn until the NBD socket accepts.
    pub seconds: f64,
    /// VmHWM once serving: the process's peak, opening included.
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub unique_bytes: u64,
    pub unique_blocks: u64,
    pub clean_open: Open,
    /// VmRSS a second after the open.
    pub rss_bytes: u64,
    pub metadata_ram_bytes: u64,
    pub dedup_index_bytes: u64,
    pub engine_bytes_per_block: f64,
    pub rss_bytes_per_block: f64,
    /// The open after SIGKILL with `tail_bytes` written since the last checkpoint.
    pub crash_open: Option<Open>,
    pub tail_bytes: u64,
    /// Over the churn: checkpoints taken, their bytes, client bytes written.
    pub churn_checkpoints: u64,
    pub churn_checkpoint_bytes: u64,
    pub churn_client_bytes: u64,
}

impl SizeResult {
    /// Checkpoint bytes per GiB of client writes over the churn.
    pub fn checkpoint_bytes_per_gib(&self) -> Option<f64> {
        (self.churn_client_bytes > 0).then(|| {
            self.churn_checkpoint_bytes as f64 * f64::from(1 << 30) / self.churn_client_bytes as f64
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub sizes: Vec<SizeResult>,
    /// Between the smallest and the largest size: bytes per added block (the engine's
    /// metadata outside its caches with the dedup index, and without it: the index is bounded
    /// by `--dedup-index-mem`, a cache of its own).
    pub engine_slope: Option<f64>,
    pub metadata_slope: Option<f64>,
    pub rss_slope: Option<f64>,
}

struct Server {
    child: Child,
}

impl Server {
    /// `ingot serve` on `pool`, waiting until its socket accepts; VmRSS is sampled meanwhile.
    fn start(bin: &Path, pool: &Path, sock: &Path, extra: &[&str]) -> Result<(Server, Open)> {
        let _ = fs::remove_file(sock);
        let t0 = Instant::now();
        let child = Command::new(bin)
            .args(["serve", "--pool"])
            .arg(pool)
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display()))
            .args(["--cache-size", "0", "--write-back", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut s = Server { child };
        loop {
            if UnixStream::connect(sock).is_ok() {
                break;
            }
            if let Some(st) = s.child.try_wait()? {
                bail!("ingot serve exited while opening {}: {st}", pool.display());
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("ingot serve did not open {} in 10 minutes", pool.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let open = Open {
            seconds: t0.elapsed().as_secs_f64(),
            peak_rss_bytes: s.status_kib("VmHWM:") * 1024,
        };
        Ok((s, open))
    }

    fn status_kib(&self, field: &str) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGINT (a clean shutdown, with a checkpoint) or SIGKILL, and wait.
    fn stop(mut self, kill: bool) -> Result<()> {
        let sig = if kill { libc::SIGKILL } else { libc::SIGINT };
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let st = self.child.wait()?;
        if !kill && !st.success() {
            bail!("ingot serve exited with {st}");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `bytes` of unique, incompressible data written from `offset` with fio.
fn write(sock: &Path, offset: u64, bytes: u64) -> Result<()> {
    run_quiet(Command::new("fio").args([
        "--name=fill",
        "--ioengine=nbd",
        &format!("--uri=nbd+unix:///vol0?socket={}", sock.display()),
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        &format!("--offset={offset}"),
        &format!("--size={bytes}"),
        "--refill_buffers",
        "--randrepeat=0",
        "--output-format=json",
    ]))
    .context("fio (apt-get install fio)")?;
    Ok(())
}

fn stats(bin: &Path, pool: &Path) -> Result<serde_json::Value> {
    let out = run_quiet(
        Command::new(bin)
            .args(["stats", "--json", "--pool"])
            .arg(pool),
    )?;
    Ok(serde_json::from_str(&out)?)
}

fn one(a: &RamArgs, bin: &Path, size: u64) -> Result<SizeResult> {
    let pool = a.dir.join(format!("pool-{}g", size >> 30));
    let sock = a.dir.join("ram.sock");
    let _ = fs::remove_dir_all(&pool);
    let vol = size + a.tail;
    // Room for the data, the tail, checkpoints and the cleaner's reserve.
    let pool_bytes = (vol + vol / 4 + (1 << 30)).next_multiple_of(1 << 20);
    run_quiet(
        Command::new(bin)
            .args([
                "pool",
                "create",
                "--size",
                &pool_bytes.to_string(),
                "--pool",
            ])
            .arg(&pool),
    )?;
    run_quiet(
        Command::new(bin)
            .args([
                "volume",
                "create",
                "vol0",
                "--size",
                &vol.to_string(),
                "--pool",
            ])
            .arg(&pool),
    )?;
    let extra: Vec<&str> = a.serve_args.iter().map(String::as_str).collect();
    let (s, _) = Server::start(bin, &pool, &sock, &extra)?;
    write(&sock, 0, size)?;
    s.stop(false)?;

    let (s, clean_open) = Server::start(bin, &pool, &sock, &extra)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_bytes = s.status_kib("VmRSS:") * 1024;
    let st = stats(bin, &pool)?;
    let g = |k: &str| st[k].as_u64().unwrap_or(0);
    let blocks = g("unique_blocks");
    s.stop(false)?;

    let (mut churn_checkpoints, mut churn_checkpoint_bytes, mut churn_client_bytes) = (0, 0, 0);
    if a.churn > 0 {
        let (s, _) = Server::start(bin, &pool, &sock, &extra)?;
        let before = stats(bin, &pool)?;
        write(&sock, 0, a.churn.min(size))?;
        let after = stats(bin, &pool)?;
        let d = |v: fn(&serde_json::Value) -> &serde_json::Value| {
            v(&after)
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(v(&before).as_u64().unwrap_or(0))
        };
        churn_checkpoints = d(|s| &s["device_written_breakdown"]["checkpoints"]);
        churn_checkpoint_bytes = d(|s| &s["device_written_breakdown"]["checkpoint_bytes"]);
        churn_client_bytes = d(|s| &s["client_written_bytes"]);
        s.stop(false)?;
    }
    let crash_open = if a.tail > 0 {
        // No checkpoint while the tail is written: all of it is replayed at the next open.
        let hold = ["--checkpoint-interval", "1T"];
        let (s, _) = Server::start(bin, &pool, &sock, &hold)?;
        write(&sock, size, a.tail)?;
        s.stop(true)?;
        let (s, open) = Server::start(bin, &pool, &sock, &extra)?;
        s.stop(false)?;
        Some(open)
    } else {
        None
    };
    if !a.keep {
        let _ = fs::remove_dir_all(&pool);
    }
    let per = |b: u64| b as f64 / blocks.max(1) as f64;
    Ok(SizeResult {
        unique_bytes: size,
        unique_blocks: blocks,
        clean_open,
        rss_bytes,
        metadata_ram_bytes: g("metadata_ram_bytes"),
        dedup_index_bytes: g("dedup_index_bytes"),
        engine_bytes_per_block: per(g("metadata_ram_bytes") + g("dedup_index_bytes")),
        rss_bytes_per_block: per(rss_bytes),
        crash_open,
        tail_bytes: a.tail,
        churn_checkpoints,
        churn_checkpoint_bytes,
        churn_client_bytes,
    })
}

pub fn run(a: &RamArgs) -> Result<()> {
    let bin = crate::peers::ingot_bin(a.ingot_bin.clone());
    fs::create_dir_all(&a.dir)?;
    let largest = a.sizes.iter().copied().max().unwrap_or(0);
    let need = largest + a.tail;
    crate::sys::ensure_space(&a.dir, need + need / 4 + (1 << 30))?;
    let start = Instant::now();
    let mut sizes = Vec::new();
    for (i, &size) in a.sizes.iter().enumerate() {
        crate::sys::progress(
            start,
            i,
            a.sizes.len(),
            &format!("{} GiB of unique data", size >> 30),
        );
        sizes.push(one(a, &bin, size)?);
    }
    crate::sys::progress(start, a.sizes.len(), a.sizes.len(), "done");
    let slope = |f: fn(&SizeResult) -> f64| -> Option<f64> {
        let (lo, hi) = (sizes.first()?, sizes.last()?);
        let db = hi.unique_blocks as f64 - lo.unique_blocks as f64;
        (db > 0.0).then(|| (f(hi) - f(lo)) / db)
    };
    let report = Report {
        engine_slope: slope(|r| (r.metadata_ram_bytes + r.dedup_index_bytes) as f64),
        metadata_slope: slope(|r| r.metadata_ram_bytes as f64),
        rss_slope: slope(|r| r.rss_bytes as f64),
        sizes,
    };
    println!("{}", table(&report));
    let out = a.out.clone().unwrap_or_else(|| a.dir.join("ram.json"));
    fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / f64::from(1 << 20))
}

pub fn table(r: &Report) -> String {
    let mut t = String::from(
        "| unique data | blocks | open s | peak RSS MiB | RSS MiB | engine metadata MiB | dedup index MiB | engine B/block | RSS B/block | open after kill -9 (tail) | its peak RSS MiB | checkpoint MiB per GiB written (checkpoints) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n",
    );
    for s in &r.sizes {
        let (crash, crash_peak) = match s.crash_open {
            Some(o) => (
                format!("{:.2} s ({} GiB)", o.seconds, s.tail_bytes >> 30),
                mib(o.peak_rss_bytes),
            ),
            None => ("-".into(), "-".into()),
        };
        t.push_str(&format!(
            "| {} GiB | {} | {:.2} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {crash} | {crash_peak} | {} |\n",
            s.unique_bytes >> 30,
            s.unique_blocks,
            s.clean_open.seconds,
            mib(s.clean_open.peak_rss_bytes),
            mib(s.rss_bytes),
            s.metadata_ram_bytes as f64 / f64::from(1 << 20),
            mib(s.dedup_index_bytes),
            s.engine_bytes_per_block,
            s.rss_bytes_per_block,
            s.checkpoint_bytes_per_gib().map_or("-".into(), |b| format!(
                "{:.1} ({})",
                b / f64::from(1 << 20),
                s.churn_checkpoints
            )),
        ));
    }
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    t.push_str(&format!(
        "\nSlope, smallest to largest pool: engine {} bytes per added block ({} without the dedup index, which `--dedup-index-mem` bounds), RSS {} (target: at most 2 outside the caches).",
        f(r.engine_slope),
        f(r.metadata_slope),
        f(r.rss_slope)
    ));
    t
}
