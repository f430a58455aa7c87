//! The judges: DESIGN §7's invariants, decided from the generated model and the fake world's own
//! records — never from the engine's plan or events, so a wrong plan cannot vouch for itself.
//!
//! What each judge reads:
//! - **G1/G2** — the plan the engine logged is the *defendant*; the *reference* is the model's
//!   naive oracle ([`Model::oracle_blocks`]) over what the world's list and get records say was
//!   visible. **G3** (in [`crate::runner`]) compares two runs' plans and archives.
//! - **H1** — every staged write (the store's record) of an item of an oracle block happens inside
//!   the freeze window of every hooked pod of that block: each pre-hook the *model* gives the pod
//!   has an exec (the cluster's record) that ended before the write, and no post-hook exec of the
//!   pod started in between. **H3** — the exec that opened the window did not fail in Fail mode, and
//!   no block whose Fail-mode pre-hook the model says is invalid writes anything.
//! - **H2** — every pre-hook exec of a pod the model gives a post-hook is followed by a post-hook
//!   exec before the pod's next pre-hook, before the end of the run, and before a run that stopped
//!   on a store failure ended its process.
//! - **HR** — every exec is a valid hook the model gives that pod (annotation over spec, Running
//!   pods only, invalid hooks never exec'd). **T1** — every exec ended within its model timeout, or
//!   was cancelled exactly at it (or by a crash).
//! - **E1** — the archive (bytes read back from the store) holds exactly the items of the oracle
//!   blocks whose Fail-mode pre-hooks all succeeded in their last exec, each once, each equal to the
//!   model's object; it passes `inspect` against the stored resource list; the companion files are
//!   stored, `velero-backup.json` only after the others.
//! - **F1** — after a restart, nothing is staged and no hook runs for a block the log durably
//!   recorded as finished (except re-staging an item the archive build found missing). **W1** —
//!   when a process ends, every item the log durably says was written is durably in the store.
//!   These two read the log, because "finished" and "written" are what the log promised; they hold
//!   the engine to that promise with the world's records.
//! - **L1/R1** — the run reached a terminal phase, or recovery refused exactly the flipped record.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use blockwise_engine::event::Event;
use blockwise_engine::grouping::BlockPlan;
use blockwise_engine::hooks::{HookPhase, OnError};
use blockwise_engine::item::ItemKey;
use serde::Serialize;
use serde_json::Value;

use crate::model::{HookDef, Model, Visibility};
use crate::records::{ExecEnd, GetAnswer, ListAnswer, Record};
use crate::sim::{Outcome, RunReport, BACKUP};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `G1`, `H2`, …
    pub invariant: &'static str,
    /// What was wrong.
    pub detail: String,
}

