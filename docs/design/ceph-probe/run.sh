#!/usr/bin/env bash
# Whole Ceph fencing probe: up -> RADOS probes -> perf -> bench -> S3 probes -> down.
# Usage: run.sh [WORKDIR]   (needs: ceph-mon ceph-osd ceph-mgr radosgw python3-rados uuid-runtime bc curl)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# The single-node cluster scripts measured on this machine kind (see docs/design/ceph-fencing.md).
SCRIPTS=${CEPH_SCRIPTS:-$HERE/../../../../shared/examples}
W=${1:-/tmp/ceph-probe}; D=$W/cluster; OUT=$W/out; mkdir -p "$OUT"
export CEPH_CONF=$D/ceph.conf
down() { bash "$SCRIPTS/ceph-down.sh" "$D"; echo "left running: $(pgrep -a 'ceph-|radosgw' | wc -l)"; }
trap down EXIT
t0=$(date +%s.%N)
bash "$SCRIPTS/ceph-up.sh" "$D" 2>&1 | grep -v -e asok -e '^$' | tee "$OUT/up.log" || exit 1
echo "up in $(echo "$(date +%s.%N) - $t0" | bc) s" | tee -a "$OUT/up.log"
pids=$(cat "$D"/run/*.pid | tr '\n' ',' | sed 's/,$//')
ps -o pid,rss,time,comm -p "$pids" | tee "$OUT/rss-idle.txt"
q() { ceph "$@" 2>&1 | grep -v asok; }
q osd pool create ingot 8 8; q osd pool set ingot size 1 --yes-i-really-mean-it; q osd pool application enable ingot rados
PY=/usr/bin/python3   # Debian's python3-rados is built for the system python
cd "$HERE"
timeout 300 $PY probe_rados.py ingot 2>&1 | grep -v asok | tee "$OUT/rados.out"
timeout 200 $PY probe_blocklist.py ingot 2>&1 | grep -v -e asok -e 'rados.pyx' -e Traceback -e RadosStateError -e 'Exception ignored' | tee "$OUT/blocklist.out"
timeout 300 $PY probe_perf.py ingot 2>&1 | grep -v asok | tee "$OUT/perf.out"
# rados bench: BOUNDED by --max-objects (an unbounded 15 s 8M/t16 run filled the 10 GiB
# BlueStore file and the OSD aborted with ENOSPC)
B() { echo "--- rados bench $*"; timeout 90 rados -p ingot bench "$@" 2>&1 | grep -E 'Total (time|reads|writes)|Bandwidth \(MB|Average IOPS|Average Latency|Max latency|Min latency'; }
{ B 10 write -b 8M -t 16 --max-objects 200 --no-cleanup
  ps -o pid,rss,time,comm -p "$pids"
  B 5 rand -t 16
  B 5 write -b 8M -t 1 --max-objects 60 --run-name big1
  B 5 write -b 4096 -t 16 --max-objects 50000 --no-cleanup --run-name small
  B 5 rand -t 16 --run-name small
  B 3 write -b 4096 -t 1 --max-objects 50000 --run-name small1; } 2>&1 | tee "$OUT/bench.out"
timeout 300 bash probe_s3.sh segs 2>&1 | tee "$OUT/s3.out"
timeout 600 bash probe_s3_race.sh segs 2>&1 | tee "$OUT/s3race.out"
grep -h 'http_status=500' "$D/log/client.rgw.a.log" | grep -o 'op status=[-0-9]* http_status=500' | sort | uniq -c | tee "$OUT/rgw-500.txt"
ps -o pid,rss,time,comm -p "$pids" | tee "$OUT/rss-end.txt"
echo "total wall $(echo "$(date +%s.%N) - $t0" | bc) s"
