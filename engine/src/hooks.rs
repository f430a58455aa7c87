//! Hook resolution (DESIGN §4): which commands run in which pod, before and after a block.
//!
//! Sources are Velero's pod annotations (`pre.hook.backup.velero.io/*`, `post.…`, and the
//! unprefixed `hook.backup.velero.io/*`, which means pre) and the spec's `hooks.resources[]`. An
//! annotation replaces the spec's hooks for that phase. Defaults follow Velero's documentation, not
//! its code: the first container, onError **Fail**, timeout 30 s. Only Running pods run hooks.
//!
//! Malformed annotations never panic and are never silently dropped: a bad timeout or onError
//! falls back to the default with a warning naming the pod and annotation; a command or container
//! that cannot be used becomes a hook whose `invalid` reason fails it without an exec, so a freeze
//! that cannot run is treated like a freeze that failed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::item::{Item, ItemKey};
use crate::spec::{glob_match, LabelSelector};

/// Default hook timeout.
pub const DEFAULT_HOOK_TIMEOUT_MS: u64 = 30_000;

/// Before or after the block's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HookPhase {
    /// Runs before any item of the block is written.
    Pre,
    /// Runs after every item of the block is written (or the block failed).
    Post,
}

/// What a failed hook does to its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OnError {
    /// A failed pre-hook fails the block: nothing of it is written.
    Fail,
    /// The failure is recorded and the block goes on.
    Continue,
}

/// One exec hook as written in a spec (Velero's `exec` hook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecHookSpec {
    /// Container; empty means the pod's first container.
    #[serde(default)]
    pub container: String,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// `Fail` unless set.
    #[serde(default, rename = "onError")]
    pub on_error: Option<OnError>,
    /// Go duration string, e.g. `30s`.
    #[serde(default)]
    pub timeout: Option<String>,
}

/// Velero's `spec.hooks.resources[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceHookSpec {
    /// Name, for messages.
    #[serde(default)]
    pub name: String,
    /// Namespaces where it applies; empty = all.
    #[serde(default, rename = "includedNamespaces")]
    pub included_namespaces: Vec<String>,
    /// Namespaces where it does not apply.
    #[serde(default, rename = "excludedNamespaces")]
    pub excluded_namespaces: Vec<String>,
    /// Label selector on the pod.
    #[serde(default, rename = "labelSelector")]
    pub label_selector: Option<String>,
    /// Pre-hooks in order.
    #[serde(default)]
    pub pre: Vec<ExecHookSpec>,
    /// Post-hooks in order.
    #[serde(default)]
    pub post: Vec<ExecHookSpec>,
}

/// A resolved hook: exactly what will be executed, or why it cannot be.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hook {
    /// The pod it runs in.
    pub pod: ItemKey,
    /// Pre or post.
    pub phase: HookPhase,
    /// Position among the pod's hooks of this phase.
    pub index: u32,
    /// Container name.
    pub container: String,
    /// Command and arguments.
    pub command: Vec<String>,
    /// Failure policy.
    pub on_error: OnError,
    /// Timeout that cancels the exec.
    pub timeout_ms: u64,
    /// When set, the hook cannot run and counts as failed with this reason.
    pub invalid: Option<String>,
}

/// The longest duration Go's `time.ParseDuration` accepts (`i64::MAX` nanoseconds, about 292
/// years), in milliseconds: anything longer is an error there and here, so no sum of a time and a
/// duration can wrap (a wrapped `@every` or TTL would make a schedule or the GC act at once).
pub const DURATION_MS_MAX: u64 = (i64::MAX as u64) / 1_000_000;

/// Parses a Go duration (`30s`, `1m30s`, `500ms`, `2h`) into milliseconds; `None` beyond
/// [`DURATION_MS_MAX`].
pub fn parse_go_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(0);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * mult;
    }
    if total.is_finite() && total.round() <= DURATION_MS_MAX as f64 {
        Some(total.round() as u64)
    } else {
        None
    }
}

