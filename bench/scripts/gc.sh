#!/usr/bin/env bash
# Cleaner benchmark: sustained 4k random-overwrite IOPS and write amplification of a pool filled
# to 10% ("empty"), 50%, 80% and 90% of its usable capacity, with uniform and skewed
# (zipf:1.2) overwrites; then the p99 latency of 4k reads with the cleaner idle, during an
# `ingot gc` pass, during overwrites that keep the cleaner busy, and during the same overwrites of
# a pool at 10% full (the cleaner idle: what the writes alone cost the reads).
#
# Each point: a fresh pool of POOL_SIZE, one volume of FILL% of `usable_bytes` (no dedup, no
# compression: fio's buffers would not reduce anyway), written sequentially, overwritten at
# random for WARMUP x its size (steady state: every segment has been cleaned at least once),
# then measured for SECONDS. WA = device bytes / client bytes over the measured window, from
# `ingot stats --json` (checkpoints and record headers included). The greedy bound 1/(1-u)
# uses u = FILL% (live share of the usable capacity).
#
# Usage: bench/scripts/gc.sh [DIR] [SECONDS] [POOL_SIZE] [WARMUP]
# (GC_FILLS="80 90", GC_DISTS=zipf:1.2 and GC_NO_LATENCY=1 run a subset; GC_SERVE_ARGS adds
# options to `ingot serve`, e.g. "--cache-size 64M" for a block cache far smaller than the pool)
# Output: a table on stdout and DIR/gc.json.
set -euo pipefail
DIR=${1:-/tmp/ingot-gc-bench}
SECS=${2:-20}
POOL_SIZE=${3:-2G}
WARMUP=${4:-1}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
INGOT=${INGOT_BIN:-$ROOT/target/release/ingot}
for t in fio python3 "$INGOT"; do
  command -v "$t" >/dev/null || {
    echo "missing: $t (apt-get install fio python3; cargo build --release)" >&2
    exit 1
  }
done
GC_SERVE_ENV=${GC_SERVE_ENV:-env}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
IPID=
stop_server() {
  if [ -n "$IPID" ]; then
    kill -INT "$IPID" 2>/dev/null || true
    wait "$IPID" 2>/dev/null || true
    IPID=
  fi
}
trap stop_server EXIT
step() { printf '== %s\n' "$*" >&2; }
URI="nbd+unix:///v?socket=$DIR/ingot.sock"
stat() { "$INGOT" stats --json --pool "$DIR/pool" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

start_pool() { # volume size in percent of usable
  stop_server
  rm -rf "$DIR/pool" "$DIR/ingot.sock"
  # shellcheck disable=SC2086  # GC_CREATE_ARGS is a list of words
  "$INGOT" pool create --pool "$DIR/pool" --size "$POOL_SIZE" ${GC_CREATE_ARGS:-} >/dev/null
  # shellcheck disable=SC2086  # GC_SERVE_ARGS is a list of words
  $GC_SERVE_ENV "$INGOT" serve --pool "$DIR/pool" --nbd "unix:$DIR/ingot.sock" ${GC_SERVE_ARGS:-} \
    >"$DIR/ingot.log" 2>&1 &
  IPID=$!
  for _ in $(seq 100); do [ -S "$DIR/ingot.sock" ] && break; sleep 0.1; done
  local usable
  usable=$(stat usable_bytes)
  VOL_BYTES=$((usable * $1 / 100 / 1048576 * 1048576))
  "$INGOT" volume create v --size "$VOL_BYTES" --dedup off --compression off --pool "$DIR/pool" >/dev/null
  fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size=100% \
    >/dev/null 2>&1
}

# fio 4k randwrite QD32 for SECONDS (or io_size with $2) -> prints "iops"
overwrite() { # distribution [io_size]
  local limit=(--runtime="$SECS" --time_based)
  [ -n "${2:-}" ] && limit=(--io_size="$2")
  fio --name=ow --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size=100% \
    --random_distribution="$1" --norandommap --randrepeat=0 "${limit[@]}" --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["write"]["iops"])'
}

