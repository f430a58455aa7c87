//! The CSI snapshot procedures the driver runs for the engine's snapshot commands: cut (create or
//! get, then watch until the handle is set), wait until ready, release. Generic over the
//! [`Cluster`] port and the [`Runtime`], so the simulator runs exactly this code against its fake
//! snapshot controller on virtual time.
//!
//! Key decisions:
//! - **Create-or-get.** Names are deterministic (the engine's plan), so a create that answers
//!   `AlreadyExists` — a retried create that had reached the server, or an attempt resumed after a
//!   crash — gets the object instead, after checking by its `velero.io/backup-uid` label that it
//!   is this backup's. A second snapshot of a claim is never created.
//! - **Watch, not poll.** Waiting for a handle or readiness is a watch on the one object that
//!   must change (the snapshot until it is bound, then its content), re-read after every event;
//!   the wait is bounded by the runtime's timer (`timeout_ms`), which cancels the watch.
//! - **Groups as Velero 1.17 does them, without its #9640 trap**: the VolumeGroupSnapshot is
//!   created, its member VolumeSnapshots are found by `status.volumeGroupSnapshotName` or an owner
//!   reference to its uid — whatever API version the reference names — then detached (owner
//!   reference and group finalizers removed, labelled with the backup), the group content set to
//!   Retain and the group objects deleted. Members the selector picked beyond the plan are deleted.
//!   A resumed cut first looks for members it already labelled, so it never creates a second group.
//! - **Release as Velero 1.17's finalize**: a kept snapshot's content is set to Retain, then the
//!   content and the snapshot are deleted — nothing stays in the cluster, the storage snapshot
//!   stays for the backup. A discarded one's content is set to Delete and the snapshot (or group)
//!   deleted, which deletes the storage snapshot.

use std::collections::BTreeMap;

use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError};
use blockwise_engine::snapshot::{
    CutOrder, CutRaw, RawMember, ReadyWait, ReleaseOrder, SnapshotApi, SnapshotPlan, BACKUP_NAME_LABEL,
    BACKUP_UID_LABEL, GROUP_SNAPSHOT_GROUP, SNAPSHOT_GROUP,
};
use serde_json::{json, Value};

use crate::world::{timeout, Runtime};

/// Snapshots read (waiting for readiness) or released at once: a backup of thousands of volumes
/// must not pay one API round trip after the other for them, nor flood the API server. A window,
/// not batches: the next call starts as soon as one ends.
pub const SNAPSHOT_CALLS_CONCURRENT_MAX: usize = 8;

/// Longest single watch: a return re-reads the object, so this only bounds how long a missed
/// event could delay the wait.
pub const WATCH_MS_MAX: u64 = 30_000;
/// Longest single watch while waiting for group members, which are other objects than the one
/// watched (their appearance may not change the group object).
pub const GROUP_WATCH_MS_MAX: u64 = 1_000;
/// Finalizers of a group member that Velero removes when it detaches the member.
pub const GROUP_MEMBER_FINALIZERS: [&str; 2] = [
    "snapshot.storage.kubernetes.io/volumesnapshot-in-group-protection",
    "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection",
];

fn parse(what: &str, json: &str) -> Result<Value, String> {
    serde_json::from_str(json).map_err(|e| format!("{what}: the cluster answered invalid JSON: {e}"))
}

fn s<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str).filter(|x| !x.is_empty())
}

fn rv(v: &Value) -> String {
    s(v, "/metadata/resourceVersion").unwrap_or_default().to_string()
}

