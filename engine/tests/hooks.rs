//! Hook semantics of DESIGN §4 and recovery of §5, checked through the engine and the production
//! shell in the simulator's world, whose records give the order of effects. H1: pre before the
//! first write, post after the last. H2: every pod whose pre-hook started gets its post-hooks,
//! across crashes. H3: a failed Fail-mode pre-hook writes nothing of its block.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::event::{BlockOutcome, Event, HookOutcome, Phase};
use blockwise_engine::hooks::HookPhase;
use blockwise_engine::spec::BackupSpec;
use blockwise_engine::state::BackupState;
use blockwise_simulator::fixture::Observed;
use blockwise_simulator::rng::Rng;
use blockwise_simulator::sim::{Life, RUN_STEPS_MAX};
use common::{backup, cluster, cmd, Cluster, Effect, HookFault};
use serde_json::{json, Value};

fn hooked_pod(name: &str, claim: &str, on_error: &str) -> Value {
    json!({"kind": "Pod",
        "metadata": {"namespace": "db", "name": name, "annotations": {
            "pre.hook.backup.velero.io/command": format!("[\"freeze-{name}\"]"),
            "pre.hook.backup.velero.io/on-error": on_error,
            "post.hook.backup.velero.io/command": format!("[\"unfreeze-{name}\"]")}},
        "spec": {"containers": [{"name": "main"}], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]},
        "status": {"phase": "Running"}})
}

fn claim(name: &str, pv: &str) -> Value {
    json!({"kind": "PersistentVolumeClaim", "metadata": {"namespace": "db", "name": name},
           "spec": {"volumeName": pv}, "status": {"phase": "Bound"}})
}

fn pv(name: &str) -> Value {
    json!({"kind": "PersistentVolume", "metadata": {"name": name}})
}

/// Two pods sharing one claim (one block, two hook windows), a third hooked pod alone, a configmap.
fn fixture() -> Cluster {
    let objects = vec![
        hooked_pod("a", "shared", "Fail"),
        hooked_pod("b", "shared", "Fail"),
        claim("shared", "pv1"),
        pv("pv1"),
        hooked_pod("c", "own", "Fail"),
        claim("own", "pv2"),
        pv("pv2"),
        json!({"kind": "ConfigMap", "metadata": {"namespace": "db", "name": "settings"}}),
    ];
    cluster(objects)
}

/// Checks H1 on an effect trace: within each (block, attempt), no write precedes a pre-hook's
/// end and no post-hook precedes a write.
#[track_caller]
fn assert_h1(effects: &[Effect]) {
    let mut last_write: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut first_post: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut last_pre: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut first_write: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for (i, e) in effects.iter().enumerate() {
        match e {
            Effect::Write { block, attempt, .. } => {
                last_write.insert((*block, *attempt), i);
                first_write.entry((*block, *attempt)).or_insert(i);
            }
            Effect::Hook { block, attempt, phase: HookPhase::Pre, .. } => {
                last_pre.insert((*block, *attempt), i);
            }
            Effect::Hook { block, attempt, phase: HookPhase::Post, .. } => {
                first_post.entry((*block, *attempt)).or_insert(i);
            }
        }
    }
    for (k, w) in &first_write {
        if let Some(p) = last_pre.get(k) {
            assert!(p < w, "block/attempt {k:?}: a write at {w} precedes pre-hook at {p}: {effects:#?}");
        }
    }
    for (k, p) in &first_post {
        if let Some(w) = last_write.get(k) {
            assert!(w < p, "block/attempt {k:?}: post-hook at {p} precedes write at {w}");
        }
    }
}

/// Checks H2 on an effect trace: every pod with a pre-hook exec has a post-hook exec after it.
#[track_caller]
fn assert_h2(effects: &[Effect]) {
    for (i, e) in effects.iter().enumerate() {
        if let Effect::Hook { pod, phase: HookPhase::Pre, .. } = e {
            let closed = effects[i..]
                .iter()
                .any(|f| matches!(f, Effect::Hook { pod: p, phase: HookPhase::Post, .. } if p == pod));
            assert!(closed, "pod {pod}: pre-hook at effect {i} never followed by its post-hook: {effects:#?}");
        }
    }
}

