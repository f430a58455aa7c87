//! `blockwise bench`: the numbers that say whether blockwise is fast, measured, never asserted.
//!
//! Sections, one table (or JSON with `-o json`): scale over HTTP (the demo cluster served by
//! `blockwise simulator serve` in another process, backed up through kube-rs: wall time and this
//! process's peak RSS), memory (that at several sizes), resume (that backup killed half way and
//! resumed, each in a `blockwise` process: the resumed process's peak RSS), restore (the backup of a
//! demo cluster restored into `simulator serve --empty` by `restore create` in a process of its
//! own: its peak RSS and wall time), scale (a generated cluster in this process, through the real tokio
//! runtime, sled log and local store, with wall time and peak RSS read from the OS), parallel
//! efficiency (the engine under the deterministic simulator with fixed latencies, against the ideal
//! makespan), the event log (group commit against a raw write + fdatasync loop with the same batch
//! size, in the same run), recovery (open + verify + fold of the scale run's log; time to first
//! new work after resuming that backup cut halfway), grouping (plan time at three sizes), and the
//! simulator (seeds per CPU-second with all faults on). `--quick` shrinks every size, keeps every
//! key and prints the sizes it used.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use blockwise_adapters::driver::{drive, run_backup, Quiet, World};
use blockwise_adapters::log::EventLog;
use blockwise_adapters::retry::{RetryPolicy, RetryingCluster};
use blockwise_adapters::store::LocalStore;
use blockwise_adapters::world::{Runtime, TokioRuntime};
use blockwise_engine::event::{encode_record, Event};
use blockwise_engine::grouping::{builtin_actions, plan, Index, PlanInput, PlanStep};
use blockwise_engine::item::{Item, ItemKey};
use blockwise_engine::snapshot::BackupOptions;
use blockwise_engine::spec::{BackupSpec, Selection};
use blockwise_engine::state::BackupState;
use blockwise_engine::{Engine, EngineConfig};
use blockwise_simulator::cluster::{ClusterFaults, Latencies};
use blockwise_simulator::csi::{Behaviour, CsiConfig, CsiEvent, Timing};
use blockwise_simulator::demo::{demo_cluster, demo_resource_types, DEMO_SEED};
use blockwise_simulator::media::StoreFaults;
use blockwise_simulator::records::Record;
use blockwise_simulator::runner::check_seed;
use blockwise_simulator::sim::{simulate_world, FaultKind, RunConfig, START_MS};
use serde_json::{json, Value};

/// Sizes of one benchmark run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Objects in the scale run.
    pub scale_objects: usize,
    /// Objects in the parallel-efficiency runs.
    pub efficiency_objects: usize,
    /// Events appended in the log benchmark.
    pub log_events: usize,
    /// Appends per flush (group commit) in the log benchmark.
    pub log_batch_events: usize,
    /// Cluster sizes for the grouping benchmark.
    pub plan_objects: [usize; 3],
    /// Seeds in the simulator benchmark.
    pub sim_seeds: u64,
    /// Cluster sizes of the flat-memory row (scale over HTTP, each in a process of its own).
    pub memory_objects: &'static [usize],
    /// Objects in the resume row (a backup killed half way: big enough to be seen half way).
    pub resume_objects: usize,
    /// Objects in the cluster whose backup the restore row restores.
    pub restore_objects: usize,
}

impl Sizes {
    /// The full run recorded in docs/benchmarks.md.
    pub const FULL: Sizes = Sizes {
        scale_objects: 300_000,
        efficiency_objects: 20_000,
        log_events: 200_000,
        log_batch_events: 64,
        plan_objects: [10_000, 100_000, 300_000],
        sim_seeds: 300,
        memory_objects: &[30_000, 100_000, 300_000, 1_000_000],
        resume_objects: 300_000,
        restore_objects: 300_000,
    };
    /// `--quick`: a smoke test that finishes in well under two minutes even in a debug build.
    pub const QUICK: Sizes = Sizes {
        scale_objects: 3_000,
        efficiency_objects: 1_000,
        log_events: 5_000,
        log_batch_events: 64,
        plan_objects: [1_000, 3_000, 6_000],
        sim_seeds: 20,
        memory_objects: &[1_000, 3_000],
        resume_objects: 10_000,
        restore_objects: 3_000,
    };
}

/// The simulated latencies of the efficiency benchmark, fixed (no spread).
pub const EFFICIENCY_LATENCIES: Latencies =
    Latencies { list_page_ms: (20, 20), get_ms: (10, 10), exec_ms: (200, 200), store_ms: (5, 5) };

/// The fake CSI driver of the efficiency benchmark: a snapshot is cut 2 s after its creation (inside
/// the block's window: a worker waits for it) and ready 30 s after that (awaited off the workers).
pub const EFFICIENCY_SNAPSHOTS: Timing = Timing { cut_ms: 2_000, ready_ms: 30_000 };

fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets the kernel's peak-RSS mark for this process (Linux `clear_refs` value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Scale {
    seconds: f64,
    items: u64,
    events: u64,
    peak_rss: u64,
    cluster_rss: u64,
    log_dir: PathBuf,
    /// Wall seconds to parse every object's JSON and deflate it, on every core: the floor.
    floor_seconds: f64,
}

