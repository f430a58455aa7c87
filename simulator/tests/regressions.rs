//! Named regression tests: each shrunk failure the simulator found during development, kept as the
//! minimal cluster (or the exact seed) that showed it (sled's `failpoints_bug_NN` habit).

use std::collections::BTreeSet;

use blockwise_engine::hooks::OnError;
use blockwise_simulator::model::{Model, PodM, PvcM, SpecHookM};
use blockwise_simulator::runner::{check_run, check_seed};
use blockwise_simulator::sim::{simulate, FaultKind, Outcome, RunConfig};

fn pod(ns: usize, name: &str, app: u8, claims: &[&str]) -> PodM {
    PodM {
        ns,
        name: name.into(),
        phase: "Running".into(),
        claims: claims.iter().map(|c| c.to_string()).collect(),
        app,
        hook: None,
        priority_class: None,
        excluded: false,
    }
}

/// sim_bug_01 (seed 10 of the first sweep, shrunk): a pod whose only hook is a spec pre-hook (no
/// post-hook) was reported as an H2 violation. H2 owes post-hooks only to pods that have some.
#[test]
fn sim_bug_01_pre_hook_without_post_hooks_owes_nothing() {
    let mut m = Model::empty();
    m.pods.push(pod(0, "p0", 1, &[]));
    m.spec_hook = Some(SpecHookM { on_error: OnError::Fail, pre: true, post: false });
    for faults in [BTreeSet::new(), BTreeSet::from([FaultKind::Crash])] {
        for seed in 0..20 {
            let (v, _) = check_run(&m, &RunConfig::new(seed, faults.clone(), 2), false);
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
    // Seeds (at this commit's seed derivation) whose run stores the archive, then crashes and has
    // a stored record flipped.
    for seed in [154u64, 232, 281] {
        let (r, plan) = check_seed(seed, &all, false, None);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        let report = simulate(&plan.model, &plan.cfg);
        assert!(
            matches!(report.outcome, Outcome::CorruptionDetected { found, flipped } if found == flipped),
            "seed {seed} no longer reproduces the scenario: {:?}",
            report.outcome
        );
        assert!(report.archive.is_some(), "seed {seed} no longer stores the archive before the flip");
    }
}

/// sim_bug_03 (seed 152 of the first sweep of the world-record judges, shrunk): the PersistentVolumeClaims
/// listing failed for good (more 503s than the retries allow), and the oracle expected an unlisted
/// claim to join through its volume group. A group's members are found among the objects the engine
/// knows — listed or fetched — so an unlisted, unfetched claim cannot join. The judge was wrong,
/// not the engine; the oracle now models what an action can see.
#[test]
fn sim_bug_03_an_unlisted_volume_group_member_cannot_be_pulled() {
    let mut m = Model::empty();
    m.pods.push(pod(0, "p0", 1, &["c1"]));
    let claim = |name: &str, bound: bool| PvcM {
        ns: 0,
        name: name.into(),
        bound,
        pv_missing: false,
        group: Some(1),
        deleting: false,
        app: None,
    };
    m.pvcs = vec![claim("c0", false), claim("c1", true)];
    m.world.list_unavailable.insert("persistentvolumeclaims".into(), 8);
    let faults = BTreeSet::from([FaultKind::List5xx]);
    for seed in 0..10 {
        let (v, report) = check_run(&m, &RunConfig::new(seed, faults.clone(), 2), false);
        assert!(v.is_empty(), "seed {seed}: {v:?}");
        assert!(matches!(report.outcome, Outcome::Finished(_)), "seed {seed}: {:?}", report.outcome);
    }
}

/// sim_bug_04 (seed 179, found when the judges started reading exec records): a hook's timeout
/// fired late by the length of a log flush, because the simulator polled command futures only when
/// the driver did. Commands are tasks of their own (as tokio's are), so a timeout ends its exec at
/// exactly its deadline (T1).
#[test]
fn sim_bug_04_timeouts_fire_on_time_while_the_driver_flushes() {
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    let (r, _) = check_seed(179, &all, false, None);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}
