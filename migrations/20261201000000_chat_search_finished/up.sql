-- A reply's search vector is computed once, when it stops streaming, not
-- on every flush of its growing content (every ~250 ms a reply). With the
-- vector NULL while streaming, a flush changes no indexed value, so
-- PostgreSQL can update the row in place (HOT) instead of re-tokenising the
-- content and adding entries to every index. SearchMessages finds a reply
-- once it has ended (completed, cancelled, failed or interrupted).
ALTER TABLE chat_messages DROP COLUMN tsv;
ALTER TABLE chat_messages ADD COLUMN tsv tsvector GENERATED ALWAYS AS (
    CASE WHEN status = 'streaming' THEN NULL ELSE to_tsvector('english', content) END
) STORED;
CREATE INDEX chat_messages_tsv ON chat_messages USING GIN (tsv);
