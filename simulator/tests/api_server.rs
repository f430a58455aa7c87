//! The fake API server as a controller meets it: kube-rs's watcher, server-side apply with field
//! managers, optimistic concurrency, the status subresource, CRDs served as soon as they are
//! created, and leader election through kube-lease-manager.
//!
//! Each test runs its own server on `127.0.0.1:0` inside the test's runtime, so it stops with the
//! test. Nothing sleeps to synchronise: tests wait for the events they expect (watch streams,
//! leadership changes), bounded by a generous timeout that only a broken server reaches.

use std::sync::Arc;
use std::time::Duration;

use blockwise_adapters::world::TokioRuntime;
use blockwise_simulator::fake::FakeCluster;
use blockwise_simulator::server::{FakeApiServer, Fault, Verb};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind, WatchEvent};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};

/// Upper bound on any wait for an expected event; reached only when the server is broken.
const WAIT: Duration = Duration::from_secs(30);

async fn start(cluster: FakeCluster) -> (FakeApiServer, Client) {
    let cluster = Arc::new(cluster.with_clock(Arc::new(TokioRuntime)));
    let server = FakeApiServer::start(cluster, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = Client::try_from(config).unwrap();
    (server, client)
}

fn small_demo() -> FakeCluster {
    blockwise_simulator::demo_cluster(60, blockwise_simulator::DEMO_SEED)
}

fn cm(name: &str, data: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"}, "data": {"k": data}})).unwrap()
}

fn rv(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version.as_deref().unwrap().parse().unwrap()
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_gets_and_writes_agree_on_one_growing_resource_version() {
    let cluster = small_demo();
    let floor =
        cluster.objects().filter_map(|(_, o)| o["metadata"]["resourceVersion"].as_str()?.parse::<u64>().ok()).max();
    let (_server, client) = start(cluster).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());
    let list = pods.list(&ListParams::default()).await.unwrap();
    let list_rv: u64 = list.metadata.resource_version.as_deref().unwrap().parse().unwrap();
    assert_eq!(Some(list_rv), floor, "no write yet: the built-in objects' highest version");
    assert!(list.items.iter().all(|p| rv(&p.metadata) <= list_rv));

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms.create(&PostParams::default(), &cm("one", "1")).await.unwrap();
    assert!(rv(&created.metadata) > list_rv, "a write bumps the global version");
    let patched = cms.patch("one", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}}))).await.unwrap();
    assert!(rv(&patched.metadata) > rv(&created.metadata));
    let got = cms.get("one").await.unwrap();
    assert_eq!(rv(&got.metadata), rv(&patched.metadata));
    let list = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.metadata.resource_version.as_deref().unwrap().parse::<u64>().unwrap(), rv(&patched.metadata));

    // Bad input is a Status naming it, not a panic.
    let e = cms.list(&ListParams::default().labels("a in (")).await.unwrap_err();
    assert!(e.to_string().contains("labelSelector"), "{e}");
    let e = cms.patch("one", &PatchParams::default(), &Patch::Merge(json!(["not", "an object"]))).await;
    assert!(e.is_err(), "a merge patch that is not an object is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_create_modify_delete_in_order_and_recovers_from_a_410() {
    let (server, client) = start(small_demo()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // The first watch after the initial list is told its version expired: the watcher relists.
    server.faults().add(Fault::new(Verb::Watch, Some("configmaps"), 410, 1));
    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    let mut seen: Vec<String> = Vec::new();
    let mut inits = 0;
    let mut acted = false;
    bounded("the watcher's events", async {
        while let Some(e) = events.next().await {
            match e {
                Ok(watcher::Event::InitDone) => {
                    inits += 1;
                    if !acted {
                        acted = true;
                        cms.create(&PostParams::default(), &cm("w", "1")).await.unwrap();
                        cms.patch("w", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}})))
                            .await
                            .unwrap();
                        cms.delete("w", &DeleteParams::default()).await.unwrap();
                    }
                }
                Ok(watcher::Event::Apply(o)) => seen.push(format!("apply {}", o.data.unwrap_or_default()["k"])),
                Ok(watcher::Event::Delete(o)) => {
                    seen.push(format!("delete {}", o.metadata.name.unwrap_or_default()));
                    break;
                }
                Ok(_) => {}
                Err(_) => {} // the 410: the watcher relists on its next poll
            }
        }
    })
    .await;
    assert_eq!(seen, vec!["apply 1", "apply 2", "delete w"]);
    assert!(server.requests().iter().any(|r| r.status == 410), "the fault was served");
    assert!(inits >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_version_older_than_the_history_gets_an_expired_error_event() {
    let (server, client) = start(small_demo()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("old", "1")).await.unwrap();
    // A version below the history's start: the built-in objects' versions were never recorded.
    let url = "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion=5&timeoutSeconds=5";
    let req = http::Request::get(url).body(vec![]).unwrap();
    let text = bounded("the error event", client.request_text(req)).await.unwrap();
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(
        (events[0]["object"]["code"].as_u64(), events[0]["object"]["reason"].as_str()),
        (Some(410), Some("Expired"))
    );
    // resourceVersion "0": the current objects as synthetic ADDED events, then bookmarks.
    server.set_bookmark_interval_ms(5);
    let url =
        "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=5";
    let req = http::Request::get(url).body(vec![]).unwrap();
    let mut stream = client.request_events::<ConfigMap>(req).await.unwrap().boxed();
    let first = bounded("an ADDED event", stream.next()).await.unwrap().unwrap();
    assert!(matches!(&first, WatchEvent::Added(c) if c.metadata.name.as_deref() == Some("old")), "{first:?}");
    let mark = bounded("a bookmark", async {
        loop {
            if let WatchEvent::Bookmark(b) = stream.next().await.unwrap().unwrap() {
                return b;
            }
        }
    })
    .await;
    assert_eq!(mark.types.kind, "ConfigMap");
    assert!(mark.metadata.resource_version.parse::<u64>().is_ok());
    // Bad input is a 400 naming it.
    let req = http::Request::get("/api/v1/configmaps?watch=1&resourceVersion=abc").body(vec![]).unwrap();
    let e = client.request_text(req).await.unwrap_err();
    assert!(e.to_string().contains("invalid resourceVersion"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_owns_fields_and_conflicts_and_stale_versions_are_refused() {
    let (_server, client) = start(small_demo()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let body = |v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": v}});
    let by = |m: &str| PatchParams::apply(m);
    let first = cms.patch("a", &by("alice"), &Patch::Apply(body("1"))).await.unwrap();
    assert_eq!(first.data.unwrap()["k"], "1", "an apply creates a missing object");
    cms.patch("a", &by("bob"), &Patch::Apply(body("1"))).await.unwrap();
    let e = cms.patch("a", &by("bob"), &Patch::Apply(body("2"))).await.unwrap_err();
    match e {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(s.message.contains("alice") && s.message.contains(".data.k"), "{}", s.message);
        }
        other => panic!("{other}"),
    }
    let forced = cms.patch("a", &by("bob").force(), &Patch::Apply(body("2"))).await.unwrap();
    assert_eq!(forced.data.unwrap()["k"], "2");
    // A field set to null loses its owner: alice may set it again without a conflict.
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": null}}))).await.unwrap();
    cms.patch("a", &by("alice"), &Patch::Apply(body("3"))).await.unwrap();

    // Optimistic concurrency: a stale resourceVersion in a merge patch or a replace is a conflict.
    let current = cms.get("a").await.unwrap();
    let stale = (rv(&current.metadata) - 1).to_string();
    let e = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": stale}, "data": {"k": "x"}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{e}");
    let mut replaced = current.clone();
    replaced.data = Some([("k".to_string(), "4".to_string())].into());
    cms.replace("a", &PostParams::default(), &replaced).await.unwrap();
    let e = cms.replace("a", &PostParams::default(), &replaced).await.unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "the version moved: {e}");
    // A write naming another uid was meant for an earlier object of the name: refused (the uid is
    // immutable); the right uid is no obstacle.
    let uid = cms.get("a").await.unwrap().metadata.uid.unwrap();
    let e = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"uid": "an-earlier-one"}, "data": {"k": "y"}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 422 && s.message.contains("metadata.uid")), "{e}");
    assert_eq!(cms.get("a").await.unwrap().data.unwrap()["k"], "4", "the refused write changed the object");
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"uid": uid}, "data": {"k": "5"}})))
        .await
        .unwrap();
    // Unknown patch types and bodies that are not JSON are named.
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/a")
        .header("content-type", "application/json-patch+json")
        .body(b"[]".to_vec())
        .unwrap();
    let e = client.request_text(req).await.unwrap_err();
    assert!(e.to_string().contains("application/json-patch+json"), "{e}");
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/a?fieldManager=x")
        .header("content-type", "application/apply-patch+yaml")
        .body(b"data: {k: v}".to_vec())
        .unwrap();
    let e = client.request_text(req).await.unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}

