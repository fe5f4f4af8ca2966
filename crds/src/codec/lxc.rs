//! pve-container configs (`lxc/<vmid>.conf`) ⇄ [`LinuxContainerSpec`].

use std::collections::BTreeMap;

use super::conf::{ConfigFile, Section};
use super::propstr::{
    PropertyString, PropertyWriter, enum_str, format_size, in_key_families, normalize_size, number_str,
    numbered, parse_bool, parse_enum, parse_number, parse_size, parse_uint,
};
use super::qemu::{parse_startup, print_startup};
use super::{CodecError, Result};
use crate::lxc::*;

/// A whole pve-container config.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerConfig {
    /// The snapshot the current state derives from (`parent:` in the main section).
    pub parent: Option<String>,
    pub spec: LinuxContainerSpec,
    pub pending: BTreeMap<String, String>,
    pub snapshots: Vec<ContainerSnapshot>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSnapshot {
    pub name: String,
    pub parent: Option<String>,
    pub snaptime: Option<u64>,
    pub spec: LinuxContainerSpec,
}

/// Keys of the pve-container config that kpve accepts verbatim in `spec.options`.
const PASSTHROUGH_KEYS: &[&str] =
    &["cmode", "debug", "dev", "entrypoint", "env", "hookscript", "lock", "template", "unused"];

/// Parses a pve-container config file.
pub fn parse_lxc_config(text: &str) -> Result<ContainerConfig> {
    let mut file = ConfigFile::parse(text)?;
    let parent = file.main.entries.remove("parent");
    let spec = spec_from_section(&file.main)?;
    let mut config = ContainerConfig { parent, spec, pending: BTreeMap::new(), snapshots: Vec::new() };
    for section in &file.sections {
        match section.name.as_deref() {
            Some("PENDING") => config.pending = section.entries.clone(),
            Some(name) if name.starts_with("special:") => {
                return Err(CodecError::invalid(format!("[{name}]"), "containers have no special sections"));
            }
            Some(name) => {
                let mut section = section.clone();
                let parent = section.entries.remove("parent");
                let snaptime = section
                    .entries
                    .remove("snaptime")
                    .map(|v| parse_uint(&format!("[{name}].snaptime"), &v, 0, u64::MAX))
                    .transpose()?;
                let spec = spec_from_section(&section).map_err(|e| match e {
                    CodecError::Invalid { key, message } => {
                        CodecError::invalid(format!("[{name}].{key}"), message)
                    }
                    other => other,
                })?;
                config.snapshots.push(ContainerSnapshot { name: name.to_string(), parent, snaptime, spec });
            }
            None => unreachable!("named sections always have a name"),
        }
    }
    Ok(config)
}

/// Prints a pve-container config in Proxmox's canonical form.
pub fn print_lxc_config(config: &ContainerConfig) -> String {
    let mut file = ConfigFile { main: section_from_spec(&config.spec), sections: Vec::new() };
    if let Some(parent) = &config.parent {
        file.main.entries.insert("parent".into(), parent.clone());
    }
    if !config.pending.is_empty() {
        let mut s = Section::named("PENDING");
        s.entries = config.pending.clone();
        file.sections.push(s);
    }
    let mut snapshots: Vec<&ContainerSnapshot> = config.snapshots.iter().collect();
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
        file.sections.push(s);
    }
    file.print()
}

impl LinuxContainerSpec {
    pub fn from_lxc_config(text: &str) -> Result<Self> {
        parse_lxc_config(text).map(|c| c.spec)
    }

    pub fn to_lxc_config(&self) -> String {
        ConfigFile { main: section_from_spec(self), sections: Vec::new() }.print()
    }
}

