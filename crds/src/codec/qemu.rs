//! qemu-server configs (`qemu-server/<vmid>.conf`) ⇄ [`VirtualMachineSpec`].

use std::collections::BTreeMap;

use super::conf::{ConfigFile, Section, percent_decode, uri_escape};
use super::propstr::{
    PropertyString, PropertyWriter, bool_str, enum_str, format_size, in_key_families, normalize_size,
    number_str, numbered, parse_bool, parse_enum, parse_number, parse_size, parse_uint,
};
use super::{CodecError, Result};
use crate::common::Startup;
use crate::vm::*;

/// A whole qemu-server config: the current spec plus the sections Proxmox keeps beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuConfig {
    /// The snapshot the current state derives from (`parent:` in the main section).
    pub parent: Option<String>,
    pub spec: VirtualMachineSpec,
    /// Changes waiting for a restart (`[PENDING]`), as raw keys; `delete` lists removals.
    pub pending: BTreeMap<String, String>,
    /// `[special:cloudinit]`: the cloud-init values the current drive was generated from.
    pub cloudinit: BTreeMap<String, String>,
    pub snapshots: Vec<QemuSnapshot>,
}

/// A snapshot section.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuSnapshot {
    pub name: String,
    pub parent: Option<String>,
    pub snaptime: Option<u64>,
    /// Volume holding the RAM state of a live snapshot.
    pub vmstate: Option<String>,
    /// Keys that only snapshots carry (`runningmachine`, `runningcpu`).
    pub running: BTreeMap<String, String>,
    pub spec: VirtualMachineSpec,
}

/// Keys of the qemu-server config that kpve accepts verbatim in `spec.options`.
/// (`[n]` families are matched by prefix.)
const PASSTHROUGH_KEYS: &[&str] = &[
    "acpi",
    "allow-ksm",
    "amd-sev",
    "arch",
    "args",
    "audio0",
    "autostart",
    "bootdisk",
    "cicustom",
    "freeze",
    "hookscript",
    "hostpci",
    "hotplug",
    "hugepages",
    "intel-tdx",
    "ivshmem",
    "keephugepages",
    "keyboard",
    "localtime",
    "lock",
    "meta",
    "migrate_downtime",
    "migrate_speed",
    "numa",
    "parallel",
    "reboot",
    "rng0",
    "serial",
    "smbios1",
    "spice_enhancements",
    "startdate",
    "tablet",
    "tdf",
    "unused",
    "usb",
    "vga",
    "virtiofs",
    "vmgenid",
    "vmstatestorage",
    "watchdog",
];

const DISK_PREFIXES: &[(&str, u32)] = &[("scsi", 30), ("virtio", 15), ("sata", 5), ("ide", 3)];

/// Drive properties kpve keeps verbatim in `Disk.options`.
const DISK_EXTRA: &[&str] = &[
    "bps",
    "bps_max_length",
    "bps_rd",
    "bps_rd_length",
    "bps_rd_max_length",
    "bps_wr",
    "bps_wr_length",
    "bps_wr_max_length",
    "detect_zeroes",
    "iops",
    "iops_max",
    "iops_max_length",
    "iops_rd",
    "iops_rd_length",
    "iops_rd_max",
    "iops_rd_max_length",
    "iops_wr",
    "iops_wr_length",
    "iops_wr_max",
    "iops_wr_max_length",
    "mbps",
    "mbps_max",
    "mbps_rd",
    "mbps_rd_max",
    "mbps_wr",
    "mbps_wr_max",
    "product",
    "queues",
    "rerror",
    "scsiblock",
    "shared",
    "snapshot",
    "vendor",
    "werror",
    "wwn",
    "efitype",
    "pre-enrolled-keys",
    "ms-cert",
    "version",
    "import-from",
];

const NIC_MODELS: &[&str] = &[
    "virtio",
    "e1000",
    "e1000e",
    "rtl8139",
    "vmxnet3",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
];