/// A duration for messages: `10m`, `90s`, `1500ms`.
pub fn human_ms(ms: u64) -> String {
    if ms >= 60_000 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms >= 1_000 && ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

fn vs_key(ns: &str, name: &str) -> ItemKey {
    ItemKey::namespaced(SNAPSHOT_GROUP, "volumesnapshots", ns, name)
}

fn vsc_key(name: &str) -> ItemKey {
    ItemKey::cluster(SNAPSHOT_GROUP, "volumesnapshotcontents", name)
}

fn vgs_key(ns: &str, name: &str) -> ItemKey {
    ItemKey::namespaced(GROUP_SNAPSHOT_GROUP, "volumegroupsnapshots", ns, name)
}

fn vgsc_key(name: &str) -> ItemKey {
    ItemKey::cluster(GROUP_SNAPSHOT_GROUP, "volumegroupsnapshotcontents", name)
}

/// Creates `body` as `name`, or gets the object of that name when it exists and is this backup's.
async fn create_or_get(
    cluster: &dyn Cluster,
    rt: &ResourceType,
    key: &ItemKey,
    body: &str,
    uid: &str,
) -> Result<Value, String> {
    let what =
        format!("{} {}", rt.kind, key.namespace().map_or(key.name().to_string(), |n| format!("{n}/{}", key.name())));
    let json = match cluster.create(rt, key.namespace(), body).await {
        Ok(j) => j,
        Err(ClusterError::AlreadyExists(_)) => match cluster.get(rt, key).await {
            Ok(Some(j)) => j,
            Ok(None) => return Err(format!("{what} exists and was deleted at once; try again")),
            Err(e) => return Err(format!("reading {what}: {e}")),
        },
        Err(e) => return Err(format!("creating {what}: {e}")),
    };
    let v = parse(&what, &json)?;
    // An unset uid (an engine driven without one) creates objects with an empty label, which the
    // API server may store as no label at all: both mean "no uid".
    match s(&v, &format!("/metadata/labels/{}", BACKUP_UID_LABEL.replace('/', "~1"))).unwrap_or_default() {
        u if u == uid => Ok(v),
        other => Err(format!("{what} exists and belongs to another backup (backup uid {other:?})")),
    }
}

/// Gets an object, parsed; `None` when it does not exist.
async fn get(cluster: &dyn Cluster, rt: &ResourceType, key: &ItemKey) -> Result<Option<Value>, String> {
    match cluster.get(rt, key).await {
        Ok(Some(j)) => parse(&format!("{} {}", rt.kind, key.name()), &j).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("reading {} {}: {e}", rt.kind, key.name())),
    }
}

async fn watch(cluster: &dyn Cluster, rt: &ResourceType, key: &ItemKey, rv: &str, ms: u64) -> Result<(), String> {
    cluster
        .watch(rt, key, rv, ms.max(1))
        .await
        .map(|_| ())
        .map_err(|e| format!("watching {} {}: {e}", rt.kind, key.name()))
}

/// Watches VolumeSnapshot `ns/name` until its content has a snapshot handle; returns both objects
/// as served. Errors on a snapshot or content error, or when the snapshot is deleted.
async fn wait_cut(cluster: &dyn Cluster, api: &SnapshotApi, ns: &str, name: &str) -> Result<(String, String), String> {
    let key = vs_key(ns, name);
    loop {
        let Some(vs) = get(cluster, &api.snapshots, &key).await? else {
            return Err(format!("VolumeSnapshot {ns}/{name} was deleted while it was being cut"));
        };
        if let Some(msg) = s(&vs, "/status/error/message") {
            return Err(format!("VolumeSnapshot {ns}/{name}: {msg}"));
        }
        let Some(content) = s(&vs, "/status/boundVolumeSnapshotContentName").map(str::to_string) else {
            watch(cluster, &api.snapshots, &key, &rv(&vs), WATCH_MS_MAX).await?;
            continue;
        };
        let ckey = vsc_key(&content);
        let Some(vsc) = get(cluster, &api.contents, &ckey).await? else {
            watch(cluster, &api.snapshots, &key, &rv(&vs), WATCH_MS_MAX).await?;
            continue;
        };
        if s(&vsc, "/status/snapshotHandle").is_some() {
            return Ok((vs.to_string(), vsc.to_string()));
        }
        if let Some(msg) = s(&vsc, "/status/error/message") {
            return Err(format!("VolumeSnapshotContent {content}: {msg}"));
        }
        watch(cluster, &api.contents, &ckey, &rv(&vsc), WATCH_MS_MAX).await?;
    }
}

fn uid_of(plan: &SnapshotPlan) -> &str {
    plan.labels.get(BACKUP_UID_LABEL).map_or("", String::as_str)
}

async fn cut_single(cluster: &dyn Cluster, api: &SnapshotApi, order: &CutOrder) -> Result<CutRaw, String> {
    let p = &order.plan;
    create_or_get(cluster, &api.snapshots, &vs_key(&p.namespace, &p.name), &order.body, uid_of(p)).await?;
    let (snapshot_json, content_json) = wait_cut(cluster, api, &p.namespace, &p.name).await?;
    let claim = p.claims.first().cloned().unwrap_or_default();
    Ok(CutRaw { members: vec![RawMember { claim, snapshot_json, content_json }], group_handle: None })
}

