//! A restore as data (issue 13): its spec, its plan, its events and their fold — pure, like the
//! backup's engine. The shell (`adapters/src/restore.rs`) reads the archive, asks [`RestorePlanner`]
//! what to create in which order, records an intent ([`RestoreEvent::CreatesStarted`]) before it
//! sends a create and the outcome ([`RestoreEvent::ItemRestored`]) after; [`RestoreState::fold`]
//! of the log is the restore's state, so a killed restore resumes where it stopped: an item with a
//! durable outcome is never touched again, one with only an intent is looked up first (an object
//! that carries this restore's label is its own earlier create, RT3).
//!
//! The plan is a function of the archive's bytes and the spec only; the `Planned` event records
//! the archive's digest so a resume refuses an archive that changed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::item::GroupResource;
use crate::restore::{label_value, prepare, restorable, restore_order, skip_reason, RestoreNaming, RESTORE_NAME_LABEL};
use crate::spec::{glob_match, validate_backup_name, LabelSelector, SpecError};

/// The snapshot API group.
const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";

/// Velero's existing-resource policy: what a restore does with an object that exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ExistingPolicy {
    /// Leave it, with a warning (Velero's default).
    #[default]
    None,
    /// Patch it to the backed-up version (labels, annotations, spec and the other top-level
    /// fields); a failed patch is a warning.
    Update,
}

impl ExistingPolicy {
    /// Parses `none` or `update`.
    pub fn parse(s: &str) -> Result<ExistingPolicy, String> {
        match s {
            "none" => Ok(ExistingPolicy::None),
            "update" => Ok(ExistingPolicy::Update),
            other => Err(format!("the existing-resource policy must be none or update, not {other:?}")),
        }
    }

    /// Its flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExistingPolicy::None => "none",
            ExistingPolicy::Update => "update",
        }
    }
}

/// What a restore restores (Velero's Restore spec, by its field names where it has one).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// The restore's name.
    pub name: String,
    /// The backup restored from (its name labels every restored object).
    pub backup_name: String,
    /// Namespaces restored (globs; empty or `*`: all).
    pub included_namespaces: Vec<String>,
    /// Namespaces not restored (globs).
    pub excluded_namespaces: Vec<String>,
    /// Resources restored (plural, `plural.group`, kind, or `*`; empty: all).
    pub included_resources: Vec<String>,
    /// Resources not restored.
    pub excluded_resources: Vec<String>,
    /// Namespace mappings, archived → restored.
    pub namespace_mapping: BTreeMap<String, String>,
    /// What to do with objects that exist.
    pub existing_resource_policy: ExistingPolicy,
    /// Claims with a snapshot are provisioned from it (pre-provisioned VolumeSnapshotContent from
    /// the recorded handle, a VolumeSnapshot bound to it, the claim's `dataSource`).
    pub restore_volumes: bool,
    /// Only objects whose labels match (Kubernetes selector syntax).
    pub label_selector: Option<String>,
}

impl RestoreSpec {
    /// A spec restoring everything of `backup` as `name`.
    pub fn new(name: &str, backup: &str) -> RestoreSpec {
        RestoreSpec { name: name.into(), backup_name: backup.into(), ..RestoreSpec::default() }
    }

    /// Checks the names, the mappings and the selector.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_backup_name(&self.name).map_err(|_| SpecError::BadRestore {
            what: "restore name",
            value: self.name.clone(),
            reason: "use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit".into(),
        })?;
        if !crate::item::is_safe_name(&self.backup_name) {
            return Err(SpecError::BadRestore {
                what: "backup name",
                value: self.backup_name.clone(),
                reason: "it must be a name".into(),
            });
        }
        for (from, to) in &self.namespace_mapping {
            for ns in [from, to] {
                if validate_backup_name(ns).is_err() {
                    return Err(SpecError::BadRestore {
                        what: "namespace in the namespace mappings",
                        value: ns.clone(),
                        reason: "a namespace is 1-63 lower-case letters, digits and '-'".into(),
                    });
                }
            }
        }
        if let Some(sel) = &self.label_selector {
            LabelSelector::parse(sel)?;
        }
        Ok(())
    }

    fn naming(&self) -> RestoreNaming {
        RestoreNaming {
            backup: self.backup_name.clone(),
            restore: self.name.clone(),
            namespaces: self.namespace_mapping.clone(),
        }
    }

    fn namespaces_filtered(&self) -> bool {
        let all = self.included_namespaces.is_empty() || self.included_namespaces.iter().any(|n| n == "*");
        !all || !self.excluded_namespaces.is_empty()
    }

    fn namespace_included(&self, ns: &str) -> bool {
        let included =
            self.included_namespaces.is_empty() || self.included_namespaces.iter().any(|p| glob_match(p, ns));
        included && !self.excluded_namespaces.iter().any(|p| glob_match(p, ns))
    }

    fn resource_included(&self, gr: &GroupResource, kind: &str) -> bool {
        let named = |n: &String| {
            let n = n.to_ascii_lowercase();
            n == "*" || n == gr.resource || n == gr.dir_name() || n == kind.to_ascii_lowercase()
        };
        (self.included_resources.is_empty() || self.included_resources.iter().any(named))
            && !self.excluded_resources.iter().any(named)
    }
}

/// Parses `a:b,c:d` into a mapping.
pub fn parse_namespace_mappings(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = pair
            .split_once(':')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty())
            .ok_or_else(|| format!("namespace mappings: {pair:?} is not OLD:NEW"))?;
        if out.insert(a.to_string(), b.to_string()).is_some() {
            return Err(format!("namespace mappings: namespace {a:?} is mapped twice"));
        }
    }
    Ok(out)
}

/// One item read from an archive: its resource directory (`<resource>[.<group>]`), archived
/// namespace, name and JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedItem {
    /// `<resource>[.<group>]`, as the archive's directory names it.
    pub dir: String,
    /// Archived namespace (`None`: cluster-scoped).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The object.
    pub json: String,
}

/// The group/resource a Velero resource directory names: `pods` → core pods, `deployments.apps` →
/// apps deployments.
pub fn dir_group_resource(dir: &str) -> GroupResource {
    match dir.split_once('.') {
        Some((resource, group)) => GroupResource::new(group, resource),
        None => GroupResource::new("", dir),
    }
}

/// An item as recorded in the log: resource, restored namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RestoreRef {
    /// `<resource>[.<group>]`.
    pub resource: String,
    /// The namespace it is restored into (`None`: cluster-scoped).
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for RestoreRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.resource, self.name),
            None => write!(f, "{} {}", self.resource, self.name),
        }
    }
}

/// Where the caller keeps an archived item's JSON: opaque to the planner, handed back with each
/// planned item so that the body is read again when the item is created — a restore holds no
/// archived object longer than its create (the shell's spill file: offset and length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BodyAt {
    /// Offset (or any position the caller understands).
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// The resource, version and kind that planned items share (items hold an index to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemType {
    /// `<resource>[.<group>]`, the archive's directory.
    pub dir: String,
    /// Its group/resource.
    pub gr: GroupResource,
    /// The version of its `apiVersion`.
    pub version: String,
    /// Its kind.
    pub kind: String,
}

/// What is done to an archived object, beyond [`prepare`], before its create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit {
    None,
    /// A claim whose volume is provisioned anew: its `spec.volumeName` goes.
    Unbind,
    /// A claim provisioned from a snapshot, or the snapshot objects it is provisioned from
    /// (`--restore-volumes`): index in [`RestorePlan::provisions`].
    Provision(u32),
}

