//! Block fingerprint: XXH3-128 over the 4 KiB plaintext, as the engine computes it for every
//! written block (`DataEntry::fingerprint`).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ingot_bench::pages::heap_bytes;

fn fingerprint(c: &mut Criterion) {
    let mut g = c.benchmark_group("fingerprint");
    for (name, bytes) in [("4k", 4096), ("16k", 16384), ("1M", 1 << 20)] {
        let data = heap_bytes(1, bytes);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("xxh3_128/{name}"), |b| {
            b.iter(|| xxhash_rust::xxh3::xxh3_128(black_box(&data)))
        });
        if bytes > 4096 {
            // What the engine does for a multi-block write: one hash per 4 KiB block.
            g.bench_function(format!("xxh3_128_per_block/{name}"), |b| {
                b.iter(|| {
                    black_box(&data)
                        .chunks(4096)
                        .map(xxhash_rust::xxh3::xxh3_128)
                        .fold(0u128, |a, h| a ^ h)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, fingerprint);
criterion_main!(benches);
