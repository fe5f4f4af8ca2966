//! The LXC driver: `config` renders the container config (a pure function, golden-tested),
//! `rootfs` prepares container volumes, `transfer` copies them to another node (restart
//! migration); the agent's container runtime drives lxc's tools.

pub mod config;
pub mod rootfs;
pub mod transfer;
