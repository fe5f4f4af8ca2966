//! The embedded Kubernetes-compatible API server for the kpve.io kinds (`kpve server`).
//!
//! [`store`] keeps objects (SQLite, kine's revision-log layout); [`api`] implements the
//! Kubernetes object semantics over it; [`http`] is the HTTPS face kubectl and kube-rs talk
//! to; [`gc`] does what kube-controller-manager would (ownerReference GC, namespace
//! termination, the Event TTL) plus history compaction. See docs/ARCHITECTURE.md §6.

pub mod admission;
pub mod api;
pub mod auth;
pub mod discovery;
pub mod events;
pub mod gc;
pub mod http;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod resources;
pub mod selector;
pub mod ssa;
pub mod status;
pub mod store;
pub mod strict_json;
pub mod table;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

/// `kpve server` settings that concern the API server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// This host's node name (a node token is issued for it).
    pub node: String,
    /// How often idle watches get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Watch history is kept at least this long...
    pub history_window: Duration,
    /// ...and at least this many revisions.
    pub keep_revisions: i64,
}

/// The admin user the first start creates.
pub const ADMIN_USER: &str = "kpve-admin";

/// Prepares the data directory: certificates, the admin token, a node token for this host and
/// the kubeconfig. Returns the admin token.
pub fn prepare(config: &ServerConfig) -> anyhow::Result<String> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    pki::ensure_certificates(dir)?;
    let admin = match auth::Tokens::first_admin(dir) {
        Some((token, _)) => token,
        None => auth::Tokens::create(dir, ADMIN_USER, &auth::Role::Admin)?,
    };
    let node_token = dir.join("node-token");
    if !node_token.exists() {
        let token = auth::Tokens::create(
            dir,
            &format!("system:node:{}", config.node),
            &auth::Role::Node(config.node.clone()),
        )?;
        pki::write_file(&node_token, token.as_bytes(), 0o600)?;
    }
    Ok(admin)
}

/// A started API server.
#[derive(Debug)]
pub struct Running {
    pub address: SocketAddr,
    pub admin_token: String,
    pub api: Arc<api::Api>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts the API server; returns once it listens and the kubeconfig is written.
pub async fn start(config: ServerConfig) -> anyhow::Result<Running> {
    let admin = prepare(&config)?;
    let store = store::sqlite::SqliteStore::open(&config.data_dir.join("state.db"))
        .with_context(|| format!("opening {}", config.data_dir.join("state.db").display()))?;
    let api = Arc::new(api::Api::new(Arc::new(store)).map_err(|e| anyhow::anyhow!("bootstrap: {e}"))?);
    ensure_default_pool(&api, &config);
    tokio::spawn(gc::run(api.clone()));
    tokio::spawn(gc::compact(api.clone(), config.history_window, config.keep_revisions));

    let tls = pki::server_tls_config(&config.data_dir)?;
    let handle = axum_server::Handle::new();
    let state = Arc::new(http::AppState {
        api: api.clone(),
        tokens: auth::Tokens::open(&config.data_dir),
        bookmark_interval: config.bookmark_interval,
        server_address: config.listen.to_string(),
        openapi: Default::default(),
    });
    let app = http::router(state);
    let server =
        axum_server::bind_rustls(config.listen, axum_server::tls_rustls::RustlsConfig::from_config(tls))
            .handle(handle.clone())
            .serve(app.into_make_service());
    let task = tokio::spawn(async move { server.await.context("server") });
    let address = handle.listening().await.context("the listener did not start")?;
    let host = if address.ip().is_unspecified() { "127.0.0.1".to_string() } else { address.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    pki::write_kubeconfig(
        &config.data_dir,
        &config.data_dir.join(pki::KUBECONFIG),
        &format!("https://{host}:{}", address.port()),
        ADMIN_USER,
        &admin,
    )?;
    tracing::info!(%address, kubeconfig = %config.data_dir.join(pki::KUBECONFIG).display(), "API server listening");
    eprintln!(
        "kpve: API server listening on https://{address}; kubeconfig in {}",
        config.data_dir.join(pki::KUBECONFIG).display()
    );
    Ok(Running { address, admin_token: admin, api, task })
}

/// Runs the API server until the process ends.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    start(config).await?.task.await.context("server task")?
}

/// Proxmox ships a `local` dir pool; so does kpve (under the data directory).
fn ensure_default_pool(api: &api::Api, config: &ServerConfig) {
    let registry = api.registry();
    let Some(rt) = registry.get(kpve_crds::GROUP, kpve_crds::VERSION, "storagepools") else { return };
    if api.get(rt, None, "local").is_ok() {
        return;
    }
    let path = config.data_dir.join("storage/local");
    let body = serde_json::json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": "local"},
        "spec": {"type": "dir", "path": path.display().to_string(), "content": ["images", "rootdir", "vztmpl", "iso"]}
    });
    if let Err(e) = api.create(rt, None, body, &api::WriteOptions::system()) {
        tracing::warn!(error = %e, "default storage pool not created");
    }
}
