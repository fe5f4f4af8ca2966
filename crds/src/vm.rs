//! `VirtualMachine`: a QEMU/KVM guest. The spec covers what a Proxmox user declares in
//! `qemu-server/<vmid>.conf`; the node it runs on and everything observed is in status.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{GuestSpec, GuestStatus, HaSpec, Placement, PowerState, Startup};
use crate::firewall::{GuestFirewall, yes};

/// Pattern of a Proxmox storage id (`local`, `local-lvm`, `ceph_pool1`).
pub const STORAGE_ID_PATTERN: &str = r"^[a-z][a-z0-9\-_.]*[a-z0-9]$";
/// Pattern of a disk size: bytes or a number with K/M/G/T (Proxmox, binary) or Ki/Mi/Gi/Ti.
pub const SIZE_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?([KMGT]i?)?$";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "VirtualMachine",
    plural = "virtualmachines",
    singular = "virtualmachine",
    namespaced,
    shortname = "vm",
    shortname = "vms",
    category = "kpve",
    status = "GuestStatus",
    doc = "A QEMU/KVM virtual machine (Proxmox qemu-server guest)",
    selectable = ".status.node",
    selectable = ".status.migration.target",
    printcolumn(name = "VMID", type_ = "integer", json_path = ".spec.vmid"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "Power", type_ = "string", json_path = ".spec.powerState"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "CPUs", type_ = "integer", json_path = ".spec.cpu.cores", priority = 1),
    printcolumn(name = "Memory", type_ = "integer", json_path = ".spec.memory.size", priority = 1)
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSpec {
    /// Cluster-unique id (100–999999999). Allocated by the API server when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 999_999_999))]
    pub vmid: Option<u32>,
    /// Proxmox display name (`name:`); defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?$"), length(max = 63))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[a-zA-Z0-9_][a-zA-Z0-9_\-+.]*$")))]
    pub tags: Vec<String>,
    /// The power state kpve keeps the guest in.
    #[serde(default)]
    pub power_state: PowerState,
    #[serde(default)]
    pub cpu: CpuSpec,
    #[serde(default)]
    pub memory: MemorySpec,
    /// Disks and CD-ROM drives, keyed by device id (`scsi0`, `virtio1`, `ide2`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub disks: Vec<Disk>,
    /// Network interfaces, keyed by id (`net0`, `net1`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub nics: Vec<Nic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    #[serde(default)]
    pub bios: Bios,
    /// QEMU machine type, e.g. `q35`, `pc-i440fx-9.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.+_-]*$"))]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ostype: Option<OsType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scsihw: Option<ScsiHw>,
    /// Use hardware virtualization when the host has it (status says which accelerator runs).
    #[serde(default = "yes")]
    pub kvm: bool,
    /// Talk to the QEMU guest agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<Agent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// Start with the node (Proxmox `onboot`).
    #[serde(default)]
    pub onboot: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Startup>,
    /// Refuse deletion and disk removal while set.
    #[serde(default)]
    pub protection: bool,
    /// A template cannot run; it is the source of clones.
    #[serde(default)]
    pub template: bool,
    /// Disk snapshots (Proxmox `qm snapshot`, qcow2 internal snapshots): the agent takes each
    /// declared snapshot that no disk has yet and deletes snapshots no longer declared. Every
    /// disk must be qcow2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub snapshots: Vec<Snapshot>,
    /// The snapshot the current state derives from (Proxmox `parent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Reverts the disks to a snapshot (Proxmox `rollback`), once per `id`: the agent stops
    /// the VM, reverts every disk that has the snapshot, then follows powerState.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<GuestFirewall>,
    /// Further qemu-server options kpve passes through verbatim (`args`, `vga`, `serial0`,
    /// `smbios1`, `hostpci0`, …). Keys must be valid qemu-server keys not modelled above.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

/// Virtual CPU topology and model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuSpec {
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4))]
    pub sockets: u32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 128))]
    pub cores: u32,
    /// Hot-plugged vCPUs at start (≤ sockets × cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 512))]
    pub vcpus: Option<u32>,
    /// Emulated CPU type (`x86-64-v2-AES`, `kvm64`, `host`, …); QEMU's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z0-9_.+-]+$"))]
    pub model: Option<String>,
    /// CPU flags, e.g. `+aes;-pcid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[+-][A-Za-z0-9_-]+(;[+-][A-Za-z0-9_-]+)*$"))]
    pub flags: Option<String>,
    /// CPU limit in cores (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 128.0))]
    pub limit: Option<f64>,
    /// CPU weight (cgroup v2 1–10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 262_144))]
    pub units: Option<u32>,
    /// Host CPUs to pin to, e.g. `0-3,8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$"))]
    pub affinity: Option<String>,
    #[serde(default)]
    pub numa: bool,
}

