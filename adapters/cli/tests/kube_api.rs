//! The kube path, end to end: the simulator's fake API server on loopback, reached by kube-rs
//! (in-process, and through the real `blockwise` binary) and by the installed `kubectl`.
//!
//! Each test starts its own server on `127.0.0.1:0` on a runtime the test owns, so it stops when the
//! test ends; kubeconfigs and data directories live in a tempdir, and `HOME`/`KUBECONFIG` are
//! overridden so nothing outside is read. The archive made through kube-rs must be byte-identical
//! to the one made from the same demo cluster in memory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use blockwise_adapters::kube::KubeCluster;
use blockwise_adapters::retry::{RetryPolicy, RetryingCluster};
use blockwise_adapters::world::TokioRuntime;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::ports::{Cluster, ClusterError};
use blockwise_simulator::demo::{demo_cluster, demo_namespaces, DEMO_SEED};
use blockwise_simulator::fake::{ExecScript, FakeCluster};
use blockwise_simulator::server::{FakeApiServer, Fault, Verb};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_blockwise");
const DEMO_OBJECTS: usize = 300;

/// A fake API server on its own runtime, with a kubeconfig for it in a tempdir.
struct Served {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

fn serve(cluster: FakeCluster) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = Arc::new(cluster.with_clock(Arc::new(TokioRuntime)));
    let server = rt.block_on(FakeApiServer::start(cluster, "127.0.0.1:0".parse().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    Served { server, kubeconfig, dir, rt }
}

fn serve_demo() -> Served {
    // As `simulator serve` and the in-memory demo: the demo's fake CSI driver.
    serve(demo_cluster(DEMO_OBJECTS, DEMO_SEED).with_csi(blockwise_simulator::demo::demo_csi(0)))
}

impl Served {
    fn cluster(&self) -> RetryingCluster {
        let fast = RetryPolicy { attempts_max: 4, backoff_base_ms: 5, backoff_max_ms: 20, attempt_deadline_ms: 30_000 };
        let kube = self.rt.block_on(KubeCluster::connect(Some(&self.kubeconfig), None)).unwrap();
        RetryingCluster::new(Arc::new(kube), fast, Arc::new(TokioRuntime))
    }

    fn blockwise(&self, data: &Path, args: &[&str]) -> Output {
        blockwise(self.dir.path(), data, args)
    }
}

fn blockwise(home: &Path, data: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data)
        .args(common::with_test_uid(args))
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .output()
        .expect("running blockwise")
}

fn archive(data: &Path, name: &str) -> Vec<u8> {
    let p = data.join("store").join("backups").join(name).join(format!("{name}.tar.gz"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn check_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}\nstdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
}

/// The in-memory demo backup of the same size, as the reference archive.
fn in_memory_archive(home: &Path, name: &str) -> Vec<u8> {
    let data = home.join("in-memory");
    let objects = DEMO_OBJECTS.to_string();
    let out =
        blockwise(home, &data, &["backup", "create", name, "--demo", "--demo-faults", "--demo-objects", &objects]);
    check_exit(&out, 3, "the demo has one failing Fail-mode pre-hook: PartiallyFailed");
    archive(&data, name)
}

fn describe_json(home: &Path, data: &Path, name: &str) -> Value {
    let out = blockwise(home, data, &["backup", "describe", name, "-o", "json"]);
    check_exit(&out, 0, "describe");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn exec_records_sorted(records: Vec<blockwise_simulator::fake::ExecRecord>) -> Vec<(ItemKey, String, Vec<String>)> {
    let mut v: Vec<_> = records.into_iter().map(|r| (r.pod, r.container, r.command)).collect();
    v.sort();
    v
}

#[test]
fn backup_through_kube_rs_equals_the_in_memory_archive() {
    let s = serve_demo();
    let expected = in_memory_archive(s.dir.path(), "same");
    let data = s.dir.path().join("kube");
    let kc = s.kubeconfig.to_str().unwrap();
    let out = s.blockwise(&data, &["backup", "create", "same", "--kubeconfig", kc, "--page-size", "40"]);
    check_exit(&out, 3, "through the fake API server, the same failing pre-hook");
    assert!(text(&out.stderr).contains(&s.server.url()), "names the server: {}", text(&out.stderr));
    assert!(archive(&data, "same") == expected, "the archive through kube-rs differs from the in-memory one");

    // The same hooks ran, through WebSocket exec.
    let in_memory =
        blockwise_simulator::fake::read_exec_log(s.dir.path().join("in-memory/backups/same/demo-exec.jsonl"))
            .expect("in-memory exec log");
    assert_eq!(exec_records_sorted(s.server.cluster().exec_records()), exec_records_sorted(in_memory));
    // Lists were paginated with the page size asked for.
    let reqs = s.server.requests();
    assert!(reqs.iter().any(|r| r.query.contains("limit=40") && r.query.contains("continue=")), "no continued list");
    // The cluster source is recorded without credentials, for resume.
    let source = std::fs::read_to_string(data.join("backups/same/cluster.json")).unwrap();
    let source: Value = serde_json::from_str(&source).unwrap();
    assert_eq!(source["kind"], "kube");
    assert_eq!(source["kubeconfig"].as_str(), Some(kc));
}

#[test]
fn expired_continue_token_restarts_the_listing_and_the_archive_is_unchanged() {
    let s = serve_demo();
    let expected = in_memory_archive(s.dir.path(), "gone");
    s.server.faults().add(Fault::new(Verb::List, Some("pods"), 410, 1).on_continue());
    let data = s.dir.path().join("kube");
    let kc = s.kubeconfig.to_str().unwrap();
    let out = s.blockwise(&data, &["backup", "create", "gone", "--kubeconfig", kc, "--page-size", "7"]);
    check_exit(&out, 3, "410 restarts the pods listing");
    assert!(archive(&data, "gone") == expected, "the archive after a 410 restart differs");
    let reqs = s.server.requests();
    let gone = reqs.iter().position(|r| r.status == 410 && r.path.ends_with("/pods")).expect("a 410 was served");
    let restarted = reqs[gone + 1..].iter().any(|r| r.path.ends_with("/pods") && !r.query.contains("continue="));
    assert!(restarted, "the pods listing was not restarted from the beginning after the 410");
}

#[test]
fn forbidden_resource_is_named_and_the_backup_goes_on_partially_failed() {
    let s = serve_demo();
    s.server.faults().add(Fault::new(Verb::List, Some("secrets"), 403, u32::MAX));
    let data = s.dir.path().join("kube");
    let kc = s.kubeconfig.to_str().unwrap();
    let out = s.blockwise(&data, &["backup", "create", "denied", "--kubeconfig", kc]);
    check_exit(&out, 3, "a 403 on one resource: PartiallyFailed, not Failed");
    let d = describe_json(s.dir.path(), &data, "denied");
    let errors = d.to_string();
    assert!(errors.contains("secrets") && errors.contains("403"), "the 403 names secrets: {errors}");
    let archive = archive(&data, "denied");
    assert!(archive.len() > 1000, "the rest of the cluster was backed up");
}

#[test]
fn bad_kubeconfig_and_unknown_context_are_usage_errors_that_name_them() {
    let s = serve_demo();
    let garbage = s.dir.path().join("garbage.yaml");
    std::fs::write(&garbage, "clusters: [this is: not: a kubeconfig").unwrap();
    let data = s.dir.path().join("data");
    let out = s.blockwise(&data, &["backup", "create", "bad", "--kubeconfig", garbage.to_str().unwrap()]);
    check_exit(&out, 2, "an unparsable kubeconfig is a usage error");
    assert!(text(&out.stderr).contains("garbage.yaml"), "names the file: {}", text(&out.stderr));

    let missing = s.dir.path().join("nope.yaml");
    let out = s.blockwise(&data, &["backup", "create", "bad", "--kubeconfig", missing.to_str().unwrap()]);
    check_exit(&out, 2, "a missing kubeconfig is a usage error");
    assert!(text(&out.stderr).contains("nope.yaml"), "names the file: {}", text(&out.stderr));

    let kc = s.kubeconfig.to_str().unwrap();
    let out = s.blockwise(&data, &["backup", "create", "bad", "--kubeconfig", kc, "--context", "elsewhere"]);
    check_exit(&out, 2, "an unknown context is a usage error");
    assert!(text(&out.stderr).contains("elsewhere"), "names the context: {}", text(&out.stderr));
    assert!(!data.join("backups/bad").exists(), "nothing is left behind by a refused create");
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was just free and is closed now.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, blockwise_simulator::server::kubeconfig_for(&url)).unwrap();
    let data = dir.path().join("data");
    let out = blockwise(dir.path(), &data, &["backup", "create", "far", "--kubeconfig", kc.to_str().unwrap()]);
    check_exit(&out, 1, "an unreachable server fails the command");
    let err = text(&out.stderr);
    assert!(err.contains("cannot reach the Kubernetes API server") && err.contains(&url), "{err}");
    assert!(err.contains("blockwise-simulator"), "names the context: {err}");
}

#[test]
fn discovery_list_and_get_through_kube_rs_match_the_fake_cluster() {
    let s = serve_demo();
    let c = s.cluster();
    let mut got = s.rt.block_on(c.discover()).unwrap();
    let mut want = s.server.cluster().resources().to_vec();
    got.sort();
    want.sort();
    assert_eq!(got, want);

    // Small pages: every pod exactly once, in the fake cluster's order, over many requests.
    let pods = ResourceType::new("", "v1", "pods", "Pod", true);
    let all = s.rt.block_on(s.server.cluster().list(&pods, None, 0, None)).unwrap().objects;
    let mut paged = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10_000 {
        let page = s.rt.block_on(c.list(&pods, None, 3, token.as_deref())).unwrap();
        assert!(page.objects.len() <= 3);
        paged.extend(page.objects);
        token = page.continue_token;
        if token.is_none() {
            break;
        }
    }
    assert!(token.is_none(), "the listing did not end");
    let norm = |v: &[String]| v.iter().map(|s| serde_json::from_str::<Value>(s).unwrap()).collect::<Vec<_>>();
    assert_eq!(norm(&paged), norm(&all));
    assert!(all.len() > 9, "the demo has more than three pages of pods");
    let limited =
        s.server.requests().iter().filter(|r| r.path == "/api/v1/pods" && r.query.contains("limit=3")).count();
    assert_eq!(limited, all.len().div_ceil(3));

    // A namespaced list and a get; a missing object is None.
    let ns = &demo_namespaces(DEMO_OBJECTS)[0];
    let in_ns = s.rt.block_on(c.list(&pods, Some(ns), 0, None)).unwrap().objects;
    assert!(!in_ns.is_empty() && in_ns.len() < all.len());
    let first: Value = serde_json::from_str(&in_ns[0]).unwrap();
    let name = first["metadata"]["name"].as_str().unwrap();
    let got = s.rt.block_on(c.get(&pods, &ItemKey::namespaced("", "pods", ns, name))).unwrap().unwrap();
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!((got["kind"].as_str(), got["apiVersion"].as_str()), (Some("Pod"), Some("v1")));
    assert_eq!(s.rt.block_on(c.get(&pods, &ItemKey::namespaced("", "pods", ns, "ghost"))).unwrap(), None);
}

#[test]
fn throttling_and_server_errors_are_retried_then_reported_naming_the_resource() {
    let s = serve_demo();
    let c = s.cluster();
    let cms = ResourceType::new("", "v1", "configmaps", "ConfigMap", true);
    let deploys = ResourceType::new("apps", "v1", "deployments", "Deployment", true);
    s.server.faults().add(Fault::new(Verb::List, Some("configmaps"), 429, 2));
    s.server.faults().add(Fault::new(Verb::List, Some("deployments.apps"), 503, 1));
    s.server.faults().add(Fault::new(Verb::List, Some("deployments.apps"), 500, 1));
    assert!(!s.rt.block_on(c.list(&cms, None, 0, None)).unwrap().objects.is_empty());
    assert!(!s.rt.block_on(c.list(&deploys, None, 0, None)).unwrap().objects.is_empty());
    let statuses: Vec<u16> = s.server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 429, 200, 503, 500, 200]);

