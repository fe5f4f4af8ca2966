//! `/storage`, `/nodes/{node}/storage`, `…/{storage}/status` and `…/{storage}/content`, read
//! from StoragePool resources and the usage and content their node agents report.

use kpve_crds::StoragePool;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use crate::envelope::PveError;

/// A unit enum's serialized name (`dir`, `images`, `started`).
pub(crate) fn name_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

async fn pools(client: &kube::Client) -> Result<Vec<StoragePool>, PveError> {
    let api: Api<StoragePool> = Api::all(client.clone());
    Ok(api.list(&ListParams::default()).await.map_err(PveError::read_failed)?.items)
}

/// The pool's content types as Proxmox lists them (`images,rootdir`).
pub(crate) fn content_types(pool: &StoragePool) -> String {
    pool.spec.content.iter().map(name_of).collect::<Vec<_>>().join(",")
}

/// `GET /storage`: the datacenter's storage configuration.
pub async fn list(client: &kube::Client) -> Result<Value, PveError> {
    Ok(Value::Array(
        pools(client)
            .await?
            .iter()
            .map(|p| {
                let mut e = json!({"storage": p.name_any(), "type": name_of(&p.spec.type_), "content": content_types(p),
                                   "shared": u8::from(p.spec.shared)});
                if let Some(path) = &p.spec.path {
                    e["path"] = json!(path);
                }
                if p.spec.disable {
                    e["disable"] = json!(1);
                }
                e
            })
            .collect(),
    ))
}

fn node_status(p: &StoragePool, node: &str) -> Option<Value> {
    let n = p.status.as_ref()?.nodes.iter().find(|n| n.node == node)?;
    Some(json!({
        "storage": p.name_any(), "type": name_of(&p.spec.type_), "content": content_types(p),
        "active": u8::from(n.active), "enabled": u8::from(!p.spec.disable), "shared": u8::from(p.spec.shared),
        "total": n.total, "used": n.used, "avail": n.available,
        "used_fraction": if n.total > 0 { n.used as f64 / n.total as f64 } else { 0.0 },
    }))
}

/// `GET /nodes/{node}/storage`.
pub async fn on_node(client: &kube::Client, node: &str) -> Result<Value, PveError> {
    Ok(Value::Array(pools(client).await?.iter().filter_map(|p| node_status(p, node)).collect()))
}

async fn one(client: &kube::Client, storage: &str) -> Result<StoragePool, PveError> {
    pools(client)
        .await?
        .into_iter()
        .find(|p| p.name_any() == storage)
        .ok_or_else(|| PveError::new(500, format!("storage '{storage}' does not exist")))
}

/// `GET /nodes/{node}/storage/{storage}/status`.
pub async fn status(client: &kube::Client, node: &str, storage: &str) -> Result<Value, PveError> {
    let p = one(client, storage).await?;
    node_status(&p, node)
        .ok_or_else(|| PveError::new(500, format!("storage '{storage}' is not available on node '{node}'")))
}

