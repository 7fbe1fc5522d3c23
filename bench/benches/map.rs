//! Block map: the engine's LBA map is internal (`lbamap` is not public), so this measures it
//! through the public API where no device I/O is involved: `block_status` walks the map of a
//! 1 GiB volume whose blocks alternate between mapped runs and holes (what NBD
//! `base:allocation` and `qemu-img map` ask for).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};

const VOLUME_BYTES: u64 = 1 << 30;

fn map(c: &mut Criterion) {
    let dir = match std::env::var_os("INGOT_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let pool = Pool::create(
        dir.path(),
        &CreateOptions {
            size_bytes: 1 << 30,
            ..Default::default()
        },
        &PoolOptions {
            io: IoKind::Auto,
            cache_bytes: Some(0),
            ..Default::default()
        },
    )
    .expect("pool");
    pool.create_volume("map", VOLUME_BYTES).expect("volume");
    let vol = pool.volume("map").expect("volume");
    // 16 KiB mapped, 48 KiB hole, over the first 256 MiB: 4,096 runs.
    let data = vec![0x5au8; 16384];
    for run in 0..4096u64 {
        vol.write(run * 65536, &data, false).expect("write");
    }
    vol.flush().expect("flush");
    let mut g = c.benchmark_group("map");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for (name, len) in [("64M", 64u64 << 20), ("256M", 256 << 20)] {
        g.throughput(Throughput::Elements(len / 4096));
        g.bench_function(format!("block_status/{name}"), |b| {
            b.iter(|| vol.block_status(0, len).expect("block status").len())
        });
    }
    g.finish();
    pool.shutdown().expect("shutdown");
}

criterion_group!(benches, map);
criterion_main!(benches);
