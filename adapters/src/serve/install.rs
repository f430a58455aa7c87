//! What `blockwise install` writes: the CRD, a ServiceAccount, a least-privilege ClusterRole and its
//! binding, the data PVC, the Deployment (Recreate: the log volume is ReadWriteOnce, and two pods
//! on one log are never wanted) and a Service for the metrics.
//!
//! The ClusterRole is derived from what the code calls and names every resource it grants (never
//! `*`, which under Kubernetes' RBAC also covers every subresource: tokens, attach, port-forward,
//! node proxy); [`rbac_checks`] maps any API request to the (verb, group, resource) RBAC would
//! check, so a test can run the controller against the fake API server and check that every
//! request it made is granted — and every rule is used.

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
    /// Custom resources (group, resource) the ClusterRole grants beside [`BUILT_IN`].
    pub extra_resources: Vec<(String, String)>,
    /// The controller container's requests and limits (`cpu`, `memory`, Kubernetes quantities).
    pub resources: ContainerResources,
    /// `--tenant-namespaces` for the controller (a list or `*`), and with it the aggregated
    /// ClusterRole [`TENANT_ROLE`] that lets namespace editors create Backups, Restores and
    /// Schedules.
    pub tenant_namespaces: Option<String>,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            namespace: "blockwise-system".into(),
            image: format!("ghcr.io/blockwise/blockwise:{}", env!("CARGO_PKG_VERSION")),
            replicas: 1,
            data_size: "10Gi".into(),
            metrics_port: 8080,
            extra_resources: Vec::new(),
            tenant_namespaces: None,
            resources: ContainerResources::default(),
        }
    }
}

/// The controller container's resources. The defaults are sized from `docs/benchmarks.md`: a
/// backup's peak RSS is ~270 MiB at 30k objects, ~790 MiB at 100k and ~1.8 GiB at 300k (it still
/// grows with the cluster, issue 23), so the request covers a 100k-object cluster and the limit a
/// 300k one; one CPU is what a backup's hooks, lists and archive building keep busy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerResources {
    /// `requests.cpu`.
    pub cpu_request: String,
    /// `requests.memory`.
    pub memory_request: String,
    /// `limits.cpu`.
    pub cpu_limit: String,
    /// `limits.memory`.
    pub memory_limit: String,
}

impl Default for ContainerResources {
    fn default() -> Self {
        ContainerResources {
            cpu_request: "500m".into(),
            memory_request: "256Mi".into(),
            cpu_limit: "2".into(),
            memory_limit: "2Gi".into(),
        }
    }
}

/// The name of everything installed (ServiceAccount, ClusterRole, Deployment, …).
pub const NAME: &str = "blockwise";
/// The data PVC.
pub const DATA_PVC: &str = "blockwise-data";
/// The Lease of leader election.
pub const LEASE: &str = "blockwise-leader";
/// The aggregated ClusterRole of tenant mode: Kubernetes adds its rules to the built-in `edit`
/// and `admin` roles, so whoever may edit a namespace may create our CRs in it.
pub const TENANT_ROLE: &str = "blockwise-tenant-edit";

/// One RBAC rule: API groups, resources (with `/subresource`), verbs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// API groups (`""` is the core group).
    pub groups: Vec<String>,
    /// Resources, `resource/subresource` for a subresource. Never `*`: under Kubernetes' RBAC a
    /// `*` resource also matches every subresource (`serviceaccounts/token`, `pods/attach`,
    /// `nodes/proxy`, …).
    pub resources: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
    /// A rule of the resource catalogue (get and list for backups, create and patch for restores,
    /// one per API group), as opposed to a rule a single code path needs.
    pub catalogue: bool,
}

