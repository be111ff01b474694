-- Extensions every service relies on: trigram similarity for index-backed
-- case-insensitive search (user, search) and typo fallback.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS citext;
