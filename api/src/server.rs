//! The HTTPS front of `/api2/json`: authentication (tickets from the cookie or the
//! `Authorization: PVEAuthCookie=` header, CSRF on ticket-authenticated writes, every 401
//! delayed 3 s), routing, and the read-only inventory endpoints built so far. Every answer
//! is read from the resources through the Kubernetes API; the layer keeps no state of its own
//! besides the root password and the ticket keys in the data directory (both 0600).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use kpve_crds::{Hypervisor, StoragePool};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use crate::access::{self, AccessStore, Checker};
use crate::access_api;
use crate::auth::{self, Credential};
use crate::cluster_api;
use crate::envelope::{PveError, ok, ok_raw, unauthorized};
use crate::firewall_api;
use crate::guests::{self, Guests, Kind};
use crate::migrate;
use crate::schema::{Route, SCHEMA};
use crate::snapshots;
use crate::storage;
use crate::tasks::{Target, Tasks};
use crate::ticket::Keys;
use crate::validate::{self, split_list};

pub use crate::access::ROOT;
/// File in the data directory holding root@pam's password (generated on first start).
pub const ROOT_PASSWORD_FILE: &str = "pve-root-password";
const KEY_FILE: &str = "pve-ticket.key";
/// Proxmox delays every failed authentication by 3 s.
const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(3);
/// The Proxmox VE release kpve answers as (clients gate features on the major version).
pub const PVE_VERSION: &str = "9.1.1";

pub struct PveApiConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
    /// An admin client of the kpve API server.
    pub client: kube::Client,
}

struct AppState {
    client: kube::Client,
    guests: Guests,
    store: AccessStore,
    keys: std::sync::RwLock<Keys>,
    root_password: String,
    tasks: Tasks,
}

impl AppState {
    /// The ticket keys in force.
    fn keys(&self) -> Keys {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Writes `contents` with mode 0600 unless the file exists; returns the file's content.
fn secret_file(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Written whole or not at all: a temporary file, synced, then renamed into place.
            let value = make();
            let tmp = path.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(format!("{value}\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(value)
        }
        Err(e) => Err(e.into()),
    }
}

const KEY_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

fn parse_key(path: &Path, text: &str) -> anyhow::Result<[u8; 32]> {
    anyhow::ensure!(
        text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()),
        "{} is damaged (not 64 hex digits): remove it to generate a new key (tickets then expire)",
        path.display()
    );
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)?;
    }
    Ok(key)
}

/// The ticket keys: `pve-ticket.key` (current, created on first start) and
/// `pve-ticket.key.old` (the one before the last rotation), rotated first if due.
fn load_keys(dir: &Path) -> anyhow::Result<Keys> {
    if let Some(keys) = rotate_if_old(dir)? {
        return Ok(keys);
    }
    let path = dir.join(KEY_FILE);
    let current = parse_key(&path, &secret_file(&path, || hex(&rand::random::<[u8; 32]>()))?)?;
    let old = dir.join(format!("{KEY_FILE}.old"));
    let previous = match std::fs::read_to_string(&old) {
        Ok(text) => Some(parse_key(&old, text.trim())?),
        Err(_) => None,
    };
    Ok(Keys { current, previous })
}

