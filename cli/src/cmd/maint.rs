//! Maintenance and inspection: `ingot stats`, `ingot check` and `ingot gc`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ingot_engine::{Pool, PoolOptions, Stats};

use super::request;
use crate::control::{self, Request};
use crate::metrics;
use crate::progress::Progress;
use crate::size::human;

pub fn stats(dir: &Path, json: bool, prometheus: bool) -> Result<i32> {
    let v = request(dir, Request::Stats)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let s: Stats = serde_json::from_value(v)?;
        if prometheus {
            out!("{}", metrics::render(&s));
        } else {
            print_stats(&s);
        }
    }
    Ok(0)
}

fn print_stats(s: &Stats) {
    outln!(
        "capacity        {} ({} segments of {}, {} free)",
        human(s.capacity_bytes),
        s.segments_total,
        human(s.segment_bytes),
        s.segments_free
    );
    outln!(
        "usable          {} for stored data (the rest holds checkpoints and the cleaner's headroom)",
        human(s.usable_bytes)
    );
    outln!("physical used   {}", human(s.physical_used_bytes));
    outln!("logical mapped  {}", human(s.logical_mapped_bytes));
    outln!(
        "stored          {} ({:.1}% of usable)",
        human(s.stored_bytes),
        s.stored_bytes as f64 * 100.0 / s.usable_bytes.max(1) as f64
    );
    outln!(
        "reduction       {:.2}x (dedup {:.2}x, compression {:.2}x; {} unique blocks)",
        s.data_reduction_ratio,
        s.dedup_ratio,
        s.compression_ratio,
        s.unique_blocks
    );
    outln!(
        "dedup index     {} entries, {} of RAM, keeps 1 in {} fingerprints; {} hits found by following streams",
        s.dedup_index_entries,
        human(s.dedup_index_bytes),
        s.dedup_index_sampling,
        s.dedup_stream_hits
    );
    outln!(
        "metadata RAM    {} (block table, reference counts, maps); {:.1} bytes per stored block with the index; process RSS {}",
        human(s.metadata_ram_bytes),
        s.ram_bytes_per_stored_block,
        human(s.process_rss_bytes)
    );
    outln!(
        "metadata cache  {} of {} ({} leaves; {} hits, {} misses ({} of the block table), {} evicted; {} pages read to open; {} read through the shards' queues, {} waited for)",
        human(s.metadata_cache_bytes),
        human(s.metadata_cache_budget_bytes),
        s.metadata_cache_leaves,
        s.metadata_cache_hits,
        s.metadata_cache_misses,
        s.metadata_cache_table_misses,
        s.metadata_cache_evictions,
        s.metadata_open_pages,
        s.metadata_ring_reads,
        s.metadata_shard_waits
    );
    if let Some(r) = &s.replica {
        outln!(
            "store           {} (epoch {}): {} sent in {} batches, {} commits (mean {} µs, max {} µs), {} bases ({} since the last), {} not sent yet; {} objects ({}) written and {} deleted since open, {} uploading",
            r.store,
            r.epoch,
            human(r.sent_bytes),
            r.batches,
            r.commits,
            r.commit_mean_us,
            r.commit_max_us,
            r.bases,
            human(r.history_bytes),
            human(r.pending_bytes),
            r.store_objects,
            human(r.store_bytes),
            r.store_deleted_objects,
            r.uploads_in_flight
        );
        if r.behind || r.failed {
            outln!(
                "store behind    {}",
                if r.failed {
                    "an upload failed: no flush succeeds any more"
                } else {
                    "the store lacks syncs this node answered (--durability local, or a base due)"
                }
            );
        }
        if r.cold_bytes > 0 || r.fetches > 0 {
            outln!(
                "store cold      {} still only in the store; {} fetched in {} range reads since open",
                human(r.cold_bytes),
                human(r.fetched_bytes),
                r.fetches
            );
        }
        if r.local_cache_limit_bytes > 0 {
            outln!(
                "store cache     {} of devices on local flash (budget {}); {} dropped since open",
                human(r.local_bytes),
                human(r.local_cache_limit_bytes),
                human(r.evicted_bytes)
            );
        }
    }
    outln!(
        "written         {} by clients, {} to devices",
        human(s.client_written_bytes),
        human(s.device_written_bytes)
    );
    outln!(
        "cache           {} of {} ({} hits, {} misses)",
        human(s.cache_bytes),
        human(s.cache_capacity_bytes),
        s.cache_hits,
        s.cache_misses
    );
    outln!(
        "engine          {} x {} shards, {} of registered write buffers",
        s.io_engine,
        s.shards,
        human(s.io_registered_bytes)
    );
    if s.write_back_limit_bytes > 0 {
        outln!(
            "write-back      {} of {} acknowledged, not yet stored ({} writes early since open)",
            human(s.write_back_bytes),
            human(s.write_back_limit_bytes),
            s.write_back_writes
        );
    }
    if let Some(w) = &s.space_warning {
        outln!("warning         {w}");
    }
    if let Some(w) = &s.host_warning {
        outln!("warning         {w}");
    }
    if let Some(h) = &s.halted {
        outln!("HALTED          {h}");
    }
    for v in &s.volumes {
        outln!(
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

pub fn check(dir: &Path, json: bool) -> Result<i32> {
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
            let mut progress = Progress::new();
            let r = pool.check(&mut |done, total| {
                if done % 4096 == 0 || done == total {
                    progress.draw(format_args!("checking blocks: {done}/{total}"));
                }
            });
            progress.finish();
            pool.shutdown()?;
            r
        }
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            outln!("PROBLEM [{}] {}", p.kind, p.detail);
        }
        outln!(
            "checked {} volumes, {} blocks ({}): {} problems",
            report.volumes_checked,
            report.blocks_checked,
            human(report.bytes_checked),
            report.problems.len()
        );
    }
    Ok(if report.problems.is_empty() { 0 } else { 1 })
}

pub fn gc(dir: &Path, max_utilisation: f64, json: bool) -> Result<i32> {
    if !(0.0..=1.0).contains(&max_utilisation) {
        bail!("--max-utilisation must be between 0 and 1");
    }
    let req = Request::Gc { max_utilisation };
    let report: ingot_engine::GcReport = match control::call(dir, &req) {
        Some(r) => serde_json::from_value(r?)?,
        None => {
            crate::store::refuse_local_write(dir)?;
            let pool = Pool::open(dir, &PoolOptions::default())
                .with_context(|| format!("opening pool {}", dir.display()))?;
            let mut progress = Progress::new();
            let r = pool.gc(max_utilisation, &mut |done, total| {
                progress.draw(format_args!("cleaning segments: {done}/{total}"));
            });
            progress.finish();
            let s = pool.shutdown();
            let r = r?;
            s?;
            r
        }
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!(
            "cleaned {} segments, moved {}, freed {} segments",
            report.segments_cleaned,
            human(report.bytes_moved),
            report.segments_freed
        );
    }
    Ok(0)
}
