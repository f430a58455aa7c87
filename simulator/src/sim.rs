//! The deterministic simulation: the production shell, unchanged, in a seeded fake world.
//!
//! [`simulate_world`] assembles the world — a [`SimCluster`] behind the shell's `RetryingCluster`,
//! the shell's `LocalStore` on an in-memory [`MemStore`] behind its `RetryingStore`, the shell's
//! `EventLog` on an in-memory [`MemLog`], all on the virtual-time [`SimRuntime`] — and runs the
//! shell's own `run_backup` (the one driver, then the companion files) in it, exactly as
//! `blockwise backup create` does. Between timer firings it may kill the process: the driver's
//! future is dropped, the media lose what a crash loses (unflushed records, a torn record, a flipped
//! bit, unsynced staged files), and a new process opens the log and resumes, as `blockwise backup
//! resume` does — or creates the backup again when nothing durable was left. A store outage makes
//! the run stop (`RunStopped`); the store then comes back and the run is resumed. Faults are
//! chosen per seed ([`FaultKind`]); the run's report holds the fake world's records, the final
//! stored files and a hash chain over the records, so `(seed, commit)` reproduces a run and a
//! second run names the first place where it diverged. Deliberately absent: tokio, threads, the
//! wall clock, and any copy of the driver's logic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use blockwise_adapters::driver::{run_backup, Quiet, RunError, World};
use blockwise_adapters::log::{EventLog, LogError};
use blockwise_adapters::retry::{RetryPolicy as ClusterRetryPolicy, RetryingCluster};
use blockwise_adapters::store::{LocalStore, RetryPolicy, RetryingStore};
use blockwise_adapters::world::Runtime;
use blockwise_engine::event::{recover_records, Event, Phase, Seq};
use blockwise_engine::item::ItemKey;
use blockwise_engine::mutation::{Mutation, MutationGuard};
use blockwise_engine::snapshot::BackupOptions;
use blockwise_engine::state::BackupState;
use blockwise_engine::{BackupSpec, Engine, EngineConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::{ApiOutage, ClusterFaults, Latencies, SimCluster};
use crate::fake::FakeCluster;
use crate::media::{Death, LogCrash, MemLog, MemStore, StoreFaults};
use crate::model::Model;
use crate::records::{Record, WorldLog};
use crate::rng::{mix64, Rng};
use crate::vt::{Ended, SimRuntime};

/// Timer firings after which a run that has not finished counts as stuck (L1).
pub const RUN_STEPS_MAX: u64 = 400_000;
/// Crashes injected per run at most.
pub const CRASHES_PER_RUN_MAX: u32 = 3;
/// Process starts per run at most (crashes, store outages, failed companion files).
pub const RESTARTS_MAX: u32 = 12;
/// Chance of a crash at each step when crashes are on.
const CRASH_P: f64 = 0.01;
/// The backup's name in simulated runs.
pub const BACKUP: &str = "sim";
/// The virtual clock at the start of every run.
pub const START_MS: u64 = 1_000_000;

/// The fault types. Each is enabled or not per seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// The process dies at a random step and is resumed from the log.
    Crash,
    /// A crash loses appended but unflushed records.
    LostUnflushed,
    /// A crash leaves the first lost record half-written in the log.
    TornRecord,
    /// A committed record has a bit flipped; recovery must refuse it.
    BitFlip,
    /// The medium loses committed records from some point on (sled recovering a prefix of a
    /// damaged database); recovery must refuse the log naming the first one lost.
    LogCut,
    /// A hook exits non-zero.
    HookExit,
    /// A hook exec errors.
    HookError,
    /// A hook runs past its timeout (it would finish much later).
    HookTimeout,
    /// A hook never returns.
    HookHang,
    /// A list call answers 5xx, sometimes more often than the retries allow.
    List5xx,
    /// A list call answers 429 a few times.
    List429,
    /// A continued list answers 410 Gone: the listing restarts.
    List410,
    /// A pull target was deleted: the get finds nothing.
    DeletedBeforeGet,
    /// A pull target's get is forbidden.
    GetError,
    /// A store put fails a few times, sometimes more often than the retries allow.
    StoreWriteFailure,
    /// The store goes down until the process restarts: the run stops and is resumed.
    StoreOutage,
    /// A call takes ten to fifty times longer.
    SlowWorker,
    /// The wall clock jumps forward (timers, on a monotonic clock, do not).
    ClockJump,
    /// A hooked pod is deleted or its containers renamed after everything was listed.
    ClusterChange,
    /// A snapshot takes seconds to be cut (within the CSI timeout).
    SnapshotSlow,
    /// A snapshot (or a group snapshot) fails: the driver sets an error.
    SnapshotError,
    /// A snapshot is bound to a content whose handle is never set: the CSI timeout runs out.
    HandleNeverSet,
    /// A cut snapshot never becomes ready to use.
    SnapshotNeverReady,
    /// A group snapshot is cut without one of its members.
    GroupPartial,
    /// The cluster serves no snapshot CRDs: a manifest-only backup, with one warning.
    CrdsAbsent,
    /// The API server goes away (its process gone: calls refused) at a random step, inside a hook
    /// window or not, until the next process starts: the run stops and is resumed.
    ApiGone,
    /// The API server hangs (calls accepted and never answered) at a random step until the next
    /// process starts: deadlines end the calls, the run stops and is resumed.
    ApiHung,
}

