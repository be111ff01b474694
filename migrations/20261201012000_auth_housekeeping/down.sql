DROP INDEX mail_outbox_sent;
DROP INDEX auth_one_time_tokens_expires;
DROP INDEX refresh_tokens_expires;
DROP INDEX auth_sessions_revoked;
DROP INDEX auth_sessions_expires;
