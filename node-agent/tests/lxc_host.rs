//! One real container: a busybox rootfs on a scratch "dir pool", a config from `render`, driven
//! through lxc-start, lxc-info, lxc-attach, lxc-cgroup and lxc-stop the way the node agent will.
//!
//! Skips with a printed reason when the host cannot run it (no lxc tools, not root, no static
//! busybox); with `KPVE_REQUIRE_HOST=1` those become failures. The container is unprivileged when
//! the host can map ids for root, privileged otherwise, and says which.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kpve_crds::LinuxContainerSpec;
use kpve_node_agent::host;
use kpve_node_agent::lxc::config::{
    CgroupLayout, CtPlan, IdMap, ResolvedMount, ct_volume_name, render, render_seccomp,
};

const VMID: u32 = 990;
const HOSTNAME: &str = "kpve-smoke";
const HELLO: &str = "hello from the host";

fn skip(reason: &str) {
    if std::env::var("KPVE_REQUIRE_HOST").as_deref() == Ok("1") {
        panic!("KPVE_REQUIRE_HOST=1 but {reason}");
    }
    eprintln!("skipping the LXC smoke test: {reason}");
}

fn run(tool: &str, args: &[&str]) -> Output {
    // lxc-attach would try to enter the caller's cwd inside the container.
    Command::new(tool).args(args).current_dir("/").output().unwrap_or_else(|e| panic!("{tool}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops the container and removes the scratch tree however the test ends.
struct Scratch {
    root: PathBuf,
    lxcpath: String,
    name: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = run("lxc-stop", &["-P", &self.lxcpath, "-n", &self.name, "-k"]);
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Whether an ELF64 little-endian binary names a dynamic loader (a `PT_INTERP` program header).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..phnum)
        .any(|i| elf.get(phoff + i * phentsize..phoff + i * phentsize + 4) == Some(&3u32.to_le_bytes()[..]))
}

fn chown_tree(path: &Path, id: u32) {
    lchown(path, Some(id), Some(id)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), id);
        }
    }
}

