//! `schedules.blockwise.dev` (issue 14): Velero's Schedule — a cron `schedule`, a Backup
//! `template`, `paused`, `useOwnerReferencesInBackup` — plus K8up's retention rules, run by the
//! controller with the pure time logic of `blockwise_engine::schedule`.
//!
//! Each look at a Schedule (when it is created or changed, when a Backup of it changes, and at its
//! next run) decides with [`decide`]: one or more due times since its last backup start exactly
//! **one** Backup (`<schedule>-<UTC yyyymmddhhmmss>`, labelled `velero.io/schedule-name`), never
//! a burst after the controller was down; a due time while its previous Backup still runs is
//! skipped (`status.lastSkipped`, `blockwise_schedule_skipped_total`). Then retention: of the
//! schedule's Backups, those the rules do not keep and that have ended are deleted through the
//! API — their finalizer removes store files and logs, as the garbage collector's deletions do.
//! A Schedule whose cron or template cannot run ends `FailedValidation` with every reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use blockwise_engine::schedule::{
    backup_name, parse_utc_timestamp, started_ms_of_name, step, Cron, Outcome, Retention, ScheduleView, ScheduledBackup,
};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store as Reflector;
use kube::runtime::watcher;
use kube::{Client, CustomResource, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::controller::{status_merge_patch, FIELD_MANAGER};
use super::crd::{phase as backup_phase, Backup, BackupSpec, Locations, Scope, Tenancy};
use super::metrics::Metrics;
use crate::report::rfc3339;
use crate::world::Runtime;

/// The label naming the Schedule a Backup was made by (Velero's).
pub const SCHEDULE_LABEL: &str = "velero.io/schedule-name";

/// A schedule of Backups; see the module docs.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "blockwise.dev",
    version = "v1alpha1",
    kind = "Schedule",
    plural = "schedules",
    shortname = "bws",
    category = "blockwise",
    namespaced,
    status = "ScheduleStatus",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Last","type":"string","jsonPath":".status.lastBackup"}"#,
    printcolumn = r#"{"name":"Next","type":"string","jsonPath":".status.nextRun"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// Cron (five fields, `@daily`, `@every 6h`, optional `CRON_TZ=<zone>`: an IANA name or an offset; docs/schedules.md).
    pub schedule: String,
    /// The spec of every Backup it makes.
    pub template: BackupSpec,
    /// Make no Backups while true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Give each Backup an owner reference to the Schedule (deleting the Schedule deletes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_owner_references_in_backup: Option<bool>,
    /// Which of its Backups to keep; the others are deleted once they have ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
}

/// K8up's retention rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// The newest N backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// The newest of each of the last N hours that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// … days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// … ISO weeks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// … months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
}

/// What the controller reports of a Schedule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// `New`, `Enabled` or `FailedValidation` (Velero's names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// When its last Backup was started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    /// When it is next due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
    /// When a due run was last skipped because the previous Backup still ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped: Option<String>,
    /// Why the Schedule cannot run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_errors: Vec<String>,
}

/// What the schedule controller needs.
pub struct ScheduleCtx {
    /// The API client.
    pub client: Client,
    /// The Backups the Backup controller watches (the Schedules' Backups among them).
    pub backups: Reflector<Backup>,
    /// Named stores, to validate templates as Backups are.
    pub locations: Locations,
    /// Which namespaces' Schedules are acted on, and as whom.
    pub tenancy: Tenancy,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The last Backup this process started for each Schedule (namespace, name): when, and its
    /// name. The caches of Schedules and Backups can lag behind this process's own writes; this
    /// cannot, so a reconcile of a stale copy never starts a second run or misses a running one.
    pub started: std::sync::Mutex<BTreeMap<(String, String), (i64, String)>>,
}

/// A reconcile that failed; retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(String);

fn now_ms() -> i64 {
    crate::world::TokioRuntime.now_ms() as i64
}

impl Schedule {
    /// The cron, the retention rules, or every reason the Schedule cannot run.
    /// `scope`: whom it speaks for (its template is checked as a Backup of its namespace).
    pub fn validate(&self, locations: &Locations, scope: &Scope) -> Result<(Cron, Retention), Vec<String>> {
        let mut errors = Vec::new();
        let cron = Cron::parse(&self.spec.schedule).map_err(|e| errors.push(format!("spec.schedule: {e}"))).ok();
        // The template must be a Backup the controller can run, named as its Backups will be.
        let probe = backup_name(&self.name_any(), 0);
        let mut backup = Backup::new(&probe, self.spec.template.clone());
        backup.metadata.uid = Some("probe".into());
        if let Err(es) = backup.to_request(locations, scope) {
            errors.extend(es.into_iter().map(|e| format!("spec.template: {e}")));
        }
        let r = self.spec.retention.clone().unwrap_or_default();
        let retention = Retention {
            keep_last: r.keep_last,
            keep_hourly: r.keep_hourly,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
        };
        match cron {
            Some(c) if errors.is_empty() => Ok((c, retention)),
            _ => Err(errors),
        }
    }
}

