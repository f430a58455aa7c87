//! The one driver between the engine and the world (DESIGN §1): production and the simulator both
//! run [`drive`], and nothing else executes the engine's commands.
//!
//! [`drive`] appends the engine's events to the [`EventLog`] and group-commits them (one flush for
//! every batch of appends), and starts a command only once the event its `after_seq` names is
//! durable — so a `HookStarted` is on disk before its exec is sent and a `BlockStarted` before any
//! write of that attempt. Staged items are not synced one by one: before a flush that makes
//! `ItemWritten` facts durable, the store's `sync_staged` barrier makes the items durable first, so
//! a fact never outlives its item. Commands run concurrently (at most `workers + 4` at once) through
//! [`Runtime::spawn`]; hook timeouts are enforced here on the runtime's clock by dropping the exec
//! future, which cancels the exec stream. When the backup reaches a terminal phase,
//! [`store_backup_files`] stores Velero's companion files, `velero-backup.json` last.
//!
//! What differs between production and simulation is only the [`World`] (cluster, store, runtime)
//! and the log's medium; the simulator drops the future returned by [`drive`] to crash the process.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use blockwise_engine::body::Body;
use blockwise_engine::entries::{final_write, Versions};
use blockwise_engine::event::{Event, HookOutcome, Seq};
use blockwise_engine::mutation::{self, Mutation};
use blockwise_engine::ports::{Cluster, ClusterError};
use blockwise_engine::state::BackupState;
use blockwise_engine::{CmdId, Command, CommandKind, Completion, Engine, FinalizeError, ItemKey};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sha2::{Digest, Sha256};

use crate::entry_runs::ArchiveEntries;
use crate::log::{Bodies, EventLog, LogError, LogMedium};
use crate::report;
use crate::store::{Store, StoreError};
use crate::world::{timeout, BoxFuture, Runtime};

/// Events appended before a flush is forced even when no command waits for one.
pub const FLUSH_BATCH_EVENTS_MAX: usize = 1024;
/// Bytes of hook output kept in a hook result.
pub const HOOK_OUTPUT_BYTES_MAX: usize = 1024;
/// Commands in flight beyond one per worker (listing and gets run beside the blocks).
pub const EXECUTORS_EXTRA: usize = 4;

/// Everything outside the engine and the log that a backup acts on.
#[derive(Clone)]
pub struct World {
    /// The cluster (with its retries).
    pub cluster: Arc<dyn Cluster>,
    /// The store (with its retries).
    pub store: Arc<dyn Store>,
    /// Time and where work runs.
    pub runtime: Arc<dyn Runtime>,
}

/// Why a run stopped before the backup reached a terminal phase.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The log could not be written or flushed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The engine hit an internal inconsistency.
    #[error("engine stopped: {0}")]
    Engine(String),
    /// The store failed after its retries; the engine closed the open hook windows and recorded
    /// `RunStopped` (durable), and the backup can be resumed once the store is back.
    #[error("the run stopped: {0}")]
    Stopped(String),
    /// A companion file could not be stored; `resume` of the finished backup stores it again.
    #[error("storing {file} failed: {source}")]
    Files { file: String, source: StoreError },
    /// The companion files could not be encoded.
    #[error("encoding the backup's files failed: {0}")]
    Encode(String),
}

/// Something that watches a run (progress bar, plain lines, a status file, nothing).
pub trait Observer: Send {
    /// Called after each event is appended, with the state including it.
    fn event(&mut self, event: &Event, state: &BackupState);
    /// Called after each group commit: every event so far is durable.
    fn committed(&mut self, _state: &BackupState) {}
    /// Called after each group commit with how long making it durable took (metrics).
    fn flushed(&mut self, _took: std::time::Duration) {}
}

/// An observer that does nothing.
pub struct Quiet;

impl Observer for Quiet {
    fn event(&mut self, _: &Event, _: &BackupState) {}
}

fn truncate(s: &str) -> String {
    if s.len() <= HOOK_OUTPUT_BYTES_MAX {
        return s.trim_end().to_string();
    }
    let mut end = HOOK_OUTPUT_BYTES_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Stages `key` with its body's bytes (held, or read back from the log's objects); returns their
