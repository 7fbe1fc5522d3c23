//! `ingot-bench checkpoints`: what a checkpoint costs as the pool grows, format 2 (one blob of
//! the whole image) against format 3 (metadata pages, only what changed; issue 22), in-process
//! and alternating in one run. For each size a thin pool is filled with that much unique,
//! incompressible data, then `--churn` bytes overwrite random 1 MiB pieces of the volume's
//! first `--region` with a checkpoint every `--interval`: the device bytes and time of those
//! checkpoints per GiB written (issue 22 wants the bytes flat, not growing with the pool), and
//! the bytes of the first checkpoint after an open (format 3's is whole, as format 2's always
//! are).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct CkptArgs {
    /// Working directory (one pool at a time, removed after it).
    #[arg(long, default_value = "/tmp/ingot-ckpt")]
    pub dir: PathBuf,
    /// Unique data per pool, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1G,4G", value_parser = crate::parse_size)]
    pub sizes: Vec<u64>,
    /// Bytes overwritten after the fill.
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    pub churn: u64,
    /// Where the overwrites land: the volume's first this many bytes.
    #[arg(long, default_value = "512M", value_parser = crate::parse_size)]
    pub region: u64,
    /// Client bytes between two checkpoints during the churn.
    #[arg(long, default_value = "128M", value_parser = crate::parse_size)]
    pub interval: u64,
    /// Where to write the JSON (default: DIR/checkpoints.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub format: u32,
    pub unique_bytes: u64,
    pub checkpoints: u64,
    /// Device bytes of the churn's checkpoints per GiB the churn wrote.
    pub checkpoint_bytes_per_gib: f64,
    /// Mean wall time of a churn checkpoint (pause, write, syncs, superblocks).
    pub checkpoint_ms: f64,
    /// The first checkpoint after a clean reopen.
    pub reopen_checkpoint_bytes: u64,
    /// Segments not free after the churn (data, log and checkpoints; format 3 keeps metadata
    /// pages across several segments, format 2 a blob in one or two).
    pub segments_in_use: u64,
}

/// Distinct incompressible 4 KiB blocks: a xorshift stream seeded per piece.
fn fill_piece(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}

fn checkpoint_bytes(pool: &Pool) -> u64 {
    pool.stats().device_written_breakdown.checkpoint_bytes
}

fn one(dir: &Path, size: u64, paged: bool, a: &CkptArgs, seq: &mut u64) -> Result<Row> {
    // Whole MiB: the fill and the overwrites are 1 MiB writes.
    let size = (size >> 20).max(1) << 20;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let c = CreateOptions {
        size_bytes: size * 2 + (2 << 30),
        ..Default::default()
    };
    let o = PoolOptions {
        io: IoKind::Auto,
        shards: 2,
        cache_bytes: Some(0),
        // Only the benchmark's own checkpoints during the churn.
        checkpoint_interval_bytes: u64::MAX / 2,
        paged_metadata: paged,
        ..Default::default()
    };
    let pool = Pool::create(dir, &c, &o).context("create")?;
    pool.create_volume("v", size)?;
    let v = pool.volume("v")?;
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        *seq += 1;
        fill_piece(&mut buf, *seq);
        v.write(off, &buf, false)?;
    }
    pool.checkpoint()?;
    let region = (a.region.min(size) >> 20).max(1);
    let (before, mut ms, mut n) = (checkpoint_bytes(&pool), 0f64, 0u64);
    let mut since = 0u64;
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ size;
    for _ in 0..a.churn >> 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *seq += 1;
        fill_piece(&mut buf, *seq);
        v.write((x % region) << 20, &buf, false)?;
        since += 1 << 20;
        if since >= a.interval {
            let t = Instant::now();
            pool.checkpoint()?;
            ms += t.elapsed().as_secs_f64() * 1e3;
            n += 1;
            since = 0;
        }
    }
    let churn_bytes = checkpoint_bytes(&pool) - before;
    let st = pool.stats();
    let segments_in_use = st.segments_total - st.segments_free;
    drop(v);
    pool.shutdown()?;
    drop(pool);
    let pool = Pool::open(
        dir,
        &PoolOptions {
            paged_metadata: false,
            ..o
        },
    )?;
    let reopen_checkpoint_bytes = checkpoint_bytes(&pool);
    pool.shutdown()?;
    drop(pool);
    std::fs::remove_dir_all(dir)?;
    Ok(Row {
        format: if paged { 3 } else { 2 },
        unique_bytes: size,
        checkpoints: n,
        checkpoint_bytes_per_gib: churn_bytes as f64 * f64::from(1 << 30) / (a.churn.max(1) as f64),
        checkpoint_ms: if n > 0 { ms / n as f64 } else { 0.0 },
        reopen_checkpoint_bytes,
        segments_in_use,
    })
}

pub fn run(a: &CkptArgs) -> Result<()> {
    let start = Instant::now();
    let steps = a.sizes.len() * 2;
    let mut rows = Vec::new();
    let mut seq = 0u64;
    for (i, &size) in a.sizes.iter().enumerate() {
        // Alternating formats, so that the disk's drift from run to run hits both alike.
        for (j, paged) in [false, true].into_iter().enumerate() {
            crate::sys::progress(
                start,
                i * 2 + j,
                steps,
                &format!("{} GiB, format {}", size >> 30, if paged { 3 } else { 2 }),
            );
            rows.push(one(&a.dir.join("pool"), size, paged, a, &mut seq)?);
        }
    }
    crate::sys::progress(start, steps, steps, "done");
    println!(
        "{:>6} {:>10} {:>12} {:>16} {:>14} {:>20} {:>14}",
        "format",
        "unique",
        "checkpoints",
        "ckpt MiB/GiB",
        "ckpt ms",
        "reopen ckpt MiB",
        "segs in use"
    );
    for r in &rows {
        println!(
            "{:>6} {:>8}Gi {:>12} {:>16.1} {:>14.1} {:>20.1} {:>14}",
            r.format,
            r.unique_bytes >> 30,
            r.checkpoints,
            r.checkpoint_bytes_per_gib / f64::from(1 << 20),
            r.checkpoint_ms,
            r.reopen_checkpoint_bytes as f64 / f64::from(1 << 20),
            r.segments_in_use,
        );
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.dir.join("checkpoints.json"));
    std::fs::create_dir_all(&a.dir)?;
    std::fs::write(&out, serde_json::to_string_pretty(&rows)?)?;
    println!("wrote {}", out.display());
    Ok(())
}
