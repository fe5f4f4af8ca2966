//! A deterministic simulation of a kpve cluster for the HA logic: nodes whose agents renew
//! leases, run the [`Lrm`] and report to a simulated API server, a watchdog per node, and the
//! [`Crm`] — all on a simulated clock stepping 100 ms, with scripted faults. It logs every
//! decision and checks at every step that no guest runs on two nodes.
//!
//! Scenario text (one command per line, `#` comments):
//!
//! ```text
//! profile fast                      # or default
//! nodes n1 n2 n3
//! group g1 n1:2,n2:1,n3 restricted nofailback
//! guest vm:100 n1 group=g1 state=started max_restart=1 max_relocate=1
//! at 10 crash n1                    # power off: agent, guests and watchdog gone
//! at 40 boot n1                     # back, with a fresh agent
//! at 10 kill-agent n1               # kill -9 the agent: its guests and watchdog stay
//! at 12 start-agent n1
//! at 10 partition n1                # the agent cannot reach the API server
//! at 10 stall-agent n1              # it renews its lease but reconciles nothing
//! at 12 unstall-agent n1
//! at 20 heal n1
//! at 10 maintenance n1 on           # or off
//! at 10 guest-crash vm:100          # its process dies once
//! at 10 guest-fail vm:100 n2        # every start of it on n2 fails
//! at 20 guest-fix vm:100 n2         # and from now on succeeds
//! at 10 set vm:100 disabled         # started, stopped, disabled, ignored
//! run 60                            # simulate until 60 s
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::crm::{Action, Crm, Group, Guest, LrmReport, Node, Record, Request, State};
use crate::lrm::{Fencing, GuestView, Lrm, Step, step};
use crate::{Ms, Profile, secs};

const STEP: Ms = 100;
const CRM_EVERY: Ms = 500;

struct SimNode {
    up: bool,
    agent: bool,
    partitioned: bool,
    maintenance: bool,
    lrm: Lrm,
    /// The watchdog's view: the last accepted renewal, as the agent wrote it to disk.
    lease_ok: Option<Ms>,
    next_renew: Ms,
    /// The lease in the API server.
    lease: Option<String>,
    /// Guests whose processes run here (the host's truth).
    running: BTreeSet<String>,
    /// Guests that fail whenever they start here.
    failing: BTreeSet<String>,
    /// Guests the LRM stopped in its last self-fence.
    fenced: BTreeSet<String>,
    /// Renews its lease but does not reconcile guests (a stuck agent).
    stalled: bool,
    /// The agent's run, counted up at every (re)start.
    epoch: u64,
}

struct SimGuest {
    request: Request,
    group: Option<String>,
    max_restart: u32,
    max_relocate: u32,
    node: Option<String>,
    /// The last status an agent wrote: which node, and whether it ran there.
    reported: Option<(String, bool)>,
    lrm: Option<LrmReport>,
    ha: Record,
}

pub struct Sim {
    profile: Profile,
    now: Ms,
    crm: Crm,
    nodes: BTreeMap<String, SimNode>,
    groups: Vec<Group>,
    guests: BTreeMap<String, SimGuest>,
    commands: Vec<(Ms, Vec<String>)>,
    end: Ms,
    log: Vec<String>,
    /// Guests seen on two nodes at the last step (logged once per episode).
    doubled: BTreeSet<String>,
}

/// Runs a scenario; returns its log, or why the scenario text is wrong.
pub fn run(scenario: &str) -> Result<String, String> {
    let mut sim = Sim::parse(scenario)?;
    sim.run()?;
    Ok(sim.log.join("\n") + "\n")
}

fn field<'a>(words: &'a [String], i: usize, line: &str) -> Result<&'a str, String> {
    words.get(i).map(String::as_str).ok_or_else(|| format!("`{line}`: missing argument {i}"))
}

fn request(text: &str) -> Result<Request, String> {
    match text {
        "started" => Ok(Request::Started),
        "stopped" => Ok(Request::Stopped),
        "disabled" => Ok(Request::Disabled),
        "ignored" => Ok(Request::Ignored),
        _ => Err(format!("unknown HA state `{text}`")),
    }
}

