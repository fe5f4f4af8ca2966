//! The `/etc/pve` view (Proxmox's pmxcfs layout) as a FUSE file system: files rendered on
//! demand from watch-fed caches of the resources ([`render`]), and writes that parse a
//! guest's config and update (or create, or delete) its resource with the identity the
//! mount runs as ([`fs`] is the FUSE side). While a watch has been failing for over 10 s the
//! view is read-only.
//!
//! Layout: `nodes/<node>/{qemu-server,lxc}/<vmid>.conf`, `nodes/<node>/host.fw`, the links
//! `qemu-server`, `lxc` and `local` to the local node, `storage.cfg`, `datacenter.cfg`,
//! `user.cfg`, `ha/{groups,resources}.cfg`, `firewall/{cluster,<vmid>}.fw`, `.members`,
//! `.vmlist`, `.version`.

pub mod fs;
pub mod parse;
pub mod render;

use std::collections::BTreeMap;

use kpve_crds::{
    ClusterFirewall, DATACENTER, Datacenter, HAGroup, Hypervisor, IPSet, LinuxContainer, LinuxContainerSpec,
    PVEACL, PVEGroup, PVERole, PVEUser, PowerState, SecurityGroup, StoragePool, VirtualMachine,
    VirtualMachineSpec,
};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::Store;

use crate::cache::{self, Health};

/// How long a move between node directories waits for the migration: the kernel holds both
/// directories locked meanwhile. A migration still under way then goes on, and the move
/// answers EINPROGRESS.
const MOVE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// pmxcfs refuses files above 1 MiB; so does the view.
pub const MAX_FILE: usize = 1024 * 1024;

/// What a path in the view is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    Link(String),
    File(String),
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Invalid(String),
    #[error("the view is read-only while the API server is unreachable")]
    ReadOnly,
    #[error("files are limited to 1 MiB, as in pmxcfs")]
    TooBig,
    #[error("{0}")]
    Denied(String),
    #[error("{0} cannot be written")]
    NotWritable(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    InProgress(String),
}

/// A guest config path: node, kind (`qemu-server`/`lxc`), VMID.
pub fn guest_path(path: &str) -> Option<(&str, &str, u32)> {
    let rest = path.strip_prefix("nodes/")?;
    let (node, rest) = rest.split_once('/')?;
    let (dir, file) = rest.split_once('/')?;
    let vmid = file.strip_suffix(".conf")?.parse().ok().filter(|v| *v >= 100)?;
    (matches!(dir, "qemu-server" | "lxc") && !file.contains('/')).then_some((node, dir, vmid))
}

/// The resources the view renders, kept by watches.
pub struct View {
    client: kube::Client,
    node: String,
    start: u64,
    vms: Store<VirtualMachine>,
    cts: Store<LinuxContainer>,
    hvs: Store<Hypervisor>,
    pools: Store<StoragePool>,
    cfw: Store<ClusterFirewall>,
    sgs: Store<SecurityGroup>,
    ipsets: Store<IPSet>,
    hagroups: Store<HAGroup>,
    users: Store<PVEUser>,
    groups: Store<PVEGroup>,
    roles: Store<PVERole>,
    acls: Store<PVEACL>,
    datacenter: Store<Datacenter>,
    health: Vec<Health>,
    /// One cluster-file write at a time (each replaces what its file declares).
    cluster_files: tokio::sync::Mutex<()>,
}

fn sorted<K: kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    let mut list: Vec<K> = store.state().iter().map(|k| (**k).clone()).collect();
    list.sort_by_key(|k| k.meta().name.clone());
    list
}

