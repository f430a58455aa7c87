//! Stores: where staged items, the Velero-layout archive and its companion files go (DESIGN §6).
//!
//! [`Store`] is the port the driver writes through; [`LocalStore`] implements it on a directory
//! tree, a [`StoreMedium`]: a real directory ([`FsMedium`], the default) or the simulator's
//! in-memory one, so the simulator runs this same store code. Items are staged as records of an
//! append-only pack, one per process and backup (`backups/<backup>/staging/<writer>.pack`, see
//! [`crate::pack`]), each record named by the item's archive path and made durable in bulk by
//! [`Store::sync_staged`] (one `fdatasync` per pack), so a retried or resumed block simply appends
//! them again. Blocking file-system calls run on the runtime's blocking pool, never on a
//! worker thread. [`Store::finalize`] then builds
//! `backups/<backup>/<backup>.tar.gz` from the newest staged copy of each item whose bytes match
//! the digest the log recorded (an item an earlier version staged as a file of its own,
//! `staging/<archive path>`, is read from there), with every tar entry sorted by path and every piece of metadata fixed (mtime 0,
//! uid/gid 0, mode 0644, GNU headers, gzip mtime 0 and no file name, one compression level): the
//! same items give a byte-identical archive whatever the worker count or crash/resume history.
//! Items it finds missing or changed are reported together ([`StoreError::Unstaged`]) so the
//! engine can stage them again from the log.
//! Every backup name and key component is checked with [`is_safe_name`] so nothing escapes the
//! store root.
//!
//! The archive bytes come from one place, [`write_archive`] over [`ArchiveEntries::tar_items`], whichever store
//! holds the staged items (the S3 store in [`crate::s3`] uses it too), and the gzip companion files
//! use [`gzip_reproducible`]. [`RetryingStore`] wraps any store with bounded retries of transient
//! failures; what still fails is an error naming the key, which stops the run (the engine records
//! `RunStopped`) so `resume` can finish once the store is back.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use blockwise_engine::item::is_safe_name;
use blockwise_engine::state::ArchiveInfo;
use blockwise_engine::ItemKey;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::entry_runs::{ArchiveEntries, Item, TarItem};
use crate::pack::PackIndex;
use crate::world::{offload, BoxFuture, Runtime, TokioRuntime};

