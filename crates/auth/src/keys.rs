//! Ed25519 signing keys. The newest unretired key in `signing_keys` signs;
//! rotation retires the others, which keep verifying (GetJwks lists them)
//! until every token they signed has expired. A key is generated on first
//! use. Replicas re-read the current key every few seconds, so a rotation
//! made on one is picked up by all.
//!
//! With `secrets.signing_key_secret` set, private keys are sealed at rest
//! ([`KeySeal`]: ChaCha20-Poly1305 under a key derived from the secret with
//! HKDF-SHA256, the kid as associated data, so a sealed key cannot be moved
//! to another row). [`prepare`] runs at startup: it seals keys stored before
//! the secret was set, re-seals keys sealed with one of
//! `secrets.previous_signing_key_secrets` (rotating the secret), and refuses
//! to start when a sealed key cannot be opened (no secret, or another one),
//! rather than failing logins later.

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
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
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

/// Marks a sealed private key (a PKCS#8 DER key starts with 0x30).
const SEALED: &[u8] = b"trellis-sealed-v1:";

/// Seals private keys with the key derived from
/// `secrets.signing_key_secret`, and opens them with it or with one of the
/// previous secrets'.
pub struct KeySeal {
    key: LessSafeKey,
    previous: Vec<LessSafeKey>,
}

/// A private key read back, and whether it should be sealed (again) under
/// the current secret: there is one, and the key was stored plainly or
/// under a previous secret.
#[derive(Debug, PartialEq, Eq)]
struct Opened {
    der: Vec<u8>,
    needs_sealing: bool,
}

impl std::fmt::Debug for KeySeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySeal(***)")
    }
}

/// Why a stored private key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error(
        "signing key {0} is sealed but secrets.signing_key_secret is not set \
         (TRELLIS_SECRETS__SIGNING_KEY_SECRET)"
    )]
    NoSecret(String),
    #[error(
        "signing key {0} does not open with secrets.signing_key_secret: \
         it was sealed with another secret, or the stored bytes were changed"
    )]
    WrongSecret(String),
}

impl From<SealError> for AuthError {
    fn from(e: SealError) -> Self {
        AuthError::Internal(e.to_string())
    }
}

fn derive(secret: &str) -> LessSafeKey {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"trellis signing keys");
    let prk = salt.extract(secret.as_bytes());
    let okm = prk.expand(&[b"chacha20-poly1305 v1"], &CHACHA20_POLY1305);
    match okm {
        Ok(okm) => LessSafeKey::new(UnboundKey::from(okm)),
        Err(_) => unreachable!("32 bytes are within HKDF-SHA256's output limit"),
    }
}

impl KeySeal {
    pub fn from_secret(secret: &str) -> KeySeal {
        KeySeal::new(secret, &[])
    }

    /// Seals with `secret`; opens with it or any of `previous`.
    pub fn new(secret: &str, previous: &[String]) -> KeySeal {
        KeySeal {
            key: derive(secret),
            previous: previous.iter().map(|p| derive(p)).collect(),
        }
    }

    /// `SEALED`, a random nonce, then the key encrypted and tagged.
    fn seal(&self, kid: &str, der: &[u8]) -> Result<Vec<u8>, AuthError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| AuthError::Internal(format!("randomness: {e}")))?;
        let mut sealed = der.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kid.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| AuthError::Internal("sealing a signing key failed".into()))?;
        let mut out = Vec::with_capacity(SEALED.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(SEALED);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn open(&self, kid: &str, body: &[u8]) -> Result<Opened, SealError> {
        let wrong = || SealError::WrongSecret(kid.to_string());
        if body.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        for (i, key) in std::iter::once(&self.key).chain(&self.previous).enumerate() {
            let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
            let mut buf = sealed.to_vec();
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(kid.as_bytes()), &mut buf) {
                return Ok(Opened {
                    der: plain.to_vec(),
                    needs_sealing: i > 0,
                });
            }
        }
        Err(wrong())
    }
}

