//! Generated clusters for simulation: a small structured [`Model`], its objects, and the oracles.
//!
//! A model is a list of plain records (pods, claims, service accounts, …) plus the backup spec's
//! knobs and the world's faults, rather than JSON, so it can be generated from a seed, shrunk by
//! deleting records, printed readably, and — the point — judged against: [`Model::hooks`] says
//! which hooks each pod has per phase (annotation over spec, defaults, Running only, invalid ones)
//! and [`Model::oracle_blocks`] which items the backup holds and how they group, both written from
//! DESIGN §3–§4 over the model's structure, sharing no code with the engine.

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::hooks::{HookPhase, OnError};
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::spec::BackupSpec;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use crate::cluster::HookFault;
use crate::cluster::{Change, ClusterFaults};
pub use crate::csi::CsiFault;
use crate::csi::{Behaviour, CsiConfig, Timing};
use crate::fake::FakeCluster;
use crate::rng::Rng;

/// Namespaces a model can use.
pub const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];
/// The timeout every generated hook has (`2s`).
pub const HOOK_TIMEOUT_MS: u64 = 2_000;
/// The label that excludes an object from backups.
pub const EXCLUDE_LABEL: &str = "velero.io/exclude-from-backup";

/// A pod's hook annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookM {
    /// onError of the pre-hook annotation.
    pub on_error: OnError,
    /// Whether the on-error annotation is written; without it the default (Fail) applies, so
    /// `on_error` is then Fail.
    #[serde(default = "yes")]
    pub on_error_set: bool,
    /// The pre command annotation is malformed JSON (the hook is invalid).
    pub malformed: bool,
    /// Has a pre-hook annotation.
    pub pre: bool,
    /// Has a post-hook annotation.
    pub post: bool,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodM {
    /// Namespace index.
    pub ns: usize,
    /// Name.
    pub name: String,
    /// `status.phase`.
    pub phase: String,
    /// Claim names mounted (may name claims that do not exist).
    pub claims: Vec<String>,
    /// `app` label value.
    pub app: u8,
    /// Annotation hooks.
    pub hook: Option<HookM>,
    /// PriorityClass name.
    pub priority_class: Option<String>,
    /// Labelled `velero.io/exclude-from-backup=true`.
    pub excluded: bool,
}

/// A PersistentVolumeClaim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvcM {
    /// Namespace index.
    pub ns: usize,
    /// Name.
    pub name: String,
    /// Bound to PV `pv-<ns>-<name>` (which exists unless `pv_missing`).
    pub bound: bool,
    /// The PV was deleted (the engine fetches it and finds nothing).
    pub pv_missing: bool,
    /// Volume group label value.
    pub group: Option<u8>,
    /// Being deleted.
    pub deleting: bool,
    /// `app` label value (so a label selector can pick the claim itself).
    #[serde(default)]
    pub app: Option<u8>,
    /// Its volume is not a CSI volume (no snapshot is taken).
    #[serde(default)]
    pub not_csi: bool,
}

/// The cluster's CSI snapshot support. The default (older models) serves no snapshot API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsiM {
    /// The snapshot CRDs are served.
    pub crds: bool,
    /// VolumeGroupSnapshots are served.
    pub groups: bool,
    /// A VolumeSnapshotClass of the driver exists.
    pub class: bool,
    /// A VolumeGroupSnapshotClass of the driver exists.
    pub group_class: bool,
}

/// What happens to one claim's volume in a backup, as DESIGN §4a says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeFate {
    /// Backed up as a manifest only (snapshots off, no snapshot API, not a CSI volume).
    Plain,
    /// Captured: by one VolumeGroupSnapshot of its volume group (`Some(group)`), or by a
    /// VolumeSnapshot of its own.
    Captured(Option<String>),
    /// The snapshot cannot be taken or fails: the claim is not in the archive.
    Fails,
}

/// A ServiceAccount bound by ClusterRoleBindings to ClusterRoles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaM {
    /// Namespace index.
    pub ns: usize,
    /// Name.
    pub name: String,
    /// ClusterRole names bound (one binding each).
    pub roles: Vec<String>,
}

/// The spec's hook entry: pods labelled `app=1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecHookM {
    /// onError of its hooks.
    pub on_error: OnError,
    /// Has a pre-hook (`spec-freeze`).
    pub pre: bool,
    /// Has a post-hook (`spec-thaw`).
    pub post: bool,
}

/// The world's faults, decided per seed and kept with the model so a shrunk failure shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldM {
    /// Per `<pod>/pre` or `<pod>/post`: how its hook exec misbehaves, on every attempt.
    pub hook_faults: BTreeMap<String, HookFault>,
    /// Per resource (`pods`, `persistentvolumes`, …): list calls answering 5xx before one works.
    pub list_unavailable: BTreeMap<String, u32>,
    /// Resources whose failing list calls answer 429 rather than 503.
    #[serde(default)]
    pub list_throttled: BTreeSet<String>,
    /// Objects whose get is forbidden, as `kind/name` (see [`Model::exclude_label`]).
    pub get_forbidden: BTreeSet<String>,
    /// Pods deleted at the first exec.
    pub delete_pods: Vec<String>,
    /// Pods whose containers are renamed at the first exec.
    pub rename_containers: Vec<String>,
    /// How the fake CSI driver misbehaves, per claim name or `group:<ns>/<group>`.
    #[serde(default)]
    pub snapshot_faults: BTreeMap<String, CsiFault>,
    /// Claims (or `group:<ns>/<group>`) whose snapshots are slow to cut (within the timeout).
    #[serde(default)]
    pub slow_snapshots: BTreeSet<String>,
}

