//! Bounded retries of transient cluster failures, timed on the runtime's clock.
//!
//! [`RetryingCluster`] wraps any [`Cluster`] — kube-rs in production, the simulator's faulty fake
//! cluster under simulation — and retries calls that failed with [`ClusterError::Unavailable`]
//! (429, 5xx, a broken connection, an exec whose upgrade was refused so the command never ran) with
//! capped "equal jitter" backoff, at most [`RETRY_ATTEMPTS_MAX`] attempts. What still fails is
//! reported with the number of attempts; everything else (403, 410, a 404 on list, an exec that ran
//! and broke) is reported at once. One retry loop for every call, timed by [`Runtime::sleep`], so
//! the simulator runs exactly this code on virtual time and can make the retries run out.

use std::sync::Arc;

use async_trait::async_trait;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError, ExecResult, ListPage};

use crate::world::Runtime;

/// Attempts of one call (the first try included) before a transient failure is reported.
pub const RETRY_ATTEMPTS_MAX: u32 = 6;
/// Backoff before the first retry; doubled for each further one.
pub const RETRY_BACKOFF_BASE_MS: u64 = 100;
/// Upper bound of one backoff.
pub const RETRY_BACKOFF_MAX_MS: u64 = 5_000;

/// How transient cluster failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of one call, the first included (at least 1).
    pub attempts_max: u32,
    /// Backoff before the first retry, doubled after each.
    pub backoff_base_ms: u64,
    /// Upper bound of one backoff.
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: RETRY_ATTEMPTS_MAX,
            backoff_base_ms: RETRY_BACKOFF_BASE_MS,
            backoff_max_ms: RETRY_BACKOFF_MAX_MS,
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based): "equal jitter" — half the capped exponential
    /// delay, plus a random part of the other half, so many clients do not retry in lockstep.
    pub fn backoff_ms(&self, retry: u32, rt: &dyn Runtime) -> u64 {
        let exp = self.backoff_base_ms.saturating_mul(1u64 << retry.min(32)).min(self.backoff_max_ms);
        let half = exp / 2;
        half + rt.jitter(exp - half + 1)
    }
}

/// Runs `call` until it succeeds, fails with anything but [`ClusterError::Unavailable`], or the
/// attempts run out; the last transient failure then says how many attempts were made.
pub async fn retry_transient<T, F, Fut>(
    policy: &RetryPolicy,
    rt: &dyn Runtime,
    what: &str,
    mut call: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let attempts = policy.attempts_max.max(1);
    let mut retry = 0u32;
    loop {
        match call().await {
            Err(ClusterError::Unavailable(msg)) if retry + 1 < attempts => {
                let wait = policy.backoff_ms(retry, rt);
                tracing::debug!(%what, error = %msg, wait_ms = wait, "retrying");
                rt.sleep(wait).await;
                retry += 1;
            }
            Err(ClusterError::Unavailable(msg)) => {
                return Err(ClusterError::Unavailable(format!("{msg} (gave up after {attempts} attempts)")));
            }
            other => return other,
        }
    }
}

/// A [`Cluster`] whose transient failures are retried; see the module docs.
pub struct RetryingCluster {
    inner: Arc<dyn Cluster>,
    policy: RetryPolicy,
    runtime: Arc<dyn Runtime>,
}

impl RetryingCluster {
    /// Wraps `inner`; waits on `runtime`'s clock.
    pub fn new(inner: Arc<dyn Cluster>, policy: RetryPolicy, runtime: Arc<dyn Runtime>) -> RetryingCluster {
        RetryingCluster { inner, policy, runtime }
    }
}

#[async_trait]
impl Cluster for RetryingCluster {
    async fn discover(&self) -> Result<Vec<ResourceType>, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "discovery", || self.inner.discover()).await
    }

    async fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "list", || {
            self.inner.list(rt, namespace, limit, continue_token)
        })
        .await
    }

    async fn get(&self, rt: &ResourceType, key: &ItemKey) -> Result<Option<String>, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "get", || self.inner.get(rt, key)).await
    }

    async fn exec(&self, pod: &ItemKey, container: &str, command: &[String]) -> Result<ExecResult, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "exec", || self.inner.exec(pod, container, command)).await
    }

    /// A create is retried too: when an earlier try reached the server, a retry answers
    /// `AlreadyExists`, which callers treat as create-or-get.
    async fn create(&self, rt: &ResourceType, namespace: Option<&str>, json: &str) -> Result<String, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "create", || self.inner.create(rt, namespace, json)).await
    }

    async fn patch(&self, rt: &ResourceType, key: &ItemKey, merge_patch: &str) -> Result<String, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "patch", || self.inner.patch(rt, key, merge_patch)).await
    }

    async fn delete(&self, rt: &ResourceType, key: &ItemKey) -> Result<bool, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "delete", || self.inner.delete(rt, key)).await
    }

    async fn watch(
        &self,
        rt: &ResourceType,
        key: &ItemKey,
        resource_version: &str,
        timeout_ms: u64,
    ) -> Result<Option<String>, ClusterError> {
        retry_transient(&self.policy, self.runtime.as_ref(), "watch", || {
            self.inner.watch(rt, key, resource_version, timeout_ms)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::TokioRuntime;

    #[test]
    fn backoff_is_capped_and_jittered_within_bounds() {
        let p = RetryPolicy { attempts_max: 10, backoff_base_ms: 100, backoff_max_ms: 1_000 };
        for retry in 0..40 {
            let exp = (100u64 << retry.min(20)).min(1_000);
            for _ in 0..50 {
                let b = p.backoff_ms(retry, &TokioRuntime);
                assert!(b >= exp / 2 && b <= exp, "retry {retry}: {b} not in [{}, {exp}]", exp / 2);
            }
        }
        let spread: std::collections::BTreeSet<u64> = (0..50).map(|_| p.backoff_ms(5, &TokioRuntime)).collect();
        assert!(spread.len() > 5, "no jitter: {spread:?}");
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_attempts_run_out() {
        let p = RetryPolicy { attempts_max: 3, backoff_base_ms: 1, backoff_max_ms: 2 };
        let mut calls = 0;
        let r: Result<(), _> = retry_transient(&p, &TokioRuntime, "list x", || {
            calls += 1;
            async { Err(ClusterError::Unavailable("503".into())) }
        })
        .await;
        assert_eq!(calls, 3);
        assert_eq!(r, Err(ClusterError::Unavailable("503 (gave up after 3 attempts)".into())));
        let mut calls = 0;
        let r: Result<u32, _> = retry_transient(&p, &TokioRuntime, "list x", || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(ClusterError::Unavailable("429".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r, Ok(3));
        let mut calls = 0;
        let r: Result<(), _> = retry_transient(&p, &TokioRuntime, "list x", || {
            calls += 1;
            async { Err(ClusterError::Forbidden("403".into())) }
        })
        .await;
        assert_eq!((calls, r), (1, Err(ClusterError::Forbidden("403".into()))));
    }
}
