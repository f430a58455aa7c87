//! The scheduler: given the folded state and a worker count, decide the next commands.
//!
//! [`Engine`] is sans-IO. A runtime calls [`Engine::poll`] to get the events to append and the
//! commands to execute, runs the commands however it likes (tokio workers, or the simulator's
//! seeded single thread), and reports each result with [`Engine::complete`]. Every state change
//! goes through an event applied to [`BackupState`], so the durable log alone rebuilds the state
//! on [`Engine::resume`]; the only other memory is what is in flight, which a crash loses anyway.
//!
//! Write-ahead discipline is carried by [`Command::after_seq`]: an effect may only be executed once
//! the event with that sequence number (its intent: `HookStarted` for an exec, `BlockStarted` for a
//! write) is durable. Reads (discovery, list, get) need nothing durable first.
//!
//! A block attempt is the explicit state machine [`BlockRun`]; its transitions live in
//! `advance_block` (what to do next) and `block_completion` (what a result means). Recovery is
//! the same machine started in [`BlockRun::ClosingInterrupted`].
//!
//! A store failure (a staging write or the archive build failing after the store's own retries)
//! is not an item error: the engine starts nothing new, closes every open hook window (each block
//! in flight runs the post-hooks its attempt owes, in [`BlockRun::Closing`]), then records
//! `RunStopped` and issues nothing more, so `resume` finishes the backup once the store is back. A
//! resumed stopped run first records `RunResumed`. A cluster that cannot be reached
//! ([`Completion::Unreachable`], issue 22) stops the run the same way, recording nothing of the
//! command: a post-hook it kept from running stays owed (its window open in the log), and a cut it
//! interrupted leaves its window open for `resume` to finish the cut inside it (as after a kill).
//! An archive build that finds staged items missing
//! or changed stages them again from the log (`Restage`) and builds again, a bounded number of times.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::body::{Body, BodyId};
use crate::catalog::Catalog;
use crate::event::{BlockOutcome, Event, HookOutcome, HookRef, ListUnit, Phase, Seq, Severity};
use crate::grouping::{builtin_actions, plan, BlockPlan, Index, ItemBlockAction, PlanBlocks, PlanInput, PlanStep};
use crate::hooks::{Hook, HookPhase, OnError};
use crate::item::{GroupResource, Item, ItemKey, PodFacts, ResourceType};
use crate::mutation::{self, Mutation};
use crate::ports::{ClusterError, ListPage, PlanSource};
use crate::snapshot::{
    self, archived_member, BackupOptions, Claim, Claims, CutOrder, CutRaw, PvVolume, ReadyWait, ReleaseOrder,
    SnapshotApi, SnapshotPlan, SnapshotPlanInput, VolumeInventory,
};
use crate::spec::{BackupSpec, Selection, SpecError};
use crate::state::{self, ArchiveInfo, BackupState, Cut, FoldError, SnapshotState};

/// Identifies a command until its completion is reported.
pub type CmdId = u64;

/// Bounds and knobs of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Blocks processed at once.
    pub workers: usize,
    /// Page size asked of list calls.
    pub list_page_items_max: u32,
    /// Listing units in flight at once.
    pub list_concurrency_max: usize,
    /// Keys per get command.
    pub get_batch_items_max: usize,
    /// Blocks per `BlockPlanned` event.
    pub plan_chunk_blocks_max: usize,
    /// Blocks whose `BlockStarted` intent is recorded ahead of a free worker, so that one log
    /// flush covers many block starts instead of one flush per block.
    pub intent_lookahead_blocks: usize,
    /// Bytes of object JSON in one `ResourceListed` or `ItemsFetched` record: a page of large
    /// objects is split over several records, so no record nears the codec's payload limit.
    pub record_objects_bytes_max: usize,
    /// Times the archive build may be retried after re-staging items it found missing or changed.
    pub restage_rounds_max: u32,
    /// Snapshots one `AwaitSnapshots` watches (the earliest cut first): each round of it reads
    /// every one, so watching all of thousands at once cost reads quadratic in their number.
    pub await_snapshots_max: usize,
    /// Snapshots one `ReleaseSnapshots` releases: each order copies its snapshot's plan, and the
    /// snapshots of every block with claims settle together when those blocks go first — one
    /// command for all of them was ~40 MB at a million objects (60k snapshots), the 1M backup's
    /// peak. The next poll issues the next ones.
    pub release_orders_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 8,
            list_page_items_max: 500,
            list_concurrency_max: 4,
            get_batch_items_max: 100,
            plan_chunk_blocks_max: 512,
            intent_lookahead_blocks: 64,
            record_objects_bytes_max: 4 << 20,
            await_snapshots_max: 64,
            release_orders_max: 1024,
            restage_rounds_max: 2,
        }
    }
}

/// What a runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandKind {
    /// Discover listable resource types.
    Discover,
    /// List one page.
    List { unit: ListUnit, resource: ResourceType, limit: u32, continue_token: Option<String> },
    /// Get objects by key; each key's result is reported on its own.
    Get { items: Vec<(ResourceType, ItemKey)> },
    /// Exec a hook (the runtime enforces `hook.timeout_ms`).
    RunHook { block: u32, attempt: u32, hook: Hook },
    /// Stage one item's canonical JSON under its deterministic key (idempotent): the bytes, or the
    /// logged object to read back (`crate::body`).
    WriteItem { block: u32, attempt: u32, key: ItemKey, body: Body },
    /// Stage again an item the archive build found missing or changed; its `ItemWritten` fact is
    /// already in the log, so the bytes are the logged ones and nothing new is recorded.
    Restage { key: ItemKey, body: Body },
    /// Build the archive from the staged items: the writes of the log that
    /// [`crate::entries::final_write`] keeps over the engine's state, gathered by the shell (every
    /// event is durable when this is issued). The entries are not in the command: the fold does
    /// not hold them.
    Finalize,
    /// Read the claims' PersistentVolumes (`pvs`) and list the snapshot classes of `classes`
    /// (VolumeSnapshotClasses, then VolumeGroupSnapshotClasses when served).
    InspectVolumes { pvs: Vec<(ResourceType, ItemKey)>, classes: Vec<ResourceType> },
    /// Create (or get) each snapshot and wait until it is cut, each within `timeout_ms`; the
    /// snapshots are taken inside attempt `attempt` of block `block`'s hook window.
    CutSnapshots {
        block: u32,
        attempt: u32,
        api: SnapshotApi,
        group_label: String,
        orders: Vec<CutOrder>,
        timeout_ms: u64,
    },
    /// Wait until one or more cut snapshots are ready to use, or past their deadline.
    AwaitSnapshots { api: SnapshotApi, waits: Vec<ReadyWait> },
    /// Remove the snapshots' cluster objects, retaining or deleting their storage snapshots.
    ReleaseSnapshots { api: SnapshotApi, group_label: String, orders: Vec<ReleaseOrder> },
}

/// A command and the durability it waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Id to report the completion with.
    pub id: CmdId,
    /// Execute only once events up to this sequence number are durable.
    pub after_seq: Option<Seq>,
    /// What to do.
    pub kind: CommandKind,
}

/// The result of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Result of `Discover`.
    Discovered(Result<Vec<ResourceType>, ClusterError>),
    /// Result of `List`.
    Listed(Result<ListPage, ClusterError>),
    /// Result of `Get`, per key: raw JSON, `None` when not found, or why the get failed.
    Fetched(Vec<(ItemKey, Result<Option<String>, ClusterError>)>),
    /// Result of `RunHook`.
    HookRan(HookOutcome),
    /// Result of `WriteItem`: the sha256 and length of the bytes staged.
    Written(Result<([u8; 32], u64), String>),
    /// Result of `Restage`.
    Restaged(Result<(), String>),
    /// Result of `Finalize`.
    Finalized(Result<ArchiveInfo, FinalizeError>),
    /// Result of `InspectVolumes`.
    VolumesInspected(VolumeInventory),
    /// Result of `CutSnapshots`, per snapshot id.
    SnapshotsCut(Vec<(u32, Result<CutRaw, String>)>),
    /// Result of `AwaitSnapshots`: the snapshots that settled (ready, or why not), at least one.
    SnapshotsSettled(Vec<(u32, Result<(), String>)>),
    /// Result of `ReleaseSnapshots`, per snapshot id.
    SnapshotsReleased(Vec<(u32, Result<(), String>)>),
    /// Any command on the cluster: the API server could not be reached (past the shell's retries
    /// and deadlines), so nothing of the command is known to have happened. The run stops — it does
    /// not fail — and nothing of the command is recorded: `resume` does it again (issue 22).
    Unreachable(String),
}

/// Why building the archive failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalizeError {
    /// Staged items are missing or differ from their logged digest: stage them again.
    Unstaged {
        /// The items.
        keys: Vec<ItemKey>,
        /// The store's message.
        message: String,
    },
    /// The store failed.
    Store(String),
}

impl std::fmt::Display for FinalizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FinalizeError::Unstaged { message, .. } | FinalizeError::Store(message) => f.write_str(message),
        }
    }
}

/// What one `poll` hands the runtime.
#[derive(Debug, Default)]
pub struct Output {
    /// Events to append, in order.
    pub events: Vec<(Seq, Event)>,
    /// Commands to execute, each once its `after_seq` is durable.
    pub commands: Vec<Command>,
    /// The engine has more to record before it waits for a command: poll again (once these
    /// events are appended) without waiting for one to complete.
    pub more: bool,
}

/// Blocks a poll records of a plan being recorded ([`Engine::record_plan`]).
const PLAN_BLOCKS_PER_POLL: usize = 8192;

/// A finished plan being recorded a poll at a time.
struct Recording {
    /// The blocks' plans being made; gone once every block is recorded, the plan's keys with them.
    blocks: Option<PlanBlocks>,
    /// How many blocks the plan has.
    block_count: u32,
    /// The snapshots' plans not recorded yet, packed (a plan in memory is ~700 bytes, and they are
    /// made while the plan's keys are still held).
    snapshots: std::iter::Peekable<std::vec::IntoIter<Box<[u8]>>>,
    /// Items of the plan's blocks.
    items: u64,
}

/// The life of one block attempt in this process.
#[derive(Debug, Clone, PartialEq)]
enum BlockRun {
    /// Closing an attempt a crash interrupted: its owed post-hooks, then a fresh attempt.
    ClosingInterrupted { attempt: u32, owed: Vec<Hook>, next: usize },
    /// Running pre-hook `next` of the current attempt.
    Pre { next: usize },
    /// Waiting for the block's snapshots to be cut (inside the window).
    Cutting,
    /// Recovery: the interrupted attempt was cutting snapshots inside its still-open window; they
    /// are cut (created-or-got) before the window is closed by the `owed` post-hooks.
    FinishingCut { attempt: u32, owed: Vec<Hook> },
    /// Writing entry `next` of the attempt's writes.
    Writing { next: usize },
    /// Running post-hook `next` of `hooks`; the block then ends with `failed` as its reason.
    Post { hooks: Vec<Hook>, next: usize, failed: Option<String> },
    /// The run is stopping (a store failure): running the post-hooks this attempt owes, after
    /// which the block is left open for `resume` to redo.
    Closing { hooks: Vec<Hook>, next: usize },
}

/// One entry of a block attempt's writes.
#[derive(Debug, Clone)]
enum PlannedWrite {
    /// Stage this object.
    Write { key: ItemKey, body: Body },
    /// The item cannot be written: record why.
    Fail { key: ItemKey, error: String },
}

#[derive(Debug, Clone)]
struct Run {
    state: BlockRun,
    attempt: u32,
    intent_seq: Seq,
    busy: bool,
    writes_done: bool,
    /// The attempt's writes, fixed when writing starts.
    writes: Option<Arc<Vec<PlannedWrite>>>,
    /// The snapshots were cut already in this attempt (the `SnapshotBeforePreHooks` mutation).
    captured: bool,
}

impl Run {
    fn new(state: BlockRun, attempt: u32, intent_seq: Seq) -> Run {
        Run { state, attempt, intent_seq, busy: false, writes_done: false, writes: None, captured: false }
    }
}

#[derive(Debug, Clone)]
enum Pending {
    Discover,
    List { unit: ListUnit, chunk: u32 },
    Get,
    Block(u32),
    Restage(ItemKey),
    Finalize,
    Inspect,
    Await,
    Release,
}

/// Why a log cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// The events do not fold.
    #[error(transparent)]
    Fold(#[from] FoldError),
    /// The recorded spec no longer compiles.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Nothing was ever recorded.
    #[error("the log is empty")]
    Empty,
    /// Reading the log back failed.
    #[error("reading the log: {0}")]
    Log(String),
}

/// A log that can be read from its start as often as asked: each call gives every event, in order,
/// to the function it is given ([`Engine::resume_folded`]).
pub type Replay<'a> = dyn FnMut(&mut dyn FnMut(&Event)) -> Result<(), String> + 'a;