fn finished_phase(events: &[Event]) -> Option<Phase> {
    events.iter().find_map(|e| if let Event::BackupFinished { phase, .. } = e { Some(*phase) } else { None })
}

#[test]
fn pre_hooks_before_writes_and_post_hooks_after_for_every_seed_and_worker_count() {
    let c = fixture();
    for seed in 1..40 {
        for workers in [1, 2, 8] {
            let run = backup(&c, BackupSpec::new("t"), workers, seed);
            assert!(run.finished, "seed {seed}: {}", run.life);
            assert_h1(&run.effects);
            assert_h2(&run.effects);
            assert_eq!(finished_phase(&run.events), Some(Phase::Completed), "seed {seed}");
            assert_eq!(run.staged.len(), 8);
        }
    }
}

#[test]
fn failing_fail_mode_pre_hook_writes_nothing_of_its_block_and_closes_open_windows() {
    let mut c = fixture();
    // Pod b's freeze fails; a's started before it (pods run in key order), so a is owed its post.
    c.hook_faults.insert(("b".into(), cmd("freeze-b")), HookFault::Exit);
    let run = backup(&c, BackupSpec::new("t"), 2, 5);
    assert!(run.finished);
    let written: BTreeSet<&str> = run.staged.keys().map(|k| k.name()).collect();
    assert_eq!(written, ["c", "own", "pv2", "settings"].into_iter().collect(), "only the other blocks are written");
    let hooks: Vec<String> = run
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Hook { pod, command, .. } if pod != "c" => Some(command.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(hooks, ["freeze-a", "freeze-b", "unfreeze-a", "unfreeze-b"]);
    assert_h2(&run.effects);
    let failed =
        run.events.iter().any(|e| matches!(e, Event::BlockFinished { outcome: BlockOutcome::Failed { .. }, .. }));
    assert!(failed);
    assert_eq!(finished_phase(&run.events), Some(Phase::PartiallyFailed));
}

#[test]
fn first_pre_hook_failing_opens_no_window_for_later_pods() {
    let mut c = fixture();
    c.hook_faults.insert(("a".into(), cmd("freeze-a")), HookFault::Error);
    let run = backup(&c, BackupSpec::new("t"), 1, 9);
    let hooks: Vec<&str> = run
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Hook { pod, command, .. } if pod != "c" => Some(command.as_str()),
            _ => None,
        })
        .collect();
    // b's freeze never started, so b is owed nothing; a's window opened, so it is closed.
    assert_eq!(hooks, ["freeze-a", "unfreeze-a"]);
}

#[test]
fn timeout_counts_as_failure_and_hang_is_cut_at_the_timeout() {
    for fault in [HookFault::Timeout, HookFault::Hang] {
        let mut c = fixture();
        c.hook_faults.insert(("c".into(), cmd("freeze-c")), fault);
        let run = backup(&c, BackupSpec::new("t"), 4, 2);
        assert!(run.finished, "{fault:?}: {}", run.life);
        assert!(
            !run.staged.keys().any(|k| k.name() == "own" || k.name() == "c" || k.name() == "pv2"),
            "{fault:?}: {:?}",
            run.staged.keys()
        );
        let timed_out = run
            .events
            .iter()
            .any(|e| matches!(e, Event::HookFinished { outcome: HookOutcome::TimedOut { timeout_ms: 30_000 }, .. }));
        assert!(timed_out, "{fault:?}");
        assert_eq!(finished_phase(&run.events), Some(Phase::PartiallyFailed));
    }
}

#[test]
fn continue_mode_failure_proceeds_and_marks_partial() {
    let mut objects: Vec<Value> = vec![hooked_pod("c", "own", "Continue"), claim("own", "pv2"), pv("pv2")];
    objects.push(json!({"kind": "ConfigMap", "metadata": {"namespace": "db", "name": "x"}}));
    let mut c = cluster(objects);
    c.hook_faults.insert(("c".into(), cmd("freeze-c")), HookFault::Exit);
    let run = backup(&c, BackupSpec::new("t"), 1, 3);
    assert_eq!(run.staged.len(), 4, "everything is written");
    assert_h1(&run.effects);
    let partial =
        run.events.iter().any(|e| matches!(e, Event::BlockFinished { outcome: BlockOutcome::PartiallyFailed, .. }));
    assert!(partial);
    assert_eq!(finished_phase(&run.events), Some(Phase::PartiallyFailed));
}

