//! `blockwise backup inspect`: read a Velero-format archive back and verify it.
//!
//! [`inspect`] is a pure function of the archive bytes (and, when available, the bytes of
//! `<name>-resource-list.json.gz`): it lists the items by resource and namespace and collects every
//! defect it finds instead of stopping at the first — layout (`metadata/version` = `1.1.0` and a
//! newline, as Velero writes it; only
//! `resources/<gr>/{namespaces/<ns>,cluster}/<name>.json` and their
//! `<version>-preferredversion` copies, regular files, no duplicate paths), content (every item is
//! a JSON object whose `metadata.name`/`namespace` match its path and which names its `apiVersion`
//! and `kind`), copies (each item has exactly one preferred-version copy with the same bytes, and
//! no copy lacks its item) and counts (the archive's `"<apiVersion>/<Kind>"` → names map equals
//! the resource list). It never panics on hostile input: a broken gzip or tar stream is a defect.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use serde_json::Value;

use crate::store::{FORMAT_VERSION, VERSION_FILE_BYTES, VERSION_PATH};

/// Names printed per namespace line before the rest is summarised.
const NAMES_SHOWN_MAX: usize = 50;
/// Entries read from one archive; more is a defect (hostile input).
const ENTRIES_MAX: usize = 10_000_000;

/// The most bytes one archive entry may hold: a Kubernetes object is at most about 1.5 MiB (etcd's
/// default request limit); 16 MiB is room for any object a server stores, and a bound on what one
/// entry can make the process hold.
pub const ENTRY_BYTES_MAX: u64 = 16 << 20;
/// The most bytes a gzipped archive or file may decompress to in all…
pub const TOTAL_BYTES_MAX: u64 = 16 << 30;
/// …and at most this many times its compressed size (past [`RATIO_FLOOR_BYTES`]): archived JSON
/// compresses 5–30×, a gzip bomb about 1,000×.
pub const RATIO_MAX: u64 = 100;
/// What any gzipped input may decompress to whatever its ratio.
pub const RATIO_FLOOR_BYTES: u64 = 64 << 20;

/// How many bytes `compressed` bytes of gzip may decompress to ([`TOTAL_BYTES_MAX`], [`RATIO_MAX`]).
pub fn decompressed_limit(compressed: usize) -> u64 {
    (compressed as u64).saturating_mul(RATIO_MAX).clamp(RATIO_FLOOR_BYTES, TOTAL_BYTES_MAX)
}

/// A gzip stream decompressed under [`decompressed_limit`]: past it, reading fails with an error
/// that names the limit (a gzip bomb is refused, not decompressed into memory).
pub struct Bounded<R: Read> {
    inner: flate2::read::MultiGzDecoder<R>,
    read: u64,
    limit: u64,
    compressed: u64,
}

impl<'a> Bounded<&'a [u8]> {
    /// Decompresses `gz`.
    pub fn new(gz: &'a [u8]) -> Bounded<&'a [u8]> {
        Bounded::over(gz, gz.len() as u64)
    }
}

impl<R: Read> Bounded<R> {
    /// Decompresses the `compressed` bytes `gz` reads (a file's length, say).
    pub fn over(gz: R, compressed: u64) -> Bounded<R> {
        Bounded {
            inner: flate2::read::MultiGzDecoder::new(gz),
            read: 0,
            limit: decompressed_limit(compressed.min(usize::MAX as u64) as usize),
            compressed,
        }
    }