/// sha256 and length.
async fn stage(
    store: &dyn Store,
    backup: &str,
    key: &ItemKey,
    body: &Body,
    bodies: &Bodies,
) -> Result<([u8; 32], u64), String> {
    let json = body.resolve(|id| bodies.get(id).map_err(|e| format!("reading the logged object back: {e}")))?;
    store.put_item(backup, key, json.as_bytes()).await.map_err(|e| e.to_string())?;
    Ok((Sha256::digest(json.as_bytes()).into(), json.len() as u64))
}

/// Whether a call's failure is the API server's absence: a transient failure (past its retries)
/// after which the server does not answer at all. A resource that keeps answering 503 (an
/// aggregated API whose backend is down) is that resource's failure, recorded as such; only a
/// server that cannot be reached stops the run. `Some(why)` names both.
async fn unreachable(cluster: &dyn Cluster, error: Option<&ClusterError>) -> Option<String> {
    let Some(e @ ClusterError::Unavailable(_)) = error else { return None };
    probe(cluster).await.map(|probe| format!("{e}; then {probe}"))
}

/// Asks the API server whether it answers at all: `Some(why)` when it does not (never under the
/// planted bug `UnreachableRecordedAsFailure`).
async fn probe(cluster: &dyn Cluster) -> Option<String> {
    if mutation::active(Mutation::UnreachableRecordedAsFailure) {
        return None;
    }
    match cluster.reachable().await {
        Err(ClusterError::Unavailable(m)) => Some(m),
        _ => None,
    }
}

/// A snapshot command's completion, or — when some of it failed and the API server does not
/// answer — [`Completion::Unreachable`]: the failures are the cluster's, not the snapshots'.
async fn unless_unreachable(cluster: &dyn Cluster, failed: bool, what: &str, done: Completion) -> Completion {
    if !failed {
        return done;
    }
    match probe(cluster).await {
        Some(m) => Completion::Unreachable(format!("{what}: {m}")),
        None => done,
    }
}

/// The archive's entries a `Finalize` is dispatched with ([`archive_entries`]), or why they could
/// not be sorted.
type Entries = Option<Result<Arc<ArchiveEntries>, String>>;