/// Parses a qemu-server config file.
pub fn parse_qemu_config(text: &str) -> Result<QemuConfig> {
    let mut file = ConfigFile::parse(text)?;
    let parent = file.main.entries.remove("parent");
    let spec = spec_from_section(&file.main)?;
    let mut config = QemuConfig {
        parent,
        spec,
        pending: BTreeMap::new(),
        cloudinit: BTreeMap::new(),
        snapshots: Vec::new(),
    };
    for section in &file.sections {
        match section.name.as_deref() {
            Some("PENDING") => config.pending = section.entries.clone(),
            Some("special:cloudinit") => config.cloudinit = section.entries.clone(),
            Some(name) if name.starts_with("special:") => {
                return Err(CodecError::invalid(
                    format!("[{name}]"),
                    "unknown special section; allowed: special:cloudinit",
                ));
            }
            Some(name) => {
                let mut section = section.clone();
                let parent = section.entries.remove("parent");
                let snaptime = section
                    .entries
                    .remove("snaptime")
                    .map(|v| parse_uint(&format!("[{name}].snaptime"), &v, 0, u64::MAX))
                    .transpose()?;
                let vmstate = section.entries.remove("vmstate");
                let mut running = BTreeMap::new();
                for key in ["runningmachine", "runningcpu"] {
                    if let Some(v) = section.entries.remove(key) {
                        running.insert(key.to_string(), v);
                    }
                }
                let spec = spec_from_section(&section).map_err(|e| in_section(name, e))?;
                config.snapshots.push(QemuSnapshot {
                    name: name.to_string(),
                    parent,
                    snaptime,
                    vmstate,
                    running,
                    spec,
                });
            }
            None => unreachable!("named sections always have a name"),
        }
    }
    Ok(config)
}

fn in_section(name: &str, e: CodecError) -> CodecError {
    match e {
        CodecError::Invalid { key, message } => CodecError::invalid(format!("[{name}].{key}"), message),
        other => other,
    }
}

/// Prints a qemu-server config file in Proxmox's canonical form.
pub fn print_qemu_config(config: &QemuConfig) -> String {
    let mut file = ConfigFile { main: section_from_spec(&config.spec), sections: Vec::new() };
    if let Some(parent) = &config.parent {
        file.main.entries.insert("parent".into(), parent.clone());
    }
    if !config.pending.is_empty() {
        let mut s = Section::named("PENDING");
        s.entries = config.pending.clone();
        file.sections.push(s);
    }
    if !config.cloudinit.is_empty() {
        let mut s = Section::named("special:cloudinit");
        s.entries = config.cloudinit.clone();
        file.sections.push(s);
    }
    let mut snapshots: Vec<&QemuSnapshot> = config.snapshots.iter().collect();
    snapshots.sort_by(|a, b| a.name.cmp(&b.name));
    for snap in snapshots {
        let mut s = section_from_spec(&snap.spec);
        s.name = Some(snap.name.clone());
        if let Some(p) = &snap.parent {
            s.entries.insert("parent".into(), p.clone());
        }
        if let Some(t) = snap.snaptime {
            s.entries.insert("snaptime".into(), t.to_string());
        }
        if let Some(v) = &snap.vmstate {
            s.entries.insert("vmstate".into(), v.clone());
        }
        s.entries.extend(snap.running.clone());
        file.sections.push(s);
    }
    file.print()
}

impl VirtualMachineSpec {
    /// Reads the main section of a qemu-server config (no vmid: that is the file name).
    pub fn from_qemu_config(text: &str) -> Result<Self> {
        parse_qemu_config(text).map(|c| c.spec)
    }

    /// Renders this spec as a qemu-server config.
    pub fn to_qemu_config(&self) -> String {
        section_to_text(section_from_spec(self))
    }
}

fn section_to_text(main: Section) -> String {
    ConfigFile { main, sections: Vec::new() }.print()
}

