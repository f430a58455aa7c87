//! The backup spec and its compiled filters (DESIGN §2).
//!
//! [`BackupSpec`] is what the user asked for, recorded verbatim in the `BackupRequested` event.
//! [`Selection`] is the spec compiled against discovery: it answers two different questions that
//! Velero's code blurs. [`Selection::exclusion`] says whether an item may never be in the backup
//! (excluded resource or namespace, `velero.io/exclude-from-backup=true`, being deleted, cluster
//! resources switched off); exclusions win over pull. [`Selection::is_seed`] says whether an item is
//! selected on its own (label selector, cluster-resource default); pull relations can bring in items
//! that are not seeds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hooks::ResourceHookSpec;
use crate::item::{Item, ItemKey, ResourceType};

/// The label that opts an object out of every backup.
pub const EXCLUDE_LABEL: &str = "velero.io/exclude-from-backup";
/// The default label whose value puts PVCs into one volume group.
pub const DEFAULT_VOLUME_GROUP_LABEL: &str = "velero.io/volume-group";
/// Default bound above which a block is reported (it is never split).
pub const DEFAULT_BLOCK_ITEMS_MAX: u32 = 1000;

/// What the user asked to back up: Velero's Backup spec, as far as blockwise implements it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSpec {
    /// Backup name (a DNS-1123 label; validated by [`validate_backup_name`]).
    pub name: String,
    /// Namespaces to include; empty means all. `*` globs are allowed.
    pub included_namespaces: Vec<String>,
    /// Namespaces to exclude. `*` globs are allowed.
    pub excluded_namespaces: Vec<String>,
    /// Resources to include (plural, `plural.group`, singular kind, or `*`); empty means all.
    pub included_resources: Vec<String>,
    /// Resources to exclude.
    pub excluded_resources: Vec<String>,
    /// Velero's tri-state `--include-cluster-resources`.
    pub include_cluster_resources: Option<bool>,
    /// A Kubernetes label selector, e.g. `app=db,tier in (a,b)`.
    pub label_selector: Option<String>,
    /// Velero's `--ordered-resources`: resource → `ns/name` (or `name`) in write order.
    pub ordered_resources: Vec<(String, Vec<String>)>,
    /// The PVC label whose value forms volume groups.
    pub volume_group_label: String,
    /// `spec.hooks.resources[]`.
    pub hooks: Vec<ResourceHookSpec>,
    /// Blocks larger than this are reported as a warning.
    pub block_items_max: u32,
}

impl BackupSpec {
    /// A spec that backs up everything, with defaults.
    pub fn new(name: &str) -> Self {
        BackupSpec {
            name: name.to_string(),
            included_namespaces: Vec::new(),
            excluded_namespaces: Vec::new(),
            included_resources: Vec::new(),
            excluded_resources: Vec::new(),
            include_cluster_resources: None,
            label_selector: None,
            ordered_resources: Vec::new(),
            volume_group_label: DEFAULT_VOLUME_GROUP_LABEL.to_string(),
            hooks: Vec::new(),
            block_items_max: DEFAULT_BLOCK_ITEMS_MAX,
        }
    }
}

/// A spec that cannot be used, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The backup name is not a DNS-1123 label.
    #[error("invalid backup name {0:?}: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit")]
    BadName(String),
    /// The label selector does not parse.
    #[error("invalid label selector {selector:?}: {reason}")]
    BadSelector { selector: String, reason: String },
    /// An ordered-resources entry does not parse.
    #[error("invalid ordered-resources entry {0:?}: expected resource=ns/name,ns/name;resource2=name")]
    BadOrdered(String),
    /// A restore's field is not usable.
    #[error("invalid {what} {value:?}: {reason}")]
    BadRestore { what: &'static str, value: String, reason: String },
    /// An included or excluded namespace is neither a namespace name nor a pattern of one.
    #[error("invalid {which} namespace {value:?}: {NAMESPACE_PATTERN_RULE}")]
    BadNamespace { which: &'static str, value: String },
}

/// What a namespace (or a pattern of namespaces) in a spec may be.
pub const NAMESPACE_PATTERN_RULE: &str =
    "use a namespace name (1-63 lower-case letters, digits and '-', starting and ending with a letter or digit), optionally with '*' wildcards";

/// Checks a namespace or a pattern of namespaces (`*` wildcards): a name would be a request path
/// in the API server's URL, so only what a namespace can be is let through (`../etc`, `!!` are not).
pub fn validate_namespace_pattern(p: &str) -> Result<(), String> {
    if p == "*" {
        return Ok(());
    }
    let chars_ok = p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*');
    let literal = !p.contains('*');
    let ends_ok = !(p.starts_with('-') || p.ends_with('-'));
    if !p.is_empty() && p.len() <= 63 && chars_ok && (!literal || ends_ok) {
        Ok(())
    } else {
        Err(NAMESPACE_PATTERN_RULE.to_string())
    }
}

/// Checks that a backup name is a DNS-1123 label, so it is safe as a path and object-store key.
pub fn validate_backup_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadName(name.to_string()))
    }
}

