//! The agent loop: registers this node (Hypervisor status, a Lease in kube-node-lease), keeps
//! the dir pool's per-node status, and reconciles every VirtualMachine bound to this node
//! (`status.node`) — disks, QEMU process, power state — writing observed status back.
//!
//! Level-based: each guest is reconciled on every change and every few seconds from what
//! the API says and what the host shows; nothing depends on why it was called. What it
//! started is checkpointed under `DATA_DIR/agent/run/<vmid>/`, so a restarted agent adopts
//! running QEMU processes (pid file + QMP) instead of restarting them, and removes guests
//! deleted while it was down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kpve_crds::common::{Condition, ConditionStatus, condition_type, set_condition};
use kpve_crds::{PowerState, VirtualMachine};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::host::{self, HostFacts};
use crate::qemu::argv::{self, Accel, KernelBoot, LaunchPaths, LaunchPlan, ResolvedDisk, ResolvedNic};
use crate::qemu::qmp::Qmp;
use crate::storage::{self, DirPool};

/// Direct kernel boot (appliances, tests): paths on the node, declared as annotations because
/// Proxmox has no option for it and `args` (raw argv) is refused.
pub const KERNEL_ANNOTATION: &str = "kpve.io/kernel";
pub const INITRD_ANNOTATION: &str = "kpve.io/initrd";
pub const CMDLINE_ANNOTATION: &str = "kpve.io/cmdline";
/// Status fields that change while nothing happens (written at most every FIGURES_REFRESH).
const FIGURES: &[&str] = &["mem", "uptime", "cpu", "diskRead", "diskWrite", "netIn", "netOut"];
const FIGURES_REFRESH: Duration = Duration::from_secs(5);

/// Changing this annotation's value declares a restart (applies RestartRequired changes).
pub const RESTART_ANNOTATION: &str = "kpve.io/restart";

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    /// Agent state lives in `data_dir/agent`; the default `local` pool in `data_dir/storage/local`.
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    /// How often every guest is re-observed even without a change.
    pub resync: Duration,
    /// Graceful shutdown (ACPI) wait before QEMU is stopped hard.
    pub shutdown_timeout: Duration,
}

impl AgentConfig {
    pub fn new(node: impl Into<String>, data_dir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            node: node.into(),
            data_dir: data_dir.into(),
            heartbeat: Duration::from_secs(5),
            resync: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(10),
        }
    }

    fn run_root(&self) -> PathBuf {
        self.data_dir.join("agent/run")
    }

    pub fn default_pool_path(&self) -> PathBuf {
        self.data_dir.join("storage/local")
    }

    fn manager(&self) -> String {
        format!("kpve-agent-{}", self.node)
    }
}

/// What the agent started, kept on disk for adoption after a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    uid: String,
    namespace: String,
    name: String,
    vmid: u32,
    /// The argv the process runs with: a different render means RestartRequired.
    argv: Vec<String>,
    started_at: u64,
    restart_token: Option<String>,
    accelerator: String,
    /// Disk id → volume id the process was started with.
    #[serde(default)]
    volumes: BTreeMap<String, String>,
}

struct Agent {
    client: Client,
    config: AgentConfig,
    facts: HostFacts,
    /// Per guest: the last status written without its runtime figures, and when.
    last_status: Mutex<HashMap<String, (Value, Instant)>>,
    /// Per QEMU pid: CPU ticks and when they were read, for CPU usage between two looks.
    cpu_samples: std::sync::Mutex<HashMap<u32, (u64, Instant)>>,
    /// The `local` pool's path (its StoragePool's spec.path, refreshed with each heartbeat).
    pool_path: std::sync::Mutex<PathBuf>,
    guests: Mutex<HashMap<String, Arc<Slot>>>,
}

pub async fn run(client: Client, config: AgentConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(config.run_root())?;
    let agent = Arc::new(Agent {
        client,
        facts: host::facts(),
        pool_path: std::sync::Mutex::new(config.default_pool_path()),
        config,
        last_status: Mutex::new(HashMap::new()),
        cpu_samples: std::sync::Mutex::new(HashMap::new()),
        guests: Mutex::new(HashMap::new()),
    });
    // The server may still be starting: keep trying, the way a kubelet registers.
    let mut delay = Duration::from_millis(100);
    while let Err(e) = agent.register().await {
        tracing::warn!(error = %e, "node registration failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    tokio::spawn(heartbeat(agent.clone()));
    guests(agent).await
}

fn micro_time() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}

fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).expect("in range").to_string()
}

