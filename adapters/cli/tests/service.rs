//! `blockwise install` and `blockwise serve` from the outside: the manifests under `deploy/` are
//! what the binary prints, and bad flags are usage errors.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_blockwise");

fn run(args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(BIN)
        .args(args)
        .env("HOME", dir.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

#[test]
fn deploy_holds_what_install_prints() {
    let out = run(&["install", "--dry-run", "-o", "yaml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/blockwise.yaml")).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        committed,
        "deploy/blockwise.yaml is stale: regenerate it with `blockwise install --dry-run -o yaml > deploy/blockwise.yaml`"
    );
    let json = run(&["install", "--dry-run", "-o", "json", "--namespace", "ops"]);
    let list: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["metadata"]["name"], "ops");
}

#[test]
fn install_without_dry_run_and_bad_serve_flags_are_usage_errors() {
    let out = run(&["install"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run -o yaml | kubectl apply -f -"));
    let out = run(&["install", "--dry-run", "--memory-limit", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("for '--memory-limit") && err.contains("\"lots\": expected bytes or a number with Ki"),
        "{err}"
    );
    let out = run(&["install", "--dry-run", "--memory-limit", "4Gi", "--cpu-request", "1.5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("memory: 4Gi") && yaml.contains("cpu: '1.5'"), "{yaml}");
    let out = run(&["install", "--dry-run", "--tenant-namespaces", "Payments"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tenant-namespaces"));
    let out = run(&["serve", "--lease-duration", "5", "--lease-grace", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lease-grace 5 must be shorter"));
    let out = run(&["serve", "--storage-location", "offsite"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected NAME=DIR"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kubeconfig");
    std::fs::write(&bad, "apiVersion: v1\nclusters: [oops\n").unwrap();
    let out = run(&["serve", "--kubeconfig", bad.to_str().unwrap(), "--metrics-addr", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(bad.to_str().unwrap()));
}
