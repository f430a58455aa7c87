//! The controllers' decisions, pure (DESIGN §8a, issue 21): what the Backup and Restore
//! controllers of `blockwise serve` do with an object, as functions of what they see — the object,
//! what its log says, the runs this process ended ([`RunRegistry`]) and the clock — so that the
//! shell (`adapters/src/serve/`) only performs the step and reports back, and a simulator can call
//! the same functions.
//!
//! - [`RunRegistry`]: the runs a controller process ended — terminal (whatever a stale cache
//!   says) or stopped by an outage and due again at an instant — bounded by pruning against the
//!   objects that still exist.
//! - [`backup_step`] (and [`restore_step`]): one look at a Backup — ignore, put the finalizer on, wait for the run's end
//!   before a deletion, delete, wait for a retry, or run — and [`deletion_step`]: whether an
//!   unfinished log is finished before a deletion.
//! - [`queue_position`]: Velero 1.18's queue over plain data; [`retry_backoff_ms`].
//!
//! What it rules out: a decision that reads the API, the disk or a clock. Not yet here (issue 21
//! goes on): the Restore controller's and the Schedule controller's looks, and the service world
//! that drives them in `blockwise simulate`.

use std::collections::BTreeMap;

/// A run's Backup or Restore: namespace, name, uid.
pub type RunId = (String, String, String);

/// How a run of this process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// In a terminal phase.
    Terminal,
    /// Stopped by an outage (the store, the log, the API server) after `stops` stops in a row;
    /// run again from its log at `retry_at_ms`.
    Stopped {
        /// Stops in a row.
        stops: u32,
        /// When it is due again.
        retry_at_ms: i64,
    },
    /// Never ran: its log could not be opened because another process holds it (a paused
    /// leader's run, whose Lease this process took) — tried again at `retry_at_ms`, as a stopped
    /// run is, but nothing of it ended here.
    Refused {
        /// Stops and refusals in a row.
        stops: u32,
        /// When it is tried again.
        retry_at_ms: i64,
    },
}

impl RunEnd {
    /// Whether a run of it went on in this process and ended (a refused open is none).
    pub fn ran(&self) -> bool {
        !matches!(self, RunEnd::Refused { .. })
            || crate::mutation::active(crate::mutation::Mutation::RefusalCountsAsRun)
    }

    /// Stops (and refusals) in a row so far; 0 after a terminal end.
    pub fn stops(&self) -> u32 {
        match self {
            RunEnd::Terminal => 0,
            RunEnd::Stopped { stops, .. } | RunEnd::Refused { stops, .. } => *stops,
        }
    }
}

/// The runs a controller process ended (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRegistry {
    ended: BTreeMap<RunId, RunEnd>,
}

impl RunRegistry {
    /// How the run of `id` ended here, if it did.
    pub fn end_of(&self, id: &RunId) -> Option<RunEnd> {
        self.ended.get(id).copied()
    }

    /// Records how the run of `id` ended; the previous record, if any.
    pub fn record(&mut self, id: RunId, end: RunEnd) -> Option<RunEnd> {
        self.ended.insert(id, end)
    }

    /// Forgets the run of `id` (its end is shown by the cache now).
    pub fn forget(&mut self, id: &RunId) {
        self.ended.remove(id);
    }

    /// Keeps only what a stale cache could still contradict, or a stop to retry: `seen(id)` is
    /// `None` when the object is gone, else whether the cache already shows a terminal phase.
    pub fn prune(&mut self, seen: impl Fn(&RunId) -> Option<bool>) {
        self.ended.retain(|id, end| match seen(id) {
            None => false,
            Some(terminal) => matches!(end, RunEnd::Stopped { .. } | RunEnd::Refused { .. }) || !terminal,
        });
    }

    /// Runs remembered.
    pub fn len(&self) -> usize {
        self.ended.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.ended.is_empty()
    }
}

/// The longest wait between two retries of a stopped run.
pub const RETRY_BACKOFF_MS_MAX: i64 = 300_000;

/// The wait before running again after the `stops`-th stop in a row: 2 s, doubling, at most
/// [`RETRY_BACKOFF_MS_MAX`].
pub fn retry_backoff_ms(stops: u32) -> i64 {
    let ms = 2_000i64.saturating_mul(1i64 << stops.saturating_sub(1).min(20));
    ms.min(RETRY_BACKOFF_MS_MAX)
}

