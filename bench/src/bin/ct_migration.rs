//! Restart migration of a container: `kpve server` and two `kpve agent` processes (each with
//! its own `local` pool, as two hosts have), one running busybox container (unprivileged, its
//! rootfs and a mount point with 16 MiB of data on `local`); its placement is flipped between
//! the nodes again and again. Per round: the downtime the source reports
//! (`status.migration.downtimeMs`: stop and volume copy), the downtime seen from outside (lxc
//! shows the container running on neither node, sampled every few ms), and the time from the
//! placement change until it runs on the target.
//!
//! Side by side in the same run: the same restart migration by hand with lxc's and tar's
//! tools on the same config and volumes (`lxc-stop`, `tar | tar` of each volume, `lxc-start`),
//! no control plane — what `pct migrate --restart` does on one host, minus ssh.
//!
//! Usage (root, lxc installed; the `kpve` binary next to this one):
//!   cargo build && ./target/debug/ct_migration [ROUNDS]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kpve_bench::{Processes, ms, summary};
use kpve_crds::{LinuxContainer, MigrationPhase};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn running(lxcpath: &Path, vmid: u32) -> bool {
    let out = Command::new("lxc-info")
        .arg("-P")
        .arg(lxcpath)
        .args(["-n", &vmid.to_string(), "-s"])
        .current_dir("/")
        .output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("RUNNING"))
}

