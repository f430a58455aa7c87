//! The simulated cluster: a [`FakeCluster`] behind virtual latency, injected faults and the
//! world's records.
//!
//! [`SimCluster`] is what the production driver talks to under simulation (wrapped, as in
//! production, in the shell's `RetryingCluster`). Every call takes virtual time drawn from the
//! seed; list calls can answer 5xx/429 (`Unavailable`, which the shell retries — and a unit can
//! fail more often than the retries allow) or, once per unit on a continued page, 410 Gone; gets of
//! chosen keys are forbidden for good; execs can exit non-zero, error, run past their timeout
//! ("timeout") or never return ("hang"), and a slow worker stretches any call. At the first exec
//! the cluster can change behind the backup's back (a hooked pod deleted, a container renamed).
//! Each call is recorded in the [`WorldLog`] with what it answered, and each exec's end — or its
//! cancellation, when the caller drops it — is recorded too: the judges' evidence.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use blockwise_adapters::world::Runtime;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError, ExecResult, ListPage};
use serde::{Deserialize, Serialize};

use crate::fake::FakeCluster;
use crate::media::{never, Death};
use crate::records::{ExecEnd, GetAnswer, ListAnswer, Record, WorldLog};
use crate::vt::SimRuntime;

/// How an exec misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HookFault {
    /// Non-zero exit.
    Exit,
    /// The exec errors (connection reset).
    Error,
    /// Slower than its timeout (it would finish, much later).
    Timeout,
    /// Never returns; only the caller's timeout ends it.
    Hang,
}

/// How the API server goes away (issue 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiOutage {
    /// The process is gone: every call is refused at once.
    Gone,
    /// The process hangs (stopped, a stuck proxy): every call is accepted and never answered —
    /// only the caller's deadline ends it.
    Hung,
}

/// A change of the cluster made at the first exec, after everything was listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The pod is deleted.
    DeletePod(ItemKey),
    /// The pod's containers are renamed (an exec into the old name fails).
    RenameContainers(ItemKey),
}

/// Command durations in virtual milliseconds, as inclusive ranges drawn per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies {
    /// One list page.
    pub list_page_ms: (u64, u64),
    /// One get.
    pub get_ms: (u64, u64),
    /// One hook exec.
    pub exec_ms: (u64, u64),
    /// One store operation.
    pub store_ms: (u64, u64),
}

impl Latencies {
    /// The spread used for simulated seeds.
    pub const SEEDED: Latencies =
        Latencies { list_page_ms: (5, 50), get_ms: (5, 20), exec_ms: (10, 120), store_ms: (1, 10) };
}

/// Faults of the cluster for one run.
#[derive(Debug, Clone, Default)]
pub struct ClusterFaults {
    /// Per resource: how many list calls answer 5xx/429 before one succeeds.
    pub list_unavailable: BTreeMap<String, u32>,
    /// Resources whose failing list calls answer 429 rather than 503.
    pub list_throttled: BTreeSet<String>,
    /// A continued list answers 410 Gone once per unit.
    pub list_gone: bool,
    /// Gets of these keys answer 403, always.
    pub get_forbidden: BTreeSet<ItemKey>,
    /// Per (pod, command): how the exec misbehaves, on every attempt.
    pub hooks: BTreeMap<(ItemKey, Vec<String>), HookFault>,
    /// Chance that a call is 10–50 times slower.
    pub slow_p: f64,
    /// Changes made at the first exec.
    pub changes: Vec<Change>,
    /// Chance that a create answers 503 without applying it (restores).
    pub create_unavailable_p: f64,
    /// Chance that a create is applied but answered 503: the answer was lost (restores).
    pub create_lost_p: f64,
    /// The API server goes away once this exec (pod, command) has answered — inside the window it
    /// opened when it is a pre-hook — until the next process starts; once.
    pub api_outage_after: Option<(ItemKey, Vec<String>, ApiOutage)>,
}

/// How long a "timeout" exec takes: far beyond any simulated hook timeout.
pub const SLOW_EXEC_MS: u64 = 60_000;

