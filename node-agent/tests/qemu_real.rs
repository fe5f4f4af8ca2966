//! Real QEMU: start `qemu-system-x86_64` with rendered command lines and drive it over QMP.
//!
//! Needs the QEMU binary and `/var/cache/kpve/kernel/vmlinuz`; KVM is used when `/dev/kvm`
//! opens, TCG otherwise. Without them a test prints why and skips, unless
//! `KPVE_REQUIRE_HOST=1` (CI), where it fails instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kpve_crds::VirtualMachineSpec;
use kpve_node_agent::qemu::argv::{Accel, KernelBoot, LaunchPaths, LaunchPlan, render};
use kpve_node_agent::qemu::qmp::Qmp;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

const QEMU: &str = "qemu-system-x86_64";
const KERNEL: &str = "/var/cache/kpve/kernel/vmlinuz";
const MIB: u64 = 1024 * 1024;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        // Short on purpose: unix socket paths inside it must stay under 108 bytes.
        let path = std::env::temp_dir().join(format!("kpve-q-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running QEMU that is killed however the test ends.
struct Vm {
    child: Child,
    run_dir: PathBuf,
}

impl Vm {
    fn spawn(argv: &[String], run_dir: &Path) -> Vm {
        let stderr = std::fs::File::create(run_dir.join("stderr.log")).unwrap();
        let child = Command::new(QEMU)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn qemu");
        Vm { child, run_dir: run_dir.to_path_buf() }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("stderr.log")).unwrap_or_default()
    }

    async fn qmp(&self) -> Qmp {
        let socket = LaunchPaths::new(&self.run_dir).qmp_socket();
        match Qmp::connect(&socket, Duration::from_secs(5)).await {
            Ok(qmp) => qmp,
            Err(e) => panic!("QMP: {e}; qemu stderr:\n{}", self.stderr()),
        }
    }

    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        match timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("qemu still running {limit:?} after quit"),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Why this host cannot run the tests, if it cannot.
fn missing_host_feature() -> Option<String> {
    match std::process::Command::new(QEMU).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => return Some(format!("{QEMU} is not installed")),
    }
    if !Path::new(KERNEL).exists() {
        return Some(format!("{KERNEL} is missing"));
    }
    None
}

/// Returns true when the test should go on.
fn host_ready(test: &str) -> bool {
    let Some(reason) = missing_host_feature() else {
        return true;
    };
    if std::env::var("KPVE_REQUIRE_HOST").as_deref() == Ok("1") {
        panic!("{test}: {reason} (KPVE_REQUIRE_HOST=1)");
    }
    eprintln!("skipping {test}: {reason}");
    false
}

fn host_accel() -> Accel {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    Accel::choose(true, kvm)
}

async fn wait_for_file_text(path: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if Instant::now() >= deadline {
            panic!("no {needle:?} in {} after {limit:?}; it holds:\n{text}", path.display());
        }
        sleep(Duration::from_millis(100)).await;
    }
}

fn kernel_plan(vmid: u32, accel: Accel, run_dir: &Path) -> LaunchPlan {
    LaunchPlan {
        vmid,
        name: format!("qmp-test-{vmid}"),
        accel,
        disks: vec![],
        nics: vec![],
        kernel: Some(KernelBoot {
            kernel: KERNEL.into(),
            initrd: None,
            append: Some("console=ttyS0 panic=-1".into()),
        }),
        ovmf_code: None,
        vhost_net: false,
        log_serial: true,
        paths: LaunchPaths::new(run_dir),
    }
}

fn diskless_spec(vmid: u32, mib: u32) -> VirtualMachineSpec {
    serde_json::from_value(json!({ "vmid": vmid, "memory": { "size": mib } })).unwrap()
}

/// Status, memory, pause and resume, and quit, observed through QMP and the process.
async fn lifecycle(vm: &mut Vm, qmp: &mut Qmp, plan: &LaunchPlan, mib: u64) {
    assert_eq!(qmp.query_status().await.unwrap(), "running");
    assert_eq!(qmp.memory_size().await.unwrap(), mib * MIB);

    qmp.stop().await.unwrap();
    assert_eq!(qmp.query_status().await.unwrap(), "paused");
    qmp.wait_event("STOP", Duration::from_secs(2)).await.unwrap();
    qmp.cont().await.unwrap();
    assert_eq!(qmp.query_status().await.unwrap(), "running");
    qmp.wait_event("RESUME", Duration::from_secs(2)).await.unwrap();

    let pid: u32 = std::fs::read_to_string(plan.paths.pid_file()).unwrap().trim().parse().unwrap();
    assert_eq!(Some(pid), vm.child.id(), "the pid file names the process we supervise");

    qmp.quit().await.unwrap();
    let status = vm.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "qemu exited with {status}; stderr:\n{}", vm.stderr());
}

/// A diskless VM booting the kernel directly under TCG: the kernel's banner reaches the serial
/// log, then the QMP lifecycle. TCG because on these hosts a KVM guest spends tens of seconds in
/// its real-mode start (see `kvm_lifecycle`), while TCG prints the banner in about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_boot_under_tcg() {
    if !host_ready("kernel_boot_under_tcg") {
        return;
    }
    let dir = TempDir::new("tcg");
    let spec = diskless_spec(9101, 256);
    let plan = kernel_plan(9101, Accel::Tcg, &dir.0);
    let argv = render(&spec, &plan).unwrap();
    let mut vm = Vm::spawn(&argv, &dir.0);
    let mut qmp = vm.qmp().await;
    assert!(qmp.greeting()["QMP"]["version"]["qemu"]["major"].as_u64().is_some());

    // The banner's command line comes a moment after "Linux version": wait for it, not for the
    // first line (the log was sometimes read between the two).
    let log = wait_for_file_text(
        &plan.paths.serial_log(),
        "Command line: console=ttyS0 panic=-1",
        Duration::from_secs(8),
    )
    .await;
    assert!(log.contains("Linux version"), "{log}");
    let kvm = qmp.execute("query-kvm", None).await.unwrap();
    assert_eq!(kvm["enabled"], false);

    lifecycle(&mut vm, &mut qmp, &plan, 256).await;
}

