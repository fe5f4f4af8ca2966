//! Parsers for the view's section-config files: `storage.cfg` and the HA manager's
//! `ha/groups.cfg` and `ha/resources.cfg` (`<type>: <id>` lines, each followed by indented
//! `<key> <value>` lines). Errors name the line and the key.

use kpve_crds::common::HaSpec;
use kpve_crds::{HAGroupSpec, PVEACLSpec, StoragePoolSpec};
use serde_json::{Map, Value, json};

/// One section: type, id, and its key/value lines with their line numbers.
struct Section {
    line: usize,
    kind: String,
    id: String,
    keys: Vec<(usize, String, String)>,
}

fn sections(text: &str) -> Result<Vec<Section>, String> {
    let mut out: Vec<Section> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
            continue;
        }
        if raw.starts_with([' ', '\t']) {
            let Some(section) = out.last_mut() else {
                return Err(format!("line {line}: an option before any section"));
            };
            let (key, value) = raw.trim().split_once([' ', '\t']).unwrap_or((raw.trim(), ""));
            section.keys.push((line, key.to_string(), value.trim().to_string()));
        } else {
            let (kind, id) = raw
                .split_once(':')
                .ok_or_else(|| format!("line {line}: expected '<type>: <id>', got {raw:?}"))?;
            out.push(Section {
                line,
                kind: kind.trim().to_string(),
                id: id.trim().to_string(),
                keys: Vec::new(),
            });
        }
    }
    Ok(out)
}

fn flag(line: usize, key: &str, value: &str) -> Result<bool, String> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("line {line}: {key}: {value:?} is not 0 or 1")),
    }
}

fn number(line: usize, key: &str, value: &str) -> Result<u32, String> {
    value.parse().map_err(|_| format!("line {line}: {key}: {value:?} is not a number"))
}

fn typed<T: serde::de::DeserializeOwned>(line: usize, object: Map<String, Value>) -> Result<T, String> {
    serde_json::from_value(Value::Object(object)).map_err(|e| format!("line {line}: {e}"))
}

/// `ha/groups.cfg` → (group name, spec).
pub fn ha_groups(text: &str) -> Result<Vec<(String, HAGroupSpec)>, String> {
    let mut out = Vec::new();
    for s in sections(text)? {
        if s.kind != "group" {
            return Err(format!("line {}: unknown section type {:?}; allowed: group", s.line, s.kind));
        }
        let mut spec = Map::new();
        for (line, key, value) in &s.keys {
            match key.as_str() {
                "nodes" => {
                    let mut nodes = Vec::new();
                    for item in value.split(',').filter(|i| !i.is_empty()) {
                        let (node, priority) = item.split_once(':').unwrap_or((item, "0"));
                        nodes.push(json!({"node": node, "priority": number(*line, "nodes", priority)?}));
                    }
                    spec.insert("nodes".into(), Value::Array(nodes));
                }
                "restricted" | "nofailback" => {
                    spec.insert(key.clone(), json!(flag(*line, key, value)?));
                }
                "comment" => {
                    spec.insert("comment".into(), json!(value));
                }
                _ => {
                    return Err(format!(
                        "line {line}: unknown option {key:?}; allowed: nodes, restricted, nofailback, comment"
                    ));
                }
            }
        }
        out.push((s.id, typed(s.line, spec)?));
    }
    Ok(out)
}

