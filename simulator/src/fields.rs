//! Field ownership for the fake API server's writes: who set which field, as server-side apply
//! keeps it, so an apply that would take a field another manager set is a conflict.
//!
//! An object's ownership is a map from **leaf paths** (JSON pointers to scalars, arrays and empty
//! objects; arrays are atomic, as `x-kubernetes-list-type: atomic` lists are) to the **manager**
//! that set the value there. It is kept where the real API server keeps it, in
//! `metadata.managedFields` (one `FieldsV1` entry per manager, `f:`-prefixed keys, leaves `{}`),
//! so it is persisted with the object and shown to clients. Every write that names a manager
//! (every write through the API server; the engine's in-memory writes name none and leave
//! ownership alone) updates it: an update (create, put, merge patch) makes the writer own the
//! leaves whose value it changed; an apply makes the applier own exactly the leaves of its applied
//! configuration, drops the fields it applied before and applies no longer (unless another manager
//! owns them), and — without `force` — refuses to change a leaf another manager owns to a
//! different value. A leaf that disappears (set to null, removed by a put) loses its owner.
//! Deliberately absent: the `Apply`/`Update` operation distinction within one manager name,
//! associative lists (`k:`/`v:` keys), and ownership of the map nodes themselves (`.`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

/// Metadata the server sets; nobody owns these.
const SYSTEM_METADATA: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// Leaf path (a JSON pointer) → manager.
pub type Owners = BTreeMap<String, String>;

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn unescape(seg: &str) -> String {
    seg.replace("~1", "/").replace("~0", "~")
}

/// A leaf path as the real server names it in a conflict: `.spec.holderIdentity`.
pub fn dotted(path: &str) -> String {
    path.split('/').skip(1).map(|s| format!(".{}", unescape(s))).collect()
}

/// The leaf paths of an object that can be owned (not `apiVersion`, `kind` or system metadata).
pub fn leaves(obj: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Value::Object(m) = obj {
        for (k, v) in m {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    if let Value::Object(meta) = v {
                        for (mk, mv) in meta {
                            if !SYSTEM_METADATA.contains(&mk.as_str()) {
                                walk(&format!("/metadata/{}", escape(mk)), mv, &mut out);
                            }
                        }
                    }
                }
                _ => walk(&format!("/{}", escape(k)), v, &mut out),
            }
        }
    }
    out
}

fn walk(path: &str, v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                walk(&format!("{path}/{}", escape(k)), c, out);
            }
        }
        Value::Null => {}
        _ => {
            out.insert(path.to_string());
        }
    }
}

/// The ownership recorded in `obj`'s `metadata.managedFields`.
pub fn read(obj: &Value) -> Owners {
    let mut owners = Owners::new();
    let Some(entries) = obj.pointer("/metadata/managedFields").and_then(Value::as_array) else { return owners };
    for e in entries {
        let (Some(manager), Some(fields)) = (e.get("manager").and_then(Value::as_str), e.get("fieldsV1")) else {
            continue;
        };
        let mut paths = BTreeSet::new();
        decode("", fields, &mut paths);
        for p in paths {
            owners.insert(p, manager.to_string());
        }
    }
    owners
}

fn decode(path: &str, fields: &Value, out: &mut BTreeSet<String>) {
    match fields {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                if let Some(name) = k.strip_prefix("f:") {
                    decode(&format!("{path}/{}", escape(name)), c, out);
                }
            }
        }
        _ if !path.is_empty() => {
            out.insert(path.to_string());
        }
        _ => {}
    }
}

