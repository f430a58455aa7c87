//! Restore rules (issue 13, first part): which archived items a restore creates, in what order,
//! and what each object looks like when it is created — Velero's rules, written down in
//! `docs/restore.md`. Pure functions over the archive's objects: the event-sourced restore run
//! (intents, creates, resume) is built on them.
//!
//! - **Order** ([`restore_order`]): Velero's default high priorities in their order (CRDs,
//!   namespaces, storage and snapshot classes, snapshot contents and snapshots, PVs, PVCs,
//!   service accounts, secrets, config maps, limit ranges, pods, replica sets, …), then every other
//!   resource of the backup sorted by name, then the low priorities. This gives RT2: namespaces
//!   and CRDs before what lives in them, a PV before its claim before the pods that mount it.
//! - **Never restored** ([`NON_RESTORABLE`]): nodes, events, Velero's own backups and restores,
//!   CSI nodes and volume attachments — as Velero excludes them.
//! - **Skipped** ([`skip_reason`]): pods that have completed (`Succeeded`/`Failed`), mirror pods
//!   (the kubelet makes them), jobs with a completion time.
//! - **Prepared** ([`prepare`]): server-owned metadata removed (uid, resourceVersion, generation,
//!   creationTimestamp, deletion fields, generateName, selfLink, ownerReferences, managedFields),
//!   `status` dropped, the labels `velero.io/backup-name` and `velero.io/restore-name` added (made
//!   valid label values the way Velero does), the namespace mapped; a PersistentVolume loses its
//!   claim's uid and resourceVersion and the binding annotations, a claim its binding and
//!   selected-node annotations, a Service its cluster IPs (unless headless) and node ports, so the
//!   new cluster's controllers bind and allocate them again.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::item::GroupResource;

/// Velero's default restore priorities that come first, as `resource[.group]`, in order.
pub const HIGH_PRIORITIES: &[&str] = &[
    "customresourcedefinitions.apiextensions.k8s.io",
    "namespaces",
    "storageclasses.storage.k8s.io",
    "volumesnapshotclasses.snapshot.storage.k8s.io",
    "volumesnapshotcontents.snapshot.storage.k8s.io",
    "volumesnapshots.snapshot.storage.k8s.io",
    "datauploads.velero.io",
    "persistentvolumes",
    "persistentvolumeclaims",
    "serviceaccounts",
    "secrets",
    "configmaps",
    "limitranges",
    "pods",
    "replicasets.apps",
    "clusterclasses.cluster.x-k8s.io",
    "endpoints",
    "services",
];

/// Velero's default restore priorities that come last, in order.
pub const LOW_PRIORITIES: &[&str] = &[
    "clusterbootstraps.run.tanzu.vmware.com",
    "clusters.cluster.x-k8s.io",
    "clusterresourcesets.addons.cluster.x-k8s.io",
];

/// Resources a restore never creates, whatever its filters say.
pub const NON_RESTORABLE: &[&str] = &[
    "nodes",
    "events",
    "events.events.k8s.io",
    "backups.velero.io",
    "restores.velero.io",
    "resticrepositories.velero.io",
    "csinodes.storage.k8s.io",
    "volumeattachments.storage.k8s.io",
    "backuprepositories.velero.io",
];

/// The label naming the backup an object was restored from.
pub const BACKUP_NAME_LABEL: &str = "velero.io/backup-name";
/// The label naming the restore that created an object.
pub const RESTORE_NAME_LABEL: &str = "velero.io/restore-name";

/// Metadata fields the API server owns: removed before a create.
pub const RESET_METADATA: &[&str] = &[
    "generateName",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "managedFields",
];

/// Annotations the PV controller sets while binding: removed so the new cluster binds again.
const BINDING_ANNOTATIONS: &[&str] = &["pv.kubernetes.io/bind-completed", "pv.kubernetes.io/bound-by-controller"];
/// The scheduler's choice of node for a claim's volume: not valid in another cluster.
const SELECTED_NODE_ANNOTATION: &str = "volume.kubernetes.io/selected-node";
/// The kubelet's mark of a static pod's mirror.
const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Whether a restore may create objects of `gr`.
pub fn restorable(gr: &GroupResource) -> bool {
    !NON_RESTORABLE.contains(&gr.dir_name().as_str())
}

