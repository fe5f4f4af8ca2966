//! OpenAPI documents derived from the [`Registry`]: the `/openapi/v3` root, one OpenAPI 3.0
//! document per group/version (what `kubectl apply` reads to decide on server-side field
//! validation and `kubectl explain` reads for schemas), and a JSON swagger 2.0 document for old
//! clients. Schema names and operation shapes follow kube-apiserver so that kubectl's lookups
//! (by `x-kubernetes-group-version-kind`) find them.
//!
//! Documents are built deterministically (registry order, sorted schema names), so the content
//! hash in the v3 root only changes when the served types change.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha512};

use crate::resources::{Registry, ResourceType};

const SCHEMAS: &str = "#/components/schemas/";
const DEFINITIONS: &str = "#/definitions/";
const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";
const CORE: &str = "io.k8s.api.core.v1";
const EVENTS: &str = "io.k8s.api.events.v1";
const COORDINATION: &str = "io.k8s.api.coordination.v1";
const APIEXTENSIONS: &str = "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1";

const MORE_INFO: &str = "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md";
const PATCH_TYPES: [&str; 3] =
    ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"];
const STRATEGIC_MERGE: &str = "application/strategic-merge-patch+json";

/// `GET /openapi/v3`: one entry per served group/version, each pointing at its document with a
/// content hash so clients can cache it forever.
pub fn v3_root(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (group, versions) in registry.groups() {
        for version in versions {
            if let Some((_, hash)) = v3_group_version(registry, &group, &version) {
                let key = if group.is_empty() {
                    format!("api/{version}")
                } else {
                    format!("apis/{group}/{version}")
                };
                let url = format!("/openapi/v3/{key}?hash={hash}");
                paths.insert(key, json!({"serverRelativeURL": url}));
            }
        }
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/api/v1` or `/openapi/v3/apis/<g>/<v>`: the OpenAPI 3.0.0 document and its
/// hash (uppercase hex SHA-512 of the serialized document, as kube-openapi computes its ETag),
/// or `None` when the group/version is not served.
pub fn v3_group_version(registry: &Registry, group: &str, version: &str) -> Option<(Value, String)> {
    let types = registry.types_in(group, version);
    if types.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    for rt in &types {
        for endpoint in endpoints(rt) {
            let mut item = Map::new();
            for op in &endpoint.ops {
                item.insert(op.method.into(), op.to_v3(rt));
            }
            item.insert("parameters".into(), endpoint.params.iter().map(Param::to_v3).collect());
            paths.insert(endpoint.path, Value::Object(item));
        }
    }
    let doc = json!({
        "openapi": "3.0.0",
        // kube-apiserver's per-GV documents say "unversioned" too.
        "info": {"title": "Kubernetes", "version": "unversioned"},
        "paths": paths,
        "components": {"schemas": schemas_for(&types)},
    });
    // serde_json cannot fail on a Value; the hash covers exactly the bytes a client receives
    // when the server sends this value compactly.
    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
    let hash = Sha512::digest(&bytes).iter().map(|b| format!("{b:02X}")).collect();
    Some((doc, hash))
}

/// `GET /openapi/v2` (JSON): every path of every group/version as swagger 2.0, with
/// `definitions` keyed by the same names as the v3 `components.schemas`.
pub fn v2(registry: &Registry) -> Value {
    let types: Vec<&ResourceType> = registry.all().collect();
    let mut paths = Map::new();
    for rt in &types {
        for endpoint in endpoints(rt) {
            let mut item = Map::new();
            for op in &endpoint.ops {
                item.insert(op.method.into(), op.to_v2(rt));
            }
            item.insert("parameters".into(), endpoint.params.iter().map(Param::to_v2).collect());
            paths.insert(endpoint.path, Value::Object(item));
        }
    }
    let mut definitions = schemas_for(&types);
    for schema in definitions.values_mut() {
        to_v2_schema(schema);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": crate::discovery::GIT_VERSION},
        "paths": paths,
        "definitions": definitions,
    })
}

/// The schema name kube-apiserver uses: Go package path for built-ins
/// (`io.k8s.api.core.v1.Namespace`), reversed group + version + kind for CRDs
/// (`io.kpve.v1alpha1.VirtualMachine`).
pub fn schema_name(rt: &ResourceType, kind: &str) -> String {
    let package = match (rt.builtin, rt.group.as_str()) {
        (true, "") => format!("io.k8s.api.core.{}", rt.version),
        (true, "apiextensions.k8s.io") => {
            format!("io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.{}", rt.version)
        }
        (true, g) if g.ends_with(".k8s.io") => {
            format!("io.k8s.api.{}.{}", g.split('.').next().unwrap_or(g), rt.version)
        }
        _ => {
            let mut labels: Vec<&str> = rt.group.split('.').collect();
            labels.reverse();
            format!("{}.{}", labels.join("."), rt.version)
        }
    };
    format!("{package}.{kind}")
}

// ---------------------------------------------------------------------------------------------
// Paths and operations

/// A query or path parameter. Rendered differently for v3 (`schema: {type}`) and v2 (inline type).
#[derive(Clone)]
struct Param {
    name: &'static str,
    location: &'static str,
    ty: &'static str,
    description: String,
}

impl Param {
    fn query(name: &'static str, ty: &'static str, description: &str) -> Param {
        Param { name, location: "query", ty, description: description.into() }
    }

    fn to_v3(&self) -> Value {
        let mut p = json!({
            "name": self.name,
            "in": self.location,
            "description": self.description,
            "schema": {"type": self.ty, "uniqueItems": true},
        });
        if self.location == "path" {
            p["required"] = json!(true);
        }
        p
    }

    fn to_v2(&self) -> Value {
        let mut p = json!({
            "uniqueItems": true,
            "type": self.ty,
            "description": self.description,
            "name": self.name,
            "in": self.location,
        });
        if self.location == "path" {
            p["required"] = json!(true);
        }
        p
    }
}

fn path_param(name: &'static str, description: String) -> Param {
    Param { name, location: "path", ty: "string", description }
}

const DRY_RUN: &str = "When present, indicates that modifications should not be persisted. An invalid or unrecognized dryRun directive will result in an error response and no further processing of the request. Valid values are: - All: all dry run stages will be processed";
const FIELD_MANAGER: &str = "fieldManager is a name associated with the actor or entity that is making these changes. The value must be less than or 128 characters long, and only contain printable characters, as defined by https://golang.org/pkg/unicode/#IsPrint. This field is required for apply requests (application/apply-patch) but optional for non-apply patch types (JsonPatch, MergePatch, StrategicMergePatch).";
const FIELD_VALIDATION: &str = "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore: This will ignore any unknown fields that are silently dropped from the object, and will ignore all but the last duplicate field that the decoder encounters. - Warn: This will send a warning via the standard warning response header for each unknown field that is dropped from the object, and for each duplicate field that is encountered. The request will still succeed if there are no other errors, and will only persist the last of any duplicate fields. This is the default. - Strict: This will fail the request with a BadRequest error if any unknown fields would be dropped from the object, or if any duplicate fields are present. The error returned from the server will contain all unknown and duplicate fields encountered.";
const FORCE: &str = "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people. Force flag must be unset for non-apply patch requests.";
const LABEL_SELECTOR: &str =
    "A selector to restrict the list of returned objects by their labels. Defaults to everything.";
const FIELD_SELECTOR: &str = "A selector to restrict the list of returned objects by their fields. Defaults to everything. Supported: metadata.name, metadata.namespace and the resource's selectable fields.";
const LIMIT: &str = "limit is a maximum number of responses to return for a list call. If more items exist, the server will set the `continue` field on the list metadata to a value that can be used with the same initial query to retrieve the next set of results.";
const CONTINUE: &str = "The continue option should be set when retrieving more results from the server. Since this value is server defined, clients may only use the continue value from a previous query result with identical query parameters (except for the value of continue).";
const RESOURCE_VERSION: &str = "resourceVersion sets a constraint on what resource versions a request may be served from. See https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions for details. Defaults to unset";
const RESOURCE_VERSION_MATCH: &str = "resourceVersionMatch determines how resourceVersion is applied to list calls. It is highly recommended that resourceVersionMatch be set for list calls where resourceVersion is set. Defaults to unset";
const WATCH: &str = "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications. Specify resourceVersion.";
const TIMEOUT_SECONDS: &str = "Timeout for the list/watch call. This limits the duration of the call, regardless of any activity or inactivity.";
const ALLOW_WATCH_BOOKMARKS: &str = "allowWatchBookmarks requests watch events with type \"BOOKMARK\". Servers that do not implement bookmarks may ignore this flag and bookmarks are sent at the server's discretion.";
const GRACE_PERIOD: &str = "The duration in seconds before the object should be deleted. Value must be non-negative integer. The value zero indicates delete immediately.";
const ORPHAN_DEPENDENTS: &str = "Deprecated: please use the PropagationPolicy, this field will be deprecated in 1.7. Should the dependent objects be orphaned. If true/false, the \"orphan\" finalizer will be added to/removed from the object's finalizers list. Either this field or PropagationPolicy may be set, but not both.";
const PROPAGATION_POLICY: &str = "Whether and how garbage collection will be performed. Either this field or OrphanDependents may be set, but not both. Acceptable values are: 'Orphan' - orphan the dependents; 'Background' - allow the garbage collector to delete the dependents in the background; 'Foreground' - a cascading policy that deletes all dependents in the foreground.";

fn write_params(patch: bool) -> Vec<Param> {
    let mut params = vec![
        Param::query("dryRun", "string", DRY_RUN),
        Param::query("fieldManager", "string", FIELD_MANAGER),
        // kubectl 1.32 sends fieldValidation=Strict (and skips client-side validation) only when
        // the PATCH operation for the kind lists this parameter.
        Param::query("fieldValidation", "string", FIELD_VALIDATION),
    ];
    if patch {
        params.push(Param::query("force", "boolean", FORCE));
    }
    params
}

fn list_params() -> Vec<Param> {
    vec![
        Param::query("allowWatchBookmarks", "boolean", ALLOW_WATCH_BOOKMARKS),
        Param::query("continue", "string", CONTINUE),
        Param::query("fieldSelector", "string", FIELD_SELECTOR),
        Param::query("labelSelector", "string", LABEL_SELECTOR),
        Param::query("limit", "integer", LIMIT),
        Param::query("resourceVersion", "string", RESOURCE_VERSION),
        Param::query("resourceVersionMatch", "string", RESOURCE_VERSION_MATCH),
        Param::query("timeoutSeconds", "integer", TIMEOUT_SECONDS),
        Param::query("watch", "boolean", WATCH),
    ]
}

fn delete_params() -> Vec<Param> {
    vec![
        Param::query("dryRun", "string", DRY_RUN),
        Param::query("gracePeriodSeconds", "integer", GRACE_PERIOD),
        Param::query("orphanDependents", "boolean", ORPHAN_DEPENDENTS),
        Param::query("propagationPolicy", "string", PROPAGATION_POLICY),
    ]
}

fn delete_collection_params() -> Vec<Param> {
    let mut params = delete_params();
    params.extend(list_params().into_iter().filter(|p| !matches!(p.name, "watch" | "allowWatchBookmarks")));
    params.sort_by_key(|p| p.name);
    params
}

enum Body {
    None,
    /// The kind itself (POST, PUT).
    Object,
    /// `meta/v1.Patch` under every accepted patch content type.
    Patch,
    /// `meta/v1.DeleteOptions`, optional.
    DeleteOptions,
}

#[derive(Clone, Copy, PartialEq)]
enum Returns {
    Kind,
    List,
    Status,
}

struct Op {
    method: &'static str,
    action: &'static str,
    operation_id: String,
    description: String,
    params: Vec<Param>,
    body: Body,
    codes: &'static [(&'static str, &'static str)],
    returns: Returns,
}

/// get / put / patch of one object (`suffix` "Status" for the status subresource; `what`
/// is how the description names the target).
fn read_op(g: &str, ns: &str, kind: &str, suffix: &str, what: &str) -> Op {
    Op {
        method: "get",
        action: "get",
        operation_id: format!("read{g}{ns}{kind}{suffix}"),
        description: format!("read {what} {kind}"),
        params: Vec::new(),
        body: Body::None,
        codes: &[OK],
        returns: Returns::Kind,
    }
}

fn replace_op(g: &str, ns: &str, kind: &str, suffix: &str, what: &str) -> Op {
    Op {
        method: "put",
        action: "put",
        operation_id: format!("replace{g}{ns}{kind}{suffix}"),
        description: format!("replace {what} {kind}"),
        params: write_params(false),
        body: Body::Object,
        codes: &[OK, CREATED],
        returns: Returns::Kind,
    }
}

fn patch_op(g: &str, ns: &str, kind: &str, suffix: &str, what: &str) -> Op {
    Op {
        method: "patch",
        action: "patch",
        operation_id: format!("patch{g}{ns}{kind}{suffix}"),
        description: format!("partially update {what} {kind}"),
        params: write_params(true),
        body: Body::Patch,
        codes: &[OK, CREATED],
        returns: Returns::Kind,
    }
}

const OK: (&str, &str) = ("200", "OK");
const CREATED: (&str, &str) = ("201", "Created");
const ACCEPTED: (&str, &str) = ("202", "Accepted");

impl Op {
    fn response_schema(&self, rt: &ResourceType) -> String {
        match self.returns {
            Returns::Kind => schema_name(rt, &rt.kind),
            Returns::List => schema_name(rt, &rt.list_kind),
            Returns::Status => format!("{META}.Status"),
        }
    }

    fn response_types(&self) -> Vec<&'static str> {
        if self.returns == Returns::List {
            vec!["application/json", "application/json;stream=watch"]
        } else {
            vec!["application/json"]
        }
    }

    fn patch_types(rt: &ResourceType) -> Vec<&'static str> {
        let mut types = PATCH_TYPES.to_vec();
        if rt.builtin {
            // Built-ins accept strategic merge (kubectl client-side apply uses it for them);
            // custom kinds answer 415, so it must not be advertised there.
            types.push(STRATEGIC_MERGE);
        }
        types
    }

    fn gvk(rt: &ResourceType) -> Value {
        json!({"group": rt.group, "version": rt.version, "kind": rt.kind})
    }

    fn to_v3(&self, rt: &ResourceType) -> Value {
        let mut op = Map::new();
        op.insert("tags".into(), json!([tag(rt)]));
        op.insert("description".into(), json!(self.description));
        op.insert("operationId".into(), json!(self.operation_id));
        if !self.params.is_empty() {
            op.insert("parameters".into(), self.params.iter().map(Param::to_v3).collect());
        }
        let body = |schema: String, types: Vec<&str>, required: bool| {
            let content: Map<String, Value> =
                types.into_iter().map(|t| (t.to_string(), json!({"schema": schema_ref(&schema)}))).collect();
            let mut b = json!({"content": content});
            if required {
                b["required"] = json!(true);
            }
            b
        };
        match self.body {
            Body::None => {}
            Body::Object => {
                op.insert("requestBody".into(), body(schema_name(rt, &rt.kind), vec!["*/*"], true));
            }
            Body::Patch => {
                op.insert("requestBody".into(), body(format!("{META}.Patch"), Op::patch_types(rt), true));
            }
            Body::DeleteOptions => {
                op.insert("requestBody".into(), body(format!("{META}.DeleteOptions"), vec!["*/*"], false));
            }
        }
        let schema = self.response_schema(rt);
        let mut responses = Map::new();
        for (code, text) in self.codes {
            let content: Map<String, Value> = self
                .response_types()
                .into_iter()
                .map(|t| (t.to_string(), json!({"schema": schema_ref(&schema)})))
                .collect();
            responses.insert(code.to_string(), json!({"description": text, "content": content}));
        }
        responses.insert("401".into(), json!({"description": "Unauthorized"}));
        op.insert("responses".into(), Value::Object(responses));
        op.insert("x-kubernetes-action".into(), json!(self.action));
        op.insert("x-kubernetes-group-version-kind".into(), Op::gvk(rt));
        Value::Object(op)
    }

    fn to_v2(&self, rt: &ResourceType) -> Value {
        let mut op = Map::new();
        op.insert("description".into(), json!(self.description));
        let consumes = if matches!(self.body, Body::Patch) { Op::patch_types(rt) } else { vec!["*/*"] };
        op.insert("consumes".into(), json!(consumes));
        op.insert("produces".into(), json!(self.response_types()));
        op.insert("schemes".into(), json!(["https"]));
        op.insert("tags".into(), json!([tag(rt)]));
        op.insert("operationId".into(), json!(self.operation_id));
        let mut params = Vec::new();
        let body_schema = match self.body {
            Body::None => None,
            Body::Object => Some((schema_name(rt, &rt.kind), true)),
            Body::Patch => Some((format!("{META}.Patch"), true)),
            Body::DeleteOptions => Some((format!("{META}.DeleteOptions"), false)),
        };
        if let Some((schema, required)) = body_schema {
            params.push(json!({
                "name": "body",
                "in": "body",
                "required": required,
                "schema": {"$ref": format!("{DEFINITIONS}{schema}")},
            }));
        }
        params.extend(self.params.iter().map(Param::to_v2));
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        let schema = self.response_schema(rt);
        let mut responses = Map::new();
        for (code, text) in self.codes {
            responses.insert(
                code.to_string(),
                json!({"description": text, "schema": {"$ref": format!("{DEFINITIONS}{schema}")}}),
            );
        }
        responses.insert("401".into(), json!({"description": "Unauthorized"}));
        op.insert("responses".into(), Value::Object(responses));
        op.insert("x-kubernetes-action".into(), json!(self.action));
        op.insert("x-kubernetes-group-version-kind".into(), Op::gvk(rt));
        Value::Object(op)
    }
}

struct Endpoint {
    path: String,
    params: Vec<Param>,
    ops: Vec<Op>,
}

/// `kpveIo_v1alpha1`, `core_v1`, `coordination_v1`, as kube-apiserver tags operations.
fn tag(rt: &ResourceType) -> String {
    let ident = group_ident(rt);
    let mut chars = ident.chars();
    let lower: String = chars.next().map(|c| c.to_ascii_lowercase()).into_iter().chain(chars).collect();
    format!("{lower}_{}", rt.version)
}

/// The group part of operation ids: `Core`, `Coordination`, `Apiextensions` for built-ins (Go
/// package names), every label for CRD groups (`KpveIo`).
fn group_ident(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        return "Core".into();
    }
    let group = if rt.builtin { rt.group.trim_end_matches(".k8s.io") } else { rt.group.as_str() };
    let labels: Vec<&str> =
        if rt.builtin { group.split('.').take(1).collect() } else { group.split(['.', '-']).collect() };
    labels.into_iter().map(capitalize).collect()
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars).collect()
}

fn endpoints(rt: &ResourceType) -> Vec<Endpoint> {
    let prefix = if rt.group.is_empty() {
        format!("/api/{}", rt.version)
    } else {
        format!("/apis/{}/{}", rt.group, rt.version)
    };
    let g = format!("{}{}", group_ident(rt), capitalize(&rt.version));
    let ns = if rt.namespaced { "Namespaced" } else { "" };
    let kind = &rt.kind;
    let (collection, scope_params) = if rt.namespaced {
        (
            format!("{prefix}/namespaces/{{namespace}}/{}", rt.plural),
            vec![path_param(
                "namespace",
                "object name and auth scope, such as for teams and projects".to_string(),
            )],
        )
    } else {
        (format!("{prefix}/{}", rt.plural), Vec::new())
    };
    let mut item_params = vec![path_param("name", format!("name of the {kind}"))];
    item_params.extend(scope_params.iter().cloned());

    let mut out = vec![Endpoint {
        path: collection.clone(),
        params: scope_params,
        ops: vec![
            Op {
                method: "get",
                action: "list",
                operation_id: format!("list{g}{ns}{kind}"),
                description: format!("list or watch objects of kind {kind}"),
                params: list_params(),
                body: Body::None,
                codes: &[OK],
                returns: Returns::List,
            },
            Op {
                method: "post",
                action: "post",
                operation_id: format!("create{g}{ns}{kind}"),
                description: format!("create a {kind}"),
                params: write_params(false),
                body: Body::Object,
                codes: &[OK, CREATED, ACCEPTED],
                returns: Returns::Kind,
            },
            Op {
                method: "delete",
                action: "deletecollection",
                operation_id: format!("delete{g}Collection{ns}{kind}"),
                description: format!("delete collection of {kind}"),
                params: delete_collection_params(),
                body: Body::DeleteOptions,
                codes: &[OK],
                returns: Returns::Status,
            },
        ],
    }];
    out.push(Endpoint {
        path: format!("{collection}/{{name}}"),
        params: item_params.clone(),
        ops: vec![
            read_op(&g, ns, kind, "", "the specified"),
            replace_op(&g, ns, kind, "", "the specified"),
            Op {
                method: "delete",
                action: "delete",
                operation_id: format!("delete{g}{ns}{kind}"),
                description: format!("delete a {kind}"),
                params: delete_params(),
                body: Body::DeleteOptions,
                codes: &[OK, ACCEPTED],
                returns: Returns::Status,
            },
            patch_op(&g, ns, kind, "", "the specified"),
        ],
    });
    if rt.status_subresource {
        out.push(Endpoint {
            path: format!("{collection}/{{name}}/status"),
            params: item_params,
            ops: vec![
                read_op(&g, ns, kind, "Status", "status of the specified"),
                replace_op(&g, ns, kind, "Status", "status of the specified"),
                patch_op(&g, ns, kind, "Status", "status of the specified"),
            ],
        });
    }
    if rt.namespaced {
        out.push(Endpoint {
            path: format!("{prefix}/{}", rt.plural),
            params: Vec::new(),
            ops: vec![Op {
                method: "get",
                action: "list",
                operation_id: format!("list{g}{kind}ForAllNamespaces"),
                description: format!("list or watch objects of kind {kind}"),
                params: list_params(),
                body: Body::None,
                codes: &[OK],
                returns: Returns::List,
            }],
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Schemas

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("{SCHEMAS}{name}")})
}

/// A field pointing at a named schema. Wrapped in `allOf` because OpenAPI 3.0 ignores siblings
/// of `$ref`, and kube-apiserver does the same so `kubectl explain` can show the description.
fn ref_field(name: &str, description: &str) -> Value {
    json!({"description": description, "allOf": [schema_ref(name)]})
}

fn string(description: &str) -> Value {
    json!({"description": description, "type": "string"})
}

fn integer(format: &str, description: &str) -> Value {
    json!({"description": description, "type": "integer", "format": format})
}

fn boolean(description: &str) -> Value {
    json!({"description": description, "type": "boolean"})
}

fn string_list(description: &str, list_type: &str) -> Value {
    json!({
        "description": description,
        "type": "array",
        "items": {"type": "string"},
        "x-kubernetes-list-type": list_type,
    })
}

fn string_map(description: &str) -> Value {
    json!({"description": description, "type": "object", "additionalProperties": {"type": "string"}})
}

fn free_form(description: &str) -> Value {
    json!({"description": description, "type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn object(description: &str, properties: Value, required: &[&str]) -> Value {
    let mut s = json!({"description": description, "type": "object"});
    if !required.is_empty() {
        s["required"] = json!(required);
    }
    s["properties"] = properties;
    s
}

fn with_gvk(mut schema: Value, group: &str, version: &str, kind: &str) -> Value {
    schema["x-kubernetes-group-version-kind"] = json!([{"group": group, "kind": kind, "version": version}]);
    schema
}

const API_VERSION_DESC: &str = "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources";
const KIND_DESC: &str = "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds";
const METADATA_DESC: &str = "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";
const LIST_METADATA_DESC: &str = "Standard list metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds";
const SPEC_STATUS_URL: &str =
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#spec-and-status";

/// The kind's schema: the CRD's `openAPIV3Schema` (or a hand-written one for built-ins) with
/// `apiVersion`, `kind` and an ObjectMeta `metadata` added, tagged with its GVK so `kubectl
/// explain` finds it. CRD extensions (`x-kubernetes-*`, `nullable`) are kept verbatim.
/// Optional enums carry `null` in the CRD (schemars' `Option<Enum>`); `nullable` already says
/// so, and kubectl explain would print the null as `<no value>`.
fn drop_null_enum_values(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(drop_null_enum_values);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null_enum_values),
        _ => {}
    }
}

