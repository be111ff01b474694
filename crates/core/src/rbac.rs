//! Permission matching. Permissions read `service:resource:action`; a
//! granted permission may use `*` for one segment, and a trailing `*`
//! covers everything below it: `chat:*` grants `chat:sessions:read`, `*`
//! grants everything, `user:*:read` grants `user:profiles:read`.

/// Whether `granted` covers `required`.
pub fn permits(granted: &str, required: &str) -> bool {
    let mut g = granted.split(':').peekable();
    let mut r = required.split(':');
    while let Some(gs) = g.next() {
        let is_last = g.peek().is_none();
        match r.next() {
            Some(rs) => {
                if gs == "*" {
                    if is_last {
                        return true;
                    }
                } else if gs != rs {
                    return false;
                }
            }
            None => return false,
        }
    }
    r.next().is_none()
}

/// Whether any of `granted` covers `required`.
pub fn any_permits<S: AsRef<str>>(granted: &[S], required: &str) -> bool {
    granted.iter().any(|g| permits(g.as_ref(), required))
}

/// Whether `permission` is well-formed: 1–3 non-empty segments of
/// `[a-z0-9_-]` or `*`.
pub fn is_valid(permission: &str) -> bool {
    let segments: Vec<&str> = permission.split(':').collect();
    (1..=3).contains(&segments.len())
        && segments.iter().all(|s| {
            *s == "*"
                || (!s.is_empty()
                    && s.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    }))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(permits("*", "chat:sessions:read"));
        assert!(permits("chat:*", "chat:sessions:read"));
        assert!(permits("chat:sessions:*", "chat:sessions:read"));
        assert!(permits("chat:sessions:read", "chat:sessions:read"));
        assert!(permits("user:*:read", "user:profiles:read"));
        assert!(!permits("user:*:read", "user:profiles:write"));
        assert!(!permits("chat:*", "search:documents:read"));
        assert!(!permits("chat:sessions:read", "chat:sessions:write"));
        assert!(
            !permits("chat:sessions", "chat:sessions:read"),
            "a prefix without * is not a grant"
        );
        assert!(!permits("chat:sessions:read:x", "chat:sessions:read"));
        assert!(any_permits(&["search:*", "chat:*"], "chat:x:y"));
        assert!(!any_permits::<&str>(&[], "chat:x:y"));
    }

    #[test]
    fn validity() {
        assert!(is_valid("*"));
        assert!(is_valid("chat:*"));
        assert!(is_valid("llm:generate:stream"));
        assert!(!is_valid(""));
        assert!(!is_valid("a:b:c:d"));
        assert!(!is_valid("Chat:x"));
        assert!(!is_valid("chat::x"));
    }
}
