//! The `blockwise` command line, in Velero's vocabulary (`backup create|resume|describe|get|logs`,
//! `restore create|resume|describe|get|logs` in `restore_cmd.rs`).
//!
//! This module parses arguments and prints; everything a backup *is* — the data directory's
//! layout, crash-atomic creation, resume, the live view of a running backup — is the adapters'
//! session API ([`blockwise_adapters::session`]), which the in-cluster controller uses too.
//!
//! Exit codes a script can rely on: 0 Completed, 3 PartiallyFailed, 1 Failed (or the run could not
//! go on), 2 usage or input error (bad flag, bad name, a bad kubeconfig or context, a backup that
//! already exists). With a kubeconfig (`--kubeconfig`, `KUBECONFIG`, `~/.kube/config`) or inside a
//! pod, the cluster is reached through kube-rs; with none, or with `--demo`, the built-in demo
//! cluster from `blockwise-simulator` is backed up in memory, and the choice is announced on
//! stderr. `simulator serve` serves the demo cluster over the Kubernetes HTTP API. Output to a
//! closed pipe (`blockwise backup logs NAME | head`) ends the command quietly.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use blockwise_adapters::driver::{Observer, RunError};
use blockwise_adapters::kube::KubeCluster;
use blockwise_adapters::log::LogError;
use blockwise_adapters::report;
use blockwise_adapters::s3::S3Location;
use blockwise_adapters::session::{
    ClusterSource, CreateRequest, DataDir, LiveStatus, Session, SessionError, Status, StorageSpec,
};
use blockwise_adapters::store::Store;
use blockwise_adapters::world::TokioRuntime;
use blockwise_engine::event::{Event, Phase};
use blockwise_engine::ports::Cluster;
use blockwise_engine::snapshot::BackupOptions;
use blockwise_engine::spec::{parse_ordered_resources, validate_backup_name, BackupSpec, DEFAULT_VOLUME_GROUP_LABEL};
use blockwise_engine::state::BackupState;
use blockwise_simulator::demo;
use clap::{Args, Parser, Subcommand};

/// Exit code for usage and input errors.
pub const EXIT_USAGE: u8 = 2;
/// List page size used by `resume` (the page size is not part of a backup's record).
pub const RESUME_PAGE_SIZE: u32 = 500;

#[derive(Parser, Debug)]
#[command(
    name = "blockwise",
    version,
    about = "Kubernetes backups in ItemBlocks, with hooks, parallel workers and resume"
)]
struct Cli {
    #[command(flatten)]
    data: DataDirArgs,
    /// The longest one request to the Kubernetes API server (a connect, a list page, a get, a
    /// write, the answer to a watch or an exec) may go unanswered before it is retried or given up,
    /// e.g. 30s or 5s (kubectl's flag; hooks are bounded by their own timeout)
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    request_timeout: u64,
    /// The memory this process may use, e.g. 256Mi or 1Gi (default: its memory cgroup's limit,
    /// as in a pod with resources.limits.memory); caches and work in flight are sized under it.
    /// For `install`: the controller pod's memory limit (default 2Gi)
    #[arg(long, value_parser = blockwise_adapters::memory::parse_quantity, global = true)]
    memory_limit: Option<u64>,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    /// Create, resume and inspect backups.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Restore backups into a cluster, resume and inspect restores.
    Restore {
        #[command(subcommand)]
        command: crate::restore_cmd::RestoreCommand,
    },
    /// Cron Schedules of Backups for the in-cluster controller (`blockwise serve`).
    Schedule {
        #[command(subcommand)]
        command: crate::schedule_cmd::ScheduleCommand,
    },
    /// Run the deterministic simulator: seeds, faults, invariants, shrinking.
    Simulate(SimulateArgs),
    /// Measure: scale, parallel efficiency, event log, recovery, grouping, simulator.
    Bench(BenchArgs),
    /// Run the in-cluster controller of backups.blockwise.dev Backups.
    Serve(Box<crate::service::ServeArgs>),
    /// Print the manifests that install the controller (CRD, RBAC, Deployment, …).
    Install(crate::service::InstallArgs),
    /// The simulator's fake Kubernetes API server.
    Simulator {
        #[command(subcommand)]
        command: SimulatorCommand,
    },
}

