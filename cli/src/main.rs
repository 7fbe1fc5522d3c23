//! `ingot`: create pools, manage volumes, serve them over NBD, and check them.

mod control;
mod metrics;
mod size;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ingot_engine::{CreateOptions, DedupDomain, IoKind, Pool, PoolOptions, Stats, VolumeInfo};
use ingot_iscsi::{ChapConfig, IscsiTarget, TargetConfig as IscsiConfig};
use ingot_nbd::{ListenAddr, NbdServer, PoolExports, ServerConfig, TlsConfig};

use control::Request;
use size::{human, parse_size};

const DEFAULT_POOL: &str = "./ingot-data";
const DEFAULT_NBD: &str = "127.0.0.1:10809";
const DEFAULT_POOL_BYTES: u64 = 16 << 30;
const DEFAULT_VOLUME_BYTES: u64 = 8 << 30;
const DEFAULT_VOLUME: &str = "vol0";

#[derive(Parser)]
#[command(
    name = "ingot",
    version,
    about = "A log-structured, all-flash block store served over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct PoolArg {
    /// Pool directory.
    #[arg(long, default_value = DEFAULT_POOL)]
    pool: PathBuf,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// I/O engine: auto (io_uring when available), uring, sync.
    #[arg(long, default_value = "auto", value_parser = parse_io)]
    io: IoKind,
    /// DRAM read cache size (default: a tenth of available memory, at most 4 GiB).
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Shard workers (default: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Client bytes written between automatic checkpoints; bounds recovery time.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    checkpoint_interval: u64,
    /// RAM for the dedup index (default: 2% of physical memory, at least 64 MiB); past it the
    /// index keeps a sample of fingerprints.
    #[arg(long, value_parser = parse_size)]
    dedup_index_mem: Option<u64>,
    /// Write-back buffer: writes without FUA are acknowledged once the engine has taken them,
    /// up to this many bytes not yet on the device; FLUSH, SYNCHRONIZE CACHE and FUA writes
    /// make them durable. 0: acknowledge each write once it is stored (write-through). At most
    /// a sixty-fourth of the pool's usable capacity.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    write_back: u64,
}

