//! The durable per-backup event log (DESIGN §5), over a swappable medium.
//!
//! [`EventLog`] owns the log's rules: records are numbered 0, 1, 2, … and appended only in order;
//! each value is the engine's record bytes ([`encode_record`]: length, crc32c, version, bincode
//! payload); durability comes solely from [`EventLog::flush`], a group commit that makes every
//! append since the previous flush durable at once; on open, a bad *last* record is a torn tail —
//! cut and reported — while a bad record or a gap anywhere before it is corruption, reported as an
//! error naming the sequence number (through the engine's shared
//! [`RecordStream`](blockwise_engine::event::RecordStream)).
//!
//! Where the bytes live is a [`LogMedium`]: [`SledMedium`] in production (one sled database per
//! backup, keys `backup id (u64 BE) ‖ seq (u64 BE)`, the backup id being the FNV-1a 64 hash of the
//! name, which is also kept under a meta key; sled's own periodic flush switched off), and the
//! simulator's in-memory medium, which loses what was not flushed when the simulated process dies.
//! Both run this same code, so the simulator exercises the real recovery, tail cutting and
//! sequence bookkeeping.
//!
//! sled 0.34.7 cannot open a database whose snapshot was interrupted while being written (it reads
//! the empty `snap.<lsn>.generating` file back as corruption: sled issues #1527, #1533).
//! [`SledMedium::open`] removes such files first; the log's own per-record checksums then verify
//! every record, so nothing unverified is ever trusted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use blockwise_engine::body::BodyId;
use blockwise_engine::grouping::BlockPlan;
use blockwise_engine::ports::PlanSource;

use blockwise_engine::event::{encode_record, RecordStream, RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX};
use blockwise_engine::mutation::{self, Mutation};
use blockwise_engine::{Event, Seq};

use crate::world::{offload, Runtime};

/// Meta key holding the backup name; it starts with 0xff and is 17 bytes long, so it never falls
/// inside a backup's 16-byte record keys.
const META_NAME_KEY: &[u8] = b"\xffmeta/backup-name";
/// Meta key holding the log's format: present in logs that keep a commit marker — 2: one sled
/// entry per record; 3: records in batches in the blob file ([`Layout`]).
const META_FORMAT_KEY: &[u8] = b"\xffmeta/format";
/// The format of a log with one sled entry per record (written 2026-12-05 and before).
const LOG_FORMAT_PER_RECORD: u8 = 2;
/// The format of new logs: every record in the blob file, one sled entry per group commit.
const LOG_FORMAT_BATCHED: u8 = 3;

/// Why the event log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log directory does not exist (or holds no log).
    #[error("event log {}: not found", .0.display())]
    NotFound(PathBuf),
    /// `create` found a log that already has records.
    #[error("event log {}: already exists with {records} records (backup {name:?}); use resume instead", .path.display())]
    AlreadyExists { path: PathBuf, name: String, records: u64 },
    /// Another process holds the sled lock.
    #[error("event log {}: is in use by another blockwise process", .0.display())]
    InUse(PathBuf),
    /// The log belongs to another backup than the one asked for.
    #[error("event log {}: belongs to backup {stored:?}, not {requested:?}", .path.display())]
    WrongBackup { path: PathBuf, stored: String, requested: String },
    /// The log is damaged: a committed record is missing, bad or out of sequence, the commit
    /// marker or the metadata is unreadable, or the medium (sled) failed reading it back. Names the
    /// backup (or restore), the file and, when one is to blame, the record.
    #[error("{what} is damaged: {}{}: {reason}", .file.display(), .seq.map(|s| format!(", record {s}")).unwrap_or_default())]
    Damaged { path: PathBuf, what: String, file: PathBuf, seq: Option<Seq>, reason: String },
    /// An append with a sequence number other than the next one.
    #[error("event log {}: append of record {got} out of order: the next record must be {expected}", .path.display())]
    OutOfOrder { path: PathBuf, expected: Seq, got: Seq },
    /// The medium failed (sled, or the simulator's medium after a simulated crash).
    #[error("event log {}: storage error: {message}", .path.display())]
    Storage { path: PathBuf, message: String },
}

/// What `open` found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenReport {
    /// Good records read.
    pub events: usize,
    /// A torn last record that was cut: its sequence number and why it was bad.
    pub cut_tail: Option<(Seq, String)>,
}

/// What [`LogMedium::scan`] calls with each record: its sequence number and bytes.
pub type RecordVisitor<'a> = &'a mut dyn FnMut(Seq, &[u8]) -> Result<(), String>;

/// A flush that can run on another thread: makes every prior insert durable.
pub type FlushJob = Box<dyn FnOnce() -> Result<(), String> + Send + 'static>;

/// Where a log's records are kept. Errors are plain messages; [`EventLog`] adds the path.
pub trait LogMedium: Send {
    /// Where the medium is, for messages.
    fn location(&self) -> &Path;
    /// The backup name stored with the log, if any.
    fn read_name(&self) -> Result<Option<Vec<u8>>, String>;
    /// Stores the backup name (durable at the next flush).
    fn write_name(&mut self, name: &str) -> Result<(), String>;
    /// Inserts (or replaces) a record; not durable until a flush.
    fn insert(&mut self, id: u64, seq: Seq, bytes: &[u8]) -> Result<(), String>;
    /// Removes a record; not durable until a flush.
    fn remove(&mut self, id: u64, seq: Seq) -> Result<(), String>;
    /// A job that makes every insert and removal so far durable.
    fn flush_job(&self) -> FlushJob;
    /// Calls `f` with every record of backup `id` in key order, with its sequence number, one at a
    /// time (a key that is not a record key is an error); stops at the first error, of the medium or
    /// of `f`.
    fn scan(&self, id: u64, f: RecordVisitor<'_>) -> Result<(), String>;
    /// Where the log's objects are spilled (`None`: held in memory).
    fn spill_path(&self) -> Option<PathBuf> {
        None
    }
    /// Where the archive's entries and the resource list are sorted while they are made, each in
    /// a directory of its own below this one (`None`: in memory).
    fn sort_dir(&self) -> Option<PathBuf> {
        None
    }
    /// How many records were committed — made durable by a flush — and of which backup id, as the
    /// medium keeps it apart from the records, so that a medium that loses records cannot lose this
    /// with them ([`blockwise_engine::event::check_end`]). `Ok(None)`: no count is kept (a log
    /// written before it was, or never created). An error names the file that holds the count and
    /// what is wrong with it.
    fn committed(&self) -> Result<Option<(u64, Seq)>, (PathBuf, String)> {
        Ok(None)
    }
    /// The file that holds record `seq` of backup `id`, for messages.
    fn record_file(&self, id: u64, seq: Seq) -> PathBuf {
        let _ = (id, seq);
        self.location().to_path_buf()
    }
}

/// What opening a log read back: its id, good records and the report of the open.
pub(crate) struct Opened<T> {
    pub id: u64,
    pub events: Vec<T>,
    pub report: OpenReport,
}

/// What the messages of a log call it: `backup "b"` or `restore "r"`; before the name is read, the
/// name of the directory that holds the log.
fn what_of(kind: &str, name: Option<&str>, path: &Path) -> String {
    let dir_name = || {
        let parent = path.parent().unwrap_or(path);
        parent.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
    };
    format!("{kind} {:?}", name.map(str::to_string).unwrap_or_else(dir_name))
}

/// The kind of log in `dir` by where it lies: `<data-dir>/restores/<name>/log` holds a restore's.
fn kind_of(dir: &Path) -> &'static str {
    let parent = dir.parent().and_then(Path::parent).and_then(Path::file_name);
    if parent.is_some_and(|p| p == "restores") {
        "restore"
    } else {
        "backup"
    }
}

/// What a log's metadata says: its name, id and the count its medium says was committed.
struct Header {
    name: String,
    id: u64,
    committed: Option<Seq>,
}

/// Reads a log's name and committed count, checking one against the other.
fn read_header<M: LogMedium>(medium: &M, kind: &str) -> Result<Header, LogError> {
    let path = medium.location().to_path_buf();
    let damaged = |name: Option<&str>, file: PathBuf, reason: String| LogError::Damaged {
        path: path.clone(),
        what: what_of(kind, name, &path),
        file,
        seq: None,
        reason,
    };
    let committed = medium.committed().map_err(|(file, reason)| damaged(None, file, reason))?;
    let name = match medium.read_name() {
        Ok(Some(n)) => String::from_utf8(n)
            .map_err(|_| damaged(None, path.clone(), "the name in the log's metadata is not UTF-8".to_string()))?,
        // Never created (or its creation never finished) — unless a commit marker says records
        // were committed: then the metadata was lost.
        Ok(None) if committed.is_none_or(|(_, n)| n == 0) => return Err(LogError::NotFound(path.clone())),
        Ok(None) => return Err(damaged(None, path.clone(), "the log's metadata (its name) is gone".to_string())),
        Err(reason) => return Err(damaged(None, path.clone(), format!("reading the log's metadata: {reason}"))),
    };
    let id = backup_id(&name);
    let committed = match committed {
        Some((marked, _)) if marked != id => {
            return Err(damaged(
                Some(&name),
                path.clone(),
                format!("the commit marker belongs to another log (id {marked:#x}, not {id:#x} of this name)"),
            ))
        }
        c => c.map(|(_, n)| n),
    };
    Ok(Header { name, id, committed })
}

/// What reading a log through found: its name and id, how many good records it has, and a torn
/// last record past the committed count (left as it is by a reader, cut by an open).
struct ReadThrough {
    name: String,
    id: u64,
    good: Seq,
    cut_tail: Option<(Seq, String)>,
}

/// Reads a log of `kind` one record at a time, holding none but the current one: `f` gets each
/// good event in order (an error of `f`'s stops the read: [`LogError::Storage`]). The checks are
/// the engine's [`RecordStream`] — sequence, checksums — and the end against the committed count
/// ([`blockwise_engine::event::check_end`]'s rule); anything wrong is [`LogError::Damaged`] naming
/// the log, the file and the record. One kernel for every log and every medium: the simulator's
/// in-memory medium runs exactly these checks.
fn read_through<M: LogMedium, T: serde::de::DeserializeOwned>(
    medium: &M,
    kind: &str,
    mut f: impl FnMut(Seq, T) -> Result<(), String>,
) -> Result<ReadThrough, LogError> {
    let path = medium.location().to_path_buf();
    let Header { name, id, committed } = read_header(medium, kind)?;
    let damaged = |file: PathBuf, seq: Seq, reason: String| LogError::Damaged {
        path: path.clone(),
        what: what_of(kind, Some(&name), &path),
        file,
        seq: Some(seq),
        reason,
    };
    let mut stream = RecordStream::new();
    let (mut corrupt, mut refused) = (None, None);
    let mut read: Seq = 0;
    let scanned = medium.scan(id, &mut |seq, bytes| {
        read += 1;
        match stream.push::<T>(seq, bytes) {
            Ok(Some(e)) => f(seq, e).map_err(|m| {
                refused = Some(m);
                String::new()
            }),
            Ok(None) => Ok(()),
            Err(c) => {
                corrupt = Some(c);
                Err(String::new())
            }
        }
    });
    if let Some(c) = corrupt {
        return Err(damaged(medium.record_file(id, c.seq), c.seq, c.reason));
    }
    if let Some(message) = refused {
        return Err(LogError::Storage { path: path.clone(), message });
    }
    if let Err(reason) = scanned {
        // The medium failed after `read` records, all in sequence (else `corrupt` is set).
        return Err(damaged(medium.record_file(id, read), read, format!("reading it back: {reason}")));
    }
    let good = stream.good();
    let cut_tail = stream.finish(committed).map_err(|c| damaged(medium.record_file(id, c.seq), c.seq, c.reason))?;
    Ok(ReadThrough { name, id, good, cut_tail })
}

/// Reads a log of `kind` one record at a time, holding none but the current one: `f` gets each
/// good event in order ([`read_through`]). A torn tail past the committed count is left as it is —
/// a reader writes nothing — and not passed on.
pub(crate) fn scan_records<M: LogMedium, T: serde::de::DeserializeOwned>(
    medium: &M,
    kind: &str,
    mut f: impl FnMut(Seq, T),
) -> Result<(), LogError> {
    read_through(medium, kind, |seq, e| {
        f(seq, e);
        Ok(())
    })
    .map(|_| ())
}

