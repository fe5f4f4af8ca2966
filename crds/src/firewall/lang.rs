//! The Proxmox firewall rule language: addresses (CIDR, range, list, `+ipset`, alias), ports
//! (number, range, list, service name), protocols and ICMP types. Parsing here is syntax only;
//! whether an IP set, alias or group exists is decided when rules are compiled, because those
//! objects may be declared in any order.

use std::net::IpAddr;

use super::{FirewallRule, RuleType};

/// Where a named IP set or alias is looked up (`dc/name`, `guest/name`, or unscoped: the
/// guest's own first, then the datacenter's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Any,
    Dc,
    Guest,
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The host route (`/32`, `/128`) for an address.
    pub fn host(addr: IpAddr) -> Net {
        Net { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } }
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix == Net::host(self.addr).prefix {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// A literal address item of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AddrItem {
    Net(Net),
    /// An inclusive range `first-last` of one family.
    Range(IpAddr, IpAddr),
}

impl AddrItem {
    pub fn is_v4(&self) -> bool {
        match self {
            AddrItem::Net(n) => n.is_v4(),
            AddrItem::Range(a, _) => a.is_ipv4(),
        }
    }
}

/// A rule's source or destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    List(Vec<AddrItem>),
    IpSet { scope: Scope, name: String },
    Alias { scope: Scope, name: String },
}

/// A CIDR or address (`10.0.0.0/8`, `fe80::1`). The address part is normalized to the
/// network (`10.1.2.3/8` → `10.0.0.0/8`).
pub fn parse_net(s: &str) -> Result<Net, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
        },
    };
    Ok(Net { addr: mask(addr, prefix), prefix })
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
            IpAddr::V6((bits & m).into())
        }
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.len() <= 64
}

fn scoped(s: &str) -> (Scope, &str) {
    if let Some(n) = s.strip_prefix("dc/") {
        (Scope::Dc, n)
    } else if let Some(n) = s.strip_prefix("guest/") {
        (Scope::Guest, n)
    } else {
        (Scope::Any, s)
    }
}

/// Parses a source or destination: `+ipset`, an alias, or a comma list of addresses, CIDRs
/// and ranges of one family.
pub fn parse_address(s: &str) -> Result<Address, String> {
    let s = s.trim();
    if let Some(set) = s.strip_prefix('+') {
        let (scope, name) = scoped(set);
        if !is_name(name) {
            return Err(format!("{s:?}: an IP set reference is +name, +dc/name or +guest/name"));
        }
        return Ok(Address::IpSet { scope, name: name.to_string() });
    }
    let mut items = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("{s:?}: empty item in address list"));
        }
        if let Some((a, b)) = part.split_once('-')
            && let (Ok(a), Ok(b)) = (a.parse::<IpAddr>(), b.parse::<IpAddr>())
        {
            if a.is_ipv4() != b.is_ipv4() || a > b {
                return Err(format!("{part:?}: a range is first-last of one address family, first ≤ last"));
            }
            items.push(AddrItem::Range(a, b));
            continue;
        }
        match parse_net(part) {
            Ok(n) => items.push(AddrItem::Net(n)),
            Err(e) => {
                let (scope, name) = scoped(part);
                if s.contains(',') || !is_name(name) || part.contains('/') && scope == Scope::Any {
                    return Err(format!(
                        "{e}; allowed: an address, CIDR, range (a-b), a comma list of these, +ipset or an alias name"
                    ));
                }
                return Ok(Address::Alias { scope, name: name.to_string() });
            }
        }
    }
    if items.iter().any(|i| i.is_v4()) && items.iter().any(|i| !i.is_v4()) {
        return Err(format!("{s:?}: a list cannot mix IPv4 and IPv6"));
    }
    Ok(Address::List(items))
}

/// Destination or source ports: `22`, `8000:8100`, `80,443`, service names. Inclusive ranges.
pub fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let port = |p: &str| -> Result<u16, String> {
            if let Ok(n) = p.parse::<u16>() {
                return Ok(n);
            }
            service_port(p).ok_or_else(|| {
                format!("{p:?} is not a port: allowed are 0-65535, a service name (ssh, http, …), a:b ranges and comma lists")
            })
        };
        match part.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("{part:?}: range start is above its end"));
                }
                out.push((a, b));
            }
            None => {
                let p = port(part)?;
                out.push((p, p));
            }
        }
    }
    Ok(out)
}

