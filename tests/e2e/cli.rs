//! The `trellis` command-line client against the in-process mesh (the LLM
//! upstream is the fake one): accounts and the stored login, chat with
//! streaming replies and Ctrl-C, history, sessions, search, models, usage —
//! each command run through `trellis_cli::run` with its arguments, standard
//! input and interrupts, its output read back.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::sync::mpsc;
use trellis_cli::{Cli, CliError, Io};
use trellis_proto::auth::v1 as apb;
use trellis_proto::chat::v1 as pb;
use trellis_proto::search::v1 as spb;
use trellis_tests::Script;

use crate::auth::{PASSWORD, auth, bearer};
use crate::auth_totp::{code_at, fresh_step};
use crate::chat::chat;
use crate::llm::rig;
use crate::util::eventually;

/// Output a test can read while the command still runs.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
    }
}

struct Ran {
    result: Result<(), CliError>,
    out: String,
    err: String,
}

/// A command still running: its output so far and its Ctrl-C.
struct Running {
    out: Shared,
    err: Shared,
    interrupt: mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<Result<(), CliError>>,
}

impl Running {
    async fn done(self) -> Ran {
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the command ended")
            .expect("join");
        Ran {
            result,
            out: self.out.text(),
            err: self.err.text(),
        }
    }
}

/// One person at a terminal: a server and a configuration directory.
struct Terminal {
    server: String,
    dir: tempfile::TempDir,
}

