//! The planning catalog: every object listed or fetched, as planning keeps it, packed.
//!
//! Planning needs every known object at once (a pod's relations reach claims listed later, a
//! claim's reach the pods that mount it), so the catalog grows with the cluster. An [`Item`] of
//! each object was 64 bytes, its key's shared text ~64 and a box of what it keeps ~100–400 more
//! for pods and claims: ~250 MB at a million objects, the backup's peak. Here an object is a
//! 16-byte [`Row`] — its type and namespace as numbers into small tables, its body's number (32
//! bits), where its name is (32 bits) — with its name in an arena of 1 MiB chunks and what it
//! keeps, packed by [`Item::pack_kept`], in another (dropped whole once planning is done:
//! [`Catalog::drop_kept`]). Planning reads an object back as an [`Item`] made when asked
//! ([`Catalog::item`]): one key allocation, and the kept part decoded, for the moment it is
//! looked at.

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::body::BodyId;
use crate::item::{GroupResource, Item, ItemKey, UnpackError};

/// One object of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    /// The body's number in the log ([`NO_BODY`]: none).
    body: u32,
    /// Where its name starts in the names' arena ([`OFFSET_BITS`]).
    at: u32,
    /// Its namespace's number ([`NO_NAMESPACE`]: cluster-scoped).
    ns: u32,
    /// Its type's number.
    ty: u16,
    /// [`DELETING`], [`KEPT`].
    flags: u8,
}

const NO_BODY: u32 = u32::MAX;
/// A row's place in the names' arena: chunk in the high 12 bits, offset in the low 20 (a chunk
/// is 1 MiB; a longer record is alone in its chunk, at 0).
const OFFSET_BITS: u32 = 20;
const NO_NAMESPACE: u32 = u32::MAX;
const DELETING: u8 = 1;
const KEPT: u8 = 2;
/// An arena chunk's size (a record longer than this gets a chunk of its own).
const CHUNK_BYTES: usize = 1 << 20;

/// Byte records in chunks of [`CHUNK_BYTES`] (a record longer gets a chunk of its own): no
/// vector of every byte is reallocated, and copied, as it grows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Arena {
    chunks: Vec<Vec<u8>>,
}

impl Arena {
    /// Appends one record, the concatenation of `parts`: where it starts (chunk in the high 32
    /// bits, offset in the low).
    pub(crate) fn append(&mut self, parts: &[&[u8]]) -> Result<u64, &'static str> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let fits = self.chunks.last().is_some_and(|c| c.capacity() - c.len() >= len);
        if !fits {
            if u32::try_from(len).is_err() {
                return Err("a record of 4 GiB or more");
            }
            if u32::try_from(self.chunks.len()).is_err() {
                return Err("arena chunks");
            }
            self.chunks.push(Vec::with_capacity(len.max(CHUNK_BYTES)));
        }
        let chunk_no = self.chunks.len() - 1;
        let Some(chunk) = self.chunks.last_mut() else { return Err("arena chunks") };
        let offset = chunk.len();
        for p in parts {
            chunk.extend_from_slice(p);
        }
        Ok(((chunk_no as u64) << 32) | offset as u64)
    }

    /// The bytes from `at` to its chunk's end (empty when there is no such place).
    pub(crate) fn at(&self, at: u64) -> &[u8] {
        let chunk = self.chunks.get((at >> 32) as usize).map(Vec::as_slice).unwrap_or_default();
        chunk.get((at & u64::from(u32::MAX)) as usize..).unwrap_or_default()
    }
}

/// An arena place (chunk in the high 32 bits, offset in the low) in a row's 32 bits, if it fits.
fn short_at(at: u64) -> Option<u32> {
    let (chunk, offset) = (at >> 32, at & u64::from(u32::MAX));
    (chunk < 1 << (32 - OFFSET_BITS) && offset < 1 << OFFSET_BITS)
        .then_some(((chunk as u32) << OFFSET_BITS) | offset as u32)
}

/// A row's place in the names' arena as the arena numbers places.
fn long_at(at: u32) -> u64 {
    (u64::from(at >> OFFSET_BITS) << 32) | u64::from(at & ((1 << OFFSET_BITS) - 1))
}

/// Why an object could not join the catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// More resource types than a row can number.
    #[error("{key}: more than {max} resource types in one backup", max = u16::MAX)]
    TooManyTypes { key: ItemKey },
    /// More namespaces, or arena chunks, than can be numbered, or a record of 4 GiB or more.
    #[error("{key}: the planning catalog is full ({what})")]
    Full { key: ItemKey, what: &'static str },
    /// What the item keeps could not be packed.
    #[error("{key}: {error}")]
    Pack { key: ItemKey, error: UnpackError },
}

