//! Fuzz target: grouping of arbitrary clusters. Bytes drive a tiny generator of pods, claims and
//! volumes with random references; planning must not panic, and every item must land in exactly
//! one block (G1).
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run group_cluster -- -max_total_time=60`

#![no_main]

use std::collections::BTreeSet;

use blockwise_engine::grouping::{builtin_actions, plan, Index, PlanInput, PlanStep};
use blockwise_engine::item::{Item, ResourceType};
use blockwise_engine::spec::{BackupSpec, Selection};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let pods = ResourceType::new("", "v1", "pods", "Pod", true);
    let pvcs = ResourceType::new("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true);
    let pvs = ResourceType::new("", "v1", "persistentvolumes", "PersistentVolume", false);
    let resources = vec![pods.clone(), pvcs.clone(), pvs.clone()];
    let mut items = Vec::new();
    for (i, c) in data.chunks(4).enumerate() {
        let b = |k: usize| c.get(k).copied().unwrap_or(0);
        let ns = format!("n{}", b(1) % 2);
        let obj = match b(0) % 3 {
            0 => json!({"metadata": {"namespace": ns, "name": format!("p{i}")}, "status": {"phase": if b(2) % 2 == 0 { "Running" } else { "Pending" }},
                        "spec": {"volumes": [{"persistentVolumeClaim": {"claimName": format!("c{}", b(3) % 8)}}]}}),
            1 => json!({"metadata": {"namespace": ns, "name": format!("c{}", b(2) % 8), "labels": {"velero.io/volume-group": format!("g{}", b(3) % 2)}},
                        "spec": {"volumeName": format!("v{}", b(3) % 4)}, "status": {"phase": "Bound"}}),
            _ => json!({"metadata": {"name": format!("v{}", b(2) % 4)}}),
        };
        let rt = [&pods, &pvcs, &pvs][(b(0) % 3) as usize];
        if let Ok(it) = Item::from_value(rt, i, obj) {
            items.push(it);
        }
    }
    let selection = Selection::compile(&BackupSpec::new("fuzz")).expect("default spec compiles");
    let actions = builtin_actions("velero.io/volume-group");
    let index = Index::new(items, "velero.io/volume-group");
    let not_found = BTreeSet::new();
    let input = PlanInput {
        selection: &selection,
        resources: &resources,
        not_found: &not_found,
        fetch_failed: &not_found,
        actions: &actions,
    };
    let step = plan(&input, &index);
    if let PlanStep::Done(p) = step {
        let mut blocks = p.into_blocks(index.into_catalog());
        let mut seen = BTreeSet::new();
        while let Some(b) = blocks.next_block() {
            for k in b.items.iter() {
                assert!(seen.insert(k.clone()), "{k} in two blocks");
            }
        }
    }
});
