//! The invariants of DESIGN §7, checked on a finished simulated run.
//!
//! Each check reads only what a run produced — the durable log, the effect trace, the archive —
//! plus, for G1/G2, the model's naive oracle ([`Model::oracle_blocks`]), which shares no code with
//! the engine's grouping. A violation names its invariant and says what was wrong, so a failing
//! seed reports something a person can act on.

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::event::{BlockOutcome, Event};
use blockwise_engine::grouping::BlockPlan;
use blockwise_engine::hooks::{HookPhase, OnError};
use blockwise_engine::item::ItemKey;
use serde::Serialize;

use crate::model::Model;
use crate::sim::{Effect, Outcome, RunReport};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `G1`, `H2`, …
    pub invariant: &'static str,
    /// What was wrong.
    pub detail: String,
}

fn v(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// The planned blocks recorded in a log.
pub fn planned_blocks(events: &[Event]) -> Vec<BlockPlan> {
    events
        .iter()
        .filter_map(|e| if let Event::BlockPlanned { blocks } = e { Some(blocks.clone()) } else { None })
        .flatten()
        .collect()
}

/// G1/G2: the engine's blocks equal the oracle's, item for item.
pub fn check_grouping(model: &Model, report: &RunReport) -> Vec<Violation> {
    let mut out = Vec::new();
    let blocks = planned_blocks(&report.events);
    if blocks.is_empty() && !matches!(report.outcome, Outcome::Finished(_)) {
        return out;
    }
    let mut seen: BTreeMap<&ItemKey, u32> = BTreeMap::new();
    for b in &blocks {
        for k in &b.items {
            if let Some(prev) = seen.insert(k, b.id) {
                out.push(v("G1", format!("{k} is in block {prev} and block {}", b.id)));
            }
        }
    }
    let mut got: Vec<BTreeSet<ItemKey>> = blocks.iter().map(|b| b.items.iter().cloned().collect()).collect();
    got.sort();
    let want = model.oracle_blocks();
    if got != want {
        let got_items: BTreeSet<&ItemKey> = got.iter().flatten().collect();
        let want_items: BTreeSet<&ItemKey> = want.iter().flatten().collect();
        if let Some(k) = want_items.difference(&got_items).next() {
            out.push(v("G1", format!("{k} should be in the backup but is in no block")));
        } else if let Some(k) = got_items.difference(&want_items).next() {
            out.push(v("G1", format!("{k} is in a block but should not be in the backup")));
        } else {
            let w = want.iter().find(|w| !got.contains(w)).cloned().unwrap_or_default();
            let names: Vec<String> = w.iter().map(ToString::to_string).collect();
            out.push(v("G2", format!("these items must form one block: {}", names.join(", "))));
        }
    }
    out
}

/// H1/H2/H3 on the effect trace.
pub fn check_hooks(report: &RunReport) -> Vec<Violation> {
    let mut out = Vec::new();
    let fx = &report.effects;
    let mut last_pre_end: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut first_write: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut last_write_end: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut first_post: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for (i, e) in fx.iter().enumerate() {
        match e {
            Effect::ExecEnd { block, attempt, phase: HookPhase::Pre, .. } => {
                last_pre_end.insert((*block, *attempt), i);
            }
            Effect::WriteStart { block, attempt, .. } => {
                first_write.entry((*block, *attempt)).or_insert(i);
            }
            Effect::WriteEnd { block, attempt, .. } => {
                last_write_end.insert((*block, *attempt), i);
            }
            Effect::ExecStart { block, attempt, phase: HookPhase::Post, .. } => {
                first_post.entry((*block, *attempt)).or_insert(i);
            }
            _ => {}
        }
    }
    for (k, w) in &first_write {
        if last_pre_end.get(k).is_some_and(|p| p > w) {
            out.push(v(
                "H1",
                format!("block {} attempt {}: an item was written before its pre-hooks finished", k.0, k.1),
            ));
        }
    }
    for (k, p) in &first_post {
        if last_write_end.get(k).is_some_and(|w| w > p) {
            out.push(v(
                "H1",
                format!("block {} attempt {}: a post-hook started before the last write finished", k.0, k.1),
            ));
        }
    }
    let plans: BTreeMap<u32, BlockPlan> = planned_blocks(&report.events).into_iter().map(|b| (b.id, b)).collect();
    let has_post = |block: u32, pod: &ItemKey| {
        plans.get(&block).is_some_and(|b| b.hooks.iter().any(|h| &h.pod == pod && h.phase == HookPhase::Post))
    };
    if !matches!(report.outcome, Outcome::CorruptionDetected { .. }) {
        for (i, e) in fx.iter().enumerate() {
            if let Effect::ExecStart { pod, phase: HookPhase::Pre, block, attempt } = e {
                if !has_post(*block, pod) {
                    continue;
                }
                // The window closes with a post-hook of this pod before the pod is frozen again by
                // another attempt: owed post-hooks run before the next attempt starts.
                let reopened = fx[i + 1..].iter().position(|f| {
                    matches!(f, Effect::ExecStart { pod: p, phase: HookPhase::Pre, block: b, attempt: a } if p == pod && (b, a) != (block, attempt))
                });
                let closed = fx[i + 1..]
                    .iter()
                    .position(|f| matches!(f, Effect::ExecStart { pod: p, phase: HookPhase::Post, .. } if p == pod));
                match (closed, reopened) {
                    (None, _) => out.push(v("H2", format!("{pod}: pre-hook started in block {block} attempt {attempt} but no post-hook ran after it"))),
                    (Some(c), Some(r)) if r < c => out.push(v(
                        "H2",
                        format!("{pod}: pre-hook of block {block} attempt {attempt} was not closed before the pod's next pre-hook"),
                    )),
                    _ => {}
                }
            }
        }
    }
    // H3: a Fail-mode pre-hook that failed means no write in that attempt.
    for e in &report.events {
        if let Event::HookFinished { block, attempt, hook, outcome, .. } = e {
            let fail_mode = plans.get(block).and_then(|b| {
                b.hooks.iter().find(|h| h.pod == hook.pod && h.phase == hook.phase && h.index == hook.index)
            });
            if hook.phase == HookPhase::Pre && !outcome.ok() && fail_mode.is_some_and(|h| h.on_error == OnError::Fail) {
                let wrote = fx.iter().any(
                    |f| matches!(f, Effect::WriteStart { block: b, attempt: a, .. } if b == block && a == attempt),
                );
                if wrote {
                    out.push(v(
                        "H3",
                        format!(
                            "block {block} attempt {attempt}: items written although a Fail-mode pre-hook of {} failed",
                            hook.pod
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// E1: the archive holds each item of every non-failed block exactly once, and nothing else.
pub fn check_archive(report: &RunReport) -> Vec<Violation> {
    let mut out = Vec::new();
    if matches!(report.outcome, Outcome::CorruptionDetected { .. }) {
        // Recovery refused the log (as it must): there is no readable plan to judge the archive by.
        return out;
    }
    let Some(archive) = &report.archive else {
        if matches!(report.outcome, Outcome::Finished(_)) {
            out.push(v("E1", "the backup finished without an archive".into()));
        }
        return out;
    };
    let failed: BTreeSet<u32> = report
        .events
        .iter()
        .filter_map(|e| match e {
            Event::BlockFinished { block, outcome: BlockOutcome::Failed { .. }, .. } => Some(*block),
            _ => None,
        })
        .collect();
    let mut want: BTreeSet<String> = planned_blocks(&report.events)
        .iter()
        .filter(|b| !failed.contains(&b.id))
        .flat_map(|b| b.items.iter().map(ItemKey::archive_path))
        .collect();
    let mut seen = BTreeSet::new();
    for (path, _) in archive {
        if path.contains("-preferredversion/") || path == "metadata/version" {
            continue;
        }
        if !seen.insert(path.clone()) {
            out.push(v("E1", format!("{path} is in the archive twice")));
        }
        if !want.remove(path) {
            out.push(v("E1", format!("{path} is in the archive but in no written block")));
        }
    }
    if let Some(p) = want.iter().next() {
        out.push(v("E1", format!("{p} is missing from the archive ({} missing in all)", want.len())));
    }
    out
}

/// L1 and recovery: the run reached a terminal phase, or refused exactly the corrupted record.
pub fn check_liveness(report: &RunReport) -> Vec<Violation> {
    match &report.outcome {
        Outcome::Finished(_) => Vec::new(),
        Outcome::CorruptionDetected { found, flipped } if found == flipped => Vec::new(),
        Outcome::CorruptionDetected { found, flipped } => {
            vec![v("R1", format!("bit flipped in record {flipped} but recovery blamed record {found}"))]
        }
        Outcome::Stuck(why) => vec![v("L1", why.clone())],
    }
}