#[test]
fn invalid_hook_annotation_fails_its_block_without_an_exec() {
    let mut bad = hooked_pod("c", "own", "Fail");
    bad["metadata"]["annotations"]["pre.hook.backup.velero.io/command"] = json!("[\"unterminated");
    let c = cluster(vec![bad, claim("own", "pv2"), pv("pv2")]);
    let run = backup(&c, BackupSpec::new("t"), 1, 3);
    assert!(run.effects.is_empty(), "no exec, no write: {:?}", run.effects);
    let reason = run.events.iter().find_map(|e| match e {
        Event::HookFinished { outcome: HookOutcome::Invalid { reason }, .. } => Some(reason.clone()),
        _ => None,
    });
    assert!(reason.is_some_and(|r| r.contains("db/c") && r.contains("invalid JSON array")));
}

/// Finished blocks are never redone: no block attempt starts after its BlockFinished.
#[track_caller]
fn assert_no_block_redone(events: &[Event], what: &str) {
    let mut finished = BTreeSet::new();
    for e in events {
        match e {
            Event::BlockFinished { block, .. } => {
                finished.insert(*block);
            }
            Event::BlockStarted { block, .. } => assert!(!finished.contains(block), "{what}: block {block} redone"),
            _ => {}
        }
    }
}

/// Crash after every event index in turn, resume from the durable prefix (possibly crashing
/// again), and require the crash-free items and closed hook windows every time.
#[test]
fn crash_after_every_event_then_resume_gives_the_same_items_and_closes_windows() {
    let mut c = fixture();
    c.hook_faults.insert(("c".into(), cmd("freeze-c")), HookFault::Exit);
    let reference = backup(&c, BackupSpec::new("t"), 2, 11);
    assert!(reference.finished);
    let total = reference.events.len() as u64;
    for k in 1..total {
        let mut w = c.world(&BackupSpec::new("t"), 2, 11 + k);
        let mut rng = Rng::new(k);
        w.log.crash_after_inserts(k);
        let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
        assert!(matches!(life, Life::Crashed), "crash point {k}: {life:?}");
        w.crash(0, None, &mut rng);
        w.restart();
        // A second crash a few events later, then a final resume.
        let inserts = w.log.disk().inserts();
        w.log.crash_after_inserts(inserts + 3);
        let (mut life, _) = w.live(RUN_STEPS_MAX, |_| false);
        if matches!(life, Life::Crashed) {
            w.crash(0, None, &mut rng);
            w.restart();
            life = w.live(RUN_STEPS_MAX, |_| false).0;
        }
        let last = Observed::of(&w, &life);
        assert!(last.finished, "crash point {k}: resumed backup did not finish: {}", last.life);
        assert_eq!(last.staged, reference.staged, "crash point {k}: staged items differ");
        assert_eq!(finished_phase(&last.events), finished_phase(&reference.events), "crash point {k}");
        assert_h2(&last.effects);
        assert_no_block_redone(&last.events, &format!("crash point {k}"));
    }
}

