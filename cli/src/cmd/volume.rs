//! `ingot volume ...`: create, set, list, snapshot, clone, delete and resize volumes (import is
//! in `import.rs`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use ingot_engine::{DedupDomain, VolumeInfo};

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

#[derive(Subcommand)]
pub enum VolumeCmd {
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

fn set_policy(pool: &Path, name: &str, policy: PolicyArgs) -> Result<()> {
    let req = Request::VolumeSet {
        name: name.to_string(),
        dedup: policy.dedup,
        compression: policy.compression,
        dedup_domain: policy.dedup_domain,
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
                set_policy(&pool.pool, &name, policy)?;
            }
            outln!("created volume {name} ({})", human(size));
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
            outln!(
                "volume {name}: dedup {}, compression {}, dedup domain {}",
                word(dedup),
                word(compression),
                domain.map_or_else(|| "unchanged".to_string(), |d| d.to_string())
            );
        }
        VolumeCmd::List { pool, json } => {
            let v = request(&pool.pool, Request::VolumeList)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let vols: Vec<VolumeInfo> = serde_json::from_value(v)?;
                outln!(
                    "{:<24} {:>12} {:>12} {:>6} {:>11} {:>6}  DEDUP-DOMAIN",
                    "NAME",
                    "SIZE",
                    "MAPPED",
                    "DEDUP",
                    "COMPRESSION",
                    "ACCESS"
                );
                let word = |b: bool| if b { "on" } else { "off" };
                for v in vols {
                    outln!(
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
