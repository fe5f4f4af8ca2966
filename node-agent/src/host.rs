//! Facts about this host (CPUs, memory, KVM, QEMU version) and small process helpers the
//! agent uses to observe QEMU without being its parent (after a restart it adopts them).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory_mib: u64,
    pub kvm: bool,
    pub qemu_version: Option<String>,
    pub kernel: String,
}

pub fn facts() -> HostFacts {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let memory_mib = meminfo_kib("MemTotal").unwrap_or(0) / 1024;
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let qemu_version = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim_start_matches("QEMU emulator version ").to_string()));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    HostFacts { cpus, memory_mib, kvm, qemu_version, kernel }
}

pub fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// Whether `pid` is alive and its command line mentions `needle` (guards against pid reuse).
pub fn process_alive(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| stat_field(&s, 3) == Some("Z")) {
        return false;
    }
    String::from_utf8_lossy(&cmdline).contains(needle)
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat; the command name may hold spaces.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(n.checked_sub(3)?)
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 =
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) of a process in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let utime: u64 = stat_field(&stat, 14)?.parse().ok()?;
    let stime: u64 = stat_field(&stat, 15)?.parse().ok()?;
    Some(utime + stime)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether a Linux bridge of that name exists.
pub fn bridge_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("bridge").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_observable() {
        let pid = std::process::id();
        assert!(process_alive(pid, ""));
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(cpu_ticks(pid).is_some());
        assert!(facts().cpus >= 1);
        assert!(facts().memory_mib > 0);
    }

    #[test]
    fn stat_fields_survive_spaces_in_names() {
        let stat = "42 (qemu system) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 100 0 0";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 14), Some("7"));
        assert_eq!(stat_field(stat, 15), Some("3"));
    }
}