/// Parses Velero's `--ordered-resources` value: `pods=ns1/a,ns1/b;persistentvolumes=pv1`.
pub fn parse_ordered_resources(s: &str) -> Result<Vec<(String, Vec<String>)>, SpecError> {
    let mut out = Vec::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (res, names) = part.split_once('=').ok_or_else(|| SpecError::BadOrdered(part.to_string()))?;
        let names: Vec<String> =
            names.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect();
        if res.trim().is_empty() || names.is_empty() {
            return Err(SpecError::BadOrdered(part.to_string()));
        }
        out.push((res.trim().to_lowercase(), names));
    }
    Ok(out)
}

/// Matches `pattern` (with `*` wildcards) against `s`.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0usize, 0usize, None, 0usize);
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether a resource name from the command line names `rt`: plural, `plural.group`, kind, or `*`.
pub fn resource_matches(name: &str, rt: &ResourceType) -> bool {
    let n = name.to_ascii_lowercase();
    n == "*" || n == rt.gr.resource || n == rt.gr.dir_name() || n == rt.kind.to_ascii_lowercase()
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed Kubernetes label selector (equality- and set-based).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

impl LabelSelector {
    /// The label keys the selector reads.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.reqs.iter().map(|r| match r {
            Requirement::Eq(k, _)
            | Requirement::NotEq(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k.as_str(),
        })
    }

    /// Parses `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub fn parse(s: &str) -> Result<LabelSelector, SpecError> {
        let err = |reason: &str| SpecError::BadSelector { selector: s.to_string(), reason: reason.to_string() };
        // Split on commas outside parentheses.
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0i32, 0usize);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if depth < 0 {
                return Err(err("unbalanced ')'"));
            }
        }
        if depth != 0 {
            return Err(err("unbalanced '('"));
        }
        parts.push(&s[start..]);
        let valid_key = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        let valid_val = |v: &str| v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let mut reqs = Vec::new();
        for part in parts.iter().map(|p| p.trim()) {
            if part.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(err("empty requirement"));
            }
            let set = |rest: &str| -> Result<Vec<String>, SpecError> {
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(&format!("expected (v1,v2) in {part:?}")))?;
                let vals: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
                if vals.iter().any(|v| !valid_val(v)) {
                    return Err(err(&format!("invalid value in {part:?}")));
                }
                Ok(vals)
            };
            let req = if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(k.trim().to_string(), set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement::In(k.trim().to_string(), set(rest)?)
            } else {
                Requirement::Exists(part.to_string())
            };
            let (key, vals): (&str, Vec<&str>) = match &req {
                Requirement::Eq(k, v) | Requirement::NotEq(k, v) => (k, vec![v.as_str()]),
                Requirement::In(k, vs) | Requirement::NotIn(k, vs) => (k, vs.iter().map(String::as_str).collect()),
                Requirement::Exists(k) | Requirement::NotExists(k) => (k, vec![]),
            };
            if !valid_key(key) {
                return Err(err(&format!("invalid label key {key:?}")));
            }
            if let Some(v) = vals.iter().find(|v| !valid_val(v)) {
                return Err(err(&format!("invalid label value {v:?}")));
            }
            reqs.push(req);
        }
        Ok(LabelSelector { reqs })
    }

    /// The selector as a Kubernetes `metav1.LabelSelector` (`matchLabels`, `matchExpressions`), the
    /// shape Velero's `spec.labelSelector` has.
    pub fn to_k8s_json(&self) -> serde_json::Value {
        let mut labels = serde_json::Map::new();
        let mut exprs = Vec::new();
        let expr = |key: &str, op: &str, values: &[String]| {
            let mut e = serde_json::json!({"key": key, "operator": op});
            if !values.is_empty() {
                e["values"] = serde_json::json!(values);
            }
            e
        };
        for r in &self.reqs {
            match r {
                Requirement::Eq(k, v) => {
                    labels.insert(k.clone(), serde_json::Value::String(v.clone()));
                }
                Requirement::NotEq(k, v) => exprs.push(expr(k, "NotIn", std::slice::from_ref(v))),
                Requirement::In(k, vs) => exprs.push(expr(k, "In", vs)),
                Requirement::NotIn(k, vs) => exprs.push(expr(k, "NotIn", vs)),
                Requirement::Exists(k) => exprs.push(expr(k, "Exists", &[])),
                Requirement::NotExists(k) => exprs.push(expr(k, "DoesNotExist", &[])),
            }
        }
        let mut out = serde_json::Map::new();
        if !labels.is_empty() {
            out.insert("matchLabels".into(), serde_json::Value::Object(labels));
        }
        if !exprs.is_empty() {
            out.insert("matchExpressions".into(), serde_json::Value::Array(exprs));
        }
        serde_json::Value::Object(out)
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &impl Labels) -> bool {
        let get = |k: &String| labels.label(k);
        self.reqs.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v),
            Requirement::NotEq(k, v) => get(k) != Some(v),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Labels a selector can be matched against.
