//! Documents: validation of what callers index, the batch upsert (one
//! statement for the whole batch, the tsvector computed by PostgreSQL in
//! the configured language, titles weighted above bodies), reading,
//! deleting and the collection list — all within what the caller may see.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Jsonb, Text};
use diesel_async::RunQueryDsl;
use trellis_core::error::FieldViolations;
use trellis_core::text::{is_clean_text, is_single_line};
use trellis_proto::search::v1 as pb;
use trellis_store::Store;
use trellis_store::schema::search_documents as d;
use uuid::Uuid;

use crate::error::SearchError;

pub const MAX_BATCH: usize = 500;
const MAX_EXTERNAL_ID: usize = 200;
const MAX_TITLE: usize = 1000;
const MAX_BODY: usize = 200_000;
const MAX_TAG: usize = 64;
const MAX_ATTR_KEY: usize = 64;
const MAX_ATTR_VALUE: usize = 256;

/// Whether `name` is a collection name: 1-64 of a-z, 0-9, `_`, `-`.
pub fn valid_collection(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Most tags per document, and per search filter.
pub const MAX_TAGS: usize = 32;
/// Most attributes per document, and per search filter.
pub const MAX_ATTRIBUTES: usize = 32;
/// What a valid tag is, in documents and in search filters.
pub const TAG_RULE: &str = "1-64 characters, no control characters";
/// What a valid attribute is, in documents and in search filters.
pub const ATTRIBUTE_RULE: &str =
    "keys 1-64 characters, values up to 256 characters, no control characters";

/// Whether `tag` (already trimmed) is a tag: 1-64 characters, none a
/// control character.
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.chars().count() <= MAX_TAG && is_single_line(tag)
}

/// Whether `key` = `value` is an attribute: keys 1-64 characters, values up
/// to 256, neither with control characters.
pub fn valid_attribute(key: &str, value: &str) -> bool {
    !key.is_empty()
        && key.chars().count() <= MAX_ATTR_KEY
        && value.chars().count() <= MAX_ATTR_VALUE
        && is_single_line(key)
        && is_single_line(value)
}

/// An attribute key as it may appear in a field path: control characters
/// escaped, cut to a readable length.
pub fn key_label(key: &str) -> String {
    let cut: String = key.chars().take(MAX_ATTR_KEY).collect();
    let mut out: String = cut.chars().flat_map(char::escape_debug).collect();
    if key.chars().count() > MAX_ATTR_KEY {
        out.push('…');
    }
    out
}

/// A validated document to index.
#[derive(Debug, Clone)]
pub struct NewDoc {
    pub external_id: String,
    pub collection: String,
    pub title: String,
    pub body: String,
    pub tags: Vec<String>,
    pub attributes: BTreeMap<String, String>,
    pub shared: bool,
}

