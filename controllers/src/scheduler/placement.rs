//! The scheduler's pure core: which node a guest goes to, or why none fits. No I/O and no
//! clock: the controller turns Hypervisors and guest caches into [`NodeView`]s and the spec
//! into a [`GuestDemand`], so every rule here is unit-tested on plain values.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use kpve_crds::{ConditionStatus, kube::ResourceExt};
use kpve_crds::{
    Hypervisor, LinuxContainerSpec, Overcommit, Placement, VirtualMachineSpec, condition_type, find_condition,
};

/// CPUs and memory, as the scheduler counts them (vCPUs and MiB).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpus: u64,
    pub memory_mib: u64,
}

impl std::ops::AddAssign for Resources {
    fn add_assign(&mut self, rhs: Self) {
        self.cpus += rhs.cpus;
        self.memory_mib += rhs.memory_mib;
    }
}

/// What a guest asks of its node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestDemand {
    pub cpus: u64,
    pub memory_mib: u64,
    pub placement: Placement,
}

impl GuestDemand {
    /// A VM needs `vcpus` when set (the hot-plugged count it starts with), else sockets × cores.
    pub fn for_vm(spec: &VirtualMachineSpec) -> Self {
        let cpus = match spec.cpu.vcpus {
            Some(vcpus) => u64::from(vcpus),
            None => u64::from(spec.cpu.sockets) * u64::from(spec.cpu.cores),
        };
        GuestDemand { cpus, memory_mib: u64::from(spec.memory.size), placement: spec.placement.clone() }
    }

    /// A container needs its `cores`; one when unset (it may then use every host core, but
    /// reserving all of them would make unlimited containers unplaceable).
    pub fn for_container(spec: &LinuxContainerSpec) -> Self {
        GuestDemand {
            cpus: u64::from(spec.cores.unwrap_or(1)),
            memory_mib: u64::from(spec.memory),
            placement: spec.placement.clone(),
        }
    }

    pub fn resources(&self) -> Resources {
        Resources { cpus: self.cpus, memory_mib: self.memory_mib }
    }
}

/// Whether a node takes new guests, and if not, why (for the Unschedulable message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

/// A node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub maintenance: bool,
    pub ready: Readiness,
    /// Physical capacity (spec override per field, else what the agent reports); `None` when
    /// neither says how many CPUs or how much memory the node has.
    pub capacity: Option<Resources>,
    pub overcommit: Overcommit,
    /// Sum of the demands of the guests bound (or being bound) to this node.
    pub allocated: Resources,
}

impl NodeView {
    /// Builds the view of `hv` at `now`: Ready needs condition Ready=True and a heartbeat no
    /// older than `heartbeat_timeout`.
    pub fn from_hypervisor(
        hv: &Hypervisor,
        allocated: Resources,
        now: Timestamp,
        heartbeat_timeout: Duration,
    ) -> Self {
        let status = hv.status.clone().unwrap_or_default();
        let spec_cap = hv.spec.capacity.clone().unwrap_or_default();
        let cpus = spec_cap.cpus.or(status.capacity.as_ref().map(|c| c.cpus));
        let memory = spec_cap.memory_mib.or(status.capacity.as_ref().map(|c| c.memory_mib));
        let capacity = match (cpus, memory) {
            (Some(cpus), Some(memory_mib)) => Some(Resources { cpus: u64::from(cpus), memory_mib }),
            _ => None,
        };
        NodeView {
            name: hv.name_any(),
            labels: hv.labels().clone(),
            maintenance: hv.spec.maintenance,
            ready: readiness(&status, now, heartbeat_timeout),
            capacity,
            overcommit: hv.spec.overcommit.clone(),
            allocated,
        }
    }
}

