//! kube-rs 5 against the real `kpve server`: a Controller with a finalizer, watches, optimistic
//! concurrency, durability under kill -9, VMID admission and authorisation.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Event as CoreEvent;
use kpve_crds::{Hypervisor, LinuxContainer, VirtualMachine};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use support::{DEADLINE, Server};

const FINALIZER: &str = "kpve.io/test-cleanup";

fn vm(name: &str, cores: u32) -> VirtualMachine {
    serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"powerState": "Stopped", "cpu": {"cores": cores}, "memory": {"size": 512}}
    }))
    .unwrap()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
struct Seen {
    reconciles: AtomicUsize,
    cleaned: Mutex<Vec<String>>,
}

struct Ctx {
    client: kube::Client,
    recorder: Recorder,
    seen: Arc<Seen>,
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    ctx.seen.reconciles.fetch_add(1, Ordering::SeqCst);
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap());
    finalizer(&api, FINALIZER, vm, |event| async {
        match event {
            Finalizer::Apply(vm) => {
                let status = json!({
                    "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
                    "status": {"observedGeneration": vm.metadata.generation, "phase": "Stopped"}
                });
                api.patch_status(
                    &vm.name_any(),
                    &PatchParams::apply("test-controller").force(),
                    &Patch::Apply(&status),
                )
                .await?;
                ctx.recorder
                    .publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "Reconciled".into(),
                            note: Some(format!("generation {}", vm.metadata.generation.unwrap_or(0))),
                            action: "Reconcile".into(),
                            secondary: None,
                        },
                        &vm.object_ref(&()),
                    )
                    .await?;
                Ok::<_, kube::Error>(Action::await_change())
            }
            Finalizer::Cleanup(vm) => {
                ctx.seen.cleaned.lock().unwrap().push(vm.name_any());
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(e.to_string()))
}

