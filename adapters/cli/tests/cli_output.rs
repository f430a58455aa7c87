//! What a newcomer and a shell script see: the README's first command completes (exit 0) and says
//! what to try next; `--demo-faults` shows a failing hook (exit 3); output to a closed pipe ends
//! quietly; `describe`, `logs` and `get` show a backup that another process is running.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;

use common::{assert_exit, blockwise, local_archive, local_file, run};

#[test]
fn the_default_demo_completes_and_says_what_to_try_next() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run(tmp.path(), &["backup", "create", "demo", "--demo", "--demo-objects", "300"]);
    assert_exit(&out, 0, "the default demo has no faults");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backup demo Completed"), "{err}");
    assert!(err.contains("blockwise backup describe demo") && err.contains("--demo-faults"), "{err}");
    let out = run(tmp.path(), &["backup", "create", "faulty", "--demo", "--demo-faults", "--demo-objects", "300"]);
    assert_exit(&out, 3, "the demo's deliberate failing pre-hook: PartiallyFailed");
}

/// `describe` reads the backup's summary and counts its volume snapshots; `--details` (the full
/// fold, as Velero's flag) lists each claim's — judged against the VolumeSnapshots the CSI file in
/// the store holds, not against the log.
#[test]
fn describe_counts_the_snapshots_and_details_lists_each_one_the_csi_file_holds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert_exit(&run(tmp.path(), &["backup", "create", "d", "--demo", "--demo-objects", "600"]), 0, "create");
    let mut gz = String::new();
    flate2::read::GzDecoder::new(local_file(tmp.path(), "d", "d-csi-volumesnapshots.json.gz").as_slice())
        .read_to_string(&mut gz)
        .expect("gunzip");
    let stored: Vec<serde_json::Value> = serde_json::from_str(&gz).expect("a JSON array");
    let mut names: Vec<String> =
        stored.iter().map(|v| v.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap().to_string()).collect();
    names.sort();
    assert!(names.len() >= 4, "the demo captures volumes: {names:?}");
    let json = |args: &[&str]| -> serde_json::Value {
        let out = run(tmp.path(), args);
        assert_exit(&out, 0, "describe");
        serde_json::from_slice(&out.stdout).expect("describe -o json is JSON")
    };
    let summary = json(&["backup", "describe", "d", "-o", "json"]);
    assert_eq!(summary["volumeSnapshots"]["captured"], names.len(), "{}", summary["volumeSnapshots"]);
    assert!(summary.get("snapshots").is_none(), "the summary lists no snapshot: {summary}");
    let details = json(&["backup", "describe", "d", "-o", "json", "--details"]);
    let mut listed: Vec<String> = (details["snapshots"].as_array().expect("--details lists the snapshots").iter())
        .map(|r| r["snapshot"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    listed.dedup();
    assert_eq!(listed, names, "--details names the VolumeSnapshots the CSI file holds");
    for (k, v) in summary.as_object().unwrap() {
        assert_eq!(details.get(k), Some(v), "{k}: --details adds the list and changes nothing else");
    }
    let text = String::from_utf8_lossy(&run(tmp.path(), &["backup", "describe", "d"]).stdout).into_owned();
    assert!(text.contains(&format!("Snapshots:    {n}/{n} claims captured", n = names.len())), "{text}");
    assert!(text.contains("describe --details") && !text.contains(&names[0]), "{text}");
    let text = String::from_utf8_lossy(&run(tmp.path(), &["backup", "describe", "d", "--details"]).stdout).into_owned();
    assert!(names.iter().all(|n| text.contains(n.as_str())), "{text}");
}

/// Velero's volume information names each bound claim the archive holds, with its volume and
/// that volume's reclaim policy — judged from the archive's own claims and volumes (the claims and
/// volumes are read back from the log for it, not held in memory through the backup).
#[test]
fn volume_information_names_every_bound_claim_of_the_archive_with_its_volume() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert_exit(&run(tmp.path(), &["backup", "create", "v", "--demo", "--demo-objects", "600"]), 0, "create");
    let archive = local_archive(tmp.path(), "v");
    let mut tar = tar::Archive::new(flate2::read::MultiGzDecoder::new(archive.as_slice()));
    let (mut claims, mut policies) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    for entry in tar.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").display().to_string();
        let mut text = String::new();
        entry.read_to_string(&mut text).expect("read");
        if path.contains("-preferredversion/") {
            continue;
        }
        let str_at = |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_string);
        if path.starts_with("resources/persistentvolumeclaims/namespaces/") {
            let v: serde_json::Value = serde_json::from_str(&text).expect("claim JSON");
            if str_at(&v, "/status/phase").as_deref() == Some("Bound") {
                let key = (str_at(&v, "/metadata/namespace").unwrap(), str_at(&v, "/metadata/name").unwrap());
                claims.insert(key, str_at(&v, "/spec/volumeName").unwrap());
            }
        } else if path.starts_with("resources/persistentvolumes/cluster/") {
            let v: serde_json::Value = serde_json::from_str(&text).expect("volume JSON");
            policies.insert(str_at(&v, "/metadata/name").unwrap(), str_at(&v, "/spec/persistentVolumeReclaimPolicy"));
        }
    }
    assert!(claims.len() >= 4, "the demo has bound claims: {claims:?}");
    let mut gz = String::new();
    flate2::read::GzDecoder::new(local_file(tmp.path(), "v", "v-volumeinfo.json.gz").as_slice())
        .read_to_string(&mut gz)
        .expect("gunzip");
    let infos: Vec<serde_json::Value> = serde_json::from_str(&gz).expect("volume information is a JSON array");
    let mut named = std::collections::BTreeMap::new();
    for i in &infos {
        let s = |p: &str| i.pointer(p).and_then(|x| x.as_str()).unwrap_or_default().to_string();
        let claim = (s("/pvcNamespace"), s("/pvcName"));
        assert!(named.insert(claim.clone(), s("/pvName")).is_none(), "{claim:?} is named twice");
        let policy = i.pointer("/pvInfo/reclaimPolicy").and_then(|x| x.as_str()).map(str::to_string);
        assert_eq!(policy, policies.get(&s("/pvName")).cloned().flatten(), "{claim:?}: its volume's reclaim policy");
    }
    assert_eq!(named, claims, "one entry per bound claim of the archive, with its volume");
}

