//! `restores.blockwise.dev` (issue 13, part 6): Velero's Restore spec names and status phases,
//! run by the controller through [`RestoreSession`] — the same restore driver as `blockwise
//! restore create` — into the cluster the controller serves, from a Backup of the same namespace.
//!
//! A Restore is validated (its backup must exist in the namespace's data directory; names,
//! mappings, policy and selector must be valid) or ends `FailedValidation` with every reason.
//! A valid one runs on a thread of its own; its status (phase, progress, warnings, errors) is
//! patched at most once a status interval and at the end. A restarted controller — or a new
//! leader — finds the Restore InProgress and **resumes it from its log**: items an earlier run
//! may have created are looked up first, nothing is created twice (`docs/restore.md`). A Restore
//! deleted and created again under its name gets a fresh restore (the log records the uid).
//! Deleting a Restore leaves what it restored in the cluster, as Velero does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blockwise_engine::event::Phase;
use blockwise_engine::ports::Cluster;
use blockwise_engine::restore_run::{
    ExistingPolicy, ItemOutcome, RestoreEvent, RestorePhase, RestoreSpec as EngineRestoreSpec, RestoreState,
};
use blockwise_engine::summary::BackupSummary;
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::controller::{off_worker, status_merge_patch, FIELD_MANAGER};
use super::crd::{is_zero, phase, selector_string, LabelSelector, Scope, Tenancy, WORKERS_DEFAULT};
use super::metrics::Metrics;
use crate::report::rfc3339;
use crate::restore::{ArchiveSource, RestoreFiles, RestoreObserver, RestoreSession};
use crate::session::{ClusterSource, DataDir, SessionError};
use crate::world::{Runtime, TokioRuntime};
use blockwise_engine::service::{restore_step, BackupLook, BackupStep, RunEnd, RunId, RunRegistry};

/// A restore of a Backup, with Velero's Restore field names; see the module docs.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "blockwise.dev",
    version = "v1alpha1",
    kind = "Restore",
    plural = "restores",
    shortname = "bwr",
    category = "blockwise",
    namespaced,
    status = "RestoreStatus",
    printcolumn = r#"{"name":"Backup","type":"string","jsonPath":".spec.backupName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Restored","type":"integer","jsonPath":".status.progress.itemsRestored"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.progress.totalItems"}"#,
    printcolumn = r#"{"name":"Errors","type":"integer","jsonPath":".status.errors"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// The Backup (of this namespace) to restore.
    pub backup_name: String,
    /// Namespaces to restore (`*` globs); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub included_namespaces: Vec<String>,
    /// Namespaces not to restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_namespaces: Vec<String>,
    /// Resources to restore (plural, plural.group or kind); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub included_resources: Vec<String>,
    /// Resources not to restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_resources: Vec<String>,
    /// Archived namespace → namespace restored into.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_mapping: BTreeMap<String, String>,
    /// `none` (default) or `update`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing_resource_policy: Option<String>,
    /// Provision claims from their CSI snapshots (default false; `docs/restore.md`).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "restorePVs")]
    pub restore_pvs: Option<bool>,
    /// Only objects whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
    /// Creates in flight at once (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
}

/// What the controller reports of a Restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// Velero's restore phase names: `InProgress`, `Completed`, `PartiallyFailed`, `Failed`,
    /// `FailedValidation` (the Backups' terminal names, [`phase`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Objects planned and restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<RestoreProgress>,
    /// Warnings recorded.
    #[serde(default)]
    pub warnings: u32,
    /// Errors recorded.
    #[serde(default)]
    pub errors: u32,
    /// Why the restore failed (or failed validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The validation errors of a FailedValidation restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_errors: Vec<String>,
    /// When it started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<String>,
    /// When it reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timestamp: Option<String>,
    /// How many times a restarted controller resumed it from its log.
    #[serde(default)]
    pub resumed_count: u32,
    /// Why the run stopped before its end (the cluster or the archive unavailable): the phase
    /// stays InProgress and the controller resumes it from its log at `nextRetry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// When a stopped run is resumed next (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<String>,
    /// Runs resumed after a stop by this controller.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_count: u32,
}

