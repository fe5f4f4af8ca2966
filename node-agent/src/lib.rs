//! The kpve node agent: runs the guests bound to this node. Built: [`agent`] (registration,
//! heartbeat Lease, one reconcile loop over a runtime per kind with adoption after restarts,
//! and the firewall loop), the QEMU driver ([`qemu`]: command line and QMP), the LXC config
//! renderer and rootfs ([`lxc`]), the [`firewall`] compiler and its nft client, dir storage
//! ([`storage`]) and [`host`] facts. The HA LRM is still to come (docs/ARCHITECTURE.md §7).

pub mod agent;
pub mod firewall;
pub mod host;
pub mod lxc;
pub mod qemu;
pub mod storage;
