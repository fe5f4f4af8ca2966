//! What the scheduler and the guest controller need to know about a guest kind, so one
//! generic reconciler serves both `VirtualMachine` and `LinuxContainer`.

use std::fmt::Debug;

use kpve_crds::kube::Resource;
use kpve_crds::kube::core::NamespaceResourceScope;
use kpve_crds::{GuestStatus, LinuxContainer, VirtualMachine};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::scheduler::GuestDemand;

/// A guest kind: a namespaced resource with a [`GuestStatus`].
pub trait GuestKind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    fn demand(&self) -> GuestDemand;
    fn guest_status(&self) -> Option<&GuestStatus>;
    fn spec_vmid(&self) -> Option<u32>;

    /// The node the guest is bound to, if any.
    fn node(&self) -> Option<&str> {
        self.guest_status().and_then(|s| s.node.as_deref()).filter(|n| !n.is_empty())
    }
}

impl GuestKind for VirtualMachine {
    fn demand(&self) -> GuestDemand {
        GuestDemand::for_vm(&self.spec)
    }
    fn guest_status(&self) -> Option<&GuestStatus> {
        self.status.as_ref()
    }
    fn spec_vmid(&self) -> Option<u32> {
        self.spec.vmid
    }
}

impl GuestKind for LinuxContainer {
    fn demand(&self) -> GuestDemand {
        GuestDemand::for_container(&self.spec)
    }
    fn guest_status(&self) -> Option<&GuestStatus> {
        self.status.as_ref()
    }
    fn spec_vmid(&self) -> Option<u32> {
        self.spec.vmid
    }
}
