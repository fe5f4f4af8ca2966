//! Copies container volumes between nodes (the restart migration of a container): the
//! source streams each volume as a tar archive over TCP to a receiver the target opened for
//! that one migration, into the guest's volume directory (`images/<vmid>/`).
//!
//! Wire format, one connection per volume: the source sends `KPVE-VOLUME <token> <name>
//! <pool-id>\n` and then the archive (`tar -c` of the volume's directory, numeric owners,
//! permissions, extended attributes, sparse files), and closes its side; the receiver
//! extracts it into a `.partial` directory of its own, flushes it to disk, renames it to the
//! volume, and answers `ok <sha256>\n` (the digest of the archive as received) or `error
//! <why>\n`. The sender compares the digest with the one of what it sent. Before anything is
//! sent (before the container stops) the source says `KPVE-HELLO <token> <pool-id>\n`: the
//! pool identity ([`crate::storage::DirPool::identity`]) tells whether both ends use the same
//! directory, where a copy onto itself would destroy the volume — refused.
//!
//! The token — 256 random bits the target made for the migration — is what admits a
//! sender, and each volume is accepted once; the stream itself is not encrypted (like QEMU's
//! migration stream). A stalled peer fails the copy after [`IDLE`].

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::time::timeout;

const MAGIC: &str = "KPVE-VOLUME";
const HELLO: &str = "KPVE-HELLO";
/// The longest header line a receiver reads.
const HEADER_LIMIT: u64 = 512;
/// tar's options on both ends: owners as numbers (an unprivileged container's files belong
/// to its mapped ids), every extended attribute (file capabilities), sparse files.
const TAR_COMMON: &[&str] = &["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"];
/// A peer that sends or takes nothing for this long has failed the copy.
pub const IDLE: Duration = Duration::from_secs(30);
/// How long a sender waits for the answer after the last byte (extraction, flush to disk).
const ANSWER: Duration = Duration::from_secs(300);

/// A receiver waiting for the volumes of one migration. Dropping it stops listening and
/// every copy in progress.
pub struct Receiver {
    pub address: SocketAddr,
    pub token: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

/// What a receiver admits and what it did.
struct Admits {
    token: String,
    /// Where volumes go (`images/<vmid>` of the pool).
    dir: PathBuf,
    pool_id: String,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Volume names being received.
    busy: HashSet<String>,
    /// Volumes received whole.
    received: Vec<PathBuf>,
    /// `.partial` directories made (removed once renamed or failed).
    partials: HashSet<PathBuf>,
    copies: Vec<tokio::task::AbortHandle>,
}

impl Receiver {
    /// The volumes received whole so far.
    pub fn received(&self) -> Vec<PathBuf> {
        self.state.lock().expect("receiver lock").received.clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
        let mut state = self.state.lock().expect("receiver lock");
        for copy in state.copies.drain(..) {
            copy.abort();
        }
        // A copy cut off leaves its partial directory (its tar is killed with it).
        for partial in state.partials.drain() {
            let _ = std::fs::remove_dir_all(partial);
        }
    }
}

/// Where the receiver is, as the order carries it: `tcp:HOST:PORT/TOKEN`.
pub fn uri(address: SocketAddr, token: &str) -> String {
    format!("tcp:{address}/{token}")
}

/// (address, token) of a receiver's uri.
pub fn parse_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("tcp:")?;
    let (address, token) = rest.rsplit_once('/')?;
    (!address.is_empty() && !token.is_empty()).then(|| (address.to_string(), token.to_string()))
}

/// Whether `name` may be a volume's file name in a guest's directory.
fn volume_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && !name.ends_with(".partial")
}

/// Listens on `address` (port chosen by the kernel) for volumes into `dir`, the guest's
/// volume directory of the pool named `pool_id`.
pub async fn listen(address: IpAddr, dir: PathBuf, pool_id: &str) -> std::io::Result<Receiver> {
    let listener = TcpListener::bind(SocketAddr::new(address, 0)).await?;
    let token: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    let state = Arc::new(Mutex::new(State::default()));
    let admits =
        Arc::new(Admits { token: token.clone(), dir, pool_id: pool_id.to_string(), state: state.clone() });
    let address = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let admits = admits.clone();
            let copy = tokio::spawn({
                let admits = admits.clone();
                async move {
                    if let Err(e) = receive_one(stream, &admits).await {
                        tracing::warn!(%peer, error = %e, "volume not received");
                    }
                }
            });
            let mut state = admits.state.lock().expect("receiver lock");
            state.copies.retain(|c| !c.is_finished());
            state.copies.push(copy.abort_handle());
        }
    });
    Ok(Receiver { address, token, state, task })
}

