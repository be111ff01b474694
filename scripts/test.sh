#!/usr/bin/env bash
# Runs the whole Trellis test suite. Works on a fresh Debian machine: installs
# PostgreSQL/Redis server binaries and grpcurl when missing, then runs every
# test against real servers — private ones it starts itself, unless
# TRELLIS_TEST_DATABASE_URL / TRELLIS_TEST_REDIS_URL point at running ones.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh test
exec cargo test --workspace --locked "$@"
