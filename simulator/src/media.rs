//! The simulated process's disks: an in-memory log medium and an in-memory store medium, each
//! with the durability a real one has, so a simulated crash loses exactly what a power cut or a
//! `kill -9` could lose.
//!
//! [`MemLog`] is a [`LogMedium`] under the production [`EventLog`](blockwise_adapters::log::EventLog):
//! inserts are pending until a flush; a crash keeps a prefix of the pending inserts (nothing, by
//! default), may leave the first lost record half-written (a torn tail), and may flip a bit in a
//! stored record. It can also be told to kill the process right after a given number of inserts
//! (exhaustive crash points): the insert that crosses the line succeeds, and every later log
//! operation fails because the process is gone.
//!
//! [`MemStore`] is a [`StoreMedium`] under the production [`LocalStore`](blockwise_adapters::store::LocalStore):
//! a staged item appended to a pack is visible at once but lost at a crash unless a later sync
//! covered it (the unsynced tail of a pack survives whole, not at all or torn, by a seeded draw,
//! as on a real file system); files, written durably, survive. Each operation takes virtual time and can fail by injected fault or outage.
//! Both record what they do in the [`WorldLog`].
//!
//! A shared [`Death`] flag marks the process dead between the crash point and the restart: from
//! then on the fake world refuses to act for it (its futures never complete), as a dead process
//! acts on nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blockwise_adapters::log::{backup_id, FlushJob, LogMedium, RecordVisitor};
use blockwise_adapters::store::{StoreError, StoreMedium};
use blockwise_adapters::world::{BoxFuture, Runtime};
use blockwise_engine::event::Seq;
use sha2::{Digest, Sha256};

use crate::records::{Record, WorldLog};
use crate::rng::Rng;
use crate::vt::SimRuntime;

/// Whether the simulated process is dead (between a crash and the restart).
#[derive(Clone, Default)]
pub struct Death(Arc<AtomicBool>);