/// `storage.cfg` → (storage id, spec); the keys the view renders, with Proxmox's names.
pub fn storage(text: &str) -> Result<Vec<(String, StoragePoolSpec)>, String> {
    const ALLOWED: &str =
        "content, path, format, vgname, thinpool, server, export, pool, nodes, shared, disable, mkdir";
    let mut out: Vec<(String, StoragePoolSpec)> = Vec::new();
    for s in sections(text)? {
        if out.iter().any(|(id, _)| *id == s.id) {
            return Err(format!("line {}: storage {:?} is defined twice", s.line, s.id));
        }
        // Storage ids are resource names here: lower case, digits, `-` and `.`.
        let name_ok = s.id.len() <= 253
            && s.id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.id.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !name_ok {
            return Err(format!(
                "line {}: storage id {:?}: kpve allows lower-case letters, digits, '-' and '.' (a resource name)",
                s.line, s.id
            ));
        }
        let mut spec = Map::new();
        spec.insert("type".into(), json!(s.kind));
        let list = |v: &str| v.split(',').map(str::trim).filter(|i| !i.is_empty()).map(Value::from).collect();
        for (line, key, value) in &s.keys {
            match key.as_str() {
                "content" | "nodes" => {
                    spec.insert(key.clone(), Value::Array(list(value)));
                }
                "path" | "format" | "vgname" | "thinpool" | "server" | "export" | "pool" => {
                    spec.insert(key.clone(), json!(value));
                }
                "shared" | "disable" | "mkdir" => {
                    // A flag without a value is set, as Proxmox reads it.
                    let value = if value.is_empty() { "1" } else { value.as_str() };
                    spec.insert(key.clone(), json!(flag(*line, key, value)?));
                }
                _ => return Err(format!("line {line}: unknown option {key:?}; allowed: {ALLOWED}")),
            }
        }
        let spec: StoragePoolSpec = typed(s.line, spec).map_err(|e| format!("storage {:?}, {e}", s.id))?;
        out.push((s.id, spec));
    }
    Ok(out)
}

/// `datacenter.cfg` (`key: value` lines) → options, each checked against the Proxmox schema
/// of `PUT /cluster/options` (names, enums, property strings, ranges, patterns).
pub fn datacenter(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut options = std::collections::BTreeMap::new();
    // `#` lines are the description.
    let mut description: Vec<&str> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        if let Some(line) = raw.strip_prefix('#') {
            description.push(line);
            continue;
        }
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let (key, value) = raw
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected '<key>: <value>', got {raw:?}", n + 1))?;
        let (key, value) = (key.trim(), value.trim());
        if key == "delete" || options.insert(key.to_string(), value.to_string()).is_some() {
            return Err(format!("line {}: {key:?} is not a datacenter option here, or given twice", n + 1));
        }
    }
    if !description.is_empty() && options.insert("description".into(), description.join("\n")).is_some() {
        return Err("the description is given both as '#' lines and as a key".into());
    }
    let crate::schema::Route::Found(endpoint, _) =
        crate::schema::SCHEMA.route("PUT", &["cluster", "options"])
    else {
        return Err("the schema has no PUT /cluster/options".into());
    };
    crate::validate::params(endpoint, &options)
        .map_err(|errors| errors.iter().map(|(k, e)| format!("{k}: {e}")).collect::<Vec<_>>().join("; "))?;
    Ok(options)
}

/// Proxmox's `decode_text`: `%XX` back to bytes, read as UTF-8.
pub fn decode_text(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `user:` line of user.cfg (what it carries of a PVEUser).
#[derive(Debug, Clone, PartialEq)]
pub struct UserLine {
    pub userid: String,
    pub enable: bool,
    pub expire: i64,
    pub firstname: Option<String>,
    pub lastname: Option<String>,
    pub email: Option<String>,
    pub comment: Option<String>,
}

/// A `token:` line: user, token id, expiry, privilege separation, comment.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLine {
    pub userid: String,
    pub id: String,
    pub expire: i64,
    pub privsep: bool,
    pub comment: Option<String>,
}

/// user.cfg as declared: users, tokens, groups (id, members, comment), custom roles (id,
/// privileges), ACLs.
#[derive(Debug, Default)]
pub struct UserCfg {
    pub users: Vec<UserLine>,
    pub tokens: Vec<TokenLine>,
    pub groups: Vec<(String, Vec<String>, Option<String>)>,
    pub roles: Vec<(String, Vec<String>)>,
    pub acls: Vec<PVEACLSpec>,
}

