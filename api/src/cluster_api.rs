//! `/cluster/ha/{groups,resources,status/current}` and `/pools`: HA groups are `HAGroup`
//! resources, an HA resource is a guest's `spec.ha` (`vm:100` / `ct:101`), and Proxmox pools
//! are namespaces. These endpoints declare; recovering guests is the HA manager's job.

use std::collections::BTreeMap;

use kpve_crds::k8s_openapi::api::core::v1::Namespace;
use kpve_crds::{DATACENTER, Datacenter, HAGroup, HAGroupSpec, HaState, LinuxContainer, VirtualMachine};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::envelope::PveError;
use crate::guests::{self, Guests, Kind};
use crate::validate::split_list;

type Params = BTreeMap<String, String>;

fn flag(params: &Params, key: &str) -> Option<bool> {
    params.get(key).map(|v| v == "1")
}

fn group_json(g: &HAGroup) -> Value {
    let mut e = json!({"group": g.name_any(), "type": "group", "nodes": g.spec.nodes_text(),
                       "restricted": u8::from(g.spec.restricted), "nofailback": u8::from(g.spec.nofailback)});
    if let Some(c) = &g.spec.comment {
        e["comment"] = json!(c);
    }
    e
}

/// `node[:priority],…` as HAGroup nodes.
fn parse_nodes(text: &str) -> Result<Vec<Value>, PveError> {
    split_list(text)
        .map(|entry| {
            let (node, priority) = match entry.split_once(':') {
                Some((n, p)) => (
                    n,
                    p.parse::<u32>().map_err(|_| bad("nodes", format!("invalid priority in '{entry}'")))?,
                ),
                None => (entry, 0),
            };
            Ok(json!({"node": node, "priority": priority}))
        })
        .collect()
}

fn bad(name: &str, message: String) -> PveError {
    PveError::parameters(BTreeMap::from([(name.to_string(), message)]))
}

async fn ha_groups(
    client: &kube::Client,
    method: &str,
    template: &str,
    p: &Params,
) -> Result<Value, PveError> {
    let api: Api<HAGroup> = Api::all(client.clone());
    match (method, template) {
        ("GET", "/cluster/ha/groups") => {
            let list = api.list(&Default::default()).await.map_err(PveError::write_failed)?;
            Ok(Value::Array(list.items.iter().map(group_json).collect()))
        }
        ("POST", "/cluster/ha/groups") => {
            let name = p["group"].to_ascii_lowercase();
            let spec: HAGroupSpec = serde_json::from_value(json!({
                "nodes": parse_nodes(&p["nodes"])?, "restricted": flag(p, "restricted").unwrap_or(false),
                "nofailback": flag(p, "nofailback").unwrap_or(false), "comment": p.get("comment"),
            }))
            .map_err(|e| bad("nodes", e.to_string()))?;
            api.create(&PostParams::default(), &HAGroup::new(&name, spec)).await.map_err(|e| match e {
                kube::Error::Api(ae) if ae.code == 409 => {
                    PveError::new(500, format!("ha group '{name}' already defined"))
                }
                e => PveError::write_failed(e),
            })?;
            Ok(Value::Null)
        }
        (_, "/cluster/ha/groups/{group}") => {
            let name = p["group"].to_ascii_lowercase();
            let g = api
                .get_opt(&name)
                .await
                .map_err(PveError::write_failed)?
                .ok_or_else(|| PveError::new(500, format!("no such ha group '{name}'")))?;
            match method {
                "GET" => Ok(group_json(&g)),
                "DELETE" => {
                    api.delete(&name, &DeleteParams::default()).await.map_err(PveError::write_failed)?;
                    Ok(Value::Null)
                }
                "PUT" => {
                    let mut spec = json!({});
                    if let Some(n) = p.get("nodes") {
                        spec["nodes"] = json!(parse_nodes(n)?);
                    }
                    for k in ["restricted", "nofailback"] {
                        if let Some(v) = flag(p, k) {
                            spec[k] = json!(v);
                        }
                    }
                    if let Some(c) = p.get("comment") {
                        spec["comment"] = json!(c);
                    }
                    for d in p
                        .get("delete")
                        .map(|d| split_list(d).map(str::to_string).collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        spec[d] = Value::Null;
                    }
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": spec})))
                        .await
                        .map_err(PveError::write_failed)?;
                    Ok(Value::Null)
                }
                _ => Err(PveError::not_implemented(method, template)),
            }
        }
        _ => Err(PveError::not_implemented(method, template)),
    }
}

