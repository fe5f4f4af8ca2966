//! The firewall compiler against Proxmox `.fw` inputs (`tests/input/firewall/<case>/`:
//! cluster.fw, host.fw, `<vmid>.fw`, and guests.json with the NICs the agent would plug):
//! golden snapshots of the nftables document, problems reported per rule, and the real
//! kernel accepting the document inside a private network namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kpve_crds::codec::fw::{parse_cluster_fw, parse_guest_fw, parse_host_fw};
use kpve_crds::firewall::lang::parse_net;
use kpve_node_agent::firewall::{Guest, GuestNic, Inputs, compile};
use serde_json::Value;

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/input/firewall").join(case)
}

fn inputs(case: &str) -> Inputs {
    let dir = case_dir(case);
    let cluster = parse_cluster_fw(&std::fs::read_to_string(dir.join("cluster.fw")).unwrap()).unwrap();
    let host = std::fs::read_to_string(dir.join("host.fw")).ok().map(|t| parse_host_fw(&t).unwrap());
    let guests: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("guests.json")).unwrap()).unwrap();
    let guests = guests
        .iter()
        .map(|g| {
            let vmid = g["vmid"].as_u64().unwrap() as u32;
            let firewall = std::fs::read_to_string(dir.join(format!("{vmid}.fw")))
                .ok()
                .map(|t| parse_guest_fw(&t).unwrap());
            Guest {
                vmid,
                owner: g["owner"].as_str().unwrap().to_string(),
                firewall,
                nics: g["nics"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| GuestNic {
                        id: n["id"].as_str().unwrap().into(),
                        ifname: n["ifname"].as_str().unwrap().into(),
                        mac: n["mac"].as_str().map(str::to_string),
                        bridge: n["bridge"].as_str().map(str::to_string),
                        firewall: n["firewall"].as_bool().unwrap(),
                        ips: n["ips"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|ip| parse_net(ip.as_str().unwrap()).unwrap())
                            .collect(),
                    })
                    .collect(),
            }
        })
        .collect();
    Inputs {
        node: "node1".into(),
        cluster: Some(cluster.spec),
        groups: cluster.groups.into_iter().collect::<BTreeMap<_, _>>(),
        ipsets: cluster.ipsets.into_iter().collect(),
        host,
        bridges: vec!["vmbr0".into()],
        guests,
    }
}

#[test]
fn basic_ruleset_matches_its_snapshot() {
    let ruleset = compile(&inputs("basic")).unwrap();
    assert!(ruleset.enabled);
    insta::assert_snapshot!("firewall_basic", serde_json::to_string_pretty(&ruleset.document).unwrap());
}

#[test]
fn unknown_ipset_alias_and_group_are_reported_per_rule() {
    let mut inp = inputs("basic");
    inp.ipsets.remove("admins");
    inp.groups.remove("web");
    inp.cluster.as_mut().unwrap().aliases.retain(|a| a.name != "office");
    let errors = compile(&inp).unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(
        has(
            "ClusterFirewall/cluster spec.rules[0]: IP set \"admins\" does not exist (rule: IN SSH(ACCEPT) -source +admins -log info)"
        ),
        "{text:#?}"
    );
    assert!(has("ClusterFirewall/cluster spec.rules[1]: alias \"office\" does not exist"), "{text:#?}");
    assert!(
        has("VirtualMachine/default/web1 spec.firewall.rules[2]: security group \"web\" does not exist"),
        "{text:#?}"
    );
    assert!(has("LinuxContainer/default/web2 spec.firewall.rules[0]: security group \"web\""), "{text:#?}");
}

#[test]
fn a_guest_without_firewall_flags_gets_no_chains() {
    let ruleset = compile(&inputs("basic")).unwrap();
    let text = ruleset.document.to_string();
    assert!(text.contains("g100-net0-in") && text.contains("g101-net0-in"));
    assert!(!text.contains("g101-net1"), "a NIC with firewall=0 is not filtered");
    assert!(!text.contains("g102-"), "a guest without a .fw is not filtered");
}

fn host_required() -> bool {
    std::env::var("KPVE_REQUIRE_HOST").is_ok_and(|v| v == "1")
}

/// The kernel loads the whole document, in a namespace of its own so the host's tables are
/// never touched; loading it twice replaces it (same rule count), and removal leaves only
/// the foreign table.
#[test]
fn the_kernel_accepts_the_compiled_ruleset() {
    let have_nft = Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_nft {
        assert!(!host_required(), "nft is required (KPVE_REQUIRE_HOST=1)");
        eprintln!("skipping: nft not installed");
        return;
    }
    let ns = format!("kpve-fwc-{}", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _guard = Ns(ns.clone());
    let nft = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "nft"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    nft(&["add", "table", "ip", "foreign"], None);
    let ruleset = compile(&inputs("basic")).unwrap();
    let doc = ruleset.document.to_string();
    nft(&["-j", "-f", "-"], Some(&doc));
    nft(&["-j", "-f", "-"], Some(&doc));
    let listed = nft(&["list", "ruleset"], None);
    assert!(listed.contains("table inet kpve") && listed.contains("table bridge kpve"), "{listed}");
    assert!(listed.contains("chain g100-net0-in"), "{listed}");
    let rules = listed
        .lines()
        .filter(|l| l.starts_with("\t\t") && !l.contains("type filter") && !l.trim().is_empty())
        .count();
    assert!(rules as u32 >= ruleset.rules, "{rules} listed < {} compiled", ruleset.rules);
    // What `nft list ruleset` prints reads back (backups and `nft -f` of a listing work).
    nft(&["-c", "-f", "-"], Some(&listed.replace("table ip foreign", "table ip foreign2")));
    // An incremental update (an IP set edit and a guest's rule edit) leaves exactly what a
    // full load of the new document would.
    let mut edited = inputs("basic");
    edited.ipsets.get_mut("admins").unwrap().entries[0].cidr = "10.7.0.0/16".into();
    edited.guests[0].firewall.as_mut().unwrap().rules[0].dport = Some("2222".into());
    let next = compile(&edited).unwrap().document;
    let delta = kpve_node_agent::firewall::delta(&ruleset.document, &next).expect("same chains and sets");
    assert!(delta.to_string().len() < doc.len() / 4, "a delta is small");
    nft(&["-j", "-f", "-"], Some(&delta.to_string()));
    let after_delta = nft(&["list", "ruleset"], None);
    nft(&["-j", "-f", "-"], Some(&next.to_string()));
    assert_eq!(after_delta, nft(&["list", "ruleset"], None));
    assert!(after_delta.contains("10.7.0.0/16") && after_delta.contains("2222"));

    nft(&["-j", "-f", "-"], Some(&kpve_node_agent::firewall::removal().to_string()));
    let listed = nft(&["list", "tables"], None);
    assert_eq!(listed.trim(), "table ip foreign");
}
