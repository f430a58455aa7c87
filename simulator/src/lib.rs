//! blockwise-simulator: fake clusters, the demo workload and the deterministic simulation.
//!
//! [`FakeCluster`] implements the engine's [`Cluster`](blockwise_engine::ports::Cluster) port in
//! memory — discovery, paginated lists, gets and scripted pod execs, with every exec recorded, and
//! writes with a fake CSI snapshot controller behind them ([`csi`]) —
//! so the whole backup pipeline runs without Kubernetes. [`demo_cluster`] fills one with a
//! realistic, seeded workload (the CLI's built-in demo), and [`Rng`] is the seeded PRNG everything
//! random here derives from.
//!
//! The simulation runs the **production shell** — the driver, the retries, the store, the archive
//! writer, the event log — from `blockwise-adapters`, and swaps only the world: [`vt`] is the
//! virtual-time runtime and its single-threaded executor, [`cluster`] the faulty cluster, [`media`]
//! the log and store media that lose what a crash loses, [`records`] what the fake world saw.
//! [`sim`] assembles a run, [`check`] judges it from the [`model`] and the records, and [`runner`]
//! turns seeds into verdicts. With the `server` feature, [`server`] serves any fake cluster over
//! the real Kubernetes HTTP API (for kube-rs and kubectl). Key decision: nothing here reads the
//! wall clock or starts a thread, except the optional `server` module, which runs on tokio.

pub mod check;
pub mod cluster;
pub mod crd;
pub mod csi;
pub mod demo;
pub mod fake;
pub mod fields;
pub mod fixture;
pub mod media;
pub mod model;
pub mod records;
pub mod rng;
pub mod roundtrip;
pub mod runner;
#[cfg(feature = "server")]
pub mod server;
pub mod service;
pub mod sim;
pub mod vt;
pub mod year;

pub use demo::{
    demo_cluster, demo_cluster_with, demo_failing_hook_pod, demo_resource_types, DEMO_OBJECTS_DEFAULT, DEMO_SEED,
};
pub use fake::{read_exec_log, AsGroupResource, ExecRecord, ExecScript, FakeCluster, Latency, HANG_MS};
pub use rng::Rng;
