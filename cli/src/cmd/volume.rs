//! `ingot volume ...`: create, set, list, snapshot, clone, delete and resize volumes (import is
//! in `import.rs`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use ingot_engine::{DedupDomain, QosChange, VolumeInfo};

use super::{request, PoolArg};
use crate::control::Request;
use crate::size::{human, parse_size};

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

/// A volume's data reduction policy; what is not given stays as it is.
#[derive(clap::Args, Clone)]
pub struct PolicyArgs {
    /// Deduplicate new writes: on or off.
    #[arg(long, value_parser = parse_on_off)]
    pub dedup: Option<bool>,
    /// Compress new writes: on or off.
    #[arg(long, value_parser = parse_on_off)]
    pub compression: Option<bool>,
    /// Which volumes new writes deduplicate against: "shared" (every shared volume; the
    /// default), "private" (this volume alone) or a domain NAME (the volumes naming it).
    /// Blocks never deduplicate across domains.
    #[arg(long, value_name = "NAME|shared|private", value_parser = parse_domain)]
    pub dedup_domain: Option<DedupDomain>,
}

impl PolicyArgs {
    fn is_empty(&self) -> bool {
        self.dedup.is_none() && self.compression.is_none() && self.dedup_domain.is_none()
    }
}

/// A bandwidth: a size per second (`100M/s`, `20MiB/s`, or just `100M`).
fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    parse_size(t.strip_suffix("/s").unwrap_or(t))
}

/// A volume's QoS limits, applied at admission to NBD and iSCSI alike; what is not given stays
/// as it is, 0 removes a limit.
#[derive(clap::Args, Clone, Default)]
pub struct QosArgs {
    /// Requests per second (reads, writes, zeroes and trims; flushes are free). 0: no limit.
    #[arg(long, value_name = "N")]
    pub iops_limit: Option<u64>,
    /// Bytes read and written per second, e.g. 100M/s. 0: no limit.
    #[arg(long, value_name = "SIZE/s", value_parser = parse_rate)]
    pub bandwidth_limit: Option<u64>,
    /// Requests that may pass at once after an idle spell (0: one second's worth).
    #[arg(long, value_name = "N")]
    pub burst_iops: Option<u64>,
    /// Bytes that may pass at once after an idle spell (0: one second's worth).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub burst_bytes: Option<u64>,
}

