//! Restores, end to end (issue 13): a demo backup made by the real binary, restored by the real
//! binary through kube-rs into the simulator's fake API server holding an empty cluster, judged
//! from the archive (read here with tar and flate2, not with the restore's own reader) and from
//! the fake cluster's objects and the server's request log — never from the restore's plan or
//! events. The judge applies `docs/restore.md`'s rules as the simulator's round-trip judge writes
//! them out (`blockwise_simulator::roundtrip::restored_form`), independently of the restore's code.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockwise_adapters::world::TokioRuntime;
use blockwise_engine::item::GroupResource;
use blockwise_simulator::demo::{demo_resource_types, empty_cluster};
use blockwise_simulator::fake::FakeCluster;
use blockwise_simulator::roundtrip::{reprovisioned_volumes, restored_form, served_form};
use blockwise_simulator::server::FakeApiServer;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_blockwise");
const DEMO_OBJECTS: &str = "400";

struct Served {
    server: FakeApiServer,
    cluster: Arc<FakeCluster>,
    kubeconfig: PathBuf,
    _rt: tokio::runtime::Runtime,
}

fn serve_empty(dir: &Path) -> Served {
    serve_empty_with(dir, 0)
}

/// An empty cluster whose API calls take `latency_ms` each (creates are in flight when a kill lands).
fn serve_empty_with(dir: &Path, latency_ms: u64) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let latency = blockwise_simulator::fake::Latency { api_ms: latency_ms, exec_ms: 0 };
    let cluster = Arc::new(empty_cluster().with_latency(latency).with_clock(Arc::new(TokioRuntime)));
    let server = rt.block_on(FakeApiServer::start(cluster.clone(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let kubeconfig = dir.join(format!("kubeconfig-{}", server.addr().port()));
    server.write_kubeconfig(&kubeconfig).unwrap();
    Served { server, cluster, kubeconfig, _rt: rt }
}

fn cmd(home: &Path, data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home);
    c
}

fn run(home: &Path, data: &Path, args: &[&str]) -> Output {
    cmd(home, data, args).output().expect("running blockwise")
}

/// A demo backup `b` in `data`; returns its archive's items: (resource dir, namespace, name) → object.
fn demo_backup(home: &Path, data: &Path) -> BTreeMap<(String, Option<String>, String), Value> {
    let out =
        run(home, data, &common::with_test_uid(&["backup", "create", "b", "--demo", "--demo-objects", DEMO_OBJECTS]));
    common::assert_exit(&out, 0, "backup create");
    archive_items(&common::local_archive(data, "b"))
}

fn archive_items(archive: &[u8]) -> BTreeMap<(String, Option<String>, String), Value> {
    let mut out = BTreeMap::new();
    let mut tar = tar::Archive::new(flate2::read::MultiGzDecoder::new(archive));
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = path.split('/').collect();
        let key = match parts.as_slice() {
            ["resources", gr, "namespaces", ns, file] => (gr.to_string(), Some(ns.to_string()), file.to_string()),
            ["resources", gr, "cluster", file] => (gr.to_string(), None, file.to_string()),
            _ => continue,
        };
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        let name = key.2.strip_suffix(".json").unwrap().to_string();
        out.insert((key.0, key.1, name), serde_json::from_str(&text).unwrap());
    }
    out
}

/// Every object the fake cluster holds, by (resource dir, namespace, name).
fn served_objects(cluster: &FakeCluster) -> BTreeMap<(String, Option<String>, String), Value> {
    let mut out = BTreeMap::new();
    for rt in demo_resource_types() {
        let (objects, _) = cluster.live_at(cluster.now(), &rt.gr);
        for (key, obj) in objects {
            out.insert((rt.gr.dir_name(), key.namespace().map(str::to_string), key.name().to_string()), obj);
        }
    }
    let (namespaces, _) = cluster.live_at(cluster.now(), &GroupResource::new("", "namespaces"));
    for (key, obj) in namespaces {
        out.insert(("namespaces".to_string(), None, key.name().to_string()), obj);
    }
    out
}

