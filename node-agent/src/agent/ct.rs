//! The LXC runtime: LinuxContainers run by liblxc through its tools (`lxc-start`,
//! `lxc-info`, `lxc-stop`, `lxc-freeze`), with kpve's own lxcpath — the agent's run root —
//! so the container's config, log and console sit in its run directory
//! (`DATA_DIR/agent/run/<vmid>/config`) and nothing touches /var/lib/lxc.
//!
//! Volumes are dir-pool subvolumes as on Proxmox dir storage
//! (`local:<vmid>/subvol-<vmid>-disk-<n>.subvol`): the rootfs is extracted from the `vztmpl`
//! tarball the spec names, once; mount points are empty directories or host bind mounts.
//! Unprivileged containers (the default) get Proxmox's id map `0 → 100000, 65536 ids`, and
//! their volumes are owned accordingly. A size is recorded but not enforced: a directory on
//! a file system without project quotas has no size limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kpve_crds::{LinuxContainer, LinuxContainerSpec, PowerState};
use kube::ResourceExt;
use serde_json::{Value, json};
use tokio::process::Command;

use super::{Agent, Observed, Prepared, RunState, Runtime, Stall, generated_mac};
use crate::host;
use crate::lxc::config::{self, CgroupLayout, ConfigError, CtPlan, IdMap, ResolvedMount, ResolvedVeth};
use crate::lxc::{rootfs, transfer};
use crate::qemu::migration::Outcome;
use crate::storage::{self, DirPool};

pub(crate) struct Lxc;

/// What the start still has to do on the host: volumes to create, the config to write.
pub(crate) struct CtWork {
    config: String,
    seccomp: String,
    /// (host path, populate from this template) for volumes that do not exist yet.
    create: Vec<(PathBuf, Option<PathBuf>)>,
    rootfs: PathBuf,
    idmap: Option<IdMap>,
    hostname: String,
    spec: LinuxContainerSpec,
}

impl Runtime for Lxc {
    type Guest = LinuxContainer;
    type Plan = CtWork;
    const KIND: &'static str = "LinuxContainer";
    const ENGINE: &'static str = "lxc";
    const PROCESS: &'static str = "the container";

    fn static_figures(ct: &LinuxContainer) -> Value {
        json!({"maxmem": u64::from(ct.spec.memory) * 1024 * 1024})
    }

