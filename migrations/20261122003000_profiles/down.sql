DROP TABLE user_preferences;
DROP INDEX users_status;
DROP INDEX users_last_name_keyset;
DROP INDEX users_username_keyset;
DROP INDEX users_email_keyset;
DROP INDEX users_created_keyset;
DROP INDEX users_search_trgm;
ALTER TABLE users DROP COLUMN search_text;
ALTER TABLE users
    DROP COLUMN suspend_reason,
    DROP COLUMN time_zone,
    DROP COLUMN locale,
    DROP COLUMN avatar_url,
    DROP COLUMN bio,
    DROP COLUMN date_of_birth,
    DROP COLUMN phone,
    DROP COLUMN last_name,
    DROP COLUMN first_name;
