//! The process's memory budget (issue 23): the limit of the memory cgroup it runs in — cgroup v2
//! `memory.max`, or v1 `memory.limit_in_bytes`, the lowest along the path from its cgroup to the
//! root, as the kernel enforces it — or `--memory-limit`, which overrides it. What is sized under
//! the budget reads it from here ([`budget`]); the process logs it once at start
//! ([`Budget::describe`]).
//!
//! Reading is a pure function of `/proc/self/cgroup`'s text and a cgroup file system root
//! ([`limit_from`]), so tests give it fake trees.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Limits at or above this are "no limit" (v1 writes `PAGE_COUNTER_MAX` pages, 2^63 − 4096 here).
const UNLIMITED_FROM: u64 = 1 << 62;
/// sled's page cache per open log: at most this…
pub const SLED_CACHE_MAX: u64 = 64 << 20;
/// …at least this…
pub const SLED_CACHE_MIN: u64 = 8 << 20;
/// …and this fraction of the budget (1/8).
const SLED_CACHE_SHARE: u64 = 8;

/// The most one Restore is planned to need: a restore's memory is its plan (about 100 bytes an
/// item) and its log's fold, measured at about 200 MiB for 300k objects (docs/benchmarks.md).
pub const RESTORE_BYTES: u64 = 256 << 20;
/// Restores run at once by default: at most this many…
pub const RESTORES_MAX: u64 = 8;
/// …and with no limit known, this many.
const RESTORES_UNLIMITED: u64 = 4;

/// Where the budget came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--memory-limit`.
    Flag,
    /// The memory cgroup's limit, from this file.
    Cgroup(PathBuf),
    /// No limit found.
    None,
}

/// The memory the process may use, and where that was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Bytes; `None`: unlimited.
    pub limit: Option<u64>,
    /// Where it was found.
    pub source: Source,
}

impl Budget {
    /// sled's page cache for one log under this budget: an eighth of it, between 8 and 64 MiB.
    pub fn sled_cache_bytes(&self) -> u64 {
        self.limit.map_or(SLED_CACHE_MAX, |l| (l / SLED_CACHE_SHARE).clamp(SLED_CACHE_MIN, SLED_CACHE_MAX))
    }

    /// Restores `serve` runs at once unless told (`--concurrent-restores`): half the budget, in
    /// [`RESTORE_BYTES`] each, between 1 and [`RESTORES_MAX`] (the other half is the backups').
    pub fn restores_at_once(&self) -> usize {
        self.limit.map_or(RESTORES_UNLIMITED, |l| (l / 2 / RESTORE_BYTES).clamp(1, RESTORES_MAX)) as usize
    }

    /// One line for the start of a run: the budget, its source and what is sized under it.
    pub fn describe(&self) -> String {
        let limit = match self.limit {
            Some(l) => format!("{} MiB", l >> 20),
            None => "unlimited".to_string(),
        };
        let source = match &self.source {
            Source::Flag => "--memory-limit".to_string(),
            Source::Cgroup(p) => p.display().to_string(),
            Source::None => "no memory cgroup limit found".to_string(),
        };
        format!("memory budget: {limit} ({source}); sled cache per log {} MiB", self.sled_cache_bytes() >> 20)
    }
}

static BUDGET: OnceLock<Budget> = OnceLock::new();

/// Sets the budget for this process: `flag` (`--memory-limit`) when given, else the cgroup's.
/// The first call wins; later ones return the budget already set.
pub fn init(flag: Option<u64>) -> &'static Budget {
    BUDGET.get_or_init(|| match flag {
        Some(l) => Budget { limit: Some(l), source: Source::Flag },
        None => {
            let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            match limit_from(&cgroup, Path::new("/sys/fs/cgroup")) {
                Some((l, path)) => Budget { limit: Some(l), source: Source::Cgroup(path) },
                None => Budget { limit: None, source: Source::None },
            }
        }
    })
}

/// Limits glibc's malloc to 2 arenas, unless `MALLOC_ARENA_MAX` sets the number. glibc makes up
/// to 8 a core, one for each thread that finds the others busy, and each keeps what its threads
/// freed: the tokio workers' arenas were ~35 MB of a 100k-object backup's peak (211 → 176 MiB with
/// 2, the same seconds).
///
/// And fixes the size from which an allocation gets pages of its own (`mmap`) at 256 KiB, unless
/// `MALLOC_MMAP_THRESHOLD_` sets it: glibc otherwise raises that threshold to the largest block
/// freed so far (up to 32 MiB), so after planning frees its catalog every later large buffer (a
/// list page, a response body) is carved from the arenas and, once freed, fragments them —
/// resident memory no live object used (300k objects over HTTP: 477 → 427 MiB peak).
///
/// Call it first, before the process starts threads.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt(3) sets a tuning parameter of glibc's allocator; no memory is touched.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        }
    }
}

/// Allocations of at least this many bytes get pages of their own ([`tune_malloc`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 256 << 10;

/// The process's budget ([`init`] with no flag, if nothing set it).
pub fn budget() -> &'static Budget {
    init(None)
}

