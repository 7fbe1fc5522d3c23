//! Record headers and entries as recovery reads them from a device: never panic, and anything
//! accepted re-encodes to the same bytes.
#![no_main]
use ingot_engine::format::{DataEntry, RecordHeader, TrimEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = RecordHeader::decode(data) {
        let _ = h.verify(data);
        let eb = h.entry_bytes();
        for i in 0..h.entry_count as usize {
            let at = RecordHeader::BYTES + i * eb;
            if let Some(raw) = data.get(at..at + eb) {
                let _ = DataEntry::decode(raw);
                let _ = TrimEntry::decode(raw);
            }
        }
    }
});
