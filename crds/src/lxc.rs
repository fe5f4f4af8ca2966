//! `LinuxContainer`: an LXC guest, as declared in Proxmox's `lxc/<vmid>.conf`.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{GuestSpec, GuestStatus, HaSpec, Placement, PowerState, Startup};
use crate::firewall::{GuestFirewall, yes};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "LinuxContainer",
    plural = "linuxcontainers",
    singular = "linuxcontainer",
    namespaced,
    shortname = "lxc",
    shortname = "ct",
    category = "kpve",
    status = "GuestStatus",
    doc = "An LXC system container (Proxmox pve-container guest)",
    selectable = ".status.node",
    selectable = ".status.migration.target",
    printcolumn(name = "VMID", type_ = "integer", json_path = ".spec.vmid"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "Power", type_ = "string", json_path = ".spec.powerState"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Template", type_ = "string", json_path = ".spec.template", priority = 1)
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinuxContainerSpec {
    /// Cluster-unique id (100–999999999). Allocated by the API server when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 999_999_999))]
    pub vmid: Option<u32>,
    /// Container host name; defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?$"), length(max = 63))]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[a-zA-Z0-9_][a-zA-Z0-9_\-+.]*$")))]
    pub tags: Vec<String>,
    #[serde(default)]
    pub power_state: PowerState,
    /// OS template the rootfs is created from (`local:vztmpl/alpine-3.20.tar.xz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z][a-z0-9\-_.]*[a-z0-9]:vztmpl/.+$"))]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ostype: Option<CtOsType>,
    #[serde(default)]
    pub arch: CtArch,
    /// CPU cores visible to the container; all host cores when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8192))]
    pub cores: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 8192.0))]
    pub cpulimit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 500_000))]
    pub cpuunits: Option<u32>,
    /// Memory limit in MiB.
    #[serde(default = "default_memory")]
    #[schemars(range(min = 16))]
    pub memory: u32,
    /// Swap in MiB.
    #[serde(default = "default_memory")]
    #[schemars(range(min = 0))]
    pub swap: u32,
    pub rootfs: RootFs,
    /// Additional mount points, keyed by id (`mp0`, `mp1`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub mount_points: Vec<MountPoint>,
    /// Network interfaces, keyed by id (`net0`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub nics: Vec<CtNic>,
    /// Run with a user-namespace id map (safer; kpve's default, unlike Proxmox's API).
    #[serde(default = "yes")]
    pub unprivileged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Features>,
    /// A crypt(3) hash for root (`$6$…`); plaintext is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^\$[0-9a-z]+\$.+$"))]
    pub password_hash: Option<String>,
    /// OpenSSH public keys installed for root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_public_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameserver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub searchdomain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Attach /dev/console.
    #[serde(default = "yes")]
    pub console: bool,
    #[serde(default = "two")]
    #[schemars(range(min = 0, max = 6))]
    pub tty: u32,
    #[serde(default)]
    pub onboot: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Startup>,
    #[serde(default)]
    pub protection: bool,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<GuestFirewall>,
    /// Raw `lxc.*` keys appended to the LXC config, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw_lxc: Vec<RawLxc>,
    /// Further pve-container options passed through verbatim (`cmode`, `hookscript`, `dev0`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

fn default_memory() -> u32 {
    512
}

fn two() -> u32 {
    2
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CtOsType {
    Debian,
    Devuan,
    Ubuntu,
    Centos,
    Fedora,
    Opensuse,
    Archlinux,
    Alpine,
    Gentoo,
    Nixos,
    Unmanaged,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CtArch {
    #[default]
    Amd64,
    I386,
    Arm64,
    Armhf,
    Riscv32,
    Riscv64,
}

/// The container's root file system.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootFs {
    /// Storage pool a new volume of `size` is allocated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$"))]
    pub pool: Option<String>,
    /// An existing volume (`local:101/subvol-101-disk-0.subvol`). Exclusive with `pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([a-z][a-z0-9\-_.]*[a-z0-9]:.+|/.+)$"))]
    pub volume: Option<String>,
    /// Size, e.g. `8G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(\.[0-9]+)?([KMGT]i?)?$"))]
    pub size: Option<String>,
    #[serde(default, flatten)]
    pub mount: MountOptions,
    /// A new volume starts as a copy of this one (`local:100/subvol-100-disk-0.subvol`,
    /// Proxmox `clone`) instead of being extracted from the OS template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z][a-z0-9\-_.]*[a-z0-9]:.+$"))]
    pub clone_from: Option<String>,
}

impl LinuxContainerSpec {
    /// Takes from `old` what a pve-container config does not carry (VMID, power state,
    /// placement, OS template, HA, firewall, the rootfs clone source), for a spec parsed from
    /// an edited config.
    pub fn keep_undeclared(&mut self, old: &mut LinuxContainerSpec) {
        self.vmid = old.vmid;
        self.power_state = old.power_state;
        self.placement = std::mem::take(&mut old.placement);
        self.template = old.template.take();
        self.ha = old.ha.take();
        self.firewall = old.firewall.take();
        if self.rootfs.volume.is_none() && self.rootfs.pool == old.rootfs.pool {
            self.rootfs.clone_from = old.rootfs.clone_from.take();
        }
    }

    /// A container template (Proxmox `template: 1`): the source of clones; it never runs.
    pub fn is_template(&self) -> bool {
        self.options.get("template").is_some_and(|v| v == "1")
    }
}

/// Options shared by rootfs and mount points.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MountOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<bool>,
    #[serde(default)]
    pub quota: bool,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default = "yes")]
    pub replicate: bool,
    #[serde(default)]
    pub shared: bool,
    /// Extra mount options, e.g. `noatime;nosuid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(
        r"^(noatime|lazytime|nodev|noexec|nosuid|discard)(;(noatime|lazytime|nodev|noexec|nosuid|discard))*$"
    ))]
    pub mountoptions: Option<String>,
}

