//! API discovery documents: aggregated discovery (`apidiscovery.k8s.io/v2`, what kubectl 1.32
//! and kube-rs ask for first), the legacy `APIVersions` / `APIGroupList` / `APIGroup` /
//! `APIResourceList` fallbacks, and the `/version` body. Everything is derived from the
//! [`Registry`], so a CRD change is visible on the next request.

use std::cmp::Ordering;

use serde_json::{Map, Value, json};

use crate::resources::{Registry, ResourceType};

/// Content-Type of an aggregated discovery response; kubectl and kube-rs only treat the body as
/// aggregated when the response carries exactly this media type.
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// The Kubernetes version we claim to speak (the CRD/OpenAPI features are those of 1.33).
pub const GIT_VERSION: &str = "v1.33.0-kpve";

/// Every resource supports the full verb set; the server implements them generically.
const VERBS: [&str; 8] = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];

/// Aggregated discovery (apidiscovery.k8s.io/v2 `APIGroupDiscoveryList`). `core = true` gives
/// the document for `GET /api` (one item, `metadata.name: ""`), `false` the one for `GET /apis`
/// (every non-core group, each with `versions[]` in preference order).
pub fn aggregated(registry: &Registry, core: bool) -> Value {
    let items: Vec<Value> = registry
        .groups()
        .into_iter()
        .filter(|(group, _)| group.is_empty() == core)
        .map(|(group, versions)| {
            let versions: Vec<Value> = sorted_versions(versions)
                .into_iter()
                .map(|version| {
                    let resources: Vec<Value> =
                        registry.types_in(&group, &version).into_iter().map(aggregated_resource).collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

fn aggregated_resource(rt: &ResourceType) -> Value {
    let response_kind = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
    let mut r = Map::new();
    r.insert("resource".into(), json!(rt.plural));
    r.insert("responseKind".into(), response_kind.clone());
    r.insert("scope".into(), json!(if rt.namespaced { "Namespaced" } else { "Cluster" }));
    r.insert("singularResource".into(), json!(rt.singular));
    r.insert("verbs".into(), json!(VERBS));
    // Omitted when empty, as kube-apiserver does (Go `omitempty`).
    if !rt.short_names.is_empty() {
        r.insert("shortNames".into(), json!(rt.short_names));
    }
    if !rt.categories.is_empty() {
        r.insert("categories".into(), json!(rt.categories));
    }
    if rt.status_subresource {
        r.insert(
            "subresources".into(),
            json!([{"subresource": "status", "responseKind": response_kind, "verbs": STATUS_VERBS}]),
        );
    }
    Value::Object(r)
}

/// Legacy `GET /api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// Legacy `GET /apis`: every non-core group.
pub fn api_group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .groups()
        .into_iter()
        .filter(|(group, _)| !group.is_empty())
        .map(|(group, versions)| group_body(&group, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Legacy `GET /apis/<group>`, or `None` for an unknown group (the caller answers 404).
pub fn api_group(registry: &Registry, group: &str) -> Option<Value> {
    if group.is_empty() {
        return None;
    }
    let (group, versions) = registry.groups().into_iter().find(|(g, _)| g == group)?;
    let mut body = Map::new();
    body.insert("kind".into(), json!("APIGroup"));
    body.insert("apiVersion".into(), json!("v1"));
    if let Value::Object(fields) = group_body(&group, versions) {
        body.extend(fields);
    }
    Some(Value::Object(body))
}

fn group_body(group: &str, versions: Vec<String>) -> Value {
    let versions: Vec<Value> = sorted_versions(versions)
        .into_iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": versions, "preferredVersion": preferred})
}

/// Legacy `GET /api/v1` (`group = ""`) or `GET /apis/<group>/<version>`, or `None` when that
/// group/version is not served.
pub fn api_resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types = registry.types_in(group, version);
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for rt in types {
        let mut r = Map::new();
        r.insert("name".into(), json!(rt.plural));
        r.insert("singularName".into(), json!(rt.singular));
        r.insert("namespaced".into(), json!(rt.namespaced));
        r.insert("kind".into(), json!(rt.kind));
        r.insert("verbs".into(), json!(VERBS));
        if !rt.short_names.is_empty() {
            r.insert("shortNames".into(), json!(rt.short_names));
        }
        if !rt.categories.is_empty() {
            r.insert("categories".into(), json!(rt.categories));
        }
        resources.push(Value::Object(r));
        if rt.status_subresource {
            // Subresources are listed as "<plural>/<sub>" with an empty singularName, as
            // kube-apiserver does; kubectl skips names containing '/' when resolving.
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The `GET /version` body. kube-rs deserializes it into k8s-openapi's `Info`, whose fields are
/// all required strings, so every field is present.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": GIT_VERSION,
        "gitCommit": option_env!("KPVE_GIT_COMMIT").unwrap_or("unknown"),
        "gitTreeState": "clean",
        "buildDate": option_env!("KPVE_BUILD_DATE").unwrap_or("1970-01-01T00:00:00Z"),
        "goVersion": "n/a (rust)",
        "compiler": "rustc",
        "platform": platform(),
    })
}

/// `GOOS/GOARCH` spelling of the build target, since clients compare it with Go names.
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("{}/{}", std::env::consts::OS, arch)
}

/// Versions in Kubernetes preference order (`version.CompareKubeAwareVersionStrings`): GA before
/// beta before alpha, higher numbers first; versions that do not look like `vN[alpha|betaM]`
/// come last, alphabetically.
pub fn sorted_versions(mut versions: Vec<String>) -> Vec<String> {
    versions.sort_by(|a, b| compare_versions(a, b));
    versions
}

fn compare_versions(a: &str, b: &str) -> Ordering {
    match (kube_version(a), kube_version(b)) {
        // Larger tuple = more preferred, so reverse for "preferred first".
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// `(stability, major, minor)` with stability GA=2, beta=1, alpha=0, so that comparing the tuples
/// compares preference.
fn kube_version(v: &str) -> Option<(u8, u64, u64)> {
    let rest = v.strip_prefix('v')?;
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let (major, tail) = rest.split_at(digits);
    if major.is_empty() || major.starts_with('0') {
        return None;
    }
    let major: u64 = major.parse().ok()?;
    if tail.is_empty() {
        return Some((2, major, 0));
    }
    let (stability, minor) = if let Some(m) = tail.strip_prefix("beta") {
        (1, m)
    } else if let Some(m) = tail.strip_prefix("alpha") {
        (0, m)
    } else {
        return None;
    };
    if minor.is_empty() || minor.starts_with('0') || !minor.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stability, major, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::new(&kpve_crds::crdgen::all())
    }

    fn find<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
        list.as_array().expect("array").iter().find(|r| r[key] == name).unwrap_or_else(|| panic!("{name}"))
    }

    #[test]
    fn aggregated_apis_has_virtualmachines() {
        let doc = aggregated(&registry(), false);
        assert_eq!(doc["kind"], "APIGroupDiscoveryList");
        assert_eq!(doc["apiVersion"], "apidiscovery.k8s.io/v2");
        let items = &doc["items"];
        assert!(items.as_array().expect("items").iter().all(|i| i["metadata"]["name"] != ""));
        let kpve = items
            .as_array()
            .expect("items")
            .iter()
            .find(|i| i["metadata"]["name"] == "kpve.io")
            .expect("kpve");
        let v = &kpve["versions"][0];
        assert_eq!(v["version"], "v1alpha1");
        assert_eq!(v["freshness"], "Current");
        let vm = find(&v["resources"], "resource", "virtualmachines");
        assert_eq!(
            vm["responseKind"],
            json!({"group": "kpve.io", "version": "v1alpha1", "kind": "VirtualMachine"})
        );
        assert_eq!(vm["scope"], "Namespaced");
        assert_eq!(vm["singularResource"], "virtualmachine");
        assert_eq!(vm["shortNames"], json!(["vm", "vms"]));
        assert_eq!(vm["categories"], json!(["kpve"]));
        assert_eq!(vm["verbs"].as_array().expect("verbs").len(), 8);
        assert_eq!(vm["subresources"][0]["subresource"], "status");
        assert_eq!(vm["subresources"][0]["verbs"], json!(["get", "patch", "update"]));
        assert_eq!(vm["subresources"][0]["responseKind"]["kind"], "VirtualMachine");
        let hv = find(&v["resources"], "resource", "hypervisors");
        assert_eq!(hv["scope"], "Cluster");
        let groups: Vec<&str> = items
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["metadata"]["name"].as_str().expect("name"))
            .collect();
        for g in ["apiextensions.k8s.io", "coordination.k8s.io", "events.k8s.io", "kpve.io"] {
            assert!(groups.contains(&g), "{g}");
        }
        // The Lease has no short names or categories: omitted, not empty.
        let coord =
            items.as_array().expect("items").iter().find(|i| i["metadata"]["name"] == "coordination.k8s.io");
        let lease = &coord.expect("coordination")["versions"][0]["resources"][0];
        assert_eq!(lease["resource"], "leases");
        assert!(lease.get("shortNames").is_none() && lease.get("categories").is_none());
        assert!(lease.get("subresources").is_none());
    }

    #[test]
    fn aggregated_core() {
        let doc = aggregated(&registry(), true);
        let items = doc["items"].as_array().expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "");
        let v1 = &items[0]["versions"][0];
        assert_eq!(v1["version"], "v1");
        let ns = find(&v1["resources"], "resource", "namespaces");
        assert_eq!(ns["scope"], "Cluster");
        assert_eq!(ns["shortNames"], json!(["ns"]));
        assert_eq!(ns["responseKind"]["group"], "");
        let ev = find(&v1["resources"], "resource", "events");
        assert_eq!(ev["scope"], "Namespaced");
    }

    #[test]
    fn legacy_documents() {
        let reg = registry();
        let v = api_versions("10.0.0.1:6443");
        assert_eq!(v["versions"], json!(["v1"]));
        assert_eq!(v["serverAddressByClientCIDRs"][0]["serverAddress"], "10.0.0.1:6443");

        let list = api_group_list(&reg);
        assert_eq!(list["kind"], "APIGroupList");
        let kpve = find(&list["groups"], "name", "kpve.io");
        assert_eq!(
            kpve["preferredVersion"],
            json!({"groupVersion": "kpve.io/v1alpha1", "version": "v1alpha1"})
        );
        assert!(list["groups"].as_array().expect("groups").iter().all(|g| g["name"] != ""));

        let g = api_group(&reg, "kpve.io").expect("group");
        assert_eq!(g["kind"], "APIGroup");
        assert_eq!(g["name"], "kpve.io");
        assert!(api_group(&reg, "nope.io").is_none());
        assert!(api_group(&reg, "").is_none());

        let rl = api_resource_list(&reg, "kpve.io", "v1alpha1").expect("resources");
        assert_eq!(rl["groupVersion"], "kpve.io/v1alpha1");
        let vm = find(&rl["resources"], "name", "virtualmachines");
        assert_eq!(vm["namespaced"], true);
        assert_eq!(vm["singularName"], "virtualmachine");
        assert_eq!(vm["shortNames"], json!(["vm", "vms"]));
        let status = find(&rl["resources"], "name", "virtualmachines/status");
        assert_eq!(status["verbs"], json!(["get", "patch", "update"]));
        let core = api_resource_list(&reg, "", "v1").expect("core");
        assert_eq!(core["groupVersion"], "v1");
        find(&core["resources"], "name", "namespaces/status");
        assert!(api_resource_list(&reg, "kpve.io", "v9").is_none());

        // Parses as the k8s-openapi types clients use.
        let _: k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList =
            serde_json::from_value(rl).expect("APIResourceList");
        let _: k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroupList =
            serde_json::from_value(list).expect("APIGroupList");
        let _: k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroup =
            serde_json::from_value(g).expect("APIGroup");
        let _: k8s_openapi::apimachinery::pkg::apis::meta::v1::APIVersions =
            serde_json::from_value(v).expect("APIVersions");
    }

    #[test]
    fn version_body_parses_as_info() {
        let info: k8s_openapi::apimachinery::pkg::version::Info =
            serde_json::from_value(version()).expect("Info");
        assert_eq!(info.major, "1");
        assert_eq!(info.minor, "33");
        assert_eq!(info.git_version, "v1.33.0-kpve");
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(info.platform, "linux/amd64");
        }
    }

    #[test]
    fn version_preference_order() {
        let got = sorted_versions(
            ["v1alpha1", "foo", "v1", "v2beta1", "v1beta2", "v2", "v11alpha2", "bar", "v1beta1", "v10"]
                .map(String::from)
                .to_vec(),
        );
        assert_eq!(
            got,
            ["v10", "v2", "v1", "v2beta1", "v1beta2", "v1beta1", "v11alpha2", "v1alpha1", "bar", "foo"]
        );
    }
}