/// Rotates the ticket key when the current one is older than a day; returns the new keys.
fn rotate_if_old(dir: &Path) -> anyhow::Result<Option<Keys>> {
    let path = dir.join(KEY_FILE);
    let Ok(meta) = std::fs::metadata(&path) else { return Ok(None) };
    let age = meta.modified()?.elapsed().unwrap_or_default();
    if age < KEY_MAX_AGE {
        return Ok(None);
    }
    let previous = parse_key(&path, std::fs::read_to_string(&path)?.trim())?;
    let old = dir.join(format!("{KEY_FILE}.old"));
    let _ = std::fs::remove_file(&old);
    secret_file(&old, || hex(&previous))?;
    std::fs::remove_file(&path)?;
    let current = parse_key(&path, &secret_file(&path, || hex(&rand::random::<[u8; 32]>()))?)?;
    Ok(Some(Keys { current, previous: Some(previous) }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the API; returns the address it listens on and the server task.
pub async fn start(
    config: PveApiConfig,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let root_password =
        secret_file(&config.data_dir.join(ROOT_PASSWORD_FILE), || hex(&rand::random::<[u8; 18]>()))?;
    anyhow::ensure!(
        root_password.len() >= 12,
        "{} is damaged (shorter than 12 characters): remove it to generate a new password",
        config.data_dir.join(ROOT_PASSWORD_FILE).display()
    );
    let keys = load_keys(&config.data_dir)?;
    let tasks = Tasks::new(config.data_dir.join("pve-tasks"))?;
    let store = AccessStore::start(&config.client).await?;
    let guests = Guests::start(&config.client).await?;
    let state = Arc::new(AppState {
        store,
        guests,
        client: config.client,
        keys: std::sync::RwLock::new(keys),
        root_password,
        tasks,
    });
    // The ticket key is rotated daily (as Proxmox's authkey); tickets of the previous key
    // stay valid for their two hours.
    let rotating = state.clone();
    let data_dir = config.data_dir.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            match rotate_if_old(&data_dir) {
                Ok(Some(keys)) => {
                    *rotating.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
                    tracing::info!("Proxmox API ticket key rotated");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "rotating the Proxmox API ticket key"),
            }
        }
    });
    let app = axum::Router::new().fallback(handle).with_state(state);
    let handle_ = axum_server::Handle::new();
    // HTTP/1.1 only, as Proxmox serves it: clients read the error in the reason phrase, which
    // HTTP/2 does not have (Go clients would negotiate it if offered).
    let mut tls = (*config.tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut server = axum_server::bind_rustls(
        config.listen,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )
    .handle(handle_.clone());
    let builder = server.http_builder();
    *builder = builder.clone().http1_only();
    let server = server.serve(app.into_make_service());
    let task = tokio::spawn(async move { server.await.map_err(anyhow::Error::from) });
    let address =
        handle_.listening().await.ok_or_else(|| anyhow::anyhow!("the Proxmox API listener did not start"))?;
    tracing::info!(%address, "Proxmox VE API listening");
    Ok((address, task))
}

/// Parameters: the query, then a form or JSON body (JSON booleans become 1/0 as Proxmox
/// reads them).
fn params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if json {
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
            for (k, v) in map {
                let text = match v {
                    Value::String(s) => s,
                    Value::Bool(b) => if b { "1" } else { "0" }.to_string(),
                    Value::Array(items) => items
                        .iter()
                        .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                out.insert(k, text);
            }
        }
    } else {
        out.extend(form_urlencoded::parse(body).into_owned());
    }
    out.remove("_dc");
    out
}

/// A valid ticket of root@pam (which needs no access-control data).
fn root_ticket(state: &AppState, headers: &HeaderMap) -> bool {
    match auth::credential(headers) {
        Credential::Ticket(t) => state.keys().verify_ticket(&t, auth::now()).is_ok_and(|u| u == ROOT),
        _ => false,
    }
}

async fn denied_401(reason: &str) -> Response {
    tokio::time::sleep(AUTH_FAILURE_DELAY).await;
    unauthorized(reason)
}

