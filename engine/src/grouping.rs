//! ItemBlock formation (DESIGN §3): which items are in the backup, and which go together.
//!
//! Relations come from [`ItemBlockAction`]s. Each relation carries two independent flags:
//! `together` (same block, same hook window) and `pull` (the target is in the backup whenever the
//! source is). The backup's items are the selected items plus their pull closure, exclusions
//! always winning; blocks are the connected components of `together` over those items. This rules
//! out Velero's first-reach-wins grouping, which can split a group depending on listing order.
//!
//! Lookups go through an [`Index`] built once per plan, so the built-in PVC action finds the pods
//! mounting a claim by hash lookup instead of scanning every pod per PVC (Velero #9169): planning
//! is O(items + relations) plus the sorts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::body::BodyId;
use crate::catalog::Catalog;
use crate::hooks::{resolve_pod_hooks, Hook};
use crate::item::{GroupResource, Item, ItemKey, ResourceType};
use crate::spec::{find_resource, Selection};

/// A relation from one item to another.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Relation {
    /// Target of the relation.
    pub to: ItemKey,
    /// Source and target must share a block.
    pub together: bool,
    /// The target is in the backup whenever the source is.
    pub pull: bool,
}

/// A source of relations. Users implement this to group their own resources.
pub trait ItemBlockAction: Send + Sync {
    /// Name used in diagnostics.
    fn name(&self) -> &str;
    /// Appends the relations of `item` to `out`. Must be a pure function of `item` and `index`.
    fn relations(&self, item: &Item, index: &Index, out: &mut Vec<Relation>);
    /// Whether this action reads the object bodies (`Item::object`) of resource `gr`, of the item
    /// itself or through the [`Index`]. Bodies nobody reads are dropped before planning, so a
    /// cluster's ConfigMaps and Secrets are not held in memory as parsed JSON. Default: all.
    fn reads(&self, gr: &GroupResource) -> bool {
        let _ = gr;
        true
    }
}

/// Lookups over every item known to the plan (listed or fetched), sorted by key: a packed
/// [`Catalog`] and the lookups the built-in actions make. Items are made when asked for
/// ([`Index::get`], [`Index::item`]), each for the moment it is looked at.
pub struct Index {
    catalog: Catalog,
    /// Pods by (namespace, a claim they mount).
    pods_by_claim: Lookup,
    /// Claims by (namespace, their volume-group label's value).
    pvcs_by_group: Lookup,
    /// ClusterRoleBindings by (namespace, name) of a ServiceAccount subject.
    crbs_by_sa: Lookup,
    volume_group_label: Box<str>,
}

/// Positions found by a 64-bit hash of two names (a namespace and a name), sorted: 16 bytes an
/// entry, where a map of boxed names to vectors of positions was ~100 (~11 MB of planning's
/// peak at a million objects). Two pairs of names can share a hash, so whoever looks up checks
/// each item it gets back ([`Index::pods_mounting`] and the others do).
#[derive(Default)]
struct Lookup(Vec<(u64, u32)>);

impl Lookup {
    fn hash(ns: &str, name: &str) -> u64 {
        use std::hash::Hasher;
        // SipHash with fixed keys: the same in every run (nothing hashed here is kept).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(ns.as_bytes());
        h.write_u8(0xff);
        h.write(name.as_bytes());
        h.finish()
    }

    fn push(&mut self, ns: &str, name: &str, i: u32) {
        self.0.push((Lookup::hash(ns, name), i));
    }

    /// Sorts the entries (positions in ascending order under one hash) and drops repeats.
    fn seal(&mut self) {
        self.0.sort_unstable();
        self.0.dedup();
        self.0.shrink_to_fit();
    }

    /// The positions under the hash of `ns` and `name`, ascending.
    fn get(&self, ns: &str, name: &str) -> impl Iterator<Item = u32> + '_ {
        let h = Lookup::hash(ns, name);
        let from = self.0.partition_point(|e| e.0 < h);
        self.0[from..].iter().take_while(move |e| e.0 == h).map(|e| e.1)
    }
}

const PODS: (&str, &str) = ("", "pods");
const PVCS: (&str, &str) = ("", "persistentvolumeclaims");
const PVS: (&str, &str) = ("", "persistentvolumes");
const SAS: (&str, &str) = ("", "serviceaccounts");
const RBAC: &str = "rbac.authorization.k8s.io";

/// Claim names a pod mounts, from `spec.volumes[].persistentVolumeClaim.claimName`.
pub fn pod_claims(pod: &Item) -> Vec<String> {
    pod.pod_facts().claims.clone()
}

impl Index {
    /// Builds the index of `items` (in any order). Later duplicates of a key are dropped (the
    /// first listing wins). An item the catalog cannot take is left out, with a warning.
    pub fn new(items: Vec<Item>, volume_group_label: &str) -> Index {
        let mut catalog = Catalog::new();
        for it in items {
            if let Err(e) = catalog.push(&it) {
                tracing::warn!("{e}");
            }
        }
        Index::of(catalog, volume_group_label)
    }

