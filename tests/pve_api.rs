//! The Proxmox VE API on its own port, driven by proxmoxer and requests the way Proxmox
//! clients use it: root@pam logs in with the generated password, reads the version, the
//! nodes, the guests (a VM created with kubectl shows up with a numeric vmid) and the next
//! free VMID (a JSON string); starts and shuts down a container created with kubectl through
//! tasks it polls to `OK`, reads its status and its config in Proxmox format; wrong
//! passwords, missing tickets, missing CSRF tokens, bad parameters and unknown routes get
//! Proxmox's status codes and reason phrases.

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
from proxmoxer.tools import Tasks
node = p.nodes("node1")
out["lxc_list"] = node.lxc.get()
upid = node.lxc(101).status.start.post()
out["upid"] = upid
out["start_task"] = Tasks.blocking_status(p, upid, timeout=60)
out["lxc_current"] = node.lxc(101).status.current.get()
out["lxc_config"] = node.lxc(101).config.get()
try:
    node.lxc(101).status.start.post()
except Exception as e:
    out["start_again"] = str(e)
out["suspend_task"] = Tasks.blocking_status(p, node.lxc(101).status.suspend.post(), timeout=60)
out["resume_task"] = Tasks.blocking_status(p, node.lxc(101).status.resume.post(), timeout=60)
out["pid_before_reboot"] = node.lxc(101).status.current.get()["pid"]
out["reboot_task"] = Tasks.blocking_status(p, node.lxc(101).status.reboot.post(), timeout=60)
out["pid_after_reboot"] = node.lxc(101).status.current.get()["pid"]
out["storage"] = p.storage.get()
out["node_storage"] = node.storage.get()
out["storage_status"] = node.storage("local").status.get()
out["content"] = node.storage("local").content.get()
out["vztmpl"] = node.storage("local").content.get(content="vztmpl")
out["node_status"] = node.status.get()
out["cluster_status"] = p.cluster.status.get()
out["users"] = p.access.users.get(full=1)
out["perms"] = p.access.permissions.get(userid="root@pam", path="/")
stop = node.lxc(101).status.shutdown.post()
out["stop_task"] = Tasks.blocking_status(p, stop, timeout=60)
out["lxc_after"] = node.lxc(101).status.current.get()
out["task_log"] = node.tasks(upid).log.get()
out["task_list"] = node.tasks.get(vmid=101)
out["qemu_config"] = node.qemu(100).config.get()
try:
    node.qemu(999).status.current.get()
except Exception as e:
    out["missing"] = str(e)

import subprocess
kubeconfig = sys.argv[3]
def kubectl(*args):
    return subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True).stdout
created = node.qemu.post(vmid=200, name="apivm", memory=256, cores=1, scsi0="local:1")
out["create_upid"] = created
out["create_task"] = Tasks.blocking_status(p, created, timeout=60)
cfg = node.qemu(200).config.get()
out["create_cfg"] = cfg
out["kubectl_memory"] = kubectl("get", "vm", "vm-200", "-o", "jsonpath={.spec.memory.size}")
node.qemu(200).config.put(memory=384, digest=cfg["digest"])
out["updated_cfg"] = node.qemu(200).config.get()
out["kubectl_memory_after"] = kubectl("get", "vm", "vm-200", "-o", "jsonpath={.spec.memory.size}")
node.qemu(200).config.put(delete="name")
out["deleted_name"] = node.qemu(200).config.get()
try:
    node.qemu(200).config.put(memory=512, digest="0" * 40)
except Exception as e:
    out["stale_digest"] = str(e)
try:
    node.qemu(200).config.put(memory="lots")
except Exception as e:
    out["bad_memory"] = str(e)
try:
    node.qemu.post(vmid=200, memory=256)
except Exception as e:
    out["duplicate"] = str(e)