/// Parses a command annotation: a JSON array of strings, or a plain single command.
pub fn parse_command(s: &str) -> Result<Vec<String>, String> {
    let t = s.trim();
    if t.starts_with('[') {
        let v: Value = serde_json::from_str(t).map_err(|e| format!("invalid JSON array: {e}"))?;
        let arr = v.as_array().ok_or("not a JSON array")?;
        let cmd: Option<Vec<String>> = arr.iter().map(|x| x.as_str().map(str::to_string)).collect();
        let cmd = cmd.ok_or("array elements must be strings")?;
        if cmd.is_empty() {
            return Err("empty command".into());
        }
        Ok(cmd)
    } else if t.is_empty() {
        Err("empty command".into())
    } else {
        Ok(vec![t.to_string()])
    }
}

/// Whether the pod's `status.phase` is `Running`.
pub fn pod_running(pod: &Item) -> bool {
    match pod.kept_pod_facts() {
        Some(f) => f.phase.as_deref() == Some("Running"),
        None => pod.str_at("/status/phase") == Some("Running"),
    }
}

fn containers(pod: &Item) -> Vec<String> {
    pod.pod_facts().containers.clone()
}

/// Resolves every hook of a pod, pre and post, and the warnings that resolution produced.
/// Pods that are not Running get none.
pub fn resolve_pod_hooks(pod: &Item, spec_hooks: &[ResourceHookSpec], warnings: &mut Vec<String>) -> Vec<Hook> {
    if !pod.key.is("", "pods") || !pod_running(pod) {
        return Vec::new();
    }
    let containers = containers(pod);
    let mut out = Vec::new();
    for phase in [HookPhase::Pre, HookPhase::Post] {
        let from_annotation = annotation_hook(pod, phase, &containers, warnings);
        let hooks = match from_annotation {
            Some(h) => vec![h],
            None => spec_hooks_for(pod, phase, spec_hooks, &containers, warnings),
        };
        out.extend(hooks.into_iter().enumerate().map(|(i, mut h)| {
            h.index = i as u32;
            h
        }));
    }
    out
}

/// The annotation prefixes of pre-hooks (the prefixed form first: it wins) and of post-hooks.
const PRE_PREFIXES: &[&str] = &["pre.hook.backup.velero.io", "hook.backup.velero.io"];
const POST_PREFIXES: &[&str] = &["post.hook.backup.velero.io"];

/// Whether a pod's annotation `key` is one hooks read (`<prefix>/<field>` of a hook prefix).
pub fn is_hook_annotation(key: &str) -> bool {
    key.split_once('/').is_some_and(|(prefix, _)| PRE_PREFIXES.contains(&prefix) || POST_PREFIXES.contains(&prefix))
}

fn annotation_hook(pod: &Item, phase: HookPhase, containers: &[String], warnings: &mut Vec<String>) -> Option<Hook> {
    let prefixes = match phase {
        HookPhase::Pre => PRE_PREFIXES,
        HookPhase::Post => POST_PREFIXES,
    };
    // The prefixed form wins over the legacy unprefixed one when both are present.
    let prefix = prefixes.iter().find(|p| pod.annotations().contains_key(&format!("{p}/command")))?;
    let get = |field: &str| pod.annotations().get(&format!("{prefix}/{field}")).map(String::as_str);
    let spec = ExecHookSpec {
        container: get("container").unwrap_or("").to_string(),
        command: Vec::new(),
        on_error: None,
        timeout: get("timeout").map(str::to_string),
    };
    let mut hook = build_hook(pod, phase, &spec, containers, &format!("annotation {prefix}"), warnings);
    if let Some(v) = get("on-error") {
        match v {
            "Fail" => hook.on_error = OnError::Fail,
            "Continue" => hook.on_error = OnError::Continue,
            other => warnings.push(format!(
                "pod {}: annotation {prefix}/on-error: {other:?} is not Fail or Continue; using Fail",
                ns_name(&pod.key)
            )),
        }
    }
    match parse_command(get("command").unwrap_or("")) {
        Ok(cmd) => hook.command = cmd,
        Err(e) => {
            let msg = format!("pod {}: annotation {prefix}/command: {e}", ns_name(&pod.key));
            hook.invalid.get_or_insert(msg);
        }
    }
    Some(hook)
}

