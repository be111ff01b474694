-- TOTP second factor (a pending secret until confirmed, the last accepted
-- time step against replays, one-time recovery codes) and API keys.

ALTER TABLE users
    -- Set by EnrollTotp, moved to totp_secret by ConfirmTotp.
    ADD COLUMN totp_pending_secret text,
    -- The last time step whose code was accepted: a code works once.
    ADD COLUMN totp_last_step bigint;

-- Recovery codes are stored as SHA-256 hashes; a used code keeps its row.
CREATE TABLE totp_recovery_codes (
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash bytea NOT NULL,
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- API keys: the secret is shown once and kept only as a SHA-256 hash; the
-- prefix tells keys apart in lists.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    -- Permissions the key grants (service:resource:action, * wildcards).
    scopes       text[] NOT NULL,
    prefix       text NOT NULL,
    secret_hash  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE UNIQUE INDEX api_keys_secret_hash ON api_keys (secret_hash);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at DESC, id DESC);