/// Every object planning knows, packed ([module docs](self)).
#[derive(Debug, Default)]
pub struct Catalog {
    types: Vec<GroupResource>,
    namespaces: Vec<Box<str>>,
    ns_ids: HashMap<Box<str>, u32>,
    rows: Vec<Row>,
    /// Each object's name, and where what it keeps is in `kept` (when it keeps anything).
    names: Arena,
    /// What objects keep, packed; dropped whole by [`Catalog::drop_kept`].
    kept: Arena,
    /// Bytes of the arena no row points at any more ([`Catalog::retain`]).
    dropped: usize,
    scratch_kept: Vec<u8>,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Catalog {
        Catalog::default()
    }

    /// A catalog of these items, in their order.
    pub fn of_items(items: impl IntoIterator<Item = Item>) -> Result<Catalog, CatalogError> {
        let mut c = Catalog::new();
        for it in items {
            c.push(&it)?;
        }
        Ok(c)
    }

    /// How many objects.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds an object at the end.
    pub fn push(&mut self, item: &Item) -> Result<(), CatalogError> {
        let key = &item.key;
        let ty = self.type_id(key)?;
        let ns = match key.namespace() {
            Some(ns) => self.namespace_id(ns, key)?,
            None => NO_NAMESPACE,
        };
        let full = |what| CatalogError::Full { key: key.clone(), what };
        let mut kept = std::mem::take(&mut self.scratch_kept);
        kept.clear();
        let packed = item.pack_kept(&mut kept);
        let kept_at = match packed {
            Ok(true) => {
                let (head, n) = len_prefix(kept.len());
                Some(self.kept.append(&[&head[..n], &kept]))
            }
            _ => None,
        };
        self.scratch_kept = kept;
        let has_kept = packed.map_err(|error| CatalogError::Pack { key: key.clone(), error })?;
        let kept_at = kept_at.transpose().map_err(full)?.map(u64::to_le_bytes);
        let name = key.name().as_bytes();
        let (head, n) = len_prefix(name.len());
        let at = self.names.append(&[&head[..n], name, kept_at.as_ref().map_or(&[], |b| &b[..])]).map_err(full)?;
        let flags = if item.deleting { DELETING } else { 0 } | if has_kept { KEPT } else { 0 };
        let at = short_at(at).ok_or_else(|| full("names"))?;
        let body = match item.body {
            None => NO_BODY,
            Some(b) => u32::try_from(b).ok().filter(|&b| b != NO_BODY).ok_or_else(|| full("body numbers"))?,
        };
        self.rows.push(Row { body, at, ns, ty, flags });
        Ok(())
    }

    fn type_id(&mut self, key: &ItemKey) -> Result<u16, CatalogError> {
        // Objects come a listing page at a time: the last type is nearly always the one.
        let is = |gr: &GroupResource| gr.group == key.group() && gr.resource == key.resource();
        if let Some(i) = self.types.iter().rposition(is) {
            return Ok(i as u16);
        }
        let id = u16::try_from(self.types.len())
            .ok()
            .filter(|&id| id < u16::MAX)
            .ok_or_else(|| CatalogError::TooManyTypes { key: key.clone() })?;
        self.types.push(key.gr());
        Ok(id)
    }

    fn namespace_id(&mut self, ns: &str, key: &ItemKey) -> Result<u32, CatalogError> {
        if let Some(&id) = self.ns_ids.get(ns) {
            return Ok(id);
        }
        let id = u32::try_from(self.namespaces.len())
            .ok()
            .filter(|&id| id < NO_NAMESPACE)
            .ok_or(CatalogError::Full { key: key.clone(), what: "namespaces" })?;
        self.namespaces.push(ns.into());
        self.ns_ids.insert(ns.into(), id);
        Ok(id)
    }

    /// The record of row `r`: its name and what it keeps (empty when nothing).
    fn record(&self, r: &Row) -> (&str, &[u8]) {
        let rest = self.names.at(long_at(r.at));
        let (len, rest) = get_len(rest);
        let (name, rest) = rest.split_at(len.min(rest.len()));
        let kept = match (r.flags & KEPT, rest.first_chunk::<8>()) {
            (0, _) | (_, None) => &[][..],
            (_, Some(at)) => {
                let (len, rest) = get_len(self.kept.at(u64::from_le_bytes(*at)));
                &rest[..len.min(rest.len())]
            }
        };
        (std::str::from_utf8(name).unwrap_or_default(), kept)
    }