    /// Builds the index over `catalog`, which is sorted by key here (the first of a key kept).
    pub fn of(mut catalog: Catalog, volume_group_label: &str) -> Index {
        catalog.sort_and_dedup();
        let mut ix = Index {
            pods_by_claim: Lookup::default(),
            pvcs_by_group: Lookup::default(),
            crbs_by_sa: Lookup::default(),
            volume_group_label: volume_group_label.into(),
            catalog: Catalog::new(),
        };
        for i in 0..catalog.len() as u32 {
            let (g, r) = catalog.group_resource(i);
            let watched = (g, r) == PODS || (g, r) == PVCS || (g, r) == (RBAC, "clusterrolebindings");
            if !watched {
                continue;
            }
            let it = catalog.item(i);
            let ns = it.key.namespace().unwrap_or("");
            if (g, r) == PODS {
                for c in &it.pod_facts().claims {
                    ix.pods_by_claim.push(ns, c, i);
                }
            } else if (g, r) == PVCS {
                if let Some(grp) = it.labels().get(volume_group_label).filter(|g| !g.is_empty()) {
                    ix.pvcs_by_group.push(ns, grp, i);
                }
            } else {
                for (sa_ns, sa) in service_account_subjects(&it) {
                    ix.crbs_by_sa.push(sa_ns, sa, i);
                }
            }
        }
        for l in [&mut ix.pods_by_claim, &mut ix.pvcs_by_group, &mut ix.crbs_by_sa] {
            l.seal();
        }
        ix.catalog = catalog;
        ix
    }

    /// The catalog, sorted by key (the index is not needed any more).
    pub fn into_catalog(self) -> Catalog {
        self.catalog
    }

    /// The sorted catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// How many items.
    pub fn len(&self) -> usize {
        self.catalog.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.catalog.is_empty()
    }

    /// The item at position `i` (in key order), made.
    pub fn item(&self, i: u32) -> Item {
        self.catalog.item(i)
    }

    /// The item with this key, if known (made): a binary search of the sorted catalog.
    pub fn get(&self, key: &ItemKey) -> Option<Item> {
        self.position(key).map(|i| self.catalog.item(i))
    }

    /// The position of the item with this key, if known.
    pub fn position(&self, key: &ItemKey) -> Option<u32> {
        self.catalog.position(key)
    }

    /// Every item, sorted by key, made one at a time.
    pub fn items(&self) -> impl Iterator<Item = Item> + '_ {
        self.catalog.items()
    }

    /// The items of `lookup` under `ns` and `name` that `is` holds to be theirs (a hash's other
    /// pairs of names are not).
    fn found<'a>(
        &'a self,
        lookup: &'a Lookup,
        ns: &'a str,
        name: &'a str,
        is: impl Fn(&Item) -> bool + 'a,
    ) -> impl Iterator<Item = Item> + 'a {
        lookup.get(ns, name).map(|i| self.catalog.item(i)).filter(move |it| is(it))
    }

    /// Pods in `ns` whose volumes mount claim `claim`.
    pub fn pods_mounting<'a>(&'a self, ns: &'a str, claim: &'a str) -> impl Iterator<Item = Item> + 'a {
        self.found(&self.pods_by_claim, ns, claim, move |it| {
            it.key.namespace() == Some(ns) && it.pod_facts().claims.iter().any(|c| c == claim)
        })
    }

    /// PVCs in `ns` with the volume-group label value `group`.
    pub fn pvcs_in_group<'a>(&'a self, ns: &'a str, group: &'a str) -> impl Iterator<Item = Item> + 'a {
        self.found(&self.pvcs_by_group, ns, group, move |it| {
            it.key.namespace() == Some(ns) && it.labels().get(&self.volume_group_label).is_some_and(|g| g == group)
        })
    }

    /// ClusterRoleBindings with a ServiceAccount subject `ns/name`.
    pub fn crbs_naming<'a>(&'a self, ns: &'a str, name: &'a str) -> impl Iterator<Item = Item> + 'a {
        self.found(&self.crbs_by_sa, ns, name, move |it| service_account_subjects(it).any(|s| s == (ns, name)))
    }
}

/// The (namespace, name) of each ServiceAccount subject of a binding (namespace "" when unset).
fn service_account_subjects(binding: &Item) -> impl Iterator<Item = (&str, &str)> {
    let subjects = binding.object().get("subjects").and_then(Value::as_array);
    subjects.into_iter().flatten().filter_map(|s| {
        let field = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("");
        (field("kind") == "ServiceAccount").then(|| (field("namespace"), field("name")))
    })
}

/// Puts `items[order[k]]` at position `k`, for every `k` (`order` a permutation of the positions),
/// moving the items along the permutation's cycles — no second buffer of items.
pub(crate) fn permute_in_place<T>(items: &mut [T], mut order: Vec<u32>) {
    // A placed position is marked `order[k] = k`.
    for start in 0..order.len() {
        let mut k = start;
        loop {
            let from = order[k] as usize;
            order[k] = k as u32;
            if from == start {
                break;
            }
            items.swap(k, from);
            k = from;
        }
    }
}

/// pod → each PVC it mounts (together + pull); pod → its PriorityClass (pull).
pub struct PodAction;

