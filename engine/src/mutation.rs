//! Deliberate bugs, to prove that the checks can fail (STYLE §5, §9).
//!
//! Each [`Mutation`] breaks one rule of the engine, the driver or the log on purpose. The tests of
//! the test harness switch one on for one simulated run ([`MutationGuard`]) and expect the
//! simulator's judges to report it. The switch is per thread (the simulator runs a whole backup on
//! one thread, and tests run in parallel threads), and it only exists with the cargo feature
//! `mutations`: without it [`active`] is the constant `false`, so the bugs are dead code that the
//! compiler removes, and no release build can be made to misbehave.

/// One deliberate rule break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutation {
    /// Engine: write a block's items before its pre-hooks (breaks H1).
    WriteBeforePreHooks,
    /// Engine: skip the post-hooks owed by an interrupted attempt (breaks H2).
    SkipOwedPostHooks,
    /// Engine: ignore a failed Fail-mode pre-hook (breaks H3).
    IgnorePreHookFailure,
    /// Engine: run no pre-hooks in blocks with more than one hooked pod (breaks H1).
    SkipPreHooksOfMultiPodBlocks,
    /// Engine: treat a failed Continue-mode pre-hook like a Fail-mode one (breaks E1).
    ContinueFailsBlock,
    /// Engine: let a pulled object with the exclude label into the backup (breaks G1).
    PullExcludedObjects,
    /// Engine: redo blocks that already finished when resuming (breaks F1).
    RedoFinishedBlocks,
    /// Engine: stop on a store failure without closing the open hook windows (breaks H2).
    StopWithoutClosingWindows,
    /// Engine: when a Fail-mode pre-hook fails, run the post-hooks of every pod of the block, also
    /// of those whose window never opened (breaks H2).
    PostHooksForUnopenedWindows,
    /// Engine: an unset onError means Continue, as Velero's code has it, not Fail (breaks H3).
    DefaultOnErrorContinue,
    /// Driver: dispatch commands without waiting for their intent to be durable (breaks H2).
    DispatchBeforeDurable,
    /// Driver: do not enforce hook timeouts (breaks T1 or L1).
    NoHookTimeout,
    /// Driver: flush `ItemWritten` facts without the staged-sync barrier (breaks W1).
    SkipStagedSync,
    /// Log: after cutting a torn tail, resume appends one past it (breaks L1).
    LogStaleNextSeq,
    /// Log: decode records without verifying their checksum (breaks R1).
    LogSkipsChecksum,
    /// Log: ignore the committed count, so a log cut short passes as a shorter valid one (R1).
    LogTrustsItsEnd,
    /// Engine: cut a block's snapshots before its pre-hooks (breaks S1).
    SnapshotBeforePreHooks,
    /// Engine: after a crash during a cut, take the snapshot again under a new name instead of
    /// finishing the interrupted one (breaks S3).
    SecondSnapshotAfterResume,
    /// Engine: leave the snapshots' cluster objects behind at the end (breaks S3).
    SkipSnapshotRelease,
    /// Restore: a resumed run sends the creates of items with a durable intent without looking
    /// them up first (RT3).
    RestoreSkipsLookup,
    /// Restore: objects are created without the `velero.io/*-name` labels (RT1).
    RestoreDropsLabels,
    /// Restore: claims are created before the volumes they bind to (RT2).
    RestoreClaimsBeforeVolumes,
    /// Schedules: the last run is forgotten, so every look after a due time runs again (Y1/Y3).
    ScheduleForgetsLastRun,
    /// Schedules: `keepLast` keeps one backup too few (Y4).
    RetentionKeepsOneTooFew,
    /// Schedules: the last run is read from the status alone, which a cache may show from before
    /// the controller's own patch while it shows the Backup made with it (Y7: a run reported
    /// skipped with none due).
    ScheduleTrustsStaleStatus,
    /// Schedules: retention counts failed and running backups, as it once did (C1: failed runs
    /// push the last usable backup out of `keepLast`).
    RetentionCountsUnusable,
    /// Service: a deleted Backup is deleted while its run goes on here, as the controller once did
    /// (C3: a pod left frozen, a run cut short).
    DeleteCutsRunShort,
    /// Service: a deletion never finishes an unfinished log first (C3: a killed run's frozen pod).
    DeletionSkipsUnfinishedLog,
    /// Service: the queue ignores overlapping namespaces (Q1).
    QueueIgnoresOverlap,
    /// Service: a run stopped by an outage is never retried (C4: it never ends).
    StoppedRunsNeverRetried,
    /// Service: a stopped run's retry instant is trusted after the clock went back (C4: a Backup
    /// waits out the jump, InProgress, long after the faults healed).
    RetryTrustsTheClock,
    /// Service: a tenant's locations are not put under `tenants/<ns>/` (C2: two namespaces'
    /// Backups of one name share a store prefix).
    TenantPrefixDropped,
    /// Service: a tenant's included namespaces and cluster resources are taken as given (C2: a
    /// tenant's Backup reads another namespace).
    TenantNamespacesUnchecked,
    /// Service: the queue counts only this process's runs, not those another process's log locks
    /// show (a paused leader's, whose Lease was taken) (Q1).
    QueueIgnoresOtherProcesses,
    /// Service: an open refused because another process held the log counts as a run that ended
    /// here, so a deletion no longer finishes the paused leader's interrupted run first (C3).
    RefusalCountsAsRun,
    /// Service: the queue waits for Backups outside the controller's namespaces, which a controller
    /// watching every namespace for its tenants sees and never runs, as it once did (C4: whatever
    /// they overlap waits for ever).
    QueueCountsStrangers,
    /// Shell: a cluster that cannot be reached is taken for failing commands, as before issue 22:
    /// the driver never reports the cluster unreachable, so the outage's failures are recorded
    /// (hooks errored or timed out, windows closed on paper while the pod stays frozen).
    UnreachableRecordedAsFailure,
    /// Shell: calls to the API server have no deadline of ours, as before issue 22 (a hung server
    /// holds the run for ever: L1).
    NoRequestDeadline,
    /// Shell: a resumed run waits five minutes before anything, to give the cluster time to
    /// recover (A1: a pod frozen when the API server went away stays frozen long after it is
    /// back).
    ResumeWaitsFirst,
    /// Engine: the archive holds what every attempt of a finished block wrote, not only its last
    /// (E1: a block whose last attempt failed its Fail-mode pre-hook is in the archive anyway).
    ArchiveKeepsEarlierAttempts,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 40] = [
        Mutation::WriteBeforePreHooks,
        Mutation::SkipOwedPostHooks,
        Mutation::IgnorePreHookFailure,
        Mutation::SkipPreHooksOfMultiPodBlocks,
        Mutation::ContinueFailsBlock,
        Mutation::PullExcludedObjects,
        Mutation::RedoFinishedBlocks,
        Mutation::StopWithoutClosingWindows,
        Mutation::PostHooksForUnopenedWindows,
        Mutation::DefaultOnErrorContinue,
        Mutation::DispatchBeforeDurable,
        Mutation::NoHookTimeout,
        Mutation::SkipStagedSync,
        Mutation::LogStaleNextSeq,
        Mutation::LogSkipsChecksum,
        Mutation::LogTrustsItsEnd,
        Mutation::SnapshotBeforePreHooks,
        Mutation::SecondSnapshotAfterResume,
        Mutation::SkipSnapshotRelease,
        Mutation::RestoreSkipsLookup,
        Mutation::RestoreDropsLabels,
        Mutation::RestoreClaimsBeforeVolumes,
        Mutation::ScheduleForgetsLastRun,
        Mutation::RetentionKeepsOneTooFew,
        Mutation::ScheduleTrustsStaleStatus,
        Mutation::RetentionCountsUnusable,
        Mutation::DeleteCutsRunShort,
        Mutation::DeletionSkipsUnfinishedLog,
        Mutation::QueueIgnoresOverlap,
        Mutation::StoppedRunsNeverRetried,
        Mutation::RetryTrustsTheClock,
        Mutation::TenantPrefixDropped,
        Mutation::TenantNamespacesUnchecked,
        Mutation::QueueIgnoresOtherProcesses,
        Mutation::RefusalCountsAsRun,
        Mutation::QueueCountsStrangers,
        Mutation::UnreachableRecordedAsFailure,
        Mutation::NoRequestDeadline,
        Mutation::ResumeWaitsFirst,
        Mutation::ArchiveKeepsEarlierAttempts,
    ];
}

