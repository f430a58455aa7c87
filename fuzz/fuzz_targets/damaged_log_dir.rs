//! Fuzz target: damage to a sled event log's directory (issue 22). A log of a few hundred records
//! is written once (some large enough to live in `records.blob`); each input is a list of damages
//! — `(file, flip or truncate, offset, byte)` — applied to a fresh copy of it, which is then opened
//! as `resume` and `describe` open it. Neither may panic (sled's panics are caught at the log's
//! boundary and named), and an open that succeeds must read back every record the log committed,
//! unchanged: damage is named, never passed off as a shorter or different log.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run damaged_log_dir -- -max_total_time=60`

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blockwise_adapters::log::{read_events, EventLog, LogError};
use blockwise_engine::event::Severity;
use blockwise_engine::Event;
use libfuzzer_sys::fuzz_target;

/// Records in the log.
const RECORDS: u64 = 300;

struct Pristine {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    files: Vec<PathBuf>,
    events: Vec<Event>,
}

fn event(i: u64) -> Event {
    if i % 40 == 7 {
        // A big record: its bytes go to records.blob, sled keeps a pointer.
        Event::Diagnostic { severity: Severity::Warning, message: "w".repeat(20_000 + i as usize) }
    } else {
        Event::PlanFinished { blocks: i as u32, items: i * 3 }
    }
}

fn pristine() -> &'static Pristine {
    static P: OnceLock<Pristine> = OnceLock::new();
    P.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("log");
        let events: Vec<Event> = (0..RECORDS).map(event).collect();
        {
            let mut log = EventLog::create(&dir, "fuzz").expect("create");
            for (i, e) in events.iter().enumerate() {
                log.append(i as u64, e).expect("append");
                if i % 25 == 24 {
                    log.flush().expect("flush");
                }
            }
            log.flush().expect("flush");
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("read_dir")
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().into())
            .collect();
        files.sort();
        Pristine { _tmp: tmp, dir, files, events }
    })
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            copy(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

fn check(opened: Result<Vec<Event>, LogError>, events: &[Event]) {
    match opened {
        // Named damage, a log in use, or a storage error: an answer, not a wrong log.
        Err(_) => {}
        Ok(back) => assert!(back == events, "a damaged log read back as {} other events", back.len()),
    }
}

fuzz_target!(|data: &[u8]| {
    // sled's panics are caught at the log's boundary; libfuzzer's hook would abort on them first.
    std::panic::set_hook(Box::new(|_| {}));
    let p = pristine();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    copy(&p.dir, &dir);
    for op in data.chunks_exact(6).take(8) {
        let file = dir.join(&p.files[op[0] as usize % p.files.len()]);
        let Ok(bytes) = std::fs::read(&file) else { continue };
        if bytes.is_empty() {
            continue;
        }
        let at = u32::from_le_bytes([op[2], op[3], op[4], 0]) as usize % bytes.len();
        if op[1] % 4 == 0 {
            let _ = std::fs::OpenOptions::new().write(true).open(&file).and_then(|f| f.set_len(at as u64));
        } else {
            let mut bytes = bytes;
            bytes[at] ^= op[5] | 1;
            let _ = std::fs::write(&file, bytes);
        }
    }
    check(read_events(&dir), &p.events);
    check(EventLog::open(&dir).map(|(_, events, _)| events), &p.events);
});
