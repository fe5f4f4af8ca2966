//! The scheduler: binds each unplaced guest (VM or container) to a node by writing
//! `status.node`, `status.vmid` and the `Scheduled` condition. It never changes spec and never
//! moves a bound guest (migration and HA recovery are other controllers' business).
//!
//! Capacity is computed from the guest caches, not from `Hypervisor.status.allocated`, plus the
//! bindings this process wrote that the caches do not show yet ([`assume`]). Placement decisions
//! are serialised by one lock shared by both guest kinds, so two guests never race for the same
//! free memory.

mod assume;
mod migration;
mod placement;

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kpve_crds::kube::api::{Api, Patch, PatchParams};
use kpve_crds::kube::runtime::controller::{Action, Controller};
use kpve_crds::kube::runtime::reflector::{self, ObjectRef, Store};
use kpve_crds::kube::runtime::{WatchStreamExt, watcher};
use kpve_crds::kube::{Client, Resource, ResourceExt};
use kpve_crds::{
    Condition, ConditionStatus, Hypervisor, LinuxContainer, VirtualMachine, condition_type, find_condition,
    set_condition,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use self::assume::{AssumeCache, CachedGuest};
pub use self::placement::{GuestDemand, NodeView, Readiness, Resources, Unschedulable, disallowed, place};
use crate::guest_kind::GuestKind;
use crate::{ControllersConfig, drain, now_rfc3339};

/// Field manager of everything the scheduler writes.
pub const FIELD_MANAGER: &str = "kpve-scheduler";
/// `Scheduled=True` reason.
pub const REASON_SCHEDULED: &str = "Scheduled";
/// `Scheduled=False` reason; the message lists why each node was rejected.
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
/// How soon an unschedulable guest is tried again (capacity may free up without any
/// Hypervisor changing, e.g. when another guest is deleted).
pub const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(10);

const ERROR_RETRY: Duration = Duration::from_secs(5);
/// How long a reconcile waits for the guest and Hypervisor caches to finish their first list.
const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status")]
    Status(#[from] kpve_crds::kube::Error),
    #[error("the {0} cache did not finish its first list within {CACHE_SYNC_TIMEOUT:?}")]
    CacheNotSynced(String),
    #[error("the object has no metadata.uid")]
    NoUid,
}

pub struct Context {
    client: Client,
    vms: Cache<VirtualMachine>,
    cts: Cache<LinuxContainer>,
    nodes: Cache<Hypervisor>,
    assumed: Mutex<AssumeCache>,
    heartbeat_timeout: Duration,
}

impl Context {
    async fn wait_for_caches(&self) -> Result<(), Error> {
        self.vms.synced().await?;
        self.cts.synced().await?;
        self.nodes.synced().await
    }

    /// Every Hypervisor as a [`NodeView`], with allocations from the caches and `assumed`.
    fn node_views(&self, assumed: &mut AssumeCache) -> Vec<NodeView> {
        let vms = self.vms.store.state();
        let cts = self.cts.store.state();
        let guests = vms.iter().map(|g| cached(&**g)).chain(cts.iter().map(|g| cached(&**g)));
        let allocated = assumed.allocations(guests);
        let now = jiff::Timestamp::now();
        self.nodes
            .store
            .state()
            .iter()
            .map(|hv| {
                let used = allocated.get(&hv.name_any()).copied().unwrap_or_default();
                NodeView::from_hypervisor(hv, used, now, self.heartbeat_timeout)
            })
            .collect()
    }
}

/// A watch cache of one kind that tells when its first list is complete.
///
/// Not `Store::wait_until_ready`: its one-shot keeps a single waker, so with several
/// reconciles (and the controller's own applier) waiting at once, all but one miss the wake-up.
pub(crate) struct Cache<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub(crate) store: Store<K>,
    listed: tokio::sync::watch::Receiver<bool>,
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    /// The cache, and the future that fills it (runs until the process ends).
    pub(crate) fn new(api: Api<K>) -> (Self, impl Future<Output = ()> + Send) {
        let (store, writer) = reflector::store();
        let (listed_tx, listed) = tokio::sync::watch::channel(false);
        let fill = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .for_each(move |event| {
                match event {
                    // The reflector has swapped the complete list into the store by now.
                    Ok(watcher::Event::InitDone) => {
                        listed_tx.send_replace(true);
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying"),
                }
                futures::future::ready(())
            });
        (Cache { store, listed }, fill)
    }

    pub(crate) async fn synced(&self) -> Result<(), Error> {
        let mut listed = self.listed.clone();
        match tokio::time::timeout(CACHE_SYNC_TIMEOUT, listed.wait_for(|listed| *listed)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::CacheNotSynced(K::kind(&()).into_owned())),
        }
    }
}

