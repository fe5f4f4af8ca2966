//! The agent loop: registers this node (Hypervisor status, a Lease in kube-node-lease), keeps
//! the dir pool's per-node status, and reconciles every guest bound to this node
//! (`status.node`) — VirtualMachines through QEMU ([`vm`]), LinuxContainers through LXC
//! ([`ct`]) — volumes, process, power state, writing observed status back.
//!
//! Level-based: each guest is reconciled on every change and every few seconds from what
//! the API says and what the host shows; nothing depends on why it was called. What it
//! started is checkpointed under `DATA_DIR/agent/run/<vmid>/`, so a restarted agent adopts
//! running guests (QEMU through its pid file and QMP, containers through lxc's own state)
//! instead of restarting them, and removes guests deleted while it was down.
//!
//! The two kinds share everything but the driver: a [`Runtime`] says how a guest is
//! prepared, started, observed, paused and stopped.

mod ct;
mod firewall;
mod migrate;
mod migrate_ct;
mod vm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kpve_crds::common::{Condition, ConditionStatus, GuestObject, GuestSpec, condition_type, set_condition};
use kpve_crds::{HaState, PowerState};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::fence;
use crate::host::{self, HostFacts};
use crate::storage::DirPool;
use kpve_ha::crm::LrmReport;
use kpve_ha::lrm::{Fencing, GuestView, Lrm, Step};

/// Direct kernel boot (appliances, tests): paths on the node, declared as annotations because
/// Proxmox has no option for it and `args` (raw argv) is refused.
pub const KERNEL_ANNOTATION: &str = "kpve.io/kernel";
pub const INITRD_ANNOTATION: &str = "kpve.io/initrd";
pub const CMDLINE_ANNOTATION: &str = "kpve.io/cmdline";
/// Status fields that change while nothing happens (written at most every FIGURES_REFRESH).
const FIGURES: &[&str] = &["mem", "uptime", "cpu", "diskRead", "diskWrite", "netIn", "netOut"];
const FIGURES_REFRESH: Duration = Duration::from_secs(5);

/// How long a volume removal request stays valid (the API's task gives up after 60 s).
const REMOVAL_VALIDITY: u64 = 120;

/// A new value of this annotation restarts the guest (a reboot), applying RestartRequired changes.
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
    /// HA timing: lease duration and renewal, self-fence deadline.
    pub ha: kpve_ha::Profile,
    /// Where this node receives migrating guests (QEMU's migration and NBD ports).
    pub migration_address: std::net::IpAddr,
}