impl RunArgs {
    fn options(&self) -> PoolOptions {
        PoolOptions {
            io: self.io,
            shards: self.shards,
            cache_bytes: self.cache_size,
            checkpoint_interval_bytes: self.checkpoint_interval,
            fault: None,
            dedup_index_bytes: self.dedup_index_mem,
            write_back_bytes: self.write_back,
            read_only: false,
        }
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

fn parse_domain(s: &str) -> Result<DedupDomain, String> {
    s.parse()
        .map_err(|e: ingot_engine::InvalidDedupDomain| e.to_string())
}

fn parse_io(s: &str) -> Result<IoKind, String> {
    s.parse()
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or inspect pools.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Serve every volume of a pool over NBD (creates a default pool in an empty directory).
    Serve {
        #[command(flatten)]
        pool: PoolArg,
        /// NBD listener: HOST:PORT, [::1]:PORT or unix:PATH (repeatable).
        #[arg(long = "nbd")]
        nbd: Vec<String>,
        /// Serve every export read-only.
        #[arg(long)]
        read_only: bool,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics.
        #[arg(long)]
        metrics: Option<String>,
        #[command(flatten)]
        nbd_opts: NbdArgs,
        #[command(flatten)]
        iscsi: IscsiArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Create, list, resize and delete volumes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Capacity, usage and I/O counters.
    Stats {
        #[command(flatten)]
        pool: PoolArg,
        /// Print one JSON object.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print Prometheus text format.
        #[arg(long)]
        prometheus: bool,
    },
    /// Clean now: rewrite the live data of partly dead segments so their space comes back.
    Gc {
        #[command(flatten)]
        pool: PoolArg,
        /// Clean segments at most this full (0.0-1.0).
        #[arg(long, default_value_t = 0.9)]
        max_utilisation: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify every block checksum and the pool's invariants; non-zero exit on any problem.
    Check {
        #[command(flatten)]
        pool: PoolArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// NBD server settings of `ingot serve`.
#[derive(clap::Args)]
struct NbdArgs {
    /// Offer TLS (NBD_OPT_STARTTLS) with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse clients that do not switch to TLS.
    #[arg(long, requires = "tls_cert")]
    tls_required: bool,
    /// Connections served at once; more are closed right after accept.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Connections that may be negotiating at once (a budget apart from --max-connections);
    /// over it the oldest handshake is closed. Each handshake gets 10 s in all
    /// (INGOT_HANDSHAKE_TIMEOUT_MS overrides that, for tests).
    #[arg(long, default_value_t = ingot_nbd::DEFAULT_MAX_HANDSHAKES)]
    max_handshakes: usize,
    /// Disconnect clients that send no request for this many seconds while nothing is in
    /// flight (0: never).
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Disconnect clients that stall this many seconds in the middle of a request, or leave a
    /// reply unread that long (0: never).
    #[arg(long, default_value_t = 60)]
    request_timeout: u64,
}

/// Time a client gets for the whole NBD handshake: `INGOT_HANDSHAKE_TIMEOUT_MS` when set (tests
/// shorten it), else the server's default.
fn handshake_timeout() -> Result<std::time::Duration> {
    match std::env::var("INGOT_HANDSHAKE_TIMEOUT_MS") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(std::time::Duration::from_millis(ms)),
            _ => bail!(
                "INGOT_HANDSHAKE_TIMEOUT_MS={v:?}: expected a positive number of milliseconds"
            ),
        },
        Err(_) => Ok(ingot_nbd::DEFAULT_HANDSHAKE_TIMEOUT),
    }
}

/// iSCSI target settings of `ingot serve`.
#[derive(clap::Args)]
struct IscsiArgs {
    /// Also serve every volume as iSCSI target iqn.2026-11.io.ingot:VOLUME on HOST[:PORT]
    /// (port 3260 when left out; repeatable).
    #[arg(long = "iscsi")]
    iscsi: Vec<String>,
    /// CHAP secrets: lines `VOLUME USER SECRET [MUTUAL_USER MUTUAL_SECRET]`; VOLUME `*` covers
    /// every volume not listed. Listed targets refuse logins without CHAP.
    #[arg(long)]
    iscsi_chap_file: Option<PathBuf>,
}

impl IscsiArgs {
    /// Start the iSCSI target when `--iscsi` was given.
    fn start(&self, pool: &Arc<Pool>) -> Result<Option<IscsiTarget>> {
        if self.iscsi.is_empty() {
            return Ok(None);
        }
        let mut cfg = IscsiConfig::default();
        if let Some(path) = &self.iscsi_chap_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.is_empty() || f[0].starts_with('#') {
                    continue;
                }
                if f.len() != 3 && f.len() != 5 {
                    bail!(
                        "{}:{}: expected VOLUME USER SECRET [MUTUAL_USER MUTUAL_SECRET]",
                        path.display(),
                        n + 1
                    );
                }
                let chap = ChapConfig {
                    user: f[1].to_string(),
                    secret: f[2].to_string(),
                    mutual: (f.len() == 5).then(|| (f[3].to_string(), f[4].to_string())),
                };
                if f[0] == "*" {
                    cfg.default_chap = Some(chap);
                } else {
                    cfg.chap.insert(f[0].to_string(), chap);
                }
            }
        }
        let target = IscsiTarget::new(pool.clone(), cfg);
        for l in &self.iscsi {
            let addr = target
                .listen(l)
                .with_context(|| format!("--iscsi {l}: listening"))?;
            println!("ingot: serving iSCSI on {addr}");
        }
        Ok(Some(target))
    }
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create a pool.
    Create {
        #[command(flatten)]
        pool: PoolArg,
        /// Capacity (K/M/G/T suffixes).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Segment size, a power of two from 2M to 1G.
        #[arg(long, default_value = "8M", value_parser = parse_size)]
        segment_size: u64,
        /// Backing file or block device (repeatable; default: dev0.img in the pool directory).
        #[arg(long)]
        device: Vec<PathBuf>,
        /// Write zeroes over the backing files first, so log writes never allocate file blocks
        /// (faster writes on a file system; freed space is then not returned to it).
        #[arg(long)]
        prefill: bool,
        /// Overwrite devices that hold data or another pool (destroying it). A device that a
        /// running pool uses is refused all the same.
        #[arg(long)]
        force: bool,
    },
}

/// A volume's data reduction policy; what is not given stays as it is.
#[derive(clap::Args, Clone)]
struct PolicyArgs {
    /// Deduplicate new writes: on or off.
    #[arg(long, value_parser = parse_on_off)]
    dedup: Option<bool>,
    /// Compress new writes: on or off.
    #[arg(long, value_parser = parse_on_off)]
    compression: Option<bool>,
    /// Which volumes new writes deduplicate against: "shared" (every shared volume; the
    /// default), "private" (this volume alone) or a domain NAME (the volumes naming it).
    /// Blocks never deduplicate across domains.
    #[arg(long, value_name = "NAME|shared|private", value_parser = parse_domain)]
    dedup_domain: Option<DedupDomain>,
}

impl PolicyArgs {
    fn is_empty(&self) -> bool {
        self.dedup.is_none() && self.compression.is_none() && self.dedup_domain.is_none()
    }
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a thin volume (deduplication and compression on unless turned off).
    Create {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Change a volume's data reduction policy, online; applies to new writes.
    Set {
        name: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        pool: PoolArg,
        #[arg(long)]
        json: bool,
    },
    /// Take a read-only snapshot of a volume, online: every write acknowledged before it is
    /// in it. No data is copied (blocks are shared until overwritten).
    Snapshot {
        /// The volume to snapshot.
        source: String,
        /// Name of the snapshot (a read-only volume, served like any other).
        name: String,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Create a writable volume from a volume or snapshot, online, sharing its blocks.
    Clone {
        /// The volume or snapshot to copy.
        source: String,
        /// Name of the new volume.
        name: String,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Copy a raw disk image (file or block device) into a new volume, with the pool not
    /// served (online, create the volume and copy with `nbdcopy`). Holes and zero blocks of the
    /// image stay holes; progress on a terminal.
    Import {
        /// Name of the new volume.
        name: String,
        /// The raw image to read.
        #[arg(long)]
        file: PathBuf,
        /// Volume size (default: the image's size, rounded up to 512 bytes).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Delete a volume and free its blocks.
    Delete {
        name: String,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Change a volume's size (shrinking discards the data past the new end).
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        pool: PoolArg,
    },
}

/// Record buffers are ~100 KiB to 1 MiB and short-lived: served from glibc's heap instead of
/// fresh mmaps they cost no page faults (measured: 4% of the write path in page faults).
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ingot: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            std::process::exit(1);
        }
    }
}

/// What to do about an engine error, in the CLI's own words (the engine names no command).
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    use ingot_engine::Error as E;
    let e = e.chain().find_map(|c| c.downcast_ref::<E>())?;
    Some(match e {
        E::Locked { .. } | E::DeviceInUse { .. } => {
            "is `ingot serve` running on this pool or one that uses the device?"
        }
        E::DeviceHoldsData { .. } => "pass --force to destroy what it holds",
        E::NotAPool { .. } => "create one with `ingot pool create`",
        _ => return None,
    })
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Pool {
            cmd:
                PoolCmd::Create {
                    pool,
                    size,
                    segment_size,
                    device,
                    prefill,
                    force,
                },
        } => {
            if prefill {
                eprintln!("ingot: writing zeroes over {} ...", human(size));
            }
            let c = CreateOptions {
                size_bytes: size,
                segment_bytes: segment_size,
                devices: device,
                prefill,
                force,
            };
            let p = Pool::create(&pool.pool, &c, &PoolOptions::default())
                .with_context(|| format!("creating a pool in {}", pool.pool.display()))?;
            let s = p.stats();
            p.shutdown()?;
            println!(
                "created pool {} with {} ({} segments of {})",
                pool.pool.display(),
                human(s.capacity_bytes),
                s.segments_total,
                human(s.segment_bytes)
            );
            Ok(0)
        }
        Cmd::Serve {
            pool,
            nbd,
            read_only,
            metrics,
            nbd_opts,
            iscsi,
            run,
        } => serve(&pool.pool, nbd, read_only, metrics, &nbd_opts, &iscsi, &run),
        Cmd::Volume { cmd } => volume(cmd),
        Cmd::Stats {
            pool,
            json,
            prometheus,
        } => {
            let v = request(&pool.pool, Request::Stats)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let s: Stats = serde_json::from_value(v)?;
                if prometheus {
                    print!("{}", metrics::render(&s));
                } else {
                    print_stats(&s);
                }
            }
            Ok(0)
        }
        Cmd::Check { pool, json } => check(&pool.pool, json),
        Cmd::Gc {
            pool,
            max_utilisation,
            json,
        } => gc(&pool.pool, max_utilisation, json),
    }
}

