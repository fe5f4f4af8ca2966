//! Server-side apply (SSA) field management: `metadata.managedFields`, the FieldsV1 encoding,
//! merging an apply configuration into the live object, conflict detection between field
//! managers, removal of fields a manager stopped applying, and recording ownership for
//! non-apply writes (`operation: Update`).
//!
//! It works on `serde_json::Value` objects and takes list semantics from
//! [`ResourceType::list_type`]; map-vs-struct knowledge comes from the CRD schema
//! (`properties` are struct fields, `additionalProperties` / preserve-unknown-fields are
//! free-form maps) and from a built-in model of `ObjectMeta`.
//!
//! Deliberately not done here (the caller or nobody does it):
//! - no HTTP: the caller turns [`SsaError`] into a `Status` (409 / 400 / 422);
//! - no schema validation, defaulting or pruning of unknown fields;
//! - no version conversion of field sets: every entry is read as if written at the served
//!   version;
//! - no unions, no `x-kubernetes-list-type` lookups below free-form maps (whatever
//!   `ResourceType::list_type` cannot see is atomic), no `i:` (index) path elements;
//! - no server-owned metadata (uid, resourceVersion, generation, timestamps): those pass
//!   through from `live` untouched and are never tracked;
//! - no storage, no resourceVersion/generation bumps: the caller compares the result with
//!   `live` to decide whether anything is written.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::resources::{ListType, ResourceType};

/// `metadata` fields the server owns. They are never tracked in a field set, never merged from
/// an apply configuration, and always pass through from the live object (kube-apiserver strips
/// the same list in `fieldmanager/internal/stripmeta.go`).
const SERVER_OWNED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

const APPLY: &str = "Apply";
const UPDATE: &str = "Update";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, thiserror::Error)]
pub enum SsaError {
    /// 409: one per conflicting field. The server turns these into a `Status` with
    /// `details.causes[{reason: "FieldManagerConflict", message: Conflict::message(), field}]`
    /// and this error's text as the overall message.
    #[error("{}", conflicts_message(.0))]
    Conflicts(Vec<Conflict>),
    /// 400/422: the applied configuration is malformed.
    #[error("{0}")]
    Invalid(String),
}

/// One field another manager owns and the apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    /// The owning entry's apiVersion when it is an `Update` entry; empty for `Apply` entries,
    /// because kube-apiserver leaves the version out of an applier's identity and message.
    pub api_version: String,
    /// The field path as kube-apiserver prints it, e.g. `.spec.disks[id="scsi0"].size`.
    pub field: String,
}

impl Conflict {
    /// The `message` of the `FieldManagerConflict` cause, e.g.
    /// `conflict with "kubectl-client-side-apply" using kpve.io/v1alpha1`.
    pub fn message(&self) -> String {
        if self.api_version.is_empty() {
            format!("conflict with {}", quote(&self.manager))
        } else {
            format!("conflict with {} using {}", quote(&self.manager), self.api_version)
        }
    }
}

/// The overall message, worded as kube-apiserver's `getConflictMessage` so kubectl's output
/// reads the same.
fn conflicts_message(conflicts: &[Conflict]) -> String {
    if let [only] = conflicts {
        return format!("Apply failed with 1 conflict: {}: {}", only.message(), only.field);
    }
    let mut by_manager: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for c in conflicts {
        by_manager.entry(c.message()).or_default().push(&c.field);
    }
    let mut lines = Vec::new();
    for (message, fields) in by_manager {
        lines.push(format!("{}:", message.replacen("conflict with", "conflicts with", 1)));
        lines.extend(fields.iter().map(|f| format!("- {f}")));
    }
    format!("Apply failed with {} conflicts: {}", conflicts.len(), lines.join("\n"))
}

/// A JSON string literal, which is what Go's `%q` prints for ordinary text.
fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Field sets and the FieldsV1 encoding
// ---------------------------------------------------------------------------------------------

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pe {
    /// `f:<name>`: a field of an object.
    Field(String),
    /// `k:{...}`: a list-map item, by its key fields sorted by name (as structured-merge-diff
    /// sorts them, so the encoding is canonical whatever the list-map-keys order).
    Key(Vec<(String, Value)>),
    /// `v:<json>`: a set item.
    Value(Value),
}

impl Pe {
    fn rank(&self) -> u8 {
        match self {
            Pe::Field(_) => 0,
            Pe::Key(_) => 1,
            Pe::Value(_) => 2,
        }
    }

    fn fields_v1_key(&self) -> String {
        match self {
            Pe::Field(name) => format!("f:{name}"),
            Pe::Key(fields) => {
                let map: Map<String, Value> = fields.iter().cloned().collect();
                format!("k:{}", Value::Object(map))
            }
            Pe::Value(v) => format!("v:{v}"),
        }
    }

    fn parse(key: &str) -> Result<Pe, String> {
        if let Some(name) = key.strip_prefix("f:") {
            return Ok(Pe::Field(name.to_string()));
        }
        if let Some(json) = key.strip_prefix("k:") {
            return match serde_json::from_str(json) {
                Ok(Value::Object(m)) if !m.is_empty() => Ok(Pe::Key(sorted_key(m.into_iter().collect()))),
                _ => Err(format!("invalid key path element {key:?}")),
            };
        }
        if let Some(json) = key.strip_prefix("v:") {
            return serde_json::from_str(json)
                .map(Pe::Value)
                .map_err(|_| format!("invalid value path element {key:?}"));
        }
        Err(format!("unsupported path element {key:?}"))
    }

    /// The path step as kube-apiserver prints it in conflicts.
    fn write_path(&self, out: &mut String) {
        match self {
            Pe::Field(name) => {
                out.push('.');
                out.push_str(name);
            }
            Pe::Key(fields) => {
                let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = write!(out, "[{}]", parts.join(","));
            }
            Pe::Value(v) => {
                let _ = write!(out, "[={v}]");
            }
        }
    }
}

fn sorted_key(mut fields: Vec<(String, Value)>) -> Vec<(String, Value)> {
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields
}

impl Ord for Pe {
    /// structured-merge-diff's order: fields, then keys, then values; FieldsV1 is written in
    /// this order, which makes it byte-comparable with kube-apiserver's.
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Pe::Field(a), Pe::Field(b)) => a.cmp(b),
            (Pe::Key(a), Pe::Key(b)) => {
                for ((an, av), (bn, bv)) in a.iter().zip(b) {
                    let c = an.cmp(bn).then_with(|| cmp_values(av, bv));
                    if c != Ordering::Equal {
                        return c;
                    }
                }
                a.len().cmp(&b.len())
            }
            (Pe::Value(a), Pe::Value(b)) => cmp_values(a, b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for Pe {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A total order on JSON values that agrees with `Value`'s `==` (numbers by value, ties broken
/// by their text so `2` and `2.0`, which are unequal values, stay distinct).
fn cmp_values(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Number(_) => 0,
            Value::String(_) => 1,
            Value::Bool(_) => 2,
            Value::Array(_) => 3,
            Value::Object(_) => 4,
            Value::Null => 5,
        }
    }
    fn cmp_seq<'a>(a: impl Iterator<Item = &'a Value>, b: impl Iterator<Item = &'a Value>) -> Ordering {
        let (a, b): (Vec<_>, Vec<_>) = (a.collect(), b.collect());
        a.iter().zip(&b).map(|(x, y)| cmp_values(x, y)).find(|c| c.is_ne()).unwrap_or(a.len().cmp(&b.len()))
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (fx, fy) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            fx.partial_cmp(&fy).unwrap_or(Ordering::Equal).then_with(|| x.to_string().cmp(&y.to_string()))
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => cmp_seq(x.iter(), y.iter()),
        (Value::Object(x), Value::Object(y)) => {
            let sorted = |m: &Map<String, Value>| {
                let mut v: Vec<(String, Value)> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                v.sort_by(|p, q| p.0.cmp(&q.0));
                v
            };
            let (xs, ys) = (sorted(x), sorted(y));
            for ((xk, xv), (yk, yv)) in xs.iter().zip(&ys) {
                let c = xk.cmp(yk).then_with(|| cmp_values(xv, yv));
                if c.is_ne() {
                    return c;
                }
            }
            xs.len().cmp(&ys.len())
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

/// A set of field paths, as in a managedFields entry. A node is a *member* when the path itself
/// is in the set (leaves, list items, free-form map entries); interior nodes exist only to hold
/// children. Invariant: no node below the root is empty (not a member and no children), so the
/// derived equality is set equality.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<Pe, FieldSet>,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    /// Decodes a `fieldsV1` object.
    pub fn from_fields_v1(fields: &Value) -> Result<FieldSet, SsaError> {
        let mut set = decode_node(fields).map_err(SsaError::Invalid)?;
        // "." at the root would mean "the whole object"; kube-apiserver never writes it.
        set.member = false;
        Ok(set)
    }

    /// Encodes as `fieldsV1`: keys in structured-merge-diff order, leaves as `{}`, and `"."`
    /// for a member that also has children.
    pub fn to_fields_v1(&self) -> Value {
        self.encode(false)
    }

    /// Every member path, in set order, printed as in conflicts (`.spec.disks[id="scsi0"]`).
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_paths(&mut String::new(), &mut out);
        out
    }

    fn encode(&self, include_self: bool) -> Value {
        let mut map = Map::new();
        if include_self && self.member && !self.children.is_empty() {
            map.insert(".".into(), Value::Object(Map::new()));
        }
        for (pe, child) in &self.children {
            map.insert(pe.fields_v1_key(), child.encode(true));
        }
        Value::Object(map)
    }

    fn collect_paths(&self, prefix: &mut String, out: &mut Vec<String>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (pe, child) in &self.children {
            let len = prefix.len();
            pe.write_path(prefix);
            child.collect_paths(prefix, out);
            prefix.truncate(len);
        }
    }

    fn insert(&mut self, path: &[Pe]) {
        let mut node = self;
        for pe in path {
            node = node.children.entry(pe.clone()).or_default();
        }
        node.member = true;
    }

    fn union_with(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (pe, child) in &other.children {
            self.children.entry(pe.clone()).or_default().union_with(child);
        }
    }

    /// Members of `self` that are not members of `other`.
    fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet { member: self.member && !other.member, children: BTreeMap::new() };
        for (pe, child) in &self.children {
            let d = match other.children.get(pe) {
                Some(o) => child.difference(o),
                None => child.clone(),
            };
            if !d.is_empty() {
                out.children.insert(pe.clone(), d);
            }
        }
        out
    }

    /// Members of both.
    fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet { member: self.member && other.member, children: BTreeMap::new() };
        for (pe, child) in &self.children {
            if let Some(o) = other.children.get(pe) {
                let i = child.intersection(o);
                if !i.is_empty() {
                    out.children.insert(pe.clone(), i);
                }
            }
        }
        out
    }
}

