//! Proxmox firewall files: `firewall/cluster.fw`, `nodes/<node>/host.fw` and
//! `firewall/<vmid>.fw`, to and from the typed firewall objects.
//!
//! A file is sections: `[OPTIONS]` (`key: value`), `[ALIASES]` (`name cidr # comment`),
//! `[IPSET name] # comment` (one CIDR per line, `!` for nomatch), `[RULES]` and, in
//! cluster.fw, `[group name] # comment`. A rule line is
//! `[|]IN|OUT|FORWARD|GROUP ACTION|Macro(ACTION)|group [-i net0] [-source S] [-dest D] [-p P]
//! [-dport P] [-sport P] [-icmp-type T] [-log LEVEL] [# comment]`; `|` marks a disabled rule.

use crate::firewall::{
    Alias, ClusterFirewallSpec, FirewallRule, GuestFirewall, GuestIpSet, HostFirewall, IPSetSpec, IpSetEntry,
    LogLevel, Policy, RuleType, SecurityGroupSpec,
};

use super::{CodecError, Result};

/// Everything `cluster.fw` holds: options, aliases and cluster rules, plus the security
/// groups and IP sets (separate resources in kpve), in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterFw {
    pub spec: ClusterFirewallSpec,
    pub groups: Vec<(String, SecurityGroupSpec)>,
    pub ipsets: Vec<(String, IPSetSpec)>,
}

enum Part {
    Options,
    Aliases,
    Rules,
    IpSet(usize),
    Group(usize),
}

struct Raw {
    options: Vec<(usize, String, String)>,
    aliases: Vec<Alias>,
    rules: Vec<FirewallRule>,
    ipsets: Vec<(String, Option<String>, Vec<IpSetEntry>)>,
    groups: Vec<(String, Option<String>, Vec<FirewallRule>)>,
}

fn syntax(line: usize, message: impl Into<String>) -> CodecError {
    CodecError::Syntax { line, message: message.into() }
}

fn split_comment(line: &str) -> (&str, Option<String>) {
    match line.split_once('#') {
        Some((body, comment)) => (body.trim(), Some(comment.trim().to_string()).filter(|c| !c.is_empty())),
        None => (line.trim(), None),
    }
}

