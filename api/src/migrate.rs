//! `POST /nodes/{node}/{qemu,lxc}/{vmid}/migrate` and its precondition `GET`: Proxmox's `qm
//! migrate` and `pct migrate`. A running VM gets a live-migration order (`status.migration`,
//! carried out by the agents and bound by the migration controller) and a `qmigrate` task
//! that follows it; a container moves by restart migration (stopped, its local volumes
//! copied, started on the target: `vzmigrate`); a stopped guest whose volumes need no copy is
//! bound to the target at once (an offline move).

use std::collections::BTreeMap;

use kpve_crds::common::GuestObject;
use kpve_crds::{Hypervisor, LinuxContainer, Migration, MigrationPhase, StoragePool, VirtualMachine};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::envelope::PveError;
use crate::guests::{Guest, Guests, Kind};
use crate::tasks::{Target, Task, Tasks};

/// Field manager of the API's migration orders.
const FIELD_MANAGER: &str = "kpve-pve-api";

fn failure(message: impl Into<String>) -> PveError {
    PveError::new(500, message)
}

/// Pool name → whether it is shared.
async fn shared_pools(client: &kube::Client) -> BTreeMap<String, bool> {
    let pools: Api<StoragePool> = Api::all(client.clone());
    pools
        .list(&Default::default())
        .await
        .map(|l| l.items.into_iter().map(|p| (p.name_any(), p.spec.shared)).collect())
        .unwrap_or_default()
}

/// The guest's disks on storage that is not shared (they must be copied to move the guest).
async fn local_disks(client: &kube::Client, vm: &VirtualMachine) -> Vec<(String, String)> {
    let shared = shared_pools(client).await;
    let status = vm.status.clone().unwrap_or_default();
    vm.spec
        .disks
        .iter()
        .filter(|d| !d.is_media())
        .filter_map(|d| {
            let volume =
                d.volume.clone().or_else(|| status.volumes.get(&d.id).cloned()).or_else(|| {
                    d.pool.as_ref().map(|p| format!("{p}:{}", d.size.clone().unwrap_or_default()))
                })?;
            let pool = volume.split(':').next().unwrap_or("").to_string();
            (!shared.get(&pool).copied().unwrap_or(false)).then(|| (d.id.clone(), volume))
        })
        .collect()
}

async fn nodes(client: &kube::Client) -> Result<Vec<Hypervisor>, PveError> {
    let hvs: Api<Hypervisor> = Api::all(client.clone());
    hvs.list(&Default::default()).await.map(|l| l.items).map_err(|e| failure(e.to_string()))
}

fn the_vm(g: &Guest) -> Result<&VirtualMachine, PveError> {
    g.vm().map(|vm| &**vm).ok_or_else(|| failure("not a VM"))
}

/// `GET …/migrate`: what a migration of the VM would involve.
pub async fn precondition(guests: &Guests, g: &Guest) -> Result<Value, PveError> {
    let vm = the_vm(g)?;
    let here = g.status.node.clone().unwrap_or_default();
    let allowed: Vec<String> =
        nodes(&guests.client).await?.iter().map(|h| h.name_any()).filter(|n| *n != here).collect();
    let local: Vec<Value> = local_disks(&guests.client, vm)
        .await
        .into_iter()
        .map(|(_, volid)| json!({"volid": volid, "cdrom": false, "is_unused": false}))
        .collect();
    Ok(json!({
        "running": g.running(),
        "allowed_nodes": allowed,
        "not_allowed_nodes": {},
        "local_disks": local,
        "local_resources": [],
        "mapped-resources": [],
        "mapped-resource-info": {},
        "has-dbus-vmstate": false,
    }))
}

/// `POST …/migrate`.
pub async fn migrate(
    guests: &Guests,
    tasks: &Tasks,
    node: &str,
    g: &Guest,
    params: &BTreeMap<String, String>,
    user: &str,
) -> Result<Value, PveError> {
    let target = params.get("target").cloned().unwrap_or_default();
    let flag = |k: &str| params.get(k).is_some_and(|v| v == "1");
    if g.kind != Kind::Qemu {
        let ct = g.ct().ok_or_else(|| failure("not a container"))?;
        if g.running() && flag("online") {
            // Proxmox fails the task, before it looks at restart mode.
            let error = "lxc live migration is currently not implemented".to_string();
            let log = format!("starting migration of CT {} to node '{target}'", g.vmid);
            return record(tasks, node, g, user, log, None, Some(error));
        }
        let order = order_ct_move(&guests.client, ct, &target, user, flag("restart"), flag("online")).await?;
        let log = match &order {
            None => format!("migrate stopped CT {} to node '{target}'", g.vmid),
            Some(_) => format!("starting migration of CT {} to node '{target}' (restart mode)", g.vmid),
        };
        return record(tasks, node, g, user, log, order, None);
    }
    let vm = the_vm(g)?;
    let here = g.status.node.clone().unwrap_or_default();
    match order_move(&guests.client, vm, &target, user, flag("online"), flag("with-local-disks")).await? {
        None => {
            let log = format!("migrate stopped VM {} to node '{target}'", g.vmid);
            record(tasks, node, g, user, log, None, None)
        }
        Some(id) => {
            let log =
                format!("starting migration of VM {} from node '{here}' to node '{target}' (online)", g.vmid);
            record(tasks, node, g, user, log, Some(id), None)
        }
    }
}

