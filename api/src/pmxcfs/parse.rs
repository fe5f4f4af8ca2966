//! Parsers for the view's section-config files: `storage.cfg` and the HA manager's
//! `ha/groups.cfg` and `ha/resources.cfg` (`<type>: <id>` lines, each followed by indented
//! `<key> <value>` lines). Errors name the line and the key.

use kpve_crds::common::HaSpec;
use kpve_crds::{HAGroupSpec, StoragePoolSpec};
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
    fn ha_errors_name_the_line_and_key() {
        let e = ha_resources("vm: 100\n\tstate sideways\n").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("sideways"), "{e}");
        let e = ha_groups("group: g\n\tcolour red\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("colour"), "{e}");
    }
}