/// Every VolumeSnapshot of namespace `ns`.
async fn list_snapshots(cluster: &dyn Cluster, api: &SnapshotApi, ns: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = cluster
            .list(&api.snapshots, Some(ns), 500, token.as_deref())
            .await
            .map_err(|e| format!("listing VolumeSnapshots in {ns}: {e}"))?;
        for o in &page.objects {
            out.push(parse("VolumeSnapshot", o)?);
        }
        match page.continue_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

fn label<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.pointer("/metadata/labels").and_then(|l| l.get(key)).and_then(Value::as_str)
}

fn claim_of(v: &Value) -> Option<&str> {
    s(v, "/spec/source/persistentVolumeClaimName")
}

/// Members of group `plan` that a cut of this backup detached and labelled already.
fn labelled_members(all: &[Value], plan: &SnapshotPlan, group_label: &str) -> BTreeMap<String, String> {
    all.iter()
        .filter(|v| label(v, BACKUP_UID_LABEL) == Some(uid_of(plan)) && label(v, group_label) == plan.group.as_deref())
        .filter(|v| s(v, "/status/volumeGroupSnapshotName").is_some())
        .filter_map(|v| Some((claim_of(v)?.to_string(), s(v, "/metadata/name")?.to_string())))
        .collect()
}

/// Members the snapshot controller made for the group `vgs`: by `status.volumeGroupSnapshotName`,
/// or by an owner reference to the group's uid whatever its API version (Velero #9640).
fn group_members(all: &[Value], vgs: &Value) -> BTreeMap<String, String> {
    let name = s(vgs, "/metadata/name");
    let uid = s(vgs, "/metadata/uid");
    all.iter()
        .filter(|v| {
            let by_status = name.is_some() && s(v, "/status/volumeGroupSnapshotName") == name;
            let by_owner = v.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|refs| {
                refs.iter().any(|r| {
                    r.get("kind").and_then(Value::as_str) == Some("VolumeGroupSnapshot")
                        && uid.is_some()
                        && r.get("uid").and_then(Value::as_str) == uid
                })
            });
            by_status || by_owner
        })
        .filter_map(|v| Some((claim_of(v)?.to_string(), s(v, "/metadata/name")?.to_string())))
        .collect()
}

fn detach_patch(member: &Value, plan: &SnapshotPlan, group_label: &str, backup: &str) -> String {
    let finalizers: Vec<&str> = member
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(Value::as_str).filter(|f| !GROUP_MEMBER_FINALIZERS.contains(f)).collect())
        .unwrap_or_default();
    json!({"metadata": {
        "ownerReferences": null,
        "finalizers": if finalizers.is_empty() { Value::Null } else { json!(finalizers) },
        "labels": {
            BACKUP_NAME_LABEL: backup,
            BACKUP_UID_LABEL: uid_of(plan),
            group_label: plan.group.clone().unwrap_or_default(),
        },
    }})
    .to_string()
}

async fn delete_snapshot(
    cluster: &dyn Cluster,
    api: &SnapshotApi,
    ns: &str,
    name: &str,
    policy: &str,
) -> Result<(), String> {
    let key = vs_key(ns, name);
    if let Some(vs) = get(cluster, &api.snapshots, &key).await? {
        if let Some(content) = s(&vs, "/status/boundVolumeSnapshotContentName") {
            set_policy(cluster, &api.contents, &vsc_key(content), policy).await?;
        }
        cluster.delete(&api.snapshots, &key).await.map_err(|e| format!("deleting VolumeSnapshot {ns}/{name}: {e}"))?;
    }
    Ok(())
}

async fn set_policy(cluster: &dyn Cluster, rt: &ResourceType, key: &ItemKey, policy: &str) -> Result<(), String> {
    let patch = json!({"spec": {"deletionPolicy": policy}}).to_string();
    match cluster.patch(rt, key, &patch).await {
        Ok(_) | Err(ClusterError::NotFound(_)) => Ok(()),
        Err(e) => Err(format!("setting {} {} to {policy}: {e}", rt.kind, key.name())),
    }
}

