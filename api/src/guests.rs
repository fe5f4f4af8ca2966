//! `/nodes/{node}/qemu` and `/nodes/{node}/lxc`: listing, `status/current`, `config` (through
//! the codec, as Proxmox prints it), and the power actions, which become a change of
//! `spec.powerState` plus a task that stays `running` until the guest reaches that state.

use std::collections::BTreeMap;

use kpve_crds::common::{GuestObject, GuestPhase, GuestStatus};
use kpve_crds::{LinuxContainer, VirtualMachine};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::{Value, json};

use crate::cache;
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

/// What a call that records a task needs besides its parameters: the caches (and client),
/// the task store, the node in the path and the caller.
pub struct Call<'a> {
    pub guests: &'a Guests,
    pub tasks: &'a Tasks,
    pub node: &'a str,
    pub user: &'a str,
}

impl Call<'_> {
    /// The task of operation `op` on `g`: following the generation in `outcome`, or ended
    /// with the refusal in it.
    pub fn task(
        &self,
        g: &Guest,
        op: &str,
        log: String,
        outcome: Result<i64, String>,
    ) -> Result<Value, PveError> {
        self.tasks.for_outcome(self.node, g, op, log, outcome, self.user)
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
    spec: Spec,
}

/// The resource (shared with the cache), rendered as Proxmox config text only when a caller
/// asks for it.
enum Spec {
    Qemu(Arc<VirtualMachine>),
    Lxc(Arc<LinuxContainer>),
}

/// Guest uid → (resource version, rendered `/cluster/resources` entry).
type RenderedEntries = HashMap<String, (String, Arc<str>)>;

/// Watch-driven caches of both guest kinds, and the client writes go through.
#[derive(Clone)]
pub struct Guests {
    pub client: kube::Client,
    vms: Store<VirtualMachine>,
    cts: Store<LinuxContainer>,
    /// `/cluster/resources` entries as JSON text by uid, with the resource version they were
    /// rendered from: a listing of 10,000 guests re-renders only the guests that changed.
    entries: Arc<Mutex<RenderedEntries>>,
}

impl Guests {
    /// Starts the watches and waits until both caches have their first list.
    pub async fn start(client: &kube::Client) -> anyhow::Result<Guests> {
        let guests = Guests {
            client: client.clone(),
            vms: cache::watch(client).0,
            cts: cache::watch(client).0,
            entries: Arc::default(),
        };
        let ready = async {
            guests.vms.wait_until_ready().await?;
            guests.cts.wait_until_ready().await
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), ready)
            .await
            .map_err(|_| anyhow::anyhow!("guest caches did not fill within 60 s"))??;
        Ok(guests)
    }

    /// VMID → namespace (Proxmox pool) of every guest, straight from the caches.
    pub fn namespaces(&self) -> HashMap<String, String> {
        let vms = self.vms.state();
        let cts = self.cts.state();
        let of = |m: &kube::api::ObjectMeta, vmid: Option<u32>| {
            Some((vmid?.to_string(), m.namespace.clone().unwrap_or_default()))
        };
        vms.iter()
            .filter_map(|v| of(&v.metadata, v.spec.vmid))
            .chain(cts.iter().filter_map(|c| of(&c.metadata, c.spec.vmid)))
            .collect()
    }

    /// Every guest's `/cluster/resources` entry (JSON text, with its pool) whose VMID `keep`
    /// accepts, sorted by VMID.
    pub fn resource_entries(&self, keep: impl Fn(u32) -> bool) -> Vec<Arc<str>> {
        let vms = self.vms.state();
        let cts = self.cts.state();
        let mut cache = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u32, Arc<str>)> = Vec::with_capacity(vms.len() + cts.len());
        let mut render = |uid: Option<&String>, version: Option<&String>, guest: Option<Guest>| {
            let Some(g) = guest else { return };
            if !keep(g.vmid) {
                return;
            }
            let (Some(uid), Some(version)) = (uid, version) else { return };
            if let Some((v, text)) = cache.get(uid)
                && v == version
            {
                out.push((g.vmid, text.clone()));
                return;
            }
            let mut e = g.entry();
            e["pool"] = json!(g.namespace);
            let text: Arc<str> = e.to_string().into();
            cache.insert(uid.clone(), (version.clone(), text.clone()));
            out.push((g.vmid, text));
        };
        for vm in &vms {
            let cpus = vm.spec.cpu.cores * vm.spec.cpu.sockets;
            let (name, mem) = (vm.spec.name.clone(), u64::from(vm.spec.memory.size));
            let g = guest_of(vm.as_ref(), Kind::Qemu, name, cpus, mem, Spec::Qemu(vm.clone()));
            render(vm.metadata.uid.as_ref(), vm.metadata.resource_version.as_ref(), g);
        }
        for ct in &cts {
            let cpus = ct.spec.cores.unwrap_or(1);
            let (name, mem) = (ct.spec.hostname.clone(), u64::from(ct.spec.memory));
            let g = guest_of(ct.as_ref(), Kind::Lxc, name, cpus, mem, Spec::Lxc(ct.clone()));
            render(ct.metadata.uid.as_ref(), ct.metadata.resource_version.as_ref(), g);
        }
        // Forget deleted guests now and then.
        if cache.len() > 2 * (vms.len() + cts.len()) + 64 {
            let live: std::collections::HashSet<&String> = vms
                .iter()
                .filter_map(|v| v.metadata.uid.as_ref())
                .chain(cts.iter().filter_map(|c| c.metadata.uid.as_ref()))
                .collect();
            cache.retain(|uid, _| live.contains(uid));
        }
        out.sort_by_key(|(vmid, _)| *vmid);
        out.into_iter().map(|(_, text)| text).collect()
    }

    /// Waits until the cache shows the guest's resource at `version` (`None`: gone).
    pub(crate) async fn settle(&self, g: &Guest, version: Option<&str>) {
        match g.kind {
            Kind::Qemu => cache::settle(&self.vms, Some(&g.namespace), &g.name, version).await,
            Kind::Lxc => cache::settle(&self.cts, Some(&g.namespace), &g.name, version).await,
        }
    }
}

