//! Issue 22: the API server goes away in the middle of a backup — right after the first freeze
//! exec, inside that pod's hook window. `simulator serve` runs in its own process (its execs
//! printed on stdout as they start, and appended to its exec log), and `blockwise backup create`
//! talks to it through a kubeconfig:
//!
//! - **hung** (`SIGSTOP`: connections accepted, never answered): blockwise gives up within a bound
//!   and exits 1 naming the unreachable server — the run *stopped*, it did not fail; after
//!   `SIGCONT`, `backup resume` ends Completed;
//! - **gone** (the process killed, then started again from its state file on the same port): the
//!   same, the resume against the new process.
//!
//! Either way every freeze in the server's exec log is followed by its unfreeze. Servers bind
//! 127.0.0.1 and are killed when a test ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use blockwise_simulator::fake::read_exec_log;

const BIN: &str = env!("CARGO_BIN_EXE_blockwise");
/// The deadline of one request in these runs (`--request-timeout`).
const REQUEST_TIMEOUT: &str = "2s";
/// A run still going after this long hangs: the longest hook timeout of the demo (30 s) plus the
/// request timeouts of one call's attempts and its backoffs (6 × 2 s + about 10 s) and a probe,
/// several times over.
const BOUND: Duration = Duration::from_secs(240);

/// `simulator serve` in its own process; killed when dropped.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start(dir: &Path, port: u16) -> Server {
        let mut child = Command::new(BIN)
            .args(["simulator", "serve", "--demo-objects", "300", "--demo-latency-ms", "2", "--print-execs"])
            .args(["--port", &port.to_string()])
            .arg("--kubeconfig-out")
            .arg(dir.join("kubeconfig"))
            .arg("--exec-log")
            .arg(dir.join("execs.jsonl"))
            .arg("--state")
            .arg(dir.join("cluster-state.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting simulator serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Server { child, lines };
        s.wait_for("press Ctrl-C");
        s
    }

    /// Waits (at most 60 s) for a line of the server's output containing `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("simulator serve printed no line with {needle:?} ({e})"),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (bound, then released for the server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `blockwise` with `args`, started now; its output once it exits.
fn spawn(dir: &Path, args: &[&str]) -> mpsc::Receiver<Output> {
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--request-timeout", REQUEST_TIMEOUT])
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running blockwise");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().expect("waiting for blockwise"));
    });
    rx
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The output of a run, which must end within [`BOUND`].
fn ended(rx: mpsc::Receiver<Output>, what: &str) -> Output {
    rx.recv_timeout(BOUND).unwrap_or_else(|_| panic!("{what}: still running after {BOUND:?}"))
}

/// Every freeze of the exec log is followed, later in it, by an unfreeze of the same pod.
fn every_freeze_thawed(log: &PathBuf) {
    let execs = read_exec_log(log).expect("reading the exec log");
    let freezes: Vec<_> =
        execs.iter().filter(|r| r.command.iter().any(|a| a == "--freeze")).map(|r| (r.seq, &r.pod)).collect();
    assert!(!freezes.is_empty(), "no freeze in the exec log");
    for (seq, pod) in freezes {
        let thawed = execs.iter().any(|r| r.seq > seq && &r.pod == pod && r.command.iter().any(|a| a == "--unfreeze"));
        assert!(thawed, "pod {pod} frozen at exec {seq} was never unfrozen: {execs:#?}");
    }
}

/// Starts a backup and, at the first freeze the server receives, sends the server away
/// (`away`); checks the backup stops naming the server; brings the server back (`back`) and
/// resumes the backup to Completed.
fn outage_then_resume(away: impl FnOnce(&mut Server), back: impl FnOnce(Server, &Path, u16) -> Server) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Server::start(dir.path(), port);
    let kc = dir.path().join("kubeconfig");
    let url = format!("http://127.0.0.1:{port}");
    let run = spawn(dir.path(), &["backup", "create", "b", "--kubeconfig", kc.to_str().unwrap()]);
    server.wait_for("--freeze");
    away(&mut server);
    let out = ended(run, "backup create with the API server away");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the run stops (exit 1), it does not fail: {err}");
    assert!(err.contains("the cluster is unreachable"), "says why: {err}");
    assert!(err.contains(&url), "names the server {url}: {err}");
    assert!(err.contains("resume"), "says how to go on: {err}");
    let _server = back(server, dir.path(), port);
    let out = ended(spawn(dir.path(), &["backup", "resume", "b"]), "backup resume");
    assert_eq!(out.status.code(), Some(0), "resume ends Completed: {}", text(&out.stderr));
    every_freeze_thawed(&dir.path().join("execs.jsonl"));
}

#[test]
fn a_server_stopped_inside_a_hook_window_stops_the_backup_and_resume_completes_it() {
    outage_then_resume(
        |server| server.signal(libc::SIGSTOP),
        |server, _, _| {
            server.signal(libc::SIGCONT);
            server
        },
    );
}

#[test]
fn a_server_killed_inside_a_hook_window_stops_the_backup_and_resume_completes_it_against_its_successor() {
    outage_then_resume(
        |server| {
            let _ = server.child.kill();
            let _ = server.child.wait();
        },
        |old, dir, port| {
            drop(old);
            Server::start(dir, port)
        },
    );
}
