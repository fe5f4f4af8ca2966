//! Proxmox's built-in firewall macros (`SSH(ACCEPT)`, `Ping(DROP)`, …): each names one or more
//! protocol/port patterns. The set and the ports are Proxmox VE's, so a `.fw` file written for
//! Proxmox means the same here. Ping and Trcrt also cover ICMPv6 echo, as Proxmox's do.

/// One pattern of a macro: protocol, destination ports (or ICMP type), source ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacroEntry {
    pub proto: &'static str,
    pub dport: Option<&'static str>,
    pub sport: Option<&'static str>,
}

/// A built-in macro.
#[derive(Debug, Clone, Copy)]
pub struct Macro {
    pub name: &'static str,
    pub description: &'static str,
    pub entries: &'static [MacroEntry],
}

const fn p(proto: &'static str, dport: &'static str) -> MacroEntry {
    MacroEntry { proto, dport: Some(dport), sport: None }
}

const fn ps(proto: &'static str, dport: &'static str, sport: &'static str) -> MacroEntry {
    MacroEntry { proto, dport: Some(dport), sport: Some(sport) }
}

const fn proto(proto: &'static str) -> MacroEntry {
    MacroEntry { proto, dport: None, sport: None }
}

macro_rules! macros {
    ($($name:literal, $desc:literal, [$($e:expr),* $(,)?];)*) => {
        /// Every built-in macro, sorted by name.
        pub const MACROS: &[Macro] = &[$(Macro { name: $name, description: $desc, entries: &[$($e),*] }),*];
    };
}

