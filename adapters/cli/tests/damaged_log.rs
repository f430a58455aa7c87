//! Issue 22: a log that knows when it is damaged. Two finished backups of the demo cluster, `a` and
//! `b`; then, for every file of `a`'s log directory (sled's `db`, `conf` and snapshot, the commit
//! marker, `records.blob`, `bodies.spill`), bytes flipped at many offsets and the file truncated
//! at many offsets — each on a fresh copy — and the reading and resuming commands run on it:
//!
//! - no command exits 101 (a panic) or hangs;
//! - `get` still lists `b` Completed, and shows `a` either Completed (the damage hit nothing the
//!   log needs: every record verified, as many as were committed) or `Damaged`;
//! - when `a` reads back, it is the whole history — the same phase and exactly as many events as
//!   before the damage — never a shorter one; when it is damaged, `describe`, `logs` and `resume`
//!   exit 1 naming the backup and the file; and reading it again answers the same (no reader
//!   "repaired" it into a valid, shorter log).
//!
//! Then: `backup delete` of a damaged backup deletes its store files and as many storage snapshots
//! as deleting its intact twin does.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_exit, blockwise, copy_dir, run};

/// A command still running after this long hangs.
const HANG: Duration = Duration::from_secs(60);
/// Offsets tried per file and per kind of damage (the ends, evenly spaced ones, and drawn ones).
const OFFSETS: usize = 7;

fn run_bounded(mut cmd: Command, what: &str) -> Output {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn blockwise");
    // Drained as the child writes, so a full pipe never holds it.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            panic!("{what}: still running after {HANG:?}");
        }
        // Polling a child's exit, not synchronising with it: nothing to wait on but the process.
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out.join().expect("stdout"), stderr: err.join().expect("stderr") }
}

fn files_under(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            files_under(&entry.path(), base, out);
        } else if entry.metadata().unwrap().len() > 0 {
            out.push(entry.path().strip_prefix(base).unwrap().to_path_buf());
        }
    }
}

