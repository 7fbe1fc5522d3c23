#!/usr/bin/env bash
# Data reduction benchmark, in one run on one directory:
#  1. write speed over NBD (fio nbd engine, unix socket) with dedup+compression on against the
#     same server with both off: 4k randwrite QD32 and 1M sequential write QD8 (fio's default,
#     incompressible buffers), and 1M sequential writes of 50%-duplicate, 60%-compressible data;
#  2. reduction of that fio data set: logical bytes against ingot's stored bytes;
#  3. a PostgreSQL data directory (pgbench -i -s SCALE) in an ext4 image, written twice into one
#     volume at different offsets (two "nightly" copies): ingot's stored bytes against the
#     logical bytes and against `qemu-img convert -c -O qcow2` of the same two copies.
# Usage: bench/scripts/reduction.sh [DIR] [SECONDS] [PGBENCH_SCALE]   (run as root: part 3
# mounts a loop device and runs PostgreSQL as the postgres user). INGOT_SERVE_ARGS adds
# options to `ingot serve` (e.g. "--dedup-index-mem 1M": copies past the index's budget).
set -euo pipefail
DIR=${1:-/tmp/ingot-reduction-bench}
SECS=${2:-15}
SCALE=${3:-50}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
INGOT=${INGOT_BIN:-$ROOT/target/release/ingot}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
for t in fio nbdcopy qemu-img mkfs.ext4 losetup "$INGOT" "$PGBIN/initdb" "$PGBIN/pg_ctl" pgbench; do
  command -v "$t" >/dev/null || {
    echo "missing: $t (apt-get install fio libnbd-bin qemu-utils e2fsprogs postgresql postgresql-contrib; cargo build --release)" >&2
    exit 1
  }
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
rm -rf "$DIR/pool" "$DIR"/*.sock
SIZE=4G
IPID=
cleanup() {
  [ -n "$IPID" ] && kill -INT "$IPID" 2>/dev/null && wait "$IPID" 2>/dev/null
  mountpoint -q "$DIR/mnt" 2>/dev/null && umount "$DIR/mnt"
  [ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null
  true
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*" >&2; }

fio_run() { # volume rw bs qd [extra fio args...]
  local vol=$1 rw=$2 bs=$3 qd=$4
  shift 4
  fio --name=b --ioengine=nbd --uri="nbd+unix:///$vol?socket=$DIR/ingot.sock" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --size=$SIZE --runtime="$SECS" --time_based --output-format=json "$@" 2>/dev/null |
    sed -n '/^{/,$p' |
    python3 -c 'import json,sys; w=json.load(sys.stdin)["jobs"][0]["write"]; print("%.0f %.0f" % (w["iops"], w["bw_bytes"]/1e6))'
}
stats() { "$INGOT" stats --json --pool "$DIR/pool"; }
vol_stat() { # volume field
  stats | python3 -c "import json,sys; s=json.load(sys.stdin); print([v for v in s['volumes'] if v['name']=='$1'][0]['$2'])"
}

step "ingot: pool and volumes (on: dedup+compression, off: neither)"
"$INGOT" pool create --pool "$DIR/pool" --size 24G --prefill >/dev/null
"$INGOT" volume create on --size $SIZE --pool "$DIR/pool" >/dev/null
"$INGOT" volume create off --size $SIZE --dedup off --compression off --pool "$DIR/pool" >/dev/null
"$INGOT" volume create mixed --size $SIZE --pool "$DIR/pool" >/dev/null
"$INGOT" volume create pg --size 16G --pool "$DIR/pool" >/dev/null
# shellcheck disable=SC2086  # INGOT_SERVE_ARGS is a list of words (e.g. --dedup-index-mem 1M)
"$INGOT" serve --pool "$DIR/pool" --nbd "unix:$DIR/ingot.sock" ${INGOT_SERVE_ARGS:-} >"$DIR/ingot.log" 2>&1 &
IPID=$!
for _ in $(seq 100); do [ -S "$DIR/ingot.sock" ] && break; sleep 0.1; done

declare -A R
for v in off on; do
  step "fio on volume $v"
  R[${v}_rw]=$(fio_run $v randwrite 4k 32)
  R[${v}_sw]=$(fio_run $v write 1M 8)
done
step "fio: 2 GiB of 1M writes of 50%-duplicate, 60%-compressible data"
MIXED=(--dedupe_percentage=50 --buffer_compress_percentage=60 --buffer_compress_chunk=4k --refill_buffers)
R[mixed_sw]=$(fio --name=mixed --ioengine=nbd --uri="nbd+unix:///mixed?socket=$DIR/ingot.sock" --rw=write \
  --bs=1M --iodepth=8 --size=2G "${MIXED[@]}" --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
  python3 -c 'import json,sys; w=json.load(sys.stdin)["jobs"][0]["write"]; print("%.0f %.0f" % (w["iops"], w["bw_bytes"]/1e6))')
mixed_logical=$(vol_stat mixed mapped_bytes)
mixed_stored=$(vol_stat mixed stored_bytes)
# The same job (same seeds, so the same bytes) into a raw file, for qemu-img's compression.
fio --name=mixed --filename="$DIR/mixed.raw" --ioengine=psync --rw=write --bs=1M --size=2G "${MIXED[@]}" \
  --output-format=terse >/dev/null 2>&1
qemu-img convert -c -O qcow2 "$DIR/mixed.raw" "$DIR/mixed.qcow2"
mixed_qcow2=$(stat -c %s "$DIR/mixed.qcow2")
rm -f "$DIR/mixed.raw" "$DIR/mixed.qcow2"

step "PostgreSQL: pgbench -i -s $SCALE into an ext4 image"
rm -rf "$DIR/mnt" "$DIR/pg.img" "$DIR/two.img" "$DIR/two.qcow2"
truncate -s 6G "$DIR/pg.img"
mkfs.ext4 -q -F "$DIR/pg.img"
mkdir -p "$DIR/mnt"
LOOP=$(losetup -f --show "$DIR/pg.img")
mount "$LOOP" "$DIR/mnt"
mkdir -p "$DIR/mnt/data" "$DIR/mnt/run"
chown postgres: "$DIR/mnt/data" "$DIR/mnt/run"
su postgres -c "$PGBIN/initdb -D $DIR/mnt/data -A trust" >/dev/null
su postgres -c "$PGBIN/pg_ctl -D $DIR/mnt/data -o \"-c listen_addresses='' -k $DIR/mnt/run\" -w start -l $DIR/mnt/run/pg.log" >/dev/null
su postgres -c "pgbench -h $DIR/mnt/run -i -s $SCALE -q postgres" >/dev/null 2>&1
su postgres -c "$PGBIN/pg_ctl -D $DIR/mnt/data -w stop" >/dev/null
umount "$DIR/mnt"
losetup -d "$LOOP"
LOOP=
# Only the blocks the file system uses count (both stores skip zero blocks).
cat "$DIR/pg.img" "$DIR/pg.img" >"$DIR/two.img"
pg_logical=$(python3 - "$DIR/two.img" <<'EOF'
import sys
n = 0
with open(sys.argv[1], 'rb') as f:
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        for i in range(0, len(b), 4096):
            if b[i:i + 4096].count(0) != 4096:
                n += 4096
print(n)
EOF
)
step "qemu-img convert -c -O qcow2 of the two copies"
qemu-img convert -c -O qcow2 "$DIR/two.img" "$DIR/two.qcow2"
qcow2_bytes=$(stat -c %s "$DIR/two.qcow2")
step "nbdcopy of the two copies into volume pg"
before=$(stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])')
nbdcopy "$DIR/two.img" "nbd+unix:///pg?socket=$DIR/ingot.sock"
pg_stored=$(vol_stat pg stored_bytes)
"$INGOT" stats --pool "$DIR/pool" >"$DIR/stats.txt"
kill -INT $IPID
wait $IPID || true
IPID=
rm -rf "$DIR/pool" "$DIR/two.img" "$DIR/pg.img"

echo
printf '%-44s %12s %12s %8s\n' "write speed (fio nbd, ${SECS}s)" "on" "off" "on/off"
for j in rw:'4k randwrite QD32 (IOPS)' sw:'1M write QD8 (MB/s)'; do
  k=${j%%:*}; name=${j#*:}
  read -r oi om <<<"${R[on_$k]}"; read -r fi fm <<<"${R[off_$k]}"
  if [ "$k" = rw ]; then a=$oi; b=$fi; else a=$om; b=$fm; fi
  printf '%-44s %12s %12s %7.2fx\n' "$name" "$a" "$b" "$(python3 -c "print($a/$b)")"
done
read -r _ mm <<<"${R[mixed_sw]}"
printf '%-44s %12s MB/s\n' "1M write QD8, 2 GiB, 50% dup, 60% compr." "$mm"
echo
printf '%-44s %14s %14s %8s\n' "reduction" "logical" "stored" "ratio"
printf '%-44s %14s %14s %7.2fx\n' "fio 50% dup, 60% compressible: ingot" "$mixed_logical" "$mixed_stored" \
  "$(python3 -c "print($mixed_logical/max($mixed_stored,1))")"
printf '%-44s %14s %14s %7.2fx\n' "fio 50% dup, 60% compressible: qcow2 -c" "$mixed_logical" "$mixed_qcow2" \
  "$(python3 -c "print($mixed_logical/max($mixed_qcow2,1))")"
printf '%-44s %14s %14s %7.2fx\n' "pgbench -s $SCALE, two copies: ingot" "$pg_logical" "$pg_stored" \
  "$(python3 -c "print($pg_logical/max($pg_stored,1))")"
printf '%-44s %14s %14s %7.2fx\n' "pgbench -s $SCALE, two copies: qcow2 -c" "$pg_logical" "$qcow2_bytes" \
  "$(python3 -c "print($pg_logical/max($qcow2_bytes,1))")"
printf '%-44s %29.2fx\n' "ingot stored / qcow2 file" "$(python3 -c "print($pg_stored/$qcow2_bytes)")"
grep '^dedup index' "$DIR/stats.txt" || true
echo "(stats of the pool at the end: $DIR/stats.txt)"
