//! The search references: trellisd's own SQL run straight on PostgreSQL
//! with tokio-postgres, one connection per client task, each statement
//! prepared once per connection with the parameter types trellisd's diesel
//! binds (text, uuid, text[], jsonb, bigint), so the server parses and
//! plans exactly what it does for trellisd.
//!
//! The statements are copies of `crates/search/src/query.rs` (a first
//! page, relevance order, a member's visibility, collection / tag /
//! attribute filters) and of the batch upsert in
//! `crates/search/src/documents.rs`. A copy can drift from the original:
//! the seeding step runs every query both ways and fails the run when the
//! hits differ ([`crate::seed`]).

use std::collections::{BTreeMap, HashMap};
use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};
use tonic::Code;
use trellis_proto::search::v1::{DocumentInput, Visibility};
use uuid::Uuid;

/// `ts_headline`'s options in trellisd (query.rs `HEADLINE`).
const HEADLINE: &str = "StartSel=<mark>, StopSel=</mark>, MaxWords=30, MinWords=12, MaxFragments=2, FragmentDelimiter=\" … \"";
/// Counting stops here (query.rs `COUNT_CAP`).
const COUNT_CAP: i64 = 10_000;

/// A bound parameter, typed as diesel binds it.
#[derive(Debug, Clone)]
pub enum Param {
    Text(String),
    Uuid(Uuid),
    TextArray(Vec<String>),
    Jsonb(String),
    BigInt(i64),
    UuidArray(Vec<Uuid>),
    JsonbArray(Vec<Jsonb>),
    BoolArray(Vec<bool>),
}

impl Param {
    fn ty(&self) -> Type {
        match self {
            Param::Text(_) => Type::TEXT,
            Param::Uuid(_) => Type::UUID,
            Param::TextArray(_) => Type::TEXT_ARRAY,
            Param::Jsonb(_) => Type::JSONB,
            Param::BigInt(_) => Type::INT8,
            Param::UuidArray(_) => Type::UUID_ARRAY,
            Param::JsonbArray(_) => Type::JSONB_ARRAY,
            Param::BoolArray(_) => Type::BOOL_ARRAY,
        }
    }
}

/// A jsonb value in its binary wire format: version 1, then the text.
#[derive(Debug, Clone)]
pub struct Jsonb(pub String);

impl ToSql for Jsonb {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Param::Text(v) => v.to_sql(ty, out),
            Param::Uuid(v) => v.to_sql(ty, out),
            Param::TextArray(v) => v.to_sql(ty, out),
            Param::Jsonb(v) => Jsonb(v.clone()).to_sql(ty, out),
            Param::BigInt(v) => v.to_sql(ty, out),
            Param::UuidArray(v) => v.to_sql(ty, out),
            Param::JsonbArray(v) => v.to_sql(ty, out),
            Param::BoolArray(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Statements are prepared with each parameter's own type.
        true
    }

    to_sql_checked!();
}

/// One statement and its parameters.
#[derive(Debug, Clone)]
pub struct Stmt {
    pub sql: String,
    pub params: Vec<Param>,
}

/// A search as trellisd runs it for a member on a first page: the page of
/// hits (with snippets), then the capped count.
#[derive(Debug, Clone)]
pub struct SqlSearch {
    pub page: Stmt,
    pub count: Stmt,
    /// The page size asked for (the statement fetches one more).
    pub page_size: usize,
    /// Prepare both statements on every call (as diesel does for
    /// trellisd's `sql_query`, which it never caches) instead of once.
    pub prepare_each_time: bool,
}

/// What a search query filters on (the subset of `SearchRequest` the
/// bench uses: words, collections, tags, attributes; relevance order).
#[derive(Debug, Clone)]
pub struct SearchSpec {
    pub text: String,
    pub collections: Vec<String>,
    pub tags: Vec<String>,
    pub attributes: BTreeMap<String, String>,
    pub page_size: usize,
}

