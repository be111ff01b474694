DROP TABLE api_keys;
DROP TABLE totp_recovery_codes;
ALTER TABLE users
    DROP COLUMN totp_last_step,
    DROP COLUMN totp_pending_secret;