async fn receive_one(stream: TcpStream, admits: &Admits) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut header = String::new();
    timeout(IDLE, (&mut reader).take(HEADER_LIMIT).read_line(&mut header)).await??;
    let fields: Vec<&str> = header.trim_end().split(' ').collect();
    let admitted = |t: &str| constant_time_eq(t.as_bytes(), admits.token.as_bytes());
    let (name, pool_id) = match fields.as_slice() {
        [HELLO, t, pool_id] if admitted(t) => (None, *pool_id),
        [MAGIC, t, name, pool_id] if admitted(t) && volume_name(name) => (Some(*name), *pool_id),
        _ => {
            // Nothing about what is expected goes back to whoever this is.
            write.write_all(b"error refused\n").await?;
            return Ok(());
        }
    };
    let reply = if pool_id == admits.pool_id {
        "error the source's pool is the same directory as the target's: declare the StoragePool spec.shared: true\n".to_string()
    } else if let Some(name) = name {
        let claimed = {
            let mut state = admits.state.lock().expect("receiver lock");
            let done = state.received.iter().any(|p| p.file_name().is_some_and(|n| n == name));
            !done && state.busy.insert(name.to_string())
        };
        if claimed {
            let result = extract(&mut reader, &admits.dir.join(name), &admits.state).await;
            let mut state = admits.state.lock().expect("receiver lock");
            state.busy.remove(name);
            match result {
                Ok(digest) => {
                    state.received.push(admits.dir.join(name));
                    format!("ok {digest}\n")
                }
                Err(e) => format!("error {}\n", e.replace('\n', " ")),
            }
        } else {
            format!("error {name} was received already or is being received\n")
        }
    } else {
        "ok hello\n".to_string()
    };
    timeout(IDLE, write.write_all(reply.as_bytes())).await??;
    write.shutdown().await
}

/// Extracts the archive read from `input` into a partial directory beside `target`, flushes
/// it to disk, then makes it `target` (replacing a stale one). The archive's SHA-256.
async fn extract(
    input: &mut (impl AsyncRead + Unpin),
    target: &Path,
    state: &Mutex<State>,
) -> Result<String, String> {
    let tag: String = rand::random::<[u8; 6]>().iter().map(|b| format!("{b:02x}")).collect();
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tag}.partial"));
    let partial = target.with_file_name(name);
    std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    state.lock().expect("receiver lock").partials.insert(partial.clone());
    let result = extract_into(input, target, &partial).await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    state.lock().expect("receiver lock").partials.remove(&partial);
    result
}

