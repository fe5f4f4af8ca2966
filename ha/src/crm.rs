//! The cluster resource manager: from node leases, HA groups and the HA guests' status it
//! decides node states (online / unknown / fence / maintenance) and where each HA guest
//! belongs — recovery after a node is fenced, relocation after failed restarts, maintenance
//! drains and their return, failback to a better node — and keeps each guest's failover
//! timeline.
//!
//! The CRM keeps one thing in memory: when it last saw each node's lease renewed (on its own
//! clock). Everything else it decides from, and writes to, the guests' status, so a restarted
//! CRM carries on where the last one stopped (and gives every node a full lease before
//! judging it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::{Ms, secs};

/// A node as the CRM judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Renews its lease.
    Online,
    /// Missed renewals; not yet fenced. Its guests stay where they are.
    Unknown,
    /// Lease expired: the node has fenced itself; its HA guests are recovered elsewhere.
    Fence,
    /// Online, but drained: HA guests move away and come back when maintenance ends.
    Maintenance,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Online => "online",
            NodeState::Unknown => "unknown",
            NodeState::Fence => "fence",
            NodeState::Maintenance => "maintenance",
        })
    }
}

/// One node as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    /// The lease's renew time as written; any change counts as a renewal. None: no lease yet.
    pub renew: Option<String>,
    /// The lease's duration.
    pub lease: Ms,
    pub maintenance: bool,
}

/// An HA group: member nodes with priorities.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    pub nodes: Vec<(String, u32)>,
    pub restricted: bool,
    pub nofailback: bool,
}

/// The requested HA state (`spec.ha.state`), Proxmox's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Keep it running; recover it when its node fails.
    Started,
    /// Keep it stopped; still recover its placement.
    Stopped,
    /// Stop it and do not recover it.
    Disabled,
    /// HA leaves it alone.
    Ignored,
}

/// The HA state the CRM records (`status.ha.state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Started,
    Stopped,
    Disabled,
    Ignored,
    /// Its node is fenced; recovery is under way.
    Fence,
    /// Its node is fenced and no node may take it yet.
    Recovery,
    /// Moving to another node: waiting for the current one to stop it.
    Migrate,
    /// Restarts and relocations exhausted; stays stopped until disabled and requested again.
    Error,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Started => "started",
            State::Stopped => "stopped",
            State::Disabled => "disabled",
            State::Ignored => "ignored",
            State::Fence => "fence",
            State::Recovery => "recovery",
            State::Migrate => "migrate",
            State::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        [
            State::Started,
            State::Stopped,
            State::Disabled,
            State::Ignored,
            State::Fence,
            State::Recovery,
            State::Migrate,
            State::Error,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node's LRM reports about one guest bound to it (`status.ha.lrm`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LrmReport {
    pub node: String,
    /// Restarts in place after a crash or failed start.
    pub restarts: u32,
    /// Restarts exhausted: the LRM no longer starts it here.
    pub failed: bool,
    /// Whether the LRM has started it here (a later stop that nobody asked for is a crash).
    pub started: bool,
    /// The migration the LRM has stopped the guest for.
    pub stopped_for: Option<u64>,
    /// Which run of the node's agent wrote this: a guest found stopped by a new run was not
    /// seen crashing, so starting it is not counted as a restart.
    pub epoch: u64,
}

/// A move the CRM asked the current node to let go of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migrate {
    pub id: u64,
    pub target: String,
}

/// One failover's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    pub from: String,
    /// When the CRM first saw the node miss renewals.
    pub detected: Ms,
    /// When its lease expired (the node has fenced itself by then).
    pub fenced: Ms,
    /// Where the guest went, and when.
    pub recovered: Option<(String, Ms)>,
    /// When it ran there.
    pub running: Option<Ms>,
}

/// What the CRM records about a guest (`status.ha`, except `lrm`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    pub relocates: u32,
    pub migrate: Option<Migrate>,
    /// The node a maintenance drain took it from, to return to.
    pub home: Option<String>,
    pub failover: Option<Failover>,
    pub message: String,
}

