//! kpve's resource model (group `kpve.io`, version `v1alpha1`), CRD generation, schema
//! validation, and the Proxmox config codec shared by the REST API and the /etc/pve view.
//!
//! Every other kpve crate imports Kubernetes types through the re-exports here.

// kube-derive takes repeated `printcolumn(...)` and `shortname` attributes by design.
#![allow(clippy::duplicated_attributes)]

pub use k8s_openapi;
pub use kube;

pub mod access;
pub mod codec;
pub mod common;
pub mod crdgen;
pub mod datacenter;
pub mod firewall;
pub mod ha;
pub mod hypervisor;
pub mod lxc;
pub mod storage;
pub mod validation;
pub mod vm;

pub use access::{
    PVEACL, PVEACLSpec, PVEGroup, PVEGroupSpec, PVERole, PVERoleSpec, PVEToken, PVEUser, PVEUserSpec,
};
pub use common::*;
pub use datacenter::*;
pub use firewall::*;
pub use ha::*;
pub use hypervisor::*;
pub use lxc::*;
pub use storage::*;
pub use vm::*;

/// API group of every kpve kind.
pub const GROUP: &str = "kpve.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// `impl Default` from the serde defaults (those written in the schema), so that a value
/// built in Rust equals one deserialized from an empty object.
#[macro_export]
macro_rules! serde_default {
    ($($t:ty),* $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                serde_json::from_value(serde_json::json!({}))
                    .expect(concat!(stringify!($t), ": every field has a default"))
            }
        }
    )*};
}

/// `Type::new(id)` for list items keyed by `id`, with every other field at its default.
#[macro_export]
macro_rules! keyed_new {
    ($($t:ty),* $(,)?) => {$(
        impl $t {
            pub fn new(id: impl Into<String>) -> Self {
                serde_json::from_value(serde_json::json!({ "id": id.into() }))
                    .expect(concat!(stringify!($t), ": every field but id has a default"))
            }
        }
    )*};
}
