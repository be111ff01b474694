ALTER TABLE chat_messages DROP COLUMN tsv;
ALTER TABLE chat_messages ADD COLUMN tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('english', content)) STORED;
CREATE INDEX chat_messages_tsv ON chat_messages USING GIN (tsv);
