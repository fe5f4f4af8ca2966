//! The kpve node agent: runs the guests bound to this node. Built: [`agent`] (registration,
//! heartbeat Lease, one reconcile loop over a runtime per kind with adoption after restarts,
//! and the firewall loop), the QEMU driver ([`qemu`]: command line and QMP), the LXC config
//! renderer and rootfs ([`lxc`]), the [`firewall`] compiler and its nft client, dir storage
//! ([`storage`]), [`host`] facts, and the HA LRM (in [`agent`], with [`fence`]: self-fencing
//! and the watchdog process).

pub mod agent;
pub mod fence;
pub mod firewall;
pub mod host;
pub mod lxc;
pub mod qemu;
pub mod storage;
