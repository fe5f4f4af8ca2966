//! The Kubernetes object semantics on top of a [`Store`]: metadata the server owns, generation,
//! status subresource, finalizers and deletion, no-op detection, admission, patches and
//! server-side apply, list paging and selectors, and the start of a watch. Transport-free, so
//! the HTTP layer, the garbage collector and tests call the same code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kpve_crds::validation::SchemaValidator;
use rand::Rng;
use serde_json::{Map, Value, json};

use crate::admission::{self, FieldValidation, VmidIndex};
use crate::auth::{Decision, Identity};
use crate::events;
use crate::patch::{self, PatchError};
use crate::resources::{Registry, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::ssa::{self, SsaError};
use crate::status::{ApiError, ApiResult, Cause};
use crate::store::{Event, KeyValue, Revision, Store, StoreError, Watch};

/// The namespaces that always exist.
pub const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// How many times an unconditional PATCH retries after losing a race.
const PATCH_RETRIES: usize = 16;

/// The field manager the server's own writes use.
pub const SERVER_MANAGER: &str = "kpve-apiserver";

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).expect("rounding in range").to_string()
}

/// Who writes and how.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub identity: Identity,
    pub decision: Decision,
    pub field_manager: Option<String>,
    pub dry_run: bool,
    pub field_validation: FieldValidation,
}

impl WriteOptions {
    pub fn system() -> WriteOptions {
        WriteOptions {
            identity: Identity::system(),
            decision: Decision::Allow,
            field_manager: Some(SERVER_MANAGER.into()),
            dry_run: false,
            field_validation: FieldValidation::Ignore,
        }
    }
}

/// The result of a write.
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    /// 201 rather than 200.
    pub created: bool,
    /// `Warning: 299` headers (unknown fields under `fieldValidation=Warn`).
    pub warnings: Vec<String>,
}

