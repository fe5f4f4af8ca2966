//! Proxmox VE access control as resources (Proxmox `user.cfg`): `PVEUser` (with its API
//! tokens), `PVEGroup`, `PVERole` (custom roles; the built-in ones are in [`BUILTIN_ROLES`])
//! and `PVEACL` (roles granted on a Proxmox path). Secrets are stored hashed: passwords as
//! SHA-crypt (`$5$`/`$6$`, what `openssl passwd -5` prints and Proxmox's shadow.cfg holds),
//! token secrets as `sha256:<hex>`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Proxmox VE's privilege names (PVE 9).
pub const PRIVILEGES: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "Group.Allocate",
    "Mapping.Audit",
    "Mapping.Modify",
    "Mapping.Use",
    "Permissions.Modify",
    "Pool.Allocate",
    "Pool.Audit",
    "Realm.Allocate",
    "Realm.AllocateUser",
    "SDN.Allocate",
    "SDN.Audit",
    "SDN.Use",
    "Sys.AccessNetwork",
    "Sys.Audit",
    "Sys.Console",
    "Sys.Incoming",
    "Sys.Modify",
    "Sys.PowerMgmt",
    "Sys.Syslog",
    "User.Modify",
    "VM.Allocate",
    "VM.Audit",
    "VM.Backup",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.Console",
    "VM.GuestAgent.Audit",
    "VM.GuestAgent.FileRead",
    "VM.GuestAgent.FileSystemMgmt",
    "VM.GuestAgent.FileWrite",
    "VM.GuestAgent.Unrestricted",
    "VM.Migrate",
    "VM.PowerMgmt",
    "VM.Replicate",
    "VM.Snapshot",
    "VM.Snapshot.Rollback",
];

/// The built-in roles and their privileges (`*` = every privilege), as pve-access-control
/// builds them from its privilege groups (PVEAdmin lacks Mapping.Modify and the root-only
/// Sys.PowerMgmt/Modify/Incoming/AccessNetwork, Realm.Allocate, Permissions.Modify).
pub const BUILTIN_ROLES: &[(&str, &[&str])] = &[
    ("Administrator", &["*"]),
    ("NoAccess", &[]),
    (
        "PVEAdmin",
        &[
            "Datastore.Allocate",
            "Datastore.AllocateSpace",
            "Datastore.AllocateTemplate",
            "Datastore.Audit",
            "Group.Allocate",
            "Mapping.Audit",
            "Mapping.Use",
            "Pool.Allocate",
            "Pool.Audit",
            "Realm.AllocateUser",
            "SDN.Allocate",
            "SDN.Audit",
            "SDN.Use",
            "Sys.Audit",
            "Sys.Console",
            "Sys.Syslog",
            "User.Modify",
            "VM.Allocate",
            "VM.Audit",
            "VM.Backup",
            "VM.Clone",
            "VM.Config.CDROM",
            "VM.Config.CPU",
            "VM.Config.Cloudinit",
            "VM.Config.Disk",
            "VM.Config.HWType",
            "VM.Config.Memory",
            "VM.Config.Network",
            "VM.Config.Options",
            "VM.Console",
            "VM.GuestAgent.Audit",
            "VM.GuestAgent.FileRead",
            "VM.GuestAgent.FileSystemMgmt",
            "VM.GuestAgent.FileWrite",
            "VM.GuestAgent.Unrestricted",
            "VM.Migrate",
            "VM.PowerMgmt",
            "VM.Replicate",
            "VM.Snapshot",
            "VM.Snapshot.Rollback",
        ],
    ),
    (
        "PVEAuditor",
        &[
            "Datastore.Audit",
            "Mapping.Audit",
            "Pool.Audit",
            "SDN.Audit",
            "Sys.Audit",
            "VM.Audit",
            "VM.GuestAgent.Audit",
        ],
    ),
    (
        "PVEDatastoreAdmin",
        &["Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit"],
    ),
    ("PVEDatastoreUser", &["Datastore.AllocateSpace", "Datastore.Audit"]),
    ("PVEMappingAdmin", &["Mapping.Audit", "Mapping.Modify", "Mapping.Use"]),
    ("PVEMappingUser", &["Mapping.Audit", "Mapping.Use"]),
    ("PVEPoolAdmin", &["Pool.Allocate", "Pool.Audit"]),
    ("PVEPoolUser", &["Pool.Audit"]),
    ("PVESDNAdmin", &["SDN.Allocate", "SDN.Audit", "SDN.Use"]),
    ("PVESDNUser", &["SDN.Audit", "SDN.Use"]),
    ("PVESysAdmin", &["Sys.Audit", "Sys.Console", "Sys.Syslog"]),
    ("PVETemplateUser", &["VM.Audit", "VM.Clone"]),
    ("PVEUserAdmin", &["Group.Allocate", "Realm.AllocateUser", "User.Modify"]),
    (
        "PVEVMAdmin",
        &[
            "VM.Allocate",
            "VM.Audit",
            "VM.Backup",
            "VM.Clone",
            "VM.Config.CDROM",
            "VM.Config.CPU",
            "VM.Config.Cloudinit",
            "VM.Config.Disk",
            "VM.Config.HWType",
            "VM.Config.Memory",
            "VM.Config.Network",
            "VM.Config.Options",
            "VM.Console",
            "VM.GuestAgent.Audit",
            "VM.GuestAgent.FileRead",
            "VM.GuestAgent.FileSystemMgmt",
            "VM.GuestAgent.FileWrite",
            "VM.GuestAgent.Unrestricted",
            "VM.Migrate",
            "VM.PowerMgmt",
            "VM.Replicate",
            "VM.Snapshot",
            "VM.Snapshot.Rollback",
        ],
    ),
    (
        "PVEVMUser",
        &[
            "VM.Audit",
            "VM.Backup",
            "VM.Config.CDROM",
            "VM.Config.Cloudinit",
            "VM.Console",
            "VM.GuestAgent.Audit",
            "VM.GuestAgent.FileRead",
            "VM.GuestAgent.FileSystemMgmt",
            "VM.GuestAgent.FileWrite",
            "VM.PowerMgmt",
        ],
    ),
];

