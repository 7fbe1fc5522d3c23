//! Superblock and segment header decoding of arbitrary bytes: never panic; a decoded
//! superblock re-encodes to bytes that decode to the same value.
#![no_main]
use ingot_engine::format::{SegmentHeader, Superblock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(sb)) = Superblock::decode(data) {
        let mut buf = vec![0u8; 4096];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf), Ok(Some(sb)));
    }
    let _ = SegmentHeader::decode(data);
});
