//! Renders a container's liblxc config (the `lxc.*` keys `pct` keeps in `/var/lib/lxc/<vmid>/config`)
//! from a [`LinuxContainerSpec`] and the host facts the driver resolved for it ([`CtPlan`]).
//!
//! Everything here is pure — no host reads, no writes — so the output is golden-tested and the driver
//! stays a thin client of the lxc tools. The config is self-contained: it does not `lxc.include` the
//! distribution files under `/usr/share/lxc/config`, because their content changes with the host's lxc
//! package; the defaults they would give (device allowlist, capability drops, auto mounts, seccomp
//! denylist) are written out here instead. The seccomp policy is a separate file, rendered by
//! [`render_seccomp`], that the driver writes to [`CtPlan::seccomp_profile`].
//!
//! Lines come in this fixed order, one `key = value` each:
//! 1. identity: `lxc.uts.name`, `lxc.arch`, `lxc.log.file`
//! 2. isolation: `lxc.idmap`, `lxc.cap.drop`, `lxc.apparmor.*`, `lxc.seccomp.profile`
//! 3. file systems: `lxc.rootfs.*`, `lxc.autodev`, `lxc.mount.auto`, then `lxc.mount.entry` for mount
//!    points ordered by target path (parents before children), then `/dev/fuse`
//! 4. cgroup limits: device allowlist, memory, cpu (`lxc.cgroup2.*`, or `lxc.cgroup.*` on a host whose
//!    controllers are still on cgroup v1)
//! 5. console and init: `lxc.console.*`, `lxc.tty.max`, `lxc.pty.max`, `lxc.environment`,
//!    `lxc.signal.halt`
//! 6. network: `lxc.net.<N>.*` by ascending `N` (the number of the NIC's `netN` id)
//! 7. `spec.rawLxc`, verbatim and in order, so a raw key overrides a rendered one
//!
//! Not rendered here, on purpose: `cores` (a cpuset needs the host's cpu list; the driver can add it),
//! NIC `rate` and `firewall` (tc and nft act on the host-side veth, named by [`veth_name`]), and
//! guest-side files (hostname, resolv.conf, root password, ssh keys), which a setup step writes into
//! the rootfs.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use kpve_crds::{CtArch, CtNic, LinuxContainerSpec, MountOptions};

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// A rendering failure; `field` is the path of the offending spec or plan field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The plan does not belong to the spec — a driver bug, not a user error.
    #[error("{field}: {message}")]
    PlanMismatch { field: String, message: String },
    #[error("{field}: {message}")]
    Unsupported { field: String, message: String },
    #[error(
        "{field}: unknown file system '{value}' in features.mount; use lower-case names like nfs or cifs"
    )]
    InvalidFeature { field: String, value: String },
    #[error("{field}: raw key '{key}' must start with 'lxc.' and use only [a-z0-9_.]")]
    RawLxcKey { field: String, key: String },
    #[error("{field}: path '{path}' must be absolute, without '.' or '..' components")]
    NotAbsolute { field: String, path: String },
    #[error("{field}: '{value}' is not an address in CIDR notation (like 192.0.2.10/24)")]
    NotCidr { field: String, value: String },
    #[error("{field}: '{value}' is not an IP address")]
    NotIp { field: String, value: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    /// The field the error is about, for status conditions and tests.
    pub fn field(&self) -> &str {
        match self {
            Self::PlanMismatch { field, .. }
            | Self::Unsupported { field, .. }
            | Self::InvalidFeature { field, .. }
            | Self::RawLxcKey { field, .. }
            | Self::NotAbsolute { field, .. }
            | Self::NotCidr { field, .. }
            | Self::NotIp { field, .. }
            | Self::Invalid { field, .. } => field,
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

fn mismatch(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::PlanMismatch { field: field.into(), message: message.into() }
}

/// A volume the driver has allocated and can bind-mount: the rootfs or one mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMount {
    /// `rootfs`, `mp0`, …
    pub id: String,
    /// The volume's directory on the host (a dir pool's `subvol-<vmid>-disk-<n>`).
    pub host_path: PathBuf,
    /// `/` for the rootfs, the mount point's `path` otherwise.
    pub target: String,
    pub read_only: bool,
}

/// The host side of one NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVeth {
    /// `net0`, …
    pub id: String,
    /// The host-side veth name, [`veth_name`] like Proxmox, so firewall and tc rules can find it.
    pub host_name: String,
    /// The guest MAC; the driver generates one when the spec has no `hwaddr`.
    pub mac: String,
}

/// A user-namespace map of container ids 0.. onto a host range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub host_uid: u32,
    pub host_gid: u32,
    pub count: u32,
}

impl Default for IdMap {
    /// The range Proxmox gives every unprivileged container (`root:100000:65536` in /etc/subuid).
    fn default() -> Self {
        Self { host_uid: 100_000, host_gid: 100_000, count: 65_536 }
    }
}

/// Where the host's memory, cpu and devices controllers live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v2 only (`lxc.cgroup2.*`), what current Proxmox requires.
    #[default]
    Unified,
    /// Hybrid or legacy hosts whose controllers are mounted as cgroup v1 (`lxc.cgroup.*`); lxc applies
    /// `lxc.cgroup2.*` keys only to the unified tree, where these controllers are absent.
    Legacy,
}