/// A whole generated cluster, the spec to back it up with, and the world's faults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// Pods.
    pub pods: Vec<PodM>,
    /// Claims.
    pub pvcs: Vec<PvcM>,
    /// ServiceAccounts.
    pub sas: Vec<SaM>,
    /// ConfigMaps per namespace.
    pub configmaps: Vec<(usize, String)>,
    /// Custom resources (`widgets.example.com`) per namespace.
    pub widgets: Vec<(usize, String)>,
    /// Label selector `app=<n>`.
    pub selector_app: Option<u8>,
    /// Included namespaces (empty: all).
    pub include_ns: Vec<usize>,
    /// Excluded namespaces.
    #[serde(default)]
    pub exclude_ns: Vec<usize>,
    /// `--include-cluster-resources`.
    #[serde(default)]
    pub include_cluster_resources: Option<bool>,
    /// Exclude PersistentVolumes by resource filter.
    pub exclude_pvs: bool,
    /// Ordered pods: names in order (namespace ns0).
    pub ordered_pods: Vec<String>,
    /// A spec hook for pods with `app=1`.
    pub spec_hook: Option<SpecHookM>,
    /// Objects labelled with the exclude label, as `kind/name`: `pv/`, `pvc/`, `pc/`, `cm/`,
    /// `sa/`, `crb/`, `role/`, `widget/`.
    #[serde(default)]
    pub exclude_label: BTreeSet<String>,
    /// The world's faults.
    #[serde(default)]
    pub world: WorldM,
    /// The cluster's snapshot support.
    #[serde(default)]
    pub csi: CsiM,
    /// Velero's `snapshotVolumes`.
    #[serde(default)]
    pub snapshot_volumes: Option<bool>,
}

/// The CSI driver of generated volumes.
pub const CSI_DRIVER: &str = "csi.sim.blockwise.dev";
/// The simulated backups' uid.
pub const SIM_UID: &str = "5e1d0000-0000-4000-8000-00000000b10c";
/// The CSI snapshot timeout of simulated backups (virtual milliseconds).
pub const SIM_CSI_TIMEOUT_MS: u64 = 30_000;
/// The item-operation timeout of simulated backups (virtual milliseconds).
pub const SIM_READY_TIMEOUT_MS: u64 = 600_000;

/// The key of a volume group in [`WorldM::snapshot_faults`] and [`WorldM::slow_snapshots`].
pub fn group_fault_key(ns: usize, group: u8) -> String {
    format!("group:{}/g{group}", NAMESPACES[ns])
}

/// One hook as the model says it must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDef {
    /// The pod.
    pub pod: ItemKey,
    /// Pre or post.
    pub phase: HookPhase,
    /// The command exec'd.
    pub command: Vec<String>,
    /// Its failure policy.
    pub on_error: OnError,
    /// Its timeout.
    pub timeout_ms: u64,
    /// Whether it can run at all (a malformed annotation cannot).
    pub valid: bool,
}

/// What the world's records say the engine could see: listings that failed for good and gets
/// that failed. The oracle computes the backup over what was visible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visibility {
    /// `(resource, namespace)` of each listing whose last call failed.
    pub failed_lists: BTreeSet<(String, Option<String>)>,
    /// Objects whose get failed.
    pub failed_gets: BTreeSet<ItemKey>,
}