/// Regression (issue 9): `blockwise backup logs NAME | head` panicked on the closed pipe.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert_exit(&run(tmp.path(), &["backup", "create", "p", "--demo", "--demo-objects", "300"]), 0, "create");
    for args in [&["backup", "logs", "p"][..], &["backup", "describe", "p"], &["backup", "get"]] {
        let mut child = blockwise(tmp.path(), args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // Read one line, then close the pipe, as `| head -1` does.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        drop(stdout);
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let status = child.wait().unwrap();
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(status.code() == Some(0) || status.code().is_none(), "{args:?}: {status:?} {err}");
        assert!(!first.is_empty(), "{args:?}");
    }
}

/// Regression (issue 9): `describe` and `logs` failed while the backup ran in another process
/// ("is in use by another blockwise process"). They show the running process's live view.
#[test]
fn describe_logs_and_get_show_a_backup_running_in_another_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 100 ms per API call and exec, one worker: after planning, the 18 hook execs alone take 1.8 s.
    let args =
        ["backup", "create", "live", "--demo", "--demo-latency-ms", "100", "--page-size", "100", "--workers", "1"];
    let mut child = blockwise(tmp.path(), &args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Wait (on the runner's own output, not on time) until the plan is made.
    let planned = lines.by_ref().map_while(Result::ok).any(|l| l.starts_with("planned "));
    assert!(planned, "the backup printed no plan");
    let describe = run(tmp.path(), &["backup", "describe", "live"]);
    let logs = run(tmp.path(), &["backup", "logs", "live"]);
    let json = run(tmp.path(), &["backup", "describe", "live", "-o", "json"]);
    let get = run(tmp.path(), &["backup", "get"]);
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    assert_exit(&describe, 0, "describe of a running backup");
    let text = String::from_utf8_lossy(&describe.stdout);
    assert!(text.contains("Phase:") && text.contains("InProgress") && text.contains("live view"), "{text}");
    assert_exit(&logs, 0, "logs of a running backup");
    let log_text = String::from_utf8_lossy(&logs.stdout);
    assert!(log_text.contains("backup \"live\" requested") && log_text.contains("live view"), "{log_text}");
    assert_exit(&json, 0, "describe -o json");
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!((doc["phase"].as_str(), doc["live"].as_bool()), (Some("InProgress"), Some(true)), "{doc}");
    let table = String::from_utf8_lossy(&get.stdout);
    assert!(
        table.lines().any(|l| l.starts_with("live ") && l.contains("InProgress") && l.contains("(running)")),
        "{table}"
    );
}

#[test]
fn backup_delete_removes_the_store_files_and_the_log_and_asks_for_confirm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    assert_exit(&run(data, &["backup", "create", "gone", "--demo", "--demo-objects", "200"]), 0, "create");
    assert_exit(&run(data, &["backup", "create", "kept", "--demo", "--demo-objects", "200"]), 0, "create");
    let out = run(data, &["backup", "delete", "gone"]);
    assert_exit(&out, 2, "delete without --confirm");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--confirm"));
    assert!(data.join("store/backups/gone/gone.tar.gz").exists(), "nothing is deleted without --confirm");
    assert_exit(&run(data, &["backup", "delete", "gone", "--confirm"]), 0, "delete");
    assert!(!data.join("store/backups/gone").exists(), "the store files are still there");
    assert!(!data.join("backups/gone").exists(), "the log is still there");
    assert!(data.join("store/backups/kept/kept.tar.gz").exists(), "another backup was touched");
    let listed = String::from_utf8_lossy(&run(data, &["backup", "get"]).stdout).into_owned();
    assert!(listed.contains("kept") && !listed.contains("gone"), "{listed}");
    let out = run(data, &["backup", "delete", "gone", "--confirm"]);
    assert_exit(&out, 2, "delete of a backup that is not there");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

/// `blockwise simulate` runs the service's schedule world beside the engine's for each seed and
/// reports both (issue 21): its JSON carries the schedule world's coverage, and a run prints it.
#[test]
fn simulate_reports_the_schedule_world_beside_the_engine_world() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run(tmp.path(), &["simulate", "--seed", "3", "--seeds", "2", "-o", "json"]);
    assert_exit(&out, 0, "two seeds pass");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("simulate -o json");
    let s = &doc["schedules"];
    assert_eq!(s["years"], 2, "{doc:#}");
    assert!(s["runs"].as_u64().is_some_and(|n| n > 0) && s["retention_deletions"].as_u64().is_some(), "{s}");
    assert_eq!(doc["service"]["worlds"], 2, "{doc:#}");
    assert!(doc["service"]["runs"].as_u64().is_some_and(|n| n > 0), "{doc:#}");
    let out = run(tmp.path(), &["simulate", "--seed", "3", "--seeds", "1"]);
    assert_exit(&out, 0, "one seed passes");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("schedules: 1 simulated years") && text.contains("(judges Y1-Y7, C1, C5)"), "{text}");
    assert!(text.contains("service: 1 worlds") && text.contains("(judges C2, C3, C4, Q1)"), "{text}");
}
