//! A fake Kubernetes API server: any [`FakeCluster`] served over the real wire protocol.
//!
//! No kube-apiserver can run where blockwise is built, so this module speaks enough of the
//! Kubernetes HTTP API for real clients — kube-rs (backups, a controller's watcher, leader election,
//! status patches) and `kubectl` — to run against a fake cluster over plain HTTP on loopback:
//! discovery (`/api`, `/apis`, their group versions, `/version`, with short names, categories and
//! `{resource}/status` entries), lists (namespaced, cluster-wide, across namespaces) with
//! `limit`/`continue` pagination, label selectors and field selectors (`path=value`, `path!=value` on
//! dotted paths), gets, and
//! pod exec over WebSocket (`v5.channel.k8s.io` / `v4.channel.k8s.io`: stdout on channel 1, stderr
//! on 2, the `Status` on 3; kubectl 1.30+) or over SPDY/3.1 ([`spdy`], `v4.channel.k8s.io`: one
//! stream per channel; kubectl before 1.30), either running the fake cluster's scripted or
//! interpreted commands.
//!
//! **One resourceVersion.** Every write bumps the cluster's one counter (built-in objects keep
//! versions at or below where it starts); lists report the current one, gets the object's.
//! **Watches** of lists ([`watch`]) stream the cluster's change history from a resourceVersion,
//! then live changes — including the fake snapshot controller's time-driven ones — with bookmarks,
//! a 410 `Expired` ERROR event for a version older than the history, and synthetic ADDED events
//! from `""`/`"0"`. **Writes** ([`crate::csi::ApiWrite`]): `POST` (201; 409 `AlreadyExists`),
//! `PUT` and `PATCH` — merge patch, strategic merge patch **treated as a merge patch** (lists are
//! replaced, not merged by key), server-side apply with field ownership per manager
//! ([`crate::fields`]: 409 `Conflict` naming field and manager, `force`) — with a
//! `metadata.resourceVersion` precondition (409 `Conflict`), `DELETE` with finalizers, and the
//! status subresource (`…/{name}/status`) for the snapshot kinds and CRDs that declare one.
//! Created **CustomResourceDefinitions** are served at once ([`crate::crd`]); deleting one removes
//! its objects; deleting a namespace deletes what is in it. Resources a controller and an install
//! manifest need ([`always_served`]) are added to any served cluster that lacks them. **Tables**
//! for `kubectl get` (`as=Table`, also in watches) with pod and CRD printer columns. **OpenAPI**
//! ([`openapi`]): `/openapi/v3` and a document per group-version declaring the paths, operations
//! and `fieldValidation` parameter, so kubectl leaves validation to the server (`kubectl apply`
//! needs no `--validate=false`); an empty `/openapi/v2`. **Field validation** on writes
//! (`fieldValidation=Strict|Warn|Ignore`, default Warn): fields a CRD's schema does not declare
//! are pruned from the body ([`crate::crd::prune_unknown`]) — Strict refuses the write (400)
//! instead, Warn names each in a `Warning` header.
//!
//! Key decisions: the server holds no state of its own beyond [`Faults`] (injected HTTP errors —
//! 5xx, 429, 410 on continued lists, 403, failed watches — for tests) and a request log; the
//! objects, their history and the served CRDs are the fake cluster's, so an in-memory backup and
//! one through this server see the same objects. Paths are parsed by hand in one fallback handler
//! rather than by a router table, because the Kubernetes path grammar (`/api/v1/namespaces/{ns}`
//! is both a get of a namespace and a prefix) does not fit one. Deliberately absent: TLS,
//! authentication and authorization, admission, schema validation beyond a CRD's field names
//! (no types, formats or enums; built-in kinds have no schema here, so nothing of theirs is
//! checked or pruned; duplicate JSON keys are not detected), schemas in the OpenAPI documents for
//! built-in kinds, JSON patch (415), YAML apply bodies (kubectl and kube-rs send JSON), exec stdin
//! and terminal resizing (read and dropped), SPDY exec protocols before v4, delete collection, and
//! watch-cache details (an object leaving a label selector is not sent as DELETED). This module is compiled only with the `server` feature, so the deterministic
//! simulator core stays free of tokio.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError, ExecResult};
use blockwise_engine::spec::LabelSelector;
use serde_json::{json, Value};

use crate::csi::{ApiError, ApiWrite};
use crate::fake::FakeCluster;

mod connections;
mod openapi;
pub mod spdy;
mod table;
mod watch;

pub use table::human_duration;
pub use watch::{WATCH_POLL_MS_MAX, WATCH_SECONDS_DEFAULT, WATCH_SECONDS_MAX};

/// The context, cluster and user name in kubeconfigs written for this server.
pub const KUBECONFIG_CONTEXT: &str = "blockwise-simulator";
/// Exec subprotocols served, in order of preference.
pub const EXEC_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// The least time from a WebSocket exec's upgrade to its first output (see `run_exec`).
pub const EXEC_START_MS: u64 = 10;

/// Which kind of call a [`Fault`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Discovery (`/api`, `/apis`, their group versions) and the OpenAPI documents.
    Discovery,
    /// A list call.
    List,
    /// A get of one object.
    Get,
    /// A pod exec (fails before the WebSocket upgrade).
    Exec,
    /// A create, replace, patch or delete.
    Write,
    /// A watch of a list (fails before the stream starts).
    Watch,
}