/// Validates a batch; every problem is reported with its index.
pub fn validate(docs: Vec<pb::DocumentInput>) -> Result<Vec<NewDoc>, SearchError> {
    let mut v = FieldViolations::new();
    if docs.is_empty() {
        v.add("documents", "needs at least one document");
    } else if docs.len() > MAX_BATCH {
        v.add(
            "documents",
            format!("at most {MAX_BATCH} documents per call"),
        );
        return Err(SearchError::Invalid(v));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(docs.len());
    for (i, doc) in docs.into_iter().enumerate() {
        let f = |name: &str| format!("documents[{i}].{name}");
        let external_id = doc.external_id.trim().to_string();
        if external_id.is_empty()
            || external_id.chars().count() > MAX_EXTERNAL_ID
            || !is_clean_text(&external_id)
        {
            v.add(
                f("external_id"),
                format!("1-{MAX_EXTERNAL_ID} printable characters"),
            );
        }
        let collection = doc.collection.trim().to_string();
        if !valid_collection(&collection) {
            v.add(f("collection"), "1-64 characters of a-z, 0-9, _ and -");
        }
        if !seen.insert((collection.clone(), external_id.clone())) {
            v.add(
                f("external_id"),
                "appears twice in this batch for the same collection",
            );
        }
        if doc.title.chars().count() > MAX_TITLE || !is_clean_text(&doc.title) {
            v.add(
                f("title"),
                format!("at most {MAX_TITLE} characters, no control characters"),
            );
        }
        if doc.body.chars().count() > MAX_BODY || !is_clean_text(&doc.body) {
            v.add(
                f("body"),
                format!("at most {MAX_BODY} characters, no control characters"),
            );
        }
        if doc.title.trim().is_empty() && doc.body.trim().is_empty() {
            v.add(f("title"), "a title or a body is required");
        }
        if doc.tags.len() > MAX_TAGS {
            v.add(f("tags"), format!("at most {MAX_TAGS} tags"));
        }
        let mut tags: Vec<String> = Vec::new();
        for (j, t) in doc.tags.iter().enumerate() {
            let t = t.trim();
            if !valid_tag(t) {
                v.add(format!("documents[{i}].tags[{j}]"), TAG_RULE);
            } else if !tags.iter().any(|x| x == t) {
                tags.push(t.to_string());
            }
        }
        if doc.attributes.len() > MAX_ATTRIBUTES {
            v.add(
                f("attributes"),
                format!("at most {MAX_ATTRIBUTES} attributes"),
            );
        }
        let mut attributes = BTreeMap::new();
        for (k, val) in doc.attributes {
            if !valid_attribute(&k, &val) {
                v.add(
                    format!("documents[{i}].attributes[{}]", key_label(&k)),
                    ATTRIBUTE_RULE,
                );
            } else {
                attributes.insert(k, val);
            }
        }
        out.push(NewDoc {
            external_id,
            collection,
            title: doc.title.trim().to_string(),
            body: doc.body,
            tags,
            attributes,
            shared: doc.visibility == pb::Visibility::Shared as i32,
        });
    }
    if v.is_empty() {
        Ok(out)
    } else {
        Err(SearchError::Invalid(v))
    }
}

#[derive(QueryableByName)]
struct Upserted {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    collection: String,
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Bool)]
    created: bool,
}

/// Creates or replaces `docs` of `owner`; results in request order.
pub async fn upsert(
    store: &Store,
    language: &str,
    owner: Uuid,
    docs: Vec<NewDoc>,
) -> Result<Vec<pb::IndexResult>, SearchError> {
    let n = docs.len();
    let mut ids = Vec::with_capacity(n);
    let mut collections = Vec::with_capacity(n);
    let mut external_ids = Vec::with_capacity(n);
    let mut titles = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut attributes = Vec::with_capacity(n);
    let mut shared = Vec::with_capacity(n);
    for doc in docs {
        ids.push(Uuid::now_v7());
        collections.push(doc.collection);
        external_ids.push(doc.external_id);
        titles.push(doc.title);
        bodies.push(doc.body);
        tags.push(serde_json::json!(doc.tags));
        attributes.push(serde_json::json!(doc.attributes));
        shared.push(doc.shared);
    }
    let order: Vec<(String, String)> = collections
        .iter()
        .cloned()
        .zip(external_ids.iter().cloned())
        .collect();
    let mut conn = store.pg().await?;
    let rows: Vec<Upserted> = diesel::sql_query(
        "INSERT INTO search_documents AS t \
           (id, owner_id, collection, external_id, title, body, tags, attributes, shared, tsv) \
         SELECT u.id, $1, u.collection, u.external_id, u.title, u.body, \
                ARRAY(SELECT jsonb_array_elements_text(u.tags)), u.attributes, u.shared, \
                setweight(to_tsvector($2::regconfig, u.title), 'A') || \
                setweight(to_tsvector($2::regconfig, u.body), 'B') \
         FROM unnest($3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::jsonb[], $9::jsonb[], $10::bool[]) \
              AS u(id, collection, external_id, title, body, tags, attributes, shared) \
         ON CONFLICT (owner_id, collection, external_id) DO UPDATE SET \
           title = EXCLUDED.title, body = EXCLUDED.body, tags = EXCLUDED.tags, \
           attributes = EXCLUDED.attributes, shared = EXCLUDED.shared, tsv = EXCLUDED.tsv, \
           updated_at = now() \
         RETURNING t.id, t.collection, t.external_id, (t.xmax = 0) AS created",
    )
    .bind::<diesel::sql_types::Uuid, _>(owner)
    .bind::<Text, _>(language)
    .bind::<Array<diesel::sql_types::Uuid>, _>(&ids)
    .bind::<Array<Text>, _>(&collections)
    .bind::<Array<Text>, _>(&external_ids)
    .bind::<Array<Text>, _>(&titles)
    .bind::<Array<Text>, _>(&bodies)
    .bind::<Array<Jsonb>, _>(&tags)
    .bind::<Array<Jsonb>, _>(&attributes)
    .bind::<Array<Bool>, _>(&shared)
    .load(&mut conn)
    .await?;
    let by_key: HashMap<(String, String), Upserted> = rows
        .into_iter()
        .map(|r| ((r.collection.clone(), r.external_id.clone()), r))
        .collect();
    Ok(order
        .into_iter()
        .filter_map(|key| {
            by_key.get(&key).map(|r| pb::IndexResult {
                external_id: r.external_id.clone(),
                collection: r.collection.clone(),
                id: r.id.to_string(),
                created: r.created,
            })
        })
        .collect())
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = d)]
struct DocRow {
    id: Uuid,
    owner_id: Uuid,
    collection: String,
    external_id: String,
    title: String,
    body: String,
    tags: Vec<String>,
    attributes: serde_json::Value,
    shared: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn attributes_map(v: serde_json::Value) -> HashMap<String, String> {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
            .collect(),
        _ => HashMap::new(),
    }
}

