//! A binding to the librados C API (Ceph's RADOS client) for what a fenced pool needs: atomic
//! write operations (exclusive create, full write, xattrs, compare-xattr), reads, removal, the client's own address and OSD blocklisting (`docs/design/ceph-fencing.md`
//! says why these, measured on Ceph 16).
//!
//! `librados.so.2` is opened at run time (`dlopen`), so that ingot builds and runs without it
//! and only a pool on Ceph asks for it, with a clear error when it is missing. librados'
//! cluster and I/O context handles are thread-safe; every call here blocks until the cluster
//! answers or `rados_osd_op_timeout` passes.

mod api;
pub mod lease;

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

use api::{api, Api};
pub use lease::{Lease, LeaseError, LeaseOptions, Takeover};

/// `LIBRADOS_CMPXATTR_OP_EQ`.
const CMP_EQ: u8 = 1;
/// `LIBRADOS_CREATE_EXCLUSIVE`.
const CREATE_EXCLUSIVE: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("librados could not be loaded ({0}): install librados2")]
    Library(String),
    #[error("{op} {what}: {}", errno_text(*errno))]
    Rados {
        op: &'static str,
        what: String,
        /// The positive errno librados returned.
        errno: i32,
    },
    #[error("invalid argument: {0}")]
    Argument(&'static str),
}

impl Error {
    /// The object (or the condition an op asserted) already exists: a write-once object was
    /// written before.
    pub fn exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
    /// A compare (xattr) or version assertion failed: somebody else changed the object.
    pub fn lost_race(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ECANCELED) | Some(libc::ERANGE) | Some(libc::EOVERFLOW)
        )
    }
    pub fn not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }
    /// This client was blocklisted by the cluster (`ESHUTDOWN`, Ceph's `EBLOCKLISTED`): it has
    /// been fenced and must stop.
    pub fn blocklisted(&self) -> bool {
        self.errno() == Some(libc::ESHUTDOWN)
    }
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Rados { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn errno_text(e: i32) -> String {
    format!("{} (errno {e})", std::io::Error::from_raw_os_error(e))
}

pub type Result<T> = std::result::Result<T, Error>;

fn check(r: i32, op: &'static str, what: impl FnOnce() -> String) -> Result<i32> {
    if r < 0 {
        Err(Error::Rados {
            op,
            what: what(),
            errno: -r,
        })
    } else {
        Ok(r)
    }
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Argument("a name with a NUL byte"))
}

/// Where and as whom to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `ceph.conf` to read; `None`: librados' own search (`CEPH_CONF`, /etc/ceph/ceph.conf).
    pub conf: Option<std::path::PathBuf>,
    /// The client's id (`admin` for `client.admin`); `None`: librados' default.
    pub user: Option<String>,
    /// How long an operation may wait for the cluster before it fails with `ETIMEDOUT`.
    pub op_timeout: Option<Duration>,
}

struct Handle {
    api: &'static Api,
    cluster: *mut c_void,
}

