//! Real `kubectl`, of every version installed beside it (`kubectl.1.27` … `kubectl.1.33`), against
//! the fake API server: `apply -f` of an install manifest (twice) with default validation, the
//! server's field validation (Strict, Warn, Ignore) of a custom resource, a custom resource listed with
//! its printer columns, `get -w` following a change, `get`, `describe` and `exec` — over SPDY/3.1
//! before 1.30, over WebSocket since — with output, errors and exit codes passed through.
//!
//! Each test owns its server (on `127.0.0.1:0`, on a runtime the test owns) and a tempdir that is
//! kubectl's HOME (its discovery cache) and holds the kubeconfig. Nothing sleeps: a watch is read
//! until the change appears, bounded by a timeout only a broken server reaches.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blockwise_adapters::world::TokioRuntime;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_simulator::csi::ApiWrite;
use blockwise_simulator::fake::ExecScript;
use blockwise_simulator::server::FakeApiServer;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

struct Served {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

/// Scripted on [`blockwise_simulator::demo_failing_hook_pod`]: `echo hi` prints `hi`, `report`
/// writes to both streams and exits 2. Anything else runs the fake cluster's interpreter
/// (`sh -c "exit N"` exits N).
fn scripts() -> Vec<(Vec<String>, ExecScript)> {
    let cmd = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let out = |exit_code, stdout: &str, stderr: &str| ExecScript::Output {
        exit_code,
        stdout: stdout.into(),
        stderr: stderr.into(),
    };
    vec![(cmd(&["echo", "hi"]), out(0, "hi\n", "")), (cmd(&["report"]), out(2, "rows: 3\n", "disk almost full\n"))]
}

fn serve() -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut cluster = blockwise_simulator::demo_cluster(120, blockwise_simulator::DEMO_SEED);
    for (command, script) in scripts() {
        cluster.script_exec(blockwise_simulator::demo_failing_hook_pod(), command, script);
    }
    let cluster = cluster.with_clock(Arc::new(TokioRuntime));
    let server = rt.block_on(FakeApiServer::start(Arc::new(cluster), "127.0.0.1:0".parse().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    Served { server, kubeconfig, dir, _rt: rt }
}

fn command(bin: &Path, s: &Served, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .arg("--request-timeout=30s")
        .args(args)
        .env("HOME", s.dir.path())
        .env_remove("KUBECONFIG");
    c
}

fn run(bin: &Path, s: &Served, args: &[&str]) -> Output {
    command(bin, s, args).output().unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn check_ok(out: &Output, what: &str) -> String {
    assert_eq!(out.status.code(), Some(0), "{what}\nstdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// The installed `kubectl`, then every `kubectl.1.NN` beside it, with its minor version.
fn kubectls() -> Vec<(PathBuf, u32)> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let main = std::env::split_paths(&path).map(|d| d.join("kubectl")).find(|p| p.is_file()).expect("kubectl on PATH");
    let mut out = vec![(main.clone(), u32::MAX)];
    let dir = std::fs::canonicalize(&main).unwrap().parent().unwrap().to_path_buf();
    for minor in 27..=33 {
        let p = dir.join(format!("kubectl.1.{minor}"));
        if p.is_file() {
            out.push((p, minor));
        }
    }
    out
}

fn kubectl() -> PathBuf {
    kubectls().remove(0).0
}

#[test]
fn kubectl_applies_an_install_manifest_twice_then_lists_a_backup_with_its_printer_columns() {
    let s = serve();
    let k = kubectl();
    let install = format!("{FIXTURES}/install.yaml");
    let out = check_ok(&run(&k, &s, &["apply", "-f", &install]), "first apply of the install manifest");
    for created in [
        "customresourcedefinition.apiextensions.k8s.io/backups.blockwise.dev created",
        "namespace/blockwise-system created",
        "serviceaccount/blockwise created",
        "clusterrole.rbac.authorization.k8s.io/blockwise created",
        "clusterrolebinding.rbac.authorization.k8s.io/blockwise created",
        "persistentvolumeclaim/blockwise-logs created",
        "deployment.apps/blockwise created",
        "service/blockwise-metrics created",
    ] {
        assert!(out.contains(created), "{created} missing:\n{out}");
    }
    let fake = s.server.cluster();
    let deploy = ResourceType::new("apps", "v1", "deployments", "Deployment", true);
    let key = ItemKey::namespaced("apps", "deployments", "blockwise-system", "blockwise");
    let got: Value = serde_json::from_str(&fake.get_at(fake.now(), &deploy, &key).unwrap().unwrap()).unwrap();
    assert_eq!(got["spec"]["strategy"]["type"], "Recreate");

    let out = check_ok(&run(&k, &s, &["apply", "-f", &install]), "second apply of the install manifest");
    assert!(!out.contains("created"), "nothing is created again:\n{out}");
    assert_eq!(out.lines().count(), 8, "one line per object:\n{out}");

    let backup = format!("{FIXTURES}/backup.yaml");
    let out = check_ok(&run(&k, &s, &["apply", "-f", &backup]), "apply of a Backup");
    assert!(out.contains("backup.blockwise.dev/nightly created"), "{out}");
    // The controller's part, through the status subresource.
    let backups = ResourceType::new("blockwise.dev", "v1alpha1", "backups", "Backup", true);
    let bkey = ItemKey::namespaced("blockwise.dev", "backups", "blockwise-system", "nightly");
    let status = json!({"status": {"phase": "InProgress", "progress": {"itemsBackedUp": 7}}});
    let op = ApiWrite::Merge { rt: backups, key: bkey, patch: status, status: true, manager: Some("blockwise".into()) };
    fake.api_write_at(fake.now(), op).unwrap();

    let out = check_ok(&run(&k, &s, &["get", "bwb", "-A"]), "kubectl get bwb -A");
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAMESPACE", "NAME", "PHASE", "ITEMS", "AGE"], "{out}");
    let row: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(&row[..4], ["blockwise-system", "nightly", "InProgress", "7"], "{out}");

    let out = check_ok(&run(&k, &s, &["delete", "bwb", "nightly", "-n", "blockwise-system"]), "kubectl delete bwb");
    assert!(out.contains("deleted"), "{out}");
    let out = run(&k, &s, &["get", "bwb", "nightly", "-n", "blockwise-system"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not found"), "{}", text(&out.stderr));
}

#[test]
fn every_kubectl_version_get_w_prints_a_change_made_after_it_started() {
    let s = serve();
    let fake = s.server.cluster().clone();
    let cms = ResourceType::new("", "v1", "configmaps", "ConfigMap", true);
    let create = |name: &str| {
        let body = json!({"metadata": {"name": name}, "data": {"k": "v"}});
        let op = ApiWrite::Create { rt: cms.clone(), namespace: Some("default".into()), body, manager: None };
        fake.api_write_at(fake.now(), op).unwrap();
    };
    create("before");
    for (bin, minor) in kubectls() {
        let before = s.server.requests().into_iter().filter(|r| r.query.contains("watch=")).count();
        let mut child = command(&bin, &s, &["get", "configmaps", "-n", "default", "-w"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut seen = Vec::new();
        let wait_for = |name: &str, seen: &mut Vec<String>| loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("kubectl 1.{minor}: no {name} line: {seen:?}"));
            seen.push(line.clone());
            if line.split_whitespace().next() == Some(name) {
                return;
            }
        };
        // Listed first; the change made after the list reaches the watch (from the list's version).
        wait_for("before", &mut seen);
        let after = format!("after-1-{minor}");
        create(&after);
        wait_for(&after, &mut seen);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(seen[0].starts_with("NAME"), "kubectl 1.{minor}: a table header first: {seen:?}");
        let watches = s.server.requests().into_iter().filter(|r| r.query.contains("watch=")).count();
        assert!(watches > before, "kubectl 1.{minor} watched");
    }
}

/// Runs `kubectl exec` of `command` (stdin empty; `-i` passes it on) and checks what it printed
/// and how it exited.
#[track_caller]
fn check_exec(bin: &Path, s: &Served, command: &[&str], code: i32, stdout: &str, stderr_has: &str) {
    let pod = blockwise_simulator::demo_failing_hook_pod();
    let ns = pod.namespace().map(str::to_string).unwrap();
    let (flag, command) = match command {
        ["-i", rest @ ..] => (Some("-i"), rest),
        _ => (None, command),
    };
    let mut args = vec!["exec", pod.name(), "-n", ns.as_str()];
    args.extend(flag);
    args.push("--");
    args.extend_from_slice(command);
    let out = run(bin, s, &args);
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    let what = format!("{} exec {command:?}\nstdout:\n{o}\nstderr:\n{e}", bin.display());
    assert_eq!(out.status.code(), Some(code), "{what}");
    assert_eq!(o, stdout, "{what}");
    assert!(e.contains(stderr_has), "{what}");
}

#[test]
fn every_kubectl_version_gets_describes_and_execs() {
    let s = serve();
    let pod = blockwise_simulator::demo_failing_hook_pod();
    let ns = pod.namespace().map(str::to_string).unwrap();
    let versions = kubectls();
    assert!(
        versions.iter().any(|(_, minor)| (27..=29).contains(minor)),
        "a kubectl.1.NN before 1.30 (which execs over SPDY) beside kubectl: {versions:?}"
    );
    for (bin, minor) in versions {
        let v = bin.display().to_string();
        let out = check_ok(&run(&bin, &s, &["get", "pods", "-n", &ns]), &format!("{v} get pods"));
        let header: Vec<&str> = out.lines().next().unwrap_or("").split_whitespace().collect();
        assert_eq!(header, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"], "{v}: the server's pod table\n{out}");
        assert!(out.lines().any(|l| l.starts_with(pod.name())), "{v}: {out}");
        let out = check_ok(&run(&bin, &s, &["describe", "pod", pod.name(), "-n", &ns]), &format!("{v} describe pod"));
        assert!(out.contains(pod.name()) && out.contains("Namespace:"), "{v}: {out}");
        let execs_before = s.server.cluster().exec_records().len();
        let requests_before = s.server.requests().len();
        check_exec(&bin, &s, &["echo", "hi"], 0, "hi\n", "");
        check_exec(&bin, &s, &["sh", "-c", "exit 3"], 3, "", "command terminated with exit code 3");
        check_exec(&bin, &s, &["report"], 2, "rows: 3\n", "disk almost full");
        check_exec(&bin, &s, &["-i", "echo", "hi"], 0, "hi\n", "");
        // The fake world's own records: four execs ran in the pod, each through one upgrade —
        // a POST to SPDY/3.1 before 1.30, a GET to a WebSocket since.
        let execs: Vec<Vec<String>> =
            s.server.cluster().exec_records()[execs_before..].iter().map(|r| r.command.clone()).collect();
        assert_eq!(execs, [vec!["echo", "hi"], vec!["sh", "-c", "exit 3"], vec!["report"], vec!["echo", "hi"]], "{v}");
        let upgrades: Vec<(String, u16)> = s.server.requests()[requests_before..]
            .iter()
            .filter(|r| r.path.ends_with("/exec"))
            .map(|r| (r.method.clone(), r.status))
            .collect();
        let method = if minor < 30 { "POST" } else { "GET" };
        assert_eq!(upgrades, vec![(method.to_string(), 101); 4], "{v}");
    }
}

/// The object `kubectl` created, as the fake cluster holds it.
fn stored(s: &Served, rt: &ResourceType, namespace: &str, name: &str) -> Option<Value> {
    let fake = s.server.cluster();
    let key = ItemKey::namespaced(&rt.gr.group, &rt.gr.resource, namespace, name);
    fake.get_at(fake.now(), rt, &key).unwrap().map(|raw| serde_json::from_str(&raw).unwrap())
}

#[test]
fn every_kubectl_version_applies_with_default_validation_and_the_server_validates_fields() {
    let install = format!("{FIXTURES}/install.yaml");
    let (widget_crd, widget) = (format!("{FIXTURES}/widget-crd.yaml"), format!("{FIXTURES}/widget.yaml"));
    let widgets = ResourceType::new("example.dev", "v1", "widgets", "Widget", true);
    let unknown = ["unknown field \"spec.colour\"", "unknown field \"spec.parts[0].weight\""];
    for (bin, _) in kubectls() {
        let v = bin.display().to_string();
        let s = serve();
        // No --validate flag: kubectl finds `fieldValidation` on the server's PATCH operations and
        // leaves validation to the server (`fieldValidation=Strict`).
        let out = check_ok(&run(&bin, &s, &["apply", "-f", &install]), &format!("{v} apply"));
        assert_eq!(out.matches(" created").count(), 8, "{v}: {out}");
        let out = check_ok(&run(&bin, &s, &["apply", "-f", &install]), &format!("{v} apply again"));
        assert_eq!(out.matches(" unchanged").count(), 8, "{v}: {out}");
        check_ok(&run(&bin, &s, &["apply", "-f", &widget_crd]), &format!("{v} apply the Widget CRD"));

        // Strict (the default): refused, naming both fields; nothing stored.
        let out = run(&bin, &s, &["apply", "-f", &widget]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{v}: {err}");
        assert!(unknown.iter().all(|u| err.contains(u)) && err.contains("strict decoding error"), "{v}: {err}");
        assert_eq!(stored(&s, &widgets, "default", "w1"), None, "{v}");

        // Warn: stored without them, each named in a warning.
        let out = check_ok(&run(&bin, &s, &["apply", "--validate=warn", "-f", &widget]), &format!("{v} warn"));
        assert!(out.contains("widget.example.dev/w1 created"), "{v}: {out}");
        let err = text(&run(&bin, &s, &["delete", "widget", "w1"]).stderr);
        assert!(err.is_empty(), "{v}: {err}");
        let out = run(&bin, &s, &["apply", "--validate=warn", "-f", &widget]);
        let err = text(&out.stderr);
        assert!(unknown.iter().all(|u| err.contains(&format!("Warning: {u}"))), "{v}: {err}");
        let got = stored(&s, &widgets, "default", "w1").expect("stored");
        assert_eq!(got["spec"], json!({"size": 3, "parts": [{"name": "bolt"}]}), "{v}: pruned");

        // Ignore (--validate=false): pruned without a word.
        check_ok(&run(&bin, &s, &["delete", "widget", "w1"]), &format!("{v} delete"));
        let out = run(&bin, &s, &["apply", "--validate=false", "-f", &widget]);
        assert_eq!((out.status.code(), text(&out.stderr)), (Some(0), String::new()), "{v}");
        let got = stored(&s, &widgets, "default", "w1").expect("stored");
        assert_eq!(got["spec"], json!({"size": 3, "parts": [{"name": "bolt"}]}), "{v}: pruned");
    }
}