/// Run a control request: through the server's socket when one holds the pool, otherwise by
/// opening the pool here.
fn request(dir: &Path, req: Request) -> Result<serde_json::Value> {
    if let Some(r) = control::call(dir, &req) {
        return r;
    }
    // Requests that only look open the pool without writing to it (a pool whose host file
    // system is full still answers them).
    let read_only = matches!(req, Request::VolumeList | Request::Stats | Request::Check);
    let o = PoolOptions {
        read_only,
        ..PoolOptions::default()
    };
    let pool = Pool::open(dir, &o).with_context(|| format!("opening pool {}", dir.display()))?;
    let r = control::execute(&pool, &req);
    pool.shutdown()?;
    r
}

fn set_policy(pool: &Path, name: &str, policy: PolicyArgs) -> Result<()> {
    let req = Request::VolumeSet {
        name: name.to_string(),
        dedup: policy.dedup,
        compression: policy.compression,
        dedup_domain: policy.dedup_domain,
    };
    request(pool, req).map(|_| ())
}

fn volume(cmd: VolumeCmd) -> Result<i32> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            mut policy,
            pool,
        } => {
            // The domain is set at creation, so that no write lands outside it.
            request(
                &pool.pool,
                Request::VolumeCreate {
                    name: name.clone(),
                    size_bytes: size,
                    dedup_domain: policy.dedup_domain.take(),
                },
            )?;
            if !policy.is_empty() {
                set_policy(&pool.pool, &name, policy)?;
            }
            println!("created volume {name} ({})", human(size));
        }
        VolumeCmd::Set { name, policy, pool } => {
            if policy.is_empty() {
                // A usage error, like a bad argument: clap's exit status.
                eprintln!(
                    "ingot: nothing to set: give --dedup on|off, --compression on|off and/or \
                     --dedup-domain NAME|shared|private"
                );
                return Ok(2);
            }
            let (dedup, compression) = (policy.dedup, policy.compression);
            let domain = policy.dedup_domain.clone();
            set_policy(&pool.pool, &name, policy)?;
            let word = |b: Option<bool>| match b {
                Some(true) => "on",
                Some(false) => "off",
                None => "unchanged",
            };
            println!(
                "volume {name}: dedup {}, compression {}, dedup domain {}",
                word(dedup),
                word(compression),
                domain.map_or_else(|| "unchanged".to_string(), |d| d.to_string())
            );
        }
        VolumeCmd::List { pool, json } => {
            let v = request(&pool.pool, Request::VolumeList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let vols: Vec<VolumeInfo> = serde_json::from_value(v)?;
                println!(
                    "{:<24} {:>12} {:>12} {:>6} {:>11} {:>6}  DEDUP-DOMAIN",
                    "NAME", "SIZE", "MAPPED", "DEDUP", "COMPRESSION", "ACCESS"
                );
                let word = |b: bool| if b { "on" } else { "off" };
                for v in vols {
                    println!(
                        "{:<24} {:>12} {:>12} {:>6} {:>11} {:>6}  {}",
                        v.name,
                        human(v.size_bytes),
                        human(v.mapped_bytes),
                        word(v.dedup),
                        word(v.compression),
                        if v.read_only { "ro" } else { "rw" },
                        v.dedup_domain
                    );
                }
            }
        }
        VolumeCmd::Snapshot { source, name, pool } => {
            request(
                &pool.pool,
                Request::VolumeSnapshot {
                    source: source.clone(),
                    name: name.clone(),
                },
            )?;
            println!("created snapshot {name} of {source} (read-only)");
        }
        VolumeCmd::Clone { source, name, pool } => {
            request(
                &pool.pool,
                Request::VolumeClone {
                    source: source.clone(),
                    name: name.clone(),
                },
            )?;
            println!("created volume {name} from {source}");
        }
        VolumeCmd::Import {
            name,
            file,
            size,
            policy,
            pool,
        } => import(&pool.pool, &name, &file, size, policy)?,
        VolumeCmd::Delete { name, pool } => {
            request(&pool.pool, Request::VolumeDelete { name: name.clone() })?;
            println!("deleted volume {name}");
        }
        VolumeCmd::Resize { name, size, pool } => {
            request(
                &pool.pool,
                Request::VolumeResize {
                    name: name.clone(),
                    size_bytes: size,
                },
            )?;
            println!("resized volume {name} to {}", human(size));
        }
    }
    Ok(0)
}