#[derive(Default)]
struct State {
    list_calls: BTreeMap<String, u32>,
    gone_once: BTreeSet<String>,
    changed: bool,
    next_exec: u64,
    hits: BTreeSet<&'static str>,
    /// The API server is away.
    outage: Option<ApiOutage>,
    /// The outage happened (it happens once).
    outage_had: bool,
}

/// The simulated cluster; see the module docs.
pub struct SimCluster {
    fake: Mutex<FakeCluster>,
    rt: SimRuntime,
    records: WorldLog,
    death: Death,
    faults: ClusterFaults,
    lat: Latencies,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls a future of the fake cluster (which never waits: it has no clock) to its end.
fn at_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn kind(e: &ClusterError) -> &'static str {
    match e {
        ClusterError::Expired(_) => "expired",
        ClusterError::Unavailable(_) => "unavailable",
        ClusterError::Forbidden(_) => "forbidden",
        ClusterError::NotFound(_) => "missing",
        ClusterError::AlreadyExists(_) => "exists",
        ClusterError::Other(_) => "other",
    }
}

fn waited() -> ClusterError {
    ClusterError::Other("the fake cluster waited, which it cannot do under simulation".into())
}

/// Records the end of an exec; a drop before [`ExecGuard::finish`] is a cancellation.
struct ExecGuard<'a> {
    id: u64,
    cluster: &'a SimCluster,
    done: bool,
}

impl ExecGuard<'_> {
    fn finish(mut self, end: ExecEnd) {
        self.done = true;
        self.cluster.records.push(Record::ExecEnd { id: self.id, at_ms: self.cluster.rt.now(), end });
    }
}

impl Drop for ExecGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.cluster.records.push(Record::ExecEnd {
                id: self.id,
                at_ms: self.cluster.rt.now(),
                end: ExecEnd::Cancelled,
            });
        }
    }
}

impl SimCluster {
    /// A simulated cluster serving `fake`.
    pub fn new(
        fake: FakeCluster,
        rt: SimRuntime,
        records: WorldLog,
        death: Death,
        faults: ClusterFaults,
        lat: Latencies,
    ) -> SimCluster {
        SimCluster { fake: Mutex::new(fake), rt, records, death, faults, lat, state: Mutex::default() }
    }

