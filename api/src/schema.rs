//! The Proxmox VE API schema (PVE 9.1, `api/schema/pve-api.json`, generated from the official
//! `apidata.json` by `scripts/gen-pve-schema.py`): every path and method with its parameters,
//! permissions and whether API tokens may call it. The router matches request paths against
//! it, [`crate::validate`] checks parameters with it, and [`crate::access`] evaluates its
//! permission checks — nothing of that is written per endpoint.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;

const SCHEMA_JSON: &str = include_str!("../schema/pve-api.json");

/// One path and method of the API.
#[derive(Debug, Deserialize)]
pub struct Endpoint {
    /// The template, e.g. `/nodes/{node}/qemu/{vmid}/config`.
    pub path: String,
    pub method: String,
    /// A JSON schema of type object: `properties`, `additionalProperties`.
    #[serde(default)]
    pub parameters: Value,
    /// `user`, `check`; absent means root@pam only.
    #[serde(default)]
    pub permissions: Option<Value>,
    #[serde(default = "one")]
    pub allowtoken: u8,
}

fn one() -> u8 {
    1
}

impl Endpoint {
    pub fn allows_tokens(&self) -> bool {
        self.allowtoken != 0
    }

    /// The schema of parameter `name`: the property itself, or a numbered family
    /// (`net0` → `net[n]`).
    pub fn parameter(&self, name: &str) -> Option<&Value> {
        let props = self.parameters.get("properties")?;
        if let Some(p) = props.get(name) {
            return Some(p);
        }
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
        if stem.len() < name.len() { props.get(format!("{stem}[n]")) } else { None }
    }
}

#[derive(Default)]
struct Node {
    literal: BTreeMap<String, Node>,
    /// `{name}` and the node below it.
    variable: Option<(String, Box<Node>)>,
    /// Method → index into `Schema::endpoints`.
    methods: BTreeMap<String, usize>,
}

pub struct Schema {
    endpoints: Vec<Endpoint>,
    root: Node,
}

/// Where a request path leads.
pub enum Route<'a> {
    /// The endpoint and the parameters taken from the path.
    Found(&'a Endpoint, BTreeMap<String, String>),
    /// The path exists but not with this method.
    NoMethod,
    /// No such path.
    NoPath,
}

impl Schema {
    fn parse(text: &str) -> Schema {
        let endpoints: Vec<Endpoint> = serde_json::from_str(text).expect("the embedded API schema parses");
        let mut root = Node::default();
        for (i, e) in endpoints.iter().enumerate() {
            let mut node = &mut root;
            for seg in e.path.split('/').filter(|s| !s.is_empty()) {
                node = match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(var) => {
                        let slot = node.variable.get_or_insert_with(|| (var.to_string(), Box::default()));
                        &mut slot.1
                    }
                    None => node.literal.entry(seg.to_string()).or_default(),
                };
            }
            node.methods.insert(e.method.clone(), i);
        }
        Schema { endpoints, root }
    }

    /// The endpoint for `method` on the (decoded) path segments.
    pub fn route(&self, method: &str, segments: &[&str]) -> Route<'_> {
        let mut node = &self.root;
        let mut vars = BTreeMap::new();
        let mut i = 0;
        while i < segments.len() {
            let seg = segments[i];
            if let Some(next) = node.literal.get(seg) {
                node = next;
            } else if let Some((name, next)) = &node.variable {
                // A storage volume id is the whole rest of the path (`local:iso/x.iso` may
                // arrive with its `/` unescaped), as Proxmox mounts it with no delimiter.
                if name == "volume" {
                    vars.insert(name.clone(), segments[i..].join("/"));
                    node = next;
                    break;
                }
                vars.insert(name.clone(), seg.to_string());
                node = next;
            } else {
                return Route::NoPath;
            }
            i += 1;
        }
        match node.methods.get(method) {
            Some(&index) => Route::Found(&self.endpoints[index], vars),
            None if node.methods.is_empty() => Route::NoPath,
            None => Route::NoMethod,
        }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }
}

/// The schema, parsed on first use.
pub static SCHEMA: LazyLock<Schema> = LazyLock::new(|| Schema::parse(SCHEMA_JSON));

#[cfg(test)]
mod tests {
    use super::*;

    fn found(method: &str, path: &str) -> (String, BTreeMap<String, String>) {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match SCHEMA.route(method, &segs) {
            Route::Found(e, vars) => (e.path.clone(), vars),
            Route::NoMethod => panic!("{method} {path}: no such method"),
            Route::NoPath => panic!("{method} {path}: no such path"),
        }
    }

    #[test]
    fn the_schema_has_every_endpoint_of_pve_9_1() {
        assert_eq!(SCHEMA.endpoints().len(), 667);
        let (path, vars) = found("POST", "/nodes/pve1/qemu/100/status/start");
        assert_eq!(path, "/nodes/{node}/qemu/{vmid}/status/start");
        assert_eq!(vars["node"], "pve1");
        assert_eq!(vars["vmid"], "100");
        assert_eq!(found("GET", "/version").0, "/version");
        assert_eq!(found("GET", "/cluster/nextid").0, "/cluster/nextid");
        // Literal segments win over variables (`/nodes/{node}/qemu` vs `/nodes/{node}/{x}`).
        assert_eq!(found("GET", "/nodes/pve1/lxc").0, "/nodes/{node}/lxc");
        let (path, vars) = found("DELETE", "/nodes/pve1/storage/local/content/local:iso/x.iso");
        assert_eq!(path, "/nodes/{node}/storage/{storage}/content/{volume}");
        assert_eq!(vars["volume"], "local:iso/x.iso");
        assert!(matches!(SCHEMA.route("PATCH", &["version"]), Route::NoMethod));
        assert!(matches!(SCHEMA.route("GET", &["nosuch"]), Route::NoPath));
        assert!(matches!(SCHEMA.route("GET", &["nodes", "pve1", "qemu", "100", "nosuch"]), Route::NoPath));
    }

    #[test]
    fn numbered_parameters_resolve_to_their_family() {
        let segs = ["nodes", "n", "qemu"];
        let Route::Found(e, _) = SCHEMA.route("POST", &segs) else { panic!() };
        assert!(e.parameter("net0").is_some());
        assert!(e.parameter("scsi12").is_some());
        assert!(e.parameter("memory").is_some());
        assert!(e.parameter("net").is_none());
        assert!(e.parameter("nosuch0").is_none());
        assert!(!e.allows_tokens() || e.permissions.is_some());
    }
}
