//! The token verifier every service mounts (through the mesh's
//! authentication layer): EdDSA only — `none`, HS*, RS* and every other
//! algorithm are refused before any key is touched — with issuer, audience,
//! expiry and not-before checked. Public keys come from AuthService.GetJwks
//! through the mesh client and are re-fetched when a token names an unknown
//! `kid`: one fetch at a time, at most four a second, shared by every call
//! waiting for it, and a kid still unknown afterwards is refused for a while
//! without asking again — so a flood of made-up kids neither loads
//! AuthService nor delays a genuine new key. Verified tokens are cached;
//! every use still consults the in-memory revocation set.
//!
//! API keys (`trk_…`) are opaque: they are verified by AuthService.Introspect
//! through the mesh client, so any service in any process can accept them
//! without reading auth's tables. Active keys are cached for
//! [`API_KEY_CACHE`]; every use still checks the key's expiry and the
//! revocation set, so a revoked key stops working here at once and on other
//! replicas as soon as the revocation reaches them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::sync::Cache;

use crate::revocation::FastCache;
use tokio::sync::{Mutex, RwLock};
use tonic::Status;
use trellis_core::ServiceName;
use trellis_mesh::{Authenticator, CallContext, CredentialKind, MeshClients, Principal};
use trellis_proto::auth::v1::auth_service_client::AuthServiceClient;
use trellis_proto::auth::v1::{GetJwksRequest, IntrospectRequest};
use uuid::Uuid;

use crate::api_keys::SECRET_PREFIX;
use crate::revocation::Revocations;
use crate::tokens::{self, Claims};

