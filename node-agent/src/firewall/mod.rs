//! The firewall compiler: a pure function from every firewall input of one node (cluster
//! options, aliases and rules, security groups, IP sets, the host's rules, the guests bound
//! here) to one nftables ruleset, applied atomically by [`nft`].
//!
//! Two tables, and kpve never touches any other:
//! - `bridge kpve` binds guest NICs. Frames entering the bridge from a guest's tap/veth go
//!   through that port's chain (MAC and IP anti-spoofing), and every firewalled port stamps a
//!   port number into the packet mark, ingress port in bits 20–31, egress port in bits 8–19.
//!   This kernel's bridge family has neither conntrack nor reject, so stateful filtering
//!   happens one step later.
//! - `inet kpve` holds the stateful rules. Bridged IP traffic reaches its `forward` hook
//!   through bridge netfilter; one verdict-map lookup on each half of the mark jumps to the
//!   sending guest's OUT chain and the receiving guest's IN chain, so per-packet cost does not
//!   grow with the number of guests. `input`/`output` hold the host's and the cluster's rules.
//!
//! Semantics follow Proxmox VE: the cluster `enable` is the master switch; a guest is
//! filtered on NICs with `firewall: true` when its own firewall is enabled; an OUT accept lets
//! the receiving guest's IN rules decide; host rules come before cluster rules, then the
//! management ports are accepted, then the policy applies — so host rules never lock out the
//! API unless a rule says so explicitly.

pub mod nft;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kpve_crds::codec::fw::print_rule;
use kpve_crds::firewall::lang::{self, AddrItem, Address, Net, Scope};
use kpve_crds::firewall::macros;
use kpve_crds::{
    Alias, ClusterFirewallSpec, FirewallRule, GuestFirewall, HostFirewall, IPSetSpec, IpSetEntry, LogLevel,
    Policy, RuleType, SecurityGroupSpec,
};
use serde_json::{Value, json};

/// Name of both kpve tables (`inet kpve`, `bridge kpve`).
pub const TABLE: &str = "kpve";

/// Ports the host always accepts after its own rules: SSH, the SPICE proxy, VNC consoles, the
/// Kubernetes API and the Proxmox API.
pub const MANAGEMENT_PORTS: &[(u16, u16)] =
    &[(22, 22), (3128, 3128), (5900, 5999), (6443, 6443), (8006, 8006)];

const IN_PORT_SHIFT: u32 = 20;
const OUT_PORT_SHIFT: u32 = 8;
const IN_PORT_MASK: u32 = 0xFFF0_0000;
const OUT_PORT_MASK: u32 = 0x000F_FF00;
/// Firewalled guest NICs per node: port numbers are 12 bits wide.
pub const MAX_PORTS: usize = 4095;

/// Everything the ruleset of one node depends on.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// This node's name (for reporting problems in its Hypervisor's rules).
    pub node: String,
    pub cluster: Option<ClusterFirewallSpec>,
    pub groups: BTreeMap<String, SecurityGroupSpec>,
    pub ipsets: BTreeMap<String, IPSetSpec>,
    /// This node's `Hypervisor.spec.firewall`; `None` is an enabled host firewall without rules.
    pub host: Option<HostFirewall>,
    /// Bridges on this node: traffic bridged within one of them is not routed traffic, so
    /// `policy_forward` does not apply to it.
    pub bridges: Vec<String>,
    pub guests: Vec<Guest>,
}

/// A guest bound to this node.
#[derive(Debug, Clone)]
pub struct Guest {
    pub vmid: u32,
    /// `VirtualMachine/<ns>/<name>`: who a problem is reported to.
    pub owner: String,
    pub firewall: Option<GuestFirewall>,
    pub nics: Vec<GuestNic>,
}

/// One NIC of a guest, as the agent plugs it.
#[derive(Debug, Clone)]
pub struct GuestNic {
    /// `net0`.
    pub id: String,
    /// Host side of the NIC: `tap100i0` or `veth100i0`.
    pub ifname: String,
    pub mac: Option<String>,
    pub bridge: Option<String>,
    /// The NIC's `firewall` flag.
    pub firewall: bool,
    /// Addresses configured for the guest on this NIC (implicitly allowed by ipfilter).
    pub ips: Vec<Net>,
}

/// A rule that cannot be compiled: an IP set, alias or group that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// `ClusterFirewall/cluster`, `SecurityGroup/web`, `Hypervisor/node1`, `VirtualMachine/ns/name`.
    pub owner: String,
    /// Path of the rule in its object, e.g. `spec.firewall.rules[2]`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.owner, self.field, self.message)
    }
}

/// A compiled ruleset.
#[derive(Debug, Clone, PartialEq)]
pub struct Ruleset {
    /// The `nft -j -f` document: replaces both kpve tables in one transaction, or (when the
    /// cluster firewall is off) removes them.
    pub document: Value,
    pub enabled: bool,
    /// Number of rules loaded.
    pub rules: u32,
}

