#!/usr/bin/env bash
# A pool on Ceph (issue 23) against Ceph's own clients on the same single-node cluster, in one
# run:
#  1. sequential ingest: `rados bench write -b 8M -t 16` (bounded by --max-objects) against 1M
#     writes QD16 through ingot over NBD (fio's nbd engine) of the same bytes, the final flush
#     included (every byte is in the cluster when fio ends); ingot without a store for scale;
#  2. 4k random writes QD32 with a flush every 1,000 writes (fio --fsync=1000): ingot over NBD
#     against librbd (fio's rbd engine on an RBD image in the same pool): IOPS, flush p50/p99;
#     4k random reads QD32 on both;
#     4k writes at QD1 each flushed (fio --fsync=1), with `--durability store` and `local`,
#     and the random writes again with `local`;
#  3. takeover after kill -9 (of the local-mode server): time until another node's
#     `ingot serve` answers NBD, with
#     --takeover and with the default wait for the lease (15 s) to run out. A takeover reads
#     the log since the last base and the tables of its batch objects, not their data, and
#     replays the engine's log tail (the random writes since the last checkpoint), fetching
#     what that tail reads;
#  4. cold 4k random reads QD32: a node that took the pool over with --no-fill, so every read
#     of a range not fetched yet is a range read of a store object, against `rados bench rand`
#     on 4 KiB objects (32 in flight).
#  5. a local cache smaller than the data (`--local-cache 256M`, a 64 MiB RAM cache; the clean
#     restart of node 3, once what phase 4 fetched is dropped): 1 GiB of 1M writes QD16 and a
#     flush, as in 1 (MB/s, and the most the local files held meanwhile), then 4k random reads
#     QD32 over the 4 GiB volume (IOPS, p50, p99, and the reads that went to the store).
# Usage: bench/scripts/ceph.sh [DIR] [SECONDS]   (root: it starts a cluster in DIR/cluster, or
# CEPH_DIR, with tests/ceph/ceph-up.sh unless INGOT_CEPH_CONF names one; ports 3300, 6789 and
# 6800-7300; OSD_BYTES sizes its OSD, 24 GiB by default).
set -euo pipefail
DIR=${1:-/tmp/ingot-ceph-bench}
SECS=${2:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
INGOT=${INGOT_BIN:-$ROOT/target/release/ingot}
for t in fio rados rbd "$INGOT"; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install fio ceph-common; cargo build --release)" >&2; exit 1; }
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
rm -rf "$DIR"/node* "$DIR"/*.sock "$DIR"/local
STARTED=
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "$STARTED" ] && "$ROOT/tests/ceph/ceph-down.sh" "$CLUSTER"
  true
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*" >&2; }
# CEPH_DIR=/dev/shm/...: the cluster's OSD in RAM, as a remote cluster's disks would not be
# this machine's (on one disk, ingot's writes, its read-back and the OSD share the device).
CLUSTER=${CEPH_DIR:-$DIR/cluster}
if [ -z "${INGOT_CEPH_CONF:-}" ]; then
  step "starting a single-node cluster in $CLUSTER"
  OSD_BYTES=${OSD_BYTES:-$((24 << 30))} "$ROOT/tests/ceph/ceph-up.sh" "$CLUSTER" >&2
  STARTED=1
  INGOT_CEPH_CONF=$CLUSTER/ceph.conf
fi
export CEPH_CONF=$INGOT_CEPH_CONF
NAME=bench-$$-$(date +%s)
INGEST_OBJECTS=128 # 1 GiB of 8 MiB objects

serve() { # dir sock [args...]: start, wait for the socket, print the pid
  local d=$1 s=$2
  shift 2
  rm -f "$s"
  "$INGOT" serve --pool "$d" --nbd "unix:$s" "$@" >"$d.log" 2>&1 &
  local p=$!
  for _ in $(seq 600); do [ -S "$s" ] && break; sleep 0.05; done
  [ -S "$s" ] || { cat "$d.log" >&2; exit 1; }
  echo $p
}
fio_json() { fio --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p'; }
# The machine's busy and total CPU ticks (/proc/stat): what a phase cost the two cores that
# fio, ingot and the OSD share here.
ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
cpu_since() { # busy0 total0: busy core-seconds since, and the busy share of the cores
  local b0=$1 t0=$2 b1 t1
  read -r b1 t1 < <(ticks)
  python3 -c "import os; hz = os.sysconf('SC_CLK_TCK'); print('%.1f %.0f' % (($b1 - $b0) / hz, 100 * ($b1 - $b0) / max(1, $t1 - $t0)))"
}

step "1. rados bench: $INGEST_OBJECTS objects of 8 MiB, 16 in flight"
read -r b0 t0 < <(ticks)
rados_bw=$(rados -p ingot bench 60 write -b 8M -t 16 --max-objects $INGEST_OBJECTS --run-name "$NAME" 2>/dev/null |
  awk '/^Bandwidth \(MB\/sec\)/ {print $3}')
read -r rados_cpu rados_busy < <(cpu_since "$b0" "$t0")
rados -p ingot cleanup --run-name "$NAME" >/dev/null 2>&1 || true

step "1. ingot on the store: pool, volume, 1 GiB of 1M writes QD16 and a flush"
"$INGOT" pool create --pool "$DIR/node0" --size 12G --store "rados://ingot/$NAME" >/dev/null 2>&1
P=$(serve "$DIR/node0" "$DIR/n0.sock"); PIDS+=("$P")
"$INGOT" volume create v --size 4G --pool "$DIR/node0" >/dev/null
ingest() { # socket
  fio_json --name=ingest --ioengine=nbd --uri="nbd+unix:///v?socket=$1" --rw=write --bs=1M \
    --iodepth=16 --size=1G --end_fsync=1 |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.0f" % (1024 * 1000 / j["job_runtime"]))'
}
read -r b0 t0 < <(ticks)
ingot_bw=$(ingest "$DIR/n0.sock")
read -r ingot_cpu ingot_busy < <(cpu_since "$b0" "$t0")

step "1. ingot without a store, for scale"
"$INGOT" pool create --pool "$DIR/local" --size 12G >/dev/null 2>&1
L=$(serve "$DIR/local" "$DIR/local.sock"); PIDS+=("$L")
"$INGOT" volume create v --size 4G --pool "$DIR/local" >/dev/null
read -r b0 t0 < <(ticks)
local_bw=$(ingest "$DIR/local.sock")
read -r local_cpu local_busy < <(cpu_since "$b0" "$t0")
kill -INT "$L"; wait "$L" 2>/dev/null || true
echo "ingest, MB/s: rados bench $rados_bw, ingot on the store $ingot_bw ($(python3 -c "print('%.2f' % ($ingot_bw / $rados_bw))")x), ingot without a store $local_bw"
echo "ingest, machine CPU per GiB (core-seconds, cores busy): rados bench $rados_cpu ($rados_busy%), ingot on the store $ingot_cpu ($ingot_busy%), ingot without a store $local_cpu ($local_busy%)"

rand() { # engine args...: prints iops, p50 and p99 of the flushes in ms
  fio_json --name=r --rw="$RW" --bs=4k --iodepth=32 --size=4G --runtime="$SECS" --time_based \
    --randrepeat=0 "$@" | python3 -c '
import json, os, sys
j = json.load(sys.stdin)["jobs"][0]
rw = "write" if os.environ["RW"] == "randwrite" else "read"
s = j.get("sync", {}).get("lat_ns", {}).get("percentile", {})
p = lambda k: "%.2f" % (s[k] / 1e6) if k in s else "-"
print("%.0f %s %s" % (j[rw]["iops"], p("50.000000"), p("99.000000")))'
}
step "2. 4k random writes, a flush every 1,000 (ingot over NBD, then librbd)"
rbd create "ingot/$NAME-img" --size 4G
rbd bench --io-type write --io-size 4M --io-total 4G --io-pattern seq "ingot/$NAME-img" >/dev/null 2>&1
export RW=randwrite
ingot_w=$(rand --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/n0.sock" --fsync=1000)
rbd_w=$(rand --ioengine=rbd --clientname=admin --pool=ingot --rbdname="$NAME-img" --fsync=1000)
export RW=randread
step "2. 4k random reads"
ingot_r=$(rand --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/n0.sock")
rbd_r=$(rand --ioengine=rbd --clientname=admin --pool=ingot --rbdname="$NAME-img")
rbd rm "ingot/$NAME-img" >/dev/null 2>&1 || true
read -r iw iw50 iw99 <<<"$ingot_w"
read -r rw rw50 rw99 <<<"$rbd_w"
read -r ir _ _ <<<"$ingot_r"
read -r rr _ _ <<<"$rbd_r"
echo "4k randwrite QD32, flush every 1000: ingot $iw IOPS (flush p50 $iw50 ms, p99 $iw99 ms), librbd $rw IOPS (flush p50 $rw50 ms, p99 $rw99 ms): $(python3 -c "print('%.2f' % ($iw / $rw))")x"
echo "4k randread QD32: ingot $ir IOPS, librbd $rr IOPS: $(python3 -c "print('%.2f' % ($ir / $rr))")x"

step "2. commits: 4k writes at QD1, each one flushed, answered once in the store, then once local"
qd1() { # engine args...: pairs per second, flush p50 and p99 in ms
  fio_json --name=q --rw=randwrite --bs=4k --iodepth=1 --size=1G --runtime="$SECS" --time_based \
    --randrepeat=0 --fsync=1 "$@" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
s = j["sync"]["lat_ns"]["percentile"]
print("%.0f %.3f %.3f" % (j["write"]["iops"], s["50.000000"] / 1e6, s["99.000000"] / 1e6))'
}
read -r sq sq50 sq99 <<<"$(qd1 --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/n0.sock")"
kill -INT "$P"; wait "$P" 2>/dev/null || true
P=$(serve "$DIR/node0" "$DIR/n0.sock" --durability local); PIDS+=("$P")
read -r lq lq50 lq99 <<<"$(qd1 --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/n0.sock")"
export RW=randwrite
read -r lw lw50 lw99 <<<"$(rand --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/n0.sock" --fsync=1000)"
echo "4k write + flush at QD1: --durability store $sq per s (flush p50 $sq50 ms, p99 $sq99 ms), --durability local $lq per s (flush p50 $lq50 ms, p99 $lq99 ms)"
echo "4k randwrite QD32, flush every 1000, --durability local: $lw IOPS (flush p50 $lw50 ms, p99 $lw99 ms)"

step "3. takeover after kill -9"
takeover() { # from-pid new-node [serve args]
  local from=$1 node=$2
  shift 2
  kill -9 "$from"
  local t0 t1
  t0=$(date +%s.%N)
  "$INGOT" pool attach --pool "$DIR/$node" --store "rados://ingot/$NAME" >/dev/null
  local p
  p=$(serve "$DIR/$node" "$DIR/$node.sock" "$@")
  t1=$(date +%s.%N)
  echo "$p $(python3 -c "print('%.2f' % ($t1 - $t0))")"
}
read -r P1 t_now < <(takeover "$P" node1 --takeover)
PIDS+=("$P1")
read -r P2 t_wait < <(takeover "$P1" node2)
PIDS+=("$P2")
echo "takeover after kill -9 (attach, lease, listing the store's ranges, open): --takeover $t_now s, waiting for the lease $t_wait s"

step "4. cold 4k random reads: a node that took the pool over and fetches only what is read"
kill -INT "$P2"; wait "$P2" 2>/dev/null || true
"$INGOT" pool attach --pool "$DIR/node3" --store "rados://ingot/$NAME" >/dev/null
P3=$(serve "$DIR/node3" "$DIR/node3.sock" --no-fill); PIDS+=("$P3")
cold_before=$("$INGOT" stats --json --pool "$DIR/node3" | python3 -c 'import json,sys; print(json.load(sys.stdin)["replica"]["cold_bytes"])')
cold() { # engine args...: iops, clat p50 and p99 in ms
  fio_json --name=c --rw=randread --bs=4k --iodepth=32 --size=1G --runtime="$SECS" --time_based \
    --randrepeat=0 "$@" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]["read"]
s = j["clat_ns"]["percentile"]
print("%.0f %.2f %.2f %d" % (j["iops"], s["50.000000"] / 1e6, s["99.000000"] / 1e6, j["total_ios"]))'
}
fetches0=$("$INGOT" stats --json --pool "$DIR/node3" | python3 -c 'import json,sys; print(json.load(sys.stdin)["replica"]["fetches"])')
read -r ci c50 c99 cn <<<"$(cold --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/node3.sock")"
"$INGOT" stats --json --pool "$DIR/node3" | python3 -c '
import json, sys
r = json.load(sys.stdin)["replica"]
f = r["fetches"] - '"$fetches0"'
print("cold reads: %d reads, %d range reads of the store during them (%.0f%% of reads; the open made %d); %.0f MiB fetched; %.0f MiB still cold of %.0f" % ('"$cn"', f, 100 * f / max(1, '"$cn"'), '"$fetches0"', r["fetched_bytes"] / 2**20, r["cold_bytes"] / 2**20, '"$cold_before"' / 2**20))' >&2
kill -INT "$P3"
rados -p ingot bench 10 write -b 4K -t 32 --no-cleanup --run-name "$NAME-rand" >/dev/null 2>&1
rb=$(rados -p ingot bench "$SECS" rand -t 32 --run-name "$NAME-rand" 2>/dev/null |
  awk '/^Average IOPS/ {i=$3} /^Average Latency/ {a=$3} /^Max latency/ {m=$3} END {printf "%s %.2f %.2f", i, a * 1000, m * 1000}')
rados -p ingot cleanup --run-name "$NAME-rand" >/dev/null 2>&1 || true
read -r ri ra rm_ <<<"$rb"
echo "cold 4k randread QD32 over NBD: ingot $ci IOPS, p50 $c50 ms, p99 $c99 ms; rados bench rand (4 KiB objects, 32 in flight): $ri IOPS, mean $ra ms, max $rm_ ms"

step "5. a local cache of 256 MiB (a RAM cache of 64 MiB): node 3 again, ingest, random reads over 4 GiB"
P3=$(serve "$DIR/node3" "$DIR/node3.sock" --local-cache 256M --cache-size 64M); PIDS+=("$P3")
rstat() { "$INGOT" stats --json --pool "$DIR/node3" | python3 -c "import json,sys; print(json.load(sys.stdin)['replica']['$1'])"; }
# What phase 4 fetched is dropped first.
for _ in $(seq 300); do [ "$(rstat local_bytes)" -gt 0 ] && [ "$(rstat local_bytes)" -le $((256 << 20)) ] && break; sleep 0.2; done
peak_file=$DIR/peak
echo 0 >"$peak_file"
( peak=0; while kill -0 "$P3" 2>/dev/null; do
    b=$(du -B1 -s "$DIR/node3" 2>/dev/null | cut -f1); [ "${b:-0}" -gt "$peak" ] && peak=$b && echo "$peak" >"$peak_file"
    sleep 0.2; done ) &
WATCH=$!
cache_bw=$(ingest "$DIR/node3.sock")
f0=$(rstat fetches)
read -r ki k50 k99 kn <<<"$(cold --ioengine=nbd --uri="nbd+unix:///v?socket=$DIR/node3.sock" --size=4G)"
f1=$(rstat fetches)
ev=$(rstat evicted_bytes)
kill "$WATCH" 2>/dev/null || true
kill -INT "$P3"; wait "$P3" 2>/dev/null || true
echo "local cache 256 MiB: ingest $cache_bw MB/s (on the store without a cache: $ingot_bw), the directory held at most $(( $(cat "$peak_file") >> 20 )) MiB meanwhile; $(( ev >> 20 )) MiB dropped since start; 4k randread QD32 over 4 GiB: $ki IOPS, p50 $k50 ms, p99 $k99 ms, $((f1 - f0)) range reads of the store for $kn reads"
