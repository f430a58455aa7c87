//! `blockwise restore create|resume|describe|get|logs`, in Velero's vocabulary. What a restore
//! is — its log, its plan, its creates — is `blockwise_adapters::restore`; this parses and prints.
//!
//! Exit codes as for backups: 0 Completed, 3 PartiallyFailed, 1 Failed (or the run stopped:
//! `restore resume` continues it), 2 usage or input error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use blockwise_adapters::report;
use blockwise_adapters::restore::{
    ArchiveSource, RestoreFiles, RestoreObserver, RestoreRunError, RestoreSession, RestoreStatus,
};
use blockwise_adapters::session::{ClusterSource, DataDir, SessionError};
use blockwise_adapters::world::{Runtime, TokioRuntime};
use blockwise_engine::ports::Cluster;
use blockwise_engine::restore_run::{
    parse_namespace_mappings, ExistingPolicy, RestoreEvent, RestorePhase, RestoreSpec, RestoreState,
};
use clap::{Args, Subcommand};

use crate::cli::{emit, runtime, session_err, storage_from_args, usage, FilterArgs, StorageArgs};

#[derive(Subcommand, Debug)]
pub enum RestoreCommand {
    /// Restore a backup (or any Velero archive file) into a cluster.
    Create(Box<CreateArgs>),
    /// Continue an interrupted restore from its log.
    Resume(NameArgs),
    /// Show a restore's phase, counts per resource, skips, warnings and errors.
    Describe(DescribeArgs),
    /// List restores.
    Get,
    /// Print a restore's event history.
    Logs(NameArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Restore name (lower-case letters, digits, '-').
    name: String,
    /// The backup to restore: one of this data directory's, or (with --storage) one in that store.
    #[arg(long, conflicts_with = "from_file", required_unless_present = "from_file")]
    from_backup: Option<String>,
    /// A Velero archive file (NAME.tar.gz) to restore instead of a backup.
    #[arg(long)]
    from_file: Option<PathBuf>,
    // Which objects of the archive to restore.
    #[command(flatten)]
    filter: FilterArgs,
    /// Namespace mappings, OLD:NEW (comma-separated).
    #[arg(long)]
    namespace_mappings: Option<String>,
    /// What to do with objects that exist: none (leave them, with a warning) or update.
    #[arg(long, default_value = "none")]
    existing_resource_policy: String,
    /// Provision claims from their CSI snapshots (pre-provisioned VolumeSnapshotContent from the
    /// recorded handle, a VolumeSnapshot, the claim's dataSource) instead of restoring their
    /// PersistentVolumes as archived.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    restore_volumes: Option<bool>,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: u32,
    /// Kubeconfig of the target cluster (also KUBECONFIG, ~/.kube/config; in a pod, its service
    /// account). `blockwise simulator serve --empty` serves an empty one.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: its current-context).
    #[arg(long)]
    context: Option<String>,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// Restore name.
    name: String,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// Restore name.
    name: String,
    /// Output format: text or json.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// Runs one `restore` command.
pub fn run(command: RestoreCommand, data: &DataDir) -> Result<ExitCode> {
    match command {
        RestoreCommand::Create(a) => create(*a, data),
        RestoreCommand::Resume(a) => resume(a, data),
        RestoreCommand::Describe(a) => describe(a, data),
        RestoreCommand::Get => get(data),
        RestoreCommand::Logs(a) => logs(a, data),
    }
}

fn phase_exit(phase: RestorePhase) -> ExitCode {
    match phase {
        RestorePhase::Completed => ExitCode::SUCCESS,
        RestorePhase::PartiallyFailed => ExitCode::from(3),
        RestorePhase::Failed | RestorePhase::InProgress => ExitCode::from(1),
    }
}

/// The target cluster: a kubeconfig, never the demo (a restore into a cluster that vanishes with
/// the process would show nothing).
fn target(kubeconfig: Option<PathBuf>, context: Option<String>) -> Result<ClusterSource> {
    if let Some(k) = kubeconfig {
        let abs = std::path::absolute(&k).with_context(|| format!("resolving kubeconfig path {}", k.display()))?;
        return Ok(ClusterSource::Kube { kubeconfig: Some(abs), context });
    }
    let env = std::env::var_os("KUBECONFIG").is_some_and(|k| !k.is_empty());
    let home = std::env::var_os("HOME").is_some_and(|h| std::path::Path::new(&h).join(".kube/config").exists());
    if env || home || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Ok(ClusterSource::Kube { kubeconfig: None, context });
    }
    Err(usage(
        "a restore needs a target cluster: --kubeconfig, KUBECONFIG or ~/.kube/config \
         (`blockwise simulator serve --empty` serves an empty cluster and prints its kubeconfig)",
    ))
}

fn connect(source: &ClusterSource, rt: &tokio::runtime::Runtime) -> Result<Arc<dyn Cluster>> {
    let ClusterSource::Kube { kubeconfig, context } = source else {
        return Err(anyhow!("a restore's cluster is a kubeconfig's, not the demo"));
    };
    let cluster = rt
        .block_on(blockwise_adapters::kube::KubeCluster::connect(kubeconfig.as_deref(), context.as_deref()))
        .map_err(|e| usage(e.to_string()))?;
    let version = rt.block_on(cluster.check_reachable()).map_err(|e| {
        anyhow!("cannot reach the Kubernetes API server {} (context {}): {e}", cluster.server(), cluster.context())
    })?;
    eprintln!("cluster {} (context {}, {version})", cluster.server(), cluster.context());
    Ok(Arc::new(cluster))
}

fn create(a: CreateArgs, data: &DataDir) -> Result<ExitCode> {
    let archive = match (&a.from_backup, &a.from_file) {
        (Some(b), _) => {
            let storage = if data.log_dir(b).exists() && a.storage.storage.is_none() {
                data.storage(b).map_err(session_err)?
            } else if a.storage.storage.is_some() {
                storage_from_args(&a.storage)?
            } else {
                return Err(usage(format!(
                    "backup {b:?} is not in {} (pass --storage to restore one from another store)",
                    data.root().display()
                )));
            };
            ArchiveSource::Backup { name: b.clone(), storage }
        }
        (None, Some(f)) => {
            if !f.is_file() {
                return Err(usage(format!("--from-file {}: no such archive file", f.display())));
            }
            let path = std::path::absolute(f).with_context(|| format!("resolving {}", f.display()))?;
            ArchiveSource::File { path }
        }
        (None, None) => return Err(usage("--from-backup or --from-file is required")),
    };
    let backup_name = match &archive {
        ArchiveSource::Backup { name, .. } => name.clone(),
        ArchiveSource::File { path } => path
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.strip_suffix(".tar.gz").unwrap_or(n).to_string())
            .unwrap_or_else(|| "archive".into()),
    };
    let mut spec = RestoreSpec::new(&a.name, &backup_name);
    spec.included_namespaces = a.filter.include_namespaces;
    spec.excluded_namespaces = a.filter.exclude_namespaces;
    spec.included_resources = a.filter.include_resources;
    spec.excluded_resources = a.filter.exclude_resources;
    if let Some(m) = &a.namespace_mappings {
        spec.namespace_mapping =
            parse_namespace_mappings(m).map_err(|e| usage(format!("--namespace-mappings: {e}")))?;
    }
    spec.existing_resource_policy = ExistingPolicy::parse(&a.existing_resource_policy)
        .map_err(|e| usage(format!("--existing-resource-policy: {e}")))?;
    spec.restore_volumes = a.restore_volumes.unwrap_or(false);
    spec.label_selector = a.filter.selector;
    spec.validate().map_err(|e| usage(e.to_string()))?;
    let cluster_source = target(a.kubeconfig, a.context)?;
    let rt = runtime()?;
    // Connect before anything is written: a bad kubeconfig leaves no restore behind.
    let cluster = connect(&cluster_source, &rt)?;
    let files = RestoreFiles { archive, cluster: cluster_source, uid: None };
    let session =
        RestoreSession::create(data, spec, files, a.workers, TokioRuntime.now_ms()).map_err(restore_session_err)?;
    run_session(session, cluster, &rt)
}

