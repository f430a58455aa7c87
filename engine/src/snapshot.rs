//! Volume snapshots inside the hook window (DESIGN §4a): what to snapshot, with which class, under
//! which name, and what the archive holds afterwards. Pure functions; the engine records their
//! results as events and the shell creates, watches and deletes the objects.
//!
//! For each bound, CSI-provisioned claim of a block (unless the backup's `snapshotVolumes` is
//! false) the plan holds one snapshot: a `snapshot.storage.k8s.io/v1` VolumeSnapshot, or — for the
//! claims of one volume group in one namespace — one VolumeGroupSnapshot whose member snapshots
//! are kept. Classes are chosen as Velero 1.17 chooses them ([`choose_class`],
//! [`choose_group_class`]); names are deterministic functions of the backup and the claim or group
//! ([`snapshot_name`]), so a resumed attempt creates-or-gets the same object instead of a second
//! one. The archived VolumeSnapshot and VolumeSnapshotContent ([`archived_member`]) carry the
//! fields and annotations Velero's restore reads, and nothing that changes while a snapshot
//! settles or that a restore resets (resourceVersion, finalizers, readiness, uid,
//! creationTimestamp; the driver's cut time goes to `-volumeinfo.json.gz` instead), so the same
//! snapshot archives to the same bytes whichever process observed it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::grouping::BlockPlan;
use crate::item::{ItemKey, ResourceType, StrMap};

/// Label (and annotation, on the claim) naming the VolumeSnapshot of a claim.
pub const VOLUME_SNAPSHOT_NAME: &str = "velero.io/volume-snapshot-name";
/// Label with the backup's name, on every object a backup creates.
pub const BACKUP_NAME_LABEL: &str = "velero.io/backup-name";
/// Label with the backup's uid, on every object a backup creates.
pub const BACKUP_UID_LABEL: &str = "velero.io/backup-uid";
/// Annotation that makes Velero's restore include an item's additional items.
pub const MUST_INCLUDE_ANNOTATION: &str = "backup.velero.io/must-include-additional-items";
/// Annotation on the archived VolumeSnapshot: the snapshot handle.
pub const HANDLE_ANNOTATION: &str = "velero.io/csi-volumesnapshot-handle";
/// Annotation on the archived VolumeSnapshot: the CSI driver.
pub const DRIVER_ANNOTATION: &str = "velero.io/csi-driver-name";
/// Annotation on the archived VolumeSnapshot: the restore size, as a quantity.
pub const RESTORE_SIZE_ANNOTATION: &str = "velero.io/csi-volumesnapshot-restore-size";
/// Annotation on the archived VolumeSnapshot: the content's deletion policy.
pub const DELETION_POLICY_ANNOTATION: &str = "velero.io/csi-vsc-deletion-policy";
/// Annotation on the archived VolumeSnapshot: the group snapshot handle.
pub const GROUP_HANDLE_ANNOTATION: &str = "velero.io/csi-volumegroupsnapshot-handle";
/// The claim annotation naming a VolumeSnapshotClass, the class label that marks Velero's choice,
/// and the prefix of the backup annotation naming a class per driver (`…_<driver>`).
pub const CLASS_KEY: &str = "velero.io/csi-volumesnapshot-class";
/// Kubernetes' default-class annotation of a VolumeSnapshotClass.
pub const DEFAULT_CLASS_ANNOTATION: &str = "snapshot.storage.kubernetes.io/is-default-class";
/// The claim annotation naming a VolumeGroupSnapshotClass.
pub const GROUP_CLASS_CLAIM_ANNOTATION: &str = "velero.io/csi-volume-group-snapshot-class";
/// Prefix of the backup annotation naming a VolumeGroupSnapshotClass per driver.
pub const GROUP_CLASS_BACKUP_PREFIX: &str = "velero.io/csi-volumegroupsnapshot-class_";
/// The label (value `"true"`) that marks Velero's VolumeGroupSnapshotClass of a driver.
pub const GROUP_CLASS_LABEL: &str = "velero.io/csi-volumegroupsnapshot-class";
/// Kubernetes' default-class annotation of a VolumeGroupSnapshotClass.
pub const GROUP_DEFAULT_CLASS_ANNOTATION: &str = "groupsnapshot.storage.kubernetes.io/is-default-class";
/// The API group of VolumeSnapshots, their contents and classes.
pub const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";
/// The API group of VolumeGroupSnapshots, their contents and classes.
pub const GROUP_SNAPSHOT_GROUP: &str = "groupsnapshot.storage.k8s.io";
/// Velero's default `--csi-snapshot-timeout`.
pub const CSI_SNAPSHOT_TIMEOUT_MS_DEFAULT: u64 = 10 * 60 * 1000;
/// Velero's default `--item-operation-timeout`.
pub const ITEM_OPERATION_TIMEOUT_MS_DEFAULT: u64 = 4 * 60 * 60 * 1000;
/// Longest object name the API server accepts (a DNS subdomain).
pub const OBJECT_NAME_BYTES_MAX: usize = 253;

/// Options of a backup beyond [`crate::spec::BackupSpec`], recorded in `BackupRequestedWithOptions`.
///
/// They are encoded as JSON inside the binary record, every field with a default, so later
/// options are added here without another event variant while old logs stay readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackupOptions {
    /// Velero's `snapshotVolumes`: unset or `true` snapshots CSI volumes, `false` backs up
    /// manifests only.
    pub snapshot_volumes: Option<bool>,
    /// How long to wait for a snapshot to be cut (its handle set), per attempt.
    pub csi_snapshot_timeout_ms: u64,
    /// How long a cut snapshot may take to become ready to use.
    pub item_operation_timeout_ms: u64,
    /// The backup's annotations: Velero reads the snapshot class per driver from them
    /// (`velero.io/csi-volumesnapshot-class_<driver>`, `velero.io/csi-volumegroupsnapshot-class_<driver>`).
    pub annotations: BTreeMap<String, String>,
    /// A unique id of the backup: in the labels and names of the snapshots it creates, so two
    /// backups of one name (in two data directories) never adopt each other's snapshots.
    pub uid: String,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            snapshot_volumes: None,
            csi_snapshot_timeout_ms: CSI_SNAPSHOT_TIMEOUT_MS_DEFAULT,
            item_operation_timeout_ms: ITEM_OPERATION_TIMEOUT_MS_DEFAULT,
            annotations: BTreeMap::new(),
            uid: String::new(),
        }
    }
}

impl BackupOptions {
    /// The options of a backup recorded before options existed: no volume snapshots, so a log
    /// written by an older build resumes exactly as it began.
    pub fn legacy() -> Self {
        BackupOptions { snapshot_volumes: Some(false), ..BackupOptions::default() }
    }

    /// Whether CSI volumes are snapshotted.
    pub fn snapshots_on(&self) -> bool {
        self.snapshot_volumes != Some(false)
    }
}