/// What the driver resolved on the host for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtPlan {
    pub vmid: u32,
    pub rootfs: ResolvedMount,
    /// One per `spec.mountPoints` entry, matched by id.
    pub mounts: Vec<ResolvedMount>,
    /// One per `spec.nics` entry, matched by id.
    pub veths: Vec<ResolvedVeth>,
    /// Required for unprivileged containers, absent for privileged ones.
    pub idmap: Option<IdMap>,
    pub log_file: PathBuf,
    pub console_log: Option<PathBuf>,
    /// Whether the host kernel runs AppArmor: with it lxc generates a per-container profile, without it
    /// the config says `unconfined` so nothing depends on a profile that cannot load.
    pub host_apparmor: bool,
    pub cgroup: CgroupLayout,
    /// Where the driver writes [`render_seccomp`]'s output.
    pub seccomp_profile: PathBuf,
}

/// The name of a container volume on a dir pool, as Proxmox names it (a directory).
pub fn ct_volume_name(vmid: u32, index: usize) -> String {
    format!("subvol-{vmid}-disk-{index}.subvol")
}

/// The host-side veth name of NIC `net<index>`, as Proxmox names it.
pub fn veth_name(vmid: u32, index: usize) -> String {
    format!("veth{vmid}i{index}")
}

/// Capabilities a privileged container loses: MAC policy, the host clock, kernel modules and raw I/O
/// would all reach past the container. Unprivileged containers keep all, as they only hold them
/// inside their user namespace.
const PRIVILEGED_CAP_DROP: &str = "mac_admin mac_override sys_time sys_module sys_rawio";

/// Device nodes a privileged container may use; any device may still be created (`m`) so that
/// package scripts calling mknod do not fail, but not opened.
const PRIVILEGED_DEVICES: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",   // null
    "c 1:5 rwm",   // zero
    "c 1:7 rwm",   // full
    "c 1:8 rwm",   // random
    "c 1:9 rwm",   // urandom
    "c 5:0 rwm",   // tty
    "c 5:2 rwm",   // ptmx
    "c 136:* rwm", // pts, also backing lxc's ttys
];
const CONSOLE_DEVICE: &str = "c 5:1 rwm";
const FUSE_DEVICE: &str = "c 10:229 rwm";

/// Bind-mount options from `mountoptions` that mean something for a directory; `discard` is a block
/// device option and is dropped.
const BIND_MOUNT_OPTIONS: &[&str] = &["noatime", "lazytime", "nodev", "noexec", "nosuid"];

/// The cfs period lxc and Proxmox use; `cpulimit` scales the quota against it.
const CPU_PERIOD_US: u64 = 100_000;

