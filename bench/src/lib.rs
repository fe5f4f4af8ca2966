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
