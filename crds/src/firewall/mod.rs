//! Proxmox firewall objects: the rule type shared by every level, guest and host firewall
//! settings, and the cluster-scoped kinds `ClusterFirewall`, `SecurityGroup` and `IPSet`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

pub mod lang;
pub mod macros;

/// Direction (or group reference) of a rule, as in Proxmox's `IN`/`OUT`/`GROUP`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleType {
    In,
    Out,
    Forward,
    /// Insert the rules of the SecurityGroup named in `action`.
    Group,
}

/// Policy for traffic no rule matched.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Policy {
    ACCEPT,
    DROP,
    REJECT,
}

/// Syslog level for firewall logging.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Emerg,
    Alert,
    Crit,
    Err,
    Warning,
    Notice,
    Info,
    Debug,
    Nolog,
}

/// One firewall rule in the Proxmox rule language.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirewallRule {
    #[serde(rename = "type")]
    pub type_: RuleType,
    /// ACCEPT, DROP or REJECT; for `type: group`, the SecurityGroup name.
    #[schemars(pattern(r"^(ACCEPT|DROP|REJECT|[A-Za-z][A-Za-z0-9_-]{1,17})$"))]
    pub action: String,
    /// A Proxmox macro such as SSH, HTTP, HTTPS, DNS, Ping.
    #[serde(default, rename = "macro", skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9]*$"))]
    pub macro_: Option<String>,
    /// Source: CIDR, range, comma list, `+ipset` or alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub source: Option<String>,
    /// Destination: CIDR, range, comma list, `+ipset` or alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub dest: Option<String>,
    /// Protocol name (tcp, udp, icmp, …) or number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z0-9-]+$"))]
    pub proto: Option<String>,
    /// Destination ports: `22`, `8000:8100`, `80,443`, or a service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z0-9:,_-]+$"))]
    pub dport: Option<String>,
    /// Source ports, same syntax as dport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z0-9:,_-]+$"))]
    pub sport: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<String>,
    /// Guest interface the rule applies to, e.g. `net0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$"))]
    pub iface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogLevel>,
    /// Disabled rules are kept but not enforced.
    #[serde(default = "yes")]
    pub enable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

pub(crate) fn yes() -> bool {
    true
}

fn policy_drop() -> Policy {
    Policy::DROP
}

fn policy_accept() -> Policy {
    Policy::ACCEPT
}

/// Firewall of one guest (Proxmox `firewall/<vmid>.fw`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestFirewall {
    #[serde(default)]
    pub enable: bool,
    #[serde(default = "policy_drop")]
    pub policy_in: Policy,
    #[serde(default = "policy_accept")]
    pub policy_out: Policy,
    /// Drop traffic whose source address is not one of the guest's own (anti-spoofing).
    #[serde(default)]
    pub ipfilter: bool,
    /// Drop traffic whose source MAC is not the NIC's own.
    #[serde(default = "yes")]
    pub macfilter: bool,
    #[serde(default = "yes")]
    pub dhcp: bool,
    #[serde(default = "yes")]
    pub ndp: bool,
    #[serde(default)]
    pub radv: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level_in: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level_out: Option<LogLevel>,
    /// Ordered rules; the first match decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FirewallRule>,
    /// Guest-local aliases (`guest/name` or unscoped in this guest's rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<Alias>,
    /// Guest-local IP sets; `ipfilter-net0` … restrict the source addresses of that NIC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipsets: Vec<GuestIpSet>,
    /// Proxmox options kpve keeps verbatim but does not enforce (`ips`, `ips_queues`,
    /// `log_level_forward`), so a `.fw` file round-trips.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub options: std::collections::BTreeMap<String, String>,
}

/// An IP set declared in a guest's firewall (Proxmox `[IPSET name]` in `<vmid>.fw`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestIpSet {
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9_-]+$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<IpSetEntry>,
}

/// Firewall of one host (Proxmox `nodes/<node>/host.fw`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostFirewall {
    #[serde(default = "yes")]
    pub enable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level_in: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level_out: Option<LogLevel>,
    /// Drop packets with illegal TCP flag combinations.
    #[serde(default)]
    pub tcpflags: bool,
    /// Drop smurf broadcast packets.
    #[serde(default = "yes")]
    pub nosmurfs: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FirewallRule>,
    /// Proxmox host options kpve keeps verbatim but does not enforce (`nf_conntrack_max`,
    /// `protection_synflood`, `ndp`, `nftables`, …), so a `host.fw` round-trips.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub options: std::collections::BTreeMap<String, String>,
}