/// Serde adapter that stores a value as a JSON string (inside the binary record).
pub mod json_string {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Serializes `v` as its JSON text.
    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(v).map_err(S::Error::custom)?;
        s.serialize_str(&text)
    }

    /// Deserializes a value from JSON text.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}

/// The snapshot resources a cluster serves, from discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotApi {
    /// `volumesnapshots.snapshot.storage.k8s.io`.
    pub snapshots: ResourceType,
    /// `volumesnapshotcontents.snapshot.storage.k8s.io`.
    pub contents: ResourceType,
    /// `volumesnapshotclasses.snapshot.storage.k8s.io`.
    pub classes: ResourceType,
    /// The group snapshot resources, when served at v1beta2 or v1.
    pub groups: Option<GroupApi>,
}

/// The group snapshot resources a cluster serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupApi {
    /// `volumegroupsnapshots.groupsnapshot.storage.k8s.io`.
    pub snapshots: ResourceType,
    /// `volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io`.
    pub contents: ResourceType,
    /// `volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io`.
    pub classes: ResourceType,
}

fn find<'a>(resources: &'a [ResourceType], group: &str, resource: &str) -> Option<&'a ResourceType> {
    resources.iter().find(|r| r.gr.group == group && r.gr.resource == resource)
}

/// The snapshot API a cluster serves (`None` without the snapshot CRDs), and why group snapshots
/// cannot be used when they cannot.
pub fn snapshot_api(resources: &[ResourceType]) -> (Option<SnapshotApi>, Option<String>) {
    let snap = |r| find(resources, SNAPSHOT_GROUP, r).filter(|t| t.version == "v1").cloned();
    let (Some(snapshots), Some(contents), Some(classes)) =
        (snap("volumesnapshots"), snap("volumesnapshotcontents"), snap("volumesnapshotclasses"))
    else {
        return (None, None);
    };
    let group = |r| find(resources, GROUP_SNAPSHOT_GROUP, r).cloned();
    let (groups, why) = match (
        group("volumegroupsnapshots"),
        group("volumegroupsnapshotcontents"),
        group("volumegroupsnapshotclasses"),
    ) {
        (Some(s), Some(c), Some(k)) if ["v1", "v1beta2"].contains(&s.version.as_str()) => {
            (Some(GroupApi { snapshots: s, contents: c, classes: k }), None)
        }
        (Some(s), _, _) => (
            None,
            Some(format!("the cluster serves {GROUP_SNAPSHOT_GROUP} at {} only (v1beta2 or v1 is needed)", s.version)),
        ),
        _ => (None, Some(format!("the cluster does not serve {GROUP_SNAPSHOT_GROUP}"))),
    };
    (Some(SnapshotApi { snapshots, contents, classes, groups }), why)
}

/// What a PersistentVolume is, as far as snapshots care.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PvVolume {
    /// Provisioned by a CSI driver.
    Csi {
        /// `spec.csi.driver`.
        driver: String,
        /// `spec.csi.volumeHandle`.
        handle: String,
    },
    /// Not a CSI volume: it is not snapshotted.
    NotCsi,
    /// The volume does not exist.
    Missing,
    /// The volume could not be read.
    Unreadable {
        /// Why.
        error: String,
    },
}

impl PvVolume {
    /// Reads `spec.csi` of a PersistentVolume.
    pub fn of(pv: &Value) -> PvVolume {
        let csi = pv.pointer("/spec/csi");
        match csi.and_then(|c| c.get("driver")).and_then(Value::as_str).filter(|d| !d.is_empty()) {
            Some(driver) => PvVolume::Csi {
                driver: driver.to_string(),
                handle: csi.and_then(|c| c.get("volumeHandle")).and_then(Value::as_str).unwrap_or_default().to_string(),
            },
            None => PvVolume::NotCsi,
        }
    }
}

/// A claim as planning sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The claim.
    pub key: ItemKey,
    /// Bound: `spec.volumeName` when `status.phase` is `Bound`.
    pub volume: Option<String>,
    /// Whether the claim is in this backup.
    pub in_backup: bool,
    /// Its labels (a sorted vector: a B-tree map per claim was ~1 KiB).
    pub labels: StrMap,
    /// Its annotations.
    pub annotations: StrMap,
}

/// The claims snapshot planning reads, each packed (bincode) in an arena and found by its key's
/// digest: ~175 bytes a claim, where a map of [`Claim`]s was ~450 (~27 MB of planning's peak at a
/// million objects, held from the plan through the volumes' inspection).
#[derive(Debug, Default)]
pub struct Claims {
    /// (the key's digest, where the claim is packed), sorted by digest once all are in.
    rows: Vec<(u128, u64)>,
    arena: crate::catalog::Arena,
}

impl Claims {
    /// Adds a claim (one added later under the same key replaces it).
    pub fn insert(&mut self, c: &Claim) -> Result<(), String> {
        let what = |e: &dyn std::fmt::Display| format!("claim {}: {e}", c.key);
        let bytes = crate::state::pack(c).map_err(|e| what(&e))?;
        let at = self.arena.append(&[&bytes]).map_err(|e| what(&e))?;
        self.rows.push((c.key.digest(), at));
        Ok(())
    }

    /// Sorts the claims for lookups (the last added of a key kept); sealing again changes nothing.
    pub fn seal(&mut self) {
        // Stable: of one key, the last added ends last, and is kept.
        self.rows.sort_by_key(|r| r.0);
        self.rows.reverse();
        self.rows.dedup_by_key(|r| r.0);
        self.rows.reverse();
        self.rows.shrink_to_fit();
    }

    /// How many claims.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn at(&self, at: u64) -> Option<Claim> {
        crate::state::unpack(self.arena.at(at))
    }

    /// The claim of `key`, read back.
    pub fn get(&self, key: &ItemKey) -> Option<Claim> {
        let d = key.digest();
        let i = self.rows.binary_search_by_key(&d, |r| r.0).ok()?;
        self.at(self.rows[i].1).filter(|c| &c.key == key)
    }

    /// Every claim, read back one at a time (sealed: in no particular order).
    pub fn values(&self) -> impl Iterator<Item = Claim> + '_ {
        self.rows.iter().filter_map(|r| self.at(r.1))
    }
}

impl FromIterator<Claim> for Claims {
    /// The claims, sealed; one that cannot be packed (a record of 4 GiB) is left out.
    fn from_iter<I: IntoIterator<Item = Claim>>(iter: I) -> Claims {
        let mut out = Claims::default();
        for c in iter {
            let _ = out.insert(&c);
        }
        out.seal();
        out
    }
}

