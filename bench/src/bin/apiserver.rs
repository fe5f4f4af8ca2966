//! The API server over HTTPS, driven by kube-rs as controllers drive it, side by side with the
//! store it sits on (the raw baseline) in the same run:
//! - durable single-object writes per second (sequential merge PATCHes of one VM),
//! - GET p50/p99 of one VM,
//! - LIST of 10,000 VMs,
//! - watch delivery latency with 100 watchers (write issued → event received by each watcher).
//!
//! Usage: cargo run --release -p kpve-bench --bin apiserver [-- WRITES OBJECTS WATCHERS]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kpve_apiserver::store::Store;
use kpve_apiserver::store::sqlite::SqliteStore;
use kpve_bench::summary;
use kpve_crds::VirtualMachine;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

/// The one object the write, GET and watch measurements hammer, as the store keys it.
const HOT: &str = "/registry/kpve.io/virtualmachines/default/hot";

fn vm(name: &str) -> VirtualMachine {
    serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default", "labels": {"bench": "yes"}},
        "spec": {"powerState": "Stopped", "cpu": {"cores": 2}, "memory": {"size": 1024},
                 "disks": [{"id": "scsi0", "pool": "local", "size": "8G"}],
                 "nics": [{"id": "net0", "bridge": "vmbr0"}]}
    }))
    .unwrap()
}

