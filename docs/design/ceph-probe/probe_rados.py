#!/usr/bin/python3
# RADOS fencing-primitive probe against a Ceph 16.2.15 cluster (see ceph-up.sh).
# Usage: CEPH_CONF=... /usr/bin/python3 probe_rados.py POOL
import errno, os, sys, threading, time, struct
import rados
from lrados import Conn, en, CMP_EQ, CMP_GT

from probe_common import CONF, POOL, prados, exc, section

A = Conn(CONF, POOL)
B = Conn(CONF, POOL)
for o in ["seg.1", "lease", "lease2", "lease3"] + [f"log.{i:08d}" for i in range(1, 12)]:
    A.write_op(o, [])  # no-op
r0 = prados(); io0 = r0.open_ioctx(POOL)
for o in list(io0.list_objects()):
    o.remove()

# ---------------------------------------------------------------- a
section("a. exclusive create + data + xattr in ONE write op")
data = os.urandom(1 << 20)
steps = [("create", 1), ("write_full", data), ("setxattr", "epoch", b"1"), ("setxattr", "seq", b"1")]
rc = A.write_op("seg.1", steps)
print("first  create(EXCLUSIVE)+write_full(1MiB)+setxattr x2 :", en(rc), "version", A.last_version())
rc = B.write_op("seg.1", [("create", 1), ("write_full", b"EVIL" * 10), ("setxattr", "epoch", b"9")])
print("second create(EXCLUSIVE)+write_full+setxattr (node B):", en(rc))
got = io0.read("seg.1", len(data) + 10)
print("object unchanged after failed op:", got == data, " xattr epoch =", io0.get_xattr("seg.1", "epoch"))
# python3-rados equivalent (WriteOp.new(exclusive))
with rados.WriteOpCtx() as op:
    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
    op.write_full(b"x")
    op.set_xattr("epoch", b"9")
    try:
        io0.operate_write_op(op, "seg.1"); print("python3-rados exclusive re-create: succeeded (BAD)")
    except rados.Error as e:
        print("python3-rados exclusive re-create:", exc(e))
# idempotent create on existing object
rc = B.write_op("seg.1", [("create", 0), ("setxattr", "probe", b"1")])
print("create(IDEMPOTENT) on existing object:", en(rc), "(non-exclusive create does not fence)")
# exclusive create of a brand-new name with a failing assertion in the same op: nothing created?
rc = A.write_op("seg.2", [("create", 1), ("write_full", b"abc"), ("cmpxattr", "epoch", CMP_EQ, b"1")])
try:
    io0.stat("seg.2"); ex = True
except rados.ObjectNotFound:
    ex = False
print("create(EXCL)+write+cmpxattr(missing xattr) on new object:", en(rc), "object exists afterwards:", ex)

# ---------------------------------------------------------------- b
section("b. compare-and-swap on a lease object")
rc = A.write_op("lease", [("create", 1), ("write_full", b"epoch=1 owner=A"), ("setxattr", "epoch", b"%020d" % 1), ("setxattr", "owner", b"A")])
v1 = A.last_version()
print("lease created by A:", en(rc), "object version", v1)
# assert_version
rc = B.write_op("lease", [("assert_version", v1), ("write_full", b"epoch=2 owner=B"), ("setxattr", "epoch", b"%020d" % 2), ("setxattr", "owner", b"B")])
v2 = B.last_version()
print(f"B: assert_version({v1}) + write  ->", en(rc), "new version", v2)
rc = A.write_op("lease", [("assert_version", v1), ("write_full", b"epoch=2 owner=A"), ("setxattr", "owner", b"A")])
print(f"A: assert_version({v1}) (stale, v < current) ->", en(rc))
rc = A.write_op("lease", [("assert_version", v2 + 5), ("write_full", b"x")])
print(f"A: assert_version({v2+5}) (v > current)       ->", en(rc))
rc = A.write_op("lease-missing", [("assert_version", 1), ("write_full", b"x")])
print("A: assert_version on a missing object        ->", en(rc))
print("lease content:", io0.read("lease"), "owner xattr:", io0.get_xattr("lease", "owner"))
# cmpxattr (C API only; python3-rados 16 lacks WriteOp.cmpxattr)
rc = A.write_op("lease", [("cmpxattr", "epoch", CMP_EQ, b"%020d" % 1), ("write_full", b"epoch=2 owner=A"), ("setxattr", "epoch", b"%020d" % 2), ("setxattr", "owner", b"A")])
print("A: cmpxattr(epoch == 1) + write  (stale)    ->", en(rc))
rc = B.write_op("lease", [("cmpxattr", "epoch", CMP_EQ, b"%020d" % 2), ("write_full", b"epoch=3 owner=B"), ("setxattr", "epoch", b"%020d" % 3)])
print("B: cmpxattr(epoch == 2) + write  (current)  ->", en(rc))
rc = A.write_op("lease", [("cmpxattr", "missing", CMP_EQ, b"x"), ("write_full", b"x")])
print("A: cmpxattr on a missing xattr              ->", en(rc))
# omap_cmp via python3-rados
io0.set_omap  # exists
with rados.WriteOpCtx() as op:
    io0.set_omap(op, ("epoch",), (b"3",))
    io0.operate_write_op(op, "lease")
