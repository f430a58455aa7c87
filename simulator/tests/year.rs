//! A year of schedules per seed (issue 14): the controller's schedule step and garbage
//! collection over 365 virtual days with restarts and clock jumps, judged by `simulator/src/year.rs`
//! (Y1–Y7, C1). Fixed seeds in CI; `BLOCKWISE_YEAR_SEEDS` raises the count locally. A failure names
//! the seed, whose run is deterministic.

use blockwise_simulator::year::simulate_year;

fn seed_count() -> u64 {
    std::env::var("BLOCKWISE_YEAR_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

#[test]
fn a_year_of_schedules_holds_every_invariant_over_fixed_seeds() {
    let (mut runs, mut skipped, mut restarts, mut jumps, mut retained, mut expired) = (0, 0, 0, 0, 0, 0);
    let (mut early, mut failed, mut streaks) = (0, 0, 0);
    let mut failures = Vec::new();
    for seed in 0..seed_count() {
        let r = simulate_year(seed);
        runs += r.runs;
        skipped += r.skipped;
        early += r.early_looks;
        restarts += r.restarts;
        jumps += r.jumps;
        retained += r.retention_deleted;
        expired += r.expired;
        failed += r.failed;
        streaks += r.failure_streak_looks;
        if let Some(v) = r.violations.first() {
            failures.push(format!("seed {seed}: {} {} ({} violations)", v.invariant, v.detail, r.violations.len()));
        }
    }
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    // Every path was taken: runs, skips, restarts, jumps, retention and TTL deletions.
    for (what, n) in [
        ("runs", runs),
        ("skips", skipped),
        ("looks right after a start", early),
        ("retention deletions", retained),
        ("expiries", expired),
        ("failed runs", failed),
        ("retention looks after a failure streak", streaks),
    ] {
        assert!(n > 0, "no {what} in {} seeds", seed_count());
    }
    assert!(restarts > 0 && jumps > 0, "restarts {restarts}, jumps {jumps}");
    println!(
        "{} years: {runs} runs, {skipped} skipped, {early} looks right after a start, {restarts} restarts, {jumps} jumps, {retained} retention deletions, {expired} expired, {failed} failed runs, {streaks} looks after failures",
        seed_count()
    );
}
