//! The `backups.blockwise.dev` custom resource: Velero's Backup spec field names and meanings,
//! our status, and the conversion of a spec to what a [`Session`](crate::session::Session) runs.
//!
//! The CRD is generated from these types (kube's derive and schemars), so the schema served by the
//! cluster and the fields the controller reads cannot drift apart. A spec the controller cannot
//! run is rejected by [`BackupResource::to_request`] with every reason, and the Backup ends in
//! `FailedValidation` without anything being written.

use std::collections::BTreeMap;

use blockwise_engine::hooks::parse_go_duration_ms;
use blockwise_engine::snapshot::{BackupOptions, CSI_SNAPSHOT_TIMEOUT_MS_DEFAULT, ITEM_OPERATION_TIMEOUT_MS_DEFAULT};
use blockwise_engine::spec::{
    parse_ordered_resources, validate_backup_name, BackupSpec as EngineSpec, DEFAULT_VOLUME_GROUP_LABEL,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::s3::S3Location;
use crate::session::StorageSpec;

/// The API group of blockwise's resources.
pub const GROUP: &str = "blockwise.dev";
/// The finalizer the controller puts on every Backup: its store files and log go with it.
pub const FINALIZER: &str = "blockwise.dev/backup-files";
/// Workers of a Backup that does not say.
pub const WORKERS_DEFAULT: u32 = 8;

/// What a Backup backs up, with Velero's Backup field names; see the module docs.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "blockwise.dev",
    version = "v1alpha1",
    kind = "Backup",
    plural = "backups",
    shortname = "bwb",
    category = "blockwise",
    namespaced,
    status = "BackupStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Items","type":"integer","jsonPath":".status.progress.itemsBackedUp"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.progress.totalItems"}"#,
    printcolumn = r#"{"name":"Errors","type":"integer","jsonPath":".status.errors"}"#,
    printcolumn = r#"{"name":"Resumed","type":"integer","jsonPath":".status.resumedCount","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Namespaces to include (`*` globs); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub included_namespaces: Vec<String>,
    /// Namespaces to exclude.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_namespaces: Vec<String>,
    /// Resources to include (plural, plural.group or kind); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub included_resources: Vec<String>,
    /// Resources to exclude.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_resources: Vec<String>,
    /// Include cluster-scoped resources; unset: only when every namespace is included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_cluster_resources: Option<bool>,
    /// Only objects with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
    /// Velero's orderedResources: resource → "ns/name,ns/name" in write order.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ordered_resources: BTreeMap<String, String>,
    /// Velero's `spec.hooks` (`{"resources": [...]}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub hooks: Option<Value>,
    /// How long the backup is kept (a Go duration, e.g. 720h); recorded as `status.expiration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// A store the controller was started with (`--storage-location NAME=URL`); unset and no
    /// `storage`: the controller's default store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_location: Option<String>,
    /// An inline store, instead of a named location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<InlineStorage>,
    /// How long to wait for a CSI snapshot to be cut (Go duration; default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi_snapshot_timeout: Option<String>,
    /// How long a cut snapshot may take to become ready to use (Go duration; default 4h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_operation_timeout: Option<String>,
    /// The PVC label whose value forms a volume group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_label_key: Option<String>,
    /// Take CSI snapshots of the backup's volumes (unset: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_volumes: Option<bool>,
    /// ItemBlocks backed up in parallel (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
}

/// Whether a counter is zero (left out of a status when it is).
pub(super) fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn free_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// A Kubernetes label selector (`metav1.LabelSelector`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Exact label values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One set-based requirement of a label selector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: String,
    /// The values of In and NotIn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A store given in the Backup itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineStorage {
    /// An absolute directory in the controller's pod, or `s3://BUCKET/PREFIX`.
    pub url: String,
    /// S3 endpoint URL, for S3-compatible stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// Allow a plain-HTTP S3 endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub s3_allow_http: bool,
}

