//! Ed25519 signing keys. The newest unretired key in `signing_keys` signs;
//! rotation retires the others, which keep verifying (GetJwks lists them)
//! until every token they signed has expired. A key is generated on first
//! use. Replicas re-read the current key every few seconds, so a rotation
//! made on one is picked up by all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::EncodingKey;
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;
use trellis_store::Store;
use trellis_store::schema::signing_keys;

use crate::error::AuthError;

/// How long the current key is trusted from memory before it is re-read.
const RELOAD_AFTER: Duration = Duration::from_secs(5);

/// The key that signs now.
#[derive(Clone)]
pub struct CurrentKey {
    pub kid: String,
    pub encoding: Arc<EncodingKey>,
}

#[derive(Clone)]
pub struct KeyRing {
    store: Store,
    /// Retired keys stay published this long (the access-token lifetime).
    verify_window: Duration,
    current: Arc<RwLock<Option<(CurrentKey, Instant)>>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").finish_non_exhaustive()
    }
}

struct NewKey {
    kid: String,
    private_der: Vec<u8>,
    public: [u8; 32],
}

fn generate() -> Result<NewKey, AuthError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| AuthError::Internal(format!("randomness: {e}")))?;
    let key = SigningKey::from_bytes(&seed);
    let der = key
        .to_pkcs8_der()
        .map_err(|e| AuthError::Internal(format!("pkcs8: {e}")))?;
    let public = key.verifying_key().to_bytes();
    // An RFC 7638-style thumbprint prefix: stable, and tells keys apart.
    let kid = URL_SAFE_NO_PAD.encode(&Sha256::digest(public)[..12]);
    Ok(NewKey {
        kid,
        private_der: der.as_bytes().to_vec(),
        public,
    })
}

impl KeyRing {
    pub fn new(store: Store, verify_window: Duration) -> KeyRing {
        KeyRing {
            store,
            verify_window,
            current: Arc::new(RwLock::new(None)),
        }
    }

    /// The signing key, created on first use.
    pub async fn current(&self) -> Result<CurrentKey, AuthError> {
        if let Some((key, at)) = self.current.read().await.as_ref()
            && at.elapsed() < RELOAD_AFTER
        {
            return Ok(key.clone());
        }
        let mut conn = self.store.pg().await?;
        let row: Option<(String, Vec<u8>)> = signing_keys::table
            .filter(signing_keys::retired_at.is_null())
            .order(signing_keys::created_at.desc())
            .select((signing_keys::kid, signing_keys::private_key))
            .first(&mut conn)
            .await
            .optional()?;
        let (kid, der) = match row {
            Some(r) => r,
            None => {
                let k = generate()?;
                diesel::insert_into(signing_keys::table)
                    .values((
                        signing_keys::kid.eq(&k.kid),
                        signing_keys::private_key.eq(&k.private_der),
                        signing_keys::public_key.eq(k.public.as_slice()),
                    ))
                    .execute(&mut conn)
                    .await?;
                (k.kid, k.private_der)
            }
        };
        let key = CurrentKey {
            kid,
            encoding: Arc::new(EncodingKey::from_ed_der(&der)),
        };
        *self.current.write().await = Some((key.clone(), Instant::now()));
        Ok(key)
    }

    /// Makes a new key current and retires the others; returns its kid.
    pub async fn rotate(&self) -> Result<String, AuthError> {
        let k = generate()?;
        let mut conn = self.store.pg().await?;
        diesel::update(signing_keys::table.filter(signing_keys::retired_at.is_null()))
            .set(signing_keys::retired_at.eq(Utc::now()))
            .execute(&mut conn)
            .await?;
        diesel::insert_into(signing_keys::table)
            .values((
                signing_keys::kid.eq(&k.kid),
                signing_keys::private_key.eq(&k.private_der),
                signing_keys::public_key.eq(k.public.as_slice()),
            ))
            .execute(&mut conn)
            .await?;
        *self.current.write().await = None;
        Ok(k.kid)
    }

    /// Every key that may still have signed an unexpired token, newest first:
    /// (kid, raw public key).
    pub async fn public_keys(&self) -> Result<Vec<(String, Vec<u8>)>, AuthError> {
        // Make sure there is a key to publish before the first login.
        self.current().await?;
        let mut conn = self.store.pg().await?;
        let window =
            chrono::Duration::from_std(self.verify_window).unwrap_or(chrono::Duration::minutes(15));
        let cutoff = Utc::now() - window - chrono::Duration::minutes(1);
        Ok(signing_keys::table
            .filter(
                signing_keys::retired_at
                    .is_null()
                    .or(signing_keys::retired_at.gt(cutoff)),
            )
            .order(signing_keys::created_at.desc())
            .select((signing_keys::kid, signing_keys::public_key))
            .load(&mut conn)
            .await?)
    }
}
