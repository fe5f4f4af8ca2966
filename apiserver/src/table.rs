//! Server-side printing: converts objects into a `meta.k8s.io/v1` `Table` (what `kubectl get`
//! asks for), with CRD `additionalPrinterColumns` semantics (apiextensions `tableconvertor`) and
//! kube-apiserver's column sets for the built-ins. Also the small JSONPath evaluator the printer
//! columns need and apimachinery's `HumanDuration`.

use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::resources::{PrinterColumn, ResourceType, partial_object_metadata};

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const CREATION_DESC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

// core/v1 Event field descriptions, which kube-apiserver uses for the event columns.
const EV_LAST_SEEN: &str = "The time at which the most recent occurrence of this event was recorded.";
const EV_TYPE: &str = "Type of this event (Normal, Warning), new types could be added in the future";
const EV_REASON: &str = "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.";
const EV_OBJECT: &str = "The object that this event is about.";
const EV_SUBOBJECT: &str = "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2].";
const EV_SOURCE: &str =
    "The component reporting this event. Should be a short machine understandable string.";
const EV_MESSAGE: &str = "A human-readable description of the status of this operation.";
const EV_FIRST_SEEN: &str =
    "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)";
const EV_COUNT: &str = "The number of times this event has occurred.";

/// How one column's cell is computed.
enum Cell {
    /// `metadata.name`.
    Name,
    /// Human age of `metadata.creationTimestamp`; `<unknown>` when unset.
    Age,
    /// `metadata.creationTimestamp` as RFC 3339 (the generic convertor's "Created At").
    CreatedAt,
    /// A CRD printer column (JSONPath, typed by the column type).
    Printer(PrinterColumn),
    /// A plain string field; missing -> "" (Go zero value, as the built-in printers do).
    Text(&'static str),
    EventLastSeen,
    EventFirstSeen,
    EventSubobject,
    EventMessage,
    EventObject,
    EventSource,
    EventCount,
}

struct Column {
    name: String,
    type_: String,
    format: String,
    description: String,
    priority: i32,
    cell: Cell,
}

impl Column {
    fn new(name: &str, type_: &str, description: &str, cell: Cell) -> Column {
        Column {
            name: name.into(),
            type_: type_.into(),
            format: String::new(),
            description: description.into(),
            priority: 0,
            cell,
        }
    }

    /// A CRD `additionalPrinterColumns` entry; the description defaults like apiextensions'
    /// tableconvertor.
    fn printer(p: &PrinterColumn) -> Column {
        let description = if p.description.is_empty() {
            format!("Custom resource definition column (in JSONPath format): {}", p.json_path)
        } else {
            p.description.clone()
        };
        Column {
            name: p.name.clone(),
            type_: p.type_.clone(),
            format: p.format.clone(),
            description,
            priority: p.priority,
            cell: Cell::Printer(p.clone()),
        }
    }

    fn definition(&self) -> Value {
        json!({
            "name": self.name,
            "type": self.type_,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        })
    }

