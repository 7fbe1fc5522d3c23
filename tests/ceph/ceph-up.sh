#!/usr/bin/env bash
# A single-node Ceph cluster for ingot's tests and benchmarks: one monitor, one OSD on a
# BlueStore file, a RADOS pool `ingot` of size 1, on loopback (ports 3300, 6789, 6800-7300).
# Usage: tests/ceph/ceph-up.sh DIR    (prints CEPH_CONF=DIR/ceph.conf when it is usable)
# Stop it with tests/ceph/ceph-down.sh DIR (by PID files). Needs ceph-mon, ceph-osd, uuidgen.
# Env: WITH_MGR=1 also starts a manager (for `ceph -s` PG stats; RADOS works without it),
#      OSD_BYTES (default 8 GiB, sparse).
set -euo pipefail
DIR=${1:?usage: ceph-up.sh DIR}
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
MON_ADDR="[v2:127.0.0.1:3300,v1:127.0.0.1:6789]"
t0=$SECONDS
say() { echo "[ceph-up +$((SECONDS - t0))s] $*"; }
# Half-started daemons must not outlive a failed start.
trap 'rc=$?; [ $rc -eq 0 ] || { say "failed (rc $rc): stopping"; "$(dirname "$0")/ceph-down.sh" "$DIR" keep; }' EXIT

rm -rf "${DIR:?}"/{run,log,mon,osd,*.keyring,ceph.conf,monmap}
mkdir -p "$DIR"/{run,log,mon/a,osd}
FSID=$(uuidgen)
CONF=$DIR/ceph.conf
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon initial members = a
mon host = $MON_ADDR
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.\$pid.asok
log file = $DIR/log/\$name.log
keyring = $DIR/\$name.keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
osd memory target = 1073741824
bluestore cache autotune = false
bluestore cache size = 268435456
osd op num shards = 2
osd op num threads per shard = 1
ms async op threads = 1
[mon.a]
mon data = $DIR/mon/a
keyring = $DIR/mon/a/keyring
[mgr]
mgr data = $DIR/mgr/\$id
keyring = $DIR/mgr/\$id/keyring
[osd]
osd data = $DIR/osd/\$id
keyring = $DIR/osd/\$id/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = ${OSD_BYTES:-8589934592}
bluestore fsck on mkfs = false
EOF
C=(ceph -c "$CONF" --connect-timeout 30)

ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
chmod 600 "$DIR"/*.keyring
ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/client.admin.keyring" >/dev/null
monmaptool --create --addv a "$MON_ADDR" --fsid "$FSID" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" 2>/dev/null
ceph-mon -c "$CONF" -i a
say "monitor started"
"${C[@]}" mon enable-msgr2 >/dev/null 2>&1 || true
"${C[@]}" config set mon auth_allow_insecure_global_id_reclaim false >/dev/null 2>&1 || true

if [ "${WITH_MGR:-0}" = 1 ]; then
  mkdir -p "$DIR/mgr/x"
  "${C[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' -o "$DIR/mgr/x/keyring"
  ceph-mgr -c "$CONF" -i x --keyring "$DIR/mgr/x/keyring"
  say "manager started"
fi

U=$(uuidgen)
ID=$("${C[@]}" osd new "$U")
mkdir -p "$DIR/osd/$ID"
ceph-osd -c "$CONF" -i "$ID" --no-mon-config --mkfs --mkkey --osd-uuid "$U" \
  >"$DIR/log/osd.$ID.mkfs.log" 2>&1 || { cat "$DIR/log/osd.$ID.mkfs.log" >&2; exit 1; }
"${C[@]}" auth add "osd.$ID" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
  -i "$DIR/osd/$ID/keyring" >/dev/null 2>&1
ceph-osd -c "$CONF" -i "$ID" --keyring "$DIR/osd/$ID/keyring"
up=0
for _ in $(seq 120); do
  up=$("${C[@]}" osd stat -f json | python3 -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])')
  [ "$up" = 1 ] && break
  sleep 0.5
done
[ "$up" = 1 ] || { echo "the OSD did not come up" >&2; exit 1; }
say "OSD up"

"${C[@]}" osd pool create ingot 8 8 >/dev/null 2>&1
"${C[@]}" osd pool application enable ingot rados >/dev/null 2>&1
head -c 65536 /dev/urandom >"$DIR/smoke.in"
rados -c "$CONF" -p ingot put smoke "$DIR/smoke.in"
rados -c "$CONF" -p ingot get smoke "$DIR/smoke.out"
cmp "$DIR/smoke.in" "$DIR/smoke.out"
rados -c "$CONF" -p ingot rm smoke
rm -f "$DIR/smoke.in" "$DIR/smoke.out"
say "pool ingot usable"
echo "CEPH_CONF=$CONF"