/// The floor of a backup on this machine: every object's JSON parsed and deflated (gzip level 6),
/// split over all cores, timed; nothing else (no API, no log, no store).
fn floor_seconds(cluster: &blockwise_simulator::fake::FakeCluster) -> f64 {
    use std::io::Write as _;
    let jsons: Vec<String> = cluster.objects().map(|(_, v)| v.to_string()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in jsons.chunks(jsons.len().div_ceil(threads).max(1)) {
            s.spawn(move || {
                let mut gz = flate2::write::GzEncoder::new(std::io::sink(), flate2::Compression::default());
                for j in part {
                    let v: Value = serde_json::from_str(j).unwrap_or(Value::Null);
                    std::hint::black_box(&v);
                    let _ = gz.write_all(j.as_bytes());
                }
                let _ = gz.finish();
            });
        }
    });
    start.elapsed().as_secs_f64()
}

fn scale(dir: &Path, objects: usize, workers: usize) -> Result<Scale> {
    reset_peak_rss();
    let cluster = demo_cluster(objects, DEMO_SEED);
    let cluster_rss = proc_status_bytes("VmRSS:");
    let floor = floor_seconds(&cluster);
    let log_dir = dir.join("scale-log");
    let mut log = EventLog::create(&log_dir, "scale").context("creating the scale log")?;
    let runtime: Arc<dyn Runtime> = Arc::new(TokioRuntime);
    let world = World {
        cluster: Arc::new(RetryingCluster::new(Arc::new(cluster), RetryPolicy::default(), runtime.clone())),
        store: Arc::new(LocalStore::new(dir.join("store"))),
        runtime: runtime.clone(),
    };
    let cfg = EngineConfig { workers, ..EngineConfig::default() };
    let engine = Engine::new(BackupSpec::new("scale"), cfg, runtime.now_ms())?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let start = Instant::now();
    let state = rt.block_on(drive(engine, &mut log, &world, workers, &mut Quiet))?;
    let seconds = start.elapsed().as_secs_f64();
    drop(log);
    Ok(Scale {
        seconds,
        items: state.items_done(),
        events: state.events,
        peak_rss: proc_status_bytes("VmHWM:"),
        cluster_rss,
        log_dir,
        floor_seconds: floor,
    })
}

/// The demo cluster served by `blockwise simulator serve` in a process of its own, killed when
/// dropped.
struct ServedDemo {
    child: std::process::Child,
    kubeconfig: PathBuf,
}

impl Drop for ServedDemo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `blockwise` child of this bench: the same binary, and the budget this process was given with
/// `--memory-limit` (a child in the same pod reads the same cgroup itself; a flag is not inherited).
fn blockwise_child() -> Result<std::process::Command> {
    let exe = std::env::current_exe().context("finding the blockwise binary")?;
    let mut c = std::process::Command::new(exe);
    let budget = blockwise_adapters::memory::budget();
    if let (Some(limit), blockwise_adapters::memory::Source::Flag) = (budget.limit, &budget.source) {
        c.arg("--memory-limit").arg(limit.to_string());
    }
    Ok(c)
}

/// Starts `simulator serve` with `objects` objects and waits for it to say it serves.
fn serve_demo(dir: &Path, objects: usize) -> Result<ServedDemo> {
    serve(&dir.join("scale-http.kubeconfig"), &["--demo-objects", &objects.to_string()], "serving the demo cluster")
}

/// Starts `simulator serve` with `args`, its kubeconfig written to `kubeconfig`, and waits for the
/// line that starts with `ready`.
fn serve(kubeconfig: &Path, args: &[&str], ready: &str) -> Result<ServedDemo> {
    use std::io::BufRead;
    let exe = std::env::current_exe().context("finding the blockwise binary")?;
    let mut child = std::process::Command::new(exe)
        .args(["simulator", "serve", "--port", "0"])
        .args(args)
        .arg("--kubeconfig-out")
        .arg(kubeconfig)
        // A profiler preloaded into the bench (heaptrack) profiles the bench, not the server.
        .env_remove("LD_PRELOAD")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("starting `blockwise simulator serve`")?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    let served = ServedDemo { child, kubeconfig: kubeconfig.to_path_buf() };
    let mut lines = std::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next() {
        let line = line.context("reading the server's stdout")?;
        if line.starts_with(ready) {
            // Keep reading what it prints after: a closed pipe would end the server.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(served);
        }
    }
    anyhow::bail!("`blockwise simulator serve` ended before serving")
}

/// One backup over HTTP: its wall seconds (from connecting), the peak RSS of this process during
/// it (the mark is reset first), its RSS when it is over, and the items written.
#[derive(Debug, Clone, Copy, Default)]
struct HttpRun {
    seconds: f64,
    peak_rss: u64,
    rss_after: u64,
    items: u64,
}

/// Backs up the served cluster through kube-rs as a real cluster is reached, the whole run as the
/// CLI makes it (`run_backup`: the archive and Velero's companion files).
fn backup_over_http(
    rt: &tokio::runtime::Runtime,
    served: &ServedDemo,
    dir: &Path,
    name: &str,
    workers: usize,
) -> Result<HttpRun> {
    reset_peak_rss();
    let start = Instant::now();
    let kube = rt
        .block_on(blockwise_adapters::kube::KubeCluster::connect(Some(&served.kubeconfig), None))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut log = EventLog::create(&dir.join(format!("{name}-log")), name).context("creating the log")?;
    let runtime: Arc<dyn Runtime> = Arc::new(TokioRuntime);
    let world = World {
        cluster: Arc::new(RetryingCluster::new(Arc::new(kube), RetryPolicy::default(), runtime.clone())),
        store: Arc::new(LocalStore::new(dir.join(format!("{name}-store")))),
        runtime: runtime.clone(),
    };
    let cfg = EngineConfig { workers, ..EngineConfig::default() };
    let engine = Engine::new(BackupSpec::new(name), cfg, runtime.now_ms())?;
    let state = rt.block_on(run_backup(engine, &mut log, &world, workers, &mut Quiet))?;
    let seconds = start.elapsed().as_secs_f64();
    let items = state.items_done();
    anyhow::ensure!(
        state.phase() != blockwise_engine::Phase::Failed && items > 0,
        "the backup over HTTP ended {} with {items} items: {}",
        state.phase(),
        state.errors.join("; ")
    );
    drop((state, log, world));
    Ok(HttpRun { seconds, peak_rss: proc_status_bytes("VmHWM:"), rss_after: proc_status_bytes("VmRSS:"), items })
}

