//! The deterministic simulation runtime: the production engine, unchanged, in a seeded world.
//!
//! One thread, no wall clock, no OS threads. [`simulate`] drives an [`Engine`] exactly as the
//! tokio runtime does — poll, append, flush when a command waits for durability, execute, complete
//! — but every command's duration comes from a seeded [`Rng`] and the next completion is the one
//! with the earliest virtual due time (ties broken by the PRNG). The log is in memory and models
//! durability: appends are lost on a crash unless flushed, a crash may tear the first lost record
//! into the stored log, and stored records can have a bit flipped; recovery goes through the same
//! [`recover_records`] as the sled log. Faults are chosen per seed ([`FaultKind`]) and every run
//! keeps a hash chain over each event and completion, so `(seed, commit)` reproduces a run and a
//! second run names the first step where it diverged.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use blockwise_engine::event::{encode_record, recover_records, Event, HookOutcome, Phase, Seq};
use blockwise_engine::hooks::HookPhase;
use blockwise_engine::item::ItemKey;
use blockwise_engine::ports::{Cluster, ClusterError};
use blockwise_engine::state::ArchiveInfo;
use blockwise_engine::{ArchiveEntry, Command, CommandKind, Completion, Engine, EngineConfig, Mutation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fake::FakeCluster;
use crate::model::{HookFault, Model};
use crate::rng::{mix64, Rng};

/// Engine interactions after which a run that has not finished counts as stuck (L1).
pub const RUN_STEPS_MAX: u64 = 200_000;
/// Crashes injected per run at most.
pub const CRASHES_PER_RUN_MAX: u32 = 3;
/// Retries of a transient list or store failure (the adapters' bounded retry, modelled).
pub const RETRIES_MAX: u32 = 4;

/// The fault types. Each is enabled or not per seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// The process dies at a random step and is resumed from the log.
    Crash,
    /// A crash loses appended but unflushed records.
    LostUnflushed,
    /// A crash leaves the first lost record half-written in the log.
    TornRecord,
    /// A stored record (not the last) has a bit flipped; recovery must refuse it.
    BitFlip,
    /// A hook exits non-zero.
    HookExit,
    /// A hook exec errors.
    HookError,
    /// A hook runs past its timeout.
    HookTimeout,
    /// A hook never returns.
    HookHang,
    /// A list call answers 5xx, then recovers.
    List5xx,
    /// A list call answers 429, then recovers after the retry delay.
    List429,
    /// A continued list answers 410 Gone: the listing restarts.
    List410,
    /// A pull target was deleted: the get finds nothing.
    DeletedBeforeGet,
    /// A store put fails, then succeeds on retry.
    StoreWriteFailure,
    /// A worker is ten to fifty times slower.
    SlowWorker,
    /// The clock jumps forward.
    ClockJump,
}

impl FaultKind {
    /// Every fault type.
    pub const ALL: [FaultKind; 15] = [
        FaultKind::Crash,
        FaultKind::LostUnflushed,
        FaultKind::TornRecord,
        FaultKind::BitFlip,
        FaultKind::HookExit,
        FaultKind::HookError,
        FaultKind::HookTimeout,
        FaultKind::HookHang,
        FaultKind::List5xx,
        FaultKind::List429,
        FaultKind::List410,
        FaultKind::DeletedBeforeGet,
        FaultKind::StoreWriteFailure,
        FaultKind::SlowWorker,
        FaultKind::ClockJump,
    ];

    /// The kebab-case name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::LostUnflushed => "lost-unflushed",
            FaultKind::TornRecord => "torn-record",
            FaultKind::BitFlip => "bit-flip",
            FaultKind::HookExit => "hook-exit",
            FaultKind::HookError => "hook-error",
            FaultKind::HookTimeout => "hook-timeout",
            FaultKind::HookHang => "hook-hang",
            FaultKind::List5xx => "list-5xx",
            FaultKind::List429 => "list-429",
            FaultKind::List410 => "list-410",
            FaultKind::DeletedBeforeGet => "deleted-before-get",
            FaultKind::StoreWriteFailure => "store-write-failure",
            FaultKind::SlowWorker => "slow-worker",
            FaultKind::ClockJump => "clock-jump",
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
    /// A deliberate engine bug, to test the checks.
    pub mutation: Option<Mutation>,
}