/// One injected error: the next `times` matching calls answer `status` instead of being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The kind of call.
    pub verb: Verb,
    /// Plural resource, `plural.group` for non-core groups (`…/status`: writes of the status
    /// subresource only); `None` matches every resource.
    pub resource: Option<String>,
    /// Only lists that carry a `continue` token (how a 410 Gone on an expired token looks).
    pub continued_only: bool,
    /// The HTTP status answered (with a Kubernetes `Status` body).
    pub status: u16,
    /// How many calls it still fails; `u32::MAX` for ever.
    pub times: u32,
}

impl Fault {
    /// Fails the next `times` calls of `verb` on `resource` (any resource when `None`) with `status`.
    pub fn new(verb: Verb, resource: Option<&str>, status: u16, times: u32) -> Fault {
        Fault { verb, resource: resource.map(str::to_string), continued_only: false, status, times }
    }

    /// Only matches lists that carry a continue token.
    pub fn on_continue(mut self) -> Fault {
        self.continued_only = true;
        self
    }
}

/// The injected errors of one server; settable while it runs.
#[derive(Debug, Default)]
pub struct Faults(Mutex<Vec<Fault>>);

impl Faults {
    /// Adds a fault; faults are tried in the order added.
    pub fn add(&self, fault: Fault) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(fault);
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// The status to answer for this call, consuming one use of the first matching fault.
    fn take(&self, verb: Verb, resource: Option<&str>, continued: bool) -> Option<u16> {
        let mut faults = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let i = faults.iter().position(|f| {
            f.verb == verb
                && f.times > 0
                && (!f.continued_only || continued)
                && f.resource.as_deref().is_none_or(|r| Some(r) == resource)
        })?;
        let f = &mut faults[i];
        if f.times != u32::MAX {
            f.times -= 1;
        }
        Some(f.status)
    }
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    /// The status answered (101 for an exec upgrade).
    pub status: u16,
}

struct Shared {
    cluster: Arc<FakeCluster>,
    faults: Arc<Faults>,
    requests: Mutex<Vec<RequestRecord>>,
    execs_cancelled: Arc<AtomicU64>,
    addr: SocketAddr,
    /// Woken after every change of the cluster (its [`FakeCluster::on_change`] callback).
    changed: Arc<tokio::sync::Notify>,
    /// How often a watch that allows bookmarks gets one, in milliseconds.
    bookmark_ms: AtomicU64,
    /// The connections open now ([`FakeApiServer::quiesce`]).
    connections: connections::Connections,
}

/// How often a watch with `allowWatchBookmarks` gets a BOOKMARK by default (the real server: about
/// once a minute).
pub const BOOKMARK_MS_DEFAULT: u64 = 60_000;

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Binds `addr` (use `127.0.0.1:0` for any free port) and serves `cluster` on the current tokio
    /// runtime until the returned handle is dropped or the runtime ends. Give the cluster the
    /// shell's `TokioRuntime` as its clock if it has latency or hanging execs.
    pub async fn start(cluster: Arc<FakeCluster>, addr: SocketAddr) -> io::Result<FakeApiServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let changed = Arc::new(tokio::sync::Notify::new());
        let wake = changed.clone();
        cluster.on_change(Arc::new(move || wake.notify_waiters()));
        for rt in always_served() {
            cluster.serve_also(rt);
        }
        let shared = Arc::new(Shared {
            cluster,
            faults: Arc::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            execs_cancelled: Arc::new(AtomicU64::new(0)),
            addr,
            changed,
            bookmark_ms: AtomicU64::new(BOOKMARK_MS_DEFAULT),
            connections: connections::Connections::default(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = connections::CountedListener { inner: listener, connections: shared.connections.clone() };
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "fake API server stopped");
            }
        });
        Ok(FakeApiServer { shared, task })
    }

    /// Sets how often watches that allow bookmarks get one (tests use a few milliseconds).
    pub fn set_bookmark_interval_ms(&self, ms: u64) {
        self.shared.bookmark_ms.store(ms.max(1), Ordering::SeqCst);
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The injected errors, settable while the server runs.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// The cluster served.
    pub fn cluster(&self) -> &Arc<FakeCluster> {
        &self.shared.cluster
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Returns once every connection open (or waiting to be accepted) now has closed: after a
    /// client is killed, nothing it sent is served later — a test changes the server (clears a
    /// fault) after this, not while a dead process's request is still to be answered. Connections
    /// made after the call are not waited for; a live client's open watch holds it.
    pub async fn quiesce(&self) -> io::Result<()> {
        self.shared.connections.quiesce(self.shared.addr).await
    }

    /// Execs whose client went away before the command finished (a cancelled stream).
    pub fn execs_cancelled(&self) -> u64 {
        self.shared.execs_cancelled.load(Ordering::SeqCst)
    }

    /// A kubeconfig (JSON, which is YAML) whose only context points at this server, no credentials.
    pub fn kubeconfig(&self) -> String {
        kubeconfig_for(&self.url())
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A kubeconfig whose current context `blockwise-simulator` points at `server`.
pub fn kubeconfig_for(server: &str) -> String {
    let name = KUBECONFIG_CONTEXT;
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    });
    format!("{doc:#}\n")
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "AlreadyExists",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    raw_json_response(code, body.to_string())
}

/// A response whose body is JSON already serialized.
fn raw_json_response(code: u16, body: String) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn failure(code: u16, message: impl Into<String>) -> Response {
    let message = message.into();
    json_response(code, &status_body(code, reason_of(code), &message))
}

fn not_found(path: &str) -> Response {
    failure(404, format!("the server could not find the requested resource ({path})"))
}

/// The query parameters of a request, repeated keys kept in order.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }
    fn all(&self, key: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
    }
}