/// The backup engine: state, decisions, nothing else.
pub struct Engine {
    cfg: EngineConfig,
    state: BackupState,
    selection: Selection,
    actions: Vec<Box<dyn ItemBlockAction>>,
    now_ms: u64,
    out: Output,
    inflight: BTreeMap<CmdId, Pending>,
    next_cmd: CmdId,
    discovering: bool,
    listing: BTreeSet<ListUnit>,
    fetching: bool,
    /// The write path's view of every known object, once the plan is finished ([`Objects`]: by
    /// key digest, [`ItemKey::digest`] — the keys themselves were ~200 bytes an item more; a hash
    /// map's buckets, up to twice the objects, ~40 MB more at a million).
    objects: Option<Objects>,
    /// Every block plan is made by this process and carries its items' bodies: no view is made.
    plan_bodies: bool,
    /// Every listed and fetched object as planning sees it (bodies nobody reads dropped, pods
    /// projected), each with where its JSON is, packed ([`Catalog`]); handed to the plan being
    /// recorded (its keys) once `objects` is built, and dropped with it.
    catalog: Catalog,
    /// A resumed backup's objects when its plan was finished: what the write path's view is made
    /// of, without their keys or items ([`Resumed`]).
    resumed: Resumed,
    runs: BTreeMap<u32, Run>,
    /// Interrupted attempts waiting for a worker to close them (recovery).
    recovering: VecDeque<(u32, Run)>,
    /// Blocks whose `BlockStarted` is recorded, waiting for a worker.
    primed: VecDeque<(u32, u32, Seq)>,
    /// Position in [`Engine::start_order`] of the next block to consider starting.
    cursor: usize,
    /// The order in which blocks start, fixed once the plan is: see [`Engine::start_order`].
    order: Option<Vec<u32>>,
    finalizing: bool,
    /// Restage commands in flight.
    restaging: usize,
    /// Archive builds retried after re-staging.
    restage_rounds: u32,
    /// A store failure: the run closes its open hook windows, then records `RunStopped`.
    stopping: Option<String>,
    fatal: Option<String>,
    /// The volume inspection is in flight.
    inspecting: bool,
    /// The finished item plan and its claims, kept while the volumes are inspected.
    pending_plan: Option<(crate::grouping::PlanShape, Claims)>,
    /// Volume facts read from listed objects, recorded with the inspection's answer.
    known_volumes: Vec<(String, PvVolume)>,
    /// The snapshot API the cluster serves, and why group snapshots cannot be used.
    api: Option<(Option<SnapshotApi>, Option<String>)>,
    /// An `AwaitSnapshots` is in flight.
    awaiting: bool,
    /// A `ReleaseSnapshots` is in flight.
    releasing: bool,
    /// Where the plans of blocks without hooks are read when the blocks start (the fold keeps
    /// only the plans of blocks with hooks).
    plans: PlanHold,
    /// The plan being recorded, when it is ([`Engine::record_plan`]).
    recording: Option<Recording>,
    /// The plans recorded since the last `poll`, consecutive ids: the shell appends them to its
    /// log (and its [`PlanSource`]) before it polls again.
    fresh: Vec<Arc<BlockPlan>>,
}

/// Where an engine reads its block plans back.
enum PlanHold {
    /// Every plan, held here: an engine no shell drives (tests, benchmarks of the engine alone).
    Own(Vec<Arc<BlockPlan>>),
    /// The shell's log ([`Engine::use_plans`]).
    Source(Arc<dyn PlanSource>),
}

impl Engine {
    /// Starts a new backup with default options; the first event is `BackupRequestedWithOptions`.
    pub fn new(spec: BackupSpec, cfg: EngineConfig, now_ms: u64) -> Result<Engine, SpecError> {
        Engine::with_options(spec, BackupOptions::default(), cfg, now_ms)
    }

    /// Starts a new backup with `options`.
    pub fn with_options(
        spec: BackupSpec,
        options: BackupOptions,
        cfg: EngineConfig,
        now_ms: u64,
    ) -> Result<Engine, SpecError> {
        let first = Engine::request(spec.clone(), options, cfg.workers, now_ms)?;
        let selection = Selection::compile(&spec)?;
        let actions = builtin_actions(&spec.volume_group_label);
        let mut e = Engine::with_state(cfg, BackupState::default(), selection, actions);
        e.now_ms = now_ms;
        e.emit(first);
        Ok(e)
    }

    /// The first event of a backup, once its spec is known to be valid. A shell that must make a
    /// backup's creation crash-atomic records it durably itself, then [`Engine::resume`]s.
    pub fn request(spec: BackupSpec, options: BackupOptions, workers: usize, now_ms: u64) -> Result<Event, SpecError> {
        Selection::compile(&spec)?;
        Ok(Event::BackupRequestedWithOptions { spec, options, workers: workers as u32, at_ms: now_ms })
    }