async fn handle(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(path) = uri.path().strip_prefix("/api2/json") else {
        return PveError::new(501, format!("Method '{method} {}' not implemented", uri.path()))
            .into_response();
    };
    let path = if path.is_empty() { "/" } else { path };
    if matches!(method, Method::GET | Method::DELETE) && !body.is_empty() {
        return PveError::new(501, format!("Unexpected content for method '{method}'")).into_response();
    }
    let mut params = params(&uri, &headers, &body);
    let decoded: Vec<String> =
        path.trim_matches('/').split('/').filter(|s| !s.is_empty()).map(auth::percent_decode).collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();

    // The routes Proxmox serves without authentication.
    match (&method, segments.as_slice()) {
        (&Method::POST, ["access", "ticket"]) => return login(&state, &params).await,
        (&Method::GET, ["access", "ticket"]) => return ok(Value::Null),
        (&Method::GET, ["access", "domains"]) => {
            return ok(json!([
                {"realm": "pam", "type": "pam", "comment": "Linux PAM standard authentication"},
                {"realm": "pve", "type": "pve", "comment": "Proxmox VE authentication server"},
            ]));
        }
        _ => {}
    }
    let (principal, by_ticket) = match auth::credential(&headers) {
        // Users other than root@pam are decided from the access-control caches: refuse while
        // a watch is failing rather than decide on what may be stale (a revoked token).
        Credential::Ticket(_) | Credential::Token(_)
            if !state.store.current() && !root_ticket(&state, &headers) =>
        {
            return PveError::new(503, "access control is not current (its watch is failing); try again")
                .into_response();
        }
        Credential::Ticket(t) => match auth::verify_ticket(&state.keys(), &state.store, &t) {
            Ok(p) => (p, true),
            Err(e) => {
                tracing::info!(reason = %e, "authentication failure");
                return denied_401("Authentication failed!").await;
            }
        },
        Credential::Token(t) => match auth::verify_token(&state.store, &t) {
            Ok(p) => (p, false),
            Err(e) => {
                tracing::info!(reason = %e, "authentication failure");
                return denied_401("Authentication failed!").await;
            }
        },
        Credential::None => return denied_401("No ticket").await,
    };
    if by_ticket && method != Method::GET {
        let token = headers.get("csrfpreventiontoken").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !state.keys().verify_csrf(&principal.user, token, auth::now()) {
            return denied_401("Permission denied - invalid csrf token").await;
        }
    }
    let (endpoint, vars) = match SCHEMA.route(method.as_str(), &segments) {
        Route::Found(e, vars) => (e, vars),
        Route::NoMethod | Route::NoPath => {
            return PveError::not_implemented(method.as_str(), path).into_response();
        }
    };
    if principal.token.is_some() && !endpoint.allows_tokens() {
        return PveError::new(
            403,
            format!(
                "Permission check failed (URI '{path}' not available with API token, need proper ticket.)"
            ),
        )
        .into_response();
    }
    for (k, v) in vars {
        if params.get(&k).is_some_and(|given| given != &v) {
            return PveError::parameters(BTreeMap::from([(
                k,
                "duplicate parameter (already defined in URI) with conflicting values!".to_string(),
            )]))
            .into_response();
        }
        params.insert(k, v);
    }
    // root@pam passes every check: no need to assemble the access configuration for it.
    let access = if principal.is_root() { Arc::default() } else { state.store.snapshot() };
    // Pools are namespaces: VMID → namespace, read from the guest cache only when a check
    // names a guest's path.
    let guest_pools = std::sync::OnceLock::new();
    let pools = |vmid: &str| guest_pools.get_or_init(|| state.guests.namespaces()).get(vmid).cloned();
    let checker = Checker { access: &access, principal: &principal, params: &params, pools: &pools };
    if let Err(e) = checker.check(endpoint.permissions.as_ref()) {
        return e.into_response();
    }
    if let Err(errors) = validate::params(endpoint, &params) {
        return PveError::parameters(errors).into_response();
    }
    if method == Method::GET && endpoint.path == "/cluster/resources" {
        return match resources(&state, &checker).await {
            Ok(text) => ok_raw(&text),
            Err(e) => e.into_response(),
        };
    }
    match dispatch(&state, &checker, method.as_str(), &endpoint.path).await {
        Ok(data) => ok(data),
        Err(e) => e.into_response(),
    }
}

/// The guest kind of a `/nodes/{node}/{qemu,lxc}/…` template, and the template with the
/// kind replaced by `{type}`.
fn guest_template(template: &str) -> (Option<Kind>, String) {
    let segs: Vec<&str> = template.split('/').collect();
    match segs.get(3).and_then(|s| Kind::parse(s)) {
        Some(kind) if segs.get(1) == Some(&"nodes") => {
            let mut generic = segs.clone();
            generic[3] = "{type}";
            (Some(kind), generic.join("/"))
        }
        _ => (None, template.to_string()),
    }
}

/// The privilege a config key needs (qemu-server's `check_vm_modify_config_perm`).
fn config_privilege(key: &str) -> &'static str {
    let stem = key.trim_end_matches(|c: char| c.is_ascii_digit());
    match stem {
        "memory" | "balloon" | "shares" | "swap" => "VM.Config.Memory",
        "cores" | "sockets" | "cpu" | "cpulimit" | "cpuunits" | "vcpus" | "affinity" | "numa" | "cpuset" => {
            "VM.Config.CPU"
        }
        "net" => "VM.Config.Network",
        "scsi" | "virtio" | "sata" | "ide" | "efidisk" | "tpmstate" | "unused" | "rootfs" | "mp"
        | "scsihw" => "VM.Config.Disk",
        "ciuser" | "cipassword" | "citype" | "ipconfig" | "nameserver" | "searchdomain" | "sshkeys"
        | "cicustom" => "VM.Config.Cloudinit",
        "cdrom" => "VM.Config.CDROM",
        "bios" | "machine" | "vga" | "serial" | "usb" | "hostpci" | "audio" | "rng" | "watchdog"
        | "tablet" | "keyboard" => "VM.Config.HWType",
        _ => "VM.Config.Options",
    }
}

