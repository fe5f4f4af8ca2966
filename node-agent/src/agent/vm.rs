//! The QEMU runtime: VirtualMachines as QEMU processes, driven through QMP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kpve_crds::VirtualMachine;
use kpve_crds::common::PowerState;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::{
    Agent, CMDLINE_ANNOTATION, INITRD_ANNOTATION, KERNEL_ANNOTATION, Observed, Prepared, RunState, Runtime,
    Stall, generated_mac,
};
use crate::host;
use crate::qemu::argv::{self, Accel, KernelBoot, LaunchPaths, LaunchPlan, ResolvedDisk, ResolvedNic};
use crate::qemu::migration;
use crate::qemu::qmp::Qmp;
use crate::storage::{self, DirPool};

pub(crate) struct Qemu;

impl Runtime for Qemu {
    type Guest = VirtualMachine;
    type Plan = LaunchPlan;
    const KIND: &'static str = "VirtualMachine";
    const ENGINE: &'static str = "qemu";
    const PROCESS: &'static str = "QEMU";
    const LIVE_MIGRATION: bool = true;

    fn static_figures(vm: &VirtualMachine) -> Value {
        json!({"maxmem": u64::from(vm.spec.memory.size) * 1024 * 1024})
    }

    async fn prepare(
        agent: &Agent,
        vm: &VirtualMachine,
        vmid: u32,
        run: &Path,
    ) -> Result<Prepared<LaunchPlan>, Stall> {
        if vm.spec.template && vm.spec.power_state == PowerState::Running {
            return Err(Stall::new(
                "IsTemplate",
                "spec.template: a template never runs (clone it, or set template: false); powerState must be Stopped"
                    .to_string(),
            ));
        }
        let plan = plan(agent, vm, vmid, &LaunchPaths::new(run)).await?;
        // A stopped template keeps its volumes and has no launch definition: it never starts.
        let launch = if vm.spec.template {
            Vec::new()
        } else {
            argv::render(&vm.spec, &plan).map_err(|e| Stall::new("InvalidSpec", e.to_string()))?
        };
        let volumes = plan.disks.iter().map(|d| (d.id.clone(), volume_id(vm, d, vmid))).collect();
        let status = snapshots(agent, vm, vmid, &plan).await?;
        Ok(Prepared { launch, volumes, accelerator: Some(plan.accel.as_str()), status, plan })
    }

    async fn observe(_agent: &Agent, vmid: u32, run: &Path) -> Option<Observed> {
        let run = LaunchPaths::new(run);
        let pid = running_pid(&run, vmid)?;
        let state = match qmp_status(&run).await.as_deref() {
            Some("paused") => RunState::Paused,
            Some("running") | None => RunState::Running,
            Some(_) => RunState::Starting,
        };
        Some(Observed { pid, state })
    }

