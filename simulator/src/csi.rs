//! The fake cluster's writable side: objects created, patched and deleted through the API, with
//! Kubernetes' finalizer semantics, and a fake CSI snapshot controller and driver behind the
//! `snapshot.storage.k8s.io` and `groupsnapshot.storage.k8s.io` resources.
//!
//! [`Dynamic`] is an overlay over the fake cluster's built-in objects (a created object, a changed
//! one, a deleted one). The controller is **lazy**: creating a VolumeSnapshot schedules jobs (cut
//! at `+cut_ms`, ready at `+ready_ms` after that) and every API call first runs the jobs that are
//! due ([`Dynamic::settle`]), so the same code runs on tokio's clock (demo, API server) and on the
//! simulator's virtual clock, and a watch can sleep exactly until the next change of the object it
//! watches ([`Dynamic::next_change`]). What it does follows external-snapshotter: a content
//! `snapcontent-<uid>` bound to each snapshot, a handle and a restore size when the driver cuts,
//! `readyToUse` later; a VolumeGroupSnapshot selects claims by `matchLabels` and, when cut,
//! creates a group content and one member VolumeSnapshot (owned by the group, with the in-group
//! finalizer) and content per claim, named `snapshot-<sha256(group uid + volume handle)>`.
//! Deleting a content with `deletionPolicy: Delete` deletes its storage snapshot; `Retain` keeps it.
//!
//! Key decisions: the fake driver's identities are **deterministic** — an object's uid is a hash
//! of its key and how many times that name was created, a handle a hash of its content's name — so
//! two backups of the same cluster that create the same snapshots get the same facts (the
//! simulator's E2 and the CLI's kill-and-resume test compare archives byte for byte). Faults per
//! claim or group ([`CsiFault`]): an error, a handle never set, never ready, a group missing a
//! member. Every cut, failure and storage deletion is an event ([`CsiEvent`]) for the judges, and
//! [`Dynamic::storage`] says which storage snapshots exist.
//!
//! Every write of the overlay goes through one function, which also records the change — with a
//! resourceVersion from the one counter, which continues above the built-in objects' versions — in
//! a bounded history ([`HISTORY_CHANGES_MAX`]) that watches read. Writes through the API server
//! ([`ApiWrite`]) add what a controller relies on: a `metadata.resourceVersion` precondition
//! (409 `Conflict`), no create in a namespace that does not exist (404) or is being deleted (403),
//! as the API server's NamespaceLifecycle admission, the status subresource (a write to the object keeps `.status`, a write to
//! the status changes nothing else), the generation bumped by changes outside metadata and status,
//! field ownership and server-side apply ([`crate::fields`]), CRDs whose objects go with them and
//! namespaces whose deletion deletes their contents. A write that changes nothing changes no
//! version. Deliberately absent: strategic merge patch's list merging (it is a merge patch here).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use blockwise_engine::item::{GroupResource, ItemKey, ResourceType};
use blockwise_engine::ports::ClusterError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The API group of VolumeSnapshots.
pub const SNAP: &str = "snapshot.storage.k8s.io";
/// The API group of VolumeGroupSnapshots.
pub const GSNAP: &str = "groupsnapshot.storage.k8s.io";
const AS_SOURCE: &str = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection";
const VS_BOUND: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
const IN_GROUP: &str = "snapshot.storage.kubernetes.io/volumesnapshot-in-group-protection";
const VSC_BOUND: &str = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
const VGS_BOUND: &str = "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-bound-protection";
const VGSC_BOUND: &str = "groupsnapshot.storage.kubernetes.io/volumegroupsnapshotcontent-bound-protection";
/// Restore size of a claim without a storage request.
const DEFAULT_SIZE: u64 = 1 << 30;

/// The resource types of the snapshot CRDs: the snapshot kinds at v1, the group kinds at
/// `group_version` (none when `None`).
pub fn snapshot_resources(group_version: Option<&str>) -> Vec<ResourceType> {
    let mut out = vec![
        ResourceType::new(SNAP, "v1", "volumesnapshots", "VolumeSnapshot", true),
        ResourceType::new(SNAP, "v1", "volumesnapshotcontents", "VolumeSnapshotContent", false),
        ResourceType::new(SNAP, "v1", "volumesnapshotclasses", "VolumeSnapshotClass", false),
    ];
    if let Some(v) = group_version {
        out.push(ResourceType::new(GSNAP, v, "volumegroupsnapshots", "VolumeGroupSnapshot", true));
        out.push(ResourceType::new(GSNAP, v, "volumegroupsnapshotcontents", "VolumeGroupSnapshotContent", false));
        out.push(ResourceType::new(GSNAP, v, "volumegroupsnapshotclasses", "VolumeGroupSnapshotClass", false));
    }
    out
}

/// How long the fake driver takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// From the snapshot's creation to its handle.
    pub cut_ms: u64,
    /// From the handle to `readyToUse`.
    pub ready_ms: u64,
}

/// A deliberate misbehaviour of the fake driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CsiFault {
    /// The snapshot fails: `status.error` is set where the handle would be.
    Error,
    /// The snapshot is bound to a content whose handle is never set.
    NeverHandle,
    /// The snapshot is cut but never becomes ready to use.
    NeverReady,
    /// A group snapshot is cut without the member of its last claim.
    Partial,
}

/// How the fake driver treats one claim or one volume group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behaviour {
    /// Its timing.
    pub timing: Timing,
    /// Its fault, if any.
    pub fault: Option<CsiFault>,
}

/// The fake driver's behaviour per claim and per volume group, by (namespace, name or label value).
#[derive(Debug, Clone, Default)]
pub struct CsiConfig {
    /// Behaviour of everything not listed below.
    pub default: Behaviour,
    /// Per claim (its single snapshots).
    pub claims: BTreeMap<(String, String), Behaviour>,
    /// Per volume group (its group snapshots).
    pub groups: BTreeMap<(String, String), Behaviour>,
}

/// One storage snapshot the fake driver holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageSnapshot {
    /// Its handle.
    pub handle: String,
    /// The claim it is a snapshot of.
    pub claim: ItemKey,
    /// The group snapshot's handle, for a member of one.
    pub group: Option<String>,
    /// When it was cut.
    pub cut_ms: u64,
    /// When it was deleted, if it was.
    pub deleted_ms: Option<u64>,
}

/// One claim's part of a cut: its VolumeSnapshot, content and handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CutMember {
    /// The claim.
    pub claim: ItemKey,
    /// Its VolumeSnapshot's name.
    pub snapshot: String,
    /// Its VolumeSnapshotContent's name.
    pub content: String,
    /// The storage snapshot's handle.
    pub handle: String,
}

/// What the fake driver did, for the judges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum CsiEvent {
    /// Storage snapshots were cut at one instant: one per claim of `object` (a VolumeSnapshot, or
    /// a VolumeGroupSnapshot), which was created at `created_ms`.
    Cut { at_ms: u64, object: ItemKey, created_ms: u64, members: Vec<CutMember> },
    /// The snapshot `object` failed.
    Failed { at_ms: u64, object: ItemKey, message: String },
    /// A storage snapshot was deleted.
    Deleted { at_ms: u64, handle: String },
    /// A fault held the snapshot `object` back: its handle, its readiness or a group member
    /// (`what`) will never come.
    Stalled { at_ms: u64, object: ItemKey, what: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum JobKind {
    Cut,
    Ready,
    GroupCut,
    GroupReady,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    at: u64,
    kind: JobKind,
    /// The VolumeSnapshot or VolumeGroupSnapshot.
    target: ItemKey,
    /// Its uid when scheduled: a job for a deleted and re-created object does nothing.
    uid: String,
    /// Objects the job changes (for watches).
    touches: Vec<ItemKey>,
    /// Its fault.
    fault: Option<CsiFault>,
    /// Its ready delay.
    ready_ms: u64,
    /// When the snapshot was created.
    created: u64,
}

/// The built-in objects and configuration the overlay reads.
pub struct Statics<'a> {
    /// Built-in objects, by resource then (namespace, name).
    pub objects: &'a BTreeMap<GroupResource, BTreeMap<(String, String), Value>>,
    /// Discovery.
    pub resources: &'a [ResourceType],
    /// The driver's behaviour.
    pub config: &'a CsiConfig,
    /// The highest resourceVersion of a built-in object: the overlay's versions start above it.
    pub rv_floor: u64,
}

/// Created, changed and deleted objects, and the snapshot controller's state; see the module docs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Dynamic {
    /// Objects written through the API: the object, or `None` when deleted.
    #[serde(with = "overlay_entries")]
    pub overlay: Overlay,
    jobs: Vec<Job>,
    /// Storage snapshots, by handle.
    pub storage: BTreeMap<String, StorageSnapshot>,
    next_rv: u64,
    incarnations: BTreeMap<String, u64>,
    /// Events not yet taken ([`Dynamic::take_events`]).
    #[serde(skip)]
    events: Vec<CsiEvent>,
    /// The overlay's objects with a deletionTimestamp (built on first use, then kept by `put`):
    /// the controller's deletion work visits these, not the whole overlay, after every write.
    #[serde(skip)]
    deleting: Option<BTreeSet<ItemKey>>,
    /// The last [`HISTORY_CHANGES_MAX`] changes, oldest first, for watches (not persisted: a
    /// loaded state starts a new history at its current resourceVersion).
    #[serde(skip)]
    history: VecDeque<Change>,
    /// Every change after this resourceVersion is in `history` (set when the first call settles).
    #[serde(skip)]
    history_from: Option<u64>,
}

