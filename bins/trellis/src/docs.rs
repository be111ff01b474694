//! `trellis docs`: the documents search finds — index files, show, delete,
//! and the collections they are in.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic_types::StatusExt;
use trellis_proto::search::v1 as search;

use search::search_service_client::SearchServiceClient;

use crate::{CliError, Client, Io, describe, json, table, timestamp};

/// Documents one IndexDocuments call takes at most.
const BATCH: usize = 500;
/// The longest external id the service takes.
const MAX_EXTERNAL_ID: usize = 200;
/// The longest body the service takes, in characters.
const MAX_BODY: usize = 200_000;

/// A file to index: given by name (its problems are errors) or found in a
/// directory (its problems skip it).
struct Source {
    path: PathBuf,
    found: bool,
}

/// The files of `args`, directories walked (sorted, hidden entries left
/// out).
fn sources(args: &[PathBuf]) -> Result<Vec<Source>, CliError> {
    fn walk(dir: &Path, out: &mut Vec<Source>) -> Result<(), CliError> {
        let shown = |e: std::io::Error| CliError::Usage(format!("{}: {e}", dir.display()));
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(shown)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(shown)?;
        entries.sort();
        for path in entries {
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.is_file() {
                out.push(Source { path, found: true });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for path in args {
        if path.as_os_str() != "-" && path.is_dir() {
            walk(path, &mut out)?;
        } else {
            out.push(Source {
                path: path.clone(),
                found: false,
            });
        }
    }
    Ok(out)
}

#[derive(Subcommand, Debug)]
pub enum DocsCommand {
    /// Index files (each becomes one document; indexing a file again
    /// replaces its document).
    Index(IndexArgs),
    /// A document, whole.
    Show { id: String },
    /// Delete documents (ids from `docs index` or `search --ids`).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// The collections you can see and their document counts.
    Collections,
}

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Files to index, and directories (every file below them, hidden ones
    /// and those that are not UTF-8 text skipped); "-" reads one document
    /// from standard input (give it --id).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The collection (1-64 of a-z, 0-9, _ and -).
    #[arg(long, short, default_value = "notes")]
    pub collection: String,
    /// A tag for every document (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// An attribute for every document, filterable by exact value
    /// (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = key_value)]
    pub attributes: Vec<(String, String)>,
    /// Every signed-in user may find them (default: only you).
    #[arg(long)]
    pub shared: bool,
    /// The document's id of your own (one file only; default: the file's
    /// absolute path).
    #[arg(long)]
    pub id: Option<String>,
    /// The title (one file only; default: the file's first line when it is
    /// a Markdown heading, else its name).
    #[arg(long)]
    pub title: Option<String>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// The title a file's text suggests: its first non-empty line when that is
/// a Markdown heading (`# Title`), else the file's name.
pub fn title_for(path: &Path, body: &str) -> String {
    let heading = body
        .lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| l.trim_start().strip_prefix('#'))
        .map(|h| h.trim_start_matches('#').trim())
        .filter(|h| !h.is_empty());
    match heading {
        Some(h) => h.to_string(),
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string()),
    }
}

/// The document index `i` a field path such as `documents[3].body` names.
fn document_index(field: &str) -> Option<usize> {
    field
        .strip_prefix("documents[")?
        .split_once(']')?
        .0
        .parse()
        .ok()
}

/// A refused batch, with the file behind each document a violation names.
fn refused(s: &tonic::Status, names: &[String]) -> CliError {
    let mut text = describe(s);
    if s.code() == Code::InvalidArgument {
        let mut seen = Vec::new();
        if let Some(bad) = s.get_error_details().bad_request() {
            for v in &bad.field_violations {
                if let Some(i) = document_index(&v.field).filter(|i| !seen.contains(i)) {
                    seen.push(i);
                    if let Some(name) = names.get(i) {
                        text.push_str(&format!("\n  documents[{i}] is {name}"));
                    }
                }
            }
        }
    }
    CliError::Server(text)
}

impl Client {
    fn search_client(&self) -> SearchServiceClient<tonic::transport::Channel> {
        SearchServiceClient::new(self.channel.clone())
    }

    pub(crate) async fn docs(&self, io: &mut Io<'_>, action: DocsCommand) -> Result<(), CliError> {
        match action {
            DocsCommand::Index(a) => self.index(io, a).await,
            DocsCommand::Show { id } => {
                let bearer = self.bearer().await?;
                let d = self
                    .search_client()
                    .get_document(self.unary(search::GetDocumentRequest { id }, Some(&bearer))?)
                    .await?
                    .into_inner()
                    .document
                    .unwrap_or_default();
                if self.json {
                    return json::print(io.out, &d);
                }
                let visibility = match search::Visibility::try_from(d.visibility) {
                    Ok(search::Visibility::Shared) => "shared",
                    _ => "private",
                };
                writeln!(io.out, "{}", d.title)?;
                writeln!(
                    io.out,
                    "id {} · {} · {visibility} · updated {}",
                    d.id,
                    d.collection,
                    timestamp(d.update_time.as_ref())
                )?;
                writeln!(io.out, "your id: {}", d.external_id)?;
                if !d.tags.is_empty() {
                    writeln!(io.out, "tags: {}", d.tags.join(", "))?;
                }
                let mut attrs: Vec<_> = d.attributes.iter().collect();
                attrs.sort();
                for (k, v) in attrs {
                    writeln!(io.out, "{k}: {v}")?;
                }
                writeln!(io.out)?;
                writeln!(io.out, "{}", d.body)?;
                Ok(())
            }
            DocsCommand::Rm { ids } => {
                let bearer = self.bearer().await?;
                let mut deleted = 0;
                for chunk in ids.chunks(BATCH) {
                    deleted += self
                        .search_client()
                        .delete_documents(self.unary(
                            search::DeleteDocumentsRequest {
                                ids: chunk.to_vec(),
                            },
                            Some(&bearer),
                        )?)
                        .await?
                        .into_inner()
                        .deleted_count;
                }
                if self.json {
                    return json::print(
                        io.out,
                        &search::DeleteDocumentsResponse {
                            deleted_count: deleted,
                        },
                    );
                }
                writeln!(io.out, "deleted {deleted} of {}", ids.len())?;
                Ok(())
            }
            DocsCommand::Collections => {
                let bearer = self.bearer().await?;
                let r = self
                    .search_client()
                    .list_collections(self.unary(search::ListCollectionsRequest {}, Some(&bearer))?)
                    .await?
                    .into_inner();
                if self.json {
                    for c in &r.collections {
                        json::print(io.out, c)?;
                    }
                    return Ok(());
                }
                let rows: Vec<Vec<String>> = r
                    .collections
                    .into_iter()
                    .map(|c| vec![c.name, c.document_count.to_string()])
                    .collect();
                table(io.out, &["COLLECTION", "DOCUMENTS"], &rows)?;
                Ok(())
            }
        }
    }

    async fn index(&self, io: &mut Io<'_>, a: IndexArgs) -> Result<(), CliError> {
        let sources = sources(&a.files)?;
        if sources.len() != 1 && (a.id.is_some() || a.title.is_some()) {
            return Err(CliError::Usage(
                "--id and --title name one document: give one file".into(),
            ));
        }
        // Every file is read before anything is sent: a bad one stops the
        // command with nothing indexed.
        let mut docs = Vec::with_capacity(sources.len());
        let mut names = Vec::with_capacity(sources.len());
        let mut skipped = 0;
        for Source { path, found } in &sources {
            let path = path.as_path();
            let (body, external_id, name) = if path.as_os_str() == "-" {
                let Some(id) = a.id.clone() else {
                    return Err(CliError::Usage(
                        "a document from standard input needs --id".into(),
                    ));
                };
                let mut body = String::new();
                io.stdin.read_to_string(&mut body).await.map_err(|e| {
                    CliError::Usage(format!("standard input is not UTF-8 text: {e}"))
                })?;
                (body, id, "standard input".to_string())
            } else {
                let shown = path.display().to_string();
                let bytes =
                    std::fs::read(path).map_err(|e| CliError::Usage(format!("{shown}: {e}")))?;
                let problem = match std::str::from_utf8(&bytes) {
                    Err(_) => Some("not UTF-8 text".to_string()),
                    Ok(t) if t.chars().count() > MAX_BODY => {
                        Some(format!("longer than {MAX_BODY} characters"))
                    }
                    Ok(_) => None,
                };
                if let Some(why) = problem {
                    if *found {
                        writeln!(io.err, "skipped {shown}: {why}")?;
                        skipped += 1;
                        continue;
                    }
                    return Err(CliError::Usage(format!("{shown}: {why}")));
                }
                let body = String::from_utf8(bytes)
                    .map_err(|_| CliError::Usage(format!("{shown}: not UTF-8 text")))?;
                let id = match &a.id {
                    Some(id) => id.clone(),
                    None => {
                        let abs = std::fs::canonicalize(path)
                            .map_err(|e| CliError::Usage(format!("{shown}: {e}")))?
                            .display()
                            .to_string();
                        if abs.chars().count() > MAX_EXTERNAL_ID {
                            return Err(CliError::Usage(format!(
                                "{shown}: its path is longer than {MAX_EXTERNAL_ID} characters; name the document with --id"
                            )));
                        }
                        abs
                    }
                };
                (body, id, shown)
            };
            // From standard input, the id stands in for a file name.
            let title = a.title.clone().unwrap_or_else(|| {
                if path.as_os_str() == "-" {
                    title_for(Path::new(&external_id), &body)
                } else {
                    title_for(path, &body)
                }
            });
            docs.push(search::DocumentInput {
                external_id,
                collection: a.collection.clone(),
                title,
                body,
                tags: a.tags.clone(),
                attributes: a.attributes.iter().cloned().collect(),
                visibility: if a.shared {
                    search::Visibility::Shared
                } else {
                    search::Visibility::Private
                } as i32,
            });
            names.push(name);
        }
        let bearer = self.bearer().await?;
        let (mut created, mut replaced) = (0, 0);
        for (docs, names) in docs.chunks(BATCH).zip(names.chunks(BATCH)) {
            let r = self
                .search_client()
                .index_documents(self.unary(
                    search::IndexDocumentsRequest {
                        documents: docs.to_vec(),
                    },
                    Some(&bearer),
                )?)
                .await
                .map_err(|s| refused(&s, names))?
                .into_inner();
            for (res, name) in r.results.iter().zip(names) {
                let what = if res.created { "new" } else { "replaced" };
                if res.created {
                    created += 1;
                } else {
                    replaced += 1;
                }
                if self.json {
                    json::print(io.out, res)?;
                } else {
                    writeln!(io.out, "{}  {what:<8}  {name}", res.id)?;
                }
            }
        }
        writeln!(
            io.err,
            "indexed {} into {}: {created} new, {replaced} replaced{}",
            created + replaced,
            a.collection,
            if skipped > 0 {
                format!(", {skipped} skipped")
            } else {
                String::new()
            }
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_come_from_a_leading_heading_or_the_file_name() {
        let p = Path::new("/tmp/notes/plan.md");
        assert_eq!(title_for(p, "\n# Launch plan\n\nbody"), "Launch plan");
        assert_eq!(title_for(p, "## Sub heading ##\ntext"), "Sub heading ##");
        assert_eq!(title_for(p, "plain first line\n# later"), "plan.md");
        assert_eq!(title_for(p, ""), "plan.md");
        assert_eq!(title_for(p, "#\nempty heading"), "plan.md");
    }

    #[test]
    fn field_paths_name_their_document() {
        assert_eq!(document_index("documents[3].body"), Some(3));
        assert_eq!(document_index("documents[12].tags[0]"), Some(12));
        assert_eq!(document_index("documents"), None);
        assert_eq!(document_index("page_size"), None);
    }

    #[test]
    fn attributes_are_key_value() {
        assert_eq!(key_value("team=core"), Ok(("team".into(), "core".into())));
        assert_eq!(key_value("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert!(key_value("novalue").is_err());
        assert!(key_value("=x").is_err());
    }
}
