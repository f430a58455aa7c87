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

/// Replays a shrunk failure: the cluster `model_json` (as `simulate` prints it) under the run
/// configuration of `seed` with `faults` (crash schedule, workers, listing order, latencies).
fn replay(seed: u64, faults: &str, model_json: &str) -> (Vec<blockwise_simulator::check::Violation>, Outcome) {
    let faults: BTreeSet<FaultKind> =
        faults.split(',').map(|f| FaultKind::parse(f).unwrap_or_else(|| panic!("fault {f}"))).collect();
    let model: Model = serde_json::from_str(model_json).expect("a shrunk cluster");
    let cfg = plan_seed(seed, &faults, None).cfg;
    let (v, report) = check_run(&model, &cfg, false);
    (v, report.outcome)
}

/// sim_bug_05 (seed 31 of the first sweep with snapshots, shrunk to one claim): the snapshots were
/// released (Retain, then their objects deleted) before their `SnapshotCut` facts were durable; a
/// crash that lost the unflushed tail left a log saying "requested, not cut", and the resumed cut
/// created the snapshot a second time, whose content then went into the archive beside a snapshot
/// no longer kept (E1; S3 in other seeds). The release now waits for every earlier fact to be
/// durable. Replayed exactly; and every crash point of a one-claim cluster is tried.
#[test]
fn sim_bug_05_snapshots_are_released_only_after_their_facts_are_durable() {
    let faults = "crash,lost-unflushed,torn-record,hook-error,hook-timeout,list-5xx,list-410,deleted-before-get,\
                  get-error,slow-worker,clock-jump,cluster-change,snapshot-never-ready,group-partial,crds-absent";
    let (v, outcome) = replay(31, faults, SIM_BUG_05);
    assert!(v.is_empty(), "{v:?}");
    assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");

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

const SIM_BUG_05: &str = r#"{"configmaps":[[0,"cm0"]],"csi":{"class":true,"crds":true,"group_class":true,"groups":false},"exclude_label":[],"exclude_ns":[],"exclude_pvs":false,"include_cluster_resources":null,"include_ns":[],"ordered_pods":[],"pods":[],"pvcs":[{"app":null,"bound":true,"deleting":false,"group":null,"name":"c0","not_csi":false,"ns":0,"pv_missing":false}],"sas":[],"selector_app":null,"snapshot_volumes":null,"spec_hook":null,"widgets":[[0,"w0"]],"world":{"delete_pods":[],"get_forbidden":[],"hook_faults":{},"list_throttled":[],"list_unavailable":{"pods":6},"rename_containers":[],"slow_snapshots":[],"snapshot_faults":{}}}"#;

/// sim_bug_06 (seed 347 of the sweep with whole volume groups, shrunk to one group of two claims):
/// when the group's members were there at the first look, the group snapshot was released as it
/// was read at its creation — not yet bound to its content — so its content was never set to
/// Retain, and deleting the group deleted the members' storage; a resumed attempt then cut the
/// group again (E1, S2, S3). The group is now read again, bound, before it goes.
#[test]
fn sim_bug_06_a_group_content_is_retained_before_the_group_is_deleted() {
    let faults = "crash,hook-exit,hook-error,list-429,list-410,deleted-before-get,get-error,store-write-failure,\
                  store-outage,clock-jump,snapshot-slow,snapshot-error,snapshot-never-ready,group-partial";
    let (v, outcome) = replay(347, faults, SIM_BUG_06);
    assert!(v.is_empty(), "{v:?}");
    assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
}

const SIM_BUG_06: &str = r#"{"configmaps":[],"csi":{"class":true,"crds":true,"group_class":true,"groups":true},"exclude_label":[],"exclude_ns":[],"exclude_pvs":false,"include_cluster_resources":null,"include_ns":[],"ordered_pods":[],"pods":[],"pvcs":[{"app":null,"bound":true,"deleting":false,"group":0,"name":"c0","not_csi":false,"ns":2,"pv_missing":false},{"app":null,"bound":true,"deleting":false,"group":0,"name":"c3","not_csi":false,"ns":2,"pv_missing":false}],"sas":[],"selector_app":null,"snapshot_volumes":true,"spec_hook":null,"widgets":[],"world":{"delete_pods":[],"get_forbidden":[],"hook_faults":{},"list_throttled":["persistentvolumes"],"list_unavailable":{},"rename_containers":[],"slow_snapshots":["c3"],"snapshot_faults":{}}}"#;

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

/// sim_bug_08 (seed 1030 once partial groups were drawn more often, shrunk): a partial group cut
/// leaves out one claim its label selects — here a claim outside the backup, whose listing failed —
/// and the backup still captured every claim it needed; the model said the whole group fails (E1, a
/// checker fix). The model now fails the group only when the claim left out is one the backup needs.
#[test]
fn sim_bug_08_a_partial_group_missing_only_an_unneeded_claim_still_captures() {
    let faults = "crash,lost-unflushed,torn-record,hook-exit,hook-error,hook-timeout,list-5xx,list-429,list-410,\
                  deleted-before-get,store-write-failure,store-outage,clock-jump,cluster-change,snapshot-error,\
                  group-partial";
    let (v, outcome) = replay(1030, faults, SIM_BUG_08);
    assert!(v.is_empty(), "{v:?}");
    assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
}

const SIM_BUG_08: &str = r#"{"configmaps":[],"csi":{"class":true,"crds":true,"group_class":true,"groups":true},"exclude_label":[],"exclude_ns":[],"exclude_pvs":false,"include_cluster_resources":null,"include_ns":[],"ordered_pods":[],"pods":[{"app":1,"claims":["c7","c2"],"excluded":false,"hook":null,"name":"p9","ns":0,"phase":"Running","priority_class":null},{"app":1,"claims":["c0"],"excluded":false,"hook":null,"name":"p10","ns":0,"phase":"Succeeded","priority_class":null}],"pvcs":[{"app":null,"bound":true,"deleting":false,"group":0,"name":"c0","not_csi":false,"ns":0,"pv_missing":false},{"app":null,"bound":true,"deleting":false,"group":0,"name":"c2","not_csi":false,"ns":0,"pv_missing":false},{"app":null,"bound":true,"deleting":false,"group":0,"name":"c3","not_csi":false,"ns":0,"pv_missing":false}],"sas":[],"selector_app":null,"snapshot_volumes":null,"spec_hook":null,"widgets":[],"world":{"delete_pods":[],"get_forbidden":[],"hook_faults":{},"list_throttled":["persistentvolumeclaims"],"list_unavailable":{"persistentvolumeclaims":7},"rename_containers":[],"slow_snapshots":[],"snapshot_faults":{"c0":"Error","c10":"Error","c11":"Error","c13":"Error","group:ns0/g0":"Partial"}}}"#;

/// The failure line's `reproduce:` command names only the faults the seed enabled; until a seed's
/// fault draw stopped depending on which faults were allowed, that command replayed a different
/// run (found replaying seed 31 of sim_bug_05). For many seeds, planning under the enabled faults
/// alone must give exactly the plan found under all of them.
#[test]
fn the_reproduce_line_replays_the_seed_it_names() {
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    for seed in 0..300 {
        let found = plan_seed(seed, &all, None);
        let replayed = plan_seed(seed, &found.cfg.faults, None);
        assert_eq!(found.model, replayed.model, "seed {seed}");
        assert_eq!(format!("{:?}", found.cfg), format!("{:?}", replayed.cfg), "seed {seed}");
    }
}
