#!/usr/bin/env bash
# 4k random reads and writes at QD32 over iSCSI: `ingot serve --iscsi` against tgt (tgtd serving
# a raw file in the same directory), in one run, with the same clients:
#   - iscsi-perf (libiscsi-bin; reads only), 4k random reads, 32 requests in flight;
#   - fio's libiscsi engine (FIO_ISCSI: a fio built with `./configure --enable-libiscsi`, see
#     docs/benchmarks.md; Debian's fio lacks the engine), 4k random reads and writes, QD32;
#   - the pipelined raw initiator of tests/examples/iscsi_load.rs, 4k random reads and writes, QD32.
#     It reads responses in large buffered reads and sends the commands replacing a batch of
#     responses in one write, as a kernel initiator would; ISCSI_LOAD_BATCH=0 makes it read each
#     PDU and write each command with its own system calls (figures before 26 Nov 2026, 08:00).
# Both stores first get the same 1 GiB of random data (so reads hit stored blocks, not holes).
# Usage: bench/scripts/iscsi-vs-tgt.sh [DIR] [SECONDS]     (run as root: tgtd needs it)
set -euo pipefail
DIR=${1:-/tmp/ingot-iscsi-bench}
SECS=${2:-15}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
INGOT=${INGOT_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ingot}
FIO_ISCSI=${FIO_ISCSI:-fio}
"$FIO_ISCSI" --enghelp 2>/dev/null | grep -qx '[[:space:]]*libiscsi' || {
  echo "$FIO_ISCSI has no libiscsi engine: build fio with ./configure --enable-libiscsi" \
    "(apt-get install libiscsi-dev) and set FIO_ISCSI" >&2
  exit 1
}
for t in iscsi-perf tgtd tgtadm nbdcopy "$INGOT"; do
  command -v "$t" >/dev/null || {
    echo "missing: $t (apt-get install libiscsi-bin tgt libnbd-bin; cargo build --release)" >&2
    exit 1
  }
done
IPORT=${IPORT:-3290}
TPORT=${TPORT:-3291}
TCTL=${TCTL:-17}
mkdir -p "$DIR"; rm -rf "$DIR/pool" "$DIR"/*.sock "$DIR/raw.img"
SIZE_MB=1024
BLOCKS=$((SIZE_MB * 2048))

echo "building the load generator" >&2
(cd "$ROOT" && cargo build --release -p ingot-tests --example iscsi_load >/dev/null 2>&1)

perf() { # url -> IOPS
  iscsi-perf -m 32 -b 8 -r -t "$SECS" "$1" 2>&1 | tr '\r' '\n' |
    sed -n 's/.*iops average \([0-9]*\) (\([0-9]*\) MB\/s) *$/\1/p' | tail -1
}
load() { # port target lun mode -> "IOPS p50 p99"
  (cd "$ROOT" && ISCSI_LOAD_PORT=$1 ISCSI_LOAD_TARGET=$2 ISCSI_LOAD_LUN=$3 ISCSI_LOAD_MODE=$4 \
    ISCSI_LOAD_QD=32 ISCSI_LOAD_SECS=$SECS ISCSI_LOAD_BLOCKS=$BLOCKS \
    cargo run --release -p ingot-tests --example iscsi_load 2>/dev/null) |
    sed -n 's/^iscsi-load .*: \([0-9]*\) IOPS, .* p50 \([0-9]*\) us, p99 \([0-9]*\) us.*/\1 \2 \3/p'
}

fioi() { # port target lun rw -> "IOPS p50 p99"
  "$FIO_ISCSI" --name=x --ioengine=libiscsi --filename="iscsi\\://127.0.0.1\\:$1/${2//:/\\:}/$3" \
    --rw="$4" --bs=4k --iodepth=32 --runtime="$SECS" --time_based --size=${SIZE_MB}M \
    --output-format=json 2>/dev/null | sed -n '/^{/,$p' | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
r = j["read"] if j["read"]["io_bytes"] > j["write"]["io_bytes"] else j["write"]
p = r["clat_ns"]["percentile"]
print("%.0f %.0f %.0f" % (r["iops"], p["50.000000"] / 1000, p["99.000000"] / 1000))'
}