/// Longest credential looked at; anything longer is refused unread.
const MAX_TOKEN: usize = 8 * 1024;
/// Seconds of clock skew forgiven on `nbf` (a token from a server whose
/// clock runs ahead). Expiry is exact, and checked by [`TokenVerifier::still_valid`]
/// alone, so a token is judged the same whether it comes from the cache or not.
const LEEWAY: u64 = 5;
/// Unknown-kid fetches are spaced at least this far apart.
const FETCH_SPACING: Duration = Duration::from_millis(250);
/// How long a kid that AuthService did not publish is refused unasked.
/// Keys are published before anything is signed with them, so only a
/// made-up (or long-retired) kid ever lands here.
const UNKNOWN_KID_TTL: Duration = Duration::from_secs(10);
/// How long an active API key is taken on trust. Revocations are kept in
/// the revocation set for longer than this (at least a minute), so a cached
/// key is never outlived by the news of its revocation.
pub const API_KEY_CACHE: Duration = Duration::from_secs(30);
/// Longest wait for AuthService.Introspect before the call is refused as
/// UNAVAILABLE rather than left hanging.
const INTROSPECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A verified access token: its principal (shared by every call that
/// presents the token) and claims.
pub type Verified = Arc<(Arc<Principal>, Claims)>;

/// An API key as Introspect described it.
struct KnownKey {
    principal: Arc<Principal>,
    key_id: Uuid,
    expires_at: Option<DateTime<Utc>>,
    /// The owner's version floor when the key was verified: a LogoutAll,
    /// password change or suspension since then raises it, and the key is
    /// asked about again rather than trusted from the cache.
    owner_floor: Option<i32>,
}

pub struct TokenVerifier {
    validation: Validation,
    clients: MeshClients,
    keys: RwLock<HashMap<String, Arc<DecodingKey>>>,
    /// When the last key fetch started; held while fetching, so that
    /// concurrent callers share one fetch.
    last_fetch: Mutex<Option<Instant>>,
    /// Kids a fetch did not turn up (see [`UNKNOWN_KID_TTL`]).
    unknown_kids: FastCache<String, ()>,
    revocations: Arc<Revocations>,
    /// Verified tokens by their text (every authenticated call looks one
    /// up, so its key — some 500 bytes — is hashed with foldhash, not SipHash).
    verified: FastCache<String, Verified>,
    /// Active API keys by the SHA-256 of their secret (secrets themselves
    /// are not kept in memory longer than a call).
    api_keys: FastCache<Vec<u8>, Arc<KnownKey>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

fn unauthenticated(m: &str) -> Status {
    Status::unauthenticated(m.to_string())
}

impl TokenVerifier {
    pub fn new(
        issuer: &str,
        audience: &str,
        clients: MeshClients,
        revocations: Arc<Revocations>,
    ) -> TokenVerifier {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY;
        // Checked in `still_valid`, without leeway (presence is still required).
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        TokenVerifier {
            validation,
            clients,
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
            unknown_kids: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(UNKNOWN_KID_TTL)
                .build_with_hasher(Default::default()),
            revocations,
            verified: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build_with_hasher(Default::default()),
            api_keys: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(API_KEY_CACHE)
                .build_with_hasher(Default::default()),
        }
    }

    async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, Status> {
        if let Some(k) = self.keys.read().await.get(kid) {
            return Ok(k.clone());
        }
        let unknown = || unauthenticated("token signed by an unknown key");
        if self.unknown_kids.contains_key(kid) {
            return Err(unknown());
        }
        let asked = Instant::now();
        {
            let mut last = self.last_fetch.lock().await;
            // A fetch that started after this call did may have brought the
            // key; if it did not, asking again would not either.
            let fresh = last.is_some_and(|t| t >= asked);
            if !fresh {
                if let Some(since) = last.map(|t| t.elapsed())
                    && since < FETCH_SPACING
                {
                    tokio::time::sleep(FETCH_SPACING - since).await;
                }
                *last = Some(Instant::now());
                self.fetch().await?;
            }
        }
        match self.keys.read().await.get(kid) {
            Some(k) => Ok(k.clone()),
            None => {
                self.unknown_kids.insert(kid.to_string(), ());
                Err(unknown())
            }
        }
    }

    async fn fetch(&self) -> Result<(), Status> {
        let mut client = self.clients.client(
            ServiceName::Auth,
            &CallContext::background(),
            AuthServiceClient::new,
        )?;
        let jwks = client.get_jwks(GetJwksRequest {}).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot fetch signing keys");
            Status::unavailable("cannot fetch signing keys")
        })?;
        let mut keys = HashMap::new();
        for jwk in jwks.into_inner().keys {
            if jwk.kty == "OKP" && jwk.crv == "Ed25519" {
                match DecodingKey::from_ed_components(&jwk.x) {
                    Ok(k) => {
                        keys.insert(jwk.kid, Arc::new(k));
                    }
                    Err(e) => tracing::warn!(kid = %jwk.kid, error = %e, "unusable published key"),
                }
            }
        }
        *self.keys.write().await = keys;
        Ok(())
    }

    /// Verifies an access token, returning its principal and claims.
    pub async fn verify(&self, token: &str) -> Result<Verified, Status> {
        if token.len() > MAX_TOKEN {
            return Err(unauthenticated("token too long"));
        }
        let now = chrono::Utc::now().timestamp();
        if let Some(hit) = self.verified.get(token) {
            self.still_valid(&hit.0, &hit.1, now)?;
            return Ok(hit);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| unauthenticated("malformed token"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(unauthenticated("unsupported token algorithm"));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthenticated("token has no key id"))?;
        let key = self.key(&kid).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|e| {
            unauthenticated(match e.kind() {
                ErrorKind::ExpiredSignature => "token expired",
                ErrorKind::ImmatureSignature => "token not yet valid",
                ErrorKind::InvalidSignature => "invalid token signature",
                ErrorKind::InvalidAudience => "token is for another audience",
                ErrorKind::InvalidIssuer => "token from another issuer",
                _ => "invalid token",
            })
        })?;
        let claims = data.claims;
        let user_id =
            Uuid::parse_str(&claims.sub).map_err(|_| unauthenticated("invalid token subject"))?;
        let session_id =
            Uuid::parse_str(&claims.sid).map_err(|_| unauthenticated("invalid token session"))?;
        let principal = Principal {
            user_id,
            session_id: Some(session_id),
            roles: claims.roles.clone(),
            permissions: claims.perms.clone(),
            credential: CredentialKind::AccessToken {
                token_id: claims.jti.clone(),
            },
            expires_at: Some(claims.exp),
        };
        self.still_valid(&principal, &claims, now)?;
        let entry = Arc::new((Arc::new(principal), claims));
        self.verified.insert(token.to_string(), entry.clone());
        Ok(entry)
    }

    /// Verifies an API key through AuthService.Introspect, returning its
    /// principal (the key's scopes as permissions, no session or roles).
    pub async fn verify_api_key(&self, secret: &str) -> Result<Arc<Principal>, Status> {
        if secret.len() > MAX_TOKEN {
            return Err(unauthenticated("token too long"));
        }
        let hash = tokens::digest(secret);
        if let Some(hit) = self.api_keys.get(&hash) {
            self.key_still_valid(&hit)?;
            if self.revocations.user_version_floor(hit.principal.user_id) == hit.owner_floor {
                return Ok(hit.principal.clone());
            }
            self.api_keys.invalidate(&hash);
        }
        let ctx = CallContext {
            deadline: Some(Instant::now() + INTROSPECT_TIMEOUT),
            ..CallContext::background()
        };
        let mut client = self
            .clients
            .client(ServiceName::Auth, &ctx, AuthServiceClient::new)?;
        let answer = client
            .introspect(IntrospectRequest {
                token: secret.to_string(),
            })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot introspect an API key");
                Status::unavailable("cannot verify API keys right now")
            })?
            .into_inner();
        let invalid = || unauthenticated("invalid API key");
        if !answer.active {
            return Err(invalid());
        }
        let p = answer.principal.ok_or_else(invalid)?;
        if p.credential_type != "api_key" {
            return Err(invalid());
        }
        let user_id = Uuid::parse_str(&p.user_id).map_err(|_| invalid())?;
        let key_id = Uuid::parse_str(&p.api_key_id).map_err(|_| invalid())?;
        // A cut that lands while the call is in flight can still be missed
        // until the entry expires; later ones change the floor.
        let owner_floor = self.revocations.user_version_floor(user_id);
        let expires_at = match answer.expire_time {
            Some(t) => Some(
                DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
                    .ok_or_else(invalid)?,
            ),
            None => None,
        };
        let known = Arc::new(KnownKey {
            principal: Arc::new(Principal {
                user_id,
                session_id: None,
                roles: Vec::new(),
                permissions: p.permissions,
                credential: CredentialKind::ApiKey { key_id },
                expires_at: expires_at.map(|t| t.timestamp()),
            }),
            key_id,
            expires_at,
            owner_floor,
        });
        // Checked after the answer: a revocation that arrived while the
        // call was in flight must still win.
        self.key_still_valid(&known)?;
        self.api_keys.insert(hash, known.clone());
        Ok(known.principal.clone())
    }

    fn key_still_valid(&self, k: &KnownKey) -> Result<(), Status> {
        if k.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(unauthenticated("API key expired"));
        }
        if self.revocations.is_api_key_revoked(k.key_id) {
            return Err(unauthenticated("API key revoked"));
        }
        Ok(())
    }

    /// Expiry and revocation: checked on every use, cached or not.
    fn still_valid(&self, p: &Principal, c: &Claims, now: i64) -> Result<(), Status> {
        if c.exp <= now {
            return Err(unauthenticated("token expired"));
        }
        let Some(session) = p.session_id else {
            return Err(unauthenticated("invalid token"));
        };
        if self
            .revocations
            .is_revoked(&c.jti, session, p.user_id, c.ver)
        {
            return Err(unauthenticated("token revoked"));
        }
        Ok(())
    }
}

impl Authenticator for TokenVerifier {
    fn authenticate<'a>(
        &'a self,
        credential: &'a str,
    ) -> BoxFuture<'a, Result<Arc<Principal>, Status>> {
        Box::pin(async move {
            if credential.starts_with(SECRET_PREFIX) {
                self.verify_api_key(credential).await
            } else {
                self.verify(credential).await.map(|v| v.0.clone())
            }
        })
    }
}
