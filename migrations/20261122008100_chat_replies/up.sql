-- Chat replies: a heartbeat written by the replica generating a reply (so
-- the sweeper only interrupts replies whose replica is gone), and what a
-- finished reply's final event needs for a faithful replay.
ALTER TABLE chat_messages
    ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN finish_reason text NOT NULL DEFAULT '',
    ADD COLUMN error_code integer NOT NULL DEFAULT 0,
    ADD COLUMN time_to_first_token_micros bigint,
    ADD COLUMN duration_micros bigint;
DROP INDEX chat_messages_streaming;
CREATE INDEX chat_messages_streaming ON chat_messages (heartbeat_at) WHERE status = 'streaming';
