//! Bounded retries of transient cluster failures, timed on the runtime's clock.
//!
//! [`RetryingCluster`] wraps any [`Cluster`] — kube-rs in production, the simulator's faulty fake
//! cluster under simulation — and retries calls that failed with [`ClusterError::Unavailable`]
//! (429, 5xx, a broken connection, an exec whose upgrade was refused so the command never ran) with
//! capped "equal jitter" backoff, at most [`RETRY_ATTEMPTS_MAX`] attempts. What still fails is
//! reported with the number of attempts; everything else (403, 410, a 404 on list, an exec that ran
//! and broke) is reported at once. One retry loop for every call, timed by [`Runtime::sleep`], so
//! the simulator runs exactly this code on virtual time and can make the retries run out.
//!
//! Every attempt has a deadline ([`RetryPolicy::attempt_deadline_ms`], the process's request
//! timeout: [`request_timeout_ms`], `--request-timeout`, 30 s by default): an API server that
//! accepts the connection and never answers (hung, stopped, behind a stuck proxy) fails the attempt
//! as [`ClusterError::Unavailable`] instead of holding the call for ever. A watch's deadline is its
//! own timeout plus the request timeout. An exec has none here: the hook's timeout bounds the whole
//! exec, retries included (the driver drops it), and a command that may have started is not
//! retried on a deadline of ours.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError, ExecResult, ListPage};

use crate::world::{timeout, Runtime};

/// Attempts of one call (the first try included) before a transient failure is reported.
pub const RETRY_ATTEMPTS_MAX: u32 = 6;
/// Backoff before the first retry; doubled for each further one.
pub const RETRY_BACKOFF_BASE_MS: u64 = 100;
/// Upper bound of one backoff.
pub const RETRY_BACKOFF_MAX_MS: u64 = 5_000;
/// The request timeout unless the process sets another (`--request-timeout`): the longest one
/// attempt of a call to the API server may go unanswered.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;

static REQUEST_TIMEOUT_MS: AtomicU64 = AtomicU64::new(REQUEST_TIMEOUT_MS_DEFAULT);

/// Sets the process's request timeout (`--request-timeout`; at least 1 ms): the deadline of every
/// attempt of a call to the API server, of the kube client's requests and of its connects.
pub fn set_request_timeout_ms(ms: u64) {
    REQUEST_TIMEOUT_MS.store(ms.max(1), Ordering::Relaxed);
}

/// The process's request timeout ([`REQUEST_TIMEOUT_MS_DEFAULT`] unless set).
pub fn request_timeout_ms() -> u64 {
    REQUEST_TIMEOUT_MS.load(Ordering::Relaxed)
}

/// How transient cluster failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of one call, the first included (at least 1).
    pub attempts_max: u32,
    /// Backoff before the first retry, doubled after each.
    pub backoff_base_ms: u64,
    /// Upper bound of one backoff.
    pub backoff_max_ms: u64,
    /// How long one attempt may go unanswered before it fails as unavailable.
    pub attempt_deadline_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: RETRY_ATTEMPTS_MAX,
            backoff_base_ms: RETRY_BACKOFF_BASE_MS,
            backoff_max_ms: RETRY_BACKOFF_MAX_MS,
            attempt_deadline_ms: request_timeout_ms(),
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
/// attempts run out; the last transient failure then says how many attempts were made. Each
/// attempt unanswered within the policy's deadline fails as unavailable.
pub async fn retry_transient<T, F, Fut>(
    policy: &RetryPolicy,
    rt: &dyn Runtime,
    what: &str,
    call: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    retry_within(policy, rt, what, Some(policy.attempt_deadline_ms), call).await
}

/// `ms` as a deadline of ours — none under the planted bug `NoRequestDeadline`.
fn deadline(ms: u64) -> Option<u64> {
    use blockwise_engine::mutation::{active, Mutation};
    (!active(Mutation::NoRequestDeadline)).then_some(ms)
}

