//! Fuzzes `ferry_host::decoders::config`: any input decodes or is refused.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferry_host::decoders::config(data);
});
