//! An in-memory Kubernetes cluster behind the engine's [`Cluster`] port.
//!
//! [`FakeCluster`] serves discovery, paginated lists and gets from JSON objects held in memory and
//! answers pod execs from scripts or a small interpreter, so the engine's whole pipeline runs
//! without a cluster: in unit tests, in the deterministic simulator and as the CLI's built-in demo.
//! It behaves like the API server where the engine can tell the difference: list items carry no
//! `apiVersion`/`kind` (a get does), lists are sorted by (namespace, name) and paginated with an
//! opaque continue token, a missing object is `Ok(None)`, exec into a missing container is an error.
//!
//! It never reads a clock and never spawns: latency is applied through an injected clock, the
//! shell's [`Runtime`] (tokio's timers for the demo and the API server, virtual time in the
//! simulator, nothing at all by default). Lists are in (namespace, name) order, or — for the
//! simulator's G3 check — in a seeded order that is stable across pages ([`FakeCluster::with_list_order_seed`]).
//! Every exec is recorded when it starts — in memory and optionally in an append-only JSON-lines
//! file that survives a SIGKILL of the process — so tests can check hook ordering across crashes.
//!
//! Objects can also be created, merge-patched, deleted and watched ([`crate::csi`]: an overlay over
//! the built-in objects, with finalizers and a fake CSI snapshot controller). The overlay can be
//! kept in a JSON file and a journal of writes beside it ([`FakeCluster::with_state_file`]),
//! so the demo cluster's snapshots outlive a killed `blockwise` process as a real cluster's would.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use blockwise_adapters::world::Runtime;
use blockwise_engine::item::{GroupResource, ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError, ExecResult, ListPage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::csi::{ApiError, ApiWrite, Change, CsiConfig, CsiEvent, Dynamic, Statics, StorageSnapshot};

/// How long a [`ExecScript::Hang`] exec sleeps: one hour, far beyond any hook timeout.
pub const HANG_MS: u64 = 3_600_000;

/// Simulated latency of cluster calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Before each list page and each get.
    pub api_ms: u64,
    /// Before each exec returns.
    pub exec_ms: u64,
}

/// A scripted exec outcome for one pod and command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecScript {
    /// The command exits with this status.
    Exit(i32),
    /// The command prints these and exits with this status (what a served exec passes on).
    Output {
        /// The exit status.
        exit_code: i32,
        /// Its standard output.
        stdout: String,
        /// Its standard error.
        stderr: String,
    },
    /// The exec itself fails (stream error, API error) with this message.
    Error(String),
    /// The command never finishes: sleeps [`HANG_MS`] so the caller's timeout fires.
    Hang,
}

/// One exec call, recorded when it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    /// Start order, counted across processes sharing one exec log.
    pub seq: u64,
    /// The pod.
    pub pod: ItemKey,
    /// The container.
    pub container: String,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// Anything that names a group/resource: a [`ResourceType`] or a [`GroupResource`].
pub trait AsGroupResource {
    /// The group/resource it names.
    fn group_resource(&self) -> GroupResource;
}

impl AsGroupResource for GroupResource {
    fn group_resource(&self) -> GroupResource {
        self.clone()
    }
}

impl AsGroupResource for ResourceType {
    fn group_resource(&self) -> GroupResource {
        self.gr.clone()
    }
}

impl<T: AsGroupResource + ?Sized> AsGroupResource for &T {
    fn group_resource(&self) -> GroupResource {
        (**self).group_resource()
    }
}

/// Objects of one resource keyed by (namespace or "", name), so iteration is the list order.
type Objects = BTreeMap<(String, String), Value>;

#[derive(Debug, Default)]
struct ExecState {
    next_seq: u64,
    records: Vec<ExecRecord>,
}

/// An in-memory cluster; see the module docs.
#[derive(Default)]
pub struct FakeCluster {
    resources: Vec<ResourceType>,
    objects: BTreeMap<GroupResource, Objects>,
    scripts: HashMap<(ItemKey, Vec<String>), ExecScript>,
    latency: Latency,
    sleeper: Option<Arc<dyn Runtime>>,
    list_order_seed: Option<u64>,
    exec_log: Option<PathBuf>,
    /// Also print every exec record on stdout (`simulator serve --print-execs`).
    exec_echo: bool,
    execs: Mutex<ExecState>,
    csi: CsiConfig,
    dynamic: Mutex<Dynamic>,
    state_file: Option<PathBuf>,
    /// The write journal beside the state file, when there is one; see [`FakeCluster::with_state_file`].
    journal: Mutex<Journal>,
    /// The clock of a fake cluster without one: a watch moves it to the next change.
    virtual_now: AtomicU64,
    /// The highest resourceVersion of a built-in object.
    rv_floor: u64,
    /// Resource types served besides the built-in ones and the CRDs' ([`FakeCluster::serve_also`]).
    also_served: Mutex<Vec<ResourceType>>,
    /// Called after every change ([`FakeCluster::on_change`]).
    on_change: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Tests' observers of changes, beside the API server's callback ([`FakeCluster::also_on_change`]).
    observers: Mutex<Vec<Arc<dyn Fn() + Send + Sync>>>,
}

impl fmt::Debug for FakeCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeCluster")
            .field("resources", &self.resources.len())
            .field("objects", &self.object_count())
            .field("scripts", &self.scripts.len())
            .field("latency", &self.latency)
            .field("sleeper", &self.sleeper.is_some())
            .field("exec_log", &self.exec_log)
            .finish()
    }
}

/// The writes since the state file was last written whole.
#[derive(Debug, Default, Clone, Copy)]
struct Journal {
    /// The sequence number of the last write journaled (or folded into the state file).
    seq: u64,
    /// Lines appended since the state file was written.
    lines: u64,
}

/// Journal lines after which the state file is written whole again (and the journal emptied):
/// each write then costs one appended line, plus a whole state every this many writes.
const JOURNAL_LINES_MAX: u64 = 512;

/// One write through the API, as the journal records it: replayed in order over the state file,
/// the same writes at the same instants give the same state (the controller's jobs run on the
/// cluster's clock, and every write first runs the jobs due at its instant).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum JournalOp {
    Create { now: u64, rt: ResourceType, namespace: Option<String>, json: String },
    Patch { now: u64, key: ItemKey, patch: String },
    Delete { now: u64, key: ItemKey },
    Api { now: u64, op: ApiWrite },
}

#[derive(Debug, Serialize, Deserialize)]
struct JournalLine {
    seq: u64,
    op: JournalOp,
}

