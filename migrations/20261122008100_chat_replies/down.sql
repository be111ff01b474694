DROP INDEX chat_messages_streaming;
ALTER TABLE chat_messages
    DROP COLUMN heartbeat_at,
    DROP COLUMN finish_reason,
    DROP COLUMN error_code,
    DROP COLUMN time_to_first_token_micros,
    DROP COLUMN duration_micros;
CREATE INDEX chat_messages_streaming ON chat_messages (updated_at) WHERE status = 'streaming';
