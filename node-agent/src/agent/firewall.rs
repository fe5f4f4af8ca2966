//! The agent's firewall loop: watches every firewall input of this node (ClusterFirewall,
//! SecurityGroups, IPSets, this node's Hypervisor, the guests bound here), recompiles on any
//! change and applies the ruleset atomically when it differs from the one in force.
//!
//! Status: `Hypervisor.status.firewall` lists the generation of each input in force;
//! condition `FirewallReady` on the Hypervisor and on each firewalled guest says whether the
//! latest inputs are enforced, and when not (an IP set, alias or group that does not exist, a
//! ruleset the kernel refused) names the rule while the previous ruleset stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use kpve_crds::common::{Condition, GuestObject};
use kpve_crds::firewall::lang::{Net, parse_net};
use kpve_crds::{ClusterFirewall, Hypervisor, IPSet, LinuxContainer, SecurityGroup, VirtualMachine};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{Agent, condition, generated_mac, now};
use crate::firewall::{self, Guest, GuestNic, Inputs, RuleError, nft};

/// Condition type on the Hypervisor and on firewalled guests.
pub const FIREWALL_READY: &str = "FirewallReady";
/// The name of the one ClusterFirewall object (Proxmox has one cluster.fw).
pub const CLUSTER_FIREWALL: &str = "cluster";

fn watch<K>(api: Api<K>, config: watcher::Config, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::debug!(error = %e, "firewall watch error");
            }
            changed.notify_one();
        }
    });
    reader
}

struct Stores {
    cluster: Store<ClusterFirewall>,
    groups: Store<SecurityGroup>,
    ipsets: Store<IPSet>,
    hypervisors: Store<Hypervisor>,
    vms: Store<VirtualMachine>,
    cts: Store<LinuxContainer>,
}

/// What was last applied, to skip identical rulesets and unchanged status.
#[derive(Default)]
struct Applied {
    document: Option<Value>,
    /// `status.firewall` of the ruleset in force, and when it was applied.
    in_force: Option<Value>,
    applied_at: Option<String>,
    /// Whether the document in force loads kpve's tables (else it removed them).
    enabled: bool,
    /// The inputs of the last ruleset that compiled and loaded.
    inputs: Option<Inputs>,
    /// Number of rules the document in force loads.
    rules: u32,
    node_status: Option<Value>,
    guest_status: BTreeMap<String, Value>,
}

pub(crate) async fn run(agent: Arc<Agent>) -> anyhow::Result<()> {
    let client = agent.client.clone();
    let changed = Arc::new(Notify::new());
    let on_node = watcher::Config::default().fields(&format!("status.node={}", agent.node()));
    let stores = Stores {
        cluster: watch(Api::all(client.clone()), watcher::Config::default(), changed.clone()),
        groups: watch(Api::all(client.clone()), watcher::Config::default(), changed.clone()),
        ipsets: watch(Api::all(client.clone()), watcher::Config::default(), changed.clone()),
        hypervisors: watch(Api::all(client.clone()), watcher::Config::default(), changed.clone()),
        vms: watch(Api::all(client.clone()), on_node.clone(), changed.clone()),
        cts: watch(Api::all(client.clone()), on_node, changed.clone()),
    };
    for ready in [
        stores.cluster.wait_until_ready().await,
        stores.groups.wait_until_ready().await,
        stores.ipsets.wait_until_ready().await,
        stores.hypervisors.wait_until_ready().await,
        stores.vms.wait_until_ready().await,
        stores.cts.wait_until_ready().await,
    ] {
        ready?;
    }
    let mut applied = Applied::default();
    let mut next_check = tokio::time::Instant::now() + RESYNC;
    loop {
        let in_force = sync(&agent, &stores, &mut applied).await;
        // Watches drive the work; the timer only catches what no watch reports: a ruleset
        // someone else flushed (checked every RESYNC), or a failed apply (retried sooner).
        let retry = tokio::time::Instant::now() + RETRY;
        let wake = if in_force { next_check } else { next_check.min(retry) };
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
        if tokio::time::Instant::now() >= next_check {
            next_check = tokio::time::Instant::now() + RESYNC;
            let expected = applied.enabled.then_some(applied.rules);
            match nft::kpve_rules().await {
                Ok(found) if found == expected => {}
                Ok(_) => {
                    tracing::warn!("kpve's nftables tables changed behind the agent's back; re-applying");
                    applied.document = None;
                }
                Err(e) => tracing::warn!(error = %e, "cannot list nftables tables"),
            }
        }
    }
}

