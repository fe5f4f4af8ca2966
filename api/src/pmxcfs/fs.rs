//! The FUSE side of the `/etc/pve` view (fuser): inodes for paths, open files buffered in
//! memory and applied when closed (or fsynced), scratch files for editors' and `sed -i`'s
//! temporaries, renamed onto a config to apply it. An invalid config fails the close (or
//! the rename) with EINVAL and changes nothing; writes while the view is read-only fail with
//! EROFS.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};

use super::{Entry, MAX_FILE, View, WriteError};

/// Attributes are never cached: the content follows the resources.
const TTL: Duration = Duration::ZERO;
const O_ACCMODE: i32 = 3;
const O_TRUNC: i32 = 0o1000;

struct Open {
    path: String,
    data: Vec<u8>,
    dirty: bool,
    /// A scratch file (not a view path): kept, never applied.
    scratch: bool,
    /// Opened for writing: only such a handle takes a truncation or is ever applied.
    writing: bool,
}

/// The mounted view.
pub struct PveFs {
    view: Arc<View>,
    runtime: tokio::runtime::Handle,
    mounted: SystemTime,
    inodes: Mutex<Inodes>,
    open: Mutex<HashMap<u64, Open>>,
    next_fh: AtomicU64,
    /// Files that are not part of the view (an editor's swap file, `sed -i`'s temporary):
    /// path → content, in memory.
    scratch: Mutex<HashMap<String, Vec<u8>>>,
}

#[derive(Default)]
struct Inodes {
    paths: Vec<String>,
    by_path: HashMap<String, u64>,
}

impl Inodes {
    fn ino(&mut self, path: &str) -> u64 {
        if let Some(ino) = self.by_path.get(path) {
            return *ino;
        }
        self.paths.push(path.to_string());
        let ino = self.paths.len() as u64;
        self.by_path.insert(path.to_string(), ino);
        ino
    }
}

fn errno(e: &WriteError) -> Errno {
    match e {
        WriteError::Invalid(_) => Errno::EINVAL,
        WriteError::ReadOnly => Errno::EROFS,
        WriteError::TooBig => Errno::EFBIG,
        WriteError::Denied(_) => Errno::EACCES,
        WriteError::NotWritable(_) => Errno::EACCES,
        WriteError::Failed(_) => Errno::EIO,
        WriteError::InProgress(_) => Errno::EINPROGRESS,
    }
}

