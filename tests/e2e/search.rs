//! SearchService end to end on real PostgreSQL: indexing and its
//! validation, ranking, every filter, pagination, query syntax and hostile
//! input, typo fallback, visibility, history, analytics and web search
//! merged by reciprocal rank fusion (against a fake Tavily server).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use trellis_core::config::WebSearchConfig;
use trellis_proto::search::v1 as pb;
use trellis_proto::search::v1::search_service_client::SearchServiceClient;
use trellis_tests::{FakeWeb, TestMesh, TestOptions, WebScript};

use crate::auth::{access, admin_account, auth, bearer, register, violations};
use crate::util::eventually;

pub async fn search_client(mesh: &TestMesh) -> SearchServiceClient<Channel> {
    SearchServiceClient::new(mesh.channel().await)
}

pub fn doc(collection: &str, id: &str, title: &str, body: &str) -> pb::DocumentInput {
    pb::DocumentInput {
        external_id: id.into(),
        collection: collection.into(),
        title: title.into(),
        body: body.into(),
        visibility: pb::Visibility::Private as i32,
        ..Default::default()
    }
}

pub async fn index(
    c: &mut SearchServiceClient<Channel>,
    token: &str,
    docs: Vec<pb::DocumentInput>,
) -> Vec<pb::IndexResult> {
    c.index_documents(bearer(pb::IndexDocumentsRequest { documents: docs }, token))
        .await
        .expect("index")
        .into_inner()
        .results
}

pub async fn find(
    c: &mut SearchServiceClient<Channel>,
    token: &str,
    r: pb::SearchRequest,
) -> Result<pb::SearchResponse, tonic::Status> {
    c.search(bearer(r, token)).await.map(|r| r.into_inner())
}

fn q(text: &str) -> pb::SearchRequest {
    pb::SearchRequest {
        query: text.into(),
        ..Default::default()
    }
}

fn titles(r: &pb::SearchResponse) -> Vec<String> {
    r.hits.iter().map(|h| h.title.clone()).collect()
}

