//! Running a restore (issue 13): its event log, the driver that creates the planned objects, and
//! restores in a data directory.
//!
//! [`drive_restore`] is the one restore driver, run by `blockwise restore create|resume` and by the
//! simulator's round trips alike. It reads the archive once, as a stream, spilling each item's JSON
//! and planning it ([`plan_archive`]; the `Planned`
//! event pins the archive's sha256, so a resume refuses an archive that changed), then creates the
//! plan stage by stage in Velero's resource order: within a stage, windows of at most
//! [`WINDOW_PER_WORKER`]` × workers` items, whose `CreatesStarted` intent is made durable before
//! any of their creates is sent, at most `workers` creates in flight; each outcome is an
//! `ItemRestored` fact. Once the CRD stage has its outcomes, the driver waits for each restored
//! CRD to be Established and discovers the cluster's resources again. An item whose intent a
//! killed run left without an outcome is looked up before it is created: found carrying this
//! restore's `velero.io/restore-name` label, it is the earlier run's create (RT3). An existing
//! object that is not ours is left with a warning, or patched under `--existing-resource-policy
//! update`. A cluster that stays unavailable past the retries stops the run with nothing lost —
//! `restore resume` continues it.
//!
//! ```text
//! <data-dir>/restores/<name>/log/          the sled event log (the restore's truth)
//! <data-dir>/restores/<name>/restore.json  where the archive and the cluster are (no credentials)
//! <data-dir>/restores/<name>/status.json   live view for describe/get while a run holds the log
//! <data-dir>/restores/<name>/spill          the archived objects planned, during a run
//! <data-dir>/restores/<name>/archive.tar.gz a store's archive, downloaded for a run
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockwise_engine::event::{decode_record_of, encode_record_of, Seq};
use blockwise_engine::mutation::{self, Mutation};
use blockwise_engine::ports::{Cluster, ClusterError};
use blockwise_engine::restore_run::{
    restored_by, update_patch, with_restore_uid, BodyAt, ExistingPolicy, ItemOutcome, PlannedItem, RestoreEvent,
    RestoreFoldError, RestorePhase, RestorePlan, RestorePlanner, RestoreSpec, RestoreState,
};
use blockwise_engine::{ItemKey, ResourceType};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::log::{
    open_records, open_records_with, scan_records, LogError, LogMedium, OpenReport, Opened, RecordLog, SledMedium,
};
use crate::session::{
    file_err, remove_tree, sync_dir, write_json_durable, ClusterSource, DataDir, SessionError, StorageSpec,
};
use crate::world::Runtime;

/// Items per worker whose intents one window records before their creates are sent.
pub const WINDOW_PER_WORKER: usize = 8;
/// How long the driver waits for a restored CRD to be Established.
pub const CRD_ESTABLISHED_TIMEOUT_MS: u64 = 60_000;
/// Pause between two reads of a CRD that is not Established yet.
const CRD_POLL_MS: u64 = 250;

/// A restore's event log on a [`LogMedium`] (sled in production, the simulator's in-memory log):
/// records `len ‖ crc32c ‖ version ‖ bincode` of [`RestoreEvent`]s over the kernel every log
/// shares ([`RecordLog`]: order, group commit; opened through the same checks as a backup's).
pub struct RestoreLog<M: LogMedium = SledMedium> {
    log: RecordLog<M>,
}

impl<M: LogMedium> RestoreLog<M> {
    /// Creates the log of restore `name` on `medium`; fails if it already has records.
    pub fn create_on(medium: M, name: &str) -> Result<RestoreLog<M>, LogError> {
        Ok(RestoreLog { log: RecordLog::create(medium, name)? })
    }

    /// Opens an existing log and reads it whole, cutting a torn last record.
    pub fn open_on(mut medium: M) -> Result<(RestoreLog<M>, Vec<RestoreEvent>, OpenReport), LogError> {
        let Opened { id, events, report } = open_records::<M, RestoreEvent>(&mut medium, "restore")?;
        let log = RecordLog::opened(medium, id, events.len() as Seq);
        Ok((RestoreLog { log }, events, report))
    }

    /// Opens an existing log and folds it as it reads — nothing held but the state, whatever the
    /// log's length — cutting a torn last record: the log, the events read, their fold (the first
    /// event that does not fold is the error; the read goes on, so damage is still found).
    #[allow(clippy::type_complexity)]
    pub fn open_folding(
        mut medium: M,
    ) -> Result<(RestoreLog<M>, Seq, Result<RestoreState, RestoreFoldError>, OpenReport), LogError> {
        let (mut state, mut failed) = (RestoreState::default(), None);
        let (_, id, report) = open_records_with::<M, RestoreEvent>(&mut medium, "restore", |seq, e| {
            if failed.is_none() {
                failed = state.apply(seq, &e).err();
            }
            Ok(())
        })?;
        let events = report.events as Seq;
        let log = RecordLog::opened(medium, id, events);
        Ok((RestoreLog { log }, events, failed.map_or(Ok(state), Err), report))
    }

