DROP TABLE audit_events;
DROP TABLE mail_outbox;
DROP TABLE auth_one_time_tokens;
