//! What users read: `describe` (text and JSON), `logs` lines, `get` rows, and Velero's files beside
//! the archive: `velero-backup.json`, `<name>-resource-list.json.gz`, `<name>-results.gz`,
//! `<name>-logs.gz`, and the CSI files `<name>-volumeinfo.json.gz`, `<name>-itemoperations.json.gz`,
//! `<name>-csi-volumesnapshots.json.gz`, `<name>-csi-volumesnapshotcontents.json.gz` and
//! `<name>-csi-volumesnapshotclasses.json.gz` ([`backup_files`]; shapes in docs/format.md).
//!
//! Everything here is a pure function of the folded [`BackupState`] (and, for `logs` and results,
//! the events), so what `describe` says after a crash is exactly what the log holds. Timestamps are
//! formatted as RFC 3339 UTC by hand (civil-from-days), to keep a date crate out of the build. The
//! resource list holds no timestamp and is gzipped with a fixed header: like the archive, it is
//! byte-identical for the same cluster state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use blockwise_engine::body::BodyId;
use blockwise_engine::entries::final_write;
use blockwise_engine::event::{BlockOutcome, Event, HookOutcome, Phase, Severity};
use blockwise_engine::hooks::{ExecHookSpec, HookPhase};
use blockwise_engine::item::{GroupResource, ItemKey, ResourceType};
use blockwise_engine::ports::PlanSource;
use blockwise_engine::snapshot::{PvVolume, SnapshotPlan, SNAPSHOT_GROUP};
use blockwise_engine::spec::LabelSelector;
use blockwise_engine::state::{BackupState, Cut, CutMember, SnapshotState};
use blockwise_engine::summary::BackupSummary;
use serde_json::{json, Value};

use crate::sorted::Sorter;
use crate::store::{gzip_reproducible, hex};

/// Velero's backup format version, written into the archive and `velero-backup.json`.
pub const BACKUP_FORMAT_VERSION: &str = "1.1.0";

/// Formats Unix milliseconds as RFC 3339 UTC, e.g. `2026-11-24T04:01:10Z`.
pub fn rfc3339(ms: u64) -> String {
    let c = blockwise_engine::schedule::civil(ms as i64, 0);
    let secs = (ms / 1000) % 60;
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{secs:02}Z", c.year, c.month, c.day, c.hour, c.minute)
}

/// Hook results across blocks: (block, pod, phase, index, outcome) of each block's latest attempt.
fn hook_results(s: &BackupSummary) -> Vec<(u32, String, HookPhase, u32, HookOutcome)> {
    let mut out = Vec::new();
    for (block, hooks) in &s.hooks {
        for (h, o) in hooks {
            out.push((*block, h.pod.to_string(), h.phase, h.index, o.clone()));
        }
    }
    out
}

/// A planned snapshot read back whole from the state: its state, plan and cut.
struct Snapshot<'a> {
    st: &'a SnapshotState,
    plan: SnapshotPlan,
    cut: Option<Cut>,
}

impl<'a> Snapshot<'a> {
    /// Snapshot `st` of `s`, its plan and cut read back (a plan that cannot be is none).
    fn of(s: &BackupState, st: &'a SnapshotState) -> Option<Snapshot<'a>> {
        Some(Snapshot { st, plan: s.snapshot_plan(st.plan.id)?, cut: s.snapshot_cut(st.plan.id) })
    }

    /// The member that captured claim `claim`, once cut.
    fn member(&self, claim: &str) -> Option<&CutMember> {
        self.cut.as_ref()?.members.iter().find(|m| m.claim == claim)
    }

    /// Every cut member.
    fn members(&self) -> impl Iterator<Item = &CutMember> + '_ {
        self.cut.iter().flat_map(|c| &c.members)
    }
}

/// Each planned snapshot of `s`, read back whole one at a time.
fn snapshots(s: &BackupState) -> impl Iterator<Item = Snapshot<'_>> + '_ {
    s.snapshots.iter().filter_map(|st| Snapshot::of(s, st))
}

/// What `describe` says about one claim's snapshot.
fn snapshot_status(st: &SnapshotState, m: Option<&CutMember>) -> String {
    if let Some(why) = st.failure() {
        return format!("failed: {why}");
    }
    let Some(m) = m else {
        return if st.requested.is_some() { "being cut".into() } else { "not taken yet".into() };
    };
    let ready = match &st.ready {
        Some(Ok(_)) => "ready".to_string(),
        Some(Err(e)) => format!("not ready: {e}"),
        None => "cut, not ready yet".to_string(),
    };
    let released = match &st.released {
        Some(r) if r.error.is_some() => ", release failed",
        Some(r) if r.kept => ", retained",
        Some(_) => ", deleted",
        None => "",
    };
    format!("{ready}{released}, handle {}", m.handle)
}

/// `describe -o json` with `--details`: the summary ([`summary_json`]) and each claim's
/// snapshot (name, content, handle, readiness) — from the full fold, whose memory grows with the
/// backup.
pub fn describe_json(s: &BackupState) -> Value {
    details_json(s, &BackupSummary::of(s))
}

/// [`describe_json`] of `s`, whose summary is `summary`.
fn details_json(s: &BackupState, summary: &BackupSummary) -> Value {
    let mut j = summary_json(summary);
    let mut rows = Vec::new();
    for snap in snapshots(s) {
        for key in snap.plan.claim_keys() {
            let (st, m) = (snap.st, snap.member(key.name()));
            rows.push(json!({
                "claim": format!("{}/{}", key.namespace().map(str::to_string).unwrap_or_default(), key.name()),
                "block": st.plan.block,
                "snapshot": m.map_or(snap.plan.name.clone(), |m| m.snapshot.clone()),
                "group": snap.plan.group,
                "content": m.map(|m| m.content.clone()),
                "handle": m.map(|m| m.handle.clone()),
                "ready": st.ready.as_ref().map(|r| r.is_ok()),
                "retained": st.released.as_ref().map(|r| r.kept && r.error.is_none()),
                "error": st.failure().map(str::to_string).or_else(|| st.ready.as_ref().and_then(|r| r.clone().err())),
                "status": snapshot_status(st, m),
            }));
        }
    }
    j["snapshots"] = Value::Array(rows);
    j
}

/// `describe -o json`: what the summary fold knows (`get` and `describe` read a log into it, in
/// memory that does not grow with the backup's objects), the volume snapshots as counts.
pub fn summary_json(s: &BackupSummary) -> Value {
    let spec = s.spec.as_ref();
    let in_flight: Vec<Value> = (s.open.iter())
        .map(|(id, a)| json!({"id": id, "attempt": a.number, "items": s.block_items.get(*id as usize).copied().unwrap_or(0)}))
        .collect();
    let hooks: Vec<Value> = hook_results(s)
        .into_iter()
        .map(|(block, pod, phase, index, o)| {
            json!({"block": block, "pod": pod, "phase": format!("{phase:?}"), "index": index, "ok": o.ok(), "result": o.to_string()})
        })
        .collect();
    let claims: usize = s.snapshots.iter().map(|st| st.claims.len()).sum();
    let captured: u32 = s.snapshots.iter().filter_map(|st| st.members).sum();
    let ready: u32 = s.snapshots.iter().filter(|st| st.ready == Some(true)).filter_map(|st| st.members).sum();
    let failed: usize = s.snapshots.iter().filter(|st| st.failed).map(|st| st.claims.len()).sum();
    json!({
        "name": spec.map(|s| s.name.clone()),
        "uid": s.options.uid,
        "phase": s.phase_name(),
        "snapshotVolumes": s.options.snapshots_on(),
        "volumeSnapshots": {"claims": claims, "captured": captured, "ready": ready, "failed": failed},
        "stopped": s.stopped,
        "startTimestamp": rfc3339(s.requested_ms),
        "completionTimestamp": s.finished.map(|(_, t)| rfc3339(t)),
        "durationSeconds": (s.finished.map_or(s.last_ms, |(_, t)| t).saturating_sub(s.requested_ms)) as f64 / 1000.0,
        "workers": s.workers,
        "resourcesDiscovered": s.resources,
        "listingsComplete": s.listings.values().filter(|c| **c).count(),
        "items": {"planned": s.planned_items, "written": s.items_done},
        "blocks": {"planned": s.blocks(), "done": s.blocks_done, "failed": s.blocks_failed, "inFlight": in_flight},
        "hooks": hooks,
        "archive": s.archive.map(|a| json!({"sha256": hex(&a.digest), "bytes": a.bytes, "items": a.items})),
        "warnings": s.warnings,
        "errors": s.errors,
        "events": s.events,
    })
}

/// `describe --details` for people.
pub fn describe_text(s: &BackupState) -> String {
    let summary = BackupSummary::of(s);
    describe_text_of(&summary, &details_json(s, &summary))
}

