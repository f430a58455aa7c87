//! Hand-written clusters for the engine's own tests, run through the production shell in the
//! simulated world — the same driver, store, log and retries as `blockwise backup create`.
//!
//! A [`Fixture`] is a list of objects (each with its `kind`), scripted hook failures and store
//! failures. [`Fixture::world`] builds a [`SimWorld`] for it; [`Fixture::backup`] runs one to the
//! end. [`Observed`] reads a world back for assertions: the durable events, what is staged, and
//! the effects — each hook exec and each staged write, attributed to its block and attempt by the
//! plan and the times of the `BlockStarted` events (the engine's tests may read the engine's log;
//! the simulator's judges do not).

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::event::Event;
use blockwise_engine::hooks::HookPhase;
use blockwise_engine::item::{ItemKey, ResourceType};
use blockwise_engine::{BackupSpec, EngineConfig};
use serde_json::Value;

use crate::check::item_of_path;
use crate::cluster::{ClusterFaults, HookFault, Latencies};
use crate::fake::FakeCluster;
use crate::media::StoreFaults;
use crate::model::model_resources;
use crate::records::Record;
use crate::sim::{Life, SimWorld, RUN_STEPS_MAX};

/// Resource types fixtures can use: those of generated clusters, and Secrets.
pub fn fixture_resources() -> Vec<ResourceType> {
    let mut types = model_resources();
    types.push(ResourceType::new("", "v1", "secrets", "Secret", true));
    types
}

/// A hand-written cluster and its faults.
#[derive(Clone, Default)]
pub struct Fixture {
    /// Objects, each with its `kind`.
    pub objects: Vec<Value>,
    /// Hook execs that fail, by (pod name, command); on every attempt.
    pub hook_faults: BTreeMap<(String, Vec<String>), HookFault>,
    /// Names of items whose staging fails until a new process starts (a store outage).
    pub write_fails: BTreeSet<String>,
    /// Whether building the archive fails until a new process starts.
    pub finalize_fails: bool,
    /// Lists come in an order drawn from this seed instead of (namespace, name) order.
    pub list_order_seed: Option<u64>,
    /// Gets of these objects are forbidden (403), always.
    pub get_forbidden: BTreeSet<ItemKey>,
    /// The API server goes away once this pod's exec of this command has answered, until the
    /// next process starts.
    pub api_outage_after: Option<(String, Vec<String>, crate::cluster::ApiOutage)>,
}

impl Fixture {
    /// A fixture from a JSON array of objects.
    pub fn from_json(text: &str) -> Result<Fixture, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("fixture is not JSON: {e}"))?;
        let objects = v.as_array().ok_or("fixture is not a JSON array")?.clone();
        Ok(Fixture { objects, ..Fixture::default() })
    }

    /// The pod named `name`, as a key.
    fn pod_key(&self, name: &str) -> Option<ItemKey> {
        self.objects
            .iter()
            .find(|o| o["kind"] == "Pod" && o["metadata"]["name"] == name)
            .map(|o| ItemKey::namespaced("", "pods", o["metadata"]["namespace"].as_str().unwrap_or_default(), name))
    }

    /// The fake cluster serving the objects (an object of an unknown kind is left out).
    pub fn cluster(&self) -> FakeCluster {
        let types = fixture_resources();
        let mut c = FakeCluster::new();
        for rt in &types {
            c.add_resource(rt.clone());
        }
        for o in &self.objects {
            if let Some(rt) = types.iter().find(|t| o["kind"] == t.kind.as_str()) {
                c.add_object(rt, o.clone());
            }
        }
        match self.list_order_seed {
            Some(seed) => c.with_list_order_seed(seed),
            None => c,
        }
    }

    /// The simulated world of a backup of this fixture with `spec`.
    pub fn world(&self, spec: &BackupSpec, workers: usize, seed: u64) -> SimWorld {
        let hooks = self
            .hook_faults
            .iter()
            .filter_map(|((pod, command), f)| Some(((self.pod_key(pod)?, command.clone()), *f)))
            .collect();
        let api_outage_after = self
            .api_outage_after
            .as_ref()
            .and_then(|(pod, command, outage)| Some((self.pod_key(pod)?, command.clone(), *outage)));
        let faults = ClusterFaults {
            hooks,
            get_forbidden: self.get_forbidden.clone(),
            api_outage_after,
            ..ClusterFaults::default()
        };
        let mut failing_paths: Vec<String> = self.write_fails.iter().map(|n| format!("/{n}.json")).collect();
        if self.finalize_fails {
            failing_paths.push(".tar.gz".into());
        }
        let store = StoreFaults { failing_paths, ..StoreFaults::default() };
        let ecfg = EngineConfig { workers, ..EngineConfig::default() };
        let options = blockwise_engine::snapshot::BackupOptions {
            uid: crate::model::SIM_UID.into(),
            ..blockwise_engine::snapshot::BackupOptions::default()
        };
        SimWorld::new(self.cluster(), spec, &options, faults, store, seed, &ecfg, Latencies::SEEDED)
    }

    /// A whole backup in one process, without crashes.
    pub fn backup(&self, spec: &BackupSpec, workers: usize, seed: u64) -> Observed {
        let mut w = self.world(spec, workers, seed);
        let (life, _) = w.live(RUN_STEPS_MAX, |_| false);
        Observed::of(&w, &life)
    }
}

