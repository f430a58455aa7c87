//! Fuzz target: log recovery from arbitrary bytes. The input is split into records at `0xFF 0xFE`
//! markers; recovery must never panic, and whatever it accepts must fold or fail with a named
//! sequence number — and resuming an engine from it must not panic either.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run recover_log -- -max_total_time=60`

#![no_main]

use blockwise_engine::event::recover_records;
use blockwise_engine::{Engine, EngineConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut records = Vec::new();
    let mut start = 0;
    for i in 0..data.len().saturating_sub(1) {
        if data[i] == 0xFF && data[i + 1] == 0xFE {
            records.push(&data[start..i]);
            start = i + 2;
        }
    }
    records.push(&data[start..]);
    if let Ok(r) = recover_records(records.iter().enumerate().map(|(i, r)| (i as u64, *r))) {
        if let Ok(mut e) = Engine::resume(&r.events, EngineConfig::default(), 0) {
            let _ = e.poll();
        }
    }
});
