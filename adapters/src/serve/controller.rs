//! `blockwise serve`: the controller of `backups.blockwise.dev`.
//!
//! A kube-runtime [`Controller`] watches Backups (in its own namespace, or — with tenant
//! namespaces, issue 21 — in every namespace, acting only on its own and the tenants'); each reconcile
//! decides from the object and the data directory, and a Backup that should run is run by a task
//! of its own through the same [`Session`] API as the CLI — its log under
//! `<data-dir>/namespaces/<ns>/backups/<name>/log`. Reconcile never waits for a backup.
//!
//! - **Resume, never fail**: a Backup whose log exists and is not finished is opened and resumed
//!   (the engine runs owed post-hooks first), and `status.resumedCount` goes up.
//! - **Status** is computed from the run's own folded state (never from the cached object) and
//!   patched on the `status` subresource at most every `--status-interval` (default
//!   [`STATUS_INTERVAL_MS`]), the latest value
//!   winning; the final status is patched after every earlier patch has finished.
//! - **Deletion**: a finalizer; deleting a Backup that runs lets the run end first (Velero
//!   refuses to delete a backup in progress; cutting the run short would leave a pod frozen and
//!   snapshots half-taken) — one a killed controller left unfinished is resumed to its end — then
//!   deletes the storage snapshots it holds (`csi::delete_retained`), its store files and log,
//!   and removes the finalizer (a failure is counted in `blockwise_gc_failures_total` and
//!   retried). A log of an earlier Backup of the same name is deleted the same way before a new
//!   one starts. Finalizers are changed by
//!   merge patches that carry the object's resourceVersion, so a concurrent change is a conflict
//!   and the reconcile runs again.
//! - **Queue** (Velero 1.18): at most `concurrent_backups` run; a Backup whose included
//!   namespaces may overlap a running one's, or an earlier waiting one's, waits in `Queued` with
//!   `status.queuePosition`.
//! - **One leader**: with leader election, nothing runs until this replica holds the Lease;
//!   losing it ends the process at once with exit code 1 (as client-go's leader election does),
//!   so no write follows the loss, and the next leader resumes every backup from its log. On
//!   SIGTERM or Ctrl-C the controller returns without waiting for running backups (their logs
//!   make them resumable); the caller must not wait for their threads either.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use blockwise_engine::event::{Event, Phase};
use blockwise_engine::ports::Cluster;
use blockwise_engine::service::{
    backup_step, deletion_step, queue_wait, retry_backoff_ms, BackupLook, BackupStep, DeletionStep, LogLook,
    QueueEntry, RunEnd, RunRegistry,
};
use blockwise_engine::state::BackupState;
use blockwise_engine::summary::BackupSummary;
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store as Reflector;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::crd::{
    phase, ArchiveStatus, Backup, BackupStatus, HookStatus, Locations, Progress, Request, Scope, Tenancy, FINALIZER,
};
use super::metrics::{Health, Metrics};
use crate::driver::{Observer, RunError};
use crate::kube::KubeCluster;
use crate::log::LogError;
use crate::report::rfc3339;
use crate::session::{ClusterSource, CreateRequest, DataDir, Session, SessionError};

/// Least time between two status patches of one Backup, by default.
pub const STATUS_INTERVAL_MS: u64 = 1000;
/// How often a Queued Backup is looked at again without a wake-up.
const QUEUE_RECHECK: Duration = Duration::from_secs(5);
/// The field manager of the controller's writes.
pub const FIELD_MANAGER: &str = "blockwise-controller";

/// Leader election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Seconds a lock lasts after its last renewal.
    pub duration_s: u64,
    /// Seconds before expiry the holder renews.
    pub grace_s: u64,
}

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Logs and the default local store.
    pub data_dir: PathBuf,
    /// Kubeconfig (`None`: KUBECONFIG, ~/.kube/config or in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Its context.
    pub context: Option<String>,
    /// The controller's own namespace and its tenant namespaces: CRs elsewhere are ignored.
    pub tenancy: Tenancy,
    /// Backups run at once.
    pub concurrent_backups: usize,
    /// Restores run at once.
    pub concurrent_restores: usize,
    /// Leader election (`None`: this replica runs backups at once).
    pub lease: Option<LeaseConfig>,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub metrics_addr: SocketAddr,
    /// Named stores and the default.
    pub locations: Locations,
    /// Objects per list page.
    pub page_size: u32,
    /// Least time between two status patches of one Backup ([`STATUS_INTERVAL_MS`] by default).
    pub status_interval_ms: u64,
    /// Time between two garbage-collection passes ([`GC_INTERVAL_MS`] by default).
    pub gc_interval_ms: u64,
}

/// Velero's default garbage-collection frequency: one pass an hour.
pub const GC_INTERVAL_MS: u64 = 3_600_000;

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The kubeconfig or client.
    #[error(transparent)]
    Config(#[from] crate::kube::KubeConfigError),
    /// The metrics listener.
    #[error("listening on {addr} for /metrics: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    /// Leader election.
    #[error("leader election (Lease {name}): {message}")]
    Lease { name: String, message: String },
    /// This replica lost the Lease: it stopped at once.
    #[error("lost the Lease {0}: stopped so the new leader can resume the running backups")]
    LostLease(String),
}

/// A reconcile that failed; the controller retries it.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The API.
    #[error("{what}: {}", api_message(.source))]
    Kube { what: String, source: kube::Error },
    /// The data directory.
    #[error("{0}")]
    Session(#[from] SessionError),
}

/// One running backup.
struct Running {
    namespaces: Vec<String>,
}

/// The wait before running again after the `stops`-th stop in a row (the engine's backoff).
pub(super) fn retry_backoff(stops: u32) -> Duration {
    Duration::from_millis(retry_backoff_ms(stops) as u64)
}

type Key = (String, String);

struct Ctx {
    client: Client,
    cfg: ServeConfig,
    source: ClusterSource,
    cluster: Arc<dyn Cluster>,
    metrics: Arc<Metrics>,
    running: Mutex<BTreeMap<Key, Running>>,
    /// Backups (namespace, name, uid) whose runs ended in this process: terminal — whatever a
    /// not-yet-updated cache says — or stopped, to be retried. Pruned by the garbage collector's
    /// passes once the cache shows the end or the Backup is gone, so it stays bounded.
    ended: Mutex<RunRegistry>,
    store: OnceLock<Reflector<Backup>>,
    wake: futures::channel::mpsc::UnboundedSender<()>,
}

