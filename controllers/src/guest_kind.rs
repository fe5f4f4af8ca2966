//! What the scheduler and the guest controller need to know about a guest kind, so one
//! generic reconciler serves both `VirtualMachine` and `LinuxContainer`.

use kpve_crds::{GuestObject, LinuxContainer, VirtualMachine};

use crate::scheduler::GuestDemand;

/// A guest kind, as the scheduler sees it.
pub trait GuestKind: GuestObject {
    fn demand(&self) -> GuestDemand;

    fn spec_vmid(&self) -> Option<u32> {
        self.guest_spec().vmid()
    }

    /// The node the guest is bound to, if any.
    fn node(&self) -> Option<&str> {
        self.guest_status().and_then(|s| s.node.as_deref()).filter(|n| !n.is_empty())
    }
}

impl GuestKind for VirtualMachine {
    fn demand(&self) -> GuestDemand {
        GuestDemand::for_vm(&self.spec)
    }
}

impl GuestKind for LinuxContainer {
    fn demand(&self) -> GuestDemand {
        GuestDemand::for_container(&self.spec)
    }
}
