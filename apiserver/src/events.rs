//! One Event store, two views: objects are stored as core/v1 Events (what `kubectl describe`
//! reads) and converted to and from events.k8s.io/v1 (what the kube-rs `Recorder` writes),
//! field for field as kube-apiserver's conversion does.

use serde_json::{Map, Value};

use crate::resources::ResourceType;

pub fn is_events_v1(rt: &ResourceType) -> bool {
    rt.group == "events.k8s.io" && rt.plural == "events"
}

fn mv(from: &mut Map<String, Value>, to: &mut Map<String, Value>, src: &str, dst: &str) {
    if let Some(v) = from.remove(src).filter(|v| !v.is_null()) {
        to.insert(dst.to_string(), v);
    }
}

/// events.k8s.io/v1 → core/v1 (storage form).
pub fn to_core(object: Value) -> Value {
    let Value::Object(mut src) = object else { return object };
    let mut out = Map::new();
    out.insert("kind".into(), "Event".into());
    out.insert("apiVersion".into(), "v1".into());
    src.remove("kind");
    src.remove("apiVersion");
    mv(&mut src, &mut out, "metadata", "metadata");
    mv(&mut src, &mut out, "regarding", "involvedObject");
    mv(&mut src, &mut out, "note", "message");
    mv(&mut src, &mut out, "reason", "reason");
    mv(&mut src, &mut out, "type", "type");
    mv(&mut src, &mut out, "action", "action");
    mv(&mut src, &mut out, "related", "related");
    mv(&mut src, &mut out, "eventTime", "eventTime");
    mv(&mut src, &mut out, "series", "series");
    mv(&mut src, &mut out, "deprecatedSource", "source");
    mv(&mut src, &mut out, "deprecatedFirstTimestamp", "firstTimestamp");
    mv(&mut src, &mut out, "deprecatedLastTimestamp", "lastTimestamp");
    mv(&mut src, &mut out, "deprecatedCount", "count");
    if let Some(v) = src.remove("reportingController") {
        out.insert("reportingComponent".into(), v);
    }
    mv(&mut src, &mut out, "reportingInstance", "reportingInstance");
    out.entry("involvedObject").or_insert_with(|| Value::Object(Map::new()));
    // Anything unknown is kept, so nothing a client wrote is lost.
    for (k, v) in src {
        out.entry(k).or_insert(v);
    }
    Value::Object(out)
}

/// core/v1 (storage form) → events.k8s.io/v1.
pub fn from_core(object: Value) -> Value {
    let Value::Object(mut src) = object else { return object };
    let mut out = Map::new();
    out.insert("kind".into(), "Event".into());
    out.insert("apiVersion".into(), "events.k8s.io/v1".into());
    src.remove("kind");
    src.remove("apiVersion");
    mv(&mut src, &mut out, "metadata", "metadata");
    mv(&mut src, &mut out, "eventTime", "eventTime");
    mv(&mut src, &mut out, "series", "series");
    let controller = src
        .remove("reportingComponent")
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        .or_else(|| src.get("source").and_then(|s| s.get("component")).cloned());
    if let Some(c) = controller {
        out.insert("reportingController".into(), c);
    }
    let instance = src
        .remove("reportingInstance")
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        .or_else(|| src.get("source").and_then(|s| s.get("host")).cloned());
    if let Some(i) = instance {
        out.insert("reportingInstance".into(), i);
    }
    mv(&mut src, &mut out, "action", "action");
    mv(&mut src, &mut out, "reason", "reason");
    mv(&mut src, &mut out, "involvedObject", "regarding");
    mv(&mut src, &mut out, "related", "related");
    mv(&mut src, &mut out, "message", "note");
    mv(&mut src, &mut out, "type", "type");
    mv(&mut src, &mut out, "source", "deprecatedSource");
    mv(&mut src, &mut out, "firstTimestamp", "deprecatedFirstTimestamp");
    mv(&mut src, &mut out, "lastTimestamp", "deprecatedLastTimestamp");
    mv(&mut src, &mut out, "count", "deprecatedCount");
    Value::Object(out)
}

/// Fills the core/v1 fields `kubectl describe` prints (count, first/last timestamps, source)
/// from the events.k8s.io ones when a client only wrote those.
pub fn complete_core(object: &mut Value) {
    let Value::Object(map) = object else { return };
    let event_time = map.get("eventTime").cloned().filter(|v| !v.is_null());
    let last =
        map.get("series").and_then(|s| s.get("lastObservedTime")).cloned().or_else(|| event_time.clone());
    if let Some(count) = map.get("series").and_then(|s| s.get("count")).cloned() {
        map.insert("count".into(), count);
    }
    if let Some(t) = &event_time {
        let seconds = Value::String(truncate_micro(t.as_str().unwrap_or("")));
        map.entry("firstTimestamp").or_insert(seconds);
    }
    if let Some(t) = last {
        map.insert("lastTimestamp".into(), Value::String(truncate_micro(t.as_str().unwrap_or(""))));
    }
    if !map.contains_key("source")
        && let Some(c) = map.get("reportingComponent").cloned()
    {
        let mut source = Map::new();
        source.insert("component".into(), c);
        if let Some(host) = map.get("reportingInstance").cloned() {
            source.insert("host".into(), host);
        }
        map.insert("source".into(), Value::Object(source));
    }
    map.entry("count").or_insert(Value::from(1));
}

/// `2026-01-01T00:00:00.123456Z` → `2026-01-01T00:00:00Z` (core timestamps have seconds).
fn truncate_micro(t: &str) -> String {
    match t.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_through_core() {
        let v1 = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "vm1.abc", "namespace": "default"},
            "eventTime": "2026-11-21T10:00:00.000000Z",
            "reportingController": "kpve", "reportingInstance": "node1",
            "action": "Start", "reason": "Started", "note": "VM started", "type": "Normal",
            "regarding": {"kind": "VirtualMachine", "name": "vm1", "namespace": "default"},
            "series": {"count": 2, "lastObservedTime": "2026-11-21T10:05:00.000000Z"}
        });
        let mut core = to_core(v1.clone());
        assert_eq!(core["involvedObject"]["name"], "vm1");
        assert_eq!(core["message"], "VM started");
        complete_core(&mut core);
        assert_eq!(core["count"], 2);
        assert_eq!(core["lastTimestamp"], "2026-11-21T10:05:00Z");
        assert_eq!(core["source"]["component"], "kpve");
        let back = from_core(core);
        for key in [
            "eventTime",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "note",
            "type",
            "regarding",
            "series",
        ] {
            assert_eq!(back[key], v1[key], "{key}");
        }
    }
}
