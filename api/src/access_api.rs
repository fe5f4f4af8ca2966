//! `/access/…`: users (with API tokens), groups, roles, ACLs, passwords and permissions. Every
//! write is a change to a `PVEUser`/`PVEGroup`/`PVERole`/`PVEACL` resource (named after the
//! Proxmox id), and waits until the cache shows it, so the next request sees the change.

use std::collections::{BTreeMap, BTreeSet};

use kpve_crds::access::{BUILTIN_ROLES, PVEToken};
use kpve_crds::{PVEACL, PVEACLSpec, PVEGroup, PVEGroupSpec, PVERole, PVERoleSpec, PVEUser, PVEUserSpec};
use kube::Resource;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use sha2::Digest;

use crate::access::{self, AccessStore, Checker, ROOT, privilege_names};
use crate::auth::hash_password;
use crate::cache;
use crate::envelope::PveError;
use crate::validate::split_list;

type Params = BTreeMap<String, String>;

fn param_error(name: &str, message: impl Into<String>) -> PveError {
    PveError::parameters(BTreeMap::from([(name.to_string(), message.into())]))
}

fn write_error(e: kube::Error) -> PveError {
    match e {
        kube::Error::Api(ae) if ae.code == 422 || ae.code == 409 => PveError::new(400, ae.message),
        e => PveError::new(500, e.to_string()),
    }
}

fn hex8(s: &str) -> String {
    sha2::Sha256::digest(s.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// A resource name for a Proxmox id: `alice@pve` → `alice.pve`; ids that do not map
/// one-to-one (capitals, `_`, …) get a hash suffix.
pub fn object_name(id: &str) -> String {
    let mapped: String = id
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '.' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            '@' => '.',
            _ => '-',
        })
        .collect();
    let trimmed = mapped.trim_matches(['-', '.']).to_string();
    if trimmed == id.replace('@', ".") && !trimmed.is_empty() && trimmed.len() <= 200 {
        trimmed
    } else {
        format!("{}-{}", &trimmed[..trimmed.len().min(200)], hex8(id)).trim_start_matches('-').to_string()
    }
}

fn flag(params: &Params, key: &str) -> Option<bool> {
    params.get(key).map(|v| v == "1")
}

fn int(params: &Params, key: &str) -> Option<i64> {
    params.get(key).and_then(|v| v.parse().ok())
}

fn text(params: &Params, key: &str) -> Option<String> {
    params.get(key).filter(|v| !v.is_empty()).cloned()
}

fn list(params: &Params, key: &str) -> Vec<String> {
    params.get(key).map(|v| split_list(v).map(str::to_string).collect()).unwrap_or_default()
}

fn created_version<K: Resource>(o: &K) -> Option<String> {
    o.meta().resource_version.clone()
}

/// The user `userid`, or Proxmox's "no such user".
fn user(store: &AccessStore, userid: &str) -> Result<std::sync::Arc<PVEUser>, PveError> {
    store.user(userid).ok_or_else(|| PveError::new(500, format!("no such user ('{userid}')")))
}

async fn replace_user(client: &kube::Client, store: &AccessStore, u: &PVEUser) -> Result<(), PveError> {
    let api: Api<PVEUser> = Api::all(client.clone());
    let name = u.meta().name.clone().unwrap_or_default();
    let mut u = u.clone();
    u.metadata.managed_fields = None;
    let saved = api.replace(&name, &PostParams::default(), &u).await.map_err(write_error)?;
    cache::settle(&store.users, None, &name, created_version(&saved).as_deref()).await;
    Ok(())
}

/// May the caller see or administer `userid` (User.Modify or Sys.Audit on /access/groups or
/// on one of the user's groups)? Everyone sees themselves.
fn may_see_user(c: &Checker, userid: &str, groups: &[String]) -> bool {
    if userid == c.principal.user {
        return true;
    }
    let wanted =
        access::privilege_bit("User.Modify").unwrap_or(0) | access::privilege_bit("Sys.Audit").unwrap_or(0);
    c.privs("/access/groups") & wanted != 0
        || groups.iter().any(|g| c.privs(&format!("/access/groups/{g}")) & wanted != 0)
}

fn token_entry(t: &PVEToken) -> Value {
    let mut e = json!({"tokenid": t.id, "privsep": u8::from(t.privsep), "expire": t.expire});
    if let Some(c) = &t.comment {
        e["comment"] = json!(c);
    }
    e
}

