#!/usr/bin/env bash
# Builds trellisd and trellis-bench in release mode and runs the full
# side-by-side benchmark: a bare tonic baseline, trellisd's no-op path over
# native gRPC and over gRPC-web, token verification, logins against the raw
# argon2 rate (with a latency probe), GetUser against a bare tokio-postgres
# handler, ListUsers page 1 against page 500 of 100,000 users, the LLM
# gateway against its fake upstream called directly, chat's time to first
# token and relay throughput at 100 streams against the same upstream called
# directly, 10,000 idle Converse streams (trellisd's RSS), Search over a
# 100,000-document corpus against trellisd's own SQL run directly, and
# IndexDocuments throughput against its upsert run directly. Arguments
# go to trellis-bench (see `scripts/bench.sh --help`: --duration,
# --concurrency, --rate, --scenario, --out, …). Results go to bench-results/
# (summary.md, summary.svg, <scenario>.json) unless --out says otherwise.
# The bench starts its own private PostgreSQL and Redis from the installed
# binaries (Debian packages postgresql and redis-server) in a temporary
# directory; it uses no running server.
set -euo pipefail
cd "$(dirname "$0")/.."

out=bench-results
prev=
for arg in "$@"; do
  case "$arg" in
    --out=*) out="${arg#--out=}" ;;
  esac
  if [ "$prev" = --out ]; then out="$arg"; fi
  prev="$arg"
done

started=$SECONDS
cargo build --release --locked -p trellisd -p trellis-bench
built=$SECONDS
echo "bench.sh: release build: $((built - started)) s" >&2
status=0
# Run the binary itself, not `cargo run`: under cargo the bench rebuilds
# trellisd first, which is redundant here.
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"$target_dir/release/trellis-bench" "$@" || status=$?
echo "bench.sh: benchmark: $((SECONDS - built)) s (exit status $status)" >&2
echo "bench.sh: summary: $out/summary.md, chart: $out/summary.svg" >&2
exit "$status"
