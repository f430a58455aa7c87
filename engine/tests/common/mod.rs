//! A minimal synchronous driver for engine tests: objects in memory, hooks scripted, every
//! appended event durable at once, commands completed in a seeded order. It records the order of
//! effects (hook execs and item writes) so tests can check H1–H3 directly.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::event::{Event, HookOutcome};
use blockwise_engine::hooks::HookPhase;
use blockwise_engine::ports::ListPage;
use blockwise_engine::state::ArchiveInfo;
use blockwise_engine::{BackupSpec, CommandKind, Completion, Engine, EngineConfig, ItemKey, ResourceType};
use serde_json::Value;

/// Resource types used by fixtures.
pub fn resources() -> Vec<ResourceType> {
    vec![
        ResourceType::new("", "v1", "pods", "Pod", true),
        ResourceType::new("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true),
        ResourceType::new("", "v1", "persistentvolumes", "PersistentVolume", false),
        ResourceType::new("", "v1", "serviceaccounts", "ServiceAccount", true),
        ResourceType::new("", "v1", "configmaps", "ConfigMap", true),
        ResourceType::new("", "v1", "namespaces", "Namespace", false),
        ResourceType::new("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false),
        ResourceType::new("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
        ResourceType::new("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", false),
    ]
}

/// A fixture cluster: objects by kind.
#[derive(Clone, Default)]
pub struct Cluster {
    pub objects: Vec<(String, Value)>,
    /// Scripted hook outcomes by (pod name, command[0]); default success.
    pub hook_outcomes: BTreeMap<(String, String), HookOutcome>,
    /// Names of items whose staging write fails (a store outage).
    pub write_fails: BTreeSet<String>,
    /// Whether building the archive fails.
    pub finalize_fails: bool,
}

impl Cluster {
    /// Parses a fixture: a JSON array of objects, each with a `kind`.
    pub fn from_json(text: &str) -> Cluster {
        let v: Value = serde_json::from_str(text).expect("fixture is JSON");
        let objects = v
            .as_array()
            .expect("fixture is an array")
            .iter()
            .map(|o| (o["kind"].as_str().expect("kind").to_string(), o.clone()))
            .collect();
        Cluster { objects, ..Cluster::default() }
    }

    fn of(&self, rt: &ResourceType, ns: Option<&str>) -> Vec<String> {
        self.objects
            .iter()
            .filter(|(k, o)| k == &rt.kind && ns.is_none_or(|ns| o["metadata"]["namespace"] == ns))
            .map(|(_, o)| o.to_string())
            .collect()
    }
}

/// An effect the driver executed, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Hook { block: u32, attempt: u32, pod: String, phase: HookPhase, command: String },
    Write { block: u32, attempt: u32, key: ItemKey },
}

/// The result of a drive.
pub struct Run {
    pub events: Vec<Event>,
    pub effects: Vec<Effect>,
    pub staged: BTreeMap<ItemKey, Vec<u8>>,
    pub finished: bool,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Drives an engine until it finishes or `crash_after_events` events exist (then stops, as a crash).
pub fn drive(
    mut engine: Engine,
    cluster: &Cluster,
    mut events: Vec<Event>,
    seed: u64,
    crash_after_events: Option<usize>,
    effects: &mut Vec<Effect>,
    staged: &mut BTreeMap<ItemKey, Vec<u8>>,
) -> Run {
    let mut rng = seed | 1;
    let mut pending = Vec::new();
    loop {
        let out = engine.poll();
        for (seq, e) in out.events {
            assert_eq!(seq as usize, events.len(), "engine sequence numbers are contiguous");
            events.push(e);
            if crash_after_events.is_some_and(|n| events.len() >= n) {
                return Run { events, effects: effects.clone(), staged: staged.clone(), finished: false };
            }
        }
        pending.extend(out.commands);
        if engine.is_finished() || pending.is_empty() {
            assert!(engine.fatal().is_none(), "engine stopped: {:?}", engine.fatal());
            return Run { events, effects: effects.clone(), staged: staged.clone(), finished: engine.is_finished() };
        }
        let i = (xorshift(&mut rng) % pending.len() as u64) as usize;
        let cmd = pending.swap_remove(i);
        if let Some(after) = cmd.after_seq {
            assert!((after as usize) < events.len(), "command waits for an event that was never emitted");
        }
        let completion = match cmd.kind {
            CommandKind::Discover => Completion::Discovered(Ok(resources())),
            CommandKind::List { resource, unit, .. } => {
                let objects = cluster.of(&resource, unit.namespace.as_deref());
                Completion::Listed(Ok(ListPage { objects, continue_token: None }))
            }
            CommandKind::Get { items } => Completion::Fetched(Ok(items.into_iter().map(|(_, k)| (k, None)).collect())),
            CommandKind::RunHook { block, attempt, hook } => {
                let command = hook.command.first().cloned().unwrap_or_default();
                effects.push(Effect::Hook {
                    block,
                    attempt,
                    pod: hook.pod.name.clone(),
                    phase: hook.phase,
                    command: command.clone(),
                });
                let outcome = cluster
                    .hook_outcomes
                    .get(&(hook.pod.name.clone(), command))
                    .cloned()
                    .unwrap_or(HookOutcome::Succeeded);
                Completion::HookRan(outcome)
            }
            CommandKind::WriteItem { key, .. } if cluster.write_fails.contains(&key.name) => {
                Completion::Written(Err(format!("store: cannot put {}: connection refused", key.archive_path())))
            }
            CommandKind::WriteItem { block, attempt, key, json } => {
                effects.push(Effect::Write { block, attempt, key: key.clone() });
                staged.insert(key, json.as_bytes().to_vec());
                Completion::Written(Ok(()))
            }
            CommandKind::Finalize { .. } if cluster.finalize_fails => {
                Completion::Finalized(Err("store: cannot put backups/t/t.tar.gz: 503 Slow Down".into()))
            }
            CommandKind::Finalize { entries } => {
                Completion::Finalized(Ok(ArchiveInfo { digest: [0; 32], bytes: 0, items: entries.len() as u64 }))
            }
        };
        engine.complete(cmd.id, completion);
    }
}

/// Runs a backup of `cluster` with `spec` to the end.
pub fn backup(cluster: &Cluster, spec: BackupSpec, workers: usize, seed: u64) -> Run {
    let cfg = EngineConfig { workers, ..EngineConfig::default() };
    let engine = Engine::new(spec, cfg, 0).expect("valid spec");
    let (mut effects, mut staged) = (Vec::new(), BTreeMap::new());
    drive(engine, cluster, Vec::new(), seed, None, &mut effects, &mut staged)
}