fn user_fields(spec: &PVEUserSpec, e: &mut Value) {
    for (k, v) in [
        ("firstname", &spec.firstname),
        ("lastname", &spec.lastname),
        ("email", &spec.email),
        ("comment", &spec.comment),
    ] {
        if let Some(v) = v {
            e[k] = json!(v);
        }
    }
}

/// `GET /access/users`.
pub fn users(store: &AccessStore, c: &Checker) -> Value {
    let full = flag(c.params, "full").unwrap_or(false);
    let enabled = flag(c.params, "enabled");
    let mut out = Vec::new();
    if enabled != Some(false) && store.user(ROOT).is_none() && may_see_user(c, ROOT, &[]) {
        out.push(json!({"userid": ROOT, "enable": 1, "expire": 0, "realm-type": "pam", "tokens": []}));
    }
    let mut all: Vec<_> = store.users.state();
    all.sort_by(|a, b| a.spec.userid.cmp(&b.spec.userid));
    for u in all {
        let s = &u.spec;
        if enabled.is_some_and(|e| e != s.enable) || !may_see_user(c, &s.userid, &s.groups) {
            continue;
        }
        let realm = s.userid.rsplit_once('@').map_or("", |(_, r)| r);
        let mut e = json!({"userid": s.userid, "enable": u8::from(s.enable), "expire": s.expire,
                           "realm-type": realm, "groups": s.groups.join(",")});
        user_fields(s, &mut e);
        if full {
            e["tokens"] = Value::Array(s.tokens.iter().map(token_entry).collect());
        }
        out.push(e);
    }
    if !full {
        for e in &mut out {
            if let Some(o) = e.as_object_mut() {
                o.remove("tokens");
            }
        }
    }
    Value::Array(out)
}

/// `GET /access/users/{userid}`.
pub fn user_get(store: &AccessStore, c: &Checker) -> Result<Value, PveError> {
    let userid = &c.params["userid"];
    if userid == ROOT && store.user(ROOT).is_none() {
        return Ok(json!({"enable": 1, "expire": 0, "groups": [], "tokens": {}}));
    }
    let u = user(store, userid)?;
    let s = &u.spec;
    let tokens: serde_json::Map<String, Value> = s
        .tokens
        .iter()
        .map(|t| {
            let mut e = token_entry(t);
            e.as_object_mut().map(|o| o.remove("tokenid"));
            (t.id.clone(), e)
        })
        .collect();
    let mut e =
        json!({"enable": u8::from(s.enable), "expire": s.expire, "groups": s.groups, "tokens": tokens});
    user_fields(s, &mut e);
    Ok(e)
}

fn check_groups_exist(store: &AccessStore, groups: &[String]) -> Result<(), PveError> {
    let known: BTreeSet<String> = store.groups.state().iter().map(|g| g.spec.groupid.clone()).collect();
    match groups.iter().find(|g| !known.contains(*g)) {
        Some(g) => Err(PveError::new(500, format!("no such group '{g}'"))),
        None => Ok(()),
    }
}

/// `POST /access/users`.
pub async fn user_create(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let userid = params["userid"].clone();
    if userid == ROOT || store.user(&userid).is_some() {
        return Err(PveError::new(500, format!("create user failed: user '{userid}' already exists")));
    }
    let realm = userid.rsplit_once('@').map_or("", |(_, r)| r);
    if !["pve", "pam"].contains(&realm) {
        return Err(PveError::new(500, format!("create user failed: domain '{realm}' does not exist")));
    }
    let groups = list(params, "groups");
    check_groups_exist(store, &groups)?;
    let password_hash = match text(params, "password") {
        Some(_) if realm != "pve" => {
            return Err(param_error("password", "setting a password is only possible for realm 'pve'"));
        }
        Some(p) => Some(hash_password(&p).map_err(|e| PveError::new(500, e))?),
        None => None,
    };
    let spec = PVEUserSpec {
        userid: userid.clone(),
        enable: flag(params, "enable").unwrap_or(true),
        expire: int(params, "expire").unwrap_or(0),
        firstname: text(params, "firstname"),
        lastname: text(params, "lastname"),
        email: text(params, "email"),
        comment: text(params, "comment"),
        groups,
        password_hash,
        tokens: Vec::new(),
    };
    let name = object_name(&userid);
    let saved = Api::<PVEUser>::all(client.clone())
        .create(&PostParams::default(), &PVEUser::new(&name, spec))
        .await
        .map_err(write_error)?;
    cache::settle(&store.users, None, &name, created_version(&saved).as_deref()).await;
    Ok(Value::Null)
}

