//! Retrieval-augmented prompts: the gateway asks SearchService (over the
//! mesh, with the caller's identity, so only documents the caller may see
//! come back) for the top hits, puts them into the system prompt as
//! numbered sources and hands them back as citations.

use prost_types::value::Kind;
use trellis_core::ServiceName;
use trellis_core::error::FieldViolations;
use trellis_mesh::{CallContext, MeshClients};
use trellis_proto::llm::v1 as pb;
use trellis_proto::search::v1 as spb;
use trellis_proto::search::v1::search_service_client::SearchServiceClient;

use crate::error::LlmError;

/// The longest search query sent (SearchService's default limit).
const MAX_QUERY_CHARS: usize = 1000;

/// Text without the `<mark>` highlighting of snippets.
fn plain(snippet: &str) -> String {
    snippet.replace("<mark>", "").replace("</mark>", "")
}

/// Attribute filters from a `Struct`: strings as they are, numbers and
/// booleans as text; anything else is refused.
fn attributes(
    filters: &Option<prost_types::Struct>,
) -> Result<std::collections::HashMap<String, String>, LlmError> {
    let mut out = std::collections::HashMap::new();
    let Some(s) = filters else {
        return Ok(out);
    };
    for (k, v) in &s.fields {
        let text = match &v.kind {
            Some(Kind::StringValue(s)) => s.clone(),
            Some(Kind::NumberValue(n)) => n.to_string(),
            Some(Kind::BoolValue(b)) => b.to_string(),
            _ => {
                return Err(LlmError::field(
                    &format!("params.retrieval.filters.{k}"),
                    "filter values are strings, numbers or booleans",
                ));
            }
        };
        out.insert(k.clone(), text);
    }
    Ok(out)
}

/// Searches for `options` (the query defaulting to `latest_user`) and
/// returns the citations.
pub async fn retrieve(
    clients: &MeshClients,
    ctx: &CallContext,
    options: &pb::RetrievalOptions,
    latest_user: &str,
) -> Result<Vec<pb::Citation>, LlmError> {
    let query = if options.query.trim().is_empty() {
        any_of(latest_user)
    } else {
        options.query.trim().to_string()
    };
    let query: String = query.chars().take(MAX_QUERY_CHARS).collect();
    let request = spb::SearchRequest {
        query,
        collections: options.collections.clone(),
        attributes: attributes(&options.filters)?,
        page_size: options.top_k,
        ..Default::default()
    };
    let mut client = clients
        .client(ServiceName::Search, ctx, SearchServiceClient::new)
        .map_err(LlmError::Upstream)?;
    let response = client
        .search(request)
        .await
        .map_err(|s| {
            // The caller's own problems keep their code; the rest is the
            // search dependency failing.
            match s.code() {
                tonic::Code::InvalidArgument => LlmError::Invalid(request_fields(&s)),
                tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::DeadlineExceeded => LlmError::Upstream(s),
                _ => LlmError::Unavailable(format!("retrieval failed: {}", s.message())),
            }
        })?
        .into_inner();
    Ok(response
        .hits
        .into_iter()
        .map(|h| pb::Citation {
            document_id: h.document_id,
            title: h.title,
            snippet: plain(&h.snippet),
        })
        .collect())
}

/// SearchService's field violations renamed to the fields of
/// `params.retrieval` they came from (`attributes[k]` is `filters.k`,
/// `page_size` is `top_k`), so that a bad filter reads as the caller's own
/// mistake.
fn request_fields(status: &tonic::Status) -> FieldViolations {
    use tonic_types::StatusExt;
    let mut v = FieldViolations::new();
    let details = status.get_error_details();
    for f in details
        .bad_request()
        .map(|b| b.field_violations.as_slice())
        .unwrap_or_default()
    {
        let field = if let Some(key) = f
            .field
            .strip_prefix("attributes[")
            .and_then(|k| k.strip_suffix(']'))
        {
            format!("filters.{key}")
        } else if f.field == "attributes" {
            "filters".to_string()
        } else if f.field == "page_size" {
            "top_k".to_string()
        } else {
            f.field.clone()
        };
        v.add(format!("params.retrieval.{field}"), f.description.clone());
    }
    if v.is_empty() {
        v.add("params.retrieval", status.message().to_string());
    }
    v
}

/// A question as a search for any of its words: search matches all words
/// of a query, which a natural-language question rarely meets; ranking
/// still puts documents matching more of them first. Stop words are
/// dropped by the search language.
fn any_of(question: &str) -> String {
    question
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !w.eq_ignore_ascii_case("or"))
        .take(32)
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// The system prompt with the sources appended.
pub fn ground(system: &str, citations: &[pb::Citation]) -> String {
    if citations.is_empty() {
        return system.to_string();
    }
    let mut out = String::from(system);
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    out.push_str(
        "Answer from the numbered sources below when they are relevant, citing them as [n]; \
         say so when they do not answer the question.\n",
    );
    for (i, c) in citations.iter().enumerate() {
        out.push_str(&format!("\n[{}] {}\n{}\n", i + 1, c.title, c.snippet));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_numbered_into_the_system_prompt() {
        let c = vec![
            pb::Citation {
                document_id: "1".into(),
                title: "Rust guide".into(),
                snippet: plain("about <mark>ownership</mark>"),
            },
            pb::Citation {
                document_id: "2".into(),
                title: "Go guide".into(),
                snippet: "goroutines".into(),
            },
        ];
        let p = ground("Be brief.", &c);
        assert!(p.starts_with("Be brief.\n\n"));
        assert!(p.contains("[1] Rust guide\nabout ownership\n"));
        assert!(p.contains("[2] Go guide"));
        assert_eq!(ground("x", &[]), "x");
    }

    #[test]
    fn questions_search_for_any_word() {
        assert_eq!(
            any_of("How many days, or weeks?"),
            "How OR many OR days OR weeks"
        );
        assert_eq!(any_of("  "), "");
    }

    #[test]
    fn search_violations_become_retrieval_fields() {
        let mut v = FieldViolations::new();
        v.add("attributes[seniority]", "bad");
        v.add("attributes", "too many");
        v.add("page_size", "negative");
        v.add("collections[1]", "bad name");
        let renamed = request_fields(&v.into_status());
        let fields: Vec<&str> = renamed.iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            vec![
                "params.retrieval.filters.seniority",
                "params.retrieval.filters",
                "params.retrieval.top_k",
                "params.retrieval.collections[1]",
            ]
        );
        let bare = request_fields(&tonic::Status::invalid_argument("no details"));
        assert_eq!(bare.iter().next(), Some(("params.retrieval", "no details")));
    }

    #[test]
    fn filters_become_string_attributes() {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "seniority".into(),
            prost_types::Value {
                kind: Some(Kind::StringValue("senior".into())),
            },
        );
        s.fields.insert(
            "years".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(5.0)),
            },
        );
        let a = attributes(&Some(s)).expect("attributes");
        assert_eq!(a["seniority"], "senior");
        assert_eq!(a["years"], "5");
        let mut bad = prost_types::Struct::default();
        bad.fields.insert(
            "x".into(),
            prost_types::Value {
                kind: Some(Kind::ListValue(Default::default())),
            },
        );
        assert!(attributes(&Some(bad)).is_err());
    }
}
