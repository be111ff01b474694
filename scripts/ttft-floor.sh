#!/usr/bin/env bash
# The floor under chat-ttft's overhead on this machine: what the two steps
# the contract puts in series before a chat turn's upstream call cost on
# their own, without trellisd — the turn's PostgreSQL round trip (the
# session read, the guarded insert of the user message and the STREAMING
# reply, the history read, pipelined on one connection, as chat sends them)
# and the LLM gateway's quota script in Redis (EVALSHA of the script in
# crates/llm/src/limits.rs). Also a bare round trip to each (SELECT 1, PING).
#
#   scripts/ttft-floor.sh        # PostgreSQL and Redis on 127.0.0.1 (or below)
#
# Environment: TRELLIS_FLOOR_DATABASE_URL (a database it may create another
# in; default postgres://postgres@127.0.0.1:5432/postgres),
# TRELLIS_FLOOR_REDIS_HOST / _PORT (default 127.0.0.1 / 6379). It creates
# the database trellis_floor (dropped at the end), migrates and seeds it like
# trellis-bench's chat-ttft (one member, 40,000 empty sessions, 100,000
# earlier messages in 2,000 other sessions), and uses Redis keys under
# trellis-floor: (deleted at the end). Needs psql, pgbench, redis-cli and
# redis-benchmark (Debian: postgresql-client, redis-tools).
#
# PostgreSQL figures are pgbench's per-statement means (-r) over 10 s at one
# client, synchronous_commit off (trellis-bench runs its PostgreSQL with
# durability off); Redis figures are redis-benchmark's p50 at one client.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in psql pgbench redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "ttft-floor.sh: $tool is missing (Debian: postgresql-client, redis-tools)" >&2; exit 1; }
done

