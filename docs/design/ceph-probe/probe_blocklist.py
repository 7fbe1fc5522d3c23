#!/usr/bin/python3
# Blocklisting probe: a stale owner's queued (in-flight) and later ops must fail.
# Usage: CEPH_CONF=... /usr/bin/python3 probe_blocklist.py POOL
import errno, os, sys, time
import rados
from probe_common import CONF, POOL, prados, exc, section
def sh(cmd):
    sys.stdout.flush(); os.system(cmd + " 2>&1 | grep -v asok"); sys.stdout.flush()
r0 = prados(); io0 = r0.open_ioctx(POOL)
for o in ("inflight", "pre-blocklist", "after-bl", "after-bl2", "lease.bl"):
    try: io0.remove_object(o)
    except rados.ObjectNotFound: pass
def excl_create(io, oid):
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_EXCLUSIVE); op.write_full(b"x")
        io.operate_write_op(op, oid)
section("c2. OSD blocklisting of the stale owner (what RBD exclusive-lock does)")
R = prados(timeout=20)
ioS = R.open_ioctx(POOL)
addr = R.get_addrs()
print("stale client's address from rados_getaddrs():", addr, " instance id:", R.get_instance_id())
# watchers and cls_lock holders expose the address too (RBD finds the owner this way)
werr = []
io0.write_full("lease.bl", b"")
notes = []
wt = ioS.watch("lease.bl", lambda *a: notes.append(a), error_callback=lambda *a: werr.append(a))
t0 = time.time(); ok = io0.notify("lease.bl", "lease epoch 5 taken by B", 5000)
print(f"notify from new owner -> {ok} in {1000*(time.time()-t0):.1f} ms; old owner's watch callback got: {notes}")
ioS.lock_exclusive("lease.bl", "ingot", "cookie-A", desc="owner A", duration=60)
sh(f"rados -c {CONF} -p {POOL} listwatchers lease.bl; rados -c {CONF} -p {POOL} lock info lease.bl ingot")
ioS.write_full("pre-blocklist", b"ok"); print("stale client write before blocklist: ok")
# in-flight op: pause the OSDs so the op is queued in the client, blocklist, then unpause
sh(f"ceph -c {CONF} osd pause")
R.wait_for_latest_osdmap()
print("stale client has the paused osdmap")
comp_res = {}
def cb(comp):
    comp_res["rc"] = comp.get_return_value()
t0 = time.time()
comp = ioS.aio_write_full("inflight", b"x" * 4096, oncomplete=cb)
time.sleep(1)
print("in-flight aio_write_full queued, complete?", comp.is_complete())
bl_addr = addr.split(",")[-1].strip("[]").replace("v2:", "")
r2 = prados()
sh(f"ceph -c {CONF} osd blocklist add {bl_addr} 300")
sh(f"ceph -c {CONF} osd blocklist ls")
sh(f"ceph -c {CONF} osd unpause")
comp.wait_for_complete()
rcv = comp_res.get("rc", comp.get_return_value())
print(f"in-flight op after blocklist+unpause: rc={rcv} ({errno.errorcode.get(-rcv, '?')}) after {time.time()-t0:.1f}s")
for what, fn in (("write_full", lambda: ioS.write_full("after-bl", b"x")),
                 ("exclusive create", lambda: excl_create(ioS, "after-bl2")),
                 ("read", lambda: ioS.read("pre-blocklist")),
                 ("remove", lambda: ioS.remove_object("pre-blocklist"))):
    t0 = time.time()
    try:
        fn(); print(f"blocklisted client {what}: succeeded (BAD)")
    except rados.Error as e:
        print(f"blocklisted client {what}: {exc(e)} after {time.time()-t0:.2f}s")
time.sleep(1); print("watch error callback got:", werr)
sh(f"rados -c {CONF} -p {POOL} listwatchers lease.bl")
for o in ("after-bl", "inflight"):
    try:
        io0.stat(o); print(o, "exists (BAD)")
    except rados.ObjectNotFound:
        print(o, "does not exist (good)")
try:
    wt.close()
except rados.Error as e:
    print("unwatch on blocklisted client:", exc(e))
try:
    ioS.close(); R.shutdown()
except Exception as e:
    print("shutdown:", e)
# a NEW connection from the same process gets a new nonce -> not blocklisted
R3 = prados(); io3 = R3.open_ioctx(POOL)
io3.write_full("new-session", b"x"); print("new session in same process, new addr", R3.get_addrs(), ": write ok")
io3.close(); R3.shutdown()
sh(f"ceph -c {CONF} osd blocklist rm {bl_addr}")
r2.shutdown()

io0.close(); r0.shutdown()
