//! LinuxContainers for real: `kpve server` runs a container declared in YAML with LXC from a
//! vztmpl tarball, unprivileged, on a bridge where another network namespace reaches it;
//! power state, reboot and deletion follow the spec; an agent killed with -9 adopts its
//! containers; bad specs get a clear condition and leave nothing behind.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{CT_MARKER, Server, wait_until};

const TEMPLATE: &str = support::BUSYBOX_TEMPLATE;

/// A bridge with one peer: a network namespace whose veth is a port of the bridge. Both
/// are removed when dropped.
struct Lan {
    bridge: String,
    netns: String,
    peer_ip: String,
}

impl Lan {
    fn new(tag: &str, subnet: &str) -> Lan {
        let id = std::process::id() % 100_000;
        let lan = Lan {
            bridge: format!("kb{tag}{id}"),
            netns: format!("kpve-{tag}-{id}"),
            peer_ip: format!("{subnet}.2"),
        };
        let host_end = format!("kv{tag}{id}");
        sh(&format!(
            "ip link add {br} type bridge && ip link set {br} up && \
             ip netns add {ns} && ip link add {host_end} type veth peer name eth0 netns {ns} && \
             ip link set {host_end} master {br} up && \
             ip -n {ns} addr add {peer}/24 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
            br = lan.bridge,
            ns = lan.netns,
            peer = lan.peer_ip,
        ));
        lan
    }

    fn ping(&self, ip: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, "busybox", "ping", "-c", "1", "-W", "1", ip])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

fn manifest(name: &str, power: &str, extra: &str) -> String {
    format!(
        "apiVersion: kpve.io/v1alpha1
kind: LinuxContainer
metadata:
  name: {name}
  namespace: default
spec:
  powerState: {power}
  hostname: {name}-host
  template: local:vztmpl/{TEMPLATE}.tar.gz
  memory: 128
  swap: 0
  rootfs:
    pool: local
    size: 1G
  startup:
    down: 5
{extra}"
    )
}

fn nic(bridge: &str, ip: &str) -> String {
    format!("  nics:\n    - id: net0\n      name: eth0\n      bridge: {bridge}\n      ip: {ip}/24\n")
}

fn apply(server: &Server, text: &str) -> Output {
    server.kubectl_stdin(&["apply", "-f", "-"], Some(text))
}