fn spec_hooks_for(
    pod: &Item,
    phase: HookPhase,
    spec_hooks: &[ResourceHookSpec],
    containers: &[String],
    warnings: &mut Vec<String>,
) -> Vec<Hook> {
    let ns = pod.key.namespace().unwrap_or("");
    let mut out = Vec::new();
    for rh in spec_hooks {
        let ns_ok = (rh.included_namespaces.is_empty() || rh.included_namespaces.iter().any(|p| glob_match(p, ns)))
            && !rh.excluded_namespaces.iter().any(|p| glob_match(p, ns));
        let labels_ok = match rh.label_selector.as_deref() {
            None | Some("") => true,
            Some(sel) => match LabelSelector::parse(sel) {
                Ok(s) => s.matches(pod.labels()),
                Err(e) => {
                    warnings.push(format!("hook spec {:?}: {e}; it applies to no pod", rh.name));
                    false
                }
            },
        };
        if !(ns_ok && labels_ok) {
            continue;
        }
        let list = if phase == HookPhase::Pre { &rh.pre } else { &rh.post };
        for spec in list {
            let mut h = build_hook(pod, phase, spec, containers, &format!("hook spec {:?}", rh.name), warnings);
            if spec.command.is_empty() {
                h.invalid.get_or_insert(format!("pod {}: hook spec {:?}: empty command", ns_name(&pod.key), rh.name));
            }
            h.command = spec.command.clone();
            out.push(h);
        }
    }
    out
}

fn build_hook(
    pod: &Item,
    phase: HookPhase,
    spec: &ExecHookSpec,
    containers: &[String],
    source: &str,
    warnings: &mut Vec<String>,
) -> Hook {
    let mut invalid = None;
    let container = if spec.container.is_empty() {
        match containers.first() {
            Some(c) => c.clone(),
            None => {
                invalid = Some(format!("pod {}: {source}: pod has no containers", ns_name(&pod.key)));
                String::new()
            }
        }
    } else {
        if !containers.contains(&spec.container) {
            invalid =
                Some(format!("pod {}: {source}: container {:?} not found in pod", ns_name(&pod.key), spec.container));
        }
        spec.container.clone()
    };
    let timeout_ms = match spec.timeout.as_deref() {
        None => DEFAULT_HOOK_TIMEOUT_MS,
        Some(t) => match parse_go_duration_ms(t) {
            Some(0) | None => {
                warnings.push(format!(
                    "pod {}: {source}: timeout {t:?} is not a positive duration like \"30s\"; using 30s",
                    ns_name(&pod.key)
                ));
                DEFAULT_HOOK_TIMEOUT_MS
            }
            Some(ms) => ms,
        },
    };
    Hook {
        pod: pod.key.clone(),
        phase,
        index: 0,
        container,
        command: Vec::new(),
        on_error: spec.on_error.unwrap_or(
            if crate::mutation::active(crate::mutation::Mutation::DefaultOnErrorContinue) {
                OnError::Continue
            } else {
                OnError::Fail
            },
        ),
        timeout_ms,
        invalid,
    }
}

