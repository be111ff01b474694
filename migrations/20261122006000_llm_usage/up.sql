-- The LLM gateway's accounting: one row per call, whatever its outcome.
CREATE TABLE llm_usage (
    id                uuid PRIMARY KEY,
    user_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    model             text NOT NULL,
    provider          text NOT NULL DEFAULT '',
    upstream_model    text NOT NULL DEFAULT '',
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    -- Counted with a tokenizer because the upstream reported none.
    estimated         boolean NOT NULL DEFAULT false,
    cost_micros       bigint NOT NULL DEFAULT 0,
    ttft_ms           integer,
    duration_ms       integer NOT NULL DEFAULT 0,
    -- ok, failed, cancelled
    status            text NOT NULL,
    cached            boolean NOT NULL DEFAULT false,
    request_id        text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_usage_user_time ON llm_usage (user_id, created_at);
CREATE INDEX llm_usage_time ON llm_usage (created_at);
