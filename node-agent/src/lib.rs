//! The kpve node agent: runs the guests bound to this node. Built so far: the QEMU driver
//! ([`qemu`]: command line and QMP) and dir storage ([`storage`]). The agent loop, LXC,
//! nftables and the HA LRM are still to come (docs/ARCHITECTURE.md §7).

pub mod qemu;
pub mod storage;
