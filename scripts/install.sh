#!/usr/bin/env bash
# Builds the release binary and installs it stripped of debug info, with the debug info
# kept beside it for symbolised profiles and backtraces:
#
#   ./scripts/install.sh                 # /usr/local/bin/quiver, /usr/local/lib/debug/quiver.debug
#   ./scripts/install.sh /opt/quiver     # PREFIX/bin/quiver, PREFIX/lib/debug/quiver.debug
#
# The release profile keeps line tables (readable backtraces in tests and profiles): ~800 MB
# linked, ~170 MB without them. The container image installs with this script too.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
target_dir="${CARGO_TARGET_DIR:-target}"

# QUIVER_BIN: install this binary, already built (the tests do), instead of building.
built="${QUIVER_BIN:-}"
if [ -z "$built" ]; then
  cargo build --release --locked
  built="$target_dir/release/quiver"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The debug file first, then a copy without debug sections that names it (gdb and perf
# find it through the .gnu_debuglink section, by name, in the same directory or
# /usr/lib/debug).
objcopy --only-keep-debug "$built" "$work/quiver.debug"
objcopy --strip-debug --add-gnu-debuglink="$work/quiver.debug" "$built" "$work/quiver"
install -D -m 0755 "$work/quiver" "$prefix/bin/quiver"
install -D -m 0644 "$work/quiver.debug" "$prefix/lib/debug/quiver.debug"
echo "installed $prefix/bin/quiver ($(du -h "$prefix/bin/quiver" | cut -f1)), debug info in $prefix/lib/debug/quiver.debug"