/// One snapshot of a block: a VolumeSnapshot of one claim, or a VolumeGroupSnapshot of a volume
/// group's claims.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPlan {
    /// Position in the backup's snapshot plan.
    pub id: u32,
    /// The block whose hook window brackets it.
    pub block: u32,
    /// The claims' namespace.
    pub namespace: String,
    /// The VolumeSnapshot's name, or the VolumeGroupSnapshot's.
    pub name: String,
    /// The claims, sorted.
    pub claims: Vec<String>,
    /// The volume group (its label value) when one VolumeGroupSnapshot captures the claims.
    pub group: Option<String>,
    /// The CSI driver.
    pub driver: String,
    /// The VolumeSnapshotClass, or the VolumeGroupSnapshotClass of a group.
    pub class: String,
    /// Labels of the object created (a sorted vector: a B-tree map per snapshot was ~0.5 KiB).
    pub labels: StrMap,
    /// Why the snapshot cannot be taken (its claims then fail), if it cannot.
    pub blocked: Option<String>,
}

impl SnapshotPlan {
    /// The claims as item keys.
    pub fn claim_keys(&self) -> impl Iterator<Item = ItemKey> + '_ {
        self.claims.iter().map(|c| ItemKey::namespaced("", "persistentvolumeclaims", &self.namespace, c))
    }
}

/// Everything snapshot planning reads.
pub struct SnapshotPlanInput<'a> {
    /// The backup's name.
    pub backup: &'a str,
    /// The backup's options.
    pub options: &'a BackupOptions,
    /// The label whose value names a volume group.
    pub group_label: &'a str,
    /// The blocks' claims, in id order.
    pub blocks: &'a dyn BlockClaims,
    /// Claims: those in the backup, and every claim with a volume-group label (sealed).
    pub claims: &'a Claims,
    /// What each PersistentVolume is.
    pub volumes: &'a crate::state::Volumes,
    /// The cluster's VolumeSnapshotClasses.
    pub classes: &'a [Value],
    /// The cluster's VolumeGroupSnapshotClasses.
    pub group_classes: &'a [Value],
    /// Whether VolumeGroupSnapshots can be used, or why not.
    pub groups: Result<(), String>,
}

/// What snapshot planning reads of the blocks: each block's claims, in id order. A finished plan
/// ([`crate::grouping::PlanBlocks`]) makes them block by block from its catalog — the claims of
/// every block at once, as plans, were ~11 MB of planning's peak at a million objects.
pub trait BlockClaims {
    /// Calls `each` with the id of every block that has claims among its items and those claims'
    /// keys (any other keys among them are passed over), in id order.
    fn each_block(&self, each: &mut dyn FnMut(u32, &[ItemKey]));
}

impl BlockClaims for Vec<std::sync::Arc<BlockPlan>> {
    fn each_block(&self, each: &mut dyn FnMut(u32, &[ItemKey])) {
        for b in self {
            each(b.id, &b.items);
        }
    }
}

