//! Property tests over generated clusters and fault schedules: proptest builds a structured
//! cluster model — pods with 0..n claims, RWX sharing, bound/unbound claims, volume groups,
//! non-Running pods, ServiceAccounts with bindings, custom resources, annotation and spec hooks
//! (pre and post) with each onError mode and misbehaviour, the exclude label on any kind, namespace
//! filters both ways, cluster resources on/off, selectors matching claims, ordered resources — and
//! a fault set, runs the production shell in the simulator, and requires every invariant. proptest
//! shrinks a failure to a minimal cluster; its seed is fixed in CI (`PROPTEST_CASES` raises the
//! count).

use std::collections::BTreeSet;

use blockwise_engine::hooks::{HookPhase, OnError};
use blockwise_simulator::model::{hook_fault_key, HookFault, HookM, Model, PodM, PvcM, SaM, SpecHookM};
use blockwise_simulator::runner::check_run;
use blockwise_simulator::sim::{FaultKind, RunConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn on_error() -> impl Strategy<Value = OnError> {
    prop_oneof![Just(OnError::Fail), Just(OnError::Continue)]
}

fn hook_fault() -> impl Strategy<Value = Option<HookFault>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(HookFault::Exit)),
        1 => Just(Some(HookFault::Error)),
        1 => Just(Some(HookFault::Timeout)),
        1 => Just(Some(HookFault::Hang)),
    ]
}

fn model() -> impl Strategy<Value = Model> {
    let pvc = (
        0usize..2,
        0u8..8,
        any::<bool>(),
        prop::option::of(0u8..2),
        prop::bool::weighted(0.05),
        prop::option::of(0u8..3),
    )
        .prop_map(|(ns, i, bound, group, deleting, app)| PvcM {
            ns,
            name: format!("c{i}"),
            bound,
            pv_missing: false,
            group,
            deleting,
            app,
            not_csi: false,
        });
    let hook = (on_error(), hook_fault(), hook_fault(), prop::bool::weighted(0.05), 0u8..3).prop_map(
        |(on_error, pre_fault, post_fault, malformed, which)| {
            (
                HookM { on_error, on_error_set: true, malformed, pre: which != 1, post: which != 2 },
                pre_fault,
                post_fault,
            )
        },
    );
    let pod = (
        0usize..2,
        prop::sample::select(vec!["Running", "Running", "Pending", "Succeeded"]),
        prop::collection::vec(0u8..8, 0..3),
        0u8..3,
        prop::option::of(hook),
        prop::option::of(prop::sample::select(vec!["pc0", "pc1"])),
        prop::bool::weighted(0.05),
    );
    let sa = (0usize..2, prop::collection::btree_set(0u8..3, 0..3));
    (
        prop::collection::vec(pod, 0..10),
        prop::collection::vec(pvc, 0..8),
        prop::collection::vec(sa, 0..3),
        prop::collection::vec(0usize..2, 0..3),
        prop::option::of(0u8..3),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        prop::option::of((on_error(), any::<bool>(), any::<bool>())),
        prop::collection::vec(0usize..10, 0..3),
        (prop::option::of(any::<bool>()), prop::bool::weighted(0.15), prop::collection::vec(0usize..12, 0..3)),
    )
        .prop_map(|(pods, pvcs, sas, widgets, selector_app, ns_filter, exclude_pvs, spec_hook, ordered, extra)| {
            let (include_cluster_resources, exclude_ns1, excluded_tags) = extra;
            let mut pvcs = pvcs;
            pvcs.sort_by(|a, b| (a.ns, &a.name).cmp(&(b.ns, &b.name)));
            pvcs.dedup_by(|a, b| a.ns == b.ns && a.name == b.name);
            let mut hook_faults = std::collections::BTreeMap::new();
            let pods: Vec<PodM> = pods
                .into_iter()
                .enumerate()
                .map(|(i, (ns, phase, claims, app, hook, pc, excluded))| {
                    let name = format!("p{i}");
                    let hook = hook.map(|(h, pre_fault, post_fault)| {
                        // Faults apply to the pod's hooks whatever their source (annotation or spec).
                        for (phase, f) in [(HookPhase::Pre, pre_fault), (HookPhase::Post, post_fault)] {
                            if let Some(f) = f {
                                hook_faults.insert(hook_fault_key(&name, phase), f);
                            }
                        }
                        h
                    });
                    PodM {
                        ns,
                        name,
                        phase: phase.to_string(),
                        claims: claims
                            .into_iter()
                            .map(|c| format!("c{c}"))
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect(),
                        app,
                        hook,
                        priority_class: pc.map(str::to_string),
                        excluded,
                    }
                })
                .collect();
            let ordered_pods: Vec<String> = ordered
                .into_iter()
                .filter_map(|i| pods.get(i).filter(|p| p.ns == 0).map(|p| p.name.clone()))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut m = Model {
                sas: sas
                    .into_iter()
                    .enumerate()
                    .map(|(i, (ns, roles))| SaM {
                        ns,
                        name: format!("sa{i}"),
                        roles: roles.into_iter().map(|r| format!("role{r}")).collect(),
                    })
                    .collect(),
                configmaps: vec![(0, "cm0".into())],
                widgets: widgets.into_iter().enumerate().map(|(i, ns)| (ns, format!("w{i}"))).collect(),
                selector_app,
                include_ns: if ns_filter { vec![0] } else { vec![] },
                exclude_ns: if exclude_ns1 && !ns_filter { vec![1] } else { vec![] },
                include_cluster_resources,
                exclude_pvs,
                ordered_pods,
                spec_hook: spec_hook.map(|(on_error, pre, post)| SpecHookM { on_error, pre, post }),
                pods,
                pvcs,
                ..Model::empty()
            };
            m.world.hook_faults = hook_faults;
            let tags = m.tags();
            m.exclude_label = excluded_tags.into_iter().filter_map(|i| tags.get(i).cloned()).collect();
            m
        })
}

fn faults() -> impl Strategy<Value = BTreeSet<FaultKind>> {
    prop::collection::btree_set(prop::sample::select(FaultKind::ALL.to_vec()), 0..6)
}

#[test]
fn generated_clusters_and_fault_schedules_hold_every_invariant() {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    // A fixed seed in CI: the same cases every run.
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let result = runner.run(&(model(), faults(), 1usize..6, any::<u64>()), |(model, faults, workers, seed)| {
        let cfg = RunConfig::new(seed, faults, workers);
        let (violations, _) = check_run(&model, &cfg, false);
        prop_assert!(violations.is_empty(), "seed {seed}, workers {workers}: {violations:?}");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
