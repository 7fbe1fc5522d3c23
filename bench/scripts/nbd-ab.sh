#!/usr/bin/env bash
# Same-session A/B of ingot binaries over NBD: runs fio's nbd engine against each binary in turn,
# ROUNDS times (alternating, so load from other processes hits every binary alike), and prints
# per run the IOPS, MB/s, the server's CPU per I/O (all threads), fio's CPU per I/O and the
# CPU per I/O of the connection threads (reader + writer; they have exited when the job ends, so
# this is the server's total less the threads still alive).
#
#   bench/scripts/nbd-ab.sh DIR ROUNDS JOB CONNS SECONDS BIN...
#   JOB: rw4k (4k randwrite QD32) | rr4k (4k randread QD32) | sw1m (1M write QD8) |
#        rr1m (1M read QD8) | fill (write every block once with 1M writes)
#   env: POOL_SIZE (default 6G), VOL_MIB (default 2048), WARM=1 (read the volume once with 1M
#        reads before the measured job, so that the block cache holds it)
#
# The pool (DIR/pool, created by the first binary, prefilled) and its volume vol0 are kept
# between runs: run `fill` once first so that reads hit written blocks. Every run starts a
# fresh `ingot serve` (cold cache). Delete DIR afterwards.
set -euo pipefail
[ $# -ge 6 ] || { sed -n '2,16p' "$0"; exit 2; }
DIR=$1; ROUNDS=$2; JOB=$3; CONNS=$4; SECS=$5; shift 5
POOL_SIZE=${POOL_SIZE:-6G}; VOL_MIB=${VOL_MIB:-2048}
TCK=$(getconf CLK_TCK)
mkdir -p "$DIR"

one() { # BIN
  local bin=$1 sock="$DIR/s.sock"
  if [ ! -d "$DIR/pool" ]; then
    "$bin" pool create --pool "$DIR/pool" --size "$POOL_SIZE" --prefill >/dev/null
    "$bin" volume create vol0 --size "${VOL_MIB}M" --pool "$DIR/pool" >/dev/null
  fi
  rm -f "$sock"
  "$bin" serve --pool "$DIR/pool" --nbd "unix:$sock" >"$DIR/serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  # CPU ticks per thread name (shards summed), and of the whole process.
  threads() { for f in /proc/$pid/task/*/stat; do
      sed -E 's/^[0-9]+ \(([^)]*)\) /\1 /; s/ingot-shard-[0-9]+/shard/' "$f" 2>/dev/null
    done | awk '{c[$1]+=$13+$14} END{for(k in c) printf "%s=%d,", k, c[k]}'; }
  total() { awk '{print $14+$15}' /proc/$pid/stat; }
  local rw bs qd extra=(--time_based --runtime="$SECS" --ramp_time=1)
  case $JOB in
    fill) rw=write; bs=1M; qd=8; extra=() ;;
    rw4k) rw=randwrite; bs=4k; qd=32 ;;
    rr4k) rw=randread; bs=4k; qd=32 ;;
    sw1m) rw=write; bs=1M; qd=8 ;;
    rr1m) rw=read; bs=1M; qd=8 ;;
    *) echo "unknown job $JOB" >&2; kill "$pid"; exit 2 ;;
  esac
  local c0 t0 c1 t1 out
  if [ -n "${WARM:-}" ]; then
    fio --ioengine=nbd --uri="nbd+unix:///vol0?socket=$sock" --rw=read --bs=1M --iodepth=8 \
      --size="${VOL_MIB}M" --name=warm >/dev/null 2>&1
  fi
  c0=$(total); t0=$(threads)
  out=$(fio --ioengine=nbd --uri="nbd+unix:///vol0?socket=$sock" --rw=$rw --bs=$bs --iodepth=$qd \
    --numjobs="$CONNS" --size=$((VOL_MIB / CONNS))M --offset_increment=$((VOL_MIB / CONNS))M \
    --group_reporting --name=ab --output-format=json "${extra[@]}" 2>/dev/null | sed -n '/^{/,$p')
  c1=$(total); t1=$(threads)
  kill "$pid"; wait "$pid" || true
  printf '%s ' "$(basename "$bin")"
  echo "$out" | /usr/bin/python3 -c "
import json, sys
j = json.load(sys.stdin)['jobs'][0]
r = j['read'] if j['read']['io_bytes'] > j['write']['io_bytes'] else j['write']
ios = max(r['total_ios'], 1)
per = lambda ticks: ticks / $TCK * 1e6 / ios
parse = lambda t: {k: int(v) for k, v in (kv.split('=') for kv in t.split(',') if kv)}
a, b = parse('$t0'), parse('$t1')
alive = {k: per(b[k] - a.get(k, 0)) for k in b}
srv = per($c1 - $c0)
fio = (j['usr_cpu'] + j['sys_cpu']) / 100 * j['job_runtime'] / 1000 * $CONNS * 1e6 / ios
print('$JOB conns=$CONNS iops=%.0f MB/s=%.0f server_us_per_io=%.1f connection_us_per_io=%.1f '
      'shards_us_per_io=%.1f fio_us_per_io=%.1f fio_ctx=%d'
      % (r['iops'], r['bw_bytes'] / 1e6, srv, srv - sum(alive.values()), alive.get('shard', 0),
         fio, j['ctx']))"
}

for _ in $(seq "$ROUNDS"); do
  for b in "$@"; do one "$b"; done
done
