//! blockwise-engine: the functional core of the blockwise backup engine.
//!
//! Data in, decisions out. The engine groups a cluster's objects into ItemBlocks
//! ([`grouping`]), resolves the hooks around each block ([`hooks`]), records every step as an
//! [`event::Event`] whose fold is the backup's [`state::BackupState`], and decides the next
//! commands with [`engine::Engine`]. It never touches the network, the disk or a clock: runtimes
//! (tokio in `blockwise-adapters`, the seeded single-threaded one in `blockwise-simulator`) execute
//! its commands and report back, so the same decisions run in production and under simulation.

pub mod body;
pub mod catalog;
pub mod engine;
pub mod entries;
pub mod event;
pub mod grouping;
pub mod hooks;
pub mod item;
pub mod mutation;
pub mod ports;
pub mod restore;
pub mod restore_run;
pub mod schedule;
pub mod service;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod summary;

pub use engine::{CmdId, Command, CommandKind, Completion, Engine, EngineConfig, FinalizeError, Output};
pub use event::{BlockOutcome, Event, HookOutcome, HookRef, ListUnit, Phase, Seq, Severity};
pub use item::{GroupResource, Item, ItemKey, ResourceType, StrMap};
pub use mutation::Mutation;
pub use spec::BackupSpec;
pub use state::BackupState;