/// `ms` as a Go duration: `30s`, `1500ms`.
pub fn go_duration(ms: u64) -> String {
    if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// [`retry_transient`] with each attempt's deadline given (`None`: no deadline of ours).
async fn retry_within<T, F, Fut>(
    policy: &RetryPolicy,
    rt: &dyn Runtime,
    what: &str,
    deadline_ms: Option<u64>,
    mut call: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let attempts = policy.attempts_max.max(1);
    let mut retry = 0u32;
    loop {
        let attempt = match deadline_ms.and_then(deadline) {
            Some(ms) => timeout(rt, ms, call()).await.unwrap_or_else(|| {
                Err(ClusterError::Unavailable(format!(
                    "{what}: no answer from the API server within {}",
                    go_duration(ms)
                )))
            }),
            None => call().await,
        };
        match attempt {
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
        // No deadline of ours: the hook's timeout bounds the exec (see the module docs).
        retry_within(&self.policy, self.runtime.as_ref(), "exec", None, || self.inner.exec(pod, container, command))
            .await
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
        let deadline = timeout_ms.saturating_add(self.policy.attempt_deadline_ms);
        retry_within(&self.policy, self.runtime.as_ref(), "watch", Some(deadline), || {
            self.inner.watch(rt, key, resource_version, timeout_ms)
        })
        .await
    }

    /// One attempt, within the deadline: a probe, not a call to see through. The deadline is a
    /// second longer than a request's, so a client with its own (kube's, which names the server)
    /// answers first.
    async fn reachable(&self) -> Result<(), ClusterError> {
        let Some(ms) = deadline(self.policy.attempt_deadline_ms.saturating_add(1_000)) else {
            return self.inner.reachable().await;
        };
        timeout(self.runtime.as_ref(), ms, self.inner.reachable()).await.unwrap_or_else(|| {
            Err(ClusterError::Unavailable(format!("reaching the API server: no answer within {}", go_duration(ms))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::TokioRuntime;

    #[test]
    fn backoff_is_capped_and_jittered_within_bounds() {
        let p =
            RetryPolicy { attempts_max: 10, backoff_base_ms: 100, backoff_max_ms: 1_000, attempt_deadline_ms: 1_000 };
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
        let p = RetryPolicy { attempts_max: 3, backoff_base_ms: 1, backoff_max_ms: 2, attempt_deadline_ms: 1_000 };
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

    /// Issue 22: an API server that never answers fails each attempt at its deadline, and the call
    /// as unavailable once the attempts run out — it does not hold the run for ever. An exec has no
    /// deadline here (its hook's timeout bounds it); a watch's is its own timeout plus the deadline.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_call_fails_at_each_attempts_deadline() {
        let p = RetryPolicy { attempts_max: 3, backoff_base_ms: 10, backoff_max_ms: 20, attempt_deadline_ms: 30_000 };
        let started = tokio::time::Instant::now();
        let mut calls = 0;
        // Without deadlines the call would never end: the paused clock's hour ends it as a failure.
        let call = retry_transient(&p, &TokioRuntime, "list pods", || {
            calls += 1;
            std::future::pending::<Result<(), ClusterError>>()
        });
        let r = tokio::time::timeout(std::time::Duration::from_secs(3_600), call).await.expect("the call hung");
        assert_eq!(calls, 3);
        let Err(ClusterError::Unavailable(msg)) = r else { panic!("{r:?}") };
        assert!(msg.contains("list pods: no answer from the API server within 30s"), "{msg}");
        assert!(msg.contains("gave up after 3 attempts"), "{msg}");
        // Three deadlines and two backoffs of the paused clock, no more.
        assert!(started.elapsed() <= std::time::Duration::from_millis(90_040), "{:?}", started.elapsed());
        // A slow answer within the deadline is an answer.
        let r = retry_transient(&p, &TokioRuntime, "list pods", || async {
            tokio::time::sleep(std::time::Duration::from_millis(29_000)).await;
            Ok(7)
        })
        .await;
        assert_eq!(r, Ok(7));
    }
}