fn restore_session_err(e: SessionError) -> anyhow::Error {
    match e {
        SessionError::Restore { .. } | SessionError::Spec(_) => usage(e.to_string()),
        e => session_err(e),
    }
}

/// Progress lines on stdout, one per group commit that changed the count (best effort: a closed
/// stdout does not stop the restore); `restore describe` shows the rest.
struct Progress {
    last: usize,
    intents: usize,
}

impl RestoreObserver for Progress {
    fn event(&mut self, event: &RestoreEvent, s: &RestoreState) {
        if let RestoreEvent::Planned { items, skipped, .. } = event {
            let _ = writeln!(std::io::stdout().lock(), "planned {items} objects, {} skipped", skipped.len());
        }
        let _ = s;
    }

    fn committed(&mut self, s: &RestoreState) {
        if s.intents.len() != self.intents {
            // The intents are durable: these creates are about to be sent.
            let sending = s.intents.len() - self.intents;
            self.intents = s.intents.len();
            let noun = if sending == 1 { "object" } else { "objects" };
            let _ = writeln!(std::io::stdout().lock(), "creating {sending} {noun}");
        }
        if s.done.len() != self.last {
            self.last = s.done.len();
            let _ = writeln!(std::io::stdout().lock(), "restored {}/{}", s.done.len(), s.items);
        }
    }
}

fn run_session(session: RestoreSession, cluster: Arc<dyn Cluster>, rt: &tokio::runtime::Runtime) -> Result<ExitCode> {
    let name = session.state().spec.name.clone();
    let mut progress = Progress { last: session.state().done.len(), intents: session.state().intents.len() };
    let result = rt.block_on(session.run(cluster, &mut progress));
    report_end(&name, result)
}

