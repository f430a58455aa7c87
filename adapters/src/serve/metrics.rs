//! `/metrics` (prometheus-client, OpenMetrics text), `/healthz` and `/readyz`.
//!
//! The backup metrics are the analogues of Velero's `velero_backup_*`; ours add resumes, blocks
//! in flight, hooks and the log's group-commit latency. Counters get `_total` from the encoder.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The controller's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Backups started (a resume is not a new attempt).
    pub attempt: Counter,
    /// Backups Completed.
    pub success: Counter,
    /// Backups PartiallyFailed.
    pub partial_failure: Counter,
    /// Backups Failed (FailedValidation included, as Velero counts it).
    pub failure: Counter,
    /// Seconds from start to a terminal phase.
    pub duration: Histogram,
    /// Items backed up, over all backups.
    pub items: Counter,
    /// Unix time of the last Completed backup.
    pub last_successful: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Bytes of the last stored archive.
    pub tarball_size: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Backups resumed from their logs by a (re)started controller.
    pub resumed: Counter,
    /// ItemBlocks in flight across running backups.
    pub blocks_in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Seconds each hook ran.
    pub hook_duration: Histogram,
    /// Hooks that did not succeed.
    pub hook_failures: Counter,
    /// Seconds each group commit of an event log took.
    pub log_flush: Histogram,
    /// Backups deleted because their ttl passed (the garbage collector) or their Schedule's
    /// retention does not keep them.
    pub gc_deleted: Counter,
    /// Deletions that failed: of such a Backup through the API (retried at the next pass), or of a
    /// deleted Backup's snapshots and files by its finalizer (retried until it succeeds).
    pub gc_failures: Counter,
    /// Backups started by Schedules.
    pub schedule_runs: Counter,
    /// Due Schedule runs skipped because the previous Backup still ran.
    pub schedule_skipped: Counter,
    /// Restores started (a resume is not a new attempt).
    pub restore_attempt: Counter,
    /// Restores Completed.
    pub restore_success: Counter,
    /// Restores PartiallyFailed.
    pub restore_partial_failure: Counter,
    /// Restores Failed.
    pub restore_failed: Counter,
    /// Restores FailedValidation.
    pub restore_validation_failed: Counter,
    /// Restores resumed from their logs by a (re)started controller.
    pub restore_resumed: Counter,
    /// Items restored (created, or patched under `update`), over all restores.
    pub restore_items: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            attempt: Counter::default(),
            success: Counter::default(),
            partial_failure: Counter::default(),
            failure: Counter::default(),
            duration: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            items: Counter::default(),
            last_successful: Gauge::default(),
            tarball_size: Gauge::default(),
            resumed: Counter::default(),
            blocks_in_flight: Gauge::default(),
            hook_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            hook_failures: Counter::default(),
            log_flush: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            gc_deleted: Counter::default(),
            gc_failures: Counter::default(),
            schedule_runs: Counter::default(),
            schedule_skipped: Counter::default(),
            restore_attempt: Counter::default(),
            restore_success: Counter::default(),
            restore_partial_failure: Counter::default(),
            restore_failed: Counter::default(),
            restore_validation_failed: Counter::default(),
            restore_resumed: Counter::default(),
            restore_items: Counter::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(PoisonError::into_inner);
            r.register("blockwise_backup_attempt", "Backups started", m.attempt.clone());
            r.register("blockwise_backup_success", "Backups that ended Completed", m.success.clone());
            r.register(
                "blockwise_backup_partial_failure",
                "Backups that ended PartiallyFailed",
                m.partial_failure.clone(),
            );
            r.register("blockwise_backup_failure", "Backups that ended Failed or FailedValidation", m.failure.clone());
            r.register("blockwise_backup_duration_seconds", "Time from start to a terminal phase", m.duration.clone());
            r.register("blockwise_backup_items", "Items backed up", m.items.clone());
            r.register(
                "blockwise_backup_last_successful_timestamp",
                "Unix time of the last Completed backup",
                m.last_successful.clone(),
            );
            r.register(
                "blockwise_backup_tarball_size_bytes",
                "Size of the last stored archive",
                m.tarball_size.clone(),
            );
            r.register("blockwise_backup_resumed", "Backups resumed from their event logs", m.resumed.clone());
            r.register("blockwise_blocks_in_flight", "ItemBlocks being backed up now", m.blocks_in_flight.clone());
            r.register("blockwise_hook_duration_seconds", "Time each hook ran", m.hook_duration.clone());
            r.register("blockwise_hook_failures", "Hooks that did not succeed", m.hook_failures.clone());
            r.register("blockwise_log_flush_seconds", "Time of each event-log group commit", m.log_flush.clone());
            r.register(
                "blockwise_gc_deleted",
                "Backups deleted because their ttl passed or their schedule's retention does not keep them",
                m.gc_deleted.clone(),
            );
            r.register(
                "blockwise_gc_failures",
                "Backup deletions that failed (through the API, or of a backup's snapshots and files); retried",
                m.gc_failures.clone(),
            );
            r.register("blockwise_schedule_runs", "Backups started by schedules", m.schedule_runs.clone());
            r.register(
                "blockwise_schedule_skipped",
                "Due schedule runs skipped while the previous backup still ran",
                m.schedule_skipped.clone(),
            );
            r.register("blockwise_restore_attempt", "Restores started", m.restore_attempt.clone());
            r.register("blockwise_restore_success", "Restores that ended Completed", m.restore_success.clone());
            r.register(
                "blockwise_restore_partial_failure",
                "Restores that ended PartiallyFailed",
                m.restore_partial_failure.clone(),
            );
            r.register("blockwise_restore_failed", "Restores that ended Failed", m.restore_failed.clone());
            r.register(
                "blockwise_restore_validation_failed",
                "Restores that ended FailedValidation",
                m.restore_validation_failed.clone(),
            );
            r.register(
                "blockwise_restore_resumed",
                "Restores resumed from their event logs",
                m.restore_resumed.clone(),
            );
            r.register("blockwise_restore_items", "Items restores created or updated", m.restore_items.clone());
        }
        m
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = encode(&mut out, &r) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }

    /// The same metrics in Prometheus's classic text format (0.0.4), for scrapers that do not ask
    /// for OpenMetrics: counter families are named with their `_total` sample name, and there is no
    /// `# EOF`.
    pub fn encode_classic(&self) -> String {
        let open = self.encode();
        let counters: std::collections::BTreeSet<&str> =
            open.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
        let mut out = String::with_capacity(open.len());
        for line in open.lines() {
            if line == "# EOF" {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
                let rest = line.strip_prefix(p)?;
                let (name, tail) = rest.split_once(' ')?;
                counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
            });
            out.push_str(renamed.as_deref().unwrap_or(line));
            out.push('\n');
        }
        out
    }
}