fn decode_node(v: &Value) -> Result<FieldSet, String> {
    let Value::Object(map) = v else { return Err("fieldsV1: a node is not an object".into()) };
    let mut set = FieldSet::default();
    for (key, child) in map {
        if key == "." {
            set.member = true;
            continue;
        }
        let pe = Pe::parse(key)?;
        let mut node = decode_node(child)?;
        if node.children.is_empty() {
            // `{}` is a leaf: the path itself is owned.
            node.member = true;
        }
        set.children.entry(pe).or_default().union_with(&node);
    }
    Ok(set)
}

// ---------------------------------------------------------------------------------------------
// Shapes: what the schema says about a node, as far as field management cares
// ---------------------------------------------------------------------------------------------

/// What is known about the type at a node. Only two questions matter to field management:
/// is a field of an object a declared (struct) field or an entry of a free-form map (then
/// kube-apiserver owns the entry itself too, written `"."`), and is a map atomic.
#[derive(Debug, Clone, Copy)]
enum Shape<'a> {
    /// A node of the CRD's `openAPIV3Schema`.
    Schema(&'a Value),
    /// `metadata`, which CRD schemas leave open; modelled on `ObjectMeta`.
    Meta,
    /// `labels` / `annotations`: free-form string maps.
    StringMap,
    /// A built-in kind without a schema: every field is taken as declared, which is what the
    /// Go structs of Lease, Event, Namespace and CRD mostly are.
    Untyped,
    /// Below `x-kubernetes-preserve-unknown-fields` or undeclared fields: free-form maps,
    /// atomic lists (structured-merge-diff's "deduced" type).
    Deduced,
}

impl<'a> Shape<'a> {
    fn root(rt: &'a ResourceType) -> Shape<'a> {
        rt.schema.as_ref().map_or(Shape::Untyped, Shape::Schema)
    }

    fn atomic_map(self) -> bool {
        matches!(self, Shape::Schema(node)
            if node.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic"))
    }

    fn nullable(self) -> bool {
        matches!(self, Shape::Schema(node) if node.get("nullable") == Some(&Value::Bool(true)))
    }

    /// The shape of field `key` of an object of this shape, and whether it is declared.
    fn field(self, key: &str, at_root: bool) -> (Shape<'a>, bool) {
        if at_root && key == "metadata" {
            return (Shape::Meta, true);
        }
        match self {
            Shape::Schema(node) => {
                if let Some(prop) = node.get("properties").and_then(|p| p.get(key)) {
                    return (Shape::Schema(prop), true);
                }
                match node.get("additionalProperties") {
                    Some(ap @ Value::Object(_)) => (Shape::Schema(ap), false),
                    _ => (Shape::Deduced, false),
                }
            }
            Shape::Meta => match key {
                "labels" | "annotations" => (Shape::StringMap, true),
                _ => (Shape::Untyped, true),
            },
            Shape::StringMap => (Shape::Untyped, false),
            Shape::Untyped => (Shape::Untyped, true),
            Shape::Deduced => (Shape::Deduced, false),
        }
    }

    fn item(self) -> Shape<'a> {
        match self {
            Shape::Schema(node) => node.get("items").map_or(Shape::Deduced, Shape::Schema),
            Shape::Deduced => Shape::Deduced,
            Shape::Meta | Shape::StringMap | Shape::Untyped => Shape::Untyped,
        }
    }
}

/// Where a walk is: field names / `[]` for `ResourceType::list_type`, and the field path.
#[derive(Default)]
struct Cursor {
    segs: Vec<String>,
    pes: Vec<Pe>,
}

impl Cursor {
    fn push(&mut self, seg: &str, pe: Pe) {
        self.segs.push(seg.to_string());
        self.pes.push(pe);
    }

    fn pop(&mut self) {
        self.segs.pop();
        self.pes.pop();
    }

    fn at_root(&self) -> bool {
        self.segs.is_empty()
    }

    fn display(&self) -> String {
        let mut s = String::new();
        for pe in &self.pes {
            pe.write_path(&mut s);
        }
        s
    }
}

/// How a value at a node is walked.
enum Node<'v> {
    Map(&'v Map<String, Value>),
    List(&'v [Value], ListType),
    Leaf,
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The path element of a list-map item, or `None` when it is not an object or lacks a key.
fn item_key(item: &Value, keys: &[String]) -> Option<Pe> {
    let obj = item.as_object()?;
    let fields =
        keys.iter().map(|k| obj.get(k).map(|v| (k.clone(), v.clone()))).collect::<Option<Vec<_>>>()?;
    Some(Pe::Key(sorted_key(fields)))
}

/// The keyed items of a list-map value, first occurrence of each key.
fn keyed_items<'v>(list: Option<&'v Value>, keys: &[String]) -> Vec<(Pe, &'v Value)> {
    let mut out: Vec<(Pe, &'v Value)> = Vec::new();
    for item in list.and_then(Value::as_array).into_iter().flatten() {
        if let Some(pe) = item_key(item, keys)
            && !out.iter().any(|(p, _)| *p == pe)
        {
            out.push((pe, item));
        }
    }
    out
}

struct Walker<'a> {
    rt: &'a ResourceType,
}

impl<'a> Walker<'a> {
    fn list_type(&self, segs: &[String]) -> ListType {
        let path: Vec<&str> = segs.iter().map(String::as_str).collect();
        match self.rt.list_type(&path) {
            // A map list without keys cannot be merged by key; treat it as atomic.
            ListType::Map(keys) if keys.is_empty() => ListType::Atomic,
            other => other,
        }
    }

    fn node<'v>(&self, v: &'v Value, shape: Shape, cur: &Cursor) -> Node<'v> {
        match v {
            Value::Object(m) if !shape.atomic_map() => Node::Map(m),
            Value::Array(items) => Node::List(items, self.list_type(&cur.segs)),
            _ => Node::Leaf,
        }
    }