    // Past the attempt bound, the error is Unavailable and names the resource.
    s.server.faults().add(Fault::new(Verb::List, Some("configmaps"), 503, u32::MAX));
    let e = s.rt.block_on(c.list(&cms, Some("x"), 0, None)).unwrap_err();
    assert!(matches!(&e, ClusterError::Unavailable(m) if m.contains("configmaps") && m.contains("4 attempts")), "{e}");
    // 410 and 403 are not retried.
    s.server.faults().clear();
    s.server.faults().add(Fault::new(Verb::List, Some("configmaps"), 410, 1));
    assert!(matches!(s.rt.block_on(c.list(&cms, None, 5, None)), Err(ClusterError::Expired(_))));
    s.server.faults().add(Fault::new(Verb::List, Some("configmaps"), 403, 1));
    let e = s.rt.block_on(c.list(&cms, None, 5, None)).unwrap_err();
    assert!(matches!(&e, ClusterError::Forbidden(m) if m.contains("configmaps")), "{e}");
}

fn scripted() -> (FakeCluster, ItemKey) {
    let mut c = demo_cluster(DEMO_OBJECTS, DEMO_SEED);
    let pod = blockwise_simulator::demo::demo_failing_hook_pod();
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    c.script_exec(pod.clone(), words(&["hang"]), ExecScript::Hang);
    c.script_exec(pod.clone(), words(&["seven"]), ExecScript::Exit(7));
    c.script_exec(pod.clone(), words(&["broken"]), ExecScript::Error("stream reset by peer".into()));
    (c, pod)
}

