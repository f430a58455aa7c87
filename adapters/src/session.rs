//! Backups in a data directory: the layout, crash-atomic creation, resume, and a live view.
//!
//! The CLI and the in-cluster controller both go through [`Session`]; neither knows the layout:
//!
//! ```text
//! <data-dir>/backups/<name>/log/          the sled event log (the backup's truth)
//! <data-dir>/backups/<name>/cluster.json  where the cluster is (ClusterSource; never credentials)
//! <data-dir>/backups/<name>/storage.json  where the store is (StorageSpec; never credentials)
//! <data-dir>/backups/<name>/uid.json      its uid, for deleting it when its log is damaged
//! <data-dir>/backups/<name>/status.json   live view for describe/get while a run holds the log
//! <data-dir>/backups/<name>/events.log    live view for logs (one line per durable event)
//! <data-dir>/store/                        the default local store
//! <data-dir>/tmp/                          scratch (S3 archive builds)
//! ```
//!
//! **A backup exists exactly when its log holds a durable `BackupRequested`.** [`Session::create`]
//! builds the directory under a temporary name (`backups/.new-<name>-<pid>`), records and flushes
//! the request there, and only then renames it into place, so a kill at any instant leaves either
//! no backup or a resumable one; a leftover directory without a durable request (from a kill, or
//! from an older version) is removed by the next `create` of that name. [`Session::open`] reads a
//! log back (cutting a torn tail) for `resume`; [`Session::run`] drives it to the end with the one
//! driver, keeping `status.json` and `events.log` current (at most every
//! [`STATUS_INTERVAL_MS`]) so `describe`, `get` and `logs` can show a running backup that another
//! process holds open.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use blockwise_engine::event::{Event, Phase, Seq};
use blockwise_engine::ports::Cluster;
use blockwise_engine::snapshot::BackupOptions;
use blockwise_engine::spec::{validate_backup_name, BackupSpec, SpecError};
use blockwise_engine::state::{BackupState, Folding};
use blockwise_engine::summary::BackupSummary;
use blockwise_engine::{Engine, EngineConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::driver::{run_backup, Observer, RunError, World};
use crate::faults::{FaultPlan, FaultyStore};
use crate::log::{EventLog, LogError, OpenReport};
use crate::report;
use crate::retry::{RetryPolicy as ClusterRetryPolicy, RetryingCluster};
use crate::s3::{S3Config, S3Location, S3Store};
use crate::store::{LocalStore, RetryPolicy, RetryingStore, Store, StoreError};
use crate::world::{Runtime, TokioRuntime};

/// Least time between two rewrites of `status.json` during a run.
pub const STATUS_INTERVAL_MS: u64 = 500;

/// A rewrite of `status.json` waits this many times as long as the last one took: its `describe`
/// names every snapshot (~17 MB of a 22 MB file half way through a million objects), and
/// rewriting it every 500 ms took most of a core from the backup it describes.
pub const STATUS_COST_FACTOR: u32 = 20;

/// Where a backup's cluster came from, recorded so `resume` talks to the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ClusterSource {
    /// The built-in demo cluster.
    Demo {
        /// Objects generated.
        objects: usize,
        /// Generator seed.
        seed: u64,
        /// Simulated latency per API call and exec.
        latency_ms: u64,
        /// With the demo's deliberate faults (a failing Fail-mode pre-hook).
        #[serde(default)]
        faults: bool,
    },
    /// A real cluster (or the fake API server) through kube-rs. Never holds credentials: `resume`
    /// reads the same kubeconfig again.
    Kube {
        /// The kubeconfig named by `--kubeconfig` (absolute); `None`: KUBECONFIG, ~/.kube/config or
        /// in-cluster, looked up again on resume.
        kubeconfig: Option<PathBuf>,
        /// The context named by `--context`; `None`: the kubeconfig's current-context.
        context: Option<String>,
    },
}

/// Where a backup's store is, recorded in `storage.json` so later commands use the same one.
/// Holds no credentials: those always come from the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StorageSpec {
    /// A local directory; `None` is `<data-dir>/store`.
    Local {
        /// The directory, absolute.
        #[serde(default)]
        root: Option<PathBuf>,
    },
    /// An S3-compatible bucket.
    S3(S3Location),
}

