//! `IdempotencyKey::parse` on arbitrary bytes: no panic; an accepted key is 1-255 visible ASCII
//! bytes; its bare and quoted forms parse to the same key. The checks live in
//! `tests/common/inputs.rs`, which CI also runs through proptest.
#![no_main]

#[path = "../../tests/common/inputs.rs"]
mod inputs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| inputs::check_key(data));
