//! What happens to an object between decoding and storage: structural pruning of unknown
//! fields (reported per `fieldValidation`), defaulting from the schema, schema validation
//! (422 with one cause per field), metadata validation, and VMID allocation for guests.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::resources::ResourceType;
use crate::status::{ApiError, Cause};

/// The `fieldValidation` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Result<FieldValidation, ApiError> {
        match value {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other:?}: supported values: Ignore, Warn, Strict"
            ))),
        }
    }
}

/// Removes fields the schema does not declare; returns their paths (`spec.bogus`).
pub fn prune(rt: &ResourceType, object: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    prune_metadata(object, &mut unknown);
    let Some(schema) = rt.schema.as_ref() else { return unknown };
    let Value::Object(map) = object else { return unknown };
    let props = schema.get("properties").and_then(Value::as_object);
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&key)) {
            Some(sub) => prune_value(sub, map.get_mut(&key).expect("key listed"), &key, &mut unknown),
            None if preserves(schema) => {}
            None => {
                map.remove(&key);
                unknown.push(key);
            }
        }
    }
    unknown
}

/// The fields of ObjectMeta; anything else in `metadata` is unknown for every kind.
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

fn prune_metadata(object: &mut Value, unknown: &mut Vec<String>) {
    let Some(Value::Object(meta)) = object.get_mut("metadata") else { return };
    let extra: Vec<String> =
        meta.keys().filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str())).cloned().collect();
    for key in extra {
        meta.remove(&key);
        unknown.push(format!("metadata.{key}"));
    }
}

fn preserves(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
}

fn prune_value(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                let keys: Vec<String> = map.keys().cloned().collect();
                for key in keys {
                    let child = format!("{path}.{key}");
                    match props.get(&key) {
                        Some(sub) => {
                            prune_value(sub, map.get_mut(&key).expect("key listed"), &child, unknown)
                        }
                        None if preserves(schema) => {}
                        None => {
                            map.remove(&key);
                            unknown.push(child);
                        }
                    }
                }
            } else if let Some(sub) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                for (key, v) in map.iter_mut() {
                    prune_value(sub, v, &format!("{path}.{key}"), unknown);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    prune_value(sub, v, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Fills in schema defaults for missing fields, the way CRD structural defaulting does.
pub fn apply_defaults(rt: &ResourceType, object: &mut Value) {
    if let Some(schema) = rt.schema.as_ref() {
        default_value(schema, object);
    }
}

fn default_value(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, sub) in props {
                    if key == "metadata" {
                        continue;
                    }
                    if !map.contains_key(key)
                        && let Some(default) = sub.get("default")
                    {
                        map.insert(key.clone(), default.clone());
                    }
                    if let Some(v) = map.get_mut(key) {
                        default_value(sub, v);
                    }
                }
            } else if let Some(sub) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                map.values_mut().for_each(|v| default_value(sub, v));
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                items.iter_mut().for_each(|v| default_value(sub, v));
            }
        }
        _ => {}
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => kpve_crds::validation::is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