impl Guest {
    /// The Proxmox config text (codec).
    pub fn config_text(&self) -> String {
        match &self.spec {
            Spec::Qemu(vm) => vm.spec.to_qemu_config(),
            Spec::Lxc(ct) => ct.spec.to_lxc_config(),
        }
    }

    /// A VM template (the source of clones; it never runs).
    pub fn is_template(&self) -> bool {
        match &self.spec {
            Spec::Qemu(vm) => vm.spec.template,
            Spec::Lxc(ct) => ct.spec.is_template(),
        }
    }

    /// The guest's HA declaration (Proxmox `ha/resources.cfg` entry), if any.
    pub fn ha(&self) -> Option<&kpve_crds::common::HaSpec> {
        match &self.spec {
            Spec::Qemu(vm) => vm.spec.ha.as_ref(),
            Spec::Lxc(ct) => ct.spec.ha.as_ref(),
        }
    }

    /// `VM` or `CT`, as Proxmox's messages name guests.
    pub fn label(&self) -> &'static str {
        match self.kind {
            Kind::Qemu => "VM",
            Kind::Lxc => "CT",
        }
    }

    /// The LinuxContainer behind an `lxc` guest.
    pub fn ct(&self) -> Option<&Arc<LinuxContainer>> {
        match &self.spec {
            Spec::Lxc(ct) => Some(ct),
            Spec::Qemu(_) => None,
        }
    }

    /// The volume ids the guest's spec names or has allocated from a pool, as the agent names
    /// them (`local:100/vm-100-disk-0.qcow2`, `local:101/subvol-101-disk-0.subvol`).
    pub fn declared_volumes(&self) -> Vec<String> {
        let vmid = self.vmid;
        match &self.spec {
            Spec::Qemu(vm) => vm
                .spec
                .disks
                .iter()
                .enumerate()
                .filter_map(|(i, d)| match (&d.volume, &d.pool) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(pool)) => {
                        Some(format!("{pool}:{vmid}/vm-{vmid}-disk-{i}.{}", d.image_format()))
                    }
                    _ => None,
                })
                .collect(),
            Spec::Lxc(ct) => {
                let mut out: Vec<String> = ct.spec.rootfs.volume.iter().cloned().collect();
                if let Some(pool) = &ct.spec.rootfs.pool {
                    out.push(format!("{pool}:{vmid}/subvol-{vmid}-disk-0.subvol"));
                }
                for mp in &ct.spec.mount_points {
                    out.extend(mp.volume.iter().cloned());
                    if let (Some(pool), Ok(n)) = (&mp.pool, mp.id.trim_start_matches("mp").parse::<u32>()) {
                        out.push(format!("{pool}:{vmid}/subvol-{vmid}-disk-{}.subvol", n + 1));
                    }
                }
                out
            }
        }
    }

    /// The VirtualMachine behind a `qemu` guest.
    pub fn vm(&self) -> Option<&Arc<VirtualMachine>> {
        match &self.spec {
            Spec::Qemu(vm) => Some(vm),
            Spec::Lxc(_) => None,
        }
    }

    pub(crate) fn running(&self) -> bool {
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
            "cpus": self.cpus, "maxcpu": self.cpus, "maxmem": self.maxmem_mib * 1024 * 1024,
            "template": u8::from(self.is_template()),
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
    spec: Spec,
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
        spec,
    })
}

fn vm_guest(vm: Arc<VirtualMachine>) -> Option<Guest> {
    let cpus = vm.spec.cpu.cores * vm.spec.cpu.sockets;
    let (name, mem) = (vm.spec.name.clone(), u64::from(vm.spec.memory.size));
    guest_of(vm.as_ref(), Kind::Qemu, name, cpus, mem, Spec::Qemu(vm.clone()))
}

