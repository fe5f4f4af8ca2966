//! The `kpve` binary: command-line parsing and wiring only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod convert;
mod join;
mod validate;

// mimalloc: many small JSON values (watch events, the firewall compiler) made glibc malloc
// the hot spot; see the workspace Cargo.toml.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// kpve — the Proxmox VE control plane as a Kubernetes-style declarative reconciler.
///
/// Declare VMs, containers, storage, firewall rules and HA placement as kpve.io resources;
/// kpve makes the hosts match and speaks both the Kubernetes and the Proxmox VE API.
#[derive(Parser, Debug)]
#[command(name = "kpve", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run everything on this machine: the Kubernetes-compatible API server (:6443), the
    /// controllers, the Proxmox VE API (:8006) and a node agent. [built: the API server]
    Server(ServerArgs),
    /// Issue an API token (admin, read-only or node) into DATA_DIR/tokens.csv and print it.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Run a node agent that joins a kpve server and runs this host's guests.
    Agent(AgentArgs),
    /// Run the controllers alone against any conformant API server (--kubeconfig). [not built yet]
    Controllers(NotBuilt),
    /// Serve the Proxmox VE REST API alone against a kpve API server (an admin token).
    PveApi(PveApiArgs),
    /// Write the CustomResourceDefinitions of every kpve kind as YAML.
    Crdgen {
        /// Directory to write one <plural>.kpve.io.yaml per kind into.
        #[arg(long, default_value = "manifests/crds")]
        out: PathBuf,
        /// Do not write; exit 1 if the files in --out differ from the generated ones.
        #[arg(long)]
        check: bool,
    },
    /// Validate kpve manifests against the CRD schemas (unknown fields are errors).
    Validate {
        /// YAML files (multi-document allowed) or directories of them.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Convert between Proxmox guest configs and kpve manifests.
    Convert {
        #[command(subcommand)]
        direction: convert::Direction,
    },
    /// Print the kpve version.
    Version,
    /// The HA fence watchdog an agent starts for itself: kills the node's HA guests whenever
    /// the agent's lease record is older than the self-fence deadline.
    #[command(hide = true)]
    FenceWatchdog {
        /// The agent's state directory (DATA_DIR/agent).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        fence_ms: u64,
    },
}

/// HA timing profiles (lease / renewal / self-fence deadline).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum HaProfile {
    /// 40 s lease, renewed every 5 s, self-fence after 30 s.
    Default,
    /// 8 s lease, renewed every second, self-fence after 5 s: recovery in about 10 s.
    Fast,
}

impl HaProfile {
    fn profile(self) -> kpve_ha::Profile {
        match self {
            HaProfile::Default => kpve_ha::Profile::DEFAULT,
            HaProfile::Fast => kpve_ha::Profile::FAST,
        }
    }
}

