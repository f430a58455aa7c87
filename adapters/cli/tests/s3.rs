//! The S3 store against a real S3 protocol endpoint (moto, started by the tests on loopback): the
//! demo cluster backed up to a bucket gives, once downloaded, exactly the local store's archive;
//! the archive does not depend on the worker count or on a SIGKILL and resume; Velero's companion
//! files are all there. `moto_server` missing is a failure that says how to install it.

mod common;

use std::path::Path;

use common::{assert_exit, assert_windows_closed, blockwise, kill_after_line, local_archive, local_file, run, Moto};

/// A smaller demo for the runs that repeat (moto answers a few hundred requests a second).
const SMALL: [&str; 2] = ["--demo-objects", "300"];

fn args<'a>(base: &[&'a str], extra: &'a [String]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend(extra.iter().map(String::as_str));
    v
}

/// Downloads a backup's archive with the CLI.
fn download(data: &Path, name: &str) -> Vec<u8> {
    let dest = data.join(format!("downloaded-{name}.tar.gz"));
    let out = run(data, &["backup", "download", name, "-o", dest.to_str().expect("utf-8 path")]);
    assert_exit(&out, 0, "download");
    std::fs::read(&dest).expect("downloaded archive")
}

#[test]
fn demo_backup_to_s3_downloads_byte_identical_to_the_local_archive() {
    let moto = Moto::start();
    moto.create_bucket("velero");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (local, remote) = (tmp.path().join("local"), tmp.path().join("remote"));
    assert_exit(&run(&local, &["backup", "create", "demo", "--demo", "--demo-faults"]), 3, "local backup");
    let flags = moto.flags("velero", "cluster-a");
    let out = run(&remote, &args(&["backup", "create", "demo", "--demo", "--demo-faults"], &flags));
    assert_exit(&out, 3, "S3 backup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("archive: s3://velero/cluster-a/backups/demo/demo.tar.gz"), "{err}");

    let expected = local_archive(&local, "demo");
    assert!(download(&remote, "demo") == expected, "the S3 archive differs from the local one");
    // Velero's whole file set is in the bucket; the reproducible ones equal the local ones.
    let key = |f: &str| format!("cluster-a/backups/demo/{f}");
    for file in ["demo-resource-list.json.gz", "demo.tar.gz"] {
        assert!(moto.get("velero", &key(file)) == Some(local_file(&local, "demo", file)), "{file} differs");
    }
    for file in ["velero-backup.json", "demo-results.gz", "demo-logs.gz"] {
        assert!(moto.get("velero", &key(file)).is_some(), "{file} is missing from the bucket");
    }
    let backup: serde_json::Value =
        serde_json::from_slice(&moto.get("velero", &key("velero-backup.json")).expect("velero-backup.json"))
            .expect("velero-backup.json is JSON");
    assert_eq!(backup["status"]["phase"], "PartiallyFailed");
    assert!(moto.get("velero", &key("staging/resources/namespaces/cluster/shop.json")).is_some());
    // The recorded storage (no credentials) lets inspect find the backup by name.
    let storage = std::fs::read_to_string(remote.join("backups/demo/storage.json")).expect("storage.json");
    assert!(storage.contains("\"bucket\": \"velero\"") && !storage.contains("test"), "{storage}");
    let out = run(&remote, &["backup", "inspect", "demo"]);
    assert_exit(&out, 0, "inspect");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("resource list: compared") && listing.contains("defects: none"), "{listing}");
}

#[test]
fn s3_archives_are_identical_for_1_4_and_16_workers() {
    let moto = Moto::start();
    moto.create_bucket("bkt");
    let tmp = tempfile::tempdir().expect("tempdir");
    let local = tmp.path().join("local");
    assert_exit(
        &run(&local, &args(&["backup", "create", "w", "--demo", "--demo-faults"], &SMALL.map(String::from))),
        3,
        "local",
    );
    let expected = local_archive(&local, "w");
    for workers in ["1", "4", "16"] {
        let data = tmp.path().join(format!("s3-{workers}"));
        let mut extra: Vec<String> = SMALL.map(String::from).to_vec();
        extra.extend(moto.flags("bkt", &format!("workers-{workers}")));
        extra.extend(["--workers".to_string(), workers.to_string()]);
        assert_exit(&run(&data, &args(&["backup", "create", "w", "--demo", "--demo-faults"], &extra)), 3, workers);
        assert!(download(&data, "w") == expected, "{workers} workers: the S3 archive differs from the local one");
    }
}

#[test]
fn kill_9_then_resume_on_s3_gives_the_uninterrupted_archive() {
    let moto = Moto::start();
    moto.create_bucket("bkt");
    let tmp = tempfile::tempdir().expect("tempdir");
    let slow =
        ["--demo-objects", "300", "--demo-latency-ms", "5", "--page-size", "50", "--workers", "4"].map(String::from);
    let local = tmp.path().join("local");
    assert_exit(&run(&local, &args(&["backup", "create", "k", "--demo", "--demo-faults"], &slow)), 3, "local");
    let expected = local_archive(&local, "k");
    let mut interrupted = 0;
    for (round, kill_at) in [3usize, 9, 14].into_iter().enumerate() {
        let data = tmp.path().join(format!("kill-{round}"));
        let mut extra = slow.to_vec();
        extra.extend(moto.flags("bkt", &format!("round-{round}")));
        if kill_after_line(
            blockwise(&data, &args(&["backup", "create", "k", "--demo", "--demo-faults"], &extra)),
            kill_at,
        ) {
            interrupted += 1;
            assert_exit(&run(&data, &["backup", "resume", "k"]), 3, "resume");
        }
        assert!(download(&data, "k") == expected, "round {round} (kill after line {kill_at}): archive differs");
        assert_windows_closed(&data.join("backups/k/demo-exec.jsonl"));
    }
    assert!(interrupted >= 2, "only {interrupted} of 3 kills landed mid-backup");
}