/// Renders the liblxc config for `spec` on the host described by `plan`.
pub fn render(spec: &LinuxContainerSpec, plan: &CtPlan) -> Result<String> {
    if let Some(vmid) = spec.vmid
        && vmid != plan.vmid
    {
        return Err(mismatch("plan.vmid", format!("{} differs from spec.vmid {vmid}", plan.vmid)));
    }
    let raw = raw_lines(spec)?;
    // Like Proxmox, raw `lxc.idmap` lines are a custom id map: they replace the default one and
    // make the container unprivileged in every other respect too.
    let custom_idmap = raw.iter().any(|(k, _)| *k == "lxc.idmap");
    let userns = spec.unprivileged || custom_idmap;
    let features = spec.features.clone().unwrap_or_default();
    if features.mknod {
        return Err(ConfigError::Unsupported {
            field: "spec.features.mknod".into(),
            message: "needs a seccomp notify proxy kpve does not run yet; remove the feature".into(),
        });
    }
    for (i, fs) in features.mount.iter().enumerate() {
        if fs.is_empty() || !fs.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return Err(ConfigError::InvalidFeature {
                field: format!("spec.features.mount[{i}]"),
                value: fs.clone(),
            });
        }
    }

    let mut out = Lines::default();

    // 1. identity
    let hostname = spec.hostname.clone().unwrap_or_else(|| format!("CT{}", plan.vmid));
    check_hostname(&hostname)?;
    out.push("lxc.uts.name", hostname);
    out.push("lxc.arch", lxc_arch(spec.arch)?);
    out.push("lxc.log.file", path_value("plan.logFile", &plan.log_file)?);

    // 2. isolation
    match (spec.unprivileged && !custom_idmap, plan.idmap) {
        (true, Some(map)) => {
            if map.count == 0 {
                return Err(mismatch("plan.idmap.count", "an id map needs at least one id"));
            }
            out.push("lxc.idmap", format!("u 0 {} {}", map.host_uid, map.count));
            out.push("lxc.idmap", format!("g 0 {} {}", map.host_gid, map.count));
        }
        (true, None) => return Err(mismatch("plan.idmap", "an unprivileged container needs an id map")),
        (false, Some(_)) if !custom_idmap => {
            return Err(mismatch("plan.idmap", "a privileged container must not have an id map"));
        }
        (false, _) => {}
    }
    if !userns {
        out.push("lxc.cap.drop", PRIVILEGED_CAP_DROP);
    }
    if plan.host_apparmor {
        out.push("lxc.apparmor.profile", "generated");
        if features.nesting {
            out.push("lxc.apparmor.allow_nesting", "1");
        } else {
            // A container that may remount /proc or /sys could chown them and break host tools.
            out.push("lxc.apparmor.raw", "deny mount -> /proc/,");
            out.push("lxc.apparmor.raw", "deny mount -> /sys/,");
        }
        if features.fuse {
            out.push("lxc.apparmor.raw", "mount fstype=fuse,");
        }
        for fs in &features.mount {
            out.push("lxc.apparmor.raw", format!("mount fstype={fs},"));
        }
    } else {
        out.push("lxc.apparmor.profile", "unconfined");
    }
    out.push("lxc.seccomp.profile", path_value("plan.seccompProfile", &plan.seccomp_profile)?);

    // 3. file systems
    let rootfs = &plan.rootfs;
    if rootfs.id != "rootfs" {
        return Err(mismatch("plan.rootfs.id", format!("'{}' must be 'rootfs'", rootfs.id)));
    }
    if rootfs.target != "/" {
        return Err(mismatch("plan.rootfs.target", format!("'{}' must be '/'", rootfs.target)));
    }
    let rootfs_path = path_value("plan.rootfs.hostPath", &rootfs.host_path)?;
    out.push("lxc.rootfs.path", format!("dir:{rootfs_path}"));
    let rootfs_opts =
        mount_options("spec.rootfs", &spec.rootfs.mount, rootfs.read_only || spec.rootfs.mount.readonly)?;
    if !rootfs_opts.is_empty() {
        out.push("lxc.rootfs.options", rootfs_opts.join(","));
    }
    // lxc's default, stated because nothing else in a self-contained config populates /dev.
    out.push("lxc.autodev", "1");
    // `sys:mixed` keeps /sys read-only but for the container's own network devices, which is what
    // systemd-networkd and udev expect. As in Proxmox, force_rw_sys only opens it for unprivileged
    // containers; a privileged one with a writable /sys could reconfigure the host.
    let sys = if userns && features.force_rw_sys { "sys:rw" } else { "sys:mixed" };
    // With a cgroup namespace lxc leaves cgroup mounting to init unless forced; nested runtimes
    // need a writable tree they can create children in.
    let cgroup = if features.nesting { "cgroup:rw:force" } else { "cgroup:mixed" };
    out.push("lxc.mount.auto", format!("proc:mixed {sys} {cgroup}"));
    for entry in mount_entries(spec, plan)? {
        out.push("lxc.mount.entry", entry);
    }
    if features.fuse {
        out.push("lxc.mount.entry", "/dev/fuse dev/fuse none bind,create=file 0 0");
    }

    // 4. cgroup limits
    let cg = match plan.cgroup {
        CgroupLayout::Unified => "lxc.cgroup2",
        CgroupLayout::Legacy => "lxc.cgroup",
    };
    // In a user namespace the kernel refuses mknod of devices, so the container only has the nodes
    // lxc bind-mounts in; like Proxmox (whose userns.conf clears the list), only privileged
    // containers get an allowlist.
    if !userns {
        out.push(format!("{cg}.devices.deny"), "a");
        for dev in PRIVILEGED_DEVICES {
            out.push(format!("{cg}.devices.allow"), *dev);
        }
        if spec.console {
            out.push(format!("{cg}.devices.allow"), CONSOLE_DEVICE);
        }
        if features.fuse {
            out.push(format!("{cg}.devices.allow"), FUSE_DEVICE);
        }
    }
    if spec.memory < 16 {
        return Err(invalid("spec.memory", format!("{} MiB is below the minimum of 16 MiB", spec.memory)));
    }
    let memory = u64::from(spec.memory) << 20;
    let swap = u64::from(spec.swap) << 20;
    match plan.cgroup {
        CgroupLayout::Unified => {
            out.push(format!("{cg}.memory.max"), memory.to_string());
            out.push(format!("{cg}.memory.swap.max"), swap.to_string());
        }
        CgroupLayout::Legacy => {
            // cgroup v1 limits memory+swap together, so the swap allowance is added on top.
            out.push(format!("{cg}.memory.limit_in_bytes"), memory.to_string());
            out.push(format!("{cg}.memory.memsw.limit_in_bytes"), (memory + swap).to_string());
        }
    }
    if let Some(limit) = spec.cpulimit {
        if !limit.is_finite() || !(0.0..=8192.0).contains(&limit) {
            return Err(invalid("spec.cpulimit", format!("{limit} is outside 0–8192 cpus")));
        }
        // 0 means unlimited in Proxmox. Rounded, not truncated, so 0.29 does not become 28999.
        let quota = (limit * CPU_PERIOD_US as f64).round() as u64;
        if quota > 0 {
            match plan.cgroup {
                CgroupLayout::Unified => {
                    out.push(format!("{cg}.cpu.max"), format!("{quota} {CPU_PERIOD_US}"))
                }
                CgroupLayout::Legacy => {
                    out.push(format!("{cg}.cpu.cfs_period_us"), CPU_PERIOD_US.to_string());
                    out.push(format!("{cg}.cpu.cfs_quota_us"), quota.to_string());
                }
            }
        }
    }
    if let Some(units) = spec.cpuunits {
        // Proxmox accepts 0–500000 for both cgroup versions and clamps to what the kernel takes.
        match plan.cgroup {
            CgroupLayout::Unified => out.push(format!("{cg}.cpu.weight"), units.clamp(1, 10_000).to_string()),
            CgroupLayout::Legacy => out.push(format!("{cg}.cpu.shares"), units.clamp(2, 262_144).to_string()),
        }
    }

    // 5. console and init
    if spec.console {
        if let Some(log) = &plan.console_log {
            out.push("lxc.console.logfile", path_value("plan.consoleLog", log)?);
        }
    } else {
        if plan.console_log.is_some() {
            return Err(mismatch("plan.consoleLog", "spec.console is false, so there is no console to log"));
        }
        out.push("lxc.console.path", "none");
    }
    if spec.tty > 6 {
        return Err(invalid("spec.tty", format!("{} is more than the 6 ttys Proxmox allows", spec.tty)));
    }
    out.push("lxc.tty.max", spec.tty.to_string());
    // A bounded devpts instance of its own, so the container cannot exhaust the host's ptys.
    out.push("lxc.pty.max", "1024");
    // Some init scripts misbehave without a terminal type; Proxmox sets the same.
    out.push("lxc.environment", "TERM=linux");
    // lxc's default, stated because the driver's graceful stop relies on it: systemd ≥ 246
    // (sigpwr-container-shutdown), sysvinit (powerfail) and busybox init all shut down on SIGPWR.
    out.push("lxc.signal.halt", "SIGPWR");

    // 6. network
    for line in network_lines(spec, plan)? {
        out.push(line.0, line.1);
    }

    // 7. raw keys
    for (k, v) in raw {
        out.push(k, v);
    }
    Ok(out.finish())
}