fn error_policy(_vm: Arc<VirtualMachine>, _e: &ReconcileError, _ctx: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_with_finalizer_survives_restart_and_does_not_hot_loop() {
    let mut server = Server::start();
    let client = server.client().await;
    let seen = Arc::new(Seen::default());
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "test-controller".into(), instance: None },
        ),
        seen: seen.clone(),
    });
    let controller = tokio::spawn(
        Controller::new(Api::<VirtualMachine>::all(client.clone()), Default::default())
            .run(reconcile, error_policy, ctx)
            .for_each(|_| async {}),
    );
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    vms.create(&PostParams::default(), &vm("a", 2)).await.unwrap();
    let observed = |name: &'static str, generation: i64| {
        let vms = vms.clone();
        move || {
            let vms = vms.clone();
            async move {
                vms.get_opt(name).await.ok().flatten().is_some_and(|vm| {
                    vm.status.as_ref().and_then(|s| s.observed_generation) == Some(generation)
                        && vm.finalizers().iter().any(|f| f == FINALIZER)
                })
            }
        }
    };
    eventually("a reconciled at generation 1", observed("a", 1)).await;

    // An update is seen: generation 2 is observed.
    vms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cpu": {"cores": 4}}})))
        .await
        .unwrap();
    eventually("a reconciled at generation 2", observed("a", 2)).await;

    // No hot loop: identical status applies are no-ops, so nothing re-triggers reconcile.
    let before = seen.reconciles.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = seen.reconciles.load(Ordering::SeqCst);
    assert!(after - before <= 1, "controller hot-loops: {before} -> {after} reconciles in 3 s");

    // The Recorder's events.k8s.io Events are visible as core/v1 Events (kubectl describe).
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    eventually("core/v1 event about a", || {
        let events = events.clone();
        async move {
            let list = events
                .list(
                    &ListParams::default().fields("involvedObject.name=a,involvedObject.kind=VirtualMachine"),
                )
                .await
                .unwrap();
            list.items.iter().any(|e| e.reason.as_deref() == Some("Reconciled"))
        }
    })
    .await;

    // The server restarts under the controller; it keeps working.
    server.restart();
    let client2 = server.client().await;
    let vms2: Api<VirtualMachine> = Api::namespaced(client2.clone(), "default");
    vms2.create(&PostParams::default(), &vm("b", 1)).await.unwrap();
    let observed_b = || {
        let vms = vms2.clone();
        async move {
            vms.get_opt("b").await.ok().flatten().is_some_and(|vm| {
                vm.status.as_ref().and_then(|s| s.observed_generation) == Some(1)
                    && vm.finalizers().iter().any(|f| f == FINALIZER)
            })
        }
    };
    eventually("b reconciled after the restart", observed_b).await;

    // Delete: the finalizer runs cleanup, then the object is gone.
    vms2.delete("a", &DeleteParams::default()).await.unwrap();
    eventually("a cleaned up and gone", || {
        let vms = vms2.clone();
        let seen = seen.clone();
        async move {
            seen.cleaned.lock().unwrap().contains(&"a".to_string())
                && vms.get_opt("a").await.unwrap().is_none()
        }
    })
    .await;
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_events_bookmarks_and_skips_no_op_writes() {
    let server = Server::start();
    let client = server.client().await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let created = vms.create(&PostParams::default(), &vm("w", 1)).await.unwrap();
    let rv = created.resource_version().unwrap();
    let mut stream = vms.watch(&WatchParams::default().timeout(30), &rv).await.unwrap().boxed();

    // A no-op write keeps the resourceVersion and emits nothing.
    let same = vms.replace("w", &PostParams::default(), &created).await.unwrap();
    assert_eq!(same.resource_version(), created.resource_version());
    let labelled = vms
        .patch("w", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})))
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(1), "metadata changes do not bump generation");
    vms.delete("w", &DeleteParams::default()).await.unwrap();

    let mut kinds = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while kinds.len() < 3 || !kinds.contains(&"BOOKMARK") {
        let event = tokio::time::timeout_at(deadline, stream.try_next()).await.expect("watch event in time");
        match event.unwrap().expect("stream open") {
            WatchEvent::Added(_) => kinds.push("ADDED"),
            WatchEvent::Modified(vm) => {
                assert_eq!(vm.labels().get("x").map(String::as_str), Some("1"));
                kinds.push("MODIFIED")
            }
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            WatchEvent::Bookmark(b) => {
                assert!(!b.metadata.resource_version.is_empty());
                kinds.push("BOOKMARK")
            }
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    let changes: Vec<_> = kinds.iter().filter(|k| **k != "BOOKMARK").collect();
    assert_eq!(changes, [&"MODIFIED", &"DELETED"], "exactly the two real changes, no event for the no-op");

    let lp = vms.list(&ListParams::default().labels("x=1")).await.unwrap();
    assert!(lp.items.is_empty());
    assert!(lp.metadata.resource_version.is_some(), "lists always carry a resourceVersion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_fails_in_stream_with_410() {
    // Keep one second of history and no minimum number of revisions.
    let server = Server::start_with(&["--history-window", "1", "--keep-revisions", "0"]);
    let client = server.client().await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let first = vms.create(&PostParams::default(), &vm("old", 1)).await.unwrap();
    let old_rv = first.resource_version().unwrap();
    for cores in 2..6 {
        vms.patch("old", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cpu": {"cores": cores}}})))
            .await
            .unwrap();
    }
    // The HTTP answer is 200; the 410 comes as an ERROR event inside the stream.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut stream = vms.watch(&WatchParams::default().timeout(5), &old_rv).await.unwrap().boxed();
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
            Ok(Ok(Some(WatchEvent::Error(e)))) => {
                assert_eq!(e.code, 410, "{e:?}");
                assert_eq!(e.reason, "Expired");
                break;
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("unexpected watch result {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "history was never compacted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_writers_lose_no_update() {
    let server = Server::start();
    let client = server.client().await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    vms.create(&PostParams::default(), &vm("counter", 1)).await.unwrap();
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let conflicts = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let vms = vms.clone();
            let conflicts = conflicts.clone();
            tokio::spawn(async move {
                for _ in 0..EACH {
                    loop {
                        let mut obj = vms.get("counter").await.unwrap();
                        let n: usize =
                            obj.annotations().get("count").map(|c| c.parse().unwrap()).unwrap_or(0);
                        obj.annotations_mut().insert("count".into(), (n + 1).to_string());
                        match vms.replace("counter", &PostParams::default(), &obj).await {
                            Ok(_) => break,
                            Err(kube::Error::Api(e)) if e.code == 409 => {
                                conflicts.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => panic!("write failed: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let obj = vms.get("counter").await.unwrap();
    assert_eq!(obj.annotations()["count"], (WRITERS * EACH).to_string());
    assert!(conflicts.load(Ordering::SeqCst) > 0, "the writers did race");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_write_loop_loses_no_acknowledged_write() {
    let mut server = Server::start();
    let client = server.client().await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let name = format!("d{i}");
                match vms.create(&PostParams::default(), &vm(&name, 1)).await {
                    Ok(_) => acked.lock().unwrap().push(name),
                    Err(_) => return,
                }
            }
        })
    };
    eventually("100 acknowledged writes", || {
        let n = acked.lock().unwrap().len();
        async move { n >= 100 }
    })
    .await;
    server.kill9();
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    server.spawn();
    let client = server.client().await;
    let vms: Api<VirtualMachine> = Api::namespaced(client, "default");
    let stored: BTreeSet<String> =
        vms.list(&ListParams::default()).await.unwrap().items.iter().map(|v| v.name_any()).collect();
    let lost: Vec<_> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged but lost after kill -9: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_creates_get_distinct_vmids_and_duplicates_are_refused() {
    let server = Server::start();
    let client = server.client().await;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let created: Vec<VirtualMachine> = futures::stream::iter(0..100)
        .map(|i| {
            let vms = vms.clone();
            async move { vms.create(&PostParams::default(), &vm(&format!("p{i}"), 1)).await.unwrap() }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let vmids: BTreeSet<u32> = created.iter().map(|v| v.spec.vmid.expect("allocated")).collect();
    assert_eq!(vmids.len(), 100, "100 distinct VMIDs");
    assert!(vmids.iter().all(|v| (100..=999_999_999).contains(v)));

    let holder = created.iter().find(|v| v.spec.vmid == Some(150)).unwrap().name_any();
    let mut dup = vm("dup", 1);
    dup.spec.vmid = Some(150);
    match vms.create(&PostParams::default(), &dup).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(e.message.contains(&format!("default/{holder}")), "names the holder: {}", e.message);
        }
        other => panic!("duplicate VMID accepted: {other:?}"),
    }
    // Containers share the VMID space.
    let cts: Api<LinuxContainer> = Api::namespaced(client, "default");
    let ct: LinuxContainer = serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "LinuxContainer",
        "metadata": {"name": "ct"}, "spec": {"vmid": 150, "template": "local:vztmpl/busybox.tar.gz", "rootfs": {"pool": "local", "size": "1G"}}
    }))
    .unwrap();
    let err = cts.create(&PostParams::default(), &ct).await.expect_err("container with a VM's VMID");
    assert!(err.to_string().contains("already used"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_are_enforced() {
    let server = Server::start();
    let admin = server.client().await;
    let code = |r: Result<kube::core::ObjectList<VirtualMachine>, kube::Error>| match r {
        Err(kube::Error::Api(e)) => e.code,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => 200,
    };
    let anonymous: Api<VirtualMachine> = Api::all(server.client_with_token(None).await);
    assert_eq!(code(anonymous.list(&ListParams::default()).await), 401);
    let wrong: Api<VirtualMachine> = Api::all(server.client_with_token(Some("not-a-token")).await);
    assert_eq!(code(wrong.list(&ListParams::default()).await), 401);

    let viewer = server.client_with_token(Some(&server.token("read-only", None))).await;
    let viewer_vms: Api<VirtualMachine> = Api::namespaced(viewer, "default");
    assert_eq!(code(viewer_vms.list(&ListParams::default()).await), 200);
    let err = viewer_vms.create(&PostParams::default(), &vm("nope", 1)).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 403), "{err}");

    // Node identities: their own Hypervisor and bound guests only.
    let hvs: Api<Hypervisor> = Api::all(admin.clone());
    for name in ["node1", "node2"] {
        let hv: Hypervisor =
            serde_json::from_value(json!({"apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor", "metadata": {"name": name}, "spec": {}}))
                .unwrap();
        hvs.create(&PostParams::default(), &hv).await.unwrap();
    }
    let node1 = server.client_with_token(Some(&server.token("node", Some("node1")))).await;
    let node_hvs: Api<Hypervisor> = Api::all(node1.clone());
    let heartbeat = |name: &str| {
        json!({"apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor", "metadata": {"name": name},
               "status": {"lastHeartbeatTime": "2026-11-21T10:00:00Z"}})
    };
    node_hvs
        .patch_status("node1", &PatchParams::apply("agent").force(), &Patch::Apply(heartbeat("node1")))
        .await
        .expect("a node writes its own status");
    let err = node_hvs
        .patch_status("node2", &PatchParams::apply("agent").force(), &Patch::Apply(heartbeat("node2")))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 403), "{err}");

    let vms: Api<VirtualMachine> = Api::namespaced(admin, "default");
    for (name, node) in [("on1", "node1"), ("on2", "node2")] {
        vms.create(&PostParams::default(), &vm(name, 1)).await.unwrap();
        vms.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"node": node}})))
            .await
            .unwrap();
    }
    let node_vms: Api<VirtualMachine> = Api::namespaced(node1.clone(), "default");
    let phase = json!({"status": {"phase": "Running"}});
    node_vms.patch_status("on1", &PatchParams::default(), &Patch::Merge(&phase)).await.expect("bound guest");
    let err = node_vms.patch_status("on2", &PatchParams::default(), &Patch::Merge(&phase)).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 403), "{err}");
    let err = node_vms
        .patch("on1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cpu": {"cores": 8}}})))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 403), "nodes do not write specs: {err}");

    // A node's heartbeat Lease: its own name, in kube-node-lease only.
    use k8s_openapi::api::coordination::v1::Lease;
    let lease = |name: &str| -> Lease {
        serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}}),
        )
        .unwrap()
    };
    let node_leases: Api<Lease> = Api::namespaced(node1.clone(), "kube-node-lease");
    node_leases.create(&PostParams::default(), &lease("node1")).await.expect("own lease");
    let err = node_leases.create(&PostParams::default(), &lease("node2")).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 403), "{err}");
    let elsewhere: Api<Lease> = Api::namespaced(node1, "default");
    let err = elsewhere.create(&PostParams::default(), &lease("node1")).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 403), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_rules_match_kubernetes() {
    use k8s_openapi::api::core::v1::Namespace;
    let server = Server::start();
    let client = server.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let err = namespaces.delete("default", &DeleteParams::default()).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 403), "default cannot be deleted: {err}");

    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let owner = vms.create(&PostParams::default(), &vm("owner", 1)).await.unwrap();
    let mut two = vm("two-controllers", 1);
    two.metadata.owner_references =
        Some(vec![owner.controller_owner_ref(&()).unwrap(), owner.controller_owner_ref(&()).unwrap()]);
    let err = vms.create(&PostParams::default(), &two).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 422), "{err}");

    // Strict field validation covers metadata too; the default (Warn) drops unknown fields.
    let raw: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client, "default", &kube::api::ApiResource::erase::<VirtualMachine>(&()));
    let mut obj: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "strict"}, "spec": {"powerState": "Stopped", "bogus": 1}
    }))
    .unwrap();
    let err = raw
        .patch("strict", &PatchParams::apply("test").validation_strict(), &Patch::Apply(&obj))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.bogus"), "{err}");
    let created = raw.create(&PostParams::default(), &obj).await.unwrap();
    assert!(created.data["spec"].get("bogus").is_none(), "unknown fields are pruned");
    obj.metadata.uid = Some("not-the-uid".into());
    obj.metadata.resource_version = created.metadata.resource_version.clone();
    let err = raw.replace("strict", &PostParams::default(), &obj).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 409), "uid is a precondition: {err}");

    // Built-ins must decode as their Kubernetes type: a broken Lease would break every reader.
    let leases: Api<kube::api::DynamicObject> = Api::namespaced_with(
        raw.clone().into_client(),
        "default",
        &kube::api::ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&()),
    );
    let bad: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "bad"}, "spec": {"renewTime": "garbage"}
    }))
    .unwrap();
    let err = leases.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 400), "{err}");
}

