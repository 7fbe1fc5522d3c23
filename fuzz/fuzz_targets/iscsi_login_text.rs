//! iSCSI text keys (`key=value\0`) and the login state machine (security and operational
//! negotiation, CHAP) over arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ingot_iscsi::fuzzing::login_text(data);
});
