//! The QEMU driver: `argv` renders the command line (a pure function, golden-tested), `qmp`
//! talks to the running process.

pub mod argv;
pub mod migration;
pub mod qmp;