fn jsonpath(server: &Server, name: &str, path: &str) -> String {
    let out = server.kubectl(&["get", "ct", name, "-o", &format!("jsonpath={path}")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn alive(pid: &str) -> bool {
    !pid.is_empty()
        && Path::new("/proc").join(pid).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// Runs a command inside container `vmid` of the lxcpath `lxcpath`.
fn attach(lxcpath: &Path, vmid: &str, cmd: &[&str]) -> String {
    let out = Command::new("lxc-attach")
        .arg("-P")
        .arg(lxcpath)
        .args(["-n", vmid, "--"])
        .args(cmd)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "lxc-attach {cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rootfs(data_dir: &Path, vmid: &str) -> PathBuf {
    data_dir.join(format!("storage/local/images/{vmid}/subvol-{vmid}-disk-0.subvol"))
}

#[test]
fn a_declared_container_runs_on_its_bridge_follows_power_state_reboots_and_is_deleted() {
    let server = Server::start_with_agent();
    support::install_busybox_template(server.data_dir());
    let lan = Lan::new("a", "10.201.0");
    let keys = "  sshPublicKeys:\n    - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKpveTestKey test@kpve\n";
    let data = "  mountPoints:\n    - id: mp0\n      path: /data\n      pool: local\n      size: 1G\n";
    apply(&server, &manifest("web", "Running", &format!("{}{keys}{data}", nic(&lan.bridge, "10.201.0.10"))));
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "ct/web", "--timeout=60s"]);
    server.kubectl_ok(&["wait", "--for=condition=Ready", "ct/web", "--timeout=60s"]);
    let vmid = jsonpath(&server, "web", "{.spec.vmid}");
    let pid = jsonpath(&server, "web", "{.status.pid}");
    assert!(alive(&pid), "container init {pid} runs");
    assert_eq!(jsonpath(&server, "web", "{.status.node}"), "node1");
    let lxcpath = server.data_dir().join("agent/run");
    let run = lxcpath.join(&vmid);

    // Inside: the declared host name and address; unprivileged with Proxmox's id map.
    assert_eq!(attach(&lxcpath, &vmid, &["hostname"]).trim(), "web-host");
    let addr = attach(&lxcpath, &vmid, &["ip", "-4", "addr", "show", "eth0"]);
    assert!(addr.contains("10.201.0.10/24"), "{addr}");
    let uid_map: Vec<String> = attach(&lxcpath, &vmid, &["cat", "/proc/self/uid_map"])
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(uid_map, ["0", "100000", "65536"]);
    // Another host on the bridge reaches it.
    assert!(lan.ping("10.201.0.10"), "the peer namespace reaches the container");
    let console = run.join("console.log");
    wait_until("the init's marker on the console", || {
        std::fs::read_to_string(&console).is_ok_and(|s| s.contains(&format!("{CT_MARKER} web-host")))
    });

    // The rootfs is a Proxmox-style subvolume, extracted from the template, owned by the
    // container's root, with the guest files pct writes.
    let root = rootfs(server.data_dir(), &vmid);
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), 100_000);
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "web-host\n");
    let authorized = root.join("root/.ssh/authorized_keys");
    assert!(std::fs::read_to_string(&authorized).unwrap().contains("KpveTestKey test@kpve"));
    assert_eq!(std::fs::metadata(&authorized).unwrap().uid(), 100_000, "owned by the container's root");
    assert_eq!(std::fs::metadata(&authorized).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        jsonpath(&server, "web", "{.status.volumes.rootfs}"),
        format!("local:{vmid}/subvol-{vmid}-disk-0.subvol")
    );
    wait_until("runtime figures and IPs in status", || {
        jsonpath(&server, "web", "{.status.ips}").contains("10.201.0.10")
            && ["{.status.mem}", "{.status.uptime}", "{.status.cpu}", "{.status.maxmem}"]
                .iter()
                .all(|p| !jsonpath(&server, "web", p).is_empty())
    });
    assert_eq!(jsonpath(&server, "web", "{.status.maxmem}"), (128u64 << 20).to_string());
    attach(&lxcpath, &vmid, &["touch", "/root/kept"]);
    // mp0: its own subvolume, writable by the container's root.
    attach(&lxcpath, &vmid, &["touch", "/data/written"]);
    let mp0 = server.data_dir().join(format!("storage/local/images/{vmid}/subvol-{vmid}-disk-1.subvol"));
    assert_eq!(std::fs::metadata(mp0.join("written")).unwrap().uid(), 100_000);
    assert_eq!(
        jsonpath(&server, "web", "{.status.volumes.mp0}"),
        format!("local:{vmid}/subvol-{vmid}-disk-1.subvol")
    );
    // The pool lists the template and both volumes.
    wait_until("the pool lists the template and the volumes", || {
        let out = server.kubectl(&["get", "sp", "local", "-o", "jsonpath={.status.nodes[0].content}"]);
        let content = String::from_utf8_lossy(&out.stdout).into_owned();
        [
            format!("local:vztmpl/{TEMPLATE}.tar.gz"),
            format!("local:{vmid}/subvol-{vmid}-disk-0.subvol"),
            format!("local:{vmid}/subvol-{vmid}-disk-1.subvol"),
        ]
        .iter()
        .all(|v| content.contains(v.as_str()))
    });

    // Paused: frozen in place, then thawed, the same process throughout.
    server.kubectl_ok(&["patch", "ct", "web", "--type=merge", "-p", r#"{"spec":{"powerState":"Paused"}}"#]);
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Paused", "ct/web", "--timeout=60s"]);
    let info = Command::new("lxc-info").arg("-P").arg(&lxcpath).args(["-n", &vmid, "-s"]).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("FROZEN"));
    server.kubectl_ok(&["patch", "ct", "web", "--type=merge", "-p", r#"{"spec":{"powerState":"Running"}}"#]);
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "ct/web", "--timeout=60s"]);
    assert_eq!(jsonpath(&server, "web", "{.status.pid}"), pid);
    assert!(lan.ping("10.201.0.10"));

    // Stopped: a graceful shutdown (init saw the halt signal), the process goes.
    server.kubectl_ok(&["patch", "ct", "web", "--type=merge", "-p", r#"{"spec":{"powerState":"Stopped"}}"#]);
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Stopped", "ct/web", "--timeout=60s"]);
    server.kubectl_ok(&["wait", "--for=condition=Ready", "ct/web", "--timeout=60s"]);
    wait_until("init to exit", || !alive(&pid));
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("KPVE-CT-HALT"), "graceful: init got SIGPWR: {log}");
    assert!(!lan.ping("10.201.0.10"));

    // Running again: same rootfs (not extracted again), reachable again.
    server.kubectl_ok(&["patch", "ct", "web", "--type=merge", "-p", r#"{"spec":{"powerState":"Running"}}"#]);
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "ct/web", "--timeout=60s"]);
    assert!(root.join("root/kept").exists(), "the rootfs survives a stop");
    assert!(lan.ping("10.201.0.10"));
    let pid = jsonpath(&server, "web", "{.status.pid}");

    // A memory change waits for a declared restart; the restart (a reboot) applies it.
    server.kubectl_ok(&["patch", "ct", "web", "--type=merge", "-p", r#"{"spec":{"memory":192}}"#]);
    server.kubectl_ok(&["wait", "--for=condition=RestartRequired", "ct/web", "--timeout=60s"]);
    assert_eq!(jsonpath(&server, "web", "{.status.pid}"), pid, "not rebooted behind the user's back");
    server.kubectl_ok(&["annotate", "ct", "web", "kpve.io/restart=1"]);
    wait_until("a rebooted container", || {
        let new_pid = jsonpath(&server, "web", "{.status.pid}");
        new_pid != pid && alive(&new_pid)
    });
    server.kubectl_ok(&["wait", "--for=condition=RestartRequired=False", "ct/web", "--timeout=60s"]);
    let limit = String::from_utf8(
        Command::new("lxc-cgroup")
            .arg("-P")
            .arg(&lxcpath)
            .args(["-n", &vmid, if cgroup_v1() { "memory.limit_in_bytes" } else { "memory.max" }])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(limit.trim(), (192u64 << 20).to_string());
    // Reboot with nothing changed: a new annotation value reboots again.
    let pid = jsonpath(&server, "web", "{.status.pid}");
    server.kubectl_ok(&["annotate", "--overwrite", "ct", "web", "kpve.io/restart=2"]);
    wait_until("a second reboot", || {
        let new_pid = jsonpath(&server, "web", "{.status.pid}");
        new_pid != pid && alive(&new_pid)
    });
    server.kubectl_ok(&["wait", "--for=condition=Ready", "ct/web", "--timeout=60s"]);
    let pid = jsonpath(&server, "web", "{.status.pid}");

    // Delete: container, rootfs and object gone.
    server.kubectl_ok(&["delete", "ct", "web", "--timeout=60s"]);
    wait_until("init gone after delete", || !alive(&pid));
    wait_until("rootfs and mp0 freed", || !root.exists() && !mp0.exists());
    assert!(!run.exists(), "run directory removed");
    assert!(!server.kubectl(&["get", "ct", "web"]).status.success());
}

fn cgroup_v1() -> bool {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == "memory")))
}

#[test]
fn an_agent_killed_with_sigkill_leaves_the_container_running_and_adopts_it() {
    let server = Server::start_with_controllers();
    let agent_dir = server.data_dir().join("agent-node1");
    // The `local` pool's path is the server's (its StoragePool's spec.path).
    support::install_busybox_template(server.data_dir());
    let spawn_agent = || server.spawn_agent("node1", &agent_dir);
    let lxcpath = agent_dir.join("agent/run");
    // However the test ends, the containers of this separate agent stop with it.
    struct StopContainers(PathBuf);
    impl Drop for StopContainers {
        fn drop(&mut self) {
            support::stop_containers(&self.0);
        }
    }
    let _cleanup = StopContainers(lxcpath.clone());
    let mut agent = spawn_agent();
    wait_until("the agent's Hypervisor", || server.kubectl(&["get", "hv", "node1"]).status.success());
    apply(&server, &manifest("adopt", "Running", ""));
    server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "ct/adopt", "--timeout=60s"]);
    let pid = jsonpath(&server, "adopt", "{.status.pid}");
    let vmid = jsonpath(&server, "adopt", "{.spec.vmid}");

    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    assert!(alive(&pid), "the container survives its agent");
    attach(&lxcpath, &vmid, &["touch", "/tmp/still-here"]);

    let mut agent = spawn_agent();
    server.kubectl_ok(&["annotate", "ct", "adopt", "touched=1"]);
    wait_until("status from the new agent", || {
        jsonpath(&server, "adopt", "{.status.phase}") == "Running"
            && jsonpath(&server, "adopt", "{.status.pid}") == pid
    });
    server.kubectl_ok(&["wait", "--for=condition=Ready", "ct/adopt", "--timeout=60s"]);
    assert!(alive(&pid), "adopted, not restarted");
    // tmpfs-free busybox /tmp is on the rootfs: the same container, the same files.
    attach(&lxcpath, &vmid, &["ls", "/tmp/still-here"]);

    server.kubectl_ok(&["delete", "ct", "adopt", "--timeout=60s"]);
    wait_until("container stopped on delete", || !alive(&pid));
    assert!(!rootfs(server.data_dir(), &vmid).exists());
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[test]
fn bad_container_specs_get_a_clear_condition_and_leave_nothing_behind() {
    let server = Server::start_with_agent();
    support::install_busybox_template(server.data_dir());
    let stalled = |name: &str, manifest: String, needles: &[&str]| {
        apply(&server, &manifest);
        server.kubectl_ok(&["wait", "--for=condition=Stalled", &format!("ct/{name}"), "--timeout=60s"]);
        let message = jsonpath(&server, name, r#"{.status.conditions[?(@.type=="Stalled")].message}"#);
        for needle in needles {
            assert!(message.contains(needle), "{name}: {message:?} names {needle:?}");
        }
        let vmid = jsonpath(&server, name, "{.spec.vmid}");
        assert!(
            !server.data_dir().join(format!("storage/local/images/{vmid}")).exists(),
            "{name}: no volume"
        );
        assert!(!server.data_dir().join(format!("agent/run/{vmid}/config")).exists(), "{name}: no container");
        assert!(jsonpath(&server, name, "{.status.pid}").is_empty());
        assert_eq!(jsonpath(&server, name, "{.status.phase}"), "Failed");
    };
    stalled(
        "notemplate",
        manifest("notemplate", "Running", "").replace(TEMPLATE, "no-such-template"),
        &["spec.template", "no-such-template.tar.gz"],
    );
    stalled(
        "nobridge",
        manifest("nobridge", "Running", &nic("vmbr77", "10.202.0.10")),
        &["spec.nics[net0].bridge", "vmbr77"],
    );
    stalled(
        "mknod",
        manifest("mknod", "Running", "  features:\n    mknod: true\n"),
        &["spec.features.mknod"],
    );
    // A feature kpve does not know is refused by the API, naming the field.
    let out = apply(&server, &manifest("bogus", "Running", "  features:\n    bogus: true\n"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bogus"), "{stderr}");
    assert!(!server.kubectl(&["get", "ct", "bogus"]).status.success());
}
