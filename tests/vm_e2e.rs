//! kpve's main job, for real: `kpve server` runs a VM declared in YAML with QEMU, the guest
//! boots and prints its marker on the serial console, power state and restarts follow the
//! spec, deletion removes process and disks, and an agent killed with -9 adopts its guests.
//!
//! The test guest runs under TCG (`kvm: false`): on these nested-KVM machines the Debian kernel
//! stalls in early boot under KVM (QMP works, the kernel prints nothing), while TCG boots it in
//! about two seconds.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kpve_node_agent::qemu::qmp::Qmp;
use support::{BOOT_MARKER, Server, TEST_KERNEL, test_initramfs, wait_until};

fn manifest(name: &str, memory: u32, power: &str, initrd: &Path, extra: &str) -> String {
    format!(
        "apiVersion: kpve.io/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: default
  annotations:
    kpve.io/kernel: {TEST_KERNEL}
    kpve.io/initrd: {initrd}
    kpve.io/cmdline: console=ttyS0 panic=-1
spec:
  powerState: {power}
  kvm: false
  cpu:
    cores: 1
  memory:
    size: {memory}
  scsihw: virtio-scsi-pci
  disks:
    - id: scsi0
      pool: local
      size: 1G
      format: qcow2
  startup:
    down: 1
{extra}",
        initrd = initrd.display()
    )
}

fn jsonpath(server: &Server, name: &str, path: &str) -> String {
    let out = server.kubectl(&["get", "vm", name, "-o", &format!("jsonpath={path}")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_dir(server: &Server, vmid: &str) -> PathBuf {
    server.data_dir().join("agent/run").join(vmid)
}

fn qmp_status(socket: &Path) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut qmp = Qmp::connect(socket, Duration::from_secs(5)).await.expect("QMP answers");
        qmp.query_status().await.unwrap()
    })
}

fn qmp_memory(socket: &Path) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut qmp = Qmp::connect(socket, Duration::from_secs(5)).await.unwrap();
        qmp.memory_size().await.unwrap()
    })
}

fn alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

fn apply(server: &Server, text: &str) {
    server.kubectl_stdin(&["apply", "-f", "-"], Some(text));
}