/// A store outage (a staging write failing after the store's retries) stops the run: the backup
/// reports Failed — after closing every hook window the run had opened, so no pod stays frozen —
/// and a new process with a healthy store finishes it with the uninterrupted items.
#[test]
fn store_outage_stops_the_run_after_closing_its_windows_and_resume_finishes_it() {
    let reference = backup(&fixture(), BackupSpec::new("t"), 2, 7);
    for seed in 1..20 {
        let mut c = fixture();
        // The shared claim is in the block of pods a and b: their windows are open when it fails.
        c.write_fails.insert("shared".into());
        let mut w = c.world(&BackupSpec::new("t"), 2, seed);
        let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
        assert!(matches!(life, Life::Stopped(_)), "seed {seed}: {life:?}");
        let stopped = Observed::of(&w, &life);
        let Some(Event::RunStopped { reason, .. }) = stopped.events.last() else {
            panic!("seed {seed}: the last event must be RunStopped: {:?}", stopped.events.last())
        };
        assert!(reason.contains("staging persistentvolumeclaims db/shared failed"), "{reason}");
        let state = BackupState::fold(&stopped.events).unwrap();
        assert_eq!(state.phase(), Phase::Failed);
        assert!(state.resumable());
        assert_eq!(finished_phase(&stopped.events), None);
        // Every window opened before the stop was closed before it (regression, issue 9: the pods
        // stayed frozen until someone ran `resume`).
        let frozen =
            stopped.effects.iter().any(|e| matches!(e, Effect::Hook { pod, phase: HookPhase::Pre, .. } if pod == "a"));
        assert!(frozen, "seed {seed}: pod a's window must have opened before the write failed");
        assert_h2(&stopped.effects);

        w.restart();
        let n = stopped.events.len();
        let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
        let last = Observed::of(&w, &life);
        assert!(last.finished, "seed {seed}: {}", last.life);
        assert!(matches!(last.events[n], Event::RunResumed { .. }), "seed {seed}: {:?}", last.events[n]);
        assert_eq!(finished_phase(&last.events), Some(Phase::Completed), "seed {seed}");
        assert_eq!(last.staged, reference.staged, "seed {seed}");
        assert_h2(&last.effects);
    }
}

/// Issue 22: the API server goes away (its process gone, or hung: calls accepted and never
/// answered) right after pod a's freeze. The run stops — it does not fail: nothing is recorded
/// as an error, no hook outcome of the outage is logged — within the deadlines of virtual time;
/// the window it could not close is owed, and once the server is back `resume` unfreezes the pod
/// and ends Completed with the reference's items.
#[test]
fn an_unreachable_api_server_stops_the_run_and_resume_completes_it() {
    use blockwise_simulator::cluster::ApiOutage;
    let reference = backup(&fixture(), BackupSpec::new("t"), 2, 7);
    for outage in [ApiOutage::Gone, ApiOutage::Hung] {
        for seed in 1..12 {
            let mut c = fixture();
            c.api_outage_after = Some(("a".into(), cmd("freeze-a"), outage));
            let mut w = c.world(&BackupSpec::new("t"), 2, seed);
            let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
            let at = format!("{outage:?}, seed {seed}");
            assert!(matches!(life, Life::Stopped(_)), "{at}: {life:?}");
            let stopped = Observed::of(&w, &life);
            let Some(Event::RunStopped { reason, .. }) = stopped.events.last() else {
                panic!("{at}: the last event must be RunStopped: {:?}", stopped.events.last())
            };
            assert!(reason.contains("the cluster is unreachable"), "{at}: {reason}");
            // Nothing of the outage counted as an error that the resume then does.
            for e in &stopped.events {
                let bad = match e {
                    Event::HookFinished { outcome, .. } => !outcome.ok(),
                    Event::ItemFailed { .. }
                    | Event::FetchFailed { .. }
                    | Event::ListFailed { .. }
                    | Event::SnapshotFailed { .. }
                    | Event::SnapshotReady { error: Some(_), .. }
                    | Event::SnapshotReleased { error: Some(_), .. } => true,
                    _ => false,
                };
                assert!(!bad, "{at}: recorded as a failure: {e:?}");
            }
            assert!(BackupState::fold(&stopped.events).unwrap().resumable(), "{at}");

            w.restart();
            let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
            let last = Observed::of(&w, &life);
            assert!(last.finished, "{at}: {}", last.life);
            assert_eq!(finished_phase(&last.events), Some(Phase::Completed), "{at}");
            assert_eq!(last.staged, reference.staged, "{at}");
            // Every freeze, the one before the outage included, was followed by its unfreeze.
            assert_h2(&last.effects);
        }
    }
}