macros! {
    "Amanda", "Amanda Backup", [p("udp", "10080"), p("tcp", "10080")];
    "Auth", "Auth (identd) traffic", [p("tcp", "113")];
    "BGP", "Border Gateway Protocol traffic", [p("tcp", "179")];
    "BitTorrent", "BitTorrent traffic for BitTorrent 3.1 and earlier", [p("tcp", "6881:6889"), p("udp", "6881")];
    "BitTorrent32", "BitTorrent traffic for BitTorrent 3.2 and later", [p("tcp", "6881:6999"), p("udp", "6881")];
    "CVS", "Concurrent Versions System pserver traffic", [p("tcp", "2401")];
    "Ceph", "Ceph Storage Cluster traffic", [p("tcp", "6789"), p("tcp", "3300"), p("tcp", "6800:7300")];
    "Citrix", "Citrix/ICA traffic (ICA, ICA Browser, CGP)", [p("tcp", "1494"), p("udp", "1604"), p("tcp", "2598")];
    "DAAP", "Digital Audio Access Protocol traffic", [p("tcp", "3689"), p("udp", "3689")];
    "DCC", "Distributed Checksum Clearinghouse spam filtering", [p("tcp", "6277")];
    "DHCPfwd", "Forwarded DHCP traffic", [ps("udp", "67:68", "67:68")];
    "DHCPv6", "DHCPv6 traffic", [ps("udp", "546:547", "546:547")];
    "DNS", "Domain Name System traffic (udp and tcp)", [p("udp", "53"), p("tcp", "53")];
    "Distcc", "Distributed Compiler service", [p("tcp", "3632")];
    "FTP", "File Transfer Protocol", [p("tcp", "21")];
    "Finger", "Finger protocol (RFC 742)", [p("tcp", "79")];
    "GNUnet", "GNUnet secure peer-to-peer networking traffic", [p("tcp", "2086"), p("udp", "2086"), p("tcp", "1080"), p("udp", "1080")];
    "GRE", "Generic Routing Encapsulation tunneling protocol", [proto("47")];
    "Git", "Git distributed revision control traffic", [p("tcp", "9418")];
    "HKP", "OpenPGP HTTP key server protocol traffic", [p("tcp", "11371")];
    "HTTP", "Hypertext Transfer Protocol (WWW)", [p("tcp", "80")];
    "HTTP/3", "Hypertext Transfer Protocol v3", [p("udp", "443")];
    "HTTPS", "Hypertext Transfer Protocol (WWW) over SSL", [p("tcp", "443")];
    "ICPV2", "Internet Cache Protocol V2 (Squid) traffic", [p("udp", "3130")];
    "ICQ", "AOL Instant Messenger traffic", [p("tcp", "5190")];
    "IMAP", "Internet Message Access Protocol", [p("tcp", "143")];
    "IMAPS", "Internet Message Access Protocol over SSL", [p("tcp", "993")];
    "IPIP", "IPIP capsulation traffic", [proto("94")];
    "IPsec", "IPsec traffic", [ps("udp", "500", "500"), proto("50")];
    "IPsecah", "IPsec authentication (AH) traffic", [ps("udp", "500", "500"), proto("51")];
    "IPsecnat", "IPsec traffic and Nat-Traversal", [p("udp", "500"), p("udp", "4500"), proto("50")];
    "IRC", "Internet Relay Chat traffic", [p("tcp", "6667")];
    "Jetdirect", "HP Jetdirect printing", [p("tcp", "9100")];
    "L2TP", "Layer 2 Tunneling Protocol traffic", [p("udp", "1701")];
    "LDAP", "Lightweight Directory Access Protocol traffic", [p("tcp", "389")];
    "LDAPS", "Secure Lightweight Directory Access Protocol traffic", [p("tcp", "636")];
    "MDNS", "Multicast DNS", [p("udp", "5353")];
    "MSNP", "Microsoft Notification Protocol", [p("tcp", "1863")];
    "MSSQL", "Microsoft SQL Server", [p("tcp", "1433")];
    "Mail", "Mail traffic (SMTP, SMTPS, Submission)", [p("tcp", "25"), p("tcp", "465"), p("tcp", "587")];
    "Munin", "Munin networked resource monitoring traffic", [p("tcp", "4949")];
    "MySQL", "MySQL server", [p("tcp", "3306")];
    "NNTP", "NNTP traffic (Usenet)", [p("tcp", "119")];
    "NNTPS", "Encrypted NNTP traffic (Usenet)", [p("tcp", "563")];
    "NTP", "Network Time Protocol (ntpd)", [p("udp", "123")];
    "NeighborDiscovery", "IPv6 neighbor solicitation, neighbor and router advertisement", [
        p("icmpv6", "nd-router-solicit"), p("icmpv6", "nd-router-advert"),
        p("icmpv6", "nd-neighbor-solicit"), p("icmpv6", "nd-neighbor-advert"),
    ];
    "OSPF", "OSPF multicast traffic", [proto("89")];
    "OpenVPN", "OpenVPN traffic", [p("udp", "1194")];
    "PBS", "Proxmox Backup Server", [p("tcp", "8007")];
    "PCA", "Symantec PCAnywere (tm)", [p("udp", "5632"), p("tcp", "5631")];
    "PMG", "Proxmox Mail Gateway web interface", [p("tcp", "8006")];
    "POP3", "POP3 traffic", [p("tcp", "110")];
    "POP3S", "Encrypted POP3 traffic", [p("tcp", "995")];
    "PPtP", "Point-to-Point Tunneling Protocol", [proto("47"), p("tcp", "1723")];
    "Ping", "ICMP echo request", [p("icmp", "echo-request"), p("icmpv6", "echo-request")];
    "PostgreSQL", "PostgreSQL server", [p("tcp", "5432")];
    "Printer", "Line Printer protocol printing", [p("tcp", "515")];
    "RDP", "Microsoft Remote Desktop Protocol traffic", [p("tcp", "3389")];
    "RIP", "Routing Information Protocol (bidirectional)", [p("udp", "520")];
    "RNDC", "BIND remote management protocol", [p("tcp", "953")];
    "Razor", "Razor Antispam System", [p("tcp", "2703")];
    "Rdate", "Remote time retrieval (rdate)", [p("tcp", "37")];
    "Rsync", "Rsync server", [p("tcp", "873")];
    "SANE", "SANE network scanning", [p("tcp", "6566")];
    "SMB", "Microsoft SMB traffic", [
        p("udp", "135,445"), p("udp", "137:139"), ps("udp", "1024:65535", "137"), p("tcp", "135,139,445"),
    ];
    "SMBswat", "Samba Web Administration Tool", [p("tcp", "901")];
    "SMTP", "Simple Mail Transfer Protocol", [p("tcp", "25")];
    "SMTPS", "Encrypted Simple Mail Transfer Protocol", [p("tcp", "465")];
    "SNMP", "Simple Network Management Protocol", [p("udp", "161:162"), p("tcp", "161")];
    "SPAMD", "Spam Assassin SPAMD traffic", [p("tcp", "783")];
    "SPICEproxy", "Proxmox VE SPICE display proxy traffic", [p("tcp", "3128")];
    "SSH", "Secure shell traffic", [p("tcp", "22")];
    "SVN", "Subversion server (svnserve)", [p("tcp", "3690")];
    "SixXS", "SixXS IPv6 Deployment and Tunnel Broker", [p("tcp", "3874"), p("udp", "3740"), proto("41"), p("udp", "5072,8374")];
    "Squid", "Squid web proxy traffic", [p("tcp", "3128")];
    "Submission", "Mail message submission traffic", [p("tcp", "587")];
    "Syslog", "Syslog protocol (RFC 5424) traffic", [p("udp", "514"), p("tcp", "514")];
    "TFTP", "Trivial File Transfer Protocol traffic", [p("udp", "69")];
    "Telnet", "Telnet traffic", [p("tcp", "23")];
    "Telnets", "Telnet over SSL", [p("tcp", "992")];
    "Time", "RFC 868 Time protocol", [p("tcp", "37")];
    "Trcrt", "Traceroute (for up to 30 hops) traffic", [
        p("udp", "33434:33524"), p("icmp", "echo-request"), p("icmpv6", "echo-request"),
    ];
    "VNC", "VNC traffic for VNC display's 0 - 99", [p("tcp", "5900:5999")];
    "VNCL", "VNC traffic from Vncservers to Vncviewers in listen mode", [p("tcp", "5500")];
    "Web", "WWW traffic (HTTP and HTTPS)", [p("tcp", "80"), p("tcp", "443")];
    "Webcache", "Web Cache/Proxy traffic (port 8080)", [p("tcp", "8080")];
    "Webmin", "Webmin traffic", [p("tcp", "10000")];
    "Whois", "Whois (nicname, RFC 3912) traffic", [p("tcp", "43")];
}

/// The macro called `name` (Proxmox matches macro names case-insensitively).
pub fn lookup(name: &str) -> Option<&'static Macro> {
    MACROS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macros_are_found_by_any_case() {
        assert_eq!(lookup("ssh").unwrap().entries, &[p("tcp", "22")]);
        assert_eq!(lookup("Ping").unwrap().entries[0].dport, Some("echo-request"));
        assert!(lookup("Nope").is_none());
        assert!(MACROS.len() > 80);
    }
}