fn report_end(name: &str, result: Result<RestoreState, RestoreRunError>) -> Result<ExitCode> {
    let state = result.map_err(|e| {
        anyhow::Error::new(e)
            .context(format!("restore {name} stopped; run `blockwise restore resume {name}` once the cause is fixed"))
    })?;
    let created: u32 = state.by_resource.values().map(|c| c.created).sum();
    let existed: u32 = state.by_resource.values().map(|c| c.existed).sum();
    eprintln!(
        "restore {name} {}: {created} created, {existed} existed, {} skipped, {} warnings, {} errors",
        state.phase(),
        state.skipped.len(),
        state.warnings.len(),
        state.errors.len()
    );
    // Why a failed restore failed, here and not only in `describe` (issue 22: "1 errors" alone).
    if let Some(why) = &state.failure {
        eprintln!("failed: {why}");
    }
    if !state.errors.is_empty() || !state.warnings.is_empty() {
        eprintln!("run `blockwise restore describe {name}` for details");
    }
    Ok(phase_exit(state.phase()))
}

fn resume(a: NameArgs, data: &DataDir) -> Result<ExitCode> {
    let session = RestoreSession::open(data, &a.name).map_err(session_err)?;
    if let Some((seq, reason)) = &session.open_report().cut_tail {
        eprintln!("log of restore {}: cut a torn tail at record {seq} ({reason})", a.name);
    }
    if session.state().finished_ms.is_some() {
        eprintln!("restore {} already finished: {}", a.name, session.state().phase());
        return Ok(phase_exit(session.state().phase()));
    }
    let rt = runtime()?;
    let cluster = connect(&session.files().cluster.clone(), &rt)?;
    run_session(session, cluster, &rt)
}

fn describe(a: DescribeArgs, data: &DataDir) -> Result<ExitCode> {
    let (view, live) = match data.restore_status(&a.name).map_err(session_err)? {
        RestoreStatus::Log { state, .. } => (report::restore_json(&state), false),
        RestoreStatus::Live { view } => (view, true),
    };
    if a.output == "json" {
        let mut doc = view;
        doc["live"] = serde_json::json!(live);
        emit(&format!("{}\n", serde_json::to_string_pretty(&doc).context("encoding JSON")?))?;
    } else {
        emit(&report::restore_text(&view))?;
        if live {
            emit("(live view: the restore is running in another process; this is its last published status)\n")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn get(data: &DataDir) -> Result<ExitCode> {
    let mut out = format!(
        "{:<32} {:<24} {:<16} {:>8} {:>8} {:>11} STARTED\n",
        "NAME", "BACKUP", "STATUS", "ERRORS", "WARNINGS", "ITEMS"
    );
    for name in data.restore_names().map_err(session_err)? {
        let view = match data.restore_status(&name) {
            Ok(RestoreStatus::Log { state, .. }) => report::restore_json(&state),
            Ok(RestoreStatus::Live { view }) => view,
            Err(SessionError::NotFound { .. }) => continue,
            Err(e) => {
                let damaged = matches!(e, SessionError::Log(blockwise_adapters::log::LogError::Damaged { .. }));
                let label = if damaged { "Damaged" } else { "Unreadable" };
                out.push_str(&format!("{name:<32} {:<24} {label:<16} {e}\n", ""));
                continue;
            }
        };
        let p = &view["progress"];
        out.push_str(&format!(
            "{:<32} {:<24} {:<16} {:>8} {:>8} {:>11} {}\n",
            name,
            view["backupName"].as_str().unwrap_or("?"),
            view["phase"].as_str().unwrap_or("?"),
            view["errors"].as_u64().unwrap_or(0),
            view["warnings"].as_u64().unwrap_or(0),
            format!("{}/{}", p["itemsRestored"], p["totalItems"]),
            view["startTimestamp"].as_str().unwrap_or("?")
        ));
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn logs(a: NameArgs, data: &DataDir) -> Result<ExitCode> {
    // One event at a time from the log (a restore of many items has as many events).
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut closed, mut failed) = (false, None);
    let read = data.for_each_restore_event(&a.name, |seq, e| {
        if closed || failed.is_some() {
            return;
        }
        match writeln!(out, "{}", report::restore_event_line(seq, e)) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => closed = true,
            Err(e) => failed = Some(e),
            Ok(()) => {}
        }
    });
    match read {
        Err(SessionError::Log(blockwise_adapters::log::LogError::InUse(_))) => {
            return Err(anyhow!("restore {} is running in another process; its log can be read once it ends", a.name))
        }
        r => r.map_err(session_err)?,
    }
    if let Some(e) = failed {
        return Err(e).context("writing to stdout");
    }
    if closed {
        return Ok(ExitCode::SUCCESS);
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}
