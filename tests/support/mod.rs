//! Starting the real `kpve server` binary for end-to-end tests, and driving it with kubectl
//! and kube-rs the way users and controllers do.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(60);

/// A `kpve server` in a temporary data directory.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Port of the Proxmox VE API (`--pve-listen 127.0.0.1:<port>`).
    pub pve_port: u16,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Run the node agent inside the server (otherwise `--no-agent`).
    agent: bool,
    /// Run the controllers inside the server (otherwise `--no-controllers`).
    controllers: bool,
    /// Network namespace the server (and kubectl) run in; `None` is the host's.
    netns: Option<String>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    /// The API server alone (`--no-agent --no-controllers`).
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// With extra `kpve server` arguments.
    pub fn start_with(args: &[&str]) -> Server {
        let mut server = Server {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            pve_port: free_port(),
            child: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            agent: false,
            controllers: false,
            netns: None,
        };
        server.spawn();
        server
    }

    /// The whole of `kpve server`: API server, controllers and this host's node agent.
    pub fn start_with_agent() -> Server {
        Server::start_parts(true, true)
    }

    /// API server and controllers; node agents run elsewhere.
    pub fn start_with_controllers() -> Server {
        Server::start_parts(false, true)
    }

    /// The whole of `kpve server` inside network namespace `netns` (which must exist): its
    /// agent's nftables tables, bridges and containers live there, away from the host's.
    /// Reach it with [`Server::kubectl`], which runs in the same namespace.
    pub fn start_in_netns(netns: &str) -> Server {
        Server::start_parts_in(true, true, Some(netns.to_string()))
    }

    fn start_parts(agent: bool, controllers: bool) -> Server {
        Server::start_parts_in(agent, controllers, None)
    }

    fn start_parts_in(agent: bool, controllers: bool, netns: Option<String>) -> Server {
        let mut server = Server {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            pve_port: free_port(),
            child: None,
            extra_args: Vec::new(),
            agent,
            controllers,
            netns,
        };
        server.spawn();
        server
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the binary and waits until it serves.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.kubeconfig());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = self
            .command(env!("CARGO_BIN_EXE_kpve"))
            .args(["server", "--node", "node1", "--bookmark-interval", "1"])
            .args(if self.agent { None } else { Some("--no-agent") })
            .args(if self.controllers { None } else { Some("--no-controllers") })
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--kube-listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--pve-listen")
            .arg(format!("127.0.0.1:{}", self.pve_port))
            .args(&self.extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kpve server starts");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kpve server exited with {status}:\n{}", self.log());
            }
            if self.kubeconfig().exists() && self.serving() {
                return;
            }
            assert!(Instant::now() < deadline, "kpve server did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `program` in this server's network namespace.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => netns_command(ns, program),
            None => Command::new(program),
        }
    }

    fn serving(&self) -> bool {
        match &self.netns {
            None => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            Some(_) => self
                .command("bash")
                .arg("-c")
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{}", self.port))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        }
    }

    /// SIGKILL, no shutdown of any kind.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    /// kubectl against this server, with its own discovery cache `cache`.
    fn kubectl_command(&self, cache: &str) -> Command {
        let mut cmd = self.command("kubectl");
        cmd.arg("--kubeconfig").arg(self.kubeconfig()).arg("--cache-dir").arg(self.dir.path().join(cache));
        cmd
    }

    /// kubectl running while the test goes on (`wait`, a `delete` that waits): join for
    /// its output. `cache` keeps its discovery cache apart from the foreground kubectl's.
    pub fn kubectl_background(&self, cache: &str, args: &[&str]) -> std::thread::JoinHandle<Output> {
        let mut cmd = self.kubectl_command(cache);
        cmd.args(args);
        std::thread::spawn(move || cmd.output().unwrap())
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .kubectl_command("kube-cache")
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        if let Some(input) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\nstdout: {}\nstderr: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn token(&self, role: &str, node: Option<&str>) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kpve"));
        cmd.args(["token", "create", "--role", role]).arg("--data-dir").arg(self.dir.path());
        if let Some(node) = node {
            cmd.args(["--node", node]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        // A node token comes as a join token (`kpve-join.<CA>.<bearer>`): the bearer part.
        match token.strip_prefix("kpve-join.") {
            Some(rest) => rest.rsplit('.').next().unwrap().to_string(),
            None => token,
        }
    }

    /// The join token `kpve token create --node NODE` prints (a new token each call).
    pub fn join_token(&self, node: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_kpve"))
            .args(["token", "create", "--node", node])
            .arg("--data-dir")
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Starts `kpve agent` for `node` as its own process, with a node token, its state in
    /// `agent_dir` and its log in `<data dir>/agent.log`.
    pub fn spawn_agent(&self, node: &str, agent_dir: &Path) -> Child {
        self.spawn_agent_with(node, agent_dir, &[])
    }

    /// [`Server::spawn_agent`] with extra `kpve agent` arguments.
    pub fn spawn_agent_with(&self, node: &str, agent_dir: &Path, extra: &[&str]) -> Child {
        self.spawn_agent_via(node, agent_dir, self.port, extra)
    }

    /// [`Server::spawn_agent_with`], reaching the API server through `port` on loopback (a
    /// [`Proxy`] the test can cut).
    pub fn spawn_agent_via(&self, node: &str, agent_dir: &Path, port: u16, extra: &[&str]) -> Child {
        let token_file = self.dir.path().join(format!("agent-token-{node}"));
        if !token_file.exists() {
            std::fs::write(&token_file, self.join_token(node)).unwrap();
        }
        self.agent_command(
            node,
            agent_dir,
            port,
            &[OsStr::new("--token-file"), token_file.as_os_str()],
            extra,
        )
    }

    /// `kpve agent` with no credentials on the command line: what an earlier join left in
    /// `agent_dir`.
    pub fn respawn_agent_via(&self, node: &str, agent_dir: &Path, port: u16, extra: &[&str]) -> Child {
        self.agent_command(node, agent_dir, port, &[], extra)
    }

    fn agent_command(
        &self,
        node: &str,
        agent_dir: &Path,
        port: u16,
        credentials: &[&OsStr],
        extra: &[&str],
    ) -> Child {
        Command::new(env!("CARGO_BIN_EXE_kpve"))
            .args(["agent", "--node", node])
            .arg("--server")
            .arg(format!("https://127.0.0.1:{port}"))
            .args(credentials)
            .arg("--data-dir")
            .arg(agent_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("agent.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap()
    }

    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig()).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// A client authenticating with `token` (None: no credentials at all).
    pub async fn client_with_token(&self, token: Option<&str>) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig()).unwrap();
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .unwrap();
        config.auth_info.token = token.map(|t| t.to_string().into());
        kube::Client::try_from(config).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // Containers outlive their agent by design: stop every one the agent started.
        stop_containers_in(self.netns.as_deref(), &self.dir.path().join("agent/run"));
        // QEMU outlives its agent by design, and a test may have started a separate agent:
        // whatever still runs out of this server's directory goes with the test.
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(self.dir.path()).status();
        if std::thread::panicking() {
            let mut log = String::new();
            if let Ok(mut f) = std::fs::File::open(self.log_path()) {
                let _ = f.read_to_string(&mut log);
            }
            eprintln!("--- kpve server log ---\n{log}");
        }
    }
}

/// Polls `check` until it returns true or the deadline passes.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn vm_manifest(name: &str, cores: u32, extra_spec: &str) -> String {
    format!(
        "apiVersion: kpve.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: demo\nspec:\n  powerState: Stopped\n  cpu:\n    cores: {cores}\n  memory:\n    size: 512\n{extra_spec}"
    )
}

/// The Debian cloud kernel `scripts/install-host-deps.sh --test` puts in place.
pub const TEST_KERNEL: &str = "/var/cache/kpve/kernel/vmlinuz";
/// What the test guest prints on its serial console once its userspace runs.
pub const BOOT_MARKER: &str = "KPVE-GUEST-UP";

/// A busybox initramfs whose /init prints [`BOOT_MARKER`] and the guest's memory, then idles.
pub fn test_initramfs(dir: &Path) -> PathBuf {
    let script = format!(
        "/bin/busybox echo {BOOT_MARKER}\n\
         /bin/busybox grep MemTotal /proc/meminfo\n\
         while true; do /bin/busybox sleep 1; done\n"
    );
    initramfs(dir, "initramfs", &script, false)
}

/// The test kernel's virtio block driver and what it needs (`scripts/install-host-deps.sh
/// --test`), loaded in the order `order` lists.
pub const TEST_MODULES: &str = "/var/cache/kpve/kernel/modules";

/// A busybox initramfs `dir/<name>.cpio` whose /init mounts /proc and /dev, loads the virtio
/// block driver if `disk` (the guest then has /dev/vda), then runs `script`.
pub fn initramfs(dir: &Path, name: &str, script: &str, disk: bool) -> PathBuf {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    let mut load = String::new();
    if disk {
        let modules = Path::new(TEST_MODULES);
        let order = std::fs::read_to_string(modules.join("order"))
            .expect("the test kernel's modules (scripts/install-host-deps.sh --test)");
        std::fs::create_dir_all(root.join("lib/modules")).unwrap();
        for module in order.lines().filter(|l| !l.is_empty()) {
            std::fs::copy(modules.join(module), root.join("lib/modules").join(module)).unwrap();
            load.push_str(&format!("/bin/busybox insmod /lib/modules/{module}\n"));
        }
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /proc /dev\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         {load}{script}"
    );
    std::fs::write(root.join("init"), init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = dir.join(format!("{name}.cpio"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | cpio -o -H newc --quiet > {}", root.display(), image.display()))
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed");
    image
}

/// `program` in network namespace `ns`, with the host's cgroups still mounted
/// (`scripts/netns-exec.sh`; LXC needs them, `ip netns exec` hides them).
pub fn netns_command(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-exec.sh"));
    cmd.args([ns, program]);
    cmd
}

/// Hard-stops the containers of an agent's lxcpath (its run root).
pub fn stop_containers(lxcpath: &Path) {
    stop_containers_in(None, lxcpath)
}

/// The same for an agent in network namespace `netns` (LXC's command socket is an abstract
/// socket, so only a client in the monitor's namespace reaches it).
pub fn stop_containers_in(netns: Option<&str>, lxcpath: &Path) {
    for entry in std::fs::read_dir(lxcpath).into_iter().flatten().flatten() {
        if entry.path().join("config").exists() {
            let mut cmd = match netns {
                Some(ns) => netns_command(ns, "lxc-stop"),
                None => Command::new("lxc-stop"),
            };
            let _ = cmd
                .arg("-P")
                .arg(lxcpath)
                .arg("-n")
                .arg(entry.file_name())
                .arg("-k")
                .current_dir("/")
                .output();
        }
    }
}

/// What the test container's init writes to its console once it runs.
pub const CT_MARKER: &str = "KPVE-CT-UP";

/// A minimal OS template (`scripts/make-busybox-template.sh`): a static busybox rootfs as
/// `<name>.tar.gz` in `dir`. Its init prints [`CT_MARKER`] and its host name, idles, and
/// exits on SIGPWR (lxc's halt signal) like a real init.
pub fn busybox_template(dir: &Path, name: &str) -> PathBuf {
    let tarball = dir.join(format!("{name}.tar.gz"));
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/make-busybox-template.sh"))
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(out.status.success(), "make-busybox-template: {}", String::from_utf8_lossy(&out.stderr));
    tarball
}

/// Name of the template [`install_busybox_template`] puts in place.
pub const BUSYBOX_TEMPLATE: &str = "kpve-busybox";

/// Puts the busybox test template where the `local` pool of `data_dir` keeps OS templates
/// (`local:vztmpl/kpve-busybox.tar.gz`).
pub fn install_busybox_template(data_dir: &Path) {
    let cache = data_dir.join("storage/local/template/cache");
    std::fs::create_dir_all(&cache).unwrap();
    let tarball = busybox_template(data_dir, BUSYBOX_TEMPLATE);
    std::fs::rename(tarball, cache.join(format!("{BUSYBOX_TEMPLATE}.tar.gz"))).unwrap();
}

/// Whether proxmoxer and requests can be imported (with KPVE_REQUIRE_HOST set they must be:
/// `scripts/install-host-deps.sh --test` installs them).
#[allow(dead_code)]
pub fn proxmoxer_available() -> bool {
    let have = Command::new("python3")
        .args(["-c", "import proxmoxer, requests"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have || std::env::var("KPVE_REQUIRE_HOST").is_err(),
        "proxmoxer and requests are required (scripts/install-host-deps.sh --test)"
    );
    if !have {
        eprintln!("skipping: proxmoxer not installed");
    }
    have
}

/// Helpers every client script has: `err(f)` is the error text of calling `f`, or None.
const PY_PRELUDE: &str = "
def err(f):
    try:
        f()
        return None
    except Exception as e:
        return str(e)
";

/// Runs a Python client script (`python3 -c SCRIPT ARGS…`, through `cmd`, after
/// [`PY_PRELUDE`]) and returns the JSON it prints; fails the test with its stderr and the
/// server's log otherwise.
#[allow(dead_code)]
pub fn run_client(mut cmd: Command, script: &str, args: &[&str], server: &Server) -> serde_json::Value {
    let out = cmd.arg("-c").arg(format!("{PY_PRELUDE}{script}")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Login every root@pam client script starts with: `p` logged in with the port and password
/// given first; the script's own arguments follow from `sys.argv[1]`.
const ROOT_LOGIN: &str = r#"
import json, sys, warnings
from proxmoxer import ProxmoxAPI
from proxmoxer.tools import Tasks
warnings.filterwarnings("ignore")
p = ProxmoxAPI("127.0.0.1", port=int(sys.argv[1]), user="root@pam", password=sys.argv[2], verify_ssl=False)
sys.argv = sys.argv[:1] + sys.argv[3:]
"#;

/// [`run_client`] with `p` logged in as root@pam on `server`'s Proxmox API (its generated
/// password).
#[allow(dead_code)]
pub fn run_root_client(server: &Server, script: &str, args: &[&str]) -> serde_json::Value {
    let password = std::fs::read_to_string(server.data_dir().join("pve-root-password")).unwrap();
    let port = server.pve_port.to_string();
    let mut all = vec![port.as_str(), password.trim()];
    all.extend_from_slice(args);
    run_client(Command::new("python3"), &format!("{ROOT_LOGIN}{script}"), &all, server)
}

/// Kills a test's agents and, when the test is failing, prints their log
/// (`<data dir>/agent.log`).
#[allow(dead_code)]
pub fn stop_agents<'a>(server: &Server, agents: impl IntoIterator<Item = &'a mut Child>) {
    for agent in agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    if std::thread::panicking() {
        eprintln!(
            "--- agent log ---\n{}",
            std::fs::read_to_string(server.data_dir().join("agent.log")).unwrap_or_default()
        );
    }
}

/// A network namespace made for one test (loopback up), deleted when dropped.
#[allow(dead_code)]
pub struct Netns(pub String);

#[allow(dead_code)]
impl Netns {
    /// `ip netns add <prefix>-<pid>` and `lo` up.
    pub fn new(prefix: &str) -> Netns {
        let ns = Netns(format!("{prefix}-{}", std::process::id()));
        for args in [vec!["netns", "add", &ns.0], vec!["-n", &ns.0, "link", "set", "lo", "up"]] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A TCP forwarder on loopback that a test can cut, as a network partition between an agent
/// and the API server would, and heal.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<self.port> to 127.0.0.1:`upstream`.
    pub fn to(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut2, open2) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                {
                    let mut open = open2.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Proxy { port, cut, open }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