fn meta_map(obj: &Value, field: &str) -> BTreeMap<String, String> {
    obj.pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

fn obj_name(obj: &Value) -> &str {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

fn obj_driver(obj: &Value) -> &str {
    obj.get("driver").and_then(Value::as_str).unwrap_or_default()
}

/// Classes sorted by name, so "the first" is the same whatever order they were listed in.
fn by_name(classes: &[Value]) -> Vec<&Value> {
    let mut v: Vec<&Value> = classes.iter().collect();
    v.sort_by(|a, b| obj_name(a).cmp(obj_name(b)));
    v
}

/// The VolumeSnapshotClass for a claim of `driver`, as Velero 1.17 chooses it: the claim's
/// `velero.io/csi-volumesnapshot-class` annotation, the backup's
/// `velero.io/csi-volumesnapshot-class_<driver>` annotation (a named class of another driver, or
/// none of that name, falls through), the first class of the driver labelled
/// `velero.io/csi-volumesnapshot-class`, the first annotated as the default class (value `"true"`,
/// as Kubernetes means it), the only class of the driver.
pub fn choose_class(
    driver: &str,
    claim_annotations: &StrMap,
    backup_annotations: &BTreeMap<String, String>,
    classes: &[Value],
) -> Option<String> {
    let classes = by_name(classes);
    let named = |name: &str| {
        classes
            .iter()
            .find(|c| obj_name(c).eq_ignore_ascii_case(name) && obj_driver(c).eq_ignore_ascii_case(driver))
            .map(|c| obj_name(c).to_string())
    };
    if let Some(c) = claim_annotations.get(CLASS_KEY).and_then(|n| named(n)) {
        return Some(c);
    }
    let key = format!("{CLASS_KEY}_{}", driver.to_ascii_lowercase());
    if let Some(c) = backup_annotations.get(&key).and_then(|n| named(n)) {
        return Some(c);
    }
    let of_driver: Vec<&&Value> = classes.iter().filter(|c| obj_driver(c) == driver).collect();
    if let Some(c) = of_driver.iter().find(|c| meta_map(c, "labels").contains_key(CLASS_KEY)) {
        return Some(obj_name(c).to_string());
    }
    if let Some(c) = of_driver
        .iter()
        .find(|c| meta_map(c, "annotations").get(DEFAULT_CLASS_ANNOTATION).map(String::as_str) == Some("true"))
    {
        return Some(obj_name(c).to_string());
    }
    match of_driver.as_slice() {
        [only] => Some(obj_name(only).to_string()),
        _ => None,
    }
}

/// The VolumeGroupSnapshotClass for a volume group of `driver`, as Velero 1.17 chooses it — a
/// member claim's `velero.io/csi-volume-group-snapshot-class` annotation, the backup's
/// `velero.io/csi-volumegroupsnapshot-class_<driver>` annotation, the one class of the driver
/// labelled `velero.io/csi-volumegroupsnapshot-class: "true"` — and then, where Velero gives up,
/// the one class annotated as the default class and the only class of the driver. `Err` says why
/// there is none.
pub fn choose_group_class(
    driver: &str,
    claims: &[Claim],
    backup_annotations: &BTreeMap<String, String>,
    classes: &[Value],
) -> Result<String, String> {
    let classes = by_name(classes);
    let named = |name: &str| {
        classes.iter().find(|c| obj_name(c) == name && obj_driver(c) == driver).map(|c| obj_name(c).to_string())
    };
    if let Some(c) = claims.iter().find_map(|c| c.annotations.get(GROUP_CLASS_CLAIM_ANNOTATION)).and_then(|n| named(n))
    {
        return Ok(c);
    }
    let exact = backup_annotations.get(&format!("{GROUP_CLASS_BACKUP_PREFIX}{driver}"));
    let lower = backup_annotations.get(&format!("{GROUP_CLASS_BACKUP_PREFIX}{}", driver.to_ascii_lowercase()));
    if let Some(c) = exact.or(lower).and_then(|n| named(n)) {
        return Ok(c);
    }
    let of_driver: Vec<&&Value> = classes.iter().filter(|c| obj_driver(c) == driver).collect();
    let one = |pick: &dyn Fn(&Value) -> bool, what: &str| -> Option<Result<String, String>> {
        let found: Vec<&&&Value> = of_driver.iter().filter(|c| pick(c)).collect();
        match found.as_slice() {
            [] => None,
            [only] => Some(Ok(obj_name(only).to_string())),
            many => Some(Err(format!("{} VolumeGroupSnapshotClasses of driver {driver} are {what}", many.len()))),
        }
    };
    let labelled = |c: &Value| meta_map(c, "labels").get(GROUP_CLASS_LABEL).map(String::as_str) == Some("true");
    if let Some(r) = one(&labelled, &format!("labelled {GROUP_CLASS_LABEL}=true")) {
        return r;
    }
    let default =
        |c: &Value| meta_map(c, "annotations").get(GROUP_DEFAULT_CLASS_ANNOTATION).map(String::as_str) == Some("true");
    if let Some(r) = one(&default, "default classes") {
        return r;
    }
    match of_driver.as_slice() {
        [only] => Ok(obj_name(only).to_string()),
        [] => Err(format!("no VolumeGroupSnapshotClass for driver {driver}")),
        many => Err(format!("{} VolumeGroupSnapshotClasses for driver {driver} and none is marked", many.len())),
    }
}

fn hash10(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// A DNS-subdomain-safe form of `s`: lower case, other characters as `-`, no leading or trailing `-`.
fn dns_part(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    mapped.trim_matches(|c| c == '-' || c == '.').to_string()
}

fn named(prefix: &str, hash: &str) -> String {
    let room = OBJECT_NAME_BYTES_MAX - hash.len() - 1;
    let mut p = dns_part(prefix);
    if p.len() > room {
        p.truncate(room);
        p = p.trim_end_matches(['-', '.']).to_string();
    }
    format!("{p}-{hash}")
}

/// The VolumeSnapshot name of a claim in a backup: `<backup>-<claim>-<hash>`, the hash over the
/// backup's uid, namespace and claim; at most 253 bytes.
pub fn snapshot_name(backup: &str, uid: &str, namespace: &str, claim: &str) -> String {
    named(&format!("{backup}-{claim}"), &hash10(&[uid, namespace, "claim", claim]))
}

/// The VolumeGroupSnapshot name of a volume group in a backup: `<backup>-<group>-<hash>`.
pub fn group_snapshot_name(backup: &str, uid: &str, namespace: &str, group: &str) -> String {
    named(&format!("{backup}-{group}"), &hash10(&[uid, namespace, "group", group]))
}

/// Plans the snapshots of every block: see the module docs. Returns the plans, in block order,
/// and warnings (volume groups snapshotted claim by claim, and why).
pub fn plan_snapshots(input: &SnapshotPlanInput<'_>) -> (Vec<SnapshotPlan>, Vec<String>) {
    let mut plans = Vec::new();
    let warnings = plan_snapshots_into(input, &mut |p| plans.push(p));
    (plans, warnings)
}

/// [`plan_snapshots`], each plan given to `out` as it is made (in id order, from 0) instead of
/// gathered: the engine packs them as they come (a plan in memory is ~700 bytes). Returns the
/// warnings.
pub fn plan_snapshots_into(input: &SnapshotPlanInput<'_>, out: &mut dyn FnMut(SnapshotPlan)) -> Vec<String> {
    let mut next: u32 = 0;
    let mut warnings = Vec::new();
    let o = input.options;
    let base_labels = |extra: &StrMap| {
        let mut l = extra.to_map();
        l.insert(BACKUP_NAME_LABEL.to_string(), input.backup.to_string());
        l.insert(BACKUP_UID_LABEL.to_string(), o.uid.clone());
        l
    };
    let group_labels = |g: &str| {
        let mut l = base_labels(&StrMap::default());
        l.insert(input.group_label.to_string(), g.to_string());
        StrMap::from(l)
    };
    // Every claim of a volume group the cluster has, in the backup or not, by (namespace, value).
    let mut groups: BTreeMap<(String, String), Vec<Claim>> = BTreeMap::new();
    for c in input.claims.values() {
        if let Some(g) = c.labels.get(input.group_label).filter(|g| !g.is_empty()) {
            let group = (c.key.namespace().map(str::to_string).unwrap_or_default(), g.clone());
            groups.entry(group).or_default().push(c);
        }
    }
    // Each group's claims in key order (the claims come in their digests' order).
    for members in groups.values_mut() {
        members.sort_by(|a, b| a.key.cmp(&b.key));
    }
    let volume = |c: &Claim| c.volume.as_ref().map(|v| input.volumes.get(v).unwrap_or(PvVolume::Missing));
    input.blocks.each_block(&mut |block, items| {
        let claims: Vec<Claim> = items
            .iter()
            .filter(|k| k.is("", "persistentvolumeclaims"))
            .filter_map(|k| input.claims.get(k))
            .filter(|c| c.in_backup && c.volume.is_some())
            .collect();
        let mut done: BTreeSet<ItemKey> = BTreeSet::new();
        for c in &claims {
            if done.contains(&c.key) {
                continue;
            }
            let ns = c.key.namespace().map(str::to_string).unwrap_or_default();
            // A volume group: one VolumeGroupSnapshot when every claim the group's selector picks
            // is in this backup, bound, and on one CSI driver with a group class; otherwise the
            // claims are snapshotted one by one (still inside the same hook window).
            if let Some(g) = c.labels.get(input.group_label).filter(|g| !g.is_empty()) {
                let members = groups.get(&(ns.clone(), g.clone())).cloned().unwrap_or_default();
                let decided = group_plan(input, &members, &claims, &volume).and_then(|(driver, class)| {
                    if members.len() < 2 {
                        return Err("it has one claim".to_string());
                    }
                    Ok((driver, class))
                });
                match decided {
                    Ok((driver, class)) => {
                        let mut names: Vec<String> = members.iter().map(|m| m.key.name().to_string()).collect();
                        names.sort();
                        for m in &members {
                            done.insert(m.key.clone());
                        }
                        let labels = group_labels(g);
                        next += 1;
                        out(SnapshotPlan {
                            id: next - 1,
                            block,
                            namespace: ns.clone(),
                            name: group_snapshot_name(input.backup, &o.uid, &ns, g),
                            claims: names,
                            group: Some(g.clone()),
                            driver,
                            class,
                            labels,
                            blocked: None,
                        });
                        continue;
                    }
                    Err(why) if members.len() >= 2 => {
                        let w = format!(
                            "volume group {g} in namespace {ns}: {why}; its claims are snapshotted one by one inside the same hook window"
                        );
                        if !warnings.contains(&w) {
                            warnings.push(w);
                        }
                    }
                    Err(_) => {}
                }
            }
            done.insert(c.key.clone());
            let (driver, class, blocked) = match volume(c) {
                Some(PvVolume::Csi { driver, .. }) => {
                    match choose_class(&driver, &c.annotations, &o.annotations, input.classes) {
                        Some(class) => (driver, class, None),
                        None => {
                            let why = format!("no VolumeSnapshotClass for driver {driver}");
                            (driver, String::new(), Some(why))
                        }
                    }
                }
                Some(PvVolume::NotCsi) | None => continue,
                Some(PvVolume::Missing) => {
                    let pv = c.volume.clone().unwrap_or_default();
                    (String::new(), String::new(), Some(format!("its PersistentVolume {pv} does not exist")))
                }
                Some(PvVolume::Unreadable { error }) => {
                    let pv = c.volume.clone().unwrap_or_default();
                    (
                        String::new(),
                        String::new(),
                        Some(format!("its PersistentVolume {pv} could not be read: {error}")),
                    )
                }
            };
            next += 1;
            out(SnapshotPlan {
                id: next - 1,
                block,
                namespace: ns.clone(),
                name: snapshot_name(input.backup, &o.uid, &ns, c.key.name()),
                claims: vec![c.key.name().to_string()],
                group: None,
                driver,
                class,
                labels: base_labels(&c.labels).into(),
                blocked,
            });
        }
    });
    warnings
}

/// Whether a volume group can be captured by one VolumeGroupSnapshot: its driver and class.
fn group_plan(
    input: &SnapshotPlanInput<'_>,
    members: &[Claim],
    block_claims: &[Claim],
    volume: &dyn Fn(&Claim) -> Option<PvVolume>,
) -> Result<(String, String), String> {
    input.groups.clone()?;
    let mut drivers = BTreeSet::new();
    for m in members {
        if !m.in_backup || !block_claims.iter().any(|c| c.key == m.key) {
            return Err(format!("claim {} is not in the backup", m.key.name()));
        }
        match volume(m) {
            Some(PvVolume::Csi { driver, .. }) => {
                drivers.insert(driver);
            }
            None => return Err(format!("claim {} is not bound", m.key.name())),
            Some(_) => return Err(format!("claim {} is not on a CSI volume", m.key.name())),
        }
    }
    let driver = match drivers.len() {
        1 => drivers.into_iter().next().unwrap_or_default(),
        _ => return Err(format!("its claims are on {} CSI drivers", drivers.len())),
    };
    let class = choose_group_class(&driver, members, &input.options.annotations, input.group_classes)?;
    Ok((driver, class))
}

/// The VolumeSnapshot a backup creates for `plan` (a single claim).
pub fn volume_snapshot_body(plan: &SnapshotPlan) -> String {
    json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": plan.name, "namespace": plan.namespace, "labels": plan.labels},
        "spec": {
            "source": {"persistentVolumeClaimName": plan.claims.first().cloned().unwrap_or_default()},
            "volumeSnapshotClassName": plan.class,
        },
    })
    .to_string()
}

/// The VolumeGroupSnapshot a backup creates for `plan` (a volume group), served at `api`'s version.
pub fn group_snapshot_body(plan: &SnapshotPlan, group_label: &str, api: &ResourceType) -> String {
    json!({
        "apiVersion": api.api_version(),
        "kind": "VolumeGroupSnapshot",
        "metadata": {"name": plan.name, "namespace": plan.namespace, "labels": plan.labels},
        "spec": {
            "source": {"selector": {"matchLabels": {group_label: plan.group.clone().unwrap_or_default()}}},
            "volumeGroupSnapshotClassName": plan.class,
        },
    })
    .to_string()
}

/// One claim's captured snapshot: its names, handle and archived objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCut {
    /// The claim.
    pub claim: String,
    /// The VolumeSnapshot.
    pub snapshot: String,
    /// The VolumeSnapshotContent.
    pub content: String,
    /// `status.snapshotHandle` of the content.
    pub handle: String,
    /// The CSI driver.
    pub driver: String,
    /// Restore size in bytes, when reported.
    pub restore_size: Option<u64>,
    /// `status.creationTime` of the snapshot (RFC 3339), when reported.
    pub creation_time: Option<String>,
    /// The VolumeSnapshot as archived (canonical JSON).
    pub snapshot_json: String,
    /// The VolumeSnapshotContent as archived (canonical JSON).
    pub content_json: String,
}

