//! Bad input from the cluster (R1): malformed objects and annotations become diagnostics that name
//! the object, the backup goes on with everything else, and nothing panics.

mod common;

use blockwise_engine::event::{Event, HookOutcome, Phase, Severity};
use blockwise_engine::spec::BackupSpec;
use common::{backup, Cluster};
use serde_json::json;

#[test]
fn malformed_objects_are_warnings_naming_them_and_the_rest_is_backed_up() {
    let objects = json!([
        {"kind": "ConfigMap", "metadata": {"namespace": "a", "name": "good"}},
        {"kind": "ConfigMap", "metadata": {"namespace": "a"}},
        {"kind": "ConfigMap", "metadata": {"namespace": "a", "name": "../../etc/passwd"}},
        {"kind": "ConfigMap", "metadata": {"name": "no-namespace"}},
        {"kind": "Pod", "metadata": {"namespace": "a", "name": "web", "annotations": {
            "pre.hook.backup.velero.io/command": "[\"sync\"",
            "pre.hook.backup.velero.io/timeout": "forever"}},
         "spec": {"containers": [{"name": "main"}]}, "status": {"phase": "Running"}},
    ]);
    let c = Cluster::from_json(&objects.to_string()).expect("fixture");
    let run = backup(&c, BackupSpec::new("bad"), 2, 1);
    assert!(run.finished);
    let warnings: Vec<&str> = run
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Diagnostic { severity: Severity::Warning, message } => Some(message.as_str()),
            _ => None,
        })
        .collect();
    let has = |needle: &str| warnings.iter().any(|w| w.contains(needle));
    assert!(has("configmaps: object #1 has no metadata.name"), "{warnings:#?}");
    assert!(has("configmaps ../../etc/passwd") && has("could escape the store directory"), "{warnings:#?}");
    assert!(has("configmaps no-namespace: namespaced object has no metadata.namespace"), "{warnings:#?}");
    assert!(has("pod a/web") && has("timeout \"forever\""), "{warnings:#?}");
    // The malformed hook command fails the pod's block (onError defaults to Fail) without an exec.
    let invalid = run.events.iter().any(|e| matches!(e, Event::HookFinished { outcome: HookOutcome::Invalid { reason }, .. } if reason.contains("a/web")));
    assert!(invalid);
    assert!(run.effects.iter().all(|e| !matches!(e, common::Effect::Hook { .. })), "no exec for an invalid hook");
    let staged: Vec<String> = run.staged.keys().map(|k| k.name().to_string()).collect();
    assert_eq!(staged, ["good"], "everything valid is written; nothing escapes");
    let phase =
        run.events.iter().find_map(|e| if let Event::BackupFinished { phase, .. } = e { Some(*phase) } else { None });
    assert_eq!(phase, Some(Phase::PartiallyFailed));
}