fn v(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// One exec as the cluster recorded it.
#[derive(Debug, Clone)]
pub struct Exec {
    /// Record index of its start.
    pub start: usize,
    /// Virtual time of its start.
    pub start_ms: u64,
    /// Record index and time of its end, and how it ended.
    pub end: Option<(usize, u64, ExecEnd)>,
    /// The pod.
    pub pod: ItemKey,
    /// The command.
    pub command: Vec<String>,
}

impl Exec {
    /// Ended with exit status 0 within `timeout_ms`.
    fn succeeded(&self, timeout_ms: u64) -> bool {
        matches!(&self.end, Some((_, at, ExecEnd::Exited(0))) if at - self.start_ms <= timeout_ms)
    }
}

/// The world's records, indexed for the judges.
pub struct Evidence {
    /// Every exec, in start order.
    pub execs: Vec<Exec>,
    /// Staged writes: record index, item.
    pub staged: Vec<(usize, ItemKey)>,
    /// Staged items a read found missing: record index, item.
    pub missing: Vec<(usize, ItemKey)>,
    /// What the engine could see.
    pub visibility: Visibility,
}

/// The item of a staged path, `backups/<b>/staging/resources/<res>[.<group>]/{namespaces/<ns>|cluster}/<name>.json`,
/// parsed here from the layout Velero documents (no engine code).
pub fn item_of_path(path: &str) -> Option<ItemKey> {
    let rest = path.split_once("/staging/").map_or(path, |(_, r)| r);
    item_of_archive_path(rest)
}

/// The item of an archive path `resources/<res>[.<group>]/{namespaces/<ns>|cluster}/<name>.json`.
fn item_of_archive_path(path: &str) -> Option<ItemKey> {
    let parts: Vec<&str> = path.strip_prefix("resources/")?.split('/').collect();
    let (gr, scope) = (parts.first()?, &parts[1..]);
    let (resource, group) = gr.split_once('.').unwrap_or((gr, ""));
    match scope {
        ["namespaces", ns, file] => Some(ItemKey::namespaced(group, resource, ns, file.strip_suffix(".json")?)),
        ["cluster", file] => Some(ItemKey::cluster(group, resource, file.strip_suffix(".json")?)),
        _ => None,
    }
}

/// Indexes a run's records.
pub fn evidence(records: &[Record]) -> Evidence {
    let mut execs: Vec<Exec> = Vec::new();
    let mut by_id: BTreeMap<u64, usize> = BTreeMap::new();
    let mut staged = Vec::new();
    let mut missing = Vec::new();
    let mut last_list: BTreeMap<(String, Option<String>), bool> = BTreeMap::new();
    let mut last_get: BTreeMap<ItemKey, bool> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        match r {
            Record::ExecStart { id, at_ms, pod, command, .. } => {
                by_id.insert(*id, execs.len());
                execs.push(Exec { start: i, start_ms: *at_ms, end: None, pod: pod.clone(), command: command.clone() });
            }
            Record::ExecEnd { id, at_ms, end } => {
                if let Some(&e) = by_id.get(id) {
                    execs[e].end = Some((i, *at_ms, end.clone()));
                }
            }
            Record::Staged { path, .. } => {
                if let Some(k) = item_of_path(path) {
                    staged.push((i, k));
                }
            }
            Record::ReadMissing { path, .. } => {
                if let Some(k) = item_of_path(path) {
                    missing.push((i, k));
                }
            }
            Record::List { resource, namespace, answer, .. } => {
                let failed = matches!(answer, ListAnswer::Error(k) if *k != "expired");
                last_list.insert((resource.clone(), namespace.clone()), failed);
            }
            Record::Get { key, answer, .. } => {
                last_get.insert(key.clone(), matches!(answer, GetAnswer::Error(_)));
            }
            _ => {}
        }
    }
    let visibility = Visibility {
        failed_lists: last_list.into_iter().filter(|(_, f)| *f).map(|(k, _)| k).collect(),
        failed_gets: last_get.into_iter().filter(|(_, f)| *f).map(|(k, _)| k).collect(),
    };
    Evidence { execs, staged, missing, visibility }
}

/// The planned blocks recorded in a log.
pub fn planned_blocks(events: &[Event]) -> Vec<BlockPlan> {
    events
        .iter()
        .filter_map(|e| if let Event::BlockPlanned { blocks } = e { Some(blocks.clone()) } else { None })
        .flatten()
        .collect()
}

/// G1/G2: the engine's blocks equal the oracle's, item for item.
pub fn check_grouping(model: &Model, report: &RunReport, ev: &Evidence) -> Vec<Violation> {
    let mut out = Vec::new();
    let blocks = planned_blocks(&report.events);
    if !matches!(report.outcome, Outcome::Finished(_)) {
        return out;
    }
    let mut seen: BTreeMap<&ItemKey, u32> = BTreeMap::new();
    for b in &blocks {
        for k in &b.items {
            if let Some(prev) = seen.insert(k, b.id) {
                out.push(v("G1", format!("{k} is in block {prev} and block {}", b.id)));
            }
        }
    }
    let mut got: Vec<BTreeSet<ItemKey>> = blocks.iter().map(|b| b.items.iter().cloned().collect()).collect();
    got.sort();
    let want = model.oracle_blocks(&ev.visibility);
    if got != want {
        let got_items: BTreeSet<&ItemKey> = got.iter().flatten().collect();
        let want_items: BTreeSet<&ItemKey> = want.iter().flatten().collect();
        if let Some(k) = want_items.difference(&got_items).next() {
            out.push(v("G1", format!("{k} should be in the backup but is in no block")));
        } else if let Some(k) = got_items.difference(&want_items).next() {
            out.push(v("G1", format!("{k} is in a block but should not be in the backup")));
        } else {
            let w = want.iter().find(|w| !got.contains(w)).cloned().unwrap_or_default();
            let names: Vec<String> = w.iter().map(ToString::to_string).collect();
            out.push(v("G2", format!("these items must form one block: {}", names.join(", "))));
        }
    }
    out
}