fn fault_name(rt: &ResourceType) -> String {
    if rt.gr.group.is_empty() {
        rt.gr.resource.clone()
    } else {
        format!("{}.{}", rt.gr.resource, rt.gr.group)
    }
}

/// The connection of a request that asks to upgrade to SPDY/3.1 (`Upgrade: SPDY/3.1`), taken out
/// of the request for an exec to keep; `None` for every other request.
struct SpdyUpgrade(Option<hyper::upgrade::OnUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for SpdyUpgrade {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let spdy = parts
            .headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|u| u.trim().eq_ignore_ascii_case(SPDY_UPGRADE));
        Ok(SpdyUpgrade(if spdy { parts.extensions.remove::<hyper::upgrade::OnUpgrade>() } else { None }))
    }
}

/// The `Upgrade` token of SPDY exec.
const SPDY_UPGRADE: &str = "SPDY/3.1";
/// The header in which an exec client offers, and the server names, the stream protocol.
const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";

/// A request's method, headers and body.
struct Req<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    spdy: SpdyUpgrade,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = Query::parse(uri.query());
    let req = Req { method: &method, headers: &headers, body: &body };
    let response = route(&s, &req, &path, &query, Upgrade { ws, spdy: spdy.0 }).await;
    s.requests.lock().unwrap_or_else(PoisonError::into_inner).push(RequestRecord {
        method: method.to_string(),
        path,
        query: uri.query().unwrap_or("").to_string(),
        status: response.status().as_u16(),
    });
    response
}

/// Resources every served cluster gets, if its built-in set lacks them: what a controller and
/// `kubectl apply` of an install manifest need. Added at [`FakeApiServer::start`] through
/// [`FakeCluster::serve_also`], so the engine's view of a cluster without a server is unchanged.
pub fn always_served() -> Vec<ResourceType> {
    [
        ("", "v1", "namespaces", "Namespace", false),
        ("", "v1", "serviceaccounts", "ServiceAccount", true),
        ("", "v1", "services", "Service", true),
        ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true),
        ("", "v1", "configmaps", "ConfigMap", true),
        ("", "v1", "events", "Event", true),
        ("apps", "v1", "deployments", "Deployment", true),
        ("coordination.k8s.io", "v1", "leases", "Lease", true),
        ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
        ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false),
        ("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
        ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true),
    ]
    .into_iter()
    .map(|(g, v, r, k, n)| ResourceType::new(g, v, r, k, n))
    .chain(std::iter::once(crate::crd::crd_resource()))
    .collect()
}

/// The ways a request may ask to switch protocols (only an exec uses them).
struct Upgrade {
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    spdy: Option<hyper::upgrade::OnUpgrade>,
}

async fn route(s: &Arc<Shared>, req: &Req<'_>, path: &str, query: &Query, upgrade: Upgrade) -> Response {
    let method = req.method;
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|p| !p.is_empty()).collect();
    let writes = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
    if method != Method::GET && !writes.contains(method) {
        return failure(405, format!("{method} {path}: not supported by this fake API server"));
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => return json_response(200, &version_info()),
        ["api"] | ["apis"] | ["api", _] | ["apis", _, _] => {
            if method != Method::GET {
                return failure(405, format!("{method} {path}: discovery is read-only"));
            }
            if let Some(code) = s.faults.take(Verb::Discovery, None, false) {
                return failure(code, format!("discovery {path}: injected error"));
            }
            return discovery(s, &segs).unwrap_or_else(|| not_found(path));
        }
        ["openapi", ..] => {
            if method != Method::GET {
                return failure(405, format!("{method} {path}: the OpenAPI documents are read-only"));
            }
            if let Some(code) = s.faults.take(Verb::Discovery, None, false) {
                return failure(code, format!("openapi {path}: injected error"));
            }
            let accept = req.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
            return match &segs[1..] {
                ["v2"] => openapi::v2(accept),
                ["v3"] => openapi::v3_index(s),
                ["v3", gv @ ..] => openapi::v3_group_version(s, gv).unwrap_or_else(|| not_found(path)),
                _ => not_found(path),
            };
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return not_found(path),
    };
    let (namespace, resource, name, sub) = match rest {
        [r] => (None, *r, None, None),
        [r, n] => (None, *r, Some(*n), None),
        // A namespace's own subresources.
        ["namespaces", n, sub @ ("status" | "finalize")] if group.is_empty() => {
            (None, "namespaces", Some(*n), Some(*sub))
        }
        ["namespaces", ns, r] => (Some(*ns), *r, None, None),
        [r, n, sub] => (None, *r, Some(*n), Some(*sub)),
        ["namespaces", ns, r, n] => (Some(*ns), *r, Some(*n), None),
        ["namespaces", ns, r, n, sub] => (Some(*ns), *r, Some(*n), Some(*sub)),
        _ => return not_found(path),
    };
    let Some(rt) =
        s.cluster.find_resource(|rt| rt.gr.group == group && rt.version == version && rt.gr.resource == resource)
    else {
        return not_found(path);
    };
    if namespace.is_some() && !rt.namespaced {
        return not_found(path);
    }
    let status = match sub {
        None => false,
        Some("status") if s.cluster.status_subresource(&rt.gr) => true,
        Some("exec") if rt.gr.group.is_empty() && rt.gr.resource == "pods" => {
            if method == Method::GET || method == Method::POST {
                return exec(s, req, namespace.unwrap_or_default(), name.unwrap_or_default(), query, upgrade).await;
            }
            return failure(405, format!("{method} {path}: exec is GET or POST"));
        }
        Some(_) => return not_found(path),
    };
    let watching = matches!(query.get("watch"), Some("true" | "1"));
    let table = match table_request(s, req, &rt, query) {
        Ok(t) => t,
        Err(e) => return failure(400, e),
    };
    match (method.as_str(), name) {
        ("GET", None) if watching => {
            if let Some(code) = s.faults.take(Verb::Watch, Some(&fault_name(&rt)), false) {
                return failure(code, format!("watch {}: injected error", fault_name(&rt)));
            }
            watch::watch(s.clone(), watch::Render { rt, table }, namespace, query)
        }
        ("GET", None) => list(s, &rt, namespace, query, table).await,
        ("GET", Some(name)) => get(s, &rt, namespace, name, table).await,
        ("POST", None) => write(s, req, &rt, namespace, None, false, query).await,
        ("PUT" | "PATCH" | "DELETE", Some(name)) => write(s, req, &rt, namespace, Some(name), status, query).await,
        _ => failure(405, format!("{method} {path}: not supported")),
    }
}

