//! What users read: `describe` (text and JSON), `logs` lines, `get` rows, and Velero's files beside
//! the archive: `velero-backup.json`, `<name>-resource-list.json.gz`, `<name>-results.gz`,
//! `<name>-logs.gz` ([`backup_files`]).
//!
//! Everything here is a pure function of the folded [`BackupState`] (and, for `logs` and results,
//! the events), so what `describe` says after a crash is exactly what the log holds. Timestamps are
//! formatted as RFC 3339 UTC by hand (civil-from-days), to keep a date crate out of the build. The
//! resource list holds no timestamp and is gzipped with a fixed header: like the archive, it is
//! byte-identical for the same cluster state.

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::event::{BlockOutcome, Event, HookOutcome, Phase, Severity};
use blockwise_engine::hooks::{ExecHookSpec, HookPhase};
use blockwise_engine::spec::LabelSelector;
use blockwise_engine::state::BackupState;
use serde_json::{json, Value};

use crate::store::gzip_reproducible;

/// Velero's backup format version, written into the archive and `velero-backup.json`.
pub const BACKUP_FORMAT_VERSION: &str = "1.1.0";

/// Formats Unix milliseconds as RFC 3339 UTC, e.g. `2026-11-24T04:01:10Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hook results across blocks: (block, pod, phase, index, outcome) of each block's latest attempt.
fn hook_results(s: &BackupState) -> Vec<(u32, String, HookPhase, u32, HookOutcome)> {
    let mut out = Vec::new();
    for b in &s.blocks {
        if let Some(a) = &b.attempt {
            for (h, o) in &a.hooks_finished {
                out.push((b.plan.id, h.pod.to_string(), h.phase, h.index, o.clone()));
            }
        }
    }
    out
}

/// `describe -o json`.
pub fn describe_json(s: &BackupState) -> Value {
    let spec = s.spec.as_ref();
    let blocks_failed = s.blocks.iter().filter(|b| matches!(b.outcome, Some(BlockOutcome::Failed { .. }))).count();
    let in_flight: Vec<Value> = s
        .blocks
        .iter()
        .filter(|b| b.in_flight())
        .map(|b| json!({"id": b.plan.id, "attempt": b.attempt.as_ref().map_or(0, |a| a.number), "items": b.plan.items.len()}))
        .collect();
    let hooks: Vec<Value> = hook_results(s)
        .into_iter()
        .map(|(block, pod, phase, index, o)| {
            json!({"block": block, "pod": pod, "phase": format!("{phase:?}"), "index": index, "ok": o.ok(), "result": o.to_string()})
        })
        .collect();
    json!({
        "name": spec.map(|s| s.name.clone()),
        "phase": s.phase().to_string(),
        "stopped": s.stopped,
        "startTimestamp": rfc3339(s.requested_ms),
        "completionTimestamp": s.finished.map(|(_, t)| rfc3339(t)),
        "durationSeconds": (s.finished.map_or(s.last_ms, |(_, t)| t).saturating_sub(s.requested_ms)) as f64 / 1000.0,
        "workers": s.workers,
        "resourcesDiscovered": s.resources.as_ref().map_or(0, Vec::len),
        "listingsComplete": s.listings.values().filter(|l| l.complete).count(),
        "items": {"planned": s.planned_items, "written": s.items_done()},
        "blocks": {"planned": s.blocks.len(), "done": s.blocks_done(), "failed": blocks_failed, "inFlight": in_flight},
        "hooks": hooks,
        "archive": s.archive.map(|a| json!({"sha256": hex(&a.digest), "bytes": a.bytes, "items": a.items})),
        "warnings": s.warnings,
        "errors": s.errors,
        "events": s.events,
    })
}

/// `describe` for people.
pub fn describe_text(s: &BackupState) -> String {
    let j = describe_json(s);
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    line(&mut out, "Name:", j["name"].as_str().unwrap_or("?").to_string());
    line(&mut out, "Phase:", s.phase().to_string());
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
    line(&mut out, "Items:", format!("{}/{} written", s.items_done(), s.planned_items));
    let failed = j["blocks"]["failed"].as_u64().unwrap_or(0);
    line(&mut out, "Blocks:", format!("{}/{} done, {failed} failed", s.blocks_done(), s.blocks.len()));
    for b in s.blocks.iter().filter(|b| b.in_flight()) {
        let a = b.attempt.as_ref().map_or(0, |a| a.number);
        let written = b.attempt.as_ref().map_or(0, |a| a.written.len());
        out.push_str(&format!(
            "  in flight: block {} attempt {a}: {written}/{} items\n",
            b.plan.id,
            b.plan.items.len()
        ));
    }
    if let Some(a) = s.archive {
        line(&mut out, "Archive:", format!("{} bytes, {} items, sha256 {}", a.bytes, a.items, hex(&a.digest)));
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
        "metadata": {"name": spec.name, "namespace": "velero"},
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
        },
    })
}

