//! Hook semantics of DESIGN §4 and recovery of §5, checked through the engine with a driver that
//! records the order of effects. H1: pre before the first write, post after the last. H2: every
//! pod whose pre-hook started gets its post-hooks, across crashes. H3: a failed Fail-mode pre-hook
//! writes nothing of its block.

mod common;

use std::collections::BTreeMap;

use blockwise_engine::event::{BlockOutcome, Event, HookOutcome, Phase};
use blockwise_engine::hooks::HookPhase;
use blockwise_engine::spec::BackupSpec;
use blockwise_engine::state::BackupState;
use blockwise_engine::{Engine, EngineConfig};
use common::{backup, drive, Cluster, Effect};
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
    Cluster::from_json(&Value::Array(objects).to_string())
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
            assert!(run.finished, "seed {seed}");
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
    c.hook_outcomes.insert(("b".into(), "freeze-b".into()), HookOutcome::Exited { code: 1, output: String::new() });
    let run = backup(&c, BackupSpec::new("t"), 2, 5);
    assert!(run.finished);
    let written: std::collections::BTreeSet<&str> = run.staged.keys().map(|k| k.name.as_str()).collect();
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
    c.hook_outcomes
        .insert(("a".into(), "freeze-a".into()), HookOutcome::Errored { message: "connection reset".into() });
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
fn timeout_counts_as_failure() {
    let mut c = fixture();
    c.hook_outcomes.insert(("c".into(), "freeze-c".into()), HookOutcome::TimedOut { timeout_ms: 30_000 });
    let run = backup(&c, BackupSpec::new("t"), 4, 2);
    assert!(!run.staged.keys().any(|k| k.name == "own" || k.name == "c" || k.name == "pv2"), "{:?}", run.staged.keys());
    assert_eq!(finished_phase(&run.events), Some(Phase::PartiallyFailed));
}

#[test]
fn continue_mode_failure_proceeds_and_marks_partial() {
    let mut objects: Vec<Value> = vec![hooked_pod("c", "own", "Continue"), claim("own", "pv2"), pv("pv2")];
    objects.push(json!({"kind": "ConfigMap", "metadata": {"namespace": "db", "name": "x"}}));
    let mut c = Cluster::from_json(&Value::Array(objects).to_string());
    c.hook_outcomes.insert(("c".into(), "freeze-c".into()), HookOutcome::Exited { code: 2, output: "busy".into() });
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
    let c = Cluster::from_json(&Value::Array(vec![bad, claim("own", "pv2"), pv("pv2")]).to_string());
    let run = backup(&c, BackupSpec::new("t"), 1, 3);
    assert!(run.effects.is_empty(), "no exec, no write: {:?}", run.effects);
    let reason = run.events.iter().find_map(|e| match e {
        Event::HookFinished { outcome: HookOutcome::Invalid { reason }, .. } => Some(reason.clone()),
        _ => None,
    });
    assert!(reason.is_some_and(|r| r.contains("db/c") && r.contains("invalid JSON array")));
}

/// Crash after every event index in turn, resume from the durable prefix (possibly crashing
/// again), and require the crash-free items and closed hook windows every time.
#[test]
fn crash_after_every_event_then_resume_gives_the_same_items_and_closes_windows() {
    let mut c = fixture();
    c.hook_outcomes.insert(("c".into(), "freeze-c".into()), HookOutcome::Exited { code: 1, output: String::new() });
    let reference = backup(&c, BackupSpec::new("t"), 2, 11);
    assert!(reference.finished);
    let total = reference.events.len();
    for k in 1..total {
        let cfg = EngineConfig { workers: 2, ..EngineConfig::default() };
        let (mut effects, mut staged) = (Vec::new(), BTreeMap::new());
        let first = Engine::new(BackupSpec::new("t"), cfg.clone(), 0).unwrap();
        let crashed = drive(first, &c, Vec::new(), 11 + k as u64, Some(k), &mut effects, &mut staged);
        assert!(!crashed.finished);
        // A second crash a few events later, then a final resume.
        let again = Engine::resume(&crashed.events, cfg.clone(), 1).unwrap_or_else(|e| panic!("crash point {k}: {e}"));
        let second = drive(again, &c, crashed.events.clone(), k as u64, Some(k + 3), &mut effects, &mut staged);
        let events = second.events.clone();
        let last = if second.finished {
            second
        } else {
            let engine = Engine::resume(&events, cfg, 2).unwrap_or_else(|e| panic!("crash point {k}: {e}"));
            drive(engine, &c, events, 99, None, &mut effects, &mut staged)
        };
        assert!(last.finished, "crash point {k}: resumed backup did not finish");
        assert_eq!(last.staged, reference.staged, "crash point {k}: staged items differ");
        assert_eq!(finished_phase(&last.events), finished_phase(&reference.events), "crash point {k}");
        assert_h2(&effects);
        // Finished blocks are never redone: no block attempt starts after its BlockFinished.
        let mut finished = std::collections::BTreeSet::new();
        for e in &last.events {
            match e {
                Event::BlockFinished { block, .. } => {
                    finished.insert(*block);
                }
                Event::BlockStarted { block, .. } => {
                    assert!(!finished.contains(block), "crash point {k}: block {block} redone")
                }
                _ => {}
            }
        }
    }
}