/// An HA guest as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Guest {
    /// `vm:100`, `ct:101`: Proxmox's service id.
    pub id: String,
    pub request: Request,
    pub group: Option<String>,
    pub max_restart: u32,
    pub max_relocate: u32,
    /// `status.node`.
    pub node: Option<String>,
    /// The node's agent reports it running.
    pub running: bool,
    pub lrm: Option<LrmReport>,
    pub ha: Record,
}

impl Guest {
    /// The LRM report about the node the guest is bound to now.
    fn lrm_here(&self) -> Option<&LrmReport> {
        self.lrm.as_ref().filter(|r| Some(&r.node) == self.node.as_ref())
    }
}

/// What a Event is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Node(String),
    Guest(String),
}

/// What the CRM wants written.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Bind the guest to `node` (`status.node`) and record `ha`.
    Bind { guest: String, node: String, ha: Record },
    /// Record `ha` (`status.ha`).
    Record { guest: String, ha: Record },
    /// A Kubernetes Event (and a line of the simulation's log).
    Event { subject: Subject, reason: &'static str, message: String, warning: bool },
}

#[derive(Clone, Debug)]
struct Seen {
    renew: Option<String>,
    at: Ms,
    state: NodeState,
    /// When it stopped renewing (first seen unknown or fenced).
    lost: Option<Ms>,
}

/// The cluster resource manager. Feed it the whole picture with [`Crm::tick`] as often as
/// anything changes (and at least a few times per lease).
#[derive(Debug, Default)]
pub struct Crm {
    seen: BTreeMap<String, Seen>,
}

impl Crm {
    pub fn new() -> Crm {
        Crm::default()
    }

    /// The node's state as of the last tick.
    pub fn node_state(&self, node: &str) -> Option<NodeState> {
        self.seen.get(node).map(|s| s.state)
    }

    /// How long the CRM has not seen `node` renew its lease, unless `renew` is news to it.
    pub fn silent_for(&self, node: &str, now: Ms, renew: Option<&str>) -> Option<Ms> {
        let seen = self.seen.get(node)?;
        (seen.renew.as_deref() == renew).then(|| now.saturating_sub(seen.at))
    }

    /// Decides everything due at `now`.
    pub fn tick(&mut self, now: Ms, nodes: &[Node], groups: &[Group], guests: &[Guest]) -> Vec<Action> {
        let mut actions = Vec::new();
        self.judge_nodes(now, nodes, &mut actions);
        let states: BTreeMap<&str, NodeState> =
            self.seen.iter().map(|(n, s)| (n.as_str(), s.state)).collect();
        let groups: BTreeMap<&str, &Group> = groups.iter().map(|g| (g.name.as_str(), g)).collect();
        // Guests per node, counting this tick's moves: recovery spreads guests out.
        let mut load: BTreeMap<String, usize> = BTreeMap::new();
        for g in guests {
            if let Some(node) = &g.node {
                *load.entry(node.clone()).or_default() += 1;
            }
        }
        let mut guests: Vec<&Guest> = guests.iter().collect();
        guests.sort_by(|a, b| a.id.cmp(&b.id));
        for guest in guests {
            let group = guest.group.as_deref().and_then(|g| groups.get(g).copied());
            let pick = |exclude: &str, load: &mut BTreeMap<String, usize>| {
                let target = choose(group, &states, exclude, load)?;
                *load.entry(target.clone()).or_default() += 1;
                if let Some(n) = load.get_mut(exclude) {
                    *n = n.saturating_sub(1);
                }
                Some(target)
            };
            self.decide(now, guest, group, &states, &mut |exclude| pick(exclude, &mut load), &mut actions);
        }
        actions
    }

