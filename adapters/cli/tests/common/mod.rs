//! Helpers shared by the process-level tests: run the real `blockwise` binary, read what it
//! stored, and a local S3 endpoint ([`Moto`]) that the tests start and stop themselves — or, when
//! `.ci/run` already started one, the one named by [`MOTO_PORT_ENV`].

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_blockwise");
/// Polls of the moto port before giving up (50 ms apart: 30 s).
const MOTO_START_POLLS_MAX: u32 = 600;
/// A moto server already running on this loopback port (set by `.ci/run`); tests start their own
/// when it is unset.
pub const MOTO_PORT_ENV: &str = "BLOCKWISE_TEST_MOTO_PORT";

/// The uid every `backup create` of these tests runs under (unless it names one): a backup's uid
/// names and labels its snapshots, so two runs give the same archive bytes only under the same uid
/// — as a resumed run keeps its first one. Left to default, each create would draw a new uid.
pub const TEST_UID: &str = "0d5c2e1a-blockwise-test";

/// `args`, with `--uid TEST_UID` added to a `backup create` that names no uid.
pub fn with_test_uid<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if args.starts_with(&["backup", "create"]) && !args.contains(&"--uid") {
        v.extend(["--uid", TEST_UID]);
    }
    v
}

/// The binary with a data dir, no kubeconfig, no store faults and fake AWS credentials (and the
/// test uid for `backup create`: [`with_test_uid`]).
pub fn blockwise(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(with_test_uid(args))
        .arg("--data-dir")
        .arg(data)
        .env_remove("KUBECONFIG")
        .env_remove("BLOCKWISE_FAULT_STORE")
        .env_remove("AWS_PROFILE")
        .env("HOME", data)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1");
    c
}

/// Runs to the end and returns the output.
pub fn run(data: &Path, args: &[&str]) -> Output {
    blockwise(data, args).output().expect("run blockwise")
}

/// The exit code, with stderr on failure to make assertion messages useful.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The local store's copy of a backup file.
pub fn local_file(data: &Path, name: &str, file: &str) -> Vec<u8> {
    let p: PathBuf = data.join("store").join("backups").join(name).join(file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The local store's archive of a backup.
pub fn local_archive(data: &Path, name: &str) -> Vec<u8> {
    local_file(data, name, &format!("{name}.tar.gz"))
}

/// A moto S3 server on a free loopback port, killed on drop.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
}

impl Moto {
    /// Starts `moto_server` and waits (bounded polling) until it answers.
    pub fn start() -> Moto {
        if let Some(port) = std::env::var(MOTO_PORT_ENV).ok().and_then(|p| p.parse().ok()) {
            let moto = Moto { child: None, port };
            assert!(
                moto.request("GET", "/", b"").is_some_and(|(code, _)| code == 200),
                "{MOTO_PORT_ENV}={port}, but nothing answers there"
            );
            return moto;
        }
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}): the S3 tests need it; install it with `pip install 'moto[server]'`")
            });
        let mut moto = Moto { child: Some(child), port };
        for _ in 0..MOTO_START_POLLS_MAX {
            if let Some(status) = moto.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                panic!("moto_server exited at start ({status}); is `pip install 'moto[server]'` complete?");
            }
            if moto.request("GET", "/", b"").is_some_and(|(code, _)| code == 200) {
                return moto;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("moto_server did not answer on 127.0.0.1:{port}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request (unsigned: moto accepts it); `None` when nothing answers.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        let mut body = raw[split + 4..].to_vec();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
        Some((code, body))
    }

    /// Creates a bucket (object_store cannot).
    pub fn create_bucket(&self, bucket: &str) {
        let got = self.request("PUT", &format!("/{bucket}"), b"");
        assert!(got.as_ref().is_some_and(|(c, _)| *c == 200), "creating bucket {bucket}: {got:?}");
    }

    /// An object's bytes, or `None` when it does not exist (a signed GET: moto refuses anonymous
    /// reads).
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .build()
            .expect("S3 client");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            match s3.get(&object_store::path::Path::from(key)).await {
                Ok(r) => Some(r.bytes().await.expect("object body").to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("GET {bucket}/{key}: {e}"),
            }
        })
    }

    /// The `--storage … --s3-endpoint … --s3-allow-http` flags for a bucket and prefix.
    pub fn flags(&self, bucket: &str, prefix: &str) -> Vec<String> {
        vec![
            "--storage".into(),
            format!("s3://{bucket}/{prefix}"),
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-allow-http".into(),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || body.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[(eol + 4 + size).min(body.len())..];
    }
}

/// Spawns `cmd`, reads its plain progress lines and SIGKILLs it right after line `kill_at`
/// (1-based). Returns whether it died of the kill (rather than finishing first).
pub fn kill_after_line(mut cmd: Command, kill_at: usize) -> bool {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().expect("spawn blockwise");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = 0;
    while let Some(Ok(_)) = lines.next() {
        seen += 1;
        if seen == kill_at {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            break;
        }
    }
    child.wait().expect("wait").signal() == Some(libc::SIGKILL)
}