    fn wide(mut self) -> Column {
        self.priority = 1;
        self
    }
}

fn name_column() -> Column {
    Column { format: "name".into(), ..Column::new("Name", "string", NAME_DESC, Cell::Name) }
}

fn age_column() -> Column {
    Column::new("Age", "date", CREATION_DESC, Cell::Age)
}

/// Converts objects to a meta.k8s.io/v1 Table. `include_object` is `"None"`, `"Metadata"` (the
/// default; anything unrecognised is treated as it) or `"Object"`. `list_metadata` becomes the
/// Table's `metadata` (`resourceVersion`, `continue`). `with_headers = false` sends an empty
/// `columnDefinitions`, as kube-apiserver does on watch events after the first.
pub fn to_table(
    rt: &ResourceType,
    objects: &[Value],
    list_metadata: Value,
    include_object: &str,
    with_headers: bool,
    now: Timestamp,
) -> Value {
    let columns = columns(rt);
    let definitions: Vec<Value> =
        if with_headers { columns.iter().map(Column::definition).collect() } else { Vec::new() };
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let cells: Vec<Value> = columns.iter().map(|c| cell(&c.cell, object, now)).collect();
            let mut row = Map::new();
            row.insert("cells".into(), Value::Array(cells));
            match include_object {
                "None" => {}
                "Object" => {
                    row.insert("object".into(), object.clone());
                }
                _ => {
                    row.insert("object".into(), partial_object_metadata(object));
                }
            }
            Value::Object(row)
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata,
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

/// The columns for a type: Name + the CRD printer columns, or kube-apiserver's set for the
/// built-ins, or Name + Age.
fn columns(rt: &ResourceType) -> Vec<Column> {
    if !rt.printer_columns.is_empty() {
        return std::iter::once(name_column())
            .chain(rt.printer_columns.iter().map(Column::printer))
            .collect();
    }
    match (rt.builtin, rt.group.as_str(), rt.kind.as_str()) {
        (true, "", "Namespace") => vec![
            name_column(),
            Column::new("Status", "string", "The status of the namespace", Cell::Text("/status/phase")),
            age_column(),
        ],
        // kube-apiserver's event printer (pkg/printers/internalversion): Name comes last and is
        // wide-only, which is why `kubectl get events` starts with LAST SEEN.
        (true, "" | "events.k8s.io", "Event") => vec![
            Column::new("Last Seen", "string", EV_LAST_SEEN, Cell::EventLastSeen),
            Column::new("Type", "string", EV_TYPE, Cell::Text("/type")),
            Column::new("Reason", "string", EV_REASON, Cell::Text("/reason")),
            Column::new("Object", "string", EV_OBJECT, Cell::EventObject),
            Column::new("Subobject", "string", EV_SUBOBJECT, Cell::EventSubobject).wide(),
            Column::new("Source", "string", EV_SOURCE, Cell::EventSource).wide(),
            Column::new("Message", "string", EV_MESSAGE, Cell::EventMessage),
            Column::new("First Seen", "string", EV_FIRST_SEEN, Cell::EventFirstSeen).wide(),
            // kube declares Count as a string column but sends an integer cell.
            Column::new("Count", "string", EV_COUNT, Cell::EventCount).wide(),
            name_column().wide(),
        ],
        (true, "coordination.k8s.io", "Lease") => vec![
            name_column(),
            Column::new("Holder", "string", "The holder of a lease", Cell::Text("/spec/holderIdentity")),
            age_column(),
        ],
        // apiextensions serves CRDs through the generic convertor: an absolute timestamp.
        (true, "apiextensions.k8s.io", "CustomResourceDefinition") => {
            vec![name_column(), Column::new("Created At", "date", CREATION_DESC, Cell::CreatedAt)]
        }
        _ => vec![name_column(), age_column()],
    }
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// A core/v1 Event field, falling back to its events.k8s.io/v1 name so both views of the one
/// event store print the same.
fn event_field<'a>(object: &'a Value, core: &str, events: &str) -> Option<&'a Value> {
    object.get(core).filter(|v| !v.is_null()).or_else(|| object.get(events).filter(|v| !v.is_null()))
}

fn event_str<'a>(object: &'a Value, core: &str, events: &str) -> &'a str {
    event_field(object, core, events).and_then(Value::as_str).unwrap_or("")
}

