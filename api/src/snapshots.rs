//! `/nodes/{node}/{qemu,lxc}/{vmid}/snapshot…`: snapshots as entries of `spec.snapshots`
//! (with the config they were taken with), rollbacks as `spec.rollback`. The node agent takes,
//! deletes and reverts qcow2 internal snapshots; each call is a task that ends when the agent
//! has applied the new generation. Refusals Proxmox reports from inside its worker (a name
//! already used, raw disks, a missing snapshot) end the task with Proxmox's message.

use std::collections::BTreeMap;

use kpve_crds::vm::{Rollback, Snapshot};
use kpve_crds::{PowerState, VirtualMachine, VirtualMachineSpec};
use kube::api::Api;
use serde_json::{Value, json};

use crate::cache;
use crate::envelope::PveError;
use crate::guests::{self, Call, Guest, Guests, Kind};

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `GET …/snapshot`: each snapshot, then `current` ("You are here!").
pub fn list(g: &Guest) -> Value {
    let mut out = Vec::new();
    let mut parent = None;
    if let Some(vm) = g.vm() {
        for s in &vm.spec.snapshots {
            let mut e = json!({"name": s.name, "snaptime": s.snaptime.unwrap_or(0), "vmstate": 0,
                               "description": s.description.clone().unwrap_or_default()});
            if let Some(p) = &s.parent {
                e["parent"] = json!(p);
            }
            out.push(e);
        }
        parent = vm.spec.parent.clone();
    }
    let mut current = json!({"name": "current", "digest": guests::config(g)["digest"], "running": u8::from(g.running()),
                             "description": "You are here!"});
    if let Some(p) = parent {
        current["parent"] = json!(p);
    }
    out.push(current);
    Value::Array(out)
}

/// `GET …/snapshot/{snapname}/config`: the config the snapshot was taken with.
pub fn config(g: &Guest, name: &str) -> Result<Value, PveError> {
    let snap = g
        .vm()
        .and_then(|vm| vm.spec.snapshots.iter().find(|s| s.name == name))
        .ok_or_else(|| PveError::new(500, format!("snapshot '{name}' does not exist")))?;
    let mut map = serde_json::Map::new();
    for line in snap.config.as_deref().unwrap_or("").lines() {
        if let Some((k, v)) = line.split_once(": ") {
            map.insert(k.to_string(), json!(v));
        }
    }
    map.insert("snaptime".into(), json!(snap.snaptime.unwrap_or(0)));
    if let Some(d) = &snap.description {
        map.insert("description".into(), json!(d));
    }
    if let Some(p) = &snap.parent {
        map.insert("parent".into(), json!(p));
    }
    Ok(Value::Object(map))
}

/// Replaces the VM's spec through `edit`, which may refuse with a message the task ends
/// with; returns the new generation.
async fn edit_vm(
    guests: &Guests,
    g: &Guest,
    mut edit: impl FnMut(&mut VirtualMachineSpec) -> Result<(), String>,
) -> Result<Result<i64, String>, PveError> {
    let api = Api::<VirtualMachine>::namespaced(guests.client.clone(), &g.namespace);
    let mut refusal = None;
    let saved = cache::replace_retrying(&api, &g.name, |vm| {
        vm.status = None;
        edit(&mut vm.spec).map_err(|m| {
            refusal = Some(m.clone());
            PveError::new(500, m)
        })
    })
    .await;
    match (saved, refusal) {
        (Err(_), Some(message)) => Ok(Err(message)),
        (Err(e), None) => Err(e),
        (Ok(vm), _) => {
            guests.settle(g, vm.metadata.resource_version.as_deref()).await;
            Ok(Ok(vm.metadata.generation.unwrap_or(0)))
        }
    }
}

/// `POST …/snapshot`.
pub async fn create(
    call: &Call<'_>,
    g: &Guest,
    params: &BTreeMap<String, String>,
) -> Result<Value, PveError> {
    let guests = call.guests;
    let name = params["snapname"].clone();
    if name == "current" || name.eq_ignore_ascii_case("pending") {
        return Err(PveError::new(500, format!("unable to use snapshot name '{name}' (reserved name)")));
    }
    if params.get("vmstate").is_some_and(|v| v == "1") && g.running() {
        return Err(PveError::new(
            500,
            "vmstate: snapshots with RAM are not supported by kpve yet (take a disk snapshot, vmstate=0)",
        ));
    }
    let log = format!("snapshot '{name}' of {} {}", g.label(), g.vmid);
    if g.kind == Kind::Lxc {
        // Containers live on dir storage, which has no snapshot feature in Proxmox either.
        return call.task(g, "snapshot", log, Err("snapshot feature is not available".into()));
    }
    let description = params.get("description").cloned();
    let outcome = edit_vm(guests, g, |spec| {
        if spec.template {
            return Err("you can't take a snapshot if it's a template".into());
        }
        if spec.snapshots.iter().any(|s| s.name == name) {
            return Err(format!("snapshot name '{name}' already used"));
        }
        if spec.disks.iter().any(|d| !d.is_media() && d.image_format() != "qcow2") {
            return Err("snapshot feature is not available".into());
        }
        let config = spec.to_qemu_config();
        for s in spec.snapshots.iter_mut().filter(|s| s.parent.as_deref() == Some(name.as_str())) {
            s.parent = None;
        }
        spec.snapshots.push(Snapshot {
            name: name.clone(),
            description: description.clone(),
            snaptime: Some(now()),
            parent: spec.parent.clone(),
            config: Some(config),
        });
        spec.parent = Some(name.clone());
        Ok(())
    })
    .await?;
    call.task(g, "snapshot", log, outcome)
}

