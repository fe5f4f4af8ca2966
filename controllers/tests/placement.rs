//! The scheduler and the guest controller against the real kpve API server (in-process, on a
//! loopback port, through kube-rs): placement by capacity and constraints, the Unschedulable
//! message, the assume cache under a burst of guests, and deletion through the finalizer.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use kpve_controllers::{ControllersConfig, guest, scheduler};
use kpve_crds::kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kpve_crds::kube::config::{KubeConfigOptions, Kubeconfig};
use kpve_crds::kube::{Client, Config, ResourceExt};
use kpve_crds::{
    Condition, ConditionStatus, GuestStatus, Hypervisor, LinuxContainer, VirtualMachine, condition_type,
    find_condition,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);
const AGENT: &str = "kpve-agent-node1";

/// Polls `check` until it yields a value, failing the test after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_server(dir: &Path) -> anyhow::Result<Client> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = kpve_apiserver::ServerConfig {
        data_dir: dir.into(),
        listen: format!("127.0.0.1:{port}").parse()?,
        node: "node1".into(),
        bookmark_interval: Duration::from_secs(1),
        history_window: kpve_apiserver::gc::HISTORY_WINDOW,
        keep_revisions: kpve_apiserver::gc::KEEP_REVISIONS,
    };
    tokio::spawn(async move {
        if let Err(error) = kpve_apiserver::run(config).await {
            panic!("API server failed: {error:#}");
        }
    });
    let path = dir.join("kubeconfig");
    eventually("the kubeconfig", || async { path.exists().then_some(()) }).await;
    let kubeconfig = Kubeconfig::read_from(&path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

async fn add_node(client: &Client, name: &str, cpus: u32, memory_mib: u64) -> anyhow::Result<()> {
    let api: Api<Hypervisor> = Api::all(client.clone());
    let hv: Hypervisor = serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor",
        "metadata": {"name": name}, "spec": {}
    }))?;
    api.create(&PostParams::default(), &hv).await.with_context(|| format!("creating {name}"))?;
    let now = jiff::Timestamp::now().round(jiff::Unit::Second)?.to_string();
    let status = json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor",
        "status": {
            "lastHeartbeatTime": now,
            "capacity": {"cpus": cpus, "memoryMiB": memory_mib},
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady", "lastTransitionTime": now}],
        }
    });
    let params = PatchParams::apply(&format!("kpve-agent-{name}")).force();
    api.patch_status(name, &params, &Patch::Apply(&status))
        .await
        .with_context(|| format!("status of {name}"))?;
    Ok(())
}

fn vm(name: &str, memory_mib: u32, placement: serde_json::Value) -> VirtualMachine {
    serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"powerState": "Stopped", "cpu": {"cores": 1}, "memory": {"size": memory_mib}, "placement": placement}
    }))
    .expect("a valid VirtualMachine")
}

fn scheduled(status: Option<&GuestStatus>) -> Option<Condition> {
    status.and_then(|s| find_condition(&s.conditions, condition_type::SCHEDULED)).cloned()
}

/// Waits until the scheduler has decided about `name`: the Scheduled condition, whatever it says.
async fn decision(api: &Api<VirtualMachine>, name: &str) -> (VirtualMachine, Condition) {
    eventually(&format!("a Scheduled condition on {name}"), || async {
        let vm = api.get(name).await.ok()?;
        let condition = scheduled(vm.status.as_ref())?;
        Some((vm, condition))
    })
    .await
}

async fn has_finalizer<K>(api: &Api<K>, name: &str)
where
    K: kpve_crds::kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("the guest finalizer on {name}"), || async {
        let object = api.get(name).await.ok()?;
        object.finalizers().iter().any(|f| f == guest::FINALIZER).then_some(())
    })
    .await
}