/// What `/readyz` reports: ready once the controller has connected and either leads or stands by.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// Backups running now (for logs and tests).
    pub running: AtomicU64,
}

impl Health {
    /// Marks the controller ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether it is.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the returned task is aborted.
/// Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let m = metrics.clone();
    let h = health.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let m = m.clone();
                async move {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
                    if accept.contains("application/openmetrics-text") {
                        (
                            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                            m.encode(),
                        )
                    } else {
                        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.encode_classic())
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let h = h.clone();
                async move {
                    if h.ready() {
                        (StatusCode::OK, "ok\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("warning: the metrics server stopped: {e}");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_help_and_type() {
        let m = Metrics::new();
        m.attempt.inc();
        m.hook_duration.observe(0.5);
        let text = m.encode();
        for name in [
            "blockwise_backup_attempt_total 1",
            "# TYPE blockwise_backup_success counter",
            "# TYPE blockwise_backup_partial_failure counter",
            "# TYPE blockwise_backup_failure counter",
            "# TYPE blockwise_backup_duration_seconds histogram",
            "# TYPE blockwise_backup_items counter",
            "# TYPE blockwise_backup_last_successful_timestamp gauge",
            "# TYPE blockwise_backup_tarball_size_bytes gauge",
            "# TYPE blockwise_backup_resumed counter",
            "# TYPE blockwise_blocks_in_flight gauge",
            "blockwise_hook_duration_seconds_count 1",
            "# TYPE blockwise_hook_failures counter",
            "# TYPE blockwise_log_flush_seconds histogram",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name:?} missing from\n{text}");
        }
        let classic = m.encode_classic();
        assert!(classic.contains("# TYPE blockwise_backup_attempt_total counter\nblockwise_backup_attempt_total 1"));
        assert!(classic.contains("# TYPE blockwise_hook_duration_seconds histogram"));
        assert!(!classic.contains("# EOF"));
    }
}