/// What one look at a Backup sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLook<'a> {
    /// In a namespace the controller acts in (its own or a tenant's).
    pub in_scope: bool,
    /// It has a deletionTimestamp.
    pub deleting: bool,
    /// It carries the controller's finalizer.
    pub finalizer: bool,
    /// `status.phase`, as cached.
    pub phase: Option<&'a str>,
    /// Its run goes on in this process now.
    pub running_here: bool,
    /// How its last run in this process ended.
    pub end: Option<RunEnd>,
    /// Now.
    pub now_ms: i64,
}

/// What the controller does after one look at a Backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupStep {
    /// Nothing until it changes: not ours, or ended.
    Ignore,
    /// Put the finalizer on; `mark_new`: and the `New` phase (it has none yet).
    AddFinalizer {
        /// Also set `status.phase: New`.
        mark_new: bool,
    },
    /// Being deleted while its run goes on here: the run's end wakes it (Velero refuses to delete
    /// a backup in progress; cut short, the run would leave a pod frozen).
    AwaitRunEnd,
    /// Being deleted and not running here: see [`deletion_step`].
    Delete,
    /// A stopped run's backoff has not passed: look again then.
    RetryAt(i64),
    /// Validate, queue and run (or resume) it; `stops`: its stops in a row so far.
    Run {
        /// Stops in a row (0: no retry).
        stops: u32,
    },
}

/// Whether a phase is terminal (Velero's names).
pub fn is_terminal_phase(phase: &str) -> bool {
    matches!(phase, "Completed" | "PartiallyFailed" | "Failed" | "FailedValidation")
}

/// One look at a Backup (see [`BackupStep`]).
pub fn backup_step(look: &BackupLook<'_>) -> BackupStep {
    if !look.in_scope {
        return BackupStep::Ignore;
    }
    if look.deleting {
        if !look.finalizer {
            return BackupStep::Ignore;
        }
        let cut_short = crate::mutation::active(crate::mutation::Mutation::DeleteCutsRunShort);
        return if look.running_here && !cut_short { BackupStep::AwaitRunEnd } else { BackupStep::Delete };
    }
    if !look.finalizer {
        return BackupStep::AddFinalizer { mark_new: look.phase.is_none() };
    }
    if look.phase.is_some_and(is_terminal_phase) || look.running_here || look.end == Some(RunEnd::Terminal) {
        return BackupStep::Ignore;
    }
    let never_retried = crate::mutation::active(crate::mutation::Mutation::StoppedRunsNeverRetried);
    match look.end {
        Some(RunEnd::Stopped { .. } | RunEnd::Refused { .. }) if never_retried => BackupStep::Ignore,
        // A retry instant further ahead than the longest backoff means the clock went back since
        // the stop: the run is due (it would otherwise wait out the jump).
        Some(RunEnd::Stopped { retry_at_ms, .. } | RunEnd::Refused { retry_at_ms, .. })
            if look.now_ms < retry_at_ms
                && (retry_at_ms - look.now_ms <= RETRY_BACKOFF_MS_MAX
                    || crate::mutation::active(crate::mutation::Mutation::RetryTrustsTheClock)) =>
        {
            BackupStep::RetryAt(retry_at_ms)
        }
        Some(RunEnd::Stopped { stops, .. } | RunEnd::Refused { stops, .. }) => BackupStep::Run { stops },
        _ => BackupStep::Run { stops: 0 },
    }
}

/// One look at a Restore: as a Backup's, without a finalizer (deleting a Restore leaves what it
/// restored, as Velero does: nothing to wait for, nothing to delete).
pub fn restore_step(look: &BackupLook<'_>) -> BackupStep {
    if look.deleting {
        return BackupStep::Ignore;
    }
    backup_step(&BackupLook { finalizer: true, ..look.clone() })
}

/// What a Backup's log says, for a deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLook {
    /// The log is this Backup's (same uid), not an earlier one's of the same name.
    pub same_uid: bool,
    /// It reached a terminal phase.
    pub finished: bool,
    /// Its run stopped on an outage (its windows are closed).
    pub stopped: bool,
}

/// What a deletion does first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletionStep {
    /// Run the unfinished log to its end first (owed post-hooks, snapshots cut and released):
    /// a killed controller left it running.
    FinishRunFirst,
    /// Delete now: its snapshots, files and log.
    DeleteNow,
}

