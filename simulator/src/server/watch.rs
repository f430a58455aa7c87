//! Watches of lists: `GET …/{resource}?watch=1`, streamed as newline-delimited JSON events.
//!
//! A watch reads the fake cluster's change history ([`crate::csi::Change`], recorded where the
//! overlay is written) from its `resourceVersion`: first every kept change after it that matches
//! (namespace, `fieldSelector`, `labelSelector`), then new
//! ones as they happen, until `timeoutSeconds` ([`WATCH_SECONDS_DEFAULT`], at most
//! [`WATCH_SECONDS_MAX`]). An empty or `"0"` resourceVersion starts from now with a synthetic
//! `ADDED` per current object; one older than the history is an `ERROR` event carrying a 410
//! `Expired` Status, as the real server sends it. It wakes on the cluster's change callback, and —
//! because the fake snapshot controller's jobs run when the cluster's clock passes them — at the
//! next job (polled at most every [`WATCH_POLL_MS_MAX`]); a cluster without a clock has its virtual
//! clock moved to the next job instead, as the single-object watch always did.
//!
//! Deliberately absent: an object that stops matching a label selector is not sent as `DELETED`
//! (it simply stops appearing), and a resourceVersion ahead of the cluster is not refused.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use blockwise_engine::item::ResourceType;
use blockwise_engine::spec::LabelSelector;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::table::{self, Include};
use super::{failure, labels_of, FieldSelector, Query, Shared};
use crate::crd::Column;

/// `timeoutSeconds` when the client gives none.
pub const WATCH_SECONDS_DEFAULT: u64 = 300;
/// The longest watch served; a longer `timeoutSeconds` is cut to this.
pub const WATCH_SECONDS_MAX: u64 = 1800;
/// The longest a watch sleeps before looking at the cluster's clock again.
pub const WATCH_POLL_MS_MAX: u64 = 1000;

/// Which objects a watch sends.
struct Filter {
    namespace: Option<String>,
    fields: FieldSelector,
    selector: Option<LabelSelector>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let namespace = obj.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str);
        self.namespace.as_deref().is_none_or(|ns| namespace == Some(ns))
            && self.fields.matches(obj)
            && self.selector.as_ref().is_none_or(|s| s.matches(&labels_of(obj)))
    }
}

/// How events are rendered: objects, or one-row tables.
#[derive(Clone)]
pub(super) struct Render {
    pub rt: ResourceType,
    /// `Some` for a table watch: its columns, pods or not, what rows carry.
    pub table: Option<(Vec<Column>, bool, Include)>,
}

impl Render {
    fn object(&self, obj: &Value, now_ms: u64) -> Value {
        let mut obj = obj.clone();
        if let Some(m) = obj.as_object_mut() {
            m.insert("apiVersion".into(), json!(self.rt.api_version()));
            m.insert("kind".into(), json!(self.rt.kind));
        }
        match &self.table {
            None => obj,
            Some((cols, pods, include)) => {
                let rv = obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
                table::table(&[obj], cols, *pods, *include, json!({"resourceVersion": rv}), now_ms)
            }
        }
    }

    fn event(&self, kind: &str, obj: &Value, now_ms: u64) -> Bytes {
        line(&json!({"type": kind, "object": self.object(obj, now_ms)}))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            &json!({"type": "BOOKMARK", "object": {"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": meta}}),
        )
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    Bytes::from(b)
}

struct Watch {
    s: Arc<Shared>,
    render: Render,
    filter: Filter,
    /// The resourceVersion the client has seen everything up to.
    cursor: u64,
    deadline: Instant,
    bookmark_every: Option<Duration>,
    next_bookmark: Instant,
    /// Lines ready to send.
    ready: VecDeque<Bytes>,
    done: bool,
}