impl FaultKind {
    /// Every fault type.
    pub const ALL: [FaultKind; 27] = [
        FaultKind::Crash,
        FaultKind::LostUnflushed,
        FaultKind::TornRecord,
        FaultKind::BitFlip,
        FaultKind::LogCut,
        FaultKind::HookExit,
        FaultKind::HookError,
        FaultKind::HookTimeout,
        FaultKind::HookHang,
        FaultKind::List5xx,
        FaultKind::List429,
        FaultKind::List410,
        FaultKind::DeletedBeforeGet,
        FaultKind::GetError,
        FaultKind::StoreWriteFailure,
        FaultKind::StoreOutage,
        FaultKind::SlowWorker,
        FaultKind::ClockJump,
        FaultKind::ClusterChange,
        FaultKind::SnapshotSlow,
        FaultKind::SnapshotError,
        FaultKind::HandleNeverSet,
        FaultKind::SnapshotNeverReady,
        FaultKind::GroupPartial,
        FaultKind::CrdsAbsent,
        FaultKind::ApiGone,
        FaultKind::ApiHung,
    ];

    /// The kebab-case name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::LostUnflushed => "lost-unflushed",
            FaultKind::TornRecord => "torn-record",
            FaultKind::BitFlip => "bit-flip",
            FaultKind::LogCut => "log-cut",
            FaultKind::HookExit => "hook-exit",
            FaultKind::HookError => "hook-error",
            FaultKind::HookTimeout => "hook-timeout",
            FaultKind::HookHang => "hook-hang",
            FaultKind::List5xx => "list-5xx",
            FaultKind::List429 => "list-429",
            FaultKind::List410 => "list-410",
            FaultKind::DeletedBeforeGet => "deleted-before-get",
            FaultKind::GetError => "get-error",
            FaultKind::StoreWriteFailure => "store-write-failure",
            FaultKind::StoreOutage => "store-outage",
            FaultKind::SlowWorker => "slow-worker",
            FaultKind::ClockJump => "clock-jump",
            FaultKind::ClusterChange => "cluster-change",
            FaultKind::SnapshotSlow => "snapshot-slow",
            FaultKind::SnapshotError => "snapshot-error",
            FaultKind::HandleNeverSet => "handle-never-set",
            FaultKind::SnapshotNeverReady => "snapshot-never-ready",
            FaultKind::GroupPartial => "group-partial",
            FaultKind::CrdsAbsent => "crds-absent",
            FaultKind::ApiGone => "api-gone",
            FaultKind::ApiHung => "api-hung",
        }
    }

    /// Parses a name from [`FaultKind::name`].
    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// What one simulated run is asked to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Seed of the run's PRNG.
    pub seed: u64,
    /// Enabled faults.
    pub faults: BTreeSet<FaultKind>,
    /// Blocks in parallel.
    pub workers: usize,
    /// Crash exactly once, right after this many appends (exhaustive crash-point testing).
    pub crash_at_append: Option<u64>,
    /// A deliberate bug, to test the judges (needs the `mutations` feature).
    pub mutation: Option<Mutation>,
    /// Lists come in an order drawn from this seed (G3), instead of (namespace, name) order.
    pub list_order_seed: Option<u64>,
}

