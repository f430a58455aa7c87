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

/// The hash a pack index files a name under.
pub fn name_hash(name: &str) -> u64 {
    fixed_hash(&[name.as_bytes()])
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

/// Where a record's body lies: which pack, at which offset, how long. 20 bytes: its name's hash
/// cut to 32 bits (a name that shares it only adds a candidate, whose bytes are checked against
/// the logged digest like any other) and its offset in two halves (as a `u64` hash and offset it
/// was 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    hash: u32,
    pack: u32,
    offset_lo: u32,
    offset_hi: u32,
    len: u32,
}

impl Loc {
    fn offset(&self) -> u64 {
        u64::from(self.offset_hi) << 32 | u64::from(self.offset_lo)
    }
}

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

/// Every staged record of a backup's staging directory, found by name.
pub struct PackIndex {
    packs: Vec<PathBuf>,
    /// The records in runs of [`INDEX_RUN`] in the order they were scanned (oldest first), each
    /// run sorted by hash, then newest first (later pack, later offset). One vector of every
    /// record grew by doubling and was copied to shrink it: at a million items two copies of
    /// ~27 MB, the archive build's peak.
    runs: Vec<Vec<Loc>>,
}

/// Records in one run of a [`PackIndex`].
const INDEX_RUN: usize = 1 << 16;

impl PackIndex {
    /// Scans every pack in `dir` (headers only). A record whose header is torn, damaged or runs
    /// past the end of its pack ends that pack's scan: what follows it is treated as missing.
    pub fn scan<M: StoreMedium>(m: &M, dir: &Path) -> Result<PackIndex, StoreError> {
        PackIndex::scan_in_runs(m, dir, INDEX_RUN)
    }

    fn scan_in_runs<M: StoreMedium>(m: &M, dir: &Path, run_len: usize) -> Result<PackIndex, StoreError> {
        let run_len = run_len.max(1);
        let packs = m.packs(dir)?;
        let mut runs: Vec<Vec<Loc>> = Vec::new();
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
                let hash = fixed_hash(&[name]);
                let body_at = offset + HEADER_BYTES as u64 + u64::from(name_len);
                if runs.last().is_none_or(|r| r.len() == run_len) {
                    runs.push(Vec::with_capacity(run_len));
                }
                if let Some(run) = runs.last_mut() {
                    let (offset_lo, offset_hi) = (body_at as u32, (body_at >> 32) as u32);
                    run.push(Loc { hash: hash as u32, pack: i as u32, offset_lo, offset_hi, len: body_len });
                }
                offset = body_at + u64::from(body_len);
            }
        }
        // In place (a stable sort's scratch is half the records); no two records share a pack
        // and an offset, so the order is the same.
        for run in &mut runs {
            run.sort_unstable_by(|a, b| {
                a.hash.cmp(&b.hash).then(b.pack.cmp(&a.pack)).then(b.offset().cmp(&a.offset()))
            });
        }
        if let Some(last) = runs.last_mut() {
            last.shrink_to_fit();
        }
        Ok(PackIndex { packs, runs })
    }

    /// How many records the packs hold.
    pub fn len(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }

    /// Whether the packs hold no record.
    pub fn is_empty(&self) -> bool {
        self.runs.iter().all(Vec::is_empty)
    }

    /// The bodies staged under `name`, newest first, read lazily (a body cut short by the end of
    /// its pack is returned short: its digest will not match).
    pub fn candidates<'a, M: StoreMedium>(
        &'a self,
        m: &'a M,
        name: &str,
    ) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + 'a {
        let hash = name_hash(name) as u32;
        // The newest run first: later runs were scanned later (later packs, later offsets).
        (self.runs.iter().rev())
            .flat_map(move |run| {
                let first = run.partition_point(|l| l.hash < hash);
                run[first..].iter().take_while(move |l| l.hash == hash)
            })
            .map(move |l| m.read_at(&self.packs[l.pack as usize], l.offset(), l.len as usize))
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

    /// Whatever the runs' length, a name's candidates are its staged copies newest first (later
    /// pack, later offset), and nothing else.
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
        assert_eq!(std::mem::size_of::<Loc>(), 20);
        for run_len in [1, 2, 3, 5, 64] {
            let index = PackIndex::scan_in_runs(&m, dir, run_len).unwrap();
            assert_eq!(index.len(), 14);
            for name in names {
                let got: Vec<Vec<u8>> = index.candidates(&m, name).map(Result::unwrap).collect();
                assert_eq!(got, want[name], "{name}, runs of {run_len}");
            }
            assert_eq!(index.candidates(&m, "d").count(), 0);
        }
    }

    #[test]
    fn the_hash_is_fixed_across_processes() {
        // A pack written by one process is read by another: the hash must not be seeded.
        assert_eq!(name_hash("resources/pods/namespaces/a/b.json"), name_hash("resources/pods/namespaces/a/b.json"));
        assert_eq!(name_hash(""), 0x84f5_72e2_e44d_3cc5, "the fixed keys changed: old packs would not be found");
    }
}