/// Maps one section's keys onto a spec.
pub fn spec_from_section(section: &Section) -> Result<VirtualMachineSpec> {
    let mut spec = VirtualMachineSpec { description: section.description.clone(), ..Default::default() };
    if !section.raw_lxc.is_empty() {
        return Err(CodecError::invalid(&section.raw_lxc[0].0, "lxc.* keys are not valid in a VM config"));
    }
    let mut cloud = CloudInit::default();
    let mut has_cloud = false;
    for (key, value) in &section.entries {
        let k = key.as_str();
        match k {
            "name" => spec.name = Some(value.clone()),
            "description" => spec.description = Some(value.clone()),
            "tags" => {
                spec.tags =
                    value.split([';', ',', ' ']).filter(|t| !t.is_empty()).map(str::to_string).collect()
            }
            "sockets" => spec.cpu.sockets = parse_uint(k, value, 1, 4)?,
            "cores" => spec.cpu.cores = parse_uint(k, value, 1, 128)?,
            "vcpus" => spec.cpu.vcpus = Some(parse_uint(k, value, 1, 512)?),
            "cpulimit" => spec.cpu.limit = Some(parse_number(k, value, 0.0, 128.0)?),
            "cpuunits" => spec.cpu.units = Some(parse_uint(k, value, 1, 262_144)?),
            "affinity" => spec.cpu.affinity = Some(value.clone()),
            "numa" => spec.cpu.numa = parse_bool(k, value)?,
            "cpu" => {
                let mut p = PropertyString::parse(k, value)?;
                spec.cpu.model = p.head.take().or_else(|| p.take("cputype"));
                spec.cpu.flags = p.take("flags");
                p.finish(k, &[])?;
            }
            "memory" => {
                let mut p = PropertyString::parse(k, value)?;
                let current = p
                    .head
                    .take()
                    .or_else(|| p.take("current"))
                    .ok_or_else(|| CodecError::invalid(k, "missing memory size in MiB"))?;
                spec.memory.size = parse_uint(k, &current, 16, 4_194_304)?;
                p.finish(k, &[])?;
            }
            "balloon" => spec.memory.balloon = Some(parse_uint(k, value, 0, 4_194_304)?),
            "shares" => spec.memory.shares = Some(parse_uint(k, value, 0, 50_000)?),
            "boot" => spec.boot = Some(parse_boot(value)?),
            "bios" => spec.bios = parse_enum(k, value)?,
            "machine" => spec.machine = Some(value.clone()),
            "ostype" => spec.ostype = Some(parse_enum(k, value)?),
            "scsihw" => spec.scsihw = Some(parse_enum(k, value)?),
            "kvm" => spec.kvm = parse_bool(k, value)?,
            "agent" => spec.agent = Some(parse_agent(value)?),
            "onboot" => spec.onboot = parse_bool(k, value)?,
            "protection" => spec.protection = parse_bool(k, value)?,
            "template" => spec.template = parse_bool(k, value)?,
            "startup" => spec.startup = Some(parse_startup(k, value)?),
            "ciuser" => {
                has_cloud = true;
                cloud.user = Some(value.clone())
            }
            "cipassword" => {
                has_cloud = true;
                cloud.password_hash = Some(value.clone())
            }
            "sshkeys" => {
                has_cloud = true;
                let decoded = String::from_utf8(percent_decode(value))
                    .map_err(|_| CodecError::invalid(k, "ssh keys are not valid UTF-8"))?;
                cloud.ssh_keys =
                    decoded.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
            }
            "nameserver" => {
                has_cloud = true;
                cloud.nameserver = Some(value.clone())
            }
            "searchdomain" => {
                has_cloud = true;
                cloud.searchdomain = Some(value.clone())
            }
            "citype" => {
                has_cloud = true;
                cloud.type_ = Some(parse_enum(k, value)?)
            }
            "ciupgrade" => {
                has_cloud = true;
                cloud.upgrade = Some(parse_bool(k, value)?)
            }
            _ if numbered(k, "ipconfig", 31) => {
                has_cloud = true;
                cloud.ip_config.push(parse_ipconfig(k, value)?);
            }
            _ if numbered(k, "net", 31) => spec.nics.push(parse_nic(k, value)?),
            _ if is_disk_key(k) => spec.disks.push(parse_disk(k, value)?),
            "digest" | "vmid" => {}
            _ if in_key_families(k, PASSTHROUGH_KEYS) => {
                spec.options.insert(k.to_string(), value.clone());
            }
            _ => {
                return Err(CodecError::invalid(
                    k,
                    "unknown qemu-server option; see the qemu config keys of the Proxmox VE API",
                ));
            }
        }
    }
    if has_cloud {
        spec.cloud_init = Some(cloud);
    }
    Ok(spec)
}

