//! Access control as Proxmox VE evaluates it (pve-access-control's `roles`/`permissions` and
//! `check_api2_permissions`), over the `PVEUser`/`PVEGroup`/`PVERole`/`PVEACL` resources held
//! in watch-driven caches:
//!
//! - the ACL tree is walked from `/` to the path; at each level the token's own entries, else
//!   the user's, else the union of the user's groups' entries replace what the levels above
//!   gave (an entry counts on its own path, and below it when it propagates); `NoAccess` wins;
//! - guests in a pool (kpve: the namespace) also get the roles of `/pool/<namespace>`;
//! - root@pam has every privilege; a token without privilege separation has its user's
//!   privileges, one with separation only those its own ACLs grant that the user also has;
//! - the schema's `permissions` (`user: all|world`, `check: [perm|perm-modify|userid-param|
//!   userid-group|and|or, …]`, none = root@pam only) decide every request before its handler.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kpve_crds::access::{BUILTIN_ROLES, PRIVILEGES};
use kpve_crds::{PVEACL, PVEGroup, PVERole, PVEUser};
use kube::runtime::reflector::Store;
use serde_json::Value;

use crate::cache;
use sha2::Digest;

use crate::envelope::PveError;

pub const ROOT: &str = "root@pam";

/// A set of privileges, one bit per entry of [`PRIVILEGES`].
pub type Privs = u64;
pub const ALL: Privs = (1u64 << PRIVILEGES.len() as u32) - 1;

pub fn privilege_bit(name: &str) -> Option<Privs> {
    PRIVILEGES.iter().position(|p| *p == name).map(|i| 1u64 << i)
}

pub fn privilege_names(privs: Privs) -> impl Iterator<Item = &'static str> {
    PRIVILEGES.iter().enumerate().filter(move |(i, _)| privs & (1u64 << i) != 0).map(|(_, p)| *p)
}

fn privs_of(names: &[impl AsRef<str>]) -> Privs {
    names
        .iter()
        .map(|n| if n.as_ref() == "*" { ALL } else { privilege_bit(n.as_ref()).unwrap_or(0) })
        .fold(0, |a, b| a | b)
}

/// Who makes a request: a user, or one of its API tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub token: Option<String>,
}

impl Principal {
    pub fn user(user: &str) -> Principal {
        Principal { user: user.to_string(), token: None }
    }

