//! The HTTPS front of `/api2/json`: authentication (tickets from the cookie or the
//! `Authorization: PVEAuthCookie=` header, CSRF on ticket-authenticated writes, every 401
//! delayed 3 s), routing, and the read-only inventory endpoints built so far. Every answer
//! is read from the resources through the Kubernetes API; the layer keeps no state of its own
//! besides the root password and the ticket keys in the data directory (both 0600).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use kpve_crds::{Hypervisor, LinuxContainer, PowerState, StoragePool, VirtualMachine};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use crate::envelope::{PveError, ok, unauthorized};
use crate::ticket::Keys;

/// The only user until access control is built: `root@pam`.
pub const ROOT: &str = "root@pam";
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
    keys: Keys,
    root_password: String,
}

/// Writes `contents` with mode 0600 unless the file exists; returns the file's content.
fn secret_file(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = make();
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            f.write_all(format!("{value}\n").as_bytes())?;
            Ok(value)
        }
        Err(e) => Err(e.into()),
    }
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
    let key = secret_file(&config.data_dir.join(KEY_FILE), || hex(&rand::random::<[u8; 32]>()))?;
    let mut current = [0u8; 32];
    for (i, byte) in current.iter_mut().enumerate() {
        *byte = u8::from_str_radix(key.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
    }
    let state =
        Arc::new(AppState { client: config.client, keys: Keys { current, previous: None }, root_password });
    let app = axum::Router::new().fallback(handle).with_state(state);
    let handle_ = axum_server::Handle::new();
    let server = axum_server::bind_rustls(
        config.listen,
        axum_server::tls_rustls::RustlsConfig::from_config(config.tls),
    )
    .handle(handle_.clone())
    .serve(app.into_make_service());
    let task = tokio::spawn(async move { server.await.map_err(anyhow::Error::from) });
    let address =
        handle_.listening().await.ok_or_else(|| anyhow::anyhow!("the Proxmox API listener did not start"))?;
    tracing::info!(%address, "Proxmox VE API listening");
    Ok((address, task))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `NAME=value` from a header value of `;`-separated pairs (cookies, Authorization).
fn auth_value(header: &str, name: &str) -> Option<String> {
    header.split(';').map(str::trim).find_map(|part| {
        let rest = part.strip_prefix(name)?;
        let value = rest.strip_prefix('=').or_else(|| rest.strip_prefix(' '))?;
        Some(
            form_urlencoded::parse(format!("v={value}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default(),
        )
    })
}

/// Parameters: the query, then a form or JSON body.
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
                out.insert(k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
            }
        }
    } else {
        out.extend(form_urlencoded::parse(body).into_owned());
    }
    out.remove("_dc");
    out
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
    let params = params(&uri, &headers, &body);
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();

    if (method == Method::POST) && segments == ["access", "ticket"] {
        return login(&state, &params).await;
    }
    // Authentication: the ticket from the cookie, else from `Authorization: PVEAuthCookie=`.
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ticket = auth_value(header("cookie"), "PVEAuthCookie")
        .or_else(|| auth_value(header("authorization"), "PVEAuthCookie"));
    let Some(ticket) = ticket else {
        if header("authorization").contains("PVEAPIToken") {
            // API tokens need the access-control resources (not built yet).
            tokio::time::sleep(AUTH_FAILURE_DELAY).await;
            return unauthorized("Authentication failed!");
        }
        tokio::time::sleep(AUTH_FAILURE_DELAY).await;
        return unauthorized("No ticket");
    };
    let user = match state.keys.verify_ticket(&ticket, now()) {
        Ok(user) => user,
        Err(_) => {
            tokio::time::sleep(AUTH_FAILURE_DELAY).await;
            return unauthorized("Authentication failed!");
        }
    };
    if method != Method::GET {
        let token = header("csrfpreventiontoken");
        if !state.keys.verify_csrf(&user, token, now()) {
            tokio::time::sleep(AUTH_FAILURE_DELAY).await;
            return unauthorized("Permission denied - invalid csrf token");
        }
    }
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["version"]) => {
            Ok(json!({"version": PVE_VERSION, "release": "9.1", "repoid": "kpve"}))
        }
        (&Method::GET, ["nodes"]) => nodes(&state).await,
        (&Method::GET, ["cluster", "resources"]) => {
            resources(&state, params.get("type").map(String::as_str)).await
        }
        (&Method::GET, ["cluster", "nextid"]) => nextid(&state, params.get("vmid")).await,
        _ => Err(PveError::not_implemented(method.as_str(), path)),
    };
    match result {
        Ok(data) => ok(data),
        Err(e) => e.into_response(),
    }
}