/// The table a request asks for (`Accept: …;as=Table`): its columns, whether they are a pod's,
/// and what rows carry; `None` for plain JSON.
fn table_request(s: &Shared, req: &Req<'_>, rt: &ResourceType, q: &Query) -> Result<TableSpec, String> {
    let accept = req.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !table::wants_table(accept) {
        return Ok(None);
    }
    let include = table::Include::parse(q.get("includeObject"))?;
    let pods = rt.gr.group.is_empty() && rt.gr.resource == "pods";
    let crd = s.cluster.crd_served().into_iter().find(|c| c.rt.gr == rt.gr && c.rt.version == rt.version);
    Ok(Some((table::columns(pods, crd.as_ref().map(|c| c.columns.as_slice())), pods, include)))
}

fn object_key(rt: &ResourceType, namespace: Option<&str>, name: &str) -> ItemKey {
    ItemKey::new(&rt.gr.group, &rt.gr.resource, namespace.filter(|_| rt.namespaced), name)
}

fn api_failure(e: ApiError) -> Response {
    json_response(e.code, &status_body(e.code, e.reason, &e.message))
}

/// The field manager of a write: the `fieldManager` parameter, else the client's user agent up
/// to its first `/`, as the real server defaults it.
fn manager_of(req: &Req<'_>, q: &Query) -> String {
    if let Some(m) = q.get("fieldManager") {
        return m.to_string();
    }
    let ua = req.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let m = ua.split('/').next().unwrap_or("").trim();
    if m.is_empty() {
        "unknown".to_string()
    } else {
        m.to_string()
    }
}