fn read(text: &str, allow_groups: bool) -> Result<Raw> {
    let mut raw = Raw { options: vec![], aliases: vec![], rules: vec![], ipsets: vec![], groups: vec![] };
    let mut part: Option<Part> = None;
    for (idx, line) in text.lines().enumerate() {
        let n = idx + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || (trimmed.starts_with('#') && !matches!(part, Some(Part::IpSet(_)))) {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let (head, comment) = split_comment(rest);
            let head = head.strip_suffix(']').ok_or_else(|| syntax(n, "section header must end with ]"))?;
            let mut words = head.split_whitespace();
            let kind = words.next().unwrap_or("");
            let name = words.next();
            part = Some(match (kind.to_ascii_uppercase().as_str(), name) {
                ("OPTIONS", None) => Part::Options,
                ("ALIASES", None) => Part::Aliases,
                ("RULES", None) => Part::Rules,
                // Proxmox stores IP set and group names lower-case.
                ("IPSET", Some(name)) => {
                    raw.ipsets.push((name.to_ascii_lowercase(), comment, vec![]));
                    Part::IpSet(raw.ipsets.len() - 1)
                }
                ("GROUP", Some(name)) if allow_groups => {
                    raw.groups.push((name.to_ascii_lowercase(), comment, vec![]));
                    Part::Group(raw.groups.len() - 1)
                }
                _ => {
                    return Err(syntax(
                        n,
                        format!(
                            "unknown section [{head}]: allowed are [OPTIONS], [ALIASES], [IPSET name], [RULES]{}",
                            if allow_groups { ", [group name]" } else { "" }
                        ),
                    ));
                }
            });
            continue;
        }
        match &part {
            None => return Err(syntax(n, "text before the first section")),
            Some(Part::Options) => {
                let (k, v) = trimmed.split_once(':').ok_or_else(|| syntax(n, "an option is `key: value`"))?;
                raw.options.push((n, k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
            Some(Part::Aliases) => {
                let (body, comment) = split_comment(trimmed);
                let mut words = body.split_whitespace();
                let (Some(name), Some(cidr), None) = (words.next(), words.next(), words.next()) else {
                    return Err(syntax(n, "an alias is `name cidr [# comment]`"));
                };
                crate::firewall::lang::parse_net(cidr).map_err(|e| syntax(n, e))?;
                raw.aliases.push(Alias { name: name.to_string(), cidr: cidr.to_string(), comment });
            }
            Some(Part::IpSet(i)) => {
                let (body, comment) = split_comment(trimmed);
                if body.is_empty() {
                    continue;
                }
                let (nomatch, cidr) = match body.strip_prefix('!') {
                    Some(c) => (true, c.trim()),
                    None => (false, body),
                };
                crate::firewall::lang::parse_net(cidr).map_err(|e| syntax(n, e))?;
                raw.ipsets[*i].2.push(IpSetEntry { cidr: cidr.to_string(), nomatch, comment });
            }
            Some(Part::Rules) => raw.rules.push(parse_rule(trimmed).map_err(|e| syntax(n, e))?),
            Some(Part::Group(i)) => raw.groups[*i].2.push(parse_rule(trimmed).map_err(|e| syntax(n, e))?),
        }
    }
    Ok(raw)
}

/// Parses one rule line.
pub fn parse_rule(line: &str) -> std::result::Result<FirewallRule, String> {
    let (body, comment) = split_comment(line);
    let (enable, body) = match body.strip_prefix('|') {
        Some(b) => (false, b.trim()),
        None => (true, body),
    };
    let mut words = body.split_whitespace();
    let dir = words.next().ok_or("empty rule")?;
    let type_ = match dir.to_ascii_uppercase().as_str() {
        "IN" => RuleType::In,
        "OUT" => RuleType::Out,
        "FORWARD" => RuleType::Forward,
        "GROUP" => RuleType::Group,
        _ => return Err(format!("{dir:?}: a rule starts with IN, OUT, FORWARD or GROUP")),
    };
    let action_word =
        words.next().ok_or("a rule needs an action (ACCEPT, DROP, REJECT, Macro(ACTION) or a group)")?;
    let (macro_, action) = match action_word.split_once('(') {
        Some((m, rest)) if type_ != RuleType::Group => {
            let a = rest
                .strip_suffix(')')
                .ok_or_else(|| format!("{action_word:?}: a macro is written Macro(ACTION)"))?;
            (Some(m.to_string()), a.to_string())
        }
        _ => (None, action_word.to_string()),
    };
    let mut rule = FirewallRule {
        type_,
        action,
        macro_,
        source: None,
        dest: None,
        proto: None,
        dport: None,
        sport: None,
        icmp_type: None,
        iface: None,
        log: None,
        enable,
        comment,
    };
    while let Some(flag) = words.next() {
        let value = words.next().ok_or_else(|| format!("{flag} needs a value"))?.to_string();
        let slot = match flag {
            "-i" => &mut rule.iface,
            "-source" => &mut rule.source,
            "-dest" => &mut rule.dest,
            "-p" => &mut rule.proto,
            "-dport" => &mut rule.dport,
            "-sport" => &mut rule.sport,
            "-icmp-type" => &mut rule.icmp_type,
            "-log" => {
                rule.log = Some(parse_level(&value)?);
                continue;
            }
            _ => {
                return Err(format!(
                    "unknown rule option {flag:?}: allowed are -i, -source, -dest, -p, -dport, -sport, -icmp-type, -log"
                ));
            }
        };
        *slot = Some(value);
    }
    Ok(rule)
}

/// Prints one rule line the way Proxmox writes it.
pub fn print_rule(rule: &FirewallRule) -> String {
    let mut out = String::new();
    if !rule.enable {
        out.push('|');
    }
    out.push_str(match rule.type_ {
        RuleType::In => "IN",
        RuleType::Out => "OUT",
        RuleType::Forward => "FORWARD",
        RuleType::Group => "GROUP",
    });
    match &rule.macro_ {
        Some(m) => out.push_str(&format!(" {m}({})", rule.action)),
        None => out.push_str(&format!(" {}", rule.action)),
    }
    for (flag, value) in [
        ("-i", &rule.iface),
        ("-source", &rule.source),
        ("-dest", &rule.dest),
        ("-p", &rule.proto),
        ("-dport", &rule.dport),
        ("-sport", &rule.sport),
        ("-icmp-type", &rule.icmp_type),
    ] {
        if let Some(v) = value {
            out.push_str(&format!(" {flag} {v}"));
        }
    }
    if let Some(l) = rule.log {
        out.push_str(&format!(" -log {}", level_name(l)));
    }
    if let Some(c) = &rule.comment {
        out.push_str(&format!(" # {c}"));
    }
    out
}

fn parse_level(s: &str) -> std::result::Result<LogLevel, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
        format!("{s:?} is not a log level: allowed are emerg, alert, crit, err, warning, notice, info, debug, nolog")
    })
}

