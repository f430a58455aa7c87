//! Events and their durable record format (DESIGN §5).
//!
//! Every step of a backup is an [`Event`]; the backup's state is a pure fold of them
//! ([`crate::state`]). A record on disk is
//! `len: u32 LE ‖ crc32c: u32 LE ‖ version: u8 ‖ payload`, where `len` counts the version byte and
//! the payload and the checksum covers the same bytes; the payload is bincode 2 (`=2.0.1`,
//! standard config, with a decode limit so hostile lengths cannot allocate unbounded memory).
//! Variants are only ever appended at the end of the enum, and golden-byte fixtures in the tests
//! pin every variant's encoding, so old logs stay readable.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::grouping::BlockPlan;
use crate::hooks::HookPhase;
use crate::item::{GroupResource, ItemKey, ResourceType};
use crate::snapshot::{BackupOptions, MemberCut, PvVolume, SnapshotPlan};
use crate::spec::BackupSpec;

/// Position of an event in its backup's log, from 0.
pub type Seq = u64;

/// The record format version written today.
pub const RECORD_VERSION: u8 = 1;
/// Bytes before the payload: length, checksum.
pub const RECORD_HEADER_BYTES: usize = 8;
/// Upper bound on a record's payload; larger lengths are corruption.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 << 20;

/// One unit of listing: a resource type, cluster-wide or in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ListUnit {
    /// The resource listed.
    pub resource: GroupResource,
    /// `None` lists across all namespaces (or a cluster-scoped resource).
    pub namespace: Option<String>,
}

impl std::fmt::Display for ListUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} in namespace {ns}", self.resource),
            None => write!(f, "{}", self.resource),
        }
    }
}

/// Which hook of a block: the pod, the phase, the position.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HookRef {
    /// The pod the hook runs in.
    pub pod: ItemKey,
    /// Pre or post.
    pub phase: HookPhase,
    /// Position among the pod's hooks of that phase.
    pub index: u32,
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookOutcome {
    /// Exit status 0.
    Succeeded,
    /// Non-zero exit status.
    Exited { code: i32, output: String },
    /// The exec could not be run or broke (connection, container missing, …).
    Errored { message: String },
    /// The timeout expired and the exec stream was cancelled.
    TimedOut { timeout_ms: u64 },
    /// The hook could not be built from its annotation or spec; it was never sent.
    Invalid { reason: String },
}

impl HookOutcome {
    /// Whether the hook succeeded.
    pub fn ok(&self) -> bool {
        matches!(self, HookOutcome::Succeeded)
    }
}

impl std::fmt::Display for HookOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookOutcome::Succeeded => f.write_str("succeeded"),
            HookOutcome::Exited { code, output } if output.is_empty() => write!(f, "exited with code {code}"),
            HookOutcome::Exited { code, output } => write!(f, "exited with code {code}: {output}"),
            HookOutcome::Errored { message } => write!(f, "error: {message}"),
            HookOutcome::TimedOut { timeout_ms } => write!(f, "timed out after {timeout_ms} ms"),
            HookOutcome::Invalid { reason } => write!(f, "invalid: {reason}"),
        }
    }
}

/// How a block attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockOutcome {
    /// Every item written, every hook succeeded.
    Completed,
    /// Written, but some item or hook failed (Continue-mode hooks, post-hooks, item writes).
    PartiallyFailed,
    /// A Fail-mode pre-hook failed: nothing of the block was written. (A box of a `String`, a
    /// thin pointer: with a `Box<str>` an outcome was 24 bytes, and every planned block's state
    /// holds one — ~8 MB more at a million blocks. Serialized as the string.)
    Failed { reason: Box<String> },
}

/// A backup's phase, as Velero names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Running, or interrupted and waiting for `resume`.
    InProgress,
    /// Everything succeeded.
    Completed,
    /// Finished, with errors.
    PartiallyFailed,
    /// Could not finish.
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::InProgress => "InProgress",
            Phase::Completed => "Completed",
            Phase::PartiallyFailed => "PartiallyFailed",
            Phase::Failed => "Failed",
        })
    }
}

/// Severity of a diagnostic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    /// Recorded; does not change the phase.
    Warning,
    /// Makes the backup PartiallyFailed.
    Error,
}