impl RunConfig {
    /// A run of `seed` with `faults` and `workers`, nothing else special.
    pub fn new(seed: u64, faults: BTreeSet<FaultKind>, workers: usize) -> RunConfig {
        RunConfig { seed, faults, workers, crash_at_append: None, mutation: None, list_order_seed: None }
    }

    fn on(&self, f: FaultKind) -> bool {
        self.faults.contains(&f)
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A terminal phase.
    Finished(Phase),
    /// Recovery refused a corrupt record: `found` is the sequence number it named, `flipped` the
    /// one the fault flipped.
    CorruptionDetected { found: Seq, flipped: Seq },
    /// Recovery read a record with a flipped bit back without noticing.
    CorruptionMissed { flipped: Seq },
    /// No progress possible, past [`RUN_STEPS_MAX`], or an error no restart can fix.
    Stuck(String),
}

/// What the log durably promised when a process ended, as the next process reads it, and what
/// the store durably held then. The F1 judge holds later effects to the promise; the W1 judge
/// holds the store to the facts.
#[derive(Debug, Clone, Default)]
pub struct Promise {
    /// Index in the world records where the next process started.
    pub from_record: usize,
    /// Items of blocks whose `BlockFinished` was durable.
    pub items: BTreeSet<ItemKey>,
    /// Pods with hooks in those blocks.
    pub pods: BTreeSet<ItemKey>,
    /// Items whose `ItemWritten` a flush made durable in the process that ended, while their staged
    /// bytes did not survive it (missing, or other bytes than the fact's digest).
    pub facts_without_items: Vec<ItemKey>,
}

/// Everything a run produced, for the judges.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// The fake world's records, in order.
    pub records: Vec<Record>,
    /// The durable log at the end (the plan, for G1/G2 and G3).
    pub events: Vec<Event>,
    /// The archive's bytes, when it was stored.
    pub archive: Option<Vec<u8>>,
    /// Every durable file of the backup beside the archive (companion files), by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// What the log promised, and the store held, at each restart.
    pub promises: Vec<Promise>,
    /// Hash chain over every record.
    pub trace: Vec<u64>,
    /// Readable label of each trace step.
    pub trace_labels: Vec<String>,
    /// Faults that actually happened.
    pub hits: BTreeSet<FaultKind>,
    /// Crashes.
    pub crashes: u32,
    /// Virtual milliseconds from the request to the end of the run.
    pub makespan_ms: u64,
    /// The fake CSI driver's storage snapshots at the end, by handle.
    pub storage: BTreeMap<String, crate::csi::StorageSnapshot>,
    /// Snapshot objects (VolumeSnapshots, contents, groups) left in the cluster at the end.
    pub leftover: Vec<ItemKey>,
    /// The round trip of the stored archive, once `runner::check_run` ran it.
    pub round_trip: Option<RoundTripSummary>,
}