impl ItemBlockAction for PodAction {
    fn name(&self) -> &str {
        "pod"
    }
    fn reads(&self, gr: &GroupResource) -> bool {
        gr.group == PODS.0 && gr.resource == PODS.1
    }
    fn relations(&self, item: &Item, _ix: &Index, out: &mut Vec<Relation>) {
        if !item.key.is(PODS.0, PODS.1) {
            return;
        }
        let ns = item.key.namespace().unwrap_or("");
        for c in pod_claims(item) {
            out.push(Relation { to: ItemKey::namespaced(PVCS.0, PVCS.1, ns, &c), together: true, pull: true });
        }
        if let Some(pc) = item.pod_facts().priority_class.as_deref().filter(|p| !p.is_empty()) {
            out.push(Relation {
                to: ItemKey::cluster("scheduling.k8s.io", "priorityclasses", pc),
                together: false,
                pull: true,
            });
        }
    }
}

/// Bound PVC → PV (together + pull); PVC → Running pods mounting it (together);
/// PVC → same-namespace PVCs in its volume group (together + pull). Unbound PVCs add nothing.
pub struct PvcAction {
    /// The label key that names a volume group.
    pub volume_group_label: String,
}

/// Whether a PVC is bound: `status.phase` is `Bound` and `spec.volumeName` is set.
pub fn pvc_bound(pvc: &Item) -> bool {
    pvc.str_at("/status/phase") == Some("Bound") && pvc.str_at("/spec/volumeName").is_some_and(|v| !v.is_empty())
}

impl ItemBlockAction for PvcAction {
    fn name(&self) -> &str {
        "persistentvolumeclaim"
    }
    fn reads(&self, gr: &GroupResource) -> bool {
        gr.group.is_empty() && (gr.resource == PVCS.1 || gr.resource == PODS.1)
    }
    fn relations(&self, item: &Item, ix: &Index, out: &mut Vec<Relation>) {
        if !item.key.is(PVCS.0, PVCS.1) || !pvc_bound(item) {
            return;
        }
        let ns = item.key.namespace().unwrap_or("");
        if let Some(pv) = item.str_at("/spec/volumeName") {
            out.push(Relation { to: ItemKey::cluster(PVS.0, PVS.1, pv), together: true, pull: true });
        }
        for pod in ix.pods_mounting(ns, item.key.name()).filter(crate::hooks::pod_running) {
            out.push(Relation { to: pod.key, together: true, pull: false });
        }
        if let Some(g) = item.labels().get(&self.volume_group_label).filter(|g| !g.is_empty()) {
            for other in ix.pvcs_in_group(ns, g).filter(|o| o.key != item.key) {
                out.push(Relation { to: other.key, together: true, pull: true });
            }
        }
    }
}

/// ServiceAccount → ClusterRoleBindings naming it and their ClusterRoles (pull).
pub struct ServiceAccountAction;

impl ItemBlockAction for ServiceAccountAction {
    fn name(&self) -> &str {
        "serviceaccount"
    }
    fn reads(&self, gr: &GroupResource) -> bool {
        gr.group == RBAC && gr.resource == "clusterrolebindings"
    }
    fn relations(&self, item: &Item, ix: &Index, out: &mut Vec<Relation>) {
        if !item.key.is(SAS.0, SAS.1) {
            return;
        }
        let ns = item.key.namespace().unwrap_or("");
        for crb in ix.crbs_naming(ns, item.key.name()) {
            out.push(Relation { to: crb.key.clone(), together: false, pull: true });
            if crb.str_at("/roleRef/kind") == Some("ClusterRole") {
                if let Some(role) = crb.str_at("/roleRef/name") {
                    out.push(Relation {
                        to: ItemKey::cluster(RBAC, "clusterroles", role),
                        together: false,
                        pull: true,
                    });
                }
            }
        }
    }
}

/// The three built-in actions.
pub fn builtin_actions(volume_group_label: &str) -> Vec<Box<dyn ItemBlockAction>> {
    vec![
        Box::new(PodAction),
        Box::new(PvcAction { volume_group_label: volume_group_label.to_string() }),
        Box::new(ServiceAccountAction),
    ]
}

/// One ItemBlock as planned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockPlan {
    /// Deterministic id: position in the plan.
    pub id: u32,
    /// Items in write order.
    pub items: PlanItems,
    /// Hooks of the block's Running pods: pre-hooks then post-hooks, pods in key order.
    pub hooks: Box<[Hook]>,
    /// Each item's body, in `items`' order ([`NO_BODY`] for an object without one), when the plan
    /// was made in this process: the write path then reads an item's body here instead of
    /// looking its key up in a view of every object (~18 MB at a million objects). Not recorded:
    /// a plan read back from the log has none (empty), and the view stands in.
    #[serde(skip)]
    pub bodies: Box<[BodyId]>,
}

/// An item without a body in [`BlockPlan::bodies`].
pub const NO_BODY: BodyId = BodyId::MAX;

impl BlockPlan {
    /// The body of the plan's item `i`, when the plan carries bodies and the item has one.
    pub fn body(&self, i: usize) -> Option<BodyId> {
        self.bodies.get(i).copied().filter(|&b| b != NO_BODY)
    }