/// Checks name, labels, annotations and finalizers.
pub fn validate_metadata(rt: &ResourceType, object: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let meta = object.get("metadata").cloned().unwrap_or(Value::Null);
    let name = meta.get("name").and_then(Value::as_str).unwrap_or("");
    let invalid = |field: &str, message: String| Cause {
        reason: "FieldValueInvalid".into(),
        message,
        field: field.into(),
    };
    let name_ok = if rt.kind == "Namespace" {
        is_dns_label(name)
    } else {
        kpve_crds::validation::is_dns_subdomain(name)
    };
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired".into(),
            message: "Required value: name or generateName is required".into(),
            field: "metadata.name".into(),
        });
    } else if !name_ok {
        causes.push(invalid(
            "metadata.name",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                if rt.kind == "Namespace" { "label" } else { "subdomain" }
            ),
        ));
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                causes.push(invalid("metadata.labels", format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")));
            }
            match v.as_str() {
                Some(v) if v.is_empty() || is_label_name(v) => {}
                _ => causes.push(invalid("metadata.labels", format!("Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))),
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        let size: usize = annotations.iter().map(|(k, v)| k.len() + v.as_str().map_or(0, str::len)).sum();
        if size > 256 * 1024 {
            causes.push(invalid("metadata.annotations", "Too long: must have at most 262144 bytes".into()));
        }
        for (k, v) in annotations {
            if !is_qualified_name(k) {
                causes.push(invalid("metadata.annotations", format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'")));
            }
            if !v.is_string() {
                causes.push(invalid(
                    &format!("metadata.annotations.{k}"),
                    "Invalid value: annotation values must be strings".into(),
                ));
            }
        }
    }
    if let Some(refs) = meta.get("ownerReferences").and_then(Value::as_array) {
        let mut controllers = 0;
        for (i, r) in refs.iter().enumerate() {
            for field in ["apiVersion", "kind", "name", "uid"] {
                if r.get(field).and_then(Value::as_str).is_none_or(str::is_empty) {
                    causes.push(Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value".into(),
                        field: format!("metadata.ownerReferences[{i}].{field}"),
                    });
                }
            }
            if r.get("controller") == Some(&Value::Bool(true)) {
                controllers += 1;
            }
        }
        if controllers > 1 {
            causes.push(invalid(
                "metadata.ownerReferences",
                "Invalid value: only one reference can have Controller set to true".into(),
            ));
        }
    }
    if let Some(finalizers) = meta.get("finalizers").and_then(Value::as_array) {
        for f in finalizers {
            if !f.as_str().is_some_and(|f| is_qualified_name(f) || kpve_crds::validation::is_dns_subdomain(f))
            {
                causes.push(invalid(
                    "metadata.finalizers",
                    format!("Invalid value: {f}: name part must be a qualified name"),
                ));
            }
        }
    }
    causes
}

/// VMIDs held by guests (VirtualMachine and LinuxContainer share one space, as in Proxmox).
#[derive(Debug, Default)]
pub struct VmidIndex {
    held: BTreeMap<u64, String>,
}

pub const VMID_MIN: u64 = 100;
pub const VMID_MAX: u64 = 999_999_999;

pub fn is_guest(rt: &ResourceType) -> bool {
    rt.group == kpve_crds::GROUP && matches!(rt.plural.as_str(), "virtualmachines" | "linuxcontainers")
}

/// `VirtualMachine default/web`.
pub fn guest_ref(object: &Value) -> String {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let meta = &object["metadata"];
    let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
    let name = meta.get("name").and_then(Value::as_str).unwrap_or("");
    format!("{kind} {ns}/{name}")
}

pub fn vmid_of(object: &Value) -> Option<u64> {
    object.get("spec")?.get("vmid")?.as_u64()
}

impl VmidIndex {
    pub fn insert(&mut self, vmid: u64, holder: String) {
        self.held.insert(vmid, holder);
    }

    pub fn remove(&mut self, vmid: u64, holder: &str) {
        if self.held.get(&vmid).is_some_and(|h| h == holder) {
            self.held.remove(&vmid);
        }
    }

    pub fn holder(&self, vmid: u64) -> Option<&str> {
        self.held.get(&vmid).map(String::as_str)
    }

    /// The lowest free VMID, like Proxmox's `/cluster/nextid`.
    pub fn next_free(&self) -> Option<u64> {
        let mut candidate = VMID_MIN;
        for (&held, _) in self.held.range(VMID_MIN..) {
            if held != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate <= VMID_MAX).then_some(candidate)
    }

    /// Allocates or checks the VMID of `object` (a guest about to be stored as `holder`).
    /// `old_vmid` is the VMID the stored object has (updates may not change it).
    pub fn admit(
        &self,
        rt: &ResourceType,
        object: &mut Value,
        holder: &str,
        old_vmid: Option<u64>,
    ) -> Result<Option<u64>, ApiError> {
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
        let vmid = match (vmid_of(object), old_vmid) {
            (None, Some(old)) => {
                set_vmid(object, old);
                old
            }
            (Some(new), Some(old)) if new != old => {
                return Err(ApiError::invalid_field(
                    rt,
                    &name,
                    "spec.vmid",
                    format!("Invalid value: {new}: field is immutable (the guest holds VMID {old})"),
                ));
            }
            (Some(v), _) => v,
            (None, None) => {
                let free = self.next_free().ok_or_else(|| {
                    ApiError::invalid_field(rt, &name, "spec.vmid", "no free VMID in 100-999999999")
                })?;
                set_vmid(object, free);
                free
            }
        };
        if !(VMID_MIN..=VMID_MAX).contains(&vmid) {
            return Err(ApiError::invalid_field(
                rt,
                &name,
                "spec.vmid",
                format!("Invalid value: {vmid}: must be between {VMID_MIN} and {VMID_MAX}"),
            ));
        }
        if let Some(other) = self.holder(vmid).filter(|h| *h != holder) {
            return Err(ApiError::invalid_field(
                rt,
                &name,
                "spec.vmid",
                format!("Duplicate value: {vmid}: VMID {vmid} is already used by {other}"),
            ));
        }
        Ok(Some(vmid))
    }
}

fn set_vmid(object: &mut Value, vmid: u64) {
    if !object.get("spec").is_some_and(Value::is_object) {
        object["spec"] = Value::Object(Map::new());
    }
    object["spec"]["vmid"] = Value::from(vmid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_free_fills_gaps() {
        let mut index = VmidIndex::default();
        assert_eq!(index.next_free(), Some(100));
        index.insert(100, "a".into());
        index.insert(101, "b".into());
        index.insert(103, "c".into());
        assert_eq!(index.next_free(), Some(102));
        index.remove(101, "not-b");
        assert_eq!(index.holder(101), Some("b"));
        index.remove(101, "b");
        assert_eq!(index.next_free(), Some(101));
    }

    #[test]
    fn qualified_names() {
        assert!(is_qualified_name("app"));
        assert!(is_qualified_name("kpve.io/cleanup"));
        assert!(!is_qualified_name("-x"));
        assert!(!is_qualified_name("a/b/c"));
    }
}
