//! The Proxmox VE API (`kpve_api`) over HTTPS, side by side with its raw baselines in the same
//! run:
//! - `GET /cluster/resources` with N guests (default 10,000): p50/p95/p99, beside a raw LIST of
//!   the same VirtualMachines from the kpve API server it reads (the data it is built from);
//! - the same with a user's API token (PVEAuditor on /: every guest's permission checked);
//! - `GET /version` requests per second with root's ticket and with the token, beside a bare axum + rustls hello-world
//!   server with the same certificate, same client, same connection count.
//!
//! Usage: cargo run --release -p kpve-bench --bin pve_api [-- GUESTS SECONDS CONNECTIONS]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use kpve_bench::summary;
use kpve_crds::VirtualMachine;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn vm(i: usize) -> VirtualMachine {
    serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": format!("vm-{i}"), "namespace": "default"},
        "spec": {"vmid": 1000 + i, "name": format!("guest{i}"), "powerState": "Stopped", "cpu": {"cores": 2},
                 "memory": {"size": 1024},
                 "disks": [{"id": "scsi0", "pool": "local", "size": "8G"}],
                 "nics": [{"id": "net0", "bridge": "vmbr0"}]}
    }))
    .unwrap()
}

/// One kept-alive HTTPS/1.1 connection trusting the server's CA.
async fn connect(addr: std::net::SocketAddr, tls: Arc<rustls::ClientConfig>) -> SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut SendRequest<Full<Bytes>>, path: &str, headers: &[(&str, &str)]) -> (u16, Bytes) {
    let mut req = hyper::Request::get(path).header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.ready().await.unwrap();
    let resp = sender.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// A form-encoded write (`POST`/`PUT`) with a ticket and its CSRF token; the answer's `data`.
async fn write(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    auth: &[(&str, &str)],
    form: &str,
) -> Value {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/x-www-form-urlencoded");
    for (k, v) in auth {
        req = req.header(*k, *v);
    }
    sender.ready().await.unwrap();
    let resp =
        sender.send_request(req.body(Full::new(Bytes::from(form.to_string()))).unwrap()).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(status.is_success(), "{method} {path}: {status} {}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<Value>(&body).unwrap()["data"].clone()
}

/// Requests per second of `path` over `seconds` with `connections` workers.
async fn rps(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    seconds: f64,
    connections: usize,
) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (tls, count, stop, headers) = (tls.clone(), count.clone(), stop.clone(), headers.clone());
        workers.push(tokio::spawn(async move {
            let mut sender = connect(addr, tls).await;
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            while !stop.load(Ordering::Relaxed) {
                let (status, _) = get(&mut sender, path, &h).await;
                assert_eq!(status, 200, "{path}");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm up, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = count.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let done = count.load(Ordering::Relaxed) - before;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    done as f64 / elapsed
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let guests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seconds: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let connections: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    println!("guests={guests} seconds={seconds} connections={connections}");

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let running = kpve_apiserver::start(kpve_apiserver::ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        node: "bench".into(),
        bookmark_interval: Duration::from_secs(60),
        history_window: kpve_apiserver::gc::HISTORY_WINDOW,
        keep_revisions: kpve_apiserver::gc::KEEP_REVISIONS,
    })
    .await
    .unwrap();
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let mut kube_config = kube::Config::new(format!("https://{}", running.address).parse().unwrap());
    kube_config.root_cert = Some(kpve_apiserver::pki::pem_certs(&ca).unwrap());
    kube_config.auth_info.token = Some(running.admin_token.clone().into());
    let client = kube::Client::try_from(kube_config).unwrap();

    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let start = Instant::now();
    futures::stream::iter(0..guests)
        .map(|i| {
            let vms = vms.clone();
            async move { vms.create(&PostParams::default(), &vm(i)).await.unwrap() }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    println!("created {guests} VMs in {:.1} s", start.elapsed().as_secs_f64());

    let tls = kpve_apiserver::pki::server_tls_config(dir.path()).unwrap();
    let (pve_addr, _task) = kpve_api::server::start(kpve_api::server::PveApiConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: tls.clone(),
        client: client.clone(),
    })
    .await
    .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    // Log in as root@pam.
    let password = std::fs::read_to_string(dir.path().join("pve-root-password")).unwrap();
    let mut sender = connect(pve_addr, client_tls.clone()).await;
    let body = format!("username=root%40pam&password={}", password.trim());
    let req = hyper::Request::post("/api2/json/access/ticket")
        .header("host", "localhost")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let login: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let cookie = format!("PVEAuthCookie={}", login["data"]["ticket"].as_str().unwrap());
    let csrf = login["data"]["CSRFPreventionToken"].as_str().unwrap().to_string();

    // A user's API token (PVEAuditor on /): its requests go through the ACL checks root skips.
    let root = [("cookie", cookie.as_str()), ("csrfpreventiontoken", csrf.as_str())];
    write(&mut sender, "POST", "/api2/json/access/users", &root, "userid=bench%40pve").await;
    let token =
        write(&mut sender, "POST", "/api2/json/access/users/bench%40pve/token/load", &root, "privsep=0")
            .await;
    write(&mut sender, "PUT", "/api2/json/access/acl", &root, "path=%2F&roles=PVEAuditor&users=bench%40pve")
        .await;
    let token = format!("PVEAPIToken=bench@pve!load={}", token["value"].as_str().unwrap());

    // The guest cache fills from the watch: wait until the API lists every guest.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) =
            get(&mut sender, "/api2/json/cluster/resources?type=vm", &[("cookie", &cookie)]).await;
        let listed = serde_json::from_slice::<Value>(&body).unwrap()["data"].as_array().map_or(0, Vec::len);
        if listed == guests {
            break;
        }
        assert!(Instant::now() < deadline, "only {listed} guests listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 1. /cluster/resources beside a raw LIST of the same VMs from the API server.
    let bearer = format!("Bearer {}", running.admin_token);
    let mut kube_sender = connect(running.address, client_tls.clone()).await;
    let (mut api_lat, mut raw_lat) = (Vec::new(), Vec::new());
    let mut token_lat = Vec::new();
    let mut bytes = (0, 0);
    for _ in 0..60 {
        let t = Instant::now();
        let (status, body) = get(&mut sender, "/api2/json/cluster/resources", &[("cookie", &cookie)]).await;
        api_lat.push(t.elapsed());
        assert_eq!(status, 200);
        bytes.0 = body.len();
        let t = Instant::now();
        let (status, body) =
            get(&mut sender, "/api2/json/cluster/resources", &[("authorization", &token)]).await;
        token_lat.push(t.elapsed());
        assert_eq!(status, 200);
        assert_eq!(body.len(), bytes.0, "the auditor token sees every guest");
        let t = Instant::now();
        let (status, body) =
            get(&mut kube_sender, "/apis/kpve.io/v1alpha1/virtualmachines", &[("authorization", &bearer)])
                .await;
        raw_lat.push(t.elapsed());
        assert_eq!(status, 200);
        bytes.1 = body.len();
    }
    println!(
        "{}",
        summary(
            &format!("pve  GET /cluster/resources ({guests} guests, {} KiB)", bytes.0 / 1024),
            &mut api_lat
        )
    );
    println!(
        "{}",
        summary("pve  GET /cluster/resources, user token (ACL checked per guest)", &mut token_lat)
    );
    println!(
        "{}",
        summary(
            &format!("raw  LIST virtualmachines    ({guests} VMs, {} KiB)", bytes.1 / 1024),
            &mut raw_lat
        )
    );

    // 2. GET /version beside a bare axum + rustls server (same certificate, same client).
    let bare = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let handle = axum_server::Handle::new();
    let server = axum_server::bind_rustls(
        "127.0.0.1:0".parse().unwrap(),
        axum_server::tls_rustls::RustlsConfig::from_config(tls),
    )
    .handle(handle.clone())
    .serve(bare.into_make_service());
    tokio::spawn(server);
    let bare_addr = handle.listening().await.unwrap();
    let (mut ratios, mut token_ratios) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let pve = rps(
            pve_addr,
            client_tls.clone(),
            "/api2/json/version",
            vec![("cookie", cookie.clone())],
            seconds,
            connections,
        )
        .await;
        let with_token = rps(
            pve_addr,
            client_tls.clone(),
            "/api2/json/version",
            vec![("authorization", token.clone())],
            seconds,
            connections,
        )
        .await;
        let raw = rps(bare_addr, client_tls.clone(), "/", vec![], seconds, connections).await;
        println!(
            "round {round}: pve GET /version root ticket {pve:.0} req/s, user token {with_token:.0} req/s, bare axum+rustls {raw:.0} req/s; ratios {:.2} / {:.2}",
            pve / raw,
            with_token / raw
        );
        ratios.push(pve / raw);
        token_ratios.push(with_token / raw);
    }
    ratios.sort_by(f64::total_cmp);
    token_ratios.sort_by(f64::total_cmp);
    println!(
        "median ratio /version vs bare: root ticket {:.2}, user token {:.2}",
        ratios[1], token_ratios[1]
    );
}