    fn judge_nodes(&mut self, now: Ms, nodes: &[Node], actions: &mut Vec<Action>) {
        let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        self.seen.retain(|name, _| names.contains(name.as_str()));
        for node in nodes {
            let seen = self.seen.entry(node.name.clone()).or_insert_with(|| Seen {
                renew: node.renew.clone(),
                at: now,
                state: if node.maintenance { NodeState::Maintenance } else { NodeState::Online },
                lost: None,
            });
            if seen.renew != node.renew {
                seen.renew = node.renew.clone();
                seen.at = now;
            }
            let age = now.saturating_sub(seen.at);
            let state = if age >= node.lease {
                NodeState::Fence
            } else if age > node.lease / 4 {
                NodeState::Unknown
            } else if node.maintenance {
                NodeState::Maintenance
            } else {
                NodeState::Online
            };
            if state == seen.state {
                continue;
            }
            let lost = matches!(state, NodeState::Unknown | NodeState::Fence);
            if lost && seen.lost.is_none() {
                seen.lost = Some(now);
            } else if !lost {
                seen.lost = None;
            }
            let (reason, warning) = match state {
                NodeState::Online if seen.state == NodeState::Maintenance => ("NodeMaintenanceEnded", false),
                NodeState::Online => ("NodeOnline", false),
                NodeState::Unknown => ("NodeUnknown", true),
                NodeState::Fence => ("NodeFenced", true),
                NodeState::Maintenance => ("NodeMaintenance", false),
            };
            let why = match state {
                NodeState::Unknown => format!(" (no lease renewal for {})", secs(age)),
                NodeState::Fence => {
                    format!(" (lease of {} expired; the node has stopped its HA guests)", secs(node.lease))
                }
                _ => String::new(),
            };
            actions.push(Action::Event {
                subject: Subject::Node(node.name.clone()),
                reason,
                message: format!("node {}: {} -> {state}{why}", node.name, seen.state),
                warning,
            });
            seen.state = state;
        }
    }

    fn decide(
        &self,
        now: Ms,
        guest: &Guest,
        group: Option<&Group>,
        states: &BTreeMap<&str, NodeState>,
        pick: &mut dyn FnMut(&str) -> Option<String>,
        actions: &mut Vec<Action>,
    ) {
        let id = guest.id.clone();
        let event = |reason: &'static str, message: String, warning: bool| Action::Event {
            subject: Subject::Guest(id.clone()),
            reason,
            message,
            warning,
        };
        let mut rec = guest.ha.clone();
        if guest.request == Request::Ignored {
            if rec.state != State::Ignored {
                rec = Record { state: State::Ignored, ..Record::default() };
                actions.push(Action::Record { guest: id.clone(), ha: rec });
            }
            return;
        }
        // Unplaced guests are the scheduler's.
        let Some(node) = guest.node.as_deref() else { return };
        // A node with neither Hypervisor nor Lease cannot be judged: never recover without a
        // lease having expired.
        let Some(node_state) = states.get(node).copied() else { return };
        let requested = match guest.request {
            Request::Started => State::Started,
            Request::Stopped => State::Stopped,
            _ => State::Disabled,
        };
        match node_state {
            NodeState::Unknown => return,
            NodeState::Fence => {
                if rec.state == State::Error {
                    return;
                }
                if guest.request == Request::Disabled {
                    if rec.state != State::Disabled {
                        rec.state = State::Disabled;
                        rec.migrate = None;
                        actions.push(Action::Record { guest: id.clone(), ha: rec });
                    }
                    return;
                }
                if !matches!(rec.state, State::Fence | State::Recovery) {
                    let lost = self.seen.get(node).and_then(|s| s.lost).unwrap_or(now);
                    rec.failover = Some(Failover {
                        from: node.to_string(),
                        detected: lost,
                        fenced: now,
                        recovered: None,
                        running: None,
                    });
                    rec.state = State::Fence;
                    rec.migrate = None;
                    actions.push(event(
                        "Fenced",
                        format!("{id}: node {node} is fenced; recovering {id} elsewhere"),
                        true,
                    ));
                }
                match pick(node) {
                    Some(target) => {
                        let lost_for =
                            rec.failover.as_ref().map(|f| now.saturating_sub(f.detected)).unwrap_or(0);
                        if let Some(f) = rec.failover.as_mut() {
                            f.recovered = Some((target.clone(), now));
                        }
                        rec.state = requested;
                        rec.message = format!("recovered from {node} to {target}");
                        actions.push(event(
                            "Recovered",
                            format!(
                                "{id}: recovered from {node} to {target}, {} after the node was lost",
                                secs(lost_for)
                            ),
                            false,
                        ));
                        actions.push(Action::Bind { guest: id.clone(), node: target, ha: rec });
                    }
                    None if rec.state != State::Recovery => {
                        rec.state = State::Recovery;
                        rec.message = no_node_message(group);
                        actions.push(event("RecoveryPending", format!("{id}: {}", rec.message), true));
                        actions.push(Action::Record { guest: id.clone(), ha: rec });
                    }
                    None => {}
                }
                return;
            }
            NodeState::Online | NodeState::Maintenance => {}
        }