/// The state file: the overlay and controller state, and the last journaled write it holds.
#[derive(Serialize)]
struct StateOut<'a> {
    seq: u64,
    #[serde(flatten)]
    dynamic: &'a Dynamic,
}

#[derive(Deserialize)]
struct StateIn {
    #[serde(default)]
    seq: u64,
    #[serde(flatten)]
    dynamic: Dynamic,
}

fn ns_name(key: &ItemKey) -> String {
    match &key.namespace() {
        Some(ns) => format!("{ns}/{}", key.name()),
        None => key.name().to_string(),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str)
}

impl FakeCluster {
    /// An empty cluster: no resource types, no objects, no latency.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a resource type to discovery (a type already present is replaced).
    pub fn add_resource(&mut self, rt: ResourceType) -> &mut Self {
        self.resources.retain(|r| r.gr != rt.gr);
        self.resources.push(rt);
        self
    }

    /// Adds an object, keyed by its `metadata.namespace` (empty when absent) and `metadata.name`
    /// (empty when absent or not a string); an object with the same key is replaced.
    pub fn add_object(&mut self, gr: impl AsGroupResource, object: Value) -> &mut Self {
        let ns = meta_str(&object, "namespace").unwrap_or("").to_string();
        let name = meta_str(&object, "name").unwrap_or("").to_string();
        if let Some(rv) = meta_str(&object, "resourceVersion").and_then(|r| r.parse::<u64>().ok()) {
            self.rv_floor = self.rv_floor.max(rv);
        }
        self.objects.entry(gr.group_resource()).or_default().insert((ns, name), object);
        self
    }

    /// Removes an object; returns it if it existed.
    pub fn remove_object(&mut self, key: &ItemKey) -> Option<Value> {
        let objs = self.objects.get_mut(&key.gr())?;
        objs.remove(&(key.namespace().map(str::to_string).unwrap_or_default(), key.name().to_string()))
    }

    /// Registers a scripted outcome for `command` exec'd in `pod` (any container).
    pub fn script_exec(&mut self, pod: ItemKey, command: Vec<String>, script: ExecScript) -> &mut Self {
        self.scripts.insert((pod, command), script);
        self
    }

