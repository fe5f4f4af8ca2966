//! Live-migration downtime of an idle VM: `kpve server` and two `kpve agent` processes (each
//! with its own `local` pool, as two hosts have), one running KVM VM with a 64 MiB qcow2 disk
//! that idles in its firmware; its placement is flipped between the nodes again and again,
//! and each migration's downtime (QEMU's measure, as the source reports it in
//! `status.migration.downtimeMs`) and the time from the placement change until the VM is bound
//! to the target are recorded.
//!
//! Side by side in the same run: the same migration done directly over QMP between two QEMU
//! processes on the same command line (no control plane): its downtime and total time.
//!
//! Usage (root, QEMU installed; the `kpve` binary next to this one):
//!   cargo build --release && cargo run --release -p kpve-bench --bin migration -- [ROUNDS]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kpve_bench::{Processes, ms, summary};
use kpve_crds::{MigrationPhase, VirtualMachine};
use kpve_node_agent::qemu::migration;
use kpve_node_agent::qemu::qmp::Qmp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

async fn wait_qmp(socket: &Path) -> Qmp {
    Qmp::connect(socket, Duration::from_secs(10)).await.unwrap()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let cluster = Processes::start(dir.path(), "default").await;
    let client = cluster.client().await;
    // Two hosts have two `local` directories: the pool has no shared path.
    let mut agents = cluster.two_hosts(&client, || {}).await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "idle"},
        "spec": {"powerState": "Running", "cpu": {"cores": 1}, "memory": {"size": 256},
                 "startup": {"down": 0}, "placement": {"nodes": ["n1"]},
                 "disks": [{"id": "virtio0", "pool": "local", "size": "64M", "format": "qcow2"}]}
    }))
    .unwrap();
    let vmid = vms.create(&PostParams::default(), &vm).await.unwrap().spec.vmid.unwrap();
    loop {
        let vm = vms.get("idle").await.unwrap();
        if vm.status.as_ref().is_some_and(|s| s.phase == kpve_crds::GuestPhase::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checkpoint = cluster.agent_dir("n1").join(format!("agent/run/{vmid}/guest.json"));
    let cp: serde_json::Value = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    let argv: Vec<String> =
        cp["launch"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let accel = cp["accelerator"].as_str().unwrap_or("?").to_string();

    let mut downtimes = Vec::new();
    let mut totals = Vec::new();
    let mut walls = Vec::new();
    let mut on = "n1";
    for round in 0..rounds {
        let to = if on == "n1" { "n2" } else { "n1" };
        let t0 = Instant::now();
        let patch = json!({"spec": {"placement": {"nodes": [to]}}});
        vms.patch("idle", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        let m = loop {
            let vm = vms.get("idle").await.unwrap();
            let status = vm.status.unwrap_or_default();
            if let Some(m) = status.migration.filter(|m| m.target == to && m.phase.is_final())
                && (m.phase == MigrationPhase::Failed || status.node.as_deref() == Some(to))
            {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let wall = t0.elapsed();
        assert_eq!(m.phase, MigrationPhase::Completed, "round {round}: {:?}", m.message);
        eprintln!(
            "round {round}: {on} -> {to}: downtime {} ms, QEMU total {} ms, placement change -> bound {:.0} ms",
            m.downtime_ms.unwrap_or(0),
            m.total_ms.unwrap_or(0),
            ms(wall)
        );
        downtimes.push(Duration::from_millis(m.downtime_ms.unwrap_or(0)));
        totals.push(Duration::from_millis(m.total_ms.unwrap_or(0)));
        walls.push(wall);
        on = to;
        // The next round starts once the VM runs on its new node, as a user would see it.
        loop {
            let vm = vms.get("idle").await.unwrap();
            if vm.status.as_ref().is_some_and(|s| s.phase == kpve_crds::GuestPhase::Running) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Raw baseline: two QEMUs on the same command line, migrated directly over QMP.
    let template = argv.iter().position(|a| a == "-pidfile").map(|i| PathBuf::from(&argv[i + 1])).unwrap();
    let template = template.parent().unwrap().display().to_string();
    let images = cluster.agent_dir(on).join("storage/local/images").join(vmid.to_string());
    let disk = std::fs::read_dir(&images).unwrap().flatten().next().unwrap().path();
    let mut raw_down = Vec::new();
    let mut raw_total = Vec::new();
    for i in 0..rounds.max(5) {
        let raw = dir.path().join(format!("raw-{i}"));
        let (src, dst) = (raw.join("src"), raw.join("dst"));
        for d in [&src, &dst] {
            std::fs::create_dir_all(d).unwrap();
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(d.join("disk.qcow2"))
                .arg("64M")
                .status()
                .unwrap();
            assert!(out.success());
        }
        let args = |run: &Path| -> Vec<String> {
            argv.iter()
                .map(|a| a.replace(&template, &run.display().to_string()))
                .map(|a| {
                    a.replace(&disk.display().to_string(), &run.join("disk.qcow2").display().to_string())
                })
                .collect()
        };
        let mut source = Command::new("qemu-system-x86_64")
            .args(args(&src))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut target = Command::new("qemu-system-x86_64")
            .args(args(&dst))
            .args(["-incoming", "defer"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut sq = wait_qmp(&src.join("qmp.sock")).await;
        let mut tq = wait_qmp(&dst.join("qmp.sock")).await;
        while sq.query_status().await.unwrap() != "running" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let disks = vec!["virtio0".to_string()];
        let incoming = migration::listen(&mut tq, "127.0.0.1".parse().unwrap(), &disks).await.unwrap();
        let outcome = migration::send(&mut sq, &incoming.uri, incoming.nbd.as_deref(), &disks).await.unwrap();
        raw_down.push(Duration::from_millis(outcome.downtime_ms));
        raw_total.push(Duration::from_millis(outcome.total_ms));
        let _ = source.kill();
        let _ = target.kill();
        let _ = source.wait();
        let _ = target.wait();
    }
    for agent in &mut agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    cluster.stop();

    println!("idle VM ({accel}, 256 MiB RAM, 64 MiB local qcow2 disk copied each time), {rounds} migrations");
    println!("{}", summary("kpve downtime (status.migration)", &mut downtimes));
    println!("{}", summary("raw QMP migration downtime", &mut raw_down));
    println!("{}", summary("kpve QEMU total time", &mut totals));
    println!("{}", summary("raw QMP migration total time", &mut raw_total));
    println!("{}", summary("kpve placement change -> bound to target", &mut walls));
}