/// One object the restore creates: its identity, and where its archived JSON is — the body is
/// made when it is created ([`RestorePlan::body`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedItem {
    ty: u32,
    /// The namespace it is restored into (`None`: cluster-scoped).
    pub namespace: Option<Box<str>>,
    /// Its name (a Namespace's, mapped).
    pub name: Box<str>,
    /// Where its archived JSON is; `None` for a namespace the plan ensures (made from nothing).
    pub archived: Option<BodyAt>,
    edit: Edit,
    /// A namespace the restore creates because something restored lives in it and the archive
    /// (or the filters) do not bring its Namespace object: it existing already is no warning.
    pub ensured: bool,
}

/// An archived item the restore does not create, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skip {
    /// The item (archived namespace).
    pub item: RestoreRef,
    /// Why.
    pub reason: String,
}

/// What the planner decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RestorePlan {
    /// The types of `items`.
    pub types: Vec<ItemType>,
    /// What to create, in order; stage boundaries in `stages`.
    pub items: Vec<PlannedItem>,
    /// Runs of `items` of one resource, in restore order: a stage is created after every earlier
    /// stage has its outcome (and, for CRDs, once they are established).
    pub stages: Vec<(GroupResource, std::ops::Range<usize>)>,
    /// Archived items left out by a rule (not by a filter).
    pub skipped: Vec<Skip>,
    /// Archived items that cannot be restored (not a JSON object, no metadata, …).
    pub invalid: Vec<Skip>,
    /// Archived items the filters left out.
    pub filtered: usize,
    naming: RestoreNaming,
    /// Claims provisioned from snapshots (`--restore-volumes`): (archived namespace, what).
    provisions: Vec<(String, VolumeFromSnapshot)>,
}

impl RestorePlan {
    /// An item's resource, version and kind.
    pub fn item_type(&self, item: &PlannedItem) -> &ItemType {
        &self.types[item.ty as usize]
    }

    /// What an item is, as the log records it.
    pub fn target(&self, item: &PlannedItem) -> RestoreRef {
        RestoreRef {
            resource: self.item_type(item).dir.clone(),
            namespace: item.namespace.as_deref().map(str::to_string),
            name: item.name.to_string(),
        }
    }

    /// The object to create for `item` from its archived JSON (`archived`: the bytes at
    /// [`PlannedItem::archived`]; `None` for an ensured namespace): prepared ([`prepare`]), its
    /// claim unbound or provisioned from its snapshot as the plan decided. An archived JSON that
    /// no longer reads as it did when planned is an error naming what is wrong.
    pub fn body(&self, item: &PlannedItem, archived: Option<&str>) -> Result<Value, String> {
        let ty = self.item_type(item);
        let Some(json) = archived else {
            return Ok(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": &*item.name}}));
        };
        let mut obj: Value = serde_json::from_str(json).map_err(|e| format!("the archived object is not JSON: {e}"))?;
        if item.edit == Edit::Unbind {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("volumeName");
            }
        }
        prepare(&ty.gr, &mut obj, &self.naming).map_err(|e| e.reason)?;
        if let Edit::Provision(i) = item.edit {
            if let Some((ns, v)) = self.provisions.get(i as usize) {
                pre_provision(&ty.gr, &mut obj, ns, v, &self.naming);
            }
        }
        Ok(obj)
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect())
        .unwrap_or_default()
}

/// The version part of an `apiVersion` (`apps/v1` → `v1`).
fn version_of(api_version: &str) -> String {
    api_version.rsplit('/').next().unwrap_or(api_version).to_string()
}

fn is_core(gr: &GroupResource, resource: &str) -> bool {
    gr.group.is_empty() && gr.resource == resource
}

fn is_snapshot(gr: &GroupResource, resource: &str) -> bool {
    gr.group == SNAPSHOT_GROUP && gr.resource == resource
}

/// The snapshot a claim is provisioned from under `--restore-volumes`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VolumeFromSnapshot {
    claim: String,
    snapshot: String,
    content: String,
    handle: String,
    driver: String,
    class: Option<String>,
}

/// What planning reads of an archived object beyond its identity, by kind.
enum Extra {
    None,
    /// A claim's `spec.volumeName`.
    Claim(Option<Box<str>>),
    /// A volume: whether its reclaim policy is Delete.
    Volume {
        delete: bool,
    },
    /// A VolumeSnapshot: its claim, bound content and class.
    Snapshot(Box<[Option<String>; 3]>),
    /// A VolumeSnapshotContent: its handle and driver.
    Content(Box<[Option<String>; 2]>),
}

/// What planning keeps of one archived item: its identity, where its JSON is, and the few facts
/// the rules read — never the object.
struct Fact {
    ty: u32,
    namespace: Option<Box<str>>,
    name: Box<str>,
    at: BodyAt,
    /// A `<version>-preferredversion` copy: used only when the archive has no primary copy.
    copy: bool,
    /// Position in the archive: of two entries for one item, the later one counts (as a tar
    /// extracts).
    seq: u32,
    /// Why it cannot be restored at all (not JSON, no kind, no metadata object).
    invalid: Option<Box<str>>,
    /// Whether the filters (resources, label selector, namespaces) select it.
    selected: bool,
    /// A rule that skips it ([`skip_reason`]).
    rule: Option<Box<str>>,
    /// Why [`prepare`] refuses it (counted only if the filters and rules keep it).
    unpreparable: Option<Box<str>>,
    extra: Extra,
}

/// Plans a restore item by item (see the module docs and `docs/restore.md`): [`add`] reads each
/// archived item once, keeps what the rules need (a [`Fact`], a few dozen bytes) and drops the
/// object; [`plan`] applies the filters, the rules that skip and Velero's order. Deterministic: the
/// same archive and spec give the same plan, whatever the order of `add`s.
///
/// [`add`]: RestorePlanner::add
/// [`plan`]: RestorePlanner::plan
pub struct RestorePlanner {
    spec: RestoreSpec,
    naming: RestoreNaming,
    selector: Option<LabelSelector>,
    types: Vec<ItemType>,
    type_ids: BTreeMap<(String, String, String), u32>,
    facts: Vec<Fact>,
}

impl RestorePlanner {
    /// A planner for `spec`. A spec that does not validate — a selector that does not parse, above
    /// all, which would otherwise select everything — is an error, never a wider restore.
    pub fn new(spec: &RestoreSpec) -> Result<RestorePlanner, SpecError> {
        spec.validate()?;
        Ok(RestorePlanner {
            naming: spec.naming(),
            selector: spec.label_selector.as_deref().map(LabelSelector::parse).transpose()?,
            spec: spec.clone(),
            types: Vec::new(),
            type_ids: BTreeMap::new(),
            facts: Vec::new(),
        })
    }

    fn type_id(&mut self, dir: &str, version: &str, kind: &str) -> u32 {
        let key = (dir.to_string(), version.to_string(), kind.to_string());
        if let Some(id) = self.type_ids.get(&key) {
            return *id;
        }
        let id = self.types.len() as u32;
        let gr = dir_group_resource(dir);
        self.types.push(ItemType { dir: gr.dir_name(), gr, version: version.into(), kind: kind.into() });
        self.type_ids.insert(key, id);
        id
    }

