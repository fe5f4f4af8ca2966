//! Authentication (bearer tokens from `DATA_DIR/tokens.csv`) and authorisation with three
//! roles: `admin` (everything), `read-only` (get, list, watch) and `node` (reads, plus writes to
//! its own Hypervisor, its own Lease, Events, storage pool status, and the status of guests
//! bound to it).
//!
//! tokens.csv lines are `token,user,role[,node]`, the format of kube-apiserver's static token
//! file with the role where the groups would be. The file is re-read when it changes, so
//! `kpve token create` takes effect without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use crate::pki;
use crate::status::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
    Node(String),
}

impl Role {
    pub fn parse(role: &str, node: Option<&str>) -> Option<Role> {
        match (role, node) {
            ("admin", _) => Some(Role::Admin),
            ("read-only", _) => Some(Role::ReadOnly),
            ("node", Some(n)) if !n.is_empty() => Some(Role::Node(n.to_string())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub role: Role,
}

impl Identity {
    /// The identity the server's own background work (GC, namespace cleanup) acts as.
    pub fn system() -> Identity {
        Identity { user: "system:kpve-apiserver".into(), role: Role::Admin }
    }
}

#[derive(Debug, Default)]
struct Loaded {
    modified: Option<SystemTime>,
    tokens: HashMap<String, Identity>,
}

#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

fn parse_tokens(text: &str) -> HashMap<String, Identity> {
    let mut tokens = HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 3 {
            continue;
        }
        if let Some(role) = Role::parse(fields[2], fields.get(3).copied()) {
            tokens.insert(fields[0].to_string(), Identity { user: fields[1].to_string(), role });
        }
    }
    tokens
}

impl Tokens {
    pub fn open(dir: &Path) -> Tokens {
        let tokens = Tokens { path: dir.join(pki::TOKENS), loaded: RwLock::new(Loaded::default()) };
        tokens.reload();
        tokens
    }

    fn reload(&self) {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut loaded = self.loaded.write().expect("token lock");
        if loaded.modified == modified && modified.is_some() {
            return;
        }
        loaded.tokens = std::fs::read_to_string(&self.path).map(|t| parse_tokens(&t)).unwrap_or_default();
        loaded.modified = modified;
    }

    /// The identity of a bearer token; an unknown token re-reads the file once.
    pub fn authenticate(&self, token: &str) -> Option<Identity> {
        if let Some(id) = self.loaded.read().expect("token lock").tokens.get(token) {
            return Some(id.clone());
        }
        self.reload();
        self.loaded.read().expect("token lock").tokens.get(token).cloned()
    }

    /// Appends a new token for `user` with `role`; returns it.
    pub fn create(dir: &Path, user: &str, role: &Role) -> Result<String, pki::PkiError> {
        let path = dir.join(pki::TOKENS);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        let token = pki::random_token();
        let role = match role {
            Role::Admin => "admin".to_string(),
            Role::ReadOnly => "read-only".to_string(),
            Role::Node(n) => format!("node,{n}"),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{token},{user},{role}\n"));
        pki::write_file(&path, text.as_bytes(), 0o600)?;
        Ok(token)
    }

    /// The first token with the admin role (for the kubeconfig), if any.
    pub fn first_admin(dir: &Path) -> Option<(String, String)> {
        let text = std::fs::read_to_string(dir.join(pki::TOKENS)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            (f.len() >= 3 && f[2] == "admin").then(|| (f[0].to_string(), f[1].to_string()))
        })
    }
}

/// The verb of a request, as RBAC names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    pub fn is_read(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

/// What the request touches.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: Option<&'a str>,
    pub group: &'a str,
    pub plural: &'a str,
    pub name: Option<&'a str>,
    pub subresource: Option<&'a str>,
}

/// The outcome of the static check. Guest status writes by a node depend on the stored
/// object (`status.node`), so the write path finishes that check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed if the guest's current `status.node` (or `status.migration.target`) is this node.
    IfGuestBoundTo(String),
}

pub fn authorize(id: &Identity, verb: Verb, target: Target<'_>) -> Result<Decision, ApiError> {
    let deny = || {
        let mut what = target.plural.to_string();
        if !target.group.is_empty() {
            what = format!("{what}.{}", target.group);
        }
        if let Some(sub) = target.subresource {
            what = format!("{what}/{sub}");
        }
        ApiError::forbidden(format!(
            "{} \"{}\" is forbidden: User \"{}\" cannot {} resource \"{what}\"",
            what,
            target.name.unwrap_or(""),
            id.user,
            format!("{verb:?}").to_lowercase(),
        ))
    };
    match &id.role {
        Role::Admin => Ok(Decision::Allow),
        Role::ReadOnly if verb.is_read() => Ok(Decision::Allow),
        Role::ReadOnly => Err(deny()),
        Role::Node(_) if verb.is_read() => Ok(Decision::Allow),
        Role::Node(node) => {
            let own = target.name == Some(node.as_str());
            let allowed = match (target.group, target.plural) {
                ("kpve.io", "hypervisors") => own && verb != Verb::Delete && verb != Verb::DeleteCollection,
                // Node heartbeats live in kube-node-lease, as in Kubernetes.
                ("coordination.k8s.io", "leases") => {
                    own && verb != Verb::DeleteCollection && target.namespace == Some("kube-node-lease")
                }
                ("" | "events.k8s.io", "events") => matches!(verb, Verb::Create | Verb::Patch | Verb::Update),
                // Each node reports its own entry of a pool's per-node status (a list-map keyed
                // by node, so its server-side applies touch only that entry).
                ("kpve.io", "storagepools") => {
                    target.subresource == Some("status") && matches!(verb, Verb::Update | Verb::Patch)
                }
                ("kpve.io", "virtualmachines" | "linuxcontainers")
                    if target.subresource == Some("status") && matches!(verb, Verb::Update | Verb::Patch) =>
                {
                    return Ok(Decision::IfGuestBoundTo(node.clone()));
                }
                _ => false,
            };
            if allowed { Ok(Decision::Allow) } else { Err(deny()) }
        }
    }
}