impl SqlSearch {
    /// trellisd's statements for `spec`, searched by member `viewer` in
    /// text search configuration `language`.
    pub fn new(spec: &SearchSpec, language: &str, viewer: Uuid) -> SqlSearch {
        // As query.rs normalises them: sorted, deduplicated.
        let mut collections = spec.collections.clone();
        collections.sort();
        collections.dedup();
        let mut tags = spec.tags.clone();
        tags.sort();
        tags.dedup();
        let base = vec![
            Param::Text(language.to_string()),
            Param::Text(spec.text.clone()),
        ];
        // query.rs `filters`, for a viewer who is not an administrator.
        let filters = |params: &mut Vec<Param>| {
            let mut sql = String::new();
            params.push(Param::Uuid(viewer));
            sql.push_str(&format!(
                " AND (d.owner_id = ${} OR d.shared)",
                params.len()
            ));
            if !collections.is_empty() {
                params.push(Param::TextArray(collections.clone()));
                sql.push_str(&format!(" AND d.collection = ANY(${})", params.len()));
            }
            if !tags.is_empty() {
                params.push(Param::TextArray(tags.clone()));
                sql.push_str(&format!(" AND d.tags @> ${}", params.len()));
            }
            if !spec.attributes.is_empty() {
                params.push(Param::Jsonb(
                    serde_json::to_string(&spec.attributes).unwrap_or_default(),
                ));
                sql.push_str(&format!(" AND d.attributes @> ${}", params.len()));
            }
            sql
        };

        let mut params = base.clone();
        let mut sql = "WITH q AS (SELECT websearch_to_tsquery($1::regconfig, $2) AS tsq), \
             page AS (SELECT m.* FROM (SELECT d.id, d.updated_at, \
             ts_rank_cd('{0.1, 0.2, 0.4, 1.0}', d.tsv, q.tsq)::float8 AS score \
             FROM search_documents d, q WHERE d.tsv @@ q.tsq"
            .to_string();
        sql.push_str(&filters(&mut params));
        sql.push_str(") m");
        params.push(Param::BigInt(spec.page_size as i64 + 1));
        sql.push_str(&format!(
            " ORDER BY m.score DESC, m.id DESC LIMIT ${}) \
             SELECT d.id, d.external_id, d.collection, d.title, d.tags, d.updated_at, page.score, \
             ts_headline($1::regconfig, CASE WHEN d.body = '' THEN d.title ELSE d.body END, q.tsq, '{HEADLINE}') AS snippet \
             FROM page JOIN search_documents d ON d.id = page.id, q ORDER BY page.score DESC, page.id DESC",
            params.len()
        ));
        let page = Stmt { sql, params };

        let mut params = base;
        let mut sql = "WITH q AS (SELECT websearch_to_tsquery($1::regconfig, $2) AS tsq) \
             SELECT count(*) AS n FROM (SELECT 1 FROM search_documents d, q WHERE d.tsv @@ q.tsq"
            .to_string();
        sql.push_str(&filters(&mut params));
        sql.push_str(&format!(" LIMIT {COUNT_CAP}) c"));
        let count = Stmt { sql, params };
        SqlSearch {
            page,
            count,
            page_size: spec.page_size,
            prepare_each_time: false,
        }
    }
}

/// A batch upsert as trellisd runs it for IndexDocuments
/// (documents.rs `upsert`); each call a fresh set of ids and external
/// ids.
#[derive(Debug, Clone)]
pub struct SqlBatch {
    pub owner: Uuid,
    pub language: String,
    pub template: std::sync::Arc<[DocumentInput]>,
    pub calls: crate::calls::Rotation<()>,
    pub prefix: &'static str,
}

/// documents.rs `upsert`'s statement.
const UPSERT: &str = "INSERT INTO search_documents AS t \
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
     RETURNING t.id, t.collection, t.external_id, (t.xmax = 0) AS created";

impl SqlBatch {
    /// The next batch's statement.
    fn next(&self) -> Stmt {
        let (n, ()) = self.calls.take();
        let docs = &self.template;
        let mut external_ids = Vec::with_capacity(docs.len());
        for i in 0..docs.len() {
            external_ids.push(format!("{}-{n}-{i}", self.prefix));
        }
        Stmt {
            sql: UPSERT.to_string(),
            params: vec![
                Param::Uuid(self.owner),
                Param::Text(self.language.clone()),
                Param::UuidArray(docs.iter().map(|_| Uuid::now_v7()).collect()),
                Param::TextArray(docs.iter().map(|d| d.collection.clone()).collect()),
                Param::TextArray(external_ids),
                Param::TextArray(docs.iter().map(|d| d.title.clone()).collect()),
                Param::TextArray(docs.iter().map(|d| d.body.clone()).collect()),
                Param::JsonbArray(
                    docs.iter()
                        .map(|d| Jsonb(serde_json::json!(d.tags).to_string()))
                        .collect(),
                ),
                Param::JsonbArray(
                    docs.iter()
                        .map(|d| {
                            let sorted: BTreeMap<_, _> = d.attributes.iter().collect();
                            Jsonb(serde_json::json!(sorted).to_string())
                        })
                        .collect(),
                ),
                Param::BoolArray(
                    docs.iter()
                        .map(|d| d.visibility == Visibility::Shared as i32)
                        .collect(),
                ),
            ],
        }
    }

    pub fn len(&self) -> usize {
        self.template.len()
    }
}

/// One client task's PostgreSQL connection and its prepared statements.
pub struct SqlConn {
    client: Client,
    prepared: HashMap<String, Statement>,
}

