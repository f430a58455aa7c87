//! Generated clusters for simulation: a small structured [`Model`], its objects, and an oracle.
//!
//! A model is a list of plain records (pods, claims, service accounts, …) rather than JSON, so it
//! can be generated from a seed, shrunk by deleting records, printed readably, and — the point —
//! checked by [`Model::oracle_blocks`], a second, naive implementation of DESIGN §3 written from
//! the rules over the model's structure. The engine's index-based grouping must agree with it.

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::hooks::OnError;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::spec::BackupSpec;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::fake::FakeCluster;
use crate::rng::Rng;

/// Namespaces a model can use.
pub const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];

/// How a hook misbehaves, decided per pod so reruns behave the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HookFault {
    /// Non-zero exit.
    Exit,
    /// The exec errors (connection reset).
    Error,
    /// Slower than its timeout.
    Timeout,
    /// Never returns; the timeout fires.
    Hang,
}

/// A pod's hook annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookM {
    /// onError of the pre-hook.
    pub on_error: OnError,
    /// Misbehaviour of the pre-hook, if any.
    pub pre_fault: Option<HookFault>,
    /// Misbehaviour of the post-hook, if any.
    pub post_fault: Option<HookFault>,
    /// The command annotation is malformed JSON.
    pub malformed: bool,
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

/// A whole generated cluster and the spec to back it up with.
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
    /// Exclude PersistentVolumes by resource filter.
    pub exclude_pvs: bool,
    /// Ordered pods: names in order (namespace ns0).
    pub ordered_pods: Vec<String>,
    /// A spec hook for pods with `app=1`, with this onError.
    pub spec_hook: Option<OnError>,
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