impl MemberCut {
    /// The archive keys of the VolumeSnapshot and the VolumeSnapshotContent.
    pub fn keys(&self, namespace: &str) -> (ItemKey, ItemKey) {
        member_keys(namespace, &self.snapshot, &self.content)
    }
}

/// The archive keys of a cut member's VolumeSnapshot `snapshot` (in `namespace`) and its
/// VolumeSnapshotContent `content`.
pub fn member_keys(namespace: &str, snapshot: &str, content: &str) -> (ItemKey, ItemKey) {
    (
        ItemKey::namespaced(SNAPSHOT_GROUP, "volumesnapshots", namespace, snapshot),
        ItemKey::cluster(SNAPSHOT_GROUP, "volumesnapshotcontents", content),
    )
}

/// A Kubernetes quantity in binary SI, as the snapshot controller prints a size: `10Gi` for an
/// exact multiple of a power of 1024, the plain number otherwise.
pub fn binary_quantity(bytes: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes == 0 {
        return "0".into();
    }
    let mut n = bytes;
    let mut i = 0;
    while n.is_multiple_of(1024) && i < SUFFIXES.len() {
        n /= 1024;
        i += 1;
    }
    if i == 0 {
        bytes.to_string()
    } else {
        format!("{n}{}", SUFFIXES[i - 1])
    }
}

/// Parses a quantity (`10Gi`, `500M`, `1073741824`) to bytes.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let (num, suffix) = split_quantity(q);
    num.parse::<u64>().ok()?.checked_mul(quantity_unit(suffix)?)
}

/// A quantity's digits and its suffix, surrounding space trimmed.
pub fn split_quantity(q: &str) -> (&str, &str) {
    let q = q.trim();
    q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()))
}