/// A create (`name` is `None`), replace, patch (merge, strategic merge as merge, server-side
/// apply) or delete, of the object or (`status`) its status.
async fn write(
    s: &Shared,
    req: &Req<'_>,
    rt: &ResourceType,
    namespace: Option<&str>,
    name: Option<&str>,
    status: bool,
    q: &Query,
) -> Response {
    let verb = req.method.as_str().to_lowercase();
    let what = format!("{verb} {}{}", fault_name(rt), name.map(|n| format!(" {n}")).unwrap_or_default());
    // A fault may name the status subresource alone (`plural.group/status`), or the resource.
    let status_fault = status.then(|| s.faults.take(Verb::Write, Some(&format!("{}/status", fault_name(rt))), false));
    if let Some(code) = status_fault.flatten().or_else(|| s.faults.take(Verb::Write, Some(&fault_name(rt)), false)) {
        return failure(code, format!("{what}: injected error"));
    }
    let body = || -> Result<Value, String> {
        serde_json::from_slice::<Value>(req.body)
            .map_err(|e| format!("{what}: the body of the request is not valid JSON: {e}"))
    };
    let manager = manager_of(req, q);
    let directive = match q.get("fieldValidation") {
        None | Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        Some(other) => {
            return failure(
                400,
                format!("{what}: fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""),
            )
        }
    };
    let key = name.map(|n| object_key(rt, namespace, n));
    let mut op = match (req.method.as_str(), key) {
        ("POST", None) => match body() {
            Ok(b) => ApiWrite::Create {
                rt: rt.clone(),
                namespace: namespace.map(str::to_string),
                body: b,
                manager: Some(manager),
            },
            Err(m) => return failure(400, m),
        },
        ("PUT", Some(key)) => match body() {
            Ok(b) => {
                if b.pointer("/metadata/name").and_then(Value::as_str).is_some_and(|n| n != key.name()) {
                    return failure(
                        400,
                        format!("{what}: the name of the object does not match the name on the URL ({})", key.name()),
                    );
                }
                ApiWrite::Replace { rt: rt.clone(), key, body: b, status, manager: Some(manager) }
            }
            Err(m) => return failure(400, m),
        },
        ("PATCH", Some(key)) => {
            let ct = req.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let ct = ct.split(';').next().unwrap_or("").trim();
            match ct {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => match body() {
                    Ok(p) => ApiWrite::Merge { rt: rt.clone(), key, patch: p, status, manager: Some(manager) },
                    Err(m) => return failure(400, m),
                },
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    let Some(m) = q.get("fieldManager") else {
                        return failure(
                            422,
                            format!("{what}: PatchOptions is invalid: fieldManager: Required value: is required for apply patch"),
                        );
                    };
                    let force = match q.get("force") {
                        None | Some("false") => false,
                        Some("true") => true,
                        Some(f) => return failure(400, format!("{what}: invalid force {f:?}: true or false")),
                    };
                    let b = match serde_json::from_slice::<Value>(req.body) {
                        Ok(b) => b,
                        Err(e) => {
                            return failure(
                                400,
                                format!(
                                    "{what}: this fake API server reads apply bodies as JSON (which kubectl and kube-rs send), and the body is not valid JSON: {e}"
                                ),
                            )
                        }
                    };
                    ApiWrite::Apply { rt: rt.clone(), key, body: b, status, manager: m.to_string(), force }
                }
                _ => {
                    return failure(
                        415,
                        format!(
                            "the body of the request was in an unknown format ({ct}) - accepted media types include: \
                             application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml"
                        ),
                    )
                }
            }
        }
        ("DELETE", Some(key)) => {
            if status {
                return failure(405, format!("{what}: the status subresource cannot be deleted"));
            }
            ApiWrite::Delete { key }
        }
        _ => return failure(405, format!("{what}: not supported")),
    };
    let unknown = match prune_unknown(s, rt, &mut op) {
        unknown if unknown.is_empty() => Vec::new(),
        unknown => {
            let list: Vec<String> = unknown.iter().map(|p| format!("unknown field {p:?}")).collect();
            match directive {
                FieldValidation::Strict => {
                    let (kind, v) = (&rt.kind, &rt.version);
                    let message = format!(
                        "{kind} in version {v:?} cannot be handled as a {kind}: strict decoding error: {}",
                        list.join(", ")
                    );
                    return failure(400, message);
                }
                FieldValidation::Warn => list,
                FieldValidation::Ignore => Vec::new(),
            }
        }
    };
    let (deleting, key) = match &op {
        ApiWrite::Delete { key } => (true, Some(key.clone())),
        _ => (false, None),
    };
    match s.cluster.api_write(op).await {
        Ok(Some(obj)) => {
            let mut r = json_response(if req.method == Method::POST { 201 } else { 200 }, &with_type(rt, obj));
            for w in unknown {
                // RFC 7234 warn-text: a quoted string; kubectl prints "Warning: <text>".
                let text = format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
                if let Ok(v) = header::HeaderValue::from_str(&text) {
                    r.headers_mut().append(header::WARNING, v);
                }
            }
            r
        }
        Ok(None) if deleting => {
            let name = key.map(|k| k.name().to_string()).unwrap_or_default();
            json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "group": rt.gr.group, "kind": rt.gr.resource}}),
            )
        }
        Ok(None) => failure(500, format!("{what}: the fake cluster answered no object")),
        Err(e) => api_failure(e),
    }
}

/// What a write does with fields its kind's schema does not declare (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldValidation {
    /// Refuse the write (400) naming them.
    Strict,
    /// Drop them and name them in `Warning` headers (the default, as on a real server).
    Warn,
    /// Drop them silently.
    Ignore,
}

/// Removes the fields the schema of a CRD-served kind does not declare from a write's body (the
/// object, or a merge patch as a partial object) and returns their paths. Kinds without a
/// schema — every built-in kind here — keep everything.
fn prune_unknown(s: &Shared, rt: &ResourceType, op: &mut ApiWrite) -> Vec<String> {
    let body = match op {
        ApiWrite::Create { body, .. } | ApiWrite::Replace { body, .. } | ApiWrite::Apply { body, .. } => body,
        ApiWrite::Merge { patch, .. } => patch,
        ApiWrite::Delete { .. } => return Vec::new(),
    };
    let crds = s.cluster.crd_served();
    match crds.iter().find(|c| c.rt.gr == rt.gr && c.rt.version == rt.version).and_then(|c| c.schema.as_ref()) {
        Some(schema) => crate::crd::prune_unknown(schema, body),
        None => Vec::new(),
    }
}

fn with_type(rt: &ResourceType, mut obj: Value) -> Value {
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(rt.api_version()));
        m.insert("kind".into(), json!(rt.kind));
    }
    obj
}

fn version_info() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-blockwise-fake", "gitCommit": "",
           "gitTreeState": "clean", "buildDate": "2024-05-01T12:00:00Z", "goVersion": "go1.24",
           "compiler": "gc", "platform": "linux/amd64"})
}

