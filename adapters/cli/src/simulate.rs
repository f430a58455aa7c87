//! `blockwise simulate`: run seeds of the deterministic simulator and report.
//!
//! The simulator itself reads no clock; this command measures seeds per second around it. Output
//! is a fault-coverage table (how many seeds hit each fault type) and, for every failing seed, the
//! violated invariant, the shrunk cluster and the one command that reproduces it. Exit 1 on any
//! violation, so CI and scripts can rely on it.
//!
//! Each seed also runs the service's schedule world (`blockwise_simulator::year`): a year of
//! schedules whose backups fail alone and in streaks, with controller restarts and clock jumps,
//! driving the controller's own schedule step, retention and garbage collection, judged Y1–Y7,
//! C1 and C5 — and the service world (`blockwise_simulator::service`): the Backup and Restore
//! controllers' own decisions and the real tenancy validation over an hour of users creating,
//! deleting and recreating Backups and Restores in the controller's, tenants' and strangers'
//! namespaces, store outages, controller kills, clock jumps and two replicas whose paused leader
//! loses its Lease, judged C2, C3, C4 and Q1. Their
//! coverage is printed beside the engine world's.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::Result;
use blockwise_simulator::runner::{check_seed, shrink};
use blockwise_simulator::sim::FaultKind;
use serde_json::json;

/// Successful shrinking steps at most per failure.
pub const SHRINK_ROUNDS_MAX: usize = 200;

/// Parses `all`, `none` or a comma-separated list of fault names.
pub fn parse_faults(s: &str) -> Result<BTreeSet<FaultKind>, String> {
    match s.trim() {
        "all" => Ok(FaultKind::ALL.into_iter().collect()),
        "none" | "" => Ok(BTreeSet::new()),
        list => list
            .split(',')
            .map(|n| {
                FaultKind::parse(n.trim()).ok_or_else(|| {
                    let names: Vec<&str> = FaultKind::ALL.iter().map(|f| f.name()).collect();
                    format!("unknown fault {:?}; known: all, none, {}", n.trim(), names.join(", "))
                })
            })
            .collect(),
    }
}

