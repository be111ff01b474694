-- Single-use tokens mailed for password reset and e-mail verification
-- (stored hashed), the mail outbox, and the audit trail every service
-- writes to.

CREATE TABLE auth_one_time_tokens (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose    text NOT NULL CHECK (purpose IN ('password_reset', 'email_verification')),
    -- The address the token was sent to; verification only counts for it.
    email      citext NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX auth_one_time_tokens_user ON auth_one_time_tokens (user_id, purpose);

CREATE TABLE mail_outbox (
    id         uuid PRIMARY KEY,
    to_address text NOT NULL,
    subject    text NOT NULL,
    body       text NOT NULL,
    -- What the mail is for, e.g. password_reset; lets tools find it.
    purpose    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz
);
CREATE INDEX mail_outbox_to ON mail_outbox (to_address, created_at DESC);

CREATE TABLE audit_events (
    id             uuid PRIMARY KEY,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    -- Who did it (NULL: anonymous, e.g. a failed login for an unknown name).
    actor_id       uuid,
    action         text NOT NULL,
    target_type    text NOT NULL,
    target_id      text NOT NULL DEFAULT '',
    changed_fields text[] NOT NULL DEFAULT '{}',
    details        jsonb NOT NULL DEFAULT '{}',
    request_id     text NOT NULL DEFAULT '',
    ip_address     text NOT NULL DEFAULT ''
);
CREATE INDEX audit_events_time ON audit_events (occurred_at DESC, id DESC);
CREATE INDEX audit_events_actor ON audit_events (actor_id, occurred_at DESC);
CREATE INDEX audit_events_target ON audit_events (target_type, target_id, occurred_at DESC);
CREATE INDEX audit_events_action ON audit_events (action, occurred_at DESC);