/// `user.cfg` (`user:`, `token:`, `group:`, `role:`, `acl:` lines, colon-separated fields).
/// Checked here: the line kinds and field counts, flags and numbers, that tokens, group
/// members and ACL subjects name users, groups and tokens of the file, that ACL roles are
/// built in or declared, and privilege names and ACL paths.
pub fn user_cfg(text: &str) -> Result<UserCfg, String> {
    use kpve_crds::access::{BUILTIN_ROLES, PRIVILEGES, check_acl_path};
    let mut cfg = UserCfg::default();
    let text_or_none = |v: &str| (!v.is_empty()).then(|| v.to_string());
    // Names and comments are written with Proxmox's `encode_text`.
    let decoded = |v: &str| (!v.is_empty()).then(|| decode_text(v));
    let int = |line: usize, key: &str, v: &str| -> Result<i64, String> {
        if v.is_empty() {
            Ok(0)
        } else {
            v.parse().map_err(|_| format!("line {line}: {key}: {v:?} is not a number"))
        }
    };
    let items = |v: &str| -> Vec<String> {
        v.split(',').map(str::trim).filter(|i| !i.is_empty()).map(str::to_string).collect()
    };
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = raw.split(':').collect();
        let want = |count: usize| -> Result<(), String> {
            if fields.len() < count {
                Err(format!(
                    "line {line}: a {} line needs {count} fields, it has {}",
                    fields[0],
                    fields.len()
                ))
            } else {
                Ok(())
            }
        };
        match fields[0] {
            "user" => {
                want(8)?;
                cfg.users.push(UserLine {
                    userid: fields[1].to_string(),
                    enable: flag(line, "enable", if fields[2].is_empty() { "1" } else { fields[2] })?,
                    expire: int(line, "expire", fields[3])?,
                    firstname: decoded(fields[4]),
                    lastname: decoded(fields[5]),
                    email: text_or_none(fields[6]),
                    comment: decoded(fields[7]),
                });
            }
            "token" => {
                want(5)?;
                let (userid, id) = fields[1]
                    .split_once('!')
                    .ok_or_else(|| format!("line {line}: token {:?} is not user@realm!id", fields[1]))?;
                cfg.tokens.push(TokenLine {
                    userid: userid.to_string(),
                    id: id.to_string(),
                    expire: int(line, "expire", fields[2])?,
                    privsep: flag(line, "privsep", if fields[3].is_empty() { "1" } else { fields[3] })?,
                    comment: decoded(fields[4]),
                });
            }
            "group" => {
                want(4)?;
                cfg.groups.push((fields[1].to_string(), items(fields[2]), decoded(fields[3])));
            }
            "role" => {
                want(3)?;
                let privs = items(fields[2]);
                if let Some(bad) = privs.iter().find(|p| !PRIVILEGES.contains(&p.as_str())) {
                    return Err(format!("line {line}: role {}: unknown privilege {bad:?}", fields[1]));
                }
                if BUILTIN_ROLES.iter().any(|(name, _)| *name == fields[1]) {
                    return Err(format!("line {line}: role {} is built in and cannot be changed", fields[1]));
                }
                cfg.roles.push((fields[1].to_string(), privs));
            }
            "acl" => {
                want(5)?;
                let path = fields[2].to_string();
                check_acl_path(&path).map_err(|e| format!("line {line}: {e} '{path}'"))?;
                let mut acl = PVEACLSpec {
                    path,
                    propagate: flag(line, "propagate", fields[1])?,
                    roles: items(fields[4]),
                    users: vec![],
                    groups: vec![],
                    tokens: vec![],
                };
                for who in items(fields[3]) {
                    match who.strip_prefix('@') {
                        Some(group) => acl.groups.push(group.to_string()),
                        None if who.contains('!') => acl.tokens.push(who),
                        None => acl.users.push(who),
                    }
                }
                if acl.roles.is_empty() || acl.users.len() + acl.groups.len() + acl.tokens.len() == 0 {
                    return Err(format!("line {line}: an acl needs at least one subject and one role"));
                }
                cfg.acls.push(acl);
            }
            other => {
                return Err(format!(
                    "line {line}: unknown entry {other:?}; allowed: user, token, group, role, acl (pools are namespaces in kpve)"
                ));
            }
        }
    }
    // References between lines.
    let user = |u: &str| u == "root@pam" || cfg.users.iter().any(|l| l.userid == u);
    for t in &cfg.tokens {
        if !user(&t.userid) {
            return Err(format!("token {}!{}: no user {} in the file", t.userid, t.id, t.userid));
        }
    }
    for (group, members, _) in &cfg.groups {
        if let Some(m) = members.iter().find(|m| !user(m)) {
            return Err(format!("group {group}: member {m} is not a user in the file"));
        }
    }
    for acl in &cfg.acls {
        if let Some(r) = acl
            .roles
            .iter()
            .find(|r| !BUILTIN_ROLES.iter().any(|(n, _)| n == *r) && !cfg.roles.iter().any(|(n, _)| n == *r))
        {
            return Err(format!("acl on {}: role {r} does not exist", acl.path));
        }
        if let Some(u) = acl.users.iter().find(|u| !user(u)) {
            return Err(format!("acl on {}: user {u} is not in the file", acl.path));
        }
        if let Some(g) = acl.groups.iter().find(|g| !cfg.groups.iter().any(|(n, _, _)| n == *g)) {
            return Err(format!("acl on {}: group {g} is not in the file", acl.path));
        }
        if let Some(t) =
            acl.tokens.iter().find(|t| !cfg.tokens.iter().any(|l| format!("{}!{}", l.userid, l.id) == **t))
        {
            return Err(format!("acl on {}: token {t} is not in the file", acl.path));
        }
    }
    Ok(cfg)
}

