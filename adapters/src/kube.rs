//! The engine's [`Cluster`] port over kube-rs: real clusters, and the simulator's fake API server.
//!
//! [`KubeCluster`] loads its configuration the way kubectl does (`--kubeconfig`, `KUBECONFIG`,
//! `~/.kube/config`, optionally a `--context`, else the in-cluster service account), discovers every
//! group/version/resource that supports `list` (each resource at its group's preferred version when
//! served there — no hard-coded resource list), lists in pages (`limit`/`continue`), gets single
//! objects and runs hook commands through pod exec over WebSocket (kube's `ws` feature).
//!
//! Key decisions: lists and gets go through raw requests and hand the engine each object's JSON as
//! served — no round trip through typed structs that could drop or reformat fields, which would
//! break byte-identical archives. Errors are classified once, in [`classify`]: 410 Gone is
//! [`ClusterError::Expired`] (the engine restarts that resource's listing), 403 is
//! [`ClusterError::Forbidden`], a 404 on get is `Ok(None)`, and 429/5xx/connection failures are
//! [`ClusterError::Unavailable`] — transient, retried by [`crate::retry::RetryingCluster`], the one
//! retry loop the simulator runs too; every message names the call and the resource. An exec is
//! `Unavailable` only when the server refused the upgrade (the command never started); once the
//! stream is open, dropping the future (the driver's hook timeout) aborts the stream, and the exit
//! status is read from the `Status` frame on channel 3. Hook output is captured up to
//! [`EXEC_OUTPUT_BYTES_MAX`] per stream; the rest is drained and dropped so the stream never stalls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError, ExecResult, ListPage};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIResourceList, Status as ExecStatus};
use kube::api::{
    AttachParams, AttachedProcess, DeleteParams, GetParams, ListParams, Patch, PatchParams, PostParams, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::retry::{retry_transient, RetryPolicy};
use crate::world::TokioRuntime;

/// Bytes of a hook's stdout and of its stderr kept; the rest is read and dropped.
pub const EXEC_OUTPUT_BYTES_MAX: usize = 16 * 1024;
/// The longest a TCP (and TLS) connect to the API server may take (or the request timeout, when
/// shorter).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a cluster could not be configured; names the kubeconfig file and context.
#[derive(Debug, thiserror::Error)]
pub enum KubeConfigError {
    /// The kubeconfig file could not be read or parsed.
    #[error("kubeconfig {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The kubeconfig was read but the context (or its cluster/user) is unusable.
    #[error("kubeconfig {source_name}, context {context}: {message}")]
    Context {
        /// The file, or where the configuration came from.
        source_name: String,
        /// The context asked for (`current-context` when none).
        context: String,
        /// What went wrong.
        message: String,
    },
    /// Neither a kubeconfig nor an in-cluster service account could be used.
    #[error("no usable cluster configuration: {0}")]
    Missing(String),
    /// The HTTP client could not be built from the configuration.
    #[error("building a client for {server}: {message}")]
    Client {
        /// The API server URL.
        server: String,
        /// What went wrong.
        message: String,
    },
}

/// A Kubernetes cluster reached through kube-rs; see the module docs.
#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
    server: String,
    context: String,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster").field("server", &self.server).field("context", &self.context).finish()
    }
}

fn context_label(context: Option<&str>) -> String {
    context.map_or_else(|| "(current-context)".to_string(), str::to_string)
}

