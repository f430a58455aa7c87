//! The backup's state as a pure fold of its events.
//!
//! [`BackupState::apply`] is the only way state changes, in the engine as in recovery: the engine
//! applies each event as it emits it, and `resume` applies the log from the start. So whatever the
//! engine decided before a crash, the restarted engine sees exactly what was made durable.
//! Events that contradict the state (a hook for a block that was never planned, say) are a
//! [`FoldError`] naming the sequence number, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::body::{Body, BodyId};
use crate::event::{BlockOutcome, Event, HookOutcome, HookRef, ListUnit, Phase, Seq};
use crate::grouping::BlockPlan;
use crate::hooks::HookPhase;
use crate::item::{ItemKey, ResourceType};
use crate::snapshot::{BackupOptions, PvVolume, SnapshotPlan};
use crate::spec::BackupSpec;
use crate::summary::{event_message, phase_name, phase_of, record_once, SnapshotNames};

/// An event that does not fit the state it is applied to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {seq} ({kind}) does not fit the backup's state: {reason}")]
pub struct FoldError {
    /// Sequence number of the event.
    pub seq: Seq,
    /// Its kind.
    pub kind: &'static str,
    /// What did not fit.
    pub reason: String,
}

/// Progress of one listing unit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    /// Objects received so far.
    pub received: u64,
    /// Chunks received.
    pub chunks: u32,
    /// All pages received.
    pub complete: bool,
    /// The listing gave up with this error.
    pub failed: Option<String>,
}

/// A small map kept as a vector sorted by key: an attempt's hooks and written items are one to a
/// few entries, and a B-tree leaf per map cost ~1.5 KiB (hundreds of MiB at 300,000 objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    /// Sets `key` (again: the latest value wins).
    pub fn insert(&mut self, key: K, value: V) {
        if self.0.capacity() == 0 {
            // Most maps hold one entry: no room for four.
            self.0.reserve_exact(1);
        }
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.0.binary_search_by(|(k, _)| k.cmp(key)).ok().map(|i| &self.0[i].1)
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.0.iter().map(|(k, _)| k)
    }

    /// The values, in key order.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.0.iter().map(|(_, v)| v)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<'a, K: Ord, V> IntoIterator for &'a VecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Box<dyn Iterator<Item = Self::Item> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// An item an attempt wrote, as [`Attempt::written`] keeps it: its position in the block's plan,
/// or (an item the plan does not list: a snapshot's VolumeSnapshot and VolumeSnapshotContent) its
/// key. A key per written item beside the plan's was ~200 bytes an item.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum WrittenKey {
    /// `plan.items[i]`.
    Planned(u32),
    /// An item the plan does not list.
    Other(Box<ItemKey>),
}

/// The items an attempt wrote: key (by [`WrittenKey`]) → (digest, bytes).
pub type Written = VecMap<WrittenKey, ([u8; 32], u64)>;

/// One attempt at a block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attempt {
    /// Attempt number, from 1.
    pub number: u32,
    /// Hooks whose start is recorded.
    pub hooks_started: VecMap<HookRef, ()>,
    /// Hooks whose end is recorded, with how they ended.
    pub hooks_finished: VecMap<HookRef, HookOutcome>,
    /// Items written in this attempt: key → (digest, bytes); [`BlockState::written`] gives them by
    /// key.
    pub written: Written,
    /// Items that failed to write.
    pub failed_items: BTreeMap<ItemKey, String>,
    /// When it started.
    pub started_ms: u64,
}

impl Attempt {
    /// Ran no hook and failed no item: once its block finished, nothing of it but its written
    /// items (kept apart) and its number is read.
    fn plain(&self) -> bool {
        self.hooks_started.is_empty() && self.hooks_finished.is_empty() && self.failed_items.is_empty()
    }

    /// Pods with at least one pre-hook started in this attempt: their post-hooks are owed.
    pub fn pods_with_pre_started(&self) -> BTreeSet<&ItemKey> {
        self.hooks_started.keys().filter(|h| h.phase == HookPhase::Pre).map(|h| &h.pod).collect()
    }
}

/// A planned block and its history.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockState {
    /// The plan (shared with the `BlockPlanned` event that carried it), kept only when the block
    /// has hooks: what a crash leaves owed (post-hooks) and what `describe` shows of a block is
    /// read from it. Every other block's plan is the log's (`BlockPlanned`), read back when the
    /// block starts ([`crate::ports::PlanSource`]): a plan and its keys were ~150 bytes a block,
    /// ~160 MB held through a million-object backup's write phase.
    pub plan: Option<Arc<BlockPlan>>,
    /// How many items the plan lists.
    pub items: u32,
    /// The latest attempt while it is open; once the block finished, only if the attempt ran a
    /// hook or failed an item (boxed: most blocks of a large backup are one item). A finished
    /// block's written items are in its backup's table ([`BackupState::written`]): the box, the
    /// written map's own allocation and their slack were ~190 bytes a finished block.
    pub attempt: Option<Box<Attempt>>,
    /// The number of the latest attempt (0: none started).
    pub attempts: u32,
    /// How the block ended, once it has.
    pub outcome: Option<BlockOutcome>,
    /// How many items a finished block's last attempt wrote (the items themselves are the log's:
    /// [`crate::entries`]).
    written_done: u32,
}

impl BlockState {
    /// Started, not finished: a crash left this attempt open (or it is running now).
    pub fn in_flight(&self) -> bool {
        self.attempt.is_some() && self.outcome.is_none()
    }

    /// An item as `written` keeps it, by key.
    fn key_of<'a>(&'a self, k: &'a WrittenKey) -> Option<&'a ItemKey> {
        match k {
            WrittenKey::Planned(i) => self.plan.as_ref()?.items.get(*i as usize),
            WrittenKey::Other(k) => Some(&**k),
        }
    }

    /// How the latest attempt keeps `key` among its written items: its position in the plan (the
    /// next one in write order looked at first), or the key itself.
    fn written_key(&self, key: &ItemKey) -> WrittenKey {
        let next = self.attempt.as_ref().map_or(0, |a| a.written.len());
        match self.plan_position(key, next) {
            Some(i) => WrittenKey::Planned(i),
            None => WrittenKey::Other(Box::new(key.clone())),
        }
    }

    /// Where the plan lists `key`, if it does: position `next` looked at first (items are written
    /// in plan order, so the next write is usually the next item).
    fn plan_position(&self, key: &ItemKey, next: usize) -> Option<u32> {
        let items = &self.plan.as_ref()?.items;
        if items.get(next) == Some(key) {
            return Some(next as u32);
        }
        items.iter().position(|k| k == key).map(|i| i as u32)
    }
}

/// A block as [`Blocks`] holds one that keeps nothing but counts: no plan kept (no hooks), no
/// attempt (not started, or finished without a hook run or an item failed), an outcome that is
/// not `Failed` (whose reason is a string). 12 bytes, where a [`BlockState`] is 48: most blocks
/// of a large backup are such blocks from their plan to the end of the run (~30 MB at a million
/// blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlimBlock {
    items: u32,
    written_done: u32,
    attempts: u16,
    /// [`SLIM_NONE`], [`SLIM_COMPLETED`], [`SLIM_PARTIAL`], or [`FULL`]: the block is in
    /// [`Blocks::full`].
    outcome: u8,
}

const SLIM_NONE: u8 = 0;
const SLIM_COMPLETED: u8 = 1;
const SLIM_PARTIAL: u8 = 2;
const FULL: u8 = u8::MAX;

impl SlimBlock {
    /// `b` in 12 bytes, if it keeps nothing but counts.
    fn of(b: &BlockState) -> Option<SlimBlock> {
        let outcome = match &b.outcome {
            None => SLIM_NONE,
            Some(BlockOutcome::Completed) => SLIM_COMPLETED,
            Some(BlockOutcome::PartiallyFailed) => SLIM_PARTIAL,
            Some(BlockOutcome::Failed { .. }) => return None,
        };
        let attempts = u16::try_from(b.attempts).ok()?;
        (b.plan.is_none() && b.attempt.is_none()).then_some(SlimBlock {
            items: b.items,
            written_done: b.written_done,
            attempts,
            outcome,
        })
    }