    async fn start(
        _agent: &Agent,
        vm: &VirtualMachine,
        vmid: u32,
        run: &Path,
        prepared: &Prepared<LaunchPlan>,
        extra: &[String],
    ) -> anyhow::Result<()> {
        let run = LaunchPaths::new(run);
        for stale in [run.qmp_socket(), run.serial_socket(), run.pid_file(), run.serial_log()] {
            let _ = std::fs::remove_file(stale);
        }
        let log = std::fs::File::create(run.run_dir.join("qemu.log"))?;
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.args(&prepared.launch)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: signals to the agent (and its death) do not reach QEMU.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn()?;
        // Reap it while this agent lives; after a restart the adopted process is observed
        // through its pid file instead.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let mut qmp = Qmp::connect(&run.qmp_socket(), Duration::from_secs(10)).await.map_err(|e| {
            let log = std::fs::read_to_string(run.run_dir.join("qemu.log")).unwrap_or_default();
            anyhow::anyhow!("{e}: {}", log.trim())
        })?;
        qmp.query_status().await?;
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
        Ok(())
    }

    /// ACPI powerdown, then quit, then SIGKILL; waits for the process to be gone.
    async fn stop(_agent: &Agent, vmid: u32, run: &Path, timeout: Duration) {
        let run = LaunchPaths::new(run);
        let Some(pid) = running_pid(&run, vmid) else { return };
        // The trailing slash keeps run/100 from matching run/1000's QEMU.
        let needle = format!("{}/", run.run_dir.display());
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
        if let Some(mut q) = qmp(&run).await {
            let _ = q.powerdown().await;
            drop(q);
            if gone(timeout).await {
                return;
            }
            if let Some(mut q) = qmp(&run).await {
                let _ = q.quit().await;
            }
            if gone(Duration::from_secs(5)).await {
                return;
            }
        }
        let _ = tokio::process::Command::new("kill").args(["-9", &pid.to_string()]).status().await;
        gone(Duration::from_secs(5)).await;
    }

    async fn migrate_send(
        _agent: &Agent,
        _vm: &VirtualMachine,
        _vmid: u32,
        run: &Path,
        m: &kpve_crds::Migration,
    ) -> Result<migration::Outcome, String> {
        let uri = m.uri.as_deref().ok_or("the target gave no migration address")?;
        let run = LaunchPaths::new(run);
        let mut q =
            Qmp::connect(&run.qmp_socket(), Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
        migration::send(&mut q, uri, m.nbd.as_deref(), &m.disks).await.map_err(|e| e.message)
    }

    async fn set_paused(_agent: &Agent, _vmid: u32, run: &Path, paused: bool) -> bool {
        let Some(mut q) = qmp(&LaunchPaths::new(run)).await else { return false };
        if paused { q.stop().await.is_ok() } else { q.cont().await.is_ok() }
    }

    async fn figures(
        agent: &Agent,
        vm: &VirtualMachine,
        vmid: u32,
        run: &Path,
        pid: u32,
        figures: &mut Value,
    ) {
        figures["mem"] = json!(host::rss_bytes(pid));
        // The memory in force is what QEMU was started with (a spec change waits for a restart).
        if let Some(mib) = super::read_checkpoint(run).and_then(|cp| {
            let launch = cp.launch;
            launch
                .iter()
                .position(|a| a == "-m")
                .and_then(|i| launch.get(i + 1))
                .and_then(|m| m.parse::<u64>().ok())
        }) {
            figures["maxmem"] = json!(mib * 1024 * 1024);
        }
        // Linux reports process times in USER_HZ = 100 ticks per second.
        if let Some(cpu) = host::cpu_ticks(pid).and_then(|t| agent.cpu_usage((vmid, pid), t as f64 / 100.0)) {
            figures["cpu"] = json!(cpu);
        }
        // Guest traffic seen from the host: what the tap receives, the guest sent.
        let (mut net_in, mut net_out) = (0u64, 0u64);
        for index in 0..vm.spec.nics.len() {
            let (rx, tx) = host::link_bytes(&format!("tap{vmid}i{index}"));
            net_out += rx;
            net_in += tx;
        }
        figures["netIn"] = json!(net_in);
        figures["netOut"] = json!(net_out);
        if let Some((read, written)) = block_stats(&LaunchPaths::new(run)).await {
            figures["diskRead"] = json!(read);
            figures["diskWrite"] = json!(written);
        }
    }
}

