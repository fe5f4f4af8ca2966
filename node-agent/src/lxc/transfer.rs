//! Copies container volumes between nodes (the restart migration of a container): the
//! source streams each volume as a tar archive over TCP to a receiver the target opened for
//! that one migration.
//!
//! Wire format, one connection per volume: the source sends `KPVE-VOLUME <token> <slot>
//! <pool-id>\n` (the [identity](crate::storage::DirPool::identity) of its pool: a receiver
//! whose pool is the same directory refuses, a copy onto itself would destroy the volume)
//! and then the archive (`tar -c` of the volume's directory, numeric owners, permissions,
//! extended attributes, sparse files), and closes its side; the receiver extracts it into
//! `<volume>.partial`, renames that to the volume, and answers `ok <sha256>\n` (the digest
//! of the archive as received) or `error <why>\n`. The sender compares the digest with the
//! one of what it sent. A volume may be sent again (a sender that restarted): the newest
//! complete copy stands.
//!
//! The token — 256 random bits the target made for the migration — is what admits a
//! sender; the stream itself is not encrypted (like QEMU's migration stream).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

const MAGIC: &str = "KPVE-VOLUME";
/// The longest header line a receiver reads.
const HEADER_LIMIT: u64 = 512;
/// tar's options on both ends: owners as numbers (an unprivileged container's files belong
/// to its mapped ids), every extended attribute (file capabilities), sparse files.
const TAR_COMMON: &[&str] = &["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"];

/// A receiver waiting for the volumes of one migration. Dropping it stops listening.
pub struct Receiver {
    pub address: SocketAddr,
    pub token: String,
    received: Arc<std::sync::Mutex<Vec<PathBuf>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// The volumes received whole so far.
    pub fn received(&self) -> Vec<PathBuf> {
        self.received.lock().expect("received lock").clone()
    }
}

/// What a receiver admits: the token, the volumes by slot, the receiving pool's identity.
struct Admits {
    token: String,
    volumes: BTreeMap<String, PathBuf>,
    pool_id: String,
    received: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
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

/// Listens on `address` (port chosen by the kernel) for the volumes `slot → directory` of
/// pool `pool_id`.
pub async fn listen(
    address: IpAddr,
    volumes: BTreeMap<String, PathBuf>,
    pool_id: &str,
) -> std::io::Result<Receiver> {
    let listener = TcpListener::bind(SocketAddr::new(address, 0)).await?;
    let token: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    let received = Arc::default();
    let admits = Arc::new(Admits {
        token: token.clone(),
        volumes,
        pool_id: pool_id.to_string(),
        received: Arc::clone(&received),
    });
    let address = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let admits = admits.clone();
            tokio::spawn(async move {
                if let Err(e) = receive_one(stream, &admits).await {
                    tracing::warn!(%peer, error = %e, "volume not received");
                }
            });
        }
    });
    Ok(Receiver { address, token, received, task })
}

