//! SCSI command execution: a sequence of CDBs with their Data-Out run in order against one
//! small in-memory logical unit, as two initiator ports, with injected backend errors.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ingot_iscsi::fuzzing::cdbs(data);
});