/// Changes kept for watches; a watch from an older resourceVersion is told it expired (410).
pub const HISTORY_CHANGES_MAX: usize = 4096;

/// The namespaces a cluster always has: creates in them are admitted even when the fake cluster
/// holds no Namespace object for them.
pub const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

/// What happened to an object, as a watch event's type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// It was created.
    Added,
    /// It changed.
    Modified,
    /// It was removed for good.
    Deleted,
}

impl ChangeKind {
    /// The watch event type: `ADDED`, `MODIFIED`, `DELETED`.
    pub fn event_type(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One change of one object, with the object at that resourceVersion (its last state, deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The resourceVersion the change made.
    pub rv: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The object.
    pub key: ItemKey,
    /// The object after the change (before it, for a deletion), as stored; shared, so each watch
    /// that takes the change does not copy it.
    pub object: Arc<Value>,
}

/// A write through the API server, with the client's intent (kept whole in the journal).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ApiWrite {
    /// `POST`: creates `body` in `namespace`.
    Create { rt: ResourceType, namespace: Option<String>, body: Value, manager: Option<String> },
    /// `PUT` of the object (or of its status).
    Replace { rt: ResourceType, key: ItemKey, body: Value, status: bool, manager: Option<String> },
    /// `PATCH` with a JSON merge patch (or a strategic merge patch, treated as one).
    Merge { rt: ResourceType, key: ItemKey, patch: Value, status: bool, manager: Option<String> },
    /// `PATCH` with server-side apply; creates a missing object.
    Apply { rt: ResourceType, key: ItemKey, body: Value, status: bool, manager: String, force: bool },
    /// `DELETE`.
    Delete { key: ItemKey },
}

/// A write refused, as the API server answers it: HTTP code, `Status` reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status code.
    pub code: u16,
    /// The `Status` reason (`Conflict`, `AlreadyExists`, `NotFound`, `Invalid`, `BadRequest`).
    pub reason: &'static str,
    /// The message.
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into() }
    }

    /// The engine port's error for it.
    pub fn into_cluster_error(self) -> ClusterError {
        match self.code {
            404 => ClusterError::NotFound(self.message),
            409 if self.reason == "AlreadyExists" => ClusterError::AlreadyExists(self.message),
            _ => ClusterError::Other(self.message),
        }
    }
}

fn resource_label(gr: &GroupResource) -> String {
    if gr.group.is_empty() {
        gr.resource.clone()
    } else {
        format!("{}.{}", gr.resource, gr.group)
    }
}

fn conflict(key: &ItemKey) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
            resource_label(&key.gr()),
            key.name()
        ),
    )
}

fn rv_of(v: &Value) -> Option<u64> {
    v.pointer("/metadata/resourceVersion").and_then(Value::as_str).and_then(|r| r.parse().ok())
}

/// Metadata a write cannot change: the server's.
const SERVER_METADATA: [&str; 7] =
    ["name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"];

/// Written objects by resource, then (namespace or "", name): the object, or `None` when deleted.
/// An object is shared with the change history's record of its write (one copy, not two).
pub type Overlay = BTreeMap<GroupResource, Written>;

/// The overlay of one resource: (namespace or "", name) → the object, or `None` when deleted.
pub type Written = BTreeMap<(String, String), Option<Arc<Value>>>;

/// The overlay as lists of entries: JSON object keys must be strings.
mod overlay_entries {
    use super::*;
    use serde::{Deserializer, Serializer};

    type Entries = Vec<(GroupResource, Vec<((String, String), Option<Value>)>)>;

    pub fn serialize<S: Serializer>(o: &Overlay, s: S) -> Result<S::Ok, S::Error> {
        type Borrowed<'a> = Vec<(&'a GroupResource, Vec<(&'a (String, String), Option<&'a Value>)>)>;
        let entries: Borrowed<'_> =
            o.iter().map(|(g, m)| (g, m.iter().map(|(k, v)| (k, v.as_deref())).collect())).collect();
        entries.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Overlay, D::Error> {
        let entries = Entries::deserialize(d)?;
        let shared = |m: Vec<((String, String), Option<Value>)>| m.into_iter().map(|(k, v)| (k, v.map(Arc::new)));
        Ok(entries.into_iter().map(|(g, m)| (g, shared(m).collect())).collect())
    }
}

fn slot(key: &ItemKey) -> (String, String) {
    (key.namespace().map(str::to_string).unwrap_or_default(), key.name().to_string())
}

fn key_of(gr: &GroupResource, ns: &str, name: &str, namespaced: bool) -> ItemKey {
    if namespaced {
        ItemKey::namespaced(&gr.group, &gr.resource, ns, name)
    } else {
        ItemKey::cluster(&gr.group, &gr.resource, name)
    }
}

fn vs_key(ns: &str, name: &str) -> ItemKey {
    ItemKey::namespaced(SNAP, "volumesnapshots", ns, name)
}

fn vsc_key(name: &str) -> ItemKey {
    ItemKey::cluster(SNAP, "volumesnapshotcontents", name)
}

fn vgs_key(ns: &str, name: &str) -> ItemKey {
    ItemKey::namespaced(GSNAP, "volumegroupsnapshots", ns, name)
}

fn vgsc_key(name: &str) -> ItemKey {
    ItemKey::cluster(GSNAP, "volumegroupsnapshotcontents", name)
}

fn hex(parts: &[&str], n: usize) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().take(n).map(|b| format!("{b:02x}")).collect()
}

fn uuid(parts: &[&str]) -> String {
    let x = hex(parts, 16);
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..32])
}

fn s<'a>(v: &'a Value, p: &str) -> Option<&'a str> {
    v.pointer(p).and_then(Value::as_str).filter(|x| !x.is_empty())
}

