//! Kill and resume, with the real `blockwise` process: SIGKILL mid-backup at several points, then
//! `resume`, and the archive must be byte-identical to an uninterrupted run's; every pod whose
//! pre-hook exec started must have had its post-hook exec afterwards (the demo cluster records
//! every exec at its start in `demo-exec.jsonl`, a file that survives the kill).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blockwise_simulator::fake::read_exec_log;

const BIN: &str = env!("CARGO_BIN_EXE_blockwise");

fn blockwise(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).arg("--data-dir").arg(data).env_remove("KUBECONFIG").env("HOME", data);
    c
}

fn archive(data: &Path, name: &str) -> Vec<u8> {
    let p: PathBuf = data.join("store").join("backups").join(name).join(format!("{name}.tar.gz"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Starts a backup, reads its plain progress lines and SIGKILLs it right after line `kill_at`
/// (1-based). Returns whether the process was killed before it finished by itself.
fn create_and_kill(data: &Path, name: &str, extra: &[&str], kill_at: usize) -> bool {
    let mut args = vec!["backup", "create", name, "--demo", "--workers", "4"];
    args.extend_from_slice(extra);
    let mut child =
        blockwise(data, &args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn blockwise");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = 0;
    while let Some(Ok(_line)) = lines.next() {
        seen += 1;
        if seen == kill_at {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            break;
        }
    }
    let status = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGKILL)
}

/// Every pod with a freeze exec has an unfreeze exec after its last freeze.
fn assert_windows_closed(log: &Path) {
    let records = read_exec_log(log).expect("exec log");
    assert!(!records.is_empty(), "the demo cluster recorded no exec at all");
    for (i, r) in records.iter().enumerate() {
        let is_pre = r.command.iter().any(|a| a == "--freeze") || r.command.last().is_some_and(|a| a == "exit 1");
        if is_pre {
            let closed = records[i + 1..].iter().any(|p| p.pod == r.pod && p.command.iter().any(|a| a == "--unfreeze"));
            assert!(closed, "pod {} had its pre-hook exec (record {i}) but no post-hook after it", r.pod);
        }
    }
}

#[test]
fn kill_9_at_several_points_then_resume_gives_the_uninterrupted_archive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = tmp.path().join("reference");
    let latency = ["--demo-latency-ms", "15", "--page-size", "50"];
    let mut args = vec!["backup", "create", "ref", "--demo", "--workers", "4"];
    args.extend_from_slice(&latency);
    let out = blockwise(&reference, &args).output().expect("run reference");
    assert_eq!(
        out.status.code(),
        Some(3),
        "the demo has one failing Fail-mode pre-hook: PartiallyFailed\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = archive(&reference, "ref");
    assert_windows_closed(&reference.join("backups/ref/demo-exec.jsonl"));

    let mut interrupted = 0;
    for (round, kill_at) in [2usize, 12, 25, 40, 55].into_iter().enumerate() {
        let data = tmp.path().join(format!("kill-{round}"));
        // The backup has the same name as the reference: archive bytes must not depend on when it ran.
        let killed = create_and_kill(&data, "ref", &latency, kill_at);
        if killed {
            interrupted += 1;
            // A second kill during resume, for the rounds where it can land.
            if round % 2 == 1 {
                let mut child = blockwise(&data, &["backup", "resume", "ref"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn");
                let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
                if lines.next().is_some() {
                    // SAFETY: plain kill(2) on our own child's pid.
                    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                }
                let _ = child.wait();
            }
            let out = blockwise(&data, &["backup", "resume", "ref"]).output().expect("resume");
            assert_eq!(out.status.code(), Some(3), "round {round}: resume\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let got = archive(&data, "ref");
        assert!(
            got == expected,
            "round {round} (kill after line {kill_at}): archive differs from the uninterrupted run"
        );
        assert_windows_closed(&data.join("backups/ref/demo-exec.jsonl"));
        let describe = blockwise(&data, &["backup", "describe", "ref", "-o", "json"]).output().expect("describe");
        let j: serde_json::Value = serde_json::from_slice(&describe.stdout).expect("describe -o json is JSON");
        assert_eq!(j["phase"], "PartiallyFailed");
    }
    assert!(interrupted >= 3, "only {interrupted} of 5 kills landed mid-backup; the demo ran too fast to test resume");
}

#[test]
fn same_archive_bytes_for_1_and_16_workers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut archives = Vec::new();
    for workers in ["1", "16"] {
        let data = tmp.path().join(workers);
        let out = blockwise(&data, &["backup", "create", "w", "--demo", "--workers", workers]).output().expect("run");
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
        archives.push(archive(&data, "w"));
    }
    assert!(archives[0] == archives[1], "archives differ between 1 and 16 workers");
}

#[test]
fn create_refuses_an_in_progress_name_and_points_to_resume() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    assert!(create_and_kill(data, "half", &["--demo-latency-ms", "20", "--page-size", "50"], 3));
    let out = blockwise(data, &["backup", "create", "half", "--demo"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("InProgress") && err.contains("blockwise backup resume half"), "{err}");
    let out = blockwise(data, &["backup", "get"]).output().expect("get");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("half") && l.contains("InProgress")), "{table}");
}

#[test]
fn bad_input_is_a_clear_usage_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    let check = |args: &[&str], needle: &str| {
        let out = blockwise(data, args).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    };
    check(&["backup", "create", "../escape", "--demo"], "invalid backup name \"../escape\"");
    check(&["backup", "create", "Bad_Name", "--demo"], "invalid backup name");
    check(&["backup", "create", "x", "--demo", "--frobnicate"], "--frobnicate");
    check(&["backup", "create", "x", "--demo", "-l", "app in nope"], "invalid label selector");
    check(&["backup", "create", "x", "--demo", "--ordered-resources", "pods"], "--ordered-resources");
    check(&["backup", "create", "x", "--demo", "--workers", "0"], "--workers");
    check(&["backup", "describe", "missing"], "backup \"missing\" not found");
    check(&["backup", "resume", "missing"], "backup \"missing\" not found");
}
