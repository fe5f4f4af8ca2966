//! `HAGroup`: node priorities for HA recovery (Proxmox `ha/groups.cfg`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "HAGroup",
    plural = "hagroups",
    singular = "hagroup",
    shortname = "hag",
    category = "kpve",
    status = "HAGroupStatus",
    doc = "An HA group: which nodes recover HA guests, by priority",
    printcolumn(name = "Restricted", type_ = "boolean", json_path = ".spec.restricted"),
    printcolumn(name = "NoFailback", type_ = "boolean", json_path = ".spec.nofailback"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HAGroupSpec {
    /// Member nodes; higher priority wins.
    #[schemars(length(min = 1))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<HANode>,
    /// Guests may only run on member nodes (else they stop when none is left).
    #[serde(default)]
    pub restricted: bool,
    /// Do not move guests back when a higher-priority node returns.
    #[serde(default)]
    pub nofailback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HANode {
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub node: String,
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HAGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl HAGroupSpec {
    /// The node list as Proxmox writes it (`node1:2,node2`; a priority of 0 is left out).
    pub fn nodes_text(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| if n.priority > 0 { format!("{}:{}", n.node, n.priority) } else { n.node.clone() })
            .collect();
        nodes.join(",")
    }
}