#[cfg(feature = "mutations")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutation>> = const { std::cell::Cell::new(None) };
}

/// Whether `m` is switched on for this thread (always `false` without the `mutations` feature).
#[inline]
pub fn active(m: Mutation) -> bool {
    #[cfg(feature = "mutations")]
    {
        ACTIVE.with(|a| a.get() == Some(m))
    }
    #[cfg(not(feature = "mutations"))]
    {
        let _ = m;
        false
    }
}

/// Switches a mutation on for this thread until dropped.
#[derive(Debug)]
pub struct MutationGuard {
    _private: (),
}

impl MutationGuard {
    /// Switches `m` on (`None`: no mutation). Without the `mutations` feature this does nothing.
    pub fn set(m: Option<Mutation>) -> MutationGuard {
        #[cfg(feature = "mutations")]
        ACTIVE.with(|a| a.set(m));
        #[cfg(not(feature = "mutations"))]
        let _ = m;
        MutationGuard { _private: () }
    }

    /// Whether mutations can be switched on in this build.
    pub fn available() -> bool {
        cfg!(feature = "mutations")
    }
}

impl Drop for MutationGuard {
    fn drop(&mut self) {
        #[cfg(feature = "mutations")]
        ACTIVE.with(|a| a.set(None));
    }
}