impl Ctx {
    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn end_of(&self, b: &Backup) -> Option<RunEnd> {
        let id = (b.namespace().unwrap_or_default(), b.name_any(), b.uid().unwrap_or_default());
        self.ended.lock().unwrap_or_else(PoisonError::into_inner).end_of(&id)
    }

    fn data(&self, ns: &str) -> DataDir {
        DataDir::new(self.cfg.data_dir.join("namespaces").join(ns))
    }
}

impl ReconcileError {
    /// The object is not there (404).
    fn is_gone(&self) -> bool {
        matches!(self, ReconcileError::Kube { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

/// An API error as a person reads it: the server's message and code, not kube's whole record.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        e => e.to_string(),
    }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Kube { what, source }
}

/// Runs the controller until Ctrl-C or SIGTERM (Ok) or the loss of the Lease (Err). `started` is
/// told the metrics address once it listens.
pub async fn run(cfg: ServeConfig, metrics: Arc<Metrics>, started: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let kube = KubeCluster::connect(cfg.kubeconfig.as_deref(), cfg.context.as_deref()).await?;
    let client = kube.client();
    let health = Arc::new(Health::default());
    let (addr, metrics_task) = super::metrics::serve(cfg.metrics_addr, metrics.clone(), health.clone())
        .await
        .map_err(|source| ServeError::Listen { addr: cfg.metrics_addr, source })?;
    started(addr);
    health.set_ready(true);
    let result = lead_then_reconcile(cfg, kube, client, metrics).await;
    metrics_task.abort();
    result
}

async fn lead_then_reconcile(
    cfg: ServeConfig,
    kube: KubeCluster,
    client: Client,
    metrics: Arc<Metrics>,
) -> Result<(), ServeError> {
    let mut leadership = None;
    if let Some(l) = &cfg.lease {
        let lease_err = |e: kube_lease_manager::LeaseManagerError| ServeError::Lease {
            name: format!("{}/{}", l.namespace, l.name),
            message: e.to_string(),
        };
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &l.name)
            .with_namespace(&l.namespace)
            .with_identity(&l.identity)
            .with_duration(l.duration_s)
            .with_grace(l.grace_s)
            .with_field_manager(format!("blockwise-{}", l.identity))
            .build()
            .await
            .map_err(lease_err)?;
        let (mut rx, task) = manager.watch().await;
        eprintln!("standing by: waiting for the Lease {}/{} as {}", l.namespace, l.name, l.identity);
        loop {
            if *rx.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Err(ServeError::Lease { name: l.name.clone(), message: "the lease manager stopped".into() });
                },
                _ = shutdown_signal() => return Ok(()),
            }
        }
        eprintln!("leading: holding the Lease {}/{} as {}", l.namespace, l.name, l.identity);
        leadership = Some((rx, task, format!("{}/{}", l.namespace, l.name)));
    }
    let cluster: Arc<dyn Cluster> = Arc::new(kube);
    let source = ClusterSource::Kube { kubeconfig: cfg.kubeconfig.clone(), context: cfg.context.clone() };
    let api: Api<Backup> = scoped_api(&client, &cfg.tenancy);
    let (wake, wakes) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(Ctx {
        client,
        cfg,
        source,
        cluster,
        metrics,
        running: Mutex::new(BTreeMap::new()),
        ended: Mutex::new(RunRegistry::default()),
        store: OnceLock::new(),
        wake,
    });
    let controller = Controller::new(api, watcher::Config::default()).reconcile_all_on(wakes);
    let _ = ctx.store.set(controller.store());
    let backups = controller.run(reconcile, error_policy, ctx.clone()).for_each(|r| async move {
        if let Err(e) = r {
            super::report_stream_error("backup", &e);
        }
    });
    // Restores beside the backups, into the cluster served (`serve/restores.rs`).
    let restore_api: Api<super::restores::Restore> = scoped_api(&ctx.client, &ctx.cfg.tenancy);
    let restore_ctx = Arc::new(
        super::restores::RestoreCtx::new(
            ctx.client.clone(),
            ctx.cluster.clone(),
            ctx.source.clone(),
            ctx.cfg.data_dir.clone(),
            Duration::from_millis(ctx.cfg.status_interval_ms),
            ctx.metrics.clone(),
            ctx.cfg.tenancy.clone(),
        )
        .with_concurrent_restores(ctx.cfg.concurrent_restores),
    );
    // Schedules, which make Backups and apply their retention rules (`serve/schedules.rs`).
    let (schedule_api, schedule_backups): (Api<super::schedules::Schedule>, Api<Backup>) =
        (scoped_api(&ctx.client, &ctx.cfg.tenancy), scoped_api(&ctx.client, &ctx.cfg.tenancy));
    let schedules = async {
        let Some(backups) = ctx.store.get().cloned() else { return };
        let _ = backups.wait_until_ready().await;
        let sctx = Arc::new(super::schedules::ScheduleCtx {
            client: ctx.client.clone(),
            backups,
            locations: ctx.cfg.locations.clone(),
            tenancy: ctx.cfg.tenancy.clone(),
            metrics: ctx.metrics.clone(),
            started: Mutex::new(BTreeMap::new()),
        });
        super::schedules::run_controller(schedule_api, schedule_backups, sctx).await;
    };
    let work = futures::future::join4(
        backups,
        super::restores::run_controller(restore_api, restore_ctx),
        collect_garbage(ctx.clone()),
        schedules,
    );
    match leadership {
        Some((mut rx, _task, name)) => {
            let lost = async {
                loop {
                    if rx.changed().await.is_err() || !*rx.borrow_and_update() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = work => Ok(()),
                _ = lost => {
                    // Backups run on threads of their own: returning would let them write on
                    // until they noticed. The process ends here, before anything else is sent.
                    eprintln!("error: {}", ServeError::LostLease(name));
                    std::process::exit(1);
                }
                _ = shutdown_signal() => Ok(()),
            }
        }
        None => {
            tokio::select! {
                _ = work => Ok(()),
                _ = shutdown_signal() => Ok(()),
            }
        }
    }
}

/// The API of `K` in the controller's own namespace, or in every namespace when it has tenants
/// (each reconcile then ignores what is outside them).
fn scoped_api<K>(client: &Client, tenancy: &Tenancy) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    if tenancy.watches_all() {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), &tenancy.home)
    }
}