    /// Checks everything the start depends on and renders the config before anything is
    /// created on the host, so a container that cannot start leaves nothing behind.
    async fn prepare(
        agent: &Agent,
        ct: &LinuxContainer,
        vmid: u32,
        run: &Path,
    ) -> Result<Prepared<CtWork>, Stall> {
        let spec = &ct.spec;
        if spec.is_template() && spec.power_state == PowerState::Running {
            return Err(Stall::new(
                "IsTemplate",
                "options.template: a template never runs (clone it); powerState must be Stopped",
            ));
        }
        let pool = agent.pool();
        pool.activate().map_err(|e| Stall::new("StorageUnavailable", e.to_string()))?;
        let idmap = spec.unprivileged.then(IdMap::default);
        if let Some(map) = idmap
            && let Some(problem) = host::idmap_problem(map.host_uid, map.count)
        {
            return Err(Stall::new("IdMapUnavailable", format!("spec.unprivileged: {problem}")));
        }
        let mut volumes = BTreeMap::new();
        let mut create = Vec::new();

        // rootfs: an existing volume, or a new subvolume populated from the template.
        let (rootfs_volume, rootfs_path) = match (&spec.rootfs.volume, &spec.rootfs.pool) {
            (Some(volume), _) => {
                let path = volume_path(&pool, volume, "spec.rootfs.volume", agent.node())?;
                if !path.is_dir() {
                    return Err(Stall::new(
                        "VolumeNotFound",
                        format!("spec.rootfs.volume: {volume} does not exist"),
                    ));
                }
                (volume.clone(), path)
            }
            (None, Some(pool_name)) => {
                check_pool(&pool, pool_name, "spec.rootfs.pool", agent.node())?;
                check_size(spec.rootfs.size.as_deref(), "spec.rootfs.size")?;
                let volume = format!("{pool_name}:{vmid}/{}", config::ct_volume_name(vmid, 0));
                let path = volume_path(&pool, &volume, "spec.rootfs", agent.node())?;
                let source = match &spec.rootfs.clone_from {
                    Some(source) if !path.exists() => {
                        Some(volume_path(&pool, source, "spec.rootfs.cloneFrom", agent.node())?)
                    }
                    _ => None,
                };
                match source {
                    // A clone of a container that never ran has no rootfs yet: it is made from
                    // the template like its source's will be.
                    Some(source) if source.is_dir() => copy_subvolume(&source, &path)
                        .await
                        .map_err(|e| Stall::new("CloneFailed", format!("spec.rootfs.cloneFrom: {e}")))?,
                    _ if !path.exists() => {
                        create.push((path.clone(), Some(template_path(&pool, spec, agent.node())?)))
                    }
                    _ => {}
                }
                (volume, path)
            }
            (None, None) => {
                return Err(Stall::new("InvalidSpec", "spec.rootfs: needs a volume, or a pool and a size"));
            }
        };
        volumes.insert("rootfs".to_string(), rootfs_volume);

        let mut mounts = Vec::new();
        for mp in &spec.mount_points {
            let field = format!("spec.mountPoints[{}]", mp.id);
            let path = match (&mp.volume, &mp.pool) {
                (Some(volume), _) if volume.starts_with('/') => {
                    if !Path::new(volume).exists() {
                        return Err(Stall::new(
                            "VolumeNotFound",
                            format!(
                                "{field}.volume: host path {volume} does not exist on node {}",
                                agent.node()
                            ),
                        ));
                    }
                    volumes.insert(mp.id.clone(), volume.clone());
                    PathBuf::from(volume)
                }
                (Some(volume), _) => {
                    let path = volume_path(&pool, volume, &format!("{field}.volume"), agent.node())?;
                    if !path.is_dir() {
                        return Err(Stall::new(
                            "VolumeNotFound",
                            format!("{field}.volume: {volume} does not exist"),
                        ));
                    }
                    volumes.insert(mp.id.clone(), volume.clone());
                    path
                }
                (None, Some(pool_name)) => {
                    check_pool(&pool, pool_name, &format!("{field}.pool"), agent.node())?;
                    check_size(mp.size.as_deref(), &format!("{field}.size"))?;
                    // mpN lives on disk N+1: stable whatever other mount points come and go.
                    let n: usize = mp.id.trim_start_matches("mp").parse().unwrap_or(0);
                    let volume = format!("{pool_name}:{vmid}/{}", config::ct_volume_name(vmid, n + 1));
                    let path = volume_path(&pool, &volume, &field, agent.node())?;
                    if !path.exists() {
                        create.push((path.clone(), None));
                    }
                    volumes.insert(mp.id.clone(), volume);
                    path
                }
                (None, None) => {
                    return Err(Stall::new(
                        "InvalidSpec",
                        format!("{field}: needs a volume, or a pool and a size"),
                    ));
                }
            };
            mounts.push(ResolvedMount {
                id: mp.id.clone(),
                host_path: path,
                target: mp.path.clone(),
                read_only: false,
            });
        }

        let mut veths = Vec::new();
        for nic in &spec.nics {
            agent.require_bridge(&nic.id, nic.bridge.as_deref())?;
            let n: usize = nic.id.trim_start_matches("net").parse().unwrap_or(0);
            let mac = nic.hwaddr.clone().unwrap_or_else(|| generated_mac(&ct.uid().unwrap_or_default(), n));
            veths.push(ResolvedVeth { id: nic.id.clone(), host_name: config::veth_name(vmid, n), mac });
        }

        let plan = CtPlan {
            vmid,
            rootfs: ResolvedMount {
                id: "rootfs".into(),
                host_path: rootfs_path.clone(),
                target: "/".into(),
                read_only: false,
            },
            mounts,
            veths,
            idmap,
            log_file: run.join("lxc.log"),
            console_log: Some(run.join("console.log")),
            host_apparmor: host::apparmor_enabled(),
            cgroup: if host::cgroup_v1_memory() { CgroupLayout::Legacy } else { CgroupLayout::Unified },
            seccomp_profile: run.join("rules.seccomp"),
        };
        let config = config::render(spec, &plan).map_err(|e| {
            let reason = match e {
                ConfigError::InvalidFeature { .. } => "InvalidFeature",
                ConfigError::Unsupported { .. } => "Unsupported",
                _ => "InvalidSpec",
            };
            Stall::new(reason, e.to_string())
        })?;
        let hostname = spec.hostname.clone().unwrap_or_else(|| ct.name_any());
        Ok(Prepared {
            launch: config.lines().map(str::to_string).collect(),
            volumes,
            accelerator: None,
            status: Value::Null,
            plan: CtWork {
                config,
                seccomp: config::render_seccomp(spec),
                create,
                rootfs: rootfs_path,
                idmap,
                hostname,
                spec: spec.clone(),
            },
        })
    }

