//! What a CustomResourceDefinition object makes the fake cluster serve.
//!
//! A created `apiextensions.k8s.io/v1` CustomResourceDefinition adds one served resource per
//! served version ([`Served`]): its group, plural, kind and scope, its short names, categories and
//! singular name for discovery, whether it has a status subresource, and its printer columns for
//! server-side tables. The served set is **derived from the CRD objects** each time it is needed,
//! not kept beside them, so it is persisted with the overlay that holds them and a deleted CRD
//! stops being served at once. Of a version's schema only field names are checked
//! ([`prune_unknown`]: what the API server's `fieldValidation` reports and prunes). Deliberately
//! absent: validation of types, formats, enums and other value constraints, defaulting,
//! conversion between versions (every version serves the same stored object), the scale
//! subresource.

use blockwise_engine::item::{GroupResource, ResourceType};
use serde_json::Value;

/// The group of CustomResourceDefinitions.
pub const APIEXTENSIONS: &str = "apiextensions.k8s.io";

/// The resource type of CustomResourceDefinitions themselves.
pub fn crd_resource() -> ResourceType {
    ResourceType::new(APIEXTENSIONS, "v1", "customresourcedefinitions", "CustomResourceDefinition", false)
}

/// One printer column of a CRD version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its header.
    pub name: String,
    /// Its OpenAPI type (`string`, `integer`, `date`, …).
    pub type_: String,
    /// A simple JSONPath (`.status.phase`).
    pub json_path: String,
    /// Its priority (0: shown by default).
    pub priority: i64,
}

/// One served version of a CRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The resource type (group, version, plural, kind, scope).
    pub rt: ResourceType,
    /// The singular name.
    pub singular: String,
    /// kubectl's abbreviations.
    pub short_names: Vec<String>,
    /// Categories (`kubectl get all`).
    pub categories: Vec<String>,
    /// Whether `.status` is a subresource.
    pub status: bool,
    /// The additional printer columns.
    pub columns: Vec<Column>,
    /// The version's `schema.openAPIV3Schema`, if it has one.
    pub schema: Option<Value>,
}

fn strs(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// The versions a CRD object serves (none for one being deleted or malformed).
pub fn served(crd: &Value) -> Vec<Served> {
    if crd.pointer("/metadata/deletionTimestamp").is_some() {
        return Vec::new();
    }
    let spec = &crd["spec"];
    let (Some(group), Some(plural), Some(kind)) = (
        spec.get("group").and_then(Value::as_str),
        spec.pointer("/names/plural").and_then(Value::as_str),
        spec.pointer("/names/kind").and_then(Value::as_str),
    ) else {
        return Vec::new();
    };
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let singular = spec.pointer("/names/singular").and_then(Value::as_str).unwrap_or(&kind.to_lowercase()).to_string();
    let mut out = Vec::new();
    for v in spec.get("versions").and_then(Value::as_array).into_iter().flatten() {
        let (Some(name), true) =
            (v.get("name").and_then(Value::as_str), v.get("served").and_then(Value::as_bool) != Some(false))
        else {
            continue;
        };
        let columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some(Column {
                    name: c.get("name")?.as_str()?.to_string(),
                    type_: c.get("type").and_then(Value::as_str).unwrap_or("string").to_string(),
                    json_path: c.get("jsonPath")?.as_str()?.to_string(),
                    priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                })
            })
            .collect();
        out.push(Served {
            rt: ResourceType::new(group, name, plural, kind, namespaced),
            singular: singular.clone(),
            short_names: strs(spec.pointer("/names/shortNames")),
            categories: strs(spec.pointer("/names/categories")),
            status: v.pointer("/subresources/status").is_some(),
            columns,
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
        });
    }
    out
}

/// The status a CRD gets when it is created or changed: established, names accepted.
pub fn status(crd: &Value, time: &str) -> Value {
    let cond = |t: &str, reason: &str| serde_json::json!({"type": t, "status": "True", "lastTransitionTime": time, "reason": reason, "message": ""});
    serde_json::json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(Value::Null),
        "conditions": [cond("NamesAccepted", "NoConflicts"), cond("Established", "InitialNamesAccepted")],
        "storedVersions": crd.pointer("/spec/versions").and_then(Value::as_array).into_iter().flatten()
            .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
            .filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>(),
    })
}

/// The group/resource a CRD object defines, if it names one.
pub fn defined(crd: &Value) -> Option<GroupResource> {
    let spec = crd.get("spec")?;
    Some(GroupResource::new(spec.get("group")?.as_str()?, spec.pointer("/names/plural")?.as_str()?))
}

/// Evaluates a simple JSONPath (`.status.progress.itemsBackedUp`, `.spec.items[0].name`) on `obj`.
pub fn eval_path(obj: &Value, path: &str) -> Option<Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}').trim_start_matches('$');
    let mut cur = obj;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        if !name.is_empty() {
            cur = cur.get(name)?;
        }
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur.clone())
}

/// Removes from `obj` every field its structural `schema` does not declare, as the API server
/// prunes a custom resource, and returns their paths (`spec.colour`, `spec.items[0].x`). An
/// object schema (`type: object`, or one with `properties`) declares its `properties`;
/// `additionalProperties` allows any key (walked with it when it is a schema);
/// `x-kubernetes-preserve-unknown-fields: true` keeps unknown keys; at the root and in an
/// `x-kubernetes-embedded-resource`, `apiVersion`, `kind` and `metadata` are always allowed, and
/// metadata is not walked. A node of another or no type is not walked.
pub fn prune_unknown(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut out = Vec::new();
    prune(schema, obj, "", true, &mut out);
    out
}

