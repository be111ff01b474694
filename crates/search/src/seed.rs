//! Sample data made by the project itself: synthetic candidate profiles
//! (the recruiting use case: skills, seniority, location) and a few help
//! articles, so that search and retrieval work the moment `trellisd dev`
//! starts; `trellisd seed --docs N` makes larger corpora for benchmarks.
//! Deterministic: the same `n` gives the same documents.

use std::collections::BTreeMap;

use trellis_store::Store;
use uuid::Uuid;

use crate::documents::{self, NewDoc};
use crate::error::SearchError;

const FIRST: &[&str] = &[
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Margaret",
    "Dennis",
    "Barbara",
    "Ken",
    "Frances",
    "Edsger",
    "Radia",
    "Guido",
    "Katherine",
    "Tim",
    "Sophie",
    "Bjarne",
    "Hedy",
    "John",
    "Anita",
    "Niklaus",
    "Joan",
    "Donald",
    "Shafi",
    "Leslie",
    "Fei-Fei",
    "Yukihiro",
    "Lynn",
    "Rob",
    "Carol",
    "Andrew",
];
const LAST: &[&str] = &[
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Ritchie",
    "Liskov",
    "Thompson",
    "Allen",
    "Dijkstra",
    "Perlman",
    "van Rossum",
    "Johnson",
    "Berners-Lee",
    "Wilson",
    "Stroustrup",
    "Lamarr",
    "McCarthy",
    "Borg",
    "Wirth",
    "Clarke",
    "Knuth",
    "Goldwasser",
    "Lamport",
    "Li",
    "Matsumoto",
    "Conway",
    "Pike",
    "Shaw",
    "Tanenbaum",
];
const ROLES: &[(&str, &[&str])] = &[
    (
        "Backend Engineer",
        &["Rust", "Go", "PostgreSQL", "gRPC", "Kubernetes", "Redis"],
    ),
    (
        "Frontend Engineer",
        &[
            "TypeScript",
            "React",
            "CSS",
            "accessibility",
            "Vite",
            "GraphQL",
        ],
    ),
    (
        "Data Scientist",
        &[
            "Python",
            "pandas",
            "statistics",
            "machine learning",
            "SQL",
            "PyTorch",
        ],
    ),
    (
        "Machine Learning Engineer",
        &["Python", "PyTorch", "LLM", "MLOps", "CUDA", "retrieval"],
    ),
    (
        "DevOps Engineer",
        &[
            "Terraform",
            "Kubernetes",
            "AWS",
            "observability",
            "Linux",
            "CI/CD",
        ],
    ),
    (
        "Mobile Developer",
        &["Kotlin", "Swift", "Flutter", "Android", "iOS", "Firebase"],
    ),
    (
        "Security Engineer",
        &[
            "threat modeling",
            "penetration testing",
            "cryptography",
            "OAuth",
            "SIEM",
            "Rust",
        ],
    ),
    (
        "Product Designer",
        &[
            "Figma",
            "user research",
            "prototyping",
            "design systems",
            "accessibility",
            "UX writing",
        ],
    ),
];
const SENIORITY: &[&str] = &["Junior", "Mid-level", "Senior", "Staff", "Principal"];
const CITIES: &[&str] = &[
    "Berlin",
    "London",
    "Lisbon",
    "Amsterdam",
    "Toronto",
    "Austin",
    "Singapore",
    "Nairobi",
    "São Paulo",
    "Warsaw",
    "Remote",
];

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

