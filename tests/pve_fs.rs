//! The `/etc/pve` view on a real FUSE mount (`kpve server --pve-fs DIR`), used the way
//! Proxmox admins and their scripts use pmxcfs: `cat` a VM's config (the same keys the
//! Proxmox API returns), `sed -i` it to change memory, write a new `<vmid>.conf` to create a
//! VM and `rm` it to delete it; an invalid edit is refused (EINVAL) with an Event and changes
//! nothing; files over 1 MiB are refused; the cluster files (`storage.cfg`, `user.cfg`,
//! `.vmlist`, `firewall/cluster.fw`, `ha/resources.cfg`) show what the resources declare, and
//! firewall and HA files round-trip. An agent's mount survives an API server restart,
//! read-only meanwhile.

mod support;

use std::path::Path;
use std::process::Command;

use support::{Server, wait_until};

fn sh(script: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(script).output().unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn etc_pve_view_reads_and_writes_resources() {
    if !Path::new("/dev/fuse").exists() {
        assert!(std::env::var("KPVE_REQUIRE_HOST").is_err(), "/dev/fuse is required");
        eprintln!("skipping: no /dev/fuse");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let etc = mnt.path().join("pve");
    let server = Server::start_with(&["--pve-fs", etc.to_str().unwrap()]);
    let _unmount = Unmount(etc.clone());
    wait_until("the view is mounted", || etc.join(".version").exists());

    // A VM declared with kubectl shows up as qemu-server/100.conf on its node.
    let vm = "apiVersion: kpve.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web, namespace: default}\nspec:\n  \
              vmid: 100\n  name: web\n  memory: {size: 256}\n  cpu: {cores: 2}\n  \
              disks: [{id: scsi0, pool: local, size: 4G}]\n  placement: {nodes: [node1]}\n  \
              ha: {group: g1}\n  firewall: {enable: true, rules: [{type: in, action: ACCEPT, proto: tcp, dport: '22'}]}\n";
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(vm));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = etc.join("nodes/node1/qemu-server/100.conf");
    wait_until("100.conf appears", || conf.exists());
    let text = read(&conf);
    assert!(
        text.contains("memory: 256\n") && text.contains("cores: 2\n") && text.contains("name: web\n"),
        "{text}"
    );
    // The local node's links, as on Proxmox.
    assert_eq!(read(&etc.join("qemu-server/100.conf")), text);
    assert_eq!(std::fs::read_link(etc.join("local")).unwrap(), Path::new("nodes/node1"));
    let listing: Vec<String> = std::fs::read_dir(etc.join("nodes/node1/qemu-server"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listing, ["100.conf"]);

    // The same keys the Proxmox API returns for the VM.
    if support::proxmoxer_available() {
        let script = r#"print(json.dumps(p.nodes("node1").qemu(100).config.get()))"#;
        let api = support::run_root_client(&server, script, &[]);
        for line in text.lines().filter(|l| l.contains(": ")) {
            let (key, value) = line.split_once(": ").unwrap();
            assert_eq!(api[key], value, "{key} in the API's config: {api}");
        }
    }

    // sed -i (a temporary file renamed over the config) changes the spec; what the config
    // does not carry (HA, firewall, placement) stays.
    let out = sh(&format!("sed -i 's/^memory: 256$/memory: 512/' {}", conf.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spec = server.kubectl_ok(&[
        "get",
        "vm",
        "web",
        "-o",
        "jsonpath={.spec.memory.size} {.spec.ha.group} {.spec.firewall.enable} {.spec.placement.nodes[0]}",
    ]);
    assert_eq!(spec, "512 g1 true node1");
    assert!(read(&conf).contains("memory: 512\n"));

    // vim's own save (a backup `100.conf~`, then the file written anew), run as a script.
    let out = Command::new("vim")
        .args(["-u", "DEFAULTS", "-i", "NONE", "-es"])
        // backupcopy=no: the rename-and-write-anew save (`auto` may choose either).
        .args(["-c", "set backupcopy=no", "-c", "%s/^memory: 512$/memory: 640/", "-c", "wq"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vim: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.kubectl_ok(&["get", "vm", "web", "-o", "jsonpath={.spec.memory.size}"]), "640");
    assert!(!etc.join("nodes/node1/qemu-server/100.conf~").exists(), "vim removed its backup");
    let out = sh(&format!("sed -i 's/^memory: 640$/memory: 512/' {}", conf.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // An invalid edit is refused and changes nothing; an Event says why.
    let out = sh(&format!("sed -i 's/^memory: 512$/memory: lots/' {}", conf.display()));
    assert!(!out.status.success(), "sed -i with an invalid memory must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Invalid argument"), "{err}");
    assert_eq!(server.kubectl_ok(&["get", "vm", "web", "-o", "jsonpath={.spec.memory.size}"]), "512");
    assert!(read(&conf).contains("memory: 512\n"));
    let events = server.kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
    assert!(events.contains("InvalidConfig") && events.contains("memory"), "{events}");

    // A new config creates a VM; removing it deletes the VM.
    let new = etc.join("nodes/node1/qemu-server/105.conf");
    std::fs::write(&new, "name: fromfs\nmemory: 128\ncores: 1\n").unwrap();
    assert_eq!(
        server.kubectl_ok(&[
            "get",
            "vm",
            "vm-105",
            "-o",
            "jsonpath={.spec.vmid} {.spec.memory.size} {.spec.placement.nodes[0]} {.spec.powerState}"
        ]),
        "105 128 node1 Stopped"
    );
    // Truncate-and-write of invalid content is refused when written out (fsync, or the
    // close, which Rust's File ignores), and nothing changes.
    let mut file = std::fs::File::create(&new).unwrap();
    std::io::Write::write_all(&mut file, b"memory: nope\n").unwrap();
    assert_eq!(file.sync_all().unwrap_err().raw_os_error(), Some(22), "EINVAL");
    drop(file);
    assert_eq!(server.kubectl_ok(&["get", "vm", "vm-105", "-o", "jsonpath={.spec.memory.size}"]), "128");
    // pmxcfs's 1 MiB limit.
    let big = format!("memory: 128\ndescription: {}\n", "x".repeat(1100 * 1024));
    assert_eq!(std::fs::write(&new, big).unwrap_err().raw_os_error(), Some(27), "EFBIG");
    assert_eq!(server.kubectl_ok(&["get", "vm", "vm-105", "-o", "jsonpath={.spec.memory.size}"]), "128");
    std::fs::remove_file(&new).unwrap();
    let gone = server.kubectl(&["get", "vm", "vm-105"]);
    assert!(!gone.status.success(), "vm-105 is deleted");

    // Moving a config to another node's directory migrates the guest: a stopped VM without
    // disks moves at once; a move the guest's placement forbids is refused with an Event.
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        Some("apiVersion: kpve.io/v1alpha1\nkind: Hypervisor\nmetadata: {name: node2}\nspec: {}\n---\napiVersion: kpve.io/v1alpha1\nkind: Hypervisor\nmetadata: {name: node1}\nspec: {}\n"),
    );
    let mover = "apiVersion: kpve.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: mover, namespace: default}\nspec:\n  vmid: 107\n  powerState: Stopped\n  memory: {size: 128}\n";
    server.kubectl_stdin(&["apply", "-f", "-"], Some(mover));
    server.kubectl_ok(&[
        "patch",
        "vm",
        "mover",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"node":"node1","phase":"Stopped"}}"#,
    ]);
    let on1 = etc.join("nodes/node1/qemu-server/107.conf");
    let on2 = etc.join("nodes/node2/qemu-server/107.conf");
    wait_until("107.conf on node1", || on1.exists());
    let out = sh(&format!("mv {} {}", on1.display(), on2.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.kubectl_ok(&["get", "vm", "mover", "-o", "jsonpath={.status.node}"]), "node2");
    assert!(on2.exists() && !on1.exists(), "the config is in node2's directory only");
    let out =
        sh(&format!("mv {} {}", conf.display(), etc.join("nodes/node2/qemu-server/100.conf").display()));
    assert!(!out.status.success(), "web is pinned to node1");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(conf.exists());
    let events = server.kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
    assert!(events.contains("placement does not allow node"), "{events}");
    let out = sh(&format!("mv {} {}", on2.display(), etc.join("nodes/node1/lxc/107.conf").display()));
    assert!(!out.status.success(), "a VM config does not become a container's");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(on2.exists());
    // A stopped container whose volumes are on a shared pool moves the same way; one with its
    // rootfs on a local pool is refused (copying volumes is not built), with an Event.
    let shared = mnt.path().join("shared");
    let pool = format!(
        "apiVersion: kpve.io/v1alpha1\nkind: StoragePool\nmetadata: {{name: shared}}\nspec: {{type: dir, path: {}, shared: true, content: [rootdir, images]}}\n",
        shared.display()
    );
    server.kubectl_stdin(&["apply", "-f", "-"], Some(&pool));
    let bind = "  mountPoints: [{id: mp0, volume: /srv, path: /srv}]\n";
    for (name, vmid, pool, extra) in [("shelf", 108, "shared", ""), ("local-ct", 109, "local", bind)] {
        let ct = format!(
            "apiVersion: kpve.io/v1alpha1\nkind: LinuxContainer\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  vmid: {vmid}\n  powerState: Stopped\n  template: local:vztmpl/none.tar.gz\n  rootfs: {{pool: {pool}, size: 1G}}\n{extra}"
        );
        let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&ct));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        server.kubectl_ok(&[
            "patch",
            "ct",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"node":"node1","phase":"Stopped"}}"#,
        ]);
    }
    let ct_on1 = etc.join("nodes/node1/lxc/108.conf");
    wait_until("108.conf on node1", || ct_on1.exists() && etc.join("nodes/node1/lxc/109.conf").exists());
    let out = sh(&format!("mv {} {}", ct_on1.display(), etc.join("nodes/node2/lxc/108.conf").display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.kubectl_ok(&["get", "ct", "shelf", "-o", "jsonpath={.status.node}"]), "node2");
    assert!(etc.join("nodes/node2/lxc/108.conf").exists() && !ct_on1.exists());
    let out = sh(&format!(
        "mv {} {}",
        etc.join("nodes/node1/lxc/109.conf").display(),
        etc.join("nodes/node2/lxc/109.conf").display()
    ));
    assert!(!out.status.success(), "a host path bind mount does not move");
    assert_eq!(server.kubectl_ok(&["get", "ct", "local-ct", "-o", "jsonpath={.status.node}"]), "node1");
    let events = server.kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
    assert!(events.contains("cannot migrate local bind mount point 'mp0'"), "{events}");
    // The Proxmox API moves it back the same way (`pct migrate` of a stopped container).
    if support::proxmoxer_available() {
        let script = r#"
upid = p.nodes("node2").lxc(108).migrate.post(target="node1")
out = {"upid": upid, "task": Tasks.blocking_status(p, upid, timeout=30)}
try:
    p.nodes("node1").lxc(109).migrate.post(target="node2")
except Exception as e:
    out["local"] = str(e)
print(json.dumps(out))
"#;
        let r = support::run_root_client(&server, script, &[]);
        assert!(r["upid"].as_str().unwrap().contains(":vzmigrate:108:"), "{r}");
        assert_eq!(r["task"]["exitstatus"], "OK", "{r}");
        assert_eq!(server.kubectl_ok(&["get", "ct", "shelf", "-o", "jsonpath={.status.node}"]), "node1");
        assert!(r["local"].as_str().unwrap().contains("cannot migrate local bind mount point"), "{r}");
    }

    // Cluster files.
    let vmlist: serde_json::Value = serde_json::from_str(&read(&etc.join(".vmlist"))).unwrap();
    assert_eq!(vmlist["ids"]["100"]["node"], "node1");
    assert_eq!(vmlist["ids"]["100"]["type"], "qemu");
    assert!(vmlist["ids"].get("105").is_none(), "{vmlist}");
    let resources = read(&etc.join("ha/resources.cfg"));
    assert!(resources.contains("vm: 100\n") && resources.contains("\tgroup g1\n"), "{resources}");
    let fw = read(&etc.join("firewall/100.fw"));
    assert!(fw.contains("enable: 1") && fw.contains("IN ACCEPT -p tcp -dport 22"), "{fw}");
    let users = read(&etc.join("user.cfg"));
    assert!(users.starts_with("user:root@pam:1:0:"), "{users}");
    // user.cfg: users, groups, roles and ACLs appended are declared; what the file does not
    // carry (password hashes) stays; rewriting it unchanged keeps every object; a grant of a
    // role that does not exist is refused.
    let dave = "apiVersion: kpve.io/v1alpha1\nkind: PVEUser\nmetadata: {name: dave.pve}\nspec:\n  userid: dave@pve\n  passwordHash: $5$abcdefgh$gruCpC7VkOTspMQTTSAR8mtlO9Upms.fwqE5y16JVM.\n";
    server.kubectl_stdin(&["apply", "-f", "-"], Some(dave));
    wait_until("dave in user.cfg", || read(&etc.join("user.cfg")).contains("user:dave@pve:"));
    let user_cfg = etc.join("user.cfg");
    let out = sh(&format!(
        "printf 'user:carol@pve:1:0:Carol:::ops lead::\\ngroup:ops:carol@pve,dave@pve:operators:\\nrole:Watcher:VM.Audit,Sys.Audit:\\nacl:1:/vms:@ops:Watcher:\\n' >> {}",
        user_cfg.display()
    ));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        server.kubectl_ok(&[
            "get",
            "pveuser",
            "carol.pve",
            "-o",
            "jsonpath={.spec.firstname} {.spec.comment} {.spec.groups}"
        ]),
        "Carol ops lead [\"ops\"]"
    );
    assert_eq!(
        server.kubectl_ok(&[
            "get",
            "pveuser",
            "dave.pve",
            "-o",
            "jsonpath={.spec.groups} {.spec.passwordHash}"
        ]),
        "[\"ops\"] $5$abcdefgh$gruCpC7VkOTspMQTTSAR8mtlO9Upms.fwqE5y16JVM.",
        "the hash user.cfg does not carry stays"
    );
    assert_eq!(
        server.kubectl_ok(&[
            "get",
            "pveroles",
            "-o",
            "jsonpath={.items[?(@.spec.roleid==\"Watcher\")].spec.privs}"
        ]),
        "[\"VM.Audit\",\"Sys.Audit\"]"
    );
    let acls = || {
        server.kubectl_ok(&[
            "get",
            "pveacls",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.path}:{.spec.groups}:{.spec.roles}:{.metadata.uid}:{.metadata.resourceVersion};{end}",
        ])
    };
    let before = acls();
    assert!(before.contains("=/vms:[\"ops\"]:[\"Watcher\"]:"), "{before}");
    let text = read(&user_cfg);
    assert!(text.contains("group:ops:carol@pve,dave@pve:operators:\n"), "{text}");
    std::fs::write(&user_cfg, &text).unwrap();
    assert_eq!(acls(), before, "an unchanged file changes nothing");
    let out = sh(&format!("sed -i 's/:Watcher:$/:NoSuchRole:/' {}", user_cfg.display()));
    assert!(!out.status.success(), "a grant of an unknown role is refused");
    assert_eq!(acls(), before);
    let events = server.kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
    assert!(events.contains("NoSuchRole"), "{events}");
    let storage = read(&etc.join("storage.cfg"));
    assert!(storage.contains("dir: local\n"), "{storage}");
    // Status files are read-only.
    assert!(std::fs::write(etc.join(".vmlist"), "{}\n").is_err());
    // datacenter.cfg: options checked against Proxmox's schema of /cluster/options.
    let dc = etc.join("datacenter.cfg");
    std::fs::write(&dc, "keyboard: de\nmigration: type=insecure,network=10.0.0.0/24\n").unwrap();
    assert_eq!(
        server.kubectl_ok(&[
            "get",
            "datacenter",
            "cluster",
            "-o",
            "jsonpath={.spec.options.keyboard} {.spec.options.migration}"
        ]),
        "de type=insecure,network=10.0.0.0/24"
    );
    assert_eq!(read(&dc), "keyboard: de\nmigration: type=insecure,network=10.0.0.0/24\n");
    let out = sh(&format!("sed -i 's/keyboard: de/keyboard: klingon/' {}", dc.display()));
    assert!(!out.status.success(), "an unknown keyboard layout is refused");
    assert_eq!(
        server.kubectl_ok(&["get", "datacenter", "cluster", "-o", "jsonpath={.spec.options.keyboard}"]),
        "de"
    );
    let events = server.kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
    assert!(events.contains("klingon"), "{events}");
    // storage.cfg: a pool appended (`>>`) is declared; an invalid content type is refused
    // and changes nothing.
    let backup = mnt.path().join("backup");
    let out = sh(&format!(
        "printf 'dir: backup\\n\\tpath {}\\n\\tcontent backup,iso\\n\\tnodes node1\\n' >> {}",
        backup.display(),
        etc.join("storage.cfg").display()
    ));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        server.kubectl_ok(&[
            "get",
            "storagepool",
            "backup",
            "-o",
            "jsonpath={.spec.path} {.spec.content} {.spec.nodes}"
        ]),
        format!("{} [\"backup\",\"iso\"] [\"node1\"]", backup.display())
    );
    assert_eq!(
        server.kubectl_ok(&["get", "storagepool", "local", "-o", "jsonpath={.spec.type}"]),
        "dir",
        "local stays"
    );
    let storage = read(&etc.join("storage.cfg"));
    assert!(storage.contains("dir: backup\n") && storage.contains("\tcontent backup,iso\n"), "{storage}");
    let out =
        sh(&format!("sed -i 's/content backup,iso/content pictures/' {}", etc.join("storage.cfg").display()));
    assert!(!out.status.success(), "an unknown content type is refused");
    assert_eq!(
        server.kubectl_ok(&["get", "storagepool", "backup", "-o", "jsonpath={.spec.content[0]}"]),
        "backup"
    );
    let events = server.kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
    assert!(events.contains("pictures"), "{events}");

    // Firewall and HA files round-trip: edited with the tools admins use, they change the
    // resources they render, and read back as written.
    let out = sh(&format!("sed -i 's/-dport 22/-dport 2222/' {}", etc.join("firewall/100.fw").display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        server.kubectl_ok(&["get", "vm", "web", "-o", "jsonpath={.spec.firewall.rules[0].dport}"]),
        "2222"
    );
    let cluster = "[OPTIONS]\n\nenable: 1\n\n[RULES]\n\nIN ACCEPT -p tcp -dport 8006\n\n[group webservers]\n\nIN ACCEPT -p tcp -dport 80\n";
    std::fs::write(etc.join("firewall/cluster.fw"), cluster).unwrap();
    assert_eq!(
        server.kubectl_ok(&["get", "clusterfirewall", "cluster", "-o", "jsonpath={.spec.enable}"]),
        "true"
    );
    assert_eq!(
        server.kubectl_ok(&["get", "securitygroup", "webservers", "-o", "jsonpath={.spec.rules[0].dport}"]),
        "80"
    );
    let shown = read(&etc.join("firewall/cluster.fw"));
    assert!(shown.contains("enable: 1") && shown.contains("[group webservers]"), "{shown}");
    std::fs::write(etc.join("ha/groups.cfg"), "group: g1\n\tnodes node1:2\n\trestricted 1\n").unwrap();
    assert_eq!(server.kubectl_ok(&["get", "hagroup", "g1", "-o", "jsonpath={.spec.restricted}"]), "true");
    let out =
        sh(&format!("sed -i 's/state started/state stopped/' {}", etc.join("ha/resources.cfg").display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.kubectl_ok(&["get", "vm", "web", "-o", "jsonpath={.spec.ha.state}"]), "stopped");
    assert!(read(&etc.join("ha/resources.cfg")).contains("\tstate stopped\n"));
    // An HA entry for a guest that does not exist is refused, and nothing changes.
    let out =
        sh(&format!("printf 'vm: 999\\n\\tstate started\\n' > {}", etc.join("ha/resources.cfg").display()));
    let _ = out;
    assert_eq!(server.kubectl_ok(&["get", "vm", "web", "-o", "jsonpath={.spec.ha.state}"]), "stopped");
}

/// An agent's mount (its own process, writing with an admin token) keeps serving reads while
/// the API server is down, refuses writes with EROFS once its watches have failed for 10 s,
/// takes writes again after the server is back, and unmounts on SIGTERM.
#[test]
fn an_agent_mount_is_read_only_while_the_server_is_down() {
    if !Path::new("/dev/fuse").exists() {
        assert!(std::env::var("KPVE_REQUIRE_HOST").is_err(), "/dev/fuse is required");
        return;
    }
    let mut server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("pve");
    let token = server.data_dir().join("fs-admin-token");
    std::fs::write(&token, server.token("admin", None)).unwrap();
    let mut agent = server.spawn_agent_with(
        "node2",
        &dir.path().join("agent"),
        &["--pve-fs", etc.to_str().unwrap(), "--pve-fs-token", token.to_str().unwrap()],
    );
    let _unmount = Unmount(etc.clone());
    wait_until("the agent's view is mounted", || etc.join(".version").exists());
    let vm = "apiVersion: kpve.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: db, namespace: default}\nspec:\n  \
              vmid: 110\n  memory: {size: 256}\n  placement: {nodes: [node2]}\n";
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(vm));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = etc.join("nodes/node2/qemu-server/110.conf");
    wait_until("110.conf appears", || conf.exists());
    let edit =
        |from: u32, to: u32| sh(&format!("sed -i 's/^memory: {from}$/memory: {to}/' {}", conf.display()));
    let out = edit(256, 384);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    server.kill9();
    // Reads go on from the caches; writes are refused once the watches are stale.
    assert!(read(&conf).contains("memory: 384\n"));
    wait_until("writes get EROFS", || {
        String::from_utf8_lossy(&edit(384, 512).stderr).contains("Read-only file system")
    });
    assert!(read(&conf).contains("memory: 384\n"));

    server.spawn();
    wait_until("writes are taken again", || edit(384, 512).status.success());
    assert_eq!(server.kubectl_ok(&["get", "vm", "db", "-o", "jsonpath={.spec.memory.size}"]), "512");

    // SIGTERM unmounts.
    let out = Command::new("kill").args(["-TERM", &agent.id().to_string()]).output().unwrap();
    assert!(out.status.success());
    let status = agent.wait().unwrap();
    assert!(status.success(), "the agent exits cleanly: {status}");
    assert!(!etc.join(".version").exists(), "the view is unmounted");
}