    /// The error of a stream past its limit.
    fn too_big(&self) -> std::io::Error {
        std::io::Error::other(format!(
            "it decompresses to more than {} MiB ({RATIO_MAX} times its {} compressed bytes, at most {} GiB): refused as a gzip bomb",
            self.limit >> 20,
            self.compressed,
            TOTAL_BYTES_MAX >> 30
        ))
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read >= self.limit {
            // One byte more would pass the limit: is there one?
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(self.too_big()),
            };
        }
        let room = (self.limit - self.read).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Reads an archive entry of `declared` bytes whole, refusing one larger than [`ENTRY_BYTES_MAX`].
fn read_entry(entry: &mut impl Read, declared: u64, path: &str) -> Result<Vec<u8>, String> {
    if declared > ENTRY_BYTES_MAX {
        return Err(format!(
            "{path}: an entry of {declared} bytes, more than the {} MiB an archived object may have",
            ENTRY_BYTES_MAX >> 20
        ));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    entry.take(ENTRY_BYTES_MAX + 1).read_to_end(&mut bytes).map_err(|e| format!("{path}: cannot be read: {e}"))?;
    Ok(bytes)
}

/// Where an item sits: resource directory (`<resource>[.<group>]`) and namespace (`None`: cluster).
pub type Place = (String, Option<String>);

/// What `inspect` found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Inspection {
    /// Content of `metadata/version`, if present.
    pub format_version: Option<String>,
    /// Items (primary copies) by resource directory and namespace, names sorted.
    pub items: BTreeMap<Place, Vec<String>>,
    /// Tar entries read.
    pub entries: usize,
    /// Whether a resource list was compared.
    pub resource_list_checked: bool,
    /// Snapshots listed in the CSI files, when they were compared with the archive.
    pub csi_snapshots_checked: Option<usize>,
    /// Everything wrong, one sentence each.
    pub defects: Vec<String>,
}

impl Inspection {
    /// Items (primary copies) in the archive.
    pub fn item_count(&self) -> usize {
        self.items.values().map(Vec::len).sum()
    }
}

/// An item's identity in the archive: resource directory, namespace, name.
type ItemId = (String, Option<String>, String);

/// An item path split into its parts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ItemPath {
    gr: String,
    /// `Some(version)` for a `<version>-preferredversion` copy.
    preferred: Option<String>,
    namespace: Option<String>,
    name: String,
}

fn parse_path(path: &str) -> Option<ItemPath> {
    let parts: Vec<&str> = path.split('/').collect();
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") || parts.first() != Some(&"resources") {
        return None;
    }
    let gr = parts.get(1)?.to_string();
    let (preferred, rest) = match parts.get(2)?.strip_suffix("-preferredversion") {
        Some(v) if !v.is_empty() => (Some(v.to_string()), &parts[3..]),
        Some(_) => return None,
        None => (None, &parts[2..]),
    };
    let (namespace, file) = match rest {
        ["namespaces", ns, file] => (Some(ns.to_string()), *file),
        ["cluster", file] => (None, *file),
        _ => return None,
    };
    let name = file.strip_suffix(".json").filter(|n| !n.is_empty())?.to_string();
    Some(ItemPath { gr, preferred, namespace, name })
}

/// Decompresses a gzipped file (beside an archive) under [`decompressed_limit`].
pub fn gunzip(bytes: &[u8], what: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    Bounded::new(bytes).read_to_end(&mut out).map_err(|e| format!("{what} is not valid gzip: {e}"))?;
    Ok(out)
}

/// Checks one item's JSON against its path; returns its `"<apiVersion>/<Kind>"`.
fn check_item(path: &str, p: &ItemPath, bytes: &[u8], defects: &mut Vec<String>) -> Option<String> {
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            defects.push(format!("{path}: not valid JSON: {e}"));
            return None;
        }
    };
    let Some(o) = v.as_object() else {
        defects.push(format!("{path}: JSON is not an object"));
        return None;
    };
    let meta = o.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    if name != Some(p.name.as_str()) {
        defects.push(format!("{path}: metadata.name is {name:?}, the path says {:?}", p.name));
    }
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).filter(|n| !n.is_empty());
    if ns != p.namespace.as_deref() {
        defects.push(format!("{path}: metadata.namespace is {ns:?}, the path says {:?}", p.namespace));
    }
    let api = o.get("apiVersion").and_then(Value::as_str).filter(|a| !a.is_empty());
    let kind = o.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty());
    match (api, kind) {
        (Some(a), Some(k)) => Some(format!("{a}/{k}")),
        _ => {
            defects.push(format!("{path}: apiVersion or kind is missing"));
            None
        }
    }
}

/// One item entry of an archive, as [`for_each_item`] reads it.
pub struct ArchiveEntry<'a> {
    /// `<resource>[.<group>]`.
    pub dir: &'a str,
    /// Archived namespace (`None`: cluster-scoped).
    pub namespace: Option<&'a str>,
    /// Name.
    pub name: &'a str,
    /// Whether it is a `<version>-preferredversion` copy.
    pub copy: bool,
    /// The entry's bytes (UTF-8 checked).
    pub json: &'a str,
}

