//! The service world per seed (issue 21, first part): the Backup controller's pure decisions
//! (`blockwise_engine::service`) over an hour of users creating and deleting Backups, store
//! outages and controller kills, judged by `simulator/src/service.rs` (C3, C4, Q1) from the world's
//! own records. Fixed seeds in CI; `BLOCKWISE_SERVICE_SEEDS` raises the count locally. A failure
//! names the seed, whose run is deterministic.

use blockwise_simulator::service::simulate_service;

fn seed_count() -> u64 {
    std::env::var("BLOCKWISE_SERVICE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30)
}

#[test]
fn the_service_world_holds_every_invariant_over_fixed_seeds() {
    let mut failures = Vec::new();
    let (mut runs, mut stops, mut interrupted, mut while_running, mut deleted, mut queued, mut kills) =
        (0, 0, 0, 0, 0, 0, 0);
    for seed in 0..seed_count() {
        let r = simulate_service(seed);
        runs += r.runs;
        stops += r.stops;
        interrupted += r.interrupted;
        while_running += r.deletions_while_running;
        deleted += r.deleted;
        queued += r.queued;
        kills += r.kills;
        if let Some(v) = r.violations.first() {
            failures.push(format!("seed {seed}: {} {} ({} violations)", v.invariant, v.detail, r.violations.len()));
        }
    }
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    for (what, n) in [
        ("runs", runs),
        ("runs stopped by an outage", stops),
        ("runs interrupted by a kill", interrupted),
        ("deletions while running", while_running),
        ("deletions", deleted),
        ("queued looks", queued),
        ("controller kills", kills),
    ] {
        assert!(n > 0, "no {what} in {} seeds", seed_count());
    }
    println!(
        "{} service worlds: {runs} runs, {stops} stopped, {interrupted} interrupted, {kills} kills, {while_running} deletions while running, {deleted} deleted, {queued} queued looks",
        seed_count()
    );
}