export PGOPTIONS="-c client_min_messages=warning"
base_url=${TRELLIS_FLOOR_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db_url="${base_url%/*}/trellis_floor"
rhost=${TRELLIS_FLOOR_REDIS_HOST:-127.0.0.1}
rport=${TRELLIS_FLOOR_REDIS_PORT:-6379}
work=$(mktemp -d)
cleanup() {
  psql -q "$base_url" -c 'DROP DATABASE IF EXISTS trellis_floor' >/dev/null 2>&1 || true
  redis-cli -h "$rhost" -p "$rport" --scan --pattern 'trellis-floor:*' | xargs -r redis-cli -h "$rhost" -p "$rport" del >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

psql -q "$base_url" -c 'DROP DATABASE IF EXISTS trellis_floor' -c 'CREATE DATABASE trellis_floor' >/dev/null
for m in migrations/*/; do
  psql -q -v ON_ERROR_STOP=1 "$db_url" -f "$m/up.sql" >/dev/null
done

user=00000000-0000-0000-0000-000000000001
psql -q -v ON_ERROR_STOP=1 "$db_url" >/dev/null <<SQL
INSERT INTO users (id, email, username, password_hash) VALUES ('$user', 'floor@example.com', 'floor', 'x');
INSERT INTO chat_sessions (id, user_id, model)
  SELECT ('00000000-0000-0000-0001-' || lpad(to_hex(g), 12, '0'))::uuid, '$user', 'bench' FROM generate_series(1, 40000) g;
INSERT INTO chat_sessions (id, user_id, model)
  SELECT ('00000000-0000-0000-0002-' || lpad(to_hex(g), 12, '0'))::uuid, '$user', 'bench' FROM generate_series(1, 2000) g;
INSERT INTO chat_messages (id, session_id, user_id, role, content, status, model)
  SELECT gen_random_uuid(), ('00000000-0000-0000-0002-' || lpad(to_hex(1 + g % 2000), 12, '0'))::uuid, '$user',
         CASE WHEN g % 2 = 0 THEN 'user' ELSE 'assistant' END,
         'an earlier message of a conversation, number ' || g, 'completed', 'bench'
  FROM generate_series(1, 100000) g;
VACUUM ANALYZE;
SQL

session="('00000000-0000-0000-0001-' || lpad(to_hex(:s::int), 12, '0'))::uuid"
echo 'SELECT 1;' >"$work/select1.sql"
# The turn as chat sends it (crates/chat/src/messages.rs, open_turn), then
# the reply finalised (not timed as part of the turn) so that a session
# drawn again takes another turn.
cat >"$work/turn.sql" <<SQL
\set s random(1, 40000)
\startpipeline
SELECT id, title, model, system_prompt, retrieval, created_at, updated_at, last_activity_at FROM chat_sessions WHERE id = $session AND user_id = '$user' AND deleted_at IS NULL LIMIT 1;
WITH s AS (SELECT id, model FROM chat_sessions WHERE id = $session AND user_id = '$user' AND deleted_at IS NULL AND last_activity_at > now() - make_interval(secs => 2592000)), ids AS (SELECT gen_random_uuid() AS u, gen_random_uuid() AS a), u AS (INSERT INTO chat_messages (id, session_id, user_id, role, content, status, client_message_id, model) SELECT ids.u, s.id, '$user', 'user', 'Say hello in a few words.', 'completed', NULL, '' FROM s, ids), a AS (INSERT INTO chat_messages (id, session_id, user_id, role, content, status, reply_to, model) SELECT ids.a, s.id, '$user', 'assistant', '', 'streaming', ids.u, s.model FROM s, ids) UPDATE chat_sessions SET last_activity_at = now() WHERE id IN (SELECT id FROM s);
SELECT role, content, reply_to FROM chat_messages WHERE session_id = $session AND user_id = '$user' AND content <> '' ORDER BY created_at DESC, id DESC LIMIT 200;
\endpipeline
UPDATE chat_messages SET status = 'completed', content = 'tok tok tok tok', updated_at = now() WHERE session_id = $session AND status = 'streaming';
SQL

# pgbench -r: the mean of each statement's latency, in ms; the pipeline's
# time is on its \endpipeline line.
pg_mean() { # script, line pattern
  PGOPTIONS="$PGOPTIONS -c synchronous_commit=off" pgbench -n -M prepared -c 1 -T 10 -r -f "$1" "$db_url" 2>&1 |
    awk -v pat="$2" '$0 ~ pat && $1 ~ /^[0-9.]+$/ { printf "%.0f", $1 * 1000; exit }'
}
select1=$(pg_mean "$work/select1.sql" 'SELECT 1')
turn=$(pg_mean "$work/turn.sql" 'endpipeline')

script=$(sed -n '/^const ACQUIRE: &str = r#"$/,/^"#;$/p' crates/llm/src/limits.rs | sed '1d;$d')
sha=$(redis-cli -h "$rhost" -p "$rport" script load "$script")
redis_p50() { # command…
  redis-benchmark -h "$rhost" -p "$rport" -c 1 -n 20000 --csv "$@" |
    awk -F'","' 'NR == 2 { gsub(/"/, "", $5); printf "%.0f", $5 * 1000 }'
}
ping=$(redis_p50 PING)
now_ms=$(($(date +%s) * 1000))
# Every quota unlimited (0), as trellis-bench runs the gateway; the lease
# expires in a second, so the stream set stays small.
quota=$(redis_p50 EVALSHA "$sha" 4 trellis-floor:rpm trellis-floor:tok trellis-floor:cost trellis-floor:streams \
  0 61000 0 0 0 "$now_ms" $((now_ms + 1000)) __rand_int__ 0 0 $((now_ms + 86400000)) $((now_ms + 86400000)))

cat <<EOF
ttft-floor ($(date -u +%FT%TZ), $(nproc) CPUs)
  PostgreSQL round trip, SELECT 1 (mean)                 ${select1} µs
  the turn's pipelined statements (mean)                 ${turn} µs
  Redis round trip, PING (p50)                           ${ping} µs
  the quota script, EVALSHA (p50)                        ${quota} µs
  in series before chat's upstream call                  $((turn + quota)) µs  (chat-ttft's target: ≤ 500 µs added in all)
EOF
