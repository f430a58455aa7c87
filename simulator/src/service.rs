//! The service world (issue 21): the controllers' own decisions — the engine's pure steps
//! (`blockwise_engine::service`: `backup_step`, `restore_step`, `deletion_step`, `queue_wait` and
//! the `RunRegistry`) and the real validation of a Backup against the controller's tenancy and
//! locations (`blockwise_adapters::serve::crd`: `Tenancy::scope`, `Backup::to_request`,
//! `Locations::scoped`) — driven over an hour of a simulated cluster in one-second ticks, and
//! judged.
//!
//! The world: users create Backups in the controller's namespace, in its two tenant namespaces
//! and in a stranger's, under a few shared names (so two namespaces' `nightly` meet), over
//! overlapping namespaces — a tenant's sometimes stepping outside its namespace, an
//! administrator's sometimes with an inline store (inside a location, or not) — and delete them,
//! often while they run, and create them again under the name. Users create Restores of those
//! Backups (finished or not, existing or not), delete them while they run and create them again
//! under the name. Runs take seconds to a minute, with a pod's hook window open while a Backup's
//! runs; a run that is not stopped ends Completed or, in some worlds, Failed or PartiallyFailed
//! (a failed hook, a snapshot not cut; its window closed); the store has outages (a run that ends
//! inside one stops: its windows closed, its log resumable); a controller is killed at any tick (its registries and running sets lost, its runs
//! interrupted with their windows as they were) and comes back after a few seconds; its clock
//! jumps (forward or back, ten minutes to three hours) and stays wrong; its caches lag behind
//! writes (its own too) by a tick or more. In half the worlds two replicas run behind the Lease:
//! the leader is sometimes paused, the other takes the Lease, and the paused one exits when it
//! moves again; a run holds its log (sled's lock) until it ends or its process dies. After the
//! faulty part, a quiet part lets everything heal. The controller performs each step as
//! `serve/controller.rs` and `serve/restores.rs` do; the world keeps its own records — runs
//! started and ended (by which process), windows open, the store prefixes written and the
//! namespaces read, deletions — and the judges read only those:
//!
//! - **C2** no two Backups (namespace, name) write under the same store prefix or one inside the
//!   other's (so a deletion, retention or TTL of one never deletes the other's archive), and a
//!   tenant's Backup reads its own namespace only, without cluster-scoped resources;
//! - **C3** a Backup's data is deleted only when none of its runs goes on and no window of it is
//!   open (a deleted running Backup leaves no frozen pod, no snapshot in flight);
//! - **C4** no Backup or Restore is run twice at once (by any process); with faults healed, every
//!   Backup and Restore is deleted or ends (terminal), no window stays open, and nothing outside
//!   the controller's namespaces is touched;
//! - **Q1** at most `concurrent_max` runs at once (every process's), never two whose namespaces
//!   may overlap, and none over the namespaces of an interrupted run that keeps a pod frozen.
//!
//! What is modelled rather than run: a run is a duration and an outcome (the engine world runs the
//! real session code), a Restore's validation is "its Backup ended usable", a Restore resumed
//! after its Backup was deleted ends Failed (its archive is gone), the Lease follows
//! kube-lease-manager's rule. Not yet here: Schedules and the GC loop (the year world, `year.rs`,
//! has those, with stale caches, restarts and clock jumps).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use blockwise_adapters::s3::S3Location;
use blockwise_adapters::serve::crd::{Backup as BackupCr, Locations, Scope, Tenancy, Tenants};
use blockwise_adapters::session::StorageSpec;
use blockwise_engine::service::{
    backup_step, deletion_step, is_terminal_phase, namespaces_overlap, queue_wait, restore_step, retry_backoff_ms,
    BackupLook, BackupStep, DeletionStep, LogLook, QueueEntry, RunEnd, RunId, RunRegistry,
};

use crate::check::Violation;
use crate::rng::{mix64, Rng};

const TICK_MS: i64 = 1_000;
/// Ticks with users and faults, then ticks of quiet for everything to heal.
const FAULTY_TICKS: i64 = 3_600;
const QUIET_TICKS: i64 = 1_800;
/// The controller's namespace.
const HOME: &str = "blockwise-system";
/// Its tenant namespaces (`--tenant-namespaces payments,identity`).
const TENANTS: [&str; 2] = ["payments", "identity"];
/// A namespace the controller does not act in.
const STRANGER: &str = "web-a";
/// The cluster's application namespaces.
const NAMESPACES: [&str; 5] = ["shop", "identity", "analytics", "web-a", "payments"];
/// Names users give Backups in every namespace.
const NAMES: [&str; 5] = ["nightly", "hourly", "adhoc", "pre-upgrade", "weekly"];
/// Names users give Restores.
const RESTORE_NAMES: [&str; 3] = ["again", "dr-drill", "rollback"];

type Key = (String, String);

#[derive(Debug, Clone)]
struct Obj {
    ns: String,
    name: String,
    uid: String,
    /// Creation order (the queue's "earlier").
    seq: u64,
    cr: BackupCr,
    finalizer: bool,
    phase: Option<&'static str>,
    /// The phase the controller's cache shows (it lags behind its own writes).
    cached: Option<&'static str>,
    deleting: bool,
}

