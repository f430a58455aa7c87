//! The engine's tests run through the production shell — the one driver, the store, the log, the
//! retries — in the simulator's world (`blockwise_simulator::fixture`), not a driver of their own.
//! This module only gives that fixture API the names these tests use.

#![allow(dead_code, unused_imports)]

use blockwise_engine::BackupSpec;
pub use blockwise_simulator::cluster::HookFault;
pub use blockwise_simulator::fixture::{Effect, Fixture as Cluster, Observed as Run};
use serde_json::Value;

/// A fixture cluster from its objects (each with a `kind`).
pub fn cluster(objects: Vec<Value>) -> Cluster {
    Cluster::from_json(&Value::Array(objects).to_string()).expect("fixture is a JSON array")
}

/// Runs a backup of `c` with `spec` to the end, in one process.
pub fn backup(c: &Cluster, spec: BackupSpec, workers: usize, seed: u64) -> Run {
    c.backup(&spec, workers, seed)
}

/// The command of a fixture hook (`["freeze-a"]`).
pub fn cmd(word: &str) -> Vec<String> {
    vec![word.to_string()]
}