/// Progress of a restore (Velero's names).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreProgress {
    /// Objects the restore creates.
    pub total_items: u64,
    /// Objects with their outcome.
    pub items_restored: u64,
}

impl Restore {
    /// The engine's restore spec and workers, or every reason the Restore cannot run. A tenant's
    /// Restore (`scope`) restores into its own namespace only: every mapping targets it, and the
    /// namespaces restored are it and those mapped into it (an empty `includedNamespaces` means
    /// them).
    pub fn to_spec(&self, scope: &Scope) -> Result<(EngineRestoreSpec, u32), Vec<String>> {
        let s = &self.spec;
        let mut errors = Vec::new();
        let mut spec = EngineRestoreSpec::new(&self.name_any(), &s.backup_name);
        if s.backup_name.is_empty() {
            errors.push("spec.backupName is required".to_string());
        }
        spec.included_namespaces = s.included_namespaces.clone();
        spec.excluded_namespaces = s.excluded_namespaces.clone();
        spec.included_resources = s.included_resources.clone();
        spec.excluded_resources = s.excluded_resources.clone();
        spec.namespace_mapping = s.namespace_mapping.clone();
        if let Scope::Tenant(ns) = scope {
            let elsewhere: Vec<String> = s
                .namespace_mapping
                .iter()
                .filter(|(_, to)| *to != ns)
                .map(|(from, to)| format!("{from}:{to}"))
                .collect();
            if !elsewhere.is_empty() {
                errors.push(format!(
                    "spec.namespaceMapping: a Restore in tenant namespace {ns} restores into {ns} only, not {}",
                    elsewhere.join(", ")
                ));
            }
            let lands_here = |n: &String| s.namespace_mapping.get(n).unwrap_or(n) == ns;
            let outside: Vec<&String> = s.included_namespaces.iter().filter(|n| !lands_here(n)).collect();
            if !outside.is_empty() {
                errors.push(format!(
                    "spec.includedNamespaces: a Restore in tenant namespace {ns} may restore {ns} (or namespaces mapped into it) only, not {}",
                    outside.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                ));
            }
            if s.included_namespaces.is_empty() {
                spec.included_namespaces = std::iter::once(ns.clone())
                    .chain(s.namespace_mapping.iter().filter(|(_, to)| *to == ns).map(|(from, _)| from.clone()))
                    .collect();
            }
        }
        match ExistingPolicy::parse(s.existing_resource_policy.as_deref().unwrap_or("none")) {
            Ok(p) => spec.existing_resource_policy = p,
            Err(e) => errors.push(format!("spec.existingResourcePolicy: {e}")),
        }
        spec.restore_volumes = s.restore_pvs.unwrap_or(false);
        if let Some(sel) = &s.label_selector {
            match selector_string(sel) {
                Ok(sel) => spec.label_selector = Some(sel),
                Err(e) => errors.push(format!("spec.labelSelector: {e}")),
            }
        }
        let workers = s.workers.unwrap_or(WORKERS_DEFAULT);
        if !(1..=1024).contains(&workers) {
            errors.push(format!("spec.workers {workers}: must be between 1 and 1024"));
        }
        if errors.is_empty() {
            if let Err(e) = spec.validate() {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok((spec, workers))
        } else {
            Err(errors)
        }
    }
}

/// What the restore controller needs.
pub struct RestoreCtx {
    /// The API client.
    pub client: Client,
    /// The cluster restored into (the one served).
    pub cluster: Arc<dyn Cluster>,
    /// How it is reached (recorded beside each restore's log).
    pub source: ClusterSource,
    /// `<data-dir>`; each namespace's restores live under `namespaces/<ns>/`, beside its backups.
    pub data_dir: PathBuf,
    /// Least time between two status patches of a running restore.
    pub status_interval: Duration,
    /// Counters (`blockwise_restore_*`).
    pub metrics: Arc<Metrics>,
    /// Which namespaces' Restores are acted on, and as whom.
    pub tenancy: Tenancy,
    /// Restores run at once (a slot is taken before a run is prepared, freed when it ends).
    concurrent: usize,
    running: Mutex<BTreeSet<(String, String)>>,
    /// Restores (namespace, name, uid) whose runs ended in this process: terminal, or stopped
    /// after `n` stops in a row and resumed at the instant (issue 21). Forgotten once the cache
    /// shows the end (see `reconcile`), so it stays bounded.
    ended: Mutex<RunRegistry>,
    /// Wakes every Restore when a run ends: one recreated under a running one's name, or stopped
    /// and due again, is looked at then.
    wake: futures::channel::mpsc::UnboundedSender<()>,
    wakes: Mutex<Option<futures::channel::mpsc::UnboundedReceiver<()>>>,
    /// The controller's cache of Restores (to forget the ends of those that are gone).
    store: std::sync::OnceLock<kube::runtime::reflector::Store<Restore>>,
}

impl RestoreCtx {
    /// A context with nothing running.
    pub fn new(
        client: Client,
        cluster: Arc<dyn Cluster>,
        source: ClusterSource,
        data_dir: PathBuf,
        status_interval: Duration,
        metrics: Arc<Metrics>,
        tenancy: Tenancy,
    ) -> RestoreCtx {
        let (wake, wakes) = futures::channel::mpsc::unbounded();
        RestoreCtx {
            wake,
            wakes: Mutex::new(Some(wakes)),
            store: std::sync::OnceLock::new(),
            client,
            cluster,
            source,
            data_dir,
            status_interval,
            metrics,
            tenancy,
            concurrent: 1,
            running: Mutex::new(BTreeSet::new()),
            ended: Mutex::new(RunRegistry::default()),
        }
    }

