//! The item model: what one Kubernetes object is to the engine.
//!
//! An [`Item`] is parsed once from the object's JSON as the cluster returned it. Its identity is an
//! [`ItemKey`] (group, resource, namespace, name); uid and resourceVersion are recorded but are not
//! part of the key, so a re-created object with the same name is the same item. Parsing never
//! panics: an object without a name, with a name that would escape the store directory, or that is
//! not a JSON object becomes an [`ItemError`] naming the resource and what was wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A group and resource, e.g. `apps` / `deployments`; the core group is the empty string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupResource {
    /// API group, empty for the core group.
    pub group: String,
    /// Plural resource name, lower case.
    pub resource: String,
}

impl GroupResource {
    /// Builds a group/resource pair.
    pub fn new(group: &str, resource: &str) -> Self {
        GroupResource { group: group.to_string(), resource: resource.to_string() }
    }

    /// Velero's directory name: `<resource>` for the core group, `<resource>.<group>` otherwise.
    pub fn dir_name(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

impl fmt::Display for GroupResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dir_name())
    }
}

/// One listable resource type found by discovery, at its preferred version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceType {
    /// Group and plural resource.
    pub gr: GroupResource,
    /// The preferred version, e.g. `v1`.
    pub version: String,
    /// The kind, e.g. `Pod`.
    pub kind: String,
    /// Whether objects of this type live in a namespace.
    pub namespaced: bool,
}

impl ResourceType {
    /// Builds a resource type.
    pub fn new(group: &str, version: &str, resource: &str, kind: &str, namespaced: bool) -> Self {
        ResourceType {
            gr: GroupResource::new(group, resource),
            version: version.to_string(),
            kind: kind.to_string(),
            namespaced,
        }
    }

    /// `v1` for the core group, `<group>/<version>` otherwise.
    pub fn api_version(&self) -> String {
        if self.gr.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.gr.group, self.version)
        }
    }
}

/// The identity of an item: uid and resourceVersion are deliberately not part of it.
///
/// Group, resource, namespace and name end to end in one shared string, with where each part
/// ends: 32 bytes and one allocation, shared by every clone (the catalog's item, its block's plan,
/// the events that name it). Four `String`s were 96 bytes and four allocations a key, copied into
/// each holder — at a million objects, hundreds of megabytes. Ordered, compared, hashed and
/// serialized as the four parts (`group`, `resource`, `namespace`, `name`), as before.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ItemKey {
    text: Arc<str>,
    group_end: u32,
    resource_end: u32,
    namespace_end: u32,
    namespaced: bool,
}

impl ItemKey {
    /// A key of its four parts.
    pub fn new(group: &str, resource: &str, namespace: Option<&str>, name: &str) -> Self {
        let ns = namespace.unwrap_or("");
        let mut text = String::with_capacity(group.len() + resource.len() + ns.len() + name.len());
        for part in [group, resource, ns, name] {
            text.push_str(part);
        }
        // Parts are bounded far below 4 GiB (a log record, an API object); saturate regardless.
        let end = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        ItemKey {
            group_end: end(group.len()),
            resource_end: end(group.len() + resource.len()),
            namespace_end: end(group.len() + resource.len() + ns.len()),
            namespaced: namespace.is_some(),
            text: Arc::from(text),
        }
    }

    /// A namespaced key.
    pub fn namespaced(group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        ItemKey::new(group, resource, Some(namespace), name)
    }

    /// A cluster-scoped key.
    pub fn cluster(group: &str, resource: &str, name: &str) -> Self {
        ItemKey::new(group, resource, None, name)
    }

    fn part(&self, from: u32, to: u32) -> &str {
        self.text.get(from as usize..to as usize).unwrap_or("")
    }

    /// API group, empty for the core group.
    pub fn group(&self) -> &str {
        self.part(0, self.group_end)
    }

    /// Plural resource name.
    pub fn resource(&self) -> &str {
        self.part(self.group_end, self.resource_end)
    }