/// Maps one section's keys onto a container spec.
pub fn spec_from_section(section: &Section) -> Result<LinuxContainerSpec> {
    let rootfs_text = section
        .entries
        .get("rootfs")
        .ok_or_else(|| CodecError::invalid("rootfs", "missing; a container needs a root file system"))?;
    let rootfs = parse_rootfs(rootfs_text)?;
    let mut spec: LinuxContainerSpec = serde_json::from_value(serde_json::json!({ "rootfs": {} }))
        .expect("every field but rootfs has a default");
    spec.rootfs = rootfs;
    spec.description = section.description.clone();
    // Proxmox's on-disk default is privileged; kpve's schema default is unprivileged.
    spec.unprivileged = false;
    spec.raw_lxc = section.raw_lxc.iter().map(|(k, v)| RawLxc { key: k.clone(), value: v.clone() }).collect();
    for (key, value) in &section.entries {
        let k = key.as_str();
        match k {
            "rootfs" | "digest" | "vmid" => {}
            "hostname" => spec.hostname = Some(value.clone()),
            "description" => spec.description = Some(value.clone()),
            "tags" => {
                spec.tags =
                    value.split([';', ',', ' ']).filter(|t| !t.is_empty()).map(str::to_string).collect()
            }
            "ostype" => spec.ostype = Some(parse_enum(k, value)?),
            "arch" => spec.arch = parse_enum(k, value)?,
            "cores" => spec.cores = Some(parse_uint(k, value, 1, 8192)?),
            "cpulimit" => spec.cpulimit = Some(parse_number(k, value, 0.0, 8192.0)?),
            "cpuunits" => spec.cpuunits = Some(parse_uint(k, value, 0, 500_000)?),
            "memory" => spec.memory = parse_uint(k, value, 16, u32::MAX as u64)?,
            "swap" => spec.swap = parse_uint(k, value, 0, u32::MAX as u64)?,
            "unprivileged" => spec.unprivileged = parse_bool(k, value)?,
            "features" => spec.features = Some(parse_features(value)?),
            "nameserver" => spec.nameserver = Some(value.clone()),
            "searchdomain" => spec.searchdomain = Some(value.clone()),
            "timezone" => spec.timezone = Some(value.clone()),
            "console" => spec.console = parse_bool(k, value)?,
            "tty" => spec.tty = parse_uint(k, value, 0, 6)?,
            "onboot" => spec.onboot = parse_bool(k, value)?,
            "protection" => spec.protection = parse_bool(k, value)?,
            "startup" => spec.startup = Some(parse_startup(k, value)?),
            _ if numbered(k, "mp", 255) => spec.mount_points.push(parse_mount_point(k, value)?),
            _ if numbered(k, "net", 31) => spec.nics.push(parse_nic(k, value)?),
            _ if in_key_families(k, PASSTHROUGH_KEYS) => {
                spec.options.insert(k.to_string(), value.clone());
            }
            _ => {
                return Err(CodecError::invalid(
                    k,
                    "unknown pve-container option; see the lxc config keys of the Proxmox VE API",
                ));
            }
        }
    }
    Ok(spec)
}

/// Maps a container spec onto one section's keys.
pub fn section_from_spec(spec: &LinuxContainerSpec) -> Section {
    let mut s = Section { description: spec.description.clone(), ..Section::default() };
    s.raw_lxc = spec.raw_lxc.iter().map(|r| (r.key.clone(), r.value.clone())).collect();
    let e = &mut s.entries;
    let mut put = |k: &str, v: String| {
        e.insert(k.to_string(), v);
    };
    if let Some(h) = &spec.hostname {
        put("hostname", h.clone());
    }
    if !spec.tags.is_empty() {
        put("tags", spec.tags.join(";"));
    }
    if let Some(o) = &spec.ostype {
        put("ostype", enum_str(o));
    }
    put("arch", enum_str(&spec.arch));
    if let Some(c) = spec.cores {
        put("cores", c.to_string());
    }
    if let Some(c) = spec.cpulimit {
        put("cpulimit", number_str(c));
    }
    if let Some(c) = spec.cpuunits {
        put("cpuunits", c.to_string());
    }
    put("memory", spec.memory.to_string());
    put("swap", spec.swap.to_string());
    if spec.unprivileged {
        put("unprivileged", "1".into());
    }
    if let Some(f) = &spec.features {
        let text = print_features(f);
        if !text.is_empty() {
            put("features", text);
        }
    }
    if let Some(v) = &spec.nameserver {
        put("nameserver", v.clone());
    }
    if let Some(v) = &spec.searchdomain {
        put("searchdomain", v.clone());
    }
    if let Some(v) = &spec.timezone {
        put("timezone", v.clone());
    }
    if !spec.console {
        put("console", "0".into());
    }
    if spec.tty != 2 {
        put("tty", spec.tty.to_string());
    }
    if spec.onboot {
        put("onboot", "1".into());
    }
    if spec.protection {
        put("protection", "1".into());
    }
    if let Some(st) = &spec.startup {
        put("startup", print_startup(st));
    }
    put(
        "rootfs",
        print_volume(
            spec.rootfs.volume.as_ref(),
            spec.rootfs.pool.as_ref(),
            spec.rootfs.size.as_ref(),
            None,
            &spec.rootfs.mount,
            None,
        ),
    );
    for mp in &spec.mount_points {
        put(
            &mp.id,
            print_volume(
                mp.volume.as_ref(),
                mp.pool.as_ref(),
                mp.size.as_ref(),
                Some(&mp.path),
                &mp.mount,
                Some(mp.backup),
            ),
        );
    }
    for nic in &spec.nics {
        put(&nic.id, print_nic(nic));
    }
    for (k, v) in &spec.options {
        put(k, v.clone());
    }
    s
}