/// Compiles all inputs to one ruleset.
pub fn compile(inputs: &Inputs) -> Result<Ruleset, Vec<RuleError>> {
    let enabled = inputs.cluster.as_ref().is_some_and(|c| c.enable);
    if !enabled {
        return Ok(Ruleset { document: removal(), enabled: false, rules: 0 });
    }
    let mut c = Compiler {
        inputs,
        cmds: Vec::new(),
        sets: BTreeMap::new(),
        errors: Vec::new(),
        chain_rules: Vec::new(),
        chain_index: BTreeMap::new(),
    };
    c.build();
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let (document, rules) = c.finish();
    Ok(Ruleset { document, enabled: true, rules })
}

/// The document that removes kpve's tables (and nothing else); harmless when they are absent.
pub fn removal() -> Value {
    let mut cmds = Vec::new();
    for family in ["inet", "bridge"] {
        cmds.push(json!({"add": {"table": {"family": family, "name": TABLE}}}));
        cmds.push(json!({"delete": {"table": {"family": family, "name": TABLE}}}));
    }
    json!({ "nftables": cmds })
}

/// A named set: family and elements.
struct SetDef {
    family: &'static str,
    type_: &'static str,
    elems: Vec<Value>,
}

struct Compiler<'a> {
    inputs: &'a Inputs,
    /// Chain declarations, in order.
    cmds: Vec<Value>,
    sets: BTreeMap<String, SetDef>,
    errors: Vec<RuleError>,
    /// Rules per (family, chain), chains in declaration order.
    chain_rules: Vec<((String, String), Vec<Pending>)>,
    chain_index: BTreeMap<(String, String), usize>,
}

/// A rule waiting to be emitted. Consecutive rules of one chain that differ only in the
/// literal values they match, with the same statements after the matches (same verdict,
/// same log), are one rule over a set: `ip saddr . tcp dport { a . 22, b . 22 } accept`. First
/// match wins either way, and the packet pays one set lookup instead of one rule per line.
struct Pending {
    exprs: Vec<Value>,
    merge: Option<Mergeable>,
}

struct Mergeable {
    lefts: Vec<Value>,
    tail: Vec<Value>,
    tuples: Vec<Vec<Value>>,
}

/// Alternatives of one match value: a literal, or the literals of an anonymous set.
fn literal_alternatives(right: &Value) -> Option<Vec<Value>> {
    let literal = |v: &Value| match v {
        Value::String(s) => !s.starts_with('@'),
        Value::Number(_) => true,
        Value::Object(o) => o.contains_key("prefix") || o.contains_key("range"),
        _ => false,
    };
    match right.get("set").and_then(Value::as_array) {
        Some(items) if items.iter().all(literal) => Some(items.clone()),
        Some(_) => None,
        None => literal(right).then(|| vec![right.clone()]),
    }
}

/// Cross products above this size are not worth a concatenated set.
const MAX_TUPLES_PER_RULE: usize = 64;

fn mergeable(exprs: &[Value]) -> Option<Mergeable> {
    let mut lefts = Vec::new();
    let mut tuples: Vec<Vec<Value>> = vec![vec![]];
    let mut rest = exprs;
    while let Some((first, tail)) = rest.split_first() {
        let Some(m) = first.get("match") else { break };
        if m.get("op").and_then(Value::as_str) != Some("==") || m["left"].get("concat").is_some() {
            return None;
        }
        let alternatives = literal_alternatives(&m["right"])?;
        if tuples.len() * alternatives.len() > MAX_TUPLES_PER_RULE {
            return None;
        }
        tuples = tuples
            .iter()
            .flat_map(|t| {
                alternatives
                    .iter()
                    .map(move |a| t.iter().cloned().chain(std::iter::once(a.clone())).collect())
            })
            .collect();
        lefts.push(m["left"].clone());
        rest = tail;
    }
    if lefts.is_empty() || rest.iter().any(|e| e.get("match").is_some()) {
        return None;
    }
    Some(Mergeable { lefts, tail: rest.to_vec(), tuples })
}

impl Pending {
    fn emit(self) -> Vec<Value> {
        match self.merge {
            Some(m) if m.tuples.len() > 1 => {
                let (left, right) = if m.lefts.len() == 1 {
                    (m.lefts[0].clone(), m.tuples.into_iter().map(|mut t| t.remove(0)).collect::<Vec<_>>())
                } else {
                    (
                        json!({"concat": m.lefts}),
                        m.tuples.into_iter().map(|t| json!({"concat": t})).collect::<Vec<_>>(),
                    )
                };
                let mut exprs = vec![eq(left, json!({"set": right}))];
                exprs.extend(m.tail);
                exprs
            }
            _ => self.exprs,
        }
    }
}

/// Where a rule is compiled: the chain its verdicts end and the names it may use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    HostIn,
    HostOut,
    Forward,
    GuestIn,
    GuestOut,
}

/// What one address of a rule resolves to, per family.
#[derive(Clone, Default)]
struct Resolved {
    v4: Option<(Value, Option<Value>)>,
    v6: Option<(Value, Option<Value>)>,
}

fn verdict(v: &str) -> Value {
    json!({ v: null })
}

fn jump(target: &str) -> Value {
    json!({"jump": {"target": target}})
}