/// Maps a spec onto one section's keys.
pub fn section_from_spec(spec: &VirtualMachineSpec) -> Section {
    let mut s = Section { description: spec.description.clone(), ..Section::default() };
    let e = &mut s.entries;
    let mut put = |k: &str, v: String| {
        e.insert(k.to_string(), v);
    };
    if let Some(n) = &spec.name {
        put("name", n.clone());
    }
    if !spec.tags.is_empty() {
        put("tags", spec.tags.join(";"));
    }
    let cpu = &spec.cpu;
    put("cores", cpu.cores.to_string());
    if cpu.sockets != 1 {
        put("sockets", cpu.sockets.to_string());
    }
    if let Some(v) = cpu.vcpus {
        put("vcpus", v.to_string());
    }
    if let Some(v) = cpu.limit {
        put("cpulimit", number_str(v));
    }
    if let Some(v) = cpu.units {
        put("cpuunits", v.to_string());
    }
    if let Some(v) = &cpu.affinity {
        put("affinity", v.clone());
    }
    if cpu.numa {
        put("numa", "1".into());
    }
    if cpu.model.is_some() || cpu.flags.is_some() {
        let mut w = match &cpu.model {
            Some(m) => PropertyWriter::new().head(m.clone()),
            None => PropertyWriter::new(),
        };
        w.opt("flags", cpu.flags.as_ref());
        put("cpu", w.finish());
    }
    put("memory", spec.memory.size.to_string());
    if let Some(b) = spec.memory.balloon {
        put("balloon", b.to_string());
    }
    if let Some(v) = spec.memory.shares {
        put("shares", v.to_string());
    }
    if let Some(boot) = &spec.boot {
        put("boot", print_boot(boot));
    }
    if spec.bios != Bios::Seabios {
        put("bios", enum_str(&spec.bios));
    }
    if let Some(m) = &spec.machine {
        put("machine", m.clone());
    }
    if let Some(o) = &spec.ostype {
        put("ostype", enum_str(o));
    }
    if let Some(h) = &spec.scsihw {
        put("scsihw", enum_str(h));
    }
    if !spec.kvm {
        put("kvm", "0".into());
    }
    if let Some(a) = &spec.agent {
        put("agent", print_agent(a));
    }
    if spec.onboot {
        put("onboot", "1".into());
    }
    if spec.protection {
        put("protection", "1".into());
    }
    if spec.template {
        put("template", "1".into());
    }
    if let Some(st) = &spec.startup {
        put("startup", print_startup(st));
    }
    if let Some(ci) = &spec.cloud_init {
        if let Some(u) = &ci.user {
            put("ciuser", u.clone());
        }
        if let Some(p) = &ci.password_hash {
            put("cipassword", p.clone());
        }
        if !ci.ssh_keys.is_empty() {
            let mut keys = ci.ssh_keys.join("\n");
            keys.push('\n');
            put("sshkeys", uri_escape(&keys));
        }
        if let Some(v) = &ci.nameserver {
            put("nameserver", v.clone());
        }
        if let Some(v) = &ci.searchdomain {
            put("searchdomain", v.clone());
        }
        if let Some(t) = &ci.type_ {
            put("citype", enum_str(t));
        }
        if let Some(u) = ci.upgrade {
            put("ciupgrade", bool_str(u).into());
        }
        for ip in &ci.ip_config {
            put(&ip.id, print_ipconfig(ip));
        }
    }
    for nic in &spec.nics {
        put(&nic.id, print_nic(nic));
    }
    for disk in &spec.disks {
        put(&disk.id, print_disk(disk));
    }
    for (k, v) in &spec.options {
        put(k, v.clone());
    }
    s
}