/// Every step of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The backup was asked for.
    BackupRequested { spec: BackupSpec, workers: u32, at_ms: u64 },
    /// Discovery found these listable resource types.
    ResourcesDiscovered { resources: Vec<ResourceType> },
    /// One page of a listing; chunk 0 starts the unit afresh. Objects are canonical JSON.
    ResourceListed { unit: ListUnit, chunk: u32, objects: Vec<String>, complete: bool },
    /// A listing gave up; the unit contributes nothing.
    ListFailed { unit: ListUnit, error: String },
    /// Pull targets fetched by key: canonical JSON, or `None` when not found.
    ItemsFetched { items: Vec<(ItemKey, Option<String>)> },
    /// A warning or error found by the engine (bad objects, bad annotations, …).
    Diagnostic { severity: Severity, message: String },
    /// Some planned blocks, in id order. Shared with the state that folds them (encoded as the
    /// plans themselves): a plan is held once, not once per event waiting to be logged and again in
    /// the state.
    BlockPlanned { blocks: Vec<Arc<BlockPlan>> },
    /// Planning is over: this many blocks and items.
    PlanFinished { blocks: u32, items: u64 },
    /// Intent: a block attempt begins (durable before any hook or write of it).
    BlockStarted { block: u32, attempt: u32, at_ms: u64 },
    /// Intent: a hook exec is about to be sent.
    HookStarted { block: u32, attempt: u32, hook: HookRef, at_ms: u64 },
    /// Fact: a hook ended.
    HookFinished { block: u32, attempt: u32, hook: HookRef, outcome: HookOutcome, at_ms: u64 },
    /// Fact: an item is durably staged in the store.
    ItemWritten { block: u32, attempt: u32, key: ItemKey, digest: [u8; 32], bytes: u64 },
    /// Fact: an item could not be staged.
    ItemFailed { block: u32, attempt: u32, key: ItemKey, error: String },
    /// Fact: a block attempt ended.
    BlockFinished { block: u32, attempt: u32, outcome: BlockOutcome, at_ms: u64 },
    /// Fact: the archive is built and stored.
    ArchiveFinalized { digest: [u8; 32], bytes: u64, items: u64 },
    /// The backup reached a terminal phase.
    BackupFinished { phase: Phase, at_ms: u64 },
    /// The run stopped before a terminal phase because the store failed (after its retries): the
    /// backup reports Failed until `resume` continues it. Nothing is issued after it.
    RunStopped { reason: String, at_ms: u64 },
    /// A stopped run is being continued by `resume`; the backup is InProgress again.
    RunResumed { at_ms: u64 },
    /// A pull target could not be fetched (after the adapter's retries); planning treats it as
    /// unavailable and never asks again.
    FetchFailed { key: ItemKey, error: String },
    /// The backup was asked for, with its options (every backup created since options exist;
    /// `BackupRequested` is read as one with [`BackupOptions::legacy`]).
    BackupRequestedWithOptions {
        spec: BackupSpec,
        #[serde(with = "crate::snapshot::json_string")]
        options: BackupOptions,
        workers: u32,
        at_ms: u64,
    },
    /// What the claims' PersistentVolumes are, and the cluster's snapshot classes (canonical
    /// JSON), for snapshot planning; `complete` on the last record of the inspection.
    VolumesInspected {
        volumes: Vec<(String, PvVolume)>,
        classes: Vec<String>,
        group_classes: Vec<String>,
        complete: bool,
    },
    /// Some planned snapshots, in id order (after the last `BlockPlanned`, before `PlanFinished`);
    /// shared with the state (encoded as the plans themselves).
    SnapshotsPlanned { snapshots: Vec<Arc<SnapshotPlan>> },
    /// Intent: snapshot `id` is about to be created, inside attempt `attempt` of its block's window.
    SnapshotRequested { id: u32, attempt: u32, at_ms: u64 },
    /// Fact: snapshot `id` is cut (every member's handle is set).
    SnapshotCut { id: u32, members: Vec<MemberCut>, group_handle: Option<String>, at_ms: u64 },
    /// Fact: snapshot `id` could not be cut (an error, or no handle within the CSI timeout).
    SnapshotFailed { id: u32, error: String, at_ms: u64 },
    /// Fact: snapshot `id` is ready to use, or (`error`) was not within the item-operation timeout.
    SnapshotReady { id: u32, error: Option<String>, at_ms: u64 },
    /// Fact: the cluster objects of snapshot `id` are gone; `kept` when its storage snapshot was
    /// retained for the backup, else it was deleted with them. `error` when that failed.
    SnapshotReleased { id: u32, kept: bool, error: Option<String>, at_ms: u64 },
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header, or than the header says.
    #[error("record is truncated: {have} bytes, needs {need}")]
    Truncated { have: usize, need: usize },
    /// More bytes than the header says.
    #[error("record has {extra} trailing bytes after its payload")]
    Trailing { extra: usize },
    /// Impossible length.
    #[error("record length {0} is out of bounds")]
    BadLength(usize),
    /// The checksum does not match: the bytes changed after they were written.
    #[error("record checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    /// A format version this build does not know.
    #[error("unknown record format version {0}")]
    Version(u8),
    /// Checksum fine but the payload does not decode (a bug or a foreign writer).
    #[error("record payload does not decode: {0}")]
    Payload(String),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<RECORD_PAYLOAD_BYTES_MAX>()
}

