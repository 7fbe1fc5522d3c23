//! `ingot-bench metadata-cache`: 4k random reads and writes over working sets of map leaves
//! 0.5, 1, 5 and 20 times the metadata cache (issue 22), against the same pool with every
//! leaf in RAM, alternating in one run. In-process, block cache off, one thin pool: each of
//! the volume's leaves (2 MiB of volume each) gets `--blocks-per-leaf` written blocks, and
//! every request goes to one of them, in a leaf of the working set chosen at random. Prints
//! requests per second, metadata cache misses per 1,000 requests, and after the writes reads
//! every block of the working set back and checks it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions, Volume};
use serde::Serialize;

const BLOCK: u64 = 4096;
const LEAF_BLOCKS: u64 = 512;

#[derive(clap::Args, Debug)]
pub struct MetaCacheArgs {
    /// Working directory (the pool; removed first).
    #[arg(long, default_value = "/tmp/ingot-metacache")]
    pub dir: PathBuf,
    /// The metadata cache of the small runs (each leaf's entries take 4 KiB of it).
    #[arg(long, default_value = "2M", value_parser = crate::parse_size)]
    pub cache: u64,
    /// Working sets, as multiples of the leaves the cache holds.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,5,20")]
    pub factors: Vec<f64>,
    /// Written blocks per leaf (requests go to these).
    #[arg(long, default_value_t = 8)]
    pub blocks_per_leaf: u64,
    /// Requests per measurement (reads; writes are a quarter of it).
    #[arg(long, default_value_t = 100_000)]
    pub requests: u64,
    /// Threads issuing requests (each one at a time).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Where to write the JSON (default: DIR/metadata-cache.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub factor: f64,
    pub leaves: u64,
    pub cache_bytes: u64,
    pub read_iops: f64,
    pub read_iops_resident: f64,
    pub read_misses_per_1000: f64,
    pub write_iops: f64,
    pub write_iops_resident: f64,
    pub write_misses_per_1000: f64,
    /// Checkpoints during the small cache's writes.
    pub write_checkpoints: u64,
    pub blocks_checked: u64,
}

/// The block `n` of leaf `leaf`: spread over the leaf.
fn lba(leaf: u64, n: u64) -> u64 {
    leaf * LEAF_BLOCKS + (n * 61 + leaf * 7) % LEAF_BLOCKS
}

/// A block's contents: its lba and version, then a pattern (incompressible enough to be
/// stored as written: the check is on what comes back).
fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    let mut x = (lba << 20 | version).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in b.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    b
}

fn options(cache: u64) -> PoolOptions {
    PoolOptions {
        io: IoKind::Auto,
        cache_bytes: Some(0),
        metadata_cache_bytes: Some(cache),
        ..PoolOptions::default()
    }
}