fn kind_schema(rt: &ResourceType) -> Value {
    let base = match &rt.schema {
        Some(schema) => {
            let mut schema = schema.clone();
            drop_null_enum_values(&mut schema);
            schema
        }
        None => builtin_schema(rt)
            .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})),
    };
    let Value::Object(mut base) = base else {
        return with_gvk(free_form(""), &rt.group, &rt.version, &rt.kind);
    };
    let original = base.shift_remove("properties");
    let mut out = base;
    out.entry("type").or_insert_with(|| json!("object"));
    // apiVersion/kind/metadata first (as a reader expects), then the kind's own fields.
    let mut properties = Map::new();
    properties.insert("apiVersion".into(), string(API_VERSION_DESC));
    properties.insert("kind".into(), string(KIND_DESC));
    properties.insert("metadata".into(), ref_field(&format!("{META}.ObjectMeta"), METADATA_DESC));
    if let Some(Value::Object(original)) = original {
        for (key, value) in original {
            if !matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                properties.insert(key, value);
            }
        }
    }
    out.insert("properties".into(), Value::Object(properties));
    with_gvk(Value::Object(out), &rt.group, &rt.version, &rt.kind)
}

fn list_schema(rt: &ResourceType) -> Value {
    let items = json!({
        "description": format!("List of {}. More info: {MORE_INFO}", rt.plural),
        "type": "array",
        "items": schema_ref(&schema_name(rt, &rt.kind)),
    });
    let list = object(
        &format!("{} is a list of {}", rt.list_kind, rt.kind),
        json!({
            "apiVersion": string(API_VERSION_DESC),
            "items": items,
            "kind": string(KIND_DESC),
            "metadata": ref_field(&format!("{META}.ListMeta"), LIST_METADATA_DESC),
        }),
        &["items"],
    );
    with_gvk(list, &rt.group, &rt.version, &rt.list_kind)
}

