//! A backup's summary: what `get` and `describe` show of it, folded from its events in memory
//! that does not grow with its objects.
//!
//! [`BackupState`] — the engine's fold — keeps every block's plan (its keys), every written item
//! and every snapshot's plan: what a run and its resume need, hundreds of megabytes at a million
//! objects. A reader that only shows the backup (`get`, `describe`, the live view a run keeps)
//! folds into a [`BackupSummary`] instead: counts, the attempts still open, the hooks' outcomes,
//! per snapshot its names and state, the warnings and errors. Both folds record the same messages
//! ([`event_message`]), and a summary made from a full fold ([`BackupSummary::of`]) equals the
//! summary folded from the same events (a test over the simulator's logs checks it).

use std::collections::{BTreeMap, BTreeSet};

use crate::event::{BlockOutcome, Event, HookOutcome, HookRef, ListUnit, Phase, Severity};
use crate::item::ItemKey;
use crate::snapshot::{BackupOptions, SnapshotPlan};
use crate::spec::BackupSpec;
use crate::state::{ArchiveInfo, BackupState, VecMap};

/// The names a message about a planned snapshot gives it.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotNames<'a> {
    /// The VolumeSnapshot (or group snapshot) planned.
    pub name: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its claims.
    pub claims: &'a [String],
}

impl<'a> SnapshotNames<'a> {
    /// The names of a snapshot plan.
    pub fn of(p: &'a SnapshotPlan) -> SnapshotNames<'a> {
        SnapshotNames { name: &p.name, namespace: &p.namespace, claims: &p.claims }
    }
}

/// The warning or error event `e` records for people, given the names of its snapshots: one text
/// for every fold of the log.
pub fn event_message<'a>(e: &Event, snapshot: impl Fn(u32) -> Option<SnapshotNames<'a>>) -> Option<(Severity, String)> {
    let error = |m: String| Some((Severity::Error, m));
    match e {
        Event::Diagnostic { severity, message } => Some((*severity, message.clone())),
        Event::ListFailed { unit, error: why } => error(format!("listing {unit} failed: {why}")),
        Event::HookFinished { block, hook, outcome, .. } if !outcome.ok() => {
            error(format!("block {block}: {:?} hook {} of {}: {outcome}", hook.phase, hook.index, hook.pod))
        }
        Event::ItemFailed { block, key, error: why, .. } => error(format!("block {block}: {key}: {why}")),
        Event::BlockFinished { block, outcome: BlockOutcome::Failed { reason }, .. } => {
            error(format!("block {block} failed: {reason}"))
        }
        Event::FetchFailed { key, error: why } => error(format!("get of {key} failed: {why}")),
        Event::SnapshotFailed { id, error: why, .. } => {
            let s = snapshot(*id)?;
            error(format!("snapshot {} of {}/{}: {why}", s.name, s.namespace, s.claims.join(",")))
        }
        Event::SnapshotReady { id, error: Some(why), .. } => {
            let s = snapshot(*id)?;
            error(format!("snapshot {} in {}: {why}", s.name, s.namespace))
        }
        Event::SnapshotReleased { id, error: Some(why), .. } => {
            let s = snapshot(*id)?;
            error(format!("releasing snapshot {} in {}: {why}", s.name, s.namespace))
        }
        _ => None,
    }
}

/// Records `message` once among `warnings` or `errors` (`seen` holds the messages of both): a
/// message repeated after a crash is recorded once. Both folds record through it.
pub(crate) fn record_once(
    seen: &mut BTreeSet<String>,
    (warnings, errors): (&mut Vec<String>, &mut Vec<String>),
    severity: Severity,
    message: String,
) {
    if seen.insert(message.clone()) {
        match severity {
            Severity::Warning => warnings.push(message),
            Severity::Error => errors.push(message),
        }
    }
}