fn ns_name(k: &ItemKey) -> String {
    match &k.namespace() {
        Some(ns) => format!("{ns}/{}", k.name()),
        None => k.name().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::ResourceType;
    use serde_json::json;

    fn pod(annotations: Value, phase: &str) -> Item {
        let obj = json!({
            "metadata": {"name": "db-0", "namespace": "prod", "annotations": annotations, "labels": {"app": "db"}},
            "spec": {"containers": [{"name": "main"}, {"name": "sidecar"}]},
            "status": {"phase": phase}
        });
        Item::from_value(&ResourceType::new("", "v1", "pods", "Pod", true), 0, obj).unwrap()
    }

    fn resolve(p: &Item, spec: &[ResourceHookSpec]) -> (Vec<Hook>, Vec<String>) {
        let mut w = Vec::new();
        (resolve_pod_hooks(p, spec, &mut w), w)
    }

    #[test]
    fn defaults_are_first_container_fail_30s() {
        let (hooks, w) = resolve(
            &pod(json!({"pre.hook.backup.velero.io/command": "[\"fsfreeze\",\"-f\",\"/data\"]"}), "Running"),
            &[],
        );
        assert!(w.is_empty());
        assert_eq!(hooks.len(), 1);
        let h = &hooks[0];
        assert_eq!(
            (h.phase, h.container.as_str(), h.on_error, h.timeout_ms),
            (HookPhase::Pre, "main", OnError::Fail, 30_000)
        );
        assert_eq!(h.command, ["fsfreeze", "-f", "/data"]);
        assert_eq!(h.invalid, None);
    }

    #[test]
    fn legacy_unprefixed_annotation_is_pre_and_plain_command_is_one_word() {
        let (hooks, _) = resolve(
            &pod(
                json!({"hook.backup.velero.io/command": "sync", "post.hook.backup.velero.io/command": "[\"true\"]"}),
                "Running",
            ),
            &[],
        );
        assert_eq!(hooks.len(), 2);
        assert_eq!((hooks[0].phase, hooks[0].command.clone()), (HookPhase::Pre, vec!["sync".to_string()]));
        assert_eq!(hooks[1].phase, HookPhase::Post);
    }

    #[test]
    fn only_running_pods_run_hooks() {
        let (hooks, _) = resolve(&pod(json!({"pre.hook.backup.velero.io/command": "sync"}), "Pending"), &[]);
        assert!(hooks.is_empty());
    }

    #[test]
    fn malformed_annotations_are_reported_with_the_pod() {
        let p = pod(
            json!({
                "pre.hook.backup.velero.io/command": "[\"unterminated",
                "pre.hook.backup.velero.io/timeout": "soon",
                "pre.hook.backup.velero.io/on-error": "Maybe",
                "post.hook.backup.velero.io/command": "[\"x\"]",
                "post.hook.backup.velero.io/container": "nope"
            }),
            "Running",
        );
        let (hooks, w) = resolve(&p, &[]);
        assert_eq!(hooks[0].timeout_ms, 30_000);
        assert_eq!(hooks[0].on_error, OnError::Fail);
        let invalid = hooks[0].invalid.as_deref().unwrap();
        assert!(invalid.contains("prod/db-0") && invalid.contains("invalid JSON array"), "{invalid}");
        assert!(w.iter().any(|m| m.contains("prod/db-0") && m.contains("timeout \"soon\"")), "{w:?}");
        assert!(w.iter().any(|m| m.contains("on-error") && m.contains("Maybe")), "{w:?}");
        assert!(hooks[1].invalid.as_deref().unwrap().contains("container \"nope\" not found"));
    }

    #[test]
    fn annotation_overrides_spec_for_its_phase_only() {
        let spec = vec![ResourceHookSpec {
            name: "freeze".into(),
            included_namespaces: vec!["prod".into()],
            excluded_namespaces: vec![],
            label_selector: Some("app=db".into()),
            pre: vec![ExecHookSpec {
                container: "sidecar".into(),
                command: vec!["spec-pre".into()],
                on_error: Some(OnError::Continue),
                timeout: Some("1m".into()),
            }],
            post: vec![ExecHookSpec {
                container: String::new(),
                command: vec!["spec-post".into()],
                on_error: None,
                timeout: None,
            }],
        }];
        let (hooks, _) = resolve(&pod(json!({}), "Running"), &spec);
        assert_eq!(hooks.iter().map(|h| h.command[0].as_str()).collect::<Vec<_>>(), ["spec-pre", "spec-post"]);
        assert_eq!(
            (hooks[0].container.as_str(), hooks[0].on_error, hooks[0].timeout_ms),
            ("sidecar", OnError::Continue, 60_000)
        );
        let (hooks, _) = resolve(&pod(json!({"pre.hook.backup.velero.io/command": "ann-pre"}), "Running"), &spec);
        assert_eq!(hooks.iter().map(|h| h.command[0].as_str()).collect::<Vec<_>>(), ["ann-pre", "spec-post"]);
    }

    #[test]
    fn go_durations() {
        for (s, ms) in [
            ("30s", Some(30_000)),
            ("1m30s", Some(90_000)),
            ("500ms", Some(500)),
            ("1.5s", Some(1500)),
            ("2h", Some(7_200_000)),
            ("10", None),
            ("s", None),
            ("", None),
            ("-1s", None),
            // Go's limit: 2562047h47m16.854775807s is the longest; an hour more is an error.
            ("2562047h", Some(2_562_047 * 3_600_000)),
            ("2562048h", None),
            ("3000000000h", None),
            ("18446744073709551615ms", None),
        ] {
            assert_eq!(parse_go_duration_ms(s), ms, "{s}");
        }
    }
}