/// Path of the format version file inside the archive.
pub const VERSION_PATH: &str = "metadata/version";
/// Velero's backup format version.
pub const FORMAT_VERSION: &str = "1.1.0";
/// The bytes of `metadata/version`: the format version and a newline, as Velero writes it.
pub const VERSION_FILE_BYTES: &[u8] = b"1.1.0\n";
/// The gzip level of every archive; fixed so the bytes are reproducible.
const GZIP_LEVEL: u32 = 6;
/// Bytes of the tar stream compressed as one gzip member of the archive. Fixed, so the archive's
/// bytes do not depend on how many threads compress it.
pub const GZIP_MEMBER_BYTES: usize = 1 << 20;
/// Distinguishes concurrent temp files of one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A backup or file name that is not one safe path component.
    #[error("store: {what} {value:?} is not allowed: names must be one path component without '/', '\\' or control characters, and not '.' or '..'")]
    UnsafeName { what: &'static str, value: String },
    /// An item key with a component that is not a safe path component.
    #[error("store: item {key}: {field} {value:?} is not a safe path component (it could escape the store directory)")]
    UnsafeKey { key: String, field: &'static str, value: String },
    /// `finalize` was given an item that was never staged.
    #[error("store: item {key} is not staged: {} is missing", .path.display())]
    NotStaged { key: String, path: PathBuf },
    /// A staged file does not hold the bytes the log recorded.
    #[error("store: item {key}: staged bytes have sha256 {actual}, but the log recorded {expected}")]
    DigestMismatch { key: String, expected: String, actual: String },
    /// Two entries map to the same archive path with different contents.
    #[error("store: archive path {path} is claimed by both item {first} and item {second}")]
    DuplicatePath { path: String, first: String, second: String },
    /// The file system failed.
    #[error("store: cannot {op} {}: {source}", .path.display())]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// The object store failed (after its own HTTP-level retries).
    #[error("store: cannot {op} {key}: {source}")]
    Remote { op: &'static str, key: String, source: object_store::Error },
    /// A fault injected on purpose (tests; see [`crate::faults`]).
    #[error("store: cannot {op} {key}: injected fault")]
    Injected { op: &'static str, key: String },
    /// A transient failure persisted through every attempt of [`RetryingStore`].
    #[error("{last} (gave up after {attempts} attempts)")]
    GaveUp { attempts: u32, last: Box<StoreError> },
    /// A storage location that cannot be used (`--storage`).
    #[error("storage {location:?}: {reason}")]
    BadLocation { location: String, reason: String },
    /// Building the archive found staged items missing or different from their logged digest.
    #[error("{} staged items are missing or changed; the first: {first}", .keys.len())]
    Unstaged { keys: Vec<ItemKey>, first: Box<StoreError> },
}

impl StoreError {
    /// Whether trying again may succeed: I/O and network failures, not bad names or digests.
    pub fn is_transient(&self) -> bool {
        use object_store::Error as E;
        match self {
            StoreError::Io { .. } | StoreError::Injected { .. } => true,
            StoreError::Remote { source, .. } => !matches!(
                source,
                E::NotFound { .. }
                    | E::InvalidPath { .. }
                    | E::NotSupported { .. }
                    | E::NotImplemented { .. }
                    | E::PermissionDenied { .. }
                    | E::Unauthenticated { .. }
                    | E::UnknownConfigurationKey { .. }
            ),
            _ => false,
        }
    }
}

/// Where a backup's items, archive and files are kept.
#[async_trait]
pub trait Store: Send + Sync {
    /// Stages one item under its deterministic key; idempotent.
    async fn put_item(&self, backup: &str, key: &ItemKey, bytes: &[u8]) -> Result<(), StoreError>;

    /// Makes every item staged so far durable. The runtime calls it before a log flush that makes
    /// `ItemWritten` facts durable, so a fact never outlives its item (one barrier per flush
    /// instead of an fsync per item). Default: nothing to do (acknowledged puts are durable).
    async fn sync_staged(&self, backup: &str) -> Result<(), StoreError> {
        let _ = backup;
        Ok(())
    }

    /// Builds the backup's `.tar.gz` from the staged items, checking their digests.
    /// (`entries` shared: the blocking task that builds the archive holds them, and a retry reads
    /// them again.)
    async fn finalize(&self, backup: &str, entries: Arc<ArchiveEntries>) -> Result<ArchiveInfo, StoreError>;

    /// Stores a file beside the archive (`velero-backup.json`, …); `name` is one path component.
    /// (`bytes` shared, not copied: the blocking task that writes it holds them, and a retry sends
    /// them again.)
    async fn put_file(&self, backup: &str, name: &str, bytes: Bytes) -> Result<(), StoreError>;

    /// Reads a file stored beside the archive; `None` when it does not exist.
    async fn get_file(&self, backup: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Copies a file stored beside the archive (the archive itself too) to the local path `dest`,
    /// atomically; `false` when it does not exist.
    async fn download_file(&self, backup: &str, name: &str, dest: &Path) -> Result<bool, StoreError> {
        match self.get_file(backup, name).await? {
            Some(bytes) => write_atomic(dest, &bytes).map(|()| true),
            None => Ok(false),
        }
    }

    /// A human description, e.g. `local directory /x/store`.
    fn describe(&self) -> String;

    /// Where the backup's archive is, for messages.
    fn archive_location(&self, backup: &str) -> String {
        format!("backups/{backup}/{backup}.tar.gz in {}", self.describe())
    }
}
/// Where a [`LocalStore`] keeps its files: a directory tree, addressed by paths relative to the
/// store's root. Writes replace a file atomically (a reader sees the old bytes or the new ones) and
/// durably; staged items are appended to packs, which survive a crash only once a later
/// [`StoreMedium::sync_tree`] of a directory above them returned. [`FsMedium`] is a real
/// directory; the simulator's in-memory medium loses unsynced appends when the simulated process
/// dies. Both run the same [`LocalStore`] code.
pub trait StoreMedium: Clone + Send + Sync + 'static {
    /// A human description, e.g. `local directory /x/store`.
    fn describe(&self) -> String;
    /// Where `path` is, for messages (an absolute path for a real directory).
    fn location(&self, path: &Path) -> PathBuf;
    /// Replaces `path` with `bytes` atomically and durably.
    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError>;
    /// Replaces `path` with what `fill` writes, atomically and durably; nothing is left behind
    /// when `fill` fails.
    fn write_with(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn Write) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// The bytes of `path`, `None` when it does not exist.
    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, StoreError>;
    /// Makes every append below `dir` durable (one barrier for many appends).
    fn sync_tree(&self, dir: &Path) -> Result<(), StoreError>;
    /// Appends the staging record of `name` with `body` ([`crate::pack::record`]) to this medium's
    /// own pack in `dir`, started on first use (a medium never appends to a pack it did not
    /// start): visible at once, durable once a later [`StoreMedium::sync_tree`] above it returned.
    fn append_staged(&self, dir: &Path, name: &str, body: &[u8]) -> Result<(), StoreError>;
    /// The packs in `dir` (files named `*.pack`), oldest first; none when `dir` does not exist.
    fn packs(&self, dir: &Path) -> Result<Vec<PathBuf>, StoreError>;
    /// Up to `len` bytes of `path` from `offset`: fewer at its end, none past it or when it does
    /// not exist.
    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StoreError>;
    /// Copies `path` to the local file `dest`, atomically and durably; `false` when `path` does not
    /// exist.
    fn copy_out(&self, path: &Path, dest: &Path) -> Result<bool, StoreError> {
        match self.read(path)? {
            Some(bytes) => write_atomic(dest, &bytes).map(|()| true),
            None => Ok(false),
        }
    }
    /// A directory of the machine's file system at `path` for scratch files (the archive build's
    /// sorted runs), `None` when the medium has none (they are kept in memory).
    fn scratch_dir(&self, path: &Path) -> Option<PathBuf> {
        let _ = path;
        None
    }
    /// Runs blocking medium work where it cannot stall other work.
    fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> BoxFuture<T>;
}

/// A real directory as a [`StoreMedium`]: blocking calls run on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct FsMedium {
    root: PathBuf,
    /// The packs this medium started, by directory (absolute).
    packs: Arc<Mutex<BTreeMap<PathBuf, Arc<OpenPack>>>>,
    /// Files recently read with [`StoreMedium::read_at`], kept open (at most [`READERS_MAX`]).
    readers: Arc<Mutex<BTreeMap<PathBuf, Arc<File>>>>,
}

/// Files an [`FsMedium`] keeps open for reading at once.
const READERS_MAX: usize = 16;

/// A pack this medium appends to.
#[derive(Debug)]
struct OpenPack {
    file: File,
    path: PathBuf,
    /// Held while appending, so one record's bytes are never interleaved with another's; a
    /// barrier syncs the file without it.
    append: Mutex<()>,
}

impl FsMedium {
    /// The directory `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> FsMedium {
        FsMedium { root: root.into(), packs: Arc::default(), readers: Arc::default() }
    }

    /// An open handle on the absolute `path` for reading: its own pack, a cached one, or a new
    /// one; `None` when it does not exist.
    fn reader(&self, path: &Path) -> Result<Option<Arc<File>>, StoreError> {
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = readers.get(path) {
            return Ok(Some(f.clone()));
        }
        let file = match File::open(path) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        if readers.len() >= READERS_MAX {
            readers.clear();
        }
        readers.insert(path.to_path_buf(), file.clone());
        Ok(Some(file))
    }

    /// This medium's pack in the absolute directory `dir`, created (and its directory entry made
    /// durable) on first use. Its name sorts by creation time: `<ns since epoch>-<pid>-<n>.pack`.
    fn pack(&self, dir: &Path) -> Result<Arc<OpenPack>, StoreError> {
        let mut packs = self.packs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = packs.get(dir) {
            return Ok(p.clone());
        }
        create_dirs(dir)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{nanos:024}-{}-{n}{}", std::process::id(), crate::pack::PACK_SUFFIX));
        let file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        sync_dir(dir)?;
        let p = Arc::new(OpenPack { file, path, append: Mutex::new(()) });
        packs.insert(dir.to_path_buf(), p.clone());
        Ok(p)
    }
}

impl StoreMedium for FsMedium {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    fn scratch_dir(&self, path: &Path) -> Option<PathBuf> {
        Some(self.root.join(path))
    }

    fn location(&self, path: &Path) -> PathBuf {
        self.root.join(path)
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.root.join(path), bytes)
    }

    fn write_with(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn Write) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let path = self.root.join(path);
        let dir = parent_dir(&path);
        create_dirs(dir)?;
        let tmp = temp_path(dir);
        let written = (|| {
            let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
            let mut buf = BufWriter::new(file);
            fill(&mut buf)?;
            let file = buf.into_inner().map_err(|e| io_err("write", &tmp)(e.into_error()))?;
            file.sync_all().map_err(io_err("sync", &tmp))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        commit(&tmp, &path)
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.root.join(path);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    fn sync_tree(&self, dir: &Path) -> Result<(), StoreError> {
        let dir = self.root.join(dir);
        let packs: Vec<Arc<OpenPack>> = {
            let packs = self.packs.lock().unwrap_or_else(PoisonError::into_inner);
            packs.iter().filter(|(d, _)| d.starts_with(&dir)).map(|(_, p)| p.clone()).collect()
        };
        for p in packs {
            p.file.sync_data().map_err(io_err("sync", &p.path))?;
        }
        Ok(())
    }

    fn append_staged(&self, dir: &Path, name: &str, body: &[u8]) -> Result<(), StoreError> {
        let record = crate::pack::record(name, body)?;
        let pack = self.pack(&self.root.join(dir))?;
        let _held = pack.append.lock().unwrap_or_else(PoisonError::into_inner);
        (&pack.file).write_all(&record).map_err(io_err("append to", &pack.path))
    }

    fn packs(&self, dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
        let abs = self.root.join(dir);
        let entries = match fs::read_dir(&abs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &abs)(e)),
        };
        let mut names = Vec::new();
        for e in entries {
            let name = e.map_err(io_err("list", &abs))?.file_name().to_string_lossy().into_owned();
            if name.ends_with(crate::pack::PACK_SUFFIX) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names.into_iter().map(|n| dir.join(n)).collect())
    }

    fn read_at(&self, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.root.join(path);
        let Some(file) = self.reader(&path)? else { return Ok(Vec::new()) };
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", &path)(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Streams the file, so a large archive is never held in memory.
    fn copy_out(&self, path: &Path, dest: &Path) -> Result<bool, StoreError> {
        let path = self.root.join(path);
        let mut src = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let dir = parent_dir(dest);
        create_dirs(dir)?;
        let tmp = temp_path(dir);
        let copied = File::create(&tmp).and_then(|mut f| {
            io::copy(&mut src, &mut f)?;
            f.sync_all()
        });
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("copy to", dest)(e));
        }
        commit(&tmp, dest).map(|()| true)
    }

    fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> BoxFuture<T> {
        Box::pin(async move { offload(&TokioRuntime, job).await })
    }
}