#[test]
fn busybox_container_boots_and_stops() {
    let Some(lxc_start) = host::on_path("lxc-start") else { return skip("lxc-start is not installed") };
    if fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX) != 0 {
        return skip("the test must run as root to start containers");
    }
    let Some(busybox) = host::on_path("busybox") else { return skip("busybox is not installed") };
    let busybox_bytes = fs::read(&busybox).unwrap();
    // The rootfs has no libraries, so only a static busybox runs in it.
    if has_interpreter(&busybox_bytes) {
        return skip("busybox is dynamically linked; install busybox-static");
    }
    eprintln!("using {}", lxc_start.display());

    let map = IdMap::default();
    let unprivileged = match host::idmap_problem(map.host_uid, map.count) {
        None => true,
        Some(reason) => {
            eprintln!("running privileged: {reason}");
            false
        }
    };
    let layout = if host::cgroup_v1_memory() { CgroupLayout::Legacy } else { CgroupLayout::Unified };
    let apparmor = host::apparmor_enabled();
    eprintln!("unprivileged={unprivileged} cgroup={layout:?} apparmor={apparmor}");

    let root = std::env::temp_dir().join(format!("kpve-lxc-smoke-{}", std::process::id()));
    let name = format!("ct{VMID}");
    let scratch = Scratch {
        root: root.clone(),
        lxcpath: root.join("lxc").to_str().unwrap().to_string(),
        name: name.clone(),
    };
    let _ = fs::remove_dir_all(&root);
    let pool = root.join("pool");
    let rootfs = pool.join(ct_volume_name(VMID, 0));
    let data = pool.join(ct_volume_name(VMID, 1));
    let ct_dir = root.join("lxc").join(&name);
    for dir in ["bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root", "data"] {
        fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    fs::create_dir_all(&data).unwrap();
    fs::create_dir_all(&ct_dir).unwrap();
    fs::write(rootfs.join("bin/busybox"), &busybox_bytes).unwrap();
    fs::set_permissions(rootfs.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let init = "#!/bin/sh\n\
        { /bin/busybox hostname; /bin/busybox cat /data/hello; } > /booted.tmp\n\
        /bin/busybox mv /booted.tmp /booted\n\
        echo kpve-smoke init ran\n\
        exec /bin/busybox sleep 3600\n";
    fs::write(rootfs.join("sbin/init"), init).unwrap();
    fs::set_permissions(rootfs.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(data.join("hello"), format!("{HELLO}\n")).unwrap();
    if unprivileged {
        // Container root is host uid 100000; it must own its files like a Proxmox subvol.
        chown_tree(&rootfs, map.host_uid);
        chown_tree(&data, map.host_uid);
    }
    // Unprivileged container root must be able to reach the rootfs through the scratch tree.
    for dir in [&root, &pool, &root.join("lxc"), &ct_dir] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }

    let spec: LinuxContainerSpec = serde_json::from_value(serde_json::json!({
        "vmid": VMID,
        "hostname": HOSTNAME,
        "ostype": "unmanaged",
        "unprivileged": unprivileged,
        "memory": 128,
        "swap": 0,
        "cpulimit": 0.5,
        "tty": 1,
        "rootfs": { "pool": "local", "size": "1G", "mountoptions": "nosuid" },
        "mountPoints": [{ "id": "mp0", "path": "/data", "pool": "local", "size": "1G", "readonly": true }],
    }))
    .unwrap();
    let console_log = ct_dir.join("console.log");
    let plan = CtPlan {
        vmid: VMID,
        rootfs: ResolvedMount {
            id: "rootfs".into(),
            host_path: rootfs.clone(),
            target: "/".into(),
            read_only: false,
        },
        mounts: vec![ResolvedMount {
            id: "mp0".into(),
            host_path: data.clone(),
            target: "/data".into(),
            read_only: false,
        }],
        veths: Vec::new(),
        idmap: unprivileged.then_some(map),
        log_file: ct_dir.join("lxc.log"),
        console_log: Some(console_log.clone()),
        host_apparmor: apparmor,
        cgroup: layout,
        seccomp_profile: ct_dir.join("rules.seccomp"),
    };
    let config = render(&spec, &plan).expect("render");
    fs::write(&plan.seccomp_profile, render_seccomp(&spec)).unwrap();
    fs::write(ct_dir.join("config"), &config).unwrap();
    let lxcpath = scratch.lxcpath.as_str();
    let log = || fs::read_to_string(&plan.log_file).unwrap_or_default();

    let out = run("lxc-start", &["-P", lxcpath, "-n", &name, "-d"]);
    assert!(out.status.success(), "lxc-start failed\nconfig:\n{config}\nlog:\n{}", log());
    let out = run("lxc-wait", &["-P", lxcpath, "-n", &name, "-s", "RUNNING", "-t", "10"]);
    assert!(out.status.success(), "never RUNNING\nlog:\n{}", log());
    let info = stdout(&run("lxc-info", &["-P", lxcpath, "-n", &name, "-s"]));
    assert!(info.contains("RUNNING"), "lxc-info: {info}");

    // init saw its hostname and the read-only bind mount.
    let booted = rootfs.join("booted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !booted.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let marker = fs::read_to_string(&booted).unwrap_or_else(|e| panic!("no marker ({e})\nlog:\n{}", log()));
    assert_eq!(marker, format!("{HOSTNAME}\n{HELLO}\n"));

    let attach = |cmd: &[&str]| {
        let mut args = vec!["-P", lxcpath, "-n", name.as_str(), "--"];
        args.extend_from_slice(cmd);
        run("lxc-attach", &args)
    };
    assert_eq!(stdout(&attach(&["/bin/busybox", "hostname"])).trim(), HOSTNAME);
    let touch = attach(&["/bin/busybox", "touch", "/data/written"]);
    assert!(!touch.status.success() && !data.join("written").exists(), "mp0 must be read-only");
    let mounts = stdout(&attach(&["/bin/busybox", "cat", "/proc/mounts"]));
    let root_mount = mounts.lines().find(|l| l.split(' ').nth(1) == Some("/")).unwrap_or_default();
    assert!(root_mount.split(' ').nth(3).is_some_and(|o| o.split(',').any(|o| o == "nosuid")), "{mounts}");
    let uid_map = stdout(&attach(&["/bin/busybox", "cat", "/proc/self/uid_map"]));
    let uid_map: Vec<&str> = uid_map.split_whitespace().collect();
    if unprivileged {
        assert_eq!(uid_map, ["0", "100000", "65536"]);
    } else {
        assert_eq!(uid_map, ["0", "0", "4294967295"]);
    }

    // The memory limit reached the container's cgroup.
    let key = match layout {
        CgroupLayout::Unified => "memory.max",
        CgroupLayout::Legacy => "memory.limit_in_bytes",
    };
    let limit = stdout(&run("lxc-cgroup", &["-P", lxcpath, "-n", &name, key]));
    assert_eq!(limit.trim(), (128u64 << 20).to_string(), "{key}");

    let out = run("lxc-stop", &["-P", lxcpath, "-n", &name, "-k"]);
    assert!(out.status.success(), "lxc-stop: {}", String::from_utf8_lossy(&out.stderr));
    let info = stdout(&run("lxc-info", &["-P", lxcpath, "-n", &name, "-s"]));
    assert!(info.contains("STOPPED"), "lxc-info after stop: {info}");
    let console = fs::read_to_string(&console_log).unwrap_or_default();
    assert!(console.contains("kpve-smoke init ran"), "console log: {console:?}");
    drop(scratch);
    assert!(!root.exists());
}

#[test]
fn interpreter_detection_sees_this_dynamically_linked_test_binary() {
    let me = fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(has_interpreter(&me));
    assert!(!has_interpreter(b"#!/bin/sh\n"));
}