/// Well-known service names of /etc/services that rules commonly use.
pub fn service_port(name: &str) -> Option<u16> {
    Some(match name {
        "ftp-data" => 20,
        "ftp" => 21,
        "ssh" => 22,
        "telnet" => 23,
        "smtp" => 25,
        "domain" => 53,
        "bootps" => 67,
        "bootpc" => 68,
        "tftp" => 69,
        "http" | "www" => 80,
        "pop3" => 110,
        "ntp" => 123,
        "imap" | "imap2" => 143,
        "snmp" => 161,
        "ldap" => 389,
        "https" => 443,
        "microsoft-ds" => 445,
        "submissions" | "smtps" => 465,
        "syslog" => 514,
        "submission" => 587,
        "ldaps" => 636,
        "rsync" => 873,
        "imaps" => 993,
        "pop3s" => 995,
        "openvpn" => 1194,
        "ms-sql-s" => 1433,
        "mysql" => 3306,
        "rdp" | "ms-wbt-server" => 3389,
        "postgresql" => 5432,
        "http-alt" => 8080,
        _ => return None,
    })
}

/// IP protocol number of a name (`tcp`, `icmp`, …) or number.
pub fn protocol_number(s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return Some(n);
    }
    Some(match s {
        "icmp" => 1,
        "igmp" => 2,
        "ipencap" | "ipip" => 4,
        "tcp" => 6,
        "udp" => 17,
        "ipv6" => 41,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "icmpv6" | "ipv6-icmp" => 58,
        "ospf" => 89,
        "pim" => 103,
        "vrrp" => 112,
        "l2tp" => 115,
        "sctp" => 132,
        "udplite" => 136,
        _ => return None,
    })
}

/// Whether a protocol has ports (so `dport`/`sport` make sense).
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136)
}

const ICMP_TYPES: &[(&str, u8)] = &[
    ("echo-reply", 0),
    ("destination-unreachable", 3),
    ("source-quench", 4),
    ("redirect", 5),
    ("echo-request", 8),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp-request", 13),
    ("timestamp-reply", 14),
    ("info-request", 15),
    ("info-reply", 16),
    ("address-mask-request", 17),
    ("address-mask-reply", 18),
];

const ICMPV6_TYPES: &[(&str, u8)] = &[
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", 128),
    ("echo-reply", 129),
    ("mld-listener-query", 130),
    ("mld-listener-report", 131),
    ("mld-listener-done", 132),
    ("nd-router-solicit", 133),
    ("nd-router-advert", 134),
    ("nd-neighbor-solicit", 135),
    ("nd-neighbor-advert", 136),
    ("nd-redirect", 137),
];

/// ICMP (proto 1) or ICMPv6 (proto 58) type by name or number. `any` is no type match.
pub fn icmp_type(proto: u8, s: &str) -> Result<Option<u8>, String> {
    if s == "any" {
        return Ok(None);
    }
    if let Ok(n) = s.parse::<u8>() {
        return Ok(Some(n));
    }
    let table = if proto == 58 { ICMPV6_TYPES } else { ICMP_TYPES };
    table.iter().find(|(n, _)| *n == s).map(|(_, v)| Some(*v)).ok_or_else(|| {
        let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        format!(
            "{s:?} is not an ICMP{} type: allowed are a number or {}",
            if proto == 58 { "v6" } else { "" },
            names.join(", ")
        )
    })
}