    /// Appends one event; not yet durable.
    pub fn append(&mut self, event: &RestoreEvent) -> Result<Seq, LogError> {
        let seq = self.log.next_seq();
        self.log.append_bytes(seq, &encode_record_of(event))?;
        Ok(seq)
    }

    /// Group commit, on this thread: every append so far durable.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.log.flush()
    }

    /// Group commit through `rt`: every append so far durable.
    pub async fn flush_on(&mut self, rt: &dyn Runtime) -> Result<(), LogError> {
        self.log.flush_on(rt).await
    }

    /// The medium (the simulator crashes it).
    pub fn medium(&self) -> &M {
        self.log.medium()
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        self.log.path()
    }
}

/// Decodes one stored record (for tools that read a log record by record).
pub fn decode_restore_record(bytes: &[u8]) -> Result<RestoreEvent, String> {
    decode_record_of::<RestoreEvent>(bytes).map_err(|e| e.to_string())
}

/// Why a restore run stopped before the restore ended.
#[derive(Debug, thiserror::Error)]
pub enum RestoreRunError {
    /// The log could not be written.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The cluster stayed unavailable past the retries; `restore resume` continues.
    #[error("the cluster is unavailable: {0}")]
    Cluster(String),
    /// The archive is not the one the restore planned, or cannot be read any more.
    #[error("{0}")]
    Archive(String),
    /// The log does not fold.
    #[error("{0}")]
    State(String),
}

/// Something that watches a restore run.
pub trait RestoreObserver: Send {
    /// After each append, with the state including it.
    fn event(&mut self, _event: &RestoreEvent, _state: &RestoreState) {}
    /// After each group commit.
    fn committed(&mut self, _state: &RestoreState) {}
}

/// An observer that does nothing.
pub struct QuietRestore;

impl RestoreObserver for QuietRestore {}

/// The cluster and the runtime a restore acts on (the cluster with its retries).
#[derive(Clone)]
pub struct RestoreWorld {
    /// The target cluster.
    pub cluster: Arc<dyn Cluster>,
    /// Time and where blocking work runs.
    pub runtime: Arc<dyn Runtime>,
}

struct Run<'a, M: LogMedium> {
    log: &'a mut RestoreLog<M>,
    state: &'a mut RestoreState,
    observer: &'a mut dyn RestoreObserver,
    world: &'a RestoreWorld,
}

impl<M: LogMedium> Run<'_, M> {
    fn append(&mut self, event: RestoreEvent) -> Result<(), RestoreRunError> {
        let seq = self.log.append(&event)?;
        self.state.apply(seq, &event).map_err(|e| RestoreRunError::State(e.to_string()))?;
        self.observer.event(&event, self.state);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), RestoreRunError> {
        self.log.flush_on(self.world.runtime.as_ref()).await?;
        self.observer.committed(self.state);
        Ok(())
    }
}

/// Where a restore keeps the archived objects it planned until it creates them: the archive is
/// read once, each item's JSON appended here, and read back (by offset) for its create — so a
/// restore holds what planning needs (a few dozen bytes an item), never the archive or its objects.
/// `restore create|resume` spill to a file in the restore's directory, removed after the run; the
/// simulator's round trips to memory.
pub enum Spill {
    /// In memory.
    Memory(Vec<u8>),
    /// A file (written once, then read at offsets).
    File {
        /// The open file.
        file: std::fs::File,
        /// Its path, for messages.
        path: PathBuf,
        /// Bytes written.
        len: u64,
        /// Writes not yet in the file.
        pending: Vec<u8>,
    },
}

/// What one append to the file spill gathers before it writes.
const SPILL_BUFFER: usize = 1 << 20;