impl Model {
    /// Generates a model of roughly `size` records from `rng`.
    pub fn generate(rng: &mut Rng, size: usize) -> Model {
        let size = size.max(1);
        let nns = rng.range(1, 3) as usize;
        let mut m = Model {
            pods: Vec::new(),
            pvcs: Vec::new(),
            sas: Vec::new(),
            configmaps: Vec::new(),
            widgets: Vec::new(),
            selector_app: None,
            include_ns: Vec::new(),
            exclude_pvs: false,
            ordered_pods: Vec::new(),
            spec_hook: None,
        };
        let npvc = rng.below(size as u64 / 2 + 2) as usize;
        for i in 0..npvc {
            m.pvcs.push(PvcM {
                ns: rng.below(nns as u64) as usize,
                name: format!("c{i}"),
                bound: rng.chance(0.8),
                pv_missing: rng.chance(0.05),
                group: rng.chance(0.25).then(|| rng.below(2) as u8),
                deleting: rng.chance(0.04),
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
            let hook = rng.chance(0.35).then(|| HookM {
                on_error: if rng.chance(0.7) { OnError::Fail } else { OnError::Continue },
                pre_fault: None,
                post_fault: None,
                malformed: rng.chance(0.05),
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
        }
        m.exclude_pvs = rng.chance(0.08);
        if rng.chance(0.15) {
            let mut names: Vec<String> = m.pods.iter().filter(|p| p.ns == 0).map(|p| p.name.clone()).collect();
            rng.shuffle(&mut names);
            names.truncate(3);
            m.ordered_pods = names;
        }
        if rng.chance(0.2) {
            m.spec_hook = Some(if rng.chance(0.5) { OnError::Fail } else { OnError::Continue });
        }
        m
    }

    /// Objects in the model, as (resource type, JSON).
    pub fn objects(&self) -> Vec<(ResourceType, Value)> {
        let rts = model_resources();
        let rt = |r: &str| rts.iter().find(|t| t.gr.resource == r).cloned().unwrap_or_else(|| rts[0].clone());
        let mut out = Vec::new();
        let used: BTreeSet<usize> = self
            .pods
            .iter()
            .map(|p| p.ns)
            .chain(self.pvcs.iter().map(|c| c.ns))
            .chain(self.sas.iter().map(|s| s.ns))
            .collect();
        for ns in used {
            out.push((rt("namespaces"), json!({"metadata": {"name": NAMESPACES[ns], "uid": format!("uid-ns-{ns}")}})));
        }
        for p in &self.pods {
            let mut annotations = serde_json::Map::new();
            if let Some(h) = &p.hook {
                let pre = serde_json::to_string(&pre_command(&p.name)).unwrap_or_default();
                let pre = if h.malformed { format!("{pre}\"") } else { pre };
                annotations.insert("pre.hook.backup.velero.io/command".into(), json!(pre));
                let on_error = if h.on_error == OnError::Fail { "Fail" } else { "Continue" };
                annotations.insert("pre.hook.backup.velero.io/on-error".into(), json!(on_error));
                annotations.insert("pre.hook.backup.velero.io/timeout".into(), json!("2s"));
                let post = serde_json::to_string(&post_command(&p.name)).unwrap_or_default();
                annotations.insert("post.hook.backup.velero.io/command".into(), json!(post));
                annotations.insert("post.hook.backup.velero.io/timeout".into(), json!("2s"));
            }
            let mut labels = json!({"app": p.app.to_string()});
            if p.excluded {
                labels["velero.io/exclude-from-backup"] = json!("true");
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
            let mut meta = json!({"namespace": NAMESPACES[c.ns], "name": c.name, "uid": format!("uid-{}", c.name), "labels": labels});
            if c.deleting {
                meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            let (spec, phase) =
                if c.bound { (json!({"volumeName": pv_name(c.ns, &c.name)}), "Bound") } else { (json!({}), "Pending") };
            out.push((
                rt("persistentvolumeclaims"),
                json!({"metadata": meta, "spec": spec, "status": {"phase": phase}}),
            ));
            if c.bound && !c.pv_missing {
                let pv = pv_name(c.ns, &c.name);
                out.push((rt("persistentvolumes"), json!({"metadata": {"name": pv, "uid": format!("uid-{pv}")}})));
            }
        }
        let mut roles = BTreeSet::new();
        for s in &self.sas {
            out.push((rt("serviceaccounts"), json!({"metadata": {"namespace": NAMESPACES[s.ns], "name": s.name}})));
            for r in &s.roles {
                roles.insert(r.clone());
                out.push((
                    rt("clusterrolebindings"),
                    json!({"metadata": {"name": format!("{}-{}-{r}", NAMESPACES[s.ns], s.name)},
                           "subjects": [{"kind": "ServiceAccount", "name": s.name, "namespace": NAMESPACES[s.ns]}],
                           "roleRef": {"kind": "ClusterRole", "name": r}}),
                ));
            }
        }
        for r in roles {
            out.push((rt("clusterroles"), json!({"metadata": {"name": r}})));
        }
        for pc in ["pc0", "pc1"] {
            out.push((rt("priorityclasses"), json!({"metadata": {"name": pc}, "value": 1000})));
        }
        for (ns, n) in &self.configmaps {
            out.push((
                rt("configmaps"),
                json!({"metadata": {"namespace": NAMESPACES[*ns], "name": n}, "data": {"k": n}}),
            ));
        }
        for (ns, n) in &self.widgets {
            out.push((
                rt("widgets"),
                json!({"metadata": {"namespace": NAMESPACES[*ns], "name": n}, "spec": {"size": 3}}),
            ));
        }
        out
    }

    /// The fake cluster serving this model.
    pub fn fake(&self) -> FakeCluster {
        let mut f = FakeCluster::new();
        for rt in model_resources() {
            f.add_resource(rt);
        }
        for (rt, o) in self.objects() {
            f.add_object(&rt, o);
        }
        f
    }

    /// The backup spec this model is backed up with.
    pub fn spec(&self, name: &str) -> BackupSpec {
        let mut s = BackupSpec::new(name);
        s.label_selector = self.selector_app.map(|a| format!("app={a}"));
        s.included_namespaces = self.include_ns.iter().map(|&i| NAMESPACES[i].to_string()).collect();
        if self.exclude_pvs {
            s.excluded_resources = vec!["persistentvolumes".into()];
        }
        if !self.ordered_pods.is_empty() {
            s.ordered_resources = vec![("pods".into(), self.ordered_pods.iter().map(|n| format!("ns0/{n}")).collect())];
        }
        if let Some(on_error) = self.spec_hook {
            s.hooks = vec![blockwise_engine::hooks::ResourceHookSpec {
                name: "spec-freeze".into(),
                included_namespaces: vec![],
                excluded_namespaces: vec![],
                label_selector: Some("app=1".into()),
                pre: vec![blockwise_engine::hooks::ExecHookSpec {
                    container: String::new(),
                    command: vec!["spec-freeze".into()],
                    on_error: Some(on_error),
                    timeout: Some("2s".into()),
                }],
                post: vec![],
            }];
        }
        s
    }

    /// Records in the model, for shrinking progress.
    pub fn size(&self) -> usize {
        self.pods.len() + self.pvcs.len() + self.sas.len() + self.configmaps.len() + self.widgets.len()
    }

    /// Candidate one-step smaller models (each drops one record or one option), for shrinking.
    pub fn shrink_candidates(&self) -> Vec<Model> {
        let mut out = Vec::new();
        macro_rules! drop_each {
            ($field:ident) => {
                for i in 0..self.$field.len() {
                    let mut m = self.clone();
                    m.$field.remove(i);
                    out.push(m);
                }
            };
        }
        drop_each!(pods);
        drop_each!(pvcs);
        drop_each!(sas);
        drop_each!(configmaps);
        drop_each!(widgets);
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
        let mut m = self.clone();
        if m.selector_app.take().is_some() {
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

    /// The oracle: blocks per DESIGN §3, computed naively from the model (no engine code).
    /// Each block is a sorted set of keys; blocks are sorted.
    pub fn oracle_blocks(&self) -> Vec<BTreeSet<ItemKey>> {
        let ns_ok = |ns: usize| self.include_ns.is_empty() || self.include_ns.contains(&ns);
        let ns_filtered = !self.include_ns.is_empty();
        let key_pod = |p: &PodM| ItemKey::namespaced("", "pods", NAMESPACES[p.ns], &p.name);
        let key_pvc = |ns: usize, n: &str| ItemKey::namespaced("", "persistentvolumeclaims", NAMESPACES[ns], n);
        let key_pv = |ns: usize, n: &str| ItemKey::cluster("", "persistentvolumes", &pv_name(ns, n));
        // Every object, with whether it is excluded and whether it is a seed.
        let mut exists: BTreeMap<ItemKey, (bool, bool)> = BTreeMap::new();
        let sel_ok = |app: Option<u8>| self.selector_app.is_none() || app.is_some() && app == self.selector_app;
        let cluster_seed = !ns_filtered;
        let used: BTreeSet<usize> = self
            .pods
            .iter()
            .map(|p| p.ns)
            .chain(self.pvcs.iter().map(|c| c.ns))
            .chain(self.sas.iter().map(|s| s.ns))
            .collect();
        for ns in used {
            let k = ItemKey::cluster("", "namespaces", NAMESPACES[ns]);
            exists.insert(k, (!ns_ok(ns), ns_ok(ns) && self.selector_app.is_none()));
        }
        for p in &self.pods {
            exists.insert(key_pod(p), (!ns_ok(p.ns) || p.excluded, sel_ok(Some(p.app))));
        }
        for c in &self.pvcs {
            exists.insert(key_pvc(c.ns, &c.name), (!ns_ok(c.ns) || c.deleting, sel_ok(None)));
            if c.bound && !c.pv_missing {
                exists.insert(key_pv(c.ns, &c.name), (self.exclude_pvs, cluster_seed && sel_ok(None)));
            }
        }
        let mut roles = BTreeSet::new();
        for s in &self.sas {
            exists.insert(
                ItemKey::namespaced("", "serviceaccounts", NAMESPACES[s.ns], &s.name),
                (!ns_ok(s.ns), sel_ok(None)),
            );
            for r in &s.roles {
                roles.insert(r.clone());
                let crb = format!("{}-{}-{r}", NAMESPACES[s.ns], s.name);
                exists.insert(
                    ItemKey::cluster("rbac.authorization.k8s.io", "clusterrolebindings", &crb),
                    (false, cluster_seed && sel_ok(None)),
                );
            }
        }
        for r in roles {
            exists.insert(
                ItemKey::cluster("rbac.authorization.k8s.io", "clusterroles", &r),
                (false, cluster_seed && sel_ok(None)),
            );
        }
        for pc in ["pc0", "pc1"] {
            exists.insert(
                ItemKey::cluster("scheduling.k8s.io", "priorityclasses", pc),
                (false, cluster_seed && sel_ok(None)),
            );
        }
        for (ns, n) in &self.configmaps {
            exists.insert(ItemKey::namespaced("", "configmaps", NAMESPACES[*ns], n), (!ns_ok(*ns), sel_ok(None)));
        }
        for (ns, n) in &self.widgets {
            exists
                .insert(ItemKey::namespaced("example.com", "widgets", NAMESPACES[*ns], n), (!ns_ok(*ns), sel_ok(None)));
        }
        // Relations by brute force: (from, to, together, pull).
        let mut rels: Vec<(ItemKey, ItemKey, bool, bool)> = Vec::new();
        for p in &self.pods {
            for c in &p.claims {
                rels.push((key_pod(p), key_pvc(p.ns, c), true, true));
            }
            if let Some(pc) = &p.priority_class {
                rels.push((key_pod(p), ItemKey::cluster("scheduling.k8s.io", "priorityclasses", pc), false, true));
            }
        }
        for c in &self.pvcs {
            if !c.bound {
                continue;
            }
            rels.push((key_pvc(c.ns, &c.name), key_pv(c.ns, &c.name), true, true));
            for p in &self.pods {
                if p.ns == c.ns && p.phase == "Running" && p.claims.contains(&c.name) {
                    rels.push((key_pvc(c.ns, &c.name), key_pod(p), true, false));
                }
            }
            for o in &self.pvcs {
                if o.ns == c.ns && o.name != c.name && c.group.is_some() && o.group == c.group {
                    rels.push((key_pvc(c.ns, &c.name), key_pvc(o.ns, &o.name), true, true));
                }
            }
        }
        for s in &self.sas {
            let sa = ItemKey::namespaced("", "serviceaccounts", NAMESPACES[s.ns], &s.name);
            for r in &s.roles {
                let crb = format!("{}-{}-{r}", NAMESPACES[s.ns], s.name);
                rels.push((
                    sa.clone(),
                    ItemKey::cluster("rbac.authorization.k8s.io", "clusterrolebindings", &crb),
                    false,
                    true,
                ));
                rels.push((sa.clone(), ItemKey::cluster("rbac.authorization.k8s.io", "clusterroles", r), false, true));
            }
        }
        // Closure to a fixed point.
        let mut inb: BTreeSet<ItemKey> =
            exists.iter().filter(|(_, (ex, seed))| !ex && *seed).map(|(k, _)| k.clone()).collect();
        loop {
            let before = inb.len();
            for (a, b, _, pull) in &rels {
                if *pull && inb.contains(a) && exists.get(b).is_some_and(|(ex, _)| !ex) {
                    inb.insert(b.clone());
                }
            }
            if inb.len() == before {
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
        for (a, b, together, _) in &rels {
            if *together {
                merge(&mut blocks, a, b);
            }
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