/// The scale run over HTTP: the demo cluster in another process; `runs` backups of it one after
/// the other in this process (a long-running controller must not grow).
fn scale_http(dir: &Path, what: &str, objects: usize, runs: usize, workers: usize) -> Result<Vec<HttpRun>> {
    let served = serve_demo(dir, objects)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    (0..runs).map(|i| backup_over_http(&rt, &served, dir, &format!("{what}-{i}"), workers)).collect()
}

/// The scale run over HTTP at `objects`, in a fresh `blockwise bench` process of its own, so
/// that its peak RSS is not the mark of an earlier, larger run.
fn scale_http_child(dir: &Path, objects: usize, workers: usize) -> Result<HttpRun> {
    let sub = dir.join(format!("memory-{objects}"));
    let out = blockwise_child()?
        .args(["bench", "--only", "scale-http", "--objects", &objects.to_string(), "-o", "json"])
        .args(["--workers", &workers.to_string(), "--dir"])
        .arg(&sub)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running `blockwise bench --only scale-http`")?;
    anyhow::ensure!(out.status.success(), "`blockwise bench --only scale-http --objects {objects}` failed");
    let doc: Value = serde_json::from_slice(&out.stdout).context("reading the child bench's JSON")?;
    let f = |k: &str| doc[k].as_f64().with_context(|| format!("the child bench printed no {k}"));
    Ok(HttpRun {
        seconds: f("scale_http_seconds")?,
        peak_rss: f("scale_http_peak_rss_bytes")? as u64,
        rss_after: f("scale_http_rss_after_bytes")? as u64,
        items: f("scale_http_items")? as u64,
    })
}

/// A backup over HTTP killed (SIGKILL) about half way through its items, then `backup resume`d,
/// each in a `blockwise` process of its own: the resumed process's peak RSS (`ru_maxrss` of the
/// child) and its wall seconds. The killed run's progress is read from its live view
/// (`status.json`), which it rewrites as it goes.
#[derive(Debug, Clone, Copy, Default)]
struct ResumeRun {
    killed_at_items: u64,
    planned: u64,
    peak_rss: u64,
    seconds: f64,
}

fn resume_half_way(dir: &Path, objects: usize, workers: usize) -> Result<ResumeRun> {
    let served = serve_demo(dir, objects)?;
    let data = dir.join("resume-data");
    let blockwise = |args: &[&str]| -> Result<std::process::Command> {
        let mut c = blockwise_child()?;
        c.arg("--data-dir").arg(&data).args(args).args(["--workers", &workers.to_string()]);
        c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::inherit());
        Ok(c)
    };
    // `resume` reaches the cluster `create` recorded.
    let mut create = blockwise(&["backup", "create", "half"])?;
    create.arg("--kubeconfig").arg(&served.kubeconfig);
    let mut run = create.spawn().context("starting `backup create`")?;
    let status = data.join("backups/half/status.json");
    let (done, planned) = loop {
        if let Some(exit) = run.try_wait()? {
            anyhow::bail!("the backup ended ({exit}) before it was half way");
        }
        // Only the row is read: the whole view is tens of megabytes at a million objects.
        #[derive(serde::Deserialize)]
        struct Row {
            items: String,
        }
        #[derive(serde::Deserialize)]
        struct View {
            row: Row,
        }
        let row = std::fs::read(&status).ok().and_then(|b| serde_json::from_slice::<View>(&b).ok());
        let items = row.map(|v| v.row.items).unwrap_or_default();
        let (done, planned) = items.split_once('/').unwrap_or(("0", "0"));
        let (done, planned): (u64, u64) = (done.parse().unwrap_or(0), planned.parse().unwrap_or(0));
        if planned > 0 && done * 2 >= planned {
            break (done, planned);
        }
        // Polling another process's progress file: nothing to wait on but time.
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    run.kill().context("killing the backup")?;
    run.wait()?;
    let start = Instant::now();
    let child = blockwise(&["backup", "resume", "half"])?.spawn().context("starting `backup resume`")?;
    let (code, peak_rss) = wait_with_peak_rss(child)?;
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(code == 0, "`backup resume` exited {code}");
    Ok(ResumeRun { killed_at_items: done, planned, peak_rss, seconds })
}

/// Waits for `child`; its exit code and peak RSS in bytes (`wait4`'s `ru_maxrss`, KiB on Linux).
///
/// A child's `ru_maxrss` starts at the peak of the process that spawned it (Linux records the
/// address space it leaves at `exec`, which a vfork-style spawn shares with this process): a
/// child's peak at or below this process's own cannot be told from it, and is an error — spawn
/// measured children while this process is small (the sections that do run first).
fn wait_with_peak_rss(child: std::process::Child) -> Result<(i32, u64)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: `usage` is a plain C struct the call fills; `pid` is our own child, not yet reaped
    // (the `Child` is dropped without waiting).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    anyhow::ensure!(r == pid, "waiting for process {pid}: {}", std::io::Error::last_os_error());
    drop(child);
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    let (peak, own) = (usage.ru_maxrss as u64 * 1024, proc_status_bytes("VmHWM:"));
    anyhow::ensure!(
        peak > own,
        "the child's peak RSS ({} MiB) is not above this process's own ({} MiB): it cannot be measured from here",
        peak >> 20,
        own >> 20
    );
    Ok((code, peak))
}

