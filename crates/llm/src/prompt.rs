//! Prompt assembly: the system prompt plus the conversation, trimmed
//! oldest-first to fit the model's context window minus the completion
//! budget, never dropping the system prompt, a system message or the
//! latest user message.
//! Token counts come from a real tokenizer (tiktoken's o200k_base), used
//! only when the prompt might not fit: a BPE token covers at least one
//! byte, so a prompt whose bytes fit has tokens that fit.

use tiktoken_rs::CoreBPE;

/// A conversation turn as the upstream receives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    pub role: &'static str,
    pub content: String,
}

/// Tokens every message costs beyond its text (role and separators), and
/// the tokens that prime the reply, as OpenAI documents for chat models.
const PER_MESSAGE: usize = 4;
const REPLY_PRIMING: usize = 3;

fn bpe() -> &'static CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

/// Tokens of `text`.
pub fn count_text(text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        bpe().encode_ordinary(text).len()
    }
}

/// Tokens of a whole prompt.
pub fn count_prompt(turns: &[Turn]) -> usize {
    turns
        .iter()
        .map(|t| PER_MESSAGE + count_text(&t.content))
        .sum::<usize>()
        + REPLY_PRIMING
}

/// The prompt's text in bytes.
pub fn bytes(turns: &[Turn]) -> usize {
    turns.iter().map(|t| t.content.len()).sum()
}

/// Text above this many bytes takes the tokenizer milliseconds.
const HEAVY_BYTES: usize = 16 * 1024;

/// Runs tokenizer work `f` over `bytes` of text: inline when it is quick,
/// else on the blocking pool, so that a long prompt does not stall the
/// async workers serving other calls.
pub async fn off_workers<T: Send + 'static>(
    bytes: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    if bytes <= HEAVY_BYTES {
        return f();
    }
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// An upper bound of [`count_prompt`] without tokenizing.
fn bytes_bound(turns: &[Turn]) -> usize {
    turns
        .iter()
        .map(|t| PER_MESSAGE + t.content.len())
        .sum::<usize>()
        + REPLY_PRIMING
}

/// Why a prompt cannot be made to fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong {
    /// Tokens of what may not be dropped.
    pub required: usize,
    pub budget: usize,
}

/// The turns to send: `system` (if any) first, then `messages` with the
/// oldest dropped until the prompt fits `budget` tokens. Returns the turns,
/// how many messages were dropped, and the prompt's token count when it
/// was computed (None when the byte bound proved it fits).
pub fn assemble(
    system: &str,
    messages: Vec<Turn>,
    budget: usize,
) -> Result<(Vec<Turn>, usize, Option<usize>), TooLong> {
    let mut turns = Vec::with_capacity(messages.len() + 1);
    if !system.is_empty() {
        turns.push(Turn {
            role: "system",
            content: system.to_string(),
        });
    }
    let first_message = turns.len();
    turns.extend(messages);
    if bytes_bound(&turns) <= budget {
        return Ok((turns, 0, None));
    }
    let costs: Vec<usize> = turns
        .iter()
        .map(|t| PER_MESSAGE + count_text(&t.content))
        .collect();
    let mut total: usize = costs.iter().sum::<usize>() + REPLY_PRIMING;
    let latest_user = turns.iter().rposition(|t| t.role == "user");
    let mut keep = vec![true; turns.len()];
    let mut dropped = 0;
    for i in first_message..turns.len() {
        if total <= budget {
            break;
        }
        // System messages are instructions, not history: never dropped.
        if Some(i) == latest_user || turns[i].role == "system" {
            continue;
        }
        keep[i] = false;
        total -= costs[i];
        dropped += 1;
    }
    if total > budget {
        return Err(TooLong {
            required: total,
            budget,
        });
    }
    let mut i = 0;
    turns.retain(|_| {
        let k = keep[i];
        i += 1;
        k
    });
    Ok((turns, dropped, Some(total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &'static str, content: &str) -> Turn {
        Turn {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn counts_with_a_real_tokenizer() {
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("hello"), 1);
        // o200k_base: "The", " quick", … " dog", ".".
        assert_eq!(
            count_text("The quick brown fox jumps over the lazy dog."),
            10
        );
        // Special-token text is just text.
        assert!(count_text("<|endoftext|>") > 1);
    }

    #[test]
    fn short_prompts_skip_the_tokenizer() {
        let (turns, dropped, counted) =
            assemble("be brief", vec![turn("user", "hi")], 1000).expect("fits");
        assert_eq!(turns.len(), 2);
        assert_eq!(turns[0].role, "system");
        assert_eq!(dropped, 0);
        assert_eq!(counted, None);
    }

    #[test]
    fn trims_oldest_first_keeping_system_and_latest_user() {
        let long = "word ".repeat(100); // ~100 tokens
        let messages = vec![
            turn("user", &long),
            turn("assistant", &long),
            turn("user", &long),
            turn("assistant", "ok"),
            turn("user", "the question"),
        ];
        let full = count_prompt(
            &std::iter::once(turn("system", "sys"))
                .chain(messages.clone())
                .collect::<Vec<_>>(),
        );
        // Room for about one long message besides the rest.
        let budget = full - 150;
        let (turns, dropped, counted) = assemble("sys", messages, budget).expect("fits");
        assert_eq!(dropped, 2);
        assert_eq!(turns[0].content, "sys");
        assert_eq!(
            turns.last().map(|t| t.content.as_str()),
            Some("the question")
        );
        assert_eq!(turns.len(), 4);
        assert_eq!(counted, Some(count_prompt(&turns)));
        assert!(count_prompt(&turns) <= budget);
    }

    #[test]
    fn system_messages_in_the_conversation_are_never_dropped() {
        let long = "word ".repeat(100);
        let messages = vec![
            turn("system", "rules: answer in French"),
            turn("user", &long),
            turn("assistant", &long),
            turn("system", "also: be brief"),
            turn("user", &long),
            turn("user", "the question"),
        ];
        let (turns, dropped, _) = assemble("sys", messages, 100).expect("fits");
        let contents: Vec<&str> = turns.iter().map(|t| t.content.as_str()).collect();
        assert_eq!(
            contents,
            vec![
                "sys",
                "rules: answer in French",
                "also: be brief",
                "the question"
            ]
        );
        assert_eq!(dropped, 3);
        // Kept system messages that do not fit are an error, not dropped.
        let err = assemble("", vec![turn("system", &long), turn("user", "q")], 50)
            .expect_err("cannot fit");
        assert!(err.required > 100);
    }

    #[test]
    fn the_latest_user_message_is_never_dropped() {
        let long = "word ".repeat(200);
        let err = assemble("sys", vec![turn("user", &long)], 50).expect_err("cannot fit");
        assert!(err.required > 50);
        assert_eq!(err.budget, 50);
    }
}
