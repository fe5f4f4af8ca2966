//! The Proxmox VE API with access control, driven by proxmoxer the way Proxmox users work:
//! root@pam (ticket) creates a group, a `pve` user with a password, ACLs and two API tokens of
//! that user (one with privilege separation); then a VM (`scsi0=local:4`,
//! `net0=virtio,bridge=vmbr0`) goes through create → start → status → memory change with
//! `pending` → stop → delete, once with the ticket and once with the token, and a container
//! does the same with both (its new memory limit pending until it restarts). The separated token may start a VM but gets 403 for a memory
//! change; a wrong token secret gets 401 after 3 s; a user declared in YAML (with an
//! `openssl passwd -5` hash and a PVEACL) logs in and sees what its role allows; a deleted
//! token stops working. Runs in its own network namespace with the bridge `vmbr0`.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{Netns, Server, netns_command};

const CLIENT: &str = r#"
import json, sys, time, warnings
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.tools import Tasks
warnings.filterwarnings("ignore")
port, password, template, images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
import subprocess
host = "127.0.0.1"
base = f"https://{host}:{port}/api2/json"
out = {}

def call(method, path, **kw):
    t = time.time()
    r = requests.request(method, base + path, verify=False, **kw)
    return {"status": r.status_code, "reason": r.reason, "body": r.text, "seconds": time.time() - t}

p = ProxmoxAPI(host, port=int(port), user="root@pam", password=password, verify_ssl=False)
p.access.groups.post(groupid="ops", comment="operators")
p.access.users.post(userid="alice@pve", password="alice-pass-1", groups="ops", email="alice@example.com")
p.access.acl.put(path="/vms", roles="PVEVMAdmin", users="alice@pve")
p.access.acl.put(path="/storage", roles="PVEDatastoreUser", groups="ops")
full = p.access.users("alice@pve").token("full").post(privsep=0)
ci = p.access.users("alice@pve").token("ci").post(privsep=1, comment="CI")
p.access.acl.put(path="/vms", roles="PVEVMUser", tokens="alice@pve!ci")
out["full"] = full
out["ci_info"] = ci["info"]
out["users"] = p.access.users.get(full=1)
out["user"] = p.access.users("alice@pve").get()
out["acl"] = p.access.acl.get()
out["roles"] = p.access.roles.get()
out["groups"] = p.access.groups.get()
out["duplicate_token"] = err(lambda: p.access.users("alice@pve").token("ci").post())

tok = ProxmoxAPI(host, port=int(port), user="alice@pve", token_name="full", token_value=full["value"], verify_ssl=False)
cit = ProxmoxAPI(host, port=int(port), user="alice@pve", token_name="ci", token_value=ci["value"], verify_ssl=False)
alice = ProxmoxAPI(host, port=int(port), user="alice@pve", password="alice-pass-1", verify_ssl=False)
tokhdr = {"Authorization": f"PVEAPIToken=alice@pve!full={full['value']}"}
cihdr = {"Authorization": f"PVEAPIToken=alice@pve!ci={ci['value']}"}

def flow(api, kind, vmid, create, mem):
    r = {}
    g = getattr(api.nodes("node1"), kind)
    r["upid"] = g.post(vmid=vmid, **create)
    r["create"] = Tasks.blocking_status(api, r["upid"], timeout=120)
    r["start"] = Tasks.blocking_status(api, g(vmid).status.start.post(), timeout=120)
    r["current"] = g(vmid).status.current.get()
    g(vmid).config.put(memory=mem)
    r["config"] = g(vmid).config.get()
    r["pending"] = g(vmid).pending.get()
    if kind == "qemu":
        # Grow the disk while the VM runs (QMP block_resize), then refuse a shrink.
        r["resize"] = Tasks.blocking_status(api, g(vmid).resize.put(disk="scsi0", size="+1G"), timeout=60)
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", f"{images}/{vmid}/vm-{vmid}-disk-0.qcow2"],
                              capture_output=True, text=True).stdout
        r["disk_bytes"] = json.loads(info)["virtual-size"]
        r["shrink"] = err(lambda: g(vmid).resize.put(disk="scsi0", size="1G"))
    r["stop"] = Tasks.blocking_status(api, g(vmid).status.stop.post(), timeout=120)
    r["delete"] = Tasks.blocking_status(api, g(vmid).delete(), timeout=120)
    r["after"] = [x["vmid"] for x in api.cluster.resources.get(type="vm")]
    return r