pub trait Labels {
    /// The value of label `key`.
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Labels for crate::item::StrMap {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// The spec compiled for evaluation against items.
#[derive(Debug, Clone)]
pub struct Selection {
    spec: BackupSpec,
    selector: Option<LabelSelector>,
    /// The label keys the spec's hooks select pods by (of the selectors that parse: one that does
    /// not applies to no pod).
    hook_label_keys: std::collections::BTreeSet<String>,
}

impl Selection {
    /// Compiles the spec; fails on a bad selector or name.
    pub fn compile(spec: &BackupSpec) -> Result<Selection, SpecError> {
        validate_backup_name(&spec.name)?;
        for (which, list) in [("included", &spec.included_namespaces), ("excluded", &spec.excluded_namespaces)] {
            if let Some(bad) = list.iter().find(|p| validate_namespace_pattern(p).is_err()) {
                return Err(SpecError::BadNamespace { which, value: bad.clone() });
            }
        }
        let selector = match spec.label_selector.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => Some(LabelSelector::parse(s)?),
            _ => None,
        };
        let hook_label_keys = (spec.hooks.iter())
            .filter_map(|h| h.label_selector.as_deref().filter(|s| !s.trim().is_empty()))
            .filter_map(|s| LabelSelector::parse(s).ok())
            .flat_map(|s| s.keys().map(str::to_string).collect::<Vec<_>>())
            .collect();
        Ok(Selection { spec: spec.clone(), selector, hook_label_keys })
    }

    /// Whether selecting an item reads its label `key`: the exclude label, and the keys of the
    /// backup's label selector (planning keeps no other label of most objects).
    pub fn reads_label(&self, key: &str) -> bool {
        key == EXCLUDE_LABEL || self.selector.as_ref().is_some_and(|s| s.keys().any(|k| k == key))
    }

    /// Whether planning reads a pod's label `key`: the labels selection reads
    /// ([`Selection::reads_label`]) and those the spec's hooks select pods by.
    pub fn reads_pod_label(&self, key: &str) -> bool {
        self.reads_label(key) || self.hook_label_keys.contains(key)
    }

    /// Whether a namespace passes the include/exclude namespace filter.
    pub fn namespace_included(&self, ns: &str) -> bool {
        let inc = &self.spec.included_namespaces;
        (inc.is_empty() || inc.iter().any(|p| glob_match(p, ns)))
            && !self.spec.excluded_namespaces.iter().any(|p| glob_match(p, ns))
    }

    /// Whether the user restricted namespaces (which changes the cluster-resource default).
    pub fn namespaces_filtered(&self) -> bool {
        let all = self.spec.included_namespaces.is_empty() || self.spec.included_namespaces.iter().any(|p| p == "*");
        !all || !self.spec.excluded_namespaces.is_empty()
    }

    /// Whether a resource type passes the include/exclude resource filter.
    pub fn resource_included(&self, rt: &ResourceType) -> bool {
        let inc = &self.spec.included_resources;
        (inc.is_empty() || inc.iter().any(|n| resource_matches(n, rt)))
            && !self.spec.excluded_resources.iter().any(|n| resource_matches(n, rt))
    }

    /// Whether objects of `rt` can ever be in the backup, i.e. whether it must be listed.
    pub fn resource_listable(&self, rt: &ResourceType) -> bool {
        // Namespace objects are cluster-scoped but follow the namespace filter, so they are listed
        // even when cluster-scoped resources are off.
        let namespaces = rt.gr.group.is_empty() && rt.gr.resource == "namespaces";
        self.resource_included(rt)
            && (rt.namespaced || namespaces || self.spec.include_cluster_resources != Some(false))
    }

    /// Why an item may never be in the backup, or `None` when it may be.
    pub fn exclusion(&self, rt: &ResourceType, key: &ItemKey, item: Option<&Item>) -> Option<&'static str> {
        if !self.resource_included(rt) {
            return Some("resource excluded");
        }
        match &key.namespace() {
            Some(ns) if !self.namespace_included(ns) => return Some("namespace excluded"),
            None if is_namespace_object(key) && !self.namespace_included(key.name()) => {
                return Some("namespace excluded")
            }
            None if self.spec.include_cluster_resources == Some(false) && !is_namespace_object(key) => {
                return Some("cluster resources excluded")
            }
            _ => {}
        }
        if let Some(item) = item {
            if item.labels().get(EXCLUDE_LABEL).is_some_and(|v| v == "true") {
                return Some("labelled velero.io/exclude-from-backup=true");
            }
            if item.deleting {
                return Some("being deleted");
            }
        }
        None
    }

