# What the RADOS probes share: the cluster's config and pool, a connection with an op
# timeout, and the way they print errors and sections.
import errno, os, sys
import rados

CONF = os.environ["CEPH_CONF"]
POOL = sys.argv[1] if len(sys.argv) > 1 else "ingot"


def prados(timeout=10):
    r = rados.Rados(conffile=CONF, conf={"rados_osd_op_timeout": str(timeout)})
    r.connect()
    return r


def exc(e):
    return f"{type(e).__name__} errno={getattr(e, 'errno', None)} ({errno.errorcode.get(getattr(e, 'errno', 0) or 0, '?')})"


def section(t):
    print(f"\n=== {t}", flush=True)
