//! The embedded Kubernetes-compatible API server for the kpve.io kinds (`kpve server`).
//!
//! Not built yet: this crate will own the `Store` trait (SQLite, later etcd), discovery,
//! OpenAPI, CRUD/watch semantics and authentication. See docs/ARCHITECTURE.md §6.