impl Spill {
    /// A file spill at `path` (replacing one an earlier run left).
    pub fn file(path: &Path) -> std::io::Result<Spill> {
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path)?;
        Ok(Spill::File { file, path: path.to_path_buf(), len: 0, pending: Vec::new() })
    }

    /// Appends `bytes`; where they are.
    fn put(&mut self, bytes: &[u8]) -> Result<BodyAt, String> {
        let len = u32::try_from(bytes.len()).map_err(|_| "an archived object of more than 4 GiB".to_string())?;
        match self {
            Spill::Memory(v) => {
                let offset = v.len() as u64;
                v.extend_from_slice(bytes);
                Ok(BodyAt { offset, len })
            }
            Spill::File { len: written, pending, .. } => {
                let offset = *written + pending.len() as u64;
                pending.extend_from_slice(bytes);
                if pending.len() >= SPILL_BUFFER {
                    self.write_pending()?;
                }
                Ok(BodyAt { offset, len })
            }
        }
    }

    /// Writes what `put` gathered.
    fn write_pending(&mut self) -> Result<(), String> {
        use std::io::Write;
        if let Spill::File { file, path, len, pending } = self {
            file.write_all(pending).map_err(|e| format!("writing {}: {e}", path.display()))?;
            *len += pending.len() as u64;
            pending.clear();
        }
        Ok(())
    }

    /// The bytes at `at`.
    fn get(&self, at: BodyAt) -> Result<String, String> {
        let bytes = match self {
            Spill::Memory(v) => {
                let range = at.offset as usize..at.offset as usize + at.len as usize;
                v.get(range).ok_or_else(|| format!("no spilled object at {}", at.offset))?.to_vec()
            }
            Spill::File { file, path, .. } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; at.len as usize];
                file.read_exact_at(&mut buf, at.offset).map_err(|e| format!("reading {}: {e}", path.display()))?;
                buf
            }
        };
        String::from_utf8(bytes).map_err(|_| format!("the spilled object at {} is not UTF-8", at.offset))
    }
}

/// Counts what it reads into a sha256.
struct Hashing<R> {
    inner: R,
    digest: Sha256,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }
}

/// A 128-bit digest of an item's identity: which primary copies were read (the preferred-version
/// copy of one is then not read at all). Distinct identities share one with a probability of about
/// n²/2¹²⁹ — below 10⁻²⁷ for ten million items.
fn identity_digest(dir: &str, namespace: Option<&str>, name: &str) -> u128 {
    let mut d = Sha256::new();
    for part in [dir, namespace.unwrap_or("\0"), name] {
        d.update((part.len() as u64).to_le_bytes());
        d.update(part.as_bytes());
    }
    let out = d.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out[..16]);
    u128::from_le_bytes(first)
}

/// Reads the gzipped archive `archive` (`compressed` bytes) once, item by item, spilling each
/// item's JSON to `spill` and planning it for `spec`; the plan and the archive's sha256.
pub fn plan_archive(
    spec: &RestoreSpec,
    archive: impl std::io::Read,
    compressed: u64,
    spill: &mut Spill,
) -> Result<(RestorePlan, String), String> {
    let mut planner = RestorePlanner::new(spec).map_err(|e| e.to_string())?;
    let mut hashing = Hashing { inner: archive, digest: Sha256::new() };
    let mut primaries: std::collections::HashSet<u128> = std::collections::HashSet::new();
    crate::inspect::for_each_item(&mut hashing, compressed, |e| {
        let id = identity_digest(e.dir, e.namespace, e.name);
        if e.copy && primaries.contains(&id) {
            return Ok(());
        }
        if !e.copy {
            primaries.insert(id);
        }
        let at = spill.put(e.json.as_bytes())?;
        planner.add(e.dir, e.namespace, e.name, e.json, at, e.copy);
        Ok(())
    })?;
    spill.write_pending()?;
    // The digest is of every byte, also those after the tar's end.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| format!("reading the archive: {e}"))?;
    let digest = crate::store::hex(&hashing.digest.finalize());
    Ok((planner.plan(), digest))
}

fn key_of(plan: &RestorePlan, item: &PlannedItem) -> ItemKey {
    let gr = &plan.item_type(item).gr;
    match &item.namespace {
        Some(ns) => ItemKey::namespaced(&gr.group, &gr.resource, ns, &item.name),
        None => ItemKey::cluster(&gr.group, &gr.resource, &item.name),
    }
}

/// The outcome for an object that exists already.
async fn existing(
    cluster: &dyn Cluster,
    rt: &ResourceType,
    planned: Planned<'_>,
    body: &Value,
    found: &str,
    uid: Option<&str>,
) -> Result<ItemOutcome, String> {
    let Planned { plan, item, spec } = planned;
    let found: Value = serde_json::from_str(found).unwrap_or(Value::Null);
    if restored_by(&found, &spec.name, uid) {
        return Ok(ItemOutcome::Created);
    }
    let gr = &plan.item_type(item).gr;
    if gr.group.is_empty() && gr.resource == "namespaces" {
        // Velero: a namespace that exists is used as it is, without a warning.
        return Ok(ItemOutcome::Existed { warning: None });
    }
    match spec.existing_resource_policy {
        ExistingPolicy::None => Ok(ItemOutcome::Existed {
            warning: Some(format!(
                "could not restore {}: it already exists in the cluster (existing-resource-policy none)",
                plan.target(item)
            )),
        }),
        ExistingPolicy::Update => {
            let patch = update_patch(body).to_string();
            match cluster.patch(rt, &key_of(plan, item), &patch).await {
                Ok(_) => Ok(ItemOutcome::Updated),
                Err(ClusterError::Unavailable(m)) => Err(m),
                Err(e) => Ok(ItemOutcome::Existed {
                    warning: Some(format!("could not update {} to the backed-up version: {e}", plan.target(item))),
                }),
            }
        }
    }
}

