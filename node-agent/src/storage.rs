//! Storage of type `dir`: volumes are files under the pool's path, laid out and named like
//! Proxmox's (`images/100/vm-100-disk-0.qcow2`, volume id `local:100/vm-100-disk-0.qcow2`),
//! allocated with `qemu-img` and freed with the guest.

use std::path::{Path, PathBuf};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("volume id {0:?} is not <pool>:<path>")]
    BadVolume(String),
    #[error("pool {0:?} does not exist on this node")]
    NoPool(String),
    #[error("{path}: {message}")]
    Create { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A dir pool on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirPool {
    pub name: String,
    pub path: PathBuf,
}

/// Bytes total / used / available of the filesystem holding a path (`df`-like).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub total: u64,
    pub used: u64,
    pub available: u64,
}

impl DirPool {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> DirPool {
        DirPool { name: name.into(), path: path.into() }
    }

    /// The Proxmox volume name of disk `index` of guest `vmid`.
    pub fn volume_name(vmid: u32, index: usize, format: &str) -> String {
        format!("{vmid}/vm-{vmid}-disk-{index}.{format}")
    }

    /// `local:100/vm-100-disk-0.qcow2` → path of the file.
    pub fn path_of(&self, volume: &str) -> Result<PathBuf> {
        let (pool, rel) = volume.split_once(':').ok_or_else(|| StorageError::BadVolume(volume.into()))?;
        // Exactly `<dir>/<name>`: a deeper path could pass through a symlink a guest made
        // inside its own volume and reach anywhere on the host.
        let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/');
        let well_formed = rel.split_once('/').is_some_and(|(dir, name)| {
            plain(name)
                && (dir == "iso"
                    || dir == "vztmpl"
                    || (!dir.is_empty() && dir.bytes().all(|b| b.is_ascii_digit())))
        });
        if pool != self.name || !well_formed {
            return Err(StorageError::BadVolume(volume.into()));
        }
        Ok(match rel.split_once('/') {
            Some(("iso", file)) => self.path.join("template/iso").join(file),
            Some(("vztmpl", file)) => self.path.join("template/cache").join(file),
            _ => self.path.join("images").join(rel),
        })
    }

    /// Creates the pool's directories.
    pub fn activate(&self) -> Result<()> {
        for sub in ["images", "template/iso", "template/cache"] {
            let dir = self.path.join(sub);
            std::fs::create_dir_all(&dir).map_err(|source| StorageError::Io { path: dir, source })?;
        }
        Ok(())
    }

    /// A random name of the pool's directory (in `.kpve-pool-id`, made on first use): two
    /// nodes that read the same name use the same directory.
    pub fn identity(&self) -> Result<String> {
        let file = self.path.join(".kpve-pool-id");
        let io = |source| StorageError::Io { path: file.clone(), source };
        match std::fs::read_to_string(&file) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::fs::create_dir_all(&self.path).map_err(io)?;
        let id: String = rand::random::<[u8; 16]>().iter().map(|b| format!("{b:02x}")).collect();
        // Whoever makes it first names the directory.
        let partial = self.path.join(format!(".kpve-pool-id.{id}"));
        std::fs::write(&partial, &id).map_err(io)?;
        let made = std::fs::hard_link(&partial, &file);
        let _ = std::fs::remove_file(&partial);
        match made {
            Ok(()) => Ok(id),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(std::fs::read_to_string(&file).map_err(io)?.trim().to_string())
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Allocates `volume` of `size` bytes unless it exists. Returns whether it was created.
    pub async fn allocate(&self, volume: &str, format: &str, size: u64) -> Result<bool> {
        let path = self.path_of(volume)?;
        if path.exists() {
            return Ok(false);
        }
        let dir = path.parent().expect("volume paths have a parent");
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Io { path: dir.into(), source })?;
        qemu_img("create", format, &path, size).await?;
        Ok(true)
    }

    /// The virtual size of a volume's image in bytes.
    pub async fn virtual_size(&self, volume: &str) -> Result<u64> {
        let path = self.path_of(volume)?;
        image_info(&path).await?["virtual-size"].as_u64().ok_or_else(|| StorageError::Create {
            path,
            message: "qemu-img info reports no virtual-size".into(),
        })
    }

    /// Makes `volume` (absent) a copy of `source`, or of `source` as it was at its internal
    /// snapshot `snapshot`, in `format` (`qemu-img convert` into `<volume>.partial`, then
    /// renamed: a half-made copy is never taken for the volume). Returns whether it copied.
    /// Without a snapshot the source must not be in use (QEMU's image lock refuses it).
    pub async fn copy_from(
        &self,
        source: &str,
        snapshot: Option<&str>,
        volume: &str,
        format: &str,
    ) -> Result<bool> {
        let path = self.path_of(volume)?;
        if path.exists() {
            return Ok(false);
        }
        let from = self.path_of(source)?;
        let dir = path.parent().expect("volume paths have a parent");
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Io { path: dir.into(), source })?;
        let partial = path.with_extension(format!("{format}.partial"));
        // The source's format is named, never probed: a guest could have written an image
        // header (with a backing file on the host) into a raw disk.
        let source_format = match source.rsplit_once('.').map(|(_, ext)| ext) {
            Some("raw") => "raw",
            Some("vmdk") => "vmdk",
            _ => "qcow2",
        };
        let mut cmd = Command::new("qemu-img");
        cmd.args(["convert", "-q", "-f", source_format, "-O", format]);
        if let Some(snap) = snapshot {
            // The snapshot's clusters never change, so a running source is fine.
            cmd.args(["-U", "-l"]).arg(format!("snapshot.name={snap}"));
        }
        run(cmd.arg(&from).arg(&partial), "convert", &path).await?;
        std::fs::rename(&partial, &path).map_err(|source| StorageError::Io { path: path.clone(), source })?;
        Ok(true)
    }