/// Oracle blocks with the model's hooks of their pods.
struct Blocks {
    of_item: BTreeMap<ItemKey, usize>,
    items: Vec<BTreeSet<ItemKey>>,
    hooks: Vec<Vec<HookDef>>,
}

fn blocks(model: &Model, ev: &Evidence) -> Blocks {
    let items = model.oracle_blocks(&ev.visibility);
    let by_pod: BTreeMap<ItemKey, Vec<HookDef>> = model
        .pods
        .iter()
        .map(|p| (ItemKey::namespaced("", "pods", crate::model::NAMESPACES[p.ns], &p.name), model.hooks(p)))
        .collect();
    let mut of_item = BTreeMap::new();
    let mut hooks = Vec::with_capacity(items.len());
    for (i, b) in items.iter().enumerate() {
        let mut hs = Vec::new();
        for k in b {
            of_item.insert(k.clone(), i);
            hs.extend(by_pod.get(k).cloned().unwrap_or_default());
        }
        hooks.push(hs);
    }
    Blocks { of_item, items, hooks }
}

/// Whether a staged write of `key` at record `at` re-stages an item the archive build found
/// missing (after the latest restart before `at`): a copy of logged bytes, not a new capture.
fn is_restage(records: &[Record], ev: &Evidence, key: &ItemKey, at: usize) -> bool {
    let since = records[..at].iter().rposition(|r| matches!(r, Record::Restart { .. })).unwrap_or(0);
    ev.missing.iter().any(|(i, k)| k == key && *i > since && *i < at)
}

/// H1/H3: writes happen inside complete, successful freeze windows of every hooked pod of their
/// block.
pub fn check_windows(model: &Model, report: &RunReport, ev: &Evidence) -> Vec<Violation> {
    let mut out = Vec::new();
    let b = blocks(model, ev);
    let records = &report.records;
    for (w, key) in &ev.staged {
        let Some(&bi) = b.of_item.get(key) else { continue };
        if is_restage(records, ev, key, *w) {
            continue;
        }
        for h in b.hooks[bi].iter().filter(|h| h.phase == HookPhase::Pre) {
            let pod = &h.pod;
            if !h.valid {
                if h.on_error == OnError::Fail {
                    out.push(v(
                        "H3",
                        format!("{key} was staged although the Fail-mode pre-hook of {pod} in its block is invalid"),
                    ));
                }
                continue;
            }
            let last = ev.execs.iter().rfind(|e| e.start < *w && &e.pod == pod && e.command == h.command);
            let Some(e) = last else {
                out.push(v(
                    "H1",
                    format!("{key} was staged (record {w}) before pre-hook {:?} of {pod} ran", h.command),
                ));
                continue;
            };
            match &e.end {
                Some((end, _, _)) if end < w => {}
                _ => {
                    out.push(v(
                        "H1",
                        format!(
                            "{key} was staged (record {w}) while pre-hook {:?} of {pod} was still running",
                            h.command
                        ),
                    ));
                    continue;
                }
            }
            if h.on_error == OnError::Fail && !e.succeeded(h.timeout_ms) {
                let how = e.end.as_ref().map(|(_, _, x)| format!("{x:?}")).unwrap_or_default();
                out.push(v(
                    "H3",
                    format!("{key} was staged (record {w}) after the Fail-mode pre-hook of {pod} failed ({how})"),
                ));
            }
            let posts: Vec<&HookDef> =
                b.hooks[bi].iter().filter(|p| p.phase == HookPhase::Post && &p.pod == pod).collect();
            let closed = ev.execs.iter().find(|x| {
                x.start > e.start && x.start < *w && &x.pod == pod && posts.iter().any(|p| p.command == x.command)
            });
            if let Some(x) = closed {
                out.push(v(
                    "H1",
                    format!("{key} was staged (record {w}) after post-hook {:?} of {pod} started (record {}): outside the window", x.command, x.start),
                ));
            }
        }
    }
    out
}