/// One planned item, with its plan and the restore's spec.
#[derive(Clone, Copy)]
struct Planned<'a> {
    plan: &'a RestorePlan,
    item: &'a PlannedItem,
    spec: &'a RestoreSpec,
}

/// Restores one item, its body read back from `spill`: `Err` only when the cluster stays
/// unavailable (the run stops).
async fn restore_item(
    cluster: &dyn Cluster,
    rt: &ResourceType,
    planned: Planned<'_>,
    spill: &Spill,
    look_first: bool,
    uid: Option<&str>,
) -> Result<ItemOutcome, String> {
    let Planned { plan, item, .. } = planned;
    let made = match item.archived {
        Some(at) => spill.get(at).and_then(|json| plan.body(item, Some(&json))),
        None => plan.body(item, None),
    };
    let body = match made {
        Ok(body) => body,
        Err(error) => return Ok(ItemOutcome::Failed { error: format!("making the object to create: {error}") }),
    };
    let key = key_of(plan, item);
    let get = |rt: ResourceType, key: ItemKey| async move {
        match cluster.get(&rt, &key).await {
            Ok(found) => Ok(found),
            Err(ClusterError::Unavailable(m)) => Err(Err(m)),
            Err(e) => Err(Ok(ItemOutcome::Failed { error: format!("reading it back: {e}") })),
        }
    };
    if look_first {
        match get(rt.clone(), key.clone()).await {
            Ok(Some(found)) => return existing(cluster, rt, planned, &body, &found, uid).await,
            Ok(None) => {}
            Err(end) => return end,
        }
    }
    // The annotation goes on the create only (an update patches the backed-up version).
    let sent = match uid {
        Some(u) => with_restore_uid(&body, u).to_string(),
        None => body.to_string(),
    };
    match cluster.create(rt, item.namespace.as_deref(), &sent).await {
        Ok(_) => Ok(ItemOutcome::Created),
        Err(ClusterError::AlreadyExists(m)) => match get(rt.clone(), key).await {
            Ok(Some(found)) => existing(cluster, rt, planned, &body, &found, uid).await,
            Ok(None) => Ok(ItemOutcome::Failed {
                error: format!("the create answered AlreadyExists ({m}), yet it is not there"),
            }),
            Err(end) => end,
        },
        Err(ClusterError::Unavailable(m)) => Err(m),
        Err(e) => Ok(ItemOutcome::Failed { error: e.to_string() }),
    }
}

/// The cluster's resource types by `resource[.group]`.
async fn discover(cluster: &dyn Cluster) -> Result<BTreeMap<String, ResourceType>, RestoreRunError> {
    let types = cluster.discover().await.map_err(|e| RestoreRunError::Cluster(format!("discovery: {e}")))?;
    Ok(types.into_iter().map(|rt| (rt.gr.dir_name(), rt)).collect())
}

/// Waits until each restored CRD is Established (or the timeout passes: its objects then fail as
/// not served, and say so).
async fn await_established(world: &RestoreWorld, crds: &[ItemKey]) -> Result<(), RestoreRunError> {
    let rt =
        ResourceType::new("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", false);
    let deadline = world.runtime.now_ms() + CRD_ESTABLISHED_TIMEOUT_MS;
    for key in crds {
        loop {
            let found = match world.cluster.get(&rt, key).await {
                Ok(found) => found,
                Err(ClusterError::Unavailable(m)) => return Err(RestoreRunError::Cluster(m)),
                Err(_) => None,
            };
            let established = found.and_then(|f| serde_json::from_str::<Value>(&f).ok()).is_some_and(|v| {
                v.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Established" && c["status"] == "True"))
            });
            if established || world.runtime.now_ms() >= deadline {
                break;
            }
            world.runtime.sleep(CRD_POLL_MS).await;
        }
    }
    Ok(())
}

/// The archive a restore run reads: a reader of its gzipped bytes, how many there are, and where
/// the run spills the objects it plans until it creates them.
pub struct ArchiveInput<'a> {
    /// The gzipped archive.
    pub reader: &'a mut (dyn std::io::Read + Send),
    /// Its length in bytes (bounds what it may decompress to).
    pub len: u64,
    /// Where the planned objects wait for their creates.
    pub spill: &'a mut Spill,
}