/// The garbage collector: at start and then every `gc_interval_ms`, each Backup in a terminal
/// phase whose `status.expiration` has passed is deleted through the API; its finalizer
/// (`reconcile`) then deletes its store files and log, so a collection interrupted by a kill
/// finishes when the next controller reconciles the deleted object. A failed delete is counted and
/// tried again at the next pass.
async fn collect_garbage(ctx: Arc<Ctx>) {
    // The first pass sees the Backups the cluster holds, not an empty cache.
    if let Some(store) = ctx.store.get() {
        let _ = store.wait_until_ready().await;
    }
    loop {
        let now = crate::world::Runtime::now_ms(&crate::world::TokioRuntime) as i64;
        let backups = ctx.store.get().map(|s| s.state()).unwrap_or_default();
        prune_ended(&ctx, &backups);
        for b in backups {
            let Some(status) = &b.status else { continue };
            if ctx.cfg.tenancy.scope(&b.namespace().unwrap_or_default()).is_none() {
                continue;
            }
            let terminal = status.phase.as_deref().is_some_and(phase::is_terminal);
            let expiration = status.expiration.as_deref().and_then(blockwise_engine::schedule::parse_utc_timestamp);
            if !blockwise_engine::schedule::collectable(terminal, expiration, now)
                || b.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let (ns, name) = (b.namespace().unwrap_or_default(), b.name_any());
            let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
            match api.delete(&name, &kube::api::DeleteParams::default()).await {
                Ok(_) => {
                    ctx.metrics.gc_deleted.inc();
                    eprintln!(
                        "backup {ns}/{name}: expired at {}; deleting it",
                        status.expiration.as_deref().unwrap_or("?")
                    );
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    ctx.metrics.gc_failures.inc();
                    eprintln!("warning: backup {ns}/{name}: deleting the expired backup failed: {}", api_message(&e));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(ctx.cfg.gc_interval_ms.max(100))).await;
    }
}

/// Forgets the runs of Backups that are gone, and the ends the cache already shows (a terminal
/// phase): what is left is what a stale cache could still contradict, or a stop to retry.
fn prune_ended(ctx: &Ctx, backups: &[Arc<Backup>]) {
    let seen: BTreeMap<(String, String, String), bool> = backups
        .iter()
        .map(|b| {
            let id = (b.namespace().unwrap_or_default(), b.name_any(), b.uid().unwrap_or_default());
            (id, b.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(phase::is_terminal))
        })
        .collect();
    ctx.ended.lock().unwrap_or_else(PoisonError::into_inner).prune(|id| seen.get(id).copied());
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn error_policy(b: Arc<Backup>, e: &ReconcileError, _: Arc<Ctx>) -> Action {
    // The process's log is its stderr (`kubectl logs`), one line an event like the runs' own.
    eprintln!("warning: backup {}/{}: {e} (retrying)", b.namespace().unwrap_or_default(), b.name_any());
    Action::requeue(Duration::from_secs(2))
}

/// The merge patch that makes the object's status exactly `status`: fields it leaves unset are
/// sent as null, so an earlier value (a queue position, a failure reason) does not linger.
fn status_patch(status: &BackupStatus) -> serde_json::Value {
    status_merge_patch(
        status,
        &[
            "phase",
            "progress",
            "hookStatus",
            "failureReason",
            "validationErrors",
            "startTimestamp",
            "completionTimestamp",
            "expiration",
            "archive",
            "queuePosition",
            "stopReason",
            "nextRetry",
        ],
    )
}

/// The JSON merge patch that makes an object's status `status`: a merge patch leaves absent fields
/// as they were, so each of `clearable` that `status` leaves unset is sent as `null` (Backups,
/// Restores and Schedules all patch their status this way).
pub(super) fn status_merge_patch<T: serde::Serialize>(status: &T, clearable: &[&str]) -> serde_json::Value {
    let mut v = serde_json::to_value(status).unwrap_or_else(|_| json!({}));
    if let Some(m) = v.as_object_mut() {
        for f in clearable {
            m.entry(*f).or_insert(serde_json::Value::Null);
        }
    }
    json!({ "status": v })
}

/// Patches the status of the Backup `name` whose uid is `uid` (a Backup deleted and created again
/// under the name has another: the API server refuses the patch, so a late write of an earlier
/// run never lands on it); the object as it is after the patch.
async fn patch_status(
    api: &Api<Backup>,
    name: &str,
    uid: &str,
    status: &BackupStatus,
) -> Result<Backup, ReconcileError> {
    let mut body = status_patch(status);
    body["metadata"] = json!({ "uid": uid });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&body))
        .await
        .map_err(kube_err(format!("patching the status of backup {name}")))
}

async fn set_finalizers(api: &Api<Backup>, b: &Backup, finalizers: Vec<String>) -> Result<(), ReconcileError> {
    let body = json!({"metadata": {"finalizers": finalizers, "resourceVersion": b.resource_version()}});
    api.patch(&b.name_any(), &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map_err(kube_err(format!("changing the finalizers of backup {}", b.name_any())))?;
    Ok(())
}

async fn reconcile(b: Arc<Backup>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let ns = b.namespace().unwrap_or_default();
    let name = b.name_any();
    let uid = b.uid().unwrap_or_default();
    let key = (ns.clone(), name.clone());
    let finalizers = b.finalizers().to_vec();
    let scope = ctx.cfg.tenancy.scope(&ns);
    let status = b.status.clone().unwrap_or_default();
    let now = now_ms();
    // What to do is decided by the engine's pure step (`blockwise_engine::service`); this
    // function performs it.
    let look = BackupLook {
        // Outside the controller's namespaces (issue 21): not ours — no finalizer, no status, no run.
        in_scope: scope.is_some(),
        deleting: b.metadata.deletion_timestamp.is_some(),
        finalizer: finalizers.iter().any(|f| f == FINALIZER),
        phase: status.phase.as_deref(),
        running_here: ctx.running().contains_key(&key),
        end: ctx.end_of(&b),
        now_ms: now,
    };
    let step = backup_step(&look);
    let Some(scope) = scope else { return Ok(Action::await_change()) };
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    let data = ctx.data(&ns);
    let stops = match step {
        BackupStep::Ignore | BackupStep::AwaitRunEnd => return Ok(Action::await_change()),
        BackupStep::RetryAt(at) => return Ok(Action::requeue(Duration::from_millis((at - now).max(1) as u64))),
        BackupStep::AddFinalizer { mark_new } => {
            let mut all = finalizers;
            all.push(FINALIZER.into());
            set_finalizers(&api, &b, all).await?;
            if mark_new {
                let status = BackupStatus { phase: Some(phase::NEW.into()), ..BackupStatus::default() };
                patch_status(&api, &name, &uid, &status).await?;
            }
            return Ok(Action::await_change());
        }
        BackupStep::Delete => return delete_backup(&b, finalizers, &scope, &api, &data, &ctx).await,
        BackupStep::Run { stops } => stops,
    };
    let req = match b.to_request(&ctx.cfg.locations, &scope) {
        Ok(r) => r,
        Err(errors) => {
            let status = BackupStatus {
                phase: Some(phase::FAILED_VALIDATION.into()),
                failure_reason: Some(errors.join("; ")),
                validation_errors: errors,
                ..status
            };
            patch_status(&api, &name, &uid, &status).await?;
            // A reconcile from a cache that has not seen this patch yet must not count it again.
            let id = (ns.clone(), name.clone(), b.uid().unwrap_or_default());
            if ctx.ended.lock().unwrap_or_else(PoisonError::into_inner).record(id, RunEnd::Terminal).is_none() {
                ctx.metrics.failure.inc();
            }
            eprintln!("backup {ns}/{name}: FailedValidation: {}", status.failure_reason.unwrap_or_default());
            return Ok(Action::await_change());
        }
    };
    let elsewhere = run_elsewhere(&ctx).await;
    if let Some(position) = queue_of(&b, &req, &ctx, &elsewhere) {
        if status.phase.as_deref() != Some(phase::QUEUED) || status.queue_position != Some(position) {
            let status = BackupStatus { phase: Some(phase::QUEUED.into()), queue_position: Some(position), ..status };
            patch_status(&api, &name, &uid, &status).await?;
        }
        // Woken when a run ends; looked at again now and then in case a wake-up met a stale cache.
        return Ok(Action::requeue(QUEUE_RECHECK));
    }
    match delete_stale_log(&b, &data, &ctx).await {
        Err(ReconcileError::Session(SessionError::Log(damage @ LogError::Damaged { .. }))) => {
            fail_damaged(&api, &b, status, &ctx, &damage).await?;
            return Ok(Action::await_change());
        }
        r => r?,
    }
    start(&b, req, status, &ctx, stops)?;
    Ok(Action::await_change())
}

/// A Backup whose log is damaged can be neither run nor resumed (issue 22): it ends **Failed**
/// with the reason `LogDamaged: …` naming the file and the record, counted once; every other
/// Backup goes on. Deleting it still deletes its store files and finds its storage snapshots
/// without the log ([`DataDir::delete`]).
async fn fail_damaged(
    api: &Api<Backup>,
    b: &Backup,
    status: BackupStatus,
    ctx: &Ctx,
    damage: &LogError,
) -> Result<(), ReconcileError> {
    let (ns, name, uid) = (b.namespace().unwrap_or_default(), b.name_any(), b.uid().unwrap_or_default());
    let status = BackupStatus {
        phase: Some(phase::FAILED.into()),
        failure_reason: Some(format!("{LOG_DAMAGED}: {damage}")),
        ..status
    };
    patch_status(api, &name, &uid, &status).await?;
    let id = (ns.clone(), name.clone(), uid);
    if ctx.ended.lock().unwrap_or_else(PoisonError::into_inner).record(id, RunEnd::Terminal).is_none() {
        ctx.metrics.failure.inc();
    }
    eprintln!("backup {ns}/{name}: Failed: {LOG_DAMAGED}: {damage}");
    Ok(())
}

/// The reason a Backup whose log is damaged failed with.
pub const LOG_DAMAGED: &str = "LogDamaged";

/// A log under this Backup's name that belongs to an earlier Backup of the same name (deleted
/// while no controller ran) is deleted the way a Backup is — its storage snapshots, known only
/// from that log, then its store files and the log — before this one starts.
async fn delete_stale_log(b: &Backup, data: &DataDir, ctx: &Ctx) -> Result<(), ReconcileError> {
    let name = b.name_any();
    let state = match folded_log(data, &name).await {
        // A damaged log is this Backup's (it fails), unless the uid kept beside it says otherwise.
        Err(ReconcileError::Session(SessionError::Log(damage @ LogError::Damaged { .. }))) => {
            match data.recorded_uid(&name) {
                Some(uid) if b.uid().is_none_or(|mine| mine != uid) => {
                    let mut s = BackupSummary::default();
                    s.options.uid = uid;
                    s
                }
                _ => return Err(SessionError::Log(damage).into()),
            }
        }
        r => match r? {
            Some(state) => state,
            None => return Ok(()),
        },
    };
    if b.uid().is_some_and(|u| u == state.options.uid) {
        return Ok(());
    }
    let deleted = delete_off_worker(ctx, data, &name).await.inspect_err(|_| {
        ctx.metrics.gc_failures.inc();
    })?;
    eprintln!(
        "backup {}/{name}: deleted the log of an earlier Backup of this name (uid {}): its {} storage snapshots, store files and log",
        b.namespace().unwrap_or_default(),
        state.options.uid,
        deleted.snapshots
    );
    Ok(())
}

/// Deletes a Backup whose run does not go on here (`BackupStep::Delete`): an unfinished log of it
/// is run to its end first ([`deletion_step`]); then its storage snapshots, store files and log,
/// then the finalizer.
async fn delete_backup(
    b: &Arc<Backup>,
    finalizers: Vec<String>,
    scope: &Scope,
    api: &Api<Backup>,
    data: &DataDir,
    ctx: &Arc<Ctx>,
) -> Result<Action, ReconcileError> {
    let (ns, name, uid) = (b.namespace().unwrap_or_default(), b.name_any(), b.uid().unwrap_or_default());
    let log = match folded_log(data, &name).await {
        Ok(log) => log.map(|state| LogLook {
            same_uid: b.uid().is_some_and(|u| u == state.options.uid),
            finished: state.finished.is_some(),
            stopped: state.stopped.is_some(),
        }),
        // A damaged log cannot be run to its end: deleted as it is.
        Err(ReconcileError::Session(SessionError::Log(LogError::Damaged { .. }))) => {
            Some(LogLook { same_uid: true, finished: true, stopped: false })
        }
        Err(e) => return Err(e),
    };
    // A refused open (another process held the log) is no run that ended here.
    let ran_here = ctx.end_of(b).is_some_and(|e| e.ran());
    if deletion_step(log, ran_here) == DeletionStep::FinishRunFirst {
        if let Ok(req) = b.to_request(&ctx.cfg.locations, scope) {
            eprintln!("backup {ns}/{name}: deletion requested while it runs; it is deleted once its run ends");
            start(b, req, b.status.clone().unwrap_or_default(), ctx, 0)?;
            return Ok(Action::await_change());
        }
    }
    let mut status = b.status.clone().unwrap_or_default();
    let mut current = (**b).clone();
    if status.phase.as_deref() != Some(phase::DELETING) {
        status.phase = Some(phase::DELETING.into());
        // Our own write: the finalizer patch below is conditioned on what it made.
        match patch_status(api, &name, &uid, &status).await {
            Ok(after) => current = after,
            // Already gone: a reconcile of a cached copy after the deletion finished.
            Err(e) if e.is_gone() => return Ok(Action::await_change()),
            Err(e) => return Err(e),
        }
    }
    let deleted = match delete_off_worker(ctx, data, &name).await {
        Ok(d) => d,
        Err(e) => {
            // Retried by the error policy; the finalizer holds the object until it succeeds.
            ctx.metrics.gc_failures.inc();
            return Err(e);
        }
    };
    for gone in &deleted.already_gone {
        eprintln!("backup {ns}/{name}: storage snapshot {gone}: already gone");
    }
    let rest: Vec<String> = finalizers.into_iter().filter(|f| f != FINALIZER).collect();
    match set_finalizers(api, &current, rest).await {
        Ok(()) => {
            eprintln!("backup {ns}/{name}: deleted its {} storage snapshots, store files and log", deleted.snapshots)
        }
        Err(e) if e.is_gone() => {}
        Err(e) => return Err(e),
    }
    let _ = ctx.wake.unbounded_send(());
    Ok(Action::await_change())
}

/// The summary of the log under `name`, if there is one (read on a blocking thread): its uid and
/// whether it finished or stopped are all the deletion paths read of it.
async fn folded_log(data: &DataDir, name: &str) -> Result<Option<BackupSummary>, ReconcileError> {
    let (data, name) = (data.clone(), name.to_string());
    off_worker(move || data.summary_if_any(&name)).await.map_err(ReconcileError::from)
}

/// The InProgress Backups of the cache that this process does not run but whose log another
/// process holds: runs of a paused leader's process (its Lease taken), going on until it ends.
/// Probed off the tokio workers.
async fn run_elsewhere(ctx: &Arc<Ctx>) -> BTreeMap<(String, String), Vec<String>> {
    let candidates: Vec<((String, String), Vec<String>, std::path::PathBuf)> = {
        let running = ctx.running();
        ctx.store
            .get()
            .map(|s| s.state())
            .unwrap_or_default()
            .into_iter()
            .filter(|x| x.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase::IN_PROGRESS))
            .map(|x| (x.namespace().unwrap_or_default(), x.name_any(), x))
            .filter(|(ns, name, _)| !running.contains_key(&(ns.clone(), name.clone())))
            .map(|(ns, name, x)| {
                let dir = ctx.data(&ns).log_dir(&name);
                ((ns, name), x.spec.included_namespaces.clone(), dir)
            })
            .collect()
    };
    if candidates.is_empty() {
        return BTreeMap::new();
    }
    off_worker(move || {
        Ok(candidates
            .into_iter()
            .filter(|(_, _, dir)| crate::log::held(dir))
            .map(|(key, namespaces, _)| (key, namespaces))
            .collect())
    })
    .await
    .unwrap_or_default()
}

/// `Some(position)` when the Backup must wait (see the module docs): the engine's
/// [`queue_position`] over the runs of this process and of another's (`elsewhere`: a paused
/// leader's, still holding their logs) and the earlier waiting Backups of the cache.
fn queue_of(b: &Backup, req: &Request, ctx: &Ctx, elsewhere: &BTreeMap<(String, String), Vec<String>>) -> Option<u32> {
    let running = ctx.running();
    let cached = ctx.store.get().map(|s| s.state()).unwrap_or_default();
    // What the engine's queue reads of each Backup: owned here, borrowed by its entries.
    struct Seen {
        key: (String, String),
        phase: Option<String>,
        deleting: bool,
        created_ms: i64,
        namespaces: Vec<String>,
        ended: bool,
    }
    let created_ms = |x: &Backup| x.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_millisecond());
    let mut seen: Vec<Seen> = cached
        .iter()
        .map(|x| {
            let key = (x.namespace().unwrap_or_default(), x.name_any());
            let namespaces = match running.get(&key) {
                Some(r) => r.namespaces.clone(),
                None => x.spec.included_namespaces.clone(),
            };
            Seen {
                phase: x.status.as_ref().and_then(|s| s.phase.clone()),
                deleting: x.metadata.deletion_timestamp.is_some(),
                created_ms: created_ms(x),
                namespaces,
                ended: ctx.end_of(x) == Some(RunEnd::Terminal),
                key,
            }
        })
        .collect();
    // Runs here the cache does not show (yet, or any more).
    for (key, r) in running.iter() {
        if !seen.iter().any(|x| &x.key == key) {
            let s = Seen {
                key: key.clone(),
                phase: None,
                deleting: false,
                created_ms: 0,
                namespaces: r.namespaces.clone(),
                ended: false,
            };
            seen.push(s);
        }
    }
    let all: Vec<QueueEntry<'_>> = seen
        .iter()
        .map(|x| QueueEntry {
            key: (x.key.0.as_str(), x.key.1.as_str()),
            in_scope: ctx.cfg.tenancy.scope(&x.key.0).is_some(),
            phase: x.phase.as_deref(),
            deleting: x.deleting,
            created_ms: x.created_ms,
            namespaces: &x.namespaces,
            running_here: running.contains_key(&x.key),
            running_elsewhere: elsewhere.contains_key(&x.key),
            ended_here: x.ended,
        })
        .collect();
    let (ns, name) = (b.namespace().unwrap_or_default(), b.name_any());
    let phase = b.status.as_ref().and_then(|s| s.phase.as_deref());
    let mine = QueueEntry {
        key: (ns.as_str(), name.as_str()),
        in_scope: true,
        phase,
        deleting: false,
        created_ms: created_ms(b),
        namespaces: &req.spec.included_namespaces,
        running_here: false,
        running_elsewhere: false,
        ended_here: false,
    };
    queue_wait(&mine, &req.spec.included_namespaces, &all, ctx.cfg.concurrent_backups)
}