fn eq(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn ne(left: Value, right: Value) -> Value {
    json!({"match": {"op": "!=", "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn item_value(item: &AddrItem) -> Value {
    match item {
        AddrItem::Net(n) if n.prefix == Net::host(n.addr).prefix => json!(n.addr.to_string()),
        AddrItem::Net(n) => json!({"prefix": {"addr": n.addr.to_string(), "len": n.prefix}}),
        AddrItem::Range(a, b) => json!({"range": [a.to_string(), b.to_string()]}),
    }
}

fn items_value(items: &[AddrItem]) -> Value {
    match items {
        [one] => item_value(one),
        many => json!({"set": many.iter().map(item_value).collect::<Vec<_>>()}),
    }
}

fn ports_value(ports: &[(u16, u16)]) -> Value {
    let one = |&(a, b): &(u16, u16)| if a == b { json!(a) } else { json!({"range": [a, b]}) };
    match ports {
        [p] => one(p),
        many => json!({"set": many.iter().map(one).collect::<Vec<_>>()}),
    }
}

fn nft_level(l: LogLevel) -> Option<&'static str> {
    Some(match l {
        LogLevel::Emerg => "emerg",
        LogLevel::Alert => "alert",
        LogLevel::Crit => "crit",
        LogLevel::Err => "err",
        LogLevel::Warning => "warn",
        LogLevel::Notice => "notice",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Nolog => return None,
    })
}

fn port_protocol(proto: u8) -> Option<&'static str> {
    Some(match proto {
        6 => "tcp",
        17 => "udp",
        33 => "dccp",
        132 => "sctp",
        136 => "udplite",
        _ => return None,
    })
}

/// The IPv6 link-local address a NIC derives from its MAC (EUI-64).
fn link_local(mac: &str) -> Option<IpAddr> {
    let b: Vec<u8> = mac.split(':').map(|x| u8::from_str_radix(x, 16)).collect::<Result<_, _>>().ok()?;
    let [a, b1, c, d, e, f] = b[..] else { return None };
    let bytes = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, a ^ 0x02, b1, c, 0xff, 0xfe, d, e, f];
    Some(IpAddr::from(bytes))
}

impl<'a> Compiler<'a> {
    fn cluster(&self) -> &'a ClusterFirewallSpec {
        self.inputs.cluster.as_ref().expect("compiled only when enabled")
    }

    fn add(&mut self, what: &str, body: Value) {
        self.cmds.push(json!({"add": { what: body }}));
    }

    fn chain(&mut self, family: &str, name: &str, hook: Option<(&str, i32)>) {
        let mut body = json!({"family": family, "table": TABLE, "name": name});
        if let Some((hook, prio)) = hook {
            body["type"] = json!("filter");
            body["hook"] = json!(hook);
            body["prio"] = json!(prio);
            body["policy"] = json!("accept");
        }
        self.add("chain", body);
    }

    fn rule(&mut self, family: &str, chain: &str, expr: Vec<Value>) {
        let key = (family.to_string(), chain.to_string());
        let idx = *self.chain_index.entry(key.clone()).or_insert_with(|| {
            self.chain_rules.push((key, Vec::new()));
            self.chain_rules.len() - 1
        });
        let pending = &mut self.chain_rules[idx].1;
        let merge = mergeable(&expr);
        if let (Some(new), Some(Pending { merge: Some(last), .. })) = (&merge, pending.last_mut())
            && last.lefts == new.lefts
            && last.tail == new.tail
        {
            last.tuples.extend(new.tuples.iter().cloned());
            return;
        }
        pending.push(Pending { exprs: expr, merge });
    }

    /// The document and the number of rules it loads.
    fn finish(self) -> (Value, u32) {
        let mut out = Vec::new();
        for family in ["inet", "bridge"] {
            // add + delete + add: one transaction that replaces the table whether or not it existed.
            out.push(json!({"add": {"table": {"family": family, "name": TABLE}}}));
            out.push(json!({"delete": {"table": {"family": family, "name": TABLE}}}));
            out.push(json!({"add": {"table": {"family": family, "name": TABLE}}}));
        }
        for (name, set) in &self.sets {
            let mut body = json!({
                "family": set.family, "table": TABLE, "name": name, "type": set.type_,
                "flags": ["interval"], "auto-merge": true,
            });
            if !set.elems.is_empty() {
                body["elem"] = json!(set.elems);
            }
            out.push(json!({"add": {"set": body}}));
        }
        out.extend(self.cmds);
        let mut count = 0;
        for ((family, chain), rules) in self.chain_rules {
            for rule in rules {
                count += 1;
                out.push(json!({"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "expr": rule.emit()}}}));
            }
        }
        (json!({ "nftables": out }), count)
    }

    /// Declares (once) the v4/v6 sets of a list of entries; returns the set references.
    fn entry_sets(&mut self, family: &'static str, base: &str, entries: &[IpSetEntry]) -> Resolved {
        let mut r = Resolved::default();
        for v4 in [true, false] {
            let (matching, nomatch): (Vec<_>, Vec<_>) = entries
                .iter()
                .filter_map(|e| lang::parse_net(&e.cidr).ok().map(|n| (e.nomatch, n)))
                .filter(|(_, n)| n.is_v4() == v4)
                .partition(|(nomatch, _)| !nomatch);
            let suffix = if v4 { "v4" } else { "v6" };
            let type_ = if v4 { "ipv4_addr" } else { "ipv6_addr" };
            let name = format!("{base}-{suffix}");
            self.sets.entry(name.clone()).or_insert_with(|| SetDef {
                family,
                type_,
                elems: matching.iter().map(|(_, n)| item_value(&AddrItem::Net(*n))).collect(),
            });
            let exclude = if nomatch.is_empty() {
                None
            } else {
                let nm = format!("{base}-nm-{suffix}");
                self.sets.entry(nm.clone()).or_insert_with(|| SetDef {
                    family,
                    type_,
                    elems: nomatch.iter().map(|(_, n)| item_value(&AddrItem::Net(*n))).collect(),
                });
                Some(json!(format!("@{nm}")))
            };
            if !matching.is_empty() {
                let slot = (json!(format!("@{name}")), exclude);
                if v4 {
                    r.v4 = Some(slot);
                } else {
                    r.v6 = Some(slot);
                }
            }
        }
        r
    }

    fn resolve(&mut self, addr: &str, guest: Option<&'a Guest>) -> Result<Resolved, String> {
        let parsed = lang::parse_address(addr)?;
        let guest_fw = guest.and_then(|g| g.firewall.as_ref());
        match parsed {
            Address::List(items) => {
                let (v4, v6): (Vec<AddrItem>, Vec<AddrItem>) = items.into_iter().partition(|i| i.is_v4());
                Ok(Resolved {
                    v4: (!v4.is_empty()).then(|| (items_value(&v4), None)),
                    v6: (!v6.is_empty()).then(|| (items_value(&v6), None)),
                })
            }
            Address::Alias { scope, name } => {
                let find = |aliases: &'a [Alias]| aliases.iter().find(|a| a.name.eq_ignore_ascii_case(&name));
                let local = if scope == Scope::Dc { None } else { guest_fw.and_then(|f| find(&f.aliases)) };
                let found = match (scope, local) {
                    (_, Some(a)) => Some(a),
                    (Scope::Guest, None) => None,
                    _ => find(&self.cluster().aliases),
                };
                let alias = found.ok_or_else(|| format!("alias {name:?} does not exist"))?;
                let net = lang::parse_net(&alias.cidr)?;
                let v = (item_value(&AddrItem::Net(net)), None);
                Ok(if net.is_v4() {
                    Resolved { v4: Some(v), v6: None }
                } else {
                    Resolved { v4: None, v6: Some(v) }
                })
            }
            Address::IpSet { scope, name } => {
                if scope != Scope::Dc
                    && let (Some(g), Some(fw)) = (guest, guest_fw)
                    && let Some(set) = fw.ipsets.iter().find(|s| s.name == name)
                {
                    return Ok(self.entry_sets("inet", &format!("g{}-{}", g.vmid, set.name), &set.entries));
                }
                if scope == Scope::Guest {
                    return Err(format!("IP set \"guest/{name}\" does not exist"));
                }
                let set =
                    self.inputs.ipsets.get(&name).ok_or_else(|| format!("IP set {name:?} does not exist"))?;
                Ok(self.entry_sets("inet", &format!("dc-{name}"), &set.entries))
            }
        }
    }

    fn build(&mut self) {
        let cluster = self.cluster();
        let host = self.inputs.host.clone().unwrap_or(HostFirewall {
            enable: true,
            nosmurfs: true,
            ..Default::default()
        });

        // Shared reject chain: TCP gets a reset, everything else an ICMP "administratively
        // prohibited"; broadcasts are never answered.
        self.chain("inet", "do-reject", None);
        self.rule("inet", "do-reject", vec![eq(meta("pkttype"), json!("broadcast")), verdict("drop")]);
        self.rule(
            "inet",
            "do-reject",
            vec![eq(meta("l4proto"), json!("tcp")), json!({"reject": {"type": "tcp reset"}})],
        );
        self.rule(
            "inet",
            "do-reject",
            vec![json!({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})],
        );

        let ct_accept = json!({"vmap": {"key": {"ct": {"key": "state"}}, "data": {"set": [
            ["established", {"accept": null}], ["related", {"accept": null}], ["invalid", {"drop": null}]]}}});

        if host.enable {
            self.chain("inet", "input", Some(("input", 0)));
            self.rule("inet", "input", vec![eq(meta("iifname"), json!("lo")), verdict("accept")]);
            self.rule("inet", "input", vec![ct_accept.clone()]);
            let host_rules: Vec<(String, String, FirewallRule)> = host
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| (self.host_owner(), format!("spec.firewall.rules[{i}]"), r.clone()))
                .chain(cluster.rules.iter().enumerate().map(|(i, r)| {
                    ("ClusterFirewall/cluster".to_string(), format!("spec.rules[{i}]"), r.clone())
                }))
                .collect();
            for (owner, field, r) in
                host_rules.iter().filter(|(_, _, r)| matches!(r.type_, RuleType::In | RuleType::Group))
            {
                self.compile_rule(r, Ctx::HostIn, "input", None, owner, field, None);
            }
            // Management ports, from the `management` IP set when one is declared.
            let mgmt =
                self.inputs.ipsets.contains_key("management").then(|| self.resolve("+management", None));
            let ports = ports_value(MANAGEMENT_PORTS);
            match mgmt {
                Some(Ok(r)) => {
                    for (fam, m) in [("ip", r.v4), ("ip6", r.v6)] {
                        if let Some((set, exclude)) = m {
                            let mut e = vec![eq(payload(fam, "saddr"), set)];
                            if let Some(x) = exclude {
                                e.push(ne(payload(fam, "saddr"), x));
                            }
                            e.push(eq(payload("tcp", "dport"), ports.clone()));
                            e.push(verdict("accept"));
                            self.rule("inet", "input", e);
                        }
                    }
                }
                _ => self.rule("inet", "input", vec![eq(payload("tcp", "dport"), ports), verdict("accept")]),
            }
            self.policy("input", cluster.policy_in, host.log_level_in, "host-in", Ctx::HostIn);

            self.chain("inet", "output", Some(("output", 0)));
            self.rule("inet", "output", vec![eq(meta("oifname"), json!("lo")), verdict("accept")]);
            self.rule("inet", "output", vec![ct_accept.clone()]);
            for (owner, field, r) in
                host_rules.iter().filter(|(_, _, r)| matches!(r.type_, RuleType::Out | RuleType::Group))
            {
                self.compile_rule(r, Ctx::HostOut, "output", None, owner, field, None);
            }
            self.policy("output", cluster.policy_out, host.log_level_out, "host-out", Ctx::HostOut);
        }

        // Guests.
        self.chain("inet", "forward", Some(("forward", 0)));
        self.rule(
            "inet",
            "forward",
            vec![json!({"vmap": {"key": {"ct": {"key": "state"}}, "data": {"set": [
                ["established", {"accept": null}], ["related", {"accept": null}]]}}})],
        );
        let ports: Vec<(&'a Guest, &'a GuestNic)> = self
            .inputs
            .guests
            .iter()
            .filter(|g| g.firewall.as_ref().is_some_and(|f| f.enable))
            .flat_map(|g| g.nics.iter().filter(|n| n.firewall).map(move |n| (g, n)))
            .take(MAX_PORTS)
            .collect();
        self.chain("bridge", "prerouting", Some(("prerouting", -300)));
        self.chain("bridge", "forward", Some(("forward", -300)));
        let (mut ingress, mut egress, mut outs, mut ins) = (vec![], vec![], vec![], vec![]);
        for (i, (guest, nic)) in ports.iter().enumerate() {
            let id = i as u32 + 1;
            let base = format!("g{}-{}", guest.vmid, nic.id);
            self.port_chains(guest, nic, &base, id);
            ingress.push(json!([nic.ifname, jump(&format!("{base}-from"))]));
            egress.push(json!([nic.ifname, jump(&format!("{base}-to"))]));
            outs.push(json!([id << IN_PORT_SHIFT, jump(&format!("{base}-out"))]));
            ins.push(json!([id << OUT_PORT_SHIFT, jump(&format!("{base}-in"))]));
        }
        if !ports.is_empty() {
            let vmap = |key: Value, set: Vec<Value>| json!({"vmap": {"key": key, "data": {"set": set}}});
            self.rule("bridge", "prerouting", vec![vmap(meta("iifname"), ingress)]);
            self.rule("bridge", "forward", vec![vmap(meta("oifname"), egress)]);
            let masked = |mask: u32| json!({"&": [meta("mark"), mask]});
            self.rule("inet", "forward", vec![vmap(masked(IN_PORT_MASK), outs)]);
            self.rule("inet", "forward", vec![vmap(masked(OUT_PORT_MASK), ins)]);
        }
        // Bridged traffic that no guest rule decided is not routed traffic.
        let mut bridges: BTreeSet<&str> = self.inputs.bridges.iter().map(String::as_str).collect();
        bridges.extend(
            self.inputs.guests.iter().flat_map(|g| g.nics.iter().filter_map(|n| n.bridge.as_deref())),
        );
        if cluster.policy_forward != Policy::ACCEPT && !bridges.is_empty() {
            let pairs: Vec<Value> = bridges.iter().map(|b| json!({"concat": [b, b]})).collect();
            self.rule(
                "inet",
                "forward",
                vec![
                    eq(json!({"concat": [meta("iifname"), meta("oifname")]}), json!({"set": pairs})),
                    verdict("accept"),
                ],
            );
        }
        let forward_rules: Vec<(String, String, FirewallRule)> =
            host.rules
                .iter()
                .enumerate()
                .map(|(i, r)| (self.host_owner(), format!("spec.firewall.rules[{i}]"), r.clone()))
                .chain(cluster.rules.iter().enumerate().map(|(i, r)| {
                    ("ClusterFirewall/cluster".to_string(), format!("spec.rules[{i}]"), r.clone())
                }))
                .filter(|(_, _, r)| r.type_ == RuleType::Forward)
                .collect();
        for (owner, field, r) in &forward_rules {
            self.compile_rule(r, Ctx::Forward, "forward", None, owner, field, None);
        }
        self.policy("forward", cluster.policy_forward, None, "forward", Ctx::Forward);
    }

    fn host_owner(&self) -> String {
        format!("Hypervisor/{}", self.inputs.node)
    }

    /// The chains of one firewalled guest NIC: anti-spoofing and port stamping in the bridge
    /// table, the guest's IN and OUT rules in the inet table.
    fn port_chains(&mut self, guest: &'a Guest, nic: &'a GuestNic, base: &str, id: u32) {
        let fw = guest.firewall.as_ref().expect("only firewalled guests have ports");
        let from = format!("{base}-from");
        let to = format!("{base}-to");
        self.chain("bridge", &from, None);
        if fw.macfilter
            && let Some(mac) = &nic.mac
        {
            self.rule(
                "bridge",
                &from,
                vec![ne(payload("ether", "saddr"), json!(mac.to_ascii_lowercase())), verdict("drop")],
            );
        }
        if fw.ipfilter {
            // Proxmox: the ipfilter-netN set when declared, else the NIC's configured addresses;
            // always the link-local address derived from the MAC.
            let mut entries: Vec<IpSetEntry> =
                match fw.ipsets.iter().find(|s| s.name == format!("ipfilter-{}", nic.id)) {
                    Some(set) => set.entries.clone(),
                    None => nic
                        .ips
                        .iter()
                        .map(|n| IpSetEntry {
                            cidr: Net::host(n.addr).to_string(),
                            nomatch: false,
                            comment: None,
                        })
                        .collect(),
                };
            if let Some(ll) = nic.mac.as_deref().and_then(link_local) {
                entries.push(IpSetEntry { cidr: ll.to_string(), nomatch: false, comment: None });
            }
            let set = format!("ipfilter-{}-{}", guest.vmid, nic.id);
            let r = self.entry_sets("bridge", &set, &entries);
            // DHCP discovery comes from 0.0.0.0; duplicate address detection from ::.
            self.rule(
                "bridge",
                &from,
                vec![
                    eq(payload("ip", "saddr"), json!("0.0.0.0")),
                    eq(payload("udp", "dport"), json!(67)),
                    json!({"mangle": {"key": meta("mark"), "value": {"|": [{"&": [meta("mark"), !IN_PORT_MASK]}, id << IN_PORT_SHIFT]}}}),
                    verdict("accept"),
                ],
            );
            match &r.v4 {
                Some((set4, _)) => {
                    self.rule(
                        "bridge",
                        &from,
                        vec![ne(payload("ip", "saddr"), set4.clone()), verdict("drop")],
                    );
                    self.rule(
                        "bridge",
                        &from,
                        vec![ne(payload("arp", "saddr ip"), set4.clone()), verdict("drop")],
                    );
                }
                None => {
                    self.rule(
                        "bridge",
                        &from,
                        vec![eq(payload("ether", "type"), json!("ip")), verdict("drop")],
                    );
                    self.rule(
                        "bridge",
                        &from,
                        vec![eq(payload("ether", "type"), json!("arp")), verdict("drop")],
                    );
                }
            }
            let mut six = vec![ne(payload("ip6", "saddr"), json!("::"))];
            match &r.v6 {
                Some((set6, _)) => six.push(ne(payload("ip6", "saddr"), set6.clone())),
                None => six.push(eq(payload("ether", "type"), json!("ip6"))),
            }
            six.push(verdict("drop"));
            self.rule("bridge", &from, six);
        }
        let stamp = |mask: u32, value: u32| json!({"mangle": {"key": meta("mark"), "value": {"|": [{"&": [meta("mark"), !mask]}, value]}}});
        self.rule("bridge", &from, vec![stamp(IN_PORT_MASK, id << IN_PORT_SHIFT)]);
        self.chain("bridge", &to, None);
        self.rule("bridge", &to, vec![stamp(OUT_PORT_MASK, id << OUT_PORT_SHIFT)]);

        let out_chain = format!("{base}-out");
        let in_chain = format!("{base}-in");
        self.chain("inet", &out_chain, None);
        self.chain("inet", &in_chain, None);
        let icmp6 = |types: &[&str]| eq(payload("icmpv6", "type"), json!({"set": types}));
        if fw.dhcp {
            // Client → server leaves the guest (v4, v6); server → client reaches it.
            let udp = |sport: u16, dport: u16, v: &str| {
                vec![
                    eq(payload("udp", "sport"), json!(sport)),
                    eq(payload("udp", "dport"), json!(dport)),
                    verdict(v),
                ]
            };
            for (chain, sport, dport, v) in [
                (&out_chain, 68, 67, "return"),
                (&out_chain, 546, 547, "return"),
                (&in_chain, 67, 68, "accept"),
                (&in_chain, 547, 546, "accept"),
            ] {
                self.rule("inet", chain, udp(sport, dport, v));
            }
        }
        if !fw.radv {
            self.rule("inet", &out_chain, vec![icmp6(&["nd-router-advert"]), verdict("drop")]);
        }
        if fw.ndp {
            let nd = ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"];
            self.rule("inet", &out_chain, vec![icmp6(&nd), verdict("return")]);
            let nd_in = ["nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert"];
            self.rule("inet", &in_chain, vec![icmp6(&nd_in), verdict("accept")]);
        }
        for (i, r) in fw.rules.iter().enumerate() {
            let field = format!("spec.firewall.rules[{i}]");
            if r.iface.as_deref().is_some_and(|f| f != nic.id) {
                continue;
            }
            match r.type_ {
                RuleType::In => {
                    self.compile_rule(r, Ctx::GuestIn, &in_chain, Some(guest), &guest.owner, &field, None)
                }
                RuleType::Out => {
                    self.compile_rule(r, Ctx::GuestOut, &out_chain, Some(guest), &guest.owner, &field, None)
                }
                RuleType::Group => {
                    self.compile_rule(r, Ctx::GuestIn, &in_chain, Some(guest), &guest.owner, &field, None);
                    self.compile_rule(r, Ctx::GuestOut, &out_chain, Some(guest), &guest.owner, &field, None);
                }
                RuleType::Forward => {}
            }
        }
        self.policy(&in_chain, fw.policy_in, fw.log_level_in, &format!("{}-in", guest.vmid), Ctx::GuestIn);
        self.policy(
            &out_chain,
            fw.policy_out,
            fw.log_level_out,
            &format!("{}-out", guest.vmid),
            Ctx::GuestOut,
        );
    }

    fn action(&self, action: &str, ctx: Ctx) -> Value {
        match (action, ctx) {
            ("ACCEPT", Ctx::GuestOut) => verdict("return"),
            ("ACCEPT", _) => verdict("accept"),
            ("DROP", _) => verdict("drop"),
            _ => jump("do-reject"),
        }
    }

    fn policy(&mut self, chain: &str, policy: Policy, log: Option<LogLevel>, tag: &str, ctx: Ctx) {
        let action = match policy {
            Policy::ACCEPT => "ACCEPT",
            Policy::DROP => "DROP",
            Policy::REJECT => "REJECT",
        };
        let mut e = Vec::new();
        if policy != Policy::ACCEPT
            && let Some(level) = log.and_then(nft_level)
        {
            e.push(json!({"log": {"prefix": format!("kpve {tag} policy {action}: "), "level": level}}));
        }
        e.push(self.action(action, ctx));
        self.rule("inet", chain, e);
    }

    /// One rule (a group rule expands to the group's rules of the chain's direction).
    #[allow(clippy::too_many_arguments)]
    fn compile_rule(
        &mut self,
        r: &FirewallRule,
        ctx: Ctx,
        chain: &str,
        guest: Option<&'a Guest>,
        owner: &str,
        field: &str,
        iface_override: Option<&str>,
    ) {
        if !r.enable {
            return;
        }
        let fail = |this: &mut Self, message: String| {
            this.errors.push(RuleError {
                owner: owner.to_string(),
                field: field.to_string(),
                message: format!("{message} (rule: {})", print_rule(r)),
            });
        };
        if r.type_ == RuleType::Group {
            let Some(group) = self.inputs.groups.get(&r.action) else {
                return fail(self, format!("security group {:?} does not exist", r.action));
            };
            let want = match ctx {
                Ctx::HostIn | Ctx::GuestIn => RuleType::In,
                Ctx::HostOut | Ctx::GuestOut => RuleType::Out,
                Ctx::Forward => RuleType::Forward,
            };
            let group_owner = format!("SecurityGroup/{}", r.action);
            for (i, gr) in group.rules.iter().enumerate() {
                if gr.type_ == want {
                    let f = format!("spec.rules[{i}]");
                    self.compile_rule(
                        gr,
                        ctx,
                        chain,
                        guest,
                        &group_owner,
                        &f,
                        r.iface.as_deref().or(iface_override),
                    );
                }
            }
            return;
        }
        // Patterns: one per macro entry, or the rule's own proto/ports.
        let patterns: Vec<(Option<String>, Option<String>, Option<String>)> =
            match r.macro_.as_deref().and_then(macros::lookup) {
                Some(m) => m
                    .entries
                    .iter()
                    .map(|e| {
                        (
                            Some(e.proto.to_string()),
                            e.dport.map(str::to_string).or_else(|| r.dport.clone()),
                            e.sport.map(str::to_string).or_else(|| r.sport.clone()),
                        )
                    })
                    .collect(),
                None if r.macro_.is_some() => {
                    return fail(self, format!("{:?} is not a firewall macro", r.macro_));
                }
                None => vec![(r.proto.clone(), r.dport.clone(), r.sport.clone())],
            };
        let source = match r.source.as_deref().map(|s| self.resolve(s, guest)).transpose() {
            Ok(s) => s,
            Err(e) => return fail(self, e),
        };
        let dest = match r.dest.as_deref().map(|s| self.resolve(s, guest)).transpose() {
            Ok(s) => s,
            Err(e) => return fail(self, e),
        };
        let iface = iface_override.or(r.iface.as_deref());
        let mut prefix = Vec::new();
        if let Some(iface) = iface {
            match ctx {
                Ctx::HostIn => prefix.push(eq(meta("iifname"), json!(iface))),
                Ctx::HostOut => prefix.push(eq(meta("oifname"), json!(iface))),
                // In guest chains the NIC was chosen by the chain; a group's -i restricts it.
                Ctx::GuestIn | Ctx::GuestOut => {
                    if guest.is_some_and(|g| !chain.starts_with(&format!("g{}-{iface}-", g.vmid))) {
                        return;
                    }
                }
                Ctx::Forward => prefix.push(eq(meta("iifname"), json!(iface))),
            }
        }
        let mut verdicts = Vec::new();
        if let Some(level) = r.log.and_then(nft_level) {
            let tag = guest.map(|g| g.vmid.to_string()).unwrap_or_else(|| "host".into());
            verdicts.push(json!({"log": {"prefix": format!("kpve {tag} {}: ", r.action), "level": level}}));
        }
        verdicts.push(self.action(&r.action, ctx));

        for (proto, dport, sport) in patterns {
            let proto_num = match proto.as_deref().map(|p| lang::protocol_number(p).ok_or(p)) {
                Some(Ok(n)) => Some(n),
                Some(Err(p)) => return fail(self, format!("{p:?} is not a protocol")),
                None => None,
            };
            let mut l4 = Vec::new();
            let mut only_v4 = false;
            let mut only_v6 = false;
            match proto_num {
                Some(n) if port_protocol(n).is_some() => {
                    let pp = port_protocol(n).expect("checked");
                    let mut any_port = false;
                    for (field_name, value) in [("dport", &dport), ("sport", &sport)] {
                        if let Some(v) = value {
                            match lang::parse_ports(v) {
                                Ok(p) => l4.push(eq(payload(pp, field_name), ports_value(&p))),
                                Err(e) => return fail(self, e),
                            }
                            any_port = true;
                        }
                    }
                    if !any_port {
                        l4.push(eq(meta("l4proto"), json!(n)));
                    }
                }
                Some(n @ (1 | 58)) => {
                    let (proto_name, v4) = if n == 1 { ("icmp", true) } else { ("icmpv6", false) };
                    only_v4 = v4;
                    only_v6 = !v4;
                    let ty = r.icmp_type.clone().or(if r.macro_.is_some() { dport.clone() } else { None });
                    match ty.as_deref().map(|t| lang::icmp_type(n, t)) {
                        Some(Ok(Some(t))) => l4.push(eq(payload(proto_name, "type"), json!(t))),
                        Some(Ok(None)) | None => l4.push(eq(meta("l4proto"), json!(n))),
                        Some(Err(e)) => return fail(self, e),
                    }
                }
                Some(n) => l4.push(eq(meta("l4proto"), json!(n))),
                None => {}
            }
            for (fam, v4) in [("ip", true), ("ip6", false)] {
                if (only_v4 && !v4) || (only_v6 && v4) {
                    continue;
                }
                let pick = |r: &Option<Resolved>| -> Option<Option<(Value, Option<Value>)>> {
                    match r {
                        None => Some(None),
                        Some(res) => (if v4 { res.v4.clone() } else { res.v6.clone() }).map(Some),
                    }
                };
                let (Some(s), Some(d)) = (pick(&source), pick(&dest)) else { continue };
                let mut e = prefix.clone();
                let family_specific = s.is_some() || d.is_some();
                for (m, field_name) in [(s, "saddr"), (d, "daddr")] {
                    if let Some((value, exclude)) = m {
                        e.push(eq(payload(fam, field_name), value));
                        if let Some(x) = exclude {
                            e.push(ne(payload(fam, field_name), x));
                        }
                    }
                }
                e.extend(l4.iter().cloned());
                e.extend(verdicts.iter().cloned());
                self.rule("inet", chain, e);
                if !family_specific {
                    break; // one rule covers both families
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_follows_eui64() {
        assert_eq!(link_local("BC:24:11:00:00:01").unwrap().to_string(), "fe80::be24:11ff:fe00:1");
    }

    fn host_rules(lines: &[&str]) -> Inputs {
        let rules = lines.iter().map(|l| kpve_crds::codec::fw::parse_rule(l).unwrap()).collect();
        let cluster: ClusterFirewallSpec = serde_json::from_value(json!({"enable": true})).unwrap();
        Inputs { cluster: Some(ClusterFirewallSpec { rules, ..cluster }), ..Inputs::default() }
    }

    fn input_chain(ruleset: &Ruleset) -> Vec<Value> {
        ruleset.document["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["chain"] == "input")
            .map(|r| r["expr"].clone())
            .collect()
    }

    #[test]
    fn consecutive_rules_with_one_verdict_become_one_set_lookup() {
        let r = compile(&host_rules(&[
            "IN ACCEPT -source 10.0.0.1 -p tcp -dport 22",
            "IN ACCEPT -source 10.0.0.0/24 -p tcp -dport 80,443",
            "IN ACCEPT -source 10.9.0.1-10.9.0.9 -p tcp -dport 8000:8100",
            "IN DROP -source 10.0.0.7 -p tcp -dport 22",
            "IN ACCEPT -source 10.0.0.8 -p tcp -dport 22",
        ]))
        .unwrap();
        let chain = input_chain(&r);
        // lo, conntrack, the three merged accepts, the drop, the last accept, management, policy.
        assert_eq!(chain.len(), 7, "{chain:#?}");
        let merged = &chain[2][0]["match"];
        assert_eq!(merged["left"]["concat"].as_array().unwrap().len(), 2);
        assert_eq!(merged["right"]["set"].as_array().unwrap().len(), 4, "1 + 2 + 1 tuples");
        assert_eq!(
            chain[3].as_array().unwrap().last().unwrap(),
            &json!({"drop": null}),
            "a different verdict keeps its place"
        );
    }

    #[test]
    fn disabled_cluster_removes_only_kpve_tables() {
        let r = compile(&Inputs::default()).unwrap();
        assert!(!r.enabled);
        let text = r.document.to_string();
        assert!(text.contains("\"delete\"") && text.matches("\"name\":\"kpve\"").count() == 4, "{text}");
    }
}
