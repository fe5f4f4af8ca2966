//! The HTTP face of the API server: path routing, authentication, query parsing, content
//! negotiation (JSON, Table, PartialObjectMetadata, aggregated discovery) and the watch stream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::admission::FieldValidation;
use crate::api::{self, Api, DeleteOptions, ListOptions, PatchType, Propagation, WriteOptions, Written};
use crate::auth::{self, Identity, Target, Tokens, Verb};
use crate::resources::{ResourceType, partial_object_metadata};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, ApiResult};
use crate::store::Event;
use crate::{discovery, openapi, table};

/// Request bodies above this are refused, as kube-apiserver does.
const MAX_BODY: usize = 3 * 1024 * 1024;

#[derive(Debug)]
pub struct AppState {
    pub api: Arc<Api>,
    pub tokens: Tokens,
    pub bookmark_interval: Duration,
    pub server_address: String,
    /// OpenAPI documents of one registry snapshot (building them hashes every schema).
    pub openapi: std::sync::Mutex<Option<OpenApiCache>>,
}

#[derive(Debug)]
pub struct OpenApiCache {
    registry: Arc<crate::resources::Registry>,
    root: Value,
    group_versions: HashMap<(String, String), Option<(Value, String)>>,
}

impl AppState {
    fn openapi<T>(&self, f: impl FnOnce(&mut OpenApiCache) -> T) -> T {
        let registry = self.api.registry();
        let mut cache = self.openapi.lock().expect("openapi cache lock");
        if !cache.as_ref().is_some_and(|c| Arc::ptr_eq(&c.registry, &registry)) {
            let root = openapi::v3_root(&registry);
            *cache = Some(OpenApiCache { registry, root, group_versions: HashMap::new() });
        }
        f(cache.as_mut().expect("filled above"))
    }
}

pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        // Bodies are limited in `handle`, so an oversized one gets a Status, not plain text.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).expect("values serialize");
    let mut response = (code, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    // Empty pairs (`?&limit=500`, kube-rs) are skipped by the form decoder.
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn handle(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    let public = matches!(path.as_str(), "/version" | "/healthz" | "/livez" | "/readyz");
    let identity = match bearer(&headers) {
        Some(token) => match state.tokens.authenticate(token) {
            Some(id) => Some(id),
            None => return ApiError::unauthorized().into_response(),
        },
        None if public => None,
        None => return ApiError::unauthorized().into_response(),
    };
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(_) => return ApiError::too_large().into_response(),
    };
    let query = query_map(&uri);
    match route(&state, &method, &path, &query, &headers, body, identity).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn route(
    state: &Arc<AppState>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
    identity: Option<Identity>,
) -> ApiResult<Response> {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let registry = state.api.registry();
    match path {
        "/version" => return Ok(json_response(StatusCode::OK, &discovery::version())),
        "/healthz" | "/livez" | "/readyz" => return Ok((StatusCode::OK, "ok").into_response()),
        "/api" | "/apis" if accept.contains("as=APIGroupDiscoveryList") => {
            let doc = discovery::aggregated(&registry, path == "/api");
            let mut response = json_response(StatusCode::OK, &doc);
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE));
            return Ok(response);
        }
        "/api" => return Ok(json_response(StatusCode::OK, &discovery::api_versions(&state.server_address))),
        "/apis" => return Ok(json_response(StatusCode::OK, &discovery::api_group_list(&registry))),
        "/openapi/v3" => return Ok(json_response(StatusCode::OK, &state.openapi(|c| c.root.clone()))),
        "/openapi/v2" => {
            if !accept.is_empty() && !accept.contains("json") && !accept.contains("*/*") {
                return Err(ApiError::not_found_path());
            }
            return Ok(json_response(StatusCode::OK, &openapi::v2(&registry)));
        }
        _ => {}
    }
    if let Some(gv) = path.strip_prefix("/openapi/v3/") {
        let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
            ["api", v] => (String::new(), v.to_string()),
            ["apis", g, v] => (g.to_string(), v.to_string()),
            _ => return Err(ApiError::not_found_path()),
        };
        let (doc, hash) = state
            .openapi(|c| {
                let registry = c.registry.clone();
                c.group_versions
                    .entry((group.clone(), version.clone()))
                    .or_insert_with(|| openapi::v3_group_version(&registry, &group, &version))
                    .clone()
            })
            .ok_or_else(ApiError::not_found_path)?;
        let mut response = json_response(StatusCode::OK, &doc);
        response
            .headers_mut()
            .insert(header::ETAG, HeaderValue::from_str(&format!("\"{hash}\"")).expect("hex"));
        if query.get("hash").is_some_and(|h| *h == hash) {
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, immutable, max-age=31536000"),
            );
        }
        return Ok(response);
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => {
            return discovery::api_group(&registry, group)
                .map(|doc| json_response(StatusCode::OK, &doc))
                .ok_or_else(ApiError::not_found_path);
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::not_found_path()),
    };
    if rest.is_empty() {
        return discovery::api_resource_list(&registry, group, version)
            .map(|doc| json_response(StatusCode::OK, &doc))
            .ok_or_else(ApiError::not_found_path);
    }
    let lookup = |plural: &str| registry.get(group, version, plural);
    // (type, namespace, name, subresource)
    let (rt, ns, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] if lookup(plural).is_some_and(|rt| rt.namespaced) => {
            let rt = lookup(plural).expect("checked");
            match tail {
                [] => (rt, Some(*ns), None, None),
                [name] => (rt, Some(*ns), Some(*name), None),
                [name, sub] => (rt, Some(*ns), Some(*name), Some(*sub)),
                _ => return Err(ApiError::not_found_path()),
            }
        }
        [plural, tail @ ..] => {
            let rt = lookup(plural).ok_or_else(ApiError::not_found_path)?;
            match tail {
                [] => (rt, None, None, None),
                [_] | [_, _] if rt.namespaced => return Err(ApiError::not_found_path()),
                [name] => (rt, None, Some(*name), None),
                [name, sub] => (rt, None, Some(*name), Some(*sub)),
                _ => return Err(ApiError::not_found_path()),
            }
        }
        [] => return Err(ApiError::not_found_path()),
    };
    if let Some(sub) = sub
        && !(sub == "status" && rt.status_subresource)
    {
        return Err(ApiError::not_found_path());
    }
    let identity = identity.ok_or_else(ApiError::unauthorized)?;
    let rt = rt.clone();
    let ns = ns.map(String::from);
    let name = name.map(String::from);
    let sub = sub.map(String::from);
    let is_watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method.as_str(), name.is_some()) {
        ("GET", true) => Verb::Get,
        ("GET", false) if is_watch => Verb::Watch,
        ("GET", false) => Verb::List,
        ("POST", false) => Verb::Create,
        ("PUT", true) => Verb::Update,
        ("PATCH", true) => Verb::Patch,
        ("DELETE", true) => Verb::Delete,
        ("DELETE", false) => Verb::DeleteCollection,
        _ => return Err(ApiError::method_not_allowed()),
    };
    // A create names its object in the body; authorisation by name (a node creating its own
    // Hypervisor or Lease) needs it.
    let body_name = if verb == Verb::Create { created_name(&body) } else { None };
    let decision = auth::authorize(
        &identity,
        verb,
        Target {
            namespace: ns.as_deref(),
            group: &rt.group,
            plural: &rt.plural,
            name: name.as_deref().or(body_name.as_deref()),
            subresource: sub.as_deref(),
        },
    )?;
    if rt.namespaced && ns.is_none() && !matches!(verb, Verb::List | Verb::Watch) {
        return Err(ApiError::not_found_path());
    }
    let dry_run = match query.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {other:?}: supported values: \"All\""
            )));
        }
    };
    let manager = query.get("fieldManager").cloned().or_else(|| {
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
    });
    if manager.as_ref().is_some_and(|m| m.len() > 128) {
        return Err(ApiError::bad_request("fieldManager: Too long: may not be more than 128 bytes"));
    }
    let opts = WriteOptions {
        identity,
        decision,
        field_manager: manager,
        dry_run,
        field_validation: FieldValidation::parse(query.get("fieldValidation").map(String::as_str))?,
    };
    let output = Output::negotiate(&accept, query);
    let api = state.api.clone();
    match verb {
        Verb::Get => {
            let object = api.get(&rt, ns.as_deref(), name.as_deref().expect("item"))?;
            Ok(output.single(&rt, object))
        }
        Verb::List if matches!(output, Output::Json) => {
            let options = list_options(&rt, query)?;
            let rt2 = rt.clone();
            let ns2 = ns.clone();
            let api2 = api.clone();
            let fast = blocking(move || api2.list_bytes(&rt2, ns2.as_deref(), &options)).await?;
            if let Some((items, revision, token)) = fast {
                return Ok(raw_list(&rt, items, revision, token));
            }
            let options = list_options(&rt, query)?;
            let result = blocking(move || api.list(&rt, ns.as_deref(), &options).map(|r| (rt, r))).await?;
            let (rt, result) = result;
            Ok(output.list(&rt, result))
        }
        Verb::List => {
            let options = list_options(&rt, query)?;
            let result = blocking(move || api.list(&rt, ns.as_deref(), &options).map(|r| (rt, r))).await?;
            let (rt, result) = result;
            Ok(output.list(&rt, result))
        }
        Verb::Watch => watch(state, rt, ns, query, output).await,
        Verb::Create | Verb::Update | Verb::Patch => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_string();
            let patch_type = if verb == Verb::Patch {
                Some(
                    PatchType::from_content_type(&content_type)
                        .ok_or_else(|| ApiError::unsupported_media_type(&content_type))?,
                )
            } else {
                None
            };
            let body = if content_type.starts_with("application/vnd.kubernetes.protobuf")
                && rt.group.is_empty()
                && rt.kind == "Namespace"
            {
                crate::protobuf::decode_namespace(&body)
                    .ok_or_else(|| ApiError::bad_request("the protobuf body is not a v1.Namespace"))?
            } else {
                let decoded = decode_body(&body, &content_type)?;
                if opts.field_validation == FieldValidation::Strict && !content_type.contains("yaml") {
                    crate::strict_json::check_duplicates(&body).map_err(|field| {
                        ApiError::bad_request(format!(
                            "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: json: duplicate field \"{field}\"",
                            kind = rt.kind,
                            v = rt.version
                        ))
                    })?;
                }
                decoded
            };
            let force = query.get("force").is_some_and(|f| f == "true" || f == "1");
            let written = blocking(move || {
                match verb {
                    Verb::Create => api.create(&rt, ns.as_deref(), body, &opts),
                    Verb::Update => api.update(
                        &rt,
                        ns.as_deref(),
                        name.as_deref().expect("item"),
                        sub.as_deref(),
                        body,
                        &opts,
                    ),
                    _ => api.patch(
                        &rt,
                        ns.as_deref(),
                        name.as_deref().expect("item"),
                        sub.as_deref(),
                        patch_type.expect("patch"),
                        body,
                        force,
                        &opts,
                    ),
                }
                .map(|w| (rt, w))
            })
            .await?;
            let (rt, written) = written;
            Ok(output.written(&rt, written))
        }
        Verb::Delete | Verb::DeleteCollection => {
            let options = if body.is_empty() { json!({}) } else { decode_body(&body, "application/json")? };
            let mut delete = DeleteOptions {
                propagation: match options
                    .get("propagationPolicy")
                    .and_then(Value::as_str)
                    .or(query.get("propagationPolicy").map(String::as_str))
                {
                    None | Some("Background") => Propagation::Background,
                    Some("Foreground") => Propagation::Foreground,
                    Some("Orphan") => Propagation::Orphan,
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "propagationPolicy: Unsupported value: {other:?}: supported values: \"Background\", \"Foreground\", \"Orphan\""
                        )));
                    }
                },
                uid: options.pointer("/preconditions/uid").and_then(Value::as_str).map(String::from),
                resource_version: options
                    .pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str)
                    .map(String::from),
            };
            if options.get("orphanDependents") == Some(&Value::Bool(true)) {
                delete.propagation = Propagation::Orphan;
            }
            let mut opts = opts;
            match options.get("dryRun").and_then(Value::as_array) {
                Some(d) if d.iter().any(|v| v == "All") => opts.dry_run = true,
                Some(d) if !d.is_empty() => return Err(ApiError::bad_request("dryRun: Unsupported value")),
                _ => {}
            }
            if verb == Verb::Delete {
                let object = blocking(move || {
                    api.delete(&rt, ns.as_deref(), name.as_deref().expect("item"), &delete, &opts)
                        .map(|o| (rt, o))
                })
                .await?;
                let (rt, object) = object;
                Ok(output.single(&rt, object))
            } else {
                let list = list_options(&rt, query)?;
                let result = blocking(move || {
                    let page = api.list(&rt, ns.as_deref(), &list)?;
                    let mut deleted = Vec::new();
                    for object in page.items {
                        let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
                        let object_ns = object["metadata"]["namespace"].as_str().map(String::from);
                        match api.delete(&rt, object_ns.as_deref(), &name, &delete, &opts) {
                            Ok(o) => deleted.push(o),
                            Err(e) if e.code == 404 => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok((
                        rt,
                        api::ListResult { items: deleted, revision: page.revision, continue_token: None },
                    ))
                })
                .await?;
                let (rt, result) = result;
                Ok(output.list(&rt, result))
            }
        }
    }
}