vm = dict(memory=256, scsi0="local:4", net0="virtio,bridge=vmbr0")
out["vm_ticket"] = flow(p, "qemu", 300, dict(name="ticketvm", **vm), 384)
out["vm_token"] = flow(tok, "qemu", 301, dict(name="tokenvm", **vm), 320)
ct = dict(hostname="tokenct", memory=128, ostemplate=template, rootfs="local:1", net0="name=eth0,bridge=vmbr0")
out["ct_token"] = flow(tok, "lxc", 302, ct, 192)
out["ct_ticket"] = flow(p, "lxc", 306, dict(ct, hostname="ticketct"), 160)

# The separated token: PVEVMUser on /vms (and nothing from alice it does not also have).
Tasks.blocking_status(p, p.nodes("node1").qemu.post(vmid=303, name="civm", memory=256, scsi0="local:1"), timeout=60)
out["ci_sees"] = [x["vmid"] for x in cit.cluster.resources.get(type="vm")]
out["ci_memory"] = err(lambda: cit.nodes("node1").qemu(303).config.put(memory=512))
out["ci_create"] = err(lambda: cit.nodes("node1").qemu.post(vmid=304, memory=256))
out["ci_start"] = Tasks.blocking_status(cit, cit.nodes("node1").qemu(303).status.start.post(), timeout=60)
out["ci_stop"] = Tasks.blocking_status(cit, cit.nodes("node1").qemu(303).status.stop.post(), timeout=60)
out["ci_perms"] = cit.access.permissions.get(path="/vms/303")
out["alice_perms"] = alice.access.permissions.get(path="/vms/303")
out["alice_ticket_sees"] = [x["vmid"] for x in alice.cluster.resources.get(type="vm")]
out["ci_403"] = call("PUT", "/nodes/node1/qemu/303/config", data={"memory": "512"}, headers=cihdr)
out["bad_token"] = call("GET", "/version", headers={"Authorization": "PVEAPIToken=alice@pve!ci=00000000-0000-0000-0000-000000000000"})
out["bad_param"] = call("POST", "/nodes/node1/qemu", data={"vmid": "305", "net0": "virtio,colour=red", "memory": "lots"}, headers=tokhdr)
out["unknown"] = call("GET", "/nodes/node1/qemu/303/nosuch", headers=tokhdr)
out["ticket_only"] = call("PUT", "/access/password", data={"userid": "alice@pve", "password": "x-y-z-w"}, headers=tokhdr)
out["config_post"] = Tasks.blocking_status(p, p.nodes("node1").qemu(303).config.post(cores=2), timeout=60)
out["template"] = Tasks.blocking_status(p, p.nodes("node1").qemu(303).template.post(), timeout=60)
out["template_listed"] = [x["template"] for x in p.cluster.resources.get(type="vm") if x["vmid"] == 303]
out["template_start"] = err(lambda: p.nodes("node1").qemu(303).status.start.post())

# Escalation attempts: a group administrator moving itself into another group, alice
# granting herself a role beyond her privileges; a revocation for one user keeps another's.
p.access.groups.post(groupid="admins")
p.access.acl.put(path="/", roles="Administrator", groups="admins")
p.access.users.post(userid="carol@pve", password="carol-pass-1", groups="ops")
p.access.acl.put(path="/access/groups/ops", roles="PVEUserAdmin", users="carol@pve")
carol = ProxmoxAPI(host, port=int(port), user="carol@pve", password="carol-pass-1", verify_ssl=False)
out["carol_escalate"] = err(lambda: carol.access.users("carol@pve").put(groups="admins"))
out["carol_in_ops"] = err(lambda: carol.access.users("carol@pve").put(groups="ops", email="c@example.com"))
out["alice_grant"] = err(lambda: alice.access.acl.put(path="/vms/303", roles="Administrator", users="alice@pve"))
out["alice_grant_ok"] = err(lambda: alice.access.acl.put(path="/vms/303", roles="PVEVMUser", users="carol@pve"))
p.access.users.post(userid="dave@pve")
p.access.acl.put(path="/vms/303", roles="PVEVMUser", users="dave@pve")
p.access.acl.put(path="/vms/303", roles="PVEVMUser", users="carol@pve", delete=1)
out["acl_after_revoke"] = [a for a in p.access.acl.get() if a["path"] == "/vms/303"]
out["root_token_by_admin"] = err(lambda: carol.access.users("root@pam").token("x").post())