/// Kinds, lists, and every shared schema they (or the operations) reference, sorted by name.
fn schemas_for(types: &[&ResourceType]) -> Map<String, Value> {
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    for rt in types {
        schemas.insert(schema_name(rt, &rt.kind), kind_schema(rt));
        schemas.insert(schema_name(rt, &rt.list_kind), list_schema(rt));
    }
    let shared = shared_schemas();
    // Operations reference these directly.
    let mut pending: Vec<String> =
        ["Status", "DeleteOptions", "Patch"].iter().map(|k| format!("{META}.{k}")).collect();
    for schema in schemas.values() {
        collect_refs(schema, &mut pending);
    }
    while let Some(name) = pending.pop() {
        if schemas.contains_key(&name) {
            continue;
        }
        if let Some(schema) = shared.get(&name) {
            collect_refs(schema, &mut pending);
            schemas.insert(name, schema.clone());
        }
    }
    schemas.into_iter().collect()
}

/// Names referenced by `$ref` anywhere in `value`. CRD schemas cannot contain `$ref`, so
/// walking the whole value only finds our own references.
fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        if let Some(name) = r.strip_prefix(SCHEMAS) {
                            out.push(name.to_string());
                        }
                    }
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Swagger 2.0 has no `nullable`, `anyOf`, `oneOf` or `not`, and its references live under
/// `#/definitions/`. Walks schema keywords only, so `default`/`enum`/`example` data is untouched.
fn to_v2_schema(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    if let Some(Value::String(r)) = map.get_mut("$ref")
        && let Some(name) = r.strip_prefix(SCHEMAS)
    {
        *r = format!("{DEFINITIONS}{name}");
    }
    if map.shift_remove("nullable") == Some(Value::Bool(true)) {
        map.insert("x-nullable".into(), json!(true));
    }
    for keyword in ["anyOf", "oneOf", "not"] {
        map.shift_remove(keyword);
    }
    if let Some(Value::Object(properties)) = map.get_mut("properties") {
        properties.values_mut().for_each(to_v2_schema);
    }
    match map.get_mut("items") {
        Some(Value::Array(items)) => items.iter_mut().for_each(to_v2_schema),
        Some(items) => to_v2_schema(items),
        None => {}
    }
    if let Some(additional) = map.get_mut("additionalProperties") {
        to_v2_schema(additional);
    }
    if let Some(Value::Array(all)) = map.get_mut("allOf") {
        all.iter_mut().for_each(to_v2_schema);
    }
}

