//! The `blockwise` command line, in Velero's vocabulary (`backup create|resume|describe|get|logs`).
//!
//! Exit codes a script can rely on: 0 Completed, 3 PartiallyFailed, 1 Failed (or the run could not
//! go on), 2 usage or input error (bad flag, bad name, a bad kubeconfig or context, a backup that
//! already exists). With a kubeconfig (`--kubeconfig`, `KUBECONFIG`, `~/.kube/config`) or inside a
//! pod, the cluster is reached through kube-rs ([`crate::kube`]); with none, or with `--demo`, the
//! built-in demo cluster from `blockwise-simulator` is backed up in memory, and the choice is
//! announced on stderr. `simulator serve` serves the demo cluster over the Kubernetes HTTP API. The
//! data directory holds one sled log per backup under
//! `backups/<name>/log`, the cluster source and the storage location used (`cluster.json`,
//! `storage.json` — never credentials — so `resume`, `download` and `inspect` reach the same ones)
//! and the default local store under `store/`. Every store is wrapped in a
//! [`RetryingStore`]; debug builds also honour the fault plan of [`crate::faults::FAULT_ENV`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use blockwise_engine::event::{Event, Phase};
use blockwise_engine::ports::Cluster;
use blockwise_engine::spec::{parse_ordered_resources, validate_backup_name, BackupSpec, DEFAULT_VOLUME_GROUP_LABEL};
use blockwise_engine::state::BackupState;
use blockwise_engine::{Engine, EngineConfig};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::faults::{FaultPlan, FaultyStore};
use crate::kube::KubeCluster;
use crate::log::EventLog;
use crate::report;
use crate::runtime::{now_ms, run_backup, Observer};
use crate::s3::{S3Config, S3Location, S3Store};
use crate::store::{LocalStore, RetryPolicy, RetryingStore, Store, StoreError};

/// Exit code for usage and input errors.
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "blockwise",
    version,
    about = "Kubernetes backups in ItemBlocks, with hooks, parallel workers and resume"
)]
struct Cli {
    #[command(flatten)]
    data: DataDir,
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
    /// Run the deterministic simulator: seeds, faults, invariants, shrinking.
    Simulate(SimulateArgs),
    /// Measure: scale, parallel efficiency, event log, recovery, grouping, simulator.
    Bench(BenchArgs),
    /// The simulator's fake Kubernetes API server.
    Simulator {
        #[command(subcommand)]
        command: SimulatorCommand,
    },
}

#[derive(Subcommand, Debug)]
enum SimulatorCommand {
    /// Serve the demo cluster over the Kubernetes HTTP API on 127.0.0.1 until interrupted.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Objects in the demo cluster.
    #[arg(long, default_value_t = blockwise_simulator::demo::DEMO_OBJECTS_DEFAULT)]
    demo_objects: usize,
    /// Simulated latency of each API call and exec, in milliseconds.
    #[arg(long, default_value_t = 0)]
    demo_latency_ms: u64,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
}

fn serve(a: ServeArgs) -> Result<ExitCode> {
    use blockwise_simulator::server::{FakeApiServer, TokioSleeper};
    let rt = runtime()?;
    rt.block_on(async {
        let cluster = blockwise_simulator::demo::demo_cluster(a.demo_objects, blockwise_simulator::demo::DEMO_SEED)
            .with_latency(blockwise_simulator::fake::Latency { api_ms: a.demo_latency_ms, exec_ms: a.demo_latency_ms })
            .with_sleeper(Arc::new(TokioSleeper));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], a.port));
        let server = FakeApiServer::start(Arc::new(cluster), addr)
            .await
            .with_context(|| format!("binding the fake API server to {addr}"))?;
        if let Some(path) = &a.kubeconfig_out {
            server.write_kubeconfig(path).with_context(|| format!("writing kubeconfig {}", path.display()))?;
            println!("kubeconfig: {}", path.display());
        }
        println!("serving the demo cluster ({} objects) at {}", a.demo_objects, server.url());
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
}