/// Splits `local:8` (new volume of 8 GiB) from an existing volume id.
fn split_volume(key: &str, file: String) -> Result<(Option<String>, Option<String>, Option<String>)> {
    match file.split_once(':') {
        Some((pool, size)) if !size.is_empty() && size.parse::<f64>().is_ok() => {
            Ok((None, Some(pool.to_string()), Some(normalize_size(key, &format!("{size}G"))?)))
        }
        _ => Ok((Some(file), None, None)),
    }
}

fn take_mount_options(key: &str, p: &mut PropertyString) -> Result<MountOptions> {
    let mut m = MountOptions { replicate: true, ..MountOptions::default() };
    if let Some(v) = p.take("acl") {
        m.acl = Some(parse_bool(&format!("{key}.acl"), &v)?);
    }
    for (name, field) in [
        ("quota", &mut m.quota),
        ("ro", &mut m.readonly),
        ("replicate", &mut m.replicate),
        ("shared", &mut m.shared),
    ] {
        if let Some(v) = p.take(name) {
            *field = parse_bool(&format!("{key}.{name}"), &v)?;
        }
    }
    m.mountoptions = p.take("mountoptions");
    Ok(m)
}

fn parse_rootfs(value: &str) -> Result<RootFs> {
    let key = "rootfs";
    let mut p = PropertyString::parse(key, value)?;
    let file = p
        .head
        .take()
        .or_else(|| p.take("volume"))
        .ok_or_else(|| CodecError::invalid(key, "missing volume"))?;
    let (volume, pool, mut size) = split_volume(key, file)?;
    if let Some(v) = p.take("size") {
        size = Some(format_size(parse_size("rootfs.size", &v)?));
    }
    let mount = take_mount_options(key, &mut p)?;
    p.finish(key, &[])?;
    Ok(RootFs { pool, volume, size, mount, clone_from: None })
}

fn parse_mount_point(key: &str, value: &str) -> Result<MountPoint> {
    let mut p = PropertyString::parse(key, value)?;
    let file = p
        .head
        .take()
        .or_else(|| p.take("volume"))
        .ok_or_else(|| CodecError::invalid(key, "missing volume"))?;
    let (volume, pool, mut size) = split_volume(key, file)?;
    let path = p
        .take("mp")
        .ok_or_else(|| CodecError::invalid(format!("{key}.mp"), "missing mount path inside the container"))?;
    if let Some(v) = p.take("size") {
        size = Some(format_size(parse_size(&format!("{key}.size"), &v)?));
    }
    let backup = match p.take("backup") {
        Some(v) => parse_bool(&format!("{key}.backup"), &v)?,
        None => false,
    };
    let mount = take_mount_options(key, &mut p)?;
    p.finish(key, &[])?;
    Ok(MountPoint { id: key.to_string(), path, pool, volume, size, backup, mount })
}

fn print_volume(
    volume: Option<&String>,
    pool: Option<&String>,
    size: Option<&String>,
    path: Option<&String>,
    mount: &MountOptions,
    backup: Option<bool>,
) -> String {
    let head = match (volume, pool) {
        (Some(v), _) => v.clone(),
        (None, Some(pool)) => {
            let gib = size
                .and_then(|s| parse_size("size", s).ok())
                .map(|b| number_str(b as f64 / (1u64 << 30) as f64))
                .unwrap_or_else(|| "0".into());
            format!("{pool}:{gib}")
        }
        (None, None) => String::new(),
    };
    let mut w = PropertyWriter::new().head(head);
    if let Some(path) = path {
        w = w.required("mp", path.clone());
    }
    w.opt("acl", mount.acl.map(super::propstr::bool_str));
    if let Some(b) = backup {
        w.flag("backup", b, false);
    }
    w.opt("mountoptions", mount.mountoptions.as_ref());
    w.flag("quota", mount.quota, false);
    w.flag("replicate", mount.replicate, true);
    w.flag("ro", mount.readonly, false);
    w.flag("shared", mount.shared, false);
    if volume.is_some() {
        w.opt("size", size.and_then(|s| normalize_size("size", s).ok()));
    }
    w.finish()
}