async fn patch_status(api: &Api<Schedule>, name: &str, status: &ScheduleStatus) -> Result<(), ScheduleError> {
    let body = status_merge_patch(status, &["phase", "lastBackup", "nextRun", "lastSkipped", "validationErrors"]);
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&body))
        .await
        .map(|_| ())
        .map_err(|e| ScheduleError(format!("patching the status of schedule {name}: {e}")))
}

/// Reconciles one Schedule (see the module docs).
pub async fn reconcile(s: Arc<Schedule>, ctx: Arc<ScheduleCtx>) -> Result<Action, ScheduleError> {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let api: Api<Schedule> = Api::namespaced(ctx.client.clone(), &ns);
    let backups_api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    // Outside the controller's namespaces: not ours to act on (no status, no Backups).
    let Some(scope) = ctx.tenancy.scope(&ns) else { return Ok(Action::await_change()) };
    if s.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let status = s.status.clone().unwrap_or_default();
    let (cron, retention) = match s.validate(&ctx.locations, &scope) {
        Ok(v) => v,
        Err(errors) => {
            if status.phase.as_deref() != Some("FailedValidation") || status.validation_errors != errors {
                let failed = ScheduleStatus {
                    phase: Some("FailedValidation".into()),
                    validation_errors: errors.clone(),
                    ..ScheduleStatus::default()
                };
                patch_status(&api, &name, &failed).await?;
                eprintln!("schedule {ns}/{name}: FailedValidation: {}", errors.join("; "));
            }
            return Ok(Action::await_change());
        }
    };
    // Its Backups, as the Backup controller's cache holds them.
    let mine: Vec<Arc<Backup>> = ctx
        .backups
        .state()
        .into_iter()
        .filter(|b| b.namespace().as_deref() == Some(ns.as_str()) && b.labels().get(SCHEDULE_LABEL) == Some(&name))
        .collect();
    let phase_of = |b: &Backup| b.status.as_ref().and_then(|st| st.phase.clone()).unwrap_or_default();
    let key = (ns.clone(), name.clone());
    let remembered = ctx.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).cloned();
    let seen: Vec<ScheduledBackup> = mine
        .iter()
        // One being deleted counts only while it still runs (its finalizer stops it).
        .filter(|b| b.metadata.deletion_timestamp.is_none() || !backup_phase::is_terminal(&phase_of(b)))
        .map(|b| ScheduledBackup {
            name: b.name_any(),
            started_ms: started_ms(b, &name),
            outcome: Outcome::of_phase(&phase_of(b)),
        })
        .collect();
    let now = now_ms();
    let view = ScheduleView {
        name: &name,
        cron: &cron,
        retention: &retention,
        paused: s.spec.paused.unwrap_or(false),
        created_ms: s.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_millisecond()),
        status_last_ms: status.last_backup.as_deref().and_then(parse_utc_timestamp),
        remembered,
        backups: &seen,
        now_ms: now,
    };
    let plan = step(&view);
    if plan.forget_remembered {
        ctx.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
    }
    let mut next = status.clone();
    next.phase = Some("Enabled".into());
    next.validation_errors = Vec::new();
    next.next_run = plan.next_run_ms.map(|t| rfc3339(t.max(0) as u64));
    if let Some(backup_name) = &plan.start {
        let mut b = Backup::new(backup_name, s.spec.template.clone());
        b.metadata.namespace = Some(ns.clone());
        b.metadata.labels = Some(BTreeMap::from([(SCHEDULE_LABEL.to_string(), name.clone())]));
        if s.spec.use_owner_references_in_backup.unwrap_or(false) {
            b.metadata.owner_references = s.controller_owner_ref(&()).map(|r| vec![r]);
        }
        let made = match backups_api.create(&PostParams::default(), &b).await {
            Ok(_) => true,
            // Made already (by an earlier controller that died before its status patch).
            Err(kube::Error::Api(e)) if e.code == 409 => false,
            Err(e) => return Err(ScheduleError(format!("creating backup {ns}/{backup_name}: {e}"))),
        };
        ctx.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, (now, backup_name.clone()));
        next.last_backup = Some(rfc3339(now as u64));
        if made {
            ctx.metrics.schedule_runs.inc();
            eprintln!("schedule {ns}/{name}: started backup {backup_name}");
        }
    } else if plan.skipped {
        ctx.metrics.schedule_skipped.inc();
        next.last_skipped = Some(rfc3339(now as u64));
        eprintln!("schedule {ns}/{name}: a due run was skipped: its previous backup still runs");
    }
    if next != status {
        patch_status(&api, &name, &next).await?;
    }
    // Retention: what the rules do not keep, once it has ended, goes.
    for victim in &plan.delete {
        match backups_api.delete(victim, &DeleteParams::default()).await {
            Ok(_) => {
                ctx.metrics.gc_deleted.inc();
                eprintln!("schedule {ns}/{name}: backup {victim} is not kept by its retention rules; deleting it");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                ctx.metrics.gc_failures.inc();
                eprintln!("warning: schedule {ns}/{name}: deleting backup {victim}: {e}");
            }
        }
    }
    let wait = match next.next_run.as_deref().and_then(parse_utc_timestamp) {
        Some(t) => Duration::from_millis((t - now_ms()).clamp(200, 3_600_000) as u64),
        None => Duration::from_secs(3600),
    };
    Ok(Action::requeue(wait))
}

