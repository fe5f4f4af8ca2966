//! The host features kpve's drivers use are present (installed by scripts/install-host-deps.sh).
//! Without KPVE_REQUIRE_HOST=1 a missing feature skips with a printed reason; CI sets it, so
//! there a missing feature fails.

use std::path::Path;
use std::process::Command;

fn require(what: &str, ok: bool, hint: &str) {
    if ok {
        return;
    }
    let msg = format!("host feature missing: {what} ({hint})");
    if std::env::var("KPVE_REQUIRE_HOST").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
}

fn runs(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn qemu_and_kvm() {
    let version = runs("qemu-system-x86_64", &["--version"]);
    require("qemu-system-x86_64", version.is_some(), "apt-get install -t bookworm-backports qemu-system-x86");
    require("qemu-img", runs("qemu-img", &["--version"]).is_some(), "apt-get install qemu-utils");
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    require("/dev/kvm", kvm, "KVM unavailable; guests would fall back to TCG");
}

#[test]
fn lxc_nft_fuse_iproute() {
    require("lxc-start", runs("lxc-start", &["--version"]).is_some(), "apt-get install lxc");
    require("nft", runs("nft", &["--version"]).is_some(), "apt-get install nftables");
    require("fusermount3", runs("fusermount3", &["--version"]).is_some(), "apt-get install fuse3");
    require("/dev/fuse", Path::new("/dev/fuse").exists(), "FUSE kernel module");
    require("ip", runs("ip", &["-V"]).is_some(), "apt-get install iproute2");
}

#[test]
fn test_guest_ingredients() {
    require("busybox (static)", Path::new("/bin/busybox").exists(), "apt-get install busybox-static");
    require(
        "test kernel",
        Path::new("/var/cache/kpve/kernel/vmlinuz").exists(),
        "scripts/install-host-deps.sh --test downloads a Debian cloud kernel",
    );
}
