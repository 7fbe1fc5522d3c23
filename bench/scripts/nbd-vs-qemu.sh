#!/usr/bin/env bash
# 4k random writes QD32 and 1M sequential writes QD8 over NBD (fio's nbd engine, unix socket):
# ingot against `qemu-nbd --cache=none --aio=io_uring` serving a raw file in the same directory,
# in one run. Usage: bench/scripts/nbd-vs-qemu.sh [DIR] [SECONDS]
set -euo pipefail
DIR=${1:-/tmp/ingot-nbd-bench}
SECS=${2:-15}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
INGOT=${INGOT_BIN:-$ROOT/target/release/ingot}
for t in fio qemu-nbd "$INGOT"; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install fio qemu-utils; cargo build --release)" >&2; exit 1; }
done
mkdir -p "$DIR"; rm -rf "$DIR/pool" "$DIR"/*.sock "$DIR/raw.img"
SIZE=4G

fio_run() { # uri rw bs qd
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size=$SIZE \
      --runtime="$SECS" --time_based --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' |
    python3 -c 'import json,sys; w=json.load(sys.stdin)["jobs"][0]["write"]; print("%.0f %.0f" % (w["iops"], w["bw_bytes"]/1e6))'
}

declare -A R
echo "ingot: starting" >&2
# Both stores start on written blocks (as a block device or a laid-out file would): the ingot
# pool is prefilled, the raw file is written with zeroes.
"$INGOT" pool create --pool "$DIR/pool" --size 12G --prefill >/dev/null 2>&1
"$INGOT" volume create vol0 --size $SIZE --pool "$DIR/pool" >/dev/null
"$INGOT" serve --pool "$DIR/pool" --nbd "unix:$DIR/ingot.sock" >"$DIR/ingot.log" 2>&1 &
IPID=$!
for _ in $(seq 50); do [ -S "$DIR/ingot.sock" ] && break; sleep 0.1; done
R[ingot_rw]=$(fio_run "nbd+unix:///vol0?socket=$DIR/ingot.sock" randwrite 4k 32)
R[ingot_sw]=$(fio_run "nbd+unix:///vol0?socket=$DIR/ingot.sock" write 1M 8)
kill -INT $IPID; wait $IPID || true

echo "qemu-nbd: starting" >&2
dd if=/dev/zero of="$DIR/raw.img" bs=8M count=512 oflag=direct status=none
qemu-nbd -f raw --cache=none --aio=io_uring -x vol0 -k "$DIR/qemu.sock" -t "$DIR/raw.img" &
QPID=$!
for _ in $(seq 50); do [ -S "$DIR/qemu.sock" ] && break; sleep 0.1; done
R[qemu_rw]=$(fio_run "nbd+unix:///vol0?socket=$DIR/qemu.sock" randwrite 4k 32)
R[qemu_sw]=$(fio_run "nbd+unix:///vol0?socket=$DIR/qemu.sock" write 1M 8)
kill $QPID; wait $QPID 2>/dev/null || true
rm -rf "$DIR/pool" "$DIR/raw.img"

printf '%-22s %10s %10s %10s %10s %8s\n' job ingot_iops MB/s qemu_iops MB/s ratio
for j in rw:'4k randwrite QD32' sw:'1M write QD8'; do
  k=${j%%:*}; name=${j#*:}
  read -r ii im <<<"${R[ingot_$k]}"; read -r qi qm <<<"${R[qemu_$k]}"
  printf '%-22s %10s %10s %10s %10s %7.2fx\n' "$name" "$ii" "$im" "$qi" "$qm" "$(python3 -c "print($ii/$qi)")"
done