fn owned_vm(name: &str, owner: &VirtualMachine) -> VirtualMachine {
    let mut dependent = vm(name, 1);
    dependent.metadata.namespace = Some("gc".into());
    dependent.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
    dependent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_references_are_collected_and_namespaces_terminate() {
    use k8s_openapi::api::core::v1::Namespace;
    let server = Server::start();
    let client = server.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "gc"}})).unwrap())
        .await
        .unwrap();
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "gc");
    let gone = |name: &'static str| {
        let vms = vms.clone();
        move || {
            let vms = vms.clone();
            async move { vms.get_opt(name).await.unwrap().is_none() }
        }
    };
    let owner_of = |name: &str| {
        let mut owner = vm(name, 1);
        owner.metadata.namespace = Some("gc".into());
        owner
    };

    // Background: the dependent goes after the owner.
    let owner = vms.create(&PostParams::default(), &owner_of("owner")).await.unwrap();
    vms.create(&PostParams::default(), &owned_vm("dep", &owner)).await.unwrap();
    vms.delete("owner", &DeleteParams::background()).await.unwrap();
    eventually("background dependent collected", gone("dep")).await;

    // Orphan: the dependent stays, without the reference.
    let owner = vms.create(&PostParams::default(), &owner_of("owner2")).await.unwrap();
    vms.create(&PostParams::default(), &owned_vm("dep2", &owner)).await.unwrap();
    vms.delete("owner2", &DeleteParams::orphan()).await.unwrap();
    eventually("orphaning owner gone", gone("owner2")).await;
    let dep2 = vms.get("dep2").await.unwrap();
    assert!(dep2.metadata.owner_references.unwrap_or_default().is_empty(), "reference stripped");

    // Foreground: the owner waits (terminating) until its dependents are gone.
    let owner = vms.create(&PostParams::default(), &owner_of("owner3")).await.unwrap();
    let mut dep3 = owned_vm("dep3", &owner);
    dep3.metadata.owner_references.as_mut().unwrap()[0].block_owner_deletion = Some(true);
    dep3.metadata.finalizers = Some(vec!["kpve.io/hold".into()]);
    vms.create(&PostParams::default(), &dep3).await.unwrap();
    vms.delete("owner3", &DeleteParams::foreground()).await.unwrap();
    eventually("dependent terminating", || {
        let vms = vms.clone();
        async move { vms.get("dep3").await.unwrap().metadata.deletion_timestamp.is_some() }
    })
    .await;
    let owner3 = vms.get("owner3").await.unwrap();
    assert!(owner3.metadata.deletion_timestamp.is_some());
    assert!(owner3.finalizers().iter().any(|f| f == "foregroundDeletion"), "owner waits for dependents");
    vms.patch("dep3", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    eventually("foreground owner gone after its dependent", gone("owner3")).await;

    // Namespace deletion: Terminating, no new content, then everything goes.
    namespaces.delete("gc", &DeleteParams::default()).await.unwrap();
    let ns = namespaces.get("gc").await;
    if let Ok(ns) = ns {
        assert_eq!(ns.status.and_then(|s| s.phase).as_deref(), Some("Terminating"));
        if let Err(kube::Error::Api(e)) = vms.create(&PostParams::default(), &owner_of("late")).await {
            assert!(e.code == 403 || e.code == 404, "{e:?}");
        }
    }
    eventually("namespace and its content gone", || {
        let namespaces = namespaces.clone();
        let vms = vms.clone();
        async move {
            namespaces.get_opt("gc").await.unwrap().is_none()
                && vms.list(&ListParams::default()).await.is_ok_and(|l| l.items.is_empty())
        }
    })
    .await;
    let other: Api<VirtualMachine> = Api::namespaced(client, "missing");
    let err = other.create(&PostParams::default(), &vm("x", 1)).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 404), "{err}");
}
