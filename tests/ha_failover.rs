//! HA for real: three `kpve agent` processes (fast HA profile: 8 s lease, self-fence after 5 s)
//! and an HA VM. A sampler watches every node's QEMU processes (and asks QMP) throughout, and
//! the test fails if the guest ever runs on two nodes at once.
//!
//! - kill -9 of the guest's agent: the fence watchdog kills the guest at the deadline, the
//!   CRM recovers it onto another node once the lease has expired;
//! - a partition between the guest's agent and the API server: the agent's LRM stops the
//!   guest before the lease expires, and only then does it start elsewhere; when the partition
//!   heals, the node does not take the guest back.
//!
//! Every agent reaches the API server through its own loopback [`Proxy`], which the partition
//! test cuts. The guest runs under TCG (see vm_e2e.rs).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kpve_node_agent::qemu::qmp::Qmp;
use support::{BOOT_MARKER, Proxy, Server, TEST_KERNEL, test_initramfs, wait_until};

/// The tests time leases in seconds: they do not share the two cores with each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// Fast profile: lease 8 s; what recovery may take on top (QEMU start, a loaded machine).
const RECOVERY_BUDGET: Duration = Duration::from_secs(8 + 12);

struct Cluster {
    server: Server,
    agents: BTreeMap<String, Child>,
    dirs: BTreeMap<String, PathBuf>,
    proxies: BTreeMap<String, Proxy>,
}

impl Cluster {
    fn start() -> Cluster {
        let server = Server::start_with_controllers();
        let mut cluster =
            Cluster { server, agents: BTreeMap::new(), dirs: BTreeMap::new(), proxies: BTreeMap::new() };
        for node in NODES {
            let dir = cluster.server.data_dir().join(format!("agent-{node}"));
            let proxy = Proxy::to(cluster.server.port);
            let agent = cluster.server.spawn_agent_via(node, &dir, proxy.port, &["--ha-profile", "fast"]);
            cluster.agents.insert(node.into(), agent);
            cluster.dirs.insert(node.into(), dir);
            cluster.proxies.insert(node.into(), proxy);
        }
        for node in NODES {
            wait_until(&format!("node {node} registered"), || {
                cluster.server.kubectl(&["get", "hv", node]).status.success()
            });
        }
        cluster
    }

    fn get(&self, path: &str) -> String {
        let out = self.server.kubectl(&["get", "vm", "ha", "-o", &format!("jsonpath={path}")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node's Lease renew time as the server has it.
    fn renew_time(&self, node: &str) -> String {
        let lease = ["get", "lease", "-n", "kube-node-lease", node, "-o", "jsonpath={.spec.renewTime}"];
        String::from_utf8_lossy(&self.server.kubectl(&lease).stdout).into_owned()
    }

    fn run_dir(&self, node: &str, vmid: &str) -> PathBuf {
        self.dirs[node].join("agent/run").join(vmid)
    }

    /// Starts the HA VM and waits until it has booted; its node and VMID.
    fn start_guest(&self) -> (String, String) {
        let initrd = test_initramfs(self.server.data_dir());
        let manifest = format!(
            "apiVersion: kpve.io/v1alpha1
kind: VirtualMachine
metadata:
  name: ha
  namespace: default
  annotations:
    kpve.io/kernel: {TEST_KERNEL}
    kpve.io/initrd: {initrd}
    kpve.io/cmdline: console=ttyS0 panic=-1
spec:
  powerState: Running
  kvm: false
  cpu:
    cores: 1
  memory:
    size: 256
  startup:
    down: 1
  ha:
    state: started
",
            initrd = initrd.display()
        );
        self.server.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest));
        self.server.kubectl_ok(&["wait", "--for=jsonpath={.status.phase}=Running", "vm/ha", "--timeout=60s"]);
        let node = self.get("{.status.node}");
        let vmid = self.get("{.spec.vmid}");
        let serial = self.run_dir(&node, &vmid).join("serial.log");
        wait_until("the guest's boot marker", || {
            std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(BOOT_MARKER))
        });
        (node, vmid)
    }