/// An additional mount point (`mp0: local:101/vm-101-disk-1.raw,mp=/data,size=8G`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MountPoint {
    /// mp0–mp255.
    #[schemars(pattern(r"^mp([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])$"))]
    pub id: String,
    /// Path inside the container.
    #[schemars(pattern(r"^/.*$"))]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$"))]
    pub pool: Option<String>,
    /// An existing volume, or a host path for a bind mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([a-z][a-z0-9\-_.]*[a-z0-9]:.+|/.+)$"))]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(\.[0-9]+)?([KMGT]i?)?$"))]
    pub size: Option<String>,
    #[serde(default)]
    pub backup: bool,
    #[serde(default, flatten)]
    pub mount: MountOptions,
}

/// A container NIC, a veth pair on a bridge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CtNic {
    /// net0–net31.
    #[schemars(pattern(r"^net([0-9]|[12][0-9]|3[01])$"))]
    pub id: String,
    /// Interface name inside the container, e.g. `eth0`.
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$"))]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"))]
    pub hwaddr: Option<String>,
    /// IPv4 CIDR, `dhcp` or `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(dhcp|manual|[0-9.]+/[0-9]{1,2})$"))]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9.]+$"))]
    pub gw: Option<String>,
    /// IPv6 CIDR, `auto`, `dhcp` or `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(auto|dhcp|manual|[0-9a-fA-F:]+/[0-9]{1,3})$"))]
    pub ip6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F:]+$"))]
    pub gw6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub tag: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(;[0-9]+)*$"))]
    pub trunks: Option<String>,
    #[serde(default)]
    pub firewall: bool,
    #[serde(default)]
    pub link_down: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 65535))]
    pub mtu: Option<u32>,
    /// Rate limit in MB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub rate: Option<f64>,
}

/// Container features (`features: keyctl=1,nesting=1`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Features {
    #[serde(default)]
    pub nesting: bool,
    #[serde(default)]
    pub keyctl: bool,
    #[serde(default)]
    pub fuse: bool,
    #[serde(default)]
    pub mknod: bool,
    #[serde(default)]
    pub force_rw_sys: bool,
    /// File systems the container may mount (`nfs`, `cifs`, `ext4`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[a-z0-9]+$")))]
    pub mount: Vec<String>,
}

/// One raw `lxc.*` config line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawLxc {
    #[schemars(pattern(r"^lxc\.[a-z0-9_.]+$"))]
    pub key: String,
    pub value: String,
}

crate::serde_default!(Features);

impl crate::common::GuestObject for LinuxContainer {
    fn guest_spec(&self) -> &(dyn GuestSpec + Sync) {
        &self.spec
    }
    fn guest_status(&self) -> Option<&GuestStatus> {
        self.status.as_ref()
    }
}

impl GuestSpec for LinuxContainerSpec {
    fn vmid(&self) -> Option<u32> {
        self.vmid
    }
    fn power_state(&self) -> PowerState {
        self.power_state
    }
    fn placement(&self) -> &Placement {
        &self.placement
    }
    fn ha(&self) -> Option<&HaSpec> {
        self.ha.as_ref()
    }
    fn firewall(&self) -> Option<&GuestFirewall> {
        self.firewall.as_ref()
    }
    fn startup(&self) -> Option<&Startup> {
        self.startup.as_ref()
    }
}