/// Why a session could not be created, opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The name or spec is not acceptable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No backup (or restore: `what`) of that name exists.
    #[error("{what} {name:?} not found in {}", .data_dir.display())]
    NotFound { what: &'static str, name: String, data_dir: PathBuf },
    /// `create` of a name that is taken.
    #[error("backup {name} already exists ({phase})")]
    Exists { name: String, phase: Phase },
    /// `create` of a backup that was interrupted.
    #[error("backup {name} is InProgress (interrupted): run `blockwise backup resume {name}` to continue it")]
    Interrupted { name: String },
    /// `create` of a backup that stopped on a store failure.
    #[error("backup {name} stopped ({reason}): run `blockwise backup resume {name}` to continue it")]
    Stopped { name: String, reason: String },
    /// The log.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The log's events do not fold or resume.
    #[error("backup {name}: {message}")]
    State { name: String, message: String },
    /// A file of the backup.
    #[error("{what} {}: {message}", .path.display())]
    File { what: &'static str, path: PathBuf, message: String },
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `restore create` of a name that is taken.
    #[error("restore {name}: {message}")]
    Restore { name: String, message: String },
    /// A restore's log does not fold.
    #[error("restore {name}: {message}")]
    RestoreState { name: String, message: String },
}

impl SessionError {
    /// Whether the user's input (a name, a flag) is what is wrong, rather than the system.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            SessionError::Spec(_)
                | SessionError::NotFound { .. }
                | SessionError::Exists { .. }
                | SessionError::Interrupted { .. }
                | SessionError::Stopped { .. }
                | SessionError::Restore { .. }
                | SessionError::Store(StoreError::BadLocation { .. })
        )
    }
}

pub(crate) fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SessionError + 'a {
    move |e| SessionError::File { what, path: path.to_path_buf(), message: e.to_string() }
}

/// The sorted names of the entries of `dir` that do not start with a dot (a missing directory has
/// none): backups and restores, without the temporary directories of their creations.
pub(crate) fn entry_names(dir: &Path) -> Result<Vec<String>, SessionError> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(file_err("reading", dir)(e)),
    };
    names.sort();
    Ok(names)
}

