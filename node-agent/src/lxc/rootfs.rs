//! Container volumes on a dir pool: a rootfs populated from a `vztmpl` tarball, empty mount
//! point directories, ownership shifted into the container's user namespace, and the
//! guest-side files Proxmox's setup writes (hostname, hosts, resolv.conf, root's password
//! and SSH keys).
//!
//! Everything here runs as host root on a tree a container may later control, so nothing
//! follows a symlink: ownership changes use `lchown`, and guest files are written to a new
//! temporary file and renamed into a directory reached without crossing a symlink.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown};
use std::path::{Component, Path, PathBuf};

use kpve_crds::LinuxContainerSpec;

use super::config::IdMap;

/// Extracts `template` into a new directory `target`, shifted by `map` for an unprivileged
/// container. The tree is built beside `target` and renamed into place, so `target` either
/// does not exist or is complete.
pub async fn populate_from_template(
    template: &Path,
    target: &Path,
    map: Option<IdMap>,
) -> Result<(), String> {
    let partial = partial_path(target);
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    // Like pct: device nodes are not extracted (lxc.autodev provides /dev), owners are
    // numeric, the compression is recognised from the file.
    let out = tokio::process::Command::new("tar")
        .args(["--extract", "--preserve-permissions", "--numeric-owner", "--same-owner"])
        .args(["--exclude=./dev/*", "--exclude=dev/*", "--file"])
        .arg(template)
        .arg("--directory")
        .arg(&partial)
        .output()
        .await
        .map_err(|e| format!("tar: {e}"))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&partial);
        return Err(format!(
            "extracting {} failed: {}",
            template.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let partial_clone = partial.clone();
    let shifted = tokio::task::spawn_blocking(move || match map {
        Some(map) => shift_ids(&partial_clone, map),
        None => Ok(()),
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Err(e) = shifted.and_then(|()| fs::rename(&partial, target)) {
        let _ = fs::remove_dir_all(&partial);
        return Err(format!("preparing {}: {e}", target.display()));
    }
    Ok(())
}

fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    target.with_file_name(name)
}

/// Creates an empty volume directory owned by the container's root.
pub fn create_empty(target: &Path, map: Option<IdMap>) -> io::Result<()> {
    if target.exists() {
        return Ok(());
    }
    let partial = partial_path(target);
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))?;
    if let Some(map) = map {
        lchown(&partial, Some(map.host_uid), Some(map.host_gid))?;
    }
    fs::rename(&partial, target)
}

/// Adds the map's base to every owner below `root` that lies inside the container's id
/// range (ids already shifted are left alone), keeping setuid/setgid bits, which a chown
/// clears.
pub fn shift_ids(root: &Path, map: IdMap) -> io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let shift = |id: u32, base: u32| if id < map.count { Some(base + id) } else { None };
        let (uid, gid) = (shift(meta.uid(), map.host_uid), shift(meta.gid(), map.host_gid));
        if uid.is_some() || gid.is_some() {
            lchown(&path, uid, gid)?;
            if !meta.file_type().is_symlink() && meta.mode() & 0o6000 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            }
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Writes the guest-side configuration Proxmox keeps in a container's rootfs. Only for
/// distributions kpve knows how to configure (any `ostype` but `unmanaged`) and only
/// into directories the template has.
pub fn setup_guest(
    rootfs: &Path,
    spec: &LinuxContainerSpec,
    hostname: &str,
    map: Option<IdMap>,
) -> io::Result<()> {
    if spec.ostype == Some(kpve_crds::CtOsType::Unmanaged) {
        return Ok(());
    }
    let owner = map.map(|m| (m.host_uid, m.host_gid));
    let etc = rootfs.join("etc");
    if !safe_dir(rootfs, Path::new("etc")) {
        return Ok(());
    }
    write_guest_file(&etc, "hostname", format!("{hostname}\n").as_bytes(), 0o644, owner)?;
    let hosts = read_regular(&etc.join("hosts")).unwrap_or_default();
    let block = format!("# --- BEGIN PVE ---\n127.0.1.1 {hostname}\n# --- END PVE ---\n");
    write_guest_file(&etc, "hosts", with_managed_block(&hosts, &block).as_bytes(), 0o644, owner)?;
    if spec.nameserver.is_some() || spec.searchdomain.is_some() {
        let mut resolv = String::new();
        if let Some(domain) = &spec.searchdomain {
            resolv.push_str(&format!("search {domain}\n"));
        }
        for server in spec.nameserver.iter().flat_map(|s| s.split([' ', ',', ';'])).filter(|s| !s.is_empty())
        {
            resolv.push_str(&format!("nameserver {server}\n"));
        }
        write_guest_file(&etc, "resolv.conf", resolv.as_bytes(), 0o644, owner)?;
    }
    if let Some(hash) = &spec.password_hash
        && let Some(shadow) = read_regular(&etc.join("shadow"))
    {
        write_guest_file(&etc, "shadow", with_root_password(&shadow, hash).as_bytes(), 0o640, owner)?;
    }
    if !spec.ssh_public_keys.is_empty() && safe_dir(rootfs, Path::new("root")) {
        let ssh = rootfs.join("root/.ssh");
        if !ssh.exists() {
            fs::create_dir(&ssh)?;
            fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
            if let Some((uid, gid)) = owner {
                lchown(&ssh, Some(uid), Some(gid))?;
            }
        }
        if safe_dir(rootfs, Path::new("root/.ssh")) {
            let keys = spec.ssh_public_keys.iter().map(|k| format!("{}\n", k.trim())).collect::<String>();
            write_guest_file(&ssh, "authorized_keys", keys.as_bytes(), 0o600, owner)?;
        }
    }
    Ok(())
}

