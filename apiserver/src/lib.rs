//! The embedded Kubernetes-compatible API server for the kpve.io kinds (`kpve server`).
//!
//! Built so far: [`store`], the storage layer (a `Store` trait and its SQLite engine).
//! Still to come on top of it: the HTTPS front end, discovery, OpenAPI, CRUD and watch
//! semantics, authentication and admission. See docs/ARCHITECTURE.md §6.

pub mod store;