/// Encodes an event as one record.
pub fn encode_record(event: &Event) -> Vec<u8> {
    encode_record_of(event)
}

/// Encodes any record payload (a backup's [`Event`], a restore's event) as one record:
/// `len ‖ crc32c ‖ version ‖ bincode`.
pub fn encode_record_of<T: Serialize>(event: &T) -> Vec<u8> {
    let mut out = vec![0u8; RECORD_HEADER_BYTES];
    out.push(RECORD_VERSION);
    // Encoding plain data into a Vec cannot fail except past the limit, which no event reaches:
    // the engine bounds the object bytes of every listing and fetch record
    // (`EngineConfig::record_objects_bytes_max`).
    if let Err(e) = bincode::serde::encode_into_std_write(event, &mut out, bincode_config()) {
        tracing::error!("event does not encode: {e}");
    }
    let body_len = (out.len() - RECORD_HEADER_BYTES) as u32;
    let crc = crc32c::crc32c(&out[RECORD_HEADER_BYTES..]);
    out[0..4].copy_from_slice(&body_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes one record, checking length, checksum and version. Never panics.
pub fn decode_record(bytes: &[u8]) -> Result<Event, RecordError> {
    decode_record_of(bytes)
}

/// Decodes one record of any payload type (see [`encode_record_of`]). Never panics.
pub fn decode_record_of<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES + 1 {
        return Err(RecordError::Truncated { have: bytes.len(), need: RECORD_HEADER_BYTES + 1 });
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len == 0 || len > RECORD_PAYLOAD_BYTES_MAX + 1 {
        return Err(RecordError::BadLength(len));
    }
    let need = RECORD_HEADER_BYTES + len;
    if bytes.len() < need {
        return Err(RecordError::Truncated { have: bytes.len(), need });
    }
    if bytes.len() > need {
        return Err(RecordError::Trailing { extra: bytes.len() - need });
    }
    let stored = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let body = &bytes[RECORD_HEADER_BYTES..];
    let computed = crc32c::crc32c(body);
    if stored != computed && !crate::mutation::active(crate::mutation::Mutation::LogSkipsChecksum) {
        return Err(RecordError::Checksum { stored, computed });
    }
    if body[0] != RECORD_VERSION {
        return Err(RecordError::Version(body[0]));
    }
    let (event, used) = bincode::serde::decode_from_slice::<T, _>(&body[1..], bincode_config())
        .map_err(|e| RecordError::Payload(e.to_string()))?;
    if used != body.len() - 1 {
        return Err(RecordError::Payload(format!("{} unused payload bytes", body.len() - 1 - used)));
    }
    Ok(event)
}

impl Event {
    /// A short name of the variant, for logs and traces.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::BackupRequested { .. } => "BackupRequested",
            Event::ResourcesDiscovered { .. } => "ResourcesDiscovered",
            Event::ResourceListed { .. } => "ResourceListed",
            Event::ListFailed { .. } => "ListFailed",
            Event::ItemsFetched { .. } => "ItemsFetched",
            Event::Diagnostic { .. } => "Diagnostic",
            Event::BlockPlanned { .. } => "BlockPlanned",
            Event::PlanFinished { .. } => "PlanFinished",
            Event::BlockStarted { .. } => "BlockStarted",
            Event::HookStarted { .. } => "HookStarted",
            Event::HookFinished { .. } => "HookFinished",
            Event::ItemWritten { .. } => "ItemWritten",
            Event::ItemFailed { .. } => "ItemFailed",
            Event::BlockFinished { .. } => "BlockFinished",
            Event::ArchiveFinalized { .. } => "ArchiveFinalized",
            Event::BackupFinished { .. } => "BackupFinished",
            Event::RunStopped { .. } => "RunStopped",
            Event::RunResumed { .. } => "RunResumed",
            Event::FetchFailed { .. } => "FetchFailed",
            Event::BackupRequestedWithOptions { .. } => "BackupRequestedWithOptions",
            Event::VolumesInspected { .. } => "VolumesInspected",
            Event::SnapshotsPlanned { .. } => "SnapshotsPlanned",
            Event::SnapshotRequested { .. } => "SnapshotRequested",
            Event::SnapshotCut { .. } => "SnapshotCut",
            Event::SnapshotFailed { .. } => "SnapshotFailed",
            Event::SnapshotReady { .. } => "SnapshotReady",
            Event::SnapshotReleased { .. } => "SnapshotReleased",
        }
    }
}