    /// Whether a non-excluded item is selected on its own (not only through pull).
    pub fn is_seed(&self, item: &Item) -> bool {
        let scope_ok = item.key.namespace().is_some()
            || is_namespace_object(&item.key)
            || match self.spec.include_cluster_resources {
                Some(v) => v,
                None => !self.namespaces_filtered(),
            };
        scope_ok && self.selector.as_ref().is_none_or(|s| s.matches(item.labels()))
    }

    /// The spec this selection was compiled from.
    pub fn spec(&self) -> &BackupSpec {
        &self.spec
    }
}

/// Namespace objects are cluster-scoped but follow the namespace filter, as in Velero.
fn is_namespace_object(key: &ItemKey) -> bool {
    key.namespace().is_none() && key.is("", "namespaces")
}

/// The group/resource of a command-line resource name, among `resources`.
pub fn find_resource<'a>(resources: &'a [ResourceType], name: &str) -> Option<&'a ResourceType> {
    resources.iter().find(|rt| resource_matches(name, rt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[track_caller]
    fn check(selector: &str, l: &[(&str, &str)], expected: bool) {
        let s = LabelSelector::parse(selector).unwrap();
        assert_eq!(s.matches(&labels(l)), expected, "selector {selector:?} on {l:?}");
    }

    #[test]
    fn label_selectors() {
        check("app=db", &[("app", "db")], true);
        check("app==db", &[("app", "web")], false);
        check("app!=db", &[], true);
        check("tier in (a, b),app", &[("tier", "b"), ("app", "x")], true);
        check("tier notin (a,b)", &[("tier", "a")], false);
        check("!legacy", &[("legacy", "1")], false);
        check("", &[], true);
        for bad in ["app in a", "a=(b", "=x", "a=b,,c", "a b=c"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn selectors_render_as_kubernetes_label_selectors() {
        let s = LabelSelector::parse("app=db,tier in (a,b),env!=dev,!legacy,team").unwrap();
        assert_eq!(
            s.to_k8s_json().to_string(),
            concat!(
                r#"{"matchExpressions":[{"key":"tier","operator":"In","values":["a","b"]},"#,
                r#"{"key":"env","operator":"NotIn","values":["dev"]},{"key":"legacy","operator":"DoesNotExist"},"#,
                r#"{"key":"team","operator":"Exists"}],"matchLabels":{"app":"db"}}"#
            )
        );
        assert_eq!(LabelSelector::parse("").unwrap().to_k8s_json().to_string(), "{}");
    }

    /// Issue 22: a namespace that is no namespace (`../etc` would be a request path) is refused.
    #[test]
    fn namespaces_are_names_or_patterns_of_names() {
        for ok in ["*", "payments", "web-*", "*-prod", "a", "team-1"] {
            assert!(validate_namespace_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../etc", "!!", "Payments", "-a", "a-", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_namespace_pattern(bad).is_err(), "{bad:?}");
        }
        let mut spec = BackupSpec::new("b");
        spec.included_namespaces = vec!["ok".into(), "../etc".into()];
        let e = Selection::compile(&spec).unwrap_err();
        assert!(e.to_string().contains("invalid included namespace \"../etc\""), "{e}");
        spec.included_namespaces.clear();
        spec.excluded_namespaces = vec!["!!".into()];
        assert!(Selection::compile(&spec).unwrap_err().to_string().contains("excluded namespace \"!!\""));
    }

    #[test]
    fn globs_and_names() {
        assert!(glob_match("team-*", "team-a"));
        assert!(!glob_match("team-*", "ops"));
        assert!(glob_match("*", ""));
        assert!(validate_backup_name("nightly-1").is_ok());
        for bad in ["", "../x", "A", "a/b", "-a", &"a".repeat(64)] {
            assert!(validate_backup_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ordered_resources_parse() {
        let o = parse_ordered_resources("pods=ns1/b,ns1/a; persistentvolumes=pv2").unwrap();
        assert_eq!(o[0], ("pods".into(), vec!["ns1/b".into(), "ns1/a".into()]));
        assert_eq!(o[1], ("persistentvolumes".into(), vec!["pv2".into()]));
        assert!(parse_ordered_resources("pods").is_err());
        assert!(parse_ordered_resources("pods=").is_err());
    }
}
