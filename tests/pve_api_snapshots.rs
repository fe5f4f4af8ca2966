//! Snapshots, rollback, clones and storage content removal through the Proxmox API, driven
//! by proxmoxer as Ansible's proxmox_snap / proxmox_kvm and the Terraform providers drive
//! them, on real qcow2 images: data written into the VM's disk (with `qemu-io`) before a
//! snapshot reads back after a rollback; a snapshot taken while QEMU runs (QMP) is on the
//! image; a clone of a snapshot carries the snapshot's data and a clone of the current state
//! the current data, with new MAC addresses; a removed ISO is gone from the node's storage;
//! a container template's clone has the template's files and runs; refusals come back as
//! Proxmox words them.

mod support;

use support::{Netns, Server, netns_command};

const CLIENT: &str = r#"
import json, subprocess, sys, time, warnings
from proxmoxer import ProxmoxAPI
from proxmoxer.tools import Tasks
warnings.filterwarnings("ignore")
port, password, images, template = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
p = ProxmoxAPI("127.0.0.1", port=int(port), user="root@pam", password=password, verify_ssl=False)
n = p.nodes("node1")
out = {}

def wait(upid):
    return Tasks.blocking_status(p, upid, timeout=120)

def image(vmid):
    return f"{images}/{vmid}/vm-{vmid}-disk-0.qcow2"

def io(vmid, command, shared=False):
    args = ["qemu-io"] + (["-U", "-r"] if shared else []) + ["-f", "qcow2", "-c", command, image(vmid)]
    r = subprocess.run(args, capture_output=True, text=True)
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr

def snapshots_on_image(vmid):
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", image(vmid)], capture_output=True, text=True).stdout
    return sorted(s["name"] for s in json.loads(info).get("snapshots", []))

out["create"] = wait(n.qemu.post(vmid=400, name="snapvm", memory=128, scsi0="local:1"))
out["write_a"] = io(400, "write -P 0xaa 0 64k")
out["snap1"] = wait(n.qemu(400).snapshot.post(snapname="before", description="pattern aa"))
out["on_image_1"] = snapshots_on_image(400)
out["write_b"] = io(400, "write -P 0xbb 0 64k")
out["list"] = n.qemu(400).snapshot.get()
out["snap_config"] = n.qemu(400).snapshot("before").config.get()
out["config_parent"] = n.qemu(400).config.get().get("parent")
out["duplicate"] = wait(n.qemu(400).snapshot.post(snapname="before"))
out["reserved"] = err(lambda: n.qemu(400).snapshot.post(snapname="current"))
out["missing"] = wait(n.qemu(400).snapshot("nosuch").delete())

# A clone of the snapshot has the old data, a clone of the current state the new; both get
# their own MAC.
out["clone_snap"] = wait(n.qemu(400).clone.post(newid=401, snapname="before", name="fromsnap"))
out["clone_now"] = wait(n.qemu(400).clone.post(newid=402, full=1))
out["clone_names"] = {str(v): n.qemu(v).config.get().get("name") for v in (401, 402)}
out["clone_401_aa"] = io(401, "read -P 0xaa 0 64k")
out["clone_402_bb"] = io(402, "read -P 0xbb 0 64k")
out["clone_exists"] = err(lambda: n.qemu(400).clone.post(newid=401))
out["clone_linked"] = wait(n.qemu(400).clone.post(newid=403, full=0))
out["clone_target"] = err(lambda: n.qemu(400).clone.post(newid=404, target="node9"))
out["clone_tasks"] = [t["type"] + ":" + t["id"] for t in n.tasks.get(typefilter="qmclone")]

# While QEMU runs: a snapshot through QMP, then a rollback (stops it hard, reverts, starts).
out["start"] = wait(n.qemu(400).status.start.post())
out["snap2"] = wait(n.qemu(400).snapshot.post(snapname="running"))
out["on_image_2"] = snapshots_on_image(400)
out["del2"] = wait(n.qemu(400).snapshot("running").delete())
out["on_image_3"] = snapshots_on_image(400)
pid_before = n.qemu(400).status.current.get().get("pid")
out["rollback"] = wait(n.qemu(400).snapshot("before").rollback.post(start=1))
cur = n.qemu(400).status.current.get()
out["after_rollback"] = {"status": cur["status"], "new_pid": cur.get("pid") != pid_before}
out["read_a"] = io(400, "read -P 0xaa 0 64k", shared=True)
out["stop"] = wait(n.qemu(400).status.stop.post())
out["rollback_stopped"] = wait(n.qemu(400).snapshot("before").rollback.post())
out["status_after"] = n.qemu(400).status.current.get()["status"]
out["delete_snap"] = wait(n.qemu(400).snapshot("before").delete())
out["list_after"] = [s["name"] for s in n.qemu(400).snapshot.get()]
out["on_image_4"] = snapshots_on_image(400)