    /// Waits until the guest runs (QEMU alive, reported by that node's LRM) on a node other
    /// than `from`, within the budget; that node.
    fn wait_recovered(&self, from: &str, vmid: &str, since: Instant) -> String {
        let deadline = since + RECOVERY_BUDGET;
        loop {
            let node = self.get("{.status.node}");
            let reported = self.get("{.status.haLrm.node}");
            let phase = self.get("{.status.phase}");
            if !node.is_empty() && node != from && reported == node && phase == "Running" {
                let pid =
                    std::fs::read_to_string(self.run_dir(&node, vmid).join("qemu.pid")).unwrap_or_default();
                if alive(pid.trim(), &self.run_dir(&node, vmid)) {
                    return node;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not recovered within {RECOVERY_BUDGET:?}: node {node:?}, phase {phase:?}, reported by {reported:?}\n{}",
                self.server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        support::stop_agents(&self.server, self.agents.values_mut());
    }
}

fn alive(pid: &str, run_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ");
    !zombie && String::from_utf8_lossy(&cmdline).contains(&format!("{}/", run_dir.display()))
}

/// One look at every node.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// Nodes with a live QEMU process for the guest.
    processes: Vec<String>,
    /// Nodes whose QMP answered `running`.
    qmp_running: Vec<String>,
}

/// Looks at every node's QEMU every 100 ms (QMP every 500 ms: it takes one client at a time,
/// and the agents use it too) until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    fn start(runs: BTreeMap<String, PathBuf>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mut samples = Vec::new();
            let mut round = 0u32;
            while !flag.load(Ordering::SeqCst) {
                let mut sample =
                    Sample { at: Instant::now(), processes: Vec::new(), qmp_running: Vec::new() };
                for (node, run) in &runs {
                    let pid = std::fs::read_to_string(run.join("qemu.pid")).unwrap_or_default();
                    if !alive(pid.trim(), run) {
                        continue;
                    }
                    sample.processes.push(node.clone());
                    if round.is_multiple_of(5) {
                        let status = rt.block_on(async {
                            let mut qmp =
                                Qmp::connect(&run.join("qmp.sock"), Duration::from_millis(500)).await.ok()?;
                            qmp.query_status().await.ok()
                        });
                        if status.as_deref() == Some("running") {
                            sample.qmp_running.push(node.clone());
                        }
                    }
                }
                samples.push(sample);
                round += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Sampler { stop, thread: Some(thread) }
    }

    /// Stops sampling; asserts no sample saw the guest on two nodes; the samples.
    fn finish(self) -> Vec<Sample> {
        self.finish_after(20)
    }

    fn finish_after(mut self, at_least: usize) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.thread.take().unwrap().join().unwrap();
        for s in &samples {
            assert!(s.processes.len() <= 1, "QEMU ran on two nodes at once: {s:?}");
            assert!(s.qmp_running.len() <= 1, "QMP said running on two nodes at once: {s:?}");
        }
        assert!(samples.len() >= at_least, "the sampler looked only {} times", samples.len());
        samples
    }
}

fn runs(cluster: &Cluster, vmid: &str) -> BTreeMap<String, PathBuf> {
    NODES.iter().map(|n| (n.to_string(), cluster.run_dir(n, vmid))).collect()
}

/// The failover timeline in status and the Event that says where the guest went.
fn assert_timeline(cluster: &Cluster, from: &str, to: &str) {
    assert_eq!(cluster.get("{.status.ha.failover.from}"), from);
    assert_eq!(cluster.get("{.status.ha.failover.recoveredTo}"), to);
    for step in ["detected", "fenced", "recovered", "running"] {
        assert!(!cluster.get(&format!("{{.status.ha.failover.{step}}}")).is_empty(), "timeline lacks {step}");
    }
    assert_eq!(cluster.get("{.status.ha.state}"), "started");
    let events = cluster.server.kubectl_ok(&[
        "get",
        "events",
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    ]);
    assert!(
        events.contains("Recovered: vm:") && events.contains(&format!("from {from} to {to}")),
        "{events}"
    );
    assert!(events.contains("NodeFenced"), "{events}");
}