    /// Namespace, `None` for cluster-scoped objects.
    pub fn namespace(&self) -> Option<&str> {
        self.namespaced.then(|| self.part(self.resource_end, self.namespace_end))
    }

    /// Object name.
    pub fn name(&self) -> &str {
        self.text.get(self.namespace_end as usize..).unwrap_or("")
    }

    /// The same key in another namespace (`None`: cluster-scoped).
    pub fn with_namespace(&self, namespace: Option<&str>) -> Self {
        ItemKey::new(self.group(), self.resource(), namespace, self.name())
    }

    /// The same key with another name.
    pub fn with_name(&self, name: &str) -> Self {
        ItemKey::new(self.group(), self.resource(), self.namespace(), name)
    }

    /// The same object under another group/resource.
    pub fn with_gr(&self, group: &str, resource: &str) -> Self {
        ItemKey::new(group, resource, self.namespace(), self.name())
    }

    fn parts(&self) -> (&str, &str, Option<&str>, &str) {
        (self.group(), self.resource(), self.namespace(), self.name())
    }

    /// A 128-bit digest of the key (sha256 of its parts, each ended by a zero byte, truncated):
    /// what maps of every item use instead of the key itself, ~200 bytes less an item.
    pub fn digest(&self) -> u128 {
        ItemKey::digest_of(self.group(), self.resource(), self.namespace(), self.name())
    }

    /// The digest of the key of these parts ([`ItemKey::digest`]), without making the key.
    pub fn digest_of(group: &str, resource: &str, namespace: Option<&str>, name: &str) -> u128 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [Some(group), Some(resource), namespace, Some(name)] {
            match part {
                Some(p) => {
                    h.update(p.as_bytes());
                    h.update([0u8]);
                }
                // A cluster-scoped key differs from one in the namespace "".
                None => h.update(b"\x01"),
            }
        }
        let d = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&d[..16]);
        u128::from_le_bytes(first)
    }

    /// The key's group/resource.
    pub fn gr(&self) -> GroupResource {
        GroupResource::new(self.group(), self.resource())
    }

    /// Whether this key is of the given group/resource.
    pub fn is(&self, group: &str, resource: &str) -> bool {
        self.group() == group && self.resource() == resource
    }

    /// The item's path inside the archive, in Velero's layout:
    /// `resources/<resource>[.<group>]/namespaces/<ns>/<name>.json` or `…/cluster/<name>.json`.
    pub fn archive_path(&self) -> String {
        self.path_pieces(None).concat()
    }

    /// The preferred-version copy of [`ItemKey::archive_path`]:
    /// `resources/<gr>/<version>-preferredversion/…`.
    pub fn preferred_version_path(&self, version: &str) -> String {
        self.path_pieces(Some(version)).concat()
    }

    /// The pieces whose concatenation is the archive path (with `version`: the preferred-version
    /// copy's): the one definition of the layout, which the store also compares piece by piece
    /// when it sorts an archive's entries without making their paths.
    pub fn path_pieces<'a>(&'a self, version: Option<&'a str>) -> [&'a str; 12] {
        let (dot, group) = if self.group().is_empty() { ("", "") } else { (".", self.group()) };
        let (version, preferred) = match version {
            Some(v) => (v, "-preferredversion/"),
            None => ("", ""),
        };
        let (scope, ns, slash) = match self.namespace() {
            Some(ns) => ("namespaces/", ns, "/"),
            None => ("cluster/", "", ""),
        };
        ["resources/", self.resource(), dot, group, "/", version, preferred, scope, ns, slash, self.name(), ".json"]
    }
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.gr())?;
        match self.namespace() {
            Some(ns) => write!(f, " {}/{}", ns, self.name()),
            None => write!(f, " {}", self.name()),
        }
    }
}

impl fmt::Debug for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ItemKey")
            .field("group", &self.group())
            .field("resource", &self.resource())
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .finish()
    }
}

