-- Housekeeping (trellis_auth::housekeeping) deletes auth state that can no
-- longer be used, a retention period after it stopped mattering; these
-- indexes let it find that state without scanning the tables.
CREATE INDEX auth_sessions_expires ON auth_sessions (expires_at);
CREATE INDEX auth_sessions_revoked ON auth_sessions (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at);
CREATE INDEX auth_one_time_tokens_expires ON auth_one_time_tokens (expires_at);
CREATE INDEX mail_outbox_sent ON mail_outbox (sent_at) WHERE sent_at IS NOT NULL;
