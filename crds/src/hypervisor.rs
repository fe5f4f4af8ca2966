//! `Hypervisor`: one node. Spec declares labels-driven capacity overrides, bridges, host
//! firewall and maintenance; status is the agent's heartbeat and observed capacity.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::firewall::HostFirewall;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "Hypervisor",
    plural = "hypervisors",
    singular = "hypervisor",
    shortname = "hv",
    shortname = "node",
    category = "kpve",
    status = "HypervisorStatus",
    doc = "A hypervisor node running the kpve agent",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "CPUs", type_ = "integer", json_path = ".status.capacity.cpus"),
    printcolumn(name = "MemoryMiB", type_ = "integer", json_path = ".status.capacity.memoryMiB"),
    printcolumn(name = "Accel", type_ = "string", json_path = ".status.accelerator"),
    printcolumn(name = "Maintenance", type_ = "boolean", json_path = ".spec.maintenance"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HypervisorSpec {
    /// Drain the node: guests migrate away and nothing new is placed here.
    #[serde(default)]
    pub maintenance: bool,
    /// Overrides for what the scheduler may place here (defaults: what the agent detects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// How far placement may exceed physical capacity.
    #[serde(default)]
    pub overcommit: Overcommit,
    /// Linux bridges the agent creates and keeps on this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub bridges: Vec<Bridge>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<HostFirewall>,
}

/// Placeable capacity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capacity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub cpus: Option<u32>,
    #[serde(default, rename = "memoryMiB", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16))]
    pub memory_mib: Option<u64>,
}

/// Overcommit ratios: placed vCPUs ≤ cpus × cpu, placed memory ≤ memory × memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Overcommit {
    #[serde(default = "default_cpu_ratio")]
    #[schemars(range(min = 0.1, max = 64.0))]
    pub cpu: f64,
    #[serde(default = "default_mem_ratio")]
    #[schemars(range(min = 0.1, max = 4.0))]
    pub memory: f64,
}

fn default_cpu_ratio() -> f64 {
    4.0
}

fn default_mem_ratio() -> f64 {
    1.0
}

/// A Linux bridge (Proxmox `vmbr0`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bridge {
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$"))]
    pub name: String,
    /// Host address on the bridge, as CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"))]
    pub address: Option<String>,
    /// Physical or bond ports enslaved to the bridge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default)]
    pub vlan_aware: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 65535))]
    pub mtu: Option<u32>,
}

/// What the agent observes on its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Last time the agent reported (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<NodeResources>,
    /// CPU load as a fraction of all cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage: Option<f64>,
    #[serde(default, rename = "memoryUsedMiB", skip_serializing_if = "Option::is_none")]
    pub memory_used_mib: Option<u64>,
    /// `kvm` when /dev/kvm works, else `tcg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<Versions>,
    /// Address other nodes reach this node on (migration, console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<NodeFirewallStatus>,
}

/// What the agent's firewall enforces on this node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeFirewallStatus {
    /// Whether kpve's nftables tables are loaded (the cluster firewall is enabled).
    pub enabled: bool,
    /// Generation of each input in force, keyed `Kind/name` (`ClusterFirewall/cluster`,
    /// `SecurityGroup/web`, `IPSet/admins`, `Hypervisor/<node>`, `VirtualMachine/ns/name`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub inputs: std::collections::BTreeMap<String, i64>,
    /// Number of nftables rules loaded.
    #[serde(default)]
    pub rules: u32,
    /// When the ruleset in force was applied (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    pub cpus: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Versions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kpve: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lxc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

crate::serde_default!(HypervisorSpec, Overcommit);