/// H2: every opened window is closed — before the pod's next pre-hook, before a stopped run ends
/// its process, and by the end of the run.
pub fn check_closed(model: &Model, report: &RunReport, ev: &Evidence) -> Vec<Violation> {
    let mut out = Vec::new();
    if matches!(report.outcome, Outcome::CorruptionDetected { .. } | Outcome::CorruptionMissed { .. }) {
        // Recovery refused the log (as it must): no process can close what the last one opened.
        return out;
    }
    let hooks = model.all_hooks();
    let is =
        |e: &Exec, phase: HookPhase| hooks.get(&(e.pod.clone(), e.command.clone())).is_some_and(|h| h.phase == phase);
    let has_post = |pod: &ItemKey| hooks.values().any(|h| &h.pod == pod && h.phase == HookPhase::Post && h.valid);
    // A post-hook only closes a window that is open: a pod whose pre-hooks can all run gets a
    // post-hook exec only after a pre-hook exec since its previous post-hook — or, right after a
    // restart, as the first exec of the pod in the new process (the log said its window opened:
    // the intent was durable, whether or not the exec reached the cluster before the crash).
    let pre_all_valid = |pod: &ItemKey| {
        let pres: Vec<&HookDef> = hooks.values().filter(|h| &h.pod == pod && h.phase == HookPhase::Pre).collect();
        !pres.is_empty() && pres.iter().all(|h| h.valid)
    };
    for e in ev.execs.iter().filter(|e| is(e, HookPhase::Post) && pre_all_valid(&e.pod)) {
        let before: Vec<&Exec> = ev.execs.iter().filter(|x| x.start < e.start && x.pod == e.pod).collect();
        let opened = before
            .iter()
            .rev()
            .find(|x| is(x, HookPhase::Pre) || is(x, HookPhase::Post))
            .is_some_and(|x| is(x, HookPhase::Pre));
        let restart = report.records[..e.start].iter().rposition(|r| matches!(r, Record::Restart { .. }));
        let owed_after_restart = restart.is_some_and(|r| before.iter().all(|x| x.start < r));
        if !opened && !owed_after_restart {
            out.push(v(
                "H2",
                format!("{}: post-hook ran (record {}) although no window of the pod was open", e.pod, e.start),
            ));
        }
    }
    for e in ev.execs.iter().filter(|e| is(e, HookPhase::Pre) && has_post(&e.pod)) {
        let later = ev.execs.iter().filter(|x| x.start > e.start && x.pod == e.pod);
        let next_pre = later.clone().find(|x| is(x, HookPhase::Pre)).map(|x| x.start);
        let closed = later.clone().find(|x| is(x, HookPhase::Post)).map(|x| x.start);
        let stopped =
            report.records[e.start..].iter().position(|r| matches!(r, Record::Stopped { .. })).map(|i| i + e.start);
        let pod = &e.pod;
        match (closed, next_pre, stopped) {
            (None, _, _) => {
                out.push(v("H2", format!("{pod}: pre-hook started (record {}) but no post-hook ran after it", e.start)))
            }
            (Some(c), Some(n), _) if n < c => out.push(v(
                "H2",
                format!(
                    "{pod}: the window opened at record {} was not closed before the pod's next pre-hook (record {n})",
                    e.start
                ),
            )),
            (Some(c), _, Some(s)) if s < c => out.push(v(
                "H2",
                format!("{pod}: the run stopped (record {s}) with the window opened at record {} still open", e.start),
            )),
            _ => {}
        }
    }
    out
}

/// HR and T1: every exec is a valid model hook of its pod, and ended within its timeout.
pub fn check_execs(model: &Model, report: &RunReport, ev: &Evidence) -> Vec<Violation> {
    let mut out = Vec::new();
    let hooks = model.all_hooks();
    let records = &report.records;
    for e in &ev.execs {
        let Some(h) = hooks.get(&(e.pod.clone(), e.command.clone())) else {
            out.push(v("HR", format!("{:?} was exec'd in {}, which the model gives no such hook", e.command, e.pod)));
            continue;
        };
        if !h.valid {
            out.push(v(
                "HR",
                format!(
                    "invalid hook {:?} of {} was exec'd (it must be recorded failed without an exec)",
                    e.command, e.pod
                ),
            ));
        }
        match &e.end {
            Some((_, at, ExecEnd::Exited(_) | ExecEnd::Failed(_))) if at - e.start_ms > h.timeout_ms => out.push(v(
                "T1",
                format!(
                    "{:?} in {} ran {} ms, past its {} ms timeout",
                    e.command,
                    e.pod,
                    at - e.start_ms,
                    h.timeout_ms
                ),
            )),
            Some((i, at, ExecEnd::Cancelled)) if at - e.start_ms != h.timeout_ms => {
                let by_crash = records[i + 1..]
                    .iter()
                    .find(|r| !matches!(r, Record::ExecEnd { end: ExecEnd::Cancelled, .. }))
                    .is_some_and(|r| matches!(r, Record::Crash { .. }));
                if !by_crash {
                    out.push(v(
                        "T1",
                        format!(
                            "{:?} in {} was cancelled after {} ms; its timeout is {} ms",
                            e.command,
                            e.pod,
                            at - e.start_ms,
                            h.timeout_ms
                        ),
                    ));
                }
            }
            None if matches!(report.outcome, Outcome::Finished(_)) => {
                out.push(v("T1", format!("{:?} in {} never ended", e.command, e.pod)));
            }
            _ => {}
        }
    }
    out
}