/// `PUT /access/users/{userid}`.
pub async fn user_update(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let userid = &params["userid"];
    let mut u = (*user(store, userid)?).clone();
    let s = &mut u.spec;
    if let Some(e) = flag(params, "enable") {
        s.enable = e;
    }
    if let Some(e) = int(params, "expire") {
        s.expire = e;
    }
    for (k, field) in [
        ("firstname", &mut s.firstname),
        ("lastname", &mut s.lastname),
        ("email", &mut s.email),
        ("comment", &mut s.comment),
    ] {
        if params.contains_key(k) {
            *field = text(params, k);
        }
    }
    if params.contains_key("groups") {
        let groups = list(params, "groups");
        check_groups_exist(store, &groups)?;
        if flag(params, "append") == Some(true) {
            for g in groups {
                if !s.groups.contains(&g) {
                    s.groups.push(g);
                }
            }
        } else {
            s.groups = groups;
        }
    }
    replace_user(client, store, &u).await?;
    Ok(Value::Null)
}

/// `DELETE /access/users/{userid}`: its ACL entries go first (as in Proxmox), so a later
/// user of the same id never inherits them, then the user.
pub async fn user_delete(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let userid = &params["userid"];
    let u = user(store, userid)?;
    let tokens: Vec<String> = u.spec.tokens.iter().map(|t| format!("{userid}!{}", t.id)).collect();
    remove_from_acls(client, store, |spec| {
        spec.users.retain(|x| x != userid);
        spec.tokens.retain(|x| !tokens.contains(x));
    })
    .await?;
    let name = u.meta().name.clone().unwrap_or_default();
    Api::<PVEUser>::all(client.clone()).delete(&name, &DeleteParams::default()).await.map_err(write_error)?;
    cache::settle(&store.users, None, &name, None).await;
    Ok(Value::Null)
}

/// `PUT /access/password`. Callers other than root@pam confirm with their own password
/// (`confirmation-password`), so a stolen ticket cannot take the account over.
pub async fn password(
    client: &kube::Client,
    store: &AccessStore,
    keys: &crate::ticket::Keys,
    c: &Checker<'_>,
) -> Result<Value, PveError> {
    let userid = &c.params["userid"];
    if userid == ROOT {
        return Err(PveError::new(500, "root@pam's password is the data directory's pve-root-password file"));
    }
    if !c.principal.is_root() {
        let confirmation = c.params.get("confirmation-password").cloned().unwrap_or_default();
        crate::auth::check_password(keys, store, "", &c.principal.user, &confirmation)
            .map_err(|_| param_error("confirmation-password", "confirmation password is wrong"))?;
    }
    let mut u = (*user(store, userid)?).clone();
    if !userid.ends_with("@pve") {
        return Err(param_error("password", "setting a password is only possible for realm 'pve'"));
    }
    u.spec.password_hash = Some(hash_password(&c.params["password"]).map_err(|e| PveError::new(500, e))?);
    replace_user(client, store, &u).await?;
    Ok(Value::Null)
}

/// `GET /access/users/{userid}/token`.
pub fn tokens(store: &AccessStore, params: &Params) -> Result<Value, PveError> {
    if params["userid"] == ROOT && store.user(ROOT).is_none() {
        return Ok(json!([]));
    }
    Ok(Value::Array(user(store, &params["userid"])?.spec.tokens.iter().map(token_entry).collect()))
}

fn token_info(t: &PVEToken) -> Value {
    let mut e = token_entry(t);
    e.as_object_mut().map(|o| o.remove("tokenid"));
    e
}

/// `GET /access/users/{userid}/token/{tokenid}`.
pub fn token_get(store: &AccessStore, params: &Params) -> Result<Value, PveError> {
    let u = user(store, &params["userid"])?;
    let t = u.spec.tokens.iter().find(|t| t.id == params["tokenid"]).ok_or_else(|| no_token(params))?;
    Ok(token_info(t))
}

fn no_token(params: &Params) -> PveError {
    PveError::new(500, format!("no such token '{}' for user '{}'", params["tokenid"], params["userid"]))
}