/// Volumes, NICs and kernel: everything besides the spec the command line needs.
async fn plan(agent: &Agent, vm: &VirtualMachine, vmid: u32, run: &LaunchPaths) -> Result<LaunchPlan, Stall> {
    let pool = agent.pool();
    pool.activate().map_err(|e| Stall::new("StorageUnavailable", e.to_string()))?;
    let mut disks = Vec::new();
    // A rollback not applied yet: the VM stops and each disk is reverted before its size is
    // looked at (the snapshot may predate a resize).
    let rollback_file = run.run_dir.join("rollback");
    let rollback = vm
        .spec
        .rollback
        .as_ref()
        .filter(|r| std::fs::read_to_string(&rollback_file).ok().as_deref() != Some(r.id.as_str()));
    let mut reverted = 0;
    for (index, disk) in vm.spec.disks.iter().enumerate() {
        let format = disk.format.map(|f| format!("{f:?}").to_lowercase()).unwrap_or_else(|| "qcow2".into());
        let volume = match (&disk.volume, &disk.pool, &disk.size) {
            (Some(volume), _, _) => volume.clone(),
            (None, Some(pool_name), Some(_)) | (None, Some(pool_name), None) if disk.clone_from.is_some() => {
                format!("{pool_name}:{}", DirPool::volume_name(vmid, index, &format))
            }
            (None, Some(pool_name), Some(_)) => {
                format!("{pool_name}:{}", DirPool::volume_name(vmid, index, &format))
            }
            (None, _, _) if disk.media.is_some() => continue,
            _ => {
                return Err(Stall::new(
                    "InvalidDisk",
                    format!("spec.disks[{}]: needs a volume, or a pool and a size", disk.id),
                ));
            }
        };
        let pool_name = volume.split(':').next().unwrap_or("");
        if pool_name != pool.name {
            return Err(Stall::new(
                "PoolNotFound",
                format!(
                    "spec.disks[{}]: storage pool {pool_name:?} does not exist on node {}",
                    disk.id,
                    agent.node()
                ),
            ));
        }
        let path = pool.path_of(&volume).map_err(|e| Stall::new("InvalidDisk", e.to_string()))?;
        if let Some(r) = rollback
            && !disk.is_media()
            && disk.image_format() == "qcow2"
            && path.exists()
        {
            let failed = |e: storage::StorageError| {
                Stall::new("RollbackFailed", format!("spec.disks[{}]: {e}", disk.id))
            };
            agent.forget_image(&path);
            let list = storage::image_snapshots(&path).await.map_err(failed)?;
            if list.contains(&r.snapshot) {
                // Proxmox stops the VM hard for a rollback: its memory is about to be wrong.
                // Only once a disk has the snapshot: a rollback that cannot happen kills nothing.
                if reverted == 0 && running_pid(run, vmid).is_some() {
                    Qemu::stop(agent, vmid, &run.run_dir, Duration::ZERO).await;
                }
                storage::image_snapshot(&path, "-a", &r.snapshot).await.map_err(failed)?;
                agent.volume_sizes.lock().unwrap_or_else(|e| e.into_inner()).remove(&path);
                reverted += 1;
            }
            agent.snapshot_cache.lock().unwrap_or_else(|e| e.into_inner()).insert(path.clone(), list);
        }
        if let Some(source) = &disk.clone_from
            && !path.exists()
        {
            // A new file: nothing this agent remembers about an earlier one at this path holds.
            agent.forget_image(&path);
            pool.copy_from(&source.volume, source.snapshot.as_deref(), &volume, &format).await.map_err(
                |e| {
                    Stall::new(
                        "CloneFailed",
                        format!("spec.disks[{}].cloneFrom {}: {e}", disk.id, source.volume),
                    )
                },
            )?;
        }
        if let Some(size) = &disk.size {
            let bytes = storage::parse_size(size).ok_or_else(|| {
                Stall::new("InvalidDisk", format!("spec.disks[{}].size: {size:?} is not a size", disk.id))
            })?;
            if !path.exists() {
                agent.forget_image(&path);
            }
            // A copy has its source's size: look at it before trusting the declared one.
            let created = pool
                .allocate(&volume, &format, bytes)
                .await
                .map_err(|e| Stall::new("AllocationFailed", format!("spec.disks[{}]: {e}", disk.id)))?
                && disk.clone_from.is_none();
            grow_disk(agent, &pool, &volume, &format, &disk.id, bytes, created, run, vmid).await?;
        }
        disks.push(ResolvedDisk { id: disk.id.clone(), path, format, media: None });
    }
    if let Some(r) = rollback {
        if reverted == 0 {
            return Err(Stall::new(
                "SnapshotMissing",
                format!("spec.rollback: no disk has snapshot {:?}", r.snapshot),
            ));
        }
        std::fs::create_dir_all(&run.run_dir)
            .and_then(|()| std::fs::write(&rollback_file, &r.id))
            .map_err(|e| Stall::new("RollbackFailed", format!("{}: {e}", rollback_file.display())))?;
        tracing::info!(vmid, snapshot = %r.snapshot, disks = reverted, "rolled back");
    }
    let mut nics = Vec::new();
    for (index, nic) in vm.spec.nics.iter().enumerate() {
        agent.require_bridge(&nic.id, nic.bridge.as_deref())?;
        let mac = nic.macaddr.clone().unwrap_or_else(|| generated_mac(&vm.uid().unwrap_or_default(), index));
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
        accel: Accel::choose(vm.spec.kvm, agent.facts.kvm),
        disks,
        nics,
        kernel,
        ovmf_code: None,
        vhost_net: Path::new("/dev/vhost-net").exists(),
        log_serial: true,
        paths: run.clone(),
    })
}