    /// From the host's process table and cgroups, without running a tool: the monitor
    /// whose pid `lxc-start -p` wrote (checked by its command line, against pid reuse),
    /// its child the container's init, and the init's freezer state.
    async fn observe(agent: &Agent, vmid: u32, run: &Path) -> Option<Observed> {
        if !run.join("config").exists() {
            return None;
        }
        let expected = format!("[lxc monitor] {} {vmid}", agent.run_root().display());
        let is_monitor = |pid: u32| host::cmdline(pid).is_some_and(|c| c.trim_end_matches('\0') == expected);
        let monitor = match host::read_pid(&run.join("lxc.pid")) {
            Some(pid) if is_monitor(pid) => pid,
            // The monitor lives as long as the container: gone, so is the container.
            Some(_) => return None,
            // No pid file (started by hand?): ask lxc, and remember the monitor.
            None => {
                let init = lxc_info_pid(agent, vmid).await?;
                let monitor = host::parent(init).filter(|&p| is_monitor(p))?;
                let _ = std::fs::write(run.join("lxc.pid"), format!("{monitor}\n"));
                monitor
            }
        };
        let Some(init) = host::children(monitor).first().copied() else {
            // The monitor alone: the container is being set up or torn down.
            return Some(Observed { pid: 0, state: RunState::Starting });
        };
        let state = match Cgroup::of(init).map(|c| c.frozen()) {
            Some(Some(true)) => RunState::Paused,
            _ => RunState::Running,
        };
        Some(Observed { pid: init, state })
    }

