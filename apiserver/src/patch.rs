//! The three PATCH bodies the server applies itself (server-side apply lives elsewhere): JSON patch
//! (RFC 6902), JSON merge patch (RFC 7386) and strategic merge patch for the built-in kinds. Each is a
//! pure function from the stored object and the request body to the new object; the caller maps
//! [`PatchError`] to a Status (400 or 422).
//!
//! RFC 6902 is written by hand rather than wrapped around the `json-patch` crate: the Go apiserver's
//! rules (`test` with `value: null` matching a missing path, numbers compared by value) are simpler to
//! get exactly right in ~150 lines than to recover from another crate's errors after the fact.

use serde_json::{Map, Value};

use crate::resources::{ListType, ResourceType};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatchError {
    /// Malformed patch document (not JSON, wrong shape, bad op) -> the server answers 400 BadRequest.
    #[error("{0}")]
    Malformed(String),
    /// The patch could not be applied (failed `test`, missing path for remove/replace, index out of
    /// range) -> 422 Invalid.
    #[error("{0}")]
    Failed(String),
}

fn malformed(message: impl Into<String>) -> PatchError {
    PatchError::Malformed(message.into())
}

fn failed(message: impl Into<String>) -> PatchError {
    PatchError::Failed(message.into())
}

/// RFC 6902 JSON patch with evanphx/json-patch semantics (Go's apiserver); see the module docs.
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Array(ops) = patch else {
        return Err(malformed("a JSON patch must be a JSON array of operations"));
    };
    // Decoding every operation first makes a malformed patch a 400 even when an earlier op would fail.
    let ops = ops.iter().map(Operation::parse).collect::<Result<Vec<_>, _>>()?;
    // Working on a copy is what makes the patch atomic: a failure part-way leaves `doc` as it was.
    let mut out = doc.clone();
    for op in &ops {
        op.apply(&mut out)?;
    }
    Ok(out)
}

