//! Payload checksums: CRC-32 (crc32fast, what the engine stores) and CRC-32C (crc32c, hardware
//! SSE4.2 / ARMv8), over a block, a run and a record.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ingot_bench::pages::heap_bytes;

fn checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for (name, bytes) in [("4k", 4096), ("16k", 16384), ("1M", 1 << 20)] {
        let data = heap_bytes(2, bytes);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("crc32fast/{name}"), |b| {
            b.iter(|| crc32fast::hash(black_box(&data)))
        });
        g.bench_function(format!("crc32c/{name}"), |b| {
            b.iter(|| crc32c::crc32c(black_box(&data)))
        });
    }
    g.finish();
}

criterion_group!(benches, checksum);
criterion_main!(benches);
