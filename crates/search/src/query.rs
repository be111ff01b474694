//! Search: web-search query syntax through `websearch_to_tsquery` (quoted
//! phrases, OR, -exclusion; the text is always a bound parameter), ranking
//! with `ts_rank_cd` (cover density: adjacent words beat scattered ones;
//! title weight A = 1.0 above body weight B = 0.4), snippets with
//! `ts_headline` computed for the returned page only, keyset pagination on
//! (score, id) or (updated_at, id), and — when nothing matches — a
//! typo-tolerant fallback on word similarity (pg_trgm) with the title and
//! the start of the body, keeping the query's exclusions, that also
//! proposes `did_you_mean`. Every statement filters by visibility, so other
//! users' private documents never show, not in hits, counts or suggestions.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::query_builder::BoxedSqlQuery;
use diesel::sql_types::{Array, BigInt, Double, Jsonb, Nullable, Text, Timestamptz};
use diesel::{QueryableByName, sql_query};
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use trellis_proto::search::v1 as pb;
use trellis_store::Store;
use trellis_store::pg::Cacheable;
use uuid::Uuid;

use crate::documents::ts;
use crate::error::SearchError;

/// Counting stops here; larger totals read as this.
pub const COUNT_CAP: i64 = 10_000;

/// A validated search.
#[derive(Debug, Clone, Serialize)]
pub struct Query {
    pub text: String,
    pub collections: Vec<String>,
    pub tags: Vec<String>,
    pub attributes: BTreeMap<String, String>,
    pub updated_after: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
    pub recency: bool,
    #[serde(skip)]
    pub page_size: usize,
}

impl Query {
    /// Everything that shapes the result list, for binding page tokens.
    pub fn fingerprint(&self, viewer: Uuid) -> String {
        format!(
            "search:{viewer}:{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// The filters alone, as kept in the history.
    pub fn filters_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if !self.collections.is_empty() {
            m.insert("collections".into(), serde_json::json!(self.collections));
        }
        if !self.tags.is_empty() {
            m.insert("tags".into(), serde_json::json!(self.tags));
        }
        if !self.attributes.is_empty() {
            m.insert("attributes".into(), serde_json::json!(self.attributes));
        }
        if let Some(t) = self.updated_after {
            m.insert("updated_after".into(), serde_json::json!(t.to_rfc3339()));
        }
        if let Some(t) = self.updated_before {
            m.insert("updated_before".into(), serde_json::json!(t.to_rfc3339()));
        }
        if self.recency {
            m.insert("order_by".into(), serde_json::json!("recency"));
        }
        serde_json::Value::Object(m)
    }
}

/// Where the next page starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cursor {
    /// The last score's exact bits (`f64::to_bits`) and id: the keyset
    /// comparison needs the very value PostgreSQL computed, and a decimal
    /// JSON number does not promise to parse back to the same bits.
    Score(u64, Uuid),
    /// The last `updated_at` in microseconds (PostgreSQL's precision) and id.
    Time(i64, Uuid),
}

/// Who is searching.
#[derive(Debug, Clone, Copy)]
pub struct Viewer {
    pub id: Uuid,
    /// Administrators see every document.
    pub all: bool,
}

#[derive(Debug, QueryableByName)]
struct HitRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Text)]
    collection: String,
    #[diesel(sql_type = Text)]
    title: String,
    #[diesel(sql_type = Array<Text>)]
    tags: Vec<String>,
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
    #[diesel(sql_type = Double)]
    score: f64,
    #[diesel(sql_type = Text)]
    snippet: String,
}

#[derive(Debug, QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// One page of local results.
#[derive(Debug, Default)]
pub struct Page {
    pub hits: Vec<pb::SearchHit>,
    pub total: i64,
    pub next: Option<Cursor>,
    pub did_you_mean: String,
    pub fuzzy: bool,
}

type Q<'a> = BoxedSqlQuery<'a, Pg, diesel::query_builder::SqlQuery>;