fn finalizers(v: &Value) -> Vec<String> {
    v.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

fn set_finalizers(v: &mut Value, f: &[String]) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        if f.is_empty() {
            m.remove("finalizers");
        } else {
            m.insert("finalizers".into(), json!(f));
        }
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Whether objects of `gr` have a status subresource (a create drops `.status`, a patch of the
/// object keeps the old one), as the snapshot CRDs declare.
fn has_status(gr: &GroupResource) -> bool {
    (gr.group == SNAP && gr.resource != "volumesnapshotclasses")
        || (gr.group == GSNAP && gr.resource != "volumegroupsnapshotclasses")
}

/// RFC 3339 of Unix milliseconds.
fn time(ms: u64) -> String {
    blockwise_adapters::report::rfc3339(ms)
}

fn quantity(q: Option<&str>) -> u64 {
    q.and_then(blockwise_engine::snapshot::parse_quantity).unwrap_or(DEFAULT_SIZE)
}

impl Dynamic {
    /// An object as the API serves it now: overlay first, then the built-in objects.
    pub fn lookup(&self, st: &Statics<'_>, key: &ItemKey) -> Option<Value> {
        self.get(st, key).cloned()
    }

    /// [`Self::lookup`] without the copy: what a check reads (copying every object looked at was
    /// a large share of the fake API server's time in a large backup).
    pub fn get<'a>(&'a self, st: &'a Statics<'_>, key: &ItemKey) -> Option<&'a Value> {
        let gr = key.gr();
        match self.overlay.get(&gr).and_then(|o| o.get(&slot(key))) {
            Some(v) => v.as_deref(),
            None => st.objects.get(&gr).and_then(|o| o.get(&slot(key))),
        }
    }

    /// Writes the overlay, recording the change for watches: every change gets a resourceVersion
    /// of its own (a deletion one more), except a second write of one object at the same version,
    /// which replaces the first's recorded state.
    fn put(&mut self, st: &Statics<'_>, key: &ItemKey, v: Option<Value>) {
        let gr = key.gr();
        let before = match self.overlay.get(&gr).and_then(|o| o.get(&slot(key))) {
            Some(x) => x.is_some(),
            None => st.objects.get(&gr).is_some_and(|o| o.contains_key(&slot(key))),
        };
        // The object as stored, shared with its change record.
        let (stored, change) = match v {
            None if before => {
                let mut last = self.lookup(st, key).unwrap_or(Value::Null);
                self.bump(&mut last);
                let c =
                    Change { rv: self.next_rv, kind: ChangeKind::Deleted, key: key.clone(), object: Arc::new(last) };
                (None, Some(c))
            }
            None => (None, None),
            Some(mut obj) => {
                let rv = rv_of(&obj).unwrap_or(0);
                let same = self.history.back().is_some_and(|c| c.key == *key && c.rv == rv && rv == self.next_rv);
                if !same && (rv != self.next_rv || self.history.back().is_some_and(|c| c.rv == rv)) {
                    self.bump(&mut obj);
                }
                let obj = Arc::new(obj);
                match self.history.back_mut().filter(|_| same) {
                    Some(last) => {
                        last.object = obj.clone();
                        (Some(obj), None)
                    }
                    None => {
                        let kind = if before { ChangeKind::Modified } else { ChangeKind::Added };
                        let c = Change { rv: self.next_rv, kind, key: key.clone(), object: obj.clone() };
                        (Some(obj), Some(c))
                    }
                }
            }
        };
        if let Some(c) = change {
            self.history_from.get_or_insert(c.rv - 1);
            self.history.push_back(c);
            while self.history.len() > HISTORY_CHANGES_MAX {
                if let Some(old) = self.history.pop_front() {
                    self.history_from = Some(old.rv);
                }
            }
        }
        if let Some(deleting) = &mut self.deleting {
            if stored.as_ref().is_some_and(|v| v.pointer("/metadata/deletionTimestamp").is_some()) {
                deleting.insert(key.clone());
            } else {
                deleting.remove(key);
            }
        }
        self.overlay.entry(key.gr()).or_default().insert(slot(key), stored);
    }

    /// The keys of the overlay's objects being deleted, in key order.
    fn being_deleted(&mut self) -> Vec<ItemKey> {
        let overlay = &self.overlay;
        let set = self.deleting.get_or_insert_with(|| {
            overlay
                .iter()
                .flat_map(|(gr, objs)| {
                    objs.iter().filter_map(move |((ns, name), v)| {
                        v.as_ref()?.pointer("/metadata/deletionTimestamp")?;
                        Some(key_of(gr, ns, name, !ns.is_empty()))
                    })
                })
                .collect()
        });
        set.iter().cloned().collect()
    }

    fn bump(&mut self, v: &mut Value) {
        self.next_rv += 1;
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), json!(self.next_rv.to_string()));
        }
    }

    /// Takes the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<CsiEvent> {
        std::mem::take(&mut self.events)
    }

    /// When the next scheduled change of `key` happens, if one is scheduled.
    pub fn next_change(&self, key: &ItemKey) -> Option<u64> {
        self.jobs.iter().filter(|j| j.touches.contains(key)).map(|j| j.at).min()
    }

    /// The current resourceVersion: the last change's, at least the built-in objects' highest.
    pub fn resource_version(&self, st: &Statics<'_>) -> u64 {
        self.next_rv.max(st.rv_floor)
    }

    /// The changes after resourceVersion `rv` that `keep` accepts, oldest first; `Err` with the oldest resourceVersion
    /// a watch can start from when changes after `rv` were not kept (or were never recorded).
    pub fn changes_since(&self, st: &Statics<'_>, rv: u64, keep: impl Fn(&Change) -> bool) -> Result<Vec<Change>, u64> {
        let from = self.history_from.unwrap_or_else(|| self.resource_version(st));
        if rv < from {
            return Err(from);
        }
        // The history is in version order: start at the first change after `rv`.
        let first = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(first..).filter(|c| keep(c)).cloned().collect())
    }

    /// When the controller's next job is due, if one is scheduled.
    pub fn next_job(&self) -> Option<u64> {
        self.jobs.iter().map(|j| j.at).min()
    }

    /// Runs every job due at `now`, in time order. Returns whether anything changed.
    pub fn settle(&mut self, st: &Statics<'_>, now: u64) -> bool {
        // The overlay's versions continue above the built-in objects'; the history starts here.
        self.next_rv = self.next_rv.max(st.rv_floor);
        self.history_from.get_or_insert(self.next_rv);
        let mut changed = false;
        while let Some(i) =
            self.jobs.iter().enumerate().filter(|(_, j)| j.at <= now).min_by_key(|(i, j)| (j.at, *i)).map(|(i, _)| i)
        {
            let job = self.jobs.remove(i);
            self.run(st, &job);
            changed = true;
        }
        changed
    }

    /// Creates an object (see the module docs).
    pub fn create(
        &mut self,
        st: &Statics<'_>,
        now: u64,
        rt: &ResourceType,
        ns: Option<&str>,
        json: &str,
    ) -> Result<Value, ClusterError> {
        self.settle(st, now);
        let obj: Value = serde_json::from_str(json)
            .map_err(|e| ClusterError::Other(format!("create {}: the body is not JSON: {e}", rt.gr)))?;
        self.create_object(st, now, rt, ns, obj, None).map_err(ApiError::into_cluster_error)
    }

    /// Whether writes to objects of `gr` keep `.status` for the status subresource: the snapshot
    /// kinds, and the resources of CRDs that declare one.
    pub fn status_subresource(&self, st: &Statics<'_>, gr: &GroupResource) -> bool {
        has_status(gr)
            || (gr.group == crate::crd::APIEXTENSIONS && gr.resource == "customresourcedefinitions")
            || self.crds(st).iter().flat_map(crate::crd::served).any(|c| c.rt.gr == *gr && c.status)
    }

    /// The CustomResourceDefinition objects that exist now.
    pub fn crds(&self, st: &Statics<'_>) -> Vec<Value> {
        self.live(st, &crate::crd::crd_resource().gr).into_iter().map(|(_, v)| v).collect()
    }

    /// The objects of `gr` that exist now, with their keys, in (namespace, name) order.
    pub fn live(&self, st: &Statics<'_>, gr: &GroupResource) -> Vec<(ItemKey, Value)> {
        merge_overlay(st.objects.get(gr), self.overlay.get(gr))
            .map(|((ns, name), v)| (key_of(gr, ns, name, !ns.is_empty()), v.clone()))
            .collect()
    }

    fn create_object(
        &mut self,
        st: &Statics<'_>,
        now: u64,
        rt: &ResourceType,
        ns: Option<&str>,
        mut obj: Value,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        let bad = |m: String| ApiError::new(400, "BadRequest", m);
        if !obj.is_object() {
            return Err(bad(format!("create {}: the body is not an object", rt.gr)));
        }
        if s(&obj, "/metadata/name").is_none() {
            if let Some(prefix) = s(&obj, "/metadata/generateName").map(str::to_string) {
                let n = self.next_rv.to_string();
                obj["metadata"]["name"] = json!(format!("{prefix}{}", &hex(&[&prefix, &n], 3)[..5]));
            }
        }
        let name = s(&obj, "/metadata/name")
            .map(str::to_string)
            .ok_or_else(|| ApiError::new(422, "Invalid", format!("create {}: metadata.name is required", rt.gr)))?;
        let ns = if rt.namespaced {
            let given = s(&obj, "/metadata/namespace").map(str::to_string);
            match (ns, given) {
                (Some(a), Some(b)) if a != b => {
                    return Err(bad(format!(
                        "create {}: the namespace of the object ({b}) does not match the request ({a})",
                        rt.gr
                    )))
                }
                (Some(a), _) => a.to_string(),
                (None, Some(b)) => b,
                (None, None) => return Err(bad(format!("create {}: a namespace is required", rt.gr))),
            }
        } else {
            String::new()
        };
        let key = key_of(&rt.gr, &ns, &name, rt.namespaced);
        if rt.namespaced {
            // As the API server's NamespaceLifecycle admission: no object in a namespace that
            // does not exist, nor in one being deleted. The namespaces every cluster has count as
            // existing even where the fake cluster holds no object for them.
            match self.get(st, &key_of(&GroupResource::new("", "namespaces"), "", &ns, false)) {
                None if SYSTEM_NAMESPACES.contains(&ns.as_str()) => {}
                None => return Err(ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))),
                Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            rt.gr
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        if self.get(st, &key).is_some() {
            return Err(ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", rt.gr)));
        }
        let id = format!("{}/{ns}/{name}", rt.gr);
        let n = self.incarnations.entry(id.clone()).or_insert(0);
        *n += 1;
        let uid = uuid(&["uid", &id, &n.to_string()]);
        let status_sub = self.status_subresource(st, &rt.gr);
        if let Some(m) = obj.as_object_mut() {
            m.insert("apiVersion".into(), json!(rt.api_version()));
            m.insert("kind".into(), json!(rt.kind));
            if status_sub {
                m.remove("status");
            }
        }
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("uid".into(), json!(uid));
            m.insert("creationTimestamp".into(), json!(time(now)));
            m.insert("generation".into(), json!(1));
            m.remove("resourceVersion");
            m.remove("managedFields");
            m.remove("deletionTimestamp");
            if rt.namespaced {
                m.insert("namespace".into(), json!(ns));
            }
        }
        if rt.gr == crate::crd::crd_resource().gr {
            obj["status"] = crate::crd::status(&obj, &time(now));
        } else if rt.gr.group.is_empty() && rt.gr.resource == "namespaces" {
            obj["status"] = json!({"phase": "Active"});
        }
        if let Some(manager) = manager {
            let owners = crate::fields::after_update(Default::default(), &json!({}), &obj, manager);
            crate::fields::write(&mut obj, &owners, &time(now));
        }
        self.bump(&mut obj);
        self.put(st, &key, Some(obj.clone()));
        if rt.gr.group == SNAP && rt.gr.resource == "volumesnapshots" {
            self.snapshot_created(st, now, &key);
        } else if rt.gr.group == SNAP && rt.gr.resource == "volumesnapshotcontents" {
            self.content_imported(st, now, &key);
        } else if rt.gr.group == GSNAP && rt.gr.resource == "volumegroupsnapshots" {
            self.group_created(st, now, &key);
        }
        self.reconcile(st, now);
        Ok(self.lookup(st, &key).unwrap_or(obj))
    }

    /// Applies a JSON merge patch.
    pub fn patch(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey, patch: &str) -> Result<Value, ClusterError> {
        self.settle(st, now);
        let p: Value = serde_json::from_str(patch)
            .map_err(|e| ClusterError::Other(format!("patch {key}: the patch is not JSON: {e}")))?;
        let obj = self
            .lookup(st, key)
            .ok_or_else(|| ClusterError::NotFound(format!("{} \"{}\" not found", key.gr(), key.name())))?;
        let mut new = obj.clone();
        merge_patch(&mut new, &p);
        self.commit(st, now, key, obj, new, false, None, None).map_err(ApiError::into_cluster_error)
    }

    /// A write through the API server (see [`ApiWrite`]); the object after it, `None` when a
    /// delete removed it.
    pub fn api_write(&mut self, st: &Statics<'_>, now: u64, op: &ApiWrite) -> Result<Option<Value>, ApiError> {
        self.settle(st, now);
        let not_found = |key: &ItemKey| {
            ApiError::new(404, "NotFound", format!("{} \"{}\" not found", resource_label(&key.gr()), key.name()))
        };
        match op {
            ApiWrite::Create { rt, namespace, body, manager } => {
                self.create_object(st, now, rt, namespace.as_deref(), body.clone(), manager.as_deref()).map(Some)
            }
            ApiWrite::Replace { key, body, status, manager, .. } => {
                let old = self.lookup(st, key).ok_or_else(|| not_found(key))?;
                if !body.is_object() {
                    return Err(ApiError::new(400, "BadRequest", format!("replace {key}: the body is not an object")));
                }
                let mut new = body.clone();
                if s(&new, "/metadata/resourceVersion").is_none() {
                    // An unconditional update: no precondition.
                    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                }
                self.commit(st, now, key, old, new, *status, manager.as_deref(), None).map(Some)
            }
            ApiWrite::Merge { key, patch, status, manager, .. } => {
                let old = self.lookup(st, key).ok_or_else(|| not_found(key))?;
                let mut new = old.clone();
                merge_patch(&mut new, patch);
                self.commit(st, now, key, old, new, *status, manager.as_deref(), None).map(Some)
            }
            ApiWrite::Apply { rt, key, body, status, manager, force } => {
                if !body.is_object() {
                    return Err(ApiError::new(400, "BadRequest", format!("apply {key}: the body is not an object")));
                }
                let Some(old) = self.lookup(st, key) else {
                    let mut obj = body.clone();
                    obj["metadata"]["name"] = json!(key.name());
                    return self.create_object(st, now, rt, key.namespace(), obj, Some(manager)).map(Some);
                };
                let owners = crate::fields::read(&old);
                let conflicts = crate::fields::conflicts(&owners, &old, body, manager);
                if !conflicts.is_empty() && !force {
                    return Err(ApiError::new(409, "Conflict", crate::fields::conflict_message(&conflicts)));
                }
                let (new, owners) = crate::fields::apply(&old, &owners, body, manager);
                self.commit(st, now, key, old, new, *status, Some(manager), Some(owners)).map(Some)
            }
            ApiWrite::Delete { key } => match self.delete(st, now, key) {
                Ok(true) => Ok(self.lookup(st, key)),
                Ok(false) => Err(not_found(key)),
                Err(e) => Err(ApiError::new(500, "InternalError", e.to_string())),
            },
        }
    }

    /// Stores `new` as the next state of `old` (at `key`), as an update of the object or (when
    /// `status_write`) of its status: the resourceVersion precondition, the status subresource,
    /// the server's metadata, the generation, ownership (with a manager), no change without a
    /// difference. `owners` overrides the ownership an update would compute (an apply's).
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        st: &Statics<'_>,
        now: u64,
        key: &ItemKey,
        old: Value,
        mut new: Value,
        status_write: bool,
        manager: Option<&str>,
        owners: Option<crate::fields::Owners>,
    ) -> Result<Value, ApiError> {
        let gr = key.gr();
        if !new.is_object() {
            return Err(ApiError::new(400, "BadRequest", format!("update {key}: the object is not a JSON object")));
        }
        let wanted =
            new.pointer("/metadata/resourceVersion").cloned().filter(|v| v.as_str().is_some_and(|s| !s.is_empty()));
        if wanted.is_some_and(|w| Some(&w) != old.pointer("/metadata/resourceVersion")) {
            return Err(conflict(key));
        }
        // A uid in the body names the object it was meant for: an object deleted and created again
        // under the name has another, and the write is refused (`metadata.uid` is immutable), as
        // Kubernetes refuses it — what keeps a late write from landing on the new object.
        let uid_of = |v: &Value| v.pointer("/metadata/uid").and_then(Value::as_str).map(str::to_string);
        if let Some(meant) = uid_of(&new).filter(|u| !u.is_empty()) {
            if Some(&meant) != uid_of(&old).as_ref() {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} \"{}\" is invalid: metadata.uid: Invalid value: \"{meant}\": field is immutable",
                        resource_label(&gr),
                        key.name()
                    ),
                ));
            }
        }
        let status_sub = self.status_subresource(st, &gr);
        if status_write {
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if status_sub {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        for f in ["apiVersion", "kind"] {
            if let Some(v) = old.get(f) {
                new[f] = v.clone();
            }
        }
        if !new.get("metadata").is_some_and(Value::is_object) {
            new["metadata"] = json!({});
        }
        let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) else { return Ok(old) };
        for f in SERVER_METADATA.iter().chain(&["resourceVersion", "managedFields"]) {
            match old.pointer(&format!("/metadata/{f}")) {
                Some(v) => meta.insert(f.to_string(), v.clone()),
                None => meta.remove(*f),
            };
        }
        let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
        let before = finalizers(&old);
        if deleting && finalizers(&new).iter().any(|f| !before.contains(f)) {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!("patch {key}: no new finalizers can be added if the object is being deleted"),
            ));
        }
        if gr == crate::crd::crd_resource().gr && !status_write {
            new["status"] = crate::crd::status(&new, &time(now));
        }
        if new == old {
            return Ok(old);
        }
        let body = |v: &Value| -> Value {
            v.as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<Map<String, Value>>()
                })
                .map(Value::Object)
                .unwrap_or(Value::Null)
        };
        if !status_write && body(&new) != body(&old) {
            let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
            new["metadata"]["generation"] = json!(g + 1);
        }
        if let Some(manager) = manager {
            let owners =
                owners.unwrap_or_else(|| crate::fields::after_update(crate::fields::read(&old), &old, &new, manager));
            crate::fields::write(&mut new, &owners, &time(now));
        }
        self.bump(&mut new);
        let written = new.clone();
        self.put(st, key, Some(new));
        self.reconcile(st, now);
        // Removed by this write (its last finalizer went while it was being deleted): the real API
        // server answers the object as written, not a Status.
        Ok(self.lookup(st, key).unwrap_or(written))
    }

    /// Deletes an object (marks it, when it has finalizers); `Ok(false)` when there is none.
    pub fn delete(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey) -> Result<bool, ClusterError> {
        self.settle(st, now);
        let Some(mut obj) = self.lookup(st, key) else { return Ok(false) };
        if key.is(crate::crd::APIEXTENSIONS, "customresourcedefinitions") {
            // Its objects go with it, finalizers or not.
            if let Some(gr) = crate::crd::defined(&obj) {
                for (k, _) in self.live(st, &gr) {
                    self.put(st, &k, None);
                }
            }
        }
        let namespace = key.is("", "namespaces");
        if namespace {
            // Everything in it is deleted; it goes when the last object has.
            for k in self.in_namespace(st, key.name()) {
                let _ = self.delete(st, now, &k);
            }
            if !self.in_namespace(st, key.name()).is_empty() && obj.pointer("/metadata/deletionTimestamp").is_none() {
                obj["status"] = json!({"phase": "Terminating"});
            }
        }
        let waits = namespace && !self.in_namespace(st, key.name()).is_empty();
        if finalizers(&obj).is_empty() && !waits {
            self.remove(st, now, key, &obj);
        } else if obj.pointer("/metadata/deletionTimestamp").is_none() {
            if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("deletionTimestamp".into(), json!(time(now)));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
            }
            self.bump(&mut obj);
            self.put(st, key, Some(obj));
        }
        self.reconcile(st, now);
        Ok(true)
    }

    /// The keys of the objects in namespace `ns` that exist now.
    fn in_namespace(&self, st: &Statics<'_>, ns: &str) -> Vec<ItemKey> {
        let mut grs: BTreeSet<&GroupResource> = st.objects.keys().collect();
        grs.extend(self.overlay.keys());
        let mut out = Vec::new();
        for gr in grs {
            let mut names: BTreeSet<&str> = BTreeSet::new();
            if let Some(o) = st.objects.get(gr) {
                names.extend(o.keys().filter(|(n, _)| n == ns).map(|(_, name)| name.as_str()));
            }
            for ((n, name), v) in self.overlay.get(gr).into_iter().flatten() {
                if n == ns {
                    if v.is_some() {
                        names.insert(name);
                    } else {
                        names.remove(name.as_str());
                    }
                }
            }
            out.extend(names.into_iter().map(|name| ItemKey::namespaced(&gr.group, &gr.resource, ns, name)));
        }
        out
    }

    /// Removes an object for good, with what its removal does to storage.
    fn remove(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey, obj: &Value) {
        self.put(st, key, None);
        // A content whose snapshot is gone is deleted when its policy is Delete (the common
        // controller's content sync), also when the snapshot went without finalizers.
        if key.is(SNAP, "volumesnapshots") {
            if let Some(c) = s(obj, "/status/boundVolumeSnapshotContentName").map(str::to_string) {
                let doomed = self.get(st, &vsc_key(&c)).is_some_and(|vsc| {
                    s(vsc, "/spec/deletionPolicy") == Some("Delete")
                        && vsc.pointer("/metadata/deletionTimestamp").is_none()
                });
                if doomed {
                    let _ = self.delete(st, now, &vsc_key(&c));
                }
            }
        }
        let delete_policy = s(obj, "/spec/deletionPolicy") == Some("Delete");
        if key.is(SNAP, "volumesnapshotcontents") && delete_policy {
            if let Some(h) = s(obj, "/status/snapshotHandle") {
                self.delete_storage(now, h);
            }
        }
        if key.is(GSNAP, "volumegroupsnapshotcontents") && delete_policy {
            let handles: Vec<String> = obj
                .pointer("/status/volumeSnapshotInfoList")
                .and_then(Value::as_array)
                .map(|l| l.iter().filter_map(|i| s(i, "/snapshotHandle").map(str::to_string)).collect())
                .unwrap_or_default();
            for h in handles {
                self.delete_storage(now, &h);
            }
        }
    }

    fn delete_storage(&mut self, now: u64, handle: &str) {
        if let Some(snap) = self.storage.get_mut(handle).filter(|s| s.deleted_ms.is_none()) {
            snap.deleted_ms = Some(now);
            self.events.push(CsiEvent::Deleted { at_ms: now, handle: handle.to_string() });
        }
    }

    /// Objects being deleted whose controller finalizers can go: the controller's deletion work,
    /// until nothing changes.
    fn reconcile(&mut self, st: &Statics<'_>, now: u64) {
        for _ in 0..64 {
            let mut changed = false;
            for key in self.being_deleted() {
                changed |= self.finalize(st, now, &key);
            }
            if !changed {
                return;
            }
        }
    }

    /// The controller's work for one object being deleted; whether anything changed.
    fn finalize(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey) -> bool {
        if key.is("", "namespaces") && !self.in_namespace(st, key.name()).is_empty() {
            return false;
        }
        let ns = key.namespace().map(str::to_string).unwrap_or_default();
        let mut release: &[&str] = &[];
        // Objects whose deletion this one's waits on, deleted first (read without a copy).
        let mut first: Vec<ItemKey> = Vec::new();
        {
            let Some(obj) = self.overlay_get(key) else {
                return false;
            };
            let deletable = |v: &Value| {
                s(v, "/spec/deletionPolicy") == Some("Delete") && v.pointer("/metadata/deletionTimestamp").is_none()
            };
            if key.is(SNAP, "volumesnapshots") {
                let owner = obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .and_then(|r| {
                        r.iter().find(|o| o.get("kind").and_then(Value::as_str) == Some("VolumeGroupSnapshot"))
                    })
                    .and_then(|o| o.get("name").and_then(Value::as_str));
                let group_alive = owner.is_some_and(|g| self.get(st, &vgs_key(&ns, g)).is_some());
                if finalizers(obj).iter().any(|f| f == IN_GROUP) && group_alive {
                    return false; // SnapshotDeletePending: its group still exists.
                }
                if let Some(c) = s(obj, "/status/boundVolumeSnapshotContentName") {
                    if self.get(st, &vsc_key(c)).is_some_and(deletable) {
                        first.push(vsc_key(c));
                    }
                }
                release = &[AS_SOURCE, VS_BOUND, IN_GROUP];
            } else if key.is(SNAP, "volumesnapshotcontents") {
                let vs = match (s(obj, "/spec/volumeSnapshotRef/namespace"), s(obj, "/spec/volumeSnapshotRef/name")) {
                    (Some(n), Some(v)) => self.get(st, &vs_key(n, v)),
                    _ => None,
                };
                if vs.is_none_or(|v| v.pointer("/metadata/deletionTimestamp").is_some()) {
                    release = &[VSC_BOUND];
                }
            } else if key.is(GSNAP, "volumegroupsnapshots") {
                let uid = s(obj, "/metadata/uid").unwrap_or_default();
                if let Some(c) = s(obj, "/status/boundVolumeGroupSnapshotContentName") {
                    if self.get(st, &vgsc_key(c)).is_some_and(deletable) {
                        first.push(vgsc_key(c));
                    }
                }
                // Garbage collection of the members it still owns.
                let owned = self.overlay.get(&GroupResource::new(SNAP, "volumesnapshots")).into_iter().flatten();
                first.extend(owned.filter_map(|((n, name), v)| {
                    let v = v.as_ref()?;
                    let refs = v.pointer("/metadata/ownerReferences")?.as_array()?;
                    let ours = refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(uid));
                    (ours && v.pointer("/metadata/deletionTimestamp").is_none()).then(|| vs_key(n, name))
                }));
                release = &[VGS_BOUND];
            } else if key.is(GSNAP, "volumegroupsnapshotcontents") {
                let vgs = match (
                    s(obj, "/spec/volumeGroupSnapshotRef/namespace"),
                    s(obj, "/spec/volumeGroupSnapshotRef/name"),
                ) {
                    (Some(n), Some(v)) => self.get(st, &vgs_key(n, v)),
                    _ => None,
                };
                if vgs.is_none_or(|v| v.pointer("/metadata/deletionTimestamp").is_some()) {
                    release = &[VGSC_BOUND];
                }
            }
        }
        for k in &first {
            let _ = self.delete(st, now, k);
        }
        // The object may have changed through the deletions above.
        let Some(obj) = self.get(st, key) else { return true };
        let before = finalizers(obj);
        let after: Vec<String> = before.iter().filter(|f| !release.contains(&f.as_str())).cloned().collect();
        if after.is_empty() {
            let obj = obj.clone();
            self.remove(st, now, key, &obj);
            return true;
        }
        if after.len() != before.len() {
            let mut obj = obj.clone();
            set_finalizers(&mut obj, &after);
            self.bump(&mut obj);
            self.put(st, key, Some(obj));
            return true;
        }
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn schedule(
        &mut self,
        at: u64,
        kind: JobKind,
        target: &ItemKey,
        uid: &str,
        touches: Vec<ItemKey>,
        b: Behaviour,
        created: u64,
    ) {
        self.jobs.push(Job {
            at,
            kind,
            target: target.clone(),
            uid: uid.to_string(),
            touches,
            fault: b.fault,
            ready_ms: b.timing.ready_ms,
            created,
        });
    }

    fn fail(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey, message: String) {
        if let Some(mut v) = self.lookup_overlay(key) {
            v["status"] = json!({"readyToUse": false, "error": {"time": time(now), "message": message}});
            self.bump(&mut v);
            self.put(st, key, Some(v));
        }
        self.events.push(CsiEvent::Failed { at_ms: now, object: key.clone(), message });
    }

    fn lookup_overlay(&self, key: &ItemKey) -> Option<Value> {
        self.overlay_get(key).cloned()
    }

    /// [`Self::lookup_overlay`] without the copy.
    fn overlay_get(&self, key: &ItemKey) -> Option<&Value> {
        self.overlay.get(&key.gr()).and_then(|o| o.get(&slot(key))).and_then(|v| v.as_deref())
    }

    /// What a claim is: its storage request, its volume's driver and handle, or why it cannot be
    /// snapshotted.
    fn claim_volume(&self, st: &Statics<'_>, ns: &str, claim: &str) -> Result<(u64, String, String), String> {
        let pvc = self
            .lookup(st, &ItemKey::namespaced("", "persistentvolumeclaims", ns, claim))
            .ok_or_else(|| format!("PersistentVolumeClaim {ns}/{claim} not found"))?;
        let size = quantity(s(&pvc, "/spec/resources/requests/storage"));
        let pv = s(&pvc, "/spec/volumeName").filter(|_| s(&pvc, "/status/phase") == Some("Bound"));
        let pv = pv.ok_or_else(|| format!("PersistentVolumeClaim {ns}/{claim} is not bound"))?;
        let pvo = self
            .lookup(st, &ItemKey::cluster("", "persistentvolumes", pv))
            .ok_or_else(|| format!("PersistentVolume {pv} not found"))?;
        let driver = s(&pvo, "/spec/csi/driver").ok_or_else(|| format!("PersistentVolume {pv} is not a CSI volume"))?;
        let handle = s(&pvo, "/spec/csi/volumeHandle").unwrap_or(pv);
        Ok((size, driver.to_string(), handle.to_string()))
    }

    fn class(
        &self,
        st: &Statics<'_>,
        gr: &str,
        resource: &str,
        name: Option<&str>,
    ) -> Result<(String, String), String> {
        let name = name.ok_or_else(|| "no snapshot class named".to_string())?;
        let c = self
            .lookup(st, &ItemKey::cluster(gr, resource, name))
            .ok_or_else(|| format!("{resource} {name} not found"))?;
        let driver = s(&c, "/driver").unwrap_or_default().to_string();
        let policy = s(&c, "/deletionPolicy").unwrap_or("Delete").to_string();
        Ok((driver, policy))
    }

    fn snapshot_created(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey) {
        let Some(mut vs) = self.lookup_overlay(key) else { return };
        let ns = key.namespace().map(str::to_string).unwrap_or_default();
        let Some(claim) = s(&vs, "/spec/source/persistentVolumeClaimName").map(str::to_string) else { return };
        set_finalizers(&mut vs, &[AS_SOURCE.to_string()]);
        self.put(st, key, Some(vs.clone()));
        let check = self.claim_volume(st, &ns, &claim).and_then(|(_, driver, _)| {
            let (cdriver, _) =
                self.class(st, SNAP, "volumesnapshotclasses", s(&vs, "/spec/volumeSnapshotClassName"))?;
            if cdriver != driver {
                return Err(format!("the snapshot class is of driver {cdriver}, the volume of driver {driver}"));
            }
            Ok(())
        });
        if let Err(e) = check {
            self.fail(st, now, key, format!("failed to create snapshot content: {e}"));
            return;
        }
        let b = st.config.claims.get(&(ns, claim)).copied().unwrap_or(st.config.default);
        let uid = s(&vs, "/metadata/uid").unwrap_or_default().to_string();
        let touches = vec![key.clone(), vsc_key(&format!("snapcontent-{uid}"))];
        self.schedule(now + b.timing.cut_ms, JobKind::Cut, key, &uid, touches, b, now);
    }

    fn group_created(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey) {
        let Some(mut vgs) = self.lookup_overlay(key) else { return };
        let ns = key.namespace().map(str::to_string).unwrap_or_default();
        set_finalizers(&mut vgs, &[VGS_BOUND.to_string()]);
        self.put(st, key, Some(vgs.clone()));
        let labels: BTreeMap<String, String> = vgs
            .pointer("/spec/source/selector/matchLabels")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let claims = self.selected_claims(st, &ns, &labels);
        let uid = s(&vgs, "/metadata/uid").unwrap_or_default().to_string();
        let check = (|| {
            if labels.is_empty() || claims.is_empty() {
                return Err("the selector selects no PersistentVolumeClaim".to_string());
            }
            let (cdriver, _) =
                self.class(st, GSNAP, "volumegroupsnapshotclasses", s(&vgs, "/spec/volumeGroupSnapshotClassName"))?;
            let mut members = Vec::new();
            for c in &claims {
                let (_, driver, handle) = self.claim_volume(st, &ns, c)?;
                if driver != cdriver {
                    return Err(format!("claim {c} is on driver {driver}, the class is of driver {cdriver}"));
                }
                members.push(vs_key(&ns, &format!("snapshot-{}", hex(&[&uid, &handle], 32))));
                members.push(vsc_key(&format!("snapcontent-{}", hex(&[&uid, &handle], 32))));
            }
            Ok(members)
        })();
        let members = match check {
            Ok(m) => m,
            Err(e) => {
                self.fail(st, now, key, format!("failed to create group snapshot content: {e}"));
                return;
            }
        };
        let group = labels.values().next().cloned().unwrap_or_default();
        let b = st.config.groups.get(&(ns, group)).copied().unwrap_or(st.config.default);
        let mut touches = vec![key.clone(), vgsc_key(&format!("groupsnapcontent-{uid}"))];
        touches.extend(members);
        self.schedule(now + b.timing.cut_ms, JobKind::GroupCut, key, &uid, touches, b, now);
    }

    /// Claims of namespace `ns` whose labels include every one of `labels`, by name.
    fn selected_claims(&self, st: &Statics<'_>, ns: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let gr = GroupResource::new("", "persistentvolumeclaims");
        let mut names: BTreeSet<String> = st
            .objects
            .get(&gr)
            .into_iter()
            .flatten()
            .filter(|((n, _), _)| n == ns)
            .map(|((_, name), _)| name.clone())
            .collect();
        for ((n, name), v) in self.overlay.get(&gr).into_iter().flatten() {
            if n == ns {
                if v.is_some() {
                    names.insert(name.clone());
                } else {
                    names.remove(name);
                }
            }
        }
        names
            .into_iter()
            .filter(|name| {
                self.get(st, &ItemKey::namespaced("", "persistentvolumeclaims", ns, name)).is_some_and(|pvc| {
                    labels.iter().all(|(k, v)| {
                        pvc.pointer("/metadata/labels").and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v)
                    })
                })
            })
            .collect()
    }

    fn run(&mut self, st: &Statics<'_>, job: &Job) {
        let target = self.lookup_overlay(&job.target);
        let alive = target.as_ref().filter(|o| {
            s(o, "/metadata/uid") == Some(job.uid.as_str()) && o.pointer("/metadata/deletionTimestamp").is_none()
        });
        // A group's members become ready whether or not the group object is still there (Velero
        // deletes it once the members are detached); everything else needs its snapshot.
        let Some(obj) = alive.cloned().or_else(|| (job.kind == JobKind::GroupReady).then(|| json!({}))) else { return };
        match job.kind {
            JobKind::Cut => self.cut(st, job, obj),
            JobKind::GroupCut => self.group_cut(st, job, obj),
            JobKind::Ready | JobKind::GroupReady => {
                for k in &job.touches {
                    if let Some(mut v) = self.lookup_overlay(k) {
                        if v.get("status").is_some() && v.pointer("/metadata/deletionTimestamp").is_none() {
                            v["status"]["readyToUse"] = json!(true);
                            self.bump(&mut v);
                            self.put(st, k, Some(v));
                        }
                    }
                }
            }
        }
    }

    /// A pre-provisioned content (`spec.source.snapshotHandle`, as a restore or a deletion of a
    /// retained snapshot creates one): the sidecar asks the driver for the snapshot and sets the
    /// status — the handle, ready — or, when the driver has no such snapshot (never cut, or deleted
    /// already), an error. Deleting it with `deletionPolicy: Delete` then deletes the storage
    /// snapshot through `status.snapshotHandle`, as for a content the driver cut.
    fn content_imported(&mut self, st: &Statics<'_>, now: u64, key: &ItemKey) {
        let Some(mut c) = self.lookup_overlay(key) else { return };
        let Some(handle) = s(&c, "/spec/source/snapshotHandle").map(str::to_string) else { return };
        c["status"] = match self.storage.get(&handle).filter(|x| x.deleted_ms.is_none()) {
            Some(snap) => {
                json!({"snapshotHandle": handle, "creationTime": snap.cut_ms as u128 * 1_000_000, "readyToUse": true})
            }
            None => json!({"readyToUse": false, "error": {"time": time(now),
                "message": format!("failed to check and update snapshot content: snapshot {handle} not found")}}),
        };
        self.bump(&mut c);
        self.put(st, key, Some(c));
    }

    /// A new content bound to snapshot `vs` with (unless `handle` is `None`) a cut storage snapshot.
    #[allow(clippy::too_many_arguments)]
    fn content(
        &mut self,
        st: &Statics<'_>,
        at: u64,
        name: &str,
        vs: &Value,
        driver: &str,
        policy: &str,
        volume: &str,
        size: u64,
        handle: Option<&str>,
        group_handle: Option<&str>,
    ) -> Value {
        let id = format!("{SNAP}/volumesnapshotcontents//{name}");
        let n = self.incarnations.entry(id.clone()).or_insert(0);
        *n += 1;
        let mut status = json!({"readyToUse": false});
        if let Some(h) = handle {
            status = json!({"snapshotHandle": h, "creationTime": at as u128 * 1_000_000, "restoreSize": size, "readyToUse": false});
            if let Some(g) = group_handle {
                status["volumeGroupSnapshotHandle"] = json!(g);
            }
        }
        let mut c = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": name, "uid": uuid(&["uid", &id, &n.to_string()]), "creationTimestamp": time(at),
                "generation": 1, "finalizers": [VSC_BOUND]},
            "spec": {
                "volumeSnapshotRef": {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                    "namespace": s(vs, "/metadata/namespace"), "name": s(vs, "/metadata/name"), "uid": s(vs, "/metadata/uid")},
                "deletionPolicy": policy,
                "driver": driver,
                "source": {"volumeHandle": volume},
            },
            "status": status,
        });
        if let Some(class) = s(vs, "/spec/volumeSnapshotClassName") {
            c["spec"]["volumeSnapshotClassName"] = json!(class);
        }
        self.bump(&mut c);
        self.put(st, &vsc_key(name), Some(c.clone()));
        c
    }

    fn cut(&mut self, st: &Statics<'_>, job: &Job, mut vs: Value) {
        let at = job.at;
        let ns = job.target.namespace().map(str::to_string).unwrap_or_default();
        let claim = s(&vs, "/spec/source/persistentVolumeClaimName").unwrap_or_default().to_string();
        if job.fault == Some(CsiFault::Error) {
            self.fail(
                st,
                at,
                &job.target,
                format!("failed to take snapshot of the volume of {ns}/{claim}: rpc error: code = Internal (injected)"),
            );
            return;
        }
        let Ok((size, driver, volume)) = self.claim_volume(st, &ns, &claim) else { return };
        let (_, policy) =
            self.class(st, SNAP, "volumesnapshotclasses", s(&vs, "/spec/volumeSnapshotClassName")).unwrap_or_default();
        let name = format!("snapcontent-{}", s(&vs, "/metadata/uid").unwrap_or_default());
        let handle = format!("snap-{}", hex(&["handle", &name], 10));
        let never = job.fault == Some(CsiFault::NeverHandle);
        self.content(st, at, &name, &vs, &driver, &policy, &volume, size, (!never).then_some(handle.as_str()), None);
        let mut f = finalizers(&vs);
        if policy == "Delete" && !f.iter().any(|x| x == VS_BOUND) {
            f.push(VS_BOUND.to_string());
        }
        set_finalizers(&mut vs, &f);
        vs["status"] = if never {
            json!({"boundVolumeSnapshotContentName": name, "readyToUse": false})
        } else {
            json!({"boundVolumeSnapshotContentName": name, "creationTime": time(at),
                   "restoreSize": blockwise_engine::snapshot::binary_quantity(size), "readyToUse": false})
        };
        self.bump(&mut vs);
        self.put(st, &job.target, Some(vs));
        if never {
            self.events.push(CsiEvent::Stalled { at_ms: at, object: job.target.clone(), what: "handle" });
            return;
        }
        let claim_key = ItemKey::namespaced("", "persistentvolumeclaims", &ns, &claim);
        self.storage.insert(
            handle.clone(),
            StorageSnapshot {
                handle: handle.clone(),
                claim: claim_key.clone(),
                group: None,
                cut_ms: at,
                deleted_ms: None,
            },
        );
        self.events.push(CsiEvent::Cut {
            at_ms: at,
            object: job.target.clone(),
            created_ms: job.created,
            members: vec![CutMember {
                claim: claim_key,
                snapshot: job.target.name().to_string(),
                content: name,
                handle,
            }],
        });
        if job.fault == Some(CsiFault::NeverReady) {
            self.events.push(CsiEvent::Stalled { at_ms: at, object: job.target.clone(), what: "ready" });
        } else {
            let b = Behaviour { timing: Timing { cut_ms: 0, ready_ms: job.ready_ms }, fault: None };
            self.schedule(
                at + job.ready_ms,
                JobKind::Ready,
                &job.target,
                &job.uid,
                job.touches.clone(),
                b,
                job.created,
            );
        }
    }

    fn group_cut(&mut self, st: &Statics<'_>, job: &Job, mut vgs: Value) {
        let at = job.at;
        let ns = job.target.namespace().map(str::to_string).unwrap_or_default();
        if job.fault == Some(CsiFault::Error) {
            self.fail(
                st,
                at,
                &job.target,
                "failed to create group snapshot: rpc error: code = Internal (injected)".into(),
            );
            return;
        }
        let uid = s(&vgs, "/metadata/uid").unwrap_or_default().to_string();
        if job.fault == Some(CsiFault::NeverHandle) {
            // Bound to a group content whose handle never comes: no member is ever made.
            vgs["status"] =
                json!({"boundVolumeGroupSnapshotContentName": format!("groupsnapcontent-{uid}"), "readyToUse": false});
            self.bump(&mut vgs);
            self.put(st, &job.target, Some(vgs));
            self.events.push(CsiEvent::Stalled { at_ms: at, object: job.target.clone(), what: "handle" });
            return;
        }
        let labels: BTreeMap<String, String> = vgs
            .pointer("/spec/source/selector/matchLabels")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let mut claims = self.selected_claims(st, &ns, &labels);
        let (driver, policy) = self
            .class(st, GSNAP, "volumegroupsnapshotclasses", s(&vgs, "/spec/volumeGroupSnapshotClassName"))
            .unwrap_or_default();
        let content_name = format!("groupsnapcontent-{uid}");
        let group_handle = format!("group-{}", hex(&["handle", &content_name], 10));
        if job.fault == Some(CsiFault::Partial) && claims.pop().is_some() {
            self.events.push(CsiEvent::Stalled { at_ms: at, object: job.target.clone(), what: "member" });
        }
        let api_version =
            vgs.get("apiVersion").and_then(Value::as_str).unwrap_or("groupsnapshot.storage.k8s.io/v1").to_string();
        let mut infos = Vec::new();
        let mut members = Vec::new();
        for c in &claims {
            let Ok((size, _, volume)) = self.claim_volume(st, &ns, c) else { continue };
            let h = hex(&[&uid, &volume], 32);
            let (vs_name, vsc_name) = (format!("snapshot-{h}"), format!("snapcontent-{h}"));
            let handle = format!("snap-{}", hex(&["handle", &vsc_name], 10));
            let id = format!("{SNAP}/volumesnapshots/{ns}/{vs_name}");
            let n = self.incarnations.entry(id.clone()).or_insert(0);
            *n += 1;
            let mut vs = json!({
                "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": vs_name, "namespace": ns, "uid": uuid(&["uid", &id, &n.to_string()]),
                    "creationTimestamp": time(at), "generation": 1, "finalizers": [IN_GROUP, AS_SOURCE],
                    "ownerReferences": [{"apiVersion": api_version, "kind": "VolumeGroupSnapshot", "name": s(&vgs, "/metadata/name"), "uid": uid}]},
                "spec": {"source": {"persistentVolumeClaimName": c}},
                "status": {"boundVolumeSnapshotContentName": vsc_name, "creationTime": time(at),
                    "restoreSize": blockwise_engine::snapshot::binary_quantity(size), "readyToUse": false,
                    "volumeGroupSnapshotName": s(&vgs, "/metadata/name")},
            });
            self.content(st, at, &vsc_name, &vs, &driver, &policy, &volume, size, Some(&handle), Some(&group_handle));
            self.bump(&mut vs);
            self.put(st, &vs_key(&ns, &vs_name), Some(vs));
            infos.push(json!({"volumeHandle": volume, "snapshotHandle": handle, "creationTime": at as u128 * 1_000_000, "readyToUse": false, "restoreSize": size}));
            let claim_key = ItemKey::namespaced("", "persistentvolumeclaims", &ns, c);
            self.storage.insert(
                handle.clone(),
                StorageSnapshot {
                    handle: handle.clone(),
                    claim: claim_key.clone(),
                    group: Some(group_handle.clone()),
                    cut_ms: at,
                    deleted_ms: None,
                },
            );
            members.push(CutMember { claim: claim_key, snapshot: vs_name, content: vsc_name, handle });
        }
        let n = self.incarnations.entry(format!("{GSNAP}/volumegroupsnapshotcontents//{content_name}")).or_insert(0);
        *n += 1;
        let mut vgsc = json!({
            "apiVersion": api_version, "kind": "VolumeGroupSnapshotContent",
            "metadata": {"name": content_name, "uid": uuid(&["uid", &content_name, &n.to_string()]), "creationTimestamp": time(at),
                "generation": 1, "finalizers": [VGSC_BOUND]},
            "spec": {"volumeGroupSnapshotRef": {"apiVersion": api_version, "kind": "VolumeGroupSnapshot", "namespace": ns,
                    "name": s(&vgs, "/metadata/name"), "uid": uid},
                "deletionPolicy": policy, "driver": driver,
                "volumeGroupSnapshotClassName": s(&vgs, "/spec/volumeGroupSnapshotClassName")},
            "status": {"volumeGroupSnapshotHandle": group_handle, "creationTime": time(at), "readyToUse": false,
                "volumeSnapshotInfoList": infos},
        });
        self.bump(&mut vgsc);
        self.put(st, &vgsc_key(&content_name), Some(vgsc));
        vgs["status"] =
            json!({"boundVolumeGroupSnapshotContentName": content_name, "creationTime": time(at), "readyToUse": false});
        self.bump(&mut vgs);
        self.put(st, &job.target, Some(vgs));
        self.events.push(CsiEvent::Cut { at_ms: at, object: job.target.clone(), created_ms: job.created, members });
        if job.fault == Some(CsiFault::NeverReady) {
            self.events.push(CsiEvent::Stalled { at_ms: at, object: job.target.clone(), what: "ready" });
        } else {
            let b = Behaviour { timing: Timing { cut_ms: 0, ready_ms: job.ready_ms }, fault: None };
            self.schedule(
                at + job.ready_ms,
                JobKind::GroupReady,
                &job.target,
                &job.uid,
                job.touches.clone(),
                b,
                job.created,
            );
        }
    }

    /// Objects of the snapshot kinds that exist now (what a backup must not leave behind).
    pub fn snapshot_objects(&self) -> Vec<ItemKey> {
        let mut out = Vec::new();
        for (gr, objs) in &self.overlay {
            if gr.group != SNAP && gr.group != GSNAP || gr.resource.ends_with("classes") {
                continue;
            }
            for ((ns, name), v) in objs {
                if v.is_some() {
                    out.push(key_of(gr, ns, name, !ns.is_empty()));
                }
            }
        }
        out
    }
}

