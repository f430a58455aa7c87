//! The production runtime: drives the engine with tokio, N workers and the sled log.
//!
//! [`run_backup`] is the imperative shell around [`Engine`]: it appends the engine's events to the
//! [`EventLog`], group-commits them (one flush for every batch of appends), and hands each command
//! to a pool of worker tasks through a bounded queue only once the event its `after_seq` names is
//! durable — so a `HookStarted` is on disk before its exec is sent and a `BlockStarted` before any
//! write of that attempt. Results come back on a second bounded channel. Staged items are not
//! fsynced one by one: before a flush that makes `ItemWritten` facts durable, the store's
//! `sync_staged` barrier makes the items durable first (one `syncfs` for a local directory), so a
//! fact never outlives its item, even across a power loss. Hook timeouts are enforced
//! here by dropping the exec future, which cancels the exec stream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockwise_engine::event::{Event, HookOutcome};
use blockwise_engine::ports::{Cluster, ClusterError};
use blockwise_engine::state::BackupState;
use blockwise_engine::{Command, CommandKind, Completion, Engine};
use tokio::sync::{mpsc, Mutex};

use crate::log::{EventLog, LogError};
use crate::store::Store;

/// Events appended before a flush is forced even when no command waits for one.
pub const FLUSH_BATCH_EVENTS_MAX: usize = 1024;
/// Bytes of hook output kept in a hook result.
pub const HOOK_OUTPUT_BYTES_MAX: usize = 1024;

/// Wall-clock milliseconds since the Unix epoch (the production clock).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
    /// The store failed after its retries; the engine recorded `RunStopped` (durable) and the
    /// backup can be resumed once the store is back.
    #[error("the run stopped: {0}")]
    Stopped(String),
    /// Staged items could not be made durable; their facts were not flushed.
    #[error("staged items could not be made durable: {0}")]
    Sync(String),
}

/// Group commit: makes staged items durable if facts about them are pending, then flushes the log.
async fn commit(
    log: &mut EventLog,
    store: &dyn Store,
    backup: &str,
    staged_unsynced: &mut bool,
) -> Result<(), RunError> {
    if *staged_unsynced {
        store.sync_staged(backup).await.map_err(|e| RunError::Sync(e.to_string()))?;
        *staged_unsynced = false;
    }
    log.flush()?;
    Ok(())
}

