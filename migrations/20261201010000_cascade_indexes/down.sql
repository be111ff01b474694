DROP INDEX chat_sessions_user_activity;
CREATE INDEX chat_sessions_user_activity ON chat_sessions (user_id, last_activity_at DESC, id DESC)
    WHERE deleted_at IS NULL;
DROP INDEX chat_messages_reply_to;