/// A restore of the backup of a demo cluster into `simulator serve --empty`, in a `blockwise
/// restore create` process of its own: its peak RSS (`ru_maxrss`) and wall seconds, and the
/// objects it created. The archive is made first, by `backup create` over HTTP.
#[derive(Debug, Clone, Copy, Default)]
struct RestoreRun {
    archive_bytes: u64,
    created: u64,
    peak_rss: u64,
    seconds: f64,
}

fn restore_into_empty(dir: &Path, objects: usize, workers: usize) -> Result<RestoreRun> {
    let data = dir.join("restore-data");
    {
        // In a process of its own too: a child inherits the peak RSS of the process it is forked
        // from (Linux records the old address space's peak at exec), so this one stays small.
        let served = serve_demo(dir, objects)?;
        let status = blockwise_child()?
            .arg("--data-dir")
            .arg(&data)
            .args(["backup", "create", "restored", "--workers", &workers.to_string(), "--kubeconfig"])
            .arg(&served.kubeconfig)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .status()
            .context("running `backup create`")?;
        anyhow::ensure!(status.success(), "`backup create` of the archive to restore failed ({status})");
    }
    let archive = data.join("store/backups/restored/restored.tar.gz");
    let archive_bytes = std::fs::metadata(&archive).with_context(|| format!("reading {}", archive.display()))?.len();
    let empty = serve(&dir.join("empty.kubeconfig"), &["--empty"], "serving an empty cluster")?;
    let out_path = dir.join("restore.out");
    let out = std::fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let start = Instant::now();
    let child = blockwise_child()?
        .arg("--data-dir")
        .arg(&data)
        .args(["restore", "create", "bench", "--workers", &workers.to_string(), "--from-file"])
        .arg(&archive)
        .arg("--kubeconfig")
        .arg(&empty.kubeconfig)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().context("sharing the restore's output file")?)
        .stderr(out)
        .spawn()
        .context("starting `restore create`")?;
    let (code, peak_rss) = wait_with_peak_rss(child)?;
    let seconds = start.elapsed().as_secs_f64();
    let said = std::fs::read_to_string(&out_path).with_context(|| format!("reading {}", out_path.display()))?;
    // Its progress lines are many: an error quotes the end.
    let said = said.get(said.len().saturating_sub(4000)..).unwrap_or(&said).to_string();
    anyhow::ensure!(code == 0, "`restore create` exited {code}: {said}");
    // "restore bench Completed: N created, …"
    let created = said
        .lines()
        .find_map(|l| l.strip_prefix("restore bench Completed: "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .with_context(|| format!("the restore did not complete: {said}"))?;
    Ok(RestoreRun { archive_bytes, created, peak_rss, seconds })
}

struct Efficiency {
    workers: usize,
    /// Whether the fake CSI driver took [`EFFICIENCY_SNAPSHOTS`] (else it cut and readied at once).
    snapshot_latency: bool,
    makespan_ms: u64,
    ideal_ms: u64,
}

fn efficiency(objects: usize) -> Vec<Efficiency> {
    let spec = BackupSpec::new("efficiency");
    let mut out = Vec::new();
    for (workers, snapshot_latency) in [(1usize, true), (4, true), (16, true), (64, true), (16, false)] {
        let cfg = RunConfig::new(1, BTreeSet::new(), workers);
        let ecfg = EngineConfig { workers, ..EngineConfig::default() };
        let lat = EFFICIENCY_LATENCIES;
        let timing = if snapshot_latency { EFFICIENCY_SNAPSHOTS } else { Timing::default() };
        let csi = CsiConfig { default: Behaviour { timing, fault: None }, ..Default::default() };
        let cluster = demo_cluster(objects, DEMO_SEED).with_csi(csi);
        let options = BackupOptions { uid: "efficiency-bench".into(), ..BackupOptions::default() };
        let (cf, sf) = (ClusterFaults::default(), StoreFaults::default());
        let r = simulate_world(cluster, &spec, &options, cf, sf, &cfg, &ecfg, lat);
        // Which block each item and hooked pod is in (the plan), to add up each block's work.
        let mut block_of = BTreeMap::new();
        for e in &r.events {
            if let Event::BlockPlanned { blocks } = e {
                for b in blocks {
                    for k in b.items.iter().chain(b.hooks.iter().map(|h| &h.pod)) {
                        block_of.insert(k.clone(), b.id);
                    }
                }
            }
        }
        // Work per block from what the world actually did (fixed latencies): every exec's
        // duration, one store operation (latency + acknowledgement) per staged item, and each
        // snapshots' cut (creation to handle: the block's worker waits for it; a block's snapshots
        // are cut together, so its longest cut counts).
        let mut work: BTreeMap<u32, u64> = BTreeMap::new();
        let mut cuts: BTreeMap<u32, u64> = BTreeMap::new();
        let mut starts = BTreeMap::new();
        let mut first_effect = None;
        for rec in &r.records {
            match rec {
                Record::ExecStart { id, at_ms, pod, .. } => {
                    first_effect.get_or_insert(*at_ms);
                    starts.insert(*id, (*at_ms, pod.clone()));
                }
                Record::ExecEnd { id, at_ms, .. } => {
                    if let Some((start, pod)) = starts.get(id) {
                        if let Some(b) = block_of.get(pod) {
                            *work.entry(*b).or_default() += at_ms - start;
                        }
                    }
                }
                Record::Csi(CsiEvent::Cut { at_ms, created_ms, members, .. }) => {
                    // Creating the snapshot is the block's first effect when it has no pre-hook.
                    first_effect = Some(first_effect.map_or(*created_ms, |t: u64| t.min(*created_ms)));
                    if let Some(b) = members.first().and_then(|m| block_of.get(&m.claim)) {
                        let longest = cuts.entry(*b).or_default();
                        *longest = (*longest).max(at_ms - created_ms);
                    }
                }
                Record::Staged { at_ms, path, .. } => {
                    first_effect.get_or_insert(*at_ms);
                    let key = blockwise_simulator::check::item_of_path(path);
                    if let Some(b) = key.and_then(|k| block_of.get(&k)) {
                        *work.entry(*b).or_default() += lat.store_ms.0 + 1;
                    }
                }
                _ => {}
            }
        }
        for (b, ms) in &cuts {
            *work.entry(*b).or_default() += ms;
        }
        let cut_work: u64 = cuts.values().sum();
        let total: u64 = work.values().sum();
        let longest = work.values().copied().max().unwrap_or(0);
        let planned_ms = first_effect.map_or(0, |t| t - START_MS);
        // A lower bound on any schedule: the longest block; all work spread evenly; and the last
        // snapshot, cut no sooner than all cuts spread evenly, then ready `ready_ms` later.
        let ready_bound = if cut_work > 0 { cut_work.div_ceil(workers as u64) + timing.ready_ms } else { 0 };
        let ideal_ms = planned_ms + longest.max(total.div_ceil(workers as u64)).max(ready_bound);
        out.push(Efficiency { workers, snapshot_latency, makespan_ms: r.makespan_ms, ideal_ms });
    }
    out
}

struct LogBench {
    group_commit_eps: f64,
    raw_eps: f64,
    flush_per_event_eps: f64,
}

fn sample_event(i: usize) -> Event {
    let key = ItemKey::namespaced("", "configmaps", "bench", &format!("item-{i:08}"));
    Event::ItemWritten { block: (i / 4) as u32, attempt: 1, key, digest: [7; 32], bytes: 1500 }
}

fn log_bench(dir: &Path, events: usize, batch: usize) -> Result<LogBench> {
    let encoded: Vec<Vec<u8>> = (0..events).map(|i| encode_record(&sample_event(i))).collect();
    // blockwise's log: sled, one flush per batch.
    let gc_dir = dir.join("log-group-commit");
    let mut log = EventLog::create(&gc_dir, "bench")?;
    log.append(0, &Event::BackupRequested { spec: BackupSpec::new("bench"), workers: 1, at_ms: 0 })?;
    let start = Instant::now();
    for (i, rec) in encoded.iter().enumerate() {
        log.append_encoded(i as u64 + 1, rec)?;
        if (i + 1) % batch == 0 {
            log.flush()?;
        }
    }
    log.flush()?;
    let group_commit_eps = events as f64 / start.elapsed().as_secs_f64();
    drop(log);
    // Raw: the same bytes appended to a file, fdatasync per batch.
    let raw_path = dir.join("log-raw.bin");
    let mut f = std::fs::File::create(&raw_path)?;
    let start = Instant::now();
    for (i, rec) in encoded.iter().enumerate() {
        f.write_all(rec)?;
        if (i + 1) % batch == 0 {
            f.sync_data()?;
        }
    }
    f.sync_data()?;
    let raw_eps = events as f64 / start.elapsed().as_secs_f64();
    // For reference: a flush per event (a tenth of the events).
    let n = (events / 10).max(100);
    let fpe_dir = dir.join("log-flush-per-event");
    let mut log = EventLog::create(&fpe_dir, "bench")?;
    log.append(0, &Event::BackupRequested { spec: BackupSpec::new("bench"), workers: 1, at_ms: 0 })?;
    let start = Instant::now();
    for (i, rec) in encoded.iter().take(n).enumerate() {
        log.append_encoded(i as u64 + 1, rec)?;
        log.flush()?;
    }
    let flush_per_event_eps = n as f64 / start.elapsed().as_secs_f64();
    Ok(LogBench { group_commit_eps, raw_eps, flush_per_event_eps })
}

struct Recovery {
    events: usize,
    open_verify_seconds: f64,
    fold_seconds: f64,
    first_work_seconds: f64,
}

fn recovery(dir: &Path, scale_log: &Path) -> Result<Recovery> {
    let start = Instant::now();
    let (log, events, _) = EventLog::open(scale_log)?;
    let open_verify_seconds = start.elapsed().as_secs_f64();
    drop(log);
    let start = Instant::now();
    let state = BackupState::fold(&events)?;
    let fold_seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(&state);
    // The same backup cut halfway: a log of the first half of its events, then resume.
    let half = &events[..events.len() / 2];
    let half_dir = dir.join("half-log");
    let mut log = EventLog::create(&half_dir, "scale")?;
    for (i, e) in half.iter().enumerate() {
        log.append(i as u64, e)?;
    }
    log.flush()?;
    drop(log);
    let start = Instant::now();
    let (_log, events, _) = EventLog::open(&half_dir)?;
    let mut engine = Engine::resume(&events, EngineConfig::default(), 0)?;
    let mut polls = 0;
    while engine.poll().commands.is_empty() && polls < 4 {
        polls += 1;
    }
    let first_work_seconds = start.elapsed().as_secs_f64();
    Ok(Recovery { events: state.events as usize, open_verify_seconds, fold_seconds, first_work_seconds })
}

fn plan_seconds(objects: usize) -> Result<f64> {
    let cluster = demo_cluster(objects, DEMO_SEED);
    let types = demo_resource_types();
    let items: Vec<Item> = cluster
        .objects()
        .enumerate()
        .filter_map(|(i, (gr, v))| {
            types.iter().find(|t| &t.gr == gr).and_then(|rt| Item::from_value(rt, i, v.clone()).ok())
        })
        .collect();
    let spec = BackupSpec::new("plan");
    let selection = Selection::compile(&spec)?;
    let actions = builtin_actions(&spec.volume_group_label);
    let not_found = BTreeSet::new();
    let start = Instant::now();
    let index = Index::new(items, &spec.volume_group_label);
    let input = PlanInput {
        selection: &selection,
        resources: &types,
        not_found: &not_found,
        fetch_failed: &not_found,
        actions: &actions,
    };
    let step = plan(&input, &index);
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(matches!(step, PlanStep::Done(_)));
    Ok(seconds)
}

fn sim_seeds_per_cpu_second(seeds: u64) -> f64 {
    let all: BTreeSet<FaultKind> = FaultKind::ALL.into_iter().collect();
    let start = cpu_seconds();
    for seed in 0..seeds {
        std::hint::black_box(check_seed(seed, &all, false, None));
    }
    seeds as f64 / (cpu_seconds() - start).max(1e-9)
}

/// The sections of `blockwise bench`, in the order they run.
pub const SECTIONS: [&str; 11] = [
    "resume",
    "restore",
    "scale-http",
    "memory",
    "back-to-back",
    "scale",
    "efficiency",
    "log",
    "recovery",
    "grouping",
    "simulator",
];

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Smoke sizes.
    pub quick: bool,
    /// JSON instead of the table.
    pub json_out: bool,
    /// Scratch directory.
    pub dir: Option<PathBuf>,
    /// Only these sections (all when empty); `recovery` needs `scale`.
    pub only: Vec<String>,
    /// Objects of the scale rows instead of the size's default.
    pub objects: Option<usize>,
    /// Blocks in parallel in the scale rows.
    pub workers: usize,
}