/// An effect on the world, attributed to its block and attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A hook exec started.
    Hook {
        /// Block.
        block: u32,
        /// Attempt.
        attempt: u32,
        /// Pod name.
        pod: String,
        /// Pre or post.
        phase: HookPhase,
        /// The command's first word.
        command: String,
    },
    /// An item was staged.
    Write {
        /// Block.
        block: u32,
        /// Attempt.
        attempt: u32,
        /// The item.
        key: ItemKey,
    },
}

/// What a world holds after one or more process lives.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The durable events.
    pub events: Vec<Event>,
    /// Hook execs and staged writes, in order.
    pub effects: Vec<Effect>,
    /// Staged items (durable), by key.
    pub staged: BTreeMap<ItemKey, Vec<u8>>,
    /// Whether the last life ended with the backup finished.
    pub finished: bool,
    /// How the last life ended.
    pub life: String,
}

impl Observed {
    /// Reads `w` back after a life that ended as `life`.
    pub fn of(w: &SimWorld, life: &Life) -> Observed {
        let events = w.durable_events();
        let effects = effects(&w.records.snapshot(), &events);
        Observed {
            events,
            effects,
            staged: w.staged(),
            finished: matches!(life, Life::Finished(_)),
            life: format!("{life:?}"),
        }
    }
}

/// Attributes hook execs and staged writes to blocks (by the plan) and attempts (by the latest
/// `BlockStarted` of the block at or before the effect's time).
pub fn effects(records: &[Record], events: &[Event]) -> Vec<Effect> {
    let mut block_of: BTreeMap<ItemKey, u32> = BTreeMap::new();
    let mut phase_of: BTreeMap<(ItemKey, Vec<String>), HookPhase> = BTreeMap::new();
    let mut starts: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
    for e in events {
        match e {
            Event::BlockPlanned { blocks } => {
                for b in blocks {
                    for k in &b.items {
                        block_of.insert(k.clone(), b.id);
                    }
                    for h in &b.hooks {
                        phase_of.insert((h.pod.clone(), h.command.clone()), h.phase);
                    }
                }
            }
            Event::BlockStarted { block, attempt, at_ms } => starts.entry(*block).or_default().push((*at_ms, *attempt)),
            _ => {}
        }
    }
    let attempt = |block: u32, at: u64| {
        starts.get(&block).and_then(|s| s.iter().filter(|(t, _)| *t <= at).map(|(_, a)| *a).max()).unwrap_or(0)
    };
    let mut out = Vec::new();
    for r in records {
        match r {
            Record::ExecStart { at_ms, pod, command, .. } => {
                let Some(&block) = block_of.get(pod) else { continue };
                let phase = phase_of.get(&(pod.clone(), command.clone())).copied().unwrap_or(HookPhase::Pre);
                out.push(Effect::Hook {
                    block,
                    attempt: attempt(block, *at_ms),
                    pod: pod.name().to_string(),
                    phase,
                    command: command.first().cloned().unwrap_or_default(),
                });
            }
            Record::Staged { at_ms, path, .. } => {
                let Some(key) = item_of_path(path) else { continue };
                let Some(&block) = block_of.get(&key) else { continue };
                out.push(Effect::Write { block, attempt: attempt(block, *at_ms), key });
            }
            _ => {}
        }
    }
    out
}