    /// Whether the plan carries its items' bodies.
    pub fn has_bodies(&self) -> bool {
        self.bodies.len() == self.items.len()
    }
}

/// Plans are equal by what they record (the bodies are not recorded).
impl PartialEq for BlockPlan {
    fn eq(&self, other: &BlockPlan) -> bool {
        (self.id, &self.items, &self.hooks) == (other.id, &other.items, &other.hooks)
    }
}

impl Eq for BlockPlan {}

/// A block's items: most blocks are one, kept in the plan itself (a box of one key was 48 bytes
/// more a block: ~50 MB at a million objects). Read as a slice; serialized as the sequence of
/// keys a `Vec` was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanItems {
    /// One item.
    One(ItemKey),
    /// None, or two and more.
    Many(Box<[ItemKey]>),
}

impl std::ops::Deref for PlanItems {
    type Target = [ItemKey];
    fn deref(&self) -> &[ItemKey] {
        match self {
            PlanItems::One(k) => std::slice::from_ref(k),
            PlanItems::Many(v) => v,
        }
    }
}

impl From<Vec<ItemKey>> for PlanItems {
    fn from(mut v: Vec<ItemKey>) -> PlanItems {
        match v.len() {
            1 => v.pop().map_or_else(|| PlanItems::Many(Box::default()), PlanItems::One),
            _ => PlanItems::Many(v.into_boxed_slice()),
        }
    }
}

impl From<&[ItemKey]> for PlanItems {
    fn from(v: &[ItemKey]) -> PlanItems {
        PlanItems::from(v.to_vec())
    }
}

impl FromIterator<ItemKey> for PlanItems {
    fn from_iter<I: IntoIterator<Item = ItemKey>>(iter: I) -> PlanItems {
        PlanItems::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl<'a> IntoIterator for &'a PlanItems {
    type Item = &'a ItemKey;
    type IntoIter = std::slice::Iter<'a, ItemKey>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Serialize for PlanItems {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for PlanItems {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<ItemKey>::deserialize(deserializer).map(PlanItems::from)
    }
}

/// The result of a planning round.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanStep {
    /// Pull targets that are not known yet: get them, then plan again.
    Fetch(Vec<ItemKey>),
    /// The finished plan, its items as positions in the index planned over.
    Done(PlanShape),
}

/// A finished plan whose items are positions in the [`Index`] it was made over (the order
/// [`Index::into_items`] keeps): the index can be dropped before the block plans are made
/// ([`PlanShape::into_plan`]), so they are not allocated beside the whole catalog — at a million
/// objects the two together were the backup's peak (~100 MB of block plans over the catalog).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlanShape {
    /// Each block's end in `positions`, in id order.
    ends: Vec<u32>,
    /// Every block's items, block after block, each block's in write order.
    positions: Vec<u32>,
    /// The hooks of the blocks that have any, by block id.
    hooks: Vec<(u32, Vec<Hook>)>,
    /// Warnings found while planning (bad annotations, oversized blocks, missing pull targets).
    pub warnings: Vec<String>,
}

impl PlanShape {
    /// Every planned item's position.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// The block plans, each position's key made from `catalog` (the index's, sorted: the order
    /// the positions are in), made one block at a time ([`PlanBlocks`]).
    pub fn into_blocks(self, catalog: Catalog) -> PlanBlocks {
        let PlanShape { ends, positions, hooks, warnings } = self;
        let items = positions.iter().filter(|&&j| (j as usize) < catalog.len()).count();
        PlanBlocks { ends, positions, hooks: hooks.into(), keys: catalog, next: 0, items, warnings }
    }
}

/// A finished plan whose block plans are made one at a time, in id order, each item's key made
/// from the catalog: the engine records a poll's worth of blocks, which the shell appends to its
/// log and drops, before it makes the next — the plans of every block are never all in memory at
/// once (~90 MB at a million objects, with the events carrying them), nor a key of every item
/// beside the catalog (~100 MB more).
#[derive(Debug)]
pub struct PlanBlocks {
    ends: Vec<u32>,
    positions: Vec<u32>,
    hooks: std::collections::VecDeque<(u32, Vec<Hook>)>,
    keys: Catalog,
    /// The next block's id.
    next: u32,
    items: usize,
    /// Warnings found while planning (bad annotations, oversized blocks, missing pull targets).
    pub warnings: Vec<String>,
}

impl PlanBlocks {
    /// How many blocks the plan has.
    pub fn len(&self) -> u32 {
        self.ends.len() as u32
    }

    /// Whether the plan has no block.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Every item of the plan.
    pub fn item_count(&self) -> usize {
        self.items
    }

    /// The id of the block [`PlanBlocks::next_block`] makes next.
    pub fn next_id(&self) -> u32 {
        self.next
    }

    /// Where block `id`'s items are in `positions` (`id` below [`PlanBlocks::len`]).
    fn at(&self, id: u32) -> std::ops::Range<usize> {
        let from = match id.checked_sub(1) {
            Some(before) => self.ends[before as usize] as usize,
            None => 0,
        };
        from..self.ends[id as usize] as usize
    }