async fn extract_into(
    input: &mut (impl AsyncRead + Unpin),
    target: &Path,
    partial: &Path,
) -> Result<String, String> {
    let mut tar = Command::new("tar")
        .args(["-x", "-p", "-f", "-"])
        .args(TAR_COMMON)
        .arg("-C")
        .arg(partial)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let mut stdin = tar.stdin.take().expect("piped");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let copied: std::io::Result<()> = async {
        loop {
            let n = timeout(IDLE, input.read(&mut buf)).await??;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            timeout(IDLE, stdin.write_all(&buf[..n])).await??;
        }
        stdin.shutdown().await
    }
    .await;
    drop(stdin);
    let out = tar.wait_with_output().await.map_err(|e| format!("tar: {e}"))?;
    copied.map_err(|e| format!("receiving: {e}"))?;
    if !out.status.success() {
        return Err(format!("tar -x: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    // On disk before the source is told (it frees its copy once the move is recorded).
    let synced = Command::new("sync").arg("-f").arg(partial).status().await;
    if !synced.is_ok_and(|s| s.success()) {
        return Err(format!("sync -f {}: failed", partial.display()));
    }
    if target.exists() {
        std::fs::remove_dir_all(target).map_err(|e| format!("replacing {}: {e}", target.display()))?;
    }
    std::fs::rename(partial, target).map_err(|e| format!("{}: {e}", target.display()))?;
    if let Some(dir) = target.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(hex(&hasher.finalize()))
}

/// Asks the receiver at `address` whether it takes volumes of the pool named `pool_id` (not
/// the same directory), before anything is stopped or sent.
pub async fn check(address: &str, token: &str, pool_id: &str) -> Result<(), String> {
    let stream = timeout(IDLE, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connecting to {address}: timed out"))?
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let (read, mut write) = stream.into_split();
    let asked = async {
        write.write_all(format!("{HELLO} {token} {pool_id}\n").as_bytes()).await?;
        write.shutdown().await?;
        let mut reply = String::new();
        BufReader::new(read).take(HEADER_LIMIT).read_line(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = timeout(IDLE, asked)
        .await
        .map_err(|_| format!("{address}: no answer"))?
        .map_err(|e| format!("{address}: {e}"))?;
    match reply.trim_end().split_once(' ') {
        Some(("ok", _)) => Ok(()),
        Some(("error", why)) => Err(format!("the target: {why}")),
        _ => Err(format!("{address}: no answer")),
    }
}

/// Sends the volume `dir` (named `name` in the guest's volume directory, of the pool named
/// `pool_id`) to the receiver at `address` admitting `token`. The bytes sent.
pub async fn send(address: &str, token: &str, name: &str, dir: &Path, pool_id: &str) -> Result<u64, String> {
    if !dir.is_dir() {
        return Err(format!("{name}: {} is not a directory", dir.display()));
    }
    let stream = timeout(IDLE, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connecting to {address}: timed out"))?
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    stream.set_nodelay(true).ok();
    let (read, mut write) = stream.into_split();
    let mut tar = Command::new("tar")
        .args(["-c", "-f", "-", "--sparse"])
        .args(TAR_COMMON)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let mut stdout = tar.stdout.take().expect("piped");
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let copied: std::io::Result<()> = async {
        timeout(IDLE, write.write_all(format!("{MAGIC} {token} {name} {pool_id}\n").as_bytes())).await??;
        loop {
            let n = timeout(IDLE, stdout.read(&mut buf)).await??;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            timeout(IDLE, write.write_all(&buf[..n])).await??;
            sent += n as u64;
        }
        write.shutdown().await
    }
    .await;
    let out = tar.wait_with_output().await.map_err(|e| format!("tar: {e}"))?;
    // The answer, also when the send broke off (a receiver that refused stops reading).
    let mut reply = String::new();
    let answered = timeout(ANSWER, BufReader::new(read).take(HEADER_LIMIT).read_line(&mut reply)).await;
    let digest = hex(&hasher.finalize());
    match reply.trim_end().split_once(' ') {
        Some(("error", why)) => Err(format!("{name}: the target: {why}")),
        _ if copied.is_err() => Err(format!("sending {name} to {address}: {}", copied.unwrap_err())),
        _ if !out.status.success() => {
            Err(format!("tar -c {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim()))
        }
        Some(("ok", theirs)) if theirs == digest => Ok(sent),
        Some(("ok", theirs)) => {
            Err(format!("{name}: the target received other data (sha256 {theirs}, sent {digest})"))
        }
        _ => Err(format!(
            "{name}: no answer from {address}{}",
            match answered {
                Err(_) => " (timed out)".to_string(),
                Ok(Err(e)) => format!(": {e}"),
                Ok(Ok(_)) => String::new(),
            }
        )),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "ct-host\n").unwrap();
        std::os::unix::fs::symlink("hostname", root.join("etc/link")).unwrap();
        std::os::unix::fs::chown(root.join("etc/hostname"), Some(100_033), Some(100_044)).unwrap();
    }

    const NAME: &str = "subvol-1-disk-0.subvol";

    #[tokio::test]
    async fn a_volume_arrives_whole_with_owners_and_links_once() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        tree(&src);
        std::fs::create_dir_all(dst.join(NAME)).unwrap();
        std::fs::write(dst.join(NAME).join("stale"), "old").unwrap();
        let receiver = listen(IpAddr::from([127, 0, 0, 1]), dst.clone(), "pool-b").await.unwrap();
        let uri = uri(receiver.address, &receiver.token);
        let (address, token) = parse_uri(&uri).unwrap();
        check(&address, &token, "pool-a").await.unwrap();
        let sent = send(&address, &token, NAME, &src, "pool-a").await.unwrap();
        assert!(sent > 0);
        let got = dst.join(NAME);
        assert_eq!(std::fs::read_to_string(got.join("etc/hostname")).unwrap(), "ct-host\n");
        assert_eq!(std::fs::read_link(got.join("etc/link")).unwrap(), Path::new("hostname"));
        assert!(!got.join("stale").exists(), "the stale copy was replaced");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(got.join("etc/hostname")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (100_033, 100_044));
        assert_eq!(receiver.received(), std::slice::from_ref(&got));
        // Accepted once: whoever has the token cannot replace it afterwards.
        std::fs::write(src.join("etc/hostname"), "replaced\n").unwrap();
        let e = send(&address, &token, NAME, &src, "pool-a").await.unwrap_err();
        assert!(e.contains("received already"), "{e}");
        assert_eq!(std::fs::read_to_string(got.join("etc/hostname")).unwrap(), "ct-host\n");
        let leftovers: Vec<_> = std::fs::read_dir(&dst).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, [std::ffi::OsString::from(NAME)], "no partial directory left");
    }

    #[tokio::test]
    async fn a_wrong_token_name_or_pool_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        tree(&src);
        std::fs::create_dir_all(&dst).unwrap();
        let receiver = listen(IpAddr::from([127, 0, 0, 1]), dst.clone(), "pool-b").await.unwrap();
        let address = receiver.address.to_string();
        let wrong = "0".repeat(64);
        let e = send(&address, &wrong, NAME, &src, "pool-a").await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let e = check(&address, &wrong, "pool-a").await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        for name in ["..", ".hidden", "x.partial"] {
            let e = send(&address, &receiver.token, name, &src, "pool-a").await.unwrap_err();
            assert!(e.contains("refused"), "{name}: {e}");
        }
        // The same directory on both ends: a copy onto itself is refused, before any send.
        let e = check(&address, &receiver.token, "pool-b").await.unwrap_err();
        assert!(e.contains("spec.shared"), "{e}");
        let e = send(&address, &receiver.token, NAME, &src, "pool-b").await.unwrap_err();
        assert!(e.contains("spec.shared"), "{e}");
        assert!(receiver.received().is_empty());
        assert_eq!(std::fs::read_dir(&dst).unwrap().count(), 0);
    }
}
