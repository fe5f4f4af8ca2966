//! `Datacenter`: the datacenter-wide options of Proxmox's `datacenter.cfg` (`/cluster/options`).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The one object's name.
pub const DATACENTER: &str = "cluster";

/// Datacenter options: `datacenter.cfg` keys with their values as Proxmox writes them
/// (`keyboard: de`, `migration: type=insecure,network=10.0.0.0/24`). One object, named
/// `cluster`. kpve keeps and serves them (the `/etc/pve` view, `/cluster/options`), where
/// writes are checked against the Proxmox schema of `PUT /cluster/options`; no controller acts
/// on them yet.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "Datacenter",
    plural = "datacenters",
    category = "kpve",
    doc = "Datacenter-wide options (Proxmox datacenter.cfg, /cluster/options); name it `cluster`"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatacenterSpec {
    /// `datacenter.cfg` key → value text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}