/// A JSON pointer (RFC 6901), kept with its text for error messages.
#[derive(Debug)]
struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    fn parse(text: &str) -> Result<Pointer, PatchError> {
        let tokens = match text.strip_prefix('/') {
            None if text.is_empty() => Vec::new(),
            None => return Err(malformed(format!("invalid JSON pointer {text:?}: it must start with '/'"))),
            Some(rest) => rest
                .split('/')
                .map(|raw| {
                    unescape_token(raw).ok_or_else(|| {
                        malformed(format!(
                            "invalid JSON pointer {text:?}: '~' must be followed by '0' or '1'"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Pointer { text: text.to_string(), tokens })
    }

    /// The parent's tokens and the last token; `None` for the whole document.
    fn split(&self) -> Option<(&[String], &str)> {
        self.tokens.split_last().map(|(last, parent)| (parent, last.as_str()))
    }
}

fn unescape_token(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '~' => match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// An RFC 6901 array index: digits without a leading zero (`-` is handled by `add` alone).
fn array_index(token: &str) -> Option<usize> {
    let canonical = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    if canonical { token.parse().ok() } else { None }
}

fn get<'a>(doc: &'a Value, tokens: &[String]) -> Option<&'a Value> {
    tokens.iter().try_fold(doc, |node, token| match node {
        Value::Object(map) => map.get(token),
        Value::Array(items) => array_index(token).and_then(|i| items.get(i)),
        _ => None,
    })
}

fn get_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Option<&'a mut Value> {
    tokens.iter().try_fold(doc, |node, token| match node {
        Value::Object(map) => map.get_mut(token),
        Value::Array(items) => array_index(token).and_then(|i| items.get_mut(i)),
        _ => None,
    })
}

#[derive(Debug)]
enum Op {
    Add(Value),
    Remove,
    Replace(Value),
    Move(Pointer),
    Copy(Pointer),
    Test(Value),
}

#[derive(Debug)]
struct Operation {
    op: Op,
    path: Pointer,
}

impl Operation {
    fn parse(raw: &Value) -> Result<Operation, PatchError> {
        let Value::Object(fields) = raw else {
            return Err(malformed("each JSON patch operation must be a JSON object"));
        };
        let name = fields
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("a JSON patch operation has no \"op\" string"))?;
        let pointer = |field: &str| {
            fields
                .get(field)
                .and_then(Value::as_str)
                .ok_or_else(|| malformed(format!("the {name} operation has no \"{field}\" string")))
                .and_then(Pointer::parse)
        };
        let value = || {
            fields
                .get("value")
                .cloned()
                .ok_or_else(|| malformed(format!("the {name} operation has no \"value\"")))
        };
        let op = match name {
            "add" => Op::Add(value()?),
            "remove" => Op::Remove,
            "replace" => Op::Replace(value()?),
            "move" => Op::Move(pointer("from")?),
            "copy" => Op::Copy(pointer("from")?),
            // evanphx reads an absent value as null, so a bare test also means "missing or null".
            "test" => Op::Test(fields.get("value").cloned().unwrap_or(Value::Null)),
            other => return Err(malformed(format!("unknown JSON patch operation {other:?}"))),
        };
        Ok(Operation { op, path: pointer("path")? })
    }

    fn apply(&self, doc: &mut Value) -> Result<(), PatchError> {
        let path = &self.path;
        match &self.op {
            Op::Add(value) => add(doc, path, value.clone()),
            Op::Remove => remove(doc, path).map(drop),
            Op::Replace(value) => {
                let target = get_mut(doc, &path.tokens)
                    .ok_or_else(|| failed(format!("replace: path {} does not exist", path.text)))?;
                *target = value.clone();
                Ok(())
            }
            Op::Move(from) => {
                if path.tokens.len() > from.tokens.len() && path.tokens.starts_with(&from.tokens) {
                    return Err(failed(format!(
                        "move: cannot move {} into its own child {}",
                        from.text, path.text
                    )));
                }
                let value = remove(doc, from)?;
                add(doc, path, value)
            }
            Op::Copy(from) => {
                let value = get(doc, &from.tokens)
                    .cloned()
                    .ok_or_else(|| failed(format!("copy: path {} does not exist", from.text)))?;
                add(doc, path, value)
            }
            Op::Test(expected) => test(doc, path, expected),
        }
    }
}

fn add(doc: &mut Value, path: &Pointer, value: Value) -> Result<(), PatchError> {
    let Some((parent, last)) = path.split() else {
        *doc = value;
        return Ok(());
    };
    match get_mut(doc, parent) {
        Some(Value::Object(map)) => {
            map.insert(last.to_string(), value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if last == "-" {
                items.len()
            } else {
                array_index(last)
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| failed(format!("add: index {last:?} is out of range at {}", path.text)))?
            };
            items.insert(index, value);
            Ok(())
        }
        Some(_) => Err(failed(format!("add: the parent of {} is neither an object nor an array", path.text))),
        None => Err(failed(format!("add: the parent of {} does not exist", path.text))),
    }
}

fn remove(doc: &mut Value, path: &Pointer) -> Result<Value, PatchError> {
    let Some((parent, last)) = path.split() else {
        return Err(failed("remove: the whole document cannot be removed"));
    };
    let removed = match get_mut(doc, parent) {
        // shift_remove keeps the remaining keys in order; the default remove swaps the last key in.
        Some(Value::Object(map)) => map.shift_remove(last),
        Some(Value::Array(items)) => array_index(last).filter(|i| *i < items.len()).map(|i| items.remove(i)),
        _ => None,
    };
    removed.ok_or_else(|| failed(format!("remove: path {} does not exist", path.text)))
}

fn test(doc: &Value, path: &Pointer, expected: &Value) -> Result<(), PatchError> {
    let actual = match path.split() {
        None => Some(doc),
        Some((parent, last)) => match get(doc, parent) {
            Some(Value::Object(map)) => map.get(last),
            Some(Value::Array(items)) => {
                Some(array_index(last).and_then(|i| items.get(i)).ok_or_else(|| {
                    failed(format!("test: index {last:?} is out of range at {}", path.text))
                })?)
            }
            // Like evanphx, only the last segment may be missing; a missing parent fails even for null.
            _ => return Err(failed(format!("test: the parent of {} does not exist", path.text))),
        },
    };
    let matches = match actual {
        None => expected.is_null(),
        Some(actual) => json_eq(actual, expected),
    };
    if matches { Ok(()) } else { Err(failed(format!("test failed: the value at {} differs", path.text))) }
}

/// JSON equality as Go sees decoded JSON: numbers by value (`1 == 1.0`), object keys unordered.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let int =
                |n: &serde_json::Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
            match (int(x), int(y)) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// RFC 7386 JSON merge patch: null deletes, objects merge recursively, everything else (lists
/// included) replaces.
pub fn merge_patch(doc: &Value, patch: &Value) -> Value {
    let mut out = doc.clone();
    merge_in_place(&mut out, patch);
    out
}

fn merge_in_place(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.shift_remove(key);
            } else {
                merge_in_place(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

const PATCH_DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";

/// Only these exact spellings are directives: CRD schemas have real fields named `$ref` and `$schema`.
fn is_directive(key: &str) -> bool {
    key == PATCH_DIRECTIVE
        || key == RETAIN_KEYS
        || key.starts_with(SET_ELEMENT_ORDER)
        || key.starts_with(DELETE_FROM_PRIMITIVE_LIST)
}

/// Strategic merge patch for the built-in kinds: JSON merge semantics, except that lists merge by
/// `rt.list_type(path)` (Set = union keeping order, Map = merge items by key, Atomic = replace), and
/// the directives kubectl sends (`$patch`, `$setElementOrder/…`, `$deleteFromPrimitiveList/…`,
/// `$retainKeys`) are honoured. Directive keys never appear in the result; null deletes a key.
pub fn strategic_merge_patch(rt: &ResourceType, doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(malformed("a strategic merge patch must be a JSON object"));
    };
    let original = match doc {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    };
    merge_map(rt, &mut Vec::new(), original, patch).map(Value::Object)
}

fn list_type_at(rt: &ResourceType, path: &[String]) -> ListType {
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    match rt.list_type(&segments) {
        // A map list without keys cannot match items; replacing is the only sane reading.
        ListType::Map(keys) if keys.is_empty() => ListType::Atomic,
        other => other,
    }
}

fn merge_map(
    rt: &ResourceType,
    path: &mut Vec<String>,
    mut original: Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Map<String, Value>, PatchError> {
    match patch.get(PATCH_DIRECTIVE) {
        None => {}
        Some(Value::String(d)) if d == "replace" => {
            let mut rest = patch.clone();
            rest.shift_remove(PATCH_DIRECTIVE);
            // Merging into nothing drops nested directives and nulls the replacement may carry.
            return merge_map(rt, path, Map::new(), &rest);
        }
        Some(Value::String(d)) if d == "delete" => return Ok(Map::new()),
        Some(other) => return Err(malformed(format!("unknown $patch directive {other} in a map"))),
    }

    if let Some(retain) = patch.get(RETAIN_KEYS) {
        let keys: Vec<&str> = retain
            .as_array()
            .and_then(|items| items.iter().map(Value::as_str).collect())
            .ok_or_else(|| malformed("$retainKeys must be a list of field names"))?;
        if let Some((key, _)) =
            patch.iter().find(|(k, v)| !is_directive(k) && !v.is_null() && !keys.contains(&k.as_str()))
        {
            return Err(malformed(format!("$retainKeys does not list {key:?}, which the patch sets")));
        }
        // Patch keys are a subset of the list, so dropping before the merge equals dropping after.
        original.retain(|k, _| keys.contains(&k.as_str()));
    }

    // $setElementOrder orders against the live list as it was before this patch touched it.
    let mut orders = Vec::new();
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix(SET_ELEMENT_ORDER) {
            let order = value.as_array().ok_or_else(|| malformed(format!("{key} must be a list")))?;
            let live = original.get(field).and_then(Value::as_array).cloned().unwrap_or_default();
            orders.push((field, order, live));
        }
    }

    for (key, value) in patch {
        if is_directive(key) {
            continue;
        }
        if value.is_null() {
            original.shift_remove(key);
            continue;
        }
        let current = original.get_mut(key).map(Value::take);
        path.push(key.clone());
        let merged = merge_value(rt, path, current, value);
        path.pop();
        original.insert(key.clone(), merged?);
    }

    for (key, value) in patch {
        let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) else { continue };
        let doomed = value.as_array().ok_or_else(|| malformed(format!("{key} must be a list")))?;
        if let Some(Value::Array(items)) = original.get_mut(field) {
            items.retain(|item| !doomed.iter().any(|d| json_eq(d, item)));
        }
    }

    for (field, order, live) in orders {
        if let Some(Value::Array(items)) = original.get_mut(field) {
            path.push(field.to_string());
            let list_type = list_type_at(rt, path);
            path.pop();
            *items = reorder(std::mem::take(items), order, &live, &list_type)?;
        }
    }
    Ok(original)
}

fn merge_value(
    rt: &ResourceType,
    path: &mut Vec<String>,
    current: Option<Value>,
    patch: &Value,
) -> Result<Value, PatchError> {
    match (current, patch) {
        (Some(Value::Object(current)), Value::Object(patch)) => {
            merge_map(rt, path, current, patch).map(Value::Object)
        }
        (Some(Value::Array(current)), Value::Array(patch)) => {
            merge_list(rt, path, current, patch).map(Value::Array)
        }
        // A new field, or one whose type changes: take the patch value minus the directives it carries.
        (_, Value::Object(patch)) => merge_map(rt, path, Map::new(), patch).map(Value::Object),
        (_, Value::Array(patch)) => merge_list(rt, path, Vec::new(), patch).map(Value::Array),
        (_, scalar) => Ok(scalar.clone()),
    }
}

fn merge_list(
    rt: &ResourceType,
    path: &mut Vec<String>,
    original: Vec<Value>,
    patch: &[Value],
) -> Result<Vec<Value>, PatchError> {
    let list_type = list_type_at(rt, path);
    let mut replace = false;
    let mut deletes = Vec::new();
    let mut items = Vec::new();
    for item in patch {
        match item.get(PATCH_DIRECTIVE) {
            None => items.push(item),
            Some(Value::String(d)) if d == "replace" => replace = true,
            Some(Value::String(d)) if d == "delete" => deletes.push(item),
            Some(other) => return Err(malformed(format!("unknown $patch directive {other} in a list item"))),
        }
    }

    path.push("[]".to_string());
    let merged = match &list_type {
        // The patch list is the new value; `$patch` items have nothing to act on and are dropped.
        ListType::Atomic => clean_items(rt, path, &items),
        ListType::Set => {
            if !deletes.is_empty() {
                return Err(malformed(format!(
                    "$patch: delete needs a merge key; {} is a set, use $deleteFromPrimitiveList",
                    path[..path.len() - 1].join(".")
                )));
            }
            let base = if replace { Vec::new() } else { original };
            clean_items(rt, path, &items).map(|additions| {
                let mut out: Vec<Value> = Vec::with_capacity(base.len() + additions.len());
                for item in base.into_iter().chain(additions) {
                    if !out.iter().any(|seen| json_eq(seen, &item)) {
                        out.push(item);
                    }
                }
                out
            })
        }
        ListType::Map(keys) => {
            merge_map_list(rt, path, keys, if replace { Vec::new() } else { original }, &items, &deletes)
        }
    };
    path.pop();
    merged
}

fn clean_items(
    rt: &ResourceType,
    path: &mut Vec<String>,
    items: &[&Value],
) -> Result<Vec<Value>, PatchError> {
    items.iter().map(|item| merge_value(rt, path, None, item)).collect()
}

static NULL: Value = Value::Null;

/// The merge-key values of a list-map item; `None` when it is not an object or has none of the keys.
fn merge_key<'v>(item: &'v Value, keys: &[String]) -> Option<Vec<&'v Value>> {
    let object = item.as_object()?;
    let values: Vec<&Value> = keys.iter().map(|k| object.get(k).unwrap_or(&NULL)).collect();
    if values.iter().all(|v| v.is_null()) { None } else { Some(values) }
}

