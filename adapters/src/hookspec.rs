//! Velero's `spec.hooks` as users write it, converted to the engine's hook spec.
//!
//! `--hooks-file` takes the JSON of a Velero Backup's `spec.hooks` (`{"resources": [...]}`), or the
//! bare `resources` array: each entry with `includedNamespaces`, `excludedNamespaces`,
//! `includedResources`, `labelSelector` (`matchLabels` / `matchExpressions`) and `pre`/`post` lists
//! of `{"exec": {container, command, onError, timeout}}`. The conversion happens here, at the
//! edge, so the engine's recorded spec (and its pinned log encoding) stays as it is. Anything the
//! engine cannot honour is an error naming the hook, never silently ignored.

use blockwise_engine::hooks::{ExecHookSpec, OnError, ResourceHookSpec};
use serde::Deserialize;

/// Velero's `spec.hooks`: `resources` is its only field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HooksSpec {
    resources: Vec<VeleroResourceHook>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VeleroResourceHook {
    #[serde(default)]
    name: String,
    #[serde(default)]
    included_namespaces: Vec<String>,
    #[serde(default)]
    excluded_namespaces: Vec<String>,
    #[serde(default)]
    included_resources: Vec<String>,
    #[serde(default)]
    excluded_resources: Vec<String>,
    #[serde(default)]
    label_selector: Option<VeleroSelector>,
    #[serde(default)]
    pre: Vec<VeleroHook>,
    #[serde(default)]
    post: Vec<VeleroHook>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VeleroSelector {
    #[serde(default)]
    match_labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<VeleroExpression>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VeleroExpression {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VeleroHook {
    exec: VeleroExec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VeleroExec {
    #[serde(default)]
    container: String,
    command: Vec<String>,
    #[serde(default)]
    on_error: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

fn selector_string(name: &str, s: &VeleroSelector) -> Result<String, String> {
    let mut parts: Vec<String> = s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for e in &s.match_expressions {
        let values = e.values.join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => {
                return Err(format!(
                    "hook {name:?}: labelSelector operator {other:?} is not In, NotIn, Exists or DoesNotExist"
                ))
            }
        });
    }
    Ok(parts.join(","))
}

fn exec(name: &str, h: VeleroHook) -> Result<ExecHookSpec, String> {
    let on_error = match h.exec.on_error.as_deref() {
        None => None,
        Some("Fail") => Some(OnError::Fail),
        Some("Continue") => Some(OnError::Continue),
        Some(other) => return Err(format!("hook {name:?}: onError {other:?} is not Fail or Continue")),
    };
    if h.exec.command.is_empty() {
        return Err(format!("hook {name:?}: exec.command is empty"));
    }
    Ok(ExecHookSpec { container: h.exec.container, command: h.exec.command, on_error, timeout: h.exec.timeout })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Parses a hooks file (Velero's `spec.hooks` JSON, or its `resources` array).
pub fn parse_hooks_file(text: &str) -> Result<Vec<ResourceHookSpec>, String> {
    let expected = "expected Velero's spec.hooks as JSON ({\"resources\": [...]}) or its resources array";
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("{expected}: {e}"))?;
    // Each shape parsed on its own, so an error names the field that is wrong (an untagged enum
    // would only say that neither shape matched — and accepted unknown top-level fields).
    let resources: Vec<VeleroResourceHook> = match value {
        serde_json::Value::Object(_) => {
            serde_json::from_value::<HooksSpec>(value).map_err(|e| e.to_string())?.resources
        }
        serde_json::Value::Array(_) => serde_json::from_value(value).map_err(|e| format!("resources: {e}"))?,
        other => return Err(format!("{expected}, not {}", json_kind(&other))),
    };
    let mut out = Vec::new();
    for r in resources {
        let pod_hooks = r.included_resources.is_empty()
            || r.included_resources.iter().any(|x| matches!(x.as_str(), "*" | "pods" | "pod" | "Pod"));
        let excluded = r.excluded_resources.iter().any(|x| matches!(x.as_str(), "*" | "pods" | "pod" | "Pod"));
        if !pod_hooks || excluded {
            return Err(format!(
                "hook {:?}: exec hooks run in pods; includedResources/excludedResources must allow pods",
                r.name
            ));
        }
        let label_selector = r.label_selector.as_ref().map(|s| selector_string(&r.name, s)).transpose()?;
        let pre = r.pre.into_iter().map(|h| exec(&r.name, h)).collect::<Result<Vec<_>, _>>()?;
        let post = r.post.into_iter().map(|h| exec(&r.name, h)).collect::<Result<Vec<_>, _>>()?;
        out.push(ResourceHookSpec {
            name: r.name,
            included_namespaces: r.included_namespaces,
            excluded_namespaces: r.excluded_namespaces,
            label_selector,
            pre,
            post,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn velero_spec_hooks_convert() {
        let text = r#"{"resources": [{"name": "freeze", "includedNamespaces": ["db"], "includedResources": ["pods"],
            "labelSelector": {"matchLabels": {"app": "pg"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
            "pre": [{"exec": {"container": "pg", "command": ["fsfreeze", "-f", "/data"], "onError": "Continue", "timeout": "10s"}}],
            "post": [{"exec": {"command": ["fsfreeze", "-u", "/data"]}}]}]}"#;
        let hooks = parse_hooks_file(text).unwrap();
        assert_eq!(hooks.len(), 1);
        let h = &hooks[0];
        assert_eq!(h.label_selector.as_deref(), Some("app=pg,tier in (a,b)"));
        assert_eq!(h.pre[0].on_error, Some(OnError::Continue));
        assert_eq!(h.pre[0].timeout.as_deref(), Some("10s"));
        assert_eq!(h.post[0].command, ["fsfreeze", "-u", "/data"]);
        // The bare array works too.
        assert_eq!(parse_hooks_file(r#"[{"name": "x", "pre": [{"exec": {"command": ["true"]}}]}]"#).unwrap().len(), 1);
    }

    #[test]
    fn bad_hooks_name_the_hook() {
        for (text, needle) in [
            (r#"[{"name": "h", "pre": [{"exec": {"command": ["x"], "onError": "Maybe"}}]}]"#, "onError \"Maybe\""),
            (r#"[{"name": "h", "pre": [{"exec": {"command": []}}]}]"#, "exec.command is empty"),
            (
                r#"[{"name": "h", "labelSelector": {"matchExpressions": [{"key": "a", "operator": "Gt"}]}}]"#,
                "operator \"Gt\"",
            ),
            (r#"[{"name": "h", "includedResources": ["deployments"]}]"#, "must allow pods"),
            (r#"[{"name": "h", "pre": [{"command": ["x"]}]}]"#, "resources: unknown field `command`"),
            // Issue 22: an unknown field anywhere is refused, and named.
            (r#"{"bogusTop": 1, "resources": []}"#, "unknown field `bogusTop`, expected `resources`"),
            (r#"{"resources": [{"name": "h", "bogus": 1}]}"#, "unknown field `bogus`"),
            ("42", "not a number"),
            ("{", "expected Velero's spec.hooks"),
        ] {
            let e = parse_hooks_file(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