    /// Fault names that actually happened.
    pub fn hits(&self) -> BTreeSet<&'static str> {
        lock(&self.state).hits.clone()
    }

    fn hit(&self, what: &'static str) {
        lock(&self.state).hits.insert(what);
    }

    fn latency(&self, (lo, hi): (u64, u64)) -> u64 {
        let slow_p = self.faults.slow_p;
        let (d, slow) = {
            let mut slow = false;
            let d = self.rt.draw(|r| {
                let mut d = r.range(lo, hi).max(1);
                if slow_p > 0.0 && r.chance(slow_p) {
                    slow = true;
                    d *= r.range(10, 50);
                }
                d
            });
            (d, slow)
        };
        if slow {
            self.hit("slow-worker");
        }
        d
    }

    /// The API server goes away now (until [`SimCluster::heal`]); once per world.
    pub fn go_away(&self, outage: ApiOutage) {
        let first = {
            let mut st = lock(&self.state);
            let first = !std::mem::replace(&mut st.outage_had, true);
            if first {
                st.outage = Some(outage);
            }
            first
        };
        if first {
            self.hit(match outage {
                ApiOutage::Gone => "api-gone",
                ApiOutage::Hung => "api-hung",
            });
            self.records.push(Record::ApiAway { at_ms: self.rt.now(), outage });
        }
    }

    /// The API server is back (a new process starts after the outage).
    pub fn heal(&self) {
        let was = lock(&self.state).outage.take();
        if let Some(o) = was {
            self.records.push(Record::ApiBack { at_ms: self.rt.now(), outage: o });
        }
    }

    /// What a call meets while the API server is away: `Some(error)` at once when it is gone, no
    /// answer ever when it hangs; `None` when the server is there.
    async fn outage(&self) -> Option<ClusterError> {
        let outage = lock(&self.state).outage;
        match outage {
            None => None,
            Some(ApiOutage::Gone) => {
                self.rt.sleep(1).await;
                Some(ClusterError::Unavailable("connection refused (injected: the API server is gone)".into()))
            }
            Some(ApiOutage::Hung) => {
                // Accepted, never answered: only the caller's deadline (or a crash) ends it.
                std::future::pending::<()>().await;
                Some(waited())
            }
        }
    }

    /// Moves the fake CSI driver's events into the world's records.
    fn drain(&self) {
        for e in lock(&self.fake).take_csi_events() {
            self.records.push(Record::Csi(e));
        }
    }

    /// Runs the snapshot controller up to now and records what it did (the end of a run).
    pub fn settle(&self) {
        lock(&self.fake).settle_at(self.rt.now());
        self.drain();
    }

    /// Every object the cluster holds now (the end of a simulated restore), by key.
    pub fn live_objects(&self) -> BTreeMap<ItemKey, serde_json::Value> {
        let fake = lock(&self.fake);
        let now = self.rt.now();
        let mut out = BTreeMap::new();
        for rt in fake.resources() {
            out.extend(fake.live_at(now, &rt.gr).0);
        }
        out
    }

    /// The fake driver's storage snapshots.
    pub fn storage_snapshots(&self) -> BTreeMap<String, crate::csi::StorageSnapshot> {
        lock(&self.fake).storage_snapshots()
    }

    /// Snapshot objects left in the cluster.
    pub fn snapshot_objects(&self) -> Vec<ItemKey> {
        lock(&self.fake).snapshot_objects()
    }

    fn write_record(
        &self,
        verb: &'static str,
        key: ItemKey,
        answer: &Result<impl Sized, ClusterError>,
        subject: Option<String>,
    ) {
        let answer = match answer {
            Ok(_) => "ok",
            Err(e) => kind(e),
        };
        self.records.push(Record::Write { at_ms: self.rt.now(), verb, key, answer, subject });
        self.drain();
    }

    fn apply_changes(&self) {
        let first = {
            let mut st = lock(&self.state);
            !std::mem::replace(&mut st.changed, true)
        };
        if !first || self.faults.changes.is_empty() {
            return;
        }
        let mut fake = lock(&self.fake);
        for c in &self.faults.changes {
            let what = match c {
                Change::DeletePod(k) => {
                    fake.remove_object(k);
                    format!("deleted pod {k}")
                }
                Change::RenameContainers(k) => {
                    if let Some(cs) = fake.object_mut(k).and_then(|o| o.pointer_mut("/spec/containers")) {
                        if let Some(cs) = cs.as_array_mut() {
                            for c in cs {
                                c["name"] = serde_json::json!("renamed");
                            }
                        }
                    }
                    format!("renamed the containers of pod {k}")
                }
            };
            self.records.push(Record::ClusterChanged { at_ms: self.rt.now(), what });
        }
        drop(fake);
        self.hit("cluster-change");
    }
}