fn cell(cell: &Cell, object: &Value, now: Timestamp) -> Value {
    match cell {
        Cell::Name => json!(str_at(object, "/metadata/name")),
        Cell::Age => json!(since(object.pointer("/metadata/creationTimestamp"), now)),
        Cell::CreatedAt => {
            let created = object.pointer("/metadata/creationTimestamp").and_then(Value::as_str);
            match created.and_then(|s| s.parse::<Timestamp>().ok()) {
                Some(ts) => json!(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                // Go formats the zero time for a missing timestamp.
                None => json!("0001-01-01T00:00:00Z"),
            }
        }
        Cell::Printer(p) => printer_cell(p, object, now),
        Cell::EventSubobject => {
            let target = event_field(object, "involvedObject", "regarding");
            json!(target.and_then(|t| t.get("fieldPath")).and_then(Value::as_str).unwrap_or(""))
        }
        Cell::EventMessage => json!(event_str(object, "message", "note").trim()),
        Cell::Text(pointer) => json!(str_at(object, pointer)),
        Cell::EventFirstSeen => json!(event_first_seen(object, now)),
        Cell::EventLastSeen => {
            if let Some(series) = event_field(object, "series", "series") {
                return json!(since(series.get("lastObservedTime"), now));
            }
            match event_field(object, "lastTimestamp", "deprecatedLastTimestamp") {
                Some(last) if !is_zero_time(last) => json!(since(Some(last), now)),
                _ => json!(event_first_seen(object, now)),
            }
        }
        Cell::EventObject => {
            let target = event_field(object, "involvedObject", "regarding");
            let kind =
                target.and_then(|t| t.get("kind")).and_then(Value::as_str).unwrap_or("").to_lowercase();
            match target.and_then(|t| t.get("name")).and_then(Value::as_str).filter(|n| !n.is_empty()) {
                Some(name) => json!(format!("{kind}/{name}")),
                None => json!(kind),
            }
        }
        Cell::EventSource => {
            let source = event_field(object, "source", "deprecatedSource");
            let field = |k: &str| source.and_then(|s| s.get(k)).and_then(Value::as_str).unwrap_or("");
            let component = Some(field("component"))
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| event_str(object, "reportingComponent", "reportingController"));
            let host = Some(field("host"))
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| str_at(object, "/reportingInstance"));
            if host.is_empty() { json!(component) } else { json!(format!("{component}, {host}")) }
        }
        Cell::EventCount => {
            if let Some(series) = event_field(object, "series", "series") {
                return json!(series.get("count").and_then(Value::as_i64).unwrap_or(0));
            }
            match event_field(object, "count", "deprecatedCount").and_then(Value::as_i64).unwrap_or(0) {
                // Singleton events written through events.k8s.io have no count.
                0 => json!(1),
                n => json!(n),
            }
        }
    }
}

fn event_first_seen(object: &Value, now: Timestamp) -> String {
    match event_field(object, "firstTimestamp", "deprecatedFirstTimestamp") {
        Some(first) if !is_zero_time(first) => since(Some(first), now),
        _ => since(object.get("eventTime"), now),
    }
}

/// Go's zero `metav1.Time`: absent, null, empty, or year 1.
fn is_zero_time(v: &Value) -> bool {
    v.as_str().is_none_or(|s| s.is_empty() || s.starts_with("0001-01-01T00:00:00"))
}

/// `translateTimestampSince`: the age of a timestamp, `<unknown>` when unset.
fn since(timestamp: Option<&Value>, now: Timestamp) -> String {
    match timestamp {
        Some(v) if !is_zero_time(v) => match v.as_str().and_then(|s| s.parse::<Timestamp>().ok()) {
            Some(t) => human_nanos(now.as_nanosecond() - t.as_nanosecond()),
            None => "<unknown>".into(),
        },
        _ => "<unknown>".into(),
    }
}

/// A CRD printer column cell, typed as apiextensions' `cellForJSONValue`: a value of the wrong
/// JSON type gives null, `string` columns print any value (non-scalars as compact JSON, like
/// kubectl's JSONPath printer), `date` columns print a human age.
fn printer_cell(column: &PrinterColumn, object: &Value, now: Timestamp) -> Value {
    let Some(value) = eval_json_path(object, &column.json_path) else { return Value::Null };
    match (column.type_.as_str(), &value) {
        (_, Value::Null) => Value::Null,
        ("integer", Value::Number(n)) => match n.as_i64() {
            Some(i) => json!(i),
            // Go truncates a float64 toward zero.
            None => n.as_f64().map(|f| json!(f as i64)).unwrap_or(Value::Null),
        },
        ("number", Value::Number(_)) | ("boolean", Value::Bool(_)) => value,
        ("string", Value::String(_)) => value,
        ("string", Value::Number(n)) => json!(n.to_string()),
        ("string", Value::Bool(b)) => json!(b.to_string()),
        ("string", _) => json!(value.to_string()),
        ("date", Value::String(s)) if s.is_empty() => json!("<unknown>"),
        ("date", Value::String(s)) => match s.parse::<Timestamp>() {
            Ok(t) => json!(human_nanos(now.as_nanosecond() - t.as_nanosecond())),
            Err(_) => json!("<invalid>"),
        },
        ("integer" | "number" | "boolean" | "date", _) => Value::Null,
        // Unknown column types (the CRD API rejects them): scalars as they are, the rest as JSON.
        (_, Value::Array(_) | Value::Object(_)) => json!(value.to_string()),
        _ => value,
    }
}