    /// `user@realm` or `user@realm!token` (task owners, ACL token entries).
    pub fn id(&self) -> String {
        match &self.token {
            Some(t) => format!("{}!{t}", self.user),
            None => self.user.clone(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.user == ROOT && self.token.is_none()
    }
}

/// `sha256:<hex>` of a token secret.
pub fn token_hash(secret: &str) -> String {
    let digest = sha2::Sha256::digest(secret.as_bytes());
    format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// A snapshot and the watches' change count it was built at.
type Built = (u64, Arc<Access>);

/// Watch-driven caches of the access-control resources.
#[derive(Clone)]
pub struct AccessStore {
    pub users: Store<PVEUser>,
    pub groups: Store<PVEGroup>,
    pub roles: Store<PVERole>,
    pub acls: Store<PVEACL>,
    health: Vec<cache::Health>,
    /// The last snapshot and the watches' change count it was built at.
    built: Arc<Mutex<Option<Built>>>,
}

impl AccessStore {
    /// Starts the watches and waits until every cache has its first list.
    pub async fn start(client: &kube::Client) -> anyhow::Result<AccessStore> {
        let (users, h1) = cache::watch(client);
        let (groups, h2) = cache::watch(client);
        let (roles, h3) = cache::watch(client);
        let (acls, h4) = cache::watch(client);
        let store = AccessStore {
            users,
            groups,
            roles,
            acls,
            health: vec![h1, h2, h3, h4],
            built: Default::default(),
        };
        let ready = async {
            store.users.wait_until_ready().await?;
            store.groups.wait_until_ready().await?;
            store.roles.wait_until_ready().await?;
            store.acls.wait_until_ready().await
        };
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .map_err(|_| anyhow::anyhow!("access-control caches did not fill within 30 s"))??;
        Ok(store)
    }

    /// Every access-control watch is following its resources (no error since its last
    /// delivery): decisions for users other than root@pam need this.
    pub fn current(&self) -> bool {
        self.health.iter().all(cache::Health::current)
    }

    pub fn user(&self, userid: &str) -> Option<std::sync::Arc<PVEUser>> {
        self.users.state().into_iter().find(|u| u.spec.userid == userid)
    }

    /// A consistent view for one request: built again only after the resources changed.
    pub fn snapshot(&self) -> Arc<Access> {
        let changes: u64 = self.health.iter().map(cache::Health::changes).sum();
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, access)) = built.as_ref()
            && *at == changes
        {
            return access.clone();
        }
        let access = Arc::new(self.build());
        *built = Some((changes, access.clone()));
        access
    }

    fn build(&self) -> Access {
        let mut access = Access::default();
        for (name, privs) in BUILTIN_ROLES {
            access.roles.insert(name.to_string(), privs_of(privs));
        }
        for role in self.roles.state() {
            access.roles.entry(role.spec.roleid.clone()).or_insert_with(|| privs_of(&role.spec.privs));
        }
        for user in self.users.state() {
            access.users.insert(user.spec.userid.clone());
            for g in &user.spec.groups {
                access.members.entry(g.clone()).or_default().insert(user.spec.userid.clone());
            }
            for t in &user.spec.tokens {
                access.tokens.insert(format!("{}!{}", user.spec.userid, t.id), t.privsep);
            }
        }
        for acl in self.acls.state() {
            let s = &acl.spec;
            let path = normalize(&s.path);
            let level = access.acl.entry(path).or_default();
            for role in &s.roles {
                let mut add = |kind: Subject, who: &String| {
                    level.push(Entry {
                        subject: kind,
                        who: who.clone(),
                        role: role.clone(),
                        propagate: s.propagate,
                    });
                };
                s.users.iter().for_each(|u| add(Subject::User, u));
                s.groups.iter().for_each(|g| add(Subject::Group, g));
                s.tokens.iter().for_each(|t| add(Subject::Token, t));
            }
        }
        access
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    User,
    Group,
    Token,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub subject: Subject,
    pub who: String,
    pub role: String,
    pub propagate: bool,
}

/// The access configuration at one moment.
#[derive(Default)]
pub struct Access {
    /// Role → privileges (built-in and custom).
    pub roles: BTreeMap<String, Privs>,
    /// Group → member user ids.
    pub members: BTreeMap<String, BTreeSet<String>>,
    /// Token id (`user@realm!id`) → privilege separation.
    pub tokens: BTreeMap<String, bool>,
    /// Every user id with a PVEUser.
    pub users: BTreeSet<String>,
    /// Normalized path → entries.
    pub acl: BTreeMap<String, Vec<Entry>>,
}

/// Proxmox's `normalize_path`: one leading `/`, no repeated or trailing `/`.
pub fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

impl Access {
    /// The roles `who` (a user id, or a token id with privilege separation) has on `path`.
    fn roles(&self, who: &str, is_token: bool, path: &str) -> BTreeSet<String> {
        let path = normalize(path);
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut result = BTreeSet::new();
        for depth in 0..=parts.len() {
            let prefix = format!("/{}", parts[..depth].join("/"));
            let last = depth == parts.len();
            let Some(entries) = self.acl.get(&prefix) else { continue };
            let applies = |e: &&Entry| last || e.propagate;
            let pick = |subject: Subject| -> BTreeSet<String> {
                entries
                    .iter()
                    .filter(applies)
                    .filter(|e| e.subject == subject && e.who == who)
                    .map(|e| e.role.clone())
                    .collect()
            };
            if is_token {
                let own = pick(Subject::Token);
                if !own.is_empty() {
                    result = own;
                }
                continue;
            }
            let own = pick(Subject::User);
            if !own.is_empty() {
                result = own;
                continue;
            }
            let groups: BTreeSet<String> = entries
                .iter()
                .filter(applies)
                .filter(|e| {
                    e.subject == Subject::Group && self.members.get(&e.who).is_some_and(|m| m.contains(who))
                })
                .map(|e| e.role.clone())
                .collect();
            if !groups.is_empty() {
                result = groups;
            }
        }
        if result.contains("NoAccess") {
            return BTreeSet::from(["NoAccess".to_string()]);
        }
        result
    }

    /// Privileges of a user or separated token on `path`, with pool roles for guests.
    fn compile(&self, who: &str, is_token: bool, path: &str, pool: Option<&str>) -> Privs {
        let mut roles = self.roles(who, is_token, path);
        if let Some(pool) = pool
            && !roles.contains("NoAccess")
        {
            let pool_roles = self.roles(who, is_token, &format!("/pool/{pool}"));
            if pool_roles.contains("NoAccess") {
                roles = BTreeSet::from(["NoAccess".to_string()]);
            } else {
                roles.extend(pool_roles);
            }
        }
        roles.iter().map(|r| self.roles.get(r).copied().unwrap_or(0)).fold(0, |a, b| a | b)
    }

    /// What `p` may do on `path`; `pool` is the pool (namespace) of the guest or storage the
    /// path names, if any.
    pub fn privileges(&self, p: &Principal, path: &str, pool: Option<&str>) -> Privs {
        if p.is_root() {
            return ALL;
        }
        let user = if p.user == ROOT { ALL } else { self.compile(&p.user, false, path, pool) };
        if p.token.is_none() {
            return user;
        }
        let id = p.id();
        match self.tokens.get(&id) {
            None => 0,
            Some(false) => user,
            Some(true) => {
                let own = self.compile(&id, true, path, pool);
                if p.user == ROOT { own } else { own & user }
            }
        }
    }
}

/// Evaluates an endpoint's `permissions` for `p` with the request's parameters.
pub struct Checker<'a> {
    pub access: &'a Access,
    pub principal: &'a Principal,
    pub params: &'a BTreeMap<String, String>,
    /// VMID → pool (namespace) of existing guests.
    pub pools: &'a (dyn Fn(&str) -> Option<String> + Sync),
}

fn denied(what: &str) -> PveError {
    if what.is_empty() {
        PveError::new(403, "Permission check failed")
    } else {
        PveError::new(403, format!("Permission check failed ({what})"))
    }
}

impl Checker<'_> {
    pub fn has(&self, path: &str, privs: Privs) -> bool {
        self.privs(path) & privs == privs
    }

