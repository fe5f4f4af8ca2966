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

use kpve_crds::{LinuxContainer, LinuxContainerSpec};
use kube::ResourceExt;
use serde_json::{Value, json};
use tokio::process::Command;

use super::{Agent, Observed, Prepared, RunState, Runtime, Stall, generated_mac};
use crate::host;
use crate::lxc::config::{self, CgroupLayout, ConfigError, CtPlan, IdMap, ResolvedMount, ResolvedVeth};
use crate::lxc::rootfs;
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
                if !path.exists() {
                    create.push((path.clone(), Some(template_path(&pool, spec, agent.node())?)));
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

    async fn observe(agent: &Agent, vmid: u32, run: &Path) -> Option<Observed> {
        if !run.join("config").exists() {
            return None;
        }
        let out = lxc(agent, "lxc-info", vmid, &["-s", "-p"]).await.ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim_start().strip_prefix(':')))
                .map(str::trim)
        };
        let state = match field("State")? {
            "RUNNING" => RunState::Running,
            "FROZEN" | "FREEZING" => RunState::Paused,
            "STARTING" | "THAWED" => RunState::Starting,
            _ => return None,
        };
        let pid = field("PID").and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Observed { pid, state })
    }

    async fn start(
        agent: &Agent,
        _ct: &LinuxContainer,
        vmid: u32,
        run: &Path,
        prepared: &Prepared<CtWork>,
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
        let started = lxc(agent, "lxc-start", vmid, &["-d"]).await;
        let waited = match &started {
            Ok(out) if out.status.success() => {
                lxc(agent, "lxc-wait", vmid, &["-s", "RUNNING", "-t", "10"]).await
            }
            _ => started,
        };
        match waited {
            Ok(out) if out.status.success() => Ok(()),
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
        let Some(observed) = Self::observe(agent, vmid, run).await else { return };
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
        if let Ok(out) = lxc(agent, "lxc-info", vmid, &["-i"]).await {
            let ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("IP:"))
                .map(|ip| ip.trim().to_string())
                .filter(|ip| !ip.is_empty() && ip != "127.0.0.1" && ip != "::1")
                .collect();
            figures["ips"] = json!(ips);
        }
    }
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
            std::fs::set_permissions(
                ancestor,
                std::fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o001),
            )?;
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

    fn memory_bytes(&self) -> Option<u64> {
        let text = if self.v1 {
            self.read("memory", "memory.usage_in_bytes")
        } else {
            self.read("", "memory.current")
        };
        text?.trim().parse().ok()
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
