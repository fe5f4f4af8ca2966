//! The kpve node agent: QEMU and LXC drivers, storage, nftables firewall, HA LRM, status.
//!
//! Not built yet: see docs/ARCHITECTURE.md §7.
