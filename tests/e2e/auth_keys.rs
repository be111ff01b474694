//! Signing keys at rest: with `secrets.signing_key_secret` the private keys
//! in PostgreSQL are sealed — keys stored before the secret was set are
//! sealed at startup without changing their kid, so tokens they signed keep
//! verifying; new and rotated keys are stored sealed — and a server whose
//! secret is missing or different refuses to start instead of failing
//! logins.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tokio::net::TcpListener;
use trellis_core::Config;
use trellis_proto::auth::v1 as pb;
use trellis_store::Store;
use trellis_store::schema::signing_keys;
use trellis_tests::mesh::test_config;
use trellis_tests::{TestMesh, TestOptions};

use crate::auth::{PASSWORD, access, admin_account, auth, bearer, login, register, who};

const SECRET: &str = "a-secret-of-at-least-thirty-two-characters";
const OTHER: &str = "another-secret-also-thirty-two-characters";
const MARKER: &[u8] = b"trellis-sealed-v1:";

async fn stored_keys(mesh: &TestMesh) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut conn = mesh.store.pg().await.expect("pg");
    signing_keys::table
        .order(signing_keys::created_at)
        .select((
            signing_keys::kid,
            signing_keys::private_key,
            signing_keys::public_key,
        ))
        .load(&mut conn)
        .await
        .expect("signing keys")
}

fn kid_of(token: &str) -> String {
    let header = jsonwebtoken::decode_header(token).expect("a JWT");
    header.kid.expect("a kid")
}

/// Starts a server on `mesh`'s database with `secret` (and `previous`
/// secrets), then stops it: `Err` with the reason when it refuses.
async fn start_with_secret(
    mesh: &TestMesh,
    secret: Option<&str>,
    previous: &[&str],
) -> anyhow::Result<()> {
    let mut config: Config = test_config(
        mesh.config.database.url.clone().expect("db"),
        mesh.config.redis.url.clone().expect("redis"),
        mesh.config.redis.key_prefix.clone(),
    );
    config.secrets.signing_key_secret = secret.map(str::to_string);
    config.secrets.previous_signing_key_secrets = previous.iter().map(|p| p.to_string()).collect();
    let config = std::sync::Arc::new(config);
    let store = Store::from_config(&config)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let running = trellisd::start(config, store, listener, std::future::pending()).await?;
    running.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_are_sealed_at_rest_and_a_wrong_secret_refuses_to_start() {
    // Before the secret: the key is stored as plain PKCS#8 DER.
    let plain = TestMesh::start().await;
    let mut a = auth(&plain).await;
    let early = access(&register(&mut a, "early").await);
    let before = stored_keys(&plain).await;
    assert_eq!(before.len(), 1);
    let (kid, der, public) = before[0].clone();
    assert_eq!(der[0], 0x30, "plain DER before a secret is set");
    assert_eq!(kid_of(&early), kid);
    let db = plain.config.database.url.clone();
    let prefix = plain.config.redis.key_prefix.clone();
    plain.shutdown().await;

    // With the secret: sealed at startup, same kid and public key.
    let options = TestOptions {
        database_url: db.clone(),
        key_prefix: Some(prefix.clone()),
        ..Default::default()
    };
    let sealed = TestMesh::start_with(options, |c| {
        c.secrets.signing_key_secret = Some(SECRET.into());
    })
    .await;
    let after = stored_keys(&sealed).await;
    assert_eq!(after.len(), 1);
    assert_eq!((&after[0].0, &after[0].2), (&kid, &public));
    assert!(after[0].1.starts_with(MARKER), "sealed at startup");
    let seed = &der[der.len() - 32..];
    assert!(
        !after[0].1.windows(seed.len()).any(|w| w == seed),
        "the private key is not in the clear"
    );
    // Tokens signed before still verify; new ones are signed by the same key.
    let mut a = auth(&sealed).await;
    assert_eq!(
        who(&mut a, &early)
            .await
            .expect("old token")
            .account
            .expect("account")
            .username,
        "early"
    );
    let fresh = login(&mut a, "early", PASSWORD)
        .await
        .expect("login")
        .access_token;
    assert_eq!(kid_of(&fresh), kid);
    who(&mut a, &fresh).await.expect("new token");

    // A rotated key is stored sealed and signs.
    let (_, admin) = admin_account(&sealed, "keyadmin").await;
    let rotated = a
        .rotate_signing_key(bearer(pb::RotateSigningKeyRequest {}, &admin))
        .await
        .expect("rotate")
        .into_inner()
        .kid;
    let keys = stored_keys(&sealed).await;
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter().all(|(_, k, _)| k.starts_with(MARKER)),
        "every key sealed"
    );
    let next = login(&mut a, "early", PASSWORD)
        .await
        .expect("login")
        .access_token;
    assert_eq!(kid_of(&next), rotated);
    who(&mut a, &next).await.expect("token of the rotated key");

    // Without the secret, or with another, the server does not start.
    let none = start_with_secret(&sealed, None, &[])
        .await
        .expect_err("no secret");
    assert!(
        none.to_string()
            .contains("secrets.signing_key_secret is not set"),
        "{none:#}"
    );
    let other = start_with_secret(&sealed, Some(OTHER), &[])
        .await
        .expect_err("another secret");
    assert!(other.to_string().contains("does not open"), "{other:#}");
    // The right one does.
    start_with_secret(&sealed, Some(SECRET), &[])
        .await
        .expect("the right secret");
    // And nothing was rewritten by the refused starts.
    assert_eq!(stored_keys(&sealed).await, keys);

    // Rotating the secret: with the old one as previous, every key is
    // sealed again under the new one (same kids, new bytes) ...
    start_with_secret(&sealed, Some(OTHER), &[SECRET])
        .await
        .expect("the new secret with the old as previous");
    let rekeyed = stored_keys(&sealed).await;
    assert_eq!(rekeyed.len(), keys.len());
    for ((kid, old, public), (kid2, new, public2)) in keys.iter().zip(&rekeyed) {
        assert_eq!((kid, public), (kid2, public2));
        assert!(new.starts_with(MARKER) && new != old, "{kid} sealed again");
    }
    // ... after which the new secret alone opens them and the old one not.
    let old = start_with_secret(&sealed, Some(SECRET), &[])
        .await
        .expect_err("the old secret");
    assert!(old.to_string().contains("does not open"), "{old:#}");
    drop(a);
    sealed.shutdown().await;
    let rotated_secret = TestMesh::start_with(
        TestOptions {
            database_url: db,
            key_prefix: Some(prefix),
            ..Default::default()
        },
        |c| c.secrets.signing_key_secret = Some(OTHER.into()),
    )
    .await;
    let mut a = auth(&rotated_secret).await;
    who(&mut a, &next)
        .await
        .expect("a token signed before the rotation");
    let last = login(&mut a, "early", PASSWORD)
        .await
        .expect("login")
        .access_token;
    assert_eq!(kid_of(&last), rotated);
    who(&mut a, &last).await.expect("a token signed after it");
}
