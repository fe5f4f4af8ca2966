//! VM start latency: from the create call returning (the API accepted the VM) to QMP reporting
//! `running`, through the whole of `kpve server` in-process (API server, scheduler, guest
//! controller, node agent), side by side in the same run with a raw `qemu-system-x86_64` start
//! of the same command line up to QMP `running`.
//!
//! Usage (root, QEMU installed): cargo run --release -p kpve-bench --bin vm_start [-- RUNS]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kpve_bench::{ms, percentile, summary};
use kpve_crds::VirtualMachine;
use kpve_node_agent::qemu::qmp::Qmp;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

async fn qmp_running(socket: &Path, deadline: Instant) -> Duration {
    let start = Instant::now();
    loop {
        assert!(Instant::now() < deadline, "QMP never reported running at {}", socket.display());
        if let Ok(mut q) = Qmp::connect(socket, Duration::from_millis(1)).await
            && q.query_status().await.is_ok_and(|s| s == "running")
        {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let client = kpve_bench::in_process_server(dir.path()).await;

    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let mut kpve_lat = Vec::new();
    let mut argv: Vec<String> = Vec::new();
    for i in 0..runs + 1 {
        let name = format!("start{i}");
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"powerState": "Running", "cpu": {"cores": 1}, "memory": {"size": 128},
                     "startup": {"down": 0}}
        }))
        .unwrap();
        let created = vms.create(&PostParams::default(), &vm).await.unwrap();
        let t0 = Instant::now();
        let vmid = created.spec.vmid.unwrap();
        let run_dir = dir.path().join(format!("agent/run/{vmid}"));
        let elapsed = {
            let socket = run_dir.join("qmp.sock");
            while !socket.exists() {
                tokio::time::sleep(Duration::from_micros(500)).await;
                assert!(t0.elapsed() < Duration::from_secs(30), "QEMU never started for {name}");
            }
            qmp_running(&socket, Instant::now() + Duration::from_secs(30)).await;
            t0.elapsed()
        };
        if i > 0 {
            // The first start warms caches (page cache of the QEMU binary and firmware).
            kpve_lat.push(elapsed);
        }
        // The argv the agent ran, for the raw baseline.
        let deadline = Instant::now() + Duration::from_secs(10);
        while argv.is_empty() && Instant::now() < deadline {
            if let Ok(text) = std::fs::read(run_dir.join("guest.json")) {
                let cp: serde_json::Value = serde_json::from_slice(&text).unwrap();
                argv = cp["launch"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        vms.delete(&name, &DeleteParams::default()).await.unwrap();
        while vms.get_opt(&name).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Raw: the same command line, its own run dir, straight from a shell-less spawn.
    let raw_dir = dir.path().join("raw");
    let mut raw_lat = Vec::new();
    for i in 0..runs + 1 {
        let run = raw_dir.join(i.to_string());
        std::fs::create_dir_all(&run).unwrap();
        let template = argv_run_dir(&argv);
        let args: Vec<String> = argv
            .iter()
            .map(|a| a.replace(&template.display().to_string(), &run.display().to_string()))
            .collect();
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new("qemu-system-x86_64")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let socket = run.join("qmp.sock");
        while !socket.exists() {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        qmp_running(&socket, Instant::now() + Duration::from_secs(30)).await;
        if i > 0 {
            raw_lat.push(t0.elapsed());
        }
        child.kill().await.unwrap();
    }
    let p95 = |v: &mut Vec<Duration>| {
        v.sort();
        percentile(v, 95.0)
    };
    let ratio = ms(p95(&mut kpve_lat)) / ms(p95(&mut raw_lat));
    println!("runs={runs} (after one warm-up each), accelerator from the host, 128 MiB, no disks");
    println!("{}", summary("kpve: create returned -> QMP running", &mut kpve_lat));
    println!("{}", summary("raw qemu-system-x86_64 -> QMP running", &mut raw_lat));
    println!("p95 ratio kpve / raw: {ratio:.2}");
}

/// The run directory the agent put into the command line (the `-pidfile` argument's parent).
fn argv_run_dir(argv: &[String]) -> PathBuf {
    let pos = argv.iter().position(|a| a == "-pidfile").expect("argv has -pidfile");
    Path::new(&argv[pos + 1]).parent().unwrap().to_path_buf()
}