/// group → versions (sorted, in the order they are advertised).
fn groups(resources: &[ResourceType]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rt in resources {
        out.entry(rt.gr.group.clone()).or_default().insert(rt.version.clone());
    }
    out
}

fn discovery(s: &Shared, segs: &[&str]) -> Option<Response> {
    let resources = s.cluster.resources();
    let groups = groups(&resources);
    let body = match segs {
        ["api"] => json!({
            "kind": "APIVersions",
            "versions": groups.get("").map(|v| v.iter().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": s.addr.to_string()}],
        }),
        ["apis"] => {
            let list: Vec<Value> = groups
                .iter()
                .filter(|(g, _)| !g.is_empty())
                .map(|(g, versions)| {
                    let vs: Vec<Value> =
                        versions.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
                    let preferred = vs.first().cloned().unwrap_or(Value::Null);
                    json!({"name": g, "versions": vs, "preferredVersion": preferred})
                })
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list})
        }
        ["api", v] => resource_list(s, &resources, "", v)?,
        ["apis", g, v] => resource_list(s, &resources, g, v)?,
        _ => return None,
    };
    Some(json_response(200, &body))
}

fn resource_list(s: &Shared, resources: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let rts: Vec<&ResourceType> = resources.iter().filter(|rt| rt.gr.group == group && rt.version == version).collect();
    if rts.is_empty() {
        return None;
    }
    let crds = s.cluster.crd_served();
    let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
    let mut out = Vec::new();
    for rt in rts {
        let crd = crds.iter().find(|c| c.rt.gr == rt.gr && c.rt.version == rt.version);
        let (short, singular, categories): (Vec<String>, String, Vec<String>) = match crd {
            Some(c) => (c.short_names.clone(), c.singular.clone(), c.categories.clone()),
            None => (
                short_names(&rt.gr.resource).iter().map(|s| s.to_string()).collect(),
                rt.kind.to_lowercase(),
                Vec::new(),
            ),
        };
        out.push(json!({
            "name": rt.gr.resource,
            "shortNames": short,
            "singularName": singular,
            "categories": categories,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": verbs,
        }));
        if s.cluster.status_subresource(&rt.gr) {
            out.push(
                json!({"name": format!("{}/status", rt.gr.resource), "singularName": "", "namespaced": rt.namespaced,
                            "kind": rt.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
        if group.is_empty() && rt.gr.resource == "pods" {
            out.push(json!({"name": "pods/exec", "singularName": "", "namespaced": true,
                            "kind": "PodExecOptions", "verbs": ["create", "get"]}));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}))
}

/// kubectl's usual abbreviations (`pvc`, `deploy`, …) for the built-in resources it may be asked for.
fn short_names(resource: &str) -> &'static [&'static str] {
    match resource {
        "pods" => &["po"],
        "persistentvolumeclaims" => &["pvc"],
        "persistentvolumes" => &["pv"],
        "configmaps" => &["cm"],
        "services" => &["svc"],
        "serviceaccounts" => &["sa"],
        "namespaces" => &["ns"],
        "deployments" => &["deploy"],
        "replicasets" => &["rs"],
        "statefulsets" => &["sts"],
        "priorityclasses" => &["pc"],
        "storageclasses" => &["sc"],
        "events" => &["ev"],
        "customresourcedefinitions" => &["crd", "crds"],
        "volumesnapshots" => &["vs"],
        "volumesnapshotcontents" => &["vsc", "vscs"],
        "volumesnapshotclasses" => &["vsclass", "vsclasses"],
        "volumegroupsnapshots" => &["vgs"],
        "volumegroupsnapshotcontents" => &["vgsc", "vgscs"],
        "volumegroupsnapshotclasses" => &["vgsclass", "vgsclasses"],
        _ => &[],
    }
}

/// A field selector: `path=value`, `path==value` and `path!=value` terms on dotted paths
/// (`metadata.name`, `involvedObject.uid`), all of which must hold; a missing field is `""`.
#[derive(Debug, Default)]
struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    fn parse(fs: Option<&str>) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in fs.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v.strip_prefix('=').unwrap_or(v))
            } else {
                return Err(format!("invalid fieldSelector term {term:?}: expected field=value or field!=value"));
            };
            if path.trim().is_empty() {
                return Err(format!("invalid fieldSelector term {term:?}: no field"));
            }
            terms.push((path.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, value)| {
            let got = match crate::crd::eval_path(obj, &format!(".{path}")) {
                Some(Value::String(s)) => s,
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            (got == *value) == *eq
        })
    }
}

fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

fn cluster_error(what: &str, e: ClusterError) -> Response {
    match e {
        ClusterError::Expired(m) => failure(410, format!("{what}: {m}")),
        ClusterError::Forbidden(m) => failure(403, format!("{what}: {m}")),
        ClusterError::Unavailable(m) => failure(503, format!("{what}: {m}")),
        ClusterError::NotFound(m) => failure(404, m),
        ClusterError::AlreadyExists(m) => failure(409, m),
        ClusterError::Other(m) if m.starts_with("invalid continue token") => failure(400, format!("{what}: {m}")),
        ClusterError::Other(m) => failure(500, format!("{what}: {m}")),
    }
}

type TableSpec = Option<(Vec<crate::crd::Column>, bool, table::Include)>;

