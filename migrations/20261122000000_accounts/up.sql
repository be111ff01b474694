-- The account core (shared by auth and user through trellis-store's
-- accounts module), roles, and auth's sessions, refresh tokens and keys.

CREATE TABLE users (
    id               uuid PRIMARY KEY,
    email            citext NOT NULL,
    username         citext NOT NULL,
    password_hash    text NOT NULL,
    display_name     text NOT NULL DEFAULT '',
    status           text NOT NULL DEFAULT 'active'
                     CHECK (status IN ('active', 'inactive', 'suspended')),
    email_verified_at timestamptz,
    -- Bumped to invalidate every token of the user at once (LogoutAll,
    -- password change, suspension); access tokens carry the version.
    token_version    integer NOT NULL DEFAULT 0,
    failed_logins    integer NOT NULL DEFAULT 0,
    first_failed_at  timestamptz,
    locked_until     timestamptz,
    lockouts         integer NOT NULL DEFAULT 0,
    totp_secret      text,
    totp_enabled_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz
);
-- E-mail and username stay taken while an account is soft-deleted; they are
-- freed by purge.
CREATE UNIQUE INDEX users_email_key ON users (email);
CREATE UNIQUE INDEX users_username_key ON users (username);

CREATE TABLE roles (
    name        text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    -- service:resource:action, with * wildcards.
    permissions text[] NOT NULL DEFAULT '{}',
    builtin     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO roles (name, description, permissions, builtin) VALUES
    ('admin', 'Everything, everywhere', '{*}', true),
    ('member', 'A signed-up user: their own account, chat, generation and search',
     '{auth:self:*,user:self:*,chat:*,llm:generate:*,llm:usage:read,search:*}', true);

CREATE TABLE user_roles (
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL REFERENCES roles (name) ON UPDATE CASCADE,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, role)
);

-- A session is one refresh-token family: one sign-in on one client.
CREATE TABLE auth_sessions (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    user_agent    text NOT NULL DEFAULT '',
    ip_address    text NOT NULL DEFAULT '',
    revoked_at    timestamptz,
    revoke_reason text
);
CREATE INDEX auth_sessions_user ON auth_sessions (user_id, created_at DESC);

-- Refresh tokens are stored as SHA-256 hashes; a used token keeps its row
-- so that reuse can be detected.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Ed25519 signing keys. The newest unretired key signs; retired keys keep
-- verifying until every token they signed has expired.
CREATE TABLE signing_keys (
    kid         text PRIMARY KEY,
    private_key bytea NOT NULL,
    public_key  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);