    /// Reads one archived item: its resource directory (`<resource>[.<group>]`), archived
    /// namespace and name, its JSON, and where the caller keeps that JSON. `copy`: it is a
    /// `<version>-preferredversion` copy (used only if the archive has no primary copy).
    pub fn add(&mut self, dir: &str, namespace: Option<&str>, name: &str, json: &str, at: BodyAt, copy: bool) {
        let seq = self.facts.len() as u32;
        let mut fact = Fact {
            ty: 0,
            namespace: namespace.map(Box::from),
            name: Box::from(name),
            at,
            copy,
            seq,
            invalid: None,
            selected: false,
            rule: None,
            unpreparable: None,
            extra: Extra::None,
        };
        let parsed: Result<Value, String> = match serde_json::from_str(json) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err("the archived object is not a JSON object".into()),
            Err(e) => Err(format!("the archived object is not JSON: {e}")),
        };
        let typed = parsed.and_then(|obj| match (str_at(&obj, "/kind"), str_at(&obj, "/apiVersion")) {
            (Some(kind), Some(api)) => Ok((kind.to_string(), version_of(api), obj)),
            _ => Err("the archived object has no kind or apiVersion".into()),
        });
        let (kind, version, mut obj) = match typed {
            Ok(t) => t,
            Err(reason) => {
                fact.ty = self.type_id(dir, "", "");
                fact.invalid = Some(reason.into());
                self.facts.push(fact);
                return;
            }
        };
        fact.ty = self.type_id(dir, &version, &kind);
        let gr = &self.types[fact.ty as usize].gr;
        fact.selected = self.spec.resource_included(gr, &kind)
            && self.selector.as_ref().is_none_or(|sel| sel.matches(&labels_of(&obj)))
            && match namespace {
                Some(ns) => self.spec.namespace_included(ns),
                None if is_core(gr, "namespaces") => self.spec.namespace_included(name),
                None => true,
            };
        fact.rule = skip_reason(gr, &obj).map(Box::from);
        let text = |p: &str| str_at(&obj, p).map(str::to_string);
        fact.extra = if is_core(gr, "persistentvolumeclaims") {
            Extra::Claim(str_at(&obj, "/spec/volumeName").map(Box::from))
        } else if is_core(gr, "persistentvolumes") {
            Extra::Volume { delete: str_at(&obj, "/spec/persistentVolumeReclaimPolicy") == Some("Delete") }
        } else if is_snapshot(gr, "volumesnapshots") {
            Extra::Snapshot(Box::new([
                text("/spec/source/persistentVolumeClaimName"),
                text("/status/boundVolumeSnapshotContentName"),
                text("/spec/volumeSnapshotClassName"),
            ]))
        } else if is_snapshot(gr, "volumesnapshotcontents") {
            Extra::Content(Box::new([text("/status/snapshotHandle"), text("/spec/driver")]))
        } else {
            Extra::None
        };
        // Whether it can be prepared is known now: the object goes, and its create, much later,
        // must not be the first to find out.
        fact.unpreparable = prepare(gr, &mut obj, &self.naming).err().map(|e| Box::from(e.reason));
        self.facts.push(fact);
    }

    /// The plan of every item read.
    pub fn plan(mut self) -> RestorePlan {
        let spec = &self.spec;
        let types = &self.types;
        // One entry per item: the primary copy if there is one, else the preferred-version copy;
        // of two entries with one path, the later.
        fn key<'a>(types: &'a [ItemType], f: &'a Fact) -> (&'a str, Option<&'a str>, &'a str) {
            (types[f.ty as usize].dir.as_str(), f.namespace.as_deref(), &f.name)
        }
        self.facts.sort_by(|a, b| key(types, a).cmp(&key(types, b)).then(a.copy.cmp(&b.copy)).then(b.seq.cmp(&a.seq)));
        self.facts.dedup_by(|later, first| key(types, later) == key(types, first));
        let archived_ref = |f: &Fact| RestoreRef {
            resource: types[f.ty as usize].dir.clone(),
            namespace: f.namespace.as_deref().map(str::to_string),
            name: f.name.to_string(),
        };
        let mut plan = RestorePlan { naming: self.naming.clone(), ..RestorePlan::default() };
        let mut facts: Vec<Fact> = Vec::with_capacity(self.facts.len());
        for f in std::mem::take(&mut self.facts) {
            match &f.invalid {
                Some(reason) => plan.invalid.push(Skip { item: archived_ref(&f), reason: reason.to_string() }),
                None => facts.push(f),
            }
        }
        let gr_of = |f: &Fact| -> &GroupResource { &types[f.ty as usize].gr };
        fn claim_volume(f: &Fact) -> Option<&str> {
            match &f.extra {
                Extra::Claim(v) => v.as_deref(),
                _ => None,
            }
        }

        // Filters. With namespaces filtered, cluster-scoped objects come only where restored
        // objects need them (Velero's default for cluster resources): the CRDs of restored custom
        // resources, the volumes of restored claims.
        let mut keep: Vec<bool> = facts.iter().map(|f| f.selected).collect();
        if spec.namespaces_filtered() {
            let groups: BTreeSet<&str> = facts
                .iter()
                .zip(&keep)
                .filter(|(f, k)| **k && f.namespace.is_some())
                .map(|(f, _)| types[f.ty as usize].dir.as_str())
                .collect();
            let volumes: BTreeSet<&str> =
                facts.iter().zip(&keep).filter(|(_, k)| **k).filter_map(|(f, _)| claim_volume(f)).collect();
            let mut narrowed = keep.clone();
            for (i, f) in facts.iter().enumerate() {
                let gr = gr_of(f);
                if f.namespace.is_some() || is_core(gr, "namespaces") || !keep[i] {
                    continue;
                }
                narrowed[i] = if gr.group == "apiextensions.k8s.io" && gr.resource == "customresourcedefinitions" {
                    groups.contains(&*f.name)
                } else if is_core(gr, "persistentvolumes") {
                    volumes.contains(&*f.name)
                } else {
                    false
                };
            }
            keep = narrowed;
        }
        plan.filtered = keep.iter().filter(|k| !**k).count();
        let facts: Vec<Fact> = facts.into_iter().zip(keep).filter(|(_, k)| *k).map(|(f, _)| f).collect();

        // Volumes from snapshots: a claim whose VolumeSnapshot (and its content's handle) is
        // archived.
        let mut from_snapshot: BTreeMap<(String, String), VolumeFromSnapshot> = BTreeMap::new();
        if spec.restore_volumes {
            let contents: BTreeMap<&str, &[Option<String>; 2]> = facts
                .iter()
                .filter_map(|f| match &f.extra {
                    Extra::Content(c) => Some((&*f.name, &**c)),
                    _ => None,
                })
                .collect();
            for f in &facts {
                let Extra::Snapshot(s) = &f.extra else { continue };
                let [Some(claim), Some(content), class] = &**s else { continue };
                let Some(ns) = &f.namespace else { continue };
                let Some([Some(handle), Some(driver)]) = contents.get(content.as_str()) else { continue };
                from_snapshot.insert(
                    (ns.to_string(), claim.clone()),
                    VolumeFromSnapshot {
                        claim: claim.clone(),
                        snapshot: f.name.to_string(),
                        content: content.clone(),
                        handle: handle.clone(),
                        driver: driver.clone(),
                        class: class.clone(),
                    },
                );
            }
        }
        // In the map's order (by archived namespace and claim); what the rules and `body` read.
        plan.provisions = from_snapshot.into_iter().map(|((ns, _), v)| (ns, v)).collect();
        // Which provision a claim, a snapshot or a content is part of (the first, as named).
        let (mut by_claim, mut by_snapshot, mut by_content) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for (i, (ns, v)) in plan.provisions.iter().enumerate() {
            by_claim.entry((ns.as_str(), v.claim.as_str())).or_insert(i as u32);
            by_snapshot.entry((ns.as_str(), v.snapshot.as_str())).or_insert(i as u32);
            by_content.entry(v.content.as_str()).or_insert(i as u32);
        }
        let provisioned_volumes: BTreeSet<&str> = facts
            .iter()
            .filter(|f| f.namespace.as_deref().is_some_and(|ns| by_claim.contains_key(&(ns, &*f.name))))
            .filter_map(claim_volume)
            .collect();
        // Snapshot objects in use: VolumeSnapshots by namespace and name (two namespaces may both
        // have a `data` snapshot), contents by name (cluster-scoped).
        let used_snapshots: BTreeSet<(Option<&str>, &str)> = plan
            .provisions
            .iter()
            .flat_map(|(ns, v)| [(Some(ns.as_str()), v.snapshot.as_str()), (None, v.content.as_str())])
            .collect();
        // Volumes restored as new ones (Velero's rule): a PersistentVolume whose reclaim policy is
        // Delete and that no snapshot restores is not recreated — created as archived it would
        // bind this cluster to the old cluster's live disk, and deleting the restored claim would
        // delete that disk — so its claim is provisioned anew. A Retain volume is restored as
        // archived.
        let reprovisioned: BTreeSet<&str> = facts
            .iter()
            .filter(|f| matches!(f.extra, Extra::Volume { delete: true }) && !provisioned_volumes.contains(&*f.name))
            .map(|f| &*f.name)
            .collect();
        let provision_of = |f: &Fact| -> Option<u32> {
            let gr = gr_of(f);
            let ns = f.namespace.as_deref().unwrap_or("");
            if is_core(gr, "persistentvolumeclaims") && f.namespace.is_some() {
                by_claim.get(&(ns, &*f.name)).copied()
            } else if is_snapshot(gr, "volumesnapshots") && f.namespace.is_some() {
                by_snapshot.get(&(ns, &*f.name)).copied()
            } else if is_snapshot(gr, "volumesnapshotcontents") {
                by_content.get(&*f.name).copied()
            } else {
                None
            }
        };

        // Rules.
        let mut by_gr: BTreeMap<GroupResource, Vec<PlannedItem>> = BTreeMap::new();
        let mut namespaces_needed: BTreeSet<String> = BTreeSet::new();
        let mut namespaces_planned: BTreeSet<String> = BTreeSet::new();
        let (mut skipped, mut invalid) = (Vec::new(), Vec::new());
        for f in &facts {
            let gr = gr_of(f);
            let skip = |reason: &str| Skip { item: archived_ref(f), reason: reason.to_string() };
            if !restorable(gr) {
                skipped.push(skip("this resource is never restored"));
                continue;
            }
            if let Some(reason) = &f.rule {
                skipped.push(skip(reason));
                continue;
            }
            let vsc = is_snapshot(gr, "volumesnapshotcontents");
            if is_snapshot(gr, "volumesnapshots")
                || vsc
                || is_snapshot(gr, "volumegroupsnapshots")
                || is_snapshot(gr, "volumegroupsnapshotcontents")
            {
                let ns = if vsc { None } else { f.namespace.as_deref() };
                if !used_snapshots.contains(&(ns, &*f.name)) {
                    skipped.push(skip(if spec.restore_volumes {
                        "a snapshot object no restored claim is provisioned from"
                    } else {
                        "snapshot objects are restored only when volumes are restored (restorePVs, --restore-volumes)"
                    }));
                    continue;
                }
            }
            if is_core(gr, "persistentvolumes") && provisioned_volumes.contains(&*f.name) {
                skipped.push(skip("its claim is provisioned again from its snapshot (volumes are restored)"));
                continue;
            }
            if is_core(gr, "persistentvolumes") && reprovisioned.contains(&*f.name) {
                skipped.push(skip(
                    "its reclaim policy is Delete and no snapshot restores it: its claim gets a new volume \
                     (restored as is, it would bind this cluster to the old disk)",
                ));
                continue;
            }
            if let Some(reason) = &f.unpreparable {
                invalid.push(skip(reason));
                continue;
            }
            let edit = match provision_of(f) {
                Some(i) => Edit::Provision(i),
                None if claim_volume(f).is_some_and(|v| reprovisioned.contains(v)) => Edit::Unbind,
                None => Edit::None,
            };
            let target_ns = f.namespace.as_deref().map(|ns| plan.naming.namespace(ns).to_string());
            let target_name =
                if is_core(gr, "namespaces") { plan.naming.namespace(&f.name).to_string() } else { f.name.to_string() };
            if let Some(ns) = &target_ns {
                namespaces_needed.insert(ns.clone());
            }
            if is_core(gr, "namespaces") {
                namespaces_planned.insert(target_name.clone());
            }
            by_gr.entry(gr.clone()).or_default().push(PlannedItem {
                ty: f.ty,
                namespace: target_ns.map(Box::from),
                name: target_name.into(),
                archived: Some(f.at),
                edit,
                ensured: false,
            });
        }
        plan.skipped = skipped;
        plan.invalid.extend(invalid);
        drop(facts);
        // Every namespace something is restored into exists before it (Velero's
        // EnsureNamespaceExistsAndIsReady): bare Namespaces for those the archive does not bring.
        let namespace_type = self.type_id("namespaces", "v1", "Namespace");
        for ns in namespaces_needed.difference(&namespaces_planned) {
            by_gr.entry(GroupResource::new("", "namespaces")).or_default().push(PlannedItem {
                ty: namespace_type,
                namespace: None,
                name: ns.as_str().into(),
                archived: None,
                edit: Edit::None,
                ensured: true,
            });
        }
        let mut order = restore_order(by_gr.keys());
        if crate::mutation::active(crate::mutation::Mutation::RestoreClaimsBeforeVolumes) {
            let at = |r: &str| order.iter().position(|g| g.group.is_empty() && g.resource == r);
            if let (Some(pv), Some(pvc)) = (at("persistentvolumes"), at("persistentvolumeclaims")) {
                order.swap(pv, pvc);
            }
        }
        plan.items.reserve_exact(by_gr.values().map(Vec::len).sum());
        for gr in order {
            let Some(mut items) = by_gr.remove(&gr) else { continue };
            items.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            let start = plan.items.len();
            plan.items.extend(items);
            plan.stages.push((gr, start..plan.items.len()));
        }
        plan.types = self.types;
        plan
    }
}

