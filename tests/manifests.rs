//! The generated CRDs and the example manifests, checked the way a user would: through the
//! `kpve` binary (`kpve crdgen`, `kpve validate`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn kpve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kpve"))
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn crdgen_output_is_byte_identical_to_manifests() {
    let out = tempfile::tempdir().unwrap();
    let status = kpve().args(["crdgen", "--out"]).arg(out.path()).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let generated = yaml_files(out.path());
    let committed = yaml_files(&root().join("manifests/crds"));
    let names = |v: &[PathBuf]| v.iter().map(|p| p.file_name().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(&generated), names(&committed), "set of CRD files differs; run `kpve crdgen`");
    assert_eq!(
        generated.len(),
        13,
        "one CRD per kind (8 guest, storage, firewall and HA kinds; 4 access-control kinds; Datacenter)"
    );
    for (g, c) in generated.iter().zip(&committed) {
        assert_eq!(
            std::fs::read(g).unwrap(),
            std::fs::read(c).unwrap(),
            "{} is stale; run `kpve crdgen`",
            c.display()
        );
    }
    let check =
        kpve().args(["crdgen", "--check", "--out"]).arg(root().join("manifests/crds")).output().unwrap();
    assert!(check.status.success(), "crdgen --check: {}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn crdgen_check_detects_a_stale_file() {
    let out = tempfile::tempdir().unwrap();
    assert!(kpve().args(["crdgen", "--out"]).arg(out.path()).status().unwrap().success());
    let victim = out.path().join("virtualmachines.kpve.io.yaml");
    let text = std::fs::read_to_string(&victim).unwrap().replace("maximum: 128", "maximum: 129");
    std::fs::write(&victim, text).unwrap();
    let check = kpve().args(["crdgen", "--check", "--out"]).arg(out.path()).output().unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("virtualmachines.kpve.io.yaml"));
}

#[test]
fn every_example_validates_and_every_kind_has_one() {
    let out = kpve().args(["validate", "-f"]).arg(root().join("manifests/examples")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "examples invalid:\n{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    for kind in [
        "Hypervisor",
        "VirtualMachine",
        "LinuxContainer",
        "StoragePool",
        "SecurityGroup",
        "IPSet",
        "ClusterFirewall",
        "HAGroup",
    ] {
        assert!(stdout.contains(&format!(": {kind}/")), "no valid example of {kind}:\n{stdout}");
    }
}

#[test]
fn examples_deserialize_into_the_typed_resources() {
    let text = std::fs::read_to_string(root().join("manifests/examples/vm.yaml")).unwrap();
    let vm: kpve_crds::VirtualMachine = serde_yaml::from_str(&text).unwrap();
    assert_eq!(vm.spec.cpu.cores, 2);
    assert_eq!(vm.spec.disks[0].pool.as_deref(), Some("local"));
    let text = std::fs::read_to_string(root().join("manifests/examples/lxc.yaml")).unwrap();
    let ct: kpve_crds::LinuxContainer = serde_yaml::from_str(&text).unwrap();
    assert!(ct.spec.unprivileged);
}

#[test]
fn invalid_manifests_are_rejected_with_the_field_path() {
    let files = yaml_files(&root().join("tests/input/invalid"));
    assert!(files.len() >= 8);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let want = text.lines().next().unwrap().strip_prefix("# expect: ").unwrap().to_string();
        let out = kpve().args(["validate", "-f"]).arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: accepted", file.display());
        assert!(
            stderr.contains(&format!(": {want}: ")),
            "{}: error does not name {want}:\n{stderr}",
            file.display()
        );
    }
}