bob = ProxmoxAPI(host, port=int(port), user="bob@pve", password="bob-pass-1", verify_ssl=False)
out["bob_perms"] = bob.access.permissions.get()
out["bob_sees"] = [x["vmid"] for x in bob.cluster.resources.get(type="vm")]
out["bob_start"] = err(lambda: bob.nodes("node1").qemu(303).status.start.post())
out["bob_wrong"] = call("POST", "/access/ticket", data={"username": "bob@pve", "password": "nope"})

p.access.users("alice@pve").token("ci").delete()
out["revoked"] = call("GET", "/version", headers=cihdr)
p.access.users("alice@pve").put(enable=0)
out["disabled"] = call("GET", "/version", headers=tokhdr)
Tasks.blocking_status(p, p.nodes("node1").qemu(303).delete(), timeout=60)
print(json.dumps(out))
"#;

fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tickets_and_tokens_drive_guests_within_their_privileges() {
    if !support::proxmoxer_available() {
        return;
    }
    let ns = Netns::new("kpve-pve");
    sh(&format!(
        "ip -n {n} link add vmbr0 type bridge && \
         ip -n {n} addr add 10.203.0.1/24 dev vmbr0 && ip -n {n} link set vmbr0 up",
        n = ns.0
    ));
    let server = Server::start_in_netns(&ns.0);
    support::install_busybox_template(server.data_dir());
    let password =
        std::fs::read_to_string(server.data_dir().join("pve-root-password")).unwrap().trim().to_string();

    // bob is declared in YAML: a hash as `openssl passwd -5` prints it, and an ACL.
    let hash = Command::new("openssl").args(["passwd", "-5", "bob-pass-1"]).output().unwrap();
    let hash = String::from_utf8(hash.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$5$"), "{hash}");
    let yaml = format!(
        "apiVersion: kpve.io/v1alpha1\nkind: PVEUser\nmetadata: {{name: bob.pve}}\nspec:\n  userid: bob@pve\n  passwordHash: '{hash}'\n---\n\
         apiVersion: kpve.io/v1alpha1\nkind: PVEACL\nmetadata: {{name: bob-audits}}\nspec:\n  path: /\n  roles: [PVEAuditor]\n  users: [bob@pve]\n"
    );
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Bad declarations are refused with the field named.
    let bad = "apiVersion: kpve.io/v1alpha1\nkind: PVERole\nmetadata: {name: bad}\nspec:\n  roleid: Bad\n  privs: [VM.Fly]\n";
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(bad));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec.privs[0]") && err.contains("VM.Fly"), "{err}");

    let template = format!("local:vztmpl/{}.tar.gz", support::BUSYBOX_TEMPLATE);
    let port = server.pve_port.to_string();
    let images = server.data_dir().join("storage/local/images");
    let r = support::run_client(
        netns_command(&ns.0, "python3"),
        CLIENT,
        &[&port, &password, &template, images.to_str().unwrap()],
        &server,
    );

    // Tokens: the secret is shown once, as a UUID.
    assert_eq!(r["full"]["full-tokenid"], "alice@pve!full");
    assert_eq!(r["full"]["value"].as_str().unwrap().len(), 36);
    assert_eq!(r["ci_info"]["privsep"], 1);
    assert!(
        r["duplicate_token"].as_str().unwrap().contains("Token already exists"),
        "{}",
        r["duplicate_token"]
    );
    let alice = r["users"].as_array().unwrap().iter().find(|u| u["userid"] == "alice@pve").unwrap();
    assert_eq!(alice["groups"], "ops");
    assert_eq!(alice["tokens"].as_array().unwrap().len(), 2, "{alice}");
    assert_eq!(r["user"]["email"], "alice@example.com");
    let acl = r["acl"].as_array().unwrap();
    assert!(
        acl.iter().any(|a| a["path"] == "/vms"
            && a["ugid"] == "alice@pve!ci"
            && a["type"] == "token"
            && a["roleid"] == "PVEVMUser"),
        "{acl:?}"
    );
    assert!(r["roles"].as_array().unwrap().iter().any(|x| x["roleid"] == "PVEVMAdmin" && x["special"] == 1));
    assert!(
        r["groups"].as_array().unwrap().iter().any(|g| g["groupid"] == "ops" && g["users"] == "alice@pve")
    );

    // The full flow with a ticket and with a token, for VMs and containers.
    for (flow, task_user) in [
        ("vm_ticket", "root@pam"),
        ("vm_token", "alice@pve!full"),
        ("ct_token", "alice@pve!full"),
        ("ct_ticket", "root@pam"),
    ] {
        let f = &r[flow];
        assert!(f["upid"].as_str().unwrap().ends_with(&format!(":{task_user}:")), "{flow}: {}", f["upid"]);
        for task in ["create", "start", "stop", "delete"] {
            assert_eq!(f[task]["exitstatus"], "OK", "{flow} {task}: {}", f[task]);
        }
        assert_eq!(f["current"]["status"], "running", "{flow}: {}", f["current"]);
        assert!(f["config"]["net0"].as_str().unwrap().contains("bridge=vmbr0"), "{flow}: {}", f["config"]);
        assert!(
            !f["after"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| [300, 301, 302, 306].contains(&v.as_u64().unwrap())),
            "{flow}: {}",
            f["after"]
        );
    }
    for flow in ["vm_ticket", "vm_token"] {
        let f = &r[flow];
        assert_eq!(f["resize"]["exitstatus"], "OK", "{flow}: {}", f["resize"]);
        assert_eq!(f["disk_bytes"], 5u64 << 30, "{flow}: scsi0 grew from 4G to 5G while running");
        assert!(
            f["shrink"].as_str().unwrap().contains("shrinking disks is not supported"),
            "{}",
            f["shrink"]
        );
    }
    let vm = &r["vm_ticket"];
    assert_eq!(vm["config"]["memory"], "384");
    assert!(vm["config"]["scsi0"].as_str().unwrap().starts_with("local:"), "{}", vm["config"]);
    let pending = vm["pending"].as_array().unwrap();
    let memory = pending.iter().find(|e| e["key"] == "memory").unwrap();
    assert_eq!(
        (memory["value"].as_str(), memory["pending"].as_str()),
        (Some("256"), Some("384")),
        "{pending:?}"
    );
    let memory =
        r["vm_token"]["pending"].as_array().unwrap().iter().find(|e| e["key"] == "memory").cloned().unwrap();
    assert_eq!(memory["pending"], "320");
    // A running container keeps the memory limit it started with until it restarts.
    for (flow, before, after) in [("ct_token", "128", "192"), ("ct_ticket", "128", "160")] {
        assert_eq!(r[flow]["config"]["memory"], after, "{flow}");
        let memory =
            r[flow]["pending"].as_array().unwrap().iter().find(|e| e["key"] == "memory").cloned().unwrap();
        assert_eq!(
            (memory["value"].as_str(), memory["pending"].as_str()),
            (Some(before), Some(after)),
            "{flow}"
        );
    }

    // Privilege separation: the ci token sees and powers VMs but may not change memory.
    assert!(r["ci_sees"].as_array().unwrap().contains(&Value::from(303)), "{}", r["ci_sees"]);
    assert!(r["ci_memory"].as_str().unwrap().contains("403"), "{}", r["ci_memory"]);
    assert!(r["ci_create"].as_str().unwrap().contains("403"), "{}", r["ci_create"]);
    assert_eq!(r["ci_start"]["exitstatus"], "OK");
    assert_eq!(r["ci_stop"]["exitstatus"], "OK");
    assert_eq!(r["ci_perms"]["/vms/303"]["VM.PowerMgmt"], 1);
    assert!(r["ci_perms"]["/vms/303"].get("VM.Config.Memory").is_none(), "{}", r["ci_perms"]);
    assert_eq!(r["alice_perms"]["/vms/303"]["VM.Config.Memory"], 1);
    assert!(r["alice_ticket_sees"].as_array().unwrap().contains(&Value::from(303)));
    let denied = &r["ci_403"];
    assert_eq!(
        (denied["status"].as_u64(), denied["reason"].as_str()),
        (Some(403), Some("Permission check failed (/vms/303, VM.Config.Memory)"))
    );
    let bad = &r["bad_token"];
    assert_eq!((bad["status"].as_u64(), bad["reason"].as_str()), (Some(401), Some("Authentication failed!")));
    assert!(bad["seconds"].as_f64().unwrap() >= 2.9, "{bad}");
    let bad = &r["bad_param"];
    assert_eq!(
        (bad["status"].as_u64(), bad["reason"].as_str()),
        (Some(400), Some("Parameter verification failed."))
    );
    let body: Value = serde_json::from_str(bad["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body["errors"]["net0"],
        "invalid format - format error\nnet0.colour: property is not defined in schema and the schema does not allow additional properties\n"
    );
    assert_eq!(
        body["errors"]["memory"],
        "invalid format - format error\nmemory.current: type check ('integer') failed - got 'lots'\n"
    );
    assert_eq!(r["unknown"]["status"], 501);
    assert_eq!(r["ticket_only"]["status"], 403, "{}", r["ticket_only"]);
    assert_eq!(r["config_post"]["exitstatus"], "OK", "{}", r["config_post"]);
    assert_eq!(r["template"]["exitstatus"], "OK", "{}", r["template"]);
    assert_eq!(r["template_listed"], serde_json::json!([1]));
    assert!(
        r["template_start"].as_str().unwrap().contains("can't start a vm if it's a template"),
        "{}",
        r["template_start"]
    );

    // Escalations are refused; a revocation touches only the named subject.
    assert!(r["carol_escalate"].as_str().unwrap().contains("403"), "{}", r["carol_escalate"]);
    assert!(r["carol_in_ops"].is_null(), "{}", r["carol_in_ops"]);
    assert!(r["alice_grant"].as_str().unwrap().contains("403"), "{}", r["alice_grant"]);
    assert!(r["alice_grant_ok"].is_null(), "{}", r["alice_grant_ok"]);
    let left: Vec<&str> =
        r["acl_after_revoke"].as_array().unwrap().iter().map(|a| a["ugid"].as_str().unwrap()).collect();
    assert_eq!(left, ["dave@pve"], "{}", r["acl_after_revoke"]);
    assert!(r["root_token_by_admin"].as_str().unwrap().contains("403"), "{}", r["root_token_by_admin"]);

    // bob, declared in YAML: logs in, audits, may not power guests.
    assert_eq!(r["bob_perms"]["/"]["Sys.Audit"], 1, "{}", r["bob_perms"]);
    assert!(r["bob_perms"]["/"].get("VM.PowerMgmt").is_none());
    assert!(r["bob_sees"].as_array().unwrap().contains(&Value::from(303)));
    assert!(r["bob_start"].as_str().unwrap().contains("403"), "{}", r["bob_start"]);
    assert_eq!(r["bob_wrong"]["status"], 401);

    // A deleted token and a disabled user no longer authenticate.
    assert_eq!(r["revoked"]["status"], 401);
    assert_eq!(r["disabled"]["status"], 401);
    // Everything lives in resources: kubectl shows the token's hash, never the secret.
    let users = server.kubectl_ok(&["get", "pveusers", "-o", "json"]);
    assert!(users.contains("sha256:") && !users.contains(r["full"]["value"].as_str().unwrap()));
}
