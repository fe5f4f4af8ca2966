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
        in_group: false,
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

/// The smallest transaction that turns the ruleset `previous` into `next`, when both declare
/// the same tables, chains and sets: each changed set is flushed and refilled, each changed
/// chain flushed and its rules added again; everything else stays. One transaction, so it is
/// atomic like a full load, but its cost follows what changed (an IP set edit, one guest's
/// rules), not the size of the ruleset. `None` when chains or sets were added, removed or
/// redefined: then the full document is loaded.
pub fn delta(previous: &Value, next: &Value) -> Option<Value> {
    struct Parts<'v> {
        frame: Vec<&'v Value>,
        sets: BTreeMap<(String, String), &'v Value>,
        rules: BTreeMap<(String, String), Vec<&'v Value>>,
    }
    fn parts(doc: &Value) -> Option<Parts<'_>> {
        let mut p = Parts { frame: Vec::new(), sets: BTreeMap::new(), rules: BTreeMap::new() };
        let key = |v: &Value, name: &str| {
            (v["family"].as_str().unwrap_or("").to_string(), v[name].as_str().unwrap_or("").to_string())
        };
        for cmd in doc["nftables"].as_array()? {
            if let Some(set) = cmd["add"].get("set") {
                p.sets.insert(key(set, "name"), set);
            } else if let Some(rule) = cmd["add"].get("rule") {
                p.rules.entry(key(rule, "chain")).or_default().push(&rule["expr"]);
            } else {
                // Tables and chain declarations: must be identical for a delta.
                p.frame.push(cmd);
            }
        }
        Some(p)
    }
    let (a, b) = (parts(previous)?, parts(next)?);
    if a.frame != b.frame || a.sets.keys().ne(b.sets.keys()) {
        return None;
    }
    let id = |family: &str, name: &str| obj([("family", s(family)), ("table", s(TABLE)), ("name", s(name))]);
    let mut cmds = Vec::new();
    for ((family, name), next_set) in &b.sets {
        let prev_set = a.sets[&(family.clone(), name.clone())];
        if prev_set == *next_set {
            continue;
        }
        let strip = |v: &Value| {
            let mut v = v.clone();
            v.as_object_mut().map(|o| o.remove("elem"));
            v
        };
        if strip(prev_set) != strip(next_set) {
            return None;
        }
        cmds.push(obj([("flush", obj([("set", id(family, name))]))]));
        if let Some(elem) = next_set.get("elem") {
            let mut e = id(family, name);
            e["elem"] = elem.clone();
            cmds.push(obj([("add", obj([("element", e)]))]));
        }
    }
    let chains: BTreeSet<&(String, String)> = a.rules.keys().chain(b.rules.keys()).collect();
    for key @ (family, chain) in chains {
        let (old, new) = (a.rules.get(key), b.rules.get(key));
        if old == new {
            continue;
        }
        cmds.push(obj([("flush", obj([("chain", id(family, chain))]))]));
        for expr in new.into_iter().flatten() {
            let body = obj([
                ("family", s(family)),
                ("table", s(TABLE)),
                ("chain", s(chain)),
                ("expr", (*expr).clone()),
            ]);
            cmds.push(obj([("add", obj([("rule", body)]))]));
        }
    }
    Some(obj([("nftables", Value::Array(cmds))]))
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
    /// Compiling a security group's rules (names resolve in the datacenter's scope).
    in_group: bool,
}

/// A rule waiting to be emitted. Consecutive rules of one chain that differ only in the
/// literal values they match, with the same statements after the matches (same verdict,
/// same log), are one rule over a set: `ip saddr . tcp dport { a . 22, b . 22 } accept`. First
/// match wins either way, and the packet pays one set lookup instead of one rule per line.
/// Merged sets only take exact values: intervals from different rules may overlap, which
/// makes the kernel refuse the set, so a rule with a prefix or range stays alone.
struct Pending {
    exprs: Vec<Value>,
    /// Number of leading `==` matches on literals (`None`: the rule cannot merge).
    shape: Option<usize>,
    /// Value tuples of the rules merged into this one, after its own.
    merged: Vec<Vec<Value>>,
}

/// Alternatives of one match value: a literal, or the literals of an anonymous set.
fn literal_alternatives(right: &Value) -> Option<&[Value]> {
    match right.get("set").and_then(Value::as_array) {
        Some(items) if items.iter().all(is_literal) => Some(items),
        Some(_) => None,
        None => is_literal(right).then(|| std::slice::from_ref(right)),
    }
}

fn is_literal(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.starts_with('@'),
        Value::Number(_) => true,
        Value::Object(o) => o.contains_key("prefix") || o.contains_key("range"),
        _ => false,
    }
}

fn is_exact(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_))
}

/// Cross products above this size are not worth a concatenated set.
const MAX_TUPLES_PER_RULE: usize = 64;