impl QosArgs {
    fn change(&self) -> QosChange {
        QosChange {
            iops_limit: self.iops_limit,
            bandwidth_limit_bytes: self.bandwidth_limit,
            burst_iops: self.burst_iops,
            burst_bytes: self.burst_bytes,
        }
    }
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a thin volume (deduplication and compression on unless turned off).
    #[command(after_help = "Examples:\n  \
        ingot volume create pgdata --size 100G --pool /var/lib/ingot/ingot-data\n  \
        ingot volume create scratch --size 20G --dedup off --compression off\n  \
        ingot volume create acme-db --size 50G --dedup-domain acme")]
    Create {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Change a volume's data reduction policy (applies to new writes) and QoS limits
    /// (apply to the next request), online and durably.
    #[command(after_help = "Examples:\n  \
        ingot volume set pgdata --iops-limit 1000 --bandwidth-limit 100M/s\n  \
        ingot volume set pgdata --iops-limit 0    # remove the IOPS limit\n  \
        ingot volume set pgdata --compression off --pool /var/lib/ingot/ingot-data")]
    Set {
        name: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        qos: QosArgs,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// List volumes.
    #[command(after_help = "Examples:\n  \
        ingot volume list --pool /var/lib/ingot/ingot-data\n  \
        ingot volume list --json | jq -r '.[].name'")]
    List {
        #[command(flatten)]
        pool: PoolArg,
        #[arg(long)]
        json: bool,
    },
    /// Take a read-only snapshot of a volume, online: every write acknowledged before it is
    /// in it. No data is copied (blocks are shared until overwritten).
    #[command(after_help = "Examples:\n  \
        ingot volume snapshot pgdata pgdata-2026-11-26 --pool /var/lib/ingot/ingot-data")]
    Snapshot {
        /// The volume to snapshot.
        source: String,
        /// Name of the snapshot (a read-only volume, served like any other).
        name: String,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Create a writable volume from a volume or snapshot, online, sharing its blocks.
    #[command(after_help = "Examples:\n  \
        ingot volume clone pgdata-2026-11-26 pgdata-test --pool /var/lib/ingot/ingot-data")]
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
    #[command(after_help = "Examples:\n  \
        ingot volume import pgdata --file pgdata.raw --pool /var/lib/ingot/ingot-data\n  \
        ingot volume import vm01 --file vm01.raw --size 40G --dedup-domain vms")]
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
    #[command(after_help = "Examples:\n  \
        ingot volume delete pgdata-test --pool /var/lib/ingot/ingot-data")]
    Delete {
        name: String,
        #[command(flatten)]
        pool: PoolArg,
    },
    /// Change a volume's size (shrinking discards the data past the new end).
    #[command(after_help = "Examples:\n  \
        ingot volume resize pgdata --size 200G --pool /var/lib/ingot/ingot-data")]
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        pool: PoolArg,
    },
}

fn set_policy(pool: &Path, name: &str, policy: PolicyArgs, qos: &QosArgs) -> Result<()> {
    let req = Request::VolumeSet {
        name: name.to_string(),
        dedup: policy.dedup,
        compression: policy.compression,
        dedup_domain: policy.dedup_domain,
        qos: qos.change(),
    };
    request(pool, req).map(|_| ())
}

pub fn run(cmd: VolumeCmd) -> Result<i32> {
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
                set_policy(&pool.pool, &name, policy, &QosArgs::default())?;
            }
            outln!("created volume {name} ({})", human(size));
        }
        VolumeCmd::Set {
            name,
            policy,
            qos,
            pool,
        } => {
            let change = qos.change();
            if policy.is_empty() && change.is_empty() {
                // A usage error, like a bad argument: clap's exit status.
                eprintln!(
                    "ingot: nothing to set: give --dedup on|off, --compression on|off, \
                     --dedup-domain NAME|shared|private, --iops-limit N, --bandwidth-limit \
                     SIZE/s, --burst-iops N and/or --burst-bytes SIZE"
                );
                return Ok(2);
            }
            let reduction = !policy.is_empty();
            let (dedup, compression) = (policy.dedup, policy.compression);
            let domain = policy.dedup_domain.clone();
            set_policy(&pool.pool, &name, policy, &qos)?;
            let word = |b: Option<bool>| match b {
                Some(true) => "on",
                Some(false) => "off",
                None => "unchanged",
            };
            if reduction {
                outln!(
                    "volume {name}: dedup {}, compression {}, dedup domain {}",
                    word(dedup),
                    word(compression),
                    domain.map_or_else(|| "unchanged".to_string(), |d| d.to_string())
                );
            }
            if !change.is_empty() {
                let limit = |v: Option<u64>, show: &dyn Fn(u64) -> String| match v {
                    None => "unchanged".to_string(),
                    Some(0) => "none".to_string(),
                    Some(n) => show(n),
                };
                let burst = |v: Option<u64>, show: &dyn Fn(u64) -> String| match v {
                    None => "unchanged".to_string(),
                    Some(0) => "1 s".to_string(),
                    Some(n) => show(n),
                };
                outln!(
                    "volume {name}: IOPS limit {} (burst {}), bandwidth limit {} (burst {})",
                    limit(change.iops_limit, &|n| n.to_string()),
                    burst(change.burst_iops, &|n| n.to_string()),
                    limit(change.bandwidth_limit_bytes, &|n| format!("{}/s", human(n))),
                    burst(change.burst_bytes, &|n| human(n)),
                );
            }
        }
        VolumeCmd::List { pool, json } => {
            let v = request(&pool.pool, Request::VolumeList)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let vols: Vec<VolumeInfo> = serde_json::from_value(v)?;
                outln!(
                    "{:<24} {:>12} {:>12} {:>6} {:>11} {:>6} {:>10} {:>14}  DEDUP-DOMAIN",
                    "NAME",
                    "SIZE",
                    "MAPPED",
                    "DEDUP",
                    "COMPRESSION",
                    "ACCESS",
                    "IOPS-LIMIT",
                    "BW-LIMIT"
                );
                let word = |b: bool| if b { "on" } else { "off" };
                let limit = |n: u64, show: &dyn Fn(u64) -> String| {
                    if n == 0 {
                        "-".to_string()
                    } else {
                        show(n)
                    }
                };
                for v in vols {
                    outln!(
                        "{:<24} {:>12} {:>12} {:>6} {:>11} {:>6} {:>10} {:>14}  {}",
                        v.name,
                        human(v.size_bytes),
                        human(v.mapped_bytes),
                        word(v.dedup),
                        word(v.compression),
                        if v.read_only { "ro" } else { "rw" },
                        limit(v.qos.iops_limit, &|n| n.to_string()),
                        limit(v.qos.bandwidth_limit_bytes, &|n| format!("{}/s", human(n))),
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
            outln!("created snapshot {name} of {source} (read-only)");
        }
        VolumeCmd::Clone { source, name, pool } => {
            request(
                &pool.pool,
                Request::VolumeClone {
                    source: source.clone(),
                    name: name.clone(),
                },
            )?;
            outln!("created volume {name} from {source}");
        }
        VolumeCmd::Import {
            name,
            file,
            size,
            policy,
            pool,
        } => super::import::import(&pool.pool, &name, &file, size, policy)?,
        VolumeCmd::Delete { name, pool } => {
            request(&pool.pool, Request::VolumeDelete { name: name.clone() })?;
            outln!("deleted volume {name}");
        }
        VolumeCmd::Resize { name, size, pool } => {
            request(
                &pool.pool,
                Request::VolumeResize {
                    name: name.clone(),
                    size_bytes: size,
                },
            )?;
            outln!("resized volume {name} to {}", human(size));
        }
    }
    Ok(0)
}