/// Whether guest `what` (`VM 100`) on `here` may move to `target`: another node of the
/// cluster that its placement allows.
async fn check_target(
    client: &kube::Client,
    what: &str,
    here: &str,
    target: &str,
    placement: &kpve_crds::Placement,
) -> Result<(), PveError> {
    if target == here {
        return Err(failure("target is local node."));
    }
    if !nodes(client).await?.iter().any(|h| h.name_any() == target) {
        return Err(failure(format!("no such cluster node '{target}'")));
    }
    let allowed = &placement.nodes;
    if !allowed.is_empty() && !allowed.iter().any(|n| n == target) {
        return Err(failure(format!(
            "{what}'s placement does not allow node '{target}' (spec.placement.nodes: {})",
            allowed.join(", ")
        )));
    }
    Ok(())
}

/// A fresh read of `guest` (`what`: `VM 100`) for a move from `here`: refused when it is
/// bound elsewhere now or already migrating. The move's write carries its version: decide on
/// it, not on the cache.
async fn fresh_for_move<K: GuestObject>(
    client: &kube::Client,
    guest: &K,
    what: &str,
    here: &str,
) -> Result<K, PveError> {
    let api: Api<K> = Api::namespaced(client.clone(), &guest.namespace().unwrap_or_default());
    let fresh = api.get(&guest.name_any()).await.map_err(|e| failure(e.to_string()))?;
    let status = fresh.guest_status().cloned().unwrap_or_default();
    if let Some(m) = status.migration.as_ref().filter(|m| !m.phase.is_final()) {
        return Err(failure(format!("{what} is already migrating to {} ({})", m.target, m.id)));
    }
    if status.node.as_deref() != Some(here) {
        return Err(failure(format!("{what} moved while the request was checked; try again")));
    }
    Ok(fresh)
}

/// Merges `status` into the guest's status, if it is still the version `fresh` shows.
async fn write_move<K: GuestObject>(client: &kube::Client, fresh: &K, status: Value) -> Result<(), PveError> {
    let api: Api<K> = Api::namespaced(client.clone(), &fresh.namespace().unwrap_or_default());
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
    let body = json!({"metadata": {"resourceVersion": fresh.resource_version()}, "status": status});
    api.patch_status(&fresh.name_any(), &params, &Patch::Merge(&body))
        .await
        .map_err(|e| failure(e.to_string()))?;
    Ok(())
}

/// A new migration order from `here` to `target`.
fn new_order(here: &str, target: &str, requested_by: &str) -> Migration {
    let now = jiff::Timestamp::now();
    Migration {
        id: format!("pve-{}", now.as_millisecond()),
        source: here.to_string(),
        target: target.to_string(),
        phase: MigrationPhase::Pending,
        requested_by: Some(requested_by.to_string()),
        started: Some(now.round(jiff::Unit::Millisecond).expect("in range").to_string()),
        ..Migration::default()
    }
}

/// Moves VM `vm` to node `target` as `requested_by` asks: a stopped VM whose disks need no
/// copy is bound there at once (returns None); a running one gets a live-migration order
/// (returns its id) if `online` (and `with_local_disks` when it has local disks). Refusals are
/// Proxmox's messages. The order is written with the resourceVersion of a fresh read.
pub async fn order_move(
    client: &kube::Client,
    vm: &VirtualMachine,
    target: &str,
    requested_by: &str,
    online: bool,
    with_local_disks: bool,
) -> Result<Option<String>, PveError> {
    let vmid = vm.spec.vmid.unwrap_or(0);
    let status = vm.status.clone().unwrap_or_default();
    let here = status.node.clone().unwrap_or_default();
    check_target(client, &format!("VM {vmid}"), &here, target, &vm.spec.placement).await?;
    let local = local_disks(client, vm).await;
    let fresh = fresh_for_move(client, vm, &format!("VM {vmid}"), &here).await?;
    let running = matches!(
        fresh.status.as_ref().map(|s| s.phase),
        Some(kpve_crds::common::GuestPhase::Running | kpve_crds::common::GuestPhase::Paused)
    );
    if !running {
        // Offline: the config moves; disks on local storage would have to be copied.
        if !local.is_empty() {
            let list: Vec<&str> = local.iter().map(|(_, v)| v.as_str()).collect();
            return Err(failure(format!(
                "offline migration of local disks ({}) is not implemented in kpve: start the VM and migrate it online",
                list.join(", ")
            )));
        }
        write_move(client, &fresh, json!({"node": target})).await?;
        return Ok(None);
    }
    if !online {
        return Err(failure("can't migrate running VM without --online"));
    }
    if !local.is_empty() && !with_local_disks {
        return Err(failure("can't live migrate attached local disks without with-local-disks option"));
    }
    let order = new_order(&here, target, requested_by);
    write_move(client, &fresh, json!({"migration": order.to_merge_value()})).await?;
    Ok(Some(order.id))
}