    /// Sets the simulated latency.
    pub fn with_latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }

    /// Sets the clock that applies latency and hangs; without one, nothing waits.
    pub fn with_clock(mut self, clock: Arc<dyn Runtime>) -> Self {
        self.sleeper = Some(clock);
        self
    }

    /// Serves every list in an order drawn from `seed` (the same order on every page and every
    /// call), instead of (namespace, name) order.
    pub fn with_list_order_seed(mut self, seed: u64) -> Self {
        self.list_order_seed = Some(seed);
        self
    }

    /// Also appends every exec record to `path` as one JSON line. An existing log is continued:
    /// a torn last line (from a killed process) is cut off and sequence numbers go on from the
    /// number of complete lines. I/O errors are logged with `tracing` and never fail an exec.
    pub fn with_exec_log(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        match prepare_exec_log(&path) {
            Ok(lines) => self.execs.get_mut().unwrap_or_else(PoisonError::into_inner).next_seq = lines,
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot prepare exec log"),
        }
        self.exec_log = Some(path);
        self
    }

    /// Also prints every exec record on stdout as `exec <JSON line>` when the exec starts (a test
    /// that must act at an exec reads the server's output instead of polling its log).
    pub fn with_exec_echo(mut self) -> Self {
        self.exec_echo = true;
        self
    }

    /// Sets how the fake CSI driver behaves.
    pub fn with_csi(mut self, config: CsiConfig) -> Self {
        self.csi = config;
        self
    }

    /// Keeps the written objects and the snapshot controller's state in `path` (JSON), loading
    /// what an earlier process left there. Each write is appended to a journal beside it
    /// (`<path>.journal`, one JSON line per write, its sequence number first); every
    /// [`JOURNAL_LINES_MAX`] writes, when loading a journal and when the cluster is dropped, the state is
    /// written whole (atomically: a temporary file renamed) and the journal emptied. Loading replays
    /// the journal's writes the state file does not hold yet; a torn last line (a process killed
    /// while appending it, before its write was answered) is ignored. A state file or a journal line
    /// before the last that does not parse is an error naming the file (and line). Call it after
    /// [`FakeCluster::with_csi`] and the objects: replaying writes needs them.
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut seq = 0;
        match fs::read(&path) {
            Ok(bytes) => {
                let st: StateIn = serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(format!("fake cluster state {}: {e}", path.display())))?;
                seq = st.seq;
                *self.dynamic.get_mut().unwrap_or_else(PoisonError::into_inner) = st.dynamic;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let journal = journal_path(&path);
        let text = match fs::read_to_string(&journal) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let lines: Vec<&str> = text.lines().collect();
        // Replayed outside the mutex (taken out, put back), so the statics can be borrowed whole.
        let mut d = std::mem::take(self.dynamic.get_mut().unwrap_or_else(PoisonError::into_inner));
        let st = self.statics();
        for (i, line) in lines.iter().enumerate() {
            let rec: JournalLine = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(_) if i + 1 == lines.len() => break,
                Err(e) => {
                    return Err(invalid(format!("fake cluster journal {} line {}: {e}", journal.display(), i + 1)))
                }
            };
            if rec.seq <= seq {
                continue;
            }
            seq = rec.seq;
            // A write that failed when it was made fails the same way now: nothing to do.
            let _ = match rec.op {
                JournalOp::Create { now, rt, namespace, json } => {
                    d.create(&st, now, &rt, namespace.as_deref(), &json).map(|_| ()).is_ok()
                }
                JournalOp::Patch { now, key, patch } => d.patch(&st, now, &key, &patch).is_ok(),
                JournalOp::Delete { now, key } => d.delete(&st, now, &key).is_ok(),
                JournalOp::Api { now, op } => d.api_write(&st, now, &op).is_ok(),
            };
        }
        self.state_file = Some(path);
        *self.journal.get_mut().unwrap_or_else(PoisonError::into_inner) = Journal { seq, lines: lines.len() as u64 };
        if !lines.is_empty() {
            self.write_whole(seq, &d)?;
        }
        *self.dynamic.get_mut().unwrap_or_else(PoisonError::into_inner) = d;
        Ok(self)
    }

    fn dyn_lock(&self) -> MutexGuard<'_, Dynamic> {
        self.dynamic.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn statics(&self) -> Statics<'_> {
        Statics { objects: &self.objects, resources: &self.resources, config: &self.csi, rv_floor: self.rv_floor }
    }

    /// Writes the state `d`, holding the journal's writes up to `seq`, whole to the state file (a
    /// temporary file renamed), then empties the journal.
    fn write_whole(&self, seq: u64, d: &Dynamic) -> io::Result<()> {
        let Some(path) = &self.state_file else { return Ok(()) };
        let state = serde_json::to_vec(&StateOut { seq, dynamic: d }).map_err(io::Error::other)?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, state)?;
        fs::rename(&tmp, path)?;
        // Lines the state now holds are skipped by sequence number, so a crash before this
        // truncation loses nothing.
        fs::write(journal_path(path), b"")?;
        self.journal.lock().unwrap_or_else(PoisonError::into_inner).lines = 0;
        Ok(())
    }

    /// Records a write made under the dynamic lock `d`, if the cluster keeps a state file: one
    /// journal line, or the whole state every [`JOURNAL_LINES_MAX`] writes.
    fn persist(&self, d: &Dynamic, op: JournalOp) {
        let Some(path) = &self.state_file else { return };
        let write = || -> io::Result<()> {
            let (seq, whole) = {
                let mut j = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
                j.seq += 1;
                j.lines += 1;
                (j.seq, j.lines >= JOURNAL_LINES_MAX)
            };
            if whole {
                return self.write_whole(seq, d);
            }
            let mut line = serde_json::to_vec(&JournalLine { seq, op }).map_err(io::Error::other)?;
            line.push(b'\n');
            // One write(2) of the whole line in append mode: a kill tears at most this line.
            OpenOptions::new().create(true).append(true).open(journal_path(path))?.write_all(&line)
        };
        // The fake cluster has no error channel for this; say it where a user sees it.
        if let Err(Some(e)) = write().map_err(|e| worth_a_warning(e, path)) {
            eprintln!("warning: cannot write the demo cluster's state {}: {e}", path.display());
        }
    }

    /// The cluster's clock: the injected one, else the virtual clock watches advance.
    pub fn now(&self) -> u64 {
        match &self.sleeper {
            Some(s) => s.now_ms(),
            None => self.virtual_now.load(Ordering::SeqCst),
        }
    }

    /// Whether the cluster has a clock ([`FakeCluster::with_clock`]); without one, time moves only
    /// when a watch moves it ([`FakeCluster::advance_clock_to`]).
    pub fn has_clock(&self) -> bool {
        self.sleeper.is_some()
    }

    /// Moves the virtual clock of a cluster without a clock forward to `ms` (never back); a
    /// cluster with a clock ignores it.
    pub fn advance_clock_to(&self, ms: u64) {
        if self.sleeper.is_none() {
            self.virtual_now.fetch_max(ms, Ordering::SeqCst);
        }
    }

    /// Runs the snapshot controller's jobs due at `now`.
    pub fn settle_at(&self, now: u64) {
        self.with_dynamic(|d, st| d.settle(st, now));
    }

    /// Runs `f` on the overlay under its lock; then, if the resourceVersion moved, calls the
    /// [`FakeCluster::on_change`] callback (outside the lock).
    fn with_dynamic<R>(&self, f: impl FnOnce(&mut Dynamic, &Statics<'_>) -> R) -> R {
        let (r, changed) = {
            let mut d = self.dyn_lock();
            let st = self.statics();
            let before = d.resource_version(&st);
            let r = f(&mut d, &st);
            (r, d.resource_version(&st) != before)
        };
        if changed {
            let cb = self.on_change.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(cb) = cb {
                cb();
            }
            let observers = self.observers.lock().unwrap_or_else(PoisonError::into_inner).clone();
            for o in observers {
                o();
            }
        }
        r
    }

    /// Sets the callback called after every change of the cluster's objects (the API server wakes
    /// its watches with it). The fake cluster itself never waits or spawns.
    pub fn on_change(&self, callback: Arc<dyn Fn() + Send + Sync>) {
        *self.on_change.lock().unwrap_or_else(PoisonError::into_inner) = Some(callback);
    }

    /// Adds a callback called after every change, before the call that made it returns (tests: a
    /// client killed right after the server applied its N-th write, before it heard the answer).
    pub fn also_on_change(&self, callback: Arc<dyn Fn() + Send + Sync>) {
        self.observers.lock().unwrap_or_else(PoisonError::into_inner).push(callback);
    }

    /// Also serves `rt` (discovery and every verb), if no served type has its group/resource. The
    /// API server adds the resources its clients expect this way; they are not persisted.
    pub fn serve_also(&self, rt: ResourceType) {
        if self.serves(&rt.gr) {
            return;
        }
        self.also_served.lock().unwrap_or_else(PoisonError::into_inner).push(rt);
    }

    /// The served versions of the CustomResourceDefinitions that exist now.
    pub fn crd_served(&self) -> Vec<crate::crd::Served> {
        let d = self.dyn_lock();
        d.crds(&self.statics()).iter().flat_map(crate::crd::served).collect()
    }

    /// Whether `.status` of objects of `gr` is a subresource.
    pub fn status_subresource(&self, gr: &GroupResource) -> bool {
        self.dyn_lock().status_subresource(&self.statics(), gr)
    }

    /// The current resourceVersion, after running the jobs due at `now`.
    pub fn resource_version_at(&self, now: u64) -> u64 {
        self.with_dynamic(|d, st| {
            d.settle(st, now);
            d.resource_version(st)
        })
    }

    /// The changes after resourceVersion `rv` (see [`Dynamic::changes_since`]), after running the
    /// jobs due at `now`, with the resourceVersion they lead to.
    pub fn changes_since_at(
        &self,
        now: u64,
        rv: u64,
        keep: impl Fn(&Change) -> bool,
    ) -> Result<(Vec<Change>, u64), u64> {
        self.with_dynamic(|d, st| {
            d.settle(st, now);
            d.changes_since(st, rv, keep).map(|c| (c, d.resource_version(st)))
        })
    }

    /// Every object of `gr` that exists at `now`, with its key, and the resourceVersion then.
    pub fn live_at(&self, now: u64, gr: &GroupResource) -> (Vec<(ItemKey, Value)>, u64) {
        self.with_dynamic(|d, st| {
            d.settle(st, now);
            (d.live(st, gr), d.resource_version(st))
        })
    }

    /// When the snapshot controller's next job is due.
    pub fn next_job(&self) -> Option<u64> {
        self.dyn_lock().next_job()
    }

    /// A write through the API server now, after the API latency.
    pub async fn api_write(&self, op: ApiWrite) -> Result<Option<Value>, ApiError> {
        self.pause(self.latency.api_ms).await;
        self.api_write_at(self.now(), op)
    }

    /// A write through the API server at time `now` (see [`ApiWrite`]), journaled like the others.
    pub fn api_write_at(&self, now: u64, op: ApiWrite) -> Result<Option<Value>, ApiError> {
        let gr = match &op {
            ApiWrite::Create { rt, .. }
            | ApiWrite::Replace { rt, .. }
            | ApiWrite::Merge { rt, .. }
            | ApiWrite::Apply { rt, .. } => rt.gr.clone(),
            ApiWrite::Delete { key } => key.gr(),
        };
        if !self.serves(&gr) {
            return Err(ApiError {
                code: 404,
                reason: "NotFound",
                message: format!("the server could not find the requested resource {gr}"),
            });
        }
        self.with_dynamic(|d, st| {
            let r = d.api_write(st, now, &op);
            self.persist(d, JournalOp::Api { now, op });
            r
        })
    }

    /// The fake driver's storage snapshots, by handle.
    pub fn storage_snapshots(&self) -> BTreeMap<String, StorageSnapshot> {
        self.dyn_lock().storage.clone()
    }

    /// Snapshot objects (not classes) that exist now.
    pub fn snapshot_objects(&self) -> Vec<ItemKey> {
        self.dyn_lock().snapshot_objects()
    }

    /// Takes the snapshot controller's events recorded since the last call.
    pub fn take_csi_events(&self) -> Vec<CsiEvent> {
        self.dyn_lock().take_events()
    }

    /// When the next scheduled change of `key` happens.
    pub fn next_change(&self, key: &ItemKey) -> Option<u64> {
        self.dyn_lock().next_change(key)
    }

    /// Creates an object at time `now`.
    pub fn create_at(
        &self,
        now: u64,
        rt: &ResourceType,
        namespace: Option<&str>,
        json: &str,
    ) -> Result<String, ClusterError> {
        self.discovered(rt)?;
        self.with_dynamic(|d, st| {
            let r = d.create(st, now, rt, namespace, json);
            let op = JournalOp::Create {
                now,
                rt: rt.clone(),
                namespace: namespace.map(str::to_string),
                json: json.to_string(),
            };
            self.persist(d, op);
            r.map(|v| v.to_string())
        })
    }

    /// Merge-patches an object at time `now`.
    pub fn patch_at(&self, now: u64, rt: &ResourceType, key: &ItemKey, patch: &str) -> Result<String, ClusterError> {
        self.discovered(rt)?;
        self.with_dynamic(|d, st| {
            let r = d.patch(st, now, key, patch);
            self.persist(d, JournalOp::Patch { now, key: key.clone(), patch: patch.to_string() });
            r.map(|v| v.to_string())
        })
    }

    /// Deletes an object at time `now`.
    pub fn delete_at(&self, now: u64, rt: &ResourceType, key: &ItemKey) -> Result<bool, ClusterError> {
        self.discovered(rt)?;
        self.with_dynamic(|d, st| {
            let r = d.delete(st, now, key);
            self.persist(d, JournalOp::Delete { now, key: key.clone() });
            r
        })
    }

    /// One object at time `now`, as a get serves it (apiVersion and kind set).
    pub fn get_at(&self, now: u64, rt: &ResourceType, key: &ItemKey) -> Result<Option<String>, ClusterError> {
        self.discovered(rt)?;
        let api_version = rt.api_version();
        // Written under the lock from the stored object: no copy of it is made (copies of every
        // object got were much of the fake API server's time in a large backup).
        self.with_dynamic(|d, st| {
            d.settle(st, now);
            d.get(st, key).map(|obj| serde_json::to_string(&Typed { obj, typ: Some((&api_version, &rt.kind)) }))
        })
        .transpose()
        .map_err(|e| ClusterError::Other(e.to_string()))
    }

    /// How long a watch of `key` from `resource_version` at `now` waits: 0 when the object changed
    /// already, else until its next scheduled change, at most `timeout_ms`.
    pub fn watch_wait(&self, now: u64, key: &ItemKey, resource_version: &str, timeout_ms: u64) -> u64 {
        self.with_dynamic(|d, st| {
            d.settle(st, now);
            let current = d.get(st, key);
            let rv = current.and_then(|v| v.pointer("/metadata/resourceVersion")).and_then(Value::as_str);
            if current.is_none() || rv != Some(resource_version) {
                return 0;
            }
            d.next_change(key).map_or(timeout_ms, |t| t.saturating_sub(now).min(timeout_ms))
        })
    }

    /// One page of a list at time `now` (see [`Cluster::list`]).
    pub fn list_at(
        &self,
        now: u64,
        rt: &ResourceType,
        namespace: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ClusterError> {
        self.discovered(rt)?;
        let offset = match continue_token {
            None => 0,
            Some(t) => t.parse::<usize>().map_err(|_| ClusterError::Other(format!("invalid continue token {t:?}")))?,
        };
        self.with_dynamic(|d, st| d.settle(st, now));
        let d = self.dyn_lock();
        // A namespace filter on a cluster-scoped resource is ignored, as kubectl does.
        let ns_filter = namespace.filter(|_| rt.namespaced);
        // The built-in objects with the overlay applied, in key order, without copying either:
        // a page costs its own objects (and the skip to its offset), not the whole resource.
        let merged = crate::csi::merge_overlay(self.objects.get(&rt.gr), d.overlay.get(&rt.gr))
            .filter(|(k, _)| ns_filter.is_none_or(|f| f == k.0));
        let ordered: Box<dyn Iterator<Item = (&(String, String), &Value)>> = match self.list_order_seed {
            Some(seed) => {
                let mut matching: Vec<(&(String, String), &Value)> = merged.collect();
                matching.sort_by_key(|((ns, name), _)| crate::rng::hash_str(seed, &format!("{ns}/{name}")));
                Box::new(matching.into_iter())
            }
            None => Box::new(merged),
        };
        let limit = if limit == 0 { usize::MAX } else { limit as usize };
        let mut objects = Vec::new();
        let mut more = false;
        for (_, obj) in ordered.skip(offset) {
            if objects.len() == limit {
                more = true;
                break;
            }
            objects.push(
                serde_json::to_string(&Typed { obj, typ: None }).map_err(|e| ClusterError::Other(e.to_string()))?,
            );
        }
        let continue_token = more.then(|| (offset + objects.len()).to_string());
        Ok(ListPage { objects, continue_token })
    }

    /// The resource types served by discovery: the built-in ones, those added with
    /// [`FakeCluster::serve_also`], and the served versions of the CustomResourceDefinitions that
    /// exist now (built-in types first, in the order added).
    pub fn resources(&self) -> Vec<ResourceType> {
        let mut out = self.resources.clone();
        out.extend(self.also_served.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned());
        for s in self.crd_served() {
            if !out.iter().any(|r| r.gr == s.rt.gr && r.version == s.rt.version) {
                out.push(s.rt);
            }
        }
        out
    }

    /// The first served type `pick` accepts, in [`Self::resources`]' order, without making that
    /// list: the built-in types, those served also, then the CRDs' (whose objects are read only
    /// when neither has it). Every request is routed through this: copying every type (and
    /// reading every CRD) per request was a tenth of the fake API server's time.
    pub fn find_resource(&self, pick: impl Fn(&ResourceType) -> bool) -> Option<ResourceType> {
        if let Some(rt) = self.resources.iter().find(|r| pick(r)) {
            return Some(rt.clone());
        }
        let also = self.also_served.lock().unwrap_or_else(PoisonError::into_inner).iter().find(|r| pick(r)).cloned();
        also.or_else(|| self.crd_served().into_iter().map(|s| s.rt).find(|r| pick(r)))
    }

    /// Whether a type of `gr` is served ([`Self::find_resource`]).
    pub fn serves(&self, gr: &GroupResource) -> bool {
        self.find_resource(|r| r.gr == *gr).is_some()
    }

    /// Every object with its group/resource, by group/resource then (namespace, name).
    pub fn objects(&self) -> impl Iterator<Item = (&GroupResource, &Value)> + '_ {
        self.objects.iter().flat_map(|(gr, objs)| objs.values().map(move |o| (gr, o)))
    }

    /// The number of objects held.
    pub fn object_count(&self) -> usize {
        self.objects.values().map(BTreeMap::len).sum()
    }

    /// The object with this key, as stored.
    pub fn object(&self, key: &ItemKey) -> Option<&Value> {
        self.objects
            .get(&key.gr())?
            .get(&(key.namespace().map(str::to_string).unwrap_or_default(), key.name().to_string()))
    }

    /// The object with this key, to change it in place (the simulator's cluster changes).
    pub fn object_mut(&mut self, key: &ItemKey) -> Option<&mut Value> {
        self.objects
            .get_mut(&key.gr())?
            .get_mut(&(key.namespace().map(str::to_string).unwrap_or_default(), key.name().to_string()))
    }

    /// Every exec started so far by this instance, in start order.
    pub fn exec_records(&self) -> Vec<ExecRecord> {
        self.execs.lock().unwrap_or_else(PoisonError::into_inner).records.clone()
    }

    async fn pause(&self, ms: u64) {
        if let (true, Some(s)) = (ms > 0, &self.sleeper) {
            s.sleep(ms).await;
        }
    }

    fn discovered(&self, rt: &ResourceType) -> Result<(), ClusterError> {
        if self.serves(&rt.gr) {
            Ok(())
        } else {
            Err(ClusterError::Other(format!("the server could not find the requested resource {}", rt.gr)))
        }
    }

    /// Records the start of an exec in memory and in the exec log, under one lock so the file's
    /// line order is the sequence order.
    fn record_exec(&self, pod: &ItemKey, container: &str, command: &[String]) {
        let mut st = self.execs.lock().unwrap_or_else(PoisonError::into_inner);
        let rec = ExecRecord {
            seq: st.next_seq,
            pod: pod.clone(),
            container: container.to_string(),
            command: command.to_vec(),
        };
        st.next_seq += 1;
        if let Some(path) = &self.exec_log {
            if let Err(e) = append_record(path, &rec) {
                tracing::warn!(path = %path.display(), error = %e, "cannot append to exec log");
            }
        }
        if self.exec_echo {
            if let Ok(line) = serde_json::to_string(&rec) {
                println!("exec {line}");
            }
        }
        st.records.push(rec);
    }

    /// What an unscripted exec does: checks the pod and container, then interprets the command.
    fn interpret(&self, pod: &ItemKey, container: &str, command: &[String]) -> Result<ExecResult, ClusterError> {
        let obj = self
            .object(&pod.with_gr("", "pods"))
            .ok_or_else(|| ClusterError::Other(format!("pod {}: not found", ns_name(pod))))?;
        let has_container = obj
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(container)));
        if !has_container {
            return Err(ClusterError::Other(format!("pod {}: container {container} not found", ns_name(pod))));
        }
        let exit =
            |code: i32, stdout: &str| ExecResult { exit_code: code, stdout: stdout.into(), stderr: String::new() };
        let first =
            command.first().ok_or_else(|| ClusterError::Other(format!("pod {}: empty command", ns_name(pod))))?;
        let base = first.rsplit('/').next().unwrap_or(first);
        if base == "false" {
            return Ok(exit(1, ""));
        }
        if let ([_, flag, script], "sh") = (command, base) {
            if let (Some(n), "-c") = (script.trim().strip_prefix("exit"), flag.as_str()) {
                let n = n.trim();
                if n.is_empty() {
                    return Ok(exit(0, ""));
                }
                if let Ok(n) = n.parse::<i64>() {
                    return Ok(exit(n.rem_euclid(256) as i32, ""));
                }
            }
        }
        Ok(exit(0, "ok"))
    }
}

