//! Background work kube-controller-manager would do: ownerReference garbage collection
//! (background, foreground and orphan propagation), namespace termination, the Event TTL, and
//! compaction of the store's history.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::{Api, DeleteOptions, Propagation, WriteOptions};
use crate::resources::ResourceType;
use crate::store::Revision;

/// Events older than this are removed (kube-apiserver's `--event-ttl`).
pub const EVENT_TTL: Duration = Duration::from_secs(3600);
/// History kept for watch resume: at least this long and at least [`KEEP_REVISIONS`].
pub const HISTORY_WINDOW: Duration = Duration::from_secs(300);
pub const KEEP_REVISIONS: Revision = 10_000;

pub async fn run(api: Arc<Api>) {
    loop {
        tokio::select! {
            _ = api.gc_notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        // Let a burst of deletions settle into one sweep.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let api = api.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || sweep(&api)).await {
            tracing::error!(error = %e, "garbage collection sweep panicked");
        }
    }
}

pub async fn compact(api: Arc<Api>, window: Duration, keep: Revision) {
    let mut samples: VecDeque<(Instant, Revision)> = VecDeque::new();
    let period = (window / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(period).await;
        let now = Instant::now();
        let current = api.store.current_revision();
        samples.push_back((now, current));
        while samples.len() > 1 && now.duration_since(samples[1].0) >= window {
            samples.pop_front();
        }
        let Some(&(at, old)) = samples.front() else { continue };
        if now.duration_since(at) < window {
            continue;
        }
        let target = old.min(current - keep);
        if target > api.store.compacted_revision() {
            let api = api.clone();
            let result = tokio::task::spawn_blocking(move || api.store.compact(target)).await;
            match result {
                Ok(Ok(())) => tracing::debug!(revision = target, "compacted"),
                Ok(Err(e)) => tracing::warn!(error = %e, "compaction failed"),
                Err(e) => tracing::error!(error = %e, "compaction panicked"),
            }
        }
    }
}

fn meta<'a>(object: &'a Value, field: &str) -> Option<&'a Value> {
    object.get("metadata")?.get(field)
}

fn name_ns(object: &Value) -> (String, Option<String>) {
    (
        meta(object, "name").and_then(Value::as_str).unwrap_or("").to_string(),
        meta(object, "namespace").and_then(Value::as_str).map(String::from),
    )
}

fn has_finalizer(object: &Value, finalizer: &str) -> bool {
    meta(object, "finalizers").and_then(Value::as_array).is_some_and(|f| f.iter().any(|x| x == finalizer))
}

fn owner_uids(object: &Value) -> Vec<String> {
    meta(object, "ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter().filter_map(|r| r.get("uid").and_then(Value::as_str).map(String::from)).collect()
        })
        .unwrap_or_default()
}

/// Whether the owner an ownerReference names exists with that uid, read live (the sweep's
/// snapshot is not atomic across types).
fn owner_alive(api: &Api, dependent_ns: Option<&str>, reference: &Value) -> bool {
    let registry = api.registry();
    let api_version = reference.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = reference.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = reference.get("name").and_then(Value::as_str).unwrap_or("");
    let uid = reference.get("uid").and_then(Value::as_str).unwrap_or("");
    let Some(rt) = registry.types_in(group, version).into_iter().find(|t| t.kind == kind) else {
        // An owner of a kind this server does not serve cannot be checked: keep the dependent.
        return true;
    };
    let ns = if rt.namespaced { dependent_ns } else { None };
    api.get(rt, ns, name).is_ok_and(|o| meta(&o, "uid").and_then(Value::as_str) == Some(uid))
}

/// Applies `edit` to the live object as the server, re-reading on a conflict (controllers
/// write the same objects concurrently). Returns whether it got written (or was gone).
fn edit_with_retry(api: &Api, rt: &ResourceType, object: &Value, edit: impl Fn(&mut Value)) -> bool {
    let (name, ns) = name_ns(object);
    for _ in 0..8 {
        let Ok(mut live) = api.get(rt, ns.as_deref(), &name) else { return true };
        if meta(&live, "uid") != meta(object, "uid") {
            return true;
        }
        edit(&mut live);
        match api.system_update(rt, live) {
            Ok(_) => return true,
            Err(e) if e.code == 409 => continue,
            Err(e) if e.code == 404 => return true,
            Err(e) => {
                tracing::debug!(error = %e, %name, "garbage collection update retried next sweep");
                return false;
            }
        }
    }
    false
}

fn remove_finalizer(api: &Api, rt: &ResourceType, object: &Value, finalizer: &str) {
    edit_with_retry(api, rt, object, |live| {
        if let Some(Value::Array(f)) = live.get_mut("metadata").and_then(|m| m.get_mut("finalizers")) {
            f.retain(|x| x != finalizer);
        }
    });
}

fn delete(api: &Api, rt: &ResourceType, object: &Value, propagation: Propagation) {
    let (name, ns) = name_ns(object);
    let options = DeleteOptions {
        propagation,
        uid: meta(object, "uid").and_then(Value::as_str).map(String::from),
        resource_version: None,
    };
    if let Err(e) = api.delete(rt, ns.as_deref(), &name, &options, &WriteOptions::system())
        && e.code != 404
    {
        tracing::debug!(error = %e, %name, "garbage collection delete retried next sweep");
    }
}