impl Terminal {
    fn new(server: String) -> Self {
        Self {
            server,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn start(&self, args: &[&str], stdin: &str) -> Running {
        let mut argv = vec![
            "trellis".to_string(),
            "--server".into(),
            self.server.clone(),
            "--config-dir".into(),
            self.dir.path().display().to_string(),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        let cli = Cli::try_parse_from(argv).expect("arguments");
        let (interrupt, mut interrupts) = mpsc::unbounded_channel();
        let (out, err) = (Shared::default(), Shared::default());
        let (mut o, mut e) = (out.clone(), err.clone());
        let stdin = stdin.to_string();
        let task = tokio::spawn(async move {
            let mut input = std::io::Cursor::new(stdin.into_bytes());
            let mut io = Io {
                stdin: &mut input,
                out: &mut o,
                err: &mut e,
                interrupts: &mut interrupts,
                terminal: false,
                color: false,
            };
            trellis_cli::run(cli, &mut io).await
        });
        Running {
            out,
            err,
            interrupt,
            task,
        }
    }

    async fn run(&self, args: &[&str], stdin: &str) -> Ran {
        self.start(args, stdin).done().await
    }

    /// Registers (and so logs in) a new account with a good password; the
    /// command's standard output.
    async fn register(&self, email: &str, username: &str) -> String {
        self.ok(
            &["register", "--email", email, "--username", username],
            "Str0ng!pass\n",
        )
        .await
    }

    /// A command that must succeed; its standard output.
    async fn ok(&self, args: &[&str], stdin: &str) -> String {
        let r = self.run(args, stdin).await;
        if let Err(e) = &r.result {
            panic!(
                "trellis {args:?} failed: {e}\nstdout: {}\nstderr: {}",
                r.out, r.err
            );
        }
        r.out
    }

    /// A command that must fail; its error as printed.
    async fn fails(&self, args: &[&str], stdin: &str) -> CliError {
        match self.run(args, stdin).await.result {
            Ok(()) => panic!("trellis {args:?} succeeded"),
            Err(e) => e,
        }
    }

    fn stored(&self) -> serde_json::Value {
        let path = self.dir.path().join("credentials.json");
        serde_json::from_slice(&std::fs::read(path).expect("credentials file")).expect("json")
    }

    fn edit_stored(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v = self.stored();
        f(&mut v["servers"][&self.server]);
        std::fs::write(
            self.dir.path().join("credentials.json"),
            serde_json::to_vec(&v).expect("json"),
        )
        .expect("write");
    }
}

/// Standard output whose reader stops after the first write (`| head -1`).
struct ClosedAfterFirstWrite {
    written: bool,
}

impl Write for ClosedAfterFirstWrite {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if std::mem::replace(&mut self.written, true) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_closed_by_its_reader_ends_the_command_quietly() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.register("piper@example.com", "piper").await;
    let argv = [
        "trellis",
        "--server",
        &t.server,
        "--config-dir",
        &t.dir.path().display().to_string(),
        "--json",
        "models",
    ]
    .map(String::from);
    let cli = Cli::try_parse_from(argv).expect("arguments");
    let (_interrupt, mut interrupts) = mpsc::unbounded_channel();
    let mut out = ClosedAfterFirstWrite { written: false };
    let mut err = Shared::default();
    let mut input = std::io::Cursor::new(Vec::new());
    let mut io = Io {
        stdin: &mut input,
        out: &mut out,
        err: &mut err,
        interrupts: &mut interrupts,
        terminal: false,
        color: false,
    };
    let e = trellis_cli::run(cli, &mut io)
        .await
        .expect_err("the second line could not be written");
    assert!(e.reader_gone(), "{e:?}");
    assert_eq!(e.exit_code(), 0, "a closed pipe is not a failure");
    assert_eq!(err.text(), "", "nothing said about it");
    // Any other error still fails the command.
    assert_eq!(
        CliError::Io(std::io::ErrorKind::PermissionDenied.into()).exit_code(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_keeps_a_login_refreshes_it_and_explains_refusals() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());

    // Bad input is explained field by field; nothing is stored.
    let e = t
        .fails(
            &["register", "--email", "nope", "--username", "ada"],
            "Str0ng!pass\n",
        )
        .await;
    let text = e.to_string();
    assert!(text.starts_with("INVALID_ARGUMENT: "), "{text}");
    assert!(
        text.contains("email: must be a valid e-mail address"),
        "{text}"
    );
    assert_eq!(e.exit_code(), 1);
    assert!(!t.dir.path().join("credentials.json").exists());

    let out = t
        .ok(
            &[
                "register",
                "--email",
                "ada@example.com",
                "--username",
                "ada",
                "--display-name",
                "Ada L",
            ],
            "Str0ng!pass\n",
        )
        .await;
    assert!(out.starts_with("registered ada ("), "{out}");
    let who = t.ok(&["whoami"], "").await;
    assert!(
        who.starts_with("ada (Ada L) <ada@example.com> (not verified)\n"),
        "{who}"
    );
    assert!(who.ends_with("two-factor:  off\n"), "{who}");
    assert!(who.contains("roles:       member\n"), "{who}");
    assert!(who.contains("credential:  access_token\n"), "{who}");

    // The file holds tokens for this server only, never the password, and
    // only its owner may read it.
    let raw = std::fs::read_to_string(t.dir.path().join("credentials.json")).expect("file");
    assert!(!raw.contains("Str0ng"), "the password is not kept");
    let stored = t.stored();
    assert_eq!(stored["servers"][&t.server]["username"], "ada");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.dir.path().join("credentials.json"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // An access token about to expire is refreshed first; the refresh
    // token rotates and the new pair is kept.
    let before = t.stored()["servers"][&t.server].clone();
    t.edit_stored(|e| e["access_expires"] = 0.into());
    assert!(t.ok(&["whoami"], "").await.starts_with("ada "));
    let after = t.stored()["servers"][&t.server].clone();
    assert_ne!(after["refresh_token"], before["refresh_token"]);
    assert_ne!(after["access_token"], before["access_token"]);
    assert!(after["access_expires"].as_i64().expect("secs") > 0);

    // A refresh token the server no longer honours ends the login.
    t.edit_stored(|e| {
        e["access_expires"] = 0.into();
        e["refresh_token"] = "bogus".into();
    });
    let e = t.fails(&["whoami"], "").await;
    assert!(matches!(e, CliError::NotLoggedIn(_)), "{e}");
    assert!(t.stored()["servers"].get(&t.server).is_none());

    // Wrong password; then the right one (by e-mail) from standard input.
    let e = t
        .fails(&["login", "ada", "--password-stdin"], "wrong-pass\n")
        .await;
    assert!(e.to_string().starts_with("UNAUTHENTICATED: "), "{e}");
    let out = t
        .ok(
            &["login", "ada@example.com", "--password-stdin"],
            "Str0ng!pass\n",
        )
        .await;
    assert_eq!(out, format!("logged in to {} as ada\n", t.server));

    // API keys: created (the secret alone on stdout), used instead of the
    // stored login, listed, revoked.
    let e = t
        .fails(&["keys", "create", "greedy", "--scope", "user:users:*"], "")
        .await;
    assert!(
        e.to_string().starts_with(
            "PERMISSION_DENIED: a key cannot grant permissions you do not hold: user:users:*"
        ),
        "{e}"
    );
    let r = t
        .run(
            &[
                "keys",
                "create",
                "ci",
                "--scope",
                "auth:self:*",
                "--ttl-days",
                "7",
            ],
            "",
        )
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let key = r.out.trim_end().to_string();
    assert!(key.starts_with("trk_") && !key.contains('\n'), "{}", r.out);
    let key_id = r
        .err
        .split_whitespace()
        .nth(2)
        .expect("the key's id")
        .to_string();
    let elsewhere = Terminal::new(rig.mesh.url());
    let who = elsewhere.ok(&["--token", &key, "whoami"], "").await;
    assert!(who.contains("credential:  api_key\n"), "{who}");
    assert!(matches!(
        elsewhere.fails(&["whoami"], "").await,
        CliError::NotLoggedIn(_)
    ));
    let keys = t.ok(&["keys", "list"], "").await;
    let row = keys
        .lines()
        .find(|l| l.starts_with(&key_id))
        .unwrap_or_else(|| panic!("the key is listed:\n{keys}"));
    assert!(
        row.contains(" ci ") && row.contains(" active ") && row.ends_with("auth:self:*"),
        "{row}"
    );
    assert!(!keys.contains(&key), "the secret is never listed");
    let stranger = Terminal::new(rig.mesh.url());
    stranger.register("sam@example.com", "sam").await;
    let e = stranger.fails(&["keys", "revoke", &key_id], "").await;
    assert!(e.to_string().starts_with("NOT_FOUND: "), "{e}");
    assert!(!stranger.ok(&["keys", "list"], "").await.contains(&key_id));
    assert_eq!(
        t.ok(&["keys", "revoke", &key_id], "").await,
        format!("revoked {key_id}\n")
    );
    assert!(t.ok(&["keys", "list"], "").await.contains(" revoked "));
    assert!(
        eventually(Duration::from_secs(5), || async {
            elsewhere
                .run(&["--token", &key, "whoami"], "")
                .await
                .result
                .is_err_and(|e| e.to_string().starts_with("UNAUTHENTICATED: "))
        })
        .await,
        "a revoked key is refused"
    );

    // A new password: the other sessions end, the old password is refused.
    let second = Terminal::new(rig.mesh.url());
    second
        .ok(&["login", "ada", "--password-stdin"], "Str0ng!pass\n")
        .await;
    let e = t.fails(&["passwd"], "wrong-pass\nN3w!passw0rd\n").await;
    assert!(
        e.to_string().contains("current_password: is incorrect"),
        "{e}"
    );
    assert_eq!(
        t.ok(&["passwd"], "Str0ng!pass\nN3w!passw0rd\n").await,
        "password changed; your other sessions have ended\n"
    );
    assert!(
        t.ok(&["whoami"], "").await.starts_with("ada "),
        "this session goes on"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            second.run(&["whoami"], "").await.result.is_err()
        })
        .await,
        "the other session ended"
    );
    let e = second
        .fails(&["login", "ada", "--password-stdin"], "Str0ng!pass\n")
        .await;
    assert!(e.to_string().starts_with("UNAUTHENTICATED: "), "{e}");
    second
        .ok(&["login", "ada", "--password-stdin"], "N3w!passw0rd\n")
        .await;

    // Logout ends the session on the server too: its refresh is refused.
    let refresh = t.stored()["servers"][&t.server]["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_string();
    assert_eq!(
        t.ok(&["logout"], "").await,
        format!("logged out of {}\n", t.server)
    );
    let refused = auth(&rig.mesh)
        .await
        .refresh(apb::RefreshRequest {
            refresh_token: refresh,
        })
        .await
        .expect_err("revoked");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        t.ok(&["logout"], "").await,
        format!("not logged in to {}\n", t.server)
    );

    // No server there.
    let nowhere = Terminal::new("127.0.0.1:1".into());
    let e = nowhere.fails(&["whoami"], "").await;
    assert!(matches!(e, CliError::Unreachable(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_chats_streams_cancels_and_reads_history() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.ok(&["login", "llmuser"], &format!("{PASSWORD}\n")).await;

    // One turn in a new session: the reply as the model said it.
    let r = t.run(&["chat", "-m", "fast", "hello", "there"], "").await;
    assert!(r.result.is_ok(), "{:?} {}", r.result, r.err);
    assert_eq!(r.out, "Hello world\n");
    let session = r
        .err
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .expect("the new session's id")
        .to_string();
    uuid::Uuid::parse_str(&session).expect("a session id");

    // A conversation from standard input, one turn a line, in order, in
    // the same session; --stats reports each reply.
    rig.primary.set_fallback(Script::echo());
    let r = t
        .run(
            &["chat", "--session", &session, "--stats"],
            "first\n\nsecond\n",
        )
        .await;
    assert!(r.result.is_ok(), "{:?} {}", r.result, r.err);
    assert_eq!(r.out, "echo: tsrif\necho: dnoces\n");
    assert_eq!(
        r.err.matches(" completion tokens, $").count(),
        2,
        "{}",
        r.err
    );

    let history = t.ok(&["history", &session], "").await;
    let said: Vec<&str> = history
        .lines()
        .map(|l| l.split_once("] ").expect("a timestamp").1)
        .collect();
    assert_eq!(
        said,
        [
            "you: hello there",
            "assistant: Hello world",
            "you: first",
            "assistant: echo: tsrif",
            "you: second",
            "assistant: echo: dnoces",
        ]
    );
    let last_two = t.ok(&["history", &session, "--limit", "2"], "").await;
    assert_eq!(last_two.lines().count(), 2);
    assert!(last_two.contains("you: second"), "{last_two}");

    let sessions = t.ok(&["sessions"], "").await;
    let row = sessions
        .lines()
        .find(|l| l.starts_with(&session))
        .unwrap_or_else(|| panic!("the session is listed:\n{sessions}"));
    assert!(row.contains(" active "), "{row}");
    assert!(row.contains(" 6 "), "six messages: {row}");
    assert!(
        row.ends_with("hello there"),
        "titled by its first message: {row}"
    );

    // Ctrl-C while the reply streams cancels it: the server stops the
    // upstream and keeps what was said, CANCELLED.
    rig.primary
        .push([Script::slow(40, Duration::from_millis(100))]);
    let running = t.start(&["chat", "--session", &session, "long one"], "");
    assert!(
        eventually(Duration::from_secs(10), || async {
            running.out.text().contains("t1 ")
        })
        .await,
        "the reply streams"
    );
    running.interrupt.send(()).expect("interrupt");
    let r = running.done().await;
    assert!(r.result.is_ok(), "{:?} {}", r.result, r.err);
    assert!(r.err.contains("[cancelled]"), "{}", r.err);
    let printed = r.out.trim_end().to_string();
    assert!(
        printed.starts_with("t0 t1") && !printed.contains("t39"),
        "{printed}"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            rig.primary.abandoned() == 1
        })
        .await,
        "the upstream saw the disconnect"
    );
    let stored = chat(&rig.mesh)
        .await
        .list_messages(bearer(
            pb::ListMessagesRequest {
                session_id: session.clone(),
                page_size: 1,
                newest_first: true,
                ..Default::default()
            },
            &rig.token,
        ))
        .await
        .expect("messages")
        .into_inner()
        .messages;
    assert_eq!(stored[0].status, pb::MessageStatus::Cancelled as i32);
    assert_eq!(stored[0].content.trim_end(), printed);
    let history = t.ok(&["history", &session, "--limit", "1"], "").await;
    assert!(
        history.contains("assistant (cancelled): t0 t1 "),
        "{history}"
    );

    // A reply that fails is reported with its code; a conversation goes on
    // past it.
    rig.primary.push([Script::status(500)]);
    rig.backup.push([Script::status(500)]);
    let e = t.fails(&["chat", "--session", &session, "boom"], "").await;
    assert!(e.to_string().starts_with("UNAVAILABLE: "), "{e}");
    rig.primary.push([Script::status(500)]);
    rig.backup.push([Script::status(500)]);
    let r = t
        .run(&["chat", "--session", &session], "boom\nagain\n")
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert!(r.err.contains("error: UNAVAILABLE: "), "{}", r.err);
    assert_eq!(r.out, "echo: niaga\n");

    // Bad input, before anything is sent.
    let e = t.fails(&["chat", "-m", "fast", " "], "").await;
    assert_eq!(e.exit_code(), 2, "{e}");
    let e = t.fails(&["chat", "-m", "no-such-model", "hi"], "").await;
    assert!(e.to_string().starts_with("INVALID_ARGUMENT: "), "{e}");
    assert!(e.to_string().contains("model: unknown model"), "{e}");

    // Another user's session does not exist for them.
    let other = Terminal::new(rig.mesh.url());
    other.register("eve@example.com", "eve").await;
    for args in [
        vec!["chat", "--session", session.as_str(), "mine now"],
        vec!["history", session.as_str()],
    ] {
        let e = other.fails(&args, "").await;
        assert!(e.to_string().starts_with("NOT_FOUND: "), "{args:?}: {e}");
    }
    assert!(!other.ok(&["sessions"], "").await.contains(&session));

    // The gateway's models and this user's usage.
    let models = t.ok(&["models"], "").await;
    assert!(models.starts_with("MODEL "), "{models}");
    assert!(
        models
            .lines()
            .any(|l| l.starts_with("fast ") && l.ends_with("primary, backup")),
        "{models}"
    );
    let usage = t.ok(&["usage"], "").await;
    let total = usage
        .lines()
        .find(|l| l.starts_with("total"))
        .expect("a total");
    let requests: i64 = total
        .split_whitespace()
        .nth(1)
        .expect("requests")
        .parse()
        .expect("a number");
    assert!(requests >= 4, "{usage}");
    let eve_usage = other.ok(&["usage"], "").await;
    let eve_total = eve_usage
        .lines()
        .find(|l| l.starts_with("total"))
        .expect("total");
    assert_eq!(
        eve_total.split_whitespace().nth(1),
        Some("0"),
        "{eve_usage}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_searches_what_the_user_can_see() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.ok(&["login", "llmuser"], &format!("{PASSWORD}\n")).await;
    let mut search = trellis_proto::search::v1::search_service_client::SearchServiceClient::new(
        rig.mesh.channel().await,
    );
    search
        .index_documents(bearer(
            spb::IndexDocumentsRequest {
                documents: vec![spb::DocumentInput {
                    external_id: "n1".into(),
                    collection: "notes".into(),
                    title: "Gardening note".into(),
                    body: "Tomatoes need sun and trellises.".into(),
                    ..Default::default()
                }],
            },
            &rig.token,
        ))
        .await
        .expect("index");
    let r = t
        .run(&["search", "trellises", "--collection", "notes"], "")
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let mut lines = r.out.lines();
    let first = lines.next().expect("a hit");
    assert!(first.starts_with("1. Gardening note [notes] "), "{}", r.out);
    assert!(
        lines
            .next()
            .expect("a snippet")
            .contains("<mark>trellises</mark>"),
        "{}",
        r.out
    );
    assert!(r.err.starts_with("1 of about 1 results"), "{}", r.err);

    let r = t
        .run(&["search", "trellises", "--collection", "other"], "")
        .await;
    assert_eq!(r.out, "");
    assert!(r.err.starts_with("0 of about 0 results"), "{}", r.err);

    // Someone else does not see the note.
    let other = Terminal::new(rig.mesh.url());
    other.register("mal@example.com", "mal").await;
    assert_eq!(other.ok(&["search", "trellises"], "").await, "");

    let e = t.fails(&["search", "x", "--limit=-1"], "").await;
    assert!(e.to_string().starts_with("INVALID_ARGUMENT: "), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follows_a_reply_after_a_disconnect_regenerates_and_cancels() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.ok(&["login", "llmuser"], &format!("{PASSWORD}\n")).await;

    // A slow reply whose terminal goes away: the server goes on with it.
    rig.primary
        .push([Script::slow(20, Duration::from_millis(50))]);
    let running = t.start(&["chat", "-m", "fast", "tell me a story"], "");
    assert!(
        eventually(Duration::from_secs(10), || async {
            running.out.text().contains("t1 ")
        })
        .await,
        "the reply streams"
    );
    let session = running
        .err
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .expect("the session")
        .to_string();
    running.task.abort();

    // history --ids names the reply, still streaming.
    let h = t.ok(&["history", &session, "--ids"], "").await;
    let line = h
        .lines()
        .find(|l| l.contains(" assistant"))
        .unwrap_or_else(|| panic!("the reply is listed:\n{h}"));
    assert!(line.contains(" assistant (streaming): "), "{h}");
    let id = line.split_whitespace().nth(2).expect("an id").to_string();
    uuid::Uuid::parse_str(&id).expect("a message id");

    // watch replays what was said and follows the rest: all of it, in order.
    let expected: String = (0..20).map(|i| format!("t{i} ")).collect();
    assert_eq!(t.ok(&["watch", &id], "").await, format!("{expected}\n"));
    assert_eq!(t.ok(&["cancel", &id], "").await, "already finished\n");

    // A regenerated reply is new; the first one is kept.
    assert_eq!(t.ok(&["regenerate", &id], "").await, "Hello world\n");
    let h = t.ok(&["history", &session], "").await;
    assert!(h.contains(&format!("assistant: {expected}")), "{h}");
    assert!(h.contains("assistant: Hello world"), "{h}");

    // Ctrl-C during a regeneration cancels it, upstream included.
    rig.primary
        .push([Script::slow(40, Duration::from_millis(100))]);
    let running = t.start(&["regenerate", &id, "--stats"], "");
    assert!(
        eventually(Duration::from_secs(10), || async {
            running.out.text().contains("t1 ")
        })
        .await,
        "the regeneration streams"
    );
    running.interrupt.send(()).expect("interrupt");
    let r = running.done().await;
    assert!(r.result.is_ok(), "{:?} {}", r.result, r.err);
    assert!(r.err.contains("[cancelled]"), "{}", r.err);
    assert!(
        eventually(Duration::from_secs(3), || async {
            rig.primary.abandoned() == 1
        })
        .await,
        "the upstream saw the disconnect"
    );
    let h = t.ok(&["history", &session, "--limit", "1"], "").await;
    assert!(h.contains("assistant (cancelled): t0 "), "{h}");

    // Another user's reply cannot be watched, cancelled or regenerated;
    // a malformed id is bad input.
    let other = Terminal::new(rig.mesh.url());
    other.register("oz@example.com", "ozzy").await;
    for verb in ["watch", "cancel", "regenerate"] {
        let e = other.fails(&[verb, &id], "").await;
        assert!(e.to_string().starts_with("NOT_FOUND: "), "{verb}: {e}");
        let e = t.fails(&[verb, "not-an-id"], "").await;
        assert!(
            e.to_string().starts_with("INVALID_ARGUMENT: "),
            "{verb}: {e}"
        );
    }
}

/// The text of the row of `table` whose first column is `id`.
fn row_of<'a>(table: &'a str, id: &str) -> Option<&'a str> {
    table.lines().find(|l| l.starts_with(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_indexes_files_shows_and_deletes_documents() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.ok(&["login", "llmuser"], &format!("{PASSWORD}\n")).await;
    let files = tempfile::tempdir().expect("tempdir");
    let guide = files.path().join("guide.md");
    std::fs::write(
        &guide,
        "# Trellis guide\n\nGrow runner beans up a trellis.\n",
    )
    .expect("write");
    let compost = files.path().join("compost.txt");
    std::fs::write(&compost, "Compost wants greens and browns.\n").expect("write");
    let (guide_s, compost_s) = (guide.display().to_string(), compost.display().to_string());

    // Two files, one request: each id, new, and the totals.
    let r = t
        .run(
            &[
                "docs",
                "index",
                &guide_s,
                &compost_s,
                "-c",
                "garden",
                "--tag",
                "howto",
                "--attr",
                "season=spring",
            ],
            "",
        )
        .await;
    assert!(r.result.is_ok(), "{:?} {}", r.result, r.err);
    let lines: Vec<&str> = r.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.out);
    assert!(
        lines[0].ends_with(&format!("new       {guide_s}")),
        "{}",
        r.out
    );
    assert!(
        lines[1].ends_with(&format!("new       {compost_s}")),
        "{}",
        r.out
    );
    let guide_id = lines[0].split_whitespace().next().expect("id").to_string();
    uuid::Uuid::parse_str(&guide_id).expect("a document id");
    assert_eq!(r.err, "indexed 2 into garden: 2 new, 0 replaced\n");

    // The same file again replaces its document (same id), as the same
    // file under another spelling of its path does.
    let again = files.path().join(".").join("guide.md");
    let out = t
        .ok(
            &[
                "docs",
                "index",
                &again.display().to_string(),
                "-c",
                "garden",
                "--tag",
                "howto",
            ],
            "",
        )
        .await;
    assert!(out.starts_with(&format!("{guide_id}  replaced")), "{out}");

    // Found by search with its id; titled by its heading, or by its name.
    let hits = t.ok(&["search", "beans", "--ids"], "").await;
    let first = hits.lines().next().expect("a hit");
    assert!(first.starts_with("1. Trellis guide [garden] "), "{hits}");
    assert!(first.ends_with(&guide_id), "{hits}");
    let hits = t
        .ok(&["search", "compost", "--collection", "garden"], "")
        .await;
    assert!(hits.starts_with("1. compost.txt [garden] "), "{hits}");

    let shown = t.ok(&["docs", "show", &guide_id], "").await;
    let mut l = shown.lines();
    assert_eq!(l.next(), Some("Trellis guide"));
    assert!(
        l.next()
            .expect("meta")
            .starts_with(&format!("id {guide_id} · garden · private · updated ")),
        "{shown}"
    );
    assert!(shown.contains("\ntags: howto\n"), "{shown}");
    assert!(
        shown.ends_with("Grow runner beans up a trellis.\n\n"),
        "{shown}"
    );
    // The replacing index carried no --attr: the attribute is gone.
    assert!(!shown.contains("season"), "{shown}");
    let collections = t.ok(&["docs", "collections"], "").await;
    assert!(
        collections
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["garden", "2"]),
        "{collections}"
    );

    // Standard input, with an id of the caller's own; refused without one.
    let out = t
        .ok(
            &[
                "docs",
                "index",
                "-",
                "--id",
                "note-1",
                "--title",
                "Piped note",
                "--shared",
            ],
            "Mulch keeps the soil moist.\n",
        )
        .await;
    assert!(out.contains("  new       standard input"), "{out}");
    let piped = out.split_whitespace().next().expect("id").to_string();
    let e = t.fails(&["docs", "index", "-"], "text").await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");
    assert!(e.to_string().contains("--id"), "{e}");
    let e = t
        .fails(&["docs", "index", &guide_s, &compost_s, "--title", "x"], "")
        .await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");

    // A file that is not text, or missing, stops the command before
    // anything is sent.
    let binary = files.path().join("blob.bin");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).expect("write");
    let e = t
        .fails(
            &["docs", "index", &compost_s, &binary.display().to_string()],
            "",
        )
        .await;
    assert!(e.to_string().ends_with("blob.bin: not UTF-8 text"), "{e}");
    let e = t
        .fails(&["docs", "index", "/nonexistent/file.md"], "")
        .await;
    assert!(e.to_string().starts_with("/nonexistent/file.md: "), "{e}");

    // A directory: every file below it, hidden ones left out, one that is
    // not text skipped (named on standard error).
    let tree = files.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::create_dir_all(tree.join(".git")).expect("mkdir");
    std::fs::write(tree.join("one.md"), "# One\nxylophone").expect("write");
    std::fs::write(tree.join("sub").join("two.txt"), "quartz").expect("write");
    std::fs::write(tree.join(".hidden.md"), "gamma").expect("write");
    std::fs::write(tree.join(".git").join("config"), "delta").expect("write");
    std::fs::write(tree.join("sub").join("blob.bin"), [0xffu8, 0x00]).expect("write");
    let r = t
        .run(
            &["docs", "index", &tree.display().to_string(), "-c", "tree"],
            "",
        )
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let indexed: Vec<&str> = r
        .out
        .lines()
        .map(|l| l.rsplit('/').next().unwrap_or(""))
        .collect();
    assert_eq!(indexed, ["one.md", "two.txt"], "{}", r.out);
    assert!(
        r.err.contains("skipped ") && r.err.contains("blob.bin: not UTF-8 text"),
        "{}",
        r.err
    );
    assert!(
        r.err
            .ends_with("indexed 2 into tree: 2 new, 0 replaced, 1 skipped\n"),
        "{}",
        r.err
    );
    let e = t
        .fails(
            &["docs", "index", &tree.display().to_string(), "--id", "x"],
            "",
        )
        .await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");

    // The server's refusal names the file behind the document.
    let e = t
        .fails(&["docs", "index", &compost_s, "-c", "Bad Name"], "")
        .await;
    let text = e.to_string();
    assert!(text.starts_with("INVALID_ARGUMENT: "), "{text}");
    assert!(text.contains("documents[0].collection"), "{text}");
    assert!(
        text.contains(&format!("documents[0] is {compost_s}")),
        "{text}"
    );

    // Another user: the private documents do not exist for them, the
    // shared one does; their delete deletes nothing.
    let other = Terminal::new(rig.mesh.url());
    other.register("dot@example.com", "dotty").await;
    let e = other.fails(&["docs", "show", &guide_id], "").await;
    assert!(e.to_string().starts_with("NOT_FOUND: "), "{e}");
    assert_eq!(other.ok(&["search", "beans"], "").await, "");
    assert!(
        other
            .ok(&["search", "mulch"], "")
            .await
            .starts_with("1. Piped note ")
    );
    assert_eq!(
        other.ok(&["docs", "rm", &guide_id], "").await,
        "deleted 0 of 1\n"
    );
    assert!(
        t.ok(&["docs", "show", &guide_id], "")
            .await
            .starts_with("Trellis guide\n")
    );

    // The owner deletes; search no longer finds it.
    assert_eq!(
        t.ok(&["docs", "rm", &guide_id, &piped], "").await,
        "deleted 2 of 2\n"
    );
    assert_eq!(t.ok(&["search", "beans"], "").await, "");
    let e = t.fails(&["docs", "show", &guide_id], "").await;
    assert!(e.to_string().starts_with("NOT_FOUND: "), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_administers_accounts_roles_and_reads_the_audit_trail() {
    let rig = rig(|_| {}).await;
    let (boss_id, _) = crate::auth::admin_account(&rig.mesh, "bossy").await;
    let admin = Terminal::new(rig.mesh.url());
    admin
        .ok(&["login", "bossy"], &format!("{PASSWORD}\n"))
        .await;
    let member = Terminal::new(rig.mesh.url());
    let reg = member.register("kim@example.com", "kimmy").await;
    let kim = reg
        .split(['(', ')'])
        .nth(1)
        .expect("the new account's id")
        .to_string();
    uuid::Uuid::parse_str(&kim).expect("an id");

    // List and search: the table and the count.
    let r = admin.run(&["users", "list", "--query", "KIMMY"], "").await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let row = row_of(&r.out, &kim).unwrap_or_else(|| panic!("kimmy listed:\n{}", r.out));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[1..6],
        ["kimmy", "kim@example.com", "kimmy", "active", "member"],
        "{row}"
    );
    assert_eq!(r.err, "1 of 1 account\n");
    // Pages: one account a page, then the rest from the printed token.
    let r = admin
        .run(
            &[
                "users",
                "list",
                "--limit",
                "1",
                "--order-by",
                "username",
                "--asc",
            ],
            "",
        )
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let token = r
        .err
        .lines()
        .find_map(|l| l.strip_prefix("more: --page-token="))
        .unwrap_or_else(|| panic!("a next page: {}", r.err))
        .to_string();
    let first_page = r.out.lines().nth(1).expect("one row").to_string();
    let next = admin
        .ok(
            &[
                "users",
                "list",
                "--limit",
                "1",
                "--order-by",
                "username",
                "--asc",
                "--page-token",
                &token,
            ],
            "",
        )
        .await;
    assert_ne!(next.lines().nth(1), Some(first_page.as_str()), "{next}");
    let all = admin
        .ok(&["users", "list", "--all", "--limit", "1"], "")
        .await;
    assert!(
        row_of(&all, &kim).is_some() && row_of(&all, &boss_id).is_some(),
        "{all}"
    );
    // The same token under another order is refused.
    let e = admin
        .fails(
            &[
                "users",
                "list",
                "--limit",
                "1",
                &format!("--page-token={token}"),
            ],
            "",
        )
        .await;
    assert!(e.to_string().starts_with("INVALID_ARGUMENT: "), "{e}");

    // Show by username, by e-mail and by id.
    for who in ["kimmy", "kim@example.com", kim.as_str()] {
        let shown = admin.ok(&["users", "show", who], "").await;
        assert!(
            shown.starts_with(&format!("id            {kim}\nusername      kimmy\n")),
            "{shown}"
        );
        assert!(shown.contains("\nstatus        active\n"), "{shown}");
    }
    let e = admin.fails(&["users", "show", "nobody"], "").await;
    assert_eq!(e.to_string(), "NOT_FOUND: no account is named nobody");

    // Suspension ends the member's session at once; reactivation lets
    // them log in again.
    member.ok(&["whoami"], "").await;
    let out = admin
        .ok(&["users", "suspend", "kimmy", "--reason", "spam"], "")
        .await;
    assert_eq!(out, format!("suspended kimmy ({kim}): suspended\n"));
    assert!(
        member.run(&["whoami"], "").await.result.is_err(),
        "the session ended"
    );
    let e = member.fails(&["login", "kimmy"], "Str0ng!pass\n").await;
    assert!(
        e.to_string().starts_with("PERMISSION_DENIED: ")
            || e.to_string().starts_with("UNAUTHENTICATED: "),
        "{e}"
    );
    let suspended = admin
        .ok(&["users", "list", "--status", "suspended"], "")
        .await;
    assert!(row_of(&suspended, &kim).is_some(), "{suspended}");
    assert!(row_of(&suspended, &boss_id).is_none(), "{suspended}");
    let out = admin.ok(&["users", "reactivate", &kim], "").await;
    assert_eq!(out, format!("reactivated kimmy ({kim}): active\n"));
    member.ok(&["login", "kimmy"], "Str0ng!pass\n").await;

    // Roles: listed, assigned and revoked; `can` answers with wildcards.
    let roles = admin.ok(&["roles", "list"], "").await;
    assert!(
        roles
            .lines()
            .any(|l| l.starts_with("admin ") && l.contains("built-in")),
        "{roles}"
    );
    assert!(roles.lines().any(|l| l.starts_with("member ")), "{roles}");
    assert_eq!(
        member.ok(&["can", "user:users:read"], "").await,
        "no: user:users:read\n"
    );
    let out = admin.ok(&["roles", "assign", "kimmy", "admin"], "").await;
    assert_eq!(out, format!("{kim}: admin, member\n"));
    let yes = admin
        .ok(&["can", "user:users:read", "--user", "kimmy"], "")
        .await;
    assert!(
        yes.starts_with("yes: user:users:read (granted by admin"),
        "{yes}"
    );
    let out = admin.ok(&["roles", "revoke", "kimmy", "admin"], "").await;
    assert_eq!(out, format!("{kim}: member\n"));
    assert_eq!(
        admin
            .ok(&["can", "user:users:read", "--user", "kimmy"], "")
            .await,
        "no: user:users:read\n"
    );

    // A role of one's own: created, assigned, updated; deleting it while
    // assigned needs --force.
    assert_eq!(
        admin
            .ok(
                &[
                    "roles",
                    "create",
                    "auditors",
                    "--permission",
                    "user:audit:read",
                    "--description",
                    "Read the trail"
                ],
                ""
            )
            .await,
        "created role auditors: user:audit:read\n"
    );
    let e = admin
        .fails(
            &[
                "roles",
                "create",
                "auditors",
                "--permission",
                "user:audit:read",
            ],
            "",
        )
        .await;
    assert!(e.to_string().starts_with("ALREADY_EXISTS: "), "{e}");
    let e = admin
        .fails(
            &["roles", "create", "oddballs", "--permission", "Chat:Read!"],
            "",
        )
        .await;
    assert!(e.to_string().starts_with("INVALID_ARGUMENT: "), "{e}");
    admin
        .ok(&["roles", "assign", "kimmy", "auditors"], "")
        .await;
    let yes = admin
        .ok(&["can", "user:audit:read", "--user", "kimmy"], "")
        .await;
    assert_eq!(yes, "yes: user:audit:read (granted by auditors)\n");
    let e = admin.fails(&["roles", "delete", "auditors"], "").await;
    assert!(!matches!(e, CliError::Usage(_)), "{e}");
    assert!(
        admin
            .ok(&["roles", "list"], "")
            .await
            .lines()
            .any(|l| l.starts_with("auditors "))
    );
    assert_eq!(
        admin
            .ok(
                &[
                    "roles",
                    "update",
                    "auditors",
                    "--permission",
                    "user:audit:*"
                ],
                ""
            )
            .await,
        "updated role auditors: user:audit:*\n"
    );
    let e = admin.fails(&["roles", "update", "auditors"], "").await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");
    assert_eq!(
        admin
            .ok(&["roles", "delete", "auditors", "--force"], "")
            .await,
        "deleted role auditors\n"
    );
    assert_eq!(
        admin
            .ok(&["can", "user:audit:read", "--user", "kimmy"], "")
            .await,
        "no: user:audit:read\n"
    );

    // Soft delete hides the account unless --deleted; restore brings it back.
    admin.ok(&["users", "delete", "kimmy"], "").await;
    let live = admin.ok(&["users", "list", "--query", "kimmy"], "").await;
    assert!(row_of(&live, &kim).is_none(), "{live}");
    let with_deleted = admin
        .ok(&["users", "list", "--query", "kimmy", "--deleted"], "")
        .await;
    let row = row_of(&with_deleted, &kim).unwrap_or_else(|| panic!("{with_deleted}"));
    assert!(row.contains("active (deleted)"), "{row}");
    let e = member.fails(&["whoami"], "").await;
    assert!(
        e.to_string().starts_with("UNAUTHENTICATED: "),
        "deletion ends sessions: {e}"
    );
    let out = admin.ok(&["users", "restore", "kimmy"], "").await;
    assert_eq!(out, format!("restored kimmy ({kim}): active\n"));
    member.ok(&["login", "kimmy"], "Str0ng!pass\n").await;

    // The trail of it all, newest first, filtered by target and action.
    let trail = admin.ok(&["audit", "--target", "kimmy"], "").await;
    let actions: Vec<&str> = trail
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let pos = |a: &str| {
        actions
            .iter()
            .position(|x| *x == a)
            .unwrap_or_else(|| panic!("{a} in\n{trail}"))
    };
    assert!(pos("user.restored") < pos("user.deleted"), "{trail}");
    assert!(pos("user.reactivated") < pos("user.suspended"), "{trail}");
    assert!(
        trail
            .lines()
            .filter(|l| l.contains("user.suspended"))
            .all(|l| l.contains(&boss_id)),
        "{trail}"
    );
    let only = admin
        .ok(&["audit", "--action", "user.suspended", "--days", "1"], "")
        .await;
    assert_eq!(only.lines().count(), 2, "{only}");

    // A name that is also part of 150 newer accounts' names (sorting
    // before it) is still resolved, past the query's first page.
    let crowd = admin
        .ok(
            &[
                "users",
                "create",
                "--email",
                "crowd@example.com",
                "--username",
                "crowd",
            ],
            "Str0ng!pass\n",
        )
        .await;
    let crowd = crowd.split(['(', ')']).nth(1).expect("an id").to_string();
    {
        use diesel_async::RunQueryDsl;
        let mut conn = rig.mesh.store.pg().await.expect("pg");
        diesel::sql_query(
            "INSERT INTO users (id, email, username, password_hash, display_name) \
             SELECT gen_random_uuid(), 'acrowd' || g || '@load.test', 'acrowd' || g, 'not-a-hash', 'Crowd ' || g \
             FROM generate_series(1, 150) AS g",
        )
        .execute(&mut conn)
        .await
        .expect("bulk insert");
    }
    let shown = admin.ok(&["users", "show", "crowd"], "").await;
    assert!(
        shown.starts_with(&format!("id            {crowd}\n")),
        "{shown}"
    );

    // Create, update and purge.
    let out = admin
        .ok(
            &[
                "users",
                "create",
                "--email",
                "nb@example.com",
                "--username",
                "newbie",
                "--role",
                "admin",
                "--password-stdin",
            ],
            "Str0ng!pass\n",
        )
        .await;
    assert!(
        out.starts_with("created newbie (") && out.ends_with("): active\n"),
        "{out}"
    );
    let newbie = out.split(['(', ')']).nth(1).expect("an id").to_string();
    let e = admin
        .fails(
            &[
                "users",
                "create",
                "--email",
                "nb2@example.com",
                "--username",
                "newbie",
            ],
            "Str0ng!pass\n",
        )
        .await;
    assert!(e.to_string().starts_with("ALREADY_EXISTS: "), "{e}");
    let nb = Terminal::new(rig.mesh.url());
    nb.ok(&["login", "newbie"], "Str0ng!pass\n").await;
    assert!(
        nb.ok(&["whoami"], "")
            .await
            .contains("\nroles:       admin\n")
    );
    let out = admin
        .ok(
            &[
                "users",
                "update",
                "newbie",
                "--email",
                "newbie@example.com",
                "--bio",
                "Hi",
            ],
            "",
        )
        .await;
    assert_eq!(out, format!("updated newbie ({newbie}): active\n"));
    let shown = admin.ok(&["users", "show", "newbie@example.com"], "").await;
    assert!(shown.contains("\nbio           Hi\n"), "{shown}");
    let e = admin
        .fails(
            &["users", "update", "newbie", "--email", "kim@example.com"],
            "",
        )
        .await;
    assert!(e.to_string().starts_with("ALREADY_EXISTS: "), "{e}");
    let e = admin.fails(&["users", "update", "newbie"], "").await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");
    let e = admin.fails(&["users", "purge", "newbie"], "").await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");
    assert_eq!(
        admin.ok(&["users", "purge", "newbie", "--yes"], "").await,
        format!("purged {newbie}\n")
    );
    let e = admin.fails(&["users", "show", &newbie], "").await;
    assert!(e.to_string().starts_with("NOT_FOUND: "), "{e}");
    assert!(
        nb.run(&["whoami"], "").await.result.is_err(),
        "the purged account's session is gone"
    );

    // A member can do none of it.
    for args in [
        vec!["users", "list"],
        vec!["users", "show", &boss_id],
        vec!["users", "suspend", &boss_id, "--reason", "x"],
        vec!["roles", "assign", &boss_id, "member"],
        vec!["users", "update", &boss_id, "--bio", "x"],
        vec!["users", "purge", &boss_id, "--yes"],
        vec!["roles", "create", "mine", "--permission", "chat:*"],
        vec!["roles", "delete", "member", "--force"],
        vec!["audit"],
    ] {
        let e = member.fails(&args, "").await;
        let text = e.to_string();
        assert!(
            text.starts_with("PERMISSION_DENIED: ") || text.starts_with("NOT_FOUND: "),
            "{args:?}: {text}"
        );
    }
    let shown = admin.ok(&["users", "show", &boss_id], "").await;
    assert!(shown.contains("\nstatus        active\n"), "{shown}");
}

/// `args` run on a fresh terminal with tess's password; its error.
async fn other_login(rig: &crate::llm::Rig, args: &[&str]) -> CliError {
    Terminal::new(rig.mesh.url())
        .fails(args, "Str0ng!pass\n")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_turns_two_factor_on_and_off_and_applies_mailed_tokens() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.register("tess@example.com", "tess").await;

    // Enrolment: the QR code, the secret and the URI; a wrong code does
    // not turn it on.
    let out = t.ok(&["totp", "enroll", "--qr"], "").await;
    assert!(out.contains('█') && out.contains('▀'), "a QR code:\n{out}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("the secret")
        .to_string();
    let uri = out
        .lines()
        .find_map(|l| l.strip_prefix("uri:    "))
        .expect("the uri");
    assert!(
        uri.starts_with("otpauth://totp/Trellis:tess%40example.com?"),
        "{uri}"
    );
    assert!(uri.contains(&format!("secret={secret}")), "{uri}");
    let plain = t.ok(&["totp", "enroll"], "").await;
    assert!(!plain.contains('█'), "no QR code off a terminal: {plain}");
    let secret = plain
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("the secret")
        .to_string();
    assert!(
        t.run(&["totp", "confirm", "000000"], "")
            .await
            .result
            .is_err()
    );
    let step = fresh_step().await;
    let r = t
        .run(&["totp", "confirm", &code_at(&secret, step - 30)], "")
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let recovery: Vec<&str> = r.out.lines().collect();
    assert!(recovery.len() >= 8, "{}", r.out);
    assert!(
        r.err.contains("two-factor authentication is on"),
        "{}",
        r.err
    );
    assert!(t.ok(&["whoami"], "").await.ends_with("two-factor:  on\n"));

    // Logging in now takes a code: refused without one off a terminal,
    // taken with one, or with a recovery code (once).
    t.ok(&["logout"], "").await;
    let e = t.fails(&["login", "tess"], "Str0ng!pass\n").await;
    assert!(
        matches!(e, CliError::Usage(_)) && e.to_string().contains("--totp"),
        "{e}"
    );
    t.ok(
        &["login", "tess", "--recovery-code", recovery[0]],
        "Str0ng!pass\n",
    )
    .await;
    let e = other_login(&rig, &["login", "tess", "--recovery-code", recovery[0]]).await;
    assert!(
        e.to_string().starts_with("UNAUTHENTICATED: "),
        "a spent recovery code: {e}"
    );

    // Disabling takes the password and a current code.
    let e = t.fails(&["totp", "disable"], "Str0ng!pass\n").await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");
    let e = t
        .fails(
            &["totp", "disable", "--code", &code_at(&secret, step)],
            "wrong-password\n",
        )
        .await;
    assert!(
        e.to_string().starts_with("UNAUTHENTICATED: ")
            || e.to_string().starts_with("INVALID_ARGUMENT: current"),
        "{e}"
    );
    assert!(t.ok(&["whoami"], "").await.ends_with("two-factor:  on\n"));
    assert_eq!(
        t.ok(
            &["totp", "disable", "--code", &code_at(&secret, step + 30)],
            "Str0ng!pass\n"
        )
        .await,
        "two-factor authentication is off\n"
    );
    t.ok(&["logout"], "").await;
    t.ok(&["login", "tess"], "Str0ng!pass\n").await;

    // E-mail verification with the mailed token.
    assert!(
        t.ok(&["whoami"], "")
            .await
            .contains("<tess@example.com> (not verified)\n")
    );
    let out = t.ok(&["verify-email"], "").await;
    assert!(
        out.starts_with("a verification token is on its way"),
        "{out}"
    );
    let token =
        crate::auth_account::mailed_token(&rig.mesh, "tess@example.com", "email_verification")
            .await
            .expect("a mailed token");
    let e = t.fails(&["verify-email", "evt_bogus"], "").await;
    assert!(
        e.to_string().starts_with("INVALID_ARGUMENT: ") || e.to_string().starts_with("NOT_FOUND: "),
        "{e}"
    );
    assert_eq!(
        t.ok(&["verify-email", &token], "").await,
        "e-mail address verified\n"
    );
    let who = t.ok(&["whoami"], "").await;
    assert!(who.starts_with("tess <tess@example.com>\n"), "{who}");

    // A forgotten password: the same answer for an unknown address; the
    // mailed token sets a new one, ends every session (this terminal's
    // login is forgotten) and works once.
    let unknown = t
        .ok(&["reset-password", "request", "nobody@example.com"], "")
        .await;
    let known = t
        .ok(&["reset-password", "request", "tess@example.com"], "")
        .await;
    assert_eq!(
        unknown.replace("nobody@example.com", "X"),
        known.replace("tess@example.com", "X")
    );
    let token = crate::auth_account::mailed_token(&rig.mesh, "tess@example.com", "password_reset")
        .await
        .expect("a mailed token");
    let other = Terminal::new(rig.mesh.url());
    other.ok(&["login", "tess"], "Str0ng!pass\n").await;
    let e = t
        .fails(&["reset-password", "apply", &token], "short\n")
        .await;
    assert!(e.to_string().starts_with("INVALID_ARGUMENT: "), "{e}");
    assert_eq!(
        t.ok(&["reset-password", "apply", &token], "N3w!passphrase\n")
            .await,
        "password changed; every session ended: trellis login\n"
    );
    assert!(matches!(
        t.fails(&["whoami"], "").await,
        CliError::NotLoggedIn(_)
    ));
    assert!(
        other.run(&["whoami"], "").await.result.is_err(),
        "the other session ended"
    );
    let e = t
        .fails(&["reset-password", "apply", &token], "An0ther!passphrase\n")
        .await;
    assert!(
        !matches!(e, CliError::Usage(_)),
        "a used token is refused: {e}"
    );
    let e = t.fails(&["login", "tess"], "Str0ng!pass\n").await;
    assert!(e.to_string().starts_with("UNAUTHENTICATED: "), "{e}");
    t.ok(&["login", "tess"], "N3w!passphrase\n").await;
}

/// Each line of `out` as JSON.
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_json_a_line_an_item_or_event() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.ok(&["login", "llmuser"], &format!("{PASSWORD}\n")).await;

    let who = json_lines(&t.ok(&["--json", "whoami"], "").await);
    assert_eq!(who.len(), 1);
    assert_eq!(who[0]["account"]["username"], "llmuser");
    let me = who[0]["principal"]["userId"]
        .as_str()
        .expect("an id")
        .to_string();

    // A reply: accepted, its deltas, completed — one event a line.
    let r = t
        .run(&["--json", "chat", "-m", "fast", "hi there"], "")
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let events = json_lines(&r.out);
    assert!(
        events[0]["accepted"]["assistantMessageId"].is_string(),
        "{}",
        r.out
    );
    let text: String = events
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "Hello world");
    let last = events.last().expect("an end");
    assert_eq!(
        last["completed"]["status"], "MESSAGE_STATUS_COMPLETED",
        "{last}"
    );
    assert!(
        last["completed"]["usage"]["completionTokens"].as_i64() > Some(0),
        "{last}"
    );
    let session = events[0]["accepted"]["sessionId"]
        .as_str()
        .expect("session")
        .to_string();

    // A failed reply prints its event, then fails the command.
    rig.primary.push([Script::status(500)]);
    rig.backup.push([Script::status(500)]);
    let r = t
        .run(
            &["--json", "chat", "-m", "fast", "-s", &session, "again"],
            "",
        )
        .await;
    assert!(
        matches!(r.result, Err(CliError::Reply(_))),
        "{:?}",
        r.result
    );
    let events = json_lines(&r.out);
    assert_eq!(
        events.last().expect("an end")["failed"]["code"],
        tonic::Code::Unavailable as i32,
        "{}",
        r.out
    );

    // Lists: an object per item.
    let sessions = json_lines(&t.ok(&["--json", "sessions"], "").await);
    assert!(
        sessions.iter().any(|s| s["id"] == session.as_str()),
        "{sessions:?}"
    );
    let history = json_lines(&t.ok(&["--json", "history", &session], "").await);
    let roles: Vec<&str> = history.iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles[..2], ["ROLE_USER", "ROLE_ASSISTANT"], "{history:?}");
    assert_eq!(history[0]["content"], "hi there");
    assert_eq!(history[1]["content"], "Hello world");
    let models = json_lines(&t.ok(&["--json", "models"], "").await);
    assert!(models.iter().any(|m| m["alias"] == "fast"), "{models:?}");

    let indexed = json_lines(
        &t.ok(
            &[
                "--json", "docs", "index", "-", "--id", "j1", "--title", "Jay",
            ],
            "Jellyfish drift.\n",
        )
        .await,
    );
    assert_eq!(indexed[0]["created"], true);
    assert_eq!(indexed[0]["externalId"], "j1");
    let doc = indexed[0]["id"].as_str().expect("an id");
    let hits = json_lines(&t.ok(&["--json", "search", "jellyfish"], "").await);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["documentId"], doc);
    let shown = json_lines(&t.ok(&["--json", "docs", "show", doc], "").await);
    assert_eq!(shown[0]["ownerId"], me.as_str());
    assert_eq!(shown[0]["visibility"], "VISIBILITY_PRIVATE");

    // Usage: one object, 64-bit integers as strings.
    let usage = json_lines(&t.ok(&["--json", "usage"], "").await);
    assert_eq!(usage.len(), 1);
    let requests: i64 = usage[0]["total"]["requests"]
        .as_str()
        .expect("a string")
        .parse()
        .expect("a number");
    assert!(requests >= 2, "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_edits_the_profile_and_preferences_and_deletes_the_account() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.register("pat@example.com", "patty").await;
    let me = t.ok(&["profile"], "").await;
    assert!(me.contains("\nusername      patty\n"), "{me}");
    assert!(!me.contains("bio"), "{me}");

    // Only the fields given change; "" clears one.
    let out = t
        .ok(
            &[
                "profile",
                "set",
                "--bio",
                "Grows beans",
                "--time-zone",
                "Europe/Berlin",
                "--phone",
                "+14155550123",
            ],
            "",
        )
        .await;
    assert!(out.contains("\nbio           Grows beans\n"), "{out}");
    assert!(out.contains("\ntime zone     Europe/Berlin\n"), "{out}");
    assert!(out.contains("\nphone         +14155550123\n"), "{out}");
    let out = t.ok(&["profile", "set", "--phone", ""], "").await;
    assert!(!out.contains("phone"), "{out}");
    assert!(out.contains("\nbio           Grows beans\n"), "{out}");
    let e = t.fails(&["profile", "set"], "").await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");
    let e = t
        .fails(
            &[
                "profile",
                "set",
                "--phone",
                "12345",
                "--date-of-birth",
                "2999-01-01",
            ],
            "",
        )
        .await;
    let text = e.to_string();
    assert!(text.starts_with("INVALID_ARGUMENT: "), "{text}");
    assert!(
        text.contains("phone: ") && text.contains("date_of_birth: "),
        "{text}"
    );
    assert!(
        t.ok(&["profile"], "")
            .await
            .contains("\nbio           Grows beans\n")
    );

    // Preferences, then a chat that carries them to the model.
    assert!(t.ok(&["prefs"], "").await.starts_with("style         -\n"));
    let out = t
        .ok(
            &[
                "prefs",
                "set",
                "--style",
                "casual",
                "--industry",
                "fintech",
                "--industry",
                "retail",
            ],
            "",
        )
        .await;
    assert!(
        out.starts_with("style         casual\nindustries    fintech, retail\n"),
        "{out}"
    );
    let out = t.ok(&["prefs", "set", "--no-industries"], "").await;
    assert!(
        out.starts_with("style         casual\nindustries    \n"),
        "{out}"
    );
    let before = rig.primary.seen().len();
    t.ok(&["chat", "-m", "fast", "hello"], "").await;
    let seen = rig.primary.seen();
    let body = &seen.get(before).expect("the chat's upstream call").body;
    assert!(
        body.to_string()
            .contains("Use a casual communication style."),
        "{body}"
    );

    // Deleting the account: the password is checked, then every session
    // ends and the login is forgotten; logging in is refused.
    let other = Terminal::new(rig.mesh.url());
    other.ok(&["login", "patty"], "Str0ng!pass\n").await;
    let e = t.fails(&["delete-account"], "wrong\n").await;
    assert!(!matches!(e, CliError::Usage(_)), "{e}");
    assert!(t.ok(&["whoami"], "").await.starts_with("patty "));
    assert_eq!(
        t.ok(&["delete-account"], "Str0ng!pass\n").await,
        "account deleted; every session ended\n"
    );
    assert!(matches!(
        t.fails(&["whoami"], "").await,
        CliError::NotLoggedIn(_)
    ));
    assert!(other.run(&["whoami"], "").await.result.is_err());
    let e = t.fails(&["login", "patty"], "Str0ng!pass\n").await;
    assert!(e.to_string().starts_with("UNAUTHENTICATED: "), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_sessions_and_searches_messages() {
    let rig = rig(|_| {}).await;
    let t = Terminal::new(rig.mesh.url());
    t.ok(&["login", "llmuser"], &format!("{PASSWORD}\n")).await;
    let r = t
        .run(&["chat", "-m", "fast", "tell me about compost heaps"], "")
        .await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let session = r
        .err
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .expect("the session")
        .to_string();

    let shown = t.ok(&["sessions", "show", &session], "").await;
    assert!(shown.starts_with(&format!("id           {session}\ntitle        tell me about compost heaps\nstatus       active\nmodel        fast\nretrieval    off\nmessages     2\n")), "{shown}");
    let shown = t.ok(&["sessions", "rename", &session, "Compost"], "").await;
    assert!(shown.contains("\ntitle        Compost\n"), "{shown}");

    // New instructions reach the next turn's upstream request.
    let shown = t
        .ok(
            &[
                "sessions",
                "set",
                &session,
                "--system",
                "Answer in one line.",
            ],
            "",
        )
        .await;
    assert!(
        shown.ends_with("\nsystem       Answer in one line.\n"),
        "{shown}"
    );
    let before = rig.primary.seen().len();
    t.ok(&["chat", "-s", &session, "and worms?"], "").await;
    let body = rig.primary.seen()[before].body.to_string();
    assert!(body.contains("Answer in one line."), "{body}");
    let e = t.fails(&["sessions", "set", &session], "").await;
    assert!(matches!(e, CliError::Usage(_)), "{e}");
    let e = t
        .fails(
            &["sessions", "set", &session, "--model", "no-such-model"],
            "",
        )
        .await;
    assert!(e.to_string().starts_with("INVALID_ARGUMENT: "), "{e}");

    // Search over the messages, with the session and message ids.
    let r = t.run(&["sessions", "search", "compost"], "").await;
    assert!(r.result.is_ok(), "{:?}", r.result);
    let hit = r
        .out
        .lines()
        .next()
        .unwrap_or_else(|| panic!("a hit: {}", r.err));
    assert!(hit.contains(&format!("] {session} ")), "{hit}");
    assert!(
        hit.ends_with("you: tell me about <mark>compost</mark> heaps"),
        "{hit}"
    );
    assert_eq!(r.err, "1 message\n");

    // Someone else sees none of it.
    let other = Terminal::new(rig.mesh.url());
    other.register("vi@example.com", "violet").await;
    for args in [
        vec!["sessions", "show", &session],
        vec!["sessions", "rename", &session, "Mine"],
        vec!["sessions", "set", &session, "--system", "x"],
        vec!["sessions", "rm", &session],
    ] {
        let e = other.fails(&args, "").await;
        assert!(e.to_string().starts_with("NOT_FOUND: "), "{args:?}: {e}");
    }
    let r = other.run(&["sessions", "search", "compost"], "").await;
    assert_eq!((r.out.as_str(), r.err.as_str()), ("", "0 messages\n"));
    assert!(
        t.ok(&["sessions", "show", &session], "")
            .await
            .contains("\ntitle        Compost\n")
    );

    // Deleted: gone from show, the list and the search.
    assert_eq!(
        t.ok(&["sessions", "rm", &session], "").await,
        format!("deleted {session}\n")
    );
    let e = t.fails(&["sessions", "show", &session], "").await;
    assert!(e.to_string().starts_with("NOT_FOUND: "), "{e}");
    assert!(!t.ok(&["sessions"], "").await.contains(&session));
    assert_eq!(t.ok(&["sessions", "search", "compost"], "").await, "");
}