/// An effect on the world, in execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// An exec was sent.
    ExecStart { block: u32, attempt: u32, pod: ItemKey, phase: HookPhase },
    /// An exec returned.
    ExecEnd { block: u32, attempt: u32, pod: ItemKey, phase: HookPhase, ok: bool },
    /// An item write was sent.
    WriteStart { block: u32, attempt: u32, key: ItemKey },
    /// An item write returned.
    WriteEnd { block: u32, attempt: u32, key: ItemKey },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A terminal phase.
    Finished(Phase),
    /// Recovery refused a corrupt record: `found` is the sequence number it named, `flipped` the
    /// one the fault flipped.
    CorruptionDetected { found: Seq, flipped: Seq },
    /// No progress possible, or past [`RUN_STEPS_MAX`].
    Stuck(String),
}

/// Everything a run produced, for the checks.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// The durable log at the end.
    pub events: Vec<Event>,
    /// Effects in order.
    pub effects: Vec<Effect>,
    /// The archive as (path, sha256 of content), sorted, when finalized.
    pub archive: Option<Vec<(String, [u8; 32])>>,
    /// Hash chain over every event and completion.
    pub trace: Vec<u64>,
    /// Readable label of each trace step.
    pub trace_labels: Vec<String>,
    /// Faults that actually happened.
    pub hits: BTreeSet<FaultKind>,
    /// Crashes.
    pub crashes: u32,
    /// Virtual milliseconds from the request to the end of the run.
    pub makespan_ms: u64,
    /// Virtual milliseconds from the request to the end of planning (listing and gets).
    pub planned_ms: Option<u64>,
}

/// Command durations in virtual milliseconds, as inclusive ranges drawn per command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies {
    /// One list page.
    pub list_page_ms: (u64, u64),
    /// One get batch.
    pub get_ms: (u64, u64),
    /// One hook exec.
    pub exec_ms: (u64, u64),
    /// One item write.
    pub write_ms: (u64, u64),
}

impl Latencies {
    /// The spread used for simulated seeds.
    pub const SEEDED: Latencies =
        Latencies { list_page_ms: (5, 50), get_ms: (5, 20), exec_ms: (10, 120), write_ms: (1, 10) };
}

/// Engine bounds for simulated seeds: tiny pages and batches, so every path is exercised.
pub fn seeded_engine_config(workers: usize, mutation: Option<Mutation>) -> EngineConfig {
    EngineConfig {
        workers,
        list_page_items_max: 4,
        list_concurrency_max: 2,
        get_batch_items_max: 3,
        plan_chunk_blocks_max: 5,
        intent_lookahead_blocks: 2,
        mutation,
    }
}

/// Runs a future that never waits (the fake cluster without a sleeper) to completion.
fn now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The in-memory log: durable records and an unflushed tail.
#[derive(Default)]
struct SimLog {
    durable: Vec<Vec<u8>>,
    pending: Vec<Vec<u8>>,
    appends: u64,
}

impl SimLog {
    fn flush(&mut self) {
        self.durable.append(&mut self.pending);
    }
    fn durable_seq(&self) -> Option<Seq> {
        (self.durable.len() as Seq).checked_sub(1)
    }
}

struct InFlight {
    cmd_id: u64,
    due: u64,
    order: u64,
    completion: Completion,
    end: Option<Effect>,
}

struct World<'a> {
    model: Option<&'a Model>,
    cluster: FakeCluster,
    lat: Latencies,
    cfg: &'a RunConfig,
    rng: Rng,
    clock: u64,
    staged: BTreeMap<ItemKey, Vec<u8>>,
    archive: Option<Vec<(String, [u8; 32])>>,
    effects: Vec<Effect>,
    hits: BTreeSet<FaultKind>,
    trace: Vec<u64>,
    labels: Vec<String>,
    list_attempts: BTreeMap<String, u32>,
    gone_once: BTreeSet<String>,
    planned_ms: Option<u64>,
}

