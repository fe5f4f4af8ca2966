//! `StoragePool`: a Proxmox storage (`storage.cfg` entry) and its per-node usage.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "StoragePool",
    plural = "storagepools",
    singular = "storagepool",
    shortname = "sp",
    category = "kpve",
    status = "StoragePoolStatus",
    doc = "A storage pool (Proxmox storage.cfg entry): where disks, templates and ISOs live",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Path", type_ = "string", json_path = ".spec.path"),
    printcolumn(name = "Shared", type_ = "boolean", json_path = ".spec.shared"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolSpec {
    #[serde(rename = "type")]
    pub type_: StorageType,
    /// Directory for `dir` pools (default: under the agent's data dir for `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^/.*$"))]
    pub path: Option<String>,
    /// What the pool holds.
    #[serde(default = "default_content")]
    #[schemars(length(min = 1))]
    pub content: Vec<ContentType>,
    /// Nodes that have this pool; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The same data is reachable from every node (enables migration without copying).
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub disable: bool,
    /// Default image format for new disks on file-based pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(raw|qcow2|vmdk)$"))]
    pub format: Option<String>,
    /// LVM volume group (`lvm`, `lvmthin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vgname: Option<String>,
    /// LVM thin pool (`lvmthin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinpool: Option<String>,
    /// NFS/CIFS server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// NFS export path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// ZFS pool (`zfspool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Create the directory when missing (`dir`).
    #[serde(default = "crate::firewall::yes")]
    pub mkdir: bool,
    /// Volumes to remove (Proxmox `DELETE …/content/{volume}`): the node's agent deletes the
    /// file unless it is newer than the request or a running guest there uses it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removals: Vec<VolumeRemoval>,
}

/// A request to remove one volume from one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeRemoval {
    pub node: String,
    /// Volume id (`local:iso/x.iso`, `local:100/vm-100-disk-1.qcow2`).
    pub volume: String,
    /// Unix time of the request: a file written after it is kept.
    pub requested: u64,
}

fn default_content() -> Vec<ContentType> {
    vec![ContentType::Images, ContentType::Rootdir]
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    Dir,
    Lvm,
    Lvmthin,
    Nfs,
    Cifs,
    Zfspool,
    Btrfs,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    Images,
    Rootdir,
    Vztmpl,
    Iso,
    Backup,
    Snippets,
    Import,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Capacity and usage as seen by each node's agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<PoolNodeStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolNodeStatus {
    pub node: String,
    pub active: bool,
    /// Bytes.
    pub total: u64,
    pub used: u64,
    pub available: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Volume ids present on this node (`local:100/vm-100-disk-0.qcow2`), like Proxmox's
    /// storage content listing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<String>,
}
