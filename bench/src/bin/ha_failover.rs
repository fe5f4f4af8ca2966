//! HA recovery time: `kpve server` (API server and controllers) and three `kpve agent`
//! processes with one HA VM; the agent of the VM's node is killed with -9 again and again, and
//! each time the clock runs from the kill to QMP `running` on the node the CRM recovered it
//! to. The killed agent is then started again (same state directory) before the next round.
//!
//! Side by side in the same run: the floor any lease-based recovery has — the profile's lease
//! duration plus a raw `qemu-system-x86_64` start of the same command line to QMP `running`.
//!
//! Usage (root, QEMU installed; the `kpve` binary next to this one):
//!   cargo build --release && cargo run --release -p kpve-bench --bin ha_failover -- [fast|default] [ROUNDS]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kpve_bench::{Processes, ms, percentile, summary};
use kpve_crds::VirtualMachine;
use kpve_node_agent::qemu::qmp::Qmp;
use kube::api::{Api, PostParams};
use serde_json::json;

const NODES: [&str; 3] = ["n1", "n2", "n3"];

async fn qmp_running(socket: &Path) -> bool {
    match Qmp::connect(socket, Duration::from_millis(200)).await {
        Ok(mut q) => q.query_status().await.is_ok_and(|s| s == "running"),
        Err(_) => false,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let profile = std::env::args().nth(1).unwrap_or_else(|| "fast".into());
    let rounds: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let lease = match profile.as_str() {
        "fast" => kpve_ha::Profile::FAST.lease,
        "default" => kpve_ha::Profile::DEFAULT.lease,
        other => panic!("unknown profile {other}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let agents = Processes::start(dir.path(), &profile).await;
    let mut children: std::collections::BTreeMap<String, Child> =
        NODES.iter().map(|n| (n.to_string(), agents.spawn_agent(n))).collect();
    let client = agents.client().await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let hvs: Api<kpve_crds::Hypervisor> = Api::all(client.clone());
    while hvs.list(&Default::default()).await.map(|l| l.items.len()).unwrap_or(0) < NODES.len() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "ha"},
        "spec": {"powerState": "Running", "cpu": {"cores": 1}, "memory": {"size": 128},
                 "startup": {"down": 0}, "ha": {"state": "started"}}
    }))
    .unwrap();
    let vmid = vms.create(&PostParams::default(), &vm).await.unwrap().spec.vmid.unwrap();
    let running_on = |node: &str| agents.agent_dir(node).join(format!("agent/run/{vmid}/qmp.sock"));

    // Where it runs now, once QMP says so.
    async fn placed(
        vms: &Api<VirtualMachine>,
        not: Option<&str>,
        socket: impl Fn(&str) -> PathBuf,
    ) -> String {
        loop {
            let vm = vms.get("ha").await.unwrap();
            if let Some(node) = vm.status.as_ref().and_then(|s| s.node.clone())
                && Some(node.as_str()) != not
                && qmp_running(&socket(&node)).await
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let mut recoveries = Vec::new();
    let mut argv: Vec<String> = Vec::new();
    let mut node = placed(&vms, None, running_on).await;
    for round in 0..rounds {
        if argv.is_empty() {
            // The agent checkpoints the command line right after QEMU answers.
            let checkpoint = agents.agent_dir(&node).join(format!("agent/run/{vmid}/guest.json"));
            let text = loop {
                match std::fs::read(&checkpoint) {
                    Ok(text) => break text,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            let cp: serde_json::Value = serde_json::from_slice(&text).unwrap();
            argv = cp["launch"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
        }
        let mut agent = children.remove(&node).unwrap();
        agent.kill().unwrap();
        agent.wait().unwrap();
        let t0 = Instant::now();
        let next = placed(&vms, Some(&node), running_on).await;
        let took = t0.elapsed();
        eprintln!("round {round}: {node} -> {next} in {:.2} s", took.as_secs_f64());
        recoveries.push(took);
        // Bring the killed node back and wait until it renews its lease again.
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), "kube-node-lease");
        let renew =
            |l: k8s_openapi::api::coordination::v1::Lease| l.spec.and_then(|s| s.renew_time).map(|t| t.0);
        let before = renew(leases.get(&node).await.unwrap());
        children.insert(node.clone(), agents.spawn_agent(&node));
        while renew(leases.get(&node).await.unwrap()) == before {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The CRM calls a node online again at its next look.
        tokio::time::sleep(Duration::from_millis(500)).await;
        node = next;
    }

    // Raw baseline: the same QEMU command line to QMP running.
    let raw_dir = dir.path().join("raw");
    let template = argv.iter().position(|a| a == "-pidfile").map(|i| PathBuf::from(&argv[i + 1])).unwrap();
    let template = template.parent().unwrap().display().to_string();
    let mut raw = Vec::new();
    for i in 0..rounds.max(5) {
        let run = raw_dir.join(i.to_string());
        std::fs::create_dir_all(&run).unwrap();
        let args: Vec<String> =
            argv.iter().map(|a| a.replace(&template, &run.display().to_string())).collect();
        let t0 = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while !qmp_running(&run.join("qmp.sock")).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        raw.push(t0.elapsed());
        child.kill().unwrap();
        child.wait().unwrap();
    }
    for child in children.values_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    agents.stop();

    raw.sort();
    recoveries.sort();
    let floor = Duration::from_millis(lease) + percentile(&raw, 50.0);
    println!(
        "profile={profile} rounds={rounds}: kill -9 of the HA VM's agent -> QMP running on another node"
    );
    println!("{}", summary("kpve recovery", &mut recoveries.clone()));
    println!("{}", summary("raw qemu-system-x86_64 -> QMP running", &mut raw.clone()));
    println!(
        "floor (lease {} ms + raw start p50): {:.0} ms; kpve p50 / floor = {:.2}, p95 = {:.0} ms",
        lease,
        ms(floor),
        ms(percentile(&recoveries, 50.0)) / ms(floor),
        ms(percentile(&recoveries, 95.0))
    );
}
