//! Blocking pread/pwrite engine: the fallback when io_uring is unavailable, and the base the
//! other engines share for metadata I/O.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{Devices, IoDone, IoOp, IoQueue, OpKind};

/// The opened backing files or block devices of a pool.
pub struct FileSet {
    files: Vec<File>,
    sizes: Vec<u64>,
    paths: Vec<PathBuf>,
    block_device: Vec<bool>,
    /// Whether O_DIRECT was accepted (tmpfs on old kernels refuses it).
    pub direct: bool,
}

impl FileSet {
    /// Open existing devices read-write, with O_DIRECT where the file system allows it.
    pub fn open(paths: &[PathBuf]) -> io::Result<FileSet> {
        let mut set = FileSet {
            files: Vec::new(),
            sizes: Vec::new(),
            paths: paths.to_vec(),
            block_device: Vec::new(),
            direct: true,
        };
        for p in paths {
            let (f, direct) = open_one(p)?;
            set.direct &= direct;
            let meta = f.metadata()?;
            let is_blk = meta.file_type().is_block_device();
            let size = if is_blk {
                block_device_size(&f)?
            } else {
                meta.len()
            };
            set.files.push(f);
            set.sizes.push(size);
            set.block_device.push(is_blk);
        }
        Ok(set)
    }

    pub fn file(&self, dev: u16) -> &File {
        &self.files[dev as usize]
    }

    pub fn files(&self) -> &[File] {
        &self.files
    }

    pub fn path(&self, dev: u16) -> &Path {
        &self.paths[dev as usize]
    }
}

fn open_one(p: &Path) -> io::Result<(File, bool)> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(p);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = OpenOptions::new().read(true).write(true).open(p)?;
            Ok((f, false))
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn block_device_size(f: &File) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl Devices for FileSet {
    fn engine_name(&self) -> &'static str {
        "sync"
    }
    fn count(&self) -> usize {
        self.files.len()
    }
    fn size(&self, dev: u16) -> u64 {
        self.sizes[dev as usize]
    }
    fn read_at(&self, dev: u16, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file(dev).read_exact_at(buf, offset)
    }
    fn write_at(&self, dev: u16, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file(dev).write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        match &self.files[..] {
            [] => Ok(()),
            [one] => one.sync_data(),
            // The devices' caches flush at once, not one after another: a commit costs the
            // slowest device's flush, not their sum.
            files => std::thread::scope(|s| {
                let others: Vec<_> = files[1..]
                    .iter()
                    .map(|f| s.spawn(move || f.sync_data()))
                    .collect();
                let first = files[0].sync_data();
                others
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(io::Error::other("sync panicked")))
                    })
                    .fold(first, |acc, r| acc.and(r))
            }),
        }
    }
    fn discard(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        let f = self.file(dev);
        let rc = if self.block_device[dev as usize] {
            const BLKDISCARD: libc::c_ulong = 0x1277;
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 from the pointer.
            unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD, range.as_ptr()) }
        } else {
            // SAFETY: plain syscall on an owned fd.
            unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            }
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn data_ranges(&self, dev: u16) -> io::Result<Option<Vec<(u64, u64)>>> {
        if self.block_device[dev as usize] {
            return Ok(None);
        }
        data_extents(self.file(dev), self.size(dev)).map(Some)
    }
    fn host_space(&self, dev: u16) -> io::Result<Option<super::HostSpace>> {
        if self.block_device[dev as usize] {
            return Ok(None);
        }
        let fd = self.file(dev).as_raw_fd();
        // SAFETY: plain syscalls on an owned fd into zeroed structs of the right type.
        let (vfs, st) = unsafe {
            let mut vfs: libc::statvfs = std::mem::zeroed();
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstatvfs(fd, &mut vfs) != 0 || libc::fstat(fd, &mut st) != 0 {
                return Err(io::Error::last_os_error());
            }
            (vfs, st)
        };
        let allocated = (st.st_blocks as u64).saturating_mul(512);
        Ok(Some(super::HostSpace {
            free_bytes: vfs.f_bavail.saturating_mul(vfs.f_frsize),
            unallocated_bytes: (st.st_size as u64).saturating_sub(allocated),
        }))
    }
    fn preallocate(&self, dev: u16, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device[dev as usize] {
            return Ok(());
        }
        // SAFETY: plain syscall on an owned fd.
        let rc = unsafe {
            libc::fallocate(
                self.file(dev).as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn queue(&self, _depth: u32) -> io::Result<Box<dyn IoQueue>> {
        let files = self
            .files
            .iter()
            .map(|f| f.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Box::new(SyncQueue {
            files,
            queued: Vec::new(),
            done: VecDeque::new(),
        }))
    }
}

/// Executes queued ops one by one at submit time.
pub struct SyncQueue {
    files: Vec<File>,
    queued: Vec<IoOp>,
    done: VecDeque<IoDone>,
}

/// The byte ranges of the first `len` bytes of `f` that hold data, from `SEEK_DATA`/`SEEK_HOLE`
/// (sorted, disjoint, half-open).
pub fn data_extents(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: plain syscalls on an open fd.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `pos`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((data as u64, (hole as u64).min(len)));
        pos = hole as u64;
    }
    Ok(out)
}

/// Run one op synchronously against `f`.
pub fn run_op(f: &File, mut op: IoOp) -> IoDone {
    let result = match op.kind {
        OpKind::Read => f.read_exact_at(&mut op.buf[..op.len], op.offset),
        OpKind::Write => f.write_all_at(&op.buf[..op.len], op.offset),
        OpKind::Sync => f.sync_data(),
    };
    op.done(result)
}

impl IoQueue for SyncQueue {
    fn push(&mut self, op: IoOp) {
        self.queued.push(op);
    }
    fn submit(&mut self, _min_complete: usize) -> io::Result<()> {
        for op in self.queued.drain(..) {
            let f = &self.files[op.dev as usize];
            self.done.push_back(run_op(f, op));
        }
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<IoDone>) {
        out.extend(self.done.drain(..));
    }
    fn in_flight(&self) -> usize {
        self.queued.len() + self.done.len()
    }
}