    async fn start(
        agent: &Agent,
        _ct: &LinuxContainer,
        vmid: u32,
        run: &Path,
        prepared: &Prepared<CtWork>,
        _extra: &[String],
    ) -> anyhow::Result<()> {
        let work = &prepared.plan;
        if work.idmap.is_some() {
            // The container's root (host uid 100000) must reach its rootfs: like Proxmox's
            // 0755 /var/lib/vz, every directory above the pool's images is traversable.
            allow_traversal(&agent.pool().path.join("images"))?;
        }
        for (path, template) in &work.create {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
                if work.idmap.is_some() {
                    allow_traversal(parent)?;
                }
            }
            match template {
                Some(template) => rootfs::populate_from_template(template, path, work.idmap)
                    .await
                    .map_err(|e| anyhow::anyhow!("spec.template: {e}"))?,
                None => rootfs::create_empty(path, work.idmap)?,
            }
        }
        rootfs::setup_guest(&work.rootfs, &work.spec, &work.hostname, work.idmap)?;
        std::fs::write(run.join("config"), &work.config)?;
        std::fs::write(run.join("rules.seccomp"), &work.seccomp)?;
        let _ = std::fs::remove_file(run.join("console.log"));
        let pid_file = run.join("lxc.pid");
        let _ = std::fs::remove_file(&pid_file);
        // Daemonized, lxc-start returns once the container runs (or failed to); the pid file
        // names its monitor, the parent of the container's init.
        let started = lxc(agent, "lxc-start", vmid, &["-d", "-p", &pid_file.display().to_string()]).await;
        match started {
            Ok(out) if out.status.success() => {
                // The daemon writes the pid file a moment after lxc-start returns.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while host::read_pid(&pid_file).is_none() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok(())
            }
            Ok(out) => {
                let log = std::fs::read_to_string(run.join("lxc.log")).unwrap_or_default();
                let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
                let tail = errors[errors.len().saturating_sub(4)..].join("\n");
                anyhow::bail!("{} {}", String::from_utf8_lossy(&out.stderr).trim(), tail)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// SIGPWR to the container's init (`lxc.signal.halt`), a hard stop after `timeout`.
    async fn stop(agent: &Agent, vmid: u32, run: &Path, timeout: Duration) {
        let Some(observed) = Self::observe(agent, vmid, run).await else {
            // Not observable (no pid file): make sure anyway, lxc knows its containers.
            if run.join("config").exists() {
                let _ = lxc(agent, "lxc-stop", vmid, &["-k"]).await;
            }
            return;
        };
        if observed.state == RunState::Paused {
            let _ = lxc(agent, "lxc-unfreeze", vmid, &[]).await;
        }
        let secs = timeout.as_secs().to_string();
        let args: Vec<&str> = if timeout.is_zero() { vec!["-k"] } else { vec!["-t", &secs] };
        if let Err(e) = lxc(agent, "lxc-stop", vmid, &args).await {
            tracing::warn!(vmid, error = %e, "lxc-stop failed");
        }
        if Self::observe(agent, vmid, run).await.is_some() {
            let _ = lxc(agent, "lxc-stop", vmid, &["-k"]).await;
        }
    }

    /// The restart migration: every volume in the container's directory of the pool (what
    /// is there, not what the status lists) is to be copied unless the pool is shared; the
    /// target is asked whether it takes them (not the same directory); then the container is
    /// shut down (its shutdown timeout, then killed) and each volume sent
    /// ([`crate::lxc::transfer`]). The downtime reported runs from the stop to the hand-over;
    /// the target starts the container once it is bound there.
    async fn migrate_send(
        agent: &Agent,
        ct: &LinuxContainer,
        vmid: u32,
        run: &Path,
        m: &kpve_crds::Migration,
    ) -> Result<Outcome, String> {
        let began = std::time::Instant::now();
        let pool = agent.pool();
        let shared =
            agent.pool_shared().ok_or("the pool's StoragePool has not been read yet (shared or not)")?;
        let receiver = match (&m.uri, shared) {
            (Some(uri), false) => {
                Some(transfer::parse_uri(uri).ok_or(format!("bad migration address {uri:?}"))?)
            }
            (None, true) => None,
            (Some(_), true) => return Err("the target waits for volumes, but the pool is shared here".into()),
            (None, false) => {
                return Err("the target gave no address for the volumes of an unshared pool".into());
            }
        };
        let mut copies = Vec::new();
        if let Some((address, token)) = &receiver {
            let dir = pool.path.join("images").join(vmid.to_string());
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries.flatten().collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            };
            for entry in entries {
                let name = entry.file_name().to_string_lossy().into_owned();
                // A half-made copy (a clone cut off) is no volume.
                if name.ends_with(".partial") {
                    continue;
                }
                if !entry.path().is_dir() {
                    return Err(format!("{name}: only container subvolumes move, not files"));
                }
                copies.push((name, entry.path()));
            }
            let pool_id = pool.identity().map_err(|e| e.to_string())?;
            // Before the container stops: a target that cannot take them refuses now.
            transfer::check(address, token, &pool_id).await?;
        }
        let stopped_at = std::time::Instant::now();
        if Self::observe(agent, vmid, run).await.is_some() {
            Self::stop(agent, vmid, run, agent.shutdown_timeout(&ct.spec)).await;
            if Self::observe(agent, vmid, run).await.is_some() {
                return Err("the container did not stop".into());
            }
        }
        let mut transferred = 0;
        if let Some((address, token)) = &receiver {
            let pool_id = pool.identity().map_err(|e| e.to_string())?;
            for (name, path) in &copies {
                transferred += transfer::send(address, token, name, path, &pool_id).await?;
                tracing::info!(vmid, volume = %name, migration = %m.id, "volume sent");
            }
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Ok(Outcome { downtime_ms: ms(stopped_at.elapsed()), total_ms: ms(began.elapsed()), transferred })
    }

    async fn set_paused(agent: &Agent, vmid: u32, _run: &Path, paused: bool) -> bool {
        let tool = if paused { "lxc-freeze" } else { "lxc-unfreeze" };
        lxc(agent, tool, vmid, &[]).await.is_ok_and(|out| out.status.success())
    }

    async fn figures(
        agent: &Agent,
        ct: &LinuxContainer,
        vmid: u32,
        _run: &Path,
        pid: u32,
        figures: &mut Value,
    ) {
        if let Some(cgroup) = Cgroup::of(pid) {
            if let Some(mem) = cgroup.memory_bytes() {
                figures["mem"] = json!(mem);
            }
            // The limit in force (a memory change applies at the next restart): `pending`
            // compares it with the spec.
            if let Some(limit) = cgroup.memory_limit() {
                figures["maxmem"] = json!(limit);
            }
            if let Some(cpu) = cgroup.cpu_seconds().and_then(|s| agent.cpu_usage((vmid, pid), s)) {
                figures["cpu"] = json!(cpu);
            }
        }
        let (mut net_in, mut net_out) = (0u64, 0u64);
        for nic in &ct.spec.nics {
            let n: usize = nic.id.trim_start_matches("net").parse().unwrap_or(0);
            let (rx, tx) = host::link_bytes(&config::veth_name(vmid, n));
            net_out += rx;
            net_in += tx;
        }
        figures["netIn"] = json!(net_in);
        figures["netOut"] = json!(net_out);
        if let Some(ips) = guest_ips(pid) {
            figures["ips"] = json!(ips);
        }
    }
}

/// The container's init pid as `lxc-info` reports it, if it runs.
async fn lxc_info_pid(agent: &Agent, vmid: u32) -> Option<u32> {
    let out = lxc(agent, "lxc-info", vmid, &["-s", "-p"]).await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim_start().strip_prefix(':')))
            .map(str::trim)
    };
    if field("State")? == "STOPPED" {
        return None;
    }
    field("PID")?.parse().ok()
}