/// Config keys only root@pam may set (qemu-server: `args`, `hookscript`, `lock`, host devices).
fn root_only(key: &str) -> bool {
    let stem = key.trim_end_matches(|c: char| c.is_ascii_digit());
    matches!(stem, "args" | "hookscript" | "lock" | "hostpci" | "usb" | "lxc")
}

fn require(c: &Checker, path: &str, privilege: &str) -> Result<(), PveError> {
    if c.principal.is_root() || access::privilege_bit(privilege).is_some_and(|b| c.has(path, b)) {
        Ok(())
    } else {
        Err(PveError::permission(path, privilege))
    }
}

/// The handler of an endpoint, by schema template; permissions and parameters are checked.
async fn dispatch(
    state: &AppState,
    c: &Checker<'_>,
    method: &str,
    template: &str,
) -> Result<Value, PveError> {
    let p = c.params;
    let client = &state.client;
    let store = &state.store;
    let user = c.principal.id();
    let (kind, generic) = guest_template(template);
    let vm_audit = access::privilege_bit("VM.Audit").unwrap_or(0);
    let visible = |g: &guests::Guest| c.principal.is_root() || c.has(&format!("/vms/{}", g.vmid), vm_audit);
    // Only root@pam manages root@pam (its tokens would carry every privilege).
    if p.get("userid").is_some_and(|u| u == ROOT)
        && generic.starts_with("/access/users/")
        && method != "GET"
        && !c.principal.is_root()
    {
        return Err(PveError::new(403, "Permission check failed (root@pam is managed by root@pam only)"));
    }
    let node = p.get("node").map_or("", String::as_str);
    let call = guests::Call { guests: &state.guests, tasks: &state.tasks, node, user: &user };
    let find = |kind: Option<Kind>| {
        guests::find(&state.guests, kind.expect("a guest template"), &p["node"], &p["vmid"])
    };
    match (method, generic.as_str()) {
        ("GET", "/version") => Ok(json!({"version": PVE_VERSION, "release": "9.1", "repoid": "kpve"})),
        ("GET", "/nodes") => nodes(state).await,
        ("GET", "/cluster/nextid") => nextid(state, p.get("vmid")).await,
        ("GET", "/cluster/status") => cluster_status(state).await,
        ("GET", "/nodes/{node}/status") => node_status(state, &p["node"]).await,
        ("GET", "/nodes/{node}/{type}") => {
            let list = guests::list(&state.guests, kind).await?;
            let on_node =
                list.iter().filter(|g| g.status.node.as_deref() == Some(p["node"].as_str()) && visible(g));
            Ok(Value::Array(on_node.map(guests::Guest::entry).collect()))
        }
        ("POST", "/nodes/{node}/{type}") => {
            let vm_allocate = access::privilege_bit("VM.Allocate").unwrap_or(0);
            let by_pool = p.get("pool").is_some_and(|pool| c.has(&format!("/pool/{pool}"), vm_allocate));
            if !by_pool {
                require(c, &format!("/vms/{}", p["vmid"]), "VM.Allocate")?;
            }
            if let Some(key) = p.keys().find(|k| root_only(k))
                && !c.principal.is_root()
            {
                return Err(PveError::new(403, format!("only root can set '{key}' config")));
            }
            guests::create(&state.guests, &state.tasks, &p["node"], kind.expect("a guest template"), p, &user)
                .await
        }
        ("GET", "/nodes/{node}/{type}/{vmid}/status/current") => {
            find(kind).await.map(|g| guests::current(&g))
        }
        ("GET", "/nodes/{node}/{type}/{vmid}/config") => find(kind).await.map(|g| guests::config(&g)),
        ("GET", "/nodes/{node}/{type}/{vmid}/pending") => find(kind).await.map(|g| guests::pending(&g)),
        ("PUT" | "POST", "/nodes/{node}/{type}/{vmid}/config") => {
            let g = find(kind).await?;
            let path = format!("/vms/{}", g.vmid);
            let deleted: Vec<String> =
                p.get("delete").map(|d| split_list(d).map(str::to_string).collect()).unwrap_or_default();
            let skip = ["node", "vmid", "digest", "delete", "revert", "skiplock", "background_delay"];
            for key in p.keys().filter(|k| !skip.contains(&k.as_str())).chain(deleted.iter()) {
                if root_only(key) && !c.principal.is_root() {
                    return Err(PveError::new(403, format!("only root can set '{key}' config")));
                }
                require(c, &path, config_privilege(key))?;
            }
            let generation = guests::update(&state.guests, &g, p).await?;
            if method == "PUT" {
                return Ok(Value::Null);
            }
            let task = format!("{}config", g.kind.task_prefix());
            state
                .tasks
                .create(&p["node"], &task, g.kind, g.vmid, Target::Observed(generation), &user)
                .map(Value::from)
                .map_err(|e| PveError::new(500, e.to_string()))
        }
        ("POST", "/nodes/{node}/{type}/{vmid}/template") => {
            let g = find(kind).await?;
            let generation = guests::make_template(&state.guests, &g).await?;
            let task = format!("{}template", g.kind.task_prefix());
            state
                .tasks
                .create(&p["node"], &task, g.kind, g.vmid, Target::Observed(generation), &user)
                .map(Value::from)
                .map_err(|e| PveError::new(500, e.to_string()))
        }
        ("PUT", "/nodes/{node}/{type}/{vmid}/resize") => {
            let g = find(kind).await?;
            if let Some(digest) = p.get("digest")
                && guests::config(&g)["digest"] != *digest
            {
                return Err(PveError::new(
                    500,
                    "detected modified configuration - file changed by other user? Try again.",
                ));
            }
            let generation = guests::resize(&state.guests, &g, p).await?;
            state
                .tasks
                .create(&p["node"], "resize", g.kind, g.vmid, Target::Observed(generation), &user)
                .map(Value::from)
                .map_err(|e| PveError::new(500, e.to_string()))
        }
        ("GET", "/nodes/{node}/{type}/{vmid}/snapshot") => find(kind).await.map(|g| snapshots::list(&g)),
        ("POST", "/nodes/{node}/{type}/{vmid}/snapshot") => {
            let g = find(kind).await?;
            snapshots::create(&call, &g, p).await
        }
        ("GET", "/nodes/{node}/{type}/{vmid}/snapshot/{snapname}") => {
            let g = find(kind).await?;
            snapshots::config(&g, &p["snapname"])?;
            Ok(json!([{"cmd": "config"}, {"cmd": "rollback"}]))
        }
        ("GET", "/nodes/{node}/{type}/{vmid}/snapshot/{snapname}/config") => {
            find(kind).await.and_then(|g| snapshots::config(&g, &p["snapname"]))
        }
        ("DELETE", "/nodes/{node}/{type}/{vmid}/snapshot/{snapname}") => {
            let g = find(kind).await?;
            snapshots::delete(&call, &g, &p["snapname"]).await
        }
        ("POST", "/nodes/{node}/{type}/{vmid}/snapshot/{snapname}/rollback") => {
            let g = find(kind).await?;
            if p.get("start").is_some_and(|v| v == "1") {
                require(c, &format!("/vms/{}", g.vmid), "VM.PowerMgmt")?;
            }
            snapshots::rollback(&call, &g, p).await
        }
        ("POST", "/nodes/{node}/{type}/{vmid}/clone") => {
            let g = find(kind).await?;
            // As Proxmox's check_storage_access_clone: space on the storage the copies land on.
            let target = p.get("storage").map_or("local", String::as_str);
            require(c, &format!("/storage/{target}"), "Datastore.AllocateSpace")?;
            guests::clone(&call, &g, p).await
        }
        ("GET", "/nodes/{node}/{type}/{vmid}/migrate") if kind == Some(Kind::Qemu) => {
            let g = find(kind).await?;
            migrate::precondition(&state.guests, &g).await
        }
        ("POST", "/nodes/{node}/{type}/{vmid}/migrate") => {
            let g = find(kind).await?;
            migrate::migrate(&state.guests, &state.tasks, &p["node"], &g, p, &user).await
        }
        ("DELETE", "/nodes/{node}/{type}/{vmid}") => {
            let g = find(kind).await?;
            guests::destroy(&state.guests, &state.tasks, &p["node"], &g, &user).await
        }
        ("POST", t) if t.starts_with("/nodes/{node}/{type}/{vmid}/status/") => {
            let action = t.rsplit('/').next().unwrap_or("");
            let g = find(kind).await?;
            guests::power(&state.guests, &state.tasks, &p["node"], &g, action, &user).await
        }
        ("GET", "/storage") => storage::list(client).await,
        ("GET", "/nodes/{node}/storage") => storage::on_node(client, &p["node"]).await,
        ("GET", "/nodes/{node}/storage/{storage}/status") => {
            storage::status(client, &p["node"], &p["storage"]).await
        }
        ("GET", "/nodes/{node}/storage/{storage}/content") => {
            storage::content(
                client,
                &p["node"],
                &p["storage"],
                p.get("content").map(String::as_str),
                p.get("vmid").map(String::as_str),
            )
            .await
        }
        ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}") => {
            require(c, &format!("/storage/{}", p["storage"]), "Datastore.Allocate")?;
            storage::delete_volume(&call, &p["storage"], &p["volume"]).await
        }
        ("GET", "/nodes/{node}/tasks/{upid}/status" | "/nodes/{node}/tasks/{upid}/log") => {
            let upid = &p["upid"];
            let owner = upid.parse::<crate::upid::Upid>().map(|u| u.user).unwrap_or_default();
            if owner != user && owner.split('!').next() != Some(c.principal.user.as_str()) {
                require(c, &format!("/nodes/{}", p["node"]), "Sys.Audit")?;
            }
            if generic.ends_with("/log") {
                state.tasks.log(&state.guests, upid).await
            } else {
                state.tasks.status(&state.guests, upid).await
            }
        }
        ("GET", "/nodes/{node}/tasks") => {
            // Tasks of others need Sys.Audit on the node (Proxmox lists only the caller's otherwise).
            let mut filter = p.clone();
            if !c.principal.is_root()
                && !c.has(&format!("/nodes/{}", p["node"]), access::privilege_bit("Sys.Audit").unwrap_or(0))
            {
                filter.insert("userfilter".into(), c.principal.user.clone());
            }
            state.tasks.list(&state.guests, &p["node"], &filter).await
        }
        ("GET", "/access/users") => Ok(access_api::users(store, c)),
        ("POST", "/access/users") => access_api::user_create(client, store, p).await,
        ("GET", "/access/users/{userid}") => access_api::user_get(store, c),
        ("PUT", "/access/users/{userid}") => access_api::user_update(client, store, p).await,
        ("DELETE", "/access/users/{userid}") => access_api::user_delete(client, store, p).await,
        ("GET", "/access/users/{userid}/token") => access_api::tokens(store, p),
        ("GET", "/access/users/{userid}/token/{tokenid}") => access_api::token_get(store, p),
        ("POST", "/access/users/{userid}/token/{tokenid}") => {
            access_api::token_create(client, store, p).await
        }
        ("PUT", "/access/users/{userid}/token/{tokenid}") => access_api::token_update(client, store, p).await,
        ("DELETE", "/access/users/{userid}/token/{tokenid}") => {
            access_api::token_delete(client, store, p).await
        }
        ("PUT", "/access/password") => access_api::password(client, store, &state.keys(), c).await,
        ("GET", "/access/groups") => Ok(access_api::groups(store, c)),
        ("POST", "/access/groups") => access_api::group_create(client, store, p).await,
        ("GET", "/access/groups/{groupid}") => access_api::group_get(store, p),
        ("PUT", "/access/groups/{groupid}") => access_api::group_update(client, store, p).await,
        ("DELETE", "/access/groups/{groupid}") => access_api::group_delete(client, store, p).await,
        ("GET", "/access/roles") => Ok(access_api::roles(store)),
        ("POST", "/access/roles") => access_api::role_create(client, store, p).await,
        ("GET", "/access/roles/{roleid}") => access_api::role_get(store, p),
        ("PUT", "/access/roles/{roleid}") => access_api::role_update(client, store, p).await,
        ("DELETE", "/access/roles/{roleid}") => access_api::role_delete(client, store, p).await,
        ("GET", "/access/acl") => Ok(access_api::acl(store, c)),
        ("PUT", "/access/acl") => access_api::acl_update(client, store, c).await,
        ("GET", "/access/permissions") => access_api::permissions(store, c),
        _ => {
            if let Some(result) =
                firewall_api::handle(&state.guests, method, template, &generic, kind, p).await
            {
                return result;
            }
            match cluster_api::handle(&state.guests, method, template, p).await {
                Some(result) => result,
                None => Err(PveError::not_implemented(method, template)),
            }
        }
    }
}