impl Death {
    /// Marks the process dead.
    pub fn kill(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// A new process starts.
    pub fn revive(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    /// Whether the process is dead.
    pub fn is_dead(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A future that never completes: what a dead process waits for.
pub fn never<T: Send + 'static>() -> BoxFuture<T> {
    Box::pin(std::future::pending())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records by (backup id, sequence number).
type RecordMap = BTreeMap<(u64, Seq), Vec<u8>>;

#[derive(Debug, Clone)]
enum LogOp {
    Name(String),
    Insert(u64, Seq, Vec<u8>),
    Remove(u64, Seq),
}

/// What a crash did to the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogCrash {
    /// Pending operations lost.
    pub lost: usize,
    /// The first lost record was left half-written, at this sequence number.
    pub torn: Option<Seq>,
}

/// The log's disk: durable state and the operations since the last flush.
#[derive(Default)]
pub struct LogDisk {
    name: Option<String>,
    durable: RecordMap,
    pending: Vec<LogOp>,
    inserts: u64,
    crash_after_inserts: Option<u64>,
    /// Records durable through a flush (not merely kept by a crash's luck).
    flushed: usize,
    /// The commit marker, kept apart from the records as the sled medium keeps its file: the
    /// backup id and how many of its records the last flush committed.
    committed: Option<(u64, Seq)>,
}

impl LogDisk {
    fn apply(name: &mut Option<String>, records: &mut RecordMap, op: &LogOp) {
        match op {
            LogOp::Name(n) => *name = Some(n.clone()),
            LogOp::Insert(id, seq, bytes) => {
                records.insert((*id, *seq), bytes.clone());
            }
            LogOp::Remove(id, seq) => {
                records.remove(&(*id, *seq));
            }
        }
    }

    /// The state a reader sees now: durable plus pending.
    fn view(&self) -> (Option<String>, RecordMap) {
        let (mut name, mut records) = (self.name.clone(), self.durable.clone());
        for op in &self.pending {
            LogDisk::apply(&mut name, &mut records, op);
        }
        (name, records)
    }

    /// Durable records of every backup, in key order.
    pub fn durable_records(&self) -> Vec<(Seq, Vec<u8>)> {
        self.durable.iter().map(|((_, seq), v)| (*seq, v.clone())).collect()
    }

    /// Inserts so far.
    pub fn inserts(&self) -> u64 {
        self.inserts
    }

    /// How many records were durable right after the last flush. Records beyond them survived a
    /// crash without being flushed (a medium may write some of its buffer out on its own).
    pub fn flushed(&self) -> usize {
        self.flushed
    }
}

/// The in-memory log medium; see the module docs.
#[derive(Clone)]
pub struct MemLog {
    disk: Arc<Mutex<LogDisk>>,
    death: Death,
    path: PathBuf,
}

impl MemLog {
    /// A medium on a fresh disk.
    pub fn new(death: Death) -> MemLog {
        MemLog { disk: Arc::default(), death, path: PathBuf::from("mem://log") }
    }

    /// Kills the process right after the `n`-th insert (counted over the whole run).
    pub fn crash_after_inserts(&self, n: u64) {
        lock(&self.disk).crash_after_inserts = Some(n);
    }

    /// The disk, for the simulator's crash handling and the judges.
    pub fn disk(&self) -> MutexGuard<'_, LogDisk> {
        lock(&self.disk)
    }

    /// A crash: keeps the first `keep` pending operations, and when `tear` is given, leaves that
    /// fraction (0..1) of the first lost insert's bytes as a torn record.
    pub fn crash(&self, keep: usize, tear: Option<f64>) -> LogCrash {
        let mut d = lock(&self.disk);
        let pending = std::mem::take(&mut d.pending);
        let keep = keep.min(pending.len());
        let LogDisk { name, durable, .. } = &mut *d;
        for op in &pending[..keep] {
            LogDisk::apply(name, durable, op);
        }
        let mut crash = LogCrash { lost: pending.len() - keep, torn: None };
        if let (Some(frac), Some(LogOp::Insert(id, seq, bytes))) = (tear, pending.get(keep)) {
            let cut = ((bytes.len() as f64 * frac) as usize).clamp(1, bytes.len().saturating_sub(1).max(1));
            durable.insert((*id, *seq), bytes[..cut.min(bytes.len())].to_vec());
            crash.torn = Some(*seq);
        }
        crash
    }

    /// Flips bit `bit` of the `index`-th durable record; returns its sequence number.
    pub fn flip_bit(&self, index: usize, bit: u64) -> Option<Seq> {
        let mut d = lock(&self.disk);
        let (key, rec) = d.durable.iter_mut().nth(index)?;
        if rec.is_empty() {
            return None;
        }
        let bit = (bit % (rec.len() as u64 * 8)) as usize;
        rec[bit / 8] ^= 1 << (bit % 8);
        Some(key.1)
    }

    /// The medium loses its records from the `keep`-th on, as sled does when it recovers a
    /// prefix of a damaged database; the commit marker, kept apart, stays. Returns the first lost
    /// sequence number, when a committed record was lost.
    pub fn cut_committed(&self, keep: u64) -> Option<Seq> {
        let mut d = lock(&self.disk);
        let (_, committed) = d.committed?;
        if keep >= committed {
            return None;
        }
        d.durable.retain(|(_, seq), _| *seq < keep);
        Some(keep)
    }

    /// How many records the last flush committed.
    pub fn committed_records(&self) -> Seq {
        lock(&self.disk).committed.map_or(0, |(_, n)| n)
    }

    fn alive(&self) -> Result<(), String> {
        if self.death.is_dead() {
            Err("the process is dead".into())
        } else {
            Ok(())
        }
    }
}

impl LogMedium for MemLog {
    fn location(&self) -> &Path {
        &self.path
    }

    fn read_name(&self) -> Result<Option<Vec<u8>>, String> {
        self.alive()?;
        Ok(lock(&self.disk).view().0.map(String::into_bytes))
    }

    fn write_name(&mut self, name: &str) -> Result<(), String> {
        self.alive()?;
        lock(&self.disk).pending.push(LogOp::Name(name.to_string()));
        Ok(())
    }

    fn scan(&self, id: u64, f: RecordVisitor<'_>) -> Result<(), String> {
        self.alive()?;
        let (_, records) = lock(&self.disk).view();
        for ((_, seq), v) in records.into_iter().filter(|((i, _), _)| *i == id) {
            f(seq, &v)?;
        }
        Ok(())
    }

    fn insert(&mut self, id: u64, seq: Seq, bytes: &[u8]) -> Result<(), String> {
        self.alive()?;
        let mut d = lock(&self.disk);
        d.pending.push(LogOp::Insert(id, seq, bytes.to_vec()));
        d.inserts += 1;
        if d.crash_after_inserts == Some(d.inserts) {
            self.death.kill();
        }
        Ok(())
    }

    fn remove(&mut self, id: u64, seq: Seq) -> Result<(), String> {
        self.alive()?;
        lock(&self.disk).pending.push(LogOp::Remove(id, seq));
        Ok(())
    }

    fn committed(&self) -> Result<Option<(u64, Seq)>, (PathBuf, String)> {
        self.alive().map_err(|e| (self.path.clone(), e))?;
        Ok(lock(&self.disk).committed)
    }

    fn flush_job(&self) -> FlushJob {
        let (disk, death) = (self.disk.clone(), self.death.clone());
        Box::new(move || {
            if death.is_dead() {
                return Err("the process is dead".into());
            }
            let mut d = lock(&disk);
            let pending = std::mem::take(&mut d.pending);
            let LogDisk { name, durable, .. } = &mut *d;
            for op in &pending {
                LogDisk::apply(name, durable, op);
            }
            d.flushed = d.durable.len();
            d.committed = d.name.as_deref().map(|n| {
                let id = backup_id(n);
                (id, d.durable.keys().filter(|(i, _)| *i == id).map(|(_, seq)| seq + 1).max().unwrap_or(0))
            });
            Ok(())
        })
    }
}

/// Store faults of one run.
#[derive(Debug, Clone, Default)]
pub struct StoreFaults {
    /// Chance that a staging path fails its first few puts.
    pub put_failure_p: f64,
    /// Most failures of one path (above the store's 4 attempts, the retries run out).
    pub put_failures_max: u64,
    /// Writes to paths containing any of these fail until the store is healed (a new process).
    pub failing_paths: Vec<String>,
}

/// A staging pack: the bytes appended to it, and which items they hold.
#[derive(Default)]
struct MemPack {
    bytes: Vec<u8>,
    /// Each appended item: where its record ends, its logical path (the pack's directory joined
    /// with the item's name) and its body.
    items: Vec<(usize, String, Vec<u8>)>,
    /// Bytes a barrier made durable.
    durable: usize,
}

#[derive(Default)]
struct StoreDisk {
    durable: BTreeMap<String, Vec<u8>>,
    /// Staging packs by path.
    packs: BTreeMap<String, MemPack>,
    /// Which process appends now: a crash starts the next one's packs.
    generation: u64,
    /// Remaining injected failures per path (decided at the path's first write).
    failures: BTreeMap<String, u64>,
    decided: BTreeSet<String>,
    down: bool,
    faults: StoreFaults,
}

/// The in-memory store medium; see the module docs.
#[derive(Clone)]
pub struct MemStore {
    disk: Arc<Mutex<StoreDisk>>,
    rt: SimRuntime,
    records: WorldLog,
    death: Death,
    latency_ms: (u64, u64),
}

fn key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl MemStore {
    /// A fresh store. Each operation takes a latency drawn from `latency_ms` (inclusive).
    pub fn new(rt: SimRuntime, records: WorldLog, death: Death, faults: StoreFaults, latency_ms: (u64, u64)) -> Self {
        let disk = StoreDisk { faults, ..StoreDisk::default() };
        MemStore { disk: Arc::new(Mutex::new(disk)), rt, records, death, latency_ms }
    }

    /// The store goes down (every operation fails) or comes back.
    pub fn set_down(&self, down: bool) {
        lock(&self.disk).down = down;
    }

    /// Whether the store is down.
    pub fn is_down(&self) -> bool {
        lock(&self.disk).down
    }

    /// The store is back: not down, and writes to the failing paths work again.
    pub fn heal(&self) {
        let mut d = lock(&self.disk);
        d.down = false;
        d.faults.failing_paths.clear();
    }

    /// A crash: a pack keeps its durable bytes and, by a draw from `rng`, all, none or a torn
    /// part of what was appended after them. The next process appends to packs of its own.
    pub fn crash(&self, rng: &mut Rng) {
        let mut d = lock(&self.disk);
        for pack in d.packs.values_mut() {
            let (lo, hi) = (pack.durable, pack.bytes.len());
            if hi > lo {
                let keep = if rng.chance(0.5) { hi } else { rng.range(lo as u64, hi as u64) as usize };
                pack.bytes.truncate(keep);
                pack.items.retain(|(end, _, _)| *end <= keep);
                pack.durable = keep;
            }
        }
        d.generation += 1;
    }

    /// Every file that survives a crash now, by path; a staged item in a pack as a file of its
    /// own under its logical path (the newest copy).
    pub fn durable_files(&self) -> BTreeMap<String, Vec<u8>> {
        let d = lock(&self.disk);
        let mut all = d.durable.clone();
        for pack in d.packs.values() {
            let durable = pack.items.iter().filter(|(end, _, _)| *end <= pack.durable);
            all.extend(durable.map(|(_, path, body)| (path.clone(), body.clone())));
        }
        all
    }

    /// Every file as a reader sees it now, by path (staged items in packs as in
    /// [`MemStore::durable_files`]).
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        let d = lock(&self.disk);
        let mut all = d.durable.clone();
        for pack in d.packs.values() {
            all.extend(pack.items.iter().map(|(_, path, body)| (path.clone(), body.clone())));
        }
        all
    }

    /// A file as a reader sees it now.
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        let d = lock(&self.disk);
        d.durable.get(path).cloned()
    }

