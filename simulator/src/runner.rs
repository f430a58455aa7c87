//! Seeds in, verdicts out: what `blockwise simulate` and the simulation tests run.
//!
//! [`plan_seed`] turns a seed into a model, a fault set, the world's faults and a worker count —
//! all from the seed, so `(seed, commit)` reproduces a run. [`check_run`] runs it and applies every
//! judge of [`crate::check`], then G3 and E2 against a reference run of the same cluster without
//! the process-killing faults, with another worker count and another listing order, and D1 by
//! running the seed twice and comparing the hash chains of the world's records. [`shrink`] deletes
//! model records greedily while the same invariant still fails.

use std::collections::BTreeSet;

use blockwise_engine::hooks::HookPhase;
use blockwise_engine::Mutation;
use serde::Serialize;

use crate::check::{check_report, evidence, expected_items, planned_blocks, Violation};
use crate::cluster::HookFault;
use crate::model::{hook_fault_key, Model};
use crate::rng::{mix64, Rng};
use crate::sim::{simulate, FaultKind, Outcome, RunConfig, RunReport};

/// Faults that kill or stop the process; the reference run leaves them out.
const PROCESS_FAULTS: [FaultKind; 8] = [
    FaultKind::Crash,
    FaultKind::LostUnflushed,
    FaultKind::TornRecord,
    FaultKind::BitFlip,
    FaultKind::LogCut,
    FaultKind::StoreOutage,
    FaultKind::ApiGone,
    FaultKind::ApiHung,
];

/// A seed's model and run configuration.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    /// The generated cluster, with the world's faults.
    pub model: Model,
    /// The run configuration.
    pub cfg: RunConfig,
}

/// Assigns the world's faults of `faults` to `model`, from `rng`: deterministic per pod, resource
/// and object, so a rerun after a crash meets the same ones.
pub fn assign_world_faults(model: &mut Model, faults: &BTreeSet<FaultKind>, rng: &mut Rng) {
    let kinds: Vec<HookFault> = [
        (FaultKind::HookExit, HookFault::Exit),
        (FaultKind::HookError, HookFault::Error),
        (FaultKind::HookTimeout, HookFault::Timeout),
        (FaultKind::HookHang, HookFault::Hang),
    ]
    .into_iter()
    .filter(|(k, _)| faults.contains(k))
    .map(|(_, f)| f)
    .collect();
    if !kinds.is_empty() {
        let pods: Vec<(String, Vec<HookPhase>)> =
            model.pods.iter().map(|p| (p.name.clone(), model.hooks(p).iter().map(|h| h.phase).collect())).collect();
        for (name, phases) in pods {
            for phase in phases {
                let p = if phase == HookPhase::Pre { 0.4 } else { 0.2 };
                if rng.chance(p) {
                    if let Some(f) = rng.pick(&kinds) {
                        model.world.hook_faults.insert(hook_fault_key(&name, phase), *f);
                    }
                }
            }
        }
    }
    let resources = ["pods", "persistentvolumeclaims", "persistentvolumes", "configmaps", "namespaces"];
    if faults.contains(&FaultKind::List5xx) {
        for _ in 0..rng.range(1, 2) {
            if let Some(r) = rng.pick(&resources) {
                // Six attempts per listing: up to 8 failures, so the retries sometimes run out.
                model.world.list_unavailable.insert(r.to_string(), rng.range(1, 8) as u32);
            }
        }
    }
    if faults.contains(&FaultKind::List429) {
        if let Some(r) = rng.pick(&resources) {
            model.world.list_unavailable.entry(r.to_string()).or_insert(rng.range(1, 3) as u32);
            model.world.list_throttled.insert(r.to_string());
        }
    }
    if faults.contains(&FaultKind::GetError) {
        let pulled: Vec<String> = model
            .tags()
            .into_iter()
            .filter(|t| ["pv/", "pc/", "crb/", "role/", "pvc/"].iter().any(|p| t.starts_with(p)))
            .collect();
        for _ in 0..rng.range(1, 2) {
            if let Some(t) = rng.pick(&pulled) {
                model.world.get_forbidden.insert(t.clone());
            }
        }
    }
    // The fake CSI driver's faults, per claim and per volume group.
    let claim_faults: Vec<crate::csi::CsiFault> = [
        (FaultKind::SnapshotError, crate::csi::CsiFault::Error),
        (FaultKind::HandleNeverSet, crate::csi::CsiFault::NeverHandle),
        (FaultKind::SnapshotNeverReady, crate::csi::CsiFault::NeverReady),
    ]
    .into_iter()
    .filter(|(k, _)| faults.contains(k))
    .map(|(_, f)| f)
    .collect();
    let mut group_faults = claim_faults.clone();
    if faults.contains(&FaultKind::GroupPartial) {
        group_faults.push(crate::csi::CsiFault::Partial);
    }
    let claims: Vec<(String, Option<String>)> = model
        .pvcs
        .iter()
        .filter(|c| c.bound)
        .map(|c| (c.name.clone(), c.group.map(|g| crate::model::group_fault_key(c.ns, g))))
        .collect();
    for (claim, group) in claims {
        for key in std::iter::once(claim).chain(group) {
            // The group pool holds the claim pool's faults and more.
            if !group_faults.is_empty() {
                let group = key.starts_with("group:");
                let pool = if group { &group_faults } else { &claim_faults };
                // A group snapshot is rarer than a claim's (its claims must all be visible, bound and
                // of one driver, and the cluster must serve groups): when on, partial groups are
                // drawn more often, or few seeds would ever cut one.
                if group && faults.contains(&FaultKind::GroupPartial) && rng.chance(0.5) {
                    model.world.snapshot_faults.insert(key.clone(), crate::csi::CsiFault::Partial);
                } else if rng.chance(0.3) {
                    if let Some(f) = rng.pick(pool) {
                        model.world.snapshot_faults.insert(key.clone(), *f);
                    }
                }
            }
            if faults.contains(&FaultKind::SnapshotSlow) && rng.chance(0.3) {
                model.world.slow_snapshots.insert(key);
            }
        }
    }
    // Without the snapshot API nothing else about snapshots is exercised: a third of the seeds
    // that enable this fault lose the CRDs.
    if faults.contains(&FaultKind::CrdsAbsent) && rng.chance(0.35) {
        model.csi.crds = false;
    }
    if faults.contains(&FaultKind::ClusterChange) {
        let hooked: Vec<String> =
            model.pods.iter().filter(|p| !model.hooks(p).is_empty()).map(|p| p.name.clone()).collect();
        if let Some(p) = rng.pick(&hooked) {
            if rng.chance(0.5) {
                model.world.delete_pods.push(p.clone());
            } else {
                model.world.rename_containers.push(p.clone());
            }
        }
    }
}