/// `metadata.name` of a JSON body, read without building the whole document (the body is
/// decoded for real later).
fn created_name(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        metadata: Option<Meta>,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        name: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.metadata?.name
}

/// A JSON list assembled from already-serialized items.
fn raw_list(rt: &ResourceType, items: Vec<Vec<u8>>, revision: i64, token: Option<String>) -> Response {
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if let Some(token) = token {
        metadata["continue"] = json!(token);
    }
    let head = json!({"kind": rt.list_kind, "apiVersion": rt.api_version(), "metadata": metadata});
    let mut body = serde_json::to_vec(&head).expect("values serialize");
    body.pop(); // the closing brace; items follow
    body.extend_from_slice(b",\"items\":[");
    let total: usize = items.iter().map(|i| i.len() + 1).sum();
    body.reserve(total + 2);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// One watch line around already-serialized object bytes.
fn raw_event_line(kind: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

/// Runs store work off the async workers (writes wait for fsync).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(e.to_string()))?
}

fn decode_body(body: &[u8], content_type: &str) -> ApiResult<Value> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !(media.is_empty() || media.contains("json") || media.contains("yaml")) {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {media})"
            ),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    if body.len() > MAX_BODY {
        return Err(ApiError::too_large());
    }
    let result: Result<Value, String> = if content_type.contains("yaml") {
        serde_yaml::from_slice::<Value>(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
    };
    result.map_err(|e| ApiError::bad_request(format!("the request body does not decode: {e}")))
}

