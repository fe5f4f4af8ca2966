//! The resource types the server serves: kpve's CRDs (and any CRD a user applies) plus the
//! built-ins kubectl and kube-rs need. Discovery, OpenAPI, tables, validation and routing are
//! all derived from this one table.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

/// How a list field merges under server-side apply and strategic merge patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// An `additionalPrinterColumns` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    /// integer | number | string | boolean | date
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i32,
    /// Simple JSONPath, e.g. `.status.conditions[?(@.type=="Ready")].status`.
    pub json_path: String,
}

/// One served resource (a group/version/plural).
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// A `/status` subresource exists; writes to the main resource ignore `.status`.
    pub status_subresource: bool,
    /// The `openAPIV3Schema` (for CRDs); `None` for built-ins.
    pub schema: Option<Value>,
    pub printer_columns: Vec<PrinterColumn>,
    /// Field-selector names beyond `metadata.name`/`metadata.namespace`, e.g. `status.node`.
    pub selectable_fields: Vec<String>,
    /// A built-in kind: strategic merge patch is accepted, PUT without resourceVersion allowed.
    pub builtin: bool,
    /// Where objects live in the store; two views of one store (core and events.k8s.io
    /// Events) share it.
    pub storage_resource: String,
}

impl ResourceType {
    /// `kpve.io/v1alpha1`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `virtualmachines.kpve.io`, or `namespaces` for the core group (used in messages).
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// The list type of the list field at `path` (field names from the root, list items as
    /// `[]`, e.g. `["spec", "disks"]`).
    pub fn list_type(&self, path: &[&str]) -> ListType {
        match path {
            ["metadata", "finalizers"] => return ListType::Set,
            ["metadata", "ownerReferences"] => return ListType::Map(vec!["uid".into()]),
            ["metadata", "managedFields"] => return ListType::Atomic,
            _ => {}
        }
        let Some(mut node) = self.schema.as_ref() else { return ListType::Atomic };
        for seg in path {
            let next = if *seg == "[]" {
                node.get("items")
            } else {
                node.get("properties").and_then(|p| p.get(*seg))
            };
            match next {
                Some(n) => node = n,
                None => return ListType::Atomic,
            }
        }
        match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListType::Set,
            Some("map") => ListType::Map(
                node.get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|keys| keys.iter().filter_map(|k| k.as_str().map(String::from)).collect())
                    .unwrap_or_default(),
            ),
            _ => ListType::Atomic,
        }
    }

    /// The served types of one CRD, one per served version.
    pub fn from_crd(crd: &CustomResourceDefinition) -> Vec<ResourceType> {
        let spec = &crd.spec;
        let names = &spec.names;
        let plural = names.plural.clone();
        spec.versions
            .iter()
            .filter(|v| v.served)
            .map(|v| ResourceType {
                group: spec.group.clone(),
                version: v.name.clone(),
                kind: names.kind.clone(),
                list_kind: names.list_kind.clone().unwrap_or_else(|| format!("{}List", names.kind)),
                plural: plural.clone(),
                singular: names.singular.clone().unwrap_or_else(|| names.kind.to_lowercase()),
                namespaced: spec.scope == "Namespaced",
                short_names: names.short_names.clone().unwrap_or_default(),
                categories: names.categories.clone().unwrap_or_default(),
                status_subresource: v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                schema: v
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .map(|s| serde_json::to_value(s).expect("schemas serialize")),
                printer_columns: v
                    .additional_printer_columns
                    .iter()
                    .flatten()
                    .map(|c| PrinterColumn {
                        name: c.name.clone(),
                        type_: c.type_.clone(),
                        format: c.format.clone().unwrap_or_default(),
                        description: c.description.clone().unwrap_or_default(),
                        priority: c.priority.unwrap_or(0),
                        json_path: c.json_path.clone(),
                    })
                    .collect(),
                selectable_fields: v
                    .selectable_fields
                    .iter()
                    .flatten()
                    .map(|f| f.json_path.trim_start_matches('.').to_string())
                    .collect(),
                builtin: false,
                storage_resource: format!("{}/{}", spec.group, plural),
            })
            .collect()
    }
}

fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    short_names: &[&str],
    storage: &str,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        namespaced,
        short_names: short_names.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        status_subresource: false,
        schema: None,
        printer_columns: Vec::new(),
        selectable_fields: Vec::new(),
        builtin: true,
        storage_resource: storage.into(),
    }
}

/// The built-in kinds: Namespace, Events (two views of one store), Lease and
/// CustomResourceDefinition.
pub fn builtins() -> Vec<ResourceType> {
    let mut namespace = builtin("", "v1", "Namespace", "namespaces", false, &["ns"], "core/namespaces");
    namespace.status_subresource = true;
    namespace.selectable_fields = vec!["status.phase".into()];
    let mut core_event = builtin("", "v1", "Event", "events", true, &["ev"], "core/events");
    core_event.selectable_fields = [
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let mut event = builtin("events.k8s.io", "v1", "Event", "events", true, &["ev"], "core/events");
    event.selectable_fields = [
        "regarding.kind",
        "regarding.namespace",
        "regarding.name",
        "regarding.uid",
        "regarding.apiVersion",
        "reason",
        "reportingController",
        "type",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let lease =
        builtin("coordination.k8s.io", "v1", "Lease", "leases", true, &[], "coordination.k8s.io/leases");
    let mut crd = builtin(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
        "apiextensions.k8s.io/customresourcedefinitions",
    );
    crd.status_subresource = true;
    crd.categories = vec!["api-extensions".into()];
    vec![namespace, core_event, event, lease, crd]
}

/// An immutable snapshot of everything served; rebuilt when a CRD changes.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Keyed by (group, version, plural).
    types: BTreeMap<(String, String, String), ResourceType>,
}

impl Registry {
    pub fn new(crds: &[CustomResourceDefinition]) -> Registry {
        let mut registry = Registry::default();
        for t in builtins().into_iter().chain(crds.iter().flat_map(ResourceType::from_crd)) {
            registry.types.insert((t.group.clone(), t.version.clone(), t.plural.clone()), t);
        }
        registry
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types.get(&(group.to_string(), version.to_string(), plural.to_string()))
    }

    /// Every served type, ordered by group, version, plural.
    pub fn all(&self) -> impl Iterator<Item = &ResourceType> {
        self.types.values()
    }

    /// Groups in discovery order (core "" first) with their versions.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for t in self.types.values() {
            match groups.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) if !versions.contains(&t.version) => versions.push(t.version.clone()),
                Some(_) => {}
                None => groups.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        groups
    }

    pub fn types_in(&self, group: &str, version: &str) -> Vec<&ResourceType> {
        self.types.values().filter(|t| t.group == group && t.version == version).collect()
    }
}

/// The `metadata` part of a table row / PartialObjectMetadata.
pub fn partial_object_metadata(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}
