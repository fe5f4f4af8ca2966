//! kpve's reconcilers (scheduler, guest lifecycle, vmid, storage, firewall, HA CRM).
//!
//! Not built yet: see docs/ARCHITECTURE.md §8. Controllers talk to the API server only
//! through the `kube` crate, re-exported from `kpve_crds`.
