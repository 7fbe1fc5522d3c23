//! Helpers shared by the engine's integration tests (each test file uses some of them).
#![allow(dead_code)]

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

/// One read through `r`, reaped on this thread (or, handed to a shard, waited for).
pub fn read_through(
    r: &mut ingot_engine::Reader,
    offset: u64,
    len: u32,
) -> ingot_engine::Result<Vec<u8>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    r.read(
        offset,
        len,
        Box::new(move |res| {
            let _ = tx.send(res);
        }),
    );
    loop {
        if let Ok(res) = rx.try_recv() {
            return res.map(ingot_engine::Reply::into_vec);
        }
        if r.in_flight() > 0 {
            r.wait();
        } else {
            // Handed to a shard: its completion comes from there.
            return rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("a handed-off read completes")
                .map(ingot_engine::Reply::into_vec);
        }
    }
}