    /// Forgets what every object keeps beyond its key and body: once planning is done, the plan's
    /// keys are all that is read of the catalog (what pods, claims and volumes keep was ~30 MB
    /// at a million objects).
    pub fn drop_kept(&mut self) {
        self.kept = Arena::default();
        for r in &mut self.rows {
            r.flags &= !KEPT;
        }
    }

    fn row(&self, i: u32) -> Option<&Row> {
        self.rows.get(i as usize)
    }

    /// The group and resource of object `i` (empty when there is no such object).
    pub fn group_resource(&self, i: u32) -> (&str, &str) {
        match self.row(i).and_then(|r| self.types.get(r.ty as usize)) {
            Some(gr) => (&gr.group, &gr.resource),
            None => ("", ""),
        }
    }

    /// Whether object `i` is of this group and resource.
    pub fn is(&self, i: u32, group: &str, resource: &str) -> bool {
        self.group_resource(i) == (group, resource)
    }

    /// The namespace of object `i` (`None`: cluster-scoped).
    pub fn namespace(&self, i: u32) -> Option<&str> {
        let r = self.row(i)?;
        self.namespaces.get(r.ns as usize).map(|n| &**n)
    }

    /// The name of object `i`.
    pub fn name(&self, i: u32) -> &str {
        self.row(i).map_or("", |r| self.record(r).0)
    }

    /// The body's number of object `i`.
    pub fn body(&self, i: u32) -> Option<BodyId> {
        self.row(i).map(|r| r.body).filter(|&b| b != NO_BODY).map(BodyId::from)
    }

    /// The key of object `i`, made.
    pub fn key(&self, i: u32) -> ItemKey {
        let (g, r) = self.group_resource(i);
        ItemKey::new(g, r, self.namespace(i), self.name(i))
    }

    /// The digest of object `i`'s key ([`ItemKey::digest`]), without making the key.
    pub fn digest(&self, i: u32) -> u128 {
        let (g, r) = self.group_resource(i);
        ItemKey::digest_of(g, r, self.namespace(i), self.name(i))
    }

    /// Object `i` as an [`Item`], made: its key, and what it keeps unpacked.
    pub fn item(&self, i: u32) -> Item {
        let mut it = Item::of_key(self.key(i));
        let Some(r) = self.row(i) else { return it };
        it.deleting = r.flags & DELETING != 0;
        it.body = self.body(i);
        if r.flags & KEPT != 0 {
            // The bytes are the catalog's own, packed by `push`: failing to read them back is a
            // defect, reported; the object is planned by its key alone.
            if let Err(e) = it.unpack_kept(self.record(r).1) {
                tracing::error!("{}: {e}", it.key);
            }
        }
        it
    }

    /// Every object as an [`Item`], made one at a time, in the catalog's order.
    pub fn items(&self) -> impl Iterator<Item = Item> + '_ {
        (0..self.rows.len() as u32).map(|i| self.item(i))
    }

    /// Object `i`'s key compared with `key`, in [`ItemKey`]'s order.
    pub fn cmp_key(&self, i: u32, key: &ItemKey) -> Ordering {
        let (g, r) = self.group_resource(i);
        (g, r, self.namespace(i), self.name(i)).cmp(&(key.group(), key.resource(), key.namespace(), key.name()))
    }

    fn cmp_rows(&self, ranks: &Ranks, a: &Row, b: &Row) -> Ordering {
        (ranks.ty.get(a.ty as usize), ranks.ns(a.ns))
            .cmp(&(ranks.ty.get(b.ty as usize), ranks.ns(b.ns)))
            .then_with(|| self.record(a).0.cmp(self.record(b).0))
    }

    /// Sorts the objects by key, stably, and keeps the first of each key (a key listed twice:
    /// the first listing wins).
    pub fn sort_and_dedup(&mut self) {
        let ranks = Ranks::of(self);
        let mut order: Vec<u32> = (0..self.rows.len() as u32).collect();
        order.sort_by(|&a, &b| self.cmp_rows(&ranks, &self.rows[a as usize], &self.rows[b as usize]));
        let mut rows = std::mem::take(&mut self.rows);
        crate::grouping::permute_in_place(&mut rows, order);
        let before = rows.len();
        rows.dedup_by(|a, b| self.cmp_rows(&ranks, a, b) == Ordering::Equal);
        self.dropped += before - rows.len();
        // Not shrunk: the spare places were never written, so they hold no memory, and shrinking
        // copies every row (~27 MB at a million objects, beside the old ones, as planning starts).
        self.rows = rows;
    }

    /// The position of `key` (the catalog sorted by [`Catalog::sort_and_dedup`]).
    pub fn position(&self, key: &ItemKey) -> Option<u32> {
        let (mut lo, mut hi) = (0u32, self.rows.len() as u32);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.cmp_key(mid, key) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Keeps the objects whose key's parts (group, resource, namespace, name) `keep` accepts, in
    /// order; the arena is packed again when most of it is no longer pointed at.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str, Option<&str>, &str) -> bool) {
        let mut rows = std::mem::take(&mut self.rows);
        let before = rows.len();
        rows.retain(|row| {
            let (g, r) = self.types.get(row.ty as usize).map_or(("", ""), |gr| (&gr.group, &gr.resource));
            keep(g, r, self.namespaces.get(row.ns as usize).map(|n| &**n), self.record(row).0)
        });
        self.rows = rows;
        if self.rows.len() == before {
            return;
        }
        self.dropped += before - self.rows.len();
        if self.dropped > self.rows.len() {
            self.repack();
        }
    }

    /// Copies the live records into a new arena.
    fn repack(&mut self) {
        let old = std::mem::take(self);
        let mut new = Catalog { types: old.types.clone(), ..Catalog::default() };
        for i in 0..old.len() as u32 {
            let it = old.item(i);
            if let Err(e) = new.push(&it) {
                // Each fitted before; a failure now is a defect, reported.
                tracing::error!("{e}");
            }
        }
        *self = new;
    }
}