async fn delete(cluster: &dyn Cluster, rt: &ResourceType, key: &ItemKey) -> Result<(), String> {
    cluster.delete(rt, key).await.map(|_| ()).map_err(|e| format!("deleting {} {}: {e}", rt.kind, key.name()))
}

/// Deletes the group objects of `vgs` keeping its content's snapshots (Retain); returns the group
/// content's handle.
async fn drop_group_objects(cluster: &dyn Cluster, api: &SnapshotApi, vgs: &Value) -> Result<Option<String>, String> {
    let g = api.groups.as_ref().ok_or("group snapshots are not served")?;
    let ns = s(vgs, "/metadata/namespace").unwrap_or_default();
    let name = s(vgs, "/metadata/name").unwrap_or_default();
    let mut handle = None;
    if let Some(content) = s(vgs, "/status/boundVolumeGroupSnapshotContentName") {
        let key = vgsc_key(content);
        if let Some(c) = get(cluster, &g.contents, &key).await? {
            handle = s(&c, "/status/volumeGroupSnapshotHandle").map(str::to_string);
        }
        set_policy(cluster, &g.contents, &key, "Retain").await?;
        delete(cluster, &g.contents, &key).await?;
    }
    delete(cluster, &g.snapshots, &vgs_key(ns, name)).await?;
    Ok(handle)
}

async fn cut_group(
    cluster: &dyn Cluster,
    api: &SnapshotApi,
    group_label: &str,
    order: &CutOrder,
) -> Result<CutRaw, String> {
    let p = &order.plan;
    let g = api.groups.as_ref().ok_or("group snapshots are not served")?;
    let (ns, name) = (p.namespace.as_str(), p.name.as_str());
    let backup = p.labels.get(BACKUP_NAME_LABEL).cloned().unwrap_or_default();
    let mut members = labelled_members(&list_snapshots(cluster, api, ns).await?, p, group_label);
    let complete = |m: &BTreeMap<String, String>| p.claims.iter().all(|c| m.contains_key(c));
    let existing = get(cluster, &g.snapshots, &vgs_key(ns, name)).await?;
    let mut group_handle = None;
    if !complete(&members) || existing.is_some() {
        let mut vgs = match existing {
            Some(v) => v,
            None => create_or_get(cluster, &g.snapshots, &vgs_key(ns, name), &order.body, uid_of(p)).await?,
        };
        // Wait until the controller made a member for every claim.
        let all = loop {
            if let Some(msg) = s(&vgs, "/status/error/message") {
                return Err(format!("VolumeGroupSnapshot {ns}/{name}: {msg}"));
            }
            let all = list_snapshots(cluster, api, ns).await?;
            let found = group_members(&all, &vgs);
            if complete(&found) {
                break all;
            }
            watch(cluster, &g.snapshots, &vgs_key(ns, name), &rv(&vgs), GROUP_WATCH_MS_MAX).await?;
            vgs = get(cluster, &g.snapshots, &vgs_key(ns, name))
                .await?
                .ok_or_else(|| format!("VolumeGroupSnapshot {ns}/{name} was deleted while it was being cut"))?;
        };
        // Detach the members (labelled with the backup), delete those beyond the plan.
        let found = group_members(&all, &vgs);
        for (claim, member) in &found {
            let Some(obj) = all.iter().find(|v| s(v, "/metadata/name") == Some(member.as_str())) else { continue };
            let patch = detach_patch(obj, p, group_label, &backup);
            cluster
                .patch(&api.snapshots, &vs_key(ns, member), &patch)
                .await
                .map_err(|e| format!("detaching VolumeSnapshot {ns}/{member} from its group: {e}"))?;
            if !p.claims.contains(claim) {
                delete_snapshot(cluster, api, ns, member, "Delete").await?;
            }
        }
        members = found.into_iter().filter(|(c, _)| p.claims.contains(c)).collect();
        // The group as it is now, bound to its content (the object read before may predate the
        // binding): its content must be set to Retain before the group goes, or deleting the
        // group deletes the members' storage with it.
        let bound = loop {
            let now = get(cluster, &g.snapshots, &vgs_key(ns, name))
                .await?
                .ok_or_else(|| format!("VolumeGroupSnapshot {ns}/{name} was deleted while it was being cut"))?;
            if s(&now, "/status/boundVolumeGroupSnapshotContentName").is_some() {
                break now;
            }
            watch(cluster, &g.snapshots, &vgs_key(ns, name), &rv(&now), GROUP_WATCH_MS_MAX).await?;
        };
        group_handle = drop_group_objects(cluster, api, &bound).await?;
    }
    let mut raw = Vec::new();
    for claim in &p.claims {
        let member = members.get(claim).ok_or_else(|| format!("the group snapshot has no member for claim {claim}"))?;
        let (snapshot_json, content_json) = wait_cut(cluster, api, ns, member).await?;
        if group_handle.is_none() {
            group_handle = parse("VolumeSnapshotContent", &content_json)
                .ok()
                .and_then(|c| s(&c, "/status/volumeGroupSnapshotHandle").map(str::to_string));
        }
        raw.push(RawMember { claim: claim.clone(), snapshot_json, content_json });
    }
    Ok(CutRaw { members: raw, group_handle })
}

