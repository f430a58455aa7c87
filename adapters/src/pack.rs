//! Staging packs: where a [`LocalStore`](crate::store::LocalStore) stages a backup's items.
//!
//! Staging one file per item cost a file creation, a rename and their directory-lock contention
//! per item — at 300k objects, a third of the process's CPU went to the kernel's file-system
//! metadata. Instead each process appends its staged items to one pack file per backup,
//! `backups/<backup>/staging/<writer>.pack`, and one barrier ([`StoreMedium::sync_tree`]) makes
//! every append so far durable. A pack is a sequence of records:
//!
//! ```text
//! magic "BWS1" | name length u32 LE | body length u32 LE | check u32 LE | name | body
//! ```
//!
//! `name` is the item's archive path, `check` the low 32 bits of a fixed hash of the two lengths
//! and the name, so a torn or damaged header ends the scan instead of being misread. Nothing in a
//! record is trusted beyond that: the archive build finds an item's candidates by its name (the
//! latest first) and takes the first whose bytes match the digest the log recorded; anything else
//! is missing, and the engine stages it again from the log. A process never appends to a pack an
//! earlier process wrote (its tail may be torn by a crash): each [`StoreMedium`] instance starts
//! its own.
//!
//! [`StoreMedium`]: crate::store::StoreMedium
//! [`StoreMedium::sync_tree`]: crate::store::StoreMedium::sync_tree

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::sorted::{Merge, Sorted, Sorter};
use crate::store::{StoreError, StoreMedium};

/// The file-name suffix of a pack.
pub const PACK_SUFFIX: &str = ".pack";
/// The first bytes of every record.
const MAGIC: &[u8; 4] = b"BWS1";
/// Bytes of a record's header.
pub const HEADER_BYTES: usize = 16;
/// The longest name a record may carry (longer ones are refused by the writer, and end a scan).
const NAME_BYTES_MAX: usize = 64 * 1024;
/// Bytes read at once while scanning a pack's headers.
const SCAN_WINDOW_BYTES: usize = 1 << 20;

/// A fixed (unkeyed) 64-bit hash: stable across processes and versions of this program.
fn fixed_hash(parts: &[&[u8]]) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x626c_6f63_6b77_6973, 0x6520_7061_636b_7331);
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

fn check(name_len: u32, body_len: u32, name: &[u8]) -> u32 {
    fixed_hash(&[&name_len.to_le_bytes(), &body_len.to_le_bytes(), name]) as u32
}

/// One record: `name` staged with `body`. Errors when either is too long to frame.
pub fn record(name: &str, body: &[u8]) -> Result<Vec<u8>, StoreError> {
    let too_long = |what: &str| StoreError::Io {
        op: "stage",
        path: PathBuf::from(name),
        source: std::io::Error::other(format!("{what} is too long for a staging pack record")),
    };
    if name.len() > NAME_BYTES_MAX {
        return Err(too_long("the item's archive path"));
    }
    let body_len = u32::try_from(body.len()).map_err(|_| too_long("the item"))?;
    let name_len = name.len() as u32;
    let mut out = Vec::with_capacity(HEADER_BYTES + name.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&check(name_len, body_len, name.as_bytes()).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Where a record's body lies, filed under its name: sorted by name, the newest first (later
/// pack, later offset).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Staged {
    name: String,
    pack: u32,
    offset: u64,
    len: u32,
}

crate::sorted::ordered_by!(Staged, |s| (&s.name, std::cmp::Reverse((s.pack, s.offset))));

/// Reads a pack through a window, so a scan makes one read per [`SCAN_WINDOW_BYTES`].
struct Window<'a, M: StoreMedium> {
    m: &'a M,
    path: &'a Path,
    start: u64,
    buf: Vec<u8>,
}

impl<M: StoreMedium> Window<'_, M> {
    /// `len` bytes at `offset`, or `None` past the end of the pack.
    fn get(&mut self, offset: u64, len: usize) -> Result<Option<&[u8]>, StoreError> {
        let in_buf = offset >= self.start && offset + len as u64 <= self.start + self.buf.len() as u64;
        if !in_buf {
            self.buf = self.m.read_at(self.path, offset, len.max(SCAN_WINDOW_BYTES))?;
            self.start = offset;
            if self.buf.len() < len {
                return Ok(None);
            }
        }
        let at = (offset - self.start) as usize;
        Ok(Some(&self.buf[at..at + len]))
    }
}