    /// At most `n` Restores run at once (at least one); the others wait, their phase unset, and
    /// are looked at again each time a run ends.
    pub fn with_concurrent_restores(mut self, n: usize) -> RestoreCtx {
        self.concurrent = n.max(1);
        self
    }

    fn data(&self, ns: &str) -> DataDir {
        DataDir::new(self.data_dir.join("namespaces").join(ns))
    }

    /// Forgets the ends of Restores the cache no longer has (deleted): `ended` holds only what a
    /// stale cache could still contradict, or a stop to retry.
    fn forget_gone(&self) {
        let Some(store) = self.store.get() else { return };
        let present: BTreeSet<RunId> = store
            .state()
            .iter()
            .map(|r| (r.namespace().unwrap_or_default(), r.name_any(), r.uid().unwrap_or_default()))
            .collect();
        self.ended.lock().unwrap_or_else(PoisonError::into_inner).prune(|id| present.contains(id).then_some(false));
    }
}

/// A reconcile that failed; retried.
#[derive(Debug, thiserror::Error)]
pub enum RestoreReconcileError {
    /// The API.
    #[error("{0}")]
    Kube(String),
    /// The data directory.
    #[error("{0}")]
    Session(#[from] SessionError),
}

/// Patches the status of the Restore `name` whose uid is `uid`: one deleted and created again under
/// the name has another, and the API server refuses the patch — an earlier run's late write never
/// lands on the new Restore (which would then show that run's end and never run itself).
async fn patch_status(
    api: &Api<Restore>,
    name: &str,
    uid: &str,
    status: &RestoreStatus,
) -> Result<(), RestoreReconcileError> {
    let fields = [
        "phase",
        "progress",
        "failureReason",
        "validationErrors",
        "startTimestamp",
        "completionTimestamp",
        "stopReason",
        "nextRetry",
    ];
    let mut body = status_merge_patch(status, &fields);
    body["metadata"] = serde_json::json!({ "uid": uid });
    let params = PatchParams::apply(FIELD_MANAGER);
    api.patch_status(name, &params, &Patch::Merge(&body))
        .await
        .map(|_| ())
        .map_err(|e| RestoreReconcileError::Kube(format!("patching the status of restore {name}: {e}")))
}

/// Items a restore created or patched.
fn written(state: &RestoreState) -> u64 {
    state.done.values().filter(|o| matches!(o, ItemOutcome::Created | ItemOutcome::Updated)).count() as u64
}

/// The status of a restore from its folded state.
fn status_of(state: &RestoreState, base: &RestoreStatus) -> RestoreStatus {
    RestoreStatus {
        // Velero's restore phase names, which `RestorePhase` displays.
        phase: Some(state.phase().to_string()),
        progress: Some(RestoreProgress { total_items: state.items.into(), items_restored: state.done.len() as u64 }),
        warnings: state.warnings.len() as u32,
        errors: state.errors.len() as u32,
        failure_reason: state.failure.clone().or_else(|| base.failure_reason.clone()),
        validation_errors: Vec::new(),
        start_timestamp: Some(rfc3339(state.started_ms)),
        completion_timestamp: state.finished_ms.map(rfc3339),
        resumed_count: base.resumed_count,
        stop_reason: None,
        next_retry: None,
        retry_count: base.retry_count,
    }
}

/// A tenant restores only a backup made under the tenant rules (its namespace only, no cluster
/// resources) — not one the administrator left in its namespace, or one made before tenant mode.
fn tenant_made(state: &BackupSummary, backup: &str, tenant: &str) -> Result<(), Vec<String>> {
    let ok = state.spec.as_ref().is_some_and(|s| {
        s.included_namespaces.iter().all(|n| n == tenant)
            && !s.included_namespaces.is_empty()
            && s.include_cluster_resources == Some(false)
    });
    if ok {
        Ok(())
    } else {
        Err(vec![format!(
            "spec.backupName {backup:?}: it was not made under tenant {tenant}'s rules (its namespace only, no cluster resources)"
        )])
    }
}

/// Reconciles one Restore (see the module docs).
pub async fn reconcile(r: Arc<Restore>, ctx: Arc<RestoreCtx>) -> Result<Action, RestoreReconcileError> {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let uid = r.uid().unwrap_or_default();
    // Outside the controller's namespaces: not ours to act on.
    let Some(scope) = ctx.tenancy.scope(&ns) else { return Ok(Action::await_change()) };
    let api: Api<Restore> = Api::namespaced(ctx.client.clone(), &ns);
    let status = r.status.clone().unwrap_or_default();
    let key = (ns.clone(), name.clone());
    let id = (ns.clone(), name.clone(), uid.clone());
    let terminal = status.phase.as_deref().is_some_and(phase::is_terminal);
    let end = {
        let mut ended = ctx.ended.lock().unwrap_or_else(PoisonError::into_inner);
        if terminal {
            // The cache shows the end: nothing stale can contradict it any more.
            ended.forget(&id);
        }
        ended.end_of(&id)
    };
    let now = TokioRuntime.now_ms() as i64;
    let look = BackupLook {
        in_scope: true,
        deleting: r.metadata.deletion_timestamp.is_some(),
        finalizer: false,
        phase: status.phase.as_deref(),
        running_here: ctx.running.lock().unwrap_or_else(PoisonError::into_inner).contains(&key),
        end,
        now_ms: now,
    };
    // The engine's pure step decides; a stopped run is resumed once its backoff has passed.
    let step = restore_step(&look);
    tracing::debug!(restore = %format!("{ns}/{name}"), phase = ?status.phase, ?step, "reconcile");
    let stops = match step {
        BackupStep::Run { stops } => stops,
        BackupStep::RetryAt(at) => return Ok(Action::requeue(Duration::from_millis((at - now).max(1) as u64))),
        _ => return Ok(Action::await_change()),
    };
    // A slot among the restores run at once, taken before anything is opened (a restore's memory
    // is its plan and its log's fold: docs/service.md, "Memory"); given back if this reconcile
    // does not start a run.
    let mut slot = {
        let mut running = ctx.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.len() >= ctx.concurrent {
            let n = running.len();
            drop(running);
            let waiting = format!("{n} restore(s) running, --concurrent-restores {}", ctx.concurrent);
            eprintln!("restore {ns}/{name}: waiting ({waiting})");
            // Woken when a run ends (`wake`).
            return Ok(Action::await_change());
        }
        running.insert(key.clone());
        Slot { ctx: &ctx, key: Some(key.clone()) }
    };
    let data = ctx.data(&ns);
    // This Restore's own log (same uid): validated when it was created; resumed as it is, even if
    // its Backup has been collected since (the run then says what is missing).
    // Blocking file work (sled opens and folds) runs off the tokio workers.
    let looked = {
        let (data, name, uid, ns, scope, r) =
            (data.clone(), name.clone(), uid.clone(), ns.clone(), scope.clone(), r.clone());
        off_worker(move || {
            let existing = match RestoreSession::open(&data, &name) {
                Ok(s) if s.files().uid.as_deref() == Some(uid.as_str()) => Some(s),
                Ok(_) | Err(SessionError::NotFound { .. }) => None,
                // Neither run nor resumed: it fails, naming the damage (issue 22).
                Err(SessionError::Log(damage @ crate::log::LogError::Damaged { .. })) => {
                    return Ok((None, Err(vec![damage.to_string()]), true))
                }
                Err(e) => return Err(e),
            };
            let validated = r.to_spec(&scope).and_then(|(spec, workers)| {
                if existing.is_some() {
                    return Ok((spec, workers));
                }
                if !data.log_dir(&spec.backup_name).exists() {
                    return Err(vec![format!(
                        "spec.backupName: backup {:?} not found in namespace {ns}",
                        spec.backup_name
                    )]);
                }
                // The Backup's log is read and folded once, for both checks.
                let backup = usable_backup(&data, &spec.backup_name)?;
                if let Scope::Tenant(tenant) = &scope {
                    tenant_made(&backup, &spec.backup_name, tenant)?;
                }
                Ok((spec, workers))
            });
            Ok((existing, validated, false))
        })
        .await?
    };
    let (existing, validated, damaged) = looked;
    tracing::debug!(restore = %format!("{ns}/{name}"), existing = existing.is_some(), "looked");
    let (spec, workers) = match validated {
        Ok(v) => v,
        Err(errors) => {
            // A damaged log of its own: Failed (LogDamaged). Else the spec or its Backup: invalid.
            let (failed, counter) = if damaged {
                let reason = format!("{}: {}", super::controller::LOG_DAMAGED, errors.join("; "));
                let failed =
                    RestoreStatus { phase: Some(phase::FAILED.into()), failure_reason: Some(reason), ..status };
                (failed, &ctx.metrics.restore_failed)
            } else {
                let failed = RestoreStatus {
                    phase: Some(phase::FAILED_VALIDATION.into()),
                    failure_reason: Some(errors.join("; ")),
                    validation_errors: errors,
                    ..status
                };
                (failed, &ctx.metrics.restore_validation_failed)
            };
            patch_status(&api, &name, &uid, &failed).await?;
            // A reconcile from a cache that has not seen this patch yet must not count it again.
            if ctx.ended.lock().unwrap_or_else(PoisonError::into_inner).record(id, RunEnd::Terminal).is_none() {
                counter.inc();
            }
            let (phase, reason) = (failed.phase.unwrap_or_default(), failed.failure_reason.unwrap_or_default());
            eprintln!("restore {ns}/{name}: {phase}: {reason}");
            return Ok(Action::await_change());
        }
    };
    // An existing restore of this name: resumed when it is this Restore's, replaced when it is an
    // earlier Restore's that was deleted.
    let finished_before = existing.as_ref().is_some_and(|s| s.state().finished_ms.is_some());
    let resumed = existing.is_some() && !finished_before;
    let session = if let Some(s) = existing {
        s
    } else {
        let (data, name, source, uid) = (data.clone(), name.clone(), ctx.source.clone(), uid.clone());
        off_worker(move || {
            crate::session::remove_tree(&data.restore_dir(&name))?;
            let storage = data.storage(&spec.backup_name)?;
            let files = RestoreFiles {
                archive: ArchiveSource::Backup { name: spec.backup_name.clone(), storage },
                cluster: source,
                uid: Some(uid),
            };
            RestoreSession::create(&data, spec, files, workers, TokioRuntime.now_ms())
        })
        .await?
    };
    // The run holds the slot now, and gives it back when it ends.
    slot.key = None;
    drop(slot);
    let mut base = status;
    base.stop_reason = None;
    base.next_retry = None;
    if finished_before {
        // Killed between its last event and its status: reported, not counted again.
        eprintln!("restore {ns}/{name}: its log had finished before its status was reported; reporting it");
    } else if stops > 0 {
        // At least this process's stops in a row: while status patches fail (a hung server)
        // the status read back does not count the retries before.
        base.retry_count = (base.retry_count + 1).max(stops);
        eprintln!("restore {ns}/{name}: resuming after {stops} stop(s) (retry {})", base.retry_count);
    } else if resumed {
        base.resumed_count += 1;
        ctx.metrics.restore_resumed.inc();
        eprintln!("restore {ns}/{name}: resuming from its log (resume {})", base.resumed_count);
    } else {
        ctx.metrics.restore_attempt.inc();
        eprintln!("restore {ns}/{name}: started");
    }
    let handle = tokio::runtime::Handle::current();
    let ctx = ctx.clone();
    // As a backup's run: the driver's future runs on a blocking thread of its own.
    tokio::task::spawn_blocking(move || {
        handle.block_on(async move {
            // A log that finished in a run of this process which then stopped (its last status
            // write failed) was not counted: `stops` says so.
            let counted = finished_before && stops == 0;
            let stopped = run(session, base, (&api, &uid), &ctx, &ns, stops, counted).await;
            let end = match stopped {
                Some(retry_at_ms) => RunEnd::Stopped { stops: stops + 1, retry_at_ms },
                None => RunEnd::Terminal,
            };
            ctx.ended.lock().unwrap_or_else(PoisonError::into_inner).record((ns.clone(), name.clone(), uid), end);
            ctx.running.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
            ctx.forget_gone();
            let _ = ctx.wake.unbounded_send(());
        })
    });
    Ok(Action::await_change())
}

/// A taken slot of [`RestoreCtx::running`], given back when dropped unless a run took it over.
struct Slot<'a> {
    ctx: &'a RestoreCtx,
    key: Option<(String, String)>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.ctx.running.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
        }
    }
}