    /// Rebuilds an engine from a log; in-flight blocks will first close their interrupted attempt.
    pub fn resume<'a>(
        events: impl IntoIterator<Item = &'a Event>,
        cfg: EngineConfig,
        now_ms: u64,
    ) -> Result<Engine, ResumeError> {
        let events: Vec<&Event> = events.into_iter().collect();
        let state = BackupState::fold(events.iter().copied())?;
        let mut replay = |f: &mut dyn FnMut(&Event)| {
            events.iter().for_each(|e| f(e));
            Ok(())
        };
        Engine::resume_folded(state, &mut replay, None, cfg, now_ms)
    }

    /// [`Engine::resume`] for a shell that has already folded the log into `state` while it read
    /// the log one record at a time ([`crate::state::Folding`]): the log is read once more, for the
    /// catalog, so that no `Vec` of every event is ever held — a resumed backup of a million
    /// objects holds what its state needs, not its log. With `plans` (the shell's log), block
    /// plans are read back from it ([`Engine::use_plans`]); without, the engine holds them.
    pub fn resume_folded(
        state: BackupState,
        replay: &mut Replay<'_>,
        plans: Option<Arc<dyn PlanSource>>,
        cfg: EngineConfig,
        now_ms: u64,
    ) -> Result<Engine, ResumeError> {
        let spec = state.spec.clone().ok_or(ResumeError::Empty)?;
        let selection = Selection::compile(&spec)?;
        let actions = builtin_actions(&spec.volume_group_label);
        let mut e = Engine::with_state(cfg, state, selection, actions);
        e.now_ms = now_ms;
        if let Some(p) = plans {
            e.use_plans(p);
        }
        let types: BTreeMap<GroupResource, ResourceType> =
            e.resource_types().into_iter().map(|(g, r)| (g.clone(), r.clone())).collect();
        let mut n: u64 = 0;
        replay(&mut |ev| e.catalog_push(&types, &mut n, ev)).map_err(ResumeError::Log)?;
        if e.state.stopped.is_some() {
            e.emit(Event::RunResumed { at_ms: now_ms });
        }
        e.recover();
        Ok(e)
    }

    /// Adds a user-defined ItemBlockAction (before the first poll).
    pub fn add_action(&mut self, action: Box<dyn ItemBlockAction>) {
        self.actions.push(action);
    }

    fn with_state(
        cfg: EngineConfig,
        state: BackupState,
        selection: Selection,
        actions: Vec<Box<dyn ItemBlockAction>>,
    ) -> Engine {
        Engine {
            cfg,
            state,
            selection,
            actions,
            now_ms: 0,
            out: Output::default(),
            inflight: BTreeMap::new(),
            next_cmd: 0,
            discovering: false,
            listing: BTreeSet::new(),
            fetching: false,
            objects: None,
            plan_bodies: false,
            catalog: Catalog::new(),
            resumed: Resumed::default(),
            runs: BTreeMap::new(),
            recovering: VecDeque::new(),
            primed: VecDeque::new(),
            cursor: 0,
            order: None,
            finalizing: false,
            restaging: 0,
            restage_rounds: 0,
            stopping: None,
            fatal: None,
            inspecting: false,
            pending_plan: None,
            known_volumes: Vec::new(),
            api: None,
            awaiting: false,
            releasing: false,
            plans: PlanHold::Own(Vec::new()),
            recording: None,
            fresh: Vec::new(),
        }
    }

    /// Reads the plans of blocks without hooks back from `plans` (the shell's log, which holds
    /// every plan recorded) instead of holding them: the driver calls it before its first poll.
    pub fn use_plans(&mut self, plans: Arc<dyn PlanSource>) {
        self.plans = PlanHold::Source(plans);
    }

    /// The plan of block `id`: the fold's (a block with hooks), one recorded since the last poll,
    /// or one read back.
    fn plan_of(&self, id: u32) -> Result<Arc<BlockPlan>, String> {
        if let Some(p) = self.state.blocks.get(id as usize).and_then(|b| b.plan.clone()) {
            return Ok(p);
        }
        let first = self.fresh.first().map_or(u32::MAX, |p| p.id);
        if let Some(p) = id.checked_sub(first).and_then(|i| self.fresh.get(i as usize)) {
            return Ok(p.clone());
        }
        match &self.plans {
            PlanHold::Own(v) => v.get(id as usize).cloned().ok_or_else(|| format!("block {id} is not planned")),
            PlanHold::Source(s) => s.plan(id),
        }
    }

    /// Keeps the plans a recorded `BlockPlanned` carries where [`Engine::plan_of`] finds them.
    fn keep_plans(&mut self, e: &Event) {
        let Event::BlockPlanned { blocks } = e else { return };
        match &mut self.plans {
            PlanHold::Own(v) => v.extend(blocks.iter().cloned()),
            PlanHold::Source(_) => self.fresh.extend(blocks.iter().cloned()),
        }
    }

    /// What a crash left open: every in-flight block first runs the post-hooks it owes.
    fn recover(&mut self) {
        for (id, b) in self.state.blocks.iter().enumerate() {
            if mutation::active(Mutation::RedoFinishedBlocks) && b.outcome == Some(BlockOutcome::Completed) {
                // Deliberate bug: write a finished block's items again.
                let attempt = b.attempts.max(1);
                self.recovering.push_back((id as u32, Run::new(BlockRun::Writing { next: 0 }, attempt, 0)));
                continue;
            }
            let Some(a) = b.attempt.as_ref().filter(|_| b.in_flight()) else { continue };
            let owed = if mutation::active(Mutation::SkipOwedPostHooks) { Vec::new() } else { owed_post_hooks(&b) };
            // An attempt interrupted while cutting snapshots left its window open: the cut is
            // finished inside it (create-or-get) before the owed post-hooks close it, so every
            // snapshot of the block is from that one window and none is taken twice.
            let cutting = !mutation::active(Mutation::SecondSnapshotAfterResume)
                && self.state.snapshots_of(id as u32).any(|s| s.requested.is_some() && !s.settled());
            let state = if cutting {
                BlockRun::FinishingCut { attempt: a.number, owed }
            } else {
                BlockRun::ClosingInterrupted { attempt: a.number, owed, next: 0 }
            };
            self.recovering.push_back((id as u32, Run::new(state, a.number, 0)));
        }
    }

    /// Sets the clock used to stamp events (the runtime's clock, virtual or real).
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// The folded state.
    pub fn state(&self) -> &BackupState {
        &self.state
    }

    /// The folded state, taken (the engine is done with).
    pub fn into_state(self) -> BackupState {
        self.state
    }

    /// Whether the backup reached a terminal phase.
    pub fn is_finished(&self) -> bool {
        self.state.finished.is_some()
    }

    /// A bug-level inconsistency that stopped the engine, if any.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// Why the run stopped (a store failure recorded as `RunStopped`), if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.state.stopped.as_deref()
    }

    /// A store failure: stop starting work, close every open hook window (DESIGN §4: the post-hooks
    /// run whatever happened), then record `RunStopped`, after which nothing is issued and every
    /// completion is ignored.
    fn stop(&mut self, reason: String) {
        if self.stopping.is_some() {
            return;
        }
        if mutation::active(Mutation::StopWithoutClosingWindows) {
            let at_ms = self.now_ms;
            self.emit(Event::RunStopped { reason, at_ms });
            return;
        }
        self.stopping = Some(reason);
    }

    /// While stopping: turn every idle block into `Closing`, and once nothing is in flight any
    /// more, record `RunStopped`.
    fn pump_stopping(&mut self) {
        let ids: Vec<u32> = self.runs.iter().filter(|(_, r)| !r.busy).map(|(id, _)| *id).collect();
        for id in ids {
            let Some(run) = self.runs.get(&id).cloned() else { continue };
            let closing = match run.state {
                // A block whose writes are all done (or that failed on a pre-hook) finishes normally;
                // a cut in progress ends first (it is inside the window), then the window closes.
                BlockRun::Post { .. }
                | BlockRun::Closing { .. }
                | BlockRun::Cutting
                | BlockRun::FinishingCut { .. } => None,
                BlockRun::ClosingInterrupted { owed, next, .. } => Some(owed.into_iter().skip(next).collect()),
                BlockRun::Pre { .. } | BlockRun::Writing { .. } => {
                    Some(self.state.blocks.full(id as usize).map(owed_post_hooks).unwrap_or_default())
                }
            };
            if let Some(hooks) = closing {
                self.set_state(id, BlockRun::Closing { hooks, next: 0 });
            }
            self.advance_block(id);
        }
        // A wait for readiness holds no window open: it does not keep the run from stopping.
        let busy = self.inflight.values().any(|p| !matches!(p, Pending::Await));
        if !busy && self.runs.is_empty() {
            if let Some(reason) = self.stopping.take() {
                let at_ms = self.now_ms;
                self.emit(Event::RunStopped { reason, at_ms });
            }
        }
    }

    /// The store failed outside any command (the shell's durability barrier): stop as after a
    /// failed write — close the open hook windows, then record `RunStopped`.
    pub fn store_failed(&mut self, reason: String) {
        if !self.is_finished() && self.fatal.is_none() && self.stopped().is_none() {
            self.stop(reason);
        }
    }

    /// Whether the run is closing its hook windows before recording `RunStopped`.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Commands issued and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn emit(&mut self, e: Event) -> Seq {
        let seq = self.state.events;
        if let Err(err) = self.state.apply(&e) {
            // Only an engine bug gets here; stop deciding rather than corrupt the log.
            tracing::error!("{err}");
            self.fatal.get_or_insert(err.to_string());
            return seq;
        }
        self.keep_plans(&e);
        self.out.events.push((seq, e));
        seq
    }

    fn issue(&mut self, pending: Pending, after_seq: Option<Seq>, kind: CommandKind) {
        let id = self.next_cmd;
        self.next_cmd += 1;
        self.inflight.insert(id, pending);
        self.out.commands.push(Command { id, after_seq, kind });
    }

    /// Decides everything that can be decided now and hands it over.
    pub fn poll(&mut self) -> Output {
        // What the last poll recorded is in the shell's log now.
        self.fresh.clear();
        if self.fatal.is_none() && !self.is_finished() && self.stopped().is_none() {
            self.pump();
        }
        std::mem::take(&mut self.out)
    }

    fn warn(&mut self, message: String) {
        self.emit(Event::Diagnostic { severity: Severity::Warning, message });
    }

    /// Discovered resource types by group/resource.
    fn resource_types(&self) -> BTreeMap<&GroupResource, &ResourceType> {
        self.state.resources.iter().flatten().map(|r| (&r.gr, r)).collect()
    }

    fn resource(&self, gr: &GroupResource) -> Option<ResourceType> {
        self.state.resources.as_ref()?.iter().find(|r| &r.gr == gr).cloned()
    }

    fn list_units(&self) -> Vec<(ListUnit, ResourceType)> {
        let spec = self.selection.spec();
        let explicit_ns: Option<Vec<String>> =
            if !spec.included_namespaces.is_empty() && spec.included_namespaces.iter().all(|n| !n.contains('*')) {
                let mut v: Vec<String> =
                    spec.included_namespaces.iter().filter(|n| self.selection.namespace_included(n)).cloned().collect();
                v.sort();
                v.dedup();
                Some(v)
            } else {
                None
            };
        let mut units = Vec::new();
        for rt in self.state.resources.iter().flatten() {
            if !self.selection.resource_listable(rt) {
                continue;
            }
            match (&explicit_ns, rt.namespaced) {
                (Some(nss), true) => {
                    for ns in nss {
                        units.push((ListUnit { resource: rt.gr.clone(), namespace: Some(ns.clone()) }, rt.clone()));
                    }
                }
                _ => units.push((ListUnit { resource: rt.gr.clone(), namespace: None }, rt.clone())),
            }
        }
        units.sort_by(|a, b| a.0.cmp(&b.0));
        units
    }

    fn pump(&mut self) {
        if self.stopping.is_some() {
            self.pump_stopping();
            return;
        }
        if self.state.resources.is_none() {
            if !self.discovering {
                self.discovering = true;
                self.issue(Pending::Discover, None, CommandKind::Discover);
            }
            return;
        }
        let units = self.list_units();
        let mut all_listed = true;
        for (unit, rt) in units {
            if self.state.listings.get(&unit).is_some_and(|l| l.complete) {
                continue;
            }
            all_listed = false;
            if self.listing.contains(&unit) || self.listing.len() >= self.cfg.list_concurrency_max {
                continue;
            }
            self.listing.insert(unit.clone());
            let limit = self.cfg.list_page_items_max;
            self.issue(
                Pending::List { unit: unit.clone(), chunk: 0 },
                None,
                CommandKind::List { unit, resource: rt, limit, continue_token: None },
            );
        }
        if !all_listed {
            return;
        }
        if !self.state.plan_finished {
            if !self.fetching && !self.inspecting {
                self.plan_round();
            }
            if !self.state.plan_finished {
                return;
            }
        }
        self.pump_blocks();
    }

    /// An item as planning keeps it: bodies no action reads (and hooks do not need) are dropped
    /// right after parsing, so a cluster's ConfigMaps and Secrets are not held as parsed JSON.
    fn slim(&self, mut it: Item) -> Item {
        let gr = it.key.gr();
        let pod = gr.group.is_empty() && gr.resource == "pods";
        let builtin = |name: &str| BUILTIN_ACTIONS.contains(&name);
        if self.actions.iter().any(|a| !builtin(a.name()) && a.reads(&gr)) {
            // A user's action reads this resource: it gets whole items.
            return it;
        }
        // Planning reads annotations of pods (hooks) and claims (snapshot classes) only: an empty
        // map holds no memory. Of the other objects' labels it reads those the selection reads
        // (claims' go onto their VolumeSnapshots); of a pod's, also those the spec's hooks select
        // by; of its annotations, the hooks' (a pod's labels and other annotations were ~150
        // bytes a pod that nothing read).
        if !(pod || gr.group.is_empty() && gr.resource == "persistentvolumeclaims") {
            it.clear_annotations();
            it.retain_labels(|k| self.selection.reads_label(k));
        }
        if pod {
            it.retain_labels(|k| self.selection.reads_pod_label(k));
            it.retain_annotations(crate::hooks::is_hook_annotation);
            // Only what hooks and the built-in actions read of a pod.
            let facts = PodFacts::of(it.object());
            it.keep_pod_facts(facts);
            return it;
        }
        let pv = gr.group.is_empty() && gr.resource == "persistentvolumes";
        let keep = pv && self.state.options.snapshots_on() || self.actions.iter().any(|a| a.reads(&gr));
        match (keep, projection(&gr)) {
            (false, _) => {
                it.take_object();
            }
            // Strings only (a claim's, a volume's): kept as strings, not JSON maps.
            (true, Some(pointers)) if !pointers.contains(&"/subjects") => {
                let object = it.object();
                let at = |p: &'static str| Some((Box::from(p), Box::from(object.pointer(p)?.as_str()?)));
                let strings = pointers.iter().filter_map(|p| at(p)).collect();
                it.keep_strings(strings);
            }
            // Only what the built-in actions and snapshot planning read (each JSON map held costs a
            // B-tree node of ~0.6 KiB: a whole claim is a dozen).
            (true, Some(pointers)) => {
                let projected = project(it.object(), pointers);
                it.set_object(projected);
            }
            (true, None) => {}
        }
        it
    }

    /// Drops the catalog's objects of `unit` (its listing starts again, or failed).
    fn forget_unit(&mut self, unit: &ListUnit) {
        let fetched = &self.state.fetched;
        self.catalog.retain(|group, resource, namespace, name| {
            let of_unit = group == unit.resource.group
                && resource == unit.resource.resource
                && (unit.namespace.is_none() || namespace == unit.namespace.as_deref());
            !of_unit || fetched.contains_key(&ItemKey::new(group, resource, namespace, name))
        });
        self.resumed.forget(unit, fetched);
    }

    /// Rebuilds the catalog from a resumed log's events, one at a time (`n` numbers the objects the
    /// log carries): parsed for planning while the plan is not finished, only the keys after (the
    /// write path needs nothing else).
    fn catalog_push(&mut self, types: &BTreeMap<GroupResource, ResourceType>, n: &mut u64, e: &Event) {
        let planning = !self.state.plan_finished;
        // Planning: the item as planning sees it. Planned: its key's digest and scope only.
        let add = |e: &mut Engine, rt: &ResourceType, json: &str, n: u64| {
            if planning {
                if let Ok(it) = Item::parse(rt, 0, json) {
                    let mut it = e.slim(it);
                    it.body = Some(n);
                    // The run that listed it recorded why, when it could not be added.
                    let _ = e.catalog_add(&it);
                }
            } else if let Some(key) = object_key(rt, json) {
                e.resumed.push(&key, n);
            }
        };
        match e {
            Event::ResourceListed { unit, chunk, objects, .. } => {
                if *chunk == 0 {
                    self.forget_unit(unit);
                }
                let rt = types.get(&unit.resource);
                for o in objects {
                    if let Some(rt) = rt {
                        add(self, rt, o, *n);
                    }
                    *n += 1;
                }
            }
            Event::ListFailed { unit, .. } => self.forget_unit(unit),
            Event::BlockPlanned { .. } if matches!(self.plans, PlanHold::Own(_)) => self.keep_plans(e),
            Event::ItemsFetched { items } => {
                for (key, json) in items {
                    let Some(json) = json else { continue };
                    if let Some(rt) = types.get(&key.gr()) {
                        add(self, rt, json, *n);
                    }
                    *n += 1;
                }
            }
            _ => {}
        }
    }

    fn plan_round(&mut self) {
        if self.recording.is_some() {
            self.record_plan();
            return;
        }
        if let Some((p, claims)) = self.pending_plan.take() {
            if self.state.volumes_inspected && !self.out.events.is_empty() {
                // The inspection's records (~14 MB at a million objects) are appended and dropped
                // by the shell before the snapshots are planned beside the claims and the blocks.
                self.pending_plan = Some((p, claims));
                self.out.more = true;
                return;
            }
            if self.state.volumes_inspected {
                let catalog = self.build_objects(self.state.blocks.is_empty());
                self.emit_plan(p.into_blocks(catalog), claims);
            } else {
                self.pending_plan = Some((p, claims));
            }
            return;
        }
        let resources = self.state.resources.clone().unwrap_or_default();
        let not_found: BTreeSet<ItemKey> =
            self.state.fetched.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| k.clone()).collect();
        let failed: BTreeSet<ItemKey> = self.state.fetch_failed.keys().cloned().collect();
        let index = Index::of(std::mem::take(&mut self.catalog), &self.selection.spec().volume_group_label);
        let input = PlanInput {
            selection: &self.selection,
            resources: &resources,
            not_found: &not_found,
            fetch_failed: &failed,
            actions: &self.actions,
        };
        match plan(&input, &index) {
            PlanStep::Fetch(keys) => {
                let items: Vec<(ResourceType, ItemKey)> = keys
                    .into_iter()
                    .filter_map(|k| resources.iter().find(|r| r.gr == k.gr()).map(|rt| (rt.clone(), k)))
                    .collect();
                for chunk in items.chunks(self.cfg.get_batch_items_max.max(1)) {
                    self.fetching = true;
                    self.issue(Pending::Get, None, CommandKind::Get { items: chunk.to_vec() });
                }
            }
            PlanStep::Done(p) => {
                // The index's lookups are read by no one past the plan: gone before the claims are
                // read.
                let catalog = index.into_catalog();
                let claims =
                    if self.state.options.snapshots_on() { self.claims(&p, &catalog) } else { Claims::default() };
                let bound = claims.values().any(|c| c.in_backup && c.volume.is_some());
                if bound && !self.state.volumes_inspected {
                    match self.snapshot_api() {
                        (None, _) => {
                            let n = claims.values().filter(|c| c.in_backup && c.volume.is_some()).count();
                            self.warn(format!(
                                "the cluster does not serve snapshot.storage.k8s.io/v1 VolumeSnapshots: the {n} bound claims of the backup are backed up without their data (manifests only)"
                            ));
                        }
                        (Some(api), _) => {
                            self.inspect_volumes(&api, &claims, &catalog);
                            self.pending_plan = Some((p, claims));
                            // The plan is made and the claims and volumes are read: what objects
                            // keep is read by no one past here (not held through the inspection).
                            self.catalog = catalog;
                            self.catalog.drop_kept();
                            return;
                        }
                    }
                }
                // The catalog becomes the write path's view and the keys before the block plans
                // are made and recorded: the parsed items are not held beside the plans, the
                // fold's blocks and the events carrying them.
                self.catalog = catalog;
                let catalog = self.build_objects(self.state.blocks.is_empty());
                self.emit_plan(p.into_blocks(catalog), claims);
                return;
            }
        }
        // The next round (after the gets), or `build_objects`, takes the items back.
        self.catalog = index.into_catalog();
    }

    /// Claims planning looks at: bound ones in the backup, and every one with a volume-group label.
    fn claims(&mut self, p: &crate::grouping::PlanShape, catalog: &Catalog) -> Claims {
        let is_claim = |j: u32| catalog.is(j, "", "persistentvolumeclaims");
        let mut in_backup: Vec<u32> = p.positions().iter().copied().filter(|&j| is_claim(j)).collect();
        in_backup.sort_unstable();
        let group_label = self.group_label();
        let mut out = Claims::default();
        for j in (0..catalog.len() as u32).filter(|&j| is_claim(j)) {
            let it = catalog.item(j);
            let inb = in_backup.binary_search(&j).is_ok();
            let grouped = it.labels().get(&group_label).is_some_and(|g| !g.is_empty());
            if !inb && !grouped {
                continue;
            }
            let volume =
                crate::grouping::pvc_bound(&it).then(|| it.str_at("/spec/volumeName").unwrap_or_default().to_string());
            let claim = Claim {
                key: it.key.clone(),
                volume,
                in_backup: inb,
                labels: it.labels().clone(),
                // Snapshot planning reads a claim's class annotations only.
                annotations: {
                    let mut a = it.annotations().clone();
                    a.retain(|k| k == snapshot::CLASS_KEY || k == snapshot::GROUP_CLASS_CLAIM_ANNOTATION);
                    a
                },
            };
            if let Err(e) = out.insert(&claim) {
                self.warn(format!("{e}: its volume is not snapshotted"));
            }
        }
        out.seal();
        out
    }

    /// Reads what the claims' volumes are from the listed PersistentVolumes, and issues the gets of
    /// the others and the listing of the snapshot classes.
    fn inspect_volumes(&mut self, api: &SnapshotApi, claims: &Claims, catalog: &Catalog) {
        let pv_type = self.resource(&GroupResource::new("", "persistentvolumes"));
        let mut known = Vec::new();
        let mut gets = Vec::new();
        let names: BTreeSet<String> = claims.values().filter(|c| c.in_backup).filter_map(|c| c.volume).collect();
        for name in names {
            let key = ItemKey::cluster("", "persistentvolumes", &name);
            let pv = catalog.position(&key).map(|i| catalog.item(i));
            match (pv.filter(|it| it.has_object()), &pv_type) {
                (Some(pv), _) => known.push((name, PvVolume::of(&pv.kept_object()))),
                (None, Some(rt)) => gets.push((rt.clone(), key)),
                (None, None) => known.push((
                    name,
                    PvVolume::Unreadable { error: "the cluster does not serve persistentvolumes".into() },
                )),
            }
        }
        self.known_volumes = known;
        let mut classes = vec![api.classes.clone()];
        if let Some(g) = &api.groups {
            classes.push(g.classes.clone());
        }
        self.inspecting = true;
        self.issue(Pending::Inspect, None, CommandKind::InspectVolumes { pvs: gets, classes });
    }

    /// Records the inspection's answer.
    fn volumes_inspected(&mut self, inv: VolumeInventory) {
        self.inspecting = false;
        let mut volumes = std::mem::take(&mut self.known_volumes);
        for (name, r) in inv.volumes {
            let v = match r {
                Ok(Some(json)) => match serde_json::from_str::<serde_json::Value>(&json) {
                    Ok(pv) => PvVolume::of(&pv),
                    Err(e) => PvVolume::Unreadable { error: format!("not valid JSON: {e}") },
                },
                Ok(None) => PvVolume::Missing,
                Err(e) => PvVolume::Unreadable { error: e.to_string() },
            };
            volumes.push((name, v));
        }
        volumes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut canon = |what: &str, r: Result<Vec<String>, ClusterError>| -> Vec<String> {
            match r {
                Ok(list) => {
                    let mut out: Vec<String> = list
                        .iter()
                        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
                        .filter(|v| v.is_object())
                        .map(|v| v.to_string())
                        .collect();
                    out.sort();
                    out
                }
                Err(e) => {
                    self.emit(Event::Diagnostic {
                        severity: Severity::Error,
                        message: format!("listing {what} failed: {e}"),
                    });
                    Vec::new()
                }
            }
        };
        let classes = canon("VolumeSnapshotClasses", inv.classes);
        let group_classes = canon("VolumeGroupSnapshotClasses", inv.group_classes);
        let max = self.cfg.record_objects_bytes_max;
        let parts = split_by_bytes(volumes, max, |(n, v)| n.len() + format!("{v:?}").len());
        let n = parts.len();
        for (i, volumes) in parts.into_iter().enumerate() {
            let first = i == 0;
            self.emit(Event::VolumesInspected {
                volumes,
                classes: if first { classes.clone() } else { Vec::new() },
                group_classes: if first { group_classes.clone() } else { Vec::new() },
                complete: i + 1 == n,
            });
        }
    }

    /// Starts recording the plan: blocks, then snapshots, then `PlanFinished` (skipping what a
    /// crashed process recorded already), [`PLAN_BLOCKS_PER_POLL`] blocks a poll
    /// ([`Engine::record_plan`]).
    fn emit_plan(&mut self, mut p: PlanBlocks, claims: Claims) {
        let items = p.item_count() as u64;
        let already = self.state.blocks.len() as u32;
        if already == 0 {
            for w in std::mem::take(&mut p.warnings) {
                self.warn(w);
            }
        }
        let snapshots = if self.state.options.snapshots_on() && self.state.volumes_inspected {
            self.plan_snapshots(&p, &claims)
        } else {
            Vec::new()
        };
        // Read by snapshot planning only: not held beside the blocks' states and the plan.
        drop(claims);
        p.skip(already);
        self.state.reserve_blocks(p.len() as usize);
        self.state.reserve_snapshots(snapshots.len());
        let mut snapshots = snapshots;
        snapshots.drain(..self.state.snapshots.len().min(snapshots.len()));
        let snapshots = snapshots.into_iter().peekable();
        self.recording = Some(Recording { block_count: p.len(), blocks: Some(p), snapshots, items });
        self.record_plan();
    }

    /// Records the next [`PLAN_BLOCKS_PER_POLL`] blocks of the plan being recorded, and once every
    /// block is, its snapshots and `PlanFinished`. The shell appends a poll's events and drops
    /// them before it polls again ([`Output::more`]), so the plans of every block are never all
    /// in memory at once.
    fn record_plan(&mut self) {
        let Some(mut r) = self.recording.take() else { return };
        let chunk = self.cfg.plan_chunk_blocks_max.max(1);
        let mut left = PLAN_BLOCKS_PER_POLL.max(chunk);
        if let Some(plan) = &mut r.blocks {
            while left > 0 {
                let blocks: Vec<Arc<BlockPlan>> =
                    std::iter::from_fn(|| plan.next_block()).take(chunk.min(left)).collect();
                if blocks.is_empty() {
                    break;
                }
                left -= blocks.len();
                self.emit(Event::BlockPlanned { blocks });
            }
            if plan.next_id() < plan.len() {
                self.recording = Some(r);
                self.out.more = true;
                return;
            }
            // The plan's keys (the catalog) are read by no one past the last block: gone before
            // the snapshots' records are made (~45 MB at a million objects).
            r.blocks = None;
        }
        // The snapshots' records, as many plans a poll as blocks: a poll's events are appended and
        // dropped before the next (all ~60k plans of a million objects at once were ~43 MB).
        while left > 0 && r.snapshots.peek().is_some() {
            let c: Vec<Arc<SnapshotPlan>> =
                r.snapshots.by_ref().take(chunk.min(left)).map(|b| Arc::new(unpack_plan(&b))).collect();
            left -= c.len();
            self.emit(Event::SnapshotsPlanned { snapshots: c });
        }
        if r.snapshots.peek().is_some() {
            self.recording = Some(r);
            self.out.more = true;
            return;
        }
        let (blocks, items) = (r.block_count, r.items);
        // Each claim a snapshot can capture adds its VolumeSnapshot and VolumeSnapshotContent.
        let snapshot_items: u64 = (self.state.snapshots.iter())
            .filter(|s| s.plan.blocked.is_none())
            .map(|s| 2 * u64::from(s.plan.claims))
            .sum();
        self.emit(Event::PlanFinished { blocks, items: items + snapshot_items });
    }

    /// The snapshots' plans, each packed as it is made ([`unpack_plan`] reads one back).
    fn plan_snapshots(&mut self, p: &PlanBlocks, claims: &Claims) -> Vec<Box<[u8]>> {
        let (Some(_), why) = self.snapshot_api() else { return Vec::new() };
        let parse = |v: &[String]| -> Vec<serde_json::Value> {
            v.iter().filter_map(|j| serde_json::from_str(j).ok()).collect()
        };
        let classes = parse(&self.state.snapshot_classes);
        let group_classes = parse(&self.state.group_classes);
        let backup = self.backup_name();
        let group_label = self.group_label();
        let input = SnapshotPlanInput {
            backup: &backup,
            options: &self.state.options,
            group_label: &group_label,
            blocks: p,
            claims,
            volumes: &self.state.volumes,
            classes: &classes,
            group_classes: &group_classes,
            groups: why.map_or(Ok(()), Err),
        };
        let mut plans = Vec::new();
        let warnings = snapshot::plan_snapshots_into(&input, &mut |p| plans.push(pack_plan(&p)));
        if self.state.snapshots.is_empty() {
            for w in warnings {
                self.warn(w);
            }
        }
        plans
    }

    /// The write path's view of every known object: key → its body's number in the log, from
    /// the catalog (sorted and deduplicated by planning's index), which is returned for the
    /// plan's keys.
    ///
    /// With `bodies` — every block of the plan is recorded by this process, none by a crashed
    /// one — the plans carry their items' bodies ([`BlockPlan::bodies`]) and no view is made: a
    /// plan read back from the log has none, and only then is the view needed.
    fn build_objects(&mut self, bodies: bool) -> Catalog {
        let catalog = std::mem::take(&mut self.catalog);
        if catalog.is_empty() && !self.resumed.objects.is_empty() {
            self.objects = Some(std::mem::take(&mut self.resumed).into_objects());
            return catalog;
        }
        if bodies && !catalog.is_empty() {
            self.plan_bodies = true;
            let mut catalog = catalog;
            catalog.drop_kept();
            return catalog;
        }
        // Of one key listed twice, the first stays, as planning's index keeps it (ids grow in
        // listing order).
        let logged = || (0..catalog.len() as u32).filter_map(|i| Some((catalog.digest(i), catalog.body(i)?)));
        self.objects = Some(Objects::build(logged));
        let mut catalog = catalog;
        catalog.drop_kept();
        catalog
    }

    /// Adds a parsed object to the catalog; why it could not be, if not.
    fn catalog_add(&mut self, it: &Item) -> Option<String> {
        let e = self.catalog.push(it).err()?;
        Some(format!("{e}: it is not planned (not in the backup)"))
    }

    /// The body of `key` in the write path's view ([`Engine::build_objects`]).
    /// None without a view: every plan then carries its bodies ([`Engine::staged_bodies`] looks
    /// a key up in the plans).
    fn object_body(&self, key: &ItemKey) -> Option<Body> {
        self.objects.as_ref()?.get(key.digest())
    }

    /// Records `BlockStarted` for the next never-attempted block, if any. Blocks with an open
    /// attempt belong to recovery; finished blocks are never redone.
    /// The order in which blocks start: blocks with volume snapshots first, so that the wait for
    /// their readiness (after their windows close, off the workers) overlaps the other blocks'
    /// work instead of trailing the last block; then the others. Both in id order. With
    /// `--ordered-resources`, plain id order: the ordered blocks (the lowest ids) go first.
    fn start_order(&self) -> Vec<u32> {
        let ids = 0..self.state.blocks.len() as u32;
        if self.state.spec.as_ref().is_some_and(|s| !s.ordered_resources.is_empty()) {
            return ids.collect();
        }
        let snapshots = |id: &u32| self.state.snapshots_of(*id).any(|s| s.plan.blocked.is_none());
        let (first, rest): (Vec<u32>, Vec<u32>) = ids.partition(snapshots);
        first.into_iter().chain(rest).collect()
    }

    fn start_next_block(&mut self) -> Option<(u32, u32, Seq)> {
        if self.order.is_none() {
            self.order = Some(self.start_order());
        }
        while self.cursor < self.state.blocks.len() {
            let id = self.order.as_ref().and_then(|o| o.get(self.cursor)).copied().unwrap_or(self.cursor as u32);
            self.cursor += 1;
            let Some(b) = self.state.blocks.get(id as usize) else { continue };
            if b.outcome.is_some() || b.attempt.is_some() {
                continue;
            }
            let at_ms = self.now_ms;
            let seq = self.emit(Event::BlockStarted { block: id, attempt: 1, at_ms });
            return Some((id, 1, seq));
        }
        None
    }

    fn pump_blocks(&mut self) {
        if self.objects.is_none() && !self.plan_bodies {
            self.build_objects(false);
        }
        let workers = self.cfg.workers.max(1);
        loop {
            // Fill free workers: interrupted attempts first, then primed blocks, then new ones.
            while self.runs.len() < workers {
                if let Some((id, run)) = self.recovering.pop_front() {
                    self.runs.insert(id, run);
                } else if let Some((id, attempt, seq)) = self.primed.pop_front().or_else(|| self.start_next_block()) {
                    self.runs.insert(id, Run::new(BlockRun::Pre { next: 0 }, attempt, seq));
                } else {
                    break;
                }
            }
            // Record the next blocks' intents ahead: one flush then covers many block starts.
            while self.primed.len() < self.cfg.intent_lookahead_blocks {
                match self.start_next_block() {
                    Some(p) => self.primed.push_back(p),
                    None => break,
                }
            }
            let before = self.runs.len();
            let idle: Vec<u32> = self.runs.iter().filter(|(_, r)| !r.busy).map(|(id, _)| *id).collect();
            for id in idle {
                self.advance_block(id);
            }
            // A block that finished frees a worker: fill it in the same poll.
            let more = !self.recovering.is_empty() || !self.primed.is_empty() || self.cursor < self.state.blocks.len();
            if self.runs.len() == before || !more || self.fatal.is_some() {
                break;
            }
        }
        self.await_snapshots();
        self.release_settled();
        if self.runs.is_empty()
            && self.recovering.is_empty()
            && self.primed.is_empty()
            && self.cursor >= self.state.blocks.len()
            && self.state.all_blocks_finished()
            && self.release_snapshots()
        {
            self.finish();
        }
    }

    /// Whether a snapshot's storage belongs to the backup: cut, and its block did not fail.
    fn snapshot_kept(&self, s: &SnapshotState) -> bool {
        s.cut.is_some() && !self.state.blocks.failed(s.plan.block as usize)
    }

    /// Issues one `AwaitSnapshots` for the cut snapshots of finished blocks that are not ready yet.
    fn await_snapshots(&mut self) {
        if self.awaiting {
            return;
        }
        let timeout = self.state.options.item_operation_timeout_ms;
        let mut due: Vec<(u64, u32)> = (self.state.snapshots.iter())
            .filter(|s| s.ready.is_none() && self.state.blocks.finished(s.plan.block as usize))
            .filter(|s| self.snapshot_kept(s))
            .filter_map(|s| Some((s.cut.as_ref()?.at_ms.saturating_add(timeout), s.plan.id)))
            .collect();
        // The earliest cuts (earliest deadlines) first: the ones likely to settle next. Only those
        // awaited now have their names read back.
        due.sort_unstable();
        due.truncate(self.cfg.await_snapshots_max.max(1));
        let waits: Vec<ReadyWait> = (due.into_iter())
            .filter_map(|(deadline_ms, id)| {
                let (plan, cut) = (self.state.snapshot_plan(id)?, self.state.snapshot_cut(id)?);
                Some(ReadyWait {
                    id,
                    namespace: plan.namespace,
                    snapshots: cut.members.into_iter().map(|m| m.snapshot).collect(),
                    deadline_ms,
                })
            })
            .collect();
        if waits.is_empty() {
            return;
        }
        let (Some(api), _) = self.snapshot_api() else { return };
        self.awaiting = true;
        self.issue(Pending::Await, None, CommandKind::AwaitSnapshots { api, waits });
    }

    /// Once every kept snapshot is ready (or past its deadline), removes the snapshots' cluster
    /// objects: kept ones with their storage retained, the others deleted. Returns whether
    /// nothing is left to release.
    fn release_snapshots(&mut self) -> bool {
        if self.awaiting || self.releasing {
            return false;
        }
        let waiting = self.state.snapshots.iter().any(|s| s.ready.is_none() && self.snapshot_kept(s));
        if waiting {
            return false;
        }
        !self.release_where(|_, _| true)
    }

    /// Releases, while other blocks still run, the snapshots that are settled: their block has
    /// finished (no cut of theirs can be in flight) and, when kept, they are ready or past their
    /// deadline. At 20k volumes, releasing them all at the end was a third of the backup.
    fn release_settled(&mut self) {
        if self.releasing {
            return;
        }
        self.release_where(|e, s| {
            let finished = e.state.blocks.finished(s.plan.block as usize);
            finished && (s.ready.is_some() || !e.snapshot_kept(s))
        });
    }

    /// Issues one `ReleaseSnapshots` for the requested, unreleased snapshots `pick` accepts, at
    /// most [`EngineConfig::release_orders_max`] (the next poll issues the next ones); whether one
    /// was issued.
    fn release_where(&mut self, pick: impl Fn(&Engine, &SnapshotState) -> bool) -> bool {
        let orders: Vec<ReleaseOrder> = self
            .state
            .snapshots
            .iter()
            .filter(|s| s.requested.is_some() && s.released.is_none() && pick(self, s))
            .take(self.cfg.release_orders_max.max(1))
            .filter_map(|s| {
                Some(ReleaseOrder {
                    plan: self.state.snapshot_plan(s.plan.id)?,
                    members: (self.state.snapshot_cut(s.plan.id).into_iter())
                        .flat_map(|c| c.members)
                        .map(|m| (m.snapshot, m.content))
                        .collect(),
                    keep: self.snapshot_kept(s),
                })
            })
            .collect();
        if orders.is_empty() || mutation::active(Mutation::SkipSnapshotRelease) {
            return false;
        }
        let (Some(api), _) = self.snapshot_api() else { return false };
        self.releasing = true;
        let group_label = self.group_label();
        // Write-ahead: releasing deletes the objects a resumed cut would create-or-get, so every
        // fact about the snapshots (cut, failed, ready) must be durable before any is deleted —
        // else a crash could lose a cut and a resume would take the snapshot a second time.
        let last = self.state.events.checked_sub(1);
        self.issue(Pending::Release, last, CommandKind::ReleaseSnapshots { api, group_label, orders });
        true
    }

    fn finish(&mut self) {
        if self.state.archive.is_none() {
            if !self.finalizing && self.restaging == 0 {
                self.finalizing = true;
                let last = self.state.events.checked_sub(1);
                self.issue(Pending::Finalize, last, CommandKind::Finalize);
            }
            return;
        }
        let phase = self.state.terminal_phase();
        let at_ms = self.now_ms;
        self.emit(Event::BackupFinished { phase, at_ms });
    }

    fn hooks_of(&self, id: u32, phase: HookPhase) -> Vec<Hook> {
        // A block without hooks has no plan in the fold.
        let hooks = self.state.blocks.full(id as usize).and_then(|b| b.plan.as_ref()).map_or(&[][..], |p| &p.hooks[..]);
        if phase == HookPhase::Pre && mutation::active(Mutation::SkipPreHooksOfMultiPodBlocks) {
            let pods: BTreeSet<&ItemKey> = hooks.iter().map(|h| &h.pod).collect();
            if pods.len() > 1 {
                // Deliberate bug: no freeze for blocks with several hooked pods.
                return Vec::new();
            }
        }
        hooks.iter().filter(|h| h.phase == phase).cloned().collect()
    }

    /// Starts hook `h` of an attempt, or, when it cannot run, records it `Invalid` without an
    /// exec. Returns whether a command was issued (the block is then busy).
    fn run_hook(&mut self, id: u32, attempt: u32, h: Hook) -> bool {
        match h.invalid.clone() {
            Some(reason) => {
                let at_ms = self.now_ms;
                let hook = hook_ref(&h);
                let outcome = HookOutcome::Invalid { reason };
                self.emit(Event::HookFinished { block: id, attempt, hook, outcome, at_ms });
                false
            }
            None => {
                self.start_hook(id, attempt, h);
                true
            }
        }
    }

    /// The transitions of a block with nothing in flight: issue its next command, or move on.
    fn advance_block(&mut self, id: u32) {
        loop {
            let Some(run) = self.runs.get(&id).cloned() else { return };
            if run.busy || self.fatal.is_some() {
                return;
            }
            let at_ms = self.now_ms;
            match run.state {
                BlockRun::ClosingInterrupted { attempt, owed, next } => {
                    if let Some(h) = owed.get(next).cloned() {
                        if self.run_hook(id, attempt, h) {
                            return;
                        }
                        self.set_state(id, BlockRun::ClosingInterrupted { attempt, owed, next: next + 1 });
                        continue;
                    }
                    let attempt = attempt + 1;
                    let seq = self.emit(Event::BlockStarted { block: id, attempt, at_ms });
                    self.runs.insert(id, Run::new(BlockRun::Pre { next: 0 }, attempt, seq));
                }
                BlockRun::FinishingCut { attempt, owed } => {
                    // Every snapshot of the block not settled yet is cut now, inside the window
                    // the interrupted attempt opened; those it never requested are requested now.
                    let todo = self.unsettled_plans(id);
                    if todo.is_empty() {
                        self.set_state(id, BlockRun::ClosingInterrupted { attempt, owed, next: 0 });
                        continue;
                    }
                    self.request_cuts(id, attempt, todo);
                    return;
                }
                BlockRun::Cutting => return,
                BlockRun::Pre { next } => {
                    let pre = self.hooks_of(id, HookPhase::Pre);
                    if mutation::active(Mutation::WriteBeforePreHooks) && !run.writes_done {
                        // Deliberate bug: write everything first, then run the pre-hooks.
                        self.set_state(id, BlockRun::Writing { next: 0 });
                        continue;
                    }
                    if mutation::active(Mutation::SnapshotBeforePreHooks) && next == 0 && !run.captured {
                        // Deliberate bug: cut the block's snapshots before its pre-hooks.
                        if let Some(r) = self.runs.get_mut(&id) {
                            r.captured = true;
                        }
                        if self.start_cut(id, run.attempt) {
                            return;
                        }
                        continue;
                    }
                    match pre.get(next).cloned() {
                        Some(h) => {
                            if self.run_hook(id, run.attempt, h.clone()) {
                                return;
                            }
                            // Recorded Invalid: a failed pre-hook under its onError.
                            self.after_hook(id, &h, false);
                        }
                        None if run.writes_done => {
                            let hooks = self.hooks_of(id, HookPhase::Post);
                            self.set_state(id, BlockRun::Post { hooks, next: 0, failed: None });
                        }
                        None => {
                            // The window is open: cut the block's snapshots, then write.
                            if self.start_cut(id, run.attempt) {
                                return;
                            }
                            self.set_state(id, BlockRun::Writing { next: 0 });
                        }
                    }
                }
                BlockRun::Writing { next } => {
                    let writes = match &run.writes {
                        Some(w) => w.clone(),
                        None => {
                            let w = match self.block_writes(id) {
                                Ok(w) => Arc::new(w),
                                Err(e) => {
                                    // The shell's log could not give the plan back: stop deciding.
                                    self.fatal.get_or_insert(format!("reading the plan of block {id}: {e}"));
                                    return;
                                }
                            };
                            if let Some(r) = self.runs.get_mut(&id) {
                                r.writes = Some(w.clone());
                            }
                            w
                        }
                    };
                    if let Some(w) = writes.get(next).cloned() {
                        match w {
                            PlannedWrite::Write { key, body } => {
                                if let Some(r) = self.runs.get_mut(&id) {
                                    r.busy = true;
                                }
                                let kind = CommandKind::WriteItem { block: id, attempt: run.attempt, key, body };
                                self.issue(Pending::Block(id), Some(run.intent_seq), kind);
                                return;
                            }
                            PlannedWrite::Fail { key, error } => {
                                self.emit(Event::ItemFailed { block: id, attempt: run.attempt, key, error });
                                self.set_state(id, BlockRun::Writing { next: next + 1 });
                            }
                        }
                    } else {
                        if let Some(r) = self.runs.get_mut(&id) {
                            r.writes_done = true;
                        }
                        if mutation::active(Mutation::WriteBeforePreHooks) {
                            self.set_state(id, BlockRun::Pre { next: 0 });
                        } else {
                            let hooks = self.hooks_of(id, HookPhase::Post);
                            self.set_state(id, BlockRun::Post { hooks, next: 0, failed: None });
                        }
                    }
                }
                BlockRun::Closing { hooks, next } => {
                    if let Some(h) = hooks.get(next).cloned() {
                        if self.run_hook(id, run.attempt, h) {
                            return;
                        }
                        self.set_state(id, BlockRun::Closing { hooks, next: next + 1 });
                        continue;
                    }
                    // Windows closed; the attempt stays open and `resume` redoes the block.
                    self.runs.remove(&id);
                    return;
                }
                BlockRun::Post { hooks, next, failed } => {
                    if let Some(h) = hooks.get(next).cloned() {
                        if self.run_hook(id, run.attempt, h) {
                            return;
                        }
                        self.set_state(id, BlockRun::Post { hooks, next: next + 1, failed });
                        continue;
                    }
                    let outcome = match failed {
                        Some(reason) => BlockOutcome::Failed { reason: reason.into() },
                        None => {
                            let a = self.state.blocks.full(id as usize).and_then(|b| b.attempt.as_ref());
                            let trouble = a.is_some_and(|a| {
                                !a.failed_items.is_empty() || a.hooks_finished.values().any(|o| !o.ok())
                            });
                            if trouble {
                                BlockOutcome::PartiallyFailed
                            } else {
                                BlockOutcome::Completed
                            }
                        }
                    };
                    self.emit(Event::BlockFinished { block: id, attempt: run.attempt, outcome, at_ms });
                    self.runs.remove(&id);
                    return;
                }
            }
        }
    }

    /// The snapshot API of the cluster (from discovery), and why group snapshots cannot be used.
    fn snapshot_api(&mut self) -> (Option<SnapshotApi>, Option<String>) {
        if self.api.is_none() {
            self.api = Some(snapshot::snapshot_api(self.state.resources.as_deref().unwrap_or_default()));
        }
        self.api.clone().unwrap_or((None, None))
    }

    fn backup_name(&self) -> String {
        self.state.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
    }

    fn group_label(&self) -> String {
        self.state.spec.as_ref().map(|s| s.volume_group_label.clone()).unwrap_or_default()
    }

    /// The plans, read back, of block `id`'s snapshots that are not settled (to be cut).
    fn unsettled_plans(&self, id: u32) -> Vec<SnapshotPlan> {
        (self.state.snapshots_of(id).filter(|s| !s.settled()))
            .filter_map(|s| self.state.snapshot_plan(s.plan.id))
            .collect()
    }

    /// Requests and issues the cut of every snapshot of block `id` that is not settled; returns
    /// whether a command was issued (the block is then busy in `Cutting`).
    fn start_cut(&mut self, id: u32, attempt: u32) -> bool {
        let todo = self.unsettled_plans(id);
        if todo.is_empty() {
            return false;
        }
        self.set_state(id, BlockRun::Cutting);
        self.request_cuts(id, attempt, todo)
    }

    /// Records `SnapshotRequested` for each of `todo` not yet requested in this attempt, then
    /// issues one `CutSnapshots` that waits for those intents. Returns whether it was issued.
    fn request_cuts(&mut self, id: u32, attempt: u32, todo: Vec<SnapshotPlan>) -> bool {
        let (Some(api), _) = self.snapshot_api() else {
            self.fatal.get_or_insert(format!("block {id}: snapshots planned but the cluster serves no snapshot API"));
            return false;
        };
        let group_label = self.group_label();
        let at_ms = self.now_ms;
        let mut last = None;
        let mut orders = Vec::with_capacity(todo.len());
        for mut plan in todo {
            let requested = self.state.snapshots[plan.id as usize].requested;
            if requested != Some(attempt) {
                last = Some(self.emit(Event::SnapshotRequested { id: plan.id, attempt, at_ms }));
            }
            if requested.is_some() && mutation::active(Mutation::SecondSnapshotAfterResume) {
                // Deliberate bug: a later attempt takes the snapshot again under a new name.
                plan.name = format!("{}-a{attempt}", plan.name);
            }
            let body = match (&plan.group, &api.groups) {
                (Some(_), Some(g)) => snapshot::group_snapshot_body(&plan, &group_label, &g.snapshots),
                _ => snapshot::volume_snapshot_body(&plan),
            };
            orders.push(CutOrder { plan, body });
        }
        if let Some(r) = self.runs.get_mut(&id) {
            r.busy = true;
        }
        let timeout_ms = self.state.options.csi_snapshot_timeout_ms;
        // Intents recorded by an interrupted attempt are durable already (they were read back).
        let after = last;
        self.issue(
            Pending::Block(id),
            after,
            CommandKind::CutSnapshots { block: id, attempt, api, group_label, orders, timeout_ms },
        );
        true
    }

    /// Records the outcome of each cut: `SnapshotCut` with the archived members, or `SnapshotFailed`.
    fn record_cuts(&mut self, results: Vec<(u32, Result<CutRaw, String>)>) {
        let backup = self.backup_name();
        for (sid, r) in results {
            let Some(s) = self.state.snapshots.get(sid as usize) else { continue };
            if s.settled() {
                continue;
            }
            let at_ms = self.now_ms;
            let claims = self.state.snapshot_plan(sid).map(|p| p.claims).unwrap_or_default();
            let cut = r.and_then(|raw| {
                let mut got: Vec<&str> = raw.members.iter().map(|m| m.claim.as_str()).collect();
                got.sort();
                if got != claims.iter().map(String::as_str).collect::<Vec<_>>() {
                    return Err(format!(
                        "the snapshot captured claims [{}], not [{}]",
                        got.join(", "),
                        claims.join(", ")
                    ));
                }
                let members = raw
                    .members
                    .iter()
                    .map(|m| {
                        archived_member(
                            &backup,
                            &m.claim,
                            &m.snapshot_json,
                            &m.content_json,
                            raw.group_handle.as_deref(),
                        )
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok((members, raw.group_handle))
            });
            match cut {
                Ok((members, group_handle)) => {
                    self.emit(Event::SnapshotCut { id: sid, members, group_handle, at_ms });
                }
                Err(error) => {
                    self.emit(Event::SnapshotFailed { id: sid, error, at_ms });
                }
            }
        }
    }

    /// What attempt of block `id` writes: its items (a claim whose snapshot is cut annotated with
    /// it; a claim whose snapshot failed not at all), then the VolumeSnapshot and
    /// VolumeSnapshotContent of each cut member.
    fn block_writes(&self, id: u32) -> Result<Vec<PlannedWrite>, String> {
        let plan = self.plan_of(id)?;
        let backup = self.backup_name();
        // The block's snapshots, read back whole (a few).
        let snapshots: Vec<(&SnapshotState, SnapshotPlan, Option<Cut>)> = (self.state.snapshots_of(id))
            .filter_map(|s| Some((s, self.state.snapshot_plan(s.plan.id)?, self.state.snapshot_cut(s.plan.id))))
            .collect();
        let mut of_claim: BTreeMap<ItemKey, (&SnapshotState, Option<&Cut>)> = BTreeMap::new();
        for (s, plan, cut) in &snapshots {
            for k in plan.claim_keys() {
                of_claim.insert(k, (*s, cut.as_ref()));
            }
        }
        let mut out = Vec::new();
        for (i, key) in plan.items.iter().enumerate() {
            let body = match plan.has_bodies() {
                true => plan.body(i).map(Body::Logged),
                false => self.object_body(key),
            };
            let Some(body) = body else {
                let error = "object is no longer known (listing changed after planning)".to_string();
                out.push(PlannedWrite::Fail { key: key.clone(), error });
                continue;
            };
            let snap = of_claim.get(key).map(|(s, _)| *s);
            let member =
                of_claim.get(key).and_then(|(_, c)| *c).and_then(|c| c.members.iter().find(|m| m.claim == key.name()));
            match (snap, member) {
                (_, Some(m)) => match claim_body(&body, &backup, &m.snapshot) {
                    Some(body) => out.push(PlannedWrite::Write { key: key.clone(), body }),
                    None => {
                        out.push(PlannedWrite::Fail { key: key.clone(), error: "claim is not a JSON object".into() })
                    }
                },
                (Some(s), None) if s.failure().is_some() => {
                    let why = s.failure().unwrap_or_default();
                    let error = format!("not backed up: its volume snapshot failed: {why}");
                    out.push(PlannedWrite::Fail { key: key.clone(), error });
                }
                _ => out.push(PlannedWrite::Write { key: key.clone(), body }),
            }
        }
        let mut extra: Vec<(ItemKey, BodyId)> = Vec::new();
        for (_, plan, cut) in &snapshots {
            for m in cut.iter().flat_map(|c| &c.members) {
                let (vs, vsc) = m.keys(&plan.namespace);
                extra.push((vs, m.snapshot_body));
                extra.push((vsc, m.content_body));
            }
        }
        extra.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(extra.into_iter().map(|(key, id)| PlannedWrite::Write { key, body: Body::Logged(id) }));
        Ok(out)
    }

    /// The bytes each of `keys` was staged with, for re-staging: what [`Engine::block_writes`]
    /// wrote. One pass over the cut snapshots (a snapshot's objects; the snapshot a claim is
    /// annotated with) and, without a view, one over the plans (their bodies) for all the keys.
    fn staged_bodies(&self, keys: &[ItemKey]) -> BTreeMap<ItemKey, Body> {
        let wanted: BTreeSet<&ItemKey> = keys.iter().collect();
        let snapshot_kinds = ["volumesnapshots", "volumesnapshotcontents"];
        let cut_related = |k: &ItemKey| {
            k.is("", "persistentvolumeclaims")
                || (k.group() == snapshot::SNAPSHOT_GROUP && snapshot_kinds.contains(&k.resource()))
        };
        let mut out: BTreeMap<ItemKey, Body> = BTreeMap::new();
        // The snapshot each wanted claim was annotated with: the first cut that captured it.
        let mut annotated: BTreeMap<ItemKey, String> = BTreeMap::new();
        if keys.iter().any(cut_related) {
            for s in self.state.snapshots.iter().filter(|s| s.cut.is_some()) {
                let (Some(plan), Some(cut)) = (self.state.snapshot_plan(s.plan.id), self.state.snapshot_cut(s.plan.id))
                else {
                    continue;
                };
                for m in cut.members {
                    let (vs, vsc) = m.keys(&plan.namespace);
                    for (k, body) in [(vs, m.snapshot_body), (vsc, m.content_body)] {
                        if wanted.contains(&k) {
                            out.entry(k).or_insert(Body::Logged(body));
                        }
                    }
                    let claim = ItemKey::namespaced("", "persistentvolumeclaims", &plan.namespace, &m.claim);
                    if wanted.contains(&claim) {
                        annotated.entry(claim).or_insert(m.snapshot);
                    }
                }
            }
        }
        // The others' logged bodies: from the view, or from the plans (the first of a key).
        let mut rest: BTreeSet<&ItemKey> = wanted.iter().copied().filter(|k| !out.contains_key(*k)).collect();
        let mut logged: Vec<(ItemKey, Body)> = Vec::new();
        if self.objects.is_some() {
            logged.extend(rest.iter().filter_map(|k| Some(((*k).clone(), self.object_body(k)?))));
        } else {
            for id in 0..self.state.blocks.len() as u32 {
                if rest.is_empty() {
                    break;
                }
                let Ok(plan) = self.plan_of(id) else { continue };
                for (i, k) in plan.items.iter().enumerate() {
                    if let Some(body) = plan.body(i).filter(|_| rest.contains(k)) {
                        rest.remove(k);
                        logged.push((k.clone(), Body::Logged(body)));
                    }
                }
            }
        }
        let backup = self.backup_name();
        for (k, body) in logged {
            let body = match annotated.get(&k) {
                Some(snapshot) => claim_body(&body, &backup, snapshot),
                None => Some(body),
            };
            if let Some(body) = body {
                out.entry(k).or_insert(body);
            }
        }
        out
    }

    fn set_state(&mut self, id: u32, state: BlockRun) {
        if let Some(r) = self.runs.get_mut(&id) {
            r.state = state;
        }
    }

    fn start_hook(&mut self, id: u32, attempt: u32, h: Hook) {
        let at_ms = self.now_ms;
        let seq = self.emit(Event::HookStarted { block: id, attempt, hook: hook_ref(&h), at_ms });
        if let Some(r) = self.runs.get_mut(&id) {
            r.busy = true;
        }
        self.issue(Pending::Block(id), Some(seq), CommandKind::RunHook { block: id, attempt, hook: h });
    }

    /// A pre-hook ended (`ok` or not): go on, or fail the block.
    fn after_hook(&mut self, id: u32, h: &Hook, ok: bool) {
        let Some(run) = self.runs.get(&id).cloned() else { return };
        let BlockRun::Pre { next } = run.state else { return };
        let fail_mode = h.on_error == OnError::Fail || mutation::active(Mutation::ContinueFailsBlock);
        let fail = !ok && fail_mode && !mutation::active(Mutation::IgnorePreHookFailure);
        if fail {
            // Post-hooks only for pods whose pre-hook window opened in this attempt.
            let pods: BTreeSet<ItemKey> = (self.state.blocks.full(id as usize))
                .and_then(|b| b.attempt.as_ref())
                .map(|a| a.pods_with_pre_started().into_iter().cloned().collect())
                .unwrap_or_default();
            let all_pods = mutation::active(Mutation::PostHooksForUnopenedWindows);
            let hooks: Vec<Hook> =
                self.hooks_of(id, HookPhase::Post).into_iter().filter(|p| all_pods || pods.contains(&p.pod)).collect();
            let reason = format!("pre-hook {} of {} failed with onError Fail", h.index, h.pod);
            self.set_state(id, BlockRun::Post { hooks, next: 0, failed: Some(reason) });
        } else {
            self.set_state(id, BlockRun::Pre { next: next + 1 });
        }
    }

    /// Reports the result of command `id`.
    pub fn complete(&mut self, id: CmdId, completion: Completion) {
        let Some(pending) = self.inflight.remove(&id) else {
            tracing::warn!("completion for unknown command {id}");
            return;
        };
        if self.is_finished() || self.fatal.is_some() || self.stopped().is_some() {
            return;
        }
        if let Completion::Unreachable(message) = completion {
            self.unreachable(pending, message);
            return;
        }
        match (pending, completion) {
            (Pending::Discover, Completion::Discovered(r)) => {
                self.discovering = false;
                match r {
                    Ok(mut resources) => {
                        resources.sort();
                        resources.dedup_by(|a, b| a.gr == b.gr);
                        self.emit(Event::ResourcesDiscovered { resources });
                    }
                    Err(e) => {
                        let at_ms = self.now_ms;
                        self.emit(Event::Diagnostic {
                            severity: Severity::Error,
                            message: format!("discovery failed: {e}"),
                        });
                        self.emit(Event::BackupFinished { phase: Phase::Failed, at_ms });
                    }
                }
            }
            (Pending::List { unit, chunk }, Completion::Listed(r)) => self.listed(unit, chunk, r),
            (Pending::Get, Completion::Fetched(results)) => {
                let mut items = Vec::new();
                let mut failed = Vec::new();
                for (key, r) in results {
                    match r {
                        Ok(json) => {
                            let canon = json.and_then(|j| self.canonicalize_fetched(&key, &j));
                            items.push((key, canon.map(|(it, s)| (self.slim(it), s))));
                        }
                        // Recorded once; planning treats the key as unavailable and never asks again.
                        Err(e) => failed.push((key, e.to_string())),
                    }
                }
                let mut parsed = Vec::new();
                let mut found = Vec::with_capacity(items.len());
                for (key, got) in items {
                    let json = got.map(|(it, s)| {
                        parsed.push(it);
                        s
                    });
                    found.push((key, json));
                }
                let max = self.cfg.record_objects_bytes_max;
                for chunk in split_by_bytes(found, max, |(_, j)| j.as_ref().map_or(0, String::len)) {
                    self.emit(Event::ItemsFetched { items: chunk });
                }
                // Each with the body the fold gave it.
                for mut it in parsed {
                    it.body = match self.state.fetched.get(&it.key) {
                        Some(Some(Body::Logged(id))) => Some(*id),
                        _ => None,
                    };
                    if let Some(w) = self.catalog_add(&it) {
                        self.warn(w);
                    }
                }
                for (key, error) in failed {
                    self.emit(Event::FetchFailed { key, error });
                }
                self.get_answered();
            }
            (Pending::Block(b), c) => self.block_completion(b, c),
            (Pending::Inspect, Completion::VolumesInspected(inv)) => self.volumes_inspected(inv),
            (Pending::Await, Completion::SnapshotsSettled(results)) => {
                self.awaiting = false;
                for (id, r) in results {
                    let waiting =
                        self.state.snapshots.get(id as usize).is_some_and(|s| s.cut.is_some() && s.ready.is_none());
                    if waiting {
                        let at_ms = self.now_ms;
                        self.emit(Event::SnapshotReady { id, error: r.err(), at_ms });
                    }
                }
            }
            (Pending::Release, Completion::SnapshotsReleased(results)) => {
                self.releasing = false;
                for (id, r) in results {
                    let Some(s) = self.state.snapshots.get(id as usize) else { continue };
                    if s.released.is_some() || s.requested.is_none() {
                        continue;
                    }
                    let kept = self.snapshot_kept(s);
                    let at_ms = self.now_ms;
                    self.emit(Event::SnapshotReleased { id, kept, error: r.err(), at_ms });
                }
            }
            (Pending::Restage(key), Completion::Restaged(r)) => {
                self.restaging -= 1;
                match r {
                    Ok(()) => {
                        if self.restaging == 0 {
                            self.finalizing = false;
                        }
                    }
                    Err(e) => self.stop(format!("staging {key} again failed: {e}")),
                }
            }
            (Pending::Finalize, Completion::Finalized(r)) => match r {
                Ok(a) => {
                    self.finalizing = false;
                    self.emit(Event::ArchiveFinalized { digest: a.digest, bytes: a.bytes, items: a.items });
                }
                Err(FinalizeError::Unstaged { keys, message }) if self.restage_rounds < self.cfg.restage_rounds_max => {
                    // A staged item was lost or changed after its fact was recorded: stage the
                    // logged bytes again, then build the archive again.
                    self.restage_rounds += 1;
                    self.warn(format!(
                        "building the archive found {} staged items missing or changed ({message}); staging them again from the log",
                        keys.len()
                    ));
                    self.restage(keys);
                }
                Err(e) => {
                    self.finalizing = false;
                    self.stop(format!("building the archive failed: {e}"));
                }
            },
            (p, c) => {
                self.fatal.get_or_insert(format!("completion {c:?} does not answer {p:?}"));
            }
        }
    }

    /// Issues a `Restage` of each key's logged JSON; the archive is built again once all are done.
    fn restage(&mut self, keys: Vec<ItemKey>) {
        let bodies = self.staged_bodies(&keys);
        for key in keys {
            match bodies.get(&key).cloned() {
                Some(body) => {
                    self.restaging += 1;
                    self.issue(Pending::Restage(key.clone()), None, CommandKind::Restage { key, body });
                }
                None => {
                    self.stop(format!("building the archive failed: {key} is not staged and not in the log"));
                    return;
                }
            }
        }
        if self.restaging == 0 {
            self.finalizing = false;
        }
    }

    fn canonicalize_fetched(&mut self, key: &ItemKey, json: &str) -> Option<(Item, String)> {
        let rt = self.resource(&key.gr())?;
        match canonicalize(&rt, 0, json) {
            Ok((it, s)) if &it.key == key => Some((it, s)),
            Ok((it, _)) => {
                self.warn(format!("get {key} returned a different object ({})", it.key));
                None
            }
            Err(e) => {
                self.warn(e.to_string());
                None
            }
        }
    }

    fn listed(&mut self, unit: ListUnit, chunk: u32, r: Result<ListPage, ClusterError>) {
        match r {
            Ok(page) => {
                let Some(rt) = self.resource(&unit.resource) else { return };
                let base = self.state.listings.get(&unit).filter(|_| chunk > 0).map_or(0, |l| l.received as usize);
                let mut objects = Vec::with_capacity(page.objects.len());
                let mut parsed = Vec::with_capacity(page.objects.len());
                let mut bad = Vec::new();
                for (i, raw) in page.objects.iter().enumerate() {
                    match canonicalize(&rt, base + i, raw) {
                        Ok((it, s)) => {
                            parsed.push(self.slim(it));
                            objects.push(s);
                        }
                        Err(e) => bad.push(e.to_string()),
                    }
                }
                if chunk == 0 {
                    self.forget_unit(&unit);
                }
                let complete = page.continue_token.is_none();
                // The number the fold gives the page's first object.
                let first = self.state.bodies;
                // A page of large objects becomes several records, each bounded in bytes.
                let parts = split_by_bytes(objects, self.cfg.record_objects_bytes_max, String::len);
                let n = parts.len() as u32;
                for (i, objects) in parts.into_iter().enumerate() {
                    let i = i as u32;
                    let last = i + 1 == n;
                    self.emit(Event::ResourceListed {
                        unit: unit.clone(),
                        chunk: chunk + i,
                        objects,
                        complete: complete && last,
                    });
                }
                // Each with the number the fold gave its body.
                for (i, it) in parsed.iter_mut().enumerate() {
                    it.body = Some(first + i as u64);
                }
                for it in parsed {
                    if let Some(w) = self.catalog_add(&it) {
                        self.warn(w);
                    }
                }
                for b in bad {
                    self.warn(b);
                }
                if complete {
                    self.listing.remove(&unit);
                } else {
                    let limit = self.cfg.list_page_items_max;
                    let kind = CommandKind::List {
                        unit: unit.clone(),
                        resource: rt,
                        limit,
                        continue_token: page.continue_token,
                    };
                    self.issue(Pending::List { unit, chunk: chunk + n }, None, kind);
                }
            }
            Err(ClusterError::Expired(_)) => {
                // 410 Gone: the continue token expired; list the unit again from the start.
                let Some(rt) = self.resource(&unit.resource) else { return };
                let limit = self.cfg.list_page_items_max;
                let kind = CommandKind::List { unit: unit.clone(), resource: rt, limit, continue_token: None };
                self.issue(Pending::List { unit, chunk: 0 }, None, kind);
            }
            Err(e) => {
                self.listing.remove(&unit);
                self.forget_unit(&unit);
                self.emit(Event::ListFailed { unit, error: e.to_string() });
            }
        }
    }

    /// A `Get` was answered: fetching ends with the last one in flight.
    fn get_answered(&mut self) {
        if !self.inflight.values().any(|p| matches!(p, Pending::Get)) {
            self.fetching = false;
        }
    }

    /// The cluster could not be reached for a command: stop the run as after a store failure,
    /// recording nothing of the command (it is done again on `resume`).
    fn unreachable(&mut self, pending: Pending, message: String) {
        let reason = format!("the cluster is unreachable: {message}");
        match pending {
            Pending::Discover => self.discovering = false,
            Pending::List { unit, .. } => {
                self.listing.remove(&unit);
            }
            Pending::Get => self.get_answered(),
            Pending::Inspect => self.inspecting = false,
            Pending::Await => self.awaiting = false,
            Pending::Release => self.releasing = false,
            Pending::Block(id) => self.block_unreachable(id),
            Pending::Restage(_) => self.restaging = self.restaging.saturating_sub(1),
            Pending::Finalize => self.finalizing = false,
        }
        self.stop(reason);
    }

    /// A block's hook or cut could not reach the cluster. A hook's outcome is not recorded: a
    /// post-hook stays owed to `resume` (its window open in the log), and the other windows of the
    /// stopping run are closed as after a store failure — each post-hook tried within its own
    /// timeout. A cut that could not finish leaves its window open for `resume`, which finishes the
    /// cut inside it before the post-hooks close it (as after a kill): a snapshot is never taken
    /// outside its window.
    fn block_unreachable(&mut self, id: u32) {
        let Some(run) = self.runs.get(&id).cloned() else { return };
        if let Some(r) = self.runs.get_mut(&id) {
            r.busy = false;
        }
        match run.state {
            // Stopping turns it into closing what the attempt opened (this pod's window included:
            // its pre-hook started and may have run).
            BlockRun::Pre { .. } | BlockRun::Writing { .. } => {}
            BlockRun::Post { hooks, next, .. } | BlockRun::Closing { hooks, next } => {
                let rest = hooks.into_iter().skip(next + 1).collect();
                self.set_state(id, BlockRun::Closing { hooks: rest, next: 0 });
            }
            BlockRun::ClosingInterrupted { attempt, owed, next } => {
                self.set_state(id, BlockRun::ClosingInterrupted { attempt, owed, next: next + 1 });
            }
            BlockRun::Cutting | BlockRun::FinishingCut { .. } => {
                self.runs.remove(&id);
            }
        }
    }

    fn block_completion(&mut self, id: u32, c: Completion) {
        let Some(run) = self.runs.get(&id).cloned() else { return };
        if let Some(r) = self.runs.get_mut(&id) {
            r.busy = false;
        }
        let at_ms = self.now_ms;
        match (run.state.clone(), c) {
            (BlockRun::ClosingInterrupted { attempt, owed, next }, Completion::HookRan(outcome)) => {
                if let Some(h) = owed.get(next) {
                    self.emit(Event::HookFinished { block: id, attempt, hook: hook_ref(h), outcome, at_ms });
                }
                self.set_state(id, BlockRun::ClosingInterrupted { attempt, owed, next: next + 1 });
            }
            (BlockRun::Pre { next }, Completion::HookRan(outcome)) => {
                let Some(h) = self.hooks_of(id, HookPhase::Pre).get(next).cloned() else { return };
                let ok = outcome.ok();
                self.emit(Event::HookFinished { block: id, attempt: run.attempt, hook: hook_ref(&h), outcome, at_ms });
                self.after_hook(id, &h, ok);
            }
            (BlockRun::FinishingCut { attempt, owed }, Completion::SnapshotsCut(results)) => {
                self.record_cuts(results);
                self.set_state(id, BlockRun::ClosingInterrupted { attempt, owed, next: 0 });
            }
            (BlockRun::Cutting, Completion::SnapshotsCut(results)) => {
                self.record_cuts(results);
                if mutation::active(Mutation::SnapshotBeforePreHooks) && run.captured && !run.writes_done {
                    // The deliberate bug cut before the pre-hooks: run them now.
                    self.set_state(id, BlockRun::Pre { next: 0 });
                } else {
                    self.set_state(id, BlockRun::Writing { next: 0 });
                }
            }
            (BlockRun::Writing { next }, Completion::Written(r)) => {
                let Some(PlannedWrite::Write { key, .. }) = run.writes.as_ref().and_then(|w| w.get(next)).cloned()
                else {
                    self.fatal.get_or_insert(format!("block {id}: a write completed that was not planned"));
                    return;
                };
                match r {
                    Ok((digest, bytes)) => {
                        // Every body is logged: its hash is the shell's, of the bytes it read back
                        // and staged.
                        self.emit(Event::ItemWritten { block: id, attempt: run.attempt, key, digest, bytes });
                    }
                    Err(error) => {
                        // The store is failing, not the item: stop, and let `resume` redo the block.
                        self.stop(format!("block {id}: staging {key} failed: {error}"));
                        return;
                    }
                }
                self.set_state(id, BlockRun::Writing { next: next + 1 });
            }
            (BlockRun::Closing { hooks, next }, Completion::HookRan(outcome)) => {
                if let Some(h) = hooks.get(next) {
                    let hook = hook_ref(h);
                    self.emit(Event::HookFinished { block: id, attempt: run.attempt, hook, outcome, at_ms });
                }
                self.set_state(id, BlockRun::Closing { hooks, next: next + 1 });
            }
            (BlockRun::Post { hooks, next, failed }, Completion::HookRan(outcome)) => {
                if let Some(h) = hooks.get(next) {
                    self.emit(Event::HookFinished {
                        block: id,
                        attempt: run.attempt,
                        hook: hook_ref(h),
                        outcome,
                        at_ms,
                    });
                }
                self.set_state(id, BlockRun::Post { hooks, next: next + 1, failed });
            }
            (s, c) => {
                self.fatal.get_or_insert(format!("block {id}: completion {c:?} in state {s:?}"));
            }
        }
    }
}

/// Splits `items` into runs whose summed `size` stays within `bytes_max` (an item larger than the
/// bound gets a run of its own); always at least one run, possibly empty.
/// A snapshot plan packed while the plan is recorded, as the state packs it ([`state::pack`]).
fn pack_plan(p: &SnapshotPlan) -> Box<[u8]> {
    // A plan is strings, numbers and options: bincode encodes every such value.
    state::pack(p).unwrap_or_default().into_boxed_slice()
}

/// A plan [`pack_plan`] packed.
fn unpack_plan(bytes: &[u8]) -> SnapshotPlan {
    state::unpack(bytes).unwrap_or_default()
}

fn split_by_bytes<T>(items: Vec<T>, bytes_max: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = vec![Vec::new()];
    let mut used = 0usize;
    for it in items {
        let n = size(&it);
        let current_full = out.last().is_some_and(|c| !c.is_empty()) && used + n > bytes_max;
        if current_full {
            out.push(Vec::new());
            used = 0;
        }
        used += n;
        if let Some(last) = out.last_mut() {
            last.push(it);
        }
    }
    out
}

/// The post-hooks the latest attempt of `b` still owes: those of the pods whose pre-hook started,
/// not yet finished.
fn owed_post_hooks(b: &crate::state::BlockState) -> Vec<Hook> {
    let Some(a) = &b.attempt else { return Vec::new() };
    let pods = a.pods_with_pre_started();
    let Some(plan) = &b.plan else { return Vec::new() };
    plan.hooks
        .iter()
        .filter(|h| h.phase == HookPhase::Post && pods.contains(&h.pod))
        .filter(|h| !a.hooks_finished.contains_key(&hook_ref(h)))
        .cloned()
        .collect()
}

/// The reference of a hook inside its block.
pub fn hook_ref(h: &Hook) -> HookRef {
    HookRef { pod: h.pod.clone(), phase: h.phase, index: h.index }
}

/// Names of the built-in ItemBlockActions: what they read of a pod is known
/// ([`project_pod`]).
const BUILTIN_ACTIONS: [&str; 3] = ["pod", "persistentvolumeclaim", "serviceaccount"];

/// The strings the built-in actions and snapshot planning read of an object of `gr`, as JSON
/// pointers (`/subjects` keeps each subject's kind, namespace and name); `None`: nothing projects
/// it, the whole object is kept.
fn projection(gr: &GroupResource) -> Option<&'static [&'static str]> {
    match (gr.group.as_str(), gr.resource.as_str()) {
        // `grouping::pvc_bound`, the claim action.
        ("", "persistentvolumeclaims") => Some(&["/spec/volumeName", "/status/phase"]),
        // `PvVolume::of`.
        ("", "persistentvolumes") => Some(&["/spec/csi/driver", "/spec/csi/volumeHandle"]),
        // The service-account action: subjects, and the role a binding grants.
        ("rbac.authorization.k8s.io", "clusterrolebindings") => Some(&["/subjects", "/roleRef/kind", "/roleRef/name"]),
        _ => None,
    }
}