/// `describe` for people, from the backup's summary and its [`summary_json`] (or, with each
/// claim's snapshot listed, [`describe_json`]) `j`, made once for both.
pub fn describe_text_of(s: &BackupSummary, j: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    line(&mut out, "Name:", j["name"].as_str().unwrap_or("?").to_string());
    line(&mut out, "Phase:", s.phase_name());
    if let Some(reason) = &s.stopped {
        let name = j["name"].as_str().unwrap_or("NAME");
        line(&mut out, "Stopped:", format!("{reason}\n{:<14}run `blockwise backup resume {name}` to finish it", ""));
    }
    line(&mut out, "Started:", rfc3339(s.requested_ms));
    if let Some((_, t)) = s.finished {
        line(&mut out, "Completed:", rfc3339(t));
    }
    line(&mut out, "Duration:", format!("{:.1}s", j["durationSeconds"].as_f64().unwrap_or(0.0)));
    line(&mut out, "Workers:", s.workers.to_string());
    line(&mut out, "Items:", format!("{}/{} written", s.items_done, s.planned_items));
    line(&mut out, "Blocks:", format!("{}/{} done, {} failed", s.blocks_done, s.blocks(), s.blocks_failed));
    for (id, a) in &s.open {
        let items = s.block_items.get(*id as usize).copied().unwrap_or(0);
        out.push_str(&format!("  in flight: block {id} attempt {}: {}/{items} items\n", a.number, a.written.len()));
    }
    if let Some(a) = s.archive {
        line(&mut out, "Archive:", format!("{} bytes, {} items, sha256 {}", a.bytes, a.items, hex(&a.digest)));
    }
    let counts = &j["volumeSnapshots"];
    let claims = counts["claims"].as_u64().unwrap_or(0);
    if claims > 0 {
        let (captured, ready) = (counts["captured"].as_u64().unwrap_or(0), counts["ready"].as_u64().unwrap_or(0));
        line(&mut out, "Snapshots:", format!("{captured}/{claims} claims captured, {ready} ready"));
        match j["snapshots"].as_array() {
            Some(rows) => {
                for r in rows {
                    let group = r["group"].as_str().map(|g| format!(" (group {g})")).unwrap_or_default();
                    out.push_str(&format!(
                        "  {}: snapshot {}{group}: {}\n",
                        r["claim"].as_str().unwrap_or("?"),
                        r["snapshot"].as_str().unwrap_or("?"),
                        r["status"].as_str().unwrap_or("?")
                    ));
                }
            }
            None => out.push_str("  (`describe --details` lists each claim's snapshot)\n"),
        }
    } else if !s.options.snapshots_on() {
        line(&mut out, "Snapshots:", "off (--snapshot-volumes=false)".into());
    }
    let hooks = hook_results(s);
    if !hooks.is_empty() {
        out.push_str("Hooks:\n");
        for (block, pod, phase, index, o) in hooks {
            out.push_str(&format!("  block {block} {pod} {phase:?}[{index}]: {o}\n"));
        }
    }
    for (title, list) in [("Warnings", &s.warnings), ("Errors", &s.errors)] {
        out.push_str(&format!("{title}: {}\n", list.len()));
        for m in list {
            out.push_str(&format!("  {m}\n"));
        }
    }
    out
}

/// One human-readable line per event, for `logs`.
pub fn event_line(seq: u64, e: &Event) -> String {
    let body = match e {
        Event::BackupRequested { spec, workers, at_ms } => {
            format!("{} backup {:?} requested, {workers} workers", rfc3339(*at_ms), spec.name)
        }
        Event::ResourcesDiscovered { resources } => format!("discovered {} resource types", resources.len()),
        Event::ResourceListed { unit, chunk, objects, complete } => {
            format!(
                "listed {unit}: page {chunk}, {} objects{}",
                objects.len(),
                if *complete { ", complete" } else { "" }
            )
        }
        Event::ListFailed { unit, error } => format!("listing {unit} failed: {error}"),
        Event::ItemsFetched { items } => format!(
            "fetched {} pull targets ({} not found)",
            items.len(),
            items.iter().filter(|(_, v)| v.is_none()).count()
        ),
        Event::Diagnostic { severity, message } => format!("{severity:?}: {message}"),
        Event::BlockPlanned { blocks } => {
            format!("planned blocks {}..={}", blocks.first().map_or(0, |b| b.id), blocks.last().map_or(0, |b| b.id))
        }
        Event::PlanFinished { blocks, items } => format!("plan finished: {blocks} blocks, {items} items"),
        Event::BlockStarted { block, attempt, at_ms } => {
            format!("{} block {block} attempt {attempt} started", rfc3339(*at_ms))
        }
        Event::HookStarted { block, attempt, hook, .. } => {
            format!("block {block} attempt {attempt}: {:?} hook {} of {} started", hook.phase, hook.index, hook.pod)
        }
        Event::HookFinished { block, attempt, hook, outcome, .. } => {
            format!("block {block} attempt {attempt}: {:?} hook {} of {}: {outcome}", hook.phase, hook.index, hook.pod)
        }
        Event::ItemWritten { block, key, bytes, .. } => format!("block {block}: wrote {key} ({bytes} bytes)"),
        Event::ItemFailed { block, key, error, .. } => format!("block {block}: {key} failed: {error}"),
        Event::BlockFinished { block, attempt, outcome, .. } => {
            format!("block {block} attempt {attempt} finished: {outcome:?}")
        }
        Event::ArchiveFinalized { digest, bytes, items } => {
            format!("archive finalized: {items} items, {bytes} bytes, sha256 {}", hex(digest))
        }
        Event::BackupFinished { phase, at_ms } => format!("{} backup finished: {phase}", rfc3339(*at_ms)),
        Event::RunStopped { reason, at_ms } => {
            format!("{} run stopped (resume to continue): {reason}", rfc3339(*at_ms))
        }
        Event::RunResumed { at_ms } => format!("{} run resumed", rfc3339(*at_ms)),
        Event::FetchFailed { key, error } => format!("get of pull target {key} failed: {error}"),
        Event::BackupRequestedWithOptions { spec, options, workers, at_ms } => format!(
            "{} backup {:?} requested, {workers} workers, volume snapshots {}",
            rfc3339(*at_ms),
            spec.name,
            if options.snapshots_on() { "on" } else { "off" }
        ),
        Event::VolumesInspected { volumes, classes, group_classes, complete } => format!(
            "inspected {} volumes, {} snapshot classes, {} group snapshot classes{}",
            volumes.len(),
            classes.len(),
            group_classes.len(),
            if *complete { ", complete" } else { "" }
        ),
        Event::SnapshotsPlanned { snapshots } => format!(
            "planned snapshots {}..={}",
            snapshots.first().map_or(0, |p| p.id),
            snapshots.last().map_or(0, |p| p.id)
        ),
        Event::SnapshotRequested { id, attempt, at_ms } => {
            format!("{} snapshot {id} requested (block attempt {attempt})", rfc3339(*at_ms))
        }
        Event::SnapshotCut { id, members, at_ms, .. } => format!(
            "{} snapshot {id} cut: {}",
            rfc3339(*at_ms),
            members.iter().map(|m| format!("{} -> {}", m.claim, m.handle)).collect::<Vec<_>>().join(", ")
        ),
        Event::SnapshotFailed { id, error, at_ms } => format!("{} snapshot {id} failed: {error}", rfc3339(*at_ms)),
        Event::SnapshotReady { id, error: None, at_ms } => format!("{} snapshot {id} ready to use", rfc3339(*at_ms)),
        Event::SnapshotReady { id, error: Some(e), at_ms } => {
            format!("{} snapshot {id} not ready: {e}", rfc3339(*at_ms))
        }
        Event::SnapshotReleased { id, kept, error, at_ms } => format!(
            "{} snapshot {id} released ({}){}",
            rfc3339(*at_ms),
            if *kept { "storage retained" } else { "deleted" },
            error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
        ),
    };
    format!("{seq:>8} {body}")
}

/// `velero-backup.json`: a `velero.io/v1` Backup with the spec and status Velero reads.
pub fn velero_backup_json(s: &BackupState) -> Value {
    let Some(spec) = s.spec.as_ref() else { return json!({}) };
    let ordered: serde_json::Map<String, Value> =
        spec.ordered_resources.iter().map(|(r, names)| (r.clone(), Value::String(names.join(",")))).collect();
    let phase = match s.phase() {
        Phase::InProgress => "InProgress",
        Phase::Completed => "Completed",
        Phase::PartiallyFailed => "PartiallyFailed",
        Phase::Failed => "Failed",
    };
    // Velero's types: a LabelSelector object, not a string; each hook wrapped as `{"exec": …}`.
    let selector = |s: &Option<String>| {
        s.as_deref()
            .filter(|s| !s.trim().is_empty())
            .and_then(|s| LabelSelector::parse(s).ok())
            .map(|l| l.to_k8s_json())
    };
    let exec = |hooks: &[ExecHookSpec]| -> Vec<Value> {
        hooks.iter().map(|h| json!({"exec": serde_json::to_value(h).unwrap_or(Value::Null)})).collect()
    };
    let hooks: Vec<Value> = spec
        .hooks
        .iter()
        .map(|h| {
            json!({
                "name": h.name,
                "includedNamespaces": h.included_namespaces,
                "excludedNamespaces": h.excluded_namespaces,
                "labelSelector": selector(&h.label_selector),
                "pre": exec(&h.pre),
                "post": exec(&h.post),
            })
        })
        .collect();
    json!({
        "apiVersion": "velero.io/v1",
        "kind": "Backup",
        "metadata": {"name": spec.name, "namespace": "velero", "uid": s.options.uid,
            "annotations": s.options.annotations},
        "spec": {
            "includedNamespaces": if spec.included_namespaces.is_empty() { vec!["*".to_string()] } else { spec.included_namespaces.clone() },
            "excludedNamespaces": spec.excluded_namespaces,
            "includedResources": spec.included_resources,
            "excludedResources": spec.excluded_resources,
            "includeClusterResources": spec.include_cluster_resources,
            "labelSelector": selector(&spec.label_selector),
            "orderedResources": ordered,
            "hooks": {"resources": hooks},
            "storageLocation": "default",
            "snapshotVolumes": s.options.snapshot_volumes,
            "csiSnapshotTimeout": go_duration(s.options.csi_snapshot_timeout_ms),
            "itemOperationTimeout": go_duration(s.options.item_operation_timeout_ms),
            "volumeGroupSnapshotLabelKey": spec.volume_group_label,
        },
        "status": {
            "phase": phase,
            "formatVersion": BACKUP_FORMAT_VERSION,
            "version": 1,
            "startTimestamp": rfc3339(s.requested_ms),
            "completionTimestamp": s.finished.map(|(_, t)| rfc3339(t)),
            "progress": {"totalItems": s.planned_items, "itemsBackedUp": s.items_done()},
            "errors": s.errors.len(),
            "warnings": s.warnings.len(),
            "csiVolumeSnapshotsAttempted": members_where(s, |_| true),
            "csiVolumeSnapshotsCompleted": members_where(s, |st| matches!(st.ready, Some(Ok(_)))),
            "backupItemOperationsAttempted": members_where(s, |_| true),
            "backupItemOperationsCompleted": members_where(s, |st| matches!(st.ready, Some(Ok(_)))),
            "backupItemOperationsFailed": members_where(s, |st| matches!(st.ready, Some(Err(_)))),
        },
    })
}