fn one() -> u32 {
    1
}

/// Memory in MiB.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemorySpec {
    /// Memory size in MiB.
    #[serde(default = "default_memory")]
    #[schemars(range(min = 16, max = 4_194_304))]
    pub size: u32,
    /// Balloon target in MiB; 0 disables the balloon device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4_194_304))]
    pub balloon: Option<u32>,
    /// Auto-ballooning weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 50_000))]
    pub shares: Option<u32>,
}

fn default_memory() -> u32 {
    512
}

/// A disk or CD-ROM drive.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// Bus and index: scsi0–30, virtio0–15, sata0–5, ide0–3, efidisk0, tpmstate0.
    #[schemars(pattern(
        r"^(scsi([0-9]|[12][0-9]|30)|virtio([0-9]|1[0-5])|sata[0-5]|ide[0-3]|efidisk0|tpmstate0)$"
    ))]
    pub id: String,
    /// Storage pool a new volume of `size` is allocated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$"))]
    pub pool: Option<String>,
    /// An existing volume (`local:100/vm-100-disk-0.qcow2`, `local:iso/x.iso`), or `none`
    /// for an empty CD-ROM drive. Mutually exclusive with `pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(none|cdrom|[a-z][a-z0-9\-_.]*[a-z0-9]:.+|/.+)$"))]
    pub volume: Option<String>,
    /// Size, e.g. `32G` (GiB, as Proxmox writes it), `512M`, `40Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(\.[0-9]+)?([KMGT]i?)?$"))]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<Media>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheMode>,
    /// Pass discard/TRIM to the volume.
    #[serde(default)]
    pub discard: bool,
    /// Give the disk its own I/O thread.
    #[serde(default)]
    pub iothread: bool,
    /// Present the disk as an SSD.
    #[serde(default)]
    pub ssd: bool,
    /// Include in backups.
    #[serde(default = "yes")]
    pub backup: bool,
    #[serde(default = "yes")]
    pub replicate: bool,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio: Option<Aio>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z0-9_-]{1,20}$"))]
    pub serial: Option<String>,
    /// Further Proxmox drive options (`mbps_rd`, `iops`, `detect_zeroes`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// A new volume starts as a copy of this one (Proxmox `clone`) instead of empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<CloneSource>,
}

/// The volume (and optionally its snapshot) a cloned disk is copied from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneSource {
    /// Volume id on the same node (`local:100/vm-100-disk-0.qcow2`).
    #[schemars(pattern(r"^[a-z][a-z0-9\-_.]*[a-z0-9]:.+$"))]
    pub volume: String,
    /// Copy the volume as it was at this internal snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A disk snapshot and the configuration it was taken with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    /// Proxmox `pve-configid`: a letter, then letters, digits, `_`, `-`; at most 40.
    #[schemars(pattern(r"^[a-zA-Z][a-zA-Z0-9_-]{1,39}$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Unix time it was declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snaptime: Option<u64>,
    /// The snapshot this one derives from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The VM's configuration when it was taken, as qemu-server config lines (what a
    /// rollback restores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// A request to revert the disks to a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollback {
    /// A declared snapshot.
    pub snapshot: String,
    /// A new value asks for another rollback; the agent reports the last one applied in
    /// status.rollback.
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
}

