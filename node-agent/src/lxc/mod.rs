//! The LXC driver: `config` renders the container config (a pure function, golden-tested),
//! `rootfs` prepares container volumes; the agent's container runtime drives lxc's tools.

pub mod config;
pub mod rootfs;