impl Sim {
    fn parse(text: &str) -> Result<Sim, String> {
        let mut sim = Sim {
            profile: Profile::FAST,
            now: 0,
            crm: Crm::new(),
            nodes: BTreeMap::new(),
            groups: Vec::new(),
            guests: BTreeMap::new(),
            commands: Vec::new(),
            end: 60_000,
            log: Vec::new(),
            doubled: BTreeSet::new(),
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            match words[0].as_str() {
                "profile" => {
                    let name = field(&words, 1, line)?;
                    sim.profile =
                        Profile::by_name(name).ok_or_else(|| format!("unknown profile `{name}`"))?;
                }
                "nodes" => {
                    for name in &words[1..] {
                        sim.nodes.insert(name.clone(), sim.new_node());
                    }
                }
                "group" => {
                    let name = field(&words, 1, line)?.to_string();
                    let mut nodes = Vec::new();
                    for entry in field(&words, 2, line)?.split(',') {
                        let (node, prio) = entry.split_once(':').unwrap_or((entry, "0"));
                        let prio = prio.parse().map_err(|_| format!("`{line}`: bad priority `{prio}`"))?;
                        nodes.push((node.to_string(), prio));
                    }
                    let flags = &words[3..];
                    sim.groups.push(Group {
                        name,
                        nodes,
                        restricted: flags.iter().any(|f| f == "restricted"),
                        nofailback: flags.iter().any(|f| f == "nofailback"),
                    });
                }
                "guest" => {
                    let id = field(&words, 1, line)?.to_string();
                    let node = field(&words, 2, line)?.to_string();
                    let mut guest = SimGuest {
                        request: Request::Started,
                        group: None,
                        max_restart: 1,
                        max_relocate: 1,
                        node: Some(node),
                        reported: None,
                        lrm: None,
                        ha: Record::default(),
                    };
                    for option in &words[3..] {
                        let (key, value) =
                            option.split_once('=').ok_or_else(|| format!("`{line}`: expected key=value"))?;
                        let number =
                            || value.parse::<u32>().map_err(|_| format!("`{line}`: bad number `{value}`"));
                        match key {
                            "group" => guest.group = Some(value.to_string()),
                            "state" => guest.request = request(value)?,
                            "max_restart" => guest.max_restart = number()?,
                            "max_relocate" => guest.max_relocate = number()?,
                            _ => return Err(format!("`{line}`: unknown option `{key}`")),
                        }
                    }
                    sim.guests.insert(id, guest);
                }
                "at" => {
                    let at: f64 =
                        field(&words, 1, line)?.parse().map_err(|_| format!("`{line}`: bad time"))?;
                    sim.commands.push(((at * 1000.0) as Ms, words[2..].to_vec()));
                }
                "run" => {
                    let end: f64 =
                        field(&words, 1, line)?.parse().map_err(|_| format!("`{line}`: bad time"))?;
                    sim.end = (end * 1000.0) as Ms;
                }
                other => return Err(format!("unknown command `{other}`")),
            }
        }
        sim.commands.sort_by_key(|(at, _)| *at);
        Ok(sim)
    }

    fn new_node(&self) -> SimNode {
        SimNode {
            up: true,
            agent: true,
            partitioned: false,
            maintenance: false,
            lrm: Lrm::new(self.profile, None),
            lease_ok: None,
            next_renew: 0,
            lease: None,
            running: BTreeSet::new(),
            failing: BTreeSet::new(),
            fenced: BTreeSet::new(),
            stalled: false,
            epoch: 1,
        }
    }