/// Starts (or resumes) the Backup's run in a task of its own; `stops`: how many times in a row
/// its runs in this process stopped on an outage (0: this is no retry). The log is opened or
/// created on that task's thread, not on a tokio worker: sled's open and fsync block.
fn start(b: &Backup, req: Request, status: BackupStatus, ctx: &Arc<Ctx>, stops: u32) -> Result<(), ReconcileError> {
    let ns = b.namespace().unwrap_or_default();
    let name = b.name_any();
    let data = ctx.data(&ns);
    let uid = b.uid().unwrap_or_default();
    ctx.running().insert((ns.clone(), name.clone()), Running { namespaces: req.spec.included_namespaces.clone() });
    // Queued Backups move up when one ahead of them starts.
    let _ = ctx.wake.unbounded_send(());
    let ctx = ctx.clone();
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    let handle = tokio::runtime::Handle::current();
    let b_now = b.clone();
    // The driver's future is not `Send` everywhere; a blocking thread of its own runs it.
    tokio::task::spawn_blocking(move || {
        let end = match open_session(&data, &name, &uid, &req, &ctx) {
            Ok((session, resumed)) => {
                let retry_at = handle.block_on(run_backup(session, resumed, req, status, (&api, &uid), &ctx, stops));
                match retry_at {
                    Some(retry_at_ms) => RunEnd::Stopped { stops: stops + 1, retry_at_ms },
                    None => RunEnd::Terminal,
                }
            }
            Err(SessionError::Log(damage @ LogError::Damaged { .. })) => {
                let status = BackupStatus { phase: Some(phase::IN_PROGRESS.into()), ..status };
                match handle.block_on(fail_damaged(&api, &b_now, status, &ctx, &damage)) {
                    Ok(()) => RunEnd::Terminal,
                    Err(e) => {
                        eprintln!("warning: backup {ns}/{name}: {e}");
                        RunEnd::Stopped {
                            stops: stops + 1,
                            retry_at_ms: now_ms() + retry_backoff(stops + 1).as_millis() as i64,
                        }
                    }
                }
            }
            Err(e) => {
                // Tried again after the backoff, as a stopped run is. A log another process holds
                // (a paused leader's run, whose Lease this process took) is a refusal: nothing
                // ran, so a deletion still finishes that run first once the log is free.
                let wait = retry_backoff(stops + 1);
                eprintln!("warning: backup {ns}/{name}: {e} (trying again in {} s)", wait.as_secs());
                let retry_at_ms = now_ms() + wait.as_millis() as i64;
                match e {
                    SessionError::Log(crate::log::LogError::InUse(_)) => {
                        RunEnd::Refused { stops: stops + 1, retry_at_ms }
                    }
                    _ => RunEnd::Stopped { stops: stops + 1, retry_at_ms },
                }
            }
        };
        ctx.ended.lock().unwrap_or_else(PoisonError::into_inner).record((ns.clone(), name.clone(), uid), end);
        ctx.running().remove(&(ns, name));
        let _ = ctx.wake.unbounded_send(());
    });
    Ok(())
}