impl VirtualMachineSpec {
    /// Takes from `old` what a qemu-server config does not carry (VMID, power state,
    /// placement, HA, firewall, snapshots, rollback, clone sources), for a spec parsed from an
    /// edited config.
    pub fn keep_undeclared(&mut self, old: &mut VirtualMachineSpec) {
        self.vmid = old.vmid;
        self.power_state = old.power_state;
        self.placement = std::mem::take(&mut old.placement);
        self.ha = old.ha.take();
        self.firewall = old.firewall.take();
        self.snapshots = std::mem::take(&mut old.snapshots);
        self.parent = old.parent.take();
        self.rollback = old.rollback.take();
        // Disks keep their order: a volume allocated from a pool is named by its position.
        let position = |id: &str| old.disks.iter().position(|d| d.id == id).unwrap_or(usize::MAX);
        self.disks.sort_by_key(|d| position(&d.id));
        // A disk still allocated as a copy keeps its source.
        for disk in self.disks.iter_mut().filter(|d| d.volume.is_none()) {
            if let Some(before) = old.disks.iter().find(|o| o.id == disk.id && o.pool == disk.pool) {
                disk.clone_from = before.clone_from.clone();
            }
        }
    }
}

impl Disk {
    /// The image format: declared, else the volume's extension, else qcow2 (kpve's default).
    pub fn image_format(&self) -> &'static str {
        match (self.format, self.volume.as_deref()) {
            (Some(DiskFormat::Raw), _) => "raw",
            (Some(DiskFormat::Vmdk), _) => "vmdk",
            (Some(DiskFormat::Qcow2), _) => "qcow2",
            (None, Some(v)) if v.ends_with(".raw") => "raw",
            (None, Some(v)) if v.ends_with(".vmdk") => "vmdk",
            _ => "qcow2",
        }
    }

    /// A CD-ROM drive or an ISO: not a disk image the VM writes.
    pub fn is_media(&self) -> bool {
        self.media == Some(Media::Cdrom)
            || self.volume.as_deref().is_some_and(|v| v == "none" || v == "cdrom" || v.contains(":iso/"))
    }
}

/// Checks the schema cannot express: snapshot names unique, every disk qcow2 when snapshots
/// are declared, a rollback naming a declared snapshot. (field path, message) pairs.
pub fn check_virtual_machine(object: &serde_json::Value) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let Some(spec) =
        object.get("spec").and_then(|s| serde_json::from_value::<VirtualMachineSpec>(s.clone()).ok())
    else {
        return errors;
    };
    let mut seen = std::collections::BTreeSet::new();
    for (i, snap) in spec.snapshots.iter().enumerate() {
        if !seen.insert(snap.name.as_str()) {
            errors.push((format!("spec.snapshots[{i}].name"), format!("Duplicate value: \"{}\"", snap.name)));
        }
        if ["current", "pending"].contains(&snap.name.to_lowercase().as_str()) {
            errors.push((format!("spec.snapshots[{i}].name"), format!("\"{}\": a reserved name", snap.name)));
        }
    }
    if !spec.snapshots.is_empty() {
        for disk in spec.disks.iter().filter(|d| !d.is_media()) {
            if disk.image_format() != "qcow2" {
                errors.push((
                    format!("spec.disks[{}].format", disk.id),
                    format!("{}: snapshots need qcow2 disks", disk.image_format()),
                ));
            }
        }
    }
    if let Some(r) = &spec.rollback
        && !seen.contains(r.snapshot.as_str())
    {
        errors
            .push(("spec.rollback.snapshot".into(), format!("\"{}\": not a declared snapshot", r.snapshot)));
    }
    errors
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Media {
    Disk,
    Cdrom,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    None,
    Writethrough,
    Writeback,
    Unsafe,
    Directsync,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aio {
    Native,
    Threads,
    IoUring,
}

/// A network interface.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Nic {
    /// net0–net31.
    #[schemars(pattern(r"^net([0-9]|[12][0-9]|3[01])$"))]
    pub id: String,
    #[serde(default)]
    pub model: NicModel,
    /// MAC address; generated (BC:24:11 prefix) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"))]
    pub macaddr: Option<String>,
    /// Bridge on the node, e.g. `vmbr0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$"))]
    pub bridge: Option<String>,
    /// VLAN tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub tag: Option<u16>,
    /// Allowed VLANs on a trunk, e.g. `10;20-30`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(-[0-9]+)?(;[0-9]+(-[0-9]+)?)*$"))]
    pub trunks: Option<String>,
    /// Apply the guest firewall to this interface.
    #[serde(default)]
    pub firewall: bool,
    #[serde(default)]
    pub link_down: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65520))]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub queues: Option<u32>,
    /// Rate limit in MB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub rate: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    #[default]
    Virtio,
    E1000,
    E1000e,
    Rtl8139,
    Vmxnet3,
}