/// Plans a restore of `archive` under `spec` (every item in memory; [`RestorePlanner`] reads one at
/// a time): item `i`'s [`BodyAt::offset`] is its index in `archive`.
pub fn plan_restore(spec: &RestoreSpec, archive: &[ArchivedItem]) -> Result<RestorePlan, SpecError> {
    let mut planner = RestorePlanner::new(spec)?;
    for (i, a) in archive.iter().enumerate() {
        planner.add(&a.dir, a.namespace.as_deref(), &a.name, &a.json, BodyAt { offset: i as u64, len: 0 }, false);
    }
    Ok(planner.plan())
}

/// Rewrites a claim, a VolumeSnapshot or a VolumeSnapshotContent for `--restore-volumes`; `ns`:
/// the archived namespace of the claim and its snapshot.
fn pre_provision(gr: &GroupResource, obj: &mut Value, ns: &str, v: &VolumeFromSnapshot, naming: &RestoreNaming) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else { return };
    if is_core(gr, "persistentvolumeclaims") {
        spec.remove("volumeName");
        let source = json!({"apiGroup": SNAPSHOT_GROUP, "kind": "VolumeSnapshot", "name": v.snapshot});
        spec.insert("dataSource".into(), source.clone());
        spec.insert("dataSourceRef".into(), source);
    } else if is_snapshot(gr, "volumesnapshots") {
        spec.insert("source".into(), json!({"volumeSnapshotContentName": v.content}));
    } else if is_snapshot(gr, "volumesnapshotcontents") {
        spec.insert("source".into(), json!({"snapshotHandle": v.handle}));
        spec.insert("deletionPolicy".into(), json!("Retain"));
        spec.insert("driver".into(), json!(v.driver));
        spec.insert(
            "volumeSnapshotRef".into(),
            json!({"apiVersion": format!("{SNAPSHOT_GROUP}/v1"), "kind": "VolumeSnapshot",
                   "name": v.snapshot, "namespace": naming.namespace(ns)}),
        );
        match &v.class {
            Some(c) => spec.insert("volumeSnapshotClassName".into(), json!(c)),
            None => spec.remove("volumeSnapshotClassName"),
        };
    }
}

