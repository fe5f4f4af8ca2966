//! The files of the `/etc/pve` view, rendered from resources in the formats pmxcfs holds:
//! qemu-server and pve-container configs (through the codec, with snapshot sections),
//! firewall files, `storage.cfg`, `user.cfg` (no secrets), `ha/*.cfg` and the JSON status
//! files `.members`, `.vmlist`, `.version`. Pure functions of the resources.

use kpve_crds::codec::fw::{ClusterFw, print_cluster_fw, print_guest_fw, print_host_fw};
use kpve_crds::codec::qemu::{QemuConfig, QemuSnapshot, print_qemu_config};
use kpve_crds::{
    ClusterFirewall, HAGroup, Hypervisor, IPSet, LinuxContainer, PVEACL, PVEGroup, PVERole, PVEUser,
    SecurityGroup, StoragePool, VirtualMachine, VirtualMachineSpec,
};
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::storage::{content_types, name_of};

/// `qemu-server/<vmid>.conf`: the current config, `parent`, and a section per snapshot.
pub fn qemu_conf(vm: &VirtualMachine) -> String {
    let snapshots = vm
        .spec
        .snapshots
        .iter()
        .map(|s| {
            let mut spec = s
                .config
                .as_deref()
                .and_then(|c| VirtualMachineSpec::from_qemu_config(c).ok())
                .unwrap_or_default();
            spec.description = s.description.clone();
            QemuSnapshot {
                name: s.name.clone(),
                parent: s.parent.clone(),
                snaptime: s.snaptime,
                vmstate: None,
                running: Default::default(),
                spec,
            }
        })
        .collect();
    print_qemu_config(&QemuConfig {
        parent: vm.spec.parent.clone(),
        spec: vm.spec.clone(),
        pending: Default::default(),
        cloudinit: Default::default(),
        snapshots,
    })
}

/// `lxc/<vmid>.conf`.
pub fn lxc_conf(ct: &LinuxContainer) -> String {
    ct.spec.to_lxc_config()
}

/// `firewall/cluster.fw`: the ClusterFirewall `cluster` with every security group and IP set.
pub fn cluster_fw(
    cluster: Option<&ClusterFirewall>,
    groups: &[SecurityGroup],
    ipsets: &[IPSet],
) -> Option<String> {
    let cluster = cluster?;
    let fw = ClusterFw {
        spec: cluster.spec.clone(),
        groups: groups.iter().map(|g| (g.name_any(), g.spec.clone())).collect(),
        ipsets: ipsets.iter().map(|s| (s.name_any(), s.spec.clone())).collect(),
    };
    Some(print_cluster_fw(&fw))
}

/// `nodes/<node>/host.fw`.
pub fn host_fw(hv: &Hypervisor) -> Option<String> {
    hv.spec.firewall.as_ref().map(print_host_fw)
}

/// `firewall/<vmid>.fw`.
pub fn guest_fw(fw: Option<&kpve_crds::GuestFirewall>) -> Option<String> {
    fw.map(print_guest_fw)
}

/// `storage.cfg` (section config: `<type>: <id>` then tab-indented options).
pub fn storage_cfg(pools: &[StoragePool]) -> String {
    let mut out = String::new();
    for p in pools {
        let s = &p.spec;
        out.push_str(&format!("{}: {}\n", name_of(&s.type_), p.name_any()));
        let mut keys: Vec<(&str, String)> = vec![("content", content_types(p))];
        for (key, value) in [
            ("path", &s.path),
            ("format", &s.format),
            ("vgname", &s.vgname),
            ("thinpool", &s.thinpool),
            ("server", &s.server),
            ("export", &s.export),
            ("pool", &s.pool),
        ] {
            if let Some(v) = value {
                keys.push((key, v.clone()));
            }
        }
        if !s.nodes.is_empty() {
            keys.push(("nodes", s.nodes.join(",")));
        }
        if s.shared {
            keys.push(("shared", "1".into()));
        }
        if s.disable {
            keys.push(("disable", "1".into()));
        }
        if !s.mkdir {
            keys.push(("mkdir", "0".into()));
        }
        keys.sort();
        for (k, v) in keys {
            out.push_str(&format!("\t{k} {v}\n"));
        }
        out.push('\n');
    }
    out
}