/// Opens an existing log of `kind` ("backup", "restore"), giving `f` each good event in order
/// ([`read_through`]: nothing held but the current record) and cutting a torn last record past
/// the committed count (removed and flushed). Returns the log's name, id and the open's report.
pub(crate) fn open_records_with<M: LogMedium, T: serde::de::DeserializeOwned>(
    medium: &mut M,
    kind: &str,
    f: impl FnMut(Seq, T) -> Result<(), String>,
) -> Result<(String, u64, OpenReport), LogError> {
    let path = medium.location().to_path_buf();
    let ReadThrough { name, id, good, cut_tail } = read_through(medium, kind, f)?;
    let mut report = OpenReport { events: good as usize, cut_tail: None };
    if let Some((seq, reason)) = cut_tail {
        tracing::warn!("{kind} log {}: cutting torn last record {seq}: {reason}", path.display());
        let storage = |message: String| LogError::Storage { path: path.clone(), message };
        medium.remove(id, seq).map_err(storage)?;
        (medium.flush_job())().map_err(storage)?;
        report.cut_tail = Some((seq, reason));
    }
    Ok((name, id, report))
}

/// [`open_records_with`], every event collected (restore logs, tests, small logs).
pub(crate) fn open_records<M: LogMedium, T: serde::de::DeserializeOwned>(
    medium: &mut M,
    kind: &str,
) -> Result<Opened<T>, LogError> {
    let mut events = Vec::new();
    let (_, id, report) = open_records_with(medium, kind, |_, e| {
        events.push(e);
        Ok(())
    })?;
    Ok(Opened { id, events, report })
}

fn new_bodies<M: LogMedium>(medium: &M) -> Result<Bodies, String> {
    let path = medium.spill_path();
    Bodies::new(path.as_deref()).map_err(|e| creating(path.as_deref(), e))
}

fn new_plans<M: LogMedium>(medium: &M) -> Result<Plans, String> {
    let path = medium.spill_path().map(|p| p.with_file_name(PLANS_FILE));
    Plans::new(path.as_deref()).map_err(|e| creating(path.as_deref(), e))
}

fn creating(path: Option<&Path>, e: std::io::Error) -> String {
    format!("creating {}: {e}", path.map_or_else(|| "memory".into(), |p| p.display().to_string()))
}

/// Numbered byte strings appended to a file and read back with positioned reads: `ends` says
/// where string `n` ends (it starts where `n - 1` ends) — ~4 bytes a string in memory. What
/// [`Bodies`] and [`Plans`] keep on disk.
struct SpillFile {
    path: PathBuf,
    file: std::fs::File,
    ends: RwLock<Ends>,
}

/// Where each string of a [`SpillFile`] ends, 4 bytes a string (a `u64` each was 8: ~18 MB at a
/// million objects, for the bodies and the block plans): each run of [`ENDS_RUN`] strings keeps
/// where it starts, and its strings' ends from there; an end 4 GiB or more past its run's start
/// is kept apart.
#[derive(Debug, Default)]
struct Ends {
    starts: Vec<u64>,
    from_start: Vec<u32>,
    far: BTreeMap<u64, u64>,
    last: u64,
}

/// Strings in one run of [`Ends`].
const ENDS_RUN: usize = 4096;

impl Ends {
    fn len(&self) -> u64 {
        self.from_start.len() as u64
    }

    /// Where the last string ends (0: none).
    fn last(&self) -> u64 {
        self.last
    }

    fn push(&mut self, end: u64) {
        let n = self.from_start.len();
        if n.is_multiple_of(ENDS_RUN) {
            self.starts.push(self.last);
        }
        let start = self.starts.last().copied().unwrap_or(0);
        match u32::try_from(end.saturating_sub(start)) {
            Ok(d) if d != u32::MAX => self.from_start.push(d),
            _ => {
                self.far.insert(n as u64, end);
                self.from_start.push(u32::MAX);
            }
        }
        self.last = end;
    }

    /// Where string `n` ends.
    fn get(&self, n: u64) -> Option<u64> {
        let i = usize::try_from(n).ok()?;
        match *self.from_start.get(i)? {
            u32::MAX => self.far.get(&n).copied(),
            d => Some(self.starts.get(i / ENDS_RUN)? + u64::from(d)),
        }
    }
}

impl SpillFile {
    /// A spill file at `path`, created empty (truncated if it exists).
    fn create(path: &Path) -> std::io::Result<SpillFile> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        Ok(SpillFile { path: path.to_path_buf(), file, ends: RwLock::new(Ends::default()) })
    }

    fn len(&self) -> u64 {
        self.ends.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Appends `strings`, numbered from [`SpillFile::len`] on, with one write; a string of 4 GiB
    /// or more is refused.
    fn append<'a>(&self, strings: impl Iterator<Item = &'a [u8]>) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let mut ends = self.ends.write().unwrap_or_else(PoisonError::into_inner);
        let start = ends.last();
        let mut end = start;
        let mut buf = Vec::new();
        for s in strings {
            let len = u32::try_from(s.len()).map_err(|_| format!("a string of {} bytes", s.len()))?;
            buf.extend_from_slice(s);
            end += u64::from(len);
            ends.push(end);
        }
        self.file.write_all_at(&buf, start).map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    /// String `n`, or `None` when there is no such number.
    fn read(&self, n: u64) -> Option<Result<Vec<u8>, String>> {
        use std::os::unix::fs::FileExt;
        let (offset, end) = {
            let ends = self.ends.read().unwrap_or_else(PoisonError::into_inner);
            let end = ends.get(n)?;
            let offset = match n.checked_sub(1) {
                Some(before) => ends.get(before).unwrap_or(0),
                None => 0,
            };
            (offset, end)
        };
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        Some(
            self.file
                .read_exact_at(&mut buf, offset)
                .map(|_| buf)
                .map_err(|e| format!("reading {}: {e}", self.path.display())),
        )
    }
}

/// What a log derives and keeps by number: in memory (the simulator's logs) or in a spill file
/// beside the log ([`SpillFile`]).
enum Numbered<T> {
    Memory(RwLock<Vec<T>>),
    File(SpillFile),
}

impl<T> Numbered<T> {
    fn new(path: Option<&Path>) -> std::io::Result<Numbered<T>> {
        Ok(match path {
            Some(p) => Numbered::File(SpillFile::create(p)?),
            None => Numbered::Memory(RwLock::new(Vec::new())),
        })
    }

    fn len(&self) -> u64 {
        match self {
            Numbered::Memory(v) => v.read().unwrap_or_else(PoisonError::into_inner).len() as u64,
            Numbered::File(s) => s.len(),
        }
    }
}

/// The objects a log carries, by [`BodyId`] (`blockwise_engine::body`): every object of every
/// `ResourceListed` and `ItemsFetched` record appended or read back, numbered in log order as the
/// fold numbers them. Derived from the log, never a source of truth: rebuilt on every open.
/// Production keeps them in a spill file beside the log (read back with positioned reads, so the
/// process holds only 8 bytes per object); the simulator in memory.
pub struct Bodies {
    inner: Numbered<Arc<str>>,
}

impl std::fmt::Debug for Bodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Numbered::Memory(_) => write!(f, "Bodies(memory, {})", self.len()),
            Numbered::File(s) => write!(f, "Bodies({})", s.path.display()),
        }
    }
}

impl Bodies {
    /// Bodies in a spill file at `path`, created empty (truncated if it exists), or in memory.
    pub fn new(path: Option<&Path>) -> std::io::Result<Bodies> {
        Ok(Bodies { inner: Numbered::new(path)? })
    }

    /// Objects numbered so far.
    pub fn len(&self) -> u64 {
        self.inner.len()
    }

    /// Whether no object is numbered yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Numbers the objects `event` carries.
    fn add(&self, event: &Event) -> Result<(), String> {
        let mut objects = event.bodies().peekable();
        if objects.peek().is_none() {
            return Ok(());
        }
        match &self.inner {
            Numbered::Memory(v) => {
                v.write().unwrap_or_else(PoisonError::into_inner).extend(objects.map(Arc::<str>::from));
                Ok(())
            }
            Numbered::File(s) => s.append(objects.map(str::as_bytes)),
        }
    }

    /// The object numbered `id`.
    pub fn get(&self, id: BodyId) -> Result<Arc<str>, String> {
        let missing = || format!("object {id} is not in the log ({} objects)", self.len());
        match &self.inner {
            Numbered::Memory(v) => {
                v.read().unwrap_or_else(PoisonError::into_inner).get(id as usize).cloned().ok_or_else(missing)
            }
            Numbered::File(s) => {
                let buf = s.read(id).ok_or_else(missing)??;
                String::from_utf8(buf)
                    .map(Arc::from)
                    .map_err(|_| format!("{}: object {id} is not UTF-8", s.path.display()))
            }
        }
    }
}

/// The block plans a log carries, by block id: every plan of every `BlockPlanned` record appended
/// or read back. What the engine reads a block's plan from when the block starts
/// ([`PlanSource`]), so that neither it nor the fold holds every plan of a large backup. Derived
/// from the log like [`Bodies`] and rebuilt on every open: a spill file of bincode plans beside
/// the log in production, the plans themselves in memory in the simulator.
pub struct Plans {
    inner: Numbered<Arc<BlockPlan>>,
}

impl Plans {
    /// Plans in a spill file at `path`, created empty (truncated if it exists), or in memory.
    pub fn new(path: Option<&Path>) -> std::io::Result<Plans> {
        Ok(Plans { inner: Numbered::new(path)? })
    }

    /// Plans kept so far (the next block's id).
    pub fn len(&self) -> u64 {
        self.inner.len()
    }

    /// Whether no plan is kept yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the plans `event` carries (a `BlockPlanned`; any other event carries none). Plans
    /// come in id order, from 0; what does not follow on (a log the fold refuses anyway) is not
    /// kept: the log stays a log of any records, and such a plan is missing when asked for.
    fn add(&self, event: &Event) -> Result<(), String> {
        let Event::BlockPlanned { blocks } = event else { return Ok(()) };
        let next = self.len();
        let follow = blocks.iter().zip(next..).take_while(|(b, n)| u64::from(b.id) == *n).count();
        let blocks = &blocks[..follow];
        match &self.inner {
            Numbered::Memory(v) => {
                v.write().unwrap_or_else(PoisonError::into_inner).extend(blocks.iter().cloned());
                Ok(())
            }
            Numbered::File(s) => {
                let encoded: Vec<Vec<u8>> = blocks.iter().map(|b| encode_plan(b)).collect::<Result<_, _>>()?;
                s.append(encoded.iter().map(Vec::as_slice))
            }
        }
    }
}

fn plans_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// A plan as the spill file keeps it: the plan as recorded, then its items' bodies when it carries
/// them (made by this process: [`BlockPlan::bodies`]).
fn encode_plan(plan: &BlockPlan) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec((plan, &plan.bodies), plans_config())
        .map_err(|e| format!("encoding the plan of block {}: {e}", plan.id))
}

impl PlanSource for Plans {
    fn plan(&self, id: u32) -> Result<Arc<BlockPlan>, String> {
        let missing = || format!("block {id} is not planned in the log ({} blocks)", self.len());
        match &self.inner {
            Numbered::Memory(v) => {
                v.read().unwrap_or_else(PoisonError::into_inner).get(id as usize).cloned().ok_or_else(missing)
            }
            Numbered::File(s) => {
                let buf = s.read(u64::from(id)).ok_or_else(missing)??;
                let ((mut plan, bodies), _): ((BlockPlan, Box<[u64]>), usize) =
                    bincode::serde::decode_from_slice(&buf, plans_config())
                        .map_err(|e| format!("{}: the plan of block {id}: {e}", s.path.display()))?;
                plan.bodies = bodies;
                Ok(Arc::new(plan))
            }
        }
    }
}

impl std::fmt::Debug for Plans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Numbered::Memory(_) => write!(f, "Plans(memory, {})", self.len()),
            Numbered::File(s) => write!(f, "Plans({})", s.path.display()),
        }
    }
}

/// The durable event log of one backup, over a [`LogMedium`].
pub struct EventLog<M: LogMedium = SledMedium> {
    log: RecordLog<M>,
    name: String,
    bodies: Arc<Bodies>,
    plans: Arc<Plans>,
}

impl<M: LogMedium> std::fmt::Debug for EventLog<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("path", &self.log.path)
            .field("name", &self.name)
            .field("next", &self.log.next)
            .field("durable", &self.log.durable)
            .finish()
    }
}

/// The backup id of a name: FNV-1a 64 of its bytes.
pub fn backup_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The kernel of every log — a backup's [`EventLog`], a restore's
/// [`RestoreLog`](crate::restore::RestoreLog): the records of one log id on a medium, numbered from
/// 0 and appended only in order, made durable by group commits. Opening one is
/// [`open_records_with`]; what a record holds is the wrapper's business.
pub struct RecordLog<M: LogMedium> {
    medium: M,
    path: PathBuf,
    id: u64,
    next: Seq,
    durable: Option<Seq>,
}