    /// The next block's plan.
    pub fn next_block(&mut self) -> Option<Arc<BlockPlan>> {
        let id = self.next;
        if id >= self.len() {
            return None;
        }
        let at = &self.positions[self.at(id)];
        // Exactly as long as the block (a `filter_map` collects into at least four places: most
        // blocks are one item, and at a million objects the spare places were ~100 MB).
        let mut items = Vec::with_capacity(at.len());
        items.extend(at.iter().filter(|&&j| (j as usize) < self.keys.len()).map(|&j| self.keys.key(j)));
        let mut bodies = Vec::with_capacity(items.len());
        bodies.extend(
            (at.iter().filter(|&&j| (j as usize) < self.keys.len())).map(|&j| self.keys.body(j).unwrap_or(NO_BODY)),
        );
        let hooks = match self.hooks.front().is_some_and(|(b, _)| *b == id) {
            true => self.hooks.pop_front().map(|(_, h)| h.into_boxed_slice()).unwrap_or_default(),
            false => Box::default(),
        };
        self.next += 1;
        Some(Arc::new(BlockPlan { id, items: PlanItems::from(items), hooks, bodies: bodies.into_boxed_slice() }))
    }

    /// Goes past the next `n` blocks without making them (recorded already, by a process that
    /// crashed while recording the plan).
    pub fn skip(&mut self, n: u32) {
        let to = self.next.saturating_add(n).min(self.len());
        while self.hooks.front().is_some_and(|(b, _)| *b < to) {
            self.hooks.pop_front();
        }
        self.next = self.next.max(to);
    }

    /// Calls `each` with the id of every block not made yet that holds items of `group` and
    /// `resource`, and those items' keys, made from the catalog one block at a time (snapshot
    /// planning reads each block's claims before the blocks are recorded: the claims of every
    /// block at once, as plans, were ~11 MB at a million objects).
    pub fn each_block_of(&self, group: &str, resource: &str, each: &mut dyn FnMut(u32, &[ItemKey])) {
        let mut keys = Vec::new();
        for id in self.next..self.len() {
            keys.clear();
            let at = &self.positions[self.at(id)];
            let picked = at.iter().filter(|&&j| (j as usize) < self.keys.len() && self.keys.is(j, group, resource));
            keys.extend(picked.map(|&j| self.keys.key(j)));
            if !keys.is_empty() {
                each(id, &keys);
            }
        }
    }
}

impl crate::snapshot::BlockClaims for PlanBlocks {
    fn each_block(&self, each: &mut dyn FnMut(u32, &[ItemKey])) {
        self.each_block_of(PVCS.0, PVCS.1, each);
    }
}

/// Everything planning needs.
pub struct PlanInput<'a> {
    /// The compiled spec.
    pub selection: &'a Selection,
    /// Discovered resource types.
    pub resources: &'a [ResourceType],
    /// Pull targets that were fetched and not found.
    pub not_found: &'a BTreeSet<ItemKey>,
    /// Pull targets whose get failed (already recorded as errors).
    pub fetch_failed: &'a BTreeSet<ItemKey>,
    /// The actions to apply.
    pub actions: &'a [Box<dyn ItemBlockAction>],
}

struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }
    /// [`UnionFind::find`] without shortening the path.
    fn root(&self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            x = self.parent[x as usize];
        }
        x
    }
    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        // The smaller index (= smaller key) becomes the root, so roots are independent of order.
        if ra < rb {
            self.parent[rb as usize] = ra;
        } else if rb < ra {
            self.parent[ra as usize] = rb;
        }
    }
}

