//! The frame reader and the message decoder over arbitrary bytes (`migration::fuzzing::wire`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migration::fuzzing::wire(data));