/// `OFFSETS` offsets in `0..len`: both ends, evenly spaced ones and drawn ones (fixed seed).
fn offsets(len: u64, seed: u64) -> Vec<u64> {
    let mut out = vec![0, len - 1];
    let mut x = seed | 1;
    while out.len() < OFFSETS {
        if out.len() % 2 == 0 {
            out.push(len * out.len() as u64 / OFFSETS as u64);
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(x % len);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `a`'s row of `backup get`: its status and the whole line; `b`'s must be Completed.
fn row_of_a(get: &Output, case: &str) -> (String, String) {
    assert_exit(get, 0, &format!("{case}: backup get"));
    let text = String::from_utf8_lossy(&get.stdout).into_owned();
    let row = |n: &str| text.lines().find(|l| l.split_whitespace().next() == Some(n)).map(str::to_string);
    let b = row("b").unwrap_or_else(|| panic!("{case}: `get` no longer lists b:\n{text}"));
    assert_eq!(b.split_whitespace().nth(1), Some("Completed"), "{case}: {b}");
    let a = row("a").unwrap_or_else(|| panic!("{case}: `get` does not list a:\n{text}"));
    (a.split_whitespace().nth(1).unwrap_or_default().to_string(), a)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn no_damage_to_any_file_of_a_log_panics_hangs_hides_other_backups_or_passes_as_a_shorter_log() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    for name in ["a", "b"] {
        let out = run(&pristine, &["backup", "create", name, "--demo", "--demo-objects", "600"]);
        assert_exit(&out, 0, &format!("backup create {name}"));
    }
    // Counted on a copy: a reader's open lets sled rewrite its files, and the damage must meet
    // them as the writer left them (where a flip makes sled 0.34 recover a prefix without a word).
    let counted = tmp.path().join("counted");
    copy_dir(&pristine, &counted);
    let logs_before = run(&counted, &["backup", "logs", "a"]);
    assert_exit(&logs_before, 0, "backup logs a");
    let events = String::from_utf8_lossy(&logs_before.stdout).lines().count();
    assert!(events > 10, "{events} events");
    let log = pristine.join("backups/a/log");
    let mut files = Vec::new();
    files_under(&log, &log, &mut files);
    files.sort();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    for expected in ["db", "conf", "commit", "records.blob", "bodies.spill"] {
        assert!(names.iter().any(|n| n == expected), "{expected} not among {names:?}");
    }
    let (mut damaged, mut intact, mut cut_short) = (0, 0, 0);
    for (i, file) in files.iter().enumerate() {
        let len = std::fs::metadata(log.join(file)).unwrap().len();
        for (mode, at) in offsets(len, 7 + i as u64)
            .into_iter()
            .map(|at| ("flip", at))
            .chain(offsets(len, 1000 + i as u64).into_iter().map(|at| ("truncate", at)))
        {
            let case = format!("{} {mode} at {at} of {len}", file.display());
            let work = tmp.path().join("work");
            let _ = std::fs::remove_dir_all(&work);
            copy_dir(&pristine, &work);
            let path = work.join("backups/a/log").join(file);
            common::damage(&path, mode, at);
            let cmd = |args: &[&str]| {
                let o = run_bounded(blockwise(&work, args), &format!("{case}: {args:?}"));
                assert!(
                    !matches!(o.status.code(), Some(101) | None),
                    "{case}: {args:?} exited {:?} (a panic or a signal)\n{}",
                    o.status,
                    stderr(&o)
                );
                o
            };
            let (status, row) = row_of_a(&cmd(&["backup", "get"]), &case);
            let describe = cmd(&["backup", "describe", "a"]);
            let logs = cmd(&["backup", "logs", "a"]);
            match status.as_str() {
                "Completed" => {
                    intact += 1;
                    assert_exit(&describe, 0, &format!("{case}: describe"));
                    assert!(String::from_utf8_lossy(&describe.stdout).contains("Completed"), "{case}");
                    assert_exit(&logs, 0, &format!("{case}: logs"));
                    let n = String::from_utf8_lossy(&logs.stdout).lines().count();
                    assert_eq!(n, events, "{case}: the log reads back with {n} events, not {events}");
                }
                "Damaged" => {
                    damaged += 1;
                    assert!(row.contains("backup \"a\" is damaged"), "{case}: {row}");
                    cut_short += usize::from(row.contains("the log was cut short"));
                    for (what, o) in [("describe", &describe), ("logs", &logs)] {
                        assert_exit(o, 1, &format!("{case}: {what}"));
                        assert!(stderr(o).contains("backup \"a\" is damaged: "), "{case}: {what}: {}", stderr(o));
                    }
                    let resume = cmd(&["backup", "resume", "a"]);
                    assert_exit(&resume, 1, &format!("{case}: resume"));
                    assert!(stderr(&resume).contains("is damaged"), "{case}: resume: {}", stderr(&resume));
                }
                other => panic!("{case}: a shows as {other:?}: {row}"),
            }
            // Reading did not turn the damage into a valid log: the same answer again.
            let (again, _) = row_of_a(&cmd(&["backup", "get"]), &case);
            assert_eq!(again, status, "{case}: read as {status} first, then as {again}");
        }
    }
    eprintln!(
        "{} files: {damaged} damaged logs named ({cut_short} cut short by sled, caught by the commit marker), {intact} damages that left every record intact",
        files.len()
    );
    assert!(damaged > files.len(), "only {damaged} damages were noticed");
    // sled recovered a prefix without a word in some: without the commit marker they would have
    // read back as a shorter log (the checks above fail then).
    assert!(cut_short > 0, "no damage cut the log short: the commit marker was not put to the test");
}

#[test]
fn deleting_a_damaged_backup_deletes_its_files_and_finds_its_storage_snapshots_without_its_log() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let out = run(&pristine, &["backup", "create", "a", "--demo", "--demo-objects", "600"]);
    assert_exit(&out, 0, "backup create a");
    let deleted = |data: &Path| -> String {
        let out = run(data, &["backup", "delete", "a", "--confirm"]);
        assert_exit(&out, 0, "backup delete a");
        assert!(!data.join("backups/a").exists(), "its directory is left");
        assert!(!data.join("store/backups/a").exists(), "its store files are left");
        let text = stderr(&out);
        let line = text.lines().find(|l| l.starts_with("deleted backup a: ")).unwrap_or_default().to_string();
        line.split(" storage snapshots").next().unwrap_or_default().to_string()
    };
    let twin = tmp.path().join("twin");
    copy_dir(&pristine, &twin);
    let intact = deleted(&twin);
    assert!(!intact.ends_with(": 0"), "the demo backup holds storage snapshots: {intact}");
    // A record of the blob file flipped (the verified prefix keeps the uid), the commit marker
    // gone, and sled's database garbled (nothing of the log readable: the uid kept beside it).
    for damage in ["records.blob", "commit", "db"] {
        let work = tmp.path().join(format!("work-{damage}"));
        copy_dir(&pristine, &work);
        let path = work.join("backups/a/log").join(damage);
        match damage {
            "commit" => std::fs::remove_file(&path).unwrap(),
            _ => {
                // The blob: 64 bytes of a record; sled's database: all of it (a batched log's
                // `db` is small, and sled recovers what precedes a garbled part).
                let mut bytes = std::fs::read(&path).unwrap();
                let len = bytes.len();
                let (from, to) = if damage == "db" { (0, len) } else { (len / 3, len / 3 + 64.min(len - len / 3)) };
                for b in &mut bytes[from..to] {
                    *b ^= 0xa5;
                }
                std::fs::write(&path, bytes).unwrap();
            }
        }
        let get = run(&work, &["backup", "get"]);
        assert!(String::from_utf8_lossy(&get.stdout).contains("Damaged"), "{damage}: not damaged");
        assert_eq!(deleted(&work), intact, "{damage}");
    }
}
