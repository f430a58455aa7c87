//! `blockwise serve` (the in-cluster controller) and `blockwise install` (its manifests): argument
//! parsing over [`blockwise_adapters::serve`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use blockwise_adapters::serve::controller::{self, LeaseConfig, ServeConfig, ServeError};
use blockwise_adapters::serve::crd::{Locations, Tenancy, Tenants};
use blockwise_adapters::serve::install::{self, InstallOptions};
use blockwise_adapters::serve::metrics::Metrics;
use clap::Args;

use crate::cli::{runtime, storage_from_args, usage, StorageArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Kubeconfig to use (also KUBECONFIG, ~/.kube/config; in a pod, its service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: its current-context).
    #[arg(long)]
    context: Option<String>,
    /// The controller's own namespace: it acts on the Backups, Restores and Schedules there
    /// (default: POD_NAMESPACE, else --lease-namespace, else blockwise-system).
    #[arg(long)]
    namespace: Option<String>,
    /// Also act on CRs in these namespaces, in tenant mode — a CR in namespace X covers X only and
    /// names only the controller's storage locations: a comma-separated list, or '*' for every
    /// namespace (default: none).
    #[arg(long)]
    tenant_namespaces: Option<String>,
    /// Backups run at once; a Backup whose namespaces overlap a running one waits (Queued).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrent_backups: u32,
    /// Restores run at once; more wait until one ends (default: from the memory budget, half of it
    /// at 256 MiB a restore, 1 to 8; 4 with no limit — see docs/service.md).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrent_restores: Option<u32>,
    /// Where /metrics, /healthz and /readyz listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
    /// Run backups without leader election (one replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader Lease (default: POD_NAMESPACE, else blockwise-system).
    #[arg(long)]
    lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = install::LEASE)]
    lease_name: String,
    /// This replica's identity in the Lease (default: POD_NAME, else host name and process id).
    #[arg(long)]
    identity: Option<String>,
    /// Seconds the Lease lasts after its last renewal.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_duration: u64,
    /// Seconds before expiry the leader renews.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_grace: u64,
    /// A named store Backups can ask for with spec.storageLocation: NAME=DIR or NAME=s3://BUCKET/PREFIX
    /// (repeatable; S3 locations use the --s3-* flags).
    #[arg(long = "storage-location")]
    storage_locations: Vec<String>,
    /// Objects per list page.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    page_size: u32,
    /// Time between two garbage-collection passes, which delete Backups whose ttl has passed
    /// (store files and log with them), e.g. 1h (Velero's default) or 10s.
    #[arg(long, default_value = "1h", value_parser = crate::cli::parse_duration)]
    gc_interval: u64,
    /// Least time between two status patches of one Backup, e.g. 1s or 200ms.
    #[arg(long, default_value = "1s", value_parser = crate::cli::parse_duration)]
    status_interval: u64,
    /// The default store (Backups that name none): `--storage DIR|s3://…`, default <data-dir>/store.
    #[command(flatten)]
    storage: StorageArgs,
}

fn identity() -> String {
    if let Some(p) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        return p;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{}-{}", if host.is_empty() { "blockwise" } else { &host }, std::process::id())
}

