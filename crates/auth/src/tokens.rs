//! Access-token claims and the opaque secrets (refresh tokens) Trellis
//! issues. Access tokens are EdDSA JWTs; refresh tokens are 256 random bits,
//! stored only as SHA-256 hashes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::AuthError;

/// Claims of a Trellis access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Session (refresh-token family) id.
    pub sid: String,
    pub roles: Vec<String>,
    /// Effective permissions at issue time; role changes reach the next refresh.
    pub perms: Vec<String>,
    /// The account's token version; bumping it invalidates every token.
    pub ver: i32,
    pub jti: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

/// A random secret with a readable prefix, e.g. `rt_…` for refresh tokens.
pub fn secret(prefix: &str) -> Result<String, AuthError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| AuthError::Internal(format!("randomness: {e}")))?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// How a secret is stored.
pub fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_digests_stable() {
        let a = secret("rt_").expect("secret");
        let b = secret("rt_").expect("secret");
        assert_ne!(a, b);
        assert!(a.starts_with("rt_") && a.len() > 40);
        assert_eq!(digest(&a), digest(&a));
        assert_ne!(digest(&a), digest(&b));
    }
}
