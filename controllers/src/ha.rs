//! The HA cluster resource manager (CRM): runs [`kpve_ha::crm::Crm`] over watch caches of the
//! node Leases (`kube-node-lease`), Hypervisors, HAGroups and the HA guests, and writes what
//! it decides — `status.node` for a recovery or a move, `status.ha` (state, relocations,
//! migration, failover timeline) — plus an Event for each step.
//!
//! Two guards keep a lagging cache from causing a double run:
//! - every guest write carries the resourceVersion the decision was made on (409 → the next
//!   tick decides again on fresh data, and that guest's Events are dropped);
//! - before a node is judged expired, its Lease is read from the server itself: a renewal the
//!   watch has not delivered yet still counts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, ObjectReference};
use kpve_crds::kube::api::{Api, Patch, PatchParams, PostParams};
use kpve_crds::kube::{Client, Resource, ResourceExt};
use kpve_crds::{
    GuestObject, HAGroup, HaFailover, HaMigrate, HaState, HaStatus, Hypervisor, LinuxContainer,
    VirtualMachine,
};
use kpve_ha::Ms;
use kpve_ha::crm::{self, Action, Crm, Subject};
use serde_json::{Value, json};

use crate::scheduler::Cache;

/// Field manager of the CRM's status writes.
pub const FIELD_MANAGER: &str = "kpve-ha-crm";
/// Namespace of the node Leases (as Kubernetes keeps them).
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How often the CRM decides. Lease ages are measured on this clock.
const TICK: Duration = Duration::from_millis(250);
/// A lease this close to expiry is read from the server before the CRM judges it.
const RECHECK_BEFORE: Ms = 1_000;

fn unix_ms() -> Ms {
    jiff::Timestamp::now().as_millisecond().max(0) as Ms
}

fn rfc3339(ms: Ms) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

fn parse_ms(text: &str) -> Option<Ms> {
    text.parse::<jiff::Timestamp>().ok().map(|t| t.as_millisecond().max(0) as Ms)
}

fn renew_token(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.renew_time.as_ref().map(|t| t.0.to_string())
}

fn lease_ms(lease: Option<&Lease>) -> Ms {
    lease
        .and_then(|l| l.spec.as_ref()?.lease_duration_seconds)
        .map(|s| s.max(1) as Ms * 1000)
        .unwrap_or(40_000)
}

/// The CRM's record as the core sees it.
pub fn record_from_status(status: Option<&HaStatus>) -> crm::Record {
    let Some(s) = status else { return crm::Record::default() };
    crm::Record {
        state: crm::State::parse(&s.state).unwrap_or_default(),
        relocates: s.relocates,
        migrate: s.migrate.as_ref().map(|m| crm::Migrate { id: m.id, target: m.target.clone() }),
        home: s.home.clone(),
        failover: s.failover.as_ref().map(|f| crm::Failover {
            from: f.from.clone(),
            detected: parse_ms(&f.detected).unwrap_or(0),
            fenced: parse_ms(&f.fenced).unwrap_or(0),
            recovered: f.recovered_to.clone().zip(f.recovered.as_deref().and_then(parse_ms)),
            running: f.running.as_deref().and_then(parse_ms),
        }),
        message: s.message.clone(),
    }
}

/// The record as written to `status.ha`.
pub fn status_from_record(r: &crm::Record) -> HaStatus {
    HaStatus {
        state: r.state.as_str().into(),
        relocates: r.relocates,
        migrate: r.migrate.as_ref().map(|m| HaMigrate { id: m.id, target: m.target.clone() }),
        home: r.home.clone(),
        failover: r.failover.as_ref().map(|f| HaFailover {
            from: f.from.clone(),
            detected: rfc3339(f.detected),
            fenced: rfc3339(f.fenced),
            recovered_to: f.recovered.as_ref().map(|(n, _)| n.clone()),
            recovered: f.recovered.as_ref().map(|(_, t)| rfc3339(*t)),
            running: f.running.map(rfc3339),
        }),
        message: r.message.clone(),
    }
}

pub fn request(state: &HaState) -> crm::Request {
    match state {
        HaState::Started => crm::Request::Started,
        HaState::Stopped => crm::Request::Stopped,
        HaState::Disabled => crm::Request::Disabled,
        HaState::Ignored => crm::Request::Ignored,
    }
}

/// Where a guest lives, for writing back.
struct Target {
    kind: &'static str,
    namespace: String,
    name: String,
    resource_version: Option<String>,
}