#[derive(Args, Debug, Clone)]
struct StorageArgs {
    /// Where the backup goes: a local directory (default: <data-dir>/store) or s3://BUCKET/PREFIX.
    #[arg(long)]
    storage: Option<String>,
    /// S3 endpoint URL, for S3-compatible stores (MinIO, Ceph, …); default AWS.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long)]
    s3_region: Option<String>,
    /// Allow a plain-HTTP (unencrypted) S3 endpoint.
    #[arg(long)]
    s3_allow_http: bool,
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
struct DataDir {
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
    /// Objects in the demo cluster.
    #[arg(long, default_value_t = blockwise_simulator::demo::DEMO_OBJECTS_DEFAULT)]
    demo_objects: usize,
    /// Simulated latency of each demo API call and hook exec, in milliseconds.
    #[arg(long, default_value_t = 0)]
    demo_latency_ms: u64,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Backup name (lower-case letters, digits, '-').
    name: String,
    /// Blocks backed up in parallel.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: u32,
    /// Namespaces to include (comma-separated, '*' globs); default all.
    #[arg(long, value_delimiter = ',')]
    include_namespaces: Vec<String>,
    /// Namespaces to exclude.
    #[arg(long, value_delimiter = ',')]
    exclude_namespaces: Vec<String>,
    /// Resources to include (plural, plural.group or kind); default all.
    #[arg(long, value_delimiter = ',')]
    include_resources: Vec<String>,
    /// Resources to exclude.
    #[arg(long, value_delimiter = ',')]
    exclude_resources: Vec<String>,
    /// Include cluster-scoped resources (unset: only when all namespaces are included).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    include_cluster_resources: Option<bool>,
    /// Label selector, e.g. 'app=db,tier in (a,b)'.
    #[arg(short = 'l', long)]
    selector: Option<String>,
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
}

#[derive(Args, Debug)]
struct NamedArgs {
    /// Backup name.
    name: String,
}

/// Where a backup's cluster came from, recorded so `resume` talks to the same one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ClusterSource {
    /// The built-in demo cluster.
    Demo {
        /// Objects generated.
        objects: usize,
        /// Generator seed.
        seed: u64,
        /// Simulated latency per API call and exec.
        latency_ms: u64,
    },
    /// A real cluster (or the fake API server) through kube-rs. Never holds credentials: `resume`
    /// reads the same kubeconfig again.
    Kube {
        /// The kubeconfig named by `--kubeconfig` (absolute); `None`: KUBECONFIG, ~/.kube/config or
        /// in-cluster, looked up again on resume.
        kubeconfig: Option<PathBuf>,
        /// The context named by `--context`; `None`: the kubeconfig's current-context.
        context: Option<String>,
    },
}

/// Where a backup's store is, recorded in `storage.json` so later commands use the same one.
/// Holds no credentials: those always come from the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StorageSpec {
    /// A local directory; `None` is `<data-dir>/store`.
    Local {
        /// The directory, absolute.
        #[serde(default)]
        root: Option<PathBuf>,
    },
    /// An S3-compatible bucket.
    S3(S3Location),
}

fn storage_from_args(a: &StorageArgs) -> Result<StorageSpec> {
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
        Some(dir) => {
            let root = std::path::absolute(dir).with_context(|| format!("resolving --storage {dir}"))?;
            Ok(StorageSpec::Local { root: Some(root) })
        }
    }
}

