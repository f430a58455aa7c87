//! The ports the shell implements: how the engine's commands reach a cluster.
//!
//! [`Cluster`] is the one trait that the in-memory fake cluster (simulator), the demo cluster and
//! the kube-rs adapter all implement. It is declared here, as plain async signatures, so that the
//! simulator can implement it without depending on the shell; nothing in the engine calls it —
//! runtimes do. Timeouts are the runtime's job: dropping an `exec` future must cancel the exec.

use async_trait::async_trait;

use crate::item::{ItemKey, ResourceType};

/// One page of a list call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Raw JSON of each object, as served.
    pub objects: Vec<String>,
    /// Token for the next page; `None` on the last page.
    pub continue_token: Option<String>,
}

/// What an exec returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The command's exit status.
    pub exit_code: i32,
    /// Captured stdout (bounded by the implementation).
    pub stdout: String,
    /// Captured stderr (bounded by the implementation).
    pub stderr: String,
}

/// Errors a cluster call can return, classified for retry decisions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// 410 Gone: the continue token expired; the listing must restart.
    #[error("continue token expired: {0}")]
    Expired(String),
    /// 429 or 5xx after the adapter's own retries.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// 403.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404 on a write or a watch (a get answers `Ok(None)` instead).
    #[error("not found: {0}")]
    NotFound(String),
    /// 409 AlreadyExists on a create.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// Access to one Kubernetes cluster.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Every resource type that supports list, at its preferred version.
    async fn discover(&self) -> Result<Vec<ResourceType>, ClusterError>;
    /// One page of objects of `rt`, optionally in one namespace.
    async fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ClusterError>;
    /// One object by key; `Ok(None)` when it does not exist.
    async fn get(&self, rt: &ResourceType, key: &ItemKey) -> Result<Option<String>, ClusterError>;
    /// Runs `command` in `container` of `pod` and waits for its exit.
    async fn exec(&self, pod: &ItemKey, container: &str, command: &[String]) -> Result<ExecResult, ClusterError>;
    /// Creates an object of `rt` (in `namespace` when namespaced) from its JSON; returns the object
    /// as stored. An object of that name that exists already is [`ClusterError::AlreadyExists`].
    async fn create(&self, rt: &ResourceType, namespace: Option<&str>, json: &str) -> Result<String, ClusterError>;
    /// Applies a JSON merge patch (RFC 7386) to an object; returns the object as stored. A missing
    /// object is [`ClusterError::NotFound`].
    async fn patch(&self, rt: &ResourceType, key: &ItemKey, merge_patch: &str) -> Result<String, ClusterError>;
    /// Deletes an object; `Ok(false)` when it did not exist. An object with finalizers is only
    /// marked for deletion and goes once they are removed.
    async fn delete(&self, rt: &ResourceType, key: &ItemKey) -> Result<bool, ClusterError>;
    /// Waits until object `key` changes from `resource_version` (a watch) or `timeout_ms` passes,
    /// and returns the object then (`None` when it does not exist). Callers re-check what they
    /// wait for after each return: a return is a hint that something may have changed.
    async fn watch(
        &self,
        rt: &ResourceType,
        key: &ItemKey,
        resource_version: &str,
        timeout_ms: u64,
    ) -> Result<Option<String>, ClusterError>;
    /// Whether the API server answers at all (one request, within the request timeout): asked
    /// after a hook timed out or a snapshot call failed, to tell a failing command from a cluster
    /// that cannot be reached ([`ClusterError::Unavailable`]). Clusters without a server answer.
    async fn reachable(&self) -> Result<(), ClusterError> {
        Ok(())
    }
}

/// Where a running engine reads back the block plans it recorded (`BlockPlanned`): the shell's log
/// keeps every plan it appended or read, by block id, so that the engine and its fold hold only
/// the plans of the blocks in flight (and of blocks with hooks) instead of every plan of the
/// backup ([`crate::state::BlockState::plan`]). Reads are synchronous and small (one plan).
pub trait PlanSource: Send + Sync {
    /// The plan of block `id`; an error names what could not be read.
    fn plan(&self, id: u32) -> Result<std::sync::Arc<crate::grouping::BlockPlan>, String>;
}
