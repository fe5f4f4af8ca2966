//! Test inputs: each file under `tests/input/` is a spec (kpve JSON, or a Proxmox qemu-server
//! `.conf` read through the codec) plus what the agent would have resolved on a node.

// Each test crate uses its own part of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kpve_crds::VirtualMachineSpec;
use kpve_node_agent::qemu::argv::{Accel, KernelBoot, LaunchPaths, LaunchPlan, ResolvedDisk, ResolvedNic};
use serde_json::Value;

pub fn input_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/input")
}

/// The QEMU test inputs, sorted (subdirectories hold other drivers' inputs, e.g. lxc/).
pub fn input_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(input_dir())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Where Proxmox's `local` dir storage keeps a volume.
pub fn volume_path(vmid: u32, id: &str, volume: Option<&str>, format: &str) -> PathBuf {
    match volume.and_then(|v| v.split_once(':')) {
        Some((_, rel)) if rel.starts_with("iso/") => PathBuf::from(format!("/var/lib/vz/template/{rel}")),
        Some((_, rel)) => PathBuf::from(format!("/var/lib/vz/images/{rel}")),
        None => PathBuf::from(format!("/var/lib/vz/images/{vmid}/vm-{vmid}-{id}.{format}")),
    }
}

/// What the agent would resolve for `spec` on a node, with the input's `plan` overrides.
pub fn plan_for(spec: &VirtualMachineSpec, overrides: &Value) -> LaunchPlan {
    let vmid = spec.vmid.unwrap_or(100);
    let mut disks: Vec<ResolvedDisk> = spec
        .disks
        .iter()
        .filter(|d| d.volume.as_deref() != Some("none"))
        .map(|d| {
            let format = match d.format {
                Some(f) => serde_json::to_value(f).unwrap().as_str().unwrap().to_string(),
                None if d.volume.as_deref().is_some_and(|v| v.ends_with(".qcow2")) => "qcow2".into(),
                None => "raw".into(),
            };
            let path = volume_path(vmid, &d.id, d.volume.as_deref(), &format);
            ResolvedDisk { id: d.id.clone(), path, format, media: None }
        })
        .collect();
    for extra in overrides["extra_disks"].as_array().into_iter().flatten() {
        disks.push(ResolvedDisk {
            id: extra["id"].as_str().unwrap().into(),
            path: extra["path"].as_str().unwrap().into(),
            format: extra["format"].as_str().unwrap().into(),
            media: extra["media"].as_str().map(str::to_string),
        });
    }
    let nics = spec
        .nics
        .iter()
        .map(|n| {
            let index: u32 = n.id.trim_start_matches("net").parse().unwrap();
            ResolvedNic {
                id: n.id.clone(),
                tap: format!("tap{vmid}i{index}"),
                mac: n.macaddr.clone().unwrap_or_else(|| {
                    format!("BC:24:11:{:02X}:{:02X}:{index:02X}", vmid / 256 % 256, vmid % 256)
                }),
            }
        })
        .collect();
    let kernel = overrides.get("kernel").map(|k| KernelBoot {
        kernel: k["kernel"].as_str().unwrap().into(),
        initrd: k["initrd"].as_str().map(PathBuf::from),
        append: k["append"].as_str().map(str::to_string),
    });
    LaunchPlan {
        vmid,
        name: spec.name.clone().unwrap_or_else(|| format!("vm{vmid}")),
        accel: Accel::choose(spec.kvm, true),
        disks,
        nics,
        kernel,
        ovmf_code: overrides["ovmf_code"].as_str().map(PathBuf::from),
        vhost_net: overrides["vhost_net"].as_bool().unwrap_or(false),
        log_serial: overrides["log_serial"].as_bool().unwrap_or(false),
        paths: LaunchPaths::new(format!("/run/kpve/qemu/{vmid}")),
    }
}

/// One option and its value per line, the way people read QEMU command lines.
pub fn pretty(argv: &[String]) -> String {
    let mut out = String::new();
    let mut args = argv.iter().peekable();
    while let Some(arg) = args.next() {
        out.push_str(arg);
        if let Some(value) = args.next_if(|v| !v.starts_with('-')) {
            out.push(' ');
            out.push_str(value);
        }
        out.push('\n');
    }
    out
}

pub fn load(name: &str) -> (VirtualMachineSpec, LaunchPlan) {
    let path = input_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    if name.ends_with(".conf") {
        let mut spec = VirtualMachineSpec::from_qemu_config(&text).unwrap();
        spec.vmid = Some(8006);
        let plan = plan_for(&spec, &Value::Null);
        return (spec, plan);
    }
    let input: Value = serde_json::from_str(&text).unwrap();
    let spec: VirtualMachineSpec = serde_json::from_value(input["spec"].clone()).unwrap();
    let plan = plan_for(&spec, &input["plan"]);
    (spec, plan)
}