fn print_stats(s: &Stats) {
    println!(
        "capacity        {} ({} segments of {}, {} free)",
        human(s.capacity_bytes),
        s.segments_total,
        human(s.segment_bytes),
        s.segments_free
    );
    println!(
        "usable          {} for stored data (the rest holds checkpoints and the cleaner's headroom)",
        human(s.usable_bytes)
    );
    println!("physical used   {}", human(s.physical_used_bytes));
    println!("logical mapped  {}", human(s.logical_mapped_bytes));
    println!(
        "stored          {} ({:.1}% of usable)",
        human(s.stored_bytes),
        s.stored_bytes as f64 * 100.0 / s.usable_bytes.max(1) as f64
    );
    println!(
        "reduction       {:.2}x (dedup {:.2}x, compression {:.2}x; {} unique blocks)",
        s.data_reduction_ratio, s.dedup_ratio, s.compression_ratio, s.unique_blocks
    );
    println!(
        "dedup index     {} entries, {} of RAM, keeps 1 in {} fingerprints",
        s.dedup_index_entries,
        human(s.dedup_index_bytes),
        s.dedup_index_sampling
    );
    println!(
        "written         {} by clients, {} to devices",
        human(s.client_written_bytes),
        human(s.device_written_bytes)
    );
    println!(
        "cache           {} of {} ({} hits, {} misses)",
        human(s.cache_bytes),
        human(s.cache_capacity_bytes),
        s.cache_hits,
        s.cache_misses
    );
    println!("engine          {} x {} shards", s.io_engine, s.shards);
    if s.write_back_limit_bytes > 0 {
        println!(
            "write-back      {} of {} acknowledged, not yet stored ({} writes early since open)",
            human(s.write_back_bytes),
            human(s.write_back_limit_bytes),
            s.write_back_writes
        );
    }
    if let Some(w) = &s.space_warning {
        println!("warning         {w}");
    }
    if let Some(w) = &s.host_warning {
        println!("warning         {w}");
    }
    if let Some(h) = &s.halted {
        println!("HALTED          {h}");
    }
    for v in &s.volumes {
        println!(
            "volume {:<16} {:>12} mapped of {}, {} stored: reduction {:.2}x (dedup {:.2}x, compression {:.2}x)",
            v.name,
            human(v.mapped_bytes),
            human(v.size_bytes),
            human(v.stored_bytes),
            v.data_reduction_ratio,
            v.dedup_ratio,
            v.compression_ratio
        );
    }
}