fn container_of(s: &Served, pod: &ItemKey) -> String {
    let obj = s.server.cluster().object(pod).unwrap();
    obj["spec"]["containers"][0]["name"].as_str().unwrap().to_string()
}

#[test]
fn exec_outcomes_through_websocket() {
    let (cluster, pod) = scripted();
    let s = serve(cluster);
    let c = s.cluster();
    let container = container_of(&s, &pod);
    let run = |w: &[&str]| {
        let cmd: Vec<String> = w.iter().map(|s| s.to_string()).collect();
        s.rt.block_on(c.exec(&pod, &container, &cmd))
    };
    let ok = run(&["/sbin/fsfreeze", "--freeze", "/data"]).unwrap();
    assert_eq!((ok.exit_code, ok.stdout.as_str()), (0, "ok"));
    assert_eq!(run(&["/bin/sh", "-c", "exit 3"]).unwrap().exit_code, 3);
    assert_eq!(run(&["seven"]).unwrap().exit_code, 7);
    let e = run(&["broken"]).unwrap_err();
    assert!(e.to_string().contains("stream reset by peer") && e.to_string().contains(pod.name()), "{e}");
    let cmd = vec!["true".to_string()];
    let e = s.rt.block_on(c.exec(&pod, "no-such-container", &cmd)).unwrap_err();
    assert!(e.to_string().contains("no-such-container"), "{e}");
    let ghost = ItemKey::namespaced("", "pods", pod.namespace().unwrap(), "ghost");
    let e = s.rt.block_on(c.exec(&ghost, &container, &cmd)).unwrap_err();
    assert!(e.to_string().contains("ghost"), "{e}");
    let recorded = s.server.cluster().exec_records();
    assert_eq!(recorded.len(), 5, "the missing pod is refused before any exec: {recorded:?}");
    assert_eq!(recorded[2].command, vec!["seven".to_string()]);
}