# Storage content: an ISO removed through the API; a disk a VM uses is refused.
st = n.storage("local")
out["iso_listed"] = [c["volid"] for c in st.content.get(content="iso")]
out["iso_delete"] = wait(st.content("local:iso/scratch.iso").delete())
out["iso_after"] = [c["volid"] for c in st.content.get(content="iso")]
out["in_use"] = err(lambda: st.content("local:400/vm-400-disk-0.qcow2").delete())

# Containers: a template, its clone (a copy of the rootfs) runs; no snapshots on dir storage.
rootfs = lambda v: f"{images}/{v}/subvol-{v}-disk-0.subvol"
out["ct_create"] = wait(n.lxc.post(vmid=420, hostname="tplct", memory=128, ostemplate=template, rootfs="local:1", start=1))
open(rootfs(420) + "/etc/kpve-marker", "w").write("from the template")
out["ct_stop"] = wait(n.lxc(420).status.stop.post())
out["ct_template"] = wait(n.lxc(420).template.post())
out["ct_template_start"] = err(lambda: n.lxc(420).status.start.post())
out["ct_clone"] = wait(n.lxc(420).clone.post(newid=421, hostname="cloned"))
out["ct_clone_marker"] = open(rootfs(421) + "/etc/kpve-marker").read()
out["ct_clone_start"] = wait(n.lxc(421).status.start.post())
out["ct_clone_config"] = n.lxc(421).config.get()
out["ct_snapshot"] = wait(n.lxc(421).snapshot.post(snapname="s1"))
out["ct_clone_stop"] = wait(n.lxc(421).status.stop.post())
for v in (420, 421):
    wait(n.lxc(v).delete())
for v in (400, 401, 402, 403):
    if v in [x["vmid"] for x in p.cluster.resources.get(type="vm")]:
        wait(n.qemu(v).delete())
print(json.dumps(out))
"#;