/// How often the agent checks that its tables are still loaded.
const RESYNC: std::time::Duration = std::time::Duration::from_secs(10);
/// How soon a failed apply is retried.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{}/{ns}/{}", K::kind(&()), obj.meta().name.as_deref().unwrap_or("")),
        None => format!("{}/{}", K::kind(&()), obj.meta().name.as_deref().unwrap_or("")),
    }
}

/// Inputs of this node's ruleset and the generation of each object they came from.
fn gather(agent: &Agent, stores: &Stores) -> (Inputs, BTreeMap<String, i64>, Vec<Arc<dyn GuestRef>>) {
    let mut generations = BTreeMap::new();
    let mut record = |k: String, g: Option<i64>| {
        generations.insert(k, g.unwrap_or(0));
    };
    let cluster = stores.cluster.get(&reflector::ObjectRef::new(CLUSTER_FIREWALL));
    if let Some(c) = &cluster {
        record(key(c.as_ref()), c.meta().generation);
    }
    let mut inputs = Inputs {
        node: agent.node().to_string(),
        cluster: cluster.map(|c| c.spec.clone()),
        ..Inputs::default()
    };
    for g in stores.groups.state() {
        record(key(g.as_ref()), g.meta().generation);
        inputs.groups.insert(g.name_any(), g.spec.clone());
    }
    for s in stores.ipsets.state() {
        record(key(s.as_ref()), s.meta().generation);
        inputs.ipsets.insert(s.name_any(), s.spec.clone());
    }
    if let Some(hv) = stores.hypervisors.get(&reflector::ObjectRef::new(agent.node())) {
        record(key(hv.as_ref()), hv.meta().generation);
        inputs.host = hv.spec.firewall.clone();
        inputs.bridges = hv.spec.bridges.iter().map(|b| b.name.clone()).collect();
    }
    let mut guests: Vec<Arc<dyn GuestRef>> = Vec::new();
    for vm in stores.vms.state() {
        guests.push(vm);
    }
    for ct in stores.cts.state() {
        guests.push(ct);
    }
    guests.retain(|g| g.node() == Some(agent.node()) && g.input().is_some());
    guests.sort_by_key(|g| g.input().map(|i| i.vmid));
    for g in &guests {
        if g.input().is_some_and(|i| i.firewall.is_some()) {
            generations.insert(g.key(), g.generation());
        }
        inputs.guests.extend(g.input());
    }
    (inputs, generations, guests)
}

/// A guest of either kind as the firewall sees it.
trait GuestRef: Send + Sync {
    fn key(&self) -> String;
    /// The object's uid: a guest deleted and created again under its name is another object.
    fn object_uid(&self) -> String;
    fn generation(&self) -> i64;
    fn node(&self) -> Option<&str>;
    fn input(&self) -> Option<Guest>;
    fn api(&self, client: kube::Client) -> (String, Api<kube::api::DynamicObject>);
}

/// What differs per kind: how the guest's NICs are plugged.
trait FirewallInput: GuestObject {
    fn input(&self) -> Option<Guest>;
}

impl<K: FirewallInput> GuestRef for K {
    fn key(&self) -> String {
        key(self)
    }
    fn object_uid(&self) -> String {
        self.uid().unwrap_or_default()
    }
    fn generation(&self) -> i64 {
        self.meta().generation.unwrap_or(0)
    }
    fn node(&self) -> Option<&str> {
        self.guest_status().and_then(|s| s.node.as_deref())
    }
    fn input(&self) -> Option<Guest> {
        FirewallInput::input(self)
    }
    fn api(&self, client: kube::Client) -> (String, Api<kube::api::DynamicObject>) {
        let ar = kube::api::ApiResource::erase::<K>(&());
        (self.name_any(), Api::namespaced_with(client, &self.namespace().unwrap_or_default(), &ar))
    }
}

