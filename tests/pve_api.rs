//! The Proxmox VE API on its own port, driven by proxmoxer and requests the way Proxmox
//! clients use it: root@pam logs in with the generated password, reads the version, the
//! nodes, the guests (a VM created with kubectl shows up with a numeric vmid) and the next
//! free VMID (a JSON string); wrong passwords, missing tickets, missing CSRF tokens, bad
//! parameters and unknown routes get Proxmox's status codes and reason phrases.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{Server, vm_manifest, wait_until};

const CLIENT: &str = r#"
import json, sys, time, warnings
import requests
from proxmoxer import ProxmoxAPI
warnings.filterwarnings("ignore")
port, password = sys.argv[1], sys.argv[2]
base = f"https://127.0.0.1:{port}/api2/json"
out = {}
p = ProxmoxAPI("127.0.0.1", port=int(port), user="root@pam", password=password, verify_ssl=False)
out["version"] = p.version.get()
out["nodes"] = p.nodes.get()
out["resources"] = p.cluster.resources.get(type="vm")
out["all"] = p.cluster.resources.get()
out["nextid"] = p.cluster.nextid.get()
try:
    p.cluster.nextid.get(vmid=100)
except Exception as e:
    out["taken"] = str(e)

def call(method, path, **kw):
    t = time.time()
    r = requests.request(method, base + path, verify=False, **kw)
    return {"status": r.status_code, "reason": r.reason, "body": r.text, "seconds": time.time() - t}

out["wrong_password"] = call("POST", "/access/ticket", data={"username": "root@pam", "password": "nope"})
out["no_ticket"] = call("GET", "/version")
login = requests.post(base + "/access/ticket", data={"username": "root", "realm": "pam", "password": password}, verify=False).json()["data"]
cookie = {"PVEAuthCookie": login["ticket"]}
out["ticket"] = login["ticket"]
out["no_csrf"] = call("POST", "/cluster/nextid", cookies=cookie)
out["header_ticket"] = call("GET", "/version", headers={"Authorization": "PVEAuthCookie=" + login["ticket"]})
out["bad_param"] = call("GET", "/cluster/resources", params={"type": "bogus"}, cookies=cookie)
out["unknown"] = call("GET", "/nope", cookies=cookie)
print(json.dumps(out))
"#;

#[test]
fn proxmoxer_logs_in_and_reads_the_inventory() {
    let have = Command::new("python3")
        .args(["-c", "import proxmoxer, requests"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var("KPVE_REQUIRE_HOST").is_err(),
            "proxmoxer and requests are required (scripts/install-host-deps.sh --test)"
        );
        eprintln!("skipping: proxmoxer not installed");
        return;
    }
    let server = Server::start_with_agent();
    let password_file = server.data_dir().join("pve-root-password");
    let meta = std::fs::metadata(&password_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the root password is private");
    let password = std::fs::read_to_string(&password_file).unwrap().trim().to_string();
    server.kubectl_stdin(&["apply", "-f", "-"], Some(&vm_manifest("web", 2, "")));
    wait_until("web scheduled", || {
        let out = server.kubectl(&["get", "vm", "web", "-o", "jsonpath={.status.node}"]);
        String::from_utf8_lossy(&out.stdout) == "node1"
    });

    let out = Command::new("python3")
        .args(["-c", CLIENT, &server.pve_port.to_string(), &password])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert!(r["version"]["version"].as_str().unwrap().starts_with("9."), "{}", r["version"]);
    let nodes = r["nodes"].as_array().unwrap();
    assert!(
        nodes.iter().any(|n| n["node"] == "node1" && n["status"] == "online" && n["maxcpu"].is_number()),
        "{nodes:?}"
    );
    let vm = r["resources"].as_array().unwrap().iter().find(|g| g["name"] == "web").cloned().unwrap();
    assert_eq!(vm["vmid"], Value::from(100), "vmid is a JSON number: {vm}");
    assert_eq!(
        (vm["type"].as_str(), vm["id"].as_str(), vm["node"].as_str()),
        (Some("qemu"), Some("qemu/100"), Some("node1"))
    );
    assert_eq!(vm["maxmem"], Value::from(512u64 * 1024 * 1024));
    let all = r["all"].as_array().unwrap();
    assert!(
        all.iter().any(|e| e["type"] == "node")
            && all.iter().any(|e| e["type"] == "storage" && e["storage"] == "local")
    );
    assert_eq!(r["nextid"], Value::from("101"), "nextid is a JSON string");
    assert!(r["taken"].as_str().unwrap().contains("VM 100 already exists"), "{}", r["taken"]);

    let wrong = &r["wrong_password"];
    assert_eq!(
        (wrong["status"].as_u64(), wrong["reason"].as_str()),
        (Some(401), Some("authentication failure"))
    );
    assert!(wrong["seconds"].as_f64().unwrap() >= 2.9, "401s are delayed: {wrong}");
    assert_eq!(
        (r["no_ticket"]["status"].as_u64(), r["no_ticket"]["reason"].as_str()),
        (Some(401), Some("No ticket"))
    );
    let parts: Vec<&str> = r["ticket"].as_str().unwrap().split(':').collect();
    assert!(parts.len() > 3 && parts[0] == "PVE" && parts[1] == "root@pam", "{parts:?}");
    assert_eq!(
        (r["no_csrf"]["status"].as_u64(), r["no_csrf"]["reason"].as_str()),
        (Some(401), Some("Permission denied - invalid csrf token"))
    );
    assert_eq!(r["header_ticket"]["status"].as_u64(), Some(200), "Telmate sends the ticket in Authorization");
    let bad = &r["bad_param"];
    assert_eq!(
        (bad["status"].as_u64(), bad["reason"].as_str()),
        (Some(400), Some("Parameter verification failed."))
    );
    let body: Value = serde_json::from_str(bad["body"].as_str().unwrap()).unwrap();
    assert!(body["errors"]["type"].as_str().unwrap().contains("bogus"), "{body}");
    let unknown = &r["unknown"];
    assert_eq!(
        (unknown["status"].as_u64(), unknown["reason"].as_str()),
        (Some(501), Some("Method 'GET /nope' not implemented"))
    );
}