/// Cuts every snapshot of `orders`, each within `timeout_ms` (a snapshot not cut by then fails).
pub async fn cut_all(
    cluster: &dyn Cluster,
    rt: &dyn Runtime,
    api: &SnapshotApi,
    group_label: &str,
    orders: &[CutOrder],
    timeout_ms: u64,
) -> Vec<(u32, Result<CutRaw, String>)> {
    let cuts = orders.iter().map(|o| async move {
        let work = async {
            match o.plan.group {
                Some(_) => cut_group(cluster, api, group_label, o).await,
                None => cut_single(cluster, api, o).await,
            }
        };
        let r = match timeout(rt, timeout_ms, work).await {
            Some(r) => r,
            None => Err(format!(
                "{} {}/{} was not cut within the CSI snapshot timeout ({})",
                if o.plan.group.is_some() { "VolumeGroupSnapshot" } else { "VolumeSnapshot" },
                o.plan.namespace,
                o.plan.name,
                human_ms(timeout_ms)
            )),
        };
        (o.plan.id, r)
    });
    futures::future::join_all(cuts).await
}

/// The state of one wait's snapshots: the first failure, else the first not yet ready (its key and
/// resourceVersion, to watch).
async fn read_wait(
    cluster: &dyn Cluster,
    api: &SnapshotApi,
    w: &ReadyWait,
) -> (Option<String>, Option<(ItemKey, String)>) {
    let mut pending = None;
    let mut failed = None;
    for name in &w.snapshots {
        let key = vs_key(&w.namespace, name);
        match get(cluster, &api.snapshots, &key).await {
            Err(e) => failed = Some(e),
            Ok(None) => failed = Some(format!("VolumeSnapshot {}/{name} was deleted before it was ready", w.namespace)),
            Ok(Some(vs)) if vs.pointer("/status/readyToUse").and_then(Value::as_bool) == Some(true) => {}
            Ok(Some(vs)) => match s(&vs, "/status/error/message") {
                Some(msg) => failed = Some(format!("VolumeSnapshot {}/{name}: {msg}", w.namespace)),
                None => pending = pending.or(Some((key, rv(&vs)))),
            },
        }
    }
    (failed, pending)
}

/// Waits until at least one of `waits` settles: every snapshot of it ready to use, one failed, or
/// its deadline (wall clock) passed while not ready. Returns the settled ones.
pub async fn await_ready(
    cluster: &dyn Cluster,
    rt: &dyn Runtime,
    api: &SnapshotApi,
    waits: &[ReadyWait],
) -> Vec<(u32, Result<(), String>)> {
    loop {
        let now = rt.now_ms();
        let mut settled = Vec::new();
        let mut next: Option<(ItemKey, String, u64)> = None;
        // Every wait's snapshots read, a bounded number of waits at once, answers in order.
        let reads = in_order_window(waits.iter().map(|w| read_wait(cluster, api, w)).collect()).await;
        for (w, (failed, pending)) in waits.iter().zip(reads) {
            match (failed, pending) {
                (Some(e), _) => settled.push((w.id, Err(e))),
                (None, None) => settled.push((w.id, Ok(()))),
                (None, Some(_)) if now >= w.deadline_ms => settled.push((
                    w.id,
                    Err(format!(
                        "VolumeSnapshot {}/{} was not ready to use within the item operation timeout",
                        w.namespace,
                        w.snapshots.join(",")
                    )),
                )),
                (None, Some((key, version))) => {
                    if next.as_ref().is_none_or(|(_, _, d)| w.deadline_ms < *d) {
                        next = Some((key, version, w.deadline_ms));
                    }
                }
            }
        }
        if !settled.is_empty() {
            return settled;
        }
        let Some((key, version, deadline)) = next else { return settled };
        let ms = deadline.saturating_sub(now).clamp(1, WATCH_MS_MAX);
        if let Err(e) = watch(cluster, &api.snapshots, &key, &version, ms).await {
            return waits.iter().map(|w| (w.id, Err(e.clone()))).collect();
        }
    }
}