/// Opens the Backup's log (resumed: it was unfinished) or creates it. Blocking.
fn open_session(
    data: &DataDir,
    name: &str,
    uid: &str,
    req: &Request,
    ctx: &Ctx,
) -> Result<(Session, bool), SessionError> {
    if !data.backup_dir(name).exists() {
        let session = Session::create(
            data,
            CreateRequest {
                spec: req.spec.clone(),
                workers: req.workers,
                options: req.options.clone(),
                source: ctx.source.clone(),
                storage: req.storage.clone(),
            },
        )?;
        return Ok((session, false));
    }
    // The log is read and folded once, by the open.
    let session = Session::open(data, name)?;
    let state = session.state();
    if state.options.uid != uid {
        // `delete_stale_log` runs before every start; a log that changed since is not ours.
        return Err(SessionError::State {
            name: name.to_string(),
            message: format!("its log belongs to another Backup (uid {})", state.options.uid),
        });
    }
    // A finished log whose status was not reported (a kill between the two) is reported, not
    // resumed.
    let resumed = state.resumable();
    Ok((session, resumed))
}

/// Runs blocking file work (sled opens and folds, directory removal, a deletion's file part) on
/// a blocking thread, so a reconcile never holds a tokio worker the Lease's renewal needs (the
/// Backup and Restore controllers both use it).
pub(super) async fn off_worker<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SessionError> + Send + 'static,
) -> Result<T, SessionError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(SessionError::State { name: String::new(), message: format!("a blocking task failed: {e}") })
    })
}