/// Executes one command against the world; bodies the log carries are read from `bodies`, and a
/// `Finalize` builds the archive of `entries` (gathered from the log by [`archive_entries`]).
async fn execute(kind: CommandKind, entries: Entries, backup: &str, world: &World, bodies: &Bodies) -> Completion {
    let (cluster, store, rt) = (world.cluster.as_ref(), world.store.as_ref(), world.runtime.as_ref());
    match kind {
        CommandKind::Discover => {
            let r = cluster.discover().await;
            match unreachable(cluster, r.as_ref().err()).await {
                Some(m) => Completion::Unreachable(format!("discovery: {m}")),
                None => Completion::Discovered(r),
            }
        }
        CommandKind::List { unit, resource, limit, continue_token } => {
            let r = cluster.list(&resource, unit.namespace.as_deref(), limit, continue_token.as_deref()).await;
            match unreachable(cluster, r.as_ref().err()).await {
                Some(m) => Completion::Unreachable(m),
                None => Completion::Listed(r),
            }
        }
        CommandKind::Get { items } => {
            // Each key's answer stands on its own: one failing get does not fail the others — but
            // a cluster that cannot be reached fails none of them (the run stops).
            let mut out = Vec::with_capacity(items.len());
            for (rt, key) in items {
                let got = cluster.get(&rt, &key).await;
                if let Some(m) = unreachable(cluster, got.as_ref().err()).await {
                    return Completion::Unreachable(m);
                }
                out.push((key, got));
            }
            Completion::Fetched(out)
        }
        CommandKind::RunHook { hook, .. } => {
            let exec = cluster.exec(&hook.pod, &hook.container, &hook.command);
            let result = if mutation::active(Mutation::NoHookTimeout) {
                Some(exec.await)
            } else {
                timeout(rt, hook.timeout_ms, exec).await
            };
            let what = format!("hook {} of pod {} ({:?})", hook.index, hook.pod, hook.phase);
            let outcome = match result {
                // A timeout with a server that does not answer is the cluster's, not the hook's.
                None => match probe(cluster).await {
                    Some(m) => {
                        return Completion::Unreachable(format!(
                            "{what} timed out after {} ms and the API server does not answer: {m}",
                            hook.timeout_ms
                        ))
                    }
                    None => HookOutcome::TimedOut { timeout_ms: hook.timeout_ms },
                },
                Some(Err(e)) => match unreachable(cluster, Some(&e)).await {
                    Some(m) => return Completion::Unreachable(format!("{what}: {m}")),
                    None => HookOutcome::Errored { message: e.to_string() },
                },
                Some(Ok(r)) if r.exit_code == 0 => HookOutcome::Succeeded,
                Some(Ok(r)) => {
                    let output = if r.stderr.trim().is_empty() { truncate(&r.stdout) } else { truncate(&r.stderr) };
                    HookOutcome::Exited { code: r.exit_code, output }
                }
            };
            Completion::HookRan(outcome)
        }
        CommandKind::WriteItem { key, body, .. } => {
            Completion::Written(stage(store, backup, &key, &body, bodies).await)
        }
        CommandKind::Restage { key, body } => {
            Completion::Restaged(stage(store, backup, &key, &body, bodies).await.map(|_| ()))
        }
        CommandKind::InspectVolumes { pvs, classes } => {
            let inv = crate::csi::inspect(cluster, &pvs, &classes).await;
            let unavailable = inv
                .volumes
                .iter()
                .filter_map(|(_, r)| r.as_ref().err())
                .chain(inv.classes.as_ref().err())
                .chain(inv.group_classes.as_ref().err())
                .find(|e| matches!(e, ClusterError::Unavailable(_)))
                .cloned();
            match unreachable(cluster, unavailable.as_ref()).await {
                Some(m) => Completion::Unreachable(format!("inspecting volumes: {m}")),
                None => Completion::VolumesInspected(inv),
            }
        }
        CommandKind::CutSnapshots { api, group_label, orders, timeout_ms, .. } => {
            let r = crate::csi::cut_all(cluster, rt, &api, &group_label, &orders, timeout_ms).await;
            let failed = r.iter().any(|(_, r)| r.is_err());
            unless_unreachable(cluster, failed, "cutting snapshots", Completion::SnapshotsCut(r)).await
        }
        CommandKind::AwaitSnapshots { api, waits } => {
            let r = crate::csi::await_ready(cluster, rt, &api, &waits).await;
            let failed = r.iter().any(|(_, r)| r.is_err());
            unless_unreachable(cluster, failed, "waiting for snapshots", Completion::SnapshotsSettled(r)).await
        }
        CommandKind::ReleaseSnapshots { api, group_label, orders } => {
            let r = crate::csi::release_all(cluster, &api, &group_label, &orders).await;
            let failed = r.iter().any(|(_, r)| r.is_err());
            unless_unreachable(cluster, failed, "releasing snapshots", Completion::SnapshotsReleased(r)).await
        }
        CommandKind::Finalize => {
            let entries = match entries {
                Some(Ok(entries)) => entries,
                Some(Err(e)) => return Completion::Finalized(Err(FinalizeError::Store(e))),
                None => {
                    let e = "the driver gathered no entries for the archive".to_string();
                    return Completion::Finalized(Err(FinalizeError::Store(e)));
                }
            };
            Completion::Finalized(store.finalize(backup, entries).await.map_err(|e| match e {
                StoreError::Unstaged { ref keys, .. } => {
                    FinalizeError::Unstaged { keys: keys.clone(), message: e.to_string() }
                }
                e => FinalizeError::Store(e.to_string()),
            }))
        }
    }
}

