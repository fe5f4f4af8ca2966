//! The Proxmox VE REST API (`/api2/json` on port 8006) served from kpve resources.
//!
//! Not built yet: see docs/ARCHITECTURE.md §9. Parameters map through `kpve_crds::codec`.