/// What the round trip of a run's archive did (`blockwise simulate` sums them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundTripSummary {
    /// Objects in the restored cluster.
    pub objects: usize,
    /// Crashes of the restore.
    pub crashes: u32,
    /// Faults that happened during the restore.
    pub hits: BTreeSet<&'static str>,
}

/// Engine bounds for simulated seeds: tiny pages, batches and records, so every path is exercised.
pub fn seeded_engine_config(workers: usize) -> EngineConfig {
    EngineConfig {
        workers,
        list_page_items_max: 4,
        list_concurrency_max: 2,
        get_batch_items_max: 3,
        plan_chunk_blocks_max: 5,
        intent_lookahead_blocks: 2,
        record_objects_bytes_max: 600,
        restage_rounds_max: 2,
        await_snapshots_max: 2,
        release_orders_max: 2,
    }
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h ^ 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Runs one backup of `model` in the simulated world.
pub fn simulate(model: &Model, cfg: &RunConfig) -> RunReport {
    let mut fake = model.fake();
    if let Some(s) = cfg.list_order_seed {
        fake = fake.with_list_order_seed(s);
    }
    let slow_p = if cfg.on(FaultKind::SlowWorker) { 0.05 } else { 0.0 };
    let cluster_faults = model.cluster_faults(cfg.on(FaultKind::List410), slow_p);
    let store_faults = if cfg.on(FaultKind::StoreWriteFailure) {
        StoreFaults { put_failure_p: 0.05, put_failures_max: 6, failing_paths: Vec::new() }
    } else {
        StoreFaults::default()
    };
    let mut report = simulate_world(
        fake,
        &model.spec(BACKUP),
        &model.options(),
        cluster_faults,
        store_faults,
        cfg,
        &seeded_engine_config(cfg.workers),
        Latencies::SEEDED,
    );
    if cfg.on(FaultKind::CrdsAbsent) && !model.csi.crds && model.pvcs.iter().any(|c| c.bound) {
        report.hits.insert(FaultKind::CrdsAbsent);
    }
    report
}

/// The blocks whose `BlockFinished` is in `events`: their items and hooked pods.
fn finished_blocks(events: &[Event]) -> (BTreeSet<ItemKey>, BTreeSet<ItemKey>) {
    let mut plans: BTreeMap<u32, (Vec<ItemKey>, Vec<ItemKey>)> = BTreeMap::new();
    let mut items = BTreeSet::new();
    let mut pods = BTreeSet::new();
    for e in events {
        match e {
            Event::BlockPlanned { blocks } => {
                for b in blocks {
                    plans.insert(b.id, (b.items.to_vec(), b.hooks.iter().map(|h| h.pod.clone()).collect()));
                }
            }
            Event::BlockFinished { block, .. } => {
                if let Some((i, p)) = plans.get(block) {
                    items.extend(i.iter().cloned());
                    pods.extend(p.iter().cloned());
                }
            }
            _ => {}
        }
    }
    (items, pods)
}

/// How one simulated process's life ended.
#[derive(Debug)]
pub enum Life {
    /// The backup reached a terminal phase and its files are stored.
    Finished(Box<BackupState>),
    /// The run stopped on a store failure (or storing the files failed); a new process resumes it.
    Stopped(String),
    /// The process was killed.
    Crashed,
    /// Opening the log refused a corrupt record.
    Refused { seq: Seq, reason: String },
    /// Anything else: the run cannot go on.
    Failed(String),
    /// No progress, or the step budget ran out.
    Stuck(String),
}

/// The simulated world of one backup, across process lives: the runtime, the fake cluster, the
/// media and the records, plus the shell's `World` over them. The production driver runs in it.
pub struct SimWorld {
    /// Virtual time.
    pub rt: SimRuntime,
    /// The fake world's records.
    pub records: WorldLog,
    /// Whether the current process is dead.
    pub death: Death,
    /// The fake cluster.
    pub cluster: Arc<SimCluster>,
    /// The store's medium.
    pub store: MemStore,
    /// The log's medium.
    pub log: MemLog,
    world: World,
    spec: BackupSpec,
    options: BackupOptions,
    ecfg: EngineConfig,
    workers: usize,
    /// The torn tail the last open cut, if any.
    pub last_cut: Option<Seq>,
    /// Durable events when the current process started.
    durable_at_start: usize,
}

impl SimWorld {
    /// A fresh world for a backup of `fake` with `spec` and `options`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        fake: FakeCluster,
        spec: &BackupSpec,
        options: &BackupOptions,
        cluster_faults: ClusterFaults,
        store_faults: StoreFaults,
        seed: u64,
        ecfg: &EngineConfig,
        lat: Latencies,
    ) -> SimWorld {
        let records = WorldLog::new();
        let rt = SimRuntime::new(START_MS, Rng::new(mix64(seed)));
        let death = Death::default();
        let cluster = Arc::new(SimCluster::new(fake, rt.clone(), records.clone(), death.clone(), cluster_faults, lat));
        let store = MemStore::new(rt.clone(), records.clone(), death.clone(), store_faults, lat.store_ms);
        let log = MemLog::new(death.clone());
        let runtime: Arc<dyn Runtime> = Arc::new(rt.clone());
        let world = World {
            cluster: Arc::new(RetryingCluster::new(cluster.clone(), ClusterRetryPolicy::default(), runtime.clone())),
            store: Arc::new(RetryingStore::new(
                Arc::new(LocalStore::on(store.clone())),
                RetryPolicy::default(),
                runtime.clone(),
            )),
            runtime,
        };
        SimWorld {
            rt,
            records,
            death,
            cluster,
            store,
            log,
            world,
            spec: spec.clone(),
            options: options.clone(),
            ecfg: ecfg.clone(),
            workers: ecfg.workers,
            last_cut: None,
            durable_at_start: 0,
        }
    }

    /// One process's life: open the log (or create the backup when nothing durable is there),
    /// then run the shell's `run_backup` until it ends, `crash_now(step)` says the process dies,
    /// the log's crash point is reached, or `steps_max` timer firings passed. Returns the life and
    /// the steps it took.
    pub fn live(&mut self, steps_max: u64, mut crash_now: impl FnMut(u64) -> bool) -> (Life, u64) {
        self.last_cut = None;
        let (mut log, events) = match EventLog::open_on(self.log.clone()) {
            Err(LogError::Damaged { seq, reason, .. }) => return (Life::Refused { seq: seq.unwrap_or(0), reason }, 0),
            Err(LogError::NotFound(_)) => match EventLog::create_on(self.log.clone(), BACKUP) {
                Ok(log) => (log, Vec::new()),
                Err(e) => return (Life::Failed(format!("creating the log failed: {e}")), 0),
            },
            Err(e) => return (Life::Failed(format!("opening the log failed: {e}")), 0),
            Ok((log, events, report)) => {
                self.last_cut = report.cut_tail.map(|(s, _)| s);
                (log, events)
            }
        };
        let now = self.rt.now_ms();
        let engine = if events.is_empty() {
            // Nothing durable: the backup was never created, and the user creates it again.
            Engine::with_options(self.spec.clone(), self.options.clone(), self.ecfg.clone(), now)
                .map_err(|e| e.to_string())
        } else {
            Engine::resume(&events, self.ecfg.clone(), now).map_err(|e| e.to_string())
        };
        let engine = match engine {
            Ok(e) => e,
            Err(e) => return (Life::Failed(format!("starting the engine failed: {e}")), 0),
        };
        let mut steps = 0u64;
        let mut quiet = Quiet;
        let death = self.death.clone();
        let fut = run_backup(engine, &mut log, &self.world, self.workers, &mut quiet);
        let ended = self.rt.run(
            fut,
            steps_max,
            |step| {
                steps = step;
                crash_now(step)
            },
            || death.is_dead(),
        );
        let life = match ended {
            Ended::Done(_) | Ended::Crashed if self.death.is_dead() => Life::Crashed,
            Ended::Crashed => Life::Crashed,
            Ended::Done(Ok(state)) => Life::Finished(Box::new(state)),
            Ended::Done(Err(e @ (RunError::Stopped(_) | RunError::Files { .. }))) => Life::Stopped(e.to_string()),
            Ended::Done(Err(e)) => Life::Failed(format!("the run failed: {e}")),
            Ended::Stuck(why) => Life::Stuck(why),
        };
        if matches!(life, Life::Crashed) {
            self.death.kill();
        }
        (life, steps)
    }

    /// What a crash does to the media: the log keeps `keep` pending operations (and tears the
    /// next one when `tear` is given), unsynced staged files survive by draws from `rng`. Then a
    /// new process may start.
    pub fn crash(&mut self, keep: usize, tear: Option<f64>, rng: &mut Rng) -> LogCrash {
        let lost = self.log.crash(keep, tear);
        self.store.crash(rng);
        lost
    }

    /// Before a new process starts: the store comes back, the process lives, a millisecond
    /// passes, and the log's durable promises are noted for F1.
    pub fn restart(&mut self) -> Promise {
        self.store.heal();
        self.cluster.heal();
        self.death.revive();
        self.rt.pass(1);
        let events = self.durable_events();
        let (items, pods) = finished_blocks(&events);
        let files = self.store.durable_files();
        let mut facts_without_items = Vec::new();
        // Only facts a flush made durable: the driver syncs staged items before every flush, but a
        // record the medium kept on its own at the crash had no flush to wait for.
        let flushed = self.log.disk().flushed().min(events.len());
        for e in events.iter().take(flushed).skip(self.durable_at_start) {
            if let Event::ItemWritten { key, digest, .. } = e {
                let path = format!("backups/{BACKUP}/staging/{}", key.archive_path());
                let held: Option<[u8; 32]> = files.get(&path).map(|b| Sha256::digest(b).into());
                if held != Some(*digest) {
                    facts_without_items.push(key.clone());
                }
            }
        }
        self.durable_at_start = events.len();
        let d = Promise { from_record: self.records.len(), items, pods, facts_without_items };
        self.records.push(Record::Restart { at_ms: self.rt.now() });
        d
    }

    /// The events the log durably holds (what the next process would read).
    pub fn durable_events(&self) -> Vec<Event> {
        let durable = self.log.disk().durable_records();
        recover_records(durable.iter().map(|(s, b)| (*s, b.as_slice()))).map(|r| r.events).unwrap_or_default()
    }

    /// Puts `wrap` around the store the driver writes to (tests: a store that answers as a
    /// damaged one would), from the next process life on.
    pub fn wrap_store(
        &mut self,
        wrap: impl FnOnce(Arc<dyn blockwise_adapters::store::Store>) -> Arc<dyn blockwise_adapters::store::Store>,
    ) {
        self.world.store = wrap(self.world.store.clone());
    }

    /// Every durable file of the backup in the store, by name (the archive under its own name).
    pub fn stored_files(&self) -> BTreeMap<String, Vec<u8>> {
        let prefix = format!("backups/{BACKUP}/");
        self.store
            .durable_files()
            .into_iter()
            .filter_map(|(path, bytes)| {
                let name = path.strip_prefix(&prefix)?;
                (!name.starts_with("staging/")).then(|| (name.to_string(), bytes))
            })
            .collect()
    }

    /// Staged items as the store holds them now (synced or not).
    pub fn staged(&self) -> BTreeMap<ItemKey, Vec<u8>> {
        self.store
            .files()
            .into_iter()
            .filter(|(p, _)| p.contains("/staging/"))
            .filter_map(|(p, b)| crate::check::item_of_path(&p).map(|k| (k, b)))
            .collect()
    }
}