/// What [`recover_records`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered<T = Event> {
    /// The good events, in order.
    pub events: Vec<T>,
    /// A torn or corrupt last record that must be cut: its sequence number and why.
    pub cut_tail: Option<(Seq, String)>,
}

/// Corruption before the tail: the log cannot be trusted past `seq`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {seq} is corrupt: {reason}")]
pub struct CorruptRecord {
    /// The first bad sequence number.
    pub seq: Seq,
    /// What was wrong.
    pub reason: String,
}

/// Recovery of a log from its stored records, shared by every log implementation (sled, the
/// simulator's in-memory log, the fuzzer). Records must be numbered 0, 1, 2, …; a bad **last**
/// record is a torn tail (reported, to be cut); a bad record or a gap anywhere before the last is
/// [`CorruptRecord`]. Never panics.
pub fn recover_records<'a>(records: impl IntoIterator<Item = (Seq, &'a [u8])>) -> Result<Recovered, CorruptRecord> {
    recover_records_of(records)
}

/// [`recover_records`] for records of any payload type.
pub fn recover_records_of<'a, T: serde::de::DeserializeOwned>(
    records: impl IntoIterator<Item = (Seq, &'a [u8])>,
) -> Result<Recovered<T>, CorruptRecord> {
    let mut stream = RecordStream::new();
    let mut events = Vec::new();
    for (seq, bytes) in records {
        events.extend(stream.push::<T>(seq, bytes)?);
    }
    Ok(Recovered { events, cut_tail: stream.bad })
}

/// [`recover_records`] one record at a time, for a reader that must not hold the whole log: the
/// same rules, applied as the records come. A bad record is held back until the next one shows it
/// was not the last ([`RecordStream::push`]); [`RecordStream::finish`] judges the end.
#[derive(Debug, Default)]
pub struct RecordStream {
    next: Seq,
    bad: Option<(Seq, String)>,
}

impl RecordStream {
    /// A stream expecting record 0.
    pub fn new() -> RecordStream {
        RecordStream::default()
    }

    /// The next stored record: its event, or `None` when it is bad (a torn tail if nothing follows
    /// it). A record after a bad one, or out of sequence, is corruption.
    pub fn push<T: serde::de::DeserializeOwned>(&mut self, seq: Seq, bytes: &[u8]) -> Result<Option<T>, CorruptRecord> {
        if let Some((seq, reason)) = self.bad.take() {
            return Err(CorruptRecord { seq, reason });
        }
        if seq != self.next {
            let expected = self.next;
            return Err(CorruptRecord {
                seq: expected,
                reason: format!("record {expected} is missing; the next record present is {seq}"),
            });
        }
        match decode_record_of::<T>(bytes) {
            Ok(e) => {
                self.next += 1;
                Ok(Some(e))
            }
            Err(e) => {
                self.bad = Some((seq, e.to_string()));
                Ok(None)
            }
        }
    }

    /// How many good records came so far.
    pub fn good(&self) -> Seq {
        self.next
    }

