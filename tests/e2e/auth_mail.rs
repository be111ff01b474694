//! Mail delivery end to end: the outbox drained over SMTP (lettre) to a
//! fake SMTP server in the test process that speaks the real protocol, and
//! retries after the server was unreachable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use trellis_proto::auth::v1 as pb;
use trellis_store::schema::mail_outbox;
use trellis_tests::{TestMesh, TestOptions};

use crate::auth::{auth, register};
use crate::util::eventually;

/// One accepted message: the RCPT lines and the DATA.
type Received = (Vec<String>, String);

/// A minimal SMTP server: accepts every message and keeps it.
#[derive(Clone, Default)]
struct FakeSmtp {
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeSmtp {
    async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 fake.smtp ESMTP ready\r\n").await;
                let (mut rcpt, mut data, mut in_data) = (Vec::new(), String::new(), false);
                while let Ok(Some(line)) = lines.next_line().await {
                    if in_data {
                        if line == "." {
                            in_data = false;
                            me.received
                                .lock()
                                .expect("lock")
                                .push((std::mem::take(&mut rcpt), std::mem::take(&mut data)));
                            let _ = write.write_all(b"250 2.0.0 queued\r\n").await;
                        } else {
                            data.push_str(&line);
                            data.push('\n');
                        }
                        continue;
                    }
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250-fake.smtp\r\n250 8BITMIME\r\n",
                        "MAIL" => b"250 2.1.0 ok\r\n",
                        "RCPT" => {
                            rcpt.push(line.clone());
                            b"250 2.1.5 ok\r\n"
                        }
                        "DATA" => {
                            in_data = true;
                            b"354 go ahead\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    let _ = write.write_all(reply).await;
                }
            });
        }
    }
}

async fn sent_at(
    mesh: &TestMesh,
    to: &str,
) -> Vec<(Option<chrono::DateTime<chrono::Utc>>, i32, Option<String>)> {
    let mut conn = mesh.store.pg().await.expect("pg");
    mail_outbox::table
        .filter(mail_outbox::to_address.eq(to))
        .select((
            mail_outbox::sent_at,
            mail_outbox::attempts,
            mail_outbox::last_error,
        ))
        .load(&mut conn)
        .await
        .expect("outbox")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mail_is_delivered_over_smtp() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let smtp = FakeSmtp::default();
    tokio::spawn(smtp.clone().serve(listener));
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.mail.smtp_url = Some(format!("smtp://127.0.0.1:{port}"));
        c.mail.from = "Trellis <no-reply@trellis.test>".into();
        c.mail.poll_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "mailme").await;
    client
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "mailme@example.com".into(),
        })
        .await
        .expect("requested");
    assert!(
        eventually(Duration::from_secs(5), || async {
            !smtp.received.lock().expect("lock").is_empty()
        })
        .await,
        "the fake SMTP server received nothing"
    );
    let (rcpt, data) = smtp.received.lock().expect("lock")[0].clone();
    assert!(
        rcpt.iter().any(|r| r.contains("mailme@example.com")),
        "{rcpt:?}"
    );
    assert!(
        data.contains("Subject: Reset your Trellis password"),
        "{data}"
    );
    assert!(
        data.contains("From: Trellis <no-reply@trellis.test>"),
        "{data}"
    );
    assert!(data.contains("prt_"), "the token is in the mail: {data}");
    assert!(
        eventually(Duration::from_secs(2), || async {
            sent_at(&mesh, "mailme@example.com")
                .await
                .iter()
                .all(|r| r.0.is_some())
        })
        .await,
        "the outbox row is marked sent"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeliverable_mail_is_retried() {
    // Reserve a port, leave it closed so delivery fails, then serve on it.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.mail.smtp_url = Some(format!("smtp://127.0.0.1:{port}"));
        c.mail.poll_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "retry").await;
    client
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "retry@example.com".into(),
        })
        .await
        .expect("acknowledged even while SMTP is down");
    assert!(
        eventually(Duration::from_secs(5), || async {
            sent_at(&mesh, "retry@example.com")
                .await
                .iter()
                .any(|r| r.1 >= 1 && r.2.is_some() && r.0.is_none())
        })
        .await,
        "a failed attempt is recorded"
    );
    let smtp = FakeSmtp::default();
    tokio::spawn(
        smtp.clone().serve(
            TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("rebind"),
        ),
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            !smtp.received.lock().expect("lock").is_empty()
        })
        .await,
        "delivered after the server came up"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            sent_at(&mesh, "retry@example.com")
                .await
                .iter()
                .all(|r| r.0.is_some())
        })
        .await
    );
    mesh.shutdown().await;
}
