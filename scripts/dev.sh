#!/usr/bin/env bash
# Runs the whole mesh with zero configuration (`trellisd dev`): installs the
# PostgreSQL/Redis server binaries when missing, then builds and starts
# trellisd, which runs private servers with data under .trellis/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh dev
exec cargo run --release --locked -p trellisd -- dev "$@"