#[test]
fn exec_timeout_cancels_the_stream() {
    let (cluster, pod) = scripted();
    let s = serve(cluster);
    let c = s.cluster();
    let container = container_of(&s, &pod);
    let cmd = vec!["hang".to_string()];
    let timed_out =
        s.rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), c.exec(&pod, &container, &cmd)).await });
    assert!(timed_out.is_err(), "a hanging exec must not return: {timed_out:?}");
    // Dropping the exec future closed the WebSocket: the server sees the cancel (bounded wait).
    let mut seen = 0;
    for _ in 0..500 {
        seen = s.server.execs_cancelled();
        if seen > 0 {
            break;
        }
        s.rt.block_on(async { tokio::time::sleep(Duration::from_millis(10)).await });
    }
    assert_eq!(seen, 1, "the server did not see the exec stream cancelled");
}

/// Runs the installed kubectl against the server, with its own HOME (discovery cache) and a bound.
fn kubectl(s: &Served, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .arg("--request-timeout=30s")
        .args(args)
        .env("HOME", s.dir.path())
        .env_remove("KUBECONFIG")
        .output()
        .expect("running kubectl (it is installed on development and CI machines)")
}

/// The restore target: no objects, creates admitted as an API server admits them.
#[test]
fn an_empty_cluster_takes_creates_only_in_namespaces_that_exist() {
    let s = serve(blockwise_simulator::demo::empty_cluster().with_csi(blockwise_simulator::demo::demo_csi(0)));
    let out = kubectl(&s, &["get", "configmaps", "-A", "-o", "name"]);
    assert!(out.status.success() && text(&out.stdout).trim().is_empty(), "{}", text(&out.stderr));
    // Manifests as JSON files: `kubectl create -f` sends them as they are.
    let file = |name: &str, v: Value| {
        let path = s.dir.path().join(name);
        std::fs::write(&path, v.to_string()).unwrap();
        path.to_string_lossy().into_owned()
    };
    let cm = |ns: &str| {
        file(
            &format!("cm-{ns}.json"),
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cfg", "namespace": ns}, "data": {"k": "v"}}),
        )
    };
    let out = kubectl(&s, &["create", "-f", &cm("shop")]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("namespaces \"shop\" not found"), "{}", text(&out.stderr));
    let ns =
        file("ns.json", serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    let out = kubectl(&s, &["create", "-f", &ns]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = kubectl(&s, &["create", "-f", &cm("shop")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = kubectl(&s, &["get", "configmap", "cfg", "-n", "shop", "-o", "json"]);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["data"]["k"], "v");
    assert!(got["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()), "{got}");
    let out = kubectl(&s, &["create", "-f", &cm("shop")]);
    assert!(text(&out.stderr).contains("already exists"), "{}", text(&out.stderr));
    // The namespaces every cluster has take objects although none is listed.
    let out = kubectl(&s, &["create", "-f", &cm("default")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn kubectl_lists_gets_discovers_and_execs_against_the_fake_server() {
    let s = serve_demo();
    let fake = s.server.cluster().clone();

    let out = kubectl(&s, &["get", "pods", "-A"]);
    check_exit(&out, 0, "kubectl get pods -A");
    let pods: Vec<&Value> =
        fake.objects().filter(|(gr, _)| gr.group.is_empty() && gr.resource == "pods").map(|(_, o)| o).collect();
    let listing = text(&out.stdout);
    assert_eq!(listing.lines().count(), pods.len() + 1, "a header and one line per pod:\n{listing}");
    let some = pods[pods.len() / 2]["metadata"]["name"].as_str().unwrap();
    assert!(listing.contains(some), "{some} missing:\n{listing}");

    let ns = &demo_namespaces(DEMO_OBJECTS)[1];
    let out = kubectl(&s, &["get", "pvc", "-n", ns, "-o", "json"]);
    check_exit(&out, 0, "kubectl get pvc -o json");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = fake
        .objects()
        .filter(|(gr, o)| gr.resource == "persistentvolumeclaims" && o["metadata"]["namespace"].as_str() == Some(ns))
        .count();
    let items = list["items"].as_array().unwrap();
    assert!(want > 0);
    assert_eq!(items.len(), want);
    assert!(items.iter().all(|i| i["kind"] == "PersistentVolumeClaim"), "kubectl sets kind from the list");

    // Label selectors are applied by the server.
    let out = kubectl(&s, &["get", "pods", "-A", "-l", "app", "-o", "json"]);
    check_exit(&out, 0, "kubectl get pods -l app");
    let labelled = pods.iter().filter(|p| p["metadata"]["labels"].get("app").is_some()).count();
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), labelled);

    let out = kubectl(&s, &["api-resources"]);
    check_exit(&out, 0, "kubectl api-resources");
    let resources = text(&out.stdout);
    for r in ["pods", "persistentvolumeclaims", "deployments", "clusterrolebindings", "storageclasses"] {
        assert!(resources.lines().any(|l| l.starts_with(r)), "{r} missing:\n{resources}");
    }

    let pod = blockwise_simulator::demo::demo_failing_hook_pod();
    let pns = pod.namespace().map(str::to_string).unwrap();
    let out = kubectl(&s, &["exec", pod.name(), "-n", &pns, "--", "/bin/echo", "hello"]);
    check_exit(&out, 0, "kubectl exec");
    assert_eq!(text(&out.stdout).trim(), "ok", "the fake cluster's interpreter answers ok");
    let out = kubectl(&s, &["exec", pod.name(), "-n", &pns, "--", "/bin/sh", "-c", "exit 3"]);
    check_exit(&out, 3, "kubectl exec passes the exit status through");
    let recorded = fake.exec_records();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].command, vec!["/bin/echo".to_string(), "hello".into()]);
}

/// The snapshot API is served like any other resource (issue 10): kubectl discovers it, with the
/// `vs` short name, creates a VolumeSnapshot of a demo claim, lists it with `get volumesnapshots -A`
/// and deletes it. What kubectl shows is compared with the fake cluster's own objects.
#[test]
fn kubectl_creates_lists_and_deletes_volume_snapshots_against_the_fake_server() {
    let s = serve_demo();
    let fake = s.server.cluster().clone();

    let out = kubectl(&s, &["api-resources", "--api-group", "snapshot.storage.k8s.io"]);
    check_exit(&out, 0, "kubectl api-resources --api-group snapshot.storage.k8s.io");
    let resources = text(&out.stdout);
    for r in ["volumesnapshotclasses", "volumesnapshotcontents", "volumesnapshots"] {
        assert!(resources.lines().any(|l| l.starts_with(r)), "{r} missing:\n{resources}");
    }
    let out = kubectl(&s, &["get", "volumesnapshotclasses"]);
    check_exit(&out, 0, "kubectl get volumesnapshotclasses");
    assert!(text(&out.stdout).contains("pd-snapshots"), "{}", text(&out.stdout));
    let out = kubectl(&s, &["get", "volumesnapshots", "-A"]);
    check_exit(&out, 0, "kubectl get volumesnapshots -A (none yet)");
    assert!(text(&out.stdout).is_empty(), "no snapshot before one is created: {}", text(&out.stdout));

    let claim = fake
        .objects()
        .find(|(gr, o)| gr.resource == "persistentvolumeclaims" && o["status"]["phase"] == "Bound")
        .map(|(_, o)| o.clone())
        .expect("the demo has a bound claim");
    let ns = claim["metadata"]["namespace"].as_str().unwrap();
    let pvc = claim["metadata"]["name"].as_str().unwrap();
    let manifest = s.dir.path().join("vs.json");
    let vs = serde_json::json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "by-kubectl", "namespace": ns},
        "spec": {"volumeSnapshotClassName": "pd-snapshots", "source": {"persistentVolumeClaimName": pvc}},
    });
    std::fs::write(&manifest, serde_json::to_vec(&vs).unwrap()).unwrap();
    // The fake server serves no OpenAPI document, which client-side validation would download.
    let out = kubectl(&s, &["create", "--validate=false", "-f", manifest.to_str().unwrap()]);
    check_exit(&out, 0, "kubectl create -f vs.json");
    assert!(text(&out.stdout).contains("by-kubectl created"), "{}", text(&out.stdout));
    let out = kubectl(&s, &["create", "--validate=false", "-f", manifest.to_str().unwrap()]);
    check_exit(&out, 1, "a second create of the same name");
    assert!(text(&out.stderr).contains("already exists"), "{}", text(&out.stderr));

    let out = kubectl(&s, &["get", "volumesnapshots", "-A"]);
    check_exit(&out, 0, "kubectl get volumesnapshots -A");
    let listing = text(&out.stdout);
    assert_eq!(listing.lines().count(), 2, "a header and the one snapshot:\n{listing}");
    assert!(listing.lines().nth(1).is_some_and(|l| l.starts_with(ns) && l.contains("by-kubectl")), "{listing}");
    let out = kubectl(&s, &["get", "vs", "by-kubectl", "-n", ns, "-o", "json"]);
    check_exit(&out, 0, "kubectl get vs NAME -o json");
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["spec"]["source"]["persistentVolumeClaimName"], pvc);
    assert!(got["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()), "the server gives it a uid: {got}");
    let key = ItemKey::namespaced("snapshot.storage.k8s.io", "volumesnapshots", ns, "by-kubectl");
    assert!(fake.snapshot_objects().contains(&key), "the fake cluster holds the snapshot kubectl created");

    let out = kubectl(&s, &["delete", "vs", "by-kubectl", "-n", ns, "--wait=false"]);
    check_exit(&out, 0, "kubectl delete vs");
    assert!(!fake.snapshot_objects().contains(&key), "the fake cluster no longer holds it");
    let out = kubectl(&s, &["get", "volumesnapshots", "-A"]);
    check_exit(&out, 0, "kubectl get volumesnapshots -A after the delete");
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
}

#[test]
fn backup_delete_deletes_the_storage_snapshots_it_holds_and_a_failed_deletion_finishes_when_run_again() {
    let s = serve_demo();
    let data = s.dir.path().join("data");
    let kc = s.kubeconfig.to_str().unwrap();
    check_exit(&s.blockwise(&data, &["backup", "create", "held", "--kubeconfig", kc]), 3, "backup held");
    // Judged from the fake driver's storage, not from the backup's log: what the first backup
    // left, then what the second one added.
    let first = common::live_storage(s.server.cluster());
    assert!(first.len() > 10, "the demo backup retained its snapshots: {first:?}");
    check_exit(&s.blockwise(&data, &["backup", "create", "other", "--kubeconfig", kc]), 3, "backup other");
    let both = common::live_storage(s.server.cluster());
    let second: std::collections::BTreeSet<String> = both.difference(&first).cloned().collect();
    assert_eq!(second.len(), first.len(), "the second backup retained as many snapshots of its own");

    // Three imports refused: those deletions fail, the others go on; nothing else is deleted.
    s.server.faults().add(Fault::new(Verb::Write, Some("volumesnapshotcontents.snapshot.storage.k8s.io"), 403, 3));
    let out = s.blockwise(&data, &["backup", "delete", "held", "--confirm"]);
    check_exit(&out, 1, "a deletion whose snapshot deletions fail");
    assert!(text(&out.stderr).contains("deleting 3 of its"), "{}", text(&out.stderr));
    let left = common::live_storage(s.server.cluster());
    assert_eq!(left.difference(&second).count(), 3, "exactly the three refused are left of the first backup's");
    assert!(data.join("backups/held/log").exists() && data.join("store/backups/held").exists(), "files kept");

    let out = s.blockwise(&data, &["backup", "delete", "held", "--confirm"]);
    check_exit(&out, 0, "the deletion run again");
    assert!(text(&out.stderr).contains("deleted backup held: 3 storage snapshots"), "{}", text(&out.stderr));
    assert_eq!(
        common::live_storage(s.server.cluster()),
        second,
        "every snapshot of held is deleted, every one of other kept"
    );
    assert!(!data.join("backups/held").exists() && !data.join("store/backups/held").exists());
    assert!(
        s.server.cluster().snapshot_objects().is_empty(),
        "no snapshot object is left in the cluster: {:?}",
        s.server.cluster().snapshot_objects()
    );
}

/// An API server that accepts connections and never answers (a stopped process, a stuck proxy):
/// every connection is held open, unread, until the server is dropped.
struct BlackHole {
    url: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHole {
    fn start() -> BlackHole {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    held.push(c);
                }
            }
        });
        BlackHole { url, stop, thread: Some(thread) }
    }

    fn kubeconfig(&self, path: &Path) {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: hole\n  cluster: {{server: \"{}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: hole\n  context: {{cluster: hole, user: u}}\ncurrent-context: hole\n",
            self.url
        );
        std::fs::write(path, yaml).unwrap();
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = std::net::TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the binary; a run still going after `bound` is killed and fails the test (a hang, not a
/// slow answer: the bound is many times what the request timeouts add up to).
fn blockwise_within(home: &Path, data: &Path, args: &[&str], bound: Duration) -> Output {
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running blockwise");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(bound) {
        Ok(out) => out.expect("waiting for blockwise"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("blockwise {args:?} still ran after {bound:?}: it hangs on an API server that never answers");
        }
    }
}

/// Issue 22: against an API server that accepts and never answers, `backup create`, `restore
/// create` and `schedule create` give up with exit 1 naming the server and the unanswered request
/// (they hung for 15 minutes and more before: no request had a deadline).
#[test]
fn commands_against_a_server_that_never_answers_give_up_naming_it() {
    let hole = BlackHole::start();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    hole.kubeconfig(&kc);
    let kc = kc.to_str().unwrap();
    let data = dir.path().join("data");
    let bound = Duration::from_secs(120);
    // A backup to restore, from the demo (no cluster needed).
    let out = blockwise(dir.path(), &data, &["backup", "create", "src", "--demo", "--demo-objects", "40"]);
    check_exit(&out, 0, "the demo backup");
    for args in [
        vec!["backup", "create", "b", "--kubeconfig", kc],
        vec!["restore", "create", "r", "--from-backup", "src", "--kubeconfig", kc],
        vec!["schedule", "create", "s", "--schedule", "@daily", "--kubeconfig", kc],
    ] {
        let mut args = args;
        args.extend(["--request-timeout", "1s"]);
        let out = blockwise_within(dir.path(), &data, &args, bound);
        check_exit(&out, 1, &format!("{args:?}"));
        let err = text(&out.stderr);
        assert!(err.contains(&hole.url), "{args:?} names the server: {err}");
        assert!(err.contains("no answer from the API server within 1s"), "{args:?} says why: {err}");
    }
}