/// The strings of `object` at `pointers` (and `/subjects`' kind, namespace and name), in maps of
/// their own: nothing else of the object.
fn project(object: &serde_json::Value, pointers: &[&str]) -> serde_json::Value {
    use serde_json::Value;
    let mut out = Value::Object(serde_json::Map::new());
    for p in pointers {
        let Some(found) = object.pointer(p) else { continue };
        let kept = match found {
            Value::String(_) => found.clone(),
            Value::Array(subjects) if *p == "/subjects" => Value::Array(
                subjects
                    .iter()
                    .map(|s| {
                        let fields = ["kind", "namespace", "name"]
                            .into_iter()
                            .filter_map(|k| s.get(k).filter(|v| v.is_string()).map(|v| (k.to_string(), v.clone())));
                        Value::Object(fields.collect())
                    })
                    .collect(),
            ),
            _ => continue,
        };
        let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
        crate::item::set_at(&mut out, &parts, kept);
    }
    out
}

/// The key of an already validated (canonical) object, from its metadata alone.
fn object_key(rt: &ResourceType, json: &str) -> Option<ItemKey> {
    #[derive(serde::Deserialize)]
    struct Meta<'a> {
        #[serde(borrow)]
        metadata: Names<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Names<'a> {
        #[serde(borrow)]
        name: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        namespace: Option<std::borrow::Cow<'a, str>>,
    }
    let m: Meta<'_> = serde_json::from_str(json).ok()?;
    let namespace = if rt.namespaced { Some(m.metadata.namespace?) } else { None };
    Some(ItemKey::new(&rt.gr.group, &rt.gr.resource, namespace.as_deref(), &m.metadata.name))
}