#[async_trait]
impl Cluster for SimCluster {
    async fn discover(&self) -> Result<Vec<ResourceType>, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        self.rt.sleep(5).await;
        if self.death.is_dead() {
            return never().await;
        }
        Ok(lock(&self.fake).resources().to_vec())
    }

    async fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        let d = self.latency(self.lat.list_page_ms);
        self.rt.sleep(d).await;
        if self.death.is_dead() {
            return never().await;
        }
        let unit = format!("{}/{}", rt.gr, namespace.unwrap_or("*"));
        let answer = {
            let mut st = lock(&self.state);
            let calls = st.list_calls.entry(unit.clone()).or_insert(0);
            *calls += 1;
            let calls = *calls;
            let failing = self.faults.list_unavailable.get(&rt.gr.to_string()).copied().unwrap_or(0);
            if calls <= failing {
                if self.faults.list_throttled.contains(&rt.gr.to_string()) {
                    st.hits.insert("list-429");
                    Err(ClusterError::Unavailable(format!("list {unit}: 429 Too Many Requests (injected)")))
                } else {
                    st.hits.insert("list-5xx");
                    Err(ClusterError::Unavailable(format!("list {unit}: 503 Service Unavailable (injected)")))
                }
            } else if continue_token.is_some() && self.faults.list_gone && st.gone_once.insert(unit.clone()) {
                st.hits.insert("list-410");
                Err(ClusterError::Expired(format!("list {unit}: 410 Gone (injected)")))
            } else {
                drop(st);
                lock(&self.fake).list_at(self.rt.now(), rt, namespace, limit, continue_token)
            }
        };
        let recorded = match &answer {
            Ok(p) => ListAnswer::Page { objects: p.objects.len(), more: p.continue_token.is_some() },
            Err(e) => ListAnswer::Error(kind(e)),
        };
        self.records.push(Record::List {
            at_ms: self.rt.now(),
            resource: rt.gr.to_string(),
            namespace: namespace.filter(|_| rt.namespaced).map(str::to_string),
            continued: continue_token.is_some(),
            answer: recorded,
        });
        answer
    }

    async fn get(&self, rt: &ResourceType, key: &ItemKey) -> Result<Option<String>, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        let d = self.latency(self.lat.get_ms);
        self.rt.sleep(d).await;
        if self.death.is_dead() {
            return never().await;
        }
        let answer = if self.faults.get_forbidden.contains(key) {
            self.hit("get-error");
            Err(ClusterError::Forbidden(format!("get {key}: 403 Forbidden (injected)")))
        } else {
            lock(&self.fake).get_at(self.rt.now(), rt, key)
        };
        self.drain();
        let recorded = match &answer {
            Ok(Some(_)) => GetAnswer::Found,
            Ok(None) => {
                self.hit("deleted-before-get");
                GetAnswer::NotFound
            }
            Err(e) => GetAnswer::Error(kind(e)),
        };
        self.records.push(Record::Get { at_ms: self.rt.now(), key: key.clone(), answer: recorded });
        answer
    }

    async fn exec(&self, pod: &ItemKey, container: &str, command: &[String]) -> Result<ExecResult, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        if self.death.is_dead() {
            return never().await;
        }
        self.apply_changes();
        let id = {
            let mut st = lock(&self.state);
            st.next_exec += 1;
            st.next_exec
        };
        self.records.push(Record::ExecStart {
            id,
            at_ms: self.rt.now(),
            pod: pod.clone(),
            container: container.to_string(),
            command: command.to_vec(),
        });
        let guard = ExecGuard { id, cluster: self, done: false };
        let fault = self.faults.hooks.get(&(pod.clone(), command.to_vec())).copied();
        let result = match fault {
            Some(HookFault::Hang) => {
                self.hit("hook-hang");
                // Never returns and never wakes: only the driver's timeout (or a crash) ends it.
                std::future::pending::<()>().await;
                Err(waited())
            }
            Some(HookFault::Timeout) => {
                self.hit("hook-timeout");
                self.rt.sleep(SLOW_EXEC_MS).await;
                Ok(ExecResult { exit_code: 0, stdout: "finally".into(), stderr: String::new() })
            }
            Some(HookFault::Exit) => {
                self.hit("hook-exit");
                let d = self.latency(self.lat.exec_ms);
                self.rt.sleep(d).await;
                Ok(ExecResult { exit_code: 3, stdout: String::new(), stderr: "injected failure".into() })
            }
            Some(HookFault::Error) => {
                self.hit("hook-error");
                let d = self.latency(self.lat.exec_ms);
                self.rt.sleep(d).await;
                Err(ClusterError::Other("exec stream reset (injected)".into()))
            }
            None => {
                let d = self.latency(self.lat.exec_ms);
                self.rt.sleep(d).await;
                let fake = lock(&self.fake);
                at_once(fake.exec(pod, container, command)).unwrap_or_else(|| Err(waited()))
            }
        };
        if self.death.is_dead() {
            // The process died while the exec ran: its caller will never hear of the result.
            return never().await;
        }
        guard.finish(match &result {
            Ok(r) => ExecEnd::Exited(r.exit_code),
            Err(e) => ExecEnd::Failed(e.to_string()),
        });
        if let Some((p, c, outage)) = &self.faults.api_outage_after {
            if p == pod && c.as_slice() == command {
                self.go_away(*outage);
            }
        }
        result
    }

    async fn reachable(&self) -> Result<(), ClusterError> {
        match self.outage().await {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn create(&self, rt: &ResourceType, namespace: Option<&str>, json: &str) -> Result<String, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        let d = self.latency(self.lat.get_ms);
        self.rt.sleep(d).await;
        if self.death.is_dead() {
            return never().await;
        }
        let body = serde_json::from_str::<serde_json::Value>(json).unwrap_or_default();
        let text = |p: &str| body.pointer(p).and_then(|n| n.as_str()).map(str::to_string);
        let name = text("/metadata/name").unwrap_or_default();
        let subject = text("/spec/source/persistentVolumeClaimName").or_else(|| {
            let labels = body.pointer("/spec/source/selector/matchLabels")?.as_object()?;
            labels.values().next()?.as_str().map(str::to_string)
        });
        let key = match namespace.filter(|_| rt.namespaced) {
            Some(ns) => ItemKey::namespaced(&rt.gr.group, &rt.gr.resource, ns, &name),
            None => ItemKey::cluster(&rt.gr.group, &rt.gr.resource, &name),
        };
        let chance = |p: f64| p > 0.0 && self.rt.draw(|r| u64::from(r.chance(p))) == 1;
        let (down, lost) = (chance(self.faults.create_unavailable_p), chance(self.faults.create_lost_p));
        if down {
            self.hit("create-5xx");
            let answer: Result<String, ClusterError> =
                Err(ClusterError::Unavailable("503 injected before the create".into()));
            self.write_record("create", key, &answer, subject);
            return answer;
        }
        let answer = lock(&self.fake).create_at(self.rt.now(), rt, namespace, json);
        if lost && answer.is_ok() {
            // Applied, but the caller hears a 503 (a response lost on the way back).
            self.hit("create-lost");
            self.records.push(Record::Write { at_ms: self.rt.now(), verb: "create", key, answer: "lost", subject });
            self.drain();
            return Err(ClusterError::Unavailable("503 injected after the create was applied".into()));
        }
        self.write_record("create", key, &answer, subject);
        answer
    }

    async fn patch(&self, rt: &ResourceType, key: &ItemKey, merge_patch: &str) -> Result<String, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        let d = self.latency(self.lat.get_ms);
        self.rt.sleep(d).await;
        if self.death.is_dead() {
            return never().await;
        }
        let answer = lock(&self.fake).patch_at(self.rt.now(), rt, key, merge_patch);
        self.write_record("patch", key.clone(), &answer, None);
        answer
    }

    async fn delete(&self, rt: &ResourceType, key: &ItemKey) -> Result<bool, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        let d = self.latency(self.lat.get_ms);
        self.rt.sleep(d).await;
        if self.death.is_dead() {
            return never().await;
        }
        let answer = lock(&self.fake).delete_at(self.rt.now(), rt, key);
        let recorded = match &answer {
            Ok(false) => Err(ClusterError::NotFound(String::new())),
            Ok(true) => Ok(()),
            Err(e) => Err(e.clone()),
        };
        self.write_record("delete", key.clone(), &recorded, None);
        answer
    }

    /// Sleeps on virtual time until the fake controller's next change of the object (or the
    /// timeout), then answers like a get.
    async fn watch(
        &self,
        rt: &ResourceType,
        key: &ItemKey,
        resource_version: &str,
        timeout_ms: u64,
    ) -> Result<Option<String>, ClusterError> {
        if let Some(e) = self.outage().await {
            return Err(e);
        }
        if self.death.is_dead() {
            return never().await;
        }
        let wait = lock(&self.fake).watch_wait(self.rt.now(), key, resource_version, timeout_ms);
        if wait > 0 {
            self.rt.sleep(wait).await;
        }
        if self.death.is_dead() {
            return never().await;
        }
        let answer = lock(&self.fake).get_at(self.rt.now(), rt, key);
        self.drain();
        answer
    }
}

/// A handle to share one [`SimCluster`] between the world and the report.
pub type SharedCluster = Arc<SimCluster>;