/// Runs one backup of any fake cluster with `spec` and `options`, engine bounds `ecfg` and
/// latencies `lat`.
#[allow(clippy::too_many_arguments)]
pub fn simulate_world(
    fake: FakeCluster,
    spec: &BackupSpec,
    options: &BackupOptions,
    cluster_faults: ClusterFaults,
    store_faults: StoreFaults,
    cfg: &RunConfig,
    ecfg: &EngineConfig,
    lat: Latencies,
) -> RunReport {
    let mut w = SimWorld::new(fake, spec, options, cluster_faults, store_faults, cfg.seed, ecfg, lat);
    let mut rng = Rng::new(mix64(cfg.seed ^ 0x00c0_ffee));
    if let Some(n) = cfg.crash_at_append {
        w.log.crash_after_inserts(n);
    }
    let _mutation = MutationGuard::set(cfg.mutation);
    let mut hits: BTreeSet<FaultKind> = BTreeSet::new();
    let mut crashes = 0u32;
    let mut restarts = 0u32;
    let mut steps_used = 0u64;
    let mut flipped: Option<Seq> = None;
    let mut outage_done = false;
    let mut promises = Vec::new();
    let crash_on = cfg.on(FaultKind::Crash) && cfg.crash_at_append.is_none();
    let outage_on = cfg.on(FaultKind::StoreOutage);
    let api_outages: Vec<ApiOutage> = [(FaultKind::ApiGone, ApiOutage::Gone), (FaultKind::ApiHung, ApiOutage::Hung)]
        .into_iter()
        .filter(|(f, _)| cfg.on(*f))
        .map(|(_, o)| o)
        .collect();
    let mut api_done = false;
    let jump_on = cfg.on(FaultKind::ClockJump);
    let outcome = loop {
        let crashes_before = crashes;
        let (store, rt, cluster) = (w.store.clone(), w.rt.clone(), w.cluster.clone());
        let budget = RUN_STEPS_MAX.saturating_sub(steps_used);
        let (life, steps) = w.live(budget, |_| {
            if jump_on && rng.chance(0.005) {
                hits.insert(FaultKind::ClockJump);
                rt.jump_wall(rng.range(60_000, 3_600_000));
            }
            if outage_on && !outage_done && rng.chance(0.004) {
                outage_done = true;
                hits.insert(FaultKind::StoreOutage);
                store.set_down(true);
            }
            if !api_outages.is_empty() && !api_done && rng.chance(0.004) {
                api_done = true;
                let i = rng.below(api_outages.len() as u64) as usize;
                cluster.go_away(api_outages[i]);
            }
            crash_on && crashes_before < CRASHES_PER_RUN_MAX && rng.chance(CRASH_P)
        });
        steps_used += steps;
        let crashed = match (life, flipped) {
            (Life::Refused { seq, .. }, Some(f)) => break Outcome::CorruptionDetected { found: seq, flipped: f },
            (Life::Refused { seq, reason }, None) => {
                break Outcome::Stuck(format!("recovery refused record {seq} without a flipped bit: {reason}"))
            }
            // The log opened although a record before its last has a flipped bit: whether recovery
            // read it back or cut the log there as if it were a torn tail, durable events were lost
            // or trusted silently.
            (_, Some(f)) => break Outcome::CorruptionMissed { flipped: f },
            (Life::Finished(state), _) => break Outcome::Finished(state.phase()),
            (Life::Crashed, _) => true,
            (Life::Stopped(_), _) => false,
            (Life::Failed(why) | Life::Stuck(why), _) => break Outcome::Stuck(why),
        };
        restarts += 1;
        if restarts > RESTARTS_MAX {
            break Outcome::Stuck(format!("{restarts} process starts without finishing"));
        }
        if crashed {
            crashes += 1;
            hits.insert(FaultKind::Crash);
            w.records.push(Record::Crash { at_ms: w.rt.now(), n: crashes });
            // Without lost-unflushed, a crash comes right after a flush: nothing pending is lost.
            let lose = cfg.crash_at_append.is_some() || cfg.on(FaultKind::LostUnflushed);
            let keep = if !lose {
                usize::MAX
            } else if cfg.crash_at_append.is_some() || rng.chance(0.5) {
                0
            } else {
                rng.below(8) as usize
            };
            let tear = (cfg.on(FaultKind::TornRecord) && rng.chance(0.8)).then(|| rng.unit_f64());
            let lost = w.crash(keep, tear, &mut rng);
            if lost.lost > 0 {
                hits.insert(FaultKind::LostUnflushed);
            }
            if lost.torn.is_some() {
                hits.insert(FaultKind::TornRecord);
            }
            // Damage to what a flush committed (records past the commit marker are a crash's
            // business: torn or lost, they are cut).
            let damage_now = crashes == CRASHES_PER_RUN_MAX.min(2) && flipped.is_none();
            let committed = w.log.committed_records();
            if damage_now && cfg.on(FaultKind::LogCut) && committed >= 2 && rng.chance(0.5) {
                flipped = w.log.cut_committed(rng.below(committed));
                hits.insert(FaultKind::LogCut);
            } else if damage_now && cfg.on(FaultKind::BitFlip) && committed >= 3 {
                let i = rng.below(committed) as usize;
                let bit = rng.next_u64();
                flipped = w.log.flip_bit(i, bit);
                hits.insert(FaultKind::BitFlip);
            }
        } else {
            w.records.push(Record::Stopped { at_ms: w.rt.now() });
        }
        promises.push(w.restart());
    };
    for h in w.cluster.hits() {
        if let Some(f) = FaultKind::parse(h) {
            hits.insert(f);
        }
    }
    // The snapshot controller catches up to the end of the run; what it did is on the record.
    w.cluster.settle();
    let storage = w.cluster.storage_snapshots();
    let leftover = w.cluster.snapshot_objects();
    let recs = w.records.snapshot();
    for r in &recs {
        match r {
            Record::Csi(crate::csi::CsiEvent::Failed { message, .. }) if message.contains("injected") => {
                hits.insert(FaultKind::SnapshotError);
            }
            Record::Csi(crate::csi::CsiEvent::Cut { at_ms, created_ms, .. }) if at_ms - created_ms >= 5_000 => {
                hits.insert(FaultKind::SnapshotSlow);
            }
            Record::Csi(crate::csi::CsiEvent::Stalled { what, .. }) => {
                hits.insert(match *what {
                    "handle" => FaultKind::HandleNeverSet,
                    "ready" => FaultKind::SnapshotNeverReady,
                    _ => FaultKind::GroupPartial,
                });
            }
            _ => {}
        }
    }
    if cfg.on(FaultKind::StoreWriteFailure) && recs.iter().any(|r| matches!(r, Record::StoreFailed { .. })) {
        hits.insert(FaultKind::StoreWriteFailure);
    }
    let events = w.durable_events();
    let mut files = w.stored_files();
    let archive = files.remove(&format!("{BACKUP}.tar.gz"));
    let mut trace = Vec::with_capacity(recs.len());
    let mut labels = Vec::with_capacity(recs.len());
    let mut h = 0u64;
    for r in &recs {
        let label = format!("{r:?}");
        h = fnv(h, label.as_bytes());
        trace.push(h);
        labels.push(label);
    }
    for e in &events {
        h = fnv(h, &blockwise_engine::event::encode_record(e));
    }
    trace.push(h);
    labels.push(format!("the final log ({} events)", events.len()));
    RunReport {
        outcome,
        records: recs,
        events,
        archive,
        files,
        promises,
        trace,
        trace_labels: labels,
        hits,
        crashes,
        makespan_ms: w.rt.now() - START_MS,
        storage,
        leftover,
        round_trip: None,
    }
}