async fn login(state: &Arc<AppState>, params: &BTreeMap<String, String>) -> Response {
    // The schema's limits first: an unauthenticated caller picks the password's length, and
    // SHA-crypt's cost grows with it.
    if let Route::Found(endpoint, _) = SCHEMA.route("POST", &["access", "ticket"])
        && let Err(errors) = validate::params(endpoint, params)
    {
        return PveError::parameters(errors).into_response();
    }
    let userid = auth::login_userid(params);
    let password = params.get("password").cloned().unwrap_or_default();
    if password.len() > 4096 {
        let error = ("password".to_string(), "value may only be 4096 characters long".to_string());
        return PveError::parameters(BTreeMap::from([error])).into_response();
    }
    // Hashing runs off the async workers.
    let checking = state.clone();
    let who = userid.clone();
    let checked = tokio::task::spawn_blocking(move || {
        auth::check_password(&checking.keys(), &checking.store, &checking.root_password, &who, &password)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    if let Err(e) = checked {
        tracing::info!(user = %userid, reason = %e, "login failed");
        tokio::time::sleep(AUTH_FAILURE_DELAY).await;
        return PveError::new(401, "authentication failure").into_response();
    }
    let t = auth::now();
    ok(json!({
        "username": userid,
        "ticket": state.keys().ticket(&userid, t),
        "CSRFPreventionToken": state.keys().csrf_token(&userid, t),
        "cap": {},
    }))
}

/// `GET /nodes/{node}/status`.
async fn node_status(state: &AppState, node: &str) -> Result<Value, PveError> {
    let hvs: Api<Hypervisor> = Api::all(state.client.clone());
    let hv = hvs
        .get_opt(node)
        .await
        .map_err(PveError::read_failed)?
        .ok_or_else(|| PveError::new(500, format!("no such node '{node}'")))?;
    let s = hv.status.clone().unwrap_or_default();
    let cap = s.capacity.clone().unwrap_or_default();
    let total = cap.memory_mib * 1024 * 1024;
    let used = s.memory_used_mib.unwrap_or(0) * 1024 * 1024;
    let versions = s.versions.clone().unwrap_or_default();
    Ok(json!({
        "cpu": s.cpu_usage.unwrap_or(0.0),
        "cpuinfo": {"cpus": cap.cpus, "sockets": 1, "model": "kpve"},
        "memory": {"total": total, "used": used, "free": total.saturating_sub(used)},
        "kversion": versions.kernel.unwrap_or_default(),
        "pveversion": format!("pve-manager/{PVE_VERSION}/kpve"),
        "uptime": 0,
    }))
}

/// `GET /cluster/status`: the cluster and its nodes.
async fn cluster_status(state: &AppState) -> Result<Value, PveError> {
    let mut out =
        vec![json!({"type": "cluster", "id": "cluster", "name": "kpve", "quorate": 1, "version": 1})];
    if let Value::Array(nodes) = nodes(state).await? {
        for (i, n) in nodes.iter().enumerate() {
            out.push(json!({"type": "node", "id": format!("node/{}", n["node"].as_str().unwrap_or("")), "name": n["node"],
                             "online": u8::from(n["status"] == "online"), "nodeid": i + 1, "local": 0}));
        }
    }
    Ok(Value::Array(out))
}

async fn nodes(state: &AppState) -> Result<Value, PveError> {
    let hvs: Api<Hypervisor> = Api::all(state.client.clone());
    let list = hvs.list(&ListParams::default()).await.map_err(PveError::read_failed)?;
    Ok(Value::Array(list.items.iter().map(node_entry).collect()))
}

fn node_entry(hv: &Hypervisor) -> Value {
    let status = hv.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == kpve_crds::ConditionStatus::True);
    let cap = status.and_then(|s| s.capacity.as_ref());
    let mut e = json!({
        "id": format!("node/{}", hv.name_any()), "type": "node", "node": hv.name_any(),
        "status": if ready { "online" } else { "offline" }, "level": "",
    });
    if let Some(cap) = cap {
        e["maxcpu"] = json!(cap.cpus);
        e["maxmem"] = json!(cap.memory_mib * 1024 * 1024);
    }
    if let Some(used) = status.and_then(|s| s.memory_used_mib) {
        e["mem"] = json!(used * 1024 * 1024);
    }
    if let Some(cpu) = status.and_then(|s| s.cpu_usage) {
        e["cpu"] = json!(cpu);
    }
    e
}

/// `GET /cluster/resources`: guests, nodes and storages the caller may audit (type checked
/// by the schema); guests carry their pool (namespace). Returned as JSON text: the guest
/// entries come from the guest cache's rendered pieces.
async fn resources(state: &AppState, c: &Checker<'_>) -> Result<String, PveError> {
    let kind = c.params.get("type").map(String::as_str);
    let bit = |name: &str| access::privilege_bit(name).unwrap_or(0);
    let root = c.principal.is_root();
    let mut parts: Vec<std::sync::Arc<str>> = Vec::new();
    if kind.is_none() || kind == Some("vm") {
        let audit = bit("VM.Audit");
        // A guest without ACL entries of its own (`/vms/<vmid>`) is allowed exactly when any
        // guest of its pool is: one check per pool, not per guest.
        let by_pool = std::cell::RefCell::new(HashMap::<Option<String>, bool>::new());
        parts = state.guests.resource_entries(|vmid| {
            let path = format!("/vms/{vmid}");
            if root {
                return true;
            }
            if c.access.acl.contains_key(&path) {
                return c.has(&path, audit);
            }
            let pool = (c.pools)(&vmid.to_string());
            *by_pool.borrow_mut().entry(pool).or_insert_with(|| c.has(&path, audit))
        });
    }
    let mut other = Vec::new();
    if (kind.is_none() || kind == Some("node"))
        && let Value::Array(n) = nodes(state).await?
    {
        other.extend(n.into_iter().filter(|n| {
            root || c.has(&format!("/nodes/{}", n["node"].as_str().unwrap_or("")), bit("Sys.Audit"))
        }));
    }
    if kind.is_none() || kind == Some("storage") {
        let pools: Api<StoragePool> = Api::all(state.client.clone());
        for pool in pools.list(&ListParams::default()).await.map_err(PveError::read_failed)?.items {
            let path = format!("/storage/{}", pool.name_any());
            if !root && c.privs(&path) & (bit("Datastore.Audit") | bit("Datastore.AllocateSpace")) == 0 {
                continue;
            }
            for n in pool.status.as_ref().map(|s| s.nodes.clone()).unwrap_or_default() {
                other.push(json!({
                    "id": format!("storage/{}/{}", n.node, pool.name_any()), "type": "storage",
                    "storage": pool.name_any(), "node": n.node,
                    "status": if n.active { "available" } else { "unknown" },
                    "maxdisk": n.total, "disk": n.used, "shared": 0,
                }));
            }
        }
    }
    let mut text = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum::<usize>() + 4096);
    text.push('[');
    let others: Vec<String> = other.iter().map(Value::to_string).collect();
    for (i, part) in parts.iter().map(|p| &**p).chain(others.iter().map(String::as_str)).enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(part);
    }
    text.push(']');
    Ok(text)
}