fn level_name(l: LogLevel) -> String {
    serde_json::to_value(l).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn parse_policy(key: &str, s: &str) -> Result<Policy> {
    match s {
        "ACCEPT" => Ok(Policy::ACCEPT),
        "DROP" => Ok(Policy::DROP),
        "REJECT" => Ok(Policy::REJECT),
        _ => Err(CodecError::invalid(key, format!("{s:?}: allowed are ACCEPT, DROP, REJECT"))),
    }
}

fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::ACCEPT => "ACCEPT",
        Policy::DROP => "DROP",
        Policy::REJECT => "REJECT",
    }
}

fn parse_flag(key: &str, s: &str) -> Result<bool> {
    match s {
        "1" | "on" | "yes" | "true" => Ok(true),
        "0" | "off" | "no" | "false" => Ok(false),
        _ => Err(CodecError::invalid(key, format!("{s:?}: allowed are 0 and 1"))),
    }
}

fn unknown_option(line: usize, key: &str, allowed: &str) -> CodecError {
    syntax(line, format!("unknown option {key:?}: allowed are {allowed}"))
}

fn no_extra(raw: &Raw, what: &str, aliases: bool, ipsets: bool) -> Result<()> {
    if !aliases && !raw.aliases.is_empty() {
        return Err(CodecError::invalid("ALIASES", format!("{what} has no [ALIASES] section")));
    }
    if !ipsets && !raw.ipsets.is_empty() {
        return Err(CodecError::invalid("IPSET", format!("{what} has no [IPSET] sections")));
    }
    Ok(())
}

/// Parses `cluster.fw`.
pub fn parse_cluster_fw(text: &str) -> Result<ClusterFw> {
    let raw = read(text, true)?;
    let mut spec = ClusterFirewallSpec {
        enable: false,
        policy_in: Policy::DROP,
        policy_out: Policy::ACCEPT,
        policy_forward: Policy::ACCEPT,
        ebtables: true,
        log_ratelimit: None,
        aliases: raw.aliases,
        rules: raw.rules,
    };
    for (n, k, v) in &raw.options {
        match k.as_str() {
            "enable" => spec.enable = parse_flag(k, v)?,
            "policy_in" => spec.policy_in = parse_policy(k, v)?,
            "policy_out" => spec.policy_out = parse_policy(k, v)?,
            "policy_forward" => spec.policy_forward = parse_policy(k, v)?,
            "ebtables" => spec.ebtables = parse_flag(k, v)?,
            "log_ratelimit" => spec.log_ratelimit = Some(v.clone()),
            _ => {
                return Err(unknown_option(
                    *n,
                    k,
                    "enable, policy_in, policy_out, policy_forward, ebtables, log_ratelimit",
                ));
            }
        }
    }
    Ok(ClusterFw {
        spec,
        groups: raw
            .groups
            .into_iter()
            .map(|(name, comment, rules)| (name, SecurityGroupSpec { comment, rules }))
            .collect(),
        ipsets: raw
            .ipsets
            .into_iter()
            .map(|(name, comment, entries)| (name, IPSetSpec { comment, entries }))
            .collect(),
    })
}

