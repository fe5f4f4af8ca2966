//! Container start latency through the whole of `kpve server` in-process (API server,
//! scheduler, guest controller, node agent), side by side in the same run with a raw
//! `lxc-start -d` (which returns once the container runs) of the very config the agent rendered.
//!
//! - create → Running: from the create call returning to the API showing
//!   `status.phase: Running` (includes extracting the template into a new rootfs);
//! - power on: from the patch to `powerState: Running` returning to `phase: Running`, for an
//!   existing container (what a raw `lxc-start` of the same config does).
//!
//! Usage (root, lxc and busybox-static installed):
//!   cargo run --release -p kpve-bench --bin ct_start [-- RUNS]

use std::path::Path;
use std::time::{Duration, Instant};

use kpve_bench::{ms, percentile, summary};
use kpve_crds::LinuxContainer;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

async fn phase_reached(api: &Api<LinuxContainer>, name: &str, phase: &str, t0: Instant) -> Duration {
    loop {
        let ct = api.get(name).await.unwrap();
        let status = ct.status.as_ref();
        if status.is_some_and(|s| format!("{:?}", s.phase) == phase) {
            return t0.elapsed();
        }
        if let Some(stalled) = status.and_then(|s| {
            s.conditions.iter().find(|c| c.type_ == "Stalled" && c.status == kpve_crds::ConditionStatus::True)
        }) {
            panic!("{name} stalled: {}", stalled.message);
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{name} never reached {phase}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn lxc(tool: &str, lxcpath: &Path, name: &str, args: &[&str]) {
    let out = std::process::Command::new(tool)
        .arg("-P")
        .arg(lxcpath)
        .args(["-n", name])
        .args(args)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
}

fn manifest(name: &str, power: &str) -> LinuxContainer {
    serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "LinuxContainer",
        "metadata": {"name": name},
        "spec": {"powerState": power, "template": "local:vztmpl/bench.tar.gz", "memory": 128, "swap": 0,
                 "rootfs": {"pool": "local", "size": "1G"}, "startup": {"down": 0}}
    }))
    .unwrap()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("storage/local/template/cache");
    std::fs::create_dir_all(&cache).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/make-busybox-template.sh");
    let out = std::process::Command::new(script).arg(cache.join("bench.tar.gz")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client = kpve_bench::in_process_server(dir.path()).await;
    let cts: Api<LinuxContainer> = Api::namespaced(client, "default");
    let apply = PatchParams::default();

    // create → Running, a new container (and rootfs) each time.
    let mut create_lat = Vec::new();
    for i in 0..runs + 1 {
        let name = format!("new{i}");
        cts.create(&PostParams::default(), &manifest(&name, "Running")).await.unwrap();
        let elapsed = phase_reached(&cts, &name, "Running", Instant::now()).await;
        if i > 0 {
            create_lat.push(elapsed); // the first run warms the page cache
        }
        cts.delete(&name, &DeleteParams::default()).await.unwrap();
        while cts.get_opt(&name).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // power on an existing container.
    cts.create(&PostParams::default(), &manifest("power", "Stopped")).await.unwrap();
    phase_reached(&cts, "power", "Stopped", Instant::now()).await;
    let mut power_lat = Vec::new();
    for i in 0..runs + 1 {
        let t0 = Instant::now();
        cts.patch("power", &apply, &Patch::Merge(json!({"spec": {"powerState": "Running"}}))).await.unwrap();
        let elapsed = phase_reached(&cts, "power", "Running", t0).await;
        if i > 0 {
            power_lat.push(elapsed);
        }
        cts.patch("power", &apply, &Patch::Merge(json!({"spec": {"powerState": "Stopped"}}))).await.unwrap();
        phase_reached(&cts, "power", "Stopped", Instant::now()).await;
    }

    // Raw: the agent's rendered config, its paths moved to a raw lxcpath, on the same rootfs.
    let vmid = cts.get("power").await.unwrap().spec.vmid.unwrap();
    let agent_run = dir.path().join(format!("agent/run/{vmid}"));
    let raw_path = dir.path().join("raw");
    let raw_ct = raw_path.join("raw");
    std::fs::create_dir_all(&raw_ct).unwrap();
    let config = std::fs::read_to_string(agent_run.join("config")).unwrap();
    std::fs::write(
        raw_ct.join("config"),
        config.replace(&agent_run.display().to_string(), &raw_ct.display().to_string()),
    )
    .unwrap();
    std::fs::copy(agent_run.join("rules.seccomp"), raw_ct.join("rules.seccomp")).unwrap();
    let mut raw_lat = Vec::new();
    for i in 0..runs + 1 {
        let t0 = Instant::now();
        // Daemonized, lxc-start returns once the container runs.
        lxc("lxc-start", &raw_path, "raw", &["-d"]);
        let elapsed = t0.elapsed();
        lxc("lxc-wait", &raw_path, "raw", &["-s", "RUNNING", "-t", "0"]);
        if i > 0 {
            raw_lat.push(elapsed);
        }
        lxc("lxc-stop", &raw_path, "raw", &["-k"]);
    }
    cts.delete("power", &DeleteParams::default()).await.unwrap();

    let p95 = |v: &mut Vec<Duration>| {
        v.sort();
        percentile(v, 95.0)
    };
    println!("runs={runs} (after one warm-up each), busybox template, unprivileged, 128 MiB, no NIC");
    println!("{}", summary("kpve: create -> phase Running", &mut create_lat));
    println!("{}", summary("kpve: powerState Running -> phase Running", &mut power_lat));
    println!("{}", summary("raw lxc-start -d (returns when RUNNING)", &mut raw_lat));
    println!("p95 ratio power-on kpve / raw: {:.2}", ms(p95(&mut power_lat)) / ms(p95(&mut raw_lat)));
    println!(
        "p50 ratio power-on kpve / raw: {:.2}",
        ms(percentile(&power_lat, 50.0)) / ms(percentile(&raw_lat, 50.0))
    );
}
