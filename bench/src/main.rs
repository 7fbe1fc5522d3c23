//! `ingot-bench`: ingot measured against the servers users would otherwise run, on their own
//! machine, in one run.
//!
//! ```text
//! ingot-bench compare  [--dir DIR] [--size 4G] [--seconds 10]      # fio over NBD: ingot and its peers
//! ingot-bench db-batch [--dir DIR] [--scale 1] [--runs 3]          # PostgreSQL nightly batch on each
//! ingot-bench engine   --dir DIR [--size-mib 2048] [--seconds 10]  # in-process engine vs fio io_uring
//! ingot-bench qos      [--dir DIR] [--seconds 10] [--iops-limit 1000] # per-volume limits over NBD
//! ingot-bench ram      [--dir DIR] [--sizes 1G,2G,4G] [--tail 1G]   # RAM per stored block, open times
//! ```

/// The engine's buffers and replies are allocated on one thread and freed on another
/// (connection, shard, client); glibc's malloc spent 11% of the shards' time there.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod ckpt;
mod compare;
mod dbbatch;
mod engine;
mod fio;
mod flush;
mod metacache;
mod peers;
mod qos;
mod ram;
mod svg;
mod sys;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ingot-bench", about = "ingot benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// fio over NBD against ingot, qemu-nbd, nbdkit file, nbd-server and nbdkit memory, plus fio
    /// io_uring on a raw file, in one run: table, JSON and SVG chart.
    Compare(compare::CompareArgs),
    /// A nightly customs risk-analysis batch in PostgreSQL on ext4 on each server's volume, and
    /// on a local directory: wall time of each phase.
    DbBatch(dbbatch::DbBatchArgs),
    /// Per-volume QoS over NBD: a limited volume A and an unlimited B driven at once by fio,
    /// then B alone: A's rate against its limit, B's rate next to A against B alone.
    Qos(qos::QosArgs),
    /// RAM per stored block at several pool sizes (peak and settled RSS, the engine's own
    /// count), and open times after a clean stop and after SIGKILL with a tail to replay.
    Ram(ram::RamArgs),
    /// Checkpoint bytes and time per GiB written as the pool grows, format 2 against format 3
    /// (metadata pages, only what changed), in-process, alternating.
    Checkpoints(ckpt::CkptArgs),
    /// 4k random reads and writes over working sets of map leaves several times the metadata
    /// cache, against every leaf in RAM, in-process (issue 22).
    MetadataCache(metacache::MetaCacheArgs),
    /// In-process engine I/O against fio io_uring on a raw file in the same directory.
    Engine {
        #[arg(long)]
        dir: PathBuf,
        /// Volume (and raw file) size in MiB.
        #[arg(long, default_value_t = 2048)]
        size_mib: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value = "auto")]
        io: String,
        /// Requests in flight.
        #[arg(long, default_value_t = 32)]
        qd: usize,
        /// Skip the fio reference run.
        #[arg(long)]
        no_fio: bool,
        /// Shard workers (0: one per core).
        #[arg(long, default_value_t = 0)]
        shards: usize,
        /// Only jobs whose name contains this (e.g. `randwrite`).
        #[arg(long, default_value = "")]
        only: String,
        /// Write-back buffer, as `ingot serve --write-back` (its default); 0: every write
        /// waits for its record on the device.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        write_back: u64,
        /// A thin pool (as `ingot serve` creates by default): segments are allocated in the
        /// backing file as they are first used, not written out at creation.
        #[arg(long)]
        sparse: bool,
        /// Backing files of the pool (repeatable: several devices; the pool is split evenly
        /// across them). Default: one file in DIR.
        #[arg(long = "device")]
        devices: Vec<PathBuf>,
        /// Send reads to the shards (`Volume::submit`) instead of a `Reader` on the
        /// benchmark's own thread: the path of a front end without one.
        #[arg(long)]
        shard_reads: bool,
    },
}

/// Parse a size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size {s:?} too large"))
}

fn main() -> Result<()> {
    // Transparent huge pages stay as the host has them: `ingot` turns them off for itself,
    // but that setting is inherited across exec, and the peers, fio and PostgreSQL started from
    // here must run as users run them. The in-process engine gets mimalloc without its
    // huge-page advice (`no_thp`).
    match Cli::parse().cmd {
        Cmd::Compare(a) => {
            let r = compare::compare(&a)?;
            println!("{}", compare::table(&r));
            println!("{}", r.noise.summary());
            let out = a.out.clone().unwrap_or_else(|| a.dir.join("compare"));
            let (json, svg) = compare::write_outputs(&r, &out)?;
            println!("wrote {} and {}", json.display(), svg.display());
            Ok(())
        }
        Cmd::DbBatch(a) => dbbatch::run(&a),
        Cmd::Qos(a) => qos::run(&a),
        Cmd::Ram(a) => ram::run(&a),
        Cmd::Checkpoints(a) => ckpt::run(&a),
        Cmd::MetadataCache(a) => metacache::run_bench(&a),
        Cmd::Engine {
            dir,
            size_mib,
            seconds,
            io,
            qd,
            no_fio,
            only,
            shards,
            write_back,
            sparse,
            devices,
            shard_reads,
        } => engine::engine(
            &dir,
            size_mib << 20,
            seconds,
            &io,
            qd,
            no_fio,
            &only,
            shards,
            write_back,
            sparse,
            devices,
            shard_reads,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
