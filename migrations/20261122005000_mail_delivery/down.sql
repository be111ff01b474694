DROP INDEX mail_outbox_pending;
ALTER TABLE mail_outbox DROP COLUMN last_error, DROP COLUMN next_attempt_at, DROP COLUMN attempts;