/// Prints `cluster.fw`.
pub fn print_cluster_fw(fw: &ClusterFw) -> String {
    let s = &fw.spec;
    let mut out = String::from("[OPTIONS]\n\n");
    out.push_str(&format!("enable: {}\n", u8::from(s.enable)));
    if !s.ebtables {
        out.push_str("ebtables: 0\n");
    }
    if let Some(r) = &s.log_ratelimit {
        out.push_str(&format!("log_ratelimit: {r}\n"));
    }
    out.push_str(&format!("policy_forward: {}\n", policy_name(s.policy_forward)));
    out.push_str(&format!("policy_in: {}\n", policy_name(s.policy_in)));
    out.push_str(&format!("policy_out: {}\n", policy_name(s.policy_out)));
    print_aliases(&mut out, &s.aliases);
    for (name, set) in &fw.ipsets {
        print_ipset(&mut out, name, set.comment.as_deref(), &set.entries);
    }
    print_rules(&mut out, "[RULES]", &s.rules);
    for (name, group) in &fw.groups {
        let head = match &group.comment {
            Some(c) => format!("[group {name}] # {c}"),
            None => format!("[group {name}]"),
        };
        print_rules(&mut out, &head, &group.rules);
    }
    out
}

/// Proxmox host options kpve keeps verbatim (not enforced) besides `nf_conntrack_*`.
const HOST_KEPT: &[&str] = &[
    "log_level_forward",
    "log_nf_conntrack",
    "ndp",
    "nftables",
    "protection_synflood",
    "protection_synflood_burst",
    "protection_synflood_rate",
    "smurf_log_level",
    "tcp_flags_log_level",
];

/// Proxmox guest options kpve keeps verbatim (not enforced).
const GUEST_KEPT: &[&str] = &["ips", "ips_queues", "log_level_forward"];

/// Parses `host.fw`.
pub fn parse_host_fw(text: &str) -> Result<HostFirewall> {
    let raw = read(text, false)?;
    no_extra(&raw, "host.fw", false, false)?;
    let mut fw =
        HostFirewall { enable: true, nosmurfs: true, rules: raw.rules.clone(), ..HostFirewall::default() };
    for (n, k, v) in &raw.options {
        match k.as_str() {
            "enable" => fw.enable = parse_flag(k, v)?,
            "log_level_in" => fw.log_level_in = Some(parse_level(v).map_err(|e| CodecError::invalid(k, e))?),
            "log_level_out" => {
                fw.log_level_out = Some(parse_level(v).map_err(|e| CodecError::invalid(k, e))?)
            }
            "tcpflags" => fw.tcpflags = parse_flag(k, v)?,
            "nosmurfs" => fw.nosmurfs = parse_flag(k, v)?,
            k if HOST_KEPT.contains(&k) || k.starts_with("nf_conntrack_") => {
                fw.options.insert(k.to_string(), v.clone());
            }
            _ => {
                let allowed = format!(
                    "enable, log_level_in, log_level_out, tcpflags, nosmurfs, nf_conntrack_*, {}",
                    HOST_KEPT.join(", ")
                );
                return Err(unknown_option(*n, k, &allowed));
            }
        }
    }
    Ok(fw)
}

/// Prints `host.fw`.
pub fn print_host_fw(fw: &HostFirewall) -> String {
    let mut out = String::from("[OPTIONS]\n\n");
    out.push_str(&format!("enable: {}\n", u8::from(fw.enable)));
    if let Some(l) = fw.log_level_in {
        out.push_str(&format!("log_level_in: {}\n", level_name(l)));
    }
    if let Some(l) = fw.log_level_out {
        out.push_str(&format!("log_level_out: {}\n", level_name(l)));
    }
    out.push_str(&format!("nosmurfs: {}\n", u8::from(fw.nosmurfs)));
    out.push_str(&format!("tcpflags: {}\n", u8::from(fw.tcpflags)));
    for (k, v) in &fw.options {
        out.push_str(&format!("{k}: {v}\n"));
    }
    print_rules(&mut out, "[RULES]", &fw.rules);
    out
}