/// Validates a served object and returns its canonical JSON (sorted keys, apiVersion and kind set,
/// as Velero writes them; list responses leave them out of the items).
pub fn canonicalize(rt: &ResourceType, index: usize, raw: &str) -> Result<(Item, String), crate::item::ItemError> {
    let mut it = Item::parse(rt, index, raw)?;
    let mut object = it.take_object();
    if let Some(o) = object.as_object_mut() {
        o.insert("apiVersion".into(), serde_json::Value::String(rt.api_version()));
        o.insert("kind".into(), serde_json::Value::String(rt.kind.clone()));
    }
    it.set_object(object);
    let s = String::from_utf8(it.canonical_json()).unwrap_or_default();
    Ok((it, s))
}

/// One object of the write path's view in 16 bytes: its key's digest's high half and the top 32
/// bits of its low half, and its body's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ShortObject {
    hi: u64,
    lo: u32,
    body: u32,
}

/// The write path's view of every known object: its key's digest → its body, 16 bytes an object
/// (a `(u128, Body)` was 64: 73 MB at a million objects; `(u64, u64, BodyId)` 24). An object is
/// found by 96 bits of its key's 128-bit digest: objects that share those 96 bits (two keys, or
/// one key logged twice) are kept apart with their whole digest, as are all when a body's number
/// does not fit 32 bits. A key the view does not hold matches one it holds only if their digests
/// share 96 bits (~2^-96 a lookup, where the digest itself is trusted to 128).
#[derive(Debug, Default)]
struct Objects {
    /// Objects whose 96 bits no other shares, sorted.
    short: Vec<ShortObject>,
    /// (digest's high half, low half, body number) of the rest, sorted, the first of a digest
    /// only.
    long: Vec<(u64, u64, BodyId)>,
}

