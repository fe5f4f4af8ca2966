//! Types shared by several kinds: conditions, power state, placement, HA, startup order,
//! and the observed status every guest (VM or container) reports.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::firewall::GuestFirewall;

/// Condition types used across kinds. Keyed by type, each carries `observedGeneration`.
pub mod condition_type {
    /// Observed state equals desired state (a guest declared Stopped that is stopped is Ready).
    pub const READY: &str = "Ready";
    /// The guest has been placed on a node (`status.node`).
    pub const SCHEDULED: &str = "Scheduled";
    /// A controller or agent is working towards the desired state.
    pub const RECONCILING: &str = "Reconciling";
    /// Progress is impossible without a change of spec or of the host; the reason says why.
    pub const STALLED: &str = "Stalled";
    /// Observed host state differs from what kpve last applied.
    pub const DRIFTED: &str = "Drifted";
    /// A running guest can be moved live.
    pub const MIGRATABLE: &str = "Migratable";
    /// The spec changed in a way that only takes effect after the guest restarts.
    pub const RESTART_REQUIRED: &str = "RestartRequired";
    /// Set True by the node agent once a deleted guest's host resources (process, volumes,
    /// taps) are gone; the guest controller then drops its finalizer.
    pub const RELEASED: &str = "Released";
}

/// Status of a condition, as in Kubernetes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A Kubernetes-style condition (same shape as `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. Ready, Scheduled, RestartRequired.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable explanation, saying what to do where there is something to do.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The metadata.generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Upserts a condition by type. The transition time is kept when the status did not change,
/// so that re-writing the same observation is a no-op for the API server.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: &str) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            new.last_transition_time = if old.status == new.status {
                old.last_transition_time.clone()
            } else {
                Some(now.to_string())
            };
            *old = new;
        }
        None => {
            new.last_transition_time = Some(now.to_string());
            conditions.push(new);
        }
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The power state a guest should be in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PowerState {
    #[default]
    Running,
    Stopped,
    Paused,
}

/// Where a guest may and should run. This is a constraint: the node a guest actually runs
/// on is `status.node`, written by the scheduler, so migrations never cause GitOps drift.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Nodes the guest may run on; empty means any node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")))]
    pub nodes: Vec<String>,
    /// Nodes preferred in this order when several qualify.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")))]
    pub preferred_nodes: Vec<String>,
    /// Only nodes whose Hypervisor labels match all of these qualify.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// HA request state, with Proxmox's meanings.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HaState {
    /// Keep the guest running; recover it elsewhere when its node fails.
    #[default]
    Started,
    /// Keep the guest stopped, but recover its placement when its node fails.
    Stopped,
    /// Stop the guest and do not recover it.
    Disabled,
    /// HA does not touch the guest (manual operation).
    Ignored,
}

/// HA management of a guest (Proxmox `ha/resources.cfg`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HaSpec {
    /// HAGroup whose node priorities decide recovery placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub state: HaState,
    /// Restarts on the same node after a guest failure before relocating.
    #[serde(default = "default_ha_max")]
    #[schemars(range(min = 0, max = 10))]
    pub max_restart: u32,
    /// Relocations to other nodes after failed restarts before giving up.
    #[serde(default = "default_ha_max")]
    #[schemars(range(min = 0, max = 10))]
    pub max_relocate: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

fn default_ha_max() -> u32 {
    1
}

/// Startup and shutdown behaviour (Proxmox `startup: order=1,up=30,down=60`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Startup {
    /// Start order: lower starts first, shuts down last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u32>,
    /// Seconds to wait after starting this guest before starting the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up: Option<u32>,
    /// Seconds to wait for a graceful shutdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<u32>,
}

/// Lifecycle phase a guest is observed in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GuestPhase {
    /// Accepted, not yet placed on a node.
    #[default]
    Pending,
    /// Placed; disks and host resources are being prepared.
    Provisioning,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Migrating,
    /// A host operation failed; conditions carry the reason.
    Failed,
    /// Being deleted: stopping and freeing volumes.
    Terminating,
}

/// Observed state of a VM or container. Written by the scheduler (node), the guest
/// controller (conditions) and the node agent (runtime figures).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestStatus {
    #[serde(default)]
    pub phase: GuestPhase,
    /// The node the guest is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The VMID in force (equal to spec.vmid once allocated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Process id of QEMU or of the container's init on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Seconds since the guest started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime: Option<u64>,
    /// CPU usage as a fraction of the guest's vCPUs (0.0–1.0 per core summed as Proxmox does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory in use, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<u64>,
    /// Memory size in force, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxmem: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_read: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_write: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_out: Option<u64>,
    /// `kvm` or `tcg` for VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// IP addresses seen on the guest's interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Allocated volumes by device id (e.g. `scsi0` → `local:100/vm-100-disk-0.qcow2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, String>,
    /// Snapshots the guest's disks have (VMs: qcow2 internal snapshots).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    /// The id of the last rollback applied (spec.rollback.id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
    /// Generation of the firewall inputs enforced for this guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_generation: Option<i64>,
    /// HA state as the cluster resource manager records it (Proxmox `ha-manager status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaStatus>,
    /// What the local resource manager of the guest's node reports about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha_lrm: Option<HaLrmStatus>,
    /// The migration in progress, or the last one (Proxmox `qm migrate --online`, `pct
    /// migrate --restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// A migration from `source` to `target` — a VM's live migration, a container's restart