/// A store on a directory tree ([`FsMedium`] by default): see the module docs.
#[derive(Debug, Clone)]
pub struct LocalStore<M: StoreMedium = FsMedium> {
    medium: M,
}

/// The relative path of a backup's directory.
fn backup_rel(backup: &str) -> Result<PathBuf, StoreError> {
    check_name("backup name", backup)?;
    Ok(Path::new("backups").join(backup))
}

/// Where in a backup's staging directory the archive build sorts the staged records.
const SORT_DIR: &str = ".sort";

/// The relative path of a backup's staging directory (its packs).
fn staging_rel(backup: &str) -> Result<PathBuf, StoreError> {
    Ok(backup_rel(backup)?.join("staging"))
}

/// The relative path where an item was staged as a file of its own (before staging packs: a
/// backup an earlier version started is still finished from those).
fn staged_rel(backup: &str, key: &ItemKey) -> Result<PathBuf, StoreError> {
    check_key(key)?;
    Ok(staging_rel(backup)?.join(key.archive_path()))
}

/// The relative path of a file beside the archive.
fn file_rel(backup: &str, name: &str) -> Result<PathBuf, StoreError> {
    check_name("file name", name)?;
    if name == "staging" || name.starts_with(".tmp-") {
        return Err(StoreError::UnsafeName { what: "file name", value: name.to_string() });
    }
    Ok(backup_rel(backup)?.join(name))
}

impl LocalStore<FsMedium> {
    /// A store rooted at the directory `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> LocalStore<FsMedium> {
        LocalStore { medium: FsMedium::new(root) }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.medium.root
    }

    /// The directory of one backup.
    pub fn backup_dir(&self, backup: &str) -> Result<PathBuf, StoreError> {
        Ok(self.medium.root.join(backup_rel(backup)?))
    }

    /// The path of the backup's archive.
    pub fn archive_path(&self, backup: &str) -> Result<PathBuf, StoreError> {
        check_name("backup name", backup)?;
        Ok(archive_path(&self.medium.root, backup))
    }

    /// The path where an item is staged.
    pub fn staged_path(&self, backup: &str, key: &ItemKey) -> Result<PathBuf, StoreError> {
        Ok(self.medium.root.join(staged_rel(backup, key)?))
    }
}

impl<M: StoreMedium> LocalStore<M> {
    /// A store on `medium`.
    pub fn on(medium: M) -> LocalStore<M> {
        LocalStore { medium }
    }

    /// The medium.
    pub fn medium(&self) -> &M {
        &self.medium
    }
}