fn nic_ips(ip: Option<&str>, ip6: Option<&str>) -> Vec<Net> {
    [ip, ip6]
        .into_iter()
        .flatten()
        .filter_map(|s| parse_net(s).ok().map(|n| Net::host(ip_of(s).unwrap_or(n.addr))))
        .collect()
}

fn ip_of(cidr: &str) -> Option<std::net::IpAddr> {
    cidr.split('/').next()?.parse().ok()
}

impl FirewallInput for VirtualMachine {
    fn input(&self) -> Option<Guest> {
        let vmid = self.spec.vmid?;
        let uid = self.uid().unwrap_or_default();
        let ips: BTreeMap<String, Vec<Net>> = self
            .spec
            .cloud_init
            .as_ref()
            .map(|c| {
                c.ip_config
                    .iter()
                    .map(|i| (i.id.replace("ipconfig", "net"), nic_ips(i.ip.as_deref(), i.ip6.as_deref())))
                    .collect()
            })
            .unwrap_or_default();
        Some(Guest {
            vmid,
            owner: key(self),
            firewall: self.spec.firewall.clone(),
            nics: self
                .spec
                .nics
                .iter()
                .enumerate()
                .map(|(index, nic)| GuestNic {
                    id: nic.id.clone(),
                    ifname: format!("tap{vmid}i{index}"),
                    mac: Some(nic.macaddr.clone().unwrap_or_else(|| generated_mac(&uid, index))),
                    bridge: nic.bridge.clone(),
                    firewall: nic.firewall,
                    ips: ips.get(&nic.id).cloned().unwrap_or_default(),
                })
                .collect(),
        })
    }
}

impl FirewallInput for LinuxContainer {
    fn input(&self) -> Option<Guest> {
        let vmid = self.spec.vmid?;
        let uid = self.uid().unwrap_or_default();
        Some(Guest {
            vmid,
            owner: key(self),
            firewall: self.spec.firewall.clone(),
            nics: self
                .spec
                .nics
                .iter()
                .map(|nic| {
                    let n: usize = nic.id.trim_start_matches("net").parse().unwrap_or(0);
                    GuestNic {
                        id: nic.id.clone(),
                        ifname: crate::lxc::config::veth_name(vmid, n),
                        mac: Some(nic.hwaddr.clone().unwrap_or_else(|| generated_mac(&uid, n))),
                        bridge: nic.bridge.clone(),
                        firewall: nic.firewall,
                        ips: nic_ips(nic.ip.as_deref(), nic.ip6.as_deref()),
                    }
                })
                .collect(),
        })
    }
}

fn manager(agent: &Agent) -> PatchParams {
    PatchParams::apply(&format!("kpve-firewall-{}", agent.node())).force()
}

/// Bridged IP traffic reaches the inet table's forward hook only through bridge netfilter.
fn ensure_bridge_netfilter() -> Option<String> {
    for family in ["iptables", "ip6tables"] {
        let path = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => {
                if let Err(e) = std::fs::write(&path, "1") {
                    return Some(format!(
                        "{path} is 0 and cannot be set ({e}): bridged guest traffic is not filtered"
                    ));
                }
            }
            Err(e) => return Some(format!("{path}: {e}: bridged guest traffic is not filtered")),
        }
    }
    None
}

/// A guest firewall that lets nothing in or out but established traffic.
fn fail_closed() -> kpve_crds::GuestFirewall {
    serde_json::from_value(json!({"enable": true, "policyIn": "DROP", "policyOut": "DROP", "ipfilter": true}))
        .expect("a valid guest firewall")
}

