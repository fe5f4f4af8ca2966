//! Golden tests: each `tests/input/lxc/<case>.json` spec is rendered against a plan like the one the node
//! agent resolves on a dir pool, and compared with `tests/snapshots/`.

use std::path::PathBuf;

use kpve_crds::LinuxContainerSpec;
use kpve_node_agent::lxc::config::{
    CgroupLayout, CtPlan, IdMap, ResolvedMount, ResolvedVeth, ct_volume_name, render, render_seccomp,
    veth_name,
};

fn spec(input: &str) -> LinuxContainerSpec {
    serde_json::from_str(input).expect("test input is a valid LinuxContainerSpec")
}

/// What the agent would resolve on a `local` dir pool: volumes numbered in declaration order,
/// veths and generated MACs numbered after the NIC's `netN`.
fn plan(spec: &LinuxContainerSpec) -> CtPlan {
    let vmid = spec.vmid.expect("test inputs carry a vmid");
    let volume =
        |i| PathBuf::from(format!("/var/lib/kpve/pools/local/images/{vmid}/{}", ct_volume_name(vmid, i)));
    CtPlan {
        vmid,
        rootfs: ResolvedMount {
            id: "rootfs".into(),
            host_path: volume(0),
            target: "/".into(),
            read_only: false,
        },
        mounts: spec
            .mount_points
            .iter()
            .enumerate()
            .map(|(i, mp)| ResolvedMount {
                id: mp.id.clone(),
                host_path: volume(i + 1),
                target: mp.path.clone(),
                read_only: false,
            })
            .collect(),
        veths: spec
            .nics
            .iter()
            .map(|nic| {
                let index: usize = nic.id.trim_start_matches("net").parse().expect("netN id");
                ResolvedVeth {
                    id: nic.id.clone(),
                    host_name: veth_name(vmid, index),
                    mac: nic
                        .hwaddr
                        .clone()
                        .unwrap_or_else(|| format!("BC:24:11:{:02X}:00:{index:02X}", vmid % 256)),
                }
            })
            .collect(),
        idmap: spec.unprivileged.then(IdMap::default),
        log_file: PathBuf::from(format!("/var/log/kpve/lxc/{vmid}.log")),
        console_log: None,
        host_apparmor: false,
        cgroup: CgroupLayout::Unified,
        seccomp_profile: PathBuf::from(format!("/var/lib/kpve/lxc/{vmid}/rules.seccomp")),
    }
}

fn golden(input: &str, tweak: impl FnOnce(&mut CtPlan)) -> String {
    let spec = spec(input);
    let mut plan = plan(&spec);
    tweak(&mut plan);
    render(&spec, &plan).expect("golden inputs render")
}

#[test]
fn minimal_unprivileged() {
    let text = golden(include_str!("input/lxc/minimal-unprivileged.json"), |p| {
        p.console_log = Some(PathBuf::from("/var/log/kpve/lxc/200.console.log"));
    });
    insta::assert_snapshot!("minimal-unprivileged", text);
}

#[test]
fn privileged_nesting_fuse_with_apparmor() {
    let text = golden(include_str!("input/lxc/privileged-nesting-fuse.json"), |p| p.host_apparmor = true);
    insta::assert_snapshot!("privileged-nesting-fuse", text);
}

#[test]
fn privileged_nesting_fuse_without_apparmor_on_cgroup_v1() {
    let text =
        golden(include_str!("input/lxc/privileged-nesting-fuse.json"), |p| p.cgroup = CgroupLayout::Legacy);
    insta::assert_snapshot!("privileged-nesting-fuse-legacy", text);
}

#[test]
fn two_nics() {
    insta::assert_snapshot!("two-nics", golden(include_str!("input/lxc/two-nics.json"), |_| {}));
}

#[test]
fn mount_points() {
    // The agent may force a volume read-only; mp2 stays writable in the spec but not here.
    let text = golden(include_str!("input/lxc/mount-points.json"), |p| {
        p.mounts.iter_mut().filter(|m| m.id == "mp2").for_each(|m| m.read_only = true)
    });
    insta::assert_snapshot!("mount-points", text);
}

#[test]
fn resources_cgroup_v2() {
    insta::assert_snapshot!("resources", golden(include_str!("input/lxc/resources.json"), |_| {}));
}

#[test]
fn resources_cgroup_v1() {
    let text = golden(include_str!("input/lxc/resources.json"), |p| p.cgroup = CgroupLayout::Legacy);
    insta::assert_snapshot!("resources-legacy", text);
}

#[test]
fn raw_lxc_passthrough() {
    insta::assert_snapshot!("raw-lxc", golden(include_str!("input/lxc/raw-lxc.json"), |_| {}));
}

#[test]
fn seccomp_policies() {
    let unprivileged = spec(include_str!("input/lxc/minimal-unprivileged.json"));
    insta::assert_snapshot!("seccomp-unprivileged", render_seccomp(&unprivileged));
    let privileged = spec(include_str!("input/lxc/privileged-nesting-fuse.json"));
    insta::assert_snapshot!("seccomp-privileged", render_seccomp(&privileged));
}

#[test]
fn rendering_is_deterministic() {
    let input = include_str!("input/lxc/two-nics.json");
    assert_eq!(golden(input, |_| {}), golden(input, |_| {}));
}