/// Evaluates a printer-column JSONPath (`.spec.vmid`,
/// `.status.conditions[?(@.type=="Ready")].status`, `.items[*].name`, `.a[0]`, `['x.y']`,
/// `..name`, optionally wrapped in `{}`) and returns the first match, or `None` when nothing
/// matches or the path cannot be parsed.
pub fn eval_json_path(object: &Value, path: &str) -> Option<Value> {
    let path = path.trim();
    let path = path.strip_prefix('{').and_then(|p| p.strip_suffix('}')).unwrap_or(path).trim();
    let path = path.strip_prefix('$').unwrap_or(path);
    let steps = parse_path(path)?;
    evaluate(object, &steps).into_iter().next().cloned()
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    /// `..name`: every descendant field called `name`.
    Descend(String),
    Wildcard,
    Index(i64),
    Filter(Box<Filter>),
}

#[derive(Debug, Clone, PartialEq)]
struct Filter {
    path: Vec<Step>,
    /// `None`: keep the item when the path exists.
    compare: Option<(Compare, Value)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Compare {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

fn parse_path(path: &str) -> Option<Vec<Step>> {
    let chars: Vec<char> = path.chars().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                let descend = chars.get(i + 1) == Some(&'.');
                i += if descend { 2 } else { 1 };
                let start = i;
                while i < chars.len() && !matches!(chars[i], '.' | '[') {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                match (descend, name.as_str()) {
                    (true, "") => return None,
                    (true, _) => steps.push(Step::Descend(name)),
                    // A bare "." (the whole object) or a trailing dot.
                    (false, "") => {}
                    (false, "*") => steps.push(Step::Wildcard),
                    (false, _) => steps.push(Step::Field(name)),
                }
            }
            '[' => {
                let end = matching_bracket(&chars, i)?;
                let inner: String = chars[i + 1..end].iter().collect();
                steps.push(parse_bracket(inner.trim())?);
                i = end + 1;
            }
            c if c.is_whitespace() => i += 1,
            _ => return None,
        }
    }
    Some(steps)
}

/// Index of the `]` closing the `[` at `open`, skipping quoted strings and nested brackets.
fn matching_bracket(chars: &[char], open: usize) -> Option<usize> {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    for (i, &c) in chars.iter().enumerate().skip(open) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[') => depth += 1,
            (None, ']') => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn parse_bracket(inner: &str) -> Option<Step> {
    if inner == "*" {
        return Some(Step::Wildcard);
    }
    if let Some(expr) = inner.strip_prefix('?') {
        let expr = expr.trim().strip_prefix('(')?.strip_suffix(')')?.trim();
        return Some(Step::Filter(Box::new(parse_filter(expr)?)));
    }
    if let Some(name) = unquote(inner) {
        return Some(Step::Field(name));
    }
    inner.parse::<i64>().ok().map(Step::Index)
}

fn unquote(s: &str) -> Option<String> {
    let quote = s.chars().next().filter(|c| matches!(c, '"' | '\''))?;
    let body = s.strip_prefix(quote)?.strip_suffix(quote)?;
    Some(body.to_string())
}

fn parse_filter(expr: &str) -> Option<Filter> {
    // Two-character operators first so "<=" is not read as "<".
    const OPS: [(&str, Compare); 6] = [
        ("==", Compare::Eq),
        ("!=", Compare::Ne),
        ("<=", Compare::Le),
        (">=", Compare::Ge),
        ("<", Compare::Lt),
        (">", Compare::Gt),
    ];
    let operator = OPS
        .iter()
        .filter_map(|(text, op)| find_outside_quotes(expr, text).map(|at| (at, *text, *op)))
        .min_by_key(|(at, text, _)| (*at, usize::MAX - text.len()));
    let (left, compare) = match operator {
        Some((at, text, op)) => {
            let literal = parse_literal(expr[at + text.len()..].trim())?;
            (expr[..at].trim(), Some((op, literal)))
        }
        None => (expr, None),
    };
    let relative = left.strip_prefix('@')?;
    Some(Filter { path: parse_path(relative)?, compare })
}

fn find_outside_quotes(s: &str, needle: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if s[i..].starts_with(needle) => return Some(i),
            None => {}
        }
    }
    None
}

fn parse_literal(text: &str) -> Option<Value> {
    if let Some(s) = unquote(text) {
        return Some(Value::String(s));
    }
    match text {
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        "null" => Some(Value::Null),
        _ => serde_json::from_str::<serde_json::Number>(text).ok().map(Value::Number),
    }
}