/// The virtual clock at the start of every run.
const START_MS: u64 = 1_000_000;

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h ^ 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl World<'_> {
    fn on(&self, f: FaultKind) -> bool {
        self.cfg.faults.contains(&f)
    }

    fn record(&mut self, label: String, payload: &[u8]) {
        let prev = self.trace.last().copied().unwrap_or(0);
        let mut h = fnv(prev, &(self.trace.len() as u64).to_le_bytes());
        h = fnv(h, &self.clock.to_le_bytes());
        h = fnv(h, label.as_bytes());
        h = fnv(h, payload);
        self.trace.push(h);
        self.labels.push(label);
    }

    fn hook_fault(&self, pod: &ItemKey, phase: HookPhase) -> Option<HookFault> {
        let p = self.model?.pods.iter().find(|p| p.name == pod.name)?;
        let h = p.hook.as_ref()?;
        let f = if phase == HookPhase::Pre { h.pre_fault } else { h.post_fault }?;
        let kind = match f {
            HookFault::Exit => FaultKind::HookExit,
            HookFault::Error => FaultKind::HookError,
            HookFault::Timeout => FaultKind::HookTimeout,
            HookFault::Hang => FaultKind::HookHang,
        };
        self.on(kind).then_some(f)
    }

    fn latency(&mut self, (base_lo, base_hi): (u64, u64)) -> u64 {
        let mut d = self.rng.range(base_lo, base_hi);
        if self.on(FaultKind::SlowWorker) && self.rng.chance(0.05) {
            self.hits.insert(FaultKind::SlowWorker);
            d *= self.rng.range(10, 50);
        }
        d
    }

    /// Executes a command: applies its start effect now and returns (completion, duration, end effect).
    fn execute(&mut self, kind: CommandKind) -> (Completion, u64, Option<Effect>) {
        match kind {
            CommandKind::Discover => {
                (Completion::Discovered(now(self.cluster.discover()).unwrap_or_else(|| Err(pending()))), 5, None)
            }
            CommandKind::List { unit, resource, limit, continue_token } => {
                let name = unit.to_string();
                let tries = self.list_attempts.entry(name.clone()).or_insert(0);
                *tries += 1;
                let first = *tries == 1;
                let mut extra = 0;
                if first && self.on(FaultKind::List5xx) && self.rng.chance(0.3) {
                    // The adapter retries a 5xx with backoff: the engine sees only the delay.
                    self.hits.insert(FaultKind::List5xx);
                    extra += 100 * u64::from(self.rng.range(1, u64::from(RETRIES_MAX)) as u32);
                }
                if first && self.on(FaultKind::List429) && self.rng.chance(0.3) {
                    self.hits.insert(FaultKind::List429);
                    extra += 1000;
                }
                if continue_token.is_some() && self.on(FaultKind::List410) && self.gone_once.insert(name) {
                    self.hits.insert(FaultKind::List410);
                    return (Completion::Listed(Err(ClusterError::Expired("410 Gone".into()))), 10, None);
                }
                let page =
                    now(self.cluster.list(&resource, unit.namespace.as_deref(), limit, continue_token.as_deref()))
                        .unwrap_or_else(|| Err(pending()));
                let d = self.latency(self.lat.list_page_ms) + extra;
                (Completion::Listed(page), d, None)
            }
            CommandKind::Get { items } => {
                let mut out = Vec::new();
                for (rt, key) in items {
                    let got = now(self.cluster.get(&rt, &key)).and_then(Result::ok).flatten();
                    if got.is_none() {
                        self.hits.insert(FaultKind::DeletedBeforeGet);
                    }
                    out.push((key, got));
                }
                (Completion::Fetched(Ok(out)), self.latency(self.lat.get_ms), None)
            }
            CommandKind::RunHook { block, attempt, hook } => {
                let pod = hook.pod.clone();
                self.effects.push(Effect::ExecStart { block, attempt, pod: pod.clone(), phase: hook.phase });
                let result = now(self.cluster.exec(&hook.pod, &hook.container, &hook.command));
                let mut d = self.latency(self.lat.exec_ms);
                let outcome = match (self.hook_fault(&pod, hook.phase), result) {
                    (Some(HookFault::Exit), _) => HookOutcome::Exited { code: 3, output: "injected".into() },
                    (Some(HookFault::Error), _) => {
                        HookOutcome::Errored { message: "connection reset (injected)".into() }
                    }
                    (Some(HookFault::Timeout | HookFault::Hang), _) => {
                        // The runtime's timeout fires and cancels the exec.
                        d = hook.timeout_ms;
                        HookOutcome::TimedOut { timeout_ms: hook.timeout_ms }
                    }
                    (None, Some(Ok(r))) if r.exit_code == 0 => HookOutcome::Succeeded,
                    (None, Some(Ok(r))) => HookOutcome::Exited { code: r.exit_code, output: r.stdout },
                    (None, Some(Err(e))) => HookOutcome::Errored { message: e.to_string() },
                    (None, None) => HookOutcome::Errored { message: "exec did not complete".into() },
                };
                if let Some(f) = self.hook_fault(&pod, hook.phase) {
                    self.hits.insert(match f {
                        HookFault::Exit => FaultKind::HookExit,
                        HookFault::Error => FaultKind::HookError,
                        HookFault::Timeout => FaultKind::HookTimeout,
                        HookFault::Hang => FaultKind::HookHang,
                    });
                }
                let ok = outcome.ok();
                let end = Effect::ExecEnd { block, attempt, pod, phase: hook.phase, ok };
                (Completion::HookRan(outcome), d, Some(end))
            }
            CommandKind::WriteItem { block, attempt, key, json } => {
                self.effects.push(Effect::WriteStart { block, attempt, key: key.clone() });
                let mut d = self.latency(self.lat.write_ms);
                if self.on(FaultKind::StoreWriteFailure) && self.rng.chance(0.05) {
                    // The store's bounded retry absorbs it: a delay, then success.
                    self.hits.insert(FaultKind::StoreWriteFailure);
                    d += 50 * self.rng.range(1, u64::from(RETRIES_MAX));
                }
                self.staged.insert(key.clone(), json.as_bytes().to_vec());
                (Completion::Written(Ok(())), d, Some(Effect::WriteEnd { block, attempt, key }))
            }
            CommandKind::Finalize { entries } => (Completion::Finalized(self.finalize(&entries)), 20, None),
        }
    }

    fn finalize(&mut self, entries: &[ArchiveEntry]) -> Result<ArchiveInfo, String> {
        let mut files = vec![("metadata/version".to_string(), Sha256::digest(b"1.1.0").into())];
        for e in entries {
            let bytes = self.staged.get(&e.key).ok_or_else(|| format!("{} was never staged", e.key))?;
            let digest: [u8; 32] = Sha256::digest(bytes).into();
            if digest != e.digest {
                return Err(format!("{}: staged bytes do not match the logged digest", e.key));
            }
            files.push((e.key.archive_path(), digest));
            files.push((e.key.preferred_version_path(&e.version), digest));
        }
        files.sort();
        let mut h = Sha256::new();
        for (p, d) in &files {
            h.update(p.as_bytes());
            h.update(d);
        }
        let digest: [u8; 32] = h.finalize().into();
        self.archive = Some(files);
        Ok(ArchiveInfo { digest, bytes: 0, items: entries.len() as u64 })
    }
}

