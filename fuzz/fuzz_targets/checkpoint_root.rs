//! Format 3 checkpoint roots: the input, sealed as the pool would seal a root (so the parser
//! behind the seal is reached), decodes or returns an error, never panics or allocates without
//! bound; one that decodes encodes and decodes again to the same root. Unsealed, nothing
//! decodes.
#![no_main]
use ingot_engine::format::{CheckpointRoot, LogKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = LogKey([0x5a; 32]);
    // Unsealed, nothing decodes (the fuzzer cannot forge the MAC).
    assert!(CheckpointRoot::decode(data, &key).is_err());
    let mut sealed = data.to_vec();
    CheckpointRoot::seal_for_fuzzing(&mut sealed, &key);
    if let Ok(root) = CheckpointRoot::decode(&sealed, &key) {
        let again = CheckpointRoot::decode(&root.encode(&key), &key).expect("re-encoded root");
        assert_eq!(again, root);
    }
});