/// PATCH content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone)]
pub struct DeleteOptions {
    pub propagation: Propagation,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

impl Default for DeleteOptions {
    fn default() -> Self {
        DeleteOptions { propagation: Propagation::Background, uid: None, resource_version: None }
    }
}

/// List request options.
#[derive(Debug, Default)]
pub struct ListOptions {
    pub labels: Option<LabelSelector>,
    pub fields: Option<FieldSelector>,
    pub limit: usize,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// One page of a list.
#[derive(Debug)]
pub struct ListResult {
    pub items: Vec<Value>,
    pub revision: Revision,
    pub continue_token: Option<String>,
}

/// A list page as already-serialized items: (items, list revision, continue token).
pub type RawList = (Vec<Vec<u8>>, Revision, Option<String>);

/// A watch about to stream: synthetic ADDED objects first, then store events.
#[derive(Debug)]
pub struct WatchStart {
    pub initial: Vec<Value>,
    pub watch: Watch,
    pub revision: Revision,
}

/// The object as it stands in the store.
struct Current {
    kv: KeyValue,
    object: Value,
}

pub struct Api {
    pub store: Arc<dyn Store>,
    registry: RwLock<Arc<Registry>>,
    validators: RwLock<HashMap<(String, String, String), Arc<SchemaValidator>>>,
    vmids: Mutex<VmidIndex>,
    gc_kick: tokio::sync::Notify,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

fn meta(object: &Value) -> &Value {
    object.get("metadata").unwrap_or(&Value::Null)
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    meta(object).get(field).and_then(Value::as_str)
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"].as_object_mut().expect("metadata is an object")
}

fn finalizers(object: &Value) -> Vec<String> {
    meta(object)
        .get("finalizers")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Go's `omitempty` for the metadata fields clients test against (`finalizers: []` breaks the
/// kube-rs finalizer helper's `test: null`).
fn omit_empty(object: &mut Value) {
    let m = meta_mut(object);
    for field in ["finalizers", "ownerReferences", "managedFields"] {
        let empty = match m.get(field) {
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(Value::Null) => true,
            _ => false,
        };
        if empty {
            m.remove(field);
        }
    }
}

/// The object without metadata (and status, when it has its own subresource): what counts for
/// `generation`.
fn generation_view(rt: &ResourceType, object: &Value) -> Value {
    let mut v = object.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if rt.status_subresource {
            m.remove("status");
        }
    }
    v
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn patch_error(rt: &ResourceType, name: &str, e: PatchError) -> ApiError {
    match e {
        PatchError::Malformed(m) => ApiError::bad_request(m),
        PatchError::Failed(m) => ApiError::invalid(
            rt,
            name,
            vec![Cause { reason: "FieldValueInvalid".into(), message: m, field: "".into() }],
        ),
    }
}

impl Api {
    pub fn new(store: Arc<dyn Store>) -> ApiResult<Api> {
        let api = Api {
            store,
            registry: RwLock::new(Arc::new(Registry::new(&[]))),
            validators: RwLock::new(HashMap::new()),
            vmids: Mutex::new(VmidIndex::default()),
            gc_kick: tokio::sync::Notify::new(),
        };
        api.bootstrap()?;
        Ok(api)
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.read().expect("registry lock").clone()
    }

    pub fn gc_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.gc_kick.notified()
    }

    /// System namespaces, kpve's CRDs (created or brought up to date), the registry and the
    /// VMID index.
    fn bootstrap(&self) -> ApiResult<()> {
        self.rebuild_registry();
        let registry = self.registry();
        let ns_rt = registry.get("", "v1", "namespaces").expect("namespaces are built in").clone();
        for ns in SYSTEM_NAMESPACES {
            if self.store.get(&key(&ns_rt, None, ns))?.is_none() {
                self.create(&ns_rt, None, json!({"metadata": {"name": ns}}), &WriteOptions::system())?;
            }
        }
        let crd_rt = registry
            .get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .expect("CRDs are built in")
            .clone();
        for crd in kpve_crds::crdgen::all() {
            let body = serde_json::to_value(&crd).expect("CRDs serialize");
            let name = crd.metadata.name.clone().unwrap_or_default();
            match self.current(&crd_rt, None, &name)? {
                None => {
                    self.create(&crd_rt, None, body, &WriteOptions::system())?;
                }
                Some(cur) if cur.object.get("spec") != body.get("spec") => {
                    let mut object = cur.object.clone();
                    object["spec"] = body["spec"].clone();
                    self.commit(&crd_rt, None, Some(&cur), object, None, false, &WriteOptions::system())
                        .map_err(|e| e.into_api(&crd_rt, &name))?;
                }
                Some(_) => {}
            }
        }
        let mut vmids = self.vmids.lock().expect("vmid lock");
        for rt in self.registry().all().filter(|rt| admission::is_guest(rt)) {
            let page = self.store.list(&prefix(rt, None), None, 0)?;
            for kv in page.items {
                let object: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
                if let Some(vmid) = admission::vmid_of(&object) {
                    vmids.insert(vmid, admission::guest_ref(&object));
                }
            }
        }
        Ok(())
    }

    /// Rebuilds the served types from the stored CRDs.
    pub fn rebuild_registry(&self) {
        let builtin = Registry::new(&[]);
        let crd_rt =
            builtin.get("apiextensions.k8s.io", "v1", "customresourcedefinitions").expect("built in");
        let crds: Vec<CustomResourceDefinition> = self
            .store
            .list(&prefix(crd_rt, None), None, 0)
            .map(|page| page.items)
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| match serde_json::from_slice(&kv.value) {
                Ok(crd) => Some(crd),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "stored CRD does not decode; not served");
                    None
                }
            })
            .collect();
        let mut validators = HashMap::new();
        for crd in &crds {
            for rt in ResourceType::from_crd(crd) {
                match SchemaValidator::for_crd(crd, &rt.version) {
                    Ok(v) => {
                        validators
                            .insert((rt.group.clone(), rt.version.clone(), rt.plural.clone()), Arc::new(v));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "CRD schema does not compile; objects are not validated")
                    }
                }
            }
        }
        *self.validators.write().expect("validator lock") = validators;
        *self.registry.write().expect("registry lock") = Arc::new(Registry::new(&crds));
    }

    fn current(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<Option<Current>> {
        Ok(self.store.get(&key(rt, ns, name))?.map(|kv| {
            let object = decode(rt, &kv);
            Current { kv, object }
        }))
    }

    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        self.current(rt, ns, name)?.map(|c| c.object).ok_or_else(|| ApiError::not_found(rt, name))
    }

    fn check_namespace(&self, rt: &ResourceType, ns: Option<&str>, creating: bool) -> ApiResult<()> {
        let Some(ns) = ns.filter(|_| rt.namespaced) else { return Ok(()) };
        let registry = self.registry();
        let ns_rt = registry.get("", "v1", "namespaces").expect("built in");
        match self.store.get(&key(ns_rt, None, ns))? {
            None => Err(ApiError::namespace_not_found(ns)),
            Some(kv) if creating => {
                let object = decode(ns_rt, &kv);
                if meta(&object).get("deletionTimestamp").is_some() {
                    let mut e = ApiError::forbidden(format!(
                        "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        rt.qualified_name()
                    ));
                    e.details = Some(Box::new(json!({"group": rt.group, "kind": rt.plural})));
                    e.causes = vec![Cause {
                        reason: "NamespaceTerminating".into(),
                        message: format!("namespace {ns} is being terminated"),
                        field: "metadata.namespace".into(),
                    }];
                    Err(e)
                } else {
                    Ok(())
                }
            }
            Some(_) => Ok(()),
        }
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut body: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be a JSON or YAML object"));
        }
        check_type(rt, &body)?;
        let m = meta_mut(&mut body);
        if m.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            match m.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let name = format!("{prefix}{}", random_suffix());
                    m.insert("name".into(), Value::String(name));
                }
                _ => {}
            }
        }
        let name = meta_str(&body, "name").unwrap_or("").to_string();
        if name.is_empty() {
            return Err(ApiError::invalid(
                rt,
                "",
                vec![Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value: name or generateName is required".into(),
                    field: "metadata.name".into(),
                }],
            ));
        }
        self.check_namespace(rt, ns, true)?;
        let pre_unknown = self.strict_unknown(rt, &mut body, opts)?;
        let mut written =
            self.commit(rt, ns, None, body, None, false, opts).map_err(|e| e.into_api(rt, &name))?;
        written.warnings.extend(pre_unknown);
        Ok(written)
    }

    /// Prunes unknown fields and applies `fieldValidation` to them.
    fn strict_unknown(
        &self,
        rt: &ResourceType,
        body: &mut Value,
        opts: &WriteOptions,
    ) -> ApiResult<Vec<String>> {
        unknown_fields(admission::prune(rt, body), opts, |unknown| {
            let list: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
            format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: {}",
                list.join(", "),
                kind = rt.kind,
                v = rt.version
            )
        })
    }

    /// PUT.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        mut body: Value,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be a JSON or YAML object"));
        }
        check_type(rt, &body)?;
        check_name(rt, &body, name)?;
        let Some(cur) = self.current(rt, ns, name)? else {
            if rt.builtin && rt.kind != "Namespace" && subresource.is_none() {
                meta_mut(&mut body).insert("name".into(), Value::String(name.to_string()));
                return self.create(rt, ns, body, opts);
            }
            return Err(ApiError::not_found(rt, name));
        };
        match meta_str(&body, "resourceVersion").filter(|v| !v.is_empty()) {
            Some(rv) if rv != cur.kv.mod_revision.to_string() => return Err(ApiError::conflict(rt, name)),
            Some(_) => {}
            None if !rt.builtin => {
                return Err(ApiError::invalid_field(
                    rt,
                    name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                ));
            }
            None => {}
        }
        if let Some(uid) = meta_str(&body, "uid").filter(|u| !u.is_empty())
            && Some(uid) != meta_str(&cur.object, "uid")
        {
            return Err(ApiError::conflict_message(
                rt,
                name,
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    rt.qualified_name(),
                    meta_str(&cur.object, "uid").unwrap_or("")
                ),
            ));
        }
        let warnings = self.strict_unknown(rt, &mut body, opts)?;
        let mut written = self
            .commit(rt, ns, Some(&cur), body, subresource, false, opts)
            .map_err(|e| e.into_api(rt, name))?;
        written.warnings.extend(warnings);
        Ok(written)
    }

    /// PATCH (all four types).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        patch_type: PatchType,
        body: Value,
        force: bool,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        if patch_type == PatchType::Strategic && !rt.builtin {
            return Err(ApiError::unsupported_media_type("application/strategic-merge-patch+json"));
        }
        if force && patch_type != PatchType::Apply {
            return Err(ApiError::bad_request("force may only be specified with server-side apply"));
        }
        if patch_type == PatchType::Apply {
            return self.apply(rt, ns, name, subresource, body, force, opts);
        }
        for _ in 0..PATCH_RETRIES {
            let Some(cur) = self.current(rt, ns, name)? else { return Err(ApiError::not_found(rt, name)) };
            let mut new = match patch_type {
                PatchType::Json => {
                    patch::json_patch(&cur.object, &body).map_err(|e| patch_error(rt, name, e))?
                }
                PatchType::Merge => {
                    if !body.is_object() {
                        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                    }
                    patch::merge_patch(&cur.object, &body)
                }
                PatchType::Strategic => patch::strategic_merge_patch(rt, &cur.object, &body)
                    .map_err(|e| patch_error(rt, name, e))?,
                PatchType::Apply => unreachable!("handled above"),
            };
            let rv = meta_str(&new, "resourceVersion").map(String::from);
            let precondition = rv.as_deref().is_some_and(|rv| rv != cur.kv.mod_revision.to_string());
            if precondition {
                return Err(ApiError::conflict(rt, name));
            }
            let warnings = self.strict_unknown(rt, &mut new, opts)?;
            match self.commit(rt, ns, Some(&cur), new, subresource, false, opts) {
                Err(CommitError::Raced) => continue,
                Ok(mut written) => {
                    written.warnings.extend(warnings);
                    return Ok(written);
                }
                Err(CommitError::Api(e)) => return Err(e),
            }
        }
        Err(ApiError::conflict(rt, name))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        mut config: Value,
        force: bool,
        opts: &WriteOptions,
    ) -> ApiResult<Written> {
        let Some(manager) = opts.field_manager.clone().filter(|m| !m.is_empty()) else {
            return Err(ApiError::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        };
        if !config.is_object() {
            return Err(ApiError::bad_request("an apply patch must be an object"));
        }
        check_type(rt, &config)?;
        if config.get("apiVersion").is_none() || config.get("kind").is_none() {
            return Err(ApiError::bad_request("apiVersion and kind must be set in an apply configuration"));
        }
        check_name(rt, &config, name)?;
        meta_mut(&mut config).insert("name".into(), Value::String(name.to_string()));
        // Apply reports unknown fields the way structured-merge-diff does.
        let warnings = unknown_fields(admission::prune(rt, &mut config), opts, |unknown| {
            unknown
                .iter()
                .map(|f| format!(".{f}: field not declared in schema"))
                .collect::<Vec<_>>()
                .join(", ")
        })?;
        for _ in 0..PATCH_RETRIES {
            let cur = self.current(rt, ns, name)?;
            if cur.is_none() && subresource.is_some() {
                return Err(ApiError::not_found(rt, name));
            }
            let now = now_rfc3339();
            let merged =
                ssa::apply(rt, cur.as_ref().map(|c| &c.object), &config, &manager, subresource, force, &now)
                    .map_err(|e| ssa_error(rt, name, e))?;
            let result = match &cur {
                None => {
                    self.check_namespace(rt, ns, true)?;
                    self.commit(rt, ns, None, merged, None, true, opts)
                }
                Some(cur) => self.commit(rt, ns, Some(cur), merged, subresource, true, opts),
            };
            match result {
                Err(CommitError::Raced) => continue,
                Ok(mut written) => {
                    written.warnings.extend(warnings);
                    return Ok(written);
                }
                Err(CommitError::Api(e)) => return Err(e),
            }
        }
        Err(ApiError::conflict(rt, name))
    }

    /// The shared tail of every write: server-owned metadata, subresource rules, admission,
    /// generation, managedFields, no-op detection, finalizer-driven deletion, storage.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        old: Option<&Current>,
        mut new: Value,
        subresource: Option<&str>,
        applied: bool,
        opts: &WriteOptions,
    ) -> Result<Written, CommitError> {
        let name = meta_str(&new, "name")
            .or_else(|| old.and_then(|o| meta_str(&o.object, "name")))
            .unwrap_or("")
            .to_string();
        if let Some(sub) = subresource
            && (sub != "status" || !rt.status_subresource)
        {
            return Err(ApiError::not_found_path().into());
        }
        if let (Decision::IfGuestBoundTo(node), Some(old)) = (&opts.decision, old) {
            let status = old.object.get("status");
            let bound = status.and_then(|s| s.get("node")).and_then(Value::as_str);
            // The target of a live migration reports its part before the guest is bound to it.
            let receiving = status.and_then(|s| s.pointer("/migration/target")).and_then(Value::as_str);
            // Only its part: the migration record while it is under way, nothing else.
            let only_migration = || {
                let phase = status.and_then(|s| s.pointer("/migration/phase")).and_then(Value::as_str);
                let without = |s: Option<&Value>| {
                    let mut s = s.cloned().unwrap_or(Value::Null);
                    if let Some(o) = s.as_object_mut() {
                        o.remove("migration");
                    }
                    s
                };
                !matches!(phase, Some("Completed" | "Failed"))
                    && without(status) == without(new.get("status"))
            };
            if bound != Some(node.as_str()) && (receiving != Some(node.as_str()) || !only_migration()) {
                return Err(ApiError::forbidden(format!(
                    "{} \"{name}\" is forbidden: node {node} may only write the status of guests bound to it or migrating to it",
                    rt.qualified_name()
                ))
                .into());
            }
        }
        new["apiVersion"] = Value::String(rt.api_version());
        new["kind"] = Value::String(rt.kind.clone());
        // Status subresource: a /status write changes only .status; a main write never does.
        if let Some(old) = old {
            if subresource == Some("status") {
                let mut merged = old.object.clone();
                match new.get("status") {
                    Some(s) => merged["status"] = s.clone(),
                    None => {
                        merged.as_object_mut().expect("object").remove("status");
                    }
                }
                let mf = meta(&new).get("managedFields").cloned();
                match mf {
                    Some(mf) => meta_mut(&mut merged).insert("managedFields".into(), mf),
                    None => meta_mut(&mut merged).remove("managedFields"),
                };
                new = merged;
            } else if rt.status_subresource {
                match old.object.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        new.as_object_mut().expect("object").remove("status");
                    }
                }
            }
        } else if rt.status_subresource && !rt.builtin {
            new.as_object_mut().expect("object").remove("status");
        }
        {
            let m = meta_mut(&mut new);
            m.remove("resourceVersion");
            m.remove("selfLink");
            match ns.filter(|_| rt.namespaced) {
                Some(ns) => {
                    if m.get("namespace").and_then(Value::as_str).is_some_and(|b| b != ns) {
                        return Err(ApiError::bad_request(
                            "the namespace of the provided object does not match the namespace sent on the request",
                        ).into());
                    }
                    m.insert("namespace".into(), Value::String(ns.to_string()));
                }
                None => {
                    m.remove("namespace");
                }
            }
            match old {
                Some(old) => {
                    let om = meta(&old.object);
                    for field in [
                        "uid",
                        "creationTimestamp",
                        "deletionTimestamp",
                        "deletionGracePeriodSeconds",
                        "generation",
                    ] {
                        match om.get(field) {
                            Some(v) => m.insert(field.into(), v.clone()),
                            None => m.remove(field),
                        };
                    }
                }
                None => {
                    for field in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
                        m.remove(field);
                    }
                    m.insert("uid".into(), Value::String(uuid::Uuid::new_v4().to_string()));
                    m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
                    m.insert("generation".into(), Value::from(1));
                }
            }
        }
        if let Some(old) = old
            && meta(&old.object).get("deletionTimestamp").is_some()
        {
            let before = finalizers(&old.object);
            if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid_field(
                    rt,
                    &name,
                    "metadata.finalizers",
                    format!(
                        "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]"
                    ),
                ).into());
            }
        }
        self.builtin_rules(rt, old.map(|o| &o.object), &mut new);
        typed_builtin(rt, &mut new)?;
        // Admission.
        admission::apply_defaults(rt, &mut new);
        let mut causes = admission::validate_metadata(rt, &new);
        let validator = self
            .validators
            .read()
            .expect("validator lock")
            .get(&(rt.group.clone(), rt.version.clone(), rt.plural.clone()))
            .cloned();
        if let Some(validator) = validator {
            causes.extend(validator.validate(&new).into_iter().map(|e| Cause {
                reason: e.reason.to_string(),
                message: e.message,
                field: e.field,
            }));
        }
        if rt.group == kpve_crds::GROUP && kpve_crds::firewall::RULE_KINDS.contains(&rt.kind.as_str()) {
            causes.extend(kpve_crds::firewall::check_object(&rt.kind, &new).into_iter().map(
                |(field, message)| Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: {message}"),
                    field,
                },
            ));
        }
        if rt.group == kpve_crds::GROUP && kpve_crds::access::KINDS.contains(&rt.kind.as_str()) {
            causes.extend(kpve_crds::access::check_object(&rt.kind, &new).into_iter().map(
                |(field, message)| Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: {message}"),
                    field,
                },
            ));
        }
        if rt.group == kpve_crds::GROUP && rt.kind == "VirtualMachine" {
            causes.extend(kpve_crds::vm::check_virtual_machine(&new).into_iter().map(|(field, message)| {
                Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: {message}"),
                    field,
                }
            }));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, &name, causes).into());
        }
        if let Some(old) = old
            && subresource.is_none()
            && generation_view(rt, &old.object) != generation_view(rt, &new)
        {
            let generation = meta(&old.object).get("generation").and_then(Value::as_i64).unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), Value::from(generation + 1));
        }
        if !applied {
            // managedFields are the server's record; a client's copy (a PUT of what it read)
            // does not replace it.
            match old.and_then(|o| meta(&o.object).get("managedFields")).cloned() {
                Some(mf) => meta_mut(&mut new).insert("managedFields".into(), mf),
                None => meta_mut(&mut new).remove("managedFields"),
            };
        }
        if !applied && let Some(manager) = opts.field_manager.as_deref() {
            ssa::record_update(rt, old.map(|o| &o.object), &mut new, manager, subresource, &now_rfc3339());
        }
        omit_empty(&mut new);
        // Guests: the VMID check and the write happen under one lock, so two creates cannot
        // take the same VMID.
        let guest = admission::is_guest(rt);
        let mut vmids = if guest { Some(self.vmids.lock().expect("vmid lock")) } else { None };
        let holder = admission::guest_ref(&new);
        if let Some(vmids) = vmids.as_deref() {
            let old_vmid = old.and_then(|o| admission::vmid_of(&o.object));
            vmids.admit(rt, &mut new, &holder, old_vmid)?;
        }
        let stored = storage_form(rt, &new);
        // Equal as values, not as bytes: clients send keys in their own order.
        if let Some(old) = old
            && (if events::is_events_v1(rt) {
                serde_json::from_slice::<Value>(&old.kv.value).ok().as_ref() == Some(&stored)
            } else {
                let mut before = old.object.clone();
                meta_mut(&mut before).remove("resourceVersion");
                before == stored
            })
        {
            return Ok(Written { object: old.object.clone(), created: false, warnings: Vec::new() });
        }
        let bytes = serde_json::to_vec(&stored).expect("values serialize");
        let key = key(rt, ns, &name);
        // The last finalizer of a terminating object is gone: the object goes.
        if let Some(old) = old
            && meta(&new).get("deletionTimestamp").is_some()
            && finalizers(&new).is_empty()
            && rt.kind != "Namespace"
        {
            if opts.dry_run {
                return Ok(Written { object: new, created: false, warnings: Vec::new() });
            }
            let event = self
                .store
                .delete(&key, Some(old.kv.mod_revision))
                .map_err(|e| store_write_error(rt, &name, e))?;
            drop(vmids);
            self.after_delete(rt, &old.object);
            meta_mut(&mut new).insert("resourceVersion".into(), Value::String(event.revision().to_string()));
            return Ok(Written { object: new, created: false, warnings: Vec::new() });
        }
        if opts.dry_run {
            if let Some(old) = old {
                meta_mut(&mut new)
                    .insert("resourceVersion".into(), Value::String(old.kv.mod_revision.to_string()));
            }
            return Ok(Written { object: new, created: old.is_none(), warnings: Vec::new() });
        }
        let kv = match old {
            None => self.store.create(&key, bytes),
            Some(old) => self.store.update(&key, old.kv.mod_revision, bytes),
        }
        .map_err(|e| store_write_error(rt, &name, e))?;
        if let Some(vmids) = vmids.as_deref_mut()
            && let Some(vmid) = admission::vmid_of(&new)
        {
            vmids.insert(vmid, holder);
        }
        drop(vmids);
        if rt.kind == "CustomResourceDefinition" {
            self.rebuild_registry();
        }
        if meta(&new).get("deletionTimestamp").is_some() {
            self.gc_kick.notify_one();
        }
        Ok(Written { object: decode(rt, &kv), created: old.is_none(), warnings: Vec::new() })
    }

    /// Server-maintained fields of the built-in kinds.
    fn builtin_rules(&self, rt: &ResourceType, old: Option<&Value>, new: &mut Value) {
        match (rt.group.as_str(), rt.kind.as_str()) {
            ("", "Namespace") => {
                if old.is_none() {
                    new["spec"] = json!({"finalizers": ["kubernetes"]});
                }
                let name = meta_str(new, "name").unwrap_or("").to_string();
                let m = meta_mut(new);
                if !m.get("labels").is_some_and(Value::is_object) {
                    m.insert("labels".into(), json!({}));
                }
                m["labels"]["kubernetes.io/metadata.name"] = Value::String(name);
                let terminating = meta(new).get("deletionTimestamp").is_some();
                let phase = if terminating { "Terminating" } else { "Active" };
                if !new.get("status").is_some_and(Value::is_object) {
                    new["status"] = json!({});
                }
                new["status"]["phase"] = Value::String(phase.into());
            }
            ("apiextensions.k8s.io", "CustomResourceDefinition") => {
                let time = old
                    .and_then(|o| o.pointer("/status/conditions/0/lastTransitionTime"))
                    .cloned()
                    .unwrap_or_else(|| Value::String(now_rfc3339()));
                let condition = |t: &str, reason: &str, message: &str| json!({"type": t, "status": "True", "lastTransitionTime": time, "reason": reason, "message": message});
                let stored: Vec<Value> = new
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .map(|vs| vs.iter().filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect())
                    .unwrap_or_default();
                new["status"] = json!({
                    "acceptedNames": new.pointer("/spec/names").cloned().unwrap_or(json!({})),
                    "conditions": [
                        condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                        condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    ],
                    "storedVersions": stored,
                });
            }
            ("", "Event") => events::complete_core(new),
            _ => {}
        }
    }

    /// Bookkeeping once `object` is gone from the store: its VMID is free again, a CRD's
    /// types stop being served, and the garbage collector looks for dependents.
    fn after_delete(&self, rt: &ResourceType, object: &Value) {
        if admission::is_guest(rt)
            && let Some(vmid) = admission::vmid_of(object)
        {
            self.vmids.lock().expect("vmid lock").remove(vmid, &admission::guest_ref(object));
        }
        if rt.kind == "CustomResourceDefinition" {
            self.rebuild_registry();
        }
        self.gc_kick.notify_one();
    }

    /// DELETE of one object.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        options: &DeleteOptions,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        if rt.kind == "Namespace"
            && rt.group.is_empty()
            && ["default", "kube-system", "kube-public"].contains(&name)
        {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        for _ in 0..PATCH_RETRIES {
            let Some(cur) = self.current(rt, ns, name)? else { return Err(ApiError::not_found(rt, name)) };
            if let Some(uid) = &options.uid
                && meta_str(&cur.object, "uid") != Some(uid.as_str())
            {
                return Err(ApiError::conflict_message(
                    rt,
                    name,
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        rt.qualified_name(),
                        meta_str(&cur.object, "uid").unwrap_or("")
                    ),
                ));
            }
            if let Some(rv) = &options.resource_version
                && *rv != cur.kv.mod_revision.to_string()
            {
                return Err(ApiError::conflict(rt, name));
            }
            let mut fins = finalizers(&cur.object);
            let terminating = meta(&cur.object).get("deletionTimestamp").is_some();
            if !terminating {
                match options.propagation {
                    Propagation::Orphan if !fins.iter().any(|f| f == "orphan") => fins.push("orphan".into()),
                    Propagation::Foreground if !fins.iter().any(|f| f == "foregroundDeletion") => {
                        fins.push("foregroundDeletion".into())
                    }
                    _ => {}
                }
            }
            let key = key(rt, ns, name);
            if fins.is_empty() && rt.kind != "Namespace" {
                if opts.dry_run {
                    return Ok(cur.object);
                }
                match self.store.delete(&key, Some(cur.kv.mod_revision)) {
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                    Ok(event) => {
                        self.after_delete(rt, &cur.object);
                        let mut object = cur.object;
                        meta_mut(&mut object)
                            .insert("resourceVersion".into(), Value::String(event.revision().to_string()));
                        return Ok(object);
                    }
                }
            }
            if terminating {
                return Ok(cur.object);
            }
            let mut object = cur.object.clone();
            let generation = meta(&object).get("generation").and_then(Value::as_i64).unwrap_or(1);
            let m = meta_mut(&mut object);
            m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), Value::from(0));
            m.insert("generation".into(), Value::from(generation + 1));
            if !fins.is_empty() {
                m.insert("finalizers".into(), json!(fins));
            }
            m.remove("resourceVersion");
            self.builtin_rules(rt, Some(&cur.object), &mut object);
            if opts.dry_run {
                return Ok(object);
            }
            match self.store.update(&key, cur.kv.mod_revision, encode(rt, &object)) {
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
                Ok(kv) => {
                    self.gc_kick.notify_one();
                    return Ok(decode(rt, &kv));
                }
            }
        }
        Err(ApiError::conflict(rt, name))
    }

    /// The namespace controller's last step and the GC's: remove an object regardless of
    /// finalizers (used only once they are done).
    pub fn remove(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<()> {
        let Some(cur) = self.current(rt, ns, name)? else { return Ok(()) };
        match self.store.delete(&key(rt, ns, name), Some(cur.kv.mod_revision)) {
            Ok(_) => {
                self.after_delete(rt, &cur.object);
                Ok(())
            }
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `object` (a modified copy of the stored one, with its resourceVersion) as the
    /// server, e.g. to drop a dangling ownerReference or a finalizer.
    pub fn system_update(&self, rt: &ResourceType, object: Value) -> ApiResult<Written> {
        let ns = meta_str(&object, "namespace").map(String::from);
        let name = meta_str(&object, "name").unwrap_or("").to_string();
        let Some(cur) = self.current(rt, ns.as_deref(), &name)? else {
            return Err(ApiError::not_found(rt, &name));
        };
        if meta_str(&object, "resourceVersion") != Some(&cur.kv.mod_revision.to_string()) {
            return Err(ApiError::conflict(rt, &name));
        }
        self.commit(rt, ns.as_deref(), Some(&cur), object, None, false, &WriteOptions::system())
            .map_err(|e| e.into_api(rt, &name))
    }

    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, options: &ListOptions) -> ApiResult<ListResult> {
        if options.resource_version_match.is_some() && options.resource_version.is_none() {
            return Err(ApiError::invalid_field(
                rt,
                "",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        let current = self.store.current_revision();
        check_list_resource_version(rt, options, current)?;
        if options.resource_version_match.as_deref() == Some("Exact")
            && options.resource_version.as_deref() != Some(current.to_string().as_str())
        {
            return Err(ApiError::gone(format!(
                "too old resource version: {} ({current})",
                options.resource_version.as_deref().unwrap_or("")
            )));
        }
        let matches = |object: &Value| {
            options.labels.as_ref().is_none_or(|l| l.matches(object))
                && options.fields.as_ref().is_none_or(|f| f.matches(object))
        };
        // A pinned name (kubectl wait/delete, kube-rs watch_object) is a point read.
        if let Some(name) = options.fields.as_ref().and_then(|f| f.pinned_name())
            && (ns.is_some() || !rt.namespaced)
        {
            let items =
                self.current(rt, ns, name)?.map(|c| c.object).filter(|o| matches(o)).into_iter().collect();
            return Ok(ListResult { items, revision: current, continue_token: None });
        }
        let (items, revision, continue_token) = self.page(rt, ns, options, current, |kv| {
            let object = decode(rt, kv);
            matches(&object).then_some(object)
        })?;
        Ok(ListResult { items, revision, continue_token })
    }

    /// One page of the objects under `rt`/`ns`, from the continue token on: what `keep` maps
    /// to `Some`, at most `options.limit` of them (0 = all), with the token for the rest.
    fn page<T>(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        options: &ListOptions,
        current: Revision,
        mut keep: impl FnMut(&KeyValue) -> Option<T>,
    ) -> ApiResult<(Vec<T>, Revision, Option<String>)> {
        let prefix = prefix(rt, ns);
        let (mut start_after, revision) = match &options.continue_token {
            Some(token) => decode_continue(token, &prefix)?,
            None => (None, current),
        };
        let mut items = Vec::new();
        loop {
            let want = if options.limit > 0 { (options.limit - items.len()).max(64) } else { 0 };
            let page = self.store.list(&prefix, start_after.as_deref(), want)?;
            for kv in &page.items {
                let Some(item) = keep(kv) else { continue };
                items.push(item);
                if options.limit > 0 && items.len() == options.limit {
                    let more = !self.store.list(&prefix, Some(&kv.key), 1)?.items.is_empty();
                    return Ok((items, revision, more.then(|| encode_continue(revision, &kv.key))));
                }
            }
            match page.more_after {
                Some(after) if options.limit > 0 => start_after = Some(after),
                _ => return Ok((items, revision, None)),
            }
        }
    }

    /// A list served straight from stored bytes: no selector needs the object decoded and the
    /// type needs no conversion. `None` when that does not hold (use [`Api::list`]).
    pub fn list_bytes(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        options: &ListOptions,
    ) -> ApiResult<Option<RawList>> {
        if options.labels.as_ref().is_some_and(|l| !l.is_empty())
            || options.fields.as_ref().is_some_and(|f| !f.only_name_and_namespace())
            || options.resource_version_match.is_some()
            || options.fields.as_ref().and_then(|f| f.pinned_name()).is_some()
            || events::is_events_v1(rt)
        {
            return Ok(None);
        }
        let current = self.store.current_revision();
        check_list_resource_version(rt, options, current)?;
        let page = self.page(rt, ns, options, current, |kv| {
            if options.fields.as_ref().is_some_and(|f| !f.matches(&key_stub(rt, &kv.key))) {
                return None;
            }
            // Objects written before storage was metadata-first are decoded once more.
            Some(
                served_bytes(rt, &kv.value, kv.mod_revision)
                    .unwrap_or_else(|| serde_json::to_vec(&decode(rt, kv)).expect("values serialize")),
            )
        })?;
        Ok(Some(page))
    }

    /// Starts a watch: for `resource_version` None/"0" every current object comes first as a
    /// synthetic ADDED; otherwise history after it. A compacted start is `Err(410)` for the
    /// caller to send in-stream.
    pub fn watch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        resource_version: Option<&str>,
    ) -> ApiResult<WatchStart> {
        let prefix = prefix(rt, ns);
        match resource_version.filter(|rv| !rv.is_empty() && *rv != "0") {
            None => {
                let page = self.store.list(&prefix, None, 0)?;
                let watch = self.store.watch(&prefix, page.revision)?;
                let initial = page.items.iter().map(|kv| decode(rt, kv)).collect();
                Ok(WatchStart { initial, watch, revision: page.revision })
            }
            Some(rv) => {
                let after: Revision = rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}: must be a number"))
                })?;
                let watch = self.store.watch(&prefix, after)?;
                Ok(WatchStart { initial: Vec::new(), watch, revision: after })
            }
        }
    }

    /// Decodes a store event for a watcher of `rt`: (new object, old object).
    pub fn decode_event(&self, rt: &ResourceType, event: &Event) -> (Option<Value>, Option<Value>) {
        match event {
            Event::Put { kv, prev } => (Some(decode(rt, kv)), prev.as_ref().map(|p| decode(rt, p))),
            Event::Delete { prev, revision } => {
                let mut object = decode(rt, prev);
                meta_mut(&mut object).insert("resourceVersion".into(), Value::String(revision.to_string()));
                (None, Some(object))
            }
        }
    }

    /// Every stored object of every served type (for the garbage collector), with its type.
    pub fn all_objects(&self) -> Vec<(ResourceType, Value)> {
        let registry = self.registry();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for rt in registry.all() {
            // One view per store (core Events, not events.k8s.io as well); the first served
            // version of a CRD.
            if !seen.insert(rt.storage_resource.clone()) {
                continue;
            }
            if let Ok(page) = self.store.list(&prefix(rt, None), None, 0) {
                out.extend(page.items.iter().map(|kv| (rt.clone(), decode(rt, kv))));
            }
        }
        out
    }
}