/// Renders the seccomp policy [`render`] points `lxc.seccomp.profile` at.
pub fn render_seccomp(spec: &LinuxContainerSpec) -> String {
    let userns = spec.unprivileged || spec.raw_lxc.iter().any(|r| r.key == "lxc.idmap");
    let keyctl = spec.features.as_ref().is_some_and(|f| f.keyctl);
    // lxc's own denylist: loading kernel code, kexec and file-handle opens (which escape a bind
    // mount) would each give a container root the host; `umount -f` of shared mounts is refused too.
    let mut s = String::from(
        "2\ndenylist\nreject_force_umount\n[all]\n\
         kexec_load errno 1\nopen_by_handle_at errno 1\ninit_module errno 1\n\
         finit_module errno 1\ndelete_module errno 1\n",
    );
    if userns {
        if !keyctl {
            // The kernel keyring is not namespaced: every container mapped to the same host uid would
            // share it. ENOSYS makes systemd fall back to running without keyrings.
            s.push_str("keyctl errno 38\n");
        }
        // btrfs ioctls (type 0x94): in a user namespace snapshots can be made but not deleted.
        s.push_str("ioctl errno 1 [1,0x9400,SCMP_CMP_MASKED_EQ,0xff00]\n");
        // AF_ALG (38) sockets expose the kernel crypto API, a recurring source of exploits.
        s.push_str("socket errno 97 [0,38,SCMP_CMP_EQ]\n");
    }
    s
}

/// Collects `key = value` lines, refusing values that would spill onto a second line.
#[derive(Default)]
struct Lines {
    lines: Vec<(String, String)>,
}

impl Lines {
    fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.lines.push((key.into(), value.into()));
    }

    fn finish(self) -> String {
        let mut s = String::new();
        for (k, v) in self.lines {
            let _ = writeln!(s, "{k} = {v}");
        }
        s
    }
}

/// A value must stay on its line; anything after a newline would be parsed as another key.
fn single_line(field: &str, value: &str) -> Result<()> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(invalid(field, "must not contain line breaks or NUL characters"));
    }
    Ok(())
}

fn path_value(field: &str, path: &Path) -> Result<String> {
    let s = path.to_str().ok_or_else(|| invalid(field, "path is not valid UTF-8"))?;
    single_line(field, s)?;
    check_absolute(field, s)?;
    Ok(s.to_string())
}

/// Absolute and without `.`/`..`, so a target cannot climb out of the rootfs.
fn check_absolute(field: &str, path: &str) -> Result<()> {
    let ok = path.starts_with('/') && path.split('/').all(|c| c != "." && c != "..");
    if ok { Ok(()) } else { Err(ConfigError::NotAbsolute { field: field.into(), path: path.into() }) }
}

fn check_hostname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !name.starts_with(['.', '-'])
        && !name.ends_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(invalid("spec.hostname", format!("'{name}' is not a host name (letters, digits, '.', '-')")))
    }
}

fn lxc_arch(arch: CtArch) -> Result<&'static str> {
    Ok(match arch {
        CtArch::Amd64 => "amd64",
        CtArch::I386 => "i386",
        CtArch::Arm64 => "arm64",
        CtArch::Armhf => "armhf",
        CtArch::Riscv64 => "riscv64",
        CtArch::Riscv32 => {
            return Err(ConfigError::Unsupported {
                field: "spec.arch".into(),
                message: "liblxc has no riscv32 personality; use riscv64".into(),
            });
        }
    })
}

/// `rawLxc` entries, validated: only `lxc.*` keys, so a raw line can tune lxc but not smuggle in
/// something the config parser would read differently.
fn raw_lines(spec: &LinuxContainerSpec) -> Result<Vec<(&str, &str)>> {
    let mut lines = Vec::with_capacity(spec.raw_lxc.len());
    for (i, raw) in spec.raw_lxc.iter().enumerate() {
        let key = raw.key.as_str();
        let ok = key.strip_prefix("lxc.").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.'))
        });
        if !ok {
            return Err(ConfigError::RawLxcKey { field: format!("spec.rawLxc[{i}].key"), key: key.into() });
        }
        single_line(&format!("spec.rawLxc[{i}].value"), &raw.value)?;
        lines.push((key, raw.value.as_str()));
    }
    Ok(lines)
}