async fn gone<K>(api: &Api<K>, name: &str)
where
    K: kpve_crds::kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{name} to be deleted"), || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_guests_and_releases_them_through_the_finalizer() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir()?;
    let client = start_server(dir.path()).await?;
    add_node(&client, "node1", 8, 8192).await?;
    add_node(&client, "node2", 4, 2048).await?;

    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    // All created before the controllers start, so their first reconciles run together: node2
    // only fits the pinned VM and two of the three "packed" ones if every binding made a moment
    // ago is counted before the cache shows it.
    vms.create(&pp, &vm("free", 512, json!({}))).await?;
    vms.create(&pp, &vm("pinned", 512, json!({"nodes": ["node2"]}))).await?;
    vms.create(&pp, &vm("huge", 100_000, json!({}))).await?;
    for i in 0..3 {
        vms.create(&pp, &vm(&format!("packed-{i}"), 768, json!({"nodes": ["node2"]}))).await?;
    }
    let cts: Api<LinuxContainer> = Api::namespaced(client.clone(), "default");
    let ct: LinuxContainer = serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "LinuxContainer",
        "metadata": {"name": "ct", "namespace": "default"},
        "spec": {"powerState": "Stopped", "cores": 1, "memory": 256, "rootfs": {"pool": "local", "size": "1G"}}
    }))?;
    cts.create(&pp, &ct).await?;

    // A long heartbeat timeout: this test's nodes report once and must stay ready throughout.
    let config = ControllersConfig { heartbeat_timeout: Duration::from_secs(3600) };
    let controllers = tokio::spawn(kpve_controllers::run(client.clone(), config));

    // Most free memory wins: node1.
    let (free, condition) = decision(&vms, "free").await;
    let status = free.status.as_ref().expect("status");
    assert_eq!(status.node.as_deref(), Some("node1"));
    assert_eq!(status.vmid, free.spec.vmid);
    assert!(status.vmid.is_some(), "the API server allocates a VMID");
    assert_eq!(condition.status, ConditionStatus::True);
    assert_eq!(condition.reason, scheduler::REASON_SCHEDULED);
    assert_eq!(condition.message, "placed on node1");
    assert_eq!(condition.observed_generation, free.metadata.generation);
    assert!(condition.last_transition_time.is_some());

    let (pinned, condition) = decision(&vms, "pinned").await;
    assert_eq!(pinned.status.unwrap().node.as_deref(), Some("node2"));
    assert_eq!(condition.status, ConditionStatus::True);

    // node2 has 2048 MiB: pinned (512) + two packed (768 each). The third does not fit.
    let mut placed = 0;
    let mut refused = Vec::new();
    for i in 0..3 {
        let (packed, condition) = decision(&vms, &format!("packed-{i}")).await;
        match condition.status {
            ConditionStatus::True => {
                assert_eq!(packed.status.unwrap().node.as_deref(), Some("node2"));
                placed += 1;
            }
            _ => refused.push(condition),
        }
    }
    assert_eq!((placed, refused.len()), (2, 1), "refused: {refused:?}");
    assert_eq!(refused[0].reason, scheduler::REASON_UNSCHEDULABLE);
    assert!(refused[0].message.contains("node1: not in placement.nodes"), "{}", refused[0].message);
    // 0 or 512 MiB free, depending on whether the pinned VM was placed before it.
    assert!(
        refused[0].message.contains("node2: insufficient memory: 768 MiB requested"),
        "{}",
        refused[0].message
    );

    // Too big for any node: one reason per node, and no binding.
    let (huge, condition) = decision(&vms, "huge").await;
    assert_eq!(condition.status, ConditionStatus::False);
    assert_eq!(condition.reason, scheduler::REASON_UNSCHEDULABLE);
    assert!(
        condition.message.contains("node1: insufficient memory: 100000 MiB requested"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("node2: insufficient memory: 100000 MiB requested"),
        "{}",
        condition.message
    );
    assert_eq!(huge.status.as_ref().and_then(|s| s.node.as_deref()), None);

    // Containers are scheduled the same way (node1: the most free memory).
    let ct = eventually("the container to be placed", || async {
        let ct = cts.get("ct").await.ok()?;
        ct.status.as_ref()?.node.clone().map(|node| (ct, node))
    })
    .await;
    assert_eq!(ct.1, "node1");
    assert_eq!(ct.0.status.as_ref().unwrap().vmid, ct.0.spec.vmid);
    has_finalizer(&cts, "ct").await;

    // The guest controller puts its finalizer on every guest.
    for name in ["free", "pinned", "huge", "packed-0"] {
        has_finalizer(&vms, name).await;
    }

    // Deleting a guest that was never scheduled: nothing to release, it goes at once.
    vms.delete("huge", &DeleteParams::default()).await?;
    gone(&vms, "huge").await;

    // Deleting a scheduled guest: Terminating until its node's agent reports Released=True.
    vms.delete("free", &DeleteParams::default()).await?;
    let terminating = vms.get("free").await?;
    assert!(terminating.metadata.deletion_timestamp.is_some());
    // Not a synchronisation point but an observation window: the deletion's watch event reaches
    // the guest controller within milliseconds, and the finalizer must hold throughout.
    let watch_window = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < watch_window {
        let vm = vms.get("free").await.context("free must survive until Released")?;
        assert!(vm.finalizers().iter().any(|f| f == guest::FINALIZER));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let released = json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "status": {"conditions": [{
            "type": "Released", "status": "True", "reason": "HostResourcesFreed",
            "lastTransitionTime": jiff::Timestamp::now().round(jiff::Unit::Second)?.to_string(),
        }]}
    });
    vms.patch_status("free", &PatchParams::apply(AGENT).force(), &Patch::Apply(&released)).await?;
    gone(&vms, "free").await;

    assert!(!controllers.is_finished(), "the controllers must keep running");
    controllers.abort();
    Ok(())
}
