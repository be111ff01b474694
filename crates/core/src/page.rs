//! Page tokens (AIP-158): opaque, tamper-evident cursors for keyset
//! pagination. A token carries the position after the last row returned and
//! a fingerprint of the query it belongs to, sealed with an HMAC; a token
//! that was altered, or reused with other filters or ordering, is refused
//! with INVALID_ARGUMENT naming `page_token`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

use crate::error::FieldViolations;

pub const DEFAULT_PAGE_SIZE: usize = 20;
pub const MAX_PAGE_SIZE: usize = 100;
const MAC_LEN: usize = 16;

/// The page size a request asked for: 0 means the default; above the
/// maximum is clamped (as AIP-158 suggests); negative is an error.
pub fn page_size(v: &mut FieldViolations, requested: i32) -> usize {
    match requested {
        n if n < 0 => {
            v.add("page_size", "must not be negative");
            DEFAULT_PAGE_SIZE
        }
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    }
}

/// Seals and opens page tokens with one secret (shared by every replica
/// that serves the same list).
#[derive(Clone)]
pub struct PageTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(..)")
    }
}

impl PageTokens {
    pub fn new(secret: &[u8]) -> PageTokens {
        PageTokens {
            key: secret.to_vec(),
        }
    }

    /// A process-local random secret, for single-process installs.
    pub fn random() -> PageTokens {
        let mut key = [0u8; 32];
        // Without randomness the process cannot do much else either.
        getrandom::fill(&mut key).expect("system randomness");
        PageTokens::new(&key)
    }

    fn mac(&self, query: &str, payload: &[u8]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(&(query.len() as u64).to_be_bytes());
        m.update(query.as_bytes());
        m.update(payload);
        m
    }

    /// A token for `cursor` within the list described by `query` (every
    /// filter and the ordering, rendered canonically by the caller).
    pub fn seal<C: Serialize>(&self, query: &str, cursor: &C) -> String {
        let payload = serde_json::to_vec(cursor).unwrap_or_default();
        let mut out = self.mac(query, &payload).finalize().into_bytes()[..MAC_LEN].to_vec();
        out.extend_from_slice(&payload);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The cursor in `token`, if it is genuine and belongs to `query`.
    /// An empty token is the first page (`Ok(None)`).
    pub fn open<C: DeserializeOwned>(
        &self,
        token: &str,
        query: &str,
    ) -> Result<Option<C>, tonic::Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let refuse = || {
            let mut v = FieldViolations::new();
            v.add(
                "page_token",
                "is not a page token of this list (altered, or made for other filters or ordering)",
            );
            v.into_status()
        };
        let raw = URL_SAFE_NO_PAD
            .decode(token.as_bytes())
            .map_err(|_| refuse())?;
        if raw.len() < MAC_LEN || token.len() > 4096 {
            return Err(refuse());
        }
        let (mac, payload) = raw.split_at(MAC_LEN);
        // Constant-time comparison, by the hmac crate.
        self.mac(query, payload)
            .verify_truncated_left(mac)
            .map_err(|_| refuse())?;
        serde_json::from_slice(payload)
            .map(Some)
            .map_err(|_| refuse())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let t = PageTokens::new(b"secret");
        let token = t.seal(
            "order=created_desc;status=active",
            &("2026-01-01T00:00:00Z", 42),
        );
        let back: Option<(String, i32)> = t
            .open(&token, "order=created_desc;status=active")
            .expect("opens");
        assert_eq!(back, Some(("2026-01-01T00:00:00Z".to_string(), 42)));
        assert!(
            t.open::<(String, i32)>(&token, "order=email_asc;status=active")
                .is_err(),
            "other query"
        );
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ascii");
        assert!(
            t.open::<(String, i32)>(&tampered, "order=created_desc;status=active")
                .is_err()
        );
        assert!(
            PageTokens::new(b"other")
                .open::<(String, i32)>(&token, "order=created_desc;status=active")
                .is_err()
        );
        assert_eq!(t.open::<(String, i32)>("", "q").expect("first page"), None);
        let err = t.open::<(String, i32)>("!!", "q").expect_err("garbage");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn page_sizes() {
        let mut v = FieldViolations::new();
        assert_eq!(page_size(&mut v, 0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(&mut v, 5), 5);
        assert_eq!(page_size(&mut v, 1000), MAX_PAGE_SIZE);
        assert!(v.is_empty());
        page_size(&mut v, -1);
        assert!(!v.is_empty());
    }
}