/// Reads a gzip tar: (path, bytes) in archive order.
fn untar(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut out = Vec::new();
    for e in archive.entries().map_err(|e| e.to_string())? {
        let mut e = e.map_err(|e| e.to_string())?;
        let path = e.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        let mut b = Vec::new();
        e.read_to_end(&mut b).map_err(|e| e.to_string())?;
        out.push((path, b));
    }
    Ok(out)
}

/// The items E1 expects in the archive: those of every oracle block whose Fail-mode pre-hooks are
/// all valid and whose last exec succeeded.
pub fn expected_items(model: &Model, ev: &Evidence) -> BTreeSet<ItemKey> {
    let b = blocks(model, ev);
    let mut out = BTreeSet::new();
    for (i, items) in b.items.iter().enumerate() {
        let fails = b.hooks[i].iter().filter(|h| h.phase == HookPhase::Pre && h.on_error == OnError::Fail).any(|h| {
            !h.valid
                || !ev
                    .execs
                    .iter()
                    .rfind(|e| e.pod == h.pod && e.command == h.command)
                    .is_some_and(|e| e.succeeded(h.timeout_ms))
        });
        if !fails {
            out.extend(items.iter().cloned());
        }
    }
    out
}

/// E1: the archive and the companion files.
pub fn check_archive(model: &Model, report: &RunReport, ev: &Evidence) -> Vec<Violation> {
    let mut out = Vec::new();
    if !matches!(report.outcome, Outcome::Finished(_)) {
        return out;
    }
    let Some(archive) = &report.archive else {
        out.push(v("E1", "the backup finished without an archive in the store".into()));
        return out;
    };
    let entries = match untar(archive) {
        Ok(e) => e,
        Err(e) => {
            out.push(v("E1", format!("the archive does not read back: {e}")));
            return out;
        }
    };
    let objects = model.objects_by_key();
    let mut want = expected_items(model, ev);
    let mut seen = BTreeSet::new();
    let mut version = None;
    for (path, bytes) in &entries {
        if path == "metadata/version" {
            version = Some(bytes.clone());
            continue;
        }
        if path.contains("-preferredversion/") {
            continue;
        }
        let Some(key) = item_of_archive_path(path) else {
            out.push(v("E1", format!("{path}: not an item path")));
            continue;
        };
        if !seen.insert(key.clone()) {
            out.push(v("E1", format!("{key} is in the archive twice")));
        }
        if !want.remove(&key) {
            out.push(v("E1", format!("{key} is in the archive but should not be")));
            continue;
        }
        let got: Option<Value> = serde_json::from_slice(bytes).ok();
        if got.as_ref() != objects.get(&key) {
            out.push(v("E1", format!("{key}: the archived object differs from the cluster's")));
        }
    }
    if let Some(k) = want.iter().next() {
        out.push(v("E1", format!("{k} is missing from the archive ({} missing in all)", want.len())));
    }
    if version.as_deref() != Some(b"1.1.0\n".as_slice()) {
        out.push(v(
            "E1",
            format!(
                "metadata/version is {:?}, not \"1.1.0\\n\"",
                version.map(|b| String::from_utf8_lossy(&b).into_owned())
            ),
        ));
    }
    let list = report.files.get(&format!("{BACKUP}-resource-list.json.gz"));
    let found = blockwise_adapters::inspect::inspect(archive, list.map(Vec::as_slice));
    for d in found.defects {
        out.push(v("E1", format!("inspect: {d}")));
    }
    let companions = [
        format!("{BACKUP}-resource-list.json.gz"),
        format!("{BACKUP}-results.gz"),
        format!("{BACKUP}-logs.gz"),
        "velero-backup.json".to_string(),
    ];
    for f in &companions {
        if !report.files.contains_key(f) {
            out.push(v("E1", format!("{f} is not in the store")));
        }
    }
    // velero-backup.json says "complete" to Velero: never before the other files.
    let written = |name: &str, before: usize| {
        report.records[..before]
            .iter()
            .any(|r| matches!(r, Record::FileWritten { path, .. } if path.ends_with(&format!("/{name}"))))
    };
    for (i, r) in report.records.iter().enumerate() {
        if matches!(r, Record::FileWritten { path, .. } if path.ends_with("/velero-backup.json")) {
            for f in &companions[..3] {
                if !written(f, i) {
                    out.push(v("E1", format!("velero-backup.json was stored (record {i}) before {f}")));
                }
            }
        }
    }
    out
}