/// Moves container `ct` to node `target` as `requested_by` asks: a stopped container whose
/// volumes are all on shared pools is bound there at once (returns None); a running one (with
/// `restart`: Proxmox's restart mode), or one with volumes on local pools, gets a migration
/// order (returns its id) — the source's agent stops it and copies the local volumes, the
/// target's starts it once it is bound there. Bind mounts of host paths do not move.
pub async fn order_ct_move(
    client: &kube::Client,
    ct: &LinuxContainer,
    target: &str,
    requested_by: &str,
    restart: bool,
    online: bool,
) -> Result<Option<String>, PveError> {
    let vmid = ct.spec.vmid.unwrap_or(0);
    let status = ct.status.clone().unwrap_or_default();
    let here = status.node.clone().unwrap_or_default();
    check_target(client, &format!("CT {vmid}"), &here, target, &ct.spec.placement).await?;
    let shared = shared_pools(client).await;
    let mut volumes =
        vec![("rootfs".to_string(), ct.spec.rootfs.pool.clone(), ct.spec.rootfs.volume.clone())];
    volumes.extend(ct.spec.mount_points.iter().map(|m| (m.id.clone(), m.pool.clone(), m.volume.clone())));
    let mut local = false;
    for (id, pool, volume) in volumes {
        if volume.as_deref().is_some_and(|v| v.starts_with('/')) {
            return Err(failure(format!("cannot migrate local bind mount point '{id}'")));
        }
        let pool = pool.or_else(|| volume.as_deref().and_then(|v| v.split(':').next().map(str::to_string)));
        local |= !pool.is_some_and(|p| shared.get(&p).copied().unwrap_or(false));
    }
    let fresh = fresh_for_move(client, ct, &format!("CT {vmid}"), &here).await?;
    let running = !matches!(
        fresh.status.as_ref().map(|s| s.phase).unwrap_or_default(),
        kpve_crds::common::GuestPhase::Stopped | kpve_crds::common::GuestPhase::Pending
    );
    if running && !restart {
        return Err(failure(if online {
            "lxc live migration is currently not implemented"
        } else {
            "can't migrate running container without --online or --restart"
        }));
    }
    if !(running || local) {
        write_move(client, &fresh, json!({"node": target})).await?;
        return Ok(None);
    }
    let order = new_order(&here, target, requested_by);
    write_move(client, &fresh, json!({"migration": order.to_merge_value()})).await?;
    Ok(Some(order.id))
}

fn record(
    tasks: &Tasks,
    node: &str,
    g: &Guest,
    user: &str,
    log: String,
    migration: Option<String>,
    error: Option<String>,
) -> Result<Value, PveError> {
    let task = Task {
        node,
        kind: if g.kind == Kind::Qemu { "qmigrate" } else { "vzmigrate" },
        guest_kind: g.kind,
        vmid: g.vmid,
        id: None,
        target: match migration {
            Some(id) => Target::Migrated(id),
            None => Target::Observed(0),
        },
        user,
        log: Some(log),
        error,
        volume: None,
    };
    tasks.record(task).map(Value::from).map_err(|e| failure(e.to_string()))
}

/// How the migration `id` of a guest stands, for its task: None while it runs. A container
/// that is to run has migrated once it runs on the target.
pub fn outcome(g: &Guest, id: &str) -> Option<Result<String, String>> {
    let status = &g.status;
    let m = status.migration.as_ref().filter(|m| m.id == id)?;
    if let Some(ct) = g.ct() {
        return match m.phase {
            MigrationPhase::Completed => {
                use kpve_crds::common::GuestPhase;
                let declared = match ct.spec.power_state {
                    kpve_crds::PowerState::Running => GuestPhase::Running,
                    kpve_crds::PowerState::Paused => GuestPhase::Paused,
                    kpve_crds::PowerState::Stopped => GuestPhase::Stopped,
                };
                let to_run = declared != GuestPhase::Stopped;
                let there = status.node.as_deref() == Some(m.target.as_str());
                (there && status.phase == declared).then(|| {
                    Ok(format!(
                        "migration finished: {} on '{}' after {} ms stopped, {} bytes of volumes copied",
                        if to_run { "started" } else { "stopped" },
                        m.target,
                        m.downtime_ms.unwrap_or(0),
                        m.transferred_bytes.unwrap_or(0)
                    ))
                })
            }
            MigrationPhase::Failed => {
                Some(Err(m.message.clone().unwrap_or_else(|| "migration failed".into())))
            }
            _ => None,
        };
    }
    match m.phase {
        MigrationPhase::Completed => Some(Ok(format!(
            "migration finished: running on '{}', downtime {} ms, {} bytes of memory and state sent",
            m.target,
            m.downtime_ms.unwrap_or(0),
            m.transferred_bytes.unwrap_or(0)
        ))),
        MigrationPhase::Failed => Some(Err(m.message.clone().unwrap_or_else(|| "migration failed".into()))),
        _ => None,
    }
}