    fn now(&self) -> u64 {
        self.rt.now()
    }

    /// Fails the write to `path` if the store is down or an injected failure is due.
    fn check_fault(&self, path: &str) -> Result<(), StoreError> {
        let mut d = lock(&self.disk);
        let mut fail = d.down || d.faults.failing_paths.iter().any(|f| path.contains(f.as_str()));
        if !fail && path.contains("/staging/") {
            let (p, max) = (d.faults.put_failure_p, d.faults.put_failures_max.max(1));
            if d.decided.insert(path.to_string()) && p > 0.0 {
                let n = self.rt.draw(|r| if r.chance(p) { r.range(1, max) } else { 0 });
                if n > 0 {
                    d.failures.insert(path.to_string(), n);
                }
            }
            if let Some(n) = d.failures.get_mut(path) {
                if *n > 0 {
                    *n -= 1;
                    fail = true;
                }
            }
        }
        drop(d);
        if fail {
            self.records.push(Record::StoreFailed { at_ms: self.now(), path: path.to_string() });
            return Err(StoreError::Injected { op: "write", key: path.to_string() });
        }
        Ok(())
    }
}

impl StoreMedium for MemStore {
    fn describe(&self) -> String {
        "in-memory store".into()
    }

    fn location(&self, path: &Path) -> PathBuf {
        Path::new("mem://store").join(path)
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let p = key(path);
        self.check_fault(&p)?;
        let at_ms = self.now();
        lock(&self.disk).durable.insert(p.clone(), bytes.to_vec());
        self.records.push(Record::FileWritten { at_ms, path: p });
        Ok(())
    }