#[test]
fn snapshots_rollbacks_clones_and_content_removal() {
    if !support::proxmoxer_available() {
        return;
    }
    let ns = Netns::new("kpve-snap");
    let server = Server::start_in_netns(&ns.0);
    let iso = server.data_dir().join("storage/local/template/iso");
    std::fs::create_dir_all(&iso).unwrap();
    std::fs::write(iso.join("scratch.iso"), b"not really an ISO").unwrap();
    // The file must predate the removal request (a file written after it is kept).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let password =
        std::fs::read_to_string(server.data_dir().join("pve-root-password")).unwrap().trim().to_string();
    let images = server.data_dir().join("storage/local/images");
    support::install_busybox_template(server.data_dir());
    let template = format!("local:vztmpl/{}.tar.gz", support::BUSYBOX_TEMPLATE);
    let r = support::run_client(
        netns_command(&ns.0, "python3"),
        CLIENT,
        &[&server.pve_port.to_string(), &password, images.to_str().unwrap(), &template],
        &server,
    );
    let ok = |key: &str| assert_eq!(r[key]["exitstatus"], "OK", "{key}: {}\n{}", r[key], server.log());
    let failed_with = |key: &str, text: &str| {
        let status = r[key]["exitstatus"].as_str().unwrap_or("");
        assert_eq!(status, text, "{key}: {}", r[key]);
    };

    // A snapshot of a stopped VM is on the image; the list and config are Proxmox's.
    ok("create");
    assert_eq!(r["write_a"], true);
    ok("snap1");
    assert_eq!(r["on_image_1"], serde_json::json!(["before"]));
    let list = r["list"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["name"], "before");
    assert_eq!(list[0]["description"], "pattern aa");
    assert!(list[0]["snaptime"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(list[1]["name"], "current");
    assert_eq!(list[1]["parent"], "before");
    assert_eq!(list[1]["description"], "You are here!");
    assert_eq!(r["snap_config"]["memory"], "128", "{}", r["snap_config"]);
    assert_eq!(r["config_parent"], "before");
    failed_with("duplicate", "snapshot name 'before' already used");
    assert!(
        r["reserved"].as_str().unwrap().contains("unable to use snapshot name 'current' (reserved name)"),
        "{}",
        r["reserved"]
    );
    failed_with("missing", "snapshot 'nosuch' does not exist");

    // Clones: data from the snapshot or from now; new names, MACs; Proxmox's refusals.
    ok("clone_snap");
    ok("clone_now");
    assert_eq!(r["clone_names"]["401"], "fromsnap");
    assert_eq!(r["clone_names"]["402"], "Copy-of-VM-snapvm");
    assert_eq!(r["clone_401_aa"], true, "the snapshot's data");
    assert_eq!(r["clone_402_bb"], true, "the current data");
    assert!(
        r["clone_exists"].as_str().unwrap().contains("unable to create VM 401: config file already exists"),
        "{}",
        r["clone_exists"]
    );
    failed_with(
        "clone_linked",
        "clone failed: Linked clone feature is not supported for 'local:400/vm-400-disk-0.qcow2' (scsi0)",
    );
    assert!(
        r["clone_target"]
            .as_str()
            .unwrap()
            .contains("can't clone VM to node 'node9' (VM uses local storage)"),
        "{}",
        r["clone_target"]
    );
    let clone_tasks = r["clone_tasks"].as_array().unwrap();
    assert!(clone_tasks.iter().all(|t| t == "qmclone:400"), "the UPID names the source: {clone_tasks:?}");

    // Running: QMP snapshot and delete; a rollback stops QEMU, reverts, and starts it again.
    ok("start");
    ok("snap2");
    assert_eq!(r["on_image_2"], serde_json::json!(["before", "running"]));
    ok("del2");
    assert_eq!(r["on_image_3"], serde_json::json!(["before"]));
    ok("rollback");
    assert_eq!(r["after_rollback"]["status"], "running", "{}", r["after_rollback"]);
    assert_eq!(r["after_rollback"]["new_pid"], true, "a new QEMU: {}", r["after_rollback"]);
    assert_eq!(r["read_a"], true, "the disk is back to the snapshot's data");
    ok("stop");
    ok("rollback_stopped");
    assert_eq!(r["status_after"], "stopped");
    ok("delete_snap");
    assert_eq!(r["list_after"], serde_json::json!(["current"]));
    assert_eq!(r["on_image_4"], serde_json::json!([]));

    // Content removal.
    assert_eq!(r["iso_listed"], serde_json::json!(["local:iso/scratch.iso"]));
    ok("iso_delete");
    assert_eq!(r["iso_after"], serde_json::json!([]));
    assert!(!iso.join("scratch.iso").exists());
    assert!(
        r["in_use"].as_str().unwrap().contains("volume 'local:400/vm-400-disk-0.qcow2' is in use by VM 400"),
        "{}",
        r["in_use"]
    );

    // Containers: template, clone with the template's files, running clone; no snapshots.
    for key in ["ct_create", "ct_stop", "ct_template", "ct_clone", "ct_clone_start", "ct_clone_stop"] {
        ok(key);
    }
    assert!(
        r["ct_template_start"].as_str().unwrap().contains("you can't start a CT if it's a template"),
        "{}",
        r["ct_template_start"]
    );
    assert_eq!(r["ct_clone_marker"], "from the template");
    assert_eq!(r["ct_clone_config"]["hostname"], "cloned");
    assert!(r["ct_clone_config"].get("template").is_none(), "{}", r["ct_clone_config"]);
    failed_with("ct_snapshot", "snapshot feature is not available");

    // The snapshot is a resource: kubectl shows it with the config it was taken with, and
    // a declaration kpve cannot honour is refused with the field named.
    let bad = "apiVersion: kpve.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: rawsnap}\nspec:\n  vmid: 410\n  \
               disks: [{id: scsi0, pool: local, size: 1G, format: raw}]\n  snapshots: [{name: s1}]\n";
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(bad));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("spec.disks[scsi0].format")
            && err.contains("snapshots need qcow2"),
        "{err}"
    );
}