/// Parses `<vmid>.fw`.
pub fn parse_guest_fw(text: &str) -> Result<GuestFirewall> {
    let raw = read(text, false)?;
    let mut fw: GuestFirewall =
        serde_json::from_value(serde_json::json!({})).expect("every field has a default");
    fw.rules = raw.rules;
    fw.aliases = raw.aliases;
    fw.ipsets = raw
        .ipsets
        .into_iter()
        .map(|(name, comment, entries)| GuestIpSet { name, comment, entries })
        .collect();
    for (n, k, v) in &raw.options {
        match k.as_str() {
            "enable" => fw.enable = parse_flag(k, v)?,
            "policy_in" => fw.policy_in = parse_policy(k, v)?,
            "policy_out" => fw.policy_out = parse_policy(k, v)?,
            "ipfilter" => fw.ipfilter = parse_flag(k, v)?,
            "macfilter" => fw.macfilter = parse_flag(k, v)?,
            "dhcp" => fw.dhcp = parse_flag(k, v)?,
            "ndp" => fw.ndp = parse_flag(k, v)?,
            "radv" => fw.radv = parse_flag(k, v)?,
            "log_level_in" => fw.log_level_in = Some(parse_level(v).map_err(|e| CodecError::invalid(k, e))?),
            "log_level_out" => {
                fw.log_level_out = Some(parse_level(v).map_err(|e| CodecError::invalid(k, e))?)
            }
            k if GUEST_KEPT.contains(&k) => {
                fw.options.insert(k.to_string(), v.clone());
            }
            _ => {
                return Err(unknown_option(
                    *n,
                    k,
                    "enable, policy_in, policy_out, ipfilter, macfilter, dhcp, ndp, radv, log_level_in, log_level_out, ips, ips_queues, log_level_forward",
                ));
            }
        }
    }
    Ok(fw)
}

/// Prints `<vmid>.fw`.
pub fn print_guest_fw(fw: &GuestFirewall) -> String {
    let mut out = String::from("[OPTIONS]\n\n");
    out.push_str(&format!("dhcp: {}\n", u8::from(fw.dhcp)));
    out.push_str(&format!("enable: {}\n", u8::from(fw.enable)));
    out.push_str(&format!("ipfilter: {}\n", u8::from(fw.ipfilter)));
    if let Some(l) = fw.log_level_in {
        out.push_str(&format!("log_level_in: {}\n", level_name(l)));
    }
    if let Some(l) = fw.log_level_out {
        out.push_str(&format!("log_level_out: {}\n", level_name(l)));
    }
    out.push_str(&format!("macfilter: {}\n", u8::from(fw.macfilter)));
    out.push_str(&format!("ndp: {}\n", u8::from(fw.ndp)));
    out.push_str(&format!("policy_in: {}\n", policy_name(fw.policy_in)));
    out.push_str(&format!("policy_out: {}\n", policy_name(fw.policy_out)));
    out.push_str(&format!("radv: {}\n", u8::from(fw.radv)));
    for (k, v) in &fw.options {
        out.push_str(&format!("{k}: {v}\n"));
    }
    print_aliases(&mut out, &fw.aliases);
    for set in &fw.ipsets {
        print_ipset(&mut out, &set.name, set.comment.as_deref(), &set.entries);
    }
    print_rules(&mut out, "[RULES]", &fw.rules);
    out
}

fn print_aliases(out: &mut String, aliases: &[Alias]) {
    if aliases.is_empty() {
        return;
    }
    out.push_str("\n[ALIASES]\n\n");
    for a in aliases {
        match &a.comment {
            Some(c) => out.push_str(&format!("{} {} # {c}\n", a.name, a.cidr)),
            None => out.push_str(&format!("{} {}\n", a.name, a.cidr)),
        }
    }
}

fn print_ipset(out: &mut String, name: &str, comment: Option<&str>, entries: &[IpSetEntry]) {
    match comment {
        Some(c) => out.push_str(&format!("\n[IPSET {name}] # {c}\n\n")),
        None => out.push_str(&format!("\n[IPSET {name}]\n\n")),
    }
    for e in entries {
        let bang = if e.nomatch { "!" } else { "" };
        match &e.comment {
            Some(c) => out.push_str(&format!("{bang}{} # {c}\n", e.cidr)),
            None => out.push_str(&format!("{bang}{}\n", e.cidr)),
        }
    }
}