/// The bytes to store for a private key: sealed when there is a seal.
fn stored(seal: Option<&KeySeal>, kid: &str, der: &[u8]) -> Result<Vec<u8>, AuthError> {
    match seal {
        Some(s) => s.seal(kid, der),
        None => Ok(der.to_vec()),
    }
}

/// The private key (PKCS#8 DER) from its stored bytes.
fn unstored(seal: Option<&KeySeal>, kid: &str, bytes: &[u8]) -> Result<Opened, SealError> {
    match (bytes.strip_prefix(SEALED), seal) {
        (None, _) => Ok(Opened {
            der: bytes.to_vec(),
            needs_sealing: seal.is_some(),
        }),
        (Some(body), Some(s)) => s.open(kid, body),
        (Some(_), None) => Err(SealError::NoSecret(kid.to_string())),
    }
}

/// What [`prepare`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// Keys in the table.
    pub keys: usize,
    /// Keys stored plainly, or sealed under a previous secret, that were
    /// sealed under the current secret now.
    pub sealed_now: usize,
}

/// Why [`prepare`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A stored key does not open: a configuration error, fatal at startup.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The database could not be read or written (it may be down).
    #[error("reading the signing keys: {0}")]
    Store(#[from] AuthError),
}

/// At startup: every stored key must open with this seal (or be stored
/// plainly); with a seal, keys stored plainly or under a previous secret
/// are sealed in place under the current one.
pub async fn prepare(store: &Store, seal: Option<&KeySeal>) -> Result<Prepared, PrepareError> {
    let mut conn = store.pg().await.map_err(AuthError::from)?;
    let rows: Vec<(String, Vec<u8>)> = signing_keys::table
        .select((signing_keys::kid, signing_keys::private_key))
        .load(&mut conn)
        .await
        .map_err(AuthError::from)?;
    let mut done = Prepared {
        keys: rows.len(),
        sealed_now: 0,
    };
    for (kid, bytes) in rows {
        let opened = unstored(seal, &kid, &bytes)?;
        if let Some(seal) = seal
            && opened.needs_sealing
        {
            // Only if nobody changed it meanwhile (another replica sealing).
            done.sealed_now += diesel::update(
                signing_keys::table
                    .filter(signing_keys::kid.eq(&kid))
                    .filter(signing_keys::private_key.eq(&bytes)),
            )
            .set(signing_keys::private_key.eq(seal.seal(&kid, &opened.der)?))
            .execute(&mut conn)
            .await
            .map_err(AuthError::from)?;
        }
    }
    Ok(done)
}