/// A declared size above the volume's grows it, as Proxmox's `resize` does: `qemu-img
/// resize` while the VM is stopped, QMP `block_resize` while it runs (the guest sees the new
/// size at once). A smaller declared size is refused: disks only grow.
#[allow(clippy::too_many_arguments)]
async fn grow_disk(
    agent: &Agent,
    pool: &DirPool,
    volume: &str,
    format: &str,
    id: &str,
    bytes: u64,
    created: bool,
    run: &LaunchPaths,
    vmid: u32,
) -> Result<(), Stall> {
    let Ok(path) = pool.path_of(volume) else { return Ok(()) };
    let known = agent.volume_sizes.lock().unwrap_or_else(|e| e.into_inner()).get(&path).copied();
    if created || known == Some(bytes) {
        agent.volume_sizes.lock().unwrap_or_else(|e| e.into_inner()).insert(path, bytes);
        return Ok(());
    }
    let current = pool
        .virtual_size(volume)
        .await
        .map_err(|e| Stall::new("StorageUnavailable", format!("spec.disks[{id}]: {e}")))?;
    if bytes < current {
        agent.volume_sizes.lock().unwrap_or_else(|e| e.into_inner()).insert(path, current);
        return Err(Stall::new(
            "ShrinkRefused",
            format!(
                "spec.disks[{id}].size: {bytes} bytes is smaller than the volume's {current}; disks only grow"
            ),
        ));
    }
    if bytes > current {
        if running_pid(run, vmid).is_some() {
            let mut qmp = qmp(run)
                .await
                .ok_or_else(|| Stall::new("ResizeFailed", "QMP is not answering".to_string()))?;
            qmp.execute("block_resize", Some(json!({"device": format!("drive-{id}"), "size": bytes})))
                .await
                .map_err(|e| Stall::new("ResizeFailed", format!("spec.disks[{id}]: block_resize: {e}")))?;
        } else {
            pool.grow(volume, format, bytes)
                .await
                .map_err(|e| Stall::new("ResizeFailed", format!("spec.disks[{id}]: {e}")))?;
        }
        tracing::info!(vmid, disk = id, from = current, to = bytes, "disk grown");
    }
    agent.volume_sizes.lock().unwrap_or_else(|e| e.into_inner()).insert(path, bytes);
    Ok(())
}