/// Mount options shared by the rootfs and mount points: `ro` plus the bind-relevant `mountoptions`.
fn mount_options(field: &str, mount: &MountOptions, read_only: bool) -> Result<Vec<&'static str>> {
    let mut opts = Vec::new();
    if read_only {
        opts.push("ro");
    }
    for opt in mount.mountoptions.iter().flat_map(|o| o.split(';')).filter(|o| !o.is_empty()) {
        match BIND_MOUNT_OPTIONS.iter().find(|known| **known == opt) {
            Some(known) => opts.push(*known),
            None if opt == "discard" => {}
            None => {
                return Err(invalid(
                    format!("{field}.mountoptions"),
                    format!(
                        "unknown option '{opt}'; allowed: noatime, lazytime, nodev, noexec, nosuid, discard"
                    ),
                ));
            }
        }
    }
    Ok(opts)
}

/// One `lxc.mount.entry` per mount point, parents before children so a nested target lands on
/// the volume mounted above it.
fn mount_entries(spec: &LinuxContainerSpec, plan: &CtPlan) -> Result<Vec<String>> {
    check_ids(
        "plan.mounts",
        spec.mount_points.iter().map(|m| m.id.as_str()),
        plan.mounts.iter().map(|m| m.id.as_str()),
    )?;
    let mut entries = Vec::with_capacity(plan.mounts.len());
    for mp in &spec.mount_points {
        let resolved = plan.mounts.iter().find(|m| m.id == mp.id).expect("ids checked above");
        let field = format!("spec.mountPoints[{}]", mp.id);
        single_line(&format!("{field}.path"), &mp.path)?;
        check_absolute(&format!("{field}.path"), &mp.path)?;
        if resolved.target != mp.path {
            return Err(mismatch(
                format!("plan.mounts[{}].target", mp.id),
                format!("'{}' differs from the spec's path '{}'", resolved.target, mp.path),
            ));
        }
        let components: Vec<&str> = mp.path.split('/').filter(|c| !c.is_empty()).collect();
        if components.is_empty() {
            return Err(invalid(format!("{field}.path"), "'/' is the rootfs; pick a directory below it"));
        }
        let host = path_value(&format!("plan.mounts[{}].hostPath", mp.id), &resolved.host_path)?;
        // The plan may force read-only (a shared volume), never force read-write.
        let mut opts = vec!["bind", "create=dir"];
        opts.extend(mount_options(&field, &mp.mount, resolved.read_only || mp.mount.readonly)?);
        // A relative target is resolved inside the container's rootfs.
        let target = components.join("/");
        entries.push((
            components,
            format!("{} {} none {} 0 0", fstab_escape(&host), fstab_escape(&target), opts.join(",")),
        ));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for pair in entries.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(invalid(
                "spec.mountPoints",
                format!("two mount points target /{}", pair[0].0.join("/")),
            ));
        }
    }
    Ok(entries.into_iter().map(|(_, e)| e).collect())
}

/// fstab escapes, since lxc splits a mount entry on whitespace.
fn fstab_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

/// Every spec id has exactly one plan entry and the plan has nothing else.
fn check_ids<'a>(
    field: &str,
    spec: impl Iterator<Item = &'a str>,
    plan: impl Iterator<Item = &'a str>,
) -> Result<()> {
    let mut spec_ids = BTreeSet::new();
    for id in spec {
        if !spec_ids.insert(id) {
            return Err(invalid(field.replace("plan.", "spec."), format!("id '{id}' appears twice")));
        }
    }
    let mut plan_ids = BTreeSet::new();
    for id in plan {
        if !plan_ids.insert(id) {
            return Err(mismatch(field, format!("id '{id}' appears twice")));
        }
    }
    if let Some(id) = spec_ids.difference(&plan_ids).next() {
        return Err(mismatch(field, format!("'{id}' of the spec was not resolved")));
    }
    if let Some(id) = plan_ids.difference(&spec_ids).next() {
        return Err(mismatch(field, format!("'{id}' is not in the spec")));
    }
    Ok(())
}

fn is_ifname(s: &str) -> bool {
    // IFNAMSIZ is 16 including the NUL.
    (1..=15).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn nic_index(nic: &CtNic) -> Result<u32> {
    nic.id
        .strip_prefix("net")
        .filter(|n| !n.is_empty() && (n.len() == 1 || !n.starts_with('0')))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n <= 31)
        .ok_or_else(|| invalid(format!("spec.nics[{}].id", nic.id), "must be net0–net31"))
}