/// `POST /access/users/{userid}/token/{tokenid}`: the secret is shown once, stored hashed.
pub async fn token_create(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let userid = &params["userid"];
    if userid == ROOT && store.user(ROOT).is_none() {
        // root@pam's tokens live on a PVEUser for root@pam, created on demand.
        let spec = PVEUserSpec {
            userid: ROOT.into(),
            enable: true,
            expire: 0,
            firstname: None,
            lastname: None,
            email: None,
            comment: None,
            groups: vec![],
            password_hash: None,
            tokens: vec![],
        };
        let name = object_name(ROOT);
        let saved = Api::<PVEUser>::all(client.clone())
            .create(&PostParams::default(), &PVEUser::new(&name, spec))
            .await
            .map_err(write_error)?;
        cache::settle(&store.users, None, &name, created_version(&saved).as_deref()).await;
    }
    let mut u = (*user(store, userid)?).clone();
    let tokenid = params["tokenid"].clone();
    if u.spec.tokens.iter().any(|t| t.id == tokenid) {
        return Err(param_error("tokenid", "Token already exists."));
    }
    let secret = uuid::Uuid::new_v4().to_string();
    let token = PVEToken {
        id: tokenid.clone(),
        privsep: flag(params, "privsep").unwrap_or(true),
        expire: int(params, "expire").unwrap_or(0),
        comment: text(params, "comment"),
        secret_hash: access::token_hash(&secret),
    };
    let info = token_info(&token);
    u.spec.tokens.push(token);
    replace_user(client, store, &u).await?;
    Ok(json!({"full-tokenid": format!("{userid}!{tokenid}"), "info": info, "value": secret}))
}

/// `PUT /access/users/{userid}/token/{tokenid}`.
pub async fn token_update(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let mut u = (*user(store, &params["userid"])?).clone();
    let t = u.spec.tokens.iter_mut().find(|t| t.id == params["tokenid"]).ok_or_else(|| no_token(params))?;
    if let Some(p) = flag(params, "privsep") {
        t.privsep = p;
    }
    if let Some(e) = int(params, "expire") {
        t.expire = e;
    }
    if params.contains_key("comment") {
        t.comment = text(params, "comment");
    }
    for d in list(params, "delete") {
        if d != "comment" {
            return Err(PveError::new(500, format!("unknown option '{d}'")));
        }
        t.comment = None;
    }
    let mut out = token_info(t);
    if flag(params, "regenerate") == Some(true) {
        let secret = uuid::Uuid::new_v4().to_string();
        t.secret_hash = access::token_hash(&secret);
        out["value"] = json!(secret);
        out["full-tokenid"] = json!(format!("{}!{}", params["userid"], params["tokenid"]));
    }
    replace_user(client, store, &u).await?;
    Ok(out)
}

/// `DELETE /access/users/{userid}/token/{tokenid}`.
pub async fn token_delete(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let mut u = (*user(store, &params["userid"])?).clone();
    let before = u.spec.tokens.len();
    u.spec.tokens.retain(|t| t.id != params["tokenid"]);
    if u.spec.tokens.len() == before {
        return Err(no_token(params));
    }
    replace_user(client, store, &u).await?;
    let full = format!("{}!{}", params["userid"], params["tokenid"]);
    remove_from_acls(client, store, |spec| spec.tokens.retain(|t| t != &full)).await?;
    Ok(Value::Null)
}

/// `GET /access/groups`.
pub fn groups(store: &AccessStore, c: &Checker) -> Value {
    let access = store.snapshot();
    let mut out: Vec<Value> = store
        .groups
        .state()
        .iter()
        .filter(|g| {
            let wanted = access::privilege_bit("User.Modify").unwrap_or(0)
                | access::privilege_bit("Sys.Audit").unwrap_or(0);
            c.privs("/access/groups") & wanted != 0
                || c.privs(&format!("/access/groups/{}", g.spec.groupid)) & wanted != 0
        })
        .map(|g| {
            let members: Vec<String> =
                access.members.get(&g.spec.groupid).map(|m| m.iter().cloned().collect()).unwrap_or_default();
            let mut e = json!({"groupid": g.spec.groupid, "users": members.join(",")});
            if let Some(c) = &g.spec.comment {
                e["comment"] = json!(c);
            }
            e
        })
        .collect();
    out.sort_by(|a, b| a["groupid"].as_str().cmp(&b["groupid"].as_str()));
    Value::Array(out)
}