/// Reads an archive's item entries one at a time, in the archive's order, each under
/// [`ENTRY_BYTES_MAX`] and the whole under [`decompressed_limit`] of its `compressed` length: the
/// reader a restore plans from without holding the archive. A damaged gzip or tar stream, an entry
/// outside Velero's layout or one that is not UTF-8 is an error naming it: a restore never starts
/// from half an archive. `each`'s error stops the reading and is returned.
pub fn for_each_item(
    archive: impl Read,
    compressed: u64,
    mut each: impl FnMut(ArchiveEntry<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let mut tar = tar::Archive::new(Bounded::over(archive, compressed));
    let entries = tar.entries().map_err(|e| format!("not a gzip tar archive: {e}"))?;
    let mut seen = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("the archive is damaged after {seen} entries: {e}"))?;
        seen += 1;
        if seen > ENTRIES_MAX {
            return Err(format!("the archive has more than {ENTRIES_MAX} entries"));
        }
        let path = entry.path().map_err(|e| format!("entry {seen} has an unreadable path: {e}"))?;
        let path = path.to_string_lossy().into_owned();
        if entry.header().entry_type().is_dir() || path == VERSION_PATH || path.starts_with("metadata/") {
            continue;
        }
        let declared = entry.header().size().unwrap_or(u64::MAX);
        let bytes = read_entry(&mut entry, declared, &path)?;
        let Some(p) = parse_path(&path) else {
            return Err(format!("{path}: unexpected entry (not resources/<resource>/…/<name>.json)"));
        };
        let Ok(json) = std::str::from_utf8(&bytes) else {
            let place = p.namespace.as_ref().map_or_else(|| p.name.clone(), |ns| format!("{ns}/{}", p.name));
            return Err(format!("{} {place}: the archived object is not UTF-8", p.gr));
        };
        each(ArchiveEntry {
            dir: &p.gr,
            namespace: p.namespace.as_deref(),
            name: &p.name,
            copy: p.preferred.is_some(),
            json,
        })?;
    }
    Ok(())
}

/// The items of an archive held in memory, each once (its primary copy; an archive that holds
/// only `<version>-preferredversion` copies, as some Velero versions write, gives those), sorted.
pub fn archive_items(archive: &[u8]) -> Result<Vec<blockwise_engine::restore_run::ArchivedItem>, String> {
    let mut primaries: BTreeMap<ItemId, String> = BTreeMap::new();
    let mut copies: BTreeMap<ItemId, String> = BTreeMap::new();
    for_each_item(archive, archive.len() as u64, |e| {
        let key = (e.dir.to_string(), e.namespace.map(str::to_string), e.name.to_string());
        match e.copy {
            false => primaries.insert(key, e.json.to_string()),
            true => copies.insert(key, e.json.to_string()),
        };
        Ok(())
    })?;
    for (key, json) in copies {
        primaries.entry(key).or_insert(json);
    }
    Ok(primaries
        .into_iter()
        .map(|((dir, namespace, name), json)| blockwise_engine::restore_run::ArchivedItem {
            dir,
            namespace,
            name,
            json,
        })
        .collect())
}

/// The CSI companion files of a backup (gzipped JSON arrays, as stored), each if there is one.
#[derive(Debug, Default, Clone)]
pub struct CsiFiles {
    /// `<name>-csi-volumesnapshots.json.gz`.
    pub snapshots: Option<Vec<u8>>,
    /// `<name>-csi-volumesnapshotcontents.json.gz`.
    pub contents: Option<Vec<u8>>,
    /// `<name>-csi-volumesnapshotclasses.json.gz`.
    pub classes: Option<Vec<u8>>,
    /// `<name>-volumeinfo.json.gz`.
    pub volume_info: Option<Vec<u8>>,
    /// `<name>-itemoperations.json.gz`.
    pub item_operations: Option<Vec<u8>>,
}

impl CsiFiles {
    /// The file names, in field order, for a backup `name`.
    pub fn names(name: &str) -> [String; 5] {
        [
            format!("{name}-csi-volumesnapshots.json.gz"),
            format!("{name}-csi-volumesnapshotcontents.json.gz"),
            format!("{name}-csi-volumesnapshotclasses.json.gz"),
            format!("{name}-volumeinfo.json.gz"),
            format!("{name}-itemoperations.json.gz"),
        ]
    }

    /// From the files read in [`CsiFiles::names`] order.
    pub fn from_files([snapshots, contents, classes, volume_info, item_operations]: [Option<Vec<u8>>; 5]) -> Self {
        CsiFiles { snapshots, contents, classes, volume_info, item_operations }
    }
}

/// Reads and verifies an archive; `resource_list` is the gzipped resource list, if there is one.
pub fn inspect(archive: &[u8], resource_list: Option<&[u8]>) -> Inspection {
    inspect_with(archive, resource_list, None)
}