async fn list(s: &Shared, rt: &ResourceType, namespace: Option<&str>, q: &Query, table: TableSpec) -> Response {
    let token = q.get("continue");
    let what = match namespace {
        Some(ns) => format!("list {} in namespace {ns}", fault_name(rt)),
        None => format!("list {}", fault_name(rt)),
    };
    if let Some(code) = s.faults.take(Verb::List, Some(&fault_name(rt)), token.is_some()) {
        let msg = match code {
            410 => "The provided continue parameter is too old to display a consistent list result. \
                    You can start a new list without the continue parameter."
                .to_string(),
            403 => format!("{what}: {} is forbidden: injected", fault_name(rt)),
            _ => format!("{what}: injected error"),
        };
        return failure(code, msg);
    }
    let selector = match q.get("labelSelector").map(LabelSelector::parse).transpose() {
        Ok(s) => s,
        Err(e) => return failure(400, format!("{what}: unable to parse labelSelector: {e}")),
    };
    let fields = match FieldSelector::parse(q.get("fieldSelector")) {
        Ok(f) => f,
        Err(e) => return failure(400, format!("{what}: {e}")),
    };
    let limit = match q.get("limit").map(str::parse::<u32>).transpose() {
        Ok(l) => l.unwrap_or(0),
        Err(e) => return failure(400, format!("{what}: invalid limit: {e}")),
    };
    if let Some(rv) = q.get("resourceVersion") {
        if rv.parse::<u64>().is_err() {
            return failure(400, format!("{what}: invalid resourceVersion {rv:?}: not a number"));
        }
    }
    // Read before the list: a watch from it sees every change the list may have missed.
    let rv = s.cluster.resource_version_at(s.cluster.now());
    let page = match s.cluster.list(rt, namespace, limit, token).await {
        Ok(p) => p,
        Err(e) => return cluster_error(&what, e),
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(t) = &page.continue_token {
        metadata["continue"] = Value::String(t.clone());
    }
    if table.is_none() && selector.is_none() && fields.0.is_empty() {
        // Nothing to select or render: the objects as the cluster serialized them.
        let head = json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": metadata});
        let head = head.to_string();
        let mut body = String::with_capacity(head.len() + page.objects.iter().map(|o| o.len() + 1).sum::<usize>() + 12);
        body.push_str(&head[..head.len() - 1]);
        body.push_str(",\"items\":[");
        for (i, raw) in page.objects.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(raw);
        }
        body.push_str("]}");
        return raw_json_response(200, body);
    }
    let mut items = Vec::with_capacity(page.objects.len());
    for raw in &page.objects {
        let Ok(obj) = serde_json::from_str::<Value>(raw) else {
            return failure(500, format!("{what}: the fake cluster holds an object that is not JSON"));
        };
        if fields.matches(&obj) && selector.as_ref().is_none_or(|sel| sel.matches(&labels_of(&obj))) {
            items.push(obj);
        }
    }
    if let Some((cols, pods, include)) = table {
        let typed: Vec<Value> = items.into_iter().map(|o| with_type(rt, o)).collect();
        return json_response(200, &table::table(&typed, &cols, pods, include, metadata, s.cluster.now()));
    }
    json_response(
        200,
        &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": metadata, "items": items}),
    )
}

async fn get(s: &Shared, rt: &ResourceType, namespace: Option<&str>, name: &str, table: TableSpec) -> Response {
    let key = object_key(rt, namespace, name);
    let what = format!("get {} {key}", fault_name(rt));
    if let Some(code) = s.faults.take(Verb::Get, Some(&fault_name(rt)), false) {
        return failure(code, format!("{what}: injected error"));
    }
    match s.cluster.get(rt, &key).await {
        Ok(Some(raw)) => match serde_json::from_str::<Value>(&raw) {
            Ok(v) => match table {
                Some((cols, pods, include)) => {
                    let rv = v.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
                    let meta = json!({"resourceVersion": rv});
                    json_response(200, &table::table(&[v], &cols, pods, include, meta, s.cluster.now()))
                }
                None => json_response(200, &v),
            },
            Err(_) => failure(500, format!("{what}: the fake cluster holds an object that is not JSON")),
        },
        Ok(None) => failure(404, format!("{} \"{name}\" not found", fault_name(rt))),
        Err(e) => cluster_error(&what, e),
    }
}

