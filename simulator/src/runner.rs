//! Seeds in, verdicts out: what `blockwise simulate` and the simulation tests run.
//!
//! [`plan_seed`] turns a seed into a model, a fault set and a worker count — all from the seed, so
//! `(seed, commit)` reproduces a run. [`check_seed`] runs it and applies every check: the
//! per-run invariants of [`crate::check`], then E2/G3 against a crash-free run of the same cluster
//! with a different worker count, and D1 by running the seed twice and comparing trace hashes.
//! [`shrink`] deletes model records greedily while the same invariant still fails.

use std::collections::BTreeSet;

use blockwise_engine::Mutation;
use serde::Serialize;

use crate::check::{check_archive, check_grouping, check_hooks, check_liveness, planned_blocks, Violation};
use crate::model::Model;
use crate::rng::{mix64, Rng};
use crate::sim::{assign_hook_faults, simulate, FaultKind, Outcome, RunConfig, RunReport};

/// Faults that kill the process; the E2 reference run leaves them out.
const CRASH_FAMILY: [FaultKind; 4] =
    [FaultKind::Crash, FaultKind::LostUnflushed, FaultKind::TornRecord, FaultKind::BitFlip];

/// A seed's model and run configuration.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    /// The generated cluster (with its hook faults assigned).
    pub model: Model,
    /// The run configuration.
    pub cfg: RunConfig,
}

/// Derives everything about a seed from the seed. `allowed` limits the faults that may be enabled.
pub fn plan_seed(seed: u64, allowed: &BTreeSet<FaultKind>, mutation: Option<Mutation>) -> SeedPlan {
    let mut rng = Rng::new(mix64(seed ^ 0x005e_ed0f_b10c));
    let size = rng.range(3, 30) as usize;
    let mut model = Model::generate(&mut rng, size);
    let faults: BTreeSet<FaultKind> =
        FaultKind::ALL.into_iter().filter(|f| allowed.contains(f) && rng.chance(0.5)).collect();
    assign_hook_faults(&mut model, &faults, &mut rng);
    if !faults.contains(&FaultKind::DeletedBeforeGet) {
        // Dangling references are this fault: without it, every referenced object exists.
        for c in &mut model.pvcs {
            c.pv_missing = false;
        }
        for p in &mut model.pods {
            p.claims.retain(|c| !c.starts_with("gone"));
        }
    }
    let workers = *rng.pick(&[1usize, 2, 3, 8]).unwrap_or(&2);
    SeedPlan { model, cfg: RunConfig { seed, faults, workers, crash_at_append: None, mutation } }
}

/// The verdict on one seed.
#[derive(Debug, Clone, Serialize)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// Faults enabled for it.
    pub faults: Vec<&'static str>,
    /// Faults that actually happened.
    #[serde(skip)]
    pub hits: BTreeSet<FaultKind>,
    /// Broken invariants (empty: the seed passed).
    pub violations: Vec<Violation>,
    /// Crashes injected.
    pub crashes: u32,
}

/// Runs every check on one configured run.
pub fn check_run(model: &Model, cfg: &RunConfig, check_determinism: bool) -> (Vec<Violation>, RunReport) {
    let report = simulate(model, cfg);
    let mut out = Vec::new();
    out.extend(check_liveness(&report));
    out.extend(check_grouping(model, &report));
    out.extend(check_hooks(&report));
    out.extend(check_archive(&report));
    if matches!(report.outcome, Outcome::Finished(_)) {
        let mut ref_cfg = cfg.clone();
        ref_cfg.faults.retain(|f| !CRASH_FAMILY.contains(f));
        ref_cfg.crash_at_append = None;
        ref_cfg.workers = if cfg.workers == 1 { 5 } else { 1 };
        ref_cfg.seed = mix64(cfg.seed ^ 0xe2);
        let reference = simulate(model, &ref_cfg);
        if planned_blocks(&reference.events) != planned_blocks(&report.events) {
            out.push(Violation {
                invariant: "G3",
                detail: "blocks differ from a run with another worker count and schedule".into(),
            });
        }
        if matches!(reference.outcome, Outcome::Finished(_)) && reference.archive != report.archive {
            let detail = match (&reference.archive, &report.archive) {
                (Some(a), Some(b)) => {
                    let diff = a.iter().zip(b.iter()).find(|(x, y)| x != y).map(|(x, _)| x.0.clone());
                    format!(
                        "archive differs from the crash-free run ({} vs {} files; first difference at {diff:?})",
                        b.len(),
                        a.len()
                    )
                }
                _ => "one of the runs has no archive".into(),
            };
            out.push(Violation { invariant: "E2", detail });
        }
    }
    if check_determinism {
        let again = simulate(model, cfg);
        if again.trace != report.trace {
            let i = again
                .trace
                .iter()
                .zip(report.trace.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(again.trace.len().min(report.trace.len()));
            let a = report.trace_labels.get(i).cloned().unwrap_or_else(|| "<end>".into());
            let b = again.trace_labels.get(i).cloned().unwrap_or_else(|| "<end>".into());
            out.push(Violation {
                invariant: "D1",
                detail: format!("runs diverge at step {i}: first run {a:?}, second run {b:?}"),
            });
        }
    }
    (out, report)
}

/// Plans and checks one seed.
pub fn check_seed(
    seed: u64,
    allowed: &BTreeSet<FaultKind>,
    check_determinism: bool,
    mutation: Option<Mutation>,
) -> (SeedResult, SeedPlan) {
    let plan = plan_seed(seed, allowed, mutation);
    let (violations, report) = check_run(&plan.model, &plan.cfg, check_determinism);
    let result = SeedResult {
        seed,
        faults: plan.cfg.faults.iter().map(|f| f.name()).collect(),
        hits: report.hits,
        violations,
        crashes: report.crashes,
    };
    (result, plan)
}

/// Shrinks a failing model: keeps deleting records while `invariant` still fails. Bounded by
/// `rounds_max` successful deletions.
pub fn shrink(plan: &SeedPlan, invariant: &str, rounds_max: usize) -> Model {
    let mut best = plan.model.clone();
    for _ in 0..rounds_max {
        let next = best.shrink_candidates().into_iter().find(|m| {
            let (v, _) = check_run(m, &plan.cfg, false);
            v.iter().any(|v| v.invariant == invariant)
        });
        match next {
            Some(m) => best = m,
            None => break,
        }
    }
    best
}