/// [`inspect`], and when `csi` is given, checks the CSI files against the archive: every archived
/// VolumeSnapshot and VolumeSnapshotContent listed, each listed one in the archive with the same
/// JSON; each claim of `-volumeinfo` in the archive annotated with a listed snapshot, its content
/// listed with the same handle; each snapshot's class in the classes file; each item operation
/// naming a listed snapshot.
pub fn inspect_with(archive: &[u8], resource_list: Option<&[u8]>, csi: Option<&CsiFiles>) -> Inspection {
    let mut out = Inspection::default();
    // Items: bytes and "<apiVersion>/<Kind>"; preferred-version copies: path and bytes.
    let mut primaries: BTreeMap<ItemId, (Vec<u8>, Option<String>)> = BTreeMap::new();
    let mut copies: BTreeMap<ItemId, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    let mut paths = BTreeSet::new();
    let mut tar = tar::Archive::new(Bounded::new(archive));
    let entries = match tar.entries() {
        Ok(e) => e,
        Err(e) => {
            out.defects.push(format!("not a gzip tar archive: {e}"));
            return out;
        }
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                out.defects.push(format!("the archive is damaged after {} entries: {e}", out.entries));
                break;
            }
        };
        out.entries += 1;
        if out.entries > ENTRIES_MAX {
            out.defects.push(format!("more than {ENTRIES_MAX} entries"));
            break;
        }
        let path = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                out.defects.push(format!("entry {} has an unreadable path: {e}", out.entries));
                continue;
            }
        };
        if !paths.insert(path.clone()) {
            out.defects.push(format!("{path}: appears more than once"));
            continue;
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            out.defects.push(format!("{path}: is not a regular file ({:?})", entry.header().entry_type()));
            continue;
        }
        let declared = entry.header().size().unwrap_or(u64::MAX);
        let bytes = match read_entry(&mut entry, declared, &path) {
            Ok(b) => b,
            Err(e) => {
                out.defects.push(e);
                break;
            }
        };
        if path == VERSION_PATH {
            out.format_version = Some(String::from_utf8_lossy(&bytes).into_owned());
            continue;
        }
        let Some(p) = parse_path(&path) else {
            out.defects
                .push(format!("{path}: unexpected entry (not metadata/version or resources/<gr>/…/<name>.json)"));
            continue;
        };
        let key = (p.gr.clone(), p.namespace.clone(), p.name.clone());
        match &p.preferred {
            None => {
                let gvk = check_item(&path, &p, &bytes, &mut out.defects);
                primaries.insert(key, (bytes, gvk));
            }
            Some(_) => copies.entry(key).or_default().push((path, bytes)),
        }
    }
    match out.format_version.as_deref() {
        None => out.defects.push(format!("{VERSION_PATH} is missing")),
        Some(v) if v.trim_end() != FORMAT_VERSION => {
            out.defects.push(format!("{VERSION_PATH} is {v:?}, expected {FORMAT_VERSION:?}"))
        }
        Some(v) if v.as_bytes() != VERSION_FILE_BYTES => out.defects.push(format!(
            "{VERSION_PATH} is {v:?}: Velero writes the version followed by a newline ({:?})",
            String::from_utf8_lossy(VERSION_FILE_BYTES)
        )),
        Some(_) => {}
    }
    for (key, (bytes, _)) in &primaries {
        let (gr, ns, name) = key;
        let place = ns.as_ref().map_or_else(|| format!("{gr} {name}"), |ns| format!("{gr} {ns}/{name}"));
        match copies.get(key).map(Vec::as_slice) {
            None | Some([]) => out.defects.push(format!("{place}: no preferred-version copy")),
            Some([(path, copy)]) if copy != bytes => out.defects.push(format!("{path}: differs from {place}")),
            Some([_]) => {}
            Some(many) => out.defects.push(format!("{place}: {} preferred-version copies", many.len())),
        }
        out.items.entry((gr.clone(), ns.clone())).or_default().push(name.clone());
    }
    for (key, list) in &copies {
        if !primaries.contains_key(key) {
            for (path, _) in list {
                out.defects.push(format!("{path}: a preferred-version copy without its item"));
            }
        }
    }
    if let Some(list) = resource_list {
        out.resource_list_checked = true;
        let mut in_archive: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for ((_, ns, name), (_, gvk)) in &primaries {
            if let Some(gvk) = gvk {
                let n = ns.as_ref().map_or_else(|| name.clone(), |ns| format!("{ns}/{name}"));
                in_archive.entry(gvk.clone()).or_default().insert(n);
            }
        }
        compare_resource_list(list, &in_archive, &mut out.defects);
    }
    if let Some(csi) = csi {
        out.csi_snapshots_checked = compare_csi_files(csi, &primaries, &mut out.defects);
    }
    out
}

const VS_DIR: &str = "volumesnapshots.snapshot.storage.k8s.io";
const VSC_DIR: &str = "volumesnapshotcontents.snapshot.storage.k8s.io";

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

/// One CSI file as a JSON array: `None` (and a defect) when it is missing or not one.
fn csi_array(file: &Option<Vec<u8>>, what: &str, defects: &mut Vec<String>) -> Option<Vec<Value>> {
    let Some(gz) = file else {
        defects.push(format!("{what} is missing"));
        return None;
    };
    let parsed = gunzip(gz, what).and_then(|raw| {
        serde_json::from_slice::<Vec<Value>>(&raw).map_err(|e| format!("{what} is not a JSON array: {e}"))
    });
    parsed.map_err(|e| defects.push(e)).ok()
}