/// Plans the backup over the items of `index`: selection, pull closure, components, hooks.
pub fn plan(input: &PlanInput<'_>, index: &Index) -> PlanStep {
    // Resource types by group and resource, looked up without making a `GroupResource`.
    let types: HashMap<(&str, &str), &ResourceType> =
        input.resources.iter().map(|r| ((r.gr.group.as_str(), r.gr.resource.as_str()), r)).collect();
    let type_of = |k: &ItemKey| types.get(&(k.group(), k.resource())).copied();
    let sel = input.selection;
    let mut warnings = Vec::new();
    let n = index.len();
    let mut in_backup = vec![false; n];
    let mut queue: Vec<u32> = Vec::new();
    for i in 0..n as u32 {
        let (g, r) = index.catalog().group_resource(i);
        let Some(rt) = types.get(&(g, r)) else { continue };
        let it = index.item(i);
        if sel.exclusion(rt, &it.key, Some(&it)).is_none() && sel.is_seed(&it) {
            in_backup[i as usize] = true;
            queue.push(i);
        }
    }
    // Pull closure; remember together edges between items that end up in the backup.
    let mut together: Vec<(u32, u32)> = Vec::new();
    let mut missing: BTreeSet<ItemKey> = BTreeSet::new();
    let mut rels = Vec::new();
    let mut head = 0;
    while head < queue.len() {
        let i = queue[head];
        head += 1;
        let item = index.item(i);
        rels.clear();
        for a in input.actions {
            a.relations(&item, index, &mut rels);
        }
        for r in &rels {
            let Some(j) = index.position(&r.to) else {
                if r.pull && input.fetch_failed.contains(&r.to) {
                    // The error is recorded; the item is simply not in the backup.
                } else if r.pull && !input.not_found.contains(&r.to) {
                    match type_of(&r.to) {
                        Some(rt) if sel.exclusion(rt, &r.to, None).is_none() => {
                            missing.insert(r.to.clone());
                        }
                        Some(_) => {}
                        None => warnings.push(format!(
                            "{} (pulled by {}): resource type is not served by the cluster",
                            r.to, item.key
                        )),
                    }
                } else if r.pull {
                    warnings.push(format!("{} (pulled by {}) was not found", r.to, item.key));
                }
                continue;
            };
            if r.pull && !in_backup[j as usize] {
                let target = index.item(j);
                // Deliberate bug (mutation): judge a pull target by its key only, missing its labels.
                let seen = if crate::mutation::active(crate::mutation::Mutation::PullExcludedObjects) {
                    None
                } else {
                    Some(&target)
                };
                let allowed = type_of(&target.key).is_some_and(|rt| sel.exclusion(rt, &target.key, seen).is_none());
                if allowed {
                    in_backup[j as usize] = true;
                    queue.push(j);
                }
            }
            if r.together {
                together.push((i, j));
            }
        }
    }
    if !missing.is_empty() {
        return PlanStep::Fetch(missing.into_iter().collect());
    }
    drop(queue);
    let mut uf = UnionFind { parent: (0..n as u32).collect() };
    for &(a, b) in &together {
        if in_backup[a as usize] && in_backup[b as usize] {
            uf.union(a, b);
        }
    }
    drop(together);
    // Ordered resources: the named items of one entry join one block, written first in order.
    let mut named_order: Vec<u32> = Vec::new();
    let mut entry_of_root: BTreeMap<u32, usize> = BTreeMap::new();
    for (e, (res, names)) in sel.spec().ordered_resources.iter().enumerate() {
        let Some(rt) = find_resource(input.resources, res) else {
            warnings.push(format!("ordered resources: resource {res:?} is not served by the cluster"));
            continue;
        };
        let mut first: Option<u32> = None;
        for nm in names {
            let key = match (rt.namespaced, nm.split_once('/')) {
                (true, Some((ns, name))) => ItemKey::namespaced(&rt.gr.group, &rt.gr.resource, ns, name),
                (false, None) => ItemKey::cluster(&rt.gr.group, &rt.gr.resource, nm),
                _ => {
                    warnings.push(format!(
                        "ordered resources: {res}={nm}: expected {}",
                        if rt.namespaced { "namespace/name" } else { "name" }
                    ));
                    continue;
                }
            };
            match index.position(&key) {
                Some(j) if in_backup[j as usize] => {
                    if !named_order.contains(&j) {
                        named_order.push(j);
                    }
                    match first {
                        Some(f) => uf.union(f, j),
                        None => first = Some(j),
                    }
                }
                _ => warnings.push(format!("ordered resources: {key} is not in the backup")),
            }
        }
        if let Some(f) = first {
            let root = uf.find(f);
            entry_of_root.entry(root).or_insert(e);
        }
    }
    // A component's root is its smallest position (its first item in key order). Its other
    // members are collected as (root, member), sorted: each component's are a run in key order.
    // Most components are one item, so this is far shorter than a pair for every item (8 bytes
    // an item at a million objects, beside the union-find's 4 and the positions' 4).
    let mut others: Vec<(u32, u32)> = Vec::new();
    for i in 0..n as u32 {
        if in_backup[i as usize] {
            let root = uf.find(i);
            if root != i {
                others.push((root, i));
            }
        }
    }
    others.sort_unstable();
    others.shrink_to_fit();
    // Entry indices may point at roots that later unions replaced: re-resolve.
    let mut ordered_rank: BTreeMap<u32, usize> = BTreeMap::new();
    for (root, e) in entry_of_root {
        let r = uf.find(root);
        let slot = ordered_rank.entry(r).or_insert(e);
        *slot = (*slot).min(e);
    }
    let is_root = |i: u32| in_backup[i as usize] && uf.parent[i as usize] == i;
    // Each component as (root, its other members' range in `others`), in block order: the order
    // of their roots (their first members), the ordered resources' components first. Only with
    // ordered resources is a list of every component made and sorted (12 bytes a block).
    let mut runs = (0..n as u32).filter(|&i| is_root(i)).scan(0usize, |at, root| {
        let from = *at;
        *at += others[from..].iter().take_while(|e| e.0 == root).count();
        Some((root, from as u32, *at as u32))
    });
    let components: Box<dyn Iterator<Item = (u32, u32, u32)>> = match ordered_rank.is_empty() {
        true => Box::new(&mut runs),
        false => {
            let mut list: Vec<(u32, u32, u32)> = runs.by_ref().collect();
            list.sort_by_key(|&(root, _, _)| {
                let rank = ordered_rank.get(&root);
                (rank.map_or(1, |_| 0), rank.copied().unwrap_or(0), root)
            });
            Box::new(list.into_iter())
        }
    };
    let mut shape = PlanShape::default();
    shape.positions.reserve_exact(in_backup.iter().filter(|&&b| b).count());
    for (id, (root, from, to)) in components.enumerate() {
        let members = || std::iter::once(root).chain(others[from as usize..to as usize].iter().map(|&(_, i)| i));
        let start = shape.positions.len();
        let named: BTreeSet<u32> = named_order.iter().copied().filter(|&j| uf.root(j) == root).collect();
        shape.positions.extend(named_order.iter().copied().filter(|j| named.contains(j)));
        shape.positions.extend(members().filter(|j| !named.contains(j)));
        let len = shape.positions.len() - start;
        if len > sel.spec().block_items_max as usize {
            warnings.push(format!(
                "block {id} has {len} items, more than block_items_max {}; it is kept whole (first item {})",
                sel.spec().block_items_max,
                index.catalog().key(shape.positions[start])
            ));
        }
        shape.ends.push(shape.positions.len() as u32);
        let mut pre = Vec::new();
        let mut post = Vec::new();
        for j in members().filter(|&j| index.catalog().is(j, PODS.0, PODS.1)) {
            let it = index.item(j);
            {
                for h in resolve_pod_hooks(&it, &sel.spec().hooks, &mut warnings) {
                    match h.phase {
                        crate::hooks::HookPhase::Pre => pre.push(h),
                        crate::hooks::HookPhase::Post => post.push(h),
                    }
                }
            }
        }
        pre.extend(post);
        if !pre.is_empty() {
            shape.hooks.push((id as u32, pre));
        }
    }
    shape.warnings = warnings;
    PlanStep::Done(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{HookPhase, OnError};

    /// A block's items serialize as the vector of keys they were (the log's bytes, the JSON) and
    /// read back the same, for none, one and many; one is kept in the plan itself.
    #[test]
    fn plan_items_are_the_vector_they_were() {
        let keys: Vec<ItemKey> = ["a", "b", "c"].iter().map(|n| ItemKey::namespaced("", "pods", "ns", n)).collect();
        let cfg = bincode::config::standard();
        for n in 0..=3 {
            let v = keys[..n].to_vec();
            let items = PlanItems::from(v.clone());
            assert_eq!(&items[..], &v[..]);
            assert_eq!(matches!(items, PlanItems::One(_)), n == 1);
            let bytes = bincode::serde::encode_to_vec(&items, cfg).unwrap();
            assert_eq!(bytes, bincode::serde::encode_to_vec(&v, cfg).unwrap());
            let (back, _): (PlanItems, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            assert_eq!(back, items);
            assert_eq!(serde_json::to_string(&items).unwrap(), serde_json::to_string(&v).unwrap());
        }
        assert!(std::mem::size_of::<BlockPlan>() <= 72, "{}", std::mem::size_of::<BlockPlan>());
    }

    /// A shape becomes block plans whose items are the keys at its positions, block by block in
    /// write order, each block with its own hooks (none for the blocks that have none).
    #[test]
    fn a_shape_becomes_the_plans_of_its_positions() {
        let keys: Vec<ItemKey> = [("a", PVCS.1), ("b", "pods"), ("c", PVCS.1), ("d", "pods")]
            .iter()
            .map(|(n, r)| ItemKey::namespaced("", r, "ns", n))
            .collect();
        let hook = |pod: &ItemKey| Hook {
            pod: pod.clone(),
            phase: HookPhase::Pre,
            index: 0,
            container: "c".into(),
            command: vec!["true".into()],
            on_error: OnError::Fail,
            timeout_ms: 1,
            invalid: None,
        };
        let shape_of = |warnings: Vec<String>| PlanShape {
            ends: vec![2, 3, 4],
            positions: vec![3, 0, 2, 1],
            hooks: vec![(1, vec![hook(&keys[2])])],
            warnings,
        };
        let shape = shape_of(vec!["w".into()]);
        assert_eq!(shape.positions(), [3, 0, 2, 1]);
        let catalog = || Catalog::of_items(keys.iter().cloned().map(Item::of_key)).unwrap();
        let mut plan = shape.into_blocks(catalog());
        assert_eq!((plan.len(), plan.item_count(), &plan.warnings[..]), (3, 4, &["w".to_string()][..]));
        // Looked at before they are made: the blocks holding claims ("a", "c"), with those only.
        let mut with: Vec<(u32, Vec<String>)> = Vec::new();
        let mut collect = |id: u32, k: &[ItemKey]| with.push((id, k.iter().map(|k| k.name().to_string()).collect()));
        crate::snapshot::BlockClaims::each_block(&plan, &mut collect);
        assert_eq!(with, [(0, vec!["a".to_string()]), (1, vec!["c".to_string()])]);
        let blocks: Vec<Arc<BlockPlan>> = std::iter::from_fn(|| plan.next_block()).collect();
        let names: Vec<Vec<&str>> = blocks.iter().map(|b| b.items.iter().map(|k| k.name()).collect()).collect();
        assert_eq!(names, [vec!["d", "a"], vec!["c"], vec!["b"]]);
        let hooks: Vec<usize> = blocks.iter().map(|b| b.hooks.len()).collect();
        assert_eq!(hooks, [0, 1, 0]);
        assert_eq!(blocks[1].hooks[0].pod, keys[2]);
        assert_eq!(blocks.iter().map(|b| b.id).collect::<Vec<_>>(), [0, 1, 2]);
        let mut after = 0;
        plan.each_block_of("", "pods", &mut |_, _| after += 1);
        assert!(plan.next_block().is_none() && after == 0);
        // Skipping what a crashed process recorded: the rest is the same.
        let mut rest = shape_of(vec![]).into_blocks(catalog());
        rest.skip(1);
        assert_eq!(rest.next_id(), 1);
        assert_eq!(rest.next_block().as_deref(), Some(&*blocks[1]));
        // Past the hooked block: its hooks are not given to the next.
        let mut past = shape_of(vec![]).into_blocks(catalog());
        past.skip(2);
        assert_eq!(past.next_block().as_deref(), Some(&*blocks[2]));
        past.skip(5);
        assert!(past.next_block().is_none());
    }

    /// The index finds pods by a claim they mount, claims by their group, bindings by a service
    /// account subject — in their namespace only — and an entry under the same hash that is not
    /// the pair of names asked for (a hash collision, forged here) is not given back.
    #[test]
    fn lookups_give_back_only_the_items_asked_for() {
        let rt = |g: &str, r: &str, k: &str, ns: bool| ResourceType::new(g, "v1", r, k, ns);
        let (pods, pvcs) =
            (rt("", "pods", "Pod", true), rt("", "persistentvolumeclaims", "PersistentVolumeClaim", true));
        let crbs = rt(RBAC, "clusterrolebindings", "ClusterRoleBinding", false);
        let pod = |ns: &str, name: &str, claims: &[&str]| {
            let vols: Vec<Value> = claims
                .iter()
                .map(|c| serde_json::json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
                .collect();
            let o = serde_json::json!({"metadata": {"namespace": ns, "name": name}, "spec": {"volumes": vols}});
            Item::from_value(&pods, 0, o).unwrap()
        };
        let pvc = |ns: &str, name: &str, group: &str| {
            let o = serde_json::json!({"metadata": {"namespace": ns, "name": name, "labels": {"g": group}}});
            Item::from_value(&pvcs, 0, o).unwrap()
        };
        let crb = |name: &str, subjects: Value| {
            let o = serde_json::json!({"metadata": {"name": name}, "subjects": subjects});
            Item::from_value(&crbs, 0, o).unwrap()
        };
        let items = vec![
            pod("a", "p1", &["data", "logs"]),
            pod("a", "p2", &["data"]),
            pod("b", "p3", &["data"]),
            pvc("a", "c1", "db"),
            pvc("a", "c2", "db"),
            pvc("b", "c3", "db"),
            pvc("a", "c4", ""),
            crb(
                "r1",
                serde_json::json!([{"kind": "ServiceAccount", "namespace": "a", "name": "sa"},
                {"kind": "User", "name": "sa"}]),
            ),
            crb("r2", serde_json::json!([{"kind": "ServiceAccount", "namespace": "b", "name": "sa"}])),
        ];
        let mut ix = Index::new(items, "g");
        let names = |it: &mut dyn Iterator<Item = Item>| it.map(|i| i.key.name().to_string()).collect::<Vec<_>>();
        assert_eq!(names(&mut ix.pods_mounting("a", "data")), ["p1", "p2"]);
        assert_eq!(names(&mut ix.pods_mounting("a", "logs")), ["p1"]);
        assert_eq!(names(&mut ix.pods_mounting("b", "data")), ["p3"]);
        assert!(names(&mut ix.pods_mounting("c", "data")).is_empty());
        assert_eq!(names(&mut ix.pvcs_in_group("a", "db")), ["c1", "c2"]);
        assert!(names(&mut ix.pvcs_in_group("a", "")).is_empty());
        assert_eq!(names(&mut ix.crbs_naming("a", "sa")), ["r1"]);
        assert_eq!(names(&mut ix.crbs_naming("b", "sa")), ["r2"]);
        // Every item of the index under the hash of each question: only the right ones come back.
        let all: Vec<u32> = (0..ix.len() as u32).collect();
        let lookups = [&mut ix.pods_by_claim, &mut ix.pvcs_by_group, &mut ix.crbs_by_sa];
        for (lookup, (ns, name)) in lookups.into_iter().zip([("a", "data"), ("a", "db"), ("a", "sa")]) {
            lookup.0.extend(all.iter().map(|&i| (Lookup::hash(ns, name), i)));
            lookup.seal();
        }
        assert_eq!(names(&mut ix.pods_mounting("a", "data")), ["p1", "p2"]);
        assert_eq!(names(&mut ix.pvcs_in_group("a", "db")), ["c1", "c2"]);
        assert_eq!(names(&mut ix.crbs_naming("a", "sa")), ["r1"]);
    }

    #[test]
    fn permuting_puts_each_item_where_the_order_says() {
        let mut items = vec!['a', 'b', 'c', 'd', 'e'];
        permute_in_place(&mut items, vec![3, 0, 4, 1, 2]);
        assert_eq!(items, ['d', 'a', 'e', 'b', 'c']);
    }
}