/// The order in which a restore creates the resources of a backup (each once; the
/// non-restorable ones left out): see the module docs.
pub fn restore_order<'a>(resources: impl IntoIterator<Item = &'a GroupResource>) -> Vec<GroupResource> {
    let all: BTreeSet<&GroupResource> = resources.into_iter().filter(|gr| restorable(gr)).collect();
    let rank = |gr: &GroupResource| {
        let name = gr.dir_name();
        if let Some(i) = HIGH_PRIORITIES.iter().position(|p| *p == name) {
            (0, i, name)
        } else if let Some(i) = LOW_PRIORITIES.iter().position(|p| *p == name) {
            (2, i, name)
        } else {
            (1, 0, name)
        }
    };
    let mut out: Vec<GroupResource> = all.into_iter().cloned().collect();
    out.sort_by_cached_key(|gr| rank(gr));
    out
}

/// Why an archived object of `gr` is not restored although it was selected, or `None`.
pub fn skip_reason(gr: &GroupResource, obj: &Value) -> Option<String> {
    if !restorable(gr) {
        return Some(format!("{} are never restored", gr.dir_name()));
    }
    let text = |p: &str| obj.pointer(p).and_then(Value::as_str);
    if gr.group.is_empty() && gr.resource == "pods" {
        if let Some(phase @ ("Succeeded" | "Failed")) = text("/status/phase") {
            return Some(format!("the pod has completed (phase {phase})"));
        }
        if obj.pointer("/metadata/annotations").and_then(|a| a.get(MIRROR_POD_ANNOTATION)).is_some() {
            return Some("a mirror pod: the kubelet makes it from its static pod".into());
        }
    }
    if gr.group == "batch" && gr.resource == "jobs" && text("/status/completionTime").is_some_and(|t| !t.is_empty()) {
        return Some("the job has completed".into());
    }
    None
}

/// `name` as a valid label value, as Velero makes it: names longer than 63 characters are cut
/// to 57 and followed by the first 6 hex digits of their sha256.
pub fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    let mut cut = 57;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash: String = Sha256::digest(name.as_bytes()).iter().take(3).map(|b| format!("{b:02x}")).collect();
    format!("{}{hash}", &name[..cut])
}

/// What a restore is called and where it maps namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreNaming {
    /// The backup restored from.
    pub backup: String,
    /// The restore.
    pub restore: String,
    /// Namespace mappings, old → new (`--namespace-mappings a:b`).
    pub namespaces: BTreeMap<String, String>,
}

impl RestoreNaming {
    /// The namespace `ns` is restored into.
    pub fn namespace<'a>(&'a self, ns: &'a str) -> &'a str {
        self.namespaces.get(ns).map_or(ns, String::as_str)
    }
}

/// An archived object that cannot be prepared for its create.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{gr} {what}: {reason}")]
pub struct PrepareError {
    /// The object's resource.
    pub gr: String,
    /// Which object (its archived namespace/name, or its position when it has none).
    pub what: String,
    /// What is wrong.
    pub reason: String,
}

fn object_mut<'a>(v: &'a mut Value, field: &str) -> Option<&'a mut Map<String, Value>> {
    v.get_mut(field).and_then(Value::as_object_mut)
}

