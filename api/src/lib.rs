//! The Proxmox VE REST API (`/api2/json` on port 8006) served from kpve resources.
//!
//! [`schema`] routes requests by the official PVE 9.1 schema; [`validate`] checks their
//! parameters from it; [`auth`] authenticates tickets ([`ticket`]) and API tokens; [`access`]
//! evaluates privileges as Proxmox does over the access-control resources, which
//! [`access_api`] manages; [`guests`], [`tasks`] and [`storage`] serve the guests through
//! `kpve_crds::codec`, with [`upid`] task ids; [`snapshots`] declares snapshots and
//! rollbacks; [`cache`] holds the watch-fed caches;
//! [`firewall_api`] and [`cluster_api`] edit the firewall, HA and pool resources;
//! [`envelope`] is the `{"data": …}` envelope and Proxmox's error format; [`server`] ties it
//! together (docs/ARCHITECTURE.md §0). [`pmxcfs`] serves the same resources as an `/etc/pve`
//! file tree over FUSE.

pub mod access;
pub mod access_api;
pub mod auth;
pub mod cache;
pub mod cluster_api;
pub mod envelope;
pub mod firewall_api;
pub mod guests;
pub mod migrate;
pub mod pmxcfs;
pub mod schema;
pub mod server;
pub mod snapshots;
pub mod storage;
pub mod tasks;
pub mod ticket;
pub mod upid;
pub mod validate;