deleted = node.qemu(200).delete()
out["delete_task"] = Tasks.blocking_status(p, deleted, timeout=60)
out["after_delete"] = [g["vmid"] for g in p.cluster.resources.get(type="vm")]
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
    if !support::proxmoxer_available() {
        return;
    }
    let mut server = Server::start_with_agent();
    let password_file = server.data_dir().join("pve-root-password");
    let meta = std::fs::metadata(&password_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the root password is private");
    let password = std::fs::read_to_string(&password_file).unwrap().trim().to_string();
    support::install_busybox_template(server.data_dir());
    server.kubectl_stdin(&["apply", "-f", "-"], Some(&vm_manifest("web", 2, "")));
    let ct = format!(
        "apiVersion: kpve.io/v1alpha1\nkind: LinuxContainer\nmetadata: {{name: box, namespace: default}}\nspec:\n  vmid: 101\n  powerState: Stopped\n  hostname: box\n  template: local:vztmpl/{}.tar.gz\n  memory: 128\n  rootfs: {{pool: local, size: 1G}}\n  startup: {{down: 5}}\n",
        support::BUSYBOX_TEMPLATE
    );
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&ct));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (kind, name) in [("vm", "web"), ("ct", "box")] {
        wait_until(&format!("{name} scheduled"), || {
            let out = server.kubectl(&["get", kind, name, "-o", "jsonpath={.status.node}"]);
            String::from_utf8_lossy(&out.stdout) == "node1"
        });
    }

    let kubeconfig = server.kubeconfig();
    let port = server.pve_port.to_string();
    let r = support::run_client(
        Command::new("python3"),
        CLIENT,
        &[&port, &password, kubeconfig.to_str().unwrap()],
        &server,
    );

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
    assert_eq!(r["nextid"], Value::from("102"), "nextid is a JSON string");

    // A container through the API: start as a task, status, config through the codec, stop.
    assert!(
        r["lxc_list"].as_array().unwrap().iter().any(|g| g["vmid"] == 101 && g["status"] == "stopped"),
        "{}",
        r["lxc_list"]
    );
    let upid = r["upid"].as_str().unwrap();
    assert!(upid.starts_with("UPID:node1:") && upid.ends_with(":vzstart:101:root@pam:"), "{upid}");
    assert_eq!(
        (r["start_task"]["status"].as_str(), r["start_task"]["exitstatus"].as_str()),
        (Some("stopped"), Some("OK"))
    );
    assert_eq!(r["lxc_current"]["status"], "running", "{}", r["lxc_current"]);
    assert!(r["lxc_current"]["pid"].is_number());
    assert_eq!(r["lxc_config"]["hostname"], "box");
    assert_eq!(r["lxc_config"]["memory"], "128");
    assert!(r["lxc_config"]["digest"].as_str().is_some_and(|d| d.len() == 40));
    assert!(r["start_again"].as_str().unwrap().contains("CT 101 already running"), "{}", r["start_again"]);
    for task in ["suspend_task", "resume_task", "reboot_task"] {
        assert_eq!(r[task]["exitstatus"], "OK", "{task}: {}", r[task]);
    }
    assert_eq!(r["stop_task"]["exitstatus"], "OK");
    assert_ne!(
        r["pid_before_reboot"], r["pid_after_reboot"],
        "the reboot task ends once the container restarted"
    );

    // Storage, node and access reads.
    assert!(
        r["storage"].as_array().unwrap().iter().any(|s| s["storage"] == "local" && s["type"] == "dir"),
        "{}",
        r["storage"]
    );
    assert!(
        r["node_storage"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["storage"] == "local" && s["total"].as_u64() > Some(0))
    );
    assert_eq!(r["storage_status"]["active"], 1);
    let content = r["content"].as_array().unwrap();
    assert!(
        content
            .iter()
            .any(|c| c["content"] == "vztmpl" && c["volid"].as_str().unwrap().contains("kpve-busybox")),
        "{content:?}"
    );
    assert!(content.iter().any(|c| c["content"] == "rootdir" && c["vmid"] == 101), "{content:?}");
    assert!(r["vztmpl"].as_array().unwrap().iter().all(|c| c["content"] == "vztmpl"));
    assert!(r["node_status"]["memory"]["total"].as_u64() > Some(0));
    assert!(
        r["cluster_status"].as_array().unwrap().iter().any(|e| e["type"] == "node" && e["name"] == "node1")
    );
    assert_eq!(r["users"][0]["userid"], "root@pam");
    for privilege in [
        "Datastore.AllocateSpace",
        "Sys.Modify",
        "VM.Allocate",
        "VM.Config.Cloudinit",
        "VM.PowerMgmt",
        "Pool.Allocate",
    ] {
        assert_eq!(r["perms"]["/"][privilege], 1, "{privilege}");
    }
    assert_eq!(r["lxc_after"]["status"], "stopped");
    let log: Vec<&str> = r["task_log"].as_array().unwrap().iter().map(|l| l["t"].as_str().unwrap()).collect();
    assert_eq!(log.last(), Some(&"TASK OK"), "{log:?}");
    assert!(
        log.iter().any(|l| l.starts_with("running on node node1, pid ")),
        "the log follows the guest: {log:?}"
    );
    let listed = r["task_list"].as_array().unwrap();
    assert!(
        listed.iter().any(|t| t["upid"] == upid && t["status"] == "OK" && t["type"] == "vzstart"),
        "{listed:?}"
    );
    assert_eq!(r["qemu_config"]["memory"], "512");
    assert!(r["missing"].as_str().unwrap().contains("does not exist"), "{}", r["missing"]);

    // A VM through the API: create as a task, visible with kubectl, config edits with digest.
    assert!(r["create_upid"].as_str().unwrap().contains(":qmcreate:200:root@pam:"), "{}", r["create_upid"]);
    assert_eq!(r["create_task"]["exitstatus"], "OK", "{}", r["create_task"]);
    assert_eq!(
        (r["create_cfg"]["memory"].as_str(), r["create_cfg"]["name"].as_str()),
        (Some("256"), Some("apivm"))
    );
    assert!(r["create_cfg"]["scsi0"].as_str().unwrap().starts_with("local:"), "{}", r["create_cfg"]);
    assert_eq!(r["kubectl_memory"], "256", "created through the API, visible with kubectl");
    assert_eq!(r["updated_cfg"]["memory"], "384");
    assert_eq!(r["kubectl_memory_after"], "384");
    let after = &r["deleted_name"];
    assert!(
        after.get("name").is_none() && after["memory"] == "384",
        "delete= removes only that key: {after}"
    );
    assert!(
        r["stale_digest"].as_str().unwrap().contains("detected modified configuration"),
        "{}",
        r["stale_digest"]
    );
    assert!(r["bad_memory"].as_str().unwrap().contains("400"), "{}", r["bad_memory"]);
    assert!(r["duplicate"].as_str().unwrap().contains("already exists"), "{}", r["duplicate"]);
    assert_eq!(r["delete_task"]["exitstatus"], "OK", "{}", r["delete_task"]);
    assert!(!r["after_delete"].as_array().unwrap().contains(&Value::from(200)), "{}", r["after_delete"]);
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

    // A task outlives the API process: started, the server killed at once, polled after.
    let started = support::run_client(Command::new("python3"), START_ONLY, &[&port, &password], &server);
    let upid = started["upid"].as_str().unwrap().to_string();
    server.restart();
    let r = support::run_client(Command::new("python3"), AWAIT_TASK, &[&port, &password, &upid], &server);
    assert_eq!(
        (r["task"]["status"].as_str(), r["task"]["exitstatus"].as_str()),
        (Some("stopped"), Some("OK")),
        "{r}"
    );
    assert_eq!(r["current"]["status"], "running", "{r}");
    let log: Vec<&str> = r["log"].as_array().unwrap().iter().map(|l| l["t"].as_str().unwrap()).collect();
    assert_eq!(log.last(), Some(&"TASK OK"), "{log:?}");
}

