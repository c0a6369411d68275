#!/usr/bin/env bash
# Fails when a dependency's features differ between the builds developers and CI run:
# `cargo build` (the README's `cargo run --release`, normal dependencies only) and
# `--all-targets` (tests and benches, with dev-dependencies). Cargo unifies features per
# build, so a feature that only a dev-dependency turns on (criterion -> ciborium ->
# serde/alloc) changes that crate's hash, and everything above it (DataFusion, arrow,
# object_store: ~40 minutes here) is compiled twice and rebuilt whenever the two alternate.
set -euo pipefail
cd "$(dirname "$0")/.."
normal="$(mktemp)"
all="$(mktemp)"
trap 'rm -f "$normal" "$all"' EXIT
# Every crate of the normal build, with its features, as each build resolves them.
cargo tree --workspace --locked -e normal,build -f '{p} {f}' --prefix none \
  | sed 's/ (\*)$//; s/ (proc-macro)//' | sort -u > "$normal"
cargo tree --workspace --locked -e normal,build,dev -f '{p} {f}' --prefix none \
  | sed 's/ (\*)$//; s/ (proc-macro)//' | sort -u > "$all"
# Every crate of the normal build, with exactly those features, must be in the
# all-targets build (which may add dev-only crates).
differ="$(comm -23 "$normal" "$all")"
if [ -n "$differ" ]; then
  echo "!! features differ between cargo build and --all-targets (cargo build's side shown):"
  echo "$differ"
  exit 1
fi
echo "   one set of features for cargo build and --all-targets ($(wc -l < "$normal") crates)"

# One HTTP and TLS stack: object_store's `aws` client (reqwest) must share tonic's hyper, h2
# and rustls, and bring no second crypto provider (aws-lc-rs needs cmake, and two providers
# make rustls's implicit default panic).
# (Names that come in two versions; `-d` also prints what depends on them.)
dupes="$(cargo tree --workspace --locked -d -e normal --prefix none -f '{p}' \
  | awk '{print $1, $2}' | sort -u | awk '{print $1}' | uniq -d \
  | grep -E '^(hyper|h2|http|rustls|tonic|tokio-rustls|reqwest)$' || true)"
if [ -n "$dupes" ]; then
  echo "!! two versions of the HTTP/TLS stack:"
  echo "$dupes"
  exit 1
fi
if cargo tree --workspace --locked -e normal -i aws-lc-rs >/dev/null 2>&1; then
  echo "!! aws-lc-rs is in the build:"
  cargo tree --workspace --locked -e normal -i aws-lc-rs
  exit 1
fi
echo "   one hyper, h2, rustls and tonic; no aws-lc-rs"