async fn exec(s: &Shared, req: &Req<'_>, namespace: &str, name: &str, q: &Query, upgrade: Upgrade) -> Response {
    let pod = ItemKey::namespaced("", "pods", namespace, name);
    if let Some(code) = s.faults.take(Verb::Exec, Some("pods"), false) {
        return failure(code, format!("exec in pod {namespace}/{name}: injected error"));
    }
    let Some(obj) = s.cluster.object(&pod) else {
        return failure(404, format!("pods \"{name}\" not found"));
    };
    let command = q.all("command");
    if command.is_empty() {
        return failure(400, format!("exec in pod {namespace}/{name}: you must specify at least one command"));
    }
    let first_container = obj.pointer("/spec/containers/0/name").and_then(Value::as_str).map(str::to_string);
    let Some(container) = q.get("container").map(str::to_string).or(first_container) else {
        return failure(400, format!("exec in pod {namespace}/{name}: the pod has no containers"));
    };
    if let Some(on_upgrade) = upgrade.spdy {
        let call = spdy::ExecCall {
            cluster: s.cluster.clone(),
            pod,
            container,
            command,
            cancelled: s.execs_cancelled.clone(),
            wanted: spdy::Wanted {
                stdin: flag(q, "stdin"),
                stdout: flag(q, "stdout"),
                stderr: flag(q, "stderr"),
                tty: flag(q, "tty"),
            },
        };
        return spdy_exec(req, &format!("exec in pod {namespace}/{name}"), on_upgrade, call);
    }
    let ws = match upgrade.ws {
        Ok(ws) => ws,
        Err(e) => {
            return failure(
                400,
                format!("exec in pod {namespace}/{name}: a WebSocket upgrade ({}) is required: {e}", EXEC_PROTOCOLS[0]),
            )
        }
    };
    let cluster = s.cluster.clone();
    let cancelled = s.execs_cancelled.clone();
    ws.protocols(EXEC_PROTOCOLS).on_upgrade(move |socket| run_exec(socket, cluster, pod, container, command, cancelled))
}

/// A boolean query parameter as the API server reads it (`true`/`1`).
fn flag(q: &Query, key: &str) -> bool {
    matches!(q.get(key), Some("true" | "1"))
}

/// Answers an exec's SPDY/3.1 upgrade (101 naming the stream protocol) and serves the exec on the
/// upgraded connection once hyper hands it over.
fn spdy_exec(req: &Req<'_>, what: &str, on_upgrade: hyper::upgrade::OnUpgrade, call: spdy::ExecCall) -> Response {
    let offered: Vec<String> = req
        .headers
        .get_all(STREAM_PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .collect();
    if !offered.iter().any(|p| p == spdy::PROTOCOL) {
        return failure(
            403,
            format!("{what}: unable to upgrade: the client offers stream protocols {offered:?}; this server speaks only {} over SPDY", spdy::PROTOCOL),
        );
    }
    let w = &call.wanted;
    if !(w.stdin || w.stdout || w.stderr) {
        return failure(400, format!("{what}: you must specify at least 1 of stdin, stdout, stderr"));
    }
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => spdy::serve_exec(hyper_util::rt::TokioIo::new(upgraded), call).await,
            Err(e) => tracing::warn!(error = %e, "SPDY exec: the connection was not upgraded"),
        }
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = r.headers_mut();
    h.insert(header::CONNECTION, header::HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, header::HeaderValue::from_static(SPDY_UPGRADE));
    h.insert(STREAM_PROTOCOL_HEADER, header::HeaderValue::from_static(spdy::PROTOCOL));
    r
}

async fn run_exec(
    mut socket: WebSocket,
    cluster: Arc<FakeCluster>,
    pod: ItemKey,
    container: String,
    command: Vec<String>,
    cancelled: Arc<AtomicU64>,
) {
    // A container runtime takes milliseconds to start an exec'd process, and kubectl (client-go's
    // WebSocket executor, 1.30 and later) relies on it: its reader starts before it registers its
    // streams, and a frame that arrives first is dropped ("Unknown stream id 1"). The fake's
    // output would otherwise come at once; seen once under load in CI as an empty `echo hi`.
    let started = tokio::time::Instant::now() + std::time::Duration::from_millis(EXEC_START_MS);
    let run = async {
        let r = cluster.exec(&pod, &container, &command).await;
        tokio::time::sleep_until(started).await;
        r
    };
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            r = &mut run => break Some(r),
            m = socket.recv() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                Some(Ok(_)) => continue,
            },
        }
    };
    let Some(result) = result else {
        cancelled.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let status = match result {
        Ok(ExecResult { exit_code, stdout, stderr }) => {
            for (channel, text) in [(1u8, stdout), (2u8, stderr)] {
                if !text.is_empty() {
                    let mut frame = vec![channel];
                    frame.extend_from_slice(text.as_bytes());
                    if socket.send(Message::Binary(frame.into())).await.is_err() {
                        return;
                    }
                }
            }
            exit_status(exit_code, &command)
        }
        Err(e) => json!({"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                         "message": format!("error executing command in container {container}: {e}")}),
    };
    let mut frame = vec![3u8];
    frame.extend_from_slice(status.to_string().as_bytes());
    let _ = socket.send(Message::Binary(frame.into())).await;
    // A normal closure (1000): kubectl reads a close without a status code (1005) as an error.
    let close = axum::extract::ws::CloseFrame { code: axum::extract::ws::close_code::NORMAL, reason: "".into() };
    if socket.send(Message::Close(Some(close))).await.is_err() {
        return;
    }
    // The closing handshake: read until the client's Close. Dropping the socket with the
    // client's frames (stdin, v5's close signal) unread resets the connection, and kubectl reports
    // the reset as an error.
    let drain = async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_millis(spdy::DRAIN_MS_MAX), drain).await;
}

/// The `Status` the API server sends on channel 3 when a command exits.
pub fn exit_status(exit_code: i32, command: &[String]) -> Value {
    if exit_code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({"metadata": {}, "status": "Failure",
           "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {exit_code}"),
           "reason": "NonZeroExitCode",
           "details": {"causes": [{"reason": "ExitCode", "message": exit_code.to_string()}]}})
}