fn import(
    dir: &Path,
    name: &str,
    file: &Path,
    size: Option<u64>,
    policy: PolicyArgs,
) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    const IN_FLIGHT: usize = 16;
    const BLOCK: usize = 4096;
    if control::call(dir, &Request::VolumeList).is_some() {
        bail!(
            "pool {} is served by a running `ingot serve`: create the volume with `ingot volume \
             create`, then copy into it with `nbdcopy {} 'nbd+unix:///{name}?socket=SOCKET'` \
             (or stop the server and import again)",
            dir.display(),
            file.display()
        );
    }
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    // Seeking to the end sizes block devices too (their metadata says 0).
    let image = (&f)
        .seek(SeekFrom::End(0))
        .with_context(|| format!("sizing {}", file.display()))?;
    let vol_size = size.unwrap_or(image.next_multiple_of(512)).max(512);
    if image > vol_size {
        bail!(
            "{} holds {} but --size is {}",
            file.display(),
            human(image),
            human(vol_size)
        );
    }
    let pool = Pool::open(dir, &PoolOptions::default())
        .with_context(|| format!("opening pool {}", dir.display()))?;
    let start = std::time::Instant::now();
    let stored_before = pool.stats().stored_bytes;
    pool.create_volume_in(name, vol_size, policy.dedup_domain.unwrap_or_default())?;
    if policy.dedup.is_some() || policy.compression.is_some() {
        pool.set_volume_policy(name, policy.dedup, policy.compression)?;
    }
    let vol = pool.volume(name)?;
    let tty = std::io::stderr().is_terminal();
    let (tx, rx) = crossbeam_channel::unbounded::<ingot_engine::Result<()>>();
    let mut in_flight = 0usize;
    let mut first_err: Option<ingot_engine::Error> = None;
    // Collect the writes that finished, then wait until at most `max` are in flight.
    let settle =
        |in_flight: &mut usize, max: usize, first_err: &mut Option<ingot_engine::Error>| {
            let mut note = |r: ingot_engine::Result<()>, in_flight: &mut usize| {
                *in_flight -= 1;
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            };
            while let Ok(r) = rx.try_recv() {
                note(r, in_flight);
            }
            while *in_flight > max {
                match rx.recv() {
                    Ok(r) => note(r, in_flight),
                    Err(_) => break,
                }
            }
        };
    let (mut written, mut last_shown) = (0u64, 0u64);
    let mut first_read_err: Option<String> = None;
    let mut buf = vec![0u8; CHUNK];
    // Where the file system cannot tell (a block device), all of the image may hold data.
    let extents = ingot_engine::io::sync::data_extents(&f, image).unwrap_or(vec![(0, image)]);
    'extents: for (from, to) in extents {
        let mut at = from - from % BLOCK as u64;
        while at < to {
            let n = ((to - at) as usize).min(CHUNK);
            let got = &mut buf[..n];
            if let Err(e) = f.read_exact_at(got, at) {
                first_read_err = Some(format!("reading {} at {at}: {e}", file.display()));
                break 'extents;
            }
            // Runs of blocks that are not all zeroes (a new volume reads zeroes elsewhere).
            let mut i = 0;
            while i < n {
                let nonzero = |j: usize| got[j..(j + BLOCK).min(n)].iter().any(|&b| b != 0);
                if !nonzero(i) {
                    i += BLOCK;
                    continue;
                }
                let mut j = i;
                while j < n && nonzero(j) {
                    j += BLOCK;
                }
                let end = j.min(n);
                // The image's last bytes go out padded to the volume's 512-byte sectors.
                let mut data = got[i..end].to_vec();
                data.resize(data.len().next_multiple_of(512), 0);
                written += data.len() as u64;
                let tx = tx.clone();
                vol.submit(
                    ingot_engine::Request::Write {
                        offset: at + i as u64,
                        data: bytes::Bytes::from(data),
                        fua: false,
                    },
                    Box::new(move |r| {
                        let _ = tx.send(r.map(|_| ()));
                    }),
                );
                in_flight += 1;
                settle(&mut in_flight, IN_FLIGHT, &mut first_err);
                if first_err.is_some() {
                    break 'extents;
                }
                i = j;
            }
            at += n as u64;
            if tty && (at - last_shown >= image / 100 || at >= image) {
                last_shown = at;
                eprint!(
                    "\rimporting: {} of {} ({}%)",
                    human(at),
                    human(image),
                    at * 100 / image.max(1)
                );
            }
        }
    }
    settle(&mut in_flight, 0, &mut first_err);
    if tty {
        eprintln!("\rimporting: {} of {} (100%)", human(image), human(image));
    }
    let failed = match (first_err, first_read_err) {
        (Some(e), _) => Some(e.to_string()),
        (None, Some(e)) => Some(e),
        (None, None) => vol.flush().err().map(|e| e.to_string()),
    };
    if let Some(why) = failed {
        // A half-written volume would pass for an import: take it away again.
        let gone = pool.delete_volume(name);
        let _ = pool.shutdown();
        let left = match gone {
            Ok(()) => "the partial volume was deleted".to_string(),
            Err(e) => format!("the partial volume {name} is left (deleting it failed: {e})"),
        };
        bail!("importing {} into {name}: {why}; {left}", file.display());
    }
    let stored = pool.stats().stored_bytes.saturating_sub(stored_before);
    pool.shutdown()?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "imported {} into volume {name} ({}): {} of data written, the rest holes; {} stored; \
         {:.1} s ({:.0} MB/s)",
        file.display(),
        human(vol_size),
        human(written),
        human(stored),
        secs,
        image as f64 / secs.max(1e-9) / 1e6
    );
    Ok(())
}

