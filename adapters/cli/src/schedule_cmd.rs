//! `blockwise schedule create/get/describe/pause/unpause`: Velero's schedule commands over the
//! `schedules.blockwise.dev` objects the in-cluster controller runs (`blockwise serve`). They talk
//! to the API server only — the controller makes the Backups — through the kubeconfig (or
//! `--kubeconfig`, `--context`), in the controller's namespace (`-n`, default `blockwise-system`).
//! What the API server would only refuse later is checked first: the cron, the template as a
//! Backup, the retention counts — a bad flag is exit 2 with nothing created.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use blockwise_adapters::report::rfc3339;
use blockwise_adapters::serve::crd::{Backup, BackupSpec, LabelSelector, Locations};
use blockwise_adapters::serve::schedules::{RetentionSpec, Schedule, ScheduleSpec, SCHEDULE_LABEL};
use blockwise_engine::schedule::Cron;
use clap::{Args, Subcommand};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;

use crate::cli::{emit, runtime, usage, FilterArgs};

/// The schedule subcommands.
#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Create a Schedule: Backups from a template on a cron, kept by retention rules.
    Create(Box<CreateArgs>),
    /// List Schedules: phase, cron, last and next run, paused.
    Get(GetArgs),
    /// One Schedule: its spec, status and Backups.
    Describe(DescribeArgs),
    /// Stop Schedules from making Backups (their retention still applies).
    Pause(PauseArgs),
    /// Let paused Schedules make Backups again.
    Unpause(PauseArgs),
}

/// Where the Schedules are.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The controller's namespace, where Schedules and their Backups live.
    #[arg(short = 'n', long, default_value = "blockwise-system")]
    namespace: String,
    /// Kubeconfig to use (also KUBECONFIG, ~/.kube/config; in a pod, its service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: its current-context).
    #[arg(long)]
    context: Option<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Schedule name (its Backups are `<name>-<UTC yyyymmddhhmmss>`).
    name: String,
    /// When: five cron fields, `@hourly`/`@daily`/`@weekly`/`@monthly`, `@every 6h`; an optional
    /// `CRON_TZ=<zone> ` prefix (docs/schedules.md).
    #[arg(long)]
    schedule: String,
    // Which objects each Backup takes.
    #[command(flatten)]
    filter: FilterArgs,
    /// Include cluster-scoped resources (unset: only when all namespaces are included).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    include_cluster_resources: Option<bool>,
    /// How long each Backup is kept before the garbage collector deletes it, e.g. 720h (the
    /// default when unset) or 30m.
    #[arg(long)]
    ttl: Option<String>,
    /// A named store of the controller (`blockwise serve --storage-location NAME=…`).
    #[arg(long)]
    storage_location: Option<String>,
    /// Take CSI volume snapshots (default true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    snapshot_volumes: Option<bool>,
    /// Blocks each Backup backs up in parallel.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: Option<u32>,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
    /// Give each Backup an owner reference to the Schedule (deleting it deletes them).
    #[arg(long)]
    use_owner_references_in_backup: bool,
    /// Keep the newest N Backups.
    #[arg(long)]
    keep_last: Option<u32>,
    /// Keep the newest Backup of each of the last N hours that have one.
    #[arg(long)]
    keep_hourly: Option<u32>,
    /// … of each of the last N days.
    #[arg(long)]
    keep_daily: Option<u32>,
    /// … of each of the last N ISO weeks.
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// … of each of the last N months.
    #[arg(long)]
    keep_monthly: Option<u32>,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Output format: text or json.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// Schedule name.
    name: String,
    /// Output format: text or json (the object as served).
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct PauseArgs {
    /// Schedule names.
    #[arg(required_unless_present = "all")]
    names: Vec<String>,
    /// Every Schedule in the namespace.
    #[arg(long, conflicts_with = "names")]
    all: bool,
    #[command(flatten)]
    target: Target,
}

/// Runs one `schedule` command.
pub fn run(command: ScheduleCommand) -> Result<ExitCode> {
    match command {
        ScheduleCommand::Create(a) => create(*a),
        ScheduleCommand::Get(a) => get(a),
        ScheduleCommand::Describe(a) => describe(a),
        ScheduleCommand::Pause(a) => set_paused(a, true),
        ScheduleCommand::Unpause(a) => set_paused(a, false),
    }
}