impl<'a> ArchiveInput<'a> {
    /// An archive held in memory, spilled to `spill`.
    pub fn bytes(archive: &'a mut &'a [u8], spill: &'a mut Spill) -> ArchiveInput<'a> {
        let len = archive.len() as u64;
        ArchiveInput { reader: archive, len, spill }
    }
}

/// Drives a restore to its end (see the module docs). `state` is the fold of `log`; `archive` the
/// archive its request names, read once.
pub async fn drive_restore<M: LogMedium>(
    log: &mut RestoreLog<M>,
    state: &mut RestoreState,
    archive: ArchiveInput<'_>,
    world: &RestoreWorld,
    observer: &mut dyn RestoreObserver,
    uid: Option<&str>,
) -> Result<(), RestoreRunError> {
    if state.finished_ms.is_some() {
        return Ok(());
    }
    let spec = state.spec.clone();
    let workers = state.workers.max(1) as usize;
    let mut run = Run { log, state, observer, world };
    let ArchiveInput { reader, len, spill } = archive;
    // An archive that cannot be read, or is not the one planned, will not mend by waiting: the
    // restore fails (also one half done), with the reason in its log.
    let checked = match (plan_archive(&spec, reader, len, spill), run.state.archive_sha256.clone()) {
        (Err(e), _) => Err(format!("the archive cannot be read: {e}")),
        (Ok((plan, digest)), Some(recorded)) if recorded != digest || plan.items.len() as u32 != run.state.items => {
            Err(format!("the archive changed since the restore planned it (sha256 {recorded}, now {digest})"))
        }
        (Ok((plan, digest)), recorded) => Ok((plan, digest, recorded)),
    };
    let spill: &Spill = spill;
    let plan = match checked {
        Err(error) => {
            run.append(RestoreEvent::RestoreFailed { error, at_ms: world.runtime.now_ms() })?;
            return run.flush().await;
        }
        Ok((plan, _, Some(_))) => plan,
        Ok((mut plan, digest, None)) => {
            let mut planned: BTreeMap<String, u32> = BTreeMap::new();
            for i in &plan.items {
                *planned.entry(plan.item_type(i).dir.clone()).or_default() += 1;
            }
            run.append(RestoreEvent::Planned {
                archive_sha256: digest,
                items: plan.items.len() as u32,
                planned,
                // The run needs neither list again: the event takes them.
                skipped: std::mem::take(&mut plan.skipped),
                invalid: std::mem::take(&mut plan.invalid),
                filtered: plan.filtered as u32,
                at_ms: world.runtime.now_ms(),
            })?;
            run.flush().await?;
            plan
        }
    };
    // Intents an earlier run left without outcomes: those creates may have reached the cluster.
    let earlier: BTreeSet<u32> =
        run.state.intents.difference(&run.state.done.keys().copied().collect()).copied().collect();
    let mut types = discover(world.cluster.as_ref()).await?;
    for (gr, range) in &plan.stages {
        let pending: Vec<u32> = range.clone().map(|i| i as u32).filter(|i| !run.state.done.contains_key(i)).collect();
        let is_crd = gr.group == "apiextensions.k8s.io" && gr.resource == "customresourcedefinitions";
        if !pending.is_empty() && !types.contains_key(&gr.dir_name()) {
            types = discover(world.cluster.as_ref()).await?;
        }
        for window in pending.chunks(workers * WINDOW_PER_WORKER) {
            let Some(served) = types.get(&gr.dir_name()).cloned() else {
                for &i in window {
                    let item = &plan.items[i as usize];
                    run.append(RestoreEvent::ItemRestored {
                        item: i,
                        target: plan.target(item),
                        outcome: ItemOutcome::Failed { error: format!("the cluster does not serve {gr}") },
                        at_ms: world.runtime.now_ms(),
                    })?;
                }
                continue;
            };
            let fresh: Vec<u32> = window.iter().copied().filter(|i| !run.state.intents.contains(i)).collect();
            if !fresh.is_empty() {
                run.append(RestoreEvent::CreatesStarted { items: fresh })?;
            }
            // The intents are durable before any create of the window is sent.
            run.flush().await?;
            let mut creates = Vec::with_capacity(window.len());
            for &i in window {
                let item = &plan.items[i as usize];
                let ty = plan.item_type(item);
                let rt = ResourceType { version: ty.version.clone(), kind: ty.kind.clone(), ..served.clone() };
                let look = earlier.contains(&i) && !mutation::active(Mutation::RestoreSkipsLookup);
                let cluster = world.cluster.clone();
                let planned = Planned { plan: &plan, item, spec: &spec };
                creates.push(async move { (i, restore_item(cluster.as_ref(), &rt, planned, spill, look, uid).await) });
            }
            let mut done = futures::stream::iter(creates).buffer_unordered(workers);
            let mut unavailable = None;
            while let Some((i, outcome)) = done.next().await {
                match outcome {
                    Ok(outcome) => {
                        let target = plan.target(&plan.items[i as usize]);
                        let at_ms = world.runtime.now_ms();
                        run.append(RestoreEvent::ItemRestored { item: i, target, outcome, at_ms })?;
                    }
                    Err(m) => unavailable = unavailable.or(Some(m)),
                }
            }
            drop(done);
            run.flush().await?;
            if let Some(m) = unavailable {
                return Err(RestoreRunError::Cluster(m));
            }
        }
        if is_crd {
            let crds: Vec<ItemKey> = range
                .clone()
                .filter(
                    |i| matches!(run.state.done.get(&(*i as u32)), Some(o) if !matches!(o, ItemOutcome::Failed { .. })),
                )
                .map(|i| key_of(&plan, &plan.items[i]))
                .collect();
            await_established(world, &crds).await?;
            types = discover(world.cluster.as_ref()).await?;
        }
    }
    run.append(RestoreEvent::RestoreFinished { at_ms: world.runtime.now_ms() })?;
    run.flush().await
}

/// Where a restore's archive is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ArchiveSource {
    /// A backup in a store: `backups/<name>/<name>.tar.gz`.
    Backup {
        /// The backup.
        name: String,
        /// Its store.
        storage: StorageSpec,
    },
    /// An archive file (any Velero archive).
    File {
        /// Absolute path.
        path: PathBuf,
    },
}

