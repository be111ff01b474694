-- ChatService: sessions and their messages.
CREATE TABLE chat_sessions (
    id               uuid PRIMARY KEY,
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title            text NOT NULL DEFAULT '',
    model            text NOT NULL,
    system_prompt    text NOT NULL DEFAULT '',
    retrieval        boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_activity_at timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz
);
CREATE INDEX chat_sessions_user_activity ON chat_sessions (user_id, last_activity_at DESC, id DESC)
    WHERE deleted_at IS NULL;

CREATE TABLE chat_messages (
    id                uuid PRIMARY KEY,
    session_id        uuid NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    user_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role              text NOT NULL,          -- user, assistant
    content           text NOT NULL DEFAULT '',
    status            text NOT NULL,          -- streaming, completed, cancelled, failed, interrupted
    client_message_id text,
    reply_to          uuid REFERENCES chat_messages (id) ON DELETE CASCADE,
    model             text NOT NULL DEFAULT '',
    provider          text NOT NULL DEFAULT '',
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    cost_micros       bigint NOT NULL DEFAULT 0,
    citations         jsonb NOT NULL DEFAULT '[]',
    error             text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    tsv               tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED
);
CREATE INDEX chat_messages_session ON chat_messages (session_id, created_at, id);
CREATE UNIQUE INDEX chat_messages_client_id ON chat_messages (session_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
-- At most one reply generating per session, enforced by the database.
CREATE UNIQUE INDEX chat_messages_one_streaming ON chat_messages (session_id)
    WHERE status = 'streaming';
CREATE INDEX chat_messages_streaming ON chat_messages (updated_at) WHERE status = 'streaming';
CREATE INDEX chat_messages_tsv ON chat_messages USING GIN (tsv);
CREATE INDEX chat_messages_user ON chat_messages (user_id);