/// Appends the visibility and filter conditions (after a WHERE clause).
fn filters<'a>(mut q: Q<'a>, query: &'a Query, viewer: Viewer, n: &mut usize) -> Q<'a> {
    let mut next = || {
        *n += 1;
        *n
    };
    if !viewer.all {
        q = q
            .sql(format!(" AND (d.owner_id = ${} OR d.shared)", next()))
            .bind::<diesel::sql_types::Uuid, _>(viewer.id);
    }
    if !query.collections.is_empty() {
        q = q
            .sql(format!(" AND d.collection = ANY(${})", next()))
            .bind::<Array<Text>, _>(&query.collections);
    }
    if !query.tags.is_empty() {
        q = q
            .sql(format!(" AND d.tags @> ${}", next()))
            .bind::<Array<Text>, _>(&query.tags);
    }
    if !query.attributes.is_empty() {
        q = q
            .sql(format!(" AND d.attributes @> ${}", next()))
            .bind::<Jsonb, _>(serde_json::json!(query.attributes));
    }
    if let Some(t) = query.updated_after {
        q = q
            .sql(format!(" AND d.updated_at >= ${}", next()))
            .bind::<Timestamptz, _>(t);
    }
    if let Some(t) = query.updated_before {
        q = q
            .sql(format!(" AND d.updated_at < ${}", next()))
            .bind::<Timestamptz, _>(t);
    }
    q
}

const HEADLINE: &str = "StartSel=<mark>, StopSel=</mark>, MaxWords=30, MinWords=12, MaxFragments=2, FragmentDelimiter=\" … \"";

/// Runs `query` for `viewer`, from `cursor`.
pub async fn run(
    store: &Store,
    language: &str,
    query: &Query,
    viewer: Viewer,
    cursor: Option<Cursor>,
) -> Result<Page, SearchError> {
    let mut conn = store.pg().await?;
    let has_text = !query.text.trim().is_empty();
    let limit = query.page_size as i64 + 1;

    // $1 language, $2 query text; then filters; then cursor and limit.
    let mut n = 2;
    let (matches, score) = if has_text {
        (
            "d.tsv @@ q.tsq",
            "ts_rank_cd('{0.1, 0.2, 0.4, 1.0}', d.tsv, q.tsq)::float8",
        )
    } else {
        ("true", "0::float8")
    };
    let mut sql = sql_query(format!(
        "WITH q AS (SELECT websearch_to_tsquery($1::regconfig, $2) AS tsq), \
         page AS (SELECT m.* FROM (SELECT d.id, d.updated_at, {score} AS score \
         FROM search_documents d, q WHERE {matches}"
    ))
    .into_boxed::<Pg>()
    .bind::<Text, _>(language)
    .bind::<Text, _>(&query.text);
    sql = filters(sql, query, viewer, &mut n);
    sql = sql.sql(") m");
    match &cursor {
        Some(Cursor::Score(s, id)) if !query.recency => {
            sql = sql
                .sql(format!(" WHERE (m.score, m.id) < (${}, ${})", n + 1, n + 2))
                .bind::<Double, _>(f64::from_bits(*s))
                .bind::<diesel::sql_types::Uuid, _>(*id);
            n += 2;
        }
        Some(Cursor::Time(micros, id)) if query.recency => {
            let t = DateTime::from_timestamp_micros(*micros).unwrap_or_default();
            sql = sql
                .sql(format!(
                    " WHERE (m.updated_at, m.id) < (${}, ${})",
                    n + 1,
                    n + 2
                ))
                .bind::<Timestamptz, _>(t)
                .bind::<diesel::sql_types::Uuid, _>(*id);
            n += 2;
        }
        Some(_) => {
            return Err(SearchError::field(
                "page_token",
                "is not a page token of this list (altered, or made for other filters or ordering)",
            ));
        }
        None => {}
    }
    let (inner_order, outer_order) = if query.recency {
        (
            "m.updated_at DESC, m.id DESC",
            "page.updated_at DESC, page.id DESC",
        )
    } else {
        ("m.score DESC, m.id DESC", "page.score DESC, page.id DESC")
    };
    // The page first, then snippets for its rows only (ts_headline is the
    // expensive part).
    let snippet = if has_text {
        format!(
            "ts_headline($1::regconfig, CASE WHEN d.body = '' THEN d.title ELSE d.body END, q.tsq, '{HEADLINE}')"
        )
    } else {
        "left(d.body, 240)".to_string()
    };
    sql = sql
        .sql(format!(
            " ORDER BY {inner_order} LIMIT ${}) \
             SELECT d.id, d.external_id, d.collection, d.title, d.tags, d.updated_at, page.score, \
             {snippet} AS snippet \
             FROM page JOIN search_documents d ON d.id = page.id, q ORDER BY {outer_order}",
            n + 1
        ))
        .bind::<BigInt, _>(limit);
    let rows: Vec<HitRow> = Cacheable(sql).load(&mut conn).await?;

    let mut count_q = sql_query(format!(
        "WITH q AS (SELECT websearch_to_tsquery($1::regconfig, $2) AS tsq) \
         SELECT count(*) AS n FROM (SELECT 1 FROM search_documents d, q WHERE {}",
        if has_text { "d.tsv @@ q.tsq" } else { "true" }
    ))
    .into_boxed::<Pg>()
    .bind::<Text, _>(language)
    .bind::<Text, _>(&query.text);
    let mut m = 2;
    count_q = filters(count_q, query, viewer, &mut m);
    count_q = count_q.sql(format!(" LIMIT {COUNT_CAP}) c"));
    let total = Cacheable(count_q)
        .load::<CountRow>(&mut conn)
        .await?
        .into_iter()
        .next()
        .map(|c| c.n)
        .unwrap_or(0);

    let more = rows.len() > query.page_size;
    let rows: Vec<HitRow> = rows.into_iter().take(query.page_size).collect();
    let next = match rows.last() {
        Some(last) if more => Some(if query.recency {
            Cursor::Time(last.updated_at.timestamp_micros(), last.id)
        } else {
            Cursor::Score(last.score.to_bits(), last.id)
        }),
        _ => None,
    };
    let hits = rows.into_iter().map(hit).collect::<Vec<_>>();
    let mut page = Page {
        hits,
        total,
        next,
        did_you_mean: String::new(),
        fuzzy: false,
    };
    if page.hits.is_empty() && cursor.is_none() && has_text {
        fallback(&mut conn, language, query, viewer, &mut page).await?;
    }
    Ok(page)
}