    /// Grows an image no process holds to `size` bytes (`qemu-img resize`).
    pub async fn grow(&self, volume: &str, format: &str, size: u64) -> Result<()> {
        qemu_img("resize", format, &self.path_of(volume)?, size).await
    }

    /// Removes every volume of guest `vmid`.
    pub fn free_guest(&self, vmid: u32) -> Result<()> {
        let dir = self.path.join("images").join(vmid.to_string());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StorageError::Io { path: dir, source }),
        }
    }

    /// Volume ids present on disk: guest images and subvolumes (`local:100/vm-100-disk-0.qcow2`),
    /// OS templates (`local:vztmpl/<file>`) and ISO images (`local:iso/<file>`); half-made
    /// volumes (`*.partial`) are not content.
    pub fn content(&self) -> Vec<String> {
        let name = |e: &std::fs::DirEntry| e.file_name().to_string_lossy().into_owned();
        let files = |dir: PathBuf| std::fs::read_dir(dir).into_iter().flatten().flatten();
        let mut out = Vec::new();
        for guest in files(self.path.join("images")) {
            for volume in files(guest.path()).filter(|v| !name(v).ends_with(".partial")) {
                out.push(format!("{}:{}/{}", self.name, name(&guest), name(&volume)));
            }
        }
        for (kind, dir) in [("vztmpl", "template/cache"), ("iso", "template/iso")] {
            for file in files(self.path.join(dir)).filter(|f| f.path().is_file()) {
                out.push(format!("{}:{kind}/{}", self.name, name(&file)));
            }
        }
        out.sort();
        out
    }

    pub fn usage(&self) -> Usage {
        usage_of(&self.path)
    }
}

/// `qemu-img create|resize -q -f FORMAT PATH SIZE`.
async fn qemu_img(action: &str, format: &str, path: &Path, size: u64) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    run(cmd.args([action, "-q", "-f", format]).arg(path).arg(size.to_string()), action, path).await
}

/// Runs a `qemu-img` command about `path`; its stderr is the error.
async fn run(cmd: &mut Command, action: &str, path: &Path) -> Result<()> {
    let out = cmd.output().await.map_err(|source| StorageError::Io { path: path.into(), source })?;
    if !out.status.success() {
        let message = format!("qemu-img {action}: {}", String::from_utf8_lossy(&out.stderr).trim());
        return Err(StorageError::Create { path: path.into(), message });
    }
    Ok(())
}

/// `qemu-img info -U --output=json` (readable while a running QEMU holds the image).
async fn image_info(path: &Path) -> Result<serde_json::Value> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|source| StorageError::Io { path: path.into(), source })?;
    serde_json::from_slice(&out.stdout).map_err(|e| StorageError::Create {
        path: path.into(),
        message: format!("qemu-img info: {e}: {}", String::from_utf8_lossy(&out.stderr).trim()),
    })
}

/// The internal snapshots of a qcow2 image, oldest first.
pub async fn image_snapshots(path: &Path) -> Result<Vec<String>> {
    let info = image_info(path).await?;
    let list = info["snapshots"].as_array().cloned().unwrap_or_default();
    Ok(list.iter().filter_map(|s| s["name"].as_str().map(str::to_string)).collect())
}