#[derive(Subcommand, Debug)]
enum SimulatorCommand {
    /// Serve the demo cluster (or, with `--empty`, a cluster with no objects) over the Kubernetes
    /// HTTP API on 127.0.0.1 until interrupted.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[command(flatten)]
    demo: DemoArgs,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Record every exec the server runs here, one JSON line each, at its start (tests read it to
    /// check that no pod was left frozen).
    #[arg(long)]
    exec_log: Option<PathBuf>,
    /// Also print every exec on stdout (`exec <JSON>`) as it starts.
    #[arg(long)]
    print_execs: bool,
    /// Keep the demo cluster's state (objects created or changed, snapshots) in this file, loaded
    /// at start: a server killed and started again with it serves the same cluster.
    #[arg(long, conflicts_with = "empty")]
    state: Option<PathBuf>,
    /// Serve a cluster with the demo's resource types and no objects (a restore target) instead
    /// of the demo cluster.
    #[arg(long, conflicts_with_all = ["demo_objects", "demo_faults"])]
    empty: bool,
}

fn serve(a: ServeArgs) -> Result<ExitCode> {
    use blockwise_simulator::server::FakeApiServer;
    let rt = runtime()?;
    rt.block_on(async {
        let d = &a.demo;
        let cluster = match (&a.state, a.empty) {
            (_, true) => demo::empty_cluster(),
            (Some(state), false) => {
                demo::demo_cluster_at(d.demo_objects, demo::DEMO_SEED, d.demo_faults, d.demo_latency_ms, state)
                    .with_context(|| format!("loading the demo cluster's state {}", state.display()))?
            }
            (None, false) => demo::demo_cluster_with(d.demo_objects, demo::DEMO_SEED, d.demo_faults),
        };
        let cluster = cluster
            .with_latency(blockwise_simulator::fake::Latency { api_ms: d.demo_latency_ms, exec_ms: d.demo_latency_ms })
            .with_clock(Arc::new(TokioRuntime))
            .with_csi(demo::demo_csi(d.demo_latency_ms));
        let cluster = match &a.exec_log {
            Some(path) => cluster.with_exec_log(path),
            None => cluster,
        };
        let cluster = if a.print_execs { cluster.with_exec_echo() } else { cluster };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], a.port));
        let server = FakeApiServer::start(Arc::new(cluster), addr)
            .await
            .with_context(|| format!("binding the fake API server to {addr}"))?;
        if let Some(path) = &a.kubeconfig_out {
            server.write_kubeconfig(path).with_context(|| format!("writing kubeconfig {}", path.display()))?;
            println!("kubeconfig: {}", path.display());
        }
        if a.empty {
            println!("serving an empty cluster at {}", server.url());
        } else {
            println!("serving the demo cluster ({} objects) at {}", d.demo_objects, server.url());
        }
        println!("press Ctrl-C to stop");
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
        drop(server);
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Small sizes (a smoke test); every key is still reported.
    #[arg(long)]
    quick: bool,
    /// Output format: text or json.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    /// Scratch directory (default: a fresh one under the system temp dir, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only these sections (comma-separated): scale-http, memory, resume, restore,
    /// back-to-back, scale, efficiency, log, recovery (needs scale), grouping, simulator.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Objects in the scale rows (scale-http, resume, restore, back-to-back, scale) instead of the
    /// default.
    #[arg(long)]
    objects: Option<usize>,
    /// Blocks backed up in parallel in the scale rows (as `backup create --workers`). 64: the
    /// demo cluster's 300k objects have 20k volumes, and a block with volumes mostly waits for
    /// its CSI cuts (docs/benchmarks.md).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: u32,
}