impl<M: LogMedium> RecordLog<M> {
    /// Creates the log named `name` on `medium` (its name written and flushed); fails if the
    /// medium already has records under that name.
    pub(crate) fn create(mut medium: M, name: &str) -> Result<RecordLog<M>, LogError> {
        let path = medium.location().to_path_buf();
        let storage = |message: String| LogError::Storage { path: path.clone(), message };
        let id = backup_id(name);
        let mut records = 0u64;
        medium
            .scan(id, &mut |_, _| {
                records += 1;
                Ok(())
            })
            .map_err(storage)?;
        if records > 0 {
            return Err(LogError::AlreadyExists { path, name: name.to_string(), records });
        }
        medium.write_name(name).map_err(storage)?;
        (medium.flush_job())().map_err(storage)?;
        Ok(RecordLog { medium, path, id, next: 0, durable: None })
    }

    /// The log of `id` on `medium`, opened with `records` good records ([`open_records_with`]).
    pub(crate) fn opened(medium: M, id: u64, records: Seq) -> RecordLog<M> {
        let path = medium.location().to_path_buf();
        RecordLog { medium, path, id, next: records, durable: records.checked_sub(1) }
    }

    /// Appends encoded record bytes as record `seq`, which must be the next one; not yet durable.
    pub fn append_bytes(&mut self, seq: Seq, bytes: &[u8]) -> Result<(), LogError> {
        if seq != self.next {
            return Err(LogError::OutOfOrder { path: self.path.clone(), expected: self.next, got: seq });
        }
        self.medium.insert(self.id, seq, bytes).map_err(|m| self.storage(m))?;
        self.next = seq + 1;
        Ok(())
    }

    /// Group commit, on this thread: makes every append so far durable with one flush.
    pub fn flush(&mut self) -> Result<(), LogError> {
        let upto = self.next.checked_sub(1);
        if upto == self.durable {
            return Ok(());
        }
        (self.medium.flush_job())().map_err(|m| self.storage(m))?;
        self.durable = upto;
        Ok(())
    }

    /// Group commit through `rt` (production: `spawn_blocking`, so an fsync never stalls a
    /// runtime thread).
    pub async fn flush_on(&mut self, rt: &dyn Runtime) -> Result<(), LogError> {
        let upto = self.next.checked_sub(1);
        if upto == self.durable {
            return Ok(());
        }
        let job = self.medium.flush_job();
        offload(rt, job).await.map_err(|m| self.storage(m))?;
        self.durable = upto;
        Ok(())
    }

    /// The medium.
    pub fn medium(&self) -> &M {
        &self.medium
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence number the next append must use.
    pub fn next_seq(&self) -> Seq {
        self.next
    }

    /// The last record known durable, if any.
    pub fn durable_seq(&self) -> Option<Seq> {
        self.durable
    }

    fn storage(&self, message: String) -> LogError {
        LogError::Storage { path: self.path.clone(), message }
    }
}

impl<M: LogMedium> EventLog<M> {
    /// Creates the log of backup `backup_name` on `medium`; fails if it already has records.
    pub fn create_on(medium: M, backup_name: &str) -> Result<EventLog<M>, LogError> {
        let path = medium.location().to_path_buf();
        let storage = |message: String| LogError::Storage { path: path.clone(), message };
        if let Some(stored) = medium.read_name().map_err(storage)? {
            let stored = String::from_utf8_lossy(&stored).into_owned();
            if stored != backup_name {
                return Err(LogError::WrongBackup { path, stored, requested: backup_name.to_string() });
            }
        }
        let log = RecordLog::create(medium, backup_name)?;
        let bodies = Arc::new(new_bodies(&log.medium).map_err(storage)?);
        let plans = Arc::new(new_plans(&log.medium).map_err(storage)?);
        Ok(EventLog { log, name: backup_name.to_string(), bodies, plans })
    }

    /// Opens an existing log on `medium` and reads it whole, cutting a torn last record.
    pub fn open_on(medium: M) -> Result<(EventLog<M>, Vec<Event>, OpenReport), LogError> {
        let mut events = Vec::new();
        let (log, report) = EventLog::open_with_on(medium, |_, e| events.push(e.clone()))?;
        Ok((log, events, report))
    }

    /// Opens an existing log on `medium`, giving `f` each event in order — one at a time: nothing
    /// but the current record is held — and cutting a torn last record.
    pub fn open_with_on(mut medium: M, mut f: impl FnMut(Seq, &Event)) -> Result<(EventLog<M>, OpenReport), LogError> {
        let path = medium.location().to_path_buf();
        let storage = |message: String| LogError::Storage { path: path.clone(), message };
        let bodies = new_bodies(&medium).map_err(storage)?;
        let plans = new_plans(&medium).map_err(storage)?;
        let (name, id, report) = open_records_with::<M, Event>(&mut medium, "backup", |seq, e| {
            bodies.add(&e)?;
            plans.add(&e)?;
            f(seq, &e);
            Ok(())
        })?;
        let mut log = RecordLog::opened(medium, id, report.events as Seq);
        if report.cut_tail.is_some() && mutation::active(Mutation::LogStaleNextSeq) {
            // Deliberate bug: count the cut record, so appends resume one past the tail.
            log.next += 1;
        }
        Ok((EventLog { log, name, bodies: Arc::new(bodies), plans: Arc::new(plans) }, report))
    }

    /// Appends `event` as record `seq`, which must be [`EventLog::next_seq`]; not yet durable.
    pub fn append(&mut self, seq: Seq, event: &Event) -> Result<(), LogError> {
        self.append_encoded(seq, &encode_record(event))?;
        self.bodies.add(event).map_err(|m| self.log.storage(m))?;
        self.plans.add(event).map_err(|m| self.log.storage(m))
    }

    /// The objects the log carries, by number: what a write whose body is logged reads back.
    pub fn bodies(&self) -> Arc<Bodies> {
        self.bodies.clone()
    }

    /// The block plans the log carries, by block id: what the engine reads a plan back from.
    pub fn plans(&self) -> Arc<Plans> {
        self.plans.clone()
    }

    /// Appends already encoded record bytes as record `seq`; not yet durable. The objects such a
    /// record carries are not numbered ([`EventLog::bodies`]): benchmarks and corruption tests only.
    pub fn append_encoded(&mut self, seq: Seq, bytes: &[u8]) -> Result<(), LogError> {
        self.log.append_bytes(seq, bytes)
    }

    /// Writes arbitrary bytes at any `seq`, bypassing every check (corruption tests only).
    #[doc(hidden)]
    pub fn put_raw(&mut self, seq: Seq, bytes: &[u8]) -> Result<(), LogError> {
        let id = self.log.id;
        self.log.medium.insert(id, seq, bytes).map_err(|m| self.log.storage(m))
    }

    /// Group commit, on this thread: makes every append so far durable with one flush.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.log.flush()
    }

    /// Group commit through `rt` (production: `spawn_blocking`, so an fsync never stalls a
    /// runtime thread).
    pub async fn flush_on(&mut self, rt: &dyn Runtime) -> Result<(), LogError> {
        self.log.flush_on(rt).await
    }

    /// Calls `f` with every event of the log in order, decoding one record at a time (the log
    /// stays open; nothing but the current record is held). Every check of an open applies
    /// ([`read_through`]); a torn tail past the committed count is left out.
    pub fn for_each_event(&self, mut f: impl FnMut(Seq, &Event) -> Result<(), String>) -> Result<(), LogError> {
        read_through(&self.log.medium, "backup", |seq, e: Event| f(seq, &e)).map(|_| ())
    }

    /// The last record known durable, if any.
    pub fn durable_seq(&self) -> Option<Seq> {
        self.log.durable
    }

    /// The sequence number the next append must use.
    pub fn next_seq(&self) -> Seq {
        self.log.next
    }

    /// The backup this log belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log's location.
    pub fn path(&self) -> &Path {
        &self.log.path
    }

    /// The medium (tests).
    pub fn medium(&self) -> &M {
        &self.log.medium
    }
}