/// Whether a Backup being deleted (and not running here) has its log finished first: only a log
/// of this Backup, neither finished nor stopped, whose run has not already ended in this process
/// (a run that cannot go on must not hold the deletion forever).
pub fn deletion_step(log: Option<LogLook>, ended_here: bool) -> DeletionStep {
    if crate::mutation::active(crate::mutation::Mutation::DeletionSkipsUnfinishedLog) {
        return DeletionStep::DeleteNow;
    }
    match log {
        Some(l) if l.same_uid && !l.finished && !l.stopped && !ended_here => DeletionStep::FinishRunFirst,
        _ => DeletionStep::DeleteNow,
    }
}

/// Whether two Backups' included namespaces may overlap: every namespace (empty) or a glob
/// overlaps everything; otherwise the names must meet.
pub fn namespaces_overlap(a: &[String], b: &[String]) -> bool {
    let all = |n: &[String]| n.is_empty() || n.iter().any(|x| x.contains('*'));
    all(a) || all(b) || a.iter().any(|x| b.contains(x))
}

/// A Backup as the queue sees it (from the controller's cache, its running set, its registry and
/// the log locks of the data volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry<'a> {
    /// (namespace, name).
    pub key: (&'a str, &'a str),
    /// In a namespace the controller acts in: a Backup outside (in the cache of a controller that
    /// watches every namespace for its tenants) never runs, and holds nothing back.
    pub in_scope: bool,
    /// `status.phase`.
    pub phase: Option<&'a str>,
    /// It has a deletionTimestamp.
    pub deleting: bool,
    /// Its creation, in milliseconds.
    pub created_ms: i64,
    /// The namespaces it covers: its run's (tenant-scoped) when running here, else its spec's.
    pub namespaces: &'a [String],
    /// Its run goes on in this process.
    pub running_here: bool,
    /// Another process holds its log: a paused leader's run, going on until that process ends.
    pub running_elsewhere: bool,
    /// Its run ended in this process in a terminal phase (the cache may not show it yet); one
    /// stopped or refused is still to run, and keeps its place.
    pub ended_here: bool,
}

