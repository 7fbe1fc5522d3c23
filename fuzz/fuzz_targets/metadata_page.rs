//! Format 3 metadata pages: opening arbitrary bytes as a page never panics, and without the
//! pool's key nothing opens (the input may hold anything but a valid MAC).
#![no_main]
use ingot_engine::format::{LogKey, PageArray, PageHeader, PageKind, PagePtr, PageWant};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let want = PageWant {
        kind: PageKind::MapLeaf,
        level: 0,
        key: 1,
        array: PageArray::MapTree,
        at: PagePtr {
            segment: 1,
            offset: 4096,
            stamp: 1,
        },
    };
    assert!(PageHeader::open(data, &LogKey([0x5a; 32]), &want).is_err());
});
