//! `ingot pool ...`: create pools.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use ingot_engine::{CreateOptions, Pool, PoolOptions};

use super::PoolArg;
use crate::size::{human, parse_size};

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create a pool.
    #[command(after_help = "Examples:\n  \
        ingot pool create --pool ./ingot-data --size 16G\n  \
        ingot pool create --pool /var/lib/ingot/ingot-data --size 900G --device /dev/nvme1n1\n  \
        ingot pool create --pool ./ingot-data --size 200G --segment-size 32M --prefill")]
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
        /// Also keep the pool in a Ceph cluster: rados://POOL/NAME (a RADOS pool and a name
        /// not used yet there). Every flush then reaches the cluster before it is answered,
        /// and another node can take the pool over (`ingot pool attach`).
        #[arg(long, value_parser = crate::store::parse_url)]
        store: Option<crate::store::StoreUrl>,
        #[command(flatten)]
        ceph: crate::store::CephArgs,
    },
    /// Prepare a directory to serve a pool kept in a Ceph cluster (after its node was lost, or
    /// to move it): `ingot serve` on it then takes the pool's lease and restores the devices
    /// from the cluster.
    #[command(after_help = "Examples:\n  \
        ingot pool attach --pool /var/lib/ingot/ingot-data --store rados://ingot/pg1 --ceph-conf /etc/ceph/ceph.conf\n  \
        ingot serve --pool /var/lib/ingot/ingot-data --takeover")]
    Attach {
        #[command(flatten)]
        pool: PoolArg,
        /// The pool's place in the cluster: rados://POOL/NAME.
        #[arg(long, value_parser = crate::store::parse_url)]
        store: crate::store::StoreUrl,
        #[command(flatten)]
        ceph: crate::store::CephArgs,
    },
}

pub fn run(cmd: PoolCmd) -> Result<i32> {
    match cmd {
        PoolCmd::Create {
            pool,
            size,
            segment_size,
            device,
            prefill,
            force,
            store,
            ceph,
        } => {
            if store.is_some() && (!device.is_empty() || prefill) {
                anyhow::bail!("--store: the pool's devices must be the default file in its directory (no --device, no --prefill)");
            }
            if prefill {
                tracing::info!(
                    pool = %pool.pool.display(),
                    bytes = size,
                    "writing zeroes over {} ...",
                    human(size)
                );
            }
            // Builds with the engine's `testing` feature (the workspace's tests) have more fields.
            #[allow(clippy::needless_update)]
            let c = CreateOptions {
                size_bytes: size,
                segment_bytes: segment_size,
                devices: device,
                prefill,
                force,
                ..CreateOptions::default()
            };
            let p = Pool::create(&pool.pool, &c, &PoolOptions::default())
                .with_context(|| format!("creating a pool in {}", pool.pool.display()))?;
            let s = p.stats();
            p.shutdown()?;
            drop(p);
            if let Some(url) = &store {
                crate::store::create(&pool.pool, url, &ceph)
                    .with_context(|| format!("putting the pool in {url}"))?;
                outln!("the pool is kept in {url}");
            }
            outln!(
                "created pool {} with {} ({} segments of {})",
                pool.pool.display(),
                human(s.capacity_bytes),
                s.segments_total,
                human(s.segment_bytes)
            );
            Ok(0)
        }
        PoolCmd::Attach { pool, store, ceph } => {
            crate::store::attach(&pool.pool, &store, &ceph)
                .with_context(|| format!("attaching {} to {store}", pool.pool.display()))?;
            outln!(
                "{} is attached to {store}: `ingot serve --pool {}` takes the pool's lease and restores it",
                pool.pool.display(),
                pool.pool.display()
            );
            Ok(0)
        }
    }
}
