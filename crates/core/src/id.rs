//! Resource ids: UUIDv7 (time-ordered, so they index well) rendered as
//! lowercase hyphenated strings on the wire.

use uuid::Uuid;

/// A new time-ordered id.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Parses an id received from a client; the error text is meant for a field
/// violation.
pub fn parse_id(value: &str) -> Result<Uuid, String> {
    Uuid::try_parse(value).map_err(|_| "must be a UUID".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_ordered() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.get_version_num(), 7);
        assert!(a < b);
        assert_eq!(parse_id(&a.to_string()), Ok(a));
        assert!(parse_id("nope").is_err());
    }
}