/// A named address for use in rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Alias {
    #[schemars(pattern(r"^[A-Za-z][A-Za-z0-9_-]+$"))]
    pub name: String,
    /// An IP address or CIDR.
    #[schemars(pattern(r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$"))]
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Status of a firewall object: which generation the agents enforce, and problems found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirewallStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Datacenter-wide firewall (Proxmox `firewall/cluster.fw`). Name it `cluster`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "ClusterFirewall",
    plural = "clusterfirewalls",
    shortname = "cfw",
    category = "kpve",
    status = "FirewallStatus",
    doc = "Datacenter firewall: options, policies, aliases and cluster-wide rules (Proxmox cluster.fw)",
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enable"),
    printcolumn(name = "PolicyIn", type_ = "string", json_path = ".spec.policyIn"),
    printcolumn(name = "PolicyOut", type_ = "string", json_path = ".spec.policyOut"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterFirewallSpec {
    /// Master switch: when false kpve removes its nftables tables everywhere.
    #[serde(default)]
    pub enable: bool,
    #[serde(default = "policy_drop")]
    pub policy_in: Policy,
    #[serde(default = "policy_accept")]
    pub policy_out: Policy,
    #[serde(default = "policy_accept")]
    pub policy_forward: Policy,
    /// Also filter bridged layer-2 traffic.
    #[serde(default = "yes")]
    pub ebtables: bool,
    /// Log rate limit, e.g. `enable=1,rate=1/second,burst=5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_ratelimit: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<Alias>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FirewallRule>,
}

/// A reusable, ordered group of rules (Proxmox `[group name]`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "SecurityGroup",
    plural = "securitygroups",
    shortname = "sg",
    category = "kpve",
    status = "FirewallStatus",
    doc = "An ordered group of firewall rules referenced by `type: group` rules",
    printcolumn(name = "Comment", type_ = "string", json_path = ".spec.comment"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FirewallRule>,
}

/// One entry of an IP set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpSetEntry {
    /// An address or CIDR.
    #[schemars(pattern(r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$"))]
    pub cidr: String,
    /// Exclude this range from the set.
    #[serde(default)]
    pub nomatch: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// A named set of addresses, used in rules as `+name`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "IPSet",
    plural = "ipsets",
    singular = "ipset",
    shortname = "ips",
    category = "kpve",
    status = "FirewallStatus",
    doc = "A named set of addresses and CIDRs (with nomatch exclusions) for firewall rules",
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IPSetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<IpSetEntry>,
}

/// Kinds whose objects carry firewall rules or addresses.
pub const RULE_KINDS: &[&str] =
    &["ClusterFirewall", "SecurityGroup", "IPSet", "Hypervisor", "VirtualMachine", "LinuxContainer"];

/// Semantic checks the schema cannot express: the rule language of every rule, IP set
/// entries, alias addresses, and unique names. Returns (field path, message) pairs.
/// References between objects (a `+set`, an alias, a group) are not checked here: objects may
/// be declared in any order, so the agent reports a missing one as a condition.
pub fn check_object(kind: &str, object: &serde_json::Value) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let Some(spec) = object.get("spec") else { return errors };
    let (base, fw) = match kind {
        "ClusterFirewall" | "SecurityGroup" => ("spec".to_string(), Some(spec)),
        "Hypervisor" | "VirtualMachine" | "LinuxContainer" => {
            ("spec.firewall".to_string(), spec.get("firewall"))
        }
        "IPSet" => ("spec".to_string(), None),
        _ => return errors,
    };
    if kind == "IPSet" {
        check_entries(spec.get("entries"), "spec.entries", &mut errors);
        return errors;
    }
    let Some(fw) = fw else { return errors };
    if let Some(rules) = fw.get("rules").and_then(|r| r.as_array()) {
        for (i, raw) in rules.iter().enumerate() {
            let field = format!("{base}.rules[{i}]");
            let Ok(rule) = serde_json::from_value::<FirewallRule>(raw.clone()) else { continue };
            if kind == "SecurityGroup" && rule.type_ == RuleType::Group {
                errors.push((format!("{field}.type"), "a security group cannot contain group rules".into()));
                continue;
            }
            if let Err(e) = lang::check_rule(&rule, &field) {
                errors.push(e);
            }
        }
    }
    if let Some(aliases) = fw.get("aliases").and_then(|a| a.as_array()) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, a) in aliases.iter().enumerate() {
            let name = a.get("name").and_then(|n| n.as_str()).unwrap_or("");
            if !seen.insert(name.to_ascii_lowercase()) {
                errors.push((format!("{base}.aliases[{i}].name"), format!("duplicate alias {name:?}")));
            }
            if let Some(cidr) = a.get("cidr").and_then(|c| c.as_str())
                && let Err(e) = lang::parse_net(cidr)
            {
                errors.push((format!("{base}.aliases[{i}].cidr"), e));
            }
        }
    }
    if let Some(sets) = fw.get("ipsets").and_then(|a| a.as_array()) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, set) in sets.iter().enumerate() {
            let name = set.get("name").and_then(|n| n.as_str()).unwrap_or("");
            if !seen.insert(name.to_ascii_lowercase()) {
                errors.push((format!("{base}.ipsets[{i}].name"), format!("duplicate IP set {name:?}")));
            }
            check_entries(set.get("entries"), &format!("{base}.ipsets[{i}].entries"), &mut errors);
        }
    }
    errors
}

fn check_entries(entries: Option<&serde_json::Value>, base: &str, errors: &mut Vec<(String, String)>) {
    for (i, e) in entries.and_then(|e| e.as_array()).into_iter().flatten().enumerate() {
        if let Some(cidr) = e.get("cidr").and_then(|c| c.as_str())
            && let Err(msg) = lang::parse_net(cidr)
        {
            errors.push((format!("{base}[{i}].cidr"), msg));
        }
    }
}
