//! `kpve convert`: Proxmox guest configs to kpve manifests and back, through the codec.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use kpve_crds::codec::fw::{ClusterFw, parse_cluster_fw, print_cluster_fw};
use kpve_crds::codec::{parse_lxc_config, parse_qemu_config};
use kpve_crds::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kpve_crds::{
    ClusterFirewall, IPSet, LinuxContainer, LinuxContainerSpec, SecurityGroup, VirtualMachine,
    VirtualMachineSpec,
};
use serde::Deserialize;

#[derive(Subcommand, Debug)]
pub enum Direction {
    /// A qemu-server `<vmid>.conf` to a VirtualMachine manifest.
    FromQemu {
        file: PathBuf,
        /// metadata.name of the manifest (default: the config's name, else vm-<vmid>).
        #[arg(long)]
        name: Option<String>,
        /// VMID (default: taken from a file name like 100.conf).
        #[arg(long)]
        vmid: Option<u32>,
    },
    /// A pve-container `<vmid>.conf` to a LinuxContainer manifest.
    FromLxc {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        vmid: Option<u32>,
    },
    /// A VirtualMachine manifest to a qemu-server config.
    ToQemu { file: PathBuf },
    /// A LinuxContainer manifest to a pve-container config.
    ToLxc { file: PathBuf },
    /// A Proxmox `cluster.fw` to manifests: the ClusterFirewall, its SecurityGroups and IPSets.
    FromClusterFw { file: PathBuf },
    /// Manifests (ClusterFirewall, SecurityGroups, IPSets; other kinds ignored) to `cluster.fw`.
    ToClusterFw { file: PathBuf },
}

pub fn run(direction: Direction) -> Result<ExitCode> {
    match direction {
        Direction::FromQemu { file, name, vmid } => {
            let text = read(&file)?;
            let mut spec = parse_qemu_config(&text).with_context(|| file.display().to_string())?.spec;
            spec.vmid = vmid.or_else(|| vmid_from_path(&file));
            let name = name.or_else(|| spec.name.clone()).unwrap_or_else(|| default_name("vm", spec.vmid));
            let vm = VirtualMachine { metadata: meta(name), spec, status: None };
            print!("{}", serde_yaml::to_string(&vm)?);
        }
        Direction::FromLxc { file, name, vmid } => {
            let text = read(&file)?;
            let mut spec = parse_lxc_config(&text).with_context(|| file.display().to_string())?.spec;
            spec.vmid = vmid.or_else(|| vmid_from_path(&file));
            let name =
                name.or_else(|| spec.hostname.clone()).unwrap_or_else(|| default_name("ct", spec.vmid));
            let ct = LinuxContainer { metadata: meta(name), spec, status: None };
            print!("{}", serde_yaml::to_string(&ct)?);
        }
        Direction::ToQemu { file } => {
            let vm: VirtualMachine =
                serde_yaml::from_str(&read(&file)?).with_context(|| file.display().to_string())?;
            print!("{}", VirtualMachineSpec::to_qemu_config(&vm.spec));
        }
        Direction::ToLxc { file } => {
            let ct: LinuxContainer =
                serde_yaml::from_str(&read(&file)?).with_context(|| file.display().to_string())?;
            print!("{}", LinuxContainerSpec::to_lxc_config(&ct.spec));
        }
        Direction::FromClusterFw { file } => {
            let fw = parse_cluster_fw(&read(&file)?).with_context(|| file.display().to_string())?;
            let mut docs = vec![serde_yaml::to_string(&ClusterFirewall {
                metadata: meta("cluster".into()),
                spec: fw.spec,
                status: None,
            })?];
            for (name, spec) in fw.groups {
                docs.push(serde_yaml::to_string(&SecurityGroup {
                    metadata: meta(name),
                    spec,
                    status: None,
                })?);
            }
            for (name, spec) in fw.ipsets {
                docs.push(serde_yaml::to_string(&IPSet { metadata: meta(name), spec, status: None })?);
            }
            print!("{}", docs.join("---\n"));
        }
        Direction::ToClusterFw { file } => {
            let text = read(&file)?;
            let mut spec = None;
            let (mut groups, mut ipsets) = (Vec::new(), Vec::new());
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value =
                    serde_yaml::Value::deserialize(doc).with_context(|| file.display().to_string())?;
                let name = || value["metadata"]["name"].as_str().unwrap_or_default().to_string();
                match value["kind"].as_str() {
                    Some("ClusterFirewall") => {
                        spec = Some(serde_yaml::from_value::<ClusterFirewall>(value)?.spec)
                    }
                    Some("SecurityGroup") => {
                        groups.push((name(), serde_yaml::from_value::<SecurityGroup>(value)?.spec))
                    }
                    Some("IPSet") => ipsets.push((name(), serde_yaml::from_value::<IPSet>(value)?.spec)),
                    _ => {}
                }
            }
            let spec = spec.with_context(|| format!("{}: no ClusterFirewall", file.display()))?;
            print!("{}", print_cluster_fw(&ClusterFw { spec, groups, ipsets }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read(file: &PathBuf) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

fn vmid_from_path(file: &std::path::Path) -> Option<u32> {
    file.file_stem()?.to_str()?.parse().ok()
}

fn default_name(prefix: &str, vmid: Option<u32>) -> String {
    match vmid {
        Some(id) => format!("{prefix}-{id}"),
        None => prefix.to_string(),
    }
}

fn meta(name: String) -> ObjectMeta {
    ObjectMeta { name: Some(name.to_lowercase()), ..ObjectMeta::default() }
}