/// Resource types served by generated clusters.
pub fn model_resources() -> Vec<ResourceType> {
    vec![
        ResourceType::new("", "v1", "namespaces", "Namespace", false),
        ResourceType::new("", "v1", "pods", "Pod", true),
        ResourceType::new("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true),
        ResourceType::new("", "v1", "persistentvolumes", "PersistentVolume", false),
        ResourceType::new("", "v1", "serviceaccounts", "ServiceAccount", true),
        ResourceType::new("", "v1", "configmaps", "ConfigMap", true),
        ResourceType::new("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false),
        ResourceType::new("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
        ResourceType::new("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", false),
        ResourceType::new("example.com", "v1alpha1", "widgets", "Widget", true),
    ]
}

fn pv_name(ns: usize, claim: &str) -> String {
    format!("pv-{}-{claim}", NAMESPACES[ns])
}

/// The pre-hook command of a pod's annotation.
pub fn pre_command(pod: &str) -> Vec<String> {
    vec!["freeze".into(), pod.into()]
}

/// The post-hook command of a pod's annotation.
pub fn post_command(pod: &str) -> Vec<String> {
    vec!["unfreeze".into(), pod.into()]
}

/// The spec hook's pre command.
pub const SPEC_PRE: &str = "spec-freeze";
/// The spec hook's post command.
pub const SPEC_POST: &str = "spec-thaw";

/// The key of an object named `kind/name` in [`Model::exclude_label`] and [`WorldM::get_forbidden`].
fn tag_key(kind: &str, ns: Option<usize>, name: &str) -> ItemKey {
    let (group, resource) = match kind {
        "pv" => ("", "persistentvolumes"),
        "pvc" => ("", "persistentvolumeclaims"),
        "pc" => ("scheduling.k8s.io", "priorityclasses"),
        "cm" => ("", "configmaps"),
        "sa" => ("", "serviceaccounts"),
        "crb" => ("rbac.authorization.k8s.io", "clusterrolebindings"),
        "role" => ("rbac.authorization.k8s.io", "clusterroles"),
        _ => ("example.com", "widgets"),
    };
    match ns {
        Some(ns) => ItemKey::namespaced(group, resource, NAMESPACES[ns], name),
        None => ItemKey::cluster(group, resource, name),
    }
}

fn yes() -> bool {
    true
}

/// The key of a pod's hook in [`WorldM::hook_faults`].
pub fn hook_fault_key(pod: &str, phase: HookPhase) -> String {
    match phase {
        HookPhase::Pre => format!("{pod}/pre"),
        HookPhase::Post => format!("{pod}/post"),
    }
}

impl Model {
    /// A model with nothing in it.
    pub fn empty() -> Model {
        Model {
            pods: Vec::new(),
            pvcs: Vec::new(),
            sas: Vec::new(),
            configmaps: Vec::new(),
            widgets: Vec::new(),
            selector_app: None,
            include_ns: Vec::new(),
            exclude_ns: Vec::new(),
            include_cluster_resources: None,
            exclude_pvs: false,
            ordered_pods: Vec::new(),
            spec_hook: None,
            exclude_label: BTreeSet::new(),
            world: WorldM::default(),
            csi: CsiM::default(),
            snapshot_volumes: None,
        }
    }

    /// Generates a model of roughly `size` records from `rng` (no faults: see [`WorldM`]).
    pub fn generate(rng: &mut Rng, size: usize) -> Model {
        let size = size.max(1);
        let nns = rng.range(1, 3) as usize;
        let mut m = Model::empty();
        let npvc = rng.below(size as u64 / 2 + 2) as usize;
        for i in 0..npvc {
            m.pvcs.push(PvcM {
                ns: rng.below(nns as u64) as usize,
                name: format!("c{i}"),
                bound: rng.chance(0.8),
                pv_missing: rng.chance(0.05),
                group: rng.chance(0.25).then(|| rng.below(2) as u8),
                deleting: rng.chance(0.04),
                app: rng.chance(0.2).then(|| rng.below(3) as u8),
                not_csi: false,
            });
        }
        let npods = rng.range(1, size as u64 / 2 + 2) as usize;
        for i in 0..npods {
            let ns = rng.below(nns as u64) as usize;
            let same_ns: Vec<String> = m.pvcs.iter().filter(|c| c.ns == ns).map(|c| c.name.clone()).collect();
            let mut claims = Vec::new();
            for _ in 0..rng.below(3) {
                if let Some(c) = rng.pick(&same_ns) {
                    if !claims.contains(c) {
                        claims.push(c.clone());
                    }
                }
            }
            if rng.chance(0.04) {
                claims.push(format!("gone{i}"));
            }
            let phase = *rng.pick(&["Running", "Running", "Running", "Pending", "Succeeded"]).unwrap_or(&"Running");
            let hook = rng.chance(0.35).then(|| {
                let (pre, post) = match rng.below(6) {
                    0 => (true, false),
                    1 => (false, true),
                    _ => (true, true),
                };
                // A third of the hooks leave onError to its default, which is Fail (DESIGN §4).
                let on_error_set = !rng.chance(0.3);
                let on_error = if on_error_set && rng.chance(0.4) { OnError::Continue } else { OnError::Fail };
                HookM { on_error, on_error_set, malformed: rng.chance(0.05), pre, post }
            });
            m.pods.push(PodM {
                ns,
                name: format!("p{i}"),
                phase: phase.to_string(),
                claims,
                app: rng.below(3) as u8,
                hook,
                priority_class: rng.chance(0.2).then(|| format!("pc{}", rng.below(2))),
                excluded: rng.chance(0.04),
            });
        }
        for i in 0..rng.below(3) {
            let roles = (0..rng.below(3))
                .map(|_| format!("role{}", rng.below(3)))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            m.sas.push(SaM { ns: rng.below(nns as u64) as usize, name: format!("sa{i}"), roles });
        }
        for i in 0..rng.below(size as u64 / 3 + 1) {
            m.configmaps.push((rng.below(nns as u64) as usize, format!("cm{i}")));
        }
        for i in 0..rng.below(3) {
            m.widgets.push((rng.below(nns as u64) as usize, format!("w{i}")));
        }
        if rng.chance(0.2) {
            m.selector_app = Some(rng.below(3) as u8);
        }
        if nns > 1 && rng.chance(0.2) {
            m.include_ns = vec![0];
        } else if nns > 1 && rng.chance(0.1) {
            m.exclude_ns = vec![rng.below(nns as u64) as usize];
        }
        m.include_cluster_resources = match rng.below(10) {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        m.exclude_pvs = rng.chance(0.08);
        if rng.chance(0.15) {
            let mut names: Vec<String> = m.pods.iter().filter(|p| p.ns == 0).map(|p| p.name.clone()).collect();
            rng.shuffle(&mut names);
            names.truncate(3);
            m.ordered_pods = names;
        }
        if rng.chance(0.25) {
            let on_error = if rng.chance(0.5) { OnError::Fail } else { OnError::Continue };
            let (pre, post) = match rng.below(4) {
                0 => (true, false),
                1 => (false, true),
                _ => (true, true),
            };
            m.spec_hook = Some(SpecHookM { on_error, pre, post });
        }
        // The exclude label on objects of every kind, pulled ones included.
        for tag in m.tags() {
            if rng.chance(0.04) {
                m.exclude_label.insert(tag);
            }
        }
        // Snapshot support, drawn last so the draws above are those of models without it.
        m.csi = CsiM { crds: true, groups: rng.chance(0.75), class: rng.chance(0.9), group_class: rng.chance(0.8) };
        m.snapshot_volumes = match rng.below(12) {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        for c in &mut m.pvcs {
            c.not_csi = rng.chance(0.08);
        }
        // Often one whole volume group: two or three bound claims of one namespace.
        if rng.chance(0.4) {
            let ns = rng.below(nns as u64) as usize;
            let want = rng.range(2, 3) as usize;
            let mut n = 0;
            for c in m.pvcs.iter_mut().filter(|c| c.ns == ns && c.bound) {
                if n < want {
                    c.group = Some(0);
                    n += 1;
                }
            }
        }
        m
    }

    /// Every non-pod object as `kind/name`, for exclusions and get faults.
    pub fn tags(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.pvcs {
            out.push(format!("pvc/{}", c.name));
            if c.bound {
                out.push(format!("pv/{}", pv_name(c.ns, &c.name)));
            }
        }
        out.extend(["pc/pc0".to_string(), "pc/pc1".to_string()]);
        for (_, n) in &self.configmaps {
            out.push(format!("cm/{n}"));
        }
        let mut roles = BTreeSet::new();
        for s in &self.sas {
            out.push(format!("sa/{}", s.name));
            for r in &s.roles {
                out.push(format!("crb/{}-{}-{r}", NAMESPACES[s.ns], s.name));
                roles.insert(r.clone());
            }
        }
        out.extend(roles.into_iter().map(|r| format!("role/{r}")));
        for (_, n) in &self.widgets {
            out.push(format!("widget/{n}"));
        }
        out
    }

    /// The key of a `kind/name` tag, if the model has such an object.
    pub fn tag_key(&self, tag: &str) -> Option<ItemKey> {
        let (kind, name) = tag.split_once('/')?;
        let ns = match kind {
            "pvc" => Some(self.pvcs.iter().find(|c| c.name == name)?.ns),
            "cm" => Some(self.configmaps.iter().find(|(_, n)| n == name)?.0),
            "sa" => Some(self.sas.iter().find(|s| s.name == name)?.ns),
            "widget" => Some(self.widgets.iter().find(|(_, n)| n == name)?.0),
            _ => None,
        };
        Some(tag_key(kind, ns, name))
    }

    fn labels(&self, tag: &str, mut labels: Value) -> Value {
        if self.exclude_label.contains(tag) {
            labels[EXCLUDE_LABEL] = json!("true");
        }
        labels
    }

    /// Objects in the model, as (resource type, JSON).
    pub fn objects(&self) -> Vec<(ResourceType, Value)> {
        let rts = model_resources();
        let rt = |r: &str| rts.iter().find(|t| t.gr.resource == r).cloned().unwrap_or_else(|| rts[0].clone());
        let mut out = Vec::new();
        for ns in self.used_namespaces() {
            out.push((rt("namespaces"), json!({"metadata": {"name": NAMESPACES[ns], "uid": format!("uid-ns-{ns}")}})));
        }
        for p in &self.pods {
            let mut annotations = serde_json::Map::new();
            if let Some(h) = &p.hook {
                if h.pre {
                    let pre = serde_json::to_string(&pre_command(&p.name)).unwrap_or_default();
                    let pre = if h.malformed { format!("{pre}\"") } else { pre };
                    annotations.insert("pre.hook.backup.velero.io/command".into(), json!(pre));
                    if h.on_error_set {
                        let on_error = if h.on_error == OnError::Fail { "Fail" } else { "Continue" };
                        annotations.insert("pre.hook.backup.velero.io/on-error".into(), json!(on_error));
                    }
                    annotations.insert("pre.hook.backup.velero.io/timeout".into(), json!("2s"));
                }
                if h.post {
                    let post = serde_json::to_string(&post_command(&p.name)).unwrap_or_default();
                    annotations.insert("post.hook.backup.velero.io/command".into(), json!(post));
                    annotations.insert("post.hook.backup.velero.io/timeout".into(), json!("2s"));
                }
            }
            let mut labels = json!({"app": p.app.to_string()});
            if p.excluded {
                labels[EXCLUDE_LABEL] = json!("true");
            }
            let volumes: Vec<Value> =
                p.claims.iter().map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}})).collect();
            let mut spec = json!({"containers": [{"name": "main"}], "volumes": volumes});
            if let Some(pc) = &p.priority_class {
                spec["priorityClassName"] = json!(pc);
            }
            out.push((
                rt("pods"),
                json!({"metadata": {"namespace": NAMESPACES[p.ns], "name": p.name, "uid": format!("uid-{}", p.name),
                        "labels": labels, "annotations": annotations}, "spec": spec, "status": {"phase": p.phase}}),
            ));
        }
        for c in &self.pvcs {
            let mut labels = json!({});
            if let Some(g) = c.group {
                labels["velero.io/volume-group"] = json!(format!("g{g}"));
            }
            if let Some(a) = c.app {
                labels["app"] = json!(a.to_string());
            }
            let labels = self.labels(&format!("pvc/{}", c.name), labels);
            let mut meta = json!({"namespace": NAMESPACES[c.ns], "name": c.name, "uid": format!("uid-{}", c.name), "labels": labels});
            if c.deleting {
                meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            let (mut spec, phase) =
                if c.bound { (json!({"volumeName": pv_name(c.ns, &c.name)}), "Bound") } else { (json!({}), "Pending") };
            spec["resources"] = json!({"requests": {"storage": "1Gi"}});
            out.push((
                rt("persistentvolumeclaims"),
                json!({"metadata": meta, "spec": spec, "status": {"phase": phase}}),
            ));
            if c.bound && !c.pv_missing {
                let pv = pv_name(c.ns, &c.name);
                let labels = self.labels(&format!("pv/{pv}"), json!({}));
                let spec = if c.not_csi {
                    json!({"hostPath": {"path": format!("/data/{pv}")}})
                } else {
                    json!({"csi": {"driver": CSI_DRIVER, "volumeHandle": format!("vol-{pv}")}})
                };
                out.push((
                    rt("persistentvolumes"),
                    json!({"metadata": {"name": pv, "uid": format!("uid-{pv}"), "labels": labels}, "spec": spec}),
                ));
            }
        }
        let mut roles = BTreeSet::new();
        for s in &self.sas {
            let labels = self.labels(&format!("sa/{}", s.name), json!({}));
            out.push((
                rt("serviceaccounts"),
                json!({"metadata": {"namespace": NAMESPACES[s.ns], "name": s.name, "labels": labels}}),
            ));
            for r in &s.roles {
                roles.insert(r.clone());
                let crb = format!("{}-{}-{r}", NAMESPACES[s.ns], s.name);
                let labels = self.labels(&format!("crb/{crb}"), json!({}));
                out.push((
                    rt("clusterrolebindings"),
                    json!({"metadata": {"name": crb, "labels": labels},
                           "subjects": [{"kind": "ServiceAccount", "name": s.name, "namespace": NAMESPACES[s.ns]}],
                           "roleRef": {"kind": "ClusterRole", "name": r}}),
                ));
            }
        }
        for r in roles {
            let labels = self.labels(&format!("role/{r}"), json!({}));
            out.push((rt("clusterroles"), json!({"metadata": {"name": r, "labels": labels}})));
        }
        for pc in ["pc0", "pc1"] {
            let labels = self.labels(&format!("pc/{pc}"), json!({}));
            out.push((rt("priorityclasses"), json!({"metadata": {"name": pc, "labels": labels}, "value": 1000})));
        }
        for (ns, n) in &self.configmaps {
            let labels = self.labels(&format!("cm/{n}"), json!({}));
            out.push((
                rt("configmaps"),
                json!({"metadata": {"namespace": NAMESPACES[*ns], "name": n, "labels": labels}, "data": {"k": n}}),
            ));
        }
        for (ns, n) in &self.widgets {
            let labels = self.labels(&format!("widget/{n}"), json!({}));
            out.push((
                rt("widgets"),
                json!({"metadata": {"namespace": NAMESPACES[*ns], "name": n, "labels": labels}, "spec": {"size": 3}}),
            ));
        }
        let csi = crate::csi::snapshot_resources(Some("v1"));
        let csi_rt = |r: &str| csi.iter().find(|t| t.gr.resource == r).cloned();
        if let (true, true, Some(rt)) = (self.csi.crds, self.csi.class, csi_rt("volumesnapshotclasses")) {
            out.push((rt, json!({"metadata": {"name": "snap"}, "driver": CSI_DRIVER, "deletionPolicy": "Delete"})));
        }
        if let (true, true, true, Some(rt)) =
            (self.csi.crds, self.csi.groups, self.csi.group_class, csi_rt("volumegroupsnapshotclasses"))
        {
            out.push((rt, json!({"metadata": {"name": "gsnap"}, "driver": CSI_DRIVER, "deletionPolicy": "Delete"})));
        }
        out
    }

    /// Resource types this model's cluster serves: the generated ones, and the snapshot CRDs it has.
    pub fn resources(&self) -> Vec<ResourceType> {
        let mut out = model_resources();
        if self.csi.crds {
            out.extend(crate::csi::snapshot_resources(self.csi.groups.then_some("v1")));
        }
        out
    }

    /// The backup options this model is backed up with.
    pub fn options(&self) -> blockwise_engine::snapshot::BackupOptions {
        blockwise_engine::snapshot::BackupOptions {
            snapshot_volumes: self.snapshot_volumes,
            csi_snapshot_timeout_ms: SIM_CSI_TIMEOUT_MS,
            item_operation_timeout_ms: SIM_READY_TIMEOUT_MS,
            annotations: BTreeMap::new(),
            uid: SIM_UID.to_string(),
        }
    }

    /// How the fake CSI driver behaves: timings drawn from the claim's (or group's) name, faults
    /// and slowness from [`WorldM`].
    pub fn csi_config(&self) -> CsiConfig {
        let behaviour = |key: &str| {
            let h = crate::rng::hash_str(0x5eed, key);
            let slow = self.world.slow_snapshots.contains(key);
            let cut_ms = if slow { 5_000 + h % 20_000 } else { 10 + h % 300 };
            let timing = Timing { cut_ms, ready_ms: 20 + (h >> 20) % 2_000 };
            Behaviour { timing, fault: self.world.snapshot_faults.get(key).copied() }
        };
        let mut cfg = CsiConfig::default();
        for c in &self.pvcs {
            cfg.claims.insert((NAMESPACES[c.ns].to_string(), c.name.clone()), behaviour(&c.name));
            if let Some(g) = c.group {
                let key = group_fault_key(c.ns, g);
                cfg.groups.insert((NAMESPACES[c.ns].to_string(), format!("g{g}")), behaviour(&key));
            }
        }
        cfg
    }

    /// What happens to each bound claim of `in_backup` (the items the archive must hold, before
    /// snapshots are considered), given the gets that failed — DESIGN §4a over the model: no
    /// snapshot when they are off, the API is not served or the volume is not CSI; a claim whose
    /// volume is missing or unreadable, or without a snapshot class, fails; the claims of a volume
    /// group are captured by one group snapshot when group snapshots and a group class are there
    /// and every claim of the group the backup can see is in it, bound and CSI (else one by one);
    /// the driver's faults fail the claim (error, no handle) or its whole group (error, a missing
    /// member); slowness and readiness do not.
    pub fn volume_fates(&self, in_backup: &BTreeSet<ItemKey>, seen: &Visibility) -> BTreeMap<ItemKey, VolumeFate> {
        let mut out = BTreeMap::new();
        let key_pvc = |c: &PvcM| ItemKey::namespaced("", "persistentvolumeclaims", NAMESPACES[c.ns], &c.name);
        let key_pv = |c: &PvcM| ItemKey::cluster("", "persistentvolumes", &pv_name(c.ns, &c.name));
        let on = self.snapshot_volumes != Some(false) && self.csi.crds;
        // A claim's volume can be snapshotted: bound, its volume there, readable and CSI.
        let volume_ok = |c: &PvcM| c.bound && !c.pv_missing && !seen.failed_gets.contains(&key_pv(c)) && !c.not_csi;
        let listed = |c: &PvcM| {
            let unit_ns = (!self.include_ns.is_empty()).then(|| NAMESPACES[c.ns].to_string());
            !seen.failed_lists.contains(&("persistentvolumeclaims".to_string(), unit_ns))
        };
        for c in self.pvcs.iter().filter(|c| c.bound && in_backup.contains(&key_pvc(c))) {
            let fault = |key: &str| self.world.snapshot_faults.get(key).copied();
            let fate = if !on || (c.not_csi && !c.pv_missing && !seen.failed_gets.contains(&key_pv(c))) {
                VolumeFate::Plain
            } else if !volume_ok(c) {
                VolumeFate::Fails
            } else {
                let group = c.group.filter(|_| self.csi.groups && self.csi.group_class).and_then(|g| {
                    let members: Vec<&PvcM> = self
                        .pvcs
                        .iter()
                        .filter(|o| o.ns == c.ns && o.group == Some(g))
                        .filter(|o| listed(o) || in_backup.contains(&key_pvc(o)))
                        .collect();
                    let whole =
                        members.len() >= 2 && members.iter().all(|o| in_backup.contains(&key_pvc(o)) && volume_ok(o));
                    whole.then_some(g)
                });
                // A partial group cut leaves out the last claim (by name) its label selects — which
                // fails the group only when the backup needs that claim.
                let partial_misses_one_needed = |g: u8| {
                    let selected = self.pvcs.iter().filter(|o| o.ns == c.ns && o.group == Some(g)).map(|o| &o.name);
                    selected.max().is_some_and(|last| {
                        self.pvcs.iter().any(|o| o.ns == c.ns && &o.name == last && in_backup.contains(&key_pvc(o)))
                    })
                };
                match group {
                    Some(g) => match fault(&group_fault_key(c.ns, g)) {
                        Some(CsiFault::Error | CsiFault::NeverHandle) => VolumeFate::Fails,
                        Some(CsiFault::Partial) if partial_misses_one_needed(g) => VolumeFate::Fails,
                        _ => VolumeFate::Captured(Some(format!("g{g}"))),
                    },
                    None if !self.csi.class => VolumeFate::Fails,
                    None => match fault(&c.name) {
                        Some(CsiFault::Error | CsiFault::NeverHandle) => VolumeFate::Fails,
                        _ => VolumeFate::Captured(None),
                    },
                }
            };
            out.insert(key_pvc(c), fate);
        }
        out
    }

    fn used_namespaces(&self) -> BTreeSet<usize> {
        self.pods
            .iter()
            .map(|p| p.ns)
            .chain(self.pvcs.iter().map(|c| c.ns))
            .chain(self.sas.iter().map(|s| s.ns))
            .collect()
    }

    /// Every object of the model by key, with its JSON as served by a get (apiVersion and kind set).
    pub fn objects_by_key(&self) -> BTreeMap<ItemKey, Value> {
        let mut out = BTreeMap::new();
        for (rt, mut v) in self.objects() {
            let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let key = match v["metadata"]["namespace"].as_str() {
                Some(ns) if rt.namespaced => ItemKey::namespaced(&rt.gr.group, &rt.gr.resource, ns, &name),
                _ => ItemKey::cluster(&rt.gr.group, &rt.gr.resource, &name),
            };
            v["apiVersion"] = json!(rt.api_version());
            v["kind"] = json!(rt.kind);
            out.insert(key, v);
        }
        out
    }

    /// The fake cluster serving this model.
    pub fn fake(&self) -> FakeCluster {
        let mut f = FakeCluster::new();
        for rt in self.resources() {
            f.add_resource(rt);
        }
        for (rt, o) in self.objects() {
            f.add_object(&rt, o);
        }
        f.with_csi(self.csi_config())
    }

    /// The backup spec this model is backed up with.
    pub fn spec(&self, name: &str) -> BackupSpec {
        let mut s = BackupSpec::new(name);
        s.label_selector = self.selector_app.map(|a| format!("app={a}"));
        s.included_namespaces = self.include_ns.iter().map(|&i| NAMESPACES[i].to_string()).collect();
        s.excluded_namespaces = self.exclude_ns.iter().map(|&i| NAMESPACES[i].to_string()).collect();
        s.include_cluster_resources = self.include_cluster_resources;
        if self.exclude_pvs {
            s.excluded_resources = vec!["persistentvolumes".into()];
        }
        if !self.ordered_pods.is_empty() {
            s.ordered_resources = vec![("pods".into(), self.ordered_pods.iter().map(|n| format!("ns0/{n}")).collect())];
        }
        if let Some(h) = &self.spec_hook {
            let exec = |cmd: &str| blockwise_engine::hooks::ExecHookSpec {
                container: String::new(),
                command: vec![cmd.into()],
                on_error: Some(h.on_error),
                timeout: Some("2s".into()),
            };
            s.hooks = vec![blockwise_engine::hooks::ResourceHookSpec {
                name: "spec-freeze".into(),
                included_namespaces: vec![],
                excluded_namespaces: vec![],
                label_selector: Some("app=1".into()),
                pre: if h.pre { vec![exec(SPEC_PRE)] } else { vec![] },
                post: if h.post { vec![exec(SPEC_POST)] } else { vec![] },
            }];
        }
        s
    }

    /// The cluster faults of this model's world, keyed as the simulated cluster needs them.
    pub fn cluster_faults(&self, list_gone: bool, slow_p: f64) -> ClusterFaults {
        let mut hooks = BTreeMap::new();
        for p in &self.pods {
            for h in self.hooks(p) {
                if let Some(f) = self.world.hook_faults.get(&hook_fault_key(&p.name, h.phase)) {
                    hooks.insert((h.pod.clone(), h.command.clone()), *f);
                }
            }
        }
        let pod_key = |name: &String| {
            self.pods.iter().find(|p| &p.name == name).map(|p| ItemKey::namespaced("", "pods", NAMESPACES[p.ns], name))
        };
        let mut changes: Vec<Change> =
            self.world.delete_pods.iter().filter_map(pod_key).map(Change::DeletePod).collect();
        changes.extend(self.world.rename_containers.iter().filter_map(pod_key).map(Change::RenameContainers));
        ClusterFaults {
            list_unavailable: self.world.list_unavailable.clone(),
            list_throttled: self.world.list_throttled.clone(),
            list_gone,
            get_forbidden: self.world.get_forbidden.iter().filter_map(|t| self.tag_key(t)).collect(),
            hooks,
            slow_p,
            changes,
            ..ClusterFaults::default()
        }
    }

    /// A cluster serving this model's resource types with none of its objects: where a simulated
    /// restore goes.
    pub fn empty_target(&self) -> FakeCluster {
        let mut f = FakeCluster::new();
        for rt in self.resources() {
            f.add_resource(rt);
        }
        f
    }

    /// Records in the model, for shrinking progress.
    pub fn size(&self) -> usize {
        self.pods.len() + self.pvcs.len() + self.sas.len() + self.configmaps.len() + self.widgets.len()
    }

    /// Candidate one-step smaller models (each drops one record, option or fault), for shrinking.
    pub fn shrink_candidates(&self) -> Vec<Model> {
        let mut out = Vec::new();
        macro_rules! drop_each {
            ($($field:ident).+) => {
                for i in 0..self.$($field).+.len() {
                    let mut m = self.clone();
                    m.$($field).+.remove(i);
                    out.push(m);
                }
            };
        }
        drop_each!(pods);
        drop_each!(pvcs);
        drop_each!(sas);
        drop_each!(configmaps);
        drop_each!(widgets);
        drop_each!(exclude_ns);
        drop_each!(world.delete_pods);
        drop_each!(world.rename_containers);
        for i in 0..self.pods.len() {
            if !self.pods[i].claims.is_empty() {
                let mut m = self.clone();
                m.pods[i].claims.pop();
                out.push(m);
            }
            if self.pods[i].hook.is_some() {
                let mut m = self.clone();
                m.pods[i].hook = None;
                out.push(m);
            }
        }
        for tag in &self.exclude_label {
            let mut m = self.clone();
            m.exclude_label.remove(tag);
            out.push(m);
        }
        for k in self.world.hook_faults.keys() {
            let mut m = self.clone();
            m.world.hook_faults.remove(k);
            out.push(m);
        }
        for k in self.world.list_unavailable.keys() {
            let mut m = self.clone();
            m.world.list_unavailable.remove(k);
            out.push(m);
        }
        for k in &self.world.get_forbidden {
            let mut m = self.clone();
            m.world.get_forbidden.remove(k);
            out.push(m);
        }
        let mut m = self.clone();
        if m.selector_app.take().is_some() {
            out.push(m);
        }
        let mut m = self.clone();
        if m.include_cluster_resources.take().is_some() {
            out.push(m);
        }
        let mut m = self.clone();
        if !m.ordered_pods.is_empty() {
            m.ordered_pods.clear();
            out.push(m);
        }
        let mut m = self.clone();
        if m.spec_hook.take().is_some() {
            out.push(m);
        }
        out
    }

    fn pod_key(p: &PodM) -> ItemKey {
        ItemKey::namespaced("", "pods", NAMESPACES[p.ns], &p.name)
    }

    /// The hooks DESIGN §4 gives pod `p`, pre then post: only Running pods have hooks; per phase,
    /// the pod's annotation replaces the spec's hooks; defaults first container, onError Fail; a
    /// malformed command annotation makes an invalid hook (recorded failed, never exec'd).
    pub fn hooks(&self, p: &PodM) -> Vec<HookDef> {
        if p.phase != "Running" {
            return Vec::new();
        }
        let pod = Model::pod_key(p);
        let mut out = Vec::new();
        let spec = self.spec_hook.as_ref().filter(|_| p.app == 1);
        let ann = p.hook.as_ref();
        // Pre.
        if let Some(h) = ann.filter(|h| h.pre) {
            out.push(HookDef {
                pod: pod.clone(),
                phase: HookPhase::Pre,
                command: pre_command(&p.name),
                on_error: if h.on_error_set { h.on_error } else { OnError::Fail },
                timeout_ms: HOOK_TIMEOUT_MS,
                valid: !h.malformed,
            });
        } else if let Some(s) = spec.filter(|s| s.pre) {
            out.push(HookDef {
                pod: pod.clone(),
                phase: HookPhase::Pre,
                command: vec![SPEC_PRE.into()],
                on_error: s.on_error,
                timeout_ms: HOOK_TIMEOUT_MS,
                valid: true,
            });
        }
        // Post: an annotation has no on-error, so the default (Fail) applies.
        if ann.is_some_and(|h| h.post) {
            out.push(HookDef {
                pod: pod.clone(),
                phase: HookPhase::Post,
                command: post_command(&p.name),
                on_error: OnError::Fail,
                timeout_ms: HOOK_TIMEOUT_MS,
                valid: true,
            });
        } else if let Some(s) = spec.filter(|s| s.post) {
            out.push(HookDef {
                pod,
                phase: HookPhase::Post,
                command: vec![SPEC_POST.into()],
                on_error: s.on_error,
                timeout_ms: HOOK_TIMEOUT_MS,
                valid: true,
            });
        }
        out
    }

    /// Every hook of every pod, keyed by (pod, command).
    pub fn all_hooks(&self) -> BTreeMap<(ItemKey, Vec<String>), HookDef> {
        let mut out = BTreeMap::new();
        for p in &self.pods {
            for h in self.hooks(p) {
                out.insert((h.pod.clone(), h.command.clone()), h);
            }
        }
        out
    }

    /// Whether a namespace passes the namespace filters.
    fn ns_ok(&self, ns: usize) -> bool {
        (self.include_ns.is_empty() || self.include_ns.contains(&ns)) && !self.exclude_ns.contains(&ns)
    }

    /// The oracle: blocks per DESIGN §3, computed naively from the model (no engine code) over
    /// what `seen` says the engine could see. Each block is a sorted set of keys; blocks are sorted.
    pub fn oracle_blocks(&self, seen: &Visibility) -> Vec<BTreeSet<ItemKey>> {
        let ns_filtered = !self.include_ns.is_empty() || !self.exclude_ns.is_empty();
        let cluster_seed = self.include_cluster_resources.unwrap_or(!ns_filtered);
        let cluster_off = self.include_cluster_resources == Some(false);
        let key_pod = Model::pod_key;
        let key_pvc = |ns: usize, n: &str| ItemKey::namespaced("", "persistentvolumeclaims", NAMESPACES[ns], n);
        let key_pv = |ns: usize, n: &str| ItemKey::cluster("", "persistentvolumes", &pv_name(ns, n));
        let sel_ok = |app: Option<u8>| self.selector_app.is_none() || app.is_some() && app == self.selector_app;
        let labelled = |tag: String| self.exclude_label.contains(&tag);
        // How each object was listed: per-namespace units when namespaces are named explicitly.
        let listed = |resource: &str, ns: Option<usize>| {
            let unit_ns = match ns {
                Some(n) if !self.include_ns.is_empty() => Some(NAMESPACES[n].to_string()),
                _ => None,
            };
            !seen.failed_lists.contains(&(resource.to_string(), unit_ns))
        };
        // Every object: (excluded, seed, listed).
        let mut exists: BTreeMap<ItemKey, (bool, bool, bool)> = BTreeMap::new();
        for ns in self.used_namespaces() {
            let k = ItemKey::cluster("", "namespaces", NAMESPACES[ns]);
            exists.insert(
                k,
                (!self.ns_ok(ns), self.ns_ok(ns) && self.selector_app.is_none(), listed("namespaces", None)),
            );
        }
        for p in &self.pods {
            exists
                .insert(key_pod(p), (!self.ns_ok(p.ns) || p.excluded, sel_ok(Some(p.app)), listed("pods", Some(p.ns))));
        }
        for c in &self.pvcs {
            exists.insert(
                key_pvc(c.ns, &c.name),
                (
                    !self.ns_ok(c.ns) || c.deleting || labelled(format!("pvc/{}", c.name)),
                    sel_ok(c.app),
                    listed("persistentvolumeclaims", Some(c.ns)),
                ),
            );
            if c.bound && !c.pv_missing {
                let pv = pv_name(c.ns, &c.name);
                exists.insert(
                    key_pv(c.ns, &c.name),
                    (
                        self.exclude_pvs || cluster_off || labelled(format!("pv/{pv}")),
                        cluster_seed && sel_ok(None),
                        listed("persistentvolumes", None),
                    ),
                );
            }
        }
        let mut roles = BTreeSet::new();
        for s in &self.sas {
            exists.insert(
                ItemKey::namespaced("", "serviceaccounts", NAMESPACES[s.ns], &s.name),
                (
                    !self.ns_ok(s.ns) || labelled(format!("sa/{}", s.name)),
                    sel_ok(None),
                    listed("serviceaccounts", Some(s.ns)),
                ),
            );
            for r in &s.roles {
                roles.insert(r.clone());
                let crb = format!("{}-{}-{r}", NAMESPACES[s.ns], s.name);
                exists.insert(
                    ItemKey::cluster("rbac.authorization.k8s.io", "clusterrolebindings", &crb),
                    (
                        cluster_off || labelled(format!("crb/{crb}")),
                        cluster_seed && sel_ok(None),
                        listed("clusterrolebindings.rbac.authorization.k8s.io", None),
                    ),
                );
            }
        }
        for r in roles {
            exists.insert(
                ItemKey::cluster("rbac.authorization.k8s.io", "clusterroles", &r),
                (
                    cluster_off || labelled(format!("role/{r}")),
                    cluster_seed && sel_ok(None),
                    listed("clusterroles.rbac.authorization.k8s.io", None),
                ),
            );
        }
        for pc in ["pc0", "pc1"] {
            exists.insert(
                ItemKey::cluster("scheduling.k8s.io", "priorityclasses", pc),
                (
                    cluster_off || labelled(format!("pc/{pc}")),
                    cluster_seed && sel_ok(None),
                    listed("priorityclasses.scheduling.k8s.io", None),
                ),
            );
        }
        for (ns, n) in &self.configmaps {
            exists.insert(
                ItemKey::namespaced("", "configmaps", NAMESPACES[*ns], n),
                (!self.ns_ok(*ns) || labelled(format!("cm/{n}")), sel_ok(None), listed("configmaps", Some(*ns))),
            );
        }
        // The snapshot classes the cluster has are cluster-scoped objects like any other.
        let classes = [
            (self.csi.class, "volumesnapshotclasses", crate::csi::SNAP, "snap"),
            (self.csi.groups && self.csi.group_class, "volumegroupsnapshotclasses", crate::csi::GSNAP, "gsnap"),
        ];
        for (present, resource, group, name) in classes {
            if self.csi.crds && present {
                exists.insert(
                    ItemKey::cluster(group, resource, name),
                    (cluster_off, cluster_seed && sel_ok(None), listed(&format!("{resource}.{group}"), None)),
                );
            }
        }
        for (ns, n) in &self.widgets {
            exists.insert(
                ItemKey::namespaced("example.com", "widgets", NAMESPACES[*ns], n),
                (
                    !self.ns_ok(*ns) || labelled(format!("widget/{n}")),
                    sel_ok(None),
                    listed("widgets.example.com", Some(*ns)),
                ),
            );
        }
        // Relations by brute force. An action finds some targets by key (a pod's claims, a claim's
        // volume, a pod's PriorityClass, a binding's ClusterRole): those can be fetched when they
        // were not listed. It finds others by looking among the objects it knows (claims of a
        // volume group, bindings naming a ServiceAccount, pods mounting a claim): those must be
        // known — listed, or fetched as another item's target. `via` must be known for the
        // relation to be seen at all (a ClusterRole is found through its binding).
        struct Rel {
            from: ItemKey,
            to: ItemKey,
            together: bool,
            pull: bool,
            by_key: bool,
            via: Option<ItemKey>,
        }
        let rel =
            |from: ItemKey, to: ItemKey, together, pull, by_key| Rel { from, to, together, pull, by_key, via: None };
        let mut rels: Vec<Rel> = Vec::new();
        for p in &self.pods {
            for c in &p.claims {
                rels.push(rel(key_pod(p), key_pvc(p.ns, c), true, true, true));
            }
            if let Some(pc) = &p.priority_class {
                let pc = ItemKey::cluster("scheduling.k8s.io", "priorityclasses", pc);
                rels.push(rel(key_pod(p), pc, false, true, true));
            }
        }
        for c in &self.pvcs {
            if !c.bound {
                continue;
            }
            rels.push(rel(key_pvc(c.ns, &c.name), key_pv(c.ns, &c.name), true, true, true));
            for p in &self.pods {
                if p.ns == c.ns && p.phase == "Running" && p.claims.contains(&c.name) {
                    rels.push(rel(key_pvc(c.ns, &c.name), key_pod(p), true, false, false));
                }
            }
            for o in &self.pvcs {
                if o.ns == c.ns && o.name != c.name && c.group.is_some() && o.group == c.group {
                    rels.push(rel(key_pvc(c.ns, &c.name), key_pvc(o.ns, &o.name), true, true, false));
                }
            }
        }
        for s in &self.sas {
            let sa = ItemKey::namespaced("", "serviceaccounts", NAMESPACES[s.ns], &s.name);
            for r in &s.roles {
                let crb = ItemKey::cluster(
                    "rbac.authorization.k8s.io",
                    "clusterrolebindings",
                    &format!("{}-{}-{r}", NAMESPACES[s.ns], s.name),
                );
                rels.push(rel(sa.clone(), crb.clone(), false, true, false));
                let role = ItemKey::cluster("rbac.authorization.k8s.io", "clusterroles", r);
                rels.push(Rel { via: Some(crb), ..rel(sa.clone(), role, false, true, true) });
            }
        }
        // Seeds: listed, selected, not excluded. Then the pull closure: a target is in the backup
        // if the relation is seen, the target is not excluded, and it was listed or its get worked.
        let mut known: BTreeSet<ItemKey> =
            exists.iter().filter(|(_, (_, _, listed))| *listed).map(|(k, _)| k.clone()).collect();
        let mut inb: BTreeSet<ItemKey> =
            exists.iter().filter(|(_, (ex, seed, listed))| !ex && *seed && *listed).map(|(k, _)| k.clone()).collect();
        loop {
            let before = (inb.len(), known.len());
            for r in &rels {
                if !r.pull || !inb.contains(&r.from) {
                    continue;
                }
                let visible = r.by_key || known.contains(&r.to);
                if !visible || r.via.as_ref().is_some_and(|v| !known.contains(v)) {
                    continue;
                }
                let Some((excluded, _, listed)) = exists.get(&r.to) else { continue };
                if !listed && seen.failed_gets.contains(&r.to) {
                    continue;
                }
                known.insert(r.to.clone());
                if !excluded {
                    inb.insert(r.to.clone());
                }
            }
            if (inb.len(), known.len()) == before {
                break;
            }
        }
        // Components by repeated merging of sets.
        let mut blocks: Vec<BTreeSet<ItemKey>> = inb.iter().map(|k| BTreeSet::from([k.clone()])).collect();
        let merge = |blocks: &mut Vec<BTreeSet<ItemKey>>, a: &ItemKey, b: &ItemKey| {
            let ia = blocks.iter().position(|s| s.contains(a));
            let ib = blocks.iter().position(|s| s.contains(b));
            if let (Some(ia), Some(ib)) = (ia, ib) {
                if ia != ib {
                    let moved = blocks[ib].clone();
                    blocks[ia].extend(moved);
                    blocks.remove(ib);
                }
            }
        };
        for r in rels.iter().filter(|r| r.together) {
            merge(&mut blocks, &r.from, &r.to);
        }
        let ordered: Vec<ItemKey> = self
            .ordered_pods
            .iter()
            .map(|n| ItemKey::namespaced("", "pods", "ns0", n))
            .filter(|k| inb.contains(k))
            .collect();
        for w in ordered.windows(2) {
            merge(&mut blocks, &w[0], &w[1]);
        }
        blocks.sort();
        blocks
    }
}