fn join(dir: &str, name: &OsStr) -> Option<String> {
    let name = name.to_str()?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    Some(if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") })
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

impl PveFs {
    pub fn new(view: Arc<View>, runtime: tokio::runtime::Handle) -> PveFs {
        let mut inodes = Inodes::default();
        inodes.ino(""); // the root is inode 1
        PveFs {
            view,
            runtime,
            mounted: SystemTime::now(),
            inodes: Mutex::new(inodes),
            open: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            scratch: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, ino: INodeNo) -> Option<String> {
        let inodes = self.inodes.lock().unwrap_or_else(|e| e.into_inner());
        inodes.paths.get((u64::from(ino) as usize).checked_sub(1)?).cloned()
    }

    fn ino(&self, path: &str) -> INodeNo {
        INodeNo(self.inodes.lock().unwrap_or_else(|e| e.into_inner()).ino(path))
    }

    fn scratch_content(&self, path: &str) -> Option<Vec<u8>> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner()).get(path).cloned()
    }

    /// The attributes of `path`, if it exists (a view entry or a scratch file).
    fn attr(&self, path: &str) -> Option<FileAttr> {
        let (kind, size, perm) = match self.view.entry(path) {
            Some(Entry::Dir) => (FileType::Directory, 0, 0o755),
            Some(Entry::Link(target)) => (FileType::Symlink, target.len() as u64, 0o777),
            Some(Entry::File(text)) => {
                // An open, written file shows its new size until it is applied.
                let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                let pending = open.values().find(|o| o.path == path && o.dirty).map(|o| o.data.len());
                (FileType::RegularFile, pending.unwrap_or(text.len()) as u64, 0o640)
            }
            None => {
                let pending = {
                    let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                    open.values().find(|o| o.path == path).map(|o| o.data.len())
                };
                let size = match (self.scratch_content(path), pending) {
                    (_, Some(n)) => n,
                    (Some(data), None) => data.len(),
                    (None, None) => return None,
                };
                (FileType::RegularFile, size as u64, 0o640)
            }
        };
        Some(FileAttr {
            ino: self.ino(path),
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    fn new_handle(&self, open: Open) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, open);
        FileHandle(fh)
    }

    /// Applies an open file's content if it was written: a scratch file keeps it, a view file
    /// goes to the resources. `closing` is the last close (release); before it, an empty
    /// buffer waits: a shell opens with O_TRUNC, dup2s and closes the first descriptor (a
    /// flush) before it writes anything.
    fn commit(&self, fh: FileHandle, closing: bool) -> Result<(), Errno> {
        let (path, data, scratch) = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let Some(o) = open.get_mut(&fh.0) else { return Ok(()) };
            if !o.dirty || !o.writing || (o.data.is_empty() && !closing) {
                return Ok(());
            }
            o.dirty = false;
            (o.path.clone(), o.data.clone(), o.scratch)
        };
        if scratch {
            self.scratch.lock().unwrap_or_else(|e| e.into_inner()).insert(path, data);
            return Ok(());
        }
        let view = self.view.clone();
        self.runtime.block_on(async move { view.apply(&path, &data).await }).map_err(|e| errno(&e))
    }
}

impl Filesystem for PveFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(path) = self.path(parent).and_then(|dir| join(&dir, name)) else {
            return reply.error(Errno::ENOENT);
        };
        match self.attr(&path) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|p| self.attr(&p)) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.path(ino).and_then(|p| self.view.entry(&p)) {
            Some(Entry::Link(target)) => {
                // Relative to the link's directory (the root).
                reply.data(target.as_bytes())
            }
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(path) = self.path(ino) else { return reply.error(Errno::ENOENT) };
        let writing = flags.0 & O_ACCMODE != 0;
        let truncate = flags.0 & O_TRUNC != 0;
        let (content, scratch) = match self.view.entry(&path) {
            Some(Entry::File(text)) => (text.into_bytes(), false),
            Some(_) => return reply.error(Errno::EISDIR),
            None => match self.scratch_content(&path) {
                Some(data) => (data, true),
                None => return reply.error(Errno::ENOENT),
            },
        };
        if writing && !scratch {
            if !self.view.is_writable_path(&path) {
                return reply.error(Errno::EACCES);
            }
            if !self.view.writable() {
                return reply.error(Errno::EROFS);
            }
        }
        let data = if truncate && writing { Vec::new() } else { content };
        let fh = self.new_handle(Open { path, data, dirty: truncate && writing, scratch, writing });
        reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(path) = self.path(parent).and_then(|dir| join(&dir, name)) else {
            return reply.error(Errno::EINVAL);
        };
        let exists = self.view.entry(&path).is_some();
        let scratch = !self.view.is_writable_path(&path);
        if !exists && !scratch && !self.view.writable() {
            return reply.error(Errno::EROFS);
        }
        if scratch {
            if matches!(self.view.entry(parent_of(&path)), Some(Entry::Dir)) || parent_of(&path).is_empty() {
                self.scratch.lock().unwrap_or_else(|e| e.into_inner()).entry(path.clone()).or_default();
            } else {
                return reply.error(Errno::EACCES);
            }
        }
        // A new guest config is applied when closed; an empty one is refused then.
        let fh = self.new_handle(Open {
            path: path.clone(),
            data: Vec::new(),
            dirty: !scratch,
            scratch,
            writing: true,
        });
        match self.attr(&path) {
            Some(attr) => reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO),
            None => {
                // A guest config that does not exist yet: show it as empty while it is written.
                let mut attr = self.attr("").expect("the root exists");
                attr.ino = self.ino(&path);
                attr.kind = FileType::RegularFile;
                attr.perm = 0o640;
                attr.nlink = 1;
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO)
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let Some(o) = open.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let start = (offset as usize).min(o.data.len());
        let end = (start + size as usize).min(o.data.len());
        reply.data(&o.data[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let Some(o) = open.get_mut(&fh.0) else { return reply.error(Errno::EBADF) };
        let end = offset as usize + data.len();
        if end > MAX_FILE {
            // Nothing of an oversized file is applied, not even the part that fit.
            o.data.clear();
            o.dirty = false;
            o.writing = false;
            return reply.error(Errno::EFBIG);
        }
        if o.data.len() < end {
            o.data.resize(end, 0);
        }
        o.data[offset as usize..end].copy_from_slice(data);
        o.dirty = true;
        reply.written(data.len() as u32);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(path) = self.path(ino) else { return reply.error(Errno::ENOENT) };
        if let Some(size) = size {
            if size as usize > MAX_FILE {
                return reply.error(Errno::EFBIG);
            }
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            // The kernel truncates for open(O_TRUNC) with a separate setattr, not always naming
            // the handle: any open handle of the file takes it (applied when closed).
            // A reader of the same file (its release comes later, asynchronously) must not
            // take it: only handles opened for writing, the newest first.
            let by_fh = fh.is_some_and(|fh| open.get(&fh.0).is_some_and(|o| o.path == path && o.writing));
            let handle = if by_fh {
                fh.and_then(|fh| open.get_mut(&fh.0))
            } else {
                let newest =
                    open.iter().filter(|(_, o)| o.path == path && o.writing).map(|(fh, _)| *fh).max();
                newest.and_then(|fh| open.get_mut(&fh))
            };
            match handle {
                Some(o) => {
                    o.data.resize(size as usize, 0);
                    o.dirty = true;
                }
                None => {
                    drop(open);
                    // truncate(2) without an open file: a scratch file shrinks; a view file
                    // is applied shortened.
                    let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(data) = scratch.get_mut(&path) {
                        data.resize(size as usize, 0);
                    } else {
                        drop(scratch);
                        let Some(Entry::File(text)) = self.view.entry(&path) else {
                            return reply.error(Errno::EACCES);
                        };
                        let mut data = text.into_bytes();
                        data.resize(size as usize, 0);
                        let view = self.view.clone();
                        let p = path.clone();
                        if let Err(e) = self.runtime.block_on(async move { view.apply(&p, &data).await }) {
                            return reply.error(errno(&e));
                        }
                    }
                }
            }
        }
        match self.attr(&path) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.commit(fh, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.commit(fh, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.commit(fh, true);
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh.0);
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(path) = self.path(ino) else { return reply.error(Errno::ENOENT) };
        if self.view.entry(&path) != Some(Entry::Dir) {
            return reply.error(Errno::ENOTDIR);
        }
        let mut names = self.view.list(&path);
        for scratch in self.scratch.lock().unwrap_or_else(|e| e.into_inner()).keys() {
            if parent_of(scratch) == path {
                names.push(scratch.rsplit('/').next().unwrap_or(scratch).to_string());
            }
        }
        let mut entries = vec![(ino, FileType::Directory, ".".to_string())];
        entries.push((self.ino(parent_of(&path)), FileType::Directory, "..".to_string()));
        for name in names {
            let child = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
            // The kind only: rendering every child made a listing quadratic in the guests.
            let kind = match self.view.kind(&child) {
                Entry::Dir => FileType::Directory,
                Entry::Link(_) => FileType::Symlink,
                Entry::File(_) => FileType::RegularFile,
            };
            entries.push((self.ino(&child), kind, name));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(path) = self.path(parent).and_then(|dir| join(&dir, name)) else {
            return reply.error(Errno::ENOENT);
        };
        if self.scratch.lock().unwrap_or_else(|e| e.into_inner()).remove(&path).is_some() {
            return reply.ok();
        }
        if self.view.entry(&path).is_none() {
            return reply.error(Errno::ENOENT);
        }
        let view = self.view.clone();
        match self.runtime.block_on(async move { view.remove(&path).await }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (
            self.path(parent).and_then(|d| join(&d, name)),
            self.path(newparent).and_then(|d| join(&d, newname)),
        ) else {
            return reply.error(Errno::EINVAL);
        };
        // A scratch file moves: onto a config it is applied (`sed -i`, an editor's save). A
        // guest config moved to another node's directory migrates the guest; other view files
        // stay where the resources put them.
        let Some(data) = self.scratch_content(&from) else {
            return match self.view.entry(&from) {
                None => reply.error(Errno::ENOENT),
                Some(_) if super::guest_path(&from).is_some() && super::guest_path(&to).is_some() => {
                    let view = self.view.clone();
                    match self.runtime.block_on(async move { view.relocate(&from, &to).await }) {
                        Ok(()) => reply.ok(),
                        // A refused move is not permitted (EINVAL from rename reads as "a
                        // subdirectory of itself" to mv); the Event says why.
                        Err(WriteError::Invalid(_)) => reply.error(Errno::EPERM),
                        Err(e) => reply.error(errno(&e)),
                    }
                }
                // An editor's backup (vim renames the file to `name~`, then writes `name`
                // anew): the backup is a scratch copy, the config stays where it is.
                Some(Entry::File(text)) if to.ends_with('~') && parent_of(&to) == parent_of(&from) => {
                    self.scratch.lock().unwrap_or_else(|e| e.into_inner()).insert(to, text.into_bytes());
                    reply.ok()
                }
                Some(_) => reply.error(Errno::EPERM),
            };
        };
        if self.view.is_writable_path(&to) {
            let view = self.view.clone();
            let target = to.clone();
            let result = self.runtime.block_on(async move { view.apply(&target, &data).await });
            self.scratch.lock().unwrap_or_else(|e| e.into_inner()).remove(&from);
            return match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            };
        }
        if self.view.entry(&to).is_some() {
            return reply.error(Errno::EACCES);
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        scratch.remove(&from);
        scratch.insert(to, data);
        reply.ok();
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    // No extended attributes (pmxcfs has none either); tools that copy them are told so.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 { reply.size(0) } else { reply.data(&[]) }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}

/// Mounts the view at `dir` (created if missing) on fuser's own threads; unmounted when the
/// returned session is dropped or `umount_and_join`ed.
pub fn mount(
    view: Arc<View>,
    dir: &Path,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<fuser::BackgroundSession> {
    std::fs::create_dir_all(dir)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("kpve".into()),
        fuser::MountOption::Subtype("pmxcfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    // A move between node directories waits (≤ 30 s) for the migration, the kernel holding both
    // directories: requests elsewhere in the tree go on meanwhile.
    config.n_threads = Some(4);
    fuser::spawn_mount(PveFs::new(view, runtime), dir, &config)
}
