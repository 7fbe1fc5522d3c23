#!/usr/bin/env bash
# Build ingot, check formatting and lints, and run every test, including the end-to-end tests that
# drive the real `ingot` binary with real NBD clients (qemu-img, nbdinfo, nbdcopy, nbdsh, fio,
# libnbd's Python module). Missing client tools are installed when run as root on Debian;
# otherwise the script stops and names them.
set -euo pipefail
cd "$(dirname "$0")"

started=$SECONDS
step() { printf '\n==> %s\n' "$*"; }

# tool -> Debian package
declare -A PKG=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin
  [nbdsh]=python3-libnbd
  [fio]=fio [nbdkit]=nbdkit [fusermount3]=fuse3
  [sha256sum]=coreutils [kill]=procps [setpriv]=util-linux
  [openssl]=openssl [mkfs.ext4]=e2fsprogs [fsck.ext4]=e2fsprogs [resize2fs]=e2fsprogs [losetup]=util-linux
  [mount]=mount [tar]=tar [groff]=groff-base [systemd-analyze]=systemd
  # packaging/build-deb.sh and tests/tests/deb.rs.
  [dpkg-deb]=dpkg [dpkg-shlibdeps]=dpkg-dev [strip]=binutils [gzip]=gzip
  [iscsi-inq]=libiscsi-bin [iscsi-ls]=libiscsi-bin [iscsi-test-cu]=libiscsi-bin
  [iscsi-readcapacity16]=libiscsi-bin
  [pgbench]=postgresql-contrib [/usr/lib/postgresql/15/bin/initdb]=postgresql
  # The fuzz step: libfuzzer-sys compiles libFuzzer (C++) with `c++`; the doc and cycle checks.
  [c++]=g++ [python3]=python3
  # A single-node Ceph cluster for the RADOS tests (tests/ceph/ceph-up.sh).
  [ceph-mon]=ceph-mon [ceph-osd]=ceph-osd [rados]=ceph-common [uuidgen]=uuid-runtime
)
missing_pkgs() {
  local t pkgs=()
  for t in "${!PKG[@]}"; do
    command -v "$t" >/dev/null 2>&1 || pkgs+=("${PKG[$t]}")
  done
  # nbdsh and the crash test need Debian's python3 with libnbd's `nbd` module.
  /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || pkgs+=(python3-libnbd)
  [ ${#pkgs[@]} -eq 0 ] || printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' '
}

step "checking client tools"
missing=$(missing_pkgs)
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $missing
    missing=$(missing_pkgs)
    [ -z "$missing" ] || { echo "still missing after apt-get install: $missing" >&2; exit 1; }
  else
    echo "missing Debian packages: $missing" >&2
    echo "install them (as root: apt-get install -y $missing) or rerun ./test.sh as root" >&2
    exit 1
  fi
fi
echo "all client tools present"

target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac

step "cargo build --release --workspace"
cargo build --release --workspace

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
# Without the tests' dev-dependencies: the engine as release builds have it (no `testing`).
cargo clippy --workspace -- -D warnings

step "docs/format.md is generated from engine/src/format/"
timed() { local t=$SECONDS; "$@"; echo "($((SECONDS - t))s)"; }
timed python3 docs/gen-format.py --check

step "no module cycles between engine subsystems"
# Dependencies between subsystems point one way (front of the pipeline to the back, policy to
# mechanism): a cycle fails the run.
cycles_args=()
[ "${INGOT_CYCLES_REPORT_ONLY:-0}" = 1 ] && cycles_args=(--report-only)
cycle_tests=$(python3 scripts/test-check-module-cycles.py 2>&1) || {
  echo "$cycle_tests" >&2
  exit 1
}
echo "check-module-cycles.py self-test: ${cycle_tests##*$'\n'}"
timed python3 scripts/check-module-cycles.py "${cycles_args[@]}"

step "fuzz targets: build (stable, no sanitizer) and smoke-run each"
# Targets and output folder from cargo itself (fuzz/ is its own workspace; CARGO_TARGET_DIR
# applies there too), so a new [[bin]] in fuzz/Cargo.toml is picked up without editing this.
fuzz_meta=$(cd fuzz && cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(m["target_directory"])
for p in m["packages"]:
    for t in p["targets"]:
        if "bin" in t["kind"]:
            print(t["name"])')
fuzz_out="$(head -n1 <<<"$fuzz_meta")/release"
mapfile -t fuzz_targets < <(tail -n +2 <<<"$fuzz_meta")
t=$SECONDS
(cd fuzz && cargo build --release --bins)
echo "(build $((SECONDS - t))s)"
fuzz_tmp=$(mktemp -d)
t=$SECONDS
for name in "${fuzz_targets[@]}"; do
  # New inputs go to the first (scratch) folder, so a checked-in corpus is only read. Without
  # coverage instrumentation libFuzzer mutates blindly: this proves each target builds, runs and
  # survives a few seconds of random input, not that it has been fuzzed.
  corpus=("$fuzz_tmp/$name")
  [ -d "fuzz/corpus/$name" ] && corpus+=("fuzz/corpus/$name")
  mkdir -p "$fuzz_tmp/$name" fuzz/artifacts/"$name"
  if ! "$fuzz_out/$name" -runs=1000000 -max_total_time=5 -timeout=10 \
    -artifact_prefix="fuzz/artifacts/$name/" "${corpus[@]}" >"$fuzz_tmp/$name.log" 2>&1; then
    tail -n 30 "$fuzz_tmp/$name.log" >&2
    echo "fuzz target $name failed; the input is in fuzz/artifacts/$name/" >&2
    rm -rf "$fuzz_tmp"
    exit 1
  fi
  done_line=$(grep -E '^Done [0-9]+ runs' "$fuzz_tmp/$name.log" || tail -n 1 "$fuzz_tmp/$name.log")
  printf '  %-20s %s\n' "$name" "$done_line"
done
rm -rf "$fuzz_tmp"
echo "(${#fuzz_targets[@]} targets, smoke runs $((SECONDS - t))s)"

step "a single-node Ceph cluster for the RADOS tests"
log=$(mktemp)
ceph_dir=$(mktemp -d "${TMPDIR:-/tmp}/ingot-ceph.XXXXXX")
# Stopped by its PID files whatever happens below.
trap 'tests/ceph/ceph-down.sh "$ceph_dir/cluster"; rm -rf "$ceph_dir" "$log"' EXIT
timed tests/ceph/ceph-up.sh "$ceph_dir/cluster"
export INGOT_CEPH_CONF="$ceph_dir/cluster/ceph.conf"

step "cargo test --release --workspace"
if INGOT_BIN="$target/release/ingot" cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log"; then
  status=0
else
  status=1
fi

echo
echo "==> summary"
awk '
  /^ +Running / {
    name = ($2 == "unittests") ? $3 : $2
    if (match($0, /deps\/[A-Za-z0-9_]+-/)) name = substr($0, RSTART + 5, RLENGTH - 6) " " name
    next
  }
  /^ +Doc-tests / { name = $2 " doc-tests"; next }
  /^test result:/ { sub(/^test result: /, ""); sub(/; [0-9]+ measured.*finished in/, "; finished in"); printf "  %-44s %s\n", name, $0 }
  /^test .* \.\.\. FAILED$/ { failed[name " :: " $2] = 1 }
  END { for (f in failed) print "  FAILED: " f }
' "$log"
elapsed=$((SECONDS - started))
if [ "$status" -eq 0 ]; then
  echo "ALL PASSED in $((elapsed / 60))m$((elapsed % 60))s"
else
  echo "TESTS FAILED after $((elapsed / 60))m$((elapsed % 60))s" >&2
fi
exit "$status"