/// Cuts a torn last line off an existing exec log; returns the number of complete lines.
fn prepare_exec_log(path: &Path) -> io::Result<u64> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let good = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if good < bytes.len() {
        OpenOptions::new().write(true).open(path)?.set_len(good as u64)?;
    }
    Ok(bytes[..good].iter().filter(|&&b| b == b'\n').count() as u64)
}

/// Appends one record as a single unbuffered `write_all`, so a killed process leaves whole lines.
fn append_record(path: &Path, rec: &ExecRecord) -> io::Result<()> {
    let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
    line.push(b'\n');
    OpenOptions::new().create(true).append(true).open(path)?.write_all(&line)
}

/// Reads an exec log written by [`FakeCluster::with_exec_log`]. A last line without its newline
/// (a write cut short by a kill) is skipped; a complete line that does not parse is an
/// `InvalidData` error naming its line number.
pub fn read_exec_log(path: impl AsRef<Path>) -> io::Result<Vec<ExecRecord>> {
    let bytes = fs::read(path)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes[..complete]
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            serde_json::from_slice(line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("exec log line {}: {e}", i + 1)))
        })
        .collect()
}

#[async_trait]
impl Cluster for FakeCluster {
    async fn discover(&self) -> Result<Vec<ResourceType>, ClusterError> {
        Ok(self.resources())
    }