fn hit(r: HitRow) -> pb::SearchHit {
    pb::SearchHit {
        document_id: r.id.to_string(),
        title: r.title,
        snippet: r.snippet,
        score: r.score,
        collection: r.collection,
        source: pb::HitSource::Local as i32,
        url: String::new(),
        tags: r.tags,
        update_time: Some(ts(r.updated_at)),
        external_id: r.external_id,
    }
}

/// One term of a query in web-search syntax: a word or a quoted phrase,
/// possibly excluded with a leading `-`.
#[derive(Debug, PartialEq)]
struct Term {
    excluded: bool,
    phrase: bool,
    text: String,
}

/// The terms of `text` as `websearch_to_tsquery` reads them (roughly: it
/// is only used to find the words for the typo fallback).
fn terms(text: &str) -> Vec<Term> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let excluded = chars[i] == '-' && chars.get(i + 1).is_some_and(|c| !c.is_whitespace());
        if excluded {
            i += 1;
        }
        let phrase = chars[i] == '"';
        let start = if phrase { i + 1 } else { i };
        let mut j = start;
        while j < chars.len()
            && if phrase {
                chars[j] != '"'
            } else {
                !chars[j].is_whitespace() && chars[j] != '"'
            }
        {
            j += 1;
        }
        out.push(Term {
            excluded,
            phrase,
            text: chars[start..j].iter().collect(),
        });
        i = if phrase { j + 1 } else { j.max(i + 1) };
    }
    out
}

/// A word without punctuation, lower-cased; `None` when nothing is left.
fn clean(raw: &str) -> Option<String> {
    let w: String = raw
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '\'' || *c == '+' || *c == '#')
        .collect();
    (!w.is_empty()).then(|| w.to_lowercase())
}