/// The order of a catalog's types and namespaces (each table in the order it was met).
struct Ranks {
    ty: Vec<u32>,
    ns: Vec<u32>,
}

impl Ranks {
    fn of(c: &Catalog) -> Ranks {
        let rank = |order: Vec<usize>| {
            let mut r = vec![0u32; order.len()];
            for (rank, i) in order.into_iter().enumerate() {
                r[i] = rank as u32;
            }
            r
        };
        let mut ty: Vec<usize> = (0..c.types.len()).collect();
        ty.sort_by(|&a, &b| c.types[a].cmp(&c.types[b]));
        let mut ns: Vec<usize> = (0..c.namespaces.len()).collect();
        ns.sort_by(|&a, &b| c.namespaces[a].cmp(&c.namespaces[b]));
        Ranks { ty: rank(ty), ns: rank(ns) }
    }

    /// Cluster-scoped first, as `None` orders before `Some`.
    fn ns(&self, id: u32) -> Option<u32> {
        self.ns.get(id as usize).copied()
    }
}

/// `n` as LEB128 (in the array's first bytes: as many as the count says).
fn len_prefix(mut n: usize) -> ([u8; 10], usize) {
    let mut out = [0u8; 10];
    for (i, slot) in out.iter_mut().enumerate() {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            *slot = b;
            return (out, i + 1);
        }
        *slot = b | 0x80;
    }
    (out, out.len())
}