impl View {
    /// Starts the watches (as `client`'s identity) and waits for their first lists.
    pub async fn start(client: kube::Client, node: &str) -> anyhow::Result<View> {
        let mut health = Vec::new();
        macro_rules! watch {
            () => {{
                let (store, h) = cache::watch(&client);
                health.push(h);
                store
            }};
        }
        let view = View {
            node: node.to_string(),
            start: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            vms: watch!(),
            cts: watch!(),
            hvs: watch!(),
            pools: watch!(),
            cfw: watch!(),
            sgs: watch!(),
            ipsets: watch!(),
            hagroups: watch!(),
            users: watch!(),
            groups: watch!(),
            roles: watch!(),
            acls: watch!(),
            datacenter: watch!(),
            health,
            cluster_files: tokio::sync::Mutex::new(()),
            client,
        };
        let ready = async {
            view.vms.wait_until_ready().await?;
            view.cts.wait_until_ready().await?;
            view.hvs.wait_until_ready().await?;
            view.pools.wait_until_ready().await?;
            view.cfw.wait_until_ready().await?;
            view.sgs.wait_until_ready().await?;
            view.ipsets.wait_until_ready().await?;
            view.hagroups.wait_until_ready().await?;
            view.users.wait_until_ready().await?;
            view.groups.wait_until_ready().await?;
            view.roles.wait_until_ready().await?;
            view.acls.wait_until_ready().await?;
            view.datacenter.wait_until_ready().await
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), ready)
            .await
            .map_err(|_| anyhow::anyhow!("the /etc/pve view's caches did not fill within 60 s"))??;
        Ok(view)
    }

    /// Writes are taken only while every watch delivers.
    pub fn writable(&self) -> bool {
        self.health.iter().all(Health::current)
    }

    /// The newest resource version in the caches (`.version`, `.vmlist`).
    fn version(&self) -> u64 {
        let rv = |m: &kube::api::ObjectMeta| {
            m.resource_version.as_deref().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        let mut max = 0;
        for v in self.vms.state() {
            max = max.max(rv(&v.metadata));
        }
        for c in self.cts.state() {
            max = max.max(rv(&c.metadata));
        }
        for h in self.hvs.state() {
            max = max.max(rv(&h.metadata));
        }
        max
    }

    /// The node a guest lives on: where it is bound, else the first node it is pinned to.
    fn node_of(meta_node: Option<&String>, placement: &kpve_crds::Placement) -> Option<String> {
        meta_node.cloned().or_else(|| placement.nodes.first().cloned())
    }

    fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.hvs.state().iter().map(|h| h.name_any()).collect();
        if !nodes.contains(&self.node) {
            nodes.push(self.node.clone());
        }
        nodes.sort();
        nodes
    }

    /// VMID → (node, kind, resource) of every guest that has a VMID and a node.
    fn guests(&self) -> BTreeMap<u32, (String, &'static str)> {
        let mut out = BTreeMap::new();
        for vm in self.vms.state() {
            let node = Self::node_of(vm.status.as_ref().and_then(|s| s.node.as_ref()), &vm.spec.placement);
            if let (Some(vmid), Some(node)) = (vm.spec.vmid, node) {
                out.insert(vmid, (node, "qemu"));
            }
        }
        for ct in self.cts.state() {
            let node = Self::node_of(ct.status.as_ref().and_then(|s| s.node.as_ref()), &ct.spec.placement);
            if let (Some(vmid), Some(node)) = (ct.spec.vmid, node) {
                out.insert(vmid, (node, "lxc"));
            }
        }
        out
    }

    fn vm(&self, vmid: u32) -> Option<std::sync::Arc<VirtualMachine>> {
        self.vms.state().into_iter().find(|v| v.spec.vmid == Some(vmid))
    }

    fn ct(&self, vmid: u32) -> Option<std::sync::Arc<LinuxContainer>> {
        self.cts.state().into_iter().find(|c| c.spec.vmid == Some(vmid))
    }

    /// What `path` (relative, no leading slash) is, with a file's current content.
    pub fn entry(&self, path: &str) -> Option<Entry> {
        let local = format!("nodes/{}", self.node);
        match path {
            "" | "nodes" | "ha" | "firewall" => return Some(Entry::Dir),
            "qemu-server" => return Some(Entry::Link(format!("{local}/qemu-server"))),
            "lxc" => return Some(Entry::Link(format!("{local}/lxc"))),
            "local" => return Some(Entry::Link(local)),
            "storage.cfg" => return Some(Entry::File(render::storage_cfg(&sorted(&self.pools)))),
            "datacenter.cfg" => {
                let dc = self.datacenter.state().into_iter().find(|d| d.name_any() == DATACENTER);
                return Some(Entry::File(render::datacenter_cfg(dc.as_deref())));
            }
            "user.cfg" => {
                let text = render::user_cfg(
                    &sorted(&self.users),
                    &sorted(&self.groups),
                    &sorted(&self.roles),
                    &sorted(&self.acls),
                );
                return Some(Entry::File(text));
            }
            "ha/groups.cfg" => return Some(Entry::File(render::ha_groups_cfg(&sorted(&self.hagroups)))),
            "ha/resources.cfg" => {
                let vms = sorted(&self.vms);
                let cts = sorted(&self.cts);
                let mut entries: Vec<(&str, u32, &kpve_crds::common::HaSpec)> = Vec::new();
                for vm in &vms {
                    if let (Some(vmid), Some(ha)) = (vm.spec.vmid, vm.spec.ha.as_ref()) {
                        entries.push(("vm", vmid, ha));
                    }
                }
                for ct in &cts {
                    if let (Some(vmid), Some(ha)) = (ct.spec.vmid, ct.spec.ha.as_ref()) {
                        entries.push(("ct", vmid, ha));
                    }
                }
                entries.sort_by_key(|e| e.1);
                return Some(Entry::File(render::ha_resources_cfg(&entries)));
            }
            "firewall/cluster.fw" => {
                let cluster = self.cfw.state().into_iter().find(|c| c.name_any() == "cluster");
                return render::cluster_fw(cluster.as_deref(), &sorted(&self.sgs), &sorted(&self.ipsets))
                    .map(Entry::File);
            }
            ".version" => return Some(Entry::File(render::version(self.version(), self.start))),
            ".vmlist" => {
                let guests = self.guests();
                let list: Vec<(u32, &str, &str)> =
                    guests.iter().map(|(vmid, (node, kind))| (*vmid, node.as_str(), *kind)).collect();
                return Some(Entry::File(render::vmlist(self.version(), &list)));
            }
            ".members" => {
                let now = jiff::Timestamp::now();
                let nodes: Vec<(String, bool)> = self
                    .nodes()
                    .into_iter()
                    .map(|n| {
                        let online = self.hvs.state().iter().any(|h| {
                            h.name_any() == n
                                && h.status
                                    .as_ref()
                                    .and_then(|s| s.last_heartbeat_time.as_deref())
                                    .is_some_and(|t| {
                                        t.parse::<jiff::Timestamp>()
                                            .is_ok_and(|t| now.duration_since(t).as_secs() < 60)
                                    })
                        });
                        (n, online)
                    })
                    .collect();
                return Some(Entry::File(render::members(&self.node, self.version(), &nodes)));
            }
            _ => {}
        }
        if let Some(file) = path.strip_prefix("firewall/") {
            let vmid: u32 = file.strip_suffix(".fw")?.parse().ok()?;
            let fw = match self.vm(vmid) {
                Some(vm) => render::guest_fw(vm.spec.firewall.as_ref()),
                None => render::guest_fw(self.ct(vmid)?.spec.firewall.as_ref()),
            };
            return fw.map(Entry::File);
        }
        let rest = path.strip_prefix("nodes/")?;
        let (node, sub) = rest.split_once('/').unwrap_or((rest, ""));
        if !self.nodes().iter().any(|n| n == node) {
            return None;
        }
        match sub {
            "" | "qemu-server" | "lxc" => return Some(Entry::Dir),
            "host.fw" => {
                let hv = self.hvs.state().into_iter().find(|h| h.name_any() == node)?;
                return render::host_fw(&hv).map(Entry::File);
            }
            _ => {}
        }
        let (_, dir, vmid) = guest_path(path)?;
        fn on_node(
            status: Option<&kpve_crds::common::GuestStatus>,
            placement: &kpve_crds::Placement,
            node: &str,
        ) -> bool {
            View::node_of(status.and_then(|s| s.node.as_ref()), placement).as_deref() == Some(node)
        }
        if dir == "qemu-server" {
            let vm = self.vm(vmid).filter(|vm| on_node(vm.status.as_ref(), &vm.spec.placement, node))?;
            Some(Entry::File(render::qemu_conf(&vm)))
        } else {
            let ct = self.ct(vmid).filter(|ct| on_node(ct.status.as_ref(), &ct.spec.placement, node))?;
            Some(Entry::File(render::lxc_conf(&ct)))
        }
    }

    /// Whether `path` is a directory, a link or a file, without rendering it.
    pub fn kind(&self, path: &str) -> Entry {
        match path {
            "" | "nodes" | "ha" | "firewall" => Entry::Dir,
            "qemu-server" | "lxc" | "local" => Entry::Link(String::new()),
            _ => match path.strip_prefix("nodes/").map(|r| r.split_once('/').map_or("", |(_, sub)| sub)) {
                Some("" | "qemu-server" | "lxc") => Entry::Dir,
                _ => Entry::File(String::new()),
            },
        }
    }

    /// The names in directory `path`, with whether each is a directory.
    pub fn list(&self, path: &str) -> Vec<String> {
        let mut names: Vec<String> = match path {
            "" => [
                "nodes",
                "qemu-server",
                "lxc",
                "local",
                "storage.cfg",
                "datacenter.cfg",
                "user.cfg",
                "ha",
                "firewall",
                ".members",
                ".vmlist",
                ".version",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            "nodes" => self.nodes(),
            "ha" => vec!["groups.cfg".into(), "resources.cfg".into()],
            "firewall" => {
                let mut names = Vec::new();
                if self.cfw.state().iter().any(|c| c.name_any() == "cluster") {
                    names.push("cluster.fw".to_string());
                }
                for vm in self.vms.state() {
                    if let (Some(vmid), Some(_)) = (vm.spec.vmid, &vm.spec.firewall) {
                        names.push(format!("{vmid}.fw"));
                    }
                }
                for ct in self.cts.state() {
                    if let (Some(vmid), Some(_)) = (ct.spec.vmid, &ct.spec.firewall) {
                        names.push(format!("{vmid}.fw"));
                    }
                }
                names
            }
            _ => {
                let Some(rest) = path.strip_prefix("nodes/") else { return Vec::new() };
                let (node, sub) = rest.split_once('/').unwrap_or((rest, ""));
                match sub {
                    "" => {
                        let mut names = vec!["qemu-server".to_string(), "lxc".to_string()];
                        if self.hvs.state().iter().any(|h| h.name_any() == node && h.spec.firewall.is_some())
                        {
                            names.push("host.fw".into());
                        }
                        names
                    }
                    "qemu-server" | "lxc" => {
                        let want = if sub == "lxc" { "lxc" } else { "qemu" };
                        self.guests()
                            .into_iter()
                            .filter(|(_, (n, k))| n == node && *k == want)
                            .map(|(vmid, _)| format!("{vmid}.conf"))
                            .collect()
                    }
                    _ => Vec::new(),
                }
            }
        };
        names.sort();
        names
    }

    /// Whether a write to `path` is taken (guest configs, firewall and HA files), even if the
    /// file does not exist yet.
    pub fn is_writable_path(&self, path: &str) -> bool {
        if let Some((node, _, _)) = guest_path(path) {
            return self.nodes().iter().any(|n| n == node);
        }
        if let Some(node) = path.strip_prefix("nodes/").and_then(|r| r.strip_suffix("/host.fw")) {
            return self.hvs.state().iter().any(|h| h.name_any() == node);
        }
        if let Some(vmid) = path.strip_prefix("firewall/").and_then(|f| f.strip_suffix(".fw")) {
            return vmid == "cluster"
                || vmid.parse::<u32>().is_ok_and(|v| self.vm(v).is_some() || self.ct(v).is_some());
        }
        matches!(path, "ha/groups.cfg" | "ha/resources.cfg" | "storage.cfg" | "user.cfg" | "datacenter.cfg")
    }

    /// Parses `text` as the file at `path` and applies it: a guest config updates its
    /// resource (fields the config does not carry stay as declared) or creates one.
    pub async fn apply(&self, path: &str, text: &[u8]) -> Result<(), WriteError> {
        if text.len() > MAX_FILE {
            return Err(WriteError::TooBig);
        }
        if !self.is_writable_path(path) {
            return Err(WriteError::NotWritable(path.to_string()));
        }
        if !self.writable() {
            return Err(WriteError::ReadOnly);
        }
        let text =
            std::str::from_utf8(text).map_err(|_| WriteError::Invalid(format!("{path}: not UTF-8")))?;
        let Some((node, dir, vmid)) = guest_path(path) else {
            let _one_at_a_time = self.cluster_files.lock().await;
            return match self.apply_file(path, text).await {
                Err(WriteError::Invalid(message)) => Err(self.refuse(path, None, &message).await),
                other => other,
            };
        };
        if text.trim().is_empty() {
            let message = "an empty config; remove the file to delete the guest";
            return Err(self.refuse(path, Some(vmid), message).await);
        }
        let owner = self.guests().get(&vmid).cloned();
        if let Some((other, kind)) = &owner
            && (other != node || (*kind == "qemu") != (dir == "qemu-server"))
        {
            return Err(self
                .refuse(path, Some(vmid), &format!("VMID {vmid} is a {kind} guest on node {other}"))
                .await);
        }
        let result = if dir == "qemu-server" {
            self.apply_vm(node, vmid, text).await
        } else {
            self.apply_ct(node, vmid, text).await
        };
        match result {
            Err(WriteError::Invalid(message)) => Err(self.refuse(path, Some(vmid), &message).await),
            other => other,
        }
    }

    /// Firewall and HA files: each replaces what it declares (the cluster firewall with its
    /// groups and IP sets, a guest's or node's firewall, the HA groups, the guests' HA).
    async fn apply_file(&self, path: &str, text: &str) -> Result<(), WriteError> {
        use kpve_crds::codec::fw;
        let invalid = |e: String| WriteError::Invalid(format!("{path}: {e}"));
        match path {
            "firewall/cluster.fw" => {
                let parsed = fw::parse_cluster_fw(text).map_err(|e| invalid(e.to_string()))?;
                let spec = parsed.spec.clone();
                self.upsert(ClusterFirewall::new("cluster", spec.clone()), |o: &mut ClusterFirewall| {
                    o.spec = spec.clone()
                })
                .await?;
                let groups: Vec<SecurityGroup> = parsed
                    .groups
                    .into_iter()
                    .map(|(name, spec)| SecurityGroup::new(&name.to_ascii_lowercase(), spec))
                    .collect();
                self.replace_all(&self.sgs, groups, |o, n| o.spec = n.spec.clone()).await?;
                let ipsets: Vec<IPSet> = parsed
                    .ipsets
                    .into_iter()
                    .map(|(name, spec)| IPSet::new(&name.to_ascii_lowercase(), spec))
                    .collect();
                self.replace_all(&self.ipsets, ipsets, |o, n| o.spec = n.spec.clone()).await
            }
            "datacenter.cfg" => {
                let options = parse::datacenter(text).map_err(invalid)?;
                crate::cluster_api::update_options(&self.client, |o| o.clone_from(&options))
                    .await
                    .map_err(|e| kube_error(e.message))
            }
            "user.cfg" => {
                let cfg = parse::user_cfg(text).map_err(invalid)?;
                self.apply_user_cfg(cfg).await.map_err(|e| match e {
                    WriteError::Invalid(m) => invalid(m),
                    other => other,
                })
            }
            "storage.cfg" => {
                let pools: Vec<StoragePool> = parse::storage(text)
                    .map_err(invalid)?
                    .into_iter()
                    .map(|(id, spec)| StoragePool::new(&id, spec))
                    .collect();
                // Pending volume removals are not in the file: they stay.
                self.replace_all(&self.pools, pools, |o, n| {
                    let removals = std::mem::take(&mut o.spec.removals);
                    o.spec = n.spec.clone();
                    o.spec.removals = removals;
                })
                .await
            }
            "ha/groups.cfg" => {
                let groups: Vec<HAGroup> = parse::ha_groups(text)
                    .map_err(invalid)?
                    .into_iter()
                    .map(|(name, spec)| HAGroup::new(&name, spec))
                    .collect();
                self.replace_all(&self.hagroups, groups, |o, n| o.spec = n.spec.clone()).await
            }
            "ha/resources.cfg" => {
                let entries = parse::ha_resources(text).map_err(invalid)?;
                // Every entry names a guest of its kind, checked before anything changes.
                for (kind, vmid, _) in &entries {
                    let exists =
                        if kind == "vm" { self.vm(*vmid).is_some() } else { self.ct(*vmid).is_some() };
                    if !exists {
                        return Err(invalid(format!("{kind}:{vmid}: no such guest")));
                    }
                }
                let wanted = |kind: &str, vmid: Option<u32>| {
                    entries.iter().find(|(k, v, _)| k == kind && Some(*v) == vmid).map(|e| e.2.clone())
                };
                for vm in self.vms.state() {
                    let ha = wanted("vm", vm.spec.vmid);
                    if ha != vm.spec.ha {
                        self.edit_vm(&vm, |spec| spec.ha = ha.clone()).await?;
                    }
                }
                for ct in self.cts.state() {
                    let ha = wanted("ct", ct.spec.vmid);
                    if ha != ct.spec.ha {
                        self.edit_ct(&ct, |spec| spec.ha = ha.clone()).await?;
                    }
                }
                Ok(())
            }
            _ => {
                if let Some(node) = path.strip_prefix("nodes/").and_then(|r| r.strip_suffix("/host.fw")) {
                    let parsed = fw::parse_host_fw(text).map_err(|e| invalid(e.to_string()))?;
                    let api = Api::<Hypervisor>::all(self.client.clone());
                    return cache::replace_retrying(&api, node, |o| {
                        o.spec.firewall = Some(parsed.clone());
                        o.status = None;
                        Ok(())
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| kube_error(e.message));
                }
                let vmid: u32 = path
                    .strip_prefix("firewall/")
                    .and_then(|f| f.strip_suffix(".fw"))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| WriteError::NotWritable(path.to_string()))?;
                let parsed = fw::parse_guest_fw(text).map_err(|e| invalid(e.to_string()))?;
                if let Some(vm) = self.vm(vmid) {
                    self.edit_vm(&vm, |spec| spec.firewall = Some(parsed.clone())).await
                } else if let Some(ct) = self.ct(vmid) {
                    self.edit_ct(&ct, |spec| spec.firewall = Some(parsed.clone())).await
                } else {
                    Err(WriteError::NotWritable(path.to_string()))
                }
            }
        }
    }

    /// user.cfg: custom roles, groups, users (their password hashes and token secrets, which
    /// the file does not carry, kept), then ACLs — each replacing what the file declares. An
    /// ACL line equal to an existing PVEACL keeps that object (declared in YAML, say); other
    /// lines become objects of their own.
    async fn apply_user_cfg(&self, cfg: parse::UserCfg) -> Result<(), WriteError> {
        use crate::access_api::object_name;
        use kpve_crds::{PVEACLSpec, PVEGroupSpec, PVERoleSpec, PVEToken, PVEUserSpec};
        let old_users = self.users.state();
        let mut users: Vec<PVEUser> = Vec::new();
        for line in &cfg.users {
            let old = old_users.iter().find(|u| u.spec.userid == line.userid);
            // root@pam is built in; it is a resource only once it has tokens.
            if (line.userid == "root@pam" && old.is_none())
                || users.iter().any(|u| u.spec.userid == line.userid)
            {
                continue;
            }
            let mut tokens = Vec::new();
            for t in cfg.tokens.iter().filter(|t| t.userid == line.userid) {
                let Some(known) = old.and_then(|u| u.spec.tokens.iter().find(|k| k.id == t.id)) else {
                    return Err(WriteError::Invalid(format!(
                        "token {}!{}: user.cfg carries no token secrets; create tokens with the API (pveum user token add)",
                        t.userid, t.id
                    )));
                };
                tokens.push(PVEToken {
                    id: t.id.clone(),
                    privsep: t.privsep,
                    expire: t.expire,
                    comment: t.comment.clone(),
                    secret_hash: known.secret_hash.clone(),
                });
            }
            let spec = PVEUserSpec {
                userid: line.userid.clone(),
                enable: line.enable,
                expire: line.expire,
                firstname: line.firstname.clone(),
                lastname: line.lastname.clone(),
                email: line.email.clone(),
                comment: line.comment.clone(),
                groups: cfg
                    .groups
                    .iter()
                    .filter(|g| g.1.contains(&line.userid))
                    .map(|g| g.0.clone())
                    .collect(),
                password_hash: old.and_then(|u| u.spec.password_hash.clone()),
                tokens,
            };
            let name = old.map(|u| u.name_any()).unwrap_or_else(|| object_name(&line.userid));
            users.push(PVEUser::new(&name, spec));
        }
        let old_roles = self.roles.state();
        let roles: Vec<PVERole> = cfg
            .roles
            .iter()
            .map(|(roleid, privs)| {
                let name = old_roles
                    .iter()
                    .find(|r| r.spec.roleid == *roleid)
                    .map(|r| r.name_any())
                    .unwrap_or_else(|| object_name(roleid));
                PVERole::new(&name, PVERoleSpec { roleid: roleid.clone(), privs: privs.clone() })
            })
            .collect();
        let old_groups = self.groups.state();
        let groups: Vec<PVEGroup> = cfg
            .groups
            .iter()
            .map(|(groupid, _, comment)| {
                let name = old_groups
                    .iter()
                    .find(|g| g.spec.groupid == *groupid)
                    .map(|g| g.name_any())
                    .unwrap_or_else(|| object_name(groupid));
                PVEGroup::new(&name, PVEGroupSpec { groupid: groupid.clone(), comment: comment.clone() })
            })
            .collect();
        let sorted = |a: &PVEACLSpec| {
            let mut a = a.clone();
            for list in [&mut a.roles, &mut a.users, &mut a.groups, &mut a.tokens] {
                list.sort();
            }
            a
        };
        let old_acls = self.acls.state();
        let mut acls: Vec<PVEACL> = Vec::new();
        for acl in &cfg.acls {
            let wanted = sorted(acl);
            let kept = old_acls
                .iter()
                .find(|o| sorted(&o.spec) == wanted && !acls.iter().any(|a| a.name_any() == o.name_any()));
            acls.push(match kept {
                Some(o) => (**o).clone(),
                None => {
                    use sha2::Digest;
                    let digest = sha2::Sha256::digest(format!("{wanted:?}").as_bytes());
                    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
                    PVEACL::new(&format!("acl-{hex}"), acl.clone())
                }
            });
        }
        self.replace_all(&self.roles, roles, |o, n| o.spec = n.spec.clone()).await?;
        self.replace_all(&self.groups, groups, |o, n| o.spec = n.spec.clone()).await?;
        // What user.cfg does not carry comes from the object as read for the write (a
        // password changed meanwhile through the API stays).
        self.replace_all(&self.users, users, |o, n| {
            let hash = o.spec.password_hash.take();
            let old_tokens = std::mem::take(&mut o.spec.tokens);
            o.spec = n.spec.clone();
            o.spec.password_hash = hash;
            for t in &mut o.spec.tokens {
                if let Some(old) = old_tokens.iter().find(|old| old.id == t.id) {
                    t.secret_hash.clone_from(&old.secret_hash);
                }
            }
        })
        .await?;
        self.replace_all(&self.acls, acls, |o, n| o.spec = n.spec.clone()).await
    }

    async fn edit_vm(
        &self,
        vm: &VirtualMachine,
        edit: impl Fn(&mut VirtualMachineSpec),
    ) -> Result<(), WriteError> {
        self.edit_guest(&self.vms, vm, |o: &mut VirtualMachine| {
            edit(&mut o.spec);
            o.status = None;
        })
        .await
    }

    async fn edit_ct(
        &self,
        ct: &LinuxContainer,
        edit: impl Fn(&mut LinuxContainerSpec),
    ) -> Result<(), WriteError> {
        self.edit_guest(&self.cts, ct, |o: &mut LinuxContainer| {
            edit(&mut o.spec);
            o.status = None;
        })
        .await
    }

    /// Replaces a guest through `edit` and returns once the view's cache (`store`) shows the
    /// write: the next read of the file shows this edit.
    async fn edit_guest<K>(
        &self,
        store: &Store<K>,
        guest: &K,
        edit: impl Fn(&mut K),
    ) -> Result<(), WriteError>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize
            + 'static,
    {
        let namespace = guest.namespace().unwrap_or_default();
        let api = Api::<K>::namespaced(self.client.clone(), &namespace);
        let written = cache::replace_retrying(&api, &guest.name_any(), |o| {
            edit(o);
            Ok(())
        })
        .await
        .map_err(|e| kube_error(e.message))?;
        cache::settle(store, Some(&namespace), &guest.name_any(), written.resource_version().as_deref())
            .await;
        Ok(())
    }

    /// Replaces the spec of a cluster-scoped resource (through `set`), or creates `fresh`.
    async fn upsert<K>(&self, fresh: K, set: impl Fn(&mut K)) -> Result<Option<String>, WriteError>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let name = fresh.name_any();
        match api.get_opt(&name).await.map_err(|e| kube_error(e.to_string()))? {
            // Nothing to change: no write (an unchanged file rewritten changes nothing).
            Some(existing)
                if {
                    let mut edited = existing.clone();
                    set(&mut edited);
                    serde_json::to_value(&edited).ok() == serde_json::to_value(&existing).ok()
                } =>
            {
                Ok(existing.meta().resource_version.clone())
            }
            Some(_) => cache::replace_retrying(&api, &name, |o| {
                set(o);
                Ok(())
            })
            .await
            .map(|saved| saved.meta().resource_version.clone())
            .map_err(|e| kube_error(e.message)),
            None => api
                .create(&PostParams::default(), &fresh)
                .await
                .map(|saved| saved.meta().resource_version.clone())
                .map_err(|e| kube_error(e.to_string())),
        }
    }

    /// Makes the cluster-scoped resources of one kind exactly `wanted`: each created or
    /// updated (through `set`), the others deleted.
    async fn replace_all<K>(
        &self,
        store: &Store<K>,
        wanted: Vec<K>,
        set: impl Fn(&mut K, &K),
    ) -> Result<(), WriteError>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
    {
        let mut written = Vec::new();
        for object in &wanted {
            written.push((object.name_any(), self.upsert(object.clone(), |o| set(o, object)).await?));
        }
        let api: Api<K> = Api::all(self.client.clone());
        for existing in store.state() {
            let name = existing.name_any();
            if !wanted.iter().any(|w| w.name_any() == name) {
                api.delete(&name, &DeleteParams::default()).await.map_err(|e| kube_error(e.to_string()))?;
                written.push((name, None));
            }
        }
        // The file reads back what was written when the call returns (the next `>>` opens
        // it rendered from these objects, not from a cache still behind).
        for (name, version) in written {
            cache::settle(store, None, &name, version.as_deref()).await;
        }
        Ok(())
    }

    async fn apply_vm(&self, node: &str, vmid: u32, text: &str) -> Result<(), WriteError> {
        let parsed = kpve_crds::codec::qemu::parse_qemu_config(text)
            .map_err(|e| WriteError::Invalid(format!("{vmid}.conf: {e}")))?;
        match self.vm(vmid) {
            Some(vm) => {
                self.edit_vm(&vm, |spec| {
                    let mut new = parsed.spec.clone();
                    new.keep_undeclared(spec);
                    *spec = new;
                })
                .await?;
            }
            None => {
                let mut spec: VirtualMachineSpec = parsed.spec;
                spec.vmid = Some(vmid);
                spec.power_state = PowerState::Stopped;
                spec.placement.nodes = vec![node.to_string()];
                let vm = VirtualMachine::new(&format!("vm-{vmid}"), spec);
                Api::<VirtualMachine>::namespaced(self.client.clone(), "default")
                    .create(&PostParams::default(), &vm)
                    .await
                    .map_err(|e| kube_error(e.to_string()))?;
            }
        }
        Ok(())
    }

    async fn apply_ct(&self, node: &str, vmid: u32, text: &str) -> Result<(), WriteError> {
        let spec = LinuxContainerSpec::from_lxc_config(text)
            .map_err(|e| WriteError::Invalid(format!("{vmid}.conf: {e}")))?;
        match self.ct(vmid) {
            Some(ct) => {
                self.edit_ct(&ct, |current| {
                    let mut new = spec.clone();
                    new.keep_undeclared(current);
                    *current = new;
                })
                .await?;
            }
            None => {
                let mut spec = spec;
                spec.vmid = Some(vmid);
                spec.power_state = PowerState::Stopped;
                spec.placement.nodes = vec![node.to_string()];
                let ct = LinuxContainer::new(&format!("ct-{vmid}"), spec);
                Api::<LinuxContainer>::namespaced(self.client.clone(), "default")
                    .create(&PostParams::default(), &ct)
                    .await
                    .map_err(|e| kube_error(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Removing a guest's config deletes the guest.
    pub async fn remove(&self, path: &str) -> Result<(), WriteError> {
        let Some((_, dir, vmid)) = guest_path(path) else {
            return Err(WriteError::NotWritable(path.to_string()));
        };
        if !self.writable() {
            return Err(WriteError::ReadOnly);
        }
        let dp = DeleteParams::default();
        let result = match (dir, self.vm(vmid), self.ct(vmid)) {
            ("qemu-server", Some(vm), _) => {
                Api::<VirtualMachine>::namespaced(self.client.clone(), &vm.namespace().unwrap_or_default())
                    .delete(&vm.name_any(), &dp)
                    .await
                    .map(|_| ())
            }
            ("lxc", _, Some(ct)) => {
                Api::<LinuxContainer>::namespaced(self.client.clone(), &ct.namespace().unwrap_or_default())
                    .delete(&ct.name_any(), &dp)
                    .await
                    .map(|_| ())
            }
            _ => return Err(WriteError::NotWritable(path.to_string())),
        };
        result.map_err(|e| kube_error(e.to_string()))
    }

    /// Moving a guest config into another node's directory migrates the guest there, as
    /// `qm migrate` moves the config on Proxmox: a stopped guest whose volumes need no copy at
    /// once, a running VM live (local disks copied), a container by restart migration (local
    /// volumes copied). Returns once the view shows it on the target, or the refusal or the
    /// migration's failure (with an Event).
    pub async fn relocate(&self, from: &str, to: &str) -> Result<(), WriteError> {
        let (Some((source, dir, vmid)), Some((target, to_dir, to_vmid))) = (guest_path(from), guest_path(to))
        else {
            return Err(WriteError::NotWritable(to.to_string()));
        };
        if !self.writable() {
            return Err(WriteError::ReadOnly);
        }
        if (dir, vmid) != (to_dir, to_vmid) {
            let message = "a guest config keeps its name and directory kind; only its node may change";
            return Err(self.refuse(to, Some(vmid), message).await);
        }
        if !self.nodes().iter().any(|n| n == target) {
            return Err(WriteError::NotWritable(to.to_string()));
        }
        let kind = if dir == "lxc" { "lxc" } else { "qemu" };
        if self.guests().get(&vmid).map(|(node, k)| (node.as_str(), *k)) != Some((source, kind)) {
            return Err(WriteError::NotWritable(from.to_string()));
        }
        let order = match (self.vm(vmid), self.ct(vmid)) {
            (Some(vm), _) if kind == "qemu" => {
                let who = format!("pmxcfs@{}", self.node);
                crate::migrate::order_move(&self.client, &vm, target, &who, true, true).await
            }
            (_, Some(ct)) => {
                let who = format!("pmxcfs@{}", self.node);
                crate::migrate::order_ct_move(&self.client, &ct, target, &who, true, false).await
            }
            _ => return Err(WriteError::NotWritable(from.to_string())),
        };
        let id = match order {
            Err(e) if e.status == 403 || e.message.contains("forbidden") => {
                return Err(WriteError::Denied(e.message));
            }
            Err(e) => return Err(self.refuse(to, Some(vmid), &e.message).await),
            Ok(id) => id,
        };
        // Until it is bound there (a live migration ends Completed, then is bound).
        let deadline = tokio::time::Instant::now() + MOVE_LIMIT;
        loop {
            let status = if kind == "qemu" {
                self.vm(vmid).map(|vm| vm.status.clone().unwrap_or_default())
            } else {
                self.ct(vmid).map(|ct| ct.status.clone().unwrap_or_default())
            };
            let Some(status) = status else {
                return Err(WriteError::Failed(format!("guest {vmid} was deleted while it moved")));
            };
            if status.node.as_deref() == Some(target) {
                return Ok(());
            }
            if let Some(m) = status.migration.as_ref().filter(|m| Some(&m.id) == id.as_ref())
                && m.phase == kpve_crds::MigrationPhase::Failed
            {
                let message =
                    format!("migration to {target} failed: {}", m.message.clone().unwrap_or_default());
                return Err(self.refuse(to, Some(vmid), &message).await);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(WriteError::InProgress(format!(
                    "guest {vmid} is still migrating to {target} after {MOVE_LIMIT:?}; its config moves when it is bound there"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Records why an edit was refused as an Event on the guest (or where it would be), and
    /// returns the error.
    async fn refuse(&self, path: &str, vmid: Option<u32>, message: &str) -> WriteError {
        use k8s_openapi::api::core::v1::{Event, ObjectReference};
        let (kind, name, namespace) =
            match (vmid, vmid.and_then(|v| self.vm(v)), vmid.and_then(|v| self.ct(v))) {
                (_, Some(vm), _) => ("VirtualMachine", vm.name_any(), vm.namespace().unwrap_or_default()),
                (_, _, Some(ct)) => ("LinuxContainer", ct.name_any(), ct.namespace().unwrap_or_default()),
                (Some(vmid), _, _) if path.contains("/lxc/") => {
                    ("LinuxContainer", format!("ct-{vmid}"), "default".to_string())
                }
                (Some(vmid), _, _) => ("VirtualMachine", format!("vm-{vmid}"), "default".to_string()),
                // Cluster files: the Event stands in `default`, about the kind the file declares.
                (None, _, _) if path == "datacenter.cfg" => {
                    ("Datacenter", DATACENTER.to_string(), "default".to_string())
                }
                (None, _, _) if path == "user.cfg" => {
                    ("PVEUser", "user-cfg".to_string(), "default".to_string())
                }
                (None, _, _) if path == "storage.cfg" => {
                    ("StoragePool", "storage".to_string(), "default".to_string())
                }
                (None, _, _) if path.starts_with("ha/") => {
                    ("HAGroup", "ha".to_string(), "default".to_string())
                }
                (None, _, _) if path.ends_with("host.fw") => {
                    ("Hypervisor", self.node.clone(), "default".to_string())
                }
                (None, _, _) => ("ClusterFirewall", "cluster".to_string(), "default".to_string()),
            };
        let now = jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default();
        let event = Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some(format!("{name}.")),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("kpve.io/v1alpha1".into()),
                kind: Some(kind.into()),
                name: Some(name),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            reason: Some("InvalidConfig".into()),
            message: Some(format!("/etc/pve/{path}: {}", short(message))),
            type_: Some("Warning".into()),
            first_timestamp: now.parse().ok().map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("kpve-pmxcfs".into()),
                host: Some(self.node.clone()),
            }),
            count: Some(1),
            ..Default::default()
        };
        if let Err(e) = Api::<Event>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await
        {
            tracing::debug!(error = %e, "event not recorded");
        }
        tracing::warn!(%path, message = %short(message), "/etc/pve edit refused");
        WriteError::Invalid(message.to_string())
    }
}

/// A message cut to a readable length (an API error may quote a whole oversized value).
fn short(message: &str) -> String {
    match message.char_indices().nth(400) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_string(),
    }
}

fn kube_error(message: String) -> WriteError {
    if message.contains("forbidden") || message.contains("403") {
        WriteError::Denied(message)
    } else if message.contains("Invalid") || message.contains("422") || message.contains("invalid") {
        WriteError::Invalid(message)
    } else {
        WriteError::Failed(message)
    }
}