/// Sends the state to the status patcher at most once an interval.
struct StatusObserver {
    tx: watch::Sender<Option<RestoreStatus>>,
    base: RestoreStatus,
    last: Instant,
    interval: Duration,
    /// The last status sent: a run that stops reports its progress from here.
    latest: Option<RestoreStatus>,
}

impl RestoreObserver for StatusObserver {
    fn event(&mut self, _: &RestoreEvent, _: &RestoreState) {}

    fn committed(&mut self, state: &RestoreState) {
        // A finished state's status goes out from the run, after its end is counted: a client
        // that sees the terminal phase then sees its metrics too.
        if self.last.elapsed() >= self.interval && state.finished_ms.is_none() {
            self.last = Instant::now();
            let status = status_of(state, &self.base);
            self.latest = Some(status.clone());
            let _ = self.tx.send(Some(status));
        }
    }
}

/// Runs a restore to its end and reports it; `Some(when)`: it stopped (the cluster or its archive
/// unavailable) and is resumed then, InProgress meanwhile with the reason. `counted`: its end was
/// counted by an earlier run (a finished log whose status was not reported).
async fn run(
    session: RestoreSession,
    base: RestoreStatus,
    (api, uid): (&Api<Restore>, &str),
    ctx: &RestoreCtx,
    ns: &str,
    stops: u32,
    counted: bool,
) -> Option<i64> {
    let name = session.state().spec.name.clone();
    let first = status_of(session.state(), &base);
    let written_before = written(session.state());
    // A finished log's terminal status goes out once, after its end is counted.
    if session.state().finished_ms.is_none() {
        if let Err(e) = patch_status(api, &name, uid, &first).await {
            eprintln!("warning: restore {name}: {e}");
        }
    }
    let (tx, mut rx) = watch::channel::<Option<RestoreStatus>>(None);
    let patcher = {
        let (api, name, uid) = (api.clone(), name.clone(), uid.to_string());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let latest = rx.borrow_and_update().clone();
                if let Some(s) = latest {
                    if let Err(e) = patch_status(&api, &name, &uid, &s).await {
                        eprintln!("warning: restore {name}: {e}");
                    }
                }
            }
        })
    };
    let mut observer =
        StatusObserver { tx, base: base.clone(), last: Instant::now(), interval: ctx.status_interval, latest: None };
    let result = session.run(ctx.cluster.clone(), &mut observer).await;
    let last_seen = observer.latest.take().unwrap_or_else(|| first.clone());
    drop(observer);
    let _ = patcher.await;
    let mut retry_at = None;
    let end = match result {
        Ok(state) => {
            let counter = match state.phase() {
                RestorePhase::Completed => Some(&ctx.metrics.restore_success),
                RestorePhase::PartiallyFailed => Some(&ctx.metrics.restore_partial_failure),
                RestorePhase::Failed => Some(&ctx.metrics.restore_failed),
                RestorePhase::InProgress => None,
            };
            if let Some(c) = counter.filter(|_| !counted) {
                c.inc();
            }
            // This run's items: a resumed restore's earlier ones were counted by the run before.
            ctx.metrics.restore_items.inc_by(written(&state).saturating_sub(written_before));
            status_of(&state, &base)
        }
        // The run stopped (the cluster unavailable, the archive gone): the Restore stays
        // InProgress with the reason and its progress so far, and is resumed with backoff.
        Err(e) => {
            let wait = super::controller::retry_backoff(stops + 1);
            let at_ms = TokioRuntime.now_ms() + wait.as_millis() as u64;
            retry_at = Some(at_ms as i64);
            eprintln!("restore {ns}/{name}: stopped ({e}); resuming it in {} s", wait.as_secs());
            RestoreStatus { stop_reason: Some(e.to_string()), next_retry: Some(rfc3339(at_ms)), ..last_seen }
        }
    };
    if retry_at.is_none() {
        eprintln!("restore {ns}/{name}: ended {}", end.phase.as_deref().unwrap_or("?"));
    }
    if let Err(e) = patch_status(api, &name, uid, &end).await {
        eprintln!("warning: restore {name}: {e}");
    }
    retry_at
}