fn is_disk_key(key: &str) -> bool {
    key == "efidisk0" || key == "tpmstate0" || DISK_PREFIXES.iter().any(|(p, max)| numbered(key, p, *max))
}

fn parse_boot(value: &str) -> Result<Boot> {
    let mut p = PropertyString::parse("boot", value)?;
    let mut boot = Boot::default();
    if let Some(head) = p.head.take() {
        if !head.chars().all(|c| "acdn".contains(c)) || head.len() > 4 {
            return Err(CodecError::invalid(
                "boot",
                format!("'{head}' is not a boot order; use order=dev1;dev2 or legacy letters from 'acdn'"),
            ));
        }
        boot.legacy = Some(head);
    }
    if let Some(order) = p.take("order") {
        boot.order = order.split(';').filter(|d| !d.is_empty()).map(str::to_string).collect();
    }
    p.finish("boot", &[])?;
    Ok(boot)
}

fn print_boot(boot: &Boot) -> String {
    let mut w = match &boot.legacy {
        Some(l) => PropertyWriter::new().head(l.clone()),
        None => PropertyWriter::new(),
    };
    if !boot.order.is_empty() {
        w.set("order", boot.order.join(";"));
    }
    w.finish()
}

fn parse_agent(value: &str) -> Result<Agent> {
    let mut p = PropertyString::parse("agent", value)?;
    let mut agent = Agent::default();
    if let Some(v) = p.head.take().or_else(|| p.take("enabled")) {
        agent.enabled = parse_bool("agent.enabled", &v)?;
    }
    if let Some(v) = p.take("fstrim_cloned_disks") {
        agent.fstrim_cloned_disks = parse_bool("agent.fstrim_cloned_disks", &v)?;
    }
    if let Some(v) = p.take("freeze-fs-on-backup") {
        agent.freeze_fs_on_backup = Some(parse_bool("agent.freeze-fs-on-backup", &v)?);
    }
    agent.type_ = p.take("type");
    p.finish("agent", &[])?;
    Ok(agent)
}

fn print_agent(agent: &Agent) -> String {
    // The GUI writes a bare `1` when nothing else is set, else `enabled=1,…`.
    let mut w = PropertyWriter::new();
    w.flag("fstrim_cloned_disks", agent.fstrim_cloned_disks, false);
    w.opt("freeze-fs-on-backup", agent.freeze_fs_on_backup.map(bool_str));
    w.opt("type", agent.type_.as_ref());
    if w.is_empty() {
        return bool_str(agent.enabled).to_string();
    }
    w.required("enabled", bool_str(agent.enabled)).finish()
}

/// `startup: order=1,up=30,down=60`, shared with containers.
pub(crate) fn parse_startup(key: &str, value: &str) -> Result<Startup> {
    let mut p = PropertyString::parse(key, value)?;
    let mut st = Startup::default();
    if let Some(v) = p.head.take().or_else(|| p.take("order")) {
        st.order = Some(parse_uint(&format!("{key}.order"), &v, 0, u32::MAX as u64)?);
    }
    if let Some(v) = p.take("up") {
        st.up = Some(parse_uint(&format!("{key}.up"), &v, 0, u32::MAX as u64)?);
    }
    if let Some(v) = p.take("down") {
        st.down = Some(parse_uint(&format!("{key}.down"), &v, 0, u32::MAX as u64)?);
    }
    p.finish(key, &[])?;
    Ok(st)
}

