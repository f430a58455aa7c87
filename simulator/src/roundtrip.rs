//! Round trips (issue 13, DESIGN §7 RT1–RT3): the archive a simulated backup stored is restored
//! into an empty fake cluster by the shell's own restore driver (`drive_restore`, as `blockwise
//! restore create|resume` runs it), with crashes (lost unflushed records, torn tails) and API
//! faults (a create answered 503 before it is applied, or after), and judged.
//!
//! The judges read the archive's bytes (untarred here, not by the restore's reader), the fake
//! cluster's final objects and its write records — never the restore's plan or events:
//! - **RT1** — every archived object the rules of `docs/restore.md` restore is in the cluster in
//!   exactly its documented form ([`restored_form`]: server-owned metadata and status gone, the
//!   two Velero labels added, the binding annotations and allocated Service fields gone); nothing
//!   else is there but bare namespaces of restored objects; every item the model says the backup
//!   holds is among them. E1 ties the archive to the model, so RT1 ties the cluster to the model.
//! - **RT2** — in the order of the cluster's applied creates: each namespaced object after its
//!   namespace, each custom resource after its CRD, each claim after its volume, each pod after
//!   the claims it mounts.
//! - **RT3** — across crashes, no object is created twice: after a create the cluster applied and
//!   answered, no create of that object is sent again; after one whose answer was lost, only
//!   creates the cluster refuses (as existing, or with an injected 503). The final state is RT1's, whatever the crashes.
//! - **L1** — the restore ends (Completed) within its budget of steps and process starts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use blockwise_adapters::restore::{
    drive_restore, ArchiveInput, QuietRestore, RestoreLog, RestoreRunError, RestoreWorld, Spill,
};
use blockwise_adapters::retry::{RetryPolicy, RetryingCluster};
use blockwise_adapters::world::Runtime;
use blockwise_engine::item::ItemKey;
use blockwise_engine::restore_run::{RestoreEvent, RestorePhase, RestoreSpec, RestoreState};
use serde_json::{json, Value};

use crate::check::Violation;
use crate::cluster::{ClusterFaults, Latencies, SimCluster};
use crate::media::{Death, MemLog};
use crate::model::Model;
use crate::records::{Record, WorldLog};
use crate::rng::{mix64, Rng};
use crate::sim::{FaultKind, RunConfig, BACKUP, CRASHES_PER_RUN_MAX, RESTARTS_MAX, RUN_STEPS_MAX, START_MS};
use crate::vt::{Ended, SimRuntime};

/// The restore's name in simulated round trips.
pub const RESTORE: &str = "rt";
/// Chance of a crash at each step of a restore when crashes are on.
const CRASH_P: f64 = 0.02;

/// Resources a restore never creates (Velero's list, written out again for the judge).
const NEVER_RESTORED: &[&str] = &[
    "nodes",
    "events",
    "events.events.k8s.io",
    "backups.velero.io",
    "restores.velero.io",
    "resticrepositories.velero.io",
    "csinodes.storage.k8s.io",
    "volumeattachments.storage.k8s.io",
    "backuprepositories.velero.io",
];

