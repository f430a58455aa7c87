//! Server-side tables (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`), what `kubectl get`
//! prints: pods get NAME, READY, STATUS, RESTARTS and AGE; resources of CRDs their
//! `additionalPrinterColumns` after NAME (NAME and AGE when they declare none); everything else
//! NAME and AGE. `includeObject` (`None`, `Metadata` — the default — or `Object`) says what each
//! row carries. Deliberately absent: the wide (`priority > 0`) columns of built-in kinds and the
//! per-kind columns of other built-ins (Deployments' READY, Services' CLUSTER-IP, …).

use serde_json::{json, Value};

use crate::crd::{eval_path, Column};

/// What a row carries besides its cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    /// Nothing.
    None,
    /// A `PartialObjectMetadata` of the object.
    Metadata,
    /// The whole object.
    Object,
}

impl Include {
    /// From the `includeObject` query parameter (`Metadata` when absent); `Err` names a bad value.
    pub fn parse(v: Option<&str>) -> Result<Include, String> {
        match v {
            None | Some("Metadata") => Ok(Include::Metadata),
            Some("Object") => Ok(Include::Object),
            Some("None") => Ok(Include::None),
            Some(other) => Err(format!("invalid includeObject {other:?}: one of None, Metadata, Object")),
        }
    }
}

/// Whether an `Accept` header asks for a table first.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table"))
}

/// The columns of a resource's table.
pub fn columns(resource_is_pods: bool, crd_columns: Option<&[Column]>) -> Vec<Column> {
    let col = |name: &str, type_: &str, path: &str| Column {
        name: name.to_string(),
        type_: type_.to_string(),
        json_path: path.to_string(),
        priority: 0,
    };
    let mut out = vec![col("Name", "string", ".metadata.name")];
    if resource_is_pods {
        out.extend([
            col("Ready", "string", ""),
            col("Status", "string", ""),
            col("Restarts", "string", ""),
            col("Age", "string", ".metadata.creationTimestamp"),
        ]);
        return out;
    }
    match crd_columns {
        Some(cs) if !cs.is_empty() => out.extend(cs.iter().cloned()),
        _ => out.push(col("Age", "date", ".metadata.creationTimestamp")),
    }
    out
}

fn definitions(cols: &[Column]) -> Value {
    Value::Array(
        cols.iter()
            .map(|c| {
                let format = if c.name == "Name" { "name" } else { "" };
                json!({"name": c.name, "type": c.type_, "format": format, "description": "", "priority": c.priority})
            })
            .collect(),
    )
}

/// One row's cells.
fn cells(obj: &Value, cols: &[Column], pods: bool, now_ms: u64) -> Vec<Value> {
    if pods {
        let statuses: Vec<&Value> = obj
            .pointer("/status/containerStatuses")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let total = obj.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len);
        let ready = statuses.iter().filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true)).count();
        let restarts: i64 = statuses.iter().filter_map(|c| c.get("restartCount").and_then(Value::as_i64)).sum();
        let waiting = statuses.iter().find_map(|c| c.pointer("/state/waiting/reason").and_then(Value::as_str));
        let phase = obj.pointer("/status/phase").and_then(Value::as_str).unwrap_or("Unknown");
        let status =
            if obj.pointer("/metadata/deletionTimestamp").is_some() { "Terminating" } else { waiting.unwrap_or(phase) };
        return vec![
            obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null),
            json!(format!("{ready}/{total}")),
            json!(status),
            json!(restarts.to_string()),
            json!(age(obj, now_ms)),
        ];
    }
    cols.iter()
        .map(|c| match (c.name.as_str(), c.type_.as_str()) {
            ("Age", "string") => json!(age(obj, now_ms)),
            // As the real server's table convertor: a date cell is the time since it, as kubectl
            // prints ages (`5m`), not the timestamp itself.
            (_, "date") => match eval_path(obj, &c.json_path) {
                Some(Value::String(t)) => parse_rfc3339(&t)
                    .map_or(Value::String(t), |at| json!(human_duration(now_ms.saturating_sub(at) / 1000))),
                other => other.unwrap_or(Value::Null),
            },
            _ => eval_path(obj, &c.json_path).unwrap_or(Value::Null),
        })
        .collect()
}