impl Ord for ItemKey {
    /// By group, resource, namespace (cluster-scoped first), name: the order of the four fields.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl PartialOrd for ItemKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The serialized form: the four parts, as a struct of that name.
#[derive(Serialize)]
#[serde(rename = "ItemKey")]
struct KeyParts<'a> {
    group: &'a str,
    resource: &'a str,
    namespace: Option<&'a str>,
    name: &'a str,
}

#[derive(Deserialize)]
#[serde(rename = "ItemKey")]
struct OwnedKeyParts {
    group: String,
    resource: String,
    namespace: Option<String>,
    name: String,
}

impl Serialize for ItemKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        KeyParts { group: self.group(), resource: self.resource(), namespace: self.namespace(), name: self.name() }
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ItemKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let k = OwnedKeyParts::deserialize(deserializer)?;
        Ok(ItemKey::new(&k.group, &k.resource, k.namespace.as_deref(), &k.name))
    }
}

/// Why an object could not become an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// The bytes were not JSON at all.
    #[error("{resource}: object #{index} is not valid JSON: {reason}")]
    NotJson { resource: String, index: usize, reason: String },
    /// The JSON was not an object.
    #[error("{resource}: object #{index} is not a JSON object")]
    NotAnObject { resource: String, index: usize },
    /// `metadata.name` missing or not a string.
    #[error("{resource}: object #{index} has no metadata.name")]
    MissingName { resource: String, index: usize },
    /// A namespaced object without `metadata.namespace`.
    #[error("{resource} {name}: namespaced object has no metadata.namespace")]
    MissingNamespace { resource: String, name: String },
    /// A name or namespace that is not a safe path component.
    #[error("{resource} {name}: {field} {value:?} is not a valid object name (it could escape the store directory)")]
    UnsafeName { resource: String, name: String, field: &'static str, value: String },
}

/// True when `s` is safe as one path component of a store key: non-empty, at most 253 bytes,
/// not `.`/`..`, no `/`, `\` or control characters.
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// A string-to-string map (an object's labels or annotations) as a sorted vector: most objects
/// have none to a few, and a B-tree map's first leaf costs ~0.5 KiB — at a million objects the
/// planning catalog's labels alone were hundreds of megabytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StrMap(Box<[(String, String)]>);

impl StrMap {
    /// Keeps the entries whose key `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        if self.0.iter().all(|(k, _)| keep(k)) {
            return;
        }
        let kept: Vec<(String, String)> =
            std::mem::take(&mut self.0).into_vec().into_iter().filter(|(k, _)| keep(k)).collect();
        self.0 = kept.into_boxed_slice();
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| &self.0[i].1)
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Entries, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As a B-tree map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl FromIterator<(String, String)> for StrMap {
    /// The last value of a key repeated wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> StrMap {
        let mut v: Vec<(String, String)> = iter.into_iter().collect();
        // Stable sort of the reversed entries: of one key's entries the last given comes first,
        // and dedup keeps it.
        v.reverse();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        StrMap(v.into_boxed_slice())
    }
}

impl From<BTreeMap<String, String>> for StrMap {
    fn from(map: BTreeMap<String, String>) -> StrMap {
        StrMap(map.into_iter().collect())
    }
}

/// Serialized as the map it stands for (the bytes a `BTreeMap<String, String>` gives).
impl Serialize for StrMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for StrMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(StrMap::from)
    }
}

/// Strings of an object by JSON pointer: what planning keeps of a claim or volume ([`Item::strings`]).
pub type KeptStrings = Box<[(Box<str>, Box<str>)]>;

