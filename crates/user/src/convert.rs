//! Rows to wire messages and back: the profile row, preferences, and the
//! JSON ↔ `google.protobuf.Struct` bridge for free-form fields.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use diesel::prelude::*;
use prost_types::value::Kind;
use trellis_proto::user::v1 as pb;
use trellis_store::schema::users;
use uuid::Uuid;

/// The profile columns of `users`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub username: String,
    pub display_name: String,
    pub first_name: String,
    pub last_name: String,
    pub phone: String,
    pub date_of_birth: Option<NaiveDate>,
    pub bio: String,
    pub avatar_url: String,
    pub locale: String,
    pub time_zone: String,
    pub status: String,
    pub email_verified_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn status_pb(s: &str) -> pb::UserStatus {
    match s {
        "active" => pb::UserStatus::Active,
        "inactive" => pb::UserStatus::Inactive,
        "suspended" => pb::UserStatus::Suspended,
        _ => pb::UserStatus::Unspecified,
    }
}

pub fn status_db(s: pb::UserStatus) -> Option<&'static str> {
    match s {
        pb::UserStatus::Active => Some("active"),
        pb::UserStatus::Inactive => Some("inactive"),
        pb::UserStatus::Suspended => Some("suspended"),
        pb::UserStatus::Unspecified => None,
    }
}

pub fn user_pb(r: UserRow, roles: Vec<String>) -> pb::User {
    pb::User {
        id: r.id.to_string(),
        email: r.email,
        username: r.username,
        display_name: r.display_name,
        first_name: r.first_name,
        last_name: r.last_name,
        phone: r.phone,
        date_of_birth: r
            .date_of_birth
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default(),
        bio: r.bio,
        avatar_url: r.avatar_url,
        locale: r.locale,
        time_zone: r.time_zone,
        status: status_pb(&r.status) as i32,
        roles,
        email_verified: r.email_verified_at.is_some(),
        create_time: Some(ts(r.created_at)),
        update_time: Some(ts(r.updated_at)),
        delete_time: r.deleted_at.map(ts),
    }
}

/// JSON → protobuf Struct value.
pub fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_to_struct_map(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn json_to_struct_map(o: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// A JSON object as a Struct (anything else: an empty Struct).
pub fn json_to_struct(v: &serde_json::Value) -> prost_types::Struct {
    match v {
        serde_json::Value::Object(o) => json_to_struct_map(o),
        _ => prost_types::Struct::default(),
    }
}

/// Protobuf Struct value → JSON.
pub fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(J::Number)
            .unwrap_or(J::Null),
        Some(Kind::StringValue(s)) => J::String(s.clone()),
        Some(Kind::ListValue(l)) => J::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_struct_round_trip() {
        let j = serde_json::json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": "e"}});
        assert_eq!(struct_to_json(&json_to_struct(&j)), j);
    }
}
