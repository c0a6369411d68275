#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, Rust unit and integration tests, and the
# end-to-end tests (pytest with the real pyarrow.flight client against the real binary).
# Self-contained on a fresh machine: it creates .venv and installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"

echo "== Python environment (.venv)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt

# promtool checks the metrics scrape (Debian package `prometheus`).
if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing promtool (apt-get install prometheus)"
    apt-get install -y -qq prometheus >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; } \
      || echo "!! could not install prometheus: the promtool checks will be skipped"
  else
    echo "!! apt-get is unavailable (or not root): the promtool checks will be skipped"
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

echo "== cargo fmt"
cargo fmt --all -- --check
cargo fmt --manifest-path proto/codegen/Cargo.toml -- --check

# `cargo build` and `--all-targets` must resolve the same features, or DataFusion is
# compiled twice (scripts/check-features.sh says why).
echo "== one set of compiled dependencies"
./scripts/check-features.sh

# The Rust code for proto/quiver is generated and checked in: it must match the .proto files.
echo "== generated protobuf code is current"
cargo run --quiet --locked --manifest-path proto/codegen/Cargo.toml \
  --target-dir "$target_dir/codegen" -- --check

# One profile (release) for clippy's dependencies aside, tests and the end-to-end binary:
# DataFusion is expensive to build twice.
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings

echo "== cargo build (release)"
cargo build --release --workspace --all-targets

echo "== Rust tests"
cargo nextest run --release --workspace --no-fail-fast

# A bounded libFuzzer run of each target from its seeds and dictionary. These binaries are
# built with the workspace (no coverage instrumentation: that would rebuild DataFusion),
# so libFuzzer mutates blindly here; `cargo fuzz run` gives the guided run (fuzz/README.md).
# A crash fails CI and leaves its input in $fuzz_out.
echo "== fuzz targets (${QUIVER_FUZZ_SECONDS:=10}s each)"
fuzz_out="$(mktemp -d)"
for target in fuzz_ticket fuzz_flight_sql fuzz_sql fuzz_auth fuzz_do_put; do
  case "$target" in
    fuzz_sql) dict=fuzz/dicts/sql.dict ;;
    *) dict=fuzz/dicts/flight_sql.dict ;;
  esac
  mkdir -p "$fuzz_out/$target"
  cp fuzz/corpus/"$target"/* "$fuzz_out/$target/"
  "$target_dir/release/$target" "$fuzz_out/$target" -dict="$dict" \
    -max_total_time="$QUIVER_FUZZ_SECONDS" -timeout=20 -rss_limit_mb=4096 -max_len=65536 \
    -artifact_prefix="$fuzz_out/$target-" -print_final_stats=1 2>"$fuzz_out/$target.log" \
    || { echo "!! $target failed (input and log in $fuzz_out):"; tail -40 "$fuzz_out/$target.log"; exit 1; }
  grep -h "stat::number_of_executed_units" "$fuzz_out/$target.log" | sed "s/^/   $target /"
done

echo "== end-to-end tests"
QUIVER_BIN="$target_dir/release/quiver" .venv/bin/python -m pytest -q tests/e2e "$@"