/// Derives everything about a seed from the seed. `allowed` limits the faults that may be enabled.
pub fn plan_seed(seed: u64, allowed: &BTreeSet<FaultKind>, mutation: Option<Mutation>) -> SeedPlan {
    let mut rng = Rng::new(mix64(seed ^ 0x005e_ed0f_b10c));
    let size = rng.range(3, 30) as usize;
    let mut model = Model::generate(&mut rng, size);
    // One draw per fault kind whatever is allowed, so that the failure line's `--faults` (the kinds
    // this seed enabled) replays exactly the run found under `--faults all`.
    let faults: BTreeSet<FaultKind> =
        FaultKind::ALL.into_iter().filter(|f| rng.chance(0.5) && allowed.contains(f)).collect();
    assign_world_faults(&mut model, &faults, &mut rng);
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
    let mut cfg = RunConfig::new(seed, faults, workers);
    cfg.mutation = mutation;
    cfg.list_order_seed = rng.chance(0.5).then(|| rng.next_u64());
    SeedPlan { model, cfg }
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
    /// The round trip of the archive, when there was one.
    #[serde(skip)]
    pub round_trip: Option<crate::sim::RoundTripSummary>,
}

/// G3 and E2 against a reference run without the process faults, with another worker count and
/// listing order: when both runs saw the same cluster (the same listings and gets failed), their
/// plans must be equal; when the world's records give both the same expected archive, their
/// archives must be equal byte for byte.
fn check_reference(model: &Model, cfg: &RunConfig, report: &RunReport) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut ref_cfg = cfg.clone();
    ref_cfg.faults.retain(|f| !PROCESS_FAULTS.contains(f));
    ref_cfg.crash_at_append = None;
    ref_cfg.workers = if cfg.workers == 1 { 5 } else { 1 };
    ref_cfg.seed = mix64(cfg.seed ^ 0xe2);
    ref_cfg.list_order_seed = Some(mix64(cfg.seed ^ 0x63));
    let reference = simulate(model, &ref_cfg);
    if !matches!(reference.outcome, Outcome::Finished(_)) {
        return out;
    }
    let (ev, ev_ref) = (evidence(&report.records), evidence(&reference.records));
    if ev.visibility == ev_ref.visibility && planned_blocks(&reference.events) != planned_blocks(&report.events) {
        out.push(Violation {
            invariant: "G3",
            detail: "blocks differ from a run with another worker count and listing order".into(),
        });
    }
    if expected_items(model, &ev) == expected_items(model, &ev_ref) && reference.archive != report.archive {
        let detail = match (&reference.archive, &report.archive) {
            (Some(a), Some(b)) => format!("archive differs from the reference run ({} vs {} bytes)", b.len(), a.len()),
            _ => "one of the runs has no archive".into(),
        };
        out.push(Violation { invariant: "E2", detail });
    }
    out
}

/// Runs every check on one configured run.
pub fn check_run(model: &Model, cfg: &RunConfig, check_determinism: bool) -> (Vec<Violation>, RunReport) {
    let mut report = simulate(model, cfg);
    let mut out = check_report(model, &report);
    if matches!(report.outcome, Outcome::Finished(_)) {
        out.extend(check_reference(model, cfg, &report));
    }
    // The round trip: the stored archive restored into an empty cluster (RT1–RT3).
    let restored = match (&report.outcome, &report.archive) {
        (Outcome::Finished(_), Some(archive)) => {
            let restore = crate::roundtrip::simulate_restore(model, archive, cfg);
            let expected = expected_items(model, &evidence(&report.records));
            out.extend(crate::roundtrip::check_round_trip(archive, &expected, &restore));
            Some((archive.clone(), restore))
        }
        _ => None,
    };
    report.round_trip = restored.as_ref().map(|(_, r)| crate::sim::RoundTripSummary {
        objects: r.objects.len(),
        crashes: r.crashes,
        hits: r.hits.clone(),
    });
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
        if let Some((archive, first)) = &restored {
            let second = crate::roundtrip::simulate_restore(model, archive, cfg);
            if let Some(i) = first.records.iter().zip(&second.records).position(|(a, b)| a != b).or_else(|| {
                (first.records.len() != second.records.len()).then(|| first.records.len().min(second.records.len()))
            }) {
                out.push(Violation {
                    invariant: "D1",
                    detail: format!(
                        "two restores of the same archive diverge at record {i}: {:?} vs {:?}",
                        first.records.get(i),
                        second.records.get(i)
                    ),
                });
            }
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
        round_trip: report.round_trip,
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