#[test]
fn failed_archive_build_stops_and_resume_builds_it_without_redoing_blocks() {
    let mut c = fixture();
    c.finalize_fails = true;
    let mut w = c.world(&BackupSpec::new("t"), 4, 3);
    let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
    let stopped = Observed::of(&w, &life);
    assert!(!stopped.finished);
    assert!(
        matches!(stopped.events.last(), Some(Event::RunStopped { reason, .. }) if reason.contains("building the archive failed") && reason.contains("gave up after 4 attempts")),
        "{:?}",
        stopped.events.last()
    );
    let state = BackupState::fold(&stopped.events).unwrap();
    assert_eq!((state.phase(), state.blocks_done()), (Phase::Failed, state.blocks.len()));

    w.restart();
    let n = stopped.events.len();
    let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
    let last = Observed::of(&w, &life);
    assert!(last.finished, "{}", last.life);
    let after: Vec<&str> = last.events[n..].iter().map(Event::kind).collect();
    assert_eq!(after, ["RunResumed", "ArchiveFinalized", "BackupFinished"]);
    assert_eq!(finished_phase(&last.events), Some(Phase::Completed));
}

#[test]
fn only_run_resumed_may_follow_run_stopped() {
    let run = backup(&fixture(), BackupSpec::new("t"), 1, 1);
    let stop = Event::RunStopped { reason: "store down".into(), at_ms: 5 };
    let mut events = vec![run.events[0].clone(), stop.clone(), run.events[1].clone()];
    let e = BackupState::fold(&events).unwrap_err();
    assert_eq!(e.seq, 2);
    assert!(e.to_string().contains("only RunResumed may follow"), "{e}");
    events[2] = Event::RunResumed { at_ms: 6 };
    let s = BackupState::fold(&events).unwrap();
    assert_eq!((s.phase(), s.stopped.clone()), (Phase::InProgress, None));
    events.push(Event::RunResumed { at_ms: 7 });
    let e = BackupState::fold(&events).unwrap_err();
    assert!(e.to_string().contains("the run did not stop"), "{e}");
    events.truncate(2);
    assert_eq!(BackupState::fold(&events).unwrap().stopped.as_deref(), Some("store down"));
}

/// Regression (issue 9): recovery sent owed post-hooks that are invalid (a malformed annotation) to
/// exec; the normal path records them `Invalid` without an exec, and so must recovery.
#[test]
fn recovery_records_invalid_owed_hooks_without_an_exec() {
    let mut pod = hooked_pod("a", "own", "Fail");
    pod["metadata"]["annotations"]["post.hook.backup.velero.io/command"] = json!("[\"unfreeze-a\"");
    let c = cluster(vec![pod, claim("own", "pv2"), pv("pv2")]);
    let reference = backup(&c, BackupSpec::new("t"), 1, 1);
    let total = reference.events.len() as u64;
    let pre_started = reference.events.iter().position(|e| matches!(e, Event::HookStarted { .. })).unwrap() as u64;
    // Crash right after each event from the pre-hook's intent on: the post-hook is owed.
    for k in pre_started + 1..total {
        let mut w = c.world(&BackupSpec::new("t"), 1, k);
        w.log.crash_after_inserts(k);
        let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
        assert!(matches!(life, Life::Crashed), "crash point {k}: {life:?}");
        w.crash(0, None, &mut Rng::new(k));
        w.restart();
        let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
        let run = Observed::of(&w, &life);
        assert!(run.finished, "crash point {k}: {}", run.life);
        let execs: Vec<&str> = run
            .effects
            .iter()
            .filter_map(|e| if let Effect::Hook { command, .. } = e { Some(command.as_str()) } else { None })
            .collect();
        assert!(execs.iter().all(|c| *c == "freeze-a"), "crash point {k}: an invalid hook was exec'd: {execs:?}");
        let invalid_post = run.events.iter().any(|e| {
            matches!(e, Event::HookFinished { hook, outcome: HookOutcome::Invalid { .. }, .. } if hook.phase == HookPhase::Post)
        });
        assert!(invalid_post, "crash point {k}: the invalid post-hook is recorded");
    }
}