/// Whether an object found in the cluster is this restore's own create (RT3): it carries the
/// restore's name label.
///
/// `uid`: the restore's own id (a Restore object's uid), which the restore also writes into
/// [`RESTORE_UID_ANNOTATION`] — with it, an object an earlier restore of the same name created
/// (a Restore deleted and created again) is not taken for this one's. An object with the label
/// and no such annotation counts as this restore's (made before the annotation existed).
pub fn restored_by(existing: &Value, restore: &str, uid: Option<&str>) -> bool {
    let named = str_at(existing, &format!("/metadata/labels/{}", RESTORE_NAME_LABEL.replace('/', "~1")))
        == Some(label_value(restore).as_str());
    let annotation = format!("/metadata/annotations/{}", RESTORE_UID_ANNOTATION.replace('/', "~1"));
    named && uid.is_none_or(|u| str_at(existing, &annotation).is_none_or(|a| a == u))
}

/// The annotation naming the restore (its object's uid) that created an object, when the restore
/// has one (Restores of the controller).
pub const RESTORE_UID_ANNOTATION: &str = "blockwise.dev/restore-uid";

/// `body` with the [`RESTORE_UID_ANNOTATION`] of restore `uid`.
pub fn with_restore_uid(body: &Value, uid: &str) -> Value {
    let mut b = body.clone();
    if let Some(meta) = b.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(RESTORE_UID_ANNOTATION.into(), json!(uid));
        }
    }
    b
}

/// The JSON merge patch that makes an existing object the backed-up version under
/// `--existing-resource-policy update`: its labels and annotations, and every top-level field but
/// `metadata`, `apiVersion`, `kind` and `status`.
pub fn update_patch(prepared: &Value) -> Value {
    let mut patch = serde_json::Map::new();
    if let Some(o) = prepared.as_object() {
        for (k, v) in o {
            if !matches!(k.as_str(), "metadata" | "apiVersion" | "kind" | "status") {
                patch.insert(k.clone(), v.clone());
            }
        }
    }
    let mut meta = serde_json::Map::new();
    for f in ["labels", "annotations"] {
        if let Some(v) = prepared.pointer(&format!("/metadata/{f}")) {
            meta.insert(f.into(), v.clone());
        }
    }
    patch.insert("metadata".into(), Value::Object(meta));
    Value::Object(patch)
}

/// How one item's restore ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemOutcome {
    /// Created by this restore (or found carrying its label after a crash).
    Created,
    /// It existed and was left as it is; the warning, if it is one.
    Existed { warning: Option<String> },
    /// It existed and was patched to the backed-up version (`update`).
    Updated,
    /// It could not be restored.
    Failed { error: String },
}

/// The restore's phases, Velero's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestorePhase {
    /// Running (or interrupted: `restore resume` continues it).
    InProgress,
    /// Every item restored.
    Completed,
    /// Some items failed.
    PartiallyFailed,
    /// The restore could not run (its archive unreadable, …).
    Failed,
}

impl std::fmt::Display for RestorePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestorePhase::InProgress => "InProgress",
            RestorePhase::Completed => "Completed",
            RestorePhase::PartiallyFailed => "PartiallyFailed",
            RestorePhase::Failed => "Failed",
        })
    }
}

/// A restore's events. Variants are only appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestoreEvent {
    /// Intent: the restore is asked for; `source` says where its archive is.
    Requested { spec: RestoreSpec, source: String, workers: u32, at_ms: u64 },
    /// Fact: the archive was read and planned. `archive_sha256` pins the archive; `planned` counts
    /// the objects to create by resource; `skipped` and `invalid` are the plan's.
    Planned {
        archive_sha256: String,
        items: u32,
        planned: BTreeMap<String, u32>,
        skipped: Vec<Skip>,
        invalid: Vec<Skip>,
        filtered: u32,
        at_ms: u64,
    },
    /// Intent: the creates of these plan items are about to be sent.
    CreatesStarted { items: Vec<u32> },
    /// Fact: plan item `item` has its outcome.
    ItemRestored { item: u32, target: RestoreRef, outcome: ItemOutcome, at_ms: u64 },
    /// Fact: the restore could not go on (its archive cannot be read or planned).
    RestoreFailed { error: String, at_ms: u64 },
    /// Fact: every planned item has its outcome.
    RestoreFinished { at_ms: u64 },
}

impl RestoreEvent {
    /// The variant's name.
    pub fn kind(&self) -> &'static str {
        match self {
            RestoreEvent::Requested { .. } => "Requested",
            RestoreEvent::Planned { .. } => "Planned",
            RestoreEvent::CreatesStarted { .. } => "CreatesStarted",
            RestoreEvent::ItemRestored { .. } => "ItemRestored",
            RestoreEvent::RestoreFailed { .. } => "RestoreFailed",
            RestoreEvent::RestoreFinished { .. } => "RestoreFinished",
        }
    }
}

/// Counts of one resource or namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Planned.
    pub planned: u32,
    /// Created.
    pub created: u32,
    /// Existed (left or updated).
    pub existed: u32,
    /// Failed.
    pub failed: u32,
}

/// Warnings or errors the way Velero's restore results group them: cluster-scoped, and by
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Results {
    /// About cluster-scoped objects and the restore itself.
    pub cluster: Vec<String>,
    /// About objects in each namespace.
    pub namespaces: BTreeMap<String, Vec<String>>,
}

impl Results {
    fn add(&mut self, ns: Option<&str>, msg: String) {
        match ns {
            Some(ns) => self.namespaces.entry(ns.to_string()).or_default().push(msg),
            None => self.cluster.push(msg),
        }
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        self.cluster.len() + self.namespaces.values().map(Vec::len).sum::<usize>()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A restore's log does not fold: which record and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("restore event {seq}: {reason}")]
pub struct RestoreFoldError {
    /// The record.
    pub seq: u64,
    /// What contradicts what.
    pub reason: String,
}

/// The fold of a restore's events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RestoreState {
    /// The request.
    pub spec: RestoreSpec,
    /// Where the archive is.
    pub source: String,
    /// Creates in flight at once.
    pub workers: u32,
    /// When it was requested.
    pub started_ms: u64,
    /// The archive's digest, once planned.
    pub archive_sha256: Option<String>,
    /// Plan items, once planned.
    pub items: u32,
    /// Counts by resource.
    pub by_resource: BTreeMap<String, Counts>,
    /// Archived items skipped by a rule.
    pub skipped: Vec<Skip>,
    /// Archived items the filters left out.
    pub filtered: u32,
    /// Items whose create was sent (or about to be) in some run.
    pub intents: BTreeSet<u32>,
    /// Items with their outcome.
    pub done: BTreeMap<u32, ItemOutcome>,
    /// Warnings, Velero's grouping.
    pub warnings: Results,
    /// Errors, Velero's grouping.
    pub errors: Results,
    /// Set when the restore could not run.
    pub failure: Option<String>,
    /// When it finished.
    pub finished_ms: Option<u64>,
}

impl RestoreState {
    /// Folds a whole log.
    pub fn fold(events: &[RestoreEvent]) -> Result<RestoreState, RestoreFoldError> {
        let mut s = RestoreState::default();
        for (seq, e) in events.iter().enumerate() {
            s.apply(seq as u64, e)?;
        }
        Ok(s)
    }