/// The Kubernetes API's own resource types (1.33, with the CSI snapshot and group snapshot types
/// every snapshotting cluster installs) that a backup may list and a restore may create — by API
/// group. Subresources are deliberately absent.
pub const BUILT_IN: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "configmaps",
            "endpoints",
            "events",
            "limitranges",
            "namespaces",
            "nodes",
            "persistentvolumeclaims",
            "persistentvolumes",
            "pods",
            "podtemplates",
            "replicationcontrollers",
            "resourcequotas",
            "secrets",
            "serviceaccounts",
            "services",
        ],
    ),
    (
        "admissionregistration.k8s.io",
        &[
            "mutatingwebhookconfigurations",
            "validatingadmissionpolicies",
            "validatingadmissionpolicybindings",
            "validatingwebhookconfigurations",
        ],
    ),
    ("apiextensions.k8s.io", &["customresourcedefinitions"]),
    ("apiregistration.k8s.io", &["apiservices"]),
    ("apps", &["controllerrevisions", "daemonsets", "deployments", "replicasets", "statefulsets"]),
    ("autoscaling", &["horizontalpodautoscalers"]),
    ("batch", &["cronjobs", "jobs"]),
    ("certificates.k8s.io", &["certificatesigningrequests"]),
    ("coordination.k8s.io", &["leases"]),
    ("discovery.k8s.io", &["endpointslices"]),
    ("events.k8s.io", &["events"]),
    ("flowcontrol.apiserver.k8s.io", &["flowschemas", "prioritylevelconfigurations"]),
    ("networking.k8s.io", &["ingressclasses", "ingresses", "ipaddresses", "networkpolicies", "servicecidrs"]),
    ("node.k8s.io", &["runtimeclasses"]),
    ("policy", &["poddisruptionbudgets"]),
    ("rbac.authorization.k8s.io", &["clusterrolebindings", "clusterroles", "rolebindings", "roles"]),
    ("resource.k8s.io", &["deviceclasses", "resourceclaims", "resourceclaimtemplates", "resourceslices"]),
    ("scheduling.k8s.io", &["priorityclasses"]),
    (
        "storage.k8s.io",
        &[
            "csidrivers",
            "csinodes",
            "csistoragecapacities",
            "storageclasses",
            "volumeattachments",
            "volumeattributesclasses",
        ],
    ),
    ("snapshot.storage.k8s.io", &["volumesnapshotclasses", "volumesnapshotcontents", "volumesnapshots"]),
    (
        "groupsnapshot.storage.k8s.io",
        &["volumegroupsnapshotclasses", "volumegroupsnapshotcontents", "volumegroupsnapshots"],
    ),
    ("blockwise.dev", &["backups", "restores", "schedules"]),
];

/// The rules a single code path needs, beside the catalogue: hooks' execs (a WebSocket exec is
/// authorized as `get` before Kubernetes 1.35 and `create` from then on), the watches and deletes
/// of the CSI procedure (`crate::csi`), the watches of Backups, Restores and Schedules and their
/// status patches, and the deletes of Backups (garbage collection, retention).
const SPECIFIC: &[(&str, &str, &[&str])] = &[
    ("", "pods/exec", &["create", "get"]),
    ("snapshot.storage.k8s.io", "volumesnapshots", &["watch", "delete"]),
    ("snapshot.storage.k8s.io", "volumesnapshotcontents", &["watch", "delete"]),
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshots", &["watch", "delete"]),
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", &["delete"]),
    ("blockwise.dev", "backups", &["watch", "delete"]),
    ("blockwise.dev", "backups/status", &["patch"]),
    ("blockwise.dev", "restores", &["watch"]),
    ("blockwise.dev", "restores/status", &["patch"]),
    ("blockwise.dev", "schedules", &["watch"]),
    ("blockwise.dev", "schedules/status", &["patch"]),
];

/// Whether a restore may create `resource` of `group` (not one of the engine's never-restored
/// types: nodes, events, CSI nodes, volume attachments, …).
fn restorable(group: &str, resource: &str) -> bool {
    let name = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
    !blockwise_engine::restore::NON_RESTORABLE.contains(&name.as_str())
}

/// The ClusterRole's rules: what the code calls, nothing more, on named resources only.
/// Backups get and list every resource type of the catalogue ([`BUILT_IN`] and `extra`, the
/// custom resources the install was told about, as `(group, resource)`); restores create and,
/// under `existingResourcePolicy: update`, patch each of them a restore may create — which also
/// covers the CSI procedure's snapshot creates and patches, the leader Lease (kube-lease-manager)
/// and the Backups' finalizers. Then [`SPECIFIC`]. Velero's server runs with cluster-admin.
pub fn rules(extra: &[(String, String)]) -> Vec<Rule> {
    let mut by_group: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    for (g, rs) in BUILT_IN {
        by_group.entry(g.to_string()).or_default().extend(rs.iter().map(|r| r.to_string()));
    }
    for (g, r) in extra {
        by_group.entry(g.clone()).or_default().insert(r.clone());
    }
    let verbs = |v: &[&str]| v.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    let mut out = Vec::new();
    for (g, rs) in &by_group {
        let all: Vec<String> = rs.iter().cloned().collect();
        out.push(Rule { groups: vec![g.clone()], resources: all, verbs: verbs(&["get", "list"]), catalogue: true });
        let writable: Vec<String> = rs.iter().filter(|r| restorable(g, r)).cloned().collect();
        if !writable.is_empty() {
            out.push(Rule {
                groups: vec![g.clone()],
                resources: writable,
                verbs: verbs(&["create", "patch"]),
                catalogue: true,
            });
        }
    }
    for (g, r, v) in SPECIFIC {
        out.push(Rule {
            groups: vec![g.to_string()],
            resources: vec![r.to_string()],
            verbs: verbs(v),
            catalogue: false,
        });
    }
    out
}