// SAFETY: a connected `rados_t` may be used from any thread (librados locks inside).
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rados_create2` and every I/O context holds an `Arc` of
        // it, so none outlives it.
        unsafe { (self.api.shutdown)(self.cluster) }
    }
}

/// A connection to a Ceph cluster.
#[derive(Clone)]
pub struct Cluster {
    h: Arc<Handle>,
}

impl Cluster {
    pub fn connect(o: &ConnectOptions) -> Result<Cluster> {
        let api = api()?;
        let mut cluster: *mut c_void = std::ptr::null_mut();
        // librados wants the full name (`client.admin`); `--ceph-user admin` means that.
        let user = o
            .user
            .as_deref()
            .map(|u| {
                if u.contains('.') {
                    cstr(u)
                } else {
                    cstr(&format!("client.{u}"))
                }
            })
            .transpose()?;
        // SAFETY: out-pointer to a local; the names are NUL-terminated and outlive the call.
        let r = unsafe {
            (api.create2)(
                &mut cluster,
                c"ceph".as_ptr(),
                user.as_ref()
                    .map_or(c"client.admin".as_ptr(), |u| u.as_ptr()),
                0,
            )
        };
        check(r, "rados_create2", || "client".into())?;
        let h = Handle { api, cluster };
        let conf = match &o.conf {
            Some(p) => Some(cstr(
                p.to_str().ok_or(Error::Argument("a non-UTF-8 path"))?,
            )?),
            None => None,
        };
        // SAFETY: `cluster` is live; a null path asks librados to search its defaults.
        let r = unsafe {
            (api.conf_read_file)(
                cluster,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        check(r, "read ceph.conf", || {
            o.conf
                .as_deref()
                .map_or("(default places)".into(), |p| p.display().to_string())
        })?;
        // SAFETY: a null name reads `CEPH_ARGS`.
        let r = unsafe { (api.conf_parse_env)(cluster, std::ptr::null()) };
        check(r, "parse CEPH_ARGS", String::new)?;
        if let Some(t) = o.op_timeout {
            let secs = cstr(&t.as_secs().max(1).to_string())?;
            for key in [
                c"rados_osd_op_timeout",
                c"rados_mon_op_timeout",
                c"client_mount_timeout",
            ] {
                // SAFETY: live handle, NUL-terminated strings.
                let r = unsafe { (api.conf_set)(cluster, key.as_ptr(), secs.as_ptr()) };
                check(r, "set a timeout", || key.to_string_lossy().into_owned())?;
            }
        }
        // SAFETY: live, configured handle.
        let r = unsafe { (api.connect)(cluster) };
        check(r, "connect to the cluster", || {
            o.conf
                .as_deref()
                .map_or("(default ceph.conf)".into(), |p| p.display().to_string())
        })?;
        Ok(Cluster { h: Arc::new(h) })
    }

    /// An I/O context on `pool`.
    pub fn pool(&self, pool: &str) -> Result<Pool> {
        let name = cstr(pool)?;
        let mut io: *mut c_void = std::ptr::null_mut();
        // SAFETY: live cluster handle, out-pointer to a local.
        let r = unsafe { (self.h.api.ioctx_create)(self.h.cluster, name.as_ptr(), &mut io) };
        check(r, "open pool", || pool.to_string())?;
        Ok(Pool {
            io: Arc::new(IoHandle {
                _cluster: self.h.clone(),
                api: self.h.api,
                io,
            }),
        })
    }

    /// This client's address as the OSDs know it (`IP:port/nonce`): what another client
    /// blocklists to fence this one.
    pub fn address(&self) -> Result<String> {
        let mut s: *mut c_char = std::ptr::null_mut();
        // SAFETY: live handle; librados allocates the string, freed below.
        let r = unsafe { (self.h.api.getaddrs)(self.h.cluster, &mut s) };
        check(r, "rados_getaddrs", String::new)?;
        if s.is_null() {
            return Err(Error::Argument("librados gave no address"));
        }
        // SAFETY: a NUL-terminated string from librados.
        let out = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
        // SAFETY: allocated by librados for this call.
        unsafe { (self.h.api.buffer_free)(s) };
        Ok(out)
    }

    /// Fence the client at `address` (from its [`Cluster::address`]) for `seconds`: its
    /// operations in flight and later ones fail with `ESHUTDOWN`. Needs the monitor cap
    /// `allow command "osd blocklist"`.
    pub fn blocklist(&self, address: &str, seconds: u32) -> Result<()> {
        let a = cstr(address)?;
        // SAFETY: live handle; librados does not keep the string.
        let r =
            unsafe { (self.h.api.blocklist_add)(self.h.cluster, a.as_ptr().cast_mut(), seconds) };
        check(r, "blocklist", || address.to_string()).map(drop)
    }
}

struct IoHandle {
    /// Keeps the cluster connected while the context lives.
    _cluster: Arc<Handle>,
    api: &'static Api,
    io: *mut c_void,
}

// SAFETY: a `rados_ioctx_t` may be used from several threads (librados locks inside).
unsafe impl Send for IoHandle {}
// SAFETY: as above.
unsafe impl Sync for IoHandle {}

impl Drop for IoHandle {
    fn drop(&mut self) {
        // SAFETY: created by `rados_ioctx_create`; the cluster outlives it (`_cluster`).
        unsafe { (self.api.ioctx_destroy)(self.io) }
    }
}

/// An I/O context on one RADOS pool.
#[derive(Clone)]
pub struct Pool {
    io: Arc<IoHandle>,
}

/// One step of an atomic write operation on one object.
#[derive(Debug, Clone)]
pub enum Step<'a> {
    /// Create the object; with `exclusive`, fail with `EEXIST` if it exists.
    Create {
        exclusive: bool,
    },
    /// Fail with `ECANCELED` unless xattr `name` exists and equals `value`.
    XattrEquals {
        name: &'a str,
        value: &'a [u8],
    },
    /// Replace the object's data.
    WriteFull(&'a [u8]),
    SetXattr {
        name: &'a str,
        value: &'a [u8],
    },
}

impl Pool {
    fn api(&self) -> &'static Api {
        self.io.api
    }

    /// Apply `steps` to `oid` atomically: all of them or none.
    pub fn operate(&self, oid: &str, steps: &[Step<'_>]) -> Result<()> {
        let api = self.api();
        let o = cstr(oid)?;
        let mut names = Vec::new();
        for s in steps {
            if let Step::XattrEquals { name, .. } | Step::SetXattr { name, .. } = s {
                names.push(cstr(name)?);
            }
        }
        // SAFETY: a fresh op, released below on every path.
        let op = unsafe { (api.create_write_op)() };
        if op.is_null() {
            return Err(Error::Argument("librados could not allocate an operation"));
        }
        let mut name = names.iter();
        for s in steps {
            // SAFETY: `op` is live; every buffer and name outlives `operate` below, which is
            // when librados reads them.
            unsafe {
                match *s {
                    Step::Create { exclusive } => (api.write_op_create)(
                        op,
                        if exclusive { CREATE_EXCLUSIVE } else { 0 },
                        std::ptr::null(),
                    ),
                    Step::XattrEquals { value, .. } => (api.write_op_cmpxattr)(
                        op,
                        name.next().map_or(std::ptr::null(), |n| n.as_ptr()),
                        CMP_EQ,
                        value.as_ptr().cast(),
                        value.len(),
                    ),
                    Step::WriteFull(d) => (api.write_op_write_full)(op, d.as_ptr().cast(), d.len()),
                    Step::SetXattr { value, .. } => (api.write_op_setxattr)(
                        op,
                        name.next().map_or(std::ptr::null(), |n| n.as_ptr()),
                        value.as_ptr().cast(),
                        value.len(),
                    ),
                }
            }
        }
        // SAFETY: live op and context; a null mtime means "now".
        let r =
            unsafe { (api.write_op_operate)(op, self.io.io, o.as_ptr(), std::ptr::null_mut(), 0) };
        // SAFETY: created above, not used after this.
        unsafe { (api.release_write_op)(op) };
        check(r, "write", || oid.to_string()).map(drop)
    }

    /// Write `data` as the whole of a new object with `xattrs`, failing with `EEXIST` (see
    /// [`Error::exists`]) if the object exists: a write-once object.
    pub fn create_once(&self, oid: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> Result<()> {
        let mut steps = vec![Step::Create { exclusive: true }, Step::WriteFull(data)];
        steps.extend(
            xattrs
                .iter()
                .map(|&(name, value)| Step::SetXattr { name, value }),
        );
        self.operate(oid, &steps)
    }

    /// Read up to `buf.len()` bytes at `offset`; the bytes read (fewer at the object's end).
    pub fn read(&self, oid: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let o = cstr(oid)?;
        // SAFETY: live context; librados writes at most `buf.len()` bytes into `buf`.
        let r = unsafe {
            (self.api().read)(
                self.io.io,
                o.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        check(r, "read", || oid.to_string()).map(|n| n as usize)
    }

    /// The whole object (up to `max` bytes).
    pub fn read_all(&self, oid: &str, max: usize) -> Result<Vec<u8>> {
        let size = self.stat(oid)?.min(max as u64) as usize;
        let mut buf = vec![0u8; size];
        let n = self.read(oid, 0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Xattr `name` of `oid` (at most 4 KiB).
    pub fn xattr(&self, oid: &str, name: &str) -> Result<Vec<u8>> {
        let (o, n) = (cstr(oid)?, cstr(name)?);
        let mut buf = vec![0u8; 4096];
        // SAFETY: live context; librados writes at most `buf.len()` bytes.
        let r = unsafe {
            (self.api().getxattr)(
                self.io.io,
                o.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let len = check(r, "getxattr", || format!("{oid} {name}"))?;
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// The object's size.
    pub fn stat(&self, oid: &str) -> Result<u64> {
        let o = cstr(oid)?;
        let mut size = 0u64;
        let mut mtime: libc::time_t = 0;
        // SAFETY: live context, out-pointers to locals.
        let r = unsafe { (self.api().stat)(self.io.io, o.as_ptr(), &mut size, &mut mtime) };
        check(r, "stat", || oid.to_string())?;
        Ok(size)
    }

    pub fn remove(&self, oid: &str) -> Result<()> {
        let o = cstr(oid)?;
        // SAFETY: live context.
        let r = unsafe { (self.api().remove)(self.io.io, o.as_ptr()) };
        check(r, "remove", || oid.to_string()).map(drop)
    }
}