/// Velero's backup phases, plus `Queued` (waiting for an overlapping backup, Velero 1.18).
pub mod phase {
    /// Seen, not yet started.
    pub const NEW: &str = "New";
    /// Waiting for a running backup whose namespaces overlap.
    pub const QUEUED: &str = "Queued";
    /// Running (or interrupted and being resumed).
    pub const IN_PROGRESS: &str = "InProgress";
    /// Every block done; waiting for snapshots to be ready.
    pub const WAITING_FOR_SNAPSHOTS: &str = "WaitingForSnapshots";
    /// Building and storing the archive.
    pub const FINALIZING: &str = "Finalizing";
    /// Done without errors.
    pub const COMPLETED: &str = "Completed";
    /// Done with errors.
    pub const PARTIALLY_FAILED: &str = "PartiallyFailed";
    /// Could not finish.
    pub const FAILED: &str = "Failed";
    /// The spec cannot be run; nothing was.
    pub const FAILED_VALIDATION: &str = "FailedValidation";
    /// Its files are being deleted.
    pub const DELETING: &str = "Deleting";

    /// Whether nothing more happens to a backup in this phase (until it is deleted).
    pub fn is_terminal(p: &str) -> bool {
        blockwise_engine::service::is_terminal_phase(p)
    }
}

/// What the controller reports of a Backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// Velero's phase names (see [`phase`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Items and blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Hooks run and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_status: Option<HookStatus>,
    /// Warnings recorded.
    #[serde(default)]
    pub warnings: u32,
    /// Errors recorded.
    #[serde(default)]
    pub errors: u32,
    /// Why the backup failed (or failed validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The validation errors of a FailedValidation backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_errors: Vec<String>,
    /// When the backup started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<String>,
    /// When it reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timestamp: Option<String>,
    /// When it expires (start + ttl).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    /// The archive, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatus>,
    /// How many times a restarted controller resumed this backup from its log.
    #[serde(default)]
    pub resumed_count: u32,
    /// Place in the queue while Queued (1: next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Why the run stopped before its end (the store or the log failed after their retries): the
    /// phase stays InProgress and the controller resumes the run from its log at `nextRetry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// When a stopped run is resumed next (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<String>,
    /// Runs resumed after a stop by this controller (backoff doubles with each, from 2 s to 5 min).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_count: u32,
}

/// Progress of a running backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Items planned.
    pub total_items: u64,
    /// Items written by finished blocks.
    pub items_backed_up: u64,
    /// ItemBlocks planned.
    pub total_blocks: u64,
    /// ItemBlocks finished.
    pub blocks_done: u64,
}

/// Hooks of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookStatus {
    /// Hooks started.
    pub hooks_attempted: u32,
    /// Hooks that did not succeed.
    pub hooks_failed: u32,
}

/// The stored archive.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveStatus {
    /// sha256 of the `.tar.gz`, hex.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// What a valid Backup runs: the engine's spec and options, workers, the store and the ttl.
#[derive(Debug, Clone)]
pub struct Request {
    /// The engine's spec (named after the Backup).
    pub spec: EngineSpec,
    /// Snapshot options (uid: the Backup's uid).
    pub options: BackupOptions,
    /// Blocks in parallel.
    pub workers: usize,
    /// The store.
    pub storage: StorageSpec,
    /// `spec.ttl`, in milliseconds.
    pub ttl_ms: Option<u64>,
}

/// Named stores the controller knows (`--storage-location NAME=URL`), and the default.
#[derive(Debug, Clone, Default)]
pub struct Locations {
    /// By name.
    pub named: BTreeMap<String, StorageSpec>,
    /// For a Backup that names none.
    pub default: Option<StorageSpec>,
}

impl Locations {
    /// The locations a CR in `scope` writes to: an administrator's as they are; a tenant's each
    /// under `tenants/<namespace>/` of the location (a directory below it, or a key prefix), so
    /// no two namespaces share a store prefix and no tenant reaches another's backups. The default
    /// local store (`<data-dir>/namespaces/<ns>/store`) is per namespace already.
    pub fn scoped(&self, scope: &Scope) -> Locations {
        let Scope::Tenant(ns) = scope else { return self.clone() };
        if blockwise_engine::mutation::active(blockwise_engine::Mutation::TenantPrefixDropped) {
            return self.clone();
        }
        let under = |l: &StorageSpec| match l {
            StorageSpec::Local { root: Some(r) } => StorageSpec::Local { root: Some(r.join("tenants").join(ns)) },
            StorageSpec::Local { root: None } => StorageSpec::Local { root: None },
            StorageSpec::S3(loc) => {
                let mut loc = loc.clone();
                loc.prefix = if loc.prefix.is_empty() {
                    format!("tenants/{ns}")
                } else {
                    format!("{}/tenants/{ns}", loc.prefix)
                };
                StorageSpec::S3(loc)
            }
        };
        Locations {
            named: self.named.iter().map(|(n, l)| (n.clone(), under(l))).collect(),
            default: self.default.as_ref().map(under),
        }
    }
}

