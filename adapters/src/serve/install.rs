//! What `blockwise install` writes: the CRD, a ServiceAccount, a least-privilege ClusterRole and its
//! binding, the data PVC, the Deployment (Recreate: the log volume is ReadWriteOnce, and two pods
//! on one log are never wanted) and a Service for the metrics.
//!
//! The ClusterRole is derived from what the code calls, and [`rbac_checks`] maps any API request
//! to the (verb, group, resource) RBAC would check, so a test can run the controller against the
//! fake API server and check that every request it made is granted — and every rule is used.

use kube::CustomResourceExt;
use serde_json::{json, Value};

use super::crd::Backup;

/// Options of the manifests.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The namespace the controller runs in.
    pub namespace: String,
    /// Its container image.
    pub image: String,
    /// Replicas (one leader runs backups; the others wait).
    pub replicas: u32,
    /// Size of the data volume (the event logs and the default local store).
    pub data_size: String,
    /// Port of /metrics, /healthz and /readyz.
    pub metrics_port: u16,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            namespace: "blockwise-system".into(),
            image: format!("ghcr.io/blockwise/blockwise:{}", env!("CARGO_PKG_VERSION")),
            replicas: 1,
            data_size: "10Gi".into(),
            metrics_port: 8080,
        }
    }
}

/// The name of everything installed (ServiceAccount, ClusterRole, Deployment, …).
pub const NAME: &str = "blockwise";
/// The data PVC.
pub const DATA_PVC: &str = "blockwise-data";
/// The Lease of leader election.
pub const LEASE: &str = "blockwise-leader";

/// One RBAC rule: API groups, resources (with `/subresource`), verbs.
pub type Rule = (&'static [&'static str], &'static [&'static str], &'static [&'static str]);

/// The ClusterRole's rules: what the code calls, nothing more — each rule needed by some call no
/// other rule grants (`serve_e2e` checks both ways). Backups read every resource type (get and
/// list: Velero backs up whatever a spec selects); restores create every type a backup may hold
/// and, under `existingResourcePolicy: update`, patch it — so create and patch are granted on every
/// type, as Velero's server runs with cluster-admin — which also covers the CSI procedure's
/// snapshot creates and patches, the leader Lease (kube-lease-manager) and the Backups'
/// finalizers. Beyond those: hooks' execs, the watches and deletes of the CSI procedure
/// (`crate::csi`), the watches of Backups and Restores, and their status patches, and the
/// garbage collector's deletes of expired Backups.
pub const RULES: &[Rule] = &[
    (&["*"], &["*"], &["get", "list"]),
    (&["*"], &["*"], &["create", "patch"]),
    (&[""], &["pods/exec"], &["create", "get"]),
    (&["snapshot.storage.k8s.io"], &["volumesnapshots"], &["watch", "delete"]),
    (&["snapshot.storage.k8s.io"], &["volumesnapshotcontents"], &["watch", "delete"]),
    (&["groupsnapshot.storage.k8s.io"], &["volumegroupsnapshots"], &["watch", "delete"]),
    (&["groupsnapshot.storage.k8s.io"], &["volumegroupsnapshotcontents"], &["delete"]),
    (&["blockwise.dev"], &["backups"], &["watch", "delete"]),
    (&["blockwise.dev"], &["backups/status"], &["patch"]),
    (&["blockwise.dev"], &["restores"], &["watch"]),
    (&["blockwise.dev"], &["restores/status"], &["patch"]),
    (&["blockwise.dev"], &["schedules"], &["watch"]),
    (&["blockwise.dev"], &["schedules/status"], &["patch"]),
];

/// Every manifest, in the order `kubectl apply` should create them.
pub fn manifests(o: &InstallOptions) -> Vec<Value> {
    let labels = json!({"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME});
    let ns = &o.namespace;
    let rules: Vec<Value> = RULES.iter().map(|(g, r, v)| json!({"apiGroups": g, "resources": r, "verbs": v})).collect();
    let mut crd = serde_json::to_value(Backup::crd()).unwrap_or(Value::Null);
    crd["metadata"]["labels"] = labels.clone();
    let mut restore_crd = serde_json::to_value(super::restores::Restore::crd()).unwrap_or(Value::Null);
    restore_crd["metadata"]["labels"] = labels.clone();
    let mut schedule_crd = serde_json::to_value(super::schedules::Schedule::crd()).unwrap_or(Value::Null);
    schedule_crd["metadata"]["labels"] = labels.clone();
    let port = o.metrics_port;
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}),
        crd,
        restore_crd,
        schedule_crd,
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": NAME, "namespace": ns, "labels": labels}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": NAME, "labels": labels}, "rules": rules}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": NAME, "labels": labels},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
               "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}]}),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": DATA_PVC, "namespace": ns, "labels": labels},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": o.data_size}}}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": o.replicas,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": NAME,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "fsGroup": 65532},
                    "containers": [{
                        "name": NAME,
                        "image": o.image,
                        "args": ["serve", "--data-dir", "/data", "--lease-namespace", ns,
                                 "--metrics-addr", format!("0.0.0.0:{port}")],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "metrics", "containerPort": port}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                    }],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}}],
                },
            },
        }}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": NAME, "namespace": ns, "labels": labels},
               "spec": {"selector": {"app.kubernetes.io/name": NAME},
                        "ports": [{"name": "metrics", "port": port, "targetPort": "metrics"}]}}),
    ]
}

