//! The kpve node agent: runs the guests bound to this node. Built: [`agent`] (registration,
//! heartbeat Lease, VM reconcile loop with adoption after restarts), the QEMU driver
//! ([`qemu`]: command line and QMP), dir storage ([`storage`]) and [`host`] facts. LXC,
//! nftables and the HA LRM are still to come (docs/ARCHITECTURE.md §7).

pub mod agent;
pub mod host;
pub mod qemu;
pub mod storage;