impl Locations {
    /// The location whose inside (below its root: its `backups/<name>/` and its tenants'
    /// `tenants/<ns>/`) `l` lies in, if any: a store there would share a prefix with that
    /// location's backups, and the retention or TTL of one would delete the other's archive. The
    /// same root as a location is not inside it (it is that store, with its layout).
    pub fn inside_of(&self, l: &StorageSpec) -> Option<String> {
        self.named.values().chain(self.default.iter()).find_map(|base| match (base, l) {
            (StorageSpec::Local { root: Some(b) }, StorageSpec::Local { root: Some(r) }) => {
                // Component-wise, after `..` and `.` are resolved lexically.
                let (b, r) = (lexical(b), lexical(r));
                (r != b && r.starts_with(&b)).then(|| b.display().to_string())
            }
            (StorageSpec::S3(b), StorageSpec::S3(x)) if b.bucket == x.bucket && b.endpoint == x.endpoint => {
                let inside = if b.prefix.is_empty() {
                    !x.prefix.is_empty()
                } else {
                    x.prefix.starts_with(&format!("{}/", b.prefix))
                };
                inside.then(|| format!("s3://{}/{}", b.bucket, b.prefix))
            }
            _ => None,
        })
    }
}

/// `p` with `.` dropped and `..` taking the component before it (no file system access).
fn lexical(p: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Whom a CR speaks for (issue 21; `docs/service.md`, "Tenancy").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A CR in the controller's own namespace: the administrator's — any namespaces, cluster
    /// resources, inline storage.
    Admin,
    /// A CR in tenant namespace X: it covers X only (included namespaces ⊆ {X}, no cluster-scoped
    /// resources, restores only into X), names only the controller's storage locations, and
    /// writes under `tenants/X/` of them.
    Tenant(String),
}

/// The tenant namespaces a controller acts in beside its own (`--tenant-namespaces`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Tenants {
    /// None: only CRs in the controller's own namespace are acted on (the default, as Velero's).
    #[default]
    None,
    /// These namespaces.
    Some(std::collections::BTreeSet<String>),
    /// Every namespace (`*`).
    All,
}

/// Which CRs the controller acts on, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenancy {
    /// The controller's own namespace.
    pub home: String,
    /// Tenant namespaces.
    pub tenants: Tenants,
}

impl Tenancy {
    /// Only the controller's own namespace.
    pub fn home_only(home: &str) -> Tenancy {
        Tenancy { home: home.to_string(), tenants: Tenants::None }
    }

    /// Parses `--tenant-namespaces`: `*`, or namespace names separated by commas.
    pub fn parse_tenants(text: &str) -> Result<Tenants, String> {
        if text.trim() == "*" {
            return Ok(Tenants::All);
        }
        let mut set = std::collections::BTreeSet::new();
        for n in text.split(',').map(str::trim) {
            // A namespace name is a DNS-1123 label, as a backup name is.
            if validate_backup_name(n).is_err() {
                return Err(format!("{n:?} is not a namespace name (lowercase letters, digits and '-'), nor '*'"));
            }
            set.insert(n.to_string());
        }
        Ok(Tenants::Some(set))
    }

    /// The scope of a CR in `namespace`, or `None` when the controller does not act on it.
    pub fn scope(&self, namespace: &str) -> Option<Scope> {
        if namespace == self.home {
            return Some(Scope::Admin);
        }
        let tenant = match &self.tenants {
            Tenants::None => false,
            Tenants::Some(set) => set.contains(namespace),
            Tenants::All => true,
        };
        tenant.then(|| Scope::Tenant(namespace.to_string()))
    }

    /// Whether the controller watches every namespace (else only its own).
    pub fn watches_all(&self) -> bool {
        self.tenants != Tenants::None
    }
}