fn guest_input<K: GuestObject>(
    guest: &K,
    prefix: &str,
    kind: &'static str,
    targets: &mut BTreeMap<String, Target>,
) -> Option<crm::Guest> {
    let spec = guest.guest_spec();
    let ha = spec.ha()?;
    let status = guest.guest_status();
    let vmid = spec.vmid().or(status.and_then(|s| s.vmid))?;
    if guest.meta().deletion_timestamp.is_some() {
        return None;
    }
    let id = format!("{prefix}:{vmid}");
    let node = status.and_then(|s| s.node.clone());
    let lrm = status.and_then(|s| s.ha_lrm.as_ref()).map(crm::LrmReport::from);
    let reported_here = lrm.as_ref().is_some_and(|r| Some(&r.node) == node.as_ref());
    let running = reported_here
        && status.is_some_and(|s| {
            matches!(s.phase, kpve_crds::GuestPhase::Running | kpve_crds::GuestPhase::Paused)
        });
    targets.insert(
        id.clone(),
        Target {
            kind,
            namespace: guest.namespace().unwrap_or_default(),
            name: guest.name_any(),
            resource_version: guest.resource_version(),
        },
    );
    Some(crm::Guest {
        id,
        request: request(&ha.state),
        group: ha.group.clone(),
        max_restart: ha.max_restart,
        max_relocate: ha.max_relocate,
        node,
        running,
        lrm,
        ha: record_from_status(status.and_then(|s| s.ha.as_ref())),
    })
}

struct Ctx {
    client: Client,
    leases: Cache<Lease>,
    nodes: Cache<Hypervisor>,
    groups: Cache<HAGroup>,
    vms: Cache<VirtualMachine>,
    cts: Cache<LinuxContainer>,
}

/// Runs the CRM until one of its caches stops.
pub async fn run(client: Client) -> crate::Result<()> {
    let (leases, fill_leases) = Cache::new(Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE));
    let (nodes, fill_nodes) = Cache::new(Api::<Hypervisor>::all(client.clone()));
    let (groups, fill_groups) = Cache::new(Api::<HAGroup>::all(client.clone()));
    let (vms, fill_vms) = Cache::new(Api::<VirtualMachine>::all(client.clone()));
    let (cts, fill_cts) = Cache::new(Api::<LinuxContainer>::all(client.clone()));
    let ctx = Arc::new(Ctx { client, leases, nodes, groups, vms, cts });
    tokio::select! {
        () = fill_leases => Err(crate::Error::Stopped("HA CRM Lease cache")),
        () = fill_nodes => Err(crate::Error::Stopped("HA CRM Hypervisor cache")),
        () = fill_groups => Err(crate::Error::Stopped("HA CRM HAGroup cache")),
        () = fill_vms => Err(crate::Error::Stopped("HA CRM VirtualMachine cache")),
        () = fill_cts => Err(crate::Error::Stopped("HA CRM LinuxContainer cache")),
        () = decide_forever(ctx) => Err(crate::Error::Stopped("HA CRM")),
    }
}

async fn decide_forever(ctx: Arc<Ctx>) {
    let mut crm = Crm::new();
    // Lease ages on a monotonic clock: a wall-clock jump must not fence every node at once.
    // (Timeline timestamps are wall time as of the CRM's start plus monotonic time since.)
    let (wall, started) = (unix_ms(), std::time::Instant::now());
    let now = move || wall + started.elapsed().as_millis() as Ms;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let synced = ctx.leases.synced().await.is_ok()
            && ctx.nodes.synced().await.is_ok()
            && ctx.groups.synced().await.is_ok()
            && ctx.vms.synced().await.is_ok()
            && ctx.cts.synced().await.is_ok();
        if synced {
            decide_once(&ctx, &mut crm, now()).await;
        }
    }
}

