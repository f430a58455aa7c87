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
        "scale_http_seconds",
        "scale_http_peak_rss_bytes",
        "scale_http_rss_after_bytes",
        "resume_peak_rss_bytes",
        "resume_seconds",
        "restore_peak_rss_bytes",
        "restore_seconds",
        "scale_floor_seconds",
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
    assert!(doc["scale_http_items"].as_u64().unwrap_or(0) > 0, "the scale run over HTTP wrote nothing");
    assert!(doc["restore_created"].as_u64().unwrap_or(0) > 0, "the restore row created nothing");
    // The flat-memory row: one run per size, each in a process of its own.
    let memory = doc["memory"].as_array().expect("memory is a list");
    assert_eq!(memory.len(), 2, "{memory:?}");
    for m in memory {
        assert!(m["items"].as_u64().unwrap_or(0) > 0 && m["peak_rss_bytes"].as_u64().unwrap_or(0) > 0, "{m}");
    }
    // Two backups one after the other in one process, each with its RSS after it.
    let runs = doc["back_to_back"].as_array().expect("back_to_back is a list");
    assert_eq!(runs.len(), 2, "{runs:?}");
    for r in runs {
        assert!(r["items"].as_u64().unwrap_or(0) > 0 && r["rss_after_bytes"].as_u64().unwrap_or(0) > 0, "{r}");
    }
}

#[test]
fn only_runs_the_sections_asked_for_and_names_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_blockwise"))
        .args(["bench", "--quick", "--only", "grouping,log", "-o", "json", "--dir"])
        .arg(dir.path().join("scratch"))
        .output()
        .expect("run blockwise bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench -o json prints JSON");
    assert!(doc["plan_seconds_300k"].is_number() && doc["log_events_per_second"].is_number(), "{doc}");
    assert!(doc["scale_seconds"].is_null() && doc["scale_http_seconds"].is_null(), "{doc}");
    let out = Command::new(env!("CARGO_BIN_EXE_blockwise"))
        .args(["bench", "--only", "speed"])
        .output()
        .expect("run blockwise bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--only speed: no such section"), "{err}");
}