/// One Kubernetes object, parsed.
///
/// 64 bytes: the key, the flag, the body's number and one box for everything planning keeps of
/// the object, which most objects (a ConfigMap, a Secret: nothing but their key is read) do
/// without. As six public fields it was 168 bytes an object — at a million objects the planning
/// catalog's vector alone was 160 MB. Read with [`Item::labels`], [`Item::annotations`],
/// [`Item::object`], [`Item::pod_facts`] and [`Item::str_at`].
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Identity.
    pub key: ItemKey,
    /// Whether `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// The number of the object's canonical JSON in the log once it is logged (`None` until then,
    /// see [`crate::body`]).
    pub body: Option<crate::body::BodyId>,
    /// What is kept of the object beyond its key: `None` when nothing is.
    kept: Option<Box<Kept>>,
}

/// What an [`Item`] keeps of its object beyond its key.
#[derive(Debug, Clone, Default, PartialEq)]
struct Kept {
    /// `metadata.labels`.
    labels: StrMap,
    /// `metadata.annotations`.
    annotations: StrMap,
    /// The whole object as returned by the API server (planning may keep only what it reads).
    object: Value,
    /// What planning reads of a pod, kept instead of its JSON (`object` is then null) when no
    /// user action reads pods: a pod's projected JSON cost ~2.5 KiB of B-tree nodes.
    pod: Option<Box<PodFacts>>,
    /// The strings planning reads of a claim or volume, by JSON pointer, kept instead of its JSON
    /// (`object` is then null): a claim's two strings as JSON maps cost ~1.9 KiB of B-tree nodes.
    strings: Option<KeptStrings>,
}

impl Kept {
    fn is_empty(&self) -> bool {
        self.labels.is_empty()
            && self.annotations.is_empty()
            && self.object.is_null()
            && self.pod.is_none()
            && self.strings.is_none()
    }
}

static EMPTY_MAP: std::sync::LazyLock<StrMap> = std::sync::LazyLock::new(StrMap::default);
static NULL: Value = Value::Null;

/// What hooks and the built-in actions read of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodFacts {
    /// `status.phase`.
    pub phase: Option<String>,
    /// `spec.containers[].name`, in order.
    pub containers: Vec<String>,
    /// `spec.volumes[].persistentVolumeClaim.claimName`, the non-empty ones, in order.
    pub claims: Vec<String>,
    /// `spec.priorityClassName`.
    pub priority_class: Option<String>,
}

impl PodFacts {
    /// The facts of a pod's JSON.
    pub fn of(pod: &Value) -> PodFacts {
        let s = |p: &str| pod.pointer(p).and_then(Value::as_str).map(str::to_string);
        let array = |p: &str| pod.pointer(p).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        PodFacts {
            phase: s("/status/phase"),
            containers: array("/spec/containers")
                .iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                .collect(),
            claims: array("/spec/volumes")
                .iter()
                .filter_map(|v| v.pointer("/persistentVolumeClaim/claimName").and_then(Value::as_str))
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
            priority_class: s("/spec/priorityClassName"),
        }
    }
}

impl Item {
    /// Parses an object listed for resource type `rt`; `index` names it in errors.
    pub fn parse(rt: &ResourceType, index: usize, json: &str) -> Result<Item, ItemError> {
        let value: Value = serde_json::from_str(json).map_err(|e| ItemError::NotJson {
            resource: rt.gr.to_string(),
            index,
            reason: e.to_string(),
        })?;
        Item::from_value(rt, index, value)
    }

