//! The kpve node agent: runs the guests bound to this node. Built: [`agent`] (registration,
//! heartbeat Lease, VM reconcile loop with adoption after restarts), the QEMU driver
//! ([`qemu`]: command line and QMP), dir storage ([`storage`]) and [`host`] facts. The LXC
//! config renderer ([`lxc`]) exists but is not wired in yet; nftables and the HA LRM are
//! still to come (docs/ARCHITECTURE.md §7).

pub mod agent;
pub mod firewall;
pub mod host;
pub mod lxc;
pub mod qemu;
pub mod storage;