        // The node is alive. A guest still waiting for recovery stays: its node came back.
        if matches!(rec.state, State::Fence | State::Recovery) {
            if let Some(f) = rec.failover.as_mut() {
                f.recovered = Some((node.to_string(), now));
            }
            rec.state = requested;
            rec.message = format!("{node} came back before {id} was recovered elsewhere");
            actions.push(event("Recovered", format!("{id}: {}", rec.message), false));
            actions.push(Action::Record { guest: id.clone(), ha: rec.clone() });
        }
        // The timeline of a failover that ended here.
        if let Some(f) = rec.failover.as_mut()
            && f.running.is_none()
            && f.recovered.as_ref().is_some_and(|(to, _)| to == node)
            && guest.running
        {
            f.running = Some(now);
            let total = now.saturating_sub(f.detected);
            actions.push(event(
                "RecoveredRunning",
                format!("{id}: running on {node}, {} after {} was lost", secs(total), f.from),
                false,
            ));
            let ha = rec.clone();
            actions.push(Action::Record { guest: id.clone(), ha });
        }

        if guest.request == Request::Disabled {
            if rec.state != State::Disabled || rec.migrate.is_some() {
                rec.state = State::Disabled;
                rec.migrate = None;
                rec.relocates = 0;
                rec.message = String::new();
                actions.push(Action::Record { guest: id.clone(), ha: rec });
            }
            return;
        }
        if rec.state == State::Error {
            // Proxmox: an error is cleared by disabling the guest, then requesting it again.
            return;
        }

        let lrm = guest.lrm_here();
        if guest.request == Request::Started
            && rec.migrate.is_none()
            && let Some(report) = lrm.filter(|r| r.failed)
        {
            if rec.relocates < guest.max_relocate
                && let Some(target) = pick(node)
            {
                // Through the same hand-over as any move: the node confirms it is stopped.
                rec.relocates += 1;
                rec.state = State::Migrate;
                rec.migrate = Some(Migrate { id: now, target: target.clone() });
                rec.message = format!("relocating from {node} to {target}");
                actions.push(event(
                    "Relocating",
                    format!(
                        "{id}: failed on {node} after {} restart(s); relocating to {target} (relocation {} of {})",
                        report.restarts, rec.relocates, guest.max_relocate
                    ),
                    true,
                ));
                actions.push(Action::Record { guest: id.clone(), ha: rec });
                return;
            } else {
                rec.state = State::Error;
                rec.migrate = None;
                rec.message = if rec.relocates < guest.max_relocate {
                    format!("failed on {node} and no other node may take it")
                } else {
                    format!("failed on {node}; max_relocate ({}) exhausted", guest.max_relocate)
                };
                actions.push(event(
                    "Error",
                    format!("{id}: {}; set it disabled, then started, to retry", rec.message),
                    true,
                ));
                actions.push(Action::Record { guest: id.clone(), ha: rec });
            }
            return;
        }

        if let Some(m) = rec.migrate.clone() {
            let target_alive = states.get(m.target.as_str()) == Some(&NodeState::Online);
            if lrm.and_then(|r| r.stopped_for) == Some(m.id) && target_alive {
                rec.migrate = None;
                rec.state = requested;
                if rec.home.as_deref() == Some(m.target.as_str()) {
                    rec.home = None;
                }
                rec.message = format!("migrated from {node} to {}", m.target);
                actions.push(event("Migrated", format!("{id}: migrated from {node} to {}", m.target), false));
                actions.push(Action::Bind { guest: id.clone(), node: m.target, ha: rec });
            } else if !target_alive {
                rec.migrate = None;
                rec.state = requested;
                rec.message = format!("migration to {} cancelled: the node is not online", m.target);
                actions.push(event("MigrationCancelled", format!("{id}: {}", rec.message), true));
                actions.push(Action::Record { guest: id.clone(), ha: rec });
            }
            return;
        }