/// `n` synthetic candidate profiles in the `candidates` collection.
pub fn candidates(n: usize) -> Vec<NewDoc> {
    let mut rng = Rng(42);
    (0..n)
        .map(|i| {
            let first = rng.pick(FIRST);
            let last = rng.pick(LAST);
            let (role, skills) = rng.pick(ROLES);
            let seniority = rng.pick(SENIORITY);
            let city = rng.pick(CITIES);
            let years = 1 + rng.next() % 20;
            let mut picked: Vec<&str> = Vec::new();
            for _ in 0..4 {
                let s = rng.pick(skills);
                if !picked.contains(s) {
                    picked.push(s);
                }
            }
            let mut attributes = BTreeMap::new();
            attributes.insert("seniority".to_string(), seniority.to_lowercase());
            attributes.insert("location".to_string(), city.to_string());
            attributes.insert("years".to_string(), years.to_string());
            NewDoc {
                external_id: format!("candidate-{i:06}"),
                collection: "candidates".into(),
                title: format!("{first} {last} — {seniority} {role}"),
                body: format!(
                    "{first} {last} is a {seniority} {role} based in {city} with {years} years of experience. \
                     Strongest skills: {}. Has shipped production systems, mentored colleagues and \
                     written about {} and {}. Open to {} roles.",
                    picked.join(", "),
                    picked[0],
                    picked.last().unwrap_or(&picked[0]),
                    if city == &"Remote" { "remote" } else { "hybrid or on-site" },
                ),
                tags: picked.iter().map(|s| s.to_lowercase()).collect(),
                attributes,
                shared: true,
            }
        })
        .collect()
}

/// A few help articles about Trellis itself, in the `help` collection.
pub fn help_articles() -> Vec<NewDoc> {
    let articles: &[(&str, &str, &[&str])] = &[
        (
            "Getting started with the dev mesh",
            "Run trellisd dev: it starts PostgreSQL and Redis, migrates, seeds an administrator and this help, and serves every service on one port. Call it with grpcurl or any gRPC client.",
            &["setup"],
        ),
        (
            "Signing in and tokens",
            "Register, then Login returns an access token (an Ed25519 JWT valid for fifteen minutes) and a refresh token. Send the access token as authorization: Bearer. Refresh rotates the refresh token; reusing an old one ends the session.",
            &["auth"],
        ),
        (
            "Searching documents",
            "Search understands web-search syntax: \"quoted phrases\", OR between words, and -word to exclude. Filter by collection, tags and attributes; order by relevance or recency. A misspelled query gets a did you mean suggestion.",
            &["search"],
        ),
        (
            "Indexing your own documents",
            "IndexDocuments takes up to 500 documents per call, keyed by collection and external id; indexing the same key again replaces the document. Private documents are seen only by their owner.",
            &["search"],
        ),
        (
            "Model aliases and providers",
            "The LLM gateway routes a model alias to providers in failover order: OpenAI, OpenRouter, vLLM or a local Ollama. Retries, circuit breakers and quotas protect both you and the providers.",
            &["llm"],
        ),
        (
            "Quotas and budgets",
            "Every user has requests per minute, tokens per day, a monthly cost budget and concurrent streams. GetLimits shows what remains; an exhausted quota answers RESOURCE_EXHAUSTED with the time to retry.",
            &["llm"],
        ),
        (
            "Streaming chat",
            "Chat sessions keep history; replies stream token by token and survive disconnects: the reply is stored as it grows and can be watched again from any replica.",
            &["chat"],
        ),
        (
            "Privacy and erasure",
            "Administrators can purge a user: every document, message, usage record and session of that user is deleted with the account.",
            &["privacy"],
        ),
    ];
    articles
        .iter()
        .enumerate()
        .map(|(i, (title, body, tags))| NewDoc {
            external_id: format!("help-{i:02}"),
            collection: "help".into(),
            title: title.to_string(),
            body: body.to_string(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            attributes: BTreeMap::new(),
            shared: true,
        })
        .collect()
}

/// Indexes `docs` for `owner` in batches; returns how many.
pub async fn index_all(
    store: &Store,
    language: &str,
    owner: Uuid,
    docs: Vec<NewDoc>,
) -> Result<usize, SearchError> {
    let mut n = 0;
    let mut docs = docs.into_iter().peekable();
    while docs.peek().is_some() {
        let batch: Vec<NewDoc> = docs.by_ref().take(documents::MAX_BATCH).collect();
        n += documents::upsert(store, language, owner, batch)
            .await?
            .len();
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_valid() {
        let a = candidates(50);
        let b = candidates(50);
        assert_eq!(a.len(), 50);
        assert_eq!(a[7].title, b[7].title);
        assert!(a.iter().all(|d| documents::valid_collection(&d.collection)));
        assert!(a.iter().all(|d| d.tags.len() <= 4 && !d.tags.is_empty()));
        assert_eq!(help_articles().len(), 8);
    }
}
