//! libFuzzer's entry to [`shale_fuzz_targets::receipts`]; the target and its invariants live there,
//! so that CI runs the same code over its corpus on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shale_fuzz_targets::receipts::run(data));