fn ct_guest(ct: Arc<LinuxContainer>) -> Option<Guest> {
    let cpus = ct.spec.cores.unwrap_or(1);
    let (name, mem) = (ct.spec.hostname.clone(), u64::from(ct.spec.memory));
    guest_of(ct.as_ref(), Kind::Lxc, name, cpus, mem, Spec::Lxc(ct.clone()))
}

/// Every guest of `kind` (both kinds when `None`), sorted by VMID, from the caches.
pub async fn list(guests: &Guests, kind: Option<Kind>) -> Result<Vec<Guest>, PveError> {
    let mut out = Vec::new();
    if kind != Some(Kind::Lxc) {
        out.extend(guests.vms.state().into_iter().filter_map(vm_guest));
    }
    if kind != Some(Kind::Qemu) {
        out.extend(guests.cts.state().into_iter().filter_map(ct_guest));
    }
    out.sort_by_key(|g| g.vmid);
    Ok(out)
}

/// The guest `vmid` of `kind` on `node`, or Proxmox's "does not exist" error.
pub async fn find(guests: &Guests, kind: Kind, node: &str, vmid: &str) -> Result<Guest, PveError> {
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
    let guest = list(guests, Some(kind)).await?.into_iter().find(|g| g.vmid == id).ok_or_else(missing)?;
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
    let text = g.config_text();
    for line in text.lines() {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once(": ") {
            map.insert(k.to_string(), Value::String(v.to_string()));
        }
    }
    // The snapshot the current state derives from, as qemu-server keeps it in the config.
    if let Some(parent) = g.vm().and_then(|vm| vm.spec.parent.clone()) {
        map.insert("parent".into(), Value::String(parent));
    }
    let digest = sha2::Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    map.insert("digest".into(), Value::String(hex));
    Value::Object(map)
}

/// `GET …/pending`: every config key with its value; where the running guest still has the
/// old value (memory in force differs from the spec), the spec's value as `pending`.
pub fn pending(g: &Guest) -> Value {
    let config = config(g);
    let mut out = Vec::new();
    let in_force_mib = if g.running() { g.status.maxmem.map(|b| b / (1024 * 1024)) } else { None };
    for (key, value) in config.as_object().into_iter().flatten() {
        if key == "digest" {
            continue;
        }
        let text = value.as_str().map_or_else(|| value.to_string(), str::to_string);
        let mut e = json!({"key": key, "value": text});
        if key == "memory"
            && let Some(mib) = in_force_mib
            && mib != g.maxmem_mib
        {
            e["value"] = json!(mib.to_string());
            e["pending"] = json!(text);
        }
        out.push(e);
    }
    Value::Array(out)
}

/// A JSON merge patch of the guest's resource, visible in the cache when this returns.
async fn merge_patch(guests: &Guests, g: &Guest, patch: &Value) -> Result<(), kube::Error> {
    let params = PatchParams::default();
    let client = guests.client.clone();
    let version = match g.kind {
        Kind::Qemu => {
            Api::<VirtualMachine>::namespaced(client, &g.namespace)
                .patch(&g.name, &params, &Patch::Merge(patch))
                .await?
                .metadata
                .resource_version
        }
        Kind::Lxc => {
            Api::<LinuxContainer>::namespaced(client, &g.namespace)
                .patch(&g.name, &params, &Patch::Merge(patch))
                .await?
                .metadata
                .resource_version
        }
    };
    guests.settle(g, version.as_deref()).await;
    Ok(())
}

/// `POST …/status/{start,stop,shutdown}`: declares the power state and returns the task's UPID.
pub async fn power(
    guests: &Guests,
    tasks: &Tasks,
    node: &str,
    g: &Guest,
    action: &str,
    user: &str,
) -> Result<Value, PveError> {
    let (state, target) = match action {
        "start" | "resume" => ("Running", Target::Running),
        "stop" | "shutdown" => ("Stopped", Target::Stopped),
        "suspend" => ("Paused", Target::Paused),
        "reboot" | "reset" => {
            // kpve's reboot: a new value of the restart annotation; the task ends when the
            // guest runs as a new process.
            if !g.running() {
                let what = if g.kind == Kind::Qemu { "VM" } else { "CT" };
                return Err(PveError::new(500, format!("{what} {} not running", g.vmid)));
            }
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let patch = json!({"metadata": {"annotations": {"kpve.io/restart": format!("pve-api-{stamp}")}}});
            merge_patch(guests, g, &patch).await.map_err(write_error)?;
            let task = format!("{}{action}", g.kind.task_prefix());
            return tasks
                .create(
                    node,
                    &task,
                    g.kind,
                    g.vmid,
                    Target::Restarted(g.status.pid, crate::tasks::stalled(&g.status)),
                    user,
                )
                .map(Value::from)
                .map_err(|e| PveError::new(500, e.to_string()));
        }
        _ => return Err(PveError::not_implemented("POST", &format!("/nodes/{node}/.../status/{action}"))),
    };
    if action == "start" && g.is_template() {
        let what = if g.kind == Kind::Qemu { "vm" } else { "CT" };
        return Err(PveError::new(500, format!("you can't start a {what} if it's a template")));
    }
    if action == "start" && g.running() {
        let what = if g.kind == Kind::Qemu { "VM" } else { "CT" };
        return Err(PveError::new(500, format!("{what} {} already running", g.vmid)));
    }
    let patch = json!({"spec": {"powerState": state}});
    merge_patch(guests, g, &patch)
        .await
        .map_err(|e| PveError::new(500, format!("changing the power state failed: {e}")))?;
    let kind = format!("{}{action}", g.kind.task_prefix());
    let upid = tasks
        .create(node, &kind, g.kind, g.vmid, target, user)
        .map_err(|e| PveError::new(500, format!("recording the task failed: {e}")))?;
    Ok(json!(upid))
}

