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

/// A process's command line, arguments joined by NUL as the kernel keeps them.
pub fn cmdline(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 4)?.parse().ok()
}

/// The child processes of `pid` (its main thread's, which is where a forking parent's are).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
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

/// Bytes a network interface received and sent (`/sys/class/net/<if>/statistics`), 0 when absent.
pub fn link_bytes(name: &str) -> (u64, u64) {
    let stats = Path::new("/sys/class/net").join(name).join("statistics");
    let read =
        |f: &str| std::fs::read_to_string(stats.join(f)).ok().and_then(|v| v.trim().parse::<u64>().ok());
    (read("rx_bytes").unwrap_or(0), read("tx_bytes").unwrap_or(0))
}

/// Whether the host's memory controller is on cgroup v1 (hybrid or legacy hierarchy).
pub fn cgroup_v1_memory() -> bool {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines().any(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == "memory")))
}

/// Whether the kernel runs AppArmor.
pub fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled").is_ok_and(|s| s.starts_with('Y'))
}

/// An executable of that name on PATH.
pub fn on_path(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|p| p.is_file())
}

/// Whether `text` (the content of /etc/subuid or /etc/subgid) gives root ids `start..start+count`.
pub fn subid_range_granted(text: &str, start: u32, count: u32) -> bool {
    text.lines().any(|line| {
        let f: Vec<&str> = line.trim().split(':').collect();
        let (Some(first), Some(n)) =
            (f.get(1).and_then(|s| s.parse::<u64>().ok()), f.get(2).and_then(|s| s.parse::<u64>().ok()))
        else {
            return false;
        };
        matches!(f[0], "root" | "0")
            && first <= u64::from(start)
            && u64::from(start) + u64::from(count) <= first + n
    })
}

/// Why root cannot map container ids `start..start+count` here, if it cannot: lxc maps ids
/// with newuidmap/newgidmap whenever both are installed, and those check /etc/subuid and
/// /etc/subgid even for root (without them root writes the maps itself).
pub fn idmap_problem(start: u32, count: u32) -> Option<String> {
    if on_path("newuidmap").is_none() || on_path("newgidmap").is_none() {
        return None;
    }
    let granted =
        |file: &str| std::fs::read_to_string(file).is_ok_and(|text| subid_range_granted(&text, start, count));
    if granted("/etc/subuid") && granted("/etc/subgid") {
        return None;
    }
    Some(format!(
        "unprivileged containers need 'root:{start}:{count}' in /etc/subuid and /etc/subgid (newuidmap is installed); \
         add it (scripts/install-host-deps.sh does) or set spec.unprivileged: false"
    ))
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
    fn subid_ranges() {
        assert!(subid_range_granted("root:100000:65536\n", 100_000, 65_536));
        assert!(subid_range_granted("alice:1:2\n0:0:4294967295\n", 100_000, 65_536));
        assert!(!subid_range_granted("root:100000:1000\n", 100_000, 65_536));
        assert!(!subid_range_granted("alice:100000:65536\n", 100_000, 65_536));
        assert!(!subid_range_granted("", 100_000, 65_536));
    }

    #[test]
    fn stat_fields_survive_spaces_in_names() {
        let stat = "42 (qemu system) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 100 0 0";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 14), Some("7"));
        assert_eq!(stat_field(stat, 15), Some("3"));
    }
}
