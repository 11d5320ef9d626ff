//! A snapshot state file is checksummed, not trusted: whatever its bytes,
//! reading it (container, then state) and checking the state must fail with
//! an error or succeed, never panic. The input is used twice: as a whole
//! file, and (when it is JSON) as the payload of a valid container, so that
//! the fuzzer reaches the state decoder past the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{format, MicrovmState};

fuzz_target!(|data: &[u8]| {
    if let Ok((_, state)) = format::decode::<MicrovmState>("fuzz.snap", data) {
        let _ = state.check();
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(file) = format::encode(&value) {
            if let Ok((_, state)) = format::decode::<MicrovmState>("fuzz.snap", &file) {
                let _ = state.check();
            }
        }
    }
});
