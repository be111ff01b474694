//! Request validation: wire types become checked values here, before any
//! business logic, with every problem reported as a field violation.

use trellis_core::error::FieldViolations;

pub const MAX_EMAIL: usize = 255;
pub const MAX_DISPLAY_NAME: usize = 100;

/// A plausible e-mail address: one `@`, a non-empty local part, a dotted
/// domain of letters, digits and hyphens, no spaces or control characters.
pub fn email(v: &mut FieldViolations, field: &str, value: &str) {
    if value.is_empty() {
        v.add(field, "is required");
        return;
    }
    if value.len() > MAX_EMAIL {
        v.add(field, format!("must be at most {MAX_EMAIL} characters"));
        return;
    }
    let ok = match value.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && local.len() <= 64
                && !local
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains("..")
                && domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        }
        None => false,
    };
    if !ok {
        v.add(field, "must be a valid e-mail address");
    }
}

/// 3–50 ASCII letters and digits.
pub fn username(v: &mut FieldViolations, field: &str, value: &str) {
    if !(3..=50).contains(&value.chars().count()) {
        v.add(field, "must be 3 to 50 characters");
    } else if !value.chars().all(|c| c.is_ascii_alphanumeric()) {
        v.add(field, "must contain only letters and digits");
    }
}

/// 8–128 characters with upper case, lower case, a digit and a special
/// character, and not the e-mail address or username.
pub fn password(v: &mut FieldViolations, field: &str, value: &str, email: &str, username: &str) {
    let len = value.chars().count();
    if !(8..=128).contains(&len) {
        v.add(field, "must be 8 to 128 characters");
        return;
    }
    let mut missing = Vec::new();
    if !value.chars().any(|c| c.is_uppercase()) {
        missing.push("an upper-case letter");
    }
    if !value.chars().any(|c| c.is_lowercase()) {
        missing.push("a lower-case letter");
    }
    if !value.chars().any(|c| c.is_ascii_digit()) {
        missing.push("a digit");
    }
    if !value
        .chars()
        .any(|c| !c.is_alphanumeric() && !c.is_whitespace())
    {
        missing.push("a special character");
    }
    if !missing.is_empty() {
        v.add(field, format!("must contain {}", missing.join(", ")));
    }
    if (!email.is_empty() && value.eq_ignore_ascii_case(email))
        || (!username.is_empty() && value.eq_ignore_ascii_case(username))
    {
        v.add(field, "must not be your e-mail address or username");
    }
}

/// Optional free text up to `max` characters without control characters.
pub fn text(v: &mut FieldViolations, field: &str, value: &str, max: usize) {
    if value.chars().count() > max {
        v.add(field, format!("must be at most {max} characters"));
    } else if value.chars().any(|c| c.is_control()) {
        v.add(field, "must not contain control characters");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: impl FnOnce(&mut FieldViolations)) -> Vec<String> {
        let mut v = FieldViolations::new();
        f(&mut v);
        v.iter().map(|(f, d)| format!("{f}: {d}")).collect()
    }

    #[test]
    fn emails() {
        assert!(check(|v| email(v, "email", "ada@example.com")).is_empty());
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "ada@exa..mple.com",
            "ada@-.com.",
        ] {
            assert_eq!(check(|v| email(v, "email", bad)).len(), 1, "{bad:?}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(check(|v| email(v, "email", &long))[0].contains("at most 255"));
    }

    #[test]
    fn usernames() {
        assert!(check(|v| username(v, "username", "ada1815")).is_empty());
        assert_eq!(check(|v| username(v, "username", "ad")).len(), 1);
        assert_eq!(check(|v| username(v, "username", "ada lovelace")).len(), 1);
        assert_eq!(check(|v| username(v, "username", &"a".repeat(51))).len(), 1);
    }

    #[test]
    fn passwords() {
        assert!(check(|v| password(v, "password", "Str0ng!pass", "a@b.co", "ada")).is_empty());
        let weak = check(|v| password(v, "password", "weakpassword", "a@b.co", "ada"));
        assert_eq!(weak.len(), 1);
        assert!(
            weak[0].contains("upper-case")
                && weak[0].contains("digit")
                && weak[0].contains("special")
        );
        assert_eq!(check(|v| password(v, "password", "S1!s", "", "")).len(), 1);
        assert_eq!(
            check(|v| password(v, "password", "Ada12345!X", "", "ada12345!x")).len(),
            1
        );
    }
}