/// Runs an lxc tool on container `vmid` in the agent's lxcpath.
async fn lxc(agent: &Agent, tool: &str, vmid: u32, args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(tool)
        .arg("-P")
        .arg(agent.run_root())
        .arg("-n")
        .arg(vmid.to_string())
        .args(args)
        .stdin(std::process::Stdio::null())
        // lxc-start -d leaves a monitor behind: it must not be in the agent's process group.
        .process_group(0)
        .current_dir("/")
        .output()
        .await
}

fn check_pool(pool: &DirPool, name: &str, field: &str, node: &str) -> Result<(), Stall> {
    if name != pool.name {
        return Err(Stall::new(
            "PoolNotFound",
            format!("{field}: storage pool {name:?} does not exist on node {node}"),
        ));
    }
    Ok(())
}

fn check_size(size: Option<&str>, field: &str) -> Result<(), Stall> {
    match size {
        Some(size) if storage::parse_size(size).is_none() => {
            Err(Stall::new("InvalidSpec", format!("{field}: {size:?} is not a size")))
        }
        _ => Ok(()),
    }
}

fn volume_path(pool: &DirPool, volume: &str, field: &str, node: &str) -> Result<PathBuf, Stall> {
    let pool_name = volume.split(':').next().unwrap_or("");
    check_pool(pool, pool_name, field, node)?;
    pool.path_of(volume).map_err(|e| Stall::new("InvalidSpec", format!("{field}: {e}")))
}

/// The template tarball a new rootfs is extracted from.
fn template_path(pool: &DirPool, spec: &LinuxContainerSpec, node: &str) -> Result<PathBuf, Stall> {
    let Some(template) = &spec.template else {
        return Err(Stall::new(
            "TemplateNotFound",
            "spec.template: a new rootfs needs an OS template (like local:vztmpl/alpine-3.20-default_20240908_amd64.tar.xz)",
        ));
    };
    let path = volume_path(pool, template, "spec.template", node)?;
    if !path.is_file() {
        return Err(Stall::new(
            "TemplateNotFound",
            format!(
                "spec.template: {template} does not exist on node {node} (expected at {})",
                path.display()
            ),
        ));
    }
    Ok(path)
}

