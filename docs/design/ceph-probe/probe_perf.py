#!/usr/bin/python3
# Size limits + latency of 8 MiB write_full (exclusive create) and 4 KiB range reads.
import errno, os, sys, time, random, statistics as st
import rados
from probe_common import CONF, POOL
r = rados.Rados(conffile=CONF, conf={"rados_osd_op_timeout": "60"}); r.connect(); io = r.open_ioctx(POOL)
def tryw(name, n):
    try:
        io.write_full(name, b"\0" * n); print(f"write_full {n/2**20:.0f} MiB: ok")
    except rados.Error as e:
        print(f"write_full {n/2**20:.0f} MiB: {type(e).__name__} errno={e.errno} ({errno.errorcode.get(e.errno,'?')})")
tryw("big1", 80 << 20)
tryw("big2", 100 << 20)   # > osd_max_write_size (90 MiB)
# grow an object past osd_max_object_size (128 MiB) with 64 MiB writes at offsets
io.write("big3", b"\0" * (64 << 20), 0); io.write("big3", b"\0" * (64 << 20), 64 << 20)
print("big3 size after 2x64 MiB:", io.stat("big3")[0] >> 20, "MiB")
try:
    io.write("big3", b"\0" * 4096, 128 << 20); print("write past 128 MiB: ok")
except rados.Error as e:
    print(f"write 4 KiB at offset 128 MiB: {type(e).__name__} errno={e.errno} ({errno.errorcode.get(e.errno,'?')})")
for o in ("big1", "big2", "big3"):
    try: io.remove_object(o)
    except rados.Error: pass
# latency
buf = os.urandom(8 << 20)
lat = []
for i in range(24):
    t = time.perf_counter()
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_EXCLUSIVE); op.write_full(buf); op.set_xattr("epoch", b"7")
        io.operate_write_op(op, f"perf.{i}")
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print(f"8 MiB exclusive create+write_full+xattr, 24 sequential: median {st.median(lat):.1f} ms, min {lat[0]:.1f}, max {lat[-1]:.1f} ms -> {8*24/(sum(lat)/1000):.0f} MiB/s")
lat = []
for i in range(500):
    o = f"perf.{random.randrange(24)}"; off = random.randrange(2048) * 4096
    t = time.perf_counter(); d = io.read(o, 4096, off); lat.append((time.perf_counter() - t) * 1000)
    assert len(d) == 4096
lat.sort()
print(f"4 KiB range read, 500 random: median {st.median(lat):.2f} ms, p99 {lat[int(len(lat)*.99)]:.2f} ms")
lat = []
for i in range(200):
    t = time.perf_counter()
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_EXCLUSIVE); op.write_full(b"r" * 4096); op.set_xattr("epoch", b"7")
        io.operate_write_op(op, f"small.{i}")
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print(f"4 KiB exclusive create+write_full+xattr, 200 sequential: median {st.median(lat):.2f} ms, p99 {lat[int(len(lat)*.99)]:.2f} ms")
for i in range(24): io.remove_object(f"perf.{i}")
for i in range(200): io.remove_object(f"small.{i}")
io.close(); r.shutdown()
