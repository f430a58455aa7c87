//! `blockwise bench --quick -o json` runs and reports every documented key as a number. A smoke
//! test only: the numbers are reported, never asserted (docs/benchmarks.md records a full run).

use std::process::Command;

#[test]
fn quick_bench_reports_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_blockwise"))
        .args(["bench", "--quick", "-o", "json", "--dir"])
        .arg(dir.path().join("scratch"))
        .output()
        .expect("run blockwise bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench -o json prints JSON");
    for key in [
        "scale_objects",
        "scale_seconds",
        "scale_items_per_second",
        "scale_peak_rss_bytes",
        "efficiency_workers_16",
        "log_events_per_second",
        "log_ratio_to_raw",
        "recovery_fold_seconds_1m",
        "plan_seconds_300k",
        "sim_seeds_per_cpu_second",
    ] {
        assert!(doc[key].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0), "{key} is not a number: {}", doc[key]);
    }
    assert_eq!(doc["quick"], true);
    assert!(doc["scale_items"].as_u64().unwrap_or(0) > 0, "the scale run wrote nothing");
}