const START_ONLY: &str = r#"
import json, sys, warnings
from proxmoxer import ProxmoxAPI
warnings.filterwarnings("ignore")
port, password = sys.argv[1], sys.argv[2]
p = ProxmoxAPI("127.0.0.1", port=int(port), user="root@pam", password=password, verify_ssl=False)
print(json.dumps({"upid": p.nodes("node1").lxc(101).status.start.post()}))
"#;

const AWAIT_TASK: &str = r#"
import json, sys, warnings
from proxmoxer import ProxmoxAPI
from proxmoxer.tools import Tasks
warnings.filterwarnings("ignore")
port, password, upid = sys.argv[1], sys.argv[2], sys.argv[3]
p = ProxmoxAPI("127.0.0.1", port=int(port), user="root@pam", password=password, verify_ssl=False)
out = {"task": Tasks.blocking_status(p, upid, timeout=90)}
out["log"] = p.nodes("node1").tasks(upid).log.get()
out["current"] = p.nodes("node1").lxc(101).status.current.get()
print(json.dumps(out))
"#;

/// `kpve pve-api` on its own, against a kpve API server with an admin token: it generates a
/// self-signed certificate (key 0600) and root@pam's password in its own data directory, and
/// serves the guests declared with kubectl.
#[test]
fn standalone_pve_api_serves_with_a_generated_certificate() {
    let server = Server::start();
    server.kubectl_stdin(&["apply", "-f", "-"], Some(&vm_manifest("solo", 1, "  vmid: 150\n")));
    let token_file = server.data_dir().join("pve-api-token");
    std::fs::write(&token_file, server.token("admin", None)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_kpve"))
        .args(["pve-api", "--server", &format!("https://127.0.0.1:{}", server.port)])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--ca-file")
        .arg(server.data_dir().join("ca.crt"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);
    let base = format!("https://127.0.0.1:{port}/api2/json");
    let curl = |args: &[&str]| {
        let out = Command::new("curl").args(["-sk", "--max-time", "10"]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("the standalone API answers", || {
        curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("{base}/version")]) == "401"
    });
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::metadata(dir.path().join("pve-ssl.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    let cert = std::fs::read_to_string(dir.path().join("pve-ssl.pem")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    let password = std::fs::read_to_string(dir.path().join("pve-root-password")).unwrap();
    let login = curl(&[
        "-d",
        "username=root@pam",
        "--data-urlencode",
        &format!("password={}", password.trim()),
        &format!("{base}/access/ticket"),
    ]);
    let login: Value = serde_json::from_str(&login).unwrap();
    let ticket = login["data"]["ticket"].as_str().unwrap();
    let cookie = format!("PVEAuthCookie={ticket}");
    let resources: Value =
        serde_json::from_str(&curl(&["-b", &cookie, &format!("{base}/cluster/resources?type=vm")])).unwrap();
    let vm = resources["data"].as_array().unwrap().iter().find(|g| g["name"] == "solo").cloned().unwrap();
    assert_eq!(vm["vmid"], 150);
    // HTTP/1.1 only, even to a client asking for HTTP/2 (reason phrases carry the errors).
    let version = curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        "-b",
        &cookie,
        &format!("{base}/version"),
    ]);
    assert_eq!(version, "1.1");
    // A body on GET is refused as Proxmox refuses it.
    let with_body = curl(&[
        "-X",
        "GET",
        "-d",
        "x=1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-b",
        &cookie,
        &format!("{base}/version"),
    ]);
    assert_eq!(with_body, "501");
    // The served certificate is the generated one.
    let served = Command::new("sh")
        .arg("-c")
        .arg(format!("openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint"))
        .output()
        .unwrap();
    let on_disk = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-in"])
        .arg(dir.path().join("pve-ssl.pem"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&served.stdout), String::from_utf8_lossy(&on_disk.stdout));
}

const DECLARE: &str = r#"
import json, sys, warnings
from proxmoxer import ProxmoxAPI
warnings.filterwarnings("ignore")
port, password = sys.argv[1], sys.argv[2]
p = ProxmoxAPI("127.0.0.1", port=int(port), user="root@pam", password=password, verify_ssl=False)
out = {}
fw = p.cluster.firewall
fw.options.put(enable=1, policy_in="DROP")
out["options"] = fw.options.get()
fw.ipset.post(name="trusted", comment="office")
fw.ipset("trusted").post(cidr="10.9.0.0/24")
fw.ipset("trusted").post(cidr="10.9.0.7", nomatch=1)
out["ipset"] = fw.ipset("trusted").get()
fw.rules.post(type="in", action="ACCEPT", macro="SSH", source="+trusted", enable=1, comment="ssh")
fw.rules.post(type="in", action="ACCEPT", proto="tcp", dport="8006", enable=1)
out["rules"] = fw.rules.get()
fw.rules(1).put(moveto=0)
out["moved"] = fw.rules.get()
out["bad_rule"] = err(lambda: fw.rules.post(type="in", action="ACCEPT", proto="tcp", dport="99999"))
out["stale"] = err(lambda: fw.rules(0).put(comment="x", digest="0" * 40))
fw.groups.post(group="web", comment="web servers")
fw.groups("web").post(type="in", action="ACCEPT", macro="HTTP", enable=1)
out["group_rules"] = fw.groups("web").get()
vmfw = p.nodes("node1").qemu(150).firewall
vmfw.options.put(enable=1, ipfilter=1)
vmfw.rules.post(type="group", action="web", enable=1)
out["vm_rules"] = vmfw.rules.get()
out["vm_options"] = vmfw.options.get()
fw.aliases.post(name="office", cidr="10.9.0.0/24", comment="HQ")
out["aliases"] = fw.aliases.get()
vmfw.ipset.post(name="ipfilter-net0")
vmfw.ipset("ipfilter-net0").post(cidr="10.0.0.5")
out["vm_ipset"] = vmfw.ipset("ipfilter-net0").get()
out["bad_cidr"] = err(lambda: vmfw.ipset("ipfilter-net0").post(cidr="10.0.0.300"))
fw.rules(0).delete()
out["after_delete"] = fw.rules.get()
p.cluster.ha.groups.post(group="prefer1", nodes="node1:2,node2:1", restricted=1)
out["ha_groups"] = p.cluster.ha.groups.get()
p.cluster.ha.resources.post(sid="vm:150", state="started", group="prefer1", max_restart=2)
out["ha_resources"] = p.cluster.ha.resources.get()
out["ha_status"] = p.cluster.ha.status.current.get()
p.cluster.ha.resources("vm:150").put(state="stopped")
out["ha_one"] = p.cluster.ha.resources("vm:150").get()
p.pools.post(poolid="team-a", comment="team A")
out["pools"] = p.pools.get()
p.nodes("node1").qemu.post(vmid=151, memory=128, pool="team-a")
out["pool_members"] = p.pools("team-a").get()
out["pool_not_empty"] = err(lambda: p.pools("team-a").delete())
p.cluster.options.put(keyboard="fr", migration="type=secure,network=192.168.0.0/24")
out["dc_options"] = p.cluster.options.get()
out["dc_bad"] = err(lambda: p.cluster.options.put(keyboard="xx"))
p.cluster.options.put(delete="keyboard")
out["dc_after"] = p.cluster.options.get()
print(json.dumps(out))
"#;

/// Firewall, HA and pool endpoints are edits of resources: what the API writes, kubectl
/// reads (and the agents enforce); bad rules and stale digests are refused.
#[test]
fn firewall_ha_and_pool_endpoints_edit_resources() {
    if !support::proxmoxer_available() {
        return;
    }
    let server = Server::start();
    server.kubectl_stdin(&["apply", "-f", "-"], Some(&vm_manifest("fwvm", 1, "  vmid: 150\n  placement: {nodes: [node1]}\n  nics: [{id: net0, bridge: vmbr0, firewall: true}]\n")));
    let password = std::fs::read_to_string(server.data_dir().join("pve-root-password")).unwrap();
    let r = support::run_client(
        Command::new("python3"),
        DECLARE,
        &[&server.pve_port.to_string(), password.trim()],
        &server,
    );

    assert_eq!(
        (r["options"]["enable"].as_u64(), r["options"]["policy_in"].as_str()),
        (Some(1), Some("DROP"))
    );
    let ipset = r["ipset"].as_array().unwrap();
    assert!(ipset.iter().any(|e| e["cidr"] == "10.9.0.7" && e["nomatch"] == 1), "{ipset:?}");
    let rules = r["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        (rules[0]["dport"].as_str(), rules[1]["macro"].as_str()),
        (Some("8006"), Some("SSH")),
        "new rules go on top"
    );
    let moved = r["moved"].as_array().unwrap();
    assert_eq!(moved[0]["macro"], "SSH", "{moved:?}");
    assert!(r["bad_rule"].as_str().unwrap().contains("400"), "{}", r["bad_rule"]);
    assert!(r["stale"].as_str().unwrap().contains("detected modified configuration"), "{}", r["stale"]);
    assert_eq!(r["group_rules"][0]["macro"], "HTTP");
    assert_eq!(
        (r["vm_rules"][0]["type"].as_str(), r["vm_rules"][0]["action"].as_str()),
        (Some("group"), Some("web"))
    );
    assert_eq!(r["vm_options"]["ipfilter"], 1);
    assert_eq!(r["after_delete"].as_array().unwrap().len(), 1);
    assert!(
        r["aliases"].as_array().unwrap().iter().any(|a| a["name"] == "office" && a["cidr"] == "10.9.0.0/24")
    );
    assert_eq!(r["vm_ipset"][0]["cidr"], "10.0.0.5");
    assert!(r["bad_cidr"].as_str().unwrap().contains("400"), "{}", r["bad_cidr"]);
    assert_eq!(
        server.kubectl_ok(&[
            "get",
            "vm",
            "fwvm",
            "-o",
            "jsonpath={.spec.firewall.ipsets[0].entries[0].cidr}"
        ]),
        "10.0.0.5"
    );

    // What the API wrote is in the resources.
    let cfw = server.kubectl_ok(&["get", "clusterfirewall", "cluster", "-o", "json"]);
    let cfw: Value = serde_json::from_str(&cfw).unwrap();
    assert_eq!(cfw["spec"]["policyIn"], "DROP");
    assert_eq!(cfw["spec"]["rules"][0]["dport"], "8006", "{cfw}");
    let set: Value =
        serde_json::from_str(&server.kubectl_ok(&["get", "ipset", "trusted", "-o", "json"])).unwrap();
    assert_eq!(set["spec"]["entries"].as_array().unwrap().len(), 2);
    assert_eq!(
        server.kubectl_ok(&["get", "vm", "fwvm", "-o", "jsonpath={.spec.firewall.rules[0].action}"]),
        "web"
    );

    let groups = r["ha_groups"].as_array().unwrap();
    assert!(
        groups
            .iter()
            .any(|g| g["group"] == "prefer1" && g["nodes"] == "node1:2,node2:1" && g["restricted"] == 1),
        "{groups:?}"
    );
    let res = r["ha_resources"].as_array().unwrap();
    assert!(
        res.iter().any(|x| x["sid"] == "vm:150"
            && x["state"] == "started"
            && x["group"] == "prefer1"
            && x["max_restart"] == 2),
        "{res:?}"
    );
    assert!(r["ha_status"].as_array().unwrap().iter().any(|x| x["sid"] == "vm:150"));
    assert_eq!(r["ha_one"]["state"], "stopped");
    assert_eq!(server.kubectl_ok(&["get", "vm", "fwvm", "-o", "jsonpath={.spec.ha.state}"]), "stopped");
    assert_eq!(
        server.kubectl_ok(&["get", "hagroup", "prefer1", "-o", "jsonpath={.spec.nodes[0].priority}"]),
        "2"
    );

    assert!(
        r["pools"].as_array().unwrap().iter().any(|p| p["poolid"] == "team-a" && p["comment"] == "team A")
    );
    let members = r["pool_members"]["members"].as_array().unwrap();
    assert!(members.iter().any(|m| m["vmid"] == 151), "{members:?}");
    assert_eq!(
        server.kubectl_ok(&["get", "vm", "-n", "team-a", "-o", "jsonpath={.items[0].spec.vmid}"]),
        "151"
    );
    assert!(r["pool_not_empty"].as_str().unwrap().contains("not empty"), "{}", r["pool_not_empty"]);

    // Datacenter options (datacenter.cfg): property strings come back as objects.
    assert_eq!(r["dc_options"]["keyboard"], "fr", "{}", r["dc_options"]);
    assert_eq!(
        r["dc_options"]["migration"],
        serde_json::json!({"type": "secure", "network": "192.168.0.0/24"})
    );
    assert!(r["dc_bad"].as_str().unwrap().contains("400"), "{}", r["dc_bad"]);
    assert!(
        r["dc_after"].get("keyboard").is_none() && r["dc_after"]["migration"].is_object(),
        "{}",
        r["dc_after"]
    );
    assert_eq!(
        server.kubectl_ok(&["get", "datacenter", "cluster", "-o", "jsonpath={.spec.options.migration}"]),
        "type=secure,network=192.168.0.0/24"
    );
}

/// `kpve server --pve-tls-cert/--pve-tls-key` serves the given certificate on the Proxmox port
/// (an admin's own, as `pveproxy-ssl.pem` is in Proxmox).
#[test]
fn the_server_serves_a_given_proxmox_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("own.pem"), dir.path().join("own.key"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pve.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let server = Server::start_with(&[
        "--pve-tls-cert",
        cert.to_str().unwrap(),
        "--pve-tls-key",
        key.to_str().unwrap(),
    ]);
    let fingerprint = |script: String| {
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let served = fingerprint(format!(
        "openssl s_client -connect 127.0.0.1:{} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint",
        server.pve_port
    ));
    let given = fingerprint(format!("openssl x509 -noout -fingerprint -in {}", cert.display()));
    assert!(given.contains("Fingerprint="), "{given}");
    assert_eq!(served, given);
}