    /// Applies one event (record `seq`).
    pub fn apply(&mut self, seq: u64, e: &RestoreEvent) -> Result<(), RestoreFoldError> {
        let bad = |reason: String| Err(RestoreFoldError { seq, reason });
        if seq == 0 {
            let RestoreEvent::Requested { spec, source, workers, at_ms } = e else {
                return bad(format!("the log starts with {}, not Requested", e.kind()));
            };
            self.spec = spec.clone();
            self.source = source.clone();
            self.workers = *workers;
            self.started_ms = *at_ms;
            return Ok(());
        }
        if self.finished_ms.is_some() {
            return bad(format!("{} after the restore ended", e.kind()));
        }
        match e {
            RestoreEvent::Requested { .. } => return bad("a second Requested".into()),
            RestoreEvent::Planned { archive_sha256, items, planned, skipped, invalid, filtered, .. } => {
                if self.archive_sha256.is_some() {
                    return bad("a second Planned".into());
                }
                self.archive_sha256 = Some(archive_sha256.clone());
                self.items = *items;
                for (r, n) in planned {
                    self.by_resource.entry(r.clone()).or_default().planned = *n;
                }
                self.skipped = skipped.clone();
                self.filtered = *filtered;
                for s in invalid {
                    self.by_resource.entry(s.item.resource.clone()).or_default().failed += 1;
                    self.errors.add(s.item.namespace.as_deref(), format!("{}: {}", s.item, s.reason));
                }
            }
            RestoreEvent::CreatesStarted { items } => {
                if self.archive_sha256.is_none() {
                    return bad("CreatesStarted before Planned".into());
                }
                for i in items {
                    if *i >= self.items {
                        return bad(format!("item {i} is not in the plan of {} items", self.items));
                    }
                    if self.done.contains_key(i) {
                        return bad(format!("item {i} already has its outcome"));
                    }
                    self.intents.insert(*i);
                }
            }
            RestoreEvent::ItemRestored { item, target, outcome, .. } => {
                if *item >= self.items || self.archive_sha256.is_none() {
                    return bad(format!("item {item} is not in the plan of {} items", self.items));
                }
                if self.done.contains_key(item) {
                    return bad(format!("item {item} ({target}) has a second outcome"));
                }
                let c = self.by_resource.entry(target.resource.clone()).or_default();
                let ns = target.namespace.as_deref();
                match outcome {
                    ItemOutcome::Created => c.created += 1,
                    ItemOutcome::Updated => c.existed += 1,
                    ItemOutcome::Existed { warning } => {
                        c.existed += 1;
                        if let Some(w) = warning {
                            self.warnings.add(ns, w.clone());
                        }
                    }
                    ItemOutcome::Failed { error } => {
                        c.failed += 1;
                        self.errors.add(ns, format!("{target}: {error}"));
                    }
                }
                self.done.insert(*item, outcome.clone());
            }
            RestoreEvent::RestoreFailed { error, at_ms } => {
                self.failure = Some(error.clone());
                self.errors.add(None, error.clone());
                self.finished_ms = Some(*at_ms);
            }
            RestoreEvent::RestoreFinished { at_ms } => {
                if self.archive_sha256.is_none() || self.done.len() as u32 != self.items {
                    return bad(format!("RestoreFinished with {} of {} items restored", self.done.len(), self.items));
                }
                self.finished_ms = Some(*at_ms);
            }
        }
        Ok(())
    }

    /// The phase.
    pub fn phase(&self) -> RestorePhase {
        match (self.finished_ms, &self.failure) {
            (_, Some(_)) => RestorePhase::Failed,
            (None, None) => RestorePhase::InProgress,
            (Some(_), None) if self.errors.is_empty() => RestorePhase::Completed,
            (Some(_), None) => RestorePhase::PartiallyFailed,
        }
    }