/// Go's `time.Duration` text for whole minutes/hours/seconds: `10m0s`, `4h0m0s`.
pub fn go_duration(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Cut members of kept snapshots whose state satisfies `pick`.
fn members_where(s: &BackupState, pick: impl Fn(&SnapshotState) -> bool) -> usize {
    kept_snapshots(s).filter(|st| pick(st)).map(|st| st.cut.as_ref().map_or(0, |c| c.members as usize)).sum()
}

/// Snapshots whose storage the backup holds: cut, in a block that did not fail.
fn kept_snapshots(s: &BackupState) -> impl Iterator<Item = &SnapshotState> + '_ {
    s.snapshots.iter().filter(|st| st.cut.is_some() && !s.blocks.failed(st.plan.block as usize))
}

/// Velero's operation id of a VolumeSnapshot: `<namespace>/<name>/<RFC 3339 time>`.
fn operation_id(ns: &str, snapshot: &str, at_ms: u64) -> String {
    format!("{ns}/{snapshot}/{}", rfc3339(at_ms))
}

/// What Velero's volume information reads of a backup's claims and volumes, taken from the
/// objects of its log's listings and fetches as [`BackupFiles`] goes through the events: each
/// object parsed, kept from and dropped in turn (the claims and volumes are not held in memory
/// through the backup for it). A listed object wins over a fetched one, a later one over an earlier.
///
/// Nothing of every claim or volume is held: the wanted claims by their keys' digests (16 bytes
/// a claim), the objects sorted on disk (`volume-objects/` of the sort directory; in memory
/// without one) and joined by merging (maps of claims, volumes and snapshots were ~60 MB at the
/// end of a million-object backup, its peak).
pub struct VolumeObjects {
    types: BTreeMap<GroupResource, ResourceType>,
    /// The claims the volume information is about (those of blocks that did not fail), by their
    /// keys' digests, sorted.
    wanted: Vec<u128>,
    /// Of a wanted claim, its volume when bound, by key, the winner last.
    claims: Sorter<ClaimObject>,
    /// Of a volume, its reclaim policy and labels, by name, the winner last.
    volumes: Sorter<VolumeObject>,
    dir: Option<std::path::PathBuf>,
    /// Objects taken so far (a later one wins over an earlier).
    seq: u64,
    /// The first sorting failure (reported when the file is made).
    failed: Option<std::io::Error>,
}

/// Records a sort holds in memory before it writes them as a run (~1 MB of claims or volumes).
const VOLUME_OBJECTS_RUN: usize = 8192;

/// Which of two objects of one key wins: a listed one over a fetched one, a later over an earlier.
type Rank = (bool, u64);

/// A wanted claim as the volume information reads it.
#[derive(serde::Serialize, serde::Deserialize)]
struct ClaimObject {
    key: ItemKey,
    rank: Rank,
    /// Its volume, when bound.
    volume: Option<String>,
}

/// A volume as the volume information reads it.
#[derive(serde::Serialize, serde::Deserialize)]
struct VolumeObject {
    name: String,
    rank: Rank,
    facts: VolumeFacts,
}

/// A bound claim with its volume's facts: sorted by volume (to be joined with the volumes), then
/// by claim (to be written).
#[derive(serde::Serialize, serde::Deserialize)]
struct Joined {
    volume: String,
    key: ItemKey,
    facts: Option<VolumeFacts>,
    by_volume: bool,
}

crate::sorted::ordered_by!(ClaimObject, |c| (&c.key, c.rank));
crate::sorted::ordered_by!(VolumeObject, |v| (&v.name, v.rank));
crate::sorted::ordered_by!(Joined, |j| (j.by_volume.then_some(&j.volume), &j.key));

/// Of records sorted by key and rank, the last of each key (the winner); `same` says whether two
/// records have one key.
fn winners<T>(
    records: impl Iterator<Item = std::io::Result<T>>,
    same: impl Fn(&T, &T) -> bool,
) -> impl Iterator<Item = std::io::Result<T>> {
    let mut records = records.peekable();
    std::iter::from_fn(move || loop {
        let r = match records.next()? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        match records.peek() {
            Some(Ok(next)) if same(next, &r) => continue,
            _ => return Some(Ok(r)),
        }
    })
}

/// What the volume information says of a volume (`pvInfo`): kept as strings, not as the JSON it
/// becomes — a JSON map is a B-tree node of ~0.5 KiB, two a volume (~100 MB of the 1M backup's
/// companion files).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct VolumeFacts {
    reclaim_policy: Box<str>,
    /// `metadata.labels`, in key order (`None`: the volume has none).
    labels: Option<Labels>,
}

/// A volume's labels, in key order.
type Labels = Box<[(Box<str>, Box<str>)]>;

impl VolumeFacts {
    fn json(&self) -> Value {
        let labels = match &self.labels {
            Some(l) => Value::Object(l.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect()),
            None => Value::Null,
        };
        json!({"reclaimPolicy": &*self.reclaim_policy, "labels": labels})
    }
}

impl VolumeObjects {
    /// Ready to take the objects of backup `s`'s log, whose block plans `plans` gives back (the
    /// state keeps only those of blocks with hooks), sorting them in `dir` (`None`: in memory). An
    /// error names the plan that could not be read.
    pub fn new(s: &BackupState, plans: &dyn PlanSource, dir: Option<&Path>) -> std::io::Result<VolumeObjects> {
        let mut wanted = Vec::new();
        for (b, id) in s.blocks.iter().zip(0u32..) {
            if matches!(b.outcome, Some(BlockOutcome::Failed { .. })) {
                continue;
            }
            let plan = match &b.plan {
                Some(p) => p.clone(),
                None => plans.plan(id).map_err(std::io::Error::other)?,
            };
            wanted.extend(plan.items.iter().filter(|k| k.is("", "persistentvolumeclaims")).map(ItemKey::digest));
        }
        wanted.sort_unstable();
        wanted.dedup();
        wanted.shrink_to_fit();
        let types = s.resources.iter().flatten().map(|r| (r.gr.clone(), r.clone())).collect();
        let sub = |name: &str| dir.map(|d| d.join(name));
        Ok(VolumeObjects {
            types,
            wanted,
            claims: Sorter::fresh(sub("claims").as_deref(), VOLUME_OBJECTS_RUN)?,
            volumes: Sorter::fresh(sub("volumes").as_deref(), VOLUME_OBJECTS_RUN)?,
            dir: dir.map(Path::to_path_buf),
            seq: 0,
            failed: None,
        })
    }

    /// Takes what it reads of the objects `e` carries.
    pub fn push(&mut self, e: &Event) {
        match e {
            Event::ResourceListed { unit, objects, .. } => {
                for o in objects {
                    self.take(&unit.resource, o, true);
                }
            }
            Event::ItemsFetched { items } => {
                for (k, json) in items {
                    if let Some(j) = json {
                        self.take(&k.gr(), j, false);
                    }
                }
            }
            _ => {}
        }
    }