impl Agent {
    fn apply(&self) -> PatchParams {
        PatchParams::apply(&self.config.manager()).force()
    }

    async fn register(&self) -> anyhow::Result<()> {
        let hvs: Api<kpve_crds::Hypervisor> = Api::all(self.client.clone());
        let name = &self.config.node;
        let body = json!({"apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor", "metadata": {"name": name}, "spec": {}});
        hvs.patch(name, &self.apply(), &Patch::Apply(&body)).await?;
        self.heartbeat_once().await
    }

    async fn heartbeat_once(&self) -> anyhow::Result<()> {
        let name = &self.config.node;
        let f = &self.facts;
        let status = json!({
            "apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor",
            "status": {
                "lastHeartbeatTime": now(),
                "capacity": {"cpus": f.cpus, "memoryMiB": f.memory_mib},
                "memoryUsedMiB": (f.memory_mib).saturating_sub(host::meminfo_kib("MemAvailable").unwrap_or(0) / 1024),
                "accelerator": if f.kvm { "kvm" } else { "tcg" },
                "versions": {"qemu": f.qemu_version, "kernel": f.kernel, "kpve": env!("CARGO_PKG_VERSION")},
                "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady",
                                "message": "the node agent is running", "lastTransitionTime": now()}],
            }
        });
        // Keep Ready's transition time stable across heartbeats.
        let hvs: Api<kpve_crds::Hypervisor> = Api::all(self.client.clone());
        let mut status = status;
        let current = hvs.get(name).await.ok();
        if let Some(hv) = &current {
            ensure_bridges(&hv.spec.bridges).await;
        }
        if let Some(hv) = current
            && let Some(c) = hv.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            && c.status == ConditionStatus::True
        {
            status["status"]["conditions"][0]["lastTransitionTime"] = json!(c.last_transition_time);
        }
        hvs.patch_status(name, &self.apply(), &Patch::Apply(&status)).await?;
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), "kube-node-lease");
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_time()}
        });
        leases.patch(name, &self.apply(), &Patch::Apply(&lease)).await?;
        self.pool_status().await;
        Ok(())
    }

    fn pool(&self) -> DirPool {
        DirPool::new("local", self.pool_path.lock().expect("pool path lock").clone())
    }

    async fn pool_status(&self) {
        let pools: Api<kpve_crds::StoragePool> = Api::all(self.client.clone());
        if let Ok(sp) = pools.get("local").await
            && let Some(path) = sp.spec.path
        {
            *self.pool_path.lock().expect("pool path lock") = PathBuf::from(path);
        }
        let pool = self.pool();
        if pool.activate().is_err() {
            return;
        }
        let usage = pool.usage();
        let status = json!({
            "apiVersion": "kpve.io/v1alpha1", "kind": "StoragePool",
            "status": {"nodes": [{"node": self.config.node, "active": true,
                                   "total": usage.total, "used": usage.used, "available": usage.available,
                                   "content": pool.content()}]}
        });
        if let Err(e) = pools.patch_status("local", &self.apply(), &Patch::Apply(&status)).await {
            tracing::debug!(error = %e, "pool status not written");
        }
    }

    fn run_dir(&self, vmid: u32) -> PathBuf {
        self.config.run_root().join(vmid.to_string())
    }
}