/// A Backup's log, as the world holds it (what the controller reads back).
#[derive(Debug, Clone, Default)]
struct Log {
    uid: String,
    finished: bool,
    /// The phase it finished with (Completed, PartiallyFailed or Failed).
    ended: Option<&'static str>,
    stopped: bool,
    /// A pod of it is frozen now (a run opened its window and has not closed it).
    window_open: bool,
    /// The namespaces its last run covered.
    includes: Vec<String>,
}

/// A run, in the process of replica `by` (it holds the Backup's log: sled's file lock, on the
/// shared volume, until the run ends or the process dies — also while the process is paused).
#[derive(Debug, Clone)]
struct Run {
    key: Key,
    ends_ms: i64,
    includes: Vec<String>,
    by: usize,
    /// It may freeze pods and cut snapshots: not a run of a log that had finished already (a
    /// cache behind the end, after a restart), which only stores the files and reports.
    touches: bool,
}

#[derive(Debug, Clone)]
struct RestoreObj {
    uid: String,
    backup: String,
    phase: Option<&'static str>,
    /// The phase the controller's cache shows.
    cached: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct RestoreRun {
    /// The Restore object it runs for.
    uid: String,
    ends_ms: i64,
    /// The replica whose process runs it (and holds its log).
    by: usize,
}

/// A Restore's log (its progress), by the Restore's name: the uid it was made for, and the
/// Backup (and that Backup's uid) whose archive it planned.
#[derive(Debug, Clone)]
struct RestoreLog {
    uid: String,
    finished: bool,
    backup: Key,
    backup_uid: String,
}

/// What one seed's service world did.
#[derive(Debug, Clone, Default)]
pub struct ServiceReport {
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// Backups created.
    pub created: u64,
    /// Backups created in a tenant namespace.
    pub tenant_backups: u64,
    /// Backups that ended FailedValidation (a tenant stepping outside, an inline store inside a
    /// location, an unknown location).
    pub refused: u64,
    /// Runs started (first runs, resumes and retries).
    pub runs: u64,
    /// Runs stopped by a store outage.
    pub stops: u64,
    /// Backup runs that ended Failed (a Fail-mode hook failed, a snapshot could not be cut).
    pub failed: u64,
    /// Backup runs that ended PartiallyFailed (an item or a Continue-mode hook failed).
    pub partially_failed: u64,
    /// Runs interrupted by a controller kill.
    pub interrupted: u64,
    /// Deletions asked while the Backup's run went on or its log was unfinished.
    pub deletions_while_running: u64,
    /// Backups deleted (their data).
    pub deleted: u64,
    /// Looks that queued a Backup.
    pub queued: u64,
    /// Controller kills.
    pub kills: u64,
    /// Jumps of the controller's clock.
    pub clock_jumps: u64,
    /// Restores created.
    pub restores: u64,
    /// Restore runs started (first runs, resumes and retries).
    pub restore_runs: u64,
    /// Restores deleted while their run went on (and often created again under the name).
    pub restores_deleted_while_running: u64,
    /// Status writes of a Restore run refused because the Restore is another object now.
    pub late_writes_refused: u64,
    /// Worlds with two replicas (the others have one).
    pub two_replicas: u64,
    /// Pauses of a replica's process.
    pub pauses: u64,
    /// Leases taken over from a holder that stopped renewing.
    pub lease_takeovers: u64,
    /// Leaders that found their Lease taken and exited.
    pub lease_losses: u64,
    /// Runs refused at their start because another replica's process still held the log.
    pub lock_refusals: u64,
    /// Looks at a Backup whose cached phase was not its phase (the cache behind a write).
    pub stale_looks: u64,
}

/// A controller replica: its process's memory (lost when killed), its clock and its state.
#[derive(Default)]
struct Controller {
    registry: RunRegistry,
    running: BTreeMap<Key, ()>,
    restore_registry: RunRegistry,
    restores_running: BTreeSet<String>,
    down_until_ms: i64,
    /// Paused (a stop-the-world pause, a frozen node): neither it nor its runs move.
    frozen_until_ms: i64,
    /// It believes it holds the Lease (and acts).
    leading: bool,
    /// Its clock's error.
    skew_ms: i64,
}

impl Controller {
    /// The process after a restart: its memory gone, its clock as wrong as before.
    fn restarted(&self, down_until_ms: i64) -> Controller {
        Controller { down_until_ms, skew_ms: self.skew_ms, ..Controller::default() }
    }
}

/// `p` with `.` dropped and `..` taking the component before it: the path a file system reaches.
fn resolved(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Where a run of Backup `name` in `ns` writes, by the world's own reading of the store it was
/// given: every file a store keeps of a backup lies under `<root or prefix>/backups/<name>/`; the
/// default local store of the controller is `<data-dir>/namespaces/<ns>/store`.
fn written_prefix(storage: &StorageSpec, ns: &str, name: &str) -> String {
    match storage {
        StorageSpec::Local { root: Some(r) } => format!("file:{}/backups/{name}/", resolved(r).display()),
        StorageSpec::Local { root: None } => format!("file:/data/namespaces/{ns}/store/backups/{name}/"),
        StorageSpec::S3(l) => {
            let prefix = l.prefix.trim_matches('/');
            let sep = if prefix.is_empty() { "" } else { "/" };
            format!("s3:{}:{}/{prefix}{sep}backups/{name}/", l.endpoint.as_deref().unwrap_or(""), l.bucket)
        }
    }
}

/// How a run of `id` ends that stopped on an outage (`refused`: whose log another process held),
/// one more in a row than `registry` remembers, due again after the real backoff on `clock` — as
/// the controllers count them (a refusal is a stop for the backoff).
fn again(registry: &RunRegistry, id: &RunId, clock: i64, refused: bool) -> RunEnd {
    let stops = registry.end_of(id).map_or(0, |e| e.stops()) + 1;
    let retry_at_ms = clock + retry_backoff_ms(stops);
    if refused {
        RunEnd::Refused { stops, retry_at_ms }
    } else {
        RunEnd::Stopped { stops, retry_at_ms }
    }
}

/// A user's Backup in `ns`: its includes, store and cluster resources drawn at random.
fn user_backup(rng: &mut Rng, ns: &str, name: &str, uid: &str) -> BackupCr {
    let tenant = TENANTS.contains(&ns);
    let mut includes: Vec<String> = NAMESPACES.iter().filter(|_| rng.chance(0.35)).map(|s| s.to_string()).collect();
    if rng.chance(0.1) {
        includes = vec!["web-*".to_string()];
    }
    if tenant && rng.chance(0.7) {
        // Most tenants ask for their own namespace (or leave it empty, which means it).
        includes = if rng.chance(0.5) { vec![ns.to_string()] } else { Vec::new() };
    }
    let mut spec = serde_json::json!({ "includedNamespaces": includes });
    if rng.chance(0.08) {
        spec["includeClusterResources"] = serde_json::json!(true);
    }
    match rng.below(10) {
        0..=3 => {}
        4..=5 => spec["storageLocation"] = serde_json::json!("primary"),
        6..=7 => spec["storageLocation"] = serde_json::json!("archive"),
        8 if rng.chance(0.2) => spec["storageLocation"] = serde_json::json!("nowhere"),
        _ => {
            let url = *rng
                .pick(&[
                    "/stores/primary/tenants/payments",
                    "/stores/primary/backups/nightly",
                    "/stores/elsewhere",
                    "/stores/primary/../elsewhere",
                    "s3://backups-a/cluster-a/tenants/identity",
                    "s3://backups-a/cluster-b",
                ])
                .unwrap_or(&"/stores/elsewhere");
            spec["storage"] = serde_json::json!({ "url": url });
        }
    }
    let obj = serde_json::json!({
        "apiVersion": "blockwise.dev/v1alpha1", "kind": "Backup",
        "metadata": { "name": name, "namespace": ns, "uid": uid },
        "spec": spec,
    });
    serde_json::from_value(obj).unwrap_or_else(|e| panic!("the world's Backup does not parse: {e}"))
}

/// The namespaces a run of `includes` reads (globs over the cluster's), and whether it reads
/// cluster-scoped resources — the world's own reading of Velero's rules.
fn reads(includes: &[String], cluster: Option<bool>) -> (BTreeSet<String>, bool) {
    let all: Vec<&str> = NAMESPACES.iter().chain(&[HOME]).copied().collect();
    let matches = |pat: &str, ns: &str| match pat.strip_suffix('*') {
        Some(p) => ns.starts_with(p),
        None => pat == "*" || pat == ns,
    };
    let read: BTreeSet<String> = if includes.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        all.iter().filter(|ns| includes.iter().any(|p| matches(p, ns))).map(|s| s.to_string()).collect()
    };
    (read, cluster.unwrap_or(includes.is_empty()))
}

/// Runs one seed's service world.
pub fn simulate_service(seed: u64) -> ServiceReport {
    let mut rng = Rng::new(mix64(seed ^ 0x05e4_11ce));
    let mut report = ServiceReport::default();
    let v = |inv: &'static str, detail: String| Violation { invariant: inv, detail };
    let concurrent_max = 1 + rng.below(3) as usize;
    let outage_p = *rng.pick(&[0.0, 0.002, 0.01]).unwrap_or(&0.002);
    let kill_p = *rng.pick(&[0.0, 0.001, 0.005]).unwrap_or(&0.001);
    let delete_p = *rng.pick(&[0.01, 0.03]).unwrap_or(&0.01);
    let jump_p = *rng.pick(&[0.0, 0.002, 0.006]).unwrap_or(&0.002);
    let restore_p = *rng.pick(&[0.0, 0.005, 0.015]).unwrap_or(&0.005);
    // How likely a Backup run that is not stopped ends Failed or PartiallyFailed (half each).
    let fail_p = *rng.pick(&[0.0, 0.1, 0.3]).unwrap_or(&0.1);
    let replicas = 1 + rng.below(2) as usize;
    let pause_p = if replicas == 2 { *rng.pick(&[0.001, 0.003]).unwrap_or(&0.001) } else { 0.0 };
    report.two_replicas = u64::from(replicas == 2);
    // How likely the cache catches up with a write in a tick (1: it is always fresh).
    let fresh_p = *rng.pick(&[1.0, 0.5, 0.2]).unwrap_or(&1.0);
    let tenancy =
        Tenancy { home: HOME.to_string(), tenants: Tenants::Some(TENANTS.iter().map(|s| s.to_string()).collect()) };
    let mut locations = Locations::default();
    let primary = StorageSpec::Local { root: Some("/stores/primary".into()) };
    locations.named.insert("primary".into(), primary.clone());
    let archive = S3Location::parse("s3://backups-a/cluster-a").unwrap_or_else(|e| panic!("{e}"));
    locations.named.insert("archive".into(), StorageSpec::S3(archive));
    // The controller's default store: a location, or its data directory's (per namespace).
    locations.default = rng.chance(0.5).then_some(primary);
    let mut objs: BTreeMap<Key, Obj> = BTreeMap::new();
    let mut logs: BTreeMap<Key, Log> = BTreeMap::new();
    let mut runs: BTreeMap<Key, Run> = BTreeMap::new();
    // Store prefixes written, and the Backup whose they are (until its data is deleted).
    let mut prefixes: BTreeMap<String, Key> = BTreeMap::new();
    let mut restores: BTreeMap<String, RestoreObj> = BTreeMap::new();
    let mut restore_runs: BTreeMap<String, RestoreRun> = BTreeMap::new();
    let mut restore_logs: BTreeMap<String, RestoreLog> = BTreeMap::new();
    let mut reps: Vec<Controller> = (0..replicas).map(|_| Controller::default()).collect();
    // The Lease (kube-lease-manager's: 15 s): its holder, and the holder's clock at its last renewal.
    let (mut holder, mut renewed_ms): (Option<usize>, i64) = (None, 0);
    let mut outage_until = i64::MIN;
    let mut next_uid = 0u64;
    for tick in 0..FAULTY_TICKS + QUIET_TICKS {
        let now = tick * TICK_MS;
        let faulty = tick < FAULTY_TICKS;
        // Users: Backups.
        if faulty && rng.chance(0.03) {
            next_uid += 1;
            let ns = match rng.below(10) {
                0..=4 => HOME,
                5..=8 => TENANTS[rng.below(2) as usize],
                _ => STRANGER,
            };
            let name = rng.pick(&NAMES).copied().unwrap_or("nightly");
            let key = (ns.to_string(), name.to_string());
            if let std::collections::btree_map::Entry::Vacant(slot) = objs.entry(key) {
                let uid = format!("uid-{seed}-{next_uid}");
                let cr = user_backup(&mut rng, ns, name, &uid);
                slot.insert(Obj {
                    ns: ns.to_string(),
                    name: name.to_string(),
                    uid,
                    seq: next_uid,
                    cr,
                    finalizer: false,
                    phase: None,
                    cached: None,
                    deleting: false,
                });
                report.created += 1;
                report.tenant_backups += u64::from(TENANTS.contains(&ns));
            }
        }
        if faulty && !objs.is_empty() && rng.chance(delete_p) {
            let keys: Vec<Key> = objs.keys().cloned().collect();
            if let Some(k) = rng.pick(&keys).cloned() {
                let running = runs.contains_key(&k) || logs.get(&k).is_some_and(|l| !l.finished && !l.stopped);
                if let Some(o) = objs.get_mut(&k) {
                    if !o.deleting {
                        o.deleting = true;
                        report.deletions_while_running += u64::from(running);
                        if !o.finalizer {
                            // No finalizer: the API server removes it at once (its log, if any, stays).
                            objs.remove(&k);
                        }
                    }
                }
            }
        }
        // Users: Restores (in the controller's namespace), deleted — often while they run — and
        // created again under the name.
        if faulty && rng.chance(restore_p) {
            let name = rng.pick(&RESTORE_NAMES).copied().unwrap_or("again");
            if let Some(old) = restores.get(name) {
                if restore_runs.contains_key(name) || !old.phase.is_some_and(is_terminal_phase) {
                    report.restores_deleted_while_running += 1;
                }
                restores.remove(name);
            }
            // Half the deletions are a `kubectl replace --force`: created again at once.
            if !restores.contains_key(name) && rng.chance(0.5) {
                next_uid += 1;
                let backup = rng.pick(&NAMES).copied().unwrap_or("nightly").to_string();
                restores.insert(
                    name.to_string(),
                    RestoreObj { uid: format!("uid-{seed}-{next_uid}"), backup, phase: None, cached: None },
                );
                report.restores += 1;
            }
        }
        // The controllers' caches catch up, or not yet.
        for o in objs.values_mut() {
            if o.cached != o.phase && rng.chance(fresh_p) {
                o.cached = o.phase;
            }
        }
        for r in restores.values_mut() {
            if r.cached != r.phase && rng.chance(fresh_p) {
                r.cached = r.phase;
            }
        }
        // Faults: a store outage; a controller kill; a jump of the controller's clock.
        if faulty && rng.chance(outage_p) {
            outage_until = now + rng.range(5, 120) as i64 * TICK_MS;
        }
        // A process that dies (killed, OOM, or exiting on a lost Lease): its runs are interrupted
        // where they are — logs unfinished, windows as they were — and their logs freed.
        let die = |r: usize,
                   down_s: u64,
                   reps: &mut Vec<Controller>,
                   runs: &mut BTreeMap<Key, Run>,
                   restore_runs: &mut BTreeMap<String, RestoreRun>,
                   report: &mut ServiceReport| {
            let before = runs.len();
            runs.retain(|_, x| x.by != r);
            report.interrupted += (before - runs.len()) as u64;
            restore_runs.retain(|_, x| x.by != r);
            reps[r] = reps[r].restarted(now + down_s as i64 * TICK_MS);
        };
        let r = rng.below(replicas as u64) as usize;
        if faulty && reps[r].down_until_ms <= now && rng.chance(kill_p) {
            report.kills += 1;
            let down_s = rng.range(1, 30);
            die(r, down_s, &mut reps, &mut runs, &mut restore_runs, &mut report);
        }
        if faulty && rng.chance(jump_p) {
            let by = rng.range(600, 10_800) as i64 * TICK_MS;
            reps[r].skew_ms += if rng.chance(0.5) { by } else { -by };
            report.clock_jumps += 1;
        }
        if faulty && reps[r].frozen_until_ms <= now && rng.chance(pause_p) {
            reps[r].frozen_until_ms = now + rng.range(5, 60) as i64 * TICK_MS;
            report.pauses += 1;
        }
        // The Lease: the holder renews it; a leader that finds another holder exits at once (a
        // paused one, when it moves again: before its runs go on); another replica takes it once
        // it is 15 s old by its own clock.
        for r in 0..replicas {
            if reps[r].down_until_ms > now || reps[r].frozen_until_ms > now {
                continue;
            }
            let clock = now + reps[r].skew_ms;
            if holder == Some(r) {
                reps[r].leading = true;
                renewed_ms = clock;
            } else if reps[r].leading {
                report.lease_losses += 1;
                let down_s = rng.range(1, 10);
                die(r, down_s, &mut reps, &mut runs, &mut restore_runs, &mut report);
            } else if holder.is_none() || clock > renewed_ms + 15_000 {
                report.lease_takeovers += u64::from(holder.is_some());
                holder = Some(r);
                renewed_ms = clock;
                reps[r].leading = true;
            }
        }
        // Backup runs that end now (a paused process's do not move).
        let ending: Vec<Key> = runs
            .iter()
            .filter(|(_, x)| x.ends_ms <= now && reps[x.by].frozen_until_ms <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in ending {
            let Some(run) = runs.remove(&k) else { continue };
            let ctl = &mut reps[run.by];
            let clock = now + ctl.skew_ms;
            let stopped = now < outage_until;
            let Some(log) = logs.get_mut(&k) else { continue };
            log.window_open = false;
            let uid = log.uid.clone();
            if stopped {
                log.stopped = true;
                report.stops += 1;
            } else {
                // A run of a log that had finished reports the phase it finished with.
                let phase = match log.ended {
                    Some(p) if log.finished => p,
                    _ if rng.chance(fail_p) => {
                        if rng.chance(0.5) {
                            report.failed += 1;
                            "Failed"
                        } else {
                            report.partially_failed += 1;
                            "PartiallyFailed"
                        }
                    }
                    _ => "Completed",
                };
                log.finished = true;
                log.ended = Some(phase);
                if let Some(o) = objs.get_mut(&k).filter(|o| o.uid == uid) {
                    o.phase = Some(phase);
                }
            }
            ctl.running.remove(&k);
            let id = (k.0.clone(), k.1.clone(), uid);
            let end = if stopped { again(&ctl.registry, &id, clock, false) } else { RunEnd::Terminal };
            ctl.registry.record(id, end);
        }
        // Restore runs that end now: their status written for the object they ran for (the API
        // server refuses the write when the Restore of the name is another object now).
        let ending: Vec<String> = restore_runs
            .iter()
            .filter(|(_, x)| x.ends_ms <= now && reps[x.by].frozen_until_ms <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in ending {
            let Some(run) = restore_runs.remove(&name) else { continue };
            let ctl = &mut reps[run.by];
            let clock = now + ctl.skew_ms;
            ctl.restores_running.remove(&name);
            let id = (HOME.to_string(), name.clone(), run.uid.clone());
            let end = if now < outage_until {
                report.stops += 1;
                again(&ctl.restore_registry, &id, clock, false)
            } else {
                if let Some(l) = restore_logs.get_mut(&name).filter(|l| l.uid == run.uid) {
                    l.finished = true;
                }
                match restores.get_mut(&name) {
                    Some(r) if r.uid == run.uid => r.phase = Some("Completed"),
                    Some(_) => report.late_writes_refused += 1,
                    None => {}
                }
                RunEnd::Terminal
            };
            ctl.restore_registry.record(id, end);
        }
        // Every replica that leads (and moves) looks at every Backup and Restore — its caches are
        // fresh in this world.
        for (me, ctl) in reps.iter_mut().enumerate() {
            if !ctl.leading || ctl.down_until_ms > now || ctl.frozen_until_ms > now {
                continue;
            }
            let clock = now + ctl.skew_ms;
            let keys: Vec<Key> = objs.keys().cloned().collect();
            for k in keys {
                let Some(o) = objs.get(&k).cloned() else { continue };
                let id = (o.ns.clone(), o.name.clone(), o.uid.clone());
                let scope = tenancy.scope(&o.ns);
                report.stale_looks += u64::from(o.cached != o.phase);
                let look = BackupLook {
                    in_scope: scope.is_some(),
                    deleting: o.deleting,
                    finalizer: o.finalizer,
                    phase: o.cached,
                    running_here: ctl.running.contains_key(&k),
                    end: ctl.registry.end_of(&id),
                    now_ms: clock,
                };
                let step = backup_step(&look);
                let Some(scope) = scope else {
                    if step != BackupStep::Ignore {
                        report.violations.push(v(
                            "C4",
                            format!("{}/{} is outside the controller's namespaces and was acted on", o.ns, o.name),
                        ));
                    }
                    continue;
                };
                let start = |runs: &mut BTreeMap<Key, Run>,
                             logs: &mut BTreeMap<Key, Log>,
                             ctl: &mut Controller,
                             rng: &mut Rng,
                             report: &mut ServiceReport,
                             includes: Vec<String>| {
                    if runs.contains_key(&k) {
                        report.violations.push(v("C4", format!("{}/{} was run twice at once", o.ns, o.name)));
                    }
                    let log = logs.entry(k.clone()).or_insert_with(|| Log { uid: o.uid.clone(), ..Log::default() });
                    log.stopped = false;
                    let touches = !log.finished;
                    if touches {
                        log.window_open = true;
                        log.includes = includes.clone();
                    }
                    let ends_ms = now + if touches { rng.range(5, 60) as i64 } else { 1 } * TICK_MS;
                    runs.insert(k.clone(), Run { key: k.clone(), ends_ms, includes, by: me, touches });
                    ctl.running.insert(k.clone(), ());
                    report.runs += 1;
                };
                match step {
                    BackupStep::Ignore | BackupStep::AwaitRunEnd | BackupStep::RetryAt(_) => {}
                    BackupStep::AddFinalizer { mark_new } => {
                        if let Some(x) = objs.get_mut(&k) {
                            x.finalizer = true;
                            if mark_new {
                                x.phase = Some("New");
                            }
                        }
                    }
                    BackupStep::Delete => {
                        if runs.get(&k).is_some_and(|x| x.by != me) {
                            // Another process holds its log: reading it fails, the look is retried.
                            continue;
                        }
                        let log = logs.get(&k).map(|l| LogLook {
                            same_uid: l.uid == o.uid,
                            finished: l.finished,
                            stopped: l.stopped,
                        });
                        match deletion_step(log, ctl.registry.end_of(&id).is_some_and(|e| e.ran())) {
                            DeletionStep::FinishRunFirst => {
                                // Its request is valid: it ran before.
                                let includes =
                                    o.cr.to_request(&locations, &scope)
                                        .map(|r| r.spec.included_namespaces)
                                        .unwrap_or_default();
                                start(&mut runs, &mut logs, &mut *ctl, &mut rng, &mut report, includes)
                            }
                            DeletionStep::DeleteNow => {
                                // C3, from the world's own records.
                                if runs.contains_key(&k) {
                                    report.violations.push(v(
                                        "C3",
                                        format!("{}/{} was deleted while its run went on", o.ns, o.name),
                                    ));
                                }
                                if logs.get(&k).is_some_and(|l| l.window_open) {
                                    report.violations.push(v(
                                        "C3",
                                        format!("{}/{} was deleted with a pod still frozen", o.ns, o.name),
                                    ));
                                }
                                logs.remove(&k);
                                prefixes.retain(|_, owner| *owner != k);
                                objs.remove(&k);
                                report.deleted += 1;
                            }
                        }
                    }
                    BackupStep::Run { .. } => {
                        // Validated as the controller validates it, against its tenancy and locations.
                        let req = match o.cr.to_request(&locations, &scope) {
                            Ok(req) => req,
                            Err(_) => {
                                if let Some(x) = objs.get_mut(&k) {
                                    x.phase = Some("FailedValidation");
                                }
                                ctl.registry.record(id, RunEnd::Terminal);
                                report.refused += 1;
                                continue;
                            }
                        };
                        // The queue, as the controller's cache, running set, registry and the
                        // data volume's log locks show every Backup (a stranger's too: the
                        // controller watches every namespace for its tenants).
                        let entries: Vec<QueueEntry<'_>> = objs
                            .values()
                            .map(|e| {
                                let ek = (e.ns.clone(), e.name.clone());
                                let here = ctl.running.contains_key(&ek);
                                QueueEntry {
                                    key: (e.ns.as_str(), e.name.as_str()),
                                    in_scope: tenancy.scope(&e.ns).is_some(),
                                    phase: e.cached,
                                    deleting: e.deleting,
                                    created_ms: e.seq as i64,
                                    namespaces: match runs.get(&ek) {
                                        Some(r) if here => r.includes.as_slice(),
                                        _ => e.cr.spec.included_namespaces.as_slice(),
                                    },
                                    running_here: here,
                                    running_elsewhere: runs.get(&ek).is_some_and(|r| r.by != me),
                                    ended_here: ctl.registry.end_of(&(e.ns.clone(), e.name.clone(), e.uid.clone()))
                                        == Some(RunEnd::Terminal),
                                }
                            })
                            .collect();
                        let includes = req.spec.included_namespaces.clone();
                        let mine = QueueEntry {
                            key: (o.ns.as_str(), o.name.as_str()),
                            in_scope: true,
                            phase: o.cached,
                            deleting: false,
                            created_ms: o.seq as i64,
                            namespaces: &includes,
                            running_here: false,
                            running_elsewhere: false,
                            ended_here: false,
                        };
                        let waits = queue_wait(&mine, &includes, &entries, concurrent_max).is_some();
                        drop(entries);
                        if waits {
                            report.queued += 1;
                            if let Some(x) = objs.get_mut(&k) {
                                x.phase = Some("Queued");
                            }
                            continue;
                        }
                        if runs.get(&k).is_some_and(|x| x.by != me) {
                            // A paused process still holds its log: the open fails, and the start is
                            // tried again after the backoff, as a stopped run is.
                            report.lock_refusals += 1;
                            let end = again(&ctl.registry, &id, clock, true);
                            ctl.registry.record(id, end);
                            continue;
                        }
                        // A run of a log that finished already touches nothing (it stores the
                        // files and reports).
                        let touches = !logs.get(&k).is_some_and(|l| l.finished && l.uid == o.uid);
                        // Q1, from the world's runs (every process's).
                        let overlapping: Vec<&Run> = runs
                            .values()
                            .filter(|r| {
                                touches && r.touches && r.key != k && namespaces_overlap(&r.includes, &includes)
                            })
                            .collect();
                        if let Some(r) = overlapping.first() {
                            report.violations.push(v(
                                "Q1",
                                format!(
                                    "{}/{} started while {}/{} ran over the same namespaces",
                                    o.ns, o.name, r.key.0, r.key.1
                                ),
                            ));
                        }
                        // An interrupted run whose pod stays frozen holds its namespaces as a run does: it
                        // is resumed (its post-hooks run) before anything overlapping starts.
                        for (lk, l) in &logs {
                            if touches
                                && *lk != k
                                && l.window_open
                                && !runs.contains_key(lk)
                                && namespaces_overlap(&l.includes, &includes)
                            {
                                report.violations.push(v(
                                    "Q1",
                                    format!(
                                        "{}/{} started over the namespaces of {}/{}, whose interrupted run keeps a pod frozen",
                                        o.ns, o.name, lk.0, lk.1
                                    ),
                                ));
                            }
                        }
                        if runs.len() >= concurrent_max {
                            report.violations.push(v(
                                "Q1",
                                format!(
                                    "{}/{} started with {} runs going (at most {concurrent_max})",
                                    o.ns,
                                    o.name,
                                    runs.len()
                                ),
                            ));
                        }
                        // C2, from what the run reads and where it writes.
                        let prefix = written_prefix(&req.storage, &o.ns, &o.name);
                        for (p, owner) in &prefixes {
                            if *owner != k && (p.starts_with(&prefix) || prefix.starts_with(p.as_str())) {
                                report.violations.push(v(
                                "C2",
                                format!(
                                    "{}/{} writes under {prefix}, and {}/{} under {p}: one's deletion deletes the other's archive",
                                    o.ns, o.name, owner.0, owner.1
                                ),
                            ));
                            }
                        }
                        prefixes.insert(prefix, k.clone());
                        if let Scope::Tenant(tenant) = &scope {
                            let (read, cluster) = reads(&includes, req.spec.include_cluster_resources);
                            let outside: Vec<&String> = read.iter().filter(|n| *n != tenant).collect();
                            if !outside.is_empty() || cluster {
                                report.violations.push(v(
                                    "C2",
                                    format!(
                                        "{}/{}, a tenant's Backup, reads {outside:?}{}",
                                        o.ns,
                                        o.name,
                                        if cluster { " and cluster-scoped resources" } else { "" }
                                    ),
                                ));
                            }
                        }
                        if let Some(x) = objs.get_mut(&k) {
                            x.phase = Some("InProgress");
                        }
                        // A log of an earlier Backup of the name (deleted before it had a finalizer)
                        // is deleted before the new one starts.
                        if logs.get(&k).is_some_and(|l| l.uid != o.uid) {
                            logs.remove(&k);
                        }
                        start(&mut runs, &mut logs, &mut *ctl, &mut rng, &mut report, includes);
                    }
                }
            }
            // The controller looks at every Restore.
            let names: Vec<String> = restores.keys().cloned().collect();
            for name in names {
                let Some(r) = restores.get(&name).cloned() else { continue };
                let id = (HOME.to_string(), name.clone(), r.uid.clone());
                let look = BackupLook {
                    in_scope: true,
                    deleting: false,
                    finalizer: false,
                    phase: r.cached,
                    running_here: ctl.restores_running.contains(&name),
                    end: ctl.restore_registry.end_of(&id),
                    now_ms: clock,
                };
                if !matches!(restore_step(&look), BackupStep::Run { .. }) {
                    continue;
                }
                // Its own log resumes as it is (no second validation); a new one needs its Backup
                // ended usable.
                let backup_key = (HOME.to_string(), r.backup.clone());
                match restore_logs.get(&name).filter(|l| l.uid == r.uid) {
                    None => {
                        let usable = objs
                            .get(&backup_key)
                            .filter(|b| !b.deleting && matches!(b.phase, Some("Completed" | "PartiallyFailed")));
                        let Some(b) = usable else {
                            if let Some(x) = restores.get_mut(&name) {
                                x.phase = Some("FailedValidation");
                            }
                            ctl.restore_registry.record(id, RunEnd::Terminal);
                            continue;
                        };
                        let log = RestoreLog {
                            uid: r.uid.clone(),
                            finished: false,
                            backup: backup_key,
                            backup_uid: b.uid.clone(),
                        };
                        restore_logs.insert(name.clone(), log);
                    }
                    Some(l) if l.finished => {
                        // Finished before its status was reported: reported now.
                        if let Some(x) = restores.get_mut(&name) {
                            x.phase = Some("Completed");
                        }
                        ctl.restore_registry.record(id, RunEnd::Terminal);
                        continue;
                    }
                    Some(l) => {
                        // Every run reads the archive it planned: gone with its Backup's data (or
                        // another Backup's in its place), the restore cannot go on and fails.
                        let there = logs.get(&l.backup).is_some_and(|b| b.finished && b.uid == l.backup_uid);
                        if !there {
                            if let Some(x) = restores.get_mut(&name) {
                                x.phase = Some("Failed");
                            }
                            if let Some(l) = restore_logs.get_mut(&name) {
                                l.finished = true;
                            }
                            ctl.restore_registry.record(id, RunEnd::Terminal);
                            continue;
                        }
                    }
                }
                if restore_runs.get(&name).is_some_and(|x| x.by != me) {
                    // A paused process still holds the restore's log.
                    report.lock_refusals += 1;
                    let end = again(&ctl.restore_registry, &id, clock, true);
                    ctl.restore_registry.record(id, end);
                    continue;
                }
                if restore_runs.contains_key(&name) {
                    report.violations.push(v("C4", format!("restore {name} was run twice at once")));
                }
                if let Some(x) = restores.get_mut(&name) {
                    x.phase = Some("InProgress");
                }
                let ends_ms = now + rng.range(3, 40) as i64 * TICK_MS;
                restore_runs.insert(name.clone(), RestoreRun { uid: r.uid.clone(), ends_ms, by: me });
                ctl.restores_running.insert(name);
                report.restore_runs += 1;
            }
            // The garbage collector's pass prunes the registries.
            if tick % 60 == 0 {
                ctl.registry.prune(|id| {
                    objs.get(&(id.0.clone(), id.1.clone()))
                        .filter(|o| o.uid == id.2)
                        .map(|o| o.cached.is_some_and(is_terminal_phase))
                });
                ctl.restore_registry.prune(|id| {
                    restores.get(&id.1).filter(|r| r.uid == id.2).map(|r| r.cached.is_some_and(is_terminal_phase))
                });
            }
        }
    }
    // C4 once faults have healed: every Backup and Restore of the controller's namespaces ended or
    // was deleted, no run goes on, no window is open.
    for ((ns, name), o) in &objs {
        let ours = tenancy.scope(ns).is_some();
        if ours && !o.phase.is_some_and(is_terminal_phase) {
            report.violations.push(v("C4", format!("{ns}/{name} never ended ({:?}) after the faults healed", o.phase)));
        }
        if !ours && (o.finalizer || o.phase.is_some()) {
            report
                .violations
                .push(v("C4", format!("{ns}/{name} is outside the controller's namespaces and was acted on")));
        }
    }
    for (name, r) in &restores {
        if !r.phase.is_some_and(is_terminal_phase) {
            report
                .violations
                .push(v("C4", format!("restore {name} never ended ({:?}) after the faults healed", r.phase)));
        }
    }
    for ((ns, name), l) in &logs {
        if l.window_open {
            report.violations.push(v("C3", format!("{ns}/{name}: a pod stays frozen after the faults healed")));
        }
    }
    if !runs.is_empty() || !restore_runs.is_empty() {
        report.violations.push(v(
            "C4",
            format!(
                "{} backup and {} restore runs still going after the faults healed",
                runs.len(),
                restore_runs.len()
            ),
        ));
    }
    report
}
