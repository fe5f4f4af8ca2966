//! The LXC driver: `config` renders the container config (a pure function, golden-tested).
//! Not wired into the agent yet (issue: LXC containers end to end).

pub mod config;