impl AgentConfig {
    pub fn new(node: impl Into<String>, data_dir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            node: node.into(),
            data_dir: data_dir.into(),
            heartbeat: Duration::from_secs(5),
            resync: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(10),
            ha: kpve_ha::Profile::DEFAULT,
            migration_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        }
    }

    /// Where the agent keeps its state (run directories, lease record, watchdog).
    pub fn agent_dir(&self) -> PathBuf {
        self.data_dir.join("agent")
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
pub(crate) struct Checkpoint {
    uid: String,
    namespace: String,
    name: String,
    vmid: u32,
    #[serde(default = "qemu_engine")]
    engine: String,
    /// The launch definition the guest runs with (QEMU argv, LXC config lines): a
    /// different render means RestartRequired.
    #[serde(alias = "argv")]
    launch: Vec<String>,
    started_at: u64,
    restart_token: Option<String>,
    #[serde(default)]
    accelerator: Option<String>,
    /// Volume slot → volume id the guest was started with.
    #[serde(default)]
    volumes: BTreeMap<String, String>,
}

fn qemu_engine() -> String {
    "qemu".into()
}

pub(crate) struct Agent {
    client: Client,
    config: AgentConfig,
    pub(crate) facts: HostFacts,
    /// Per guest: the last status written without its runtime figures, and when.
    last_status: Mutex<HashMap<String, (Value, Instant)>>,
    /// Per (vmid, pid): cumulative CPU seconds and when they were read, for CPU usage
    /// between two looks.
    cpu_samples: std::sync::Mutex<HashMap<(u32, u32), (f64, Instant)>>,
    /// The `local` pool's path (its StoragePool's spec.path, refreshed with each heartbeat).
    pool_path: std::sync::Mutex<PathBuf>,
    guests: Mutex<HashMap<String, Arc<Slot>>>,
    /// Virtual sizes of volumes as last seen or set, so a reconcile asks `qemu-img` only
    /// when a declared size differs.
    pub(crate) volume_sizes: std::sync::Mutex<HashMap<PathBuf, u64>>,
    /// Internal snapshots of qcow2 images as last read or made, so a reconcile runs
    /// `qemu-img` only to change them.
    pub(crate) snapshot_cache: std::sync::Mutex<HashMap<PathBuf, Vec<String>>>,
    /// The HA local resource manager: lease held or not, self-fence.
    lrm: std::sync::Mutex<Lrm>,
    /// This run of the agent (its start, Unix ms): see `LrmReport::epoch`.
    epoch: u64,
    /// HA guests stopped by the last self-fence (starting them again is no restart).
    fenced: std::sync::Mutex<HashSet<u32>>,
    /// Per guest uid: the LRM's latest report, written with every status.
    lrm_reports: std::sync::Mutex<HashMap<String, LrmReport>>,
    /// Whether the `local` pool is shared storage (its StoragePool's spec.shared): migrations
    /// then copy no disks.
    pool_shared: std::sync::Mutex<Option<bool>>,
    /// Per guest uid: migrations this node prepared to receive.
    incoming: std::sync::Mutex<HashMap<String, migrate::IncomingRun>>,
    /// Per guest uid: the id of the last migration this node failed to send.
    failed_sends: std::sync::Mutex<HashMap<String, String>>,
    /// Per container uid: the migration (id) whose volumes this node is receiving.
    ct_receivers: std::sync::Mutex<HashMap<String, (String, crate::lxc::transfer::Receiver)>>,
}

/// A start that receives a migrating guest instead of booting it.
pub(crate) struct Incoming {
    /// When the guest started on its first node (Unix seconds): its uptime continues.
    pub started_at: u64,
}

pub async fn run(client: Client, config: AgentConfig) -> anyhow::Result<()> {
    config.ha.check().map_err(|e| anyhow::anyhow!("unsafe HA timing: {e}"))?;
    std::fs::create_dir_all(config.run_root())?;
    let agent_dir = config.agent_dir();
    // A restarted agent carries on from the last renewal its predecessor recorded.
    // A record made under a shorter deadline keeps it: count as if renewed that much earlier.
    let last_ok = fence::read_lease_ok(&agent_dir).map(|(ok, fence)| {
        if fence < config.ha.fence { ok.saturating_sub(config.ha.fence - fence) } else { ok }
    });
    let lrm = Lrm::new(config.ha, last_ok);
    fence::ensure_watchdog(&agent_dir, config.ha.fence)?;
    let agent = Arc::new(Agent {
        lrm: std::sync::Mutex::new(lrm),
        epoch: fence::unix_ms(),
        fenced: std::sync::Mutex::default(),
        lrm_reports: std::sync::Mutex::default(),
        pool_shared: std::sync::Mutex::new(None),
        incoming: std::sync::Mutex::default(),
        failed_sends: std::sync::Mutex::default(),
        ct_receivers: std::sync::Mutex::default(),
        client,
        facts: host::facts(),
        pool_path: std::sync::Mutex::new(config.default_pool_path()),
        config,
        last_status: Mutex::new(HashMap::new()),
        cpu_samples: std::sync::Mutex::new(HashMap::new()),
        guests: Mutex::new(HashMap::new()),
        volume_sizes: std::sync::Mutex::new(HashMap::new()),
        snapshot_cache: std::sync::Mutex::new(HashMap::new()),
    });
    // The server may still be starting: keep trying, the way a kubelet registers.
    let mut delay = Duration::from_millis(100);
    while let Err(e) = agent.register().await {
        tracing::warn!(error = %e, "node registration failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    tokio::spawn(heartbeat(agent.clone()));
    tokio::spawn(renew_lease(agent.clone()));
    tokio::spawn(self_fence(agent.clone()));
    tokio::try_join!(
        guests::<vm::Qemu>(agent.clone()),
        guests::<ct::Lxc>(agent.clone()),
        migrate::incoming(agent.clone()),
        migrate_ct::incoming(agent.clone()),
        firewall::run(agent)
    )?;
    Ok(())
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
        self.renew_lease_once().await?;
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
        self.pool_status().await;
        if let Err(e) = fence::ensure_watchdog(&self.config.agent_dir(), self.config.ha.fence) {
            tracing::warn!(error = %e, "cannot start the fence watchdog");
        }
        Ok(())
    }

    /// Renews this node's Lease once; on success the LRM (and the watchdog) count the time
    /// the renewal was sent.
    async fn renew_lease_once(&self) -> anyhow::Result<()> {
        let name = &self.config.node;
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), "kube-node-lease");
        let sent_at = fence::boot_ms();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": self.config.ha.lease.div_ceil(1000),
                "renewTime": micro_time(),
            }
        });
        leases.patch(name, &self.apply(), &Patch::Apply(&lease)).await?;
        let mut lrm = self.lrm.lock().expect("lrm lock");
        lrm.renewed(sent_at);
        if let Some(ok) = lrm.last_ok() {
            fence::write_lease_ok(&self.config.agent_dir(), ok, self.config.ha.fence)?;
        }
        Ok(())
    }

    /// Whether this node holds its lease now: HA guests may start.
    fn holds_lease(&self) -> bool {
        self.lrm.lock().expect("lrm lock").holds_lease(fence::boot_ms())
    }

    /// Whether the pool's volumes are the same files on every node (None: its StoragePool has
    /// not been read yet).
    pub(crate) fn pool_shared(&self) -> Option<bool> {
        *self.pool_shared.lock().expect("pool shared lock")
    }

    pub(crate) fn pool(&self) -> DirPool {
        DirPool::new("local", self.pool_path.lock().expect("pool path lock").clone())
    }

    async fn pool_status(&self) {
        let pools: Api<kpve_crds::StoragePool> = Api::all(self.client.clone());
        let declared = pools.get("local").await.ok();
        if let Some(path) = declared.as_ref().and_then(|sp| sp.spec.path.clone()) {
            *self.pool_path.lock().expect("pool path lock") = PathBuf::from(path);
        }
        if let Some(sp) = &declared {
            *self.pool_shared.lock().expect("pool shared lock") = Some(sp.spec.shared);
        }
        let pool = self.pool();
        if pool.activate().is_err() {
            return;
        }
        for removal in declared.iter().flat_map(|sp| &sp.spec.removals) {
            if removal.node == self.config.node {
                self.remove_volume(&pool, removal);
            }
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

    /// Deletes a volume asked to be removed, unless it was written after the request or a
    /// VM running here uses it.
    fn remove_volume(&self, pool: &DirPool, removal: &kpve_crds::VolumeRemoval) {
        let Ok(path) = pool.path_of(&removal.volume) else { return };
        // A request the API stopped waiting for (its task ended after a minute) is void: the
        // volume may be in use again by the time a guest lets go of it.
        if host::unix_now().saturating_sub(removal.requested) > REMOVAL_VALIDITY {
            return;
        }
        let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else { return };
        let modified =
            modified.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(u64::MAX);
        if modified > removal.requested {
            return;
        }
        let in_use = std::fs::read_dir(self.config.run_root())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|d| {
                // A QEMU that runs (a stopped guest's volumes are the API's to judge).
                let run = d.path();
                host::read_pid(&run.join("qemu.pid"))
                    .is_some_and(|pid| host::process_alive(pid, &format!("{}/", run.display())))
            })
            .filter_map(|d| read_checkpoint(&d.path()))
            .any(|cp| cp.volumes.values().any(|v| *v == removal.volume));
        if in_use {
            tracing::warn!(volume = %removal.volume, "not removing a volume a guest uses");
            return;
        }
        self.forget_image(&path);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(volume = %removal.volume, "volume removed"),
            Err(e) => tracing::warn!(volume = %removal.volume, error = %e, "removing the volume failed"),
        }
    }

    /// Forgets what this agent knows about an image (its snapshots, its size): it was made,
    /// replaced or removed, or a command on it failed.
    pub(crate) fn forget_image(&self, path: &Path) {
        self.snapshot_cache.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
        self.volume_sizes.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
    }

    /// Forgets what this agent knows about every image of guest `vmid` in the pool.
    pub(crate) fn forget_guest_images(&self, vmid: u32) {
        let images = self.pool().path.join("images").join(vmid.to_string());
        self.snapshot_cache.lock().unwrap_or_else(|e| e.into_inner()).retain(|p, _| !p.starts_with(&images));
        self.volume_sizes.lock().unwrap_or_else(|e| e.into_inner()).retain(|p, _| !p.starts_with(&images));
    }

    pub(crate) fn remember_snapshots(&self, path: &Path, list: &[String]) {
        self.snapshot_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), list.to_vec());
    }

    pub(crate) fn run_dir(&self, vmid: u32) -> PathBuf {
        self.config.run_root().join(vmid.to_string())
    }

    pub(crate) fn run_root(&self) -> PathBuf {
        self.config.run_root()
    }

    pub(crate) fn node(&self) -> &str {
        &self.config.node
    }

    /// A NIC's bridge must exist here (kpve creates declared bridges, never guesses one).
    pub(crate) fn require_bridge(&self, nic: &str, bridge: Option<&str>) -> Result<(), Stall> {
        match bridge {
            Some(bridge) if !host::bridge_exists(bridge) => Err(Stall::new(
                "BridgeNotFound",
                format!(
                    "spec.nics[{nic}].bridge: bridge {bridge:?} does not exist on node {}",
                    self.config.node
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Renews the node Lease every `ha.renew`, each attempt bounded so a hung request cannot
/// delay the next.
async fn renew_lease(agent: Arc<Agent>) {
    let every = Duration::from_millis(agent.config.ha.renew);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(every * 2, agent.renew_lease_once()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
            Err(_) => tracing::warn!("lease renewal timed out"),
        }
    }
}

/// The LRM's deadline: once the lease has not been renewed for `ha.fence`, every HA guest on
/// this node is killed, and none starts until a renewal goes through again.
async fn self_fence(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = fence::boot_ms();
        let (fencing, last_ok) = {
            let mut lrm = agent.lrm.lock().expect("lrm lock");
            (lrm.tick(now), lrm.last_ok())
        };
        match fencing {
            Fencing::SelfFence => {
                let run_root = agent.config.run_root();
                let killed = tokio::task::spawn_blocking(move || fence::kill_ha_guests(&run_root))
                    .await
                    .unwrap_or_default();
                let silent =
                    last_ok.map(|t| format!("{} ms", now.saturating_sub(t))).unwrap_or_else(|| "ever".into());
                tracing::warn!(?killed, "self-fence: no lease renewal for {silent}; HA guests stopped");
                agent.fenced.lock().expect("fenced lock").extend(killed);
            }
            Fencing::Rejoined => tracing::info!("lease renewed again: HA guests may start"),
            Fencing::Steady => {}
        }
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

/// What differs between guest kinds: how a guest is prepared on the host, started, observed,
/// paused and stopped. The reconcile loop, status writing, checkpoints, restart
/// classification and release are shared ([`Agent::reconcile`]).
pub(crate) trait Runtime: Send + Sync + 'static {
    type Guest: GuestObject;
    /// Host resources resolved for one start (volumes, NICs), kept until the start.
    type Plan: Send + Sync;
    /// The resource kind, for status writes.
    const KIND: &'static str;
    /// Recorded in the run directory, so each kind's loop only touches its own guests.
    const ENGINE: &'static str;
    /// How messages name the running guest ("QEMU", "the container").
    const PROCESS: &'static str;
    /// Whether a running guest of this kind moves live ([`Runtime::migrate_send`]); a kind
    /// that does not is stopped for the move (a container's restart migration).
    const LIVE_MIGRATION: bool = false;

    /// Static figures written with every status (`maxmem`, …).
    fn static_figures(guest: &Self::Guest) -> Value;

    /// Resolves and allocates what the guest needs here and renders its launch definition.
    fn prepare(
        agent: &Agent,
        guest: &Self::Guest,
        vmid: u32,
        run: &Path,
    ) -> impl Future<Output = Result<Prepared<Self::Plan>, Stall>> + Send;
    /// The guest's process as the host shows it now, if it runs.
    fn observe(agent: &Agent, vmid: u32, run: &Path) -> impl Future<Output = Option<Observed>> + Send;
    /// Starts the guest; returns once it runs (or failed, with the host's words). `extra`
    /// goes on the command line beside the launch definition (a migration target's
    /// `-incoming`).
    fn start(
        agent: &Agent,
        guest: &Self::Guest,
        vmid: u32,
        run: &Path,
        prepared: &Prepared<Self::Plan>,
        extra: &[String],
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Graceful shutdown for up to `timeout`, then a hard stop; returns once it is gone.
    fn stop(agent: &Agent, vmid: u32, run: &Path, timeout: Duration) -> impl Future<Output = ()> + Send;
    /// Freezes or thaws the running guest; whether it worked.
    fn set_paused(agent: &Agent, vmid: u32, run: &Path, paused: bool) -> impl Future<Output = bool> + Send;
    /// Sends the guest to the target of migration `m`, which said where it waits (`m.uri`,
    /// `m.nbd` for the local `m.disks`): QEMU's live migration, or a container's volumes
    /// copied after it stopped. The source's copy of the guest does not run afterwards.
    fn migrate_send(
        agent: &Agent,
        guest: &Self::Guest,
        vmid: u32,
        run: &Path,
        m: &kpve_crds::Migration,
    ) -> impl Future<Output = Result<crate::qemu::migration::Outcome, String>> + Send;
    /// Runtime figures (mem, cpu, disk and net counters) of the running guest into `figures`.
    fn figures(
        agent: &Agent,
        guest: &Self::Guest,
        vmid: u32,
        run: &Path,
        pid: u32,
        figures: &mut Value,
    ) -> impl Future<Output = ()> + Send;
}

/// A guest ready to start: what it would run with, and on which volumes.
pub(crate) struct Prepared<P> {
    /// The launch definition (QEMU argv, LXC config lines): a different one for a running
    /// guest means RestartRequired.
    pub launch: Vec<String>,
    /// Volume slot (`scsi0`, `rootfs`, `mp0`) → volume id.
    pub volumes: BTreeMap<String, String>,
    /// QEMU's accelerator; none for containers.
    pub accelerator: Option<&'static str>,
    /// Status fields the runtime reports beside the shared ones (snapshots, rollback).
    pub status: Value,
    pub plan: P,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    Running,
    Paused,
    /// Alive but not (yet) running guest code.
    Starting,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Observed {
    pub pid: u32,
    pub state: RunState,
}

/// The reconcile loop over guests of one kind bound to this node.
async fn guests<R: Runtime>(agent: Arc<Agent>) -> anyhow::Result<()> {
    let api: Api<R::Guest> = Api::all(agent.client.clone());
    let selector = format!("status.node={}", agent.config.node);
    let mut stream = watcher(api, watcher::Config::default().fields(&selector)).boxed();
    let mut bound: HashMap<String, R::Guest> = HashMap::new();
    let mut init: HashMap<String, R::Guest> = HashMap::new();
    let mut listed = false;
    let mut tick = tokio::time::interval(agent.config.resync);
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { anyhow::bail!("{} watch ended", R::KIND) };
                match event {
                    Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g)) if !listed => {
                        init.insert(g.uid().unwrap_or_default(), g);
                    }
                    Ok(watcher::Event::Apply(g)) => {
                        bound.insert(g.uid().unwrap_or_default(), g.clone());
                        spawn_reconcile::<R>(&agent, g).await;
                    }
                    Ok(watcher::Event::Delete(g)) => {
                        // Moved away (an HA recovery or migration), or deleted after this node
                        // released it (the finalizer waits for that): stop what still runs
                        // here and forget it, but keep its volumes — they may be on shared
                        // storage, in use by the node the guest runs on now.
                        bound.remove(&g.uid().unwrap_or_default());
                        let vmid = g.guest_spec().vmid().unwrap_or(0);
                        let uid = g.uid().unwrap_or_default();
                        let agent = agent.clone();
                        tokio::spawn(async move { agent.let_go::<R>(vmid, &uid).await });
                    }
                    Ok(watcher::Event::Init) => {
                        listed = false;
                        init.clear();
                    }
                    Ok(watcher::Event::InitDone) => {
                        listed = true;
                        bound = std::mem::take(&mut init);
                        cleanup_orphans::<R>(&agent, &bound).await;
                        for g in bound.values() {
                            spawn_reconcile::<R>(&agent, g.clone()).await;
                        }
                    }
                    Ok(watcher::Event::InitApply(_)) => {}
                    Err(e) => tracing::warn!(kind = R::KIND, error = %e, "guest watch error"),
                }
            }
            _ = tick.tick(), if listed => {
                for g in bound.values() {
                    spawn_reconcile::<R>(&agent, g.clone()).await;
                }
            }
        }
    }
}

/// The engine a run directory belongs to (directories from before engines were recorded
/// are QEMU's).
fn engine_of(run_dir: &Path) -> String {
    std::fs::read_to_string(run_dir.join("engine"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "qemu".into())
}

/// Removes run directories (and their processes and volumes) of this kind's guests no
/// longer bound here.
async fn cleanup_orphans<R: Runtime>(agent: &Arc<Agent>, bound: &HashMap<String, R::Guest>) {
    let known: HashSet<u32> = bound.values().filter_map(|g| g.guest_spec().vmid()).collect();
    let Ok(entries) = std::fs::read_dir(agent.config.run_root()) else { return };
    for entry in entries.flatten() {
        let Some(vmid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if !known.contains(&vmid) && engine_of(&entry.path()) == R::ENGINE && !agent.receiving(vmid) {
            match agent.moved_elsewhere::<R>(&entry.path()).await {
                Some(true) => {
                    tracing::info!(
                        vmid,
                        kind = R::KIND,
                        "guest moved to another node while the agent was away"
                    );
                    let uid = read_checkpoint(&entry.path()).map(|c| c.uid).unwrap_or_default();
                    agent.let_go::<R>(vmid, &uid).await;
                }
                Some(false) => {
                    tracing::info!(
                        vmid,
                        kind = R::KIND,
                        "guest deleted while the agent was away; releasing it"
                    );
                    agent.release::<R>(vmid, None).await;
                }
                None => tracing::warn!(
                    vmid,
                    kind = R::KIND,
                    "cannot tell whether the guest moved or was deleted; left alone"
                ),
            }
        }
    }
}

/// One guest's reconcile slot: at most one reconcile runs per guest; a change arriving
/// meanwhile is parked and reconciled right after (a change parked in the instant the
/// reconcile finishes waits for the next resync).
struct Slot {
    running: Arc<Mutex<()>>,
    pending: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

async fn spawn_reconcile<R: Runtime>(agent: &Arc<Agent>, guest: R::Guest) {
    let uid = guest.uid().unwrap_or_default();
    let slot = agent
        .guests
        .lock()
        .await
        .entry(uid)
        .or_insert_with(|| Arc::new(Slot { running: Arc::default(), pending: std::sync::Mutex::new(None) }))
        .clone();
    let Ok(guard) = slot.running.clone().try_lock_owned() else {
        *slot.pending.lock().expect("pending lock") = Some(Box::new(guest));
        return;
    };
    let agent = agent.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let mut next = Some(guest);
        while let Some(guest) = next {
            let key = format!("{}/{}", guest.namespace().unwrap_or_default(), guest.name_any());
            if let Err(e) = agent.reconcile::<R>(&guest).await {
                tracing::warn!(kind = R::KIND, guest = %key, error = %e, "reconcile failed");
            }
            next = slot
                .pending
                .lock()
                .expect("pending lock")
                .take()
                .and_then(|g| g.downcast::<R::Guest>().ok())
                .map(|g| *g);
        }
    });
}

/// Why a guest cannot run here; becomes the Stalled condition.
#[derive(Debug)]
pub(crate) struct Stall {
    pub reason: &'static str,
    pub message: String,
}

impl Stall {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Stall {
        Stall { reason, message: message.into() }
    }
}

impl Agent {
    async fn reconcile<R: Runtime>(&self, guest: &R::Guest) -> anyhow::Result<()> {
        let spec = guest.guest_spec();
        let Some(vmid) = spec.vmid() else { return Ok(()) };
        let run = self.run_dir(vmid);
        if guest.meta().deletion_timestamp.is_some() {
            R::stop(self, vmid, &run, self.shutdown_timeout(spec)).await;
            self.release::<R>(vmid, guest.uid().as_deref()).await;
            let message = format!("{} stopped and volumes freed on this node", R::PROCESS);
            return self
                .write_status::<R>(
                    guest,
                    json!({"phase": "Terminating"}),
                    vec![condition(condition_type::RELEASED, true, "Released", &message)],
                )
                .await;
        }
        // A live migration under way: the source's part, and nothing else.
        if let Some(done) = self.migration_hold::<R>(guest, vmid, &run).await {
            return done;
        }
        let checkpoint = read_checkpoint(&run);
        let observed = R::observe(self, vmid, &run).await;
        let prepared = match R::prepare(self, guest, vmid, &run).await {
            Ok(prepared) => prepared,
            Err(stall) => {
                // Whatever cannot be prepared, a declared stop still stops.
                if spec.power_state() == PowerState::Stopped && observed.is_some() {
                    R::stop(self, vmid, &run, self.shutdown_timeout(spec)).await;
                }
                let running = R::observe(self, vmid, &run).await.is_some();
                let phase = if running { "Running" } else { "Failed" };
                return self.stalled::<R>(guest, phase, stall).await;
            }
        };
        // Preparing may have stopped the guest (a rollback).
        let observed = if observed.is_some() { R::observe(self, vmid, &run).await } else { observed };
        let restart_token =
            guest.meta().annotations.as_ref().and_then(|a| a.get(RESTART_ANNOTATION)).cloned();
        // HA guests: the LRM decides whether they run here (their HA state, the lease,
        // restart limits, migrations the CRM asked for).
        let lrm_step = self.lrm_step::<R>(guest, vmid, &run, observed.is_some()).await;
        // An HA move of a running VM goes live, a container's moves by restart migration (its
        // volumes copied); only a failed migration stops the guest for an offline move.
        if let Some(Step::StopFor(id)) = lrm_step
            && (observed.is_some() || !R::LIVE_MIGRATION)
            && let Some(target) = guest
                .guest_status()
                .and_then(|s| s.ha.as_ref())
                .and_then(|h| h.migrate.as_ref())
                .filter(|m| m.id == id)
                .map(|m| m.target.clone())
        {
            let live = format!("ha-{id}");
            match guest.guest_status().and_then(|s| s.migration.as_ref()).filter(|m| m.id == live) {
                None => {
                    self.order_migration::<R>(guest, &live, &target, "ha").await;
                    return Ok(());
                }
                Some(m) if m.phase != kpve_crds::MigrationPhase::Failed => return Ok(()),
                Some(_) => {}
            }
        }
        let run_as =
            if spec.power_state() == PowerState::Paused { PowerState::Paused } else { PowerState::Running };
        let desired = match lrm_step {
            None => spec.power_state(),
            Some(Step::Start | Step::Restart) => run_as,
            Some(Step::Nothing) if observed.is_some() => run_as,
            // Anything else (a stop, a give-up, no lease, not confirmed bound here): not running.
            Some(_) => PowerState::Stopped,
        };
        let mut observed = observed;
        let mut restart_required = false;
        // Every spec change falls in one class: live (the launch definition is unchanged:
        // nothing to do), needs-restart (a different one), or needs-recreate (a volume that
        // would land elsewhere: kpve does not move or convert volumes behind you).
        let mut recreate = Vec::new();
        if let (Some(_), Some(cp)) = (observed, &checkpoint) {
            for (id, volume) in &prepared.volumes {
                if let Some(old) = cp.volumes.get(id).filter(|old| *old != volume) {
                    recreate.push(format!("{id} would move from {old} to {volume}"));
                }
            }
            let differs = cp.launch != prepared.launch;
            // A new value of the restart annotation is a reboot, applying whatever changed.
            if recreate.is_empty() && restart_token.is_some() && cp.restart_token != restart_token {
                R::stop(self, vmid, &run, self.shutdown_timeout(spec)).await;
                observed = None;
            } else {
                restart_required = differs;
            }
        }
        match (desired, observed) {
            (PowerState::Running | PowerState::Paused, None) => {
                if let Err(e) =
                    self.start::<R>(guest, vmid, &run, &prepared, restart_token.clone(), None).await
                {
                    let message = format!("{} did not start: {e:#}", R::PROCESS);
                    return self.stalled::<R>(guest, "Failed", Stall::new("StartFailed", message)).await;
                }
                observed = R::observe(self, vmid, &run).await;
            }
            (PowerState::Stopped, Some(_)) => {
                R::stop(self, vmid, &run, self.shutdown_timeout(spec)).await;
                observed = R::observe(self, vmid, &run).await;
                if let (Some(Step::StopFor(id)), None) = (lrm_step, observed) {
                    // Stopped for the CRM's migration: say so, and it moves the guest.
                    if let Some(report) = self
                        .lrm_reports
                        .lock()
                        .expect("lrm reports lock")
                        .get_mut(&guest.uid().unwrap_or_default())
                    {
                        report.stopped_for = Some(id);
                    }
                }
            }
            _ => {}
        }
        if let Some(o) = &mut observed {
            match (desired, o.state) {
                (PowerState::Paused, RunState::Running) if R::set_paused(self, vmid, &run, true).await => {
                    o.state = RunState::Paused;
                }
                (PowerState::Running, RunState::Paused) if R::set_paused(self, vmid, &run, false).await => {
                    o.state = RunState::Running;
                }
                _ => {}
            }
        }
        let phase = match observed.map(|o| o.state) {
            None => "Stopped",
            Some(RunState::Paused) => "Paused",
            Some(RunState::Running) => "Running",
            Some(RunState::Starting) => "Starting",
        };
        let ready = matches!(
            (desired, phase),
            (PowerState::Running, "Running")
                | (PowerState::Stopped, "Stopped")
                | (PowerState::Paused, "Paused")
        );
        let mut figures = R::static_figures(guest);
        figures["phase"] = json!(phase);
        figures["vmid"] = json!(vmid);
        figures["volumes"] = json!(prepared.volumes);
        if let Some(extra) = prepared.status.as_object() {
            for (key, value) in extra {
                figures[key] = value.clone();
            }
        }
        if let Some(accelerator) = prepared.accelerator {
            figures["accelerator"] = json!(accelerator);
        }
        if let Some(o) = observed {
            figures["pid"] = json!(o.pid);
            if let Some(cp) = read_checkpoint(&run) {
                figures["uptime"] = json!(host::unix_now().saturating_sub(cp.started_at));
                if let Some(accelerator) = cp.accelerator {
                    figures["accelerator"] = json!(accelerator);
                }
            }
            R::figures(self, guest, vmid, &run, o.pid, &mut figures).await;
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
                    "{}; kpve does not move or convert volumes: remove the volume and add it again (or recreate the guest)",
                    recreate.join("; ")
                ),
            )
        } else if restart_required {
            condition(
                condition_type::RESTART_REQUIRED,
                true,
                "ConfigChanged",
                &format!(
                    "the running {} differs from the spec; set annotation {RESTART_ANNOTATION} to a new value to restart",
                    R::PROCESS
                ),
            )
        } else {
            condition(condition_type::RESTART_REQUIRED, false, "InSync", "")
        });
        self.write_status::<R>(guest, figures, conditions).await
    }

    /// The LRM's step for an HA-managed guest (None: not HA-managed here). Records the
    /// report written with the status, and marks the run directory so fencing kills it.
    async fn lrm_step<R: Runtime>(
        &self,
        guest: &R::Guest,
        vmid: u32,
        run: &Path,
        running: bool,
    ) -> Option<Step> {
        let ha = guest.guest_spec().ha().filter(|h| h.state != HaState::Ignored);
        let uid = guest.uid().unwrap_or_default();
        let Some(ha) = ha else {
            fence::mark_ha(run, false);
            self.lrm_reports.lock().expect("lrm reports lock").remove(&uid);
            return None;
        };
        if run.exists() {
            fence::mark_ha(run, true);
        }
        let status = guest.guest_status();
        let crm_state = status.and_then(|s| s.ha.as_ref()).map(|h| h.state.as_str());
        let stored = status.and_then(|s| s.ha_lrm.as_ref()).map(LrmReport::from);
        let previous = self.lrm_reports.lock().expect("lrm reports lock").get(&uid).cloned().or(stored);
        let fenced = self.fenced.lock().expect("fenced lock").contains(&vmid);
        let view = GuestView {
            want_running: ha.state == HaState::Started && !matches!(crm_state, Some("error" | "disabled")),
            running,
            max_restart: ha.max_restart,
            migrate: status.and_then(|s| s.ha.as_ref()).and_then(|h| h.migrate.as_ref()).map(|m| m.id),
            report: previous.as_ref(),
            fenced,
            epoch: self.epoch,
        };
        let (mut step, mut report) = kpve_ha::lrm::step(&self.config.node, &view, self.holds_lease());
        if matches!(step, Step::Start | Step::Restart) && !self.bound_here::<R>(guest).await {
            // The watch may lag a move the CRM made: only the server's word starts an HA guest.
            step = Step::Nothing;
            report = previous.unwrap_or(report);
        }
        if matches!(step, Step::Start | Step::Restart) {
            self.fenced.lock().expect("fenced lock").remove(&vmid);
        }
        if step == Step::GiveUp {
            tracing::warn!(
                vmid,
                restarts = report.restarts,
                "HA guest keeps failing here; leaving it to the CRM to relocate"
            );
        }
        self.lrm_reports.lock().expect("lrm reports lock").insert(uid, report);
        Some(step)
    }

    /// Whether the server (not the watch cache) says the guest is bound to this node, and the
    /// node holds its lease.
    async fn bound_here<R: Runtime>(&self, guest: &R::Guest) -> bool {
        let api: Api<R::Guest> = Api::namespaced(self.client.clone(), &guest.namespace().unwrap_or_default());
        let fresh = match api.get_opt(&guest.name_any()).await {
            Ok(Some(fresh)) => fresh,
            _ => return false,
        };
        if fresh.uid() != guest.uid()
            || fresh.guest_status().and_then(|s| s.node.as_deref()) != Some(self.config.node.as_str())
            || !self.holds_lease()
        {
            return false;
        }
        // Claim it with the version just read: if the CRM rebinds the guest in the meantime
        // (it judged this node's lease expired an instant before a renewal), one of the two
        // writes gets 409 and only the winner acts.
        let claim = json!({
            "metadata": { "resourceVersion": fresh.resource_version() },
            "status": { "haLrm": { "node": self.config.node, "epoch": self.epoch } },
        });
        let params = PatchParams { field_manager: Some(self.config.manager()), ..PatchParams::default() };
        api.patch_status(&guest.name_any(), &params, &Patch::Merge(&claim)).await.is_ok()
    }

    /// The graceful-stop wait: the guest's `startup.down` (Proxmox's), else the agent's default.
    fn shutdown_timeout(&self, spec: &(dyn GuestSpec + Sync)) -> Duration {
        spec.startup()
            .and_then(|s| s.down)
            .map(|d| Duration::from_secs(d.into()))
            .unwrap_or(self.config.shutdown_timeout)
    }

    /// Starts the guest and checkpoints what it runs with.
    async fn start<R: Runtime>(
        &self,
        guest: &R::Guest,
        vmid: u32,
        run: &Path,
        prepared: &Prepared<R::Plan>,
        restart_token: Option<String>,
        incoming: Option<Incoming>,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(run)?;
        std::fs::write(run.join("engine"), R::ENGINE)?;
        // Marked before the process exists: fencing must never miss an HA guest being started.
        fence::mark_ha(run, guest.guest_spec().ha().is_some_and(|h| h.state != HaState::Ignored));
        let extra = incoming.as_ref().map(|_| vec!["-incoming".to_string(), "defer".to_string()]);
        R::start(self, guest, vmid, run, prepared, extra.as_deref().unwrap_or_default()).await?;
        let checkpoint = Checkpoint {
            uid: guest.uid().unwrap_or_default(),
            namespace: guest.namespace().unwrap_or_default(),
            name: guest.name_any(),
            vmid,
            engine: R::ENGINE.into(),
            launch: prepared.launch.clone(),
            // A migrated guest keeps its uptime.
            started_at: incoming.map_or_else(host::unix_now, |i| i.started_at),
            restart_token,
            accelerator: prepared.accelerator.map(str::to_string),
            volumes: prepared.volumes.clone(),
        };
        std::fs::write(run.join("guest.json"), serde_json::to_vec_pretty(&checkpoint)?)?;
        tracing::info!(vmid, kind = R::KIND, "guest started");
        Ok(())
    }

    /// Stops the guest, frees its volumes and forgets it — only if what runs under `vmid`
    /// here is this kind's and (when `uid` is given) that guest's: a VMID freed by a delete
    /// may already belong to a new guest by the time a late release runs.
    async fn release<R: Runtime>(&self, vmid: u32, uid: Option<&str>) {
        if vmid == 0 {
            return;
        }
        let run = self.run_dir(vmid);
        if run.exists() && engine_of(&run) != R::ENGINE {
            return;
        }
        if let (Some(uid), Some(cp)) = (uid, read_checkpoint(&run))
            && cp.uid != uid
        {
            tracing::info!(vmid, "not releasing: the VMID belongs to another guest now");
            return;
        }
        R::stop(self, vmid, &run, self.config.shutdown_timeout).await;
        self.forget_guest_images(vmid);
        if let Err(e) = self.pool().free_guest(vmid) {
            tracing::warn!(vmid, error = %e, "freeing volumes failed");
        }
        let _ = std::fs::remove_dir_all(&run);
    }

    /// Whether the guest checkpointed in `run` still exists (bound elsewhere); None when the
    /// server cannot say.
    async fn moved_elsewhere<R: Runtime>(&self, run: &Path) -> Option<bool> {
        // No checkpoint: nothing was started here, or it is not known whose it was; never a
        // reason to free volumes.
        let Some(cp) = read_checkpoint(run) else { return Some(true) };
        let api: Api<R::Guest> = Api::namespaced(self.client.clone(), &cp.namespace);
        match api.get_opt(&cp.name).await {
            Ok(Some(g)) => {
                Some(g.uid().as_deref() == Some(cp.uid.as_str()) && g.meta().deletion_timestamp.is_none())
            }
            Ok(None) => Some(false),
            Err(_) => None,
        }
    }

    /// Stops the guest if it still runs here and forgets it, keeping its volumes (it moved to
    /// another node). Only if what runs under `vmid` is that guest.
    async fn let_go<R: Runtime>(&self, vmid: u32, uid: &str) {
        let run = self.run_dir(vmid);
        if vmid == 0 || !run.exists() || engine_of(&run) != R::ENGINE {
            return;
        }
        if read_checkpoint(&run).is_some_and(|cp| cp.uid != uid) {
            return;
        }
        R::stop(self, vmid, &run, self.config.shutdown_timeout).await;
        self.lrm_reports.lock().expect("lrm reports lock").remove(uid);
        self.fenced.lock().expect("fenced lock").remove(&vmid);
        self.forget_guest_images(vmid);
        // Migrated live: the target has the disks now, and the copies here are stale.
        if Agent::migrated_away(&run) && self.pool_shared() == Some(false) {
            // Unless a QEMU holds them: then this directory is the target's too.
            let held = crate::storage::guest_images_in_use(&self.pool(), vmid).await;
            if !held.is_empty() {
                tracing::warn!(vmid, ?held, "not freeing the migrated guest's disks: in use on this host");
            } else if let Err(e) = self.pool().free_guest(vmid) {
                tracing::warn!(vmid, error = %e, "freeing the migrated guest's old disks failed");
            }
        }
        let _ = std::fs::remove_dir_all(&run);
        tracing::info!(
            vmid,
            kind = R::KIND,
            "guest no longer bound here: stopped and forgotten (volumes kept)"
        );
    }

    /// Reports that the guest cannot converge: Stalled with the reason, not Ready, not
    /// Reconciling (nothing will change until the spec or the node does).
    async fn stalled<R: Runtime>(&self, guest: &R::Guest, phase: &str, stall: Stall) -> anyhow::Result<()> {
        let conditions = vec![
            condition(condition_type::STALLED, true, stall.reason, &stall.message),
            condition(condition_type::READY, false, stall.reason, &stall.message),
            condition(condition_type::RECONCILING, false, stall.reason, ""),
        ];
        self.write_status::<R>(guest, json!({ "phase": phase }), conditions).await
    }

    /// CPU usage since the previous look at `key`, from a cumulative CPU-seconds counter,
    /// as Proxmox's `cpu` (1.0 = one core busy).
    pub(crate) fn cpu_usage(&self, key: (u32, u32), cpu_seconds: f64) -> Option<f64> {
        let now = Instant::now();
        let mut samples = self.cpu_samples.lock().expect("cpu sample lock");
        let (before, at) = samples.insert(key, (cpu_seconds, now))?;
        let seconds = now.duration_since(at).as_secs_f64();
        (seconds > 0.0).then(|| (((cpu_seconds - before).max(0.0)) / seconds * 1000.0).round() / 1000.0)
    }

    /// Server-side applies the agent's part of the status, only when it changed.
    async fn write_status<R: Runtime>(
        &self,
        guest: &R::Guest,
        figures: Value,
        conditions: Vec<Condition>,
    ) -> anyhow::Result<()> {
        let now = now();
        let generation = guest.meta().generation;
        let existing = guest.guest_status().map(|s| s.conditions.clone()).unwrap_or_default();
        let mut merged = Vec::new();
        for mut c in conditions {
            c.observed_generation = generation;
            let mut list = existing.clone();
            set_condition(&mut list, c.clone(), &now);
            merged.push(list.into_iter().find(|x| x.type_ == c.type_).expect("just set"));
        }
        let mut status = figures;
        // Not `node`: that is the scheduler's and the CRM's. An agent writing it could bind a
        // guest back to itself after the CRM moved it.
        if let Some(report) =
            self.lrm_reports.lock().expect("lrm reports lock").get(&guest.uid().unwrap_or_default())
        {
            status["haLrm"] = serde_json::to_value(kpve_crds::HaLrmStatus::from(report))?;
        }
        status["observedGeneration"] = json!(generation);
        status["conditions"] = serde_json::to_value(merged)?;
        let body = json!({"apiVersion": "kpve.io/v1alpha1", "kind": R::KIND, "status": status});
        let uid = guest.uid().unwrap_or_default();
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
        let api: Api<R::Guest> = Api::namespaced(self.client.clone(), &guest.namespace().unwrap_or_default());
        api.patch_status(&guest.name_any(), &self.apply(), &Patch::Apply(&body)).await?;
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

pub(crate) fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { ConditionStatus::True } else { ConditionStatus::False },
        reason: reason.into(),
        message: message.into(),
        last_transition_time: None,
        observed_generation: None,
    }
}

pub(crate) fn read_checkpoint(dir: &Path) -> Option<Checkpoint> {
    serde_json::from_slice(&std::fs::read(dir.join("guest.json")).ok()?).ok()
}

/// A stable MAC in Proxmox's OUI (BC:24:11) derived from the guest's uid and NIC index.
pub(crate) fn generated_mac(uid: &str, index: usize) -> String {
    let mut h: u32 = 2166136261;
    for b in uid.bytes().chain(std::iter::once(index as u8)) {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    format!("BC:24:11:{:02X}:{:02X}:{:02X}", (h >> 16) as u8, (h >> 8) as u8, h as u8)
}
