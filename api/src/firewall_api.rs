//! The firewall endpoints: `/cluster/firewall/{rules,options,groups,ipset,aliases}`,
//! `/nodes/{node}/firewall/{rules,options}` and `/nodes/{node}/{qemu,lxc}/{vmid}/firewall/
//! {rules,options}`. Each is an edit of the resource that declares it — `ClusterFirewall`
//! `cluster`, a `SecurityGroup`, an `IPSet`, the node's `Hypervisor.spec.firewall`, a guest's
//! `spec.firewall` — read, changed and replaced whole (a concurrent change is a conflict, not
//! a lost write). Rules are checked with the same rule-language checks as admission and come
//! back in Proxmox's shape (`pos`, `type`, `action`, `macro`, …, `digest`).

use std::collections::BTreeMap;
use std::fmt::Debug;

use kpve_crds::firewall::lang::check_rule;
use kpve_crds::firewall::{FirewallRule, RuleType};
use kpve_crds::{
    ClusterFirewall, ClusterFirewallSpec, Hypervisor, IPSet, IPSetSpec, LinuxContainer, SecurityGroup,
    SecurityGroupSpec, VirtualMachine,
};
use kube::Resource;
use kube::api::{Api, DeleteParams, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use sha2::Digest;

use crate::envelope::PveError;
use crate::guests::{self, Guests, Kind};

type Params = BTreeMap<String, String>;

fn param_error(name: &str, message: impl Into<String>) -> PveError {
    PveError::parameters(BTreeMap::from([(name.to_string(), message.into())]))
}

/// Proxmox-style digest of a section: a hash of its JSON.
fn digest(v: &Value) -> String {
    sha2::Sha256::digest(v.to_string().as_bytes()).iter().take(20).map(|b| format!("{b:02x}")).collect()
}

/// Where a rule list, options or IP set lives.
enum Owner {
    Cluster,
    Group(String),
    Host(String),
    Guest(Box<guests::Guest>),
}

/// Reads `name` through `api`, hands the JSON value at `pointer` (created as `{}` if absent)
/// to `edit`, and replaces the object with the result.
async fn edit<K, T>(
    api: Api<K>,
    name: &str,
    pointer: &str,
    edit: impl FnOnce(&mut Value) -> Result<T, PveError>,
) -> Result<T, PveError>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize,
{
    // The edit runs on the first read; on a conflict (an agent's status write bumped the
    // resource version) the edited section is put into a fresh read. Spec races between
    // clients are caught by Proxmox's `digest` before this.
    let mut edit = Some(edit);
    let mut out = None;
    let mut edited: Option<Value> = None;
    crate::cache::replace_retrying(&api, name, |object: &mut K| {
        let mut value = serde_json::to_value(&*object).map_err(|e| PveError::new(500, e.to_string()))?;
        let mut slot = &mut value;
        for key in pointer.split('/').filter(|k| !k.is_empty()) {
            let map = slot
                .as_object_mut()
                .ok_or_else(|| PveError::new(500, format!("{pointer}: not an object")))?;
            slot = map.entry(key.to_string()).or_insert_with(|| json!({}));
            if slot.is_null() {
                *slot = json!({});
            }
        }
        match (edit.take(), &edited) {
            (Some(f), _) => {
                out = Some(f(slot)?);
                edited = Some(slot.clone());
            }
            (None, Some(section)) => *slot = section.clone(),
            (None, None) => return Err(PveError::new(500, "edit did not run")),
        }
        *object = serde_json::from_value(value).map_err(|e| PveError::new(400, e.to_string()))?;
        Ok(())
    })
    .await?;
    out.ok_or_else(|| PveError::new(500, "edit did not run"))
}

/// The JSON value at `pointer` of `K` `name` (`{}` when absent).
async fn read<K>(api: Api<K>, name: &str, pointer: &str) -> Result<Value, PveError>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize,
{
    let object = api.get(name).await.map_err(PveError::write_failed)?;
    let value = serde_json::to_value(&object).map_err(|e| PveError::new(500, e.to_string()))?;
    Ok(value.pointer(pointer).filter(|v| !v.is_null()).cloned().unwrap_or_else(|| json!({})))
}

/// Makes sure `ClusterFirewall` `cluster` exists (Proxmox always has a cluster.fw).
async fn ensure_cluster(client: &kube::Client) -> Result<(), PveError> {
    let api: Api<ClusterFirewall> = Api::all(client.clone());
    if api.get_opt("cluster").await.map_err(PveError::write_failed)?.is_none() {
        let spec: ClusterFirewallSpec = serde_json::from_value(json!({})).expect("every field has a default");
        api.create(&PostParams::default(), &ClusterFirewall::new("cluster", spec))
            .await
            .map_err(PveError::write_failed)?;
    }
    Ok(())
}

impl Owner {
    async fn read(&self, client: &kube::Client) -> Result<Value, PveError> {
        match self {
            Owner::Cluster => {
                ensure_cluster(client).await?;
                read(Api::<ClusterFirewall>::all(client.clone()), "cluster", "/spec").await
            }
            Owner::Group(g) => read(Api::<SecurityGroup>::all(client.clone()), g, "/spec").await,
            Owner::Host(n) => read(Api::<Hypervisor>::all(client.clone()), n, "/spec/firewall").await,
            Owner::Guest(g) => match g.kind {
                Kind::Qemu => {
                    read(
                        Api::<VirtualMachine>::namespaced(client.clone(), &g.namespace),
                        &g.name,
                        "/spec/firewall",
                    )
                    .await
                }
                Kind::Lxc => {
                    read(
                        Api::<LinuxContainer>::namespaced(client.clone(), &g.namespace),
                        &g.name,
                        "/spec/firewall",
                    )
                    .await
                }
            },
        }
    }

    async fn edit<T>(
        &self,
        client: &kube::Client,
        f: impl FnOnce(&mut Value) -> Result<T, PveError>,
    ) -> Result<T, PveError> {
        match self {
            Owner::Cluster => {
                ensure_cluster(client).await?;
                edit(Api::<ClusterFirewall>::all(client.clone()), "cluster", "/spec", f).await
            }
            Owner::Group(g) => edit(Api::<SecurityGroup>::all(client.clone()), g, "/spec", f).await,
            Owner::Host(n) => edit(Api::<Hypervisor>::all(client.clone()), n, "/spec/firewall", f).await,
            Owner::Guest(g) => match g.kind {
                Kind::Qemu => {
                    let api = Api::<VirtualMachine>::namespaced(client.clone(), &g.namespace);
                    edit(api, &g.name, "/spec/firewall", f).await
                }
                Kind::Lxc => {
                    let api = Api::<LinuxContainer>::namespaced(client.clone(), &g.namespace);
                    edit(api, &g.name, "/spec/firewall", f).await
                }
            },
        }
    }
}

fn rules_of(section: &Value) -> Result<Vec<FirewallRule>, PveError> {
    serde_json::from_value(section.get("rules").cloned().unwrap_or_else(|| json!([])))
        .map_err(|e| PveError::new(500, format!("reading rules: {e}")))
}

/// A rule as Proxmox's API shows it.
fn rule_json(pos: usize, r: &FirewallRule, digest: &str) -> Value {
    let mut e = json!({
        "pos": pos,
        "type": match r.type_ { RuleType::In => "in", RuleType::Out => "out", RuleType::Forward => "forward", RuleType::Group => "group" },
        "action": r.action, "enable": u8::from(r.enable), "digest": digest,
    });
    for (k, v) in [
        ("macro", &r.macro_),
        ("source", &r.source),
        ("dest", &r.dest),
        ("proto", &r.proto),
        ("dport", &r.dport),
        ("sport", &r.sport),
        ("icmp-type", &r.icmp_type),
        ("iface", &r.iface),
        ("comment", &r.comment),
    ] {
        if let Some(v) = v {
            e[k] = json!(v);
        }
    }
    if let Some(log) = r.log {
        e["log"] = serde_json::to_value(log).unwrap_or(Value::Null);
    }
    e
}

/// Applies the rule parameters of a POST/PUT to `rule` (`delete` clears fields).
fn apply_rule_params(rule: &mut FirewallRule, params: &Params) -> Result<(), PveError> {
    if let Some(t) = params.get("type") {
        rule.type_ = match t.as_str() {
            "in" => RuleType::In,
            "out" => RuleType::Out,
            "forward" => RuleType::Forward,
            "group" => RuleType::Group,
            _ => {
                return Err(param_error(
                    "type",
                    format!("value '{t}' does not have a value in the enumeration 'in, out, forward, group'"),
                ));
            }
        };
    }
    if let Some(a) = params.get("action") {
        rule.action = a.clone();
    }
    if let Some(e) = params.get("enable") {
        rule.enable = e != "0";
    }
    for d in params
        .get("delete")
        .map(|d| crate::validate::split_list(d).map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        match d.as_str() {
            "macro" => rule.macro_ = None,
            "source" => rule.source = None,
            "dest" => rule.dest = None,
            "proto" => rule.proto = None,
            "dport" => rule.dport = None,
            "sport" => rule.sport = None,
            "icmp-type" => rule.icmp_type = None,
            "iface" => rule.iface = None,
            "log" => rule.log = None,
            "comment" => rule.comment = None,
            other => return Err(param_error("delete", format!("unable to delete '{other}'"))),
        }
    }
    for (key, slot) in [
        ("macro", &mut rule.macro_),
        ("source", &mut rule.source),
        ("dest", &mut rule.dest),
        ("proto", &mut rule.proto),
        ("dport", &mut rule.dport),
        ("sport", &mut rule.sport),
        ("icmp-type", &mut rule.icmp_type),
        ("iface", &mut rule.iface),
        ("comment", &mut rule.comment),
    ] {
        if let Some(v) = params.get(key) {
            *slot = if v.is_empty() { None } else { Some(v.clone()) };
        }
    }
    if let Some(l) = params.get("log") {
        rule.log = Some(
            serde_json::from_value(json!(l))
                .map_err(|_| param_error("log", format!("invalid log level '{l}'")))?,
        );
    }
    check_rule(rule, "rule").map_err(|(field, msg)| {
        let name =
            field.trim_start_matches("rule.").replace("icmpType", "icmp-type").replace("macro_", "macro");
        param_error(&name, msg)
    })
}

fn new_rule() -> FirewallRule {
    FirewallRule {
        type_: RuleType::In,
        action: String::new(),
        macro_: None,
        source: None,
        dest: None,
        proto: None,
        dport: None,
        sport: None,
        icmp_type: None,
        iface: None,
        log: None,
        enable: false,
        comment: None,
    }
}

fn check_digest(params: &Params, current: &str) -> Result<(), PveError> {
    match params.get("digest") {
        Some(d) if d != current => Err(PveError::new(
            500,
            "detected modified configuration - file changed by other user? Try again.",
        )),
        _ => Ok(()),
    }
}

fn position(params: &Params, len: usize) -> Result<usize, PveError> {
    let pos: usize = params.get("pos").and_then(|p| p.parse().ok()).unwrap_or(0);
    if pos >= len {
        return Err(PveError::new(500, format!("no rule at position {pos}")));
    }
    Ok(pos)
}

/// Rule list endpoints of one owner.
async fn rules(
    client: &kube::Client,
    owner: &Owner,
    method: &str,
    one: bool,
    params: &Params,
) -> Result<Value, PveError> {
    let section = owner.read(client).await?;
    let list = rules_of(&section)?;
    let current = digest(&json!(list));
    match (method, one) {
        ("GET", false) => {
            Ok(Value::Array(list.iter().enumerate().map(|(i, r)| rule_json(i, r, &current)).collect()))
        }
        ("GET", true) => {
            let pos = position(params, list.len())?;
            Ok(rule_json(pos, &list[pos], &current))
        }
        ("POST", false) => {
            check_digest(params, &current)?;
            let mut rule = new_rule();
            if !params.contains_key("action") {
                return Err(param_error("action", "property is missing and it is not optional"));
            }
            apply_rule_params(&mut rule, params)?;
            let at: usize = params.get("pos").and_then(|p| p.parse().ok()).unwrap_or(0);
            owner
                .edit(client, |s| {
                    let mut list = rules_of(s)?;
                    list.insert(at.min(list.len()), rule);
                    s["rules"] = json!(list);
                    Ok(())
                })
                .await?;
            Ok(Value::Null)
        }
        ("PUT", true) => {
            check_digest(params, &current)?;
            let pos = position(params, list.len())?;
            let moveto: Option<usize> = params.get("moveto").and_then(|m| m.parse().ok());
            let mut rule = list[pos].clone();
            if moveto.is_none() {
                apply_rule_params(&mut rule, params)?;
            }
            owner
                .edit(client, |s| {
                    let mut list = rules_of(s)?;
                    if pos >= list.len() {
                        return Err(PveError::new(500, format!("no rule at position {pos}")));
                    }
                    match moveto {
                        Some(to) => {
                            let r = list.remove(pos);
                            // Proxmox: moving down lands before the target position.
                            let to = if to > pos { to - 1 } else { to };
                            list.insert(to.min(list.len()), r);
                        }
                        None => list[pos] = rule,
                    }
                    s["rules"] = json!(list);
                    Ok(())
                })
                .await?;
            Ok(Value::Null)
        }
        ("DELETE", true) => {
            check_digest(params, &current)?;
            let pos = position(params, list.len())?;
            owner
                .edit(client, |s| {
                    let mut list = rules_of(s)?;
                    if pos < list.len() {
                        list.remove(pos);
                    }
                    s["rules"] = json!(list);
                    Ok(())
                })
                .await?;
            Ok(Value::Null)
        }
        _ => Err(PveError::not_implemented(method, "firewall rules")),
    }
}

/// Option names Proxmox uses and the camelCase field each maps to.
const CLUSTER_OPTIONS: &[(&str, &str)] = &[
    ("enable", "enable"),
    ("policy_in", "policyIn"),
    ("policy_out", "policyOut"),
    ("policy_forward", "policyForward"),
    ("ebtables", "ebtables"),
    ("log_ratelimit", "logRatelimit"),
];
const GUEST_OPTIONS: &[(&str, &str)] = &[
    ("enable", "enable"),
    ("policy_in", "policyIn"),
    ("policy_out", "policyOut"),
    ("ipfilter", "ipfilter"),
    ("macfilter", "macfilter"),
    ("dhcp", "dhcp"),
    ("ndp", "ndp"),
    ("radv", "radv"),
    ("log_level_in", "logLevelIn"),
    ("log_level_out", "logLevelOut"),
];
const HOST_OPTIONS: &[(&str, &str)] = &[
    ("enable", "enable"),
    ("log_level_in", "logLevelIn"),
    ("log_level_out", "logLevelOut"),
    ("tcpflags", "tcpflags"),
    ("nosmurfs", "nosmurfs"),
];

const BOOLEAN_OPTIONS: &[&str] =
    &["enable", "ebtables", "ipfilter", "macfilter", "dhcp", "ndp", "radv", "tcpflags", "nosmurfs"];

async fn options(
    client: &kube::Client,
    owner: &Owner,
    method: &str,
    params: &Params,
) -> Result<Value, PveError> {
    let names = match owner {
        Owner::Cluster => CLUSTER_OPTIONS,
        Owner::Host(_) => HOST_OPTIONS,
        _ => GUEST_OPTIONS,
    };
    let section = owner.read(client).await?;
    // Defaults come from the typed spec, as the agents see them.
    let typed: Value = match owner {
        Owner::Cluster => serde_json::to_value(
            serde_json::from_value::<ClusterFirewallSpec>(section.clone())
                .unwrap_or_else(|_| serde_json::from_value(json!({})).expect("defaults")),
        ),
        Owner::Host(_) => serde_json::to_value(
            serde_json::from_value::<kpve_crds::firewall::HostFirewall>(section.clone())
                .unwrap_or_else(|_| serde_json::from_value(json!({})).expect("defaults")),
        ),
        _ => serde_json::to_value(
            serde_json::from_value::<kpve_crds::firewall::GuestFirewall>(section.clone())
                .unwrap_or_else(|_| serde_json::from_value(json!({})).expect("defaults")),
        ),
    }
    .unwrap_or_default();
    let mut current = Map::new();
    for (pve, field) in names {
        match typed.get(*field) {
            Some(Value::Bool(b)) => {
                current.insert(pve.to_string(), json!(u8::from(*b)));
            }
            Some(Value::Null) | None => {}
            Some(v) => {
                current.insert(pve.to_string(), v.clone());
            }
        }
    }
    let current_digest = digest(&Value::Object(current.clone()));
    if method == "GET" {
        current.insert("digest".into(), json!(current_digest));
        return Ok(Value::Object(current));
    }
    check_digest(params, &current_digest)?;
    let deleted: Vec<String> = params
        .get("delete")
        .map(|d| crate::validate::split_list(d).map(str::to_string).collect())
        .unwrap_or_default();
    owner
        .edit(client, |s| {
            let map =
                s.as_object_mut().ok_or_else(|| PveError::new(500, "firewall section is not an object"))?;
            for (pve, field) in names {
                if deleted.iter().any(|d| d == pve) {
                    map.remove(*field);
                }
                if let Some(v) = params.get(*pve) {
                    let value = if BOOLEAN_OPTIONS.contains(pve) { json!(v == "1") } else { json!(v) };
                    map.insert(field.to_string(), value);
                }
            }
            Ok(())
        })
        .await?;
    Ok(Value::Null)
}

/// `/cluster/firewall/groups…`.
async fn groups(
    client: &kube::Client,
    method: &str,
    template: &str,
    params: &Params,
) -> Result<Value, PveError> {
    let api: Api<SecurityGroup> = Api::all(client.clone());
    match (method, template) {
        ("GET", "/cluster/firewall/groups") => {
            let list = api.list(&Default::default()).await.map_err(PveError::write_failed)?;
            Ok(Value::Array(
                list.items
                    .iter()
                    .map(|g| {
                        let comment = g.spec.comment.as_ref().map(|c| json!(c));
                        listed("group", &json!(g.meta().name), comment.as_ref(), digest(&json!(g.spec.rules)))
                    })
                    .collect(),
            ))
        }
        ("POST", "/cluster/firewall/groups") => {
            let name = params["group"].to_ascii_lowercase();
            if let Some(old) = params.get("rename") {
                return Err(PveError::new(
                    500,
                    format!(
                        "renaming security group '{old}' is not supported; create '{name}' and move the rules"
                    ),
                ));
            }
            if api.get_opt(&name).await.map_err(PveError::write_failed)?.is_some() {
                return Err(PveError::new(500, format!("security group '{name}' already exists")));
            }
            let spec = SecurityGroupSpec { comment: params.get("comment").cloned(), rules: vec![] };
            api.create(&PostParams::default(), &SecurityGroup::new(&name, spec))
                .await
                .map_err(PveError::write_failed)?;
            Ok(Value::Null)
        }
        ("DELETE", "/cluster/firewall/groups/{group}") => {
            let name = params["group"].to_ascii_lowercase();
            let group = api.get_opt(&name).await.map_err(PveError::write_failed)?;
            match group {
                None => Err(PveError::new(500, format!("no such security group '{name}'"))),
                Some(g) if !g.spec.rules.is_empty() => Err(PveError::new(500, "security group is not empty")),
                Some(_) => {
                    api.delete(&name, &DeleteParams::default()).await.map_err(PveError::write_failed)?;
                    Ok(Value::Null)
                }
            }
        }
        (_, "/cluster/firewall/groups/{group}") => {
            rules(client, &Owner::Group(params["group"].to_ascii_lowercase()), method, false, params).await
        }
        (_, "/cluster/firewall/groups/{group}/{pos}") => {
            rules(client, &Owner::Group(params["group"].to_ascii_lowercase()), method, true, params).await
        }
        _ => Err(PveError::not_implemented(method, template)),
    }
}

/// A named object in a list answer (`group`/`name`, `digest`, optional `comment`).
fn listed(key: &str, name: &Value, comment: Option<&Value>, digest: String) -> Value {
    let mut e = json!({ key: name, "digest": digest });
    if let Some(c) = comment.filter(|c| !c.is_null()) {
        e["comment"] = c.clone();
    }
    e
}

/// IP set entries (`{cidr, nomatch, comment}` as stored) as Proxmox shows them.
fn entries_shown(entries: &[Value]) -> Vec<Value> {
    let d = digest(&json!(entries));
    entries
        .iter()
        .map(|e| {
            let mut v = json!({"cidr": e["cidr"], "nomatch": u8::from(e["nomatch"] == true), "digest": d});
            if let Some(c) = e.get("comment").filter(|c| !c.is_null()) {
                v["comment"] = c.clone();
            }
            v
        })
        .collect()
}

/// Adds (POST), updates (PUT) or removes (DELETE) entry `cidr` of an IP set's stored entries.
fn edit_entry(entries: &mut Value, method: &str, cidr: &str, params: &Params) -> Result<(), PveError> {
    if entries.is_null() {
        *entries = json!([]);
    }
    let list = entries.as_array_mut().ok_or_else(|| PveError::new(500, "entries is not a list"))?;
    let found = list.iter().position(|e| e["cidr"] == cidr);
    let no_such = || PveError::new(500, format!("no such IP/Network '{cidr}'"));
    match method {
        "POST" if found.is_some() => {
            return Err(PveError::new(500, format!("entry '{cidr}' already exists")));
        }
        "POST" => {
            let mut e = json!({"cidr": cidr, "nomatch": params.get("nomatch").is_some_and(|v| v == "1")});
            if let Some(c) = params.get("comment") {
                e["comment"] = json!(c);
            }
            list.push(e);
        }
        "DELETE" => {
            list.remove(found.ok_or_else(no_such)?);
        }
        _ => {
            let e = &mut list[found.ok_or_else(no_such)?];
            if let Some(n) = params.get("nomatch") {
                e["nomatch"] = json!(n == "1");
            }
            if let Some(c) = params.get("comment") {
                e["comment"] = json!(c);
            }
        }
    }
    Ok(())
}

/// `/cluster/firewall/ipset…`.
async fn ipsets(
    client: &kube::Client,
    method: &str,
    template: &str,
    params: &Params,
) -> Result<Value, PveError> {
    let api: Api<IPSet> = Api::all(client.clone());
    let name = params.get("name").map(|n| n.to_ascii_lowercase()).unwrap_or_default();
    let missing = || PveError::new(500, format!("no such IPSet '{name}'"));
    match (method, template) {
        ("GET", "/cluster/firewall/ipset") => {
            let list = api.list(&Default::default()).await.map_err(PveError::write_failed)?;
            Ok(Value::Array(
                list.items
                    .iter()
                    .map(|s| {
                        let comment = s.spec.comment.as_ref().map(|c| json!(c));
                        listed(
                            "name",
                            &json!(s.meta().name),
                            comment.as_ref(),
                            digest(&json!(s.spec.entries)),
                        )
                    })
                    .collect(),
            ))
        }
        ("POST", "/cluster/firewall/ipset") => {
            if api.get_opt(&name).await.map_err(PveError::write_failed)?.is_some() {
                return Err(PveError::new(500, format!("IPSet '{name}' already exists")));
            }
            let spec = IPSetSpec { comment: params.get("comment").cloned(), entries: vec![] };
            api.create(&PostParams::default(), &IPSet::new(&name, spec))
                .await
                .map_err(PveError::write_failed)?;
            Ok(Value::Null)
        }
        ("GET", "/cluster/firewall/ipset/{name}") => {
            let set = api.get_opt(&name).await.map_err(PveError::write_failed)?.ok_or_else(missing)?;
            Ok(Value::Array(entries_shown(&stored_entries(&set.spec.entries))))
        }
        ("POST", "/cluster/firewall/ipset/{name}") => {
            let cidr = params["cidr"].clone();
            kpve_crds::firewall::lang::parse_net(&cidr).map_err(|e| param_error("cidr", e))?;
            edit(Api::<IPSet>::all(client.clone()), &name, "/spec", |s| {
                edit_entry(&mut s["entries"], method, &cidr, params)
            })
            .await?;
            Ok(Value::Null)
        }
        ("DELETE", "/cluster/firewall/ipset/{name}") => {
            let set = api.get_opt(&name).await.map_err(PveError::write_failed)?.ok_or_else(missing)?;
            if !set.spec.entries.is_empty() && params.get("force").is_none_or(|f| f != "1") {
                return Err(PveError::new(500, format!("IPSet '{name}' is not empty")));
            }
            api.delete(&name, &DeleteParams::default()).await.map_err(PveError::write_failed)?;
            Ok(Value::Null)
        }
        (_, "/cluster/firewall/ipset/{name}/{cidr}") => {
            let cidr = params["cidr"].clone();
            let set = api.get_opt(&name).await.map_err(PveError::write_failed)?.ok_or_else(missing)?;
            if method == "GET" {
                return entries_shown(&stored_entries(&set.spec.entries))
                    .into_iter()
                    .find(|e| e["cidr"] == cidr)
                    .ok_or_else(|| PveError::new(500, format!("no such IP/Network '{cidr}'")));
            }
            edit(Api::<IPSet>::all(client.clone()), &name, "/spec", |s| {
                edit_entry(&mut s["entries"], method, &cidr, params)
            })
            .await?;
            Ok(Value::Null)
        }
        _ => Err(PveError::not_implemented(method, template)),
    }
}

/// Typed IP set entries as stored JSON.
fn stored_entries(entries: &[kpve_crds::firewall::IpSetEntry]) -> Vec<Value> {
    entries.iter().filter_map(|e| serde_json::to_value(e).ok()).collect()
}

/// `…/firewall/aliases[/{name}]` of the cluster or a guest: the section's `aliases` list.
async fn aliases(
    client: &kube::Client,
    owner: &Owner,
    method: &str,
    one: bool,
    params: &Params,
) -> Result<Value, PveError> {
    let section = owner.read(client).await?;
    let list: Vec<Value> = section.get("aliases").and_then(Value::as_array).cloned().unwrap_or_default();
    let current = digest(&json!(list));
    let name = params.get("name").cloned().unwrap_or_default();
    let shown = |a: &Value| {
        let mut e = a.clone();
        e["digest"] = json!(current);
        e
    };
    match (method, one) {
        ("GET", false) => Ok(Value::Array(list.iter().map(shown).collect())),
        ("GET", true) => list
            .iter()
            .find(|a| a["name"] == name)
            .map(shown)
            .ok_or_else(|| PveError::new(500, format!("no such alias '{name}'"))),
        ("POST", false) | ("PUT", true) | ("DELETE", true) => {
            check_digest(params, &current)?;
            if let Some(cidr) = params.get("cidr") {
                kpve_crds::firewall::lang::parse_net(cidr).map_err(|e| param_error("cidr", e))?;
            }
            owner
                .edit(client, |s| {
                    let map = s
                        .as_object_mut()
                        .ok_or_else(|| PveError::new(500, "firewall section is not an object"))?;
                    let entry = map.entry("aliases").or_insert_with(|| json!([]));
                    let list =
                        entry.as_array_mut().ok_or_else(|| PveError::new(500, "aliases is not a list"))?;
                    let found = list.iter().position(|a| a["name"] == name);
                    match (method, found) {
                        ("POST", Some(_)) => {
                            return Err(PveError::new(500, format!("alias '{name}' already exists")));
                        }
                        ("POST", None) => {
                            let mut a = json!({"name": name, "cidr": params["cidr"]});
                            if let Some(c) = params.get("comment") {
                                a["comment"] = json!(c);
                            }
                            list.push(a);
                        }
                        (_, None) => return Err(PveError::new(500, format!("no such alias '{name}'"))),
                        ("DELETE", Some(i)) => {
                            list.remove(i);
                        }
                        (_, Some(i)) => {
                            if let Some(c) = params.get("cidr") {
                                list[i]["cidr"] = json!(c);
                            }
                            if let Some(c) = params.get("comment") {
                                list[i]["comment"] = json!(c);
                            }
                            if let Some(r) = params.get("rename") {
                                list[i]["name"] = json!(r);
                            }
                        }
                    }
                    Ok(())
                })
                .await?;
            Ok(Value::Null)
        }
        _ => Err(PveError::not_implemented(method, "firewall aliases")),
    }
}

/// A guest's `firewall/ipset…`: the section's `ipsets` list (`ipfilter-net0` and others).
async fn guest_ipsets(
    client: &kube::Client,
    owner: &Owner,
    method: &str,
    tail: &str,
    params: &Params,
) -> Result<Value, PveError> {
    let section = owner.read(client).await?;
    let sets: Vec<Value> = section.get("ipsets").and_then(Value::as_array).cloned().unwrap_or_default();
    let name = params.get("name").map(|n| n.to_ascii_lowercase()).unwrap_or_default();
    let cidr = params.get("cidr").cloned().unwrap_or_default();
    let set = sets.iter().find(|s| s["name"] == name);
    let entries_of =
        |set: &Value| entries_shown(set.get("entries").and_then(Value::as_array).map_or(&[], Vec::as_slice));
    match (method, tail) {
        ("GET", "") => Ok(Value::Array(
            sets.iter().map(|s| listed("name", &s["name"], s.get("comment"), digest(s))).collect(),
        )),
        ("GET", "{name}") => set
            .map(|s| Value::Array(entries_of(s)))
            .ok_or_else(|| PveError::new(500, format!("no such IPSet '{name}'"))),
        ("GET", "{name}/{cidr}") => set
            .and_then(|s| entries_of(s).into_iter().find(|e| e["cidr"] == cidr))
            .ok_or_else(|| PveError::new(500, format!("no such IP/Network '{cidr}'"))),
        _ => {
            if !cidr.is_empty() {
                kpve_crds::firewall::lang::parse_net(&cidr).map_err(|e| param_error("cidr", e))?;
            }
            owner
                .edit(client, |s| {
                    let map = s
                        .as_object_mut()
                        .ok_or_else(|| PveError::new(500, "firewall section is not an object"))?;
                    let entry = map.entry("ipsets").or_insert_with(|| json!([]));
                    let sets =
                        entry.as_array_mut().ok_or_else(|| PveError::new(500, "ipsets is not a list"))?;
                    let index = sets.iter().position(|s| s["name"] == name);
                    let missing = || PveError::new(500, format!("no such IPSet '{name}'"));
                    match (method, tail) {
                        ("POST", "") => {
                            if index.is_some() {
                                return Err(PveError::new(500, format!("IPSet '{name}' already exists")));
                            }
                            let mut set = json!({"name": name, "entries": []});
                            if let Some(c) = params.get("comment") {
                                set["comment"] = json!(c);
                            }
                            sets.push(set);
                            Ok(())
                        }
                        ("DELETE", "{name}") => {
                            let i = index.ok_or_else(missing)?;
                            let empty =
                                sets[i].get("entries").and_then(Value::as_array).is_none_or(Vec::is_empty);
                            if !empty && params.get("force").is_none_or(|f| f != "1") {
                                return Err(PveError::new(500, format!("IPSet '{name}' is not empty")));
                            }
                            sets.remove(i);
                            Ok(())
                        }
                        ("POST", "{name}") | ("PUT" | "DELETE", "{name}/{cidr}") => {
                            let i = index.ok_or_else(missing)?;
                            edit_entry(&mut sets[i]["entries"], method, &cidr, params)
                        }
                        _ => Err(PveError::not_implemented(method, "guest firewall ipset")),
                    }
                })
                .await?;
            Ok(Value::Null)
        }
    }
}

/// The firewall endpoints; `None` when `template` is not one of them.
pub async fn handle(
    guests: &Guests,
    method: &str,
    template: &str,
    generic: &str,
    kind: Option<Kind>,
    params: &Params,
) -> Option<Result<Value, PveError>> {
    let client = &guests.client;
    let result = match generic {
        "/cluster/firewall/rules" => rules(client, &Owner::Cluster, method, false, params).await,
        "/cluster/firewall/rules/{pos}" => rules(client, &Owner::Cluster, method, true, params).await,
        "/cluster/firewall/options" => options(client, &Owner::Cluster, method, params).await,
        t if t.starts_with("/cluster/firewall/groups") => groups(client, method, t, params).await,
        t if t.starts_with("/cluster/firewall/ipset") => ipsets(client, method, t, params).await,
        "/nodes/{node}/firewall/rules" => {
            rules(client, &Owner::Host(params["node"].clone()), method, false, params).await
        }
        "/nodes/{node}/firewall/rules/{pos}" => {
            rules(client, &Owner::Host(params["node"].clone()), method, true, params).await
        }
        "/nodes/{node}/firewall/options" => {
            options(client, &Owner::Host(params["node"].clone()), method, params).await
        }
        "/cluster/firewall/aliases" => aliases(client, &Owner::Cluster, method, false, params).await,
        "/cluster/firewall/aliases/{name}" => aliases(client, &Owner::Cluster, method, true, params).await,
        t if t.starts_with("/nodes/{node}/{type}/{vmid}/firewall/") => {
            let guest = match guests::find(guests, kind?, &params["node"], &params["vmid"]).await {
                Ok(g) => g,
                Err(e) => return Some(Err(e)),
            };
            let owner = Owner::Guest(Box::new(guest));
            match t.trim_start_matches("/nodes/{node}/{type}/{vmid}/firewall/") {
                "options" => options(client, &owner, method, params).await,
                "rules" => rules(client, &owner, method, false, params).await,
                "rules/{pos}" => rules(client, &owner, method, true, params).await,
                "aliases" => aliases(client, &owner, method, false, params).await,
                "aliases/{name}" => aliases(client, &owner, method, true, params).await,
                "ipset" => guest_ipsets(client, &owner, method, "", params).await,
                "ipset/{name}" => guest_ipsets(client, &owner, method, "{name}", params).await,
                "ipset/{name}/{cidr}" => guest_ipsets(client, &owner, method, "{name}/{cidr}", params).await,
                _ => Err(PveError::not_implemented(method, template)),
            }
        }
        _ => return None,
    };
    Some(result)
}