impl Watch {
    /// The next chunk of the stream, `None` when the watch ends.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Some(b);
            }
            if self.done {
                return None;
            }
            let cluster = self.s.cluster.clone();
            let notified = self.s.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = cluster.now();
            let (gr, filter) = (&self.render.rt.gr, &self.filter);
            match cluster
                .changes_since_at(now, self.cursor, |c| c.key.is(&gr.group, &gr.resource) && filter.matches(&c.object))
            {
                Err(oldest) => {
                    self.done = true;
                    let status = super::status_body(
                        410,
                        "Expired",
                        &format!("too old resource version: {} ({oldest})", self.cursor),
                    );
                    return Some(line(&json!({"type": "ERROR", "object": status})));
                }
                Ok((changes, rv)) => {
                    for c in &changes {
                        self.ready.push_back(self.render.event(c.kind.event_type(), &c.object, now));
                    }
                    self.cursor = rv;
                    if !self.ready.is_empty() {
                        continue;
                    }
                }
            }
            let instant = Instant::now();
            if instant >= self.deadline {
                return None;
            }
            if self.bookmark_every.is_some() && instant >= self.next_bookmark {
                self.next_bookmark = instant + self.bookmark_every.unwrap_or_default();
                return Some(self.render.bookmark(self.cursor, false));
            }
            let mut wake = self.deadline;
            if self.bookmark_every.is_some() {
                wake = wake.min(self.next_bookmark);
            }
            if let Some(at) = cluster.next_job() {
                if !cluster.has_clock() {
                    cluster.advance_clock_to(at);
                    continue;
                }
                let ms = at.saturating_sub(now).clamp(1, WATCH_POLL_MS_MAX);
                wake = wake.min(instant + Duration::from_millis(ms));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// Serves a watch of `rt` (in `namespace`, when given).
pub(super) fn watch(s: Arc<Shared>, render: Render, namespace: Option<&str>, q: &Query) -> Response {
    let what = format!("watch {}", super::fault_name(&render.rt));
    let mut filter = Filter { namespace: namespace.map(str::to_string), fields: Default::default(), selector: None };
    match FieldSelector::parse(q.get("fieldSelector")) {
        Ok(f) => filter.fields = f,
        Err(e) => return failure(400, format!("{what}: {e}")),
    }
    match q.get("labelSelector").map(LabelSelector::parse).transpose() {
        Ok(sel) => filter.selector = sel,
        Err(e) => return failure(400, format!("{what}: unable to parse labelSelector: {e}")),
    }
    let secs = match q.get("timeoutSeconds").map(str::parse::<u64>).transpose() {
        Ok(t) => t.unwrap_or(WATCH_SECONDS_DEFAULT).min(WATCH_SECONDS_MAX),
        Err(e) => return failure(400, format!("{what}: invalid timeoutSeconds: {e}")),
    };
    let bookmarks = matches!(q.get("allowWatchBookmarks"), Some("true" | "1"));
    let initial = matches!(q.get("sendInitialEvents"), Some("true" | "1"));
    let rv = q.get("resourceVersion").unwrap_or("");
    let cluster = s.cluster.clone();
    let now = cluster.now();
    let mut ready = VecDeque::new();
    let cursor = if rv.is_empty() || rv == "0" || initial {
        let (objects, rv) = cluster.live_at(now, &render.rt.gr);
        for (_, o) in objects.iter().filter(|(_, o)| filter.matches(o)) {
            ready.push_back(render.event("ADDED", o, now));
        }
        if initial && bookmarks {
            ready.push_back(render.bookmark(rv, true));
        }
        rv
    } else {
        match rv.parse::<u64>() {
            Ok(r) => r,
            Err(_) => return failure(400, format!("{what}: invalid resourceVersion {rv:?}: not a number")),
        }
    };
    let bookmark_ms = s.bookmark_ms.load(std::sync::atomic::Ordering::SeqCst);
    let start = Instant::now();
    let w = Watch {
        s,
        render,
        filter,
        cursor,
        deadline: start + Duration::from_secs(secs),
        bookmark_every: bookmarks.then(|| Duration::from_millis(bookmark_ms.max(1))),
        next_bookmark: start + Duration::from_millis(bookmark_ms.max(1)),
        ready,
        done: false,
    };
    let stream = futures::stream::unfold(w, |mut w| async move {
        let chunk = w.next().await?;
        Some((Ok::<_, Infallible>(chunk), w))
    });
    let mut r = Body::from_stream(stream).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}