impl KubeCluster {
    /// Loads the configuration: `kubeconfig` when given, else `KUBECONFIG` or `~/.kube/config`,
    /// else the in-cluster service account; `context` picks a context other than the current one.
    /// Must be called inside a tokio runtime. Credentials are never recorded by blockwise.
    pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<KubeCluster, KubeConfigError> {
        let options = KubeConfigOptions { context: context.map(str::to_string), ..KubeConfigOptions::default() };
        let mut ctx = context_label(context);
        let config = match kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| KubeConfigError::File { path: path.to_path_buf(), message: error_chain(&e) })?;
                if let (None, Some(current)) = (context, &kc.current_context) {
                    ctx = current.clone();
                }
                Config::from_custom_kubeconfig(kc, &options).await.map_err(|e| KubeConfigError::Context {
                    source_name: path.display().to_string(),
                    context: ctx.clone(),
                    message: error_chain(&e),
                })?
            }
            None => match Config::from_kubeconfig(&options).await {
                Ok(c) => {
                    if let (None, Ok(Kubeconfig { current_context: Some(current), .. })) = (context, Kubeconfig::read())
                    {
                        ctx = current;
                    }
                    c
                }
                Err(kube_err) if context.is_none() => {
                    ctx = "in-cluster".into();
                    Config::incluster().map_err(|e| {
                        KubeConfigError::Missing(format!(
                            "no kubeconfig ({}) and not in a cluster ({})",
                            error_chain(&kube_err),
                            error_chain(&e)
                        ))
                    })?
                }
                Err(e) => {
                    return Err(KubeConfigError::Context {
                        source_name: "from KUBECONFIG or ~/.kube/config".into(),
                        context: ctx,
                        message: error_chain(&e),
                    })
                }
            },
        };
        // kube's own retry layer (15 retries, delays up to 1000 s) would hide our bounded policy.
        let mut config = config;
        config.default_retry = false;
        // Deadlines (issue 22): a connect, and every request's answer (its status and headers: a
        // watch's or an exec's stream then goes on for as long as it needs), within the request
        // timeout; an API server that accepts and never answers fails the call as unavailable.
        let request_timeout = Duration::from_millis(crate::retry::request_timeout_ms());
        config.connect_timeout = Some(request_timeout.min(CONNECT_TIMEOUT));
        let server = config.cluster_url.to_string().trim_end_matches('/').to_string();
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(|e| KubeConfigError::Client { server: server.clone(), message: error_chain(&e) })?
            .with_layer(&tower::timeout::TimeoutLayer::new(request_timeout))
            .build();
        Ok(KubeCluster { client, server, context: ctx })
    }

    /// The kube-rs client (the controller's watches and status patches).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The context used (`(current-context)` when none was named).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Asks the server for `/version` (with retries): a clear error early when it cannot be reached.
    pub async fn check_reachable(&self) -> Result<String, ClusterError> {
        let what = format!("reaching the API server {} (context {})", self.server, self.context);
        let policy = RetryPolicy::default();
        let info = retry_transient(&policy, &TokioRuntime, &what, || async {
            self.client.apiserver_version().await.map_err(|e| classify(&what, &e).into_error())
        })
        .await?;
        Ok(info.git_version)
    }

    /// One call; its failure classified, a 404 an error like any other.
    async fn once<T, Fut>(&self, what: &str, call: Fut) -> Result<T, ClusterError>
    where
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        call.await.map_err(|e| classify(what, &e).into_error())
    }

    /// A write (create, patch, delete): the response body, a 404 as [`ClusterError::NotFound`].
    async fn raw_write(
        &self,
        what: &str,
        req: Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> Result<String, ClusterError> {
        let req = req.map_err(|e| ClusterError::Other(format!("{what}: {e}")))?;
        self.client.request_text(req).await.map_err(|e| match classify(what, &e) {
            Failure::NotFound(msg) => ClusterError::NotFound(msg),
            f => f.into_error(),
        })
    }

    /// A GET whose 404 means "no such object": `Ok(None)`.
    async fn raw_get(
        &self,
        what: &str,
        build: impl Fn() -> Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> Result<Option<String>, ClusterError> {
        let req = build().map_err(|e| ClusterError::Other(format!("{what}: {e}")))?;
        match self.client.request_text(req).await {
            Ok(text) => Ok(Some(text)),
            Err(e) => match classify(what, &e) {
                Failure::NotFound(_) => Ok(None),
                f => Err(f.into_error()),
            },
        }
    }
}

/// How one failed call is handled.
#[derive(Debug)]
enum Failure {
    /// 429, 5xx, connection trouble: worth another try after a backoff.
    Retryable(String),
    /// 404.
    NotFound(String),
    /// Anything else, already classified.
    Final(ClusterError),
}

impl Failure {
    /// The error a caller sees: retryable failures are `Unavailable`, a 404 is `Other`.
    fn into_error(self) -> ClusterError {
        match self {
            Failure::Retryable(msg) => ClusterError::Unavailable(msg),
            Failure::NotFound(msg) => ClusterError::Other(msg),
            Failure::Final(e) => e,
        }
    }
}

/// The full error chain of `e`, `: `-separated, so messages keep their causes.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

/// A kube-rs error as a user reads it: a request the client's deadline cut is "no answer from
/// the API server within …", anything else its chain of causes.
pub fn error_text(e: &kube::Error) -> String {
    match e {
        kube::Error::Service(inner) if inner.is::<tower::timeout::error::Elapsed>() => format!(
            "no answer from the API server within {}",
            crate::retry::go_duration(crate::retry::request_timeout_ms())
        ),
        e => error_chain(e),
    }
}

fn classify(what: &str, e: &kube::Error) -> Failure {
    match e {
        kube::Error::Api(status) => {
            let msg = format!("{what}: {} {} ({})", status.code, status.reason, status.message);
            match status.code {
                404 => Failure::NotFound(msg),
                409 if status.reason == "AlreadyExists" => Failure::Final(ClusterError::AlreadyExists(msg)),
                410 => Failure::Final(ClusterError::Expired(msg)),
                403 => Failure::Final(ClusterError::Forbidden(msg)),
                429 | 500..=599 => Failure::Retryable(msg),
                _ => Failure::Final(ClusterError::Other(msg)),
            }
        }
        kube::Error::UpgradeConnection(kube::client::UpgradeConnectionError::ProtocolSwitch(code)) => {
            let msg = format!("{what}: the server refused the WebSocket upgrade with {code}");
            match code.as_u16() {
                404 => Failure::NotFound(msg),
                403 => Failure::Final(ClusterError::Forbidden(msg)),
                429 | 500..=599 => Failure::Retryable(msg),
                _ => Failure::Final(ClusterError::Other(msg)),
            }
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_) => {
            Failure::Retryable(format!("{what}: {}", error_text(e)))
        }
        _ => Failure::Final(ClusterError::Other(format!("{what}: {}", error_chain(e)))),
    }
}

/// `/api/v1` or `/apis/{group}/{version}`, plus `/namespaces/{ns}` and the plural.
fn collection_url(rt: &ResourceType, namespace: Option<&str>) -> String {
    let mut url = if rt.gr.group.is_empty() {
        format!("/api/{}", rt.version)
    } else {
        format!("/apis/{}/{}", rt.gr.group, rt.version)
    };
    if let Some(ns) = namespace.filter(|_| rt.namespaced) {
        url.push_str("/namespaces/");
        url.push_str(ns);
    }
    url.push('/');
    url.push_str(&rt.gr.resource);
    url
}

fn resource_label(rt: &ResourceType) -> String {
    if rt.gr.group.is_empty() {
        format!("{}/{}", rt.version, rt.gr.resource)
    } else {
        format!("{}/{} {}", rt.gr.group, rt.version, rt.gr.resource)
    }
}

/// The listable resources of one group: each at the preferred version when served there, otherwise
/// at the first version (in the server's priority order) that serves it.
fn group_resources(group: &str, versions: &[(String, APIResourceList)], preferred: &str) -> Vec<ResourceType> {
    let mut chosen: BTreeMap<String, ResourceType> = BTreeMap::new();
    let ordered =
        versions.iter().filter(|(v, _)| v == preferred).chain(versions.iter().filter(|(v, _)| v != preferred));
    for (version, list) in ordered {
        for r in &list.resources {
            let listable = r.verbs.iter().any(|v| v == "list");
            if r.name.contains('/') || !listable || chosen.contains_key(&r.name) {
                continue;
            }
            chosen.insert(r.name.clone(), ResourceType::new(group, version, &r.name, &r.kind, r.namespaced));
        }
    }
    chosen.into_values().collect()
}

/// Reads `r` to its end, keeping at most [`EXEC_OUTPUT_BYTES_MAX`] bytes.
async fn read_bounded(r: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut r) = r else { return String::new() };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = EXEC_OUTPUT_BYTES_MAX.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Aborts the exec stream when dropped: a hook timeout (the runtime drops the exec future) cancels
/// the remote command's stream instead of leaving it running in the background.
struct AbortOnDrop(AttachedProcess);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The exit code in a `Status` from channel 3, or the error it reports.
fn exit_code_of(what: &str, status: Option<ExecStatus>) -> Result<i32, ClusterError> {
    let Some(status) = status else {
        return Err(ClusterError::Other(format!("{what}: the stream ended without an exit status")));
    };
    if status.status.as_deref() == Some("Success") {
        return Ok(0);
    }
    let message = status.message.clone().unwrap_or_default();
    let reason = status.reason.clone().unwrap_or_default();
    if reason == "NonZeroExitCode" {
        let code = status
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
            .and_then(|c| c.message.as_deref())
            .and_then(|m| m.trim().parse::<i32>().ok());
        return code
            .ok_or_else(|| ClusterError::Other(format!("{what}: non-zero exit without an exit code ({message})")));
    }
    Err(ClusterError::Other(format!("{what}: {message} ({reason})")))
}

#[async_trait]
impl Cluster for KubeCluster {
    async fn discover(&self) -> Result<Vec<ResourceType>, ClusterError> {
        let mut out = Vec::new();
        let core = self.once("discovery /api", self.client.list_core_api_versions()).await?;
        let mut core_lists = Vec::new();
        for v in &core.versions {
            let what = format!("discovery /api/{v}");
            core_lists.push((v.clone(), self.once(&what, self.client.list_core_api_resources(v)).await?));
        }
        out.extend(group_resources("", &core_lists, core.versions.first().map_or("v1", String::as_str)));
        let groups = self.once("discovery /apis", self.client.list_api_groups()).await?;
        for g in &groups.groups {
            let mut lists = Vec::new();
            for gv in &g.versions {
                let what = format!("discovery /apis/{}", gv.group_version);
                lists.push((
                    gv.version.clone(),
                    self.once(&what, self.client.list_api_group_resources(&gv.group_version)).await?,
                ));
            }
            let preferred = g
                .preferred_version
                .as_ref()
                .map(|p| p.version.clone())
                .or_else(|| g.versions.first().map(|v| v.version.clone()))
                .unwrap_or_default();
            out.extend(group_resources(&g.name, &lists, &preferred));
        }
        Ok(out)
    }

    async fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ClusterError> {
        let what = match namespace.filter(|_| rt.namespaced) {
            Some(ns) => format!("list {} in namespace {ns}", resource_label(rt)),
            None => format!("list {}", resource_label(rt)),
        };
        let url = collection_url(rt, namespace);
        let build = || {
            let mut lp = ListParams::default();
            if limit > 0 {
                lp = lp.limit(limit);
            }
            if let Some(t) = continue_token {
                lp = lp.continue_token(t);
            }
            kube::core::Request::new(&url).list(&lp)
        };
        let text = self
            .raw_get(&what, build)
            .await?
            .ok_or_else(|| ClusterError::Other(format!("{what}: 404 NotFound (the resource is no longer served)")))?;
        let mut body: Value = serde_json::from_str(&text)
            .map_err(|e| ClusterError::Other(format!("{what}: the response is not JSON: {e}")))?;
        let token =
            body.pointer("/metadata/continue").and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_string);
        let items = match body.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(ClusterError::Other(format!("{what}: `items` is not an array"))),
        };
        let objects = items.iter().map(Value::to_string).collect();
        Ok(ListPage { objects, continue_token: token })
    }

    async fn get(&self, rt: &ResourceType, key: &ItemKey) -> Result<Option<String>, ClusterError> {
        let what = format!("get {} {key}", resource_label(rt));
        let url = collection_url(rt, key.namespace());
        let text =
            self.raw_get(&what, || kube::core::Request::new(&url).get(key.name(), &GetParams::default())).await?;
        match text {
            None => Ok(None),
            Some(t) => {
                // Re-encode so every object reaches the engine in the same compact form as a list item.
                let v: Value = serde_json::from_str(&t)
                    .map_err(|e| ClusterError::Other(format!("{what}: the response is not JSON: {e}")))?;
                Ok(Some(v.to_string()))
            }
        }
    }

    async fn exec(&self, pod: &ItemKey, container: &str, command: &[String]) -> Result<ExecResult, ClusterError> {
        let ns = pod.namespace().unwrap_or("default");
        let what = format!("exec {command:?} in pod {ns}/{} container {container}", pod.name());
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let params = AttachParams::default().container(container).stdin(false).stdout(true).stderr(true);
        let mut process = self.once(&what, api.exec(pod.name(), command.to_vec(), &params)).await?;
        let stdout = process.stdout();
        let stderr = process.stderr();
        let status = process.take_status();
        let guard = AbortOnDrop(process);
        let status_fut = async {
            match status {
                Some(s) => s.await,
                None => None,
            }
        };
        let (stdout, stderr, status) = tokio::join!(read_bounded(stdout), read_bounded(stderr), status_fut);
        drop(guard);
        let exit_code = exit_code_of(&what, status)?;
        Ok(ExecResult { exit_code, stdout, stderr })
    }

    async fn create(&self, rt: &ResourceType, namespace: Option<&str>, json: &str) -> Result<String, ClusterError> {
        let what = match namespace.filter(|_| rt.namespaced) {
            Some(ns) => format!("create {} in namespace {ns}", resource_label(rt)),
            None => format!("create {}", resource_label(rt)),
        };
        let url = collection_url(rt, namespace);
        let req = kube::core::Request::new(&url).create(&PostParams::default(), json.as_bytes().to_vec());
        compact(&what, self.raw_write(&what, req).await?)
    }

    async fn patch(&self, rt: &ResourceType, key: &ItemKey, merge_patch: &str) -> Result<String, ClusterError> {
        let what = format!("patch {} {key}", resource_label(rt));
        let url = collection_url(rt, key.namespace());
        let body: Value = serde_json::from_str(merge_patch)
            .map_err(|e| ClusterError::Other(format!("{what}: the patch is not JSON: {e}")))?;
        let req = kube::core::Request::new(&url).patch(key.name(), &PatchParams::default(), &Patch::Merge(&body));
        compact(&what, self.raw_write(&what, req).await?)
    }

    async fn delete(&self, rt: &ResourceType, key: &ItemKey) -> Result<bool, ClusterError> {
        let what = format!("delete {} {key}", resource_label(rt));
        let url = collection_url(rt, key.namespace());
        let req = kube::core::Request::new(&url).delete(key.name(), &DeleteParams::default());
        match self.raw_write(&what, req).await {
            Ok(_) => Ok(true),
            Err(ClusterError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn reachable(&self) -> Result<(), ClusterError> {
        let what = format!("reaching the API server {}", self.server);
        self.once(&what, self.client.apiserver_version()).await.map(|_| ())
    }

    async fn watch(
        &self,
        rt: &ResourceType,
        key: &ItemKey,
        resource_version: &str,
        timeout_ms: u64,
    ) -> Result<Option<String>, ClusterError> {
        let what = format!("watch {} {key}", resource_label(rt));
        let url = collection_url(rt, key.namespace());
        let secs = timeout_ms.div_ceil(1000).clamp(1, WATCH_SECONDS_MAX) as u32;
        let wp = WatchParams::default().fields(&format!("metadata.name={}", key.name())).timeout(secs);
        let req = kube::core::Request::new(&url)
            .watch(&wp, resource_version)
            .map_err(|e| ClusterError::Other(format!("{what}: {e}")))?;
        let events = self.client.request_events::<Value>(req).await.map_err(|e| classify(&what, &e).into_error())?;
        let mut events = std::pin::pin!(events);
        // The first event (or the end of the stream at the server's timeout) is all a caller needs:
        // it re-reads the object and decides. A 410 (the version is too old) also means "re-read".
        let wait = tokio::time::timeout(std::time::Duration::from_millis(timeout_ms.max(1)), events.try_next());
        if let Ok(Err(e)) = wait.await {
            match classify(&what, &e) {
                Failure::Final(ClusterError::Expired(_)) => {}
                f => return Err(f.into_error()),
            }
        }
        self.get(rt, key).await
    }
}

/// Longest `timeoutSeconds` asked of a watch (the API server caps watches at a few minutes).
pub const WATCH_SECONDS_MAX: u64 = 290;

/// A response body re-encoded compactly, as every object reaches the engine.
fn compact(what: &str, text: String) -> Result<String, ClusterError> {
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ClusterError::Other(format!("{what}: the response is not JSON: {e}")))?;
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(version: &str, resources: &[(&str, &str, bool, &[&str])]) -> (String, APIResourceList) {
        let doc = serde_json::json!({
            "groupVersion": version,
            "resources": resources.iter().map(|(n, k, ns, verbs)| serde_json::json!({
                "name": n, "singularName": "", "kind": k, "namespaced": ns, "verbs": verbs,
            })).collect::<Vec<_>>(),
        });
        (version.to_string(), serde_json::from_value(doc).unwrap())
    }

    #[test]
    fn discovery_prefers_the_preferred_version_and_skips_unlistable_and_subresources() {
        let versions = vec![
            list("v1", &[("hpas", "HPA", true, &["get", "list"]), ("hpas/status", "HPA", true, &["get", "list"])]),
            list("v2", &[("hpas", "HPA", true, &["get", "list"]), ("reviews", "Review", false, &["create"])]),
            list("v2beta1", &[("olds", "Old", true, &["list"])]),
        ];
        let got = group_resources("autoscaling", &versions, "v2");
        let want = vec![
            ResourceType::new("autoscaling", "v2", "hpas", "HPA", true),
            ResourceType::new("autoscaling", "v2beta1", "olds", "Old", true),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn exit_status_frames_map_to_exit_codes_and_errors() {
        let parse = |v: Value| exit_code_of("exec x", serde_json::from_value(v).unwrap());
        assert_eq!(parse(serde_json::json!({"metadata": {}, "status": "Success"})), Ok(0));
        let nonzero = serde_json::json!({"status": "Failure", "reason": "NonZeroExitCode", "message": "m",
                                         "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}});
        assert_eq!(parse(nonzero), Ok(3));
        let err = parse(serde_json::json!({"status": "Failure", "reason": "InternalError", "message": "boom"}));
        assert!(matches!(&err, Err(ClusterError::Other(m)) if m.contains("exec x") && m.contains("boom")), "{err:?}");
        assert!(exit_code_of("exec x", None).unwrap_err().to_string().contains("without an exit status"));
    }

    #[test]
    fn urls_name_group_version_namespace_and_plural() {
        let pods = ResourceType::new("", "v1", "pods", "Pod", true);
        let crb =
            ResourceType::new("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false);
        assert_eq!(collection_url(&pods, Some("a")), "/api/v1/namespaces/a/pods");
        assert_eq!(collection_url(&pods, None), "/api/v1/pods");
        assert_eq!(collection_url(&crb, Some("a")), "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings");
    }
}