/// Makes `dir` and its ancestors searchable (o+x) by the container's mapped root, adding
/// only the execute bit: the directories stay unlistable for others.
fn allow_traversal(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for ancestor in dir.ancestors() {
        let Ok(meta) = std::fs::metadata(ancestor) else { continue };
        if meta.mode() & 0o001 == 0 {
            let mode = (meta.mode() & 0o7777) | 0o001;
            tracing::info!(dir = %ancestor.display(), mode = %format!("{mode:o}"), "made searchable for unprivileged containers");
            std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// The container's cgroup, found from its init process.
struct Cgroup {
    /// `lxc.payload.<vmid>` path relative to each hierarchy's root.
    path: String,
    v1: bool,
}

impl Cgroup {
    fn of(pid: u32) -> Option<Cgroup> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let v1 = host::cgroup_v1_memory();
        let line = text.lines().find(|l| {
            let controllers = l.split(':').nth(1).unwrap_or("");
            if v1 { controllers.split(',').any(|c| c == "memory") } else { controllers.is_empty() }
        })?;
        let full = line.splitn(3, ':').nth(2)?;
        // The container's own cgroup, not the sub-cgroup its init may have moved into.
        let end = full.find("lxc.payload.").map(|i| i + full[i..].find('/').unwrap_or(full.len() - i))?;
        Some(Cgroup { path: full[..end].trim_start_matches('/').to_string(), v1 })
    }

    fn read(&self, hierarchy: &str, file: &str) -> Option<String> {
        let base = Path::new("/sys/fs/cgroup").join(hierarchy);
        std::fs::read_to_string(base.join(&self.path).join(file)).ok()
    }

    /// Whether the freezer holds the container (v1 `freezer.state`, v2 `cgroup.events`).
    fn frozen(&self) -> Option<bool> {
        if let Some(state) = self.read("freezer", "freezer.state") {
            return Some(state.trim() != "THAWED");
        }
        let events = self.read("", "cgroup.events")?;
        Some(events.lines().any(|l| l.trim() == "frozen 1"))
    }

    fn memory_bytes(&self) -> Option<u64> {
        let text = if self.v1 {
            self.read("memory", "memory.usage_in_bytes")
        } else {
            self.read("", "memory.current")
        };
        text?.trim().parse().ok()
    }

    /// The memory limit of the running container (None when unlimited).
    fn memory_limit(&self) -> Option<u64> {
        let text =
            if self.v1 { self.read("memory", "memory.limit_in_bytes") } else { self.read("", "memory.max") };
        // cgroup v1 writes "unlimited" as a page-rounded i64::MAX.
        text?.trim().parse().ok().filter(|l| *l < 1 << 50)
    }

    fn cpu_seconds(&self) -> Option<f64> {
        if self.v1 {
            let ns: u64 = ["cpuacct", "cpu,cpuacct", "cpuacct,cpu"]
                .iter()
                .find_map(|h| self.read(h, "cpuacct.usage"))?
                .trim()
                .parse()
                .ok()?;
            Some(ns as f64 / 1e9)
        } else {
            let stat = self.read("", "cpu.stat")?;
            let usec: u64 = stat.lines().find_map(|l| l.strip_prefix("usage_usec "))?.trim().parse().ok()?;
            Some(usec as f64 / 1e6)
        }
    }
}

/// The addresses of the container's interfaces, read from its network namespace through
/// its init's /proc (no tool run): IPv4 local addresses from `net/fib_trie`, global IPv6
/// ones from `net/if_inet6`; loopback and link-local left out.
fn guest_ips(init: u32) -> Option<Vec<String>> {
    let trie = std::fs::read_to_string(format!("/proc/{init}/net/fib_trie")).ok()?;
    let inet6 = std::fs::read_to_string(format!("/proc/{init}/net/if_inet6")).unwrap_or_default();
    Some(parse_ips(&trie, &inet6))
}

fn parse_ips(fib_trie: &str, if_inet6: &str) -> Vec<String> {
    let mut ips: Vec<String> = Vec::new();
    let mut last: Option<&str> = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = Some(addr);
        } else if line == "/32 host LOCAL"
            && let Some(addr) = last
            && !addr.starts_with("127.")
            && !ips.iter().any(|ip| ip == addr)
        {
            ips.push(addr.to_string());
        }
    }
    for line in if_inet6.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // address, ifindex, prefix length, scope, flags, name; scope 0 is global.
        if fields.len() >= 4
            && fields[3] == "00"
            && let Ok(bits) = u128::from_str_radix(fields[0], 16)
        {
            ips.push(std::net::Ipv6Addr::from(bits).to_string());
        }
    }
    ips
}

/// Copies a container volume (ownership, modes, links as they are: `cp -a`) through
/// `<dst>.partial`, so a half-made copy is never taken for the volume.
async fn copy_subvolume(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let partial = dst.with_extension("subvol.partial");
    let _ = std::fs::remove_dir_all(&partial);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let out = tokio::process::Command::new("cp").arg("-a").arg(src).arg(&partial).output().await?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        anyhow::bail!("cp -a {}: {}", src.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::rename(&partial, dst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ips;

    #[test]
    fn addresses_from_the_containers_proc() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.9.9.0\n        /24 link UNICAST\n     |-- 10.9.9.9\n        /32 host LOCAL\n     |-- 127.0.0.1\n        /32 host LOCAL\nLocal:\n     |-- 10.9.9.9\n        /32 host LOCAL\n";
        let inet6 = "00000000000000000000000000000001 01 80 10 80       lo\n\
                     fe80000000000000c4c265fffe0eb9cd 02 40 20 c0     eth0\n\
                     20010db8000000000000000000000010 02 40 00 80     eth0\n";
        assert_eq!(parse_ips(trie, inet6), ["10.9.9.9", "2001:db8::10"]);
    }
}