fn meta(kind: &str) -> String {
    format!("{META}.{kind}")
}

/// Hand-written schemas (body only; apiVersion/kind/metadata are added by [`kind_schema`]) for
/// the built-in kinds, which have no CRD schema in the registry.
fn builtin_schema(rt: &ResourceType) -> Option<Value> {
    if !rt.builtin {
        return None;
    }
    let ns = |k: &str| format!("{CORE}.{k}");
    let schema = match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Namespace") => object(
            "Namespace provides a scope for Names. Use of multiple namespaces is optional.",
            json!({
                "spec": ref_field(&ns("NamespaceSpec"), &format!("Spec defines the behavior of the Namespace. More info: {SPEC_STATUS_URL}")),
                "status": ref_field(&ns("NamespaceStatus"), &format!("Status describes the current status of a Namespace. More info: {SPEC_STATUS_URL}")),
            }),
            &[],
        ),
        ("", "Event") => object(
            "Event is a report of an event somewhere in the cluster. Events have a limited retention time and triggers and messages may evolve with time. Event consumers should not rely on the timing of an event with a given Reason reflecting a consistent underlying trigger, or the continued existence of events with that Reason.",
            json!({
                "action": string("What action was taken/failed regarding to the Regarding object."),
                "count": integer("int32", "The number of times this event has occurred."),
                "eventTime": ref_field(&meta("MicroTime"), "Time when this Event was first observed."),
                "firstTimestamp": ref_field(&meta("Time"), "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)"),
                "involvedObject": ref_field(&ns("ObjectReference"), "The object that this event is about."),
                "lastTimestamp": ref_field(&meta("Time"), "The time at which the most recent occurrence of this event was recorded."),
                "message": string("A human-readable description of the status of this operation."),
                "reason": string("This should be a short, machine understandable string that gives the reason for the transition into the object's current status."),
                "related": ref_field(&ns("ObjectReference"), "Optional secondary object for more complex actions."),
                "reportingComponent": string("Name of the controller that emitted this Event, e.g. `kubernetes.io/kubelet`."),
                "reportingInstance": string("ID of the controller instance, e.g. `kubelet-xyzf`."),
                "series": ref_field(&ns("EventSeries"), "Data about the Event series this event represents or nil if it's a singleton Event."),
                "source": ref_field(&ns("EventSource"), "The component reporting this event. Should be a short machine understandable string."),
                "type": string("Type of this event (Normal, Warning), new types could be added in the future"),
            }),
            &["metadata", "involvedObject"],
        ),
        ("events.k8s.io", "Event") => object(
            "Event is a report of an event somewhere in the cluster. It generally denotes some state change in the system. Events have a limited retention time and triggers and messages may evolve with time.",
            json!({
                "action": string("action is what action was taken/failed regarding to the regarding object. It is machine-readable. This field cannot be empty for new Events and it can have at most 128 characters."),
                "deprecatedCount": integer("int32", "deprecatedCount is the deprecated field assuring backward compatibility with core.v1 Event type."),
                "deprecatedFirstTimestamp": ref_field(&meta("Time"), "deprecatedFirstTimestamp is the deprecated field assuring backward compatibility with core.v1 Event type."),
                "deprecatedLastTimestamp": ref_field(&meta("Time"), "deprecatedLastTimestamp is the deprecated field assuring backward compatibility with core.v1 Event type."),
                "deprecatedSource": ref_field(&ns("EventSource"), "deprecatedSource is the deprecated field assuring backward compatibility with core.v1 Event type."),
                "eventTime": ref_field(&meta("MicroTime"), "eventTime is the time when this Event was first observed. It is required."),
                "note": string("note is a human-readable description of the status of this operation. Maximal length of the note is 1kB, but libraries should be prepared to handle values up to 64kB."),
                "reason": string("reason is why the action was taken. It is human-readable. This field cannot be empty for new Events and it can have at most 128 characters."),
                "regarding": ref_field(&ns("ObjectReference"), "regarding contains the object this Event is about. In most cases it's an Object reporting controller implements, e.g. ReplicaSetController implements ReplicaSets and this event is emitted because it acts on some changes in a ReplicaSet object."),
                "related": ref_field(&ns("ObjectReference"), "related is the optional secondary object for more complex actions."),
                "reportingController": string("reportingController is the name of the controller that emitted this Event, e.g. `kubernetes.io/kubelet`. This field cannot be empty for new Events."),
                "reportingInstance": string("reportingInstance is the ID of the controller instance, e.g. `kubelet-xyzf`. This field cannot be empty for new Events and it can have at most 128 characters."),
                "series": ref_field(&format!("{EVENTS}.EventSeries"), "series is data about the Event series this event represents or nil if it's a singleton Event."),
                "type": string("type is the type of this event (Normal, Warning), new types could be added in the future. It is machine-readable. This field cannot be empty for new Events."),
            }),
            &["eventTime"],
        ),
        ("coordination.k8s.io", "Lease") => object(
            "Lease defines a lease concept.",
            json!({
                "spec": ref_field(&format!("{COORDINATION}.LeaseSpec"), &format!("spec contains the specification of the Lease. More info: {SPEC_STATUS_URL}")),
            }),
            &[],
        ),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => object(
            "CustomResourceDefinition represents a resource that should be exposed on the API server.  Its name MUST be in the format <.spec.name>.<.spec.group>.",
            json!({
                "spec": ref_field(&format!("{APIEXTENSIONS}.CustomResourceDefinitionSpec"), "spec describes how the user wants the resources to appear"),
                "status": ref_field(&format!("{APIEXTENSIONS}.CustomResourceDefinitionStatus"), "status indicates the actual state of the CustomResourceDefinition"),
            }),
            &["spec"],
        ),
        _ => return None,
    };
    Some(schema)
}