    async fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ClusterError> {
        self.pause(self.latency.api_ms).await;
        self.list_at(self.now(), rt, namespace, limit, continue_token)
    }

    async fn get(&self, rt: &ResourceType, key: &ItemKey) -> Result<Option<String>, ClusterError> {
        self.pause(self.latency.api_ms).await;
        self.get_at(self.now(), rt, key)
    }

    async fn exec(&self, pod: &ItemKey, container: &str, command: &[String]) -> Result<ExecResult, ClusterError> {
        self.record_exec(pod, container, command);
        self.pause(self.latency.exec_ms).await;
        match self.scripts.get(&(pod.clone(), command.to_vec())) {
            Some(ExecScript::Exit(code)) => {
                Ok(ExecResult { exit_code: *code, stdout: String::new(), stderr: String::new() })
            }
            Some(ExecScript::Output { exit_code, stdout, stderr }) => {
                Ok(ExecResult { exit_code: *exit_code, stdout: stdout.clone(), stderr: stderr.clone() })
            }
            Some(ExecScript::Error(msg)) => Err(ClusterError::Other(msg.clone())),
            Some(ExecScript::Hang) => match &self.sleeper {
                Some(s) => {
                    s.sleep(HANG_MS).await;
                    Err(ClusterError::Other(format!("pod {}: exec hung for {HANG_MS} ms", ns_name(pod))))
                }
                None => Err(ClusterError::Other(format!("pod {}: hang without sleeper", ns_name(pod)))),
            },
            None => self.interpret(pod, container, command),
        }
    }