/// `vm:100`, `ct:101` or a bare VMID → the guest.
async fn guest_of_sid(guests: &Guests, sid: &str) -> Result<guests::Guest, PveError> {
    let (kind, id) = match sid.split_once(':') {
        Some(("vm", id)) => (Some(Kind::Qemu), id),
        Some(("ct", id)) => (Some(Kind::Lxc), id),
        Some(_) => return Err(bad("sid", format!("unable to parse service id '{sid}'"))),
        None => (None, sid),
    };
    let vmid: u32 = id.parse().map_err(|_| bad("sid", format!("unable to parse service id '{sid}'")))?;
    guests::list(guests, kind)
        .await?
        .into_iter()
        .find(|g| g.vmid == vmid)
        .ok_or_else(|| PveError::new(500, format!("unable to find VM/CT {vmid}")))
}

fn sid(g: &guests::Guest) -> String {
    format!("{}:{}", if g.kind == Kind::Qemu { "vm" } else { "ct" }, g.vmid)
}

fn ha_json(g: &guests::Guest) -> Option<Value> {
    let ha = g.ha()?;
    let mut e = json!({
        "sid": sid(g), "type": if g.kind == Kind::Qemu { "vm" } else { "ct" },
        "state": serde_json::to_value(ha.state).ok()?, "max_restart": ha.max_restart, "max_relocate": ha.max_relocate,
        "digest": "",
    });
    if let Some(grp) = &ha.group {
        e["group"] = json!(grp);
    }
    if let Some(c) = &ha.comment {
        e["comment"] = json!(c);
    }
    Some(e)
}

async fn patch_guest(guests: &Guests, g: &guests::Guest, ha: Value) -> Result<(), PveError> {
    let patch = json!({"spec": {"ha": ha}});
    let params = PatchParams::default();
    let version = match g.kind {
        Kind::Qemu => Api::<VirtualMachine>::namespaced(guests.client.clone(), &g.namespace)
            .patch(&g.name, &params, &Patch::Merge(&patch))
            .await
            .map(|o| o.metadata.resource_version),
        Kind::Lxc => Api::<LinuxContainer>::namespaced(guests.client.clone(), &g.namespace)
            .patch(&g.name, &params, &Patch::Merge(&patch))
            .await
            .map(|o| o.metadata.resource_version),
    }
    .map_err(PveError::write_failed)?;
    // The next request reads the guest cache: wait until it shows this change.
    guests.settle(g, version.as_deref()).await;
    Ok(())
}

fn ha_fields(p: &Params) -> Result<Value, PveError> {
    let mut ha = json!({});
    if let Some(s) = p.get("state") {
        // Proxmox's "enabled" is the old name of "started".
        let s = if s == "enabled" { "started" } else { s.as_str() };
        let state: HaState = serde_json::from_value(json!(s))
            .map_err(|_| bad("state", format!("value '{s}' does not have a value in the enumeration 'started, stopped, disabled, ignored'")))?;
        ha["state"] = serde_json::to_value(state).unwrap_or(Value::Null);
    }
    if let Some(g) = p.get("group") {
        ha["group"] = json!(g);
    }
    for k in ["max_restart", "max_relocate"] {
        if let Some(v) = p.get(k) {
            let n: u32 =
                v.parse().map_err(|_| bad(k, format!("type check ('integer') failed - got '{v}'")))?;
            ha[if k == "max_restart" { "maxRestart" } else { "maxRelocate" }] = json!(n);
        }
    }
    if let Some(c) = p.get("comment") {
        ha["comment"] = json!(c);
    }
    Ok(ha)
}