fn pending() -> ClusterError {
    ClusterError::Other("the fake cluster waited, which it cannot do under simulation".into())
}

/// Assigns the model's hook faults for this seed: deterministic per pod.
pub fn assign_hook_faults(model: &mut Model, faults: &BTreeSet<FaultKind>, rng: &mut Rng) {
    let kinds: Vec<HookFault> = [
        (FaultKind::HookExit, HookFault::Exit),
        (FaultKind::HookError, HookFault::Error),
        (FaultKind::HookTimeout, HookFault::Timeout),
        (FaultKind::HookHang, HookFault::Hang),
    ]
    .into_iter()
    .filter(|(k, _)| faults.contains(k))
    .map(|(_, f)| f)
    .collect();
    if kinds.is_empty() {
        return;
    }
    for p in model.pods.iter_mut() {
        if let Some(h) = p.hook.as_mut() {
            if rng.chance(0.4) {
                h.pre_fault = rng.pick(&kinds).copied();
            }
            if rng.chance(0.2) {
                h.post_fault = rng.pick(&kinds).copied();
            }
        }
    }
}

/// Runs one backup of `model` in the simulated world.
pub fn simulate(model: &Model, cfg: &RunConfig) -> RunReport {
    let ecfg = seeded_engine_config(cfg.workers, cfg.mutation);
    simulate_world(model.fake(), &model.spec("sim"), Some(model), cfg, &ecfg, Latencies::SEEDED)
}