/// The memory limit that applies to the process whose `/proc/self/cgroup` is `proc_cgroup`, under
/// the cgroup file system mounted at `root`: the lowest limit from its cgroup up to the root, in
/// the v2 hierarchy (`0::/path`, `memory.max`) or the v1 memory controller (`N:memory:/path`,
/// `memory/…/memory.limit_in_bytes`), with the file that set it. `None` when no limit is set.
pub fn limit_from(proc_cgroup: &str, root: &Path) -> Option<(u64, PathBuf)> {
    let mut found: Option<(u64, PathBuf)> = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let (base, file) = if controllers.is_empty() {
            // v2: unified at the root, or beside v1 under `unified` (hybrid).
            let base = if root.join("cgroup.controllers").exists() { root.to_path_buf() } else { root.join("unified") };
            (base, "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            let at = dir.join(file);
            if let Some(l) = std::fs::read_to_string(&at).ok().and_then(|t| parse_limit(&t)) {
                if found.as_ref().is_none_or(|(f, _)| l < *f) {
                    found = Some((l, at));
                }
            }
            if dir == base || !dir.pop() || !dir.starts_with(&base) {
                break;
            }
        }
    }
    found
}

/// A limit file's value: bytes, or `None` for `max` / no limit.
fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&l| l < UNLIMITED_FROM)
}

/// A `--memory-limit`: bytes, or a number with a unit — Kubernetes' `Ki`, `Mi`, `Gi`, `Ti`, `Pi`,
/// `Ei` (powers of 1024) or `k`, `M`, `G`, `T` (powers of 1000; `K` too) — the engine's quantity
/// units ([`blockwise_engine::snapshot::quantity_unit`]).
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    use blockwise_engine::snapshot::{quantity_unit, split_quantity};
    const UNITS: &str = "Ki, Mi, Gi, Ti, Pi, Ei, K, M, G or T";
    let (digits, unit) = split_quantity(s);
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected bytes or a number with {UNITS}"))?;
    let factor = match unit {
        "K" => 1_000,
        unit => quantity_unit(unit).ok_or_else(|| format!("{s:?}: unknown unit {unit:?} ({UNITS})"))?,
    };
    let bytes = n.checked_mul(factor).ok_or_else(|| format!("{s:?}: too large"))?;
    if bytes < 16 << 20 {
        return Err(format!("{s:?}: below 16Mi, no backup fits"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn v2_the_lowest_limit_from_the_cgroup_up_to_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "cgroup.controllers", "memory\n");
        write(root, "kubepods/memory.max", "1073741824\n");
        write(root, "kubepods/pod1/memory.max", "max\n");
        write(root, "kubepods/pod1/c1/memory.max", "268435456\n");
        let (l, at) = limit_from("0::/kubepods/pod1/c1\n", root).unwrap();
        assert_eq!((l, at), (256 << 20, root.join("kubepods/pod1/c1/memory.max")));
        // A parent's lower limit applies.
        write(root, "kubepods/pod1/memory.max", "134217728\n");
        assert_eq!(limit_from("0::/kubepods/pod1/c1\n", root).unwrap().0, 128 << 20);
        // Nothing set anywhere: no limit.
        assert_eq!(limit_from("0::/elsewhere\n", root), None);
    }

    #[test]
    fn v1_the_memory_controller_and_its_unlimited_value() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "memory/memory.limit_in_bytes", "9223372036854771712\n");
        write(root, "memory/process_api/x/memory.limit_in_bytes", "536870912\n");
        let text = "9:name=systemd:/\n4:memory:/process_api/x\n1:cpu,cpuacct:/\n0::/\n";
        let (l, at) = limit_from(text, root).unwrap();
        assert_eq!((l, at), (512 << 20, root.join("memory/process_api/x/memory.limit_in_bytes")));
        assert_eq!(limit_from("4:memory:/\n", root), None);
    }

    #[test]
    fn quantities_and_the_budget_derived_from_them() {
        assert_eq!(parse_quantity("256Mi"), Ok(256 << 20));
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("268435456"), Ok(256 << 20));
        assert_eq!(parse_quantity("20000K"), Ok(20_000_000));
        for bad in ["", "Mi", "12Xi", "1Ki", "-5Mi", "99999999999999999999Ti"] {
            assert!(parse_quantity(bad).is_err(), "{bad:?}");
        }
        let b = |l: Option<u64>| Budget { limit: l, source: Source::Flag };
        assert_eq!(b(Some(256 << 20)).sled_cache_bytes(), 32 << 20);
        assert_eq!(b(Some(64 << 20)).sled_cache_bytes(), SLED_CACHE_MIN);
        assert_eq!(b(Some(4 << 30)).sled_cache_bytes(), SLED_CACHE_MAX);
        assert_eq!(b(None).sled_cache_bytes(), SLED_CACHE_MAX);
        // Restores at once: half the budget, 256 MiB each, 1 to 8.
        let at_once = |l: Option<u64>| b(l).restores_at_once();
        assert_eq!([at_once(Some(256 << 20)), at_once(Some(512 << 20)), at_once(Some(2 << 30))], [1, 1, 4]);
        assert_eq!([at_once(Some(64 << 30)), at_once(None)], [8, 4]);
        assert!(b(Some(256 << 20))
            .describe()
            .starts_with("memory budget: 256 MiB (--memory-limit); sled cache per log 32 MiB"));
    }
}