/// A Proxmox user id `name@realm`.
pub const USERID_PATTERN: &str = r"^[^\s:/@]+@[A-Za-z][A-Za-z0-9.\-_]+$";
/// A token's id (the part after `!`), a group id, a role id.
pub const TOKEN_PATTERN: &str = r"^[A-Za-z][A-Za-z0-9.\-_]+$";
pub const ID_PATTERN: &str = r"^[A-Za-z0-9.\-_]+$";

/// A user of realm `pve` (password below) or of another realm (`pam` users other than
/// root@pam cannot log in: kpve has no PAM; they may still own API tokens).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "PVEUser",
    plural = "pveusers",
    singular = "pveuser",
    category = "kpve",
    doc = "A Proxmox VE user and its API tokens (user.cfg `user:` and `token:` lines)",
    printcolumn(name = "UserID", type_ = "string", json_path = ".spec.userid"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enable"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PVEUserSpec {
    /// `name@realm`, e.g. `alice@pve`.
    #[schemars(regex(pattern = r"^[^\s:/@]+@[A-Za-z][A-Za-z0-9.\-_]+$"))]
    pub userid: String,
    #[serde(default = "yes")]
    pub enable: bool,
    /// Expiry as seconds since the epoch; 0 never expires.
    #[serde(default)]
    pub expire: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firstname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lastname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Group ids the user belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// SHA-crypt hash of the password (`openssl passwd -5`), realm `pve` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub tokens: Vec<PVEToken>,
}

fn yes() -> bool {
    true
}