    async fn create(&self, rt: &ResourceType, namespace: Option<&str>, json: &str) -> Result<String, ClusterError> {
        self.pause(self.latency.api_ms).await;
        self.create_at(self.now(), rt, namespace, json)
    }

    async fn patch(&self, rt: &ResourceType, key: &ItemKey, merge_patch: &str) -> Result<String, ClusterError> {
        self.pause(self.latency.api_ms).await;
        self.patch_at(self.now(), rt, key, merge_patch)
    }

    async fn delete(&self, rt: &ResourceType, key: &ItemKey) -> Result<bool, ClusterError> {
        self.pause(self.latency.api_ms).await;
        self.delete_at(self.now(), rt, key)
    }

    /// Waits until the object's next scheduled change (or the timeout) on the injected clock;
    /// without one, the cluster's virtual clock jumps there.
    async fn watch(
        &self,
        rt: &ResourceType,
        key: &ItemKey,
        resource_version: &str,
        timeout_ms: u64,
    ) -> Result<Option<String>, ClusterError> {
        self.discovered(rt)?;
        let wait = self.watch_wait(self.now(), key, resource_version, timeout_ms);
        match &self.sleeper {
            Some(s) if wait > 0 => s.sleep(wait).await,
            Some(_) => {}
            None => {
                self.virtual_now.fetch_add(wait, Ordering::SeqCst);
            }
        }
        self.get_at(self.now(), rt, key)
    }
}

/// A failed write of a state file, unless its directory was removed: the demo cluster of a backup
/// lives in the backup's directory and goes with it when the backup is deleted (after the
/// deletion's own writes, its snapshots' deletions, were journalled there). Checked only after a
/// write failed, so writes that succeed cost nothing more.
fn worth_a_warning(e: io::Error, state: &Path) -> Option<io::Error> {
    let gone = state.parent().is_some_and(|d| !d.as_os_str().is_empty() && !d.exists());
    (!(e.kind() == io::ErrorKind::NotFound && gone)).then_some(e)
}

fn journal_path(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    state.with_file_name(name)
}

impl Drop for FakeCluster {
    /// Writes the state whole, so that a cluster that ended normally leaves one JSON file to read.
    fn drop(&mut self) {
        let Journal { seq, lines } = *self.journal.get_mut().unwrap_or_else(PoisonError::into_inner);
        if lines == 0 {
            return;
        }
        let Some(path) = self.state_file.as_deref() else { return };
        if let Err(Some(e)) = self.write_whole(seq, &self.dyn_lock()).map_err(|e| worth_a_warning(e, path)) {
            eprintln!("warning: cannot write the demo cluster's state: {e}");
        }
    }
}

/// An object serialized without copying it, its `apiVersion` and `kind` left out (`typ: None`: a
/// list's items carry neither) or set (`Some((apiVersion, kind))`: a get), in the order a
/// `serde_json::Map` (sorted keys) holds them — the same bytes as removing or inserting both in a
/// copy and writing that.
struct Typed<'a> {
    obj: &'a Value,
    typ: Option<(&'a str, &'a str)>,
}