/// [`DataDir::delete`] on a blocking thread (its CSI calls driven from there).
async fn delete_off_worker(ctx: &Ctx, data: &DataDir, name: &str) -> Result<crate::session::Deleted, ReconcileError> {
    let (data, name, cluster) = (data.clone(), name.to_string(), ctx.cluster.clone());
    let handle = tokio::runtime::Handle::current();
    Ok(off_worker(move || {
        let runtime = crate::world::TokioRuntime;
        handle.block_on(data.delete(&name, Some((cluster.as_ref(), &runtime))))
    })
    .await?)
}

/// The status of a run, from its folded state.
fn status_of(state: &BackupState, base: &BackupStatus, ttl_ms: Option<u64>) -> BackupStatus {
    let all_done = state.plan_finished && state.all_blocks_finished();
    let phase = match state.finished {
        Some((p, _)) => p.to_string(),
        // Stopped by an outage: resumed with backoff, never Failed for it (issue 21).
        None if state.stopped.is_some() => phase::IN_PROGRESS.into(),
        None if state.waiting_for_snapshots() => phase::WAITING_FOR_SNAPSHOTS.into(),
        None if all_done => phase::FINALIZING.into(),
        None => phase::IN_PROGRESS.into(),
    };
    let (mut attempted, mut failed) = (0u32, 0u32);
    for (_, b) in state.blocks.held() {
        if let Some(a) = &b.attempt {
            attempted += a.hooks_started.len() as u32;
            failed += a.hooks_finished.values().filter(|o| !o.ok()).count() as u32;
        }
    }
    BackupStatus {
        phase: Some(phase),
        progress: Some(Progress {
            total_items: state.planned_items,
            items_backed_up: state.items_done(),
            total_blocks: state.blocks.len() as u64,
            blocks_done: state.blocks_done() as u64,
        }),
        hook_status: Some(HookStatus { hooks_attempted: attempted, hooks_failed: failed }),
        warnings: state.warnings.len() as u32,
        errors: state.errors.len() as u32,
        failure_reason: base.failure_reason.clone(),
        stop_reason: state.stopped.clone(),
        next_retry: None,
        retry_count: base.retry_count,
        validation_errors: Vec::new(),
        start_timestamp: Some(rfc3339(state.requested_ms)),
        completion_timestamp: state.finished.map(|(_, t)| rfc3339(t)),
        expiration: ttl_ms.map(|t| rfc3339(blockwise_engine::schedule::expiration_ms(state.requested_ms, t))),
        archive: state
            .archive
            .as_ref()
            .map(|a| ArchiveStatus { sha256: a.digest.iter().map(|b| format!("{b:02x}")).collect(), bytes: a.bytes }),
        resumed_count: base.resumed_count,
        queue_position: None,
    }
}