/// Builds the archive of `entries` at `archive` on `m`, reading each staged item where it is.
/// Items that are missing or differ from their logged digest are all collected into one
/// [`StoreError::Unstaged`] (and no archive is written), so the caller can stage them again.
fn build_archive<M: StoreMedium>(
    m: &M,
    backup: &str,
    entries: &ArchiveEntries,
    archive: &Path,
) -> Result<ArchiveInfo, StoreError> {
    let mut tar = entries.tar_items()?;
    let what = m.location(archive);
    let staging = staging_rel(backup)?;
    let sort_dir = m.scratch_dir(&staging.join(SORT_DIR));
    let index = PackIndex::scan(m, &staging, sort_dir.as_deref())?;
    // The archive's items come in their own paths' order, twice over (each item's own entry and
    // its preferred version's copy, interleaved): a cursor for each reads the sorted records once.
    let (mut own, mut copies) = (index.cursor(), index.cursor());
    let mut unstaged: Vec<(ItemKey, StoreError)> = Vec::new();
    let mut result = None;
    m.write_with(archive, &mut |sink| {
        let (_, info) = write_archive(tar.by_ref(), sink, &what, |item, copy| {
            // The newest packed copy whose bytes are the logged ones, else a file of its own.
            let mut mismatch = None;
            let cursor = if copy { &mut copies } else { &mut own };
            for body in cursor.candidates(m, &item.key.archive_path())? {
                let body = body?;
                match verify_staged(item, &body) {
                    Ok(()) => return Ok(body),
                    Err(e) => mismatch = mismatch.or(Some(e)),
                }
            }
            let rel = staged_rel(backup, &item.key)?;
            let found = m.read(&rel)?;
            let checked = match found {
                Some(b) => verify_staged(item, &b).map(|()| b),
                None => Err(mismatch
                    .unwrap_or_else(|| StoreError::NotStaged { key: item.key.to_string(), path: m.location(&rel) })),
            };
            checked.or_else(|e| {
                unstaged.push((item.key.clone(), e));
                Ok(Vec::new())
            })
        })?;
        if let Some(e) = unstaged_error(&mut unstaged) {
            return Err(e);
        }
        result = Some(info);
        Ok(())
    })?;
    drop(index);
    if let Some(d) = sort_dir {
        // The runs are gone with the index; their directory too (what a killed build left there is
        // removed by the next one).
        let _ = std::fs::remove_dir_all(d);
    }
    result.ok_or_else(|| StoreError::Io {
        op: "build",
        path: what,
        source: io::Error::other("the archive writer did not finish"),
    })
}

/// The collected missing or changed items as one [`StoreError::Unstaged`], if any.
pub(crate) fn unstaged_error(found: &mut Vec<(ItemKey, StoreError)>) -> Option<StoreError> {
    if found.is_empty() {
        return None;
    }
    let mut found = std::mem::take(found);
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.dedup_by(|a, b| a.0 == b.0);
    let (keys, errors): (Vec<ItemKey>, Vec<StoreError>) = found.into_iter().unzip();
    let first = errors.into_iter().next().map(Box::new);
    first.map(|first| StoreError::Unstaged { keys, first })
}

#[async_trait]
impl<M: StoreMedium> Store for LocalStore<M> {
    async fn put_item(&self, backup: &str, key: &ItemKey, bytes: &[u8]) -> Result<(), StoreError> {
        check_key(key)?;
        let dir = staging_rel(backup)?;
        let (m, name, bytes) = (self.medium.clone(), key.archive_path(), bytes.to_vec());
        self.medium.run(move || m.append_staged(&dir, &name, &bytes)).await
    }

    async fn sync_staged(&self, backup: &str) -> Result<(), StoreError> {
        let rel = backup_rel(backup)?;
        let m = self.medium.clone();
        self.medium.run(move || m.sync_tree(&rel)).await
    }

    async fn finalize(&self, backup: &str, entries: Arc<ArchiveEntries>) -> Result<ArchiveInfo, StoreError> {
        let archive = backup_rel(backup)?.join(format!("{backup}.tar.gz"));
        let (m, backup) = (self.medium.clone(), backup.to_string());
        self.medium.run(move || build_archive(&m, &backup, &entries, &archive)).await
    }

    async fn put_file(&self, backup: &str, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        let rel = file_rel(backup, name)?;
        let m = self.medium.clone();
        self.medium.run(move || m.write(&rel, &bytes)).await
    }

    async fn get_file(&self, backup: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rel = file_rel(backup, name)?;
        let m = self.medium.clone();
        self.medium.run(move || m.read(&rel)).await
    }

    async fn download_file(&self, backup: &str, name: &str, dest: &Path) -> Result<bool, StoreError> {
        let rel = file_rel(backup, name)?;
        let (m, dest) = (self.medium.clone(), dest.to_path_buf());
        self.medium.run(move || m.copy_out(&rel, &dest)).await
    }

    fn describe(&self) -> String {
        self.medium.describe()
    }

    fn archive_location(&self, backup: &str) -> String {
        let rel = Path::new("backups").join(backup).join(format!("{backup}.tar.gz"));
        self.medium.location(&rel).display().to_string()
    }
}

/// The archive's path in a local store rooted at `root` (the name is not checked).
pub fn archive_path(root: &Path, backup: &str) -> PathBuf {
    root.join("backups").join(backup).join(format!("{backup}.tar.gz"))
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}

/// Checks that `value` is one safe path component (no `/`, `\\`, `.`, `..`, control characters).
pub fn check_name(what: &'static str, value: &str) -> Result<(), StoreError> {
    if is_safe_name(value) {
        Ok(())
    } else {
        Err(StoreError::UnsafeName { what, value: value.to_string() })
    }
}

/// Checks every component of an item key with [`is_safe_name`].
pub fn check_key(key: &ItemKey) -> Result<(), StoreError> {
    let bad = |field: &'static str, value: &str| StoreError::UnsafeKey {
        key: key.to_string(),
        field,
        value: value.to_string(),
    };
    if !key.group().is_empty() && !is_safe_name(key.group()) {
        return Err(bad("group", key.group()));
    }
    if !is_safe_name(key.resource()) {
        return Err(bad("resource", key.resource()));
    }
    if let Some(ns) = &key.namespace() {
        if !is_safe_name(ns) {
            return Err(bad("namespace", ns));
        }
    }
    if !is_safe_name(key.name()) {
        return Err(bad("name", key.name()));
    }
    Ok(())
}

/// `bytes` in lower-case hex (digests in messages, reports and logs).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The directory a path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes a directory entry change (create, rename) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// `create_dir_all`, syncing the parent of every directory it creates.
pub(crate) fn create_dirs(dir: &Path) -> Result<(), StoreError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(io_err("create directory", dir)(e)),
    }
    sync_dir(parent_dir(dir))
}

/// A fresh temp file path in `dir`, short so long item names stay within file-name limits.
pub(crate) fn temp_path(dir: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp-{}-{n}", std::process::id()))
}