/// `GET /nodes/{node}/storage/{storage}/content[?content=…&vmid=…]`: volume ids as the agent
/// reports them (`local:100/vm-100-disk-0.qcow2`, `local:vztmpl/…`, `local:iso/…`).
pub async fn content(
    client: &kube::Client,
    node: &str,
    storage: &str,
    kind: Option<&str>,
    vmid: Option<&str>,
) -> Result<Value, PveError> {
    let p = one(client, storage).await?;
    let volumes = p
        .status
        .as_ref()
        .and_then(|s| s.nodes.iter().find(|n| n.node == node))
        .map(|n| n.content.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for volid in volumes {
        let rel = volid.split_once(':').map(|(_, r)| r).unwrap_or(&volid);
        let (content, owner) = match rel.split_once('/') {
            Some(("vztmpl", _)) => ("vztmpl", None),
            Some(("iso", _)) => ("iso", None),
            Some((id, file)) => {
                (if file.starts_with("subvol-") { "rootdir" } else { "images" }, id.parse::<u32>().ok())
            }
            None => continue,
        };
        if kind.is_some_and(|k| k != content)
            || vmid.is_some_and(|v| owner.map(|o| o.to_string()).as_deref() != Some(v))
        {
            continue;
        }
        let format = match rel.rsplit_once('.') {
            Some((_, "qcow2")) => "qcow2",
            Some((_, "raw")) => "raw",
            Some((_, "subvol")) => "subvol",
            Some((_, "iso")) => "iso",
            _ => {
                if content == "vztmpl" {
                    "tgz"
                } else {
                    "raw"
                }
            }
        };
        let mut e = json!({"volid": volid, "content": content, "format": format});
        if let Some(o) = owner {
            e["vmid"] = json!(o);
        }
        out.push(e);
    }
    Ok(Value::Array(out))
}

/// `DELETE /nodes/{node}/storage/{storage}/content/{volume}`: adds a removal to the pool's
/// spec (the node's agent deletes the file) and returns an `imgdel` task that ends when the
/// agent no longer reports the volume. A volume a guest uses is refused (Proxmox would delete
/// it under the guest). Removals already done are dropped from the spec on the way.
pub async fn delete_volume(
    call: &crate::guests::Call<'_>,
    storage: &str,
    volume: &str,
) -> Result<Value, PveError> {
    let crate::guests::Call { guests, tasks, node, user } = *call;
    let volid = if volume.contains(':') { volume.to_string() } else { format!("{storage}:{volume}") };
    let (sid, rel) = volid.split_once(':').expect("has a colon");
    if sid != storage {
        let mut errors = std::collections::BTreeMap::new();
        errors.insert("volume".to_string(), format!("storage ID mismatch ({sid} != {storage})"));
        return Err(PveError::parameters(errors));
    }
    let plain = |f: &str| !f.is_empty() && f != "." && f != ".." && !f.contains('/');
    let owner_dir = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let (dir, file) = rel
        .split_once('/')
        .filter(|(d, f)| plain(f) && (*d == "iso" || *d == "vztmpl" || owner_dir(d)))
        .ok_or_else(|| PveError::new(500, format!("unable to parse directory volume name '{rel}'")))?;
    let p = one(&guests.client, storage).await?;
    for g in crate::guests::list(guests, None).await? {
        // What the agent reports, and what the spec names or will allocate (a stalled guest's
        // status may not list its volumes).
        if g.status.volumes.values().any(|v| *v == volid) || g.declared_volumes().contains(&volid) {
            let what = if g.kind == crate::guests::Kind::Qemu { "VM" } else { "CT" };
            return Err(PveError::new(500, format!("volume '{volid}' is in use by {what} {}", g.vmid)));
        }
    }
    let requested =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let content = |n: &str| -> Vec<String> {
        p.status
            .as_ref()
            .and_then(|s| s.nodes.iter().find(|x| x.node == n))
            .map(|x| x.content.clone())
            .unwrap_or_default()
    };
    let api: Api<StoragePool> = Api::all(guests.client.clone());
    crate::cache::replace_retrying(&api, storage, |pool| {
        pool.spec
            .removals
            .retain(|r| content(&r.node).contains(&r.volume) && requested.saturating_sub(r.requested) < 3600);
        pool.spec.removals.push(kpve_crds::VolumeRemoval {
            node: node.to_string(),
            volume: volid.clone(),
            requested,
        });
        Ok(())
    })
    .await?;
    let owner = dir.parse::<u32>().ok();
    let id = owner.map_or_else(|| storage.to_string(), |o| format!("{o}@{storage}"));
    tracing::info!(%volid, %user, "volume removal requested through the Proxmox API");
    tasks
        .record(crate::tasks::Task {
            node,
            kind: "imgdel",
            guest_kind: crate::guests::Kind::Qemu,
            vmid: owner.unwrap_or(0),
            id: Some(id),
            target: crate::tasks::Target::VolumeGone,
            user,
            log: Some(format!("removing volume '{volid}' ({file})")),
            error: None,
            volume: Some(volid.clone()),
        })
        .map(Value::from)
        .map_err(|e| PveError::new(500, e.to_string()))
}