fn print_rules(out: &mut String, head: &str, rules: &[FirewallRule]) {
    if rules.is_empty() && head == "[RULES]" {
        return;
    }
    out.push_str(&format!("\n{head}\n\n"));
    for r in rules {
        out.push_str(&print_rule(r));
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "\
[OPTIONS]

enable: 1
policy_forward: ACCEPT
policy_in: DROP
policy_out: ACCEPT

[ALIASES]

office 192.168.10.0/24 # the office

[IPSET admins] # who may ssh

10.0.0.0/24
!10.0.0.13 # not this one

[RULES]

IN SSH(ACCEPT) -source +admins -log info
|IN ACCEPT -source office -p tcp -dport 80,443 # disabled for now
GROUP web -i net0

[group web] # web servers

IN ACCEPT -p tcp -dport 80:90
IN REJECT -p icmp -icmp-type echo-request
";

    #[test]
    fn cluster_fw_round_trips() {
        let fw = parse_cluster_fw(CLUSTER).unwrap();
        assert!(fw.spec.enable);
        assert_eq!(fw.spec.aliases[0].comment.as_deref(), Some("the office"));
        assert_eq!(
            fw.ipsets[0].1.entries[1],
            IpSetEntry { cidr: "10.0.0.13".into(), nomatch: true, comment: Some("not this one".into()) }
        );
        let ssh = &fw.spec.rules[0];
        assert_eq!(
            (ssh.macro_.as_deref(), ssh.action.as_str(), ssh.log),
            (Some("SSH"), "ACCEPT", Some(LogLevel::Info))
        );
        assert!(!fw.spec.rules[1].enable);
        assert_eq!(fw.spec.rules[2].type_, RuleType::Group);
        assert_eq!(fw.spec.rules[2].iface.as_deref(), Some("net0"));
        assert_eq!(fw.groups[0].0, "web");
        assert_eq!(fw.groups[0].1.rules[1].icmp_type.as_deref(), Some("echo-request"));
        assert_eq!(print_cluster_fw(&fw), CLUSTER);
    }

    #[test]
    fn guest_and_host_fw_round_trip() {
        let guest = "\
[OPTIONS]

dhcp: 1
enable: 1
ipfilter: 1
log_level_in: info
macfilter: 1
ndp: 1
policy_in: DROP
policy_out: ACCEPT
radv: 0

[IPSET ipfilter-net0]

10.1.0.5

[RULES]

IN ACCEPT -i net0 -source 10.1.0.0/16 -p tcp -dport 22
OUT DROP -dest 10.9.9.9
";
        let fw = parse_guest_fw(guest).unwrap();
        assert!(fw.enable && fw.ipfilter);
        assert_eq!(fw.ipsets[0].name, "ipfilter-net0");
        assert_eq!(print_guest_fw(&fw), guest);
        let host =
            "[OPTIONS]\n\nenable: 1\nnosmurfs: 1\ntcpflags: 0\n\n[RULES]\n\nIN ACCEPT -p tcp -dport 9000\n";
        assert_eq!(print_host_fw(&parse_host_fw(host).unwrap()), host);
    }

    #[test]
    fn proxmox_options_kpve_does_not_enforce_are_kept() {
        let host = parse_host_fw("[OPTIONS]\nNF_CONNTRACK_MAX: 262144\nprotection_synflood: 1\nenable: 1\n")
            .unwrap();
        assert_eq!(host.options.get("nf_conntrack_max").map(String::as_str), Some("262144"));
        assert!(print_host_fw(&host).contains("protection_synflood: 1\n"));
        let guest = parse_guest_fw("[OPTIONS]\nips: 1\n[IPSET Admins]\n10.0.0.1\n").unwrap();
        assert_eq!(guest.options.get("ips").map(String::as_str), Some("1"));
        assert_eq!(guest.ipsets[0].name, "admins", "IP set names are lower-case, as Proxmox stores them");
    }

    #[test]
    fn bad_lines_name_the_line_and_what_is_allowed() {
        let e = parse_guest_fw("[OPTIONS]\nbogus: 1\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("policy_in"), "{e}");
        let e = parse_guest_fw("[RULES]\nIN ACCEPT -port 22\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("-dport"), "{e}");
        let e = parse_guest_fw("[RULES]\nSIDEWAYS ACCEPT\n").unwrap_err().to_string();
        assert!(e.contains("IN, OUT"), "{e}");
        let e = parse_host_fw("[group x]\nIN ACCEPT\n").unwrap_err().to_string();
        assert!(e.contains("unknown section"), "{e}");
        let e = parse_cluster_fw("[IPSET a]\n10.0.0.0/40\n").unwrap_err().to_string();
        assert!(e.contains("prefix"), "{e}");
    }
}