/// What `docs/restore.md` says a restore of the archived object `archived` (resource directory
/// `dir`) creates — `None` when a rule skips it — with the restore's options at their defaults (no
/// namespace mapping, no `--restore-volumes`). Written independently of the restore's code: the
/// judges of the simulator and the CLI's round-trip test hold the cluster to it. `reprovisioned`:
/// the archive's volumes a restore provisions anew ([`reprovisioned_volumes`]).
pub fn restored_form(
    dir: &str,
    archived: &Value,
    backup: &str,
    restore: &str,
    reprovisioned: &BTreeSet<String>,
) -> Option<Value> {
    let annotation = |k: &str| archived.pointer("/metadata/annotations").and_then(|a| a.get(k)).is_some();
    if NEVER_RESTORED.contains(&dir) {
        return None;
    }
    let name = archived.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    if dir == "persistentvolumes" && reprovisioned.contains(name) {
        return None;
    }
    if dir == "pods"
        && (matches!(archived.pointer("/status/phase").and_then(Value::as_str), Some("Succeeded" | "Failed"))
            || annotation("kubernetes.io/config.mirror"))
    {
        return None;
    }
    if dir == "jobs.batch" && archived.pointer("/status/completionTime").is_some_and(|t| !t.is_null()) {
        return None;
    }
    if dir.ends_with(".snapshot.storage.k8s.io") && !dir.contains("classes") {
        return None;
    }
    let mut v = archived.clone();
    let o = v.as_object_mut()?;
    o.remove("status");
    let meta = o.get_mut("metadata")?.as_object_mut()?;
    for k in [
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generateName",
        "selfLink",
        "managedFields",
        "ownerReferences",
    ] {
        meta.remove(k);
    }
    let labels = meta.entry("labels").or_insert(json!({}));
    if !labels.is_object() {
        *labels = json!({});
    }
    labels["velero.io/backup-name"] = json!(backup);
    labels["velero.io/restore-name"] = json!(restore);
    if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
        for k in ["pv.kubernetes.io/bind-completed", "pv.kubernetes.io/bound-by-controller"] {
            a.remove(k);
        }
        if dir == "persistentvolumeclaims" {
            a.remove("volume.kubernetes.io/selected-node");
        }
    }
    if dir == "services" {
        if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
            if spec.get("clusterIP") != Some(&json!("None")) {
                spec.remove("clusterIP");
                spec.remove("clusterIPs");
            }
            spec.remove("healthCheckNodePort");
            for p in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(p) = p.as_object_mut() {
                    p.remove("nodePort");
                }
            }
        }
    }
    if dir == "persistentvolumeclaims" {
        let spec = o.get_mut("spec").and_then(Value::as_object_mut);
        if let Some(spec) =
            spec.filter(|s| s.get("volumeName").and_then(Value::as_str).is_some_and(|v| reprovisioned.contains(v)))
        {
            spec.remove("volumeName");
        }
    }
    if dir == "persistentvolumes" {
        if let Some(c) = o.get_mut("spec").and_then(|s| s.get_mut("claimRef")).and_then(Value::as_object_mut) {
            c.remove("uid");
            c.remove("resourceVersion");
        }
    }
    Some(v)
}

/// The volumes (PersistentVolume names) of an archive that a restore without restored volumes
/// provisions anew rather than recreating (`docs/restore.md`, Velero's rule): those whose reclaim
/// policy is Delete. `archive`: (resource directory, archived object).
pub fn reprovisioned_volumes<'a>(archive: impl IntoIterator<Item = (&'a str, &'a Value)>) -> BTreeSet<String> {
    archive
        .into_iter()
        .filter(|(dir, o)| {
            *dir == "persistentvolumes"
                && o.pointer("/spec/persistentVolumeReclaimPolicy").and_then(Value::as_str) == Some("Delete")
        })
        .filter_map(|(_, o)| o.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// The part of a served object a restore decides: the object without the fields its API server
/// owns (uid, resourceVersion, generation, creationTimestamp, managedFields, status).
pub fn served_form(served: &Value) -> Value {
    let mut v = served.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
        if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            for k in ["uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"] {
                meta.remove(k);
            }
        }
    }
    v
}

/// Whether a served Namespace is a bare one a restore made for its objects: only its name.
pub fn is_bare_namespace(served: &Value) -> bool {
    let form = served_form(served);
    let meta = form.get("metadata").and_then(Value::as_object);
    let extra_meta = meta.is_some_and(|m| m.keys().any(|k| k != "name" && k != "labels"));
    let labels = form.pointer("/metadata/labels").and_then(Value::as_object).is_some_and(|l| !l.is_empty());
    let extra_top = form
        .as_object()
        .is_some_and(|o| o.keys().any(|k| !["apiVersion", "kind", "metadata", "spec"].contains(&k.as_str())));
    !extra_meta && !labels && !extra_top
}

/// The resource directory of a key (`pods`, `deployments.apps`).
fn dir_of(key: &ItemKey) -> String {
    key.gr().dir_name()
}

