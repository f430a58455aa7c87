//! Grouping rules of DESIGN §3, one fixture cluster per rule, checked through the whole engine.

mod common;

use blockwise_engine::event::Event;
use blockwise_engine::spec::BackupSpec;
use common::{backup, cluster, Cluster};
use serde_json::{json, Value};

fn pod(ns: &str, name: &str, phase: &str, claims: &[&str]) -> Value {
    let volumes: Vec<Value> =
        claims.iter().map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}})).collect();
    json!({"kind": "Pod", "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
           "spec": {"containers": [{"name": "main"}], "volumes": volumes}, "status": {"phase": phase}})
}

fn pvc(ns: &str, name: &str, pv: Option<&str>, group: Option<&str>) -> Value {
    let mut labels = json!({});
    if let Some(g) = group {
        labels["velero.io/volume-group"] = json!(g);
    }
    match pv {
        Some(pv) => {
            json!({"kind": "PersistentVolumeClaim", "metadata": {"namespace": ns, "name": name, "labels": labels},
                           "spec": {"volumeName": pv}, "status": {"phase": "Bound"}})
        }
        None => json!({"kind": "PersistentVolumeClaim", "metadata": {"namespace": ns, "name": name, "labels": labels},
                       "spec": {}, "status": {"phase": "Pending"}}),
    }
}

fn pv(name: &str) -> Value {
    json!({"kind": "PersistentVolume", "metadata": {"name": name}})
}

/// Renders the planned blocks: one line per block, items as `resource ns/name` joined by `, `.
fn blocks(c: &Cluster, spec: BackupSpec, workers: usize, seed: u64) -> String {
    let run = backup(c, spec, workers, seed);
    assert!(run.finished);
    let mut lines = Vec::new();
    for e in &run.events {
        if let Event::BlockPlanned { blocks } = e {
            for b in blocks {
                let items: Vec<String> = b
                    .items
                    .iter()
                    .map(|k| match &k.namespace() {
                        Some(ns) => format!("{} {ns}/{}", k.resource(), k.name()),
                        None => format!("{} {}", k.resource(), k.name()),
                    })
                    .collect();
                lines.push(items.join(", "));
            }
        }
    }
    lines.join("\n")
}

#[track_caller]
fn check(objects: Vec<Value>, spec: BackupSpec, expected: &str) {
    let c = cluster(objects);
    let got = blocks(&c, spec, 4, 1);
    let expected: Vec<&str> = expected.trim().lines().map(str::trim).collect();
    assert_eq!(got, expected.join("\n"), "\n--- got ---\n{got}\n--- expected ---\n{}", expected.join("\n"));
}

fn spec() -> BackupSpec {
    BackupSpec::new("t")
}

#[test]
fn pod_pvc_pv_form_one_block() {
    check(
        vec![pod("a", "db", "Running", &["data"]), pvc("a", "data", Some("pv1"), None), pv("pv1"), pv("unrelated")],
        spec(),
        "
        persistentvolumeclaims a/data, persistentvolumes pv1, pods a/db
        persistentvolumes unrelated
        ",
    );
}

#[test]
fn rwx_claim_joins_every_running_pod_that_mounts_it() {
    check(
        vec![
            pod("a", "w1", "Running", &["shared"]),
            pod("a", "w2", "Running", &["shared"]),
            pod("a", "w3", "Succeeded", &[]),
            pvc("a", "shared", Some("pv1"), None),
            pv("pv1"),
        ],
        spec(),
        "
        persistentvolumeclaims a/shared, persistentvolumes pv1, pods a/w1, pods a/w2
        pods a/w3
        ",
    );
}

#[test]
fn non_running_pod_is_only_joined_through_its_own_mount() {
    // A Pending pod still mounts the claim (pod → PVC is together), but the PVC does not reach
    // out to it: with a selector that misses the pod, it stays out.
    let mut s = spec();
    s.label_selector = Some("app=web".into());
    check(
        vec![
            pod("a", "web", "Running", &["c"]),
            pod("a", "batch", "Pending", &["c"]),
            pvc("a", "c", Some("pv1"), None),
            pv("pv1"),
        ],
        s,
        "persistentvolumeclaims a/c, persistentvolumes pv1, pods a/web",
    );
}