    fn take(&mut self, gr: &GroupResource, json: &str, listed: bool) {
        let (claim, volume) = (
            gr.group.is_empty() && gr.resource == "persistentvolumeclaims",
            gr.group.is_empty() && gr.resource == "persistentvolumes",
        );
        if !(claim || volume) || self.wanted.is_empty() || self.failed.is_some() {
            return;
        }
        let Some(rt) = self.types.get(gr) else { return };
        let Ok(it) = blockwise_engine::item::Item::parse(rt, 0, json) else { return };
        let str_at = |p: &str| it.object().pointer(p).and_then(Value::as_str).map(str::to_string);
        let rank = (listed, self.seq);
        self.seq += 1;
        let pushed = if claim && self.wanted.binary_search(&it.key.digest()).is_ok() {
            let bound = str_at("/spec/volumeName").filter(|_| str_at("/status/phase").as_deref() == Some("Bound"));
            self.claims.push(ClaimObject { key: it.key.clone(), rank, volume: bound })
        } else if volume {
            let labels =
                it.object().pointer("/metadata/labels").and_then(Value::as_object).map(|m| {
                    m.iter().filter_map(|(k, v)| Some((Box::from(k.as_str()), Box::from(v.as_str()?)))).collect()
                });
            let reclaim_policy = str_at("/spec/persistentVolumeReclaimPolicy").unwrap_or_default().into();
            let facts = VolumeFacts { reclaim_policy, labels };
            self.volumes.push(VolumeObject { name: it.key.name().to_string(), rank, facts })
        } else {
            Ok(())
        };
        self.failed = pushed.err();
    }

    /// Each bound wanted claim (the winner of its key) with its volume's facts (the winner of the
    /// volume's name, when there is one), by claim key: sorted by volume to be joined with the
    /// volumes, then by claim.
    fn finish(self) -> std::io::Result<crate::sorted::Sorted<Joined>> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let sub = |name: &str| self.dir.as_ref().map(|d| d.join(name));
        let (claims, volumes) = (self.claims.finish()?, self.volumes.finish()?);
        let mut by_volume = Sorter::fresh(sub("by-volume").as_deref(), VOLUME_OBJECTS_RUN)?;
        for c in winners(claims.iter()?, |a: &ClaimObject, b| a.key == b.key) {
            let c = c?;
            if let Some(volume) = c.volume {
                by_volume.push(Joined { volume, key: c.key, facts: None, by_volume: true })?;
            }
        }
        drop(claims);
        let mut volumes = winners(volumes.iter()?, |a: &VolumeObject, b| a.name == b.name).peekable();
        let mut by_claim = Sorter::fresh(sub("by-claim").as_deref(), VOLUME_OBJECTS_RUN)?;
        for j in by_volume.finish()?.iter()? {
            let mut j = j?;
            while let Some(v) = volumes.next_if(|v| v.as_ref().map_or(true, |v| v.name < j.volume)) {
                v?;
            }
            j.facts = match volumes.peek() {
                Some(Ok(v)) if v.name == j.volume => Some(v.facts.clone()),
                _ => None,
            };
            j.by_volume = false;
            by_claim.push(j)?;
        }
        by_claim.finish()
    }
}

/// `<name>-volumeinfo.json.gz`'s content: one Velero `BackupVolumeInfo` per bound claim of the
/// backup — `CSISnapshot` with its snapshot's facts when captured, skipped (with the reason)
/// otherwise. The bytes of the JSON array, each element made, written and dropped in turn.
pub fn volume_infos<W: Write>(s: &BackupState, objects: VolumeObjects, sink: W) -> std::io::Result<W> {
    let dir = objects.dir.clone();
    let joined = objects.finish()?;
    // Each claim's snapshot by id, by the claim key's digest: read back whole for that claim only.
    let mut snap_of: Vec<(u128, u32)> = snapshots(s)
        .flat_map(|snap| snap.plan.claim_keys().map(|k| (k.digest(), snap.st.plan.id)).collect::<Vec<_>>())
        .collect();
    // Stable: of a claim two snapshots name (none does), the last, as a map's insert kept.
    snap_of.sort_by_key(|e| e.0);
    snap_of.reverse();
    snap_of.dedup_by_key(|e| e.0);
    snap_of.reverse();
    let mut out = JsonArray::new(sink);
    for j in joined.iter()? {
        let Joined { volume, key, facts, .. } = j?;
        let (key, pv_name) = (&key, volume.as_str());
        let ns = key.namespace().map(str::to_string).unwrap_or_default();
        let pv_info = facts.as_ref().map(VolumeFacts::json);
        let mut v = json!({"pvcName": key.name(), "pvcNamespace": ns, "pvName": pv_name, "snapshotDataMoved": false});
        let id = snap_of.binary_search_by_key(&key.digest(), |e| e.0).ok().map(|i| snap_of[i].1);
        let snap = id.and_then(|id| Snapshot::of(s, s.snapshots.get(id as usize)?));
        match snap.as_ref().map(|snap| (snap.st, snap.member(key.name()), snap.cut.as_ref())) {
            Some((st, Some(m), cut)) => {
                let cut_ms = cut.map_or(0, |c| c.at_ms);
                v["backupMethod"] = json!("CSISnapshot");
                v["preserveLocalSnapshot"] = json!(true);
                v["skipped"] = json!(false);
                v["startTimestamp"] = json!(m.creation_time.clone().unwrap_or_else(|| rfc3339(cut_ms)));
                match &st.ready {
                    Some(Ok(t)) => {
                        v["completionTimestamp"] = json!(rfc3339(*t));
                        v["result"] = json!("succeeded");
                    }
                    Some(Err(_)) => v["result"] = json!("failed"),
                    None => {}
                }
                let mut info = json!({
                    "snapshotHandle": m.handle,
                    "size": m.restore_size.unwrap_or(0),
                    "driver": m.driver,
                    "vscName": m.content,
                    "operationID": operation_id(&ns, &m.snapshot, cut_ms),
                    "ReadyToUse": st.ready.as_ref().map(|r| r.is_ok()),
                });
                if let Some(h) = cut.and_then(|c| c.group_handle.clone()) {
                    info["volumeGroupSnapshotHandle"] = json!(h);
                }
                v["csiSnapshotInfo"] = info;
            }
            other => {
                let reason = match other {
                    Some((st, _, _)) => {
                        st.failure().map_or_else(|| "the snapshot was not taken".to_string(), str::to_string)
                    }
                    None if !s.options.snapshots_on() => {
                        "volume snapshots are off for this backup (snapshotVolumes: false)".into()
                    }
                    None => match s.volumes.get(pv_name) {
                        Some(PvVolume::NotCsi) => "not a CSI volume".into(),
                        _ => "the cluster serves no CSI VolumeSnapshots".into(),
                    },
                };
                v["preserveLocalSnapshot"] = json!(false);
                v["skipped"] = json!(true);
                v["skippedReason"] = json!(reason);
            }
        }
        if let Some(p) = pv_info {
            v["pvInfo"] = p;
        }
        out.push(&v)?;
    }
    drop(joined);
    if let Some(d) = dir {
        let _ = std::fs::remove_dir_all(d);
    }
    out.finish()
}

/// `<name>-itemoperations.json.gz`'s content: one Velero `BackupOperation` per captured
/// VolumeSnapshot — the asynchronous wait until it is ready to use. The bytes of the JSON array,
/// each element made, written and dropped in turn.
pub fn item_operations<W: Write>(s: &BackupState, sink: W) -> std::io::Result<W> {
    let name = s.spec.as_ref().map(|x| x.name.clone()).unwrap_or_default();
    let mut out = JsonArray::new(sink);
    for snap in kept_snapshots(s).filter_map(|st| Snapshot::of(s, st)) {
        let (st, ns) = (snap.st, &snap.plan.namespace);
        let Some(cut) = &snap.cut else { continue };
        for m in &cut.members {
            let vs =
                json!({"Group": SNAPSHOT_GROUP, "Resource": "volumesnapshots", "Namespace": ns, "Name": m.snapshot});
            let vsc = json!({"Group": SNAPSHOT_GROUP, "Resource": "volumesnapshotcontents", "Namespace": "", "Name": m.content});
            let mut status = json!({"created": rfc3339(cut.at_ms), "started": rfc3339(cut.at_ms)});
            match &st.ready {
                Some(Ok(t)) => {
                    status["phase"] = json!("Completed");
                    status["updated"] = json!(rfc3339(*t));
                }
                Some(Err(e)) => {
                    status["phase"] = json!("Failed");
                    status["error"] = json!(e);
                }
                None => status["phase"] = json!("InProgress"),
            }
            out.push(&json!({
                "spec": {
                    "backupName": name,
                    "backupUID": s.options.uid,
                    "backupItemAction": "velero.io/csi-volumesnapshot-backupper",
                    "resourceIdentifier": vs,
                    "operationID": operation_id(ns, &m.snapshot, cut.at_ms),
                    "postOperationItems": [vs, vsc],
                },
                "status": status,
            }))?;
        }
    }
    out.finish()
}