/// Checks one rule's syntax. The error names the rule's field (`field` is the rule's path,
/// e.g. `spec.rules[2]`) and says what is allowed.
pub fn check_rule(rule: &FirewallRule, field: &str) -> Result<(), (String, String)> {
    let err = |sub: &str, msg: String| Err((format!("{field}.{sub}"), msg));
    match rule.type_ {
        RuleType::Group => {
            if !is_name(&rule.action) {
                return err(
                    "action",
                    format!("{:?}: a group rule's action is a SecurityGroup name", rule.action),
                );
            }
            for (name, set) in [
                ("macro", rule.macro_.is_some()),
                ("source", rule.source.is_some()),
                ("dest", rule.dest.is_some()),
                ("proto", rule.proto.is_some()),
                ("dport", rule.dport.is_some()),
                ("sport", rule.sport.is_some()),
                ("icmpType", rule.icmp_type.is_some()),
            ] {
                if set {
                    return err(
                        name,
                        "a group rule takes only action (the group), iface, enable and comment".into(),
                    );
                }
            }
            return Ok(());
        }
        _ => {
            if !matches!(rule.action.as_str(), "ACCEPT" | "DROP" | "REJECT") {
                return err(
                    "action",
                    format!(
                        "Unsupported value: {:?}: supported values: \"ACCEPT\", \"DROP\", \"REJECT\"",
                        rule.action
                    ),
                );
            }
        }
    }
    if let Some(m) = &rule.macro_
        && super::macros::lookup(m).is_none()
    {
        return err(
            "macro",
            format!("{m:?} is not a Proxmox firewall macro (SSH, HTTP, HTTPS, DNS, Ping, …)"),
        );
    }
    for (sub, value) in [("source", &rule.source), ("dest", &rule.dest)] {
        if let Some(v) = value
            && let Err(e) = parse_address(v)
        {
            return err(sub, e);
        }
    }
    let proto = match &rule.proto {
        Some(p) => match protocol_number(p) {
            Some(n) => Some(n),
            None => {
                return err(
                    "proto",
                    format!("{p:?} is not a protocol: use a name (tcp, udp, icmp, icmpv6, …) or 0-255"),
                );
            }
        },
        None => None,
    };
    for (sub, value) in [("dport", &rule.dport), ("sport", &rule.sport)] {
        if let Some(v) = value {
            if let Err(e) = parse_ports(v) {
                return err(sub, e);
            }
            if rule.macro_.is_none() && !proto.is_some_and(has_ports) {
                return err(sub, "ports need proto tcp, udp, dccp, sctp or udplite".into());
            }
        }
    }
    if let Some(t) = &rule.icmp_type {
        match proto {
            Some(p @ (1 | 58)) => {
                if let Err(e) = icmp_type(p, t) {
                    return err("icmpType", e);
                }
            }
            _ => return err("icmpType", "icmpType needs proto icmp or icmpv6".into()),
        }
    }
    if rule.type_ == RuleType::Forward && rule.iface.is_some() && field.contains("firewall") {
        return err("iface", "forward rules do not apply to guest interfaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_like_proxmox() {
        assert_eq!(
            parse_address("10.1.2.3/24").unwrap(),
            Address::List(vec![AddrItem::Net(Net { addr: "10.1.2.0".parse().unwrap(), prefix: 24 })])
        );
        assert_eq!(
            parse_address("+mgmt").unwrap(),
            Address::IpSet { scope: Scope::Any, name: "mgmt".into() }
        );
        assert_eq!(
            parse_address("+dc/mgmt").unwrap(),
            Address::IpSet { scope: Scope::Dc, name: "mgmt".into() }
        );
        assert_eq!(
            parse_address("guest/web").unwrap(),
            Address::Alias { scope: Scope::Guest, name: "web".into() }
        );
        assert_eq!(
            parse_address("office").unwrap(),
            Address::Alias { scope: Scope::Any, name: "office".into() }
        );
        let list = parse_address("10.0.0.1,10.0.1.0/24,10.0.2.5-10.0.2.9").unwrap();
        assert!(matches!(list, Address::List(ref v) if v.len() == 3));
        assert!(parse_address("10.0.0.1,fe80::1").unwrap_err().contains("mix"));
        assert!(parse_address("10.0.0.300").is_err());
        assert!(parse_address("10.0.0.1,office").is_err());
        assert!(parse_address("10.0.0.9-10.0.0.1").is_err());
        assert!(parse_address("10.0.0.0/33").is_err());
        assert_eq!(parse_address("fe80::1/64").unwrap(), parse_address("fe80::/64").unwrap());
    }

    #[test]
    fn ports_parse_numbers_ranges_lists_and_names() {
        assert_eq!(parse_ports("22").unwrap(), vec![(22, 22)]);
        assert_eq!(parse_ports("80,443,8000:8100").unwrap(), vec![(80, 80), (443, 443), (8000, 8100)]);
        assert_eq!(parse_ports("ssh,https").unwrap(), vec![(22, 22), (443, 443)]);
        assert!(parse_ports("70000").is_err());
        assert!(parse_ports("9:1").is_err());
        assert!(parse_ports("nosuch").unwrap_err().contains("service name"));
    }

    fn rule(yaml: &str) -> FirewallRule {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn rules_are_checked_field_by_field() {
        assert!(check_rule(&rule("{type: in, action: ACCEPT, macro: SSH, source: +admins}"), "r").is_ok());
        assert!(check_rule(&rule("{type: in, action: ACCEPT, proto: tcp, dport: '22,80'}"), "r").is_ok());
        assert!(check_rule(&rule("{type: group, action: web, iface: net0}"), "r").is_ok());
        let e = check_rule(&rule("{type: in, action: ACCEPT, dport: '22'}"), "spec.rules[3]").unwrap_err();
        assert_eq!(e.0, "spec.rules[3].dport");
        let e = check_rule(&rule("{type: in, action: ALLOW}"), "r").unwrap_err();
        assert!(e.1.contains("supported values"), "{e:?}");
        let e = check_rule(&rule("{type: in, action: ACCEPT, macro: Nope}"), "r").unwrap_err();
        assert_eq!(e.0, "r.macro");
        let e =
            check_rule(&rule("{type: in, action: ACCEPT, proto: icmp, icmpType: bogus}"), "r").unwrap_err();
        assert!(e.1.contains("echo-request"), "{e:?}");
        let e = check_rule(&rule("{type: group, action: web, proto: tcp}"), "r").unwrap_err();
        assert_eq!(e.0, "r.proto");
        let e = check_rule(&rule("{type: out, action: DROP, dest: '10.0.0.1,x'}"), "r").unwrap_err();
        assert_eq!(e.0, "r.dest");
    }
}