/// migration: ordered (`Pending`) by the migration controller (a placement that no longer
/// allows the node), the Proxmox API (`POST …/migrate`) or the source's LRM (an HA move);
/// the target's agent gets ready and says where (`TargetReady`: a QEMU waiting for the VM,
/// a receiver for the container's volumes); the source's agent hands over (`Migrating`,
/// then `Completed` or `Failed`: copies local disks and memory; or stops the container and
/// copies its local volumes); the migration controller then binds the guest to the target.
/// The guest runs on exactly one node throughout: the target's QEMU runs guest code only
/// after the source's stopped for good; a container starts on the target once it is bound
/// there.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// Names this migration; every writer checks it before writing.
    pub id: String,
    pub source: String,
    pub target: String,
    pub phase: MigrationPhase,
    /// Who asked: `placement`, `ha`, or the Proxmox API user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// When it was ordered and when it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// Where the target's QEMU waits for the guest's state (`tcp:HOST:PORT`), or its receiver
    /// for a container's volumes (`tcp:HOST:PORT/TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The target's NBD server for local disks (`HOST:PORT`), one export per disk id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    /// Disks (a container's volume slots) copied to the target (local storage); those on
    /// shared storage are not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// How long the guest was paused for the switch-over (QEMU's measure), milliseconds; for
    /// a container, from its stop to the hand-over (it starts on the target right after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// From the start of the copy to the switch-over, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// Memory and device state sent, bytes (disk copies not included); for a container, the
    /// volume archives sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_bytes: Option<u64>,
    /// Why it failed, or what it is waiting for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MigrationPhase {
    /// Ordered; the target has not answered yet.
    #[default]
    Pending,
    /// The target waits for the guest (`uri`, `nbd`).
    TargetReady,
    /// The source is copying disks and memory (a container: stopping it, copying volumes).
    Migrating,
    /// The guest runs on the target; the source's QEMU is gone.
    Completed,
    /// Nothing moved: the guest runs where it ran (see `message`).
    Failed,
}

impl MigrationPhase {
    /// Completed or Failed: nobody acts on it any more.
    pub fn is_final(self) -> bool {
        matches!(self, MigrationPhase::Completed | MigrationPhase::Failed)
    }
}

impl Migration {
    /// Every field of the object, absent ones as explicit nulls: a merge patch with it replaces
    /// the previous migration's record whole.
    pub fn to_merge_value(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("serializable");
        for key in [
            "requestedBy",
            "started",
            "finished",
            "uri",
            "nbd",
            "disks",
            "downtimeMs",
            "totalMs",
            "transferredBytes",
            "message",
        ] {
            if value.get(key).is_none() {
                value[key] = serde_json::Value::Null;
            }
        }
        value
    }
}

/// The CRM's record of an HA guest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaStatus {
    /// started, stopped, disabled, ignored, fence, recovery, migrate or error.
    #[serde(default)]
    pub state: String,
    /// Relocations after failed restarts so far (against spec.ha.maxRelocate).
    #[serde(default)]
    pub relocates: u32,
    /// A move waiting for the current node to stop the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate: Option<HaMigrate>,
    /// The node a maintenance drain took the guest from; it returns there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// The last failover's timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<HaFailover>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaMigrate {
    pub id: u64,
    pub target: String,
}

/// When a failover's steps happened (RFC 3339, milliseconds).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaFailover {
    /// The node that was lost.
    pub from: String,
    /// The CRM saw the node stop renewing its lease.
    pub detected: String,
    /// The node's lease expired: it had fenced itself.
    pub fenced: String,
    /// Where the guest went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<String>,
    /// It ran there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
}

impl From<&HaLrmStatus> for kpve_ha::crm::LrmReport {
    fn from(s: &HaLrmStatus) -> Self {
        kpve_ha::crm::LrmReport {
            node: s.node.clone(),
            restarts: s.restarts,
            failed: s.failed,
            started: s.started,
            stopped_for: s.stopped_for,
            epoch: s.epoch,
        }
    }
}

impl From<&kpve_ha::crm::LrmReport> for HaLrmStatus {
    fn from(r: &kpve_ha::crm::LrmReport) -> Self {
        HaLrmStatus {
            node: r.node.clone(),
            restarts: r.restarts,
            failed: r.failed,
            started: r.started,
            stopped_for: r.stopped_for,
            epoch: r.epoch,
        }
    }
}

/// The node LRM's report on one HA guest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaLrmStatus {
    pub node: String,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub failed: bool,
    #[serde(default)]
    pub started: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_for: Option<u64>,
    #[serde(default)]
    pub epoch: u64,
}

/// A guest resource (VirtualMachine, LinuxContainer): what the scheduler, the guest
/// controller and the node agent need of either kind.
pub trait GuestObject:
    kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    fn guest_spec(&self) -> &(dyn GuestSpec + Sync);
    fn guest_status(&self) -> Option<&GuestStatus>;
}

/// Fields every guest kind declares the same way.
pub trait GuestSpec {
    fn vmid(&self) -> Option<u32>;
    fn power_state(&self) -> PowerState;
    fn placement(&self) -> &Placement;
    fn ha(&self) -> Option<&HaSpec>;
    fn firewall(&self) -> Option<&GuestFirewall>;
    fn startup(&self) -> Option<&Startup>;
}
