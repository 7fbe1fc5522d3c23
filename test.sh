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
  [mount]=mount [tar]=tar
  [iscsi-inq]=libiscsi-bin [iscsi-ls]=libiscsi-bin [iscsi-test-cu]=libiscsi-bin
  [iscsi-readcapacity16]=libiscsi-bin
  [pgbench]=postgresql-contrib [/usr/lib/postgresql/15/bin/initdb]=postgresql
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

step "cargo test --release --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
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