fn list_options(rt: &ResourceType, query: &HashMap<String, String>) -> ApiResult<ListOptions> {
    let non_empty = |k: &str| query.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(ListOptions {
        labels: non_empty("labelSelector")
            .map(|s| LabelSelector::parse(&s))
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        fields: non_empty("fieldSelector")
            .map(|s| FieldSelector::parse(&s, rt))
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        limit: match non_empty("limit") {
            Some(l) => l.parse().map_err(|_| ApiError::bad_request(format!("limit: invalid value {l:?}")))?,
            None => 0,
        },
        continue_token: non_empty("continue"),
        resource_version: non_empty("resourceVersion"),
        resource_version_match: non_empty("resourceVersionMatch"),
    })
}

/// What representation the client asked for.
#[derive(Debug, Clone)]
enum Output {
    Json,
    Table { include_object: String },
    Metadata,
}

impl Output {
    fn negotiate(accept: &str, query: &HashMap<String, String>) -> Output {
        // The first acceptable media type wins; plain JSON is always acceptable.
        for part in accept.split(',') {
            let part = part.trim();
            if part.contains("as=Table") && part.contains("g=meta.k8s.io") {
                let include_object = query.get("includeObject").cloned().unwrap_or_else(|| "Metadata".into());
                return Output::Table { include_object };
            }
            if part.contains("as=PartialObjectMetadata")
                && part.contains("g=meta.k8s.io")
                && part.contains("v=v1")
            {
                return Output::Metadata;
            }
            if part.starts_with("application/json") || part.starts_with("*/*") {
                return Output::Json;
            }
        }
        Output::Json
    }

    fn list_metadata(result: &api::ListResult) -> Value {
        let mut metadata = json!({"resourceVersion": result.revision.to_string()});
        if let Some(token) = &result.continue_token {
            metadata["continue"] = json!(token);
        }
        metadata
    }

    fn list(&self, rt: &ResourceType, result: api::ListResult) -> Response {
        let metadata = Output::list_metadata(&result);
        let doc = match self {
            Output::Json => json!({
                "kind": rt.list_kind, "apiVersion": rt.api_version(), "metadata": metadata, "items": result.items,
            }),
            Output::Metadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "items": result.items.iter().map(partial_object_metadata).collect::<Vec<_>>(),
            }),
            Output::Table { include_object } => {
                table::to_table(rt, &result.items, metadata, include_object, true, jiff::Timestamp::now())
            }
        };
        json_response(StatusCode::OK, &doc)
    }

    fn render(&self, rt: &ResourceType, object: Value, with_headers: bool) -> Value {
        match self {
            Output::Json => object,
            Output::Metadata => partial_object_metadata(&object),
            Output::Table { include_object } => {
                let rv = object["metadata"]["resourceVersion"].clone();
                table::to_table(
                    rt,
                    std::slice::from_ref(&object),
                    json!({"resourceVersion": rv}),
                    include_object,
                    with_headers,
                    jiff::Timestamp::now(),
                )
            }
        }
    }

    fn single(&self, rt: &ResourceType, object: Value) -> Response {
        json_response(StatusCode::OK, &self.render(rt, object, true))
    }

    fn written(&self, rt: &ResourceType, written: Written) -> Response {
        let code = if written.created { StatusCode::CREATED } else { StatusCode::OK };
        let mut response = json_response(code, &self.render(rt, written.object, true));
        for warning in written.warnings {
            let text = format!("299 - \"{}\"", warning.replace('"', "\\\""));
            if let Ok(value) = HeaderValue::from_str(&text) {
                response.headers_mut().append(header::WARNING, value);
            }
        }
        response
    }
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(rt: &ResourceType, revision: i64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}))
}