/// Document `id` if `viewer` may see it (`all`: administrators).
pub async fn get(
    store: &Store,
    id: Uuid,
    viewer: Uuid,
    all: bool,
) -> Result<pb::Document, SearchError> {
    let mut conn = store.pg().await?;
    let mut q = d::table.filter(d::id.eq(id)).into_boxed();
    if !all {
        q = q.filter(d::owner_id.eq(viewer).or(d::shared.eq(true)));
    }
    let row: DocRow = q
        .select(DocRow::as_select())
        .first(&mut conn)
        .await
        .optional()?
        .ok_or(SearchError::NotFound)?;
    Ok(pb::Document {
        id: row.id.to_string(),
        external_id: row.external_id,
        collection: row.collection,
        title: row.title,
        body: row.body,
        tags: row.tags,
        attributes: attributes_map(row.attributes),
        visibility: if row.shared {
            pb::Visibility::Shared as i32
        } else {
            pb::Visibility::Private as i32
        },
        owner_id: row.owner_id.to_string(),
        create_time: Some(ts(row.created_at)),
        update_time: Some(ts(row.updated_at)),
    })
}

/// Deletes those of `ids` that `owner` owns (any, with `all`).
pub async fn delete(
    store: &Store,
    ids: &[Uuid],
    owner: Uuid,
    all: bool,
) -> Result<usize, SearchError> {
    let mut conn = store.pg().await?;
    let n = if all {
        diesel::delete(d::table.filter(d::id.eq_any(ids)))
            .execute(&mut conn)
            .await?
    } else {
        diesel::delete(
            d::table
                .filter(d::id.eq_any(ids))
                .filter(d::owner_id.eq(owner)),
        )
        .execute(&mut conn)
        .await?
    };
    Ok(n)
}

#[derive(QueryableByName)]
struct CollectionRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// The collections `viewer` can see with their visible document counts.
pub async fn collections(
    store: &Store,
    viewer: Uuid,
    all: bool,
) -> Result<Vec<pb::Collection>, SearchError> {
    let mut conn = store.pg().await?;
    let rows: Vec<CollectionRow> = diesel::sql_query(
        "SELECT collection AS name, count(*) AS n FROM search_documents \
         WHERE $1 OR owner_id = $2 OR shared GROUP BY collection ORDER BY collection",
    )
    .bind::<Bool, _>(all)
    .bind::<diesel::sql_types::Uuid, _>(viewer)
    .load(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| pb::Collection {
            name: r.name,
            document_count: r.n,
        })
        .collect())
}