async fn decide_once(ctx: &Ctx, crm: &mut Crm, now: Ms) {
    let leases: BTreeMap<String, Arc<Lease>> =
        ctx.leases.store.state().into_iter().map(|l| (l.name_any(), l)).collect();
    let lease_api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let mut nodes = Vec::new();
    let hypervisors: BTreeMap<String, bool> =
        ctx.nodes.store.state().iter().map(|hv| (hv.name_any(), hv.spec.maintenance)).collect();
    // A node is judged by its Lease; a Hypervisor without one yet counts from when it appeared.
    let names: std::collections::BTreeSet<String> =
        hypervisors.keys().chain(leases.keys()).cloned().collect();
    for name in names {
        let maintenance = hypervisors.get(&name).copied().unwrap_or(false);
        let lease = leases.get(&name).map(|l| (**l).clone());
        let duration = lease_ms(lease.as_ref());
        let mut renew = lease.as_ref().and_then(renew_token);
        // About to be judged expired: believe the server, not the watch.
        if crm.silent_for(&name, now, renew.as_deref()).is_some_and(|s| s + RECHECK_BEFORE >= duration) {
            match lease_api.get_opt(&name).await {
                Ok(fresh) => renew = fresh.as_ref().and_then(renew_token),
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot read the node's lease; not judging it now");
                    return;
                }
            }
        }
        nodes.push(crm::Node { name, renew, lease: duration, maintenance });
    }
    let groups: Vec<crm::Group> = ctx
        .groups
        .store
        .state()
        .iter()
        .map(|g| crm::Group {
            name: g.name_any(),
            nodes: g.spec.nodes.iter().map(|n| (n.node.clone(), n.priority)).collect(),
            restricted: g.spec.restricted,
            nofailback: g.spec.nofailback,
        })
        .collect();
    let mut targets = BTreeMap::new();
    let mut guests = Vec::new();
    for vm in ctx.vms.store.state() {
        guests.extend(guest_input(&*vm, "vm", "VirtualMachine", &mut targets));
    }
    for ct in ctx.cts.store.state() {
        guests.extend(guest_input(&*ct, "ct", "LinuxContainer", &mut targets));
    }
    let actions = crm.tick(now, &nodes, &groups, &guests);
    // Writes first, per guest; a guest whose write was refused gets no Events this time.
    let mut refused = std::collections::BTreeSet::new();
    for action in &actions {
        let (guest, status) = match action {
            Action::Bind { guest, node, ha } => (guest, json!({ "node": node, "ha": ha_patch(ha) })),
            Action::Record { guest, ha } => (guest, json!({ "ha": ha_patch(ha) })),
            Action::Event { .. } => continue,
        };
        let Some(target) = targets.get_mut(guest) else { continue };
        if refused.contains(guest) {
            continue;
        }
        match write_status(&ctx.client, target, status).await {
            Ok(rv) => target.resource_version = rv,
            Err(e) => {
                tracing::debug!(%guest, error = %e, "HA status not written; deciding again next tick");
                refused.insert(guest.clone());
            }
        }
    }
    for action in actions {
        let Action::Event { subject, reason, message, warning } = action else { continue };
        match &subject {
            Subject::Guest(id) if refused.contains(id) => continue,
            Subject::Guest(id) => {
                if warning {
                    tracing::warn!(guest = %id, reason, "{message}");
                } else {
                    tracing::info!(guest = %id, reason, "{message}");
                }
            }
            Subject::Node(node) => tracing::warn!(%node, reason, "{message}"),
        }
        let involved = match &subject {
            Subject::Guest(id) => targets.get(id).map(|t| (t.kind, t.namespace.clone(), t.name.clone())),
            Subject::Node(node) => Some(("Hypervisor", "default".to_string(), node.clone())),
        };
        if let Some((kind, namespace, name)) = involved {
            record_event(&ctx.client, kind, &namespace, &name, reason, &message, warning).await;
        }
    }
}

/// `status.ha` as a merge patch: every field present, `null` for what is gone (a merge patch
/// leaves absent keys alone, so a cleared migration or home would otherwise stay).
fn ha_patch(record: &crm::Record) -> Value {
    let s = status_from_record(record);
    json!({
        "state": s.state,
        "relocates": s.relocates,
        "migrate": s.migrate,
        "home": s.home,
        "message": (!s.message.is_empty()).then_some(s.message),
        "failover": s.failover.map(|f| json!({
            "from": f.from, "detected": f.detected, "fenced": f.fenced,
            "recoveredTo": f.recovered_to, "recovered": f.recovered, "running": f.running,
        })),
    })
}

/// Merge-patches `status` with the resourceVersion the decision was made on; the new one.
async fn write_status(
    client: &Client,
    target: &Target,
    status: Value,
) -> Result<Option<String>, kpve_crds::kube::Error> {
    let body = json!({
        "metadata": { "resourceVersion": target.resource_version },
        "status": status,
    });
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
    let rv = match target.kind {
        "VirtualMachine" => Api::<VirtualMachine>::namespaced(client.clone(), &target.namespace)
            .patch_status(&target.name, &params, &Patch::Merge(&body))
            .await?
            .resource_version(),
        _ => Api::<LinuxContainer>::namespaced(client.clone(), &target.namespace)
            .patch_status(&target.name, &params, &Patch::Merge(&body))
            .await?
            .resource_version(),
    };
    Ok(rv)
}

async fn record_event(
    client: &Client,
    kind: &str,
    namespace: &str,
    name: &str,
    reason: &str,
    message: &str,
    warning: bool,
) {
    let now = jiff::Timestamp::now();
    let event = Event {
        metadata: kpve_crds::kube::api::ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(VirtualMachine::api_version(&()).into_owned()),
            kind: Some(kind.into()),
            name: Some(name.into()),
            namespace: (kind != "Hypervisor").then(|| namespace.to_string()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        first_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        last_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some(FIELD_MANAGER.into()),
            host: None,
        }),
        count: Some(1),
        ..Default::default()
    };
    if let Err(e) =
        Api::<Event>::namespaced(client.clone(), namespace).create(&PostParams::default(), &event).await
    {
        tracing::debug!(error = %e, "event not recorded");
    }
}