fn network_lines(spec: &LinuxContainerSpec, plan: &CtPlan) -> Result<Vec<(String, String)>> {
    check_ids(
        "plan.veths",
        spec.nics.iter().map(|n| n.id.as_str()),
        plan.veths.iter().map(|v| v.id.as_str()),
    )?;
    let mut nics = Vec::with_capacity(spec.nics.len());
    for nic in &spec.nics {
        nics.push((nic_index(nic)?, nic));
    }
    nics.sort_by_key(|(index, _)| *index);
    let mut lines = Vec::new();
    for (index, nic) in nics {
        let veth = plan.veths.iter().find(|v| v.id == nic.id).expect("ids checked above");
        let field = format!("spec.nics[{}]", nic.id);
        let key = |k: &str| format!("lxc.net.{index}.{k}");
        let mut put = |k: &str, v: String| lines.push((key(k), v));

        put("type", "veth".into());
        if !is_ifname(&veth.host_name) {
            return Err(mismatch(
                format!("plan.veths[{}].hostName", nic.id),
                format!("'{}' is not an interface name of at most 15 characters", veth.host_name),
            ));
        }
        put("veth.pair", veth.host_name.clone());
        if let Some(bridge) = &nic.bridge {
            if !is_ifname(bridge) {
                return Err(invalid(
                    format!("{field}.bridge"),
                    format!("'{bridge}' is not an interface name"),
                ));
            }
            put("link", bridge.clone());
        }
        if !nic.link_down {
            put("flags", "up".into());
        }
        if !is_mac(&veth.mac) {
            return Err(mismatch(
                format!("plan.veths[{}].mac", nic.id),
                format!("'{}' is not a MAC", veth.mac),
            ));
        }
        if let Some(hwaddr) = &nic.hwaddr
            && !hwaddr.eq_ignore_ascii_case(&veth.mac)
        {
            return Err(mismatch(
                format!("plan.veths[{}].mac", nic.id),
                format!("'{}' differs from the spec's hwaddr '{hwaddr}'", veth.mac),
            ));
        }
        put("hwaddr", veth.mac.clone());
        let name = if nic.name.is_empty() { format!("eth{index}") } else { nic.name.clone() };
        if !is_ifname(&name) {
            return Err(invalid(format!("{field}.name"), format!("'{name}' is not an interface name")));
        }
        put("name", name);
        if let Some(mtu) = nic.mtu {
            // Unset, lxc takes the bridge's MTU.
            if !(64..=65535).contains(&mtu) {
                return Err(invalid(format!("{field}.mtu"), format!("{mtu} is outside 64–65535")));
            }
            put("mtu", mtu.to_string());
        }
        // lxc ≥ 4 sets the VLAN on the bridge port itself; the bridge must be VLAN-aware.
        if let Some(tag) = nic.tag {
            check_vlan(&format!("{field}.tag"), u32::from(tag))?;
            put("veth.vlan.id", tag.to_string());
        }
        if let Some(trunks) = &nic.trunks {
            for t in trunks.split(';').filter(|t| !t.is_empty()) {
                let id = t.parse::<u32>().map_err(|_| {
                    invalid(format!("{field}.trunks"), format!("'{t}' is not a VLAN id; use ids like 10;20"))
                })?;
                check_vlan(&format!("{field}.trunks"), id)?;
                put("veth.vlan.tagged.id", id.to_string());
            }
        }
        let v4 =
            static_address(&format!("{field}.ip"), nic.ip.as_deref(), &["dhcp", "manual"], parse_v4_cidr)?;
        let v6 = static_address(
            &format!("{field}.ip6"),
            nic.ip6.as_deref(),
            &["auto", "dhcp", "manual"],
            parse_v6_cidr,
        )?;
        let gw4 = gateway(&format!("{field}.gw"), nic.gw.as_deref(), v4.is_some(), |s| {
            s.parse::<Ipv4Addr>().is_ok()
        })?;
        let gw6 = gateway(&format!("{field}.gw6"), nic.gw6.as_deref(), v6.is_some(), |s| {
            s.parse::<Ipv6Addr>().is_ok()
        })?;
        // Static addresses are set by lxc before init runs, so even a bare busybox guest is reachable;
        // dhcp/auto are left to the guest's own client. Like Proxmox, a link that starts down gets
        // no addresses: lxc could not add the gateway route through it.
        if !nic.link_down {
            for (k, v) in
                [("ipv4.address", v4), ("ipv4.gateway", gw4), ("ipv6.address", v6), ("ipv6.gateway", gw6)]
            {
                if let Some(v) = v {
                    put(k, v);
                }
            }
        }
    }
    Ok(lines)
}

fn check_vlan(field: &str, id: u32) -> Result<()> {
    if (1..=4094).contains(&id) {
        Ok(())
    } else {
        Err(invalid(field, format!("VLAN {id} is outside 1–4094")))
    }
}

/// A static address in CIDR form, or `None` for the keywords the guest handles itself.
fn static_address(
    field: &str,
    value: Option<&str>,
    keywords: &[&str],
    parse: fn(&str) -> Option<String>,
) -> Result<Option<String>> {
    match value {
        None => Ok(None),
        Some(v) if keywords.contains(&v) => Ok(None),
        Some(v) => {
            parse(v).map(Some).ok_or_else(|| ConfigError::NotCidr { field: field.into(), value: v.into() })
        }
    }
}

fn parse_v4_cidr(s: &str) -> Option<String> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some(format!("{addr}/{prefix}"))
}

fn parse_v6_cidr(s: &str) -> Option<String> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: Ipv6Addr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 128)?;
    Some(format!("{addr}/{prefix}"))
}

