//! The harness can fail: each deliberate bug of `blockwise_engine::mutation` — planted in the
//! engine, the driver or the log — is reported by the simulator's judges within a bounded number
//! of seeds with every fault on. These tests build the engine with its `mutations` feature (see
//! this crate's manifest); release builds of the binary never have it.

use std::collections::BTreeSet;

use blockwise_engine::mutation::MutationGuard;
use blockwise_engine::Mutation;
use blockwise_simulator::runner::check_seed;
use blockwise_simulator::sim::FaultKind;

/// Seeds tried per mutation before giving up (the slowest to show needs a crash between an exec's
/// dispatch and the flush of its intent, with the unflushed tail lost).
const SEEDS_MAX: u64 = 2000;
/// Seeds of the service world tried per mutation of the controllers' decisions (a clock that went
/// back while a retry was pending, and stayed back past the quiet part, is the rarest to show:
/// seed 480 of the world as it is).
const SERVICE_SEEDS_MAX: u64 = 1000;

/// The first seed at which `m` is reported, and the invariants reported there.
fn caught(m: Mutation) -> Option<(u64, Vec<&'static str>)> {
    // The schedule bugs live in the schedule step: a simulated year shows them.
    if matches!(
        m,
        Mutation::ScheduleForgetsLastRun
            | Mutation::RetentionKeepsOneTooFew
            | Mutation::ScheduleTrustsStaleStatus
            | Mutation::RetentionCountsUnusable
    ) {
        return (0..SEEDS_MAX).find_map(|seed| {
            let _bug = MutationGuard::set(Some(m));
            let r = blockwise_simulator::year::simulate_year(seed);
            (!r.violations.is_empty()).then(|| (seed, r.violations.iter().map(|v| v.invariant).collect()))
        });
    }
    // The controllers' decisions: the service world shows them.
    if matches!(
        m,
        Mutation::DeleteCutsRunShort
            | Mutation::DeletionSkipsUnfinishedLog
            | Mutation::QueueIgnoresOverlap
            | Mutation::StoppedRunsNeverRetried
            | Mutation::RetryTrustsTheClock
            | Mutation::TenantPrefixDropped
            | Mutation::TenantNamespacesUnchecked
            | Mutation::QueueIgnoresOtherProcesses
            | Mutation::RefusalCountsAsRun
            | Mutation::QueueCountsStrangers
    ) {
        return (0..SERVICE_SEEDS_MAX).find_map(|seed| {
            let _bug = MutationGuard::set(Some(m));
            let r = blockwise_simulator::service::simulate_service(seed);
            (!r.violations.is_empty()).then(|| (seed, r.violations.iter().map(|v| v.invariant).collect()))
        });
    }
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    (0..SEEDS_MAX).find_map(|seed| {
        let (r, _) = check_seed(seed, &all, false, Some(m));
        (!r.violations.is_empty()).then(|| (seed, r.violations.iter().map(|v| v.invariant).collect()))
    })
}

#[test]
fn mutations_are_available_in_this_build() {
    assert!(MutationGuard::available(), "the tests crate must enable blockwise-engine's `mutations` feature");
}

#[test]
fn every_planted_bug_is_caught_by_the_invariant_it_breaks() {
    let expected: [(Mutation, &[&str]); 40] = [
        // Items written before the pre-hooks: H1; and when a Fail-mode pre-hook then fails, the
        // failed block's items are in the archive: E1.
        (Mutation::WriteBeforePreHooks, &["H1", "E1"]),
        (Mutation::SkipOwedPostHooks, &["H2"]),
        (Mutation::IgnorePreHookFailure, &["H3"]),
        (Mutation::SkipPreHooksOfMultiPodBlocks, &["H1"]),
        (Mutation::ContinueFailsBlock, &["E1"]),
        (Mutation::PullExcludedObjects, &["G1"]),
        (Mutation::RedoFinishedBlocks, &["F1", "L1"]),
        // A stop that does not close windows also abandons a hook exec in flight, uncancelled: T1.
        (Mutation::StopWithoutClosingWindows, &["H2", "T1"]),
        (Mutation::PostHooksForUnopenedWindows, &["H2"]),
        (Mutation::DefaultOnErrorContinue, &["H3", "E1"]),
        // Whatever the lost intent was: a window (H1, H2), an item (E1, W1), a snapshot (S1, S3).
        (Mutation::DispatchBeforeDurable, &["H1", "H2", "E1", "W1", "L1", "S1", "S3"]),
        (Mutation::NoHookTimeout, &["T1", "L1"]),
        (Mutation::SkipStagedSync, &["W1"]),
        (Mutation::LogStaleNextSeq, &["L1"]),
        (Mutation::LogSkipsChecksum, &["R1"]),
        // A log the medium cut short (or whose last committed record is damaged) is trusted.
        (Mutation::LogTrustsItsEnd, &["R1"]),
        (Mutation::SnapshotBeforePreHooks, &["S1"]),
        (Mutation::SecondSnapshotAfterResume, &["S3", "S1"]),
        (Mutation::SkipSnapshotRelease, &["S3"]),
        (Mutation::RestoreSkipsLookup, &["RT3"]),
        (Mutation::RestoreDropsLabels, &["RT1"]),
        (Mutation::RestoreClaimsBeforeVolumes, &["RT2"]),
        (Mutation::ScheduleForgetsLastRun, &["Y1", "Y3"]),
        (Mutation::RetentionKeepsOneTooFew, &["Y4"]),
        (Mutation::ScheduleTrustsStaleStatus, &["Y7"]),
        (Mutation::RetentionCountsUnusable, &["C1", "Y4"]),
        (Mutation::DeleteCutsRunShort, &["C3"]),
        (Mutation::DeletionSkipsUnfinishedLog, &["C3"]),
        (Mutation::QueueIgnoresOverlap, &["Q1"]),
        (Mutation::StoppedRunsNeverRetried, &["C4"]),
        (Mutation::RetryTrustsTheClock, &["C4"]),
        (Mutation::TenantPrefixDropped, &["C2"]),
        (Mutation::TenantNamespacesUnchecked, &["C2"]),
        (Mutation::QueueIgnoresOtherProcesses, &["Q1"]),
        (Mutation::RefusalCountsAsRun, &["C3"]),
        (Mutation::QueueCountsStrangers, &["C4"]),
        // The outage's failures recorded: windows closed on paper, snapshots left uncut (S3).
        // Gets the outage cut recorded as failures: items missing from the archive (G1, E1).
        (Mutation::UnreachableRecordedAsFailure, &["H2", "S3", "G1", "E1"]),
        // A hung server holds the run: stuck (L1), a window never closed (H2).
        (Mutation::NoRequestDeadline, &["L1", "H2"]),
        (Mutation::ResumeWaitsFirst, &["A1", "S4"]),
        // An earlier attempt's writes of a block whose last attempt wrote other items, or none.
        (Mutation::ArchiveKeepsEarlierAttempts, &["E1"]),
    ];
    assert_eq!(expected.len(), Mutation::ALL.len(), "every mutation has an expected invariant");
    let mut missed = Vec::new();
    for (m, invariants) in expected {
        match caught(m) {
            None => missed.push(format!("{m:?} was not reported within {SEEDS_MAX} seeds")),
            Some((seed, got)) if !got.iter().any(|g| invariants.contains(g)) => missed
                .push(format!("{m:?} was first reported at seed {seed} as {got:?}, expected one of {invariants:?}")),
            Some(_) => {}
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
}