#[test]
fn volume_group_pulls_and_joins_its_claims() {
    let mut s = spec();
    s.label_selector = Some("app=p1".into());
    check(
        vec![
            pod("a", "p1", "Running", &["g1"]),
            pvc("a", "g1", Some("pv1"), Some("grp")),
            pvc("a", "g2", Some("pv2"), Some("grp")),
            pvc("b", "g3", Some("pv3"), Some("grp")),
            pv("pv1"),
            pv("pv2"),
            pv("pv3"),
        ],
        s,
        "persistentvolumeclaims a/g1, persistentvolumeclaims a/g2, persistentvolumes pv1, persistentvolumes pv2, pods a/p1",
    );
}

#[test]
fn unbound_claim_adds_no_relations_of_its_own() {
    check(
        vec![
            pod("a", "p", "Running", &["u"]),
            pod("a", "q", "Running", &[]),
            pvc("a", "u", None, Some("grp")),
            pvc("a", "v", None, Some("grp")),
        ],
        spec(),
        "
        persistentvolumeclaims a/u, pods a/p
        persistentvolumeclaims a/v
        pods a/q
        ",
    );
}

#[test]
fn service_account_pulls_bindings_and_roles_without_joining_them() {
    let mut s = spec();
    s.included_namespaces = vec!["a".into()];
    check(
        vec![
            json!({"kind": "ServiceAccount", "metadata": {"namespace": "a", "name": "robot"}}),
            json!({"kind": "ClusterRoleBinding", "metadata": {"name": "robot-binding"},
                   "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": "a"}],
                   "roleRef": {"kind": "ClusterRole", "name": "robot-role"}}),
            json!({"kind": "ClusterRoleBinding", "metadata": {"name": "other-binding"},
                   "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": "b"}],
                   "roleRef": {"kind": "ClusterRole", "name": "other-role"}}),
            json!({"kind": "ClusterRole", "metadata": {"name": "robot-role"}}),
            json!({"kind": "ClusterRole", "metadata": {"name": "other-role"}}),
        ],
        s,
        "
        serviceaccounts a/robot
        clusterrolebindings robot-binding
        clusterroles robot-role
        ",
    );
}

#[test]
fn selector_brings_pull_targets_but_not_together_only_partners() {
    // web is selected; its claim and the claim's PV are pulled; the other Running pod mounting the
    // claim is together-only with it, so it is not pulled in (Velero #9078).
    let mut s = spec();
    s.label_selector = Some("app=web".into());
    check(
        vec![
            pod("a", "web", "Running", &["c"]),
            pod("a", "other", "Running", &["c"]),
            pvc("a", "c", Some("pv1"), None),
            pv("pv1"),
        ],
        s,
        "persistentvolumeclaims a/c, persistentvolumes pv1, pods a/web",
    );
}

#[test]
fn exclusions_win_over_pull() {
    let mut excluded_pv = pv("pv1");
    excluded_pv["metadata"]["labels"] = json!({"velero.io/exclude-from-backup": "true"});
    let mut deleting = pvc("a", "d", Some("pv2"), None);
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    check(
        vec![pod("a", "p", "Running", &["c", "d"]), pvc("a", "c", Some("pv1"), None), excluded_pv, deleting, pv("pv2")],
        spec(),
        "
        persistentvolumeclaims a/c, pods a/p
        persistentvolumes pv2
        ",
    );
    let mut s = spec();
    s.excluded_resources = vec!["persistentvolumes".into()];
    check(
        vec![pod("a", "p", "Running", &["c"]), pvc("a", "c", Some("pv1"), None), pv("pv1")],
        s,
        "persistentvolumeclaims a/c, pods a/p",
    );
    let mut s = spec();
    s.included_namespaces = vec!["a".into()];
    s.include_cluster_resources = Some(false);
    check(
        vec![pod("a", "p", "Running", &["c"]), pvc("a", "c", Some("pv1"), None), pv("pv1")],
        s,
        "persistentvolumeclaims a/c, pods a/p",
    );
}