fn group(store: &AccessStore, groupid: &str) -> Result<std::sync::Arc<PVEGroup>, PveError> {
    store
        .groups
        .state()
        .into_iter()
        .find(|g| g.spec.groupid == groupid)
        .ok_or_else(|| PveError::new(500, format!("group '{groupid}' does not exist")))
}

/// `GET /access/groups/{groupid}`.
pub fn group_get(store: &AccessStore, params: &Params) -> Result<Value, PveError> {
    let g = group(store, &params["groupid"])?;
    let members: Vec<String> = store
        .snapshot()
        .members
        .get(&g.spec.groupid)
        .map(|m| m.iter().cloned().collect())
        .unwrap_or_default();
    let mut e = json!({"members": members});
    if let Some(c) = &g.spec.comment {
        e["comment"] = json!(c);
    }
    Ok(e)
}

/// `POST /access/groups`.
pub async fn group_create(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let groupid = params["groupid"].clone();
    if group(store, &groupid).is_ok() {
        return Err(PveError::new(500, format!("create group failed: group '{groupid}' already exists")));
    }
    let name = object_name(&groupid);
    let spec = PVEGroupSpec { groupid, comment: text(params, "comment") };
    let saved = Api::<PVEGroup>::all(client.clone())
        .create(&PostParams::default(), &PVEGroup::new(&name, spec))
        .await
        .map_err(write_error)?;
    cache::settle(&store.groups, None, &name, created_version(&saved).as_deref()).await;
    Ok(Value::Null)
}

/// `PUT /access/groups/{groupid}`.
pub async fn group_update(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let mut g = (*group(store, &params["groupid"])?).clone();
    if params.contains_key("comment") {
        g.spec.comment = text(params, "comment");
    }
    g.metadata.managed_fields = None;
    let name = g.meta().name.clone().unwrap_or_default();
    let saved = Api::<PVEGroup>::all(client.clone())
        .replace(&name, &PostParams::default(), &g)
        .await
        .map_err(write_error)?;
    cache::settle(&store.groups, None, &name, created_version(&saved).as_deref()).await;
    Ok(Value::Null)
}

/// `DELETE /access/groups/{groupid}`: members leave it, its ACL entries go.
pub async fn group_delete(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let groupid = params["groupid"].clone();
    let g = group(store, &groupid)?;
    let name = g.meta().name.clone().unwrap_or_default();
    Api::<PVEGroup>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await
        .map_err(write_error)?;
    cache::settle(&store.groups, None, &name, None).await;
    for u in store.users.state() {
        if u.spec.groups.contains(&groupid) {
            let mut u = (*u).clone();
            u.spec.groups.retain(|x| x != &groupid);
            replace_user(client, store, &u).await?;
        }
    }
    remove_from_acls(client, store, |spec| spec.groups.retain(|x| x != &groupid)).await?;
    Ok(Value::Null)
}

/// `GET /access/roles`.
pub fn roles(store: &AccessStore) -> Value {
    let access = store.snapshot();
    let builtin: BTreeSet<&str> = BUILTIN_ROLES.iter().map(|(r, _)| *r).collect();
    Value::Array(
        access
            .roles
            .iter()
            .map(|(name, privs)| {
                let names: Vec<&str> = privilege_names(*privs).collect();
                json!({"roleid": name, "privs": names.join(","), "special": u8::from(builtin.contains(name.as_str()))})
            })
            .collect(),
    )
}

/// `GET /access/roles/{roleid}`.
pub fn role_get(store: &AccessStore, params: &Params) -> Result<Value, PveError> {
    let roleid = &params["roleid"];
    let privs = *store
        .snapshot()
        .roles
        .get(roleid)
        .ok_or_else(|| PveError::new(500, format!("role '{roleid}' does not exist")))?;
    Ok(Value::Object(privilege_names(privs).map(|p| (p.to_string(), json!(1))).collect()))
}

fn custom_role(store: &AccessStore, roleid: &str) -> Result<std::sync::Arc<PVERole>, PveError> {
    if BUILTIN_ROLES.iter().any(|(r, _)| *r == roleid) {
        return Err(PveError::new(500, format!("cannot modify special role '{roleid}'")));
    }
    store
        .roles
        .state()
        .into_iter()
        .find(|r| r.spec.roleid == roleid)
        .ok_or_else(|| PveError::new(500, format!("role '{roleid}' does not exist")))
}