/// Meta types plus the helper types of the built-ins, keyed by schema name.
fn shared_schemas() -> BTreeMap<String, Value> {
    let mut s = BTreeMap::new();
    let mut add = |name: String, schema: Value| {
        s.insert(name, schema);
    };

    // --- meta/v1
    add(
        meta("Time"),
        json!({
            "description": "Time is a wrapper around time.Time which supports correct marshaling to YAML and JSON.  Wrappers are provided for many of the factory methods that the time package offers.",
            "type": "string",
            "format": "date-time",
        }),
    );
    add(
        meta("MicroTime"),
        json!({
            "description": "MicroTime is version of Time with microsecond level precision.",
            "type": "string",
            "format": "date-time",
        }),
    );
    add(
        meta("FieldsV1"),
        json!({
            "description": "FieldsV1 stores a set of fields in a data structure like a Trie, in JSON format.\n\nEach key is either a '.' representing the field itself, and will always map to an empty set, or a string representing a sub-field or item. The string will follow one of these four formats: 'f:<name>', where <name> is the name of a field in a struct, or key in a map 'v:<value>', where <value> is the exact json formatted value of a list item 'i:<index>', where <index> is position of a item in a list 'k:<keys>', where <keys> is a map of  a list item's key fields to their unique values If a key maps to an empty Fields value, the field that key represents is part of the set.\n\nThe exact format is defined in sigs.k8s.io/structured-merge-diff",
            "type": "object",
        }),
    );
    add(
        meta("ObjectMeta"),
        object(
            "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.",
            json!({
                "annotations": string_map("Annotations is an unstructured key value map stored with a resource that may be set by external tools to store and retrieve arbitrary metadata. They are not queryable and should be preserved when modifying objects. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/annotations"),
                "creationTimestamp": ref_field(&meta("Time"), "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"),
                "deletionGracePeriodSeconds": integer("int64", "Number of seconds allowed for this object to gracefully terminate before it will be removed from the system. Only set when deletionTimestamp is also set. May only be shortened. Read-only."),
                "deletionTimestamp": ref_field(&meta("Time"), "DeletionTimestamp is RFC 3339 date and time at which this resource will be deleted. This field is set by the server when a graceful deletion is requested by the user, and is not directly settable by a client.\n\nPopulated by the system when a graceful deletion is requested. Read-only. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"),
                "finalizers": json!({
                    "description": "Must be empty before the object is deleted from the registry. Each entry is an identifier for the responsible component that will remove the entry from the list. If the deletionTimestamp of the object is non-nil, entries in this list can only be removed. Finalizers may be processed and removed in any order.",
                    "type": "array",
                    "items": {"type": "string"},
                    "x-kubernetes-list-type": "set",
                    "x-kubernetes-patch-strategy": "merge",
                }),
                "generateName": string("GenerateName is an optional prefix, used by the server, to generate a unique name ONLY IF the Name field has not been provided. If this field is used, the name returned to the client will be different than the name passed. This value will also be combined with a unique suffix. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#idempotency"),
                "generation": integer("int64", "A sequence number representing a specific generation of the desired state. Populated by the system. Read-only."),
                "labels": string_map("Map of string keys and values that can be used to organize and categorize (scope and select) objects. May match selectors of replication controllers and services. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/labels"),
                "managedFields": json!({
                    "description": "ManagedFields maps workflow-id and version to the set of fields that are managed by that workflow. This is mostly for internal housekeeping, and users typically shouldn't need to set or understand this field. A workflow can be the user's name, a controller's name, or the name of a specific apply path like \"ci-cd\". The set of fields is always in the version that the workflow used when modifying the object.",
                    "type": "array",
                    "items": schema_ref(&meta("ManagedFieldsEntry")),
                    "x-kubernetes-list-type": "atomic",
                }),
                "name": string("Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"),
                "namespace": string("Namespace defines the space within which each name must be unique. An empty namespace is equivalent to the \"default\" namespace, but \"default\" is the canonical representation. Not all objects are required to be scoped to a namespace - the value of this field for those objects will be empty.\n\nMust be a DNS_LABEL. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/namespaces"),
                "ownerReferences": json!({
                    "description": "List of objects depended by this object. If ALL objects in the list have been deleted, this object will be garbage collected. If this object is managed by a controller, then an entry in this list will point to this controller, with the controller field set to true. There cannot be more than one managing controller.",
                    "type": "array",
                    "items": schema_ref(&meta("OwnerReference")),
                    "x-kubernetes-list-map-keys": ["uid"],
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-patch-merge-key": "uid",
                    "x-kubernetes-patch-strategy": "merge",
                }),
                "resourceVersion": string("An opaque value that represents the internal version of this object that can be used by clients to determine when objects have changed. May be used for optimistic concurrency, change detection, and the watch operation on a resource or set of resources. Clients must treat these values as opaque and passed unmodified back to the server. They may only be valid for a particular resource or set of resources.\n\nPopulated by the system. Read-only. Value must be treated as opaque by clients and . More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#concurrency-control-and-consistency"),
                "selfLink": string("Deprecated: selfLink is a legacy read-only field that is no longer populated by the system."),
                "uid": string("UID is the unique in time and space value for this object. It is typically generated by the server on successful creation of a resource and is not allowed to change on PUT operations.\n\nPopulated by the system. Read-only. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#uids"),
            }),
            &[],
        ),
    );
    add(
        meta("ListMeta"),
        object(
            "ListMeta describes metadata that synthetic resources must have, including lists and various status objects. A resource may have only one of {ObjectMeta, ListMeta}.",
            json!({
                "continue": string("continue may be set if the user set a limit on the number of items returned, and indicates that the server has more data available. The value is opaque and may be used to issue another request to the endpoint that served this list to retrieve the next set of available objects."),
                "remainingItemCount": integer("int64", "remainingItemCount is the number of subsequent items in the list which are not included in this list response. If the list request contained label or field selectors, then the number of remaining items is unknown and the field will be left unset and omitted during serialization."),
                "resourceVersion": string("String that identifies the server's internal version of this object that can be used by clients to determine when objects have changed. Value must be treated as opaque by clients and passed unmodified back to the server. Populated by the system. Read-only. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#concurrency-control-and-consistency"),
                "selfLink": string("Deprecated: selfLink is a legacy read-only field that is no longer populated by the system."),
            }),
            &[],
        ),
    );
    add(meta("OwnerReference"), {
        let mut o = object(
            "OwnerReference contains enough information to let you identify an owning object. An owning object must be in the same namespace as the dependent, or be cluster-scoped, so there is no namespace field.",
            json!({
                "apiVersion": string("API version of the referent."),
                "blockOwnerDeletion": boolean("If true, AND if the owner has the \"foregroundDeletion\" finalizer, then the owner cannot be deleted from the key-value store until this reference is removed. Defaults to false."),
                "controller": boolean("If true, this reference points to the managing controller."),
                "kind": string("Kind of the referent. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"),
                "name": string("Name of the referent. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"),
                "uid": string("UID of the referent. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#uids"),
            }),
            &["apiVersion", "kind", "name", "uid"],
        );
        o["x-kubernetes-map-type"] = json!("atomic");
        o
    });
    add(
        meta("ManagedFieldsEntry"),
        object(
            "ManagedFieldsEntry is a workflow-id, a FieldSet and the group version of the resource that the fieldset applies to.",
            json!({
                "apiVersion": string("APIVersion defines the version of this resource that this field set applies to. The format is \"group/version\" just like the top-level APIVersion field. It is necessary to track the version of a field set because it cannot be automatically converted."),
                "fieldsType": string("FieldsType is the discriminator for the different fields format and version. There is currently only one possible value: \"FieldsV1\""),
                "fieldsV1": ref_field(&meta("FieldsV1"), "FieldsV1 holds the first JSON version format as described in the \"FieldsV1\" type."),
                "manager": string("Manager is an identifier of the workflow managing these fields."),
                "operation": string("Operation is the type of operation which lead to this ManagedFieldsEntry being created. The only valid values for this field are 'Apply' and 'Update'."),
                "subresource": string("Subresource is the name of the subresource used to update that object, or empty string if the object was updated through the main resource. The value of this field is used to distinguish between managers, even if they share the same name."),
                "time": ref_field(&meta("Time"), "Time is the timestamp of when the ManagedFields entry was added. The timestamp will also be updated if a field is added, the manager changes any of the owned fields value or removes a field. The timestamp does not update when a field is removed from the entry because another manager took it over."),
            }),
            &[],
        ),
    );
    add(
        meta("Patch"),
        json!({
            "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.",
            "type": "object",
        }),
    );
    add(
        meta("Preconditions"),
        object(
            "Preconditions must be fulfilled before an operation (update, delete, etc.) is carried out.",
            json!({
                "resourceVersion": string("Specifies the target ResourceVersion"),
                "uid": string("Specifies the target UID."),
            }),
            &[],
        ),
    );
    add(
        meta("DeleteOptions"),
        with_gvk(
            object(
                "DeleteOptions may be provided when deleting an API object.",
                json!({
                    "apiVersion": string(API_VERSION_DESC),
                    "dryRun": string_list(DRY_RUN, "atomic"),
                    "gracePeriodSeconds": integer("int64", GRACE_PERIOD),
                    "kind": string(KIND_DESC),
                    "orphanDependents": boolean(ORPHAN_DEPENDENTS),
                    "preconditions": ref_field(&meta("Preconditions"), "Must be fulfilled before a deletion is carried out. If not possible, a 409 Conflict status will be returned."),
                    "propagationPolicy": string(PROPAGATION_POLICY),
                }),
                &[],
            ),
            "",
            "v1",
            "DeleteOptions",
        ),
    );
    add(
        meta("StatusCause"),
        object(
            "StatusCause provides more information about an api.Status failure, including cases when multiple errors are encountered.",
            json!({
                "field": string("The field of the resource that has caused this error, as named by its JSON serialization. May include dot and postfix notation for nested attributes. Arrays are zero-indexed.  Fields may appear more than once in an array of causes due to fields having multiple errors. Optional."),
                "message": string("A human-readable description of the cause of the error.  This field may be presented as-is to a reader."),
                "reason": string("A machine-readable description of the cause of the error. If this value is empty there is no information available."),
            }),
            &[],
        ),
    );
    add(
        meta("StatusDetails"),
        object(
            "StatusDetails is a set of additional properties that MAY be set by the server to provide additional information about a response. The Reason field of a Status object defines what attributes will be set. Clients must ignore fields that do not match the defined type of each attribute, and should assume that any attribute may be empty, invalid, or under defined.",
            json!({
                "causes": {
                    "description": "The Causes array includes more details associated with the StatusReason failure. Not all StatusReasons may provide detailed causes.",
                    "type": "array",
                    "items": schema_ref(&meta("StatusCause")),
                    "x-kubernetes-list-type": "atomic",
                },
                "group": string("The group attribute of the resource associated with the status StatusReason."),
                "kind": string("The kind attribute of the resource associated with the status StatusReason. On some operations may differ from the requested resource Kind. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"),
                "name": string("The name attribute of the resource associated with the status StatusReason (when there is a single name which can be described)."),
                "retryAfterSeconds": integer("int32", "If specified, the time in seconds before the operation should be retried. Some errors may indicate the client must take an alternate action - for those errors this field may indicate how long to wait before taking the alternate action."),
                "uid": string("UID of the resource. (when there is a single resource which can be described). More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#uids"),
            }),
            &[],
        ),
    );
    add(
        meta("Status"),
        with_gvk(
            object(
                "Status is a return value for calls that don't return other objects.",
                json!({
                    "apiVersion": string(API_VERSION_DESC),
                    "code": integer("int32", "Suggested HTTP return code for this status, 0 if not set."),
                    "details": ref_field(&meta("StatusDetails"), "Extended data associated with the reason.  Each reason may define its own extended details. This field is optional and the data returned is not guaranteed to conform to any schema except that defined by the reason type."),
                    "kind": string(KIND_DESC),
                    "message": string("A human-readable description of the status of this operation."),
                    "metadata": ref_field(&meta("ListMeta"), LIST_METADATA_DESC),
                    "reason": string("A machine-readable description of why this operation is in the \"Failure\" status. If this value is empty there is no information available. A Reason clarifies an HTTP status code but does not override it."),
                    "status": string("Status of the operation. One of: \"Success\" or \"Failure\". More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#spec-and-status"),
                }),
                &[],
            ),
            "",
            "v1",
            "Status",
        ),
    );

    // --- core/v1 helpers
    add(
        format!("{CORE}.NamespaceSpec"),
        object(
            "NamespaceSpec describes the attributes on a Namespace.",
            json!({
                "finalizers": string_list("Finalizers is an opaque list of values that must be empty to permanently remove object from storage. More info: https://kubernetes.io/docs/tasks/administer-cluster/namespaces/", "atomic"),
            }),
            &[],
        ),
    );
    add(
        format!("{CORE}.NamespaceStatus"),
        object(
            "NamespaceStatus is information about the current status of a Namespace.",
            json!({
                "conditions": {
                    "description": "Represents the latest available observations of a namespace's current state.",
                    "type": "array",
                    "items": schema_ref(&format!("{CORE}.NamespaceCondition")),
                    "x-kubernetes-list-map-keys": ["type"],
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-patch-merge-key": "type",
                    "x-kubernetes-patch-strategy": "merge",
                },
                "phase": {
                    "description": "Phase is the current lifecycle phase of the namespace. More info: https://kubernetes.io/docs/tasks/administer-cluster/namespaces/\n\nPossible enum values:\n - `\"Active\"` means the namespace is available for use in the system\n - `\"Terminating\"` means the namespace is undergoing graceful termination",
                    "type": "string",
                    "enum": ["Active", "Terminating"],
                },
            }),
            &[],
        ),
    );
    add(
        format!("{CORE}.NamespaceCondition"),
        object(
            "NamespaceCondition contains details about state of namespace.",
            json!({
                "lastTransitionTime": ref_field(&meta("Time"), "Last time the condition transitioned from one status to another."),
                "message": string("Human-readable message indicating details about last transition."),
                "reason": string("Unique, one-word, CamelCase reason for the condition's last transition."),
                "status": string("Status of the condition, one of True, False, Unknown."),
                "type": string("Type of namespace controller condition."),
            }),
            &["type", "status"],
        ),
    );
    add(format!("{CORE}.ObjectReference"), {
        let mut o = object(
            "ObjectReference contains enough information to let you inspect or modify the referred object.",
            json!({
                "apiVersion": string("API version of the referent."),
                "fieldPath": string("If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2]."),
                "kind": string("Kind of the referent. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"),
                "name": string("Name of the referent. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names/#names"),
                "namespace": string("Namespace of the referent. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/namespaces/"),
                "resourceVersion": string("Specific resourceVersion to which this reference is made, if any. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#concurrency-control-and-consistency"),
                "uid": string("UID of the referent. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names/#uids"),
            }),
            &[],
        );
        o["x-kubernetes-map-type"] = json!("atomic");
        o
    });
    add(
        format!("{CORE}.EventSeries"),
        object(
            "EventSeries contain information on series of events, i.e. thing that was/is happening continuously for some time.",
            json!({
                "count": integer("int32", "Number of occurrences in this series up to the last heartbeat time"),
                "lastObservedTime": ref_field(&meta("MicroTime"), "Time of the last occurrence observed"),
            }),
            &[],
        ),
    );
    add(
        format!("{CORE}.EventSource"),
        object(
            "EventSource contains information for an event.",
            json!({
                "component": string("Component from which the event is generated."),
                "host": string("Node name on which the event is generated."),
            }),
            &[],
        ),
    );

    // --- events.k8s.io/v1 helpers
    add(
        format!("{EVENTS}.EventSeries"),
        object(
            "EventSeries contain information on series of events, i.e. thing that was/is happening continuously for some time. How often to update the EventSeries is up to the event reporters.",
            json!({
                "count": integer("int32", "count is the number of occurrences in this series up to the last heartbeat time."),
                "lastObservedTime": ref_field(&meta("MicroTime"), "lastObservedTime is the time when last Event from the series was seen before last heartbeat."),
            }),
            &["count", "lastObservedTime"],
        ),
    );

    // --- coordination.k8s.io/v1 helpers
    add(
        format!("{COORDINATION}.LeaseSpec"),
        object(
            "LeaseSpec is a specification of a Lease.",
            json!({
                "acquireTime": ref_field(&meta("MicroTime"), "acquireTime is a time when the current lease was acquired."),
                "holderIdentity": string("holderIdentity contains the identity of the holder of a current lease. If Coordinated Leader Election is used, the holder identity must be equal to the elected LeaseCandidate.metadata.name field."),
                "leaseDurationSeconds": integer("int32", "leaseDurationSeconds is a duration that candidates for a lease need to wait to force acquire it. This is measured against the time of last observed renewTime."),
                "leaseTransitions": integer("int32", "leaseTransitions is the number of transitions of a lease between holders."),
                "preferredHolder": string("PreferredHolder signals to a lease holder that the lease has a more optimal holder and should be given up. This field can only be set if Strategy is also set."),
                "renewTime": ref_field(&meta("MicroTime"), "renewTime is a time when the current holder of a lease has last updated the lease."),
                "strategy": string("Strategy indicates the strategy for picking the leader for coordinated leader election. If the field is not specified, there is no active coordination for this lease. (Alpha) Using this field requires the CoordinatedLeaderElection feature gate to be enabled."),
            }),
            &[],
        ),
    );

    // --- apiextensions.k8s.io/v1 helpers: names and versions are spelled out (kubectl explain
    // crd.spec.names is common); schemas, subresources and conversion are left open.
    let crd = |k: &str| format!("{APIEXTENSIONS}.{k}");
    add(
        crd("CustomResourceDefinitionSpec"),
        object(
            "CustomResourceDefinitionSpec describes how a user wants their resource to appear",
            json!({
                "conversion": free_form("conversion defines conversion settings for the CRD."),
                "group": string("group is the API group of the defined custom resource. The custom resources are served under `/apis/<group>/...`. Must match the name of the CustomResourceDefinition (in the form `<names.plural>.<group>`)."),
                "names": ref_field(&crd("CustomResourceDefinitionNames"), "names specify the resource and kind names for the custom resource."),
                "preserveUnknownFields": boolean("preserveUnknownFields indicates that object fields which are not specified in the OpenAPI schema should be preserved when persisting to storage. apiVersion, kind, metadata and known fields inside metadata are always preserved. This field is deprecated in favor of setting `x-preserve-unknown-fields` to true in `spec.versions[*].schema.openAPIV3Schema`."),
                "scope": string("scope indicates whether the defined custom resource is cluster- or namespace-scoped. Allowed values are `Cluster` and `Namespaced`."),
                "versions": {
                    "description": "versions is the list of all API versions of the defined custom resource. Version names are used to compute the order in which served versions are listed in API discovery.",
                    "type": "array",
                    "items": schema_ref(&crd("CustomResourceDefinitionVersion")),
                    "x-kubernetes-list-type": "atomic",
                },
            }),
            &["group", "names", "scope", "versions"],
        ),
    );
    add(
        crd("CustomResourceDefinitionNames"),
        object(
            "CustomResourceDefinitionNames indicates the names to serve this CustomResourceDefinition",
            json!({
                "categories": string_list("categories is a list of grouped resources this custom resource belongs to (e.g. 'all'). This is published in API discovery documents, and used by clients to support invocations like `kubectl get all`.", "atomic"),
                "kind": string("kind is the serialized kind of the resource. It is normally CamelCase and singular. Custom resource instances will use this value as the `kind` attribute in API calls."),
                "listKind": string("listKind is the serialized kind of the list for this resource. Defaults to \"`kind`List\"."),
                "plural": string("plural is the plural name of the resource to serve. The custom resources are served under `/apis/<group>/<version>/.../<plural>`. Must match the name of the CustomResourceDefinition (in the form `<names.plural>.<group>`). Must be all lowercase."),
                "shortNames": string_list("shortNames are short names for the resource, exposed in API discovery documents, and used by clients to support invocations like `kubectl get <shortname>`. It must be all lowercase.", "atomic"),
                "singular": string("singular is the singular name of the resource. It must be all lowercase. Defaults to lowercased `kind`."),
            }),
            &["plural", "kind"],
        ),
    );
    add(
        crd("CustomResourceDefinitionVersion"),
        object(
            "CustomResourceDefinitionVersion describes a version for CRD.",
            json!({
                "additionalPrinterColumns": {
                    "description": "additionalPrinterColumns specifies additional columns returned in Table output. If no columns are specified, a single column displaying the age of the custom resource is used.",
                    "type": "array",
                    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "x-kubernetes-list-type": "atomic",
                },
                "deprecated": boolean("deprecated indicates this version of the custom resource API is deprecated. When set to true, API requests to this version receive a warning header in the server response. Defaults to false."),
                "deprecationWarning": string("deprecationWarning overrides the default warning returned to API clients. May only be set when `deprecated` is true."),
                "name": string("name is the version name, e.g. “v1”, “v2beta1”, etc. The custom resources are served under this version at `/apis/<group>/<version>/...` if `served` is true."),
                "schema": free_form("schema describes the schema used for validation, pruning, and defaulting of this version of the custom resource."),
                "selectableFields": {
                    "description": "selectableFields specifies paths to fields that may be used as field selectors.",
                    "type": "array",
                    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "x-kubernetes-list-type": "atomic",
                },
                "served": boolean("served is a flag enabling/disabling this version from being served via REST APIs"),
                "storage": boolean("storage indicates this version should be used when persisting custom resources to storage. There must be exactly one version with storage=true."),
                "subresources": free_form("subresources specify what subresources this version of the defined custom resource have."),
            }),
            &["name", "served", "storage"],
        ),
    );
    add(
        crd("CustomResourceDefinitionStatus"),
        object(
            "CustomResourceDefinitionStatus indicates the state of the CustomResourceDefinition",
            json!({
                "acceptedNames": ref_field(&crd("CustomResourceDefinitionNames"), "acceptedNames are the names that are actually being used to serve discovery. They may be different than the names in spec."),
                "conditions": {
                    "description": "conditions indicate state for particular aspects of a CustomResourceDefinition",
                    "type": "array",
                    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "x-kubernetes-list-map-keys": ["type"],
                    "x-kubernetes-list-type": "map",
                },
                "storedVersions": string_list("storedVersions lists all versions of CustomResources that were ever persisted.", "atomic"),
            }),
            &[],
        ),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    fn crds() -> Vec<CustomResourceDefinition> {
        kpve_crds::crdgen::all()
    }

    fn registry() -> Registry {
        Registry::new(&crds())
    }

    /// kubectl's `supportsQueryParamV3`: the PATCH operation tagged with the GVK lists the
    /// query parameter.
    fn patch_supports(doc: &Value, gvk: Value, param: &str) -> bool {
        let paths = doc["paths"].as_object().expect("paths");
        let patch = paths
            .values()
            .filter_map(|item| item.get("patch"))
            .find(|op| op["x-kubernetes-group-version-kind"] == gvk)
            .expect("a PATCH operation for the GVK");
        patch["parameters"]
            .as_array()
            .expect("params")
            .iter()
            .any(|p| p["name"] == param && p["in"] == "query")
    }

    /// `kubectl explain`: the schema carrying the GVK.
    fn schema_for(doc: &Value, gvk: Value) -> &Value {
        doc["components"]["schemas"]
            .as_object()
            .expect("schemas")
            .values()
            .find(|s| s["x-kubernetes-group-version-kind"].as_array().is_some_and(|l| l.contains(&gvk)))
            .expect("schema with GVK")
    }

    fn refs(value: &Value) -> Vec<String> {
        fn walk(value: &Value, out: &mut Vec<String>) {
            match value {
                Value::Object(m) => m.iter().for_each(|(k, v)| match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => walk(v, out),
                }),
                Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(value, &mut out);
        out
    }

    #[test]
    fn kpve_document_satisfies_kubectl() {
        let (doc, hash) = v3_group_version(&registry(), "kpve.io", "v1alpha1").expect("served");
        assert_eq!(doc["openapi"], "3.0.0");
        assert_eq!(hash.len(), 128);
        assert!(hash.chars().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
        let gvk = json!({"group": "kpve.io", "version": "v1alpha1", "kind": "VirtualMachine"});
        assert!(patch_supports(&doc, gvk.clone(), "fieldValidation"));
        assert!(patch_supports(&doc, gvk.clone(), "force"));

        let item = &doc["paths"]["/apis/kpve.io/v1alpha1/namespaces/{namespace}/virtualmachines/{name}"];
        let patch = &item["patch"];
        assert_eq!(patch["x-kubernetes-action"], "patch");
        assert_eq!(patch["operationId"], "patchKpveIoV1alpha1NamespacedVirtualMachine");
        let types: Vec<&String> =
            patch["requestBody"]["content"].as_object().expect("content").keys().collect();
        assert_eq!(
            types,
            ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
        );
        for p in ["dryRun", "fieldManager", "fieldValidation", "force"] {
            assert!(patch["parameters"].as_array().expect("params").iter().any(|q| q["name"] == p), "{p}");
        }
        let path_params: Vec<&Value> =
            item["parameters"].as_array().expect("params").iter().map(|p| &p["name"]).collect();
        assert_eq!(path_params, [&json!("name"), &json!("namespace")]);
        assert_eq!(item["get"]["x-kubernetes-action"], "get");
        assert_eq!(
            item["put"]["requestBody"]["content"]["*/*"]["schema"]["$ref"],
            "#/components/schemas/io.kpve.v1alpha1.VirtualMachine"
        );
        assert_eq!(item["delete"]["x-kubernetes-action"], "delete");

        let collection = &doc["paths"]["/apis/kpve.io/v1alpha1/namespaces/{namespace}/virtualmachines"];
        assert_eq!(collection["get"]["x-kubernetes-action"], "list");
        assert_eq!(collection["post"]["x-kubernetes-action"], "post");
        assert_eq!(collection["delete"]["x-kubernetes-action"], "deletecollection");
        assert_eq!(
            collection["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/io.kpve.v1alpha1.VirtualMachineList"
        );
        let list_params: Vec<&str> = collection["get"]["parameters"]
            .as_array()
            .expect("params")
            .iter()
            .map(|p| p["name"].as_str().expect("name"))
            .collect();
        for p in [
            "labelSelector",
            "fieldSelector",
            "limit",
            "continue",
            "resourceVersion",
            "resourceVersionMatch",
            "watch",
            "timeoutSeconds",
            "allowWatchBookmarks",
        ] {
            assert!(list_params.contains(&p), "{p}");
        }
        assert_eq!(
            doc["paths"]["/apis/kpve.io/v1alpha1/virtualmachines"]["get"]["operationId"],
            "listKpveIoV1alpha1VirtualMachineForAllNamespaces"
        );
        let status =
            &doc["paths"]["/apis/kpve.io/v1alpha1/namespaces/{namespace}/virtualmachines/{name}/status"];
        assert_eq!(status["patch"]["x-kubernetes-group-version-kind"], gvk);
        assert!(status.get("delete").is_none());
        // Cluster-scoped kinds have no namespace segment.
        assert!(doc["paths"]["/apis/kpve.io/v1alpha1/hypervisors/{name}/status"]["patch"].is_object());
        assert!(doc["paths"].get("/apis/kpve.io/v1alpha1/namespaces/{namespace}/hypervisors").is_none());

        // explain virtualmachines.spec.cpu
        let vm =
            schema_for(&doc, json!({"group": "kpve.io", "kind": "VirtualMachine", "version": "v1alpha1"}));
        assert_eq!(vm, &doc["components"]["schemas"]["io.kpve.v1alpha1.VirtualMachine"]);
        assert_eq!(vm["type"], "object");
        assert!(vm["description"].is_string());
        assert_eq!(
            vm["properties"]["metadata"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
        );
        assert_eq!(vm["properties"]["apiVersion"]["type"], "string");
        assert!(vm["properties"]["spec"]["properties"]["cpu"].is_object());
        // CRD extensions and nullable are kept as written.
        assert_eq!(vm["properties"]["spec"]["properties"]["agent"]["nullable"], true);
        assert_eq!(
            vm["properties"]["spec"]["properties"]["cloudInit"]["properties"]["ipConfig"]["x-kubernetes-list-type"],
            "map"
        );
        let list = schema_for(
            &doc,
            json!({"group": "kpve.io", "kind": "VirtualMachineList", "version": "v1alpha1"}),
        );
        assert_eq!(list["required"], json!(["items"]));
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for name in [
            "ObjectMeta",
            "ListMeta",
            "Status",
            "Patch",
            "DeleteOptions",
            "OwnerReference",
            "ManagedFieldsEntry",
            "Time",
        ] {
            assert!(schemas.contains_key(&format!("{META}.{name}")), "{name}");
        }
        // No built-in helper types leak into a CRD group's document.
        assert!(!schemas.keys().any(|k| k.starts_with("io.k8s.api.")));
    }

    #[test]
    fn every_ref_resolves() {
        let reg = registry();
        for (group, versions) in reg.groups() {
            for version in versions {
                let (doc, _) = v3_group_version(&reg, &group, &version).expect("served");
                let schemas = doc["components"]["schemas"].as_object().expect("schemas");
                for r in refs(&doc) {
                    let name = r.strip_prefix(SCHEMAS).expect("components ref");
                    assert!(schemas.contains_key(name), "{group}/{version}: {r}");
                }
            }
        }
        let doc = v2(&reg);
        let definitions = doc["definitions"].as_object().expect("definitions");
        for r in refs(&doc) {
            let name = r.strip_prefix(DEFINITIONS).expect("definitions ref");
            assert!(definitions.contains_key(name), "v2: {r}");
        }
    }

    #[test]
    fn hash_is_stable_and_tracks_changes() {
        let (doc1, h1) = v3_group_version(&registry(), "kpve.io", "v1alpha1").expect("served");
        let (doc2, h2) = v3_group_version(&registry(), "kpve.io", "v1alpha1").expect("served");
        assert_eq!(h1, h2);
        assert_eq!(serde_json::to_string(&doc1).expect("json"), serde_json::to_string(&doc2).expect("json"));
        assert_eq!(v3_root(&registry()), v3_root(&registry()));

        let mut changed = crds();
        let vm = changed.iter_mut().find(|c| c.spec.names.kind == "VirtualMachine").expect("vm crd");
        let schema =
            vm.spec.versions[0].schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()).expect("schema");
        schema.description = Some("changed".into());
        let (_, h3) = v3_group_version(&Registry::new(&changed), "kpve.io", "v1alpha1").expect("served");
        assert_ne!(h1, h3);
        // Other group versions are unaffected.
        let core = |r: &Registry| v3_group_version(r, "", "v1").expect("core").1;
        assert_eq!(core(&registry()), core(&Registry::new(&changed)));
    }

    #[test]
    fn root_lists_every_group_version() {
        let reg = registry();
        let root = v3_root(&reg);
        let paths = root["paths"].as_object().expect("paths");
        for key in [
            "api/v1",
            "apis/kpve.io/v1alpha1",
            "apis/events.k8s.io/v1",
            "apis/coordination.k8s.io/v1",
            "apis/apiextensions.k8s.io/v1",
        ] {
            let url = paths[key]["serverRelativeURL"].as_str().unwrap_or_else(|| panic!("{key}"));
            let (group, version) = match key.split('/').collect::<Vec<_>>()[..] {
                ["api", v] => ("", v),
                ["apis", g, v] => (g, v),
                _ => unreachable!(),
            };
            let (_, hash) = v3_group_version(&reg, group, version).expect("served");
            assert_eq!(url, format!("/openapi/v3/{key}?hash={hash}"));
        }
        assert_eq!(paths.len(), 5);
        assert!(v3_group_version(&reg, "kpve.io", "v9").is_none());
        assert!(v3_group_version(&reg, "nope.io", "v1").is_none());
    }

    #[test]
    fn builtin_documents() {
        let reg = registry();
        let (core, _) = v3_group_version(&reg, "", "v1").expect("core");
        let ns_gvk = json!({"group": "", "version": "v1", "kind": "Namespace"});
        // kubectl's fallback for GVs missing from the root uses the Namespace PATCH op.
        assert!(patch_supports(&core, ns_gvk, "fieldValidation"));
        let ns_patch = &core["paths"]["/api/v1/namespaces/{name}"]["patch"];
        assert_eq!(ns_patch["operationId"], "patchCoreV1Namespace");
        assert!(ns_patch["requestBody"]["content"].get(STRATEGIC_MERGE).is_some());
        assert!(core["paths"]["/api/v1/namespaces/{namespace}/events/{name}"]["patch"].is_object());
        assert!(core["paths"]["/api/v1/events"]["get"].is_object());
        let ns = schema_for(&core, json!({"group": "", "kind": "Namespace", "version": "v1"}));
        assert_eq!(
            ns["properties"]["spec"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.NamespaceSpec"
        );
        let schemas = &core["components"]["schemas"];
        assert_eq!(schemas["io.k8s.api.core.v1.NamespaceStatus"]["properties"]["phase"]["type"], "string");
        let event = schema_for(&core, json!({"group": "", "kind": "Event", "version": "v1"}));
        assert_eq!(
            event["properties"]["involvedObject"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.ObjectReference"
        );
        assert_eq!(schemas[format!("{META}.MicroTime")]["format"], "date-time");

        let (events, _) = v3_group_version(&reg, "events.k8s.io", "v1").expect("events");
        let ev = schema_for(&events, json!({"group": "events.k8s.io", "kind": "Event", "version": "v1"}));
        assert_eq!(ev["required"], json!(["eventTime"]));
        assert_eq!(ev["properties"]["eventTime"]["allOf"][0]["$ref"], format!("{SCHEMAS}{META}.MicroTime"));
        assert!(events["components"]["schemas"]["io.k8s.api.events.v1.EventSeries"].is_object());

        let (coord, _) = v3_group_version(&reg, "coordination.k8s.io", "v1").expect("coordination");
        assert!(
            coord["paths"]["/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"]["patch"]
                .is_object()
        );
        let spec = &coord["components"]["schemas"]["io.k8s.api.coordination.v1.LeaseSpec"]["properties"];
        for f in [
            "holderIdentity",
            "leaseDurationSeconds",
            "acquireTime",
            "renewTime",
            "leaseTransitions",
            "strategy",
            "preferredHolder",
        ] {
            assert!(spec[f].is_object(), "{f}");
        }

        let (ext, _) = v3_group_version(&reg, "apiextensions.k8s.io", "v1").expect("apiextensions");
        let crd = schema_for(
            &ext,
            json!({"group": "apiextensions.k8s.io", "kind": "CustomResourceDefinition", "version": "v1"}),
        );
        assert_eq!(crd["required"], json!(["spec"]));
        let spec = &ext["components"]["schemas"][format!("{APIEXTENSIONS}.CustomResourceDefinitionSpec")];
        assert_eq!(spec["required"], json!(["group", "names", "scope", "versions"]));
        assert!(
            ext["paths"]["/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}/status"].is_object()
        );
    }

    #[test]
    fn swagger_v2() {
        let doc = v2(&registry());
        assert_eq!(doc["swagger"], "2.0");
        let paths = doc["paths"].as_object().expect("paths");
        let patch = &paths["/apis/kpve.io/v1alpha1/namespaces/{namespace}/virtualmachines/{name}"]["patch"];
        let params = patch["parameters"].as_array().expect("params");
        assert_eq!(params[0]["in"], "body");
        assert_eq!(params[0]["schema"]["$ref"], "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.Patch");
        assert!(params.iter().any(|p| p["name"] == "fieldValidation" && p["type"] == "string"));
        assert_eq!(patch["consumes"].as_array().expect("consumes").len(), 3);
        assert!(paths.contains_key("/api/v1/namespaces/{name}"));
        assert!(paths.contains_key("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"));
        let defs = doc["definitions"].as_object().expect("definitions");
        let vm = &defs["io.kpve.v1alpha1.VirtualMachine"];
        assert_eq!(vm["properties"]["spec"]["properties"]["agent"]["x-nullable"], true);
        assert!(vm["properties"]["spec"]["properties"]["agent"].get("nullable").is_none());
        assert!(defs.contains_key("io.k8s.api.core.v1.Namespace"));
        // Operation ids are unique across the whole document.
        let mut ids: Vec<&str> = paths
            .values()
            .flat_map(|item| item.as_object().expect("item").values())
            .filter_map(|op| op.get("operationId").and_then(Value::as_str))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}