/// Applies `fieldValidation` to the pruned fields: Strict refuses with `strict_message`,
/// Warn returns `Warning` texts, Ignore drops them silently.
fn unknown_fields(
    unknown: Vec<String>,
    opts: &WriteOptions,
    strict_message: impl FnOnce(&[String]) -> String,
) -> ApiResult<Vec<String>> {
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    match opts.field_validation {
        FieldValidation::Strict => Err(ApiError::bad_request(strict_message(&unknown))),
        FieldValidation::Warn => Ok(unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect()),
        FieldValidation::Ignore => Ok(Vec::new()),
    }
}

/// Why [`Api::commit`] wrote nothing.
#[derive(Debug)]
enum CommitError {
    /// The stored object changed after it was read: an unconditional write re-reads and
    /// retries; a write with the client's resourceVersion answers 409.
    Raced,
    Api(ApiError),
}

impl From<ApiError> for CommitError {
    fn from(e: ApiError) -> CommitError {
        CommitError::Api(e)
    }
}

impl CommitError {
    fn into_api(self, rt: &ResourceType, name: &str) -> ApiError {
        match self {
            CommitError::Raced => ApiError::conflict(rt, name),
            CommitError::Api(e) => e,
        }
    }
}

/// Built-in kinds have no CRD schema: they must decode as their Kubernetes type (a Lease with
/// `renewTime: garbage` would break every typed client listing it), and the round trip drops
/// fields the type does not have, as kube-apiserver's decoding does.
fn typed_builtin(rt: &ResourceType, object: &mut Value) -> ApiResult<()> {
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
        rt: &ResourceType,
        object: &mut Value,
    ) -> ApiResult<()> {
        let typed: T = serde_json::from_value(object.clone()).map_err(|e| {
            ApiError::bad_request(format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: {e}",
                kind = rt.kind,
                v = rt.version
            ))
        })?;
        *object = serde_json::to_value(typed).expect("typed values serialize");
        Ok(())
    }
    use k8s_openapi::api;
    if !rt.builtin {
        return Ok(());
    }
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Namespace") => round_trip::<api::core::v1::Namespace>(rt, object)?,
        ("", "Event") => round_trip::<api::core::v1::Event>(rt, object)?,
        ("events.k8s.io", "Event") => round_trip::<api::events::v1::Event>(rt, object)?,
        ("coordination.k8s.io", "Lease") => round_trip::<api::coordination::v1::Lease>(rt, object)?,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(rt, object)?
        }
        _ => {}
    }
    if rt.kind == "Event"
        && let Some(t) = object.get("type").and_then(Value::as_str)
        && !["Normal", "Warning"].contains(&t)
    {
        let name = meta_str(object, "name").unwrap_or("").to_string();
        return Err(ApiError::invalid_field(
            rt,
            &name,
            "type",
            format!("Unsupported value: {t:?}: supported values: \"Normal\", \"Warning\""),
        ));
    }
    Ok(())
}