/// A multipart upload against a real S3 protocol endpoint (S3 wants parts of at least 5 MiB):
/// an incompressible archive of about 12 MiB goes up in three parts and comes back byte-identical
/// to the local store's.
#[test]
fn a_large_archive_goes_up_as_a_multipart_upload() {
    use blockwise_adapters::entry_runs::{ArchiveEntries, ArchiveEntry};
    use blockwise_adapters::s3::{S3Config, S3Location, S3Store};
    use blockwise_adapters::store::{LocalStore, Store};
    use blockwise_engine::ItemKey;
    use sha2::{Digest, Sha256};
    use std::sync::Arc;

    let moto = Moto::start();
    moto.create_bucket("big");
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("big")
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .build()
        .expect("S3 client");
    let mut cfg = S3Config::new(S3Location::parse("s3://big/multi").expect("location"), tmp.path().join("scratch"));
    cfg.multipart_threshold_bytes = 5 << 20;
    cfg.multipart_part_bytes = 5 << 20;
    let store = S3Store::with_object_store(Arc::new(s3), cfg);
    let local = LocalStore::new(tmp.path().join("local"));
    // 24 items of 512 KiB of xorshift noise: gzip cannot shrink them.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let items: Vec<(ItemKey, Vec<u8>)> = (0..24)
        .map(|i| {
            let bytes: Vec<u8> = (0..512 * 1024)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (ItemKey::namespaced("", "secrets", "big", &format!("blob-{i:02}")), bytes)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (info, local_info) = rt.block_on(async {
        let mut entries = Vec::new();
        for (key, bytes) in &items {
            store.put_item("b", key, bytes).await.expect("put to S3");
            local.put_item("b", key, bytes).await.expect("put locally");
            entries.push(ArchiveEntry { key: key.clone(), version: "v1".into(), digest: Sha256::digest(bytes).into() });
        }
        let entries = Arc::new(ArchiveEntries::of(&entries).expect("entries"));
        let info = store.finalize("b", entries.clone()).await.expect("multipart finalize");
        (info, local.finalize("b", entries).await.expect("local finalize"))
    });
    assert!(info.bytes > 10 << 20, "the archive must need several parts: {} bytes", info.bytes);
    assert_eq!(info, local_info);
    let got = moto.get("big", "multi/backups/b/b.tar.gz").expect("archive in the bucket");
    assert!(got == std::fs::read(local.archive_path("b").expect("path")).expect("local archive"), "bytes differ");
}

/// A backup stored in S3, restored on another machine: a data directory that knows nothing of it
/// finds the archive through `--storage`, and the restore recreates the backup's objects.
#[test]
fn a_backup_in_s3_restores_from_a_data_directory_that_never_saw_it() {
    use std::sync::Arc;
    let moto = Moto::start();
    moto.create_bucket("restores");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (here, there) = (tmp.path().join("here"), tmp.path().join("there"));
    let flags = moto.flags("restores", "cluster-a");
    let out = run(&here, &args(&["backup", "create", "s3b", "--demo", SMALL[0], SMALL[1]], &flags));
    assert_exit(&out, 0, "S3 backup");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = Arc::new(
        blockwise_simulator::demo::empty_cluster().with_clock(Arc::new(blockwise_adapters::world::TokioRuntime)),
    );
    let server = rt
        .block_on(blockwise_simulator::server::FakeApiServer::start(cluster.clone(), "127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let kc = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kc).unwrap();
    let kc = kc.to_str().unwrap().to_string();
    // Without --storage, a backup this data directory never made is a usage error naming it.
    let out = run(&there, &["restore", "create", "r", "--from-backup", "s3b", "--kubeconfig", &kc]);
    assert_exit(&out, 2, "restore of an unknown backup");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --storage"));
    let out = run(&there, &args(&["restore", "create", "r", "--from-backup", "s3b", "--kubeconfig", &kc], &flags));
    assert_exit(&out, 0, "restore from S3");
    let d: serde_json::Value =
        serde_json::from_slice(&run(&there, &["restore", "describe", "r", "-o", "json"]).stdout).unwrap();
    let created: u64 = d["resources"].as_object().unwrap().values().map(|c| c["created"].as_u64().unwrap()).sum();
    assert_eq!(d["phase"], "Completed");
    assert!(created > 200, "{created} objects restored");
    let pods =
        server.requests().iter().filter(|r| r.method == "POST" && r.path.ends_with("/pods") && r.status == 201).count();
    assert_eq!(pods as u64, d["resources"]["pods"]["created"].as_u64().unwrap());
}