/// The same VM under KVM: QEMU runs with the accelerator on and obeys QMP. The serial banner is
/// not awaited: here the guest needs far longer than a test should to get through its real-mode
/// start under KVM (nested virtualization).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_lifecycle() {
    if !host_ready("kvm_lifecycle") {
        return;
    }
    if host_accel() != Accel::Kvm {
        if std::env::var("KPVE_REQUIRE_HOST").as_deref() == Ok("1") {
            panic!("kvm_lifecycle: /dev/kvm does not open (KPVE_REQUIRE_HOST=1)");
        }
        eprintln!("skipping kvm_lifecycle: /dev/kvm does not open");
        return;
    }
    let dir = TempDir::new("kvm");
    let spec = diskless_spec(9102, 384);
    let plan = kernel_plan(9102, Accel::Kvm, &dir.0);
    let argv = render(&spec, &plan).unwrap();
    let mut vm = Vm::spawn(&argv, &dir.0);
    let mut qmp = vm.qmp().await;
    let kvm = qmp.execute("query-kvm", None).await.unwrap();
    assert_eq!(kvm["enabled"], true, "{kvm}");

    lifecycle(&mut vm, &mut qmp, &plan, 384).await;
}

/// Makes `plan` runnable here: real image files in `dir`, tap names of our own, the real kernel.
fn localize(plan: &mut LaunchPlan, dir: &Path) {
    for disk in &mut plan.disks {
        let path = dir.join(format!("{}.{}", disk.id, disk.format));
        if disk.id == "efidisk0" {
            // UEFI variables must start as the firmware's template, in the image's format.
            let vars = "/usr/share/OVMF/OVMF_VARS_4M.fd";
            run("qemu-img", &["convert", "-O", &disk.format, vars, path.to_str().unwrap()]);
        } else if disk.format == "raw" {
            std::fs::File::create(&path).unwrap().set_len(64 * MIB).unwrap();
        } else {
            run("qemu-img", &["create", "-q", "-f", &disk.format, path.to_str().unwrap(), "64M"]);
        }
        disk.path = path;
    }
    for (i, nic) in plan.nics.iter_mut().enumerate() {
        nic.tap = format!("kq{}i{i}", std::process::id() % 100_000);
    }
    if let Some(kernel) = &mut plan.kernel {
        kernel.kernel = KERNEL.into();
        kernel.initrd = None;
    }
    plan.vhost_net = Path::new("/dev/vhost-net").exists();
    if plan.accel == Accel::Kvm {
        plan.accel = host_accel();
    }
    plan.paths = LaunchPaths::new(dir);
}

fn run(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}: {status}");
}

/// Values of `key=` in the arguments following `flag`.
fn ids(argv: &[String], flag: &str, key: &str) -> Vec<String> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .filter_map(|w| w[1].split(',').find_map(|p| p.strip_prefix(key)).map(str::to_string))
        .collect()
}

/// Every golden input starts under real QEMU (paused, so no firmware runs), and QEMU reports
/// each rendered device and drive under the id the command line gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_starts_under_qemu() {
    if !host_ready("every_input_starts_under_qemu") {
        return;
    }
    let can_make_taps = Path::new("/dev/net/tun").exists()
        && std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        });
    let names = common::input_names();
    for name in names {
        let (spec, mut plan) = common::load(&name);
        if !plan.nics.is_empty() && !can_make_taps {
            if std::env::var("KPVE_REQUIRE_HOST").as_deref() == Ok("1") {
                panic!("{name}: creating tap devices needs root and /dev/net/tun");
            }
            eprintln!("skipping {name}: creating tap devices needs root and /dev/net/tun");
            continue;
        }
        let dir = TempDir::new(&name.replace('.', "-"));
        localize(&mut plan, &dir.0);
        let mut argv = render(&spec, &plan).unwrap_or_else(|e| panic!("{name}: {e}"));
        argv.push("-S".into());
        let mut vm = Vm::spawn(&argv, &dir.0);
        let mut qmp = vm.qmp().await;
        assert_eq!(qmp.query_status().await.unwrap(), "prelaunch", "{name}");

        let peripherals =
            qmp.execute("qom-list", Some(json!({ "path": "/machine/peripheral" }))).await.unwrap();
        let present: Vec<&str> =
            peripherals.as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        for id in ids(&argv, "-device", "id=") {
            assert!(present.contains(&id.as_str()), "{name}: device {id} missing; QEMU has {present:?}");
        }
        let blocks = qmp.execute("query-block", None).await.unwrap();
        let drives: Vec<&str> =
            blocks.as_array().unwrap().iter().filter_map(|b| b["device"].as_str()).collect();
        for id in ids(&argv, "-drive", "id=") {
            assert!(drives.contains(&id.as_str()), "{name}: drive {id} missing; QEMU has {drives:?}");
        }
        let memory = qmp.memory_size().await.unwrap();
        assert_eq!(memory, u64::from(spec.memory.size) * MIB, "{name}");

        qmp.quit().await.unwrap();
        let status = vm.wait_exit(Duration::from_secs(5)).await;
        assert!(status.success(), "{name}: qemu exited with {status}; stderr:\n{}", vm.stderr());
    }
}
