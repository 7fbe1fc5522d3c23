//! Block fingerprint, as the engine computes it for every written block
//! (`DataEntry::fingerprint`), and the keyed alternatives weighed for it (see
//! docs/architecture.md, "Dedup across tenants"): unkeyed XXH3-128 (what pools used before the
//! fingerprint was keyed), XXH3-128 under a 192-byte secret derived from a pool key with BLAKE3
//! in XOF mode (what the engine uses: `fingerprint_engine`), and keyed BLAKE3 (a PRF, about six
//! times the cost). The `/4k` entries hash one 4 KiB block per iteration: criterion's time is ns
//! per block.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ingot_bench::pages::heap_bytes;

fn fingerprint(c: &mut Criterion) {
    let pool_key = [0x5a_u8; 32];
    let mut secret = [0u8; 192];
    blake3::Hasher::new_derive_key("ingot bench xxh3 secret")
        .update(&pool_key)
        .finalize_xof()
        .fill(&mut secret);
    let mut g = c.benchmark_group("fingerprint");
    for (name, bytes) in [("4k", 4096), ("16k", 16384), ("1M", 1 << 20)] {
        let data = heap_bytes(1, bytes);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("xxh3_128/{name}"), |b| {
            b.iter(|| xxhash_rust::xxh3::xxh3_128(black_box(&data)))
        });
        g.bench_function(format!("xxh3_128_secret/{name}"), |b| {
            b.iter(|| xxhash_rust::xxh3::xxh3_128_with_secret(black_box(&data), &secret))
        });
        g.bench_function(format!("blake3_keyed/{name}"), |b| {
            b.iter(|| blake3::keyed_hash(&pool_key, black_box(&data)))
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
            g.bench_function(format!("blake3_keyed_per_block/{name}"), |b| {
                b.iter(|| {
                    black_box(&data)
                        .chunks(4096)
                        .map(|c| {
                            u128::from_le_bytes(
                                blake3::keyed_hash(&pool_key, c).as_bytes()[..16]
                                    .try_into()
                                    .unwrap(),
                            )
                        })
                        .fold(0u128, |a, h| a ^ h)
                })
            });
        }
    }
    g.finish();
    // The engine's own function: secret derived once per dedup domain, one XXH3 per block.
    let key = ingot_engine::reduce::FingerprintKey::derive(&pool_key, b"shared");
    let block = heap_bytes(2, 4096);
    let mut g = c.benchmark_group("fingerprint_engine");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("per_block/4k", |b| {
        b.iter(|| key.fingerprint(black_box(&block)))
    });
    g.finish();
}

criterion_group!(benches, fingerprint);
criterion_main!(benches);