/// A backup's phase as of now, from its terminal phase and whether its run stopped: a stopped run
/// is Failed until `resume` continues it.
pub(crate) fn phase_of(finished: Option<(Phase, u64)>, stopped: bool) -> Phase {
    match (finished, stopped) {
        (Some((p, _)), _) => p,
        (None, true) => Phase::Failed,
        (None, false) => Phase::InProgress,
    }
}

/// The phase as shown to people: Velero's phase, or `WaitingForSnapshots` while an InProgress
/// backup waits for its snapshots (`waiting`).
pub(crate) fn phase_name(phase: Phase, waiting: bool) -> String {
    if waiting {
        "WaitingForSnapshots".to_string()
    } else {
        phase.to_string()
    }
}

/// An attempt still open (its block has no outcome yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenAttempt {
    /// Its number, from 1.
    pub number: u32,
    /// The items it wrote so far.
    pub written: BTreeSet<ItemKey>,
}

/// What the summary keeps of a planned snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// The VolumeSnapshot (or group snapshot) planned.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its claims.
    pub claims: Vec<String>,
    /// Its creation was asked for.
    pub requested: bool,
    /// Cut: the members captured.
    pub members: Option<u32>,
    /// Its cut failed.
    pub failed: bool,
    /// Ready to use (`Some(true)`), or not within the timeout (`Some(false)`).
    pub ready: Option<bool>,
    /// Its cluster objects are released.
    pub released: bool,
}

/// What `get` and `describe` show of a backup (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackupSummary {
    /// The spec, once requested.
    pub spec: Option<BackupSpec>,
    /// Its options.
    pub options: BackupOptions,
    /// Workers asked for at creation.
    pub workers: u32,
    /// Request time.
    pub requested_ms: u64,
    /// Time of the latest timestamped event.
    pub last_ms: u64,
    /// Events folded.
    pub events: u64,
    /// Resource types discovered.
    pub resources: usize,
    /// Listing units, and whether each is complete.
    pub listings: BTreeMap<ListUnit, bool>,
    /// Planning is over.
    pub plan_finished: bool,
    /// Items in the plan.
    pub planned_items: u64,
    /// Items of each planned block.
    pub block_items: Vec<u32>,
    /// Blocks with an outcome.
    pub blocks_done: usize,
    /// Blocks that failed.
    pub blocks_failed: usize,
    /// Blocks that ended other than Completed.
    pub blocks_troubled: usize,
    /// Items written by the last attempts of blocks with an outcome.
    pub items_done: u64,
    /// The attempts of blocks without an outcome, by block.
    pub open: BTreeMap<u32, OpenAttempt>,
    /// The hooks that ended in each block's latest attempt, by block.
    pub hooks: BTreeMap<u32, VecMap<HookRef, HookOutcome>>,
    /// Planned snapshots, by id.
    pub snapshots: Vec<SnapshotSummary>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Errors.
    pub errors: Vec<String>,
    /// The archive, once built.
    pub archive: Option<ArchiveInfo>,
    /// Terminal phase and time.
    pub finished: Option<(Phase, u64)>,
    /// The run stopped and waits for `resume`: why.
    pub stopped: Option<String>,
    seen: BTreeSet<String>,
}

impl BackupSummary {
    /// Folds one event (in log order). Lenient: an event that does not fit (a damaged log the
    /// full fold refuses) changes what it can and nothing panics.
    pub fn push(&mut self, e: &Event) {
        self.apply(e);
        let names = |id: u32| {
            self.snapshots.get(id as usize).map(|s| SnapshotNames {
                name: &s.name,
                namespace: &s.namespace,
                claims: &s.claims,
            })
        };
        if let Some((severity, message)) = event_message(e, names) {
            record_once(&mut self.seen, (&mut self.warnings, &mut self.errors), severity, message);
        }
        self.events += 1;
    }

