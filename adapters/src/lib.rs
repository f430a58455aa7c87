//! blockwise-adapters: the imperative shell around the engine.
//!
//! Everything that touches the world lives here: Kubernetes through kube-rs ([`kube`]), the sled event log ([`log`]), the stores and the
//! Velero-layout archive ([`store`], [`s3`], fault injection in [`faults`], verification in
//! [`inspect`]), the tokio runtime that executes the engine's commands on N
//! workers ([`runtime`]), what users read ([`report`]) and the `blockwise` command line ([`cli`]).
//! The engine's decisions are never re-implemented here: this crate only executes commands,
//! appends and flushes events, and reports results back.

pub mod bench;
pub mod cli;
pub mod faults;
pub mod hookspec;
pub mod inspect;
pub mod kube;
pub mod log;
pub mod report;
pub mod runtime;
pub mod s3;
pub mod simulate;
pub mod store;