fn same_key(a: &[&Value], b: &[&Value]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| json_eq(x, y))
}

fn merge_map_list(
    rt: &ResourceType,
    path: &mut Vec<String>,
    keys: &[String],
    mut base: Vec<Value>,
    items: &[&Value],
    deletes: &[&Value],
) -> Result<Vec<Value>, PatchError> {
    let field = path[..path.len() - 1].join(".");
    let no_key = || malformed(format!("items of {field} must be objects with merge key {}", keys.join(",")));
    for doomed in deletes {
        let key = merge_key(doomed, keys).ok_or_else(no_key)?;
        base.retain(|item| merge_key(item, keys).is_none_or(|k| !same_key(&k, &key)));
    }
    for item in items {
        let Value::Object(patch) = item else { return Err(no_key()) };
        let key = merge_key(item, keys).ok_or_else(no_key)?;
        let existing = base.iter().position(|live| merge_key(live, keys).is_some_and(|k| same_key(&k, &key)));
        match existing {
            Some(index) => {
                let live = match base[index].take() {
                    Value::Object(live) => live,
                    _ => Map::new(),
                };
                base[index] = Value::Object(merge_map(rt, path, live, patch)?);
            }
            None => base.push(Value::Object(merge_map(rt, path, Map::new(), patch)?)),
        }
    }
    Ok(base)
}