/// Parameters that steer an API call rather than being config keys.
const CONTROL_PARAMS: &[&str] = &[
    "node",
    "vmid",
    "digest",
    "delete",
    "start",
    "pool",
    "ostemplate",
    "password",
    "revert",
    "skiplock",
    "background_delay",
    "force",
    "unique",
    "storage",
];

/// Config text from `current` with `set` applied and `delete` removed, checked by the codec.
fn edited_text(current: &str, set: &BTreeMap<String, String>, delete: &[String]) -> String {
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut comments = Vec::new();
    for line in current.lines() {
        if line.starts_with('#') {
            comments.push(line.to_string());
        } else if let Some((k, v)) = line.split_once(": ") {
            keys.insert(k.to_string(), v.to_string());
        }
    }
    for (k, v) in set {
        if !CONTROL_PARAMS.contains(&k.as_str()) {
            keys.insert(k.clone(), v.clone());
        }
    }
    for k in delete {
        keys.remove(k);
    }
    let mut text = comments.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    for (k, v) in keys {
        text.push_str(&format!("{k}: {v}\n"));
    }
    text
}

fn codec_error(e: kpve_crds::codec::CodecError) -> PveError {
    let mut errors = BTreeMap::new();
    errors.insert(e.key().unwrap_or("config").to_string(), e.to_string());
    PveError::parameters(errors)
}

fn write_error(e: kube::Error) -> PveError {
    match e {
        kube::Error::Api(ae) if ae.code == 409 => {
            PveError::new(500, format!("unable to create VM: {}", ae.message))
        }
        kube::Error::Api(ae) => PveError::new(if ae.code == 422 { 400 } else { 500 }, ae.message),
        e => PveError::new(500, e.to_string()),
    }
}

/// `POST /nodes/{node}/{qemu,lxc}`: a guest from Proxmox parameters, through the codec, as a
/// resource in namespace `default` named `vm-<vmid>` / `ct-<vmid>`, pinned to `node`.
pub async fn create(
    guests: &Guests,
    tasks: &Tasks,
    node: &str,
    kind: Kind,
    params: &BTreeMap<String, String>,
    user: &str,
) -> Result<Value, PveError> {
    let Some(vmid) = params.get("vmid").and_then(|v| v.parse::<u32>().ok()) else {
        let mut errors = BTreeMap::new();
        errors.insert("vmid".to_string(), "property is missing and it is not optional".to_string());
        return Err(PveError::parameters(errors));
    };
    if list(guests, None).await?.iter().any(|g| g.vmid == vmid) {
        let what = if kind == Kind::Qemu { "VM" } else { "CT" };
        return Err(PveError::new(
            500,
            format!("unable to create {what} {vmid} - {what} {vmid} already exists on node '{node}'"),
        ));
    }
    // Proxmox pools are namespaces.
    let namespace = params.get("pool").map_or("default", String::as_str);
    let text = edited_text("", params, &[]);
    let start = params.get("start").is_some_and(|v| v == "1");
    let power = if start { "Running" } else { "Stopped" };
    let object = match kind {
        Kind::Qemu => {
            let mut spec = kpve_crds::VirtualMachineSpec::from_qemu_config(&text).map_err(codec_error)?;
            spec.vmid = Some(vmid);
            let mut spec = serde_json::to_value(spec).expect("specs serialize");
            spec["powerState"] = json!(power);
            spec["placement"]["nodes"] = json!([node]);
            json!({"apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine",
                   "metadata": {"name": format!("vm-{vmid}"), "namespace": namespace}, "spec": spec})
        }
        Kind::Lxc => {
            let mut spec = kpve_crds::LinuxContainerSpec::from_lxc_config(&text).map_err(codec_error)?;
            spec.vmid = Some(vmid);
            let mut spec = serde_json::to_value(spec).expect("specs serialize");
            if let Some(t) = params.get("ostemplate") {
                spec["template"] = json!(t);
            }
            spec["powerState"] = json!(power);
            spec["placement"]["nodes"] = json!([node]);
            json!({"apiVersion": "kpve.io/v1alpha1", "kind": "LinuxContainer",
                   "metadata": {"name": format!("ct-{vmid}"), "namespace": namespace}, "spec": spec})
        }
    };
    let post = kube::api::PostParams::default();
    let client = guests.client.clone();
    let name = match kind {
        Kind::Qemu => {
            let vm: VirtualMachine =
                serde_json::from_value(object).map_err(|e| PveError::new(400, e.to_string()))?;
            create_vm(guests, namespace, &vm).await?.name_any()
        }
        Kind::Lxc => {
            let ct: LinuxContainer =
                serde_json::from_value(object).map_err(|e| PveError::new(400, e.to_string()))?;
            let saved = Api::<LinuxContainer>::namespaced(client, namespace).create(&post, &ct).await;
            let saved = saved.map_err(write_error)?;
            cache::settle(
                &guests.cts,
                Some(namespace),
                &saved.name_any(),
                saved.metadata.resource_version.as_deref(),
            )
            .await;
            saved.name_any()
        }
    };
    tracing::info!(%name, vmid, %user, "guest created through the Proxmox API");
    let task = format!("{}create", kind.task_prefix());
    let target = if start { Target::Running } else { Target::Stopped };
    tasks
        .create(node, &task, kind, vmid, target, user)
        .map(Value::from)
        .map_err(|e| PveError::new(500, e.to_string()))
}

