//! One backing file, one pool: a pool claims each of its devices for as long as it is open, and
//! `create` looks at what a device holds before overwriting it.
//!
//! - A claim is an exclusive, non-blocking `flock` on a descriptor of its own (the I/O
//!   descriptors are O_DIRECT where the file system allows it, and cloned per queue), plus
//!   `O_EXCL` for a block device, which Linux grants to one opener at a time (and refuses while
//!   the device is mounted or claimed by another program). `flock` locks conflict between
//!   descriptors opened separately, so two pools in one process are kept apart too.
//! - Devices are told apart by identity, not by path: (st_dev, st_ino) for a file, the device
//!   number for a block device, so that a symlink or a hard link to a listed device is caught.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::sync::{block_device_size, data_extents};
use crate::error::{Error, Result};
use crate::format::{Superblock, SUPERBLOCK_MAGIC, SUPERBLOCK_OFFSETS};

/// Bytes read from the start of a device to tell whether it holds anything.
const HEAD_BYTES: u64 = 1 << 20;
/// Bytes read at each further sample point.
const SAMPLE_BYTES: u64 = 64 << 10;
/// Sample points past the head, spread evenly; for a file, also up to this many data extents.
const SAMPLES: usize = 64;

/// What makes two paths one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    File { dev: u64, ino: u64 },
    Block { rdev: u64 },
}

fn identity(m: &Metadata) -> Identity {
    if m.file_type().is_block_device() {
        Identity::Block { rdev: m.rdev() }
    } else {
        Identity::File {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// `8-4-4-4-12` hex, as pool.json records a pool's UUID and errors name it.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The devices of one pool, locked against every other pool and process while this lives.
pub struct DeviceClaim {
    /// Lock descriptors (read-only; never used for the pool's I/O).
    files: Vec<File>,
    paths: Vec<PathBuf>,
    block_device: Vec<bool>,
}

impl std::fmt::Debug for DeviceClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClaim")
            .field("paths", &self.paths)
            .finish()
    }
}

impl DeviceClaim {
    /// Claim `paths` for one pool. With `create`, a missing path is created as an empty file.
    ///
    /// Fails with [`Error::DuplicateDevice`] when two paths are one device, and with
    /// [`Error::DeviceInUse`] when another pool or process holds one.
    pub fn acquire(paths: &[PathBuf], create: bool) -> Result<DeviceClaim> {
        // Identities first: a device listed twice is reported as such, not as locked by itself
        // (a block device's second O_EXCL open would fail with EBUSY).
        let mut seen: Vec<(Identity, &Path)> = Vec::new();
        for p in paths {
            let m = match std::fs::metadata(p) {
                Ok(m) => m,
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(Error::File {
                        path: p.clone(),
                        source,
                    })
                }
            };
            note_identity(&mut seen, identity(&m), p)?;
        }
        let mut claim = DeviceClaim {
            files: Vec::with_capacity(paths.len()),
            paths: paths.to_vec(),
            block_device: Vec::with_capacity(paths.len()),
        };
        // Again from the opened descriptors: two spellings of one missing file are one file once
        // created, and a path may have changed since the look above.
        seen.clear();
        for p in paths {
            let (f, is_blk) = open_for_claim(p, create)?;
            let m = f.metadata().map_err(|source| Error::File {
                path: p.clone(),
                source,
            })?;
            note_identity(&mut seen, identity(&m), p)?;
            lock(&f, p)?;
            claim.files.push(f);
            claim.block_device.push(is_blk);
        }
        Ok(claim)
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Refuse a device that holds an ingot superblock (in either slot) or any non-zero byte in
    /// its first MiB or at the sample points past it: [`Error::DeviceHoldsData`]. An empty or
    /// all-zero (e.g. sparse) device passes.
    pub fn refuse_used(&self) -> Result<()> {
        for (d, path) in self.paths.iter().enumerate() {
            let held = self.holds(d).map_err(|source| Error::File {
                path: path.clone(),
                source,
            })?;
            if let Some(what) = held {
                return Err(Error::DeviceHoldsData {
                    path: path.clone(),
                    what,
                });
            }
        }
        Ok(())
    }

    /// What device `d` holds, if anything.
    fn holds(&self, d: usize) -> io::Result<Option<String>> {
        let f = &self.files[d];
        let size = if self.block_device[d] {
            block_device_size(f)?
        } else {
            f.metadata()?.len()
        };
        if size == 0 {
            return Ok(None);
        }
        let head = read_upto(f, 0, HEAD_BYTES.min(size))?;
        for off in SUPERBLOCK_OFFSETS {
            let Some(sb) = head.get(off as usize..) else {
                continue;
            };
            if sb.starts_with(&SUPERBLOCK_MAGIC) {
                return Ok(Some(describe_superblock(sb)));
            }
        }
        if let Some(at) = first_nonzero(&head) {
            return Ok(Some(format!("data (a non-zero byte at offset {at})")));
        }
        // Points spread evenly, and the last MiB (where a GPT keeps its backup header); for a
        // file also the start of each data extent (data past holes).
        let mut points: Vec<u64> = (1..SAMPLES as u64)
            .map(|i| size / SAMPLES as u64 * i)
            .collect();
        points.push(size.saturating_sub(HEAD_BYTES));
        if !self.block_device[d] {
            points.extend(
                data_extents(f, size)?
                    .into_iter()
                    .map(|(start, _)| start)
                    .filter(|&s| s >= HEAD_BYTES)
                    .take(SAMPLES),
            );
        }
        for p in points.into_iter().filter(|&p| p >= HEAD_BYTES && p < size) {
            let len = if p + HEAD_BYTES == size {
                HEAD_BYTES
            } else {
                SAMPLE_BYTES
            };
            let buf = read_upto(f, p, len.min(size - p))?;
            if let Some(at) = first_nonzero(&buf) {
                return Ok(Some(format!(
                    "data (a non-zero byte at offset {})",
                    p + at as u64
                )));
            }
        }
        Ok(None)
    }

    /// Check, before the pool reads or writes anything else, that every device's superblock
    /// belongs to this pool: the UUID pool.json records (`expected`; for pools made before it
    /// was recorded, the first device's). A device without a readable superblock is left to the
    /// superblock checks that follow, which say what is wrong with it.
    pub fn check_members(&self, expected: Option<&str>) -> Result<()> {
        let mut expected = expected.map(|s| s.trim().to_ascii_lowercase());
        for (d, path) in self.paths.iter().enumerate() {
            let Some(sb) = newest_superblock(&self.files[d]) else {
                continue;
            };
            let found = uuid_string(&sb.pool_uuid);
            match &expected {
                Some(e) if *e != found => {
                    return Err(Error::ForeignDevice {
                        path: path.clone(),
                        found,
                        expected: e.clone(),
                    })
                }
                Some(_) => {}
                None => expected = Some(found),
            }
        }
        Ok(())
    }
}

fn note_identity<'a>(
    seen: &mut Vec<(Identity, &'a Path)>,
    id: Identity,
    path: &'a Path,
) -> Result<()> {
    if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
        return Err(Error::DuplicateDevice {
            path: path.to_path_buf(),
            first: first.to_path_buf(),
        });
    }
    seen.push((id, path));
    Ok(())
}