async fn ha_resources(guests: &Guests, method: &str, template: &str, p: &Params) -> Result<Value, PveError> {
    match (method, template) {
        ("GET", "/cluster/ha/resources") => {
            let list = guests::list(guests, None).await?;
            Ok(Value::Array(list.iter().filter_map(ha_json).collect()))
        }
        ("POST", "/cluster/ha/resources") => {
            let g = guest_of_sid(guests, &p["sid"]).await?;
            if g.ha().is_some() {
                return Err(PveError::new(500, format!("resource ID '{}' already defined", sid(&g))));
            }
            patch_guest(guests, &g, ha_fields(p)?).await?;
            Ok(Value::Null)
        }
        (_, "/cluster/ha/resources/{sid}") => {
            let g = guest_of_sid(guests, &p["sid"]).await?;
            let missing = || PveError::new(500, format!("no such resource '{}'", sid(&g)));
            match method {
                "GET" => ha_json(&g).ok_or_else(missing),
                "PUT" => {
                    g.ha().ok_or_else(missing)?;
                    let mut ha = ha_fields(p)?;
                    for d in p
                        .get("delete")
                        .map(|d| split_list(d).map(str::to_string).collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        let field = match d.as_str() {
                            "max_restart" => "maxRestart",
                            "max_relocate" => "maxRelocate",
                            other => other,
                        };
                        ha[field] = Value::Null;
                    }
                    patch_guest(guests, &g, ha).await?;
                    Ok(Value::Null)
                }
                "DELETE" => {
                    g.ha().ok_or_else(missing)?;
                    patch_guest(guests, &g, Value::Null).await?;
                    Ok(Value::Null)
                }
                _ => Err(PveError::not_implemented(method, template)),
            }
        }
        ("GET", "/cluster/ha/status/current") => {
            let mut out = vec![json!({"id": "quorum", "type": "quorum", "status": "OK", "quorate": 1})];
            for g in guests::list(guests, None).await? {
                if let Some(ha) = g.ha() {
                    let state = serde_json::to_value(ha.state).unwrap_or(Value::Null);
                    let mut e = json!({"id": format!("service:{}", sid(&g)), "type": "service", "sid": sid(&g),
                                       "state": state, "request_state": state,
                                       "status": format!("{} ({})", sid(&g), state.as_str().unwrap_or(""))});
                    if let Some(node) = &g.status.node {
                        e["node"] = json!(node);
                    }
                    out.push(e);
                }
            }
            Ok(Value::Array(out))
        }
        _ => Err(PveError::not_implemented(method, template)),
    }
}

async fn pools(guests: &Guests, method: &str, template: &str, p: &Params) -> Result<Value, PveError> {
    let api: Api<Namespace> = Api::all(guests.client.clone());
    match (method, template) {
        ("GET", "/pools") => {
            let list = api.list(&Default::default()).await.map_err(PveError::write_failed)?;
            let wanted = p.get("poolid");
            Ok(Value::Array(
                list.items
                    .iter()
                    .filter(|n| wanted.is_none_or(|w| *w == n.name_any()))
                    .map(|n| {
                        let mut e = json!({"poolid": n.name_any()});
                        if let Some(c) = n.annotations().get("kpve.io/comment") {
                            e["comment"] = json!(c);
                        }
                        e
                    })
                    .collect(),
            ))
        }
        ("POST", "/pools") => {
            let name = p["poolid"].clone();
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": p.get("comment").map(|c| json!({"kpve.io/comment": c})).unwrap_or(json!({}))}
            }))
            .map_err(|e| bad("poolid", e.to_string()))?;
            api.create(&PostParams::default(), &ns).await.map_err(|e| match e {
                kube::Error::Api(ae) if ae.code == 409 => {
                    PveError::new(500, format!("pool '{name}' already exists"))
                }
                kube::Error::Api(ae) if ae.code == 422 => bad(
                    "poolid",
                    format!("a pool is a namespace: lower-case letters, digits and '-' ({})", ae.message),
                ),
                e => PveError::write_failed(e),
            })?;
            Ok(Value::Null)
        }
        (_, "/pools/{poolid}") => {
            let name = p["poolid"].clone();
            api.get_opt(&name)
                .await
                .map_err(PveError::write_failed)?
                .ok_or_else(|| PveError::new(500, format!("pool '{name}' does not exist")))?;
            let members: Vec<Value> = guests::list(guests, None)
                .await?
                .iter()
                .filter(|g| g.namespace == name)
                .map(|g| {
                    let mut e = g.entry();
                    e["pool"] = json!(name);
                    e
                })
                .collect();
            match method {
                "GET" => Ok(json!({"members": members})),
                "DELETE" if !members.is_empty() => {
                    Err(PveError::new(500, format!("pool '{name}' is not empty")))
                }
                "DELETE" => {
                    api.delete(&name, &DeleteParams::default()).await.map_err(PveError::write_failed)?;
                    Ok(Value::Null)
                }
                "PUT" if p.contains_key("vms") || p.contains_key("storage") => Err(PveError::new(
                    501,
                    "moving guests between pools is not supported: a pool is a namespace; recreate the guest in the other namespace",
                )),
                "PUT" => {
                    let patch = json!({"metadata": {"annotations": {"kpve.io/comment": p.get("comment")}}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .map_err(PveError::write_failed)?;
                    Ok(Value::Null)
                }
                _ => Err(PveError::not_implemented(method, template)),
            }
        }
        _ => Err(PveError::not_implemented(method, template)),
    }
}