/// Reads a LEB128 length: the length and what follows it (a damaged one reads as 0).
fn get_len(bytes: &[u8]) -> (usize, &[u8]) {
    let mut n = 0usize;
    for (i, b) in bytes.iter().enumerate().take(10) {
        n |= ((b & 0x7f) as usize).checked_shl(7 * i as u32).unwrap_or(0);
        if b & 0x80 == 0 {
            return (n, &bytes[i + 1..]);
        }
    }
    (0, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::{PodFacts, ResourceType};
    use serde_json::json;

    fn item(rt: &ResourceType, obj: serde_json::Value) -> Item {
        Item::from_value(rt, 0, obj).unwrap()
    }

    /// Every item reads back as it went in — key, flags, body, labels, annotations, JSON, a pod's
    /// facts, kept strings — and the catalog sorts and finds keys in [`ItemKey`]'s order, the
    /// first of a key listed twice kept.
    #[test]
    fn items_read_back_as_they_went_in_sorted_by_key() {
        let pods = ResourceType::new("", "v1", "pods", "Pod", true);
        let pvs = ResourceType::new("", "v1", "persistentvolumes", "PersistentVolume", false);
        let crbs = ResourceType::new("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "X", false);
        let mut items = Vec::new();
        let mut pod = item(
            &pods,
            json!({"metadata": {"namespace": "b", "name": "p", "labels": {"app": "x"},
                "annotations": {"pre.hook.backup.velero.io/command": "[\"true\"]"}, "deletionTimestamp": "t"},
                "spec": {"volumes": [{"persistentVolumeClaim": {"claimName": "c"}}]}}),
        );
        pod.keep_pod_facts(PodFacts::of(
            &json!({"spec": {"containers": [{"name": "a"}]}, "status": {"phase": "Running"}}),
        ));
        pod.body = Some(7);
        items.push(pod);
        let mut pv = item(&pvs, json!({"metadata": {"name": "v"}, "spec": {"csi": {"driver": "d"}}}));
        pv.keep_strings(vec![(Box::from("/spec/csi/driver"), Box::from("d"))].into_boxed_slice());
        items.push(pv);
        items.push(item(&crbs, json!({"metadata": {"name": "r"}, "subjects": [{"kind": "ServiceAccount"}]})));
        items.push(Item::of_key(ItemKey::namespaced("", "pods", "a", "q")));
        items.push(Item::of_key(ItemKey::namespaced("", "pods", "a", "")));
        let mut dup = Item::of_key(ItemKey::namespaced("", "pods", "b", "p"));
        dup.body = Some(99);
        items.push(dup);
        items.push(Item::of_key(ItemKey::namespaced("", "configmaps", "a", "q")));
        let mut c = Catalog::of_items(items.clone()).unwrap();
        assert_eq!(c.len(), items.len());
        for (i, it) in items.iter().enumerate() {
            assert_eq!(&c.item(i as u32), it, "item {i}");
            assert_eq!(c.digest(i as u32), it.key.digest());
        }
        c.sort_and_dedup();
        let mut want: Vec<&Item> = items.iter().collect();
        want.sort_by(|a, b| a.key.cmp(&b.key));
        want.dedup_by(|a, b| a.key == b.key);
        let got: Vec<Item> = c.items().collect();
        assert_eq!(got.iter().collect::<Vec<_>>(), want);
        assert_eq!(c.position(&items[0].key).map(|i| c.body(i)), Some(Some(7)), "the first of a key stays");
        for (i, it) in got.iter().enumerate() {
            assert_eq!(c.position(&it.key), Some(i as u32));
        }
        assert_eq!(c.position(&ItemKey::namespaced("", "pods", "a", "r")), None);
        assert_eq!(c.position(&ItemKey::cluster("", "pods", "q")), None);
        // Without what they keep: keys and bodies only.
        let mut bare = Catalog::of_items(got.clone()).unwrap();
        bare.drop_kept();
        for (i, it) in got.iter().enumerate() {
            let i = i as u32;
            assert_eq!((bare.key(i), bare.body(i), bare.item(i).deleting), (it.key.clone(), it.body, it.deleting));
            assert!(bare.item(i).labels().is_empty() && !bare.item(i).has_object());
        }
        // Most objects dropped: the rest read back the same from a packed-again arena.
        let keep = got[0].key.clone();
        c.retain(|g, r, ns, name| ItemKey::new(g, r, ns, name) == keep);
        assert_eq!(c.items().collect::<Vec<_>>(), vec![got[0].clone()]);
    }

    /// A row is 16 bytes; an arena place fits its 32 bits while the chunk is below 4,096 and the
    /// offset inside 1 MiB, and reads back as the arena's own number.
    #[test]
    fn a_row_is_16_bytes_and_its_place_round_trips() {
        assert_eq!(std::mem::size_of::<Row>(), 16);
        for (chunk, offset) in [(0u64, 0u64), (0, (1 << 20) - 1), (4095, 17), (12, 1 << 19)] {
            let at = (chunk << 32) | offset;
            assert_eq!(short_at(at).map(long_at), Some(at), "chunk {chunk} offset {offset}");
        }
        assert_eq!(short_at(4096 << 32), None);
        assert_eq!(short_at(1 << 20), None);
        // A catalog refuses an object whose body's number does not fit, and keeps the others.
        let mut c = Catalog::new();
        let mut it = Item::of_key(ItemKey::namespaced("", "configmaps", "ns", "a"));
        it.body = Some(u64::from(u32::MAX));
        assert!(matches!(c.push(&it), Err(CatalogError::Full { what: "body numbers", .. })));
        it.body = Some(u64::from(u32::MAX) - 1);
        c.push(&it).unwrap();
        assert_eq!((c.len(), c.body(0)), (1, Some(u64::from(u32::MAX) - 1)));
    }

    #[test]
    fn lengths_round_trip_and_damage_reads_as_nothing() {
        for n in [0usize, 1, 127, 128, 300, 1 << 20, usize::MAX] {
            let (head, len) = len_prefix(n);
            let mut b = head[..len].to_vec();
            b.push(9);
            assert_eq!(get_len(&b), (n, &[9u8][..]));
        }
        assert_eq!(get_len(&[0x80, 0x80]), (0, &[][..]));
        let it = {
            let mut it = Item::of_key(ItemKey::cluster("", "x", "y"));
            it.unpack_kept(&[1, 2, 3]).unwrap_err();
            it
        };
        assert_eq!(it, Item::of_key(ItemKey::cluster("", "x", "y")));
    }
}
