//! The archive's entries, sorted on disk: what [`crate::store::Store::finalize`] builds the archive
//! from. The driver pushes every write of the log that the archive holds
//! ([`blockwise_engine::entries::final_write`]) into an [`ArchiveEntriesBuilder`]; the records are
//! sorted by own path ([`crate::sorted`]: runs of [`RUN_RECORDS`] in files beside the log, or in
//! memory for a log that lives there), so a million items cost one run's worth of memory instead
//! of a vector of every entry and two orders of it (~75 MB at a million, issue 23).
//!
//! [`ArchiveEntries::items`] gives each item once, in archive order, with the rules of the format:
//! of one block's writes of an item the latest, identical copies written by different blocks once,
//! and two different items at one path an error ([`StoreError::DuplicatePath`]); every key and
//! version is checked to be a safe path ([`check_key`]). [`ArchiveEntries::tar_items`] gives every
//! tar entry in archive order — `metadata/version`, then each item at its own path and at its
//! `-preferredversion` copy. One sorted order serves both paths: an item's copy path is its own
//! path with one piece inserted right after its type's directory, the same piece for every item
//! of the type, so copies sort as their own paths do; two cursors over the same runs are merged by
//! path.

use std::io;
use std::path::Path;

use blockwise_engine::item::is_safe_name;
use blockwise_engine::ItemKey;
use serde::{Deserialize, Serialize};

use crate::sorted::{Sorted, Sorter};
use crate::store::{check_key, StoreError, VERSION_PATH};

/// Records sorted in memory before they are written as one run: ~4 MB of records (a record is
/// ~250 bytes with its path, key and version; runs of 65,536 were ~17 MB, the 1M backup's peak
/// once the archive build's index was on disk), and ~70 runs (~0.6 MB of read buffers to merge
/// them) at a million items.
pub const RUN_RECORDS: usize = 16_384;

/// One write the archive holds, as sorted: by own path, then block, then log order.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EntryRecord {
    /// [`ItemKey::archive_path`].
    path: String,
    /// The block that wrote it.
    block: u32,
    /// Its place among the writes pushed.
    seq: u64,
    key: ItemKey,
    version: String,
    digest: [u8; 32],
}

crate::sorted::ordered_by!(EntryRecord, |r| (&r.path, r.block, r.seq));

/// One item given whole ([`ArchiveEntries::of`]: tests and small callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    /// The item.
    pub key: ItemKey,
    /// Its type's preferred version, for the `-preferredversion` copy.
    pub version: String,
    /// sha256 of the staged bytes.
    pub digest: [u8; 32],
}

/// One item of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its place among the archive's items (in archive order, from 0): the same for its two tar
    /// entries.
    pub ordinal: u64,
    /// The item.
    pub key: ItemKey,
    /// Its type's preferred version.
    pub version: String,
    /// sha256 of the staged bytes.
    pub digest: [u8; 32],
}

/// One tar entry: its path and the item whose staged bytes it holds (`None`: the version file).
#[derive(Debug, Clone)]
pub struct TarItem {
    /// Path inside the archive.
    pub path: String,
    /// Whether it is the item's `-preferredversion` copy.
    pub copy: bool,
    /// The item.
    pub item: Option<Item>,
}

/// Gathers the archive's entries ([`ArchiveEntries::builder`]).
pub struct ArchiveEntriesBuilder {
    sorter: Sorter<EntryRecord>,
    seq: u64,
    /// The first entry whose key or version is not a safe path.
    unsafe_entry: Option<StoreError>,
}

impl ArchiveEntriesBuilder {
    /// Adds a write of `key` by `block` (a later push of one block's item replaces an earlier).
    pub fn push(&mut self, block: u32, key: &ItemKey, version: &str, digest: &[u8; 32]) -> io::Result<()> {
        if self.unsafe_entry.is_none() {
            self.unsafe_entry = check_entry(key, version).err();
        }
        let record = EntryRecord {
            path: key.archive_path(),
            block,
            seq: self.seq,
            key: key.clone(),
            version: version.to_string(),
            digest: *digest,
        };
        self.seq += 1;
        self.sorter.push(record)
    }

