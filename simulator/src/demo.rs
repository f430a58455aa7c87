//! The built-in demo cluster: a realistic, deterministic workload for the CLI's no-cluster default,
//! benchmarks and end-to-end tests.
//!
//! [`demo_cluster`] builds a [`FakeCluster`] of about the requested number of objects from a seed.
//! Every relation the grouping and hook code cares about is present at every size: Deployments →
//! ReplicaSets → Pods, StatefulSets with per-pod PVCs bound to PVs, an RWX claim shared by several
//! Running pods (plus a Pending one), two volume groups, an unbound claim, Pending and Succeeded
//! pods, ServiceAccounts bound by ClusterRoleBindings, PriorityClasses, eight Running pods with
//! fsfreeze-style pre/post hook annotations and — with the demo's faults, which the CLI adds only on
//! `--demo-faults` — exactly one pod whose pre-hook fails with onError Fail
//! ([`demo_failing_hook_pod`]; without faults it freezes like the others). This fixed core lives in
//! the first two namespaces (`shop`,
//! `payments`); the rest of the budget is filled with generic apps spread over all namespaces and
//! then single ConfigMaps/Secrets, so the count is exact whenever it exceeds the core (83
//! objects; smaller requests give the core alone). Uids derive from a hash of seed, kind and
//! name, so an object's uid does not depend on generation order or cluster size.

use std::collections::HashSet;
use std::fmt::Write as _;

use blockwise_engine::item::{GroupResource, ItemKey, ResourceType};
use serde_json::{json, Map, Value};

use crate::fake::FakeCluster;
use crate::rng::{hash_str, mix64, Rng};

/// The seed the CLI's demo uses.
pub const DEMO_SEED: u64 = 0xB10C_5EED;
/// The CLI's default demo size, in objects.
pub const DEMO_OBJECTS_DEFAULT: usize = 2000;
/// The label that names a volume group (Velero's default).
pub const VOLUME_GROUP_LABEL: &str = "velero.io/volume-group";
/// `metadata.creationTimestamp` of every demo object.
pub const CREATION_TIMESTAMP: &str = "2024-05-01T12:00:00Z";
/// The freeze command of the demo's hook pods (JSON array, as in the annotation).
pub const FREEZE_COMMAND: &str = r#"["/sbin/fsfreeze","--freeze","/var/lib/data"]"#;
/// The unfreeze command of the demo's hook pods (JSON array, as in the annotation).
pub const UNFREEZE_COMMAND: &str = r#"["/sbin/fsfreeze","--unfreeze","/var/lib/data"]"#;
/// The failing pod's pre-hook command (JSON array, as in the annotation).
pub const FAILING_PRE_COMMAND: &str = r#"["/bin/sh","-c","exit 1"]"#;

const NAMESPACE_NAMES: [&str; 12] = [
    "shop",
    "payments",
    "analytics",
    "identity",
    "search",
    "media",
    "messaging",
    "inventory",
    "monitoring",
    "logging",
    "billing",
    "support",
];
const APPS: [&str; 20] = [
    "api",
    "frontend",
    "checkout",
    "cart",
    "catalog",
    "gateway",
    "worker",
    "scheduler",
    "notifier",
    "mailer",
    "ledger",
    "invoicer",
    "recommender",
    "ingest",
    "exporter",
    "backend",
    "cache",
    "indexer",
    "thumbnailer",
    "webhook",
];
/// The largest number of objects one generic unit adds.
const UNIT_MAX: usize = 12;

type Gr = (&'static str, &'static str);
const NAMESPACES: Gr = ("", "namespaces");
const PODS: Gr = ("", "pods");
const PVCS: Gr = ("", "persistentvolumeclaims");
const PVS: Gr = ("", "persistentvolumes");
const CONFIGMAPS: Gr = ("", "configmaps");
const SECRETS: Gr = ("", "secrets");
const SERVICES: Gr = ("", "services");
const SERVICEACCOUNTS: Gr = ("", "serviceaccounts");
const DEPLOYMENTS: Gr = ("apps", "deployments");
const REPLICASETS: Gr = ("apps", "replicasets");
const STATEFULSETS: Gr = ("apps", "statefulsets");
const RBAC: &str = "rbac.authorization.k8s.io";
const CRBS: Gr = (RBAC, "clusterrolebindings");
const CLUSTERROLES: Gr = (RBAC, "clusterroles");
const PRIORITYCLASSES: Gr = ("scheduling.k8s.io", "priorityclasses");
const STORAGECLASSES: Gr = ("storage.k8s.io", "storageclasses");
const SNAPSHOTCLASSES: Gr = ("snapshot.storage.k8s.io", "volumesnapshotclasses");
const GROUPSNAPSHOTCLASSES: Gr = ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses");
/// The CSI driver of the demo's volumes.
pub const DEMO_CSI_DRIVER: &str = "pd.csi.storage.gke.io";

/// Every resource type the demo cluster serves, at its preferred version.
pub fn demo_resource_types() -> Vec<ResourceType> {
    [
        ("", "v1", "namespaces", "Namespace", false),
        ("", "v1", "pods", "Pod", true),
        ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true),
        ("", "v1", "persistentvolumes", "PersistentVolume", false),
        ("", "v1", "configmaps", "ConfigMap", true),
        ("", "v1", "secrets", "Secret", true),
        ("", "v1", "services", "Service", true),
        ("", "v1", "serviceaccounts", "ServiceAccount", true),
        ("apps", "v1", "deployments", "Deployment", true),
        ("apps", "v1", "replicasets", "ReplicaSet", true),
        ("apps", "v1", "statefulsets", "StatefulSet", true),
        (RBAC, "v1", "clusterrolebindings", "ClusterRoleBinding", false),
        (RBAC, "v1", "clusterroles", "ClusterRole", false),
        ("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", false),
        ("storage.k8s.io", "v1", "storageclasses", "StorageClass", false),
    ]
    .into_iter()
    .map(|(g, v, r, k, n)| ResourceType::new(g, v, r, k, n))
    .chain(crate::csi::snapshot_resources(Some("v1")))
    .collect()
}