/// `ha/resources.cfg` → (`vm`/`ct`, VMID, HA declaration).
pub fn ha_resources(text: &str) -> Result<Vec<(String, u32, HaSpec)>, String> {
    let mut out = Vec::new();
    for s in sections(text)? {
        if s.kind != "vm" && s.kind != "ct" {
            return Err(format!("line {}: unknown resource type {:?}; allowed: vm, ct", s.line, s.kind));
        }
        let vmid: u32 = s.id.parse().map_err(|_| format!("line {}: {:?} is not a VMID", s.line, s.id))?;
        let mut spec = Map::new();
        for (line, key, value) in &s.keys {
            match key.as_str() {
                "group" | "comment" | "state" => {
                    spec.insert(key.clone(), json!(value));
                }
                "max_restart" => {
                    spec.insert("maxRestart".into(), json!(number(*line, key, value)?));
                }
                "max_relocate" => {
                    spec.insert("maxRelocate".into(), json!(number(*line, key, value)?));
                }
                _ => {
                    return Err(format!(
                        "line {line}: unknown option {key:?}; allowed: group, state, max_restart, max_relocate, comment"
                    ));
                }
            }
        }
        out.push((s.kind, vmid, typed(s.line, spec)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ha_files_parse_what_the_view_renders() {
        let groups =
            ha_groups("group: g1\n\tnodes node1:2,node2\n\tnofailback 0\n\trestricted 1\n\n").unwrap();
        assert_eq!(groups[0].0, "g1");
        assert_eq!(groups[0].1.nodes_text(), "node1:2,node2");
        assert!(groups[0].1.restricted);
        let res = ha_resources("vm: 100\n\tgroup g1\n\tmax_relocate 1\n\tmax_restart 2\n\tstate stopped\n")
            .unwrap();
        assert_eq!((res[0].0.as_str(), res[0].1), ("vm", 100));
        assert_eq!(res[0].2.max_restart, 2);
        assert_eq!(res[0].2.group.as_deref(), Some("g1"));
    }

    #[test]
    fn storage_cfg_parses_what_the_view_renders_and_names_bad_values() {
        let pools = storage("dir: local\n\tcontent images,rootdir\n\tpath /srv/a\n\tshared 1\n\nnfs: n\n\tcontent iso\n\texport /e\n\tserver 10.0.0.1\n").unwrap();
        assert_eq!(pools[0].0, "local");
        assert_eq!(pools[0].1.path.as_deref(), Some("/srv/a"));
        assert!(pools[0].1.shared && pools[0].1.content.len() == 2);
        assert_eq!(pools[1].1.server.as_deref(), Some("10.0.0.1"));
        let e = storage("dir: x\n\tcontent images,pictures\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("pictures") && e.contains("images"), "{e}");
        let e = storage("floppy: x\n").unwrap_err();
        assert!(e.contains("floppy") && e.contains("dir"), "{e}");
        let e = storage("dir: x\n\tcolour red\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("colour") && e.contains("allowed"), "{e}");
    }

    #[test]
    fn user_cfg_parses_what_the_view_renders_and_checks_references() {
        let text = "user:root@pam:1:0:::root@localhost::\nuser:alice@pve:1:0:Alice::a@x::\ntoken:alice@pve!ci:0:1:CI:\n\ngroup:ops:alice@pve:operators:\n\nrole:Watcher:VM.Audit,Sys.Audit:\n\nacl:1:/vms:alice@pve,@ops,alice@pve!ci:Watcher,PVEVMUser:\n";
        let cfg = user_cfg(text).unwrap();
        assert_eq!(cfg.users.len(), 2);
        assert_eq!(cfg.users[1].firstname.as_deref(), Some("Alice"));
        assert_eq!((cfg.tokens[0].id.as_str(), cfg.tokens[0].privsep), ("ci", true));
        assert_eq!(cfg.groups[0].1, ["alice@pve"]);
        assert_eq!(cfg.roles[0].1, ["VM.Audit", "Sys.Audit"]);
        let acl = &cfg.acls[0];
        assert_eq!((acl.users.len(), acl.groups.len(), acl.tokens.len(), acl.roles.len()), (1, 1, 1, 2));
        let e = user_cfg("role:R:VM.Fly:\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("VM.Fly"), "{e}");
        let e = user_cfg("acl:1:/vms:bob@pve:PVEVMUser:\n").unwrap_err();
        assert!(e.contains("bob@pve"), "{e}");
        let e = user_cfg("acl:1:/vms:@ops:Nope:\n").unwrap_err();
        assert!(e.contains("Nope"), "{e}");
        let e = user_cfg("pool:p1::\n").unwrap_err();
        assert!(e.contains("pool") && e.contains("allowed"), "{e}");
        let cfg = user_cfg("user:eve@pve:1:0:%C3%88ve::e@x:on-call%3A weekends::\n").unwrap();
        assert_eq!(cfg.users[0].comment.as_deref(), Some("on-call: weekends"));
        assert_eq!(cfg.users[0].firstname.as_deref(), Some("Ève"));
        assert_eq!(crate::pmxcfs::render::encode_text("on-call: weekends"), "on-call%3A weekends");
        assert_eq!(crate::pmxcfs::render::encode_text("Ève"), "%C3%88ve");
        let e = user_cfg("role:Administrator:VM.Audit:\n").unwrap_err();
        assert!(e.contains("built in"), "{e}");
    }

    #[test]
    fn datacenter_cfg_is_checked_against_the_proxmox_schema() {
        let o = datacenter("keyboard: de\nmigration: type=insecure,network=10.0.0.0/24\n").unwrap();
        assert_eq!(o["migration"], "type=insecure,network=10.0.0.0/24");
        let o = datacenter("#first\n#second\nkeyboard: de\n").unwrap();
        assert_eq!(o["description"], "first\nsecond");
        let e = datacenter("keyboard: klingon\n").unwrap_err();
        assert!(e.starts_with("keyboard:") && e.contains("klingon"), "{e}");
        let e = datacenter("colour: red\n").unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = datacenter("migration: type=teleport\n").unwrap_err();
        assert!(e.contains("migration"), "{e}");
    }

    #[test]
    fn ha_errors_name_the_line_and_key() {
        let e = ha_resources("vm: 100\n\tstate sideways\n").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("sideways"), "{e}");
        let e = ha_groups("group: g\n\tcolour red\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("colour"), "{e}");
    }
}