async fn member(mesh: &TestMesh, name: &str) -> (String, String) {
    let r = register(&mut auth(mesh).await, name).await;
    (access(&r), r.account.expect("account").id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_indexed_replaced_read_and_deleted() {
    let mesh = TestMesh::start().await;
    let (token, me) = member(&mesh, "indexer").await;
    let mut c = search_client(&mesh).await;
    let mut d = doc("notes", "n1", "First note", "Hello body");
    d.tags = vec!["a".into(), "b".into(), "a".into()];
    d.attributes.insert("lang".into(), "en".into());
    let res = index(
        &mut c,
        &token,
        vec![d, doc("notes", "n2", "Second", "More")],
    )
    .await;
    assert_eq!(res.len(), 2);
    assert!(res.iter().all(|r| r.created));
    assert_eq!(res[0].external_id, "n1");
    // Indexing the same key again replaces the document.
    let again = index(
        &mut c,
        &token,
        vec![doc("notes", "n1", "First note, edited", "New body")],
    )
    .await;
    assert_eq!(again[0].id, res[0].id);
    assert!(!again[0].created);
    let got = c
        .get_document(bearer(
            pb::GetDocumentRequest {
                id: res[0].id.clone(),
            },
            &token,
        ))
        .await
        .expect("get")
        .into_inner()
        .document
        .expect("doc");
    assert_eq!(got.title, "First note, edited");
    assert_eq!(got.owner_id, me);
    assert_eq!(got.visibility, pb::Visibility::Private as i32);
    let cols = c
        .list_collections(bearer(pb::ListCollectionsRequest {}, &token))
        .await
        .expect("collections")
        .into_inner()
        .collections;
    assert_eq!(
        cols,
        vec![pb::Collection {
            name: "notes".into(),
            document_count: 2
        }]
    );
    let del = c
        .delete_documents(bearer(
            pb::DeleteDocumentsRequest {
                ids: vec![res[1].id.clone(), uuid::Uuid::now_v7().to_string()],
            },
            &token,
        ))
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(del.deleted_count, 1);
    let err = c
        .get_document(bearer(
            pb::GetDocumentRequest {
                id: res[1].id.clone(),
            },
            &token,
        ))
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);

    // Validation: every problem named by its index.
    let bad = vec![
        doc("Bad Name", "x", "t", "b"),
        doc("notes", "", "t", "b"),
        doc("notes", "dup", "t", "b"),
        doc("notes", "dup", "t", "b"),
        doc("notes", "empty", "", ""),
        doc("notes", "ctl", "bad\u{0007}title", "b"),
    ];
    let err = c
        .index_documents(bearer(pb::IndexDocumentsRequest { documents: bad }, &token))
        .await
        .expect_err("invalid");
    let v = violations(&err);
    for f in [
        "documents[0].collection",
        "documents[1].external_id",
        "documents[3].external_id",
        "documents[4].title",
        "documents[5].title",
    ] {
        assert!(v.contains(&f.to_string()), "{f} in {v:?}");
    }
    let many: Vec<_> = (0..501)
        .map(|i| doc("notes", &format!("m{i}"), "t", "b"))
        .collect();
    let err = c
        .index_documents(bearer(
            pb::IndexDocumentsRequest { documents: many },
            &token,
        ))
        .await
        .expect_err("too many");
    assert_eq!(violations(&err), vec!["documents"]);
    let err = c
        .get_document(bearer(pb::GetDocumentRequest { id: "nope".into() }, &token))
        .await
        .expect_err("bad id");
    assert_eq!(violations(&err), vec!["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_outrank_bodies_and_phrases_outrank_scattered_words() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "ranker").await;
    let mut c = search_client(&mesh).await;
    index(
        &mut c,
        &token,
        vec![
            doc(
                "kb",
                "body",
                "Weekly notes",
                "We talked about kubernetes upgrades for an hour.",
            ),
            doc(
                "kb",
                "title",
                "Kubernetes upgrades",
                "Notes from the weekly meeting.",
            ),
            doc(
                "kb",
                "scattered",
                "Machine room",
                "The learning curve of this old machine was steep; nothing about models.",
            ),
            doc(
                "kb",
                "phrase",
                "Course notes",
                "An introduction to machine learning for engineers.",
            ),
        ],
    )
    .await;
    let r = find(&mut c, &token, q("kubernetes")).await.expect("search");
    assert_eq!(titles(&r)[..2], ["Kubernetes upgrades", "Weekly notes"]);
    assert!(r.hits[0].score > r.hits[1].score);
    assert_eq!(r.estimated_total_size, 2);
    assert!(r.took.is_some());
    // Snippets highlight the match.
    assert!(
        r.hits[1].snippet.contains("<mark>kubernetes</mark>"),
        "{}",
        r.hits[1].snippet
    );
    let r = find(&mut c, &token, q("machine learning"))
        .await
        .expect("search");
    assert_eq!(titles(&r)[0], "Course notes", "{:?}", titles(&r));
    // Quoted phrase: only the adjacent words.
    let r = find(&mut c, &token, q("\"machine learning\""))
        .await
        .expect("phrase");
    assert_eq!(titles(&r), vec!["Course notes"]);
    // OR and exclusion.
    let r = find(&mut c, &token, q("kubernetes OR machine -steep"))
        .await
        .expect("or");
    let t: HashSet<String> = titles(&r).into_iter().collect();
    assert_eq!(
        t,
        ["Kubernetes upgrades", "Weekly notes", "Course notes"]
            .map(String::from)
            .into()
    );
}

/// The collection of generated report `i`.
fn collection_of(i: usize) -> &'static str {
    if i.is_multiple_of(3) {
        "alpha"
    } else if i % 5 == 4 {
        "gamma"
    } else {
        "beta"
    }
}

/// `token`'s history (newest first) once an entry matching `ready` is there.
async fn eventually_history(
    c: &SearchServiceClient<Channel>,
    token: &str,
    ready: impl Fn(&pb::SearchHistoryEntry) -> bool,
) -> Vec<pb::SearchHistoryEntry> {
    let list = || {
        let mut c = c.clone();
        let token = token.to_string();
        async move {
            c.list_search_history(bearer(
                pb::ListSearchHistoryRequest {
                    page_size: 100,
                    ..Default::default()
                },
                &token,
            ))
            .await
            .map(|r| r.into_inner().entries)
            .unwrap_or_default()
        }
    };
    assert!(
        eventually(Duration::from_secs(3), || async {
            list().await.iter().any(&ready)
        })
        .await,
        "no such history entry"
    );
    list().await.into_iter().filter(|e| ready(e)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_order_and_pagination() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "filterer").await;
    let mut c = search_client(&mesh).await;
    let mut docs = Vec::new();
    for i in 0..45 {
        let mut d = doc(
            collection_of(i),
            &format!("d{i:02}"),
            &format!("Report number {i}"),
            &format!("quarterly report body {i}"),
        );
        d.tags = if i % 2 == 0 {
            vec!["even".into(), "all".into()]
        } else {
            vec!["all".into()]
        };
        if i % 3 == 0 {
            d.tags.push("third".into());
        }
        d.attributes
            .insert("region".into(), if i % 5 == 0 { "eu" } else { "us" }.into());
        docs.push(d);
    }
    index(&mut c, &token, docs).await;
    let base = || pb::SearchRequest {
        query: "report".into(),
        ..Default::default()
    };
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            collections: vec!["alpha".into()],
            ..base()
        },
    )
    .await
    .expect("c");
    assert_eq!(r.estimated_total_size, 15);
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            tags: vec!["even".into()],
            page_size: 100,
            ..base()
        },
    )
    .await
    .expect("t");
    assert_eq!(r.hits.len(), 23);
    let mut attrs = HashMap::new();
    attrs.insert("region".to_string(), "eu".to_string());
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            attributes: attrs,
            page_size: 100,
            ..base()
        },
    )
    .await
    .expect("a");
    assert_eq!(r.hits.len(), 9);
    // Several tags: all are required; several collections: any of them;
    // every filter at once: all of them (expected sets from the generator).
    let expect = |keep: &dyn Fn(usize) -> bool| -> HashSet<String> {
        (0..45)
            .filter(|&i| keep(i))
            .map(|i| format!("Report number {i}"))
            .collect()
    };
    let got = |r: &pb::SearchResponse| -> HashSet<String> { titles(r).into_iter().collect() };
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            tags: vec!["even".into(), "third".into()],
            page_size: 100,
            ..base()
        },
    )
    .await
    .expect("two tags");
    assert_eq!(got(&r), expect(&|i| i % 6 == 0));
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            collections: vec!["gamma".into(), "alpha".into()],
            page_size: 100,
            ..base()
        },
    )
    .await
    .expect("two collections");
    assert_eq!(
        got(&r),
        expect(&|i| ["alpha", "gamma"].contains(&collection_of(i)))
    );
    assert_eq!(r.estimated_total_size, 21);
    let mut eu = HashMap::new();
    eu.insert("region".to_string(), "eu".to_string());
    let everything = pb::SearchRequest {
        collections: vec!["beta".into(), "gamma".into()],
        tags: vec!["even".into()],
        attributes: eu.clone(),
        page_size: 100,
        ..base()
    };
    let r = find(&mut c, &token, everything.clone())
        .await
        .expect("all filters");
    assert_eq!(
        got(&r),
        expect(&|i| collection_of(i) != "alpha" && i % 2 == 0 && i % 5 == 0)
    );
    assert!(!r.hits.is_empty());
    let took = r.took.expect("took");
    assert!(took.seconds > 0 || took.nanos > 0, "{took:?}");
    // The history keeps those filters and that latency.
    let entries = eventually_history(&c, &token, |e| e.filters.contains("beta")).await;
    let entry = &entries[0];
    let filters: serde_json::Value = serde_json::from_str(&entry.filters).expect("json");
    assert_eq!(
        filters,
        serde_json::json!({
            "collections": ["beta", "gamma"],
            "tags": ["even"],
            "attributes": {"region": "eu"},
        })
    );
    assert_eq!(entry.result_count, r.estimated_total_size);
    let latency = entry.latency.expect("latency");
    let took_ms = took.seconds * 1000 + i64::from(took.nanos / 1_000_000);
    assert_eq!(
        latency.seconds * 1000 + i64::from(latency.nanos / 1_000_000),
        took_ms
    );
    // Date range: nothing updated in the future, everything before it.
    let future = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 3600,
        nanos: 0,
    };
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            updated_after: Some(future),
            ..base()
        },
    )
    .await
    .expect("after");
    assert_eq!(r.estimated_total_size, 0);
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            updated_before: Some(future),
            ..base()
        },
    )
    .await
    .expect("before");
    assert_eq!(r.estimated_total_size, 45);

    // Pages of 10 by relevance and by recency: every document once.
    for order in [pb::SearchOrder::Relevance, pb::SearchOrder::Recency] {
        let mut seen = HashSet::new();
        let mut token_ = String::new();
        let mut pages = 0;
        loop {
            let r = find(
                &mut c,
                &token,
                pb::SearchRequest {
                    page_size: 10,
                    page_token: token_.clone(),
                    order_by: order as i32,
                    ..base()
                },
            )
            .await
            .expect("page");
            pages += 1;
            for h in &r.hits {
                assert!(seen.insert(h.document_id.clone()), "duplicate {}", h.title);
            }
            if r.next_page_token.is_empty() {
                break;
            }
            token_ = r.next_page_token;
        }
        assert_eq!(seen.len(), 45, "{order:?}");
        assert_eq!(pages, 5);
    }
    // Recency: newest first.
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            order_by: pb::SearchOrder::Recency as i32,
            page_size: 2,
            ..base()
        },
    )
    .await
    .expect("recent");
    assert_eq!(titles(&r), vec!["Report number 44", "Report number 43"]);
    // A token is bound to its query.
    let next = r.next_page_token.clone();
    let err = find(
        &mut c,
        &token,
        pb::SearchRequest {
            page_token: next.clone(),
            page_size: 2,
            ..base()
        },
    )
    .await
    .expect_err("other order");
    assert_eq!(violations(&err), vec!["page_token"]);
    let mut tampered = next.into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let err = find(
        &mut c,
        &token,
        pb::SearchRequest {
            page_token: String::from_utf8(tampered).expect("utf8"),
            order_by: pb::SearchOrder::Recency as i32,
            page_size: 2,
            ..base()
        },
    )
    .await
    .expect_err("tampered");
    assert_eq!(violations(&err), vec!["page_token"]);
    // An empty query lists by recency.
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await
    .expect("empty");
    assert_eq!(titles(&r), vec!["Report number 44"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_get_clear_answers() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "hostile").await;
    let mut c = search_client(&mesh).await;
    index(
        &mut c,
        &token,
        vec![doc("kb", "1", "Safe document", "nothing to see")],
    )
    .await;
    for text in [
        "'; DROP TABLE search_documents; --",
        "\" OR 1=1 --",
        "a & b | !c <-> d:*",
        "((((",
        "-",
        "\"",
        "OR OR OR",
        "日本語 テキスト",
    ] {
        let r = find(&mut c, &token, q(text)).await;
        assert!(r.is_ok(), "{text}: {r:?}");
    }
    let r = find(&mut c, &token, q("document"))
        .await
        .expect("still there");
    assert_eq!(r.hits.len(), 1);
    let err = find(&mut c, &token, q(&"x".repeat(100 * 1024)))
        .await
        .expect_err("too long");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["query"]);
    assert!(err.message().contains("1000"), "{}", err.message());
    let err = find(&mut c, &token, q("bad\u{0000}query"))
        .await
        .expect_err("control");
    assert_eq!(violations(&err), vec!["query"]);
    let err = find(
        &mut c,
        &token,
        pb::SearchRequest {
            collections: vec!["NOT VALID".into()],
            ..q("x")
        },
    )
    .await
    .expect_err("collection");
    assert_eq!(violations(&err), vec!["collections[0]"]);
    let err = find(
        &mut c,
        &token,
        pb::SearchRequest {
            page_size: -1,
            ..q("x")
        },
    )
    .await
    .expect_err("size");
    assert_eq!(violations(&err), vec!["page_size"]);
    let err = c.search(q("x")).await.expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typos_fall_back_to_similar_titles_with_a_suggestion() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "typist").await;
    let mut c = search_client(&mesh).await;
    index(
        &mut c,
        &token,
        vec![
            doc(
                "jobs",
                "1",
                "Senior Python Developer",
                "Backend work with Django.",
            ),
            doc("jobs", "2", "Rust Engineer", "Systems programming."),
        ],
    )
    .await;
    let r = find(&mut c, &token, q("pyton developer"))
        .await
        .expect("search");
    assert!(r.fuzzy);
    assert_eq!(r.did_you_mean, "python developer");
    assert_eq!(titles(&r), vec!["Senior Python Developer"]);
    let r = find(&mut c, &token, q("python developer"))
        .await
        .expect("exact");
    assert!(!r.fuzzy);
    assert_eq!(r.did_you_mean, "");
    let r = find(&mut c, &token, q("zzzzqqq")).await.expect("nothing");
    assert!(r.hits.is_empty());
    assert_eq!(r.did_you_mean, "");

    // A word that is only in a body is found and corrected too.
    let r = find(&mut c, &token, q("sytems")).await.expect("body");
    assert!(r.fuzzy);
    assert_eq!(titles(&r), vec!["Rust Engineer"]);
    assert_eq!(r.did_you_mean, "systems");

    // Exclusions hold in the fallback: words and phrases.
    index(
        &mut c,
        &token,
        vec![doc(
            "jobs",
            "3",
            "Python Data Analyst",
            "Pandas and notebooks.",
        )],
    )
    .await;
    let r = find(&mut c, &token, q("pyton")).await.expect("both");
    let both: HashSet<String> = titles(&r).into_iter().collect();
    assert_eq!(
        both,
        ["Senior Python Developer", "Python Data Analyst"]
            .map(String::from)
            .into()
    );
    assert_eq!(r.estimated_total_size, 2);
    for text in ["pyton -django", "pyton -\"backend work\""] {
        let r = find(&mut c, &token, q(text)).await.expect("excluded");
        assert!(r.fuzzy, "{text}");
        assert_eq!(titles(&r), vec!["Python Data Analyst"], "{text}");
        assert_eq!(r.did_you_mean, "python", "{text}");
    }

    // Analytics count what the query found as typed: a rescued typo is a
    // zero-result query.
    let history = || {
        let mut c = c.clone();
        let t = token.clone();
        async move {
            c.list_search_history(bearer(
                pb::ListSearchHistoryRequest {
                    page_size: 100,
                    ..Default::default()
                },
                &t,
            ))
            .await
            .map(|r| r.into_inner().entries)
            .unwrap_or_default()
        }
    };
    assert!(
        eventually(Duration::from_secs(3), || async {
            history().await.len() == 7
        })
        .await
    );
    let entries = history().await;
    let count = |query: &str| {
        entries
            .iter()
            .find(|e| e.query == query)
            .map(|e| e.result_count)
    };
    assert_eq!(count("pyton developer"), Some(0));
    assert_eq!(count("python developer"), Some(1));
    assert_eq!(count("sytems"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_documents_of_others_never_show() {
    let mesh = TestMesh::start().await;
    let (alice, _) = member(&mesh, "alicesearch").await;
    let (bob, _) = member(&mesh, "bobsearch").await;
    let mut c = search_client(&mesh).await;
    let secret = index(
        &mut c,
        &alice,
        vec![doc(
            "private",
            "s",
            "Secret merger plans",
            "Confidential acquisition",
        )],
    )
    .await;
    let mut shared = doc("public", "p", "Public roadmap", "Shared acquisition notes");
    shared.visibility = pb::Visibility::Shared as i32;
    index(&mut c, &alice, vec![shared]).await;

    let r = find(&mut c, &bob, q("acquisition")).await.expect("bob");
    assert_eq!(titles(&r), vec!["Public roadmap"]);
    assert_eq!(r.estimated_total_size, 1, "not even in counts");
    let r = find(&mut c, &bob, q("mergr")).await.expect("typo");
    assert!(
        r.hits.is_empty() && r.did_you_mean.is_empty(),
        "not even in suggestions: {r:?}"
    );
    // The positive control: the owner gets the suggestion Bob does not.
    let r = find(&mut c, &alice, q("mergr"))
        .await
        .expect("owner's typo");
    assert_eq!(r.did_you_mean, "merger");
    assert_eq!(titles(&r), vec!["Secret merger plans"]);
    // A word only in the private body: the same.
    let r = find(&mut c, &bob, q("confidentail"))
        .await
        .expect("body typo");
    assert!(r.hits.is_empty() && r.did_you_mean.is_empty(), "{r:?}");
    let r = find(&mut c, &alice, q("confidentail"))
        .await
        .expect("owner");
    assert_eq!(r.did_you_mean, "confidential");
    let r = find(
        &mut c,
        &bob,
        pb::SearchRequest {
            collections: vec!["private".into()],
            ..Default::default()
        },
    )
    .await
    .expect("collection");
    assert!(r.hits.is_empty());
    let cols = c
        .list_collections(bearer(pb::ListCollectionsRequest {}, &bob))
        .await
        .expect("cols")
        .into_inner()
        .collections;
    assert_eq!(
        cols.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        vec!["public"]
    );
    let err = c
        .get_document(bearer(
            pb::GetDocumentRequest {
                id: secret[0].id.clone(),
            },
            &bob,
        ))
        .await
        .expect_err("invisible");
    assert_eq!(err.code(), Code::NotFound);
    let del = c
        .delete_documents(bearer(
            pb::DeleteDocumentsRequest {
                ids: vec![secret[0].id.clone()],
            },
            &bob,
        ))
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(del.deleted_count, 0);
    // Alice still has it; an administrator sees it.
    let r = find(&mut c, &alice, q("merger")).await.expect("alice");
    assert_eq!(r.hits.len(), 1);
    let (_, admin) = admin_account(&mesh, "searchadmin").await;
    let r = find(&mut c, &admin, q("acquisition")).await.expect("admin");
    assert_eq!(r.hits.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_recorded_listed_cleared_and_analysed() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "historian").await;
    let (other, _) = member(&mesh, "otherhist").await;
    let mut c = search_client(&mesh).await;
    index(
        &mut c,
        &token,
        vec![doc("kb", "1", "Rust guide", "ownership and borrowing")],
    )
    .await;
    for text in ["rust", "Rust", "nothing-here-xyz", "rust  "] {
        find(&mut c, &token, q(text)).await.expect("search");
    }
    find(&mut c, &other, q("rust")).await.expect("other");
    let lister = c.clone();
    let list = |t: String, page_token: String| {
        let mut c = lister.clone();
        async move {
            c.list_search_history(bearer(
                pb::ListSearchHistoryRequest {
                    page_size: 3,
                    page_token,
                },
                &t,
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    assert!(
        eventually(Duration::from_secs(3), || {
            let l = list(token.clone(), String::new());
            async move {
                l.await
                    .map(|p| p.entries.len() == 3 && !p.next_page_token.is_empty())
                    .unwrap_or(false)
            }
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(3), || {
            let l = list(other.clone(), String::new());
            async move { l.await.map(|p| p.entries.len() == 1).unwrap_or(false) }
        })
        .await
    );
    let first = list(token.clone(), String::new()).await.expect("page 1");
    assert_eq!(first.entries[0].query, "rust", "newest first (trimmed)");
    let second = list(token.clone(), first.next_page_token.clone())
        .await
        .expect("page 2");
    assert_eq!(second.entries.len(), 1);
    assert_eq!(second.entries[0].query, "rust");
    assert_eq!(second.entries[0].result_count, 1);
    let zero = first
        .entries
        .iter()
        .find(|e| e.query == "nothing-here-xyz")
        .expect("zero");
    assert_eq!(zero.result_count, 0);

    // Analytics are for administrators.
    let err = c
        .get_popular_queries(bearer(pb::GetPopularQueriesRequest::default(), &token))
        .await
        .expect_err("member");
    assert_eq!(err.code(), Code::PermissionDenied);
    let (_, admin) = admin_account(&mesh, "analyst").await;
    let pop = c
        .get_popular_queries(bearer(pb::GetPopularQueriesRequest::default(), &admin))
        .await
        .expect("popular")
        .into_inner();
    assert_eq!(
        pop.top_queries[0],
        pb::QueryCount {
            query: "rust".into(),
            count: 4
        }
    );
    // The other user's "rust" found nothing: the document is private.
    assert_eq!(
        pop.zero_result_queries,
        vec![
            pb::QueryCount {
                query: "nothing-here-xyz".into(),
                count: 1
            },
            pb::QueryCount {
                query: "rust".into(),
                count: 1
            },
        ]
    );

    let cleared = c
        .clear_search_history(bearer(pb::ClearSearchHistoryRequest {}, &token))
        .await
        .expect("clear")
        .into_inner();
    assert_eq!(cleared.deleted_count, 4);
    assert!(
        list(token.clone(), String::new())
            .await
            .expect("empty")
            .entries
            .is_empty()
    );
    assert_eq!(
        list(other.clone(), String::new())
            .await
            .expect("other's")
            .entries
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_results_are_fused_with_local_ones_and_failures_degrade() {
    let web = FakeWeb::start(WebScript::Results(vec![
        (
            "Rust on the web".into(),
            "https://example.org/rust".into(),
            "Rust language news".into(),
        ),
        (
            "Second web hit".into(),
            "https://example.org/2".into(),
            "More rust".into(),
        ),
    ]))
    .await;
    let url = web.url();
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.search.web = Some(WebSearchConfig {
            url,
            api_key: Some("tvly-test".into()),
            timeout: Duration::from_millis(500),
            ..Default::default()
        });
    })
    .await;
    let (token, _) = member(&mesh, "webber").await;
    let mut c = search_client(&mesh).await;
    index(
        &mut c,
        &token,
        vec![
            doc("kb", "1", "Rust handbook", "local rust notes"),
            doc("kb", "2", "Rust tips", "more rust"),
        ],
    )
    .await;
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            include_web: true,
            ..q("rust")
        },
    )
    .await
    .expect("fused");
    let sources: Vec<i32> = r.hits.iter().map(|h| h.source).collect();
    let (l, w) = (pb::HitSource::Local as i32, pb::HitSource::Web as i32);
    assert_eq!(sources, vec![l, w, l, w], "{:?}", titles(&r));
    assert_eq!(r.hits[1].url, "https://example.org/rust");
    assert!(r.warnings.is_empty());
    assert_eq!(web.last_body().expect("body")["query"], "rust");
    // Without include_web the provider is not asked.
    find(&mut c, &token, q("rust")).await.expect("local");
    assert_eq!(web.hits(), 1);
    // Failures and timeouts degrade to local results with a warning.
    web.set(WebScript::Status(500));
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            include_web: true,
            ..q("rust")
        },
    )
    .await
    .expect("degraded");
    assert_eq!(r.hits.len(), 2);
    assert!(r.warnings[0].contains("HTTP 500"), "{:?}", r.warnings);
    web.set(WebScript::Slow(Duration::from_secs(3)));
    let t = std::time::Instant::now();
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            include_web: true,
            ..q("rust")
        },
    )
    .await
    .expect("slow");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(r.hits.len(), 2);
    assert!(r.warnings[0].contains("timed out"), "{:?}", r.warnings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tag_and_attribute_filters_are_field_violations() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "filtercheck").await;
    let mut c = search_client(&mesh).await;
    let mut d = doc("kb", "1", "Tagged report", "quarterly numbers");
    d.tags = vec!["finance".into()];
    d.attributes.insert("region".into(), "eu".into());
    index(&mut c, &token, vec![d]).await;

    // NUL reaches PostgreSQL as a bound parameter and would be refused
    // there (an INTERNAL); it must be the caller's error instead.
    let cases: Vec<(pb::SearchRequest, Vec<&str>)> = vec![
        (
            pb::SearchRequest {
                tags: vec!["fin\u{0}ance".into()],
                ..q("report")
            },
            vec!["tags[0]"],
        ),
        (
            pb::SearchRequest {
                tags: vec!["finance".into(), "  ".into(), "x".repeat(65)],
                ..q("report")
            },
            vec!["tags[1]", "tags[2]"],
        ),
        (
            pb::SearchRequest {
                tags: (0..33).map(|i| format!("t{i}")).collect(),
                ..q("report")
            },
            vec!["tags"],
        ),
        (
            pb::SearchRequest {
                attributes: [("region".to_string(), "e\u{0}u".to_string())].into(),
                ..q("report")
            },
            vec!["attributes[region]"],
        ),
        (
            pb::SearchRequest {
                attributes: [
                    ("re\u{0}gion".to_string(), "eu".to_string()),
                    (String::new(), "eu".to_string()),
                    ("long".to_string(), "v".repeat(257)),
                ]
                .into(),
                ..q("report")
            },
            vec!["attributes[]", "attributes[long]", "attributes[re\\0gion]"],
        ),
        (
            pb::SearchRequest {
                attributes: (0..33)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..q("report")
            },
            vec!["attributes"],
        ),
    ];
    for (request, fields) in cases {
        let err = find(&mut c, &token, request.clone())
            .await
            .expect_err("invalid filter");
        assert_eq!(err.code(), Code::InvalidArgument, "{request:?}: {err:?}");
        assert_eq!(violations(&err), fields, "{request:?}");
    }
    // The same filters within the rules work, and still filter.
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            tags: vec![" finance ".into()],
            attributes: [("region".to_string(), "eu".to_string())].into(),
            ..q("report")
        },
    )
    .await
    .expect("valid filters");
    assert_eq!(titles(&r), vec!["Tagged report"]);
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            attributes: [("region".to_string(), "us".to_string())].into(),
            ..q("report")
        },
    )
    .await
    .expect("other value");
    assert!(r.hits.is_empty());
    // Documents follow the same rules.
    let mut bad = doc("kb", "2", "t", "b");
    bad.tags = vec!["a\u{0}b".into()];
    bad.attributes.insert("k".into(), "v\u{0}".into());
    let err = c
        .index_documents(bearer(
            pb::IndexDocumentsRequest {
                documents: vec![bad],
            },
            &token,
        ))
        .await
        .expect_err("bad document");
    assert_eq!(
        violations(&err),
        vec!["documents[0].tags[0]", "documents[0].attributes[k]"]
    );
}

