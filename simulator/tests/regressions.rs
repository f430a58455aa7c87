//! Named regression tests: each shrunk failure the simulator found during development, kept as the
//! minimal cluster (or the exact seed) that showed it (sled's `failpoints_bug_NN` habit).

use std::collections::BTreeSet;

use blockwise_engine::hooks::OnError;
use blockwise_simulator::model::{Model, PodM};
use blockwise_simulator::runner::{check_run, check_seed};
use blockwise_simulator::sim::{simulate, FaultKind, Outcome, RunConfig};

fn empty_model() -> Model {
    Model {
        pods: vec![],
        pvcs: vec![],
        sas: vec![],
        configmaps: vec![],
        widgets: vec![],
        selector_app: None,
        include_ns: vec![],
        exclude_pvs: false,
        ordered_pods: vec![],
        spec_hook: None,
    }
}

/// sim_bug_01 (seed 10 of the first sweep, shrunk): a pod whose only hook is a spec pre-hook (no
/// post-hook) was reported as an H2 violation. H2 owes post-hooks only to pods that have some.
#[test]
fn sim_bug_01_pre_hook_without_post_hooks_owes_nothing() {
    let mut m = empty_model();
    m.pods.push(PodM {
        ns: 0,
        name: "p0".into(),
        phase: "Running".into(),
        claims: vec![],
        app: 1,
        hook: None,
        priority_class: None,
        excluded: false,
    });
    m.spec_hook = Some(OnError::Fail);
    for faults in [BTreeSet::new(), BTreeSet::from([FaultKind::Crash])] {
        for seed in 0..20 {
            let cfg = RunConfig { seed, faults: faults.clone(), workers: 2, crash_at_append: None, mutation: None };
            let (v, _) = check_run(&m, &cfg, false);
            assert!(v.is_empty(), "seed {seed}: {v:?}");
        }
    }
}

/// sim_bug_02 (11 seeds of a 4000-seed sweep): a crash drawn after the backup finished, then a bit
/// flip, made recovery refuse the log (correctly) while E1 compared the archive to that empty log.
/// The run must end as detected corruption naming the flipped record, with no violation.
#[test]
fn sim_bug_02_bit_flip_after_finish_is_detected_not_misjudged() {
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    // Seeds (at this commit's seed derivation) whose run builds the archive, then crashes and has
    // a stored record flipped.
    for seed in [428u64, 1170, 1708] {
        let (r, plan) = check_seed(seed, &all, false, None);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        let report = simulate(&plan.model, &plan.cfg);
        assert!(
            matches!(report.outcome, Outcome::CorruptionDetected { found, flipped } if found == flipped),
            "seed {seed} no longer reproduces the scenario: {:?}",
            report.outcome
        );
        assert!(report.archive.is_some(), "seed {seed} no longer builds the archive before the flip");
    }
}
