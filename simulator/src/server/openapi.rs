//! The OpenAPI documents kubectl reads before it writes: enough to let `kubectl apply` and
//! `create` run with their default validation (`--validate=strict`) against the fake server.
//!
//! kubectl validates on the server when the server says it can: it looks in the OpenAPI v3
//! document of an object's group-version (`/openapi/v3` lists them) for the object's PATCH
//! operation and that operation's `fieldValidation` parameter. If it is there, kubectl does no
//! client-side schema validation and sends `fieldValidation=Strict`, which this server honours
//! for the kinds it has a schema for ([`crate::crd::prune_unknown`]). So the v3 documents
//! declare, per served resource, its paths and operations (list, create, read, replace, patch,
//! delete, and the status subresource where there is one), each tagged with its
//! `x-kubernetes-group-version-kind` and the query parameters the server reads; the component
//! schemas are the CRDs' own `openAPIV3Schema`s — built-in kinds have none here.
//!
//! `/openapi/v2` is a Swagger 2.0 document that declares nothing (no paths, no definitions):
//! kubectl 1.27 and 1.28 download and parse it (as protobuf) before they ask the v3 documents,
//! and give up on apply when it is missing; finding no schema in it, they validate nothing
//! client-side. Deliberately absent: schemas of built-in kinds, the v2 document's content, and
//! the real server's redirect of a stale `hash`: a document is always served as it is now.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use blockwise_engine::item::ResourceType;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{json_response, Shared};

/// The protobuf media type in which client-go asks for `/openapi/v2`.
const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
/// The content type the real server answers it with (Go's media type parser refuses the `@`).
const V2_PROTOBUF_ANSWER: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// `/openapi/v2`: an empty Swagger 2.0 document, as protobuf when asked for (a gnostic
/// `openapi_v2.Document` whose only field is `swagger = "2.0"`), else as JSON.
pub(super) fn v2(accept: &str) -> Response {
    if accept.contains(V2_PROTOBUF) {
        // Field 1 (swagger), wire type 2 (length-delimited): tag 0x0a, length 3, "2.0".
        let body: &'static [u8] = b"\x0a\x032.0";
        let mut r = body.into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(V2_PROTOBUF_ANSWER));
        return r;
    }
    json_response(200, &json!({"swagger": "2.0", "info": info(), "paths": {}, "definitions": {}}))
}

fn info() -> Value {
    json!({"title": "blockwise fake Kubernetes API server", "version": super::version_info()["gitVersion"]})
}

/// The path of a group-version in the v3 index: `api/v1`, `apis/apps/v1`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: every served group-version, each with a URL whose `hash` changes with its
/// document.
pub(super) fn v3_index(s: &Shared) -> Response {
    let mut paths = Map::new();
    for (group, versions) in super::groups(&s.cluster.resources()) {
        for version in versions {
            if let Some(doc) = v3_document(s, &group, &version) {
                let hash = Sha256::digest(doc.to_string().as_bytes());
                let hash: String = hash.iter().take(16).map(|b| format!("{b:02X}")).collect();
                let path = gv_path(&group, &version);
                paths.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}));
            }
        }
    }
    json_response(200, &json!({"paths": paths}))
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/{group}/{version}`; `None` for a group-version not
/// served.
pub(super) fn v3_group_version(s: &Shared, segs: &[&str]) -> Option<Response> {
    let (group, version) = match segs {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    v3_document(s, group, version).map(|doc| json_response(200, &doc))
}

/// The OpenAPI 3.0 document of one group-version.
fn v3_document(s: &Shared, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<ResourceType> =
        s.cluster.resources().into_iter().filter(|rt| rt.gr.group == group && rt.version == version).collect();
    if resources.is_empty() {
        return None;
    }
    let crds = s.cluster.crd_served();
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for rt in &resources {
        let gvk = json!({"group": group, "version": version, "kind": rt.kind});
        let prefix = format!("/{}", gv_path(group, version));
        let collection = if rt.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", rt.gr.resource)
        } else {
            format!("{prefix}/{}", rt.gr.resource)
        };
        let item = format!("{collection}/{{name}}");
        let scope = if rt.namespaced { vec![path_param("namespace")] } else { Vec::new() };
        let named: Vec<Value> = scope.iter().cloned().chain([path_param("name")]).collect();
        let op = |action: &str, params: &[Value], query: &[&str]| {
            let mut ps = params.to_vec();
            ps.extend(query.iter().map(|q| query_param(q)));
            json!({"operationId": format!("{action}{}", rt.kind), "x-kubernetes-action": action,
                   "x-kubernetes-group-version-kind": gvk, "parameters": ps,
                   "responses": {"200": {"description": "OK"}}})
        };
        let write = ["fieldManager", "fieldValidation"];
        paths.insert(
            collection,
            json!({
                "get": op("list", &scope, &["labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "watch", "allowWatchBookmarks", "timeoutSeconds"]),
                "post": op("post", &scope, &write),
            }),
        );
        paths.insert(
            item.clone(),
            json!({
                "get": op("get", &named, &[]),
                "put": op("put", &named, &write),
                "patch": op("patch", &named, &["fieldManager", "fieldValidation", "force"]),
                "delete": op("delete", &named, &[]),
            }),
        );
        if s.cluster.status_subresource(&rt.gr) {
            paths.insert(
                format!("{item}/status"),
                json!({
                    "get": op("get", &named, &[]),
                    "put": op("put", &named, &write),
                    "patch": op("patch", &named, &["fieldManager", "fieldValidation", "force"]),
                }),
            );
        }
        let crd = crds.iter().find(|c| c.rt.gr == rt.gr && c.rt.version == rt.version);
        if let Some(mut schema) = crd.and_then(|c| c.schema.clone()) {
            if let Some(m) = schema.as_object_mut() {
                m.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
            }
            let reversed: Vec<&str> = group.split('.').rev().collect();
            schemas.insert(format!("{}.{version}.{}", reversed.join("."), rt.kind), schema);
        }
    }
    Some(json!({"openapi": "3.0.0", "info": info(), "paths": paths, "components": {"schemas": schemas}}))
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

fn query_param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string"}})
}