pub fn serve(a: ServeArgs, data_dir: PathBuf) -> Result<ExitCode> {
    if a.lease_grace >= a.lease_duration {
        return Err(usage(format!(
            "--lease-grace {} must be shorter than --lease-duration {}",
            a.lease_grace, a.lease_duration
        )));
    }
    let mut locations = Locations { default: Some(storage_from_args(&a.storage)?), ..Locations::default() };
    for l in &a.storage_locations {
        let (name, url) = l
            .split_once('=')
            .filter(|(n, u)| !n.trim().is_empty() && !u.trim().is_empty())
            .ok_or_else(|| usage(format!("--storage-location {l:?}: expected NAME=DIR or NAME=s3://BUCKET/PREFIX")))?;
        let args = StorageArgs { storage: Some(url.trim().to_string()), ..a.storage.clone() };
        locations.named.insert(name.trim().to_string(), storage_from_args(&args)?);
    }
    let data_dir =
        std::path::absolute(&data_dir).with_context(|| format!("resolving --data-dir {}", data_dir.display()))?;
    let kubeconfig = a.kubeconfig.as_ref().map(std::path::absolute).transpose().context("resolving --kubeconfig")?;
    let pod_namespace = std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty());
    let home = a
        .namespace
        .clone()
        .or_else(|| pod_namespace.clone())
        .or_else(|| a.lease_namespace.clone())
        .unwrap_or_else(|| "blockwise-system".into());
    let tenants = match &a.tenant_namespaces {
        Some(t) => Tenancy::parse_tenants(t).map_err(|e| usage(format!("--tenant-namespaces: {e}")))?,
        None => Tenants::None,
    };
    let tenancy = Tenancy { home, tenants };
    let lease = (!a.no_leader_election).then(|| LeaseConfig {
        namespace: a
            .lease_namespace
            .clone()
            .or_else(|| pod_namespace.clone())
            .unwrap_or_else(|| "blockwise-system".into()),
        name: a.lease_name.clone(),
        identity: a.identity.clone().unwrap_or_else(identity),
        duration_s: a.lease_duration,
        grace_s: a.lease_grace,
    });
    let cfg = ServeConfig {
        data_dir,
        kubeconfig,
        context: a.context.clone(),
        tenancy,
        concurrent_backups: a.concurrent_backups as usize,
        concurrent_restores: a
            .concurrent_restores
            .map_or_else(|| blockwise_adapters::memory::budget().restores_at_once(), |n| n as usize),
        lease,
        metrics_addr: a.metrics_addr,
        locations,
        page_size: a.page_size,
        status_interval_ms: a.status_interval,
        gc_interval_ms: a.gc_interval,
    };
    let rt = runtime()?;
    let metrics = Arc::new(Metrics::new());
    let scope = match &cfg.tenancy.tenants {
        Tenants::None => format!("namespace {}", cfg.tenancy.home),
        Tenants::Some(t) => {
            format!("namespace {} (tenants: {})", cfg.tenancy.home, t.iter().cloned().collect::<Vec<_>>().join(", "))
        }
        Tenants::All => format!("namespace {} (tenants: every other namespace)", cfg.tenancy.home),
    };
    let at_once = format!("{} backup(s) and {} restore(s) at once", cfg.concurrent_backups, cfg.concurrent_restores);
    let result = rt.block_on(controller::run(cfg, metrics, |addr| {
        eprintln!("blockwise serve: Backups in {scope}; metrics on http://{addr}/metrics");
        eprintln!("blockwise serve: {}; {at_once}", blockwise_adapters::memory::budget().describe());
    }));
    // Running backups are left to their logs: do not wait for their threads.
    rt.shutdown_background();
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(ServeError::Config(e)) => Err(usage(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Print the manifests instead of applying them (the only mode: pipe them to `kubectl apply -f -`).
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(short = 'o', long, default_value = "yaml", value_parser = ["yaml", "json"])]
    output: String,
    /// The namespace to install into.
    #[arg(long, default_value = "blockwise-system")]
    namespace: String,
    /// The controller's image.
    #[arg(long)]
    image: Option<String>,
    /// Controller replicas (one leads; the others stand by).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Size of the data volume.
    #[arg(long, default_value = "10Gi")]
    data_size: String,
    /// Custom resources the ClusterRole lets backups list and restores create, beside the built-in
    /// types: `resource.group`, comma-separated (e.g. certificates.cert-manager.io).
    #[arg(long, value_delimiter = ',')]
    resources: Vec<String>,
    /// Also every listable resource type the cluster serves (its discovery) that is not built in:
    /// the cluster's custom resources at the time of the install.
    #[arg(long)]
    resources_from_cluster: bool,
    /// Run the controller with --tenant-namespaces (a comma-separated list or '*') and add the
    /// aggregated ClusterRole that lets a namespace's editors create Backups, Restores and
    /// Schedules in it.
    #[arg(long)]
    tenant_namespaces: Option<String>,
    /// The controller's CPU request (default 500m).
    #[arg(long, default_value = "500m")]
    cpu_request: String,
    /// The controller's memory request (default 256Mi: an idle controller and a backup of ~100k
    /// objects, which peaks near 171 MiB; see docs/benchmarks.md).
    #[arg(long, default_value = "256Mi")]
    memory_request: String,
    /// The controller's CPU limit (default 2).
    #[arg(long, default_value = "2")]
    cpu_limit: String,
    /// Kubeconfig for --resources-from-cluster (also KUBECONFIG, ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context for --resources-from-cluster.
    #[arg(long)]
    context: Option<String>,
}