/// Starts `cmd` on the world's runtime; the future yields its id and completion (`None` only if
/// the task ended without one, which the runtime's spawn rules out: a panic is re-raised).
fn dispatch(
    cmd: Command,
    entries: Entries,
    backup: &Arc<str>,
    world: &World,
    bodies: &Arc<Bodies>,
) -> BoxFuture<(CmdId, Option<Completion>)> {
    let slot: Arc<Mutex<Option<Completion>>> = Arc::new(Mutex::new(None));
    let (out, backup, w, bodies) = (slot.clone(), backup.clone(), world.clone(), bodies.clone());
    let id = cmd.id;
    let work = world.runtime.spawn(Box::pin(async move {
        let c = execute(cmd.kind, entries, &backup, &w, &bodies).await;
        *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(c);
    }));
    Box::pin(async move {
        work.await;
        let c = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        (id, c)
    })
}

/// Group commit: makes staged items durable if facts about them are pending, then flushes the log.
/// A barrier that fails is a store failure: the engine is told, stops starting work, and closes
/// its open hook windows; the facts are flushed anyway, and an item they name that did not survive
/// is staged again from the log when the archive is built.
async fn commit<M: LogMedium>(
    log: &mut EventLog<M>,
    engine: &mut Engine,
    world: &World,
    staged_unsynced: &mut bool,
) -> Result<(), RunError> {
    if *staged_unsynced {
        *staged_unsynced = false;
        if mutation::active(Mutation::SkipStagedSync) {
            // Deliberate bug: facts about staged items become durable before the items.
        } else if let Err(e) = world.store.sync_staged(log.name()).await {
            engine.store_failed(format!("making staged items durable failed: {e}"));
        }
    }
    log.flush_on(world.runtime.as_ref()).await?;
    Ok(())
}

/// Commands in flight, each yielding its id and completion.
type InFlight = FuturesUnordered<BoxFuture<(CmdId, Option<Completion>)>>;

/// What [`dispatch_ready`] starts commands with.
struct Dispatch<'a, M: LogMedium> {
    backup: &'a Arc<str>,
    world: &'a World,
    bodies: &'a Arc<Bodies>,
    log: &'a EventLog<M>,
    executors_max: usize,
}

/// Starts ready commands, in order, while fewer than `executors_max` are in flight; a `Finalize`
/// with the archive's entries gathered from the log over `state` (every event is durable by then:
/// the command waits for the last one). Entries that cannot be sorted (the log's disk is full)
/// fail the `Finalize` as a store failure would; a log that cannot be read stops the run.
fn dispatch_ready<M: LogMedium>(
    ready: &mut VecDeque<Command>,
    inflight: &mut InFlight,
    d: &Dispatch<'_, M>,
    state: &BackupState,
) -> Result<(), LogError> {
    while inflight.len() < d.executors_max {
        let Some(cmd) = ready.pop_front() else { break };
        let entries = match cmd.kind {
            CommandKind::Finalize => Some(archive_entries(d.log, state)?.map(Arc::new)),
            _ => None,
        };
        inflight.push(dispatch(cmd, entries, d.backup, d.world, d.bodies));
    }
    Ok(())
}

/// The archive's entries: the log's writes that `state` (folded from it) says the archive holds
/// ([`final_write`]), read in one pass over the log and sorted beside it
/// ([`LogMedium::sort_dir`]; in memory for a log held there). `Err` is the log's; `Ok(Err)` says
/// why the entries could not be sorted.
pub fn archive_entries<M: LogMedium>(
    log: &EventLog<M>,
    state: &BackupState,
) -> Result<Result<ArchiveEntries, String>, LogError> {
    let dir = log.medium().sort_dir().map(|d| d.join("archive-entries"));
    let where_ = || dir.as_ref().map_or_else(|| "memory".to_string(), |d| d.display().to_string());
    let mut builder = match ArchiveEntries::builder(dir.as_deref()) {
        Ok(b) => b,
        Err(e) => return Ok(Err(format!("sorting the archive's entries in {}: {e}", where_()))),
    };
    let versions = Versions::of(state);
    let mut failed = None;
    log.for_each_event(|_, e| {
        if let (None, Some((block, key, digest))) = (&failed, final_write(state, e)) {
            failed = builder.push(block, key, versions.of_key(key), digest).err();
        }
        Ok(())
    })?;
    let sorted = match failed {
        None => builder.finish(),
        Some(e) => Err(e),
    };
    Ok(sorted.map_err(|e| format!("sorting the archive's entries in {}: {e}", where_())))
}