    /// The entries, sorted.
    pub fn finish(self) -> io::Result<ArchiveEntries> {
        Ok(ArchiveEntries { sorted: self.sorter.finish()?, unsafe_entry: self.unsafe_entry })
    }
}

/// The archive's entries, sorted (in files or in memory); read as often as needed.
pub struct ArchiveEntries {
    sorted: Sorted<EntryRecord>,
    unsafe_entry: Option<StoreError>,
}

fn sort_error(e: io::Error) -> StoreError {
    StoreError::Io { op: "sort", path: "the archive's entries".into(), source: e }
}

impl ArchiveEntries {
    /// A builder whose runs go to files in `dir` (`None`: memory). The directory is the builder's
    /// alone: what an earlier process left there (a run killed while it built an archive) is
    /// removed first.
    pub fn builder(dir: Option<&Path>) -> io::Result<ArchiveEntriesBuilder> {
        Ok(ArchiveEntriesBuilder { sorter: Sorter::fresh(dir, RUN_RECORDS)?, seq: 0, unsafe_entry: None })
    }

    /// The entries `entries`, in memory, each as written by a block of its own: identical copies
    /// of an item are kept once, and different items at one path are an error.
    pub fn of(entries: &[ArchiveEntry]) -> Result<ArchiveEntries, StoreError> {
        let mut b = ArchiveEntriesBuilder {
            sorter: Sorter::new(None, entries.len().max(1)).map_err(sort_error)?,
            seq: 0,
            unsafe_entry: None,
        };
        for (i, e) in entries.iter().enumerate() {
            b.push(i as u32, &e.key, &e.version, &e.digest).map_err(sort_error)?;
        }
        b.finish().map_err(sort_error)
    }

    /// How many writes were pushed (an item written twice counted twice).
    pub fn writes(&self) -> u64 {
        self.sorted.len()
    }

    /// Each item once, in archive order: of one block's writes the last, of blocks' identical
    /// copies the first; different items at one path are [`StoreError::DuplicatePath`]. The
    /// iterator ends after its first error. An entry whose key or version is not a safe path
    /// ([`check_key`]) is [`StoreError::UnsafeKey`] before anything is read.
    pub fn items(&self) -> Result<impl Iterator<Item = Result<Item, StoreError>> + Send, StoreError> {
        if let Some(StoreError::UnsafeKey { key, field, value }) = &self.unsafe_entry {
            return Err(StoreError::UnsafeKey { key: key.clone(), field, value: value.clone() });
        }
        let mut records = self.sorted.iter().map_err(sort_error)?.peekable();
        let mut ordinal = 0u64;
        let mut failed = false;
        Ok(std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let item = next_item(&mut records).map(|r| {
                let r = r?;
                let item = Item { ordinal, key: r.key, version: r.version, digest: r.digest };
                ordinal += 1;
                Ok(item)
            });
            failed = matches!(item, Some(Err(_)));
            item
        }))
    }

    /// Every tar entry of the archive, in archive order (see [`ArchiveEntries::items`] for the
    /// errors).
    pub fn tar_items(&self) -> Result<impl Iterator<Item = Result<TarItem, StoreError>> + Send, StoreError> {
        let mut own =
            self.items()?.map(|r| r.map(|i| TarItem { path: i.key.archive_path(), copy: false, item: Some(i) }));
        let mut copies = self
            .items()?
            .map(|r| r.map(|i| TarItem { path: i.key.preferred_version_path(&i.version), copy: true, item: Some(i) }));
        let (mut a, mut b) = (own.next(), copies.next());
        let mut failed = false;
        let merged = std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let copy_first = match (&a, &b) {
                (Some(Ok(x)), Some(Ok(y))) => y.path < x.path,
                (Some(Err(_)), _) | (Some(_), None) => false,
                (_, Some(Err(_))) | (None, _) => true,
            };
            let t = if copy_first {
                std::mem::replace(&mut b, copies.next())
            } else {
                std::mem::replace(&mut a, own.next())
            };
            failed = matches!(t, Some(Err(_)));
            t
        });
        let version = TarItem { path: VERSION_PATH.to_string(), copy: false, item: None };
        Ok(std::iter::once(Ok(version)).chain(merged))
    }
}

