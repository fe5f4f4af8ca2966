//! Golden snapshots of rendered command lines, one per input under `tests/input/`;
//! `cargo insta review` shows what changed in a command line.

mod common;

use common::{input_names, load, pretty};
use kpve_node_agent::qemu::argv::render;

fn check(name: &str) {
    let (spec, plan) = load(name);
    let argv = render(&spec, &plan).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(argv, render(&spec, &plan).unwrap(), "{name}: rendering is not deterministic");
    let snapshot = name.rsplit_once('.').unwrap().0;
    insta::assert_snapshot!(snapshot, pretty(&argv));
}

#[test]
fn minimal() {
    check("minimal.json");
}

#[test]
fn example_web01() {
    check("example-web01.json");
}

#[test]
fn virtio_blk_raw_cdrom() {
    check("virtio-blk-raw-cdrom.json");
}

#[test]
fn multi_nic() {
    check("multi-nic.json");
}

#[test]
fn tcg_q35_windows() {
    check("tcg-q35-windows.json");
}

#[test]
fn kernel_boot() {
    check("kernel-boot.json");
}

#[test]
fn ovmf_virtio_scsi_single() {
    check("ovmf-virtio-scsi-single.json");
}

#[test]
fn proxmox_simple_conf() {
    check("proxmox-simple.conf");
}

#[test]
fn every_input_has_a_test() {
    let names = input_names();
    let source = include_str!("argv_golden.rs");
    for name in names {
        assert!(source.contains(&format!("check(\"{name}\")")), "tests/input/{name} is not checked");
    }
}

/// Reordering a keyed list (as a server-side apply may) must not change the command line.
#[test]
fn list_order_does_not_matter() {
    let (mut spec, plan) = load("virtio-blk-raw-cdrom.json");
    let before = render(&spec, &plan).unwrap();
    spec.disks.reverse();
    assert_eq!(render(&spec, &plan).unwrap(), before);
}