/// Sends the run's status to the patcher (at most every status interval) and keeps the
/// hook, block and flush metrics.
struct StatusObserver {
    tx: watch::Sender<Option<BackupStatus>>,
    base: BackupStatus,
    ttl_ms: Option<u64>,
    metrics: Arc<Metrics>,
    last: Option<Instant>,
    interval: Duration,
    hook_started: BTreeMap<(u32, u32, String), u64>,
    in_flight: i64,
    /// The last status sent: a run that stops reports its progress from here, not from its start.
    latest: Option<BackupStatus>,
}

impl Observer for StatusObserver {
    fn event(&mut self, event: &Event, _state: &BackupState) {
        match event {
            Event::HookStarted { block, attempt, hook, at_ms } => {
                self.hook_started.insert((*block, *attempt, format!("{hook:?}")), *at_ms);
            }
            Event::HookFinished { block, attempt, hook, outcome, at_ms } => {
                if let Some(t) = self.hook_started.remove(&(*block, *attempt, format!("{hook:?}"))) {
                    self.metrics.hook_duration.observe(at_ms.saturating_sub(t) as f64 / 1000.0);
                }
                if !outcome.ok() {
                    self.metrics.hook_failures.inc();
                }
            }
            _ => {}
        }
    }

    fn flushed(&mut self, took: Duration) {
        self.metrics.log_flush.observe(took.as_secs_f64());
    }

    fn committed(&mut self, state: &BackupState) {
        let in_flight = state.blocks.held().filter(|(_, b)| b.in_flight()).count() as i64;
        self.metrics.blocks_in_flight.inc_by(in_flight - self.in_flight);
        self.in_flight = in_flight;
        // A finished state's status goes out from the run, after its end is counted: a client
        // that sees the terminal phase then sees its metrics too.
        let due = self.last.is_none_or(|t| t.elapsed() >= self.interval);
        if due && state.finished.is_none() {
            self.last = Some(Instant::now());
            let status = status_of(state, &self.base, self.ttl_ms);
            self.latest = Some(status.clone());
            let _ = self.tx.send(Some(status));
        }
    }
}

/// Runs a Backup to its end and reports it. `Some(when)`: the run stopped on an outage (the store
/// or the log failed after their retries; its log is resumable) and is to be resumed then — the
/// phase stays InProgress with the reason, as `blockwise backup resume` would continue it.
async fn run_backup(
    session: Session,
    resumed: bool,
    req: Request,
    status: BackupStatus,
    (api, uid): (&Api<Backup>, &str),
    ctx: &Ctx,
    stops: u32,
) -> Option<i64> {
    let name = session.name().to_string();
    let ns = api_namespace(api);
    let mut base = status;
    base.queue_position = None;
    if !session.state().resumable() {
        eprintln!("backup {ns}/{name}: its log had finished before its status was reported; reporting it");
    } else if stops > 0 {
        // At least this process's stops in a row: while status patches fail (a hung server)
        // the status read back does not count the retries before.
        base.retry_count = (base.retry_count + 1).max(stops);
        eprintln!("backup {ns}/{name}: resuming after {stops} stop(s) (retry {})", base.retry_count);
    } else if resumed {
        base.resumed_count += 1;
        ctx.metrics.resumed.inc();
        eprintln!("backup {ns}/{name}: resuming from its log (resume {})", base.resumed_count);
    } else {
        ctx.metrics.attempt.inc();
        eprintln!("backup {ns}/{name}: started");
    }
    let first = status_of(session.state(), &base, req.ttl_ms);
    // A finished log's terminal status goes out once, after its end is counted.
    if session.state().resumable() {
        if let Err(e) = patch_status(api, &name, uid, &first).await {
            eprintln!("warning: backup {ns}/{name}: {e}");
        }
    }
    let (tx, mut rx) = watch::channel::<Option<BackupStatus>>(None);
    let patcher = {
        let (api, name, uid) = (api.clone(), name.clone(), uid.to_string());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let latest = rx.borrow_and_update().clone();
                if let Some(s) = latest {
                    if let Err(e) = patch_status(&api, &name, &uid, &s).await {
                        eprintln!("warning: backup {name}: {e}");
                    }
                }
            }
        })
    };
    let mut observer = StatusObserver {
        tx,
        base: base.clone(),
        ttl_ms: req.ttl_ms,
        metrics: ctx.metrics.clone(),
        last: Some(Instant::now()),
        interval: Duration::from_millis(ctx.cfg.status_interval_ms),
        hook_started: BTreeMap::new(),
        in_flight: 0,
        latest: None,
    };
    let finished = session.state().clone();
    let store = match session.store() {
        Ok(s) => s,
        Err(e) => {
            drop(observer);
            let _ = patcher.await;
            return stopped((api, uid), &ns, &name, first, format!("opening the store: {e}"), stops).await;
        }
    };
    let result = if !finished.resumable() {
        // The log finished before the status said so: store its files again, report it.
        session.store_files(store).await
    } else {
        session.run(ctx.cluster.clone(), store, req.workers, ctx.cfg.page_size, &mut observer).await
    };
    let in_flight = observer.in_flight;
    ctx.metrics.blocks_in_flight.dec_by(in_flight);
    let last_seen = observer.latest.take().unwrap_or_else(|| first.clone());
    drop(observer);
    let _ = patcher.await;
    let end = match result {
        Ok(state) => {
            let s = status_of(&state, &base, req.ttl_ms);
            let secs = state.finished.map_or(0, |(_, t)| t.saturating_sub(state.requested_ms)) as f64 / 1000.0;
            ctx.metrics.duration.observe(secs);
            ctx.metrics.items.inc_by(state.items_done());
            match state.phase() {
                Phase::Completed => {
                    ctx.metrics.success.inc();
                    let now =
                        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    ctx.metrics.last_successful.set(now as i64);
                }
                Phase::PartiallyFailed => {
                    ctx.metrics.partial_failure.inc();
                }
                _ => {
                    ctx.metrics.failure.inc();
                }
            }
            if let Some(a) = &state.archive {
                ctx.metrics.tarball_size.set(a.bytes as i64);
            }
            s
        }
        Err(e @ (RunError::Stopped(_) | RunError::Log(_) | RunError::Files { .. })) => {
            let reason = match e {
                RunError::Files { file, source } => format!("storing {file} failed: {source}"),
                e => e.to_string(),
            };
            return stopped((api, uid), &ns, &name, last_seen, reason, stops).await;
        }
        Err(e) => {
            ctx.metrics.failure.inc();
            BackupStatus { phase: Some(phase::FAILED.into()), failure_reason: Some(e.to_string()), ..first }
        }
    };
    eprintln!("backup {ns}/{name}: {}", end.phase.as_deref().unwrap_or("?"));
    if let Err(e) = patch_status(api, &name, uid, &end).await {
        eprintln!("warning: backup {ns}/{name}: {e}");
    }
    None
}

