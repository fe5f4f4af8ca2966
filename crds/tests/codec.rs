//! Round-trip tests of the Proxmox config codec on realistic qemu-server and pve-container
//! configs, and rejection of malformed ones with the offending key named.
//!
//! For every `tests/input/{qemu,lxc}/NAME.conf`:
//! - it parses into a typed spec that is valid against the generated CRD schema;
//! - printing that spec gives Proxmox's canonical text: the input itself, or
//!   `NAME.canonical.conf` where the input spells out defaults (`numa: 0`, `sockets: 1`);
//! - parsing the printed text gives the same spec again (nothing lost either way).

use std::path::{Path, PathBuf};

use kpve_crds::codec::{
    CodecError, parse_lxc_config, parse_qemu_config, print_lxc_config, print_qemu_config,
};
use kpve_crds::validation::KindValidators;

fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/input").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .filter(|p| !p.to_string_lossy().ends_with(".canonical.conf"))
        .collect();
    files.sort();
    files
}

fn expected_output(input: &Path) -> String {
    let canonical = input.with_extension("canonical.conf");
    let path = if canonical.exists() { canonical } else { input.to_path_buf() };
    std::fs::read_to_string(path).unwrap()
}

fn assert_schema_valid(validators: &KindValidators, kind: &str, spec: serde_json::Value, file: &Path) {
    let object = serde_json::json!({
        "apiVersion": "kpve.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "from-conf"},
        "spec": spec,
    });
    let errors = validators.validate(&object);
    assert!(errors.is_empty(), "{}: spec from codec fails the CRD schema: {errors:?}", file.display());
}

#[test]
fn qemu_configs_round_trip() {
    let validators = KindValidators::new().unwrap();
    let files = inputs("qemu");
    assert!(files.len() >= 14, "expected at least 14 qemu configs, found {}", files.len());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let config = parse_qemu_config(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let printed = print_qemu_config(&config);
        assert_eq!(printed, expected_output(file), "{}: printed config differs", file.display());
        let again = parse_qemu_config(&printed).unwrap();
        assert_eq!(again, config, "{}: spec changed after a round trip", file.display());
        let json = serde_json::to_value(&config.spec).unwrap();
        let back: kpve_crds::VirtualMachineSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, config.spec, "{}: spec does not survive JSON", file.display());
        assert_schema_valid(&validators, "VirtualMachine", json, file);
        for snap in &config.snapshots {
            assert_schema_valid(
                &validators,
                "VirtualMachine",
                serde_json::to_value(&snap.spec).unwrap(),
                file,
            );
        }
    }
}

#[test]
fn lxc_configs_round_trip() {
    let validators = KindValidators::new().unwrap();
    let files = inputs("lxc");
    assert!(files.len() >= 8, "expected at least 8 lxc configs, found {}", files.len());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let config = parse_lxc_config(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let printed = print_lxc_config(&config);
        assert_eq!(printed, expected_output(file), "{}: printed config differs", file.display());
        let again = parse_lxc_config(&printed).unwrap();
        assert_eq!(again, config, "{}: spec changed after a round trip", file.display());
        let json = serde_json::to_value(&config.spec).unwrap();
        let back: kpve_crds::LinuxContainerSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, config.spec, "{}: spec does not survive JSON", file.display());
        assert_schema_valid(&validators, "LinuxContainer", json, file);
    }
}

#[test]
fn malformed_configs_name_the_key() {
    let files = inputs("invalid");
    assert!(files.len() >= 15);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let (first, body) = text.split_once('\n').unwrap();
        let want = first.strip_prefix("# expect: ").expect("first line names the expected key");
        let name = file.file_name().unwrap().to_string_lossy();
        let result = if name.starts_with("qemu-") {
            parse_qemu_config(body).map(|_| ())
        } else {
            parse_lxc_config(body).map(|_| ())
        };
        let err = result.err().unwrap_or_else(|| panic!("{name}: malformed config was accepted"));
        assert_eq!(err.key(), Some(want), "{name}: error names the wrong key: {err}");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{want}: ")),
            "{name}: message does not lead with the key: {message}"
        );
        assert!(message.len() > want.len() + 10, "{name}: message does not say what is allowed: {message}");
    }
}

#[test]
fn values_known_from_the_proxmox_docs() {
    let config = parse_qemu_config(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/input/qemu/101-ubuntu-cloudinit.conf"),
        )
        .unwrap(),
    )
    .unwrap();
    let spec = config.spec;
    assert_eq!(spec.description.as_deref(), Some("Ubuntu 24.04 cloud image: provisioned by cloud-init"));
    assert_eq!(spec.cpu.cores, 4);
    assert_eq!(spec.memory.size, 4096);
    let disk = &spec.disks.iter().find(|d| d.id == "scsi0").unwrap();
    assert_eq!(disk.volume.as_deref(), Some("local-lvm:vm-101-disk-0"));
    assert_eq!(disk.size.as_deref(), Some("20G"));
    assert!(disk.discard && disk.ssd);
    let nic = &spec.nics[0];
    assert_eq!(nic.macaddr.as_deref(), Some("BC:24:11:22:33:44"));
    assert_eq!(nic.bridge.as_deref(), Some("vmbr0"));
    let ci = spec.cloud_init.unwrap();
    assert_eq!(
        ci.ssh_keys,
        vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq2n0tq1a2b3c4d5e6f7g8h9i0j1k2l3m4n5o6p7q8r ops@bastion"]
    );
    assert_eq!(ci.ip_config[0].gw.as_deref(), Some("10.0.10.1"));
    assert_eq!(spec.options.get("serial0").map(String::as_str), Some("socket"));

    // Proxmox's create syntax `local:4` means a new 4 GiB volume on `local`.
    let config = parse_qemu_config("cores: 1\nmemory: 512\nscsi0: local:4\n").unwrap();
    assert_eq!(config.spec.disks[0].pool.as_deref(), Some("local"));
    assert_eq!(config.spec.disks[0].size.as_deref(), Some("4G"));
    assert_eq!(config.spec.disks[0].volume, None);
}

#[test]
fn spec_written_in_kubernetes_units_prints_proxmox_units() {
    let mut spec = kpve_crds::VirtualMachineSpec::default();
    let mut disk = kpve_crds::Disk::new("scsi0");
    disk.volume = Some("local:100/vm-100-disk-0.qcow2".into());
    disk.size = Some("40Gi".into());
    spec.disks.push(disk);
    assert_eq!(
        spec.to_qemu_config(),
        "cores: 1\nmemory: 512\nscsi0: local:100/vm-100-disk-0.qcow2,size=40G\n"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    match parse_qemu_config("cores: 1\nthis is not a config line\n") {
        Err(CodecError::Syntax { line, .. }) => assert_eq!(line, 2),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}
