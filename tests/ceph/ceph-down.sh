#!/usr/bin/env bash
# Stop the daemons tests/ceph/ceph-up.sh started (by their PID files, the monitor last) and
# remove DIR, unless a second argument `keep` is given.
DIR=${1:?usage: ceph-down.sh DIR [keep]}
for f in "$DIR"/run/osd.*.pid "$DIR"/run/mgr.*.pid "$DIR"/run/mon.*.pid; do
  [ -f "$f" ] || continue
  p=$(cat "$f")
  kill "$p" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$p" 2>/dev/null && kill -9 "$p"
done
[ "${2:-}" = keep ] || rm -rf "$DIR"
exit 0