async fn heartbeat(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(agent.config.heartbeat);
    loop {
        tick.tick().await;
        if let Err(e) = agent.heartbeat_once().await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

/// The reconcile loop over guests bound to this node.
async fn guests(agent: Arc<Agent>) -> anyhow::Result<()> {
    let vms: Api<VirtualMachine> = Api::all(agent.client.clone());
    let selector = format!("status.node={}", agent.config.node);
    let mut stream = watcher(vms, watcher::Config::default().fields(&selector)).boxed();
    let mut bound: HashMap<String, VirtualMachine> = HashMap::new();
    let mut init: HashMap<String, VirtualMachine> = HashMap::new();
    let mut listed = false;
    let mut tick = tokio::time::interval(agent.config.resync);
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { anyhow::bail!("guest watch ended") };
                match event {
                    Ok(watcher::Event::Apply(vm) | watcher::Event::InitApply(vm)) if !listed => {
                        init.insert(vm.uid().unwrap_or_default(), vm);
                    }
                    Ok(watcher::Event::Apply(vm)) => {
                        let uid = vm.uid().unwrap_or_default();
                        bound.insert(uid, vm.clone());
                        spawn_reconcile(&agent, vm).await;
                    }
                    Ok(watcher::Event::Delete(vm)) => {
                        // Gone from the API (or moved away): release what this node holds.
                        bound.remove(&vm.uid().unwrap_or_default());
                        let vmid = vm.spec.vmid.unwrap_or(0);
                        let agent = agent.clone();
                        tokio::spawn(async move { agent.release(vmid).await });
                    }
                    Ok(watcher::Event::Init) => {
                        listed = false;
                        init.clear();
                    }
                    Ok(watcher::Event::InitDone) => {
                        listed = true;
                        bound = std::mem::take(&mut init);
                        cleanup_orphans(&agent, &bound).await;
                        for vm in bound.values() {
                            spawn_reconcile(&agent, vm.clone()).await;
                        }
                    }
                    Ok(watcher::Event::InitApply(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "guest watch error"),
                }
            }
            _ = tick.tick(), if listed => {
                for vm in bound.values() {
                    spawn_reconcile(&agent, vm.clone()).await;
                }
            }
        }
    }
}

/// Removes run directories (and their processes and volumes) of guests no longer bound here.
async fn cleanup_orphans(agent: &Arc<Agent>, bound: &HashMap<String, VirtualMachine>) {
    let known: HashSet<u32> = bound.values().filter_map(|vm| vm.spec.vmid).collect();
    let Ok(entries) = std::fs::read_dir(agent.config.run_root()) else { return };
    for entry in entries.flatten() {
        let Some(vmid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if !known.contains(&vmid) {
            tracing::info!(vmid, "guest deleted while the agent was away; releasing it");
            agent.release(vmid).await;
        }
    }
}

/// One guest's reconcile slot: at most one reconcile runs per guest; a change arriving
/// meanwhile is parked and reconciled right after (a change parked in the instant the
/// reconcile finishes waits for the next resync).
#[derive(Default)]
struct Slot {
    running: Arc<Mutex<()>>,
    pending: std::sync::Mutex<Option<VirtualMachine>>,
}

async fn spawn_reconcile(agent: &Arc<Agent>, vm: VirtualMachine) {
    let uid = vm.uid().unwrap_or_default();
    let slot = agent.guests.lock().await.entry(uid).or_default().clone();
    let Ok(guard) = slot.running.clone().try_lock_owned() else {
        *slot.pending.lock().expect("pending lock") = Some(vm);
        return;
    };
    let agent = agent.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let mut next = Some(vm);
        while let Some(vm) = next {
            let key = format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any());
            if let Err(e) = agent.reconcile(&vm).await {
                tracing::warn!(guest = %key, error = %e, "reconcile failed");
            }
            next = slot.pending.lock().expect("pending lock").take();
        }
    });
}

/// Why a guest cannot run here; becomes the Stalled condition.
#[derive(Debug)]
struct Stall {
    reason: &'static str,
    message: String,
}