RESULTS="$DIR/gc.json"
echo "[" >"$RESULTS"
first=1
printf '%-8s %-9s %10s %8s %8s %8s %8s %8s\n' fill dist iops wa greedy moved/w read/w cached/w
for dist in ${GC_DISTS:-random zipf:1.2}; do
  for fill in ${GC_FILLS:-10 50 80 90}; do
    step "fill $fill% of usable, $dist overwrites"
    start_pool "$fill"
    overwrite "$dist" $((VOL_BYTES * WARMUP)) >/dev/null
    c0=$(stat client_written_bytes)
    d0=$(stat device_written_bytes)
    g0=$(stat gc_bytes_moved)
    r0=$(stat gc_bytes_read)
    k0=$(stat gc_bytes_from_cache)
    iops=$(overwrite "$dist")
    c1=$(stat client_written_bytes)
    d1=$(stat device_written_bytes)
    g1=$(stat gc_bytes_moved)
    r1=$(stat gc_bytes_read)
    k1=$(stat gc_bytes_from_cache)
    row=$(python3 - "$fill" "$dist" "$iops" "$c0" "$c1" "$d0" "$d1" "$g0" "$g1" "$r0" "$r1" "$k0" "$k1" <<'EOF'
import json, sys
fill, dist, iops = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
c0, c1, d0, d1, g0, g1, r0, r1, k0, k1 = map(int, sys.argv[4:])
cw = max(c1 - c0, 1)
wa = (d1 - d0) / cw
greedy = 1 / (1 - fill / 100)
print(json.dumps({"fill_pct": fill, "distribution": dist, "iops": iops, "write_amplification": wa,
                  "greedy_bound": greedy, "gc_moved_per_client_byte": (g1 - g0) / cw,
                  "gc_read_per_client_byte": (r1 - r0) / cw,
                  "gc_from_cache_per_client_byte": (k1 - k0) / cw}))
EOF
)
    [ $first = 1 ] || echo "," >>"$RESULTS"
    first=0
    echo "$row" >>"$RESULTS"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%-8s %-9s %10.0f %8.2f %8.2f %8.2f %8.2f %8.2f" % (str(r["fill_pct"])+"%", r["distribution"], r["iops"], r["write_amplification"], r["greedy_bound"], r["gc_moved_per_client_byte"], r["gc_read_per_client_byte"], r["gc_from_cache_per_client_byte"]))' "$row"
  done
done

if [ -n "${GC_NO_LATENCY:-}" ]; then
  echo "]" >>"$RESULTS"
  exit 0
fi
# Read latency p99 at 80% full: cleaner idle, during `ingot gc`, during overwrites.
readlat() { # -> p99 microseconds of 4k random reads at QD1 for SECONDS/2
  fio --name=rd --ioengine=nbd --uri="$URI" --rw=randread --bs=4k --iodepth=1 --size=100% \
    --runtime=$((SECS / 2)) --time_based --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print("%.0f %.0f" % (r["clat_ns"]["percentile"]["99.000000"]/1000, r["iops"]))'
}
step "read latency at 80% full"
start_pool 80
overwrite random $((VOL_BYTES * WARMUP)) >/dev/null
idle=$(readlat)
# Dead space for a manual pass: overwrite a fifth of the volume without waiting for cleaning.
overwrite random $((VOL_BYTES / 5)) >/dev/null
"$INGOT" gc --pool "$DIR/pool" --max-utilisation 0.95 >/dev/null 2>&1 &
GCPID=$!
during_gc=$(readlat)
wait $GCPID || true
overwrite random >/dev/null &
OWPID=$!
during_ow=$(readlat)
wait $OWPID || true
# The same overwrites on a pool at 10% full, where the cleaner has nothing to do: what the
# reads pay for the writes alone.
step "read latency during overwrites at 10% full (cleaner idle)"
start_pool 10
overwrite random >/dev/null &
OWPID=$!
during_ow_empty=$(readlat)
wait $OWPID || true
echo "," >>"$RESULTS"
python3 - "$idle" "$during_gc" "$during_ow" "$during_ow_empty" >>"$RESULTS" <<'EOF'
import json, sys
p = [list(map(float, a.split())) for a in sys.argv[1:]]
keys = ["cleaner_idle", "during_gc_pass", "during_overwrites", "during_overwrites_10pct_full"]
print(json.dumps({"read_p99_us": {k: v[0] for k, v in zip(keys, p)},
                  "read_iops": {k: v[1] for k, v in zip(keys, p)}}))
EOF
echo "]" >>"$RESULTS"
printf '\n4k read QD1 p99 (us) / IOPS at 80%% full: cleaner idle %s, during ingot gc %s, during overwrites %s; during overwrites at 10%% full %s\n' \
  "$idle" "$during_gc" "$during_ow" "$during_ow_empty"
stop_server
rm -rf "$DIR/pool"