impl Serialize for Typed<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Some(map) = self.obj.as_object() else { return self.obj.serialize(s) };
        let set = self.typ.map(|(api_version, kind)| [("apiVersion", api_version), ("kind", kind)]);
        let mut out = s.serialize_map(None)?;
        let mut extra = set.iter().flatten().peekable();
        for (k, v) in map.iter().filter(|(k, _)| *k != "apiVersion" && *k != "kind") {
            while let Some((n, x)) = extra.next_if(|(n, _)| *n < k.as_str()) {
                out.serialize_entry(n, x)?;
            }
            out.serialize_entry(k, v)?;
        }
        for (n, x) in extra {
            out.serialize_entry(n, x)?;
        }
        out.end()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context, Poll, Waker};

    /// A got object is written without a copy ([`Typed`]) and reads as the copy with `apiVersion`
    /// and `kind` inserted did: the same bytes, whichever keys it has before, after or as them; a
    /// list's item as the copy with both removed.
    #[test]
    fn a_typed_object_is_the_bytes_of_the_object_with_its_type_inserted() {
        let objects = [
            json!({"metadata": {"name": "a"}, "spec": {"x": 1}}),
            json!({"apiVersion": "old/v0", "data": {}, "kind": "Old", "zzz": true, "AAA": 0}),
            json!({"b": 1, "apiVersionX": 2, "kinda": 3, "k": 4}),
            json!({}),
            json!("not an object"),
        ];
        for obj in objects {
            let mut copy = obj.clone();
            if let Some(map) = copy.as_object_mut() {
                map.insert("apiVersion".into(), json!("apps/v1"));
                map.insert("kind".into(), json!("Deployment"));
            }
            let typed = Typed { obj: &obj, typ: Some(("apps/v1", "Deployment")) };
            assert_eq!(serde_json::to_string(&typed).unwrap(), serde_json::to_string(&copy).unwrap(), "{obj}");
            let mut bare = obj.clone();
            if let Some(map) = bare.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            let item = Typed { obj: &obj, typ: None };
            assert_eq!(serde_json::to_string(&item).unwrap(), serde_json::to_string(&bare).unwrap(), "{obj}");
        }
    }

    /// Polls a future to completion on this thread; FakeCluster never blocks without a sleeper.
    pub(crate) fn block_on<F: std::future::Future>(fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    /// A sleeper that returns at once and adds up what it was asked to sleep.
    #[derive(Default)]
    struct CountingSleeper(AtomicU64);

    impl Runtime for CountingSleeper {
        fn now_ms(&self) -> u64 {
            0
        }
        fn sleep(&self, ms: u64) -> blockwise_adapters::world::BoxFuture<()> {
            self.0.fetch_add(ms, Ordering::SeqCst);
            Box::pin(async {})
        }
        fn jitter(&self, _: u64) -> u64 {
            0
        }
        fn spawn(&self, fut: blockwise_adapters::world::BoxFuture<()>) -> blockwise_adapters::world::BoxFuture<()> {
            fut
        }
        fn offload(&self, job: blockwise_adapters::world::Job) -> blockwise_adapters::world::BoxFuture<()> {
            job();
            Box::pin(async {})
        }
    }

    fn pods() -> ResourceType {
        ResourceType::new("", "v1", "pods", "Pod", true)
    }

    fn nodes() -> ResourceType {
        ResourceType::new("", "v1", "nodes", "Node", false)
    }

    fn pod(ns: &str, name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
               "spec": {"containers": [{"name": "app"}, {"name": "sidecar"}]}})
    }

    fn cluster() -> FakeCluster {
        let mut c = FakeCluster::new();
        c.add_resource(pods()).add_resource(nodes());
        for ns in ["b", "a", "c"] {
            for i in (0..7).rev() {
                c.add_object(pods(), pod(ns, &format!("p{i}")));
            }
        }
        c.add_object(GroupResource::new("", "nodes"), json!({"metadata": {"name": "n1"}}));
        c
    }

    fn names(page: &ListPage) -> Vec<String> {
        page.objects
            .iter()
            .map(|s| {
                let v: Value = serde_json::from_str(s).unwrap();
                assert!(v.get("kind").is_none() && v.get("apiVersion").is_none(), "{s}");
                format!("{}/{}", meta_str(&v, "namespace").unwrap_or(""), meta_str(&v, "name").unwrap())
            })
            .collect()
    }

    fn list_all(c: &FakeCluster, rt: &ResourceType, ns: Option<&str>, limit: u32) -> Vec<String> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = block_on(c.list(rt, ns, limit, token.as_deref())).unwrap();
            if limit > 0 {
                assert!(page.objects.len() <= limit as usize);
            }
            out.extend(names(&page));
            match page.continue_token {
                Some(t) => token = Some(t),
                None => return out,
            }
        }
    }

    #[test]
    fn pagination_returns_every_object_once_in_order() {
        let c = cluster();
        let all = list_all(&c, &pods(), None, 0);
        assert_eq!(all.len(), 21);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(all, sorted);
        assert_eq!(all[0], "a/p0");
        for limit in [1, 2, 5, 7, 20, 21, 22, 1000] {
            assert_eq!(list_all(&c, &pods(), None, limit), all, "limit {limit}");
        }
        assert_eq!(list_all(&c, &nodes(), None, 1), vec!["/n1"]);
    }

    #[test]
    fn namespace_filter_and_errors() {
        let c = cluster();
        let b = list_all(&c, &pods(), Some("b"), 3);
        assert_eq!(b, (0..7).map(|i| format!("b/p{i}")).collect::<Vec<_>>());
        assert!(list_all(&c, &pods(), Some("zzz"), 3).is_empty());
        assert_eq!(list_all(&c, &nodes(), Some("b"), 0), vec!["/n1"], "ignored for cluster scope");
        let e = block_on(c.list(&pods(), None, 5, Some("abc"))).unwrap_err();
        assert!(matches!(&e, ClusterError::Other(m) if m.contains("\"abc\"")), "{e}");
        let past = block_on(c.list(&pods(), None, 5, Some("999"))).unwrap();
        assert!(past.objects.is_empty() && past.continue_token.is_none());
        let svc = ResourceType::new("", "v1", "services", "Service", true);
        assert!(block_on(c.list(&svc, None, 0, None)).is_err());
        assert_eq!(block_on(c.discover()).unwrap().len(), 2);
    }

    #[test]
    fn get_adds_type_meta_and_misses_are_none() {
        let c = cluster();
        let got = block_on(c.get(&pods(), &ItemKey::namespaced("", "pods", "a", "p3"))).unwrap().unwrap();
        let v: Value = serde_json::from_str(&got).unwrap();
        assert_eq!((v["kind"].as_str(), v["apiVersion"].as_str()), (Some("Pod"), Some("v1")));
        assert_eq!(block_on(c.get(&pods(), &ItemKey::namespaced("", "pods", "a", "nope"))).unwrap(), None);
        let n = block_on(c.get(&nodes(), &ItemKey::cluster("", "nodes", "n1"))).unwrap();
        assert!(n.is_some());
    }

    fn cmd(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exec_interprets_commands_and_scripts() {
        let mut c = cluster();
        let p = ItemKey::namespaced("", "pods", "a", "p1");
        let run = |c: &FakeCluster, container: &str, w: &[&str]| block_on(c.exec(&p, container, &cmd(w)));
        assert_eq!(run(&c, "app", &["/sbin/fsfreeze", "--freeze", "/x"]).unwrap().stdout, "ok");
        assert_eq!(run(&c, "sidecar", &["/bin/false"]).unwrap().exit_code, 1);
        assert_eq!(run(&c, "app", &["sh", "-c", "exit 3"]).unwrap().exit_code, 3);
        assert_eq!(run(&c, "app", &["/bin/sh", "-c", " exit 1 "]).unwrap().exit_code, 1);
        assert_eq!(run(&c, "app", &["/bin/sh", "-c", "exit 256"]).unwrap().exit_code, 0);
        assert_eq!(run(&c, "app", &["/bin/sh", "-c", "echo hi"]).unwrap().exit_code, 0);
        let e = run(&c, "db", &["true"]).unwrap_err();
        assert_eq!(e, ClusterError::Other("pod a/p1: container db not found".into()));
        assert!(run(&c, "app", &[]).is_err());
        let missing = ItemKey::namespaced("", "pods", "a", "ghost");
        let e = block_on(c.exec(&missing, "app", &cmd(&["true"]))).unwrap_err();
        assert!(e.to_string().contains("a/ghost") && e.to_string().contains("not found"), "{e}");

        c.script_exec(p.clone(), cmd(&["freeze"]), ExecScript::Exit(7));
        c.script_exec(p.clone(), cmd(&["boom"]), ExecScript::Error("stream reset".into()));
        c.script_exec(p.clone(), cmd(&["hang"]), ExecScript::Hang);
        assert_eq!(run(&c, "app", &["freeze"]).unwrap().exit_code, 7);
        assert_eq!(run(&c, "app", &["boom"]).unwrap_err(), ClusterError::Other("stream reset".into()));
        assert!(run(&c, "app", &["hang"]).unwrap_err().to_string().contains("hang without sleeper"));

        let recs = c.exec_records();
        assert_eq!(recs.len(), 12);
        assert!(recs.iter().enumerate().all(|(i, r)| r.seq == i as u64));
        assert_eq!(recs[1].container, "sidecar");
        assert_eq!(recs[11].command, cmd(&["hang"]));
    }

    #[test]
    fn latency_and_hang_go_through_the_sleeper() {
        let sleeper = Arc::new(CountingSleeper::default());
        let mut c = cluster().with_latency(Latency { api_ms: 5, exec_ms: 20 }).with_clock(sleeper.clone());
        let p = ItemKey::namespaced("", "pods", "a", "p1");
        c.script_exec(p.clone(), cmd(&["hang"]), ExecScript::Hang);
        list_all(&c, &pods(), None, 10); // 3 pages
        block_on(c.get(&pods(), &p)).unwrap();
        assert_eq!(sleeper.0.load(Ordering::SeqCst), 20);
        block_on(c.exec(&p, "app", &cmd(&["true"]))).unwrap();
        assert_eq!(sleeper.0.load(Ordering::SeqCst), 40);
        assert!(block_on(c.exec(&p, "app", &cmd(&["hang"]))).is_err());
        assert_eq!(sleeper.0.load(Ordering::SeqCst), 60 + HANG_MS);
    }

    #[test]
    fn exec_log_round_trips_and_survives_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("blockwise-sim-execlog-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("exec.jsonl");
        let _ = fs::remove_file(&path);
        let p = ItemKey::namespaced("", "pods", "a", "p1");
        let c = cluster().with_exec_log(&path);
        for w in ["one", "two", "three"] {
            block_on(c.exec(&p, "app", &cmd(&[w]))).unwrap();
        }
        let back = read_exec_log(&path).unwrap();
        assert_eq!(back, c.exec_records());

        // A process killed mid-write leaves a partial line: readers skip it ...
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":3,"pod":{"gro"#).unwrap();
        assert_eq!(read_exec_log(&path).unwrap(), back);
        // ... and the next process cuts it off and continues the sequence.
        let c2 = cluster().with_exec_log(&path);
        block_on(c2.exec(&p, "sidecar", &cmd(&["four"]))).unwrap();
        let all = read_exec_log(&path).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!((all[3].seq, all[3].container.as_str()), (3, "sidecar"));

        fs::write(&path, "not json\n").unwrap();
        let e = read_exec_log(&path).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The state file and its journal: writes of a process killed without dropping the cluster are
    /// replayed by the next one (a torn last line ignored), which then holds the same objects and
    /// storage snapshots; a bad line before the last is an error naming it.
    #[test]
    fn a_killed_cluster_s_writes_are_replayed_from_the_journal() {
        let dir = std::env::temp_dir().join(format!("blockwise-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("demo-cluster.json");
        let demo = || crate::demo::demo_cluster_at(200, crate::demo::DEMO_SEED, true, 0, &path);
        let c1 = demo().unwrap();
        let claim = c1
            .objects()
            .find(|(gr, o)| gr.resource == "persistentvolumeclaims" && o["status"]["phase"] == "Bound")
            .map(|(_, o)| o.clone())
            .unwrap();
        let ns = claim["metadata"]["namespace"].as_str().unwrap().to_string();
        let vs_rt = crate::csi::snapshot_resources(Some("v1")).into_iter().find(|r| r.gr.resource == "volumesnapshots");
        let vs_rt = vs_rt.unwrap();
        let body = json!({"metadata": {"name": "s1", "namespace": ns},
            "spec": {"volumeSnapshotClassName": "pd-snapshots",
                     "source": {"persistentVolumeClaimName": claim["metadata"]["name"]}}});
        c1.create_at(1_000, &vs_rt, Some(&ns), &body.to_string()).unwrap();
        let key = ItemKey::namespaced("snapshot.storage.k8s.io", "volumesnapshots", &ns, "s1");
        c1.patch_at(60_000, &vs_rt, &key, r#"{"metadata":{"labels":{"x":"y"}}}"#).unwrap();
        c1.settle_at(120_000);
        let expected = (c1.storage_snapshots(), c1.snapshot_objects(), c1.get_at(120_000, &vs_rt, &key).unwrap());
        assert_eq!(expected.0.len(), 1, "cut: {:?}", expected.0);
        // A kill: no drop, so no whole state; the journal holds the writes, the last one torn.
        std::mem::forget(c1);
        assert!(!path.exists());
        let journal = journal_path(&path);
        OpenOptions::new().append(true).open(&journal).unwrap().write_all(br#"{"seq":3,"op":{"Del"#).unwrap();
        let c2 = demo().unwrap();
        c2.settle_at(120_000);
        let got = (c2.storage_snapshots(), c2.snapshot_objects(), c2.get_at(120_000, &vs_rt, &key).unwrap());
        assert_eq!(got, expected);
        assert!(path.exists() && fs::read(&journal).unwrap().is_empty(), "loading folded the journal in");
        // The next writes continue the sequence; dropping the cluster writes the state whole.
        assert!(c2.delete_at(130_000, &vs_rt, &key).unwrap());
        drop(c2);
        assert!(fs::read(&journal).unwrap().is_empty());
        let c3 = demo().unwrap();
        assert!(c3.snapshot_objects().is_empty(), "{:?}", c3.snapshot_objects());
        drop(c3);

        fs::write(&journal, "not json\n{}\n").unwrap();
        let e = demo().unwrap_err();
        assert!(e.to_string().contains("line 1") && e.to_string().contains("journal"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
