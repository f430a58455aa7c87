//! An external merge sort: records pushed in any order come back sorted, with no more than one
//! run's worth of them in memory — the archive's entries of a million-object backup (~64 bytes an
//! item held, ~73 MB at a million) sorted through files beside the log instead (issue 23).
//!
//! [`Sorter`] gathers up to `run_records` records, sorts them (stably) and writes them as one run:
//! a file of length-prefixed bincode records in its directory, or a buffer when it has none (the
//! simulator's logs live in memory). [`Sorted::iter`] merges the runs; it can be called again (an
//! archive build retried reads the entries again). Of equal records the one pushed first comes
//! first. The run files are removed when the [`Sorted`] (or an unfinished [`Sorter`]) is dropped.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A record larger than this is refused (a run is read back record by record).
pub const RECORD_BYTES_MAX: usize = 1 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// One sorted run.
enum Run {
    File(PathBuf),
    Memory(Arc<Vec<u8>>),
}

impl Run {
    fn reader(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Run::File(p) => Box::new(BufReader::with_capacity(64 << 10, File::open(p)?)),
            Run::Memory(b) => Box::new(io::Cursor::new(SharedBytes(b.clone()))),
        })
    }
}

struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// `Eq` and `Ord` of a record type by the key `$order` makes of `$x` (each of the two compared):
/// what a [`Sorter`] orders its records by, when not every field takes part.
macro_rules! ordered_by {
    ($t:ty, |$x:ident| $order:expr) => {
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                self.cmp(other) == std::cmp::Ordering::Equal
            }
        }
        impl Eq for $t {}
        impl PartialOrd for $t {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for $t {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                let a = {
                    let $x = self;
                    $order
                };
                let b = {
                    let $x = other;
                    $order
                };
                a.cmp(&b)
            }
        }
    };
}
pub(crate) use ordered_by;

/// Gathers records into sorted runs.
pub struct Sorter<T> {
    dir: Option<PathBuf>,
    run_records: usize,
    buf: Vec<T>,
    runs: Runs,
    len: u64,
}

/// The runs, removed from disk when dropped.
#[derive(Default)]
struct Runs(Vec<Run>);