fn duration(field: &str, v: &Option<String>, default: u64, errors: &mut Vec<String>) -> u64 {
    match v.as_deref() {
        None => default,
        Some(s) => match parse_go_duration_ms(s) {
            Some(ms) if ms > 0 => ms,
            _ => {
                errors.push(format!("spec.{field} {s:?} is not a positive duration (e.g. 10m, 90s, 1h30m)"));
                default
            }
        },
    }
}

/// A label selector as the engine's string (`k=v,k in (a,b),!k`).
pub fn selector_string(s: &LabelSelector) -> Result<String, String> {
    let mut parts: Vec<String> = s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for e in &s.match_expressions {
        let values = e.values.join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => return Err(format!("operator {other:?} is not In, NotIn, Exists or DoesNotExist")),
        });
    }
    Ok(parts.join(","))
}

fn inline_storage(s: &InlineStorage) -> Result<StorageSpec, String> {
    if s.url.starts_with("s3://") {
        let mut loc = S3Location::parse(&s.url).map_err(|e| e.to_string())?;
        if let Some(e) = &s.s3_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!("s3Endpoint {e:?}: expected an http:// or https:// URL"));
            }
            if e.starts_with("http://") && !s.s3_allow_http {
                return Err(format!("s3Endpoint {e} is plain HTTP: set s3AllowHttp to send data unencrypted"));
            }
        }
        loc.endpoint = s.s3_endpoint.clone();
        loc.region = s.s3_region.clone();
        loc.allow_http = s.s3_allow_http;
        Ok(StorageSpec::S3(loc))
    } else if s.url.starts_with('/') && !s.url.contains("://") {
        Ok(StorageSpec::Local { root: Some(s.url.clone().into()) })
    } else {
        Err(format!("url {:?}: expected an absolute directory or s3://BUCKET/PREFIX", s.url))
    }
}