/// Applies `$setElementOrder`: items it names come in its order; items only the server has keep
/// their place relative to the live list, as apimachinery's `normalizeElementOrder` does.
fn reorder(
    merged: Vec<Value>,
    order: &[Value],
    live: &[Value],
    list_type: &ListType,
) -> Result<Vec<Value>, PatchError> {
    let identity = |item: &Value| -> Value {
        match list_type {
            ListType::Map(keys) => {
                Value::Array(keys.iter().map(|k| item.get(k).cloned().unwrap_or_default()).collect())
            }
            _ => item.clone(),
        }
    };
    if let ListType::Map(keys) = list_type
        && order.iter().any(|o| merge_key(o, keys).is_none())
    {
        return Err(malformed(format!(
            "$setElementOrder items must be objects with merge key {}",
            keys.join(",")
        )));
    }
    let order_ids: Vec<Value> = order.iter().map(identity).collect();
    let live_ids: Vec<Value> = live.iter().map(identity).collect();
    let position = |ids: &[Value], id: &Value| ids.iter().position(|x| json_eq(x, id));

    let (mut ordered, mut server_only): (Vec<_>, Vec<_>) = merged
        .into_iter()
        .map(|item| (identity(&item), item))
        .partition(|(id, _)| position(&order_ids, id).is_some());
    ordered.sort_by_key(|(id, _)| position(&order_ids, id));
    server_only.sort_by_key(|(id, _)| position(&live_ids, id).unwrap_or(usize::MAX));

    let mut out = Vec::with_capacity(ordered.len() + server_only.len());
    let mut left = server_only.into_iter().peekable();
    let mut right = ordered.into_iter().peekable();
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (Some((l, _)), Some((r, _))) => {
                matches!((position(&live_ids, l), position(&live_ids, r)), (Some(a), Some(b)) if a < b)
            }
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = if take_left { left.next() } else { right.next() };
        out.extend(next.map(|(_, item)| item));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resources::builtins;

    fn builtin(kind: &str) -> ResourceType {
        builtins().into_iter().find(|t| t.kind == kind).expect("builtin exists")
    }

    fn no_directives(value: &Value) -> bool {
        match value {
            Value::Object(map) => map.iter().all(|(k, v)| !is_directive(k) && no_directives(v)),
            Value::Array(items) => items.iter().all(no_directives),
            _ => true,
        }
    }

    fn vm() -> Value {
        json!({
            "apiVersion": "kpve.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "namespace": "default", "resourceVersion": "7"},
            "spec": {"cores": 2, "disks": [{"name": "root", "size": "10Gi"}]}
        })
    }

    // ---- JSON patch: the kube-rs finalizer helper (compat doc 2.3) ----

    #[test]
    fn finalizer_add_on_object_without_finalizers() {
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["kpve.io/cleanup"]}
        ]);
        let out = json_patch(&vm(), &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["kpve.io/cleanup"]));
        assert_eq!(out["spec"], vm()["spec"]);
    }

    #[test]
    fn finalizer_add_when_other_finalizers_exist() {
        let mut doc = vm();
        doc["metadata"]["finalizers"] = json!(["other.io/x"]);
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": ["other.io/x"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "kpve.io/cleanup"}
        ]);
        let out = json_patch(&doc, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["other.io/x", "kpve.io/cleanup"]));
    }

    #[test]
    fn finalizer_cleanup_removes_by_index_after_test() {
        let mut doc = vm();
        doc["metadata"]["finalizers"] = json!(["other.io/x", "kpve.io/cleanup"]);
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": "kpve.io/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/1"}
        ]);
        let out = json_patch(&doc, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["other.io/x"]));

        // A concurrent writer reordered the list: the test guards the remove and the patch fails.
        doc["metadata"]["finalizers"] = json!(["kpve.io/cleanup", "other.io/x"]);
        let err = json_patch(&doc, &patch).unwrap_err();
        assert!(matches!(err, PatchError::Failed(_)), "{err:?}");
    }

    #[test]
    fn test_null_fails_on_present_value_and_leaves_doc_unchanged() {
        let mut doc = vm();
        doc["metadata"]["finalizers"] = json!(["a"]);
        let before = doc.clone();
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}
        ]);
        assert_eq!(
            json_patch(&doc, &patch),
            Err(PatchError::Failed("test failed: the value at /metadata/finalizers differs".into()))
        );
        assert_eq!(doc, before);
    }

    #[test]
    fn test_null_matches_explicit_null_and_absent_value_field() {
        let doc = json!({"metadata": {"finalizers": null}});
        assert!(
            json_patch(&doc, &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}])).is_ok()
        );
        // No "value" at all reads as null, as in evanphx.
        assert!(
            json_patch(&json!({"metadata": {}}), &json!([{"op": "test", "path": "/metadata/finalizers"}]))
                .is_ok()
        );
        // A non-null expectation against a missing path fails.
        let err =
            json_patch(&json!({"metadata": {}}), &json!([{"op": "test", "path": "/metadata/x", "value": 1}]));
        assert!(matches!(err, Err(PatchError::Failed(_))));
    }

    #[test]
    fn test_with_missing_parent_fails_even_for_null() {
        let err =
            json_patch(&json!({}), &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]));
        assert!(matches!(err, Err(PatchError::Failed(_))), "{err:?}");
    }

    #[test]
    fn test_compares_numbers_by_value_and_objects_unordered() {
        let doc = json!({"a": 1, "b": {"x": 1.5, "y": [1, 2]}, "c": 10000000000u64});
        let patch = json!([
            {"op": "test", "path": "/a", "value": 1.0},
            {"op": "test", "path": "/b", "value": {"y": [1.0, 2], "x": 1.5}},
            {"op": "test", "path": "/c", "value": 1e10}
        ]);
        assert_eq!(json_patch(&doc, &patch).unwrap(), doc);
        let wrong = json!([{"op": "test", "path": "/a", "value": "1"}]);
        assert!(matches!(json_patch(&doc, &wrong), Err(PatchError::Failed(_))));
        let wrong = json!([{"op": "test", "path": "/b", "value": {"x": 1.5}}]);
        assert!(matches!(json_patch(&doc, &wrong), Err(PatchError::Failed(_))));
    }

    #[test]
    fn failure_midway_is_atomic() {
        let doc = vm();
        let before = doc.clone();
        let patch = json!([
            {"op": "replace", "path": "/spec/cores", "value": 8},
            {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
            {"op": "remove", "path": "/spec/missing"}
        ]);
        assert_eq!(
            json_patch(&doc, &patch),
            Err(PatchError::Failed("remove: path /spec/missing does not exist".into()))
        );
        assert_eq!(doc, before);
    }

    #[test]
    fn pointer_escapes() {
        let doc = json!({"metadata": {"annotations": {"a/b": "1", "m~n": "2"}}});
        let patch = json!([
            {"op": "test", "path": "/metadata/annotations/a~1b", "value": "1"},
            {"op": "replace", "path": "/metadata/annotations/m~0n", "value": "3"},
            {"op": "add", "path": "/metadata/annotations/kpve.io~1owner", "value": "x"},
            {"op": "add", "path": "/metadata/annotations/~01", "value": "tilde-one"}
        ]);
        let out = json_patch(&doc, &patch).unwrap();
        assert_eq!(
            out["metadata"]["annotations"],
            json!({"a/b": "1", "m~n": "3", "kpve.io/owner": "x", "~1": "tilde-one"})
        );
        let bad = json!([{"op": "add", "path": "/a~2", "value": 1}]);
        assert!(matches!(json_patch(&doc, &bad), Err(PatchError::Malformed(_))));
        let bad = json!([{"op": "add", "path": "/a~", "value": 1}]);
        assert!(matches!(json_patch(&doc, &bad), Err(PatchError::Malformed(_))));
    }

    #[test]
    fn add_to_missing_parent_fails() {
        let patch = json!([{"op": "add", "path": "/metadata/labels/app", "value": "web"}]);
        assert_eq!(
            json_patch(&vm(), &patch),
            Err(PatchError::Failed("add: the parent of /metadata/labels/app does not exist".into()))
        );
        let patch = json!([{"op": "add", "path": "/spec/cores/x", "value": 1}]);
        assert!(matches!(json_patch(&vm(), &patch), Err(PatchError::Failed(_))));
    }

    #[test]
    fn remove_and_replace_need_an_existing_path() {
        for op in ["remove", "replace"] {
            let patch = json!([{"op": op, "path": "/metadata/labels", "value": {}}]);
            assert!(matches!(json_patch(&vm(), &patch), Err(PatchError::Failed(_))), "{op}");
        }
        let patch = json!([{"op": "remove", "path": ""}]);
        assert!(matches!(json_patch(&vm(), &patch), Err(PatchError::Failed(_))));
    }

    #[test]
    fn array_indices() {
        let doc = json!({"l": ["a", "b"]});
        let ok = |patch: Value| json_patch(&doc, &patch).unwrap()["l"].clone();
        assert_eq!(ok(json!([{"op": "add", "path": "/l/-", "value": "c"}])), json!(["a", "b", "c"]));
        assert_eq!(ok(json!([{"op": "add", "path": "/l/2", "value": "c"}])), json!(["a", "b", "c"]));
        assert_eq!(ok(json!([{"op": "add", "path": "/l/0", "value": "z"}])), json!(["z", "a", "b"]));
        assert_eq!(ok(json!([{"op": "replace", "path": "/l/1", "value": "B"}])), json!(["a", "B"]));
        assert_eq!(ok(json!([{"op": "remove", "path": "/l/0"}])), json!(["b"]));
        for path in ["/l/3", "/l/01", "/l/-1", "/l/x"] {
            let patch = json!([{"op": "add", "path": path, "value": "c"}]);
            assert!(matches!(json_patch(&doc, &patch), Err(PatchError::Failed(_))), "{path}");
        }
        for (op, path) in [("remove", "/l/2"), ("replace", "/l/-"), ("test", "/l/5")] {
            let patch = json!([{"op": op, "path": path, "value": "a"}]);
            assert!(matches!(json_patch(&doc, &patch), Err(PatchError::Failed(_))), "{op} {path}");
        }
    }

    #[test]
    fn move_and_copy() {
        let doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2, 3]});
        let patch = json!([
            {"op": "move", "from": "/a/b", "path": "/moved"},
            {"op": "copy", "from": "/a", "path": "/l/1"},
            {"op": "move", "from": "/l/0", "path": "/l/-"}
        ]);
        assert_eq!(
            json_patch(&doc, &patch).unwrap(),
            json!({"a": {"c": 2}, "l": [{"c": 2}, 2, 3, 1], "moved": 1})
        );
        let into_child = json!([{"op": "move", "from": "/a", "path": "/a/b/c"}]);
        assert!(matches!(json_patch(&doc, &into_child), Err(PatchError::Failed(_))));
        let missing = json!([{"op": "copy", "from": "/nope", "path": "/x"}]);
        assert!(matches!(json_patch(&doc, &missing), Err(PatchError::Failed(_))));
        let same = json!([{"op": "move", "from": "/a", "path": "/a"}]);
        assert_eq!(json_patch(&doc, &same).unwrap(), doc);
    }

    #[test]
    fn whole_document_add_and_replace() {
        let patch = json!([
            {"op": "replace", "path": "", "value": {"x": 1}},
            {"op": "add", "path": "/y", "value": 2}
        ]);
        assert_eq!(json_patch(&vm(), &patch).unwrap(), json!({"x": 1, "y": 2}));
        let patch = json!([{"op": "add", "path": "", "value": [1]}]);
        assert_eq!(json_patch(&vm(), &patch).unwrap(), json!([1]));
    }

    #[test]
    fn malformed_patches() {
        let cases = [
            (json!({"op": "add"}), "a JSON patch must be a JSON array of operations"),
            (json!(["add"]), "each JSON patch operation must be a JSON object"),
            (json!([{"path": "/a"}]), "a JSON patch operation has no \"op\" string"),
            (json!([{"op": "frobnicate", "path": "/a"}]), "unknown JSON patch operation \"frobnicate\""),
            (json!([{"op": "add", "value": 1}]), "the add operation has no \"path\" string"),
            (json!([{"op": "add", "path": "/a"}]), "the add operation has no \"value\""),
            (json!([{"op": "replace", "path": "/a"}]), "the replace operation has no \"value\""),
            (json!([{"op": "move", "path": "/a"}]), "the move operation has no \"from\" string"),
            (
                json!([{"op": "add", "path": "a", "value": 1}]),
                "invalid JSON pointer \"a\": it must start with '/'",
            ),
        ];
        for (patch, message) in cases {
            assert_eq!(json_patch(&vm(), &patch), Err(PatchError::Malformed(message.into())), "{patch}");
        }
        // Malformed wins over a failing earlier op: the whole body is decoded first.
        let patch = json!([{"op": "remove", "path": "/nope"}, {"op": "bogus", "path": "/a"}]);
        assert!(matches!(json_patch(&vm(), &patch), Err(PatchError::Malformed(_))));
    }

    #[test]
    fn rfc6902_appendix_a() {
        let cases = [
            // A.1 .. A.10, A.16
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux"}]),
                json!({"baz": "qux", "foo": "bar"}),
            ),
            (
                json!({"foo": ["bar", "baz"]}),
                json!([{"op": "add", "path": "/foo/1", "value": "qux"}]),
                json!({"foo": ["bar", "qux", "baz"]}),
            ),
            (
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "remove", "path": "/baz"}]),
                json!({"foo": "bar"}),
            ),
            (
                json!({"foo": ["bar", "qux", "baz"]}),
                json!([{"op": "remove", "path": "/foo/1"}]),
                json!({"foo": ["bar", "baz"]}),
            ),
            (
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "replace", "path": "/baz", "value": "boo"}]),
                json!({"baz": "boo", "foo": "bar"}),
            ),
            (
                json!({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}),
                json!([{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]),
                json!({"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
            ),
            (
                json!({"foo": ["all", "grass", "cows", "eat"]}),
                json!([{"op": "move", "from": "/foo/1", "path": "/foo/3"}]),
                json!({"foo": ["all", "cows", "eat", "grass"]}),
            ),
            (
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
                json!([
                    {"op": "test", "path": "/baz", "value": "qux"},
                    {"op": "test", "path": "/foo/1", "value": 2}
                ]),
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
            ),
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/child", "value": {"grandchild": {}}}]),
                json!({"foo": "bar", "child": {"grandchild": {}}}),
            ),
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}]),
                json!({"foo": "bar", "baz": "qux"}),
            ),
            (
                json!({"foo": ["bar"]}),
                json!([{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]),
                json!({"foo": ["bar", ["abc", "def"]]}),
            ),
            // A.14: ~ escapes; A.15 compares numbers and strings strictly.
            (
                json!({"/": 9, "~1": 10}),
                json!([{"op": "test", "path": "/~01", "value": 10}]),
                json!({"/": 9, "~1": 10}),
            ),
        ];
        for (doc, patch, expected) in cases {
            assert_eq!(json_patch(&doc, &patch).unwrap(), expected, "{patch}");
        }
        let failing = [
            (json!({"baz": "qux"}), json!([{"op": "test", "path": "/baz", "value": "bar"}])),
            (json!({"foo": "bar"}), json!([{"op": "add", "path": "/baz/bat", "value": "qux"}])),
            (json!({"/": 9, "~1": 10}), json!([{"op": "test", "path": "/~01", "value": "10"}])),
        ];
        for (doc, patch) in failing {
            assert!(matches!(json_patch(&doc, &patch), Err(PatchError::Failed(_))), "{patch}");
        }
    }

    #[test]
    fn json_patch_keeps_key_order() {
        let doc = json!({"a": 1, "b": 2, "c": 3});
        let out = json_patch(
            &doc,
            &json!([{"op": "remove", "path": "/a"}, {"op": "replace", "path": "/b", "value": 9}]),
        )
        .unwrap();
        assert_eq!(out.as_object().unwrap().keys().collect::<Vec<_>>(), ["b", "c"]);
    }

    // ---- JSON merge patch ----

    #[test]
    fn rfc7386_appendix_a() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": "b", "b": "c"}), json!({"a": null}), json!({"b": "c"})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (json!({"a": {"b": "c"}}), json!({"a": {"b": "d", "c": null}}), json!({"a": {"b": "d"}})),
            (json!({"a": [{"b": "c"}]}), json!({"a": [1]}), json!({"a": [1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!([1, 2]), json!({"a": "b", "c": null}), json!({"a": "b"})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
        ];
        for (doc, patch, expected) in cases {
            assert_eq!(merge_patch(&doc, &patch), expected, "{doc} + {patch}");
        }
    }

    #[test]
    fn merge_patch_events_series_update_and_key_order() {
        let event = json!({
            "metadata": {"name": "vm1.abc", "namespace": "default"},
            "reason": "Started",
            "note": "started",
            "series": {"count": 2, "lastObservedTime": "t1"}
        });
        let out =
            merge_patch(&event, &json!({"series": {"count": 3, "lastObservedTime": "t2"}, "note": null}));
        assert_eq!(out["series"], json!({"count": 3, "lastObservedTime": "t2"}));
        assert_eq!(out.as_object().unwrap().keys().collect::<Vec<_>>(), ["metadata", "reason", "series"]);
        // The input stays untouched.
        assert_eq!(event["note"], "started");
    }

    // ---- strategic merge patch ----

    fn namespace() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "team-a",
                "labels": {"team": "a", "tier": "gold"},
                "finalizers": ["a.io/one", "b.io/two"],
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u1"},
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "y", "uid": "u2", "controller": true}
                ]
            },
            "spec": {"finalizers": ["kubernetes"]}
        })
    }

    fn smp(doc: &Value, patch: Value) -> Value {
        let out = strategic_merge_patch(&builtin("Namespace"), doc, &patch).unwrap();
        assert!(no_directives(&out), "directive left in {out}");
        out
    }

    #[test]
    fn smp_finalizers_are_a_union() {
        let out = smp(&namespace(), json!({"metadata": {"finalizers": ["c.io/three", "a.io/one"]}}));
        assert_eq!(out["metadata"]["finalizers"], json!(["a.io/one", "b.io/two", "c.io/three"]));
        // Everything else merges as JSON merge patch would.
        assert_eq!(out["metadata"]["labels"], namespace()["metadata"]["labels"]);
        let fresh = smp(&json!({"metadata": {"name": "n"}}), json!({"metadata": {"finalizers": ["x", "x"]}}));
        assert_eq!(fresh["metadata"]["finalizers"], json!(["x"]));
    }

    #[test]
    fn smp_owner_references_merge_by_uid() {
        let out = smp(
            &namespace(),
            json!({"metadata": {"ownerReferences": [
                {"uid": "u2", "name": "y2", "controller": null},
                {"apiVersion": "v1", "kind": "Secret", "name": "z", "uid": "u3"}
            ]}}),
        );
        assert_eq!(
            out["metadata"]["ownerReferences"],
            json!([
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u1"},
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "y2", "uid": "u2"},
                {"apiVersion": "v1", "kind": "Secret", "name": "z", "uid": "u3"}
            ])
        );
    }

    #[test]
    fn smp_patch_delete_on_a_list_map_item() {
        let out =
            smp(&namespace(), json!({"metadata": {"ownerReferences": [{"uid": "u1", "$patch": "delete"}]}}));
        assert_eq!(
            out["metadata"]["ownerReferences"],
            json!([namespace()["metadata"]["ownerReferences"][1]])
        );
        // Deleting an item that is not there is not an error.
        let out = smp(
            &namespace(),
            json!({"metadata": {"ownerReferences": [{"uid": "nope", "$patch": "delete"}]}}),
        );
        assert_eq!(out["metadata"]["ownerReferences"], namespace()["metadata"]["ownerReferences"]);
    }

    #[test]
    fn smp_patch_replace_on_a_list() {
        let out = smp(
            &namespace(),
            json!({"metadata": {"ownerReferences": [{"$patch": "replace"}, {"uid": "u9", "name": "only"}]}}),
        );
        assert_eq!(out["metadata"]["ownerReferences"], json!([{"uid": "u9", "name": "only"}]));
        let out = smp(&namespace(), json!({"metadata": {"finalizers": [{"$patch": "replace"}, "z"]}}));
        assert_eq!(out["metadata"]["finalizers"], json!(["z"]));
    }

    #[test]
    fn smp_patch_replace_and_delete_in_a_map() {
        let out = smp(
            &namespace(),
            json!({"metadata": {"labels": {"$patch": "replace", "new": "1", "gone": null}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"new": "1"}));
        let out = smp(&namespace(), json!({"metadata": {"labels": {"$patch": "delete"}}}));
        assert_eq!(out["metadata"]["labels"], json!({}));
        let out = smp(&namespace(), json!({"spec": {"$patch": "replace"}}));
        assert_eq!(out["spec"], json!({}));
    }

    #[test]
    fn smp_set_element_order_for_sets_and_maps() {
        // kubectl adds c and wants it first.
        let out = smp(
            &namespace(),
            json!({"metadata": {
                "$setElementOrder/finalizers": ["c.io/three", "a.io/one", "b.io/two"],
                "finalizers": ["c.io/three"]
            }}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["c.io/three", "a.io/one", "b.io/two"]));

        // Only a reorder of map items, keyed {uid: …}.
        let out = smp(
            &namespace(),
            json!({"metadata": {"$setElementOrder/ownerReferences": [{"uid": "u2"}, {"uid": "u1"}]}}),
        );
        let uids: Vec<&Value> =
            out["metadata"]["ownerReferences"].as_array().unwrap().iter().map(|o| &o["uid"]).collect();
        assert_eq!(uids, [&json!("u2"), &json!("u1")]);

        // Items the order list does not name keep their live position.
        let mut doc = namespace();
        doc["metadata"]["finalizers"] = json!(["a", "server-only", "b"]);
        let out = smp(&doc, json!({"metadata": {"$setElementOrder/finalizers": ["b", "a"]}}));
        assert_eq!(out["metadata"]["finalizers"], json!(["server-only", "b", "a"]));

        let bad = json!({"metadata": {"$setElementOrder/ownerReferences": ["u1"]}});
        assert!(matches!(
            strategic_merge_patch(&builtin("Namespace"), &namespace(), &bad),
            Err(PatchError::Malformed(_))
        ));
    }

    #[test]
    fn smp_delete_from_primitive_list_as_kubectl_sends_it() {
        // kubectl apply after b.io/two was dropped from the manifest.
        let out = smp(
            &namespace(),
            json!({"metadata": {
                "$deleteFromPrimitiveList/finalizers": ["b.io/two"],
                "$setElementOrder/finalizers": ["a.io/one"]
            }}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["a.io/one"]));
        let out = smp(
            &namespace(),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a.io/one", "nope"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["b.io/two"]));
        // Deleting from a list that is not there leaves it absent.
        let out = smp(
            &json!({"metadata": {}}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
        );
        assert_eq!(out, json!({"metadata": {}}));
    }

    #[test]
    fn smp_retain_keys() {
        let doc = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}});
        assert_eq!(smp(&doc, patch), json!({"spec": {"strategy": {"type": "Recreate"}}}));
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "other": 1}}});
        assert_eq!(
            strategic_merge_patch(&builtin("Namespace"), &doc, &patch),
            Err(PatchError::Malformed("$retainKeys does not list \"other\", which the patch sets".into()))
        );
        let patch = json!({"spec": {"$retainKeys": "type"}});
        assert!(matches!(
            strategic_merge_patch(&builtin("Namespace"), &doc, &patch),
            Err(PatchError::Malformed(_))
        ));
    }

    #[test]
    fn smp_null_deletes_and_atomic_lists_replace() {
        let out = smp(
            &namespace(),
            json!({
                "metadata": {"labels": {"tier": null, "new": "x"}, "ownerReferences": null},
                "spec": {"finalizers": ["other"]}
            }),
        );
        assert_eq!(out["metadata"]["labels"], json!({"team": "a", "new": "x"}));
        assert!(out["metadata"].get("ownerReferences").is_none());
        // Namespace spec.finalizers is atomic: replaced, not merged.
        assert_eq!(out["spec"]["finalizers"], json!(["other"]));
        // Nulls for absent keys vanish rather than being stored.
        let out = smp(&json!({}), json!({"metadata": {"labels": {"a": null, "b": "1"}}}));
        assert_eq!(out, json!({"metadata": {"labels": {"b": "1"}}}));
    }

    #[test]
    fn smp_kubectl_client_side_apply_of_a_lease() {
        let lease_type = builtin("Lease");
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "kpve-controller", "namespace": "kpve-system", "resourceVersion": "42"},
            "spec": {
                "holderIdentity": "a",
                "leaseDurationSeconds": 15,
                "renewTime": "2026-01-01T00:00:00.000000Z"
            }
        });
        let patch = json!({
            "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"holderIdentity": "b", "renewTime": null}
        });
        let out = strategic_merge_patch(&lease_type, &lease, &patch).unwrap();
        assert_eq!(out["spec"], json!({"holderIdentity": "b", "leaseDurationSeconds": 15}));
        assert_eq!(out["metadata"]["resourceVersion"], "42");
        assert_eq!(out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"], "{}");
    }

    #[test]
    fn smp_new_fields_are_cleaned_of_directives() {
        let out = smp(
            &json!({"metadata": {"name": "n"}}),
            json!({"metadata": {
                "ownerReferences": [{"uid": "u1", "name": "a"}, {"uid": "u2", "$patch": "delete"}],
                "labels": {"$retainKeys": ["a"], "a": "1"},
                "$setElementOrder/finalizers": ["x"],
                "finalizers": ["x"]
            }}),
        );
        assert_eq!(
            out["metadata"],
            json!({
                "name": "n",
                "ownerReferences": [{"uid": "u1", "name": "a"}],
                "labels": {"a": "1"},
                "finalizers": ["x"]
            })
        );
    }

    #[test]
    fn smp_keeps_dollar_fields_that_are_not_directives() {
        let crd = builtin("CustomResourceDefinition");
        let doc = json!({"spec": {"versions": []}});
        let patch = json!({"spec": {"schema": {"$ref": "#/x", "$schema": "s"}}});
        let out = strategic_merge_patch(&crd, &doc, &patch).unwrap();
        assert_eq!(out["spec"]["schema"], json!({"$ref": "#/x", "$schema": "s"}));
    }

    #[test]
    fn smp_follows_schema_list_types() {
        let mut rt = builtin("Namespace");
        rt.schema = Some(json!({
            "type": "object",
            "properties": {"spec": {"type": "object", "properties": {
                "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                "ports": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["port", "protocol"],
                    "items": {"type": "object", "properties": {
                        "aliases": {"type": "array", "x-kubernetes-list-type": "set"}
                    }}
                },
                "args": {"type": "array", "items": {"type": "string"}}
            }}}
        }));
        let doc = json!({"spec": {
            "tags": ["a"],
            "ports": [{"port": 80, "protocol": "TCP", "aliases": ["http"]}, {"port": 80, "protocol": "UDP"}],
            "args": ["-v"]
        }});
        let patch = json!({"spec": {
            "tags": ["b"],
            "ports": [
                {"port": 80.0, "protocol": "TCP", "aliases": ["www"]},
                {"port": 443, "protocol": "TCP"}
            ],
            "args": ["-q"]
        }});
        let out = strategic_merge_patch(&rt, &doc, &patch).unwrap();
        assert_eq!(
            out["spec"],
            json!({
                "tags": ["a", "b"],
                "ports": [
                    // 80.0 found the 80 item (keys compare by value) and, as a patched field, replaced it.
                    {"port": 80.0, "protocol": "TCP", "aliases": ["http", "www"]},
                    {"port": 80, "protocol": "UDP"},
                    {"port": 443, "protocol": "TCP"}
                ],
                "args": ["-q"]
            })
        );
    }

    #[test]
    fn smp_malformed() {
        let rt = builtin("Namespace");
        let cases = [
            (json!([1]), "a strategic merge patch must be a JSON object"),
            (json!({"metadata": {"$patch": "merge"}}), "unknown $patch directive \"merge\" in a map"),
            (
                json!({"metadata": {"ownerReferences": [{"name": "no-uid"}]}}),
                "items of metadata.ownerReferences must be objects with merge key uid",
            ),
            (
                json!({"metadata": {"ownerReferences": ["u1"]}}),
                "items of metadata.ownerReferences must be objects with merge key uid",
            ),
            (
                json!({"metadata": {"finalizers": [{"$patch": "delete"}]}}),
                "$patch: delete needs a merge key; metadata.finalizers is a set, use $deleteFromPrimitiveList",
            ),
            (
                json!({"metadata": {"$deleteFromPrimitiveList/finalizers": "x"}}),
                "$deleteFromPrimitiveList/finalizers must be a list",
            ),
            (
                json!({"metadata": {"$setElementOrder/finalizers": {}}}),
                "$setElementOrder/finalizers must be a list",
            ),
        ];
        for (patch, message) in cases {
            assert_eq!(
                strategic_merge_patch(&rt, &namespace(), &patch),
                Err(PatchError::Malformed(message.into())),
                "{patch}"
            );
        }
    }
}