impl Drop for Runs {
    fn drop(&mut self) {
        for r in &self.0 {
            if let Run::File(p) = r {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Makes `dir` an empty directory: what a killed process left there is removed.
pub(crate) fn fresh_dir(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(dir)
}

impl<T: Ord + Serialize + DeserializeOwned> Sorter<T> {
    /// A sorter writing its runs into `dir` (created if missing; `None`: runs kept in memory),
    /// `run_records` records to a run (at least one).
    pub fn new(dir: Option<&Path>, run_records: usize) -> io::Result<Sorter<T>> {
        if let Some(d) = dir {
            std::fs::create_dir_all(d)?;
        }
        Ok(Sorter {
            dir: dir.map(Path::to_path_buf),
            run_records: run_records.max(1),
            buf: Vec::new(),
            runs: Runs::default(),
            len: 0,
        })
    }

    /// A sorter whose directory is its own: what an earlier process left in `dir` (one killed
    /// while it sorted) is removed first.
    pub fn fresh(dir: Option<&Path>, run_records: usize) -> io::Result<Sorter<T>> {
        if let Some(d) = dir {
            fresh_dir(d)?;
        }
        Sorter::new(dir, run_records)
    }

    /// Adds a record.
    pub fn push(&mut self, record: T) -> io::Result<()> {
        self.buf.push(record);
        self.len += 1;
        if self.buf.len() >= self.run_records {
            self.cut()?;
        }
        Ok(())
    }

    /// Sorts the buffered records and writes them as a run.
    fn cut(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut records = std::mem::take(&mut self.buf);
        records.sort();
        let run = match &self.dir {
            Some(d) => {
                let path = d.join(format!("run-{}", self.runs.0.len()));
                let mut w = BufWriter::with_capacity(64 << 10, File::create(&path)?);
                for r in &records {
                    write_record(&mut w, r)?;
                }
                w.into_inner().map_err(io::IntoInnerError::into_error)?.sync_data().ok();
                Run::File(path)
            }
            None => {
                let mut bytes = Vec::new();
                for r in &records {
                    write_record(&mut bytes, r)?;
                }
                Run::Memory(Arc::new(bytes))
            }
        };
        self.runs.0.push(run);
        Ok(())
    }

    /// The records, sorted.
    pub fn finish(mut self) -> io::Result<Sorted<T>> {
        self.cut()?;
        let runs = std::mem::take(&mut self.runs);
        Ok(Sorted { runs, len: self.len, _records: PhantomData })
    }
}

fn write_record<T: Serialize>(w: &mut impl Write, r: &T) -> io::Result<()> {
    let bytes = bincode::serde::encode_to_vec(r, config()).map_err(io::Error::other)?;
    if bytes.len() > RECORD_BYTES_MAX {
        return Err(io::Error::other(format!("a record of {} bytes is over {RECORD_BYTES_MAX}", bytes.len())));
    }
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)
}

fn read_record<T: DeserializeOwned>(r: &mut dyn Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > RECORD_BYTES_MAX {
        return Err(io::Error::other(format!("a run's record claims {len} bytes (over {RECORD_BYTES_MAX})")));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    let (t, used) = bincode::serde::decode_from_slice(&bytes, config()).map_err(io::Error::other)?;
    if used != len {
        return Err(io::Error::other("a run's record has bytes after its value"));
    }
    Ok(Some(t))
}

/// Records sorted into runs, read back merged.
pub struct Sorted<T> {
    runs: Runs,
    len: u64,
    _records: PhantomData<fn() -> T>,
}

impl<T: Ord + DeserializeOwned> Sorted<T> {
    /// How many records there are.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The records in order (of equal ones, the first pushed first); each call reads them again.
    pub fn iter(&self) -> io::Result<Merge<T>> {
        let mut readers = Vec::with_capacity(self.runs.0.len());
        let mut heap = BinaryHeap::with_capacity(self.runs.0.len());
        for (i, run) in self.runs.0.iter().enumerate() {
            let mut r = run.reader()?;
            if let Some(t) = read_record::<T>(&mut *r)? {
                heap.push(Reverse(Head(t, i)));
            }
            readers.push(r);
        }
        Ok(Merge { readers, heap, failed: false })
    }
}

/// A run's next record, ordered by record then by run (the earlier run first).
struct Head<T>(T, usize);

impl<T: Ord> PartialEq for Head<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl<T: Ord> Eq for Head<T> {}
impl<T: Ord> PartialOrd for Head<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T: Ord> Ord for Head<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The merge of a [`Sorted`]'s runs.
pub struct Merge<T> {
    readers: Vec<Box<dyn Read + Send>>,
    heap: BinaryHeap<Reverse<Head<T>>>,
    failed: bool,
}

impl<T: Ord + DeserializeOwned> Iterator for Merge<T> {
    type Item = io::Result<T>;

    fn next(&mut self) -> Option<io::Result<T>> {
        if self.failed {
            return None;
        }
        let Reverse(Head(t, i)) = self.heap.pop()?;
        match read_record::<T>(&mut *self.readers[i]) {
            Ok(Some(next)) => self.heap.push(Reverse(Head(next, i))),
            Ok(None) => {}
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        }
        Some(Ok(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushed in any order, the records come back sorted, equal ones in push order, from files or
    /// memory, any run size; read twice, the same; the files are gone once it is dropped.
    #[test]
    fn records_come_back_sorted_and_stable() {
        let tmp = tempfile::tempdir().unwrap();
        let records: Vec<(u32, u32)> = (0..2_000u32).map(|i| ((i * 7919) % 97, i)).collect();
        let mut want = records.clone();
        want.sort_by_key(|r| r.0);
        for dir in [None, Some(tmp.path().join("runs"))] {
            for run in [5, 300, 10_000] {
                let mut s = Sorter::new(dir.as_deref(), run).unwrap();
                for &(k, i) in &records {
                    // Ordered by key only: equal keys keep their push order.
                    s.push(ByKey(k, i)).unwrap();
                }
                let sorted = s.finish().unwrap();
                assert_eq!(sorted.len(), 2_000);
                for _ in 0..2 {
                    let got: Vec<(u32, u32)> = sorted.iter().unwrap().map(|r| r.map(|b| (b.0, b.1)).unwrap()).collect();
                    assert_eq!(got, want, "run of {run}, dir {dir:?}");
                }
                drop(sorted);
                if let Some(d) = &dir {
                    assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "run files left behind");
                }
            }
        }
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug)]
    struct ByKey(u32, u32);
    ordered_by!(ByKey, |k| k.0);

    /// A damaged run is an error naming what is wrong, not a panic or a shorter list.
    #[test]
    fn a_damaged_run_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Sorter::new(Some(tmp.path()), 10).unwrap();
        for i in 0..30u32 {
            s.push(i).unwrap();
        }
        let sorted = s.finish().unwrap();
        std::fs::write(tmp.path().join("run-1"), [0xff, 0xff, 0xff, 0x7f, 1]).unwrap();
        let err = match sorted.iter() {
            Err(e) => e,
            Ok(mut m) => m.find_map(Result::err).expect("the damaged run is an error"),
        };
        assert!(err.to_string().contains("claims"), "{err}");
    }
}
