//! NBD transmission-phase request decoding and dispatch (compact and extended headers,
//! structured or simple replies) over arbitrary bytes against an in-memory export.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ingot_nbd::fuzzing::requests(data);
});