/// `POST /access/roles`.
pub async fn role_create(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let roleid = params["roleid"].clone();
    if store.snapshot().roles.contains_key(&roleid) {
        return Err(PveError::new(500, format!("create role failed: role '{roleid}' already exists")));
    }
    let name = object_name(&roleid);
    let spec = PVERoleSpec { roleid, privs: list(params, "privs") };
    let saved = Api::<PVERole>::all(client.clone())
        .create(&PostParams::default(), &PVERole::new(&name, spec))
        .await
        .map_err(write_error)?;
    cache::settle(&store.roles, None, &name, created_version(&saved).as_deref()).await;
    Ok(Value::Null)
}

/// `PUT /access/roles/{roleid}`.
pub async fn role_update(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let mut r = (*custom_role(store, &params["roleid"])?).clone();
    let privs = list(params, "privs");
    if flag(params, "append") == Some(true) {
        for p in privs {
            if !r.spec.privs.contains(&p) {
                r.spec.privs.push(p);
            }
        }
    } else {
        r.spec.privs = privs;
    }
    r.metadata.managed_fields = None;
    let name = r.meta().name.clone().unwrap_or_default();
    let saved = Api::<PVERole>::all(client.clone())
        .replace(&name, &PostParams::default(), &r)
        .await
        .map_err(write_error)?;
    cache::settle(&store.roles, None, &name, created_version(&saved).as_deref()).await;
    Ok(Value::Null)
}

/// `DELETE /access/roles/{roleid}`.
pub async fn role_delete(
    client: &kube::Client,
    store: &AccessStore,
    params: &Params,
) -> Result<Value, PveError> {
    let roleid = params["roleid"].clone();
    let r = custom_role(store, &roleid)?;
    let name = r.meta().name.clone().unwrap_or_default();
    Api::<PVERole>::all(client.clone()).delete(&name, &DeleteParams::default()).await.map_err(write_error)?;
    cache::settle(&store.roles, None, &name, None).await;
    remove_from_acls(client, store, |spec| spec.roles.retain(|x| x != &roleid)).await?;
    Ok(Value::Null)
}

/// `GET /access/acl`: the entries on paths where the caller may modify permissions.
pub fn acl(store: &AccessStore, c: &Checker) -> Value {
    let access = store.snapshot();
    let modify = access::privilege_bit("Permissions.Modify").unwrap_or(0);
    let mut out = Vec::new();
    for (path, entries) in &access.acl {
        // Entries on paths the caller may change permissions of, or all with Sys.Audit on
        // /access.
        let audit = access::privilege_bit("Sys.Audit").unwrap_or(0);
        if !c.principal.is_root() && c.privs(path) & modify == 0 && c.privs("/access") & audit == 0 {
            continue;
        }
        for e in entries {
            let kind = match e.subject {
                access::Subject::User => "user",
                access::Subject::Group => "group",
                access::Subject::Token => "token",
            };
            out.push(json!({"path": path, "type": kind, "ugid": e.who, "roleid": e.role, "propagate": u8::from(e.propagate)}));
        }
    }
    Value::Array(out)
}

/// Applies `edit` to every ACL object; deletes those left without subjects or roles.
async fn remove_from_acls(
    client: &kube::Client,
    store: &AccessStore,
    edit: impl Fn(&mut PVEACLSpec),
) -> Result<(), PveError> {
    let api: Api<PVEACL> = Api::all(client.clone());
    for a in store.acls.state() {
        let mut spec = a.spec.clone();
        edit(&mut spec);
        if spec == a.spec {
            continue;
        }
        let name = a.meta().name.clone().unwrap_or_default();
        if spec.roles.is_empty()
            || (spec.users.is_empty() && spec.groups.is_empty() && spec.tokens.is_empty())
        {
            api.delete(&name, &DeleteParams::default()).await.map_err(write_error)?;
            cache::settle(&store.acls, None, &name, None).await;
        } else {
            let mut a = (*a).clone();
            a.spec = spec;
            a.metadata.managed_fields = None;
            let saved = api.replace(&name, &PostParams::default(), &a).await.map_err(write_error)?;
            cache::settle(&store.acls, None, &name, created_version(&saved).as_deref()).await;
        }
    }
    Ok(())
}

/// The resource name of one grant (path, subject, role): 128 bits of its hash.
fn grant_name(path: &str, kind: &str, who: &str, role: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{path}\n{kind}\n{who}\n{role}").as_bytes());
    format!("acl-{}", digest.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>())
}

