//! Prometheus text exposition of the pool's stats, printed by `ingot stats --prometheus` and
//! served by `ingot serve --metrics HOST:PORT` at `/metrics`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;

use anyhow::{Context, Result};
use ingot_engine::{Pool, Stats};

pub fn render(s: &Stats) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(out, "# HELP ingot_{name} {help}");
        let _ = writeln!(out, "# TYPE ingot_{name} {kind}");
        let _ = writeln!(out, "ingot_{name} {v}");
    };
    gauge(
        "capacity_bytes",
        "Segment space of the pool.",
        "gauge",
        s.capacity_bytes,
    );
    gauge(
        "usable_bytes",
        "Payload bytes stored before writes to unmapped blocks fail with ENOSPC.",
        "gauge",
        s.usable_bytes,
    );
    gauge(
        "physical_used_bytes",
        "Segment space in use.",
        "gauge",
        s.physical_used_bytes,
    );
    gauge(
        "logical_mapped_bytes",
        "Volume bytes that map to stored blocks.",
        "gauge",
        s.logical_mapped_bytes,
    );
    gauge(
        "stored_bytes",
        "Bytes of live stored payloads.",
        "gauge",
        s.stored_bytes,
    );
    gauge(
        "segments_total",
        "Segments in the pool.",
        "gauge",
        s.segments_total,
    );
    gauge("segments_free", "Free segments.", "gauge", s.segments_free);
    gauge(
        "halted",
        "1 when an engine thread failed and the pool stopped taking requests.",
        "gauge",
        u64::from(s.halted.is_some()),
    );
    gauge(
        "write_back_bytes",
        "Bytes of writes acknowledged and not yet stored (write-back).",
        "gauge",
        s.write_back_bytes,
    );
    gauge(
        "write_back_writes_total",
        "Writes acknowledged before they were stored, since open.",
        "counter",
        s.write_back_writes,
    );
    gauge(
        "client_written_bytes_total",
        "Bytes written by clients since open.",
        "counter",
        s.client_written_bytes,
    );
    gauge(
        "device_written_bytes_total",
        "Bytes written to devices since open.",
        "counter",
        s.device_written_bytes,
    );
    gauge(
        "gc_read_bytes_total",
        "Bytes the cleaner read from devices (victims' records and live blocks), since open.",
        "counter",
        s.gc_bytes_read,
    );
    gauge(
        "gc_table_scans_total",
        "Victims whose live blocks the cleaner looked for in the whole block table (their records did not name them all), since open.",
        "counter",
        s.gc_table_scans,
    );
    gauge(
        "cache_bytes",
        "Bytes held by the block cache.",
        "gauge",
        s.cache_bytes,
    );
    gauge(
        "cache_hits_total",
        "Block cache hits.",
        "counter",
        s.cache_hits,
    );
    gauge(
        "cache_misses_total",
        "Block cache misses.",
        "counter",
        s.cache_misses,
    );
    gauge(
        "unique_blocks",
        "Distinct stored blocks.",
        "gauge",
        s.unique_blocks,
    );
    gauge(
        "dedup_stream_hits_total",
        "Dedup hits found by following a stream of duplicates rather than in the index.",
        "counter",
        s.dedup_stream_hits,
    );
    gauge(
        "dedup_index_bytes",
        "RAM held by the dedup index.",
        "gauge",
        s.dedup_index_bytes,
    );
    gauge(
        "metadata_ram_bytes",
        "RAM held for reference counts and the block table's and volume maps' slots and stubs (outside the metadata cache).",
        "gauge",
        s.metadata_ram_bytes,
    );
    gauge(
        "metadata_cache_bytes",
        "Map and block-table leaf entries held in RAM by the metadata cache.",
        "gauge",
        s.metadata_cache_bytes,
    );
    gauge(
        "metadata_cache_leaves",
        "Map and block-table leaves known to the metadata cache, their entries held or evicted.",
        "gauge",
        s.metadata_cache_leaves,
    );
    gauge(
        "metadata_cache_budget_bytes",
        "The metadata cache's budget (0: every leaf kept, format 2).",
        "gauge",
        s.metadata_cache_budget_bytes,
    );
    gauge(
        "metadata_cache_hits_total",
        "Map and block-table leaf uses that found the entries in RAM.",
        "counter",
        s.metadata_cache_hits,
    );
    gauge(
        "metadata_cache_misses_total",
        "Map and block-table leaf uses that read the entries back from their page.",
        "counter",
        s.metadata_cache_misses,
    );
    gauge(
        "metadata_cache_table_misses_total",
        "Of the metadata cache's misses, block-table leaves read back.",
        "counter",
        s.metadata_cache_table_misses,
    );
    if let Some(r) = &s.replica {
        gauge(
            "replica_sent_bytes_total",
            "Data bytes a pool on a store sent in batches since it was opened.",
            "counter",
            r.sent_bytes,
        );
        gauge(
            "replica_commits_total",
            "Syncs made durable in the store since the pool was opened.",
            "counter",
            r.commits,
        );
        gauge(
            "replica_commit_mean_microseconds",
            "Mean time a sync's commit to the store took.",
            "gauge",
            r.commit_mean_us,
        );
        gauge(
            "replica_commit_max_microseconds",
            "Longest time a sync's commit to the store took.",
            "gauge",
            r.commit_max_us,
        );
        gauge(
            "replica_bases_total",
            "Bases sent whole to the store since the pool was opened.",
            "counter",
            r.bases,
        );
        gauge(
            "replica_pending_bytes",
            "Data noted and not sent to the store yet.",
            "gauge",
            r.pending_bytes,
        );
        gauge(
            "replica_store_objects_total",
            "Objects written to the store since the pool was opened.",
            "counter",
            r.store_objects,
        );
        gauge(
            "replica_store_bytes_total",
            "Bytes written to the store since the pool was opened.",
            "counter",
            r.store_bytes,
        );
        gauge(
            "replica_store_deleted_objects_total",
            "Objects deleted from the store since the pool was opened (batch objects and log records before a new base).",
            "counter",
            r.store_deleted_objects,
        );
        gauge(
            "replica_uploads_in_flight",
            "Batch objects being written to the store now.",
            "gauge",
            r.uploads_in_flight,
        );
        gauge(
            "replica_history_bytes",
            "Data bytes committed to the store since its last whole base (what a takeover replays after it; a new base is sent past the rebase threshold).",
            "gauge",
            r.history_bytes,
        );
        gauge(
            "replica_cold_bytes",
            "Device bytes only in the store: left by a takeover or dropped by the local cache, and not fetched yet.",
            "gauge",
            r.cold_bytes,
        );
        gauge(
            "replica_fetched_bytes_total",
            "Device bytes fetched from the store since the pool was opened (cold reads and the filler).",
            "counter",
            r.fetched_bytes,
        );
        gauge(
            "replica_local_bytes",
            "Device bytes the pool's local files hold (measured by a local cache budget's rounds; 0 without one).",
            "gauge",
            r.local_bytes,
        );
        gauge(
            "replica_local_cache_limit_bytes",
            "The local cache budget (ingot serve --local-cache; 0: none).",
            "gauge",
            r.local_cache_limit_bytes,
        );
        gauge(
            "replica_evicted_bytes_total",
            "Device bytes dropped from the local files since open (clean ranges the store holds, read back on use).",
            "counter",
            r.evicted_bytes,
        );
        gauge(
            "replica_fetches_total",
            "Range reads of the store since the pool was opened.",
            "counter",
            r.fetches,
        );
        gauge(
            "replica_behind",
            "1 while the store lacks syncs this node answered (--durability local, or a base due).",
            "gauge",
            u64::from(r.behind),
        );
        gauge(
            "replica_failed",
            "1 once an upload to the store failed: no flush succeeds any more.",
            "gauge",
            u64::from(r.failed),
        );
    }
    gauge(
        "metadata_ring_reads_total",
        "Metadata pages the shards read through their queues while the requests needing them waited.",
        "counter",
        s.metadata_ring_reads,
    );
    gauge(
        "metadata_shard_waits_total",
        "Metadata pages a shard's thread waited for in a blocking read.",
        "counter",
        s.metadata_shard_waits,
    );
    gauge(
        "metadata_open_pages",
        "Pages of metadata the pool's open read from its checkpoint.",
        "gauge",
        s.metadata_open_pages,
    );
    gauge(
        "metadata_cache_evictions_total",
        "Map and block-table leaves whose entries were evicted.",
        "counter",
        s.metadata_cache_evictions,
    );
    gauge(
        "io_registered_bytes",
        "Write buffers the io_uring rings registered (pinned) with the kernel.",
        "gauge",
        s.io_registered_bytes,
    );
    gauge(
        "process_rss_bytes",
        "Resident memory of the serving process, caches included.",
        "gauge",
        s.process_rss_bytes,
    );
    for (name, help, v) in [
        (
            "ram_bytes_per_stored_block",
            "Metadata and dedup index RAM per stored block.",
            s.ram_bytes_per_stored_block,
        ),
        (
            "dedup_ratio",
            "Mapped blocks / unique blocks.",
            s.dedup_ratio,
        ),
        (
            "compression_ratio",
            "Unique blocks' bytes / stored bytes.",
            s.compression_ratio,
        ),
        (
            "data_reduction_ratio",
            "Logical mapped bytes / stored bytes.",
            s.data_reduction_ratio,
        ),
    ] {
        let _ = writeln!(out, "# HELP ingot_{name} {help}");
        let _ = writeln!(out, "# TYPE ingot_{name} gauge");
        let _ = writeln!(out, "ingot_{name} {v}");
    }
    // Stage times as Prometheus summaries' _sum/_count pairs: rate(sum)/rate(count) is the
    // mean time of a stage over any window.
    let l = &s.latency;
    let ops = [
        ("read", &l.reads),
        ("write", &l.writes),
        ("flush", &l.flushes),
    ];
    type Stage = fn(&ingot_engine::StageTimes) -> (u64, u64);
    let stages: [(&str, &str, Stage); 3] = [
        (
            "request",
            "Requests from submission to completion (a write acknowledged early: to applied).",
            |t| (t.total_ns, t.done),
        ),
        (
            "queued",
            "Request parts from submission until a shard took them.",
            |t| (t.queued_ns, t.picked),
        ),
        (
            "device",
            "Device operations (read spans, log records, syncs) from queued to completed.",
            |t| (t.device_ns, t.device),
        ),
    ];
    for (stage, help, get) in stages {
        let _ = writeln!(out, "# HELP ingot_{stage}_seconds {help}");
        let _ = writeln!(out, "# TYPE ingot_{stage}_seconds summary");
        for (op, t) in ops {
            let (ns, n) = get(t);
            let _ = writeln!(
                out,
                "ingot_{stage}_seconds_sum{{op=\"{op}\"}} {}",
                ns as f64 / 1e9
            );
            let _ = writeln!(out, "ingot_{stage}_seconds_count{{op=\"{op}\"}} {n}");
        }
    }
    type Field = fn(&ingot_engine::VolumeInfo) -> String;
    let per_volume: [(&str, &str, Field); 6] = [
        ("size_bytes", "Logical size of each volume.", |v| {
            v.size_bytes.to_string()
        }),
        (
            "mapped_bytes",
            "Bytes of each volume that map to stored blocks.",
            |v| v.mapped_bytes.to_string(),
        ),
        (
            "stored_bytes",
            "Stored bytes attributed to each volume (shared blocks split).",
            |v| v.stored_bytes.to_string(),
        ),
        (
            "data_reduction_ratio",
            "Mapped bytes / attributed stored bytes.",
            |v| v.data_reduction_ratio.to_string(),
        ),
        (
            "iops_limit",
            "QoS limit on each volume's requests per second (0: none).",
            |v| v.qos.iops_limit.to_string(),
        ),
        (
            "bandwidth_limit_bytes",
            "QoS limit on each volume's bytes read and written per second (0: none).",
            |v| v.qos.bandwidth_limit_bytes.to_string(),
        ),
    ];
    let counters: [(&str, &str, Field); 1] = [(
        "qos_wait_seconds_total",
        "Time each volume's requests waited for its QoS limits, since open.",
        |v| v.qos_wait_seconds.to_string(),
    )];
    let kinds = per_volume
        .iter()
        .map(|m| (m, "gauge"))
        .chain(counters.iter().map(|m| (m, "counter")));
    for ((name, help, value), kind) in kinds {
        let _ = writeln!(out, "# HELP ingot_volume_{name} {help}");
        let _ = writeln!(out, "# TYPE ingot_volume_{name} {kind}");
        for v in &s.volumes {
            let _ = writeln!(
                out,
                "ingot_volume_{name}{{volume=\"{}\"}} {}",
                v.name,
                value(v)
            );
        }
    }
    out
}

/// Serve `GET /metrics` on `addr` from a background thread.
pub fn serve(addr: &str, pool: Arc<Pool>) -> Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("--metrics {addr}"))?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("ingot-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let resp = if line.starts_with("GET /metrics") {
                    let body = render(&pool.stats());
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = conn.write_all(resp.as_bytes());
            }
        })?;
    Ok(local)
}