#[derive(Clone)]
pub struct KeyRing {
    store: Store,
    seal: Option<Arc<KeySeal>>,
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
    pub fn new(store: Store, verify_window: Duration, seal: Option<Arc<KeySeal>>) -> KeyRing {
        KeyRing {
            store,
            seal,
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
        let seal = self.seal.as_deref();
        let (kid, der) = match row {
            Some((kid, bytes)) => {
                let der = unstored(seal, &kid, &bytes)?.der;
                (kid, der)
            }
            None => {
                let k = generate()?;
                self.insert(&mut conn, &k).await?;
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

    /// Stores a new key, its private half sealed when there is a seal.
    async fn insert(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        k: &NewKey,
    ) -> Result<(), AuthError> {
        let private = stored(self.seal.as_deref(), &k.kid, &k.private_der)?;
        diesel::insert_into(signing_keys::table)
            .values((
                signing_keys::kid.eq(&k.kid),
                signing_keys::private_key.eq(private),
                signing_keys::public_key.eq(k.public.as_slice()),
            ))
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Makes a new key current and retires the others; returns its kid.
    pub async fn rotate(&self) -> Result<String, AuthError> {
        let k = generate()?;
        let mut conn = self.store.pg().await?;
        diesel::update(signing_keys::table.filter(signing_keys::retired_at.is_null()))
            .set(signing_keys::retired_at.eq(Utc::now()))
            .execute(&mut conn)
            .await?;
        self.insert(&mut conn, &k).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn der_of(seal: Option<&KeySeal>, kid: &str, b: &[u8]) -> Result<Vec<u8>, SealError> {
        unstored(seal, kid, b).map(|o| o.der)
    }

    #[test]
    fn sealed_keys_open_only_with_their_secret_and_kid() {
        let k = generate().expect("key");
        let seal = KeySeal::from_secret("correct horse battery staple, thirty-two+");
        let bytes = stored(Some(&seal), &k.kid, &k.private_der).expect("sealed");
        assert!(bytes.starts_with(SEALED));
        // The key's bytes are not in the clear (the DER ends with the seed).
        let seed = &k.private_der[k.private_der.len() - 32..];
        assert!(!bytes.windows(32).any(|w| w == seed));
        assert_eq!(
            unstored(Some(&seal), &k.kid, &bytes),
            Ok(Opened {
                der: k.private_der.clone(),
                needs_sealing: false
            })
        );
        // Sealing twice gives different bytes (fresh nonce), both open.
        let again = stored(Some(&seal), &k.kid, &k.private_der).expect("sealed");
        assert_ne!(again, bytes);
        assert!(unstored(Some(&seal), &k.kid, &again).is_ok());

        let other = KeySeal::from_secret("another secret, also thirty-two characters");
        assert_eq!(
            der_of(Some(&other), &k.kid, &bytes),
            Err(SealError::WrongSecret(k.kid.clone()))
        );
        assert_eq!(
            der_of(None, &k.kid, &bytes),
            Err(SealError::NoSecret(k.kid.clone()))
        );
        // Bound to its row: under another kid it does not open.
        assert!(unstored(Some(&seal), "another-kid", &bytes).is_err());
        // Any changed byte is caught.
        for i in [SEALED.len(), SEALED.len() + NONCE_LEN, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(unstored(Some(&seal), &k.kid, &bad).is_err(), "byte {i}");
        }
        assert!(unstored(Some(&seal), &k.kid, SEALED).is_err());
        // Keys stored before a secret was set still read, and need sealing.
        assert_eq!(
            unstored(Some(&seal), &k.kid, &k.private_der),
            Ok(Opened {
                der: k.private_der.clone(),
                needs_sealing: true
            })
        );
        assert_eq!(
            stored(None, &k.kid, &k.private_der).expect("plain"),
            k.private_der
        );
        // What opens is a usable signing key.
        let der = der_of(Some(&seal), &k.kid, &bytes).expect("opens");
        let _ = EncodingKey::from_ed_der(&der);
    }

    #[test]
    fn a_previous_secret_opens_for_resealing_under_the_current_one() {
        let k = generate().expect("key");
        let old = "the old secret, at least thirty-two characters".to_string();
        let new = "the new secret, at least thirty-two characters";
        let bytes = KeySeal::from_secret(&old)
            .seal(&k.kid, &k.private_der)
            .expect("sealed");
        let rotating = KeySeal::new(new, std::slice::from_ref(&old));
        let o = unstored(Some(&rotating), &k.kid, &bytes).expect("opens with the previous");
        assert_eq!(
            (o.der.as_slice(), o.needs_sealing),
            (&k.private_der[..], true)
        );
        let resealed = rotating.seal(&k.kid, &o.der).expect("resealed");
        assert!(
            !unstored(Some(&rotating), &k.kid, &resealed)
                .expect("opens")
                .needs_sealing
        );
        // After the rotation the old secret is no longer needed, nor enough.
        let after = KeySeal::from_secret(new);
        assert!(
            !unstored(Some(&after), &k.kid, &resealed)
                .expect("opens")
                .needs_sealing
        );
        assert!(unstored(Some(&after), &k.kid, &bytes).is_err());
        assert!(unstored(Some(&KeySeal::from_secret(&old)), &k.kid, &resealed).is_err());
    }
}