/// How the demo's fake CSI driver behaves for a demo with `latency_ms` of API latency: a cut takes
/// a few API round trips, readiness ten times longer.
pub fn demo_csi(latency_ms: u64) -> crate::csi::CsiConfig {
    let timing = crate::csi::Timing { cut_ms: 20 + 2 * latency_ms, ready_ms: 100 + 10 * latency_ms };
    crate::csi::CsiConfig { default: crate::csi::Behaviour { timing, fault: None }, ..Default::default() }
}

/// The demo cluster a `blockwise` run of these parameters backs up, with its fake CSI driver and
/// the state earlier runs left in `state` (written objects, storage snapshots; see
/// [`crate::fake::FakeCluster::with_state_file`]).
pub fn demo_cluster_at(
    objects: usize,
    seed: u64,
    faults: bool,
    latency_ms: u64,
    state: &std::path::Path,
) -> std::io::Result<crate::fake::FakeCluster> {
    demo_cluster_with(objects, seed, faults).with_csi(demo_csi(latency_ms)).with_state_file(state)
}

/// How many namespaces a demo of `objects` objects has: about 10 for 2000, at least 2, at most 64.
pub fn demo_namespace_count(objects: usize) -> usize {
    ((objects as f64 / 20.0).sqrt().round() as usize).clamp(2, 64)
}

/// The namespace names of a demo of `objects` objects; the first two hold the fixed core.
pub fn demo_namespaces(objects: usize) -> Vec<String> {
    (0..demo_namespace_count(objects))
        .map(|i| match i / NAMESPACE_NAMES.len() {
            0 => NAMESPACE_NAMES[i].to_string(),
            n => format!("{}-{}", NAMESPACE_NAMES[i % NAMESPACE_NAMES.len()], n + 1),
        })
        .collect()
}

/// The one Running pod whose pre-hook fails with onError Fail (`/bin/sh -c "exit 1"`) when the demo
/// has its faults; it mounts a bound PVC, so its block also holds the PVC and PV. The same for every
/// size and seed.
pub fn demo_failing_hook_pod() -> ItemKey {
    ItemKey::namespaced("", "pods", NAMESPACE_NAMES[1], "reporting-0")
}

/// A deterministic demo cluster of about `objects` objects (see the module docs), with its
/// deliberate faults (the failing pre-hook of [`demo_failing_hook_pod`]).
pub fn demo_cluster(objects: usize, seed: u64) -> FakeCluster {
    demo_cluster_with(objects, seed, true)
}

/// A cluster that serves the demo's resource types and holds no object: where a restore goes
/// (`blockwise simulator serve --empty`). Only the namespaces every cluster has are there (their
/// objects are not served, but creates in them are admitted).
pub fn empty_cluster() -> FakeCluster {
    let mut cluster = FakeCluster::new();
    for rt in demo_resource_types() {
        cluster.add_resource(rt);
    }
    cluster
}

/// A deterministic demo cluster; without `faults`, [`demo_failing_hook_pod`] has an ordinary
/// freeze hook and every hook succeeds, so a backup of it completes.
pub fn demo_cluster_with(objects: usize, seed: u64, faults: bool) -> FakeCluster {
    let mut g = Gen::new(seed);
    g.faults = faults;
    let namespaces = demo_namespaces(objects);
    g.cluster_wide();
    for ns in &namespaces {
        g.namespace(ns);
    }
    g.core_shop(&namespaces[0]);
    g.core_payments(&namespaces[1]);
    let mut unit = 0usize;
    while objects.saturating_sub(g.count()) >= UNIT_MAX {
        let ns = &namespaces[(unit + 2) % namespaces.len()];
        match g.rng.below(20) {
            0..=12 => g.deployment_unit(ns),
            13..=17 => g.statefulset_unit(ns),
            _ => g.job_unit(ns),
        }
        unit += 1;
    }
    while g.count() < objects {
        let ns = &namespaces[unit % namespaces.len()];
        if unit.is_multiple_of(2) {
            let name = g.claim(ns, "feature-flags");
            g.configmap(ns, &name, None);
        } else {
            let name = g.claim(ns, "api-token");
            g.secret(ns, &name, None);
        }
        unit += 1;
    }
    g.cluster
}

/// What hook annotations a pod (template) carries.
#[derive(Debug, Clone, Copy, Default)]
enum Hook {
    #[default]
    None,
    /// fsfreeze pre/post hooks in this container, with an optional pre-hook timeout.
    Freeze { container: &'static str, timeout: Option<&'static str> },
    /// A pre-hook that exits 1 with onError Fail, and an unfreeze post-hook.
    Failing { container: &'static str },
}

impl Hook {
    fn annotations(self) -> Value {
        let (container, pre) = match self {
            Hook::None => return json!({}),
            Hook::Freeze { container, .. } => (container, FREEZE_COMMAND),
            Hook::Failing { container } => (container, FAILING_PRE_COMMAND),
        };
        let mut a = json!({
            "pre.hook.backup.velero.io/container": container,
            "pre.hook.backup.velero.io/command": pre,
            "post.hook.backup.velero.io/container": container,
            "post.hook.backup.velero.io/command": UNFREEZE_COMMAND,
        });
        match self {
            Hook::Freeze { timeout: Some(t), .. } => a["pre.hook.backup.velero.io/timeout"] = json!(t),
            Hook::Failing { .. } => a["pre.hook.backup.velero.io/on-error"] = json!("Fail"),
            _ => {}
        }
        a
    }
}

/// A pod template: what every pod of a workload shares.
#[derive(Debug, Clone, Default)]
struct Template {
    /// (name, image) of each container; the first one mounts the claims.
    containers: Vec<(String, String)>,
    /// Claims every pod mounts (a StatefulSet adds each pod's own claim).
    claims: Vec<String>,
    hook: Hook,
    priority: Option<&'static str>,
    service_account: Option<String>,
}

impl Template {
    fn new(containers: &[(&str, &str)]) -> Self {
        let containers = containers.iter().map(|(n, i)| (n.to_string(), i.to_string())).collect();
        Template { containers, ..Template::default() }
    }