/// `<name>-resource-list.json.gz`'s content: `"<apiVersion>/<Kind>"` → sorted `"ns/name"` (or
/// `"name"` for cluster-scoped items) of every item in the archive — the same entries the engine
/// hands to `Finalize`.
pub fn resource_list(s: &BackupState) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let types: BTreeMap<_, _> = s.resources.iter().flatten().map(|r| (r.gr.clone(), r)).collect();
    for b in &s.blocks {
        let Some(a) = &b.attempt else { continue };
        for key in a.written.keys() {
            let gvk = match types.get(&key.gr()) {
                Some(rt) => format!("{}/{}", rt.api_version(), rt.kind),
                None => format!("{}/unknown", key.gr().dir_name()),
            };
            let name = match &key.namespace {
                Some(ns) => format!("{ns}/{}", key.name),
                None => key.name.clone(),
            };
            out.entry(gvk).or_default().insert(name);
        }
    }
    out.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
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

/// `<name>-results.gz`'s content: `{"errors": {...}, "warnings": {...}}`, each split like Velero's
/// `results.Result` into `velero` (backup-wide), `cluster` (cluster-scoped items) and `namespaces`.
/// The messages are exactly those of `describe` (the fold's, de-duplicated the same way).
pub fn results_json(s: &BackupState, events: &[Event]) -> Value {
    let (mut errors, mut warnings) = (ResultPart::default(), ResultPart::default());
    let mut seen = BTreeSet::new();
    for e in events {
        let (part, ns, cluster, message) = match e {
            Event::ListFailed { unit, error } => {
                (&mut errors, unit.namespace.clone(), false, format!("listing {unit} failed: {error}"))
            }
            Event::Diagnostic { severity: Severity::Error, message } => (&mut errors, None, false, message.clone()),
            Event::Diagnostic { severity: Severity::Warning, message } => (&mut warnings, None, false, message.clone()),
            Event::HookFinished { block, hook, outcome, .. } if !outcome.ok() => (
                &mut errors,
                hook.pod.namespace.clone(),
                true,
                format!("block {block}: {:?} hook {} of {}: {outcome}", hook.phase, hook.index, hook.pod),
            ),
            Event::ItemFailed { block, key, error, .. } => {
                (&mut errors, key.namespace.clone(), true, format!("block {block}: {key}: {error}"))
            }
            Event::BlockFinished { block, outcome: BlockOutcome::Failed { reason }, .. } => {
                let ns =
                    s.blocks.get(*block as usize).and_then(|b| b.plan.items.iter().find_map(|k| k.namespace.clone()));
                (&mut errors, ns, true, format!("block {block} failed: {reason}"))
            }
            _ => continue,
        };
        if seen.insert(message.clone()) {
            part.push(ns.as_deref(), cluster, message);
        }
    }
    json!({"errors": errors.to_json(), "warnings": warnings.to_json()})
}

/// The files Velero keeps beside the archive, in the order to store them: `velero-backup.json`
/// last, because Velero takes its presence to mean the backup is complete.
pub fn backup_files(name: &str, s: &BackupState, events: &[Event]) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let list = serde_json::to_vec(&resource_list(s)).map_err(std::io::Error::other)?;
    let results = serde_json::to_vec(&results_json(s, events)).map_err(std::io::Error::other)?;
    let mut logs = String::new();
    for (i, e) in events.iter().enumerate() {
        logs.push_str(&event_line(i as u64, e));
        logs.push('\n');
    }
    let backup = serde_json::to_vec_pretty(&velero_backup_json(s)).map_err(std::io::Error::other)?;
    Ok(vec![
        (format!("{name}-resource-list.json.gz"), gzip_reproducible(&list)?),
        (format!("{name}-results.gz"), gzip_reproducible(&results)?),
        (format!("{name}-logs.gz"), gzip_reproducible(logs.as_bytes())?),
        ("velero-backup.json".to_string(), backup),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_492_870_000), "2026-11-24T04:01:10Z");
    }
}