/// The bytes one unit of a quantity's suffix stands for: Kubernetes' binary `Ki`…`Ei` (powers of
/// 1024) and decimal `k`, `M`, `G`, `T` (powers of 1000); no suffix is bytes.
pub fn quantity_unit(suffix: &str) -> Option<u64> {
    Some(match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Metadata fields that change while an object settles, or that a restore resets anyway.
const VOLATILE_METADATA: [&str; 10] = [
    "uid",
    "creationTimestamp",
    "resourceVersion",
    "managedFields",
    "generation",
    "finalizers",
    "ownerReferences",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

fn parse_object(what: &str, raw: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(format!("the {what} is not a JSON object")),
        Err(e) => Err(format!("the {what} is not valid JSON: {e}")),
    }
}

fn settle(obj: &mut Map<String, Value>, api_version: &str, kind: &str, status_keep: &[&str]) {
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        for f in VOLATILE_METADATA {
            meta.remove(f);
        }
    }
    if let Some(Value::Object(status)) = obj.get_mut("status") {
        status.retain(|k, _| status_keep.contains(&k.as_str()));
    }
}

fn set_meta(obj: &mut Map<String, Value>, field: &str, key: &str, value: &str) {
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    if let Value::Object(meta) = meta {
        let m = meta.entry(field).or_insert_with(|| json!({}));
        if !m.is_object() {
            *m = json!({});
        }
        if let Value::Object(m) = m {
            m.insert(key.to_string(), json!(value));
        }
    }
}

/// The archived forms of one captured member — the VolumeSnapshot `raw_snapshot` bound to the
/// content `raw_content` — with the fields and annotations Velero's restore reads; see the module
/// docs. Fails on objects that are not what a cut snapshot looks like.
pub fn archived_member(
    backup: &str,
    claim: &str,
    raw_snapshot: &str,
    raw_content: &str,
    group_handle: Option<&str>,
) -> Result<MemberCut, String> {
    let mut vs = parse_object("VolumeSnapshot", raw_snapshot)?;
    let mut vsc = parse_object("VolumeSnapshotContent", raw_content)?;
    let vs_v = Value::Object(vs.clone());
    let vsc_v = Value::Object(vsc.clone());
    let s = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
    let snapshot = s(&vs_v, "/metadata/name").ok_or("the VolumeSnapshot has no name")?;
    let content = s(&vsc_v, "/metadata/name").ok_or("the VolumeSnapshotContent has no name")?;
    if s(&vs_v, "/status/boundVolumeSnapshotContentName").as_deref() != Some(content.as_str()) {
        return Err(format!("VolumeSnapshot {snapshot} is not bound to VolumeSnapshotContent {content}"));
    }
    let handle = s(&vsc_v, "/status/snapshotHandle")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("VolumeSnapshotContent {content} has no snapshot handle"))?;
    let driver = s(&vsc_v, "/spec/driver").unwrap_or_default();
    let restore_size = vsc_v
        .pointer("/status/restoreSize")
        .and_then(Value::as_u64)
        .or_else(|| s(&vs_v, "/status/restoreSize").and_then(|q| parse_quantity(&q)));
    let creation_time = s(&vs_v, "/status/creationTime");
    let policy = s(&vsc_v, "/spec/deletionPolicy").unwrap_or_else(|| "Delete".into());
    settle(
        &mut vs,
        "snapshot.storage.k8s.io/v1",
        "VolumeSnapshot",
        &["boundVolumeSnapshotContentName", "restoreSize", "volumeGroupSnapshotName"],
    );
    set_meta(&mut vs, "labels", BACKUP_NAME_LABEL, backup);
    set_meta(&mut vs, "annotations", DELETION_POLICY_ANNOTATION, &policy);
    set_meta(&mut vs, "annotations", HANDLE_ANNOTATION, &handle);
    set_meta(&mut vs, "annotations", DRIVER_ANNOTATION, &driver);
    set_meta(&mut vs, "annotations", MUST_INCLUDE_ANNOTATION, "true");
    if let Some(size) = restore_size {
        set_meta(&mut vs, "annotations", RESTORE_SIZE_ANNOTATION, &binary_quantity(size));
    }
    if let Some(g) = group_handle {
        set_meta(&mut vs, "annotations", GROUP_HANDLE_ANNOTATION, g);
    }
    settle(
        &mut vsc,
        "snapshot.storage.k8s.io/v1",
        "VolumeSnapshotContent",
        &["snapshotHandle", "restoreSize", "volumeGroupSnapshotHandle"],
    );
    if let Some(Value::Object(r)) = vsc.get_mut("spec").and_then(|s| s.get_mut("volumeSnapshotRef")) {
        r.remove("resourceVersion");
    }
    set_meta(&mut vsc, "labels", BACKUP_NAME_LABEL, backup);
    Ok(MemberCut {
        claim: claim.to_string(),
        snapshot,
        content,
        handle,
        driver,
        restore_size,
        creation_time,
        snapshot_json: Value::Object(vs).to_string(),
        content_json: Value::Object(vsc).to_string(),
    })
}

/// The claim as archived when its snapshot is cut: labelled and annotated with the snapshot's
/// name (what Velero's restore reads) and the backup's name.
pub fn annotated_claim(claim_json: &str, backup: &str, snapshot: &str) -> Option<String> {
    let mut obj = match serde_json::from_str::<Value>(claim_json).ok()? {
        Value::Object(m) => m,
        _ => return None,
    };
    set_meta(&mut obj, "labels", VOLUME_SNAPSHOT_NAME, snapshot);
    set_meta(&mut obj, "labels", BACKUP_NAME_LABEL, backup);
    set_meta(&mut obj, "annotations", VOLUME_SNAPSHOT_NAME, snapshot);
    set_meta(&mut obj, "annotations", MUST_INCLUDE_ANNOTATION, "true");
    Some(Value::Object(obj).to_string())
}

/// A snapshot to create (or get) and wait for until cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOrder {
    /// The plan.
    pub plan: SnapshotPlan,
    /// The object to create: a VolumeSnapshot, or a VolumeGroupSnapshot for a group.
    pub body: String,
}

/// One claim's objects once cut, as the cluster served them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMember {
    /// The claim.
    pub claim: String,
    /// Its VolumeSnapshot.
    pub snapshot_json: String,
    /// The bound VolumeSnapshotContent.
    pub content_json: String,
}

/// A cut snapshot as the cluster served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutRaw {
    /// One per claim.
    pub members: Vec<RawMember>,
    /// The VolumeGroupSnapshotContent's handle, for a group.
    pub group_handle: Option<String>,
}

/// Cut snapshots to wait for until ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyWait {
    /// The snapshot plan's id.
    pub id: u32,
    /// The namespace of its VolumeSnapshots.
    pub namespace: String,
    /// Its VolumeSnapshots (one per claim).
    pub snapshots: Vec<String>,
    /// Wall-clock milliseconds after which "not ready" is final.
    pub deadline_ms: u64,
}

/// A snapshot whose cluster objects go at the end of the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseOrder {
    /// The plan.
    pub plan: SnapshotPlan,
    /// The (VolumeSnapshot, VolumeSnapshotContent) names of the cut members, when it was cut.
    pub members: Vec<(String, String)>,
    /// Retain the storage snapshot (the backup holds it); else delete it with the objects.
    pub keep: bool,
}

