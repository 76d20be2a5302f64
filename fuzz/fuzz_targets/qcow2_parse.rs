//! Parse arbitrary bytes as a qcow2 image and exercise the whole read-only
//! API (snapshots, allocation maps, diffs, reads). Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    snapsync_qcow2::fuzzing::exercise(data);
});
