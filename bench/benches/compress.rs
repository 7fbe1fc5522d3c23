//! LZ4 (lz4_flex) on database-like data: 4 KiB blocks (per-block compression) and 16 KiB runs
//! (compressing runs of blocks before packing), cut from PostgreSQL-like heap pages of generated
//! customs rows; random bytes for the incompressible case. Prints the compression ratio of each.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ingot_bench::pages::heap_bytes;

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    vec![
        // The first half of a heap page (header, line pointers, free space, rows)...
        ("db_page_4k_head", heap_bytes(3, 8192)[..4096].to_vec()),
        // ...and the second half: rows only.
        ("db_page_4k_tail", heap_bytes(3, 8192)[4096..].to_vec()),
        ("db_run_16k", heap_bytes(4, 16384)),
        ("random_4k", random),
    ]
}

fn compress(c: &mut Criterion) {
    let mut g = c.benchmark_group("lz4");
    for (name, data) in inputs() {
        let packed = lz4_flex::block::compress(&data);
        eprintln!(
            "lz4 {name}: {} -> {} bytes ({:.2}x)",
            data.len(),
            packed.len(),
            data.len() as f64 / packed.len() as f64
        );
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(format!("compress/{name}"), |b| {
            let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
            b.iter(|| lz4_flex::block::compress_into(black_box(&data), &mut out))
        });
        g.bench_function(format!("decompress/{name}"), |b| {
            let mut out = vec![0u8; data.len()];
            b.iter(|| lz4_flex::block::decompress_into(black_box(&packed), &mut out))
        });
    }
    g.finish();
}

criterion_group!(benches, compress);
criterion_main!(benches);