async fn nextid(state: &AppState, wanted: Option<&String>) -> Result<Value, PveError> {
    let taken: std::collections::BTreeSet<u32> =
        guests::list(&state.guests, None).await?.iter().map(|g| g.vmid).collect();
    let reject = |msg: String| {
        let mut errors = BTreeMap::new();
        errors.insert("vmid".to_string(), msg);
        PveError::parameters(errors)
    };
    // Real Proxmox answers with a JSON string here, and Telmate's client insists on one.
    match wanted {
        Some(v) => {
            let vmid: u32 =
                v.parse().map_err(|_| reject(format!("type check ('integer') failed - got '{v}'")))?;
            if taken.contains(&vmid) {
                return Err(reject(format!("VM {vmid} already exists")));
            }
            Ok(json!(vmid.to_string()))
        }
        None => Ok(json!((100..).find(|v| !taken.contains(v)).expect("a free VMID").to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_keys_rotate_daily_and_old_tickets_still_verify() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_keys(dir.path()).unwrap();
        assert!(first.previous.is_none());
        let ticket = first.ticket("root@pam", auth::now());
        assert!(rotate_if_old(dir.path()).unwrap().is_none(), "a fresh key stays");
        // A day later.
        let file = std::fs::File::options().write(true).open(dir.path().join(KEY_FILE)).unwrap();
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(25 * 3600)).unwrap();
        let rotated = rotate_if_old(dir.path()).unwrap().expect("rotated");
        assert_ne!(rotated.current, first.current);
        assert_eq!(rotated.previous, Some(first.current));
        assert_eq!(rotated.verify_ticket(&ticket, auth::now()).unwrap(), "root@pam");
        // A restart reads both keys back.
        let reloaded = load_keys(dir.path()).unwrap();
        assert_eq!((reloaded.current, reloaded.previous), (rotated.current, rotated.previous));
        use std::os::unix::fs::PermissionsExt;
        for f in [KEY_FILE.to_string(), format!("{KEY_FILE}.old")] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A damaged key file is refused rather than read as a zero key.
        std::fs::write(dir.path().join(KEY_FILE), "abc\n").unwrap();
        assert!(load_keys(dir.path()).is_err());
    }
}