/// `PUT /access/acl`: grants (or with `delete=1` revokes) `roles` on `path` to the listed
/// users, groups and tokens, one PVEACL per path, subject and role. Without
/// Permissions.Modify on the path, a caller may only hand out privileges it holds there.
pub async fn acl_update(
    client: &kube::Client,
    store: &AccessStore,
    c: &Checker<'_>,
) -> Result<Value, PveError> {
    let params = c.params;
    let path = access::normalize(&params["path"]);
    kpve_crds::access::check_acl_path(&path).map_err(|e| param_error("path", format!("{e} '{path}'")))?;
    let roles = list(params, "roles");
    let access = store.snapshot();
    for r in &roles {
        let Some(privs) = access.roles.get(r) else {
            return Err(PveError::new(500, format!("role '{r}' does not exist")));
        };
        let modify = access::privilege_bit("Permissions.Modify").unwrap_or(0);
        if !c.principal.is_root() && !c.has(&path, modify) && c.privs(&path) & privs != *privs {
            return Err(PveError::new(
                403,
                format!("Cannot add role '{r}' - requires 'Permissions.Modify' or superset of privileges."),
            ));
        }
    }
    let users = list(params, "users");
    let groups = list(params, "groups");
    let tokens = list(params, "tokens");
    let delete = flag(params, "delete") == Some(true);
    if !delete {
        for u in &users {
            if u != ROOT && store.user(u).is_none() {
                return Err(PveError::new(500, format!("user '{u}' does not exist")));
            }
        }
        for g in &groups {
            group(store, g)?;
        }
        for t in &tokens {
            if !access.tokens.contains_key(t) {
                return Err(PveError::new(500, format!("no such token '{t}'")));
            }
        }
    }
    if users.is_empty() && groups.is_empty() && tokens.is_empty() {
        return Err(param_error("users", "at least one of users, groups, tokens is required"));
    }
    let api: Api<PVEACL> = Api::all(client.clone());
    if delete {
        return acl_revoke(&api, store, &path, &roles, &users, &groups, &tokens).await.map(|_| Value::Null);
    }
    let propagate = flag(params, "propagate").unwrap_or(true);
    let subjects = users
        .iter()
        .map(|u| ("user", u))
        .chain(groups.iter().map(|g| ("group", g)))
        .chain(tokens.iter().map(|t| ("token", t)));
    for (kind, who) in subjects {
        for role in &roles {
            let name = grant_name(&path, kind, who, role);
            let spec = grant_spec(&path, propagate, kind, who, role);
            let saved = match api.get_opt(&name).await.map_err(write_error)? {
                Some(existing) if !same_grant(&existing.spec, &spec) => {
                    return Err(PveError::new(500, format!("PVEACL {name} exists with another grant")));
                }
                Some(mut existing) => {
                    existing.spec = spec;
                    existing.metadata.managed_fields = None;
                    api.replace(&name, &PostParams::default(), &existing).await
                }
                None => api.create(&PostParams::default(), &PVEACL::new(&name, spec)).await,
            }
            .map_err(write_error)?;
            cache::settle(&store.acls, None, &name, created_version(&saved).as_deref()).await;
        }
    }
    Ok(Value::Null)
}

/// The PVEACL spec of one grant; `kind` is user, group or token.
fn grant_spec(path: &str, propagate: bool, kind: &str, who: &str, role: &str) -> PVEACLSpec {
    let mut spec = PVEACLSpec {
        path: path.to_string(),
        propagate,
        roles: vec![role.to_string()],
        users: vec![],
        groups: vec![],
        tokens: vec![],
    };
    match kind {
        "user" => spec.users.push(who.to_string()),
        "group" => spec.groups.push(who.to_string()),
        _ => spec.tokens.push(who.to_string()),
    }
    spec
}

/// Two specs grant the same role to the same subject on the same path.
fn same_grant(a: &PVEACLSpec, b: &PVEACLSpec) -> bool {
    a.path == b.path
        && a.roles == b.roles
        && a.users == b.users
        && a.groups == b.groups
        && a.tokens == b.tokens
}