/// A descriptor to lock `p` with; whether it is a block device.
fn open_for_claim(p: &Path, create: bool) -> Result<(File, bool)> {
    let file_err = |source| Error::File {
        path: p.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(p) {
        Ok(m) => Some(m),
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(file_err(e)),
    };
    let is_blk = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    if let Some(m) = &meta {
        if !is_blk && !m.is_file() {
            return Err(file_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            )));
        }
    }
    let mut o = OpenOptions::new();
    o.read(true);
    if is_blk {
        // Linux: an exclusive open of a block device fails with EBUSY while another holds it
        // (an O_EXCL opener, a mount, a device-mapper or md user).
        o.custom_flags(libc::O_EXCL);
    } else if meta.is_none() {
        // Files of a pool are its owner's only.
        o.write(true).create(true).truncate(false).mode(0o600);
    }
    match o.open(p) {
        Ok(f) => Ok((f, is_blk)),
        Err(e) if is_blk && e.raw_os_error() == Some(libc::EBUSY) => Err(Error::DeviceInUse {
            path: p.to_path_buf(),
        }),
        Err(e) => Err(file_err(e)),
    }
}

fn lock(f: &File, p: &Path) -> Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::DeviceInUse {
                    path: p.to_path_buf(),
                })
            }
            _ => {
                return Err(Error::File {
                    path: p.to_path_buf(),
                    source: e,
                })
            }
        }
    }
}

/// Up to `len` bytes at `off` (fewer at the end of the file).
fn read_upto(f: &File, off: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn first_nonzero(b: &[u8]) -> Option<usize> {
    b.iter().position(|&x| x != 0)
}

/// The newest decodable superblock copy of a device, if any.
fn newest_superblock(f: &File) -> Option<Superblock> {
    SUPERBLOCK_OFFSETS
        .iter()
        .filter_map(|&off| {
            let buf = read_upto(f, off, 4096).ok()?;
            Superblock::decode(&buf).ok().flatten()
        })
        .max_by_key(|sb| sb.generation)
}

fn describe_superblock(sb: &[u8]) -> String {
    match Superblock::decode(sb) {
        Ok(Some(s)) => format!(
            "ingot pool {} (its device {} of {})",
            uuid_string(&s.pool_uuid),
            u32::from(s.device_index) + 1,
            s.device_count
        ),
        Ok(None) => "an ingot superblock".to_string(),
        Err(_) => "an ingot superblock (damaged, or of another format version)".to_string(),
    }
}