impl std::fmt::Display for ArchiveSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchiveSource::Backup { name, storage: StorageSpec::Local { root: Some(root) } } => {
                write!(f, "backup {name} in {}", root.display())
            }
            ArchiveSource::Backup { name, storage: StorageSpec::Local { root: None } } => {
                write!(f, "backup {name} in the default store")
            }
            ArchiveSource::Backup { name, storage: StorageSpec::S3(loc) } => write!(f, "backup {name} in {loc:?}"),
            ArchiveSource::File { path } => write!(f, "file {}", path.display()),
        }
    }
}

impl ArchiveSource {
    /// Opens the archive for a run: the named file, or the store's archive downloaded (streamed)
    /// to `download` — a restore never holds the archive in memory.
    pub async fn open(&self, data: &DataDir, download: &Path) -> Result<(std::fs::File, u64), SessionError> {
        let path = match self {
            ArchiveSource::File { path } => path.clone(),
            ArchiveSource::Backup { name, storage } => {
                let store = data.open_store(storage)?;
                if !store.download_file(name, &format!("{name}.tar.gz"), download).await? {
                    return Err(SessionError::File {
                        what: "reading the archive",
                        path: PathBuf::from(store.archive_location(name)),
                        message: "the backup has no archive there (is it finished?)".into(),
                    });
                }
                download.to_path_buf()
            }
        };
        let err = |e: std::io::Error| SessionError::File {
            what: "reading the archive",
            path: path.clone(),
            message: e.to_string(),
        };
        let file = std::fs::File::open(&path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        Ok((file, len))
    }
}

/// What `restore.json` records beside the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreFiles {
    /// The archive.
    pub archive: ArchiveSource,
    /// The target cluster.
    pub cluster: ClusterSource,
    /// The uid of the `restores.blockwise.dev` object this restore runs for (the controller), so a
    /// Restore deleted and created again under the name gets a fresh restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// A restore in a data directory, opened for a run.
pub struct RestoreSession {
    data: DataDir,
    name: String,
    log: RestoreLog,
    state: RestoreState,
    files: RestoreFiles,
    report: OpenReport,
}

impl DataDir {
    /// Where the restores' directories are.
    pub fn restores(&self) -> PathBuf {
        self.root().join("restores")
    }

    /// One restore's directory.
    pub fn restore_dir(&self, name: &str) -> PathBuf {
        self.restores().join(name)
    }

    /// The names of every restore, sorted.
    pub fn restore_names(&self) -> Result<Vec<String>, SessionError> {
        crate::session::entry_names(&self.restores())
    }

    fn restore_not_found(&self, name: &str) -> SessionError {
        SessionError::NotFound { what: "restore", name: name.to_string(), data_dir: self.root().into() }
    }

    /// A restore's log directory, if it has a log.
    fn restore_log_dir(&self, name: &str) -> Result<PathBuf, SessionError> {
        let dir = self.restore_dir(name).join("log");
        match dir.join("db").is_file() {
            true => Ok(dir),
            false => Err(self.restore_not_found(name)),
        }
    }