fn readiness(status: &kpve_crds::HypervisorStatus, now: Timestamp, timeout: Duration) -> Readiness {
    let Some(heartbeat) = &status.last_heartbeat_time else {
        return Readiness::NotReady("not ready (no heartbeat)".into());
    };
    let Ok(heartbeat) = heartbeat.parse::<Timestamp>() else {
        return Readiness::NotReady(format!("not ready (unparsable lastHeartbeatTime {heartbeat:?})"));
    };
    // A heartbeat from the future (clock skew) counts as fresh.
    let age = now.duration_since(heartbeat).unsigned_abs();
    if now > heartbeat && age > timeout {
        return Readiness::NotReady(format!("not ready (no heartbeat for {}s)", age.as_secs()));
    }
    match find_condition(&status.conditions, condition_type::READY) {
        Some(c) if c.status == ConditionStatus::True => Readiness::Ready,
        Some(c) => {
            let why = if c.message.is_empty() { &c.reason } else { &c.message };
            Readiness::NotReady(format!("not ready (Ready={:?}: {why})", c.status))
        }
        None => Readiness::NotReady("not ready (no Ready condition)".into()),
    }
}

/// No node fits; one reason per node that was considered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    /// `"<node>: <reason>"`, in node-name order.
    pub reasons: Vec<String>,
    /// How many Hypervisors were considered.
    pub nodes: usize,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 && self.reasons.is_empty() {
            return f.write_str("no Hypervisors: no node has joined the cluster yet");
        }
        write!(f, "0/{} nodes available: {}", self.nodes, self.reasons.join("; "))
    }
}

impl std::error::Error for Unschedulable {}

/// The limit overcommit allows, rounded down to whole units.
fn limit(capacity: u64, ratio: f64) -> u64 {
    (capacity as f64 * ratio).floor() as u64
}

/// Why `placement` rules `node` out (named nodes, node selector), or `None` when it allows it.
pub fn disallowed(placement: &Placement, node: &NodeView) -> Option<String> {
    if !placement.nodes.is_empty() && !placement.nodes.contains(&node.name) {
        return Some("not in placement.nodes".into());
    }
    for (key, want) in &placement.node_selector {
        match node.labels.get(key) {
            Some(have) if have == want => {}
            Some(have) => {
                return Some(format!("label {key}={have} does not match nodeSelector {key}={want}"));
            }
            None => return Some(format!("no label {key} (nodeSelector {key}={want})")),
        }
    }
    None
}

/// Why `node` cannot take `guest`, or `None` when it can.
fn reject(guest: &GuestDemand, node: &NodeView) -> Option<String> {
    if let Some(why) = disallowed(&guest.placement, node) {
        return Some(why);
    }
    if node.maintenance {
        return Some("maintenance".into());
    }
    if let Readiness::NotReady(why) = &node.ready {
        return Some(why.clone());
    }
    let Some(capacity) = node.capacity else {
        return Some("no capacity reported (the agent has not reported status.capacity)".into());
    };
    let overcommitted = |ratio: f64| {
        if ratio == 1.0 { String::new() } else { format!(" (overcommit {ratio}x)") }
    };
    let cpu_limit = limit(capacity.cpus, node.overcommit.cpu);
    let cpu_free = cpu_limit.saturating_sub(node.allocated.cpus);
    if guest.cpus > cpu_free {
        return Some(format!(
            "insufficient cpu: {} CPUs requested, {cpu_free} free of {cpu_limit}{}",
            guest.cpus,
            overcommitted(node.overcommit.cpu)
        ));
    }
    let mem_limit = limit(capacity.memory_mib, node.overcommit.memory);
    let mem_free = mem_limit.saturating_sub(node.allocated.memory_mib);
    if guest.memory_mib > mem_free {
        return Some(format!(
            "insufficient memory: {} MiB requested, {mem_free} MiB free of {mem_limit} MiB{}",
            guest.memory_mib,
            overcommitted(node.overcommit.memory)
        ));
    }
    None
}

fn free_memory(node: &NodeView) -> u64 {
    let capacity = node.capacity.map_or(0, |c| c.memory_mib);
    limit(capacity, node.overcommit.memory).saturating_sub(node.allocated.memory_mib)
}

