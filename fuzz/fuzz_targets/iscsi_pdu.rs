//! iSCSI PDU decoding (basic header, AHS, data segment, header and data digests) and SCSI
//! Command field parsing over arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ingot_iscsi::fuzzing::pdus(data);
});
