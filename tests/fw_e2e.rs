//! The firewall on real packets. `kpve server` (API, controllers, agent) runs inside a network
//! namespace of its own, so its nftables tables never touch the host's. In that namespace a
//! bridge carries two LXC containers and two peer namespaces (one in the IP set allowed to
//! SSH, one not); TCP connections from the peers show what the ruleset enforces.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Server, wait_until};

const TEMPLATE: &str = support::BUSYBOX_TEMPLATE;
const BRIDGE: &str = "vmbr9";
const HOST_IP: &str = "10.202.0.1";
const ALLOWED: &str = "10.202.0.2";
const DENIED: &str = "10.202.0.3";
const WEB1: &str = "10.202.0.10";
const WEB2: &str = "10.202.0.11";
const WEB3: &str = "10.202.0.12";

/// The namespaces of the test: the node's own and two peers on its bridge.
struct Net {
    node: String,
    allowed: String,
    denied: String,
}

fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Net {
    fn new() -> Net {
        let id = std::process::id();
        let net = Net {
            node: format!("kpve-fw-{id}"),
            allowed: format!("kpve-fwa-{id}"),
            denied: format!("kpve-fwb-{id}"),
        };
        let n = &net.node;
        sh(&format!(
            "ip netns add {n} && ip -n {n} link set lo up && \
             ip -n {n} link add {BRIDGE} type bridge && ip -n {n} addr add {HOST_IP}/24 dev {BRIDGE} && \
             ip -n {n} link set {BRIDGE} up"
        ));
        for (peer, ip, port) in [(&net.allowed, ALLOWED, "pa"), (&net.denied, DENIED, "pb")] {
            sh(&format!(
                "ip netns add {peer} && ip -n {peer} link set lo up && \
                 ip -n {n} link add {port} type veth peer name eth0 netns {peer} && \
                 ip -n {n} link set {port} master {BRIDGE} up && \
                 ip -n {peer} addr add {ip}/24 dev eth0 && ip -n {peer} link set eth0 up"
            ));
        }
        net
    }

    fn nft(&self, args: &str) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns exec {} nft {args}", self.node))
            .output()
            .unwrap();
        assert!(out.status.success(), "nft {args}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.allowed, &self.denied, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Probe {
    Open,
    Refused,
    Timeout,
}

const PROBE: &str = "import socket,sys
s=socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print('open')
except ConnectionRefusedError: print('refused')
except (socket.timeout, TimeoutError): print('timeout')
except OSError as e: print('error', e)";

/// A TCP connection from network namespace `ns`; a silently dropped SYN shows as Timeout
/// after `timeout`.
fn probe_within(ns: &str, ip: &str, port: u16, timeout: f64) -> Probe {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", PROBE, ip, &port.to_string(), &timeout.to_string()])
        .output()
        .unwrap();
    match String::from_utf8_lossy(&out.stdout).trim() {
        "open" => Probe::Open,
        "refused" => Probe::Refused,
        "timeout" => Probe::Timeout,
        other => panic!("probe {ns} → {ip}:{port}: {other} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn probe(ns: &str, ip: &str, port: u16) -> Probe {
    probe_within(ns, ip, port, 1.0)
}

/// Waits until a probe gives `want`, at most `deadline`; returns how long it took.
fn enforced_within(deadline: Duration, ns: &str, ip: &str, port: u16, want: Probe) -> Duration {
    let start = Instant::now();
    loop {
        let got = probe_within(ns, ip, port, 0.2);
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "{ns} → {ip}:{port} still {got:?} after {deadline:?}, want {want:?}"
        );
    }
}

fn apply(server: &Server, text: &str) {
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(text));
    assert!(out.status.success(), "apply: {}\n{text}", String::from_utf8_lossy(&out.stderr));
}

fn get(server: &Server, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let jp = format!("jsonpath={path}");
    args.extend(["-o", &jp]);
    String::from_utf8_lossy(&server.kubectl(&args).stdout).into_owned()
}

fn container(name: &str, vmid: u32, ip: &str, policy_in: &str, extra_rules: &str) -> String {
    format!(
        "apiVersion: kpve.io/v1alpha1
kind: LinuxContainer
metadata:
  name: {name}
  namespace: default
spec:
  vmid: {vmid}
  powerState: Running
  hostname: {name}
  template: local:vztmpl/{TEMPLATE}.tar.gz
  memory: 128
  swap: 0
  rootfs:
    pool: local
    size: 1G
  nics:
    - id: net0
      name: eth0
      bridge: {BRIDGE}
      ip: {ip}/24
      firewall: true
  firewall:
    enable: true
    ipfilter: true
    policyIn: {policy_in}
    rules:
      - type: in
        action: ACCEPT
        macro: SSH
        source: +ssh-allowed
      - type: group
        action: web
{extra_rules}"
    )
}

fn cluster(enable: bool) -> String {
    format!(
        "apiVersion: kpve.io/v1alpha1\nkind: ClusterFirewall\nmetadata:\n  name: cluster\nspec:\n  enable: {enable}\n"
    )
}

fn ipset(name: &str, cidrs: &[&str]) -> String {
    let entries: String = cidrs.iter().map(|c| format!("    - cidr: {c}\n")).collect();
    format!(
        "apiVersion: kpve.io/v1alpha1\nkind: IPSet\nmetadata:\n  name: {name}\nspec:\n  entries:\n{entries}"
    )
}

fn group(port: u16) -> String {
    format!(
        "apiVersion: kpve.io/v1alpha1\nkind: SecurityGroup\nmetadata:\n  name: web\nspec:\n  rules:\n    - type: in\n      action: ACCEPT\n      proto: tcp\n      dport: \"{port}\"\n"
    )
}

/// Runs a command inside a container (LXC's command socket is in the node's namespace).
fn attach(server: &Server, net: &Net, vmid: u32, cmd: &str) -> bool {
    let lxcpath = server.data_dir().join("agent/run");
    support::netns_command(&net.node, "lxc-attach")
        .arg("-P")
        .arg(&lxcpath)
        .args(["-n", &vmid.to_string(), "--", "/bin/sh", "-c", cmd])
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP listener on the node itself (where the Proxmox API would listen).
fn host_listener(net: &Net, port: u16) -> Listener {
    let child = Command::new("ip")
        .args(["netns", "exec", &net.node, "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('{HOST_IP}', {port})); s.listen(64)\nwhile True: s.accept()[0].close()"
        ))
        .spawn()
        .unwrap();
    Listener(child)
}

fn ready(server: &Server, what: &[&str]) -> String {
    get(server, what, "{.status.conditions[?(@.type==\"FirewallReady\")].status}")
}

#[test]
fn guest_and_host_rules_are_enforced_on_real_packets() {
    let net = Net::new();
    net.nft("add table ip foreign");
    let server = Server::start_in_netns(&net.node);
    support::install_busybox_template(server.data_dir());

    apply(&server, &ipset("ssh-allowed", &[ALLOWED]));
    apply(&server, &group(80));
    apply(&server, &cluster(true));
    apply(&server, &container("web1", 100, WEB1, "DROP", ""));
    apply(&server, &container("web2", 101, WEB2, "REJECT", ""));
    for ct in ["web1", "web2"] {
        let out = server.kubectl(&[
            "wait",
            "--for=jsonpath={.status.phase}=Running",
            &format!("ct/{ct}"),
            "--timeout=60s",
        ]);
        assert!(
            out.status.success(),
            "{ct} not running:\n{}",
            server.kubectl_ok(&["get", "ct", ct, "-o", "yaml"])
        );
    }
    for (vmid, ip) in [(100, WEB1), (101, WEB2)] {
        for port in [22, 80, 8080] {
            // busybox httpd daemonizes: a listener per port.
            wait_until(&format!("httpd :{port} in {vmid}"), || {
                attach(&server, &net, vmid, &format!("/bin/busybox httpd -p {ip}:{port} -h /tmp"))
            });
        }
    }
    wait_until("the node's firewall in force", || ready(&server, &["hv", "node1"]) == "True");
    wait_until("web1's firewall in force", || ready(&server, &["ct", "web1"]) == "True");
    let generation = get(&server, &["clusterfirewall", "cluster"], "{.metadata.generation}");
    assert_eq!(
        get(&server, &["hv", "node1"], "{.status.firewall.inputs.ClusterFirewall/cluster}"),
        generation
    );
    assert_eq!(
        get(&server, &["ct", "web1"], "{.status.firewallGeneration}"),
        get(&server, &["ct", "web1"], "{.metadata.generation}")
    );
    let tables = net.nft("list tables");
    assert!(tables.contains("table inet kpve") && tables.contains("table bridge kpve"), "{tables}");

    // SSH from the IP set only; DROP times out, REJECT answers at once.
    assert_eq!(probe(&net.allowed, WEB1, 22), Probe::Open);
    assert_eq!(probe(&net.denied, WEB1, 22), Probe::Timeout);
    let t = Instant::now();
    assert_eq!(probe(&net.denied, WEB2, 22), Probe::Refused);
    assert!(t.elapsed() < Duration::from_millis(900), "REJECT took {:?}", t.elapsed());
    // The security group admits :80 on both guests; :8080 is nobody's rule.
    for ip in [WEB1, WEB2] {
        assert_eq!(probe(&net.denied, ip, 80), Probe::Open, "{ip}:80");
    }
    assert_eq!(probe(&net.denied, WEB1, 8080), Probe::Timeout);

    // A change to the IP set is enforced within a second.
    apply(&server, &ipset("ssh-allowed", &[ALLOWED, DENIED]));
    let took = enforced_within(Duration::from_secs(1), &net.denied, WEB1, 22, Probe::Open);
    eprintln!("ipset change enforced after {took:?}");
    // The group changes for both guests at once.
    apply(&server, &group(8080));
    enforced_within(Duration::from_secs(1), &net.denied, WEB1, 8080, Probe::Open);
    enforced_within(Duration::from_secs(1), &net.denied, WEB2, 8080, Probe::Open);
    assert_eq!(probe(&net.denied, WEB1, 80), Probe::Timeout);
    assert_eq!(probe(&net.denied, WEB2, 80), Probe::Refused);
    // The host itself is held to the guest's IN rules too.
    assert_eq!(probe(&net.node, WEB1, 8080), Probe::Open);
    assert_eq!(probe(&net.node, WEB1, 80), Probe::Timeout);

    // ipfilter: a source address that is not the container's is dropped at the bridge.
    assert!(attach(&server, &net, 100, "ip addr add 10.202.0.99/24 dev eth0"));
    assert!(attach(&server, &net, 100, &format!("busybox ping -c 1 -W 1 {ALLOWED}")), "own address pings");
    assert!(
        !attach(&server, &net, 100, &format!("busybox ping -c 1 -W 1 -I 10.202.0.99 {ALLOWED}")),
        "spoofed source passed"
    );

    // Host: policy DROP, but the management ports stay open until a rule says otherwise.
    let _api = host_listener(&net, 8006);
    let _other = host_listener(&net, 9000);
    wait_until("host listeners", || probe(&net.node, HOST_IP, 9000) == Probe::Open);
    assert_eq!(probe(&net.denied, HOST_IP, 8006), Probe::Open);
    assert_eq!(probe(&net.denied, HOST_IP, 9000), Probe::Timeout);
    server.kubectl_ok(&[
        "patch", "hv", "node1", "--type", "merge", "-p",
        &format!(r#"{{"spec":{{"firewall":{{"rules":[{{"type":"in","action":"DROP","source":"{DENIED}","proto":"tcp","dport":"8006"}}]}}}}}}"#),
    ]);
    enforced_within(Duration::from_secs(1), &net.denied, HOST_IP, 8006, Probe::Timeout);
    assert_eq!(probe(&net.allowed, HOST_IP, 8006), Probe::Open);

    // An unknown IP set: a condition naming the rule, and the previous ruleset stays.
    apply(
        &server,
        &container(
            "web1",
            100,
            WEB1,
            "DROP",
            "      - type: in\n        action: ACCEPT\n        source: +nosuch\n",
        ),
    );
    wait_until("web1 reports the unknown IP set", || ready(&server, &["ct", "web1"]) == "False");
    let message = get(&server, &["ct", "web1"], "{.status.conditions[?(@.type==\"FirewallReady\")].message}");
    assert!(
        message.contains("IP set \"nosuch\" does not exist") && message.contains("IN ACCEPT -source +nosuch"),
        "{message}"
    );
    assert_eq!(
        get(&server, &["hv", "node1"], "{.status.conditions[?(@.type==\"FirewallReady\")].reason}"),
        "UnknownReference"
    );
    assert_eq!(probe(&net.denied, WEB1, 22), Probe::Open, "the previous ruleset stays in force");
    assert_eq!(probe(&net.denied, WEB1, 80), Probe::Timeout);
    // A guest arriving meanwhile has no chains in the previous ruleset: it is held
    // fail-closed, not left open.
    apply(&server, &container("web3", 102, WEB3, "ACCEPT", ""));
    let out = server.kubectl(&["wait", "--for=jsonpath={.status.phase}=Running", "ct/web3", "--timeout=60s"]);
    assert!(
        out.status.success(),
        "web3 not running:\n{}",
        server.kubectl_ok(&["get", "ct", "web3", "-o", "yaml"])
    );
    wait_until("httpd :80 in 102", || {
        attach(&server, &net, 102, &format!("/bin/busybox httpd -p {WEB3}:80 -h /tmp"))
    });
    assert_eq!(probe(&net.allowed, WEB3, 80), Probe::Timeout, "a new guest is held fail-closed");
    apply(&server, &ipset("nosuch", &["10.202.0.0/24"]));
    wait_until("web1 in force again", || ready(&server, &["ct", "web1"]) == "True");
    enforced_within(Duration::from_secs(1), &net.denied, WEB1, 80, Probe::Open);
    enforced_within(Duration::from_secs(1), &net.allowed, WEB3, 80, Probe::Open);

    // Someone else empties kpve's table (the tables stay, the rules go): the agent notices
    // and loads the ruleset again.
    net.nft("flush table inet kpve");
    assert_eq!(probe(&net.denied, WEB2, 80), Probe::Open, "flushed: nothing filters");
    let flushed = Instant::now();
    wait_until("kpve rules restored", || probe(&net.denied, WEB2, 80) == Probe::Refused);
    eprintln!("restored {:?} after a flush", flushed.elapsed());

    // Off at cluster level: kpve's tables go, the foreign one stays, traffic flows.
    apply(&server, &cluster(false));
    wait_until("kpve tables removed", || net.nft("list tables").trim() == "table ip foreign");
    assert_eq!(probe(&net.denied, HOST_IP, 9000), Probe::Open);
    assert_eq!(probe(&net.denied, WEB2, 80), Probe::Open);
    assert!(
        attach(&server, &net, 100, &format!("busybox ping -c 1 -W 1 -I 10.202.0.99 {ALLOWED}")),
        "no ipfilter without firewall"
    );
}