#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// Where the state database, certificates, tokens and the kubeconfig live.
    #[arg(long, env = "KPVE_DATA_DIR", default_value = "/var/lib/kpve")]
    data_dir: PathBuf,
    /// Address of the Kubernetes API (HTTPS). Port 0 picks a free port (see DATA_DIR/kubeconfig).
    #[arg(long, default_value = "127.0.0.1:6443")]
    kube_listen: std::net::SocketAddr,
    /// This host's node name.
    #[arg(long)]
    node: Option<String>,
    /// Address of the Proxmox VE API (HTTPS, `/api2/json`); root@pam's password is generated
    /// into DATA_DIR/pve-root-password on first start.
    #[arg(long, default_value = "0.0.0.0:8006")]
    pve_listen: std::net::SocketAddr,
    /// PEM certificate chain the Proxmox VE API serves (with --pve-tls-key); otherwise the
    /// server certificate kpve's CA issued.
    #[arg(long, requires = "pve_tls_key")]
    pve_tls_cert: Option<PathBuf>,
    /// PEM private key of --pve-tls-cert.
    #[arg(long, requires = "pve_tls_cert")]
    pve_tls_key: Option<PathBuf>,
    /// Do not run a node agent for this host.
    #[arg(long)]
    no_agent: bool,
    /// HA timing of this host's node agent.
    #[arg(long, value_enum, default_value = "default")]
    ha_profile: HaProfile,
    /// Mount the /etc/pve view (pmxcfs layout) here, acting as the admin identity.
    #[arg(long)]
    pve_fs: Option<PathBuf>,
    /// Do not run the controllers (scheduler, guest controller): the API server alone.
    #[arg(long)]
    no_controllers: bool,
    /// Seconds between BOOKMARK events on idle watches.
    #[arg(long, default_value_t = 60, hide = true)]
    bookmark_interval: u64,
    /// Seconds of watch history kept for resuming watches (older starts get 410 Expired).
    #[arg(long, default_value_t = 300, hide = true)]
    history_window: u64,
    /// Revisions of watch history kept at least.
    #[arg(long, default_value_t = 10_000, hide = true)]
    keep_revisions: i64,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// The kpve API server, e.g. https://pve1:6443.
    #[arg(long)]
    server: String,
    /// The join token `kpve token create --node NAME` printed on the server (it carries the
    /// server's CA). Needed once: the agent keeps it in DATA_DIR/agent (0600). Prefer the
    /// environment variable or --token-file: a command line is visible to every local user.
    #[arg(long, env = "KPVE_JOIN_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the join token (or a bare bearer token, with --ca-file).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate of the server (DATA_DIR/ca.crt there); a join token carries it.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// This host's node name.
    #[arg(long)]
    node: String,
    /// Where agent state and the default `local` pool live.
    #[arg(long, env = "KPVE_DATA_DIR", default_value = "/var/lib/kpve")]
    data_dir: PathBuf,
    /// Mount the /etc/pve view (pmxcfs layout) here.
    #[arg(long)]
    pve_fs: Option<PathBuf>,
    /// HA timing: how long the node's lease lasts and when it fences itself.
    #[arg(long, value_enum, default_value = "default")]
    ha_profile: HaProfile,
    /// The identity the /etc/pve view writes with (a token file); without it the view acts
    /// as this node, which may read everything and change nothing.
    #[arg(long, requires = "pve_fs")]
    pve_fs_token: Option<PathBuf>,
    /// Where this node receives live-migrating guests (QEMU's migration and NBD ports);
    /// by default the address this host reaches the server from.
    #[arg(long)]
    migration_address: Option<std::net::IpAddr>,
}

/// Debug without the join token.
impl std::fmt::Debug for AgentArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentArgs")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("node", &self.node)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

#[derive(clap::Args, Debug)]
struct PveApiArgs {
    /// The kpve API server, e.g. https://pve1:6443.
    #[arg(long)]
    server: String,
    /// File holding an admin bearer token (`kpve token create --role admin`).
    #[arg(long)]
    token_file: PathBuf,
    /// CA certificate of the server (DATA_DIR/ca.crt on the server).
    #[arg(long)]
    ca_file: PathBuf,
    /// Where root@pam's password, the ticket key, the task records and the generated
    /// certificate (pve-ssl.pem, pve-ssl.key) live.
    #[arg(long, env = "KPVE_DATA_DIR", default_value = "/var/lib/kpve")]
    data_dir: PathBuf,
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8006")]
    listen: std::net::SocketAddr,
    /// PEM certificate chain to serve (with --tls-key); a self-signed one is generated otherwise.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Create a token and print it.
    Create {
        #[arg(long, env = "KPVE_DATA_DIR", default_value = "/var/lib/kpve")]
        data_dir: PathBuf,
        /// admin, read-only or node (the default with --node: a join token for an agent).
        #[arg(long)]
        role: Option<String>,
        /// The node name (role node).
        #[arg(long)]
        node: Option<String>,
        /// The user name the token authenticates as.
        #[arg(long)]
        user: Option<String>,
    },
}