/// Runs the sections asked for and prints the table (or JSON); a section not run is `null`.
pub fn run(opts: BenchOptions) -> Result<()> {
    for s in &opts.only {
        anyhow::ensure!(
            SECTIONS.contains(&s.as_str()),
            "--only {s}: no such section (sections: {})",
            SECTIONS.join(", ")
        );
    }
    let on = |s: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == s);
    let (quick, json_out, opts_workers) = (opts.quick, opts.json_out, opts.workers);
    let mut sizes = if quick { Sizes::QUICK } else { Sizes::FULL };
    if let Some(n) = opts.objects {
        sizes.scale_objects = n;
        sizes.resume_objects = n;
        sizes.restore_objects = n;
    }
    let dir = opts.dir.unwrap_or_else(|| std::env::temp_dir().join(format!("blockwise-bench-{}", std::process::id())));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let progress = |what: &str| {
        if !json_out {
            eprintln!("bench: {what}…");
        }
    };
    // The sections that measure a child process first, while this process is small (see
    // `wait_with_peak_rss`); then over HTTP, its peak RSS then the backup's own.
    let resumed = if on("resume") {
        progress(&format!(
            "resume: a backup of {} objects over HTTP killed half way, then resumed",
            sizes.resume_objects
        ));
        Some(resume_half_way(&dir, sizes.resume_objects, opts.workers)?)
    } else {
        None
    };
    let restored = if on("restore") {
        progress(&format!(
            "restore: a backup of {} objects restored into an empty cluster, in a process of its own",
            sizes.restore_objects
        ));
        Some(restore_into_empty(&dir, sizes.restore_objects, opts.workers)?)
    } else {
        None
    };
    let http = if on("scale-http") {
        progress(&format!("scale over HTTP, {} objects (the server in another process)", sizes.scale_objects));
        scale_http(&dir, "scale-http", sizes.scale_objects, 1, opts.workers)?.pop()
    } else {
        None
    };
    let mut memory = Vec::new();
    if on("memory") {
        for &n in sizes.memory_objects {
            progress(&format!("memory: scale over HTTP, {n} objects, in a process of its own"));
            memory.push((n, scale_http_child(&dir, n, opts.workers)?));
        }
    }
    let b2b = if on("back-to-back") {
        progress(&format!(
            "two backups of {} objects over HTTP, one after the other in one process",
            sizes.scale_objects
        ));
        Some(scale_http(&dir, "back-to-back", sizes.scale_objects, 2, opts.workers)?)
    } else {
        None
    };
    let sc = if on("scale") {
        progress(&format!("scale, {} objects", sizes.scale_objects));
        Some(scale(&dir, sizes.scale_objects, opts.workers)?)
    } else {
        None
    };
    let eff = if on("efficiency") {
        progress(&format!("parallel efficiency, {} objects", sizes.efficiency_objects));
        efficiency(sizes.efficiency_objects)
    } else {
        Vec::new()
    };
    let lb = if on("log") {
        progress(&format!("event log, {} events", sizes.log_events));
        Some(log_bench(&dir, sizes.log_events, sizes.log_batch_events)?)
    } else {
        None
    };
    let rc = match (&sc, on("recovery")) {
        (Some(sc), true) => {
            progress("recovery");
            Some(recovery(&dir, &sc.log_dir)?)
        }
        _ => None,
    };
    let mut plans = Vec::new();
    if on("grouping") {
        progress("grouping");
        for n in sizes.plan_objects {
            plans.push((n, plan_seconds(n)?));
        }
    }
    let sim = if on("simulator") {
        progress(&format!("simulator, {} seeds", sizes.sim_seeds));
        Some(sim_seeds_per_cpu_second(sizes.sim_seeds))
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);

    let eff16 = eff
        .iter()
        .find(|e| e.workers == 16 && e.snapshot_latency)
        .map(|e| e.ideal_ms as f64 / e.makespan_ms.max(1) as f64);
    let mut doc = json!({
        "quick": quick,
        "scale_objects": sizes.scale_objects,
        "scale_workers": opts_workers,
        "scale_items": sc.as_ref().map(|s| s.items),
        "scale_seconds": sc.as_ref().map(|s| s.seconds),
        "scale_items_per_second": sc.as_ref().map(|s| s.items as f64 / s.seconds.max(1e-9)),
        "scale_peak_rss_bytes": sc.as_ref().map(|s| s.peak_rss),
        "scale_cluster_rss_bytes": sc.as_ref().map(|s| s.cluster_rss),
        "scale_events": sc.as_ref().map(|s| s.events),
        "scale_floor_seconds": sc.as_ref().map(|s| s.floor_seconds),
        "scale_http_items": http.map(|h| h.items),
        "scale_http_seconds": http.map(|h| h.seconds),
        "scale_http_peak_rss_bytes": http.map(|h| h.peak_rss),
        "scale_http_rss_after_bytes": http.map(|h| h.rss_after),
        "memory": memory.iter().map(|(n, h)| json!({"objects": n, "items": h.items, "seconds": h.seconds, "peak_rss_bytes": h.peak_rss})).collect::<Vec<_>>(),
        "memory_growth_100k_to_1m": growth(&memory, 100_000, 1_000_000),
        "memory_growth_100k_1m": growth(&memory, 100_000, 1_000_000),
        "memory_1m_peak_rss_bytes": memory.iter().find(|(n, _)| *n == 1_000_000).map(|(_, h)| h.peak_rss),
        "resume_objects": resumed.map(|_| sizes.resume_objects),
        "resume_killed_at_items": resumed.map(|r| r.killed_at_items),
        "resume_planned_items": resumed.map(|r| r.planned),
        "resume_peak_rss_bytes": resumed.map(|r| r.peak_rss),
        "resume_seconds": resumed.map(|r| r.seconds),
        "resume_1m_peak_rss_bytes": resumed.filter(|_| sizes.resume_objects == 1_000_000).map(|r| r.peak_rss),
        "back_to_back": b2b.as_ref().map(|runs| runs.iter().map(|h| json!({"items": h.items, "seconds": h.seconds, "peak_rss_bytes": h.peak_rss, "rss_after_bytes": h.rss_after})).collect::<Vec<_>>()),
        "efficiency_objects": sizes.efficiency_objects,
        "efficiency_workers_16": eff16,
        "log_events": sizes.log_events,
        "log_batch_events": sizes.log_batch_events,
        "log_events_per_second": lb.as_ref().map(|l| l.group_commit_eps),
        "log_raw_events_per_second": lb.as_ref().map(|l| l.raw_eps),
        "log_ratio_to_raw": lb.as_ref().map(|l| l.group_commit_eps / l.raw_eps.max(1e-9)),
        "log_flush_per_event_events_per_second": lb.as_ref().map(|l| l.flush_per_event_eps),
        "recovery_events": rc.as_ref().map(|r| r.events),
        "recovery_open_verify_seconds": rc.as_ref().map(|r| r.open_verify_seconds),
        "recovery_fold_seconds_1m": rc.as_ref().map(|r| r.fold_seconds),
        "recovery_first_work_seconds": rc.as_ref().map(|r| r.first_work_seconds),
        "plan_seconds_300k": plans.get(2).map(|p| p.1),
        "sim_seeds": sizes.sim_seeds,
        "sim_seeds_per_cpu_second": sim,
    });
    for e in &eff {
        let key =
            format!("efficiency_workers_{}{}", e.workers, if e.snapshot_latency { "" } else { "_instant_snapshots" });
        doc[key] = json!(e.ideal_ms as f64 / e.makespan_ms.max(1) as f64);
    }
    for (n, s) in &plans {
        doc[format!("plan_seconds_{n}")] = json!(s);
    }
    // (Beside the rest: one `json!` of every key passes the macro's recursion limit.)
    let at_300k = restored.filter(|_| sizes.restore_objects == 300_000);
    for (key, value) in [
        ("restore_objects", json!(restored.map(|_| sizes.restore_objects))),
        ("restore_archive_bytes", json!(restored.map(|r| r.archive_bytes))),
        ("restore_created", json!(restored.map(|r| r.created))),
        ("restore_peak_rss_bytes", json!(restored.map(|r| r.peak_rss))),
        ("restore_seconds", json!(restored.map(|r| r.seconds))),
        ("restore_300k_peak_rss_bytes", json!(at_300k.map(|r| r.peak_rss))),
        ("restore_300k_seconds", json!(at_300k.map(|r| r.seconds))),
    ] {
        doc[key] = value;
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let row = |k: &str, v: String, target: &str| println!("{k:<48} {v:>20}  {target}");
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "blockwise bench{} ({} cores)",
        if quick { " --quick" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // How far a 300k row is from its target (the targets are set for 300k objects).
    let versus = |value: f64, target: f64| {
        if sizes.scale_objects != 300_000 {
            String::new()
        } else if value <= target {
            ": met".to_string()
        } else {
            format!(": missed, {:.1}x it", value / target)
        }
    };
    if let Some(h) = http {
        row("scale-http: objects / items written", format!("{} / {}", sizes.scale_objects, h.items), "");
        row("scale-http: workers", opts_workers.to_string(), "");
        let mut note = format!("target <= 60 s at 300k{}", versus(h.seconds, 60.0));
        if let Some(sc) = &sc {
            note.push_str(&format!("; {:.1}x the floor", h.seconds / sc.floor_seconds.max(1e-9)));
        }
        row("scale-http: wall seconds", format!("{:.2}", h.seconds), &note);
        let note = format!("target <= 256 MiB{}", versus(mib(h.peak_rss), 256.0));
        row("scale-http: peak RSS MiB", format!("{:.0}", mib(h.peak_rss)), &note);
    }
    for (n, h) in &memory {
        row(
            &format!("memory: {n} objects, peak RSS MiB (s)"),
            format!("{:.0} ({:.1})", mib(h.peak_rss), h.seconds),
            "",
        );
    }
    if let Some(g) = growth(&memory, 100_000, 1_000_000) {
        row("memory: peak RSS growth 100k -> 1M", format!("{g:.2}x"), "target < 1.3x");
    }
    if let Some(r) = resumed {
        row(
            &format!("resume: {} objects, killed at item", sizes.resume_objects),
            format!("{} / {}", r.killed_at_items, r.planned),
            "",
        );
        row(
            "resume: peak RSS MiB (s)",
            format!("{:.0} ({:.1})", mib(r.peak_rss), r.seconds),
            "target <= 256 MiB at 1M",
        );
    }
    if let Some(r) = restored {
        row(
            &format!("restore: {} objects, archive MiB / created", sizes.restore_objects),
            format!("{:.0} / {}", mib(r.archive_bytes), r.created),
            "",
        );
        let note = match sizes.restore_objects {
            300_000 if mib(r.peak_rss) <= 256.0 => "target <= 256 MiB at 300k: met".to_string(),
            300_000 => format!("target <= 256 MiB at 300k: missed, {:.1}x it", mib(r.peak_rss) / 256.0),
            _ => "target <= 256 MiB at 300k".to_string(),
        };
        row("restore: peak RSS MiB (s)", format!("{:.0} ({:.1})", mib(r.peak_rss), r.seconds), &note);
    }
    if let Some(runs) = &b2b {
        for (i, h) in runs.iter().enumerate() {
            row(
                &format!("back-to-back: backup {} peak / RSS after MiB (s)", i + 1),
                format!("{:.0} / {:.0} ({:.1})", mib(h.peak_rss), mib(h.rss_after), h.seconds),
                "",
            );
        }
    }
    if let Some(sc) = &sc {
        row("scale: objects / items written", format!("{} / {}", sizes.scale_objects, sc.items), "");
        row("scale: floor: parse + deflate all JSON (s)", format!("{:.2}", sc.floor_seconds), "every core");
        let note = format!("target <= 60 s at 300k; {:.1}x the floor", sc.seconds / sc.floor_seconds.max(1e-9));
        row("scale: wall seconds", format!("{:.2}", sc.seconds), &note);
        row("scale: items/s", format!("{:.0}", sc.items as f64 / sc.seconds.max(1e-9)), "");
        row(
            "scale: peak RSS MiB (fake cluster's share)",
            format!("{:.0} ({:.0})", mib(sc.peak_rss), mib(sc.cluster_rss)),
            "target <= 256 MiB for blockwise's own share",
        );
    }
    for e in &eff {
        let pct = 100.0 * e.ideal_ms as f64 / e.makespan_ms.max(1) as f64;
        let what = if e.snapshot_latency { "" } else { ", instant snapshots" };
        row(
            &format!("efficiency: {} workers{what} (makespan / ideal ms)", e.workers),
            format!("{pct:.1}% ({}/{})", e.makespan_ms, e.ideal_ms),
            if e.workers == 16 && e.snapshot_latency { "target >= 90%" } else { "" },
        );
    }
    if let Some(lb) = &lb {
        row(
            &format!("log: group commit, batch {} (events/s)", sizes.log_batch_events),
            format!("{:.0}", lb.group_commit_eps),
            "target >= 50k",
        );
        row("log: raw write + fdatasync, same batch (events/s)", format!("{:.0}", lb.raw_eps), "");
        row(
            "log: ratio to raw",
            format!("{:.1}%", 100.0 * lb.group_commit_eps / lb.raw_eps.max(1e-9)),
            "target >= 50%",
        );
        row("log: flush per event (events/s)", format!("{:.0}", lb.flush_per_event_eps), "reference");
    }
    if let Some(rc) = &rc {
        row(&format!("recovery: open + verify {} events (s)", rc.events), format!("{:.3}", rc.open_verify_seconds), "");
        row(
            &format!("recovery: fold {} events (s)", rc.events),
            format!("{:.3}", rc.fold_seconds),
            "target <= 1 s at 1M",
        );
        row("recovery: resume halfway, time to first work (s)", format!("{:.3}", rc.first_work_seconds), "");
    }
    for (n, s) in &plans {
        row(
            &format!("grouping: plan {n} objects (s, us/object)"),
            format!("{s:.3}, {:.2}", s * 1e6 / *n as f64),
            "near-linear",
        );
    }
    if let Some(sim) = sim {
        row(
            &format!("simulator: seeds/CPU-s, all faults ({} seeds)", sizes.sim_seeds),
            format!("{sim:.1}"),
            "target >= 50",
        );
    }
    Ok(())
}

/// Peak RSS at `to` objects over peak RSS at `from`, when both were measured.
fn growth(memory: &[(usize, HttpRun)], from: usize, to: usize) -> Option<f64> {
    let at = |n: usize| memory.iter().find(|(m, _)| *m == n).map(|(_, h)| h.peak_rss as f64);
    Some(at(to)? / at(from)?.max(1.0))
}