/// An archive's items by key (untarred by the judges' own reader, not the restore's).
fn archived(archive: &[u8]) -> Result<BTreeMap<ItemKey, Value>, String> {
    let mut out = BTreeMap::new();
    for (path, bytes) in crate::check::untar(archive)? {
        let Some(key) = crate::check::item_of_path(&path) else { continue };
        if path.split('/').nth(2).is_some_and(|p| p.ends_with("-preferredversion")) {
            continue;
        }
        out.insert(key, serde_json::from_slice(&bytes).map_err(|e| format!("{path}: {e}"))?);
    }
    Ok(out)
}

/// What a simulated restore left.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// How it ended: `Ok(phase)`, or why it did not.
    pub outcome: Result<RestorePhase, String>,
    /// The fake world's records (the target cluster's writes among them).
    pub records: Vec<Record>,
    /// The cluster's objects at the end.
    pub objects: BTreeMap<ItemKey, Value>,
    /// Crashes injected.
    pub crashes: u32,
    /// Faults that happened (`crash`, `create-5xx`, `create-lost`, `lost-unflushed`, `torn-record`).
    pub hits: BTreeSet<&'static str>,
    /// Errors the restore reported (for the verdict's detail only).
    pub errors: Vec<String>,
}

/// Restores `archive` (a simulated backup of `model`) into an empty cluster of the model's
/// resource types, under the faults `cfg` enables: crashes (and lost unflushed records and torn
/// tails) when the backup's crashes are on, create faults when its API faults are.
pub fn simulate_restore(model: &Model, archive: &[u8], cfg: &RunConfig) -> RestoreReport {
    let _mutation = blockwise_engine::mutation::MutationGuard::set(cfg.mutation);
    let seed = mix64(cfg.seed ^ 0x0005_e570_4e00);
    let rt = SimRuntime::new(START_MS, Rng::new(seed));
    let mut rng = Rng::new(mix64(seed ^ 0xc4a5));
    let records = WorldLog::new();
    let death = Death::default();
    let api_faults = cfg.faults.contains(&FaultKind::List5xx) || cfg.faults.contains(&FaultKind::List429);
    let faults = ClusterFaults {
        create_unavailable_p: if api_faults { 0.08 } else { 0.0 },
        create_lost_p: if api_faults { 0.05 } else { 0.0 },
        slow_p: if cfg.faults.contains(&FaultKind::SlowWorker) { 0.05 } else { 0.0 },
        ..ClusterFaults::default()
    };
    let cluster = Arc::new(SimCluster::new(
        model.empty_target(),
        rt.clone(),
        records.clone(),
        death.clone(),
        faults,
        Latencies::SEEDED,
    ));
    let runtime: Arc<dyn Runtime> = Arc::new(rt.clone());
    let world = RestoreWorld {
        cluster: Arc::new(RetryingCluster::new(cluster.clone(), RetryPolicy::default(), runtime.clone())),
        runtime,
    };
    let log = MemLog::new(death.clone());
    let spec = RestoreSpec::new(RESTORE, BACKUP);
    let workers = cfg.workers.max(1) as u32;
    let crash_on = cfg.faults.contains(&FaultKind::Crash);
    let lose_on = cfg.faults.contains(&FaultKind::LostUnflushed);
    let tear_on = cfg.faults.contains(&FaultKind::TornRecord);
    let mut hits = BTreeSet::new();
    let (mut crashes, mut starts, mut steps_used) = (0u32, 0u32, 0u64);
    let mut errors = Vec::new();
    let outcome = loop {
        starts += 1;
        if starts > RESTARTS_MAX {
            break Err(format!("{starts} process starts without finishing"));
        }
        let opened = match RestoreLog::open_on(log.clone()) {
            Ok((l, events, _)) if !events.is_empty() => Ok((l, events)),
            Ok((l, _, _)) => Ok((l, Vec::new())),
            Err(blockwise_adapters::log::LogError::NotFound(_)) => {
                RestoreLog::create_on(log.clone(), RESTORE).map(|l| (l, Vec::new()))
            }
            Err(e) => Err(e),
        };
        let (mut restore_log, events) = match opened {
            Ok(o) => o,
            Err(e) => break Err(format!("opening the restore log: {e}")),
        };
        let mut state = match RestoreState::fold(&events) {
            Ok(s) => s,
            Err(e) => break Err(format!("the restore log does not fold: {e}")),
        };
        let fresh = events.is_empty();
        let (spec, world) = (spec.clone(), world.clone());
        let now = rt.now_ms();
        let fut = async move {
            if fresh {
                // As `restore create`: the request durable before anything else.
                let ev = RestoreEvent::Requested { spec, source: "simulated backup".into(), workers, at_ms: now };
                let seq = restore_log.append(&ev)?;
                state.apply(seq, &ev).map_err(|e| RestoreRunError::State(e.to_string()))?;
                restore_log.flush_on(world.runtime.as_ref()).await?;
            }
            let (mut reader, mut spill) = (archive, Spill::Memory(Vec::new()));
            let input = ArchiveInput::bytes(&mut reader, &mut spill);
            drive_restore(&mut restore_log, &mut state, input, &world, &mut QuietRestore, None).await?;
            Ok::<RestoreState, RestoreRunError>(state)
        };
        let crashes_before = crashes;
        if crash_on && (lose_on || tear_on) && crashes_before < CRASHES_PER_RUN_MAX && rng.chance(0.3) {
            // A crash among appends not yet flushed, which a crash at a timer step rarely meets
            // (the driver flushes before it waits): what lost and torn records need.
            let inserts = log.disk().inserts();
            log.crash_after_inserts(inserts + 1 + rng.below(24));
        } else {
            log.crash_after_inserts(u64::MAX);
        }
        let mut steps = 0;
        let dead = death.clone();
        let ended = rt.run(
            fut,
            RUN_STEPS_MAX.saturating_sub(steps_used),
            |s| {
                steps = s;
                crash_on && crashes_before < CRASHES_PER_RUN_MAX && rng.chance(CRASH_P)
            },
            || dead.is_dead(),
        );
        steps_used += steps;
        match ended {
            Ended::Done(Ok(state)) if !death.is_dead() => {
                errors =
                    state.errors.cluster.iter().chain(state.errors.namespaces.values().flatten()).cloned().collect();
                break Ok(state.phase());
            }
            // The cluster stayed unavailable past the retries: the run stopped; resume it.
            Ended::Done(Err(RestoreRunError::Cluster(_))) if !death.is_dead() => {
                records.push(Record::Stopped { at_ms: rt.now() });
            }
            Ended::Done(Err(e)) if !death.is_dead() => break Err(format!("the restore run failed: {e}")),
            Ended::Stuck(why) => break Err(why),
            _ => {
                death.kill();
                crashes += 1;
                hits.insert("crash");
                records.push(Record::Crash { at_ms: rt.now(), n: crashes });
                let keep = if lose_on && rng.chance(0.5) { rng.below(4) as usize } else { usize::MAX };
                let tear = (tear_on && rng.chance(0.8)).then(|| rng.unit_f64());
                let lost = log.crash(keep, tear);
                if lost.lost > 0 {
                    hits.insert("lost-unflushed");
                }
                if lost.torn.is_some() {
                    hits.insert("torn-record");
                }
            }
        }
        death.revive();
        rt.pass(1);
        records.push(Record::Restart { at_ms: rt.now() });
    };
    // The cluster's own names for what it did to the restore (a get that finds nothing is no fault).
    hits.extend(cluster.hits().into_iter().filter(|h| *h != "deleted-before-get"));
    RestoreReport { outcome, records: records.snapshot(), objects: cluster.live_objects(), crashes, hits, errors }
}