/// What the cluster said about the claims' volumes and the snapshot classes.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeInventory {
    /// Each PersistentVolume asked for: its JSON, `None` when missing, or why it could not be read.
    pub volumes: Vec<(String, Result<Option<String>, crate::ports::ClusterError>)>,
    /// The VolumeSnapshotClasses.
    pub classes: Result<Vec<String>, crate::ports::ClusterError>,
    /// The VolumeGroupSnapshotClasses (empty when group snapshots are not served).
    pub group_classes: Result<Vec<String>, crate::ports::ClusterError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, driver: &str, labels: Value, annotations: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}, "driver": driver, "deletionPolicy": "Delete"})
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn class_choice_follows_velero_order() {
        let d = "ebs.csi.aws.com";
        let classes = vec![
            class("b-default", d, json!({}), json!({DEFAULT_CLASS_ANNOTATION: "true"})),
            class("c-labelled", d, json!({CLASS_KEY: "x"}), json!({})),
            class("a-plain", d, json!({}), json!({})),
            class("other", "pd.csi", json!({}), json!({})),
        ];
        let none = BTreeMap::new();
        // The claim annotation wins, case-insensitively, if the class is of the driver.
        assert_eq!(
            choose_class(d, &StrMap::from(ann(&[(CLASS_KEY, "A-PLAIN")])), &none, &classes).as_deref(),
            Some("a-plain")
        );
        // A named class of another driver, or an unknown name, falls through.
        let backup = ann(&[(&format!("{CLASS_KEY}_{d}"), "b-default")]);
        assert_eq!(
            choose_class(d, &StrMap::from(ann(&[(CLASS_KEY, "other")])), &backup, &classes).as_deref(),
            Some("b-default")
        );
        assert_eq!(
            choose_class(d, &StrMap::from(ann(&[(CLASS_KEY, "nope")])), &none, &classes).as_deref(),
            Some("c-labelled")
        );
        // The backup annotation's key lower-cases the driver.
        let upper = ann(&[(&format!("{CLASS_KEY}_ebs.csi.aws.com"), "a-plain")]);
        assert_eq!(
            choose_class(
                "EBS.csi.aws.com",
                &StrMap::default(),
                &upper,
                &[class("a-plain", "EBS.csi.aws.com", json!({}), json!({}))]
            )
            .as_deref(),
            Some("a-plain")
        );
        // Then the labelled class, then the default, then the only one.
        assert_eq!(choose_class(d, &StrMap::default(), &none, &classes[..2]).as_deref(), Some("c-labelled"));
        assert_eq!(
            choose_class(d, &StrMap::default(), &none, &[classes[0].clone(), classes[2].clone()]).as_deref(),
            Some("b-default")
        );
        let not_default = class("z", d, json!({}), json!({DEFAULT_CLASS_ANNOTATION: "false"}));
        assert_eq!(choose_class(d, &StrMap::default(), &none, &[not_default.clone(), classes[2].clone()]), None);
        assert_eq!(choose_class(d, &StrMap::default(), &none, &[not_default]).as_deref(), Some("z"));
        assert_eq!(choose_class("pd.csi", &StrMap::default(), &none, &classes).as_deref(), Some("other"));
        assert_eq!(choose_class("none.csi", &StrMap::default(), &none, &classes), None);
    }

    fn claim(ns: &str, name: &str, pv: Option<&str>, labels: &[(&str, &str)]) -> Claim {
        Claim {
            key: ItemKey::namespaced("", "persistentvolumeclaims", ns, name),
            volume: pv.map(str::to_string),
            in_backup: true,
            labels: ann(labels).into(),
            annotations: StrMap::default(),
        }
    }

    #[test]
    fn group_class_needs_one_marked_class() {
        let d = "hostpath.csi.k8s.io";
        let c = claim("a", "x", Some("pv"), &[]);
        let none = BTreeMap::new();
        let labelled = class("g1", d, json!({GROUP_CLASS_LABEL: "true"}), json!({}));
        let plain = class("g2", d, json!({}), json!({}));
        assert_eq!(
            choose_group_class(d, std::slice::from_ref(&c), &none, &[labelled.clone(), plain.clone()]),
            Ok("g1".into())
        );
        assert_eq!(
            choose_group_class(d, std::slice::from_ref(&c), &none, std::slice::from_ref(&plain)),
            Ok("g2".into())
        );
        let e = choose_group_class(
            d,
            std::slice::from_ref(&c),
            &none,
            &[plain.clone(), class("g3", d, json!({}), json!({}))],
        )
        .unwrap_err();
        assert!(e.contains("none is marked"), "{e}");
        let e = choose_group_class(
            d,
            std::slice::from_ref(&c),
            &none,
            &[labelled.clone(), class("g4", d, json!({GROUP_CLASS_LABEL: "true"}), json!({}))],
        )
        .unwrap_err();
        assert!(e.contains("2 VolumeGroupSnapshotClasses"), "{e}");
        let b = ann(&[(&format!("{GROUP_CLASS_BACKUP_PREFIX}{d}"), "g2")]);
        assert_eq!(choose_group_class(d, std::slice::from_ref(&c), &b, &[labelled, plain]), Ok("g2".into()));
        assert!(choose_group_class(d, std::slice::from_ref(&c), &none, &[])
            .unwrap_err()
            .contains("no VolumeGroupSnapshotClass"));
    }

    #[test]
    fn names_are_deterministic_bounded_and_distinct() {
        let a = snapshot_name("nightly", "uid-1", "shop", "data-db-0");
        assert_eq!(a, snapshot_name("nightly", "uid-1", "shop", "data-db-0"));
        assert!(a.starts_with("nightly-data-db-0-") && a.len() == "nightly-data-db-0-".len() + 10, "{a}");
        // `a-b` + `c` and `a` + `b-c` read alike but hash apart.
        assert_ne!(snapshot_name("a-b", "u", "n", "c"), snapshot_name("a", "u", "n", "b-c"));
        assert_ne!(snapshot_name("b", "u1", "n", "c"), snapshot_name("b", "u2", "n", "c"));
        let long = snapshot_name(&"x".repeat(63), "u", "n", &"y".repeat(253));
        assert!(long.len() <= OBJECT_NAME_BYTES_MAX, "{}", long.len());
        let g = group_snapshot_name("nightly", "u", "shop", "DB_Group");
        assert!(g.starts_with("nightly-db-group-"), "{g}");
    }

    #[test]
    fn quantities_print_like_the_snapshot_controller() {
        assert_eq!(binary_quantity(10 << 30), "10Gi");
        assert_eq!(binary_quantity(1536), "1536");
        assert_eq!(binary_quantity(3 << 10), "3Ki");
        assert_eq!(binary_quantity(1000), "1000");
        assert_eq!(binary_quantity(0), "0");
        assert_eq!(parse_quantity("10Gi"), Some(10 << 30));
        assert_eq!(parse_quantity("5G"), Some(5_000_000_000));
        assert_eq!(parse_quantity("12x"), None);
    }

    fn blocks(items: &[(&str, &str)]) -> Vec<std::sync::Arc<BlockPlan>> {
        vec![std::sync::Arc::new(BlockPlan {
            id: 0,
            items: items.iter().map(|(ns, n)| ItemKey::namespaced("", "persistentvolumeclaims", ns, n)).collect(),
            hooks: Box::default(),
            bodies: Box::default(),
        })]
    }

    #[test]
    fn planning_groups_volume_groups_and_blocks_what_cannot_be_cut() {
        let d = "hostpath.csi.k8s.io";
        let g = crate::spec::DEFAULT_VOLUME_GROUP_LABEL;
        let list = vec![
            claim("a", "db-data", Some("pv1"), &[(g, "db")]),
            claim("a", "db-log", Some("pv2"), &[(g, "db")]),
            claim("a", "cache", Some("pv3"), &[]),
            claim("a", "lost", Some("pv-gone"), &[]),
            claim("a", "nfs", Some("pv-nfs"), &[]),
        ];
        // Packed, each claim reads back as it went in; a key added again replaces the first.
        let replaced = Claim { in_backup: false, ..list[2].clone() };
        let claims: Claims = [replaced].into_iter().chain(list.iter().cloned()).collect();
        assert_eq!(claims.len(), list.len());
        for c in &list {
            assert_eq!(claims.get(&c.key).as_ref(), Some(c));
        }
        assert!(claims.get(&ItemKey::namespaced("", "persistentvolumeclaims", "a", "other")).is_none());
        let csi = |h: &str| PvVolume::Csi { driver: d.into(), handle: h.into() };
        let volumes: crate::state::Volumes = [
            ("pv1".to_string(), csi("h1")),
            ("pv2".to_string(), csi("h2")),
            ("pv3".to_string(), csi("h3")),
            ("pv-nfs".to_string(), PvVolume::NotCsi),
        ]
        .into_iter()
        .collect();
        let b = blocks(&[("a", "cache"), ("a", "db-data"), ("a", "db-log"), ("a", "lost"), ("a", "nfs")]);
        let options = BackupOptions { uid: "u".into(), ..BackupOptions::default() };
        let classes = vec![class("snap", d, json!({}), json!({}))];
        let group_classes = vec![class("gsnap", d, json!({}), json!({}))];
        let input = SnapshotPlanInput {
            backup: "bk",
            options: &options,
            group_label: g,
            blocks: &b,
            claims: &claims,
            volumes: &volumes,
            classes: &classes,
            group_classes: &group_classes,
            groups: Ok(()),
        };
        let (plans, warnings) = plan_snapshots(&input);
        assert!(warnings.is_empty(), "{warnings:?}");
        let summary: Vec<(Vec<String>, Option<String>, String, bool)> =
            plans.iter().map(|p| (p.claims.clone(), p.group.clone(), p.class.clone(), p.blocked.is_some())).collect();
        assert_eq!(
            summary,
            vec![
                (vec!["cache".to_string()], None, "snap".to_string(), false),
                (vec!["db-data".to_string(), "db-log".to_string()], Some("db".to_string()), "gsnap".to_string(), false),
                (vec!["lost".to_string()], None, String::new(), true),
            ]
        );
        assert_eq!(plans[1].labels.get(g).map(String::as_str), Some("db"));
        assert_eq!(plans[0].labels.get(BACKUP_UID_LABEL).map(String::as_str), Some("u"));
        // Without group snapshots the group's claims are snapshotted one by one, with a warning.
        let input = SnapshotPlanInput { groups: Err("no group API".into()), ..input };
        let (plans, warnings) = plan_snapshots(&input);
        assert_eq!(plans.iter().filter(|p| p.group.is_none() && p.blocked.is_none()).count(), 3);
        assert!(warnings[0].contains("no group API") && warnings[0].contains("one by one"), "{warnings:?}");
        // A group member outside the backup breaks the group too.
        let extra = Claim { in_backup: false, ..claim("a", "db-extra", None, &[(g, "db")]) };
        let claims2: Claims = list.iter().cloned().chain([extra]).collect();
        let input = SnapshotPlanInput { claims: &claims2, groups: Ok(()), ..input };
        let (_, warnings) = plan_snapshots(&input);
        assert!(warnings[0].contains("db-extra is not in the backup"), "{warnings:?}");
    }

    #[test]
    fn archived_members_drop_what_changes_and_carry_what_restore_reads() {
        let vs = json!({"metadata": {"name": "s1", "namespace": "a", "uid": "u1", "resourceVersion": "7",
                "finalizers": ["x"], "labels": {"app": "db"}},
            "spec": {"source": {"persistentVolumeClaimName": "data"}, "volumeSnapshotClassName": "snap"},
            "status": {"boundVolumeSnapshotContentName": "snapcontent-u1", "readyToUse": false,
                "creationTime": "2026-01-01T00:00:00Z", "restoreSize": "10Gi"}});
        let vsc = json!({"metadata": {"name": "snapcontent-u1", "resourceVersion": "9"},
            "spec": {"driver": "d", "deletionPolicy": "Delete", "volumeSnapshotRef": {"name": "s1", "namespace": "a", "resourceVersion": "3"}},
            "status": {"snapshotHandle": "h-1", "readyToUse": true, "restoreSize": 10737418240u64, "creationTime": 1}});
        let m = archived_member("bk", "data", &vs.to_string(), &vsc.to_string(), None).unwrap();
        assert_eq!((m.handle.as_str(), m.content.as_str(), m.restore_size), ("h-1", "snapcontent-u1", Some(10 << 30)));
        let a: Value = serde_json::from_str(&m.snapshot_json).unwrap();
        assert_eq!(a["metadata"]["annotations"][HANDLE_ANNOTATION], "h-1");
        assert_eq!(a["metadata"]["annotations"][RESTORE_SIZE_ANNOTATION], "10Gi");
        assert_eq!(a["metadata"]["labels"][BACKUP_NAME_LABEL], "bk");
        assert!(a["metadata"].get("resourceVersion").is_none() && a["metadata"].get("finalizers").is_none());
        assert!(a["metadata"].get("uid").is_none() && a["status"].get("creationTime").is_none());
        assert!(a["status"].get("readyToUse").is_none());
        assert_eq!(m.creation_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(a["status"]["boundVolumeSnapshotContentName"], "snapcontent-u1");
        let c: Value = serde_json::from_str(&m.content_json).unwrap();
        assert_eq!(c["status"]["snapshotHandle"], "h-1");
        assert!(
            c["status"].get("readyToUse").is_none() && c["spec"]["volumeSnapshotRef"].get("resourceVersion").is_none()
        );
        // Readiness and resource versions do not change the archived bytes.
        let mut vs2 = vs.clone();
        vs2["status"]["readyToUse"] = json!(true);
        vs2["metadata"]["resourceVersion"] = json!("99");
        let m2 = archived_member("bk", "data", &vs2.to_string(), &vsc.to_string(), None).unwrap();
        assert_eq!(m2, m);
        // Not bound, or no handle: not a cut snapshot.
        let mut unbound = vs.clone();
        unbound["status"] = json!({});
        assert!(archived_member("bk", "data", &unbound.to_string(), &vsc.to_string(), None)
            .unwrap_err()
            .contains("not bound"));
        let mut nohandle = vsc.clone();
        nohandle["status"] = json!({});
        assert!(archived_member("bk", "data", &vs.to_string(), &nohandle.to_string(), None)
            .unwrap_err()
            .contains("no snapshot handle"));
        assert!(archived_member("bk", "data", "[", &vsc.to_string(), None).unwrap_err().contains("not valid JSON"));
        let pvc = annotated_claim(r#"{"metadata":{"name":"data","namespace":"a"}}"#, "bk", "s1").unwrap();
        let p: Value = serde_json::from_str(&pvc).unwrap();
        assert_eq!(p["metadata"]["annotations"][VOLUME_SNAPSHOT_NAME], "s1");
        assert_eq!(p["metadata"]["labels"][VOLUME_SNAPSHOT_NAME], "s1");
    }
}