#[derive(Args, Debug)]
struct SimulateArgs {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Faults: all, none, or a comma-separated list (crash,torn-record,hook-hang,...).
    #[arg(long, default_value = "all")]
    faults: String,
    /// Run each seed twice and name the first step where the traces diverge.
    #[arg(long)]
    check_determinism: bool,
    /// Output format: text or json.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

fn simulate(a: SimulateArgs) -> Result<ExitCode> {
    let faults = crate::simulate::parse_faults(&a.faults).map_err(usage)?;
    let ok = crate::simulate::run(a.seed, a.seeds, &faults, a.check_determinism, a.output == "json")?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[derive(Subcommand, Debug)]
enum BackupCommand {
    /// Back up a cluster (the built-in demo cluster when no kubeconfig is found).
    Create(Box<CreateArgs>),
    /// Continue an interrupted backup from its log.
    Resume(ResumeArgs),
    /// Show a backup's phase, progress, hook results, warnings and errors.
    Describe(DescribeArgs),
    /// List backups.
    Get,
    /// Print a backup's event history.
    Logs(NamedArgs),
    /// Copy a backup's archive out of its store.
    Download(DownloadArgs),
    /// List an archive's items by resource and namespace and verify it (exit 1 on any defect).
    Inspect(InspectArgs),
    /// Delete a backup: the storage snapshots it holds (through the cluster it was taken from),
    /// its store files (archive, companion files, staged items) and its log, the path the
    /// controller's garbage collector takes. A deletion that failed is finished by running it again.
    Delete(DeleteArgs),
}

#[derive(Args, Debug)]
struct DeleteArgs {
    /// Backup name.
    name: String,
    /// Delete without asking (required: there is no prompt).
    #[arg(long)]
    confirm: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// Where the backup goes: a local directory (default: <data-dir>/store) or s3://BUCKET/PREFIX.
    #[arg(long)]
    pub storage: Option<String>,
    /// S3 endpoint URL, for S3-compatible stores (MinIO, Ceph, …); default AWS.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Allow a plain-HTTP (unencrypted) S3 endpoint.
    #[arg(long)]
    pub s3_allow_http: bool,
}

#[derive(Args, Debug)]
struct DownloadArgs {
    /// Backup name.
    name: String,
    /// Where to write the archive (default: ./NAME.tar.gz).
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// An archive file (…/NAME.tar.gz), or the name of a backup to read from its store.
    target: String,
}

#[derive(Args, Debug, Clone)]
struct DataDirArgs {
    /// Where logs and the local store live.
    #[arg(long, default_value = "blockwise-data", global = true)]
    data_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct ClusterArgs {
    /// Kubeconfig to use (also KUBECONFIG, ~/.kube/config; in a pod, its service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: its current-context).
    #[arg(long)]
    context: Option<String>,
    /// Back up the built-in demo cluster even if a kubeconfig exists.
    #[arg(long)]
    demo: bool,
    #[command(flatten)]
    shape: DemoArgs,
}

/// Which objects: Velero's filter flags, shared by `backup create`, `restore create` and
/// `schedule create`.
#[derive(Args, Debug, Clone)]
pub struct FilterArgs {
    /// Namespaces to include (comma-separated, '*' globs); default all.
    #[arg(long, value_delimiter = ',')]
    pub include_namespaces: Vec<String>,
    /// Namespaces to exclude.
    #[arg(long, value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,
    /// Resources to include (plural, plural.group or kind); default all.
    #[arg(long, value_delimiter = ',')]
    pub include_resources: Vec<String>,
    /// Resources to exclude.
    #[arg(long, value_delimiter = ',')]
    pub exclude_resources: Vec<String>,
    /// Label selector, e.g. 'app=db,tier in (a,b)'.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
}

/// The built-in demo cluster's shape (`backup create` and `simulator serve`).
#[derive(Args, Debug, Clone)]
struct DemoArgs {
    /// Objects in the demo cluster.
    #[arg(long, default_value_t = blockwise_simulator::demo::DEMO_OBJECTS_DEFAULT)]
    demo_objects: usize,
    /// Simulated latency of each demo API call and hook exec, in milliseconds.
    #[arg(long, default_value_t = 0)]
    demo_latency_ms: u64,
    /// Include the demo's deliberate faults: a pod whose Fail-mode pre-hook fails, so its block is
    /// not written and the backup ends PartiallyFailed (exit 3).
    #[arg(long)]
    demo_faults: bool,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Backup name (lower-case letters, digits, '-').
    name: String,
    /// Blocks backed up in parallel.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: u32,
    #[command(flatten)]
    filter: FilterArgs,
    /// Include cluster-scoped resources (unset: only when all namespaces are included).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    include_cluster_resources: Option<bool>,
    /// Ordered resources: 'pods=ns/a,ns/b;persistentvolumes=pv1'.
    #[arg(long)]
    ordered_resources: Option<String>,
    /// PVC label whose value forms a volume group.
    #[arg(long, default_value = DEFAULT_VOLUME_GROUP_LABEL)]
    volume_group_label: String,
    /// JSON file with Velero's spec.hooks.resources[] array.
    #[arg(long)]
    hooks_file: Option<PathBuf>,
    /// Objects per list page.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    page_size: u32,
    /// Take CSI volume snapshots of the backup's claims inside their blocks' hook windows
    /// (Velero's --snapshot-volumes); false backs up manifests only.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    snapshot_volumes: Option<bool>,
    /// How long to wait for a CSI snapshot to be cut (its handle set), e.g. 10m or 90s.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    csi_snapshot_timeout: u64,
    /// How long a cut snapshot may take to become ready to use, e.g. 4h.
    #[arg(long, default_value = "4h", value_parser = parse_duration)]
    item_operation_timeout: u64,
    /// Backup annotations, key=value (comma-separated); e.g.
    /// velero.io/csi-volumesnapshot-class_<driver>=<class> picks a snapshot class per driver.
    #[arg(long, value_delimiter = ',')]
    annotations: Vec<String>,
    /// The backup's uid (labels and names its snapshots); default a new one. The in-cluster
    /// controller passes the Backup object's uid; tests pass one to compare two runs' archives.
    #[arg(long)]
    uid: Option<String>,
    /// Wait for the backup to finish (always the case: the backup runs in this process).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Args, Debug)]
struct ResumeArgs {
    /// Backup name.
    name: String,
    /// Blocks backed up in parallel (default: as created).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: Option<u32>,
    /// Override the demo cluster's simulated latency.
    #[arg(long)]
    demo_latency_ms: Option<u64>,
}

#[derive(Args, Debug)]
struct DescribeArgs {
    /// Backup name.
    name: String,
    /// Output format: text or json.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    /// List each claim's volume snapshot (name, content, handle, readiness), as Velero's
    /// `--details`. It folds the whole log (memory grows with the backup); without it, `describe`
    /// reads a summary in memory that does not, and counts the snapshots.
    #[arg(long)]
    details: bool,
}

#[derive(Args, Debug)]
struct NamedArgs {
    /// Backup name.
    name: String,
}

/// A Go-style duration (`10m`, `90s`, `1h30m`, `500ms`) in milliseconds, for clap.
pub fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    match blockwise_engine::hooks::parse_go_duration_ms(s) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(format!("{s:?} is not a positive duration (e.g. 10m, 90s, 1h30m)")),
    }
}

/// A `--uid`: a label value (at most 63 letters, digits, '-', '_', '.'), or empty for a new one.
fn parse_uid(uid: Option<&str>) -> Result<String> {
    let Some(u) = uid else { return Ok(String::new()) };
    let ok = !u.is_empty()
        && u.len() <= 63
        && u.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && u.starts_with(|c: char| c.is_ascii_alphanumeric())
        && u.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(u.to_string())
    } else {
        Err(usage(format!(
            "--uid {u:?}: expected 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )))
    }
}

/// `key=value` backup annotations.
fn parse_annotations(pairs: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for p in pairs.iter().filter(|p| !p.trim().is_empty()) {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| usage(format!("--annotations {p:?}: expected key=value")))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

pub fn storage_from_args(a: &StorageArgs) -> Result<StorageSpec> {
    let s3_flags = a.s3_endpoint.is_some() || a.s3_region.is_some() || a.s3_allow_http;
    match a.storage.as_deref() {
        Some(url) if url.starts_with("s3://") => {
            let mut loc = S3Location::parse(url).map_err(|e| usage(e.to_string()))?;
            if let Some(e) = &a.s3_endpoint {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(usage(format!("--s3-endpoint {e:?}: expected an http:// or https:// URL")));
                }
                if e.starts_with("http://") && !a.s3_allow_http {
                    return Err(usage(format!(
                        "--s3-endpoint {e} is plain HTTP: pass --s3-allow-http to send data unencrypted"
                    )));
                }
            }
            loc.endpoint = a.s3_endpoint.clone();
            loc.region = a.s3_region.clone();
            loc.allow_http = a.s3_allow_http;
            Ok(StorageSpec::S3(loc))
        }
        _ if s3_flags => Err(usage("--s3-endpoint, --s3-region and --s3-allow-http need --storage s3://BUCKET/PREFIX")),
        None => Ok(StorageSpec::Local { root: None }),
        Some(other) if other.contains("://") => {
            Err(usage(format!("--storage {other:?}: expected a local directory or s3://BUCKET/PREFIX")))
        }
        Some("") => Err(usage("--storage \"\": expected a local directory or s3://BUCKET/PREFIX, not an empty path")),
        Some(dir) => {
            let root = std::path::absolute(dir).map_err(|e| usage(format!("--storage {dir:?}: {e}")))?;
            Ok(StorageSpec::Local { root: Some(root) })
        }
    }
}

/// A session error as the CLI reports it: the user's input is exit 2.
pub fn session_err(e: SessionError) -> anyhow::Error {
    if e.is_usage() {
        usage(e.to_string())
    } else {
        anyhow::Error::new(e)
    }
}

/// Connects to a backup's cluster; for a real cluster, checks it answers before anything else.
fn build_cluster(
    source: &ClusterSource,
    data: &DataDir,
    name: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<Arc<dyn Cluster>> {
    match source {
        ClusterSource::Demo { objects, seed, latency_ms, faults } => {
            let state = data.demo_cluster_state(name);
            let fake = demo::demo_cluster_at(*objects, *seed, *faults, *latency_ms, &state)
                .with_context(|| format!("loading the demo cluster's state {}", state.display()))?
                .with_latency(blockwise_simulator::fake::Latency { api_ms: *latency_ms, exec_ms: *latency_ms })
                .with_clock(Arc::new(TokioRuntime))
                .with_exec_log(data.demo_exec_log(name));
            Ok(Arc::new(fake))
        }
        ClusterSource::Kube { kubeconfig, context } => {
            let cluster = rt
                .block_on(KubeCluster::connect(kubeconfig.as_deref(), context.as_deref()))
                .map_err(|e| usage(e.to_string()))?;
            let version = rt.block_on(cluster.check_reachable()).map_err(|e| {
                anyhow!(
                    "cannot reach the Kubernetes API server {} (context {}): {e}",
                    cluster.server(),
                    cluster.context()
                )
            })?;
            eprintln!("cluster {} (context {}, {version})", cluster.server(), cluster.context());
            Ok(Arc::new(cluster))
        }
    }
}

/// Where a kube-rs cluster comes from, if any: `Some((kubeconfig, context))` when `--kubeconfig`,
/// `KUBECONFIG`, `~/.kube/config` or an in-cluster service account is there; `None` means the demo.
fn kube_target(args: &ClusterArgs) -> Result<Option<(Option<PathBuf>, Option<String>)>> {
    if let Some(k) = &args.kubeconfig {
        let abs = std::path::absolute(k).with_context(|| format!("resolving kubeconfig path {}", k.display()))?;
        return Ok(Some((Some(abs), args.context.clone())));
    }
    let env = std::env::var_os("KUBECONFIG").is_some_and(|k| !k.is_empty());
    let home = std::env::var_os("HOME").is_some_and(|h| Path::new(&h).join(".kube").join("config").exists());
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if env || home || in_cluster {
        return Ok(Some((None, args.context.clone())));
    }
    if let Some(ctx) = &args.context {
        return Err(usage(format!("--context {ctx}: no kubeconfig found (--kubeconfig, KUBECONFIG, ~/.kube/config)")));
    }
    Ok(None)
}

/// Progress for people: an indicatif bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_reported: usize,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} blocks {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress { bar, last_reported: usize::MAX }
    }
}

impl Observer for Progress {
    fn event(&mut self, event: &Event, s: &BackupState) {
        let msg = match event {
            Event::ResourceListed { unit, complete: true, .. } => Some(format!("listed {unit}")),
            Event::PlanFinished { blocks, items } => Some(format!("planned {blocks} blocks, {items} items")),
            Event::BlockFinished { .. } => None,
            Event::BackupFinished { phase, .. } => Some(format!("backup {phase}")),
            _ => return,
        };
        let done = s.blocks_done();
        let total = s.blocks.len();
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            if let Some(m) = msg {
                bar.set_message(m);
            }
            return;
        }
        // Progress lines are best effort: a closed stdout must not stop the backup.
        let mut out = std::io::stdout().lock();
        if let Some(m) = msg {
            let _ = writeln!(out, "{m}");
        }
        if matches!(event, Event::BlockFinished { .. }) {
            let step = (total / 50).max(1);
            if done != self.last_reported && (done.is_multiple_of(step) || done == total) {
                self.last_reported = done;
                let _ = writeln!(out, "blocks {done}/{total} items {}/{}", s.items_done(), s.planned_items);
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn phase_exit(phase: Phase) -> ExitCode {
    match phase {
        Phase::Completed => ExitCode::SUCCESS,
        Phase::PartiallyFailed => ExitCode::from(3),
        Phase::Failed | Phase::InProgress => ExitCode::from(1),
    }
}

/// An error that is the user's input, not a failure of the backup: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

/// Prints to stdout; a closed pipe (`| head`) is not an error, the output just ends there.
pub fn emit(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// Runs an opened session to its end and reports, as `create` and `resume` do.
fn run_session(
    session: Session,
    cluster: Arc<dyn Cluster>,
    store: Arc<dyn Store>,
    (workers, page_size): (usize, u32),
    rt: &tokio::runtime::Runtime,
) -> Result<ExitCode> {
    let name = session.name().to_string();
    let budget = blockwise_adapters::memory::budget();
    if budget.limit.is_some() {
        eprintln!("{}", budget.describe());
    }
    let mut progress = Progress::new();
    let result = rt.block_on(session.run(cluster, store.clone(), workers, page_size, &mut progress));
    drop(progress);
    report_end(&name, result, store.as_ref())
}

/// The end of a run, for people and scripts: a summary on stderr and the exit code of the phase.
fn report_end(name: &str, result: Result<BackupState, RunError>, store: &dyn Store) -> Result<ExitCode> {
    let state = result.map_err(|e| match e {
        RunError::Files { file, source } => anyhow!(
            "backup {name} finished, but storing {file} in {} failed: {source}; run `blockwise backup resume {name}` to store it again",
            store.describe()
        ),
        e => anyhow::Error::new(e)
            .context(format!("backup {name} stopped; run `blockwise backup resume {name}` once the cause is fixed")),
    })?;
    let phase = state.phase();
    eprintln!(
        "backup {name} {phase}: {} items in {} blocks, {} warnings, {} errors",
        state.items_done(),
        state.blocks.len(),
        state.warnings.len(),
        state.errors.len()
    );
    if state.archive.is_some() {
        eprintln!("archive: {}", store.archive_location(name));
    }
    if !state.errors.is_empty() {
        eprintln!("run `blockwise backup describe {name}` for details");
    }
    Ok(phase_exit(phase))
}

fn create(a: CreateArgs, data: &DataDir) -> Result<ExitCode> {
    validate_backup_name(&a.name).map_err(|e| usage(e.to_string()))?;
    let mut spec = BackupSpec::new(&a.name);
    spec.included_namespaces = a.filter.include_namespaces;
    spec.excluded_namespaces = a.filter.exclude_namespaces;
    spec.included_resources = a.filter.include_resources;
    spec.excluded_resources = a.filter.exclude_resources;
    spec.include_cluster_resources = a.include_cluster_resources;
    spec.label_selector = a.filter.selector;
    spec.volume_group_label = a.volume_group_label;
    if let Some(o) = &a.ordered_resources {
        spec.ordered_resources = parse_ordered_resources(o).map_err(|e| usage(format!("--ordered-resources: {e}")))?;
    }
    if let Some(path) = &a.hooks_file {
        // The user's input: a path that is not a readable file is exit 2, naming it.
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("--hooks-file {}: cannot read it: {e}", path.display())))?;
        spec.hooks = blockwise_adapters::hookspec::parse_hooks_file(&text)
            .map_err(|e| usage(format!("hooks file {}: {e}", path.display())))?;
    }
    let target = if a.cluster.demo { None } else { kube_target(&a.cluster)? };
    let source = match target {
        Some((kubeconfig, context)) => ClusterSource::Kube { kubeconfig, context },
        None => {
            let d = &a.cluster.shape;
            let what = if d.demo_faults { "with its deliberate faults" } else { "no faults" };
            if a.cluster.demo {
                eprintln!("backing up the built-in demo cluster ({} objects, {what})", d.demo_objects);
            } else {
                eprintln!(
                    "no kubeconfig found: backing up the built-in demo cluster ({} objects, {what})",
                    d.demo_objects
                );
            }
            ClusterSource::Demo {
                objects: d.demo_objects,
                seed: demo::DEMO_SEED,
                latency_ms: d.demo_latency_ms,
                faults: d.demo_faults,
            }
        }
    };
    let storage = storage_from_args(&a.storage)?;
    data.probe_store(&storage).map_err(session_err)?;
    let store = data.open_store(&storage).map_err(session_err)?;
    let rt = runtime()?;
    // Connect before anything is written, so a bad kubeconfig or an unreachable server leaves no
    // backup behind.
    let cluster = build_cluster(&source, data, &a.name, &rt)?;
    let workers = a.workers as usize;
    let options = BackupOptions {
        snapshot_volumes: a.snapshot_volumes,
        csi_snapshot_timeout_ms: a.csi_snapshot_timeout,
        item_operation_timeout_ms: a.item_operation_timeout,
        annotations: parse_annotations(&a.annotations)?,
        uid: parse_uid(a.uid.as_deref())?,
    };
    let req = CreateRequest { spec, workers, options, source: source.clone(), storage };
    let session = Session::create(data, req).map_err(session_err)?;
    let code = run_session(session, cluster, store, (workers, a.page_size), &rt)?;
    if matches!(source, ClusterSource::Demo { faults: false, .. }) {
        let n = &a.name;
        eprintln!(
            "next: `blockwise backup describe {n}` (blocks, hooks), `blockwise backup inspect {n}` (the archive), \
             `--demo-faults` for a failing freeze hook, and the README's kill -9 + resume"
        );
    }
    Ok(code)
}

fn resume(a: ResumeArgs, data: &DataDir) -> Result<ExitCode> {
    let session = Session::open(data, &a.name).map_err(session_err)?;
    if let Some((seq, reason)) = &session.open_report().cut_tail {
        eprintln!("log of backup {}: cut a torn tail at record {seq} ({reason})", a.name);
    }
    // What is said before the run, read off the opened state (not a copy of it: at a million
    // objects the state is most of what a resumed process holds).
    let state = session.state();
    let (resumable, phase, stopped) = (state.resumable(), state.phase(), state.stopped.clone());
    let in_flight = state.blocks.held().filter(|(_, b)| b.in_flight()).count();
    let (done, blocks, recorded_workers) = (state.blocks_done(), state.blocks.len(), state.workers);
    let store = session.store().map_err(session_err)?;
    let mut source = session.source().map_err(session_err)?;
    if let (Some(l), ClusterSource::Demo { latency_ms, .. }) = (a.demo_latency_ms, &mut source) {
        *latency_ms = l;
    }
    let workers = a.workers.unwrap_or(recorded_workers.max(1)) as usize;
    let rt = runtime()?;
    if !resumable {
        eprintln!("backup {} already finished: {phase}; storing its files again", a.name);
        let result = rt.block_on(session.store_files(store.clone()));
        return report_end(&a.name, result, store.as_ref());
    }
    if let Some(reason) = &stopped {
        eprintln!("backup {} had stopped: {reason}", a.name);
    }
    eprintln!(
        "resuming backup {} at event {}: {done}/{blocks} blocks done, {in_flight} interrupted",
        a.name,
        session.events(),
    );
    let cluster = build_cluster(&source, data, &a.name, &rt)?;
    run_session(session, cluster, store, (workers, RESUME_PAGE_SIZE), &rt)
}

fn download(a: DownloadArgs, data: &DataDir) -> Result<ExitCode> {
    let phase = match data.summary_or_live(&a.name).map_err(session_err)? {
        Ok(summary) => summary.phase().to_string(),
        Err(live) => live.view["row"]["phase"].as_str().unwrap_or("InProgress").to_string(),
    };
    let store = data.open_store(&data.storage(&a.name).map_err(session_err)?).map_err(session_err)?;
    let dest = a.output.unwrap_or_else(|| PathBuf::from(format!("{}.tar.gz", a.name)));
    let file = format!("{}.tar.gz", a.name);
    let found = runtime()?
        .block_on(store.download_file(&a.name, &file, &dest))
        .with_context(|| format!("downloading {} to {}", store.archive_location(&a.name), dest.display()))?;
    if !found {
        return Err(anyhow!("backup {} has no archive in {} (phase {phase})", a.name, store.describe()));
    }
    eprintln!("downloaded {} to {}", store.archive_location(&a.name), dest.display());
    Ok(ExitCode::SUCCESS)
}

fn inspect(a: InspectArgs, data: &DataDir) -> Result<ExitCode> {
    let path = Path::new(&a.target);
    let is_file = path.is_file() || a.target.contains('/') || a.target.ends_with(".tar.gz");
    use blockwise_adapters::inspect::CsiFiles;
    // The CSI files of a backup, or none at all (a backup made before blockwise wrote them).
    let csi_of = |files: [Option<Vec<u8>>; 5]| files.iter().any(Option::is_some).then(|| CsiFiles::from_files(files));
    let (what, archive, list, csi) = if is_file {
        if !path.is_file() {
            return Err(usage(format!("{}: no such archive file", path.display())));
        }
        let archive = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // `NAME.tar.gz` may have `NAME-resource-list.json.gz` and the CSI files beside it, as in a store.
        let stem = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".tar.gz"));
        let beside = |file: String| -> Result<Option<Vec<u8>>> {
            let p = path.with_file_name(file);
            p.is_file().then(|| std::fs::read(&p).with_context(|| format!("reading {}", p.display()))).transpose()
        };
        let list = stem.map(|stem| beside(format!("{stem}-resource-list.json.gz"))).transpose()?.flatten();
        let mut files: [Option<Vec<u8>>; 5] = Default::default();
        if let Some(stem) = stem {
            for (slot, name) in files.iter_mut().zip(CsiFiles::names(stem)) {
                *slot = beside(name)?;
            }
        }
        (path.display().to_string(), archive, list, csi_of(files))
    } else {
        validate_backup_name(&a.target).map_err(|e| usage(e.to_string()))?;
        if !data.log_dir(&a.target).exists() {
            return Err(usage(format!("backup {:?} not found in {}", a.target, data.root().display())));
        }
        let store = data.open_store(&data.storage(&a.target).map_err(session_err)?).map_err(session_err)?;
        let rt = runtime()?;
        let name = &a.target;
        let archive = rt
            .block_on(store.get_file(name, &format!("{name}.tar.gz")))
            .with_context(|| format!("reading {}", store.archive_location(name)))?
            .ok_or_else(|| anyhow!("backup {name} has no archive in {}", store.describe()))?;
        let list = rt
            .block_on(store.get_file(name, &format!("{name}-resource-list.json.gz")))
            .with_context(|| format!("reading the resource list of backup {name}"))?;
        let mut files: [Option<Vec<u8>>; 5] = Default::default();
        for (slot, file) in files.iter_mut().zip(CsiFiles::names(name)) {
            *slot =
                rt.block_on(store.get_file(name, &file)).with_context(|| format!("reading {file} of backup {name}"))?;
        }
        (store.archive_location(name), archive, list, csi_of(files))
    };
    let found = blockwise_adapters::inspect::inspect_with(&archive, list.as_deref(), csi.as_ref());
    emit(&blockwise_adapters::inspect::render(&what, &found))?;
    if found.defects.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{what}: {} defects", found.defects.len());
        Ok(ExitCode::from(1))
    }
}

fn delete(a: DeleteArgs, data: &DataDir) -> Result<ExitCode> {
    if !a.confirm {
        return Err(usage(format!(
            "deleting backup {} removes its storage snapshots, archive and log: pass --confirm",
            a.name
        )));
    }
    // Only a backup that exists, and that no process is running (its log would be in use).
    let holds = match data.status(&a.name) {
        // A damaged log: its snapshots are looked for in its store's files and its cluster.
        Err(SessionError::Log(ref e @ LogError::Damaged { .. })) => {
            eprintln!("{e}: deleting it, its storage snapshots found without its log");
            usize::MAX
        }
        status => match status.map_err(session_err)? {
            Status::Log { state, .. } => state.retained_snapshots().len(),
            Status::Live(LiveStatus { unreadable: Some(why), .. }) => {
                return Err(anyhow!("backup {}: its log cannot be opened: {why}", a.name));
            }
            Status::Live(LiveStatus { view, .. }) => {
                return Err(usage(format!(
                    "backup {} is running in process {}; delete it once it has ended",
                    a.name, view["pid"]
                )))
            }
        },
    };
    let storage = data.storage(&a.name).map_err(session_err)?;
    let rt = runtime()?;
    // Its storage snapshots are deleted through the cluster it was taken from (connected only
    // when it holds some).
    let cluster = match holds {
        0 => None,
        _ => Some(build_cluster(&data.source(&a.name).map_err(session_err)?, data, &a.name, &rt)?),
    };
    let tokio_rt = TokioRuntime;
    let access = cluster.as_deref().map(|c| (c, &tokio_rt as &dyn blockwise_adapters::world::Runtime));
    let deleted = rt.block_on(data.delete(&a.name, access)).map_err(session_err)?;
    let store = data.open_store(&storage).map_err(session_err)?;
    for gone in &deleted.already_gone {
        eprintln!("storage snapshot {gone}: already gone");
    }
    eprintln!(
        "deleted backup {}: {} storage snapshots, its files in {} and its log",
        a.name,
        deleted.snapshots,
        store.describe()
    );
    Ok(ExitCode::SUCCESS)
}

/// The note printed under a live view.
fn live_note(view: &serde_json::Value, unreadable: Option<&str>) -> String {
    match unreadable {
        Some(why) => format!("(from the live view its last run kept: the log cannot be opened now: {why})\n"),
        None => {
            format!(
                "(live view: the backup is running in process {}; this is its last published status)\n",
                view["pid"]
            )
        }
    }
}

fn describe(a: DescribeArgs, data: &DataDir) -> Result<ExitCode> {
    let json = a.output == "json";
    // The summary unless each snapshot is asked for (the full fold); the live view of a running
    // backup either way (it keeps the summary).
    let status = if a.details {
        data.status(&a.name).map_err(session_err)?
    } else {
        match data.summary_or_live(&a.name).map_err(session_err)? {
            Ok(summary) => {
                let doc = report::summary_json(&summary);
                if json {
                    emit(&format!("{}\n", serde_json::to_string_pretty(&doc).context("encoding JSON")?))?;
                } else {
                    emit(&report::describe_text_of(&summary, &doc))?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            Err(live) => Status::Live(live),
        }
    };
    match status {
        Status::Log { state, .. } if json => emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report::describe_json(&state)).context("encoding JSON")?
        ))?,
        Status::Log { state, .. } => emit(&report::describe_text(&state))?,
        Status::Live(LiveStatus { view, .. }) if json => {
            let mut doc = view["describe"].clone();
            doc["live"] = serde_json::json!(true);
            emit(&format!("{}\n", serde_json::to_string_pretty(&doc).context("encoding JSON")?))?
        }
        Status::Live(LiveStatus { view, unreadable, .. }) => {
            emit(view["text"].as_str().unwrap_or_default())?;
            emit(&live_note(&view, unreadable.as_deref()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn get(data: &DataDir) -> Result<ExitCode> {
    let mut out = format!("{:<32} {:<16} {:>8} {:>8} {:>9} CREATED\n", "NAME", "STATUS", "ERRORS", "WARNINGS", "ITEMS");
    for name in data.names().map_err(session_err)? {
        // Each backup's summary: `get` of many large backups holds one summary at a time.
        match data.summary_or_live(&name) {
            Ok(Ok(s)) => out.push_str(&format!(
                "{:<32} {:<16} {:>8} {:>8} {:>9} {}\n",
                name,
                s.phase().to_string(),
                s.errors.len(),
                s.warnings.len(),
                format!("{}/{}", s.items_done, s.planned_items),
                report::rfc3339(s.requested_ms)
            )),
            Err(SessionError::Log(e @ LogError::Damaged { .. })) => {
                out.push_str(&format!("{name:<32} {:<16} {e}\n", "Damaged"))
            }
            Ok(Err(LiveStatus { view, unreadable, .. })) => {
                let r = &view["row"];
                let note =
                    if unreadable.is_some() { "(log unreadable here: last published status)" } else { "(running)" };
                out.push_str(&format!(
                    "{:<32} {:<16} {:>8} {:>8} {:>9} {} {note}\n",
                    name,
                    r["phase"].as_str().unwrap_or("?"),
                    r["errors"],
                    r["warnings"],
                    r["items"].as_str().unwrap_or("?"),
                    r["created"].as_str().unwrap_or("?")
                ));
            }
            // A directory whose creation was interrupted holds no backup.
            Err(SessionError::NotFound { .. }) => {}
            Err(e) => out.push_str(&format!("{name:<32} {:<16} {e}\n", "Unreadable")),
        }
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn logs(a: NamedArgs, data: &DataDir) -> Result<ExitCode> {
    // The log, streamed: one event at a time, never the whole log in memory.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut written: std::io::Result<()> = Ok(());
    let read = data.or_live(&a.name, || {
        data.each_event(&a.name, |seq, e| {
            if written.is_ok() {
                written = writeln!(out, "{}", report::event_line(seq, &e));
            }
        })
    });
    // Another process runs it (or the disk is full): the live view.
    if let Err(LiveStatus { view, events_log, unreadable }) = read.map_err(session_err)? {
        // Copied as it is read (a missing file: no durable event yet).
        let copied = match std::fs::File::open(&events_log) {
            Ok(f) => std::io::copy(&mut std::io::BufReader::new(f), &mut out).map(drop),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", events_log.display())),
        };
        written = copied.and_then(|()| out.flush());
        drop(out);
        if written.is_ok() {
            emit(&live_note(&view, unreadable.as_deref()))?;
        }
    } else {
        written = written.and_then(|()| out.flush());
    }
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Warnings and errors the library reports through `tracing` (a torn log record cut, a reconcile
/// that failed and is retried, a store request retried) go to stderr: at `warn` and above unless
/// `RUST_LOG` says otherwise (`debug`, `blockwise_adapters=debug,warn`: tracing's target syntax).
/// A `RUST_LOG` that does not parse is named and the default kept.
fn init_logging(rust_log: Option<&str>) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => Targets::new().with_default(LevelFilter::WARN),
        Some(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG {spec:?} is not a log filter ({e}); logging warnings");
            Targets::new().with_default(LevelFilter::WARN)
        }),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).without_time().with_target(false);
    let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    blockwise_adapters::memory::tune_malloc();
    init_logging(std::env::var("RUST_LOG").ok().as_deref());
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    blockwise_adapters::retry::set_request_timeout_ms(cli.request_timeout);
    blockwise_adapters::memory::init(cli.memory_limit);
    let data = DataDir::new(cli.data.data_dir);
    let command = match cli.command {
        Top::Backup { command } => command,
        Top::Restore { command } => return exit_with(crate::restore_cmd::run(command, &data)),
        Top::Schedule { command } => return exit_with(crate::schedule_cmd::run(command)),
        Top::Simulate(a) => return exit_with(simulate(a)),
        Top::Simulator { command: SimulatorCommand::Serve(a) } => return exit_with(serve(a)),
        Top::Serve(a) => return exit_with(crate::service::serve(*a, data.root().to_path_buf())),
        Top::Install(a) => return exit_with(crate::service::install(a, cli.memory_limit)),
        Top::Bench(a) => {
            let opts = crate::bench::BenchOptions {
                quick: a.quick,
                json_out: a.output == "json",
                dir: a.dir,
                only: a.only,
                objects: a.objects,
                workers: a.workers as usize,
            };
            return exit_with(crate::bench::run(opts).map(|()| ExitCode::SUCCESS));
        }
    };
    let result = match command {
        BackupCommand::Create(a) => create(*a, &data),
        BackupCommand::Resume(a) => resume(a, &data),
        BackupCommand::Describe(a) => describe(a, &data),
        BackupCommand::Get => get(&data),
        BackupCommand::Logs(a) => logs(a, &data),
        BackupCommand::Download(a) => download(a, &data),
        BackupCommand::Inspect(a) => inspect(a, &data),
        BackupCommand::Delete(a) => delete(a, &data),
    };
    exit_with(result)
}

fn exit_with(result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