/// Runs `seeds` seeds from `first`; prints a report; returns whether every seed passed.
pub fn run(
    first: u64,
    seeds: u64,
    faults: &BTreeSet<FaultKind>,
    check_determinism: bool,
    json_out: bool,
) -> Result<bool> {
    let start = Instant::now();
    let mut hits: BTreeMap<FaultKind, u64> = FaultKind::ALL.into_iter().map(|f| (f, 0)).collect();
    let mut failures = Vec::new();
    // Round trips: restores run, objects restored, and the restore faults that happened, by seed.
    let (mut trips, mut restored) = (0u64, 0u64);
    let mut trip_hits: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut year = YearTotals::default();
    let mut service = ServiceTotals::default();
    for seed in first..first.saturating_add(seeds) {
        let w = blockwise_simulator::service::simulate_service(seed);
        service.add(&w);
        if let Some(v) = w.violations.first() {
            failures.push(json!({
                "seed": seed,
                "world": "service",
                "invariant": v.invariant,
                "detail": v.detail,
                "violations": w.violations,
                "faults": [],
                "shrunk_cluster": null,
                "reproduce": format!("blockwise simulate --seed {seed} --seeds 1"),
            }));
        }
        let y = blockwise_simulator::year::simulate_year(seed);
        year.add(&y);
        if let Some(v) = y.violations.first() {
            failures.push(json!({
                "seed": seed,
                "world": "schedules",
                "invariant": v.invariant,
                "detail": v.detail,
                "violations": y.violations,
                "faults": [],
                "shrunk_cluster": null,
                "reproduce": format!("blockwise simulate --seed {seed} --seeds 1"),
            }));
        }
        let (r, plan) = check_seed(seed, faults, check_determinism, None);
        if let Some(t) = &r.round_trip {
            trips += 1;
            restored += t.objects as u64;
            for h in &t.hits {
                *trip_hits.entry(h).or_default() += 1;
            }
        }
        for h in &r.hits {
            *hits.entry(*h).or_default() += 1;
        }
        if let Some(v) = r.violations.first() {
            let small = shrink(&plan, v.invariant, SHRINK_ROUNDS_MAX);
            let fault_list = if r.faults.is_empty() { "none".to_string() } else { r.faults.join(",") };
            let det = if check_determinism { " --check-determinism" } else { "" };
            failures.push(json!({
                "seed": seed,
                "invariant": v.invariant,
                "detail": v.detail,
                "violations": r.violations,
                "faults": r.faults,
                "shrunk_cluster": small,
                "reproduce": format!("blockwise simulate --seed {seed} --seeds 1 --faults {fault_list}{det}"),
            }));
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let per_second = seeds as f64 / secs;
    if json_out {
        let fault_hits: serde_json::Map<String, serde_json::Value> =
            hits.iter().map(|(f, n)| (f.name().to_string(), json!(n))).collect();
        let doc = json!({
            "seeds": seeds,
            "first_seed": first,
            "failures": failures,
            "seeds_per_second": per_second,
            "determinism_checked": check_determinism,
            "fault_hits": fault_hits,
            "round_trips": {"restores": trips, "objects": restored, "fault_hits": trip_hits},
            "schedules": year.json(),
            "service": service.json(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let det = if check_determinism { ", determinism checked" } else { "" };
        println!("{seeds} seeds from {first} in {secs:.2} s: {per_second:.1} seeds/s{det}");
        println!("{:<22} {:>10}", "FAULT", "SEEDS HIT");
        for (f, n) in &hits {
            let mark = if faults.contains(f) { "" } else { "  (disabled)" };
            println!("{:<22} {:>10}{mark}", f.name(), n);
        }
        let faults: Vec<String> = trip_hits.iter().map(|(h, n)| format!("{h} {n}")).collect();
        println!(
            "round trips: {trips} restores of the stored archive, {restored} objects restored; restore faults hit (seeds): {}",
            if faults.is_empty() { "none".to_string() } else { faults.join(", ") }
        );
        println!("{}", year.line());
        println!("{}", service.line());
        println!("{} failing seeds", failures.len());
        for f in &failures {
            println!(
                "\nseed {}: {} violated: {}",
                f["seed"],
                f["invariant"].as_str().unwrap_or(""),
                f["detail"].as_str().unwrap_or("")
            );
            if !f["shrunk_cluster"].is_null() {
                println!("  shrunk cluster: {}", f["shrunk_cluster"]);
            }
            println!("  reproduce: {}", f["reproduce"].as_str().unwrap_or(""));
        }
    }
    Ok(failures.is_empty())
}

/// What the schedule worlds of all seeds did (its faults and the paths its judges saw).
#[derive(Debug, Default)]
struct YearTotals {
    years: u64,
    runs: u64,
    failed: u64,
    streak_looks: u64,
    skipped: u64,
    retention_deleted: u64,
    expired: u64,
    restarts: u64,
    jumps: u64,
    early_looks: u64,
}

impl YearTotals {
    fn add(&mut self, y: &blockwise_simulator::year::YearReport) {
        self.years += 1;
        self.runs += y.runs;
        self.failed += y.failed;
        self.streak_looks += y.failure_streak_looks;
        self.skipped += y.skipped;
        self.retention_deleted += y.retention_deleted;
        self.expired += y.expired;
        self.restarts += u64::from(y.restarts);
        self.jumps += u64::from(y.jumps);
        self.early_looks += y.early_looks;
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "years": self.years, "runs": self.runs, "failed_runs": self.failed,
            "retention_looks_after_failures": self.streak_looks, "skipped": self.skipped,
            "retention_deletions": self.retention_deleted, "expired": self.expired,
            "controller_restarts": self.restarts, "clock_jumps": self.jumps,
            "looks_right_after_a_start": self.early_looks,
        })
    }

    fn line(&self) -> String {
        format!(
            "schedules: {} simulated years, {} runs ({} failed), {} retention looks after failures, {} skipped, {} retention deletions, {} expired, {} controller restarts, {} clock jumps (judges Y1-Y7, C1, C5)",
            self.years,
            self.runs,
            self.failed,
            self.streak_looks,
            self.skipped,
            self.retention_deleted,
            self.expired,
            self.restarts,
            self.jumps
        )
    }
}

/// What the service worlds of all seeds did.
#[derive(Debug, Default)]
struct ServiceTotals {
    worlds: u64,
    created: u64,
    runs: u64,
    stops: u64,
    failed: u64,
    partially_failed: u64,
    interrupted: u64,
    kills: u64,
    deletions_while_running: u64,
    deleted: u64,
    queued: u64,
    tenant_backups: u64,
    refused: u64,
    clock_jumps: u64,
    restores: u64,
    restore_runs: u64,
    restores_deleted_while_running: u64,
    late_writes_refused: u64,
    two_replicas: u64,
    pauses: u64,
    lease_takeovers: u64,
    lease_losses: u64,
    lock_refusals: u64,
    stale_looks: u64,
}

impl ServiceTotals {
    fn add(&mut self, w: &blockwise_simulator::service::ServiceReport) {
        self.worlds += 1;
        self.created += w.created;
        self.runs += w.runs;
        self.stops += w.stops;
        self.failed += w.failed;
        self.partially_failed += w.partially_failed;
        self.interrupted += w.interrupted;
        self.kills += w.kills;
        self.deletions_while_running += w.deletions_while_running;
        self.deleted += w.deleted;
        self.queued += w.queued;
        self.tenant_backups += w.tenant_backups;
        self.refused += w.refused;
        self.clock_jumps += w.clock_jumps;
        self.restores += w.restores;
        self.restore_runs += w.restore_runs;
        self.restores_deleted_while_running += w.restores_deleted_while_running;
        self.late_writes_refused += w.late_writes_refused;
        self.two_replicas += w.two_replicas;
        self.pauses += w.pauses;
        self.lease_takeovers += w.lease_takeovers;
        self.lease_losses += w.lease_losses;
        self.lock_refusals += w.lock_refusals;
        self.stale_looks += w.stale_looks;
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "worlds": self.worlds, "backups": self.created, "runs": self.runs,
            "stopped_by_outages": self.stops, "ended_failed": self.failed,
            "ended_partially_failed": self.partially_failed, "interrupted_by_kills": self.interrupted,
            "controller_kills": self.kills, "deletions_while_running": self.deletions_while_running,
            "deleted": self.deleted, "queued_looks": self.queued,
            "tenant_backups": self.tenant_backups, "refused_by_validation": self.refused,
            "clock_jumps": self.clock_jumps, "restores": self.restores, "restore_runs": self.restore_runs,
            "restores_deleted_while_running": self.restores_deleted_while_running,
            "late_status_writes_refused": self.late_writes_refused,
            "two_replica_worlds": self.two_replicas, "leader_pauses": self.pauses,
            "lease_takeovers": self.lease_takeovers, "leases_lost": self.lease_losses,
            "starts_refused_by_a_log_lock": self.lock_refusals, "stale_looks": self.stale_looks,
        })
    }

    fn line(&self) -> String {
        format!(
            "service: {} worlds, {} backups ({} tenants', {} refused by validation), {} runs ({} ended Failed, {} PartiallyFailed, {} stopped by outages, {} interrupted by {} controller kills), {} clock jumps, {} deletions while running, {} deleted, {} queued looks; {} restores, {} restore runs, {} deleted while running, {} late status writes refused; {} worlds with two replicas: {} pauses, {} Lease takeovers, {} Leases lost, {} starts refused by a log lock; {} looks at a stale cache (judges C2, C3, C4, Q1)",
            self.worlds,
            self.created,
            self.tenant_backups,
            self.refused,
            self.runs,
            self.failed,
            self.partially_failed,
            self.stops,
            self.interrupted,
            self.kills,
            self.clock_jumps,
            self.deletions_while_running,
            self.deleted,
            self.queued,
            self.restores,
            self.restore_runs,
            self.restores_deleted_while_running,
            self.late_writes_refused,
            self.two_replicas,
            self.pauses,
            self.lease_takeovers,
            self.lease_losses,
            self.lock_refusals,
            self.stale_looks
        )
    }
}