/// One pass over every object.
pub fn sweep(api: &Api) {
    let objects = api.all_objects();
    let mut by_owner: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (_, object)) in objects.iter().enumerate() {
        for uid in owner_uids(object) {
            by_owner.entry(uid).or_default().push(i);
        }
    }
    let now = jiff::Timestamp::now();
    for (rt, object) in &objects {
        let uid = meta(object, "uid").and_then(Value::as_str).unwrap_or("");
        let dependents = by_owner.get(uid).map(Vec::as_slice).unwrap_or(&[]);
        let terminating = meta(object, "deletionTimestamp").is_some();
        if terminating && rt.kind == "Namespace" && rt.group.is_empty() {
            terminate_namespace(api, &objects, object);
            continue;
        }
        if terminating && has_finalizer(object, "orphan") {
            // The owner may only go once every dependent is free of it; otherwise the next
            // sweep would find the dependents ownerless and collect them.
            let all_stripped = dependents.iter().all(|&d| {
                let (drt, dependent) = &objects[d];
                edit_with_retry(api, drt, dependent, |object| {
                    if let Some(Value::Array(refs)) =
                        object.get_mut("metadata").and_then(|m| m.get_mut("ownerReferences"))
                    {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
                    }
                })
            });
            if all_stripped {
                remove_finalizer(api, rt, object, "orphan");
            }
            continue;
        }
        if terminating && has_finalizer(object, "foregroundDeletion") {
            let mut blocking = false;
            for &d in dependents {
                let (drt, dependent) = &objects[d];
                if meta(dependent, "deletionTimestamp").is_none() {
                    delete(api, drt, dependent, Propagation::Foreground);
                }
                // Only dependents that say so hold the owner back.
                let blocks =
                    meta(dependent, "ownerReferences").and_then(Value::as_array).is_some_and(|refs| {
                        refs.iter().any(|r| {
                            r.get("uid").and_then(Value::as_str) == Some(uid)
                                && r.get("blockOwnerDeletion") == Some(&Value::Bool(true))
                        })
                    });
                blocking |= blocks;
            }
            if !blocking {
                remove_finalizer(api, rt, object, "foregroundDeletion");
            }
            continue;
        }
        if rt.kind == "Event" && rt.group.is_empty() {
            // The TTL runs from the last write (creation or the newest managedFields time),
            // not from the timestamps the reporter put in the event.
            let written = meta(object, "managedFields")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| e.get("time").and_then(Value::as_str))
                .chain(meta(object, "creationTimestamp").and_then(Value::as_str))
                .filter_map(|t| t.parse::<jiff::Timestamp>().ok())
                .max();
            let stamp = written;
            if let Some(t) = stamp
                && now.duration_since(t).unsigned_abs() > EVENT_TTL
                && t < now
            {
                let (name, ns) = name_ns(object);
                let _ = api.remove(rt, ns.as_deref(), &name);
            }
        }
    }
    // Dependents whose owners are gone.
    for (rt, object) in &objects {
        let Some(refs) = meta(object, "ownerReferences").and_then(Value::as_array) else { continue };
        if meta(object, "deletionTimestamp").is_some() {
            continue;
        }
        let (_, ns) = name_ns(object);
        let uids: Vec<&str> = refs.iter().filter_map(|r| r.get("uid").and_then(Value::as_str)).collect();
        // An owner counts only in the dependent's namespace or cluster-scoped.
        let alive_in_snapshot = |u: &str| {
            objects.iter().any(|(ort, o)| {
                meta(o, "uid").and_then(Value::as_str) == Some(u)
                    && (!ort.namespaced || meta(o, "namespace").and_then(Value::as_str) == ns.as_deref())
            })
        };
        if uids.iter().all(|u| alive_in_snapshot(u)) {
            continue;
        }
        let alive: Vec<bool> = refs.iter().map(|r| owner_alive(api, ns.as_deref(), r)).collect();
        if alive.iter().all(|a| !a) {
            delete(api, rt, object, Propagation::Background);
        } else if alive.iter().any(|a| !a) {
            let dangling: Vec<Value> = refs
                .iter()
                .zip(&alive)
                .filter(|(_, a)| !**a)
                .filter_map(|(r, _)| r.get("uid").cloned())
                .collect();
            edit_with_retry(api, rt, object, |live| {
                if let Some(Value::Array(refs)) =
                    live.get_mut("metadata").and_then(|m| m.get_mut("ownerReferences"))
                {
                    refs.retain(|r| !r.get("uid").is_some_and(|u| dangling.contains(u)));
                }
            });
        }
    }
}

fn terminate_namespace(api: &Api, objects: &[(ResourceType, Value)], namespace: &Value) {
    let (ns_name, _) = name_ns(namespace);
    let mut remaining = 0;
    for (rt, object) in objects {
        if !rt.namespaced || meta(object, "namespace").and_then(Value::as_str) != Some(ns_name.as_str()) {
            continue;
        }
        remaining += 1;
        if meta(object, "deletionTimestamp").is_none() {
            delete(api, rt, object, Propagation::Background);
        }
    }
    if remaining == 0 {
        let registry = api.registry();
        let rt = registry.get("", "v1", "namespaces").expect("built in");
        if let Err(e) = api.remove(rt, None, &ns_name) {
            tracing::warn!(error = %e, namespace = %ns_name, "namespace removal failed");
        }
    }
}