/// `user.cfg`: users, tokens (never their secrets), groups with their members, roles, ACLs.
pub fn user_cfg(users: &[PVEUser], groups: &[PVEGroup], roles: &[PVERole], acls: &[PVEACL]) -> String {
    let opt = |s: &Option<String>| s.clone().unwrap_or_default();
    // Names and comments as Proxmox writes them (`encode_text`: `:` and the like escaped).
    let text = |s: &Option<String>| s.as_deref().map(encode_text).unwrap_or_default();
    // root@pam is built in; once it has tokens it is a resource, rendered like the others.
    let mut out = if users.iter().any(|u| u.spec.userid == "root@pam") {
        String::new()
    } else {
        String::from("user:root@pam:1:0:::root@localhost::\n")
    };
    for u in users {
        let s = &u.spec;
        out.push_str(&format!(
            "user:{}:{}:{}:{}:{}:{}:{}::\n",
            s.userid,
            u8::from(s.enable),
            s.expire,
            text(&s.firstname),
            text(&s.lastname),
            opt(&s.email),
            text(&s.comment)
        ));
        for t in &s.tokens {
            out.push_str(&format!(
                "token:{}!{}:{}:{}:{}:\n",
                s.userid,
                t.id,
                t.expire,
                u8::from(t.privsep),
                text(&t.comment)
            ));
        }
    }
    out.push('\n');
    for g in groups {
        let members: Vec<&str> = users
            .iter()
            .filter(|u| u.spec.groups.contains(&g.spec.groupid))
            .map(|u| u.spec.userid.as_str())
            .collect();
        out.push_str(&format!("group:{}:{}:{}:\n", g.spec.groupid, members.join(","), text(&g.spec.comment)));
    }
    out.push('\n');
    for r in roles {
        out.push_str(&format!("role:{}:{}:\n", r.spec.roleid, r.spec.privs.join(",")));
    }
    out.push('\n');
    for a in acls {
        let s = &a.spec;
        let mut subjects: Vec<String> = s.users.clone();
        subjects.extend(s.groups.iter().map(|g| format!("@{g}")));
        subjects.extend(s.tokens.iter().cloned());
        out.push_str(&format!(
            "acl:{}:{}:{}:{}:\n",
            u8::from(s.propagate),
            s.path,
            subjects.join(","),
            s.roles.join(",")
        ));
    }
    out
}

/// `datacenter.cfg`: `key: value` lines.
/// The `description` comes first as `#` lines, as Proxmox writes it.
pub fn datacenter_cfg(dc: Option<&kpve_crds::Datacenter>) -> String {
    let Some(dc) = dc else { return String::new() };
    let mut out = String::new();
    if let Some(description) = dc.spec.options.get("description") {
        for line in description.lines() {
            out.push_str(&format!("#{line}\n"));
        }
    }
    for (k, v) in dc.spec.options.iter().filter(|(k, _)| *k != "description") {
        out.push_str(&format!("{k}: {v}\n"));
    }
    out
}

/// Proxmox's `encode_text`: every byte of the UTF-8 text outside 0x20–0x39 and 0x3b–0x7e
/// (controls, `:`, non-ASCII) as `%XX`.
pub fn encode_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x39).contains(&b) || (0x3b..=0x7e).contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `ha/groups.cfg`.
pub fn ha_groups_cfg(groups: &[HAGroup]) -> String {
    let mut out = String::new();
    for g in groups {
        out.push_str(&format!("group: {}\n", g.name_any()));
        if let Some(c) = &g.spec.comment {
            out.push_str(&format!("\tcomment {c}\n"));
        }
        out.push_str(&format!("\tnodes {}\n", g.spec.nodes_text()));
        out.push_str(&format!("\tnofailback {}\n", u8::from(g.spec.nofailback)));
        out.push_str(&format!("\trestricted {}\n\n", u8::from(g.spec.restricted)));
    }
    out
}