impl Agent {
    async fn reconcile(&self, vm: &VirtualMachine) -> anyhow::Result<()> {
        let Some(vmid) = vm.spec.vmid else { return Ok(()) };
        let run = LaunchPaths::new(self.run_dir(vmid));
        if vm.metadata.deletion_timestamp.is_some() {
            self.stop_guest(vm, vmid, &run).await;
            self.release(vmid).await;
            return self
                .write_status(
                    vm,
                    json!({"phase": "Terminating"}),
                    vec![condition(
                        condition_type::RELEASED,
                        true,
                        "Released",
                        "QEMU stopped and volumes freed on this node",
                    )],
                )
                .await;
        }
        let checkpoint = read_checkpoint(&run.run_dir);
        let pid = self.running_pid(&run, vmid);
        let plan = match self.plan(vm, vmid, &run).await {
            Ok(plan) => plan,
            Err(stall) => {
                let phase = if pid.is_some() { "Running" } else { "Failed" };
                return self.stalled(vm, phase, stall).await;
            }
        };
        let argv = match argv::render(&vm.spec, &plan) {
            Ok(argv) => argv,
            Err(e) => {
                return self
                    .stalled(vm, "Failed", Stall { reason: "InvalidSpec", message: e.to_string() })
                    .await;
            }
        };
        let restart_token = vm.annotations().get(RESTART_ANNOTATION).cloned();
        let desired = vm.spec.power_state;
        let volumes: BTreeMap<String, String> =
            plan.disks.iter().map(|d| (d.id.clone(), volume_id(vm, d, vmid))).collect();
        let mut pid = pid;
        let mut restart_required = false;
        // Every spec change falls in one class: live (the command line is unchanged: nothing
        // to do), needs-restart (a different command line), or needs-recreate (a disk that
        // would land on another volume: kpve does not move or convert volumes behind you).
        let mut recreate = Vec::new();
        if let (Some(_), Some(cp)) = (pid, &checkpoint) {
            for (id, volume) in &volumes {
                if let Some(old) = cp.volumes.get(id).filter(|old| *old != volume) {
                    recreate.push(format!("spec.disks[{id}] would move from {old} to {volume}"));
                }
            }
            let differs = cp.argv != argv;
            if differs && recreate.is_empty() && restart_token.is_some() && cp.restart_token != restart_token
            {
                self.stop_guest(vm, vmid, &run).await;
                pid = None;
            } else {
                restart_required = differs;
            }
        }
        let mut state = match pid {
            Some(_) => self.qmp_status(&run).await.unwrap_or_else(|| "running".into()),
            None => "stopped".into(),
        };
        match (desired, pid) {
            (PowerState::Running | PowerState::Paused, None) => {
                let started = self
                    .start(vm, vmid, &run, argv.clone(), plan.accel, restart_token.clone(), volumes.clone())
                    .await;
                match started {
                    Ok(new_pid) => {
                        pid = Some(new_pid);
                        state = "running".into();
                    }
                    Err(e) => {
                        let message = format!("QEMU did not start: {e}");
                        return self.stalled(vm, "Failed", Stall { reason: "StartFailed", message }).await;
                    }
                }
            }
            (PowerState::Stopped, Some(_)) => {
                self.stop_guest(vm, vmid, &run).await;
                pid = None;
                state = "stopped".into();
            }
            _ => {}
        }
        if pid.is_some() {
            match (desired, state.as_str()) {
                (PowerState::Paused, "running") => {
                    if let Some(mut q) = self.qmp(&run).await {
                        let _ = q.stop().await;
                        state = "paused".into();
                    }
                }
                (PowerState::Running, "paused") => {
                    if let Some(mut q) = self.qmp(&run).await {
                        let _ = q.cont().await;
                        state = "running".into();
                    }
                }
                _ => {}
            }
        }
        let phase = match (pid, state.as_str()) {
            (None, _) => "Stopped",
            (Some(_), "paused") => "Paused",
            (Some(_), "running") => "Running",
            (Some(_), _) => "Starting",
        };
        let ready = matches!(
            (desired, phase),
            (PowerState::Running, "Running")
                | (PowerState::Stopped, "Stopped")
                | (PowerState::Paused, "Paused")
        );
        let checkpoint = read_checkpoint(&run.run_dir);
        let mut figures = json!({
            "phase": phase,
            "vmid": vmid,
            "maxmem": u64::from(vm.spec.memory.size) * 1024 * 1024,
            "accelerator": plan.accel.as_str(),
            "volumes": volumes,
        });
        if let Some(pid) = pid {
            figures["pid"] = json!(pid);
            if let Some(cp) = &checkpoint {
                figures["uptime"] = json!(host::unix_now().saturating_sub(cp.started_at));
                figures["accelerator"] = json!(cp.accelerator);
            }
            figures["mem"] = json!(host::rss_bytes(pid));
            if let Some(cpu) = self.cpu_usage(pid) {
                figures["cpu"] = json!(cpu);
            }
            // Guest traffic seen from the host: what the tap receives, the guest sent.
            let (mut net_in, mut net_out) = (0u64, 0u64);
            for (index, _) in vm.spec.nics.iter().enumerate() {
                let stats = Path::new("/sys/class/net").join(format!("tap{vmid}i{index}")).join("statistics");
                let read = |f: &str| {
                    std::fs::read_to_string(stats.join(f)).ok().and_then(|v| v.trim().parse::<u64>().ok())
                };
                net_out += read("rx_bytes").unwrap_or(0);
                net_in += read("tx_bytes").unwrap_or(0);
            }
            figures["netIn"] = json!(net_in);
            figures["netOut"] = json!(net_out);
            if let Some((read, written)) = self.block_stats(&run).await {
                figures["diskRead"] = json!(read);
                figures["diskWrite"] = json!(written);
            }
        }
        let ready_msg = format!("observed {phase}, declared {desired:?}");
        let mut conditions = vec![
            condition(
                condition_type::READY,
                ready,
                if ready { "AsDeclared" } else { "Converging" },
                &ready_msg,
            ),
            condition(condition_type::RECONCILING, !ready, if ready { "Idle" } else { "Converging" }, ""),
            condition(condition_type::STALLED, false, "Progressing", ""),
        ];
        conditions.push(if !recreate.is_empty() {
            condition(
                condition_type::RESTART_REQUIRED,
                true,
                "NeedsRecreate",
                &format!(
                    "{}; kpve does not move or convert volumes: remove the disk and add it again (or recreate the VM)",
                    recreate.join("; ")
                ),
            )
        } else if restart_required {
            condition(
                condition_type::RESTART_REQUIRED,
                true,
                "ConfigChanged",
                &format!("the running QEMU differs from the spec; set annotation {RESTART_ANNOTATION} to a new value to restart"),
            )
        } else {
            condition(condition_type::RESTART_REQUIRED, false, "InSync", "")
        });
        self.write_status(vm, figures, conditions).await
    }

