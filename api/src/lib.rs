//! The Proxmox VE REST API (`/api2/json` on port 8006) served from kpve resources.
//!
//! Built so far (issue 7, in progress): the wire-level pieces every endpoint shares —
//! [`envelope`] (the `{"data": …}` envelope, errors with the first line as reason phrase and
//! the `errors` map), [`ticket`] (authentication tickets and CSRF tokens with key rotation)
//! and [`upid`] (task ids); [`server`]: HTTPS with root@pam tickets and CSRF, and the
//! inventory (`/version`, `/nodes`, `/cluster/resources`, `/cluster/nextid`); [`guests`]:
//! qemu/lxc list, create, config GET/PUT, delete, status and power actions, parameters
//! through `kpve_crds::codec`; [`tasks`]: UPIDs whose status follows the guest. Not built
//! yet: access control (users, roles, ACLs, API tokens), schema-generated validation,
//! storage, firewall, HA and pool endpoints (docs/ARCHITECTURE.md §0).

pub mod access;
pub mod access_api;
pub mod auth;
pub mod cache;
pub mod envelope;
pub mod guests;
pub mod schema;
pub mod server;
pub mod storage;
pub mod tasks;
pub mod ticket;
pub mod upid;
pub mod validate;