fn v(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// RT1–RT3 and the restore's L1 (see the module docs). `expected` are the items the model says
/// the backup holds (E1's oracle).
pub fn check_round_trip(archive: &[u8], expected: &BTreeSet<ItemKey>, report: &RestoreReport) -> Vec<Violation> {
    let mut out = Vec::new();
    match &report.outcome {
        Ok(RestorePhase::Completed) => {}
        Ok(phase) => out.push(v("L1", format!("the restore ended {phase}: {:?}", report.errors.first()))),
        Err(why) => {
            out.push(v("L1", format!("the restore did not end: {why}")));
            return out;
        }
    }
    let items = match archived(archive) {
        Ok(i) => i,
        Err(e) => {
            out.push(v("RT1", format!("the archive does not read back: {e}")));
            return out;
        }
    };
    // RT1: the documented form of every restored archived object, nothing unexplained.
    let dirs: Vec<(String, &Value)> = items.iter().map(|(k, o)| (dir_of(k), o)).collect();
    let reprovisioned = reprovisioned_volumes(dirs.iter().map(|(d, o)| (d.as_str(), *o)));
    let mut explained = BTreeSet::new();
    for (key, obj) in &items {
        let Some(want) = restored_form(&dir_of(key), obj, BACKUP, RESTORE, &reprovisioned) else { continue };
        explained.insert(key.clone());
        match report.objects.get(key) {
            None => out.push(v("RT1", format!("{key} is in the archive and was not restored"))),
            Some(served) if served_form(served) != want => out.push(v(
                "RT1",
                format!("{key} differs from its archived form: served {}, expected {want}", served_form(served)),
            )),
            Some(_) => {}
        }
    }
    let namespaces_used: BTreeSet<&str> = explained.iter().filter_map(|k| k.namespace()).collect();
    for (key, served) in &report.objects {
        if explained.contains(key) {
            continue;
        }
        let bare_ns = key.is("", "namespaces") && namespaces_used.contains(key.name()) && is_bare_namespace(served);
        if !bare_ns {
            out.push(v("RT1", format!("{key} is in the cluster and the archive does not explain it")));
        }
    }
    for key in expected {
        let restorable =
            items.get(key).is_some_and(|o| restored_form(&dir_of(key), o, BACKUP, RESTORE, &reprovisioned).is_some());
        if restorable && !report.objects.contains_key(key) {
            out.push(v("RT1", format!("{key} is in the model's backup and not in the restored cluster")));
        }
    }
    // RT2 and RT3 from the cluster's write records.
    let mut applied: BTreeMap<ItemKey, usize> = BTreeMap::new();
    let mut answered_ok: BTreeSet<ItemKey> = BTreeSet::new();
    for r in &report.records {
        let Record::Write { verb: "create", key, answer, .. } = r else { continue };
        if answered_ok.contains(key) {
            out.push(v("RT3", format!("{key} was created, and its create was sent again (answered {answer})")));
        } else if applied.contains_key(key) && !matches!(*answer, "exists" | "unavailable") {
            out.push(v("RT3", format!("{key}: a create after one that was applied answered {answer}")));
        }
        if matches!(*answer, "ok" | "lost") {
            let n = applied.len();
            applied.entry(key.clone()).or_insert(n);
        }
        if *answer == "ok" {
            answered_ok.insert(key.clone());
        }
    }
    let before = |first: &ItemKey, then: &ItemKey, why: &str, out: &mut Vec<Violation>| {
        if let (Some(a), Some(b)) = (applied.get(first), applied.get(then)) {
            if a > b {
                out.push(v("RT2", format!("{then} was created before {first} ({why})")));
            }
        }
    };
    for key in applied.keys() {
        if let Some(ns) = key.namespace() {
            let ns_key = ItemKey::cluster("", "namespaces", ns);
            if !applied.contains_key(&ns_key) && !crate::csi::SYSTEM_NAMESPACES.contains(&ns) {
                out.push(v("RT2", format!("{key} was created in namespace {ns}, which the restore never created")));
            }
            before(&ns_key, key, "its namespace", &mut out);
        }
        if !key.group().is_empty() {
            let crd = ItemKey::cluster("apiextensions.k8s.io", "customresourcedefinitions", &dir_of(key));
            before(&crd, key, "its CRD", &mut out);
        }
        let Some(obj) = report.objects.get(key) else { continue };
        if key.is("", "persistentvolumeclaims") {
            if let Some(pv) = obj.pointer("/spec/volumeName").and_then(Value::as_str) {
                before(&ItemKey::cluster("", "persistentvolumes", pv), key, "its volume", &mut out);
            }
        }
        if key.is("", "pods") {
            let ns = key.namespace().map(str::to_string).unwrap_or_default();
            for vol in obj.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten() {
                if let Some(c) = vol.pointer("/persistentVolumeClaim/claimName").and_then(Value::as_str) {
                    before(
                        &ItemKey::namespaced("", "persistentvolumeclaims", &ns, c),
                        key,
                        "a claim it mounts",
                        &mut out,
                    );
                }
            }
        }
    }
    out
}