    /// The field set of a value (structured-merge-diff's `ToFieldSet`). With `strict`, malformed
    /// associative lists are errors; otherwise (live objects) their bad items are skipped.
    fn collect(
        &self,
        v: &Value,
        shape: Shape<'a>,
        cur: &mut Cursor,
        strict: bool,
        out: &mut FieldSet,
    ) -> Result<(), String> {
        match self.node(v, shape, cur) {
            Node::Map(m) => {
                for (k, cv) in m {
                    let (cs, declared) = shape.field(k, cur.at_root());
                    cur.push(k, Pe::Field(k.clone()));
                    self.collect(cv, cs, cur, strict, out)?;
                    // Entries of free-form maps are owned as such (kube-apiserver writes "."),
                    // and so are explicit nulls and empty objects, which have no leaves.
                    let empty_map = matches!(cv, Value::Object(cm) if cm.is_empty());
                    if !declared || cv.is_null() || empty_map {
                        out.insert(&cur.pes);
                    }
                    cur.pop();
                }
            }
            Node::List(items, ListType::Map(keys)) => {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    let Some(pe) = item_key(item, &keys) else {
                        if strict {
                            return Err(format!(
                                "{}[{i}]: associative list item must be an object with key field(s) {}",
                                cur.display(),
                                keys.join(", ")
                            ));
                        }
                        continue;
                    };
                    if !seen.insert(pe.clone()) {
                        if strict {
                            let mut p = cur.display();
                            pe.write_path(&mut p);
                            return Err(format!("{p}: duplicate entries for key"));
                        }
                        continue;
                    }
                    cur.push("[]", pe);
                    out.insert(&cur.pes);
                    self.collect(item, shape.item(), cur, strict, out)?;
                    cur.pop();
                }
            }
            Node::List(items, ListType::Set) => {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    let scalar = !(item.is_object() || item.is_array() || item.is_null());
                    let pe = Pe::Value(item.clone());
                    if !scalar || !seen.insert(pe.clone()) {
                        if strict {
                            let what = if scalar { "duplicate" } else { "non-scalar" };
                            return Err(format!("{}[{i}]: {what} item in a set list", cur.display()));
                        }
                        continue;
                    }
                    cur.push("[]", pe);
                    out.insert(&cur.pes);
                    cur.pop();
                }
            }
            Node::List(_, ListType::Atomic) | Node::Leaf => {
                if !cur.pes.is_empty() {
                    out.insert(&cur.pes);
                }
            }
        }
        Ok(())
    }

    /// Merges an apply configuration into the live value: objects recursively, list-map items
    /// by key (live order kept, new items appended), set items by union, everything else
    /// replaced.
    fn merge(&self, live: Option<&Value>, cfg: &Value, shape: Shape<'a>, cur: &mut Cursor) -> Value {
        match (live, cfg) {
            (Some(Value::Object(lm)), Value::Object(cm)) if !shape.atomic_map() => {
                let mut out = lm.clone();
                for (k, cv) in cm {
                    let (cs, _) = shape.field(k, cur.at_root());
                    cur.push(k, Pe::Field(k.clone()));
                    let merged = self.merge(lm.get(k), cv, cs, cur);
                    cur.pop();
                    // Replacing an existing key keeps its position (IndexMap), new keys go last.
                    out.insert(k.clone(), merged);
                }
                Value::Object(out)
            }
            (Some(Value::Array(la)), Value::Array(ca)) => match self.list_type(&cur.segs) {
                ListType::Map(keys) => {
                    let mut out = la.clone();
                    let mut index: BTreeMap<Pe, usize> = BTreeMap::new();
                    for (i, item) in la.iter().enumerate() {
                        if let Some(pe) = item_key(item, &keys) {
                            index.entry(pe).or_insert(i);
                        }
                    }
                    for item in ca {
                        let Some(pe) = item_key(item, &keys) else {
                            out.push(item.clone());
                            continue;
                        };
                        match index.get(&pe) {
                            Some(&i) => {
                                cur.push("[]", pe);
                                out[i] = self.merge(Some(&la[i]), item, shape.item(), cur);
                                cur.pop();
                            }
                            None => {
                                index.insert(pe, out.len());
                                out.push(item.clone());
                            }
                        }
                    }
                    Value::Array(out)
                }
                ListType::Set => {
                    let mut out = la.clone();
                    for item in ca {
                        if !out.contains(item) {
                            out.push(item.clone());
                        }
                    }
                    Value::Array(out)
                }
                ListType::Atomic => cfg.clone(),
            },
            _ => cfg.clone(),
        }
    }

    /// Finds what changed from `old` to `new`: `changed` gets added and modified paths (leaves,
    /// plus list items and free-form map entries that appeared), `removed` the paths that went
    /// away. Nodes that are empty on both sides compare as leaves, to keep `{}` vs absent.
    fn compare<'v>(
        &self,
        old: Option<&'v Value>,
        new: Option<&'v Value>,
        shape: Shape<'a>,
        cur: &mut Cursor,
        changed: &mut FieldSet,
        removed: &mut FieldSet,
    ) {
        let on = old.map(|v| self.node(v, shape, cur));
        let nn = new.map(|v| self.node(v, shape, cur));
        let same_kind = match (&on, &nn) {
            (Some(a), Some(b)) => std::mem::discriminant(a) == std::mem::discriminant(b),
            _ => true,
        };
        if !same_kind {
            // The type changed: everything old is gone, everything new is new.
            self.compare(old, None, shape, cur, changed, removed);
            self.compare(None, new, shape, cur, changed, removed);
            return;
        }
        let both_empty = old.is_none_or(is_empty_container) && new.is_none_or(is_empty_container);
        match on.or(nn) {
            Some(Node::Map(_)) if !both_empty => {
                let (om, nm) = (old.and_then(Value::as_object), new.and_then(Value::as_object));
                let keys: Vec<&String> = om
                    .into_iter()
                    .flat_map(|m| m.keys())
                    .chain(
                        nm.into_iter()
                            .flat_map(|m| m.keys())
                            .filter(|k| om.is_none_or(|m| !m.contains_key(*k))),
                    )
                    .collect();
                for k in keys {
                    let (ov, nv) = (om.and_then(|m| m.get(k)), nm.and_then(|m| m.get(k)));
                    let (cs, declared) = shape.field(k, cur.at_root());
                    cur.push(k, Pe::Field(k.clone()));
                    self.compare(ov, nv, cs, cur, changed, removed);
                    if !declared {
                        match (ov, nv) {
                            (None, Some(_)) => changed.insert(&cur.pes),
                            (Some(_), None) => removed.insert(&cur.pes),
                            _ => {}
                        }
                    }
                    cur.pop();
                }
            }
            Some(Node::List(_, ListType::Map(keys))) if !both_empty => {
                let (oi, ni) = (keyed_items(old, &keys), keyed_items(new, &keys));
                let find =
                    |list: &[(Pe, &'v Value)], pe: &Pe| list.iter().find(|(p, _)| p == pe).map(|(_, v)| *v);
                let mut pes: Vec<Pe> = oi.iter().map(|(p, _)| p.clone()).collect();
                pes.extend(ni.iter().map(|(p, _)| p.clone()).filter(|p| find(&oi, p).is_none()));
                for pe in pes {
                    let (ov, nv) = (find(&oi, &pe), find(&ni, &pe));
                    cur.push("[]", pe);
                    self.compare(ov, nv, shape.item(), cur, changed, removed);
                    match (ov, nv) {
                        (None, Some(_)) => changed.insert(&cur.pes),
                        (Some(_), None) => removed.insert(&cur.pes),
                        _ => {}
                    }
                    cur.pop();
                }
            }
            Some(Node::List(_, ListType::Set)) if !both_empty => {
                let items = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
                let (oi, ni) = (items(old), items(new));
                for item in oi.iter().filter(|i| !ni.contains(i)) {
                    cur.push("[]", Pe::Value(item.clone()));
                    removed.insert(&cur.pes);
                    cur.pop();
                }
                for item in ni.iter().filter(|i| !oi.contains(i)) {
                    cur.push("[]", Pe::Value(item.clone()));
                    changed.insert(&cur.pes);
                    cur.pop();
                }
            }
            _ => {
                if cur.pes.is_empty() {
                    return;
                }
                match (old, new) {
                    (None, Some(_)) => changed.insert(&cur.pes),
                    (Some(_), None) => removed.insert(&cur.pes),
                    (Some(a), Some(b)) if a != b => changed.insert(&cur.pes),
                    _ => {}
                }
            }
        }
    }

    /// Removes from `v` the members of `drop` (fields the applier stopped applying) that `keep`
    /// (the new apply set and every other manager's set) does not hold. A dropped node that
    /// someone still owns something beneath is kept and pruned inside instead; a list-map item
    /// kept that way keeps its key fields. Objects and lists emptied by the removal go too, as
    /// kube-apiserver's null-then-omitempty does.
    fn prune(
        &self,
        v: &mut Value,
        drop: &FieldSet,
        keep: Option<&FieldSet>,
        shape: Shape<'a>,
        cur: &mut Cursor,
    ) {
        if drop.children.is_empty() {
            return;
        }
        let dropped_whole = |d: &FieldSet, k: Option<&FieldSet>| {
            d.member && !k.is_some_and(|k| k.member) && k.is_none_or(|k| k.children.is_empty())
        };
        match v {
            Value::Object(m) if !shape.atomic_map() => {
                let at_root = cur.at_root();
                for (pe, d) in &drop.children {
                    let Pe::Field(k) = pe else { continue };
                    let kept = keep.and_then(|s| s.children.get(pe));
                    if dropped_whole(d, kept) {
                        m.shift_remove(k);
                        continue;
                    }
                    let Some(child) = m.get_mut(k) else { continue };
                    let was_empty = is_empty_container(child);
                    let (cs, _) = shape.field(k, at_root);
                    cur.push(k, pe.clone());
                    self.prune(child, d, kept, cs, cur);
                    cur.pop();
                    if !was_empty && is_empty_container(child) {
                        m.shift_remove(k);
                    }
                }
            }
            Value::Array(items) => match self.list_type(&cur.segs) {
                ListType::Map(keys) => {
                    let item_shape = shape.item();
                    items.retain_mut(|item| {
                        let Some(pe) = item_key(item, &keys) else { return true };
                        let Some(d) = drop.children.get(&pe) else { return true };
                        let kept = keep.and_then(|s| s.children.get(&pe));
                        if dropped_whole(d, kept) {
                            return false;
                        }
                        let mut d = d.clone();
                        for key in &keys {
                            d.children.remove(&Pe::Field(key.clone()));
                        }
                        cur.push("[]", pe);
                        self.prune(item, &d, kept, item_shape, cur);
                        cur.pop();
                        true
                    });
                }
                ListType::Set => items.retain(|item| {
                    let pe = Pe::Value(item.clone());
                    let d = drop.children.get(&pe);
                    let kept = keep.and_then(|s| s.children.get(&pe));
                    !d.is_some_and(|d| dropped_whole(d, kept))
                }),
                ListType::Atomic => {}
            },
            _ => {}
        }
    }

    /// Drops the keys the configuration set to `null` (unless the schema marks the field
    /// nullable): kube-apiserver stores the merged null and then prunes non-nullable nulls, so
    /// the field ends up absent but owned by the applier.
    fn strip_nulls(&self, v: &mut Value, cfg: &Value, shape: Shape<'a>, cur: &mut Cursor) {
        match (v, cfg) {
            (Value::Object(vm), Value::Object(cm)) if !shape.atomic_map() => {
                for (k, cv) in cm {
                    let (cs, _) = shape.field(k, cur.at_root());
                    if cv.is_null() {
                        if !cs.nullable() && vm.get(k).is_some_and(Value::is_null) {
                            vm.shift_remove(k);
                        }
                    } else if let Some(child) = vm.get_mut(k) {
                        cur.push(k, Pe::Field(k.clone()));
                        self.strip_nulls(child, cv, cs, cur);
                        cur.pop();
                    }
                }
            }
            (Value::Array(va), Value::Array(ca)) => {
                if let ListType::Map(keys) = self.list_type(&cur.segs) {
                    for citem in ca {
                        let Some(pe) = item_key(citem, &keys) else { continue };
                        if let Some(item) = va.iter_mut().find(|i| item_key(i, &keys).as_ref() == Some(&pe)) {
                            cur.push("[]", pe);
                            self.strip_nulls(item, citem, shape.item(), cur);
                            cur.pop();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn field_set(&self, v: &Value, strict: bool) -> Result<FieldSet, String> {
        let mut out = FieldSet::default();
        self.collect(v, Shape::root(self.rt), &mut Cursor::default(), strict, &mut out)?;
        Ok(out)
    }

    fn diff(&self, old: Option<&Value>, new: &Value) -> (FieldSet, FieldSet) {
        let (mut changed, mut removed) = (FieldSet::default(), FieldSet::default());
        self.compare(
            old,
            Some(new),
            Shape::root(self.rt),
            &mut Cursor::default(),
            &mut changed,
            &mut removed,
        );
        (changed, removed)
    }
}

// ---------------------------------------------------------------------------------------------
// Scope: which part of the object a request may touch
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// No status subresource: the whole object.
    Whole,
    /// The main resource of a type with a status subresource: `.status` is out of reach.
    Main,
    /// The status subresource: only `.status`.
    Status,
}

impl Scope {
    fn new(rt: &ResourceType, subresource: Option<&str>) -> Scope {
        match subresource {
            Some("status") => Scope::Status,
            _ if rt.status_subresource => Scope::Main,
            _ => Scope::Whole,
        }
    }

    fn includes(self, top_level_field: &str) -> bool {
        match self {
            Scope::Whole => true,
            Scope::Main => top_level_field != "status",
            Scope::Status => top_level_field == "status",
        }
    }

    /// The part of an object that is tracked in this scope: no apiVersion/kind, no server-owned
    /// metadata, nothing out of scope. A `metadata` left empty only by that stripping goes too,
    /// so it is not mistaken for an applied `metadata: {}`.
    fn restrict(self, v: &Value) -> Value {
        let mut out = Map::new();
        for (k, val) in v.as_object().into_iter().flatten() {
            if k == "apiVersion" || k == "kind" || !self.includes(k) {
                continue;
            }
            if k == "metadata" {
                // A non-object metadata (say `null`) must not wipe the server-owned fields.
                if let Value::Object(meta) = val {
                    let kept: Map<String, Value> = meta
                        .iter()
                        .filter(|(mk, _)| !SERVER_OWNED_METADATA.contains(&mk.as_str()))
                        .map(|(mk, mv)| (mk.clone(), mv.clone()))
                        .collect();
                    if !kept.is_empty() || meta.is_empty() {
                        out.insert(k.clone(), Value::Object(kept));
                    }
                }
                continue;
            }
            out.insert(k.clone(), val.clone());
        }
        Value::Object(out)
    }

    /// The same restriction on a stored field set (older entries may hold paths the server
    /// now ignores; they must not drive removals).
    fn restrict_set(self, set: &FieldSet) -> FieldSet {
        let mut out = set.clone();
        out.children.retain(
            |pe, _| matches!(pe, Pe::Field(n) if n != "apiVersion" && n != "kind" && self.includes(n)),
        );
        let meta = Pe::Field("metadata".into());
        if let Some(m) = out.children.get_mut(&meta) {
            m.children
                .retain(|pe, _| !matches!(pe, Pe::Field(n) if SERVER_OWNED_METADATA.contains(&n.as_str())));
            if m.is_empty() {
                out.children.remove(&meta);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// managedFields entries
// ---------------------------------------------------------------------------------------------

struct Entry {
    /// The stored JSON, written back verbatim (time included) while the entry is unchanged.
    raw: Option<Value>,
    manager: String,
    operation: String,
    api_version: String,
    subresource: Option<String>,
    set: FieldSet,
    original_set: FieldSet,
    original_api_version: String,
    /// The current operation changed the object through this entry: it gets a new time even
    /// if its set is the same (Kubernetes: "updated if ... the manager changes any of the owned
    /// fields value").
    touched: bool,
}

impl Entry {
    fn new(manager: &str, operation: &str, api_version: &str, subresource: Option<&str>) -> Entry {
        Entry {
            raw: None,
            manager: manager.to_string(),
            operation: operation.to_string(),
            api_version: api_version.to_string(),
            subresource: subresource.map(String::from),
            set: FieldSet::default(),
            original_set: FieldSet::default(),
            original_api_version: api_version.to_string(),
            touched: true,
        }
    }

    fn decode(raw: &Value) -> Entry {
        let s = |k: &str| raw.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        // An entry whose fieldsV1 cannot be read owns nothing; it is written back verbatim
        // unless this operation replaces it.
        let set = raw.get("fieldsV1").and_then(|f| FieldSet::from_fields_v1(f).ok()).unwrap_or_default();
        let operation = raw.get("operation").and_then(Value::as_str).unwrap_or(UPDATE).to_string();
        Entry {
            raw: Some(raw.clone()),
            manager: s("manager"),
            operation,
            api_version: s("apiVersion"),
            subresource: raw
                .get("subresource")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(String::from),
            original_set: set.clone(),
            set,
            original_api_version: s("apiVersion"),
            touched: false,
        }
    }

    /// kube-apiserver's manager identity: manager, operation, subresource, and for `Update`
    /// entries also the apiVersion.
    fn is(&self, manager: &str, operation: &str, subresource: Option<&str>, api_version: &str) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
            && (operation == APPLY || self.api_version == api_version)
    }

    fn unchanged(&self) -> bool {
        !self.touched && self.set == self.original_set && self.api_version == self.original_api_version
    }

    /// Entries that lost their last field disappear; entries that were stored empty are left
    /// alone (dropping them would be a change nobody asked for).
    fn keep(&self) -> bool {
        !self.set.is_empty() || (self.raw.is_some() && self.original_set.is_empty())
    }

    fn encode(&self, now: &str) -> Value {
        if let Some(raw) = &self.raw
            && self.unchanged()
        {
            return raw.clone();
        }
        let mut m = Map::new();
        m.insert("manager".into(), Value::String(self.manager.clone()));
        m.insert("operation".into(), Value::String(self.operation.clone()));
        m.insert("apiVersion".into(), Value::String(self.api_version.clone()));
        m.insert("time".into(), Value::String(now.to_string()));
        m.insert("fieldsType".into(), Value::String("FieldsV1".into()));
        m.insert("fieldsV1".into(), self.set.to_fields_v1());
        if let Some(sub) = &self.subresource {
            m.insert("subresource".into(), Value::String(sub.clone()));
        }
        Value::Object(m)
    }
}

fn decode_entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(Entry::decode)
        .collect()
}

fn has_managed_fields(obj: &Value) -> bool {
    obj.pointer("/metadata/managedFields").is_some()
}

/// Writes the entries into `obj.metadata.managedFields`, leaving the key where it was.
fn write_entries(obj: &mut Value, entries: &[Entry], now: &str) {
    let list: Vec<Value> = entries.iter().filter(|e| e.keep()).map(|e| e.encode(now)).collect();
    let Value::Object(root) = obj else { return };
    if list.is_empty() {
        if let Some(Value::Object(meta)) = root.get_mut("metadata")
            && meta.get("managedFields").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            meta.shift_remove("managedFields");
        }
        return;
    }
    let meta = root.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

/// Go's `omitempty` on ObjectMeta: labels, annotations, finalizers and ownerReferences are not
/// stored empty (kube-rs's finalizer helper tests `/metadata/finalizers` against null). Values
/// the live object already had are left as they were.
fn omit_empty_metadata(obj: &mut Value, live: Option<&Value>) {
    let live_meta = live.and_then(|l| l.get("metadata"));
    let Some(Value::Object(meta)) = obj.get_mut("metadata") else { return };
    for key in ["labels", "annotations", "finalizers", "ownerReferences"] {
        let empty = meta.get(key).is_some_and(|v| v.is_null() || is_empty_container(v));
        if empty && live_meta.and_then(|m| m.get(key)) != meta.get(key) {
            meta.shift_remove(key);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Public operations
// ---------------------------------------------------------------------------------------------

/// The field set an object (or apply configuration) owns in the given scope: `subresource`
/// `Some("status")` is only `.status`; `None` is the main resource, without `.status` when the
/// type has a status subresource. Server-owned fields are never included. Malformed
/// associative lists are [`SsaError::Invalid`].
pub fn field_set(rt: &ResourceType, value: &Value, subresource: Option<&str>) -> Result<FieldSet, SsaError> {
    let scope = Scope::new(rt, subresource);
    Walker { rt }.field_set(&scope.restrict(value), true).map_err(SsaError::Invalid)
}

/// Server-side apply of `config` (the full partial object the client sent) by `manager`.
/// `live` is the current object, or `None` to create. Returns the new object with
/// `metadata.managedFields` updated; when nothing changes it returns `live` unchanged, byte for
/// byte, so the caller can skip the write (no new resourceVersion, no watch event).
///
/// - Scope: `subresource` `None` applies to the main resource (ignoring `.status` when the
///   type has a status subresource); `Some("status")` merges and owns only `.status`, tracked
///   in a separate entry with `subresource: status`.
/// - Conflicts: a field whose value would change and that another entry (Apply or Update)
///   owns is a conflict, unless `force`, which moves it to `manager`.
/// - Fields `manager` applied last time (same subresource) and left out now are removed,
///   unless another manager owns them too.
/// - Entry times: unchanged entries keep theirs; changed entries, and the applier's entry when
///   the apply changed the object, get `now`. Entry order is kept; new entries go last.
pub fn apply(
    rt: &ResourceType,
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    subresource: Option<&str>,
    force: bool,
    now: &str,
) -> Result<Value, SsaError> {
    let Value::Object(cfg_obj) = config else {
        return Err(SsaError::Invalid("the apply configuration must be a JSON object".into()));
    };
    if live.is_some_and(|l| !l.is_object()) {
        return Err(SsaError::Invalid("the live object is not a JSON object".into()));
    }
    let w = Walker { rt };
    let root = Shape::root(rt);
    let scope = Scope::new(rt, subresource);
    let api_version =
        cfg_obj.get("apiVersion").and_then(Value::as_str).map_or_else(|| rt.api_version(), String::from);

    let cfg = scope.restrict(config);
    let config_set = w.field_set(&cfg, true).map_err(SsaError::Invalid)?;
    let live_obj = match live {
        Some(l) => l.clone(),
        None => skeleton(rt, cfg_obj),
    };

    let mut entries = decode_entries(&live_obj);
    let mine = entries.iter().position(|e| e.is(manager, APPLY, subresource, ""));
    let last_set = mine.map(|i| scope.restrict_set(&entries[i].set)).unwrap_or_default();
    let mut keep = config_set.clone();
    for (i, e) in entries.iter().enumerate() {
        if Some(i) != mine {
            keep.union_with(&e.set);
        }
    }

    let mut merged = w.merge(Some(&live_obj), &cfg, root, &mut Cursor::default());
    w.prune(&mut merged, &last_set, Some(&keep), root, &mut Cursor::default());

    // Conflicts are judged on the merged object before nulls are stripped: setting an owned
    // field to null is a change like any other.
    let live_scoped = scope.restrict(&live_obj);
    let (changed, removed) = w.diff(Some(&live_scoped), &scope.restrict(&merged));
    let mut conflicts = Vec::new();
    let mut taken = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if Some(i) == mine {
            continue;
        }
        let overlap = e.set.intersection(&changed);
        if overlap.is_empty() {
            continue;
        }
        let api_version = if e.operation == APPLY { String::new() } else { e.api_version.clone() };
        conflicts.extend(overlap.paths().into_iter().map(|field| Conflict {
            manager: e.manager.clone(),
            api_version: api_version.clone(),
            field,
        }));
        taken.push((i, overlap));
    }
    if !force && !conflicts.is_empty() {
        return Err(SsaError::Conflicts(conflicts));
    }
    for (i, overlap) in taken {
        entries[i].set = entries[i].set.difference(&overlap);
    }
    for (i, e) in entries.iter_mut().enumerate() {
        if Some(i) != mine {
            e.set = e.set.difference(&removed);
        }
    }

    w.strip_nulls(&mut merged, &cfg, root, &mut Cursor::default());
    omit_empty_metadata(&mut merged, live);
    let object_changed = scope.restrict(&merged) != live_scoped;

    let me = match mine {
        Some(i) => i,
        None => {
            entries.push(Entry::new(manager, APPLY, &api_version, subresource));
            entries.len() - 1
        }
    };
    entries[me].set = config_set;
    entries[me].api_version = api_version;
    entries[me].touched |= object_changed;

    write_entries(&mut merged, &entries, now);
    match live {
        Some(l) if *l == merged => Ok(l.clone()),
        _ => Ok(merged),
    }
}

/// What an apply that creates starts from: type metadata and the name/namespace from the
/// configuration (the server fills in the rest of the server-owned metadata).
fn skeleton(rt: &ResourceType, cfg: &Map<String, Value>) -> Value {
    let mut obj = Map::new();
    let type_field = |k: &str, default: String| cfg.get(k).cloned().unwrap_or(Value::String(default));
    obj.insert("apiVersion".into(), type_field("apiVersion", rt.api_version()));
    obj.insert("kind".into(), type_field("kind", rt.kind.clone()));
    let mut meta = Map::new();
    for key in ["name", "namespace"] {
        if let Some(v) = cfg.get("metadata").and_then(|m| m.get(key)) {
            meta.insert(key.into(), v.clone());
        }
    }
    obj.insert("metadata".into(), Value::Object(meta));
    Value::Object(obj)
}

/// Records a non-apply write (POST/PUT/PATCH, `operation: Update`) by `manager`: every tracked
/// field whose value differs between `old` and `new` (all of `new` on create) becomes owned by
/// `manager`'s Update entry for this subresource and apiVersion, and is taken from everyone
/// else; fields that disappeared leave every set. `new.metadata.managedFields` is rewritten in
/// place (taken from `old` when `new` has none, as kube-apiserver treats an omitted
/// managedFields). When nothing changed it is left exactly as it was. An empty `manager`
/// records nothing.
pub fn record_update(
    rt: &ResourceType,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: Option<&str>,
    now: &str,
) {
    if manager.is_empty() || !new.is_object() {
        return;
    }
    let w = Walker { rt };
    let scope = Scope::new(rt, subresource);
    let old_scoped = old.map(|o| scope.restrict(o));
    let (changed, removed) = w.diff(old_scoped.as_ref(), &scope.restrict(new));
    let api_version =
        new.get("apiVersion").and_then(Value::as_str).map_or_else(|| rt.api_version(), String::from);

    let mut entries = match old {
        Some(o) if !has_managed_fields(new) => decode_entries(o),
        _ => decode_entries(new),
    };
    let mine = entries.iter().position(|e| e.is(manager, UPDATE, subresource, &api_version));
    for (i, e) in entries.iter_mut().enumerate() {
        if Some(i) != mine {
            e.set = e.set.difference(&changed).difference(&removed);
        }
    }
    let nothing_changed = changed.is_empty() && removed.is_empty();
    if !nothing_changed {
        let me = match mine {
            Some(i) => i,
            None => {
                entries.push(Entry::new(manager, UPDATE, &api_version, subresource));
                entries.len() - 1
            }
        };
        let entry = &mut entries[me];
        entry.set = entry.set.difference(&removed);
        entry.set.union_with(&changed);
        entry.touched = true;
    }
    if nothing_changed && has_managed_fields(new) {
        return;
    }
    write_entries(new, &entries, now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ResourceType;
    use serde_json::json;

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";
    const T2: &str = "2026-01-01T00:02:00Z";
    const T3: &str = "2026-01-01T00:03:00Z";

    /// The real VirtualMachine CRD.
    fn vm_rt() -> ResourceType {
        let crd = kpve_crds::crdgen::all()
            .into_iter()
            .find(|c| c.spec.names.kind == "VirtualMachine")
            .expect("the VirtualMachine CRD");
        ResourceType::from_crd(&crd).into_iter().next().expect("a served version")
    }

    /// A small made-up type: `spec.disks` is a map list keyed by `id`, `spec.tags` a set,
    /// `spec.extra` a free-form map.
    fn small_rt(status_subresource: bool) -> ResourceType {
        let schema = json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "cores": {"type": "integer"},
                    "disks": {"type": "array", "x-kubernetes-list-type": "map",
                              "x-kubernetes-list-map-keys": ["id"],
                              "items": {"type": "object", "properties": {
                                  "id": {"type": "string"}, "size": {"type": "string"}}}},
                    "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                    "extra": {"type": "object", "additionalProperties": {"type": "object",
                              "x-kubernetes-preserve-unknown-fields": true}},
                }},
                "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
            }
        });
        ResourceType {
            group: "kpve.io".into(),
            version: "v1alpha1".into(),
            kind: "Thing".into(),
            list_kind: "ThingList".into(),
            plural: "things".into(),
            singular: "thing".into(),
            namespaced: true,
            short_names: vec![],
            categories: vec![],
            status_subresource,
            schema: Some(schema),
            printer_columns: vec![],
            selectable_fields: vec![],
            builtin: false,
            storage_resource: "kpve.io/things".into(),
        }
    }

    fn vm(spec: Value) -> Value {
        json!({"apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
               "metadata": {"name": "vm1", "namespace": "default"}, "spec": spec})
    }

    /// Stands in for the server: what it adds on create.
    fn created(mut obj: Value) -> Value {
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("uid".into(), json!("u-1"));
        meta.insert("resourceVersion".into(), json!("1"));
        meta.insert("creationTimestamp".into(), json!(T0));
        obj
    }

    fn entries(obj: &Value) -> Vec<Value> {
        obj["metadata"]["managedFields"].as_array().cloned().unwrap_or_default()
    }

    fn entry<'v>(obj: &'v Value, manager: &str) -> &'v Value {
        obj["metadata"]["managedFields"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["manager"] == manager))
            .unwrap_or_else(|| panic!("no entry for {manager}"))
    }

    fn owned(obj: &Value, manager: &str) -> Vec<String> {
        FieldSet::from_fields_v1(&entry(obj, manager)["fieldsV1"]).unwrap().paths()
    }

    fn conflicts(r: Result<Value, SsaError>) -> Vec<Conflict> {
        match r {
            Err(SsaError::Conflicts(c)) => c,
            other => panic!("expected conflicts, got {other:?}"),
        }
    }

    #[test]
    fn fields_v1_shape_matches_kubernetes() {
        let rt = small_rt(false);
        let obj = json!({"metadata": {"labels": {"app": "x"}},
                         "spec": {"cores": 2, "disks": [{"id": "scsi0", "size": "8G"}]}});
        let set = field_set(&rt, &obj, None).unwrap();
        assert_eq!(
            set.to_fields_v1().to_string(),
            r#"{"f:metadata":{"f:labels":{"f:app":{}}},"f:spec":{"f:cores":{},"f:disks":{"k:{\"id\":\"scsi0\"}":{".":{},"f:id":{},"f:size":{}}}}}"#
        );
    }

    #[test]
    fn fields_v1_round_trips_and_orders_like_kubernetes() {
        let rt = small_rt(false);
        let obj = json!({
            "metadata": {"finalizers": ["b", "a"], "ownerReferences": [{"uid": "u", "kind": "K"}],
                         "annotations": {"z": "1"}, "name": "n"},
            "spec": {"tags": ["t"], "extra": {"k": {"deep": {"x": 1}}}, "cores": 1}
        });
        let set = field_set(&rt, &obj, None).unwrap();
        let encoded = set.to_fields_v1();
        assert_eq!(
            encoded.to_string(),
            concat!(
                r#"{"f:metadata":{"f:annotations":{"f:z":{}},"f:finalizers":{"v:\"a\"":{},"v:\"b\"":{}},"#,
                r#""f:ownerReferences":{"k:{\"uid\":\"u\"}":{".":{},"f:kind":{},"f:uid":{}}}},"#,
                r#""f:spec":{"f:cores":{},"f:extra":{"f:k":{".":{},"f:deep":{".":{},"f:x":{}}}},"f:tags":{"v:\"t\"":{}}}}"#
            )
        );
        assert_eq!(FieldSet::from_fields_v1(&encoded).unwrap(), set);
        // Multi-field keys are canonical whatever order they are written in.
        let a = FieldSet::from_fields_v1(&json!({"f:x": {r#"k:{"b":2,"a":"1"}"#: {}}})).unwrap();
        let b = FieldSet::from_fields_v1(&json!({"f:x": {r#"k:{"a":"1","b":2}"#: {}}})).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.paths(), vec![r#".x[a="1",b=2]"#]);
        assert_eq!(a.to_fields_v1(), json!({"f:x": {r#"k:{"a":"1","b":2}"#: {}}}));
        assert!(FieldSet::from_fields_v1(&json!({"i:0": {}})).is_err());
    }

    #[test]
    fn server_side_create_then_change_cores() {
        let rt = vm_rt();
        let cfg = vm(json!({"cpu": {"cores": 2}, "memory": {"size": 2048}}));
        let obj = apply(&rt, None, &cfg, "kubectl", None, false, T0).unwrap();
        assert_eq!(obj["metadata"]["name"], "vm1");
        assert_eq!(obj["metadata"]["namespace"], "default");
        assert_eq!(obj["spec"]["cpu"]["cores"], 2);
        assert_eq!(
            entries(&obj),
            vec![json!({"manager": "kubectl", "operation": "Apply", "apiVersion": "kpve.io/v1alpha1",
                        "time": T0, "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:spec": {"f:cpu": {"f:cores": {}}, "f:memory": {"f:size": {}}}}})]
        );
        let live = created(obj);
        let next = apply(
            &rt,
            Some(&live),
            &vm(json!({"cpu": {"cores": 4}, "memory": {"size": 2048}})),
            "kubectl",
            None,
            false,
            T1,
        )
        .unwrap();
        assert_eq!(next["spec"]["cpu"]["cores"], 4);
        assert_eq!(next["metadata"]["uid"], "u-1", "server-owned metadata passes through");
        assert_eq!(entries(&next).len(), 1);
        assert_eq!(entry(&next, "kubectl")["time"], T1, "the applier changed the object");
        // Applying the same again changes nothing at all.
        let again = apply(
            &rt,
            Some(&next),
            &vm(json!({"cpu": {"cores": 4}, "memory": {"size": 2048}})),
            "kubectl",
            None,
            false,
            T2,
        )
        .unwrap();
        assert_eq!(again.to_string(), next.to_string());
    }

    #[test]
    fn different_value_conflicts_same_value_shares_force_takes_over() {
        let rt = vm_rt();
        let a = apply(&rt, None, &vm(json!({"cpu": {"cores": 2, "sockets": 1}})), "alice", None, false, T0)
            .unwrap();
        let c = conflicts(apply(&rt, Some(&a), &vm(json!({"cpu": {"cores": 4}})), "bob", None, false, T1));
        assert_eq!(
            c,
            vec![Conflict {
                manager: "alice".into(),
                api_version: String::new(),
                field: ".spec.cpu.cores".into()
            }]
        );
        assert_eq!(
            SsaError::Conflicts(c).to_string(),
            r#"Apply failed with 1 conflict: conflict with "alice": .spec.cpu.cores"#
        );

        let shared = apply(&rt, Some(&a), &vm(json!({"cpu": {"cores": 2}})), "bob", None, false, T1).unwrap();
        assert_eq!(owned(&shared, "alice"), vec![".spec.cpu.cores", ".spec.cpu.sockets"]);
        assert_eq!(owned(&shared, "bob"), vec![".spec.cpu.cores"]);
        assert_eq!(entry(&shared, "alice")["time"], T0, "alice's entry did not change");

        let forced =
            apply(&rt, Some(&shared), &vm(json!({"cpu": {"cores": 8}})), "bob", None, true, T2).unwrap();
        assert_eq!(forced["spec"]["cpu"]["cores"], 8);
        assert_eq!(owned(&forced, "alice"), vec![".spec.cpu.sockets"]);
        assert_eq!(owned(&forced, "bob"), vec![".spec.cpu.cores"]);
        assert_eq!(entry(&forced, "alice")["time"], T2, "alice's set changed");

        // Forcing away a manager's only field drops its entry.
        let all =
            apply(&rt, Some(&forced), &vm(json!({"cpu": {"sockets": 2}})), "carol", None, true, T3).unwrap();
        let managers: Vec<Value> = entries(&all).iter().map(|e| e["manager"].clone()).collect();
        assert_eq!(managers, vec![json!("bob"), json!("carol")]);
    }

    #[test]
    fn multiple_conflicts_message() {
        let rt = vm_rt();
        let a = apply(&rt, None, &vm(json!({"cpu": {"cores": 2, "sockets": 1}})), "alice", None, false, T0)
            .unwrap();
        let err =
            apply(&rt, Some(&a), &vm(json!({"cpu": {"cores": 4, "sockets": 2}})), "bob", None, false, T1)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 2 conflicts: conflicts with \"alice\":\n- .spec.cpu.cores\n- .spec.cpu.sockets"
        );
    }

    #[test]
    fn dropped_field_is_removed_unless_co_owned() {
        let rt = vm_rt();
        let a = apply(
            &rt,
            None,
            &vm(json!({"cpu": {"cores": 2, "sockets": 2}, "onboot": true})),
            "alice",
            None,
            false,
            T0,
        )
        .unwrap();
        let dropped =
            apply(&rt, Some(&a), &vm(json!({"cpu": {"cores": 2}})), "alice", None, false, T1).unwrap();
        assert_eq!(dropped["spec"], json!({"cpu": {"cores": 2}}));
        assert_eq!(owned(&dropped, "alice"), vec![".spec.cpu.cores"]);

        let shared =
            apply(&rt, Some(&a), &vm(json!({"cpu": {"sockets": 2}})), "bob", None, false, T1).unwrap();
        let kept =
            apply(&rt, Some(&shared), &vm(json!({"cpu": {"cores": 2}})), "alice", None, false, T2).unwrap();
        assert_eq!(kept["spec"], json!({"cpu": {"cores": 2, "sockets": 2}}));
        assert_eq!(owned(&kept, "alice"), vec![".spec.cpu.cores"]);
        assert_eq!(owned(&kept, "bob"), vec![".spec.cpu.sockets"]);
    }

    #[test]
    fn list_map_items_of_two_managers_merge() {
        let rt = vm_rt();
        let a = apply(
            &rt,
            None,
            &vm(json!({"disks": [{"id": "scsi0", "size": "8G"}]})),
            "alice",
            None,
            false,
            T0,
        )
        .unwrap();
        let b = apply(
            &rt,
            Some(&a),
            &vm(json!({"disks": [{"id": "virtio1", "size": "4G"}]})),
            "bob",
            None,
            false,
            T1,
        )
        .unwrap();
        assert_eq!(
            b["spec"]["disks"],
            json!([{"id": "scsi0", "size": "8G"}, {"id": "virtio1", "size": "4G"}])
        );
        assert_eq!(
            entry(&b, "bob")["fieldsV1"],
            json!({"f:spec": {"f:disks": {r#"k:{"id":"virtio1"}"#: {".": {}, "f:id": {}, "f:size": {}}}}})
        );

        let c = conflicts(apply(
            &rt,
            Some(&b),
            &vm(json!({"disks": [{"id": "scsi0", "size": "16G"}]})),
            "bob",
            None,
            false,
            T2,
        ));
        assert_eq!(
            c.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(),
            vec![r#".spec.disks[id="scsi0"].size"#]
        );

        // Bob adds a field to Alice's item; then Alice drops her item: Bob's part keeps it alive.
        let b2 = apply(
            &rt,
            Some(&b),
            &vm(json!({"disks": [{"id": "virtio1", "size": "4G"}, {"id": "scsi0", "ssd": true}]})),
            "bob",
            None,
            false,
            T2,
        )
        .unwrap();
        let a2 = apply(&rt, Some(&b2), &vm(json!({"disks": []})), "alice", None, false, T3).unwrap();
        assert_eq!(
            a2["spec"]["disks"],
            json!([{"id": "scsi0", "ssd": true}, {"id": "virtio1", "size": "4G"}])
        );
        // Without co-owners an item Alice drops goes away.
        let a3 = apply(&rt, Some(&b), &vm(json!({"disks": []})), "alice", None, false, T3).unwrap();
        assert_eq!(a3["spec"]["disks"], json!([{"id": "virtio1", "size": "4G"}]));
        assert!(a3["metadata"]["managedFields"].as_array().unwrap().iter().all(|e| e["manager"] != "alice"));
    }

    #[test]
    fn identical_status_apply_is_a_no_op() {
        let rt = vm_rt();
        let live =
            created(apply(&rt, None, &vm(json!({"cpu": {"cores": 2}})), "kubectl", None, false, T0).unwrap());
        let body = json!({"apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
                          "status": {"phase": "Running", "node": "pve1", "vmid": null,
                                     "conditions": [{"type": "Ready", "status": "True", "reason": "Up"}]}});
        let first = apply(&rt, Some(&live), &body, "kpve-controller", Some("status"), true, T1).unwrap();
        assert_eq!(first["status"]["phase"], "Running");
        assert_eq!(first["status"]["vmid"], Value::Null, "nullable fields keep their null");
        let e = entry(&first, "kpve-controller");
        assert_eq!(e["subresource"], "status");
        assert_eq!(e["time"], T1);
        let second = apply(&rt, Some(&first), &body, "kpve-controller", Some("status"), true, T2).unwrap();
        assert_eq!(serde_json::to_string(&second).unwrap(), serde_json::to_string(&first).unwrap());
    }

    #[test]
    fn status_apply_ignores_spec_and_main_apply_ignores_status() {
        let rt = vm_rt();
        let live =
            created(apply(&rt, None, &vm(json!({"cpu": {"cores": 2}})), "kubectl", None, false, T0).unwrap());
        let mut body = vm(json!({"cpu": {"cores": 64}}));
        body["metadata"]["labels"] = json!({"sneaky": "yes"});
        body["status"] = json!({"phase": "Running"});
        let s = apply(&rt, Some(&live), &body, "ctrl", Some("status"), false, T1).unwrap();
        assert_eq!(s["spec"]["cpu"]["cores"], 2);
        assert!(s["metadata"].get("labels").is_none());
        assert_eq!(s["status"]["phase"], "Running");
        assert_eq!(owned(&s, "ctrl"), vec![".status.phase"]);

        // The same manager's main-resource apply is a separate entry and cannot touch status.
        body["status"] = json!({"phase": "Stopped"});
        let m = apply(&rt, Some(&s), &body, "ctrl", None, true, T2).unwrap();
        assert_eq!(m["status"], json!({"phase": "Running"}));
        assert_eq!(m["spec"]["cpu"]["cores"], 64);
        assert_eq!(m["metadata"]["labels"], json!({"sneaky": "yes"}));
        let ctrl: Vec<&Value> = m["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["manager"] == "ctrl")
            .collect();
        assert_eq!(ctrl.len(), 2);
        assert_eq!(ctrl[0]["subresource"], "status");
        assert_eq!(ctrl[0]["time"], T1, "the status entry is untouched");
        assert!(ctrl[1].get("subresource").is_none());
        assert_eq!(
            ctrl[1]["fieldsV1"],
            json!({"f:metadata": {"f:labels": {"f:sneaky": {}}}, "f:spec": {"f:cpu": {"f:cores": {}}}})
        );
        assert!(entries(&m).iter().all(|e| e["manager"] != "kubectl"), "forced away kubectl's only field");
    }

    #[test]
    fn update_then_apply_of_the_same_field_conflicts() {
        let rt = vm_rt();
        let mut obj = created(vm(json!({"cpu": {"cores": 2}})));
        obj["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": "{}"});
        record_update(&rt, None, &mut obj, "kubectl-client-side-apply", None, T0);
        let e = entry(&obj, "kubectl-client-side-apply");
        assert_eq!(e["operation"], "Update");
        assert_eq!(
            e["fieldsV1"],
            json!({"f:metadata": {"f:annotations": {"f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                   "f:spec": {"f:cpu": {"f:cores": {}}}})
        );
        let c =
            conflicts(apply(&rt, Some(&obj), &vm(json!({"cpu": {"cores": 4}})), "kubectl", None, false, T1));
        assert_eq!(
            c,
            vec![Conflict {
                manager: "kubectl-client-side-apply".into(),
                api_version: "kpve.io/v1alpha1".into(),
                field: ".spec.cpu.cores".into()
            }]
        );
        assert_eq!(c[0].message(), r#"conflict with "kubectl-client-side-apply" using kpve.io/v1alpha1"#);
        assert_eq!(
            SsaError::Conflicts(c).to_string(),
            r#"Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" using kpve.io/v1alpha1: .spec.cpu.cores"#
        );
    }

    #[test]
    fn record_update_takes_ownership_and_keeps_times_when_nothing_changed() {
        let rt = vm_rt();
        let live = created(
            apply(&rt, None, &vm(json!({"cpu": {"cores": 2, "sockets": 1}})), "alice", None, false, T0)
                .unwrap(),
        );
        let mut new = live.clone();
        new["spec"]["cpu"]["cores"] = json!(4);
        new["metadata"]["resourceVersion"] = json!("2");
        record_update(&rt, Some(&live), &mut new, "kubectl-edit", None, T1);
        assert_eq!(owned(&new, "alice"), vec![".spec.cpu.sockets"]);
        assert_eq!(owned(&new, "kubectl-edit"), vec![".spec.cpu.cores"]);
        assert_eq!(entry(&new, "kubectl-edit")["time"], T1);

        // Nothing changed: managedFields untouched.
        let mut same = new.clone();
        record_update(&rt, Some(&new), &mut same, "kubectl-edit", None, T2);
        assert_eq!(same.to_string(), new.to_string());
        // A PUT body without managedFields gets the old ones.
        let mut put = new.clone();
        put["metadata"].as_object_mut().unwrap().remove("managedFields");
        record_update(&rt, Some(&new), &mut put, "kubectl-replace", None, T2);
        assert_eq!(put, new);
        // Removing a field takes it out of every set; an empty manager records nothing.
        let mut removed = new.clone();
        removed["spec"]["cpu"].as_object_mut().unwrap().remove("sockets");
        let mut untouched = removed.clone();
        record_update(&rt, Some(&new), &mut untouched, "", None, T2);
        assert_eq!(untouched, removed);
        record_update(&rt, Some(&new), &mut removed, "kubectl-edit", None, T3);
        let managers: Vec<Value> = entries(&removed).iter().map(|e| e["manager"].clone()).collect();
        assert_eq!(managers, vec![json!("kubectl-edit")]);
        assert_eq!(entry(&removed, "kubectl-edit")["time"], T3);
    }

    #[test]
    fn status_update_is_tracked_separately() {
        let rt = vm_rt();
        let live = created(vm(json!({"cpu": {"cores": 2}})));
        let mut new = live.clone();
        new["status"] = json!({"phase": "Running"});
        record_update(&rt, Some(&live), &mut new, "ctrl", Some("status"), T1);
        let e = entry(&new, "ctrl");
        assert_eq!(e["subresource"], "status");
        assert_eq!(e["fieldsV1"], json!({"f:status": {"f:phase": {}}}));
    }

    #[test]
    fn set_lists_and_metadata_omitempty() {
        let rt = vm_rt();
        let mut cfg = vm(json!({"cpu": {"cores": 1}}));
        cfg["metadata"]["finalizers"] = json!(["kpve.io/a"]);
        cfg["metadata"]["labels"] = json!({"app": "x"});
        let a = created(apply(&rt, None, &cfg, "alice", None, false, T0).unwrap());
        let mut bcfg = vm(json!({}));
        bcfg["metadata"]["finalizers"] = json!(["kpve.io/b"]);
        bcfg.as_object_mut().unwrap().remove("spec");
        let b = apply(&rt, Some(&a), &bcfg, "bob", None, false, T1).unwrap();
        assert_eq!(b["metadata"]["finalizers"], json!(["kpve.io/a", "kpve.io/b"]));
        assert_eq!(owned(&b, "bob"), vec![r#".metadata.finalizers[="kpve.io/b"]"#]);

        // Alice drops her finalizer and label: the label map goes, the finalizer list stays.
        let a2 = apply(&rt, Some(&b), &vm(json!({"cpu": {"cores": 1}})), "alice", None, false, T2).unwrap();
        assert_eq!(a2["metadata"]["finalizers"], json!(["kpve.io/b"]));
        assert!(a2["metadata"].get("labels").is_none());
        // Bob drops his: no empty finalizers list is left behind.
        let mut bcfg2 = bcfg.clone();
        bcfg2["metadata"].as_object_mut().unwrap().remove("finalizers");
        let b2 = apply(&rt, Some(&a2), &bcfg2, "bob", None, false, T3).unwrap();
        assert!(b2["metadata"].get("finalizers").is_none());
        assert!(b2["metadata"]["managedFields"].as_array().unwrap().iter().all(|e| e["manager"] != "bob"));
    }

    #[test]
    fn server_owned_fields_are_never_tracked() {
        let rt = vm_rt();
        let mut cfg = vm(json!({"cpu": {"cores": 1}}));
        cfg["metadata"]["uid"] = json!("evil");
        cfg["metadata"]["resourceVersion"] = json!("99");
        cfg["metadata"]["managedFields"] = json!([{"manager": "forged"}]);
        let live = created(vm(json!({"cpu": {"cores": 1}})));
        let r = apply(&rt, Some(&live), &cfg, "alice", None, false, T1).unwrap();
        assert_eq!(r["metadata"]["uid"], "u-1");
        assert_eq!(r["metadata"]["resourceVersion"], "1");
        assert_eq!(entries(&r).len(), 1);
        assert_eq!(owned(&r, "alice"), vec![".spec.cpu.cores"]);
        let set = field_set(&rt, &cfg, None).unwrap();
        assert_eq!(set.paths(), vec![".spec.cpu.cores"]);
    }

    #[test]
    fn entry_order_is_kept_and_new_entries_go_last() {
        let rt = vm_rt();
        let a = apply(&rt, None, &vm(json!({"cpu": {"cores": 1}})), "a", None, false, T0).unwrap();
        let b = apply(&rt, Some(&a), &vm(json!({"onboot": true})), "b", None, false, T1).unwrap();
        let c = apply(&rt, Some(&b), &vm(json!({"cpu": {"cores": 3}})), "a", None, false, T2).unwrap();
        let names: Vec<Value> = entries(&c).iter().map(|e| e["manager"].clone()).collect();
        assert_eq!(names, vec![json!("a"), json!("b")]);
        assert_eq!(entry(&c, "a")["time"], T2);
        assert_eq!(entry(&c, "b")["time"], T1);
    }

    #[test]
    fn malformed_configs_are_invalid() {
        let rt = vm_rt();
        let invalid =
            |cfg: Value| matches!(apply(&rt, None, &cfg, "m", None, false, T0), Err(SsaError::Invalid(_)));
        assert!(invalid(json!([1, 2])));
        assert!(invalid(vm(json!({"disks": [{"size": "8G"}]}))));
        assert!(invalid(vm(json!({"disks": ["scsi0"]}))));
        assert!(invalid(vm(json!({"disks": [{"id": "scsi0"}, {"id": "scsi0", "size": "1G"}]}))));
        let mut dup = vm(json!({}));
        dup["metadata"]["finalizers"] = json!(["a", "a"]);
        assert!(invalid(dup));
    }

    #[test]
    fn null_metadata_in_config_leaves_server_metadata_alone() {
        let rt = vm_rt();
        let live =
            created(apply(&rt, None, &vm(json!({"cpu": {"cores": 1}})), "a", None, false, T0).unwrap());
        let mut cfg = vm(json!({"cpu": {"cores": 1}}));
        cfg["metadata"] = Value::Null;
        let r = apply(&rt, Some(&live), &cfg, "a", None, false, T1).unwrap();
        assert_eq!(r.to_string(), live.to_string());
    }

    #[test]
    fn record_update_on_create_owns_everything_tracked() {
        let rt = vm_rt();
        let mut obj = created(vm(json!({"cpu": {"cores": 2}, "disks": [{"id": "scsi0", "size": "8G"}]})));
        obj["status"] = json!({"phase": "Pending"});
        record_update(&rt, None, &mut obj, "kubectl-create", None, T0);
        assert_eq!(
            entries(&obj),
            vec![
                json!({"manager": "kubectl-create", "operation": "Update", "apiVersion": "kpve.io/v1alpha1",
                        "time": T0, "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:spec": {"f:cpu": {"f:cores": {}},
                                                "f:disks": {r#"k:{"id":"scsi0"}"#: {".": {}, "f:id": {}, "f:size": {}}}}}})
            ]
        );
    }

    #[test]
    fn null_in_config_removes_non_nullable_fields_and_conflicts_like_a_change() {
        let rt = small_rt(true);
        let base = json!({"apiVersion": "kpve.io/v1alpha1", "kind": "Thing", "metadata": {"name": "t"}});
        let mut a_cfg = base.clone();
        a_cfg["spec"] = json!({"cores": 2});
        let a = apply(&rt, None, &a_cfg, "alice", None, false, T0).unwrap();
        let mut b_cfg = base.clone();
        b_cfg["spec"] = json!({"cores": null});
        let c = conflicts(apply(&rt, Some(&a), &b_cfg, "bob", None, false, T1));
        assert_eq!(c[0].field, ".spec.cores");
        let b = apply(&rt, Some(&a), &b_cfg, "bob", None, true, T1).unwrap();
        assert_eq!(b["spec"], json!({}));
        assert_eq!(owned(&b, "bob"), vec![".spec.cores"]);
        let again = apply(&rt, Some(&b), &b_cfg, "bob", None, true, T2).unwrap();
        assert_eq!(again.to_string(), b.to_string());
    }

    #[test]
    fn free_form_map_entries_are_owned_and_removed_whole() {
        let rt = small_rt(false);
        let base = json!({"apiVersion": "kpve.io/v1alpha1", "kind": "Thing", "metadata": {"name": "t"}});
        let mut cfg = base.clone();
        cfg["spec"] = json!({"extra": {"one": {"a": 1}, "two": {"b": 2}}});
        let a = apply(&rt, None, &cfg, "alice", None, false, T0).unwrap();
        assert_eq!(
            owned(&a, "alice"),
            vec![".spec.extra.one", ".spec.extra.one.a", ".spec.extra.two", ".spec.extra.two.b"]
        );
        cfg["spec"] = json!({"extra": {"two": {"b": 2}}});
        let a2 = apply(&rt, Some(&a), &cfg, "alice", None, false, T1).unwrap();
        assert_eq!(a2["spec"], json!({"extra": {"two": {"b": 2}}}));
    }
}
