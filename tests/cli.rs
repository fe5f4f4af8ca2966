//! `kpve --help` and every subcommand's help explain themselves; unbuilt subcommands say so.

use std::process::Command;

fn kpve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kpve")).args(args).output().unwrap()
}

const SUBCOMMANDS: &[&str] =
    &["server", "token", "agent", "controllers", "pve-api", "crdgen", "validate", "convert", "version"];

#[test]
fn top_level_help_lists_every_subcommand_with_a_description() {
    let out = kpve(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Proxmox VE control plane"), "{help}");
    for sub in SUBCOMMANDS {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(sub))
            .unwrap_or_else(|| panic!("{sub} missing:\n{help}"));
        assert!(line.trim_start().len() > sub.len() + 10, "{sub} has no description: {line}");
    }
}

#[test]
fn each_subcommand_has_help() {
    for sub in SUBCOMMANDS {
        let out = kpve(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage: kpve"), "{sub}: {help}");
        assert!(help.lines().next().is_some_and(|l| l.len() > 20), "{sub} help has no summary: {help}");
    }
}

#[test]
fn version_prints_the_package_version() {
    let out = kpve(&["version"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("kpve {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn convert_from_qemu_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("123.conf");
    let text = "cores: 2\nmemory: 1024\nname: demo\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\nscsi0: local:123/vm-123-disk-0.qcow2,size=8G\n";
    std::fs::write(&conf, text).unwrap();
    let out = kpve(&["convert", "from-qemu", conf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(yaml.contains("vmid: 123"), "{yaml}");
    assert!(yaml.contains("name: demo"), "{yaml}");
    let manifest = dir.path().join("vm.yaml");
    std::fs::write(&manifest, &yaml).unwrap();
    let out = kpve(&["validate", "-f", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "converted manifest invalid: {}", String::from_utf8_lossy(&out.stderr));
    let out = kpve(&["convert", "to-qemu", manifest.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
}

#[test]
fn convert_cluster_fw_to_manifests_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let fw = concat!(env!("CARGO_MANIFEST_DIR"), "/node-agent/tests/input/firewall/basic/cluster.fw");
    let out = kpve(&["convert", "from-cluster-fw", fw]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        yaml.contains("kind: ClusterFirewall")
            && yaml.contains("kind: SecurityGroup")
            && yaml.contains("kind: IPSet"),
        "{yaml}"
    );
    let manifest = dir.path().join("fw.yaml");
    std::fs::write(&manifest, &yaml).unwrap();
    let out = kpve(&["validate", "-f", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "converted manifests invalid: {}", String::from_utf8_lossy(&out.stderr));
    let out = kpve(&["convert", "to-cluster-fw", manifest.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), std::fs::read_to_string(fw).unwrap());
}

#[test]
fn unbuilt_subcommands_fail_and_say_so() {
    let out = kpve(&["controllers"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"));
    // `pve-api` is built: without its server and credentials it says what it needs.
    let out = kpve(&["pve-api"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--server") && err.contains("--token-file"), "{err}");
}