fn cached<K: GuestKind>(guest: &K) -> CachedGuest<'_> {
    CachedGuest {
        uid: guest.meta().uid.as_deref().unwrap_or_default(),
        node: guest.node(),
        demand: guest.demand().resources(),
    }
}

/// The `Scheduled` condition to write, with the transition time of the current one kept when
/// the status does not change.
fn scheduled_condition<K: GuestKind>(
    guest: &K,
    status: ConditionStatus,
    reason: &str,
    message: String,
) -> Condition {
    let mut conditions = guest.guest_status().map(|s| s.conditions.clone()).unwrap_or_default();
    let new = Condition {
        type_: condition_type::SCHEDULED.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: guest.meta().generation,
    };
    set_condition(&mut conditions, new, &now_rfc3339());
    find_condition(&conditions, condition_type::SCHEDULED).cloned().expect("set_condition inserted it")
}

async fn apply_status<K: GuestKind>(
    client: &Client,
    guest: &K,
    status: serde_json::Value,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(client.clone(), &guest.namespace().unwrap_or_default());
    let body = json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status });
    api.patch_status(&guest.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Places one unbound guest, or records why it cannot be placed. Bound and terminating guests
/// are left alone.
pub async fn reconcile<K: GuestKind>(guest: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    if guest.meta().deletion_timestamp.is_some() || guest.node().is_some() {
        return Ok(Action::await_change());
    }
    ctx.wait_for_caches().await?;
    let uid = guest.uid().ok_or(Error::NoUid)?;
    let demand = guest.demand();
    let decision = {
        let mut assumed = ctx.assumed.lock().expect("assume cache lock poisoned");
        if assumed.contains(&uid) {
            // Bound by us a moment ago; the cache has not caught up.
            return Ok(Action::await_change());
        }
        let nodes = ctx.node_views(&mut assumed);
        let decision = place(&demand, &nodes);
        if let Ok(node) = &decision {
            assumed.assume(&uid, node, demand.resources());
        }
        decision
    };
    match decision {
        Ok(node) => {
            let condition = scheduled_condition(
                &*guest,
                ConditionStatus::True,
                REASON_SCHEDULED,
                format!("placed on {node}"),
            );
            let mut status = json!({ "node": node, "conditions": [condition] });
            if let Some(vmid) = guest.spec_vmid() {
                status["vmid"] = vmid.into();
            }
            if let Err(error) = apply_status(&ctx.client, &*guest, status).await {
                ctx.assumed.lock().expect("assume cache lock poisoned").forget(&uid);
                return Err(error);
            }
            tracing::info!(%node, cpus = demand.cpus, memory_mib = demand.memory_mib, "scheduled");
            Ok(Action::await_change())
        }
        Err(unschedulable) => {
            let condition = scheduled_condition(
                &*guest,
                ConditionStatus::False,
                REASON_UNSCHEDULABLE,
                unschedulable.to_string(),
            );
            let current =
                guest.guest_status().and_then(|s| find_condition(&s.conditions, condition_type::SCHEDULED));
            if current != Some(&condition) {
                tracing::info!(reason = %unschedulable, "unschedulable");
                apply_status(&ctx.client, &*guest, json!({ "conditions": [condition] })).await?;
            }
            Ok(Action::requeue(UNSCHEDULABLE_RETRY))
        }
    }
}

pub fn error_policy<K: GuestKind>(_guest: Arc<K>, _error: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(ERROR_RETRY)
}

/// Maps any Hypervisor change to the guests of kind `K` still waiting for a node: a node that
/// joins, becomes ready or leaves maintenance may take them now.
fn unscheduled<K: GuestKind>(
    store: Store<K>,
) -> impl Fn(Hypervisor) -> Vec<ObjectRef<K>> + Send + Sync + 'static {
    move |_| {
        store
            .state()
            .iter()
            .filter(|g| g.node().is_none() && g.meta().deletion_timestamp.is_none())
            .map(|g| ObjectRef::from_obj(&**g))
            .collect()
    }
}