    /// Plan items without an outcome.
    pub fn pending(&self) -> u32 {
        self.items - self.done.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(dir: &str, ns: Option<&str>, name: &str, obj: Value) -> ArchivedItem {
        ArchivedItem { dir: dir.into(), namespace: ns.map(str::to_string), name: name.into(), json: obj.to_string() }
    }

    fn obj(api: &str, kind: &str, ns: Option<&str>, name: &str) -> Value {
        let mut m =
            json!({"apiVersion": api, "kind": kind, "metadata": {"name": name, "uid": "u", "labels": {"app": "x"}}});
        if let Some(ns) = ns {
            m["metadata"]["namespace"] = json!(ns);
        }
        m
    }

    fn archive() -> Vec<ArchivedItem> {
        vec![
            item("pods", Some("shop"), "web", obj("v1", "Pod", Some("shop"), "web")),
            item("configmaps", Some("shop"), "cfg", obj("v1", "ConfigMap", Some("shop"), "cfg")),
            item("namespaces", None, "shop", obj("v1", "Namespace", None, "shop")),
            item("configmaps", Some("other"), "c2", obj("v1", "ConfigMap", Some("other"), "c2")),
            item("nodes", None, "n1", obj("v1", "Node", None, "n1")),
            item("widgets.example.com", Some("shop"), "w", obj("example.com/v1", "Widget", Some("shop"), "w")),
            item(
                "customresourcedefinitions.apiextensions.k8s.io",
                None,
                "widgets.example.com",
                obj("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "widgets.example.com"),
            ),
            item("configmaps", Some("shop"), "broken", json!([1])),
        ]
    }

    /// A planned item as the tests read it: its body made from the archive.
    #[derive(Debug, PartialEq)]
    struct TestItem {
        target: RestoreRef,
        ensured: bool,
        body: Value,
    }

    /// A plan with every body made.
    #[derive(Debug, PartialEq)]
    struct TestPlan {
        items: Vec<TestItem>,
        stages: Vec<(GroupResource, std::ops::Range<usize>)>,
        skipped: Vec<Skip>,
        invalid: Vec<Skip>,
    }

    /// [`super::plan_restore`], each item's body made from the archive as the shell makes it.
    fn plan_restore(spec: &RestoreSpec, archive: Vec<ArchivedItem>) -> Result<TestPlan, SpecError> {
        let plan = super::plan_restore(spec, &archive)?;
        let items = plan
            .items
            .iter()
            .map(|i| {
                let json = i.archived.map(|at| archive[at.offset as usize].json.as_str());
                TestItem { target: plan.target(i), ensured: i.ensured, body: plan.body(i, json).unwrap() }
            })
            .collect();
        Ok(TestPlan { items, stages: plan.stages, skipped: plan.skipped, invalid: plan.invalid })
    }

    fn names(plan: &TestPlan) -> Vec<String> {
        plan.items.iter().map(|i| i.target.to_string()).collect()
    }

    /// An archive may hold an item twice (its primary copy and a `<version>-preferredversion`
    /// one, or one path twice): the primary counts, else the copy; of one path twice, the later.
    #[test]
    fn the_primary_copy_counts_else_the_preferred_version_copy_else_the_later_entry() {
        let spec = RestoreSpec::new("r", "b");
        let mut planner = RestorePlanner::new(&spec).unwrap();
        let cm = |name: &str, v: &str| {
            let mut o = obj("v1", "ConfigMap", Some("a"), name);
            o["data"] = json!({"v": v});
            o.to_string()
        };
        let at = |offset: u64| BodyAt { offset, len: 0 };
        planner.add("configmaps", Some("a"), "both", &cm("both", "copy"), at(0), true);
        planner.add("configmaps", Some("a"), "both", &cm("both", "primary"), at(1), false);
        planner.add("configmaps", Some("a"), "only-copy", &cm("only-copy", "copy"), at(2), true);
        planner.add("configmaps", Some("a"), "twice", &cm("twice", "first"), at(3), false);
        planner.add("configmaps", Some("a"), "twice", &cm("twice", "second"), at(4), false);
        let plan = planner.plan();
        let chosen: Vec<(String, u64)> =
            plan.items.iter().filter_map(|i| Some((i.name.to_string(), i.archived?.offset))).collect();
        assert_eq!(chosen, [("both".into(), 1), ("only-copy".into(), 2), ("twice".into(), 4)]);
    }

    #[test]
    fn plan_follows_velero_order_ensures_namespaces_and_skips_what_is_never_restored() {
        let plan = plan_restore(&RestoreSpec::new("r", "b"), archive()).unwrap();
        assert_eq!(
            names(&plan),
            [
                "customresourcedefinitions.apiextensions.k8s.io widgets.example.com",
                "namespaces other",
                "namespaces shop",
                "configmaps other/c2",
                "configmaps shop/cfg",
                "pods shop/web",
                "widgets.example.com shop/w",
            ]
        );
        assert!(plan.items[1].ensured && !plan.items[2].ensured);
        assert_eq!(plan.skipped.len(), 1);
        assert_eq!(plan.skipped[0].item.name, "n1");
        assert_eq!(plan.invalid.len(), 1);
        assert_eq!(plan.stages.len(), 5);
        assert_eq!(plan.stages[1].1, 1..3);
        let pod = &plan.items[5].body;
        assert!(pod["metadata"].get("uid").is_none());
        assert_eq!(pod["metadata"]["labels"]["velero.io/restore-name"], "r");
        // The order of the archive does not matter.
        let mut reversed = archive();
        reversed.reverse();
        assert_eq!(plan_restore(&RestoreSpec::new("r", "b"), reversed).unwrap(), plan);
    }

    #[test]
    fn filters_mappings_and_the_selector() {
        let mut spec = RestoreSpec::new("r", "b");
        spec.included_namespaces = vec!["shop".into()];
        spec.excluded_resources = vec!["pods".into()];
        spec.namespace_mapping = BTreeMap::from([("shop".into(), "shop2".into())]);
        let plan = plan_restore(&spec, archive()).unwrap();
        assert_eq!(
            names(&plan),
            [
                "customresourcedefinitions.apiextensions.k8s.io widgets.example.com",
                "namespaces shop2",
                "configmaps shop2/cfg",
                "widgets.example.com shop2/w",
            ]
        );
        assert_eq!(plan.items[2].body["metadata"]["namespace"], "shop2");
        // Without custom resources restored, their CRD is not needed under a namespace filter.
        spec.excluded_resources.push("widgets.example.com".into());
        assert!(!names(&plan_restore(&spec, archive()).unwrap()).iter().any(|n| n.starts_with("customresource")));
        let mut spec = RestoreSpec::new("r", "b");
        spec.label_selector = Some("app=y".into());
        let plan = plan_restore(&spec, archive()).unwrap();
        assert!(plan.items.is_empty(), "{:?}", names(&plan));
    }

    #[test]
    fn restore_volumes_provisions_claims_from_their_snapshots() {
        let mut pvc = obj("v1", "PersistentVolumeClaim", Some("a"), "data");
        pvc["spec"] = json!({"volumeName": "pv-1", "storageClassName": "csi"});
        let mut pv = obj("v1", "PersistentVolume", None, "pv-1");
        pv["spec"] = json!({"csi": {"driver": "d", "volumeHandle": "vol-1"}});
        let mut vs = obj("snapshot.storage.k8s.io/v1", "VolumeSnapshot", Some("a"), "snap");
        vs["spec"] = json!({"source": {"persistentVolumeClaimName": "data"}, "volumeSnapshotClassName": "c"});
        vs["status"] = json!({"boundVolumeSnapshotContentName": "content"});
        let mut vsc = obj("snapshot.storage.k8s.io/v1", "VolumeSnapshotContent", None, "content");
        vsc["spec"] = json!({"driver": "d", "source": {"volumeHandle": "vol-1"}, "volumeSnapshotRef": {"name": "snap", "namespace": "a", "uid": "x"}});
        vsc["status"] = json!({"snapshotHandle": "h-1"});
        let archive = vec![
            item("persistentvolumeclaims", Some("a"), "data", pvc),
            item("persistentvolumes", None, "pv-1", pv),
            item("volumesnapshots.snapshot.storage.k8s.io", Some("a"), "snap", vs),
            item("volumesnapshotcontents.snapshot.storage.k8s.io", None, "content", vsc),
        ];
        let plan = plan_restore(&RestoreSpec::new("r", "b"), archive.clone()).unwrap();
        assert_eq!(names(&plan), ["namespaces a", "persistentvolumes pv-1", "persistentvolumeclaims a/data"]);
        assert_eq!(plan.skipped.len(), 2);
        let mut spec = RestoreSpec::new("r", "b");
        spec.restore_volumes = true;
        spec.namespace_mapping = BTreeMap::from([("a".into(), "z".into())]);
        let plan = plan_restore(&spec, archive).unwrap();
        assert_eq!(
            names(&plan),
            [
                "namespaces z",
                "volumesnapshotcontents.snapshot.storage.k8s.io content",
                "volumesnapshots.snapshot.storage.k8s.io z/snap",
                "persistentvolumeclaims z/data",
            ]
        );
        let vsc = &plan.items[1].body["spec"];
        assert_eq!(vsc["source"], json!({"snapshotHandle": "h-1"}));
        assert_eq!(vsc["volumeSnapshotRef"]["namespace"], "z");
        assert!(vsc["volumeSnapshotRef"].get("uid").is_none());
        assert_eq!(plan.items[2].body["spec"]["source"], json!({"volumeSnapshotContentName": "content"}));
        let claim = &plan.items[3].body["spec"];
        assert_eq!(claim["dataSource"]["name"], "snap");
        assert!(claim.get("volumeName").is_none());
        assert_eq!(plan.skipped[0].item.name, "pv-1");
    }

    /// Issue 21, defect 10: a Delete volume without a snapshot is not restored as is; its claim
    /// gets a new volume. A Retain one is restored as archived.
    #[test]
    fn delete_volumes_without_snapshots_are_provisioned_anew_and_retain_ones_restored() {
        let claim = |name: &str, pv: &str| {
            let mut c = obj("v1", "PersistentVolumeClaim", Some("a"), name);
            c["spec"] = json!({"volumeName": pv, "storageClassName": "csi"});
            item("persistentvolumeclaims", Some("a"), name, c)
        };
        let volume = |name: &str, policy: &str| {
            let mut v = obj("v1", "PersistentVolume", None, name);
            v["spec"] = json!({"persistentVolumeReclaimPolicy": policy, "csi": {"driver": "d", "volumeHandle": name}});
            item("persistentvolumes", None, name, v)
        };
        let archive = vec![
            claim("gone", "pv-del"),
            claim("kept", "pv-ret"),
            volume("pv-del", "Delete"),
            volume("pv-ret", "Retain"),
        ];
        let plan = plan_restore(&RestoreSpec::new("r", "b"), archive).unwrap();
        assert_eq!(
            names(&plan),
            [
                "namespaces a",
                "persistentvolumes pv-ret",
                "persistentvolumeclaims a/gone",
                "persistentvolumeclaims a/kept"
            ]
        );
        assert!(plan.skipped.iter().any(|s| s.item.name == "pv-del" && s.reason.contains("reclaim policy is Delete")));
        assert!(plan.items[2].body["spec"].get("volumeName").is_none(), "the claim of a Delete volume binds anew");
        assert_eq!(plan.items[3].body["spec"]["volumeName"], "pv-ret");
    }

    /// Issue 21, defect 9: `restore volumes` matches VolumeSnapshots by namespace and name.
    #[test]
    fn same_named_snapshots_in_two_namespaces_do_not_collide() {
        let mut archive = Vec::new();
        for (ns, content, handle) in [("a", "content-a", "h-a"), ("b", "content-b", "h-b")] {
            let mut pvc = obj("v1", "PersistentVolumeClaim", Some(ns), "data");
            pvc["spec"] = json!({"storageClassName": "csi"});
            let mut vs = obj("snapshot.storage.k8s.io/v1", "VolumeSnapshot", Some(ns), "snap");
            vs["spec"] = json!({"source": {"persistentVolumeClaimName": "data"}});
            vs["status"] = json!({"boundVolumeSnapshotContentName": content});
            let mut vsc = obj("snapshot.storage.k8s.io/v1", "VolumeSnapshotContent", None, content);
            vsc["spec"] = json!({"driver": "d", "volumeSnapshotRef": {"name": "snap", "namespace": ns}});
            vsc["status"] = json!({"snapshotHandle": handle});
            archive.push(item("persistentvolumeclaims", Some(ns), "data", pvc));
            archive.push(item("volumesnapshots.snapshot.storage.k8s.io", Some(ns), "snap", vs));
            archive.push(item("volumesnapshotcontents.snapshot.storage.k8s.io", None, content, vsc));
        }
        // Each namespace's VolumeSnapshot names its own content.
        let mut spec = RestoreSpec::new("r", "b");
        spec.restore_volumes = true;
        let plan = plan_restore(&spec, archive).unwrap();
        let snaps: Vec<&TestItem> =
            plan.items.iter().filter(|i| i.target.resource.starts_with("volumesnapshots.")).collect();
        assert_eq!(snaps.len(), 2, "{:?}", names(&plan));
        for s in snaps {
            let ns = s.target.namespace.clone().unwrap_or_default();
            assert_eq!(s.body["spec"]["source"], json!({"volumeSnapshotContentName": format!("content-{ns}")}), "{ns}");
        }
    }

    fn planned(items: u32) -> RestoreEvent {
        RestoreEvent::Planned {
            archive_sha256: "d".into(),
            items,
            planned: BTreeMap::from([("configmaps".into(), items)]),
            skipped: vec![],
            invalid: vec![],
            filtered: 0,
            at_ms: 1,
        }
    }

    fn restored(item: u32, outcome: ItemOutcome) -> RestoreEvent {
        let target =
            RestoreRef { resource: "configmaps".into(), namespace: Some("a".into()), name: format!("c{item}") };
        RestoreEvent::ItemRestored { item, target, outcome, at_ms: 2 }
    }

    #[test]
    fn fold_counts_outcomes_and_refuses_contradictions() {
        let req =
            RestoreEvent::Requested { spec: RestoreSpec::new("r", "b"), source: "s".into(), workers: 1, at_ms: 0 };
        let mut events = vec![
            req.clone(),
            planned(3),
            RestoreEvent::CreatesStarted { items: vec![0, 1, 2] },
            restored(0, ItemOutcome::Created),
            restored(1, ItemOutcome::Existed { warning: Some("exists".into()) }),
        ];
        let s = RestoreState::fold(&events).unwrap();
        assert_eq!(s.phase(), RestorePhase::InProgress);
        assert_eq!(s.pending(), 1);
        assert_eq!(s.warnings.namespaces["a"], ["exists"]);
        // Finishing with an item left is a contradiction.
        let mut early = events.clone();
        early.push(RestoreEvent::RestoreFinished { at_ms: 3 });
        assert!(RestoreState::fold(&early).unwrap_err().reason.contains("2 of 3"));
        events.push(restored(2, ItemOutcome::Failed { error: "boom".into() }));
        events.push(RestoreEvent::RestoreFinished { at_ms: 3 });
        let s = RestoreState::fold(&events).unwrap();
        assert_eq!(s.phase(), RestorePhase::PartiallyFailed);
        assert_eq!(s.by_resource["configmaps"], Counts { planned: 3, created: 1, existed: 1, failed: 1 });
        for bad in [
            vec![planned(1)],
            vec![req.clone(), planned(1), restored(0, ItemOutcome::Created), restored(0, ItemOutcome::Created)],
            vec![req.clone(), planned(1), restored(5, ItemOutcome::Created)],
            vec![req.clone(), RestoreEvent::CreatesStarted { items: vec![0] }],
            vec![req.clone(), planned(0), RestoreEvent::RestoreFinished { at_ms: 1 }, planned(0)],
        ] {
            assert!(RestoreState::fold(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_objects_are_recognised_by_the_restore_label() {
        let mut o = obj("v1", "ConfigMap", Some("a"), "c");
        assert!(!restored_by(&o, "r", None));
        o["metadata"]["labels"]["velero.io/restore-name"] = json!("r");
        assert!(restored_by(&o, "r", None));
        assert!(!restored_by(&o, "r2", None));
        // Issue 21, defect 9: a Restore created again under the same name (another uid) does not
        // take the first one's objects for its own.
        let first = with_restore_uid(&o, "uid-1");
        assert!(restored_by(&first, "r", Some("uid-1")));
        assert!(!restored_by(&first, "r", Some("uid-2")));
        assert!(restored_by(&o, "r", Some("uid-2")), "labelled before the annotation existed: ours");
    }

    #[test]
    fn update_patch_carries_spec_labels_and_annotations_only() {
        let p = update_patch(&json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"},
            "metadata": {"name": "c", "labels": {"a": "b"}, "annotations": {"x": "y"}}, "status": {}}));
        assert_eq!(p, json!({"data": {"k": "v"}, "metadata": {"labels": {"a": "b"}, "annotations": {"x": "y"}}}));
    }

    #[test]
    fn namespace_mappings_parse_or_name_what_is_wrong() {
        assert_eq!(parse_namespace_mappings("a:b, c:d").unwrap().len(), 2);
        assert!(parse_namespace_mappings("a").unwrap_err().contains("\"a\""));
        assert!(parse_namespace_mappings("a:b,a:c").unwrap_err().contains("twice"));
        let mut spec = RestoreSpec::new("r", "b");
        spec.namespace_mapping = BTreeMap::from([("a".into(), "../x".into())]);
        assert!(spec.validate().is_err());
        spec.namespace_mapping.clear();
        spec.label_selector = Some("a in (".into());
        assert!(spec.validate().is_err());
        // Issue 21: planning with it is an error too, not a restore of everything.
        assert!(plan_restore(&spec, Vec::new()).is_err());
    }
}