/// How many leading matches of `exprs` could merge (and the rest holds no match).
fn shape(exprs: &[Value]) -> Option<usize> {
    let mut n = 0;
    let mut product = 1;
    for e in exprs {
        let Some(m) = e.get("match") else { break };
        if m.get("op").and_then(Value::as_str) != Some("==") || m["left"].get("concat").is_some() {
            return None;
        }
        product *= literal_alternatives(&m["right"])?.len();
        if product > MAX_TUPLES_PER_RULE {
            return None;
        }
        n += 1;
    }
    (n > 0 && !exprs[n..].iter().any(|e| e.get("match").is_some())).then_some(n)
}

/// The value tuples the first `n` matches of `exprs` accept (their cross product).
fn tuples(exprs: &[Value], n: usize) -> Vec<Vec<Value>> {
    let mut out: Vec<Vec<Value>> = vec![vec![]];
    for e in &exprs[..n] {
        let alternatives = literal_alternatives(&e["match"]["right"]).expect("checked by shape");
        out = out
            .iter()
            .flat_map(|t| {
                alternatives
                    .iter()
                    .map(move |a| t.iter().cloned().chain(std::iter::once(a.clone())).collect())
            })
            .collect();
    }
    out
}

impl Pending {
    /// Takes `exprs` into this rule if it has the same shape, lefts and tail.
    fn absorb(&mut self, exprs: &[Value]) -> bool {
        let (Some(n), Some(m)) = (self.shape, shape(exprs)) else { return false };
        if n != m
            || self.exprs[n..] != exprs[n..]
            || (0..n).any(|i| self.exprs[i]["match"]["left"] != exprs[i]["match"]["left"])
        {
            return false;
        }
        // Only exact values: intervals from different rules may overlap, and nft refuses a
        // set with overlapping intervals.
        let new = tuples(exprs, n);
        let exact = |ts: &[Vec<Value>]| ts.iter().flatten().all(is_exact);
        if !exact(&new) || (self.merged.is_empty() && !exact(&tuples(&self.exprs, n))) {
            return false;
        }
        self.merged.extend(new);
        true
    }

    fn emit(self) -> Vec<Value> {
        let Some(n) = self.shape.filter(|_| !self.merged.is_empty()) else { return self.exprs };
        let mut all = tuples(&self.exprs, n);
        all.extend(self.merged);
        let lefts: Vec<Value> = self.exprs[..n].iter().map(|e| e["match"]["left"].clone()).collect();
        let (left, right) = if n == 1 {
            (lefts[0].clone(), all.into_iter().map(|mut t| t.remove(0)).collect::<Vec<_>>())
        } else {
            let concat = |v: Vec<Value>| obj([("concat", Value::Array(v))]);
            (concat(lefts), all.into_iter().map(concat).collect::<Vec<_>>())
        };
        let mut exprs = vec![eq(left, set_of(right))];
        exprs.extend(self.exprs[n..].iter().cloned());
        exprs
    }
}

/// Path of a rule in its object (`spec.rules[3]`), formatted only when reported.
#[derive(Clone, Copy)]
struct Field(&'static str, usize);

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
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

/// `{k: v, …}` moving the values in. `json!` would serialize every interpolated `Value`
/// again, copying each subtree once per nesting level; at 10,000 rules that was most of the
/// compile time.
fn obj<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn verdict(v: &str) -> Value {
    obj([(v, Value::Null)])
}

fn jump(target: &str) -> Value {
    obj([("jump", obj([("target", s(target))]))])
}

fn eq(left: Value, right: Value) -> Value {
    obj([("match", obj([("op", s("==")), ("left", left), ("right", right)]))])
}

fn ne(left: Value, right: Value) -> Value {
    obj([("match", obj([("op", s("!=")), ("left", left), ("right", right)]))])
}

fn meta(key: &str) -> Value {
    obj([("meta", obj([("key", s(key))]))])
}

fn payload(protocol: &str, field: &str) -> Value {
    obj([("payload", obj([("protocol", s(protocol)), ("field", s(field))]))])
}

fn set_of(items: Vec<Value>) -> Value {
    obj([("set", Value::Array(items))])
}

fn item_value(item: &AddrItem) -> Value {
    match item {
        AddrItem::Net(n) if n.prefix == Net::host(n.addr).prefix => Value::String(n.addr.to_string()),
        AddrItem::Net(n) => {
            obj([("prefix", obj([("addr", Value::String(n.addr.to_string())), ("len", n.prefix.into())]))])
        }
        AddrItem::Range(a, b) => {
            obj([("range", Value::Array(vec![a.to_string().into(), b.to_string().into()]))])
        }
    }
}

fn items_value(items: &[AddrItem]) -> Value {
    match normalize(items).as_slice() {
        [one] => item_value(one),
        many => set_of(many.iter().map(item_value).collect()),
    }
}

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v).into(),
        IpAddr::V6(v) => v.into(),
    }
}

