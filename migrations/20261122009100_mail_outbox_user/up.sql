-- Mail belongs to the account it was sent to, so that purging the account
-- (an erasure request) deletes its mail too: addresses, bodies, tokens.
ALTER TABLE mail_outbox ADD COLUMN user_id uuid REFERENCES users (id) ON DELETE CASCADE;
UPDATE mail_outbox m SET user_id = u.id FROM users u WHERE lower(m.to_address) = lower(u.email::text);
CREATE INDEX mail_outbox_user ON mail_outbox (user_id);