    fn say(&mut self, who: &str, message: String) {
        let t = format!("{:>3}.{}", self.now / 1000, (self.now % 1000) / 100);
        self.log.push(format!("{t} {who:<8} {message}"));
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut SimNode, String> {
        self.nodes.get_mut(name).ok_or_else(|| format!("unknown node `{name}`"))
    }

    fn command(&mut self, words: &[String]) -> Result<(), String> {
        let line = words.join(" ");
        let arg = |i| field(words, i, &line).map(str::to_string);
        let what = arg(0)?;
        self.say("cmd", line.clone());
        let profile = self.profile;
        match what.as_str() {
            "crash" => {
                let n = self.node_mut(&arg(1)?)?;
                n.up = false;
                n.agent = false;
                n.running.clear();
                n.lease_ok = None;
            }
            "boot" => {
                let n = self.node_mut(&arg(1)?)?;
                n.up = true;
                n.agent = true;
                n.partitioned = false;
                n.stalled = false;
                n.epoch += 1;
                n.lrm = Lrm::new(profile, None);
            }
            "kill-agent" => self.node_mut(&arg(1)?)?.agent = false,
            "start-agent" => {
                let n = self.node_mut(&arg(1)?)?;
                n.agent = true;
                n.stalled = false;
                n.epoch += 1;
                n.lrm = Lrm::new(profile, n.lease_ok);
            }
            "stall-agent" => self.node_mut(&arg(1)?)?.stalled = true,
            "unstall-agent" => self.node_mut(&arg(1)?)?.stalled = false,
            "partition" => self.node_mut(&arg(1)?)?.partitioned = true,
            "heal" => self.node_mut(&arg(1)?)?.partitioned = false,
            "maintenance" => {
                let on = match arg(2)?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("`{line}`: expected on or off, got `{other}`")),
                };
                self.node_mut(&arg(1)?)?.maintenance = on;
            }
            "guest-crash" => {
                let id = arg(1)?;
                for n in self.nodes.values_mut() {
                    n.running.remove(&id);
                }
            }
            "guest-fail" => {
                let id = arg(1)?;
                self.node_mut(&arg(2)?)?.failing.insert(id);
            }
            "guest-fix" => {
                let id = arg(1)?;
                self.node_mut(&arg(2)?)?.failing.remove(&id);
            }
            "set" => {
                let id = arg(1)?;
                let state = request(&arg(2)?)?;
                self.guests.get_mut(&id).ok_or_else(|| format!("unknown guest `{id}`"))?.request = state;
            }
            other => return Err(format!("unknown fault `{other}`")),
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        let mut commands = std::mem::take(&mut self.commands).into_iter().peekable();
        while self.now <= self.end {
            while let Some((_, words)) = commands.next_if(|(at, _)| *at <= self.now) {
                self.command(&words)?;
            }
            let names: Vec<String> = self.nodes.keys().cloned().collect();
            for name in &names {
                self.node_step(name);
            }
            if self.now.is_multiple_of(CRM_EVERY) {
                self.crm_step();
            }
            self.check_single_owner();
            self.now += STEP;
        }
        Ok(())
    }

    fn node_step(&mut self, name: &str) {
        let now = self.now;
        let profile = self.profile;
        let n = self.nodes.get_mut(name).expect("node");
        if !n.up {
            return;
        }
        let connected = n.agent && !n.partitioned;
        if connected && now >= n.next_renew {
            n.lease = Some(now.to_string());
            n.lrm.renewed(now);
            n.lease_ok = n.lrm.last_ok();
            n.next_renew = now + profile.renew;
        }
        if n.agent {
            if n.lrm.tick(now) == Fencing::SelfFence {
                n.fenced = n.running.clone();
                let stopped = self.stop_all(name);
                let n = &self.nodes[name];
                let since = n.lrm.last_ok().map(|t| secs(now - t)).unwrap_or_else(|| "ever".into());
                self.say(
                    &format!("lrm {name}"),
                    format!("self-fence: no lease renewal for {since}; stopped {stopped}"),
                );
            }
        } else if n.lease_ok.is_none_or(|t| now >= t + profile.fence) && !n.running.is_empty() {
            let killed = self.stop_all(name);
            self.say(&format!("wdog {name}"), format!("agent gone and lease stale: killed {killed}"));
        }
        if connected && !self.nodes[name].stalled {
            self.agent_step(name);
        }
    }

    /// Stops every guest running on `name` (all are HA guests here); their names.
    fn stop_all(&mut self, name: &str) -> String {
        let n = self.nodes.get_mut(name).expect("node");
        let stopped: Vec<String> = std::mem::take(&mut n.running).into_iter().collect();
        if stopped.is_empty() { "nothing".into() } else { stopped.join(", ") }
    }