async fn login(state: &AppState, params: &BTreeMap<String, String>) -> Response {
    let mut username = params.get("username").cloned().unwrap_or_default();
    if let Some(realm) = params.get("realm")
        && !username.contains('@')
    {
        username = format!("{username}@{realm}");
    }
    let password = params.get("password").cloned().unwrap_or_default();
    // A valid ticket is accepted as the password (proxmoxer renews its ticket that way).
    let renewing = state.keys.verify_ticket(&password, now()).is_ok_and(|u| u == username);
    if username != ROOT
        || (!renewing && !constant_time_eq(password.as_bytes(), state.root_password.as_bytes()))
    {
        tokio::time::sleep(AUTH_FAILURE_DELAY).await;
        return PveError::new(401, "authentication failure").into_response();
    }
    let t = now();
    ok(json!({
        "username": username,
        "ticket": state.keys.ticket(&username, t),
        "CSRFPreventionToken": state.keys.csrf_token(&username, t),
        "cap": {},
    }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn internal(e: kube::Error) -> PveError {
    PveError::new(500, format!("reading resources failed: {e}"))
}

async fn nodes(state: &AppState) -> Result<Value, PveError> {
    let hvs: Api<Hypervisor> = Api::all(state.client.clone());
    let list = hvs.list(&ListParams::default()).await.map_err(internal)?;
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

/// A guest as `/cluster/resources` lists it: `vmid` is a JSON number (Telmate reads it so).
fn guest_entry(
    kind: &str,
    vmid: u32,
    name: &str,
    spec_status: (&kpve_crds::GuestStatus, PowerState),
    maxcpu: u32,
    maxmem_mib: u64,
) -> Value {
    let (status, _) = spec_status;
    let running = matches!(status.phase, kpve_crds::GuestPhase::Running | kpve_crds::GuestPhase::Paused);
    let mut e = json!({
        "id": format!("{kind}/{vmid}"), "type": kind, "vmid": vmid, "name": name,
        "status": if running { "running" } else { "stopped" },
        "maxcpu": maxcpu, "maxmem": maxmem_mib * 1024 * 1024, "template": 0,
    });
    if let Some(node) = &status.node {
        e["node"] = json!(node);
    }
    for (key, value) in [
        ("mem", status.mem.map(|m| json!(m))),
        ("cpu", status.cpu.map(|c| json!(c))),
        ("uptime", status.uptime.map(|u| json!(u))),
    ] {
        if let Some(v) = value {
            e[key] = v;
        }
    }
    e
}

async fn guests(state: &AppState) -> Result<Vec<(u32, Value)>, PveError> {
    let mut out = Vec::new();
    let vms: Api<VirtualMachine> = Api::all(state.client.clone());
    for vm in vms.list(&ListParams::default()).await.map_err(internal)?.items {
        let Some(vmid) = vm.spec.vmid else { continue };
        let status = vm.status.clone().unwrap_or_default();
        let name = vm.spec.name.clone().unwrap_or_else(|| vm.name_any());
        let cpus = vm.spec.cpu.cores * vm.spec.cpu.sockets;
        out.push((
            vmid,
            guest_entry(
                "qemu",
                vmid,
                &name,
                (&status, vm.spec.power_state),
                cpus,
                u64::from(vm.spec.memory.size),
            ),
        ));
    }
    let cts: Api<LinuxContainer> = Api::all(state.client.clone());
    for ct in cts.list(&ListParams::default()).await.map_err(internal)?.items {
        let Some(vmid) = ct.spec.vmid else { continue };
        let status = ct.status.clone().unwrap_or_default();
        let name = ct.spec.hostname.clone().unwrap_or_else(|| ct.name_any());
        let cpus = ct.spec.cores.unwrap_or(1);
        out.push((
            vmid,
            guest_entry("lxc", vmid, &name, (&status, ct.spec.power_state), cpus, u64::from(ct.spec.memory)),
        ));
    }
    out.sort_by_key(|(vmid, _)| *vmid);
    Ok(out)
}

async fn resources(state: &AppState, kind: Option<&str>) -> Result<Value, PveError> {
    if let Some(k) = kind
        && !["vm", "node", "storage", "sdn", "pool"].contains(&k)
    {
        let mut errors = BTreeMap::new();
        errors.insert(
            "type".into(),
            format!("value '{k}' does not have a value in the enumeration 'vm, storage, node, sdn'"),
        );
        return Err(PveError::parameters(errors));
    }
    let mut out = Vec::new();
    if kind.is_none() || kind == Some("vm") {
        out.extend(guests(state).await?.into_iter().map(|(_, e)| e));
    }
    if (kind.is_none() || kind == Some("node"))
        && let Value::Array(n) = nodes(state).await?
    {
        out.extend(n);
    }
    if kind.is_none() || kind == Some("storage") {
        let pools: Api<StoragePool> = Api::all(state.client.clone());
        for pool in pools.list(&ListParams::default()).await.map_err(internal)?.items {
            for n in pool.status.as_ref().map(|s| s.nodes.clone()).unwrap_or_default() {
                out.push(json!({
                    "id": format!("storage/{}/{}", n.node, pool.name_any()), "type": "storage",
                    "storage": pool.name_any(), "node": n.node,
                    "status": if n.active { "available" } else { "unknown" },
                    "maxdisk": n.total, "disk": n.used, "shared": 0,
                }));
            }
        }
    }
    Ok(Value::Array(out))
}

async fn nextid(state: &AppState, wanted: Option<&String>) -> Result<Value, PveError> {
    let taken: std::collections::BTreeSet<u32> = guests(state).await?.into_iter().map(|(v, _)| v).collect();
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
    fn auth_values_come_from_cookies_and_authorization_headers() {
        assert_eq!(
            auth_value("foo=1; PVEAuthCookie=PVE%3Aroot%40pam%3A1::sig", "PVEAuthCookie").unwrap(),
            "PVE:root@pam:1::sig"
        );
        assert_eq!(auth_value("PVEAuthCookie=PVE:x::y", "PVEAuthCookie").unwrap(), "PVE:x::y");
        assert_eq!(auth_value("PVEAPIToken root@pam!ci=abc", "PVEAPIToken").unwrap(), "root@pam!ci=abc");
        assert!(auth_value("other=1", "PVEAuthCookie").is_none());
    }
}
