//! `/nodes/{node}/qemu` and `/nodes/{node}/lxc`: listing, `status/current`, `config` (through
//! the codec, as Proxmox prints it), and the power actions, which become a change of
//! `spec.powerState` plus a task that stays `running` until the guest reaches that state.

use std::collections::BTreeMap;

use kpve_crds::common::{GuestObject, GuestPhase, GuestStatus};
use kpve_crds::{LinuxContainer, VirtualMachine};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::envelope::PveError;
use crate::tasks::{Target, Tasks};

/// `qemu` or `lxc` in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Qemu,
    Lxc,
}

impl Kind {
    pub fn parse(segment: &str) -> Option<Kind> {
        match segment {
            "qemu" => Some(Kind::Qemu),
            "lxc" => Some(Kind::Lxc),
            _ => None,
        }
    }

    /// Task type prefix: `qmstart`, `vzstart`.
    pub fn task_prefix(self) -> &'static str {
        match self {
            Kind::Qemu => "qm",
            Kind::Lxc => "vz",
        }
    }
}

/// What the endpoints need of a guest of either kind.
pub struct Guest {
    pub kind: Kind,
    pub vmid: u32,
    pub namespace: String,
    pub name: String,
    pub display_name: String,
    pub status: GuestStatus,
    pub cpus: u32,
    pub maxmem_mib: u64,
    /// The Proxmox config text (codec).
    pub config: String,
}

impl Guest {
    fn running(&self) -> bool {
        matches!(self.status.phase, GuestPhase::Running | GuestPhase::Paused)
    }

    /// The `/cluster/resources`-style entry; `vmid` is a JSON number.
    pub fn entry(&self) -> Value {
        let kind = match self.kind {
            Kind::Qemu => "qemu",
            Kind::Lxc => "lxc",
        };
        let mut e = json!({
            "id": format!("{kind}/{}", self.vmid), "type": kind, "vmid": self.vmid, "name": self.display_name,
            "status": if self.running() { "running" } else { "stopped" },
            "cpus": self.cpus, "maxcpu": self.cpus, "maxmem": self.maxmem_mib * 1024 * 1024, "template": 0,
        });
        if let Some(node) = &self.status.node {
            e["node"] = json!(node);
        }
        let s = &self.status;
        for (key, value) in [
            ("mem", s.mem.map(Value::from)),
            ("cpu", s.cpu.map(Value::from)),
            ("uptime", s.uptime.map(Value::from)),
            ("pid", s.pid.map(Value::from)),
        ] {
            if let Some(v) = value {
                e[key] = v;
            }
        }
        e
    }
}

fn guest_of<K: GuestObject>(
    obj: &K,
    kind: Kind,
    display: Option<String>,
    cpus: u32,
    maxmem_mib: u64,
    config: String,
) -> Option<Guest> {
    Some(Guest {
        kind,
        vmid: obj.guest_spec().vmid()?,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        display_name: display.unwrap_or_else(|| obj.name_any()),
        status: obj.guest_status().cloned().unwrap_or_default(),
        cpus,
        maxmem_mib,
        config,
    })
}

fn internal(e: kube::Error) -> PveError {
    PveError::new(500, format!("reading resources failed: {e}"))
}

/// Every guest of `kind` (both kinds when `None`), sorted by VMID.
pub async fn list(client: &kube::Client, kind: Option<Kind>) -> Result<Vec<Guest>, PveError> {
    let mut out = Vec::new();
    if kind != Some(Kind::Lxc) {
        let vms: Api<VirtualMachine> = Api::all(client.clone());
        for vm in vms.list(&ListParams::default()).await.map_err(internal)?.items {
            let cpus = vm.spec.cpu.cores * vm.spec.cpu.sockets;
            let config = vm.spec.to_qemu_config();
            out.extend(guest_of(
                &vm,
                Kind::Qemu,
                vm.spec.name.clone(),
                cpus,
                u64::from(vm.spec.memory.size),
                config,
            ));
        }
    }
    if kind != Some(Kind::Qemu) {
        let cts: Api<LinuxContainer> = Api::all(client.clone());
        for ct in cts.list(&ListParams::default()).await.map_err(internal)?.items {
            let cpus = ct.spec.cores.unwrap_or(1);
            let config = ct.spec.to_lxc_config();
            out.extend(guest_of(
                &ct,
                Kind::Lxc,
                ct.spec.hostname.clone(),
                cpus,
                u64::from(ct.spec.memory),
                config,
            ));
        }
    }
    out.sort_by_key(|g| g.vmid);
    Ok(out)
}

