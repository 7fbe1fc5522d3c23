# Minimal ctypes binding to the librados C API (librados.so.2), for the ops that
# python3-rados 16.2.15 does not expose on WriteOp (rados_write_op_cmpxattr,
# rados_write_op_assert_exists). These are the same C calls the Rust `ceph`
# crate (librados FFI) wraps.
import ctypes, ctypes.util, os

L = ctypes.CDLL("librados.so.2")
c_p = ctypes.c_void_p
L.rados_create.argtypes = [ctypes.POINTER(c_p), ctypes.c_char_p]
L.rados_conf_read_file.argtypes = [c_p, ctypes.c_char_p]
L.rados_conf_set.argtypes = [c_p, ctypes.c_char_p, ctypes.c_char_p]
L.rados_connect.argtypes = [c_p]
L.rados_shutdown.argtypes = [c_p]
L.rados_ioctx_create.argtypes = [c_p, ctypes.c_char_p, ctypes.POINTER(c_p)]
L.rados_ioctx_destroy.argtypes = [c_p]
L.rados_create_write_op.restype = c_p
L.rados_release_write_op.argtypes = [c_p]
L.rados_write_op_create.argtypes = [c_p, ctypes.c_int, ctypes.c_char_p]
L.rados_write_op_write_full.argtypes = [c_p, ctypes.c_char_p, ctypes.c_size_t]
L.rados_write_op_setxattr.argtypes = [c_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
L.rados_write_op_cmpxattr.argtypes = [c_p, ctypes.c_char_p, ctypes.c_uint8, ctypes.c_char_p, ctypes.c_size_t]
L.rados_write_op_assert_version.argtypes = [c_p, ctypes.c_uint64]
L.rados_write_op_assert_exists.argtypes = [c_p]
L.rados_write_op_operate.argtypes = [c_p, c_p, ctypes.c_char_p, c_p, ctypes.c_int]
L.rados_get_last_version.argtypes = [c_p]
L.rados_get_last_version.restype = ctypes.c_uint64
L.rados_getxattr.argtypes = [c_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
L.rados_getaddrs.argtypes = [c_p, ctypes.POINTER(ctypes.c_char_p)]

CMP_EQ, CMP_NE, CMP_GT, CMP_GTE, CMP_LT, CMP_LTE = 1, 2, 3, 4, 5, 6


class Conn:
    def __init__(self, conf, pool, timeout=10):
        self.c = c_p()
        assert L.rados_create(ctypes.byref(self.c), b"admin") == 0
        assert L.rados_conf_read_file(self.c, conf.encode()) == 0
        L.rados_conf_set(self.c, b"rados_osd_op_timeout", str(timeout).encode())
        r = L.rados_connect(self.c)
        assert r == 0, r
        self.io = c_p()
        assert L.rados_ioctx_create(self.c, pool.encode(), ctypes.byref(self.io)) == 0

    def write_op(self, oid, steps):
        """steps: list of tuples ('create', excl) ('write_full', data) ('setxattr', k, v)
        ('cmpxattr', k, op, v) ('assert_version', v) ('assert_exists',). Returns rc (0 or -errno)."""
        op = L.rados_create_write_op()
        keep = []
        for s in steps:
            if s[0] == "create":
                L.rados_write_op_create(op, s[1], None)
            elif s[0] == "write_full":
                keep.append(s[1]); L.rados_write_op_write_full(op, s[1], len(s[1]))
            elif s[0] == "setxattr":
                keep.append(s[2]); L.rados_write_op_setxattr(op, s[1].encode(), s[2], len(s[2]))
            elif s[0] == "cmpxattr":
                keep.append(s[3]); L.rados_write_op_cmpxattr(op, s[1].encode(), s[2], s[3], len(s[3]))
            elif s[0] == "assert_version":
                L.rados_write_op_assert_version(op, s[1])
            elif s[0] == "assert_exists":
                L.rados_write_op_assert_exists(op)
            else:
                raise ValueError(s)
        rc = L.rados_write_op_operate(op, self.io, oid.encode(), None, 0)
        L.rados_release_write_op(op)
        return rc

    def last_version(self):
        return L.rados_get_last_version(self.io)

    def getxattr(self, oid, name):
        buf = ctypes.create_string_buffer(256)
        r = L.rados_getxattr(self.io, oid.encode(), name.encode(), buf, 256)
        return r if r < 0 else buf.raw[:r]

    def addrs(self):
        s = ctypes.c_char_p()
        L.rados_getaddrs(self.c, ctypes.byref(s))
        return s.value.decode()

    def close(self):
        L.rados_ioctx_destroy(self.io)
        L.rados_shutdown(self.c)


def en(rc):
    import errno
    return "0" if rc >= 0 else f"-{errno.errorcode.get(-rc, '?')} ({rc})"
