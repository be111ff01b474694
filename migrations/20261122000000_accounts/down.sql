DROP TABLE signing_keys;
DROP TABLE refresh_tokens;
DROP TABLE auth_sessions;
DROP TABLE user_roles;
DROP TABLE roles;
DROP TABLE users;
