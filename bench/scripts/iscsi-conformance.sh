#!/usr/bin/env bash
# Run libiscsi's iscsi-test-cu over the whole ALL family against one iSCSI URL, one suite per
# process (results of a single whole run depend on test order), and print per-suite and total
# passed/failed/skipped. CUnit counts skips as passes, so skips are read from `[SKIPPED]` lines.
#
#   bench/scripts/iscsi-conformance.sh iscsi://127.0.0.1:3260/iqn.2026-11.io.ingot:vol0/0 [LOGDIR]
#
# With MULTIPATH=1 the URL is passed twice, so the MultipathIO suite runs over two sessions to
# the same logical unit instead of skipping.
set -uo pipefail
url=${1:?usage: $0 ISCSI_URL [LOGDIR]}
logdir=${2:-$(mktemp -d)}
urls=("$url")
[ "${MULTIPATH:-0}" = 1 ] && urls+=("$url")
mkdir -p "$logdir"
suites=$(iscsi-test-cu -l | grep -E '^ALL\.[A-Za-z0-9_]+$')
tp=0 tf=0 ts=0
for s in $suites; do
  log="$logdir/$s.log"
  timeout 300 stdbuf -o0 -e0 iscsi-test-cu -d -v --test="$s" "${urls[@]}" >"$log" 2>&1
  rc=$?
  run=$(grep -E '^ +tests +[0-9]+' "$log" | awk '{print $3}')
  failed=$(grep -E '^ +tests +[0-9]+' "$log" | awk '{print $5}')
  # A test is skipped when any [SKIPPED] line appears in its output (some print two).
  skipped=$(awk '/^  Test: /{if(t&&s)n++; t=1; s=0} /\[SKIPPED\]/{s=1} END{if(t&&s)n++; print n+0}' "$log")
  run=${run:-0} failed=${failed:-0}
  if [ "$run" = 0 ] && [ "$rc" != 0 ]; then failed=$((failed + 1)); fi
  passed=$((run - failed - skipped))
  printf '%-32s passed %3d failed %3d skipped %3d (rc %d)\n' "$s" "$passed" "$failed" "$skipped" "$rc"
  tp=$((tp + passed)) tf=$((tf + failed)) ts=$((ts + skipped))
done
echo "iscsi-test-cu: $tp passed, $tf failed, $ts skipped (logs in $logdir)"