/// Options of a subcommand that a later milestone implements.
#[derive(clap::Args, Debug)]
struct NotBuilt {
    /// Arguments for the future implementation (ignored).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kpve: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Server(args) => server(args),
        Command::Token { action: TokenAction::Create { data_dir, role, node, user } } => {
            let role = role.as_deref().or(node.as_ref().map(|_| "node")).unwrap_or_default();
            let role = kpve_apiserver::auth::Role::parse(role, node.as_deref())
                .context("--role must be admin, read-only, or node (with --node NAME)")?;
            let user = user.unwrap_or_else(|| match &role {
                kpve_apiserver::auth::Role::Node(n) => format!("system:node:{n}"),
                kpve_apiserver::auth::Role::ReadOnly => "kpve-viewer".into(),
                kpve_apiserver::auth::Role::Admin => "kpve-admin".into(),
            });
            let node_role = matches!(role, kpve_apiserver::auth::Role::Node(_));
            let token = kpve_apiserver::auth::Tokens::create(&data_dir, &user, &role)?;
            if node_role {
                // A join token: the agent learns the server's CA from it, not from the network.
                let ca = std::fs::read(data_dir.join("ca.crt")).with_context(|| {
                    format!("reading {} (start the server once first)", data_dir.join("ca.crt").display())
                })?;
                println!("{}", join::encode(&ca, &token));
            } else {
                println!("{token}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => agent(args),
        Command::Controllers(_) => not_built("controllers", "the controllers (issue: VMs end to end)"),
        Command::PveApi(args) => pve_api(args),
        Command::Crdgen { out, check } => crdgen(&out, check),
        Command::Validate { files } => validate::run(&files),
        Command::Convert { direction } => convert::run(direction),
        Command::FenceWatchdog { dir, fence_ms } => {
            kpve_node_agent::fence::watchdog(&dir, fence_ms)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("kpve {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Logs to stderr, filtered by RUST_LOG (default info).
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn server(args: ServerArgs) -> Result<ExitCode> {
    init_tracing();
    let node = match args.node {
        Some(node) => node,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    };
    let config = kpve_apiserver::ServerConfig {
        data_dir: args.data_dir.clone(),
        listen: args.kube_listen,
        node: node.clone(),
        bookmark_interval: std::time::Duration::from_secs(args.bookmark_interval.max(1)),
        history_window: std::time::Duration::from_secs(args.history_window),
        keep_revisions: args.keep_revisions.max(0),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let running = kpve_apiserver::start(config).await?;
        let server_url = format!("https://{}", running.address);
        let ca = args.data_dir.join("ca.crt");
        let pve = kpve_api::server::PveApiConfig {
            data_dir: args.data_dir.clone(),
            listen: args.pve_listen,
            tls: match (&args.pve_tls_cert, &args.pve_tls_key) {
                (Some(cert), Some(key)) => kpve_apiserver::pki::tls_config_from(cert, key)?,
                _ => kpve_apiserver::pki::server_tls_config(&args.data_dir)?,
            },
            client: kube_client(&server_url, &running.admin_token, &ca)?,
        };
        let (pve_address, pve_task) =
            kpve_api::server::start(pve).await.context("starting the Proxmox VE API")?;
        eprintln!("kpve: Proxmox VE API listening on https://{pve_address}/api2/json");
        tokio::spawn(async move {
            if let Ok(Err(e)) = pve_task.await {
                tracing::error!(error = %e, "Proxmox VE API stopped");
            }
        });
        if let Some(dir) = &args.pve_fs {
            mount_pve_fs(kube_client(&server_url, &running.admin_token, &ca)?, &node, dir).await?;
        }
        if !args.no_controllers {
            let admin = kube_client(&server_url, &running.admin_token, &ca)?;
            tokio::spawn(async move {
                if let Err(e) = kpve_controllers::run(admin, Default::default()).await {
                    tracing::error!(error = %e, "controllers stopped");
                }
            });
        }
        if !args.no_agent {
            let token = std::fs::read_to_string(args.data_dir.join("node-token"))?;
            let client = kube_client(&server_url, token.trim(), &ca)?;
            let mut agent_config =
                kpve_node_agent::agent::AgentConfig::new(node.clone(), args.data_dir.clone());
            agent_config.ha = args.ha_profile.profile();
            if !args.kube_listen.ip().is_unspecified() {
                agent_config.migration_address = args.kube_listen.ip();
            }
            tokio::spawn(async move {
                if let Err(e) = kpve_node_agent::agent::run(client, agent_config).await {
                    tracing::error!(error = %e, "node agent stopped");
                }
            });
        }
        running.task.await.context("server task")?
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Mounts the /etc/pve view at `dir`, reading and writing as `client`'s identity. It stays
/// mounted while the process runs; SIGTERM or SIGINT unmounts it and ends the process.
async fn mount_pve_fs(client: kube::Client, node: &str, dir: &Path) -> Result<()> {
    let view = std::sync::Arc::new(kpve_api::pmxcfs::View::start(client, node).await?);
    let session = kpve_api::pmxcfs::fs::mount(view, dir, tokio::runtime::Handle::current())
        .with_context(|| format!("mounting the /etc/pve view at {}", dir.display()))?;
    eprintln!("kpve: /etc/pve view mounted at {}", dir.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        match tokio::task::spawn_blocking(move || session.umount_and_join()).await {
            Ok(Ok(())) => eprintln!("kpve: /etc/pve view unmounted"),
            Ok(Err(e)) => eprintln!("kpve: unmounting the /etc/pve view: {e}"),
            Err(e) => eprintln!("kpve: unmounting the /etc/pve view: {e}"),
        }
        std::process::exit(0);
    });
    Ok(())
}

/// The local address this host uses to reach `server` (a URL): where other nodes reach it.
fn address_towards(server: &str) -> Result<std::net::IpAddr> {
    let authority = server.split_once("://").map_or(server, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port.parse().context("--server: bad port")?),
        _ => (authority, 443),
    };
    let host = host.trim_matches(['[', ']']);
    let remote = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    // Connecting a UDP socket sends nothing; it only picks the route and the source address.
    let local = if remote.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(remote).with_context(|| format!("no route to {remote}"))?;
    Ok(socket.local_addr()?.ip())
}

/// A kube client for `server` with a bearer token, trusting `ca`.
fn kube_client(server: &str, token: &str, ca: &Path) -> Result<kube::Client> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut config = kube::Config::new(server.parse().context("--server must be a URL")?);
    let certs =
        kpve_apiserver::pki::pem_certs(&pem).with_context(|| format!("{} is not PEM", ca.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", ca.display());
    config.root_cert = Some(certs);
    config.auth_info.token = Some(token.to_string().into());
    kube::Client::try_from(config).context("building the API client")
}

fn agent(args: AgentArgs) -> Result<ExitCode> {
    init_tracing();
    let credentials = join::agent_credentials(
        &args.data_dir.join("agent"),
        args.token.as_deref(),
        args.token_file.as_deref(),
        args.ca_file.as_deref(),
    )?;
    let ca = credentials.ca_file.clone();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let client = kube_client(&args.server, &credentials.bearer, &ca)?;
        if let Some(dir) = &args.pve_fs {
            let client = match &args.pve_fs_token {
                Some(file) => {
                    let token = std::fs::read_to_string(file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    kube_client(&args.server, token.trim(), &ca)?
                }
                None => client.clone(),
            };
            mount_pve_fs(client, &args.node, dir).await?;
        }
        let mut config = kpve_node_agent::agent::AgentConfig::new(args.node, args.data_dir);
        config.ha = args.ha_profile.profile();
        config.migration_address = match args.migration_address {
            Some(address) => address,
            None => address_towards(&args.server)?,
        };
        kpve_node_agent::agent::run(client, config).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn pve_api(args: PveApiArgs) -> Result<ExitCode> {
    init_tracing();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let (cert, key) = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => (cert, key),
        _ => {
            let cert = args.data_dir.join("pve-ssl.pem");
            let key = args.data_dir.join("pve-ssl.key");
            kpve_apiserver::pki::ensure_self_signed(&cert, &key, "kpve Proxmox VE API")?;
            (cert, key)
        }
    };
    let tls = kpve_apiserver::pki::tls_config_from(&cert, &key)?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let client = kube_client(&args.server, token.trim(), &args.ca_file)?;
        let config =
            kpve_api::server::PveApiConfig { data_dir: args.data_dir, listen: args.listen, tls, client };
        let (address, task) = kpve_api::server::start(config).await.context("starting the Proxmox VE API")?;
        eprintln!("kpve: Proxmox VE API listening on https://{address}/api2/json");
        tokio::select! {
            r = task => r.context("the Proxmox VE API task")?,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn not_built(name: &str, what: &str) -> Result<ExitCode> {
    bail!("`kpve {name}` is not built yet: {what} is still to come; see docs/ARCHITECTURE.md")
}

fn crdgen(out: &Path, check: bool) -> Result<ExitCode> {
    let files = kpve_crds::crdgen::files();
    if check {
        let mut stale = Vec::new();
        for (name, text) in &files {
            let path = out.join(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(path.display().to_string());
            }
        }
        if stale.is_empty() {
            println!("{} CRDs in {} are up to date", files.len(), out.display());
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("kpve: CRDs out of date (run `kpve crdgen`): {}", stale.join(", "));
        return Ok(ExitCode::FAILURE);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, text) in &files {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