/// A guest file's content if it is a regular file (not a symlink a container made to a host
/// file, a FIFO or a device) of at most 1 MiB.
fn read_regular(path: &Path) -> Option<String> {
    let meta = fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() > 1 << 20 {
        return None;
    }
    fs::read_to_string(path).ok()
}

/// Whether `rel` below `root` is a directory reached without any symlink.
fn safe_dir(root: &Path, rel: &Path) -> bool {
    let mut path = root.to_path_buf();
    for component in rel.components() {
        let Component::Normal(part) = component else { return false };
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Replaces `dir/name` by a new file (never writing through a symlink there).
fn write_guest_file(
    dir: &Path,
    name: &str,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.kpve-new"));
    let _ = fs::remove_file(&tmp);
    fs::OpenOptions::new().write(true).create_new(true).open(&tmp).and_then(|mut f| {
        use std::io::Write as _;
        f.write_all(content)
    })?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        lchown(&tmp, Some(uid), Some(gid))?;
    }
    fs::rename(&tmp, dir.join(name))
}

/// `text` with the `# --- BEGIN PVE ---` … `# --- END PVE ---` block replaced by `block`
/// (appended when absent), the way pct manages hosts entries.
fn with_managed_block(text: &str, block: &str) -> String {
    let begin = "# --- BEGIN PVE ---";
    let end = "# --- END PVE ---";
    if let (Some(b), Some(e)) = (text.find(begin), text.find(end))
        && b < e
    {
        let after = text[e + end.len()..].strip_prefix('\n').unwrap_or(&text[e + end.len()..]);
        return format!("{}{block}{after}", &text[..b]);
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(block);
    out
}

/// `/etc/shadow` with root's password field set to `hash`.
fn with_root_password(shadow: &str, hash: &str) -> String {
    let mut out = String::new();
    for line in shadow.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&"root") && fields.len() > 1 {
            fields[1] = hash;
        }
        out.push_str(&fields.join(":"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_hosts_block_is_replaced_not_repeated() {
        let block = "# --- BEGIN PVE ---\n127.0.1.1 a\n# --- END PVE ---\n";
        let once = with_managed_block("127.0.0.1 localhost", block);
        assert_eq!(once, format!("127.0.0.1 localhost\n{block}"));
        let other = "# --- BEGIN PVE ---\n127.0.1.1 b\n# --- END PVE ---\n";
        let twice = with_managed_block(&once, other);
        assert_eq!(twice, format!("127.0.0.1 localhost\n{other}"));
    }

    #[test]
    fn root_password_field_only() {
        let shadow = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n";
        assert_eq!(
            with_root_password(shadow, "$6$salt$hash"),
            "root:$6$salt$hash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
        );
    }

    #[test]
    fn ids_shift_into_the_map_and_setuid_survives() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/su"), b"x").unwrap();
        fs::set_permissions(root.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        if fs::metadata("/proc/self").unwrap().uid() != 0 {
            return; // chown needs root
        }
        let before = fs::metadata("/etc/passwd").unwrap().uid();
        shift_ids(&root, IdMap::default()).unwrap();
        for p in ["", "bin", "bin/su"] {
            assert_eq!(fs::symlink_metadata(root.join(p)).unwrap().uid(), 100_000, "{p}");
        }
        assert_eq!(fs::symlink_metadata(root.join("link")).unwrap().uid(), 100_000);
        assert_eq!(fs::metadata("/etc/passwd").unwrap().uid(), before, "symlink target untouched");
        assert_eq!(fs::metadata(root.join("bin/su")).unwrap().mode() & 0o7777, 0o4755);
        // Idempotent: shifted ids stay.
        shift_ids(&root, IdMap::default()).unwrap();
        assert_eq!(fs::metadata(root.join("bin")).unwrap().uid(), 100_000);
    }

    #[test]
    fn guest_files_never_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        let spec: LinuxContainerSpec = serde_json::from_value(serde_json::json!({"rootfs": {}})).unwrap();
        setup_guest(&root, &spec, "web", None).unwrap();
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "nothing written through etc -> outside");

        fs::remove_file(root.join("etc")).unwrap();
        fs::create_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), root.join("etc/hostname")).unwrap();
        std::fs::write(outside.join("secret"), "host secret\n").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("etc/hosts")).unwrap();
        setup_guest(&root, &spec, "web", None).unwrap();
        assert!(!outside.join("victim").exists());
        assert!(
            !fs::read_to_string(root.join("etc/hosts")).unwrap().contains("host secret"),
            "no host file copied in"
        );
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "web\n");
        assert!(fs::read_to_string(root.join("etc/hosts")).unwrap().contains("127.0.1.1 web"));
    }
}
