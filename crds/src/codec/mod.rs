//! The Proxmox config codec: `qemu-server/<vmid>.conf` and `lxc/<vmid>.conf` text and their
//! property strings, to and from the typed specs. The Proxmox REST API and the /etc/pve view
//! both go through here, so one parser decides what a valid Proxmox config is.
//!
//! Layers: [`conf`] reads and writes the file structure (description comments, `key: value`
//! lines, `[snapshot]`, `[PENDING]` and `[special:…]` sections); [`propstr`] reads and writes
//! property strings (`local:vm-100-disk-0,cache=writeback,size=32G`); [`qemu`] and [`lxc`] map
//! sections onto `VirtualMachineSpec` and `LinuxContainerSpec`.

pub mod conf;
pub mod fw;
pub mod lxc;
pub mod propstr;
pub mod qemu;

pub use conf::{ConfigFile, Section};
pub use lxc::{ContainerConfig, parse_lxc_config, print_lxc_config};
pub use qemu::{QemuConfig, parse_qemu_config, print_qemu_config};

/// What is wrong with a Proxmox config, naming the key (or line) and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl CodecError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        CodecError::Invalid { key: key.into(), message: message.into() }
    }

    /// The config key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            CodecError::Invalid { key, .. } => Some(key),
            CodecError::Syntax { .. } => None,
        }
    }
}

pub type Result<T, E = CodecError> = std::result::Result<T, E>;