fn row_object(obj: &Value, include: Include) -> Option<Value> {
    match include {
        Include::None => None,
        Include::Object => Some(obj.clone()),
        Include::Metadata => Some(json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                         "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})),
    }
}

/// A `Table` of `objects` (each with its apiVersion and kind), with list metadata `metadata`.
pub fn table(objects: &[Value], cols: &[Column], pods: bool, include: Include, metadata: Value, now_ms: u64) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(o, cols, pods, now_ms)});
            if let Some(obj) = row_object(o, include) {
                row["object"] = obj;
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata,
           "columnDefinitions": definitions(cols), "rows": rows})
}

/// Unix milliseconds of an RFC 3339 UTC timestamp (`2024-05-01T12:00:00Z`, fractions ignored).
pub fn parse_rfc3339(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000).ok()
}

/// kubectl's short age of an object (`5m`, `3h12m`, `4d`), `<unknown>` without a timestamp.
fn age(obj: &Value, now_ms: u64) -> String {
    let Some(created) = obj.pointer("/metadata/creationTimestamp").and_then(Value::as_str).and_then(parse_rfc3339)
    else {
        return "<unknown>".into();
    };
    human_duration(now_ms.saturating_sub(created) / 1000)
}

/// Kubernetes' `HumanDuration` of `secs` seconds.
pub fn human_duration(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if m < 10 => format!("{m}m{}s", s % 60),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => format!("{d}d{}h", h % 24),
        _ if d < 365 * 2 => format!("{d}d"),
        _ if d < 365 * 8 => format!("{}y{}d", d / 365, d % 365),
        _ => format!("{}y", d / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_rows_count_ready_containers_and_restarts() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "creationTimestamp": "2024-05-01T12:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2},
                {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let now = parse_rfc3339("2024-05-01T12:05:30Z").unwrap();
        let cols = columns(true, None);
        let t = table(std::slice::from_ref(&pod), &cols, true, Include::None, json!({}), now);
        assert_eq!(t["rows"][0]["cells"], json!(["p", "1/2", "CrashLoopBackOff", "3", "5m30s"]));
        assert!(t["rows"][0].get("object").is_none());
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn crd_columns_and_includes() {
        let crd_cols = vec![Column {
            name: "Phase".into(),
            type_: "string".into(),
            json_path: ".status.phase".into(),
            priority: 0,
        }];
        let cols = columns(false, Some(&crd_cols));
        let o = json!({"metadata": {"name": "b1"}, "status": {"phase": "Completed"}});
        let t = table(std::slice::from_ref(&o), &cols, false, Include::Metadata, json!({}), 0);
        assert_eq!(t["rows"][0]["cells"], json!(["b1", "Completed"]));
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let t = table(std::slice::from_ref(&o), &columns(false, None), false, Include::Object, json!({}), 0);
        assert_eq!(t["rows"][0]["object"], o);
        assert_eq!(t["rows"][0]["cells"][1], Value::Null, "no timestamp: the date cell is empty");
        let dated = json!({"metadata": {"name": "b2", "creationTimestamp": "2024-05-01T12:00:00Z"}});
        let now = parse_rfc3339("2024-05-01T12:02:10Z").unwrap();
        let t = table(std::slice::from_ref(&dated), &columns(false, None), false, Include::None, json!({}), now);
        assert_eq!(t["rows"][0]["cells"], json!(["b2", "2m10s"]), "a date cell is an age");
        assert!(Include::parse(Some("Everything")).unwrap_err().contains("Everything"));
        assert!(wants_table("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"));
        assert!(!wants_table("application/json"));
    }

    #[test]
    fn ages_as_kubectl_prints_them() {
        let cases = [
            (5, "5s"),
            (130, "2m10s"),
            (900, "15m"),
            (4 * 3600 + 60, "4h1m"),
            (30 * 3600, "30h"),
            (3 * 86_400, "3d0h"),
            (40 * 86_400, "40d"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
        assert_eq!(parse_rfc3339("1970-01-02T00:00:01Z"), Some(86_401_000));
        assert_eq!(parse_rfc3339(&blockwise_adapters::report::rfc3339(1_714_564_800_000)), Some(1_714_564_800_000));
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
