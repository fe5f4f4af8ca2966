//! Firewall benchmarks, run inside a network namespace of their own (the binary re-executes
//! itself under `ip netns exec`, so the host's tables are never touched):
//!
//! 1. Reload of a 10,000-rule ruleset: kpve's path when an input changes (compile the inputs,
//!    serialize, `nft -j -f -` through the agent's client) side by side with a raw
//!    `nft -j -f FILE` of the very document, interleaved run by run. Two shapes: rules that
//!    alternate ACCEPT/DROP (nothing merges: 10,000 nft rules) and an allow list (consecutive
//!    same-verdict rules merge into one set lookup).
//! 2. Change → enforced: the whole of `kpve server` in-process; an IPSet used by a host rule is
//!    edited (the agent updates just the set's elements), then a cluster rule (the agent
//!    reloads both tables); measured is the time from the write returning until the node's
//!    Hypervisor status reports that generation in force (written after `nft` returned), with
//!    100 and with 10,000 other rules loaded.
//!
//! Usage (root, nftables installed):
//!   cargo run --release -p kpve-bench --bin fw_reload [-- RUNS [reload-only]]

use std::process::Command;
use std::time::{Duration, Instant};

use kpve_bench::{ms, percentile, summary};
use kpve_crds::codec::fw::parse_rule;
use kpve_crds::{ClusterFirewallSpec, FirewallRule, Hypervisor, IPSet};
use kpve_node_agent::firewall::{Inputs, compile, nft};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

// The allocator the kpve binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NETNS_ENV: &str = "KPVE_BENCH_NETNS";

fn rules(n: usize, alternate: bool) -> Vec<FirewallRule> {
    (0..n)
        .map(|i| {
            let action = if alternate && i % 2 == 1 { "DROP" } else { "ACCEPT" };
            let line = format!(
                "IN {action} -source 10.{}.{}.{} -p tcp -dport {}",
                i / 65536 % 256,
                i / 256 % 256,
                i % 256,
                1024 + i % 20000
            );
            parse_rule(&line).unwrap()
        })
        .collect()
}

fn inputs(rules: Vec<FirewallRule>) -> Inputs {
    let cluster: ClusterFirewallSpec = serde_json::from_value(json!({"enable": true})).unwrap();
    Inputs {
        node: "bench".into(),
        cluster: Some(ClusterFirewallSpec { rules, ..cluster }),
        ..Inputs::default()
    }
}

async fn reload(label: &str, inp: &Inputs, runs: usize, dir: &std::path::Path) {
    let compiled = compile(inp).unwrap();
    let file = dir.join(format!("{label}.json"));
    std::fs::write(&file, serde_json::to_vec(&compiled.document).unwrap()).unwrap();
    let mut kpve = Vec::new();
    let mut raw = Vec::new();
    let mut compile_only = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let doc = compile(inp).unwrap();
        compile_only.push(t.elapsed());
        nft::apply_bytes(&serde_json::to_vec(&doc.document).unwrap()).await.unwrap();
        kpve.push(t.elapsed());
        let t = Instant::now();
        let out = Command::new("nft").arg("-j").arg("-f").arg(&file).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        raw.push(t.elapsed());
    }
    println!(
        "{label}: {} declared rules → {} nft rules",
        inp.cluster.as_ref().unwrap().rules.len(),
        compiled.rules
    );
    println!("  {}", summary("kpve compile only", &mut compile_only));
    println!("  {}", summary("kpve compile + serialize + apply", &mut kpve));
    println!("  {}", summary("raw nft -j -f (same document)", &mut raw));
    println!(
        "  ratio kpve/raw: p50 {:.2}  p95 {:.2}",
        ms(percentile(&kpve, 50.0)) / ms(percentile(&raw, 50.0)),
        ms(percentile(&kpve, 95.0)) / ms(percentile(&raw, 95.0))
    );
}