impl Backup {
    /// The run this Backup asks for, or every reason it cannot run (FailedValidation).
    /// `scope` is whom it speaks for: a tenant's Backup covers its namespace only (an empty
    /// `includedNamespaces` means it), never cluster-scoped resources, and names only the
    /// controller's locations, under its tenant prefix.
    pub fn to_request(&self, locations: &Locations, scope: &Scope) -> Result<Request, Vec<String>> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let uid = self.metadata.uid.clone().unwrap_or_default();
        let s = &self.spec;
        let mut errors = Vec::new();
        if let Err(e) = validate_backup_name(&name) {
            errors.push(e.to_string());
        }
        for (field, list) in
            [("spec.includedNamespaces", &s.included_namespaces), ("spec.excludedNamespaces", &s.excluded_namespaces)]
        {
            for n in list {
                if let Err(why) = blockwise_engine::spec::validate_namespace_pattern(n) {
                    errors.push(format!("{field}: {n:?}: {why}"));
                }
            }
        }
        let mut spec = EngineSpec::new(&name);
        spec.included_namespaces = s.included_namespaces.clone();
        spec.excluded_namespaces = s.excluded_namespaces.clone();
        spec.included_resources = s.included_resources.clone();
        spec.excluded_resources = s.excluded_resources.clone();
        spec.include_cluster_resources = s.include_cluster_resources;
        let unchecked = blockwise_engine::mutation::active(blockwise_engine::Mutation::TenantNamespacesUnchecked);
        if let (Scope::Tenant(ns), false) = (scope, unchecked) {
            let outside: Vec<&String> = s.included_namespaces.iter().filter(|n| *n != ns).collect();
            if !outside.is_empty() {
                errors.push(format!(
                    "spec.includedNamespaces: a Backup in tenant namespace {ns} may include {ns} only, not {}",
                    outside.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                ));
            }
            if s.include_cluster_resources == Some(true) {
                errors.push(format!(
                    "spec.includeClusterResources: a Backup in tenant namespace {ns} cannot include cluster-scoped resources"
                ));
            }
            if s.storage.is_some() {
                errors.push(format!(
                    "spec.storage: a Backup in tenant namespace {ns} cannot name its own store; use spec.storageLocation (one of the controller's) or none"
                ));
            }
            spec.included_namespaces = vec![ns.clone()];
            spec.include_cluster_resources = Some(false);
        }
        let scoped = locations.scoped(scope);
        let locations = &scoped;
        if let Some(sel) = &s.label_selector {
            match selector_string(sel) {
                Ok(text) if text.is_empty() => {}
                Ok(text) => match blockwise_engine::spec::LabelSelector::parse(&text) {
                    Ok(_) => spec.label_selector = Some(text),
                    Err(e) => errors.push(format!("spec.labelSelector: {e}")),
                },
                Err(e) => errors.push(format!("spec.labelSelector: {e}")),
            }
        }
        let ordered: Vec<String> = s.ordered_resources.iter().map(|(r, names)| format!("{r}={names}")).collect();
        match parse_ordered_resources(&ordered.join(";")) {
            Ok(o) => spec.ordered_resources = o,
            Err(e) => errors.push(format!("spec.orderedResources: {e}")),
        }
        spec.volume_group_label =
            s.volume_group_snapshot_label_key.clone().unwrap_or_else(|| DEFAULT_VOLUME_GROUP_LABEL.to_string());
        if spec.volume_group_label.is_empty() {
            errors.push("spec.volumeGroupSnapshotLabelKey is empty".into());
        }
        if let Some(h) = &s.hooks {
            match crate::hookspec::parse_hooks_file(&h.to_string()) {
                Ok(hooks) => spec.hooks = hooks,
                Err(e) => errors.push(format!("spec.hooks: {e}")),
            }
        }
        let options = BackupOptions {
            snapshot_volumes: s.snapshot_volumes,
            csi_snapshot_timeout_ms: duration(
                "csiSnapshotTimeout",
                &s.csi_snapshot_timeout,
                CSI_SNAPSHOT_TIMEOUT_MS_DEFAULT,
                &mut errors,
            ),
            item_operation_timeout_ms: duration(
                "itemOperationTimeout",
                &s.item_operation_timeout,
                ITEM_OPERATION_TIMEOUT_MS_DEFAULT,
                &mut errors,
            ),
            annotations: self.metadata.annotations.clone().unwrap_or_default(),
            uid,
        };
        let ttl_ms = s.ttl.as_ref().map(|_| duration("ttl", &s.ttl, 0, &mut errors));
        let workers = s.workers.unwrap_or(WORKERS_DEFAULT);
        if !(1..=1024).contains(&workers) {
            errors.push(format!("spec.workers {workers}: expected 1 to 1024"));
        }
        let storage = match (&s.storage_location, &s.storage) {
            (Some(_), Some(_)) => {
                errors.push("spec.storageLocation and spec.storage are both set: give one".into());
                None
            }
            (Some(n), None) => match locations.named.get(n) {
                Some(l) => Some(l.clone()),
                None => {
                    let known: Vec<&str> = locations.named.keys().map(String::as_str).collect();
                    errors.push(format!(
                        "spec.storageLocation {n:?} is not a location this controller knows ({})",
                        if known.is_empty() { "it has none".to_string() } else { known.join(", ") }
                    ));
                    None
                }
            },
            (None, Some(_)) if matches!(scope, Scope::Tenant(_)) => None,
            (None, Some(inline)) => match inline_storage(inline) {
                Ok(l) => match locations.inside_of(&l) {
                    Some(location) => {
                        errors.push(format!(
                            "spec.storage {:?}: lies inside the controller's location {location} (its backups and its tenants' are there); give that location's root or a store outside it",
                            inline.url
                        ));
                        None
                    }
                    None => Some(l),
                },
                Err(e) => {
                    errors.push(format!("spec.storage: {e}"));
                    None
                }
            },
            (None, None) => Some(locations.default.clone().unwrap_or(StorageSpec::Local { root: None })),
        };
        match storage {
            Some(storage) if errors.is_empty() => {
                Ok(Request { spec, options, workers: workers as usize, storage, ttl_ms })
            }
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn backup(spec: Value) -> Backup {
        let mut b: Backup = serde_json::from_value(serde_json::json!({
            "apiVersion": "blockwise.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "nightly", "namespace": "ops", "uid": "0d5c2e1a-test"},
            "spec": spec,
        }))
        .unwrap();
        b.metadata.annotations.get_or_insert_default().insert("a".into(), "b".into());
        b
    }

    #[test]
    fn the_crd_is_namespaced_with_status_and_printer_columns() {
        let crd = serde_json::to_value(Backup::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "backups.blockwise.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "bwb");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object());
        let cols: Vec<&str> =
            v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(cols, ["Phase", "Items", "Total", "Errors", "Resumed", "Age"]);
        let props = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for field in [
            "includedNamespaces",
            "excludedNamespaces",
            "includedResources",
            "excludedResources",
            "includeClusterResources",
            "labelSelector",
            "orderedResources",
            "hooks",
            "ttl",
            "storageLocation",
            "storage",
            "csiSnapshotTimeout",
            "itemOperationTimeout",
            "volumeGroupSnapshotLabelKey",
            "snapshotVolumes",
            "workers",
        ] {
            assert!(props[field].is_object(), "spec.{field} missing from the schema");
        }
        assert_eq!(props["hooks"]["x-kubernetes-preserve-unknown-fields"], true);
    }

    #[test]
    fn a_velero_spec_converts() {
        let b = backup(serde_json::json!({
            "includedNamespaces": ["db", "web-*"], "excludedResources": ["secrets"],
            "includeClusterResources": false,
            "labelSelector": {"matchLabels": {"app": "pg"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
            "orderedResources": {"pods": "db/a,db/b"},
            "hooks": {"resources": [{"name": "freeze", "pre": [{"exec": {"command": ["sync"]}}]}]},
            "ttl": "720h", "csiSnapshotTimeout": "90s", "snapshotVolumes": true, "workers": 4,
            "storage": {"url": "/var/lib/store"},
        }));
        let r = b.to_request(&Locations::default(), &Scope::Admin).unwrap();
        assert_eq!(r.spec.name, "nightly");
        assert_eq!(r.spec.included_namespaces, ["db", "web-*"]);
        assert_eq!(r.spec.label_selector.as_deref(), Some("app=pg,tier in (a,b)"));
        assert_eq!(r.spec.ordered_resources, [("pods".to_string(), vec!["db/a".to_string(), "db/b".to_string()])]);
        assert_eq!(r.spec.hooks.len(), 1);
        assert_eq!(r.options.csi_snapshot_timeout_ms, 90_000);
        assert_eq!(r.options.uid, "0d5c2e1a-test");
        assert_eq!(r.options.annotations.get("a").map(String::as_str), Some("b"));
        assert_eq!(r.ttl_ms, Some(720 * 3600 * 1000));
        assert_eq!(r.workers, 4);
        assert_eq!(r.storage, StorageSpec::Local { root: Some("/var/lib/store".into()) });
    }

    /// Issue 21, defects 2 and 6: a tenant's Backup covers its namespace, names no store of its
    /// own, and writes under its tenant prefix of a shared location.
    #[test]
    fn a_tenants_backup_stays_in_its_namespace_and_under_its_prefix() {
        let tenant = Scope::Tenant("payments".into());
        let mut locations = Locations::default();
        locations.named.insert("shared".into(), StorageSpec::Local { root: Some("/stores/shared".into()) });
        let s3 = S3Location::parse("s3://bucket/cluster-a").unwrap();
        locations.default = Some(StorageSpec::S3(s3));
        // Empty includedNamespaces: the tenant's namespace; cluster resources off.
        let r = backup(serde_json::json!({})).to_request(&locations, &tenant).unwrap();
        assert_eq!(r.spec.included_namespaces, ["payments"]);
        assert_eq!(r.spec.include_cluster_resources, Some(false));
        let StorageSpec::S3(loc) = &r.storage else { panic!("{:?}", r.storage) };
        assert_eq!(loc.prefix, "cluster-a/tenants/payments");
        let r = backup(serde_json::json!({"storageLocation": "shared", "includedNamespaces": ["payments"]}))
            .to_request(&locations, &tenant)
            .unwrap();
        assert_eq!(r.storage, StorageSpec::Local { root: Some("/stores/shared/tenants/payments".into()) });
        // The administrator's: as given.
        let r = backup(serde_json::json!({"storageLocation": "shared"})).to_request(&locations, &Scope::Admin).unwrap();
        assert_eq!(r.storage, StorageSpec::Local { root: Some("/stores/shared".into()) });
        assert!(r.spec.included_namespaces.is_empty());
        // Stepping outside: each field named.
        let bad = backup(serde_json::json!({
            "includedNamespaces": ["payments", "identity"], "includeClusterResources": true,
            "storage": {"url": "/stores/other-tenant"},
        }));
        let errors = bad.to_request(&locations, &tenant).unwrap_err().join("\n");
        for needle in [
            "spec.includedNamespaces: a Backup in tenant namespace payments may include payments only, not \"identity\"",
            "spec.includeClusterResources",
            "spec.storage: a Backup in tenant namespace payments cannot name its own store",
        ] {
            assert!(errors.contains(needle), "{needle:?} not in {errors}");
        }
        let glob = backup(serde_json::json!({"includedNamespaces": ["*"]}));
        assert!(glob.to_request(&locations, &tenant).unwrap_err()[0].contains("spec.includedNamespaces"));
        // The administrator's inline store may not lie inside a location: it would share a prefix
        // with that location's backups or its tenants'.
        for url in [
            "/stores/shared/tenants/payments",
            "/stores/shared/x/../tenants",
            "/stores/shared/backups/nightly",
            "s3://bucket/cluster-a/tenants",
        ] {
            let inline = backup(serde_json::json!({"storage": {"url": url}}));
            let errors = inline.to_request(&locations, &Scope::Admin).unwrap_err().join("\n");
            assert!(errors.contains("inside the controller's location"), "{url}: {errors}");
        }
        for url in [
            "/stores/shared",
            "/stores/x/../shared",
            "/stores/shared-b",
            "s3://bucket/cluster-b/tenants",
            "s3://other/cluster-a/tenants",
        ] {
            let inline = backup(serde_json::json!({"storage": {"url": url}}));
            assert!(inline.to_request(&locations, &Scope::Admin).is_ok(), "{url}");
        }
    }

    #[test]
    fn tenancy_scopes_namespaces() {
        let t =
            Tenancy { home: "blockwise-system".into(), tenants: Tenancy::parse_tenants("payments, billing").unwrap() };
        assert_eq!(t.scope("blockwise-system"), Some(Scope::Admin));
        assert_eq!(t.scope("payments"), Some(Scope::Tenant("payments".into())));
        assert_eq!(t.scope("identity"), None);
        assert_eq!(Tenancy::home_only("blockwise-system").scope("payments"), None);
        let all = Tenancy { home: "ops".into(), tenants: Tenancy::parse_tenants("*").unwrap() };
        assert_eq!(all.scope("anything"), Some(Scope::Tenant("anything".into())));
        assert!(all.watches_all() && !Tenancy::home_only("ops").watches_all());
        for bad in ["", "a,,b", "Payments", "-x", "a b"] {
            assert!(Tenancy::parse_tenants(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_reason_a_spec_is_invalid_is_reported() {
        let b = backup(serde_json::json!({
            "labelSelector": {"matchExpressions": [{"key": "a", "operator": "Gt"}]},
            "hooks": {"resources": [{"name": "h", "pre": [{"exec": {"command": []}}]}]},
            "ttl": "soon", "workers": 0, "storageLocation": "offsite", "orderedResources": {"pods": " , "},
            "includedNamespaces": ["../etc", "!!"], "excludedNamespaces": ["Bad"],
        }));
        let errors = b.to_request(&Locations::default(), &Scope::Admin).unwrap_err();
        let all = errors.join("\n");
        // A Backup's status names its fields, never the CLI's flags (issue 21).
        assert!(!all.contains("--"), "a CLI flag in a CR's status: {all}");
        for needle in [
            "spec.labelSelector: operator \"Gt\"",
            "spec.hooks: hook \"h\": exec.command is empty",
            "spec.ttl \"soon\"",
            "spec.workers 0",
            "spec.storageLocation \"offsite\"",
            "spec.orderedResources: invalid ordered-resources entry",
            // Issue 22: a namespace that is no namespace name (it would be a request path).
            "spec.includedNamespaces: \"../etc\"",
            "spec.includedNamespaces: \"!!\"",
            "spec.excludedNamespaces: \"Bad\"",
        ] {
            assert!(all.contains(needle), "{needle:?} not in {all}");
        }
        let relative = backup(serde_json::json!({"storage": {"url": "store"}}));
        assert!(
            relative.to_request(&Locations::default(), &Scope::Admin).unwrap_err()[0].contains("absolute directory")
        );
    }
}