    fn state(self) -> BlockState {
        BlockState {
            plan: None,
            items: self.items,
            attempt: None,
            attempts: u32::from(self.attempts),
            outcome: match self.outcome {
                SLIM_COMPLETED => Some(BlockOutcome::Completed),
                SLIM_PARTIAL => Some(BlockOutcome::PartiallyFailed),
                _ => None,
            },
            written_done: self.written_done,
        }
    }
}

/// The planned blocks' states, by id: a block that keeps nothing but counts in 12 bytes
/// ([`SlimBlock`]), any other — one with hooks, an open attempt, a failed item or hook, a
/// `Failed` outcome — as a [`BlockState`] beside. [`Blocks::get`] gives either as a `BlockState`.
#[derive(Debug, Clone, Default)]
pub struct Blocks {
    slim: Vec<SlimBlock>,
    full: BTreeMap<u32, BlockState>,
}

impl PartialEq for Blocks {
    /// The same states, however each is held.
    fn eq(&self, other: &Blocks) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl Blocks {
    /// Planned blocks.
    pub fn len(&self) -> usize {
        self.slim.len()
    }

    /// None planned.
    pub fn is_empty(&self) -> bool {
        self.slim.is_empty()
    }

    /// Block `id`'s state: borrowed when held in full, made when slim (no allocation).
    pub fn get(&self, id: usize) -> Option<std::borrow::Cow<'_, BlockState>> {
        let slim = *self.slim.get(id)?;
        match slim.outcome {
            FULL => self.full.get(&(id as u32)).map(std::borrow::Cow::Borrowed),
            _ => Some(std::borrow::Cow::Owned(slim.state())),
        }
    }

    /// Whether block `id` has finished (read without making its state).
    pub fn finished(&self, id: usize) -> bool {
        match self.slim.get(id).map(|s| s.outcome) {
            Some(FULL) => self.full(id).is_some_and(|b| b.outcome.is_some()),
            Some(outcome) => outcome != SLIM_NONE,
            None => false,
        }
    }

    /// Whether block `id` finished `Failed` (only a block held in full can have).
    pub fn failed(&self, id: usize) -> bool {
        self.full(id).is_some_and(|b| matches!(b.outcome, Some(BlockOutcome::Failed { .. })))
    }

    /// Block `id`'s state if it is held in full (only such a block keeps a plan or an attempt).
    pub fn full(&self, id: usize) -> Option<&BlockState> {
        self.full.get(&u32::try_from(id).ok()?)
    }

    /// The blocks held in full, in id order: the only ones with a kept plan, an attempt, or a
    /// `Failed` outcome.
    pub fn held(&self) -> impl Iterator<Item = (u32, &BlockState)> + '_ {
        self.full.iter().map(|(&id, b)| (id, b))
    }

    /// Every block's state, in id order.
    pub fn iter(&self) -> impl Iterator<Item = std::borrow::Cow<'_, BlockState>> + '_ {
        (0..self.slim.len()).filter_map(|id| self.get(id))
    }

    /// Makes room for `n` more blocks.
    fn reserve_exact(&mut self, n: usize) {
        self.slim.reserve_exact(n);
    }

    /// Appends a block's state (its id is the number of blocks before it).
    fn push(&mut self, b: BlockState) {
        match SlimBlock::of(&b) {
            Some(slim) => self.slim.push(slim),
            None => {
                self.full.insert(self.slim.len() as u32, b);
                self.slim.push(SlimBlock { items: 0, written_done: 0, attempts: 0, outcome: FULL });
            }
        }
    }

    /// Block `id`'s state to change, held in full from now on (until [`Blocks::settle`]).
    fn get_mut(&mut self, id: usize) -> Option<&mut BlockState> {
        let slim = self.slim.get_mut(id)?;
        if slim.outcome != FULL {
            let state = slim.state();
            slim.outcome = FULL;
            self.full.insert(id as u32, state);
        }
        self.full.get_mut(&(id as u32))
    }

    /// Holds block `id` slim again if it now keeps nothing but counts.
    fn settle(&mut self, id: usize) {
        let Some(b) = self.full(id) else { return };
        if let (Some(slim), Some(place)) = (SlimBlock::of(b), self.slim.get_mut(id)) {
            *place = slim;
            self.full.remove(&(id as u32));
        }
    }
}

/// A captured snapshot: every member's handle is set ([`BackupState::snapshot_cut`], read back
/// from the state's packed details).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// One per claim.
    pub members: Vec<CutMember>,
    /// The group snapshot's handle, for a volume group.
    pub group_handle: Option<String>,
    /// When the cut was observed.
    pub at_ms: u64,
}

/// What the fold keeps in the open of a cut: its members' names, handles and times are packed in
/// the state's details ([`BackupState::snapshot_cut`] reads them back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutHead {
    /// How many members (claims) it captured.
    pub members: u32,
    /// When the cut was observed.
    pub at_ms: u64,
    /// The first member's VolumeSnapshot among the objects the log carries (each member's two
    /// objects follow on).
    first: BodyId,
    /// Where its packed members are in the details.
    at: u64,
}

/// What the fold keeps in the open of a planned snapshot: its names, claims, class and labels
/// are packed in the state's details ([`BackupState::snapshot_plan`] reads the whole plan back).
/// A plan was ~700 bytes in memory (its labels half of it), ~40 MB at a million objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanHead {
    /// Position in the backup's snapshot plan.
    pub id: u32,
    /// The block whose hook window brackets it.
    pub block: u32,
    /// How many claims it captures.
    pub claims: u32,
    /// One VolumeGroupSnapshot captures its claims.
    pub group: bool,
    /// Why the snapshot cannot be taken (its claims then fail), if it cannot.
    pub blocked: Option<String>,
    /// Where the packed plan is in the details.
    at: u64,
}

/// What a cut keeps, packed.
#[derive(serde::Serialize, serde::Deserialize)]
struct PackedCut {
    members: Vec<PackedMember>,
    group_handle: Option<String>,
}

/// What a cut member keeps, packed: a [`CutMember`] without its objects' numbers.
#[derive(serde::Serialize, serde::Deserialize)]
struct PackedMember {
    claim: String,
    snapshot: String,
    content: String,
    handle: String,
    driver: String,
    restore_size: Option<u64>,
    creation_time: Option<String>,
}

fn pack_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// `value` packed (bincode) as the state packs a snapshot's details.
pub(crate) fn pack<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, pack_config())
}

/// A value [`pack`] packed, read from the start of `bytes` (none when they are not one).
pub(crate) fn unpack<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(bytes, pack_config()).ok().map(|(v, _)| v)
}

/// The planned snapshots' plans and cuts, packed (bincode) in an arena of chunks: read back whole
/// when a snapshot is cut, waited for, released, written or reported — a few at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotDetails {
    arena: crate::catalog::Arena,
}

impl SnapshotDetails {
    fn pack<T: serde::Serialize>(&mut self, what: &str, value: &T) -> Result<u64, String> {
        let bytes = pack(value).map_err(|e| format!("packing {what}: {e}"))?;
        self.arena.append(&[&bytes]).map_err(|e| format!("packing {what}: {e}"))
    }

    fn unpack<T: serde::de::DeserializeOwned>(&self, at: u64) -> Option<T> {
        unpack(self.arena.at(at))
    }
}

/// A cut member as the state holds it: what its `SnapshotCut` record says of it, with its archived
/// VolumeSnapshot and VolumeSnapshotContent by number among the objects the log carries
/// ([`Event::bodies`]) — read back when written, not held (~100 MB of JSON at a million objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutMember {
    /// The claim.
    pub claim: String,
    /// The VolumeSnapshot.
    pub snapshot: String,
    /// The VolumeSnapshotContent.
    pub content: String,
    /// `status.snapshotHandle` of the content.
    pub handle: String,
    /// The CSI driver.
    pub driver: String,
    /// Restore size in bytes, when reported.
    pub restore_size: Option<u64>,
    /// `status.creationTime` of the snapshot (RFC 3339), when reported.
    pub creation_time: Option<String>,
    /// The VolumeSnapshot as archived: the logged object with this number.
    pub snapshot_body: BodyId,
    /// The VolumeSnapshotContent as archived: the logged object with this number.
    pub content_body: BodyId,
}