/// A Restore's Backup, folded from its log, once it has ended usable (Completed or
/// PartiallyFailed): one still running or failed is a validation error, not a failed restore.
fn usable_backup(data: &DataDir, backup: &str) -> Result<BackupSummary, Vec<String>> {
    let refuse = |why: String| vec![format!("spec.backupName {backup:?}: {why}")];
    // Its summary: a Backup of a million objects is validated in tens of MiB, not hundreds.
    let state = match data.summary(backup) {
        Ok(state) => state,
        // Its run holds the log.
        Err(SessionError::Log(crate::log::LogError::InUse(_))) => {
            return Err(refuse("the backup has not finished yet".into()));
        }
        Err(e) => return Err(refuse(e.to_string())),
    };
    match state.finished {
        Some((Phase::Completed | Phase::PartiallyFailed, _)) => Ok(state),
        Some((p, _)) => Err(refuse(format!("the backup ended {p}: there is nothing to restore"))),
        None => Err(refuse("the backup has not finished yet".into())),
    }
}

fn error_policy(r: Arc<Restore>, e: &RestoreReconcileError, _: Arc<RestoreCtx>) -> Action {
    eprintln!("warning: restore {}/{}: {e} (retrying)", r.namespace().unwrap_or_default(), r.name_any());
    Action::requeue(Duration::from_secs(2))
}