/// resourceVersion / resourceVersionMatch rules of a list (apimachinery ListOptions validation).
fn check_list_resource_version(rt: &ResourceType, options: &ListOptions, current: Revision) -> ApiResult<()> {
    let rv = match options.resource_version.as_deref() {
        None => None,
        Some(rv) => Some(rv.parse::<Revision>().map_err(|_| {
            ApiError::bad_request(format!("invalid resource version {rv:?}: must be a number"))
        })?),
    };
    match options.resource_version_match.as_deref() {
        None | Some("NotOlderThan") => {}
        Some("Exact") if rv == Some(0) => {
            return Err(ApiError::invalid_field(
                rt,
                "",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
        Some("Exact") => {}
        Some(other) => {
            return Err(ApiError::invalid_field(
                rt,
                "",
                "resourceVersionMatch",
                format!("Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""),
            ));
        }
    }
    if let Some(rv) = rv
        && rv > current
    {
        return Err(ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {rv}, current: {current}"),
        ));
    }
    Ok(())
}

fn store_write_error(rt: &ResourceType, name: &str, e: StoreError) -> CommitError {
    match e {
        StoreError::AlreadyExists(_) => ApiError::already_exists(rt, name).into(),
        StoreError::Conflict { .. } | StoreError::NotFound(_) => CommitError::Raced,
        other => ApiError::from(other).into(),
    }
}

fn ssa_error(rt: &ResourceType, name: &str, e: SsaError) -> ApiError {
    match e {
        SsaError::Conflicts(conflicts) => {
            let fields: Vec<String> = conflicts
                .iter()
                .map(|c| format!("conflict with \"{}\" using {}: {}", c.manager, c.api_version, c.field))
                .collect();
            let mut err = ApiError::conflict_message(
                rt,
                name,
                format!(
                    "Apply failed with {} conflict{}: {}",
                    conflicts.len(),
                    if conflicts.len() == 1 { "" } else { "s" },
                    fields.join(", ")
                ),
            );
            err.causes = conflicts
                .iter()
                .map(|c| Cause {
                    reason: "FieldManagerConflict".into(),
                    message: format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                    field: c.field.clone(),
                })
                .collect();
            err
        }
        SsaError::Invalid(m) => ApiError::bad_request(m),
    }
}

fn check_type(rt: &ResourceType, body: &Value) -> ApiResult<()> {
    if let Some(kind) = body.get("kind").and_then(Value::as_str)
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the object ({kind}) does not match the resource ({})",
            rt.kind
        )));
    }
    if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
        && av != rt.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    Ok(())
}

