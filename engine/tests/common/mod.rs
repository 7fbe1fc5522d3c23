//! Helpers shared by the engine's integration tests.

/// A 4 KiB block of xorshift output from `seed`: unique per seed, incompressible.
pub fn xorshift_block(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..4096 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}