/// Reports a run stopped by an outage (InProgress, the reason, when it is resumed); that instant.
async fn stopped(
    (api, uid): (&Api<Backup>, &str),
    ns: &str,
    name: &str,
    last: BackupStatus,
    reason: String,
    stops: u32,
) -> Option<i64> {
    let wait = retry_backoff(stops + 1);
    let now_ms = crate::world::Runtime::now_ms(&crate::world::TokioRuntime);
    let status = BackupStatus {
        phase: Some(phase::IN_PROGRESS.into()),
        stop_reason: Some(reason.clone()),
        next_retry: Some(rfc3339(now_ms + wait.as_millis() as u64)),
        ..last
    };
    eprintln!("backup {ns}/{name}: stopped ({reason}); resuming it in {} s", wait.as_secs());
    if let Err(e) = patch_status(api, name, uid, &status).await {
        eprintln!("warning: backup {ns}/{name}: {e}");
    }
    Some(now_ms as i64 + wait.as_millis() as i64)
}

/// The wall clock, in milliseconds (the retries' instants are on it, as the pure step's are).
fn now_ms() -> i64 {
    crate::world::Runtime::now_ms(&crate::world::TokioRuntime) as i64
}

fn api_namespace(api: &Api<Backup>) -> String {
    api.resource_url().split('/').skip_while(|s| *s != "namespaces").nth(1).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21, defect 11: blocking file work leaves the runtime's workers free. On a runtime
    /// with a single worker, the work waits for a message that only a task on that worker sends:
    /// run on the worker itself, it would wait out the timeout (the Lease's renewal, starved).
    #[test]
    fn blocking_work_runs_off_the_workers() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let got = rt.block_on(async {
            let (tx, rx) = std::sync::mpsc::channel::<&str>();
            let renewal = tokio::spawn(async move { tx.send("renewed").ok() });
            let work = off_worker(move || {
                rx.recv_timeout(Duration::from_secs(30))
                    .map_err(|e| SessionError::State { name: "probe".into(), message: e.to_string() })
            });
            let got = work.await;
            renewal.await.ok();
            got
        });
        assert_eq!(got.unwrap(), "renewed");
    }

    /// A client that sees a Backup's terminal phase sees its end in the metrics too: the status
    /// patcher never sends a finished state (seen once as a flaky e2e, the success counter read
    /// as 0 after Completed); the run sends it after counting.
    #[test]
    fn the_observer_never_sends_a_finished_status() {
        use blockwise_engine::spec::BackupSpec;
        let (tx, rx) = watch::channel::<Option<BackupStatus>>(None);
        let mut observer = StatusObserver {
            tx,
            base: BackupStatus::default(),
            ttl_ms: None,
            metrics: Arc::new(Metrics::new()),
            last: None,
            interval: Duration::ZERO,
            hook_started: BTreeMap::new(),
            in_flight: 0,
            latest: None,
        };
        let mut events = vec![Event::BackupRequested { spec: BackupSpec::new("b"), workers: 1, at_ms: 1 }];
        observer.committed(&BackupState::fold(&events).unwrap());
        assert_eq!(rx.borrow().as_ref().and_then(|s| s.phase.clone()).as_deref(), Some("InProgress"));
        events.push(Event::BackupFinished { phase: Phase::Completed, at_ms: 2 });
        observer.committed(&BackupState::fold(&events).unwrap());
        assert_eq!(rx.borrow().as_ref().and_then(|s| s.phase.clone()).as_deref(), Some("InProgress"));
    }

    #[test]
    fn a_status_patch_clears_what_the_status_leaves_unset() {
        let p = status_patch(&BackupStatus { phase: Some("InProgress".into()), ..BackupStatus::default() });
        assert_eq!(p["status"]["phase"], "InProgress");
        assert!(p["status"]["queuePosition"].is_null() && p["status"].get("queuePosition").is_some());
        assert_eq!(p["status"]["resumedCount"], 0);
    }

    /// Issue 21, defect 8: the expiration counts from the start, not from the completion.
    #[test]
    fn the_expiration_is_the_start_plus_the_ttl() {
        use blockwise_engine::spec::BackupSpec;
        let start = 1_767_225_600_000u64; // 2026-01-01T00:00:00Z
        let events = [
            Event::BackupRequested { spec: BackupSpec::new("b"), workers: 1, at_ms: start },
            Event::BackupFinished { phase: Phase::Completed, at_ms: start + 5 * 3_600_000 },
        ];
        let state = BackupState::fold(&events).unwrap();
        let s = status_of(&state, &BackupStatus::default(), Some(3_600_000));
        assert_eq!(s.start_timestamp.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(s.completion_timestamp.as_deref(), Some("2026-01-01T05:00:00Z"));
        assert_eq!(s.expiration.as_deref(), Some("2026-01-01T01:00:00Z"), "start + ttl, not completion + ttl");
        // The longest TTL a spec can hold does not wrap.
        let s = status_of(&state, &BackupStatus::default(), Some(blockwise_engine::hooks::DURATION_MS_MAX));
        assert!(s.expiration.as_deref().is_some_and(|e| e.starts_with("2318-")), "{:?}", s.expiration);
    }
}