    /// The end of the records: [`check_end`]'s rule against `committed`; the torn tail, if any.
    pub fn finish(self, committed: Option<Seq>) -> Result<Option<(Seq, String)>, CorruptRecord> {
        end_rule(self.next, self.bad.as_ref(), committed)?;
        Ok(self.bad)
    }
}

/// The end rule of a log whose medium keeps, apart from its records, how many were **committed**
/// (made durable by a flush): no record below that count may be missing or bad. A bad last record
/// at or past it is a torn tail (cut, as [`recover_records`] reports it); one below it, or fewer
/// good records than were committed, is damage — the medium lost or altered what it had made
/// durable (a truncated or bit-flipped file), which must never pass as a shorter, valid log.
/// `committed` is `None` for a medium that keeps no count (a log written before it was kept).
pub fn check_end<T>(recovered: &Recovered<T>, committed: Option<Seq>) -> Result<(), CorruptRecord> {
    end_rule(recovered.events.len() as Seq, recovered.cut_tail.as_ref(), committed)
}

/// [`check_end`] over `good` records and a bad last one.
fn end_rule(good: Seq, cut_tail: Option<&(Seq, String)>, committed: Option<Seq>) -> Result<(), CorruptRecord> {
    let Some(committed) = committed else { return Ok(()) };
    if crate::mutation::active(crate::mutation::Mutation::LogTrustsItsEnd) {
        // Deliberate bug: a shorter log passes as a valid one.
        return Ok(());
    }
    if let Some((seq, reason)) = cut_tail {
        if *seq < committed {
            return Err(CorruptRecord {
                seq: *seq,
                reason: format!("{reason} (the record was committed: {committed} records were made durable)"),
            });
        }
    }
    if good < committed {
        return Err(CorruptRecord {
            seq: good,
            reason: format!(
                "the log was cut short: it ends after {good} records, but {committed} were committed (records {good}..={} are missing)",
                committed - 1
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> Vec<u8> {
        encode_record(&Event::PlanFinished { blocks: i, items: 0 })
    }

    #[test]
    fn torn_tail_is_cut_and_middle_corruption_is_an_error() {
        let (a, b, c) = (rec(0), rec(1), rec(2));
        let ok = recover_records([(0, a.as_slice()), (1, b.as_slice()), (2, c.as_slice())]).unwrap();
        assert_eq!((ok.events.len(), ok.cut_tail), (3, None));
        let torn = &c[..c.len() - 2];
        let r = recover_records([(0, a.as_slice()), (1, b.as_slice()), (2, torn)]).unwrap();
        assert_eq!(r.events.len(), 2);
        assert!(r.cut_tail.unwrap().1.contains("truncated"));
        let mut flipped = b.clone();
        flipped[10] ^= 0x04;
        let e = recover_records([(0, a.as_slice()), (1, flipped.as_slice()), (2, c.as_slice())]).unwrap_err();
        assert_eq!(e.seq, 1);
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = recover_records([(0, a.as_slice()), (2, c.as_slice())]).unwrap_err();
        assert_eq!(e.seq, 1);
    }

    #[test]
    fn a_committed_record_is_never_a_torn_tail_and_a_cut_log_is_damage() {
        let (a, b, c) = (rec(0), rec(1), rec(2));
        let torn = &c[..c.len() - 2];
        let r = recover_records([(0, a.as_slice()), (1, b.as_slice()), (2, torn)]).unwrap();
        // Past the committed count it is a torn tail; within it, damage naming the record.
        assert_eq!(check_end(&r, Some(2)), Ok(()));
        assert_eq!(check_end(&r, None), Ok(()));
        let e = check_end(&r, Some(3)).unwrap_err();
        assert_eq!(e.seq, 2);
        assert!(e.reason.contains("committed"), "{e}");
        // Two good records where three were committed: cut short, naming the first missing one.
        let short = recover_records([(0, a.as_slice()), (1, b.as_slice())]).unwrap();
        let e = check_end(&short, Some(3)).unwrap_err();
        assert_eq!(e.seq, 2);
        assert!(e.reason.contains("cut short"), "{e}");
        // More records than committed (durable without a flush's marker): fine.
        assert_eq!(check_end(&short, Some(1)), Ok(()));
    }
}