/// Whether the Backup `mine` (covering `includes`) must wait, and at which position: the runs
/// here and elsewhere (another process's, its log lock shows), and the Backups created before it
/// still to run — one stopped or refused keeps its place; one being deleted waits for nothing
/// unless it was started (its run is finished first); one outside the controller's namespaces
/// never runs — fed to [`queue_position`].
pub fn queue_wait(
    mine: &QueueEntry<'_>,
    includes: &[String],
    all: &[QueueEntry<'_>],
    concurrent_max: usize,
) -> Option<u32> {
    let elsewhere_counts = !crate::mutation::active(crate::mutation::Mutation::QueueIgnoresOtherProcesses);
    let running: Vec<&[String]> = all
        .iter()
        .filter(|e| e.key != mine.key && (e.running_here || (e.running_elsewhere && elsewhere_counts)))
        .map(|e| e.namespaces)
        .collect();
    // Creation order, names breaking ties (creation timestamps have a second's resolution).
    let me = (mine.created_ms, mine.key);
    let earlier: Vec<&[String]> = all
        .iter()
        .filter(|e| {
            e.key != mine.key
                && (e.in_scope || crate::mutation::active(crate::mutation::Mutation::QueueCountsStrangers))
                && (!e.deleting || e.phase == Some("InProgress"))
                && !e.phase.is_some_and(is_terminal_phase)
                && !e.running_here
                && !e.running_elsewhere
                && !e.ended_here
                && (e.created_ms, e.key) < me
        })
        .map(|e| e.namespaces)
        .collect();
    queue_position(includes, &running, &earlier, concurrent_max)
}

/// Velero 1.18's queue: `Some(position)` when a Backup of `mine` (its included namespaces) must
/// wait — `running` runs are at `concurrent_max` already, or one of them, or one of the `earlier`
/// waiting Backups (created before it), may overlap it — its position being 1 + the earlier ones.
pub fn queue_position(
    mine: &[String],
    running: &[&[String]],
    earlier: &[&[String]],
    concurrent_max: usize,
) -> Option<u32> {
    let full = running.len() >= concurrent_max.max(1);
    let ignore = crate::mutation::active(crate::mutation::Mutation::QueueIgnoresOverlap);
    let overlaps = |others: &[&[String]]| !ignore && others.iter().any(|o| namespaces_overlap(o, mine));
    (full || overlaps(running) || overlaps(earlier)).then(|| earlier.len() as u32 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(phase: Option<&str>) -> BackupLook<'_> {
        BackupLook {
            in_scope: true,
            deleting: false,
            finalizer: true,
            phase,
            running_here: false,
            end: None,
            now_ms: 10_000,
        }
    }

    #[track_caller]
    fn check(l: BackupLook<'_>, expected: BackupStep) {
        assert_eq!(backup_step(&l), expected, "{l:?}");
    }

    #[test]
    fn one_look_at_a_backup() {
        check(BackupLook { in_scope: false, ..look(None) }, BackupStep::Ignore);
        check(BackupLook { finalizer: false, ..look(None) }, BackupStep::AddFinalizer { mark_new: true });
        check(BackupLook { finalizer: false, ..look(Some("Queued")) }, BackupStep::AddFinalizer { mark_new: false });
        check(look(None), BackupStep::Run { stops: 0 });
        check(look(Some("InProgress")), BackupStep::Run { stops: 0 });
        check(look(Some("Completed")), BackupStep::Ignore);
        check(BackupLook { running_here: true, ..look(Some("InProgress")) }, BackupStep::Ignore);
        // Ended here while the cache still shows it running: not run again.
        check(BackupLook { end: Some(RunEnd::Terminal), ..look(Some("InProgress")) }, BackupStep::Ignore);
        // Stopped: retried once its backoff has passed.
        let stopped = |at| Some(RunEnd::Stopped { stops: 2, retry_at_ms: at });
        check(BackupLook { end: stopped(12_000), ..look(Some("InProgress")) }, BackupStep::RetryAt(12_000));
        check(BackupLook { end: stopped(10_000), ..look(Some("InProgress")) }, BackupStep::Run { stops: 2 });
        // The clock went back an hour since the stop: due now, not in an hour.
        check(BackupLook { end: stopped(3_610_000), ..look(Some("InProgress")) }, BackupStep::Run { stops: 2 });
        check(
            BackupLook { end: stopped(10_000 + RETRY_BACKOFF_MS_MAX), ..look(Some("InProgress")) },
            BackupStep::RetryAt(10_000 + RETRY_BACKOFF_MS_MAX),
        );
    }

    #[test]
    fn one_look_at_a_restore() {
        assert_eq!(restore_step(&BackupLook { finalizer: false, ..look(None) }), BackupStep::Run { stops: 0 });
        assert_eq!(restore_step(&BackupLook { deleting: true, ..look(Some("InProgress")) }), BackupStep::Ignore);
        let stopped = Some(RunEnd::Stopped { stops: 1, retry_at_ms: 20_000 });
        assert_eq!(restore_step(&BackupLook { end: stopped, ..look(Some("InProgress")) }), BackupStep::RetryAt(20_000));
        assert_eq!(restore_step(&look(Some("Failed"))), BackupStep::Ignore);
    }

    #[test]
    fn a_deleted_backup_waits_for_its_run_and_an_unfinished_log_is_finished_first() {
        let deleting = BackupLook { deleting: true, ..look(Some("InProgress")) };
        check(BackupLook { running_here: true, ..deleting.clone() }, BackupStep::AwaitRunEnd);
        check(deleting.clone(), BackupStep::Delete);
        check(BackupLook { finalizer: false, ..deleting }, BackupStep::Ignore);
        let log = |same_uid, finished, stopped| Some(LogLook { same_uid, finished, stopped });
        assert_eq!(deletion_step(log(true, false, false), false), DeletionStep::FinishRunFirst);
        assert_eq!(deletion_step(log(true, false, false), true), DeletionStep::DeleteNow, "ended here: no loop");
        assert_eq!(deletion_step(log(true, true, false), false), DeletionStep::DeleteNow);
        assert_eq!(deletion_step(log(true, false, true), false), DeletionStep::DeleteNow, "a stop closed its windows");
        assert_eq!(deletion_step(log(false, false, false), false), DeletionStep::DeleteNow, "an earlier Backup's log");
        assert_eq!(deletion_step(None, false), DeletionStep::DeleteNow);
    }

    #[test]
    fn the_registry_forgets_what_is_gone_or_shown_and_keeps_stops() {
        let id = |n: &str| ("ns".to_string(), n.to_string(), format!("uid-{n}"));
        let mut r = RunRegistry::default();
        r.record(id("shown"), RunEnd::Terminal);
        r.record(id("stale"), RunEnd::Terminal);
        r.record(id("gone"), RunEnd::Terminal);
        r.record(id("stopped"), RunEnd::Stopped { stops: 1, retry_at_ms: 5 });
        r.prune(|x| match x.1.as_str() {
            "shown" => Some(true),
            "stale" | "stopped" => Some(false),
            _ => None,
        });
        assert_eq!(r.len(), 2);
        assert_eq!(r.end_of(&id("stale")), Some(RunEnd::Terminal));
        assert!(r.end_of(&id("stopped")).is_some() && r.end_of(&id("gone")).is_none());
    }

    #[test]
    fn backoff_doubles_to_five_minutes_and_the_queue_is_velero_s() {
        assert_eq!([1, 2, 3, 9, 40].map(retry_backoff_ms), [2_000, 4_000, 8_000, 300_000, 300_000]);
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(namespaces_overlap(&v(&[]), &v(&["a"])));
        assert!(namespaces_overlap(&v(&["a", "b"]), &v(&["b"])));
        assert!(namespaces_overlap(&v(&["web-*"]), &v(&["db"])));
        assert!(!namespaces_overlap(&v(&["a"]), &v(&["b"])));
        let (a, b) = (v(&["a"]), v(&["b"]));
        assert_eq!(queue_position(&a, &[], &[], 1), None);
        assert_eq!(queue_position(&a, &[&b], &[], 1), Some(1), "full");
        assert_eq!(queue_position(&a, &[&b], &[], 2), None, "disjoint, room");
        assert_eq!(queue_position(&a, &[&a], &[], 2), Some(1), "overlaps a running one");
        assert_eq!(queue_position(&a, &[], &[&b, &a], 2), Some(3), "overlaps an earlier waiting one");
        let entry =
            |name: &'static str, phase: Option<&'static str>, created_ms: i64, ns: &'static [String]| QueueEntry {
                key: ("ns", name),
                in_scope: true,
                phase,
                deleting: false,
                created_ms,
                namespaces: ns,
                running_here: false,
                running_elsewhere: false,
                ended_here: false,
            };
        static A: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| vec!["a".to_string()]);
        let (x, y) = (entry("x", Some("InProgress"), 1, &A), entry("y", None, 9, &A));
        // One created before it holds it back, also stopped or refused here (not ended); a run
        // elsewhere counts as running; a tie in creation is broken by name.
        assert_eq!(queue_wait(&y, &A, &[x.clone(), y.clone()], 2), Some(2));
        assert_eq!(queue_wait(&x, &A, &[x.clone(), y.clone()], 2), None);
        let elsewhere = QueueEntry { running_elsewhere: true, ..x.clone() };
        assert_eq!(queue_wait(&y, &A, &[elsewhere.clone(), y.clone()], 2), Some(1));
        let ended = QueueEntry { ended_here: true, ..x.clone() };
        assert_eq!(queue_wait(&y, &A, &[ended, y.clone()], 2), None);
        let tie = entry("w", None, 9, &A);
        assert_eq!(queue_wait(&y, &A, &[tie.clone(), y.clone()], 2), Some(2));
        assert_eq!(queue_wait(&tie, &A, &[tie.clone(), y.clone()], 2), None);
        // One being deleted: only a started one is waited for.
        let deleting_new = QueueEntry { deleting: true, phase: Some("New"), created_ms: 0, ..y.clone() };
        let mine = entry("z", None, 5, &A);
        assert_eq!(queue_wait(&mine, &A, &[deleting_new, mine.clone()], 2), None);
        let deleting_started = QueueEntry { deleting: true, ..x };
        assert_eq!(queue_wait(&mine, &A, &[deleting_started, mine.clone()], 2), Some(2));
        // Outside the controller's namespaces: never waited for.
        let stranger = QueueEntry { in_scope: false, ..entry("s", None, 0, &A) };
        assert_eq!(queue_wait(&mine, &A, &[stranger, mine.clone()], 2), None);
    }
}