    /// A restore's state, its log folded as it is read (while no run holds it; else
    /// `LogError::InUse`).
    pub fn restore_state(&self, name: &str) -> Result<RestoreState, SessionError> {
        let dir = self.restore_log_dir(name)?;
        let (_, events, state, _) = RestoreLog::open_folding(SledMedium::open_for_reading(&dir)?)?;
        if events == 0 {
            return Err(self.restore_not_found(name));
        }
        state.map_err(|e| SessionError::RestoreState { name: name.into(), message: e.to_string() })
    }

    /// Gives `f` each of a restore's events in order, one at a time (`restore logs`), while no
    /// run holds its log.
    pub fn for_each_restore_event(
        &self,
        name: &str,
        mut f: impl FnMut(Seq, &RestoreEvent),
    ) -> Result<(), SessionError> {
        let medium = SledMedium::open_for_reading(&self.restore_log_dir(name)?)?;
        scan_records::<_, RestoreEvent>(&medium, "restore", |seq, e| f(seq, &e))?;
        Ok(())
    }

    /// A restore's state: from its log, or the live view of the process that runs it.
    pub fn restore_status(&self, name: &str) -> Result<RestoreStatus, SessionError> {
        match self.restore_state(name) {
            Ok(state) => Ok(RestoreStatus::Log { state: Box::new(state) }),
            Err(SessionError::Log(LogError::InUse(_))) => {
                let path = self.restore_dir(name).join("status.json");
                let bytes = std::fs::read(&path).map_err(|e| SessionError::File {
                    what: "reading the live status",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let view = serde_json::from_slice(&bytes).map_err(|e| SessionError::File {
                    what: "parsing",
                    path,
                    message: e.to_string(),
                })?;
                Ok(RestoreStatus::Live { view })
            }
            Err(e) => Err(e),
        }
    }
}

/// What [`DataDir::restore_status`] found.
pub enum RestoreStatus {
    /// From the log (folded as it was read).
    Log {
        /// The fold of its events.
        state: Box<RestoreState>,
    },
    /// Another process runs it: its live view (`crate::report::restore_json`).
    Live {
        /// The view.
        view: Value,
    },
}

impl RestoreSession {
    /// Creates a restore crash-atomically (built under `restores/.new-<name>-<pid>`, renamed into
    /// place once its request is durable), as a backup is created.
    pub fn create(
        data: &DataDir,
        spec: RestoreSpec,
        files: RestoreFiles,
        workers: u32,
        now_ms: u64,
    ) -> Result<RestoreSession, SessionError> {
        spec.validate()?;
        let name = spec.name.clone();
        let dir = data.restore_dir(&name);
        if dir.exists() {
            match data.restore_state(&name) {
                Ok(state) => {
                    return Err(match state.phase() {
                        RestorePhase::InProgress => SessionError::Restore {
                            name: name.clone(),
                            message: format!(
                                "it is InProgress (interrupted): run `blockwise restore resume {name}` to continue it"
                            ),
                        },
                        phase => SessionError::Restore {
                            name: name.clone(),
                            message: format!("it already exists ({phase})"),
                        },
                    });
                }
                Err(SessionError::NotFound { .. }) => remove_tree(&dir)?,
                Err(e) => return Err(e),
            }
        }
        let parent = data.restores();
        crate::store::create_dirs(&parent).map_err(|e| SessionError::File {
            what: "creating",
            path: parent.clone(),
            message: e.to_string(),
        })?;
        let tmp = parent.join(format!(".new-{name}-{}", std::process::id()));
        remove_tree(&tmp)?;
        std::fs::create_dir(&tmp).map_err(file_err("creating", &tmp))?;
        write_json_durable(&tmp.join("restore.json"), &files)?;
        {
            let mut log = RestoreLog::create_on(SledMedium::open(&tmp.join("log"))?, &name)?;
            log.append(&RestoreEvent::Requested { spec, source: files.archive.to_string(), workers, at_ms: now_ms })?;
            log.flush()?;
        }
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &dir).map_err(file_err("renaming into place", &dir))?;
        sync_dir(&parent)?;
        RestoreSession::open(data, &name)
    }

    /// Opens an existing restore for a run (`resume`).
    pub fn open(data: &DataDir, name: &str) -> Result<RestoreSession, SessionError> {
        let dir = data.restore_dir(name);
        let (log, events, state, report) = RestoreLog::open_folding(SledMedium::open(&data.restore_log_dir(name)?)?)?;
        if events == 0 {
            return Err(data.restore_not_found(name));
        }
        let state = state.map_err(|e| SessionError::RestoreState { name: name.into(), message: e.to_string() })?;
        let path = dir.join("restore.json");
        let bytes = std::fs::read(&path).map_err(|e| SessionError::File {
            what: "reading",
            path: path.clone(),
            message: e.to_string(),
        })?;
        let files: RestoreFiles = serde_json::from_slice(&bytes).map_err(|e| SessionError::File {
            what: "parsing",
            path,
            message: e.to_string(),
        })?;
        Ok(RestoreSession { data: data.clone(), name: name.into(), log, state, files, report })
    }

    /// The state as opened.
    pub fn state(&self) -> &RestoreState {
        &self.state
    }

    /// What `restore.json` says.
    pub fn files(&self) -> &RestoreFiles {
        &self.files
    }

    /// What opening the log found.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Runs the restore to its end against `cluster` (wrapped in the shell's retries), keeping the
    /// live view current.
    pub async fn run(
        mut self,
        cluster: Arc<dyn Cluster>,
        observer: &mut dyn RestoreObserver,
    ) -> Result<RestoreState, RestoreRunError> {
        let runtime: Arc<dyn Runtime> = Arc::new(crate::world::TokioRuntime);
        if self.state.finished_ms.is_none() {
            let dir = self.data.restore_dir(&self.name);
            let (download, spilled) = (dir.join("archive.tar.gz"), dir.join("spill"));
            let (archive, len) = match self.files.archive.open(&self.data, &download).await {
                Ok(a) => a,
                // The store unreachable: the run stops, and is resumed once it answers.
                Err(SessionError::Store(e)) if e.is_transient() => return Err(RestoreRunError::Archive(e.to_string())),
                Err(e) => {
                    // Gone (its Backup deleted, its store emptied) or unreadable: nothing brings
                    // it back by waiting, so the restore has failed — also one already half done
                    // (retried, it would stay InProgress for ever).
                    let error = match self.state.archive_sha256 {
                        Some(_) => format!("the archive the restore planned is gone: {e}"),
                        None => e.to_string(),
                    };
                    let ev = RestoreEvent::RestoreFailed { error, at_ms: runtime.now_ms() };
                    let seq = self.log.append(&ev)?;
                    self.state.apply(seq, &ev).map_err(|e| RestoreRunError::State(e.to_string()))?;
                    self.log.flush_on(runtime.as_ref()).await?;
                    return Ok(self.state);
                }
            };
            let world = RestoreWorld {
                cluster: Arc::new(crate::retry::RetryingCluster::new(
                    cluster,
                    crate::retry::RetryPolicy::default(),
                    runtime.clone(),
                )),
                runtime: runtime.clone(),
            };
            let mut live = RestoreLive { dir, last_ms: 0, inner: observer };
            live.write(&self.state);
            let uid = self.files.uid.as_deref();
            let result = match Spill::file(&spilled) {
                Ok(mut spill) => {
                    let mut reader = std::io::BufReader::with_capacity(1 << 16, archive);
                    let input = ArchiveInput { reader: &mut reader, len, spill: &mut spill };
                    drive_restore(&mut self.log, &mut self.state, input, &world, &mut live, uid).await
                }
                Err(e) => Err(RestoreRunError::Archive(format!("creating {}: {e}", spilled.display()))),
            };
            live.write(&self.state);
            // What the run downloaded and spilled is read again by the next run, not kept.
            for leftover in [&download, &spilled] {
                if let Err(e) = std::fs::remove_file(leftover) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("removing {}: {e}", leftover.display());
                    }
                }
            }
            result?;
        }
        Ok(self.state)
    }
}

/// Keeps `status.json` current during a run (at most every `STATUS_INTERVAL_MS`).
struct RestoreLive<'a> {
    dir: PathBuf,
    last_ms: u64,
    inner: &'a mut dyn RestoreObserver,
}

impl RestoreLive<'_> {
    fn write(&mut self, state: &RestoreState) {
        // Streamed: a large restore's view (its skipped items) is never held whole.
        let written = crate::store::write_atomic_with(&self.dir.join("status.json"), |w| {
            crate::report::write_restore_json(w, state).map_err(std::io::Error::other)
        });
        if let Err(e) = written {
            tracing::warn!("writing the live status of the restore: {e}");
        }
    }
}

impl RestoreObserver for RestoreLive<'_> {
    fn event(&mut self, event: &RestoreEvent, state: &RestoreState) {
        self.inner.event(event, state);
    }

    fn committed(&mut self, state: &RestoreState) {
        self.inner.committed(state);
        let now = crate::world::TokioRuntime.now_ms();
        if now >= self.last_ms + crate::session::STATUS_INTERVAL_MS {
            self.last_ms = now;
            self.write(state);
        }
    }
}