fn check(dir: &Path, json: bool) -> Result<i32> {
    let report: ingot_engine::CheckReport = match control::call(dir, &Request::Check) {
        Some(r) => serde_json::from_value(r?)?,
        None => {
            // Checking writes nothing: it works on a pool whose host file system is full.
            let o = PoolOptions {
                read_only: true,
                ..PoolOptions::default()
            };
            let pool =
                Pool::open(dir, &o).with_context(|| format!("opening pool {}", dir.display()))?;
            let tty = std::io::stderr().is_terminal();
            let r = pool.check(&mut |done, total| {
                if tty && (done % 4096 == 0 || done == total) {
                    eprint!("\rchecking blocks: {done}/{total}");
                }
            });
            if tty {
                eprintln!();
            }
            pool.shutdown()?;
            r
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("PROBLEM [{}] {}", p.kind, p.detail);
        }
        println!(
            "checked {} volumes, {} blocks ({}): {} problems",
            report.volumes_checked,
            report.blocks_checked,
            human(report.bytes_checked),
            report.problems.len()
        );
    }
    Ok(if report.problems.is_empty() { 0 } else { 1 })
}

fn gc(dir: &Path, max_utilisation: f64, json: bool) -> Result<i32> {
    if !(0.0..=1.0).contains(&max_utilisation) {
        bail!("--max-utilisation must be between 0 and 1");
    }
    let req = Request::Gc { max_utilisation };
    let report: ingot_engine::GcReport = match control::call(dir, &req) {
        Some(r) => serde_json::from_value(r?)?,
        None => {
            let pool = Pool::open(dir, &PoolOptions::default())
                .with_context(|| format!("opening pool {}", dir.display()))?;
            let tty = std::io::stderr().is_terminal();
            let r = pool.gc(max_utilisation, &mut |done, total| {
                if tty {
                    eprint!("\rcleaning segments: {done}/{total}");
                }
            });
            if tty {
                eprintln!();
            }
            let s = pool.shutdown();
            let r = r?;
            s?;
            r
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "cleaned {} segments, moved {}, freed {} segments",
            report.segments_cleaned,
            human(report.bytes_moved),
            report.segments_freed
        );
    }
    Ok(0)
}