/// Diffs the cluster against the archive: every object the rules restore is there as they say,
/// and nothing else was created.
fn assert_restored(archive: &BTreeMap<(String, Option<String>, String), Value>, cluster: &FakeCluster, restore: &str) {
    let served = served_objects(cluster);
    let reprovisioned = reprovisioned_volumes(archive.iter().map(|((dir, _, _), o)| (dir.as_str(), o)));
    let mut want = BTreeSet::new();
    let mut diffs = Vec::new();
    for ((dir, ns, name), archived) in archive {
        let Some(exp) = restored_form(dir, archived, "b", restore, &reprovisioned) else { continue };
        let key = (dir.clone(), ns.clone(), name.clone());
        want.insert(key.clone());
        match served.get(&key) {
            None => diffs.push(format!("{dir} {ns:?}/{name}: not restored")),
            Some(s) if served_form(s) != exp => {
                diffs.push(format!("{dir} {ns:?}/{name}:\n  served   {}\n  expected {exp}", served_form(s)))
            }
            Some(_) => {}
        }
    }
    let extra: Vec<_> = served.keys().filter(|k| !want.contains(*k)).collect();
    assert!(diffs.is_empty(), "{} objects differ from the archive, first: {}", diffs.len(), diffs[0]);
    assert!(extra.is_empty(), "objects the archive does not explain: {extra:?}");
    assert!(want.len() > 300, "the round trip covered only {} objects", want.len());
}

#[test]
fn a_demo_backup_restored_into_an_empty_cluster_recreates_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let archive = demo_backup(dir.path(), &data);
    let served = serve_empty(dir.path());
    let kc = served.kubeconfig.to_str().unwrap();
    let out = run(dir.path(), &data, &["restore", "create", "r", "--from-backup", "b", "--kubeconfig", kc]);
    common::assert_exit(&out, 0, "restore create");
    assert_restored(&archive, &served.cluster, "r");
    // What the run downloaded and spilled (issue 23: a restore holds neither in memory) is gone.
    for leftover in ["archive.tar.gz", "spill"] {
        assert!(!data.join("restores/r").join(leftover).exists(), "restores/r/{leftover} is left behind");
    }
    // describe counts per resource what the cluster holds.
    let out = run(dir.path(), &data, &["restore", "describe", "r", "-o", "json"]);
    common::assert_exit(&out, 0, "restore describe");
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["phase"], "Completed");
    let objects = served_objects(&served.cluster);
    for (resource, counts) in d["resources"].as_object().unwrap() {
        let held = objects.keys().filter(|(r, _, _)| r == resource).count() as u64;
        assert_eq!(counts["created"].as_u64(), Some(held), "{resource}: {counts}");
    }
    let again = run(dir.path(), &data, &["restore", "create", "r", "--from-backup", "b", "--kubeconfig", kc]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("restore r: it already exists (Completed)"));
    let text = run(dir.path(), &data, &["restore", "describe", "r"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("Phase:        Completed"));
    // Restoring again: every object exists and is not ours, so each is left with a warning.
    let out = run(dir.path(), &data, &["restore", "create", "r2", "--from-backup", "b", "--kubeconfig", kc]);
    common::assert_exit(&out, 0, "second restore");
    let d: Value =
        serde_json::from_slice(&run(dir.path(), &data, &["restore", "describe", "r2", "-o", "json"]).stdout).unwrap();
    let planned: u64 = d["resources"].as_object().unwrap().values().map(|c| c["planned"].as_u64().unwrap()).sum();
    let namespaces = d["resources"]["namespaces"]["planned"].as_u64().unwrap();
    assert_eq!(d["warnings"].as_u64(), Some(planned - namespaces), "namespaces that exist are no warning");
    assert!(run(dir.path(), &data, &["restore", "get"]).stdout.windows(2).any(|w| w == b"r2"));
    let posts_201 = served.server.requests().iter().filter(|r| r.method == "POST" && r.status == 201).count();
    assert_eq!(posts_201, objects.len(), "one successful create per object");
    // Any Velero archive file, one namespace of it, mapped to a new one: exactly that namespace's
    // restorable objects appear there, and nothing else is created.
    let file = dir.path().join("b.tar.gz");
    std::fs::write(&file, common::local_archive(&data, "b")).unwrap();
    let ns = archive.keys().find_map(|(d, ns, _)| (d == "configmaps").then(|| ns.clone().unwrap())).unwrap();
    let copy = format!("{ns}-copy");
    let mapping = format!("{ns}:{copy}");
    let out = run(
        dir.path(),
        &data,
        &["restore", "create", "r3", "--from-file", file.to_str().unwrap(), "--kubeconfig", kc]
            .into_iter()
            .chain(["--include-namespaces", ns.as_str(), "--namespace-mappings", mapping.as_str()])
            .collect::<Vec<_>>(),
    );
    common::assert_exit(&out, 0, "restore --from-file with a mapping");
    let reprovisioned = reprovisioned_volumes(archive.iter().map(|((dir, _, _), o)| (dir.as_str(), o)));
    let want: BTreeSet<(String, String)> = archive
        .iter()
        .filter(|((dir, n, _), obj)| {
            n.as_deref() == Some(ns.as_str()) && restored_form(dir, obj, "b", "r3", &reprovisioned).is_some()
        })
        .map(|((dir, _, name), _)| (dir.clone(), name.clone()))
        .collect();
    let after = served_objects(&served.cluster);
    let got: BTreeSet<(String, String)> = after
        .iter()
        .filter(|((_, n, _), _)| n.as_deref() == Some(copy.as_str()))
        .map(|((dir, _, name), _)| (dir.clone(), name.clone()))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want, "namespace {copy} differs from the archive's {ns}");
    let new_objects: Vec<_> = after.keys().filter(|k| !objects.contains_key(*k)).collect();
    let expected_new = want.len() + 1; // and the Namespace itself
    assert_eq!(new_objects.len(), expected_new, "{new_objects:?}");
}