fn error_policy(s: Arc<Schedule>, e: &ScheduleError, _: Arc<ScheduleCtx>) -> Action {
    eprintln!("warning: schedule {}/{}: {e} (retrying)", s.namespace().unwrap_or_default(), s.name_any());
    Action::requeue(Duration::from_secs(2))
}

/// Runs the Schedule controller; a Schedule is looked at again whenever one of its Backups changes.
pub async fn run_controller(api: Api<Schedule>, backups: Api<Backup>, ctx: Arc<ScheduleCtx>) {
    Controller::new(api, watcher::Config::default())
        .watches(backups, watcher::Config::default().labels(SCHEDULE_LABEL), |b: Backup| {
            let ns = b.namespace()?;
            let name = b.labels().get(SCHEDULE_LABEL)?.clone();
            Some(kube::runtime::reflector::ObjectRef::<Schedule>::new(&name).within(&ns))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                super::report_stream_error("schedule", &e);
            }
        })
        .await;
}

/// When the schedule made Backup `b` (a queued Backup starts later; its run was due then), on
/// this controller's clock, as `now` and `lastBackup` are: the instant in its name; its
/// creationTimestamp (the API server's clock) only for a name of another form.
fn started_ms(b: &Backup, schedule: &str) -> i64 {
    started_ms_of_name(schedule, &b.name_any())
        .unwrap_or_else(|| b.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_millisecond()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_scheduled_backups_start_is_on_the_controllers_clock_not_the_api_servers() {
        let made = |name: &str, created: &str| -> Backup {
            serde_json::from_value(json!({
                "apiVersion": "blockwise.dev/v1alpha1", "kind": "Backup",
                "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
                "spec": {},
            }))
            .unwrap()
        };
        // The API server's clock is ten minutes ahead of the controller's.
        let b = made("nightly-20261205030000", "2026-12-05T03:10:00Z");
        assert_eq!(started_ms(&b, "nightly"), parse_utc_timestamp("2026-12-05T03:00:00Z").unwrap());
        let other = made("by-hand", "2026-12-05T03:10:00Z");
        assert_eq!(started_ms(&other, "nightly"), parse_utc_timestamp("2026-12-05T03:10:00Z").unwrap());
    }

    fn schedule(spec: serde_json::Value) -> Schedule {
        let mut s = Schedule::new("nightly", serde_json::from_value(spec).unwrap());
        s.metadata.namespace = Some("ns".into());
        s
    }

    #[test]
    fn a_schedule_validates_its_cron_and_its_template() {
        let ok = schedule(json!({"schedule": "@every 10s", "template": {"ttl": "1h"}, "retention": {"keepLast": 3}}));
        let (_, r) = ok.validate(&Locations::default(), &Scope::Admin).unwrap();
        assert_eq!(r.keep_last, Some(3));
        let bad = schedule(json!({"schedule": "61 * * * *", "template": {"ttl": "soon"}}));
        let errors = bad.validate(&Locations::default(), &Scope::Admin).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("minute 61") && errors[1].contains("spec.template"), "{errors:?}");
    }
}