/// An API token `userid!id`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PVEToken {
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9.\-_]+$"))]
    pub id: String,
    /// Privilege separation: the token has only what ACLs grant the token itself (and the
    /// user also has); without it, exactly the user's privileges.
    #[serde(default = "yes")]
    pub privsep: bool,
    #[serde(default)]
    pub expire: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// `sha256:<hex>` of the secret.
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub secret_hash: String,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "PVEGroup",
    plural = "pvegroups",
    singular = "pvegroup",
    category = "kpve",
    doc = "A Proxmox VE group (members are listed in each PVEUser's groups)",
    printcolumn(name = "GroupID", type_ = "string", json_path = ".spec.groupid")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PVEGroupSpec {
    #[schemars(regex(pattern = r"^[A-Za-z0-9.\-_]+$"))]
    pub groupid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "PVERole",
    plural = "pveroles",
    singular = "pverole",
    category = "kpve",
    doc = "A custom Proxmox VE role: a named set of privileges",
    printcolumn(name = "RoleID", type_ = "string", json_path = ".spec.roleid")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PVERoleSpec {
    #[schemars(regex(pattern = r"^[A-Za-z0-9.\-_]+$"))]
    pub roleid: String,
    #[serde(default)]
    pub privs: Vec<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kpve.io",
    version = "v1alpha1",
    kind = "PVEACL",
    plural = "pveacls",
    singular = "pveacl",
    category = "kpve",
    doc = "Roles granted to users, groups and API tokens on a Proxmox path (user.cfg `acl:`)",
    printcolumn(name = "Path", type_ = "string", json_path = ".spec.path"),
    printcolumn(name = "Roles", type_ = "string", json_path = ".spec.roles"),
    printcolumn(name = "Propagate", type_ = "boolean", json_path = ".spec.propagate")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PVEACLSpec {
    /// `/`, `/vms/{vmid}`, `/storage/{id}`, `/nodes/{node}`, `/pool/{name}`, `/access/…`, …
    #[schemars(regex(pattern = r"^/[^\s]*$"))]
    pub path: String,
    /// Also applies below `path`.
    #[serde(default = "yes")]
    pub propagate: bool,
    #[schemars(length(min = 1))]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Token ids `user@realm!id`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<String>,
}

/// Kinds checked by [`check_object`].
pub const KINDS: &[&str] = &["PVEUser", "PVEGroup", "PVERole", "PVEACL"];

/// Checks the schema cannot express: privilege names, ACL paths, token ids, password hash
/// form. Returns (field path, message) pairs.
pub fn check_object(kind: &str, object: &serde_json::Value) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let Some(spec) = object.get("spec") else { return errors };
    let strings = |key: &str| -> Vec<String> {
        spec.get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    match kind {
        "PVERole" => {
            let roleid = spec.get("roleid").and_then(|v| v.as_str()).unwrap_or("");
            if BUILTIN_ROLES.iter().any(|(r, _)| *r == roleid) {
                errors.push((
                    "spec.roleid".into(),
                    format!("\"{roleid}\": a built-in role cannot be redefined"),
                ));
            }
            for (i, p) in strings("privs").iter().enumerate() {
                if !PRIVILEGES.contains(&p.as_str()) {
                    errors.push((format!("spec.privs[{i}]"), format!("\"{p}\": not a Proxmox VE privilege")));
                }
            }
        }
        "PVEACL" => {
            let path = spec.get("path").and_then(|v| v.as_str()).unwrap_or("");
            if let Err(e) = check_acl_path(path) {
                errors.push(("spec.path".into(), format!("\"{path}\": {e}")));
            }
            for (i, t) in strings("tokens").iter().enumerate() {
                if !t.contains('!') {
                    errors.push((
                        format!("spec.tokens[{i}]"),
                        format!("\"{t}\": a token id is user@realm!tokenid"),
                    ));
                }
            }
            if strings("users").is_empty() && strings("groups").is_empty() && strings("tokens").is_empty() {
                errors.push((
                    "spec.users".into(),
                    "Required value: at least one of users, groups, tokens".into(),
                ));
            }
        }
        "PVEUser" => {
            if let Some(h) = spec.get("passwordHash").and_then(|v| v.as_str())
                && !(h.starts_with("$5$") || h.starts_with("$6$"))
            {
                errors.push((
                    "spec.passwordHash".into(),
                    "a SHA-crypt hash ($5$… or $6$…, as `openssl passwd -5` prints)".into(),
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for (i, t) in spec.get("tokens").and_then(|v| v.as_array()).into_iter().flatten().enumerate() {
                let id = t.get("id").and_then(|v| v.as_str()).unwrap_or("");
                if !seen.insert(id.to_string()) {
                    errors.push((format!("spec.tokens[{i}].id"), format!("Duplicate value: \"{id}\"")));
                }
            }
        }
        _ => {}
    }
    errors
}

/// The ACL paths Proxmox knows (`check_path`).
pub fn check_acl_path(path: &str) -> Result<(), String> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let ok = matches!(
        segs.as_slice(),
        [] | [""]
            | ["vms" | "nodes" | "storage" | "pool" | "access" | "sdn" | "mapping"]
            | ["vms" | "nodes" | "storage", _]
            | ["pool" | "sdn" | "mapping", ..]
            | ["access", "groups" | "realm"]
            | ["access", "groups" | "realm", _]
    );
    if ok { Ok(()) } else { Err("invalid ACL path".into()) }
}