/// Moves the commands whose intent is durable (up to `durable`) from `waiting` to `ready`, in order.
fn promote(waiting: &mut Vec<Command>, ready: &mut VecDeque<Command>, durable: Option<Seq>) {
    let (go, stay): (Vec<Command>, Vec<Command>) = std::mem::take(waiting).into_iter().partition(|c| {
        mutation::active(Mutation::DispatchBeforeDurable) || c.after_seq.is_none_or(|s| durable.is_some_and(|d| s <= d))
    });
    *waiting = stay;
    ready.extend(go);
}

/// Finished blocks between two returns of the allocator's free memory ([`drive`]).
const TRIM_BLOCKS: u32 = 100_000;

/// Runs `engine` until the backup reaches a terminal phase, the run stops (a store outage, after
/// closing the open hook windows), or the log fails. At most `workers + 4` commands run at once.
pub async fn drive<M: LogMedium>(
    mut engine: Engine,
    log: &mut EventLog<M>,
    world: &World,
    workers: usize,
    observer: &mut dyn Observer,
) -> Result<BackupState, RunError> {
    let backup: Arc<str> = Arc::from(log.name());
    let bodies = log.bodies();
    // The engine reads each block's plan back from the log when the block starts.
    engine.use_plans(log.plans());
    let rt = world.runtime.clone();
    let executors_max = workers.max(1) + EXECUTORS_EXTRA;
    let mut waiting: Vec<Command> = Vec::new();
    let mut ready: VecDeque<Command> = VecDeque::new();
    let mut inflight: InFlight = FuturesUnordered::new();
    let mut unflushed = 0usize;
    let mut staged_unsynced = false;
    if mutation::active(Mutation::ResumeWaitsFirst) && engine.state().events > 1 {
        // Deliberate bug: a resumed run first gives the cluster five minutes to recover.
        rt.sleep(300_000).await;
    }
    // The allocator's free memory is returned after the plan is recorded and then every
    // `TRIM_BLOCKS` finished blocks: what planning and the finished blocks freed (the plans, read
    // back from the log when their blocks start, and their keys) stays resident otherwise.
    let mut trim = false;
    loop {
        engine.set_now(rt.now_ms());
        let out = engine.poll();
        if std::mem::take(&mut trim) {
            // The last poll's events are appended and dropped, and this poll let go of the plans
            // it kept for them.
            crate::world::release_free_memory();
            crate::world::heap_trace("trimmed");
        }
        for (seq, ev) in &out.events {
            staged_unsynced |= matches!(ev, Event::ItemWritten { .. });
            match ev {
                Event::BlockPlanned { blocks } if blocks.first().is_some_and(|b| b.id == 0) => {
                    crate::world::heap_trace("at the plan")
                }
                Event::PlanFinished { .. } => {
                    crate::world::heap_trace("after planning");
                    trim = true;
                }
                Event::BlockFinished { block, .. } if block % TRIM_BLOCKS == 0 => {
                    crate::world::heap_trace(&format!("block {block} finished"));
                    trim = true;
                }
                Event::ArchiveFinalized { .. } => crate::world::heap_trace("archive built"),
                _ => {}
            }
            log.append(*seq, ev)?;
            observer.event(ev, engine.state());
        }
        unflushed += out.events.len();
        let more = out.more;
        waiting.extend(out.commands);
        if let Some(f) = engine.fatal() {
            return Err(RunError::Engine(f.to_string()));
        }
        // Commands whose intent is already durable go at once — they run while the log flushes;
        // a flush is needed only when a command waits for it, when nothing else could make
        // progress, or when the batch is full.
        promote(&mut waiting, &mut ready, log.durable_seq());
        let d = Dispatch { backup: &backup, world, bodies: &bodies, log, executors_max };
        dispatch_ready(&mut ready, &mut inflight, &d, engine.state())?;
        let blocked = !waiting.is_empty();
        let terminal = engine.is_finished() || engine.stopped().is_some();
        // Recording more (`more`), the engine is polled again at once: the flush can wait.
        let idle = inflight.is_empty() && ready.is_empty() && !more;
        if unflushed > 0 && (blocked || unflushed >= FLUSH_BATCH_EVENTS_MAX || terminal || idle) {
            let was_stopping = engine.is_stopping();
            let started = std::time::Instant::now();
            commit(log, &mut engine, world, &mut staged_unsynced).await?;
            observer.flushed(started.elapsed());
            unflushed = 0;
            observer.committed(engine.state());
            if engine.is_stopping() && !was_stopping {
                // The barrier failed: let the engine react before anything else is started.
                continue;
            }
        }
        if let Some(reason) = engine.stopped() {
            // RunStopped is durable (committed above) before the process reports it.
            return Err(RunError::Stopped(reason.to_string()));
        }
        promote(&mut waiting, &mut ready, log.durable_seq());
        if engine.is_finished() && inflight.is_empty() && ready.is_empty() {
            return Ok(engine.into_state());
        }
        let d = Dispatch { backup: &backup, world, bodies: &bodies, log, executors_max };
        dispatch_ready(&mut ready, &mut inflight, &d, engine.state())?;
        if more {
            // The engine records more (a plan, a poll's worth of blocks at a time) first.
            continue;
        }
        let Some(first) = inflight.next().await else {
            return Err(RunError::Engine("the engine has nothing to do but the backup is not finished".into()));
        };
        engine.set_now(rt.now_ms());
        // Take every result that is already there: one poll and one flush for all of them.
        let mut next = Some(first);
        while let Some((id, completion)) = next {
            let completion =
                completion.ok_or_else(|| RunError::Engine(format!("command {id} ended without a result")))?;
            engine.complete(id, completion);
            next = inflight.next().now_or_never().flatten();
        }
    }
}

