//! The simulator's own acceptance tests: fixed seeds with every fault type and the determinism
//! check, and exhaustive crash points on small clusters. Every failure prints the seed and the
//! command that reproduces it. (The mutation tests — the harness must be able to fail — live in
//! `tests/tests/mutations.rs`, which builds the engine with its `mutations` feature.)

use std::collections::{BTreeMap, BTreeSet};

use blockwise_simulator::runner::{check_run, check_seed, plan_seed, shrink};
use blockwise_simulator::sim::{FaultKind, RunConfig};
use bytes::Bytes;

/// Seeds run in CI; `BLOCKWISE_SIM_SEEDS` raises it locally.
fn seed_count() -> u64 {
    std::env::var("BLOCKWISE_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300)
}

#[test]
fn fixed_seeds_hold_every_invariant_and_hit_every_fault() {
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    let mut hits: BTreeMap<FaultKind, u64> = BTreeMap::new();
    let mut failures = Vec::new();
    let (mut trips, mut trip_hits) = (0u64, BTreeMap::<&str, u64>::new());
    for seed in 0..seed_count() {
        let (r, plan) = check_seed(seed, &all, true, None);
        for h in &r.hits {
            *hits.entry(*h).or_default() += 1;
        }
        if let Some(t) = &r.round_trip {
            trips += 1;
            for h in &t.hits {
                *trip_hits.entry(h).or_default() += 1;
            }
        }
        if let Some(v) = r.violations.first() {
            let small = shrink(&plan, v.invariant, 50);
            failures.push(format!(
                "seed {seed}: {} {}\n  reproduce: blockwise simulate --seed {seed} --seeds 1\n  shrunk cluster: {}",
                v.invariant,
                v.detail,
                serde_json::to_string(&small).unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    let missing: Vec<&str> = FaultKind::ALL.into_iter().filter(|f| !hits.contains_key(f)).map(|f| f.name()).collect();
    assert!(missing.is_empty(), "fault types never hit: {missing:?} (hits: {hits:?})");
    // Most seeds' archives make a round trip (RT1–RT3), and the restores met every restore fault.
    assert!(trips * 10 >= seed_count() * 8, "only {trips} round trips in {} seeds", seed_count());
    let missing: Vec<&str> = ["crash", "create-5xx", "create-lost", "lost-unflushed", "torn-record"]
        .into_iter()
        .filter(|f| !trip_hits.contains_key(f))
        .collect();
    assert!(missing.is_empty(), "restore faults never hit: {missing:?} (hits: {trip_hits:?})");
}

#[test]
fn crash_after_every_append_gives_the_crash_free_archive() {
    for seed in [3u64, 8, 21] {
        let mut plan = plan_seed(seed, &BTreeSet::new(), None);
        plan.cfg.workers = 2;
        let (v, clean) = check_run(&plan.model, &plan.cfg, false);
        assert!(v.is_empty(), "seed {seed}: crash-free run fails: {v:?}");
        let appends = clean.events.len() as u64;
        assert!(appends > 10, "seed {seed}: the cluster is too small to be interesting");
        for k in 1..appends {
            let cfg = RunConfig { crash_at_append: Some(k), ..plan.cfg.clone() };
            let (v, report) = check_run(&plan.model, &cfg, false);
            assert!(v.is_empty(), "seed {seed}, crash after append {k}: {v:?}");
            assert_eq!(report.crashes, 1, "seed {seed}, crash after append {k}");
            assert!(report.archive == clean.archive, "seed {seed}, crash after append {k}: archive differs");
        }
    }
}

/// `get` and `describe` read a backup through its summary fold (memory that does not grow with
/// the objects), a run and its resume through the full fold: for the logs of fixed seeds with
/// every fault type — cut at several points, so attempts, snapshots and listings are open — the
/// summary folded from the events equals the summary of the full fold (counts, open attempts,
/// hooks, snapshots, warnings and errors in their order).
#[test]
fn the_summary_fold_agrees_with_the_full_fold_on_every_prefix_looked_at() {
    use blockwise_engine::state::BackupState;
    use blockwise_engine::summary::BackupSummary;
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    let mut checked = 0;
    for seed in 0..seed_count().min(60) {
        let plan = plan_seed(seed, &all, None);
        let report = blockwise_simulator::sim::simulate(&plan.model, &plan.cfg);
        let events = &report.events;
        let n = events.len();
        for cut in [n / 5, n / 3, n / 2, 2 * n / 3, n.saturating_sub(3), n] {
            let prefix = &events[..cut];
            let full = BackupState::fold(prefix)
                .unwrap_or_else(|e| panic!("seed {seed}: the log's first {cut} events do not fold: {e:?}"));
            let mut summary = BackupSummary::default();
            for e in prefix {
                summary.push(e);
            }
            assert_eq!(
                summary,
                BackupSummary::of(&full),
                "seed {seed}, the first {cut} of {n} events (reproduce: blockwise simulate --seed {seed} --seeds 1)"
            );
            // The live view's summary is the same but for the snapshots' names.
            let mut nameless = summary.clone();
            for st in &mut nameless.snapshots {
                (st.name, st.namespace) = (String::new(), String::new());
                st.claims.iter_mut().for_each(String::clear);
            }
            assert_eq!(nameless, BackupSummary::counts_of(&full), "seed {seed}, the first {cut} of {n} events");
            checked += 1;
        }
    }
    assert!(checked >= 60, "only {checked} prefixes compared");
}

/// A store that loses the staged writes of `keys` made before the first archive build (as a
/// damaged staging area would: they are acknowledged, never kept), then keeps them as the store
/// it wraps does.
struct LosesOnce {
    inner: std::sync::Arc<dyn blockwise_adapters::store::Store>,
    keys: Vec<blockwise_engine::item::ItemKey>,
    built: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl blockwise_adapters::store::Store for LosesOnce {
    async fn put_item(
        &self,
        backup: &str,
        key: &blockwise_engine::item::ItemKey,
        bytes: &[u8],
    ) -> Result<(), blockwise_adapters::store::StoreError> {
        if !self.built.load(std::sync::atomic::Ordering::SeqCst) && self.keys.contains(key) {
            return Ok(());
        }
        self.inner.put_item(backup, key, bytes).await
    }
    async fn sync_staged(&self, backup: &str) -> Result<(), blockwise_adapters::store::StoreError> {
        self.inner.sync_staged(backup).await
    }
    async fn finalize(
        &self,
        backup: &str,
        entries: std::sync::Arc<blockwise_adapters::entry_runs::ArchiveEntries>,
    ) -> Result<blockwise_engine::state::ArchiveInfo, blockwise_adapters::store::StoreError> {
        self.built.store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.finalize(backup, entries).await
    }
    async fn put_file(
        &self,
        backup: &str,
        name: &str,
        bytes: Bytes,
    ) -> Result<(), blockwise_adapters::store::StoreError> {
        self.inner.put_file(backup, name, bytes).await
    }
    async fn get_file(
        &self,
        backup: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, blockwise_adapters::store::StoreError> {
        self.inner.get_file(backup, name).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Staged items the archive build finds missing in the process that made the plan — whose plans
/// carry their items' bodies, with no view of every object — are staged again from the log, each
/// with the bytes it was written with: an ordinary object, a claim annotated with its snapshot,
/// and a snapshot's VolumeSnapshot and VolumeSnapshotContent. The archive is the one a run that
/// lost nothing builds.
#[test]
fn items_lost_in_the_planning_process_are_restaged_from_their_plans() {
    use blockwise_engine::event::Event;
    use blockwise_engine::item::ItemKey;
    use blockwise_simulator::demo::{demo_cluster_with, demo_csi};
    use blockwise_simulator::sim::{SimWorld, RUN_STEPS_MAX};
    let seed = 7;
    let world = || {
        let fake = demo_cluster_with(600, seed, false).with_csi(demo_csi(0));
        let options = blockwise_engine::snapshot::BackupOptions {
            uid: blockwise_simulator::model::SIM_UID.into(),
            ..blockwise_engine::snapshot::BackupOptions::default()
        };
        let ecfg = blockwise_engine::EngineConfig { workers: 4, ..blockwise_engine::EngineConfig::default() };
        let spec = blockwise_engine::BackupSpec::new(blockwise_simulator::sim::BACKUP);
        let lat = blockwise_simulator::cluster::Latencies::SEEDED;
        SimWorld::new(fake, &spec, &options, Default::default(), Default::default(), seed, &ecfg, lat)
    };
    let mut whole = world();
    let (life, _) = whole.live(RUN_STEPS_MAX, |_| false);
    assert!(format!("{life:?}").starts_with("Finished"), "{life:?}");
    // Of the whole run's writes: a ConfigMap, and a block's VolumeSnapshot, its content and a claim
    // of the same block (annotated with a snapshot).
    let written: Vec<(u32, ItemKey)> = (whole.durable_events().iter())
        .filter_map(|e| match e {
            Event::ItemWritten { block, key, .. } => Some((*block, key.clone())),
            _ => None,
        })
        .collect();
    let pick = |group: &str, resource: &str, block: Option<u32>| {
        (written.iter())
            .find(|(b, k)| k.is(group, resource) && block.is_none_or(|want| *b == want))
            .cloned()
            .unwrap_or_else(|| panic!("no {resource} written"))
    };
    let (block, vs) = pick("snapshot.storage.k8s.io", "volumesnapshots", None);
    let keys = vec![
        pick("", "configmaps", None).1,
        pick("", "persistentvolumeclaims", Some(block)).1,
        vs,
        pick("snapshot.storage.k8s.io", "volumesnapshotcontents", Some(block)).1,
    ];
    let mut lossy = world();
    let inner_keys = keys.clone();
    lossy
        .wrap_store(move |inner| std::sync::Arc::new(LosesOnce { inner, keys: inner_keys, built: Default::default() }));
    let (life, _) = lossy.live(RUN_STEPS_MAX, |_| false);
    assert!(format!("{life:?}").starts_with("Finished"), "{life:?}");
    let restaged = (lossy.durable_events().iter())
        .any(|e| matches!(e, Event::Diagnostic { message, .. } if message.contains("staging them again from the log")));
    assert!(restaged, "the lost items were not staged again");
    let archive = |w: &SimWorld| {
        w.stored_files().into_iter().find(|(n, _)| n.ends_with(".tar.gz")).map(|(_, b)| b).expect("an archive")
    };
    assert!(archive(&lossy) == archive(&whole), "the archive built after re-staging differs from the whole run's");
}