/// Regression (issue 9): a get that kept failing (403 on a pulled PriorityClass) made planning issue
/// the same get forever, and one failing get failed the whole batch. Each key's get stands alone;
/// a failure is recorded once, as an error naming the object, and the backup goes on.
#[test]
fn a_get_that_keeps_failing_is_recorded_once_and_the_backup_goes_on() {
    let mut pod = hooked_pod("a", "own", "Fail");
    pod["spec"]["priorityClassName"] = json!("critical");
    let mut c = cluster(vec![pod, claim("own", "pv2"), pv("pv2")]);
    let pc = blockwise_engine::ItemKey::cluster("scheduling.k8s.io", "priorityclasses", "critical");
    let pv2 = blockwise_engine::ItemKey::cluster("", "persistentvolumes", "pv2");
    // Only namespaced resources are listed, so the claim's PV and the pod's class are fetched.
    let mut spec = BackupSpec::new("t");
    spec.included_namespaces = vec!["db".into()];
    c.get_forbidden.insert(pc.clone());
    let run = backup(&c, spec, 2, 4);
    assert!(run.finished, "{}", run.life);
    let failed: Vec<&Event> = run.events.iter().filter(|e| matches!(e, Event::FetchFailed { .. })).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        matches!(failed[0], Event::FetchFailed { key, error } if key == &pc && error.contains("403")),
        "{failed:?}"
    );
    assert!(run.staged.contains_key(&pv2), "the other get of the batch succeeded");
    assert!(!run.staged.contains_key(&pc));
    let state = BackupState::fold(&run.events).unwrap();
    assert!(
        state.errors.iter().any(|e| e.contains("priorityclasses.scheduling.k8s.io critical")),
        "{:?}",
        state.errors
    );
    assert_eq!(state.phase(), Phase::PartiallyFailed);
}

/// Regression (issue 9): a listing page was bounded by object count only, so 500 Helm-release
/// Secrets of ~150 KB made a ~75 MB record that was written but refused on read, and the backup
/// could never be described, resumed or finished. Records are bounded by bytes now.
#[test]
fn a_page_of_large_objects_is_split_into_records_that_read_back() {
    let blob = "x".repeat(150_000);
    let objects: Vec<Value> = (0..500)
        .map(|i| json!({"kind": "Secret", "metadata": {"namespace": "db", "name": format!("sh.helm.release.v1.app{i}.v1")}, "data": {"release": blob}}))
        .collect();
    let c = cluster(objects);
    let run = backup(&c, BackupSpec::new("t"), 4, 1);
    assert!(run.finished, "{}", run.life);
    assert_eq!(run.staged.len(), 500);
    let pages: Vec<usize> = run
        .events
        .iter()
        .filter_map(|e| if let Event::ResourceListed { objects, .. } = e { Some(objects.len()) } else { None })
        .filter(|n| *n > 0)
        .collect();
    assert!(pages.len() > 1 && pages.iter().sum::<usize>() == 500, "{pages:?}");
    for e in &run.events {
        let bytes = blockwise_engine::event::encode_record(e).len();
        assert!(bytes < 8 << 20, "{} record of {bytes} bytes", e.kind());
    }
}

/// Regression (issue 9): the fold accepted events for a block that had finished (a second
/// `BlockFinished`, a write after it) and counted them twice. They are a `FoldError` naming the
/// sequence number.
#[test]
fn events_after_a_block_finished_are_a_fold_error_naming_the_seq() {
    let run = backup(&fixture(), BackupSpec::new("t"), 1, 1);
    let (i, finished) = run
        .events
        .iter()
        .enumerate()
        .find(|(_, e)| matches!(e, Event::BlockFinished { .. }))
        .expect("a block finished");
    let Event::BlockFinished { block, attempt, .. } = finished.clone() else { unreachable!() };
    let key = blockwise_engine::ItemKey::namespaced("", "configmaps", "db", "settings");
    let hook = blockwise_engine::HookRef {
        pod: blockwise_engine::ItemKey::namespaced("", "pods", "db", "a"),
        phase: HookPhase::Post,
        index: 0,
    };
    for late in [
        finished.clone(),
        Event::ItemWritten { block, attempt, key: key.clone(), digest: [0; 32], bytes: 1 },
        Event::ItemFailed { block, attempt, key, error: "late".into() },
        Event::HookStarted { block, attempt, hook, at_ms: 9 },
    ] {
        let mut events = run.events[..=i].to_vec();
        events.push(late.clone());
        let e = BackupState::fold(&events).unwrap_err();
        assert_eq!(e.seq, i as u64 + 1, "{}", late.kind());
        assert!(e.to_string().contains(&format!("block {block} already finished")), "{e}");
    }
}
