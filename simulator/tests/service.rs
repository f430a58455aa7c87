//! The service world per seed (issue 21): the Backup and Restore controllers' pure decisions
//! (`blockwise_engine::service`) and the real tenancy validation over an hour of users creating,
//! deleting and recreating Backups and Restores in the controller's, tenants' and strangers'
//! namespaces, store outages, controller kills, clock jumps and two replicas whose paused leader
//! loses its Lease, judged by `simulator/src/service.rs` (C2, C3, C4, Q1) from the world's own
//! records. Fixed seeds in CI; `BLOCKWISE_SERVICE_SEEDS` raises the count locally. A failure names
//! the seed, whose run is deterministic.

use blockwise_simulator::service::simulate_service;

fn seed_count() -> u64 {
    std::env::var("BLOCKWISE_SERVICE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30)
}

#[test]
fn the_service_world_holds_every_invariant_over_fixed_seeds() {
    let mut failures = Vec::new();
    let (mut runs, mut stops, mut interrupted, mut while_running, mut deleted, mut queued, mut kills) =
        (0, 0, 0, 0, 0, 0, 0);
    let (mut tenants, mut refused, mut jumps, mut restore_runs, mut restores_while_running, mut late) =
        (0, 0, 0, 0, 0, 0);
    let (mut pairs, mut pauses, mut takeovers, mut losses, mut lock_refusals, mut stale) = (0, 0, 0, 0, 0, 0);
    let (mut failed, mut partially_failed) = (0, 0);
    for seed in 0..seed_count() {
        let r = simulate_service(seed);
        runs += r.runs;
        stops += r.stops;
        failed += r.failed;
        partially_failed += r.partially_failed;
        interrupted += r.interrupted;
        while_running += r.deletions_while_running;
        deleted += r.deleted;
        queued += r.queued;
        kills += r.kills;
        tenants += r.tenant_backups;
        refused += r.refused;
        jumps += r.clock_jumps;
        restore_runs += r.restore_runs;
        restores_while_running += r.restores_deleted_while_running;
        late += r.late_writes_refused;
        pairs += r.two_replicas;
        pauses += r.pauses;
        takeovers += r.lease_takeovers;
        losses += r.lease_losses;
        lock_refusals += r.lock_refusals;
        stale += r.stale_looks;
        if let Some(v) = r.violations.first() {
            failures.push(format!("seed {seed}: {} {} ({} violations)", v.invariant, v.detail, r.violations.len()));
        }
    }
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    for (what, n) in [
        ("runs", runs),
        ("runs ended Failed", failed),
        ("runs ended PartiallyFailed", partially_failed),
        ("runs stopped by an outage", stops),
        ("runs interrupted by a kill", interrupted),
        ("deletions while running", while_running),
        ("deletions", deleted),
        ("queued looks", queued),
        ("controller kills", kills),
        ("tenants' Backups", tenants),
        ("Backups refused by validation", refused),
        ("clock jumps", jumps),
        ("restore runs", restore_runs),
        ("Restores deleted while running", restores_while_running),
        ("late status writes refused", late),
        ("worlds with two replicas", pairs),
        ("paused replicas", pauses),
        ("Lease takeovers", takeovers),
        ("leaders that found their Lease taken", losses),
        ("starts refused by another process's log lock", lock_refusals),
        ("looks at a stale cache", stale),
    ] {
        assert!(n > 0, "no {what} in {} seeds", seed_count());
    }
    println!(
        "{} service worlds: {runs} runs, {failed} Failed, {partially_failed} PartiallyFailed, {stops} stopped, {interrupted} interrupted, {kills} kills, {jumps} clock jumps, {while_running} deletions while running, {deleted} deleted, {queued} queued looks, {tenants} tenants' Backups, {refused} refused, {restore_runs} restore runs, {restores_while_running} Restores deleted while running, {late} late writes refused, {pairs} with two replicas: {pauses} pauses, {takeovers} Lease takeovers, {losses} Leases lost, {lock_refusals} starts refused by a log lock, {stale} stale looks",
        seed_count()
    );
}
