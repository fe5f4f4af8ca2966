//! The Proxmox VE REST API (`/api2/json` on port 8006) served from kpve resources.
//!
//! Built so far (issue 7, in progress): the wire-level pieces every endpoint shares —
//! [`envelope`] (the `{"data": …}` envelope, errors with the first line as reason phrase and
//! the `errors` map), [`ticket`] (authentication tickets and CSRF tokens with key rotation)
//! and [`upid`] (task ids); [`server`]: HTTPS with root@pam tickets and CSRF, and the
//! read-only inventory (`/version`, `/nodes`, `/cluster/resources`, `/cluster/nextid`). Not
//! built yet: access control (users, roles, ACLs, API tokens), guest and storage endpoints,
//! writes and tasks (docs/ARCHITECTURE.md §9). Parameters will map through `kpve_crds::codec`.

pub mod envelope;
pub mod guests;
pub mod server;
pub mod tasks;
pub mod ticket;
pub mod upid;