/// Checks an entry's key and version before any path is made of them.
fn check_entry(key: &ItemKey, version: &str) -> Result<(), StoreError> {
    check_key(key)?;
    if !is_safe_name(version) {
        return Err(StoreError::UnsafeKey { key: key.to_string(), field: "version", value: version.to_string() });
    }
    Ok(())
}

/// The next path's record kept: of one block's writes the last, of blocks' identical copies the
/// first; different items at one path are [`StoreError::DuplicatePath`].
fn next_item(
    records: &mut std::iter::Peekable<impl Iterator<Item = io::Result<EntryRecord>>>,
) -> Option<Result<EntryRecord, StoreError>> {
    let mut kept = match records.next()? {
        Ok(r) => r,
        Err(e) => return Some(Err(sort_error(e))),
    };
    let mut chosen: Option<EntryRecord> = None;
    loop {
        match records.peek() {
            Some(Ok(r)) if r.path == kept.path => {}
            Some(Err(_)) => {
                if let Some(Err(e)) = records.next() {
                    return Some(Err(sort_error(e)));
                }
            }
            _ => break,
        }
        let Some(Ok(next)) = records.next() else { break };
        if next.block == kept.block {
            kept = next;
            continue;
        }
        match settle(chosen.take(), std::mem::replace(&mut kept, next)) {
            Ok(c) => chosen = Some(c),
            Err(e) => return Some(Err(e)),
        }
    }
    Some(settle(chosen, kept))
}