impl Objects {
    /// The view of `objects()`'s (digest, body) pairs: of a digest given twice, the lowest body
    /// number (the first logged). `objects` is called again only when two objects share 96 bits
    /// or a body's number does not fit 32 bits.
    fn build<I: Iterator<Item = (u128, BodyId)>>(objects: impl Fn() -> I) -> Objects {
        let split = |(d, b): (u128, BodyId)| ((d >> 64) as u64, d as u64, b);
        let whole = |keep: &dyn Fn(u64, u64) -> bool| {
            let mut long: Vec<(u64, u64, BodyId)> = objects().map(split).filter(|&(h, l, _)| keep(h, l)).collect();
            long.sort_unstable();
            long.dedup_by_key(|(hi, lo, _)| (*hi, *lo));
            long.shrink_to_fit();
            long
        };
        let mut short = Vec::new();
        for (hi, lo, body) in objects().map(split) {
            let Ok(body) = u32::try_from(body) else {
                // A body numbered past 32 bits: every object kept whole.
                return Objects { short: Vec::new(), long: whole(&|_, _| true) };
            };
            short.push(ShortObject { hi, lo: (lo >> 32) as u32, body });
        }
        short.sort_unstable();
        let prefix = |o: &ShortObject| (o.hi, o.lo);
        let shared: HashSet<(u64, u32)> =
            short.windows(2).filter(|w| prefix(&w[0]) == prefix(&w[1])).map(|w| prefix(&w[0])).collect();
        let long = match shared.is_empty() {
            true => Vec::new(),
            false => {
                short.retain(|o| !shared.contains(&prefix(o)));
                whole(&|hi, lo| shared.contains(&(hi, (lo >> 32) as u32)))
            }
        };
        short.shrink_to_fit();
        Objects { short, long }
    }