    /// Reports that the guest cannot converge: Stalled with the reason, not Ready, not
    /// Reconciling (nothing will change until the spec or the node does).
    async fn stalled(&self, vm: &VirtualMachine, phase: &str, stall: Stall) -> anyhow::Result<()> {
        let conditions = vec![
            condition(condition_type::STALLED, true, stall.reason, &stall.message),
            condition(condition_type::READY, false, stall.reason, &stall.message),
            condition(condition_type::RECONCILING, false, stall.reason, ""),
        ];
        self.write_status(vm, json!({ "phase": phase }), conditions).await
    }

    /// Volumes, NICs and kernel: everything besides the spec the command line needs.
    async fn plan(&self, vm: &VirtualMachine, vmid: u32, run: &LaunchPaths) -> Result<LaunchPlan, Stall> {
        let pool = self.pool();
        pool.activate().map_err(|e| Stall { reason: "StorageUnavailable", message: e.to_string() })?;
        let mut disks = Vec::new();
        for (index, disk) in vm.spec.disks.iter().enumerate() {
            let format =
                disk.format.map(|f| format!("{f:?}").to_lowercase()).unwrap_or_else(|| "qcow2".into());
            let volume = match (&disk.volume, &disk.pool, &disk.size) {
                (Some(volume), _, _) => volume.clone(),
                (None, Some(pool_name), Some(_)) => {
                    format!("{pool_name}:{}", DirPool::volume_name(vmid, index, &format))
                }
                (None, _, _) if disk.media.is_some() => continue,
                _ => {
                    return Err(Stall {
                        reason: "InvalidDisk",
                        message: format!("spec.disks[{}]: needs a volume, or a pool and a size", disk.id),
                    });
                }
            };
            let pool_name = volume.split(':').next().unwrap_or("");
            if pool_name != pool.name {
                return Err(Stall {
                    reason: "PoolNotFound",
                    message: format!(
                        "spec.disks[{}]: storage pool {pool_name:?} does not exist on node {}",
                        disk.id, self.config.node
                    ),
                });
            }
            if let Some(size) = &disk.size {
                let bytes = storage::parse_size(size).ok_or_else(|| Stall {
                    reason: "InvalidDisk",
                    message: format!("spec.disks[{}].size: {size:?} is not a size", disk.id),
                })?;
                pool.allocate(&volume, &format, bytes).await.map_err(|e| Stall {
                    reason: "AllocationFailed",
                    message: format!("spec.disks[{}]: {e}", disk.id),
                })?;
            }
            let path =
                pool.path_of(&volume).map_err(|e| Stall { reason: "InvalidDisk", message: e.to_string() })?;
            disks.push(ResolvedDisk { id: disk.id.clone(), path, format, media: None });
        }
        let mut nics = Vec::new();
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            if let Some(bridge) = &nic.bridge
                && !host::bridge_exists(bridge)
            {
                return Err(Stall {
                    reason: "BridgeNotFound",
                    message: format!(
                        "spec.nics[{}].bridge: bridge {bridge:?} does not exist on node {}",
                        nic.id, self.config.node
                    ),
                });
            }
            let mac =
                nic.macaddr.clone().unwrap_or_else(|| generated_mac(&vm.uid().unwrap_or_default(), index));
            nics.push(ResolvedNic { id: nic.id.clone(), tap: format!("tap{vmid}i{index}"), mac });
        }
        let annotations = vm.annotations();
        let kernel = annotations.get(KERNEL_ANNOTATION).map(|k| KernelBoot {
            kernel: PathBuf::from(k),
            initrd: annotations.get(INITRD_ANNOTATION).map(PathBuf::from),
            append: annotations.get(CMDLINE_ANNOTATION).cloned(),
        });
        Ok(LaunchPlan {
            vmid,
            name: vm.spec.name.clone().unwrap_or_else(|| vm.name_any()),
            accel: Accel::choose(vm.spec.kvm, self.facts.kvm),
            disks,
            nics,
            kernel,
            ovmf_code: None,
            vhost_net: Path::new("/dev/vhost-net").exists(),
            log_serial: true,
            paths: run.clone(),
        })
    }

    /// CPU usage since the previous look, as a fraction of one host CPU per vCPU summed
    /// (Proxmox's `cpu`: 1.0 = one core busy).
    fn cpu_usage(&self, pid: u32) -> Option<f64> {
        let ticks = host::cpu_ticks(pid)?;
        let now = Instant::now();
        let mut samples = self.cpu_samples.lock().expect("cpu sample lock");
        let previous = samples.insert(pid, (ticks, now));
        let (before, at) = previous?;
        let seconds = now.duration_since(at).as_secs_f64();
        // Linux reports process times in USER_HZ = 100 ticks per second.
        (seconds > 0.0)
            .then(|| (ticks.saturating_sub(before) as f64 / 100.0 / seconds * 1000.0).round() / 1000.0)
    }

    /// Bytes read and written by all of the guest's drives (QMP query-blockstats).
    async fn block_stats(&self, run: &LaunchPaths) -> Option<(u64, u64)> {
        let mut q = self.qmp(run).await?;
        let stats = q.execute("query-blockstats", None).await.ok()?;
        let (mut read, mut written) = (0, 0);
        for device in stats.as_array()? {
            read += device.pointer("/stats/rd_bytes").and_then(Value::as_u64).unwrap_or(0);
            written += device.pointer("/stats/wr_bytes").and_then(Value::as_u64).unwrap_or(0);
        }
        Some((read, written))
    }

    fn running_pid(&self, run: &LaunchPaths, vmid: u32) -> Option<u32> {
        let pid = host::read_pid(&run.pid_file())?;
        (vmid > 0 && host::process_alive(pid, &run.run_dir.display().to_string())).then_some(pid)
    }

    async fn qmp(&self, run: &LaunchPaths) -> Option<Qmp> {
        Qmp::connect(&run.qmp_socket(), Duration::from_secs(2)).await.ok()
    }

    async fn qmp_status(&self, run: &LaunchPaths) -> Option<String> {
        let mut q = self.qmp(run).await?;
        q.query_status().await.ok()
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        vm: &VirtualMachine,
        vmid: u32,
        run: &LaunchPaths,
        argv: Vec<String>,
        accel: Accel,
        restart_token: Option<String>,
        plan_volumes: BTreeMap<String, String>,
    ) -> anyhow::Result<u32> {
        std::fs::create_dir_all(&run.run_dir)?;
        for stale in [run.qmp_socket(), run.serial_socket(), run.pid_file(), run.serial_log()] {
            let _ = std::fs::remove_file(stale);
        }
        let log = std::fs::File::create(run.run_dir.join("qemu.log"))?;
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.args(&argv)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: signals to the agent (and its death) do not reach QEMU.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        // Reap it while this agent lives; after a restart the adopted process is observed
        // through its pid file instead.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let mut qmp = Qmp::connect(&run.qmp_socket(), Duration::from_secs(10)).await.map_err(|e| {
            let log = std::fs::read_to_string(run.run_dir.join("qemu.log")).unwrap_or_default();
            anyhow::anyhow!("{e}: {}", log.trim())
        })?;
        let status = qmp.query_status().await?;
        drop(qmp);
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            if let Some(bridge) = &nic.bridge {
                let tap = format!("tap{vmid}i{index}");
                let out = tokio::process::Command::new("ip")
                    .args(["link", "set", &tap, "master", bridge, "up"])
                    .output()
                    .await?;
                if !out.status.success() {
                    anyhow::bail!(
                        "attaching {tap} to {bridge}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        let checkpoint = Checkpoint {
            uid: vm.uid().unwrap_or_default(),
            namespace: vm.namespace().unwrap_or_default(),
            name: vm.name_any(),
            vmid,
            argv,
            started_at: host::unix_now(),
            restart_token,
            accelerator: accel.as_str().to_string(),
            volumes: plan_volumes,
        };
        std::fs::write(run.run_dir.join("guest.json"), serde_json::to_vec_pretty(&checkpoint)?)?;
        tracing::info!(vmid, pid, status = %status, "QEMU started");
        Ok(host::read_pid(&run.pid_file()).unwrap_or(pid))
    }

    /// ACPI powerdown, then quit, then SIGKILL; waits for the process to be gone. The
    /// graceful wait is the guest's `startup.down` (Proxmox's), else the agent's default.
    async fn stop_guest(&self, vm: &VirtualMachine, vmid: u32, run: &LaunchPaths) {
        let timeout = vm
            .spec
            .startup
            .as_ref()
            .and_then(|s| s.down)
            .map(|d| Duration::from_secs(d.into()))
            .unwrap_or(self.config.shutdown_timeout);
        self.stop_within(vmid, run, timeout).await
    }

    async fn stop(&self, vmid: u32, run: &LaunchPaths) {
        self.stop_within(vmid, run, self.config.shutdown_timeout).await
    }

    async fn stop_within(&self, vmid: u32, run: &LaunchPaths, timeout: Duration) {
        let Some(pid) = self.running_pid(run, vmid) else { return };
        let needle = run.run_dir.display().to_string();
        let gone = |timeout: Duration| {
            let needle = needle.clone();
            async move {
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    if !host::process_alive(pid, &needle) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        };
        if let Some(mut q) = self.qmp(run).await {
            let _ = q.powerdown().await;
            drop(q);
            if gone(timeout).await {
                return;
            }
            if let Some(mut q) = self.qmp(run).await {
                let _ = q.quit().await;
            }
            if gone(Duration::from_secs(5)).await {
                return;
            }
        }
        let _ = tokio::process::Command::new("kill").args(["-9", &pid.to_string()]).status().await;
        gone(Duration::from_secs(5)).await;
    }

    /// Stops the guest's process, frees its volumes and forgets it.
    async fn release(&self, vmid: u32) {
        if vmid == 0 {
            return;
        }
        let run = LaunchPaths::new(self.run_dir(vmid));
        self.stop(vmid, &run).await;
        if let Err(e) = self.pool().free_guest(vmid) {
            tracing::warn!(vmid, error = %e, "freeing volumes failed");
        }
        let _ = std::fs::remove_dir_all(&run.run_dir);
    }

    /// Server-side applies the agent's part of the status, only when it changed.
    async fn write_status(
        &self,
        vm: &VirtualMachine,
        figures: Value,
        conditions: Vec<Condition>,
    ) -> anyhow::Result<()> {
        let now = now();
        let existing = vm.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        let mut merged = Vec::new();
        for mut c in conditions {
            c.observed_generation = vm.metadata.generation;
            let mut list = existing.clone();
            set_condition(&mut list, c.clone(), &now);
            merged.push(list.into_iter().find(|x| x.type_ == c.type_).expect("just set"));
        }
        let mut status = figures;
        status["node"] = json!(self.config.node);
        status["observedGeneration"] = json!(vm.metadata.generation);
        status["conditions"] = serde_json::to_value(merged)?;
        let body = json!({"apiVersion": "kpve.io/v1alpha1", "kind": "VirtualMachine", "status": status});
        let uid = vm.uid().unwrap_or_default();
        // Runtime figures move all the time: a change of anything else is written at once,
        // the figures alone at most every FIGURES_REFRESH.
        let mut comparable = body.clone();
        if let Some(s) = comparable["status"].as_object_mut() {
            for figure in FIGURES {
                s.remove(*figure);
            }
        }
        {
            let last = self.last_status.lock().await;
            if let Some((previous, written_at)) = last.get(&uid)
                && *previous == comparable
                && (written_at.elapsed() < FIGURES_REFRESH || body["status"].get("pid").is_none())
            {
                return Ok(());
            }
        }
        let api: Api<VirtualMachine> =
            Api::namespaced(self.client.clone(), &vm.namespace().unwrap_or_default());
        api.patch_status(&vm.name_any(), &self.apply(), &Patch::Apply(&body)).await?;
        self.last_status.lock().await.insert(uid, (comparable, Instant::now()));
        Ok(())
    }
}

/// Creates the Linux bridges this node's Hypervisor declares (Proxmox's vmbrN) that do not
/// exist yet. Existing bridges and anything undeclared are left alone.
async fn ensure_bridges(bridges: &[kpve_crds::Bridge]) {
    for bridge in bridges {
        if host::bridge_exists(&bridge.name) {
            continue;
        }
        let mut steps: Vec<Vec<String>> = vec![vec![
            "link".into(),
            "add".into(),
            "name".into(),
            bridge.name.clone(),
            "type".into(),
            "bridge".into(),
        ]];
        if bridge.vlan_aware {
            steps[0].extend(["vlan_filtering".into(), "1".into()]);
        }
        if let Some(mtu) = bridge.mtu {
            steps.push(vec!["link".into(), "set".into(), bridge.name.clone(), "mtu".into(), mtu.to_string()]);
        }
        if let Some(address) = &bridge.address {
            steps.push(vec!["addr".into(), "add".into(), address.clone(), "dev".into(), bridge.name.clone()]);
        }
        for port in &bridge.ports {
            steps.push(vec!["link".into(), "set".into(), port.clone(), "master".into(), bridge.name.clone()]);
        }
        steps.push(vec!["link".into(), "set".into(), bridge.name.clone(), "up".into()]);
        for args in steps {
            match tokio::process::Command::new("ip").args(&args).output().await {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    tracing::warn!(bridge = %bridge.name, step = ?args, error = %String::from_utf8_lossy(&out.stderr).trim(), "bridge setup failed");
                    break;
                }
                Err(e) => {
                    tracing::warn!(bridge = %bridge.name, error = %e, "ip not runnable");
                    break;
                }
            }
        }
        tracing::info!(bridge = %bridge.name, "bridge created");
    }
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { ConditionStatus::True } else { ConditionStatus::False },
        reason: reason.into(),
        message: message.into(),
        last_transition_time: None,
        observed_generation: None,
    }
}

fn read_checkpoint(dir: &Path) -> Option<Checkpoint> {
    serde_json::from_slice(&std::fs::read(dir.join("guest.json")).ok()?).ok()
}

fn volume_id(vm: &VirtualMachine, disk: &ResolvedDisk, vmid: u32) -> String {
    let spec = vm.spec.disks.iter().find(|d| d.id == disk.id);
    match spec.and_then(|d| d.volume.clone()) {
        Some(v) => v,
        None => {
            let index = vm.spec.disks.iter().position(|d| d.id == disk.id).unwrap_or(0);
            format!(
                "{}:{}",
                spec.and_then(|d| d.pool.clone()).unwrap_or_default(),
                DirPool::volume_name(vmid, index, &disk.format)
            )
        }
    }
}

/// A stable MAC in Proxmox's OUI (BC:24:11) derived from the guest's uid and NIC index.
fn generated_mac(uid: &str, index: usize) -> String {
    let mut h: u32 = 2166136261;
    for b in uid.bytes().chain(std::iter::once(index as u8)) {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    format!("BC:24:11:{:02X}:{:02X}:{:02X}", (h >> 16) as u8, (h >> 8) as u8, h as u8)
}
