//! Task ids in Proxmox's format: `UPID:node:PID:PSTART:STARTTIME:type:id:user:` — eight hex
//! digits each for pid, process start and start time (pstart may have nine), and the trailing
//! colon proxmoxer needs (it splits on `:` and wants exactly nine parts).

use std::fmt;

/// A parsed task id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    pub node: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u32,
    /// `qmstart`, `vzcreate`, …
    pub kind: String,
    /// Usually the VMID; may be empty.
    pub id: String,
    /// `root@pam`, or a token id `root@pam!ci`.
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse worker upid '{0}'")]
pub struct UpidError(pub String);

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UPID:{}:{:08X}:{:08X}:{:08X}:{}:{}:{}:",
            self.node, self.pid, self.pstart, self.starttime, self.kind, self.id, self.user
        )
    }
}

fn is_node(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

fn is_field(s: &str) -> bool {
    !s.chars().any(|c| c == ':' || c == '/' || c.is_whitespace())
}

fn hex(s: &str, lengths: &[usize]) -> Option<u64> {
    (lengths.contains(&s.len()) && s.bytes().all(|c| c.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

impl std::str::FromStr for Upid {
    type Err = UpidError;

    /// Accepts exactly what Proxmox's parse regex accepts.
    fn from_str(s: &str) -> Result<Upid, UpidError> {
        let err = || UpidError(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let [tag, node, pid, pstart, start, kind, id, user, end] = parts[..] else { return Err(err()) };
        if tag != "UPID" || !end.is_empty() || !is_node(node) {
            return Err(err());
        }
        let (Some(pid), Some(pstart), Some(starttime)) =
            (hex(pid, &[8]), hex(pstart, &[8, 9]), hex(start, &[8]))
        else {
            return Err(err());
        };
        if kind.is_empty() || user.is_empty() || ![kind, id, user].iter().all(|f| is_field(f)) {
            return Err(err());
        }
        Ok(Upid {
            node: node.into(),
            pid: pid as u32,
            pstart,
            starttime: starttime as u32,
            kind: kind.into(),
            id: id.into(),
            user: user.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_like_proxmox() {
        let upid = Upid {
            node: "pve1".into(),
            pid: 0x000A_1B2C,
            pstart: 0x0042_F00D,
            starttime: 0x6650_F00D,
            kind: "qmstart".into(),
            id: "100".into(),
            user: "root@pam".into(),
        };
        let text = upid.to_string();
        assert_eq!(text, "UPID:pve1:000A1B2C:0042F00D:6650F00D:qmstart:100:root@pam:");
        assert_eq!(text.split(':').count(), 9, "proxmoxer's decode_upid needs nine parts");
        assert_eq!(text.parse::<Upid>().unwrap(), upid);
        let token: Upid = "UPID:n-1:00000001:123456789:00000002:vzcreate::root@pam!ci:".parse().unwrap();
        assert_eq!(
            (token.pstart, token.id.as_str(), token.user.as_str()),
            (0x1_2345_6789, "", "root@pam!ci")
        );
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "UPID:pve1:000A1B2C:0042F00D:6650F00D:qmstart:100:root@pam",
            "UPID:-pve:000A1B2C:0042F00D:6650F00D:qmstart:100:root@pam:",
            "UPID:pve1:A1B2C:0042F00D:6650F00D:qmstart:100:root@pam:",
            "UPID:pve1:000A1B2C:0042F00D:6650F00D:qm start:100:root@pam:",
            "UPID:pve1:000A1B2C:0042F00D:6650F00D:qmstart:1/0:root@pam:",
            "PID:pve1:000A1B2C:0042F00D:6650F00D:qmstart:100:root@pam:",
        ] {
            assert!(bad.parse::<Upid>().is_err(), "{bad}");
        }
    }
}