fn evaluate<'a>(root: &'a Value, steps: &[Step]) -> Vec<&'a Value> {
    let mut current = vec![root];
    for step in steps {
        let mut next = Vec::new();
        for value in current {
            match step {
                Step::Field(name) => next.extend(value.get(name.as_str())),
                Step::Descend(name) => descend(value, name, &mut next),
                Step::Wildcard => match value {
                    Value::Array(items) => next.extend(items.iter()),
                    Value::Object(map) => next.extend(map.values()),
                    _ => {}
                },
                Step::Index(index) => {
                    if let Value::Array(items) = value {
                        let at = if *index < 0 { items.len() as i64 + index } else { *index };
                        next.extend(usize::try_from(at).ok().and_then(|at| items.get(at)));
                    }
                }
                Step::Filter(filter) => {
                    if let Value::Array(items) = value {
                        next.extend(items.iter().filter(|item| filter_matches(filter, item)));
                    }
                }
            }
        }
        current = next;
    }
    current
}

fn descend<'a>(value: &'a Value, name: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            out.extend(map.get(name));
            map.values().for_each(|v| descend(v, name, out));
        }
        Value::Array(items) => items.iter().for_each(|v| descend(v, name, out)),
        _ => {}
    }
}

fn filter_matches(filter: &Filter, item: &Value) -> bool {
    let Some(left) = evaluate(item, &filter.path).into_iter().next() else { return false };
    let Some((op, right)) = &filter.compare else { return true };
    let ordering = match (left, right) {
        (Value::Number(a), Value::Number(b)) => {
            a.as_f64().zip(b.as_f64()).and_then(|(a, b)| a.partial_cmp(&b))
        }
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (a, b) if a == b => Some(std::cmp::Ordering::Equal),
        _ => None,
    };
    match (op, ordering) {
        (Compare::Ne, None) => true,
        (_, None) => false,
        (Compare::Eq, Some(o)) => o.is_eq(),
        (Compare::Ne, Some(o)) => o.is_ne(),
        (Compare::Lt, Some(o)) => o.is_lt(),
        (Compare::Le, Some(o)) => o.is_le(),
        (Compare::Gt, Some(o)) => o.is_gt(),
        (Compare::Ge, Some(o)) => o.is_ge(),
    }
}