    fn apply(&mut self, e: &Event) {
        match e {
            Event::BackupRequested { spec, workers, at_ms } => {
                self.request(spec, BackupOptions::legacy(), *workers, *at_ms)
            }
            Event::BackupRequestedWithOptions { spec, options, workers, at_ms } => {
                self.request(spec, options.clone(), *workers, *at_ms)
            }
            Event::ResourcesDiscovered { resources } => self.resources = resources.len(),
            Event::ResourceListed { unit, complete, .. } => {
                self.listings.insert(unit.clone(), *complete);
            }
            Event::ListFailed { unit, .. } => {
                self.listings.insert(unit.clone(), true);
            }
            Event::BlockPlanned { blocks } => self.block_items.extend(blocks.iter().map(|b| b.items.len() as u32)),
            Event::PlanFinished { items, .. } => {
                self.plan_finished = true;
                self.planned_items = *items;
            }
            Event::SnapshotsPlanned { snapshots } => self.snapshots.extend(snapshots.iter().map(|p| SnapshotSummary {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                claims: p.claims.clone(),
                requested: false,
                members: None,
                failed: false,
                ready: None,
                released: false,
            })),
            Event::BlockStarted { block, attempt, at_ms } => {
                self.last_ms = *at_ms;
                self.open.insert(*block, OpenAttempt { number: *attempt, written: BTreeSet::new() });
                self.hooks.remove(block);
            }
            Event::HookStarted { at_ms, .. } => self.last_ms = *at_ms,
            Event::HookFinished { block, hook, outcome, at_ms, .. } => {
                self.last_ms = *at_ms;
                self.hooks.entry(*block).or_default().insert(hook.clone(), outcome.clone());
            }
            Event::ItemWritten { block, key, .. } => {
                if let Some(a) = self.open.get_mut(block) {
                    a.written.insert(key.clone());
                }
            }
            Event::BlockFinished { block, outcome, at_ms, .. } => {
                self.last_ms = *at_ms;
                let written = self.open.remove(block).map_or(0, |a| a.written.len());
                self.blocks_done += 1;
                self.items_done += written as u64;
                if matches!(outcome, BlockOutcome::Failed { .. }) {
                    self.blocks_failed += 1;
                }
                if !matches!(outcome, BlockOutcome::Completed) {
                    self.blocks_troubled += 1;
                }
            }
            Event::SnapshotRequested { id, at_ms, .. } => {
                self.last_ms = *at_ms;
                if let Some(s) = self.snapshots.get_mut(*id as usize) {
                    s.requested = true;
                }
            }
            Event::SnapshotCut { id, members, at_ms, .. } => {
                self.last_ms = *at_ms;
                if let Some(s) = self.snapshots.get_mut(*id as usize) {
                    s.members = Some(members.len() as u32);
                }
            }
            Event::SnapshotFailed { id, at_ms, .. } => {
                self.last_ms = *at_ms;
                if let Some(s) = self.snapshots.get_mut(*id as usize) {
                    s.failed = true;
                }
            }
            Event::SnapshotReady { id, error, at_ms } => {
                self.last_ms = *at_ms;
                if let Some(s) = self.snapshots.get_mut(*id as usize) {
                    s.ready = Some(error.is_none());
                }
            }
            Event::SnapshotReleased { id, at_ms, .. } => {
                self.last_ms = *at_ms;
                if let Some(s) = self.snapshots.get_mut(*id as usize) {
                    s.released = true;
                }
            }
            Event::ArchiveFinalized { digest, bytes, items } => {
                self.archive = Some(ArchiveInfo { digest: *digest, bytes: *bytes, items: *items });
            }
            Event::BackupFinished { phase, at_ms } => {
                self.last_ms = *at_ms;
                self.finished = Some((*phase, *at_ms));
            }
            Event::RunStopped { reason, at_ms } => {
                self.last_ms = *at_ms;
                self.stopped = Some(reason.clone());
            }
            Event::RunResumed { at_ms } => {
                self.last_ms = *at_ms;
                self.stopped = None;
            }
            Event::ItemsFetched { .. }
            | Event::Diagnostic { .. }
            | Event::ItemFailed { .. }
            | Event::FetchFailed { .. }
            | Event::VolumesInspected { .. } => {}
        }
    }