/// The checks of [`inspect_with`]; the number of snapshots listed, if the files could be read.
fn compare_csi_files(
    csi: &CsiFiles,
    primaries: &BTreeMap<ItemId, (Vec<u8>, Option<String>)>,
    defects: &mut Vec<String>,
) -> Option<usize> {
    let snapshots = csi_array(&csi.snapshots, "the VolumeSnapshots file", defects);
    let contents = csi_array(&csi.contents, "the VolumeSnapshotContents file", defects);
    let classes = csi_array(&csi.classes, "the VolumeSnapshotClasses file", defects);
    let infos = csi_array(&csi.volume_info, "the volume info file", defects);
    let operations = csi_array(&csi.item_operations, "the item operations file", defects);
    let (snapshots, contents, classes, infos, operations) = (snapshots?, contents?, classes?, infos?, operations?);
    let archived = |id: &ItemId| primaries.get(id).and_then(|(b, _)| serde_json::from_slice::<Value>(b).ok());
    // Listed ones are in the archive, as they are there; archived ones are listed.
    let mut listed: BTreeSet<ItemId> = BTreeSet::new();
    for (dir, entries, what) in [(VS_DIR, &snapshots, "VolumeSnapshot"), (VSC_DIR, &contents, "VolumeSnapshotContent")]
    {
        for e in entries {
            let ns = (dir == VS_DIR).then(|| str_at(e, "/metadata/namespace").to_string());
            let id = (dir.to_string(), ns, str_at(e, "/metadata/name").to_string());
            let place = format!("{what} {}", id.1.as_ref().map_or(id.2.clone(), |ns| format!("{ns}/{}", id.2)));
            match archived(&id) {
                None => defects.push(format!("{place} is in the CSI files but not in the archive")),
                Some(a) if &a != e => defects.push(format!("{place} differs between the CSI files and the archive")),
                Some(_) => {}
            }
            listed.insert(id);
        }
    }
    for (id, _) in primaries.iter().filter(|((dir, _, _), _)| dir == VS_DIR || dir == VSC_DIR) {
        if !listed.contains(id) {
            let place = id.1.as_ref().map_or(id.2.clone(), |ns| format!("{ns}/{}", id.2));
            defects.push(format!("{} {place} is in the archive but not in the CSI files", id.0));
        }
    }
    let class_names: BTreeSet<&str> = classes.iter().map(|c| str_at(c, "/metadata/name")).collect();
    for vs in &snapshots {
        let class = str_at(vs, "/spec/volumeSnapshotClassName");
        if !class.is_empty() && !class_names.contains(class) {
            defects.push(format!(
                "VolumeSnapshot {}: its class {class} is not in the classes file",
                str_at(vs, "/metadata/name")
            ));
        }
    }
    let handles: BTreeMap<&str, &str> =
        contents.iter().map(|c| (str_at(c, "/metadata/name"), str_at(c, "/status/snapshotHandle"))).collect();
    for info in infos.iter().filter(|i| str_at(i, "/backupMethod") == "CSISnapshot") {
        let (ns, pvc) = (str_at(info, "/pvcNamespace"), str_at(info, "/pvcName"));
        let claim = archived(&("persistentvolumeclaims".to_string(), Some(ns.to_string()), pvc.to_string()));
        let snapshot =
            claim.as_ref().map(|c| str_at(c, "/metadata/annotations/velero.io~1volume-snapshot-name").to_string());
        match snapshot.as_deref() {
            None => defects.push(format!("volume info names claim {ns}/{pvc}, which is not in the archive")),
            Some(s) if !listed.contains(&(VS_DIR.to_string(), Some(ns.to_string()), s.to_string())) => defects
                .push(format!("claim {ns}/{pvc} is annotated with snapshot {s:?}, which is not in the CSI files")),
            Some(_) => {}
        }
        let (vsc, handle) = (str_at(info, "/csiSnapshotInfo/vscName"), str_at(info, "/csiSnapshotInfo/snapshotHandle"));
        if handles.get(vsc) != Some(&handle) {
            defects
                .push(format!("volume info of {ns}/{pvc}: content {vsc} with handle {handle} is not in the CSI files"));
        }
    }
    for op in &operations {
        let (ns, name) =
            (str_at(op, "/spec/resourceIdentifier/Namespace"), str_at(op, "/spec/resourceIdentifier/Name"));
        if !listed.contains(&(VS_DIR.to_string(), Some(ns.to_string()), name.to_string())) {
            defects.push(format!("item operation on VolumeSnapshot {ns}/{name}, which is not in the CSI files"));
        }
    }
    Some(snapshots.len())
}