/// Moves a finished temp file into place and makes the rename durable.
pub(crate) fn commit(tmp: &Path, path: &Path) -> Result<(), StoreError> {
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        return Err(io_err("rename into", path)(e));
    }
    sync_dir(parent_dir(path))
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes (buffered): a file made as it is written, never held
/// whole in memory.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), StoreError> {
    let dir = parent_dir(path);
    create_dirs(dir)?;
    let tmp = temp_path(dir);
    let written = File::create(&tmp).and_then(|f| {
        let mut w = std::io::BufWriter::new(f);
        write(&mut w)?;
        w.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", &tmp)(e));
    }
    commit(&tmp, path)
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Checks staged bytes against the digest the log recorded for the entry.
pub fn verify_staged(item: &Item, bytes: &[u8]) -> Result<(), StoreError> {
    let actual: [u8; 32] = Sha256::digest(bytes).into();
    if actual != item.digest {
        return Err(StoreError::DigestMismatch {
            key: item.key.to_string(),
            expected: hex(&item.digest),
            actual: hex(&actual),
        });
    }
    Ok(())
}

/// The gzip encoder of every file we write: mtime 0, no file name, OS "unknown", one level.
pub(crate) fn gzip_encoder<W: Write>(sink: W) -> flate2::write::GzEncoder<W> {
    flate2::GzBuilder::new().mtime(0).operating_system(255).write(sink, flate2::Compression::new(GZIP_LEVEL))
}

/// Gzips `bytes` with a fixed header, so the same input always gives the same output.
pub fn gzip_reproducible(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut gz = gzip_encoder(Vec::with_capacity(bytes.len() / 4 + 64));
    gz.write_all(bytes)?;
    gz.finish()
}

/// Writes the reproducible `.tar.gz` of `tar` (in archive order: [`ArchiveEntries::tar_items`])
/// into `sink` — the one place archive bytes are made, for every store. `read` returns an item's
/// verified staged bytes; `what` names the destination in errors. Returns the sink, and the
/// archive's sha256, size and item count.
pub fn write_archive<W: Write>(
    tar: impl Iterator<Item = Result<TarItem, StoreError>>,
    sink: W,
    what: &Path,
    mut read: impl FnMut(&Item, bool) -> Result<Vec<u8>, StoreError>,
) -> Result<(W, ArchiveInfo), StoreError> {
    let sink = HashingWriter { inner: sink, hasher: Sha256::new(), bytes: 0 };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = tar::Builder::new(ParallelGzip::new(sink, threads));
    let mut items = 0u64;
    for t in tar {
        let t = t?;
        let bytes = match &t.item {
            Some(item) => read(item, t.copy)?,
            None => VERSION_FILE_BYTES.to_vec(),
        };
        items += u64::from(t.item.is_some() && !t.copy);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        builder.append_data(&mut header, &t.path, bytes.as_slice()).map_err(io_err("write", what))?;
    }
    let gz = builder.into_inner().map_err(io_err("write", what))?;
    let sink = gz.finish().map_err(io_err("write", what))?;
    let info = ArchiveInfo { digest: sink.hasher.finalize().into(), bytes: sink.bytes, items };
    Ok((sink.inner, info))
}
/// A writer that cuts what it is given into [`GZIP_MEMBER_BYTES`] chunks and compresses each as an
/// independent gzip member (RFC 1952 §2.2: a gzip file is a series of members) on up to `threads`
/// threads, writing the members to the sink in order. The bytes depend on the input alone, never on
/// the thread count. Go's `gzip.Reader` (Velero), GNU gzip and tar, and flate2's `MultiGzDecoder`
/// read the members as one stream.
pub struct ParallelGzip<W: Write> {
    sink: W,
    buf: Vec<u8>,
    threads: usize,
    /// Members being compressed, oldest first.
    pending: std::collections::VecDeque<std::sync::mpsc::Receiver<io::Result<Vec<u8>>>>,
}

impl<W: Write> ParallelGzip<W> {
    /// A writer into `sink` compressing on up to `threads` threads (1: on the caller's thread).
    pub fn new(sink: W, threads: usize) -> ParallelGzip<W> {
        ParallelGzip {
            sink,
            buf: Vec::with_capacity(GZIP_MEMBER_BYTES),
            threads: threads.max(1),
            pending: std::collections::VecDeque::new(),
        }
    }

    fn compress(chunk: &[u8]) -> io::Result<Vec<u8>> {
        let mut gz = gzip_encoder(Vec::with_capacity(chunk.len() / 4 + 64));
        gz.write_all(chunk)?;
        gz.finish()
    }

    /// Writes the oldest member in flight to the sink.
    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.pending.pop_front() {
            let member = rx.recv().map_err(|_| io::Error::other("a gzip thread ended without its member"))??;
            self.sink.write_all(&member)?;
        }
        Ok(())
    }

    /// Compresses the buffered chunk: on a thread of its own when more than one is allowed.
    fn cut(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(GZIP_MEMBER_BYTES));
        if self.threads == 1 {
            let member = Self::compress(&chunk)?;
            return self.sink.write_all(&member);
        }
        while self.pending.len() >= self.threads {
            self.write_oldest()?;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name("gzip".into()).spawn(move || {
            let _ = tx.send(Self::compress(&chunk));
        })?;
        self.pending.push_back(rx);
        Ok(())
    }

    /// Compresses what is left, writes every member, and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.cut()?;
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.sink.flush()?;
        Ok(self.sink)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(GZIP_MEMBER_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == GZIP_MEMBER_BYTES {
            self.cut()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Members are cut at fixed offsets only; flushing does not cut one.
        Ok(())
    }
}

/// Bounds of [`RetryingStore`]: attempts per operation and the exponential backoff between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included (at least 1).
    pub attempts_max: u32,
    /// Wait before the second attempt; doubled before each further one.
    pub backoff_initial_ms: u64,
    /// Upper bound of one wait.
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    /// 4 attempts, waiting 100, 200 and 400 ms (at most 2 s each): a put that keeps failing costs
    /// 0.7 s of waiting here, on top of the store's own retries (see `crate::s3`).
    fn default() -> Self {
        RetryPolicy { attempts_max: 4, backoff_initial_ms: 100, backoff_max_ms: 2_000 }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based).
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        let doubled = self.backoff_initial_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        doubled.min(self.backoff_max_ms)
    }
}

/// A store that retries transient failures ([`StoreError::is_transient`]) of another store within a
/// [`RetryPolicy`]; permanent ones (unsafe names, digest mismatches) fail at once. Every operation of
/// the [`Store`] trait is idempotent, so a retry is always safe.
pub struct RetryingStore {
    inner: Arc<dyn Store>,
    policy: RetryPolicy,
    runtime: Arc<dyn Runtime>,
}

