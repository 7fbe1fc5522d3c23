//! Superblock and segment header decoding of arbitrary bytes: never panic; a decoded
//! superblock re-encodes to bytes that decode to the same value.
#![no_main]
use ingot_engine::format::{LogKey, SegmentHeader, Superblock, FORMAT_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(sb)) = Superblock::decode(data) {
        let mut buf = vec![0u8; 4096];
        sb.encode(&mut buf);
        // Version 1 superblocks are written back as the current version.
        let again = Superblock::decode(&buf).expect("re-encoded superblock decodes");
        if sb.version == FORMAT_VERSION {
            assert_eq!(again, Some(sb));
        }
    }
    let _ = SegmentHeader::decode(data);
    let _ = SegmentHeader::decode_authentic(data, Some(&LogKey([3; 32])));
});