#[test]
fn a_killed_restore_resumes_to_the_same_cluster_without_duplicate_creates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let archive = demo_backup(dir.path(), &data);
    // Killed right after the fake cluster applied its N-th create, before the restore heard the
    // answer (the kill is sent from inside the server): the create is done, its outcome is not.
    for kill_at in [1u64, 2, 9, 40, 150, 250] {
        let served = serve_empty_with(dir.path(), 2);
        let kc = served.kubeconfig.to_str().unwrap();
        let name = format!("k{kill_at}");
        let mut create = cmd(
            dir.path(),
            &data,
            &["restore", "create", &name, "--from-backup", "b", "--kubeconfig", kc, "--workers", "2"],
        );
        let child = create.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn blockwise");
        let (pid, changes) = (child.id() as i32, Arc::new(AtomicU64::new(0)));
        served.cluster.also_on_change(Arc::new(move || {
            if changes.fetch_add(1, Ordering::SeqCst) + 1 == kill_at {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }));
        let status = child.wait_with_output().expect("wait").status;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "kill point {kill_at}: the restore was not killed");
        let out = run(dir.path(), &data, &["restore", "resume", &name]);
        common::assert_exit(&out, 0, &format!("restore resume after a kill at line {kill_at}"));
        assert_restored(&archive, &served.cluster, &name);
        let requests = served.server.requests();
        let conflicts: Vec<_> = requests.iter().filter(|r| r.method == "POST" && r.status == 409).collect();
        assert!(conflicts.is_empty(), "kill point {kill_at}: creates sent twice: {conflicts:?}");
        let created = requests.iter().filter(|r| r.method == "POST" && r.status == 201).count();
        assert_eq!(created, served_objects(&served.cluster).len(), "kill point {kill_at}");
        let d: Value =
            serde_json::from_slice(&run(dir.path(), &data, &["restore", "describe", &name, "-o", "json"]).stdout)
                .unwrap();
        assert_eq!((d["phase"].as_str(), d["warnings"].as_u64()), (Some("Completed"), Some(0)), "{d}");
    }
}