async fn release_one(
    cluster: &dyn Cluster,
    api: &SnapshotApi,
    group_label: &str,
    o: &ReleaseOrder,
) -> Result<(), String> {
    let p = &o.plan;
    let ns = p.namespace.as_str();
    if o.keep {
        for (snapshot, content) in &o.members {
            set_policy(cluster, &api.contents, &vsc_key(content), "Retain").await?;
            delete(cluster, &api.contents, &vsc_key(content)).await?;
            delete(cluster, &api.snapshots, &vs_key(ns, snapshot)).await?;
        }
        return Ok(());
    }
    for (snapshot, _) in &o.members {
        delete_snapshot(cluster, api, ns, snapshot, "Delete").await?;
    }
    match &p.group {
        None => delete_snapshot(cluster, api, ns, &p.name, "Delete").await?,
        Some(_) => {
            if let Some(g) = &api.groups {
                if let Some(vgs) = get(cluster, &g.snapshots, &vgs_key(ns, &p.name)).await? {
                    if let Some(content) = s(&vgs, "/status/boundVolumeGroupSnapshotContentName") {
                        set_policy(cluster, &g.contents, &vgsc_key(content), "Delete").await?;
                    }
                    delete(cluster, &g.snapshots, &vgs_key(ns, &p.name)).await?;
                }
            }
            // Members a cut detached and labelled already are no longer the group's: delete them.
            let all = list_snapshots(cluster, api, ns).await?;
            for member in labelled_members(&all, p, group_label).values() {
                delete_snapshot(cluster, api, ns, member, "Delete").await?;
            }
        }
    }
    Ok(())
}

/// Releases each snapshot of `orders` (see the module docs).
pub async fn release_all(
    cluster: &dyn Cluster,
    api: &SnapshotApi,
    group_label: &str,
    orders: &[ReleaseOrder],
) -> Vec<(u32, Result<(), String>)> {
    let out = in_order_window(orders.iter().map(|o| release_one(cluster, api, group_label, o)).collect()).await;
    orders.iter().map(|o| o.plan.id).zip(out).collect()
}

/// Runs `calls` with at most [`SNAPSHOT_CALLS_CONCURRENT_MAX`] in flight (the next starts as soon
/// as one ends), answers in the calls' order. A vector, not an iterator: an iterator adapter held
/// across the awaits makes the caller's future fail tokio's `Send` bound.
async fn in_order_window<F: std::future::Future>(calls: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(calls.len());
    let mut inflight = futures::stream::FuturesOrdered::new();
    for call in calls {
        inflight.push_back(call);
        if inflight.len() >= SNAPSHOT_CALLS_CONCURRENT_MAX {
            out.extend(futures::StreamExt::next(&mut inflight).await);
        }
    }
    while let Some(r) = futures::StreamExt::next(&mut inflight).await {
        out.push(r);
    }
    out
}

