//! NBD negotiation (option haggling) followed by transmission, over arbitrary client bytes:
//! never panics, never hangs, never allocates without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ingot_nbd::fuzzing::session(data);
});