        // Moves the node agrees to: a maintenance drain, the return from one, failback.
        let mut migrate = |rec: &mut Record, target: String, reason: &'static str, why: String| {
            rec.migrate = Some(Migrate { id: now, target: target.clone() });
            rec.state = State::Migrate;
            rec.message = format!("migrating to {target}: {why}");
            actions.push(event(reason, format!("{id}: migrating from {node} to {target}: {why}"), false));
            actions.push(Action::Record { guest: id.clone(), ha: rec.clone() });
        };
        if node_state == NodeState::Maintenance {
            match pick(node) {
                Some(target) => {
                    if rec.home.is_none() {
                        rec.home = Some(node.to_string());
                    }
                    migrate(&mut rec, target, "Draining", format!("node {node} is in maintenance"));
                }
                None if rec.message != no_node_message(group) => {
                    rec.message = no_node_message(group);
                    actions.push(event(
                        "DrainBlocked",
                        format!("{id}: node {node} is in maintenance but {}", rec.message),
                        true,
                    ));
                    actions.push(Action::Record { guest: id.clone(), ha: rec });
                }
                None => {}
            }
            return;
        }
        if let Some(home) = rec.home.clone() {
            if home == node {
                rec.home = None;
            } else if states.get(home.as_str()) == Some(&NodeState::Online) {
                migrate(&mut rec, home.clone(), "Returning", format!("node {home} left maintenance"));
                return;
            } else if !states.contains_key(home.as_str()) {
                rec.home = None;
            }
        }
        if let Some(group) = group.filter(|g| !g.nofailback) {
            let here = priority(group, node);
            if let Some(best) = choose(Some(group), states, node, &BTreeMap::new())
                && priority(group, &best).is_some()
                && (here.is_none() || priority(group, &best) > here)
            {
                let why = match here {
                    None => format!("{node} is not in group {}", group.name),
                    Some(_) => format!("{best} has a higher priority in group {}", group.name),
                };
                migrate(&mut rec, best, "Failback", why);
                return;
            }
        }
        if rec.state != requested {
            rec.state = requested;
            if requested == State::Started || requested == State::Stopped {
                rec.message.clear();
            }
            actions.push(Action::Record { guest: id.clone(), ha: rec });
        }
    }
}

fn priority(group: &Group, node: &str) -> Option<u32> {
    group.nodes.iter().find(|(n, _)| n == node).map(|(_, p)| *p)
}

fn no_node_message(group: Option<&Group>) -> String {
    match group {
        Some(g) if g.restricted => format!("no online node of restricted group {} is left", g.name),
        _ => "no online node is left".into(),
    }
}

/// The best online node for a guest, other than `exclude`: the highest priority of its group,
/// then the fewest guests, then the name. A restricted group allows only its members; an
/// unrestricted one falls back to any node.
fn choose(
    group: Option<&Group>,
    states: &BTreeMap<&str, NodeState>,
    exclude: &str,
    load: &BTreeMap<String, usize>,
) -> Option<String> {
    let online = |n: &str| n != exclude && states.get(n) == Some(&NodeState::Online);
    let by_load = |n: &&str| (load.get(*n).copied().unwrap_or(0), n.to_string());
    if let Some(group) = group {
        let top = group.nodes.iter().filter(|(n, _)| online(n)).map(|(_, p)| *p).max();
        if let Some(top) = top {
            return group
                .nodes
                .iter()
                .filter(|(n, p)| *p == top && online(n))
                .map(|(n, _)| n.as_str())
                .min_by_key(by_load)
                .map(str::to_string);
        }
        if group.restricted {
            return None;
        }
    }
    states.keys().copied().filter(|n| online(n)).min_by_key(by_load).map(str::to_string)
}