/// Creates a VirtualMachine, visible in the cache when this returns.
async fn create_vm(
    guests: &Guests,
    namespace: &str,
    vm: &VirtualMachine,
) -> Result<VirtualMachine, PveError> {
    let saved = Api::<VirtualMachine>::namespaced(guests.client.clone(), namespace)
        .create(&kube::api::PostParams::default(), vm)
        .await
        .map_err(write_error)?;
    let version = saved.metadata.resource_version.as_deref();
    cache::settle(&guests.vms, Some(namespace), &saved.name_any(), version).await;
    Ok(saved)
}

/// `PUT …/config`: changes keys (and removes those in `delete`) after checking `digest`;
/// returns the resource's new generation. The digest is checked against, and the edit made
/// to, the resource as read for the write (which carries its resourceVersion): a change made
/// meanwhile fails the digest or the write, and is never overwritten.
pub async fn update(guests: &Guests, g: &Guest, params: &BTreeMap<String, String>) -> Result<i64, PveError> {
    let delete: Vec<String> = params
        .get("delete")
        .map(|d| d.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    // The edited config text of the resource as just read.
    let edited = |fresh: Option<Guest>| -> Result<String, PveError> {
        let fresh = fresh.ok_or_else(|| PveError::new(500, format!("guest {} lost its VMID", g.vmid)))?;
        if let Some(digest) = params.get("digest")
            && config(&fresh)["digest"] != *digest
        {
            return Err(PveError::new(
                500,
                "detected modified configuration - file changed by other user? Try again.",
            ));
        }
        Ok(edited_text(&fresh.config_text(), params, &delete))
    };
    let saved = match g.kind {
        Kind::Qemu => {
            let api = Api::<VirtualMachine>::namespaced(guests.client.clone(), &g.namespace);
            cache::replace_retrying(&api, &g.name, |vm| {
                let text = edited(vm_guest(Arc::new(vm.clone())))?;
                let mut spec = kpve_crds::VirtualMachineSpec::from_qemu_config(&text).map_err(codec_error)?;
                // Fields the Proxmox config does not carry stay as declared.
                spec.keep_undeclared(&mut vm.spec);
                vm.spec = spec;
                vm.status = None;
                Ok(())
            })
            .await?
            .metadata
        }
        Kind::Lxc => {
            let api = Api::<LinuxContainer>::namespaced(guests.client.clone(), &g.namespace);
            cache::replace_retrying(&api, &g.name, |ct| {
                let text = edited(ct_guest(Arc::new(ct.clone())))?;
                let mut spec = kpve_crds::LinuxContainerSpec::from_lxc_config(&text).map_err(codec_error)?;
                spec.keep_undeclared(&mut ct.spec);
                ct.spec = spec;
                ct.status = None;
                Ok(())
            })
            .await?
            .metadata
        }
    };
    guests.settle(g, saved.resource_version.as_deref()).await;
    Ok(saved.generation.unwrap_or(0))
}

/// `PUT …/resize`: grows one disk (`size` absolute, or `+delta`; units K, M, G, T, none =
/// bytes) by raising its declared size; returns the generation that carries it. The agent
/// grows the volume (QMP `block_resize` while the VM runs). Shrinking is refused.
pub async fn resize(guests: &Guests, g: &Guest, params: &BTreeMap<String, String>) -> Result<i64, PveError> {
    use kpve_crds::codec::propstr::{format_size, parse_size};
    let disk = params["disk"].clone();
    let wanted = params["size"].clone();
    let bad = |m: String| PveError::parameters(BTreeMap::from([("size".to_string(), m)]));
    let (relative, amount) = match wanted.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, wanted.as_str()),
    };
    let amount = parse_size("size", amount).map_err(|e| bad(e.to_string()))?;
    let new_size = |current: Option<&String>| -> Result<String, PveError> {
        let current = current.ok_or_else(|| {
            PveError::new(500, format!("disk '{disk}' has no declared size (an attached volume)"))
        })?;
        let current = parse_size("size", current).map_err(|e| PveError::new(500, e.to_string()))?;
        let target = if relative { current + amount } else { amount };
        if target < current {
            return Err(PveError::new(500, "shrinking disks is not supported"));
        }
        Ok(format_size(target))
    };
    let no_disk = || PveError::new(500, format!("disk '{disk}' does not exist"));
    edit_guest(
        guests,
        g,
        |vm| {
            let d = vm.disks.iter_mut().find(|d| d.id == disk).ok_or_else(no_disk)?;
            d.size = Some(new_size(d.size.as_ref())?);
            Ok(())
        },
        |ct| {
            if disk == "rootfs" {
                ct.rootfs.size = Some(new_size(ct.rootfs.size.as_ref())?);
            } else {
                let mp = ct.mount_points.iter_mut().find(|m| m.id == disk).ok_or_else(no_disk)?;
                mp.size = Some(new_size(mp.size.as_ref())?);
            }
            Ok(())
        },
    )
    .await
}