#[test]
fn namespace_filter_pulls_cluster_resources_only_when_related() {
    let mut s = spec();
    s.included_namespaces = vec!["a".into()];
    check(
        vec![
            pod("a", "p", "Running", &["c"]),
            pvc("a", "c", Some("pv1"), None),
            pv("pv1"),
            pv("pv9"),
            pod("b", "q", "Running", &[]),
        ],
        s,
        "persistentvolumeclaims a/c, persistentvolumes pv1, pods a/p",
    );
}

/// Regression (issue 9): `--include-namespaces shop --include-cluster-resources=false` dropped the
/// Namespace object. Namespace objects follow the namespace filter (docs/decisions.md), as in Velero.
#[test]
fn namespace_objects_follow_the_namespace_filter_even_with_cluster_resources_off() {
    let ns = |name: &str| json!({"kind": "Namespace", "metadata": {"name": name}});
    let mut s = spec();
    s.included_namespaces = vec!["shop".into()];
    s.include_cluster_resources = Some(false);
    check(
        vec![ns("shop"), ns("other"), pod("shop", "p", "Running", &[]), pod("other", "q", "Running", &[]), pv("pv9")],
        s,
        "
        namespaces shop
        pods shop/p
        ",
    );
}

#[test]
fn ordered_resources_form_one_block_in_the_given_order() {
    let mut s = spec();
    s.ordered_resources = vec![("pods".into(), vec!["a/z".into(), "a/m".into()])];
    check(
        vec![
            pod("a", "m", "Running", &[]),
            pod("a", "z", "Running", &["c"]),
            pod("a", "x", "Running", &[]),
            pvc("a", "c", None, None),
        ],
        s,
        "
        pods a/z, pods a/m, persistentvolumeclaims a/c
        pods a/x
        ",
    );
}

#[test]
fn blocks_do_not_depend_on_listing_order_or_workers() {
    let mut objects = vec![
        pod("a", "w1", "Running", &["shared"]),
        pod("a", "w2", "Running", &["shared", "g1"]),
        pvc("a", "shared", Some("pv1"), None),
        pvc("a", "g1", Some("pv2"), Some("grp")),
        pvc("a", "g2", Some("pv3"), Some("grp")),
        pv("pv1"),
        pv("pv2"),
        pv("pv3"),
        pod("b", "solo", "Running", &[]),
        json!({"kind": "ConfigMap", "metadata": {"namespace": "b", "name": "cfg"}}),
    ];
    let reference = blocks(&cluster(objects.clone()), spec(), 1, 1);
    let mut rng = 0x9e3779b97f4a7c15u64;
    for (round, workers) in [1usize, 2, 3, 16, 64].into_iter().enumerate() {
        // Fisher–Yates with a fixed xorshift stream: deterministic shuffles.
        for i in (1..objects.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            objects.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        // The fake cluster lists in an order drawn from the same stream, not sorted.
        let mut c = cluster(objects.clone());
        c.list_order_seed = Some(rng);
        let got = blocks(&c, spec(), workers, round as u64 + 7);
        assert_eq!(got, reference, "round {round}, workers {workers}");
    }
}

#[test]
fn oversized_component_stays_whole_with_a_warning() {
    let mut s = spec();
    s.block_items_max = 2;
    let c = cluster(vec![pod("a", "p", "Running", &["c"]), pvc("a", "c", Some("pv1"), None), pv("pv1")]);
    let run = backup(&c, s, 2, 3);
    let warned = run
        .events
        .iter()
        .any(|e| matches!(e, Event::Diagnostic { message, .. } if message.contains("more than block_items_max 2")));
    assert!(warned);
    let planned: usize =
        run.events.iter().map(|e| if let Event::BlockPlanned { blocks } = e { blocks.len() } else { 0 }).sum();
    assert_eq!(planned, 1);
}
