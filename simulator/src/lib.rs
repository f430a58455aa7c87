//! blockwise-simulator: fake clusters, the demo workload and the deterministic simulation runtime.
//!
//! [`FakeCluster`] implements the engine's [`Cluster`](blockwise_engine::ports::Cluster) port in
//! memory — discovery, paginated lists, gets and scripted pod execs, with every exec recorded —
//! so the whole backup pipeline runs without Kubernetes. [`demo_cluster`] fills one with a
//! realistic, seeded workload (the CLI's built-in demo), and [`Rng`] is the seeded PRNG everything
//! random here derives from. [`sim::simulate`] runs the production engine in a seeded, single
//! threaded world with injected faults; [`check`] holds the invariants and [`runner`] turns seeds
//! into verdicts. With the `server` feature, [`server`] serves any fake cluster over the real
//! Kubernetes HTTP API (for kube-rs and kubectl). Key decision: this crate has no async runtime (no tokio) and reads no wall
//! clock (only the optional `server` module uses tokio). Waiting is done through an injected [`Sleeper`] — tokio's sleep in the adapters, virtual
//! time under simulation, none at all by default — so the same fake cluster serves the production
//! runtime, the single-threaded deterministic runtime and plain unit tests.

pub mod check;
pub mod demo;
pub mod fake;
pub mod model;
pub mod rng;
pub mod runner;
#[cfg(feature = "server")]
pub mod server;
pub mod sim;

pub use demo::{demo_cluster, demo_failing_hook_pod, demo_resource_types, DEMO_OBJECTS_DEFAULT, DEMO_SEED};
pub use fake::{read_exec_log, AsGroupResource, ExecRecord, ExecScript, FakeCluster, Latency, Sleeper, HANG_MS};
pub use rng::Rng;