    pub fn privs(&self, path: &str) -> Privs {
        let path = normalize(path);
        let pool = path.strip_prefix("/vms/").and_then(|v| (self.pools)(v));
        self.access.privileges(self.principal, &path, pool.as_deref())
    }

    /// The schema's `permissions` object.
    pub fn check(&self, permissions: Option<&Value>) -> Result<(), PveError> {
        if self.principal.is_root() {
            return Ok(());
        }
        let Some(perm) = permissions else { return Err(denied("user != root@pam")) };
        if perm.get("user").and_then(Value::as_str) == Some("all") {
            return Ok(());
        }
        match perm.get("check") {
            Some(check) => self.exec(check, false).map(|_| ()),
            None => Err(denied("")),
        }
    }

    fn fill(&self, template: &str) -> String {
        let mut out = String::new();
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let Some(end) = rest[start..].find('}') else { break };
            let name = &rest[start + 1..start + end];
            // Perl's truthiness: an empty value and "0" become `-`.
            let value =
                self.params.get(name).filter(|v| !v.is_empty() && *v != "0").map_or("-", String::as_str);
            out.push_str(value);
            rest = &rest[start + end + 1..];
        }
        out.push_str(rest);
        normalize(&out)
    }

    /// One check term; with `noerr`, a failure is `Ok(false)`.
    fn exec(&self, check: &Value, noerr: bool) -> Result<bool, PveError> {
        let Some(items) = check.as_array() else {
            return Err(PveError::new(500, "no permission test specified"));
        };
        let fail = |e: PveError| if noerr { Ok(false) } else { Err(e) };
        match items.first().and_then(Value::as_str) {
            Some("and") => {
                for sub in &items[1..] {
                    if !self.exec(sub, noerr)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Some("or") => {
                for sub in &items[1..] {
                    if self.exec(sub, true)? {
                        return Ok(true);
                    }
                }
                fail(denied(""))
            }
            Some("perm") => {
                let path = self.fill(items.get(1).and_then(Value::as_str).unwrap_or("/"));
                let names: Vec<&str> = items
                    .get(2)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let options: BTreeMap<&str, &Value> = items[3.min(items.len())..]
                    .chunks(2)
                    .filter_map(|c| Some((c[0].as_str()?, c.get(1)?)))
                    .collect();
                if let Some(Value::String(required)) = options.get("require_param")
                    && !self.params.contains_key(required)
                {
                    return fail(denied(""));
                }
                let any =
                    options.get("any").is_some_and(|v| v.as_i64() == Some(1) || v.as_bool() == Some(true));
                let have = self.privs(&path);
                if any {
                    if names.iter().any(|n| privilege_bit(n).is_some_and(|b| have & b != 0)) {
                        return Ok(true);
                    }
                    return fail(denied(&format!("{path}, {}", names.join("|"))));
                }
                for n in &names {
                    if privilege_bit(n).is_none_or(|b| have & b == 0) {
                        return fail(denied(&format!("{path}, {n}")));
                    }
                }
                Ok(true)
            }
            Some("perm-modify") => {
                let path = self.fill(items.get(1).and_then(Value::as_str).unwrap_or("/access"));
                let mut names = vec!["Permissions.Modify"];
                if path.starts_with("/storage/") {
                    names.push("Datastore.Allocate");
                } else if path.starts_with("/vms/") {
                    names.push("VM.Allocate");
                } else if path.starts_with("/pool/") {
                    names.push("Pool.Allocate");
                }
                let have = self.privs(&path);
                if names.iter().any(|n| privilege_bit(n).is_some_and(|b| have & b != 0)) {
                    return Ok(true);
                }
                fail(denied(&format!("{path}, {}", names.join("|"))))
            }
            Some("userid-param") => {
                let userid = self.params.get("userid").cloned().unwrap_or_default();
                match items.get(1).and_then(Value::as_str) {
                    Some("self") => {
                        if userid == self.principal.user && self.principal.token.is_none() {
                            Ok(true)
                        } else {
                            fail(denied(""))
                        }
                    }
                    Some(privilege) => {
                        let realm = userid.rsplit_once('@').map_or("", |(_, r)| r);
                        let path = format!("/access/realm/{realm}");
                        if privilege_bit(privilege).is_some_and(|b| self.has(&path, b)) {
                            Ok(true)
                        } else {
                            fail(denied(&format!("{path}, {privilege}")))
                        }
                    }
                    None => Err(PveError::new(500, "unknown userid-param test")),
                }
            }
            Some("userid-group") => {
                let names: Vec<&str> = items
                    .get(1)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let options: BTreeMap<&str, &str> = items[2.min(items.len())..]
                    .chunks(2)
                    .filter_map(|c| Some((c[0].as_str()?, c.get(1)?.as_str()?)))
                    .collect();
                let groups_param = options.contains_key("groups_param");
                let userid = self.params.get("userid").cloned().unwrap_or_default();
                if !groups_param && userid != ROOT && !self.access.users.contains(&userid) {
                    return fail(PveError::new(500, format!("no such user ('{userid}')")));
                }
                let wanted = privs_of(&names);
                let any_on = |path: &str| self.privs(path) & wanted != 0;
                if any_on("/access/groups") {
                    return Ok(true);
                }
                let what = names.join("|");
                if groups_param {
                    // Group administrators may only place users into groups they administer
                    // (this check raises even under `or`, as Proxmox's does).
                    let groups: Vec<String> = self
                        .params
                        .get("groups")
                        .map(|g| crate::validate::split_list(g).map(str::to_string).collect())
                        .unwrap_or_default();
                    if groups.is_empty() {
                        return Err(denied(&format!("/access/groups, {what}")));
                    }
                    for g in groups {
                        if !any_on(&format!("/access/groups/{g}")) {
                            return Err(denied(&format!("/access/groups/{g}, {what}")));
                        }
                    }
                    return Ok(true);
                }
                // Otherwise the user must be in a group the caller administers.
                let allowed = self
                    .access
                    .members
                    .iter()
                    .any(|(g, m)| m.contains(&userid) && any_on(&format!("/access/groups/{g}")));
                if allowed { Ok(true) } else { fail(denied("")) }
            }
            _ => Err(PveError::new(500, "unknown permission test")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(subject: Subject, who: &str, role: &str, propagate: bool) -> Entry {
        Entry { subject, who: who.into(), role: role.into(), propagate }
    }

    fn access() -> Access {
        let mut a = Access::default();
        for (name, privs) in BUILTIN_ROLES {
            a.roles.insert(name.to_string(), privs_of(privs));
        }
        a.members.insert("ops".into(), BTreeSet::from(["alice@pve".to_string(), "bob@pve".to_string()]));
        a.tokens.insert("alice@pve!ci".into(), true);
        a.tokens.insert("alice@pve!full".into(), false);
        a.acl.insert("/".into(), vec![entry(Subject::Group, "ops", "PVEAuditor", true)]);
        a.acl.insert(
            "/vms".into(),
            vec![
                entry(Subject::User, "alice@pve", "PVEVMAdmin", true),
                entry(Subject::User, "bob@pve", "NoAccess", false),
            ],
        );
        a.acl.insert(
            "/vms/100".into(),
            vec![
                entry(Subject::Token, "alice@pve!ci", "PVEVMUser", false),
                entry(Subject::Group, "ops", "PVEVMUser", false),
            ],
        );
        a.acl.insert("/pool/team".into(), vec![entry(Subject::User, "carol@pve", "PVEVMAdmin", true)]);
        a
    }

    fn has(a: &Access, p: &Principal, path: &str, privilege: &str, pool: Option<&str>) -> bool {
        a.privileges(p, path, pool) & privilege_bit(privilege).unwrap() != 0
    }

    #[test]
    fn deeper_levels_replace_and_users_beat_groups() {
        let a = access();
        let alice = Principal::user("alice@pve");
        let bob = Principal::user("bob@pve");
        assert!(has(&a, &alice, "/", "Sys.Audit", None));
        assert!(has(&a, &alice, "/vms/200", "VM.Config.Memory", None), "propagated from /vms");
        // /vms/100 has a group entry for ops: it replaces alice's PVEVMAdmin from /vms.
        assert!(!has(&a, &alice, "/vms/100", "VM.Config.Memory", None));
        assert!(has(&a, &alice, "/vms/100", "VM.PowerMgmt", None));
        // NoAccess on /vms does not propagate, so bob keeps his group's auditor role below.
        assert!(!has(&a, &bob, "/vms", "VM.Audit", None));
        assert!(has(&a, &bob, "/vms/200", "VM.Audit", None));
        assert!(!has(&a, &Principal::user("nobody@pve"), "/", "Sys.Audit", None));
        assert_eq!(a.privileges(&Principal::user(ROOT), "/anything", None), ALL);
    }

    #[test]
    fn tokens_are_separated_unless_told_otherwise() {
        let a = access();
        let ci = Principal { user: "alice@pve".into(), token: Some("ci".into()) };
        assert!(has(&a, &ci, "/vms/100", "VM.PowerMgmt", None));
        assert!(!has(&a, &ci, "/vms/100", "VM.Config.Memory", None));
        assert!(!has(&a, &ci, "/vms/200", "VM.Audit", None), "the token has no ACL there");
        let full = Principal { user: "alice@pve".into(), token: Some("full".into()) };
        assert!(has(&a, &full, "/vms/200", "VM.Config.Memory", None));
        let unknown = Principal { user: "alice@pve".into(), token: Some("gone".into()) };
        assert_eq!(a.privileges(&unknown, "/", None), 0);
    }

    #[test]
    fn pool_roles_reach_member_guests() {
        let a = access();
        let carol = Principal::user("carol@pve");
        assert!(has(&a, &carol, "/vms/300", "VM.PowerMgmt", Some("team")));
        assert!(!has(&a, &carol, "/vms/300", "VM.PowerMgmt", Some("other")));
    }

    #[test]
    fn schema_checks_name_the_path_and_privilege() {
        let a = access();
        let ci = Principal { user: "alice@pve".into(), token: Some("ci".into()) };
        let params: BTreeMap<String, String> = [("vmid".to_string(), "100".to_string())].into();
        let pools = |_: &str| None;
        let c = Checker { access: &a, principal: &ci, params: &params, pools: &pools };
        let start = serde_json::json!({"check": ["perm", "/vms/{vmid}", ["VM.PowerMgmt"]]});
        assert!(c.check(Some(&start)).is_ok());
        let config = serde_json::json!({"check": ["perm", "/vms/{vmid}", ["VM.Config.Memory", "VM.Config.CPU"], "any", 1]});
        let e = c.check(Some(&config)).unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (403, "Permission check failed (/vms/100, VM.Config.Memory|VM.Config.CPU)")
        );
        let e = c.check(None).unwrap_err();
        assert_eq!(e.message, "Permission check failed (user != root@pam)");
        assert!(c.check(Some(&serde_json::json!({"user": "all"}))).is_ok());
    }
}