impl CutMember {
    /// A packed member, its two objects numbered from `first`.
    fn of(m: PackedMember, first: BodyId) -> CutMember {
        CutMember {
            claim: m.claim,
            snapshot: m.snapshot,
            content: m.content,
            handle: m.handle,
            driver: m.driver,
            restore_size: m.restore_size,
            creation_time: m.creation_time,
            snapshot_body: first,
            content_body: first + 1,
        }
    }

    /// The archive keys of the VolumeSnapshot and the VolumeSnapshotContent.
    pub fn keys(&self, namespace: &str) -> (ItemKey, ItemKey) {
        crate::snapshot::member_keys(namespace, &self.snapshot, &self.content)
    }
}

/// How a snapshot's cluster objects were released at the end of the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The storage snapshot was retained for the backup (else deleted).
    pub kept: bool,
    /// Releasing failed: objects may be left in the cluster.
    pub error: Option<String>,
}

/// A storage snapshot a backup holds: deleting the backup deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedSnapshot {
    /// The claims' namespace.
    pub namespace: String,
    /// The VolumeSnapshot that cut it (gone once released).
    pub snapshot: String,
    /// Its VolumeSnapshotContent (gone once released).
    pub content: String,
    /// The CSI driver.
    pub driver: String,
    /// The storage snapshot's handle.
    pub handle: String,
}

/// A planned snapshot and its history: what is read of every snapshot as the backup goes, the
/// rest packed ([`BackupState::snapshot_plan`], [`BackupState::snapshot_cut`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotState {
    /// The plan's head.
    pub plan: PlanHead,
    /// The attempt of its block that requested it (the latest request).
    pub requested: Option<u32>,
    /// When it was requested.
    pub requested_ms: u64,
    /// The cut's head, once observed.
    pub cut: Option<CutHead>,
    /// Why it could not be cut.
    pub failed: Option<String>,
    /// Ready to use (`Ok(at_ms)`), or why not within the item-operation timeout.
    pub ready: Option<Result<u64, String>>,
    /// Its cluster objects are gone.
    pub released: Option<Released>,
}

impl SnapshotState {
    /// Cut, failed, or never to be taken: no cut is pending.
    pub fn settled(&self) -> bool {
        self.cut.is_some() || self.failed.is_some() || self.plan.blocked.is_some()
    }

    /// Why the claims of this snapshot are not backed up, if they are not (blocked or failed).
    pub fn failure(&self) -> Option<&str> {
        self.plan.blocked.as_deref().or(self.failed.as_deref())
    }
}

/// Summary of the finished archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// sha256 of the `.tar.gz`.
    pub digest: [u8; 32],
    /// Its size.
    pub bytes: u64,
    /// Items in it.
    pub items: u64,
}

/// What each inspected PersistentVolume is, as the fold keeps it. A CSI volume is its name and its
/// driver's number, in a vector sorted by name (~70 bytes a volume where a map of [`PvVolume`]s
/// was ~200: ~13 MB of planning's peak at a million objects); its handle is recorded for people
/// and read by no one. The others (not CSI, missing, unreadable: why a claim has no snapshot) are
/// kept as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Volumes {
    csi: Vec<(Box<str>, u32)>,
    drivers: Vec<String>,
    others: BTreeMap<String, PvVolume>,
}

impl Volumes {
    /// Records what volume `name` is (again: the later word wins).
    pub fn insert(&mut self, name: &str, v: &PvVolume) {
        let at = match self.csi.last() {
            // Inspections record their volumes sorted: appended, without a search.
            Some((last, _)) if **last < *name => Err(self.csi.len()),
            None => Err(0),
            _ => self.csi.binary_search_by(|(n, _)| (**n).cmp(name)),
        };
        if let Ok(i) = at {
            self.csi.remove(i);
        }
        self.others.remove(name);
        match v {
            PvVolume::Csi { driver, .. } => {
                let d = match self.drivers.iter().position(|x| x == driver) {
                    Some(d) => d,
                    None => {
                        self.drivers.push(driver.clone());
                        self.drivers.len() - 1
                    }
                };
                let i = at.unwrap_or_else(|i| i);
                self.csi.insert(i, (name.into(), d as u32));
            }
            other => {
                self.others.insert(name.to_string(), other.clone());
            }
        }
    }

    /// What volume `name` is (a CSI volume without its handle), if it was inspected.
    pub fn get(&self, name: &str) -> Option<PvVolume> {
        if let Some(v) = self.others.get(name) {
            return Some(v.clone());
        }
        let i = self.csi.binary_search_by(|(n, _)| (**n).cmp(name)).ok()?;
        let driver = self.drivers.get(self.csi[i].1 as usize).cloned().unwrap_or_default();
        Some(PvVolume::Csi { driver, handle: String::new() })
    }

    /// Forgets the CSI volumes (read by snapshot planning only).
    pub fn drop_csi(&mut self) {
        self.csi = Vec::new();
    }

    /// How many volumes.
    pub fn len(&self) -> usize {
        self.csi.len() + self.others.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<(String, PvVolume)> for Volumes {
    fn from_iter<I: IntoIterator<Item = (String, PvVolume)>>(iter: I) -> Volumes {
        let mut out = Volumes::default();
        for (name, v) in iter {
            out.insert(&name, &v);
        }
        out
    }
}

/// Everything known about one backup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackupState {
    /// The spec, once requested.
    pub spec: Option<BackupSpec>,
    /// The backup's options (those of a backup recorded before options existed: no snapshots).
    pub options: BackupOptions,
    /// What each claim's PersistentVolume is (snapshot planning); once the plan is finished, only
    /// the volumes that are not CSI volumes (what the volume information file reads).
    pub volumes: Volumes,
    /// The cluster's VolumeSnapshotClasses, canonical JSON.
    pub snapshot_classes: Vec<String>,
    /// The cluster's VolumeGroupSnapshotClasses, canonical JSON.
    pub group_classes: Vec<String>,
    /// The volume inspection is complete.
    pub volumes_inspected: bool,
    /// Planned snapshots, by id.
    pub snapshots: Vec<SnapshotState>,
    /// Their plans and cuts, packed.
    details: SnapshotDetails,
    /// Workers asked for at creation.
    pub workers: u32,
    /// Request time.
    pub requested_ms: u64,
    /// Discovery result.
    pub resources: Option<Vec<ResourceType>>,
    /// Listing progress per unit.
    pub listings: BTreeMap<ListUnit, Listing>,
    /// Pull targets fetched by key: the object, or `None` when not found.
    pub fetched: BTreeMap<ItemKey, Option<Body>>,
    /// Objects the log carried so far: the next object's [`crate::body::BodyId`].
    pub bodies: u64,
    /// Pull targets whose get failed, with the error.
    pub fetch_failed: BTreeMap<ItemKey, String>,
    /// Planned blocks, by id.
    pub blocks: Blocks,
    /// Planning is over.
    pub plan_finished: bool,
    /// Items in the plan.
    pub planned_items: u64,
    /// Warnings (do not change the phase).
    pub warnings: Vec<String>,
    /// Errors (make the backup PartiallyFailed).
    pub errors: Vec<String>,
    /// The archive, once built.
    pub archive: Option<ArchiveInfo>,
    /// Terminal phase and time.
    pub finished: Option<(Phase, u64)>,
    /// The run stopped (store failure) and waits for `resume`: why.
    pub stopped: Option<String>,
    /// Events applied.
    pub events: u64,
    /// Time of the latest timestamped event.
    pub last_ms: u64,
    /// Messages already recorded: a diagnostic repeated after a crash is recorded once.
    seen: BTreeSet<String>,
    /// Blocks with an outcome.
    finished_blocks: usize,
    /// Items written by blocks with an outcome.
    finished_items: u64,
}

impl BackupState {
    /// The storage snapshots this backup holds: every member of every cut snapshot, unless its
    /// release deleted them (a discarded snapshot). A snapshot never released — the backup was
    /// stopped, or releasing failed — is held too: its objects may still be in the cluster.
    pub fn retained_snapshots(&self) -> Vec<RetainedSnapshot> {
        let held = |s: &&SnapshotState| s.released.as_ref().is_none_or(|r| r.kept || r.error.is_some());
        (self.snapshots.iter().filter(held))
            .filter(|s| s.cut.is_some())
            .filter_map(|s| Some((self.snapshot_plan(s.plan.id)?, self.snapshot_cut(s.plan.id)?)))
            .flat_map(|(plan, cut)| {
                cut.members.into_iter().map(move |m| RetainedSnapshot {
                    namespace: plan.namespace.clone(),
                    snapshot: m.snapshot,
                    content: m.content,
                    driver: m.driver,
                    handle: m.handle,
                })
            })
            .collect()
    }