/// Removes the grants (named role × named subject) on `path`; other subjects and other
/// roles of the same objects keep theirs (an object is split when it has to be).
async fn acl_revoke(
    api: &Api<PVEACL>,
    store: &AccessStore,
    path: &str,
    roles: &[String],
    users: &[String],
    groups: &[String],
    tokens: &[String],
) -> Result<(), PveError> {
    for a in store.acls.state() {
        let s = &a.spec;
        if access::normalize(&s.path) != path {
            continue;
        }
        let named = |list: &[String], wanted: &[String]| {
            list.iter().filter(|x| wanted.contains(x)).cloned().collect::<Vec<_>>()
        };
        let (nu, ng, nt) = (named(&s.users, users), named(&s.groups, groups), named(&s.tokens, tokens));
        let revoked_roles = named(&s.roles, roles);
        if (nu.is_empty() && ng.is_empty() && nt.is_empty()) || revoked_roles.is_empty() {
            continue;
        }
        let name = a.meta().name.clone().unwrap_or_default();
        // The others keep everything; the named subjects keep the roles not revoked.
        let mut rest = s.clone();
        rest.users.retain(|x| !nu.contains(x));
        rest.groups.retain(|x| !ng.contains(x));
        rest.tokens.retain(|x| !nt.contains(x));
        let kept_roles: Vec<String> =
            s.roles.iter().filter(|r| !revoked_roles.contains(r)).cloned().collect();
        if rest.users.is_empty() && rest.groups.is_empty() && rest.tokens.is_empty() {
            api.delete(&name, &DeleteParams::default()).await.map_err(write_error)?;
            cache::settle(&store.acls, None, &name, None).await;
        } else {
            let mut obj = (*a).clone();
            obj.spec = rest;
            obj.metadata.managed_fields = None;
            let saved = api.replace(&name, &PostParams::default(), &obj).await.map_err(write_error)?;
            cache::settle(&store.acls, None, &name, created_version(&saved).as_deref()).await;
        }
        let subjects = nu
            .iter()
            .map(|u| ("user", u))
            .chain(ng.iter().map(|g| ("group", g)))
            .chain(nt.iter().map(|t| ("token", t)));
        for (kind, who) in subjects {
            for role in &kept_roles {
                let spec = grant_spec(&s.path, s.propagate, kind, who, role);
                let name = grant_name(path, kind, who, role);
                let saved = api
                    .create(&PostParams::default(), &PVEACL::new(&name, spec))
                    .await
                    .map_err(write_error)?;
                cache::settle(&store.acls, None, &name, created_version(&saved).as_deref()).await;
            }
        }
    }
    Ok(())
}

/// `GET /access/permissions`: privileges per path for the caller (or, with Sys.Audit on
/// `/access`, for `userid`), on `path` or on every path with ACL entries.
pub fn permissions(store: &AccessStore, c: &Checker) -> Result<Value, PveError> {
    let mut principal = c.principal.clone();
    if let Some(userid) = c.params.get("userid") {
        let (user, token) = match userid.split_once('!') {
            Some((u, t)) => (u.to_string(), Some(t.to_string())),
            None => (userid.clone(), None),
        };
        let own = user == c.principal.user && (c.principal.token.is_none() || token == c.principal.token);
        if !own && !c.has("/access", access::privilege_bit("Sys.Audit").unwrap_or(0)) {
            return Err(PveError::permission("/access", "Sys.Audit"));
        }
        principal = access::Principal { user, token };
    }
    let access = store.snapshot();
    let checker = Checker { access: &access, principal: &principal, params: c.params, pools: c.pools };
    let paths: BTreeSet<String> = match c.params.get("path") {
        Some(p) => BTreeSet::from([access::normalize(p)]),
        None => std::iter::once("/".to_string()).chain(access.acl.keys().cloned()).collect(),
    };
    let mut out = serde_json::Map::new();
    for path in paths {
        let privs: serde_json::Map<String, Value> =
            privilege_names(checker.privs(&path)).map(|p| (p.to_string(), json!(1))).collect();
        if !privs.is_empty() || c.params.contains_key("path") {
            out.insert(path, Value::Object(privs));
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_follow_the_proxmox_id() {
        assert_eq!(object_name("alice@pve"), "alice.pve");
        assert_eq!(object_name("ops"), "ops");
        let odd = object_name("Bob_Smith@pve");
        assert!(odd.starts_with("bob-smith.pve-") && odd.len() == "bob-smith.pve-".len() + 8, "{odd}");
        assert_ne!(object_name("Ops"), object_name("ops"));
    }
}