/// Every staged record of a backup's staging directory, sorted by name (an external sort: runs
/// on disk beside the packs, or in memory), read by [`PackCursor`]s that are asked for names in
/// ascending order — as the archive is written. An index of every record in memory was 20 bytes a
/// record, ~22 MB at a million items: the archive build's peak.
pub struct PackIndex {
    packs: Vec<PathBuf>,
    sorted: Sorted<Staged>,
}

/// Records sorted in memory before they are written as one run (~1.6 MB).
const INDEX_RUN: usize = 1 << 14;

impl PackIndex {
    /// Scans every pack in `dir` (headers only), sorting the records in `sort_dir` (emptied first;
    /// `None`: in memory). A record whose header is torn, damaged or runs past the end of its pack
    /// ends that pack's scan: what follows it is treated as missing.
    pub fn scan<M: StoreMedium>(m: &M, dir: &Path, sort_dir: Option<&Path>) -> Result<PackIndex, StoreError> {
        PackIndex::scan_in_runs(m, dir, sort_dir, INDEX_RUN)
    }

    fn scan_in_runs<M: StoreMedium>(
        m: &M,
        dir: &Path,
        sort_dir: Option<&Path>,
        run_len: usize,
    ) -> Result<PackIndex, StoreError> {
        let sort_err = |source: std::io::Error| StoreError::Io {
            op: "sort the staged items of",
            path: sort_dir.map_or_else(|| m.location(dir), Path::to_path_buf),
            source,
        };
        let packs = m.packs(dir)?;
        let mut sorter = Sorter::fresh(sort_dir, run_len).map_err(sort_err)?;
        for (i, path) in packs.iter().enumerate() {
            let mut w = Window { m, path, start: 0, buf: Vec::new() };
            let mut offset = 0u64;
            loop {
                let Some(h) = w.get(offset, HEADER_BYTES)? else { break };
                if &h[..4] != MAGIC {
                    break;
                }
                let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
                let (name_len, body_len, sum) = (word(4), word(8), word(12));
                if name_len as usize > NAME_BYTES_MAX {
                    break;
                }
                let Some(name) = w.get(offset + HEADER_BYTES as u64, name_len as usize)? else { break };
                if check(name_len, body_len, name) != sum {
                    break;
                }
                let body_at = offset + HEADER_BYTES as u64 + u64::from(name_len);
                // A name that is not UTF-8 was not written by a stager: what follows is not read.
                let Ok(name) = std::str::from_utf8(name) else { break };
                let record = Staged { name: name.to_string(), pack: i as u32, offset: body_at, len: body_len };
                sorter.push(record).map_err(sort_err)?;
                offset = body_at + u64::from(body_len);
            }
        }
        Ok(PackIndex { packs, sorted: sorter.finish().map_err(sort_err)? })
    }

    /// How many records the packs hold.
    pub fn len(&self) -> usize {
        self.sorted.len() as usize
    }

    /// Whether the packs hold no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader of the records, asked for names in ascending order.
    pub fn cursor(&self) -> PackCursor<'_> {
        PackCursor { index: self, merge: None, last: None, found: Vec::new() }
    }
}

/// Reads a [`PackIndex`]'s records in name order: asked for ascending names it reads each record
/// once; asked for an earlier name, it starts again from the first.
pub struct PackCursor<'a> {
    index: &'a PackIndex,
    merge: Option<std::iter::Peekable<Merge<Staged>>>,
    /// The name asked for last, and its records.
    last: Option<String>,
    found: Vec<Staged>,
}

