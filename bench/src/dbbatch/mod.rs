//! `ingot-bench db-batch`: the mission benchmark. A nightly customs risk-analysis batch runs in
//! PostgreSQL on ext4 on a volume of each server (nbdfuse + `losetup --direct-io=on`), and on a
//! plain local directory (the upper bound). PostgreSQL runs in a memory cgroup so that its data
//! outgrows its memory; caches are dropped before the query phase.

mod sql;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::peers::{self, run_quiet, Peer, Running, Spec};
use crate::svg;
use crate::sys::{self, Machine, Noise};
use ingot_bench::gen;

/// The memory cgroup (v1) PostgreSQL runs in.
const CGROUP: &str = "/sys/fs/cgroup/memory/ingot-bench-pg";
const LOCAL: &str = "local-dir";
const LOCAL_LOOP: &str = "local-loop";

#[derive(clap::Args, Debug)]
pub struct DbBatchArgs {
    /// Working directory (data, pools, raw files, mounts; the local-dir target's file system).
    #[arg(long, default_value = "/tmp/ingot-db-batch")]
    pub dir: PathBuf,
    /// Data size: 1.0 = 40,000 declarations (about 200,000 line items).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Runs per target; phases and totals are the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Targets, in order: local-dir and any of the servers of `compare`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "local-dir,local-loop,ingot,qemu-nbd,nbdkit-file,nbd-server,nbdkit-memory"
    )]
    pub targets: Vec<String>,
    /// The target whose total is subtracted to get each storage share.
    #[arg(long, default_value = LOCAL)]
    pub baseline: String,
    /// Memory limit of PostgreSQL's cgroup, page cache included.
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    pub memory_limit: u64,
    /// Volume size.
    #[arg(long, default_value = "2G", value_parser = crate::parse_size)]
    pub volume_size: u64,
    /// Rows per transaction in the legacy-style load.
    #[arg(long, default_value_t = 5)]
    pub commit_every: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 2024)]
    pub seed: u64,
    /// PostgreSQL's bin directory.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub pg_bin: PathBuf,
    /// The ingot binary (default: INGOT_BIN, else next to ingot-bench).
    #[arg(long)]
    pub ingot_bin: Option<PathBuf>,
    /// Extra `ingot serve` argument (repeatable).
    #[arg(long = "ingot-arg", allow_hyphen_values = true)]
    pub ingot_args: Vec<String>,
    /// Create ingot's pool prefilled (`pool create --prefill`) instead of thin, as `ingot
    /// serve` makes it: shows what the host file system's block allocation costs.
    #[arg(long)]
    pub ingot_prefill: bool,
    /// Where to write the JSON and SVG (default: DIR/db-batch.json, DIR/db-batch.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub const PHASES: [&str; 6] = [
    "legacy load",
    "COPY load",
    "index build",
    "checkpoint",
    "risk queries",
    "VACUUM ANALYZE",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Local,
    /// ext4 on a loop device over a raw file in DIR: the volume stack without NBD and FUSE.
    LocalLoop,
    Peer(Peer),
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Local => LOCAL,
            Target::LocalLoop => LOCAL_LOOP,
            Target::Peer(s) => s.name(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IngotBytes {
    pub logical_mapped_bytes: u64,
    pub stored_bytes: u64,
    pub physical_used_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub target: String,
    pub run: usize,
    pub phase_seconds: Vec<f64>,
    pub total_seconds: f64,
    pub digest: String,
    pub database_bytes: u64,
    pub ingot: Option<IngotBytes>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub target: String,
    /// Median of each phase, in [`PHASES`] order.
    pub phase_seconds_median: Vec<f64>,
    pub total_seconds_median: f64,
    /// Fastest and slowest total: the spread says how much the medians can be trusted.
    pub total_seconds_min: f64,
    pub total_seconds_max: f64,
    /// Median total minus the local directory's.
    pub storage_share_seconds: f64,
    pub ratio_to_local: f64,
    pub ingot: Option<IngotBytes>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub baseline: String,
    pub noise: Noise,
    pub scale: f64,
    pub data: gen::Counts,
    pub memory_limit_bytes: u64,
    pub runs: Vec<RunResult>,
    pub summary: Vec<Summary>,
    pub digests_agree: bool,
    pub goals: Vec<crate::compare::Goal>,
    pub servers: Vec<(String, String)>,
    pub wall_seconds: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(a: &DbBatchArgs) -> Result<()> {
    let r = batch(a)?;
    println!("{}", table(&r));
    println!("{}", r.noise.summary());
    let out = a.out.clone().unwrap_or_else(|| a.dir.join("db-batch"));
    let json = out.with_extension("json");
    let svg_path = out.with_extension("svg");
    if let Some(d) = json.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&json, serde_json::to_string_pretty(&r)?)?;
    fs::write(&svg_path, chart(&r))?;
    println!("wrote {} and {}", json.display(), svg_path.display());
    Ok(())
}

fn batch(a: &DbBatchArgs) -> Result<Report> {
    let targets = a
        .targets
        .iter()
        .map(|t| {
            if t == LOCAL {
                Ok(Target::Local)
            } else if t == LOCAL_LOOP {
                Ok(Target::LocalLoop)
            } else {
                Peer::parse(t).map(Target::Peer)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let servers: Vec<Peer> = targets
        .iter()
        .filter_map(|t| match t {
            Target::Peer(s) => Some(*s),
            Target::Local | Target::LocalLoop => None,
        })
        .collect();
    let ingot_bin = peers::ingot_bin(a.ingot_bin.clone());
    let initdb = a.pg_bin.join("initdb");
    peers::check_tools(
        &servers,
        &ingot_bin,
        &[
            (initdb.to_str().unwrap_or("initdb"), "postgresql"),
            ("psql", "postgresql-client"),
            ("nbdfuse", "libnbd-bin"),
            ("fusermount3", "fuse3"),
            ("losetup", "util-linux"),
            ("mkfs.ext4", "e2fsprogs"),
        ],
    )?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("db-batch needs root (memory cgroup, losetup, mount, dropping caches, su postgres)");
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir() {
        bail!("no cgroup v1 memory controller at /sys/fs/cgroup/memory");
    }
    let start = Instant::now();
    fs::create_dir_all(&a.dir)?;
    // postgres must reach its directories under DIR.
    fs::set_permissions(&a.dir, fs::Permissions::from_mode(0o755))?;
    let data = a.dir.join("data");
    let size = gen::Size::from_scale(a.scale, a.commit_every);
    // ingot's pool is allocated up front; the others' raw files grow with the database.
    sys::ensure_space(&a.dir, a.volume_size + (1 << 30) + (a.scale * 1e9) as u64)?;
    eprintln!(
        "generating {} declarations ({} legacy-style, a commit every {} rows) ...",
        size.declarations, size.legacy_declarations, size.commit_every
    );
    let counts = gen::generate(&data, size, a.seed)?;
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755))?;
    eprintln!(
        "  {} traders, {} declarations, {} lines, {} MB of rows",
        counts.traders,
        counts.declarations,
        counts.lines,
        counts.csv_bytes / 1_000_000
    );
    let machine = sys::machine(&a.dir);
    let mut noise = Noise::default();
    let mut runs = Vec::new();
    let mut described = Vec::new();
    // Runs interleave targets, so that noise spreads over all of them.
    for run in 1..=a.runs {
        for &t in &targets {
            eprintln!(
                "[run {run}/{}  {:>3} s] {}",
                a.runs,
                start.elapsed().as_secs(),
                t.name()
            );
            noise.sample();
            let (r, desc) = one_run(a, t, run, &data, &ingot_bin)
                .with_context(|| format!("{} run {run}", t.name()))?;
            if run == 1 {
                described.push((t.name().to_string(), desc));
            }
            eprintln!(
                "    {}  total {:.1} s; {}",
                PHASES
                    .iter()
                    .zip(&r.phase_seconds)
                    .map(|(p, s)| format!("{p} {s:.1}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.total_seconds,
                r.digest
            );
            runs.push(r);
        }
    }
    // The cgroup is empty once the last run stopped PostgreSQL.
    let _ = fs::remove_dir(CGROUP);
    let local_total = median(
        runs.iter()
            .filter(|r| r.target == a.baseline)
            .map(|r| r.total_seconds)
            .collect(),
    );
    let summary: Vec<Summary> = targets
        .iter()
        .map(|t| {
            let mine: Vec<&RunResult> = runs.iter().filter(|r| r.target == t.name()).collect();
            let total = median(mine.iter().map(|r| r.total_seconds).collect());
            Summary {
                target: t.name().into(),
                phase_seconds_median: (0..PHASES.len())
                    .map(|i| median(mine.iter().map(|r| r.phase_seconds[i]).collect()))
                    .collect(),
                total_seconds_median: total,
                total_seconds_min: mine
                    .iter()
                    .map(|r| r.total_seconds)
                    .fold(f64::INFINITY, f64::min),
                total_seconds_max: mine
                    .iter()
                    .map(|r| r.total_seconds)
                    .fold(f64::NEG_INFINITY, f64::max),
                storage_share_seconds: total - local_total,
                ratio_to_local: total / local_total,
                ingot: mine.last().and_then(|r| r.ingot.clone()),
            }
        })
        .collect();
    let digests_agree = runs.windows(2).all(|w| w[0].digest == w[1].digest);
    let goals = goals(&summary, &a.baseline);
    Ok(Report {
        machine,
        baseline: a.baseline.clone(),
        noise,
        scale: a.scale,
        data: counts,
        memory_limit_bytes: a.memory_limit,
        runs,
        summary,
        digests_agree,
        goals,
        servers: described,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}

fn goals(summary: &[Summary], baseline: &str) -> Vec<crate::compare::Goal> {
    use crate::compare::Goal;
    let get = |n: &str| summary.iter().find(|s| s.target == n);
    let mut out = Vec::new();
    let Some(ingot) = get("ingot") else {
        return out;
    };
    if get(baseline).is_some() {
        out.push(Goal {
            goal: format!("ingot total / {baseline} total (at most)"),
            ratio: ingot.ratio_to_local,
            wanted: 1.05,
            at_most: true,
            met: ingot.ratio_to_local <= 1.05,
        });
        for (peer, frac) in [("qemu-nbd", 1.0 / 3.0), ("nbdkit-file", 0.5)] {
            if let Some(p) = get(peer) {
                // A share at or below zero (the baseline was slower) makes the ratio meaningless.
                let r = if p.storage_share_seconds > 0.0 {
                    ingot.storage_share_seconds.max(0.0) / p.storage_share_seconds
                } else {
                    f64::NAN
                };
                out.push(Goal {
                    goal: format!("ingot storage share / {peer} storage share (at most)"),
                    ratio: r,
                    wanted: frac,
                    at_most: true,
                    met: r <= frac,
                });
            }
        }
    }
    if let Some(b) = &ingot.ingot {
        let r = b.stored_bytes as f64 / b.logical_mapped_bytes.max(1) as f64;
        out.push(Goal {
            goal: "ingot stored bytes / logical mapped bytes (below)".into(),
            ratio: r,
            wanted: 1.0,
            at_most: true,
            met: r < 1.0,
        });
    }
    out
}

/// Everything one run set up, torn down in reverse order (also on error).
#[derive(Default)]
struct Stack {
    server: Option<Running>,
    fuse: Option<(PathBuf, Child)>,
    loop_dev: Option<String>,
    mount: Option<PathBuf>,
    pg: Option<(PathBuf, PathBuf)>,
    pg_bin: PathBuf,
}

impl Stack {
    fn pg_ctl(&self, pgdata: &Path, args: &str) -> Result<()> {
        su_postgres(&format!(
            "{} -D {} {args}",
            self.pg_bin.join("pg_ctl").display(),
            pgdata.display()
        ))
    }

    fn stop_pg(&mut self) -> Result<()> {
        if let Some((pgdata, _)) = self.pg.take() {
            self.pg_ctl(&pgdata, "-m fast -w stop")?;
        }
        Ok(())
    }

    /// Unmount and detach the volume, leaving the server running (for its stats).
    fn unmount(&mut self) -> Result<()> {
        self.stop_pg()?;
        if let Some(m) = self.mount.take() {
            run_quiet(Command::new("umount").arg(&m))?;
        }
        if let Some(d) = self.loop_dev.take() {
            run_quiet(Command::new("losetup").args(["-d", &d]))?;
        }
        if let Some((mnt, mut child)) = self.fuse.take() {
            let _ = run_quiet(Command::new("fusermount3").arg("-u").arg(&mnt));
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<()> {
        let r = self.unmount();
        if let Some(mut s) = self.server.take() {
            s.stop()?;
        }
        r
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

fn su_postgres(cmd: &str) -> Result<()> {
    run_quiet(Command::new("su").args(["postgres", "-s", "/bin/sh", "-c", cmd]))?;
    Ok(())
}

fn chown_postgres(p: &Path) -> Result<()> {
    run_quiet(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p),
    )?;
    Ok(())
}

/// Unmount and detach whatever an earlier, interrupted run left under `work`.
fn clean_stale(work: &Path) {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mnt = work.join("mnt");
    let fuse = work.join("fuse");
    let pgdata = mnt.join("pgdata");
    if pgdata.join("postmaster.pid").exists() {
        let _ = Command::new("su")
            .args([
                "postgres",
                "-s",
                "/bin/sh",
                "-c",
                &format!(
                    "/usr/lib/postgresql/15/bin/pg_ctl -D {} -m immediate stop",
                    pgdata.display()
                ),
            ])
            .output();
    }
    if mounts.contains(&format!(" {} ", mnt.display())) {
        let _ = Command::new("umount").arg(&mnt).output();
    }
    for backing in [fuse.join("nbd"), work.join("raw.img")] {
        if let Ok(o) = Command::new("losetup").arg("-j").arg(&backing).output() {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                if let Some(dev) = l.split(':').next() {
                    let _ = Command::new("losetup").args(["-d", dev]).output();
                }
            }
        }
    }
    if mounts.contains(&format!(" {} ", fuse.display())) {
        let _ = Command::new("fusermount3").arg("-u").arg(&fuse).output();
    }
}

fn psql(sock: &Path, db: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new("psql");
    c.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-U",
        "postgres",
        "-h",
    ])
    .arg(sock)
    .args(["-d", db])
    .args(args);
    run_quiet(&mut c)
}

fn timed(f: impl FnOnce() -> Result<String>) -> Result<(f64, String)> {
    let t = Instant::now();
    let out = f()?;
    Ok((t.elapsed().as_secs_f64(), out))
}

fn drop_caches() -> Result<()> {
    run_quiet(&mut Command::new("sync"))?;
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping caches (needs root)")?;
    Ok(())
}

fn one_run(
    a: &DbBatchArgs,
    t: Target,
    run: usize,
    data: &Path,
    ingot_bin: &Path,
) -> Result<(RunResult, String)> {
    let work = a.dir.join(t.name());
    clean_stale(&work);
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    fs::set_permissions(&work, fs::Permissions::from_mode(0o755))?;
    let mut st = Stack::default();
    st.pg_bin = a.pg_bin.clone();
    let mut desc = "PostgreSQL data directory on the working directory's file system".to_string();
    let root = match t {
        Target::Local => {
            let d = work.join("pg");
            fs::create_dir_all(&d)?;
            d
        }
        Target::LocalLoop => {
            let raw = work.join("raw.img");
            crate::fio::sparse_file(&raw, a.volume_size)?;
            desc = "ext4 on losetup --direct-io=on over a sparse raw file".into();
            mount_ext4(&mut st, &work, &raw)?
        }
        Target::Peer(server) => {
            let raw = work.join("raw.img");
            if server.uses_raw_file() {
                crate::fio::sparse_file(&raw, a.volume_size)?;
            }
            let spec = Spec {
                server,
                dir: work.clone(),
                raw_file: raw,
                size_bytes: a.volume_size,
                ingot_bin: ingot_bin.to_path_buf(),
                pool_bytes: a.volume_size + (1 << 30),
                prefill: a.ingot_prefill,
                ingot_args: a.ingot_args.clone(),
            };
            desc = spec.describe();
            let s = peers::start(&spec)?;
            let uri = s.uri.clone();
            st.server = Some(s);
            let fuse = work.join("fuse");
            fs::create_dir_all(&fuse)?;
            let child = Command::new("nbdfuse")
                .arg(&fuse)
                .arg(&uri)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(fs::File::create(work.join("nbdfuse.err.log"))?))
                .spawn()
                .context("starting nbdfuse")?;
            st.fuse = Some((fuse.clone(), child));
            let file = fuse.join("nbd");
            let deadline = Instant::now() + Duration::from_secs(30);
            while fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
                if Instant::now() > deadline {
                    bail!("nbdfuse did not show {}", file.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            mount_ext4(&mut st, &work, &file)?
        }
    };
    let pgdata = root.join("pgdata");
    let sock = work.join("sock");
    fs::create_dir_all(&pgdata)?;
    fs::create_dir_all(&sock)?;
    chown_postgres(&root)?;
    chown_postgres(&sock)?;
    su_postgres(&format!(
        "{} -D {} -U postgres --auth=trust --no-sync >/dev/null",
        a.pg_bin.join("initdb").display(),
        pgdata.display()
    ))?;
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(pgdata.join("postgresql.conf"))?;
    use std::io::Write;
    // Shared buffers at most a quarter of the cgroup, so that small limits leave room for
    // backends and the page cache instead of killing PostgreSQL.
    let shared_buffers_mib = (a.memory_limit >> 20).div_ceil(4).clamp(16, 128);
    writeln!(
        conf,
        "listen_addresses = ''\nunix_socket_directories = '{}'\nshared_buffers = {shared_buffers_mib}MB\nmax_wal_size = 1GB",
        sock.display()
    )?;
    drop(conf);
    let logfile = work.join("postgres.log");
    fs::File::create(&logfile)?;
    chown_postgres(&logfile)?;
    // The cgroup: PostgreSQL and its page cache get `memory_limit`.
    let cg = Path::new(CGROUP);
    if !cg.exists() {
        fs::create_dir(cg).context("creating the memory cgroup")?;
    }
    fs::write(cg.join("memory.limit_in_bytes"), a.memory_limit.to_string())?;
    let start_pg = |st: &mut Stack| -> Result<()> {
        run_quiet(Command::new("sh").args([
            "-c",
            &format!(
                "echo $$ > {CGROUP}/cgroup.procs && exec su postgres -s /bin/sh -c '{} -D {} -l {} -w start' >/dev/null",
                a.pg_bin.join("pg_ctl").display(),
                pgdata.display(),
                logfile.display()
            ),
        ]))?;
        st.pg = Some((pgdata.clone(), sock.clone()));
        Ok(())
    };
    start_pg(&mut st)?;
    psql(&sock, "postgres", &["-c", "CREATE DATABASE customs"])?;
    psql(&sock, "customs", &["-c", sql::SCHEMA])?;

    let mut phase = Vec::new();
    let (s, _) = timed(|| {
        psql(
            &sock,
            "customs",
            &["-f", &data.join("legacy.sql").display().to_string()],
        )
    })?;
    phase.push(s);
    let copy_script: String = sql::COPY_FILES
        .iter()
        .map(|(table, file)| {
            format!(
                "\\copy {table} from '{}' with (format csv)\n",
                data.join(file).display()
            )
        })
        .collect();
    let copy_file = work.join("copy.sql");
    fs::write(&copy_file, copy_script)?;
    let (s, _) = timed(|| psql(&sock, "customs", &["-f", &copy_file.display().to_string()]))?;
    phase.push(s);
    let (s, _) = timed(|| psql(&sock, "customs", &["-c", sql::INDEXES]))?;
    phase.push(s);
    let (s, _) = timed(|| psql(&sock, "customs", &["-c", "CHECKPOINT"]))?;
    phase.push(s);
    // Cold caches for the queries: restart PostgreSQL (shared buffers) and drop the page cache.
    st.stop_pg()?;
    drop_caches()?;
    let _ = fs::write(cg.join("memory.force_empty"), "0");
    start_pg(&mut st)?;
    let queries = work.join("queries.sql");
    fs::write(&queries, sql::QUERIES)?;
    let (s, out) = timed(|| psql(&sock, "customs", &["-f", &queries.display().to_string()]))?;
    phase.push(s);
    let digest = out
        .lines()
        .find(|l| l.starts_with("digest "))
        .unwrap_or("no digest")
        .to_string();
    let (s, _) = timed(|| psql(&sock, "customs", &["-c", "VACUUM ANALYZE"]))?;
    phase.push(s);
    let database_bytes = psql(
        &sock,
        "postgres",
        &["-c", "SELECT pg_database_size('customs')"],
    )?
    .trim()
    .parse()
    .unwrap_or(0);
    st.unmount()?;
    let ingot = match &st.server {
        Some(s) if s.server == Peer::Ingot => {
            let v = s.ingot_stats()?;
            let g = |k: &str| v[k].as_u64().unwrap_or(0);
            Some(IngotBytes {
                logical_mapped_bytes: g("logical_mapped_bytes"),
                stored_bytes: g("stored_bytes"),
                physical_used_bytes: g("physical_used_bytes"),
            })
        }
        _ => None,
    };
    st.teardown()?;
    let _ = fs::remove_dir_all(&work);
    let total = phase.iter().sum();
    Ok((
        RunResult {
            target: t.name().into(),
            run,
            phase_seconds: phase,
            total_seconds: total,
            digest,
            database_bytes,
            ingot,
        },
        desc,
    ))
}

/// `losetup --direct-io=on` over `file`, mkfs.ext4, mount on `work/mnt`.
fn mount_ext4(st: &mut Stack, work: &Path, file: &Path) -> Result<PathBuf> {
    let dev = run_quiet(
        Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file),
    )?
    .trim()
    .to_string();
    st.loop_dev = Some(dev.clone());
    run_quiet(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", &dev]))?;
    let mnt = work.join("mnt");
    fs::create_dir_all(&mnt)?;
    run_quiet(
        Command::new("mount")
            .args(["-o", "noatime", &dev])
            .arg(&mnt),
    )?;
    st.mount = Some(mnt.clone());
    Ok(mnt)
}

fn secs(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "-".into()
    }
}

pub fn table(r: &Report) -> String {
    let mut s = String::new();
    s.push_str("| target |");
    for p in PHASES {
        s.push_str(&format!(" {p} s |"));
    }
    s.push_str(&format!(
        " total s | total min–max s | storage share s | ÷ {} |\n|---|",
        r.baseline
    ));
    for _ in 0..PHASES.len() + 4 {
        s.push_str("---:|");
    }
    s.push('\n');
    for x in &r.summary {
        s.push_str(&format!("| {} |", x.target));
        for v in &x.phase_seconds_median {
            s.push_str(&format!(" {} |", secs(*v)));
        }
        s.push_str(&format!(
            " {} | {}–{} | {} | {:.2}x |\n",
            secs(x.total_seconds_median),
            secs(x.total_seconds_min),
            secs(x.total_seconds_max),
            secs(x.storage_share_seconds),
            x.ratio_to_local
        ));
    }
    s.push_str(&format!(
        "\nMedian of {} runs; {} declarations, {} lines; PostgreSQL database {} MB; memory cgroup {} MiB. \
         Results {} on every run.\n",
        r.runs.len() / r.summary.len().max(1),
        r.data.declarations,
        r.data.lines,
        r.runs.iter().map(|x| x.database_bytes).max().unwrap_or(0) / 1_000_000,
        r.memory_limit_bytes >> 20,
        if r.digests_agree {
            format!(
                "identical ({})",
                r.runs.first().map(|x| x.digest.as_str()).unwrap_or("")
            )
        } else {
            "DIFFER".into()
        }
    ));
    if let Some(b) = r.summary.iter().find_map(|x| x.ingot.as_ref()) {
        s.push_str(&format!(
            "ingot: {} MB logical (mapped), {} MB stored, {} MB of segments used.\n",
            b.logical_mapped_bytes / 1_000_000,
            b.stored_bytes / 1_000_000,
            b.physical_used_bytes / 1_000_000
        ));
    }
    if !r.goals.is_empty() {
        s.push_str("\n| goal (this run) | ratio | wanted | met |\n|---|---:|---:|---|\n");
        for g in &r.goals {
            s.push_str(&format!(
                "| {} | {} | {:.2} | {} |\n",
                g.goal,
                if g.ratio.is_finite() {
                    format!("{:.2}", g.ratio)
                } else {
                    "n/a (baseline slower than the peer)".into()
                },
                g.wanted,
                if g.met { "yes" } else { "**no**" }
            ));
        }
    }
    s
}

fn chart(r: &Report) -> String {
    let series: Vec<String> = r.summary.iter().map(|x| x.target.clone()).collect();
    let mut panels: Vec<svg::Panel> = PHASES
        .iter()
        .enumerate()
        .map(|(i, p)| svg::Panel {
            title: (*p).into(),
            unit: "seconds (median)".into(),
            values: r
                .summary
                .iter()
                .map(|x| x.phase_seconds_median[i])
                .collect(),
        })
        .collect();
    panels.push(svg::Panel {
        title: "total".into(),
        unit: "seconds (median)".into(),
        values: r.summary.iter().map(|x| x.total_seconds_median).collect(),
    });
    panels.push(svg::Panel {
        title: format!("storage share (total - {})", r.baseline),
        unit: "seconds".into(),
        values: r
            .summary
            .iter()
            .map(|x| x.storage_share_seconds.max(0.0))
            .collect(),
    });
    svg::chart(
        "Nightly customs risk batch in PostgreSQL 15 on ext4 on each volume (lower is better)",
        &format!(
            "{} cores, {} GiB; {} declarations / {} lines; cgroup {} MiB; {}",
            r.machine.cores,
            r.machine.memory_gib,
            r.data.declarations,
            r.data.lines,
            r.memory_limit_bytes >> 20,
            r.noise.summary()
        ),
        &series,
        &panels,
    )
}
