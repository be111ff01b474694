-- SearchService: documents with their full-text vector and trigram text,
-- and the search history.
CREATE TABLE search_documents (
    id          uuid PRIMARY KEY,
    owner_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    collection  text NOT NULL,
    external_id text NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    attributes  jsonb NOT NULL DEFAULT '{}',
    shared      boolean NOT NULL DEFAULT false,
    -- title weighted A, body B, in the configured text search language
    tsv         tsvector NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_id, collection, external_id)
);
CREATE INDEX search_documents_tsv ON search_documents USING GIN (tsv);
CREATE INDEX search_documents_tags ON search_documents USING GIN (tags);
CREATE INDEX search_documents_attributes ON search_documents USING GIN (attributes jsonb_path_ops);
CREATE INDEX search_documents_collection ON search_documents (collection);
CREATE INDEX search_documents_updated ON search_documents (updated_at DESC, id DESC);
-- Typo fallback and "did you mean": word similarity over the title and the
-- start of the body (the same expression as FUZZY_TEXT in
-- crates/search/src/query.rs).
CREATE INDEX search_documents_fuzzy_trgm ON search_documents
    USING GIN ((title || ' ' || left(body, 2000)) gin_trgm_ops);

CREATE TABLE search_history (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    query        text NOT NULL,
    filters      jsonb NOT NULL DEFAULT '{}',
    result_count bigint NOT NULL,
    latency_ms   integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX search_history_user ON search_history (user_id, created_at DESC, id DESC);
CREATE INDEX search_history_time ON search_history (created_at);

-- Members search, index their own documents and keep a history; reading
-- everyone's documents and the analytics stay with administrators.
UPDATE roles
   SET permissions = array_remove(permissions, 'search:*')
       || '{search:documents:read,search:documents:write,search:query:run,search:history:*}'::text[]
 WHERE name = 'member' AND builtin AND 'search:*' = ANY (permissions);