fn lxc(tool: &str, lxcpath: &Path, vmid: u32, args: &[&str]) {
    let out = Command::new(tool)
        .arg("-P")
        .arg(lxcpath)
        .args(["-n", &vmid.to_string()])
        .args(args)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Copies directory `src` to `dst` as the agents do (`tar -c | tar -x`, owners kept).
fn tar_copy(src: &Path, dst: &Path) {
    let _ = std::fs::remove_dir_all(dst);
    std::fs::create_dir_all(dst).unwrap();
    let script = format!(
        "tar -c -f - --sparse --numeric-owner --xattrs '--xattrs-include=*' --acls -C '{}' . | tar -x -p -f - --numeric-owner --xattrs '--xattrs-include=*' --acls -C '{}'",
        src.display(),
        dst.display()
    );
    assert!(Command::new("sh").arg("-c").arg(script).status().unwrap().success());
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let cluster = Processes::start(dir.path(), "default").await;
    let client = cluster.client().await;
    let cache = cluster.agent_dir("n1").join("storage/local/template/cache");
    let mut agents = cluster
        .two_hosts(&client, || {
            std::fs::create_dir_all(&cache).unwrap();
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/make-busybox-template.sh");
            let made = Command::new(script).arg(cache.join("bench-busybox.tar.gz")).output().unwrap();
            assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        })
        .await;
    let cts: Api<LinuxContainer> = Api::namespaced(client.clone(), "default");
    let ct: LinuxContainer = serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "LinuxContainer",
        "metadata": {"name": "mover"},
        "spec": {"powerState": "Running", "template": "local:vztmpl/bench-busybox.tar.gz",
                 "memory": 128, "swap": 0, "startup": {"down": 5},
                 "rootfs": {"pool": "local", "size": "1G"},
                 "mountPoints": [{"id": "mp0", "pool": "local", "size": "1G", "path": "/data"}],
                 "placement": {"nodes": ["n1"]}}
    }))
    .unwrap();
    let vmid = cts.create(&PostParams::default(), &ct).await.unwrap().spec.vmid.unwrap();
    let lxcpath = |node: &str| cluster.agent_dir(node).join("agent/run");
    let runs_on = |node: &str| running(&lxcpath(node), vmid);
    while !runs_on("n1") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lxc(
        "lxc-attach",
        &lxcpath("n1"),
        vmid,
        &["--", "/bin/sh", "-c", "dd if=/dev/urandom of=/data/blob bs=1M count=16 2>/dev/null"],
    );

    let (mut reported, mut seen, mut walls) = (Vec::new(), Vec::new(), Vec::new());
    let mut on = "n1";
    for round in 0..rounds {
        let to = if on == "n1" { "n2" } else { "n1" };
        let t0 = Instant::now();
        let patch = json!({"spec": {"placement": {"nodes": [to]}}});
        cts.patch("mover", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        // Sampled: when it stopped running on the source, when it ran on the target.
        let mut stopped = None;
        let up = loop {
            let (source, target) = (runs_on(on), runs_on(to));
            assert!(!(source && target), "round {round}: running on both nodes");
            if !source && stopped.is_none() {
                stopped = Some(Instant::now());
            }
            if target {
                break Instant::now();
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "round {round}: no move within 60 s");
        };
        let m = cts.get("mover").await.unwrap().status.unwrap_or_default().migration.unwrap();
        assert_eq!(m.phase, MigrationPhase::Completed, "round {round}: {:?}", m.message);
        let outside = up - stopped.unwrap_or(up);
        eprintln!(
            "round {round}: {on} -> {to}: reported {} ms, seen {:.0} ms, placement change -> running {:.0} ms, {} bytes",
            m.downtime_ms.unwrap_or(0),
            ms(outside),
            ms(up - t0),
            m.transferred_bytes.unwrap_or(0)
        );
        reported.push(Duration::from_millis(m.downtime_ms.unwrap_or(0)));
        seen.push(outside);
        walls.push(up - t0);
        on = to;
        // The next round starts once the status says it runs there, as a user would see it.
        loop {
            let status = cts.get("mover").await.unwrap().status.unwrap_or_default();
            if status.node.as_deref() == Some(to) && status.phase == kpve_crds::GuestPhase::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Raw baseline: the agents gone (the container keeps running), the same move by hand.
    for agent in &mut agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let volumes = |node: &str| cluster.agent_dir(node).join(format!("storage/local/images/{vmid}"));
    let mut raw = Vec::new();
    for round in 0..rounds.max(5) {
        let to = if on == "n1" { "n2" } else { "n1" };
        let config = std::fs::read_to_string(lxcpath(on).join(format!("{vmid}/config"))).unwrap();
        let t0 = Instant::now();
        lxc("lxc-stop", &lxcpath(on), vmid, &["-t", "5"]);
        let names: Vec<PathBuf> =
            std::fs::read_dir(volumes(on)).unwrap().flatten().map(|e| e.path()).collect();
        for src in &names {
            tar_copy(src, &volumes(to).join(src.file_name().unwrap()));
        }
        let run = lxcpath(to).join(vmid.to_string());
        std::fs::create_dir_all(&run).unwrap();
        let from = cluster.agent_dir(on).display().to_string();
        let into = cluster.agent_dir(to).display().to_string();
        std::fs::write(run.join("config"), config.replace(&from, &into)).unwrap();
        let seccomp = lxcpath(on).join(format!("{vmid}/rules.seccomp"));
        std::fs::copy(&seccomp, run.join("rules.seccomp")).unwrap();
        lxc("lxc-start", &lxcpath(to), vmid, &["-d"]);
        while !runs_on(to) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = t0.elapsed();
        eprintln!("raw round {round}: {on} -> {to}: {:.0} ms", ms(took));
        raw.push(took);
        let _ = std::fs::remove_dir_all(volumes(on));
        on = to;
    }
    lxc("lxc-stop", &lxcpath(on), vmid, &["-k"]);
    cluster.stop();

    println!(
        "busybox container (rootfs + mp0 with 16 MiB of data, local pools), {rounds} restart migrations"
    );
    println!("{}", summary("kpve downtime reported (stop + copy)", &mut reported));
    println!("{}", summary("kpve downtime seen (running on neither node)", &mut seen));
    println!("{}", summary("raw lxc-stop + tar|tar + lxc-start", &mut raw));
    println!("{}", summary("kpve placement change -> running on target", &mut walls));
}