/// A kube client for `t`; a kubeconfig that cannot be used is the user's input (exit 2).
fn client(t: &Target, rt: &tokio::runtime::Runtime) -> Result<(kube::Client, String)> {
    let kubeconfig = t.kubeconfig.as_ref().map(std::path::absolute).transpose().context("resolving --kubeconfig")?;
    let cluster = rt
        .block_on(blockwise_adapters::kube::KubeCluster::connect(kubeconfig.as_deref(), t.context.as_deref()))
        .map_err(|e| usage(e.to_string()))?;
    Ok((cluster.client(), cluster.server().to_string()))
}

fn api_err(what: String, server: &str) -> impl FnOnce(kube::Error) -> anyhow::Error + '_ {
    move |e| match &e {
        kube::Error::Api(s) if s.code == 404 && s.details.as_ref().is_some_and(|d| d.kind == "schedules") => {
            usage(format!("{what}: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 404 => anyhow!(
            "{what}: the API server {server} does not serve schedules.blockwise.dev (install the controller's \
             manifests: `blockwise install --dry-run -o yaml | kubectl apply -f -`): {}",
            s.message
        ),
        kube::Error::Api(s) => anyhow!("{what}: {} ({})", s.message, s.code),
        _ => anyhow!("{what}: cannot reach the API server {server}: {}", blockwise_adapters::kube::error_text(&e)),
    }
}

/// A selector string (`a=b,c!=d,e in (x,y),f notin (z),g,!h`) as a `metav1.LabelSelector`:
/// parsed by the engine, so what is accepted here is what a Backup runs, and shaped by it
/// (`LabelSelector::to_k8s_json`).
fn label_selector(text: &str) -> Result<LabelSelector, String> {
    let parsed = blockwise_engine::spec::LabelSelector::parse(text).map_err(|e| e.to_string())?;
    serde_json::from_value(parsed.to_k8s_json()).map_err(|e| format!("{text:?}: {e}"))
}

/// The Schedule `create` asks for and its parsed cron, or why not (exit 2).
fn schedule_of(a: &CreateArgs) -> Result<(Schedule, Cron)> {
    let template = BackupSpec {
        included_namespaces: a.filter.include_namespaces.clone(),
        excluded_namespaces: a.filter.exclude_namespaces.clone(),
        included_resources: a.filter.include_resources.clone(),
        excluded_resources: a.filter.exclude_resources.clone(),
        include_cluster_resources: a.include_cluster_resources,
        label_selector: a
            .filter
            .selector
            .as_deref()
            .map(label_selector)
            .transpose()
            .map_err(|e| usage(format!("--selector: {e}")))?,
        ttl: a.ttl.clone(),
        storage_location: a.storage_location.clone(),
        snapshot_volumes: a.snapshot_volumes,
        workers: a.workers,
        ..BackupSpec::default()
    };
    let keep = [a.keep_last, a.keep_hourly, a.keep_daily, a.keep_weekly, a.keep_monthly];
    let retention = keep.iter().any(Option::is_some).then_some(RetentionSpec {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
    });
    let spec = ScheduleSpec {
        schedule: a.schedule.clone(),
        template,
        paused: a.paused.then_some(true),
        use_owner_references_in_backup: a.use_owner_references_in_backup.then_some(true),
        retention,
    };
    let mut s = Schedule::new(&a.name, spec);
    s.metadata.namespace = Some(a.target.namespace.clone());
    if let Err(e) = blockwise_engine::spec::validate_backup_name(&a.name) {
        return Err(usage(format!("schedule name {:?}: {e}", a.name)));
    }
    // The controller's named stores are not known here: a named one is taken on trust.
    let mut locations = Locations::default();
    if let Some(l) = &a.storage_location {
        locations.named.insert(l.clone(), blockwise_adapters::session::StorageSpec::Local { root: None });
    }
    let (cron, _) = s
        .validate(&locations, &blockwise_adapters::serve::crd::Scope::Admin)
        .map_err(|errors| usage(errors.join("; ")))?;
    Ok((s, cron))
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    let (schedule, cron) = schedule_of(&a)?;
    let rt = runtime()?;
    let (client, server) = client(&a.target, &rt)?;
    let api: Api<Schedule> = Api::namespaced(client, &a.target.namespace);
    let what = format!("creating schedule {}/{}", a.target.namespace, a.name);
    match rt.block_on(api.create(&PostParams::default(), &schedule)) {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Err(usage(format!("schedule {}/{} already exists", a.target.namespace, a.name)))
        }
        Err(e) => return Err(api_err(what, &server)(e)),
    }
    let now = blockwise_adapters::world::Runtime::now_ms(&blockwise_adapters::world::TokioRuntime) as i64;
    let next = match cron.next_after(now) {
        Some(t) if !a.paused => format!("; first run at {} (UTC)", rfc3339(t.max(0) as u64)),
        Some(_) => "; paused".to_string(),
        None => "; its fields never match: it will not run".to_string(),
    };
    eprintln!("schedule {}/{} created{next}", a.target.namespace, a.name);
    eprintln!("next: `blockwise schedule describe {} -n {}`", a.name, a.target.namespace);
    Ok(ExitCode::SUCCESS)
}