/// The archived VolumeSnapshots, VolumeSnapshotContents and used VolumeSnapshotClasses of the
/// backup's kept snapshots (`-csi-volumesnapshots.json.gz` and its two siblings): the first two as
/// the bytes of their JSON arrays, each object parsed, written and dropped in turn (as `Value`s at
/// once they were tens of megabytes at 100k objects).
pub fn csi_objects<W: Write>(
    s: &BackupState,
    body: &dyn Fn(BodyId) -> Result<Arc<str>, String>,
    snapshots: W,
    contents: W,
) -> std::io::Result<(W, W, Value)> {
    let (mut snapshots, mut contents) = (JsonArray::new(snapshots), JsonArray::new(contents));
    let mut used: BTreeSet<String> = BTreeSet::new();
    for snap in kept_snapshots(s).filter_map(|st| Snapshot::of(s, st)) {
        if snap.plan.group.is_none() {
            used.insert(snap.plan.class.clone());
        }
        for m in snap.members() {
            // The archived objects, read back from the log's bodies (not held by the state).
            let parse = |id: BodyId| -> std::io::Result<Value> {
                let json = body(id).map_err(std::io::Error::other)?;
                Ok(serde_json::from_str::<Value>(&json).unwrap_or(Value::Null))
            };
            let vs = parse(m.snapshot_body)?;
            if let Some(c) = vs.pointer("/spec/volumeSnapshotClassName").and_then(Value::as_str) {
                used.insert(c.to_string());
            }
            snapshots.push(&vs)?;
            contents.push(&parse(m.content_body)?)?;
        }
    }
    // Listed classes lack apiVersion and kind (a list response omits them): set them, as for items.
    let class_type = s.resources.iter().flatten().find(|r| r.gr.resource == "volumesnapshotclasses");
    let classes: Vec<Value> = s
        .snapshot_classes
        .iter()
        .filter_map(|j| serde_json::from_str::<Value>(j).ok())
        .filter(|c| c.pointer("/metadata/name").and_then(Value::as_str).is_some_and(|n| used.contains(n)))
        .map(|mut c| {
            if let (Some(rt), Some(o)) = (class_type, c.as_object_mut()) {
                o.insert("apiVersion".into(), Value::String(rt.api_version()));
                o.insert("kind".into(), Value::String(rt.kind.clone()));
            }
            c
        })
        .collect();
    Ok((snapshots.finish()?, contents.finish()?, Value::Array(classes)))
}

/// A companion file being written: its JSON compressed as it is made (never whole in memory:
/// tens of megabytes at a million objects), handed to the encoder in 64 KiB pieces. The pieces
/// decide the compressed bytes, and they are the same for the same JSON: the same state gives the
/// same file.
pub type GzFile = std::io::BufWriter<flate2::write::GzEncoder<Vec<u8>>>;

/// A new [`GzFile`].
pub fn gz_file() -> GzFile {
    std::io::BufWriter::with_capacity(64 << 10, crate::store::gzip_encoder(Vec::new()))
}

/// The compressed bytes of `f`, with `tail` written last.
pub fn gz_finish(f: GzFile, tail: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = f.into_inner().map_err(|e| e.into_error())?;
    gz.write_all(tail)?;
    gz.finish()
}

/// A JSON array written one element at a time into `W` (a gzip encoder: the file's JSON is never
/// whole in memory): the bytes `serde_json::to_vec` gives the array.
struct JsonArray<W: Write> {
    sink: W,
    started: bool,
}

impl<W: Write> JsonArray<W> {
    fn new(sink: W) -> JsonArray<W> {
        JsonArray { sink, started: false }
    }

    fn push(&mut self, v: &Value) -> std::io::Result<()> {
        self.sink.write_all(if self.started { b"," } else { b"[" })?;
        self.started = true;
        serde_json::to_writer(&mut self.sink, v).map_err(std::io::Error::other)
    }

    fn finish(mut self) -> std::io::Result<W> {
        if !self.started {
            self.sink.write_all(b"[")?;
        }
        self.sink.write_all(b"]")?;
        Ok(self.sink)
    }
}

/// The resource list's name of `key`'s type: `"<apiVersion>/<Kind>"` of its served type, or
/// `"<resource>[.<group>]/unknown"`.
fn list_type(types: &[&ResourceType], key: &ItemKey) -> String {
    match types.iter().find(|rt| rt.gr.group == key.group() && rt.gr.resource == key.resource()) {
        Some(rt) => format!("{}/{}", rt.api_version(), rt.kind),
        None => format!("{}/unknown", key.gr().dir_name()),
    }
}

/// The resource list's name of `key`: `"ns/name"`, or `"name"` for a cluster-scoped item.
fn list_name(key: &ItemKey) -> String {
    match &key.namespace() {
        Some(ns) => format!("{ns}/{}", key.name()),
        None => key.name().to_string(),
    }
}

/// `<name>-resource-list.json.gz`'s content, gathered from the log's events
/// ([`ResourceNames::push`]): `"<apiVersion>/<Kind>"` → sorted `"ns/name"` (or `"name"` for
/// cluster-scoped items) of every item in the archive — the writes the archive's entries are
/// ([`final_write`]). No set or vector of every name is held (a million names and their types
/// were ~80 MB when the companion files were made): the (type, name) pairs are sorted on disk
/// beside the log ([`crate::sorted`]) and the JSON written from their merge.
pub struct ResourceNames<'a> {
    state: &'a BackupState,
    types: Vec<&'a ResourceType>,
    /// Each type met: group, resource, its name in the list ([`list_type`]).
    gvks: Vec<(String, String, String)>,
    names: Sorter<(String, String)>,
}

/// (type, name) pairs sorted in memory before they are written as one run (~2 MB).
const NAMES_RUN_RECORDS: usize = 16_384;

impl<'a> ResourceNames<'a> {
    /// Starts the list of the backup whose whole log folds to `state`, sorting in `dir` (its own:
    /// emptied first; `None`: in memory).
    pub fn new(state: &'a BackupState, dir: Option<&Path>) -> std::io::Result<ResourceNames<'a>> {
        let types = state.resources.iter().flatten().collect();
        Ok(ResourceNames { state, types, gvks: Vec::new(), names: Sorter::fresh(dir, NAMES_RUN_RECORDS)? })
    }

    /// Takes the log's next event.
    pub fn push(&mut self, e: &Event) -> std::io::Result<()> {
        let Some((_, key, _)) = final_write(self.state, e) else { return Ok(()) };
        let at = self.gvks.iter().position(|(g, r, _)| *g == key.group() && *r == key.resource());
        let id = at.unwrap_or_else(|| {
            self.gvks.push((key.group().to_string(), key.resource().to_string(), list_type(&self.types, key)));
            self.gvks.len() - 1
        });
        self.names.push((self.gvks[id].2.clone(), list_name(key)))
    }

    /// The list as JSON, into `out`: types in the order of their names (two types may share one:
    /// their names merge), each type's names sorted, each once.
    pub fn json<W: Write>(self, mut out: W) -> std::io::Result<W> {
        let sorted = self.names.finish()?;
        out.write_all(b"{")?;
        let mut prev: Option<(String, String)> = None;
        for pair in sorted.iter()? {
            let (label, name) = pair?;
            match &prev {
                Some(p) if p.0 == label && p.1 == name => continue,
                Some(p) if p.0 == label => out.write_all(b",")?,
                p => {
                    if p.is_some() {
                        out.write_all(b"],")?;
                    }
                    serde_json::to_writer(&mut out, &label).map_err(std::io::Error::other)?;
                    out.write_all(b":[")?;
                }
            }
            serde_json::to_writer(&mut out, &name).map_err(std::io::Error::other)?;
            prev = Some((label, name));
        }
        if prev.is_some() {
            out.write_all(b"]")?;
        }
        out.write_all(b"}")?;
        Ok(out)
    }
}

/// Errors or warnings in Velero's `results.Result` shape.
#[derive(Debug, Default)]
struct ResultPart {
    velero: Vec<String>,
    cluster: Vec<String>,
    namespaces: BTreeMap<String, Vec<String>>,
}

impl ResultPart {
    fn push(&mut self, namespace: Option<&str>, cluster: bool, message: String) {
        match (namespace, cluster) {
            (Some(ns), _) => self.namespaces.entry(ns.to_string()).or_default().push(message),
            (None, true) => self.cluster.push(message),
            (None, false) => self.velero.push(message),
        }
    }