/// HA and pool endpoints; `None` when `template` is not one of them.
/// `GET /cluster/options`: the Datacenter's options; property strings (`migration`,
/// `ha`, …) as objects, as Proxmox returns them.
async fn options(client: &kube::Client) -> Result<Value, PveError> {
    let api: Api<Datacenter> = Api::all(client.clone());
    let dc = api.get_opt(DATACENTER).await.map_err(PveError::read_failed)?;
    let put = match crate::schema::SCHEMA.route("PUT", &["cluster", "options"]) {
        crate::schema::Route::Found(endpoint, _) => Some(endpoint),
        _ => None,
    };
    let mut out = serde_json::Map::new();
    for (key, value) in dc.map(|d| d.spec.options).unwrap_or_default() {
        let format =
            put.and_then(|e| e.parameter(&key)).and_then(|p| p.get("format")).and_then(Value::as_object);
        let shown = match format {
            Some(format) => {
                let default_key = format.iter().find(|(_, d)| d.get("default_key").is_some()).map(|(k, _)| k);
                let mut object = serde_json::Map::new();
                // Property strings split on `,` only (`tag-style: color-map=a:FFFFFF;b:000000`).
                for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    match (item.split_once('='), default_key) {
                        (Some((k, v)), _) => object.insert(k.to_string(), json!(v)),
                        (None, Some(k)) => object.insert(k.clone(), json!(item)),
                        (None, None) => object.insert(item.to_string(), json!(1)),
                    };
                }
                Value::Object(object)
            }
            None => json!(value),
        };
        out.insert(key, shown);
    }
    Ok(Value::Object(out))
}

/// Changes the Datacenter's options with `edit` (creating the object if there is none).
pub async fn update_options(
    client: &kube::Client,
    edit: impl Fn(&mut BTreeMap<String, String>),
) -> Result<(), PveError> {
    let api: Api<Datacenter> = Api::all(client.clone());
    if api.get_opt(DATACENTER).await.map_err(PveError::read_failed)?.is_none() {
        let mut spec = kpve_crds::DatacenterSpec::default();
        edit(&mut spec.options);
        match api.create(&PostParams::default(), &Datacenter::new(DATACENTER, spec)).await {
            Ok(_) => return Ok(()),
            // Created meanwhile: edit that one.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(PveError::write_failed(e)),
        }
    }
    crate::cache::replace_retrying(&api, DATACENTER, |dc| {
        edit(&mut dc.spec.options);
        Ok(())
    })
    .await
    .map(|_| ())
}

pub async fn handle(
    guests: &Guests,
    method: &str,
    template: &str,
    params: &Params,
) -> Option<Result<Value, PveError>> {
    Some(match template {
        t if t.starts_with("/cluster/ha/groups") => ha_groups(&guests.client, method, t, params).await,
        t if t.starts_with("/cluster/ha/resources") || t == "/cluster/ha/status/current" => {
            ha_resources(guests, method, t, params).await
        }
        t if t == "/pools" || t == "/pools/{poolid}" => pools(guests, method, t, params).await,
        "/cluster/options" if method == "GET" => options(&guests.client).await,
        "/cluster/options" => {
            let delete: Vec<String> =
                params.get("delete").map(|d| split_list(d).map(str::to_string).collect()).unwrap_or_default();
            update_options(&guests.client, |options| {
                for (key, value) in params.iter().filter(|(k, _)| *k != "delete") {
                    options.insert(key.clone(), value.clone());
                }
                for key in &delete {
                    options.remove(key);
                }
            })
            .await
            .map(|()| Value::Null)
        }
        _ => return None,
    })
}