async fn watch(
    state: &Arc<AppState>,
    rt: ResourceType,
    ns: Option<String>,
    query: &HashMap<String, String>,
    output: Output,
) -> ApiResult<Response> {
    let options = list_options(&rt, query)?;
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    if send_initial
        && (!bookmarks || query.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan"))
    {
        return Err(ApiError::invalid_field(
            &rt,
            "",
            "sendInitialEvents",
            "Forbidden: sendInitialEvents requires setting allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan",
        ));
    }
    let timeout = match query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()) {
        Some(t) if t > 0 => Duration::from_secs(t),
        _ => Duration::from_secs(1800 + rand::random::<u64>() % 1800),
    };
    let rv = query.get("resourceVersion").cloned().filter(|v| !v.is_empty());
    let rv = if send_initial { None } else { rv };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let start = state.api.watch(&rt, ns.as_deref(), rv.as_deref());
    let api = state.api.clone();
    let interval = state.bookmark_interval;
    tokio::spawn(async move {
        let mut start = match start {
            Ok(start) => start,
            Err(e) => {
                let _ = tx.send(event_line("ERROR", e.to_status())).await;
                return;
            }
        };
        let matches = |object: &Value| {
            options.labels.as_ref().is_none_or(|l| l.matches(object))
                && options.fields.as_ref().is_none_or(|f| f.matches(object))
        };
        let mut headers = true;
        let mut render = |object: Value| {
            let out = output.render(&rt, object, headers);
            headers = false;
            out
        };
        let fast = matches!(output, Output::Json)
            && options.labels.as_ref().is_none_or(|l| l.is_empty())
            && options.fields.as_ref().is_none_or(|f| f.only_name_and_namespace());
        let mut last = start.revision;
        for object in std::mem::take(&mut start.initial) {
            if matches(&object) && tx.send(event_line("ADDED", render(object))).await.is_err() {
                return;
            }
        }
        if send_initial && tx.send(bookmark(&rt, last, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let line = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(bookmark(&rt, last, false)).await;
                    }
                    return;
                }
                _ = tick.tick(), if bookmarks => bookmark(&rt, last, false),
                _ = tx.closed() => return,
                event = start.watch.events.recv() => {
                    // A closed channel means this watcher fell behind: end the stream so
                    // the client resumes from the last revision it saw.
                    let Some(event) = event else { return };
                    last = event.revision();
                    if fast {
                        // No selector needs the object: match on the key, splice the bytes.
                        if options.fields.as_ref().is_some_and(|f| !f.matches(&api::key_stub(&rt, event.key()))) {
                            continue;
                        }
                        let raw = match &event {
                            Event::Put { kv, prev } => api::served_bytes(&rt, &kv.value, kv.mod_revision)
                                .map(|b| (if prev.is_some() { "MODIFIED" } else { "ADDED" }, b)),
                            Event::Delete { prev, revision } => {
                                api::served_bytes(&rt, &prev.value, *revision).map(|b| ("DELETED", b))
                            }
                        };
                        if let Some((kind, bytes)) = raw {
                            if tx.send(raw_event_line(kind, &bytes)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    let (new, old) = api.decode_event(&rt, &event);
                    let kind = match (&new, &old) {
                        (Some(n), None) if matches(n) => "ADDED",
                        (Some(n), Some(o)) => match (matches(n), matches(o)) {
                            (true, true) => "MODIFIED",
                            (true, false) => "ADDED",
                            (false, true) => "DELETED",
                            (false, false) => continue,
                        },
                        (None, Some(o)) if matches(o) => "DELETED",
                        _ => continue,
                    };
                    // Leaving the selector: the previous object, at the new revision.
                    let object = match (kind, new, old) {
                        ("DELETED", Some(_), Some(mut o)) => {
                            o["metadata"]["resourceVersion"] = Value::String(last.to_string());
                            o
                        }
                        (_, new, old) => new.or(old).expect("an event has an object"),
                    };
                    event_line(kind, render(object))
                }
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) },
        );
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
