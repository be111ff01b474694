#!/usr/bin/env bash
# Runs the whole Trellis test suite. Works on a fresh Debian machine: installs
# PostgreSQL/Redis server binaries and grpcurl when missing, then runs every
# test against real servers — private ones it starts itself, unless
# TRELLIS_TEST_DATABASE_URL / TRELLIS_TEST_REDIS_URL point at running ones.
# Ends with one line totalling every test binary: "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