/// W1: a flushed fact never outlives its item. Whenever a process ended, every item whose
/// `ItemWritten` a flush made durable in it was durably staged with the fact's bytes — unless that
/// process saw a sync barrier fail (the engine then stops, and re-stages at the archive build what
/// did not survive). A fact the log medium kept on its own at a crash, unflushed, is not held to
/// this: no barrier can precede what no flush asked for, and the archive build re-stages it.
pub fn check_write_ahead(report: &RunReport) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut start = 0;
    for p in &report.promises {
        let barrier_failed =
            report.records[start..p.from_record].iter().any(|r| matches!(r, Record::SyncFailed { .. }));
        if let (false, Some(k)) = (barrier_failed, p.facts_without_items.first()) {
            out.push(v(
                "W1",
                format!(
                    "the log recorded {k} as written, but the store did not durably hold it when the process ended at record {} ({} such items)",
                    p.from_record,
                    p.facts_without_items.len()
                ),
            ));
        }
        start = p.from_record;
    }
    out
}

/// F1: no block the log durably recorded as finished is worked on again after a restart.
pub fn check_finished_not_redone(report: &RunReport, ev: &Evidence) -> Vec<Violation> {
    let mut out = Vec::new();
    for d in &report.promises {
        for (i, key) in ev.staged.iter().filter(|(i, _)| *i > d.from_record) {
            if d.items.contains(key) && !is_restage(&report.records, ev, key, *i) {
                out.push(v("F1", format!("{key} was staged again (record {i}) although its block had finished")));
                return out;
            }
        }
        for e in ev.execs.iter().filter(|e| e.start > d.from_record) {
            if d.pods.contains(&e.pod) {
                out.push(v(
                    "F1",
                    format!("{:?} ran in {} (record {}) although its block had finished", e.command, e.pod, e.start),
                ));
                return out;
            }
        }
    }
    out
}

/// L1 and recovery: the run reached a terminal phase — durably — or refused exactly the corrupted
/// record.
pub fn check_liveness(report: &RunReport) -> Vec<Violation> {
    match &report.outcome {
        Outcome::Finished(_) if !report.events.iter().any(|e| matches!(e, Event::BackupFinished { .. })) => {
            vec![v("L1", "the run ended with a terminal phase that the log does not durably hold".into())]
        }
        Outcome::Finished(_) => Vec::new(),
        Outcome::CorruptionDetected { found, flipped } if found == flipped => Vec::new(),
        Outcome::CorruptionDetected { found, flipped } => {
            vec![v("R1", format!("bit flipped in record {flipped} but recovery blamed record {found}"))]
        }
        Outcome::CorruptionMissed { flipped } => {
            vec![v("R1", format!("bit flipped in record {flipped}, not the last, was read back or cut as a torn tail instead of refused"))]
        }
        Outcome::Stuck(why) => vec![v("L1", why.clone())],
    }
}

/// Every per-run judge.
pub fn check_report(model: &Model, report: &RunReport) -> Vec<Violation> {
    let ev = evidence(&report.records);
    let mut out = check_liveness(report);
    out.extend(check_grouping(model, report, &ev));
    out.extend(check_windows(model, report, &ev));
    out.extend(check_closed(model, report, &ev));
    out.extend(check_execs(model, report, &ev));
    out.extend(check_archive(model, report, &ev));
    out.extend(check_write_ahead(report));
    out.extend(check_finished_not_redone(report, &ev));
    out
}