/// Picks the node for `guest`: among the nodes that pass every constraint, the first of
/// `placement.preferredNodes`, else the one with the most free memory (ties by name).
pub fn place(guest: &GuestDemand, nodes: &[NodeView]) -> Result<String, Unschedulable> {
    let mut sorted: Vec<&NodeView> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut feasible = Vec::new();
    let mut reasons = Vec::new();
    for node in sorted {
        match reject(guest, node) {
            None => feasible.push(node),
            Some(why) => reasons.push(format!("{}: {why}", node.name)),
        }
    }
    for wanted in &guest.placement.nodes {
        if !nodes.iter().any(|n| &n.name == wanted) {
            reasons.push(format!("{wanted}: no such Hypervisor (named in placement.nodes)"));
        }
    }
    if let Some(preferred) =
        guest.placement.preferred_nodes.iter().find_map(|p| feasible.iter().find(|n| &n.name == p))
    {
        return Ok(preferred.name.clone());
    }
    // `feasible` is in name order and max_by_key keeps the last maximum, so go backwards.
    match feasible.iter().rev().max_by_key(|n| free_memory(n)) {
        Some(best) => Ok(best.name.clone()),
        None => Err(Unschedulable { reasons, nodes: nodes.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpus: u64, memory_mib: u64) -> NodeView {
        NodeView {
            name: name.into(),
            labels: BTreeMap::new(),
            maintenance: false,
            ready: Readiness::Ready,
            capacity: Some(Resources { cpus, memory_mib }),
            overcommit: Overcommit { cpu: 1.0, memory: 1.0 },
            allocated: Resources::default(),
        }
    }

    fn used(mut n: NodeView, cpus: u64, memory_mib: u64) -> NodeView {
        n.allocated = Resources { cpus, memory_mib };
        n
    }

    fn demand(cpus: u64, memory_mib: u64) -> GuestDemand {
        GuestDemand { cpus, memory_mib, placement: Placement::default() }
    }

    fn unschedulable(guest: &GuestDemand, nodes: &[NodeView]) -> Vec<String> {
        place(guest, nodes).expect_err("should not fit").reasons
    }

    #[test]
    fn picks_the_node_with_most_free_memory() {
        let nodes = [used(node("a", 8, 8192), 0, 6144), node("b", 8, 4096), node("c", 8, 1024)];
        assert_eq!(place(&demand(1, 512), &nodes).unwrap(), "b");
    }

    #[test]
    fn ties_go_to_the_first_name() {
        let nodes = [node("c", 4, 4096), node("b", 4, 4096), node("a", 2, 1024)];
        assert_eq!(place(&demand(1, 512), &nodes).unwrap(), "b");
        let nodes = [node("b", 4, 4096), node("c", 4, 4096)];
        assert_eq!(place(&demand(1, 512), &nodes).unwrap(), "b");
    }

    #[test]
    fn preferred_nodes_win_in_their_order_when_feasible() {
        let nodes = [node("a", 8, 8192), node("b", 8, 2048), node("c", 8, 1024)];
        let mut guest = demand(1, 512);
        guest.placement.preferred_nodes = vec!["c".into(), "b".into()];
        assert_eq!(place(&guest, &nodes).unwrap(), "c");
        // c is full: the next preference, not the most free memory.
        let nodes = [node("a", 8, 8192), node("b", 8, 2048), used(node("c", 8, 1024), 0, 1024)];
        assert_eq!(place(&guest, &nodes).unwrap(), "b");
        // No preferred node fits: back to most free memory.
        guest.placement.preferred_nodes = vec!["c".into(), "zz".into()];
        assert_eq!(place(&guest, &nodes).unwrap(), "a");
    }

    #[test]
    fn placement_nodes_restrict() {
        let nodes = [node("a", 8, 8192), node("b", 8, 2048)];
        let mut guest = demand(1, 512);
        guest.placement.nodes = vec!["b".into()];
        assert_eq!(place(&guest, &nodes).unwrap(), "b");
        guest.memory_mib = 4096;
        assert_eq!(
            unschedulable(&guest, &nodes),
            [
                "a: not in placement.nodes",
                "b: insufficient memory: 4096 MiB requested, 2048 MiB free of 2048 MiB"
            ]
        );
    }

    #[test]
    fn unknown_node_in_placement_nodes_is_reported() {
        let nodes = [node("a", 8, 8192)];
        let mut guest = demand(1, 512);
        guest.placement.nodes = vec!["ghost".into()];
        assert_eq!(
            unschedulable(&guest, &nodes),
            ["a: not in placement.nodes", "ghost: no such Hypervisor (named in placement.nodes)"]
        );
    }

    #[test]
    fn node_selector_matches_labels() {
        let mut a = node("a", 8, 8192);
        a.labels.insert("zone".into(), "east".into());
        let mut b = node("b", 8, 1024);
        b.labels.insert("zone".into(), "west".into());
        b.labels.insert("ssd".into(), "true".into());
        let c = node("c", 8, 8192);
        let mut guest = demand(1, 512);
        guest.placement.node_selector.insert("zone".into(), "west".into());
        guest.placement.node_selector.insert("ssd".into(), "true".into());
        assert_eq!(place(&guest, &[a.clone(), b.clone(), c.clone()]).unwrap(), "b");
        b.labels.remove("ssd");
        assert_eq!(
            unschedulable(&guest, &[a, b, c]),
            [
                "a: no label ssd (nodeSelector ssd=true)",
                "b: no label ssd (nodeSelector ssd=true)",
                "c: no label ssd (nodeSelector ssd=true)"
            ]
        );
        let mut d = node("d", 8, 8192);
        d.labels.insert("ssd".into(), "true".into());
        d.labels.insert("zone".into(), "east".into());
        assert_eq!(unschedulable(&guest, &[d]), ["d: label zone=east does not match nodeSelector zone=west"]);
    }

    #[test]
    fn maintenance_and_not_ready_nodes_are_rejected() {
        let mut a = node("a", 8, 8192);
        a.maintenance = true;
        let mut b = node("b", 8, 8192);
        b.ready = Readiness::NotReady("not ready (no heartbeat for 45s)".into());
        let mut c = node("c", 8, 8192);
        c.capacity = None;
        let err = place(&demand(1, 512), &[b, a, c]).unwrap_err();
        assert_eq!(
            err.reasons,
            [
                "a: maintenance",
                "b: not ready (no heartbeat for 45s)",
                "c: no capacity reported (the agent has not reported status.capacity)"
            ]
        );
        assert_eq!(
            err.to_string(),
            "0/3 nodes available: a: maintenance; b: not ready (no heartbeat for 45s); \
             c: no capacity reported (the agent has not reported status.capacity)"
        );
    }

    #[test]
    fn no_nodes_at_all() {
        let err = place(&demand(1, 512), &[]).unwrap_err();
        assert!(err.reasons.is_empty());
        assert!(err.to_string().contains("no Hypervisors"), "{err}");
    }

    #[test]
    fn capacity_counts_what_is_allocated() {
        let a = used(node("a", 4, 4096), 4, 512);
        let b = used(node("b", 8, 4096), 0, 3584);
        assert_eq!(
            unschedulable(&demand(1, 2048), &[a.clone(), b.clone()]),
            [
                "a: insufficient cpu: 1 CPUs requested, 0 free of 4",
                "b: insufficient memory: 2048 MiB requested, 512 MiB free of 4096 MiB"
            ]
        );
        // Exactly full is allowed.
        assert_eq!(place(&demand(1, 512), &[b]).unwrap(), "b");
    }

    #[test]
    fn overcommit_scales_the_limits() {
        let mut a = used(node("a", 4, 4096), 15, 4096);
        a.overcommit = Overcommit { cpu: 4.0, memory: 1.5 };
        assert_eq!(place(&demand(1, 2048), std::slice::from_ref(&a)).unwrap(), "a");
        assert_eq!(
            unschedulable(&demand(2, 512), std::slice::from_ref(&a)),
            ["a: insufficient cpu: 2 CPUs requested, 1 free of 16 (overcommit 4x)"]
        );
        assert_eq!(
            unschedulable(&demand(1, 2049), &[a]),
            ["a: insufficient memory: 2049 MiB requested, 2048 MiB free of 6144 MiB (overcommit 1.5x)"]
        );
        // Most free memory is measured against the overcommitted limit.
        let mut b = node("b", 4, 4096);
        b.overcommit.memory = 2.0;
        assert_eq!(place(&demand(1, 512), &[node("a", 4, 6144), b]).unwrap(), "b");
    }

    #[test]
    fn first_failing_rule_is_the_reason() {
        // Not in placement.nodes wins over maintenance, which wins over readiness and capacity.
        let mut a = node("a", 1, 16);
        a.maintenance = true;
        a.ready = Readiness::NotReady("not ready (no heartbeat)".into());
        let mut guest = demand(4, 4096);
        guest.placement.nodes = vec!["b".into()];
        assert_eq!(
            unschedulable(&guest, &[a.clone()]),
            ["a: not in placement.nodes", "b: no such Hypervisor (named in placement.nodes)"]
        );
        guest.placement.nodes.clear();
        assert_eq!(unschedulable(&guest, &[a]), ["a: maintenance"]);
    }

    fn hypervisor(status: serde_json::Value, spec: serde_json::Value) -> Hypervisor {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor",
            "metadata": {"name": "n1", "labels": {"zone": "a"}},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn hypervisor_view_readiness_and_capacity() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let timeout = Duration::from_secs(30);
        let ready = serde_json::json!([{"type": "Ready", "status": "True"}]);
        let fresh = hypervisor(
            serde_json::json!({"conditions": ready, "lastHeartbeatTime": "2026-01-01T00:00:40Z",
                "capacity": {"cpus": 8, "memoryMiB": 4096}}),
            serde_json::json!({"capacity": {"memoryMiB": 2048}}),
        );
        let view = NodeView::from_hypervisor(&fresh, Resources::default(), now, timeout);
        assert_eq!(view.ready, Readiness::Ready);
        assert_eq!(view.capacity, Some(Resources { cpus: 8, memory_mib: 2048 }));
        assert_eq!(view.labels["zone"], "a");
        assert_eq!(view.overcommit, Overcommit { cpu: 4.0, memory: 1.0 });

        let stale = hypervisor(
            serde_json::json!({"conditions": ready, "lastHeartbeatTime": "2026-01-01T00:00:15Z"}),
            serde_json::json!({}),
        );
        let view = NodeView::from_hypervisor(&stale, Resources::default(), now, timeout);
        assert_eq!(view.ready, Readiness::NotReady("not ready (no heartbeat for 45s)".into()));
        assert_eq!(view.capacity, None);
        let view = NodeView::from_hypervisor(&stale, Resources::default(), now, Duration::from_secs(60));
        assert_eq!(view.ready, Readiness::Ready);

        let never = hypervisor(serde_json::json!({"conditions": ready}), serde_json::json!({}));
        let view = NodeView::from_hypervisor(&never, Resources::default(), now, timeout);
        assert_eq!(view.ready, Readiness::NotReady("not ready (no heartbeat)".into()));

        let down = hypervisor(
            serde_json::json!({"lastHeartbeatTime": "2026-01-01T00:01:00Z",
                "conditions": [{"type": "Ready", "status": "False", "reason": "KvmMissing"}]}),
            serde_json::json!({}),
        );
        let view = NodeView::from_hypervisor(&down, Resources::default(), now, timeout);
        assert_eq!(view.ready, Readiness::NotReady("not ready (Ready=False: KvmMissing)".into()));
    }

    #[test]
    fn demand_of_vms_and_containers() {
        let vm: VirtualMachineSpec = serde_json::from_value(
            serde_json::json!({"cpu": {"sockets": 2, "cores": 3}, "memory": {"size": 2048}}),
        )
        .unwrap();
        assert_eq!(GuestDemand::for_vm(&vm).resources(), Resources { cpus: 6, memory_mib: 2048 });
        let vm: VirtualMachineSpec =
            serde_json::from_value(serde_json::json!({"cpu": {"sockets": 2, "cores": 4, "vcpus": 3}}))
                .unwrap();
        assert_eq!(GuestDemand::for_vm(&vm).resources(), Resources { cpus: 3, memory_mib: 512 });
        let ct: LinuxContainerSpec = serde_json::from_value(
            serde_json::json!({"cores": 2, "memory": 1024, "rootfs": {"pool": "local", "size": "8G"}}),
        )
        .unwrap();
        assert_eq!(GuestDemand::for_container(&ct).resources(), Resources { cpus: 2, memory_mib: 1024 });
        let ct: LinuxContainerSpec =
            serde_json::from_value(serde_json::json!({"rootfs": {"pool": "local", "size": "8G"}})).unwrap();
        assert_eq!(GuestDemand::for_container(&ct).resources(), Resources { cpus: 1, memory_mib: 512 });
    }
}