/// `n` requests from `threads` threads over the first `leaves` leaves; returns requests per
/// second and misses per 1,000.
fn run(
    pool: &Pool,
    vol: &Volume,
    a: &MetaCacheArgs,
    leaves: u64,
    n: u64,
    write: bool,
    versions: &[AtomicU64],
) -> Result<(f64, f64)> {
    let before = pool.stats().metadata_cache_misses;
    let done = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for t in 0..a.threads {
            let done = &done;
            handles.push(s.spawn(move || -> Result<()> {
                let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ (t as u64 + 1) << 32 ^ u64::from(write);
                while done.fetch_add(1, Ordering::Relaxed) < n {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let leaf = x % leaves;
                    let k = (x >> 40) % a.blocks_per_leaf;
                    let l = lba(leaf, k);
                    if write {
                        // One writer per block at a time: the version is taken, then written.
                        let i = (leaf * a.blocks_per_leaf + k) as usize;
                        let v = versions[i].fetch_add(1, Ordering::Relaxed) + 1;
                        vol.write(l * BLOCK, &block(l, v), false)?;
                    } else {
                        vol.read(l * BLOCK, BLOCK as u32)?;
                    }
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a request thread panicked"))??;
        }
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let misses = pool.stats().metadata_cache_misses - before;
    Ok((n as f64 / secs, misses as f64 * 1000.0 / n as f64))
}

pub fn run_bench(a: &MetaCacheArgs) -> Result<()> {
    if a.blocks_per_leaf == 0 || a.blocks_per_leaf > LEAF_BLOCKS || a.threads == 0 {
        bail!("--blocks-per-leaf must be 1..=512 and --threads at least 1");
    }
    let cache_leaves = (a.cache / BLOCK).max(1);
    let max_factor = a.factors.iter().cloned().fold(0.0f64, f64::max);
    let total_leaves = ((cache_leaves as f64 * max_factor).ceil() as u64).max(1);
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let data = total_leaves * a.blocks_per_leaf * BLOCK;
    let c = CreateOptions {
        size_bytes: (data * 4).max(1 << 30) + (2 << 30),
        ..Default::default()
    };
    // Every leaf resident, for the fill and the baselines.
    let resident = 1u64 << 40;
    let pool = Pool::create(&a.dir, &c, &options(resident)).context("create pool")?;
    pool.create_volume("v", total_leaves * LEAF_BLOCKS * BLOCK)?;
    let vol = pool.volume("v")?;
    let versions: Vec<AtomicU64> = (0..total_leaves * a.blocks_per_leaf)
        .map(|_| AtomicU64::new(0))
        .collect();
    eprintln!(
        "fill: {total_leaves} leaves x {} blocks ({} MiB)",
        a.blocks_per_leaf,
        data >> 20
    );
    for leaf in 0..total_leaves {
        for k in 0..a.blocks_per_leaf {
            let l = lba(leaf, k);
            vol.write(l * BLOCK, &block(l, 0), false)?;
        }
    }
    vol.flush()?;
    pool.checkpoint()?;
    pool.shutdown()?;
    drop((vol, pool));
    let open = |cache: u64| -> Result<(Pool, Volume)> {
        let pool = Pool::open(&a.dir, &options(cache)).context("open pool")?;
        let vol = pool.volume("v")?;
        Ok((pool, vol))
    };
    let mut rows = Vec::new();
    for &f in &a.factors {
        let leaves = ((cache_leaves as f64 * f).round() as u64).clamp(1, total_leaves);
        let mut row = Row {
            factor: f,
            leaves,
            cache_bytes: a.cache,
            read_iops: 0.0,
            read_iops_resident: 0.0,
            read_misses_per_1000: 0.0,
            write_iops: 0.0,
            write_iops_resident: 0.0,
            write_misses_per_1000: 0.0,
            write_checkpoints: 0,
            blocks_checked: 0,
        };
        // Small cache, then every leaf resident: each warmed with a quarter of the reads.
        for small in [true, false] {
            let (pool, vol) = open(if small { a.cache } else { resident })?;
            run(&pool, &vol, a, leaves, a.requests / 4, false, &versions)?;
            let (r, rm) = run(&pool, &vol, a, leaves, a.requests, false, &versions)?;
            let ck = pool.stats().device_written_breakdown.checkpoints;
            let (w, wm) = run(&pool, &vol, a, leaves, a.requests / 4, true, &versions)?;
            vol.flush()?;
            if small {
                (row.read_iops, row.read_misses_per_1000) = (r, rm);
                (row.write_iops, row.write_misses_per_1000) = (w, wm);
                row.write_checkpoints = pool.stats().device_written_breakdown.checkpoints - ck;
                // Every block of the working set reads back as last written.
                for leaf in 0..leaves {
                    for k in 0..a.blocks_per_leaf {
                        let l = lba(leaf, k);
                        let v = versions[(leaf * a.blocks_per_leaf + k) as usize]
                            .load(Ordering::Relaxed);
                        if vol.read(l * BLOCK, BLOCK as u32)? != block(l, v) {
                            bail!("block {l} does not read back as version {v} was written");
                        }
                        row.blocks_checked += 1;
                    }
                }
            } else {
                row.read_iops_resident = r;
                row.write_iops_resident = w;
            }
            pool.shutdown()?;
        }
        eprintln!("{row:?}");
        rows.push(row);
    }
    println!(
        "| working set (x cache) | leaves | reads/s | reads/s, all resident | ratio | misses per 1,000 reads | writes/s | writes/s, all resident | ratio | misses per 1,000 writes | checkpoints in the writes | blocks checked |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.0} | {:.2}x | {:.0} | {} | {} |",
            r.factor,
            r.leaves,
            r.read_iops,
            r.read_iops_resident,
            r.read_iops / r.read_iops_resident,
            r.read_misses_per_1000,
            r.write_iops,
            r.write_iops_resident,
            r.write_iops / r.write_iops_resident,
            r.write_misses_per_1000,
            r.write_checkpoints,
            r.blocks_checked
        );
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.dir.join("metadata-cache.json"));
    std::fs::write(&out, serde_json::to_vec_pretty(&rows)?)?;
    println!("wrote {}", out.display());
    Ok(())
}