/// Replaces the guest's spec through `vm` or `ct` (whichever its kind is), retrying on
/// conflicts; returns the new generation, once the cache shows it.
async fn edit_guest(
    guests: &Guests,
    g: &Guest,
    mut vm: impl FnMut(&mut kpve_crds::VirtualMachineSpec) -> Result<(), PveError>,
    mut ct: impl FnMut(&mut kpve_crds::LinuxContainerSpec) -> Result<(), PveError>,
) -> Result<i64, PveError> {
    let saved = match g.kind {
        Kind::Qemu => {
            let api = Api::<VirtualMachine>::namespaced(guests.client.clone(), &g.namespace);
            cache::replace_retrying(&api, &g.name, |o| {
                o.status = None;
                vm(&mut o.spec)
            })
            .await?
            .metadata
        }
        Kind::Lxc => {
            let api = Api::<LinuxContainer>::namespaced(guests.client.clone(), &g.namespace);
            cache::replace_retrying(&api, &g.name, |o| {
                o.status = None;
                ct(&mut o.spec)
            })
            .await?
            .metadata
        }
    };
    guests.settle(g, saved.resource_version.as_deref()).await;
    Ok(saved.generation.unwrap_or(0))
}

/// `POST …/{qemu,lxc}/{vmid}/template`: marks a stopped guest as a template (a container's
/// `template: 1`); returns the generation that carries it (the agent then never starts it).
pub async fn make_template(guests: &Guests, g: &Guest) -> Result<i64, PveError> {
    if g.is_template() {
        return Err(PveError::new(500, "you can't convert a template to a template"));
    }
    if g.running() {
        let what = g.label();
        return Err(PveError::new(
            500,
            format!("you can't convert a {what} to template if {what} is running"),
        ));
    }
    edit_guest(
        guests,
        g,
        |vm| {
            vm.template = true;
            Ok(())
        },
        |ct| {
            ct.options.insert("template".into(), "1".into());
            Ok(())
        },
    )
    .await
}

/// `DELETE /nodes/{node}/{kind}/{vmid}`: deletes the resource; the task ends once it is gone
/// (the agent stopped the guest and freed its volumes).
pub async fn destroy(
    guests: &Guests,
    tasks: &Tasks,
    node: &str,
    g: &Guest,
    user: &str,
) -> Result<Value, PveError> {
    let dp = kube::api::DeleteParams::default();
    match g.kind {
        Kind::Qemu => Api::<VirtualMachine>::namespaced(guests.client.clone(), &g.namespace)
            .delete(&g.name, &dp)
            .await
            .map(|_| ()),
        Kind::Lxc => Api::<LinuxContainer>::namespaced(guests.client.clone(), &g.namespace)
            .delete(&g.name, &dp)
            .await
            .map(|_| ()),
    }
    .map_err(write_error)?;
    let task = format!("{}destroy", g.kind.task_prefix());
    tasks
        .create(node, &task, g.kind, g.vmid, Target::Gone, user)
        .map(Value::from)
        .map_err(|e| PveError::new(500, e.to_string()))
}

