//! Format 3 checkpoint roots: decoding arbitrary bytes returns an error, never panics or
//! allocates without bound; a root that decodes encodes back to the same bytes.
#![no_main]
use ingot_engine::format::CheckpointRoot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = CheckpointRoot::decode(data) {
        assert_eq!(root.encode(), data, "a root that decodes is its own encoding");
    }
});
