//! blockwise-adapters: the imperative shell around the engine.
//!
//! Everything that touches the world lives here: the one driver between the engine and the world
//! ([`driver`]), what it needs from a runtime ([`world`]: time, jitter, where work runs), Kubernetes
//! through kube-rs ([`kube`]) with bounded retries ([`retry`]), the CSI snapshot procedures
//! ([`csi`]), the event log over a medium (sled in
//! production: [`log`]), the stores and the Velero-layout archive ([`store`], [`s3`], fault
//! injection in [`faults`], verification in [`inspect`]), the data directory and crash-atomic
//! backup sessions ([`session`]), what users read ([`report`]), and the in-cluster controller
//! ([`serve`]). The engine's decisions are
//! never re-implemented here: this crate executes commands, appends and flushes events, and reports
//! results back. The simulator runs this same code with a fake world plugged in; the `blockwise`
//! binary (`adapters/cli`) parses arguments and prints.

pub mod csi;
pub mod driver;
pub mod entry_runs;
pub mod faults;
pub mod hookspec;
pub mod inspect;
pub mod kube;
pub mod log;
pub mod memory;
pub mod pack;
pub mod report;
pub mod restore;
pub mod retry;
pub mod s3;
pub mod serve;
pub mod session;
pub mod sorted;
pub mod store;
pub mod world;