/// Every page of `request` (of `page_size`), in order.
async fn all_pages(
    c: &mut SearchServiceClient<Channel>,
    token: &str,
    request: pb::SearchRequest,
) -> Vec<pb::SearchHit> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    for _ in 0..100 {
        let r = find(
            c,
            token,
            pb::SearchRequest {
                page_token: page_token.clone(),
                ..request.clone()
            },
        )
        .await
        .expect("page");
        assert!(r.hits.len() <= request.page_size as usize);
        out.extend(r.hits);
        if r.next_page_token.is_empty() {
            return out;
        }
        page_token = r.next_page_token;
    }
    panic!("more than 100 pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relevance_pages_with_many_distinct_scores_equal_the_one_shot_ranking() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "pager").await;
    let mut c = search_client(&mesh).await;
    // The words' distance sets the cover density score: 50 distances give
    // 50 distinct scores, and every fifth one is indexed twice (ties,
    // broken by id).
    let mut docs = Vec::new();
    for i in 0..50 {
        let body = format!("alpha {} beta", "filler ".repeat(i));
        docs.push(doc("kb", &format!("d{i}"), &format!("Doc {i}"), &body));
        if i % 5 == 0 {
            docs.push(doc("kb", &format!("t{i}"), &format!("Twin {i}"), &body));
        }
    }
    index(&mut c, &token, docs).await;
    let request = |page_size| pb::SearchRequest {
        query: "alpha beta".into(),
        page_size,
        ..Default::default()
    };
    let one_shot = find(&mut c, &token, request(100)).await.expect("one shot");
    assert_eq!(one_shot.hits.len(), 60);
    assert!(one_shot.next_page_token.is_empty());
    let distinct: HashSet<u64> = one_shot.hits.iter().map(|h| h.score.to_bits()).collect();
    assert_eq!(distinct.len(), 50, "distinct scores");
    assert!(
        one_shot.hits.windows(2).all(|w| w[0].score >= w[1].score),
        "best first"
    );
    // The closest pair ranks first: the twins at distance 0, tied.
    let top: HashSet<String> = titles(&one_shot)[..2].iter().cloned().collect();
    assert_eq!(top, ["Doc 0", "Twin 0"].map(String::from).into());
    assert_eq!(one_shot.hits[0].score, one_shot.hits[1].score);
    let ids = |hits: &[pb::SearchHit]| -> Vec<String> {
        hits.iter().map(|h| h.document_id.clone()).collect()
    };
    for size in [7, 10, 13] {
        let paged = all_pages(&mut c, &token, request(size)).await;
        assert_eq!(ids(&paged), ids(&one_shot.hits), "pages of {size}");
        let unique: HashSet<String> = ids(&paged).into_iter().collect();
        assert_eq!(unique.len(), 60, "no duplicates in pages of {size}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recency_follows_the_last_update_and_date_ranges_split_the_corpus() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "recent").await;
    let mut c = search_client(&mesh).await;
    // One call each: every document gets its own update time.
    let mut times = Vec::new();
    for name in ["first", "second", "third", "fourth"] {
        let res = index(
            &mut c,
            &token,
            vec![doc("kb", name, &format!("Memo {name}"), "weekly memo")],
        )
        .await;
        let got = c
            .get_document(bearer(
                pb::GetDocumentRequest {
                    id: res[0].id.clone(),
                },
                &token,
            ))
            .await
            .expect("get")
            .into_inner()
            .document
            .expect("doc");
        times.push(got.update_time.expect("update time"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recent = |query: &str| pb::SearchRequest {
        query: query.into(),
        order_by: pb::SearchOrder::Recency as i32,
        ..Default::default()
    };
    let r = find(&mut c, &token, recent("memo")).await.expect("recent");
    assert_eq!(
        titles(&r),
        vec!["Memo fourth", "Memo third", "Memo second", "Memo first"]
    );
    // Re-indexing the oldest makes it the newest (and keeps its id).
    index(
        &mut c,
        &token,
        vec![doc("kb", "first", "Memo first", "weekly memo, revised")],
    )
    .await;
    let r = find(&mut c, &token, recent("memo"))
        .await
        .expect("after update");
    assert_eq!(
        titles(&r),
        vec!["Memo first", "Memo fourth", "Memo third", "Memo second"]
    );
    // Recency pages of one follow the same order.
    let paged = all_pages(
        &mut c,
        &token,
        pb::SearchRequest {
            page_size: 1,
            ..recent("memo")
        },
    )
    .await;
    let paged: Vec<String> = paged.into_iter().map(|h| h.title).collect();
    assert_eq!(paged, titles(&r));
    // By relevance (equal scores here) ties go by id, which re-indexing
    // keeps: the first document stays last.
    let r = find(&mut c, &token, q("weekly")).await.expect("relevance");
    assert_eq!(titles(&r).last().map(String::as_str), Some("Memo first"));

    // A range from the third's update time (inclusive) to the fourth's
    // (exclusive) holds exactly the third; after the third: third and
    // fourth and the re-indexed first; before the third: only the second.
    let ranged = |after: Option<prost_types::Timestamp>, before: Option<prost_types::Timestamp>| {
        pb::SearchRequest {
            updated_after: after,
            updated_before: before,
            page_size: 100,
            ..recent("memo")
        }
    };
    let r = find(&mut c, &token, ranged(Some(times[2]), Some(times[3])))
        .await
        .expect("split");
    assert_eq!(titles(&r), vec!["Memo third"]);
    let r = find(&mut c, &token, ranged(Some(times[2]), None))
        .await
        .expect("after");
    assert_eq!(titles(&r), vec!["Memo first", "Memo fourth", "Memo third"]);
    let r = find(&mut c, &token, ranged(None, Some(times[2])))
        .await
        .expect("before");
    assert_eq!(titles(&r), vec!["Memo second"]);
    assert_eq!(r.estimated_total_size, 1);
    // An empty or inverted range is the caller's mistake.
    for (a, b) in [(times[2], times[2]), (times[3], times[1])] {
        let err = find(&mut c, &token, ranged(Some(a), Some(b)))
            .await
            .expect_err("inverted");
        assert_eq!(violations(&err), vec!["updated_after"]);
    }
    let err = find(
        &mut c,
        &token,
        ranged(
            Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -5,
            }),
            None,
        ),
    )
    .await
    .expect_err("bad timestamp");
    assert_eq!(violations(&err), vec!["updated_after"]);
}

async fn web_mesh(url: String, key: &str) -> TestMesh {
    let key = key.to_string();
    TestMesh::start_with(TestOptions::default(), |c| {
        c.search.web = Some(WebSearchConfig {
            url,
            api_key: Some(key),
            timeout: Duration::from_millis(500),
            ..Default::default()
        });
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_search_sends_its_key_and_bad_answers_degrade_to_local_results() {
    let web = FakeWeb::start(WebScript::Results(vec![(
        "Gardening on the web".into(),
        "https://example.org/garden".into(),
        "Tomatoes and roses".into(),
    )]))
    .await;
    web.require_key("tvly-right");
    let mesh = web_mesh(web.url(), "tvly-right").await;
    let (token, _) = member(&mesh, "gardener").await;
    let mut c = search_client(&mesh).await;
    index(
        &mut c,
        &token,
        vec![
            doc("kb", "1", "Gardening basics", "soil and water"),
            doc("kb", "2", "Gardening tools", "spades"),
        ],
    )
    .await;
    let with_web = |page_size, page_token: String| pb::SearchRequest {
        include_web: true,
        page_size,
        page_token,
        ..q("gardening")
    };
    let r = find(&mut c, &token, with_web(0, String::new()))
        .await
        .expect("fused");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.hits.len(), 3);
    assert_eq!(r.hits[1].source, pb::HitSource::Web as i32);
    assert_eq!(
        web.last_authorization().as_deref(),
        Some("Bearer tvly-right")
    );
    assert_eq!(web.last_body().expect("body")["api_key"], "tvly-right");
    // Only the first page asks the web; later pages are local.
    let first = find(&mut c, &token, with_web(1, String::new()))
        .await
        .expect("page 1");
    assert_eq!(web.hits(), 2);
    let second = find(&mut c, &token, with_web(1, first.next_page_token.clone()))
        .await
        .expect("page 2");
    assert_eq!(web.hits(), 2, "page 2 did not ask the web");
    assert!(
        second
            .hits
            .iter()
            .all(|h| h.source == pb::HitSource::Local as i32)
    );

    // Malformed answers: not JSON, or JSON of the wrong shape.
    let local_only = |r: &pb::SearchResponse| {
        r.hits.len() == 2
            && r.hits
                .iter()
                .all(|h| h.source == pb::HitSource::Local as i32)
    };
    for body in [
        "<html>oops</html>",
        "{\"results\": 5}",
        "{\"results\": [{\"title\": 7}]}",
    ] {
        web.set(WebScript::Raw(body.into()));
        let r = find(&mut c, &token, with_web(0, String::new()))
            .await
            .expect("degraded");
        assert!(local_only(&r), "{body}: {r:?}");
        assert_eq!(
            r.warnings,
            vec!["web search sent an unreadable answer; showing local results only"],
            "{body}"
        );
    }

    // A wrong key: the provider's 401 becomes a warning too.
    web.set(WebScript::Results(vec![(
        "Gardening on the web".into(),
        "https://example.org/garden".into(),
        "Tomatoes".into(),
    )]));
    let wrong = web_mesh(web.url(), "tvly-wrong").await;
    let (token, _) = member(&wrong, "gardener2").await;
    let mut c = search_client(&wrong).await;
    index(
        &mut c,
        &token,
        vec![doc("kb", "1", "Gardening basics", "soil")],
    )
    .await;
    let r = find(&mut c, &token, with_web(0, String::new()))
        .await
        .expect("unauthorized");
    assert_eq!(titles(&r), vec!["Gardening basics"]);
    assert!(r.warnings[0].contains("HTTP 401"), "{:?}", r.warnings);
    assert_eq!(
        web.last_authorization().as_deref(),
        Some("Bearer tvly-wrong")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_or_unconfigured_web_search_is_a_warning() {
    // A port nobody listens on any more.
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    };
    let mesh = web_mesh(format!("http://{closed}"), "tvly-x").await;
    let (token, _) = member(&mesh, "offline").await;
    let mut c = search_client(&mesh).await;
    index(
        &mut c,
        &token,
        vec![doc("kb", "1", "Offline notes", "local")],
    )
    .await;
    let request = pb::SearchRequest {
        include_web: true,
        ..q("offline")
    };
    let r = find(&mut c, &token, request.clone())
        .await
        .expect("unreachable");
    assert_eq!(titles(&r), vec!["Offline notes"]);
    assert_eq!(
        r.warnings,
        vec!["web search unreachable; showing local results only"]
    );

    // Off by default: asking for it says so, and local search still works.
    let plain = TestMesh::start().await;
    let (token, _) = member(&plain, "noweb").await;
    let mut c = search_client(&plain).await;
    index(
        &mut c,
        &token,
        vec![doc("kb", "1", "Offline notes", "local")],
    )
    .await;
    let r = find(&mut c, &token, request).await.expect("not configured");
    assert_eq!(titles(&r), vec!["Offline notes"]);
    assert_eq!(
        r.warnings,
        vec!["web search is not configured (search.web)"]
    );
    let r = find(&mut c, &token, q("offline"))
        .await
        .expect("no web asked");
    assert!(r.warnings.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_validates_and_administrators_reach_any_document() {
    let mesh = TestMesh::start().await;
    let (alice, _) = member(&mesh, "alicev").await;
    let (bob, _) = member(&mesh, "bobv").await;
    let (_, admin) = admin_account(&mesh, "adminv").await;
    let mut c = search_client(&mesh).await;
    let res = index(
        &mut c,
        &alice,
        vec![doc("private", "1", "Alice's plan", "secret plan")],
    )
    .await;
    let id = res[0].id.clone();
    let shared_client = c.clone();

    // DeleteDocuments: 1 to 500 ids, each a UUID.
    let delete = |ids: Vec<String>, token: &str| {
        let mut c = shared_client.clone();
        let token = token.to_string();
        async move {
            c.delete_documents(bearer(pb::DeleteDocumentsRequest { ids }, &token))
                .await
                .map(|r| r.into_inner().deleted_count)
        }
    };
    let err = delete(vec![], &alice).await.expect_err("empty");
    assert_eq!(violations(&err), vec!["ids"]);
    let many: Vec<String> = (0..501).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let err = delete(many, &alice).await.expect_err("too many");
    assert_eq!(violations(&err), vec!["ids"]);
    let err = delete(vec![id.clone(), "not-a-uuid".into(), "".into()], &alice)
        .await
        .expect_err("bad ids");
    assert_eq!(violations(&err), vec!["ids[1]", "ids[2]"]);
    // Nothing was deleted by the refused calls.
    let get = |id: &str, token: &str| {
        let mut c = shared_client.clone();
        let (id, token) = (id.to_string(), token.to_string());
        async move {
            c.get_document(bearer(pb::GetDocumentRequest { id }, &token))
                .await
                .map(|r| r.into_inner().document.expect("document"))
        }
    };
    assert_eq!(
        get(&id, &alice).await.expect("still there").title,
        "Alice's plan"
    );

    // Search: unknown order and page size.
    let err = find(
        &mut c,
        &alice,
        pb::SearchRequest {
            order_by: 42,
            ..q("plan")
        },
    )
    .await
    .expect_err("order");
    assert_eq!(violations(&err), vec!["order_by"]);
    let r = find(
        &mut c,
        &alice,
        pb::SearchRequest {
            page_size: 100_000,
            ..q("plan")
        },
    )
    .await
    .expect("clamped page size");
    assert_eq!(r.hits.len(), 1);

    // ListSearchHistory: page size and tokens, bound to their owner.
    for i in 0..3 {
        find(&mut c, &alice, q(&format!("plan {i}")))
            .await
            .expect("search");
    }
    let history = |page_size: i32, page_token: String, token: &str| {
        let mut c = shared_client.clone();
        let token = token.to_string();
        async move {
            c.list_search_history(bearer(
                pb::ListSearchHistoryRequest {
                    page_size,
                    page_token,
                },
                &token,
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    // The history is written after the answer.
    assert!(
        eventually(Duration::from_secs(3), || async {
            history(0, String::new(), &alice)
                .await
                .map(|h| h.entries.len() == 4)
                .unwrap_or(false)
        })
        .await
    );
    let err = history(-1, String::new(), &alice).await.expect_err("size");
    assert_eq!(violations(&err), vec!["page_size"]);
    let err = history(2, "garbage".into(), &alice)
        .await
        .expect_err("token");
    assert_eq!(violations(&err), vec!["page_token"]);
    let first = history(2, String::new(), &alice).await.expect("page");
    assert_eq!(first.entries.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let err = history(2, first.next_page_token.clone(), &bob)
        .await
        .expect_err("another user's token");
    assert_eq!(violations(&err), vec!["page_token"]);
    assert!(
        history(0, String::new(), &bob)
            .await
            .expect("bob's")
            .entries
            .is_empty()
    );

    // GetPopularQueries: the window and the limit.
    let popular = |r: pb::GetPopularQueriesRequest| {
        let mut c = shared_client.clone();
        let admin = admin.clone();
        async move {
            c.get_popular_queries(bearer(r, &admin))
                .await
                .map(|r| r.into_inner())
        }
    };
    let at = |seconds: i64| {
        Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp() + seconds,
            nanos: 0,
        })
    };
    let err = popular(pb::GetPopularQueriesRequest {
        start_time: at(0),
        end_time: at(-60),
        ..Default::default()
    })
    .await
    .expect_err("inverted window");
    assert_eq!(violations(&err), vec!["start_time"]);
    let err = popular(pb::GetPopularQueriesRequest {
        limit: -1,
        end_time: Some(prost_types::Timestamp {
            seconds: 0,
            nanos: 2_000_000_000,
        }),
        ..Default::default()
    })
    .await
    .expect_err("limit and timestamp");
    assert_eq!(violations(&err), vec!["end_time", "limit"]);
    // A window that ended an hour ago holds none of today's searches.
    let past = popular(pb::GetPopularQueriesRequest {
        start_time: at(-7200),
        end_time: at(-3600),
        ..Default::default()
    })
    .await
    .expect("past");
    assert!(past.top_queries.is_empty());
    let now = popular(pb::GetPopularQueriesRequest {
        limit: 2,
        ..Default::default()
    })
    .await
    .expect("limited");
    assert_eq!(now.top_queries.len(), 2);
    let err = c
        .get_popular_queries(bearer(pb::GetPopularQueriesRequest::default(), &bob))
        .await
        .expect_err("members");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Another member: the document does not exist for them.
    assert_eq!(
        get(&id, &bob).await.expect_err("bob").code(),
        Code::NotFound
    );
    assert_eq!(delete(vec![id.clone()], &bob).await.expect("bob"), 0);
    // An administrator reads and deletes anyone's document.
    let got = get(&id, &admin).await.expect("admin reads");
    assert_eq!(got.visibility, pb::Visibility::Private as i32);
    assert_eq!(
        delete(vec![id.clone()], &admin)
            .await
            .expect("admin deletes"),
        1
    );
    assert_eq!(
        get(&id, &alice).await.expect_err("gone").code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_language_decides_stemming_and_stop_words() {
    let docs = || {
        vec![
            doc("kb", "de", "Die Häuser der Stadt", "Alte Häuser am Fluss"),
            doc(
                "kb",
                "en",
                "Running the marathon",
                "The runners were running fast",
            ),
        ]
    };
    let mut found = HashMap::new();
    for language in ["english", "german", "simple"] {
        let mesh = TestMesh::start_with(TestOptions::default(), |c| {
            c.search.language = language.into();
        })
        .await;
        let (token, _) = member(&mesh, &format!("lang{language}")).await;
        let mut c = search_client(&mesh).await;
        index(&mut c, &token, docs()).await;
        for text in ["haus", "run", "the"] {
            let r = find(&mut c, &token, q(text)).await.expect("search");
            // Only exact matches count here, not the typo fallback.
            let hits = if r.fuzzy { Vec::new() } else { titles(&r) };
            found.insert((language, text), hits);
        }
    }
    let none: Vec<String> = Vec::new();
    let de = vec!["Die Häuser der Stadt".to_string()];
    let en = vec!["Running the marathon".to_string()];
    // German stems Häuser to haus; English and simple do not.
    assert_eq!(found[&("german", "haus")], de);
    assert_eq!(found[&("english", "haus")], none);
    assert_eq!(found[&("simple", "haus")], none);
    // English stems running to run; simple keeps words as they are.
    assert_eq!(found[&("english", "run")], en);
    assert_eq!(found[&("simple", "run")], none);
    // "the" is an English stop word (a query of nothing); simple finds it.
    assert_eq!(found[&("english", "the")], none);
    assert_eq!(found[&("simple", "the")], en);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_a_fresh_database_makes_the_demo_corpus_searchable() {
    let mesh = TestMesh::start().await;
    // A fresh database: no administrator yet, and `seed` makes one.
    let seeded = trellisd::dev::seed_documents(&mesh.config, &mesh.store, 40)
        .await
        .expect("seed");
    assert_eq!(seeded.documents, 48, "40 profiles + 8 help articles");
    let (username, password) = seeded.admin.clone().expect("administrator created");
    let mut a = auth(&mesh).await;
    let login = a
        .login(trellis_proto::auth::v1::LoginRequest {
            login: username,
            password,
            ..Default::default()
        })
        .await
        .expect("the seeded administrator can log in")
        .into_inner();
    assert!(login.tokens.is_some());
    // Again: the same documents replaced, no second administrator.
    let again = trellisd::dev::seed_documents(&mesh.config, &mesh.store, 40)
        .await
        .expect("seed again");
    assert_eq!(again.documents, 48);
    assert!(again.admin.is_none());

    // Any member sees the shared demo collections and finds candidates.
    let (token, _) = member(&mesh, "recruiter").await;
    let mut c = search_client(&mesh).await;
    let cols = c
        .list_collections(bearer(pb::ListCollectionsRequest {}, &token))
        .await
        .expect("collections")
        .into_inner()
        .collections;
    assert_eq!(
        cols,
        vec![
            pb::Collection {
                name: "candidates".into(),
                document_count: 40
            },
            pb::Collection {
                name: "help".into(),
                document_count: 8
            },
        ]
    );
    let r = find(
        &mut c,
        &token,
        pb::SearchRequest {
            collections: vec!["candidates".into()],
            page_size: 100,
            ..q("engineer")
        },
    )
    .await
    .expect("candidates");
    assert!(!r.hits.is_empty() && !r.fuzzy);
    assert!(r.hits.iter().all(|h| h.collection == "candidates"));
    assert!(
        r.hits.iter().all(|h| h.title.contains("Engineer")),
        "{:?}",
        titles(&r)
    );
    // Attributes of the profiles filter too.
    let senior = find(
        &mut c,
        &token,
        pb::SearchRequest {
            collections: vec!["candidates".into()],
            attributes: [("seniority".to_string(), "senior".to_string())].into(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await
    .expect("senior");
    assert!(!senior.hits.is_empty());
    assert!(senior.hits.iter().all(|h| h.title.contains("Senior")));
    let r = find(&mut c, &token, q("did you mean")).await.expect("help");
    assert_eq!(titles(&r), vec!["Searching documents"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_hold_the_search_permissions_the_readme_shows() {
    let mesh = TestMesh::start().await;
    let (token, _) = member(&mesh, "permcheck").await;
    let me = crate::auth::who(&mut auth(&mesh).await, &token)
        .await
        .expect("who am i");
    let search: Vec<String> = me
        .principal
        .expect("principal")
        .permissions
        .into_iter()
        .filter(|p| p.starts_with("search:"))
        .collect();
    // Not `search:*`: reading everyone's documents, deleting them and the
    // analytics are the administrators'.
    assert_eq!(
        search,
        vec![
            "search:documents:read",
            "search:documents:write",
            "search:history:*",
            "search:query:run",
        ]
    );
}

/// Pruning deletes the history made before the cutoff, whoever's it is, in
/// batches (here more than one), and nothing newer: the entries left are
/// still listed by their owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_its_retention_is_pruned() {
    use diesel::sql_types::Uuid as SqlUuid;
    use diesel_async::RunQueryDsl;
    let mesh = TestMesh::start().await;
    let (token, me) = member(&mesh, "pruned").await;
    let (other, them) = member(&mesh, "prunedtoo").await;
    let mut c = search_client(&mesh).await;
    for (t, text) in [(&token, "kept mine"), (&other, "kept theirs")] {
        find(&mut c, t, q(text)).await.expect("search");
    }
    let listed = |t: String| {
        let mut c = c.clone();
        async move {
            c.list_search_history(bearer(
                pb::ListSearchHistoryRequest {
                    page_size: 50,
                    page_token: String::new(),
                },
                &t,
            ))
            .await
            .map(|r| {
                r.into_inner()
                    .entries
                    .into_iter()
                    .map(|e| e.query)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        }
    };
    assert!(
        eventually(Duration::from_secs(3), || {
            let l = listed(token.clone());
            async move { l.await.len() == 1 }
        })
        .await
    );
    // 1,500 old entries of mine and 700 of theirs, written 400 days ago.
    {
        let mut conn = mesh.store.pg().await.expect("pg");
        for (user, n) in [(&me, 1500), (&them, 700)] {
            let user = uuid::Uuid::parse_str(user).expect("user id");
            diesel::sql_query(
                "INSERT INTO search_history (id, user_id, query, filters, result_count, latency_ms, created_at) \
                 SELECT gen_random_uuid(), $1, 'old ' || i, '{}', 0, 1, now() - interval '400 days' \
                 FROM generate_series(1, $2) AS i",
            )
            .bind::<SqlUuid, _>(user)
            .bind::<diesel::sql_types::Integer, _>(n)
            .execute(&mut conn)
            .await
            .expect("old history");
        }
    }
    let cutoff = chrono::Utc::now() - chrono::Duration::days(365);
    let pruned = trellis_search::history::prune(&mesh.store, cutoff)
        .await
        .expect("prune");
    assert_eq!(pruned, 2200);
    assert_eq!(
        trellis_search::history::prune(&mesh.store, cutoff)
            .await
            .expect("prune again"),
        0
    );
    assert_eq!(listed(token.clone()).await, ["kept mine"]);
    assert_eq!(listed(other.clone()).await, ["kept theirs"]);
    mesh.shutdown().await;
}