/// The words of a query without its operators and excluded terms.
pub fn plain_words(text: &str) -> Vec<String> {
    terms(text)
        .into_iter()
        .filter(|t| !t.excluded)
        .flat_map(|t| {
            t.text
                .split_whitespace()
                .filter(|w| !w.eq_ignore_ascii_case("or"))
                .filter_map(clean)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The excluded terms of a query as a web-search query matching any of
/// them (`a OR "b c"`); empty when nothing is excluded.
pub fn excluded_query(text: &str) -> String {
    terms(text)
        .into_iter()
        .filter(|t| t.excluded)
        .filter_map(|t| {
            let words: Vec<String> = t.text.split_whitespace().filter_map(clean).collect();
            match words.len() {
                0 => None,
                1 if !t.phrase => words.into_iter().next(),
                _ => Some(format!("\"{}\"", words.join(" "))),
            }
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// pg_trgm's trigrams of a word: lower-cased, padded with two spaces in
/// front and one behind.
fn trigrams(word: &str) -> std::collections::HashSet<[char; 3]> {
    let padded: Vec<char> = "  "
        .chars()
        .chain(word.to_lowercase().chars())
        .chain(" ".chars())
        .collect();
    padded.windows(3).map(|w| [w[0], w[1], w[2]]).collect()
}

/// pg_trgm's similarity of two words.
pub fn similarity(a: &str, b: &str) -> f64 {
    let (ta, tb) = (trigrams(a), trigrams(b));
    let common = ta.intersection(&tb).count() as f64;
    let all = ta.union(&tb).count() as f64;
    if all == 0.0 { 0.0 } else { common / all }
}

/// A corrected query: each word not found among `vocabulary` replaced by
/// the most similar word of it (similarity ≥ 0.3); empty when nothing
/// changes.
pub fn suggest(words: &[String], vocabulary: &[String]) -> String {
    let mut changed = false;
    let mut out = Vec::with_capacity(words.len());
    for w in words {
        if vocabulary.iter().any(|v| v == w) {
            out.push(w.clone());
            continue;
        }
        let best = vocabulary
            .iter()
            .map(|v| (similarity(w, v), v))
            .filter(|(s, _)| *s >= 0.3)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((_, v)) => {
                changed = true;
                out.push(v.clone());
            }
            None => out.push(w.clone()),
        }
    }
    if changed {
        out.join(" ")
    } else {
        String::new()
    }
}

#[derive(Debug, QueryableByName)]
struct FuzzyRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Text)]
    collection: String,
    #[diesel(sql_type = Text)]
    title: String,
    #[diesel(sql_type = Array<Text>)]
    tags: Vec<String>,
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
    #[diesel(sql_type = Double)]
    score: f64,
    #[diesel(sql_type = Text)]
    fuzzy_text: String,
    #[diesel(sql_type = Nullable<Text>)]
    snippet: Option<String>,
}

/// What the typo fallback compares a query with: the title and the start
/// of the body (the expression of the trigram index
/// `search_documents_fuzzy_trgm`; keep the two identical).
const FUZZY_TEXT: &str = "(d.title || ' ' || left(d.body, 2000))";

/// Nothing matched: look for documents whose title or body start has words
/// similar to the query's (still honouring its exclusions and filters).
async fn fallback(
    conn: &mut trellis_store::PgConn<'_>,
    language: &str,
    query: &Query,
    viewer: Viewer,
    page: &mut Page,
) -> Result<(), SearchError> {
    let words = plain_words(&query.text);
    if words.is_empty() {
        return Ok(());
    }
    let plain = words.join(" ");
    let excluded = excluded_query(&query.text);
    let page_size = query.page_size as i64;
    let rows: Vec<FuzzyRow> = conn
        .transaction::<_, SearchError, _>(async |c| {
            sql_query("SELECT set_config('pg_trgm.word_similarity_threshold', '0.3', true)")
                .execute(c)
                .await?;
            let mut n = 1;
            let mut q = sql_query(format!(
                "SELECT d.id, d.external_id, d.collection, d.title, d.tags, d.updated_at, \
                     word_similarity($1, {FUZZY_TEXT})::float8 AS score, \
                     {FUZZY_TEXT} AS fuzzy_text, left(d.body, 240) AS snippet \
                     FROM search_documents d WHERE $1 <% {FUZZY_TEXT}"
            ))
            .into_boxed::<Pg>()
            .bind::<Text, _>(&plain);
            q = filters(q, query, viewer, &mut n);
            if !excluded.is_empty() {
                q = q
                    .sql(format!(
                        " AND NOT d.tsv @@ websearch_to_tsquery(${}::regconfig, ${})",
                        n + 1,
                        n + 2
                    ))
                    .bind::<Text, _>(language)
                    .bind::<Text, _>(&excluded);
                n += 2;
            }
            q = q
                .sql(format!(" ORDER BY score DESC, d.id DESC LIMIT ${}", n + 1))
                .bind::<BigInt, _>(page_size);
            Ok(q.load(c).await?)
        })
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut vocabulary: Vec<String> = Vec::new();
    for r in &rows {
        for w in r.fuzzy_text.split_whitespace().filter_map(clean) {
            if !vocabulary.contains(&w) {
                vocabulary.push(w);
            }
        }
    }
    page.did_you_mean = suggest(&words, &vocabulary);
    // Only what this page holds: the fallback does not count or page.
    page.total = rows.len() as i64;
    page.fuzzy = true;
    page.hits = rows
        .into_iter()
        .map(|r| pb::SearchHit {
            document_id: r.id.to_string(),
            title: r.title,
            snippet: r.snippet.unwrap_or_default(),
            score: r.score,
            collection: r.collection,
            source: pb::HitSource::Local as i32,
            url: String::new(),
            tags: r.tags,
            update_time: Some(ts(r.updated_at)),
            external_id: r.external_id,
        })
        .collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words_drop_operators_and_exclusions() {
        assert_eq!(
            plain_words("\"rust developer\" OR golang -java c++"),
            vec!["rust", "developer", "golang", "c++"]
        );
        assert!(plain_words("-- ; DROP TABLE").contains(&"drop".to_string()));
        // An excluded phrase gives no words either.
        assert_eq!(
            plain_words("pyton -\"backend work\" dev-ops"),
            vec!["pyton", "devops"]
        );
    }

    #[test]
    fn the_fallback_uses_the_expression_of_its_trigram_index() {
        let migration = include_str!("../../../migrations/20261122007000_search/up.sql");
        let expression = FUZZY_TEXT.replace("d.", "");
        assert!(
            migration.contains(&format!("USING GIN ({expression} gin_trgm_ops)")),
            "{expression} is not indexed"
        );
    }

    #[test]
    fn exclusions_become_one_query() {
        assert_eq!(
            excluded_query("pyton -django -\"Backend  work\" - x -\""),
            "django OR \"backend work\""
        );
        assert_eq!(excluded_query("rust developer"), "");
        assert_eq!(excluded_query("-java"), "java");
    }

    #[test]
    fn relevance_cursors_keep_the_exact_score() {
        let tokens = trellis_core::page::PageTokens::new(b"k");
        let id = Uuid::now_v7();
        // ts_rank_cd is a float4 widened to float8; some of these have the
        // longest decimal forms, and the last ones are extremes.
        let mut scores: Vec<f64> = (1..2000u32)
            .map(|i| f64::from(f32::from_bits(0x3c00_0000 + i * 7919)))
            .collect();
        scores.extend([
            0.1f32 as f64,
            1.0 / 3.0,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            0.0,
        ]);
        for s in scores {
            let c = Cursor::Score(s.to_bits(), id);
            let back: Option<Cursor> = tokens.open(&tokens.seal("q", &c), "q").expect("opens");
            let Some(Cursor::Score(bits, back_id)) = back else {
                panic!("not a score cursor");
            };
            assert_eq!(f64::from_bits(bits).to_bits(), s.to_bits(), "{s:e}");
            assert_eq!(back_id, id);
        }
    }

    #[test]
    fn trigram_similarity_matches_pg_trgm() {
        // pg_trgm: similarity('pyton', 'python') = 0.44444445
        assert!((similarity("pyton", "python") - 4.0 / 9.0).abs() < 1e-9);
        assert_eq!(similarity("rust", "rust"), 1.0);
    }

    #[test]
    fn suggestions_fix_only_unknown_words() {
        let vocab = vec![
            "senior".to_string(),
            "python".to_string(),
            "developer".to_string(),
        ];
        assert_eq!(
            suggest(&["pyton".into(), "developer".into()], &vocab),
            "python developer"
        );
        assert_eq!(suggest(&["python".into()], &vocab), "");
        assert_eq!(suggest(&["zzzz".into()], &vocab), "");
    }
}