    /// Builds an item from an already parsed object.
    pub fn from_value(rt: &ResourceType, index: usize, object: Value) -> Result<Item, ItemError> {
        let resource = rt.gr.to_string();
        if !object.is_object() {
            return Err(ItemError::NotAnObject { resource, index });
        }
        let meta = object.get("metadata");
        let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str).map(str::to_string);
        let name = field("name").ok_or_else(|| ItemError::MissingName { resource: resource.clone(), index })?;
        if !is_safe_name(&name) {
            return Err(ItemError::UnsafeName { resource, name: name.clone(), field: "name", value: name });
        }
        let namespace = if rt.namespaced {
            let ns = field("namespace")
                .ok_or_else(|| ItemError::MissingNamespace { resource: resource.clone(), name: name.clone() })?;
            if !is_safe_name(&ns) {
                return Err(ItemError::UnsafeName { resource, name, field: "namespace", value: ns });
            }
            Some(ns)
        } else {
            None
        };
        let map = |k: &str| -> StrMap {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_object)
                .map(|o| o.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect())
                .unwrap_or_default()
        };
        let deleting = meta.and_then(|m| m.get("deletionTimestamp")).is_some_and(|v| !v.is_null());
        let mut it = Item::of_key(ItemKey::new(&rt.gr.group, &rt.gr.resource, namespace.as_deref(), &name));
        it.deleting = deleting;
        it.set_kept(Kept { labels: map("labels"), annotations: map("annotations"), object, pod: None, strings: None });
        Ok(it)
    }

    /// An item of nothing but its key: no labels, annotations or object kept.
    pub fn of_key(key: ItemKey) -> Item {
        Item { key, deleting: false, body: None, kept: None }
    }

    fn set_kept(&mut self, kept: Kept) {
        self.kept = (!kept.is_empty()).then(|| Box::new(kept));
    }

    /// Changes what is kept with `change`, in its box (made when there is none; dropped when
    /// nothing is left in it).
    fn change_kept<R>(&mut self, change: impl FnOnce(&mut Kept) -> R) -> R {
        let kept = self.kept.get_or_insert_with(Box::default);
        let r = change(kept);
        if kept.is_empty() {
            self.kept = None;
        }
        r
    }

    /// `metadata.labels` (as planning kept them).
    pub fn labels(&self) -> &StrMap {
        self.kept.as_ref().map_or(&EMPTY_MAP, |k| &k.labels)
    }

    /// `metadata.annotations` (as planning kept them).
    pub fn annotations(&self) -> &StrMap {
        self.kept.as_ref().map_or(&EMPTY_MAP, |k| &k.annotations)
    }

    /// The object's JSON as planning kept it (null when only facts or strings of it were kept,
    /// or nothing).
    pub fn object(&self) -> &Value {
        self.kept.as_ref().map_or(&NULL, |k| &k.object)
    }

    /// Keeps the labels whose key `keep` accepts.
    pub fn retain_labels(&mut self, keep: impl Fn(&str) -> bool) {
        if self.kept.is_some() {
            self.change_kept(|k| k.labels.retain(keep));
        }
    }

    /// Keeps the annotations whose key `keep` accepts.
    pub fn retain_annotations(&mut self, keep: impl Fn(&str) -> bool) {
        if self.kept.is_some() {
            self.change_kept(|k| k.annotations.retain(keep));
        }
    }

    /// Drops the annotations.
    pub fn clear_annotations(&mut self) {
        if self.kept.is_some() {
            self.change_kept(|k| k.annotations = StrMap::default());
        }
    }

    /// Takes the object's JSON out (null left in its place).
    pub fn take_object(&mut self) -> Value {
        match self.kept {
            Some(_) => self.change_kept(|k| std::mem::take(&mut k.object)),
            None => Value::Null,
        }
    }

    /// Sets the object's JSON.
    pub fn set_object(&mut self, object: Value) {
        self.change_kept(|k| k.object = object);
    }

    /// Keeps `facts` of this pod instead of its JSON (which is dropped).
    pub fn keep_pod_facts(&mut self, facts: PodFacts) {
        self.change_kept(|k| {
            k.object = Value::Null;
            k.pod = Some(Box::new(facts));
        });
    }

    /// Keeps `strings` of the object instead of its JSON (which is dropped).
    pub fn keep_strings(&mut self, strings: KeptStrings) {
        self.change_kept(|k| {
            k.object = Value::Null;
            k.strings = Some(strings);
        });
    }

    /// The facts planning kept of this pod, when it kept them instead of its JSON.
    pub fn kept_pod_facts(&self) -> Option<&PodFacts> {
        self.kept.as_ref().and_then(|k| k.pod.as_deref())
    }

    /// The facts planning reads of this pod: kept ones, or read from its JSON.
    pub fn pod_facts(&self) -> std::borrow::Cow<'_, PodFacts> {
        match self.kept_pod_facts() {
            Some(f) => std::borrow::Cow::Borrowed(f),
            None => std::borrow::Cow::Owned(PodFacts::of(self.object())),
        }
    }

    fn strings(&self) -> Option<&KeptStrings> {
        self.kept.as_ref().and_then(|k| k.strings.as_ref())
    }

    /// A string at a JSON pointer inside the object (e.g. `/spec/volumeName`): of the kept
    /// strings when planning kept only those.
    pub fn str_at(&self, pointer: &str) -> Option<&str> {
        match self.strings() {
            Some(kept) => kept.iter().find(|(p, _)| &**p == pointer).map(|(_, s)| &**s),
            None => self.object().pointer(pointer).and_then(Value::as_str),
        }
    }

    /// Whether planning kept anything of the object (its JSON, or strings of it).
    pub fn has_object(&self) -> bool {
        self.strings().is_some() || !self.object().is_null()
    }

    /// The object as planning kept it: its JSON, or the kept strings made into the maps they were
    /// read from.
    pub fn kept_object(&self) -> std::borrow::Cow<'_, Value> {
        let Some(kept) = self.strings() else { return std::borrow::Cow::Borrowed(self.object()) };
        let mut out = Value::Object(serde_json::Map::new());
        for (pointer, s) in kept.iter() {
            let parts: Vec<&str> = pointer.split('/').filter(|p| !p.is_empty()).collect();
            set_at(&mut out, &parts, Value::String(s.to_string()));
        }
        std::borrow::Cow::Owned(out)
    }

    /// The canonical JSON of the object: compact, keys sorted. This is what gets written.
    pub fn canonical_json(&self) -> Vec<u8> {
        // serde_json's Map is a BTreeMap (no preserve_order feature), so keys come out sorted.
        serde_json::to_vec(self.object()).unwrap_or_default()
    }
}

