//! The fake world's own records: what the cluster and the store saw, in the order they saw it.
//!
//! The judges ([`crate::check`]) decide every invariant from these records and the generated model,
//! never from the engine's plan or events: a wrong plan cannot vouch for itself. The fake cluster
//! and the in-memory store append here as they act — an exec when it starts and when it ends (or
//! is cancelled), a list or get with its answer, a staged write, a sync barrier, the archive, a
//! companion file — and the simulator appends crashes and restarts. One shared sequence gives a
//! total order even when several things happen at the same virtual millisecond.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blockwise_engine::item::ItemKey;
use serde::Serialize;

use crate::csi::CsiEvent;

/// How an exec ended, as the fake cluster saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ExecEnd {
    /// The command ran and exited with this status.
    Exited(i32),
    /// The exec failed (stream error, missing pod or container).
    Failed(String),
    /// The caller dropped the exec before it ended (a timeout, or the process died).
    Cancelled,
}

/// What a list call answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ListAnswer {
    /// A page; `more` when a continue token came with it.
    Page { objects: usize, more: bool },
    /// An error of this kind (`unavailable`, `forbidden`, `expired`, `other`).
    Error(&'static str),
}

/// What a get answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum GetAnswer {
    /// The object.
    Found,
    /// No such object.
    NotFound,
    /// An error of this kind.
    Error(&'static str),
}

/// One thing that happened in the fake world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Record {
    /// An exec started (`id` pairs it with its end).
    ExecStart { id: u64, at_ms: u64, pod: ItemKey, container: String, command: Vec<String> },
    /// An exec ended.
    ExecEnd { id: u64, at_ms: u64, end: ExecEnd },
    /// A list call of `resource` (in `namespace`, or all) answered.
    List { at_ms: u64, resource: String, namespace: Option<String>, continued: bool, answer: ListAnswer },
    /// A get answered.
    Get { at_ms: u64, key: ItemKey, answer: GetAnswer },
    /// An item was staged (atomically, at this instant); `durable` once synced.
    Staged { at_ms: u64, path: String, digest: [u8; 32] },
    /// A store write failed (an injected fault or an outage).
    StoreFailed { at_ms: u64, path: String },
    /// A staged item was read and was not there (the archive build looking for it).
    ReadMissing { at_ms: u64, path: String },
    /// A sync barrier made staged writes below `dir` durable.
    Synced { at_ms: u64, dir: String },
    /// A sync barrier failed (the store is down).
    SyncFailed { at_ms: u64, dir: String },
    /// A file was written durably (the archive, a companion file).
    FileWritten { at_ms: u64, path: String },
    /// The objects of the cluster changed (deleted or altered) behind the backup's back.
    ClusterChanged { at_ms: u64, what: String },
    /// The simulated process died.
    Crash { at_ms: u64, n: u32 },
    /// The run stopped on its own (the store failed for good) and the process ended.
    Stopped { at_ms: u64 },
    /// A new process started (the backup is resumed, or created again).
    Restart { at_ms: u64 },
    /// The API server went away (issue 22).
    ApiAway { at_ms: u64, outage: crate::cluster::ApiOutage },
    /// The API server is back.
    ApiBack { at_ms: u64, outage: crate::cluster::ApiOutage },
    /// A write through the API (`create`, `patch`, `delete`) and what it answered (`ok`,
    /// `exists`, `missing`, or an error kind). `subject`: what a created snapshot is of, read
    /// from the request — the claim of a VolumeSnapshot, the `matchLabels` value of a
    /// VolumeGroupSnapshot.
    Write { at_ms: u64, verb: &'static str, key: ItemKey, answer: &'static str, subject: Option<String> },
    /// The fake CSI driver cut, failed or deleted a snapshot.
    Csi(CsiEvent),
}

/// The shared, append-only record of one simulated run.
#[derive(Clone, Default)]
pub struct WorldLog {
    inner: Arc<Mutex<Vec<Record>>>,
}

impl WorldLog {
    /// An empty record.
    pub fn new() -> WorldLog {
        WorldLog::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Record>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a record.
    pub fn push(&self, r: Record) {
        self.lock().push(r);
    }

    /// Every record so far, in order.
    pub fn snapshot(&self) -> Vec<Record> {
        self.lock().clone()
    }

    /// Records so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}