/// Creates (`-c`), deletes (`-d`) or reverts to (`-a`) an internal snapshot of an image no
/// process holds.
pub async fn image_snapshot(path: &Path, op: &str, name: &str) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    run(cmd.args(["snapshot", "-q", op, name]).arg(path), "snapshot", path).await
}

/// Whether a QEMU process may hold the image (its write lock): `qemu-img info` without `-U`
/// cannot open it then. Anything that keeps qemu-img from opening it counts as in use.
pub async fn image_in_use(path: &Path) -> bool {
    match Command::new("qemu-img").args(["info", "--output", "json"]).arg(path).output().await {
        Ok(out) => !out.status.success(),
        Err(_) => true,
    }
}

/// The guest's images in `pool` some process holds (see [`image_in_use`]); container
/// subvolumes (directories) are no images.
pub async fn guest_images_in_use(pool: &DirPool, vmid: u32) -> Vec<PathBuf> {
    let mut held = Vec::new();
    let dir = pool.path.join("images").join(vmid.to_string());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_file() && image_in_use(&entry.path()).await {
            held.push(entry.path());
        }
    }
    held
}

/// Filesystem usage from `df` (std has no statvfs, and kpve forbids `unsafe`).
pub fn usage_of(path: &Path) -> Usage {
    let out = std::process::Command::new("df").args(["-B1", "--output=size,used,avail"]).arg(path).output();
    let Ok(out) = out else { return Usage::default() };
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> =
        text.lines().nth(1).unwrap_or("").split_whitespace().filter_map(|n| n.parse().ok()).collect();
    match nums.as_slice() {
        [total, used, available] => Usage { total: *total, used: *used, available: *available },
        _ => Usage::default(),
    }
}

/// `32G`, `512M`, `1T`, `32Gi`, plain bytes → bytes.
pub fn parse_size(size: &str) -> Option<u64> {
    let s = size.trim();
    let s = s.strip_suffix('i').unwrap_or(s);
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let value: f64 = num.parse().ok()?;
    (value >= 0.0).then_some((value * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_paths_follow_proxmox() {
        let pool = DirPool::new("local", "/var/lib/kpve/storage/local");
        assert_eq!(DirPool::volume_name(100, 0, "qcow2"), "100/vm-100-disk-0.qcow2");
        assert_eq!(
            pool.path_of("local:100/vm-100-disk-0.qcow2").unwrap(),
            Path::new("/var/lib/kpve/storage/local/images/100/vm-100-disk-0.qcow2")
        );
        assert_eq!(
            pool.path_of("local:iso/boot.iso").unwrap(),
            Path::new("/var/lib/kpve/storage/local/template/iso/boot.iso")
        );
        assert!(pool.path_of("other:100/x.raw").is_err());
        assert!(pool.path_of("local:../etc/passwd").is_err());
        assert!(pool.path_of("local:100/subvol-100-disk-0.subvol/hostroot").is_err(), "one level only");
        assert!(pool.path_of("local:vztmpl/../x").is_err());
        assert!(pool.path_of("local:abc/x.raw").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Some(4 << 30));
        assert_eq!(parse_size("4Gi"), Some(4 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("x"), None);
    }

    #[tokio::test]
    async fn allocate_and_free_with_qemu_img() {
        if std::process::Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("skipping: qemu-img not installed");
            assert!(std::env::var("KPVE_REQUIRE_HOST").is_err(), "qemu-img required");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pool = DirPool::new("local", dir.path());
        pool.activate().unwrap();
        let volume = format!("local:{}", DirPool::volume_name(100, 0, "qcow2"));
        assert!(pool.allocate(&volume, "qcow2", 1 << 30).await.unwrap());
        assert!(!pool.allocate(&volume, "qcow2", 1 << 30).await.unwrap(), "idempotent");
        let info = std::process::Command::new("qemu-img")
            .arg("info")
            .arg(pool.path_of(&volume).unwrap())
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&info.stdout).contains("virtual size: 1 GiB"));
        assert_eq!(pool.content(), vec![volume.clone()]);
        // Growing a stopped guest's image: qemu-img resize, read back as the virtual size.
        assert_eq!(pool.virtual_size(&volume).await.unwrap(), 1 << 30);
        pool.grow(&volume, "qcow2", 3 << 29).await.unwrap();
        assert_eq!(pool.virtual_size(&volume).await.unwrap(), 3 << 29);
        pool.free_guest(100).unwrap();
        assert!(!pool.path_of(&volume).unwrap().exists());
    }
}