/// A data directory: see the module docs.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the backups' directories are.
    pub fn backups(&self) -> PathBuf {
        self.root.join("backups")
    }

    /// The directory of one backup.
    pub fn backup_dir(&self, name: &str) -> PathBuf {
        self.backups().join(name)
    }

    /// The event log of one backup.
    pub fn log_dir(&self, name: &str) -> PathBuf {
        self.backup_dir(name).join("log")
    }

    /// The default local store.
    pub fn default_store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// The demo cluster's written objects and snapshot controller of backup `name`: the cluster's
    /// state outlives a killed process, as a real cluster's would.
    pub fn demo_cluster_state(&self, name: &str) -> PathBuf {
        self.backup_dir(name).join("demo-cluster.json")
    }

    /// The demo cluster's exec record of one backup (it survives a SIGKILL; tests read it).
    pub fn demo_exec_log(&self, name: &str) -> PathBuf {
        self.backup_dir(name).join("demo-exec.jsonl")
    }

    /// The names of every backup directory, sorted (temporary directories of a create are not
    /// backups).
    pub fn names(&self) -> Result<Vec<String>, SessionError> {
        entry_names(&self.backups())
    }

    /// The storage a backup was created with (`storage.json`; before it existed: the default).
    pub fn storage(&self, name: &str) -> Result<StorageSpec, SessionError> {
        let path = self.backup_dir(name).join("storage.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SessionError::File {
                what: "parsing",
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StorageSpec::Local { root: None }),
            Err(e) => Err(file_err("reading", &path)(e)),
        }
    }

    /// The cluster a backup was created with (`cluster.json`).
    pub fn source(&self, name: &str) -> Result<ClusterSource, SessionError> {
        let path = self.backup_dir(name).join("cluster.json");
        let text = std::fs::read_to_string(&path).map_err(file_err("reading", &path))?;
        serde_json::from_str(&text).map_err(|e| SessionError::File { what: "parsing", path, message: e.to_string() })
    }

    /// The store of a storage spec: fault injection (debug builds, when asked) under bounded
    /// retries.
    pub fn open_store(&self, spec: &StorageSpec) -> Result<Arc<dyn Store>, SessionError> {
        let base: Arc<dyn Store> = match spec {
            StorageSpec::Local { root } => {
                Arc::new(LocalStore::new(root.clone().unwrap_or_else(|| self.default_store())))
            }
            StorageSpec::S3(loc) => Arc::new(S3Store::new(S3Config::new(loc.clone(), self.root.join("tmp")))?),
        };
        let plan = FaultPlan::from_env().map_err(|message| SessionError::File {
            what: "reading the fault plan of",
            path: PathBuf::from(crate::faults::FAULT_ENV),
            message,
        })?;
        let base: Arc<dyn Store> = match plan {
            Some(plan) => Arc::new(FaultyStore::new(base, plan)),
            None => base,
        };
        Ok(Arc::new(RetryingStore::new(base, RetryPolicy::default(), Arc::new(TokioRuntime))))
    }

    /// Deletes a backup: the storage snapshots it holds (through `cluster`, its cluster — see
    /// [`crate::csi::delete_retained`]), its files in its store, then its directory (log
    /// included). Nothing is left that `names` or `status` would find; deleting a backup that is
    /// not there is no error, and a deletion stopped halfway is finished by running it again (the
    /// log goes last, so the snapshots are still known). A backup that holds snapshots cannot be
    /// deleted without its cluster (`cluster` `None`): an error says so and nothing is deleted.
    pub async fn delete(
        &self,
        name: &str,
        cluster: Option<(&dyn Cluster, &dyn Runtime)>,
    ) -> Result<Deleted, SessionError> {
        validate_backup_name(name)?;
        let state = match self.fold(name) {
            Ok(state) => Some(state),
            Err(SessionError::NotFound { .. }) => None,
            Err(SessionError::Log(damage @ LogError::Damaged { .. })) => {
                let deleted = self.delete_damaged_snapshots(name, &damage, cluster).await?;
                self.delete_files(name).await?;
                return Ok(deleted);
            }
            Err(e) => return Err(e),
        };
        let retained = state.as_ref().map(BackupState::retained_snapshots).unwrap_or_default();
        let deleted = match (&state, retained.is_empty()) {
            (Some(state), false) => {
                let Some(access) = cluster else {
                    return Err(SessionError::State {
                        name: name.into(),
                        message: format!("holds {} storage snapshots: deleting it needs its cluster", retained.len()),
                    });
                };
                self.delete_snapshots(name, state, &retained, access).await?
            }
            _ => Deleted::default(),
        };
        self.delete_files(name).await?;
        Ok(deleted)
    }

    /// Deletes `retained`, storage snapshots of backup `name` (whose state, or what of it could be
    /// read, is `state`), through its cluster.
    async fn delete_snapshots(
        &self,
        name: &str,
        state: &BackupState,
        retained: &[blockwise_engine::state::RetainedSnapshot],
        (cluster, runtime): (&dyn Cluster, &dyn Runtime),
    ) -> Result<Deleted, SessionError> {
        let mut deleted = Deleted::default();
        {
            let (contents, snapshots) = snapshot_types(state);
            let d = crate::csi::RetainedDeletion {
                cluster,
                runtime,
                contents: &contents,
                snapshots: &snapshots,
                backup: name,
                uid: &state.options.uid,
                timeout_ms: state.options.csi_snapshot_timeout_ms.max(1),
            };
            let all = crate::csi::delete_all_retained(&d, retained).await;
            let mut errors = Vec::new();
            for (r, outcome) in retained.iter().zip(all) {
                match outcome {
                    Ok(crate::csi::SnapshotDeletion::Deleted) => deleted.snapshots += 1,
                    Ok(crate::csi::SnapshotDeletion::AlreadyGone(m)) => {
                        deleted.already_gone.push(format!("{} ({}/{}): {m}", r.handle, r.namespace, r.snapshot))
                    }
                    Err(e) => errors.push(e),
                }
            }
            if !errors.is_empty() {
                return Err(SessionError::State {
                    name: name.into(),
                    message: format!(
                        "deleting {} of its {} storage snapshots failed (run the deletion again): {}",
                        errors.len(),
                        retained.len(),
                        errors.join("; ")
                    ),
                });
            }
        }
        Ok(deleted)
    }

    /// The uid recorded beside backup `name`'s log at its creation (`None` for one created before
    /// it was kept, or none there).
    pub fn recorded_uid(&self, name: &str) -> Option<String> {
        let bytes = std::fs::read(self.backup_dir(name).join(UID_FILE)).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        v["uid"].as_str().filter(|u| !u.is_empty()).map(str::to_string)
    }

    /// The storage snapshots of a backup whose log is damaged (issue 22), found without trusting
    /// the log: those its verified prefix recorded, those its store's
    /// `<name>-csi-volumesnapshotcontents.json.gz` lists (a finished backup's, released from the
    /// cluster), and every VolumeSnapshotContent in the cluster labelled with its uid (one that was
    /// still being cut) — then deleted as any backup's are.
    async fn delete_damaged_snapshots(
        &self,
        name: &str,
        damage: &LogError,
        cluster: Option<(&dyn Cluster, &dyn Runtime)>,
    ) -> Result<Deleted, SessionError> {
        tracing::warn!("backup {name}: {damage}; finding its storage snapshots without its log");
        let prefix = crate::log::salvage(&self.log_dir(name));
        let mut state = BackupState::default();
        for e in &prefix {
            if state.apply(e).is_err() {
                break;
            }
        }
        if state.options.uid.is_empty() {
            state.options.uid = self.recorded_uid(name).unwrap_or_default();
        }
        if state.options.csi_snapshot_timeout_ms == 0 {
            state.options.csi_snapshot_timeout_ms = BackupOptions::default().csi_snapshot_timeout_ms;
        }
        let Some((cluster, runtime)) = cluster else {
            return Err(SessionError::State {
                name: name.into(),
                message: format!("{damage}: deleting it needs its cluster, to find its storage snapshots there"),
            });
        };
        let mut retained = state.retained_snapshots();
        let from_contents = |v: &Value| {
            let text = |p: &str| v.pointer(p).and_then(Value::as_str);
            crate::csi::retained_of(
                v,
                text("/spec/volumeSnapshotRef/namespace")?,
                text("/spec/volumeSnapshotRef/name")?,
            )
        };
        let store = self.open_store(&self.storage(name)?)?;
        let file = format!("{name}-csi-volumesnapshotcontents.json.gz");
        if let Some(gz) = store.get_file(name, &file).await? {
            let listed: Value = crate::inspect::gunzip(&gz, &file)
                .ok()
                .and_then(|text| serde_json::from_slice(&text).ok())
                .unwrap_or_default();
            retained.extend(listed.as_array().into_iter().flatten().filter_map(from_contents));
        }
        if !state.options.uid.is_empty() {
            let (contents, snapshots) = snapshot_types(&state);
            let found = crate::csi::labelled_snapshots(cluster, &contents, &snapshots, &state.options.uid)
                .await
                .map_err(|message| SessionError::State { name: name.into(), message })?;
            retained.extend(found);
        }
        let mut seen = std::collections::BTreeSet::new();
        retained.retain(|r| seen.insert(r.handle.clone()));
        self.delete_snapshots(name, &state, &retained, (cluster, runtime)).await
    }

    /// Deletes a backup's files in its store, then its directory (log included).
    async fn delete_files(&self, name: &str) -> Result<(), SessionError> {
        match self.storage(name)? {
            StorageSpec::Local { root } => {
                let dir = root.unwrap_or_else(|| self.default_store()).join("backups").join(name);
                remove_tree(&dir)?;
            }
            StorageSpec::S3(loc) => {
                S3Store::new(S3Config::new(loc, self.root.join("tmp")))?.delete_backup(name).await?;
            }
        }
        remove_tree(&self.backup_dir(name))?;
        Ok(())
    }

    /// Calls `f` with each event of a backup's log in order, one at a time: nothing is held but the
    /// current record, and nothing is written (a torn tail is left for `resume` to cut). A log
    /// without a durable request is no backup: not found.
    pub fn each_event(&self, name: &str, mut f: impl FnMut(Seq, Event)) -> Result<(), SessionError> {
        validate_backup_name(name)?;
        let dir = self.log_dir(name);
        let not_found = || SessionError::NotFound { what: "backup", name: name.into(), data_dir: self.root.clone() };
        if !dir.exists() {
            return Err(not_found());
        }
        let mut any = false;
        match crate::log::scan_events(&dir, |seq, e| {
            any = true;
            f(seq, e)
        }) {
            Ok(()) if !any => Err(not_found()),
            Ok(()) => Ok(()),
            Err(LogError::NotFound(_)) => Err(not_found()),
            Err(e) => Err(e.into()),
        }
    }

    /// A backup's state, folded from its log as it is read ([`DataDir::each_event`]: the events are
    /// never held together).
    pub fn fold(&self, name: &str) -> Result<BackupState, SessionError> {
        let mut folding = Folding::default();
        self.each_event(name, |_, e| folding.push(&e))?;
        folding.finish().map_err(|e| SessionError::State { name: name.into(), message: e.to_string() })
    }

    /// A backup's summary (what `get` and `describe` show: [`BackupSummary`]), folded as its log is
    /// read, in memory that does not grow with the backup's objects. The full fold
    /// ([`DataDir::fold`]) checks that every event fits the ones before; this one shows what the
    /// events say.
    pub fn summary(&self, name: &str) -> Result<BackupSummary, SessionError> {
        let mut summary = BackupSummary::default();
        self.each_event(name, |_, e| summary.push(&e))?;
        Ok(summary)
    }

    /// [`DataDir::summary`], or `None` when no backup of that name exists.
    pub fn summary_if_any(&self, name: &str) -> Result<Option<BackupSummary>, SessionError> {
        match self.summary(name) {
            Ok(summary) => Ok(Some(summary)),
            Err(SessionError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`DataDir::summary`] of backup `name`, or — another process runs it, or this disk cannot
    /// open its log — the live view its last run kept ([`DataDir::or_live`]).
    pub fn summary_or_live(&self, name: &str) -> Result<Result<BackupSummary, LiveStatus>, SessionError> {
        self.or_live(name, || self.summary(name))
    }

    /// [`DataDir::fold`], or `None` when no backup of that name exists.
    pub fn fold_if_any(&self, name: &str) -> Result<Option<BackupState>, SessionError> {
        match self.fold(name) {
            Ok(state) => Ok(Some(state)),
            Err(SessionError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks that a local store can be written (its directory made, a probe file written and
    /// removed): the CLI asks before recording a backup, so `--storage /proc/nope` is the user's
    /// input at `create`, not a stop at the first staged item (issue 22). The controller does not:
    /// a store that is down when a Backup starts is an outage its retries wait out.
    pub fn probe_store(&self, spec: &StorageSpec) -> Result<(), SessionError> {
        let StorageSpec::Local { root } = spec else { return Ok(()) };
        let root = root.clone().unwrap_or_else(|| self.default_store());
        writable_dir(&root).map_err(|reason| {
            SessionError::Store(StoreError::BadLocation { location: root.display().to_string(), reason })
        })
    }

    /// A backup's folded state: from its log, or — while another process runs it and holds the
    /// log — from the live view that process keeps (`live` is then true).
    pub fn status(&self, name: &str) -> Result<Status, SessionError> {
        match self.or_live(name, || self.fold(name))? {
            Ok(state) => Ok(Status::Log { state: Box::new(state) }),
            Err(live) => Ok(Status::Live(live)),
        }
    }

    /// `read` of backup `name`'s log — or, when another process holds the log or this disk cannot
    /// open it (full or read-only: sled writes when it opens a log, though the command only
    /// reads), the live view its last run kept ([`LiveStatus`], saying which).
    pub fn or_live<T>(
        &self,
        name: &str,
        read: impl FnOnce() -> Result<T, SessionError>,
    ) -> Result<Result<T, LiveStatus>, SessionError> {
        match read() {
            Ok(t) => Ok(Ok(t)),
            Err(SessionError::Log(ref e @ (LogError::InUse(_) | LogError::Storage { .. })))
                if matches!(e, LogError::InUse(_)) || medium_full(e) =>
            {
                let unreadable = (!matches!(e, LogError::InUse(_))).then(|| e.to_string());
                let path = self.backup_dir(name).join("status.json");
                let bytes = std::fs::read(&path).map_err(file_err("reading the live status", &path))?;
                let view: Value = serde_json::from_slice(&bytes).map_err(|e| SessionError::File {
                    what: "parsing",
                    path,
                    message: e.to_string(),
                })?;
                let events_log = self.backup_dir(name).join("events.log");
                Ok(Err(LiveStatus { view, events_log, unreadable }))
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether opening the log failed because its disk cannot be written (full: ENOSPC, or read-only:
/// EROFS) — sled writes when it opens, though reading commands only read.
fn medium_full(e: &LogError) -> bool {
    matches!(e, LogError::Storage { message, .. } if message.contains("os error 28") || message.contains("os error 30"))
}

/// What [`DataDir::delete`] deleted beside the files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Storage snapshots the driver deleted.
    pub snapshots: usize,
    /// Storage snapshots the driver no longer had (handle, objects, the driver's message).
    pub already_gone: Vec<String>,
}

/// The VolumeSnapshotContent and VolumeSnapshot types a backup discovered (`v1` when it
/// recorded none).
fn snapshot_types(state: &BackupState) -> (blockwise_engine::item::ResourceType, blockwise_engine::item::ResourceType) {
    use blockwise_engine::item::ResourceType;
    use blockwise_engine::snapshot::SNAPSHOT_GROUP;
    let found = |resource: &str| {
        (state.resources.iter().flatten())
            .find(|rt| rt.gr.group == SNAPSHOT_GROUP && rt.gr.resource == resource)
            .cloned()
    };
    (
        found("volumesnapshotcontents").unwrap_or_else(|| {
            ResourceType::new(SNAPSHOT_GROUP, "v1", "volumesnapshotcontents", "VolumeSnapshotContent", false)
        }),
        found("volumesnapshots")
            .unwrap_or_else(|| ResourceType::new(SNAPSHOT_GROUP, "v1", "volumesnapshots", "VolumeSnapshot", true)),
    )
}

/// The file beside a backup's log that keeps its uid.
const UID_FILE: &str = "uid.json";

/// What [`DataDir::status`] found.
#[derive(Debug)]
pub enum Status {
    /// Read from the log.
    Log {
        /// Its events' fold (`DataDir::each_event` reads the events themselves).
        state: Box<BackupState>,
    },
    /// Another process runs the backup — or the log cannot be opened on this disk.
    Live(LiveStatus),
}

/// The live view a backup's last run kept, read when its log cannot be: another process runs the
/// backup — or the log cannot be opened on this disk (full, or read-only: `unreadable` says why).
#[derive(Debug)]
pub struct LiveStatus {
    /// `status.json`: `describe` JSON and text, written by the running process.
    pub view: Value,
    /// `events.log`: a line per durable event (read as a stream: a million-object backup's is
    /// hundreds of megabytes).
    pub events_log: PathBuf,
    /// Why the log itself could not be read, when no other process holds it.
    pub unreadable: Option<String>,
}

/// What a new backup is.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The spec (its name is the backup's name).
    pub spec: BackupSpec,
    /// Blocks in parallel.
    pub workers: usize,
    /// Options beyond the spec (volume snapshots); an empty `uid` is filled in at creation.
    pub options: BackupOptions,
    /// Where the cluster is.
    pub source: ClusterSource,
    /// Where the store is.
    pub storage: StorageSpec,
}

/// Whether files can be made in `dir` (made first when missing): a probe file created and removed.
fn writable_dir(dir: &Path) -> Result<(), String> {
    crate::store::create_dirs(dir).map_err(|e| format!("cannot create the directory: {e}"))?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write in it: {e}"))?;
    std::fs::remove_file(&probe).map_err(|e| format!("cannot remove a file from it: {e}"))
}

/// One backup, opened for a run.
pub struct Session {
    data: DataDir,
    name: String,
    log: EventLog,
    state: BackupState,
    report: OpenReport,
}

/// Writes `bytes` to `path` through a temp file, fsync and rename (durable).
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), SessionError> {
    crate::store::write_atomic(path, bytes).map_err(|e| SessionError::File {
        what: "writing",
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes `value` as pretty JSON to `path`, durably.
pub(crate) fn write_json_durable<T: Serialize>(path: &Path, value: &T) -> Result<(), SessionError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| SessionError::File {
        what: "encoding",
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_durable(path, &bytes)
}

pub(crate) fn remove_tree(dir: &Path) -> Result<(), SessionError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err("removing", dir)(e)),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), SessionError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(file_err("syncing", dir))
}

/// A fresh backup uid in the UUID layout, from the name, the clock and the process: unique enough
/// to tell two backups of one name apart (it labels and names their snapshots).
pub fn new_uid(name: &str) -> String {
    use sha2::{Digest, Sha256};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let h = Sha256::digest(format!("{name}\0{nanos}\0{}", std::process::id()).as_bytes());
    let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..32])
}

impl Session {
    /// Creates a backup, crash-atomically (see the module docs). A name whose directory holds a
    /// backup is refused, pointing to `resume` when it can be continued.
    pub fn create(data: &DataDir, req: CreateRequest) -> Result<Session, SessionError> {
        let name = req.spec.name.clone();
        validate_backup_name(&name)?;
        let mut options = req.options.clone();
        if options.uid.is_empty() {
            options.uid = new_uid(&name);
        }
        let uid = options.uid.clone();
        let first = Engine::request(req.spec.clone(), options, req.workers, TokioRuntime.now_ms())?;
        let dir = data.backup_dir(&name);
        if dir.exists() {
            match data.summary_if_any(&name)? {
                Some(summary) => return Err(Session::refusal(&name, &summary)),
                None => {
                    // A create that died before its request was durable: it never existed.
                    tracing::warn!("removing {}: a backup whose creation was interrupted", dir.display());
                    std::fs::remove_dir_all(&dir).map_err(file_err("removing", &dir))?;
                }
            }
        }
        let backups = data.backups();
        crate::store::create_dirs(&backups).map_err(|e| SessionError::File {
            what: "creating",
            path: backups.clone(),
            message: e.to_string(),
        })?;
        // Leftovers of earlier interrupted creates of this name.
        for entry in std::fs::read_dir(&backups).map_err(file_err("reading", &backups))?.flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            if n.strip_prefix(".new-").is_some_and(|rest| rest.rsplit_once('-').is_some_and(|(b, _)| b == name)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let tmp = backups.join(format!(".new-{name}-{}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(file_err("creating", &tmp))?;
        write_json_durable(&tmp.join("storage.json"), &req.storage)?;
        write_json_durable(&tmp.join("cluster.json"), &req.source)?;
        // The uid labels the backup's snapshots: kept beside the log too, so that deleting a backup
        // whose log is damaged still finds them (`DataDir::delete`).
        write_json_durable(&tmp.join(UID_FILE), &json!({ "uid": uid }))?;
        {
            let mut log = EventLog::create(&tmp.join("log"), &name)?;
            log.append(0, &first)?;
            log.flush()?;
        }
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &dir).map_err(file_err("renaming into place", &dir))?;
        sync_dir(&backups)?;
        Session::open(data, &name)
    }

    fn refusal(name: &str, summary: &BackupSummary) -> SessionError {
        match (&summary.stopped, summary.phase()) {
            (Some(reason), _) => SessionError::Stopped { name: name.into(), reason: reason.clone() },
            (None, Phase::InProgress) => SessionError::Interrupted { name: name.into() },
            (None, phase) => SessionError::Exists { name: name.into(), phase },
        }
    }

    /// Opens an existing backup for a run (`resume`): reads its log back, cutting a torn tail.
    pub fn open(data: &DataDir, name: &str) -> Result<Session, SessionError> {
        validate_backup_name(name)?;
        let dir = data.log_dir(name);
        let not_found = || SessionError::NotFound { what: "backup", name: name.into(), data_dir: data.root.clone() };
        if !dir.exists() {
            return Err(not_found());
        }
        let mut folding = Folding::default();
        let opened = EventLog::open_with(&dir, |_, e| folding.push(e));
        let (log, report) = match opened {
            Ok(opened) => opened,
            Err(LogError::NotFound(_)) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        if report.events == 0 {
            // Never durably requested: the backup does not exist.
            return Err(not_found());
        }
        let state = folding.finish().map_err(|e| SessionError::State { name: name.into(), message: e.to_string() })?;
        Ok(Session { data: data.clone(), name: name.into(), log, state, report })
    }

    /// The backup's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state as opened.
    pub fn state(&self) -> &BackupState {
        &self.state
    }

    /// Events in the log when it was opened (they are read again, one at a time, when the run
    /// starts: a resumed backup never holds its whole log).
    pub fn events(&self) -> usize {
        self.report.events
    }

    /// What opening the log found (a cut torn tail).
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Where its cluster is.
    pub fn source(&self) -> Result<ClusterSource, SessionError> {
        self.data.source(&self.name)
    }

    /// Its store (with retries).
    pub fn store(&self) -> Result<Arc<dyn Store>, SessionError> {
        self.data.open_store(&self.data.storage(&self.name)?)
    }

    /// Runs the backup to a terminal phase (or only stores its files again, when it already
    /// finished) through the one driver, with `workers` blocks in parallel and list pages of
    /// `page_size` objects, keeping the live view current.
    pub async fn run(
        mut self,
        cluster: Arc<dyn Cluster>,
        store: Arc<dyn Store>,
        workers: usize,
        page_size: u32,
        observer: &mut dyn Observer,
    ) -> Result<BackupState, RunError> {
        let runtime: Arc<dyn Runtime> = Arc::new(TokioRuntime);
        let cfg = EngineConfig { workers, list_page_items_max: page_size, ..EngineConfig::default() };
        // The log is read again from its start, one event at a time: to rebuild the engine's
        // catalog, and to write the live view's event lines.
        let log = &self.log;
        let mut replay = |f: &mut dyn FnMut(&Event)| {
            log.for_each_event(|_, e| {
                f(e);
                Ok(())
            })
            .map_err(|e| e.to_string())
        };
        let state = std::mem::take(&mut self.state);
        let engine = Engine::resume_folded(state, &mut replay, Some(self.log.plans()), cfg, runtime.now_ms())
            .map_err(|e| RunError::Engine(e.to_string()))?;
        let world = World {
            cluster: Arc::new(RetryingCluster::new(cluster, ClusterRetryPolicy::default(), runtime.clone())),
            store,
            runtime,
        };
        let mut live = LiveView::start(&self.data.backup_dir(&self.name), &mut replay, engine.state(), observer);
        run_backup(engine, &mut self.log, &world, workers, &mut live).await
    }
}

impl Session {
    /// Stores the companion files of a backup that already finished again (`resume` of a finished
    /// backup: a failure storing them earlier is repaired this way).
    pub async fn store_files(self, store: Arc<dyn Store>) -> Result<BackupState, RunError> {
        crate::driver::store_backup_files(&self.log, &self.state, store.as_ref()).await?;
        Ok(self.state)
    }
}

/// Keeps `status.json` and `events.log` current during a run (see the module docs).
struct LiveView<'a> {
    dir: PathBuf,
    inner: &'a mut dyn Observer,
    lines: String,
    events_file: Option<std::fs::File>,
    last_status: Option<Instant>,
    /// How long the last rewrite of `status.json` took.
    status_cost: std::time::Duration,
}

impl<'a> LiveView<'a> {
    fn start(
        dir: &Path,
        replay: &mut blockwise_engine::engine::Replay<'_>,
        state: &BackupState,
        inner: &'a mut dyn Observer,
    ) -> LiveView<'a> {
        use std::io::Write as _;
        let path = dir.join("events.log");
        let written = std::fs::File::create(&path).and_then(|file| {
            let mut out = std::io::BufWriter::new(file);
            let (mut i, mut failed) = (0u64, None);
            let read = replay(&mut |e| {
                if failed.is_none() {
                    failed = writeln!(out, "{}", report::event_line(i, e)).err();
                }
                i += 1;
            });
            match (failed, read) {
                (Some(e), _) => Err(e),
                (None, Err(m)) => Err(std::io::Error::other(m)),
                (None, Ok(())) => out.flush(),
            }
        });
        let events_file = written
            .and_then(|()| std::fs::OpenOptions::new().append(true).open(&path))
            .map_err(|e| tracing::warn!("cannot keep {} current: {e}", path.display()))
            .ok();
        let mut view = LiveView {
            dir: dir.to_path_buf(),
            inner,
            lines: String::new(),
            events_file,
            last_status: None,
            status_cost: std::time::Duration::ZERO,
        };
        view.write_status(state);
        view
    }

    /// The live view is a convenience: failing to write it never fails the backup.
    fn write_status(&mut self, state: &BackupState) {
        let started = Instant::now();
        // The summary (counts, not each claim's snapshot: the view of a million-object backup
        // was 22 MB, most of it the snapshot list), as `describe` shows it.
        let summary = BackupSummary::counts_of(state);
        let describe = report::summary_json(&summary);
        let text = report::describe_text_of(&summary, &describe);
        let doc = json!({
            "pid": std::process::id(),
            "describe": describe,
            "text": text,
            "row": {
                "phase": state.phase().to_string(),
                "errors": state.errors.len(),
                "warnings": state.warnings.len(),
                "items": format!("{}/{}", state.items_done(), state.planned_items),
                "created": report::rfc3339(state.requested_ms),
            },
        });
        let path = self.dir.join("status.json");
        let tmp = self.dir.join(".status.json.tmp");
        let written = serde_json::to_vec(&doc)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        let now = Instant::now();
        self.status_cost = now.duration_since(started);
        self.last_status = Some(now);
    }

    /// Whether `status.json` is due for a rewrite: [`STATUS_INTERVAL_MS`] after the last one, and
    /// [`STATUS_COST_FACTOR`] times as long as it took (a large backup's view is not rewritten at
    /// the cost of the backup).
    fn status_due(&self) -> bool {
        let wait = std::time::Duration::from_millis(STATUS_INTERVAL_MS).max(self.status_cost * STATUS_COST_FACTOR);
        self.last_status.is_none_or(|t| t.elapsed() >= wait)
    }
}

impl Observer for LiveView<'_> {
    fn event(&mut self, event: &Event, state: &BackupState) {
        self.lines.push_str(&report::event_line(state.events.saturating_sub(1), event));
        self.lines.push('\n');
        self.inner.event(event, state);
    }

    fn flushed(&mut self, took: std::time::Duration) {
        self.inner.flushed(took);
    }

    fn committed(&mut self, state: &BackupState) {
        if let Some(f) = self.events_file.as_mut() {
            if let Err(e) = f.write_all(self.lines.as_bytes()) {
                tracing::warn!("cannot append to events.log: {e}");
            }
        }
        self.lines.clear();
        if self.status_due() || state.finished.is_some() || state.stopped.is_some() {
            self.write_status(state);
        }
        self.inner.committed(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 22: `describe`/`get`/`logs` of a backup whose disk is full (or read-only) answer from
    /// the live view — sled cannot open the log there — but a damaged log is never hidden so.
    #[test]
    fn only_a_full_or_read_only_disk_falls_back_to_the_live_view() {
        let storage = |message: &str| LogError::Storage { path: PathBuf::from("log"), message: message.into() };
        assert!(medium_full(&storage("IO error: No space left on device (os error 28)")));
        assert!(medium_full(&storage("IO error: Read-only file system (os error 30)")));
        assert!(!medium_full(&storage("Corruption: at 4096")));
        assert!(!medium_full(&storage("IO error: Permission denied (os error 13)")));
        assert!(!medium_full(&LogError::Damaged {
            path: PathBuf::from("log"),
            what: "backup \"b\"".into(),
            file: PathBuf::from("log/db"),
            seq: Some(3),
            reason: "os error 28 in its text".into()
        }));
    }
}
