#!/usr/bin/env bash
# Runs every benchmark and prints its tables: ./benches/run.sh [--smoke]
#
# --smoke: tiny data, one run each (what the test suite runs). Without it: TPC-H SF1, the
# throughput and concurrency runs on SF1's lineitem, pruning at 1x/4x/16x, and the mmap/pread
# comparison; about half an hour on a 2-core machine. Data is generated once into
# ~/.cache/quiver. See docs/benchmarks.md for what each one measures.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
# The whole workspace, as the tests build it (one feature set, one build of DataFusion).
cargo build --release --workspace
bin="${CARGO_TARGET_DIR:-target}/release"
quiver="$bin/quiver"

for bench in tpch throughput concurrency kept_streams pruning s3 cluster; do
  echo
  echo "== benches/$bench.py $*"
  .venv/bin/python "benches/$bench.py" --quiver "$quiver" "$@"
done

echo
echo "== io (mmap vs pread)"
# The binary the workspace build made: `cargo run -p` would resolve features for that package
# alone and rebuild DataFusion.
if [ "${1:-}" = "--smoke" ]; then
  "$bin/io" --rows 100000 --runs 1
else
  "$bin/io" --rows 3000000 --runs 7
fi

echo
echo "== send_copies (bytes allocated and copied per byte sent, both send paths)"
if [ "${1:-}" = "--smoke" ]; then
  "$bin/send_copies" --parquet ~/.cache/quiver/tpch-sf0.01/lineitem.parquet --runs 1
else
  "$bin/send_copies" --parquet ~/.cache/quiver/tpch-sf1/lineitem.parquet --runs 5
fi

echo
echo "== criterion micro-benchmarks (benches/benches/hot_paths.rs)"
if [ "${1:-}" = "--smoke" ]; then
  # criterion's test mode: every benchmark once, no timing.
  cargo bench --workspace --bench hot_paths -- --test
else
  cargo bench --workspace --bench hot_paths
fi