/// The built-in objects of one resource (`base`) with the overlay's changes to it (`over`), in key
/// order, without copying either: an overlay entry replaces (or, when `None`, deletes) the built-in
/// object of its key.
pub fn merge_overlay<'a>(
    base: Option<&'a BTreeMap<(String, String), Value>>,
    over: Option<&'a Written>,
) -> impl Iterator<Item = (&'a (String, String), &'a Value)> + 'a {
    MergeOverlay { base: base.into_iter().flatten().peekable(), over: over.into_iter().flatten().peekable() }
}

/// The iterator of [`merge_overlay`].
struct MergeOverlay<'a, B, O>
where
    B: Iterator<Item = (&'a (String, String), &'a Value)>,
    O: Iterator<Item = (&'a (String, String), &'a Option<Arc<Value>>)>,
{
    base: std::iter::Peekable<B>,
    over: std::iter::Peekable<O>,
}

impl<'a, B, O> Iterator for MergeOverlay<'a, B, O>
where
    B: Iterator<Item = (&'a (String, String), &'a Value)>,
    O: Iterator<Item = (&'a (String, String), &'a Option<Arc<Value>>)>,
{
    type Item = (&'a (String, String), &'a Value);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.base.peek(), self.over.peek()) {
                (None, None) => return None,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((b, _)), Some((o, _))) => b.cmp(o),
            };
            if order == std::cmp::Ordering::Equal {
                // The overlay's entry stands for the built-in object of its key.
                self.base.next();
            }
            let take_over = order != std::cmp::Ordering::Less;
            if !take_over {
                return self.base.next();
            }
            let (k, v) = self.over.next()?;
            if let Some(v) = v {
                return Some((k, &**v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statics(
        objects: &BTreeMap<GroupResource, BTreeMap<(String, String), Value>>,
        config: &CsiConfig,
    ) -> Statics<'static> {
        // Leaked for the test's lifetime: the fixtures are tiny.
        let objects: &'static _ = Box::leak(Box::new(objects.clone()));
        let config: &'static _ = Box::leak(Box::new(config.clone()));
        let resources: &'static _ = Box::leak(Box::new(snapshot_resources(Some("v1"))));
        Statics { objects, resources, config, rv_floor: 0 }
    }

    fn world() -> BTreeMap<GroupResource, BTreeMap<(String, String), Value>> {
        let mut o: BTreeMap<GroupResource, BTreeMap<(String, String), Value>> = BTreeMap::new();
        let mut put = |g: &str, r: &str, ns: &str, v: Value| {
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            o.entry(GroupResource::new(g, r)).or_default().insert((ns.to_string(), name), v);
        };
        put("", "namespaces", "", json!({"metadata": {"name": "ns"}}));
        for c in ["a", "b"] {
            put(
                "",
                "persistentvolumeclaims",
                "ns",
                json!({"metadata": {"name": c, "namespace": "ns", "labels": {"velero.io/volume-group": "g"}},
                "spec": {"volumeName": format!("pv-{c}"), "resources": {"requests": {"storage": "2Gi"}}}, "status": {"phase": "Bound"}}),
            );
            put(
                "",
                "persistentvolumes",
                "",
                json!({"metadata": {"name": format!("pv-{c}")}, "spec": {"csi": {"driver": "d", "volumeHandle": format!("vol-{c}")}}}),
            );
        }
        put(
            SNAP,
            "volumesnapshotclasses",
            "",
            json!({"metadata": {"name": "k"}, "driver": "d", "deletionPolicy": "Delete"}),
        );
        put(
            GSNAP,
            "volumegroupsnapshotclasses",
            "",
            json!({"metadata": {"name": "gk"}, "driver": "d", "deletionPolicy": "Delete"}),
        );
        o
    }

    fn rt(r: &str) -> ResourceType {
        snapshot_resources(Some("v1")).into_iter().find(|t| t.gr.resource == r).unwrap()
    }

    #[test]
    fn a_create_in_a_namespace_that_does_not_exist_or_is_terminating_is_refused() {
        let config = CsiConfig::default();
        let objects = world();
        let st = statics(&objects, &config);
        let mut d = Dynamic::default();
        let body = |ns: &str| {
            json!({"metadata": {"name": "s", "namespace": ns}, "spec": {"source": {"persistentVolumeClaimName": "a"}}})
                .to_string()
        };
        let e = d.create(&st, 100, &rt("volumesnapshots"), Some("nowhere"), &body("nowhere")).unwrap_err();
        assert!(matches!(&e, ClusterError::NotFound(m) if m.contains("namespaces \"nowhere\" not found")), "{e:?}");
        // A namespace created through the API takes objects; one being deleted does not.
        let ns_rt = ResourceType::new("", "v1", "namespaces", "Namespace", false);
        d.create(&st, 101, &ns_rt, None, &json!({"metadata": {"name": "fresh", "finalizers": ["x"]}}).to_string())
            .unwrap();
        d.create(&st, 102, &rt("volumesnapshots"), Some("fresh"), &body("fresh")).unwrap();
        d.delete(&st, 103, &ItemKey::cluster("", "namespaces", "fresh")).unwrap();
        let e = d.create(&st, 104, &rt("volumesnapshots"), Some("fresh"), &body("fresh")).unwrap_err();
        assert!(format!("{e:?}").contains("being terminated"), "{e:?}");
    }

    #[test]
    fn a_snapshot_is_cut_then_ready_and_its_deletion_follows_the_content_policy() {
        let config = CsiConfig {
            default: Behaviour { timing: Timing { cut_ms: 10, ready_ms: 5 }, fault: None },
            ..CsiConfig::default()
        };
        let objects = world();
        let st = statics(&objects, &config);
        let mut d = Dynamic::default();
        let body = json!({"metadata": {"name": "s", "namespace": "ns", "labels": {"velero.io/backup-uid": "u"}},
            "spec": {"source": {"persistentVolumeClaimName": "a"}, "volumeSnapshotClassName": "k"}})
        .to_string();
        let vs = d.create(&st, 100, &rt("volumesnapshots"), Some("ns"), &body).unwrap();
        assert!(vs.get("status").is_none());
        let e = d.create(&st, 101, &rt("volumesnapshots"), Some("ns"), &body).unwrap_err();
        assert!(matches!(e, ClusterError::AlreadyExists(_)), "{e:?}");
        let key = vs_key("ns", "s");
        assert_eq!(d.next_change(&key), Some(110));
        d.settle(&st, 109);
        assert!(d.lookup(&st, &key).unwrap().get("status").is_none());
        d.settle(&st, 110);
        let vs = d.lookup(&st, &key).unwrap();
        let content = vs["status"]["boundVolumeSnapshotContentName"].as_str().unwrap().to_string();
        assert_eq!(vs["status"]["restoreSize"], "2Gi");
        let vsc = d.lookup(&st, &vsc_key(&content)).unwrap();
        let handle = vsc["status"]["snapshotHandle"].as_str().unwrap().to_string();
        assert_eq!(vsc["status"]["readyToUse"], false);
        assert!(matches!(&d.take_events()[..], [CsiEvent::Cut { at_ms: 110, .. }]));
        d.settle(&st, 115);
        assert_eq!(d.lookup(&st, &key).unwrap()["status"]["readyToUse"], true);
        // Velero's release: content to Retain, delete the content, then the snapshot.
        d.patch(&st, 120, &vsc_key(&content), r#"{"spec":{"deletionPolicy":"Retain"}}"#).unwrap();
        assert!(d.delete(&st, 121, &vsc_key(&content)).unwrap());
        assert!(d.lookup(&st, &vsc_key(&content)).is_some(), "pending while its snapshot exists");
        assert!(d.delete(&st, 122, &key).unwrap());
        assert!(d.snapshot_objects().is_empty(), "{:?}", d.snapshot_objects());
        assert_eq!(d.storage[&handle].deleted_ms, None, "retained");
        // The state survives a round trip through its file format.
        let back: Dynamic = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!((back.overlay.clone(), back.storage.clone()), (d.overlay.clone(), d.storage.clone()));
        // The same name again: a new uid, so a new content and handle.
        d.create(&st, 130, &rt("volumesnapshots"), Some("ns"), &body).unwrap();
        d.settle(&st, 140);
        let vs2 = d.lookup(&st, &key).unwrap();
        assert_ne!(vs2["status"]["boundVolumeSnapshotContentName"].as_str().unwrap(), content);
        // Deleting with policy Delete deletes the storage snapshot.
        d.delete(&st, 150, &key).unwrap();
        assert!(d.snapshot_objects().is_empty());
        assert_eq!(d.storage.values().filter(|s| s.deleted_ms.is_none()).count(), 1);
    }

    #[test]
    fn a_group_snapshot_makes_owned_members_that_can_be_detached() {
        let config = CsiConfig {
            default: Behaviour { timing: Timing { cut_ms: 10, ready_ms: 5 }, fault: None },
            ..CsiConfig::default()
        };
        let objects = world();
        let st = statics(&objects, &config);
        let mut d = Dynamic::default();
        let body = json!({"metadata": {"name": "g1", "namespace": "ns"},
            "spec": {"source": {"selector": {"matchLabels": {"velero.io/volume-group": "g"}}}, "volumeGroupSnapshotClassName": "gk"}}).to_string();
        d.create(&st, 0, &rt("volumegroupsnapshots"), Some("ns"), &body).unwrap();
        d.settle(&st, 10);
        let members: Vec<ItemKey> =
            d.snapshot_objects().into_iter().filter(|k| k.is(SNAP, "volumesnapshots")).collect();
        assert_eq!(members.len(), 2);
        let m = d.lookup(&st, &members[0]).unwrap();
        assert_eq!(m["status"]["volumeGroupSnapshotName"], "g1");
        // A member cannot go while its group exists; once detached it stays when the group goes.
        d.delete(&st, 11, &members[0]).unwrap();
        assert!(d.lookup(&st, &members[0]).is_some());
        d.patch(&st, 12, &members[1], r#"{"metadata":{"ownerReferences":null,"finalizers":null}}"#).unwrap();
        let vgs = d.lookup(&st, &vgs_key("ns", "g1")).unwrap();
        let content = vgs["status"]["boundVolumeGroupSnapshotContentName"].as_str().unwrap().to_string();
        d.patch(&st, 13, &vgsc_key(&content), r#"{"spec":{"deletionPolicy":"Retain"}}"#).unwrap();
        d.delete(&st, 14, &vgsc_key(&content)).unwrap();
        d.delete(&st, 15, &vgs_key("ns", "g1")).unwrap();
        let left = d.snapshot_objects();
        assert!(left.contains(&members[1]) && !left.contains(&members[0]), "{left:?}");
        assert!(!left.iter().any(|k| k.group() == GSNAP), "{left:?}");
    }

    #[test]
    fn faults_fail_or_stall_the_snapshot() {
        let objects = world();
        let mut config = CsiConfig::default();
        config.claims.insert(
            ("ns".into(), "a".into()),
            Behaviour { timing: Timing { cut_ms: 1, ready_ms: 1 }, fault: Some(CsiFault::Error) },
        );
        config.claims.insert(
            ("ns".into(), "b".into()),
            Behaviour { timing: Timing { cut_ms: 1, ready_ms: 1 }, fault: Some(CsiFault::NeverHandle) },
        );
        let st = statics(&objects, &config);
        let mut d = Dynamic::default();
        for c in ["a", "b"] {
            let body = json!({"metadata": {"name": c, "namespace": "ns"}, "spec": {"source": {"persistentVolumeClaimName": c}, "volumeSnapshotClassName": "k"}}).to_string();
            d.create(&st, 0, &rt("volumesnapshots"), Some("ns"), &body).unwrap();
        }
        d.settle(&st, 100);
        assert!(d.lookup(&st, &vs_key("ns", "a")).unwrap()["status"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected"));
        let b = d.lookup(&st, &vs_key("ns", "b")).unwrap();
        let c = b["status"]["boundVolumeSnapshotContentName"].as_str().unwrap();
        assert!(d.lookup(&st, &vsc_key(c)).unwrap()["status"].get("snapshotHandle").is_none());
        assert!(d.storage.is_empty());
        // A class of another driver is an error at once.
        let bad = json!({"metadata": {"name": "x", "namespace": "ns"}, "spec": {"source": {"persistentVolumeClaimName": "a"}, "volumeSnapshotClassName": "nope"}}).to_string();
        d.create(&st, 0, &rt("volumesnapshots"), Some("ns"), &bad).unwrap();
        assert!(d.lookup(&st, &vs_key("ns", "x")).unwrap()["status"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not found"));
    }
}
