//! Checkpoint blobs: decoding arbitrary bytes returns an error, never panics or allocates
//! without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ingot_engine::fuzz_decode_checkpoint(data);
});