/// What an item keeps, as the catalog packs it ([`Item::pack_kept`]): the JSON as its text.
#[derive(Serialize)]
struct PackedRef<'a> {
    labels: &'a StrMap,
    annotations: &'a StrMap,
    object: Option<String>,
    pod: Option<&'a PodFacts>,
    strings: Option<&'a [(Box<str>, Box<str>)]>,
}

/// [`PackedRef`] read back.
#[derive(Deserialize)]
struct Packed {
    labels: StrMap,
    annotations: StrMap,
    object: Option<String>,
    pod: Option<PodFacts>,
    strings: Option<Vec<(Box<str>, Box<str>)>>,
}

/// Why packed bytes could not be read back as what an item keeps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("packed item: {0}")]
pub struct UnpackError(String);

impl Item {
    /// Appends what the item keeps beyond its key, packed (bincode; the JSON as text), to `out`;
    /// `false` (nothing appended) when it keeps nothing. Read back with [`Item::unpack_kept`].
    pub fn pack_kept(&self, out: &mut Vec<u8>) -> Result<bool, UnpackError> {
        let Some(k) = self.kept.as_deref() else { return Ok(false) };
        let object = match &k.object {
            Value::Null => None,
            v => Some(serde_json::to_string(v).map_err(|e| UnpackError(e.to_string()))?),
        };
        let packed = PackedRef {
            labels: &k.labels,
            annotations: &k.annotations,
            object,
            pod: k.pod.as_deref(),
            strings: k.strings.as_deref(),
        };
        bincode::serde::encode_into_std_write(&packed, out, bincode::config::standard())
            .map_err(|e| UnpackError(e.to_string()))?;
        Ok(true)
    }