/// The guest `vmid` of `kind` on `node`, or Proxmox's "does not exist" error.
pub async fn find(client: &kube::Client, kind: Kind, node: &str, vmid: &str) -> Result<Guest, PveError> {
    let Ok(id) = vmid.parse::<u32>() else {
        let mut errors = BTreeMap::new();
        errors.insert("vmid".to_string(), format!("type check ('integer') failed - got '{vmid}'"));
        return Err(PveError::parameters(errors));
    };
    let missing = || {
        let file = match kind {
            Kind::Qemu => format!("/etc/pve/nodes/{node}/qemu-server/{id}.conf"),
            Kind::Lxc => format!("/etc/pve/nodes/{node}/lxc/{id}.conf"),
        };
        PveError::new(500, format!("Configuration file '{file}' does not exist"))
    };
    let guest = list(client, Some(kind)).await?.into_iter().find(|g| g.vmid == id).ok_or_else(missing)?;
    if guest.status.node.as_deref().is_some_and(|n| n != node) {
        return Err(missing());
    }
    Ok(guest)
}

/// `GET …/status/current`.
pub fn current(g: &Guest) -> Value {
    let mut e = g.entry();
    if g.kind == Kind::Qemu {
        e["qmpstatus"] = json!(match g.status.phase {
            GuestPhase::Running => "running",
            GuestPhase::Paused => "paused",
            _ => "stopped",
        });
    }
    e["ha"] = json!({"managed": 0});
    e
}

/// `GET …/config`: the Proxmox keys and values, and a digest of the text.
pub fn config(g: &Guest) -> Value {
    use sha2::Digest;
    let mut map = serde_json::Map::new();
    for line in g.config.lines() {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once(": ") {
            map.insert(k.to_string(), Value::String(v.to_string()));
        }
    }
    let digest = sha2::Sha256::digest(g.config.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    map.insert("digest".into(), Value::String(hex));
    Value::Object(map)
}

/// `POST …/status/{start,stop,shutdown}`: declares the power state and returns the task's UPID.
pub async fn power(
    client: &kube::Client,
    tasks: &Tasks,
    node: &str,
    g: &Guest,
    action: &str,
    user: &str,
) -> Result<Value, PveError> {
    let (state, target) = match action {
        "start" | "resume" => ("Running", Target::Running),
        "stop" | "shutdown" => ("Stopped", Target::Stopped),
        _ => return Err(PveError::not_implemented("POST", &format!("/nodes/{node}/.../status/{action}"))),
    };
    if action == "start" && g.running() {
        let what = if g.kind == Kind::Qemu { "VM" } else { "CT" };
        return Err(PveError::new(500, format!("{what} {} already running", g.vmid)));
    }
    let patch = json!({"spec": {"powerState": state}});
    let params = PatchParams::default();
    let result = match g.kind {
        Kind::Qemu => Api::<VirtualMachine>::namespaced(client.clone(), &g.namespace)
            .patch(&g.name, &params, &Patch::Merge(&patch))
            .await
            .map(|_| ()),
        Kind::Lxc => Api::<LinuxContainer>::namespaced(client.clone(), &g.namespace)
            .patch(&g.name, &params, &Patch::Merge(&patch))
            .await
            .map(|_| ()),
    };
    result.map_err(|e| PveError::new(500, format!("changing the power state failed: {e}")))?;
    let kind = format!("{}{action}", g.kind.task_prefix());
    let upid = tasks
        .create(node, &kind, g, target, user)
        .map_err(|e| PveError::new(500, format!("recording the task failed: {e}")))?;
    Ok(json!(upid))
}
