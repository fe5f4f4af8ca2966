//! Shared helpers for kpve's benchmark binaries.

use std::path::Path;
use std::time::Duration;

/// p-th percentile (0–100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Median of unsorted values.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `label  p50 … p95 … p99 … max …  (n=…)` of `samples`, which it sorts.
pub fn summary(label: &str, samples: &mut [Duration]) -> String {
    samples.sort();
    format!(
        "{label:<40} p50 {:>8.3} ms  p95 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms  (n={})",
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 95.0)),
        ms(percentile(samples, 99.0)),
        ms(samples.last().copied().unwrap_or_default()),
        samples.len()
    )
}

/// The whole of `kpve server` in this process, in `dir`: API server, controllers, and a node
/// agent for node `bench` authenticating with its node token. Returns an admin client once
/// the node has registered.
pub async fn in_process_server(dir: &Path) -> kube::Client {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = kpve_apiserver::ServerConfig {
        data_dir: dir.into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        node: "bench".into(),
        bookmark_interval: Duration::from_secs(60),
        history_window: kpve_apiserver::gc::HISTORY_WINDOW,
        keep_revisions: kpve_apiserver::gc::KEEP_REVISIONS,
    };
    // The server task runs on, detached, for the life of the process.
    kpve_apiserver::start(config).await.unwrap();
    let client_config = |token: Option<String>| async move {
        let kc = kube::config::Kubeconfig::read_from(dir.join("kubeconfig")).unwrap();
        let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        if let Some(token) = token {
            config.auth_info.token = Some(token.trim().to_string().into());
        }
        config
    };
    let client = kube::Client::try_from(client_config(None).await).unwrap();
    let node_token = std::fs::read_to_string(dir.join("node-token")).unwrap();
    let node_client = kube::Client::try_from(client_config(Some(node_token)).await).unwrap();
    tokio::spawn(kpve_controllers::run(client.clone(), Default::default()));
    tokio::spawn(kpve_node_agent::agent::run(
        node_client,
        kpve_node_agent::agent::AgentConfig::new("bench", dir),
    ));
    let hvs: kube::Api<kpve_crds::Hypervisor> = kube::Api::all(client.clone());
    while hvs.get_opt("bench").await.unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
}

/// `kpve server` (API server and controllers, no agent) in `dir` as its own process, and
/// `kpve agent` processes joined to it: what the multi-node benchmarks run.
pub struct Processes {
    pub dir: std::path::PathBuf,
    pub port: u16,
    pub server: std::process::Child,
    /// `kpve agent --ha-profile` of the agents.
    pub profile: String,
}

/// The `kpve` binary next to the running benchmark binary.
pub fn kpve() -> std::path::PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().join("kpve")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Processes {
    /// Starts the server in `dir` and waits for its kubeconfig.
    pub async fn start(dir: &Path, profile: &str) -> Processes {
        use std::process::{Command, Stdio};
        let port = free_port();
        let server = Command::new(kpve())
            .args(["server", "--no-agent", "--node", "bench"])
            .arg("--data-dir")
            .arg(dir)
            .arg("--kube-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--pve-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !dir.join("kubeconfig").exists() {
            assert!(std::time::Instant::now() < deadline, "the server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Processes { dir: dir.into(), port, server, profile: profile.into() }
    }

    /// The agent data directory of `node`.
    pub fn agent_dir(&self, node: &str) -> std::path::PathBuf {
        self.dir.join(format!("agent-{node}"))
    }

    /// Starts `kpve agent` for `node` (joined with a node token the first time).
    pub fn spawn_agent(&self, node: &str) -> std::process::Child {
        use std::process::{Command, Stdio};
        let token_file = self.dir.join(format!("token-{node}"));
        if !token_file.exists() {
            let out = Command::new(kpve())
                .args(["token", "create", "--role", "node", "--node", node, "--data-dir"])
                .arg(&self.dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::fs::write(&token_file, out.stdout).unwrap();
        }
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agents.log")).unwrap();
        Command::new(kpve())
            .args(["agent", "--node", node, "--ha-profile", &self.profile])
            .arg("--server")
            .arg(format!("https://127.0.0.1:{}", self.port))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--data-dir")
            .arg(self.agent_dir(node))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Two hosts, `n1` and `n2`, each with its own `local` pool directory (the pool's shared
    /// path dropped): their agents, started and registered. `before_agents` runs first (an
    /// agent directory prepared: a template put in place).
    pub async fn two_hosts(
        &self,
        client: &kube::Client,
        before_agents: impl FnOnce(),
    ) -> [std::process::Child; 2] {
        use kube::api::{Api, Patch, PatchParams};
        let pools: Api<kpve_crds::StoragePool> = Api::all(client.clone());
        let drop_path = serde_json::json!([{"op": "remove", "path": "/spec/path"}]);
        pools
            .patch(
                "local",
                &PatchParams::default(),
                &Patch::<()>::Json(serde_json::from_value(drop_path).unwrap()),
            )
            .await
            .unwrap();
        before_agents();
        let agents = [self.spawn_agent("n1"), self.spawn_agent("n2")];
        let hvs: Api<kpve_crds::Hypervisor> = Api::all(client.clone());
        while hvs.list(&Default::default()).await.map(|l| l.items.len()).unwrap_or(0) < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        agents
    }

    /// An admin client (the server's kubeconfig).
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(self.dir.join("kubeconfig")).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// Stops the server and every process started under its directory.
    pub fn stop(mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("pkill").arg("-9").arg("-f").arg(&self.dir).status();
    }
}