    fn get(&self, d: u128) -> Option<Body> {
        let (hi, lo) = ((d >> 64) as u64, d as u64);
        if let Ok(i) = self.long.binary_search_by_key(&(hi, lo), |&(h, l, _)| (h, l)) {
            return Some(Body::Logged(self.long[i].2));
        }
        let i = self.short.binary_search_by_key(&(hi, (lo >> 32) as u32), |o| (o.hi, o.lo)).ok()?;
        Some(Body::Logged(BodyId::from(self.short[i].body)))
    }
}

/// A resumed backup's objects when its plan was finished, in log order: the write path's view
/// is made of them ([`Resumed::into_objects`]) with the live run's rules — a listing started again
/// forgets its unit's objects, the first of a key listed twice stays — and nothing else is needed
/// of them. (Each was an [`Item`] of its key, 64 bytes and its key's ~60, turned into the view
/// beside a vector of every key: ~200 MB at a million objects, the resumed run's peak.)
#[derive(Debug, Default)]
struct Resumed {
    /// (digest's high half, low half, body number, scope).
    objects: Vec<(u64, u64, BodyId, u32)>,
    /// Each scope's resource and namespace (what a listing unit matches).
    scopes: Vec<(GroupResource, Option<String>)>,
    scope_of: HashMap<(GroupResource, Option<String>), u32>,
}