    /// The whole plan of snapshot `id`, read back from the state's packed details.
    pub fn snapshot_plan(&self, id: u32) -> Option<SnapshotPlan> {
        let head = &self.snapshots.get(id as usize)?.plan;
        self.details.unpack(head.at)
    }

    /// The cut of snapshot `id`, once observed, read back from the state's packed details.
    pub fn snapshot_cut(&self, id: u32) -> Option<Cut> {
        let head = self.snapshots.get(id as usize)?.cut.as_ref()?;
        let packed: PackedCut = self.details.unpack(head.at)?;
        let members =
            (packed.members.into_iter().zip(0u64..)).map(|(m, i)| CutMember::of(m, head.first + 2 * i)).collect();
        Some(Cut { members, group_handle: packed.group_handle, at_ms: head.at_ms })
    }

    /// The items the open attempt of `b` (one of this state's blocks, not finished) has written, by
    /// key: key → (digest, bytes), an item written twice once, as its latest write. A finished
    /// block's items are not held: the log has them ([`crate::entries`]).
    pub fn written<'a>(&'a self, b: &'a BlockState) -> impl Iterator<Item = (&'a ItemKey, &'a ([u8; 32], u64))> + 'a {
        let open = b.attempt.as_ref().filter(|_| b.outcome.is_none()).map(|a| a.written.iter());
        open.into_iter().flatten().filter_map(|(k, v)| Some((b.key_of(k)?, v)))
    }

    /// How many items the latest attempt of `b` wrote.
    pub fn written_count(&self, b: &BlockState) -> usize {
        match (&b.outcome, &b.attempt) {
            (Some(_), _) => b.written_done as usize,
            (None, Some(a)) => a.written.len(),
            (None, None) => 0,
        }
    }

    /// Folds a whole log.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> Result<BackupState, FoldError> {
        let mut s = BackupState::default();
        for e in events {
            s.apply(e)?;
        }
        Ok(s)
    }
}

/// [`BackupState::fold`] fed one event at a time, for a log read record by record (no `Vec` of
/// its events): the first event that does not fold is the error, and what follows it is ignored.
#[derive(Default)]
pub struct Folding {
    state: BackupState,
    failed: Option<FoldError>,
}

impl Folding {
    /// Folds the log's next event.
    pub fn push(&mut self, e: &Event) {
        if self.failed.is_none() {
            self.failed = self.state.apply(e).err();
        }
    }

    /// The state folded, or the first event that did not fold.
    pub fn finish(self) -> Result<BackupState, FoldError> {
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.state),
        }
    }
}

impl BackupState {
    /// The phase as of now: a stopped run is Failed until `resume` continues it.
    pub fn phase(&self) -> Phase {
        phase_of(self.finished, self.stopped.is_some())
    }

    /// Every block is done and the backup waits for its snapshots to be ready to use (or for
    /// their cluster objects to be released) before the archive is built.
    pub fn waiting_for_snapshots(&self) -> bool {
        self.finished.is_none()
            && self.stopped.is_none()
            && self.plan_finished
            && self.all_blocks_finished()
            && self.snapshots.iter().any(|s| s.requested.is_some() && s.released.is_none())
    }

    /// The phase as shown to people: Velero's phase, or `WaitingForSnapshots` while an InProgress
    /// backup waits for its snapshots.
    pub fn phase_name(&self) -> String {
        phase_name(self.phase(), self.waiting_for_snapshots())
    }

    /// Whether `resume` can continue the backup: interrupted (InProgress) or stopped.
    pub fn resumable(&self) -> bool {
        self.finished.is_none()
    }

    /// Makes room for `blocks` planned blocks in all, before their `BlockPlanned` events are
    /// applied: the blocks' vector is then exactly as long as the plan (grown one chunk at a time,
    /// it doubled past it — ~50 MB of spare places at a million blocks). Changes nothing else.
    pub fn reserve_blocks(&mut self, blocks: usize) {
        self.blocks.reserve_exact(blocks.saturating_sub(self.blocks.len()));
    }

    /// Makes room for `snapshots` planned snapshots in all, before they are recorded (the plan's
    /// snapshots pushed one by one grew the vector by doubling: up to twice the ~180 bytes a
    /// snapshot, ~11 MB more at a million objects, from the plan to the end).
    pub fn reserve_snapshots(&mut self, snapshots: usize) {
        self.snapshots.reserve_exact(snapshots.saturating_sub(self.snapshots.len()));
    }

    /// Every planned block has finished (the fold's counter against the plan: no block is read).
    pub fn all_blocks_finished(&self) -> bool {
        self.finished_blocks == self.blocks.len()
    }

    /// Blocks finished (a counter kept by the fold: progress reporting calls this per event).
    pub fn blocks_done(&self) -> usize {
        self.finished_blocks
    }

    /// Items written by finished blocks (a counter kept by the fold).
    pub fn items_done(&self) -> u64 {
        self.finished_items
    }

    /// The phase the backup ends in if nothing else goes wrong.
    pub fn terminal_phase(&self) -> Phase {
        let block_trouble = self.blocks.iter().any(|b| !matches!(b.outcome, Some(BlockOutcome::Completed) | None));
        if self.errors.is_empty() && !block_trouble {
            Phase::Completed
        } else {
            Phase::PartiallyFailed
        }
    }