/// Runs the scheduler for VMs and containers until one of its watches ends.
pub async fn run(client: Client, config: &ControllersConfig) -> crate::Result<()> {
    let (vms, fill_vms) = Cache::new(Api::<VirtualMachine>::all(client.clone()));
    let (cts, fill_cts) = Cache::new(Api::<LinuxContainer>::all(client.clone()));
    let (nodes, fill_nodes) = Cache::new(Api::<Hypervisor>::all(client.clone()));
    let ctx = Arc::new(Context {
        client: client.clone(),
        vms,
        cts,
        nodes,
        assumed: Mutex::default(),
        heartbeat_timeout: config.heartbeat_timeout,
    });
    let hypervisors = Api::<Hypervisor>::all(client.clone());
    let vms = Controller::new(Api::<VirtualMachine>::all(client.clone()), watcher::Config::default())
        .watches(hypervisors.clone(), watcher::Config::default(), unscheduled(ctx.vms.store.clone()))
        .run(reconcile::<VirtualMachine>, error_policy::<VirtualMachine>, ctx.clone());
    let cts = Controller::new(Api::<LinuxContainer>::all(client), watcher::Config::default())
        .watches(hypervisors, watcher::Config::default(), unscheduled(ctx.cts.store.clone()))
        .run(reconcile::<LinuxContainer>, error_policy::<LinuxContainer>, ctx.clone());
    tokio::select! {
        () = fill_vms => Err(crate::Error::Stopped("scheduler VirtualMachine cache")),
        () = fill_cts => Err(crate::Error::Stopped("scheduler LinuxContainer cache")),
        () = fill_nodes => Err(crate::Error::Stopped("scheduler Hypervisor cache")),
        () = drain("scheduler", vms, |_| false) => Err(crate::Error::Stopped("VirtualMachine scheduler")),
        () = drain("scheduler", cts, |_| false) => Err(crate::Error::Stopped("LinuxContainer scheduler")),
        () = migration::run(ctx) => Err(crate::Error::Stopped("migration controller")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_with_scheduled(status: &str, message: &str) -> VirtualMachine {
        serde_json::from_value(json!({
            "apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "default", "generation": 3},
            "spec": {},
            "status": {"conditions": [{
                "type": "Scheduled", "status": status, "reason": REASON_UNSCHEDULABLE, "message": message,
                "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3,
            }, {"type": "Ready", "status": "False"}]}
        }))
        .unwrap()
    }

    #[test]
    fn an_unchanged_decision_rewrites_nothing() {
        let vm = vm_with_scheduled("False", "0/1 nodes available: n1: maintenance");
        let current = find_condition(&vm.status.as_ref().unwrap().conditions, condition_type::SCHEDULED);
        let again = scheduled_condition(
            &vm,
            ConditionStatus::False,
            REASON_UNSCHEDULABLE,
            "0/1 nodes available: n1: maintenance".into(),
        );
        assert_eq!(Some(&again), current, "same status, reason and message: identical condition");

        // A new message keeps the transition time; a new status moves it.
        let other =
            scheduled_condition(&vm, ConditionStatus::False, REASON_UNSCHEDULABLE, "0/0 nodes".into());
        assert_eq!(other.last_transition_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        let placed = scheduled_condition(&vm, ConditionStatus::True, REASON_SCHEDULED, "placed on n1".into());
        assert_ne!(placed.last_transition_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(placed.observed_generation, Some(3));
        assert_eq!(placed.type_, condition_type::SCHEDULED);
    }
}