fn backup_crd() -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "backups.blockwise.dev"},
        "spec": {"group": "blockwise.dev", "scope": "Namespaced",
            "names": {"plural": "backups", "singular": "backup", "kind": "Backup", "shortNames": ["bwb"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "additionalPrinterColumns": [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_crd_is_served_with_its_status_subresource_and_goes_with_its_objects() {
    let (server, client) = start(small_demo()).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &serde_json::from_value(backup_crd()).unwrap()).await.unwrap();
    let discovered = kube::discovery::Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) =
        discovered.resolve_gvk(&GroupVersionKind::gvk("blockwise.dev", "v1alpha1", "Backup")).expect("served");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let backups: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let b = json!({"apiVersion": "blockwise.dev/v1alpha1", "kind": "Backup", "metadata": {"name": "b1"},
                   "spec": {"includedNamespaces": ["*"]}, "status": {"phase": "Ignored"}});
    let created = backups.create(&PostParams::default(), &serde_json::from_value(b).unwrap()).await.unwrap();
    assert!(created.data.get("status").is_none(), "a create ignores .status");
    assert_eq!(created.metadata.generation, Some(1));

    let st = backups
        .patch_status(
            "b1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "InProgress"}, "spec": {"ttl": "1h"}})),
        )
        .await
        .unwrap();
    assert_eq!(st.data["status"]["phase"], "InProgress");
    assert!(st.data["spec"].get("ttl").is_none(), "a status write changes status only");
    assert_eq!(st.metadata.generation, Some(1), "and not the generation");
    let main = backups
        .patch(
            "b1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Lost"}, "spec": {"ttl": "1h"}})),
        )
        .await
        .unwrap();
    assert_eq!(main.data["status"]["phase"], "InProgress", "a write to the object ignores .status");
    assert_eq!(main.metadata.generation, Some(2), "a spec change bumps the generation");

    // Finalizers: a delete marks; removing the last finalizer removes it.
    backups
        .patch("b1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": ["blockwise.dev/x"]}})))
        .await
        .unwrap();
    backups.delete("b1", &DeleteParams::default()).await.unwrap();
    assert!(backups.get("b1").await.unwrap().metadata.deletion_timestamp.is_some());
    backups
        .patch("b1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    assert!(backups.get_opt("b1").await.unwrap().is_none());

    // Deleting the CRD stops serving it and removes its objects.
    backups
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "b2"}})).unwrap())
        .await
        .unwrap();
    crds.delete("backups.blockwise.dev", &DeleteParams::default()).await.unwrap();
    assert!(!server.cluster().resources().iter().any(|r| r.gr.group == "blockwise.dev"));
    let e = backups.get("b2").await.unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e}");
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("blockwise.dev", "v1alpha1", "Backup"), "backups");
    let again: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    crds.create(&PostParams::default(), &serde_json::from_value(backup_crd()).unwrap()).await.unwrap();
    assert!(again.list(&ListParams::default()).await.unwrap().items.is_empty(), "b2 went with its CRD");
}