/// Stores Velero's companion files of a finished backup (resource list, results, logs, then
/// `velero-backup.json`, whose presence tells Velero the backup is complete). Idempotent: `resume`
/// of a finished backup runs it again.
pub async fn store_backup_files<M: LogMedium>(
    log: &EventLog<M>,
    state: &BackupState,
    store: &dyn Store,
) -> Result<(), RunError> {
    let dir = log.medium().sort_dir();
    let plans = log.plans();
    let mut builder = report::BackupFiles::new(log.name(), state, plans.as_ref(), dir.as_deref()).map_err(|e| {
        RunError::Encode(format!(
            "preparing the companion files (the block plans, the resource list's sort, the log lines' spool): {e}"
        ))
    })?;
    log.for_each_event(|_, e| builder.push(e).map_err(|e| e.to_string()))?;
    let bodies = log.bodies();
    let mut files = builder.finish().map_err(|e| RunError::Encode(e.to_string()))?;
    // Each made, handed over whole and dropped once stored before the next is made.
    while let Some((file, bytes)) =
        files.next_file(&|id| bodies.get(id)).map_err(|e| RunError::Encode(e.to_string()))?
    {
        store
            .put_file(log.name(), &file, bytes.into())
            .await
            .map_err(|source| RunError::Files { file: file.clone(), source })?;
    }
    Ok(())
}

/// [`drive`], then [`store_backup_files`]: a whole run, as the CLI, the controller and the
/// simulator do it. A backup that already finished only has its files stored again.
pub async fn run_backup<M: LogMedium>(
    engine: Engine,
    log: &mut EventLog<M>,
    world: &World,
    workers: usize,
    observer: &mut dyn Observer,
) -> Result<BackupState, RunError> {
    let state = if engine.is_finished() {
        engine.state().clone()
    } else {
        drive(engine, log, world, workers, observer).await?
    };
    store_backup_files(log, &state, world.store.as_ref()).await?;
    Ok(state)
}