async fn receive_one(stream: TcpStream, admits: &Admits) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut header = String::new();
    (&mut reader).take(HEADER_LIMIT).read_line(&mut header).await?;
    let fields: Vec<&str> = header.trim_end().split(' ').collect();
    let (target, pool_id) = match fields.as_slice() {
        [MAGIC, t, slot, pool_id] if constant_time_eq(t.as_bytes(), admits.token.as_bytes()) => {
            (admits.volumes.get(*slot), *pool_id)
        }
        _ => (None, ""),
    };
    let Some(target) = target else {
        // Nothing about what is expected goes back to whoever this is.
        write.write_all(b"error refused\n").await?;
        return Ok(());
    };
    if pool_id == admits.pool_id {
        let message = "error the source's pool is the same directory as the target's: declare the StoragePool spec.shared: true\n";
        write.write_all(message.as_bytes()).await?;
        return Ok(());
    }
    let reply = match extract(&mut reader, target).await {
        Ok(digest) => {
            admits.received.lock().expect("received lock").push(target.clone());
            format!("ok {digest}\n")
        }
        Err(e) => format!("error {}\n", e.replace('\n', " ")),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

/// Extracts the archive read from `input` into `<target>.partial`, then makes it `target`.
/// The archive's SHA-256.
async fn extract(input: &mut (impl tokio::io::AsyncRead + Unpin), target: &Path) -> Result<String, String> {
    let partial = partial_of(target);
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut tar = Command::new("tar")
        .args(["-x", "-p", "-f", "-"])
        .args(TAR_COMMON)
        .arg("-C")
        .arg(&partial)
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
            let n = input.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            stdin.write_all(&buf[..n]).await?;
        }
        stdin.shutdown().await
    }
    .await;
    drop(stdin);
    let out = tar.wait_with_output().await.map_err(|e| format!("tar: {e}"))?;
    let fail = |why: String| {
        let _ = std::fs::remove_dir_all(&partial);
        Err(why)
    };
    if let Err(e) = copied {
        return fail(format!("receiving: {e}"));
    }
    if !out.status.success() {
        return fail(format!("tar -x: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    if target.exists()
        && let Err(e) = std::fs::remove_dir_all(target)
    {
        return fail(format!("replacing {}: {e}", target.display()));
    }
    if let Err(e) = std::fs::rename(&partial, target) {
        return fail(format!("{}: {e}", target.display()));
    }
    Ok(hex(&hasher.finalize()))
}

/// Sends volume `slot` (the directory `dir`, of the pool named `pool_id`) to the receiver at
/// `address` admitting `token`. The bytes sent.
pub async fn send(address: &str, token: &str, slot: &str, dir: &Path, pool_id: &str) -> Result<u64, String> {
    if !dir.is_dir() {
        return Err(format!("{slot}: {} does not exist", dir.display()));
    }
    let stream = TcpStream::connect(address).await.map_err(|e| format!("connecting to {address}: {e}"))?;
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
        write.write_all(format!("{MAGIC} {token} {slot} {pool_id}\n").as_bytes()).await?;
        loop {
            let n = stdout.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            write.write_all(&buf[..n]).await?;
            sent += n as u64;
        }
        write.shutdown().await
    }
    .await;
    let out = tar.wait_with_output().await.map_err(|e| format!("tar: {e}"))?;
    // The answer, also when the send broke off (a receiver that refused stops reading).
    let mut reply = String::new();
    let answered = BufReader::new(read).take(HEADER_LIMIT).read_line(&mut reply).await;
    let digest = hex(&hasher.finalize());
    match reply.trim_end().split_once(' ') {
        Some(("error", why)) => Err(format!("{slot}: the target: {why}")),
        _ if copied.is_err() => Err(format!("sending {slot} to {address}: {}", copied.unwrap_err())),
        _ if !out.status.success() => {
            Err(format!("tar -c {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim()))
        }
        Some(("ok", theirs)) if theirs == digest => Ok(sent),
        Some(("ok", theirs)) => {
            Err(format!("{slot}: the target received other data (sha256 {theirs}, sent {digest})"))
        }
        _ => Err(format!(
            "{slot}: no answer from {address}{}",
            answered.err().map(|e| format!(": {e}")).unwrap_or_default()
        )),
    }
}

/// `<volume>.partial`: a volume being received (not content of the pool).
pub fn partial_of(volume: &Path) -> PathBuf {
    let mut name = volume.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    volume.with_file_name(name)
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

    #[tokio::test]
    async fn a_volume_arrives_whole_with_owners_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst/subvol-1-disk-0.subvol"));
        tree(&src);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let slots = BTreeMap::from([("rootfs".to_string(), dst.clone())]);
        let receiver = listen(IpAddr::from([127, 0, 0, 1]), slots, "pool-b").await.unwrap();
        let uri = uri(receiver.address, &receiver.token);
        let (address, token) = parse_uri(&uri).unwrap();
        let sent = send(&address, &token, "rootfs", &src, "pool-a").await.unwrap();
        assert!(sent > 0);
        assert_eq!(std::fs::read_to_string(dst.join("etc/hostname")).unwrap(), "ct-host\n");
        assert_eq!(std::fs::read_link(dst.join("etc/link")).unwrap(), Path::new("hostname"));
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dst.join("etc/hostname")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (100_033, 100_044));
        assert!(!partial_of(&dst).exists());
        // Sent again (a restarted sender): the newest copy replaces the first.
        std::fs::write(src.join("etc/hostname"), "renamed\n").unwrap();
        send(&address, &token, "rootfs", &src, "pool-a").await.unwrap();
        assert_eq!(receiver.received(), [dst.clone(), dst.clone()]);
        assert_eq!(std::fs::read_to_string(dst.join("etc/hostname")).unwrap(), "renamed\n");
    }

    #[tokio::test]
    async fn a_wrong_token_slot_or_pool_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        tree(&src);
        let slots = BTreeMap::from([("rootfs".to_string(), dst.clone())]);
        let receiver = listen(IpAddr::from([127, 0, 0, 1]), slots, "pool-b").await.unwrap();
        let address = receiver.address.to_string();
        let wrong = "0".repeat(64);
        let e = send(&address, &wrong, "rootfs", &src, "pool-a").await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let e = send(&address, &receiver.token, "mp9", &src, "pool-a").await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        // The same directory on both ends: a copy onto itself is refused.
        let e = send(&address, &receiver.token, "rootfs", &src, "pool-b").await.unwrap_err();
        assert!(e.contains("spec.shared"), "{e}");
        assert!(receiver.received().is_empty());
        assert!(!dst.exists() && !partial_of(&dst).exists());
    }
}