/// `DELETE …/snapshot/{snapname}`.
pub async fn delete(call: &Call<'_>, g: &Guest, name: &str) -> Result<Value, PveError> {
    let guests = call.guests;
    let log = format!("delete snapshot '{name}' of {} {}", g.label(), g.vmid);
    if g.kind == Kind::Lxc {
        return call.task(g, "delsnapshot", log, Err(format!("snapshot '{name}' does not exist")));
    }
    // A clone still copying from this snapshot would read clusters being freed.
    let copying = guests::list(guests, Some(Kind::Qemu)).await?.into_iter().find(|o| {
        o.vm().is_some_and(|vm| {
            vm.spec.disks.iter().any(|d| {
                d.clone_from.as_ref().is_some_and(|c| {
                    c.snapshot.as_deref() == Some(name)
                        && c.volume.split(':').nth(1).is_some_and(|v| v.starts_with(&format!("{}/", g.vmid)))
                }) && !o.status.volumes.contains_key(&d.id)
            })
        })
    });
    if let Some(clone) = copying {
        return Err(PveError::new(
            500,
            format!(
                "snapshot '{name}' is being cloned to VM {}; try again once that clone is done",
                clone.vmid
            ),
        ));
    }
    let outcome = edit_vm(guests, g, |spec| {
        let Some(at) = spec.snapshots.iter().position(|s| s.name == name) else {
            return Err(format!("snapshot '{name}' does not exist"));
        };
        if spec.template {
            return Err("you can't delete a snapshot if vm is a template".into());
        }
        let gone = spec.snapshots.remove(at);
        // Whatever derived from it now derives from its parent.
        for s in spec.snapshots.iter_mut().filter(|s| s.parent.as_deref() == Some(name)) {
            s.parent = gone.parent.clone();
        }
        if spec.parent.as_deref() == Some(name) {
            spec.parent = gone.parent.clone();
        }
        if spec.rollback.as_ref().is_some_and(|r| r.snapshot == name) {
            spec.rollback = None;
        }
        Ok(())
    })
    .await?;
    call.task(g, "delsnapshot", log, outcome)
}

/// `POST …/snapshot/{snapname}/rollback`: the config the snapshot was taken with becomes the
/// spec again (keeping the current description, HA, firewall, snapshots and placement), and
/// `spec.rollback` asks the agent to stop the VM and revert its disks. `start=1` declares it
/// Running afterwards, otherwise it stays stopped, as in Proxmox.
pub async fn rollback(
    call: &Call<'_>,
    g: &Guest,
    params: &BTreeMap<String, String>,
) -> Result<Value, PveError> {
    let guests = call.guests;
    let name = params["snapname"].clone();
    let log = format!("rollback {} {} to snapshot '{name}'", g.label(), g.vmid);
    if g.kind == Kind::Lxc {
        return call.task(g, "rollback", log, Err(format!("snapshot '{name}' does not exist")));
    }
    let start = params.get("start").is_some_and(|v| v == "1");
    let id = format!("{}-{}", now(), uuid::Uuid::new_v4().simple());
    let outcome = edit_vm(guests, g, |spec| {
        if spec.template {
            return Err("you can't rollback if vm is a template".into());
        }
        let snap = spec
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("snapshot '{name}' does not exist"))?;
        let mut restored = VirtualMachineSpec::from_qemu_config(snap.config.as_deref().unwrap_or(""))
            .map_err(|e| format!("snapshot '{name}' has an unreadable config: {e}"))?;
        // Disks keep their order: a volume allocated from a pool is named by its position.
        let position = |id: &str| spec.disks.iter().position(|d| d.id == id).unwrap_or(usize::MAX);
        restored.disks.sort_by_key(|d| position(&d.id));
        restored.vmid = spec.vmid;
        restored.description = spec.description.clone();
        restored.placement = spec.placement.clone();
        restored.ha = spec.ha.clone();
        restored.firewall = spec.firewall.clone();
        restored.snapshots = std::mem::take(&mut spec.snapshots);
        restored.parent = Some(name.clone());
        restored.rollback = Some(Rollback { snapshot: name.clone(), id: id.clone() });
        restored.power_state = if start { PowerState::Running } else { PowerState::Stopped };
        *spec = restored;
        Ok(())
    })
    .await?;
    call.task(g, "rollback", log, outcome)
}
