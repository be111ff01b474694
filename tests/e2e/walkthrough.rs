//! README's grpcurl walk-through, run for real: a stranger at a terminal
//! registers, logs in, asks who they are, edits their profile, indexes and
//! searches a note, chats and streams a generation — all through grpcurl
//! and reflection, with JSON in and out, against the in-process mesh (the
//! LLM upstream is the fake one). If a README command stops working, this
//! test says which.

use serde_json::Value;

use crate::foundation::run_grpcurl;
use crate::llm::rig;

/// Runs grpcurl against `addr`, with a bearer token when given, and returns
/// its success and output.
async fn call(addr: &str, token: Option<&str>, method: &str, body: &str) -> (bool, String) {
    let addr = addr.to_string();
    let header = token.map(|t| format!("authorization: Bearer {t}"));
    let method = method.to_string();
    let body = body.to_string();
    tokio::task::spawn_blocking(move || {
        let mut args: Vec<&str> = vec!["-plaintext", "-d", &body];
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        args.extend([addr.as_str(), method.as_str()]);
        run_grpcurl(&args)
    })
    .await
    .expect("join")
}

/// A call that must succeed; its output as JSON values (a stream prints
/// one object per message).
async fn ok(addr: &str, token: Option<&str>, method: &str, body: &str) -> Vec<Value> {
    let (success, out) = call(addr, token, method, body).await;
    assert!(success, "{method} failed:\n{out}");
    serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{method} printed no JSON ({e}):\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_works_with_grpcurl() {
    let rig = rig(|_| {}).await;
    let addr = rig.mesh.addr.to_string();
    let a = addr.as_str();

    // Accounts and tokens.
    let reg = ok(
        a,
        None,
        "trellis.auth.v1.AuthService/Register",
        r#"{"email":"ada@example.com","username":"ada","password":"Str0ng!pass"}"#,
    )
    .await;
    let id = reg[0]["account"]["id"]
        .as_str()
        .expect("account id")
        .to_string();
    let login = ok(
        a,
        None,
        "trellis.auth.v1.AuthService/Login",
        r#"{"login":"ada","password":"Str0ng!pass"}"#,
    )
    .await;
    let token = login[0]["tokens"]["accessToken"]
        .as_str()
        .expect("access token")
        .to_string();
    let t = Some(token.as_str());
    let me = ok(a, t, "trellis.auth.v1.AuthService/WhoAmI", "{}").await;
    assert_eq!(me[0]["principal"]["userId"], id.as_str());
    assert_eq!(me[0]["principal"]["roles"][0], "member");
    assert_eq!(me[0]["account"]["username"], "ada");

    // Bad input and missing credentials are answered with their codes.
    let (success, out) = call(
        a,
        None,
        "trellis.auth.v1.AuthService/Register",
        r#"{"email":"not-an-email","username":"x","password":"short"}"#,
    )
    .await;
    assert!(!success);
    assert!(out.contains("InvalidArgument"), "{out}");
    assert!(out.contains("email"), "field violations named: {out}");
    // The details decoded through reflection, not left as raw bytes.
    assert!(
        out.contains(
            r#""@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"#
        ),
        "BadRequest decoded: {out}"
    );
    assert!(!out.contains("is not recognized"), "{out}");
    let (success, out) = call(a, None, "trellis.auth.v1.AuthService/WhoAmI", "{}").await;
    assert!(!success);
    assert!(out.contains("Unauthenticated"), "{out}");

    // Profile with a field mask.
    ok(
        a,
        t,
        "trellis.user.v1.UserService/UpdateMe",
        r#"{"user":{"first_name":"Ada","time_zone":"Europe/London","bio":"not in the mask"},"update_mask":{"paths":["first_name","time_zone"]}}"#,
    )
    .await;
    let profile = ok(a, t, "trellis.user.v1.UserService/GetMe", "{}").await;
    assert_eq!(profile[0]["user"]["firstName"], "Ada");
    assert_eq!(profile[0]["user"]["timeZone"], "Europe/London");
    assert!(
        profile[0]["user"]["bio"].is_null(),
        "bio was not in the mask"
    );

    // Index a note, find it again.
    ok(
        a,
        t,
        "trellis.search.v1.SearchService/IndexDocuments",
        r#"{"documents":[{"externalId":"n1","collection":"notes","title":"Gardening note","body":"Tomatoes need sun and trellises."}]}"#,
    )
    .await;
    let found = ok(
        a,
        t,
        "trellis.search.v1.SearchService/Search",
        r#"{"query":"trellises","collections":["notes"]}"#,
    )
    .await;
    assert_eq!(found[0]["hits"][0]["title"], "Gardening note");
    assert!(
        found[0]["hits"][0]["snippet"]
            .as_str()
            .is_some_and(|s| s.contains("<mark>")),
        "highlighted snippet: {}",
        found[0]
    );

    // A chat turn over the browser-friendly server stream.
    let session = ok(
        a,
        t,
        "trellis.chat.v1.ChatService/CreateSession",
        r#"{"title":"First chat","model":"fast"}"#,
    )
    .await;
    let sid = session[0]["session"]["id"].as_str().expect("session id");
    let events = ok(
        a,
        t,
        "trellis.chat.v1.ChatService/SendMessage",
        &format!(r#"{{"send":{{"sessionId":"{sid}","content":"Hello!","clientMessageId":"m1"}}}}"#),
    )
    .await;
    assert!(
        events[0]["event"].get("accepted").is_some(),
        "first event: {}",
        events[0]
    );
    let text: String = events
        .iter()
        .filter_map(|e| e["event"]["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "Hello world");
    assert!(
        events.last().expect("events")["event"]
            .get("completed")
            .is_some()
    );
    let history = ok(
        a,
        t,
        "trellis.chat.v1.ChatService/ListMessages",
        &format!(r#"{{"sessionId":"{sid}"}}"#),
    )
    .await;
    let messages = history[0]["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "the user turn and the reply");

    // A generation streamed straight from the gateway.
    let events = ok(
        a,
        t,
        "trellis.llm.v1.LlmService/GenerateStream",
        r#"{"params":{"model":"fast","messages":[{"role":"ROLE_USER","content":"Say hi"}]}}"#,
    )
    .await;
    let text: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(text, "Hello world");
    let done = &events.last().expect("events")["completed"];
    assert_eq!(done["provider"], "primary");
}