async fn holder(leases: &Api<k8s_openapi::api::coordination::v1::Lease>) -> Option<String> {
    leases.get("leader").await.unwrap().spec.and_then(|s| s.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_held_by_one_manager_and_passes_on_release_and_on_expiry() {
    use kube_lease_manager::LeaseManagerBuilder;
    let (_server, client) = start(small_demo()).await;
    let build = |id: &str| {
        LeaseManagerBuilder::new(client.clone(), "leader")
            .with_namespace("default")
            .with_identity(id)
            .with_field_manager(id)
            .with_duration(2)
            .with_grace(1)
            .build()
    };
    let a = build("a").await.unwrap();
    let b = build("b").await.unwrap();
    let leases = Api::namespaced(client.clone(), "default");
    assert!(bounded("a to lead", a.changed()).await.unwrap(), "a leads");
    assert_eq!(holder(&leases).await.as_deref(), Some("a"));
    // b tries while a holds: its apply conflicts with a's fields; b leads only once a releases.
    let b_task = tokio::spawn(async move {
        let led = b.changed().await.unwrap();
        (b, led)
    });
    a.release().await.unwrap();
    let (b, led) = bounded("b to lead", b_task).await.unwrap();
    assert!(led);
    assert_eq!(holder(&leases).await.as_deref(), Some("b"));
    // b stops renewing (nobody polls it): once its lease expires, a takes over.
    assert!(
        bounded("a to lead again", async {
            loop {
                if a.changed().await.unwrap() {
                    return true;
                }
            }
        })
        .await
    );
    assert_eq!(holder(&leases).await.as_deref(), Some("a"));
    drop(b);
}

/// A watch of one resource across namespaces streams that resource's changes only (a regression:
/// the controller's watch of Backups once received every snapshot content the backup wrote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_one_resource_never_streams_another_resources_changes() {
    let (_server, client) = start(small_demo()).await;
    let all: Api<ConfigMap> = Api::all(client.clone());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut events = watcher(all, watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    bounded("the configmap after the secret", async {
        while let Some(e) = events.next().await {
            match e {
                Ok(watcher::Event::InitDone) => {
                    let s = json!({"metadata": {"name": "not-a-configmap", "namespace": "default"}, "data": {}});
                    secrets.create(&PostParams::default(), &serde_json::from_value(s).unwrap()).await.unwrap();
                    cms.create(&PostParams::default(), &cm("after", "1")).await.unwrap();
                }
                Ok(watcher::Event::Apply(o)) => {
                    let name = o.metadata.name.unwrap_or_default();
                    seen.push(name.clone());
                    if name == "after" {
                        break;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(seen, ["after"]);
}

/// Deleting a namespace deletes what is in it, then itself: an object held by a finalizer keeps
/// the namespace Terminating until the finalizer goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_deletes_its_objects_then_itself() {
    use k8s_openapi::api::core::v1::Namespace;
    let (_server, client) = start(small_demo()).await;
    let nss: Api<Namespace> = Api::all(client.clone());
    let scratch = serde_json::from_value(json!({"metadata": {"name": "scratch"}})).unwrap();
    nss.create(&PostParams::default(), &scratch).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "scratch");
    let mut held = cm("held", "1");
    held.metadata.namespace = Some("scratch".into());
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    let mut free = cm("free", "1");
    free.metadata.namespace = Some("scratch".into());
    cms.create(&PostParams::default(), &free).await.unwrap();
    nss.delete("scratch", &DeleteParams::default()).await.unwrap();
    assert!(cms.get_opt("free").await.unwrap().is_none(), "an object without finalizers goes at once");
    let ns = nss.get("scratch").await.unwrap();
    assert!(ns.metadata.deletion_timestamp.is_some(), "the namespace waits for what is left");
    assert_eq!(ns.status.and_then(|s| s.phase).as_deref(), Some("Terminating"));
    cms.patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_none(), "its finalizer gone, the object goes");
    assert!(nss.get_opt("scratch").await.unwrap().is_none(), "and the namespace with its last object");
}
