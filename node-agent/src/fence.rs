//! Self-fencing on the host: the agent records when its lease was last renewed
//! (`DATA_DIR/agent/lease-ok`: the boot id, the accepted renewal's send time in milliseconds
//! since boot — a clock no wall-clock jump moves — and the self-fence deadline in force) and marks
//! the run directory of every HA guest it starts (`run/<vmid>/ha`). Once the lease has not been
//! renewed for the self-fence deadline, every marked guest is killed — by the agent's own LRM
//! loop, and by a small watchdog process (`kpve fence-watchdog`) that outlives the agent, so a
//! `kill -9` of the agent cannot leave an HA guest running past its lease.
//!
//! This is pve-ha-manager's watchdog-mux in spirit: where Proxmox lets the hardware watchdog
//! reset the whole node, kpve kills exactly the HA guests (other guests and the host stay).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::host;

const LEASE_OK: &str = "lease-ok";
const HA_MARKER: &str = "ha";
const WATCHDOG_PID: &str = "watchdog.pid";
/// The watchdog's command-line name (`kpve fence-watchdog`).
pub const WATCHDOG_COMMAND: &str = "fence-watchdog";

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Milliseconds since boot (`/proc/uptime`, CLOCK_BOOTTIME: it does not jump with the wall
/// clock and keeps counting through suspend). Every lease deadline on the node uses it.
pub fn boot_ms() -> u64 {
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let seconds: f64 = uptime.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    (seconds * 1000.0) as u64
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string()
}

/// Records the last accepted renewal and the deadline in force (atomically: the watchdog may
/// read at any moment).
pub fn write_lease_ok(agent_dir: &Path, sent_at: u64, fence_ms: u64) -> std::io::Result<()> {
    let tmp = agent_dir.join(format!("{LEASE_OK}.tmp"));
    std::fs::write(&tmp, format!("{} {sent_at} {fence_ms}\n", boot_id()))?;
    std::fs::rename(tmp, agent_dir.join(LEASE_OK))
}

/// The last accepted renewal (ms since boot) and the deadline it was made under; None when
/// there is none from this boot.
pub fn read_lease_ok(agent_dir: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(agent_dir.join(LEASE_OK)).ok()?;
    let mut words = text.split_whitespace();
    if words.next()? != boot_id() {
        return None;
    }
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// Marks (or unmarks) a guest's run directory as HA-managed: fencing kills marked guests.
pub fn mark_ha(run_dir: &Path, ha: bool) {
    let marker = run_dir.join(HA_MARKER);
    if ha {
        if run_dir.exists() && !marker.exists() {
            let _ = std::fs::write(marker, b"");
        }
    } else if marker.exists() {
        let _ = std::fs::remove_file(marker);
    }
}

/// Kills every HA guest under `run_root` at once (SIGKILL for QEMU, `lxc-stop -k` for
/// containers); the VMIDs that were running.
pub fn kill_ha_guests(run_root: &Path) -> Vec<u32> {
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_root) else { return killed };
    for entry in entries.flatten() {
        let Some(vmid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let run = entry.path();
        if !run.join(HA_MARKER).exists() {
            continue;
        }
        let engine = std::fs::read_to_string(run.join("engine")).unwrap_or_else(|_| "qemu".into());
        if engine.trim() == "lxc" {
            let state = Command::new("lxc-info")
                .arg("-P")
                .arg(run_root)
                .args(["-n", &vmid.to_string(), "-sH"])
                .output();
            if state.is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("STOPPED")) {
                let _ = Command::new("lxc-stop")
                    .arg("-P")
                    .arg(run_root)
                    .args(["-n", &vmid.to_string(), "-k"])
                    .stdin(Stdio::null())
                    .output();
                killed.push(vmid);
            }
        } else if let Some(pid) = host::read_pid(&run.join("qemu.pid"))
            && host::process_alive(pid, &format!("{}/", run.display()))
        {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            killed.push(vmid);
        }
    }
    killed
}

/// The watchdog process: kills HA guests whenever the lease is stale; ends when the agent's
/// directory is gone.
pub fn watchdog(agent_dir: &Path, fence_ms: u64) -> std::io::Result<()> {
    let run_root = agent_dir.join("run");
    std::fs::write(agent_dir.join(WATCHDOG_PID), std::process::id().to_string())?;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if !agent_dir.exists() {
            return Ok(());
        }
        let Some((ok, recorded)) = read_lease_ok(agent_dir) else { continue };
        let fence_ms = fence_ms.min(recorded);
        let now = boot_ms();
        if now >= ok + fence_ms {
            let killed = kill_ha_guests(&run_root);
            if !killed.is_empty() {
                eprintln!(
                    "kpve fence-watchdog: lease not renewed for {} ms (deadline {fence_ms} ms): killed HA guests {killed:?}",
                    now - ok
                );
            }
        }
    }
}

/// Starts the watchdog for `agent_dir` unless one runs.
pub fn ensure_watchdog(agent_dir: &Path, fence_ms: u64) -> std::io::Result<()> {
    let mine = format!("{WATCHDOG_COMMAND}\0--dir\0{}\0", agent_dir.display());
    let same = format!("{mine}--fence-ms\0{fence_ms}\0");
    if let Some(pid) = host::read_pid(&agent_dir.join(WATCHDOG_PID)) {
        if host::process_alive(pid, &same) {
            return Ok(());
        }
        if host::process_alive(pid, &mine) {
            // Started with another deadline: replace it.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
    let exe: PathBuf = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(agent_dir.join("watchdog.log"))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(exe)
        .arg(WATCHDOG_COMMAND)
        .arg("--dir")
        .arg(agent_dir)
        .arg("--fence-ms")
        .arg(fence_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a signal to the agent's group leaves it running.
        .process_group(0)
        .spawn()?;
    std::fs::write(agent_dir.join(WATCHDOG_PID), child.id().to_string())?;
    // Reap it if it ever ends while the agent runs.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ok_round_trips_and_only_marked_guests_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_lease_ok(dir.path()), None);
        write_lease_ok(dir.path(), 1234, 5000).unwrap();
        assert_eq!(read_lease_ok(dir.path()), Some((1234, 5000)));
        std::fs::write(dir.path().join(LEASE_OK), "another-boot 1234 5000").unwrap();
        assert_eq!(read_lease_ok(dir.path()), None, "a record from before a reboot is no lease");

        // A real process standing in for QEMU: killed only while its run dir is marked.
        let run_root = dir.path().join("run");
        let run = run_root.join("100");
        std::fs::create_dir_all(&run).unwrap();
        let mut child = Command::new("bash")
            .args(["-c", &format!("exec -a {}/qemu sleep 30", run.display())])
            .spawn()
            .unwrap();
        std::fs::write(run.join("qemu.pid"), child.id().to_string()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !host::process_alive(child.id(), &format!("{}/", run.display())) {
            assert!(std::time::Instant::now() < deadline, "the stand-in process did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(kill_ha_guests(&run_root).is_empty(), "unmarked: left alone");
        assert!(child.try_wait().unwrap().is_none());
        mark_ha(&run, true);
        assert_eq!(kill_ha_guests(&run_root), vec![100]);
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed by SIGKILL");
        mark_ha(&run, false);
        assert!(!run.join(HA_MARKER).exists());
    }
}