    fn write_with(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn Write) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let p = key(path);
        self.check_fault(&p)?;
        let mut buf: Vec<u8> = Vec::new();
        fill(&mut buf)?;
        let mut d = lock(&self.disk);
        d.durable.insert(p.clone(), buf);
        drop(d);
        self.records.push(Record::FileWritten { at_ms: self.now(), path: p });
        Ok(())
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        let p = key(path);
        let found = self.file(&p);
        if found.is_none() && p.contains("/staging/") {
            self.records.push(Record::ReadMissing { at_ms: self.now(), path: p });
        }
        Ok(found)
    }

    fn sync_tree(&self, dir: &Path) -> Result<(), StoreError> {
        let prefix = key(dir);
        let mut d = lock(&self.disk);
        if d.down {
            drop(d);
            self.records.push(Record::SyncFailed { at_ms: self.now(), dir: prefix.clone() });
            return Err(StoreError::Injected { op: "sync", key: prefix });
        }
        for (_, pack) in d.packs.iter_mut().filter(|(k, _)| k.starts_with(&prefix)) {
            pack.durable = pack.bytes.len();
        }
        drop(d);
        self.records.push(Record::Synced { at_ms: self.now(), dir: prefix });
        Ok(())
    }

    fn append_staged(&self, dir: &Path, name: &str, body: &[u8]) -> Result<(), StoreError> {
        let logical = key(&dir.join(name));
        self.check_fault(&logical)?;
        let record = blockwise_adapters::pack::record(name, body)?;
        let at_ms = self.now();
        let mut d = lock(&self.disk);
        let path = key(&dir.join(format!("{:08}.pack", d.generation)));
        let pack = d.packs.entry(path).or_default();
        pack.bytes.extend_from_slice(&record);
        pack.items.push((pack.bytes.len(), logical.clone(), body.to_vec()));
        drop(d);
        let digest: [u8; 32] = Sha256::digest(body).into();
        self.records.push(Record::Staged { at_ms, path: logical, digest });
        Ok(())
    }

    fn packs(&self, dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
        let d = lock(&self.disk);
        Ok(d.packs.keys().map(PathBuf::from).filter(|p| p.parent() == Some(dir)).collect())
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let p = key(path);
        let d = lock(&self.disk);
        let bytes = match d.packs.get(&p) {
            Some(pack) => Some(&pack.bytes),
            None => d.durable.get(&p),
        };
        let Some(bytes) = bytes else { return Ok(Vec::new()) };
        let from = (offset as usize).min(bytes.len());
        Ok(bytes[from..(from + len).min(bytes.len())].to_vec())
    }

    fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> BoxFuture<T> {
        let (rt, death) = (self.rt.clone(), self.death.clone());
        let (lo, hi) = self.latency_ms;
        let before = rt.draw(|r| r.range(lo, hi).max(1));
        Box::pin(async move {
            rt.sleep(before).await;
            if death.is_dead() {
                return never::<T>().await;
            }
            let v = job();
            // The acknowledgement takes a moment too: a crash can land after the write, before
            // the caller hears of it.
            rt.sleep(1).await;
            v
        })
    }
}