/// Boot order (`boot: order=scsi0;ide2;net0`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Boot {
    /// Device ids in boot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^(scsi|virtio|sata|ide|net|efidisk|usb|hostpci)[0-9]+$")))]
    pub order: Vec<String>,
    /// Legacy Proxmox boot letters (`c`, `d`, `n`), kept for old configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[acdn]{1,4}$"))]
    pub legacy: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bios {
    #[default]
    Seabios,
    Ovmf,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OsType {
    Other,
    Wxp,
    W2k,
    W2k3,
    W2k8,
    Wvista,
    Win7,
    Win8,
    Win10,
    Win11,
    L24,
    L26,
    Solaris,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScsiHw {
    Lsi,
    Lsi53c810,
    VirtioScsiPci,
    VirtioScsiSingle,
    Megasas,
    Pvscsi,
}

/// QEMU guest agent settings (`agent: enabled=1,fstrim_cloned_disks=1`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Agent {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub fstrim_cloned_disks: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_fs_on_backup: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "type")]
    #[schemars(pattern(r"^(virtio|isa)$"))]
    pub type_: Option<String>,
}

/// cloud-init settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A crypt(3) hash (`$6$…` or `$y$…`); plaintext is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^\$[0-9a-z]+\$.+$"))]
    pub password_hash: Option<String>,
    /// OpenSSH public keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( .*)?$")))]
    pub ssh_keys: Vec<String>,
    /// Addresses per interface (`ipconfig0` configures `net0`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub ip_config: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameserver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub searchdomain: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<CloudInitType>,
    /// Upgrade packages on first boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloudInitType {
    Configdrive2,
    Nocloud,
    Opennebula,
}

/// Addresses of one interface (`ipconfig0: ip=10.0.0.5/24,gw=10.0.0.1`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpConfig {
    /// ipconfig0–ipconfig31.
    #[schemars(pattern(r"^ipconfig([0-9]|[12][0-9]|3[01])$"))]
    pub id: String,
    /// IPv4 CIDR or `dhcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(dhcp|[0-9.]+/[0-9]{1,2})$"))]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9.]+$"))]
    pub gw: Option<String>,
    /// IPv6 CIDR, `dhcp` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(dhcp|auto|[0-9a-fA-F:]+/[0-9]{1,3})$"))]
    pub ip6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F:]+$"))]
    pub gw6: Option<String>,
}

crate::serde_default!(VirtualMachineSpec, CpuSpec, MemorySpec, Agent, CloudInit);
crate::keyed_new!(Disk, Nic, IpConfig);

impl crate::common::GuestObject for VirtualMachine {
    fn guest_spec(&self) -> &(dyn GuestSpec + Sync) {
        &self.spec
    }
    fn guest_status(&self) -> Option<&GuestStatus> {
        self.status.as_ref()
    }
}

impl GuestSpec for VirtualMachineSpec {
    fn vmid(&self) -> Option<u32> {
        self.vmid
    }
    fn power_state(&self) -> PowerState {
        self.power_state
    }
    fn placement(&self) -> &Placement {
        &self.placement
    }
    fn ha(&self) -> Option<&HaSpec> {
        self.ha.as_ref()
    }
    fn firewall(&self) -> Option<&GuestFirewall> {
        self.firewall.as_ref()
    }
    fn startup(&self) -> Option<&Startup> {
        self.startup.as_ref()
    }
}
