//! Engine read and write paths, in-process, on the sync and io_uring engines: a pool in a
//! temporary directory (`INGOT_BENCH_DIR` to choose its file system), one volume, 4 KiB
//! requests through `Volume::call` (one at a time) and `Volume::submit` (32 in flight), and a
//! flush after a write.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingot_bench::pages::heap_bytes;
use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions, Request, Volume};

const VOLUME_BYTES: u64 = 64 << 20;
const BLOCKS: u64 = VOLUME_BYTES / 4096;

fn pool(io: IoKind) -> Option<(tempfile::TempDir, Pool, Volume)> {
    let dir = match std::env::var_os("INGOT_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let c = CreateOptions {
        size_bytes: 1 << 30,
        prefill: true,
        ..Default::default()
    };
    let o = PoolOptions {
        io,
        // Reads reach the device.
        cache_bytes: Some(0),
        ..Default::default()
    };
    let pool = match Pool::create(dir.path(), &c, &o) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping {io:?}: {e}");
            return None;
        }
    };
    pool.create_volume("bench", VOLUME_BYTES).expect("volume");
    let vol = pool.volume("bench").expect("volume");
    // Every block written once, so that reads hit stored data.
    let chunk = heap_bytes(9, 1 << 20);
    for off in (0..VOLUME_BYTES).step_by(1 << 20) {
        vol.write(off, &chunk, false).expect("fill");
    }
    vol.flush().expect("flush");
    Some((dir, pool, vol))
}

/// xorshift offsets over the volume, 4 KiB aligned.
struct Offsets(u64);

impl Offsets {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % BLOCKS) * 4096
    }
}

fn engine_io(c: &mut Criterion) {
    let page = Bytes::from(heap_bytes(5, 4096));
    for (name, io) in [("sync", IoKind::Sync), ("uring", IoKind::Uring)] {
        let Some((_dir, pool, vol)) = pool(io) else {
            continue;
        };
        let mut g = c.benchmark_group(format!("engine_{name}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let mut off = Offsets(0x9e37_79b9_7f4a_7c15);
        g.throughput(Throughput::Bytes(4096));
        g.bench_function("write_4k_qd1", |b| {
            b.iter(|| {
                vol.call(Request::Write {
                    offset: off.next(),
                    data: page.clone(),
                    fua: false,
                })
                .expect("write")
            })
        });
        g.bench_function("read_4k_qd1", |b| {
            b.iter(|| vol.read(off.next(), 4096).expect("read"))
        });
        g.bench_function("write_4k_flush_qd1", |b| {
            b.iter(|| {
                vol.write(off.next(), &page, false).expect("write");
                vol.flush().expect("flush")
            })
        });
        g.throughput(Throughput::Bytes(32 * 4096));
        for write in [true, false] {
            let label = if write {
                "write_4k_qd32"
            } else {
                "read_4k_qd32"
            };
            g.bench_function(label, |b| {
                b.iter(|| {
                    let (tx, rx) = crossbeam_channel::bounded(32);
                    for _ in 0..32 {
                        let tx = tx.clone();
                        let req = if write {
                            Request::Write {
                                offset: off.next(),
                                data: page.clone(),
                                fua: false,
                            }
                        } else {
                            Request::Read {
                                offset: off.next(),
                                len: 4096,
                            }
                        };
                        vol.submit(
                            req,
                            Box::new(move |r| {
                                let _ = tx.send(r.is_ok());
                            }),
                        );
                    }
                    for _ in 0..32 {
                        assert!(rx.recv().expect("completion"));
                    }
                })
            });
        }
        g.finish();
        pool.shutdown().expect("shutdown");
    }
}

criterion_group!(benches, engine_io);
criterion_main!(benches);