for val, who in (("2", "A(stale)"), ("3", "B")):
    with rados.WriteOpCtx() as op:
        op.omap_cmp("epoch", val, rados.LIBRADOS_CMPXATTR_OP_EQ)
        io0.set_omap(op, ("epoch",), (b"4",))
        try:
            io0.operate_write_op(op, "lease"); print(f"{who}: omap_cmp(epoch == {val}) + set_omap -> 0")
        except rados.Error as e:
            print(f"{who}: omap_cmp(epoch == {val}) + set_omap ->", exc(e))
# cmpext (python3-rados) on object data
with rados.WriteOpCtx() as op:
    op.cmpext(b"epoch=9", 0)
    op.write_full(b"nope")
    try:
        io0.operate_write_op(op, "lease"); print("cmpext mismatch -> 0 (BAD)")
    except rados.Error as e:
        print("cmpext(b'epoch=9' at 0) mismatch + write_full ->", exc(e), "(mismatch rc = -MAX_ERRNO - offset)")


def race(kind, nodes=2, tries=200):
    """N nodes each loop: read (epoch, version) -> CAS to epoch+1 owner=me. Count wins/losses."""
    oid = "lease2" if kind == "assert_version" else "lease3"
    c = Conn(CONF, POOL)
    c.write_op(oid, [("create", 0), ("write_full", b"0"), ("setxattr", "epoch", b"%020d" % 0)])
    c.close()
    stats = {}
    barrier = threading.Barrier(nodes)

    def node(name):
        cn = Conn(CONF, POOL)
        r = prados(); io = r.open_ioctx(POOL)
        won, lost, codes = 0, 0, {}
        barrier.wait()
        for _ in range(tries):
            ep = int(io.get_xattr(oid, "epoch"))
            ver = io.get_last_version()
            new = [("write_full", f"{ep+1} {name}".encode()), ("setxattr", "epoch", b"%020d" % (ep + 1)), ("setxattr", "owner", name.encode())]
            if kind == "assert_version":
                rc = cn.write_op(oid, [("assert_version", ver)] + new)
            else:
                rc = cn.write_op(oid, [("cmpxattr", "epoch", CMP_EQ, b"%020d" % ep)] + new)
            if rc == 0:
                won += 1
            else:
                lost += 1; codes[en(rc)] = codes.get(en(rc), 0) + 1
        stats[name] = (won, lost, codes)
        io.close(); r.shutdown(); cn.close()

    th = [threading.Thread(target=node, args=(f"N{i}",)) for i in range(nodes)]
    t0 = time.time()
    [t.start() for t in th]; [t.join() for t in th]
    dt = time.time() - t0
    final = int(io0.get_xattr(oid, "epoch"))
    wins = sum(s[0] for s in stats.values())
    print(f"race {kind}: {nodes} nodes x {tries} CAS attempts in {dt:.2f}s; per node (won, lost, errors): {stats}")
    print(f"   final epoch {final} == total wins {wins}: {final == wins}  (no lost update)")


race("assert_version")
race("cmpxattr")

# ---------------------------------------------------------------- c
section("c. fenced log: contiguous write-once objects + epoch takeover")
print("(a write op names ONE object: there is no op that asserts 'lease' and writes 'log.N')")


def append(c, who, epoch, n, payload=b"rec"):
    return c.write_op(f"log.{n:08d}", [("create", 1), ("write_full", payload), ("setxattr", "epoch", b"%d" % epoch), ("setxattr", "owner", who.encode())])


for n in (1, 2, 3):
    print(f"A(epoch 1) append log.{n}:", en(append(A, "A", 1, n)))
# A's in-flight append of 4 lands before B seals (the race B must tolerate)
print("A(epoch 1) append log.4 (lands just before takeover):", en(append(A, "A", 1, 4)))
# B takes the lease (CAS) ...
ep = int(io0.get_xattr("lease", "epoch"))
rc = B.write_op("lease", [("cmpxattr", "epoch", CMP_EQ, b"%020d" % ep), ("write_full", b"B"), ("setxattr", "epoch", b"%020d" % (ep + 1)), ("setxattr", "owner", b"B")])
print(f"B takes lease epoch {ep}->{ep+1}:", en(rc))
# ... then seals: exclusive-create a SEAL record at the first free index; EEXIST -> that slot was
# written by the old owner: accept it into the log and try the next index.
n = 1
while True:
    rc = B.write_op(f"log.{n:08d}", [("create", 1), ("write_full", b"SEAL"), ("setxattr", "epoch", b"%d" % (ep + 1)), ("setxattr", "owner", b"B")])
    if rc == -errno.EEXIST:
        n += 1; continue
    print(f"B seals at log.{n} ({en(rc)}); log prefix accepted from old owner: log.1..log.{n-1}")
    break
print("A(stale) append log.5:", en(append(A, "A", 1, 5)), " <- deposed: stale owner cannot extend")
print("A(stale) append log.3 (overwrite attempt, exclusive):", en(append(A, "A", 1, 3)))
print("B append log.6:", en(append(B, "B", ep + 1, 6)))
print("log.5 owner/epoch:", io0.get_xattr("log.00000005", "owner"), io0.get_xattr("log.00000005", "epoch"))
A.close(); B.close()

io0.close(); r0.shutdown()
