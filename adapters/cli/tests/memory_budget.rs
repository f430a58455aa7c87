//! Issue 23: the process knows its memory limit. `blockwise backup create` run inside a memory
//! cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`, made by this test when it may — as root —
//! and skipped with the reason printed otherwise) reports that limit as its budget and sizes sled's
//! cache under it; `--memory-limit` overrides it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A memory cgroup made for this test, removed when dropped.
struct Cgroup {
    dir: PathBuf,
    limit_file: PathBuf,
}

impl Cgroup {
    fn make(limit: u64) -> Result<Cgroup, String> {
        let name = format!("blockwise-test-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let (dir, file) = if v2 {
            (Path::new("/sys/fs/cgroup").join(&name), "memory.max")
        } else {
            (Path::new("/sys/fs/cgroup/memory").join(&name), "memory.limit_in_bytes")
        };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cg = Cgroup { limit_file: dir.join(file), dir };
        std::fs::write(&cg.limit_file, limit.to_string())
            .map_err(|e| format!("cannot write {}: {e}", cg.limit_file.display()))?;
        Ok(cg)
    }

    /// `blockwise ARGS` started inside this cgroup.
    fn run(&self, data: &Path, args: &[&str]) -> std::process::Output {
        let procs = self.dir.join("cgroup.procs");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > '{}' && exec \"$@\"", procs.display()))
            .arg("sh")
            .arg(common::BIN)
            .args(common::with_test_uid(args))
            .arg("--data-dir")
            .arg(data)
            .env_remove("KUBECONFIG")
            .env("HOME", data);
        cmd.output().expect("run blockwise in the cgroup")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_run_inside_a_memory_cgroup_takes_its_limit_as_its_budget() {
    let cg = match Cgroup::make(300 << 20) {
        Ok(cg) => cg,
        Err(why) => {
            eprintln!("skipped: no memory cgroup can be made here ({why})");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = cg.run(&tmp.path().join("a"), &["backup", "create", "a", "--demo", "--demo-objects", "200"]);
    common::assert_exit(&out, 0, "backup create in the cgroup");
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("memory budget: 300 MiB ({}); sled cache per log 37 MiB", cg.limit_file.display());
    assert!(err.contains(&want), "expected {want:?} in:\n{err}");
    // The flag overrides the cgroup's limit.
    let args = ["backup", "create", "b", "--demo", "--demo-objects", "200", "--memory-limit", "128Mi"];
    let out = cg.run(&tmp.path().join("b"), &args);
    common::assert_exit(&out, 0, "backup create with --memory-limit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("memory budget: 128 MiB (--memory-limit); sled cache per log 16 MiB"), "{err}");
}