fn compare_resource_list(list: &[u8], in_archive: &BTreeMap<String, BTreeSet<String>>, defects: &mut Vec<String>) {
    let parsed = gunzip(list, "the resource list").and_then(|raw| {
        serde_json::from_slice::<BTreeMap<String, Vec<String>>>(&raw)
            .map_err(|e| format!("the resource list is not a JSON object of name arrays: {e}"))
    });
    let listed = match parsed {
        Ok(l) => l,
        Err(e) => {
            defects.push(e);
            return;
        }
    };
    let empty = BTreeSet::new();
    let kinds: BTreeSet<&String> = listed.keys().chain(in_archive.keys()).collect();
    for kind in kinds {
        let names: BTreeSet<String> = listed.get(kind).map(|v| v.iter().cloned().collect()).unwrap_or_default();
        let have = in_archive.get(kind).unwrap_or(&empty);
        if &names == have {
            continue;
        }
        let missing: Vec<&String> = names.difference(have).take(5).collect();
        let extra: Vec<&String> = have.difference(&names).take(5).collect();
        defects.push(format!(
            "{kind}: the resource list has {} items, the archive {} (listed but missing: {missing:?}; in the archive but not listed: {extra:?})",
            names.len(),
            have.len()
        ));
    }
}

/// The listing `inspect` prints: items by resource and namespace, then the verdict.
pub fn render(what: &str, i: &Inspection) -> String {
    let mut out = format!(
        "{what}: format {}, {} items in {} entries\n",
        i.format_version.as_deref().map_or("?", str::trim_end),
        i.item_count(),
        i.entries
    );
    let mut last_gr: Option<&str> = None;
    for ((gr, ns), names) in &i.items {
        if last_gr != Some(gr.as_str()) {
            out.push_str(&format!("{gr}\n"));
            last_gr = Some(gr);
        }
        let scope = ns.as_ref().map_or_else(|| "cluster".to_string(), |ns| format!("namespace {ns}"));
        let shown: Vec<&str> = names.iter().take(NAMES_SHOWN_MAX).map(String::as_str).collect();
        let more = names.len().saturating_sub(NAMES_SHOWN_MAX);
        let tail = if more > 0 { format!(", … {more} more") } else { String::new() };
        out.push_str(&format!("  {scope} ({}): {}{tail}\n", names.len(), shown.join(", ")));
    }
    out.push_str(if i.resource_list_checked {
        "resource list: compared\n"
    } else {
        "resource list: not available, counts not compared\n"
    });
    out.push_str(&match i.csi_snapshots_checked {
        Some(n) => format!("CSI files: compared ({n} snapshots)\n"),
        None => "CSI files: not compared\n".to_string(),
    });
    if i.defects.is_empty() {
        out.push_str("defects: none\n");
    } else {
        out.push_str(&format!("defects: {}\n", i.defects.len()));
        for d in &i.defects {
            out.push_str(&format!("  defect: {d}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::store::gzip_reproducible;

    /// A tar.gz of `(path, bytes)` entries, in the given order.
    fn archive(files: &[(&str, &str)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (path, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            tar.append_data(&mut h, path, body.as_bytes()).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-0","namespace":"shop"}}"#;
    const PV: &str = r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"pv-1"}}"#;

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("metadata/version", "1.1.0\n"),
            ("resources/persistentvolumes/cluster/pv-1.json", PV),
            ("resources/persistentvolumes/v1-preferredversion/cluster/pv-1.json", PV),
            ("resources/pods/namespaces/shop/web-0.json", POD),
            ("resources/pods/v1-preferredversion/namespaces/shop/web-0.json", POD),
        ]
    }

    fn list(json: &str) -> Vec<u8> {
        gzip_reproducible(json.as_bytes()).unwrap()
    }

    #[track_caller]
    fn check(files: &[(&str, &str)], resource_list: Option<&str>, expected_defects: &[&str]) {
        let l = resource_list.map(list);
        let i = inspect(&archive(files), l.as_deref());
        assert_eq!(i.defects.len(), expected_defects.len(), "{:#?}", i.defects);
        for (d, want) in i.defects.iter().zip(expected_defects) {
            assert!(d.contains(want), "defect {d:?} should contain {want:?}");
        }
    }

    /// One gzip member holding a tar entry of `size` zero bytes at `path` (no end-of-archive
    /// blocks), to be repeated: a gzip bomb of concatenated members.
    fn bomb_member(path: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(h.as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..size.div_ceil(1 << 20) {
            gz.write_all(&zeros).unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn a_gzip_bomb_is_refused_by_its_size_not_decompressed_into_memory() {
        // 80 members of one 8 MiB entry each: 640 MiB from about 650 KB.
        let member = bomb_member("resources/configmaps/namespaces/a/x.json", 8 << 20);
        let bomb: Vec<u8> = std::iter::repeat_n(member.as_slice(), 80).flatten().copied().collect();
        assert!(decompressed_limit(bomb.len()) < 640 << 20, "the bomb must pass the limit");
        let e = archive_items(&bomb).unwrap_err();
        assert!(e.contains("refused as a gzip bomb"), "{e}");
        let i = inspect(&bomb, None);
        assert!(i.defects.iter().any(|d| d.contains("refused as a gzip bomb")), "{:?}", i.defects);
        // A file beside an archive, the same.
        let e = gunzip(&bomb, "the resource list").unwrap_err();
        assert!(e.contains("the resource list is not valid gzip") && e.contains("gzip bomb"), "{e}");
        // Below the limit, concatenated members are read whole (Velero's and GNU tar's reading).
        let small: Vec<u8> = std::iter::repeat_n(bomb_member("a", 1 << 20).as_slice(), 3).flatten().copied().collect();
        assert_eq!(gunzip(&small, "x").unwrap().len(), 3 * ((1 << 20) + 512));
    }

    #[test]
    fn an_entry_larger_than_an_object_can_be_is_refused_before_it_is_read() {
        let mut h = tar::Header::new_gnu();
        h.set_path("resources/configmaps/namespaces/a/x.json").unwrap();
        h.set_size(1 << 40);
        h.set_mode(0o644);
        h.set_cksum();
        let header_only = gzip_reproducible(h.as_bytes()).unwrap();
        let e = archive_items(&header_only).unwrap_err();
        assert!(e.contains("x.json: an entry of 1099511627776 bytes, more than the 16 MiB"), "{e}");
        let i = inspect(&header_only, None);
        assert!(i.defects.iter().any(|d| d.contains("more than the 16 MiB")), "{:?}", i.defects);
    }

    #[test]
    fn a_good_archive_lists_items_by_resource_and_namespace() {
        let l = list(r#"{"v1/PersistentVolume":["pv-1"],"v1/Pod":["shop/web-0"]}"#);
        let i = inspect(&archive(&good()), Some(&l));
        assert!(i.defects.is_empty(), "{:?}", i.defects);
        assert_eq!(i.item_count(), 2);
        assert_eq!(i.items[&("pods".to_string(), Some("shop".to_string()))], ["web-0"]);
        let text = render("b.tar.gz", &i);
        assert_eq!(
            text,
            "b.tar.gz: format 1.1.0, 2 items in 5 entries\npersistentvolumes\n  cluster (1): pv-1\npods\n  namespace shop (1): web-0\nresource list: compared\nCSI files: not compared\ndefects: none\n"
        );
    }

    #[test]
    fn every_kind_of_defect_is_named() {
        let mut files = good();
        files[0] = ("metadata/version", "1.0.0");
        check(&files, None, &["metadata/version is \"1.0.0\""]);
        files[0] = ("metadata/version", "1.1.0");
        check(&files, None, &["Velero writes the version followed by a newline"]);
        check(&good()[1..], None, &["metadata/version is missing"]);
        let mut files = good();
        files.push(("resources/pods/namespaces/shop/extra.txt", "x"));
        check(&files, None, &["extra.txt: unexpected entry"]);
        let mut files = good();
        files.remove(4);
        check(&files, None, &["pods shop/web-0: no preferred-version copy"]);
        let mut files = good();
        files[2] = ("resources/persistentvolumes/v1-preferredversion/cluster/pv-1.json", r#"{"x":1}"#);
        check(&files, None, &["differs from persistentvolumes pv-1"]);
        let mut files = good();
        files.push(("resources/pods/v1-preferredversion/namespaces/shop/ghost.json", POD));
        check(&files, None, &["ghost.json: a preferred-version copy without its item"]);
        let mut files = good();
        files[3] = ("resources/pods/namespaces/shop/web-0.json", "{not json");
        check(&files, None, &["web-0.json: not valid JSON", "differs from"]);
        let mut files = good();
        files[3] = ("resources/pods/namespaces/other/web-0.json", POD);
        check(&files, None, &["metadata.namespace is Some(\"shop\")", "no preferred-version copy", "without its item"]);
    }

    #[test]
    fn counts_are_compared_with_the_resource_list() {
        check(
            &good(),
            Some(r#"{"v1/PersistentVolume":["pv-1"],"v1/Pod":["shop/web-0","shop/web-1"]}"#),
            &["v1/Pod: the resource list has 2 items, the archive 1 (listed but missing: [\"shop/web-1\"]"],
        );
        check(
            &good(),
            Some(r#"{"v1/Pod":["shop/web-0"]}"#),
            &["v1/PersistentVolume: the resource list has 0 items, the archive 1"],
        );
        check(&good(), Some("[1,2]"), &["the resource list is not a JSON object"]);
        let i = inspect(&archive(&good()), Some(b"not gzip"));
        assert!(i.defects[0].contains("the resource list is not valid gzip"), "{:?}", i.defects);
    }

    #[test]
    fn garbage_is_a_defect_not_a_panic() {
        for junk in [&b""[..], b"\x1f\x8b\x08\x00junk", b"plain text", &[0u8; 1024]] {
            let i = inspect(junk, None);
            assert!(!i.defects.is_empty(), "{junk:?}");
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[7u8; 700]).unwrap();
        assert!(!inspect(&gz.finish().unwrap(), None).defects.is_empty());
        let mut truncated = archive(&good());
        truncated.truncate(truncated.len() / 2);
        assert!(!inspect(&truncated, None).defects.is_empty());
    }

    /// The CSI files against the archive: consistent files pass; a snapshot listed with other
    /// JSON, a content missing from the files, a claim annotated with an unlisted snapshot, an
    /// unknown class and an operation on an unlisted snapshot are each a defect.
    #[test]
    fn csi_files_are_compared_with_the_archive() {
        const VS: &str = r#"{"apiVersion":"snapshot.storage.k8s.io/v1","kind":"VolumeSnapshot","metadata":{"name":"s1","namespace":"shop"},"spec":{"volumeSnapshotClassName":"k"}}"#;
        const VSC: &str = r#"{"apiVersion":"snapshot.storage.k8s.io/v1","kind":"VolumeSnapshotContent","metadata":{"name":"c1"},"status":{"snapshotHandle":"h1"}}"#;
        const PVC: &str = r#"{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"data","namespace":"shop","annotations":{"velero.io/volume-snapshot-name":"s1"}}}"#;
        let files = [
            ("metadata/version", "1.1.0\n"),
            ("resources/persistentvolumeclaims/namespaces/shop/data.json", PVC),
            ("resources/persistentvolumeclaims/v1-preferredversion/namespaces/shop/data.json", PVC),
            ("resources/volumesnapshots.snapshot.storage.k8s.io/namespaces/shop/s1.json", VS),
            ("resources/volumesnapshots.snapshot.storage.k8s.io/v1-preferredversion/namespaces/shop/s1.json", VS),
            ("resources/volumesnapshotcontents.snapshot.storage.k8s.io/cluster/c1.json", VSC),
            ("resources/volumesnapshotcontents.snapshot.storage.k8s.io/v1-preferredversion/cluster/c1.json", VSC),
        ];
        let gz = |s: &str| Some(list(s));
        let info = r#"[{"backupMethod":"CSISnapshot","pvcName":"data","pvcNamespace":"shop","csiSnapshotInfo":{"vscName":"c1","snapshotHandle":"h1"}}]"#;
        let op = r#"[{"spec":{"resourceIdentifier":{"Namespace":"shop","Name":"s1"}}}]"#;
        let good = CsiFiles {
            snapshots: gz(&format!("[{VS}]")),
            contents: gz(&format!("[{VSC}]")),
            classes: gz(r#"[{"metadata":{"name":"k"}}]"#),
            volume_info: gz(info),
            item_operations: gz(op),
        };
        let i = inspect_with(&archive(&files), None, Some(&good));
        assert!(i.defects.is_empty(), "{:?}", i.defects);
        assert_eq!(i.csi_snapshots_checked, Some(1));
        let bad = CsiFiles {
            snapshots: gz(&format!("[{}]", VS.replace(r#""k""#, r#""other""#))),
            contents: gz("[]"),
            classes: gz(r#"[{"metadata":{"name":"k"}}]"#),
            volume_info: gz(&info.replace(r#""h1""#, r#""h2""#)),
            item_operations: gz(&op.replace("s1", "s9")),
        };
        let i = inspect_with(&archive(&files), None, Some(&bad));
        let want = [
            "VolumeSnapshot shop/s1 differs between the CSI files and the archive",
            "volumesnapshotcontents.snapshot.storage.k8s.io c1 is in the archive but not in the CSI files",
            "VolumeSnapshot s1: its class other is not in the classes file",
            "volume info of shop/data: content c1 with handle h2 is not in the CSI files",
            "item operation on VolumeSnapshot shop/s9, which is not in the CSI files",
        ];
        assert_eq!(i.defects, want, "{:#?}", i.defects);
        let missing = CsiFiles { classes: None, ..good };
        let i = inspect_with(&archive(&files), None, Some(&missing));
        assert_eq!(i.defects, ["the VolumeSnapshotClasses file is missing"]);
        assert_eq!(i.csi_snapshots_checked, None);
    }
}