fn parse_features(value: &str) -> Result<Features> {
    let mut p = PropertyString::parse("features", value)?;
    if let Some(head) = p.head {
        return Err(CodecError::invalid(
            "features",
            format!("'{head}' needs a name; allowed: force_rw_sys, fuse, keyctl, mknod, mount, nesting"),
        ));
    }
    let mut f = Features::default();
    for (name, field) in [
        ("nesting", &mut f.nesting),
        ("keyctl", &mut f.keyctl),
        ("fuse", &mut f.fuse),
        ("mknod", &mut f.mknod),
        ("force_rw_sys", &mut f.force_rw_sys),
    ] {
        if let Some(v) = p.take(name) {
            *field = parse_bool(&format!("features.{name}"), &v)?;
        }
    }
    if let Some(m) = p.take("mount") {
        f.mount = m.split(';').filter(|s| !s.is_empty()).map(str::to_string).collect();
    }
    p.finish("features", &[])?;
    Ok(f)
}

fn print_features(f: &Features) -> String {
    let mut w = PropertyWriter::new();
    w.flag("force_rw_sys", f.force_rw_sys, false);
    w.flag("fuse", f.fuse, false);
    w.flag("keyctl", f.keyctl, false);
    w.flag("mknod", f.mknod, false);
    if !f.mount.is_empty() {
        w.set("mount", f.mount.join(";"));
    }
    w.flag("nesting", f.nesting, false);
    w.finish()
}

fn parse_nic(key: &str, value: &str) -> Result<CtNic> {
    let mut p = PropertyString::parse(key, value)?;
    if let Some(head) = p.head.take() {
        return Err(CodecError::invalid(
            key,
            format!("'{head}' needs a name; expected name=eth0,bridge=vmbr0,…"),
        ));
    }
    let name = p.take("name").ok_or_else(|| {
        CodecError::invalid(format!("{key}.name"), "missing interface name inside the container")
    })?;
    let mut nic = CtNic {
        id: key.to_string(),
        name,
        bridge: p.take("bridge"),
        hwaddr: p.take("hwaddr"),
        ip: p.take("ip"),
        gw: p.take("gw"),
        ip6: p.take("ip6"),
        gw6: p.take("gw6"),
        tag: None,
        trunks: p.take("trunks"),
        firewall: false,
        link_down: false,
        mtu: None,
        rate: None,
    };
    if let Some(t) = p.take("type")
        && t != "veth"
    {
        return Err(CodecError::invalid(
            format!("{key}.type"),
            format!("unknown value '{t}'; allowed: veth"),
        ));
    }
    if let Some(v) = p.take("tag") {
        nic.tag = Some(parse_uint(&format!("{key}.tag"), &v, 1, 4094)?);
    }
    if let Some(v) = p.take("firewall") {
        nic.firewall = parse_bool(&format!("{key}.firewall"), &v)?;
    }
    if let Some(v) = p.take("link_down") {
        nic.link_down = parse_bool(&format!("{key}.link_down"), &v)?;
    }
    if let Some(v) = p.take("mtu") {
        nic.mtu = Some(parse_uint(&format!("{key}.mtu"), &v, 64, 65535)?);
    }
    if let Some(v) = p.take("rate") {
        nic.rate = Some(parse_number(&format!("{key}.rate"), &v, 0.0, f64::MAX)?);
    }
    p.finish(key, &[])?;
    Ok(nic)
}

fn print_nic(nic: &CtNic) -> String {
    let mut w = PropertyWriter::new().required("name", nic.name.clone());
    w.opt("bridge", nic.bridge.as_ref());
    w.flag("firewall", nic.firewall, false);
    w.opt("gw", nic.gw.as_ref());
    w.opt("gw6", nic.gw6.as_ref());
    w.opt("hwaddr", nic.hwaddr.as_ref());
    w.opt("ip", nic.ip.as_ref());
    w.opt("ip6", nic.ip6.as_ref());
    w.flag("link_down", nic.link_down, false);
    w.opt("mtu", nic.mtu);
    w.opt("rate", nic.rate.map(number_str));
    w.opt("tag", nic.tag);
    w.opt("trunks", nic.trunks.as_ref());
    w.set("type", "veth");
    w.finish()
}