fn or_dash(s: Option<&str>) -> &str {
    s.filter(|s| !s.is_empty()).unwrap_or("-")
}

fn get(a: GetArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    let (client, server) = client(&a.target, &rt)?;
    let api: Api<Schedule> = Api::namespaced(client, &a.target.namespace);
    let what = format!("listing schedules in {}", a.target.namespace);
    let mut list = rt.block_on(api.list(&ListParams::default())).map_err(api_err(what, &server))?.items;
    list.sort_by_key(|s| s.name_any());
    if a.output == "json" {
        emit(&format!("{}\n", serde_json::to_string_pretty(&list).context("encoding JSON")?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["NAME", "PHASE", "SCHEDULE", "LAST BACKUP", "NEXT RUN", "PAUSED"].map(String::from)];
    for s in &list {
        let st = s.status.clone().unwrap_or_default();
        rows.push([
            s.name_any(),
            or_dash(st.phase.as_deref()).to_string(),
            s.spec.schedule.clone(),
            or_dash(st.last_backup.as_deref()).to_string(),
            or_dash(st.next_run.as_deref()).to_string(),
            s.spec.paused.unwrap_or(false).to_string(),
        ]);
    }
    emit(&table(&rows))?;
    Ok(ExitCode::SUCCESS)
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn describe(a: DescribeArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    let (client, server) = client(&a.target, &rt)?;
    let ns = &a.target.namespace;
    let api: Api<Schedule> = Api::namespaced(client.clone(), ns);
    let what = format!("reading schedule {ns}/{}", a.name);
    let s = match rt.block_on(api.get_opt(&a.name)).map_err(api_err(what, &server))? {
        Some(s) => s,
        None => return Err(usage(format!("schedule {ns}/{} not found", a.name))),
    };
    if a.output == "json" {
        emit(&format!("{}\n", serde_json::to_string_pretty(&s).context("encoding JSON")?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let backups: Api<Backup> = Api::namespaced(client, ns);
    let params = ListParams::default().labels(&format!("{SCHEDULE_LABEL}={}", a.name));
    let what = format!("listing the backups of schedule {ns}/{}", a.name);
    let mut mine = rt.block_on(backups.list(&params)).map_err(api_err(what, &server))?.items;
    mine.sort_by_key(|b| std::cmp::Reverse(b.name_any()));
    emit(&describe_text(&s, &mine))?;
    Ok(ExitCode::SUCCESS)
}

fn describe_text(s: &Schedule, backups: &[Backup]) -> String {
    let st = s.status.clone().unwrap_or_default();
    let t = &s.spec.template;
    let list = |v: &[String], all: &str| if v.is_empty() { all.to_string() } else { v.join(", ") };
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{:<22}{v}\n", format!("{k}:")));
    line("Name", &s.name_any());
    line("Namespace", or_dash(s.namespace().as_deref()));
    line("Phase", or_dash(st.phase.as_deref()));
    for e in &st.validation_errors {
        line("Validation error", e);
    }
    line("Schedule", &s.spec.schedule);
    line("Paused", &s.spec.paused.unwrap_or(false).to_string());
    line("Owner references", &s.spec.use_owner_references_in_backup.unwrap_or(false).to_string());
    line("Included namespaces", &list(&t.included_namespaces, "*"));
    line("Excluded namespaces", &list(&t.excluded_namespaces, "<none>"));
    line("Included resources", &list(&t.included_resources, "*"));
    line("Excluded resources", &list(&t.excluded_resources, "<none>"));
    line("TTL", t.ttl.as_deref().unwrap_or("720h (default)"));
    line("Storage location", t.storage_location.as_deref().unwrap_or("<default>"));
    let r = s.spec.retention.clone().unwrap_or_default();
    let rules: Vec<String> = [
        ("last", r.keep_last),
        ("hourly", r.keep_hourly),
        ("daily", r.keep_daily),
        ("weekly", r.keep_weekly),
        ("monthly", r.keep_monthly),
    ]
    .iter()
    .filter_map(|(k, v)| v.map(|n| format!("keep {k} {n}")))
    .collect();
    line("Retention", &if rules.is_empty() { "<none> (each Backup's ttl)".into() } else { rules.join(", ") });
    line("Last backup", or_dash(st.last_backup.as_deref()));
    line("Next run", or_dash(st.next_run.as_deref()));
    line("Last skipped", or_dash(st.last_skipped.as_deref()));
    out.push_str(&format!("\nBackups ({}):\n", backups.len()));
    let mut rows = vec![["  NAME", "PHASE", "STARTED", "EXPIRES"].map(String::from)];
    for b in backups {
        let bs = b.status.clone().unwrap_or_default();
        let phase = match b.metadata.deletion_timestamp {
            Some(_) => "Deleting".to_string(),
            None => or_dash(bs.phase.as_deref()).to_string(),
        };
        rows.push([
            format!("  {}", b.name_any()),
            phase,
            or_dash(bs.start_timestamp.as_deref()).to_string(),
            or_dash(bs.expiration.as_deref()).to_string(),
        ]);
    }
    if !backups.is_empty() {
        out.push_str(&table(&rows));
    }
    out
}

fn set_paused(a: PauseArgs, paused: bool) -> Result<ExitCode> {
    let rt = runtime()?;
    let (client, server) = client(&a.target, &rt)?;
    let ns = &a.target.namespace;
    let api: Api<Schedule> = Api::namespaced(client, ns);
    let names = if a.all {
        let what = format!("listing schedules in {ns}");
        rt.block_on(api.list(&ListParams::default()))
            .map_err(api_err(what, &server))?
            .items
            .iter()
            .map(|s| s.name_any())
            .collect()
    } else {
        a.names.clone()
    };
    let verb = if paused { "paused" } else { "unpaused" };
    let mut missing = Vec::new();
    for name in &names {
        let body = serde_json::json!({"spec": {"paused": paused}});
        let what = format!("{} schedule {ns}/{name}", if paused { "pausing" } else { "unpausing" });
        match rt.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&body))) {
            Ok(_) => eprintln!("schedule {ns}/{name} {verb}"),
            Err(kube::Error::Api(e)) if e.code == 404 => missing.push(name.clone()),
            Err(e) => return Err(api_err(what, &server)(e)),
        }
    }
    if !missing.is_empty() {
        return Err(usage(format!("schedule not found in {ns}: {}", missing.join(", "))));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn selectors_become_match_labels_and_expressions() {
        let s = label_selector("app=db, tier in (a,b),zone notin (x),env!=dev,canary,!legacy").unwrap();
        assert_eq!(s.match_labels, BTreeMap::from([("app".to_string(), "db".to_string())]));
        let ops: Vec<(&str, &str, Vec<String>)> =
            s.match_expressions.iter().map(|r| (r.key.as_str(), r.operator.as_str(), r.values.clone())).collect();
        assert_eq!(
            ops,
            vec![
                ("tier", "In", vec!["a".to_string(), "b".to_string()]),
                ("zone", "NotIn", vec!["x".to_string()]),
                ("env", "NotIn", vec!["dev".to_string()]),
                ("canary", "Exists", vec![]),
                ("legacy", "DoesNotExist", vec![]),
            ]
        );
        assert!(label_selector("tier in (a").is_err());
    }
}