/// A store outage (a staging write failing after the store's retries) stops the run: the backup
/// reports Failed, and `resume` with a healthy store finishes it with the uninterrupted items,
/// closing every hook window the stopped run opened.
#[test]
fn store_outage_stops_the_run_and_resume_finishes_it() {
    let reference = backup(&fixture(), BackupSpec::new("t"), 2, 7);
    for seed in 1..20 {
        let mut c = fixture();
        c.write_fails.insert("settings".into());
        let cfg = EngineConfig { workers: 2, ..EngineConfig::default() };
        let (mut effects, mut staged) = (Vec::new(), BTreeMap::new());
        let first = Engine::new(BackupSpec::new("t"), cfg.clone(), 0).unwrap();
        let stopped = drive(first, &c, Vec::new(), seed, None, &mut effects, &mut staged);
        assert!(!stopped.finished, "seed {seed}");
        let Some(Event::RunStopped { reason, .. }) = stopped.events.last() else {
            panic!("seed {seed}: the last event must be RunStopped: {:?}", stopped.events.last())
        };
        assert!(reason.contains("staging configmaps db/settings failed"), "{reason}");
        let state = BackupState::fold(&stopped.events).unwrap();
        assert_eq!(state.phase(), Phase::Failed);
        assert!(state.resumable());
        assert_eq!(finished_phase(&stopped.events), None);

        c.write_fails.clear();
        let engine = Engine::resume(&stopped.events, cfg, 1).unwrap();
        let n = stopped.events.len();
        let last = drive(engine, &c, stopped.events.clone(), seed + 100, None, &mut effects, &mut staged);
        assert!(last.finished, "seed {seed}");
        assert!(matches!(last.events[n], Event::RunResumed { .. }), "seed {seed}: {:?}", last.events[n]);
        assert_eq!(finished_phase(&last.events), Some(Phase::Completed), "seed {seed}");
        assert_eq!(last.staged, reference.staged, "seed {seed}");
        assert_h2(&effects);
    }
}

#[test]
fn failed_archive_build_stops_and_resume_builds_it_without_redoing_blocks() {
    let mut c = fixture();
    c.finalize_fails = true;
    let cfg = EngineConfig { workers: 4, ..EngineConfig::default() };
    let (mut effects, mut staged) = (Vec::new(), BTreeMap::new());
    let stopped = drive(
        Engine::new(BackupSpec::new("t"), cfg.clone(), 0).unwrap(),
        &c,
        Vec::new(),
        3,
        None,
        &mut effects,
        &mut staged,
    );
    assert!(!stopped.finished);
    assert!(
        matches!(stopped.events.last(), Some(Event::RunStopped { reason, .. }) if reason.contains("building the archive failed") && reason.contains("503")),
        "{:?}",
        stopped.events.last()
    );
    let state = BackupState::fold(&stopped.events).unwrap();
    assert_eq!((state.phase(), state.blocks_done()), (Phase::Failed, state.blocks.len()));

    c.finalize_fails = false;
    let n = stopped.events.len();
    let last = drive(
        Engine::resume(&stopped.events, cfg, 1).unwrap(),
        &c,
        stopped.events.clone(),
        4,
        None,
        &mut effects,
        &mut staged,
    );
    assert!(last.finished);
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