fn check_name(rt: &ResourceType, body: &Value, name: &str) -> ApiResult<()> {
    match meta_str(body, "name") {
        Some(n) if !n.is_empty() && n != name => Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name}) for {}",
            rt.qualified_name()
        ))),
        _ => Ok(()),
    }
}

pub fn key(rt: &ResourceType, ns: Option<&str>, name: &str) -> String {
    match ns.filter(|_| rt.namespaced) {
        Some(ns) => format!("/registry/{}/{ns}/{name}", rt.storage_resource),
        None => format!("/registry/{}/{name}", rt.storage_resource),
    }
}

pub fn prefix(rt: &ResourceType, ns: Option<&str>) -> String {
    match ns.filter(|_| rt.namespaced) {
        Some(ns) => format!("/registry/{}/{ns}/", rt.storage_resource),
        None => format!("/registry/{}/", rt.storage_resource),
    }
}

/// Stored bytes → the object as `rt` serves it, with its resourceVersion.
pub fn decode(rt: &ResourceType, kv: &KeyValue) -> Value {
    let mut object: Value = serde_json::from_slice(&kv.value).unwrap_or_else(|_| json!({}));
    if events::is_events_v1(rt) {
        object = events::from_core(object);
    }
    meta_mut(&mut object).insert("resourceVersion".into(), Value::String(kv.mod_revision.to_string()));
    object
}

