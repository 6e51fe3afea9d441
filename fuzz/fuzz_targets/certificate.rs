//! Fuzzes `ferry_host::decoders::certificate`: any input decodes or is refused.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferry_host::decoders::certificate(data);
});