impl SqlConn {
    pub async fn connect(database_url: &str) -> anyhow::Result<SqlConn> {
        let (client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(SqlConn {
            client,
            prepared: HashMap::new(),
        })
    }

    /// Runs `s`, its statement prepared once per connection (`cache`) or
    /// for this call only.
    async fn query(&mut self, s: &Stmt, cache: bool) -> Result<Vec<tokio_postgres::Row>, Code> {
        let statement = match self.prepared.get(&s.sql).filter(|_| cache) {
            Some(st) => st.clone(),
            None => {
                let types: Vec<Type> = s.params.iter().map(Param::ty).collect();
                let st = self
                    .client
                    .prepare_typed(&s.sql, &types)
                    .await
                    .map_err(|e| code_of(&e))?;
                if cache {
                    self.prepared.insert(s.sql.clone(), st.clone());
                }
                st
            }
        };
        let params: Vec<&(dyn ToSql + Sync)> =
            s.params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        self.client
            .query(&statement, &params)
            .await
            .map_err(|e| code_of(&e))
    }

    /// The search's page and count, checked like trellisd's answer: hits,
    /// and a count at least as large.
    pub async fn search(&mut self, q: &SqlSearch) -> Result<(), Code> {
        self.search_ids(q).await.map(drop)
    }

    /// The ids of the search's page, in order.
    pub async fn search_ids(&mut self, q: &SqlSearch) -> Result<Vec<Uuid>, Code> {
        let cache = !q.prepare_each_time;
        let rows = self.query(&q.page, cache).await?;
        let count = self.query(&q.count, cache).await?;
        let n: i64 = count
            .first()
            .and_then(|r| r.try_get(0).ok())
            .ok_or(Code::Internal)?;
        let ids: Vec<Uuid> = rows
            .iter()
            .take(q.page_size)
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(|_| Code::Internal)?;
        if ids.is_empty() || n < ids.len() as i64 {
            return Err(Code::Internal);
        }
        Ok(ids)
    }

    /// The batch upsert; every document must come back.
    pub async fn index(&mut self, b: &SqlBatch) -> Result<(), Code> {
        let rows = self.query(&b.next(), true).await?;
        if rows.len() == b.len() {
            Ok(())
        } else {
            Err(Code::DataLoss)
        }
    }
}

/// A database error as the gRPC code trellisd would answer.
fn code_of(e: &tokio_postgres::Error) -> Code {
    if e.is_closed() {
        Code::Unavailable
    } else {
        Code::Internal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SearchSpec {
        SearchSpec {
            text: "rust OR go".into(),
            collections: vec!["b".into(), "a".into(), "a".into()],
            tags: vec!["rust".into()],
            attributes: [("city".to_string(), "Berlin".to_string())].into(),
            page_size: 10,
        }
    }

    #[test]
    fn numbers_parameters_as_trellisd_does() {
        let viewer = Uuid::nil();
        let q = SqlSearch::new(&spec(), "english", viewer);
        let page = &q.page.sql;
        assert!(
            page.starts_with("WITH q AS (SELECT websearch_to_tsquery($1::regconfig, $2) AS tsq)")
        );
        for part in [
            " AND (d.owner_id = $3 OR d.shared)",
            " AND d.collection = ANY($4)",
            " AND d.tags @> $5",
            " AND d.attributes @> $6",
            " ORDER BY m.score DESC, m.id DESC LIMIT $7)",
            "ts_headline($1::regconfig",
        ] {
            assert!(page.contains(part), "{part} in {page}");
        }
        let types: Vec<Type> = q.page.params.iter().map(Param::ty).collect();
        assert_eq!(
            types,
            [
                Type::TEXT,
                Type::TEXT,
                Type::UUID,
                Type::TEXT_ARRAY,
                Type::TEXT_ARRAY,
                Type::JSONB,
                Type::INT8
            ]
        );
        assert!(matches!(&q.page.params[3], Param::TextArray(c) if c == &["a", "b"]));
        assert!(matches!(q.page.params[6], Param::BigInt(11)));
        assert!(
            q.count
                .sql
                .ends_with(" AND d.attributes @> $6 LIMIT 10000) c")
        );
        assert_eq!(q.count.params.len(), 6);
    }

    #[test]
    fn leaves_out_filters_not_asked_for() {
        let bare = SearchSpec {
            collections: Vec::new(),
            tags: Vec::new(),
            attributes: BTreeMap::new(),
            ..spec()
        };
        let q = SqlSearch::new(&bare, "simple", Uuid::nil());
        assert!(!q.page.sql.contains("ANY(") && !q.page.sql.contains("@> $"));
        assert!(q.page.sql.contains("LIMIT $4)"));
        assert!(matches!(&q.page.params[0], Param::Text(l) if l == "simple"));
    }

    #[test]
    fn jsonb_goes_out_in_its_binary_format() {
        let mut out = BytesMut::new();
        Jsonb("{\"a\":1}".into())
            .to_sql(&Type::JSONB, &mut out)
            .expect("encodes");
        assert_eq!(&out[..], b"\x01{\"a\":1}");
        assert!(<Jsonb as ToSql>::accepts(&Type::JSONB));
        assert!(!<Jsonb as ToSql>::accepts(&Type::JSON));
    }
}