head -c ${SIZE_MB}M /dev/urandom >"$DIR/data.img"

IPID= TPID=
cleanup() {
  [ -n "$IPID" ] && kill -INT "$IPID" 2>/dev/null
  [ -n "$TPID" ] && kill -9 "$TPID" 2>/dev/null
  wait 2>/dev/null || true
}
trap cleanup EXIT

declare -A R
echo "ingot: starting" >&2
"$INGOT" pool create --pool "$DIR/pool" --size "${POOL_SIZE:-8G}" --prefill >/dev/null 2>&1
"$INGOT" volume create vol0 --size ${SIZE_MB}M --pool "$DIR/pool" >/dev/null
"$INGOT" serve --pool "$DIR/pool" --nbd "unix:$DIR/ingot.sock" --iscsi "127.0.0.1:$IPORT" \
  >"$DIR/ingot.log" 2>&1 &
IPID=$!
for _ in $(seq 100); do [ -S "$DIR/ingot.sock" ] && break; sleep 0.1; done
nbdcopy "$DIR/data.img" "nbd+unix:///vol0?socket=$DIR/ingot.sock"
IT=iqn.2026-11.io.ingot:vol0
R[ingot_perf]=$(perf "iscsi://127.0.0.1:$IPORT/$IT/0")
R[ingot_fr]=$(fioi $IPORT $IT 0 randread)
R[ingot_fw]=$(fioi $IPORT $IT 0 randwrite)
R[ingot_rr]=$(load $IPORT $IT 0 read)
R[ingot_rw]=$(load $IPORT $IT 0 write)
kill -INT $IPID; wait $IPID || true; IPID=

echo "tgt: starting" >&2
cp "$DIR/data.img" "$DIR/raw.img"
tgtd -f -C $TCTL --iscsi "portal=127.0.0.1:$TPORT" >"$DIR/tgtd.log" 2>&1 &
TPID=$!
sleep 1
TT=iqn.2026-11.bench:tgt
tgtadm -C $TCTL --lld iscsi --op new --mode target --tid 1 -T $TT
tgtadm -C $TCTL --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$DIR/raw.img"
tgtadm -C $TCTL --lld iscsi --op bind --mode target --tid 1 -I ALL
R[tgt_perf]=$(perf "iscsi://127.0.0.1:$TPORT/$TT/1")
R[tgt_fr]=$(fioi $TPORT $TT 1 randread)
R[tgt_fw]=$(fioi $TPORT $TT 1 randwrite)
R[tgt_rr]=$(load $TPORT $TT 1 read)
R[tgt_rw]=$(load $TPORT $TT 1 write)
kill -9 $TPID; wait $TPID 2>/dev/null || true; TPID=  # tgtd ignores SIGTERM while it has targets
rm -rf "$DIR/pool" "$DIR/raw.img" "$DIR/data.img"

printf '%-34s %12s %12s %8s\n' job ingot_iops tgt_iops ratio
ratio() { python3 -c "print('%.2fx' % ($1/$2))"; }
printf '%-34s %12s %12s %8s\n' "iscsi-perf 4k randread QD32" "${R[ingot_perf]}" "${R[tgt_perf]}" \
  "$(ratio "${R[ingot_perf]}" "${R[tgt_perf]}")"
for j in fr:'fio libiscsi 4k randread QD32' fw:'fio libiscsi 4k randwrite QD32' \
  rr:'raw initiator 4k randread QD32' rw:'raw initiator 4k randwrite QD32'; do
  k=${j%%:*}; name=${j#*:}
  read -r ii ip50 ip99 <<<"${R[ingot_$k]}"; read -r ti tp50 tp99 <<<"${R[tgt_$k]}"
  printf '%-34s %12s %12s %8s   (p50/p99 us: ingot %s/%s, tgt %s/%s)\n' "$name" "$ii" "$ti" \
    "$(ratio "$ii" "$ti")" "$ip50" "$ip99" "$tp50" "$tp99"
done