    fn request(&mut self, spec: &BackupSpec, options: BackupOptions, workers: u32, at_ms: u64) {
        self.spec = Some(spec.clone());
        self.options = options;
        self.workers = workers;
        self.requested_ms = at_ms;
        self.last_ms = at_ms;
    }

    /// The summary of a full fold: what [`BackupSummary::push`] makes of the same events.
    pub fn of(s: &BackupState) -> BackupSummary {
        BackupSummary::of_with(s, true)
    }

    /// [`BackupSummary::of`] without the snapshots' names (a snapshot's claims as that many empty
    /// names): what a live view shows, counts, without reading every snapshot's packed plan back.
    pub fn counts_of(s: &BackupState) -> BackupSummary {
        BackupSummary::of_with(s, false)
    }

    fn of_with(s: &BackupState, names: bool) -> BackupSummary {
        let open = (s.blocks.held().filter(|(_, b)| b.in_flight()))
            .filter_map(|(id, b)| {
                let a = b.attempt.as_ref()?;
                let written = s.written(b).map(|(k, _)| k.clone()).collect();
                Some((id, OpenAttempt { number: a.number, written }))
            })
            .collect();
        let hooks = (s.blocks.held())
            .filter_map(|(id, b)| Some((id, b.attempt.as_ref()?.hooks_finished.clone())))
            .filter(|(_, h)| !h.is_empty())
            .collect();
        let outcome =
            |pick: fn(&BlockOutcome) -> bool| s.blocks.iter().filter(|b| b.outcome.as_ref().is_some_and(pick)).count();
        BackupSummary {
            spec: s.spec.clone(),
            options: s.options.clone(),
            workers: s.workers,
            requested_ms: s.requested_ms,
            last_ms: s.last_ms,
            events: s.events,
            resources: s.resources.as_ref().map_or(0, Vec::len),
            listings: s.listings.iter().map(|(u, l)| (u.clone(), l.complete)).collect(),
            plan_finished: s.plan_finished,
            planned_items: s.planned_items,
            block_items: s.blocks.iter().map(|b| b.items).collect(),
            blocks_done: s.blocks_done(),
            blocks_failed: outcome(|o| matches!(o, BlockOutcome::Failed { .. })),
            blocks_troubled: outcome(|o| !matches!(o, BlockOutcome::Completed)),
            items_done: s.items_done(),
            open,
            hooks,
            snapshots: (s.snapshots.iter())
                .map(|st| {
                    let plan = match names {
                        true => s.snapshot_plan(st.plan.id).unwrap_or_default(),
                        false => {
                            SnapshotPlan { claims: vec![String::new(); st.plan.claims as usize], ..Default::default() }
                        }
                    };
                    (st, plan)
                })
                .map(|(st, plan)| SnapshotSummary {
                    name: plan.name,
                    namespace: plan.namespace,
                    claims: plan.claims,
                    requested: st.requested.is_some(),
                    members: st.cut.as_ref().map(|c| c.members),
                    failed: st.failed.is_some(),
                    ready: st.ready.as_ref().map(Result::is_ok),
                    released: st.released.is_some(),
                })
                .collect(),
            warnings: s.warnings.clone(),
            errors: s.errors.clone(),
            archive: s.archive,
            finished: s.finished,
            stopped: s.stopped.clone(),
            seen: s.warnings.iter().chain(&s.errors).cloned().collect(),
        }
    }

    /// The phase as of now: a stopped run is Failed until `resume` continues it.
    pub fn phase(&self) -> Phase {
        phase_of(self.finished, self.stopped.is_some())
    }

    /// As [`BackupState::phase_name`]: Velero's phase, or `WaitingForSnapshots`.
    pub fn phase_name(&self) -> String {
        let waiting = self.finished.is_none()
            && self.stopped.is_none()
            && self.plan_finished
            && self.blocks_done == self.block_items.len()
            && self.snapshots.iter().any(|s| s.requested && !s.released);
        phase_name(self.phase(), waiting)
    }

    /// Blocks planned.
    pub fn blocks(&self) -> usize {
        self.block_items.len()
    }
}
