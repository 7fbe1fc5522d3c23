//! The engine's data reduction (`ingot_engine::reduce`), as the write path calls it: the
//! compressibility probe, LZ4 over a group of 8 blocks (32 KiB) of PostgreSQL-like pages and of
//! random bytes, decoding a stored group, and the dedup index (one `get` and one `insert` per
//! written block). Prints the ratio of each group.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ingot_bench::pages::heap_bytes;
use ingot_engine::reduce::{self, DedupIndex, GROUP_BLOCKS};

fn random(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn reduction(c: &mut Criterion) {
    // As the engine fingerprints: under a secret derived from the pool key and the domain.
    let key = reduce::FingerprintKey::derive(&[0x5a; 32], b"shared");
    let fingerprint = |b: &[u8]| key.fingerprint(b);
    let group_bytes = GROUP_BLOCKS * 4096;
    let mut g = c.benchmark_group("reduce");
    for (name, data) in [
        ("db_pages", heap_bytes(11, group_bytes)),
        ("random", random(group_bytes)),
    ] {
        g.throughput(Throughput::Bytes(4096));
        g.bench_function(format!("worth_compressing/{name}"), |b| {
            b.iter(|| reduce::worth_compressing(black_box(&data[..4096])))
        });
        g.throughput(Throughput::Bytes(group_bytes as u64));
        g.bench_function(format!("fingerprint_group/{name}"), |b| {
            b.iter(|| {
                black_box(&data)
                    .chunks(4096)
                    .map(fingerprint)
                    .fold(0u128, |a, h| a ^ h)
            })
        });
        let packed = reduce::compress(&data);
        match &packed {
            Some(p) => eprintln!(
                "reduce {name}: {group_bytes} -> {} bytes ({:.2}x)",
                p.len(),
                group_bytes as f64 / p.len() as f64
            ),
            None => eprintln!("reduce {name}: stored uncompressed (saves less than an eighth)"),
        }
        g.bench_function(format!("compress_group/{name}"), |b| {
            b.iter(|| reduce::compress(black_box(&data)))
        });
        let (stored, flags) = match packed {
            Some(p) => (p, reduce::group_flags(true, 0, GROUP_BLOCKS)),
            None => (data.clone(), reduce::group_flags(false, 0, GROUP_BLOCKS)),
        };
        g.bench_function(format!("decode_group/{name}"), |b| {
            b.iter(|| reduce::decode(black_box(&stored), flags).expect("decodes"))
        });
    }
    g.finish();

    // The dedup index with 1M entries: a lookup and an insert per written block.
    let mut g = c.benchmark_group("dedup_index");
    let mut index = DedupIndex::new(64 << 20);
    for i in 0..1_000_000u64 {
        index.insert(fingerprint(&i.to_le_bytes()) as u64, i);
    }
    let mut next = 1_000_000u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("get_miss_then_insert", |b| {
        b.iter(|| {
            let key = fingerprint(&next.to_le_bytes()) as u64;
            if index.get(key).is_none() {
                index.insert(key, next);
            }
            next += 1;
        })
    });
    g.bench_function("get_hit", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 7919) % 1_000_000;
            index.get(fingerprint(&i.to_le_bytes()) as u64)
        })
    });
    g.finish();
}

criterion_group!(benches, reduction);
criterion_main!(benches);