/// A fresh `uuid=` for `smbios1`-style property strings, as Proxmox makes for a clone.
fn fresh_uuid(value: &str) -> String {
    value
        .split(',')
        .map(|part| match part.split_once('=') {
            Some(("uuid", _)) => format!("uuid={}", uuid::Uuid::new_v4()),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `POST /nodes/{node}/qemu/{vmid}/clone`: a new VirtualMachine `vm-<newid>` whose disks are
/// copies of the source's (`cloneFrom`, made by the node agent with `qemu-img convert`), from
/// the current state or from snapshot `snapname`. MACs and the SMBIOS UUID are new; snapshots,
/// the template flag and HA are not copied; the firewall is. The task (`qmclone`, with the
/// source's VMID as its id, as Proxmox) ends when the agent has made the copies. Linked
/// clones of templates are made as full copies.
pub async fn clone(call: &Call<'_>, g: &Guest, params: &BTreeMap<String, String>) -> Result<Value, PveError> {
    let Some(vm) = g.vm() else { return clone_ct(call, g, params).await };
    let (newid, full) = clone_checks(call, g, params).await?;
    let snapname = params.get("snapname");
    let source = match snapname {
        Some(name) => {
            let snap = vm
                .spec
                .snapshots
                .iter()
                .find(|s| &s.name == name)
                .ok_or_else(|| PveError::new(500, format!("snapshot '{name}' does not exist")))?;
            kpve_crds::VirtualMachineSpec::from_qemu_config(snap.config.as_deref().unwrap_or(""))
                .map_err(|e| PveError::new(500, format!("snapshot '{name}' has an unreadable config: {e}")))?
        }
        None => vm.spec.clone(),
    };
    if snapname.is_none() && g.running() {
        return Err(PveError::new(
            500,
            "cloning a running VM is not supported by kpve yet: stop it, or clone one of its snapshots (snapname)",
        ));
    }
    let mut spec = source;
    let mut log = Vec::new();
    for (index, disk) in spec.disks.iter_mut().enumerate() {
        if disk.is_media() {
            continue;
        }
        let format = disk.image_format();
        let volume =
            g.status.volumes.get(&disk.id).cloned().or_else(|| disk.volume.clone()).unwrap_or_else(|| {
                format!(
                    "{}:{}/vm-{}-disk-{index}.{format}",
                    disk.pool.as_deref().unwrap_or("local"),
                    g.vmid,
                    g.vmid
                )
            });
        if !full && !vm.spec.template {
            let what = if snapname.is_some() { "a snapshot of " } else { "" };
            let message = format!("Linked clone feature is not supported for {what}'{volume}' ({})", disk.id);
            let log = format!("creating a clone of VM {} with ID {newid}", g.vmid);
            return call.task(g, "clone", log, Err(format!("clone failed: {message}")));
        }
        if disk.size.is_none() {
            return Err(PveError::new(
                500,
                format!(
                    "disk '{}' has no declared size (an attached volume): kpve clones allocated disks only",
                    disk.id
                ),
            ));
        }
        log.push(format!("create full clone of drive {} ({volume})", disk.id));
        disk.pool = Some(
            params.get("storage").cloned().or_else(|| disk.pool.clone()).unwrap_or_else(|| "local".into()),
        );
        disk.volume = None;
        if let Some(f) = params.get("format") {
            disk.format =
                Some(serde_json::from_value(json!(f)).map_err(|e| PveError::new(400, e.to_string()))?);
        }
        disk.clone_from = Some(kpve_crds::vm::CloneSource { volume, snapshot: snapname.cloned() });
    }
    spec.vmid = Some(newid);
    spec.name = Some(params.get("name").cloned().unwrap_or_else(|| {
        format!("Copy-of-VM-{}", vm.spec.name.clone().unwrap_or_else(|| g.vmid.to_string()))
    }));
    if let Some(d) = params.get("description") {
        spec.description = Some(d.clone());
    }
    spec.template = false;
    spec.snapshots.clear();
    spec.parent = None;
    spec.rollback = None;
    spec.ha = None;
    spec.firewall = vm.spec.firewall.clone();
    spec.power_state = kpve_crds::PowerState::Stopped;
    spec.placement = kpve_crds::Placement { nodes: vec![call.node.to_string()], ..Default::default() };
    for nic in &mut spec.nics {
        nic.macaddr = None;
    }
    for key in ["smbios1", "vmgenid"] {
        if let Some(v) = spec.options.get_mut(key) {
            *v = if key == "vmgenid" { uuid::Uuid::new_v4().to_string() } else { fresh_uuid(v) };
        }
    }
    let namespace = params.get("pool").map_or("default", String::as_str);
    let mut object = VirtualMachine::new(&format!("vm-{newid}"), spec);
    object.metadata.namespace = Some(namespace.to_string());
    // Direct kernel boot (kpve annotations) goes with the copy.
    object.metadata.annotations = vm.metadata.annotations.as_ref().map(|a| {
        a.iter()
            .filter(|(k, _)| k.starts_with("kpve.io/") && *k != "kpve.io/restart")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    let saved = create_vm(call.guests, namespace, &object).await?;
    tracing::info!(source = g.vmid, newid, user = %call.user, "VM cloned through the Proxmox API");
    record_clone(call, g, newid, saved.metadata.generation.unwrap_or(1), log.join("\n"))
}

/// The checks both kinds of clone share: a free VMID, the same node, linked-clone parameters.
/// Returns the new VMID and whether the copy is full.
async fn clone_checks(
    call: &Call<'_>,
    g: &Guest,
    params: &BTreeMap<String, String>,
) -> Result<(u32, bool), PveError> {
    let newid: u32 = params["newid"].parse().map_err(|_| PveError::new(400, "newid: not a VMID"))?;
    if list(call.guests, None).await?.iter().any(|o| o.vmid == newid) {
        let what = g.label();
        return Err(PveError::new(
            500,
            format!("unable to create {what} {newid}: config file already exists"),
        ));
    }
    if let Some(target) = params.get("target").filter(|t| *t != call.node) {
        let what = g.label();
        return Err(PveError::new(
            500,
            format!("can't clone {what} to node '{target}' ({what} uses local storage)"),
        ));
    }
    let full = params.get("full").map_or(!g.is_template(), |f| f == "1");
    if !full {
        for key in ["storage", "format"] {
            if params.contains_key(key) {
                return Err(PveError::new(500, format!("parameter '{key}' not allowed for linked clones")));
            }
        }
    }
    Ok((newid, full))
}

/// `POST /nodes/{node}/lxc/{vmid}/clone`: a new LinuxContainer `ct-<newid>` whose rootfs is a
/// copy of the source's (`rootfs.cloneFrom`, copied by the node agent with `cp -a`; a source
/// that never ran has no rootfs yet, and the clone is made from the same OS template). MACs
/// are new; HA and the template flag are not copied. Container snapshots do not exist on dir
/// storage, so `snapname` names nothing.
async fn clone_ct(call: &Call<'_>, g: &Guest, params: &BTreeMap<String, String>) -> Result<Value, PveError> {
    let ct = g.ct().expect("an lxc guest");
    let (newid, full) = clone_checks(call, g, params).await?;
    if let Some(name) = params.get("snapname") {
        return Err(PveError::new(500, format!("snapshot '{name}' does not exist")));
    }
    if g.running() {
        return Err(PveError::new(
            500,
            "cloning a running container is not supported by kpve yet: stop it first",
        ));
    }
    let volume = g.status.volumes.get("rootfs").cloned().unwrap_or_else(|| {
        format!(
            "{}:{}/subvol-{}-disk-0.subvol",
            ct.spec.rootfs.pool.as_deref().unwrap_or("local"),
            g.vmid,
            g.vmid
        )
    });
    let log = format!("create full clone of mountpoint rootfs ({volume})");
    if !full && !g.is_template() {
        let message = format!("Linked clone feature for '{volume}' is not available");
        return call.task(g, "clone", log, Err(format!("clone failed: {message}")));
    }
    if ct.spec.rootfs.volume.is_some() || ct.spec.mount_points.iter().any(|m| m.volume.is_none()) {
        return Err(PveError::new(500, "kpve clones containers whose only allocated volume is the rootfs"));
    }
    let mut spec = ct.spec.clone();
    spec.vmid = Some(newid);
    if let Some(h) = params.get("hostname") {
        spec.hostname = Some(h.clone());
    }
    if let Some(d) = params.get("description") {
        spec.description = Some(d.clone());
    }
    spec.options.remove("template");
    spec.ha = None;
    spec.power_state = kpve_crds::PowerState::Stopped;
    spec.placement = kpve_crds::Placement { nodes: vec![call.node.to_string()], ..Default::default() };
    spec.rootfs.pool =
        Some(params.get("storage").cloned().or(spec.rootfs.pool).unwrap_or_else(|| "local".into()));
    spec.rootfs.clone_from = Some(volume);
    for nic in &mut spec.nics {
        nic.hwaddr = None;
    }
    let namespace = params.get("pool").map_or("default", String::as_str);
    let mut object = LinuxContainer::new(&format!("ct-{newid}"), spec);
    object.metadata.namespace = Some(namespace.to_string());
    let saved = Api::<LinuxContainer>::namespaced(call.guests.client.clone(), namespace)
        .create(&kube::api::PostParams::default(), &object)
        .await
        .map_err(write_error)?;
    let version = saved.metadata.resource_version.as_deref();
    cache::settle(&call.guests.cts, Some(namespace), &saved.name_any(), version).await;
    tracing::info!(source = g.vmid, newid, user = %call.user, "container cloned through the Proxmox API");
    record_clone(call, g, newid, saved.metadata.generation.unwrap_or(1), log)
}

/// The `qmclone`/`vzclone` task: follows the new guest, carries the source's VMID.
fn record_clone(
    call: &Call<'_>,
    g: &Guest,
    newid: u32,
    generation: i64,
    log: String,
) -> Result<Value, PveError> {
    let kind = format!("{}clone", g.kind.task_prefix());
    call.tasks
        .record(crate::tasks::Task {
            node: call.node,
            kind: &kind,
            guest_kind: g.kind,
            vmid: newid,
            id: Some(g.vmid.to_string()),
            target: Target::Observed(generation),
            user: call.user,
            log: Some(format!("creating a clone of {} {} with ID {newid}\n{log}", g.label(), g.vmid)),
            error: None,
            volume: None,
        })
        .map(Value::from)
        .map_err(|e| PveError::new(500, e.to_string()))
}