/// A gateway needs a static address on the same NIC: lxc adds the default route when it configures
/// the interface, and the kernel refuses a route through a gateway the interface cannot reach.
fn gateway(
    field: &str,
    value: Option<&str>,
    has_address: bool,
    valid: fn(&str) -> bool,
) -> Result<Option<String>> {
    let Some(gw) = value else { return Ok(None) };
    if !valid(gw) {
        return Err(ConfigError::NotIp { field: field.into(), value: gw.into() });
    }
    if !has_address {
        return Err(invalid(
            field,
            "a gateway needs a static address on this NIC; with dhcp the guest's client sets the route",
        ));
    }
    Ok(Some(gw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> LinuxContainerSpec {
        let mut base = json!({ "vmid": 101, "rootfs": { "pool": "local", "size": "1G" } });
        for (k, v) in value.as_object().expect("an object") {
            base[k] = v.clone();
        }
        serde_json::from_value(base).expect("a valid spec")
    }

    fn plan(spec: &LinuxContainerSpec) -> CtPlan {
        let vmid = spec.vmid.unwrap_or(101);
        let dir = |i| PathBuf::from(format!("/var/lib/kpve/local/images/{vmid}/{}", ct_volume_name(vmid, i)));
        CtPlan {
            vmid,
            rootfs: ResolvedMount {
                id: "rootfs".into(),
                host_path: dir(0),
                target: "/".into(),
                read_only: false,
            },
            mounts: spec
                .mount_points
                .iter()
                .enumerate()
                .map(|(i, m)| ResolvedMount {
                    id: m.id.clone(),
                    host_path: dir(i + 1),
                    target: m.path.clone(),
                    read_only: false,
                })
                .collect(),
            veths: spec
                .nics
                .iter()
                .map(|n| {
                    let i = nic_index(n).unwrap() as usize;
                    ResolvedVeth {
                        id: n.id.clone(),
                        host_name: veth_name(vmid, i),
                        mac: n.hwaddr.clone().unwrap_or_else(|| format!("BC:24:11:00:00:{i:02X}")),
                    }
                })
                .collect(),
            idmap: spec.unprivileged.then(IdMap::default),
            log_file: PathBuf::from(format!("/var/log/kpve/lxc/{vmid}.log")),
            console_log: None,
            host_apparmor: false,
            cgroup: CgroupLayout::Unified,
            seccomp_profile: PathBuf::from(format!("/var/lib/kpve/lxc/{vmid}/rules.seccomp")),
        }
    }

    fn render_err(value: serde_json::Value) -> ConfigError {
        let s = spec(value);
        render(&s, &plan(&s)).expect_err("render must fail")
    }

    #[test]
    fn names_follow_proxmox() {
        assert_eq!(ct_volume_name(101, 0), "subvol-101-disk-0.subvol");
        assert_eq!(veth_name(101, 2), "veth101i2");
    }

    #[test]
    fn hostname_defaults_to_ct_vmid() {
        let s = spec(json!({}));
        let text = render(&s, &plan(&s)).unwrap();
        assert!(text.starts_with("lxc.uts.name = CT101\nlxc.arch = amd64\n"), "{text}");
    }

    #[test]
    fn unknown_mount_feature_is_rejected() {
        let e = render_err(json!({ "features": { "mount": ["nfs", "Ext4!"] } }));
        assert_eq!(
            e,
            ConfigError::InvalidFeature { field: "spec.features.mount[1]".into(), value: "Ext4!".into() }
        );
    }

    #[test]
    fn mknod_feature_is_unsupported() {
        let e = render_err(json!({ "features": { "mknod": true } }));
        assert!(matches!(e, ConfigError::Unsupported { .. }));
        assert_eq!(e.field(), "spec.features.mknod");
    }

    #[test]
    fn raw_lxc_key_must_start_with_lxc() {
        let e = render_err(json!({ "rawLxc": [
            { "key": "lxc.cgroup2.pids.max", "value": "100" },
            { "key": "cgroup.pids.max", "value": "100" },
        ] }));
        assert_eq!(
            e,
            ConfigError::RawLxcKey { field: "spec.rawLxc[1].key".into(), key: "cgroup.pids.max".into() }
        );
    }

    #[test]
    fn raw_lxc_value_must_be_one_line() {
        let e =
            render_err(json!({ "rawLxc": [{ "key": "lxc.environment", "value": "A=1\nlxc.cap.drop =" }] }));
        assert_eq!(e.field(), "spec.rawLxc[0].value");
    }

    #[test]
    fn mount_target_must_be_absolute() {
        let e = render_err(json!({ "mountPoints": [{ "id": "mp0", "path": "data" }] }));
        assert_eq!(
            e,
            ConfigError::NotAbsolute { field: "spec.mountPoints[mp0].path".into(), path: "data".into() }
        );
        let e = render_err(json!({ "mountPoints": [{ "id": "mp0", "path": "/data/../../etc" }] }));
        assert!(matches!(e, ConfigError::NotAbsolute { .. }), "{e}");
    }

    #[test]
    fn mount_targets_must_differ() {
        let e = render_err(json!({ "mountPoints": [
            { "id": "mp0", "path": "/data" },
            { "id": "mp1", "path": "/data/" },
        ] }));
        assert_eq!(e.field(), "spec.mountPoints");
    }

    #[test]
    fn ip_must_be_cidr() {
        let e = render_err(json!({ "nics": [{ "id": "net0", "name": "eth0", "ip": "192.0.2.10" }] }));
        assert_eq!(
            e,
            ConfigError::NotCidr { field: "spec.nics[net0].ip".into(), value: "192.0.2.10".into() }
        );
        let e = render_err(json!({ "nics": [{ "id": "net0", "name": "eth0", "ip": "192.0.2.10/33" }] }));
        assert!(matches!(e, ConfigError::NotCidr { .. }));
        let e = render_err(json!({ "nics": [{ "id": "net0", "name": "eth0", "ip6": "2001:db8::1" }] }));
        assert_eq!(e.field(), "spec.nics[net0].ip6");
    }

    #[test]
    fn gateway_must_be_an_ip_with_a_static_address() {
        let e = render_err(
            json!({ "nics": [{ "id": "net0", "name": "eth0", "ip": "10.0.0.2/24", "gw": "10.0.0.300" }] }),
        );
        assert_eq!(e, ConfigError::NotIp { field: "spec.nics[net0].gw".into(), value: "10.0.0.300".into() });
        let e =
            render_err(json!({ "nics": [{ "id": "net0", "name": "eth0", "ip": "dhcp", "gw": "10.0.0.1" }] }));
        assert!(matches!(e, ConfigError::Invalid { ref field, .. } if field == "spec.nics[net0].gw"), "{e}");
    }

    #[test]
    fn vlan_tag_must_be_in_range() {
        let e = render_err(json!({ "nics": [{ "id": "net0", "name": "eth0", "tag": 4095 }] }));
        assert_eq!(e.field(), "spec.nics[net0].tag");
        let e = render_err(json!({ "nics": [{ "id": "net0", "name": "eth0", "trunks": "10;0" }] }));
        assert_eq!(e.field(), "spec.nics[net0].trunks");
    }

    #[test]
    fn riscv32_is_unsupported() {
        let e = render_err(json!({ "arch": "riscv32" }));
        assert_eq!(e.field(), "spec.arch");
    }

    #[test]
    fn plan_must_match_spec() {
        let s = spec(
            json!({ "nics": [{ "id": "net0", "name": "eth0" }], "mountPoints": [{ "id": "mp0", "path": "/a" }] }),
        );
        let good = plan(&s);

        let mut p = good.clone();
        p.vmid = 102;
        assert_eq!(render(&s, &p).unwrap_err().field(), "plan.vmid");

        let mut p = good.clone();
        p.idmap = None;
        assert_eq!(render(&s, &p).unwrap_err().field(), "plan.idmap");

        let mut p = good.clone();
        p.veths.clear();
        assert_eq!(render(&s, &p).unwrap_err().field(), "plan.veths");

        let mut p = good.clone();
        p.mounts[0].target = "/b".into();
        assert_eq!(render(&s, &p).unwrap_err().field(), "plan.mounts[mp0].target");

        let mut p = good.clone();
        p.veths[0].host_name = veth_name(999_999_999, 31);
        assert_eq!(render(&s, &p).unwrap_err().field(), "plan.veths[net0].hostName");

        let mut p = good.clone();
        p.rootfs.host_path = PathBuf::from("relative/subvol");
        assert!(matches!(render(&s, &p).unwrap_err(), ConfigError::NotAbsolute { .. }));

        let mut p = good;
        p.console_log = Some(PathBuf::from("/var/log/console.log"));
        let mut s = s;
        s.console = false;
        assert_eq!(render(&s, &p).unwrap_err().field(), "plan.consoleLog");
    }

    #[test]
    fn privileged_with_idmap_is_a_mismatch() {
        let s = spec(json!({ "unprivileged": false }));
        let mut p = plan(&s);
        p.idmap = Some(IdMap::default());
        assert_eq!(render(&s, &p).unwrap_err().field(), "plan.idmap");
    }

    #[test]
    fn raw_idmap_replaces_the_default_one() {
        let s = spec(json!({ "unprivileged": false, "rawLxc": [
            { "key": "lxc.idmap", "value": "u 0 200000 65536" },
            { "key": "lxc.idmap", "value": "g 0 200000 65536" },
        ] }));
        let text = render(&s, &plan(&s)).unwrap();
        assert_eq!(text.matches("lxc.idmap").count(), 2, "{text}");
        assert!(!text.contains("lxc.cap.drop"), "a custom id map makes the container unprivileged: {text}");
        assert!(render_seccomp(&s).contains("keyctl errno 38"));
    }

    #[test]
    fn seccomp_keyctl_follows_the_feature() {
        let unpriv = spec(json!({}));
        assert!(render_seccomp(&unpriv).contains("keyctl errno 38\n"));
        let keyctl = spec(json!({ "features": { "keyctl": true } }));
        assert!(!render_seccomp(&keyctl).contains("keyctl"));
        let privileged = spec(json!({ "unprivileged": false }));
        assert!(!render_seccomp(&privileged).contains("keyctl"));
        assert!(render_seccomp(&privileged).ends_with("delete_module errno 1\n"));
    }

    #[test]
    fn mount_paths_are_escaped() {
        let s = spec(json!({ "mountPoints": [{ "id": "mp0", "path": "/srv/my data" }] }));
        let text = render(&s, &plan(&s)).unwrap();
        assert!(text.contains(" srv/my\\040data none bind,create=dir 0 0\n"), "{text}");
    }
}