/// Of a path's earlier blocks' write kept (`chosen`) and the next block's (`r`), the one kept.
fn settle(chosen: Option<EntryRecord>, r: EntryRecord) -> Result<EntryRecord, StoreError> {
    match chosen {
        None => Ok(r),
        Some(c) if c.digest == r.digest => Ok(c),
        Some(c) => {
            Err(StoreError::DuplicatePath { path: r.path.clone(), first: c.key.to_string(), second: r.key.to_string() })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn xorshift(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut rng = seed;
        move |n| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        }
    }

    /// The archive a list of writes should give, worked out plainly: per (block, path) the latest
    /// write, per path the lowest block's, a different digest at one path an error; then each kept
    /// item at its two paths and the version file, all sorted by path.
    fn model(writes: &[(u32, ItemKey, &str, u8)]) -> Result<Vec<(String, Option<u8>)>, String> {
        let mut latest: BTreeMap<(String, u32), (ItemKey, &str, u8)> = BTreeMap::new();
        for (block, key, version, digest) in writes {
            latest.insert((key.archive_path(), *block), (key.clone(), version, *digest));
        }
        let mut kept: BTreeMap<String, (ItemKey, &str, u8)> = BTreeMap::new();
        for ((path, _), (key, version, digest)) in latest {
            match kept.get(&path) {
                Some(k) if k.2 != digest => return Err(path),
                Some(_) => {}
                None => {
                    kept.insert(path, (key, version, digest));
                }
            }
        }
        let mut paths = vec![(VERSION_PATH.to_string(), None)];
        for (path, (key, version, digest)) in kept {
            paths.push((key.preferred_version_path(version), Some(digest)));
            paths.push((path, Some(digest)));
        }
        paths.sort();
        Ok(paths)
    }

    /// The tar entries from sorted records are those of the plain model: paths in order, each
    /// entry's digest, and a conflict reported at the same path — over generated writes of several
    /// types (namespaced and cluster-scoped, names that are prefixes of others, a group whose
    /// directory sorts before a type without one), by several blocks, some items written twice,
    /// some conflicting, through runs of any size in memory and in files.
    #[test]
    fn the_sorted_entries_are_the_modelled_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let types = [
            ("", "pods", "v1", true),
            ("apps", "deployments", "v1", true),
            ("", "namespaces", "v1", false),
            ("x.io", "pods", "v1beta1", true),
        ];
        let (mut conflicts, mut rewrites) = (0, 0);
        for case in 0..200 {
            let mut writes = Vec::new();
            for _ in 0..1 + next(300) {
                let (g, r, v, namespaced) = types[next(types.len() as u64) as usize];
                let name = format!("n{}{}", next(30), ["", "-a", ".b", "a"][next(4) as usize]);
                let key = if namespaced {
                    ItemKey::namespaced(g, r, &format!("ns{}", next(3)), &name)
                } else {
                    ItemKey::cluster(g, r, &name)
                };
                // Mostly one block per item, sometimes another; the digest mostly the key's.
                let block = (key.digest() % 5) as u32 + if next(20) == 0 { 1 } else { 0 };
                let digest = if next(50) == 0 { 7 } else { key.digest() as u8 | 8 };
                writes.push((block, key, v, digest));
            }
            let want = model(&writes);
            conflicts += want.is_err() as u32;
            rewrites += (writes.len() != writes.iter().map(|w| (w.0, &w.1)).collect::<BTreeMap<_, _>>().len()) as u32;
            let dir = (case % 2 == 0).then(|| tmp.path().join("runs"));
            let mut b = ArchiveEntries::builder(dir.as_deref()).unwrap();
            b.sorter = Sorter::new(dir.as_deref(), 1 + next(50) as usize).unwrap();
            for (block, key, version, digest) in &writes {
                b.push(*block, key, version, &[*digest; 32]).unwrap();
            }
            let entries = b.finish().unwrap();
            let got: Result<Vec<(String, Option<u8>)>, StoreError> =
                entries.tar_items().unwrap().map(|t| t.map(|t| (t.path, t.item.map(|i| i.digest[0])))).collect();
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "case {case}"),
                (Err(StoreError::DuplicatePath { path, .. }), Err(want)) => assert_eq!(path, want, "case {case}"),
                (got, want) => panic!("case {case}: {:?} against {want:?}", got.map(|g| g.len())),
            }
        }
        // The generator reaches both rules.
        assert!(conflicts > 5 && rewrites > 5, "{conflicts} conflicts, {rewrites} rewrites");
    }

    /// Items are numbered in archive order, the same number for both tar entries of one; `of`
    /// keeps identical copies once; an unsafe version is refused.
    #[test]
    fn items_are_numbered_and_checked() {
        let e = |name: &str, version: &str| ArchiveEntry {
            key: ItemKey::namespaced("", "pods", "ns", name),
            version: version.into(),
            digest: [1; 32],
        };
        let entries = ArchiveEntries::of(&[e("b", "v1"), e("a", "v1"), e("b", "v1")]).unwrap();
        assert_eq!(entries.writes(), 3);
        let items: Vec<(u64, String)> =
            entries.items().unwrap().map(|i| i.map(|i| (i.ordinal, i.key.name().to_string())).unwrap()).collect();
        assert_eq!(items, [(0, "a".to_string()), (1, "b".to_string())]);
        let tar: Vec<(bool, u64)> = entries
            .tar_items()
            .unwrap()
            .map(Result::unwrap)
            .filter_map(|t| t.item.map(|i| (t.copy, i.ordinal)))
            .collect();
        // Every own path (`…/namespaces/…`) sorts before every copy (`…/v1-preferredversion/…`).
        assert_eq!(tar, [(false, 0), (false, 1), (true, 0), (true, 1)]);
        let bad = ArchiveEntries::of(&[e("a", "v1"), e("c", "../v1"), e("b", "../v2")]).unwrap();
        let err = bad.items().err().unwrap();
        assert!(err.to_string().contains("../v1"), "the first one pushed: {err}");
        assert!(matches!(err, StoreError::UnsafeKey { field: "version", .. }), "{err}");
    }

    /// The builder's directory is its own: a run file an earlier process left is removed.
    #[test]
    fn a_left_run_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("entries");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("run-7"), b"left").unwrap();
        let mut b = ArchiveEntries::builder(Some(&dir)).unwrap();
        b.push(0, &ItemKey::namespaced("", "pods", "ns", "a"), "v1", &[1; 32]).unwrap();
        let entries = b.finish().unwrap();
        assert!(!dir.join("run-7").exists());
        assert_eq!(entries.items().unwrap().count(), 1);
    }
}