/// The storage a backup was created with (`storage.json`; before it existed: the default).
fn read_storage(data_dir: &Path, name: &str) -> Result<StorageSpec> {
    let path = backup_dir(data_dir, name).join("storage.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StorageSpec::Local { root: None }),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The store of a storage spec: fault injection (debug builds, when asked) under bounded retries.
fn open_store(spec: &StorageSpec, data_dir: &Path) -> Result<Arc<dyn Store>> {
    let base: Arc<dyn Store> = match spec {
        StorageSpec::Local { root } => {
            Arc::new(LocalStore::new(root.clone().unwrap_or_else(|| data_dir.join("store"))))
        }
        StorageSpec::S3(loc) => {
            let cfg = S3Config::new(loc.clone(), data_dir.join("tmp"));
            Arc::new(S3Store::new(cfg).map_err(|e| match e {
                StoreError::BadLocation { .. } => usage(e.to_string()),
                e => anyhow::Error::new(e),
            })?)
        }
    };
    let base: Arc<dyn Store> = match FaultPlan::from_env().map_err(usage)? {
        Some(plan) => Arc::new(FaultyStore::new(base, plan)),
        None => base,
    };
    Ok(Arc::new(RetryingStore::new(base, RetryPolicy::default())))
}

/// The directory of one backup's log and metadata.
pub fn backup_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("backups").join(name)
}

/// The path of the demo cluster's exec record for a backup.
pub fn demo_exec_log(data_dir: &Path, name: &str) -> PathBuf {
    backup_dir(data_dir, name).join("demo-exec.jsonl")
}

fn build_cluster(
    source: &ClusterSource,
    data_dir: &Path,
    name: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<Arc<dyn Cluster>> {
    match source {
        ClusterSource::Demo { objects, seed, latency_ms } => {
            let fake = blockwise_simulator::demo::demo_cluster(*objects, *seed)
                .with_latency(blockwise_simulator::fake::Latency { api_ms: *latency_ms, exec_ms: *latency_ms })
                .with_sleeper(Arc::new(blockwise_simulator::server::TokioSleeper))
                .with_exec_log(demo_exec_log(data_dir, name));
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
        if let Some(m) = msg {
            println!("{m}");
        }
        if matches!(event, Event::BlockFinished { .. }) {
            let step = (total / 50).max(1);
            if done != self.last_reported && (done.is_multiple_of(step) || done == total) {
                self.last_reported = done;
                println!("blocks {done}/{total} items {}/{}", s.items_done(), s.planned_items);
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

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

/// After the backup reached a terminal phase (the log must be closed): stores Velero's files beside
/// the archive and reports. Idempotent, so `resume` of a finished backup can redo it.
fn finish_run(
    data_dir: &Path,
    name: &str,
    state: &BackupState,
    store: &Arc<dyn Store>,
    rt: &tokio::runtime::Runtime,
) -> Result<ExitCode> {
    let events = crate::log::read_events(&backup_dir(data_dir, name).join("log"))
        .with_context(|| format!("reading the log of backup {name}"))?;
    let files = report::backup_files(name, state, &events).context("encoding the backup's files")?;
    for (file, bytes) in &files {
        rt.block_on(store.put_file(name, file, bytes)).with_context(|| {
            format!(
                "storing {file} of backup {name} in {}; run `blockwise backup resume {name}` to store it again",
                store.describe()
            )
        })?;
    }
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

fn read_log(data_dir: &Path, name: &str) -> Result<Vec<Event>> {
    validate_backup_name(name).map_err(|e| usage(e.to_string()))?;
    let dir = backup_dir(data_dir, name).join("log");
    if !dir.exists() {
        return Err(usage(format!("backup {name:?} not found in {}", data_dir.display())));
    }
    crate::log::read_events(&dir).with_context(|| format!("reading the log of backup {name}"))
}

fn create(a: CreateArgs, data_dir: &Path) -> Result<ExitCode> {
    validate_backup_name(&a.name).map_err(|e| usage(e.to_string()))?;
    let mut spec = BackupSpec::new(&a.name);
    spec.included_namespaces = a.include_namespaces;
    spec.excluded_namespaces = a.exclude_namespaces;
    spec.included_resources = a.include_resources;
    spec.excluded_resources = a.exclude_resources;
    spec.include_cluster_resources = a.include_cluster_resources;
    spec.label_selector = a.selector;
    spec.volume_group_label = a.volume_group_label;
    if let Some(o) = &a.ordered_resources {
        spec.ordered_resources = parse_ordered_resources(o).map_err(|e| usage(e.to_string()))?;
    }
    if let Some(path) = &a.hooks_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading hooks file {}", path.display()))?;
        spec.hooks = crate::hookspec::parse_hooks_file(&text)
            .map_err(|e| usage(format!("hooks file {}: {e}", path.display())))?;
    }
    let dir = backup_dir(data_dir, &a.name);
    if dir.join("log").exists() {
        let events = read_log(data_dir, &a.name)?;
        let state = BackupState::fold(&events).with_context(|| format!("folding the log of backup {}", a.name))?;
        if let Some(reason) = &state.stopped {
            return Err(usage(format!(
                "backup {} stopped ({reason}): run `blockwise backup resume {}` to continue it",
                a.name, a.name
            )));
        }
        if state.phase() == Phase::InProgress {
            return Err(usage(format!(
                "backup {} is InProgress (interrupted): run `blockwise backup resume {}` to continue it",
                a.name, a.name
            )));
        }
        return Err(usage(format!("backup {} already exists ({})", a.name, state.phase())));
    }
    let target = if a.cluster.demo { None } else { kube_target(&a.cluster)? };
    let source = match target {
        Some((kubeconfig, context)) => ClusterSource::Kube { kubeconfig, context },
        None => {
            let demo = a.cluster.demo;
            if !demo {
                eprintln!(
                    "no kubeconfig found: backing up the built-in demo cluster ({} objects)",
                    a.cluster.demo_objects
                );
            } else {
                eprintln!("backing up the built-in demo cluster ({} objects)", a.cluster.demo_objects);
            }
            ClusterSource::Demo {
                objects: a.cluster.demo_objects,
                seed: blockwise_simulator::demo::DEMO_SEED,
                latency_ms: a.cluster.demo_latency_ms,
            }
        }
    };
    let storage = storage_from_args(&a.storage)?;
    let store = open_store(&storage, data_dir)?;
    let cfg = EngineConfig { workers: a.workers as usize, list_page_items_max: a.page_size, ..EngineConfig::default() };
    let engine = Engine::new(spec, cfg, now_ms()).map_err(|e| usage(e.to_string()))?;
    let rt = runtime()?;
    // Connect before anything is written, so a bad kubeconfig or an unreachable server leaves no
    // half-created backup behind.
    let cluster = build_cluster(&source, data_dir, &a.name, &rt)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let storage_json = serde_json::to_vec_pretty(&storage).context("encoding the storage location")?;
    std::fs::write(dir.join("storage.json"), storage_json)
        .with_context(|| format!("writing {}", dir.join("storage.json").display()))?;
    let source_json = serde_json::to_vec_pretty(&source).context("encoding the cluster source")?;
    std::fs::write(dir.join("cluster.json"), source_json)
        .with_context(|| format!("writing {}", dir.join("cluster.json").display()))?;
    let mut log = EventLog::create(&dir.join("log"), &a.name)
        .with_context(|| format!("creating the log of backup {}", a.name))?;
    let mut progress = Progress::new();
    let state = rt
        .block_on(run_backup(engine, &mut log, cluster, store.clone(), a.workers as usize, &mut progress))
        .with_context(|| {
            format!("backup {} stopped; run `blockwise backup resume {}` once the cause is fixed", a.name, a.name)
        })?;
    drop(progress);
    drop(log);
    finish_run(data_dir, &a.name, &state, &store, &rt)
}

fn resume(a: ResumeArgs, data_dir: &Path) -> Result<ExitCode> {
    validate_backup_name(&a.name).map_err(|e| usage(e.to_string()))?;
    let dir = backup_dir(data_dir, &a.name);
    if !dir.join("log").exists() {
        return Err(usage(format!("backup {:?} not found in {}", a.name, data_dir.display())));
    }
    let (mut log, events, report) =
        EventLog::open(&dir.join("log")).with_context(|| format!("opening the log of backup {}", a.name))?;
    if let Some((seq, reason)) = &report.cut_tail {
        eprintln!("log of backup {}: cut a torn tail at record {seq} ({reason})", a.name);
    }
    let state = BackupState::fold(&events).with_context(|| format!("folding the log of backup {}", a.name))?;
    let store = open_store(&read_storage(data_dir, &a.name)?, data_dir)?;
    if !state.resumable() {
        eprintln!("backup {} already finished: {}; storing its files again", a.name, state.phase());
        drop(log);
        return finish_run(data_dir, &a.name, &state, &store, &runtime()?);
    }
    if let Some(reason) = &state.stopped {
        eprintln!("backup {} had stopped: {reason}", a.name);
    }
    let text = std::fs::read_to_string(dir.join("cluster.json"))
        .with_context(|| format!("reading {}", dir.join("cluster.json").display()))?;
    let mut source: ClusterSource =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", dir.join("cluster.json").display()))?;
    if let (Some(l), ClusterSource::Demo { latency_ms, .. }) = (a.demo_latency_ms, &mut source) {
        *latency_ms = l;
    }
    let workers = a.workers.unwrap_or(state.workers.max(1)) as usize;
    let cfg = EngineConfig { workers, ..EngineConfig::default() };
    let engine = Engine::resume(&events, cfg, now_ms()).map_err(|e| anyhow!("cannot resume backup {}: {e}", a.name))?;
    let in_flight = state.blocks.iter().filter(|b| b.in_flight()).count();
    eprintln!(
        "resuming backup {} at event {}: {}/{} blocks done, {in_flight} interrupted",
        a.name,
        events.len(),
        state.blocks_done(),
        state.blocks.len()
    );
    let rt = runtime()?;
    let cluster = build_cluster(&source, data_dir, &a.name, &rt)?;
    let mut progress = Progress::new();
    let state = rt
        .block_on(run_backup(engine, &mut log, cluster, store.clone(), workers, &mut progress))
        .with_context(|| {
            format!("backup {} stopped again; run `blockwise backup resume {}` once the cause is fixed", a.name, a.name)
        })?;
    drop(progress);
    drop(log);
    finish_run(data_dir, &a.name, &state, &store, &rt)
}

fn download(a: DownloadArgs, data_dir: &Path) -> Result<ExitCode> {
    let events = read_log(data_dir, &a.name)?;
    let state = BackupState::fold(&events).with_context(|| format!("folding the log of backup {}", a.name))?;
    let store = open_store(&read_storage(data_dir, &a.name)?, data_dir)?;
    let dest = a.output.unwrap_or_else(|| PathBuf::from(format!("{}.tar.gz", a.name)));
    let file = format!("{}.tar.gz", a.name);
    let found = runtime()?
        .block_on(store.download_file(&a.name, &file, &dest))
        .with_context(|| format!("downloading {} to {}", store.archive_location(&a.name), dest.display()))?;
    if !found {
        return Err(anyhow!("backup {} has no archive in {} (phase {})", a.name, store.describe(), state.phase()));
    }
    eprintln!("downloaded {} to {}", store.archive_location(&a.name), dest.display());
    Ok(ExitCode::SUCCESS)
}

fn inspect(a: InspectArgs, data_dir: &Path) -> Result<ExitCode> {
    let path = Path::new(&a.target);
    let is_file = path.is_file() || a.target.contains('/') || a.target.ends_with(".tar.gz");
    let (what, archive, list) = if is_file {
        if !path.is_file() {
            return Err(usage(format!("{}: no such archive file", path.display())));
        }
        let archive = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // `NAME.tar.gz` may have `NAME-resource-list.json.gz` beside it, as in a store.
        let stem = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".tar.gz"));
        let list = match stem {
            Some(stem) => {
                let p = path.with_file_name(format!("{stem}-resource-list.json.gz"));
                p.is_file()
                    .then(|| std::fs::read(&p).with_context(|| format!("reading {}", p.display())))
                    .transpose()?
            }
            None => None,
        };
        (path.display().to_string(), archive, list)
    } else {
        read_log(data_dir, &a.target)?;
        let store = open_store(&read_storage(data_dir, &a.target)?, data_dir)?;
        let rt = runtime()?;
        let name = &a.target;
        let archive = rt
            .block_on(store.get_file(name, &format!("{name}.tar.gz")))
            .with_context(|| format!("reading {}", store.archive_location(name)))?
            .ok_or_else(|| anyhow!("backup {name} has no archive in {}", store.describe()))?;
        let list = rt
            .block_on(store.get_file(name, &format!("{name}-resource-list.json.gz")))
            .with_context(|| format!("reading the resource list of backup {name}"))?;
        (store.archive_location(name), archive, list)
    };
    let found = crate::inspect::inspect(&archive, list.as_deref());
    print!("{}", crate::inspect::render(&what, &found));
    if found.defects.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{what}: {} defects", found.defects.len());
        Ok(ExitCode::from(1))
    }
}

fn describe(a: DescribeArgs, data_dir: &Path) -> Result<ExitCode> {
    let events = read_log(data_dir, &a.name)?;
    let state = BackupState::fold(&events).with_context(|| format!("folding the log of backup {}", a.name))?;
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&report::describe_json(&state)).context("encoding JSON")?);
    } else {
        print!("{}", report::describe_text(&state));
    }
    Ok(ExitCode::SUCCESS)
}

fn get(data_dir: &Path) -> Result<ExitCode> {
    let root = data_dir.join("backups");
    let mut names: Vec<String> = match std::fs::read_dir(&root) {
        Ok(rd) => rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
    };
    names.sort();
    println!("{:<32} {:<16} {:>8} {:>8} {:>9} CREATED", "NAME", "STATUS", "ERRORS", "WARNINGS", "ITEMS");
    for name in names {
        let row = read_log(data_dir, &name).and_then(|ev| BackupState::fold(&ev).map_err(anyhow::Error::from));
        match row {
            Ok(s) => println!(
                "{:<32} {:<16} {:>8} {:>8} {:>9} {}",
                name,
                s.phase().to_string(),
                s.errors.len(),
                s.warnings.len(),
                format!("{}/{}", s.items_done(), s.planned_items),
                report::rfc3339(s.requested_ms)
            ),
            Err(e) => println!("{name:<32} {:<16} {e:#}", "Unreadable"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn logs(a: NamedArgs, data_dir: &Path) -> Result<ExitCode> {
    let events = read_log(data_dir, &a.name)?;
    for (i, e) in events.iter().enumerate() {
        println!("{}", report::event_line(i as u64, e));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    let data_dir = cli.data.data_dir;
    let command = match cli.command {
        Top::Backup { command } => command,
        Top::Simulate(a) => return exit_with(simulate(a)),
        Top::Simulator { command: SimulatorCommand::Serve(a) } => return exit_with(serve(a)),
        Top::Bench(a) => {
            return exit_with(crate::bench::run(a.quick, a.output == "json", a.dir).map(|()| ExitCode::SUCCESS))
        }
    };
    let result = match command {
        BackupCommand::Create(a) => create(*a, &data_dir),
        BackupCommand::Resume(a) => resume(a, &data_dir),
        BackupCommand::Describe(a) => describe(a, &data_dir),
        BackupCommand::Get => get(&data_dir),
        BackupCommand::Logs(a) => logs(a, &data_dir),
        BackupCommand::Download(a) => download(a, &data_dir),
        BackupCommand::Inspect(a) => inspect(a, &data_dir),
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