/// Prepares an archived object of `gr` for its create (see the module docs). The object must be
/// a JSON object with a `metadata` object; anything else is an error naming it.
pub fn prepare(gr: &GroupResource, obj: &mut Value, naming: &RestoreNaming) -> Result<(), PrepareError> {
    let name_of = |o: &Value| {
        let ns = o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        let name = o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?");
        if ns.is_empty() {
            name.to_string()
        } else {
            format!("{ns}/{name}")
        }
    };
    let fail = |o: &Value, reason: &str| PrepareError { gr: gr.dir_name(), what: name_of(o), reason: reason.into() };
    if !obj.is_object() {
        return Err(fail(obj, "the archived object is not a JSON object"));
    }
    let what = name_of(obj);
    let Some(meta) = object_mut(obj, "metadata") else {
        return Err(PrepareError { gr: gr.dir_name(), what, reason: "it has no metadata object".into() });
    };
    for k in RESET_METADATA {
        meta.remove(*k);
    }
    // Namespaced objects go to their mapped namespace; a namespace is renamed by the same map.
    if let Some(ns) = meta.get("namespace").and_then(Value::as_str).map(str::to_string) {
        meta.insert("namespace".into(), Value::String(naming.namespace(&ns).to_string()));
    }
    if gr.group.is_empty() && gr.resource == "namespaces" {
        if let Some(name) = meta.get("name").and_then(Value::as_str).map(str::to_string) {
            meta.insert("name".into(), Value::String(naming.namespace(&name).to_string()));
        }
    }
    let labels = meta.entry("labels").or_insert_with(|| Value::Object(Map::new()));
    if !labels.is_object() {
        *labels = Value::Object(Map::new());
    }
    if let Some(l) =
        labels.as_object_mut().filter(|_| !crate::mutation::active(crate::mutation::Mutation::RestoreDropsLabels))
    {
        l.insert(BACKUP_NAME_LABEL.into(), Value::String(label_value(&naming.backup)));
        l.insert(RESTORE_NAME_LABEL.into(), Value::String(label_value(&naming.restore)));
    }
    let drop_annotations = |meta: &mut Map<String, Value>, keys: &[&str]| {
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            for k in keys {
                a.remove(*k);
            }
        }
    };
    let core = gr.group.is_empty();
    match gr.resource.as_str() {
        "persistentvolumes" if core => {
            drop_annotations(meta, BINDING_ANNOTATIONS);
            if let Some(claim) = obj.pointer_mut("/spec/claimRef").and_then(Value::as_object_mut) {
                claim.remove("uid");
                claim.remove("resourceVersion");
                if let Some(ns) = claim.get("namespace").and_then(Value::as_str).map(str::to_string) {
                    claim.insert("namespace".into(), Value::String(naming.namespace(&ns).to_string()));
                }
            }
        }
        "persistentvolumeclaims" if core => {
            drop_annotations(meta, BINDING_ANNOTATIONS);
            drop_annotations(meta, &[SELECTED_NODE_ANNOTATION]);
        }
        "services" if core => {
            if let Some(spec) = object_mut(obj, "spec") {
                let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
                if !headless {
                    spec.remove("clusterIP");
                    spec.remove("clusterIPs");
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.remove("nodePort");
                    }
                }
                spec.remove("healthCheckNodePort");
            }
        }
        _ => {}
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gr(group: &str, resource: &str) -> GroupResource {
        GroupResource::new(group, resource)
    }

    fn naming() -> RestoreNaming {
        RestoreNaming {
            backup: "b".into(),
            restore: "r".into(),
            namespaces: BTreeMap::from([("shop".to_string(), "shop-copy".to_string())]),
        }
    }

    #[test]
    fn velero_order_high_then_the_rest_by_name_then_low() {
        let all = [
            gr("apps", "deployments"),
            gr("", "pods"),
            gr("cluster.x-k8s.io", "clusters"),
            gr("", "persistentvolumeclaims"),
            gr("", "configmaps"),
            gr("", "namespaces"),
            gr("apiextensions.k8s.io", "customresourcedefinitions"),
            gr("", "persistentvolumes"),
            gr("apps", "replicasets"),
            gr("", "nodes"),
            gr("batch", "jobs"),
            gr("example.com", "widgets"),
            gr("", "events"),
        ];
        let order: Vec<String> = restore_order(all.iter()).iter().map(GroupResource::dir_name).collect();
        assert_eq!(
            order,
            [
                "customresourcedefinitions.apiextensions.k8s.io",
                "namespaces",
                "persistentvolumes",
                "persistentvolumeclaims",
                "configmaps",
                "pods",
                "replicasets.apps",
                "deployments.apps",
                "jobs.batch",
                "widgets.example.com",
                "clusters.cluster.x-k8s.io",
            ]
        );
    }

    #[test]
    fn server_owned_metadata_and_status_are_reset_and_our_labels_added() {
        let mut obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "cfg", "namespace": "shop", "uid": "u", "resourceVersion": "7", "generation": 3,
                "creationTimestamp": "2026-01-01T00:00:00Z", "managedFields": [{}], "selfLink": "/x",
                "ownerReferences": [{"uid": "o"}], "generateName": "cfg-",
                "labels": {"app": "shop"}, "annotations": {"note": "kept"}
            },
            "data": {"k": "v"}, "status": {"x": 1}
        });
        prepare(&gr("", "configmaps"), &mut obj, &naming()).unwrap();
        assert_eq!(
            obj,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {
                    "name": "cfg", "namespace": "shop-copy",
                    "labels": {"app": "shop", "velero.io/backup-name": "b", "velero.io/restore-name": "r"},
                    "annotations": {"note": "kept"}
                },
                "data": {"k": "v"}
            })
        );
    }

    #[test]
    fn volumes_claims_and_services_are_unbound_for_the_new_cluster() {
        let mut pv = json!({
            "metadata": {"name": "pv1", "annotations": {"pv.kubernetes.io/bound-by-controller": "yes", "keep": "1"}},
            "spec": {"claimRef": {"namespace": "shop", "name": "data", "uid": "u", "resourceVersion": "9"}}
        });
        prepare(&gr("", "persistentvolumes"), &mut pv, &naming()).unwrap();
        assert_eq!(pv["spec"]["claimRef"], json!({"namespace": "shop-copy", "name": "data"}));
        assert_eq!(pv["metadata"]["annotations"], json!({"keep": "1"}));

        let mut pvc = json!({"metadata": {"name": "data", "namespace": "db", "annotations": {
            "pv.kubernetes.io/bind-completed": "yes", "volume.kubernetes.io/selected-node": "n1"}}});
        prepare(&gr("", "persistentvolumeclaims"), &mut pvc, &naming()).unwrap();
        assert_eq!(pvc["metadata"]["annotations"], json!({}));
        assert_eq!(pvc["metadata"]["namespace"], "db", "unmapped namespaces stay");

        let mut svc = json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {
            "clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"], "ports": [{"port": 80, "nodePort": 30080}]}});
        prepare(&gr("", "services"), &mut svc, &naming()).unwrap();
        assert_eq!(svc["spec"], json!({"ports": [{"port": 80}]}));
        let mut headless = json!({"metadata": {"name": "db", "namespace": "shop"}, "spec": {"clusterIP": "None"}});
        prepare(&gr("", "services"), &mut headless, &naming()).unwrap();
        assert_eq!(headless["spec"]["clusterIP"], "None");

        let mut ns = json!({"metadata": {"name": "shop"}});
        prepare(&gr("", "namespaces"), &mut ns, &naming()).unwrap();
        assert_eq!(ns["metadata"]["name"], "shop-copy");
    }

    #[test]
    fn completed_pods_mirror_pods_finished_jobs_and_nodes_are_skipped() {
        let pod = |phase: &str| json!({"metadata": {"name": "p"}, "status": {"phase": phase}});
        assert!(skip_reason(&gr("", "pods"), &pod("Succeeded")).is_some());
        assert!(skip_reason(&gr("", "pods"), &pod("Failed")).is_some());
        assert_eq!(skip_reason(&gr("", "pods"), &pod("Running")), None);
        let mirror = json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "x"}}});
        assert!(skip_reason(&gr("", "pods"), &mirror).is_some());
        let job = json!({"status": {"completionTime": "2026-01-01T00:00:00Z"}});
        assert!(skip_reason(&gr("batch", "jobs"), &job).is_some());
        assert_eq!(skip_reason(&gr("batch", "jobs"), &json!({"status": {}})), None);
        assert!(skip_reason(&gr("", "nodes"), &json!({})).is_some());
        assert!(skip_reason(&gr("events.k8s.io", "events"), &json!({})).is_some());
    }

    #[test]
    fn long_names_become_valid_label_values_as_velero_makes_them() {
        assert_eq!(label_value("short"), "short");
        let long = "a".repeat(70);
        let v = label_value(&long);
        assert_eq!(v.len(), 63);
        assert!(v.starts_with(&"a".repeat(57)));
        assert_eq!(&v[57..], &format!("{:x}", Sha256::digest(long.as_bytes()))[..6]);
    }

    #[test]
    fn malformed_objects_are_named_in_the_error() {
        let e = prepare(&gr("", "configmaps"), &mut json!([1]), &naming()).unwrap_err();
        assert!(e.to_string().contains("configmaps"), "{e}");
        let e = prepare(&gr("", "configmaps"), &mut json!({"metadata": "x"}), &naming()).unwrap_err();
        assert!(e.to_string().contains("no metadata object"), "{e}");
        // A labels field that is not an object is replaced, not a panic.
        let mut odd = json!({"metadata": {"name": "x", "labels": 5}});
        prepare(&gr("", "configmaps"), &mut odd, &naming()).unwrap();
        assert_eq!(odd["metadata"]["labels"]["velero.io/restore-name"], "r");
    }
}