/// Writes `owners` into `obj`'s `metadata.managedFields` (removed when nobody owns anything),
/// each manager's entry stamped `time` and with `apiVersion` of the object.
pub fn write(obj: &mut Value, owners: &Owners, time: &str) {
    let api_version = obj.get("apiVersion").cloned().unwrap_or(Value::Null);
    let mut by_manager: BTreeMap<&str, Value> = BTreeMap::new();
    for (path, manager) in owners {
        let node = by_manager.entry(manager).or_insert_with(|| json!({}));
        let mut cur = node;
        for seg in path.split('/').skip(1) {
            let key = format!("f:{}", unescape(seg));
            let Value::Object(m) = cur else { break };
            cur = m.entry(key).or_insert_with(|| Value::Object(Map::new()));
        }
    }
    let entries: Vec<Value> = by_manager
        .into_iter()
        .map(|(manager, fields)| {
            json!({"manager": manager, "operation": "Update", "apiVersion": api_version, "time": time,
                   "fieldsType": "FieldsV1", "fieldsV1": fields})
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// Ownership after an update by `manager` from `before` to `after`: the leaves whose value changed
/// (or appeared) are the writer's; leaves gone lose their owner.
pub fn after_update(mut owners: Owners, before: &Value, after: &Value, manager: &str) -> Owners {
    let now = leaves(after);
    owners.retain(|p, _| now.contains(p));
    for p in now {
        if before.pointer(&p) != after.pointer(&p) {
            owners.insert(p, manager.to_string());
        }
    }
    owners
}

/// One field an apply would take from another manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The leaf path (a JSON pointer).
    pub path: String,
    /// Its current owner.
    pub manager: String,
}

/// The fields `applied` (by `manager`) would change that other managers own in `current`.
pub fn conflicts(owners: &Owners, current: &Value, applied: &Value, manager: &str) -> Vec<Conflict> {
    leaves(applied)
        .into_iter()
        .filter_map(|p| {
            let owner = owners.get(&p)?;
            (owner != manager && current.pointer(&p) != applied.pointer(&p))
                .then(|| Conflict { path: p.clone(), manager: owner.clone() })
        })
        .collect()
}

/// The message of a 409 for these conflicts, as the real server words it.
pub fn conflict_message(conflicts: &[Conflict]) -> String {
    let n = conflicts.len();
    let list: Vec<String> =
        conflicts.iter().map(|c| format!("conflict with \"{}\": {}", c.manager, dotted(&c.path))).collect();
    format!("Apply failed with {n} conflict{}: {}", if n == 1 { "" } else { "s" }, list.join("; "))
}

/// Removes the leaf at `path` and then every object it leaves empty on the way up.
pub fn remove_leaf(obj: &mut Value, path: &str) {
    let segs: Vec<String> = path.split('/').skip(1).map(unescape).collect();
    remove_at(obj, &segs);
}

fn remove_at(v: &mut Value, segs: &[String]) -> bool {
    let Some((first, rest)) = segs.split_first() else { return false };
    let Value::Object(m) = v else { return false };
    if rest.is_empty() {
        m.remove(first);
    } else if let Some(child) = m.get_mut(first) {
        if remove_at(child, rest) && child.as_object().is_some_and(Map::is_empty) {
            m.remove(first);
        }
    }
    true
}

/// The object an apply of `applied` by `manager` makes of `current` (`owners` its ownership):
/// the applied fields merged in, the fields the manager applied before and no longer does (and
/// nobody else owns) removed. Returns the object and its new ownership. Conflicts are checked
/// before (see [`conflicts`]); with force, the applier takes the conflicting fields.
pub fn apply(current: &Value, owners: &Owners, applied: &Value, manager: &str) -> (Value, Owners) {
    let mut obj = current.clone();
    let applied_leaves = leaves(applied);
    let mine_before: Vec<String> = owners.iter().filter(|(_, m)| *m == manager).map(|(p, _)| p.clone()).collect();
    crate::csi::merge_patch(&mut obj, applied);
    let mut owners = owners.clone();
    for p in mine_before {
        if !applied_leaves.contains(&p) {
            owners.remove(&p);
            remove_leaf(&mut obj, &p);
        }
    }
    for p in applied_leaves {
        owners.insert(p, manager.to_string());
    }
    let now = leaves(&obj);
    owners.retain(|p, _| now.contains(p));
    (obj, owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_round_trips_through_managed_fields() {
        let mut obj = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "n", "labels": {"app.kubernetes.io/name": "a"}},
                             "spec": {"a": 1, "b": {"c": [1, 2]}, "d": {}}});
        let l = leaves(&obj);
        let want: BTreeSet<String> = ["/metadata/labels/app.kubernetes.io~1name", "/spec/a", "/spec/b/c", "/spec/d"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(l, want);
        let owners: Owners =
            l.iter().map(|p| (p.clone(), if p.starts_with("/spec") { "m1" } else { "m2" }.to_string())).collect();
        write(&mut obj, &owners, "2024-01-01T00:00:00Z");
        assert_eq!(obj["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:b"]["f:c"], json!({}));
        assert_eq!(read(&obj), owners);
        assert_eq!(dotted("/metadata/labels/app.kubernetes.io~1name"), ".metadata.labels.app.kubernetes.io/name");
    }

    #[test]
    fn apply_conflicts_with_other_managers_unless_the_value_is_the_same() {
        let current = json!({"spec": {"holder": "a", "renew": "t1"}});
        let owners = after_update(Owners::new(), &json!({}), &current, "a");
        let same = json!({"spec": {"holder": "a"}});
        assert!(conflicts(&owners, &current, &same, "b").is_empty(), "same value: shared, no conflict");
        let other = json!({"spec": {"holder": "b", "renew": "t2"}});
        let c = conflicts(&owners, &current, &other, "b");
        assert_eq!(c.len(), 2);
        assert_eq!(
            conflict_message(&c),
            "Apply failed with 2 conflicts: conflict with \"a\": .spec.holder; conflict with \"a\": .spec.renew"
        );
        assert!(conflicts(&owners, &current, &other, "a").is_empty(), "its own fields");
        // Forced: b takes them.
        let (obj, owners) = apply(&current, &owners, &other, "b");
        assert_eq!(obj, other);
        assert!(owners.values().all(|m| m == "b"));
        // A field set to null loses its owner.
        let cleared = json!({"spec": {"renew": "t2"}});
        let owners = after_update(owners, &obj, &cleared, "c");
        assert_eq!(owners.keys().collect::<Vec<_>>(), vec!["/spec/renew"]);
    }

    #[test]
    fn apply_drops_what_the_manager_no_longer_applies() {
        let first = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        let (obj, owners) = apply(&json!({"metadata": {"name": "x"}}), &Owners::new(), &first, "m");
        assert_eq!(obj["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        let (obj, owners) = apply(&obj, &owners, &json!({"metadata": {"labels": {"a": "1"}}}), "m");
        assert_eq!(obj, json!({"metadata": {"name": "x", "labels": {"a": "1"}}}));
        assert_eq!(owners.len(), 1);
        let (obj, _) = apply(&obj, &owners, &json!({"spec": {"z": 1}}), "m");
        assert_eq!(obj, json!({"metadata": {"name": "x"}, "spec": {"z": 1}}), "an emptied map goes too");
    }
}
