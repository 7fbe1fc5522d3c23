//! The librados functions ingot calls, looked up once in `librados.so.2`.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::{Error, Result};

type Ptr = *mut c_void;

pub(crate) struct Api {
    pub create2: unsafe extern "C" fn(*mut Ptr, *const c_char, *const c_char, u64) -> c_int,
    pub conf_read_file: unsafe extern "C" fn(Ptr, *const c_char) -> c_int,
    pub conf_parse_env: unsafe extern "C" fn(Ptr, *const c_char) -> c_int,
    pub conf_set: unsafe extern "C" fn(Ptr, *const c_char, *const c_char) -> c_int,
    pub connect: unsafe extern "C" fn(Ptr) -> c_int,
    pub shutdown: unsafe extern "C" fn(Ptr),
    pub ioctx_create: unsafe extern "C" fn(Ptr, *const c_char, *mut Ptr) -> c_int,
    pub ioctx_destroy: unsafe extern "C" fn(Ptr),
    pub getaddrs: unsafe extern "C" fn(Ptr, *mut *mut c_char) -> c_int,
    pub buffer_free: unsafe extern "C" fn(*mut c_char),
    pub blocklist_add: unsafe extern "C" fn(Ptr, *mut c_char, u32) -> c_int,
    pub create_write_op: unsafe extern "C" fn() -> Ptr,
    pub release_write_op: unsafe extern "C" fn(Ptr),
    pub write_op_create: unsafe extern "C" fn(Ptr, c_int, *const c_char),
    pub write_op_cmpxattr: unsafe extern "C" fn(Ptr, *const c_char, u8, *const c_char, usize),
    pub write_op_write_full: unsafe extern "C" fn(Ptr, *const c_char, usize),
    pub write_op_setxattr: unsafe extern "C" fn(Ptr, *const c_char, *const c_char, usize),
    pub write_op_operate:
        unsafe extern "C" fn(Ptr, Ptr, *const c_char, *mut libc::time_t, c_int) -> c_int,
    pub read: unsafe extern "C" fn(Ptr, *const c_char, *mut c_char, usize, u64) -> c_int,
    pub getxattr:
        unsafe extern "C" fn(Ptr, *const c_char, *const c_char, *mut c_char, usize) -> c_int,
    pub stat: unsafe extern "C" fn(Ptr, *const c_char, *mut u64, *mut libc::time_t) -> c_int,
    pub remove: unsafe extern "C" fn(Ptr, *const c_char) -> c_int,
}

/// The library stays loaded for the life of the process (the pointers above point into it).
static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

pub(crate) fn api() -> Result<&'static Api> {
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::Library(e.clone()))
}

fn load() -> std::result::Result<Api, String> {
    // SAFETY: librados' initialisers only set up its own state.
    let lib = unsafe { libloading::Library::new("librados.so.2") }.map_err(|e| e.to_string())?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the type is the C prototype of this symbol in librados.h (Ceph 16 and
            // later), and the library is never unloaded.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{}: {e}", $name))?
        };
    }
    Ok(Api {
        create2: sym!("rados_create2"),
        conf_read_file: sym!("rados_conf_read_file"),
        conf_parse_env: sym!("rados_conf_parse_env"),
        conf_set: sym!("rados_conf_set"),
        connect: sym!("rados_connect"),
        shutdown: sym!("rados_shutdown"),
        ioctx_create: sym!("rados_ioctx_create"),
        ioctx_destroy: sym!("rados_ioctx_destroy"),
        getaddrs: sym!("rados_getaddrs"),
        buffer_free: sym!("rados_buffer_free"),
        blocklist_add: sym!("rados_blocklist_add"),
        create_write_op: sym!("rados_create_write_op"),
        release_write_op: sym!("rados_release_write_op"),
        write_op_create: sym!("rados_write_op_create"),
        write_op_cmpxattr: sym!("rados_write_op_cmpxattr"),
        write_op_write_full: sym!("rados_write_op_write_full"),
        write_op_setxattr: sym!("rados_write_op_setxattr"),
        write_op_operate: sym!("rados_write_op_operate"),
        read: sym!("rados_read"),
        getxattr: sym!("rados_getxattr"),
        stat: sym!("rados_stat"),
        remove: sym!("rados_remove"),
    })
}
