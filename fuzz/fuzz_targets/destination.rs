//! The destination's state machine over scripted connections (`migration::fuzzing::destination`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    migration::fuzzing::destination(data);
});