fn dir_is_empty_or_missing(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut it) => it.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

fn serve(
    dir: &Path,
    nbd: Vec<String>,
    read_only: bool,
    metrics_addr: Option<String>,
    nbd_opts: &NbdArgs,
    iscsi: &IscsiArgs,
    run: &RunArgs,
) -> Result<i32> {
    let opts = PoolOptions {
        read_only,
        ..run.options()
    };
    let pool = if dir_is_empty_or_missing(dir) {
        if read_only {
            bail!("{} holds no pool to serve read-only", dir.display());
        }
        let c = CreateOptions {
            size_bytes: DEFAULT_POOL_BYTES,
            ..Default::default()
        };
        let p = Pool::create(dir, &c, &opts)
            .with_context(|| format!("creating a pool in {}", dir.display()))?;
        p.create_volume(DEFAULT_VOLUME, DEFAULT_VOLUME_BYTES)?;
        println!(
            "ingot: created pool {} ({}) with volume {DEFAULT_VOLUME} ({})",
            dir.display(),
            human(DEFAULT_POOL_BYTES),
            human(DEFAULT_VOLUME_BYTES)
        );
        p
    } else {
        if !Pool::exists(dir) {
            bail!(
                "{} is not empty and holds no pool; create one with `ingot pool create --pool {} --size SIZE`",
                dir.display(),
                dir.display()
            );
        }
        Pool::open(dir, &opts).map_err(|e| {
            let full = matches!(&e, ingot_engine::Error::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC));
            let e = anyhow::Error::new(e).context(format!("opening pool {}", dir.display()));
            if full {
                e.context(
                    "the file system under the pool is full: opening it read-write needs room \
                     for a checkpoint; free or add space, or serve it with --read-only",
                )
            } else {
                e
            }
        })?
    };
    let pool = Arc::new(pool);
    let listens = if nbd.is_empty() {
        vec![DEFAULT_NBD.to_string()]
    } else {
        nbd
    };
    let tls = match (&nbd_opts.tls_cert, &nbd_opts.tls_key) {
        (Some(cert), Some(key)) => Some(
            TlsConfig::from_pem_files(cert, key)
                .with_context(|| format!("loading TLS certificate {}", cert.display()))?,
        ),
        _ => None,
    };
    let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
    let cfg = ServerConfig {
        read_only,
        tls,
        tls_required: nbd_opts.tls_required,
        max_connections: nbd_opts.max_connections,
        max_handshakes: nbd_opts.max_handshakes,
        handshake_timeout: Some(handshake_timeout()?),
        idle_timeout: secs(nbd_opts.idle_timeout),
        request_timeout: secs(nbd_opts.request_timeout),
        reply_timeout: secs(nbd_opts.request_timeout),
        ..Default::default()
    };
    let server = NbdServer::new(Arc::new(PoolExports::new(pool.clone())), cfg);
    if let Err(e) = control::serve(dir, pool.clone()) {
        // A full host file system cannot take the socket; the volumes are still served, but
        // `volume`, `stats` and `check` cannot reach this server.
        eprintln!("ingot: warning: no control socket: {e:#}");
    }
    let iscsi_target = iscsi.start(&pool)?;
    for l in &listens {
        let addr: ListenAddr = l.parse().map_err(|e| anyhow::anyhow!("--nbd {l}: {e}"))?;
        let h = server
            .listen(&addr)
            .with_context(|| format!("listening on {l}"))?;
        println!("ingot: serving NBD on {}", h.local_addr());
    }
    if let Some(addr) = metrics_addr {
        let local = metrics::serve(&addr, pool.clone())?;
        println!("ingot: serving metrics on http://{local}/metrics");
    }
    let s = pool.stats();
    println!(
        "ingot: pool {} ({} io, {} shards), volumes: {}",
        dir.display(),
        s.io_engine,
        s.shards,
        s.volumes
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(w) = &s.host_warning {
        eprintln!("ingot: warning: {w}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Wait for SIGINT or SIGTERM.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("ingot: shutting down");
    server.shutdown();
    if let Some(t) = iscsi_target {
        t.shutdown();
    }
    let _ = std::fs::remove_file(control::socket_path(dir));
    pool.shutdown().context("final checkpoint")?;
    Ok(0)
}