/// Whether the sled log in `dir` is held — its `db` file locked, as sled locks it (`flock`) — by a
/// process: another one, for a log this process does not run (a paused leader's run, whose Lease
/// another replica has taken, holds it until that process ends). A probe: the lock is taken and
/// let go at once; no log there is not held.
pub fn held(dir: &Path) -> bool {
    match std::fs::File::open(dir.join("db")) {
        Ok(db) => matches!(db.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// How long `open` keeps retrying a held lock. sled 0.34's background threads can keep the
/// locked file open for a moment after a `Db` in this process is dropped, so a lock that is only
/// briefly held is waited for; one held by another process stays held and is reported.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long a reader (`describe`, `get`, `logs`) waits for the lock before it takes the running
/// process's live view instead: it is never this process's own lock.
const READER_LOCK_WAIT: Duration = Duration::from_millis(100);

/// A sled database as a [`LogMedium`].
#[derive(Debug)]
pub struct SledMedium {
    db: sled::Db,
    path: PathBuf,
    layout: Layout,
    /// Where the bytes of blob records are: sled tree `record key → offset ‖ length`
    /// ([`Layout::PerRecord`]).
    pointers: sled::Tree,
    /// The committed batches: sled tree `record key of the first record → offset ‖ bytes ‖ count`
    /// ([`Layout::Batched`]).
    batches: sled::Tree,
    /// Batches appended to the blob file and not yet handed to a flush.
    pending: Arc<std::sync::Mutex<Vec<Batch>>>,
    blob: Arc<Blob>,
    commit: Arc<CommitMarker>,
}

/// How a sled log keeps its records.
///
/// sled 0.34 keeps every value it is given in memory, and more: the IO buffer of every write
/// awaiting reclamation. With one sled entry per record a 100,000-object backup's log held
/// ~350 MB in sled alone (heaptrack, 2026-12-05). A batched log appends every record to the blob
/// file and gives sled one small entry per group commit; sled then holds kilobytes per thousand
/// records. Logs written per record before are read and appended to as they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One sled entry per record (big records' bytes in the blob file): format 2 and before.
    PerRecord,
    /// Every record in the blob file, back to back (each record says its length); sled holds one
    /// [`Batch`] per group commit: format 3.
    Batched,
}

/// Records `first..first + count` of one log, `bytes` long from `at` in the blob file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batch {
    id: u64,
    first: Seq,
    count: u64,
    at: u64,
    bytes: u64,
}

impl Batch {
    const VALUE_BYTES: usize = 24;

    fn value(&self) -> [u8; Batch::VALUE_BYTES] {
        let mut v = [0u8; Batch::VALUE_BYTES];
        v[..8].copy_from_slice(&self.at.to_be_bytes());
        v[8..16].copy_from_slice(&self.bytes.to_be_bytes());
        v[16..].copy_from_slice(&self.count.to_be_bytes());
        v
    }

    /// The batch a sled entry holds; `None` when the entry is not one.
    fn read(key: &[u8], value: &[u8]) -> Option<Batch> {
        let word = |b: &[u8], i: usize| b.get(i..i + 8).and_then(|w| w.try_into().ok()).map(u64::from_be_bytes);
        if key.len() != 16 || value.len() != Batch::VALUE_BYTES {
            return None;
        }
        Some(Batch {
            id: word(key, 0)?,
            first: word(key, 8)?,
            at: word(value, 0)?,
            bytes: word(value, 8)?,
            count: word(value, 16)?,
        })
    }

    fn end(&self) -> Seq {
        self.first + self.count
    }
}

/// Bytes of sled's IO buffer (its `segment_size`) for new logs: sled's default is 512 KiB, and it
/// keeps an IO buffer alive per group commit until reclamation — 286 of them at once (150 MB) in a
/// 100,000-object backup. A batched log writes a few dozen bytes to sled per commit. sled refuses
/// to open a database with another size than it was created with, so an existing log is opened
/// with the size its `conf` file records.
const NEW_SEGMENT_BYTES: usize = 64 << 10;

/// The `segment_size` sled's `conf` file in `dir` records, when it records one sled accepts (text
/// lines, then a 4-byte checksum). A damaged `conf` is left for sled to refuse.
fn recorded_segment_size(dir: &Path) -> Option<usize> {
    let conf = std::fs::read(dir.join("conf")).ok()?;
    let text = String::from_utf8_lossy(conf.get(..conf.len().checked_sub(4)?)?);
    let size: usize =
        text.lines().find_map(|l| l.strip_prefix("segment_size: ")).and_then(|v| v.trim().parse().ok())?;
    (size.is_power_of_two() && (256..=1 << 24).contains(&size)).then_some(size)
}

/// Records of at least this many bytes (listed pages, mostly) are appended to the blob file beside
/// the database, and sled holds a pointer: sled 0.34 keeps every value it is given in memory — its
/// cache does not bound them — so a 300,000-object backup's listed pages stayed resident (~0.5 GiB).
pub const BLOB_RECORD_BYTES_MIN: usize = 16 << 10;
/// The blob file of a sled log, inside its directory.
pub const BLOB_FILE: &str = "records.blob";
/// The tree of blob pointers.
const POINTER_TREE: &[u8] = b"blob-pointers";
/// The tree of record batches.
const BATCH_TREE: &[u8] = b"record-batches";
/// Bytes a batched log's reader reads from the blob file at a time.
const READ_WINDOW_BYTES: usize = 256 << 10;

/// The append-only file of blob records. A pointer is inserted only after its bytes are written,
/// and a flush makes the file durable (`fdatasync`) before sled's flush: a durable pointer never
/// names bytes that are not. Bytes whose pointer did not survive a crash are never read.
#[derive(Debug)]
struct Blob {
    file: std::fs::File,
    end: std::sync::Mutex<u64>,
    dirty: std::sync::atomic::AtomicBool,
}

impl Blob {
    fn open(path: &Path) -> std::io::Result<Blob> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let end = file.metadata()?.len();
        Ok(Blob { file, end: std::sync::Mutex::new(end), dirty: false.into() })
    }

    /// Appends `bytes`; returns where they are.
    fn append(&self, bytes: &[u8]) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let mut end = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        let at = *end;
        self.file.write_all_at(bytes, at)?;
        *end += bytes.len() as u64;
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        Ok(at)
    }

    /// Overwrites bytes at `at` (test corruption only: [`EventLog::put_raw`]).
    fn write_at(&self, bytes: &[u8], at: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(bytes, at)?;
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Up to `len` bytes at `at` (fewer where the file ends).
    fn read_upto(&self, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.file.read_at(&mut buf[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// The bytes at `pointer` (`offset ‖ length`, big-endian); empty when they cannot be read, which
    /// the record checksum then reports (a torn tail, or corruption naming the record).
    fn read(&self, pointer: &[u8]) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let (Ok(off), Ok(len)) = (
            pointer.get(..8).unwrap_or_default().try_into().map(u64::from_be_bytes),
            pointer.get(8..12).unwrap_or_default().try_into().map(u32::from_be_bytes),
        ) else {
            return Vec::new();
        };
        let mut buf = vec![0u8; len as usize];
        match self.file.read_exact_at(&mut buf, off) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        if self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
            if let Err(e) = self.file.sync_data() {
                self.dirty.store(true, std::sync::atomic::Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The commit marker of a sled log, inside its directory: how many records its flushes made
/// durable (DESIGN §5, "a log that knows its end"). sled recovers a *prefix* of a damaged database
/// without a word — a Completed backup would read back as InProgress — so the count is kept in a
/// file of its own, which a damaged `db` cannot take with it.
pub const COMMIT_FILE: &str = "commit";
/// Bytes of one slot of the commit marker: `magic ‖ backup id ‖ records ‖ generation` (u64 BE
/// each) `‖ crc32c of those 32 bytes` (u32 BE) `‖ 4 zero bytes`.
const COMMIT_SLOT_BYTES: usize = 40;
const COMMIT_MAGIC: &[u8; 8] = b"bwcommit";

/// The commit marker's two slots, both written at each commit, one after the other, each synced
/// (a write torn by a crash spoils only the slot being written; the other keeps this count or the
/// one before; a slot damaged afterwards leaves the other with the newest count); the valid slot
/// of the higher generation holds the count. Written after sled's flush and synced, so the count never exceeds
/// what sled made durable; created (atomically, by rename) before the log's name is, so a log that
/// has a name has a marker — unless it was written before markers were kept (no format key).
#[derive(Debug)]
struct CommitMarker {
    path: PathBuf,
    state: std::sync::Mutex<MarkerState>,
}

#[derive(Debug, Default)]
struct MarkerState {
    file: Option<std::fs::File>,
    /// The backup id whose records are counted (known once the name is written or read).
    id: Option<u64>,
    /// One past the highest record inserted (lowered by a removal): what the next flush commits.
    next: Seq,
    generation: u64,
}

/// A marker slot's fields: backup id, records committed, generation.
type Slot = (u64, Seq, u64);

/// A marker slot's fields, when it is valid.
fn read_slot(bytes: &[u8]) -> Option<Slot> {
    let slot = bytes.get(..COMMIT_SLOT_BYTES)?;
    let word = |i: usize| slot.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    let crc = slot.get(32..36).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes)?;
    if slot.get(..8)? != COMMIT_MAGIC || crc32c::crc32c(slot.get(..32)?) != crc {
        return None;
    }
    Some((word(1)?, word(2)?, word(3)?))
}

/// The commit marker file's length and its valid slot of the highest generation, if any.
fn read_marker(file: &std::fs::File) -> std::io::Result<(usize, Option<Slot>)> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 2 * COMMIT_SLOT_BYTES];
    let n = file.read_at(&mut buf, 0)?;
    let bytes = &buf[..n];
    let slots = [bytes.get(..COMMIT_SLOT_BYTES), bytes.get(COMMIT_SLOT_BYTES..)];
    Ok((n, slots.into_iter().flatten().filter_map(read_slot).max_by_key(|&(_, _, generation)| generation)))
}

fn slot_bytes(id: u64, records: Seq, generation: u64) -> [u8; COMMIT_SLOT_BYTES] {
    let mut slot = [0u8; COMMIT_SLOT_BYTES];
    slot[..8].copy_from_slice(COMMIT_MAGIC);
    slot[8..16].copy_from_slice(&id.to_be_bytes());
    slot[16..24].copy_from_slice(&records.to_be_bytes());
    slot[24..32].copy_from_slice(&generation.to_be_bytes());
    let crc = crc32c::crc32c(&slot[..32]);
    slot[32..36].copy_from_slice(&crc.to_be_bytes());
    slot
}

impl CommitMarker {
    /// The marker of the log in `dir` (its file is read when there is one).
    fn open(dir: &Path) -> CommitMarker {
        let path = dir.join(COMMIT_FILE);
        let mut state = MarkerState::default();
        if let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            if let Ok((_, Some((id, records, generation)))) = read_marker(&file) {
                state = MarkerState { file: None, id: Some(id), next: records, generation };
            }
            state.file = Some(file);
        }
        CommitMarker { path, state: std::sync::Mutex::new(state) }
    }

    /// What the file says now (the count a reader checks the records against).
    fn committed(&self) -> Result<Option<(u64, Seq)>, (PathBuf, String)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(file) = &state.file else { return Ok(None) };
        let bad = |m: String| (self.path.clone(), format!("the commit marker is unreadable: {m}"));
        match read_marker(file).map_err(|e| bad(e.to_string()))? {
            (_, Some((id, records, _))) => Ok(Some((id, records))),
            (n, None) => Err(bad(format!("no valid slot in its {n} bytes"))),
        }
    }

    /// The log's name is about to be written: its marker exists (count 0) before the name does.
    fn create(&self, id: u64) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.id = Some(id);
        if state.file.is_some() {
            return Ok(());
        }
        let tmp = self.path.with_extension("new");
        let io = |e: std::io::Error| format!("creating {}: {e}", self.path.display());
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&slot_bytes(id, 0, 1)).map_err(io)?;
            f.write_all(&slot_bytes(id, 0, 1)).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        state.file = Some(std::fs::OpenOptions::new().read(true).write(true).open(&self.path).map_err(io)?);
        state.generation = 1;
        state.next = 0;
        Ok(())
    }

    fn inserted(&self, id: u64, seq: Seq) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.id.get_or_insert(id);
        state.next = state.next.max(seq + 1);
    }

    /// One past the highest record inserted (or kept by a removal), as far as this process knows.
    fn next(&self) -> Seq {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).next
    }

    fn removed(&self, seq: Seq) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.next = state.next.min(seq);
    }

    /// What the flush about to start will commit.
    fn pending(&self) -> Option<(u64, Seq)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.id.map(|id| (id, state.next))
    }

    /// sled's flush made `records` records of `id` durable: say so, durably, in the other slot.
    fn commit(&self, id: u64, records: Seq) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let io = |e: std::io::Error| format!("writing {}: {e}", self.path.display());
        if state.file.is_none() {
            // A log written before markers were kept gets one now, after a flush: never ahead.
            drop(state);
            self.create(id)?;
            state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        }
        let generation = state.generation + 1;
        let Some(file) = &state.file else { return Ok(()) };
        // Both slots, one after the other, each synced: a crash tears at most the one being
        // written (the other holds this count or the one before, never more than sled made
        // durable), and a slot damaged later leaves the other with the newest count — one bad
        // slot never turns the marker back to an older count, which a log that also lost its
        // last batch would pass as its whole (found by fuzz_targets/damaged_log_dir).
        for slot in [generation % 2, (generation + 1) % 2] {
            file.write_all_at(&slot_bytes(id, records, generation), slot * COMMIT_SLOT_BYTES as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        state.generation = generation;
        Ok(())
    }
}

/// Runs a call into sled, turning a panic of sled's (a damaged database can make sled 0.34 panic
/// while it reads one back: "tried to serialize Uninitialized") into an error naming it.
fn unpanicked<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(format!("sled failed {what}: {}", panic_message(&*panic))),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

fn record_key(id: u64, seq: Seq) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&id.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Removes snapshots sled was still generating when its process died: sled 0.34.7 would read the
/// (empty or partial) file back as corruption on every later open. Only while holding sled's own
/// lock (an exclusive `flock` of the `db` file): a snapshot being generated by a live process is
/// never touched. Returns the files removed.
fn remove_interrupted_snapshots(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let storage = |e: std::io::Error| LogError::Storage { path: dir.to_path_buf(), message: e.to_string() };
    let mut removed = Vec::new();
    let Ok(db) = std::fs::File::open(dir.join("db")) else { return Ok(removed) };
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own for the duration of the call; the lock is
        // released when `db` is closed at the end of this function.
        if unsafe { libc::flock(db.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            // Another process runs this log: its snapshots are its own business.
            return Ok(removed);
        }
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(storage(e)),
    };
    for entry in entries {
        let entry = entry.map_err(storage)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path()).map_err(storage)?;
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(storage)?;
    }
    drop(db);
    Ok(removed)
}

impl SledMedium {
    /// Opens (creating if needed) the sled database in `dir`, waiting briefly for a lock held by
    /// this process's own background threads; a lock held by another process is [`LogError::InUse`].
    pub fn open(dir: &Path) -> Result<SledMedium, LogError> {
        SledMedium::open_waiting(dir, LOCK_WAIT)
    }

    /// [`SledMedium::open`] for a reader (`describe`, `get`, `logs`): a lock another process holds
    /// is [`LogError::InUse`] after a short wait.
    pub fn open_for_reading(dir: &Path) -> Result<SledMedium, LogError> {
        SledMedium::open_waiting(dir, READER_LOCK_WAIT)
    }

    /// [`SledMedium::open`], waiting at most `lock_wait` for a held lock.
    fn open_waiting(dir: &Path, lock_wait: Duration) -> Result<SledMedium, LogError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            // Under the lock only, so it is retried with the open while the lock is held.
            for path in remove_interrupted_snapshots(dir)? {
                tracing::warn!("event log {}: removed interrupted sled snapshot {}", dir.display(), path.display());
            }
            let segment = recorded_segment_size(dir).unwrap_or(NEW_SEGMENT_BYTES);
            let opened = std::panic::catch_unwind(|| {
                sled::Config::new()
                    .path(dir)
                    .segment_size(segment)
                    // A reader scans once: a cache would only hold what it already read.
                    .cache_capacity(match lock_wait == READER_LOCK_WAIT {
                        true => crate::memory::SLED_CACHE_MIN,
                        false => crate::memory::budget().sled_cache_bytes(),
                    })
                    .flush_every_ms(None)
                    .open()
            });
            // sled does not say which of its files (`db`, `conf`, `snap.*`) it could not read.
            let damaged = |reason: String| LogError::Damaged {
                path: dir.to_path_buf(),
                what: what_of(kind_of(dir), None, dir),
                file: dir.to_path_buf(),
                seq: None,
                reason: format!("its sled database (db, conf, snap.*): {}", reason.trim_end_matches(" backtrace ()")),
            };
            let opened = match opened {
                Ok(opened) => opened,
                Err(panic) => return Err(damaged(format!("sled failed opening it: {}", panic_message(&*panic)))),
            };
            match opened {
                Ok(db) => {
                    let storage = |message: String| LogError::Storage { path: dir.to_path_buf(), message };
                    let (pointers, batches, layout) = unpanicked("opening its trees", || {
                        let e = |e: sled::Error| e.to_string();
                        let layout = match db.get(META_FORMAT_KEY).map_err(e)?.as_deref() {
                            Some([LOG_FORMAT_BATCHED]) => Layout::Batched,
                            Some(_) => Layout::PerRecord,
                            // Created before formats were recorded, or new.
                            None if db.get(META_NAME_KEY).map_err(e)?.is_some() => Layout::PerRecord,
                            None => Layout::Batched,
                        };
                        Ok((db.open_tree(POINTER_TREE).map_err(e)?, db.open_tree(BATCH_TREE).map_err(e)?, layout))
                    })
                    .map_err(damaged)?;
                    let blob = Blob::open(&dir.join(BLOB_FILE))
                        .map_err(|e| storage(format!("opening {}: {e}", dir.join(BLOB_FILE).display())))?;
                    let commit = Arc::new(CommitMarker::open(dir));
                    return Ok(SledMedium {
                        db,
                        path: dir.to_path_buf(),
                        layout,
                        pointers,
                        batches,
                        pending: Arc::default(),
                        blob: Arc::new(blob),
                        commit,
                    });
                }
                Err(e @ (sled::Error::Corruption { .. } | sled::Error::ReportableBug(_))) => {
                    return Err(damaged(format!("sled cannot read it back: {e}")));
                }
                Err(sled::Error::Io(ref io)) if io.to_string().contains("could not acquire lock") => {
                    if started.elapsed() >= lock_wait {
                        return Err(LogError::InUse(dir.to_path_buf()));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(LogError::Storage { path: dir.to_path_buf(), message: e.to_string() }),
            }
        }
    }
}