/// Runs the Restore controller until the stream ends (the caller selects it against shutdown).
pub async fn run_controller(api: Api<Restore>, ctx: Arc<RestoreCtx>) {
    let wakes = ctx.wakes.lock().unwrap_or_else(PoisonError::into_inner).take();
    let controller = Controller::new(api, watcher::Config::default());
    let _ = ctx.store.set(controller.store());
    let controller = match wakes {
        Some(w) => controller.reconcile_all_on(w),
        None => controller,
    };
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                super::report_stream_error("restore", &e);
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::CustomResourceExt;
    use serde_json::json;

    fn restore(spec: serde_json::Value) -> Restore {
        let mut r = Restore::new("r", serde_json::from_value(spec).unwrap());
        r.metadata.namespace = Some("ns".into());
        r
    }

    /// A client that sees a Restore's terminal phase sees its end in the metrics too: the status
    /// patcher never sends a finished state; the run sends it after counting.
    #[test]
    fn the_observer_never_sends_a_finished_status() {
        use blockwise_engine::restore_run::RestoreSpec;
        let (tx, rx) = watch::channel::<Option<RestoreStatus>>(None);
        let mut observer = StatusObserver {
            tx,
            base: RestoreStatus::default(),
            last: Instant::now(),
            interval: Duration::ZERO,
            latest: None,
        };
        let requested =
            RestoreEvent::Requested { spec: RestoreSpec::new("r", "b"), source: "s".into(), workers: 1, at_ms: 1 };
        let mut state = RestoreState::fold(&[requested]).unwrap();
        observer.committed(&state);
        assert_eq!(rx.borrow().as_ref().and_then(|s| s.phase.clone()).as_deref(), Some("InProgress"));
        state.finished_ms = Some(2);
        observer.committed(&state);
        assert_eq!(rx.borrow().as_ref().and_then(|s| s.phase.clone()).as_deref(), Some("InProgress"));
    }

    #[test]
    fn the_crd_is_namespaced_with_status_and_velero_names() {
        let crd = serde_json::to_value(Restore::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "restores.blockwise.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for f in ["backupName", "includedNamespaces", "namespaceMapping", "existingResourcePolicy", "restorePVs"] {
            assert!(props.get(f).is_some(), "{f} missing from {props}");
        }
    }

    #[test]
    fn a_velero_spec_converts_and_bad_ones_say_every_reason() {
        let (spec, workers) = restore(json!({"backupName": "b", "namespaceMapping": {"a": "c"},
            "existingResourcePolicy": "update", "restorePVs": true,
            "labelSelector": {"matchLabels": {"app": "x"}}}))
        .to_spec(&Scope::Admin)
        .unwrap();
        assert_eq!((spec.backup_name.as_str(), workers), ("b", WORKERS_DEFAULT));
        assert_eq!(spec.existing_resource_policy, ExistingPolicy::Update);
        assert!(spec.restore_volumes);
        assert_eq!(spec.label_selector.as_deref(), Some("app=x"));
        let errors = restore(json!({"backupName": "", "existingResourcePolicy": "merge", "workers": 0,
            "labelSelector": {"matchExpressions": [{"key": "k", "operator": "Bogus"}]}}))
        .to_spec(&Scope::Admin)
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(!errors.join(" ").contains("--"), "a CLI flag in a CR's status: {errors:?}");
        let mapped = restore(json!({"backupName": "b", "namespaceMapping": {"a": "Bad_NS"}})).to_spec(&Scope::Admin);
        let mapped = mapped.unwrap_err().join(" ");
        assert!(mapped.contains("namespace mappings") && !mapped.contains("--"), "{mapped}");
    }

    /// Issue 21, defect 6: a tenant's Restore lands in its namespace only.
    #[test]
    fn a_tenants_restore_lands_in_its_namespace_only() {
        let tenant = Scope::Tenant("payments".into());
        let (spec, _) = restore(json!({"backupName": "b"})).to_spec(&tenant).unwrap();
        assert_eq!(spec.included_namespaces, ["payments"]);
        let (spec, _) =
            restore(json!({"backupName": "b", "namespaceMapping": {"old": "payments"}})).to_spec(&tenant).unwrap();
        assert_eq!(spec.included_namespaces, ["payments", "old"]);
        let errors = restore(json!({"backupName": "b", "namespaceMapping": {"payments": "identity"},
            "includedNamespaces": ["payments", "kube-system"]}))
        .to_spec(&tenant)
        .unwrap_err()
        .join("\n");
        assert!(errors.contains("spec.namespaceMapping: a Restore in tenant namespace payments restores into payments only, not payments:identity"), "{errors}");
        assert!(errors.contains("not \"payments\", \"kube-system\""), "{errors}");
        // The administrator maps anywhere.
        assert!(restore(json!({"backupName": "b", "namespaceMapping": {"payments": "identity"}}))
            .to_spec(&Scope::Admin)
            .is_ok());
    }
}