/// Loads `ruleset` unless it is what is in force: the changed sets and chains when the
/// tables keep their shape, else the whole document.
async fn apply(applied: &mut Applied, ruleset: &firewall::Ruleset) -> Result<(), String> {
    if applied.document.as_ref() == Some(&ruleset.document) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let delta = applied.document.as_ref().and_then(|prev| firewall::delta(prev, &ruleset.document));
    let mut result = nft::apply(delta.as_ref().unwrap_or(&ruleset.document)).await;
    if delta.is_some() && result.is_err() {
        // The kernel does not hold what the delta was computed against: load it all.
        tracing::warn!(error = %result.as_ref().unwrap_err(), "incremental firewall update refused; loading the whole ruleset");
        result = nft::apply(&ruleset.document).await;
    }
    match result {
        Ok(()) => {
            tracing::info!(
                enabled = ruleset.enabled,
                rules = ruleset.rules,
                elapsed_ms = started.elapsed().as_millis() as u64,
                incremental = delta.is_some(),
                "firewall ruleset applied"
            );
            applied.document = Some(ruleset.document.clone());
            applied.applied_at = Some(now());
            applied.enabled = ruleset.enabled;
            applied.rules = ruleset.rules;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "firewall ruleset not applied");
            Err(e.to_string())
        }
    }
}

/// One compile-and-apply round; true when the latest inputs are in force.
async fn sync(agent: &Agent, stores: &Stores, applied: &mut Applied) -> bool {
    let (inputs, generations, guests) = gather(agent, stores);
    let result = firewall::compile(&inputs);
    let outcome: Result<(bool, u32), (String, String, Vec<RuleError>)> = match result {
        Ok(ruleset) => match apply(applied, &ruleset).await {
            Ok(()) => {
                applied.inputs = Some(inputs);
                Ok((ruleset.enabled, ruleset.rules))
            }
            Err(e) => Err(("ApplyFailed".into(), e, Vec::new())),
        },
        Err(errors) => {
            let mut message = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
            tracing::warn!(%message, "firewall inputs refer to objects that do not exist; previous ruleset kept");
            message.push_str("; the previous ruleset stays in force");
            // The previous ruleset has no chains for a guest that arrived since: rather than
            // leave it unfiltered, such a guest is held fail-closed (both policies DROP) until
            // the inputs compile again.
            if let Some(last) = &applied.inputs {
                let mut fallback = last.clone();
                let known: BTreeSet<u32> = last.guests.iter().map(|g| g.vmid).collect();
                let held: Vec<Guest> = inputs
                    .guests
                    .iter()
                    .filter(|g| !known.contains(&g.vmid) && g.firewall.as_ref().is_some_and(|f| f.enable))
                    .map(|g| Guest { firewall: Some(fail_closed()), ..g.clone() })
                    .collect();
                if !held.is_empty() {
                    let vmids: Vec<String> = held.iter().map(|g| g.vmid.to_string()).collect();
                    fallback.guests.extend(held);
                    let loaded = match firewall::compile(&fallback) {
                        Ok(ruleset) => apply(applied, &ruleset).await.is_ok(),
                        Err(_) => false,
                    };
                    message.push_str(&if loaded {
                        format!("; new guests {} are held fail-closed", vmids.join(", "))
                    } else {
                        format!("; new guests {} could not be held fail-closed", vmids.join(", "))
                    });
                }
            }
            Err(("UnknownReference".into(), message, errors))
        }
    };
    let warning = match outcome {
        Ok((true, _)) => ensure_bridge_netfilter(),
        _ => None,
    };
    let in_force = outcome.is_ok();
    write_node_status(agent, &outcome, &generations, warning.as_deref(), applied).await;
    write_guest_status(agent, &outcome, &guests, warning.as_deref(), applied).await;
    in_force
}

