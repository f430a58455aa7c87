//! Named regression tests: each shrunk failure the simulator found during development, kept as the
//! minimal cluster (or the exact seed) that showed it (sled's `failpoints_bug_NN` habit).

use std::collections::BTreeSet;

use blockwise_engine::hooks::{HookPhase, OnError};
use blockwise_simulator::model::{hook_fault_key, CsiM, HookFault, HookM, Model, PodM, PvcM, SpecHookM};
use blockwise_simulator::runner::{check_run, check_seed, plan_seed};
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
/// Such a run must end as detected corruption naming the flipped record, with no violation. The
/// seeds that reproduce the scenario depend on the seed derivation, so they are found, not listed.
#[test]
fn sim_bug_02_bit_flip_after_finish_is_detected_not_misjudged() {
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    let mut found = 0;
    for seed in 0..2500u64 {
        let plan = plan_seed(seed, &all, None);
        let report = simulate(&plan.model, &plan.cfg);
        let flipped_after_archive =
            matches!(report.outcome, Outcome::CorruptionDetected { .. }) && report.archive.is_some();
        if !flipped_after_archive {
            continue;
        }
        found += 1;
        assert!(
            matches!(report.outcome, Outcome::CorruptionDetected { found, flipped } if found == flipped),
            "seed {seed}: {:?}",
            report.outcome
        );
        let (r, _) = check_seed(seed, &all, false, None);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
    assert!(found >= 2, "only {found} seeds stored the archive and then had a record flipped");
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
        not_csi: false,
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

/// sim_bug_04 (seed 179 of the first sweep with exec records): a hook's timeout fired late by the
/// length of a log flush, because the simulator polled command futures only when the driver did.
/// Commands are tasks of their own (as tokio's are), so a timeout ends its exec at exactly its
/// deadline (T1) while other blocks keep the driver busy flushing.
#[test]
fn sim_bug_04_timeouts_fire_on_time_while_the_driver_flushes() {
    // Two pods whose freezes hang, started together, so their timeouts fall due at the same
    // instant; the first to fire makes the driver commit (flush and sync barrier) while the second
    // is due.
    let mut m = Model::empty();
    for name in ["p0", "p1"] {
        let mut hooked = pod(0, name, 0, &[]);
        hooked.hook =
            Some(HookM { on_error: OnError::Fail, on_error_set: true, malformed: false, pre: true, post: true });
        m.pods.push(hooked);
        m.world.hook_faults.insert(hook_fault_key(name, HookPhase::Pre), HookFault::Hang);
    }
    m.configmaps = (0..40).map(|i| (0, format!("cm{i}"))).collect();
    let faults = BTreeSet::from([FaultKind::HookHang]);
    for seed in 0..10 {
        let (v, _) = check_run(&m, &RunConfig::new(seed, faults.clone(), 4), false);
        assert!(v.is_empty(), "seed {seed}: {v:?}");
    }
}

/// A model whose cluster serves the snapshot API with both classes.
fn csi_model() -> Model {
    let mut m = Model::empty();
    m.csi = CsiM { crds: true, groups: true, class: true, group_class: true };
    m
}

fn claim(ns: usize, name: &str, group: Option<u8>) -> PvcM {
    PvcM { ns, name: name.into(), bound: true, pv_missing: false, group, deleting: false, app: None, not_csi: false }
}

/// sim_bug_05 (seed 1132 of the first sweep with snapshots, shrunk to one claim): the snapshots were
/// released (Retain, then their objects deleted) before their `SnapshotCut` facts were durable; a
/// crash that lost the unflushed tail left a log saying "requested, not cut", and the resumed cut
/// created the snapshot a second time — two survived (S3). Every crash point is tried here.
#[test]
fn sim_bug_05_snapshots_are_released_only_after_their_facts_are_durable() {
    let mut m = csi_model();
    m.pvcs.push(claim(0, "c0", None));
    let faults = BTreeSet::from([FaultKind::Crash, FaultKind::LostUnflushed]);
    let reference = simulate(&m, &RunConfig::new(1, BTreeSet::new(), 1));
    let appends = reference.events.len() as u64;
    assert!(appends > 10, "{appends}");
    for n in 1..=appends + 2 {
        let mut cfg = RunConfig::new(n, faults.clone(), 1);
        cfg.crash_at_append = Some(n);
        let (v, report) = check_run(&m, &cfg, false);
        assert!(v.is_empty(), "crash after append {n}: {v:?}");
        assert!(matches!(report.outcome, Outcome::Finished(_)), "crash after append {n}: {:?}", report.outcome);
    }
}

/// sim_bug_06 (seed 347 of the sweep with whole volume groups): when the group's members were there
/// at the first look, the group snapshot was released as it was read at its creation — not yet bound
/// to its content — so its content was never set to Retain, and deleting the group deleted the
/// members' storage (S2, S3). The group is now read again, bound, before it goes.
#[test]
fn sim_bug_06_a_group_content_is_retained_before_the_group_is_deleted() {
    let mut m = csi_model();
    m.pvcs = vec![claim(0, "c0", Some(0)), claim(0, "c1", Some(0))];
    m.pods.push(pod(0, "p0", 1, &["c0", "c1"]));
    for seed in 0..20 {
        let (v, _) = check_run(&m, &RunConfig::new(seed, BTreeSet::new(), 2), false);
        assert!(v.is_empty(), "seed {seed}: {v:?}");
    }
}

/// sim_bug_07 (seed 1030, shrunk): the claims listing failed for good, so the engine knew only the
/// volume-group members its pods pulled and snapshotted the group; the group's selector also picked
/// a member outside the backup, which the engine deleted after detaching it — and the fake
/// controller, unlike the real one, kept the content of a snapshot deleted without finalizers
/// (a left-over content, S3). The fake now deletes a `Delete`-policy content whose snapshot is gone.
#[test]
fn sim_bug_07_an_extra_group_member_is_deleted_with_its_content() {
    let mut m = csi_model();
    m.pvcs = vec![claim(0, "c0", Some(0)), claim(0, "c1", Some(0)), claim(0, "c2", Some(0))];
    m.pods.push(pod(0, "p0", 1, &["c0", "c1"]));
    m.world.list_unavailable.insert("persistentvolumeclaims".into(), 8);
    let faults = BTreeSet::from([FaultKind::List5xx]);
    for seed in 0..10 {
        let (v, report) = check_run(&m, &RunConfig::new(seed, faults.clone(), 2), false);
        assert!(v.is_empty(), "seed {seed}: {v:?}");
        assert!(report.leftover.is_empty(), "seed {seed}: {:?}", report.leftover);
    }
}