/// Stored objects begin with their metadata, so reads of many objects (lists, watches) can
/// splice the resourceVersion in without decoding.
const META_PREFIX: &[u8] = b"{\"metadata\":{";

/// The object in storage form (no resourceVersion; metadata first).
fn storage_form(rt: &ResourceType, object: &Value) -> Value {
    let mut object = object.clone();
    if events::is_events_v1(rt) {
        object = events::to_core(object);
        events::complete_core(&mut object);
    }
    meta_mut(&mut object).remove("resourceVersion");
    let Value::Object(mut map) = object else { return object };
    let mut ordered = Map::new();
    if let Some(m) = map.remove("metadata") {
        ordered.insert("metadata".into(), m);
    }
    ordered.extend(map);
    Value::Object(ordered)
}

/// The object → stored bytes.
fn encode(rt: &ResourceType, object: &Value) -> Vec<u8> {
    serde_json::to_vec(&storage_form(rt, object)).expect("values serialize")
}

/// The served JSON of a stored object with `revision` as its resourceVersion, without
/// decoding it; `None` when the type converts on read or the bytes are not in the
/// metadata-first form.
pub fn served_bytes(rt: &ResourceType, value: &[u8], revision: Revision) -> Option<Vec<u8>> {
    if events::is_events_v1(rt) || !value.starts_with(META_PREFIX) {
        return None;
    }
    let rest = &value[META_PREFIX.len()..];
    let mut out = Vec::with_capacity(value.len() + 32);
    out.extend_from_slice(META_PREFIX);
    out.extend_from_slice(format!("\"resourceVersion\":\"{revision}\"").as_bytes());
    if !rest.starts_with(b"}") {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

/// `(namespace, name)` from a store key of `rt`.
pub fn key_name(rt: &ResourceType, key: &str) -> (Option<String>, String) {
    let rest = key.strip_prefix(&prefix(rt, None)).unwrap_or(key);
    match rest.split_once('/') {
        Some((ns, name)) if rt.namespaced => (Some(ns.to_string()), name.to_string()),
        _ => (None, rest.to_string()),
    }
}

/// A stand-in object carrying only what a name/namespace field selector looks at.
pub fn key_stub(rt: &ResourceType, key: &str) -> Value {
    let (ns, name) = key_name(rt, key);
    let mut meta = json!({"name": name});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    json!({"metadata": meta})
}

fn encode_continue(revision: Revision, start: &str) -> String {
    let token = json!({"rv": revision, "start": start});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str, prefix: &str) -> ApiResult<(Option<String>, Revision)> {
    let bad = || ApiError::bad_request("continue key is not valid");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let start = value.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    let rv = value.get("rv").and_then(Value::as_i64).ok_or_else(bad)?;
    if !start.starts_with(prefix) {
        return Err(bad());
    }
    Ok((Some(start.to_string()), rv))
}