    /// The pod spec for these claims.
    fn spec(&self, claims: &[String]) -> Value {
        let mounts: Vec<Value> = claims
            .iter()
            .enumerate()
            .map(|(i, _)| json!({"name": format!("data-{i}"), "mountPath": format!("/var/lib/data{}", suffix(i))}))
            .collect();
        let containers: Vec<Value> = self
            .containers
            .iter()
            .enumerate()
            .map(|(i, (name, image))| {
                let mut c = json!({"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}});
                if i == 0 && !mounts.is_empty() {
                    c["volumeMounts"] = Value::Array(mounts.clone());
                }
                c
            })
            .collect();
        let volumes: Vec<Value> = claims
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"name": format!("data-{i}"), "persistentVolumeClaim": {"claimName": c}}))
            .collect();
        let mut spec = json!({"containers": containers, "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"});
        if !volumes.is_empty() {
            spec["volumes"] = Value::Array(volumes);
        }
        if let Some(p) = self.priority {
            spec["priorityClassName"] = json!(p);
        }
        spec["serviceAccountName"] = json!(self.service_account.as_deref().unwrap_or("default"));
        spec
    }
}

fn suffix(i: usize) -> String {
    if i == 0 {
        String::new()
    } else {
        format!("-{i}")
    }
}

/// Options of one PVC.
#[derive(Debug, Clone, Copy)]
struct Claim<'a> {
    size: &'a str,
    class: &'a str,
    access: &'a str,
    group: Option<&'a str>,
    bound: bool,
}

impl Default for Claim<'_> {
    fn default() -> Self {
        Claim { size: "10Gi", class: "standard", access: "ReadWriteOnce", group: None, bound: true }
    }
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() { A[(n >> shift) as usize & 63] as char } else { '=' });
        }
    }
    out
}

/// Kubernetes' name-suffix alphabet (no vowels, no confusable digits).
fn k8s_suffix(mut h: u64, len: usize) -> String {
    const A: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| {
            let c = A[(h % A.len() as u64) as usize] as char;
            h = mix64(h);
            c
        })
        .collect()
}

/// The generator's state.
struct Gen {
    seed: u64,
    rng: Rng,
    cluster: FakeCluster,
    resource_version: u64,
    /// (namespace, name) of every workload and single object name handed out.
    used: HashSet<(String, String)>,
    ca_cert: String,
    /// Include the deliberate faults.
    faults: bool,
}