#[test]
fn bad_restore_input_is_named_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let served = serve_empty(dir.path());
    let kc = served.kubeconfig.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["restore", "create", "r", "--from-backup", "nope", "--kubeconfig", kc], "not in"),
        (&["restore", "create", "R!", "--from-file", kc, "--kubeconfig", kc], "invalid restore name"),
        (&["restore", "create", "r", "--from-file", kc, "--kubeconfig", kc, "--namespace-mappings", "a"], "OLD:NEW"),
        (
            &["restore", "create", "r", "--from-file", kc, "--kubeconfig", kc, "--existing-resource-policy", "merge"],
            "none or update",
        ),
        (&["restore", "create", "r", "--from-file", "/no/such.tar.gz", "--kubeconfig", kc], "no such archive"),
        (&["restore", "create", "r", "--from-file", kc], "needs a target cluster"),
        (&["restore", "describe", "nope"], "not found"),
    ];
    for (args, says) in cases {
        let out = run(dir.path(), &data, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!data.join("restores").join("r").exists());
    // An archive that is not one: the restore exists, Failed, and says why; nothing is created.
    let junk = dir.path().join("junk.tar.gz");
    std::fs::write(&junk, b"not a gzip stream").unwrap();
    let out =
        run(dir.path(), &data, &["restore", "create", "r", "--from-file", junk.to_str().unwrap(), "--kubeconfig", kc]);
    common::assert_exit(&out, 1, "restore of a junk archive");
    // The reason, where the command ends — not only "1 errors" (issue 22).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed: the archive cannot be read"), "{err}");
    let d = run(dir.path(), &data, &["restore", "describe", "r"]);
    let text = String::from_utf8_lossy(&d.stdout);
    assert!(text.contains("Phase:        Failed") && text.contains("archive cannot be read"), "{text}");
    assert!(served.server.requests().iter().all(|r| r.method != "POST"));
}

/// Issue 21: a restore killed half-way whose Backup is deleted before it resumes has lost its
/// archive for good — the resume ends it Failed, saying so, instead of stopping again and again
/// (the controller would retry it for ever, InProgress); nothing more is created.
#[test]
fn a_half_done_restore_whose_archive_is_gone_fails_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    demo_backup(dir.path(), &data);
    let served = serve_empty_with(dir.path(), 2);
    let kc = served.kubeconfig.to_str().unwrap();
    let mut create = cmd(dir.path(), &data, &["restore", "create", "gone", "--from-backup", "b", "--kubeconfig", kc]);
    let child = create.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn blockwise");
    let (pid, changes) = (child.id() as i32, Arc::new(AtomicU64::new(0)));
    served.cluster.also_on_change(Arc::new(move || {
        if changes.fetch_add(1, Ordering::SeqCst) + 1 == 20 {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }));
    let status = child.wait_with_output().expect("wait").status;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the restore was not killed");
    common::assert_exit(&run(dir.path(), &data, &["backup", "delete", "b", "--confirm"]), 0, "backup delete");
    let posts = || served.server.requests().iter().filter(|r| r.method == "POST").count();
    let before = posts();
    let out = run(dir.path(), &data, &["restore", "resume", "gone"]);
    common::assert_exit(&out, 1, "restore resume without its archive");
    let d: Value =
        serde_json::from_slice(&run(dir.path(), &data, &["restore", "describe", "gone", "-o", "json"]).stdout).unwrap();
    assert_eq!(d["phase"].as_str(), Some("Failed"), "{d}");
    assert!(d.to_string().contains("the archive the restore planned is gone"), "{d}");
    assert_eq!(posts(), before, "the resume created objects without its archive");
}