pub(crate) fn print_startup(st: &Startup) -> String {
    // Proxmox keeps this string as the GUI writes it: order, up, down.
    [("order", st.order), ("up", st.up), ("down", st.down)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_ipconfig(key: &str, value: &str) -> Result<IpConfig> {
    let mut p = PropertyString::parse(key, value)?;
    let mut ip = IpConfig::new(key);
    ip.ip = p.take("ip");
    ip.gw = p.take("gw");
    ip.ip6 = p.take("ip6");
    ip.gw6 = p.take("gw6");
    if let Some(head) = p.head {
        return Err(CodecError::invalid(key, format!("'{head}' needs a name; allowed: ip, gw, ip6, gw6")));
    }
    PropertyString { head: None, pairs: p.pairs }.finish(key, &[])?;
    Ok(ip)
}

fn print_ipconfig(ip: &IpConfig) -> String {
    // The GUI's order (ip, gw, ip6, gw6), which Proxmox keeps as given.
    [("ip", &ip.ip), ("gw", &ip.gw), ("ip6", &ip.ip6), ("gw6", &ip.gw6)]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_nic(key: &str, value: &str) -> Result<Nic> {
    let mut p = PropertyString::parse(key, value)?;
    let mut nic = Nic::new(key);
    // `virtio=BC:24:11:00:00:01` is Proxmox's alias for model=virtio,macaddr=…
    let alias = NIC_MODELS.iter().find_map(|m| p.take(m).map(|mac| (m.to_string(), mac)));
    let model = match (alias, p.head.take(), p.take("model")) {
        (Some((m, mac)), None, None) => {
            nic.macaddr = Some(mac);
            m
        }
        (None, Some(m), None) | (None, None, Some(m)) => m,
        (None, None, None) => {
            return Err(CodecError::invalid(
                key,
                format!("missing NIC model; allowed: {}", NIC_MODELS.join(", ")),
            ));
        }
        _ => return Err(CodecError::invalid(key, "NIC model given twice")),
    };
    nic.model = parse_enum(&format!("{key}.model"), &model)?;
    if let Some(mac) = p.take("macaddr") {
        nic.macaddr = Some(mac);
    }
    if let Some(mac) = &nic.macaddr
        && !is_mac(mac)
    {
        return Err(CodecError::invalid(format!("{key}.macaddr"), format!("'{mac}' is not a MAC address")));
    }
    nic.bridge = p.take("bridge");
    if let Some(v) = p.take("tag") {
        nic.tag = Some(parse_uint(&format!("{key}.tag"), &v, 1, 4094)?);
    }
    nic.trunks = p.take("trunks");
    if let Some(v) = p.take("firewall") {
        nic.firewall = parse_bool(&format!("{key}.firewall"), &v)?;
    }
    if let Some(v) = p.take("link_down") {
        nic.link_down = parse_bool(&format!("{key}.link_down"), &v)?;
    }
    if let Some(v) = p.take("mtu") {
        nic.mtu = Some(parse_uint(&format!("{key}.mtu"), &v, 1, 65520)?);
    }
    if let Some(v) = p.take("queues") {
        nic.queues = Some(parse_uint(&format!("{key}.queues"), &v, 0, 64)?);
    }
    if let Some(v) = p.take("rate") {
        nic.rate = Some(parse_number(&format!("{key}.rate"), &v, 0.0, f64::MAX)?);
    }
    p.finish(key, &[])?;
    Ok(nic)
}

fn print_nic(nic: &Nic) -> String {
    let model = enum_str(&nic.model);
    let head = match &nic.macaddr {
        Some(mac) => format!("{model}={mac}"),
        None => model,
    };
    let mut w = PropertyWriter::new().head(head);
    w.opt("bridge", nic.bridge.as_ref());
    w.opt("tag", nic.tag);
    w.opt("trunks", nic.trunks.as_ref());
    w.flag("firewall", nic.firewall, false);
    w.flag("link_down", nic.link_down, false);
    w.opt("mtu", nic.mtu);
    w.opt("queues", nic.queues);
    w.opt("rate", nic.rate.map(number_str));
    w.finish()
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn parse_disk(key: &str, value: &str) -> Result<Disk> {
    let mut p = PropertyString::parse(key, value)?;
    let mut disk = Disk::new(key);
    let file = p.head.take().or_else(|| p.take("file")).or_else(|| p.take("volume"));
    let file = file.ok_or_else(|| CodecError::invalid(key, "missing volume (e.g. local:vm-100-disk-0)"))?;
    // `local:32` is Proxmox's "allocate a new 32 GiB volume on local".
    match file.split_once(':') {
        Some((pool, size)) if !size.is_empty() && size.parse::<f64>().is_ok() => {
            disk.pool = Some(pool.to_string());
            disk.size = Some(normalize_size(key, &format!("{size}G"))?);
        }
        _ => disk.volume = Some(file),
    }
    if let Some(v) = p.take("size") {
        disk.size = Some(format_size(parse_size(&format!("{key}.size"), &v)?));
    }
    if let Some(v) = p.take("format") {
        disk.format = Some(parse_enum(&format!("{key}.format"), &v)?);
    }
    if let Some(v) = p.take("media") {
        disk.media = Some(parse_enum(&format!("{key}.media"), &v)?);
    }
    if let Some(v) = p.take("cache") {
        disk.cache = Some(parse_enum(&format!("{key}.cache"), &v)?);
    }
    if let Some(v) = p.take("discard") {
        disk.discard = match v.as_str() {
            "on" => true,
            "ignore" => false,
            _ => {
                return Err(CodecError::invalid(
                    format!("{key}.discard"),
                    format!("unknown value '{v}'; allowed: on, ignore"),
                ));
            }
        };
    }
    for (name, field) in [
        ("iothread", &mut disk.iothread),
        ("ssd", &mut disk.ssd),
        ("backup", &mut disk.backup),
        ("replicate", &mut disk.replicate),
        ("ro", &mut disk.readonly),
    ] {
        if let Some(v) = p.take(name) {
            *field = parse_bool(&format!("{key}.{name}"), &v)?;
        }
    }
    if let Some(v) = p.take("aio") {
        disk.aio = Some(parse_enum(&format!("{key}.aio"), &v)?);
    }
    disk.serial = p.take("serial");
    disk.options = p.finish(key, DISK_EXTRA)?;
    Ok(disk)
}

fn print_disk(disk: &Disk) -> String {
    let head = match (&disk.volume, &disk.pool) {
        (Some(v), _) => v.clone(),
        (None, Some(pool)) => {
            let gib = disk
                .size
                .as_deref()
                .and_then(|s| parse_size("size", s).ok())
                .map(|b| number_str(b as f64 / (1u64 << 30) as f64))
                .unwrap_or_else(|| "0".into());
            format!("{pool}:{gib}")
        }
        (None, None) => "none".to_string(),
    };
    let mut w = PropertyWriter::new().head(head);
    w.opt("format", disk.format.as_ref().map(enum_str));
    w.opt("media", disk.media.as_ref().map(enum_str));
    w.opt("cache", disk.cache.as_ref().map(enum_str));
    if disk.discard {
        w.set("discard", "on");
    }
    w.flag("iothread", disk.iothread, false);
    w.flag("ssd", disk.ssd, false);
    w.flag("backup", disk.backup, true);
    w.flag("replicate", disk.replicate, true);
    w.flag("ro", disk.readonly, false);
    w.opt("aio", disk.aio.as_ref().map(enum_str));
    w.opt("serial", disk.serial.as_ref());
    if disk.volume.is_some() {
        w.opt("size", disk.size.as_deref().and_then(|s| normalize_size("size", s).ok()));
    }
    w.extend(&disk.options);
    w.finish()
}