impl RetryingStore {
    /// Wraps `inner`; waits between attempts on `runtime`'s clock.
    pub fn new(inner: Arc<dyn Store>, policy: RetryPolicy, runtime: Arc<dyn Runtime>) -> RetryingStore {
        RetryingStore { inner, policy, runtime }
    }

    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send,
        T: Send,
    {
        let attempts_max = self.policy.attempts_max.max(1);
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) if attempt >= attempts_max => {
                    return Err(if attempts_max == 1 {
                        e
                    } else {
                        StoreError::GaveUp { attempts: attempt, last: Box::new(e) }
                    });
                }
                Err(e) => {
                    let wait_ms = self.policy.backoff_ms(attempt);
                    tracing::warn!("{e}; attempt {attempt} of {attempts_max}, retrying in {wait_ms} ms");
                    self.runtime.sleep(wait_ms).await;
                    attempt += 1;
                }
            }
        }
    }
}

#[async_trait]
impl Store for RetryingStore {
    async fn put_item(&self, backup: &str, key: &ItemKey, bytes: &[u8]) -> Result<(), StoreError> {
        self.retry(|| self.inner.put_item(backup, key, bytes)).await
    }

    async fn finalize(&self, backup: &str, entries: Arc<ArchiveEntries>) -> Result<ArchiveInfo, StoreError> {
        self.retry(|| self.inner.finalize(backup, entries.clone())).await
    }

    async fn sync_staged(&self, backup: &str) -> Result<(), StoreError> {
        self.retry(|| self.inner.sync_staged(backup)).await
    }

    async fn put_file(&self, backup: &str, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.retry(|| self.inner.put_file(backup, name, bytes.clone())).await
    }

    async fn get_file(&self, backup: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.retry(|| self.inner.get_file(backup, name)).await
    }

    async fn download_file(&self, backup: &str, name: &str, dest: &Path) -> Result<bool, StoreError> {
        self.retry(|| self.inner.download_file(backup, name, dest)).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn archive_location(&self, backup: &str) -> String {
        self.inner.archive_location(backup)
    }
}
#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::entry_runs::ArchiveEntry;

    fn entry(key: &ItemKey, version: &str, bytes: &[u8]) -> ArchiveEntry {
        ArchiveEntry { key: key.clone(), version: version.into(), digest: Sha256::digest(bytes).into() }
    }

    /// The entries, each as written by a block of its own.
    fn set(entries: &[ArchiveEntry]) -> Arc<ArchiveEntries> {
        Arc::new(ArchiveEntries::of(entries).unwrap())
    }

    fn long_name() -> String {
        format!("very-long-{}", "x".repeat(120))
    }