    /// The snapshots of block `id`.
    pub fn snapshots_of(&self, id: u32) -> impl Iterator<Item = &SnapshotState> + '_ {
        // Snapshots are planned block after block (the fold refuses others): a block's are a run.
        let from = self.snapshots.partition_point(|s| s.plan.block < id);
        self.snapshots[from..].iter().take_while(move |s| s.plan.block == id)
    }

    fn snapshot_mut(&mut self, seq: Seq, kind: &'static str, id: u32) -> Result<&mut SnapshotState, FoldError> {
        let n = self.snapshots.len();
        self.snapshots.get_mut(id as usize).ok_or_else(|| FoldError {
            seq,
            kind,
            reason: format!("snapshot {id} was not planned ({n} snapshots)"),
        })
    }

    fn block_mut(&mut self, seq: Seq, kind: &'static str, id: u32) -> Result<&mut BlockState, FoldError> {
        let n = self.blocks.len();
        self.blocks.get_mut(id as usize).ok_or_else(|| FoldError {
            seq,
            kind,
            reason: format!("block {id} was not planned ({n} blocks)"),
        })
    }

    fn attempt_mut(&mut self, seq: Seq, kind: &'static str, id: u32, attempt: u32) -> Result<&mut Attempt, FoldError> {
        let b = self.block_mut(seq, kind, id)?;
        if b.outcome.is_some() {
            return Err(FoldError { seq, kind, reason: format!("block {id} already finished") });
        }
        match b.attempt.as_mut() {
            Some(a) if a.number == attempt => Ok(a),
            other => {
                let have = other.map(|a| a.number);
                Err(FoldError {
                    seq,
                    kind,
                    reason: format!("block {id} attempt {attempt} is not the latest ({have:?})"),
                })
            }
        }
    }

    fn request(
        &mut self,
        seq: Seq,
        kind: &'static str,
        spec: &BackupSpec,
        options: BackupOptions,
        workers: u32,
        at_ms: u64,
    ) -> Result<(), FoldError> {
        if self.spec.is_some() {
            return Err(FoldError { seq, kind, reason: "backup requested twice".into() });
        }
        self.spec = Some(spec.clone());
        self.options = options;
        self.workers = workers;
        self.requested_ms = at_ms;
        self.last_ms = at_ms;
        Ok(())
    }

    /// Applies one event.
    pub fn apply(&mut self, e: &Event) -> Result<(), FoldError> {
        let seq = self.events;
        let kind = e.kind();
        if self.spec.is_none() && !matches!(e, Event::BackupRequested { .. } | Event::BackupRequestedWithOptions { .. })
        {
            return Err(FoldError { seq, kind, reason: "the log does not start with BackupRequested".into() });
        }
        if self.finished.is_some() {
            return Err(FoldError { seq, kind, reason: "the backup already finished".into() });
        }
        if self.stopped.is_some() && !matches!(e, Event::RunResumed { .. }) {
            return Err(FoldError { seq, kind, reason: "the run stopped; only RunResumed may follow".into() });
        }
        match e {
            Event::BackupRequested { spec, workers, at_ms } => {
                self.request(seq, kind, spec, BackupOptions::legacy(), *workers, *at_ms)?;
            }
            Event::BackupRequestedWithOptions { spec, options, workers, at_ms } => {
                self.request(seq, kind, spec, options.clone(), *workers, *at_ms)?;
            }
            Event::VolumesInspected { volumes, classes, group_classes, complete } => {
                if self.volumes_inspected {
                    return Err(FoldError { seq, kind, reason: "the volumes were inspected already".into() });
                }
                for (name, v) in volumes {
                    self.volumes.insert(name, v);
                }
                self.snapshot_classes.extend(classes.iter().cloned());
                self.group_classes.extend(group_classes.iter().cloned());
                self.volumes_inspected = *complete;
            }
            Event::SnapshotsPlanned { snapshots } => {
                if self.plan_finished {
                    return Err(FoldError { seq, kind, reason: "snapshots planned after the plan finished".into() });
                }
                for p in snapshots {
                    let behind = self.snapshots.last().is_some_and(|l| p.block < l.plan.block);
                    if p.id as usize != self.snapshots.len() || p.block as usize >= self.blocks.len() || behind {
                        return Err(FoldError {
                            seq,
                            kind,
                            reason: format!("snapshot {} of block {} planned out of order", p.id, p.block),
                        });
                    }
                    let at =
                        self.details.pack("a snapshot plan", &**p).map_err(|reason| FoldError { seq, kind, reason })?;
                    let plan = PlanHead {
                        id: p.id,
                        block: p.block,
                        claims: u32::try_from(p.claims.len()).unwrap_or(u32::MAX),
                        group: p.group.is_some(),
                        blocked: p.blocked.clone(),
                        at,
                    };
                    self.snapshots.push(SnapshotState {
                        plan,
                        requested: None,
                        requested_ms: 0,
                        cut: None,
                        failed: None,
                        ready: None,
                        released: None,
                    });
                }
            }
            Event::SnapshotRequested { id, attempt, at_ms } => {
                self.last_ms = *at_ms;
                let block = self.snapshot_mut(seq, kind, *id)?.plan.block;
                self.attempt_mut(seq, kind, block, *attempt)?;
                let s = self.snapshot_mut(seq, kind, *id)?;
                if s.settled() {
                    return Err(FoldError { seq, kind, reason: format!("snapshot {id} is settled already") });
                }
                s.requested = Some(*attempt);
                s.requested_ms = *at_ms;
            }
            Event::SnapshotCut { id, members, group_handle, at_ms } => {
                self.last_ms = *at_ms;
                let s = self.snapshot_mut(seq, kind, *id)?;
                if s.requested.is_none() || s.settled() {
                    return Err(FoldError { seq, kind, reason: format!("snapshot {id} is not waiting for its cut") });
                }
                // The members' two objects each are numbered as `Event::bodies` gives them.
                let first = self.bodies;
                let packed = PackedCut {
                    members: (members.iter())
                        .map(|m| PackedMember {
                            claim: m.claim.clone(),
                            snapshot: m.snapshot.clone(),
                            content: m.content.clone(),
                            handle: m.handle.clone(),
                            driver: m.driver.clone(),
                            restore_size: m.restore_size,
                            creation_time: m.creation_time.clone(),
                        })
                        .collect(),
                    group_handle: group_handle.clone(),
                };
                let at =
                    self.details.pack("a snapshot's cut", &packed).map_err(|reason| FoldError { seq, kind, reason })?;
                self.bodies += 2 * members.len() as u64;
                let members = u32::try_from(members.len()).unwrap_or(u32::MAX);
                let s = self.snapshot_mut(seq, kind, *id)?;
                s.cut = Some(CutHead { members, at_ms: *at_ms, first, at });
            }
            Event::SnapshotFailed { id, error, at_ms } => {
                self.last_ms = *at_ms;
                let s = self.snapshot_mut(seq, kind, *id)?;
                if s.requested.is_none() || s.settled() {
                    return Err(FoldError { seq, kind, reason: format!("snapshot {id} is not waiting for its cut") });
                }
                s.failed = Some(error.clone());
            }
            Event::SnapshotReady { id, error, at_ms } => {
                self.last_ms = *at_ms;
                let s = self.snapshot_mut(seq, kind, *id)?;
                if s.cut.is_none() || s.ready.is_some() {
                    return Err(FoldError { seq, kind, reason: format!("snapshot {id} is not waiting to be ready") });
                }
                s.ready = Some(match error {
                    None => Ok(*at_ms),
                    Some(e) => Err(e.clone()),
                });
            }
            Event::SnapshotReleased { id, kept, error, at_ms } => {
                self.last_ms = *at_ms;
                let s = self.snapshot_mut(seq, kind, *id)?;
                if s.requested.is_none() || s.released.is_some() {
                    return Err(FoldError {
                        seq,
                        kind,
                        reason: format!("snapshot {id} is not waiting to be released"),
                    });
                }
                s.released = Some(Released { kept: *kept, error: error.clone() });
            }
            Event::ResourcesDiscovered { resources } => self.resources = Some(resources.clone()),
            Event::ResourceListed { unit, chunk, objects, complete } => {
                let l = self.listings.entry(unit.clone()).or_default();
                if *chunk == 0 {
                    *l = Listing::default();
                } else if *chunk != l.chunks {
                    return Err(FoldError {
                        seq,
                        kind,
                        reason: format!("{unit}: chunk {chunk} after {} chunks", l.chunks),
                    });
                }
                l.received += objects.len() as u64;
                self.bodies += objects.len() as u64;
                l.chunks = chunk + 1;
                l.complete = *complete;
            }
            Event::ListFailed { unit, error } => {
                let l = self.listings.entry(unit.clone()).or_default();
                *l = Listing { complete: true, failed: Some(error.clone()), ..Listing::default() };
            }
            Event::ItemsFetched { items } => {
                for (k, v) in items {
                    let body = v.as_ref().map(|_| {
                        self.bodies += 1;
                        Body::Logged(self.bodies - 1)
                    });
                    self.fetched.insert(k.clone(), body);
                }
            }
            Event::Diagnostic { .. } => {}
            Event::BlockPlanned { blocks } => {
                for b in blocks {
                    if b.id as usize != self.blocks.len() {
                        return Err(FoldError { seq, kind, reason: format!("block {} planned out of order", b.id) });
                    }
                    self.blocks.push(BlockState {
                        plan: (!b.hooks.is_empty()).then(|| b.clone()),
                        items: u32::try_from(b.items.len()).unwrap_or(u32::MAX),
                        attempt: None,
                        attempts: 0,
                        outcome: None,
                        written_done: 0,
                    });
                }
            }
            Event::PlanFinished { blocks, items } => {
                if *blocks as usize != self.blocks.len() {
                    return Err(FoldError {
                        seq,
                        kind,
                        reason: format!("{blocks} blocks announced, {} planned", self.blocks.len()),
                    });
                }
                self.plan_finished = true;
                self.planned_items = *items;
                // Snapshot planning read the CSI volumes; past the plan only what is not a CSI
                // volume is read (why a claim has no snapshot): ~300 bytes a claim's volume.
                self.volumes.drop_csi();
            }
            Event::BlockStarted { block, attempt, at_ms } => {
                self.last_ms = *at_ms;
                let b = self.block_mut(seq, kind, *block)?;
                let prev = b.attempts;
                if b.outcome.is_some() || *attempt != prev + 1 {
                    return Err(FoldError {
                        seq,
                        kind,
                        reason: format!("block {block}: attempt {attempt} after {prev}"),
                    });
                }
                b.attempt = Some(Box::new(Attempt { number: *attempt, started_ms: *at_ms, ..Attempt::default() }));
                b.attempts = *attempt;
            }
            Event::HookStarted { block, attempt, hook, at_ms } => {
                self.last_ms = *at_ms;
                self.attempt_mut(seq, kind, *block, *attempt)?.hooks_started.insert(hook.clone(), ());
            }
            Event::HookFinished { block, attempt, hook, outcome, at_ms } => {
                self.last_ms = *at_ms;
                self.attempt_mut(seq, kind, *block, *attempt)?.hooks_finished.insert(hook.clone(), outcome.clone());
            }
            Event::ItemWritten { block, attempt, key, digest, bytes } => {
                let k = self.block_mut(seq, kind, *block)?.written_key(key);
                self.attempt_mut(seq, kind, *block, *attempt)?.written.insert(k, (*digest, *bytes));
            }
            Event::ItemFailed { block, attempt, key, error } => {
                self.attempt_mut(seq, kind, *block, *attempt)?.failed_items.insert(key.clone(), error.clone());
            }
            Event::BlockFinished { block, attempt, outcome, at_ms } => {
                self.last_ms = *at_ms;
                self.attempt_mut(seq, kind, *block, *attempt)?;
                let b = self.block_mut(seq, kind, *block)?;
                b.outcome = Some(outcome.clone());
                // Of the written items the count stays (the log has the items); the attempt stays
                // only for its hooks or failed items (what `describe` and the controller's status
                // read of it).
                let len = b.attempt.as_mut().map_or(0, |a| std::mem::take(&mut a.written).len() as u32);
                b.written_done = len;
                if b.attempt.as_ref().is_some_and(|a| a.plain()) {
                    b.attempt = None;
                }
                self.blocks.settle(*block as usize);
                self.finished_blocks += 1;
                self.finished_items += u64::from(len);
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
                if self.stopped.take().is_none() {
                    return Err(FoldError { seq, kind, reason: "the run did not stop".into() });
                }
                self.last_ms = *at_ms;
            }
            Event::FetchFailed { key, error } => {
                self.fetch_failed.insert(key.clone(), error.clone());
            }
        }
        // What the event records for people, once its facts are folded (the summary's fold
        // records the same: `summary::event_message`).
        // A message names a snapshot only when it records a failure: its plan is read back then.
        let failed = match e {
            Event::SnapshotFailed { id, .. }
            | Event::SnapshotReady { id, error: Some(_), .. }
            | Event::SnapshotReleased { id, error: Some(_), .. } => self.snapshot_plan(*id),
            _ => None,
        };
        let names = |id: u32| failed.as_ref().filter(|p| p.id == id).map(SnapshotNames::of);
        if let Some((severity, message)) = event_message(e, names) {
            record_once(&mut self.seen, (&mut self.warnings, &mut self.errors), severity, message);
        }
        self.events += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::Hook;

    /// The fold's volumes read back what was inspected, whatever the order, the later word on a
    /// volume winning; a CSI volume without its handle; after the plan only the others.
    #[test]
    fn volumes_read_back_as_inspected() {
        let csi = |d: &str| PvVolume::Csi { driver: d.into(), handle: "h".into() };
        let bare = |d: &str| PvVolume::Csi { driver: d.into(), handle: String::new() };
        let mut v: Volumes =
            [("pv-b", csi("d1")), ("pv-d", csi("d2")), ("pv-a", csi("d1")), ("pv-c", PvVolume::NotCsi)]
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect();
        assert_eq!(v.len(), 4);
        assert_eq!(
            (v.get("pv-a"), v.get("pv-b"), v.get("pv-d")),
            (Some(bare("d1")), Some(bare("d1")), Some(bare("d2")))
        );
        assert_eq!((v.get("pv-c"), v.get("pv-e")), (Some(PvVolume::NotCsi), None));
        v.insert("pv-b", &PvVolume::Missing);
        v.insert("pv-c", &csi("d3"));
        v.insert("pv-0", &csi("d2"));
        assert_eq!(
            (v.get("pv-b"), v.get("pv-c"), v.get("pv-0")),
            (Some(PvVolume::Missing), Some(bare("d3")), Some(bare("d2")))
        );
        assert_eq!((v.get("pv-a"), v.get("pv-d"), v.len()), (Some(bare("d1")), Some(bare("d2")), 5));
        v.drop_csi();
        assert_eq!((v.get("pv-a"), v.get("pv-b"), v.len()), (None, Some(PvVolume::Missing), 1));
    }

    /// Every block that keeps only counts is held in 12 bytes, the others in 48: at a million
    /// blocks each 8 bytes is ~8 MB of the run.
    #[test]
    fn a_block_state_is_48_bytes_and_a_slim_one_12() {
        assert_eq!(std::mem::size_of::<BlockState>(), 48);
        assert_eq!(std::mem::size_of::<Option<BlockOutcome>>(), 16);
        assert_eq!(std::mem::size_of::<SlimBlock>(), 12);
    }

    /// Whatever way a block is held, it reads back as the state it was given; only the blocks
    /// that keep a plan, an attempt, a `Failed` outcome or more attempts than 16 bits count are
    /// held in full, and one changed back to counts only is slim again once settled.
    #[test]
    fn blocks_read_back_as_given_and_only_rich_ones_are_held_in_full() {
        let plain = |items, attempts, outcome| BlockState {
            plan: None,
            items,
            attempt: None,
            attempts,
            outcome,
            written_done: items.saturating_sub(1),
        };
        let plan = Arc::new(BlockPlan {
            id: 4,
            items: vec![ItemKey::cluster("", "namespaces", "a")].into(),
            hooks: Box::new([]),
            bodies: Box::default(),
        });
        let states = vec![
            plain(1, 0, None),
            plain(3, 1, Some(BlockOutcome::Completed)),
            plain(2, 2, Some(BlockOutcome::PartiallyFailed)),
            plain(1, 1, Some(BlockOutcome::Failed { reason: Box::new("pre-hook".into()) })),
            BlockState { plan: Some(plan), ..plain(1, 0, None) },
            BlockState { attempt: Some(Box::new(Attempt { number: 1, ..Attempt::default() })), ..plain(5, 1, None) },
            plain(7, 70_000, Some(BlockOutcome::Completed)),
            plain(u32::MAX, u32::from(u16::MAX), Some(BlockOutcome::Completed)),
        ];
        let mut blocks = Blocks::default();
        for b in &states {
            blocks.push(b.clone());
        }
        assert_eq!(blocks.len(), states.len());
        for (i, b) in states.iter().enumerate() {
            assert_eq!(blocks.get(i).as_deref(), Some(b), "block {i}");
            assert_eq!(blocks.finished(i), b.outcome.is_some(), "block {i}");
            assert_eq!(blocks.failed(i), matches!(b.outcome, Some(BlockOutcome::Failed { .. })), "block {i}");
        }
        assert!(!blocks.finished(states.len()) && !blocks.failed(states.len()));
        assert_eq!(blocks.iter().map(|b| b.into_owned()).collect::<Vec<_>>(), states);
        assert_eq!(blocks.held().map(|(id, _)| id).collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert!(blocks.get(states.len()).is_none());
        // Changed through `get_mut`, a block is held in full until settled.
        let mut other = blocks.clone();
        if let Some(b) = other.get_mut(0) {
            b.attempts = 1;
            b.outcome = Some(BlockOutcome::Completed);
        }
        assert_eq!(other.held().map(|(id, _)| id).collect::<Vec<_>>(), [0, 3, 4, 5, 6]);
        assert_ne!(other, blocks);
        other.settle(0);
        other.settle(5);
        assert_eq!(other.held().map(|(id, _)| id).collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert_eq!(other.get(0).as_deref(), Some(&plain(1, 1, Some(BlockOutcome::Completed))));
        // Equal states held differently are equal.
        let mut promoted = blocks.clone();
        let _ = promoted.get_mut(1);
        assert_eq!(promoted, blocks);
    }

    /// A snapshot's plan and cut are held packed and read back as the events gave them: the
    /// plan whole (labels and all), the cut's members with their objects numbered as the log
    /// carries them (after the objects listed before the cut); the heads keep the counts.
    #[test]
    fn snapshot_plans_and_cuts_read_back_as_recorded() {
        use crate::snapshot::MemberCut;
        let key = ItemKey::namespaced("", "persistentvolumeclaims", "ns", "data");
        let plan = |id: u32, claims: &[&str], group: Option<&str>, blocked: Option<&str>| SnapshotPlan {
            id,
            block: 0,
            namespace: "ns".into(),
            name: format!("bk-{id}"),
            claims: claims.iter().map(|c| c.to_string()).collect(),
            group: group.map(str::to_string),
            driver: "csi.example.com".into(),
            class: "fast".into(),
            labels: crate::item::StrMap::from(BTreeMap::from([
                ("velero.io/backup-name".to_string(), "bk".to_string()),
                ("app".to_string(), format!("a{id}")),
            ])),
            blocked: blocked.map(str::to_string),
        };
        let plans = [
            plan(0, &["data"], None, None),
            plan(1, &["a", "b"], Some("g"), None),
            plan(2, &["c"], None, Some("no class")),
        ];
        let member = |claim: &str, n: u32| MemberCut {
            claim: claim.into(),
            snapshot: format!("vs-{claim}"),
            content: format!("vsc-{claim}"),
            handle: format!("h-{n}"),
            driver: "csi.example.com".into(),
            restore_size: Some(u64::from(n) << 30),
            creation_time: n.is_multiple_of(2).then(|| "2026-12-07T00:00:00Z".to_string()),
            snapshot_json: "{}".into(),
            content_json: "{}".into(),
        };
        let mut s = BackupState::default();
        let unit =
            ListUnit { resource: crate::item::GroupResource::new("", "persistentvolumeclaims"), namespace: None };
        let events = [
            Event::BackupRequested { spec: crate::spec::BackupSpec::new("bk"), workers: 1, at_ms: 1 },
            Event::ResourceListed {
                unit,
                chunk: 0,
                objects: vec!["{}".into(), "{}".into(), "{}".into()],
                complete: true,
            },
            Event::BlockPlanned {
                blocks: vec![Arc::new(BlockPlan {
                    id: 0,
                    items: vec![key].into(),
                    hooks: Box::new([]),
                    bodies: Box::default(),
                })],
            },
            Event::SnapshotsPlanned { snapshots: plans.iter().cloned().map(Arc::new).collect() },
            Event::BlockStarted { block: 0, attempt: 1, at_ms: 2 },
            Event::SnapshotRequested { id: 1, attempt: 1, at_ms: 2 },
            Event::SnapshotCut {
                id: 1,
                members: vec![member("a", 1), member("b", 2)],
                group_handle: Some("gh".into()),
                at_ms: 3,
            },
        ];
        for e in &events {
            s.apply(e).unwrap();
        }
        for p in &plans {
            assert_eq!(s.snapshot_plan(p.id).as_ref(), Some(p), "plan {}", p.id);
            let head = &s.snapshots[p.id as usize].plan;
            assert_eq!((head.id, head.block, head.claims as usize), (p.id, p.block, p.claims.len()));
            assert_eq!((head.group, head.blocked.as_deref()), (p.group.is_some(), p.blocked.as_deref()));
        }
        assert_eq!(s.snapshot_plan(3), None);
        assert_eq!(s.snapshot_cut(0), None, "not cut");
        let cut = s.snapshot_cut(1).unwrap();
        assert_eq!(
            (cut.group_handle.as_deref(), cut.at_ms, s.snapshots[1].cut.as_ref().map(|c| c.members)),
            (Some("gh"), 3, Some(2))
        );
        let want = [
            "a vs-a vsc-a h-1 Some(1073741824) None 3 4",
            "b vs-b vsc-b h-2 Some(2147483648) Some(\"2026-12-07T00:00:00Z\") 5 6",
        ];
        let got: Vec<String> = (cut.members.iter())
            .map(|m| {
                let (names, size, time) =
                    ([&m.claim, &m.snapshot, &m.content, &m.handle], m.restore_size, &m.creation_time);
                format!(
                    "{} {size:?} {time:?} {} {}",
                    names.map(|n| n.as_str()).join(" "),
                    m.snapshot_body,
                    m.content_body
                )
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(s.bodies, 7);
        assert!(std::mem::size_of::<SnapshotState>() <= 192, "{}", std::mem::size_of::<SnapshotState>());
    }

    /// A block's snapshots are the run of snapshots planned for it (plans come block after block;
    /// one planned for an earlier block than the last is refused).
    #[test]
    fn each_block_finds_its_own_snapshots_and_plans_come_in_block_order() {
        let block = |id: u32| {
            let key = ItemKey::namespaced("", "persistentvolumeclaims", "ns", &format!("c{id}"));
            Arc::new(BlockPlan { id, items: vec![key].into(), hooks: Box::new([]), bodies: Box::default() })
        };
        let plan = |id: u32, block: u32| {
            Arc::new(SnapshotPlan { id, block, claims: vec![format!("c{block}")], ..SnapshotPlan::default() })
        };
        let mut s = BackupState::default();
        s.apply(&Event::BackupRequested { spec: crate::spec::BackupSpec::new("bk"), workers: 1, at_ms: 1 }).unwrap();
        s.apply(&Event::BlockPlanned { blocks: (0..4).map(block).collect() }).unwrap();
        s.apply(&Event::SnapshotsPlanned { snapshots: vec![plan(0, 0), plan(1, 0), plan(2, 2)] }).unwrap();
        let of = |s: &BackupState, b: u32| s.snapshots_of(b).map(|x| x.plan.id).collect::<Vec<_>>();
        assert_eq!((of(&s, 0), of(&s, 1), of(&s, 2), of(&s, 3)), (vec![0, 1], vec![], vec![2], vec![]));
        let mut later = s.clone();
        later.apply(&Event::SnapshotsPlanned { snapshots: vec![plan(3, 3)] }).unwrap();
        assert_eq!((of(&later, 2), of(&later, 3)), (vec![2], vec![3]));
        let err = s.apply(&Event::SnapshotsPlanned { snapshots: vec![plan(3, 1)] }).unwrap_err();
        assert!(err.reason.contains("snapshot 3 of block 1 planned out of order"), "{err}");
    }

    /// A block without hooks that finishes plainly is held slim again (the fold settles it).
    #[test]
    fn a_plain_block_is_slim_after_it_finishes() {
        let key = ItemKey::namespaced("", "configmaps", "ns", "a");
        let mut s = BackupState::default();
        let plan = BlockPlan { id: 0, items: vec![key.clone()].into(), hooks: Box::new([]), bodies: Box::default() };
        for e in [
            Event::BackupRequested { spec: crate::spec::BackupSpec::new("b"), workers: 1, at_ms: 1 },
            Event::BlockPlanned { blocks: vec![Arc::new(plan)] },
            Event::BlockStarted { block: 0, attempt: 1, at_ms: 1 },
        ] {
            s.apply(&e).unwrap();
        }
        assert_eq!(s.blocks.held().count(), 1, "an open attempt is held in full");
        assert!(!s.all_blocks_finished());
        let written = Event::ItemWritten { block: 0, attempt: 1, key, digest: [1; 32], bytes: 9 };
        s.apply(&written).unwrap();
        s.apply(&Event::BlockFinished { block: 0, attempt: 1, outcome: BlockOutcome::Completed, at_ms: 2 }).unwrap();
        assert_eq!(s.blocks.held().count(), 0);
        assert!(s.all_blocks_finished());
        let b = s.blocks.get(0).unwrap();
        assert_eq!(
            (b.outcome.clone(), b.attempts, s.written_count(&b), b.items),
            (Some(BlockOutcome::Completed), 1, 1, 1)
        );
    }

    /// A block with hooks keeps its plan, and its attempt keeps its written items by position in
    /// the plan (any order) or, for items the plan does not list, by key; `written()` gives every
    /// one back by key, the latest write of an item winning.
    #[test]
    fn written_items_are_kept_by_plan_position_and_given_back_by_key() {
        let key = |n: &str| ItemKey::namespaced("", "configmaps", "ns", n);
        let hook = Hook {
            pod: ItemKey::namespaced("", "pods", "ns", "p"),
            phase: HookPhase::Pre,
            index: 0,
            container: "c".into(),
            command: vec!["true".into()],
            on_error: crate::hooks::OnError::Fail,
            timeout_ms: 1,
            invalid: None,
        };
        let plan = BlockPlan {
            id: 0,
            items: vec![key("a"), key("b"), key("c")].into(),
            hooks: Box::new([hook]),
            bodies: Box::default(),
        };
        let snap = ItemKey::namespaced("snapshot.storage.k8s.io", "volumesnapshots", "ns", "s1");
        let mut s = BackupState::default();
        let events = [
            Event::BackupRequested { spec: crate::spec::BackupSpec::new("b"), workers: 1, at_ms: 1 },
            Event::BlockPlanned { blocks: vec![Arc::new(plan)] },
            Event::BlockStarted { block: 0, attempt: 1, at_ms: 2 },
        ];
        let write = |k: &ItemKey, d: u8| Event::ItemWritten {
            block: 0,
            attempt: 1,
            key: k.clone(),
            digest: [d; 32],
            bytes: d as u64,
        };
        for e in events.iter().chain(&[write(&key("c"), 1), write(&key("a"), 2), write(&snap, 3), write(&key("c"), 4)])
        {
            s.apply(e).unwrap();
        }
        let got: BTreeMap<ItemKey, u8> =
            s.written(&s.blocks.get(0).unwrap()).map(|(k, (d, _))| (k.clone(), d[0])).collect();
        assert_eq!(got, BTreeMap::from([(key("a"), 2), (key("c"), 4), (snap.clone(), 3)]));
        let kept: Vec<&WrittenKey> = s.blocks.full(0).unwrap().attempt.as_ref().unwrap().written.keys().collect();
        assert_eq!(
            kept,
            [&WrittenKey::Planned(0), &WrittenKey::Planned(2), &WrittenKey::Other(Box::new(snap.clone()))]
        );
        // Finished, the items are counted and left to the log (`crate::entries` reads them back:
        // the same items), and a plain attempt is dropped.
        let finished = Event::BlockFinished { block: 0, attempt: 1, outcome: BlockOutcome::Completed, at_ms: 3 };
        s.apply(&finished).unwrap();
        assert_eq!(s.written(&s.blocks.get(0).unwrap()).count(), 0);
        assert_eq!(
            (s.written_count(&s.blocks.get(0).unwrap()), s.items_done(), s.blocks.get(0).unwrap().attempts),
            (3, 3, 1)
        );
        assert!(s.blocks.get(0).unwrap().attempt.is_none());
        let log: Vec<Event> = events
            .iter()
            .cloned()
            .chain([write(&key("c"), 1), write(&key("a"), 2), write(&snap, 3), write(&key("c"), 4), finished])
            .collect();
        // The latest of each key's kept writes.
        let after: BTreeMap<ItemKey, u8> =
            log.iter().filter_map(|e| crate::entries::final_write(&s, e)).map(|(_, k, d)| (k.clone(), d[0])).collect();
        assert_eq!(after, got);
        assert!(s.blocks.get(0).unwrap().plan.is_some());
    }

    /// A block without hooks keeps no plan (the log has it; the engine reads it back when the
    /// block starts), only its item count, and its attempt's writes by key: given back the same.
    #[test]
    fn a_block_without_hooks_keeps_no_plan_and_its_writes_by_key() {
        let key = |n: &str| ItemKey::namespaced("", "configmaps", "ns", n);
        let plan =
            BlockPlan { id: 0, items: vec![key("a"), key("b")].into(), hooks: Box::default(), bodies: Box::default() };
        let write =
            |k: &str, d: u8| Event::ItemWritten { block: 0, attempt: 1, key: key(k), digest: [d; 32], bytes: 1 };
        let s = BackupState::fold(&[
            Event::BackupRequested { spec: crate::spec::BackupSpec::new("b"), workers: 1, at_ms: 1 },
            Event::BlockPlanned { blocks: vec![Arc::new(plan)] },
            Event::BlockStarted { block: 0, attempt: 1, at_ms: 2 },
            write("b", 1),
            write("a", 2),
            write("b", 3),
        ])
        .unwrap();
        assert!(s.blocks.get(0).unwrap().plan.is_none());
        assert_eq!(s.blocks.get(0).unwrap().items, 2);
        let got: BTreeMap<ItemKey, u8> =
            s.written(&s.blocks.get(0).unwrap()).map(|(k, (d, _))| (k.clone(), d[0])).collect();
        assert_eq!(got, BTreeMap::from([(key("a"), 2), (key("b"), 3)]));
    }

    /// A finished block's attempt that ran a hook stays (describe reads its hooks); its written
    /// items are counted all the same, and blocks finishing in any order keep their own counts.
    #[test]
    fn a_finished_attempt_keeps_its_hooks_and_each_block_its_own_items() {
        let key = |n: &str| ItemKey::namespaced("", "configmaps", "ns", n);
        let plan = |id: u32, names: &[&str]| {
            Arc::new(BlockPlan {
                id,
                items: names.iter().map(|n| key(n)).collect(),
                hooks: Box::default(),
                bodies: Box::default(),
            })
        };
        let hook = HookRef { pod: key("p"), phase: HookPhase::Pre, index: 0 };
        let write = |block: u32, n: &str, d: u8| Event::ItemWritten {
            block,
            attempt: 1,
            key: key(n),
            digest: [d; 32],
            bytes: 1,
        };
        let finish =
            |block: u32| Event::BlockFinished { block, attempt: 1, outcome: BlockOutcome::Completed, at_ms: 9 };
        let events = [
            Event::BackupRequested { spec: crate::spec::BackupSpec::new("b"), workers: 2, at_ms: 1 },
            Event::BlockPlanned { blocks: vec![plan(0, &["a", "b"]), plan(1, &["c"])] },
            Event::BlockStarted { block: 0, attempt: 1, at_ms: 2 },
            Event::BlockStarted { block: 1, attempt: 1, at_ms: 2 },
            Event::HookStarted { block: 1, attempt: 1, hook: hook.clone(), at_ms: 3 },
            Event::HookFinished { block: 1, attempt: 1, hook: hook.clone(), outcome: HookOutcome::Succeeded, at_ms: 4 },
            write(0, "a", 1),
            write(1, "c", 3),
            finish(1),
            write(0, "b", 2),
            finish(0),
        ];
        let s = BackupState::fold(&events).unwrap();
        assert_eq!((s.written_count(&s.blocks.get(0).unwrap()), s.written_count(&s.blocks.get(1).unwrap())), (2, 1));
        assert!(s.blocks.get(0).unwrap().attempt.is_none());
        let kept = s.blocks.full(1).unwrap().attempt.as_ref().map(|a| a.hooks_finished.len());
        assert_eq!(kept, Some(1));
        assert_eq!(s.items_done(), 3);
    }
}
