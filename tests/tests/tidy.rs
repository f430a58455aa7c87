//! The tidy test (STYLE §11): mechanised house rules over the workspace's sources.
//! Every `.rs` file opens with a `//!` paragraph; no debug-print macro; no to-do marker without an
//! issue number (`(#12)` after it); no unwrap/expect in library code outside `#[cfg(test)]` modules.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if !matches!(name, "target" | ".git" | "corpus" | "artifacts") {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

fn sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for d in ["engine", "adapters", "simulator", "tests", "fuzz"] {
        rust_files(&root().join(d), &mut files);
    }
    files.sort();
    files
}

/// Library code: `src/` of a crate, minus binaries' `main.rs`.
fn is_library(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.contains("/src/") && !s.ends_with("/main.rs") && !s.contains("/fuzz/")
}

#[test]
fn every_file_opens_with_a_module_doc() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!")
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a leading //! paragraph:\n{}", missing.join("\n"));
}

#[test]
fn no_dbg_and_no_anonymous_todos() {
    let mut bad = Vec::new();
    let dbg = ["dbg", "!("].concat();
    for p in sources() {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            let markers = [["TO", "DO"].concat(), ["FIX", "ME"].concat()];
            let todo = markers.iter().any(|t| line.contains(t.as_str()) && !line.contains(&format!("{t}(#")));
            if line.contains(&dbg) || todo {
                bad.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn no_unwrap_in_library_code() {
    let mut bad = Vec::new();
    let (unwrap, expect) = ([".unw", "rap()"].concat(), [".exp", "ect("].concat());
    for p in sources().into_iter().filter(|p| is_library(p)) {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        // Everything from the first `#[cfg(test)]` on is test code.
        let lib = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in lib.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(&unwrap) || code.contains(&expect) {
                bad.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(bad.is_empty(), "unwrap/expect in library code (return an error instead):\n{}", bad.join("\n"));
}
