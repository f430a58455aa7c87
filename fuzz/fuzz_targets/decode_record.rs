//! Fuzz target: arbitrary bytes as a log record. Decoding must never panic, and whatever decodes
//! must re-encode to the same bytes (the codec is canonical).
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode_record -- -max_total_time=60`

#![no_main]

use blockwise_engine::event::{decode_record, encode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = decode_record(data) {
        assert_eq!(encode_record(&event), data, "decoded record does not re-encode to its bytes");
    }
});