    /// Velero omits empty parts (`omitempty`).
    fn to_json(&self) -> Value {
        let mut o = serde_json::Map::new();
        if !self.velero.is_empty() {
            o.insert("velero".into(), json!(self.velero));
        }
        if !self.cluster.is_empty() {
            o.insert("cluster".into(), json!(self.cluster));
        }
        if !self.namespaces.is_empty() {
            o.insert("namespaces".into(), json!(self.namespaces));
        }
        Value::Object(o)
    }
}

/// `<name>-results.gz`'s content, gathered event by event: `{"errors": {...}, "warnings": {...}}`,
/// each split like Velero's `results.Result` into `velero` (backup-wide), `cluster` (cluster-scoped
/// items) and `namespaces`. The messages are exactly those of `describe` (the fold's,
/// de-duplicated the same way).
#[derive(Default)]
struct Results {
    errors: ResultPart,
    warnings: ResultPart,
    seen: BTreeSet<String>,
    /// Of each block that failed (as the final state says), the namespace of its first
    /// namespaced item, taken from its `BlockPlanned` record (the state does not hold the plans).
    failed_ns: BTreeMap<u32, Option<String>>,
}

impl Results {
    fn push(&mut self, s: &BackupState, e: &Event) {
        let (part, ns, cluster, message) = match e {
            Event::BlockPlanned { blocks } => {
                for b in blocks {
                    if s.blocks.failed(b.id as usize) {
                        self.failed_ns.insert(b.id, b.items.iter().find_map(|k| k.namespace().map(str::to_string)));
                    }
                }
                return;
            }
            Event::ListFailed { unit, error } => {
                (&mut self.errors, unit.namespace.clone(), false, format!("listing {unit} failed: {error}"))
            }
            Event::Diagnostic { severity: Severity::Error, message } => {
                (&mut self.errors, None, false, message.clone())
            }
            Event::Diagnostic { severity: Severity::Warning, message } => {
                (&mut self.warnings, None, false, message.clone())
            }
            Event::HookFinished { block, hook, outcome, .. } if !outcome.ok() => (
                &mut self.errors,
                hook.pod.namespace().map(str::to_string),
                true,
                format!("block {block}: {:?} hook {} of {}: {outcome}", hook.phase, hook.index, hook.pod),
            ),
            Event::ItemFailed { block, key, error, .. } => {
                (&mut self.errors, key.namespace().map(str::to_string), true, format!("block {block}: {key}: {error}"))
            }
            Event::SnapshotFailed { id, error, .. } => {
                let Some(p) = s.snapshot_plan(*id) else { return };
                let msg = format!("snapshot {} of {}/{}: {error}", p.name, p.namespace, p.claims.join(","));
                (&mut self.errors, Some(p.namespace), false, msg)
            }
            Event::SnapshotReady { id, error: Some(e), .. } => {
                let Some(p) = s.snapshot_plan(*id) else { return };
                let msg = format!("snapshot {} in {}: {e}", p.name, p.namespace);
                (&mut self.errors, Some(p.namespace), false, msg)
            }
            Event::SnapshotReleased { id, error: Some(e), .. } => {
                let Some(p) = s.snapshot_plan(*id) else { return };
                let msg = format!("releasing snapshot {} in {}: {e}", p.name, p.namespace);
                (&mut self.errors, Some(p.namespace), false, msg)
            }
            Event::BlockFinished { block, outcome: BlockOutcome::Failed { reason }, .. } => {
                let ns = self.failed_ns.get(block).cloned().flatten();
                (&mut self.errors, ns, true, format!("block {block} failed: {reason}"))
            }
            _ => return,
        };
        if self.seen.insert(message.clone()) {
            part.push(ns.as_deref(), cluster, message);
        }
    }

    fn to_json(&self) -> Value {
        json!({"errors": self.errors.to_json(), "warnings": self.warnings.to_json()})
    }
}

/// Velero's companion files of a backup, built from its events one at a time (a 300,000-object
/// backup's log is not held in memory for them): the log lines are compressed as they come.
pub struct BackupFiles<'a> {
    name: &'a str,
    state: &'a BackupState,
    results: Results,
    logs: flate2::write::GzEncoder<Spool>,
    volumes: VolumeObjects,
    names: ResourceNames<'a>,
    next: u64,
}

impl<'a> BackupFiles<'a> {
    /// Starts the files of backup `name`, whose final state is `state`; the resource list is
    /// sorted in `sort_dir`'s `resource-names/` ([`ResourceNames::new`]) and the compressed log
    /// lines are spooled to its `companion-logs/` (`None`: both in memory).
    pub fn new(
        name: &'a str,
        state: &'a BackupState,
        plans: &dyn PlanSource,
        sort_dir: Option<&Path>,
    ) -> std::io::Result<BackupFiles<'a>> {
        let names = sort_dir.map(|d| d.join("resource-names"));
        Ok(BackupFiles {
            name,
            state,
            results: Results::default(),
            logs: crate::store::gzip_encoder(Spool::new(sort_dir.map(|d| d.join("companion-logs")).as_deref())?),
            volumes: VolumeObjects::new(state, plans, sort_dir.map(|d| d.join("volume-objects")).as_deref())?,
            names: ResourceNames::new(state, names.as_deref())?,
            next: 0,
        })
    }

    /// Takes the log's next event.
    pub fn push(&mut self, e: &Event) -> std::io::Result<()> {
        self.results.push(self.state, e);
        self.volumes.push(e);
        self.names.push(e)?;
        let mut line = event_line(self.next, e);
        line.push('\n');
        self.next += 1;
        self.logs.write_all(line.as_bytes())
    }

    /// The files, in the order to store them: `velero-backup.json` last, because Velero takes its
    /// presence to mean the backup is complete. Each is made when asked for
    /// ([`CompanionFiles::next_file`]), so that the caller stores and drops one before the next is
    /// made (made together, the compressed files were ~60 MB of the 1M backup's last peak).
    pub fn finish(self) -> std::io::Result<CompanionFiles<'a>> {
        Ok(CompanionFiles {
            name: self.name,
            state: self.state,
            step: 0,
            names: Some(self.names),
            results: Some(self.results),
            logs: Some(self.logs),
            volumes: Some(self.volumes),
            contents: None,
            classes: None,
        })
    }
}

/// Bytes written out of memory: to a file of their own in a directory (emptied first: what a
/// killed process left there goes), or to memory when there is none (a log held in memory).
pub struct Spool {
    inner: SpoolInner,
}

enum SpoolInner {
    Memory(Vec<u8>),
    File { path: std::path::PathBuf, file: std::io::BufWriter<std::fs::File> },
}

impl Spool {
    /// A spool in `dir` (created; emptied), or in memory.
    pub fn new(dir: Option<&Path>) -> std::io::Result<Spool> {
        let Some(dir) = dir else { return Ok(Spool { inner: SpoolInner::Memory(Vec::new()) }) };
        crate::sorted::fresh_dir(dir)?;
        let path = dir.join("spool");
        let file = std::fs::File::create(&path)?;
        Ok(Spool { inner: SpoolInner::File { path, file: std::io::BufWriter::with_capacity(64 << 10, file) } })
    }

    /// Everything written, read back (the file removed).
    pub fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self.inner {
            SpoolInner::Memory(v) => Ok(v),
            SpoolInner::File { path, file } => {
                drop(file.into_inner().map_err(|e| e.into_error())?);
                let bytes = std::fs::read(&path)?;
                if let Some(dir) = path.parent() {
                    std::fs::remove_dir_all(dir)?;
                }
                Ok(bytes)
            }
        }
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            SpoolInner::Memory(v) => v.write(buf),
            SpoolInner::File { file, .. } => file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            SpoolInner::Memory(v) => v.flush(),
            SpoolInner::File { file, .. } => file.flush(),
        }
    }
}

/// Velero's companion files of a backup, made one at a time in the order they are stored
/// ([`BackupFiles::finish`]).
pub struct CompanionFiles<'a> {
    name: &'a str,
    state: &'a BackupState,
    step: u8,
    names: Option<ResourceNames<'a>>,
    results: Option<Results>,
    logs: Option<flate2::write::GzEncoder<Spool>>,
    volumes: Option<VolumeObjects>,
    /// Made with the VolumeSnapshots' file (one pass over the cut snapshots), stored after it.
    contents: Option<Vec<u8>>,
    classes: Option<Value>,
}

impl CompanionFiles<'_> {
    /// The next file and its bytes (`None` once all are made); `body` reads back an object the
    /// log carries.
    pub fn next_file(
        &mut self,
        body: &dyn Fn(BodyId) -> Result<Arc<str>, String>,
    ) -> std::io::Result<Option<(String, Vec<u8>)>> {
        let (name, s) = (self.name, self.state);
        let gz = gz_file;
        // Velero writes these with a JSON encoder: the value and a newline.
        let with_newline = |f: GzFile| gz_finish(f, b"\n");
        let gone = || std::io::Error::other("a companion file was asked for twice");
        let step = self.step;
        self.step = self.step.saturating_add(1);
        let file = match step {
            0 => (
                format!("{name}-resource-list.json.gz"),
                gz_finish(self.names.take().ok_or_else(gone)?.json(gz())?, b"")?,
            ),
            1 => {
                let results = self.results.take().ok_or_else(gone)?;
                let bytes = serde_json::to_vec(&results.to_json()).map_err(std::io::Error::other)?;
                (format!("{name}-results.gz"), gzip_reproducible(&bytes)?)
            }
            2 => (format!("{name}-logs.gz"), self.logs.take().ok_or_else(gone)?.finish()?.into_bytes()?),
            3 => {
                let volumes = self.volumes.take().ok_or_else(gone)?;
                (format!("{name}-volumeinfo.json.gz"), with_newline(volume_infos(s, volumes, gz())?)?)
            }
            4 => (format!("{name}-itemoperations.json.gz"), with_newline(item_operations(s, gz())?)?),
            5 => {
                let (snapshots, contents, classes) = csi_objects(s, body, gz(), gz())?;
                self.contents = Some(with_newline(contents)?);
                self.classes = Some(classes);
                (format!("{name}-csi-volumesnapshots.json.gz"), with_newline(snapshots)?)
            }
            6 => (format!("{name}-csi-volumesnapshotcontents.json.gz"), self.contents.take().ok_or_else(gone)?),
            7 => {
                let mut b =
                    serde_json::to_vec(&self.classes.take().ok_or_else(gone)?).map_err(std::io::Error::other)?;
                b.push(b'\n');
                (format!("{name}-csi-volumesnapshotclasses.json.gz"), gzip_reproducible(&b)?)
            }
            8 => {
                let backup = serde_json::to_vec_pretty(&velero_backup_json(s)).map_err(std::io::Error::other)?;
                ("velero-backup.json".to_string(), backup)
            }
            _ => return Ok(None),
        };
        Ok(Some(file))
    }
}