/// Something that watches a run (progress bar, plain lines, nothing).
pub trait Observer: Send {
    /// Called after each event is appended, with the state including it.
    fn event(&mut self, event: &Event, state: &BackupState);
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

async fn execute(cmd: CommandKind, backup: &str, cluster: &dyn Cluster, store: &dyn Store) -> Completion {
    match cmd {
        CommandKind::Discover => Completion::Discovered(cluster.discover().await),
        CommandKind::List { unit, resource, limit, continue_token } => Completion::Listed(
            cluster.list(&resource, unit.namespace.as_deref(), limit, continue_token.as_deref()).await,
        ),
        CommandKind::Get { items } => {
            let mut out = Vec::with_capacity(items.len());
            for (rt, key) in items {
                match cluster.get(&rt, &key).await {
                    Ok(v) => out.push((key, v)),
                    Err(e) => return Completion::Fetched(Err(ClusterError::Other(format!("get {key}: {e}")))),
                }
            }
            Completion::Fetched(Ok(out))
        }
        CommandKind::RunHook { hook, .. } => {
            let exec = cluster.exec(&hook.pod, &hook.container, &hook.command);
            let outcome = match tokio::time::timeout(Duration::from_millis(hook.timeout_ms), exec).await {
                Err(_) => HookOutcome::TimedOut { timeout_ms: hook.timeout_ms },
                Ok(Err(e)) => HookOutcome::Errored { message: e.to_string() },
                Ok(Ok(r)) if r.exit_code == 0 => HookOutcome::Succeeded,
                Ok(Ok(r)) => {
                    let output = if r.stderr.trim().is_empty() { truncate(&r.stdout) } else { truncate(&r.stderr) };
                    HookOutcome::Exited { code: r.exit_code, output }
                }
            };
            Completion::HookRan(outcome)
        }
        CommandKind::WriteItem { key, json, .. } => {
            Completion::Written(store.put_item(backup, &key, json.as_bytes()).await.map_err(|e| e.to_string()))
        }
        CommandKind::Finalize { entries } => {
            Completion::Finalized(store.finalize(backup, &entries).await.map_err(|e| e.to_string()))
        }
    }
}

/// Runs `engine` to a terminal phase (or until the log fails), with `workers` executor tasks.
pub async fn run_backup(
    mut engine: Engine,
    log: &mut EventLog,
    cluster: Arc<dyn Cluster>,
    store: Arc<dyn Store>,
    workers: usize,
    observer: &mut dyn Observer,
) -> Result<BackupState, RunError> {
    let backup = log.name().to_string();
    let queue_commands_max = workers.max(1) * 2;
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(queue_commands_max);
    let (done_tx, mut done_rx) = mpsc::channel::<(u64, Completion)>(queue_commands_max);
    let cmd_rx = Arc::new(Mutex::new(cmd_rx));
    // Listing and gets run beside the block workers, so the pool has a few more executors.
    let executors = workers.max(1) + 4;
    let mut handles = Vec::with_capacity(executors);
    for _ in 0..executors {
        let (rx, tx) = (cmd_rx.clone(), done_tx.clone());
        let (cluster, store, backup) = (cluster.clone(), store.clone(), backup.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(cmd) = next else { break };
                let completion = execute(cmd.kind, &backup, cluster.as_ref(), store.as_ref()).await;
                if tx.send((cmd.id, completion)).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(done_tx);

    let mut waiting: Vec<Command> = Vec::new();
    let mut ready: VecDeque<Command> = VecDeque::new();
    let mut in_flight = 0usize;
    let mut unflushed = 0usize;
    let mut staged_unsynced = false;
    let result = loop {
        engine.set_now(now_ms());
        let out = engine.poll();
        for (seq, ev) in &out.events {
            staged_unsynced |= matches!(ev, Event::ItemWritten { .. });
            log.append(*seq, ev)?;
            observer.event(ev, engine.state());
        }
        unflushed += out.events.len();
        waiting.extend(out.commands);
        let durable = log.durable_seq();
        let blocked = waiting.iter().any(|c| c.after_seq.is_some_and(|s| durable.is_none_or(|d| s > d)));
        if unflushed > 0 && (blocked || unflushed >= FLUSH_BATCH_EVENTS_MAX || engine.is_finished() || in_flight == 0) {
            commit(log, store.as_ref(), &backup, &mut staged_unsynced).await?;
            unflushed = 0;
        }
        let durable = log.durable_seq();
        let (go, stay): (Vec<Command>, Vec<Command>) =
            waiting.drain(..).partition(|c| c.after_seq.is_none_or(|s| durable.is_some_and(|d| s <= d)));
        waiting = stay;
        ready.extend(go);
        if let Some(f) = engine.fatal() {
            break Err(RunError::Engine(f.to_string()));
        }
        if let Some(reason) = engine.stopped() {
            // RunStopped must be durable before the process reports it.
            commit(log, store.as_ref(), &backup, &mut staged_unsynced).await?;
            break Err(RunError::Stopped(reason.to_string()));
        }
        if engine.is_finished() && in_flight == 0 && ready.is_empty() {
            break Ok(engine.state().clone());
        }
        if ready.is_empty() && in_flight == 0 && waiting.is_empty() {
            break Err(RunError::Engine("the engine has nothing to do but the backup is not finished".into()));
        }
        tokio::select! {
            permit = cmd_tx.reserve(), if !ready.is_empty() => {
                if let (Ok(permit), Some(cmd)) = (permit, ready.pop_front()) {
                    permit.send(cmd);
                    in_flight += 1;
                }
            }
            done = done_rx.recv(), if in_flight > 0 => {
                let Some((id, completion)) = done else {
                    break Err(RunError::Engine("every worker stopped".into()));
                };
                in_flight -= 1;
                engine.set_now(now_ms());
                engine.complete(id, completion);
                // Take every result that is already there: one poll and one flush for all of them.
                while let Ok((id, completion)) = done_rx.try_recv() {
                    in_flight -= 1;
                    engine.complete(id, completion);
                }
            }
        }
    };
    drop(cmd_tx);
    for h in handles {
        h.abort();
    }
    if result.is_ok() {
        commit(log, store.as_ref(), &backup, &mut staged_unsynced).await?;
    }
    result
}