impl PackCursor<'_> {
    /// The bodies staged under `name`, newest first, each read when the iterator gets to it (a
    /// body cut short by the end of its pack is returned short: its digest will not match).
    pub fn candidates<'m, M: StoreMedium>(
        &mut self,
        m: &'m M,
        name: &str,
    ) -> Result<impl Iterator<Item = Result<Vec<u8>, StoreError>> + 'm, StoreError> {
        if self.last.as_deref() != Some(name) {
            self.seek(name)?;
        }
        let at: Vec<(PathBuf, u64, usize)> = (self.found.iter())
            .filter_map(|s| Some((self.index.packs.get(s.pack as usize)?.clone(), s.offset, s.len as usize)))
            .collect();
        Ok(at.into_iter().map(move |(path, offset, len)| m.read_at(&path, offset, len)))
    }

    fn seek(&mut self, name: &str) -> Result<(), StoreError> {
        let err = |source: std::io::Error| StoreError::Io {
            op: "read the sorted staged items of",
            path: PathBuf::from(name),
            source,
        };
        if self.merge.is_none() || self.last.as_deref().is_some_and(|l| name < l) {
            self.merge = Some(self.index.sorted.iter().map_err(err)?.peekable());
        }
        self.found.clear();
        self.last = Some(name.to_string());
        let Some(merge) = self.merge.as_mut() else { return Ok(()) };
        // Past the earlier names (a damaged run is an error), then this name's records.
        while let Some(r) = merge.next_if(|r| r.as_ref().map_or(true, |s| s.name.as_str() < name)) {
            r.map_err(err)?;
        }
        while let Some(r) = merge.next_if(|r| r.as_ref().is_ok_and(|s| s.name == name)) {
            self.found.push(r.map_err(err)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_record_frames_its_name_and_body() {
        let r = record("resources/pods/namespaces/a/b.json", b"{}").unwrap();
        assert_eq!(&r[..4], MAGIC);
        assert_eq!(r.len(), HEADER_BYTES + 34 + 2);
        assert!(r.ends_with(b"resources/pods/namespaces/a/b.json{}"));
        // The check covers the lengths and the name: one flipped bit anywhere in them shows.
        let sum = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
        assert_ne!(check(35, 2, b"resources/pods/namespaces/a/b.json"), sum);
        assert_ne!(check(34, 3, b"resources/pods/namespaces/a/b.json"), sum);
        assert_ne!(check(34, 2, b"resources/pods/namespaces/a/c.json"), sum);
        assert_eq!(check(34, 2, b"resources/pods/namespaces/a/b.json"), sum);
        assert!(record(&"x".repeat(NAME_BYTES_MAX + 1), b"").is_err());
    }

    /// Whatever the runs' length, on disk or in memory, a name's candidates are its staged
    /// copies newest first (later pack, later offset), and nothing else; a cursor asked for names
    /// in ascending order, or again for one, or for an earlier one, finds them all.
    #[test]
    fn candidates_are_newest_first_across_runs() {
        use crate::store::{FsMedium, StoreMedium};
        let tmp = tempfile::tempdir().unwrap();
        let dir = Path::new("staging");
        let names = ["a", "b", "c"];
        let mut want: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
        for round in 0..2u8 {
            // A medium per round: each starts a pack of its own.
            let m = FsMedium::new(tmp.path());
            for i in 0..7u8 {
                let name = names[(i as usize * 5 + round as usize) % 3];
                let body = vec![round, i];
                m.append_staged(dir, name, &body).unwrap();
                want.entry(name).or_default().insert(0, body);
            }
        }
        let m = FsMedium::new(tmp.path());
        let sort_dir = tmp.path().join("sort");
        for (run_len, on_disk) in [(1, true), (2, false), (3, true), (5, false), (64, true)] {
            let sort = on_disk.then_some(sort_dir.as_path());
            let index = PackIndex::scan_in_runs(&m, dir, sort, run_len).unwrap();
            assert_eq!(index.len(), 14);
            let mut cursor = index.cursor();
            let mut get =
                |name: &str| -> Vec<Vec<u8>> { cursor.candidates(&m, name).unwrap().map(Result::unwrap).collect() };
            for name in ["0", "a", "a", "b", "bb", "c", "a", "d", "c"] {
                let expected = want.get(name).cloned().unwrap_or_default();
                assert_eq!(get(name), expected, "{name}, runs of {run_len}");
            }
        }
    }

    #[test]
    fn the_hash_is_fixed_across_processes() {
        // A pack written by one process is read by another: the records' checks must not be seeded.
        assert_eq!(fixed_hash(&[b"a"]), fixed_hash(&[b"a"]));
        assert_eq!(fixed_hash(&[b""]), 0x84f5_72e2_e44d_3cc5, "the fixed keys changed: old packs would not be read");
    }
}