fn prune(schema: &Value, value: &mut Value, path: &str, root: bool, out: &mut Vec<String>) {
    let flag = |name: &str| schema.get(name).and_then(Value::as_bool) == Some(true);
    match value {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            if props.is_none() && additional.is_none() && schema.get("type").and_then(Value::as_str) != Some("object") {
                return;
            }
            let keep_unknown = flag("x-kubernetes-preserve-unknown-fields") || additional == Some(&Value::Bool(true));
            let resource = root || flag("x-kubernetes-embedded-resource");
            let keys: Vec<String> = m.keys().cloned().collect();
            for key in keys {
                if resource && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                let declared = props.and_then(|p| p.get(&key)).or(additional.filter(|a| a.is_object()));
                match (declared, m.get_mut(&key)) {
                    (Some(s), Some(v)) => prune(s, v, &child, false, out),
                    (None, _) if keep_unknown => {}
                    (None, _) => {
                        m.remove(&key);
                        out.push(child);
                    }
                    (Some(_), None) => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    prune(item, v, &format!("{path}[{i}]"), false, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_crd_serves_its_versions_with_names_status_and_columns() {
        let crd = json!({"metadata": {"name": "backups.blockwise.dev"}, "spec": {
            "group": "blockwise.dev", "scope": "Namespaced",
            "names": {"plural": "backups", "singular": "backup", "kind": "Backup", "shortNames": ["bwb"], "categories": ["blockwise"]},
            "versions": [
                {"name": "v1alpha1", "served": true, "storage": true, "subresources": {"status": {}},
                 "additionalPrinterColumns": [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]},
                {"name": "v0", "served": false, "storage": false}]}});
        let s = served(&crd);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].rt, ResourceType::new("blockwise.dev", "v1alpha1", "backups", "Backup", true));
        assert_eq!((s[0].short_names.clone(), s[0].status), (vec!["bwb".to_string()], true));
        assert_eq!(s[0].columns[0].json_path, ".status.phase");
        assert_eq!(defined(&crd), Some(GroupResource::new("blockwise.dev", "backups")));
        assert_eq!(status(&crd, "t")["storedVersions"], json!(["v1alpha1"]));
        let mut gone = crd.clone();
        gone["metadata"]["deletionTimestamp"] = json!("t");
        assert!(served(&gone).is_empty());
        assert!(served(&json!({"spec": {}})).is_empty(), "malformed: nothing served, no panic");
    }

    #[test]
    fn simple_json_paths() {
        let o = json!({"status": {"phase": "Done", "progress": {"itemsBackedUp": 3}}, "l": [{"n": "a"}]});
        assert_eq!(eval_path(&o, ".status.phase"), Some(json!("Done")));
        assert_eq!(eval_path(&o, ".status.progress.itemsBackedUp"), Some(json!(3)));
        assert_eq!(eval_path(&o, "{.l[0].n}"), Some(json!("a")));
        assert_eq!(eval_path(&o, ".status.nope"), None);
    }
}

#[cfg(test)]
mod prune_tests {
    use super::*;
    use serde_json::json;

    #[track_caller]
    fn check(schema: Value, obj: Value, pruned: Value, unknown: &[&str]) {
        let mut got = obj;
        let paths = prune_unknown(&schema, &mut got);
        assert_eq!(paths, unknown);
        assert_eq!(got, pruned);
    }

    fn widget() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "size": {"type": "integer"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "parts": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "template": {"type": "object", "x-kubernetes-embedded-resource": true, "properties": {}},
            }},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        }})
    }

    #[test]
    fn declared_fields_stay_and_unknown_ones_go() {
        let meta = json!({"name": "w", "anything": 1});
        check(
            widget(),
            json!({"apiVersion": "x/v1", "kind": "Widget", "metadata": meta, "spec": {"size": 3, "colour": "red"}, "extra": true}),
            json!({"apiVersion": "x/v1", "kind": "Widget", "metadata": meta, "spec": {"size": 3}}),
            &["extra", "spec.colour"],
        );
    }

    #[test]
    fn maps_lists_preserved_and_embedded_nodes() {
        let spec = json!({
            "labels": {"a": "b", "c": "d"},
            "parts": [{"name": "x"}, {"name": "y", "weight": 2}],
            "free": {"whatever": {"deep": 1}},
            "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}},
        });
        let mut want = spec.clone();
        want["parts"][1].as_object_mut().unwrap().remove("weight");
        want["template"].as_object_mut().unwrap().remove("spec");
        check(widget(), json!({"spec": spec}), json!({"spec": want}), &["spec.parts[1].weight", "spec.template.spec"]);
    }

    #[test]
    fn a_schema_that_preserves_unknown_fields_prunes_nothing() {
        let schema = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        let obj = json!({"spec": {"anything": [1, 2]}, "other": null});
        check(schema, obj.clone(), obj, &[]);
    }

    #[test]
    fn a_merge_patchs_nulls_are_walked_like_values() {
        check(widget(), json!({"spec": {"size": null, "gone": null}}), json!({"spec": {"size": null}}), &["spec.gone"]);
    }
}