/// Runs one backup of any fake cluster with `spec`, engine bounds `ecfg` and latencies `lat`;
/// `model` (when the cluster came from one) supplies per-pod hook faults.
pub fn simulate_world(
    cluster: FakeCluster,
    spec: &blockwise_engine::BackupSpec,
    model: Option<&Model>,
    cfg: &RunConfig,
    ecfg: &EngineConfig,
    lat: Latencies,
) -> RunReport {
    let mut w = World {
        model,
        cluster,
        lat,
        cfg,
        rng: Rng::new(mix64(cfg.seed)),
        clock: START_MS,
        staged: BTreeMap::new(),
        archive: None,
        effects: Vec::new(),
        hits: BTreeSet::new(),
        trace: Vec::new(),
        labels: Vec::new(),
        list_attempts: BTreeMap::new(),
        gone_once: BTreeSet::new(),
        planned_ms: None,
    };
    let ecfg = ecfg.clone();
    let mut log = SimLog::default();
    let mut crashes = 0u32;
    // Crashes are drawn from the run's PRNG, so the crash schedule is part of the seed.
    let crash_p = if cfg.faults.contains(&FaultKind::Crash) { 0.03 } else { 0.0 };
    let mut engine = match Engine::new(spec.clone(), ecfg.clone(), w.clock) {
        Ok(e) => e,
        Err(e) => {
            return finish(w, log, Outcome::Stuck(format!("spec rejected: {e}")), crashes);
        }
    };
    let mut waiting: Vec<Command> = Vec::new();
    let mut inflight: Vec<InFlight> = Vec::new();
    let mut order = 0u64;
    let mut step = 0u64;
    let outcome = loop {
        step += 1;
        if step > RUN_STEPS_MAX {
            break Outcome::Stuck(format!("no terminal phase after {RUN_STEPS_MAX} steps"));
        }
        engine.set_now(w.clock);
        let out = engine.poll();
        let mut crash_now = false;
        for (seq, ev) in &out.events {
            let bytes = encode_record(ev);
            w.record(format!("event {seq} {}", ev.kind()), &bytes);
            log.pending.push(bytes);
            log.appends += 1;
            if cfg.crash_at_append == Some(log.appends) {
                crash_now = true;
            }
        }
        waiting.extend(out.commands);
        if w.planned_ms.is_none() && engine.state().plan_finished {
            w.planned_ms = Some(w.clock - START_MS);
        }
        if let Some(f) = engine.fatal() {
            break Outcome::Stuck(format!("engine stopped: {f}"));
        }
        if !crash_now && crashes < CRASHES_PER_RUN_MAX && w.rng.chance(crash_p) {
            crash_now = true;
        }
        if crash_now {
            crashes += 1;
            w.hits.insert(FaultKind::Crash);
            w.record(format!("crash {crashes}"), &[]);
            // Without the fault, a random crash comes right after a flush.
            if cfg.crash_at_append.is_none() && !cfg.faults.contains(&FaultKind::LostUnflushed) {
                log.flush();
            }
            if !log.pending.is_empty() {
                w.hits.insert(FaultKind::LostUnflushed);
                if cfg.faults.contains(&FaultKind::TornRecord) && w.rng.chance(0.8) {
                    let first = &log.pending[0];
                    let cut = w.rng.range(1, first.len().saturating_sub(1).max(1) as u64) as usize;
                    log.durable.push(first[..cut.min(first.len())].to_vec());
                    w.hits.insert(FaultKind::TornRecord);
                }
                log.pending.clear();
            }
            let mut flipped = None;
            if cfg.faults.contains(&FaultKind::BitFlip)
                && crashes == CRASHES_PER_RUN_MAX.min(2)
                && log.durable.len() >= 3
            {
                let i = w.rng.below(log.durable.len() as u64 - 1) as usize;
                let rec = &mut log.durable[i];
                let bit = w.rng.below(rec.len() as u64 * 8) as usize;
                rec[bit / 8] ^= 1 << (bit % 8);
                flipped = Some(i as Seq);
                w.hits.insert(FaultKind::BitFlip);
            }
            inflight.clear();
            waiting.clear();
            // Restart: recover the log exactly as the sled log does, then resume the engine.
            let recovered = recover_records(log.durable.iter().enumerate().map(|(i, r)| (i as Seq, r.as_slice())));
            let recovered = match (recovered, flipped) {
                (Err(e), Some(f)) => break Outcome::CorruptionDetected { found: e.seq, flipped: f },
                (Err(e), None) => break Outcome::Stuck(format!("recovery failed without a flipped bit: {e}")),
                (Ok(r), Some(f)) if r.cut_tail.as_ref().is_none_or(|(s, _)| *s != f) => {
                    break Outcome::Stuck(format!("bit flipped in record {f} was read back silently"));
                }
                (Ok(r), _) => r,
            };
            if recovered.cut_tail.is_some() {
                log.durable.pop();
            }
            w.record(format!("recovered {} events", recovered.events.len()), &[]);
            // Nothing durable means the backup was never created: the user creates it again.
            let restarted = if recovered.events.is_empty() {
                Engine::new(spec.clone(), ecfg.clone(), w.clock).map_err(|e| e.to_string())
            } else {
                Engine::resume(&recovered.events, ecfg.clone(), w.clock).map_err(|e| e.to_string())
            };
            engine = match restarted {
                Ok(e) => e,
                Err(e) => break Outcome::Stuck(format!("resume failed: {e}")),
            };
            continue;
        }
        // Group commit: one flush for everything appended, when a command waits for it.
        let blocked = waiting.iter().any(|c| c.after_seq.is_some_and(|s| log.durable_seq().is_none_or(|d| s > d)));
        if blocked || engine.is_finished() || (inflight.is_empty() && !log.pending.is_empty()) {
            w.record("flush".into(), &(log.pending.len() as u64).to_le_bytes());
            log.flush();
        }
        if engine.is_finished() && inflight.is_empty() {
            break Outcome::Finished(engine.state().phase());
        }
        let durable = log.durable_seq();
        let (go, stay): (Vec<Command>, Vec<Command>) =
            waiting.drain(..).partition(|c| c.after_seq.is_none_or(|s| durable.is_some_and(|d| s <= d)));
        waiting = stay;
        for cmd in go {
            let (completion, d, end) = w.execute(cmd.kind);
            order += 1;
            inflight.push(InFlight {
                cmd_id: cmd.id,
                due: w.clock + d,
                order: w.rng.next_u64() ^ order,
                completion,
                end,
            });
        }
        if inflight.is_empty() {
            break Outcome::Stuck("nothing in flight and the backup is not finished".into());
        }
        // The next completion: earliest due time, ties by a seeded draw.
        let next = inflight.iter().enumerate().min_by_key(|(_, f)| (f.due, f.order)).map(|(i, _)| i).unwrap_or(0);
        let f = inflight.swap_remove(next);
        w.clock = w.clock.max(f.due);
        if w.on(FaultKind::ClockJump) && w.rng.chance(0.01) {
            w.hits.insert(FaultKind::ClockJump);
            w.clock += w.rng.range(60_000, 3_600_000);
        }
        if let Some(e) = f.end {
            w.effects.push(e);
        }
        w.record(format!("complete {}", f.cmd_id), format!("{:?}", f.completion).as_bytes());
        engine.set_now(w.clock);
        engine.complete(f.cmd_id, f.completion);
    };
    finish(w, log, outcome, crashes)
}

fn finish(w: World<'_>, mut log: SimLog, outcome: Outcome, crashes: u32) -> RunReport {
    log.flush();
    let events = recover_records(log.durable.iter().enumerate().map(|(i, r)| (i as Seq, r.as_slice())))
        .map(|r| r.events)
        .unwrap_or_default();
    RunReport {
        outcome,
        events,
        effects: w.effects,
        archive: w.archive,
        trace: w.trace,
        trace_labels: w.labels,
        hits: w.hits,
        crashes,
        makespan_ms: w.clock - START_MS,
        planned_ms: w.planned_ms,
    }
}