/// Waits until the node reports generation `generation` of input `key` as enforced.
async fn enforced(hvs: &Api<Hypervisor>, key: &str, generation: i64) {
    loop {
        let hv = hvs.get("bench").await.unwrap();
        if hv.status.and_then(|s| s.firewall).is_some_and(|f| f.inputs.get(key) == Some(&generation)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn change_to_enforced(runs: usize, dir: &std::path::Path) {
    let client = kpve_bench::in_process_server(dir).await;
    let apply = PatchParams::apply("bench").force();
    let clusters: Api<kpve_crds::ClusterFirewall> = Api::all(client.clone());
    let sets: Api<IPSet> = Api::all(client.clone());
    let hvs: Api<Hypervisor> = Api::all(client.clone());
    println!("change → enforced: the write returning → the node's status reporting that generation in force");
    for background in [100, 10_000] {
        let cluster = |port: usize| {
            let mut rules = rules(background, true);
            rules.push(parse_rule("IN ACCEPT -source +bench -p tcp -dport 9000").unwrap());
            rules.push(parse_rule(&format!("IN ACCEPT -p tcp -dport {port}")).unwrap());
            json!({"apiVersion": "kpve.io/v1alpha1", "kind": "ClusterFirewall", "metadata": {"name": "cluster"},
                   "spec": {"enable": true, "rules": rules}})
        };
        let mut set_edits = Vec::new();
        let mut rule_edits = Vec::new();
        for i in 0..=runs {
            let set = json!({"apiVersion": "kpve.io/v1alpha1", "kind": "IPSet", "metadata": {"name": "bench"},
                             "spec": {"entries": [{"cidr": format!("192.0.2.{}", i % 250 + 1)}]}});
            let t = Instant::now();
            let written = sets.patch("bench", &apply, &Patch::Apply(&set)).await.unwrap();
            tokio::time::timeout(
                Duration::from_secs(30),
                enforced(&hvs, "IPSet/bench", written.metadata.generation.unwrap()),
            )
            .await
            .expect("IP set change enforced within 30 s");
            let set_took = t.elapsed();
            let t = Instant::now();
            let written =
                clusters.patch("cluster", &apply, &Patch::Apply(&cluster(20_000 + i))).await.unwrap();
            tokio::time::timeout(
                Duration::from_secs(30),
                enforced(&hvs, "ClusterFirewall/cluster", written.metadata.generation.unwrap()),
            )
            .await
            .expect("rule change enforced within 30 s");
            // The first round creates the objects and loads the whole ruleset.
            if i > 0 {
                set_edits.push(set_took);
                rule_edits.push(t.elapsed());
            }
        }
        let listed =
            Command::new("nft").args(["list", "set", "inet", "kpve", "dc/bench/v4"]).output().unwrap();
        assert!(String::from_utf8_lossy(&listed.stdout).contains(&format!("192.0.2.{}", runs % 250 + 1)));
        let chain = Command::new("nft").args(["list", "chain", "inet", "kpve", "input"]).output().unwrap();
        assert!(String::from_utf8_lossy(&chain.stdout).contains(&(20_000 + runs).to_string()));
        println!("  {}", summary(&format!("IP set edit, {background} other rules"), &mut set_edits));
        println!("  {}", summary(&format!("rule edit, {background} other rules"), &mut rule_edits));
    }

    // 10,000 rules spread as they usually are: 100 guests with 100 rules each; one guest's
    // rules change (the agent replaces that guest's chain only).
    clusters
        .patch(
            "cluster",
            &apply,
            &Patch::Apply(&json!({"apiVersion": "kpve.io/v1alpha1", "kind": "ClusterFirewall",
        "metadata": {"name": "cluster"}, "spec": {"enable": true}})),
        )
        .await
        .unwrap();
    let cts: Api<kpve_crds::LinuxContainer> = Api::namespaced(client.clone(), "default");
    let guest = |i: usize, port: usize| {
        let mut rules: Vec<FirewallRule> = rules(100, true);
        rules.push(parse_rule(&format!("IN ACCEPT -p tcp -dport {port}")).unwrap());
        json!({"apiVersion": "kpve.io/v1alpha1", "kind": "LinuxContainer", "metadata": {"name": format!("fw{i}")},
               "spec": {"vmid": 2000 + i, "powerState": "Stopped", "template": "local:vztmpl/none.tar.gz",
                        "rootfs": {"pool": "local", "size": "1G"},
                        "nics": [{"id": "net0", "name": "eth0", "bridge": "vmbr0", "firewall": true}],
                        "firewall": {"enable": true, "rules": rules}}})
    };
    for i in 0..100 {
        cts.patch(&format!("fw{i}"), &apply, &Patch::Apply(&guest(i, 30_000))).await.unwrap();
    }
    let key = "LinuxContainer/default/fw7";
    let mut guest_edits = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        let written = cts.patch("fw7", &apply, &Patch::Apply(&guest(7, 30_001 + i))).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(60),
            enforced(&hvs, key, written.metadata.generation.unwrap()),
        )
        .await
        .expect("guest rule change enforced within 60 s");
        if i > 0 {
            guest_edits.push(t.elapsed());
        }
    }
    let chain =
        Command::new("nft").args(["list", "chain", "inet", "kpve", "g2007-net0-in"]).output().unwrap();
    assert!(String::from_utf8_lossy(&chain.stdout).contains(&(30_001 + runs).to_string()));
    println!("  {}", summary("one guest's rule edit, 100 guests x 100 rules", &mut guest_edits));
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    if std::env::var(NETNS_ENV).is_err() {
        let ns = format!("kpve-bench-fw-{}", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
        let _ = Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]).status();
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe().unwrap())
            .args(std::env::args().skip(1))
            .env(NETNS_ENV, &ns)
            .status()
            .unwrap();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        std::process::exit(status.code().unwrap_or(1));
    }
    let dir = tempfile::tempdir().unwrap();
    println!(
        "firewall benchmarks in network namespace {}, {runs} runs each",
        std::env::var(NETNS_ENV).unwrap()
    );
    reload("alternating", &inputs(rules(10_000, true)), runs, dir.path()).await;
    reload("allow-list", &inputs(rules(10_000, false)), runs, dir.path()).await;
    if std::env::args().nth(2).as_deref() != Some("reload-only") {
        change_to_enforced(runs.max(30), dir.path()).await;
    }
}