/// Every pod with a freeze exec has an unfreeze exec after its last freeze (DESIGN §7 H2).
#[track_caller]
pub fn assert_windows_closed(log: &Path) {
    let records = blockwise_simulator::fake::read_exec_log(log).expect("exec log");
    assert!(!records.is_empty(), "the demo cluster recorded no exec at all");
    for (i, r) in records.iter().enumerate() {
        let is_pre = r.command.iter().any(|a| a == "--freeze") || r.command.last().is_some_and(|a| a == "exit 1");
        if is_pre {
            let closed = records[i + 1..].iter().any(|p| p.pod == r.pod && p.command.iter().any(|a| a == "--unfreeze"));
            assert!(closed, "pod {} had its pre-hook exec (record {i}) but no post-hook after it", r.pod);
        }
    }
}

/// Gzips bytes (test fixtures).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

/// What the demo cluster's own records (`backups/NAME/demo-cluster.json` and its journal, written
/// by the fake cluster, not by the engine) say the backup left behind: the claims with a live
/// storage snapshot, each once. The cluster is loaded as the binary loads it (the parameters
/// recorded in `cluster.json`), which replays what a killed process left in the journal. Panics on
/// a claim snapshotted twice and still alive (a duplicate), and on any snapshot API object still
/// present (an orphan: a finished backup keeps only storage).
pub fn live_snapshot_claims(data: &Path, name: &str) -> Vec<String> {
    let dir = data.join("backups").join(name);
    let source = std::fs::read(dir.join("cluster.json")).expect("cluster.json");
    let source: blockwise_adapters::session::ClusterSource = serde_json::from_slice(&source).expect("cluster.json");
    let blockwise_adapters::session::ClusterSource::Demo { objects, seed, latency_ms, faults } = source else {
        panic!("{name} did not back up the demo cluster");
    };
    let state = dir.join("demo-cluster.json");
    let cluster = blockwise_simulator::demo::demo_cluster_at(objects, seed, faults, latency_ms, &state)
        .unwrap_or_else(|e| panic!("loading {}: {e}", state.display()));
    let left = cluster.snapshot_objects();
    assert!(left.is_empty(), "snapshot objects still in the cluster after the backup: {left:?}");
    let mut claims: Vec<String> = (cluster.storage_snapshots().into_values())
        .filter(|s| s.deleted_ms.is_none())
        .map(|s| s.claim.to_string())
        .collect();
    claims.sort();
    let before = claims.len();
    claims.dedup();
    assert_eq!(before, claims.len(), "a claim has two live storage snapshots: one was taken twice");
    claims
}

/// The handles of the storage snapshots the fake driver of `cluster` holds and has not deleted
/// (the fake world's own record, not the backup's).
pub fn live_storage(cluster: &blockwise_simulator::fake::FakeCluster) -> std::collections::BTreeSet<String> {
    (cluster.storage_snapshots().into_values().filter(|x| x.deleted_ms.is_none())).map(|x| x.handle).collect()
}

/// The ClusterRole's rules in `deploy/blockwise.yaml` (what a user installs): (apiGroups,
/// resources, verbs) as written there.
pub fn installed_cluster_role_rules() -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/blockwise.yaml"))
        .expect("deploy/blockwise.yaml");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    let mut out = Vec::new();
    for doc in text.split("\n---").filter(|d| !d.trim().is_empty()) {
        let v: serde_json::Value = serde_yaml_ng::from_str(doc).expect("a YAML document");
        if v["kind"] == "ClusterRole" {
            for r in v["rules"].as_array().expect("rules") {
                out.push((strings(&r["apiGroups"]), strings(&r["resources"]), strings(&r["verbs"])));
            }
        }
    }
    assert!(!out.is_empty(), "deploy/blockwise.yaml has no ClusterRole rules");
    out
}

/// Whether RBAC rules allow (verb, group, resource[/subresource]), as the Kubernetes API server
/// matches them (`VerbMatches`, `APIGroupMatches`, `ResourceMatches` of k8s.io/rbac/v1 helpers),
/// written here apart from the product's own matcher: `*` verbs and groups match all; a `*`
/// resource matches every resource and every subresource; `*/sub` matches that subresource of any
/// resource; and — as the RBAC documentation reads — `res/*` matches `res`'s subresources.
pub fn rbac_allows(rules: &[(Vec<String>, Vec<String>, Vec<String>)], verb: &str, group: &str, resource: &str) -> bool {
    let (base, sub) = match resource.split_once('/') {
        Some((b, s)) => (b, Some(s)),
        None => (resource, None),
    };
    rules.iter().any(|(groups, resources, verbs)| {
        verbs.iter().any(|v| v == "*" || v == verb)
            && groups.iter().any(|g| g == "*" || g == group)
            && resources.iter().any(|r| match (r.split_once('/'), sub) {
                _ if r == "*" || r == resource => true,
                (Some(("*", rs)), Some(s)) => rs == s,
                (Some((rb, "*")), Some(_)) => rb == base,
                _ => false,
            })
    })
}

/// Copies the directory tree `from` to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Damages the file at `path`: `"flip"` flips bits of its byte at `at` (xor 0x5a), `"truncate"`
/// cuts it to `at` bytes.
pub fn damage(path: &Path, mode: &str, at: u64) {
    match mode {
        "flip" => {
            let mut bytes = std::fs::read(path).unwrap();
            bytes[at as usize] ^= 0x5a;
            std::fs::write(path, bytes).unwrap();
        }
        "truncate" => std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(at).unwrap(),
        other => panic!("unknown damage {other:?}"),
    }
}