    /// Bytes that deflate somewhat, over several members, with a short last one.
    fn sample_stream() -> Vec<u8> {
        let mut v = Vec::new();
        let mut x: u64 = 7;
        while v.len() < 3 * GZIP_MEMBER_BYTES + 12_345 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            v.extend_from_slice(format!("{{\"k\":{}}}", x >> 50).as_bytes());
        }
        v
    }

    fn parallel_gzip(data: &[u8], threads: usize, piece: usize) -> Vec<u8> {
        let mut gz = ParallelGzip::new(Vec::new(), threads);
        for p in data.chunks(piece) {
            gz.write_all(p).unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn parallel_gzip_bytes_do_not_depend_on_threads_or_write_sizes() {
        let data = sample_stream();
        let one = parallel_gzip(&data, 1, 4096);
        for (threads, piece) in [(2, 4096), (8, 1 << 20), (3, 777)] {
            assert!(parallel_gzip(&data, threads, piece) == one, "{threads} threads, writes of {piece}");
        }
        // Independent members, read back as one stream.
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(one.as_slice()).read_to_end(&mut back).unwrap();
        assert!(back == data);
        let mut first = Vec::new();
        flate2::read::GzDecoder::new(one.as_slice()).read_to_end(&mut first).unwrap();
        assert_eq!(first.len(), GZIP_MEMBER_BYTES, "the first member holds exactly one chunk");
    }

    /// Items of several groups and scopes, one with a path too long for a plain tar header.
    fn items() -> Vec<(ItemKey, &'static str, Vec<u8>)> {
        vec![
            (ItemKey::namespaced("", "pods", "ns1", "web-0"), "v1", br#"{"kind":"Pod"}"#.to_vec()),
            (ItemKey::namespaced("apps", "deployments", "ns1", "web"), "v1", br#"{"kind":"Deployment"}"#.to_vec()),
            (ItemKey::cluster("", "namespaces", "ns1"), "v1", br#"{"kind":"Namespace"}"#.to_vec()),
            (
                ItemKey::cluster("rbac.authorization.k8s.io", "clusterroles", &long_name()),
                "v1",
                br#"{"kind":"ClusterRole"}"#.to_vec(),
            ),
            (ItemKey::namespaced("", "configmaps", "ns2", "cfg"), "v1", Vec::new()),
        ]
    }

    async fn stage(store: &LocalStore, order: &[usize]) -> Vec<ArchiveEntry> {
        let items = items();
        let mut entries = Vec::new();
        for &i in order {
            let (key, version, bytes) = &items[i];
            store.put_item("b1", key, bytes).await.unwrap();
            entries.push(entry(key, version, bytes));
        }
        entries
    }

    fn read_archive(path: &Path) -> Vec<(String, tar::Header, Vec<u8>)> {
        let gz = flate2::read::MultiGzDecoder::new(File::open(path).unwrap());
        let mut archive = tar::Archive::new(gz);
        let mut out = Vec::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let header = e.header().clone();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).unwrap();
            out.push((path, header, bytes));
        }
        out
    }

    fn list_dir_recursive(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(list_dir_recursive(&p));
            } else {
                out.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        out
    }

    #[tokio::test]
    async fn archives_are_byte_identical_for_any_order() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (LocalStore::new(a.path()), LocalStore::new(b.path()));
        let ea = stage(&sa, &[0, 1, 2, 3, 4]).await;
        let eb = stage(&sb, &[4, 2, 0, 3, 1]).await;
        let ia = sa.finalize("b1", set(&ea)).await.unwrap();
        let ib = sb.finalize("b1", set(&eb)).await.unwrap();
        let (ba, bb) =
            (fs::read(archive_path(a.path(), "b1")).unwrap(), fs::read(archive_path(b.path(), "b1")).unwrap());
        assert_eq!(ba, bb);
        assert_eq!(ia, ib);
        assert_eq!(ia.digest, <[u8; 32]>::from(Sha256::digest(&ba)));
        assert_eq!((ia.bytes, ia.items), (ba.len() as u64, 5));
        // Finalizing again (a resumed backup) gives the same bytes.
        let mut reversed = ea.clone();
        reversed.reverse();
        assert_eq!(sa.finalize("b1", set(&reversed)).await.unwrap(), ia);
        assert_eq!(fs::read(sa.archive_path("b1").unwrap()).unwrap(), ba);
    }

    /// The archive's order is its paths' byte order, compared piece by piece without making them:
    /// the same as sorting the path strings, also where one resource's name is a prefix of
    /// another's or a group sorts between them.
    #[test]
    fn paths_are_made_and_ordered_as_the_strings_would_be() {
        let entry = |group: &str, resource: &str, ns: Option<&str>, name: &str, version: &str| ArchiveEntry {
            key: match ns {
                Some(ns) => ItemKey::namespaced(group, resource, ns, name),
                None => ItemKey::cluster(group, resource, name),
            },
            version: version.into(),
            digest: [0; 32],
        };
        let entries = vec![
            entry("", "pods", Some("a"), "x", "v1"),
            entry("x", "pods", Some("a"), "x", "v1"),
            entry("", "pod", Some("a"), "x", "v1"),
            entry("", "pods-old", None, "x", "v1"),
            entry("apps", "deployments", Some("a-b"), "web", "v1"),
            entry("apps", "deployments", Some("a"), "web.json", "v1beta1"),
            entry("", "namespaces", None, "a", "v1"),
            entry("", "persistentvolumes", None, "pv", "v1"),
        ];
        let planned = ArchiveEntries::of(&entries).unwrap();
        let paths: Vec<String> = planned.tar_items().unwrap().map(|t| t.unwrap().path).collect();
        let mut want: Vec<String> = vec![VERSION_PATH.to_string()];
        for e in &entries {
            want.push(e.key.archive_path());
            want.push(e.key.preferred_version_path(&e.version));
        }
        want.sort();
        assert_eq!(paths, want);
    }

    #[tokio::test]
    async fn archive_lists_version_and_both_copies_sorted_with_fixed_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        let entries = stage(&store, &[3, 1, 4, 0, 2]).await;
        store.finalize("b1", set(&entries)).await.unwrap();
        let path = store.archive_path("b1").unwrap();
        let raw = fs::read(&path).unwrap();
        assert_eq!(&raw[..4], &[0x1f, 0x8b, 8, 0], "gzip header without file name");
        assert_eq!(&raw[4..8], &[0, 0, 0, 0], "gzip mtime 0");

        let listed = read_archive(&path);
        let mut expected: Vec<(String, Vec<u8>)> = vec![(VERSION_PATH.into(), b"1.1.0\n".to_vec())];
        for (key, version, bytes) in items() {
            expected.push((key.archive_path(), bytes.clone()));
            expected.push((key.preferred_version_path(version), bytes));
        }
        expected.sort();
        let got: Vec<(String, Vec<u8>)> = listed.iter().map(|(p, _, b)| (p.clone(), b.clone())).collect();
        assert_eq!(got, expected);
        assert!(got.iter().any(|(p, _)| p.len() > 100 && p.contains(&long_name())));
        assert!(got.iter().any(|(p, _)| p == "resources/pods/v1-preferredversion/namespaces/ns1/web-0.json"));
        for (p, h, _) in &listed {
            assert_eq!(h.mtime().unwrap(), 0, "{p}");
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{p}");
            assert_eq!(h.mode().unwrap(), 0o644, "{p}");
            assert_eq!(h.entry_type(), tar::EntryType::Regular, "{p}");
            assert!(h.as_gnu().is_some(), "{p}");
            assert_eq!(h.username().unwrap(), Some(""), "{p}");
        }
        // Nothing but the archive and the staging directory is left beside it.
        let mut names: Vec<String> = fs::read_dir(store.backup_dir("b1").unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["b1.tar.gz", "staging"]);
    }

    #[tokio::test]
    async fn digest_mismatch_and_missing_items_name_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        let mut entries = stage(&store, &[0, 1]).await;
        entries[1].digest[0] ^= 1;
        let e = store.finalize("b1", set(&entries)).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::Unstaged { first, .. } if matches!(**first, StoreError::DigestMismatch { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("item deployments.apps ns1/web"), "{e}");

        let key = ItemKey::namespaced("", "secrets", "ns1", "never");
        let e = store.finalize("b1", set(&[entry(&key, "v1", b"x")])).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::Unstaged { keys, first } if keys == std::slice::from_ref(&key) && matches!(**first, StoreError::NotStaged { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("item secrets ns1/never is not staged"), "{e}");
        // Every missing or changed item is named at once, so they can all be staged again.
        let mut all = stage(&store, &[0, 1]).await;
        all[0].digest[0] ^= 1;
        all.push(entry(&key, "v1", b"x"));
        let e = store.finalize("b1", set(&all)).await.unwrap_err();
        let StoreError::Unstaged { keys, .. } = &e else { panic!("{e}") };
        assert_eq!(keys.len(), 2, "{e}");

        // No archive, no temp file left behind.
        let mut names: Vec<String> = fs::read_dir(store.backup_dir("b1").unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["staging"]);
    }

    #[tokio::test]
    async fn duplicate_paths_with_different_contents_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        let key = ItemKey::namespaced("", "pods", "ns1", "a");
        store.put_item("b1", &key, b"{}").await.unwrap();
        let e1 = entry(&key, "v1", b"{}");
        // The same entry twice is one item.
        let info = store.finalize("b1", set(&[e1.clone(), e1.clone()])).await.unwrap();
        assert_eq!(read_archive(&store.archive_path("b1").unwrap()).len(), 3);
        assert_eq!(info.items, 1);
        let mut e2 = e1.clone();
        e2.digest = [0; 32];
        let e = store.finalize("b1", set(&[e1, e2])).await.unwrap_err();
        assert!(matches!(e, StoreError::DuplicatePath { .. }), "{e}");
    }

    #[tokio::test]
    async fn unsafe_names_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("store"));
        let good = ItemKey::namespaced("", "pods", "ns1", "a");
        for backup in ["", ".", "..", "a/b", "../x", "a\\b"] {
            let e = store.put_item(backup, &good, b"{}").await.unwrap_err();
            assert!(matches!(e, StoreError::UnsafeName { what: "backup name", .. }), "{backup:?}: {e}");
            assert!(store.finalize(backup, set(&[])).await.is_err());
            assert!(store.put_file(backup, "velero-backup.json", Bytes::from_static(b"{}")).await.is_err());
        }
        let bad_keys = [
            ItemKey::namespaced("", "pods", "..", "a"),
            ItemKey::namespaced("", "pods", "ns1", "../../etc/passwd"),
            ItemKey::namespaced("", "..", "ns1", "a"),
            ItemKey::namespaced("x/..", "pods", "ns1", "a"),
            ItemKey::cluster("", "nodes", ""),
        ];
        for key in &bad_keys {
            let e = store.put_item("b1", key, b"{}").await.unwrap_err();
            assert!(matches!(e, StoreError::UnsafeKey { .. }), "{key:?}: {e}");
            assert!(e.to_string().contains("not a safe path component"), "{e}");
            let e = store.finalize("b1", set(&[entry(key, "v1", b"{}")])).await.unwrap_err();
            assert!(matches!(e, StoreError::UnsafeKey { .. }), "{key:?}: {e}");
        }
        let e = store.finalize("b1", set(&[entry(&good, "../v1", b"{}")])).await.unwrap_err();
        assert!(matches!(e, StoreError::UnsafeKey { field: "version", .. }), "{e}");
        for name in ["", "..", "a/b", "../velero-backup.json", "staging", ".tmp-1-2"] {
            assert!(store.put_file("b1", name, Bytes::from_static(b"{}")).await.is_err(), "{name:?}");
            assert!(store.get_file("b1", name).await.is_err(), "{name:?}");
        }
        assert!(!tmp.path().join("store").exists(), "nothing may have been written");
    }

    #[tokio::test]
    async fn put_item_appends_to_one_pack_and_the_newest_matching_copy_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        let key = ItemKey::namespaced("", "pods", "ns1", "a");
        store.put_item("b1", &key, b"{\"v\":1}").await.unwrap();
        store.put_item("b1", &key, b"{\"v\":1}").await.unwrap();
        // A rewrite (a retried block) appends; no file per item, no temp file.
        store.put_item("b1", &key, b"{\"v\":2}").await.unwrap();
        let packs = list_dir_recursive(&tmp.path().join("backups"));
        assert_eq!(packs.len(), 1, "{packs:?}");
        assert!(packs[0].ends_with(".pack"), "{packs:?}");
        assert!(!store.staged_path("b1", &key).unwrap().exists());
        // Whichever bytes the log recorded are found.
        for v in [2, 1] {
            let body = format!("{{\"v\":{v}}}");
            let info = store.finalize("b1", set(&[entry(&key, "v1", body.as_bytes())])).await.unwrap();
            assert_eq!(info.items, 1);
            let got = read_archive(&store.archive_path("b1").unwrap());
            assert_eq!(got[1].2, body.as_bytes());
        }
    }

    /// One pack per process: a new store (a resumed run) never appends behind a torn tail, and
    /// the archive build reads every process's pack.
    #[tokio::test]
    async fn a_torn_pack_loses_only_its_tail_and_the_next_process_starts_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let first = LocalStore::new(tmp.path());
        let all = stage(&first, &[0, 1, 2]).await;
        let staging = tmp.path().join("backups/b1/staging");
        let pack = staging.join(&list_dir_recursive(&staging)[0]);
        // A crash cut the last record in half.
        let len = fs::metadata(&pack).unwrap().len();
        let file = fs::OpenOptions::new().write(true).open(&pack).unwrap();
        file.set_len(len - 3).unwrap();
        let e = first.finalize("b1", set(&all)).await.unwrap_err();
        let StoreError::Unstaged { keys, first: why } = &e else { panic!("{e}") };
        assert_eq!(keys, std::slice::from_ref(&all[2].key), "{e}");
        assert!(matches!(**why, StoreError::DigestMismatch { .. }), "{e}");
        // The next process stages it again, into a pack of its own.
        let second = LocalStore::new(tmp.path());
        stage(&second, &[2]).await;
        assert_eq!(list_dir_recursive(&staging).len(), 2);
        assert_eq!(second.finalize("b1", set(&all)).await.unwrap().items, 3);
        // A damaged header ends its pack's scan: what follows is missing, not misread.
        let mut bytes = fs::read(&pack).unwrap();
        bytes[crate::pack::HEADER_BYTES + 2] ^= 0x20;
        fs::write(&pack, &bytes).unwrap();
        let e = LocalStore::new(tmp.path()).finalize("b1", set(&all)).await.unwrap_err();
        let StoreError::Unstaged { keys, .. } = &e else { panic!("{e}") };
        assert_eq!(keys.len(), 2, "items 0 and 1 were in the damaged pack: {e}");
    }

    /// A backup an earlier version staged one file per item is still finished.
    #[tokio::test]
    async fn items_staged_as_files_of_their_own_are_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        let (key, version, bytes) = items().swap_remove(0);
        let path = store.staged_path("b1", &key).unwrap();
        assert_eq!(path, tmp.path().join("backups/b1/staging/resources/pods/namespaces/ns1/web-0.json"));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &bytes).unwrap();
        let info = store.finalize("b1", set(&[entry(&key, version, &bytes)])).await.unwrap();
        assert_eq!(info.items, 1);
    }

    #[tokio::test]
    async fn files_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path());
        assert_eq!(store.get_file("b1", "velero-backup.json").await.unwrap(), None);
        store.put_file("b1", "velero-backup.json", Bytes::from_static(b"{\"kind\":\"Backup\"}")).await.unwrap();
        store.put_file("b1", "b1-logs.gz", Bytes::new()).await.unwrap();
        assert_eq!(store.get_file("b1", "velero-backup.json").await.unwrap().unwrap(), b"{\"kind\":\"Backup\"}");
        assert_eq!(store.get_file("b1", "b1-logs.gz").await.unwrap().unwrap(), b"");
        assert!(tmp.path().join("backups/b1/velero-backup.json").is_file());
        let as_dyn: &dyn Store = &store;
        assert_eq!(as_dyn.describe(), format!("local directory {}", tmp.path().display()));
        assert_eq!(store.archive_location("b1"), tmp.path().join("backups/b1/b1.tar.gz").display().to_string());
    }
}