async fn write_node_status(
    agent: &Agent,
    outcome: &Result<(bool, u32), (String, String, Vec<RuleError>)>,
    generations: &BTreeMap<String, i64>,
    warning: Option<&str>,
    applied: &mut Applied,
) {
    let cond: Condition = match (outcome, warning) {
        (Ok((true, rules)), None) => {
            condition(FIREWALL_READY, true, "Enforced", &format!("{rules} nftables rules in force"))
        }
        (Ok((true, _)), Some(w)) => condition(FIREWALL_READY, false, "BridgeFilterUnavailable", w),
        (Ok((false, _)), _) => condition(
            FIREWALL_READY,
            true,
            "Disabled",
            "the cluster firewall is disabled; kpve tables removed",
        ),
        (Err((reason, message, _)), _) => condition(FIREWALL_READY, false, reason, message),
    };
    let mut status = json!({"conditions": [cond]});
    if let Ok((enabled, rules)) = outcome {
        applied.in_force = Some(json!({"enabled": enabled, "inputs": generations, "rules": rules}));
    }
    // On an error the ruleset in force is still the last one: keep reporting it (an apply
    // without the field would remove it).
    if let Some(f) = &applied.in_force {
        status["firewall"] = f.clone();
    }
    if applied.node_status.as_ref() == Some(&status) {
        return;
    }
    let mut body = json!({"apiVersion": "kpve.io/v1alpha1", "kind": "Hypervisor", "status": status.clone()});
    body["status"]["conditions"][0]["lastTransitionTime"] = json!(now());
    if body["status"].get("firewall").is_some() {
        body["status"]["firewall"]["appliedAt"] = json!(applied.applied_at.clone().unwrap_or_else(now));
    }
    let hvs: Api<Hypervisor> = Api::all(agent.client.clone());
    match hvs.patch_status(agent.node(), &manager(agent), &Patch::Apply(&body)).await {
        Ok(_) => applied.node_status = Some(status),
        Err(e) => tracing::warn!(error = %e, "firewall status not written"),
    }
}

async fn write_guest_status(
    agent: &Agent,
    outcome: &Result<(bool, u32), (String, String, Vec<RuleError>)>,
    guests: &[Arc<dyn GuestRef>],
    warning: Option<&str>,
    applied: &mut Applied,
) {
    for g in guests {
        let Some(input) = g.input() else { continue };
        let Some(fw) = &input.firewall else { continue };
        let key = g.key();
        let filtered_nics = input.nics.iter().filter(|n| n.firewall).count();
        let status = match outcome {
            Ok((enabled, _)) => {
                let (ok, reason, message) = match (enabled, fw.enable, filtered_nics, warning) {
                    (false, ..) => (true, "Disabled", "the cluster firewall is disabled".to_string()),
                    (true, false, ..) => (true, "NotFiltered", "spec.firewall.enable is false".to_string()),
                    (true, true, 0, _) => (true, "NotFiltered", "no NIC has firewall: true".to_string()),
                    (true, true, _, Some(w)) => (false, "BridgeFilterUnavailable", w.to_string()),
                    (true, true, n, None) => {
                        let unknown: Vec<&str> = input
                            .nics
                            .iter()
                            .filter(|nic| nic.firewall && nic.ips.is_empty())
                            .map(|nic| nic.id.as_str())
                            .collect();
                        let mut m = format!("the guest's rules are in force on {n} NIC(s)");
                        if !unknown.is_empty() {
                            m.push_str(&format!(
                                "; {} have no static address, so traffic from the host itself to them is not filtered",
                                unknown.join(", ")
                            ));
                        }
                        (true, "Enforced", m)
                    }
                };
                json!({
                    "firewallGeneration": g.generation(),
                    "conditions": [condition(FIREWALL_READY, ok, reason, &message)],
                })
            }
            Err((reason, message, errors)) => {
                let own: Vec<String> =
                    errors.iter().filter(|e| e.owner == key).map(|e| e.to_string()).collect();
                let message = if own.is_empty() {
                    message.clone()
                } else {
                    format!("{}; the previous ruleset stays in force", own.join("; "))
                };
                json!({"conditions": [condition(FIREWALL_READY, false, reason, &message)]})
            }
        };
        let cache_key = format!("{key}#{}", g.object_uid());
        if applied.guest_status.get(&cache_key) == Some(&status) {
            continue;
        }
        let (name, api) = g.api(agent.client.clone());
        let mut body = json!({"apiVersion": "kpve.io/v1alpha1", "kind": key.split('/').next().unwrap_or(""), "status": status.clone()});
        body["status"]["conditions"][0]["lastTransitionTime"] = json!(now());
        match api.patch_status(&name, &manager(agent), &Patch::Apply(&body)).await {
            Ok(_) => {
                applied.guest_status.insert(cache_key, status);
            }
            Err(e) => tracing::debug!(error = %e, guest = %key, "guest firewall status not written"),
        }
    }
}
