//! What free text a request may carry into storage. PostgreSQL's `text`
//! cannot hold NUL (U+0000) at all, and other control characters in a name
//! or a title are never meant; so every stored string is checked by one of
//! these two before it reaches a statement, and the caller gets a field
//! violation rather than a database error.

/// A value meant to be one line (a name, a title, an identifier): no
/// control characters at all.
pub fn is_single_line(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// Text that may run over lines (a message, a prompt, a biography): tabs
/// and line breaks, no other control characters.
pub fn is_clean_text(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_text() {
        assert!(is_single_line("Plans for Q3 — draft"));
        assert!(!is_single_line("two\nlines"));
        assert!(!is_single_line("nul\0"));
        assert!(is_clean_text("para one\n\n\tpara two\r\n"));
        assert!(!is_clean_text("nul \0 inside"));
        assert!(!is_clean_text("bell \u{7}"));
        assert!(!is_clean_text("c1 \u{85}"));
    }
}
