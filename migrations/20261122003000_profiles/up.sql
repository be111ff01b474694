-- Profiles and preferences (user service) on the account core, plus the
-- indexes ListUsers needs: trigram search over names, e-mail and username,
-- and one keyset index per sort order.

ALTER TABLE users
    ADD COLUMN first_name    text NOT NULL DEFAULT '',
    ADD COLUMN last_name     text NOT NULL DEFAULT '',
    ADD COLUMN phone         text NOT NULL DEFAULT '',
    ADD COLUMN date_of_birth date,
    ADD COLUMN bio           text NOT NULL DEFAULT '',
    ADD COLUMN avatar_url    text NOT NULL DEFAULT '',
    ADD COLUMN locale        text NOT NULL DEFAULT '',
    ADD COLUMN time_zone     text NOT NULL DEFAULT '',
    ADD COLUMN suspend_reason text;

ALTER TABLE users ADD COLUMN search_text text GENERATED ALWAYS AS (
    lower(display_name || ' ' || first_name || ' ' || last_name || ' ' || email::text || ' ' || username::text)
) STORED;
CREATE INDEX users_search_trgm ON users USING gin (search_text gin_trgm_ops);

CREATE INDEX users_created_keyset ON users (created_at, id);
CREATE INDEX users_email_keyset ON users (email, id);
CREATE INDEX users_username_keyset ON users (username, id);
CREATE INDEX users_last_name_keyset ON users (last_name, id);
CREATE INDEX users_status ON users (status) WHERE deleted_at IS NULL;

CREATE TABLE user_preferences (
    user_id                uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    communication_style    text NOT NULL DEFAULT ''
                           CHECK (communication_style IN ('', 'formal', 'casual', 'technical')),
    industry_focus         text[] NOT NULL DEFAULT '{}',
    experience_levels      text[] NOT NULL DEFAULT '{}',
    default_search_filters jsonb NOT NULL DEFAULT '{}',
    custom                 jsonb NOT NULL DEFAULT '{}',
    updated_at             timestamptz NOT NULL DEFAULT now()
);