fn addr(v4: bool, b: u128) -> IpAddr {
    if v4 { IpAddr::from((b as u32).to_be_bytes()) } else { IpAddr::from(b.to_be_bytes()) }
}

/// The same addresses with no two items overlapping or touching: nft refuses an interval set
/// whose elements overlap ("conflicting intervals"; JSON input does not auto-merge), so
/// `10.0.0.0/24, 10.0.0.5` becomes `10.0.0.0/24`. Merged runs print as a prefix when aligned,
/// else as a range. Items of one family.
fn normalize(items: &[AddrItem]) -> Vec<AddrItem> {
    let Some(first) = items.first() else { return Vec::new() };
    let v4 = first.is_v4();
    let width = if v4 { 32 } else { 128 };
    let span = |i: &AddrItem| match *i {
        AddrItem::Net(n) => {
            let lo = bits(n.addr);
            let host =
                if n.prefix as u32 == width { 0 } else { u128::MAX >> (128 - width + n.prefix as u32) };
            (lo, lo | host)
        }
        AddrItem::Range(a, b) => (bits(a), bits(b)),
    };
    let mut spans: Vec<(u128, u128)> = items.iter().map(span).collect();
    spans.sort();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in spans {
        match merged.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    merged
        .into_iter()
        .map(|(lo, hi)| {
            let size = hi - lo;
            let aligned = size.checked_add(1).is_some_and(|n| n.is_power_of_two() && lo % n == 0)
                || (lo == 0 && hi == if v4 { u32::MAX as u128 } else { u128::MAX });
            if aligned {
                let host_bits = if size == u128::MAX { 128 } else { (size + 1).trailing_zeros() };
                AddrItem::Net(Net { addr: addr(v4, lo), prefix: (width - host_bits) as u8 })
            } else {
                AddrItem::Range(addr(v4, lo), addr(v4, hi))
            }
        })
        .collect()
}

fn ports_value(ports: &[(u16, u16)]) -> Value {
    // Overlapping port ranges make an interval set fail to load, like addresses.
    let mut sorted = ports.to_vec();
    sorted.sort();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (a, b) in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let ports = merged.as_slice();
    let one = |&(a, b): &(u16, u16)| {
        if a == b { Value::from(a) } else { obj([("range", Value::Array(vec![a.into(), b.into()]))]) }
    };
    match ports {
        [p] => one(p),
        many => set_of(many.iter().map(one).collect()),
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
        self.cmds.push(obj([("add", obj([(what, body)]))]));
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
        if pending.last_mut().is_some_and(|last| last.absorb(&expr)) {
            return;
        }
        let shape = shape(&expr);
        pending.push(Pending { exprs: expr, shape, merged: Vec::new() });
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
                body["elem"] = Value::Array(set.elems.clone());
            }
            out.push(obj([("add", obj([("set", body)]))]));
        }
        out.extend(self.cmds);
        let mut count = 0;
        for ((family, chain), rules) in self.chain_rules {
            for rule in rules {
                count += 1;
                let body = obj([
                    ("family", s(&family)),
                    ("table", s(TABLE)),
                    ("chain", s(&chain)),
                    ("expr", Value::Array(rule.emit())),
                ]);
                out.push(obj([("add", obj([("rule", body)]))]));
            }
        }
        (obj([("nftables", Value::Array(out))]), count)
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
            // `/` cannot occur in object or IP set names, so no two sets collide (and it is a
            // character nft's own syntax accepts in names, so `nft list ruleset` reads back).
            let name = format!("{base}/{suffix}");
            self.sets.entry(name.clone()).or_insert_with(|| SetDef {
                family,
                type_,
                elems: normalize(&matching.iter().map(|(_, n)| AddrItem::Net(*n)).collect::<Vec<_>>())
                    .iter()
                    .map(item_value)
                    .collect(),
            });
            let exclude = if nomatch.is_empty() {
                None
            } else {
                let nm = format!("{base}/nm/{suffix}");
                self.sets.entry(nm.clone()).or_insert_with(|| SetDef {
                    family,
                    type_,
                    elems: normalize(&nomatch.iter().map(|(_, n)| AddrItem::Net(*n)).collect::<Vec<_>>())
                        .iter()
                        .map(item_value)
                        .collect(),
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
        // A security group means the same for every guest: its names are the datacenter's.
        let guest = if self.in_group { None } else { guest };
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
                // Proxmox IP set names are case-insensitive (stored lower-case).
                let name = name.to_ascii_lowercase();
                if scope != Scope::Dc
                    && let (Some(g), Some(fw)) = (guest, guest_fw)
                    && let Some(set) = fw.ipsets.iter().find(|s| s.name.eq_ignore_ascii_case(&name))
                {
                    return Ok(self.entry_sets("inet", &format!("g{}/{}", g.vmid, set.name), &set.entries));
                }
                if scope == Scope::Guest {
                    return Err(format!("IP set \"guest/{name}\" does not exist"));
                }
                let set =
                    self.inputs.ipsets.get(&name).ok_or_else(|| format!("IP set {name:?} does not exist"))?;
                Ok(self.entry_sets("inet", &format!("dc/{name}"), &set.entries))
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
        let host_owner = self.host_owner();
        // Host rules first, so that a node can override the cluster's (Proxmox's order).
        let host_rules: Vec<(&str, Field, &'a FirewallRule)> = {
            let inputs: &'a Inputs = self.inputs;
            let host_rules: &'a [FirewallRule] =
                inputs.host.as_ref().map(|h| h.rules.as_slice()).unwrap_or(&[]);
            host_rules
                .iter()
                .enumerate()
                .map(|(i, r)| (host_owner.as_str(), Field("spec.firewall.rules", i), r))
                .chain(
                    cluster
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| ("ClusterFirewall/cluster", Field("spec.rules", i), r)),
                )
                .collect()
        };

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
        // Neighbour discovery is not tracked by conntrack: without it IPv6 stops working.
        let nd = eq(
            payload("icmpv6", "type"),
            json!({"set": ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert"]}),
        );
        let blacklist = match self.inputs.ipsets.contains_key("blacklist") {
            true => self.resolve("+dc/blacklist", None).ok(),
            false => None,
        };

        let ports: Vec<(&'a Guest, &'a GuestNic)> = self
            .inputs
            .guests
            .iter()
            .filter(|g| g.firewall.as_ref().is_some_and(|f| f.enable))
            .flat_map(|g| g.nics.iter().filter(|n| n.firewall).map(move |n| (g, n)))
            .take(MAX_PORTS)
            .collect();
        let vmap = |key: Value, set: Vec<Value>| obj([("vmap", obj([("key", key), ("data", set_of(set))]))]);
        let masked = |mask: u32| obj([("&", Value::Array(vec![meta("mark"), mask.into()]))]);
        let (mut ingress, mut egress, mut outs, mut ins) = (vec![], vec![], vec![], vec![]);
        // Guests by bridge and address, for traffic that does not cross a bridge port before
        // the inet hooks see it: from the host itself, and routed to a guest. An address two
        // NICs claim, or one no guest can own (multicast, broadcast, loopback, unspecified),
        // is left out rather than handing its traffic to one of them.
        let usable = |a: &IpAddr| match a {
            IpAddr::V4(v) => !(v.is_multicast() || v.is_broadcast() || v.is_loopback() || v.is_unspecified()),
            IpAddr::V6(v) => !(v.is_multicast() || v.is_loopback() || v.is_unspecified()),
        };
        let nic_addrs = |nic: &GuestNic| -> Vec<IpAddr> {
            let mut a: Vec<IpAddr> = nic.ips.iter().map(|n| n.addr).collect();
            a.extend(nic.mac.as_deref().and_then(link_local));
            a.retain(usable);
            a
        };
        let mut claims: BTreeMap<(&str, IpAddr), usize> = BTreeMap::new();
        for (_, nic) in &ports {
            if let Some(br) = nic.bridge.as_deref() {
                for a in nic_addrs(nic) {
                    *claims.entry((br, a)).or_default() += 1;
                }
            }
        }
        let guest_bridges: BTreeSet<&str> = ports.iter().filter_map(|(_, n)| n.bridge.as_deref()).collect();
        let (mut by_v4, mut by_v6) = (vec![], vec![]);
        for (i, (guest, nic)) in ports.iter().enumerate() {
            let id = i as u32 + 1;
            let base = format!("g{}-{}", guest.vmid, nic.id);
            ingress.push(Value::Array(vec![s(&nic.ifname), jump(&format!("{base}-from"))]));
            egress.push(Value::Array(vec![s(&nic.ifname), jump(&format!("{base}-to"))]));
            outs.push(Value::Array(vec![(id << IN_PORT_SHIFT).into(), jump(&format!("{base}-out"))]));
            ins.push(Value::Array(vec![(id << OUT_PORT_SHIFT).into(), jump(&format!("{base}-in"))]));
            let Some(br) = nic.bridge.as_deref() else { continue };
            for a in nic_addrs(nic) {
                if claims[&(br, a)] == 1 {
                    let key = obj([("concat", Value::Array(vec![s(br), a.to_string().into()]))]);
                    let entry = Value::Array(vec![key, jump(&format!("{base}-in"))]);
                    if a.is_ipv4() { by_v4.push(entry) } else { by_v6.push(entry) }
                }
            }
        }
        // Port marks count only on packets that crossed one of the guests' bridges (kpve clears
        // its bits on every bridged frame, not on packets from elsewhere).
        let bridge_set = set_of(guest_bridges.iter().map(|b| s(b)).collect());
        let from_guest = (!outs.is_empty())
            .then(|| vec![eq(meta("iifname"), bridge_set.clone()), vmap(masked(IN_PORT_MASK), outs)]);
        let to_guest_by_addr = |this: &mut Self, chain: &str, guard: Option<Value>| {
            for (fam, entries) in [("ip", &by_v4), ("ip6", &by_v6)] {
                if !entries.is_empty() {
                    let mut e: Vec<Value> = guard.iter().cloned().collect();
                    let key = obj([("concat", Value::Array(vec![meta("oifname"), payload(fam, "daddr")]))]);
                    e.push(vmap(key, entries.clone()));
                    this.rule("inet", chain, e);
                }
            }
        };
        let control_plane =
            vec![eq(payload("tcp", "dport"), ports_value(&[(6443, 6443), (8006, 8006)])), verdict("accept")];

        if host.enable {
            self.chain("inet", "input", Some(("input", 0)));
            self.rule("inet", "input", vec![eq(meta("iifname"), json!("lo")), verdict("accept")]);
            if let Some(bl) = &blacklist {
                self.blacklist_rules("input", bl);
            }
            self.rule("inet", "input", vec![ct_accept.clone()]);
            // A guest talking to the host passes its own OUT rules first (its ndp and radv
            // settings included).
            if let Some(v) = &from_guest {
                self.rule("inet", "input", v.clone());
            }
            self.rule("inet", "input", vec![nd.clone(), verdict("accept")]);
            for (owner, field, r) in
                host_rules.iter().filter(|(_, _, r)| matches!(r.type_, RuleType::In | RuleType::Group))
            {
                self.compile_rule(r, Ctx::HostIn, "input", None, owner, *field, None);
            }
            // Management ports, from the `management` IP set when one is declared.
            let mgmt =
                self.inputs.ipsets.contains_key("management").then(|| self.resolve("+dc/management", None));
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
            self.rule("inet", "output", vec![nd.clone(), verdict("accept")]);
            // The node must reach its control plane whatever policy_out or a guest claiming an
            // address says (Proxmox keeps corosync and the API open the same way).
            self.rule("inet", "output", control_plane.clone());
            // The host talking to a guest passes the guest's IN rules.
            to_guest_by_addr(self, "output", None);
            for (owner, field, r) in
                host_rules.iter().filter(|(_, _, r)| matches!(r.type_, RuleType::Out | RuleType::Group))
            {
                self.compile_rule(r, Ctx::HostOut, "output", None, owner, *field, None);
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
        self.chain("bridge", "prerouting", Some(("prerouting", -300)));
        self.chain("bridge", "forward", Some(("forward", -300)));
        // Every frame entering a bridge starts with kpve's mark bits clear, so a mark some
        // other software set is never taken for a port number.
        let clear = !(IN_PORT_MASK | OUT_PORT_MASK);
        let mangle = |value: Value| obj([("mangle", obj([("key", meta("mark")), ("value", value)]))]);
        self.rule(
            "bridge",
            "prerouting",
            vec![mangle(obj([("&", Value::Array(vec![meta("mark"), clear.into()]))]))],
        );
        for (i, (guest, nic)) in ports.iter().enumerate() {
            let base = format!("g{}-{}", guest.vmid, nic.id);
            self.port_chains(guest, nic, &base, i as u32 + 1, blacklist.as_ref());
        }
        if let Some(v) = from_guest {
            self.rule("bridge", "prerouting", vec![vmap(meta("iifname"), ingress)]);
            self.rule("bridge", "forward", vec![vmap(meta("oifname"), egress)]);
            self.rule("inet", "forward", v);
            self.rule(
                "inet",
                "forward",
                vec![eq(meta("oifname"), bridge_set), vmap(masked(OUT_PORT_MASK), ins)],
            );
            // Routed to a guest (not bridged within one bridge): no egress port stamped yet,
            // so dispatch by bridge and address.
            let same_bridge: Vec<Value> =
                guest_bridges.iter().map(|b| obj([("concat", Value::Array(vec![s(b), s(b)]))])).collect();
            let routed = ne(
                obj([("concat", Value::Array(vec![meta("iifname"), meta("oifname")]))]),
                set_of(same_bridge),
            );
            to_guest_by_addr(self, "forward", Some(routed));
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
                    eq(json!({"concat": [meta("iifname"), meta("oifname")]}), set_of(pairs)),
                    verdict("accept"),
                ],
            );
        }
        for (owner, field, r) in host_rules.iter().filter(|(_, _, r)| r.type_ == RuleType::Forward) {
            self.compile_rule(r, Ctx::Forward, "forward", None, owner, *field, None);
        }
        self.policy("forward", cluster.policy_forward, None, "forward", Ctx::Forward);
    }

    /// Drops traffic from the datacenter's `blacklist` IP set (Proxmox's special set).
    fn blacklist_rules(&mut self, chain: &str, bl: &Resolved) {
        for (fam, m) in [("ip", &bl.v4), ("ip6", &bl.v6)] {
            if let Some((set, exclude)) = m {
                let mut e = vec![eq(payload(fam, "saddr"), set.clone())];
                if let Some(x) = exclude {
                    e.push(ne(payload(fam, "saddr"), x.clone()));
                }
                e.push(verdict("drop"));
                self.rule("inet", chain, e);
            }
        }
    }

    fn host_owner(&self) -> String {
        format!("Hypervisor/{}", self.inputs.node)
    }

    /// The chains of one firewalled guest NIC: anti-spoofing and port stamping in the bridge
    /// table, the guest's IN and OUT rules in the inet table.
    fn port_chains(
        &mut self,
        guest: &'a Guest,
        nic: &'a GuestNic,
        base: &str,
        id: u32,
        blacklist: Option<&Resolved>,
    ) {
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
                vec![ne(payload("ether", "saddr"), s(&mac.to_ascii_lowercase())), verdict("drop")],
            );
        }
        let ipfilter_set =
            fw.ipsets.iter().find(|s| s.name.eq_ignore_ascii_case(&format!("ipfilter-{}", nic.id)));
        // Proxmox: on with the option, or when the guest declares an ipfilter-netN set.
        if fw.ipfilter || ipfilter_set.is_some() {
            // A VLAN header would hide the addresses from the checks below.
            self.rule(
                "bridge",
                &from,
                vec![eq(payload("ether", "type"), json!({"set": ["8021q", "8021ad"]})), verdict("drop")],
            );
            // The NIC's configured addresses, the guest's ipfilter-netN set, and the link-local
            // address derived from the MAC.
            let mut entries: Vec<IpSetEntry> = nic
                .ips
                .iter()
                .map(|n| IpSetEntry { cidr: Net::host(n.addr).to_string(), nomatch: false, comment: None })
                .collect();
            entries.extend(ipfilter_set.iter().flat_map(|s| s.entries.iter().cloned()));
            if let Some(ll) = nic.mac.as_deref().and_then(link_local) {
                entries.push(IpSetEntry { cidr: ll.to_string(), nomatch: false, comment: None });
            }
            let set = format!("ipfilter/{}/{}", guest.vmid, nic.id);
            let r = self.entry_sets("bridge", &set, &entries);
            let stamp_in = obj([(
                "mangle",
                obj([
                    ("key", meta("mark")),
                    ("value", json!({"|": [{"&": [meta("mark"), !IN_PORT_MASK]}, id << IN_PORT_SHIFT]})),
                ]),
            )]);
            // DHCP discovery comes from 0.0.0.0; duplicate address detection from ::.
            self.rule(
                "bridge",
                &from,
                vec![
                    eq(payload("ip", "saddr"), json!("0.0.0.0")),
                    eq(payload("udp", "dport"), json!(67)),
                    stamp_in,
                    verdict("accept"),
                ],
            );
            for (fam, arp, slot) in [("ip", Some("arp"), &r.v4), ("ip6", None, &r.v6)] {
                match slot {
                    Some((set, exclude)) => {
                        let mut lefts = vec![payload(fam, "saddr")];
                        lefts.extend(arp.map(|a| payload(a, "saddr ip")));
                        for left in lefts {
                            if let Some(x) = exclude {
                                self.rule(
                                    "bridge",
                                    &from,
                                    vec![eq(left.clone(), x.clone()), verdict("drop")],
                                );
                            }
                            let mut e = Vec::new();
                            if fam == "ip6" {
                                e.push(ne(left.clone(), json!("::")));
                            }
                            e.push(ne(left, set.clone()));
                            e.push(verdict("drop"));
                            self.rule("bridge", &from, e);
                        }
                    }
                    None => {
                        let types: Vec<&str> = if fam == "ip" { vec!["ip", "arp"] } else { vec!["ip6"] };
                        for t in types {
                            let mut e = Vec::new();
                            if fam == "ip6" {
                                e.push(ne(payload("ip6", "saddr"), json!("::")));
                            }
                            e.push(eq(payload("ether", "type"), s(t)));
                            e.push(verdict("drop"));
                            self.rule("bridge", &from, e);
                        }
                    }
                }
            }
        }
        let stamp = |mask: u32, value: u32| json!({"mangle": {"key": meta("mark"), "value": {"|": [{"&": [meta("mark"), !mask]}, value]}}});
        self.rule("bridge", &from, vec![stamp(IN_PORT_MASK, id << IN_PORT_SHIFT)]);
        self.chain("bridge", &to, None);
        self.rule("bridge", &to, vec![stamp(OUT_PORT_MASK, id << OUT_PORT_SHIFT)]);

        let out_chain = format!("{base}-out");
        let in_chain = format!("{base}-in");
        self.chain("inet", &out_chain, None);
        self.chain("inet", &in_chain, None);
        if let Some(bl) = blacklist {
            self.blacklist_rules(&in_chain, bl);
        }
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
            let field = Field("spec.firewall.rules", i);
            if r.iface.as_deref().is_some_and(|f| f != nic.id) {
                continue;
            }
            match r.type_ {
                RuleType::In => {
                    self.compile_rule(r, Ctx::GuestIn, &in_chain, Some(guest), &guest.owner, field, None)
                }
                RuleType::Out => {
                    self.compile_rule(r, Ctx::GuestOut, &out_chain, Some(guest), &guest.owner, field, None)
                }
                RuleType::Group => {
                    self.compile_rule(r, Ctx::GuestIn, &in_chain, Some(guest), &guest.owner, field, None);
                    self.compile_rule(r, Ctx::GuestOut, &out_chain, Some(guest), &guest.owner, field, None);
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
        if policy != Policy::ACCEPT
            && let Some(level) = log.and_then(nft_level)
        {
            let log = self.log_statements(&format!("kpve {tag} policy {action}: "), level);
            self.rule("inet", chain, log);
        }
        let verdict = self.action(action, ctx);
        self.rule("inet", chain, vec![verdict]);
    }

    /// A rate limit (the cluster's `log_ratelimit`, Proxmox's default `rate=1/second,burst=5`)
    /// and the log statement.
    fn log_statements(&self, prefix: &str, level: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let spec = self.cluster().log_ratelimit.clone().unwrap_or_default();
        let mut enable = true;
        let (mut rate, mut per, mut burst) = (1u64, "second".to_string(), 5u64);
        for (k, v) in spec.split(',').filter_map(|kv| kv.split_once('=')) {
            match k.trim() {
                "enable" => enable = v.trim() != "0",
                "rate" => {
                    if let Some((n, unit)) = v.trim().split_once('/') {
                        rate = n.parse().unwrap_or(rate);
                        per = unit.to_string();
                    }
                }
                "burst" => burst = v.trim().parse().unwrap_or(burst),
                _ => {}
            }
        }
        if enable {
            out.push(json!({"limit": {"rate": rate, "per": per, "burst": burst}}));
        }
        out.push(json!({"log": {"prefix": prefix, "level": level}}));
        out
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
        field: Field,
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
            let name = r.action.to_ascii_lowercase();
            let Some(group) = self.inputs.groups.get(&name) else {
                return fail(self, format!("security group {:?} does not exist", r.action));
            };
            let want = match ctx {
                Ctx::HostIn | Ctx::GuestIn => RuleType::In,
                Ctx::HostOut | Ctx::GuestOut => RuleType::Out,
                Ctx::Forward => RuleType::Forward,
            };
            let group_owner = format!("SecurityGroup/{name}");
            let was = std::mem::replace(&mut self.in_group, true);
            for (i, gr) in group.rules.iter().enumerate() {
                if gr.type_ == want {
                    let iface = r.iface.as_deref().or(iface_override);
                    self.compile_rule(gr, ctx, chain, guest, &group_owner, Field("spec.rules", i), iface);
                }
            }
            self.in_group = was;
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
        // A group's `-i` and its rule's own `-i` must both hold.
        let iface = match (iface_override, r.iface.as_deref()) {
            (Some(a), Some(b)) if a != b => return,
            (a, b) => a.or(b),
        };
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
        let log = r.log.and_then(nft_level).map(|level| {
            let tag = guest.map(|g| g.vmid.to_string()).unwrap_or_else(|| "host".into());
            self.log_statements(&format!("kpve {tag} {}: ", r.action), level)
        });
        let verdict = self.action(&r.action, ctx);

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
                if let Some(log) = &log {
                    // Logging is rate-limited in a rule of its own: a limit that ran out must
                    // silence the log, never skip the verdict.
                    let mut logged = e.clone();
                    logged.extend(log.iter().cloned());
                    self.rule("inet", chain, logged);
                }
                e.push(verdict.clone());
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
    fn overlapping_addresses_are_merged_before_nft_sees_them() {
        let items = |list: &str| match lang::parse_address(list).unwrap() {
            Address::List(i) => i,
            _ => unreachable!(),
        };
        let show =
            |v: Vec<AddrItem>| v.iter().map(|i| item_value(i).to_string()).collect::<Vec<_>>().join(" ");
        assert_eq!(
            show(normalize(&items("10.0.0.5,10.0.0.0/24"))),
            r#"{"prefix":{"addr":"10.0.0.0","len":24}}"#
        );
        assert_eq!(
            show(normalize(&items("10.0.0.0/25,10.0.0.128/25"))),
            r#"{"prefix":{"addr":"10.0.0.0","len":24}}"#
        );
        assert_eq!(show(normalize(&items("10.0.0.1,10.0.0.2"))), r#"{"range":["10.0.0.1","10.0.0.2"]}"#);
        assert_eq!(show(normalize(&items("10.0.0.9,10.0.0.1"))), r#""10.0.0.1" "10.0.0.9""#);
        assert_eq!(show(normalize(&items("0.0.0.0/0,10.0.0.1"))), r#"{"prefix":{"addr":"0.0.0.0","len":0}}"#);
        assert_eq!(show(normalize(&items("fd00::/64,fd00::1"))), r#"{"prefix":{"addr":"fd00::","len":64}}"#);
        assert_eq!(
            ports_value(&[(8000, 8100), (8080, 8080), (22, 22)]),
            json!({"set": [22, {"range": [8000, 8100]}]})
        );
    }

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
            "IN ACCEPT -source 10.0.0.2 -p tcp -dport 80,443",
            "IN ACCEPT -source 10.0.0.3 -p tcp -dport 8080",
            "IN ACCEPT -source 10.0.0.0/8 -p tcp -dport 22",
            "IN DROP -source 10.0.0.7 -p tcp -dport 22",
            "IN ACCEPT -source 10.0.0.8 -p tcp -dport 22",
            "IN ACCEPT -source 192.168.0.1",
            "IN ACCEPT -source 192.168.0.2",
            "IN ACCEPT -source 172.16.0.1",
        ]))
        .unwrap();
        let chain = input_chain(&r);
        // lo, conntrack, neighbour discovery, the three merged exact accepts, the /8 (a
        // prefix never joins a concatenation: overlapping intervals make the kernel refuse
        // it), the drop, the last accept, the three single-field address rules merged,
        // management, policy.
        assert_eq!(chain.len(), 10, "{chain:#?}");
        let merged = &chain[3][0]["match"];
        assert_eq!(merged["left"]["concat"].as_array().unwrap().len(), 2);
        assert_eq!(merged["right"]["set"].as_array().unwrap().len(), 4, "1 + 2 + 1 tuples");
        assert!(chain[4][0]["match"]["right"].get("concat").is_none());
        let verdict = |i: usize| chain[i].as_array().unwrap().last().unwrap().clone();
        assert_eq!(verdict(5), json!({"drop": null}), "a different verdict keeps its place");
        assert_eq!(
            chain[7][0]["match"]["right"]["set"].as_array().unwrap().len(),
            3,
            "one field: intervals merge"
        );
    }

    #[test]
    fn set_and_rule_edits_are_small_transactions() {
        let mut inputs = host_rules(&["IN ACCEPT -source +admins -p tcp -dport 22"]);
        let set = |cidrs: &[&str]| -> IPSetSpec {
            serde_json::from_value(
                json!({"entries": cidrs.iter().map(|c| json!({"cidr": c})).collect::<Vec<_>>()}),
            )
            .unwrap()
        };
        inputs.ipsets.insert("admins".into(), set(&["10.0.0.1"]));
        let before = compile(&inputs).unwrap().document;
        inputs.ipsets.insert("admins".into(), set(&["10.0.0.2", "10.0.0.9"]));
        let after = compile(&inputs).unwrap().document;
        let text = delta(&before, &after).expect("only elements changed").to_string();
        assert!(
            text.contains(r#""flush":{"set":{"family":"inet","table":"kpve","name":"dc/admins/v4"}}"#),
            "{text}"
        );
        assert!(text.contains("10.0.0.9") && !text.contains("\"rule\""), "{text}");
        // A rule edit replaces the rules of its chain only.
        inputs.cluster.as_mut().unwrap().rules[0].dport = Some("2222".into());
        let edited = compile(&inputs).unwrap().document;
        let text = delta(&after, &edited).expect("same chains").to_string();
        assert!(
            text.contains(r#""flush":{"chain":{"family":"inet","table":"kpve","name":"input"}}"#),
            "{text}"
        );
        assert!(text.contains("2222") && !text.contains("\"output\""), "{text}");
        // A new chain (a guest's) needs the full document.
        let guest_fw: GuestFirewall = serde_json::from_value(json!({"enable": true})).unwrap();
        inputs.guests.push(Guest {
            vmid: 100,
            owner: "VirtualMachine/default/a".into(),
            firewall: Some(guest_fw),
            nics: vec![GuestNic {
                id: "net0".into(),
                ifname: "tap100i0".into(),
                mac: None,
                bridge: None,
                firewall: true,
                ips: vec![],
            }],
        });
        assert!(delta(&edited, &compile(&inputs).unwrap().document).is_none());
    }

    #[test]
    fn disabled_cluster_removes_only_kpve_tables() {
        let r = compile(&Inputs::default()).unwrap();
        assert!(!r.enabled);
        let text = r.document.to_string();
        assert!(text.contains("\"delete\"") && text.matches("\"name\":\"kpve\"").count() == 4, "{text}");
    }
}