/// The manifests as one YAML stream (`---` between documents).
pub fn manifests_yaml(o: &InstallOptions) -> Result<String, String> {
    let mut out = String::new();
    for m in manifests(o) {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&m).map_err(|e| format!("encoding a manifest as YAML: {e}"))?);
    }
    Ok(out)
}

/// The (verb, API group, resource or resource/subresource) checks RBAC makes for one API request
/// — none for a request RBAC does not check by resource (discovery, /version). A WebSocket exec is
/// a GET, authorized as `get` before Kubernetes 1.35 and as `create` from 1.35 on (KEP-4006,
/// `AuthorizePodWebsocketUpgradeCreatePermission`): both are needed to work on either.
pub fn rbac_checks(method: &str, path: &str, query: &str) -> Vec<(String, String, String)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest): (&str, &[&str]) = match segs.as_slice() {
        ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", g, _v, rest @ ..] if !rest.is_empty() => (g, rest),
        _ => return Vec::new(),
    };
    let (resource, name, sub) = match rest {
        ["namespaces", _ns, r] => (*r, None, None),
        ["namespaces", _ns, r, n] => (*r, Some(*n), None),
        ["namespaces", _ns, r, n, s] => (*r, Some(*n), Some(*s)),
        [r] => (*r, None, None),
        [r, n] => (*r, Some(*n), None),
        [r, n, s] => (*r, Some(*n), Some(*s)),
        _ => return Vec::new(),
    };
    let watch = query.split('&').any(|kv| kv == "watch=1" || kv == "watch=true");
    let verb = match (method, name) {
        ("GET", _) if watch => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", None) => "deletecollection",
        ("DELETE", Some(_)) => "delete",
        _ => return Vec::new(),
    };
    let resource = match sub {
        Some(s) => format!("{resource}/{s}"),
        None => resource.to_string(),
    };
    let connect = matches!(sub, Some("exec" | "attach" | "portforward"));
    let mut out = vec![(verb.to_string(), group.to_string(), resource.clone())];
    if connect && verb == "get" {
        out.push(("create".to_string(), group.to_string(), resource));
    }
    out
}

/// Whether the rules grant a request.
pub fn granted(rules: &[Rule], verb: &str, group: &str, resource: &str) -> bool {
    rules.iter().any(|(g, r, v)| {
        (g.contains(&"*") || g.contains(&group))
            && (r.contains(&resource) || (r.contains(&"*") && !resource.contains('/')))
            && v.contains(&verb)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_name_one_namespace_and_parse_back_from_yaml() {
        let o = InstallOptions { namespace: "backup-ops".into(), ..InstallOptions::default() };
        let yaml = manifests_yaml(&o).unwrap();
        let kinds: Vec<String> = yaml
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| {
                let v: Value = serde_yaml_ng::from_str(d).unwrap();
                if let Some(ns) = v["metadata"]["namespace"].as_str() {
                    assert_eq!(ns, "backup-ops");
                }
                v["kind"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "PersistentVolumeClaim",
                "Deployment",
                "Service"
            ]
        );
        let d = &manifests(&o)[8];
        assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
        assert_eq!(d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], DATA_PVC);
    }

    #[test]
    fn requests_map_to_what_rbac_checks() {
        let r = |m, p, q| {
            rbac_checks(m, p, q).into_iter().map(|(v, g, r)| format!("{v} {g} {r}")).collect::<Vec<_>>().join("; ")
        };
        assert_eq!(r("GET", "/api/v1/pods", "limit=500"), "list  pods");
        assert_eq!(r("POST", "/api/v1/namespaces/a/pods/p/exec", "command=x"), "create  pods/exec");
        assert_eq!(r("GET", "/api/v1/namespaces/a/pods/p/exec", "command=x"), "get  pods/exec; create  pods/exec");
        assert_eq!(
            r("GET", "/apis/blockwise.dev/v1alpha1/backups", "watch=true&resourceVersion=5"),
            "watch blockwise.dev backups"
        );
        assert_eq!(
            r("PATCH", "/apis/blockwise.dev/v1alpha1/namespaces/o/backups/b/status", ""),
            "patch blockwise.dev backups/status"
        );
        assert_eq!(r("GET", "/apis/apps/v1", ""), "");
        assert!(granted(RULES, "list", "apps", "deployments"));
        assert!(!granted(RULES, "delete", "apps", "deployments"));
        assert!(!granted(RULES, "get", "", "secrets/proxy"));
        assert!(granted(RULES, "patch", "blockwise.dev", "backups/status"));
    }
}