/// Brings the disks' internal snapshots to the declared ones (after [`plan`] applied a pending
/// rollback): snapshots declared but on no disk are taken (QMP while the VM runs, paused for
/// the moment so all disks agree; `qemu-img` otherwise), and snapshots this VM declared before
/// (its last `status.snapshots`) but no longer are deleted; snapshots kpve never made (an
/// attached image's own) are left alone. Returns the status part: the managed snapshots
/// present and the last rollback applied.
async fn snapshots(agent: &Agent, vm: &VirtualMachine, vmid: u32, plan: &LaunchPlan) -> Result<Value, Stall> {
    let run = &plan.paths;
    let applied = std::fs::read_to_string(run.run_dir.join("rollback")).ok();
    let images: Vec<(&str, &Path)> = vm
        .spec
        .disks
        .iter()
        .filter(|d| !d.is_media() && d.image_format() == "qcow2")
        .filter_map(|d| plan.disks.iter().find(|r| r.id == d.id).map(|r| (d.id.as_str(), r.path.as_path())))
        .collect();
    let declared: Vec<&str> = vm.spec.snapshots.iter().map(|s| s.name.as_str()).collect();
    let previous: Vec<String> = vm.status.as_ref().map(|s| s.snapshots.clone()).unwrap_or_default();
    let managed = |n: &str| declared.contains(&n) || previous.iter().any(|p| p == n);
    let failed = |e: String| Stall::new("SnapshotFailed", e);
    // What each image has (read once per image, then kept up to date by what this agent does;
    // forgotten whenever a command fails, so the next pass reads it again).
    let mut present: Vec<Vec<String>> = Vec::new();
    for (id, path) in &images {
        let known = agent.snapshot_cache.lock().unwrap_or_else(|e| e.into_inner()).get(*path).cloned();
        let list = match known {
            Some(list) => list,
            None => storage::image_snapshots(path)
                .await
                .map_err(|e| Stall::new("StorageUnavailable", format!("spec.disks[{id}]: {e}")))?,
        };
        agent.remember_snapshots(path, &list);
        present.push(list);
    }
    let running = running_pid(run, vmid).is_some();
    let new: Vec<&str> =
        declared.iter().copied().filter(|n| !present.iter().any(|l| l.iter().any(|x| x == n))).collect();
    // QMP only when there is something to take or delete: most passes change nothing.
    let stale = present.iter().flatten().any(|n| !declared.contains(&n.as_str()) && managed(n));
    let work = !images.is_empty() && (!new.is_empty() || stale);
    let mut q = if running && work { qmp(run).await } else { None };
    if running && work && q.is_none() {
        return Err(failed("QMP is not answering".into()));
    }
    if !new.is_empty() && !images.is_empty() {
        // QMP serves one client at a time: ask on this connection.
        let mut was_running = false;
        if let Some(q) = &mut q {
            was_running = q.query_status().await.is_ok_and(|s| s == "running");
            if was_running {
                q.stop().await.map_err(|e| failed(format!("pausing: {e}")))?;
            }
        }
        let mut outcome = Ok(());
        'take: for name in &new {
            let mut taken: Vec<usize> = Vec::new();
            for (i, (id, path)) in images.iter().enumerate() {
                if let Err(e) = snapshot_op(&mut q, path, id, "-c", name).await {
                    agent.forget_image(path);
                    // All disks or none: undo the part taken, so the next pass starts over.
                    for j in taken {
                        let (id, path) = images[j];
                        if snapshot_op(&mut q, path, id, "-d", name).await.is_err() {
                            agent.forget_image(path);
                        }
                        present[j].retain(|n| n != name);
                    }
                    outcome = Err(failed(format!("spec.snapshots[{name}] on {id}: {e}")));
                    break 'take;
                }
                present[i].push(name.to_string());
                taken.push(i);
            }
            tracing::info!(vmid, snapshot = name, "snapshot taken");
        }
        if let Some(q) = &mut q
            && was_running
        {
            let _ = q.cont().await;
        }
        for ((_, path), list) in images.iter().zip(&present) {
            agent.remember_snapshots(path, list);
        }
        outcome?;
    }
    for (i, (id, path)) in images.iter().enumerate() {
        let gone: Vec<String> =
            present[i].iter().filter(|n| !declared.contains(&n.as_str()) && managed(n)).cloned().collect();
        for name in gone {
            if let Err(e) = snapshot_op(&mut q, path, id, "-d", &name).await {
                agent.forget_image(path);
                return Err(failed(format!("deleting snapshot {name} of {id}: {e}")));
            }
            present[i].retain(|n| *n != name);
            agent.remember_snapshots(path, &present[i]);
            tracing::info!(vmid, snapshot = %name, disk = id, "snapshot deleted");
        }
    }
    let mut names: Vec<&String> = present.iter().flatten().filter(|n| managed(n)).collect();
    names.sort();
    names.dedup();
    Ok(json!({"snapshots": names, "rollback": applied}))
}

/// Takes (`-c`) or deletes (`-d`) internal snapshot `name` of disk `id`: through QMP when the
/// VM runs (`q`), with `qemu-img` on the image otherwise.
async fn snapshot_op(q: &mut Option<Qmp>, path: &Path, id: &str, op: &str, name: &str) -> Result<(), String> {
    match q {
        Some(q) => {
            let command = if op == "-c" {
                "blockdev-snapshot-internal-sync"
            } else {
                "blockdev-snapshot-delete-internal-sync"
            };
            q.execute(command, Some(json!({"device": format!("drive-{id}"), "name": name})))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        None => storage::image_snapshot(path, op, name).await.map_err(|e| e.to_string()),
    }
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

pub(crate) fn running_pid(run: &LaunchPaths, vmid: u32) -> Option<u32> {
    let pid = host::read_pid(&run.pid_file())?;
    (vmid > 0 && host::process_alive(pid, &format!("{}/", run.run_dir.display()))).then_some(pid)
}

pub(crate) async fn qmp(run: &LaunchPaths) -> Option<Qmp> {
    Qmp::connect(&run.qmp_socket(), Duration::from_secs(2)).await.ok()
}

async fn qmp_status(run: &LaunchPaths) -> Option<String> {
    qmp(run).await?.query_status().await.ok()
}

/// Bytes read and written by all of the guest's drives (QMP query-blockstats).
async fn block_stats(run: &LaunchPaths) -> Option<(u64, u64)> {
    let stats = qmp(run).await?.execute("query-blockstats", None).await.ok()?;
    let (mut read, mut written) = (0, 0);
    for device in stats.as_array()? {
        read += device.pointer("/stats/rd_bytes").and_then(Value::as_u64).unwrap_or(0);
        written += device.pointer("/stats/wr_bytes").and_then(Value::as_u64).unwrap_or(0);
    }
    Some((read, written))
}
