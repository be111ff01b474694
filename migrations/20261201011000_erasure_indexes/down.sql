DROP INDEX mail_outbox_to;
CREATE INDEX mail_outbox_to ON mail_outbox (to_address, created_at DESC);
DROP INDEX audit_events_anonymous_login;
DROP INDEX audit_events_target_id;