/// `ha/resources.cfg`: one `vm:`/`ct:` section per guest with an HA declaration.
pub fn ha_resources_cfg(entries: &[(&str, u32, &kpve_crds::common::HaSpec)]) -> String {
    let mut out = String::new();
    for (kind, vmid, ha) in entries {
        out.push_str(&format!("{kind}: {vmid}\n"));
        if let Some(c) = &ha.comment {
            out.push_str(&format!("\tcomment {c}\n"));
        }
        if let Some(g) = &ha.group {
            out.push_str(&format!("\tgroup {g}\n"));
        }
        out.push_str(&format!("\tmax_relocate {}\n", ha.max_relocate));
        out.push_str(&format!("\tmax_restart {}\n", ha.max_restart));
        out.push_str(&format!("\tstate {}\n\n", name_of(&ha.state)));
    }
    out
}

/// `.vmlist`: every guest's node and type.
pub fn vmlist(version: u64, guests: &[(u32, &str, &str)]) -> String {
    let mut ids = serde_json::Map::new();
    for (vmid, node, kind) in guests {
        ids.insert(vmid.to_string(), json!({"node": node, "type": kind, "version": version}));
    }
    pretty(json!({"version": version, "ids": ids}))
}

/// `.members`: the nodes (Hypervisors) and whether their agents report.
pub fn members(local: &str, version: u64, nodes: &[(String, bool)]) -> String {
    let mut list = serde_json::Map::new();
    for (i, (name, online)) in nodes.iter().enumerate() {
        list.insert(name.clone(), json!({"id": i + 1, "online": u8::from(*online)}));
    }
    pretty(json!({
        "nodename": local, "version": version,
        "cluster": {"name": "kpve", "version": 1, "nodes": nodes.len(), "quorate": 1},
        "nodelist": list,
    }))
}

/// `.version`: the newest resource version seen, for every file.
pub fn version(version: u64, start: u64) -> String {
    pretty(json!({"starttime": start, "version": version}))
}

fn pretty(v: Value) -> String {
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpve_crds::vm::Snapshot;

    #[test]
    fn a_vm_conf_has_parent_and_snapshot_sections() {
        let mut spec =
            VirtualMachineSpec::from_qemu_config("memory: 256\ncores: 1\nscsi0: local:4\n").unwrap();
        spec.parent = Some("s1".into());
        spec.snapshots.push(Snapshot {
            name: "s1".into(),
            description: Some("before".into()),
            snaptime: Some(1_700_000_000),
            parent: None,
            config: Some("memory: 128\ncores: 1\nscsi0: local:4\n".into()),
        });
        let vm = VirtualMachine::new("vm-100", spec);
        let text = qemu_conf(&vm);
        assert!(text.contains("memory: 256\n") && text.contains("parent: s1\n"), "{text}");
        let snap = text.split("[s1]").nth(1).expect("a snapshot section");
        assert!(snap.contains("memory: 128") && snap.contains("snaptime: 1700000000"), "{text}");
        // What the view shows parses back to the same spec.
        let back = kpve_crds::codec::qemu::parse_qemu_config(&text).unwrap();
        assert_eq!(back.spec.memory, vm.spec.memory);
        assert_eq!(back.snapshots[0].name, "s1");
    }

    #[test]
    fn user_cfg_lists_members_and_never_secrets() {
        let user: PVEUser = serde_json::from_value(json!({
            "apiVersion": "kpve.io/v1alpha1", "kind": "PVEUser", "metadata": {"name": "alice.pve"},
            "spec": {"userid": "alice@pve", "groups": ["ops"], "passwordHash": "$5$salt$hash",
                     "tokens": [{"id": "ci", "privsep": true, "secretHash": "sha256:abc"}]}
        }))
        .unwrap();
        let group: PVEGroup = serde_json::from_value(json!({
            "apiVersion": "kpve.io/v1alpha1", "kind": "PVEGroup", "metadata": {"name": "ops"},
            "spec": {"groupid": "ops"}
        }))
        .unwrap();
        let text = user_cfg(&[user], &[group], &[], &[]);
        assert!(text.contains("user:alice@pve:1:0:") && text.contains("token:alice@pve!ci:0:1::"), "{text}");
        assert!(text.contains("group:ops:alice@pve::"), "{text}");
        assert!(!text.contains("$5$") && !text.contains("sha256"), "{text}");
    }
}