/// Issue 22, for restores: bytes flipped and files truncated at several offsets of every file of a
/// finished restore's log (each on a fresh copy, made before any reader opened the log): no restore
/// command exits 101; `restore get` lists the other restore; the damaged one reads back whole or is
/// named `Damaged` by `get`, `describe`, `logs` and `resume` (exit 1).
#[test]
fn a_damaged_restore_log_is_named_never_a_panic_or_a_shorter_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    demo_backup(dir.path(), &data);
    // Each restore into an empty cluster of its own.
    let servers = [serve_empty(dir.path()), serve_empty(dir.path())];
    for (name, served) in ["r", "other"].into_iter().zip(&servers) {
        let kc = served.kubeconfig.to_str().unwrap();
        let out = run(dir.path(), &data, &["restore", "create", name, "--from-backup", "b", "--kubeconfig", kc]);
        common::assert_exit(&out, 0, &format!("restore create {name}"));
    }
    let pristine = dir.path().join("pristine");
    common::copy_dir(&data, &pristine);
    let events = String::from_utf8_lossy(&run(dir.path(), &data, &["restore", "logs", "r"]).stdout).lines().count();
    let log = pristine.join("restores/r/log");
    let mut files: Vec<String> = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file() && e.metadata().unwrap().len() > 0)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut damaged = 0;
    for file in &files {
        let len = std::fs::metadata(log.join(file)).unwrap().len();
        for (mode, at) in [1u64, 3, 5].iter().flat_map(|k| [("flip", len * k / 6), ("truncate", len * k / 6)]) {
            let case = format!("{file} {mode} at {at} of {len}");
            let work = dir.path().join("work");
            let _ = std::fs::remove_dir_all(&work);
            common::copy_dir(&pristine, &work);
            let path = work.join("restores/r/log").join(file);
            common::damage(&path, mode, at);
            let go = |args: &[&str]| {
                let o = run(dir.path(), &work, args);
                assert!(!matches!(o.status.code(), Some(101) | None), "{case}: {args:?}: {:?}", o.status);
                o
            };
            let get = String::from_utf8_lossy(&go(&["restore", "get"]).stdout).into_owned();
            let row = |n: &str| get.lines().find(|l| l.split_whitespace().next() == Some(n)).unwrap_or("").to_string();
            assert!(row("other").contains("Completed"), "{case}: the other restore: {get}");
            let r = row("r");
            let logs = go(&["restore", "logs", "r"]);
            if r.contains("Damaged") {
                damaged += 1;
                assert!(r.contains("restore \"r\" is damaged"), "{case}: {r}");
                for args in [&["restore", "describe", "r"][..], &["restore", "resume", "r"][..]] {
                    let o = go(args);
                    common::assert_exit(&o, 1, &format!("{case}: {args:?}"));
                    assert!(String::from_utf8_lossy(&o.stderr).contains("is damaged"), "{case}: {args:?}");
                }
                common::assert_exit(&logs, 1, &format!("{case}: logs"));
            } else {
                assert!(r.contains("Completed"), "{case}: {r}");
                let n = String::from_utf8_lossy(&logs.stdout).lines().count();
                assert_eq!(n, events, "{case}: the log reads back with {n} events, not {events}");
            }
        }
    }
    assert!(damaged >= files.len(), "only {damaged} damages were noticed in {files:?}");
}

/// Issue 23: a gzip bomb given to `restore create --from-file` (80 concatenated gzip members, each
/// one tar entry of 8 MiB of zeros: 640 MiB from about 650 KB) is refused by its decompressed size,
/// naming it — the restore ends Failed saying why, nothing is created — and `backup inspect`
/// names it as a defect.
#[test]
fn a_gzip_bomb_archive_is_refused_naming_the_limit() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let served = serve_empty(dir.path());
    let kc = served.kubeconfig.to_str().unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("resources/configmaps/namespaces/a/x.json").unwrap();
    h.set_size(8 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(h.as_bytes()).unwrap();
    gz.write_all(&vec![0u8; 8 << 20]).unwrap();
    let member = gz.finish().unwrap();
    let bomb_path = dir.path().join("bomb.tar.gz");
    std::fs::write(&bomb_path, member.repeat(80)).unwrap();
    let bomb = bomb_path.to_str().unwrap();
    let out = run(dir.path(), &data, &["restore", "create", "r", "--from-file", bomb, "--kubeconfig", kc]);
    common::assert_exit(&out, 1, "restore of a gzip bomb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused as a gzip bomb"), "{err}");
    let d = String::from_utf8_lossy(&run(dir.path(), &data, &["restore", "describe", "r"]).stdout).into_owned();
    assert!(d.contains("Phase:        Failed") && d.contains("gzip bomb"), "{d}");
    assert!(served.server.requests().iter().all(|r| r.method != "POST"), "objects were created");
    let out = run(dir.path(), &data, &["backup", "inspect", bomb]);
    common::assert_exit(&out, 1, "inspect of a gzip bomb");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refused as a gzip bomb"), "{text}");
}