/// A window of the blob file, for reading a batched log's records in order with few reads.
#[derive(Default)]
struct Window {
    start: u64,
    buf: Vec<u8>,
}

impl Window {
    /// Up to `len` bytes at `at` (fewer where the file ends).
    fn get(&mut self, blob: &Blob, at: u64, len: usize) -> std::io::Result<&[u8]> {
        let inside = at >= self.start && at + len as u64 <= self.start + self.buf.len() as u64;
        if !inside {
            self.buf = blob.read_upto(at, len.max(READ_WINDOW_BYTES))?;
            self.start = at;
        }
        let off = (at - self.start) as usize;
        Ok(self.buf.get(off..(off + len).min(self.buf.len())).unwrap_or_default())
    }
}

impl SledMedium {
    /// How this log keeps its records.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Calls `f` with each record of `batch`. A record whose length is impossible or runs past the
    /// batch is passed with what remains of the batch — the record checks then name it — and ends
    /// the batch, as does the blob file ending early (what it holds of the record is passed); when
    /// the batch counts more records, an empty one follows it.
    fn scan_batch(&self, b: &Batch, window: &mut Window, f: RecordVisitor<'_>) -> Result<(), String> {
        const HEADER: u64 = RECORD_HEADER_BYTES as u64;
        const MAX: u64 = (RECORD_PAYLOAD_BYTES_MAX + 1) as u64 + HEADER;
        let end = b.at + b.bytes;
        let mut pos = b.at;
        // The batch says records follow one that cannot be read whole: show the record checks
        // that one does (an empty record), so a bad record inside a batch is never a torn tail.
        let more = |seq: Seq, f: RecordVisitor<'_>| match seq + 1 < b.end() {
            true => f(seq + 1, &[]),
            false => Ok(()),
        };
        for seq in b.first..b.end() {
            let left = end.saturating_sub(pos);
            let record_len = match window.get(&self.blob, pos, HEADER.min(left) as usize) {
                Ok(h) if h.len() == RECORD_HEADER_BYTES => {
                    Some(HEADER + u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]])))
                }
                _ => None,
            };
            match record_len {
                Some(n) if n <= left && n <= MAX => {
                    let record = window.get(&self.blob, pos, n as usize).unwrap_or_default();
                    let whole = record.len() as u64 == n;
                    f(seq, record)?;
                    if !whole {
                        return more(seq, f);
                    }
                    pos += n;
                }
                _ => {
                    let rest = window.get(&self.blob, pos, left.min(MAX) as usize).unwrap_or_default();
                    f(seq, rest)?;
                    return more(seq, f);
                }
            }
        }
        Ok(())
    }

    /// Bytes of the first `upto - first` records of `b` (records the log already read back whole).
    fn prefix_bytes(&self, b: &Batch, upto: Seq) -> Result<u64, String> {
        let mut bytes = 0;
        let mut window = Window::default();
        let mut seen = b.first;
        let cut = Batch { count: upto.saturating_sub(b.first), ..*b };
        self.scan_batch(&cut, &mut window, &mut |seq, record| {
            let whole = record
                .get(..4)
                .and_then(|h| h.try_into().ok())
                .map(u32::from_le_bytes)
                .map(|n| n as usize + RECORD_HEADER_BYTES == record.len());
            if whole != Some(true) {
                return Err(format!("record {seq} of the batch from record {} is unreadable", b.first));
            }
            seen = seq + 1;
            bytes += record.len() as u64;
            Ok(())
        })?;
        match seen == upto {
            true => Ok(bytes),
            false => Err(format!("record {seen} of the batch from record {} is unreadable", b.first)),
        }
    }

    /// The batch (committed or pending) that holds record `seq` of `id`.
    fn batch_of(&self, id: u64, seq: Seq) -> Result<Option<Batch>, String> {
        let covers = |b: &Batch| b.id == id && b.first <= seq && seq < b.end();
        if let Some(b) = self.pending.lock().unwrap_or_else(PoisonError::into_inner).iter().rev().find(|b| covers(b)) {
            return Ok(Some(*b));
        }
        let found = self.batches.range(..=record_key(id, seq)).next_back().transpose().map_err(|e| e.to_string())?;
        Ok(found.and_then(|(k, v)| Batch::read(&k, &v)).filter(covers))
    }

    /// Cuts a batched log at `seq`: records `seq..` of `id` are gone (not durable until a flush).
    fn cut_batches(&mut self, id: u64, seq: Seq) -> Result<(), String> {
        let mut pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        pending.retain(|b| b.id != id || b.first < seq);
        for b in pending.iter_mut().filter(|b| b.id == id && seq < b.end()) {
            b.bytes = self.prefix_bytes(b, seq)?;
            b.count = seq - b.first;
        }
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = pending;
        let mut after = Vec::new();
        for kv in self.batches.scan_prefix(id.to_be_bytes()) {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            match Batch::read(&k, &v) {
                Some(b) if seq < b.end() => after.push((k, b)),
                _ => {}
            }
        }
        for (k, b) in after {
            if b.first >= seq {
                self.batches.remove(k).map_err(|e| e.to_string())?;
            } else {
                let cut = Batch { bytes: self.prefix_bytes(&b, seq)?, count: seq - b.first, ..b };
                self.batches.insert(k, &cut.value()[..]).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Appends a record to a batched log, or replaces an existing one in place with bytes of its
    /// length (corruption tests: [`EventLog::put_raw`]).
    fn insert_batched(&mut self, id: u64, seq: Seq, bytes: &[u8]) -> Result<(), String> {
        let blob_error = |e: std::io::Error| format!("writing {}: {e}", self.path.join(BLOB_FILE).display());
        let appends = {
            let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.last().is_some_and(|b| b.id == id && b.end() == seq) || seq >= self.commit.next()
        };
        if !appends {
            if let Some(b) = self.batch_of(id, seq)? {
                let at = b.at + self.prefix_bytes(&b, seq)?;
                let old = self.prefix_bytes(&Batch { first: seq, count: 1, at, ..b }, seq + 1)?;
                if old != bytes.len() as u64 {
                    return Err(format!("record {seq} can be replaced only by bytes of its length ({old})"));
                }
                return self.blob.write_at(bytes, at).map_err(blob_error);
            }
        }
        let at = self.blob.append(bytes).map_err(blob_error)?;
        let len = bytes.len() as u64;
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match pending.last_mut() {
            Some(b) if b.id == id && b.end() == seq && b.at + b.bytes == at => {
                b.count += 1;
                b.bytes += len;
            }
            _ => pending.push(Batch { id, first: seq, count: 1, at, bytes: len }),
        }
        Ok(())
    }
}

#[cfg(test)]
impl SledMedium {
    /// Writes the pending batches and flushes sled without advancing the commit marker: the
    /// instant between sled's flush and the marker's write, when a crash leaves durable records
    /// past the committed count.
    fn flush_unmarked(&self) {
        let batches = std::mem::take(&mut *self.pending.lock().unwrap());
        self.blob.sync().unwrap();
        for b in &batches {
            self.batches.insert(record_key(b.id, b.first), &b.value()[..]).unwrap();
        }
        self.db.flush().unwrap();
    }
}

impl LogMedium for SledMedium {
    fn location(&self) -> &Path {
        &self.path
    }

    fn read_name(&self) -> Result<Option<Vec<u8>>, String> {
        unpanicked("reading the log's name", || {
            self.db.get(META_NAME_KEY).map(|v| v.map(|v| v.to_vec())).map_err(|e| e.to_string())
        })
    }

    fn write_name(&mut self, name: &str) -> Result<(), String> {
        // The marker first: a log with a name always has one.
        self.commit.create(backup_id(name))?;
        unpanicked("writing the log's name", || {
            let format = match self.layout {
                Layout::PerRecord => LOG_FORMAT_PER_RECORD,
                Layout::Batched => LOG_FORMAT_BATCHED,
            };
            self.db.insert(META_FORMAT_KEY, &[format][..]).map_err(|e| e.to_string())?;
            self.db.insert(META_NAME_KEY, name.as_bytes()).map(|_| ()).map_err(|e| e.to_string())
        })
    }

    fn insert(&mut self, id: u64, seq: Seq, bytes: &[u8]) -> Result<(), String> {
        if self.layout == Layout::Batched {
            unpanicked("appending a record", || self.insert_batched(id, seq, bytes))?;
            self.commit.inserted(id, seq);
            return Ok(());
        }
        let key = record_key(id, seq);
        unpanicked("appending a record", || {
            if bytes.len() >= BLOB_RECORD_BYTES_MIN {
                // Bytes, then pointer, then the empty placeholder: sled recovers a prefix of its
                // operations, so a placeholder that survived has its pointer.
                let at = self
                    .blob
                    .append(bytes)
                    .map_err(|e| format!("writing {}: {e}", self.path.join(BLOB_FILE).display()))?;
                let mut pointer = [0u8; 12];
                pointer[..8].copy_from_slice(&at.to_be_bytes());
                pointer[8..].copy_from_slice(&(bytes.len() as u32).to_be_bytes());
                self.pointers.insert(key, &pointer[..]).map_err(|e| e.to_string())?;
                return self.db.insert(key, &[][..]).map(|_| ()).map_err(|e| e.to_string());
            }
            self.db.insert(key, bytes).map(|_| ()).map_err(|e| e.to_string())
        })?;
        self.commit.inserted(id, seq);
        Ok(())
    }

    fn remove(&mut self, id: u64, seq: Seq) -> Result<(), String> {
        if self.layout == Layout::Batched {
            // Only a log's last record is ever removed (a torn tail): a batched log is cut there.
            unpanicked("removing a record", || self.cut_batches(id, seq))?;
            self.commit.removed(seq);
            return Ok(());
        }
        let key = record_key(id, seq);
        unpanicked("removing a record", || {
            self.db.remove(key).map_err(|e| e.to_string())?;
            self.pointers.remove(key).map(|_| ()).map_err(|e| e.to_string())
        })?;
        self.commit.removed(seq);
        Ok(())
    }

    fn flush_job(&self) -> FlushJob {
        let (db, blob, path) = (self.db.clone(), self.blob.clone(), self.path.join(BLOB_FILE));
        let (commit, pending) = (self.commit.clone(), self.commit.pending());
        let (tree, queue) = (self.batches.clone(), self.pending.clone());
        let batches = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        Box::new(move || {
            // The batches' bytes are durable before sled names them; a failed flush keeps them
            // for the next one.
            let written = blob.sync().map_err(|e| format!("syncing {}: {e}", path.display())).and_then(|()| {
                unpanicked("recording the record batches", || {
                    for b in &batches {
                        tree.insert(record_key(b.id, b.first), &b.value()[..]).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            });
            if let Err(e) = written {
                let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
                let newer = std::mem::replace(&mut *queue, batches);
                queue.extend(newer);
                return Err(e);
            }
            unpanicked("flushing", || db.flush().map(|_| ()).map_err(|e| e.to_string()))?;
            match pending {
                Some((id, records)) => commit.commit(id, records),
                None => Ok(()),
            }
        })
    }

    fn spill_path(&self) -> Option<PathBuf> {
        Some(self.path.join(SPILL_FILE))
    }

    fn sort_dir(&self) -> Option<PathBuf> {
        Some(self.path.join(SORT_DIR))
    }

    fn committed(&self) -> Result<Option<(u64, Seq)>, (PathBuf, String)> {
        match self.commit.committed()? {
            Some(c) => Ok(Some(c)),
            None => {
                let format =
                    unpanicked("reading the log's format", || self.db.get(META_FORMAT_KEY).map_err(|e| e.to_string()))
                        .map_err(|m| (self.path.join("db"), m))?;
                match format {
                    // Written before commit markers were kept: nothing to check the end against.
                    None => Ok(None),
                    Some(_) => Err((self.commit.path.clone(), "the commit marker is missing".to_string())),
                }
            }
        }
    }

    fn record_file(&self, id: u64, seq: Seq) -> PathBuf {
        if self.layout == Layout::Batched {
            // A record a batch names lives in the blob file; a missing one is sled's loss.
            return match unpanicked("reading a record batch", || self.batch_of(id, seq)) {
                Ok(Some(_)) => self.path.join(BLOB_FILE),
                _ => self.path.join("db"),
            };
        }
        // A record whose placeholder sled still has lives in the blob file; any other (a missing
        // one too: sled lost it) in sled's.
        let placeholder = unpanicked("reading a record", || {
            self.db.get(record_key(id, seq)).map(|v| v.is_some_and(|v| v.is_empty())).map_err(|e| e.to_string())
        });
        match placeholder {
            Ok(true) => self.path.join(BLOB_FILE),
            _ => self.path.join("db"),
        }
    }

    fn scan(&self, id: u64, f: RecordVisitor<'_>) -> Result<(), String> {
        if self.layout == Layout::Batched {
            return unpanicked("reading the records back", || {
                let mut window = Window::default();
                for kv in self.batches.scan_prefix(id.to_be_bytes()) {
                    let (k, v) = kv.map_err(|e| e.to_string())?;
                    let b = Batch::read(&k, &v)
                        .ok_or_else(|| format!("an entry of {} bytes among the record batches is not one", v.len()))?;
                    self.scan_batch(&b, &mut window, f)?;
                }
                // Appended and not yet flushed: what this process's own reader expects to see.
                let pending: Vec<Batch> = self
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter(|b| b.id == id)
                    .copied()
                    .collect();
                for b in &pending {
                    self.scan_batch(b, &mut window, f)?;
                }
                Ok(())
            });
        }
        unpanicked("reading the records back", || {
            for kv in self.db.scan_prefix(id.to_be_bytes()) {
                let (k, v) = kv.map_err(|e| e.to_string())?;
                if k.len() != 16 {
                    return Err(format!("unexpected key of {} bytes among the records", k.len()));
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&k[8..]);
                if v.is_empty() {
                    // A blob record (no record is empty: every one has its 8-byte header).
                    let pointer = self.pointers.get(&k).map_err(|e| e.to_string())?;
                    let bytes = pointer.map(|p| self.blob.read(&p)).unwrap_or_default();
                    f(Seq::from_be_bytes(seq), &bytes)?;
                } else {
                    f(Seq::from_be_bytes(seq), &v)?;
                }
            }
            Ok(())
        })
    }
}

/// The spill file of a sled log's objects, inside its directory ([`Bodies`]).
pub const SPILL_FILE: &str = "bodies.spill";

/// The spill file of a sled log's block plans, beside [`SPILL_FILE`] ([`Plans`]).
pub const PLANS_FILE: &str = "plans.spill";
/// The directory a sled log's archive entries and resource list are sorted in, inside its
/// directory ([`crate::sorted`]); empty but while they are made.
pub const SORT_DIR: &str = "sort";

impl EventLog<SledMedium> {
    /// Creates the sled log of backup `backup_name` in `dir`; fails if it already has records.
    pub fn create(dir: &Path, backup_name: &str) -> Result<EventLog<SledMedium>, LogError> {
        EventLog::create_on(SledMedium::open(dir)?, backup_name)
    }

    /// Opens an existing sled log and reads it whole, cutting a torn last record.
    pub fn open(dir: &Path) -> Result<(EventLog<SledMedium>, Vec<Event>, OpenReport), LogError> {
        let mut events = Vec::new();
        let (log, report) = EventLog::open_with(dir, |_, e| events.push(e.clone()))?;
        Ok((log, events, report))
    }

    /// Opens an existing sled log, giving `f` each event in order (one at a time), cutting a torn
    /// last record.
    pub fn open_with(dir: &Path, f: impl FnMut(Seq, &Event)) -> Result<(EventLog<SledMedium>, OpenReport), LogError> {
        // sled would create a missing database; a log that was never created is simply not there.
        if !dir.join("db").is_file() {
            return Err(LogError::NotFound(dir.to_path_buf()));
        }
        EventLog::open_with_on(SledMedium::open(dir)?, f)
    }
}

/// Calls `f` with each event of a backup's log, one at a time ([`scan_records`]: nothing held but
/// the current record, a torn tail left as it is). A log another process holds is
/// [`LogError::InUse`] after a short wait.
pub fn scan_events(dir: &Path, f: impl FnMut(Seq, Event)) -> Result<(), LogError> {
    if !dir.join("db").is_file() {
        return Err(LogError::NotFound(dir.to_path_buf()));
    }
    scan_records(&SledMedium::open_waiting(dir, READER_LOCK_WAIT)?, "backup", f)
}

/// Every event of a backup's log ([`scan_events`], collected): for small logs and tests.
pub fn read_events(dir: &Path) -> Result<Vec<Event>, LogError> {
    let mut events = Vec::new();
    scan_events(dir, |_, e| events.push(e))?;
    Ok(events)
}
/// The verified prefix of a log that cannot be opened whole (it is damaged): every record from the
/// first on while each is in sequence and its checksum holds. Reads only: nothing is cut. Empty
/// when not even the database opens. For deleting a damaged backup — its uid and the snapshots it
/// recorded before the damage — never for resuming one.
pub fn salvage(dir: &Path) -> Vec<Event> {
    if !dir.join("db").is_file() {
        return Vec::new();
    }
    let Ok(medium) = SledMedium::open_waiting(dir, READER_LOCK_WAIT) else { return Vec::new() };
    let Ok(Some(name)) = medium.read_name() else { return Vec::new() };
    let (mut events, mut stream) = (Vec::new(), RecordStream::new());
    // Up to the first record out of sequence or bad (the engine's checks, one at a time).
    let _ = medium.scan(backup_id(&String::from_utf8_lossy(&name)), &mut |seq, bytes| match stream
        .push::<Event>(seq, bytes)
    {
        Ok(Some(e)) => {
            events.push(e);
            Ok(())
        }
        _ => Err(String::new()),
    });
    events
}

#[cfg(test)]
mod tests {
    use blockwise_engine::grouping::BlockPlan;
    use blockwise_engine::hooks::{ExecHookSpec, Hook, HookPhase, OnError, ResourceHookSpec};
    use blockwise_engine::snapshot::{BackupOptions, MemberCut, PvVolume, SnapshotPlan};
    use blockwise_engine::{
        BackupSpec, BlockOutcome, HookOutcome, HookRef, ItemKey, ListUnit, Phase, ResourceType, Severity,
    };

    use super::*;

    /// Ends read back as pushed: across runs, past 4 GiB from a run's start (kept apart), and
    /// nothing for a number never pushed.
    #[test]
    fn spill_ends_read_back_as_pushed() {
        let mut ends = Ends::default();
        let mut want = Vec::new();
        let mut end = 0u64;
        for n in 0..(3 * ENDS_RUN as u64 + 7) {
            end += match n % 1000 {
                999 => 5 << 30,
                k => k * 3,
            };
            ends.push(end);
            want.push(end);
        }
        assert!(!ends.far.is_empty(), "some ends are 4 GiB past their run's start");
        assert_eq!(ends.len(), want.len() as u64);
        assert_eq!(ends.last(), end);
        for (n, w) in want.iter().enumerate() {
            assert_eq!(ends.get(n as u64), Some(*w), "end {n}");
        }
        assert_eq!(ends.get(want.len() as u64), None);
    }

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/events-v1.hex");

    fn pod(ns: &str, name: &str) -> ItemKey {
        ItemKey::namespaced("", "pods", ns, name)
    }

    fn hook_ref() -> HookRef {
        HookRef { pod: pod("ns1", "db-0"), phase: HookPhase::Pre, index: 1 }
    }

    fn unit() -> ListUnit {
        ListUnit {
            resource: blockwise_engine::GroupResource::new("apps", "deployments"),
            namespace: Some("ns1".into()),
        }
    }

    /// Position of a variant; exhaustive on purpose so a new variant fails to compile here until it
    /// gets a sample and a fixture line.
    fn variant_index(e: &Event) -> usize {
        match e {
            Event::BackupRequested { .. } => 0,
            Event::ResourcesDiscovered { .. } => 1,
            Event::ResourceListed { .. } => 2,
            Event::ListFailed { .. } => 3,
            Event::ItemsFetched { .. } => 4,
            Event::Diagnostic { .. } => 5,
            Event::BlockPlanned { .. } => 6,
            Event::PlanFinished { .. } => 7,
            Event::BlockStarted { .. } => 8,
            Event::HookStarted { .. } => 9,
            Event::HookFinished { .. } => 10,
            Event::ItemWritten { .. } => 11,
            Event::ItemFailed { .. } => 12,
            Event::BlockFinished { .. } => 13,
            Event::ArchiveFinalized { .. } => 14,
            Event::BackupFinished { .. } => 15,
            Event::RunStopped { .. } => 16,
            Event::RunResumed { .. } => 17,
            Event::FetchFailed { .. } => 18,
            Event::BackupRequestedWithOptions { .. } => 19,
            Event::VolumesInspected { .. } => 20,
            Event::SnapshotsPlanned { .. } => 21,
            Event::SnapshotRequested { .. } => 22,
            Event::SnapshotCut { .. } => 23,
            Event::SnapshotFailed { .. } => 24,
            Event::SnapshotReady { .. } => 25,
            Event::SnapshotReleased { .. } => 26,
        }
    }

    /// One deterministic instance of every variant, in declaration order.
    fn samples() -> Vec<Event> {
        let mut spec = BackupSpec::new("nightly");
        spec.included_namespaces = vec!["ns1".into(), "team-*".into()];
        spec.excluded_namespaces = vec!["kube-system".into()];
        spec.included_resources = vec!["pods".into(), "deployments.apps".into()];
        spec.excluded_resources = vec!["events".into()];
        spec.include_cluster_resources = Some(false);
        spec.label_selector = Some("app=db,tier in (a,b)".into());
        spec.ordered_resources = vec![("pods".into(), vec!["ns1/a".into(), "ns1/b".into()])];
        spec.hooks = vec![ResourceHookSpec {
            name: "freeze".into(),
            included_namespaces: vec!["ns1".into()],
            excluded_namespaces: vec![],
            label_selector: Some("app=db".into()),
            pre: vec![ExecHookSpec {
                container: "db".into(),
                command: vec!["/bin/fsfreeze".into(), "--freeze".into()],
                on_error: Some(OnError::Fail),
                timeout: Some("30s".into()),
            }],
            post: vec![ExecHookSpec {
                container: String::new(),
                command: vec!["/bin/fsfreeze".into(), "--unfreeze".into()],
                on_error: None,
                timeout: None,
            }],
        }];
        let hook = Hook {
            pod: pod("ns1", "db-0"),
            phase: HookPhase::Post,
            index: 0,
            container: "db".into(),
            command: vec!["sync".into()],
            on_error: OnError::Continue,
            timeout_ms: 30_000,
            invalid: Some("bad annotation".into()),
        };
        vec![
            Event::BackupRequested { spec, workers: 4, at_ms: 1_700_000_000_000 },
            Event::ResourcesDiscovered {
                resources: vec![
                    ResourceType::new("", "v1", "pods", "Pod", true),
                    ResourceType::new("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
                ],
            },
            Event::ResourceListed {
                unit: unit(),
                chunk: 2,
                objects: vec![r#"{"metadata":{"name":"web","namespace":"ns1"}}"#.into()],
                complete: true,
            },
            Event::ListFailed { unit: ListUnit { namespace: None, ..unit() }, error: "forbidden".into() },
            Event::ItemsFetched {
                items: vec![
                    (ItemKey::cluster("", "persistentvolumes", "pv-1"), Some(r#"{"kind":"PersistentVolume"}"#.into())),
                    (pod("ns1", "gone"), None),
                ],
            },
            Event::Diagnostic { severity: Severity::Warning, message: "block 3 has 1200 items".into() },
            Event::BlockPlanned {
                blocks: vec![std::sync::Arc::new(BlockPlan {
                    id: 7,
                    items: vec![pod("ns1", "db-0"), pod("ns1", "db-1")].into(),
                    hooks: vec![hook].into(),
                    bodies: Box::default(),
                })],
            },
            Event::PlanFinished { blocks: 8, items: 1234 },
            Event::BlockStarted { block: 7, attempt: 2, at_ms: 1_700_000_000_500 },
            Event::HookStarted { block: 7, attempt: 2, hook: hook_ref(), at_ms: 1_700_000_000_600 },
            Event::HookFinished {
                block: 7,
                attempt: 2,
                hook: hook_ref(),
                outcome: HookOutcome::Exited { code: 3, output: "frozen?".into() },
                at_ms: 1_700_000_000_700,
            },
            Event::ItemWritten { block: 7, attempt: 2, key: pod("ns1", "db-0"), digest: [0xab; 32], bytes: 4096 },
            Event::ItemFailed { block: 7, attempt: 2, key: pod("ns1", "db-1"), error: "disk full".into() },
            Event::BlockFinished {
                block: 7,
                attempt: 2,
                outcome: BlockOutcome::Failed { reason: Box::new("pre-hook failed".into()) },
                at_ms: 1_700_000_000_800,
            },
            Event::ArchiveFinalized { digest: [0x5a; 32], bytes: 1 << 20, items: 1234 },
            Event::BackupFinished { phase: Phase::PartiallyFailed, at_ms: 1_700_000_001_000 },
            Event::RunStopped {
                reason: "block 7: staging pods ns1/db-0 failed: store: cannot put s3://b/backups/x: 503".into(),
                at_ms: 1_700_000_002_000,
            },
            Event::RunResumed { at_ms: 1_700_000_003_000 },
            Event::FetchFailed {
                key: ItemKey::cluster("scheduling.k8s.io", "priorityclasses", "critical"),
                error: "get priorityclasses.scheduling.k8s.io critical: 403 Forbidden".into(),
            },
            Event::BackupRequestedWithOptions {
                spec: BackupSpec::new("nightly"),
                options: BackupOptions {
                    snapshot_volumes: Some(true),
                    csi_snapshot_timeout_ms: 600_000,
                    item_operation_timeout_ms: 14_400_000,
                    annotations: [(
                        "velero.io/csi-volumesnapshot-class_ebs.csi.aws.com".to_string(),
                        "fast".to_string(),
                    )]
                    .into_iter()
                    .collect(),
                    uid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
                },
                workers: 8,
                at_ms: 1_700_000_004_000,
            },
            Event::VolumesInspected {
                volumes: vec![
                    ("pv-1".into(), PvVolume::Csi { driver: "ebs.csi.aws.com".into(), handle: "vol-1".into() }),
                    ("pv-2".into(), PvVolume::NotCsi),
                    ("pv-3".into(), PvVolume::Missing),
                    ("pv-4".into(), PvVolume::Unreadable { error: "403".into() }),
                ],
                classes: vec![r#"{"driver":"ebs.csi.aws.com","metadata":{"name":"fast"}}"#.into()],
                group_classes: vec![],
                complete: true,
            },
            Event::SnapshotsPlanned {
                snapshots: vec![Arc::new(SnapshotPlan {
                    id: 0,
                    block: 7,
                    namespace: "ns1".into(),
                    name: "nightly-data-0123456789".into(),
                    claims: vec!["data".into(), "log".into()],
                    group: Some("db".into()),
                    driver: "ebs.csi.aws.com".into(),
                    class: "fast-group".into(),
                    labels: [("velero.io/backup-name".to_string(), "nightly".to_string())].into_iter().collect(),
                    blocked: Some("no class".into()),
                })],
            },
            Event::SnapshotRequested { id: 0, attempt: 2, at_ms: 1_700_000_005_000 },
            Event::SnapshotCut {
                id: 0,
                members: vec![MemberCut {
                    claim: "data".into(),
                    snapshot: "snapshot-ab".into(),
                    content: "snapcontent-ab".into(),
                    handle: "snap-1".into(),
                    driver: "ebs.csi.aws.com".into(),
                    restore_size: Some(10 << 30),
                    creation_time: Some("2026-01-01T00:00:00Z".into()),
                    snapshot_json: r#"{"kind":"VolumeSnapshot"}"#.into(),
                    content_json: r#"{"kind":"VolumeSnapshotContent"}"#.into(),
                }],
                group_handle: Some("group-1".into()),
                at_ms: 1_700_000_006_000,
            },
            Event::SnapshotFailed { id: 1, error: "no handle within 10m".into(), at_ms: 1_700_000_007_000 },
            Event::SnapshotReady { id: 0, error: Some("not ready within 4h".into()), at_ms: 1_700_000_008_000 },
            Event::SnapshotReleased { id: 0, kept: true, error: None, at_ms: 1_700_000_009_000 },
        ]
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        assert_eq!(s.len() & 1, 0, "odd hex length");
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn ev(i: u64) -> Event {
        Event::BlockStarted { block: i as u32, attempt: 0, at_ms: i * 10 }
    }

    /// A log of `n` records kept one sled entry per record, as logs were before batches.
    fn new_per_record_log(n: u64) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut medium = SledMedium::open(&dir).unwrap();
        medium.layout = Layout::PerRecord;
        let mut log = EventLog::create_on(medium, "b1").unwrap();
        for i in 0..n {
            log.append(i, &ev(i)).unwrap();
        }
        log.flush().unwrap();
        (tmp, dir)
    }

    fn new_log(n: u64) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let mut log = EventLog::create(&dir, "b1").unwrap();
        for i in 0..n {
            log.append(i, &ev(i)).unwrap();
        }
        log.flush().unwrap();
        (tmp, dir)
    }

    /// The log keeps every block plan it appends or reads back, by id, on disk as in memory: the
    /// plans the engine reads when their blocks start are the plans recorded, with the bodies a
    /// plan made by this process carries (a plan read back from the log has none); one that does
    /// not follow on is not kept, and asking for a plan the log does not have is an error naming
    /// it.
    #[test]
    fn the_log_gives_back_every_plan_it_carries() {
        let key = |n: u32| ItemKey::namespaced("", "configmaps", "ns", &format!("cm-{n}"));
        let plan = |id: u32| {
            let items: Vec<ItemKey> = (0..id % 3).map(|i| key(id * 10 + i)).collect();
            let bodies = (0..id % 3).map(|i| u64::from(id * 10 + i)).collect();
            Arc::new(BlockPlan { id, items: items.into(), hooks: Box::default(), bodies })
        };
        let events = [
            Event::BlockPlanned { blocks: (0..4).map(plan).collect() },
            ev(1),
            Event::BlockPlanned { blocks: (4..9).map(plan).collect() },
            // Out of order: not kept.
            Event::BlockPlanned { blocks: vec![plan(20)] },
        ];
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let check = |plans: &Plans, how: &str| {
            assert_eq!(plans.len(), 9, "{how}");
            let bodies_kept = how != "read back";
            for id in 0..9 {
                let got = plans.plan(id).unwrap();
                assert_eq!(got, plan(id), "{how}: block {id}");
                let want = if bodies_kept { plan(id).bodies.clone() } else { Box::default() };
                assert_eq!(got.bodies, want, "{how}: block {id}'s bodies");
            }
            let err = plans.plan(9).unwrap_err();
            assert!(err.contains("block 9"), "{how}: {err}");
        };
        {
            let mut log = EventLog::create(&dir, "b").unwrap();
            for (i, e) in events.iter().enumerate() {
                log.append(i as u64, e).unwrap();
            }
            log.flush().unwrap();
            check(&log.plans(), "appended");
        }
        let (log, _, _) = EventLog::open(&dir).unwrap();
        check(&log.plans(), "read back");
        assert!(dir.join(PLANS_FILE).exists());
        let memory = Plans::new(None).unwrap();
        for e in &events {
            memory.add(e).unwrap();
        }
        check(&memory, "in memory");
    }

    #[test]
    fn append_flush_reopen_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        {
            let mut log = EventLog::create(&dir, "nightly").unwrap();
            assert_eq!((log.next_seq(), log.durable_seq(), log.name()), (0, None, "nightly"));
            for (i, e) in samples().iter().enumerate() {
                log.append(i as u64, e).unwrap();
            }
            assert_eq!(log.durable_seq(), None);
            log.flush().unwrap();
            assert_eq!(log.durable_seq(), Some(26));
            assert_eq!(log.next_seq(), 27);
        }
        let (mut log, events, report) = EventLog::open(&dir).unwrap();
        assert_eq!(events, samples());
        assert_eq!(report, OpenReport { events: 27, cut_tail: None });
        assert_eq!((log.name(), log.next_seq(), log.durable_seq()), ("nightly", 27, Some(26)));
        log.append(27, &ev(27)).unwrap();
        log.flush().unwrap();
        drop(log);
        assert_eq!(read_events(&dir).unwrap().len(), 28);
    }

    #[test]
    fn a_log_is_held_while_a_process_has_it_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        assert!(!held(&dir), "no log is not held");
        let log = EventLog::create(&dir, "nightly").unwrap();
        // sled's lock is per open file: the probe's own descriptor meets it, as another process's.
        assert!(held(&dir));
        drop(log);
    }

    /// A listed page big enough to be a blob record.
    fn big_page(i: u64) -> Event {
        let o =
            format!("{{\"metadata\":{{\"name\":\"cm-{i}\",\"namespace\":\"ns\"}},\"data\":\"{}\"}}", "x".repeat(700));
        Event::ResourceListed {
            unit: ListUnit { resource: blockwise_engine::GroupResource::new("", "configmaps"), namespace: None },
            chunk: i as u32,
            objects: vec![o; 40],
            complete: false,
        }
    }

    #[test]
    fn records_live_in_the_blob_file_in_one_batch_per_flush_and_read_back_through_reopen_and_a_torn_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let events: Vec<Event> = (0..4).map(|i| if i % 2 == 0 { big_page(i) } else { ev(i) }).collect();
        let bytes: usize = events.iter().map(|e| encode_record(e).len()).sum();
        {
            let mut log = EventLog::create(&dir, "b1").unwrap();
            assert_eq!(log.medium().layout(), Layout::Batched);
            for (i, e) in events.iter().enumerate() {
                log.append(i as u64, e).unwrap();
            }
            log.flush().unwrap();
            // sled holds one batch, not the records.
            let batches: Vec<_> = log.medium().batches.iter().map(Result::unwrap).collect();
            assert_eq!(batches.len(), 1);
            let b = Batch::read(&batches[0].0, &batches[0].1).unwrap();
            assert_eq!((b.first, b.count, b.bytes), (0, 4, bytes as u64));
            assert!(log.medium().db.scan_prefix(backup_id("b1").to_be_bytes()).next().is_none());
            assert_eq!(std::fs::metadata(dir.join(BLOB_FILE)).unwrap().len(), bytes as u64);
        }
        let (mut log, back, report) = EventLog::open(&dir).unwrap();
        assert_eq!(back, events);
        assert_eq!(report.cut_tail, None);
        // Appended and never flushed: gone with the process, not torn.
        log.append(4, &big_page(4)).unwrap();
        drop(log);
        let (mut log, back, report) = EventLog::open(&dir).unwrap();
        assert_eq!((back.len(), report.cut_tail), (4, None));
        // A record sled names but whose bytes were torn, past the committed count: a torn tail,
        // cut, and the log stays appendable.
        log.append(4, &big_page(4)).unwrap();
        log.medium().flush_unmarked();
        drop(log);
        let truncate_blob = || {
            let blob = std::fs::OpenOptions::new().write(true).open(dir.join(BLOB_FILE)).unwrap();
            let len = blob.metadata().unwrap().len();
            blob.set_len(len - 10).unwrap();
        };
        truncate_blob();
        let (mut log, back, report) = EventLog::open(&dir).unwrap();
        assert_eq!(back, events);
        assert_eq!(report.cut_tail.as_ref().map(|c| c.0), Some(4), "{report:?}");
        log.append(4, &big_page(4)).unwrap();
        log.append(5, &ev(5)).unwrap();
        log.flush().unwrap();
        drop(log);
        let (_, back, _) = EventLog::open(&dir).unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!((&back[4], &back[5]), (&big_page(4), &ev(5)));
        // The same cut once the record was committed: damage naming the blob file and the record.
        truncate_blob();
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(&e, LogError::Damaged { seq: Some(5), file, .. } if file.ends_with(BLOB_FILE)), "{e}");
    }

    #[test]
    fn a_log_kept_per_record_reads_back_and_appends_as_it_was() {
        let (_tmp, dir) = new_per_record_log(3);
        let (mut log, events, _) = EventLog::open(&dir).unwrap();
        assert_eq!(log.medium().layout(), Layout::PerRecord);
        assert_eq!(events, (0..3).map(ev).collect::<Vec<_>>());
        log.append(3, &big_page(3)).unwrap();
        log.flush().unwrap();
        // sled holds a pointer for the big one, the small ones themselves.
        let placeholder = log.medium().db.get(record_key(backup_id("b1"), 3)).unwrap().unwrap();
        assert!(placeholder.is_empty());
        assert_eq!(
            log.medium().db.get(record_key(backup_id("b1"), 0)).unwrap().unwrap().to_vec(),
            encode_record(&ev(0))
        );
        drop(log);
        let (log, events, _) = EventLog::open(&dir).unwrap();
        assert_eq!((log.medium().layout(), events.len()), (Layout::PerRecord, 4));
        assert_eq!(events[3], big_page(3));
    }

    #[test]
    fn create_refuses_an_existing_log() {
        let (_tmp, dir) = new_log(2);
        let e = EventLog::create(&dir, "b1").unwrap_err();
        assert!(matches!(e, LogError::AlreadyExists { records: 2, .. }), "{e}");
        assert!(e.to_string().contains("already exists with 2 records"), "{e}");
        let e = EventLog::create(&dir, "other").unwrap_err();
        assert!(matches!(e, LogError::WrongBackup { .. }), "{e}");
    }

    #[test]
    fn missing_log_is_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nope");
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(e, LogError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(!dir.exists(), "open must not create the log");
    }

    #[test]
    fn second_opener_is_told_the_log_is_in_use() {
        let (_tmp, dir) = new_log(1);
        let (_log, _, _) = EventLog::open(&dir).unwrap();
        let e = EventLog::open(&dir).unwrap_err();
        assert!(e.to_string().contains("is in use by another blockwise process"), "{e}");
    }

    #[test]
    fn out_of_order_append_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = EventLog::create(&tmp.path().join("log"), "b1").unwrap();
        log.append(0, &ev(0)).unwrap();
        let e = log.append(2, &ev(2)).unwrap_err();
        assert!(matches!(e, LogError::OutOfOrder { expected: 1, got: 2, .. }), "{e}");
        let e = log.append(0, &ev(0)).unwrap_err();
        assert!(e.to_string().contains("record 0 out of order: the next record must be 1"), "{e}");
        log.append(1, &ev(1)).unwrap();
    }

    #[test]
    fn torn_tail_is_cut_and_the_log_stays_appendable() {
        let (_tmp, dir) = new_log(5);
        {
            let (mut log, _, _) = EventLog::open(&dir).unwrap();
            let rec = encode_record(&ev(5));
            log.put_raw(5, &rec[..rec.len() - 3]).unwrap();
            log.medium().flush_unmarked();
        }
        let (mut log, events, report) = EventLog::open(&dir).unwrap();
        assert_eq!(events.len(), 5);
        let (seq, reason) = report.cut_tail.clone().unwrap();
        assert_eq!(seq, 5);
        assert!(reason.contains("truncated"), "{reason}");
        assert_eq!(log.next_seq(), 5);
        log.append(5, &ev(5)).unwrap();
        log.flush().unwrap();
        drop(log);
        let (_, events, report) = EventLog::open(&dir).unwrap();
        assert_eq!(events, (0..6).map(ev).collect::<Vec<_>>());
        assert_eq!(report.cut_tail, None);
    }

    #[test]
    fn a_flipped_byte_in_the_last_record_is_a_torn_tail_only_past_the_committed_count() {
        // Record 4 appended and never flushed: a torn tail, cut.
        let (_tmp, dir) = new_log(4);
        {
            let (mut log, _, _) = EventLog::open(&dir).unwrap();
            let mut rec = encode_record(&ev(4));
            let last = rec.len() - 1;
            rec[last] ^= 0x40;
            log.put_raw(4, &rec).unwrap();
            log.medium().flush_unmarked();
        }
        let (log, events, report) = EventLog::open(&dir).unwrap();
        assert_eq!(events.len(), 4);
        let (seq, reason) = report.cut_tail.unwrap();
        assert_eq!(seq, 4);
        assert!(reason.contains("checksum mismatch"), "{reason}");
        assert_eq!(log.next_seq(), 4);
        drop(log);
        // Record 3 was committed by a flush: the same flip there is damage, named.
        {
            let (mut log, _, _) = EventLog::open(&dir).unwrap();
            let mut rec = encode_record(&ev(3));
            let last = rec.len() - 1;
            rec[last] ^= 0x40;
            log.put_raw(3, &rec).unwrap();
        }
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(e, LogError::Damaged { seq: Some(3), .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("backup \"b1\" is damaged: ") && msg.contains("records.blob, record 3: "), "{msg}");
        assert!(msg.contains("committed"), "{msg}");
    }

    #[test]
    fn flipped_byte_in_middle_record_names_the_seq() {
        let (_tmp, dir) = new_log(30);
        {
            let (mut log, _, _) = EventLog::open(&dir).unwrap();
            let mut rec = encode_record(&ev(17));
            rec[10] ^= 1;
            log.put_raw(17, &rec).unwrap();
        }
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(e, LogError::Damaged { seq: Some(17), .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("record 17: record checksum mismatch"), "{msg}");
        // Opening again gives the same answer: nothing was cut.
        assert!(matches!(read_events(&dir).unwrap_err(), LogError::Damaged { seq: Some(17), .. }));
    }

    #[test]
    fn seq_gap_is_an_error() {
        let (_tmp, dir) = new_log(3);
        {
            let (mut log, _, _) = EventLog::open(&dir).unwrap();
            log.put_raw(4, &encode_record(&ev(4))).unwrap();
            log.medium().flush_unmarked();
        }
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(e, LogError::Damaged { seq: Some(3), .. }), "{e}");
        assert!(e.to_string().contains("record 3 is missing; the next record present is 4"), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        let (_tmp, dir) = new_log(1);
        {
            let (mut log, _, _) = EventLog::open(&dir).unwrap();
            for (i, junk) in [&b""[..], &[0xff; 3], &[1, 0, 0, 0, 0, 0, 0, 0], &[0xff; 64]].iter().enumerate() {
                log.put_raw(1 + i as u64, junk).unwrap();
            }
            log.medium().flush_unmarked();
        }
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(e, LogError::Damaged { seq: Some(1), .. }), "{e}");
    }

    /// Removes records `from..` behind the log's back, as sled does when it recovers a prefix of a
    /// damaged database: its entries, the commit marker left as it was.
    fn cut_in_sled(dir: &Path, from: Seq) {
        let mut medium = SledMedium::open(dir).unwrap();
        let id = backup_id("b1");
        match medium.layout {
            Layout::Batched => medium.cut_batches(id, from).unwrap(),
            Layout::PerRecord => {
                let keys: Vec<_> = medium.db.scan_prefix(id.to_be_bytes()).keys().map(Result::unwrap).collect();
                for k in keys.iter().skip(from as usize) {
                    medium.db.remove(k).unwrap();
                }
            }
        }
        medium.db.flush().unwrap();
    }

    #[test]
    fn a_log_cut_short_is_damage_naming_the_first_missing_record_never_a_shorter_log() {
        let (_tmp, dir) = new_log(12);
        cut_in_sled(&dir, 7);
        for e in [EventLog::open(&dir).unwrap_err(), read_events(&dir).unwrap_err()] {
            assert!(matches!(e, LogError::Damaged { seq: Some(7), .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("cut short") && msg.contains("12 were committed"), "{msg}");
        }
        // Every record gone, the name kept: still damage, not an empty log.
        cut_in_sled(&dir, 0);
        assert!(matches!(EventLog::open(&dir).unwrap_err(), LogError::Damaged { seq: Some(0), .. }));
    }

    #[test]
    fn the_commit_marker_survives_a_torn_slot_and_its_loss_is_named() {
        let (_tmp, dir) = new_log(6);
        let marker = dir.join(COMMIT_FILE);
        let good = std::fs::read(&marker).unwrap();
        assert_eq!(good.len(), 2 * COMMIT_SLOT_BYTES);
        // Spoil the newest slot (a write torn by a crash): the other one holds an older count.
        for slot in 0..2 {
            let mut bytes = good.clone();
            bytes[slot * COMMIT_SLOT_BYTES + 20] ^= 0xff;
            std::fs::write(&marker, &bytes).unwrap();
            let (_, events, _) = EventLog::open(&dir).unwrap();
            assert_eq!(events.len(), 6);
        }
        // Both slots spoiled, or the file gone: damage naming the marker file.
        let mut bytes = good.clone();
        bytes[4] ^= 1;
        bytes[COMMIT_SLOT_BYTES + 4] ^= 1;
        std::fs::write(&marker, &bytes).unwrap();
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(&e, LogError::Damaged { file, seq: None, .. } if file == &marker), "{e}");
        std::fs::remove_file(&marker).unwrap();
        let e = EventLog::open(&dir).unwrap_err();
        assert!(e.to_string().contains("the commit marker is missing"), "{e}");
    }

    #[test]
    fn a_spoiled_marker_slot_does_not_let_a_log_that_lost_its_last_batch_pass_as_whole() {
        // Two commits: the second one's records lost by sled, and a marker slot spoiled.
        let (_tmp, dir) = new_log(6);
        {
            let (mut log, _, _) = EventLog::open(&dir).unwrap();
            for i in 6..10 {
                log.append(i, &ev(i)).unwrap();
            }
            log.flush().unwrap();
        }
        cut_in_sled(&dir, 6);
        let marker = dir.join(COMMIT_FILE);
        let good = std::fs::read(&marker).unwrap();
        for slot in 0..2 {
            let mut bytes = good.clone();
            bytes[slot * COMMIT_SLOT_BYTES + 20] ^= 0xff;
            std::fs::write(&marker, &bytes).unwrap();
            let e = EventLog::open(&dir).unwrap_err();
            assert!(matches!(e, LogError::Damaged { seq: Some(6), .. }), "slot {slot}: {e}");
        }
    }

    #[test]
    fn a_log_written_before_markers_were_kept_opens_and_gets_one_at_its_next_flush() {
        let (_tmp, dir) = new_per_record_log(3);
        {
            let medium = SledMedium::open(&dir).unwrap();
            medium.db.remove(META_FORMAT_KEY).unwrap();
            medium.db.flush().unwrap();
        }
        std::fs::remove_file(dir.join(COMMIT_FILE)).unwrap();
        let (mut log, events, _) = EventLog::open(&dir).unwrap();
        assert_eq!(events.len(), 3);
        log.append(3, &ev(3)).unwrap();
        log.flush().unwrap();
        drop(log);
        cut_in_sled(&dir, 2);
        let e = EventLog::open(&dir).unwrap_err();
        assert!(matches!(e, LogError::Damaged { seq: Some(2), .. }), "{e}");
    }

    #[test]
    fn a_creation_that_never_finished_is_not_found_not_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        {
            // The marker is written, the process dies before the name is flushed.
            let medium = SledMedium::open(&dir).unwrap();
            medium.commit.create(backup_id("b1")).unwrap();
        }
        assert!(matches!(EventLog::open(&dir).unwrap_err(), LogError::NotFound(_)));
        let mut log = EventLog::create(&dir, "b1").unwrap();
        log.append(0, &ev(0)).unwrap();
        log.flush().unwrap();
        drop(log);
        assert_eq!(EventLog::open(&dir).unwrap().1.len(), 1);
    }

    #[test]
    fn golden_fixtures_decode_for_every_variant() {
        let samples = samples();
        let indices: Vec<usize> = samples.iter().map(variant_index).collect();
        assert_eq!(indices, (0..27).collect::<Vec<_>>(), "samples must cover every variant in order");

        let bless = std::env::var("BLOCKWISE_BLESS").is_ok_and(|v| v == "1");
        let text = match std::fs::read_to_string(FIXTURE) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && bless => String::new(),
            Err(e) => panic!("cannot read {FIXTURE}: {e} (generate it once with BLOCKWISE_BLESS=1)"),
        };
        let mut fixtures: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (kind, hexed) = line.split_once(' ').unwrap_or_else(|| panic!("bad fixture line {line:?}"));
            fixtures.insert(kind.to_string(), unhex(hexed.trim()));
        }
        let mut missing = Vec::new();
        for event in &samples {
            let encoded = encode_record(event);
            match fixtures.get(event.kind()) {
                Some(golden) => {
                    assert_eq!(
                        blockwise_engine::event::decode_record(golden).as_ref(),
                        Ok(event),
                        "{} fixture no longer decodes to its sample: old logs would become unreadable",
                        event.kind()
                    );
                    assert_eq!(hex(golden), hex(&encoded), "{} encodes differently from its fixture", event.kind());
                }
                None => missing.push(format!("{} {}\n", event.kind(), hex(&encoded))),
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(bless, "{FIXTURE} lacks fixtures for {} variants; run once with BLOCKWISE_BLESS=1", missing.len());
        // Blessing only ever appends: existing lines pin the format of old logs.
        let mut out = text;
        if out.is_empty() {
            out.push_str(
                "# Golden record bytes of every Event variant (record format version 1). Never edit a line.\n",
            );
        }
        out.extend(missing);
        std::fs::create_dir_all(Path::new(FIXTURE).parent().unwrap()).unwrap();
        std::fs::write(FIXTURE, out).unwrap();
    }

    #[test]
    fn an_interrupted_sled_snapshot_does_not_make_the_log_unreadable() {
        // sled 0.34.7 leaves `snap.<lsn>.generating` behind when killed while writing a snapshot
        // and then refuses every later open ("Read corrupted data at file offset None").
        let (_tmp, dir) = new_log(40);
        std::fs::write(dir.join("snap.00000000000FFFFF.generating"), b"").unwrap();
        std::fs::write(dir.join("snap.0000000000FFFFFF.generating"), b"partial").unwrap();
        let (mut log, events, report) = EventLog::open(&dir).unwrap();
        assert_eq!(events, (0..40).map(ev).collect::<Vec<_>>());
        assert_eq!(report.cut_tail, None);
        log.append(40, &ev(40)).unwrap();
        log.flush().unwrap();
        drop(log);
        assert_eq!(read_events(&dir).unwrap().len(), 41);
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".generating"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn backup_id_is_fnv1a() {
        assert_eq!(backup_id(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(backup_id("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