impl Resumed {
    fn push(&mut self, key: &ItemKey, body: BodyId) {
        let (g, r, ns) = (key.group(), key.resource(), key.namespace());
        let last = self.objects.last().map(|o| o.3);
        let same = |s: u32| {
            self.scopes.get(s as usize).is_some_and(|(gr, n)| gr.group == g && gr.resource == r && n.as_deref() == ns)
        };
        let scope = match last.filter(|&s| same(s)) {
            Some(s) => s,
            None => {
                let k = (GroupResource::new(g, r), ns.map(str::to_string));
                let next = self.scopes.len() as u32;
                let s = *self.scope_of.entry(k.clone()).or_insert(next);
                if s == next {
                    self.scopes.push(k);
                }
                s
            }
        };
        let d = key.digest();
        self.objects.push(((d >> 64) as u64, d as u64, body, scope));
    }

    /// Forgets the objects of `unit` but those fetched by key (as the catalog does).
    fn forget(&mut self, unit: &ListUnit, fetched: &BTreeMap<ItemKey, Option<Body>>) {
        if self.objects.is_empty() {
            return;
        }
        let of_unit: HashSet<u32> = (self.scopes.iter().enumerate())
            .filter(|(_, (gr, ns))| *gr == unit.resource && (unit.namespace.is_none() || *ns == unit.namespace))
            .map(|(i, _)| i as u32)
            .collect();
        if of_unit.is_empty() {
            return;
        }
        let kept: HashSet<(u64, u64)> =
            fetched.keys().map(|k| k.digest()).map(|d| ((d >> 64) as u64, d as u64)).collect();
        self.objects.retain(|&(hi, lo, _, s)| !of_unit.contains(&s) || kept.contains(&(hi, lo)));
    }

    /// The write path's view: of a key logged twice, the first (ids grow in log order).
    fn into_objects(self) -> Objects {
        let logged = || self.objects.iter().map(|&(hi, lo, id, _)| ((u128::from(hi) << 64) | u128::from(lo), id));
        Objects::build(logged)
    }
}

/// The body of a claim written with the labels and annotations of its snapshot `snapshot`: made
/// by the shell from the logged claim it reads back.
fn claim_body(body: &Body, backup: &str, snapshot: &str) -> Option<Body> {
    match body {
        Body::Logged(id) => Some(Body::Claim { id: *id, backup: Arc::from(backup), snapshot: Arc::from(snapshot) }),
        // Annotated already: the same snapshot of the same backup.
        Body::Claim { .. } => Some(body.clone()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn projected(group: &str, resource: &str, object: serde_json::Value) -> serde_json::Value {
        project(&object, projection(&GroupResource::new(group, resource)).unwrap())
    }

    /// The write path's view finds each object's body by its digest: the first logged of a digest
    /// given twice, objects sharing 96 bits told apart by the whole digest, and all of them when
    /// a body's number does not fit 32 bits; a digest not given is not found.
    #[test]
    fn the_view_finds_each_body_by_its_whole_digest() {
        let d = |hi: u64, lo: u64| (u128::from(hi) << 64) | u128::from(lo);
        let given = [
            (d(7, 1 << 40), 5),
            (d(3, 9), 1),
            (d(7, (1 << 40) | 1), 6), // shares 96 bits with the first
            (d(3, 9), 0),             // the same digest again, logged first
            (d(u64::MAX, u64::MAX), 9),
        ];
        let check = |given: &[(u128, BodyId)]| {
            let view = Objects::build(|| given.iter().copied());
            let body = |d| match view.get(d) {
                Some(Body::Logged(id)) => Some(id),
                _ => None,
            };
            for &(digest, _) in given {
                let first = given.iter().filter(|g| g.0 == digest).map(|g| g.1).min();
                assert_eq!(body(digest), first, "{digest:x}");
            }
            // Not given: sharing 96 bits with given ones, or nothing with any.
            for absent in [d(7, (1 << 40) | 2), d(3, 10), d(4, 9), 0] {
                assert_eq!(body(absent), None, "{absent:x}");
            }
            view
        };
        let view = check(&given);
        assert_eq!((view.short.len(), view.long.len()), (1, 3), "only the shared ones kept whole");
        let mut big = given.to_vec();
        big.push((d(1, 1), u64::from(u32::MAX) + 1));
        let view = check(&big);
        assert_eq!((view.short.len(), view.long.len()), (0, 5));
    }

    #[test]
    fn a_projection_keeps_exactly_the_strings_planning_reads() {
        let pvc = json!({"metadata": {"name": "data", "labels": {"a": "b"}},
            "spec": {"volumeName": "pv1", "storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}});
        assert_eq!(
            projected("", "persistentvolumeclaims", pvc),
            json!({"spec": {"volumeName": "pv1"}, "status": {"phase": "Bound"}})
        );
        let pending =
            json!({"metadata": {"name": "data"}, "spec": {"storageClassName": "fast"}, "status": {"phase": "Pending"}});
        assert_eq!(projected("", "persistentvolumeclaims", pending), json!({"status": {"phase": "Pending"}}));
        let pv = json!({"metadata": {"name": "pv1"}, "spec": {"capacity": {"storage": "1Gi"},
            "csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "h1", "fsType": "ext4"}}});
        let kept = projected("", "persistentvolumes", pv.clone());
        assert_eq!(kept, json!({"spec": {"csi": {"driver": "hostpath.csi.k8s.io", "volumeHandle": "h1"}}}));
        assert_eq!(PvVolume::of(&kept), PvVolume::of(&pv));
        let crb = json!({"metadata": {"name": "r"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "namespace": "ns", "name": "sa", "apiGroup": ""}, {"kind": "User", "name": "u"}]});
        assert_eq!(
            projected("rbac.authorization.k8s.io", "clusterrolebindings", crb),
            json!({"roleRef": {"kind": "ClusterRole", "name": "view"},
                "subjects": [{"kind": "ServiceAccount", "namespace": "ns", "name": "sa"}, {"kind": "User", "name": "u"}]})
        );
        assert!(projection(&GroupResource::new("", "configmaps")).is_none());
    }

    /// Planning keeps of most objects' labels those the selection reads (the exclude label, the
    /// label selector's keys); of pods and claims, all.
    /// A resumed backup whose plan was finished keeps only its objects' digests ([`Resumed`]): the
    /// write path's view it makes is the one the catalog of items makes from the same log — a
    /// unit listed again or failed forgets its objects (cluster-wide and per-namespace units
    /// alike) but those fetched by key, the first of a key logged twice stays — over 300
    /// generated logs.
    #[test]
    fn a_resumed_plan_makes_the_view_the_catalog_makes() {
        use crate::event::ListUnit;
        let pods = ResourceType::new("", "v1", "pods", "Pod", true);
        let cms = ResourceType::new("", "v1", "configmaps", "ConfigMap", true);
        let types: BTreeMap<GroupResource, ResourceType> =
            [pods.clone(), cms.clone()].into_iter().map(|r| (r.gr.clone(), r)).collect();
        // A fixed linear congruential sequence: the same 300 logs every run.
        let mut seed = 23u64;
        let mut rng = move |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        for case in 0..300 {
            let mut events = Vec::new();
            let mut chunks: BTreeMap<ListUnit, u32> = BTreeMap::new();
            let mut fetched = BTreeMap::new();
            for _ in 0..rng(12) + 1 {
                let rt = if rng(2) == 0 { &pods } else { &cms };
                let namespace = ["a", "b"].get(rng(3) as usize).map(|n| n.to_string());
                let unit = ListUnit { resource: rt.gr.clone(), namespace: namespace.clone() };
                let object = |name: u64, ns: &str, v: u64| {
                    json!({"metadata": {"name": format!("o{name}"), "namespace": ns, "resourceVersion": v.to_string()}})
                        .to_string()
                };
                match rng(6) {
                    0 => events.push(Event::ListFailed { unit, error: "boom".into() }),
                    1 => {
                        let ns = ["a", "b"][rng(2) as usize];
                        let name = rng(4);
                        let key = ItemKey::namespaced("", &rt.gr.resource, ns, &format!("o{name}"));
                        let found = rng(4) > 0;
                        fetched.insert(key.clone(), found.then_some(Body::Logged(0)));
                        let json = found.then(|| object(name, ns, rng(100)));
                        events.push(Event::ItemsFetched { items: vec![(key, json)] });
                    }
                    _ => {
                        let chunk = match rng(3) {
                            0 => 0,
                            _ => *chunks.get(&unit).unwrap_or(&0),
                        };
                        chunks.insert(unit.clone(), chunk + 1);
                        let objects = (0..rng(4))
                            .map(|_| {
                                let ns = namespace.clone().unwrap_or_else(|| ["a", "b"][rng(2) as usize].to_string());
                                object(rng(4), &ns, rng(100))
                            })
                            .collect();
                        events.push(Event::ResourceListed { unit, chunk, objects, complete: false });
                    }
                }
            }
            let view = |plan_finished: bool| {
                let mut e = Engine::new(BackupSpec::new("b"), EngineConfig::default(), 0).unwrap();
                e.state.plan_finished = plan_finished;
                e.state.fetched = fetched.clone();
                let mut n = 0;
                for ev in &events {
                    e.catalog_push(&types, &mut n, ev);
                }
                e.build_objects(false);
                e.objects.map(|o| (o.short, o.long)).unwrap_or_default()
            };
            assert_eq!(view(true), view(false), "case {case}: {events:?}");
        }
    }

    #[test]
    fn a_slim_object_keeps_the_labels_the_selection_reads() {
        let labels = json!({"app": "web", "tier": "a", "velero.io/exclude-from-backup": "false"});
        let cms = ResourceType::new("", "v1", "configmaps", "ConfigMap", true);
        let pods = ResourceType::new("", "v1", "pods", "Pod", true);
        let obj = json!({"metadata": {"name": "x", "namespace": "ns", "labels": labels}});
        let keys = |spec: BackupSpec, rt: &ResourceType| -> Vec<String> {
            let e = Engine::new(spec, EngineConfig::default(), 0).unwrap();
            e.slim(Item::from_value(rt, 0, obj.clone()).unwrap()).labels().iter().map(|(k, _)| k.clone()).collect()
        };
        assert_eq!(keys(BackupSpec::new("b"), &cms), ["velero.io/exclude-from-backup"]);
        let spec = BackupSpec { label_selector: Some("app in (web),!gone".into()), ..BackupSpec::new("b") };
        assert_eq!(keys(spec, &cms), ["app", "velero.io/exclude-from-backup"]);
        // A pod's: also those the spec's hooks select pods by; of its annotations, the hooks'.
        assert_eq!(keys(BackupSpec::new("b"), &pods), ["velero.io/exclude-from-backup"]);
        let hook = crate::hooks::ResourceHookSpec {
            name: "h".into(),
            included_namespaces: Vec::new(),
            excluded_namespaces: Vec::new(),
            label_selector: Some("tier=a".into()),
            pre: Vec::new(),
            post: Vec::new(),
        };
        let spec = BackupSpec { hooks: vec![hook], ..BackupSpec::new("b") };
        assert_eq!(keys(spec, &pods), ["tier", "velero.io/exclude-from-backup"]);
        let annotated = json!({"metadata": {"name": "x", "namespace": "ns", "annotations": {
            "pre.hook.backup.velero.io/command": "[\"sync\"]", "hook.backup.velero.io/container": "c",
            "post.hook.backup.velero.io/command": "[\"true\"]", "kubectl.kubernetes.io/restartedAt": "now",
            "pre.hook.backup.velero.ioX/command": "no"}}});
        let e = Engine::new(BackupSpec::new("b"), EngineConfig::default(), 0).unwrap();
        let it = e.slim(Item::from_value(&pods, 0, annotated).unwrap());
        let kept: Vec<&str> = it.annotations().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kept,
            [
                "hook.backup.velero.io/container",
                "post.hook.backup.velero.io/command",
                "pre.hook.backup.velero.io/command"
            ]
        );
    }

    /// Planning keeps a claim's and a volume's strings, not their JSON, and reads the same answers
    /// from them as from the projection; a volume with none of the strings is still known.
    #[test]
    fn a_slim_claim_or_volume_keeps_its_strings_and_answers_as_its_projection() {
        let e = Engine::new(BackupSpec::new("b"), EngineConfig::default(), 0).unwrap();
        let pvcs = ResourceType::new("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true);
        let pvc = json!({"metadata": {"name": "data", "namespace": "ns"},
            "spec": {"volumeName": "pv1", "storageClassName": "fast"}, "status": {"phase": "Bound"}});
        let it = e.slim(Item::from_value(&pvcs, 0, pvc.clone()).unwrap());
        assert!(it.object().is_null() && it.has_object());
        assert_eq!(it.str_at("/spec/volumeName"), Some("pv1"));
        assert_eq!(it.str_at("/status/phase"), Some("Bound"));
        assert_eq!(it.str_at("/spec/storageClassName"), None);
        assert!(crate::grouping::pvc_bound(&it));
        assert_eq!(*it.kept_object(), projected("", "persistentvolumeclaims", pvc));
        let pvs = ResourceType::new("", "v1", "persistentvolumes", "PersistentVolume", false);
        let pv = json!({"metadata": {"name": "pv1"}, "spec": {"csi": {"driver": "d.csi", "volumeHandle": "h1"}}});
        let it = e.slim(Item::from_value(&pvs, 0, pv.clone()).unwrap());
        assert_eq!(PvVolume::of(&it.kept_object()), PvVolume::of(&pv));
        let bare = e.slim(Item::from_value(&pvs, 0, json!({"metadata": {"name": "pv2"}, "spec": {}})).unwrap());
        assert!(bare.has_object(), "a volume without CSI strings must not be fetched again");
        assert_eq!(PvVolume::of(&bare.kept_object()), PvVolume::NotCsi);
    }
}