#[test]
fn a_killed_agents_ha_vm_is_fenced_by_the_watchdog_and_recovered_on_another_node() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::start();
    let (first, vmid) = cluster.start_guest();
    let sampler = Sampler::start(runs(&cluster, &vmid));

    let mut agent = cluster.agents.remove(&first).unwrap();
    agent.kill().unwrap(); // SIGKILL: no lease renewals from here on
    agent.wait().unwrap();
    let killed_at = Instant::now();
    let second = cluster.wait_recovered(&first, &vmid, killed_at);
    let recovery = killed_at.elapsed();
    let serial = cluster.run_dir(&second, &vmid).join("serial.log");
    wait_until("the recovered guest's boot marker", || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(BOOT_MARKER))
    });
    let samples = sampler.finish();

    eprintln!("recovered from {first} to {second} in {recovery:?}");
    assert!(samples.iter().any(|s| s.processes == [first.clone()]), "the sampler saw it on {first} first");
    assert!(samples.iter().any(|s| s.processes == [second.clone()]), "and on {second} after");
    let old_pid =
        std::fs::read_to_string(cluster.run_dir(&first, &vmid).join("qemu.pid")).unwrap_or_default();
    assert!(!alive(old_pid.trim(), &cluster.run_dir(&first, &vmid)), "the dead agent's QEMU was killed");
    let watchdog =
        std::fs::read_to_string(cluster.dirs[&first].join("agent/watchdog.log")).unwrap_or_default();
    assert!(watchdog.contains("killed HA guests"), "the watchdog did it: {watchdog:?}");
    assert_timeline(&cluster, &first, &second);

    // The killed node comes back with no credentials on its command line (the join token
    // it was given is kept in its state directory) and does not take the guest back.
    let agent = cluster.server.respawn_agent_via(
        &first,
        &cluster.dirs[&first],
        cluster.proxies[&first].port,
        &["--ha-profile", "fast"],
    );
    cluster.agents.insert(first.clone(), agent);
    let renew = || cluster.renew_time(&first);
    let before = renew();
    wait_until("the restarted agent renews its lease", || renew() != before);
    assert_eq!(cluster.get("{.status.node}"), second);
}

#[test]
fn a_partitioned_node_stops_its_ha_vm_before_it_starts_elsewhere_and_does_not_take_it_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::start();
    let (first, vmid) = cluster.start_guest();
    let sampler = Sampler::start(runs(&cluster, &vmid));

    cluster.proxies[&first].cut();
    let cut_at = Instant::now();
    let second = cluster.wait_recovered(&first, &vmid, cut_at);
    let samples = sampler.finish();

    // Self-fence before recovery: the last look that saw it on the partitioned node comes
    // before the first look that saw it on the new one.
    let last_old =
        samples.iter().rposition(|s| s.processes.contains(&first)).expect("seen on the first node");
    let first_new = samples.iter().position(|s| s.processes.contains(&second)).expect("seen on the new node");
    assert!(
        last_old < first_new,
        "stopped on {first} (sample {last_old}) before starting on {second} ({first_new})"
    );
    let stopped_after = samples[last_old + 1].at.duration_since(cut_at);
    eprintln!("partitioned {first}: its QEMU gone {stopped_after:?} after the cut; running on {second}");
    assert!(stopped_after < Duration::from_secs(8), "the guest stopped before the 8 s lease could expire");
    assert!(
        cluster.agents.get_mut(&first).unwrap().try_wait().unwrap().is_none(),
        "the partitioned agent still runs"
    );
    let log = std::fs::read_to_string(cluster.server.data_dir().join("agent.log")).unwrap_or_default();
    assert!(log.contains("self-fence"), "the partitioned agent fenced itself");
    assert_timeline(&cluster, &first, &second);

    // Heal: the node renews its lease again, sees the guest bound elsewhere and leaves it.
    let renewed = |cluster: &Cluster| cluster.renew_time(&first);
    let before = renewed(&cluster);
    let sampler = Sampler::start(runs(&cluster, &vmid));
    cluster.proxies[&first].heal();
    wait_until("the healed node renews its lease", || renewed(&cluster) != before);
    let agent_log = cluster.server.data_dir().join("agent.log");
    wait_until("the healed node lets go of the guest", || {
        std::fs::read_to_string(&agent_log).is_ok_and(|l| l.contains("no longer bound here"))
    });
    let rejoined = renewed(&cluster);
    wait_until("and renews its lease once more", || renewed(&cluster) != rejoined);
    let samples = sampler.finish_after(5);
    assert!(samples.iter().all(|s| s.processes == [second.clone()]), "only {second} runs it: {samples:?}");
    assert_eq!(cluster.get("{.status.node}"), second);
}