/// Reads the PersistentVolumes and lists the snapshot classes for `InspectVolumes`.
pub async fn inspect(
    cluster: &dyn Cluster,
    pvs: &[(ResourceType, ItemKey)],
    classes: &[ResourceType],
) -> blockwise_engine::snapshot::VolumeInventory {
    let mut volumes = Vec::with_capacity(pvs.len());
    for (rt, key) in pvs {
        volumes.push((key.name().to_string(), cluster.get(rt, key).await));
    }
    let mut lists = Vec::new();
    for rt in classes {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        let r = loop {
            match cluster.list(rt, None, 500, token.as_deref()).await {
                Ok(page) => {
                    all.extend(page.objects);
                    match page.continue_token {
                        Some(t) => token = Some(t),
                        None => break Ok(std::mem::take(&mut all)),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        lists.push(r);
    }
    let mut lists = lists.into_iter();
    blockwise_engine::snapshot::VolumeInventory {
        volumes,
        classes: lists.next().unwrap_or(Ok(Vec::new())),
        group_classes: lists.next().unwrap_or(Ok(Vec::new())),
    }
}

/// How deleting one retained storage snapshot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotDeletion {
    /// The driver had it and deleted it.
    Deleted,
    /// The driver did not know the handle (deleted before — by an earlier, interrupted deletion,
    /// or by hand): nothing was left to delete. The driver's message.
    AlreadyGone(String),
}

/// What deleting one backup's storage snapshots works with.
#[derive(Clone, Copy)]
pub struct RetainedDeletion<'a> {
    /// The backup's cluster.
    pub cluster: &'a dyn Cluster,
    /// Its clock, for the waits.
    pub runtime: &'a dyn Runtime,
    /// The VolumeSnapshotContent type.
    pub contents: &'a ResourceType,
    /// The VolumeSnapshot type.
    pub snapshots: &'a ResourceType,
    /// The backup's name and uid, labels of the imported contents.
    pub backup: &'a str,
    /// See `backup`.
    pub uid: &'a str,
    /// Bound of each wait.
    pub timeout_ms: u64,
}

/// The name of the content [`delete_retained`] imports a handle under: deterministic, so a
/// deletion resumed after a crash finds its own object instead of making another.
pub fn deletion_content_name(handle: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(handle.as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("blockwise-delete-{hex}")
}

/// Deletes a storage snapshot a backup retained, as Velero 1.17's VolumeSnapshotContent delete
/// action does: the content the backup released is gone, so a content is **imported** for the
/// handle (`spec.source.snapshotHandle`, `deletionPolicy: Delete`, a reference to a VolumeSnapshot
/// that does not exist); once the snapshot controller has looked at it (its status holds the
/// handle, or an error when the driver has no such snapshot), deleting the content makes the
/// driver delete the storage snapshot, and the wait ends when the content is gone. A snapshot
/// the backup never released (stopped, or releasing failed) still has its objects: they are set
/// to `Delete` and deleted first. Every step is idempotent: a deletion killed halfway is simply
/// run again. Waits are watches bounded by `timeout_ms` each.
pub async fn delete_retained(
    d: &RetainedDeletion<'_>,
    r: &blockwise_engine::state::RetainedSnapshot,
) -> Result<SnapshotDeletion, String> {
    let RetainedDeletion { cluster, runtime, contents, snapshots, backup, uid, timeout_ms } = *d;
    let original = vsc_key(&r.content);
    let had_objects = get(cluster, contents, &original).await?.is_some();
    if had_objects {
        set_policy(cluster, contents, &original, "Delete").await?;
        if get(cluster, snapshots, &vs_key(&r.namespace, &r.snapshot)).await?.is_some() {
            delete(cluster, snapshots, &vs_key(&r.namespace, &r.snapshot)).await?;
        }
        delete(cluster, contents, &original).await?;
    }
    let name = deletion_content_name(&r.handle);
    let key = vsc_key(&name);
    let body = json!({
        "apiVersion": format!("{}/{}", contents.gr.group, contents.version),
        "kind": "VolumeSnapshotContent",
        "metadata": {"name": name, "labels": {BACKUP_NAME_LABEL: backup, BACKUP_UID_LABEL: uid}},
        "spec": {
            "deletionPolicy": "Delete",
            "driver": r.driver,
            "source": {"snapshotHandle": r.handle},
            "volumeSnapshotRef": {"apiVersion": format!("{}/{}", snapshots.gr.group, snapshots.version),
                "kind": "VolumeSnapshot", "namespace": r.namespace, "name": name},
        },
    })
    .to_string();
    let looked = timeout(runtime, timeout_ms, async {
        let mut vsc = create_or_get(cluster, contents, &key, &body, uid).await?;
        loop {
            if s(&vsc, "/status/snapshotHandle").is_some() {
                return Ok(SnapshotDeletion::Deleted);
            }
            if let Some(msg) = s(&vsc, "/status/error/message") {
                return Ok(match had_objects {
                    true => SnapshotDeletion::Deleted,
                    false => SnapshotDeletion::AlreadyGone(msg.to_string()),
                });
            }
            watch(cluster, contents, &key, &rv(&vsc), WATCH_MS_MAX).await?;
            vsc = match get(cluster, contents, &key).await? {
                Some(v) => v,
                None => return Err(format!("VolumeSnapshotContent {name} was deleted by someone else")),
            };
        }
    })
    .await;
    let outcome = match looked {
        Some(r) => r?,
        None => {
            return Err(format!(
                "VolumeSnapshotContent {name} (snapshot {}): the snapshot controller did not look at it within {}",
                r.handle,
                human_ms(timeout_ms)
            ))
        }
    };
    delete(cluster, contents, &key).await?;
    let gone = timeout(runtime, timeout_ms, async {
        loop {
            let Some(vsc) = get(cluster, contents, &key).await? else { return Ok::<_, String>(()) };
            watch(cluster, contents, &key, &rv(&vsc), WATCH_MS_MAX).await?;
        }
    })
    .await;
    match gone {
        Some(r) => r.map(|()| outcome),
        None => Err(format!(
            "VolumeSnapshotContent {name} (snapshot {}) was not gone within {}",
            r.handle,
            human_ms(timeout_ms)
        )),
    }
}

/// The storage snapshot a VolumeSnapshotContent (`vsc`) holds, as the VolumeSnapshot
/// `namespace/snapshot` cut it: `None` without a name, a driver or a handle (status, or the source
/// of an imported content).
pub fn retained_of(vsc: &Value, namespace: &str, snapshot: &str) -> Option<blockwise_engine::state::RetainedSnapshot> {
    Some(blockwise_engine::state::RetainedSnapshot {
        namespace: namespace.to_string(),
        snapshot: snapshot.to_string(),
        content: s(vsc, "/metadata/name")?.to_string(),
        driver: s(vsc, "/spec/driver")?.to_string(),
        handle: s(vsc, "/status/snapshotHandle").or_else(|| s(vsc, "/spec/source/snapshotHandle"))?.to_string(),
    })
}

/// The storage snapshots of backup `uid` that its snapshot objects in the cluster still name (a
/// backup whose log is damaged: `DataDir::delete`): every VolumeSnapshot and VolumeSnapshotContent
/// labelled with its uid, with the content a snapshot is bound to, as far as a handle is set. Group
/// snapshots' members are VolumeSnapshots of their own, found the same way.
pub async fn labelled_snapshots(
    cluster: &dyn Cluster,
    contents: &ResourceType,
    snapshots: &ResourceType,
    uid: &str,
) -> Result<Vec<blockwise_engine::state::RetainedSnapshot>, String> {
    let label = format!("/metadata/labels/{}", BACKUP_UID_LABEL.replace('/', "~1"));
    let mut out = Vec::new();
    for rt in [snapshots, contents] {
        let mut token: Option<String> = None;
        loop {
            let page = cluster
                .list(rt, None, 500, token.as_deref())
                .await
                .map_err(|e| format!("listing {}: {e}", rt.gr.resource))?;
            for json in &page.objects {
                let v = parse(&rt.kind, json)?;
                let deletion = s(&v, "/metadata/name").is_some_and(|n| n.starts_with("blockwise-delete-"));
                if s(&v, &label) != Some(uid) || deletion {
                    continue;
                }
                if rt.namespaced {
                    let (ns, name) = (s(&v, "/metadata/namespace").unwrap_or_default(), s(&v, "/metadata/name"));
                    let bound = s(&v, "/status/boundVolumeSnapshotContentName");
                    if let (Some(name), Some(bound)) = (name, bound) {
                        if let Some(vsc) = get(cluster, contents, &vsc_key(bound)).await? {
                            out.extend(retained_of(&vsc, ns, name));
                        }
                    }
                } else {
                    let ns = s(&v, "/spec/volumeSnapshotRef/namespace").unwrap_or_default().to_string();
                    let name = s(&v, "/spec/volumeSnapshotRef/name").unwrap_or_default().to_string();
                    out.extend(retained_of(&v, &ns, &name));
                }
            }
            match page.continue_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
    }
    Ok(out)
}

/// Deletes every storage snapshot of `retained` ([`delete_retained`]), at most
/// [`SNAPSHOT_CALLS_CONCURRENT_MAX`] at once; answers in their order.
pub async fn delete_all_retained(
    d: &RetainedDeletion<'_>,
    retained: &[blockwise_engine::state::RetainedSnapshot],
) -> Vec<Result<SnapshotDeletion, String>> {
    in_order_window(retained.iter().map(|r| delete_retained(d, r)).collect()).await
}