/// Whether `q` is a Kubernetes quantity: a decimal number with an optional SI or binary suffix.
fn is_quantity(q: &str) -> bool {
    const SUFFIXES: [&str; 13] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E"];
    let number = SUFFIXES.iter().find_map(|s| q.strip_suffix(s)).unwrap_or(q);
    let (int, frac) = number.split_once('.').unwrap_or((number, "0"));
    !int.is_empty()
        && int.chars().all(|c| c.is_ascii_digit())
        && !frac.is_empty()
        && frac.chars().all(|c| c.is_ascii_digit())
}

/// The listable resource types the cluster serves that are not built in (its custom resources).
fn resources_from_cluster(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<Vec<(String, String)>> {
    use blockwise_engine::ports::Cluster;
    let rt = runtime()?;
    let found = rt.block_on(async {
        let kube = blockwise_adapters::kube::KubeCluster::connect(kubeconfig, context)
            .await
            .map_err(|e| usage(e.to_string()))?;
        kube.discover().await.context("reading the cluster's discovery for --resources-from-cluster")
    });
    rt.shutdown_background();
    let built_in = |g: &str, r: &str| install::BUILT_IN.iter().any(|(bg, rs)| *bg == g && rs.contains(&r));
    Ok(found?
        .into_iter()
        .filter(|t| !built_in(&t.gr.group, &t.gr.resource))
        .map(|t| (t.gr.group.clone(), t.gr.resource.clone()))
        .collect())
}

/// The controller's memory limit when `--memory-limit` (the global flag: for `install`, the pod's
/// limit, which the controller then reads from its cgroup) is not given: a 1M-object backup peaks
/// near 1.3 GiB (docs/benchmarks.md).
const INSTALL_MEMORY_LIMIT: &str = "2Gi";

/// `bytes` as a Kubernetes quantity, in the largest binary unit that divides it.
fn quantity(bytes: u64) -> String {
    for (shift, unit) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

pub fn install(a: InstallArgs, memory_limit: Option<u64>) -> Result<ExitCode> {
    let memory_limit = memory_limit.map_or_else(|| INSTALL_MEMORY_LIMIT.to_string(), quantity);
    if !a.dry_run {
        return Err(usage(
            "blockwise install only prints its manifests: run `blockwise install --dry-run -o yaml | kubectl apply -f -`",
        ));
    }
    for (flag, q) in
        [("--cpu-request", &a.cpu_request), ("--memory-request", &a.memory_request), ("--cpu-limit", &a.cpu_limit)]
    {
        if !is_quantity(q) {
            return Err(usage(format!("{flag} {q:?}: not a Kubernetes quantity (such as 500m, 2, 1Gi, 512Mi)")));
        }
    }
    if let Some(t) = &a.tenant_namespaces {
        Tenancy::parse_tenants(t).map_err(|e| usage(format!("--tenant-namespaces: {e}")))?;
    }
    let mut extra = Vec::new();
    for r in &a.resources {
        extra.push(install::parse_extra_resource(r).map_err(|e| usage(format!("--resources {e}")))?);
    }
    if a.resources_from_cluster {
        extra.extend(resources_from_cluster(a.kubeconfig.as_deref(), a.context.as_deref())?);
    }
    extra.sort();
    extra.dedup();
    let defaults = InstallOptions::default();
    let o = InstallOptions {
        namespace: a.namespace,
        image: a.image.unwrap_or(defaults.image),
        replicas: a.replicas,
        data_size: a.data_size,
        metrics_port: defaults.metrics_port,
        extra_resources: extra,
        tenant_namespaces: a.tenant_namespaces,
        resources: install::ContainerResources {
            cpu_request: a.cpu_request,
            memory_request: a.memory_request,
            cpu_limit: a.cpu_limit,
            memory_limit,
        },
    };
    let text = if a.output == "json" {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": install::manifests(&o)});
        format!("{list:#}\n")
    } else {
        install::manifests_yaml(&o).map_err(anyhow::Error::msg)?
    };
    crate::cli::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}