    fn agent_step(&mut self, name: &str) {
        let now = self.now;
        let who = format!("lrm {name}");
        // Guests running here that are bound elsewhere now: the agent releases them.
        let running: Vec<String> = self.nodes[name].running.iter().cloned().collect();
        for id in running {
            let bound = self.guests.get(&id).and_then(|g| g.node.clone());
            if bound.as_deref() != Some(name) {
                self.nodes.get_mut(name).expect("node").running.remove(&id);
                self.say(&who, format!("{id} is bound to {} now: stopped", bound.unwrap_or_default()));
            }
        }
        let ids: Vec<String> = self
            .guests
            .iter()
            .filter(|(_, g)| g.node.as_deref() == Some(name))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let n = &self.nodes[name];
            let g = &self.guests[&id];
            if g.request == Request::Ignored {
                continue;
            }
            let running = n.running.contains(&id);
            let view = GuestView {
                want_running: g.request == Request::Started
                    && !matches!(g.ha.state, State::Error | State::Disabled),
                running,
                max_restart: g.max_restart,
                migrate: g.ha.migrate.as_ref().map(|m| m.id),
                report: g.lrm.as_ref(),
                fenced: n.fenced.contains(&id),
                epoch: n.epoch,
            };
            let (action, report) = step(name, &view, n.lrm.holds_lease(now));
            let failing = n.failing.contains(&id);
            let n = self.nodes.get_mut(name).expect("node");
            let mut running = running;
            match action {
                Step::Nothing => {}
                Step::Start | Step::Restart => {
                    let verb = if action == Step::Start { "started" } else { "restarted" };
                    if failing {
                        self.say(&who, format!("{id}: start failed"));
                    } else {
                        n.running.insert(id.clone());
                        n.fenced.remove(&id);
                        running = true;
                        let count = if action == Step::Restart {
                            format!(" (restart {})", report.restarts)
                        } else {
                            String::new()
                        };
                        self.say(&who, format!("{id}: {verb}{count}"));
                    }
                }
                Step::Stop => {
                    n.running.remove(&id);
                    running = false;
                    self.say(&who, format!("{id}: stopped"));
                }
                Step::StopFor(_) => {
                    n.running.remove(&id);
                    running = false;
                    self.say(&who, format!("{id}: stopped for the migration"));
                }
                Step::GiveUp => {
                    self.say(&who, format!("{id}: restarts exhausted; left for the CRM to relocate"))
                }
            }
            let g = self.guests.get_mut(&id).expect("guest");
            g.reported = Some((name.to_string(), running));
            g.lrm = Some(report);
        }
    }

    fn crm_step(&mut self) {
        let nodes: Vec<Node> = self
            .nodes
            .iter()
            .map(|(name, n)| Node {
                name: name.clone(),
                renew: n.lease.clone(),
                lease: self.profile.lease,
                maintenance: n.maintenance,
            })
            .collect();
        let guests: Vec<Guest> = self
            .guests
            .iter()
            .map(|(id, g)| Guest {
                id: id.clone(),
                request: g.request,
                group: g.group.clone(),
                max_restart: g.max_restart,
                max_relocate: g.max_relocate,
                node: g.node.clone(),
                running: g.reported.as_ref().is_some_and(|(n, r)| *r && Some(n) == g.node.as_ref()),
                lrm: g.lrm.clone(),
                ha: g.ha.clone(),
            })
            .collect();
        for action in self.crm.tick(self.now, &nodes, &self.groups, &guests) {
            match action {
                Action::Bind { guest, node, ha } => {
                    let g = self.guests.get_mut(&guest).expect("guest");
                    g.node = Some(node);
                    g.ha = ha;
                }
                Action::Record { guest, ha } => self.guests.get_mut(&guest).expect("guest").ha = ha,
                Action::Event { reason, message, .. } => self.say("crm", format!("{reason}: {message}")),
            }
        }
    }

    fn check_single_owner(&mut self) {
        let mut owners: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, n) in &self.nodes {
            for id in &n.running {
                owners.entry(id.as_str()).or_default().push(name.as_str());
            }
        }
        let doubled: BTreeSet<String> =
            owners.iter().filter(|(_, on)| on.len() > 1).map(|(id, _)| id.to_string()).collect();
        let new: Vec<String> = doubled
            .iter()
            .filter(|id| !self.doubled.contains(*id))
            .map(|id| format!("VIOLATION: {id} runs on {}", owners[id.as_str()].join(" and ")))
            .collect();
        for line in new {
            self.say("check", line);
        }
        self.doubled = doubled;
    }
}

/// Whether a log shows a guest running on two nodes at once.
pub fn has_violation(log: &str) -> bool {
    log.contains("VIOLATION")
}