    /// Sets what the item keeps from bytes [`Item::pack_kept`] made.
    pub fn unpack_kept(&mut self, bytes: &[u8]) -> Result<(), UnpackError> {
        let (p, used): (Packed, usize) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .map_err(|e| UnpackError(e.to_string()))?;
        if used != bytes.len() {
            return Err(UnpackError(format!("{} bytes after the record", bytes.len() - used)));
        }
        let object = match p.object {
            Some(text) => serde_json::from_str(&text).map_err(|e| UnpackError(e.to_string()))?,
            None => Value::Null,
        };
        self.set_kept(Kept {
            labels: p.labels,
            annotations: p.annotations,
            object,
            pod: p.pod.map(Box::new),
            strings: p.strings.map(Vec::into_boxed_slice),
        });
        Ok(())
    }
}

/// Sets `value` at the path `parts` inside `at`, making the maps on the way.
pub(crate) fn set_at(at: &mut Value, parts: &[&str], value: Value) {
    let (Some(map), Some((first, rest))) = (at.as_object_mut(), parts.split_first()) else { return };
    if rest.is_empty() {
        map.insert(first.to_string(), value);
    } else {
        let next = map.entry(first.to_string()).or_insert_with(|| Value::Object(serde_json::Map::new()));
        set_at(next, rest, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_is_64_bytes_and_keeps_nothing_it_need_not() {
        assert_eq!(std::mem::size_of::<Item>(), 64);
        let mut it =
            Item::parse(&pods(), 0, r#"{"metadata":{"namespace":"a","name":"p","labels":{"x":"1"}}}"#).unwrap();
        assert_eq!(it.labels().get("x").map(String::as_str), Some("1"));
        it.retain_labels(|_| false);
        assert!(it.labels().is_empty());
        assert!(it.object().is_object());
        it.take_object();
        assert!(it.kept.is_none(), "an item that keeps nothing holds no box");
    }

    fn pods() -> ResourceType {
        ResourceType::new("", "v1", "pods", "Pod", true)
    }

    #[test]
    fn key_digests_differ_where_keys_do() {
        let keys = [
            ItemKey::namespaced("", "configmaps", "ns", "a"),
            ItemKey::namespaced("", "configmaps", "ns", "b"),
            ItemKey::namespaced("", "configmaps", "nsa", ""),
            ItemKey::namespaced("", "configmap", "sns", "a"),
            ItemKey::namespaced("", "configmaps", "", "a"),
            ItemKey::cluster("", "configmaps", "a"),
            ItemKey::namespaced("x", "configmaps", "ns", "a"),
        ];
        let digests: std::collections::BTreeSet<u128> = keys.iter().map(ItemKey::digest).collect();
        assert_eq!(digests.len(), keys.len());
        assert_eq!(keys[0].digest(), keys[0].clone().digest());
    }

    /// The four fields the key was before it became one shared string: its order, equality and
    /// serialized bytes (JSON and the log's bincode) must be this struct's.
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
    struct FourFields {
        group: String,
        resource: String,
        namespace: Option<String>,
        name: String,
    }

    #[test]
    fn a_key_orders_compares_and_serializes_as_its_four_fields() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        // Short strings over few letters, the empty string included: prefixes and equal parts abound.
        let part = || "[ab]{0,3}";
        let fields = (part(), part(), prop::option::of(part()), part())
            .prop_map(|(group, resource, namespace, name)| FourFields { group, resource, namespace, name });
        let key = |f: &FourFields| ItemKey::new(&f.group, &f.resource, f.namespace.as_deref(), &f.name);
        let config = Config { cases: 2000, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[23; 32]));
        let result = runner.run(&(fields.clone(), fields), |(a, b)| {
            let (ka, kb) = (key(&a), key(&b));
            prop_assert_eq!(
                (ka.group(), ka.resource(), ka.namespace(), ka.name()),
                (a.group.as_str(), a.resource.as_str(), a.namespace.as_deref(), a.name.as_str())
            );
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
            prop_assert_eq!(ka.clone().cmp(&ka), std::cmp::Ordering::Equal);
            let json = serde_json::to_string(&ka).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&json, &serde_json::to_string(&a).map_err(|e| TestCaseError::fail(e.to_string()))?);
            let back: ItemKey = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, &ka);
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(&ka, cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let old = bincode::serde::encode_to_vec(&a, cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&bytes, &old);
            let (back, _): (ItemKey, usize) =
                bincode::serde::decode_from_slice(&bytes, cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, ka);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        // Hashes agree with equality: a key and its rebuilt copy land in one set entry.
        let a = ItemKey::namespaced("apps", "deployments", "ns", "web");
        let set: std::collections::HashSet<ItemKey> =
            [a.clone(), a.with_name("web"), ItemKey::cluster("apps", "deployments", "nsweb")].into();
        assert_eq!(set.len(), 2);
        assert_eq!(a.with_namespace(None), ItemKey::cluster("apps", "deployments", "web"));
        assert_eq!(a.with_gr("", "pods").archive_path(), "resources/pods/namespaces/ns/web.json");
    }

    #[test]
    fn a_string_map_serializes_as_the_map_it_stands_for() {
        let map: BTreeMap<String, String> =
            [("b", "2"), ("a", "1"), ("velero.io/x", "")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let strs = StrMap::from(map.clone());
        assert_eq!(serde_json::to_string(&strs).unwrap(), serde_json::to_string(&map).unwrap());
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&strs, cfg).unwrap();
        assert_eq!(bytes, bincode::serde::encode_to_vec(&map, cfg).unwrap());
        let (back, _): (StrMap, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, strs);
        let back: StrMap = serde_json::from_str(r#"{"z":"1","a":"2"}"#).unwrap();
        assert_eq!(back.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a", "z"]);
    }

    #[test]
    fn archive_paths_follow_velero_layout() {
        let k = ItemKey::namespaced("", "pods", "ns1", "web-0");
        assert_eq!(k.archive_path(), "resources/pods/namespaces/ns1/web-0.json");
        assert_eq!(k.preferred_version_path("v1"), "resources/pods/v1-preferredversion/namespaces/ns1/web-0.json");
        let k = ItemKey::cluster("rbac.authorization.k8s.io", "clusterroles", "admin");
        assert_eq!(k.archive_path(), "resources/clusterroles.rbac.authorization.k8s.io/cluster/admin.json");
    }

    #[test]
    fn parse_errors_name_the_object() {
        let e = Item::parse(&pods(), 3, r#"{"metadata":{"namespace":"a"}}"#).unwrap_err();
        assert_eq!(e.to_string(), "pods: object #3 has no metadata.name");
        let e = Item::parse(&pods(), 0, r#"{"metadata":{"name":"x"}}"#).unwrap_err();
        assert_eq!(e.to_string(), "pods x: namespaced object has no metadata.namespace");
        let e = Item::parse(&pods(), 0, r#"{"metadata":{"name":"../../etc","namespace":"a"}}"#).unwrap_err();
        assert!(e.to_string().contains("could escape the store directory"), "{e}");
        let e = Item::parse(&pods(), 0, r#"{"metadata":{"name":"x","namespace":".."}}"#).unwrap_err();
        assert!(e.to_string().contains("namespace \"..\""), "{e}");
        let e = Item::parse(&pods(), 1, "[1]").unwrap_err();
        assert_eq!(e.to_string(), "pods: object #1 is not a JSON object");
        let e = Item::parse(&pods(), 1, "{").unwrap_err();
        assert!(e.to_string().starts_with("pods: object #1 is not valid JSON"), "{e}");
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let it = Item::parse(&pods(), 0, r#"{"z":1,"metadata":{"namespace":"a","name":"p"},"a":2}"#).unwrap();
        assert_eq!(
            String::from_utf8(it.canonical_json()).unwrap(),
            r#"{"a":2,"metadata":{"name":"p","namespace":"a"},"z":1}"#
        );
    }
}