/// apimachinery `duration.HumanDuration`: ~2–3 significant figures ("119s", "3m10s", "70m",
/// "7h59m", "47h", "2d1h", "8d", "729d", "2y1d", "8y").
pub fn human_duration(d: Duration) -> String {
    human_nanos(i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// `HumanDuration` on a signed nanosecond count: up to 2 s in the future is "0s" (clock skew),
/// further is "<invalid>". Integer division truncates toward zero, as Go's `int(d.Seconds())`.
fn human_nanos(nanos: i128) -> String {
    const SECOND: i128 = 1_000_000_000;
    let seconds = nanos / SECOND;
    if seconds < -1 {
        return "<invalid>".into();
    } else if seconds < 0 {
        return "0s".into();
    } else if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    } else if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        let h = hours % 24;
        if h == 0 { format!("{}d", hours / 24) } else { format!("{}d{h}h", hours / 24) }
    } else if hours < 24 * 365 * 2 {
        format!("{}d", hours / 24)
    } else if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        if dy == 0 { format!("{}y", hours / 24 / 365) } else { format!("{}y{dy}d", hours / 24 / 365) }
    } else {
        format!("{}y", hours / 24 / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Registry;

    fn registry() -> Registry {
        Registry::new(&kpve_crds::crdgen::all())
    }

    fn now() -> Timestamp {
        "2026-05-01T12:00:00Z".parse().expect("timestamp")
    }

    fn names(table: &Value) -> Vec<&str> {
        table["columnDefinitions"]
            .as_array()
            .expect("defs")
            .iter()
            .map(|c| c["name"].as_str().expect("name"))
            .collect()
    }

    #[test]
    fn virtual_machine_table() {
        let reg = registry();
        let rt = reg.get("kpve.io", "v1alpha1", "virtualmachines").expect("vm type");
        let vm = json!({
            "apiVersion": "kpve.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {
                "name": "vm1",
                "namespace": "default",
                "creationTimestamp": "2026-05-01T11:54:50Z",
                "labels": {"a": "b"},
            },
            "spec": {"vmid": 100, "powerState": "Running", "cpu": {"cores": 4}, "memory": {"size": 2048}},
            "status": {"phase": "Running", "conditions": [
                {"type": "Synced", "status": "False"},
                {"type": "Ready", "status": "True"},
            ]},
        });
        let bare = json!({"metadata": {"name": "vm2"}});
        let table = to_table(
            rt,
            &[vm.clone(), bare],
            json!({"resourceVersion": "101", "continue": ""}),
            "Metadata",
            true,
            now(),
        );
        assert_eq!(table["kind"], "Table");
        assert_eq!(table["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(table["metadata"], json!({"resourceVersion": "101", "continue": ""}));
        assert_eq!(
            names(&table),
            ["Name", "VMID", "Node", "Power", "State", "Ready", "Age", "CPUs", "Memory"]
        );
        let defs = &table["columnDefinitions"];
        assert_eq!(
            defs[0],
            json!({
                "name": "Name", "type": "string", "format": "name", "description": NAME_DESC, "priority": 0,
            })
        );
        assert_eq!(defs[1]["type"], "integer");
        assert_eq!(
            defs[1]["description"],
            "Custom resource definition column (in JSONPath format): .spec.vmid"
        );
        assert_eq!(defs[6]["type"], "date");
        assert_eq!(defs[7]["priority"], 1);
        assert_eq!(
            table["rows"][0]["cells"],
            json!(["vm1", 100, null, "Running", "Running", "True", "5m10s", 4, 2048])
        );
        assert_eq!(table["rows"][1]["cells"], json!(["vm2", null, null, null, null, null, null, null, null]));
        let object = &table["rows"][0]["object"];
        assert_eq!(object["kind"], "PartialObjectMetadata");
        assert_eq!(object["metadata"]["labels"]["a"], "b");

        let no_headers = to_table(rt, std::slice::from_ref(&vm), json!({}), "None", false, now());
        assert_eq!(no_headers["columnDefinitions"], json!([]));
        assert!(no_headers["rows"][0].get("object").is_none());
        let full = to_table(rt, std::slice::from_ref(&vm), json!({}), "Object", true, now());
        assert_eq!(full["rows"][0]["object"], vm);
    }

    #[test]
    fn printer_cell_typing() {
        let col = |type_: &str, path: &str| PrinterColumn {
            name: "X".into(),
            type_: type_.into(),
            format: String::new(),
            description: String::new(),
            priority: 0,
            json_path: path.into(),
        };
        let obj = json!({
            "n": 3, "f": 2.7, "s": "x", "b": true, "o": {"k": [1, 2]},
            "t": "2026-05-01T11:00:00Z", "bad": "yesterday",
        });
        let cases = [
            (col("integer", ".n"), json!(3)),
            (col("integer", ".f"), json!(2)),
            (col("integer", ".s"), Value::Null),
            (col("number", ".f"), json!(2.7)),
            (col("boolean", ".b"), json!(true)),
            (col("boolean", ".s"), Value::Null),
            (col("string", ".s"), json!("x")),
            (col("string", ".n"), json!("3")),
            (col("string", ".b"), json!("true")),
            (col("string", ".o"), json!("{\"k\":[1,2]}")),
            (col("string", ".missing"), Value::Null),
            (col("date", ".t"), json!("60m")),
            (col("date", ".bad"), json!("<invalid>")),
            (col("date", ".n"), Value::Null),
        ];
        for (column, want) in cases {
            assert_eq!(printer_cell(&column, &obj, now()), want, "{} {}", column.type_, column.json_path);
        }
    }

    #[test]
    fn builtin_tables() {
        let reg = registry();
        let t = |group: &str, plural: &str, obj: Value| {
            to_table(reg.get(group, "v1", plural).expect("type"), &[obj], json!({}), "Metadata", true, now())
        };
        let ns = t(
            "",
            "namespaces",
            json!({
                "metadata": {"name": "default", "creationTimestamp": "2026-04-28T12:00:00Z"},
                "status": {"phase": "Active"},
            }),
        );
        assert_eq!(names(&ns), ["Name", "Status", "Age"]);
        assert_eq!(ns["rows"][0]["cells"], json!(["default", "Active", "3d"]));

        let lease = t(
            "coordination.k8s.io",
            "leases",
            json!({
                "metadata": {"name": "ctl", "creationTimestamp": "2026-05-01T09:30:00Z"},
                "spec": {"holderIdentity": "pod-1"},
            }),
        );
        assert_eq!(names(&lease), ["Name", "Holder", "Age"]);
        assert_eq!(lease["rows"][0]["cells"], json!(["ctl", "pod-1", "150m"]));
        let unheld = t("coordination.k8s.io", "leases", json!({"metadata": {"name": "x"}}));
        assert_eq!(unheld["rows"][0]["cells"], json!(["x", "", "<unknown>"]));

        let crd = t(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            json!({
                "metadata": {"name": "virtualmachines.kpve.io", "creationTimestamp": "2026-04-01T10:00:00.5Z"},
            }),
        );
        assert_eq!(names(&crd), ["Name", "Created At"]);
        assert_eq!(crd["rows"][0]["cells"], json!(["virtualmachines.kpve.io", "2026-04-01T10:00:00Z"]));

        let core_event = json!({
            "metadata": {"name": "vm1.17a", "namespace": "default"},
            "involvedObject": {"kind": "VirtualMachine", "name": "vm1", "fieldPath": "spec"},
            "reason": "Started", "message": " booted \n", "type": "Normal",
            "source": {"component": "kpve-controller"},
            "firstTimestamp": "2026-05-01T11:00:00Z", "lastTimestamp": "2026-05-01T11:58:00Z", "count": 3,
        });
        let ev = t("", "events", core_event);
        assert_eq!(
            names(&ev),
            [
                "Last Seen",
                "Type",
                "Reason",
                "Object",
                "Subobject",
                "Source",
                "Message",
                "First Seen",
                "Count",
                "Name"
            ]
        );
        assert_eq!(ev["columnDefinitions"][9]["format"], "name");
        assert_eq!(ev["columnDefinitions"][9]["priority"], 1);
        assert_eq!(
            ev["rows"][0]["cells"],
            json!([
                "2m",
                "Normal",
                "Started",
                "virtualmachine/vm1",
                "spec",
                "kpve-controller",
                "booted",
                "60m",
                3,
                "vm1.17a"
            ])
        );

        // What the kube-rs Recorder writes through events.k8s.io/v1.
        let new_event = json!({
            "metadata": {"name": "vm1.17b", "namespace": "default"},
            "regarding": {"kind": "VirtualMachine", "name": "vm1"},
            "reason": "Reconciled", "note": "ok", "type": "Normal", "action": "Reconcile",
            "reportingController": "kpve", "reportingInstance": "kpve-0",
            "eventTime": "2026-05-01T11:59:30.000000Z",
        });
        let ev2 = t("events.k8s.io", "events", new_event);
        assert_eq!(
            ev2["rows"][0]["cells"],
            json!([
                "30s",
                "Normal",
                "Reconciled",
                "virtualmachine/vm1",
                "",
                "kpve, kpve-0",
                "ok",
                "30s",
                1,
                "vm1.17b"
            ])
        );
        let series = t(
            "events.k8s.io",
            "events",
            json!({
                "metadata": {"name": "e"}, "eventTime": "2026-05-01T10:00:00Z",
                "series": {"count": 7, "lastObservedTime": "2026-05-01T11:59:55Z"},
            }),
        );
        assert_eq!(series["rows"][0]["cells"][0], "5s");
        assert_eq!(series["rows"][0]["cells"][8], 7);
    }

    #[test]
    fn default_columns() {
        let reg = registry();
        let mut rt = reg.get("kpve.io", "v1alpha1", "virtualmachines").expect("vm").clone();
        rt.printer_columns.clear();
        let table = to_table(
            &rt,
            &[json!({"metadata": {"name": "a", "creationTimestamp": "2024-04-01T12:00:00Z"}})],
            json!({}),
            "",
            true,
            now(),
        );
        assert_eq!(names(&table), ["Name", "Age"]);
        assert_eq!(table["columnDefinitions"][1]["type"], "date");
        assert_eq!(table["rows"][0]["cells"], json!(["a", "2y30d"]));
        assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let future = to_table(
            &rt,
            &[json!({"metadata": {"name": "b", "creationTimestamp": "2026-05-01T12:00:05Z"}})],
            json!({}),
            "",
            true,
            now(),
        );
        assert_eq!(future["rows"][0]["cells"][1], "<invalid>");
    }

    #[test]
    fn json_path() {
        let obj = json!({
            "spec": {
                "vmid": 100,
                "disks": [{"name": "scsi0", "size": 10}, {"name": "scsi1", "size": 20}],
                "a.b": "dotted",
            },
            "status": {"conditions": [
                {"type": "Synced", "status": "False"},
                {"type": "Ready", "status": "True"},
            ]},
        });
        let cases = [
            (".spec.vmid", Some(json!(100))),
            ("{.spec.vmid}", Some(json!(100))),
            ("$.spec.vmid", Some(json!(100))),
            (".status.conditions[?(@.type==\"Ready\")].status", Some(json!("True"))),
            (".status.conditions[?(@.type=='Synced')].status", Some(json!("False"))),
            (".status.conditions[?(@.type != \"Synced\")].type", Some(json!("Ready"))),
            (".status.conditions[?(@.type==\"Missing\")].status", None),
            (".spec.disks[?(@.size>15)].name", Some(json!("scsi1"))),
            (".spec.disks[?(@.size<=10)].name", Some(json!("scsi0"))),
            (".spec.disks[*].name", Some(json!("scsi0"))),
            (".spec.disks[1].name", Some(json!("scsi1"))),
            (".spec.disks[-1].size", Some(json!(20))),
            (".spec.disks[5].name", None),
            (".spec['a.b']", Some(json!("dotted"))),
            (".spec[\"vmid\"]", Some(json!(100))),
            ("..size", Some(json!(10))),
            (".spec.missing", None),
            (".spec.vmid.deeper", None),
            (".spec.disks", Some(obj["spec"]["disks"].clone())),
            (".spec.disks[", None),
            ("spec", None),
        ];
        for (path, want) in cases {
            assert_eq!(eval_json_path(&obj, path), want, "{path}");
        }
    }

    #[test]
    fn human_durations_match_apimachinery() {
        const MS: u64 = 1_000_000;
        let s = |n: u64| Duration::from_secs(n);
        let m = |n: u64| s(n * 60);
        let h = |n: u64| m(n * 60);
        let d = |n: u64| h(n * 24);
        let ms = Duration::from_nanos(MS);
        let cases = [
            (s(1), "1s"),
            (s(70), "70s"),
            (s(190), "3m10s"),
            (m(70), "70m"),
            (h(47), "47h"),
            (h(49), "2d1h"),
            (h(8 * 24 + 2), "8d"),
            (h(367 * 24), "367d"),
            (h(365 * 2 * 24 + 25), "2y1d"),
            (h(365 * 8 * 24 + 2), "8y"),
            (Duration::ZERO, "0s"),
            (s(1) - ms, "0s"),
            (m(2) - ms, "119s"),
            (m(2), "2m"),
            (m(2) + s(1), "2m1s"),
            (m(10) - ms, "9m59s"),
            (m(10), "10m"),
            (m(10) + s(1), "10m"),
            (h(3) - ms, "179m"),
            (h(3), "3h"),
            (h(3) + m(1), "3h1m"),
            (h(8) - ms, "7h59m"),
            (h(8), "8h"),
            (h(8) + m(59), "8h"),
            (d(2) - ms, "47h"),
            (d(2), "2d"),
            (d(2) + h(1), "2d1h"),
            (d(8) - ms, "7d23h"),
            (d(8), "8d"),
            (d(8) + h(23), "8d"),
            (d(2 * 365) - ms, "729d"),
            (d(2 * 365), "2y"),
            (d(2 * 365) + h(23), "2y"),
            (d(2 * 365) + h(23) + m(59), "2y"),
            (d(2 * 365) + h(24) - ms, "2y"),
            (d(2 * 365) + h(24), "2y1d"),
            (d(3 * 365), "3y"),
            (d(4 * 365), "4y"),
            (d(5 * 365), "5y"),
            (d(6 * 365), "6y"),
            (d(7 * 365), "7y"),
            (d(8 * 365) - ms, "7y364d"),
            (d(8 * 365), "8y"),
            (d(8 * 365) + d(364), "8y"),
            (d(9 * 365), "9y"),
        ];
        for (duration, want) in cases {
            assert_eq!(human_duration(duration), want, "{duration:?}");
        }
        // Negative (clock skew) boundaries, via the signed form used for cells.
        assert_eq!(human_nanos(-2_000_000_000), "<invalid>");
        assert_eq!(human_nanos(-2_000_000_000 + 1), "0s");
    }
}