/// A restore as `restore describe -o json` shows it and its live view (`status.json`) records
/// it; [`restore_json`] makes the JSON value, [`write_restore_json`] streams it (the skipped items
/// — tens of thousands in a large restore — one at a time, never a value of them all).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RestoreView<'a> {
    name: &'a str,
    backup_name: &'a str,
    source: &'a str,
    phase: String,
    start_timestamp: String,
    completion_timestamp: Option<String>,
    workers: u32,
    spec: Value,
    archive_sha256: &'a Option<String>,
    progress: Value,
    resources: &'a BTreeMap<String, blockwise_engine::restore_run::Counts>,
    skipped: SkippedView<'a>,
    filtered: u32,
    warnings: usize,
    errors: usize,
    failure_reason: &'a Option<String>,
    results: Value,
}

/// The skipped items, serialized one at a time.
struct SkippedView<'a>(&'a [blockwise_engine::restore_run::Skip]);

impl serde::Serialize for SkippedView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct One<'b> {
            item: String,
            reason: &'b str,
        }
        s.collect_seq(self.0.iter().map(|k| One { item: k.item.to_string(), reason: &k.reason }))
    }
}

fn restore_view(s: &blockwise_engine::restore_run::RestoreState) -> RestoreView<'_> {
    let spec = &s.spec;
    RestoreView {
        name: &spec.name,
        backup_name: &spec.backup_name,
        source: &s.source,
        phase: s.phase().to_string(),
        start_timestamp: rfc3339(s.started_ms),
        completion_timestamp: s.finished_ms.map(rfc3339),
        workers: s.workers,
        spec: json!({
            "includedNamespaces": spec.included_namespaces,
            "excludedNamespaces": spec.excluded_namespaces,
            "includedResources": spec.included_resources,
            "excludedResources": spec.excluded_resources,
            "namespaceMapping": spec.namespace_mapping,
            "existingResourcePolicy": spec.existing_resource_policy.as_str(),
            "restorePVs": spec.restore_volumes,
            "labelSelector": spec.label_selector,
        }),
        archive_sha256: &s.archive_sha256,
        progress: json!({"totalItems": s.items, "itemsRestored": s.done.len()}),
        resources: &s.by_resource,
        skipped: SkippedView(&s.skipped),
        filtered: s.filtered,
        warnings: s.warnings.len(),
        errors: s.errors.len(),
        failure_reason: &s.failure,
        results: json!({"warnings": s.warnings, "errors": s.errors}),
    }
}

/// A restore's `describe -o json` (and its live view): Velero's Restore status names where it has
/// one (`phase`, `progress.itemsRestored`/`totalItems`, `warnings`, `errors`), counts per resource,
/// skips and the results per namespace.
pub fn restore_json(s: &blockwise_engine::restore_run::RestoreState) -> Value {
    serde_json::to_value(restore_view(s)).unwrap_or(Value::Null)
}

/// [`restore_json`] written to `w` as it is made (pretty), for the live view.
pub fn write_restore_json(
    w: impl std::io::Write,
    s: &blockwise_engine::restore_run::RestoreState,
) -> serde_json::Result<()> {
    serde_json::to_writer_pretty(w, &restore_view(s))
}

/// `restore describe` as text, from [`restore_json`] (so a live view renders the same way).
pub fn restore_text(j: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    line(&mut out, "Name:", s(&j["name"]));
    line(&mut out, "Phase:", s(&j["phase"]));
    line(&mut out, "Backup:", format!("{} ({})", s(&j["backupName"]), s(&j["source"])));
    line(&mut out, "Started:", s(&j["startTimestamp"]));
    if let Some(t) = j["completionTimestamp"].as_str() {
        line(&mut out, "Completed:", t.to_string());
    }
    let p = &j["progress"];
    line(&mut out, "Items:", format!("{}/{} restored", p["itemsRestored"], p["totalItems"]));
    if let Some(m) = j["spec"]["namespaceMapping"].as_object().filter(|m| !m.is_empty()) {
        let pairs: Vec<String> = m.iter().map(|(a, b)| format!("{a}:{}", b.as_str().unwrap_or(""))).collect();
        line(&mut out, "Namespaces:", format!("mapped {}", pairs.join(",")));
    }
    line(&mut out, "Policy:", format!("existing resources: {}", s(&j["spec"]["existingResourcePolicy"])));
    if let Some(r) = j["failureReason"].as_str() {
        line(&mut out, "Failure:", r.to_string());
    }
    out.push_str(&format!("{:<58} {:>7} {:>8} {:>8} {:>7}\n", "Resources:", "planned", "created", "existed", "failed"));
    if let Some(rs) = j["resources"].as_object() {
        for (r, c) in rs {
            out.push_str(&format!(
                "  {r:<56} {:>7} {:>8} {:>8} {:>7}\n",
                n(&c["planned"]),
                n(&c["created"]),
                n(&c["existed"]),
                n(&c["failed"])
            ));
        }
    }
    if let Some(sk) = j["skipped"].as_array().filter(|a| !a.is_empty()) {
        out.push_str(&format!("Skipped:       {}\n", sk.len()));
        for k in sk.iter().take(50) {
            out.push_str(&format!("  {}: {}\n", s(&k["item"]), s(&k["reason"])));
        }
        if sk.len() > 50 {
            out.push_str(&format!("  … and {} more\n", sk.len() - 50));
        }
    }
    if j["filtered"].as_u64().unwrap_or(0) > 0 {
        line(&mut out, "Filtered:", format!("{} archived items left out by the filters", j["filtered"]));
    }
    for (title, key) in [("Warnings:", "warnings"), ("Errors:", "errors")] {
        let r = &j["results"][key];
        line(&mut out, title, j[key].to_string());
        for m in r["cluster"].as_array().into_iter().flatten() {
            out.push_str(&format!("  Cluster: {}\n", s(m)));
        }
        for (ns, ms) in r["namespaces"].as_object().into_iter().flatten() {
            for m in ms.as_array().into_iter().flatten() {
                out.push_str(&format!("  Namespace {ns}: {}\n", s(m)));
            }
        }
    }
    out
}

/// One line of `restore logs`.
pub fn restore_event_line(seq: u64, e: &blockwise_engine::restore_run::RestoreEvent) -> String {
    use blockwise_engine::restore_run::{ItemOutcome, RestoreEvent as E};
    let body = match e {
        E::Requested { spec, source, workers, at_ms } => {
            format!("{} restore {} of backup {} requested from {source}, {workers} workers", rfc3339(*at_ms), spec.name, spec.backup_name)
        }
        E::Planned { archive_sha256, items, skipped, invalid, filtered, at_ms, .. } => format!(
            "{} planned {items} objects from the archive (sha256 {archive_sha256}); {} skipped, {} invalid, {filtered} filtered out",
            rfc3339(*at_ms),
            skipped.len(),
            invalid.len()
        ),
        E::CreatesStarted { items } => format!("creates of {} items about to be sent", items.len()),
        E::ItemRestored { target, outcome, at_ms, .. } => {
            let what = match outcome {
                ItemOutcome::Created => "created".to_string(),
                ItemOutcome::Updated => "existed, updated".to_string(),
                ItemOutcome::Existed { warning: None } => "existed".to_string(),
                ItemOutcome::Existed { warning: Some(w) } => format!("existed: warning: {w}"),
                ItemOutcome::Failed { error } => format!("failed: {error}"),
            };
            format!("{} {target}: {what}", rfc3339(*at_ms))
        }
        E::RestoreFailed { error, at_ms } => format!("{} restore failed: {error}", rfc3339(*at_ms)),
        E::RestoreFinished { at_ms } => format!("{} restore finished", rfc3339(*at_ms)),
    };
    format!("{seq:>6} {body}")
}

#[cfg(test)]
mod tests {

