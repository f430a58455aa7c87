//! Fuzz target: object-to-item parsing and hook annotation resolution on arbitrary JSON text.
//! Neither may panic; every rejection is an error value naming the object.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run parse_object -- -max_total_time=60`

#![no_main]

use blockwise_engine::engine::canonicalize;
use blockwise_engine::hooks::{parse_command, parse_go_duration_ms, resolve_pod_hooks};
use blockwise_engine::item::ResourceType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_command(text);
    let _ = parse_go_duration_ms(text);
    let pods = ResourceType::new("", "v1", "pods", "Pod", true);
    if let Ok((item, canonical)) = canonicalize(&pods, 0, text) {
        let mut warnings = Vec::new();
        let _ = resolve_pod_hooks(&item, &[], &mut warnings);
        // Canonical JSON is a fixed point.
        let (_, again) = canonicalize(&pods, 0, &canonical).expect("canonical JSON parses again");
        assert_eq!(again, canonical);
    }
});