/// A custom resource to add to the catalogue, as `resource.group` (Velero's `--include-resources`
/// form, such as `certificates.cert-manager.io`): `(group, resource)`, or what is wrong with it.
pub fn parse_extra_resource(s: &str) -> Result<(String, String), String> {
    let (resource, group) = s.split_once('.').ok_or_else(|| {
        format!("{s:?}: expected resource.group (such as certificates.cert-manager.io); core types are built in")
    })?;
    let ok = |x: &str| {
        !x.is_empty() && x.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !ok(resource) || !ok(group) || resource.contains('.') {
        return Err(format!("{s:?}: a resource and a group are lowercase DNS names; no '*' and no subresource"));
    }
    Ok((group.to_string(), resource.to_string()))
}

/// Every manifest, in the order `kubectl apply` should create them.
pub fn manifests(o: &InstallOptions) -> Vec<Value> {
    let labels = json!({"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME});
    let ns = &o.namespace;
    let rules: Vec<Value> = rules(&o.extra_resources)
        .iter()
        .map(|r| json!({"apiGroups": r.groups, "resources": r.resources, "verbs": r.verbs}))
        .collect();
    let mut crd = serde_json::to_value(Backup::crd()).unwrap_or(Value::Null);
    crd["metadata"]["labels"] = labels.clone();
    let mut restore_crd = serde_json::to_value(super::restores::Restore::crd()).unwrap_or(Value::Null);
    restore_crd["metadata"]["labels"] = labels.clone();
    let mut schedule_crd = serde_json::to_value(super::schedules::Schedule::crd()).unwrap_or(Value::Null);
    schedule_crd["metadata"]["labels"] = labels.clone();
    let port = o.metrics_port;
    let mut args: Vec<String> = ["serve", "--data-dir", "/data", "--lease-namespace", ns]
        .iter()
        .map(|a| a.to_string())
        .chain(["--metrics-addr".to_string(), format!("0.0.0.0:{port}")])
        .collect();
    if let Some(t) = &o.tenant_namespaces {
        args.extend(["--tenant-namespaces".to_string(), t.clone()]);
    }
    let mut all = vec![
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
                        "args": args,
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "metrics", "containerPort": port}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                        "resources": {
                            "requests": {"cpu": o.resources.cpu_request, "memory": o.resources.memory_request},
                            "limits": {"cpu": o.resources.cpu_limit, "memory": o.resources.memory_limit},
                        },
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
    ];
    if o.tenant_namespaces.is_some() {
        let mut aggregate = labels.clone();
        aggregate["rbac.authorization.k8s.io/aggregate-to-edit"] = json!("true");
        aggregate["rbac.authorization.k8s.io/aggregate-to-admin"] = json!("true");
        all.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": TENANT_ROLE, "labels": aggregate},
            "rules": [{"apiGroups": ["blockwise.dev"], "resources": ["backups", "restores", "schedules"],
                       "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]}));
    }
    all
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

/// Whether the rules grant a request, under Kubernetes' RBAC matching (`rbac/v1` helpers'
/// `VerbMatches`, `APIGroupMatches`, `ResourceMatches`): `*` verbs and groups match all; a `*`
/// resource matches every resource **and every subresource**; `*/sub` matches that subresource of
/// any resource. `res/*` is counted as matching `res`'s subresources too (the RBAC docs' reading;
/// the API server's matcher does not, so this errs on the side of finding a grant).
pub fn granted(rules: &[Rule], verb: &str, group: &str, resource: &str) -> bool {
    let sub = resource.split_once('/').map(|(_, s)| s);
    rules.iter().any(|r| {
        let verb_ok = r.verbs.iter().any(|v| v == "*" || v == verb);
        let group_ok = r.groups.iter().any(|g| g == "*" || g == group);
        let resource_ok = r.resources.iter().any(|x| {
            x == "*"
                || x == resource
                || sub.is_some_and(|s| x.strip_prefix("*/") == Some(s))
                || (sub.is_some() && x.strip_suffix("/*").is_some_and(|base| resource.starts_with(&format!("{base}/"))))
        });
        verb_ok && group_ok && resource_ok
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
        let r = &d["spec"]["template"]["spec"]["containers"][0]["resources"];
        assert_eq!((r["requests"]["memory"].as_str(), r["limits"]["memory"].as_str()), (Some("256Mi"), Some("2Gi")));
        assert_eq!(d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], DATA_PVC);
    }

    #[test]
    fn tenant_mode_passes_the_namespaces_and_aggregates_a_role_for_editors() {
        let o = InstallOptions { tenant_namespaces: Some("payments,billing".into()), ..InstallOptions::default() };
        let all = manifests(&o);
        let args = all[8]["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap().clone();
        let pos = args.iter().position(|a| a == "--tenant-namespaces").unwrap();
        assert_eq!(args[pos + 1], "payments,billing");
        let role = all.last().unwrap();
        assert_eq!(role["metadata"]["name"], TENANT_ROLE);
        assert_eq!(role["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"], "true");
        assert_eq!(role["rules"][0]["resources"], json!(["backups", "restores", "schedules"]));
        // Without tenants: neither.
        let plain = manifests(&InstallOptions::default());
        assert!(!plain.iter().any(|m| m["metadata"]["name"] == TENANT_ROLE));
        assert!(!plain[8].to_string().contains("--tenant-namespaces"));
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
        let rules = rules(&[]);
        assert!(granted(&rules, "list", "apps", "deployments"));
        assert!(!granted(&rules, "delete", "apps", "deployments"));
        assert!(!granted(&rules, "get", "", "secrets/proxy"));
        assert!(granted(&rules, "patch", "blockwise.dev", "backups/status"));
    }

    #[test]
    fn the_matcher_follows_kubernetes_wildcards() {
        let rule = |g: &str, r: &str, v: &str| Rule {
            groups: vec![g.into()],
            resources: vec![r.into()],
            verbs: vec![v.into()],
            catalogue: false,
        };
        // A `*` resource covers subresources: minting tokens, attaching, port-forwarding.
        assert!(granted(&[rule("*", "*", "create")], "create", "", "serviceaccounts/token"));
        assert!(granted(&[rule("", "*", "get")], "get", "", "nodes/proxy"));
        assert!(granted(&[rule("", "*/exec", "create")], "create", "", "pods/exec"));
        assert!(granted(&[rule("", "pods/*", "create")], "create", "", "pods/attach"));
        assert!(!granted(&[rule("", "pods/*", "create")], "create", "", "pods"));
        assert!(!granted(&[rule("", "pods", "create")], "create", "", "pods/portforward"));
        assert!(granted(&[rule("", "pods", "*")], "delete", "", "pods"));
        assert!(!granted(&[rule("apps", "pods", "get")], "get", "", "pods"));
    }

    /// Issue 21, defect 5: no rule names `*`, and none grants the five dangerous subresources
    /// (exec only as hooks need it), with or without custom resources added.
    #[test]
    fn the_role_names_its_resources_and_grants_no_token_attach_portforward_or_proxy() {
        let extra = vec![parse_extra_resource("certificates.cert-manager.io").unwrap()];
        for rules in [rules(&[]), rules(&extra)] {
            for r in &rules {
                assert!(!r.resources.iter().any(|x| x.contains('*')) && !r.groups.iter().any(|g| g == "*"), "{r:?}");
                assert!(!r.verbs.iter().any(|v| v == "*"), "{r:?}");
            }
            for verb in ["get", "list", "watch", "create", "update", "patch", "delete"] {
                assert!(!granted(&rules, verb, "", "serviceaccounts/token"), "{verb} serviceaccounts/token");
                assert!(!granted(&rules, verb, "", "pods/attach"), "{verb} pods/attach");
                assert!(!granted(&rules, verb, "", "pods/portforward"), "{verb} pods/portforward");
                assert!(!granted(&rules, verb, "", "nodes/proxy"), "{verb} nodes/proxy");
                assert_eq!(
                    granted(&rules, verb, "", "pods/exec"),
                    verb == "get" || verb == "create",
                    "{verb} pods/exec"
                );
            }
            // What a restore may not create is not granted: nodes, events.
            assert!(granted(&rules, "list", "", "nodes") && !granted(&rules, "create", "", "nodes"));
            assert!(!granted(&rules, "create", "events.k8s.io", "events"));
        }
        assert!(granted(&rules(&extra), "create", "cert-manager.io", "certificates"));
        assert!(!granted(&rules(&[]), "list", "cert-manager.io", "certificates"));
        for bad in ["certificates", "*.cert-manager.io", "pods/exec.core", ".x", "Certs.example.com"] {
            assert!(parse_extra_resource(bad).is_err(), "{bad}");
        }
    }
}