#[test]
fn a_declared_vm_boots_follows_its_power_state_restarts_on_request_and_is_deleted() {
    let server = Server::start_with_agent();
    let initrd = test_initramfs(server.data_dir());
    apply(&server, &manifest("boot", 256, "Running", &initrd, ""));
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "vm/boot", "--timeout=60s"]);
    server.kubectl_ok(&["wait", "--for=condition=Ready", "vm/boot", "--timeout=60s"]);
    let vmid = jsonpath(&server, "boot", "{.spec.vmid}");
    let pid = jsonpath(&server, "boot", "{.status.pid}");
    assert!(alive(&pid), "QEMU pid {pid} runs");
    assert_eq!(jsonpath(&server, "boot", "{.status.node}"), "node1", "bound to the only node");
    assert_eq!(jsonpath(&server, "boot", "{.status.accelerator}"), "tcg");
    let run = run_dir(&server, &vmid);
    assert_eq!(qmp_status(&run.join("qmp.sock")), "running");
    let serial = run.join("serial.log");
    wait_until("the guest's boot marker on its serial console", || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(BOOT_MARKER))
    });
    let disk = server.data_dir().join(format!("storage/local/images/{vmid}/vm-{vmid}-disk-0.qcow2"));
    assert!(disk.exists(), "{} allocated", disk.display());
    let volume = format!("local:{vmid}/vm-{vmid}-disk-0.qcow2");
    assert_eq!(jsonpath(&server, "boot", "{.status.volumes.scsi0}"), volume);
    wait_until("the pool lists the volume", || {
        let out = server.kubectl(&["get", "sp", "local", "-o", "jsonpath={.status.nodes[0].content}"]);
        String::from_utf8_lossy(&out.stdout).contains(&volume)
    });
    assert_eq!(qmp_memory(&run.join("qmp.sock")), 256 << 20);
    wait_until("runtime figures in status", || {
        ["{.status.cpu}", "{.status.uptime}", "{.status.mem}", "{.status.diskRead}"]
            .iter()
            .all(|p| !jsonpath(&server, "boot", p).is_empty())
    });

    // A memory change needs a restart: declared RestartRequired, not done silently.
    server.kubectl_ok(&["patch", "vm", "boot", "--type=merge", "-p", r#"{"spec":{"memory":{"size":384}}}"#]);
    server.kubectl_ok(&["wait", "--for=condition=RestartRequired", "vm/boot", "--timeout=60s"]);
    assert_eq!(jsonpath(&server, "boot", "{.status.pid}"), pid, "not rebooted behind the user's back");
    assert_eq!(qmp_memory(&run.join("qmp.sock")), 256 << 20);
    // The declared restart applies it.
    server.kubectl_ok(&["annotate", "vm", "boot", "kpve.io/restart=1"]);
    wait_until("a new QEMU with the new memory", || {
        let new_pid = jsonpath(&server, "boot", "{.status.pid}");
        !new_pid.is_empty() && new_pid != pid && alive(&new_pid)
    });
    server.kubectl_ok(&["wait", "--for=condition=RestartRequired=False", "vm/boot", "--timeout=60s"]);
    assert_eq!(qmp_memory(&run.join("qmp.sock")), 384 << 20);
    let pid = jsonpath(&server, "boot", "{.status.pid}");

    // Stopped: the process goes, and a stopped VM declared Stopped is Ready.
    server.kubectl_ok(&["patch", "vm", "boot", "--type=merge", "-p", r#"{"spec":{"powerState":"Stopped"}}"#]);
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Stopped", "vm/boot", "--timeout=60s"]);
    server.kubectl_ok(&["wait", "--for=condition=Ready", "vm/boot", "--timeout=60s"]);
    wait_until("QEMU to exit", || !alive(&pid));

    // Running again: it boots again.
    server.kubectl_ok(&["patch", "vm", "boot", "--type=merge", "-p", r#"{"spec":{"powerState":"Running"}}"#]);
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "vm/boot", "--timeout=60s"]);
    wait_until("the boot marker again", || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(BOOT_MARKER))
    });
    let pid = jsonpath(&server, "boot", "{.status.pid}");

    // Delete: process, disk and object gone.
    server.kubectl_ok(&["delete", "vm", "boot", "--timeout=60s"]);
    wait_until("QEMU gone after delete", || !alive(&pid));
    wait_until("disk freed", || !disk.exists());
    assert!(!server.kubectl(&["get", "vm", "boot"]).status.success());
}

#[test]
fn an_agent_killed_with_sigkill_leaves_the_guest_running_and_adopts_it() {
    let server = Server::start_with_controllers();
    let initrd = test_initramfs(server.data_dir());
    let agent_dir = server.data_dir().join("agent-node1");
    let spawn_agent = || server.spawn_agent("node1", &agent_dir);
    let mut agent = spawn_agent();
    // The agent runs as its own process here (the server runs with --no-agent); the
    // server's scheduler binds the guest to it.
    wait_until("the agent's Hypervisor", || server.kubectl(&["get", "hv", "node1"]).status.success());
    apply(&server, &manifest("adopt", 256, "Running", &initrd, ""));
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "vm/adopt", "--timeout=60s"]);
    let pid = jsonpath(&server, "adopt", "{.status.pid}");
    let vmid = jsonpath(&server, "adopt", "{.spec.vmid}");
    let serial = agent_dir.join(format!("agent/run/{vmid}/serial.log"));
    wait_until("boot marker", || std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(BOOT_MARKER)));

    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    assert!(alive(&pid), "the guest survives its agent");
    let before = std::fs::read_to_string(&serial).unwrap().len();

    let mut agent = spawn_agent();
    // Adopted: same pid, still Running, and the agent keeps reporting.
    server.kubectl_ok(&["annotate", "vm", "adopt", "touched=1"]);
    wait_until("status from the new agent", || {
        jsonpath(&server, "adopt", "{.status.phase}") == "Running"
            && jsonpath(&server, "adopt", "{.status.pid}") == pid
    });
    assert!(alive(&pid));
    assert_eq!(
        qmp_status(&agent_dir.join(format!("agent/run/{vmid}/qmp.sock"))),
        "running",
        "not restarted: QMP of the same process"
    );
    assert!(std::fs::read_to_string(&serial).unwrap().len() >= before, "the console log continues");

    // Deleted while the agent is down: the guest controller's finalizer keeps the object
    // (Terminating) until its node has released it, so nothing is ever run twice or leaked.
    agent.kill().unwrap();
    agent.wait().unwrap();
    server.kubectl_ok(&["delete", "vm", "adopt", "--wait=false"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(server.kubectl(&["get", "vm", "adopt"]).status.success(), "kept while its node is away");
    assert!(alive(&pid));
    let mut agent = spawn_agent();
    wait_until("QEMU stopped by the returning agent", || !alive(&pid));
    let disk = agent_dir.join(format!("storage/local/images/{vmid}"));
    wait_until("disk freed", || !disk.exists());
    wait_until("object gone once released", || !server.kubectl(&["get", "vm", "adopt"]).status.success());
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[test]
fn a_bad_spec_gets_a_clear_condition_and_starts_nothing() {
    let server = Server::start_with_agent();
    let initrd = test_initramfs(server.data_dir());
    let bad_pool = manifest("nopool", 256, "Running", &initrd, "").replace("pool: local", "pool: missing");
    apply(&server, &bad_pool);
    server.kubectl_ok(&["wait", "--for=condition=Stalled", "vm/nopool", "--timeout=60s"]);
    let message = jsonpath(&server, "nopool", r#"{.status.conditions[?(@.type=="Stalled")].message}"#);
    assert!(message.contains("missing") && message.contains("spec.disks[scsi0]"), "{message}");
    let bad_bridge =
        manifest("nobridge", 256, "Running", &initrd, "  nics:\n    - id: net0\n      bridge: vmbr77\n");
    apply(&server, &bad_bridge);
    server.kubectl_ok(&["wait", "--for=condition=Stalled", "vm/nobridge", "--timeout=60s"]);
    let message = jsonpath(&server, "nobridge", r#"{.status.conditions[?(@.type=="Stalled")].message}"#);
    assert!(message.contains("vmbr77"), "{message}");
    // More memory than any node has: not placed, and the condition says why for each node.
    apply(&server, &manifest("huge", 4_000_000, "Running", &initrd, ""));
    server.kubectl_ok(&["wait", "--for=condition=Scheduled=False", "vm/huge", "--timeout=60s"]);
    let message = jsonpath(&server, "huge", r#"{.status.conditions[?(@.type=="Scheduled")].message}"#);
    assert!(message.contains("node1") && message.contains("memory"), "{message}");
    assert!(jsonpath(&server, "huge", "{.status.node}").is_empty());
    for name in ["nopool", "nobridge", "huge"] {
        let vmid = jsonpath(&server, name, "{.spec.vmid}");
        assert!(!run_dir(&server, &vmid).join("qemu.pid").exists(), "{name}: nothing started");
        assert!(jsonpath(&server, name, "{.status.pid}").is_empty());
    }
}