    /// The volume information's objects: of a claim or volume taken twice, a listed one wins over
    /// a fetched one and a later over an earlier; each bound wanted claim comes once, in key
    /// order, with its volume's facts when the volume was taken — on disk or in memory.
    #[test]
    fn volume_objects_join_the_winning_claims_and_volumes() {
        let tmp = tempfile::tempdir().unwrap();
        for dir in [None, Some(tmp.path().join("vo"))] {
            let pvcs = ResourceType::new("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true);
            let pvs = ResourceType::new("", "v1", "persistentvolumes", "PersistentVolume", false);
            let claim = |n: &str| ItemKey::namespaced("", "persistentvolumeclaims", "a", n);
            let mut wanted: Vec<u128> = ["c1", "c2", "c3", "c0"].iter().map(|n| claim(n).digest()).collect();
            wanted.sort_unstable();
            let mut objects = VolumeObjects {
                types: [(pvcs.gr.clone(), pvcs.clone()), (pvs.gr.clone(), pvs.clone())].into_iter().collect(),
                wanted,
                claims: Sorter::fresh(dir.as_ref().map(|d| d.join("claims")).as_deref(), 2).unwrap(),
                volumes: Sorter::fresh(dir.as_ref().map(|d| d.join("volumes")).as_deref(), 2).unwrap(),
                dir: dir.clone(),
                seq: 0,
                failed: None,
            };
            let pvc = |n: &str, pv: Option<&str>| match pv {
                Some(pv) => json!({"metadata": {"namespace": "a", "name": n},
                    "spec": {"volumeName": pv}, "status": {"phase": "Bound"}})
                .to_string(),
                None => json!({"metadata": {"namespace": "a", "name": n}, "status": {"phase": "Pending"}}).to_string(),
            };
            let pv = |n: &str, policy: &str| {
                json!({"metadata": {"name": n}, "spec": {"persistentVolumeReclaimPolicy": policy}}).to_string()
            };
            let taken = [
                (&pvcs, pvc("c3", Some("pv-gone")), true),
                (&pvcs, pvc("c2", Some("pv3")), true),
                (&pvcs, pvc("c4", Some("pv4")), true),
                (&pvcs, pvc("c1", Some("pv2")), true),
                (&pvcs, pvc("c1", Some("pv1")), false),
                (&pvcs, pvc("c2", None), true),
                (&pvcs, pvc("c0", Some("pv0")), false),
                (&pvs, pv("pv2", "Retain"), true),
                (&pvs, pv("pv1", "Delete"), false),
                (&pvs, pv("pv2", "Delete"), false),
                (&pvs, pv("pv0", "Delete"), false),
                (&pvs, pv("pv0", "Recycle"), false),
            ];
            for (rt, json, listed) in &taken {
                objects.take(&rt.gr, json, *listed);
            }
            let joined = objects.finish().unwrap();
            let got: Vec<(String, String, Option<String>)> = (joined.iter().unwrap())
                .map(|j| j.unwrap())
                .map(|j| (j.key.name().to_string(), j.volume, j.facts.map(|f| f.reclaim_policy.to_string())))
                .collect();
            let want = [("c0", "pv0", Some("Recycle")), ("c1", "pv2", Some("Retain")), ("c3", "pv-gone", None)];
            let want: Vec<(String, String, Option<String>)> =
                want.iter().map(|(c, v, p)| (c.to_string(), v.to_string(), p.map(str::to_string))).collect();
            assert_eq!(got, want, "{dir:?}");
        }
    }

    #[test]
    fn a_json_array_written_element_by_element_is_the_array_serde_writes() {
        for n in 0..3 {
            let values: Vec<Value> = (0..n).map(|i| json!({"b": i, "a": [i, "x"]})).collect();
            let mut array = JsonArray::new(Vec::new());
            for v in &values {
                array.push(v).unwrap();
            }
            assert_eq!(array.finish().unwrap(), serde_json::to_vec(&Value::Array(values)).unwrap());
        }
    }

    /// A companion file compressed as its JSON is written holds the JSON (and its newline), and
    /// the same JSON written again gives the same bytes.
    #[test]
    fn a_file_gzipped_as_it_is_written_holds_its_json_and_is_reproducible() {
        let values: Vec<Value> = (0..60_000)
            .map(|i| json!({"name": format!("claim-{i}"), "n": i * 7919 % 1000, "ok": i % 3 == 0}))
            .collect();
        let streamed = || {
            let mut array = JsonArray::new(gz_file());
            for v in &values {
                array.push(v).unwrap();
            }
            gz_finish(array.finish().unwrap(), b"\n").unwrap()
        };
        let bytes = streamed();
        let mut whole = serde_json::to_vec(&Value::Array(values.clone())).unwrap();
        whole.push(b'\n');
        assert!(whole.len() > 1 << 20, "more than one deflate window and buffer");
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes.as_slice()), &mut read).unwrap();
        assert!(read == whole, "the file does not hold its JSON");
        assert_eq!(bytes, streamed());
    }

    use super::*;

    /// A spool gives back what was written to it, from its file (removed then, with its
    /// directory; what a killed process left there removed when a spool starts) or from memory.
    #[test]
    fn a_spool_gives_back_its_bytes_and_leaves_nothing() {
        let root = std::env::temp_dir().join(format!("blockwise-spool-{}", std::process::id()));
        let dir = root.join("companion-logs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("left-by-a-killed-run"), b"x").unwrap();
        let bytes: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        for at in [Some(dir.as_path()), None] {
            let mut spool = Spool::new(at).unwrap();
            if at.is_some() {
                assert!(!dir.join("left-by-a-killed-run").exists());
            }
            for part in bytes.chunks(7_001) {
                spool.write_all(part).unwrap();
            }
            assert_eq!(spool.into_bytes().unwrap(), bytes);
            assert!(!dir.exists(), "the spool's directory is gone once read");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The resource list written from one sorted vector is byte for byte the serialized map,
    /// across types (one served twice under one name, one not served), namespaced and
    /// cluster-scoped names, names needing escapes, an item written twice, and no item at all.
    #[test]
    fn the_resource_list_json_is_the_serialized_map() {
        use blockwise_engine::event::BlockOutcome;
        use blockwise_engine::grouping::BlockPlan;
        use std::sync::Arc;
        let cm = |ns: &str, n: &str| ItemKey::namespaced("", "configmaps", ns, n);
        let keys = [
            cm("b", "x"),
            cm("a-b", "y"),
            cm("a", "z\"quote"),
            ItemKey::cluster("", "namespaces", "a"),
            ItemKey::namespaced("apps", "deployments", "a", "web"),
            ItemKey::namespaced("example.com", "widgets", "a", "w"),
            ItemKey::namespaced("apps", "olddeployments", "a", "old"),
        ];
        let strays =
            [ItemKey::namespaced("", "secrets", "a", "stray"), ItemKey::namespaced("", "secrets", "a", "open")];
        let resources = vec![
            ResourceType::new("", "v1", "configmaps", "ConfigMap", true),
            ResourceType::new("", "v1", "namespaces", "Namespace", false),
            ResourceType::new("apps", "v1", "deployments", "Deployment", true),
            ResourceType::new("apps", "v1", "olddeployments", "Deployment", true),
        ];
        let plan = |id: u32, keys: &[ItemKey]| {
            Arc::new(BlockPlan { id, items: keys.into(), hooks: Box::default(), bodies: Box::default() })
        };
        let mut events = vec![
            Event::BackupRequested { spec: blockwise_engine::spec::BackupSpec::new("b"), workers: 1, at_ms: 1 },
            Event::ResourcesDiscovered { resources },
            Event::BlockPlanned {
                blocks: vec![plan(0, &keys[..4]), plan(1, &keys[4..]), plan(2, &strays[..1]), plan(3, &strays[1..])],
            },
        ];
        let empty = BackupState::fold(&events).unwrap();
        assert_eq!(names(&empty, &events).json(Vec::new()).unwrap(), b"{}");
        for (block, keys) in [(1u32, &keys[4..]), (0, &keys[..4])] {
            events.push(Event::BlockStarted { block, attempt: 1, at_ms: 2 });
            for (i, key) in keys.iter().chain(&keys[..1]).enumerate() {
                let digest = [i as u8; 32];
                events.push(Event::ItemWritten { block, attempt: 1, key: key.clone(), digest, bytes: 1 });
            }
            events.push(Event::BlockFinished { block, attempt: 1, outcome: BlockOutcome::Completed, at_ms: 3 });
        }
        // An earlier attempt's write that the last one did not repeat is not listed; an
        // unfinished block's writes are not either.
        for (block, attempt) in [(2, 1), (3, 1), (2, 2)] {
            events.push(Event::BlockStarted { block, attempt, at_ms: 4 });
            let key = strays[block as usize - 2].clone();
            if attempt == 1 {
                events.push(Event::ItemWritten { block, attempt, key, digest: [9; 32], bytes: 1 });
            }
        }
        events.push(Event::BlockFinished { block: 2, attempt: 2, outcome: BlockOutcome::Completed, at_ms: 5 });
        let s = BackupState::fold(&events).unwrap();
        let map = resource_list(&s, &events);
        assert_eq!(map["apps/v1/Deployment"], ["a/old", "a/web"]);
        assert_eq!(map["v1/ConfigMap"], ["a-b/y", "a/z\"quote", "b/x"]);
        assert_eq!(map["widgets.example.com/unknown"], ["a/w"]);
        assert_eq!(map.len(), 4, "{map:?}");
        let json = String::from_utf8(names(&s, &events).json(Vec::new()).unwrap()).unwrap();
        assert_eq!(json, serde_json::to_string(&map).unwrap());
        // Sorted through files in runs of two (names repeated across runs, types split by them),
        // the same bytes; the run files go with the list.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("names");
        let mut on_disk = ResourceNames::new(&s, Some(&dir)).unwrap();
        on_disk.names = Sorter::new(Some(&dir), 2).unwrap();
        events.iter().for_each(|e| on_disk.push(e).unwrap());
        assert_eq!(String::from_utf8(on_disk.json(Vec::new()).unwrap()).unwrap(), json);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "run files left behind");
    }

    fn names<'a>(s: &'a BackupState, events: &[Event]) -> ResourceNames<'a> {
        let mut names = ResourceNames::new(s, None).unwrap();
        events.iter().for_each(|e| names.push(e).unwrap());
        names
    }

    /// The list as a map of sets: what [`ResourceNames::json`] must serialize to.
    fn resource_list(s: &BackupState, events: &[Event]) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let types: Vec<&ResourceType> = s.resources.iter().flatten().collect();
        for (_, key, _) in events.iter().filter_map(|e| final_write(s, e)) {
            out.entry(list_type(&types, key)).or_default().insert(list_name(key));
        }
        out.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_492_870_000), "2026-11-24T04:01:10Z");
    }
}