async fn start_server(dir: &std::path::Path) -> kube::Client {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = kpve_apiserver::ServerConfig {
        data_dir: dir.to_path_buf(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        node: "bench".into(),
        bookmark_interval: Duration::from_secs(60),
        history_window: kpve_apiserver::gc::HISTORY_WINDOW,
        keep_revisions: kpve_apiserver::gc::KEEP_REVISIONS,
    };
    tokio::spawn(async move { kpve_apiserver::run(config).await.unwrap() });
    let kubeconfig = dir.join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let writes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let objects: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let watchers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    println!("writes={writes} objects={objects} watchers={watchers}");

    let dir = tempfile::tempdir().unwrap();
    let client = start_server(dir.path()).await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    vms.create(&PostParams::default(), &vm("hot")).await.unwrap();

    // Raw baseline: the same store engine, in-process, on the same disk.
    let raw_dir = tempfile::tempdir().unwrap();
    let raw = Arc::new(SqliteStore::open(&raw_dir.path().join("raw.db")).unwrap());
    let value = serde_json::to_vec(&vm("hot")).unwrap();
    raw.create(HOT, value.clone()).unwrap();

    // 1. Durable single-object writes.
    let mut api_lat = Vec::with_capacity(writes);
    let start = Instant::now();
    for i in 0..writes {
        let patch = json!({"metadata": {"annotations": {"seq": i.to_string()}}});
        let t = Instant::now();
        vms.patch("hot", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        api_lat.push(t.elapsed());
    }
    let api_rate = writes as f64 / start.elapsed().as_secs_f64();
    let mut raw_lat = Vec::with_capacity(writes);
    let start = Instant::now();
    let mut rev = raw.current_revision();
    for _ in 0..writes {
        let t = Instant::now();
        rev = raw.update(HOT, rev, value.clone()).unwrap().mod_revision;
        raw_lat.push(t.elapsed());
    }
    let raw_rate = writes as f64 / start.elapsed().as_secs_f64();
    println!("\n## durable single-object writes");
    println!("API PATCH (HTTPS, kube-rs)        {api_rate:>8.0} writes/s");
    println!("raw SqliteStore.update            {raw_rate:>8.0} writes/s   ratio {:.2}", api_rate / raw_rate);
    println!("{}", summary("API PATCH latency", &mut api_lat));
    // The same durable writes from 16 clients at once, each on its own object.
    for i in 0..16 {
        vms.create(&PostParams::default(), &vm(&format!("par{i}"))).await.unwrap();
    }
    let start = Instant::now();
    futures::stream::iter(0..writes)
        .map(|i| {
            let vms = vms.clone();
            async move {
                let patch = json!({"metadata": {"annotations": {"seq": i.to_string()}}});
                vms.patch(&format!("par{}", i % 16), &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;
    let par_rate = writes as f64 / start.elapsed().as_secs_f64();
    println!("API PATCH, 16 clients in parallel {par_rate:>8.0} writes/s   ratio {:.2}", par_rate / raw_rate);
    println!("{}", summary("raw store update latency", &mut raw_lat));

    // 2. GET of one object.
    let mut api_lat = Vec::with_capacity(writes);
    for _ in 0..writes {
        let t = Instant::now();
        vms.get("hot").await.unwrap();
        api_lat.push(t.elapsed());
    }
    let mut raw_lat = Vec::with_capacity(writes);
    for _ in 0..writes {
        let t = Instant::now();
        let kv = raw.get(HOT).unwrap().unwrap();
        let _: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        raw_lat.push(t.elapsed());
    }
    println!("\n## GET one object");
    println!("{}", summary("API GET (HTTPS, kube-rs)", &mut api_lat));
    println!("{}", summary("raw store get + JSON decode", &mut raw_lat));

    // 3. LIST of `objects` VMs.
    let start = Instant::now();
    futures::stream::iter(0..objects)
        .map(|i| {
            let vms = vms.clone();
            async move { vms.create(&PostParams::default(), &vm(&format!("vm{i:05}"))).await.unwrap() }
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;
    let create_rate = objects as f64 / start.elapsed().as_secs_f64();
    for i in 0..objects {
        raw.create(&format!("/registry/kpve.io/virtualmachines/default/vm{i:05}"), value.clone()).unwrap();
    }
    let mut api_lat = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let list = vms.list(&ListParams::default()).await.unwrap();
        api_lat.push(t.elapsed());
        assert_eq!(list.items.len(), objects + 17);
    }
    let mut bytes_lat = Vec::new();
    let mut size = 0;
    for _ in 0..10 {
        let request = kube::core::Request::new("/apis/kpve.io/v1alpha1/namespaces/default/virtualmachines")
            .list(&ListParams::default())
            .unwrap();
        let t = Instant::now();
        let text = client.request_text(request).await.unwrap();
        bytes_lat.push(t.elapsed());
        size = text.len();
    }
    let mut raw_lat = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let page = raw.list("/registry/kpve.io/virtualmachines/default/", None, 0).unwrap();
        let decoded: Vec<serde_json::Value> =
            page.items.iter().map(|kv| serde_json::from_slice(&kv.value).unwrap()).collect();
        assert!(decoded.len() > objects);
        raw_lat.push(t.elapsed());
    }
    println!(
        "\n## LIST of {} objects (created through the API at {create_rate:.0}/s, 16 in flight)",
        objects + 17
    );
    println!("{}", summary("API LIST, body received (bytes)", &mut bytes_lat));
    println!("{}", summary("API LIST, kube-rs typed decode", &mut api_lat));
    println!("  ({:.1} MB per list)", size as f64 / 1e6);
    println!("{}", summary("raw store list + JSON decode", &mut raw_lat));

    // 4. Watch delivery latency with `watchers` watchers.
    let rounds = 100;
    let rv = vms.get("hot").await.unwrap().metadata.resource_version.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let mut handles = Vec::new();
    for _ in 0..watchers {
        let vms = vms.clone();
        let tx = tx.clone();
        let rv = rv.clone();
        handles.push(tokio::spawn(async move {
            let wp = WatchParams::default().fields("metadata.name=hot").timeout(290);
            let mut stream = vms.watch(&wp, &rv).await.unwrap().boxed();
            let mut seen = 0;
            while seen < rounds {
                match stream.try_next().await.unwrap() {
                    Some(WatchEvent::Modified(o)) => {
                        let annotations = o.metadata.annotations.unwrap_or_default();
                        let Some(seq) = annotations.get("round") else {
                            // The warm-up change: this watch is established.
                            tx.send((usize::MAX, Instant::now())).unwrap();
                            continue;
                        };
                        tx.send((seq.parse().unwrap(), Instant::now())).unwrap();
                        seen += 1;
                    }
                    Some(_) => {}
                    None => panic!("watch ended early"),
                }
            }
        }));
    }
    drop(tx);
    // A warm-up change every watcher must see: after it, all watches are established.
    vms.patch(
        "hot",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"seq": "warm"}}})),
    )
    .await
    .unwrap();
    let mut ready = 0;
    while ready < watchers {
        let (seq, _) = rx.recv().await.unwrap();
        assert_eq!(seq, usize::MAX);
        ready += 1;
    }
    let mut sent = Vec::new();
    for round in 0..rounds {
        let patch = json!({"metadata": {"annotations": {"round": round.to_string()}}});
        sent.push(Instant::now());
        vms.patch("hot", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut api_lat = Vec::new();
    while let Some((round, at)) = rx.recv().await {
        api_lat.push(at - sent[round]);
    }
    for h in handles {
        h.await.unwrap();
    }
    // Raw: the store's own watch fan-out to the same number of in-process watchers.
    let mut receivers: Vec<_> =
        (0..watchers).map(|_| raw.watch(HOT, raw.current_revision()).unwrap()).collect();
    let mut raw_lat = Vec::new();
    let mut rev = raw.get(HOT).unwrap().unwrap().mod_revision;
    for _ in 0..rounds {
        let t = Instant::now();
        rev = raw.update(HOT, rev, value.clone()).unwrap().mod_revision;
        for w in &mut receivers {
            w.events.recv().await.unwrap();
            raw_lat.push(t.elapsed());
        }
    }
    println!("\n## watch delivery, {watchers} watchers × {rounds} changes (write issued → event received)");
    println!("{}", summary("API watch (HTTPS, kube-rs)", &mut api_lat));
    println!("{}", summary("raw store watch channel", &mut raw_lat));
}
