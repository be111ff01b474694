//! `--json`: what a command prints, as protobuf's canonical JSON mapping —
//! lowerCamelCase field names, enum values by name, 64-bit integers as
//! strings, timestamps in RFC 3339, default values left out (what grpcurl
//! prints) — one object per line: one per item of a list, one per event of
//! a reply. The messages are read through the contracts' own descriptor
//! set (`trellis_proto::FILE_DESCRIPTOR_SET`), so the output follows the
//! `.proto` files without code of its own per message.

use std::io::Write;
use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::CliError;

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
});

/// `msg` as one line of JSON.
pub fn line<M: prost::Message + prost::Name>(msg: &M) -> Result<String, CliError> {
    let broken = |what: String| CliError::Server(format!("--json: {what}"));
    let pool = POOL.as_ref().map_err(|e| broken(e.clone()))?;
    let name = M::full_name();
    let desc = pool
        .get_message_by_name(&name)
        .ok_or_else(|| broken(format!("{name} is not in the descriptor set")))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| broken(e.to_string()))?;
    let mut out = serde_json::Serializer::new(Vec::new());
    dynamic
        .serialize_with_options(&mut out, &SerializeOptions::new())
        .map_err(|e| broken(e.to_string()))?;
    String::from_utf8(out.into_inner()).map_err(|e| broken(e.to_string()))
}

/// `msg` as one line of JSON on `out`.
pub fn print<M: prost::Message + prost::Name>(
    out: &mut (dyn Write + Send),
    msg: &M,
) -> Result<(), CliError> {
    writeln!(out, "{}", line(msg)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::chat::v1 as chat;
    use trellis_proto::user::v1 as user;

    #[test]
    fn messages_print_in_the_canonical_mapping() {
        let u = user::User {
            id: "01a2".into(),
            username: "ada".into(),
            display_name: "Ada L".into(),
            status: user::UserStatus::Suspended as i32,
            roles: vec!["admin".into()],
            create_time: Some(prost_types::Timestamp {
                seconds: 1_764_633_600,
                nanos: 0,
            }),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&line(&u).expect("json")).expect("parses");
        assert_eq!(v["username"], "ada");
        assert_eq!(v["displayName"], "Ada L");
        assert_eq!(v["status"], "USER_STATUS_SUSPENDED");
        assert_eq!(v["roles"], serde_json::json!(["admin"]));
        assert_eq!(v["createTime"], "2025-12-02T00:00:00Z");
        // Defaults are left out.
        assert!(v.get("email").is_none(), "{v}");
    }

    #[test]
    fn events_keep_their_oneof_and_64_bit_integers_are_strings() {
        let e = chat::ChatEvent {
            event: Some(chat::chat_event::Event::Completed(chat::Completed {
                message_id: "m".into(),
                usage: Some(chat::Usage {
                    prompt_tokens: 3,
                    completion_tokens: 5,
                    cost_micros: 12,
                }),
                ..Default::default()
            })),
        };
        let text = line(&e).expect("json");
        assert!(!text.contains('\n'), "one line: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(v["completed"]["messageId"], "m");
        assert_eq!(v["completed"]["usage"]["completionTokens"], 5);
        assert_eq!(v["completed"]["usage"]["costMicros"], "12");
    }
}