impl Gen {
    fn new(seed: u64) -> Self {
        let mut cluster = FakeCluster::new();
        for rt in demo_resource_types() {
            cluster.add_resource(rt);
        }
        let mut rng = Rng::new(seed);
        let der: Vec<u8> = (0..120).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
        let b64 = base64(&der);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).filter_map(|c| std::str::from_utf8(c).ok()).collect();
        let ca_cert = format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"));
        Gen { seed, rng, cluster, resource_version: 1000, used: HashSet::new(), ca_cert, faults: true }
    }

    fn count(&self) -> usize {
        self.cluster.object_count()
    }

    fn hash(&self, what: &str) -> u64 {
        hash_str(self.seed, what)
    }

    /// A uid-like string derived from seed, kind, namespace and name.
    fn uid(&self, kind: &str, ns: &str, name: &str) -> String {
        let a = self.hash(&format!("{kind}/{ns}/{name}"));
        let b = mix64(a ^ 0xA5A5_A5A5_A5A5_A5A5);
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// A name not yet used in `ns`: `base`, else `base-2`, `base-3`, …
    fn claim(&mut self, ns: &str, base: &str) -> String {
        let mut name = base.to_string();
        let mut n = 2;
        while !self.used.insert((ns.to_string(), name.clone())) {
            name = format!("{base}-{n}");
            n += 1;
        }
        name
    }

    /// Adds an object: `meta` (labels, annotations, ownerReferences) is merged into generated
    /// metadata, `body`'s fields become top-level fields.
    fn add(&mut self, gr: Gr, kind: &str, ns: Option<&str>, name: &str, meta: Value, body: Value) {
        self.resource_version += 1;
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        if let Some(ns) = ns {
            m.insert("namespace".into(), json!(ns));
        }
        m.insert("uid".into(), json!(self.uid(kind, ns.unwrap_or(""), name)));
        m.insert("resourceVersion".into(), json!(self.resource_version.to_string()));
        m.insert("creationTimestamp".into(), json!(CREATION_TIMESTAMP));
        if let Value::Object(extra) = meta {
            m.extend(extra.into_iter().filter(|(_, v)| v.as_object().is_none_or(|o| !o.is_empty())));
        }
        let mut obj = Map::new();
        obj.insert("metadata".into(), Value::Object(m));
        if let Value::Object(body) = body {
            obj.extend(body);
        }
        self.cluster.add_object(GroupResource::new(gr.0, gr.1), Value::Object(obj));
    }

    fn owner(&self, kind: &str, ns: &str, name: &str) -> Value {
        json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": self.uid(kind, ns, name),
                "controller": true, "blockOwnerDeletion": true}])
    }

    fn ip(&mut self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.rng.below(256), self.rng.range(2, 254))
    }

    /// Text of `lo..=hi` bytes, deterministic from the generator's stream.
    fn blob(&mut self, lo: u64, hi: u64) -> String {
        let target = self.rng.range(lo, hi) as usize;
        let mut s = String::with_capacity(target + 64);
        let mut i = 0;
        while s.len() < target {
            let _ = writeln!(s, "setting_{i:03} = {:016x}{:016x}", self.rng.next_u64(), self.rng.next_u64());
            i += 1;
        }
        s
    }

    // --- objects -------------------------------------------------------------------------------

    fn cluster_wide(&mut self) {
        for (name, provisioner, default) in [
            ("standard", "pd.csi.storage.gke.io", true),
            ("fast-ssd", "pd.csi.storage.gke.io", false),
            ("nfs-client", "cluster.local/nfs-subdir-external-provisioner", false),
        ] {
            let ann = if default { json!({"storageclass.kubernetes.io/is-default-class": "true"}) } else { json!({}) };
            self.add(
                STORAGECLASSES,
                "StorageClass",
                None,
                name,
                json!({"annotations": ann}),
                json!({"provisioner": provisioner, "reclaimPolicy": "Delete",
                       "volumeBindingMode": "WaitForFirstConsumer", "allowVolumeExpansion": true}),
            );
        }
        self.add(
            SNAPSHOTCLASSES,
            "VolumeSnapshotClass",
            None,
            "pd-snapshots",
            json!({"annotations": {blockwise_engine::snapshot::DEFAULT_CLASS_ANNOTATION: "true"}}),
            json!({"driver": DEMO_CSI_DRIVER, "deletionPolicy": "Delete", "parameters": {"storage-locations": "europe-west1"}}),
        );
        self.add(
            GROUPSNAPSHOTCLASSES,
            "VolumeGroupSnapshotClass",
            None,
            "pd-group-snapshots",
            json!({"labels": {blockwise_engine::snapshot::GROUP_CLASS_LABEL: "true"}}),
            json!({"driver": DEMO_CSI_DRIVER, "deletionPolicy": "Delete"}),
        );
        for (name, value, desc) in [
            ("high-priority", 1_000_000, "Stateful services that must not be preempted."),
            ("batch-low", 100, "Batch work that may wait."),
        ] {
            self.add(
                PRIORITYCLASSES,
                "PriorityClass",
                None,
                name,
                json!({}),
                json!({"value": value, "globalDefault": false, "description": desc,
                       "preemptionPolicy": "PreemptLowerPriority"}),
            );
        }
        self.rbac(
            "cluster-admin",
            "cluster-admins",
            json!([{"kind": "Group", "name": "system:masters",
            "apiGroup": "rbac.authorization.k8s.io"}]),
        );
    }

    fn namespace(&mut self, ns: &str) {
        self.add(
            NAMESPACES,
            "Namespace",
            None,
            ns,
            json!({"labels": {"kubernetes.io/metadata.name": ns}}),
            json!({"spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        );
        self.used.insert((ns.to_string(), "default".into()));
        self.service_account(ns, "default");
        let ca = self.ca_cert.clone();
        self.add(CONFIGMAPS, "ConfigMap", Some(ns), "kube-root-ca.crt", json!({}), json!({"data": {"ca.crt": ca}}));
    }

    fn configmap(&mut self, ns: &str, name: &str, app: Option<&str>) {
        let data = self.blob(1024, 4096);
        let labels = app.map_or(json!({}), |a| json!({"app": a}));
        self.add(
            CONFIGMAPS,
            "ConfigMap",
            Some(ns),
            name,
            json!({"labels": labels}),
            json!({"data": {"app.properties": data}}),
        );
    }

    fn secret(&mut self, ns: &str, name: &str, app: Option<&str>) {
        let data = base64(self.blob(768, 3072).as_bytes());
        let labels = app.map_or(json!({}), |a| json!({"app": a}));
        self.add(
            SECRETS,
            "Secret",
            Some(ns),
            name,
            json!({"labels": labels}),
            json!({"type": "Opaque", "data": {"token": data}}),
        );
    }

    fn service(&mut self, ns: &str, app: &str, port: u16, headless: bool) {
        let ip = if headless { "None".to_string() } else { self.ip("10.96") };
        self.add(
            SERVICES,
            "Service",
            Some(ns),
            app,
            json!({"labels": {"app": app}}),
            json!({"spec": {"type": "ClusterIP", "clusterIP": ip, "selector": {"app": app},
                            "ports": [{"name": "main", "port": port, "targetPort": port, "protocol": "TCP"}]}}),
        );
    }

    fn service_account(&mut self, ns: &str, name: &str) {
        self.add(SERVICEACCOUNTS, "ServiceAccount", Some(ns), name, json!({}), json!({}));
    }

    /// A ClusterRole and a ClusterRoleBinding granting it to `subjects`.
    fn rbac(&mut self, role: &str, binding: &str, subjects: Value) {
        let rules = if role == "cluster-admin" {
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}])
        } else {
            json!([{"apiGroups": [""], "resources": ["pods", "configmaps", "services"], "verbs": ["get", "list", "watch"]}])
        };
        self.add(CLUSTERROLES, "ClusterRole", None, role, json!({}), json!({"rules": rules}));
        self.add(
            CRBS,
            "ClusterRoleBinding",
            None,
            binding,
            json!({}),
            json!({"roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": role}, "subjects": subjects}),
        );
    }

    /// A ServiceAccount bound cluster-wide to a ClusterRole of its own.
    fn bound_service_account(&mut self, ns: &str, sa: &str, role: &str) {
        self.service_account(ns, sa);
        self.rbac(role, role, json!([{"kind": "ServiceAccount", "name": sa, "namespace": ns}]));
    }

    /// A PVC and, when bound, its dynamically provisioned PV (`pvc-<claim uid>`).
    fn pvc(&mut self, ns: &str, name: &str, app: &str, c: Claim<'_>) {
        let mut labels = json!({"app": app});
        if let Some(g) = c.group {
            labels[VOLUME_GROUP_LABEL] = json!(g);
        }
        let claim_uid = self.uid("PersistentVolumeClaim", ns, name);
        let pv = format!("pvc-{claim_uid}");
        let mut spec = json!({"accessModes": [c.access], "storageClassName": c.class, "volumeMode": "Filesystem",
                              "resources": {"requests": {"storage": c.size}}});
        let status = if c.bound {
            spec["volumeName"] = json!(pv);
            json!({"phase": "Bound", "accessModes": [c.access], "capacity": {"storage": c.size}})
        } else {
            json!({"phase": "Pending"})
        };
        self.add(
            PVCS,
            "PersistentVolumeClaim",
            Some(ns),
            name,
            json!({"labels": labels}),
            json!({"spec": spec, "status": status}),
        );
        if c.bound {
            let handle = format!("projects/demo/zones/europe-west1-b/disks/{pv}");
            self.add(
                PVS,
                "PersistentVolume",
                None,
                &pv,
                json!({"annotations": {"pv.kubernetes.io/provisioned-by": "pd.csi.storage.gke.io"}}),
                json!({
                    "spec": {"accessModes": [c.access], "capacity": {"storage": c.size},
                             "persistentVolumeReclaimPolicy": "Delete", "storageClassName": c.class,
                             "volumeMode": "Filesystem",
                             "csi": {"driver": "pd.csi.storage.gke.io", "volumeHandle": handle, "fsType": "ext4"},
                             "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns,
                                          "name": name, "uid": claim_uid}},
                    "status": {"phase": "Bound"}
                }),
            );
        }
    }

    /// One pod; `owner` is the (kind, name) of its controller.
    #[allow(clippy::too_many_arguments)]
    fn pod(
        &mut self,
        ns: &str,
        name: &str,
        app: &str,
        owner: Option<(&str, &str)>,
        tpl: &Template,
        claims: &[String],
        phase: &str,
        extra_label: (&str, &str),
    ) {
        let mut labels = json!({"app": app});
        if !extra_label.0.is_empty() {
            labels[extra_label.0] = json!(extra_label.1);
        }
        let mut meta = json!({"labels": labels, "annotations": tpl.hook.annotations()});
        if let Some((kind, owner_name)) = owner {
            meta["ownerReferences"] = self.owner(kind, ns, owner_name);
        }
        let mut spec = tpl.spec(claims);
        if let Some(p) = tpl.priority {
            spec["priority"] = json!(if p == "high-priority" { 1_000_000 } else { 100 });
        }
        let status = match phase {
            "Running" => {
                spec["nodeName"] = json!(format!("node-{}", self.rng.range(1, 6)));
                json!({"phase": "Running", "podIP": self.ip("10.244"), "hostIP": self.ip("10.128"),
                       "startTime": CREATION_TIMESTAMP,
                       "conditions": [{"type": "Ready", "status": "True"}]})
            }
            "Pending" => json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                "reason": "Unschedulable", "message": "0/6 nodes are available: insufficient memory."}]}),
            other => {
                spec["nodeName"] = json!(format!("node-{}", self.rng.range(1, 6)));
                json!({"phase": other, "startTime": CREATION_TIMESTAMP})
            }
        };
        self.add(PODS, "Pod", Some(ns), name, meta, json!({"spec": spec, "status": status}));
    }

    fn template_value(&self, app: &str, tpl: &Template) -> Value {
        json!({"metadata": {"labels": {"app": app}, "annotations": tpl.hook.annotations()}, "spec": tpl.spec(&tpl.claims)})
    }

    /// A Deployment, its ReplicaSet (and maybe an old, scaled-down one) and one pod per phase.
    fn deployment(&mut self, ns: &str, app: &str, tpl: &Template, phases: &[&str], old_rs: bool) {
        let replicas = phases.len();
        let template = self.template_value(app, tpl);
        self.add(
            DEPLOYMENTS,
            "Deployment",
            Some(ns),
            app,
            json!({"labels": {"app": app}, "annotations": {"deployment.kubernetes.io/revision": if old_rs { "2" } else { "1" }}}),
            json!({"spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}}, "template": template},
                   "status": {"replicas": replicas, "observedGeneration": 1}}),
        );
        let mut revisions = vec![(self.hash(&format!("rs/{ns}/{app}")), replicas)];
        if old_rs {
            revisions.push((self.hash(&format!("rs-old/{ns}/{app}")), 0));
        }
        for (h, n) in revisions {
            let hash = k8s_suffix(h, 10);
            let rs = format!("{app}-{hash}");
            let meta = json!({"labels": {"app": app, "pod-template-hash": hash},
                              "ownerReferences": self.owner("Deployment", ns, app)});
            let template = self.template_value(app, tpl);
            self.add(
                REPLICASETS,
                "ReplicaSet",
                Some(ns),
                &rs,
                meta,
                json!({"spec": {"replicas": n, "selector": {"matchLabels": {"app": app, "pod-template-hash": hash}},
                                "template": template},
                       "status": {"replicas": n}}),
            );
            for (i, phase) in phases.iter().take(n).enumerate() {
                let pod = format!("{rs}-{}", k8s_suffix(self.hash(&format!("pod/{ns}/{rs}/{i}")), 5));
                self.pod(
                    ns,
                    &pod,
                    app,
                    Some(("ReplicaSet", &rs)),
                    tpl,
                    &tpl.claims,
                    phase,
                    ("pod-template-hash", &hash),
                );
            }
        }
    }

    /// A StatefulSet with `replicas` Running pods, each with its own bound `data-<app>-<i>` claim,
    /// and its headless Service.
    fn statefulset(&mut self, ns: &str, app: &str, tpl: &Template, replicas: usize, claim: Claim<'_>, port: u16) {
        let template = self.template_value(app, tpl);
        self.add(
            STATEFULSETS,
            "StatefulSet",
            Some(ns),
            app,
            json!({"labels": {"app": app}}),
            json!({"spec": {"replicas": replicas, "serviceName": app, "selector": {"matchLabels": {"app": app}},
                            "template": template,
                            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                                "spec": {"accessModes": [claim.access], "storageClassName": claim.class,
                                         "resources": {"requests": {"storage": claim.size}}}}]},
                   "status": {"replicas": replicas, "readyReplicas": replicas}}),
        );
        let revision = format!("{app}-{}", k8s_suffix(self.hash(&format!("sts/{ns}/{app}")), 10));
        for i in 0..replicas {
            let pvc = format!("data-{app}-{i}");
            self.pvc(ns, &pvc, app, claim);
            let mut claims = vec![pvc];
            claims.extend(tpl.claims.iter().cloned());
            let pod = format!("{app}-{i}");
            self.pod(
                ns,
                &pod,
                app,
                Some(("StatefulSet", app)),
                tpl,
                &claims,
                "Running",
                ("controller-revision-hash", &revision),
            );
        }
        self.service(ns, app, port, true);
    }

    // --- the fixed core ------------------------------------------------------------------------

    /// `shop`: postgres (3 hooked pods, 10s timeout), the `mysql` volume group, the RWX claim
    /// shared by `web`, an unbound claim with its Pending pod, a Succeeded pod, a bound SA.
    fn core_shop(&mut self, ns: &str) {
        for name in ["postgres", "mysql", "web", "batch-import", "db-migrate", "postgres-operator"] {
            self.used.insert((ns.to_string(), name.into()));
        }
        let mut pg = Template::new(&[
            ("postgres", "postgres:16.3"),
            ("metrics", "quay.io/prometheuscommunity/postgres-exporter:v0.15.0"),
        ]);
        pg.hook = Hook::Freeze { container: "postgres", timeout: Some("10s") };
        pg.priority = Some("high-priority");
        pg.service_account = Some("postgres-operator".into());
        self.statefulset(ns, "postgres", &pg, 3, Claim { size: "20Gi", class: "fast-ssd", ..Claim::default() }, 5432);
        self.configmap(ns, "postgres-config", Some("postgres"));
        self.secret(ns, "postgres-credentials", Some("postgres"));
        self.bound_service_account(ns, "postgres-operator", "postgres-operator");

        let group = Claim { group: Some("mysql"), ..Claim::default() };
        self.pvc(ns, "mysql-data", "mysql", Claim { size: "50Gi", ..group });
        self.pvc(ns, "mysql-binlog", "mysql", group);
        let mut my = Template::new(&[("mysql", "mysql:8.4")]);
        my.claims = vec!["mysql-data".into(), "mysql-binlog".into()];
        my.hook = Hook::Freeze { container: "mysql", timeout: None };
        self.deployment(ns, "mysql", &my, &["Running"], false);
        self.service(ns, "mysql", 3306, false);
        self.secret(ns, "mysql-credentials", Some("mysql"));

        let rwx = Claim { size: "100Gi", class: "nfs-client", access: "ReadWriteMany", ..Claim::default() };
        self.pvc(ns, "shared-assets", "web", rwx);
        let mut web = Template::new(&[("nginx", "nginx:1.27"), ("log-shipper", "fluent/fluent-bit:3.0")]);
        web.claims = vec!["shared-assets".into()];
        self.deployment(ns, "web", &web, &["Running", "Running", "Running", "Pending"], true);
        self.service(ns, "web", 80, false);
        self.configmap(ns, "web-config", Some("web"));

        self.pvc(ns, "scratch-pending", "batch-import", Claim { bound: false, class: "fast-ssd", ..Claim::default() });
        let mut batch = Template::new(&[("importer", "registry.example.com/batch-import:2.1.0")]);
        batch.priority = Some("batch-low");
        self.pod(ns, "batch-import", "batch-import", None, &batch, &["scratch-pending".into()], "Pending", ("", ""));
        let migrate = Template::new(&[("migrate", "registry.example.com/db-migrate:5.0.2")]);
        let name = format!("db-migrate-{}", k8s_suffix(self.hash("db-migrate"), 5));
        self.pod(ns, &name, "db-migrate", None, &migrate, &[], "Succeeded", ("", ""));
    }

    /// `payments`: redis (3 hooked pods), the `kafka` volume group (3 claims, 2 pods, one hooked),
    /// the failing `reporting-0`, a bound SA.
    fn core_payments(&mut self, ns: &str) {
        for name in ["redis", "kafka-broker", "kafka-indexer", "reporting", "monitoring-agent"] {
            self.used.insert((ns.to_string(), name.into()));
        }
        let mut redis = Template::new(&[("redis", "redis:7.2")]);
        redis.hook = Hook::Freeze { container: "redis", timeout: None };
        redis.priority = Some("high-priority");
        self.statefulset(ns, "redis", &redis, 3, Claim { size: "5Gi", ..Claim::default() }, 6379);

        let group = Claim { group: Some("kafka"), size: "30Gi", ..Claim::default() };
        for c in ["kafka-log-a", "kafka-log-b", "kafka-index"] {
            self.pvc(ns, c, "kafka", group);
        }
        let mut broker =
            Template::new(&[("kafka", "apache/kafka:3.7.0"), ("jmx-exporter", "bitnami/jmx-exporter:1.0.1")]);
        broker.claims = vec!["kafka-log-a".into(), "kafka-log-b".into()];
        broker.hook = Hook::Freeze { container: "kafka", timeout: Some("10s") };
        self.deployment(ns, "kafka-broker", &broker, &["Running"], false);
        let mut indexer = Template::new(&[("indexer", "registry.example.com/kafka-indexer:0.9.1")]);
        indexer.claims = vec!["kafka-index".into()];
        self.deployment(ns, "kafka-indexer", &indexer, &["Running"], false);

        let mut reporting = Template::new(&[("reporting", "registry.example.com/reporting:3.3.0")]);
        reporting.hook = if self.faults {
            Hook::Failing { container: "reporting" }
        } else {
            Hook::Freeze { container: "reporting", timeout: None }
        };
        self.statefulset(ns, "reporting", &reporting, 1, Claim::default(), 8080);
        self.bound_service_account(ns, "monitoring-agent", "monitoring-reader");
    }

    // --- generic units (at most UNIT_MAX objects each) -----------------------------------------

    fn app_name(&mut self, ns: &str) -> String {
        let base = *self.rng.pick(&APPS).unwrap_or(&"app");
        self.claim(ns, base)
    }

    fn app_template(&mut self, app: &str) -> Template {
        let image = format!("registry.example.com/{app}:1.{}.{}", self.rng.below(20), self.rng.below(10));
        let mut tpl = Template::new(&[("app", &image)]);
        if self.rng.chance(0.4) {
            tpl.containers.push(("istio-proxy".into(), "docker.io/istio/proxyv2:1.22.1".into()));
        }
        tpl.priority = match self.rng.below(10) {
            0 | 1 => Some("high-priority"),
            2 => Some("batch-low"),
            _ => None,
        };
        tpl
    }

    /// Deployment + 1-2 ReplicaSets + 1-3 pods + Service + ConfigMap + Secret + bound SA: ≤ 12.
    fn deployment_unit(&mut self, ns: &str) {
        let app = self.app_name(ns);
        let mut tpl = self.app_template(&app);
        if self.rng.chance(0.25) {
            let role = format!("{ns}-{app}-reader");
            self.bound_service_account(ns, &app, &role);
            tpl.service_account = Some(app.clone());
        }
        let replicas = self.rng.range(1, 3) as usize;
        let phases: Vec<&str> =
            (0..replicas).map(|_| if self.rng.chance(0.06) { "Pending" } else { "Running" }).collect();
        let old_rs = self.rng.chance(0.3);
        self.deployment(ns, &app, &tpl, &phases, old_rs);
        if self.rng.chance(0.8) {
            self.service(ns, &app, 8080, false);
        }
        self.configmap(ns, &format!("{app}-config"), Some(&app));
        if self.rng.chance(0.6) {
            self.secret(ns, &format!("{app}-secret"), Some(&app));
        }
    }

    /// StatefulSet + 1-3 pods, claims and volumes + headless Service + ConfigMap: ≤ 12.
    fn statefulset_unit(&mut self, ns: &str) {
        let app = self.app_name(ns);
        let tpl = self.app_template(&app);
        let replicas = self.rng.range(1, 3) as usize;
        let size = ["1Gi", "5Gi", "10Gi", "20Gi"][self.rng.below(4) as usize];
        let class = if self.rng.chance(0.3) { "fast-ssd" } else { "standard" };
        self.statefulset(ns, &app, &tpl, replicas, Claim { size, class, ..Claim::default() }, 9000);
        if self.rng.chance(0.5) {
            self.configmap(ns, &format!("{app}-config"), Some(&app));
        }
    }

    /// 1-3 Succeeded pods of a finished batch job + its ConfigMap: ≤ 4.
    fn job_unit(&mut self, ns: &str) {
        let app = self.app_name(ns);
        let mut tpl = self.app_template(&app);
        tpl.priority = Some("batch-low");
        for i in 0..self.rng.range(1, 3) {
            let name = format!("{app}-job-{}", k8s_suffix(self.hash(&format!("job/{ns}/{app}/{i}")), 5));
            self.pod(ns, &name, &app, None, &tpl, &[], "Succeeded", ("job-name", &app));
        }
        self.configmap(ns, &format!("{app}-config"), Some(&app));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::tests::block_on;
    use blockwise_engine::hooks::{resolve_pod_hooks, HookPhase, OnError};
    use blockwise_engine::item::Item;
    use blockwise_engine::ports::Cluster;
    use std::collections::{BTreeMap, BTreeSet};

    fn items(c: &FakeCluster) -> Vec<Item> {
        let rts: BTreeMap<GroupResource, ResourceType> =
            c.resources().iter().map(|rt| (rt.gr.clone(), rt.clone())).collect();
        c.objects().enumerate().map(|(i, (gr, v))| Item::from_value(&rts[gr], i, v.clone()).unwrap()).collect()
    }

    fn of<'a>(items: &'a [Item], resource: &str) -> impl Iterator<Item = &'a Item> + 'a {
        let resource = resource.to_string();
        items.iter().filter(move |i| i.key.resource() == resource)
    }

    fn claims(pod: &Item) -> Vec<String> {
        blockwise_engine::grouping::pod_claims(pod)
    }

    fn running(pod: &Item) -> bool {
        pod.str_at("/status/phase") == Some("Running")
    }

    fn dump(c: &FakeCluster) -> String {
        serde_json::to_string(&c.objects().collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn same_seed_same_cluster() {
        let a = demo_cluster(DEMO_OBJECTS_DEFAULT, DEMO_SEED);
        assert_eq!(dump(&a), dump(&demo_cluster(DEMO_OBJECTS_DEFAULT, DEMO_SEED)));
        assert_ne!(dump(&a), dump(&demo_cluster(DEMO_OBJECTS_DEFAULT, DEMO_SEED + 1)));
    }

    #[test]
    fn size_tracks_the_request_and_tiny_sizes_work() {
        for (n, nss) in [(2000, 10), (300, 4), (200, 3), (5000, 16)] {
            let c = demo_cluster(n, 7);
            let got = c.object_count();
            assert!(got.abs_diff(n) * 10 <= n, "{n} requested, {got} generated");
            assert_eq!(of(&items(&c), "namespaces").count(), nss, "{n}");
        }
        let core = demo_cluster(0, 1).object_count();
        assert!((50..150).contains(&core), "core is {core} objects");
        for n in (0..130).step_by(7) {
            assert!(demo_cluster(n, n as u64).object_count() >= n.min(core));
        }
    }

    #[test]
    fn every_object_is_valid_and_references_resolve() {
        for (n, seed) in [(2000, DEMO_SEED), (300, 3), (0, 0)] {
            let c = demo_cluster(n, seed);
            let items = items(&c);
            let keys: BTreeSet<&ItemKey> = items.iter().map(|i| &i.key).collect();
            let uids: BTreeSet<&str> = items.iter().map(|i| i.str_at("/metadata/uid").unwrap_or_default()).collect();
            assert_eq!(uids.len(), items.len(), "uids are unique");
            let by_uid: BTreeMap<&str, &Item> =
                items.iter().map(|i| (i.str_at("/metadata/uid").unwrap_or_default(), i)).collect();
            for it in &items {
                assert!(it.str_at("/metadata/resourceVersion").is_some_and(|v| !v.is_empty()));
                assert_eq!(it.str_at("/metadata/creationTimestamp"), Some(CREATION_TIMESTAMP));
                if let Some(ns) = &it.key.namespace() {
                    assert!(keys.contains(&ItemKey::cluster("", "namespaces", ns)), "{}", it.key);
                }
                for o in
                    it.object().pointer("/metadata/ownerReferences").and_then(Value::as_array).into_iter().flatten()
                {
                    let owner = by_uid[o["uid"].as_str().unwrap()];
                    assert_eq!(owner.key.name(), o["name"].as_str().unwrap());
                }
            }
            for pod in of(&items, "pods") {
                let ns = pod.key.namespace().unwrap();
                for claim in claims(pod) {
                    assert!(keys.contains(&ItemKey::namespaced("", "persistentvolumeclaims", ns, &claim)), "{claim}");
                }
                if let Some(p) = pod.str_at("/spec/priorityClassName") {
                    assert!(keys.contains(&ItemKey::cluster("scheduling.k8s.io", "priorityclasses", p)));
                }
                let mut warnings = Vec::new();
                for h in resolve_pod_hooks(pod, &[], &mut warnings) {
                    assert_eq!(h.invalid, None, "{}", pod.key);
                }
                assert!(warnings.is_empty(), "{warnings:?}");
            }
            for pvc in of(&items, "persistentvolumeclaims").filter(|p| blockwise_engine::grouping::pvc_bound(p)) {
                let pv = c.object(&ItemKey::cluster("", "persistentvolumes", pvc.str_at("/spec/volumeName").unwrap()));
                let pv = pv.expect("bound PVC has its PV");
                assert_eq!(pv["spec"]["claimRef"]["name"].as_str(), Some(pvc.key.name()));
                assert_eq!(pv["spec"]["claimRef"]["uid"].as_str(), pvc.str_at("/metadata/uid"));
            }
        }
    }

    #[test]
    fn has_every_feature_the_engine_cares_about() {
        for (n, seed) in [(2000, DEMO_SEED), (300, 11), (0, 5)] {
            let c = demo_cluster(n, seed);
            let items = items(&c);
            let pods: Vec<&Item> = of(&items, "pods").collect();
            let hooked: Vec<_> = pods
                .iter()
                .map(|p| (p, resolve_pod_hooks(p, &[], &mut Vec::new())))
                .filter(|(_, h)| !h.is_empty())
                .collect();
            assert_eq!(hooked.len(), 9, "8 freeze pods + the failing one");
            let failing: Vec<_> = hooked
                .iter()
                .filter(|(_, hs)| hs.iter().any(|h| h.phase == HookPhase::Pre && h.command.last().unwrap() == "exit 1"))
                .collect();
            assert_eq!(failing.len(), 1);
            let (pod, hooks) = failing[0];
            assert_eq!(pod.key, demo_failing_hook_pod());
            assert!(hooks.iter().any(|h| h.phase == HookPhase::Pre && h.on_error == OnError::Fail));
            assert!(hooks.iter().any(|h| h.phase == HookPhase::Post && h.command[1] == "--unfreeze"));
            assert!(!claims(pod).is_empty(), "failing pod mounts a PVC");
            assert!(hooked.iter().any(|(_, hs)| hs.iter().any(|h| h.timeout_ms == 10_000)));
            assert!(hooked.iter().filter(|(p, _)| claims(p).len() >= 2).count() >= 2, "volume-group pods hooked");

            let pvcs: Vec<&Item> = of(&items, "persistentvolumeclaims").collect();
            let mut groups: BTreeMap<(String, String), usize> = BTreeMap::new();
            for p in &pvcs {
                if let Some(g) = p.labels().get(VOLUME_GROUP_LABEL) {
                    *groups.entry((p.key.namespace().map(str::to_string).unwrap(), g.clone())).or_default() += 1;
                    let mounted = pods.iter().any(|pod| claims(pod).iter().any(|c| c == p.key.name()));
                    assert!(mounted, "{} is mounted", p.key);
                }
            }
            assert_eq!(groups.len(), 2);
            assert!(groups.values().all(|&n| (2..=3).contains(&n)));
            let rwx = pvcs
                .iter()
                .find(|p| p.object().pointer("/spec/accessModes/0").and_then(Value::as_str) == Some("ReadWriteMany"))
                .expect("an RWX claim");
            let users = pods.iter().filter(|p| running(p) && claims(p).iter().any(|c| c == rwx.key.name())).count();
            assert!(users >= 2, "{users} Running pods share the RWX claim");
            assert!(pvcs
                .iter()
                .any(|p| p.str_at("/status/phase") == Some("Pending") && p.str_at("/spec/volumeName").is_none()));
            assert!(pods.iter().any(|p| p.str_at("/status/phase") == Some("Pending")));
            assert!(pods.iter().any(|p| p.str_at("/status/phase") == Some("Succeeded")));
            let sa_subjects = of(&items, "clusterrolebindings")
                .flat_map(|crb| crb.object()["subjects"].as_array().cloned().unwrap_or_default())
                .filter(|s| s["kind"] == "ServiceAccount")
                .filter(|s| {
                    let key = ItemKey::namespaced(
                        "",
                        "serviceaccounts",
                        s["namespace"].as_str().unwrap(),
                        s["name"].as_str().unwrap(),
                    );
                    c.object(&key).is_some()
                })
                .count();
            assert!(sa_subjects >= 2);
            assert!(pods.iter().any(|p| p.str_at("/spec/priorityClassName").is_some()));
        }
    }

    #[test]
    fn demo_hooks_exec_as_expected() {
        let c = demo_cluster(300, DEMO_SEED);
        let fail = demo_failing_hook_pod();
        let cmd = |s: &str| serde_json::from_str::<Vec<String>>(s).unwrap();
        let r = block_on(c.exec(&fail, "reporting", &cmd(FAILING_PRE_COMMAND))).unwrap();
        assert_eq!(r.exit_code, 1);
        let pg = ItemKey::namespaced("", "pods", "shop", "postgres-0");
        assert_eq!(block_on(c.exec(&pg, "postgres", &cmd(FREEZE_COMMAND))).unwrap().exit_code, 0);
        assert_eq!(block_on(c.exec(&pg, "postgres", &cmd(UNFREEZE_COMMAND))).unwrap().exit_code, 0);
        assert!(block_on(c.exec(&pg, "nope", &cmd(FREEZE_COMMAND))).is_err());
        assert_eq!(c.exec_records().len(), 4);
        assert_eq!(block_on(c.discover()).unwrap().len(), 21, "15 built-in resources and the 6 snapshot CRDs");
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
